"""Datasets as `tf.data` pipelines. For now: the embedded digits set.

scikit-learn ships the UCI handwritten digits (1,797 8x8 grey images, 10
classes) inside its wheel, so this needs no download and is the default
dataset of `train.py`. Pixels are scaled from the set's 0..16 to [0, 255],
the range `MLPMixer(include_preprocessing=True)` expects.
"""

import numpy as np
import tensorflow as tf

DIGITS_IMAGE_SHAPE = (8, 8, 1)
DIGITS_NUM_CLASSES = 10


def load_digits(test_fraction=0.2, split_seed=0):
    """Returns `((x_train, y_train), (x_test, y_test))` of the digits set.

    The split is stratified and fixed by `split_seed`, so test accuracies
    are comparable across runs and backends.

    Args:
        test_fraction: float in (0, 1), the share of images held out.
        split_seed: int, the seed of the split.

    Example:
    >>> (x_train, y_train), (x_test, y_test) = load_digits()
    >>> x_train.shape, x_test.shape
    ((1437, 8, 8, 1), (360, 8, 8, 1))
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
    digits = sklearn_digits()
    images = (digits.images[..., None] * (255.0 / 16.0)).astype("float32")
    labels = digits.target.astype("int32")
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels,
        random_state=split_seed,
    )
    return (x_train, y_train), (x_test, y_test)


def digits_datasets(batch_size, seed=0, shift_pixels=1, test_fraction=0.2):
    """Returns `(train_ds, test_ds, steps_per_epoch)` for the digits set.

    Training repeats forever, shuffles, shifts each image by up to
    `shift_pixels` in each direction (zero padding, then a random crop:
    the translation augmentation that suits 8x8 digits), batches with
    `drop_remainder=True` and prefetches. Labels are one-hot float32
    vectors (what label smoothing, MixUp and CutMix work on).
    With a given `seed` the order and the shifts are deterministic.

    Args:
        batch_size: int, the global batch size.
        seed: int, the seed of shuffling and augmentation.
        shift_pixels: int >= 0, the largest random shift; 0 disables it.
        test_fraction: float, the held-out share (see `load_digits`).
    """
    (x_train, y_train), (x_test, y_test) = load_digits(test_fraction)
    if not 0 < batch_size <= len(x_train):
        raise ValueError(
            f"`batch_size` must be in [1, {len(x_train)}] for the digits "
            f"training split, got {batch_size}."
        )
    height, width, _ = DIGITS_IMAGE_SHAPE
    pad = int(shift_pixels)

    def shift(seeds, image, label):
        if pad:
            image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
            image = tf.image.stateless_random_crop(
                image, DIGITS_IMAGE_SHAPE, seed=seeds
            )
        return image, tf.one_hot(label, DIGITS_NUM_CLASSES)

    train = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    train = train.shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
    train = train.repeat()
    # One stateless seed pair per element keeps augmentation reproducible.
    element_seeds = tf.data.Dataset.random(seed=seed).batch(2)
    train = tf.data.Dataset.zip((element_seeds, train))
    train = train.map(
        lambda s, xy: shift(s, *xy), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    train = train.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    test = tf.data.Dataset.from_tensor_slices(
        (x_test, tf.one_hot(y_test, DIGITS_NUM_CLASSES))
    )
    test = test.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return train, test, len(x_train) // batch_size
