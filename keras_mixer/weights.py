"""Pretrained parameters: official checkpoints and timm weights onto `MLPMixer`.

The official checkpoints (`gs://mixer_models/...`, written by
`vit_jax/models_mixer.py`) are flat mappings such as
`MixerBlock_0/token_mixing/Dense_0/kernel`. Their array layouts equal Keras'
(`Dense` kernels are (in, out), the stem kernel is (kh, kw, in, out)), so
loading is a renaming with strict key and shape checks. timm state_dicts are
first converted to that layout (`timm_to_official`), so both go through the
same strict check.
"""

import re

import numpy as np


def official_variables(model):
    """Returns `{official checkpoint key: keras.Variable}` for an `MLPMixer`.

    Args:
        model: `MLPMixer`.

    Example:
    >>> sorted(official_variables(model))[:2]
    ['MixerBlock_0/LayerNorm_0/bias', 'MixerBlock_0/LayerNorm_0/scale']
    """
    def norm(prefix, layer):
        return {f"{prefix}/scale": layer.gamma, f"{prefix}/bias": layer.beta}

    def dense(prefix, layer):
        return {f"{prefix}/kernel": layer.kernel, f"{prefix}/bias": layer.bias}

    stem = model.get_layer("stem")
    variables = dense("stem", stem)
    for i in range(model.num_blocks):
        block = model.get_layer(f"block_{i}")
        prefix = f"MixerBlock_{i}"
        variables.update(norm(f"{prefix}/LayerNorm_0", block.token_norm))
        variables.update(norm(f"{prefix}/LayerNorm_1", block.channel_norm))
        for mlp_name in ("token_mixing", "channel_mixing"):
            mlp = getattr(block, mlp_name)
            variables.update(dense(f"{prefix}/{mlp_name}/Dense_0", mlp.dense_0))
            variables.update(dense(f"{prefix}/{mlp_name}/Dense_1", mlp.dense_1))
    variables.update(norm("pre_head_layer_norm", model.get_layer("pre_head_layer_norm")))
    if model.num_classes is not None:
        variables.update(dense("head", model.get_layer("head")))
    return variables


def _strip_prefix(params, prefix):
    if params and all(k.startswith(prefix) for k in params):
        return {k[len(prefix):]: v for k, v in params.items()}
    return params


def load_official_params(model, params):
    """Assigns official-checkpoint parameters to every weight of an `MLPMixer`.

    Keys are exactly the official ones (`stem/kernel`,
    `MixerBlock_0/token_mixing/Dense_0/kernel`, `pre_head_layer_norm/scale`,
    `head/bias`, ...). A common `params/` prefix, as in a Flax variables
    dict flattened with its collection, is stripped. A headless model
    (`num_classes=None`) ignores `head/*` keys, since features need no head.
    Anything else that does not fit is an error, and nothing is assigned.

    Args:
        params: mapping from key to array (an opened `.npz` works).

    Raises:
        ValueError: listing every missing key, unexpected key and shape
            mismatch at once.

    Example:
    >>> load_official_params(model, np.load("Mixer-B_16.npz"))
    """
    params = _strip_prefix({str(k): v for k, v in params.items()}, "params/")
    if model.num_classes is None:
        params = {k: v for k, v in params.items() if not k.startswith("head/")}
    variables = official_variables(model)

    missing = sorted(set(variables) - set(params))
    unexpected = sorted(set(params) - set(variables))
    mismatched = [
        f"{key}: checkpoint {tuple(np.shape(params[key]))} vs model "
        f"{tuple(variables[key].shape)}"
        for key in sorted(set(params) & set(variables))
        if tuple(np.shape(params[key])) != tuple(variables[key].shape)
    ]
    if missing or unexpected or mismatched:
        lines = [
            f"The parameters do not fit this {model.name} "
            f"(patch {model.patch_size}, {model.num_blocks} blocks, hidden "
            f"{model.hidden_dim}, tokens_mlp {model.tokens_mlp_dim}, "
            f"channels_mlp {model.channels_mlp_dim}, {model.num_tokens} "
            f"tokens, num_classes {model.num_classes}). Build the model with "
            "the checkpoint's variant, image size and number of classes."
        ]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  {item}" for item in items)
        raise ValueError("\n".join(lines))

    for key, variable in variables.items():
        variable.assign(np.asarray(params[key], dtype=variable.dtype))


# timm's `MlpMixer` names -> official names. Layouts differ too: PyTorch
# `Linear.weight` is (out, in), the stem's `Conv2d.weight` (out, in, kh, kw).
_DENSE = {"weight": "kernel", "bias": "bias"}
_NORM = {"weight": "scale", "bias": "bias"}
_MIXING = {"tokens": "token_mixing", "channels": "channel_mixing"}


def _official_from_timm_key(key):
    match = re.fullmatch(r"stem\.proj\.(weight|bias)", key)
    if match:
        return f"stem/{_DENSE[match[1]]}"
    match = re.fullmatch(r"blocks\.(\d+)\.norm([12])\.(weight|bias)", key)
    if match:
        return f"MixerBlock_{match[1]}/LayerNorm_{int(match[2]) - 1}/{_NORM[match[3]]}"
    match = re.fullmatch(
        r"blocks\.(\d+)\.mlp_(tokens|channels)\.fc([12])\.(weight|bias)", key
    )
    if match:
        return (
            f"MixerBlock_{match[1]}/{_MIXING[match[2]]}/Dense_{int(match[3]) - 1}/"
            f"{_DENSE[match[4]]}"
        )
    match = re.fullmatch(r"norm\.(weight|bias)", key)
    if match:
        return f"pre_head_layer_norm/{_NORM[match[1]]}"
    match = re.fullmatch(r"head\.(weight|bias)", key)
    if match:
        return f"head/{_DENSE[match[1]]}"
    return None


def timm_to_official(state_dict):
    """Converts a timm `MlpMixer` state_dict to official keys and layouts.

    Keys that are not timm Mixer keys are kept as they are, so that the
    strict check of `load_official_params` reports them.

    Args:
        state_dict: mapping from timm key to array (a common `state_dict/`
            prefix is stripped).

    Example:
    >>> params = timm_to_official(torch_model.state_dict())
    >>> params["stem/kernel"].shape  # (kh, kw, 3, hidden)
    """
    state_dict = _strip_prefix(
        {str(k): _to_numpy(v) for k, v in state_dict.items()}, "state_dict/"
    )
    params = {}
    for key, value in state_dict.items():
        official = _official_from_timm_key(key)
        if official is None:
            params[key] = value
        elif key == "stem.proj.weight" and value.ndim == 4:
            params[official] = value.transpose(2, 3, 1, 0)
        elif official.endswith("/kernel") and value.ndim == 2:
            params[official] = value.T
        else:
            params[official] = value
    return params


def _to_numpy(value):
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch.
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _read_timm_file(path):
    path = str(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ImportError(
                f"Reading {path} needs the `safetensors` package: "
                "pip install safetensors"
            ) from error
        return load_file(path)
    if path.endswith((".pth", ".pt", ".bin")):
        try:
            import torch
        except ImportError as error:
            raise ImportError(
                f"Reading the PyTorch file {path} needs torch: "
                'pip install "keras-mixer[torch]"'
            ) from error
        # weights_only: a checkpoint file cannot run code when it loads.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        return state
    raise ValueError(
        f"Unknown timm weights format for {path}: expected a `.safetensors` "
        "or `.pth` file, or a mapping of arrays."
    )


def load_timm(model, source):
    """Loads timm `MlpMixer` weights into an `MLPMixer` built with exact GELU.

    Args:
        model: `MLPMixer` with `gelu_approximate=False` (timm's GELU).
        source: a mapping of arrays (a `state_dict`), or the path of a
            `.safetensors` or `.pth` file (read with
            `torch.load(weights_only=True)`).

    Example:
    >>> model = MLPMixer.from_variant("B/16", gelu_approximate=False)
    >>> load_timm(model, "mixer_b16_224.safetensors")
    """
    if model.gelu_approximate:
        raise ValueError(
            "timm's MlpMixer uses the exact (erf) GELU, but this model was "
            "built with gelu_approximate=True (the official tanh GELU); its "
            "outputs would differ from timm's. Build it with "
            "gelu_approximate=False."
        )
    if not hasattr(source, "items"):
        source = _read_timm_file(source)
    load_official_params(model, timm_to_official(source))
