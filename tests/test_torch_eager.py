"""keras_mixer.torch_eager: eager PyTorch computes what the Keras path computes.

The module only runs on the PyTorch backend, so these tests do too; the
other passes cover the same numbers through the Keras path (test_model.py,
test_weights.py), which here is the reference.
"""

from unittest import mock

import keras
import numpy as np
import pytest

from base import fixture_model, fixture_params, to_numpy
from conftest import load_fixture
from keras_mixer import MLPMixer, torch_eager
from keras_mixer.layers import LayerNorm
from keras_mixer.quantize import quantize
from keras_mixer.weights import load_official, load_timm

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="keras_mixer.torch_eager is the PyTorch backend's path"
)


def tiny(**kwargs):
    """Pre-logits features: the head kernel starts at zero, as in the official model."""
    return MLPMixer(**{**dict(image_shape=(8, 8, 3), patch_size=2, num_blocks=2, hidden_dim=16,
                              tokens_mlp_dim=8, channels_mlp_dim=32, num_classes=None), **kwargs})


def images(n=3, size=8):
    return np.random.RandomState(0).uniform(0, 255, (n, size, size, 3)).astype("float32")


def both_paths(model, x):
    """(inference, counting the blocks `mixer_block` computed; the same call
    through the Keras path)."""
    import torch

    with mock.patch.object(torch_eager, "mixer_block", wraps=torch_eager.mixer_block) as fast:
        with torch.no_grad():
            inference = to_numpy(model(x, training=False))
    with mock.patch.object(torch_eager, "applies_to_mixer_block", lambda block, training: False):
        keras_path = to_numpy(model(x, training=False))
    return inference, keras_path, fast.call_count


def test_inference_is_bit_identical_to_the_keras_path_and_matches_the_official_model(official_fixture):
    config, arrays = official_fixture
    model = fixture_model(config, num_classes=config["num_classes"])
    load_official(model, fixture_params(arrays))
    inference, keras_path, fast_blocks = both_paths(model, arrays["inputs"])
    assert fast_blocks == config["num_blocks"]
    np.testing.assert_array_equal(inference, keras_path)
    assert np.abs(inference - arrays["logits"]).max() <= 1e-6
    # predict and predict_on_batch take the same path.
    np.testing.assert_array_equal(to_numpy(model.predict_on_batch(arrays["inputs"])), inference)


def test_exact_gelu_inference_matches_timm():
    config, arrays = load_fixture("timm_mixer_tiny.npz")
    model = fixture_model(config, num_classes=config["num_classes"], gelu_approximate=False)
    load_timm(model, {k: v for k, v in arrays.items() if k.startswith("state_dict/")})
    inference, keras_path, fast_blocks = both_paths(model, arrays["inputs"])
    assert fast_blocks == config["num_blocks"]
    np.testing.assert_array_equal(inference, keras_path)
    assert np.abs(inference - arrays["logits"]).max() <= 1e-6


def test_mixed_bfloat16_inference_is_bit_identical():
    import torch

    model = tiny(dtype="mixed_bfloat16")
    inference, keras_path, fast_blocks = both_paths(model, images())
    assert fast_blocks == 2
    np.testing.assert_array_equal(inference, keras_path)
    with torch.no_grad():
        tokens = model.get_layer("block_0")(keras.ops.ones((1, 16, 16), dtype="bfloat16"))
    assert keras.backend.standardize_dtype(tokens.dtype) == "bfloat16"


def test_training_calls_that_draw_masks_or_recompute_keep_the_keras_path():
    """Dropout and stochastic depth are drawn in training, with or without
    gradients; a rematerialised block recomputes itself with gradients on."""
    import torch

    model = tiny(dropout_rate=0.5, stochastic_depth_rate=0.5, seed=0)
    block = model.get_layer("block_1")
    assert not torch_eager.applies_to_mixer_block(block, training=True)
    assert torch_eager.applies_to_mixer_block(block, training=False)  # gradients on: still the identity
    assert not torch_eager.applies_to_mixer_block(tiny(remat=True).get_layer("block_1"), training=False)
    with torch.no_grad():
        assert torch_eager.applies_to_mixer_block(tiny(remat=True).get_layer("block_1"), training=True)
        assert torch_eager.applies_to_mixer_block(block, training=False)
        assert torch_eager.applies_to_mixer_block(block, training=None)
        assert not torch_eager.applies_to_mixer_block(block, training=True)
        x = images()
        first, second = to_numpy(model(x, training=True)), to_numpy(model(x, training=True))
        assert np.abs(first - second).max() > 1e-3  # dropout drew new masks
    inference, keras_path, _ = both_paths(model, x)
    np.testing.assert_array_equal(inference, keras_path)


def test_a_training_step_without_dropout_has_the_keras_path_s_gradients():
    """In training with dropout and stochastic depth off, `mixer_block` runs,
    and autograd's gradients are the Keras path's, bit for bit."""
    import torch

    model = tiny(num_classes=4)
    rng = np.random.default_rng(1)
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    x = keras.ops.convert_to_tensor(images())

    def gradients(fast):
        wrapped = torch_eager.applies_to_mixer_block if fast else (lambda block, training: False)
        with mock.patch.object(torch_eager, "applies_to_mixer_block", wrapped), \
                mock.patch.object(torch_eager, "mixer_block", wraps=torch_eager.mixer_block) as calls:
            for variable in model.trainable_variables:
                variable.value.grad = None
            loss = (model(x, training=True) ** 2).sum()
            loss.backward()
        return loss.item(), [v.value.grad.clone() for v in model.trainable_variables], calls.call_count

    fast_loss, fast_grads, fast_blocks = gradients(True)
    keras_loss, keras_grads, keras_blocks = gradients(False)
    assert (fast_blocks, keras_blocks) == (2, 0)
    assert fast_loss == keras_loss
    for a, b in zip(fast_grads, keras_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(g.abs().max() > 0 for g in fast_grads)


def test_quantized_and_lora_layers_are_computed_by_keras():
    import torch

    quantized = tiny()
    reference = tiny()
    reference.set_weights(quantized.get_weights())
    quantize(quantized, "int8")
    block = quantized.get_layer("block_0")
    assert not torch_eager.plain_dense(block.token_mixing.dense_0)
    with torch.no_grad():
        assert not torch_eager.applies_to_mixer_block(block, training=False)
    inference, keras_path, fast_blocks = both_paths(quantized, images())
    assert fast_blocks == 0
    np.testing.assert_array_equal(inference, keras_path)

    lora = tiny()
    lora.enable_lora(2)
    assert not torch_eager.plain_dense(lora.get_layer("block_0").channel_mixing.dense_1)
    inference, keras_path, fast_blocks = both_paths(lora, images())
    assert fast_blocks == 0
    np.testing.assert_array_equal(inference, keras_path)


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_layer_norm_is_keras_layer_normalization(dtype):
    x = keras.ops.convert_to_tensor(np.random.RandomState(1).normal(3, 2, (4, 5, 16)).astype("float32"))
    ours = LayerNorm(epsilon=1e-6, dtype=dtype, gamma_initializer="random_normal", beta_initializer="ones")
    theirs = keras.layers.LayerNormalization(epsilon=1e-6, dtype=dtype)
    ours.build(x.shape)
    theirs.build(x.shape)
    theirs.set_weights(ours.get_weights())
    if dtype != "float32":
        x = keras.ops.cast(x, "bfloat16")
    expected = theirs(x)
    got = ours(x)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(to_numpy(keras.ops.cast(got, "float32")),
                                  to_numpy(keras.ops.cast(expected, "float32")))


def test_a_bfloat16_layer_norm_is_float32_s_rounded_but_for_the_last_bit():
    """PyTorch's mixed-dtype kernel (bfloat16 in and out, float32 inside)
    against the float32 LayerNorm rounded to bfloat16."""
    import torch

    layer = LayerNorm(dtype="mixed_bfloat16")
    layer.build((None, 256))
    rng = np.random.default_rng(0)
    layer.set_weights([rng.normal(1, 0.2, 256).astype("float32"), rng.normal(0, 0.2, 256).astype("float32")])
    x = torch.from_numpy(rng.normal(3, 2, (512, 256)).astype("float32")).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    reference = torch.nn.functional.layer_norm(
        x.float(), (256,), layer.gamma.value.float(), layer.beta.value.float(), 1e-6).bfloat16()
    differ = y != reference
    assert differ.float().mean() < 1e-3
    # Where they differ, by at most bfloat16's rounding step (2^-8 relative)
    # at the outputs' scale, 1: values near 0 differ by float32 rounding.
    gap = (y.float() - reference.float()).abs()[differ]
    assert (gap <= 2.0 ** -7 * reference.float().abs()[differ].clamp(min=1)).all(), gap
