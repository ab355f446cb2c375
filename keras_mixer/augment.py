"""Batch augmentations of the paper's recipes: RandAugment, MixUp, CutMix.

`batch_augmenter(...)` returns one function `(images, labels, step) ->
(images, labels)` that runs inside a `tf.data` map on every Keras backend
(Keras preprocessing layers switch to TensorFlow ops inside tf.data).
Two implementations sit behind the same function, chosen by one flag:

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
resumes: a resumed run continues with fresh draws.
"""

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
    if implementation == "keras_cv":
        try:
            import keras_cv
        except ImportError as error:
            raise ImportError(
                "augment_impl='keras_cv' needs KerasCV: pip install \"keras-mixer[train]\"; "
                "or set augment_impl='keras' for the Keras-core layers."
            ) from error
        randaugment = lambda: keras_cv.layers.RandAugment(  # noqa: E731
            value_range=(0, 255), augmentations_per_image=randaugment_layers,
            magnitude=randaugment_strength(randaugment_magnitude), seed=seed,
        )
        mix = lambda: keras_cv.layers.MixUp(alpha=mixup, seed=seed + 1)  # noqa: E731
        cut = lambda: keras_cv.layers.CutMix(alpha=cutmix, seed=seed + 2)  # noqa: E731
    elif implementation == "keras":
        import keras

        randaugment = lambda: keras.layers.RandAugment(  # noqa: E731
            value_range=(0, 255), num_ops=randaugment_layers,
            factor=randaugment_strength(randaugment_magnitude), seed=seed,
        )
        mix = lambda: keras.layers.MixUp(alpha=mixup, seed=seed + 1)  # noqa: E731
        cut = lambda: keras.layers.CutMix(factor=cutmix, seed=seed + 2)  # noqa: E731
    else:
        raise ValueError(
            f"Unknown augmentation implementation {implementation!r}. Valid: "
            f"{', '.join(IMPLEMENTATIONS)}."
        )
    return (
        randaugment() if randaugment_layers and randaugment_magnitude else None,
        mix() if mixup else None,
        cut() if cutmix else None,
    )


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
    shares = tf.reduce_mean(tf.one_hot(origin, batch), axis=[1, 2])
    return mixed[..., :-1], tf.matmul(shares, tf.cast(labels, tf.float32))


def batch_augmenter(randaugment_layers=2, randaugment_magnitude=0, mixup=0.0,
                    cutmix=0.0, implementation="keras_cv", seed=0):
    """Returns `augment(images, labels, step)` for `tf.data`, or None if all are off.

    Images are float batches in [0, 255] and labels one-hot (or soft)
    vectors. RandAugment comes first, then MixUp or CutMix. With both on,
    each batch uses one of them, chosen by a coin flip seeded by `step` (as
    timm does), so labels stay a mix of two images.

    Args:
        randaugment_layers: int, ops applied per image (the paper: 2).
        randaugment_magnitude: float, the paper's m (0 turns it off).
        mixup: float, the Beta(p, p) parameter of MixUp (0 turns it off).
        cutmix: float, the Beta parameter of CutMix's area (0 turns it off).
        implementation: "keras_cv" or "keras".
        seed: int.
    """
    for name, value in (("mixup", mixup), ("cutmix", cutmix)):
        if value < 0:
            raise ValueError(f"`{name}` must be >= 0, got {value}.")
    randaugment, mix, cut = _layers(
        implementation, int(randaugment_layers), randaugment_magnitude, mixup, cutmix, seed
    )
    if randaugment is None and mix is None and cut is None:
        return None

    def mix_with(layer, images, labels):
        if layer is cut:
            return _cutmix_exact_areas(layer, images, labels)
        out = layer({"images": images, "labels": labels})
        return tf.cast(out["images"], tf.float32), tf.cast(out["labels"], tf.float32)

    def augment(images, labels, step):
        images = tf.cast(images, tf.float32)
        if randaugment is not None:
            images = tf.cast(randaugment(images), tf.float32)
            # Some ops overshoot slightly (bicubic, sharpness); keep [0, 255].
            images = tf.clip_by_value(images, 0.0, 255.0)
        if mix is not None and cut is not None:
            coin = tf.random.stateless_uniform([], seed=tf.stack([tf.cast(seed, tf.int64), step]))
            images, labels = tf.cond(
                coin < 0.5,
                lambda: mix_with(mix, images, labels),
                lambda: mix_with(cut, images, labels),
            )
        elif mix is not None:
            images, labels = mix_with(mix, images, labels)
        elif cut is not None:
            images, labels = mix_with(cut, images, labels)
        return images, labels

    return augment
