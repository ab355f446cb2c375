"""Pretrained parameters: the official checkpoint layout mapped onto `MLPMixer`.

The official checkpoints (`gs://mixer_models/...`, written by
`vit_jax/models_mixer.py`) are flat mappings such as
`MixerBlock_0/token_mixing/Dense_0/kernel`. Their array layouts equal Keras'
(`Dense` kernels are (in, out), the stem kernel is (kh, kw, in, out)), so
loading is a renaming with strict key and shape checks.
"""

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
    params = {str(k): v for k, v in params.items()}
    if params and all(k.startswith("params/") for k in params):
        params = {k[len("params/"):]: v for k, v in params.items()}
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
