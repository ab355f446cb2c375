"""Prints the max abs difference between keras-mixer and the reference fixtures.

    KERAS_BACKEND=jax python benchmarks/fixture_parity.py   # or tensorflow, torch

Reads ../shared/fixtures/ (official Flax and timm outputs for known weights
and inputs; see its README) and prints one row per fixture and output.
"""

import json
import pathlib

import keras
import numpy as np

from keras_mixer import MLPMixer
from keras_mixer import load_official
from keras_mixer import load_timm

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"
CASES = (
    # fixture, loader, key prefix, GELU of that implementation
    ("official_flax_mixer_tiny.npz", load_official, "params/", True),
    ("timm_mixer_tiny.npz", load_timm, "state_dict/", False),
)


def main():
    print(f"backend {keras.backend.backend()}")
    print(f"{'fixture':32} {'output':11} {'max abs diff':>12}")
    for name, loader, prefix, gelu_approximate in CASES:
        data = np.load(FIXTURES / name, allow_pickle=False)
        config = json.loads(str(data["config"]))
        params = {k: data[k] for k in data.files if k.startswith(prefix)}
        for num_classes, output in ((config["num_classes"], "logits"), (None, "pre_logits")):
            model = MLPMixer(
                image_shape=(*config["image"], 3),
                patch_size=config["patch"],
                num_blocks=config["num_blocks"],
                hidden_dim=config["hidden_dim"],
                tokens_mlp_dim=config["tokens_mlp_dim"],
                channels_mlp_dim=config["channels_mlp_dim"],
                num_classes=num_classes,
                include_preprocessing=False,
                gelu_approximate=gelu_approximate,
            )
            loader(model, params)
            got = keras.ops.convert_to_numpy(model(data["inputs"]))
            print(f"{name:32} {output:11} {np.abs(got - data[output]).max():12.1e}")


if __name__ == "__main__":
    main()
