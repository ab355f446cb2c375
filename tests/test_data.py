"""Input pipelines: deterministic, resumable, sharded training streams; evaluation sets;
a config's datasets."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import once
from keras_mixer import augment
from keras_mixer import config as config_lib
from keras_mixer import data
from keras_mixer import runtime
from keras_mixer import sources

SHAPE = (16, 16, 3)

pytestmark = once("the pipelines are tf.data, whatever the Keras backend")


@pytest.fixture
def mock_cifar():
    with tfds.testing.mock_data(num_examples=24):
        yield sources.tfds_source("cifar10", "train")


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


@pytest.mark.parametrize("implementation", augment.IMPLEMENTATIONS)
def test_randaugment_runs_per_image_in_the_parallel_map(mock_cifar, implementation):
    image, _ = augment.augmenters(randaugment_magnitude=10, implementation=implementation)
    plain = batches(data.train_pipeline(mock_cifar, 5, SHAPE, seed=1)[0], 2)
    augmented = batches(data.train_pipeline(mock_cifar, 5, SHAPE, seed=1, image_augment=image)[0], 2)
    for (a, la), (b, lb) in zip(plain, augmented):
        assert b.shape == (5,) + SHAPE and b.dtype == np.float32
        assert 0 <= b.min() and b.max() <= 255
        np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(plain[0][0], augmented[0][0])


@pytest.mark.parametrize("encode", [tf.io.encode_jpeg, tf.io.encode_png])
def test_decoding_only_the_crop_gives_the_same_crop(encode):
    """The same window as decoding it all; the same pixels, but for a JPEG's
    left and right edge columns, where libjpeg's chroma upsampling has no
    neighbour outside the window in a cropped decode."""
    rng = np.random.default_rng(0)
    small = rng.uniform(0, 255, (9, 13, 3)).astype("float32")
    image = tf.cast(tf.clip_by_value(tf.image.resize(small, (75, 101), method="bicubic"), 0, 255), tf.uint8)
    encoded = encode(image)  # odd sizes; JPEG with 4:2:0 chroma
    decoded = tf.io.decode_image(encoded, channels=3)
    edge = []
    for step in range(12):
        seed = tf.constant([4, step], tf.int64)
        expected = data.inception_crop(decoded, (16, 16), seed, flip=False).numpy()
        got = data.decode_and_inception_crop(encoded, 3, (16, 16), seed, flip=False).numpy()
        np.testing.assert_array_equal(got[:, 1:-1], expected[:, 1:-1])
        edge.append(np.abs(got[:, [0, -1]] - expected[:, [0, -1]]).mean())
    assert (encode is tf.io.encode_png) == (max(edge) == 0)
    assert np.mean(edge) < 4, edge  # levels of 255, on two columns of 16


def test_train_pipeline_start_step_continues_the_same_stream(mock_cifar):
    full, _ = data.train_pipeline(mock_cifar, 5, SHAPE, seed=3)
    resumed, _ = data.train_pipeline(mock_cifar, 5, SHAPE, seed=3, start_step=7)
    for (a, la), (b, lb) in zip(batches(full, 10)[7:], batches(resumed, 3)):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


def test_shards_are_disjoint_and_equal_sized(mock_cifar):
    def labels_of(index):
        source = dataclasses.replace(mock_cifar, dataset=mock_cifar.dataset.enumerate().map(
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


def digits_train(batch_size, seed, shift_pixels):
    return data.train_pipeline(sources.digits_source("train"), batch_size, (8, 8, 1), seed=seed,
                               shift_pixels=shift_pixels)


def test_digits_pipeline_batches_shifts_and_is_deterministic():
    def first_batch(seed):
        train, steps = digits_train(32, seed, shift_pixels=1)
        return steps, next(iter(train))

    steps, (images, labels) = first_batch(3)
    assert steps == 1437 // 32
    assert images.shape == (32, 8, 8, 1) and labels.shape == (32, 10)
    np.testing.assert_array_equal(labels.numpy().sum(1), 1)
    _, (images_again, _) = first_batch(3)
    np.testing.assert_array_equal(images.numpy(), images_again.numpy())
    _, (other, _) = first_batch(4)
    assert not np.array_equal(images.numpy(), other.numpy())


@pytest.mark.parametrize("num_shards", [2, 4])
def test_digits_shards_split_each_global_batch_of_one_host(num_shards):
    """On N hosts each host's batches are its consecutive slice of the global
    batch one host draws, shifts included: the hosts' slices, joined in
    process order, are that batch, and no example is read twice in an epoch."""
    source = sources.digits_source("train")
    one, steps = data.train_pipeline(source, 64, (8, 8, 1), seed=5, start_step=3)
    parts = [data.train_pipeline(source, 64 // num_shards, (8, 8, 1), seed=5, start_step=3,
                                 num_shards=num_shards, shard_index=i) for i in range(num_shards)]
    assert {part_steps for _, part_steps in parts} == {steps} == {1437 // 64}
    for whole, *pieces in zip(batches(one, 4), *(batches(d, 4) for d, _ in parts)):
        np.testing.assert_array_equal(np.concatenate([x for x, _ in pieces]), whole[0])
        np.testing.assert_array_equal(np.concatenate([y for _, y in pieces]), whole[1])
    # Disjoint within an epoch: tag every example with its index as its label.
    (x_train, _), _ = sources.load_digits()
    tagged = dataclasses.replace(source, arrays=(x_train, np.arange(len(x_train))), num_classes=len(x_train))
    seen = []
    for i in range(num_shards):
        dataset, _ = data.train_pipeline(tagged, 64 // num_shards, (8, 8, 1), seed=5, shift_pixels=0,
                                         num_shards=num_shards, shard_index=i)
        seen.append([int(k) for _, y in batches(dataset, steps) for k in y.argmax(1)])
    everything = sum(seen, [])
    assert len(everything) == len(set(everything)) == steps * 64


@pytest.mark.parametrize("shift", [0, 1])
def test_digits_pipeline_shifts_by_at_most_shift_pixels(shift):
    (x_train, y_train), _ = sources.load_digits()
    padded = np.pad(x_train, ((0, 0), (1, 1), (1, 1), (0, 0)))
    allowed = [(dy, dx) for dy in range(1 - shift, 2 + shift) for dx in range(1 - shift, 2 + shift)]
    candidates = {
        (dy, dx): padded[:, dy:dy + 8, dx:dx + 8].reshape(len(x_train), -1) for dy, dx in allowed
    }
    train, _ = digits_train(64, 0, shift_pixels=shift)
    images, labels = next(iter(train))
    used = set()
    for image, label in zip(images.numpy().reshape(64, -1), labels.numpy().argmax(1)):
        matches = [
            key for key, flat in candidates.items()
            if np.any(np.all(flat[y_train == label] == image, axis=1))
        ]
        assert matches, "an image that is no allowed shift of a training image of its class"
        used.update(matches)
    if shift:
        assert len(used) > 1  # shifts do happen


def test_make_datasets_of_the_digits_config():
    config = config_lib.resolve(config_lib.load("digits"))
    datasets = data.make_datasets(config, 32)
    assert (datasets.steps_per_epoch, datasets.num_classes, datasets.image_shape) == (1437 // 32, 10, (8, 8, 1))
    images, labels = next(iter(datasets.train_fn(0)))
    assert images.shape == (32, 8, 8, 1) and labels.shape == (32, 10)
    # Resuming at step 3 gives the fourth batch of the stream.
    fourth = list(datasets.train_fn(0).take(4))[3][0].numpy()
    np.testing.assert_array_equal(next(iter(datasets.train_fn(3)))[0].numpy(), fourth)
    (x_test, y_test), = [sources.load_digits()[1]]
    evaluation = list(datasets.eval)
    assert len(evaluation) == 1  # eval_batch_size 512: the 360 images in one batch
    np.testing.assert_array_equal(evaluation[0][0].numpy(), x_test)  # no crop, no resize
    np.testing.assert_array_equal(evaluation[0][1].numpy().argmax(1), y_test)
    with pytest.raises(ValueError, match=r"never resized; the model takes \(16, 16, 1\)"):
        data.eval_pipeline(sources.digits_source("test"), 8, (16, 16, 1))
    with pytest.raises(ValueError, match="`batch_size` 2000 exceeds the 1437 training examples"):
        data.make_datasets(config, 2000)
    with pytest.raises(ValueError, match="colour ops need RGB images, and the digits.* has 1-channel images"):
        data.make_datasets(dict(config, randaugment_magnitude=9), 32)
    # MixUp and CutMix in the train step: the batch carries their draws.
    x, labels = next(iter(data.make_datasets(dict(config, mixup=0.2), 32).train_fn(0)))
    assert set(x) == {"images", "mix"} and x["mix"].shape == (32, 6) and labels.shape == (32, 10)


def test_every_pipeline_the_trainer_reads_runs_without_tf_data_autotuning(mock_cifar):
    """Deleting an autotuned iterator could wait up to a minute for tf.data's
    autotuning thread (`data.without_autotuning`), at the end of each `fit`,
    `evaluate` and `predict`; every map then runs one call per core."""
    cores = runtime.schedulable_cores()
    image, batch = augment.augmenters(randaugment_magnitude=9, mixup=0.2, mix_on="host")
    digits = data.make_datasets(config_lib.resolve(config_lib.load("digits")), 32)
    pipelines = {
        "digits train": digits.train_fn(5),
        "digits eval": digits.eval,
        "train": data.train_pipeline(mock_cifar, 4, SHAPE, image_augment=image, batch_augment=batch)[0],
        "eval": data.eval_pipeline(mock_cifar, 4, SHAPE),
        "eval padded for replicas": data.pad_batches(data.eval_pipeline(mock_cifar, 5, SHAPE), 2, multiple=True),
    }
    for name, dataset in pipelines.items():
        options = dataset.options().autotune
        assert (name, options.enabled, options.initial_parallelism) == (name, False, cores)


def test_representative_images_are_evaluation_images():
    config = config_lib.resolve(config_lib.load("digits"))
    images = data.representative_images(config, count=50)
    np.testing.assert_array_equal(images, sources.load_digits()[1][0][:50])


def test_one_set_of_sources_serves_two_resolutions():
    """As fine-tuning at 2x (Appendix C) does: the sources are listed once,
    and each config's datasets take its own image size."""
    with tfds.testing.mock_data(num_examples=24):
        base = config_lib.resolve(dict(dataset="cifar10", image_size=32, batch_size=8))
        sources_ = data.make_sources(base)
        twice = config_lib.resolve(dict(base, image_size=64))
        for config, side in ((base, 32), (twice, 64)):
            datasets = data.make_datasets(config, 8, sources=sources_)
            assert datasets.image_shape == (side, side, 3)
            assert next(iter(datasets.train_fn(0)))[0].shape == (8, side, side, 3)
            assert next(iter(datasets.eval))[0].shape[1:] == (side, side, 3)
