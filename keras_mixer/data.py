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


def _shifted_copies(images, pad):
    """All (2 * pad + 1)^2 zero-padded shifts of `images`: (variants, N, H, W, C)."""
    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return np.stack([
        padded[:, dy:dy + height, dx:dx + width]
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
    ])


def digits_datasets(batch_size, seed=0, shift_pixels=1, test_fraction=0.2):
    """Returns `(train_ds, test_ds, steps_per_epoch)` for the digits set.

    Training shuffles, repeats forever, batches with `drop_remainder=True`,
    shifts each image by up to `shift_pixels` in each direction (zero
    padding: the translation augmentation that suits 8x8 digits) and
    prefetches. Labels are one-hot float32 vectors (what label smoothing,
    MixUp and CutMix work on). With a given `seed` the order and the shifts
    are deterministic. The test set comes in batches of up to 512, which
    keeps per-epoch validation cheap.

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
    # 8x8 images allow only (2 * shift_pixels + 1)^2 shifts: precompute them
    # all and gather one per image per batch. A per-image map costs more
    # than a training step on 2 cores.
    variants = _shifted_copies(x_train, int(shift_pixels))
    num_variants, num_train = variants.shape[:2]
    images = tf.constant(variants.reshape((-1,) + DIGITS_IMAGE_SHAPE))
    labels = tf.one_hot(y_train, DIGITS_NUM_CLASSES)

    def gather(seeds, index):
        variant = tf.random.stateless_uniform(
            [batch_size], seed=seeds, maxval=num_variants, dtype=tf.int64
        )
        return tf.gather(images, variant * num_train + index), tf.gather(labels, index)

    indices = tf.data.Dataset.range(num_train)
    indices = indices.shuffle(num_train, seed=seed, reshuffle_each_iteration=True)
    indices = indices.repeat().batch(batch_size, drop_remainder=True)
    # One stateless seed pair per batch keeps augmentation reproducible.
    batch_seeds = tf.data.Dataset.random(seed=seed).batch(2)
    train = tf.data.Dataset.zip((batch_seeds, indices))
    train = train.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    train = train.prefetch(tf.data.AUTOTUNE)
    test = tf.data.Dataset.from_tensor_slices(
        (x_test, tf.one_hot(y_test, DIGITS_NUM_CLASSES))
    )
    test = test.batch(512).prefetch(tf.data.AUTOTUNE)
    return train, test, len(x_train) // batch_size
