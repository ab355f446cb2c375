"""Pretrained parameters: official checkpoints and timm weights onto `MLPMixer`.

The official checkpoints (`gs://mixer_models/...`, written by
`vit_jax/models_mixer.py`) are flat mappings such as
`MixerBlock_0/token_mixing/Dense_0/kernel`. Their array layouts equal Keras'
(`Dense` kernels are (in, out), the stem kernel is (kh, kw, in, out)), so
loading is a renaming with strict key and shape checks. timm state_dicts are
first converted to that layout (`timm_to_official`), so both go through the
same strict check.

Released checkpoints load by name (`load_official(model,
"imagenet21k/Mixer-B_16")`, `MLPMixer.from_checkpoint(...)`): they are
downloaded once into a cache (`keras_mixer.released`). Resolution changes (paper Appendix C) and
head changes are computed on the flat parameter mapping, and the result is
loaded into a fresh model through the same strict check.
"""

import logging
import os
import pathlib
import re

import keras
import numpy as np

from keras_mixer import hub
from keras_mixer import npz
from keras_mixer import released
from keras_mixer.layers import check_kwargs
from keras_mixer.model import MLPMixer


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


def _load_params(model, params):
    """Assigns a flat official mapping to every weight of `model`, strictly
    (see `load_official`); nothing is assigned when anything does not fit."""
    params = _strip_prefix({str(k): v for k, v in params.items()}, "params/")
    if model.num_classes is None:
        params = {k: v for k, v in params.items() if not k.startswith("head/")}
    variables = official_variables(model)

    missing, unexpected, wrong = npz.shape_differences({k: v.shape for k, v in variables.items()}, params)
    missing, unexpected = sorted(missing), sorted(unexpected)
    mismatched = [f"{key}: checkpoint {found} vs model {shape}" for key, found, shape in sorted(wrong)]
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
    strict check of `load_official` reports them.

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


def _unreadable(path, kind, error):
    return ValueError(
        f"{path!r} is not a readable {kind} file ({type(error).__name__}: {str(error).splitlines()[0]}). "
        "It may be truncated or corrupted: download it again."
    )


def _read_safetensors(path):
    try:
        from safetensors.numpy import load_file
    except ImportError as error:
        raise ImportError(f"Reading {path} needs the `safetensors` package: pip install safetensors") from error
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError
        raise _unreadable(path, ".safetensors", error) from None


def _read_pth(path):
    try:
        import torch
    except ImportError as error:
        raise ImportError(f'Reading the PyTorch file {path} needs torch: pip install "keras-mixer[torch]"') from error
    import pickle

    try:
        # weights_only: a checkpoint file cannot run code when it loads.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, which would run
        # whatever the file holds; it is not repeated.
        raise ValueError(
            f"{path!r} holds Python objects besides tensors, which are never loaded (they could run "
            "code). Save a plain state_dict instead: torch.save(model.state_dict(), path)."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise _unreadable(path, "PyTorch", error) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not hasattr(state, "items"):
        raise ValueError(
            f"{path!r} holds a {type(state).__name__}, not a state_dict (a mapping from "
            "parameter names to tensors), as torch.save(model.state_dict(), path) writes."
        )
    return state


def _read_timm_file(path):
    path = str(path)
    if not path.endswith((".safetensors", ".pth", ".pt", ".bin")):
        raise ValueError(
            f"Unknown timm weights format for {path}: expected a `.safetensors` "
            "or `.pth` file, or a mapping of arrays."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"timm weights file {path!r} does not exist.")
    return _read_safetensors(path) if path.endswith(".safetensors") else _read_pth(path)


def load_timm(model, source):
    """Loads timm `MlpMixer` weights into an `MLPMixer` built with exact GELU.

    Args:
        model: `MLPMixer` with `gelu_approximate=False` (timm's GELU).
        source: a mapping of arrays (a `state_dict`), the path of a
            `.safetensors` or `.pth` file (read with
            `torch.load(weights_only=True)`), a timm folder or an
            "hf://<org>/<repo>" id (`keras_mixer.hub`).

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
        source = _read_timm_file(hub.timm_files(source).weights)
    _load_params(model, timm_to_official(source))


def read_official(source, cache_dir=None, mirror=None):
    """The flat parameter mapping of `source`: a mapping, an `.npz` path or a released name."""
    if hasattr(source, "items"):
        params = {str(k): np.asarray(v) for k, v in source.items()}
    elif str(source) in released.RELEASES:
        params = npz.read(released.fetch(str(source), cache_dir, mirror))
    elif pathlib.Path(source).is_file():
        params = npz.read(source)
    else:
        raise FileNotFoundError(
            f"{str(source)!r} is neither an existing .npz file nor a released "
            f"checkpoint name ({', '.join(released.RELEASES)})."
        )
    return _strip_prefix(params, "params/")


def load_official(model, source, cache_dir=None, mirror=None):
    """Loads official-checkpoint parameters into every weight of an `MLPMixer`.

    Keys are exactly the official ones (`stem/kernel`,
    `MixerBlock_0/token_mixing/Dense_0/kernel`, `pre_head_layer_norm/scale`,
    `head/bias`, ...). A common `params/` prefix, as in a Flax variables
    dict flattened with its collection, is stripped. A headless model
    (`num_classes=None`) ignores `head/*` keys, since features need no head.
    Anything else that does not fit is an error, and nothing is assigned.

    Args:
        model: `MLPMixer`.
        source: a mapping from key to array (an opened `.npz` works), an
            `.npz` path, or a released name (`keras_mixer.released.RELEASES`),
            downloaded once.
        cache_dir, mirror: for a released name (see `released.fetch`).

    Raises:
        ValueError: listing every missing key, unexpected key and shape
            mismatch at once.

    Example:
    >>> model = MLPMixer.from_variant("B/16", num_classes=21843)
    >>> load_official(model, "imagenet21k/Mixer-B_16")
    """
    _load_params(model, read_official(source, cache_dir, mirror))


def _numpy_params(model):
    return {k: np.array(keras.ops.convert_to_numpy(v)) for k, v in official_variables(model).items()}


def save_official(model, path):
    """Writes `model`'s parameters as an official `.npz` (keys and layouts).

    Written to a temporary file and renamed, so a crash leaves no half file.
    `load_official` of the file gives a bit-identical model.
    """
    return npz.write(path, _numpy_params(model))


# --- Architecture from parameters, heads and resolution -------------------------


def _grid_tokens(image_shape, patch):
    return (image_shape[0] // patch[0]) * (image_shape[1] // patch[1])


def official_config(params, image_shape=None, pretrained_image_shape=None):
    """Infers `MLPMixer` arguments, at the pretraining size, from official parameter shapes.

    A checkpoint stores its token count, not its grid. The pretraining
    image shape is `pretrained_image_shape` when given; else `image_shape`
    when its token grid has the checkpoint's token count (the model is
    built at the size it was trained at); else the square grid of that
    count. A non-square checkpoint used at another size (Appendix C) needs
    `pretrained_image_shape`, and the error says so.

    Args:
        params: the official mapping.
        image_shape: the shape the model is wanted at, or None.
        pretrained_image_shape: (height, width, channels) the checkpoint was
            trained at, or None.

    Returns:
        dict with image_shape (of the pretraining), patch_size, num_blocks,
        hidden_dim, tokens_mlp_dim, channels_mlp_dim and num_classes (None
        without a head).
    """
    params = _strip_prefix(dict(params), "params/")
    needed = ("stem/kernel", "MixerBlock_0/token_mixing/Dense_0/kernel",
              "MixerBlock_0/channel_mixing/Dense_0/kernel")
    absent = [k for k in needed if k not in params]
    if absent:
        raise ValueError(
            f"Not an official MLP-Mixer checkpoint: no {', '.join(absent)} "
            f"(found e.g. {', '.join(sorted(params)[:5])})."
        )
    patch_h, patch_w, channels, hidden = np.shape(params["stem/kernel"])
    patch = (patch_h, patch_w)
    num_blocks = 0
    while f"MixerBlock_{num_blocks}/token_mixing/Dense_0/kernel" in params:
        num_blocks += 1
    num_tokens, tokens_mlp_dim = np.shape(params["MixerBlock_0/token_mixing/Dense_0/kernel"])
    channels_mlp_dim = np.shape(params["MixerBlock_0/channel_mixing/Dense_0/kernel"])[1]
    head = params.get("head/kernel")
    side = int(round(num_tokens ** 0.5))
    if pretrained_image_shape is not None:
        height, width = pretrained_image_shape[:2]
        if _grid_tokens(pretrained_image_shape, patch) != num_tokens:
            raise ValueError(
                f"pretrained_image_shape {tuple(pretrained_image_shape)} with patch "
                f"{patch} gives {_grid_tokens(pretrained_image_shape, patch)} tokens; "
                f"the checkpoint has {num_tokens}. Pass the size it was trained at."
            )
    elif image_shape is not None and _grid_tokens(image_shape, patch) == num_tokens:
        height, width = image_shape[:2]
    elif side * side == num_tokens:
        height, width = side * patch_h, side * patch_w
    else:
        wanted = "" if image_shape is None else (
            f" image_shape {tuple(image_shape)} gives {_grid_tokens(image_shape, patch)} tokens,"
            " so it is not the pretraining size either;")
        raise ValueError(
            f"The checkpoint has {num_tokens} tokens of patch {patch}, not a square "
            f"grid, so its pretraining image size cannot be inferred;{wanted} pass "
            "pretrained_image_shape=(height, width, channels), the size the "
            "checkpoint was trained at."
        )
    return dict(
        image_shape=(int(height), int(width), int(channels)),
        patch_size=(int(patch_h), int(patch_w)),
        num_blocks=num_blocks,
        hidden_dim=int(hidden),
        tokens_mlp_dim=int(tokens_mlp_dim),
        channels_mlp_dim=int(channels_mlp_dim),
        num_classes=None if head is None else int(np.shape(head)[1]),
    )


def _scale_factors(base_shape, image_shape):
    """Integer (kh, kw) with image = (kh, kw) x base, or a ValueError that says why."""
    factors = []
    for side, base, size in (("height", base_shape[0], image_shape[0]),
                             ("width", base_shape[1], image_shape[1])):
        if size % base or size < base:
            lower = max(base, size // base * base)
            raise ValueError(
                f"Image {side} {size} is not an integer multiple of the "
                f"pretraining {side} {base}. Appendix C of the paper adapts the "
                "token-mixing MLPs only to K times the pretraining size (K = 1, "
                f"2, 3, ...); the nearest valid {side}s are {lower} and {lower + base}."
            )
        factors.append(size // base)
    if tuple(image_shape[2:]) != tuple(base_shape[2:]):
        raise ValueError(
            f"The checkpoint takes {base_shape[2]} channels, not {image_shape[2]}."
        )
    return tuple(factors)


def adapt_params(params, grid, factors):
    """Appendix C on a flat mapping: token-mixing MLPs for a (kh x kw)-times larger grid.

    Each of the kh x kw windows of the image gets its own copy of every
    token-mixing MLP: W1 and W2 become block-diagonal over windows, biases
    are tiled. Tokens are in raster order over the whole image, so a
    window's tokens are not contiguous; `window` and `local` below map each
    new token to its window and to its position inside the window.

    Args:
        params: official mapping at the base grid.
        grid: (h, w), the base token grid.
        factors: (kh, kw).
    """
    (h, w), (kh, kw) = grid, factors
    windows = kh * kw
    rows, cols = np.divmod(np.arange(h * kh * w * kw), w * kw)
    window = (rows // h) * kw + cols // w
    local = (rows % h) * w + cols % w
    tokens = np.arange(window.size)
    out = dict(params)
    for key in params:
        match = re.fullmatch(r"(MixerBlock_\d+/token_mixing)/Dense_0/kernel", key)
        if not match:
            continue
        prefix = match[1]
        w1, b1 = params[f"{prefix}/Dense_0/kernel"], params[f"{prefix}/Dense_0/bias"]
        w2, b2 = params[f"{prefix}/Dense_1/kernel"], params[f"{prefix}/Dense_1/bias"]
        dim = w1.shape[1]
        new_w1 = np.zeros((tokens.size, windows, dim), w1.dtype)
        new_w1[tokens, window] = w1[local]
        new_w2 = np.zeros((windows, dim, tokens.size), w2.dtype)
        new_w2[window, :, tokens] = w2[:, local].T
        out[f"{prefix}/Dense_0/kernel"] = new_w1.reshape(tokens.size, windows * dim)
        out[f"{prefix}/Dense_0/bias"] = np.tile(b1, windows)
        out[f"{prefix}/Dense_1/kernel"] = new_w2.reshape(windows * dim, tokens.size)
        out[f"{prefix}/Dense_1/bias"] = b2[local]
    return out


def _model_config(model):
    config = model.get_config()
    config.pop("trainable", None)
    return config


def _set_head(params, config, num_classes):
    """Drops the head keys when `num_classes` differs from the params' head."""
    head = params.get("head/kernel")
    current = None if head is None else head.shape[1]
    if num_classes == current:
        return params
    params = {k: v for k, v in params.items() if not k.startswith("head/")}
    if num_classes is not None:
        # The official fine-tuning starts from a zero head.
        params["head/kernel"] = np.zeros((config["hidden_dim"], num_classes), "float32")
        params["head/bias"] = np.zeros((num_classes,), "float32")
        logging.warning(
            "Replaced the %s-class head by a fresh zero head of %d classes.",
            current, num_classes,
        )
    return params


def _build(config, params):
    model = MLPMixer(**config)
    _load_params(model, params)
    return model


def _adapt(params, config, image_shape):
    """`(params, config)` for `image_shape`, K times `config["image_shape"]` (K may be 1)."""
    base = tuple(config["image_shape"])
    factors = _scale_factors(base, tuple(image_shape))
    if factors == (1, 1):
        return params, config
    patch_h, patch_w = config["patch_size"]
    config = dict(
        config, image_shape=tuple(image_shape),
        tokens_mlp_dim=config["tokens_mlp_dim"] * factors[0] * factors[1],
    )
    return adapt_params(params, (base[0] // patch_h, base[1] // patch_w), factors), config


def adapt_resolution(model, image_shape):
    """A new `MLPMixer` for `image_shape` = (K_h, K_w) times the model's, per Appendix C.

    Its token-mixing MLPs have K_h*K_w times the tokens and hidden units;
    at this point it computes exactly the mean of the original model's
    outputs over the K_h x K_w windows of the image. The original is not
    changed and shares no arrays with the new model.
    """
    params, config = _adapt(_numpy_params(model), _model_config(model), image_shape)
    return _build(config, params)


def reset_head(model, num_classes):
    """A new `MLPMixer` with copies of `model`'s backbone and a head for `num_classes`.

    The same class count keeps the head exactly; another gives a zero head
    (as official fine-tuning starts); None drops it (pre-logits out). The
    original stays usable: the new model holds copies, never shared arrays.
    """
    config = _model_config(model)
    config["num_classes"] = num_classes
    return _build(config, _set_head(_numpy_params(model), config, num_classes))


def from_checkpoint(source, num_classes=None, image_shape=None, pretrained_image_shape=None,
                    cache_dir=None, mirror=None, **overrides):
    """Builds the `MLPMixer` of an official checkpoint; see `MLPMixer.from_checkpoint`."""
    # Before any download: a misspelt argument is found in a second, not
    # after a gigabyte.
    check_kwargs("MLPMixer.from_checkpoint", overrides,
                 MLPMixer._config_keys() + ("pretrained_image_shape", "cache_dir", "mirror"))
    params = read_official(source, cache_dir, mirror)
    config = official_config(params, image_shape, pretrained_image_shape)
    base_shape = config["image_shape"]
    if num_classes is None:
        num_classes = config["num_classes"]
    config.update(overrides)
    params, config = _adapt(params, config, image_shape if image_shape is not None else base_shape)
    config["num_classes"] = num_classes
    return _build(config, _set_head(params, config, num_classes))


def from_timm(source, num_classes=None, image_shape=None, **overrides):
    """Builds the `MLPMixer` of timm weights; see `MLPMixer.from_timm`."""
    check_kwargs("MLPMixer.from_timm", overrides, MLPMixer._config_keys())
    files = hub.timm_files(source)
    params = timm_to_official(_read_timm_file(files.weights))
    cfg = files.pretrained_cfg
    pretrained_image_shape = None
    if cfg.get("input_size"):
        channels, height, width = cfg["input_size"]
        pretrained_image_shape = (height, width, channels)
        image_shape = pretrained_image_shape if image_shape is None else image_shape
    if "mean" in cfg and "std" in cfg and "pixel_mean" not in overrides:
        # The normalisation these weights were trained with.
        overrides.update(pixel_mean=list(cfg["mean"]), pixel_std=list(cfg["std"]))
    overrides.setdefault("gelu_approximate", False)  # timm's exact GELU
    return from_checkpoint(params, num_classes=num_classes, image_shape=image_shape,
                           pretrained_image_shape=pretrained_image_shape, **overrides)
