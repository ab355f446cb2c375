"""MixUp and CutMix of a batch, on the accelerator inside the train step.

The paper's pretraining recipes mix pairs of images and their labels
(MixUp, CutMix). Mixing a batch on the host costs more CPU time than the
crop, flip and decode before it (benchmarks/input_pipeline.py), and the
host's cores are what bounds pretraining on a TPU VM; on the accelerator
it is a few elementwise passes over the batch, next to a forward and
backward pass of the model. So, as big_vision and timm do, the input
pipeline only draws the random numbers of each batch (`keras_mixer.augment
.mix_parameters`, stateless in the step, so a resumed run replays them)
and sends them beside the images, as `({"images": ..., "mix": ...},
labels)`; `MLPMixer.train_step` calls `mix_batch` on that batch before
Keras' own step. This module is `keras.ops` only, so it runs on every
backend, inside `jit` and `tf.function`.

Each image is mixed with the one before it in the batch (`roll` by one,
as big_vision does): the pipeline shuffles, so that is a random other
image, and on several replicas or hosts every replica's batch is mixed
within itself or, on JAX's global batch, with one image of a neighbour.
Labels are mixed here too, beside the images, so a pair never straddles
two replicas' batches with its label mixed elsewhere.

`mix` holds one row per image, `PARAMETERS` wide: the weight of the
image itself in its pixels (MixUp's lambda; 1 for CutMix), the weight of
its own label (lambda, or CutMix's exact unpasted area), and the pasted
box's rows [top, bottom) and columns [left, right), empty for MixUp.
"""

import keras
from keras import ops

PARAMETERS = ("image_weight", "label_weight", "top", "bottom", "left", "right")
IMAGES = "images"
MIX = "mix"


def mix(images, labels, parameters):
    """Mixes each image and label with the one before it in the batch.

    Args:
        images: (batch, height, width, channels) pixels.
        labels: (batch, classes) one-hot or soft labels.
        parameters: (batch, 6) rows laid out as `PARAMETERS`.

    Returns:
        `(images, labels)`, mixed, in the dtypes they came in.
    """
    parameters = ops.cast(parameters, "float32")
    partner = ops.roll(images, 1, axis=0)
    weight = ops.cast(parameters[:, 0, None, None, None], images.dtype)
    blended = weight * images + (1 - weight) * partner
    height, width = ops.shape(images)[1], ops.shape(images)[2]
    rows = ops.cast(ops.arange(height), "float32")[None, :, None]
    cols = ops.cast(ops.arange(width), "float32")[None, None, :]
    top, bottom, left, right = (parameters[:, i, None, None] for i in range(2, 6))
    pasted = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    images = ops.where(pasted[..., None], partner, blended)
    own = ops.cast(parameters[:, 1, None], labels.dtype)
    labels = own * labels + (1 - own) * ops.roll(labels, 1, axis=0)
    return images, labels


def is_mixing_input(x):
    """Whether `x` is the `{"images": ..., "mix": ...}` of a batch to mix."""
    return isinstance(x, dict) and set(x) == {IMAGES, MIX}


def mix_batch(data):
    """A `fit` batch with its mixing applied; other batches unchanged.

    `data` is what Keras hands `train_step`: `(x, y)` or `(x, y,
    sample_weight)`. Where `x` is `{"images": ..., "mix": ...}` (from
    `keras_mixer.data` with `mix_on="device"`), returns `(images, labels[,
    sample_weight])` mixed; anything else comes back as it is.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    if not is_mixing_input(x):
        return data
    images, labels = mix(x[IMAGES], y, x[MIX])
    return keras.utils.pack_x_y_sample_weight(images, labels, sample_weight)
