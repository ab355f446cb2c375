"""Datasets as `tf.data` pipelines: tensorflow-datasets, image folders and the
embedded digits set.

Sources give encoded images (or file paths) and integer labels; pipelines
decode, crop and batch them. Pixels stay in [0, 255]: `MLPMixer` rescales
them itself, so exported models take raw pixels too.

Training pipelines are a pure function of `(seed, start_step)`: each epoch
is shuffled with its own seed, and every crop and flip uses a stateless
seed made from the seed, the epoch and the example's position. A run that
resumes at step `s` builds the pipeline with `start_step=s` and sees exactly
the batches an uninterrupted run would have seen from step `s` on.

scikit-learn ships the UCI handwritten digits (1,797 8x8 grey images, 10
classes) inside its wheel, so the default dataset of `train.py` needs no
download. Its pixels are scaled from 0..16 to [0, 255].
"""

import collections
import logging
import os
import pathlib
import socket

import numpy as np
import tensorflow as tf

DIGITS_IMAGE_SHAPE = (8, 8, 1)
DIGITS_NUM_CLASSES = 10
EVAL_CROPS = ("resize-crop", "resmall-crop")
# The paper evaluates on a 224 crop of a 256 resize; other sizes keep the ratio.
CENTER_CROP_FRACTION = 224 / 256
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}

Source = collections.namedtuple(
    "Source", ["dataset", "decode", "num_examples", "num_classes", "description", "skipped"]
)
Source.__doc__ = """An unbatched source of `(raw, label)` pairs.

`raw` is whatever `decode(raw)` turns into an image tensor (encoded bytes
for tfds, a file path for folders); keeping it raw makes skipping on resume
cheap. `description` names the source in messages; `skipped` lists the
files left out as unreadable.
"""


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


def digits_datasets(batch_size, seed=0, shift_pixels=1, test_fraction=0.2, start_step=0):
    """Returns `(train_ds, test_ds, steps_per_epoch)` for the digits set.

    Training shuffles, repeats forever, batches with `drop_remainder=True`,
    shifts each image by up to `shift_pixels` in each direction (zero
    padding: the translation augmentation that suits 8x8 digits) and
    prefetches. Labels are one-hot float32 vectors (what label smoothing,
    MixUp and CutMix work on). With a given `seed` the order and the shifts
    are deterministic, and `start_step` starts the stream at that batch (for
    resuming). The test set comes in batches of up to 512, which keeps
    per-epoch validation cheap.

    Args:
        batch_size: int, the global batch size.
        seed: int, the seed of shuffling and augmentation.
        shift_pixels: int >= 0, the largest random shift; 0 disables it.
        test_fraction: float, the held-out share (see `load_digits`).
        start_step: int >= 0, the number of batches to skip.
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
    # Skipping index batches is cheap: nothing is gathered for them.
    train = train.skip(start_step)
    train = train.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    train = train.prefetch(tf.data.AUTOTUNE)
    test = tf.data.Dataset.from_tensor_slices(
        (x_test, tf.one_hot(y_test, DIGITS_NUM_CLASSES))
    )
    test = test.batch(512).prefetch(tf.data.AUTOTUNE)
    return train, test, len(x_train) // batch_size


# --- Sources -----------------------------------------------------------------


def _check_online(host="storage.googleapis.com", port=443, timeout=3.0):
    # tfds retries failed downloads for minutes; a 3-second probe first lets
    # an offline machine fail at once.
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _tfds_missing_message(name, data_dir, reason):
    root = os.path.dirname(os.path.dirname(data_dir))  # data_dir is <root>/<name>/<version>
    manual = os.path.join(root, "downloads", "manual")
    return (
        f"tensorflow-datasets dataset {name!r} is not available in data_dir "
        f"{data_dir!r}: {reason}. Prepare it on a machine with internet access "
        f"with `tfds build {name} --data_dir {root}` "
        f"and copy the directory here, or pass `download=True` (config: "
        f"`--set download=True`) to let tfds download it now. Datasets with a "
        f"manual download (e.g. imagenet2012) need their archives in {manual!r} "
        "before `tfds build`."
    )


def tfds_source(name, split, data_dir=None, download=False):
    """A `Source` from tensorflow-datasets, e.g. `tfds_source("cifar10", "train")`.

    Only prepared data is read unless `download=True`. A missing dataset
    fails in seconds with a message naming the directory searched and the
    `tfds build` command that prepares it.

    Args:
        name: str, a tfds name (`cifar10`, `oxford_iiit_pet`, `imagenet2012`,
            ...), optionally with a version (`cifar10:3.0.2`).
        split: str, a tfds split, slices included (`"train[:90%]"`).
        data_dir: str or None, tfds' data directory (default: tfds' own,
            `~/tensorflow_datasets` or `$TFDS_DATA_DIR`).
        download: bool, whether to download and prepare missing data.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown tensorflow-datasets name {name!r}. See "
            "https://www.tensorflow.org/datasets/catalog for the names, or use "
            "`dataset='image_folder'` for a local folder of images."
        ) from None
    image_key, label_key = builder.info.supervised_keys or ("image", "label")

    def read():
        return builder.as_dataset(
            split=split, shuffle_files=False,
            # Keep images encoded: skipping on resume then costs no decoding.
            decoders={image_key: tfds.decode.SkipDecoding()},
        )

    try:
        dataset = read()
    except AssertionError as error:  # tfds' "could not find data in ..."
        if not download:
            raise FileNotFoundError(
                _tfds_missing_message(name, builder.data_dir, "it has not been prepared")
            ) from None
        if not _check_online():
            raise FileNotFoundError(
                _tfds_missing_message(
                    name, builder.data_dir,
                    "it has not been prepared and this machine is offline "
                    "(no connection to storage.googleapis.com within 3 s)",
                )
            ) from error
        builder.download_and_prepare()
        dataset = read()
    try:
        num_examples = builder.info.splits[split].num_examples
    except (KeyError, ValueError):
        # Split metadata is missing only under `tfds.testing.mock_data`.
        num_examples = int(dataset.cardinality())
    if num_examples <= 0:
        raise ValueError(f"Split {split!r} of {name!r} has no examples.")
    label_feature = builder.info.features[label_key]
    dataset = dataset.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))
    return Source(
        dataset, _decode_bytes, num_examples, label_feature.num_classes,
        f"tfds {name} split {split!r} in {builder.data_dir}", (),
    )


def _decode_bytes(raw, channels):
    return tf.io.decode_image(raw, channels=channels, expand_animations=False)


def _decode_file(path, channels):
    return _decode_bytes(tf.io.read_file(path), channels)


def _image_kind(path):
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def image_folder_source(root, split="train"):
    """A `Source` of a folder of images, one subfolder per class.

    Layouts: `root/<class>/*.{jpg,jpeg,png}` (one split, "train"), or
    `root/train/<class>/...` and `root/test/<class>/...`. Classes are the
    sorted subfolder names of the train split, so label ids are stable.

    Files whose first bytes are not a JPEG or PNG signature (corrupt or
    mislabelled files) are skipped, counted and logged once with their
    paths; the choice keeps one bad file from stopping a long run. A file
    with a valid signature but a broken body fails at decoding, naming the
    op; remove it and rerun.

    Args:
        root: path of the folder.
        split: "train" or "test".
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Image folder {str(root)!r} does not exist. Expected "
            "root/<class>/*.jpg|png, or root/train/<class>/... and root/test/<class>/..."
        )
    has_splits = (root / "train").is_dir()
    if split not in ("train", "test"):
        raise ValueError(f"Image folders have splits 'train' and 'test', got {split!r}.")
    if not has_splits and split == "test":
        raise FileNotFoundError(
            f"Image folder {str(root)!r} has no test split: add "
            f"{str(root / 'test')}/<class>/ next to {str(root / 'train')}/<class>/, "
            "or set eval_split=None to train without evaluation."
        )
    split_dir = root / split if has_splits else root
    class_root = root / "train" if has_splits else root
    class_names = sorted(p.name for p in class_root.iterdir() if p.is_dir())
    if not class_names:
        raise FileNotFoundError(
            f"Image folder {str(class_root)!r} has no class subfolders; expected "
            f"{str(class_root)}/<class>/*.jpg|png."
        )
    paths, labels, skipped = [], [], []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if _image_kind(path) is None:
                skipped.append(str(path))
                continue
            paths.append(str(path))
            labels.append(label)
    if skipped:
        logging.warning(
            "Skipped %d file(s) in %s that are not JPEG or PNG images: %s",
            len(skipped), split_dir, ", ".join(skipped[:10]),
        )
    if not paths:
        raise FileNotFoundError(
            f"No .jpg/.jpeg/.png images under {str(split_dir)!r} (classes: "
            f"{', '.join(class_names)})."
        )
    dataset = tf.data.Dataset.from_tensor_slices((paths, np.array(labels, "int32")))
    return Source(
        dataset, _decode_file, len(paths), len(class_names),
        f"image folder {split_dir}", tuple(skipped),
    )


def make_source(dataset, split, data_dir=None, download=False):
    """The `Source` of a config's `dataset`: a tfds name or "image_folder".

    For "image_folder", `data_dir` is the folder's root.
    """
    if dataset == "image_folder":
        if not data_dir:
            raise ValueError(
                "dataset='image_folder' needs `data_dir`, the folder's root "
                "(root/<class>/*.jpg|png or root/train/<class>/...)."
            )
        return image_folder_source(data_dir, split)
    if dataset == "digits":
        raise ValueError("The digits set is built by `digits_datasets`, not as a Source.")
    return tfds_source(dataset, split, data_dir=data_dir, download=download)


# --- Preprocessing -------------------------------------------------------------


def inception_crop(image, size, seed, area_range=(0.05, 1.0), flip=True):
    """Random crop of `area_range` of the image (aspect 3/4..4/3), resized to `size`.

    The Inception-style crop of the official input pipeline (area 5% to
    100% by default), then a random horizontal flip. Stateless: the same
    `seed` (a shape-[2] int tensor) gives the same crop.

    Returns float32 pixels in the input's range.
    """
    seeds = tf.random.experimental.stateless_split(seed, 2)
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=seeds[0], area_range=area_range, aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0, use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, crop_size)
    image = tf.image.resize(image, size, method="bilinear", antialias=False)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
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
                   crop_area=(0.05, 1.0), flip=True, batch_augment=None,
                   num_shards=1, shard_index=0, shuffle_buffer=50_000):
    """The training `tf.data.Dataset` of `source`: endless, deterministic, resumable.

    Per host (`num_shards` hosts; this is `shard_index`): shard, then for
    each epoch shuffle with that epoch's seed (a uniform permutation within
    each block of `shuffle_buffer` examples; tfds writes its records in
    shuffled order already), skip to `start_step`, decode,
    Inception-crop and flip in parallel, one-hot the labels, batch with
    `drop_remainder=True`, apply `batch_augment(images, labels, step)`
    (RandAugment, MixUp, CutMix: see `keras_mixer.augment`) and prefetch.

    Args:
        source: a `Source`.
        batch_size: int, the batch size of this host.
        image_shape: (height, width, channels) of the model's input.
        seed: int, the seed of the order, crops and flips.
        start_step: int, the first batch to produce (resuming).
        crop_area: (min, max) fraction of the image area a crop keeps.
        flip: bool, random horizontal flips.
        batch_augment: callable on batches or None.
        num_shards, shard_index: the per-host sharding hook (e.g. from
            `tf.distribute.InputContext`).
        shuffle_buffer: int, the shuffle buffer (capped at the shard size).

    Returns:
        `(dataset, steps_per_epoch)`.
    """
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
        image = source.decode(raw, channels)
        image = inception_crop(image, (height, width), element_seed, crop_area, flip)
        image = tf.ensure_shape(image, (height, width, channels))
        return image, tf.one_hot(label, num_classes)

    stream = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    stream = stream.skip(offset)
    stream = stream.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    stream = stream.batch(batch_size, drop_remainder=True)
    if batch_augment is not None:
        steps = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
        stream = tf.data.Dataset.zip((stream, steps)).map(
            lambda batch, step: batch_augment(batch[0], batch[1], step),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
        )
    stream = stream.prefetch(tf.data.AUTOTUNE)
    return stream, num_examples // batch_size


def eval_pipeline(source, batch_size, image_shape, crop="resize-crop",
                  num_shards=1, shard_index=0):
    """The evaluation `tf.data.Dataset` of `source`: one pass, deterministic.

    Decode, center crop (`crop`: "resize-crop" or "resmall-crop"), one-hot,
    batch (the last batch may be smaller), prefetch.
    """
    if crop not in EVAL_CROPS:
        raise ValueError(f"Unknown eval crop {crop!r}. Valid: {', '.join(EVAL_CROPS)}.")
    dataset = source.dataset
    if num_shards > 1:
        dataset = dataset.shard(num_shards, shard_index)
    height, width, channels = image_shape

    def preprocess(raw, label):
        image = center_crop(source.decode(raw, channels), (height, width), crop)
        return tf.ensure_shape(image, image_shape), tf.one_hot(label, source.num_classes)

    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


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
