"""MixUp and CutMix in the train step: the arithmetic on every backend, the
draws against KerasCV's, and `fit` mixing what the pipeline sends."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import test_augment
from conftest import once
from keras_mixer import augment
from keras_mixer import mixing
from keras_mixer.model import MLPMixer

N, H, W = 4, 8, 8
ROWS = np.array([
    [0.7, 0.7, 0, 0, 0, 0],      # MixUp, lambda 0.7
    [1.0, 0.75, 0, 4, 0, 4],     # CutMix of the top-left quarter
    [1.0, 1.0, 0, 0, 0, 0],      # nothing
    [1.0, 0.5, 4.5, 11, -3, 8],  # a box past the border: rows 5-7, all columns
], "float32")


def numpy_mix(images, labels, rows):
    out = keras.ops.convert_to_numpy
    mixed = mixing.mix(keras.ops.convert_to_tensor(images), keras.ops.convert_to_tensor(labels),
                       keras.ops.convert_to_tensor(rows))
    return out(mixed[0]), out(mixed[1])


def test_mix_blends_pastes_and_relabels():
    rng = np.random.default_rng(0)
    images = rng.random((N, H, W, 3), dtype="float32")
    labels = np.eye(N, dtype="float32")
    mixed, soft = numpy_mix(images, labels, ROWS)
    np.testing.assert_allclose(mixed[0], 0.7 * images[0] + 0.3 * images[3], rtol=1e-6)
    np.testing.assert_array_equal(mixed[1, :4, :4], images[0, :4, :4])
    np.testing.assert_array_equal(mixed[1, 4:], images[1, 4:])
    np.testing.assert_array_equal(mixed[1, :4, 4:], images[1, :4, 4:])
    np.testing.assert_array_equal(mixed[2], images[2])
    np.testing.assert_array_equal(mixed[3, 5:], images[2, 5:])
    np.testing.assert_array_equal(mixed[3, :5], images[3, :5])
    # Each label is its own weight, the rest going to the image before it.
    expected = np.array([[0.7, 0, 0, 0.3], [0.25, 0.75, 0, 0], [0, 0, 1, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(soft, expected, atol=1e-7)
    # A (partly) pasted image is labelled by the share of its pixels.
    np.testing.assert_allclose((mixed[3] == images[2]).all(-1).mean(), 3 / 8)


def mixed_on_device(fn):
    """Runs a `mix_on="device"` batch function, then the train step's mixing."""
    out, original = test_augment.run_in_tf_data(fn)  # draws in tf.data, then mixes as the train step does
    mixed = [mixing.mix_batch((x, y)) for x, y in out]
    return [(keras.ops.convert_to_numpy(x), keras.ops.convert_to_numpy(y)) for x, y in mixed], original


def test_device_mixing_keeps_the_label_invariants():
    """The checks above, for mixing in the train step (`mix_on="device"`)."""
    mixup = augment.augmenters(mixup=0.5, seed=1, mix_on="device")
    assert mixup.image is None
    for images, labels in mixed_on_device(mixup.batch)[0]:
        np.testing.assert_allclose(labels.sum(1), 1, atol=1e-5)
        np.testing.assert_allclose(images[:, 0, 0, 0], labels @ test_augment.VALUES, rtol=1e-4, atol=1e-2)
    cut = augment.augmenters(cutmix=1.0, seed=2, mix_on="device").batch
    cut_any = False
    for images, labels in mixed_on_device(cut)[0]:
        area = np.stack([(images[..., 0] == v).mean((1, 2)) for v in test_augment.VALUES], 1)
        np.testing.assert_allclose(area, labels, atol=1e-6)
        cut_any |= bool((labels.max(1) < 1).any())
    assert cut_any
    with pytest.raises(ValueError, match="Unknown `mix_on` 'gpu'"):
        augment.augmenters(mixup=0.2, mix_on="gpu")


def test_mix_batch_leaves_other_batches_alone():
    images, labels = np.zeros((2, H, W, 3), "float32"), np.eye(2, dtype="float32")
    assert mixing.mix_batch((images, labels))[0] is images
    assert not mixing.is_mixing_input({"images": images})
    x = {"images": images, "mix": ROWS[:2]}
    mixed, soft, weights = mixing.mix_batch((x, labels, np.ones(2)))
    assert keras.ops.convert_to_numpy(soft).shape == (2, 2) and weights.shape == (2,)


def draws(mixup, cutmix, batches=64, batch_size=64, size=(32, 32)):
    rows = [augment.mix_parameters(batch_size, size, step, mixup, cutmix, seed=3).numpy()
            for step in range(batches)]
    return np.concatenate(rows)


@once("the draws are tf.data ops, whatever the Keras backend")
@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_draws_are_beta(alpha):
    rows = draws(alpha, 0.0)
    weight = rows[:, 0]
    np.testing.assert_array_equal(rows[:, 1], weight)
    assert (rows[:, 2:] == 0).all()
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 4096 draws.
    assert abs(weight.mean() - 0.5) < 0.02
    np.testing.assert_allclose(weight.var(), 1 / (4 * (2 * alpha + 1)), rtol=0.08)


def kerascv_cutmix_label_weights(alpha, batches=64, batch_size=64, size=32):
    """KerasCV's CutMix with the exact-area labels of the host path."""
    fn = augment.batch_augmenter(cutmix=alpha, seed=5)
    images = tf.zeros((batch_size, size, size, 3))
    labels = tf.one_hot(tf.range(batch_size), batch_size)
    weights = [tf.linalg.diag_part(fn(images, labels, tf.constant(step, tf.int64))[1]).numpy()
               for step in range(batches)]
    return np.concatenate(weights)


@once("the draws are tf.data ops, whatever the Keras backend")
def test_cutmix_draws_match_kerascv():
    rows = draws(0.0, 1.0)
    assert (rows[:, 0] == 1).all()
    ours = rows[:, 1]
    theirs = kerascv_cutmix_label_weights(1.0)
    # KerasCV pairs an image with itself about once a batch (a random
    # permutation); ours never does, so compare where it pasted another.
    theirs = theirs[theirs < 1]
    for stat in (np.mean, np.std, lambda w: np.mean(w > 0.5)):
        assert abs(stat(ours) - stat(theirs)) < 0.03, (stat(ours), stat(theirs))


@once("the draws are tf.data ops, whatever the Keras backend")
def test_both_pick_one_per_batch_and_replay():
    rows = draws(0.5, 1.0, batches=32, batch_size=8)
    kinds = (rows[:, 0] == 1).reshape(32, 8)
    assert (kinds.all(1) | ~kinds.any(1)).all()  # one kind per batch
    assert 8 < kinds.all(1).sum() < 24
    np.testing.assert_array_equal(rows, draws(0.5, 1.0, batches=32, batch_size=8))


def small_model():
    keras.utils.set_random_seed(0)
    model = MLPMixer(image_shape=(H, W, 3), patch_size=4, num_blocks=1, hidden_dim=8,
                     tokens_mlp_dim=8, channels_mlp_dim=8, num_classes=N)
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    return model


def test_train_step_trains_on_the_mixed_batch():
    rng = np.random.default_rng(1)
    images = rng.random((N, H, W, 3), dtype="float32")
    labels = np.eye(N, dtype="float32")
    device, host = small_model(), small_model()
    host.set_weights(device.get_weights())
    device.train_on_batch({"images": images, "mix": ROWS}, labels)
    host.train_on_batch(*numpy_mix(images, labels, ROWS))
    for after_device, after_host in zip(device.get_weights(), host.get_weights()):
        np.testing.assert_allclose(after_device, after_host, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(device.get_weights(), small_model().get_weights()))
    # Outside training the images go in unmixed, as Dropout is off there.
    np.testing.assert_array_equal(
        device.predict({"images": images, "mix": ROWS}, verbose=0), device.predict(images, verbose=0))
