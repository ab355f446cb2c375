import numpy as np
import pytest
import tensorflow as tf

from keras_mixer import augment

N, H, W, C = 8, 16, 16, 3
# Image i is filled with grey level VALUES[i]; label i is one-hot at i.
VALUES = np.arange(N, dtype="float32") * 30 + 10


def run_in_tf_data(fn):
    images = tf.constant(np.broadcast_to(VALUES[:, None, None, None], (N, H, W, C)).copy())
    labels = tf.one_hot(tf.range(N), N)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat(4).enumerate()
    dataset = dataset.map(lambda step, batch: fn(batch[0], batch[1], step))
    return [(x.numpy(), y.numpy()) for x, y in dataset], images.numpy()


@pytest.fixture(params=augment.IMPLEMENTATIONS)
def implementation(request):
    return request.param


def test_mixup_labels_are_the_mixing_weights(implementation):
    fn = augment.batch_augmenter(mixup=0.5, implementation=implementation, seed=1)
    out, original = run_in_tf_data(fn)
    mixed_any = False
    for images, labels in out:
        np.testing.assert_allclose(labels.sum(1), 1, atol=1e-5)
        assert ((labels > 1e-6).sum(1) <= 2).all()  # a mix of two images
        # Each mixed image is the label-weighted sum of the originals.
        np.testing.assert_allclose(images[:, 0, 0, 0], labels @ VALUES, rtol=1e-4, atol=1e-2)
        mixed_any |= bool(((labels > 1e-3) & (labels < 1 - 1e-3)).any())
    assert mixed_any


def test_cutmix_labels_are_the_pasted_areas(implementation):
    fn = augment.batch_augmenter(cutmix=1.0, implementation=implementation, seed=2)
    out, _ = run_in_tf_data(fn)
    cut_any = False
    for images, labels in out:
        np.testing.assert_allclose(labels.sum(1), 1, atol=1e-5)
        # The share of pixels from image k equals label k.
        area = np.stack([(images[..., 0] == v).mean((1, 2)) for v in VALUES], 1)
        np.testing.assert_allclose(area, labels, atol=1e-5)
        cut_any |= bool((labels.max(1) < 1).any())
    assert cut_any


def test_randaugment_changes_images_within_range(implementation):
    fn = augment.batch_augmenter(randaugment_magnitude=10, implementation=implementation, seed=3)
    out, original = run_in_tf_data(fn)
    images = np.stack([x for x, _ in out])
    assert images.shape == (4, N, H, W, C) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 255
    assert not np.allclose(images, original[None])
    for _, labels in out:
        np.testing.assert_array_equal(labels, np.eye(N))  # labels untouched


def test_all_together_and_off(implementation):
    fn = augment.batch_augmenter(randaugment_magnitude=9, mixup=0.2, cutmix=1.0,
                                 implementation=implementation)
    out, _ = run_in_tf_data(fn)
    for _, labels in out:
        np.testing.assert_allclose(labels.sum(1), 1, atol=1e-5)
    assert augment.batch_augmenter(randaugment_magnitude=0, implementation=implementation) is None


def test_magnitude_mapping_and_errors(caplog):
    assert augment.randaugment_strength(9) == pytest.approx(0.9)
    assert augment.randaugment_strength(15) == 1.0
    assert "above level 10" in caplog.text
    with pytest.raises(ValueError, match="Unknown augmentation implementation 'albumentations'"):
        augment.batch_augmenter(mixup=0.2, implementation="albumentations")
    with pytest.raises(ValueError, match="`mixup` must be >= 0"):
        augment.batch_augmenter(mixup=-1)
