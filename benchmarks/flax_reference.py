"""The official MLP-Mixer as a Flax module: the reference that `bench_model.py` times.

This is the architecture of `vit_jax/models_mixer.py` (google-research/
vision_transformer), written out here so the benchmark needs no clone of
that repository: a strided-convolution stem, Mixer blocks of
LayerNorm -> token-mixing MLP (on the transposed tokens) -> residual,
LayerNorm -> channel-mixing MLP -> residual, a pre-head LayerNorm, mean
pooling and a zero-initialised head. Flax's defaults carry the official
details: LayerNorm epsilon 1e-6 and the tanh-approximate GELU.

It is the official function, not a look-alike: `python
benchmarks/flax_reference.py` loads the parameters of
`../shared/fixtures/official_flax_mixer_tiny.npz` (made by the official
module) and checks that the logits and pre-logits match the fixture's.
"""

import json
import pathlib
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_flax_mixer_tiny.npz"


class MlpBlock(nn.Module):
    mlp_dim: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(self.mlp_dim, dtype=self.dtype)(x)
        y = nn.gelu(y)
        return nn.Dense(x.shape[-1], dtype=self.dtype)(y)


class MixerBlock(nn.Module):
    tokens_mlp_dim: int
    channels_mlp_dim: int
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = jnp.swapaxes(y, 1, 2)
        y = MlpBlock(self.tokens_mlp_dim, self.dtype, name="token_mixing")(y)
        y = jnp.swapaxes(y, 1, 2)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype)(x)
        return x + MlpBlock(self.channels_mlp_dim, self.dtype, name="channel_mixing")(y)


class MlpMixer(nn.Module):
    patch_size: tuple
    num_blocks: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    num_classes: int = None
    # The compute dtype of every layer (parameters stay float32); the head
    # computes in float32, like keras-mixer's under "mixed_bfloat16".
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, images, pre_logits=False):
        x = nn.Conv(self.hidden_dim, self.patch_size, strides=self.patch_size,
                    padding="VALID", dtype=self.dtype, name="stem")(images)
        batch, height, width, channels = x.shape
        x = jnp.reshape(x, (batch, height * width, channels))
        for _ in range(self.num_blocks):
            x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, self.dtype)(x)
        x = nn.LayerNorm(dtype=self.dtype, name="pre_head_layer_norm")(x)
        x = jnp.mean(x, axis=1)
        if pre_logits or not self.num_classes:
            return x
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)


def _nest(flat):
    """`{"a/b/c": array}` -> `{"a": {"b": {"c": array}}}` (Flax's parameter tree)."""
    tree = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)
    return tree


def from_fixture(path=FIXTURE):
    """(module, params, inputs, logits, pre_logits) of the official fixture."""
    with np.load(path, allow_pickle=False) as data:
        config = json.loads(str(data["config"]))
        params = {k[len("params/"):]: data[k] for k in data.files if k.startswith("params/")}
        inputs, logits, pre_logits = data["inputs"], data["logits"], data["pre_logits"]
    module = MlpMixer(
        patch_size=tuple(config["patch"]),
        num_blocks=config["num_blocks"], hidden_dim=config["hidden_dim"],
        tokens_mlp_dim=config["tokens_mlp_dim"], channels_mlp_dim=config["channels_mlp_dim"],
        num_classes=config["num_classes"],
    )
    return module, {"params": _nest(params)}, inputs, logits, pre_logits


def check_fixture(path=FIXTURE):
    """Max abs differences (logits, pre-logits) from the official model's outputs."""
    module, params, inputs, logits, pre_logits = from_fixture(path)
    ours = np.asarray(module.apply(params, jnp.asarray(inputs)))
    ours_pre = np.asarray(module.apply(params, jnp.asarray(inputs), pre_logits=True))
    return float(np.abs(ours - logits).max()), float(np.abs(ours_pre - pre_logits).max())


if __name__ == "__main__":
    logits_diff, pre_logits_diff = check_fixture()
    print(f"official fixture: max abs difference logits {logits_diff:.2e}, pre-logits {pre_logits_diff:.2e}")
    sys.exit(0 if max(logits_diff, pre_logits_diff) <= 1e-5 else 1)
