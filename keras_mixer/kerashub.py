"""MLP-Mixer as KerasHub models: `MixerBackbone`, `MixerImageClassifier`, their preprocessor, presets.

    from keras_mixer import kerashub
    kerashub.save_preset("imagenet21k/Mixer-B_16", "mixer_b16")      # an official checkpoint
    kerashub.save_preset(my_mlp_mixer, "my_preset")                  # any MLPMixer, or a .keras file
    classifier = keras_hub.models.ImageClassifier.from_preset("my_preset")   # or "hf://user/repo"
    classifier.predict(images)                                       # raw [0, 255] pixels, any size

KerasHub (the `kerashub` extra: keras-hub>=0.32, which needs keras>=3.15
and tensorflow-text) finds and shares models as presets: a folder, a
Kaggle handle or a Hugging Face repo (`hf://user/repo`) holding
`config.json`, the weights and the preprocessor, written by its own
`save_to_preset` and read by its own `from_preset`. These classes are its
image-classification pattern for MLP-Mixer:

- `MixerBackbone`: the Mixer from the patch embedding to the pre-head
  LayerNorm, built by the same `keras_mixer.model.mixer_trunk` as
  `MLPMixer` (same layers, names and weights). Its output is the
  normalised tokens in their grid, `(batch, grid_h, grid_w, hidden_dim)`,
  the feature map KerasHub's image backbones give.
- `MixerImageConverter` resizes images to the model's size and scales them
  as `MLPMixer(include_preprocessing=True)` does: [0, 255] to [-1, 1], or
  timm's per-channel mean and std.
- `MixerImageClassifier`: KerasHub's `ImageClassifier` on them. Its
  average pooling over the grid is the Mixer's mean over tokens, and its
  `predictions` Dense is the Mixer's head, so the logits are `MLPMixer`'s.

`to_kerashub` and `from_kerashub` convert between `MLPMixer` and these
classes with the weights copied exactly. Importing `keras_mixer` registers
the classes as soon as `keras_hub` is imported too (see
`keras_mixer/__init__.py`), so that `keras_hub.models.Backbone.from_preset`
and `keras_hub.models.ImageClassifier.from_preset` rebuild them.
"""

import pathlib

import keras
import numpy as np

try:
    import keras_hub
except ModuleNotFoundError as error:
    raise ImportError('keras_mixer.kerashub needs KerasHub: pip install "keras-mixer[kerashub]" '
                      "(keras-hub 0.32 needs keras>=3.15).") from error

if tuple(int(part) for part in keras_hub.__version__.split(".")[:2]) < (0, 32):
    raise ImportError(f"keras_mixer.kerashub needs keras-hub>=0.32 (this environment has "
                      f'{keras_hub.__version__}): pip install "keras-mixer[kerashub]" (keras-hub 0.32 needs '
                      "keras>=3.15).")

from keras_mixer import checkpoint
from keras_mixer import hub
from keras_mixer.layers import check_kwargs
from keras_mixer.model import MLPMixer
from keras_mixer.model import _concrete_policies
from keras_mixer.model import check_architecture
from keras_mixer.model import mixer_trunk
from keras_mixer.model import pixel_scaling

# The MLPMixer arguments that make the backbone (no head, no preprocessing).
BACKBONE_KEYS = ("image_shape", "patch_size", "num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim",
                 "dropout_rate", "stochastic_depth_rate", "layer_norm_epsilon", "gelu_approximate", "seed", "remat")


@keras.saving.register_keras_serializable(package="keras_mixer")
class MixerBackbone(keras_hub.models.Backbone):
    """MLP-Mixer's feature extractor as a KerasHub `Backbone`.

    Args: those of `MLPMixer` that shape the network (see its docstring):
        `image_shape`, `patch_size`, `num_blocks`, `hidden_dim`,
        `tokens_mlp_dim`, `channels_mlp_dim`, `dropout_rate`,
        `stochastic_depth_rate`, `layer_norm_epsilon`, `gelu_approximate`,
        `seed`, `remat`, and `dtype`. The input is images already scaled
        (the preprocessor's `MixerImageConverter` does it); the output is
        `(batch, grid_h, grid_w, hidden_dim)`, the tokens after the
        pre-head LayerNorm in the stem's raster order.

    Example:
    >>> backbone = MixerBackbone(image_shape=(32, 32, 3), patch_size=8, num_blocks=2,
    ...                          hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32)
    >>> tuple(backbone(np.zeros((1, 32, 32, 3))).shape)
    (1, 4, 4, 16)
    """

    def __init__(
        self,
        image_shape=(224, 224, 3),
        patch_size=16,
        num_blocks=12,
        hidden_dim=768,
        tokens_mlp_dim=384,
        channels_mlp_dim=3072,
        dropout_rate=0.0,
        stochastic_depth_rate=0.0,
        layer_norm_epsilon=1e-6,
        gelu_approximate=True,
        seed=None,
        remat=False,
        dtype=None,
        **kwargs,
    ):
        check_kwargs("MixerBackbone", kwargs, BACKBONE_KEYS + ("dtype", "name", "trainable"))
        image_shape, patch, num_tokens = check_architecture(
            image_shape, patch_size, num_blocks, hidden_dim, tokens_mlp_dim, channels_mlp_dim,
            dropout_rate, stochastic_depth_rate)
        if dtype is not None:
            dtype = keras.dtype_policies.get(dtype)

        # === Functional graph ===
        inputs = keras.Input(shape=image_shape, name="images")
        x = mixer_trunk(
            inputs, patch, num_tokens, num_blocks, hidden_dim, tokens_mlp_dim, channels_mlp_dim,
            dropout_rate, stochastic_depth_rate, layer_norm_epsilon, gelu_approximate, seed, remat, dtype,
        )
        grid = (image_shape[0] // patch[0], image_shape[1] // patch[1])
        outputs = keras.layers.Reshape((*grid, hidden_dim), dtype=dtype, name="grid")(x)
        super().__init__(inputs=inputs, outputs=outputs, dtype=dtype, **kwargs)
        if dtype is not None:
            _concrete_policies(self)

        # === Config ===
        self.image_shape = image_shape
        self.patch_size = patch
        self.num_blocks = num_blocks
        self.hidden_dim = hidden_dim
        self.tokens_mlp_dim = tokens_mlp_dim
        self.channels_mlp_dim = channels_mlp_dim
        self.dropout_rate = float(dropout_rate)
        self.stochastic_depth_rate = float(stochastic_depth_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.gelu_approximate = bool(gelu_approximate)
        self.seed = seed
        self.remat = bool(remat)

    def get_config(self):
        config = super().get_config()
        config.update({key: getattr(self, key) for key in BACKBONE_KEYS})
        return config


@keras.saving.register_keras_serializable(package="keras_mixer")
class MixerImageConverter(keras_hub.layers.ImageConverter):
    """Resizes images to the backbone's size and scales [0, 255] pixels as
    the Mixer was trained: `scale=1/127.5, offset=-1` ([-1, 1], the official
    models), or timm's per-channel `(x / 255 - mean) / std`."""

    backbone_cls = MixerBackbone


@keras.saving.register_keras_serializable(package="keras_mixer")
class MixerImageClassifierPreprocessor(keras_hub.models.ImageClassifierPreprocessor):
    """`MixerImageConverter` on `x`; `y` and `sample_weight` pass unchanged."""

    backbone_cls = MixerBackbone
    image_converter_cls = MixerImageConverter


@keras.saving.register_keras_serializable(package="keras_mixer")
class MixerImageClassifier(keras_hub.models.ImageClassifier):
    """KerasHub's `ImageClassifier` on a `MixerBackbone`: average pooling over
    the token grid (the Mixer's pre-logits) and a `predictions` Dense (its
    head), logits out (`activation=None`). Arguments: `ImageClassifier`'s."""

    backbone_cls = MixerBackbone
    preprocessor_cls = MixerImageClassifierPreprocessor


def image_converter(model):
    """The `MixerImageConverter` that feeds `model` (an `MLPMixer`) as its own
    `include_preprocessing` does: its size, its scaling (none without it)."""
    height, width, _ = model.image_shape
    scale = offset = None
    if model.include_preprocessing:
        scale, offset = pixel_scaling(model.pixel_mean, model.pixel_std)
    return MixerImageConverter(image_size=(height, width), scale=scale, offset=offset)


def to_kerashub(model):
    """A `MixerImageClassifier` (a `MixerBackbone` for a model without a head)
    with `model`'s weights, copied exactly, and its preprocessing."""
    from keras_mixer import quantize

    modes = quantize.quantized_modes(model)
    if modes:
        raise ValueError(
            f"{model.name} is quantized ({', '.join(modes)}); convert the float "
            "model, then quantize the KerasHub one (classifier.quantize('int8')), as KerasHub does.")
    config = model.get_config()
    backbone = MixerBackbone(**{key: config[key] for key in BACKBONE_KEYS}, dtype=config["dtype"])
    for layer in backbone.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    if model.num_classes is None:
        return backbone
    classifier = MixerImageClassifier(
        backbone, model.num_classes,
        preprocessor=MixerImageClassifierPreprocessor(image_converter(model)),
    )
    classifier.output_dense.set_weights(model.get_layer("head").get_weights())
    return classifier


def _normalisation(converter):
    """`MLPMixer`'s (include_preprocessing, pixel_mean, pixel_std) for a converter's scaling."""
    if converter is None or converter.scale is None:
        return False, None, None
    scale = np.broadcast_to(np.asarray(converter.scale, "float64"), (3,))
    offset = np.broadcast_to(np.asarray(0.0 if converter.offset is None else converter.offset, "float64"), (3,))
    if np.allclose(scale, 1 / 127.5) and np.allclose(offset, -1.0):
        return True, None, None
    std = 1.0 / (255.0 * scale)
    return True, [float(m) for m in -offset * std], [float(s) for s in std]


def from_kerashub(model):
    """An `MLPMixer` with the weights of a `MixerImageClassifier` or
    `MixerBackbone` (no head then), copied exactly; the classifier's
    preprocessor scaling becomes the model's `include_preprocessing`."""
    classifier = model if isinstance(model, MixerImageClassifier) else None
    backbone = classifier.backbone if classifier is not None else model
    if not isinstance(backbone, MixerBackbone):
        raise TypeError(f"from_kerashub takes a MixerImageClassifier or a MixerBackbone, got "
                        f"{type(model).__name__}.")
    converter = getattr(classifier.preprocessor, "image_converter", None) if classifier is not None else None
    include, mean, std = _normalisation(converter)
    mixer = MLPMixer(
        **{key: getattr(backbone, key) for key in BACKBONE_KEYS},
        num_classes=classifier.num_classes if classifier is not None else None,
        include_preprocessing=include, pixel_mean=mean, pixel_std=std,
        dtype=backbone.dtype_policy,
    )
    for layer in backbone.layers:
        if layer.weights:
            mixer.get_layer(layer.name).set_weights(layer.get_weights())
    if classifier is not None:
        mixer.get_layer("head").set_weights(classifier.output_dense.get_weights())
    return mixer


def save_preset(source, preset_dir, **kwargs):
    """Writes a KerasHub preset of `source` to `preset_dir` with KerasHub's
    own `save_to_preset`; returns the `MixerImageClassifier` (or backbone).

    Args:
        source: an `MLPMixer`; a `.keras` file of one; an official
            checkpoint by released name ("imagenet21k/Mixer-B_16") or
            `.npz` file; or timm weights ("hf://timm/...", a folder or
            file).
        preset_dir: the folder (it may not exist yet). Upload it with
            `keras_hub.upload_preset("hf://user/repo", preset_dir)`.
        **kwargs: `MLPMixer.from_checkpoint`/`from_timm` arguments for a
            checkpoint source (e.g. `num_classes`, `image_shape`).
    """
    model = source if isinstance(source, MLPMixer) else _load(source, **kwargs)
    converted = to_kerashub(model)
    pathlib.Path(preset_dir).mkdir(parents=True, exist_ok=True)
    converted.save_to_preset(str(preset_dir))
    return converted


def _load(source, **kwargs):
    """The `MLPMixer` of a `.keras` file, timm weights or an official checkpoint."""
    text = str(source)
    if text.endswith(".keras"):
        return checkpoint.load_model(text)
    if text.startswith(hub.HF_PREFIX) or text.endswith((".safetensors", ".bin", ".pth")) or (
            pathlib.Path(text).is_dir() and (pathlib.Path(text) / "config.json").exists()):
        return MLPMixer.from_timm(text, **kwargs)
    return MLPMixer.from_checkpoint(text, **kwargs)
