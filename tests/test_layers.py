import numpy as np
import pytest
import keras

from keras_mixer import LayerNorm
from keras_mixer import MixerBlock
from keras_mixer import MLPBlock
from keras_mixer import StochasticDepth
from base import check_layer
from base import to_numpy


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def test_mlp_block_checks():
    check_layer(MLPBlock, {"mlp_dim": 16, "dropout_rate": 0.1, "gelu_approximate": False}, (2, 5, 8))


def test_mixer_block_checks():
    check_layer(
        MixerBlock,
        {"tokens_mlp_dim": 6, "channels_mlp_dim": 16, "stochastic_depth_rate": 0.2, "seed": 3},
        (2, 5, 8),
    )


def test_stochastic_depth_checks():
    check_layer(StochasticDepth, {"rate": 0.3, "seed": 1}, (2, 5, 8))


@pytest.mark.parametrize("build, wrong, right", [
    (lambda: MLPBlock(16, droput_rate=0.1), "droput_rate", "dropout_rate"),
    (lambda: MixerBlock(6, 16, stochastic_depth=0.1), "stochastic_depth", "stochastic_depth_rate"),
    (lambda: StochasticDepth(0.1, sed=1), "sed", "seed"),
    (lambda: LayerNorm(epsilom=1e-5), "epsilom", "epsilon"),
])
def test_a_misspelt_layer_argument_is_a_type_error_that_names_the_right_one(build, wrong, right):
    with pytest.raises(TypeError, match=f"unexpected keyword argument `{wrong}`. Did you mean `{right}`"):
        build()


def test_the_base_layer_arguments_and_layer_normalization_s_own_are_still_taken():
    norm = LayerNorm(center=False, name="norm", trainable=False, dtype="float32")
    assert (norm.center, norm.name, norm.trainable) == (False, "norm", False)
    assert MLPBlock(8, autocast=False, name="mlp").name == "mlp"


def test_mixer_block_matches_numpy():
    """Token mixing acts across patches (transposed), channel mixing across channels."""
    block = MixerBlock(tokens_mlp_dim=6, channels_mlp_dim=16, layer_norm_epsilon=1e-6)
    rng = np.random.RandomState(1)
    x = rng.normal(size=(3, 5, 8)).astype("float32")
    block.build(x.shape)
    for w in block.weights:
        w.assign(rng.normal(size=w.shape).astype("float32") * 0.5)
    ln0, ln1 = block.token_norm, block.channel_norm
    tm, cm = block.token_mixing, block.channel_mixing

    def mlp(y, m):
        h = np_gelu_tanh(y @ to_numpy(m.dense_0.kernel) + to_numpy(m.dense_0.bias))
        return h @ to_numpy(m.dense_1.kernel) + to_numpy(m.dense_1.bias)

    y = np_layer_norm(x, to_numpy(ln0.gamma), to_numpy(ln0.beta), 1e-6)
    h = x + mlp(y.transpose(0, 2, 1), tm).transpose(0, 2, 1)
    y = np_layer_norm(h, to_numpy(ln1.gamma), to_numpy(ln1.beta), 1e-6)
    expected = h + mlp(y, cm)
    np.testing.assert_allclose(to_numpy(block(x)), expected, rtol=1e-4, atol=1e-4)


def test_layer_norm_checks():
    check_layer(LayerNorm, {"epsilon": 1e-6}, (2, 5, 8))


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_layer_norm_matches_keras_layer_normalization(policy):
    # Same weights and config as Keras' layer; only the formula differs (for
    # XLA), so the outputs must agree to rounding, under mixed precision too.
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 7, 16)) * 4 + 2).astype("float32")
    ours = LayerNorm(epsilon=1e-6, dtype=policy)
    theirs = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy)
    ours.build(x.shape)
    theirs.build(x.shape)
    weights = [rng.standard_normal(16).astype("float32") for _ in range(2)]
    ours.set_weights(weights)
    theirs.set_weights(weights)
    assert [w.name for w in ours.weights] == [w.name for w in theirs.weights] == ["gamma", "beta"]
    got, want = to_numpy(ours(x)).astype("float32"), to_numpy(theirs(x)).astype("float32")
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=1e-5 if policy == "float32" else 3e-2)
    np.testing.assert_allclose(
        to_numpy(LayerNorm(epsilon=1e-6)(x)), np_layer_norm(x, 1.0, 0.0, 1e-6), atol=1e-5
    )
    with pytest.raises(ValueError, match="last axis only"):
        LayerNorm(axis=1)


def test_stochastic_depth_identity_at_inference():
    layer = StochasticDepth(0.5, seed=0)
    x = np.random.RandomState(0).normal(size=(64, 4, 3)).astype("float32")
    np.testing.assert_array_equal(to_numpy(layer(x)), x)
    np.testing.assert_array_equal(to_numpy(layer(x, training=False)), x)


def test_stochastic_depth_drops_whole_samples_with_rate_and_keeps_mean():
    rate, n = 0.25, 20000
    layer = StochasticDepth(rate, seed=0)
    x = np.ones((n, 3, 2), "float32")
    out = to_numpy(layer(x, training=True))
    per_sample = out.reshape(n, -1)
    # Whole samples: every element of a sample is dropped or kept together.
    assert np.all(per_sample.min(1) == per_sample.max(1))
    kept = per_sample[:, 0] != 0
    # Binomial std of the drop fraction is sqrt(.25 * .75 / 20000) ~ 0.003.
    assert abs((1 - kept.mean()) - rate) < 0.015
    np.testing.assert_allclose(per_sample[kept, 0], 1 / (1 - rate), rtol=1e-6)
    # Mean preserved: without the 1/(1-rate) scale it would be 0.75.
    assert abs(out.mean() - 1.0) < 0.03


def test_stochastic_depth_same_seed_same_mask():
    x = np.ones((256, 2), "float32")
    a = to_numpy(StochasticDepth(0.5, seed=7)(x, training=True))
    b = to_numpy(StochasticDepth(0.5, seed=7)(x, training=True))
    c = to_numpy(StochasticDepth(0.5, seed=8)(x, training=True))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (StochasticDepth, {"rate": 1.0}, "`rate` must be in [0, 1)"),
        (StochasticDepth, {"rate": -0.1}, "`rate` must be in [0, 1)"),
        (MLPBlock, {"mlp_dim": 0}, "`mlp_dim` must be a positive integer"),
        (MLPBlock, {"mlp_dim": 8, "dropout_rate": 1.5}, "`dropout_rate` must be in [0, 1)"),
        (MixerBlock, {"tokens_mlp_dim": -1, "channels_mlp_dim": 8}, "`tokens_mlp_dim` must be a positive integer"),
        (MixerBlock, {"tokens_mlp_dim": 4, "channels_mlp_dim": 8, "stochastic_depth_rate": 1},
         "`stochastic_depth_rate` must be in [0, 1)"),
        (MixerBlock, {"tokens_mlp_dim": 4, "channels_mlp_dim": 8, "layer_norm_epsilon": 0},
         "`layer_norm_epsilon` must be positive"),
    ],
)
def test_layer_argument_errors(cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    assert message in str(info.value)


def test_mixer_block_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\(batch, num_tokens, hidden_dim\)"):
        MixerBlock(4, 8)(np.zeros((2, 4, 4, 8), "float32"))
