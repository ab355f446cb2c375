import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import once
from keras_mixer import augment

pytestmark = once("tf.data and KerasCV's TensorFlow layers, whatever the Keras backend; "
                  "test_mixing.py covers the train step's mixing on every backend")

N, H, W, C = 8, 16, 16, 3
# Image i is filled with grey level VALUES[i]; label i is one-hot at i.
VALUES = np.arange(N, dtype="float32") * 30 + 10


def run_in_tf_data(fn):
    images = tf.constant(np.broadcast_to(VALUES[:, None, None, None], (N, H, W, C)).copy())
    labels = tf.one_hot(tf.range(N), N)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat(4).enumerate()
    dataset = dataset.map(lambda step, batch: fn(batch[0], batch[1], step))
    numpy = lambda t: tf.nest.map_structure(lambda a: a.numpy(), t)  # noqa: E731
    return [(numpy(x), y.numpy()) for x, y in dataset], images.numpy()


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


def test_shears_warp_once_and_give_the_same_pixels():
    keras_cv = pytest.importorskip("keras_cv")
    images = tf.random.stateless_uniform((4, 16, 16, 3), (1, 2), maxval=255.0)
    shear = keras_cv.layers.RandomShear(x_factor=0.5, y_factor=0, seed=0)
    transform = shear.get_random_transformation_batch(4)
    assert transform["shear_y"] is not None  # KerasCV warps by a zero y shear too
    both = shear.augment_images(images, transform)
    only_x = shear.augment_images(images, dict(transform, shear_y=None))
    np.testing.assert_array_equal(only_x.numpy(), both.numpy())
    randaugment = augment._layers("keras_cv", 2, 10, 0, 0, 0)[0]
    shears = [layer for layer in randaugment.layers if isinstance(layer, keras_cv.layers.RandomShear)]
    assert len(shears) == 2
    assert [(s.x_factor is None, s.y_factor is None) for s in shears] == [(False, True), (True, False)]


def test_keras_randaugment_equalizes_by_bincount_with_keras_own_pixels():
    """Keras' RandAugment gets an Equalization that counts by bincount in
    tf.data whatever the Keras backend (Keras' own picks the per-bin loop
    under JAX: a graph of about 46,000 ops, 25 s to trace); the pixels are
    Keras' own."""
    randaugment = augment._layers("keras", 2, 10, 0, 0, 0)[0]
    ours, theirs = randaugment.equalization, keras.layers.Equalization(value_range=(0, 255))
    assert isinstance(ours, keras.layers.Equalization) and type(ours) is not keras.layers.Equalization
    assert hasattr(keras.layers.Equalization, "_custom_histogram_fixed_width")  # what it overrides
    images = tf.random.stateless_uniform((4, 12, 10, 3), (5, 6), maxval=256.0)
    images = tf.floor(images * tf.constant([1.0, 0.5, 0.2]))  # skewed histograms
    in_tf_data = lambda layer: next(iter(  # noqa: E731
        tf.data.Dataset.from_tensors(images).map(layer))).numpy()
    np.testing.assert_array_equal(in_tf_data(ours), in_tf_data(theirs))
    graph = tf.function(ours).get_concrete_function(tf.TensorSpec((None, 12, 10, 3))).graph
    assert len(graph.get_operations()) < 2000, len(graph.get_operations())


def test_randaugment_per_image_in_the_pipeline(implementation):
    image = augment.augmenters(randaugment_magnitude=10, implementation=implementation, seed=3).image
    dataset = tf.data.Dataset.from_tensor_slices(tf.fill((6, H, W, C), 100.0)).map(image)
    out = np.stack(list(dataset.as_numpy_iterator()))
    assert out.shape == (6, H, W, C) and 0 <= out.min() and out.max() <= 255
    assert not np.allclose(out, 100.0)


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


def test_layers_compute_in_float32_under_mixed_precision(implementation):
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        fn = augment.batch_augmenter(randaugment_magnitude=10, mixup=0.2, cutmix=1.0,
                                     implementation=implementation)
    finally:
        keras.config.set_dtype_policy(policy)
    for images, labels in run_in_tf_data(fn)[0]:
        assert images.dtype == labels.dtype == np.float32
        np.testing.assert_allclose(labels.sum(1), 1, atol=1e-5)


def test_kerascv_is_imported_only_for_a_layer_it_builds(monkeypatch):
    """Without RandAugment, MixUp or CutMix nothing is built, and KerasCV
    (2 s to import) is not imported: every digits or fine-tuning run starts
    without it. Where a layer needs it and it is missing, the error names
    the extra and the Keras-core alternative."""
    import sys

    monkeypatch.setitem(sys.modules, "keras_cv", None)  # as if not installed
    assert augment.augmenters(randaugment_magnitude=0, mixup=0, cutmix=0) == (None, None)
    with pytest.raises(ImportError, match=r"needs KerasCV: pip install \"keras-mixer\[train\]\"; "
                                          "or set augment_impl='keras'"):
        augment.augmenters(randaugment_magnitude=9)


def test_magnitude_mapping_and_errors(caplog):
    assert augment.randaugment_strength(9) == pytest.approx(0.9)
    assert augment.randaugment_strength(15) == 1.0
    assert "above level 10" in caplog.text
    with pytest.raises(ValueError, match="Unknown augmentation implementation 'albumentations'"):
        augment.batch_augmenter(mixup=0.2, implementation="albumentations")
    with pytest.raises(ValueError, match="`mixup` must be >= 0"):
        augment.batch_augmenter(mixup=-1)
