"""Input pipelines: a config's `Source`s (`keras_mixer.sources`) as `tf.data` batches.

Pipelines decode, crop, augment and batch; pixels stay in [0, 255]:
`MLPMixer` rescales them itself, so exported models take raw pixels too.
`make_datasets` is what the trainer calls: the training stream from any
step, the evaluation set split for the replicas, and the data's shape.

Training pipelines are a pure function of `(seed, start_step)`: each epoch
is shuffled with its own seed, and every crop and flip uses a stateless
seed made from the seed, the epoch and the example's position. A run that
resumes at step `s` builds the pipeline with `start_step=s` and sees exactly
the batches an uninterrupted run would have seen from step `s` on.
"""

import contextlib
import dataclasses
import math

import numpy as np

try:
    import tensorflow as tf
except ImportError as error:
    raise ImportError(
        "keras_mixer.data builds tf.data pipelines and needs TensorFlow (on every Keras "
        "backend): pip install \"keras-mixer[train]\""
    ) from error

from keras_mixer import augment as augment_lib
from keras_mixer import config as config_lib
from keras_mixer import runtime
from keras_mixer import sources as sources_lib

EVAL_CROPS = config_lib.EVAL_CROPS
# The paper evaluates on a 224 crop of a 256 resize; other sizes keep the ratio.
CENTER_CROP_FRACTION = 224 / 256


def without_autotuning(dataset):
    """`dataset` with tf.data's autotuning off: every `AUTOTUNE` map runs one
    call per schedulable core, and `prefetch(AUTOTUNE)` sizes its buffer by
    its own rule, as it does either way.

    Why: deleting an autotuned iterator can wait for tf.data's autotuning
    thread. The cancellation wakes that thread before it counts as
    cancelled, so the thread sleeps out the rest of its optimization
    period, which doubles up to 60 s (TensorFlow 2.21). Keras deletes its
    iterator at the end of every `fit`, `evaluate` and `predict` over a
    dataset, so these calls could end with a pause of up to a minute:
    `train.py` sat 13-32 s after its last epoch in 8 of 17 runs of one
    small config on PyTorch, and up to 39 s on JAX. Without autotuning
    there is no such thread: in `benchmarks/iterator_teardown.py` 7 of 15
    deletions stalled with it and none without, at the same images/s
    (docs/benchmarks.md).

    tf.data starts an autotuned map at `min(16, cores)` calls;
    `initial_parallelism` set to the core count makes that every core, which
    a many-core TPU host needs.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    options.autotune.initial_parallelism = runtime.schedulable_cores()
    return dataset.with_options(options)


def _shifted_copies(images, pad):
    """All (2 * pad + 1)^2 zero-padded shifts of `images`: (variants, N, H, W, C)."""
    height, width = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return np.stack([
        padded[:, dy:dy + height, dx:dx + width]
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
    ])


def _array_train_pipeline(source, batch_size, seed, start_step, shift_pixels, num_shards=1, shard_index=0):
    """The training stream of an in-memory source (the digits): shuffled,
    endless, each image shifted by up to `shift_pixels` in each direction
    (zero padding: the translation augmentation that suits 8x8 digits).

    On several hosts (`num_shards`), `batch_size` is this host's part: the
    global batch of `batch_size * num_shards` examples is drawn, shifts
    included, exactly as one host would draw it, and host `shard_index`
    takes its consecutive slice. So every global batch holds the same
    examples, augmented the same, whatever the number of hosts (JAX's
    data-parallel input joins the hosts' slices in process order), and no
    example of a batch is read by two hosts.
    """
    x_train, y_train = source.arrays
    global_batch = batch_size * num_shards
    if not 0 < global_batch <= len(x_train):
        raise ValueError(
            f"`batch_size` must be in [1, {len(x_train)}] for {source.description}, "
            f"got {global_batch}."
        )
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"`shard_index` must be in [0, {num_shards}), got {shard_index}.")
    # Small images allow only (2 * shift_pixels + 1)^2 shifts: precompute
    # them all and gather one per image per batch. A per-image map costs
    # more than a training step on 2 cores.
    variants = _shifted_copies(x_train, int(shift_pixels))
    num_variants, num_train = variants.shape[:2]
    images = tf.constant(variants.reshape((-1,) + tuple(source.image_shape)))
    labels = tf.one_hot(y_train, source.num_classes)
    begin = shard_index * batch_size

    def gather(seeds, index):
        variant = tf.random.stateless_uniform(
            [global_batch], seed=seeds, maxval=num_variants, dtype=tf.int64
        )
        variant, index = variant[begin:begin + batch_size], index[begin:begin + batch_size]
        return tf.gather(images, variant * num_train + index), tf.gather(labels, index)

    indices = tf.data.Dataset.range(num_train)
    indices = indices.shuffle(num_train, seed=seed, reshuffle_each_iteration=True)
    indices = indices.repeat().batch(global_batch, drop_remainder=True)
    # One stateless seed pair per batch keeps augmentation reproducible.
    batch_seeds = tf.data.Dataset.random(seed=seed).batch(2)
    train = tf.data.Dataset.zip((batch_seeds, indices))
    # Skipping index batches is cheap: nothing is gathered for them.
    train = train.skip(start_step)
    return train.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# --- Preprocessing -------------------------------------------------------------


def inception_crop(image, size, seed, area_range=(0.05, 1.0), flip=True):
    """Random crop of `area_range` of the image (aspect 3/4..4/3), resized to `size`.

    The Inception-style crop of the official input pipeline (area 5% to
    100% by default), then a random horizontal flip. Stateless: the same
    `seed` (a shape-[2] int tensor) gives the same crop.

    Returns float32 pixels in the input's range.
    """
    seeds = tf.random.experimental.stateless_split(seed, 2)
    begin, crop_size = _crop_window(tf.shape(image), seeds[0], area_range)
    return _resize_and_flip(tf.slice(image, begin, crop_size), size, seeds[1], flip)


def decode_and_inception_crop(encoded, channels, size, seed, area_range=(0.05, 1.0), flip=True):
    """`inception_crop(decode(encoded), ...)`, decoding only the crop of a JPEG.

    The crop window is drawn from the JPEG's header, with the seed
    `inception_crop` uses, and `tf.image.decode_and_crop_jpeg` decodes
    just that window: the same pixels, for a fraction of the decoding
    (on average about half of the image, at the default `area_range`), as
    big_vision's `decode_jpeg_and_inception_crop` does. Other formats are
    decoded whole, then cropped.
    """
    seeds = tf.random.experimental.stateless_split(seed, 2)

    def jpeg():
        begin, crop_size = _crop_window(tf.image.extract_jpeg_shape(encoded), seeds[0], area_range)
        window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=channels)

    def other():
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        begin, crop_size = _crop_window(tf.shape(image), seeds[0], area_range)
        return tf.slice(image, begin, crop_size)

    return _resize_and_flip(tf.cond(tf.io.is_jpeg(encoded), jpeg, other), size, seeds[1], flip)


def _crop_window(shape, seed, area_range):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=seed, area_range=area_range, aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0, use_image_if_no_bounding_boxes=True,
    )
    return begin, crop_size


def _resize_and_flip(image, size, seed, flip):
    image = tf.image.resize(image, size, method="bilinear", antialias=False)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed)
    return tf.cast(image, tf.float32)


def _center_crop(image, size):
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    top = (height - size[0]) // 2
    left = (width - size[1]) // 2
    return image[top:top + size[0], left:left + size[1]]


def center_crop(image, size, method="resize-crop", crop_fraction=CENTER_CROP_FRACTION):
    """The paper's evaluation crops, deterministic.

    "resize-crop" resizes the whole image to `size / crop_fraction` (256 for
    a 224 target), then takes the central `size`. "resmall-crop" resizes
    the shorter side to that size, keeping the aspect ratio, then takes the
    central `size`.
    """
    if method not in EVAL_CROPS:
        raise ValueError(f"Unknown eval crop {method!r}. Valid: {', '.join(EVAL_CROPS)}.")
    height, width = size
    if method == "resize-crop":
        target = (round(height / crop_fraction), round(width / crop_fraction))
    else:
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = tf.maximum(height / shape[0], width / shape[1]) / crop_fraction
        target = tf.cast(tf.math.ceil(shape * scale), tf.int32)
        target = tf.maximum(target, [height, width])
    image = tf.image.resize(image, target, method="bilinear", antialias=True)
    image = _center_crop(image, size)
    return tf.ensure_shape(tf.cast(image, tf.float32), [height, width, None])


# --- Pipelines -----------------------------------------------------------------


def _shard(dataset, num_examples, num_shards, shard_index):
    if num_shards == 1:
        return dataset, num_examples
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"`shard_index` must be in [0, {num_shards}), got {shard_index}.")
    # Every host gets floor(N / num_shards) examples so that all hosts run
    # the same number of steps.
    per_shard = num_examples // num_shards
    return dataset.shard(num_shards, shard_index).take(per_shard), per_shard


def train_pipeline(source, batch_size, image_shape, seed=0, start_step=0,
                   crop_area=(0.05, 1.0), flip=True, image_augment=None, batch_augment=None,
                   num_shards=1, shard_index=0, shuffle_buffer=50_000, shift_pixels=1):
    """The training `tf.data.Dataset` of `source`: endless, deterministic, resumable.

    Per host (`num_shards` hosts; this is `shard_index`): shard, then for
    each epoch shuffle with that epoch's seed (a uniform permutation within
    each block of `shuffle_buffer` examples; tfds writes its records in
    shuffled order already), skip to `start_step`, decode,
    Inception-crop, flip and `image_augment` (RandAugment) in parallel,
    one-hot the labels, batch with `drop_remainder=True`, apply
    `batch_augment(images, labels, step)` (MixUp, CutMix: see
    `keras_mixer.augment`) and prefetch.

    Args:
        source: a `Source`.
        batch_size: int, the batch size of this host.
        image_shape: (height, width, channels) of the model's input.
        seed: int, the seed of the order, crops and flips.
        start_step: int, the first batch to produce (resuming).
        crop_area: (min, max) fraction of the image area a crop keeps.
        flip: bool, random horizontal flips.
        image_augment: callable on an image (or on each image of a batch,
            for an in-memory source), or None.
        batch_augment: callable on batches or None.
        num_shards, shard_index: the per-host sharding hook (e.g. from
            `tf.distribute.InputContext`).
        shuffle_buffer: int, the shuffle buffer (capped at the shard size).
        shift_pixels: int >= 0, for an in-memory source of fixed-size images
            (the digits), which is neither cropped nor flipped: the largest
            random shift (zero padding); 0 disables it.

    Returns:
        `(dataset, steps_per_epoch)`.
    """
    if source.arrays is not None:
        _check_fixed_shape(source, image_shape)
        stream = _array_train_pipeline(source, batch_size, seed, start_step, shift_pixels,
                                       num_shards, shard_index)
        if image_augment is not None:
            stream = stream.map(lambda images, labels: (image_augment(images), labels),
                                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return _finish(stream, batch_augment, start_step), source.num_examples // (batch_size * num_shards)
    dataset, num_examples = _shard(source.dataset, source.num_examples, num_shards, shard_index)
    if batch_size > num_examples:
        raise ValueError(
            f"`batch_size` {batch_size} exceeds the {num_examples} training "
            f"examples of {source.description} (per host)."
        )
    height, width, channels = image_shape
    num_classes = source.num_classes
    buffer = min(shuffle_buffer, num_examples)
    first_epoch, offset = divmod(start_step * batch_size, num_examples)

    def permute(index, block_index, block):
        # A stateless permutation keyed by (seed, epoch, block). tf.data's
        # `shuffle` needs a Python seed and keeps its state in the iterator,
        # so a resumed run could not replay epoch `index` without reading
        # all the epochs before it.
        keys = tf.random.stateless_uniform(
            tf.shape(block[1])[:1],
            seed=tf.stack([tf.cast(seed, tf.int64), index * 1_000_003 + block_index]),
        )
        order = tf.argsort(keys)
        return tuple(tf.gather(part, order) for part in block)

    def epoch(index):
        blocks = dataset.batch(buffer).enumerate()
        shuffled = blocks.map(lambda b, block: permute(index, b, block)).unbatch()
        return shuffled.enumerate().map(lambda i, ex: (index, i, ex))

    def preprocess(epoch_index, position, example):
        raw, label = example
        element_seed = tf.stack([tf.cast(seed, tf.int64), epoch_index * num_examples + position])
        if source.read is not None:
            image = decode_and_inception_crop(source.read(raw), channels, (height, width), element_seed,
                                              crop_area, flip)
        else:
            image = inception_crop(source.decode(raw, channels), (height, width), element_seed, crop_area, flip)
        image = tf.ensure_shape(image, (height, width, channels))
        if image_augment is not None:
            image = tf.ensure_shape(image_augment(image), (height, width, channels))
        return image, tf.one_hot(label, num_classes)

    stream = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    stream = stream.skip(offset)
    stream = stream.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    stream = stream.batch(batch_size, drop_remainder=True)
    return _finish(stream, batch_augment, start_step), num_examples // batch_size


def _finish(stream, batch_augment, start_step):
    if batch_augment is not None:
        steps = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
        stream = tf.data.Dataset.zip((stream, steps)).map(
            lambda batch, step: batch_augment(batch[0], batch[1], step),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
    return without_autotuning(stream.prefetch(tf.data.AUTOTUNE))


def _check_fixed_shape(source, image_shape):
    if tuple(image_shape) != tuple(source.image_shape):
        raise ValueError(
            f"{source.description} has {tuple(source.image_shape)} images, which are "
            f"never resized; the model takes {tuple(image_shape)}."
        )


def eval_pipeline(source, batch_size, image_shape, crop="resize-crop",
                  num_shards=1, shard_index=0):
    """The evaluation `tf.data.Dataset` of `source`: one pass, deterministic.

    Decode, center crop (`crop`: "resize-crop" or "resmall-crop"; a source
    of fixed-size images is not cropped), one-hot, batch (the last batch
    may be smaller), prefetch.
    """
    if crop not in EVAL_CROPS:
        raise ValueError(f"Unknown eval crop {crop!r}. Valid: {', '.join(EVAL_CROPS)}.")
    dataset = source.dataset
    if num_shards > 1:
        dataset = dataset.shard(num_shards, shard_index)
    height, width, channels = image_shape
    if source.image_shape is not None:
        _check_fixed_shape(source, image_shape)

    def preprocess(raw, label):
        image = source.decode(raw, channels)
        if source.image_shape is None:
            image = center_crop(image, (height, width), crop)
        return tf.ensure_shape(image, image_shape), tf.one_hot(label, source.num_classes)

    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return without_autotuning(dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE))


def pad_batches(dataset, batch_size, num_batches=None, multiple=False):
    """Pads every batch of an `(images, labels)` dataset to `batch_size`.

    Returns `(images, labels, weights)` batches whose padding has weight 0,
    so that Keras' weighted metrics count each real example exactly once.
    Data-parallel evaluation needs it: every batch must split evenly over
    the devices, and a test set rarely ends on a full batch. With
    `multiple=True`, batches are padded to the next multiple of
    `batch_size` instead (the fewest padding examples). With `num_batches`,
    all-padding batches are appended up to that count, so that every host
    runs the same number of steps.
    """
    def pad(images, labels):
        count = tf.shape(images)[0]
        missing = (-count) % batch_size if multiple else batch_size - count

        def zeros_after(x):
            return tf.pad(x, [[0, missing]] + [[0, 0]] * (len(x.shape) - 1))

        weights = tf.concat([tf.ones([count]), tf.zeros([missing])], axis=0)
        images, labels = zeros_after(images), zeros_after(labels)
        if multiple:
            return images, labels, weights
        return (tf.ensure_shape(images, [batch_size, *images.shape[1:]]),
                tf.ensure_shape(labels, [batch_size, *labels.shape[1:]]),
                tf.ensure_shape(weights, [batch_size]))

    dataset = dataset.map(pad, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if num_batches is not None:
        spec = dataset.element_spec
        empty = tuple(tf.zeros(s.shape, s.dtype) for s in spec)
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)
    return dataset


# --- A config's datasets ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sources:
    """A config's data before any pipeline: what the model and the batch plan
    need to know (classes, examples, image shape). Made once by
    `make_sources`: listing an image folder can take minutes.

    The sources do not fix the image shape (one data set serves several
    resolutions, Appendix C): `image_shape(config, sources.train)` does.

    Attributes:
        train: the training `sources.Source`.
        eval: the evaluation `Source`, or None without an eval split.
        num_classes, num_examples: of the training split.
    """

    train: sources_lib.Source
    eval: sources_lib.Source
    num_classes: int
    num_examples: int


def image_shape(config, source):
    """(height, width, channels) a resolved config's model takes from `source`:
    the source's own fixed shape (the digits), else the config's `image_size`."""
    return tuple(source.image_shape or config_lib.image_shape(config))


def make_sources(config):
    """The `Sources` of a resolved config."""
    config_lib.check_resolved(config)
    def source(split):
        return sources_lib.make_source(config["dataset"], split, config["data_dir"], config["download"],
                                       config["damaged_images"])

    train = source(config["train_split"])
    if train.num_classes < 2:
        raise ValueError(
            f"{train.description} has {train.num_classes} class; a classifier needs at least 2 "
            "(an image folder needs one subfolder per class)."
        )
    evaluation = source(config["eval_split"]) if config["eval_split"] else None
    return Sources(train, evaluation, train.num_classes, train.num_examples)


@dataclasses.dataclass(frozen=True)
class Datasets:
    """What `make_datasets` gives the trainer.

    Attributes:
        train_fn: `train_fn(start_step)` builds the training stream from that step.
        eval: the evaluation dataset, or None.
        steps_per_epoch: micro-batches in one pass over the training split.
        num_classes: int.
        image_shape: (height, width, channels).
    """

    train_fn: object
    eval: object
    steps_per_epoch: int
    num_classes: int
    image_shape: tuple
    sources: object = None


@contextlib.contextmanager
def naming_damaged_images(sources):
    """Turns a decoder's failure inside the pipelines of `sources` into a
    `ValueError` that names the damaged files (`sources.named_decode_error`);
    other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        named = sources_lib.named_decode_error(error, (sources.train, sources.eval)) if sources else None
        if named is None:
            raise
        raise named from error


def make_datasets(config, micro_batch_size, placement=None, sources=None):
    """The `Datasets` of a resolved config at `micro_batch_size` images a step.

    With a `distribute.Placement`, each host reads its shard at its part of
    `micro_batch_size` (the global batch of one step), and evaluation
    batches are padded to split evenly over the replicas. `sources` (from
    `make_sources`) saves reading the data's metadata a second time.
    """
    config_lib.check_resolved(config)
    sources = sources or make_sources(config)
    num_shards, shard_index = placement.shard if placement else (1, 0)
    replicas = placement.num_replicas if placement else 1
    host_batch = placement.host_batch_size(micro_batch_size) if placement else micro_batch_size
    eval_batch = config["eval_batch_size"] or min(config["batch_size"], 512)
    if replicas > 1:
        eval_batch = max(replicas, eval_batch - eval_batch % replicas)
        placement.check_batch_size(eval_batch, "eval_batch_size")
    source = sources.train
    shape = image_shape(config, source)
    if (num_shards == 1 or source.arrays is not None) and source.num_examples < micro_batch_size:
        raise ValueError(
            f"`batch_size` {micro_batch_size} exceeds the {source.num_examples} "
            f"training examples of {source.description}."
        )
    if config["randaugment_magnitude"] and shape[-1] != 3:
        raise ValueError(
            f"RandAugment's colour ops need RGB images, and {source.description} has "
            f"{shape[-1]}-channel images. Set randaugment_magnitude=0 (the digits use "
            f"shift_pixels instead), or channels=3 for an image dataset."
        )
    augment = augment_lib.augmenters(
        randaugment_layers=config["randaugment_layers"],
        randaugment_magnitude=config["randaugment_magnitude"],
        mixup=config["mixup"], cutmix=config["cutmix"],
        implementation=config["augment_impl"], seed=config["seed"], mix_on=config["mix_on"],
    )

    def train_fn(start_step):
        return train_pipeline(
            source, host_batch, shape, seed=config["seed"],
            start_step=start_step, crop_area=tuple(config["crop_area"]),
            flip=config["flip"], image_augment=augment.image, batch_augment=augment.batch,
            shuffle_buffer=config["shuffle_buffer"], shift_pixels=config["shift_pixels"],
            num_shards=num_shards, shard_index=shard_index,
        )[0]

    eval_ds = None
    if sources.eval is not None:
        eval_ds = pad_for_replicas(eval_pipeline(
            sources.eval, eval_batch // num_shards, shape, config["eval_crop"],
            num_shards=num_shards, shard_index=shard_index,
        ), placement, eval_batch // num_shards, sources.eval.num_examples)
    steps = source.num_examples // micro_batch_size
    return Datasets(train_fn, eval_ds, steps, source.num_classes, shape, sources)


def pad_for_replicas(eval_ds, placement, host_batch_size, num_examples):
    """An evaluation dataset that `placement`'s devices can split.

    tf.distribute splits uneven batches itself. A JAX batch must split
    evenly over the devices: the last one is padded with weight-0 examples
    to a multiple of the replicas (the metrics, compiled as weighted
    metrics, count each real example once; the loss averages over real
    examples per batch). On several hosts batches are padded to the full
    `host_batch_size`, and all-padding batches make every host run the
    same number of steps; there Keras' epoch-mean loss counts padding in
    its batch weights, so only accuracies are exact.
    """
    if placement is None or placement.num_replicas == 1 or placement.strategy is not None:
        return eval_ds
    num_shards = placement.shard[0]
    if num_shards == 1:
        return pad_batches(eval_ds, placement.num_replicas, multiple=True)
    num_batches = math.ceil(math.ceil(num_examples / num_shards) / host_batch_size)
    return pad_batches(eval_ds, host_batch_size, num_batches)


def representative_images(config, count=128):
    """Up to `count` images of a resolved config's data as the model takes
    them (pixels in [0, 255]), from the eval split (else the train split)
    preprocessed for evaluation: int8 calibration and export checks."""
    sources = make_sources(config)
    source = sources.eval or sources.train
    dataset = eval_pipeline(source, count, image_shape(config, source), config["eval_crop"])
    images, _ = next(iter(dataset.unbatch().take(count).batch(count)))
    return images.numpy()
