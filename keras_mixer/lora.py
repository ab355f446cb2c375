"""LoRA fine-tuning of a Mixer: low-rank adapters on the MLPs' `Dense` kernels, a small file of what trains.

    model = MLPMixer.from_checkpoint("imagenet21k/Mixer-B_16", num_classes=10)
    model.enable_lora(8)                    # adapters on every token/channel-mixing Dense
    model.fit(...)
    model.save_lora_weights("cifar10.lora.npz")
    # later: the same base, the same enable_lora, then
    model.load_lora_weights("cifar10.lora.npz")

Keras' own `Dense.enable_lora(rank)` does the arithmetic: the frozen
kernel W is used as W + (alpha / rank) A B, with A (in, rank) drawn
He-uniform and B (rank, out) zero, so training starts at the base model.
`enable_lora` freezes every other weight except the head, which a new
class count needs anyway, as KerasHub's `Backbone.enable_lora` does.
The biases of the adapted layers stay frozen, so the LoRA file holds only
the adapters and the head: every trainable variable, by path, with the
rank, alpha and targets in its header. `model.save("m.keras")` of a LoRA
model writes the merged model (Keras merges A B into the kernel), which
loads as a plain `MLPMixer`.
"""

import json

import numpy as np

from keras_mixer import npz

# Every Dense of the token- and channel-mixing MLPs, matched against the end of a layer's path.
DEFAULT_TARGETS = ("token_mixing/Dense_0", "token_mixing/Dense_1", "channel_mixing/Dense_0", "channel_mixing/Dense_1")
_HEADER = "lora_header"


def _dense_layers(model):
    import keras

    return [layer for layer in model._flatten_layers(include_self=False) if type(layer) is keras.layers.Dense]


def _matches(path, target):
    return path == target or path.endswith("/" + target)


def enable_lora(model, rank, target_names=None, alpha=None):
    """Adds rank-`rank` adapters to the `Dense` layers whose path ends with
    one of `target_names` (default `DEFAULT_TARGETS`) and freezes everything
    else but the head. Returns the adapted layers' paths.

    Raises:
        ValueError: a bad rank, a model that already has adapters, or a
            target that matches no Dense (the message lists their paths).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer, got {rank!r}.")
    if getattr(model, "lora_targets", None):
        raise ValueError("LoRA is already enabled on this model; build a fresh one to change it.")
    targets = list(DEFAULT_TARGETS if target_names is None else [target_names] if isinstance(
        target_names, str) else target_names)
    dense = _dense_layers(model)
    unmatched = [t for t in targets if not any(_matches(layer.path, t) for layer in dense)]
    if unmatched or not targets:
        raise ValueError(f"LoRA target(s) {unmatched or targets} match no Dense layer of this model. Its Dense "
                         f"layers: {', '.join(layer.path for layer in dense[:6])}, ... (any path suffix works).")
    chosen = [layer for layer in dense if any(_matches(layer.path, t) for t in targets)]
    for layer in model._flatten_layers(include_self=False):
        layer.trainable = layer.name == "head" and layer not in chosen
    for layer in chosen:
        layer.trainable = True
        layer.enable_lora(rank, lora_alpha=alpha)
        layer.bias.trainable = False
    model.lora_targets, model.lora_rank, model.lora_alpha = targets, rank, alpha or rank
    return [layer.path for layer in chosen]


def save_lora_weights(model, path):
    """Writes every trainable variable of a LoRA model (adapters, head) to
    the `.npz` at `path`, atomically; returns the path."""
    if not getattr(model, "lora_targets", None):
        raise ValueError("This model has no LoRA adapters: call model.enable_lora(rank) first.")
    import keras

    variables = {v.path: keras.ops.convert_to_numpy(v) for v in model.trainable_variables}
    header = {"rank": model.lora_rank, "alpha": model.lora_alpha, "targets": model.lora_targets,
              "variables": sorted(variables)}
    return npz.write(path, {_HEADER: np.array(json.dumps(header)), **variables})


def load_lora_weights(model, path):
    """Loads a file of `save_lora_weights` into `model`, enabling LoRA with
    the file's rank, alpha and targets first when the model has none.

    Raises:
        ValueError: the file was written for another rank, targets or
            architecture (every mismatch listed); nothing is assigned then.
    """
    arrays = npz.read(path)
    if _HEADER not in arrays:
        raise ValueError(f"{path} is not a LoRA file of save_lora_weights (no {_HEADER}).")
    header = json.loads(str(arrays.pop(_HEADER)))
    if not getattr(model, "lora_targets", None):
        enable_lora(model, header["rank"], header["targets"], header["alpha"])
    elif (model.lora_rank, model.lora_targets) != (header["rank"], header["targets"]):
        raise ValueError(f"{path} holds rank-{header['rank']} adapters on {header['targets']}; this model has "
                         f"rank {model.lora_rank} on {model.lora_targets}.")
    variables = {v.path: v for v in model.trainable_variables}
    missing, unexpected, wrong = npz.shape_differences({k: v.shape for k, v in variables.items()}, arrays)
    problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    problems += [f"{k}: file {found}, model {shape}" for k, found, shape in wrong]
    if problems:
        raise ValueError(f"{path} does not fit this model ({len(problems)} problem(s)): " + "; ".join(problems[:5]))
    for key, variable in variables.items():
        variable.assign(arrays[key])
    return model
