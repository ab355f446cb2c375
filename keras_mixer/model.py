"""`MLPMixer`, the paper's model, and the table of its variants."""

import keras
import numpy as np
from keras import layers

from keras_mixer.layers import LayerNorm
from keras_mixer.layers import MixerBlock
from keras_mixer.layers import check_kwargs
from keras_mixer.layers import check_pair
from keras_mixer.layers import check_positive_int
from keras_mixer.layers import check_rate
from keras_mixer.mixing import is_mixing_input
from keras_mixer.mixing import mix_batch

# Table 1 of the paper. A variant name is `<size>/<patch>`, e.g. "B/16".
MODEL_SIZES = {
    "S": dict(num_blocks=8, hidden_dim=512, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "B": dict(num_blocks=12, hidden_dim=768, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "L": dict(num_blocks=24, hidden_dim=1024, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "H": dict(num_blocks=32, hidden_dim=1280, tokens_mlp_dim=640, channels_mlp_dim=5120),
}
VARIANTS = ("S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14")


def variant_config(name):
    """Returns the architecture arguments of a paper variant, e.g. "B/16".

    Args:
        name: str, one of `VARIANTS`.

    Example:
    >>> variant_config("S/32")["hidden_dim"]
    512
    """
    if name not in VARIANTS:
        raise ValueError(
            f"Unknown MLP-Mixer variant {name!r}. Valid names: "
            f"{', '.join(VARIANTS)}."
        )
    size, patch = name.split("/")
    return {"patch_size": int(patch), **MODEL_SIZES[size]}


def _check_image_shape(image_shape, patch_size):
    try:
        image_shape = tuple(image_shape)
    except TypeError:
        image_shape = (image_shape,)
    if len(image_shape) != 3:
        raise ValueError(
            "`image_shape` must be (height, width, channels), e.g. (224, 224, 3); "
            f"got {image_shape!r}."
        )
    for v in image_shape:
        check_positive_int("image_shape", v)
    height, width, _ = image_shape
    ph, pw = patch_size
    for side, size, patch in (("height", height, ph), ("width", width, pw)):
        if size % patch:
            lower = max(patch, size // patch * patch)
            raise ValueError(
                f"Image {side} {size} is not divisible by the patch {side} "
                f"{patch}: the image must split into whole patches. Use an "
                f"image {side} that is a multiple of {patch} (e.g. {lower} or "
                f"{lower + patch}), or resize/crop the inputs to that size."
            )
    return image_shape


def _check_normalization(mean, std, channels, include_preprocessing):
    """(mean, std) as lists of `channels` floats, or (None, None)."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError("Give both `pixel_mean` and `pixel_std` (per channel, in [0, 1] units), or neither.")
    if not include_preprocessing:
        raise ValueError("`pixel_mean` and `pixel_std` need include_preprocessing=True: they say how the "
                         "model normalises raw pixels.")
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ValueError(f"`pixel_mean` and `pixel_std` need {channels} values each (one per channel, std > 0); "
                         f"got {mean} and {std}.")
    return mean, std


def pixel_scaling(pixel_mean, pixel_std):
    """`(scale, offset)` that map [0, 255] pixels to the model's inputs as
    `x * scale + offset`: [-1, 1] without a mean and std (the official
    models), else `(x / 255 - mean) / std` as one multiply-add per channel.
    The `rescaling` layer of `include_preprocessing`, and KerasHub's
    `MixerImageConverter` (keras_mixer.kerashub), compute it."""
    if pixel_mean is None:
        return 1.0 / 127.5, -1.0
    return [1.0 / (255.0 * s) for s in pixel_std], [-m / s for m, s in zip(pixel_mean, pixel_std)]


def _head_dtype(dtype):
    """The head's policy: under a mixed policy (e.g. "mixed_bfloat16") it
    computes in the variable dtype, so logits stay float32 for softmax,
    losses and top-k metrics, as Keras recommends for the last layer. A
    `DTypePolicyMap` keeps its per-layer entries (a quantized head)."""
    policy = dtype if dtype is not None else keras.config.dtype_policy()
    if policy.compute_dtype == policy.variable_dtype:
        return dtype
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return keras.dtype_policies.DTypePolicyMap(policy.variable_dtype, {key: policy[key] for key in policy})
    return policy.variable_dtype


def _dtype_config(model):
    """The policy `get_config` saves: the model's own, or after `quantize`
    a `DTypePolicyMap` from each quantized layer's path to its policy, so
    that loading builds those layers quantized (the blocks create their
    `Dense` layers themselves, from the block's policy; KerasHub's
    backbones save quantized models the same way)."""
    if isinstance(model.dtype_policy, keras.dtype_policies.DTypePolicyMap):
        return model.dtype_policy
    policy_map = keras.dtype_policies.DTypePolicyMap(model.dtype_policy)
    for layer in model._flatten_layers(include_self=False):
        if layer.quantization_mode is not None:
            policy_map[layer.path] = layer.dtype_policy
    return policy_map if len(policy_map) else model.dtype_policy


def _concrete_policies(model):
    """Gives each layer built from a `DTypePolicyMap` the policy the map
    gives its path. Keras 3.15's `Dense` reads `self.dtype_policy` when it
    saves, and on a map that is the default (not quantized), so a quantized
    model loaded through its map could not be saved again. `_dtype_policy`
    is set directly: the public setter writes into the map instead."""
    for layer in model._flatten_layers(include_self=True):
        policy = layer._dtype_policy
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
            layer._dtype_policy = policy[layer.path] if layer.path in policy else policy.default_policy


def check_architecture(image_shape, patch_size, num_blocks, hidden_dim, tokens_mlp_dim, channels_mlp_dim,
                       dropout_rate, stochastic_depth_rate):
    """Checks a Mixer's sizes and rates; returns `(image_shape, patch, num_tokens)`."""
    patch = check_pair("patch_size", patch_size)
    image_shape = _check_image_shape(image_shape, patch)
    for arg, value in (
        ("num_blocks", num_blocks),
        ("hidden_dim", hidden_dim),
        ("tokens_mlp_dim", tokens_mlp_dim),
        ("channels_mlp_dim", channels_mlp_dim),
    ):
        check_positive_int(arg, value)
    check_rate("dropout_rate", dropout_rate)
    check_rate("stochastic_depth_rate", stochastic_depth_rate)
    height, width, _ = image_shape
    return image_shape, patch, (height // patch[0]) * (width // patch[1])


def mixer_trunk(x, patch, num_tokens, num_blocks, hidden_dim, tokens_mlp_dim, channels_mlp_dim,
                dropout_rate, stochastic_depth_rate, layer_norm_epsilon, gelu_approximate, seed, remat, dtype):
    """The layers from the patch embedding to the pre-head LayerNorm, on
    symbolic images `x`: `(batch, num_tokens, hidden_dim)` tokens. `MLPMixer`
    and KerasHub's `MixerBackbone` (keras_mixer.kerashub) are built from it,
    so their layers, names and weights are the same."""
    x = layers.Conv2D(
        hidden_dim,
        kernel_size=patch,
        strides=patch,
        padding="valid",
        kernel_initializer="lecun_normal",
        dtype=dtype,
        name="stem",
    )(x)
    x = layers.Reshape((num_tokens, hidden_dim), dtype=dtype, name="tokens")(x)
    for i in range(num_blocks):
        # Linear in depth, 0 at the first block and the full rate at the
        # last, as in the paper (and timm's `drop_path_rate`).
        block_rate = stochastic_depth_rate * i / max(num_blocks - 1, 1)
        x = MixerBlock(
            tokens_mlp_dim,
            channels_mlp_dim,
            dropout_rate=dropout_rate,
            stochastic_depth_rate=block_rate,
            layer_norm_epsilon=layer_norm_epsilon,
            gelu_approximate=gelu_approximate,
            seed=None if seed is None else seed + 2 * i,
            dtype=dtype,
            remat=remat,
            name=f"block_{i}",
        )(x)
    return LayerNorm(epsilon=layer_norm_epsilon, dtype=dtype, name="pre_head_layer_norm")(x)


@keras.saving.register_keras_serializable(package="keras_mixer")
class MLPMixer(keras.Model):
    """MLP-Mixer (Tolstikhin et al., 2021), as a functional Keras model.

    Patches are embedded by a strided convolution (`stem`), mixed by
    `num_blocks` `MixerBlock`s, normalised (`pre_head_layer_norm`), averaged
    over tokens (the pre-logits) and classified by a linear `head`.
    Initialisation follows the official code: LeCun-normal kernels, zero
    biases, zero head kernel.

    Args:
        image_shape: tuple (height, width, channels); height and width must
            be multiples of the patch size. Non-square is allowed.
        patch_size: int or tuple (patch_height, patch_width).
        num_blocks: int, the number of Mixer blocks.
        hidden_dim: int, the patch embedding width C.
        tokens_mlp_dim: int, hidden width D_S of the token-mixing MLPs.
        channels_mlp_dim: int, hidden width D_C of the channel-mixing MLPs.
        num_classes: int or None; None returns the pooled pre-logits
            features of width `hidden_dim` instead of logits.
        dropout_rate: float in [0, 1), dropout inside the MLPs.
        stochastic_depth_rate: float in [0, 1), the drop rate of the last
            block; rates grow linearly from 0 at the first block.
        layer_norm_epsilon: float, 1e-6 as in the official model and timm.
        gelu_approximate: bool, True for the official model's tanh GELU,
            False for timm's exact GELU.
        include_preprocessing: bool. True: the model takes pixels in
            [0, 255] and scales them to [-1, 1] itself, so exported files
            take raw pixels. False: it takes [-1, 1] inputs, as the
            official code does.
        pixel_mean, pixel_std: None (the official [-1, 1] scaling, i.e. 0.5
            and 0.5), or per-channel lists in [0, 1] units, as timm's
            `pretrained_cfg` gives them: the model then computes
            (pixels / 255 - mean) / std. Only with `include_preprocessing`.
        seed: int or None, the seed of the stochastic depth layers.
        remat: bool, recompute each Mixer block in the backward pass instead
            of keeping its activations (gradient checkpointing with
            `keras.remat`, see `MixerBlock`): less memory for about a third
            more compute per training step. Not with `dropout_rate > 0`.
            `benchmarks/bench_memory.py` measures the saving.
        dtype: dtype or `keras.DTypePolicy` of the layers (None: the global
            policy).
        name: str, the model's name.

    Example:
    >>> model = MLPMixer(image_shape=(32, 32, 3), patch_size=4, num_blocks=2,
    ...                  hidden_dim=32, tokens_mlp_dim=16, channels_mlp_dim=64,
    ...                  num_classes=10)
    >>> tuple(model(keras.ops.zeros((1, 32, 32, 3))).shape)
    (1, 10)
    """

    def __init__(
        self,
        image_shape=(224, 224, 3),
        patch_size=16,
        num_blocks=12,
        hidden_dim=768,
        tokens_mlp_dim=384,
        channels_mlp_dim=3072,
        num_classes=1000,
        dropout_rate=0.0,
        stochastic_depth_rate=0.0,
        layer_norm_epsilon=1e-6,
        gelu_approximate=True,
        include_preprocessing=True,
        pixel_mean=None,
        pixel_std=None,
        seed=None,
        remat=False,
        dtype=None,
        name="mlp_mixer",
        **kwargs,
    ):
        # Keras' functional model ignores keys it does not know: a typo such
        # as `droput_rate=0.5` would build a model without dropout.
        check_kwargs("MLPMixer", kwargs, self._config_keys() + ("trainable",))
        image_shape, patch, num_tokens = check_architecture(
            image_shape, patch_size, num_blocks, hidden_dim, tokens_mlp_dim, channels_mlp_dim,
            dropout_rate, stochastic_depth_rate)
        if dtype is not None:
            # Once, so every layer shares one policy (or one DTypePolicyMap
            # of a quantized model's saved config).
            dtype = keras.dtype_policies.get(dtype)
        if num_classes is not None:
            check_positive_int("num_classes", num_classes)

        # === Functional graph ===
        inputs = keras.Input(shape=image_shape, name="images")
        x = inputs
        pixel_mean, pixel_std = _check_normalization(pixel_mean, pixel_std, image_shape[2], include_preprocessing)
        if include_preprocessing:
            scale, offset = pixel_scaling(pixel_mean, pixel_std)
            x = layers.Rescaling(scale=scale, offset=offset, dtype=dtype, name="rescaling")(x)
        x = mixer_trunk(
            x, patch, num_tokens, num_blocks, hidden_dim, tokens_mlp_dim, channels_mlp_dim,
            dropout_rate, stochastic_depth_rate, layer_norm_epsilon, gelu_approximate, seed, remat, dtype,
        )
        x = layers.GlobalAveragePooling1D(dtype=dtype, name="pre_logits")(x)
        if num_classes is not None:
            # Under a mixed policy the head computes in float32 (_head_dtype).
            # The official code initialises the head kernel to zero.
            x = layers.Dense(
                num_classes, kernel_initializer="zeros", dtype=_head_dtype(dtype), name="head"
            )(x)
        super().__init__(inputs=inputs, outputs=x, name=name, **kwargs)
        if dtype is not None:
            # Functional models drop a `dtype` argument: set it, so the
            # model's policy is its layers' and get_config saves it (a
            # bfloat16 model reloads as bfloat16).
            self.dtype_policy = dtype
            _concrete_policies(self)
        # Input checks happen in `call`, with messages that say how to fix
        # the input, instead of Keras' generic spec mismatch.
        self.input_spec = None

        # === Config ===
        self.image_shape = image_shape
        self.patch_size = patch
        self.num_blocks = num_blocks
        self.hidden_dim = hidden_dim
        self.tokens_mlp_dim = tokens_mlp_dim
        self.channels_mlp_dim = channels_mlp_dim
        self.num_classes = num_classes
        self.dropout_rate = float(dropout_rate)
        self.stochastic_depth_rate = float(stochastic_depth_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.gelu_approximate = bool(gelu_approximate)
        self.include_preprocessing = bool(include_preprocessing)
        self.pixel_mean, self.pixel_std = pixel_mean, pixel_std
        self.seed = seed
        self.remat = bool(remat)
        self.num_tokens = num_tokens

    def compile(self, *args, jit_compile="auto", **kwargs):
        """`keras.Model.compile`, with one default of its own.

        `jit_compile="auto"` means XLA on TensorFlow outside a
        `tf.distribute` strategy, CPU included, where Keras' "auto" runs
        TensorFlow's graph executor instead; elsewhere it is Keras' "auto"
        (XLA on JAX, eager on PyTorch, Keras' choice under a strategy).
        `train.py` compiles the same way (`distribute.jit_compile_setting`).
        On 2 CPU cores, TensorFlow with XLA trained a digits step in 17 ms
        instead of 26 and ran the small benchmark config's inference at
        the speed of hand-written TensorFlow under XLA, where the graph
        executor reached 0.89x (`benchmarks/bench_model.py`, keras_plain).
        Pass `jit_compile=False` or `True` to choose yourself.
        """
        if jit_compile == "auto" and not kwargs.get("run_eagerly"):
            from keras_mixer import distribute

            jit_compile = distribute.jit_compile_setting()
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        """`keras.Model.predict`, faster for a NumPy array on TensorFlow and PyTorch.

        There Keras wraps an array in an input pipeline (tf.data's parallel
        map and prefetch threads on TensorFlow, a data loader on PyTorch)
        whose work shares the CPU with the model: on 2 cores TensorFlow's
        `predict` ran at 0.67-0.82x the same forward passes called batch by
        batch (docs/benchmarks.md). For a NumPy array this `predict` slices
        the batches itself and calls Keras' compiled predict step on each
        (`predict_on_batch`'s), with the same callbacks and progress bar,
        so the outputs are those of Keras' `predict`. Other inputs
        (datasets, generators, tensors, dicts), `steps`, JAX, and a
        tf.distribute strategy or a Keras distribution take Keras' path.
        """
        from keras_mixer import distribute

        if (not isinstance(x, np.ndarray) or steps is not None or not len(x)
                or not distribute.feeds_batches_itself(self)):
            return super().predict(x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks)
        batch_size = batch_size or 32
        num_batches = -(-len(x) // batch_size)
        callbacks = self._callback_list(callbacks, verbose, num_batches)
        self.stop_predicting = False
        callbacks.on_predict_begin()
        outputs = []
        for step in range(num_batches):
            callbacks.on_predict_batch_begin(step)
            outputs.append(self.predict_on_batch(x[step * batch_size:(step + 1) * batch_size]))
            callbacks.on_predict_batch_end(step, {"outputs": outputs[-1]})
            if self.stop_predicting:
                break
        callbacks.on_predict_end()
        return np.concatenate(outputs)

    def evaluate(self, x=None, y=None, batch_size=None, verbose="auto", sample_weight=None, steps=None,
                 callbacks=None, return_dict=False, **kwargs):
        """`keras.Model.evaluate`, faster for NumPy arrays on TensorFlow and PyTorch.

        As `predict` does, for NumPy `x` and `y` (and `sample_weight`) this
        slices the batches itself and runs Keras' compiled test step on
        each, accumulating the same metrics, with the same callbacks and
        progress bar; the results are those of Keras' `evaluate`. Other
        inputs, `steps`, `fit`'s validation, JAX, and a tf.distribute
        strategy or a Keras distribution take Keras' path.
        """
        from keras_mixer import distribute

        arrays = [a for a in (x, y, sample_weight) if a is not None]
        if (kwargs or steps is not None or y is None or not all(isinstance(a, np.ndarray) for a in arrays)
                or not len(x) or not distribute.feeds_batches_itself(self)
                or not hasattr(self, "_flatten_metrics_in_order")):
            return super().evaluate(x, y, batch_size=batch_size, verbose=verbose, sample_weight=sample_weight,
                                    steps=steps, callbacks=callbacks, return_dict=return_dict, **kwargs)
        batch_size = batch_size or 32
        num_batches = -(-len(x) // batch_size)
        callbacks = self._callback_list(callbacks, verbose, num_batches)
        self.make_test_function()
        self.stop_evaluating = False
        callbacks.on_test_begin()
        self.reset_metrics()
        for step in range(num_batches):
            callbacks.on_test_batch_begin(step)
            logs = self.test_function([tuple(a[step * batch_size:(step + 1) * batch_size] for a in arrays)])
            callbacks.on_test_batch_end(step, logs)
            if self.stop_evaluating:
                break
        logs = {name: float(keras.ops.convert_to_numpy(value)) for name, value in self.get_metrics_result().items()}
        callbacks.on_test_end(logs)
        # The list in Keras' order; Keras' own `evaluate` returns it with this helper.
        return logs if return_dict else self._flatten_metrics_in_order(logs)

    def _callback_list(self, callbacks, verbose, num_batches):
        if isinstance(callbacks, keras.callbacks.CallbackList):
            return callbacks
        return keras.callbacks.CallbackList(
            callbacks, add_progbar=verbose != 0, verbose=verbose, epochs=1, steps=num_batches, model=self)

    def train_step(self, *args):
        """Keras' train step, after the batch's MixUp or CutMix (`keras_mixer.mixing`).

        The input pipeline draws the mixing of a batch and sends it beside
        the images (`mix_on="device"`), so that the mixing runs here, on the
        accelerator, instead of on the host's CPU. Keras calls
        `train_step(data)` on TensorFlow and PyTorch and `train_step(state,
        data)` on JAX; the batch is the last argument on all three.
        """
        *state, data = args
        return super().train_step(*state, mix_batch(data))

    def compile_from_config(self, config):
        """Compiles a loaded model as it was saved, as `keras.Model` does.

        Keras skips this step, with a warning, for any model whose
        `compile` is overridden, so a reloaded MLPMixer would come back
        uncompiled; this is Keras' own body without that check.
        """
        self.compile(**keras.saving.deserialize_keras_object(config))
        if hasattr(self, "optimizer") and self.built:
            # The optimizer's variables, so that the saved ones load into them.
            self.optimizer.build(self.trainable_variables)

    def call(self, inputs, training=None, mask=None):
        if is_mixing_input(inputs):
            # A batch of `mix_on="device"`: only `train_step` mixes, as
            # Dropout acts only in training; elsewhere (Keras' symbolic
            # build before `fit`, predict, evaluate) the images go in as
            # they are, and the labels beside them are unmixed too.
            inputs, mask = inputs["images"], None
        self._check_inputs(inputs)
        return super().call(inputs, training=training, mask=mask)

    def _check_inputs(self, inputs):
        shape = tuple(getattr(inputs, "shape", ()))
        height, width, channels = self.image_shape
        expected = f"(batch, {height}, {width}, {channels})"
        if len(shape) != 4:
            hint = (
                " Add a batch dimension, e.g. `image[None]`."
                if len(shape) == 3
                else ""
            )
            raise ValueError(
                f"{self.name} expects a batch of images of shape {expected}, "
                f"got an input of rank {len(shape)} with shape {shape}.{hint}"
            )
        if shape[3] is not None and shape[3] != channels:
            raise ValueError(
                f"{self.name} expects images with {channels} channels "
                f"{expected}, got {shape[3]} channels (shape {shape}). Convert "
                f"the images (e.g. grayscale to RGB), or build the model with "
                f"image_shape=({height}, {width}, {shape[3]})."
            )
        if (shape[1], shape[2]) != (height, width) and None not in shape[1:3]:
            raise ValueError(
                f"{self.name} was built for {height}x{width} images {expected}, "
                f"got {shape[1]}x{shape[2]} (shape {shape}). Resize or crop the "
                f"images to {height}x{width}, or build the model with "
                f"image_shape=({shape[1]}, {shape[2]}, {channels})."
            )

    @classmethod
    def from_variant(cls, name, image_shape=(224, 224, 3), num_classes=1000, **overrides):
        """Builds one of the paper's variants, e.g. `MLPMixer.from_variant("B/16")`.

        Args:
            name: str, one of "S/32", "S/16", "B/32", "B/16", "L/32",
                "L/16", "H/14".
            image_shape: tuple (height, width, channels).
            num_classes: int or None (pre-logits features).
            **overrides: any other `MLPMixer` argument, e.g.
                `stochastic_depth_rate=0.1` or `patch_size=8`.

        Example:
        >>> model = MLPMixer.from_variant("S/32", num_classes=None)
        >>> model.output_shape
        (None, 512)
        """
        config = variant_config(name)
        check_kwargs("MLPMixer.from_variant", overrides, cls._config_keys())
        config.update(overrides)
        return cls(image_shape=image_shape, num_classes=num_classes, **config)

    @classmethod
    def from_checkpoint(cls, source, num_classes=None, image_shape=None,
                        pretrained_image_shape=None, **overrides):
        """Builds the model of an official checkpoint, inferring its variant.

        Args:
            source: an `.npz` path, a parameter mapping, or a released name
                such as "imagenet21k/Mixer-B_16" (downloaded once; see
                `keras_mixer.released.fetch`).
            num_classes: None or the checkpoint's count keeps its head;
                another count gives a fresh zero head (logged).
            image_shape: None (the pretraining size) or K times it per side
                (integer K): the token-mixing MLPs are adapted as in the
                paper's Appendix C.
            pretrained_image_shape: the size the checkpoint was trained at.
                Needed only for a non-square token grid built at another
                size: a checkpoint stores its token count, not its grid, so
                a square grid, or `image_shape` when its grid has that
                count, is taken otherwise.
            **overrides: other `MLPMixer` arguments (e.g.
                `stochastic_depth_rate=0.1`), or `cache_dir` / `mirror`.

        Example:
        >>> model = MLPMixer.from_checkpoint(
        ...     "imagenet21k/Mixer-B_16", num_classes=10, image_shape=(448, 448, 3))
        """
        # Imported here: weights.py builds models, so model.py cannot import
        # it at the top without a cycle.
        from keras_mixer import weights

        return weights.from_checkpoint(
            source, num_classes=num_classes, image_shape=image_shape,
            pretrained_image_shape=pretrained_image_shape, **overrides
        )

    @staticmethod
    def from_timm(source, num_classes=None, image_shape=None, **overrides):
        """Builds an `MLPMixer` from timm weights, the variant read from their shapes.

        Args:
            source: "hf://<org>/<repo>" (e.g.
                "hf://timm/mixer_b16_224.goog_in21k_ft_in1k", read through
                `huggingface_hub` and its cache), a folder with timm's
                `model.safetensors` (or `pytorch_model.bin`) and
                `config.json`, or a weights file.
            num_classes: None keeps the file's head; another count gets a
                zero head.
            image_shape: default: `pretrained_cfg.input_size`; a multiple of
                it adapts the token-mixing MLPs (Appendix C).
            **overrides: other `MLPMixer` arguments. The normalisation
                (`pixel_mean`, `pixel_std`) comes from `pretrained_cfg`, so the
                model takes raw [0, 255] pixels exactly as timm's transforms
                feed that file; GELU is timm's exact one.
        """
        from keras_mixer import weights

        return weights.from_timm(source, num_classes=num_classes, image_shape=image_shape, **overrides)

    def enable_lora(self, rank, target_names=None, alpha=None):
        """LoRA: rank-`rank` adapters on the token- and channel-mixing `Dense`
        layers (or those whose path ends with one of `target_names`), all else
        frozen but the head. See `keras_mixer.lora`; returns the adapted paths."""
        from keras_mixer import lora

        return lora.enable_lora(self, rank, target_names, alpha)

    def save_lora_weights(self, path):
        """Writes the adapters and the head (every trainable variable) to an `.npz`."""
        from keras_mixer import lora

        return lora.save_lora_weights(self, path)

    def load_lora_weights(self, path):
        """Loads a `save_lora_weights` file, enabling LoRA as it records when needed."""
        from keras_mixer import lora

        return lora.load_lora_weights(self, path)

    @staticmethod
    def _config_keys():
        return (
            "image_shape", "patch_size", "num_blocks", "hidden_dim",
            "tokens_mlp_dim", "channels_mlp_dim", "num_classes", "dropout_rate",
            "stochastic_depth_rate", "layer_norm_epsilon", "gelu_approximate",
            "include_preprocessing", "pixel_mean", "pixel_std", "seed", "remat", "dtype", "name",
        )

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(_dtype_config(self)),
            "image_shape": self.image_shape,
            "patch_size": self.patch_size,
            "num_blocks": self.num_blocks,
            "hidden_dim": self.hidden_dim,
            "tokens_mlp_dim": self.tokens_mlp_dim,
            "channels_mlp_dim": self.channels_mlp_dim,
            "num_classes": self.num_classes,
            "dropout_rate": self.dropout_rate,
            "stochastic_depth_rate": self.stochastic_depth_rate,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "gelu_approximate": self.gelu_approximate,
            "include_preprocessing": self.include_preprocessing,
            "pixel_mean": self.pixel_mean,
            "pixel_std": self.pixel_std,
            "seed": self.seed,
            "remat": self.remat,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)
