"""Batch augmentations of the paper's recipes: RandAugment, MixUp, CutMix.

`augmenters(...)` returns the two halves that `keras_mixer.data` runs in
`tf.data` on every Keras backend (Keras preprocessing layers switch to
TensorFlow ops inside tf.data): `image`, RandAugment on one image, run in
the parallel per-example map next to decoding and cropping, and `batch`,
`(images, labels, step) -> (images, labels)`, MixUp or CutMix on the
batch. `batch_augmenter(...)` chains the two on batches. Two
implementations sit behind the same functions, chosen by one flag:

- "keras_cv" (default): KerasCV 0.9 layers. Its RandAugment samples the ops
  per image and ran about 10x faster in tf.data than Keras core's here.
- "keras": Keras core layers (`keras.layers.RandAugment`, `MixUp`,
  `CutMix`), for when KerasCV, frozen upstream at 0.9.0, stops installing.

Crops and flips are not here: they are per-image and stateless, in
`keras_mixer.data`. Label smoothing is the loss' job
(`CategoricalCrossentropy(label_smoothing=...)`).

RandAugment magnitude: the paper (and big_vision's `randaug(2, m)`) uses
TF's AutoAugment levels, where 10 is the strongest level of each op's
range (`_MAX_LEVEL = 10`). KerasCV's `magnitude` and Keras' `factor` are in
[0, 1], 1 being the strongest range they define, so m maps to
`min(m / 10, 1)`. Their ranges stop at what level 10 does, so the paper's
m = 15 and m = 20 both run at the strongest setting; a warning says so.

The random draws of these layers come from the layers' own generators, so
unlike crops, flips and data order they are not replayed when a run
resumes: a resumed run continues with fresh draws. MixUp and CutMix in
the train step (`mix_on="device"`, the default) are the exception: their
draws (`mix_parameters`) are stateless in the seed and the step, and
replay.
"""

import collections
import logging

try:
    import tensorflow as tf
except ImportError as error:
    raise ImportError(
        "keras_mixer.augment builds tf.data pipelines and needs TensorFlow (on every Keras "
        "backend): pip install \"keras-mixer[train]\""
    ) from error

from keras_mixer import config as config_lib

IMPLEMENTATIONS = config_lib.AUGMENT_IMPLEMENTATIONS  # ("keras_cv", "keras")

MIX_ON = config_lib.MIX_ON  # ("device", "host")
Augmenters = collections.namedtuple("Augmenters", ["image", "batch"])


def randaugment_strength(magnitude):
    """Maps the paper's RandAugment magnitude (AutoAugment levels) to [0, 1]."""
    if magnitude < 0:
        raise ValueError(f"RandAugment magnitude must be >= 0, got {magnitude}.")
    if magnitude > 10:
        logging.warning(
            "RandAugment magnitude %s is above level 10, the strongest the "
            "Keras/KerasCV ranges define; it runs as 10.", magnitude,
        )
    return min(magnitude / 10.0, 1.0)


def _layers(implementation, randaugment_layers, randaugment_magnitude, mixup, cutmix, seed):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown augmentation implementation {implementation!r}. Valid: "
            f"{', '.join(IMPLEMENTATIONS)}."
        )
    randaugment_on = bool(randaugment_layers and randaugment_magnitude)
    if not (randaugment_on or mixup or cutmix):
        # Nothing to build: importing KerasCV (2 s) would only slow the
        # start of every run without these augmentations (digits, fine-tuning).
        return None, None, None
    if implementation == "keras_cv":
        try:
            import keras_cv
        except ImportError as error:
            raise ImportError(
                "augment_impl='keras_cv' needs KerasCV: pip install \"keras-mixer[train]\"; "
                "or set augment_impl='keras' for the Keras-core layers."
            ) from error
        randaugment = lambda: _one_shear_transform(keras_cv.layers.RandAugment(  # noqa: E731
            value_range=(0, 255), augmentations_per_image=randaugment_layers,
            magnitude=randaugment_strength(randaugment_magnitude), seed=seed,
        ))
        mix = lambda: keras_cv.layers.MixUp(alpha=mixup, seed=seed + 1)  # noqa: E731
        cut = lambda: keras_cv.layers.CutMix(alpha=cutmix, seed=seed + 2)  # noqa: E731
    else:
        import keras

        randaugment = lambda: _equalization_by_bincount(keras.layers.RandAugment(  # noqa: E731
            value_range=(0, 255), num_ops=randaugment_layers,
            factor=randaugment_strength(randaugment_magnitude), seed=seed,
        ))
        mix = lambda: keras.layers.MixUp(alpha=mixup, seed=seed + 1)  # noqa: E731
        cut = lambda: keras.layers.CutMix(factor=cutmix, seed=seed + 2)  # noqa: E731
    # The layers compute in float32 whatever the global dtype policy: the
    # pipeline's pixels are float32, and under mixed_bfloat16 (chosen by
    # mixed_precision) the RandAugment and CutMix sublayers that took the
    # policy mixed bfloat16 into float32 and failed.
    import keras

    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        return (
            randaugment() if randaugment_on else None,
            mix() if mixup else None,
            cut() if cutmix else None,
        )
    finally:
        keras.config.set_dtype_policy(policy)


def _one_shear_transform(randaugment):
    """Drops the zero shear that KerasCV's RandAugment shears also apply.

    Its shear_x op is `RandomShear(x_factor=..., y_factor=0)`, which warps
    every image twice: by the sampled x shear, then by a y shear of exactly
    0, the identity. A warp was the costliest op in the pipeline (a
    bilinear, reflecting `ImageProjectiveTransformV3` of the whole image),
    so this halved the cost of two of RandAugment's ten ops. An identity
    warp samples every pixel at its own integer position, so leaving it
    out changes no pixel (tests/test_augment.py checks that).
    """
    import keras_cv

    for layer in randaugment.layers:
        if isinstance(layer, keras_cv.layers.RandomShear):
            for name in ("x_factor", "y_factor"):
                factor = getattr(layer, name)
                if isinstance(factor, keras_cv.core.ConstantFactorSampler) and factor.value == 0:
                    setattr(layer, name, None)
    return randaugment


def _equalization_by_bincount(randaugment):
    """Gives Keras' RandAugment an Equalization that counts by bincount in tf.data.

    Keras 3.13-3.15's `Equalization` picks its histogram by the global
    Keras backend, not by the one it runs on: under JAX it counts each of
    the 256 bins with its own ops, as jit needs, even inside tf.data, where
    the layer runs on TensorFlow. That made a graph of 46,000 ops, traced
    for 25 s before a pipeline's first batch, and run for every image
    (Keras' RandAugment computes all its ops and selects): 22 against 34
    images/s at 224 (benchmarks/input_pipeline.py --keras_own_equalization,
    JAX). TensorFlow has a bincount; this asks the backend the layer runs
    on, and counts the same pixels (tests/test_augment.py).
    """
    import keras

    class Equalization(keras.layers.Equalization):
        def _custom_histogram_fixed_width(self, values, value_range, nbins):
            if self.backend.name != "tensorflow":
                return super()._custom_histogram_fixed_width(values, value_range, nbins)
            low, high = (float(v) for v in value_range)
            bins = tf.cast((tf.cast(values, tf.float32) - low) * (nbins - 1) / (high - low), tf.int32)
            bins = tf.reshape(tf.clip_by_value(bins, 0, nbins - 1), [-1])
            return tf.math.bincount(bins, minlength=nbins, maxlength=nbins, dtype=tf.int32)

    old = randaugment.equalization
    randaugment.equalization = Equalization(value_range=old.value_range, data_format=old.data_format)
    return randaugment


def _cutmix_exact_areas(layer, images, labels):
    """Runs a CutMix layer and relabels by the areas actually pasted.

    KerasCV 0.9 and Keras 3.15 both weigh labels by the sampled box before
    it is clipped to the image, so a box near a border gets up to twice the
    label weight of the pixels it pasted (up to 0.09 off per label in
    tests/test_augment.py). An extra channel holding each image's batch
    index travels through the layer and tells, per pixel, which image it
    came from; labels become those pixel shares, as in the reference
    CutMix code's "corrected lambda".
    """
    batch = tf.shape(images)[0]
    index = tf.cast(tf.range(batch), images.dtype)[:, None, None, None]
    marker = tf.broadcast_to(index, tf.concat([tf.shape(images)[:-1], [1]], 0))
    out = layer({"images": tf.concat([images, marker], -1), "labels": labels})
    mixed = tf.cast(out["images"], tf.float32)
    origin = tf.cast(tf.round(mixed[..., -1]), tf.int32)
    # Pixel counts per (image, origin) pair: a one-hot of every pixel's
    # origin would be batch^2 * H * W floats (200 MB at batch 32, 224^2).
    pairs = origin + batch * tf.range(batch)[:, None, None]
    counts = tf.math.bincount(tf.reshape(pairs, [-1]), minlength=batch * batch,
                              maxlength=batch * batch, dtype=tf.float32)
    pixels = tf.cast(tf.shape(origin)[1] * tf.shape(origin)[2], tf.float32)
    shares = tf.reshape(counts, [batch, batch]) / pixels
    return mixed[..., :-1], tf.matmul(shares, tf.cast(labels, tf.float32))


def _beta(shape, alpha, seed):
    """Stateless Beta(alpha, alpha) draws, as the ratio of two Gamma draws."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    first = tf.random.stateless_gamma(shape, seeds[0], alpha=alpha)
    total = first + tf.random.stateless_gamma(shape, seeds[1], alpha=alpha)
    # Both draws can underflow to 0 at a small alpha: 0, not NaN, then.
    return first / tf.maximum(total, 1e-30)


def _pixels_inside(begin, end, size):
    """How many of the integers 0..size-1 lie in [begin, end)."""
    size = tf.cast(size, tf.float32)
    return tf.clip_by_value(tf.math.ceil(end), 0.0, size) - tf.clip_by_value(tf.math.ceil(begin), 0.0, size)


def mix_parameters(batch_size, image_size, step, mixup=0.0, cutmix=0.0, seed=0):
    """The MixUp or CutMix of batch `step`, as rows for `keras_mixer.mixing.mix`.

    The draws are KerasCV's: per image, lambda ~ Beta(mixup, mixup) for
    MixUp; for CutMix, lambda ~ Beta(cutmix, cutmix), a box of sides
    sqrt(1 - lambda) times the image's, centred uniformly on the image,
    its pixels those whose row and column indices fall inside it. The
    label weight of CutMix is the share of pixels the box leaves, after
    clipping to the image (KerasCV weighs by the unclipped box; see
    `_cutmix_exact_areas`). With both on, a coin flip per batch picks one.
    Stateless in (`seed`, `step`), so a resumed run draws the same.

    Returns:
        float32 (batch_size, 6), laid out as `keras_mixer.mixing.PARAMETERS`.
    """
    height, width = image_size
    seeds = tf.random.experimental.stateless_split(
        tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)]), 4)
    shape = [batch_size]
    empty = tf.zeros(shape)

    def mixup_rows():
        weight = _beta(shape, mixup, seeds[0])
        return tf.stack([weight, weight, empty, empty, empty, empty], axis=1)

    def cutmix_rows():
        side = tf.sqrt(1.0 - _beta(shape, cutmix, seeds[1]))
        centre = tf.random.stateless_uniform([2, batch_size], seeds[2])
        rows, cols = side * height, side * width
        top, left = centre[0] * height - rows / 2, centre[1] * width - cols / 2
        bottom, right = top + rows, left + cols
        pasted = _pixels_inside(top, bottom, height) * _pixels_inside(left, right, width)
        own = 1.0 - pasted / float(height * width)
        return tf.stack([tf.ones(shape), own, top, bottom, left, right], axis=1)

    if mixup and cutmix:
        coin = tf.random.stateless_uniform([], seeds[3])
        return tf.cond(coin < 0.5, mixup_rows, cutmix_rows)
    return mixup_rows() if mixup else cutmix_rows()


def _device_mixer(mixup, cutmix, seed):
    from keras_mixer import mixing

    def batch(images, labels, step):
        images = tf.cast(images, tf.float32)
        size = images.shape[1:3] if None not in images.shape[1:3] else tf.shape(images)[1:3]
        parameters = mix_parameters(tf.shape(images)[0], size, step, mixup, cutmix, seed)
        return {mixing.IMAGES: images, mixing.MIX: parameters}, tf.cast(labels, tf.float32)

    return batch


def augmenters(randaugment_layers=2, randaugment_magnitude=0, mixup=0.0,
               cutmix=0.0, implementation="keras_cv", seed=0, mix_on="host"):
    """Returns `Augmenters(image, batch)`: per-image RandAugment, batch mixing.

    Images are float pixels in [0, 255] and labels one-hot (or soft)
    vectors. `image(images)` runs RandAugment on one image (or, as Keras
    layers do, on each image of a batch) and keeps [0, 255]. `batch(images,
    labels, step)` runs MixUp or CutMix on a batch; with both on, each batch
    uses one of them, chosen by a coin flip seeded by `step` (as timm
    does), so labels stay a mix of two images. Either is None when off.

    RandAugment runs per image because in the parallel per-example map
    both cores share its work image by image, where a map over batches
    loops over a batch's images on one core (1.2x the images/s in
    benchmarks/input_pipeline.py).

    Args:
        randaugment_layers: int, ops applied per image (the paper: 2).
        randaugment_magnitude: float, the paper's m (0 turns it off).
        mixup: float, the Beta(p, p) parameter of MixUp (0 turns it off).
        cutmix: float, the Beta parameter of CutMix's area (0 turns it off).
        implementation: "keras_cv" or "keras".
        seed: int.
        mix_on: "host": KerasCV's (or Keras') MixUp and CutMix layers mix
            the batch in tf.data. "device": `batch` only draws the mixing
            (`mix_parameters`) and returns `({"images": images, "mix":
            parameters}, labels)`, which `MLPMixer`'s train step mixes on
            the accelerator (`keras_mixer.mixing`).
    """
    for name, value in (("mixup", mixup), ("cutmix", cutmix)):
        if value < 0:
            raise ValueError(f"`{name}` must be >= 0, got {value}.")
    if mix_on not in MIX_ON:
        raise ValueError(f"Unknown `mix_on` {mix_on!r}. Valid: {', '.join(MIX_ON)}.")
    if mix_on == "device" and (mixup or cutmix):
        image = augmenters(randaugment_layers, randaugment_magnitude,
                           implementation=implementation, seed=seed).image
        return Augmenters(image, _device_mixer(mixup, cutmix, seed))
    randaugment, mix, cut = _layers(
        implementation, int(randaugment_layers), randaugment_magnitude, mixup, cutmix, seed
    )
    image = None
    if randaugment is not None:
        def image(images):
            images = tf.cast(randaugment(tf.cast(images, tf.float32)), tf.float32)
            # Some ops overshoot slightly (bicubic, sharpness); keep [0, 255].
            return tf.clip_by_value(images, 0.0, 255.0)

    def mix_with(layer, images, labels):
        if layer is cut:
            return _cutmix_exact_areas(layer, images, labels)
        out = layer({"images": images, "labels": labels})
        return tf.cast(out["images"], tf.float32), tf.cast(out["labels"], tf.float32)

    def batch(images, labels, step):
        images = tf.cast(images, tf.float32)
        if mix is not None and cut is not None:
            coin = tf.random.stateless_uniform([], seed=tf.stack([tf.cast(seed, tf.int64), step]))
            return tf.cond(
                coin < 0.5,
                lambda: mix_with(mix, images, labels),
                lambda: mix_with(cut, images, labels),
            )
        return mix_with(mix if mix is not None else cut, images, labels)

    return Augmenters(image, batch if mix is not None or cut is not None else None)


def batch_augmenter(randaugment_layers=2, randaugment_magnitude=0, mixup=0.0,
                    cutmix=0.0, implementation="keras_cv", seed=0):
    """Returns `augment(images, labels, step)` on batches, or None if all are off.

    RandAugment on each image, then MixUp or CutMix (see `augmenters`, whose
    arguments these are), in one function for a `tf.data` map over batches.
    """
    image, batch = augmenters(randaugment_layers, randaugment_magnitude, mixup, cutmix,
                              implementation, seed)
    if image is None and batch is None:
        return None

    def augment(images, labels, step):
        images = tf.cast(images, tf.float32) if image is None else image(images)
        return (images, labels) if batch is None else batch(images, tf.cast(labels, tf.float32), step)

    return augment
