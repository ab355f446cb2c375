"""Per-block features: a functional model on a Mixer's own layers whose outputs are a dict.

    extractor = feature_extractor(model)               # stem, block_0..., pre_logits
    maps = feature_extractor(model, ["block_3", "block_7"], grid=True)(images)
    maps["block_3"].shape                              # (batch, grid_h, grid_w, channels)

The extractor shares the model's layers and weights (nothing is copied):
training one trains the other. Outputs are keyed by the model's stable
sublayer names. Token outputs are `(batch, tokens, channels)` in the patch
grid's raster order, the stem's own order (row by row, as the stem
convolution lays patches out); with `grid=True` they are reshaped to
`(batch, grid_h, grid_w, channels)`, the layout dense-prediction heads
take. `pre_logits` is `(batch, channels)` either way. This is what timm's
`forward_intermediates` and big_vision's dict of stage outputs give.
"""

import keras


def feature_names(model):
    """Every name `feature_extractor(model, layers=...)` accepts, in graph order."""
    return ["stem", *(f"block_{i}" for i in range(model.num_blocks)), "pre_head_layer_norm", "pre_logits"]


def default_features(model):
    """What `feature_extractor(model)` returns: the stem, every block and the pre-logits."""
    return [name for name in feature_names(model) if name != "pre_head_layer_norm"]


def _token_output(model, name):
    # The stem is a convolution: its own output is the grid; "tokens"
    # flattens it in raster order, as the blocks see it.
    return model.get_layer("tokens" if name == "stem" else name).output


def feature_extractor(model, layers=None, grid=False):
    """A `keras.Model` from `model`'s inputs to a dict of its intermediate outputs.

    Args:
        model: an `MLPMixer`.
        layers: names from `feature_names(model)` (default:
            `default_features(model)`: `stem`, every `block_{i}` and
            `pre_logits`).
        grid: False: token outputs are `(batch, tokens, channels)`. True:
            `(batch, grid_h, grid_w, channels)`.

    Returns:
        a functional `keras.Model` named `<model name>_features`, on the
        same weights; it saves and loads as a `.keras` file.

    Raises:
        ValueError: an unknown name, listing the valid ones.
    """
    valid = feature_names(model)
    names = default_features(model) if layers is None else [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"Unknown feature name(s) {unknown or names} for this model. Valid: {', '.join(valid)}.")
    grid_shape = tuple(model.get_layer("stem").output.shape[1:3])
    outputs = {}
    for name in dict.fromkeys(names):  # once each, in the order asked
        if name == "pre_logits":
            outputs[name] = model.get_layer(name).output
        elif grid and name == "stem":
            outputs[name] = model.get_layer("stem").output
        else:
            x = _token_output(model, name)
            if grid:
                x = keras.layers.Reshape((*grid_shape, x.shape[-1]), name=f"{name}_grid")(x)
            outputs[name] = x
    return keras.Model(model.input, outputs, name=f"{model.name}_features")
