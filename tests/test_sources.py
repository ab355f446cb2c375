"""Sources: the embedded digits, image folders and tensorflow-datasets, with clear errors."""

import time

import numpy as np
import pytest

from keras_mixer import data
from keras_mixer import sources
from conftest import once
from conftest import write_image_folder

pytestmark = once("sources are tf.data and files, whatever the Keras backend")

SHAPE = (16, 16, 3)


def batches(dataset, n):
    return [(x.numpy(), y.numpy()) for x, y in dataset.take(n)]


def test_digits_split_is_fixed_and_scaled():
    (x_train, y_train), (x_test, y_test) = sources.load_digits()
    assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
    assert x_train.min() == 0 and x_train.max() == 255
    assert np.bincount(y_test).min() >= 35  # stratified: every class present
    (again, _), _ = sources.load_digits()
    np.testing.assert_array_equal(x_train, again)


def test_image_folder_mixed_sizes_and_formats_skips_corrupt_and_cut_files(tmp_path, caplog):
    paths = write_image_folder(tmp_path, per_class=4, corrupt=True)
    # Cut copies of a PNG and a JPEG: TensorFlow's decoder would stop the run
    # with an error that names no file.
    for path in paths[:2]:
        whole = path.read_bytes()
        (path.parent / f"cut{path.suffix}").write_bytes(whole[: len(whole) * 2 // 3])
    source = sources.image_folder_source(tmp_path)
    assert (source.num_examples, source.num_classes) == (8, 2)
    assert sorted(p.split("/")[-1] for p in source.skipped) == [
        "broken.jpg (not a JPEG or PNG)", "cut.jpg (a truncated JPEG)", "cut.png (a truncated PNG)"]
    assert "Skipped 3 file(s)" in caplog.text and "cut.png (a truncated PNG)" in caplog.text
    dataset, _ = data.train_pipeline(source, 3, SHAPE, seed=0)
    for images, labels in batches(dataset, 4):
        assert images.shape == (3,) + SHAPE
        # cat images are grey 20, dog images grey 120: labels match pixels.
        np.testing.assert_allclose(images.mean((1, 2, 3)), 20 + 100 * labels.argmax(1), atol=2)


def damage_body(path):
    """Zeroes 40 bytes in the middle of an image file, its signature and
    end marker intact: the listing's checks pass, TensorFlow's decoder fails."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 40] = bytes(40)
    path.write_bytes(bytes(data))


def test_a_damaged_image_mid_folder_is_named_when_it_fails_or_skipped_with_a_warning(tmp_path, caplog):
    paths = write_image_folder(tmp_path, per_class=4, corrupt=False)
    damage_body(paths[2])  # cat/img2.png
    source = sources.image_folder_source(tmp_path)
    assert source.num_examples == 8 and not source.skipped
    dataset, _ = data.train_pipeline(source, 4, SHAPE, seed=0)
    with pytest.raises(ValueError) as info:
        with data.naming_damaged_images(data.Sources(source, None, 2, 8)):
            batches(dataset, 4)
    message = str(info.value)
    assert f"1 damaged image(s) in image folder {tmp_path}" in message and str(paths[2]) in message
    assert "damaged_images='skip'" in message and str(paths[0]) not in message
    # Any other error passes unchanged.
    with pytest.raises(KeyError):
        with data.naming_damaged_images(data.Sources(source, None, 2, 8)):
            raise KeyError("x")

    skipping = sources.make_source("image_folder", "train", str(tmp_path), damaged="skip")
    assert skipping.num_examples == 7 and skipping.skipped == (f"{paths[2]} (TensorFlow cannot decode it)",)
    assert f"{paths[2]} (TensorFlow cannot decode it)" in caplog.text
    dataset, _ = data.train_pipeline(skipping, 7, SHAPE, seed=0)
    for images, labels in batches(dataset, 3):
        np.testing.assert_allclose(images.mean((1, 2, 3)), 20 + 100 * labels.argmax(1), atol=2)
    with pytest.raises(ValueError, match="damaged_images='later': use one of error, skip"):
        sources.image_folder_source(tmp_path, damaged="later")


def test_image_folder_with_splits_and_clear_errors(tmp_path):
    write_image_folder(tmp_path / "train", corrupt=False)
    write_image_folder(tmp_path / "test", per_class=1, corrupt=False)
    assert sources.image_folder_source(tmp_path, "test").num_examples == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.image_folder_source(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no test split"):
        sources.image_folder_source(tmp_path / "train", "test")
    with pytest.raises(ValueError, match="needs `data_dir`"):
        sources.make_source("image_folder", "train")


def test_missing_tfds_data_fails_fast_with_instructions(tmp_path, monkeypatch):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        sources.tfds_source("cifar10", "train", data_dir=str(tmp_path))
    message = str(error.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert f"tfds build cifar10 --data_dir {tmp_path}" in message
    monkeypatch.setattr(sources, "_check_online", lambda: False)
    with pytest.raises(FileNotFoundError, match="this machine is offline"):
        sources.tfds_source("cifar10", "train", data_dir=str(tmp_path), download=True)
    assert time.perf_counter() - start < 20
    with pytest.raises(ValueError, match="Unknown tensorflow-datasets name 'cifar11'"):
        sources.tfds_source("cifar11", "train", data_dir=str(tmp_path))


def test_digits_are_a_source_of_fixed_size_images():
    train, test = sources.make_source("digits", "train"), sources.digits_source("test")
    assert (train.num_examples, test.num_examples, train.num_classes) == (1437, 360, 10)
    assert train.image_shape == test.image_shape == (8, 8, 1)
    (x_train, y_train), (x_test, y_test) = sources.load_digits()
    images, labels = next(iter(test.dataset.batch(360)))
    np.testing.assert_array_equal(images.numpy(), x_test)
    np.testing.assert_array_equal(labels.numpy(), y_test)
    with pytest.raises(ValueError, match="The digits have splits 'train' and 'test', got 'validation'"):
        sources.make_source("digits", "validation")
