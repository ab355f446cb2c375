"""The building blocks of MLP-Mixer: `MLPBlock`, `MixerBlock`, `StochasticDepth`, `LayerNorm`.

Written with `keras.ops`, so the same code runs on the JAX, TensorFlow
and PyTorch backends. One exception, measured: on eager PyTorch the
Dense layers, LayerNorms and inference blocks call PyTorch directly
(`torch_eager`: the same kernels and numbers without Keras' per-call
Python, and the bias fused into the matmul). Reference: Tolstikhin et al., 2021, "MLP-Mixer: An
all-MLP Architecture for Vision" (arXiv 2105.01601), and the official Flax
module `vit_jax/models_mixer.py`.
"""

import difflib
import inspect

import keras
from keras import layers
from keras import ops


# Argument checks shared with `model.py`: explicit `ValueError`s that name
# the argument and the fix, as Keras core's layers raise them.


def check_positive_int(name, value):
    """Raises a `ValueError` unless `value` is an int > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive integer, got {value!r}. "
            f"Pass a whole number greater than 0."
        )


def check_rate(name, value):
    """Raises a `ValueError` unless `value` is a probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a float in [0, 1), got {value!r}.")
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1), got {value}. It is a probability of "
            f"dropping; use 0 to disable it."
        )


def check_pair(name, value):
    """`value` as a (height, width) pair of positive ints: an int means (v, v)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        value = tuple(value)
    except TypeError:
        value = (value,)
    if len(value) != 2:
        raise ValueError(
            f"`{name}` must be an int or a pair (height, width), got {value!r}."
        )
    for v in value:
        check_positive_int(name, v)
    return value


# What `keras.layers.Layer.__init__` takes besides a layer's own arguments
# (`input_shape`/`input_dim` with a warning, as Keras does).
LAYER_KWARGS = ("activity_regularizer", "trainable", "dtype", "autocast", "name", "input_shape", "input_dim")


def check_kwargs(owner, kwargs, valid):
    """Raises a `TypeError` for the first key of `kwargs` not in `valid`,
    naming it and the closest valid one: Python's error for an unexpected
    keyword, where Keras would accept it silently (a functional model's
    `**kwargs`) or raise a `ValueError` that suggests nothing."""
    unknown = [key for key in kwargs if key not in valid]
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], list(valid), n=1, cutoff=0.6)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    raise TypeError(
        f"{owner} got an unexpected keyword argument `{unknown[0]}`.{hint} "
        f"Valid arguments: {', '.join(sorted(valid))}."
    )


def check_layer_kwargs(layer, kwargs, extra=()):
    """`check_kwargs` for a layer's `**kwargs`: valid are the arguments of
    every `__init__` in its class hierarchy (a subclass's too), Keras'
    base-layer arguments and `extra` (ones a Keras parent takes from its
    own `**kwargs`)."""
    valid = set(LAYER_KWARGS) | set(extra)
    for cls in type(layer).__mro__:
        if "__init__" in vars(cls) and issubclass(cls, layers.Layer):
            valid.update(name for name, p in inspect.signature(cls.__init__).parameters.items()
                         if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    check_kwargs(type(layer).__name__, kwargs, valid)


@keras.saving.register_keras_serializable(package="keras_mixer")
class LayerNorm(layers.LayerNormalization):
    """`keras.layers.LayerNormalization` over the last axis, faster on JAX.

    The same layer, weights (`gamma`, `beta`) and config; only the formula
    of `call` differs, and only on JAX: the centred input is computed once
    and reused, `(x - mean) * (rsqrt(var + eps) * gamma) + beta`, where
    Keras' `ops.layer_normalization` computes `x * inv + (beta - mean *
    inv)` from `moments`. The numbers agree to float32 rounding, but
    XLA:CPU fused Keras' form into passes that read the activations more
    often: a JAX training step of S/16 (batch 8) read 6.1 GB instead of
    5.1 (`compiled.cost_analysis()`) and ran at 3.8 images/s instead of 4.3
    (the official Flax module: 4.9). On TensorFlow the same change made the
    S/16 training step slower (4.8 vs 5.3 images/s, XLA), so it keeps
    Keras' call. On PyTorch the call is PyTorch's fused `layer_norm`
    kernel, the one Keras' call reaches, without Keras' op wrappers
    (`torch_eager.layer_norm`). `benchmarks/bench_model.py` measures the
    model.

    Args:
        epsilon: float, added to the variance (1e-6 in the official model).
        **kwargs: other `LayerNormalization` arguments; `axis` must be -1.
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        # `rms_scaling`: LayerNormalization's saved config has it, and its
        # `__init__` takes it from `**kwargs` (Keras 3.15).
        check_layer_kwargs(self, kwargs, extra=("rms_scaling",))
        super().__init__(epsilon=epsilon, **kwargs)
        if self.axis not in (-1, [-1]):
            raise ValueError(f"LayerNorm normalises the last axis only, got axis={self.axis}.")

    def call(self, inputs):
        if self.rms_scaling:
            return super().call(inputs)
        if keras.backend.backend() == "torch":
            # Keras' kernel (`F.layer_norm`) without its op wrappers.
            from keras_mixer import torch_eager

            return torch_eager.layer_norm(self, inputs)
        if keras.backend.backend() != "jax":
            return super().call(inputs)
        # Statistics in at least float32, as Keras does under mixed precision.
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        x = ops.cast(inputs, "float32") if dtype in ("float16", "bfloat16") else inputs
        mean = ops.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        variance = ops.mean(ops.square(centred), axis=-1, keepdims=True)
        scale = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            scale = scale * ops.cast(self.gamma, x.dtype)
        outputs = centred * scale
        if self.center:
            outputs = outputs + ops.cast(self.beta, x.dtype)
        return ops.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="keras_mixer")
class StochasticDepth(layers.Layer):
    """Drops a whole residual branch per sample (stochastic depth).

    In training, each sample's branch output is zeroed with probability
    `rate` and the kept samples are scaled by `1 / (1 - rate)`, so the
    expectation is unchanged. At inference the layer is the identity.
    Apply it to the branch, before the residual addition.

    Args:
        rate: float in [0, 1), the probability of dropping a sample's branch.
        seed: int or None, the seed of the layer's `SeedGenerator`.

    Example:
    >>> layer = StochasticDepth(0.1, seed=0)
    >>> x = keras.ops.ones((4, 16, 32))
    >>> tuple(layer(x, training=False).shape)
    (4, 16, 32)

    Reference: Huang et al., 2016, "Deep Networks with Stochastic Depth".
    """

    def __init__(self, rate, seed=None, **kwargs):
        check_layer_kwargs(self, kwargs)
        super().__init__(**kwargs)
        check_rate("rate", rate)
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True
        self.built = True

    def call(self, inputs, training=False):
        if not training or self.rate == 0.0:
            return inputs
        return inputs * self.scale(inputs)

    def scale(self, inputs):
        """Draws the training-time factor per sample: 0 or `1 / (1 - rate)`.

        Shaped `(batch, 1, ..., 1)` to broadcast against `inputs`; `call`
        multiplies by it. `MixerBlock` draws it outside a rematerialised
        block, so that the recomputation reuses the same masks.
        """
        keep_rate = 1.0 - self.rate
        batch = ops.shape(inputs)[0]
        mask_shape = (batch,) + (1,) * (len(inputs.shape) - 1)
        noise = keras.random.uniform(
            mask_shape, dtype=inputs.dtype, seed=self.seed_generator
        )
        # floor(keep_rate + U[0, 1)) is 1 with probability keep_rate.
        mask = ops.floor(keep_rate + noise)
        return mask / keep_rate

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def _dense(layer, x):
    """`layer(x)` for a built `Dense` and a 2D `x`; on PyTorch one
    `torch.addmm` with the bias fused (`torch_eager.dense`, where the
    measurement is). XLA (JAX, TensorFlow) fuses the bias add into the
    matmul on its own, so other backends, and quantized or LoRA layers
    (whose kernels `Dense` computes), call the layer."""
    if keras.backend.backend() != "torch":
        return layer(x)
    from keras_mixer import torch_eager

    return torch_eager.dense(layer, x) if torch_eager.plain_dense(layer) else layer(x)


@keras.saving.register_keras_serializable(package="keras_mixer")
class MLPBlock(layers.Layer):
    """Dense -> GELU -> Dense over the last axis, as in the official `MlpBlock`.

    The output has the input's width. Dropout (as in timm's `Mlp`) follows the
    activation and the second Dense; the official model uses none, which is
    the default.

    Args:
        mlp_dim: int, the hidden width.
        dropout_rate: float in [0, 1), dropout after GELU and after the output.
        gelu_approximate: bool, True for the tanh approximation of the
            official model, False for the exact (erf) GELU of timm.
        kernel_initializer: initializer of both kernels (LeCun normal).
        bias_initializer: initializer of both biases (zeros).

    Example:
    >>> block = MLPBlock(64)
    >>> tuple(block(keras.ops.ones((2, 16, 32))).shape)
    (2, 16, 32)
    """

    def __init__(
        self,
        mlp_dim,
        dropout_rate=0.0,
        gelu_approximate=True,
        kernel_initializer="lecun_normal",
        bias_initializer="zeros",
        **kwargs,
    ):
        check_layer_kwargs(self, kwargs)
        super().__init__(**kwargs)
        check_positive_int("mlp_dim", mlp_dim)
        check_rate("dropout_rate", dropout_rate)
        self.mlp_dim = mlp_dim
        self.dropout_rate = float(dropout_rate)
        self.gelu_approximate = bool(gelu_approximate)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        # `Dense_0` / `Dense_1` follow the official checkpoint's names.
        self.dense_0 = layers.Dense(
            mlp_dim,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
            name="Dense_0",
        )
        self.dropout = layers.Dropout(
            self.dropout_rate, dtype=self.dtype_policy, name="dropout"
        )

    def build(self, input_shape):
        out_dim = input_shape[-1]
        if out_dim is None:
            raise ValueError(
                f"MLPBlock needs a known last dimension, got shape {input_shape}."
            )
        # The output width is the input's, known only here.
        self.dense_1 = layers.Dense(
            out_dim,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
            name="Dense_1",
        )
        self.dense_0.build(input_shape)
        self.dense_1.build(tuple(input_shape[:-1]) + (self.mlp_dim,))
        self.built = True

    def call(self, inputs, training=None):
        # Rate-0 dropout is skipped, not called: on the eager PyTorch
        # backend every layer call costs Python overhead.
        use_dropout = self.dropout_rate > 0
        # Both matmuls on a 2D (rows, features) view: the same GEMMs, but
        # XLA:CPU ran the training step of a (batch, rows, features) @ kernel
        # Mixer at about half the speed (16 vs 27 images/s, small config,
        # JAX, 2 cores); `benchmarks/bench_model.py` measures it.
        shape = ops.shape(inputs)
        x = ops.reshape(inputs, (-1, shape[-1]))
        x = _dense(self.dense_0, x)
        x = ops.gelu(x, approximate=self.gelu_approximate)
        if use_dropout:
            x = self.dropout(x, training=training)
        x = _dense(self.dense_1, x)
        if use_dropout:
            x = self.dropout(x, training=training)
        return ops.reshape(x, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "mlp_dim": self.mlp_dim,
            "dropout_rate": self.dropout_rate,
            "gelu_approximate": self.gelu_approximate,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "bias_initializer": keras.initializers.serialize(
                self.bias_initializer
            ),
        }


@keras.saving.register_keras_serializable(package="keras_mixer")
class MixerBlock(layers.Layer):
    """One Mixer layer: token mixing, then channel mixing, each pre-norm + residual.

    Input and output are `(batch, num_tokens, hidden_dim)`. The token-mixing
    MLP acts across patches (on the transposed tokens), shared over channels;
    the channel-mixing MLP acts across channels, shared over patches.

    Args:
        tokens_mlp_dim: int, hidden width of the token-mixing MLP.
        channels_mlp_dim: int, hidden width of the channel-mixing MLP.
        dropout_rate: float in [0, 1), dropout inside both MLPs.
        stochastic_depth_rate: float in [0, 1), the probability of dropping
            each residual branch per sample in training.
        layer_norm_epsilon: float, LayerNorm epsilon (1e-6 as the official
            model and timm).
        gelu_approximate: bool, tanh GELU (official) or exact GELU (timm).
        seed: int or None, seed of the stochastic depth layers.
        remat: bool, recompute the block in the backward pass (`keras.remat`,
            gradient checkpointing) instead of keeping its activations.
            Stochastic-depth masks are drawn outside the recomputed part,
            so both passes use the same ones. Not with `dropout_rate > 0`:
            the recomputation would draw different dropout masks.

    Example:
    >>> block = MixerBlock(tokens_mlp_dim=8, channels_mlp_dim=64)
    >>> tuple(block(keras.ops.ones((2, 16, 32))).shape)
    (2, 16, 32)
    """

    def __init__(
        self,
        tokens_mlp_dim,
        channels_mlp_dim,
        dropout_rate=0.0,
        stochastic_depth_rate=0.0,
        layer_norm_epsilon=1e-6,
        gelu_approximate=True,
        seed=None,
        remat=False,
        **kwargs,
    ):
        check_layer_kwargs(self, kwargs)
        super().__init__(**kwargs)
        check_positive_int("tokens_mlp_dim", tokens_mlp_dim)
        check_positive_int("channels_mlp_dim", channels_mlp_dim)
        check_rate("dropout_rate", dropout_rate)
        check_rate("stochastic_depth_rate", stochastic_depth_rate)
        if not layer_norm_epsilon > 0:
            raise ValueError(
                f"`layer_norm_epsilon` must be positive, got {layer_norm_epsilon}."
            )
        if remat and dropout_rate > 0:
            raise ValueError(
                f"`remat=True` cannot be combined with `dropout_rate` "
                f"({dropout_rate}): the recomputed backward pass would draw "
                f"other dropout masks than the forward pass. Use "
                f"`dropout_rate=0` (the official model has no dropout; "
                f"`stochastic_depth_rate` works with remat), or `remat=False`."
            )
        self.tokens_mlp_dim = tokens_mlp_dim
        self.channels_mlp_dim = channels_mlp_dim
        self.dropout_rate = float(dropout_rate)
        self.stochastic_depth_rate = float(stochastic_depth_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.gelu_approximate = bool(gelu_approximate)
        self.seed = seed
        self.remat = bool(remat)

        mlp_kwargs = dict(
            dropout_rate=self.dropout_rate,
            gelu_approximate=self.gelu_approximate,
            dtype=self.dtype_policy,
        )
        norm_kwargs = dict(epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy)
        # Names follow the official checkpoint (`LayerNorm_0`, `token_mixing`,
        # `LayerNorm_1`, `channel_mixing`); converters and sharding layouts
        # key on them.
        self.token_norm = LayerNorm(name="LayerNorm_0", **norm_kwargs)
        self.token_mixing = MLPBlock(tokens_mlp_dim, name="token_mixing", **mlp_kwargs)
        self.channel_norm = LayerNorm(name="LayerNorm_1", **norm_kwargs)
        self.channel_mixing = MLPBlock(
            channels_mlp_dim, name="channel_mixing", **mlp_kwargs
        )
        # Two generators so the two branches draw independent masks.
        self.token_drop = StochasticDepth(
            self.stochastic_depth_rate,
            seed=seed,
            dtype=self.dtype_policy,
            name="token_stochastic_depth",
        )
        self.channel_drop = StochasticDepth(
            self.stochastic_depth_rate,
            seed=None if seed is None else seed + 1,
            dtype=self.dtype_policy,
            name="channel_stochastic_depth",
        )

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                "MixerBlock expects inputs of shape (batch, num_tokens, "
                f"hidden_dim) with known num_tokens and hidden_dim, got "
                f"{input_shape}."
            )
        batch, num_tokens, hidden_dim = input_shape
        self.token_norm.build(input_shape)
        self.token_mixing.build((batch, hidden_dim, num_tokens))
        self.channel_norm.build(input_shape)
        self.channel_mixing.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        if keras.backend.backend() == "torch":
            # Eager PyTorch inference without the sublayer calls' Python
            # (`torch_eager`): identical numbers; one 32x32 image of the
            # small benchmark config took 14 ms instead of 20.
            from keras_mixer import torch_eager

            if torch_eager.applies_to_mixer_block(self, training):
                return torch_eager.mixer_block(self, inputs)
        # Rate-0 stochastic depth (always the first block) is skipped, not
        # called, to save the layer-call overhead of eager backends. The
        # masks are drawn here, outside what `remat` recomputes: drawn
        # inside, the recomputation would advance the seed generators
        # again and use other masks (and on JAX leak a tracer).
        scales = ()
        if training and self.stochastic_depth_rate > 0:
            scales = (self.token_drop.scale(inputs), self.channel_drop.scale(inputs))
        if self.remat:
            # `keras.remat` on a function of tensors only: `training` is a
            # Python value closed over. (A `keras.RematScope` around the
            # block would checkpoint `call` itself, with `training` as a
            # traced argument on JAX and as a keyword that TensorFlow's
            # graph-mode `recompute_grad` rejects.)
            return keras.remat(lambda x, *s: self._mix(x, s, training))(inputs, *scales)
        return self._mix(inputs, scales, training)

    def _mix(self, inputs, scales, training):
        x = self.token_norm(inputs)
        x = ops.transpose(x, (0, 2, 1))
        x = self.token_mixing(x, training=training)
        x = ops.transpose(x, (0, 2, 1))
        if scales:
            x = x * scales[0]
        x = inputs + x
        y = self.channel_norm(x)
        y = self.channel_mixing(y, training=training)
        if scales:
            y = y * scales[1]
        return x + y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "tokens_mlp_dim": self.tokens_mlp_dim,
            "channels_mlp_dim": self.channels_mlp_dim,
            "dropout_rate": self.dropout_rate,
            "stochastic_depth_rate": self.stochastic_depth_rate,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "gelu_approximate": self.gelu_approximate,
            "seed": self.seed,
            "remat": self.remat,
        }
