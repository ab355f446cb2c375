import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_mixer import data
from conftest import write_image_folder

SHAPE = (16, 16, 3)


@pytest.fixture
def mock_cifar():
    with tfds.testing.mock_data(num_examples=24):
        yield data.tfds_source("cifar10", "train")


def batches(dataset, n):
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(n)]


def test_tfds_train_pipeline_shapes_ranges_and_determinism(mock_cifar):
    assert (mock_cifar.num_examples, mock_cifar.num_classes) == (24, 10)
    dataset, steps = data.train_pipeline(mock_cifar, 5, SHAPE, seed=1)
    assert steps == 24 // 5
    got = batches(dataset, 6)  # more than one epoch: repeats
    images, labels = got[0]
    assert images.shape == (5,) + SHAPE and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 255 and images.max() > 1  # not rescaled
    assert labels.shape == (5, 10)
    np.testing.assert_array_equal(labels.sum(1), 1)
    again, _ = data.train_pipeline(mock_cifar, 5, SHAPE, seed=1)
    for (a, _), (b, _) in zip(got, batches(again, 6)):
        np.testing.assert_array_equal(a, b)
    other, _ = data.train_pipeline(mock_cifar, 5, SHAPE, seed=2)
    assert not np.array_equal(images, batches(other, 1)[0][0])


def test_train_pipeline_start_step_continues_the_same_stream(mock_cifar):
    full, _ = data.train_pipeline(mock_cifar, 5, SHAPE, seed=3)
    resumed, _ = data.train_pipeline(mock_cifar, 5, SHAPE, seed=3, start_step=7)
    for (a, la), (b, lb) in zip(batches(full, 10)[7:], batches(resumed, 3)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


def test_shards_are_disjoint_and_equal_sized(mock_cifar):
    def labels_of(index):
        source = mock_cifar._replace(dataset=mock_cifar.dataset.enumerate().map(
            lambda i, ex: (ex[0], tf.cast(i, tf.int32))), num_classes=24)
        dataset, steps = data.train_pipeline(source, 4, SHAPE, num_shards=2, shard_index=index)
        return steps, {int(i) for _, y in batches(dataset, 3) for i in y.argmax(1)}

    (steps0, first), (steps1, second) = labels_of(0), labels_of(1)
    assert steps0 == steps1 == 3 and len(first) == len(second) == 12
    assert not first & second


def test_eval_pipeline_is_deterministic_and_keeps_every_example(mock_cifar):
    for crop in data.EVAL_CROPS:
        dataset = data.eval_pipeline(mock_cifar, 10, SHAPE, crop=crop)
        got = batches(dataset, 100)
        assert [x.shape[0] for x, _ in got] == [10, 10, 4]
        for (a, _), (b, _) in zip(got, batches(dataset, 100)):
            np.testing.assert_array_equal(a, b)


def test_eval_crops_follow_the_paper():
    # Four vertical stripes 0, 85, 170, 255 on a 20x80 image.
    image = np.repeat(np.repeat(np.array([0, 85, 170, 255], np.uint8), 20)[None, :, None], 20, 0)
    image = tf.constant(np.repeat(image, 3, -1))
    # resmall-crop: shorter side to 18 (16 / 0.875), keep the aspect, center
    # 16x16: only the two middle stripes remain.
    resmall = data.center_crop(image, (16, 16), "resmall-crop").numpy()
    assert resmall.shape == (16, 16, 3)
    assert 40 < resmall.min() and resmall.max() < 215
    # resize-crop: squeeze the whole image to 18x18 first: all four remain.
    resize = data.center_crop(image, (16, 16), "resize-crop").numpy()
    assert resize.min() < 10 and resize.max() > 245
    with pytest.raises(ValueError, match="Unknown eval crop 'center'. Valid: resize-crop, resmall-crop"):
        data.center_crop(image, (16, 16), "center")


def test_inception_crop_of_the_full_area_is_the_image_or_its_mirror():
    image = tf.random.stateless_uniform((12, 12, 3), seed=[0, 0], maxval=255.0)
    seen = set()
    for i in range(12):
        out = data.inception_crop(image, (12, 12), tf.constant([i, 0], tf.int64), area_range=(1.0, 1.0)).numpy()
        if np.allclose(out, image.numpy(), atol=1e-3):
            seen.add("same")
        elif np.allclose(out, image.numpy()[:, ::-1], atol=1e-3):
            seen.add("flipped")
        else:
            pytest.fail("a full-area crop that is neither the image nor its mirror")
    assert seen == {"same", "flipped"}
    small = data.inception_crop(image, (6, 6), tf.constant([1, 2], tf.int64), area_range=(0.05, 0.2))
    assert small.shape == (6, 6, 3)


def test_image_folder_mixed_sizes_and_formats_skips_a_corrupt_file(tmp_path, caplog):
    write_image_folder(tmp_path, per_class=3, corrupt=True)
    source = data.image_folder_source(tmp_path)
    assert (source.num_examples, source.num_classes) == (6, 2)
    assert [p.endswith("broken.jpg") for p in source.skipped] == [True]
    assert "Skipped 1 file(s)" in caplog.text and "broken.jpg" in caplog.text
    dataset, _ = data.train_pipeline(source, 3, SHAPE, seed=0)
    for images, labels in batches(dataset, 4):
        assert images.shape == (3,) + SHAPE
        # cat images are grey 20, dog images grey 120: labels match pixels.
        np.testing.assert_allclose(images.mean((1, 2, 3)), 20 + 100 * labels.argmax(1), atol=2)


def test_image_folder_with_splits_and_clear_errors(tmp_path):
    write_image_folder(tmp_path / "train", corrupt=False)
    write_image_folder(tmp_path / "test", per_class=1, corrupt=False)
    assert data.image_folder_source(tmp_path, "test").num_examples == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.image_folder_source(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no test split"):
        data.image_folder_source(tmp_path / "train", "test")
    with pytest.raises(ValueError, match="needs `data_dir`"):
        data.make_source("image_folder", "train")


def test_missing_tfds_data_fails_fast_with_instructions(tmp_path, monkeypatch):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        data.tfds_source("cifar10", "train", data_dir=str(tmp_path))
    message = str(error.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert f"tfds build cifar10 --data_dir {tmp_path}" in message
    monkeypatch.setattr(data, "_check_online", lambda: False)
    with pytest.raises(FileNotFoundError, match="this machine is offline"):
        data.tfds_source("cifar10", "train", data_dir=str(tmp_path), download=True)
    assert time.perf_counter() - start < 20
    with pytest.raises(ValueError, match="Unknown tensorflow-datasets name 'cifar11'"):
        data.tfds_source("cifar11", "train", data_dir=str(tmp_path))
