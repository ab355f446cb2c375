"""Where images come from: tensorflow-datasets, image folders and the embedded digits.

A `Source` is an unbatched `tf.data` stream of `(raw, label)` pairs and
what the pipelines (`keras_mixer.data`) need to know about it. Sources
keep images raw (encoded bytes, file paths) so that skipping examples on
resume costs no decoding.

scikit-learn ships the UCI handwritten digits (1,797 8x8 grey images, 10
classes) inside its wheel, so the default dataset of `train.py` needs no
download. Its pixels are scaled from 0..16 to [0, 255].
"""

import dataclasses
import logging
import os
import socket

import numpy as np

try:
    import tensorflow as tf
except ImportError as error:
    raise ImportError(
        "keras_mixer.sources builds tf.data pipelines and needs TensorFlow (on every Keras "
        "backend): pip install \"keras-mixer[train]\""
    ) from error

from keras_mixer import storage
from keras_mixer.config import DAMAGED_IMAGES

DIGITS_IMAGE_SHAPE = (8, 8, 1)
DIGITS_NUM_CLASSES = 10
DIGITS_SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}


@dataclasses.dataclass(frozen=True)
class Source:
    """An unbatched source of `(raw, label)` pairs, labels as int32.

    Attributes:
        dataset: the `tf.data.Dataset` of pairs.
        decode: `decode(raw, channels)` -> an image tensor (pixels in [0, 255]).
        num_examples: int.
        num_classes: int.
        description: names the source in messages.
        skipped: files left out as unreadable.
        image_shape: the one shape every image has, for a source whose
            images are never resized (the digits), else None.
        arrays: `(images, labels)` NumPy arrays of an in-memory source,
            which its training pipeline gathers from directly, else None.
        files: the image files of an image folder (to name a damaged
            one), else empty.
        read: `read(raw)` -> the encoded image (JPEG, PNG, ...) as bytes,
            so that the training pipeline can decode only a JPEG's crop
            window (`keras_mixer.data.decode_and_inception_crop`); None
            where `decode` must do the reading (a file in a bucket).
    """

    dataset: object
    decode: object
    num_examples: int
    num_classes: int
    description: str
    skipped: tuple = ()
    image_shape: tuple = None
    arrays: tuple = dataclasses.field(default=None, repr=False, compare=False)
    files: tuple = dataclasses.field(default=(), repr=False, compare=False)
    read: object = dataclasses.field(default=None, repr=False, compare=False)


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
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(
            'The embedded digits come with scikit-learn: pip install "keras-mixer[train]"'
        ) from error

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


def _identity(raw, channels):
    return raw


def digits_source(split="train"):
    """The digits' `split` ("train": 1,437 images, "test": 360) as a `Source`."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f"The digits have splits 'train' and 'test', got {split!r}.")
    (x_train, y_train), (x_test, y_test) = load_digits()
    images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    return Source(
        tf.data.Dataset.from_tensor_slices((images, labels)), _identity, len(images),
        DIGITS_NUM_CLASSES, f"the digits' {split} split", (), DIGITS_IMAGE_SHAPE,
        (images, labels),
    )


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
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            f"Reading the tfds dataset {name!r} needs tensorflow-datasets: "
            'pip install "keras-mixer[train]"'
        ) from error
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
        f"tfds {name} split {split!r} in {builder.data_dir}", (), read=tf.identity,
    )


def _decode_bytes(raw, channels):
    return tf.io.decode_image(raw, channels=channels, expand_animations=False)


def _decode_file(path, channels):
    return _decode_bytes(tf.io.read_file(path), channels)


def _decode_remote_file(path, channels):
    """`_decode_file` for a file in a bucket, read through `keras_mixer.storage`
    (fsspec) rather than TensorFlow's own GCS client, so that it takes the
    same credentials and endpoint (an emulator too) as the rest of a run."""
    raw = tf.numpy_function(lambda p: storage.path(p.decode()).read_bytes(), [path], tf.string,
                            stateful=False)
    return _decode_bytes(tf.ensure_shape(raw, ()), channels)


def _image_problem(path):
    """Why the file at `path` is not a whole JPEG or PNG, or None.

    Reads its first 8 bytes and its last KiB: the signature, then the
    end-of-image marker (JPEG's FFD9, PNG's IEND chunk), which a cut copy
    or download lacks. A broken body with both ends intact is not caught
    here; it fails at decoding."""
    with storage.path(path).open("rb") as f:
        head = f.read(8)
        f.seek(max(0, f.seek(0, 2) - 1024))
        tail = f.read()
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            end = b"\xff\xd9" if kind == "jpeg" else b"IEND"
            return None if end in tail else f"a truncated {kind.upper()}"
    return "not a JPEG or PNG"


def image_folder_source(root, split="train", damaged="error"):
    """A `Source` of a folder of images, one subfolder per class.

    Layouts: `root/<class>/*.{jpg,jpeg,png}` (one split, "train"), or
    `root/train/<class>/...` and `root/test/<class>/...`. Classes are the
    sorted subfolder names of the train split, so label ids are stable.

    Files that do not start with a JPEG or PNG signature (corrupt or
    mislabelled files) or lack its end-of-image marker (cut copies) are
    skipped, counted and logged once with their paths and the reason; the
    choice keeps one bad file from stopping a long run, and `Source.skipped`
    lists them. Those two checks read a few bytes per file. A file with
    both ends intact but a broken body is found only by decoding it:
    `damaged="error"` (the default) decodes as it reads, and a failure is a
    `ValueError` naming the file (`named_decode_error`, which finds it);
    `damaged="skip"` decodes every file once here, in parallel (one epoch's
    decoding), and skips the ones that fail with a warning naming them.

    In a bucket (`root` a gs:// URL), the listing, the checks and the reads
    go through `keras_mixer.storage`: two small reads per file to check it,
    one per image read. For a large data set in a bucket, a tfds dataset
    (`data_dir=gs://...`, TFRecord files) reads faster.

    Args:
        root: path of the folder, or its URL.
        split: "train" or "test".
        damaged: "error" or "skip" (`DAMAGED_IMAGES`).
    """
    if damaged not in DAMAGED_IMAGES:
        raise ValueError(f"damaged_images={damaged!r}: use one of {', '.join(DAMAGED_IMAGES)}.")
    root = storage.path(root)  # a local folder, or one in a bucket (gs://...)
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
            problem = _image_problem(path)
            if problem:
                skipped.append(f"{path} ({problem})")
                continue
            paths.append(str(path))
            labels.append(label)
    decode = _decode_remote_file if storage.is_remote(root) else _decode_file
    if damaged == "skip" and paths:
        bad = set(find_damaged(paths, decode))
        skipped += [f"{path} (TensorFlow cannot decode it)" for path in paths if path in bad]
        labels = [label for path, label in zip(paths, labels) if path not in bad]
        paths = [path for path in paths if path not in bad]
    if skipped:
        logging.warning(
            "Skipped %d file(s) in %s that are not whole JPEG or PNG images: %s",
            len(skipped), split_dir, ", ".join(skipped[:10]),
        )
    if not paths:
        raise FileNotFoundError(
            f"No .jpg/.jpeg/.png images under {str(split_dir)!r} (classes: "
            f"{', '.join(class_names)})."
        )
    dataset = tf.data.Dataset.from_tensor_slices((paths, np.array(labels, "int32")))
    return Source(
        dataset, decode, len(paths), len(class_names), f"image folder {split_dir}", tuple(skipped),
        files=tuple(paths), read=None if storage.is_remote(root) else tf.io.read_file,
    )


def find_damaged(paths, decode, channels=3):
    """The files of `paths` that `decode` fails on, in order.

    Decodes them all in a parallel tf.data pass that drops the failures
    (`ignore_errors`): the ones that come through are whole, the rest are
    damaged."""
    dataset = tf.data.Dataset.from_tensor_slices(list(paths))
    dataset = dataset.map(lambda path: (path, tf.shape(decode(path, channels))),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    whole = {path.decode() for path, _ in dataset.ignore_errors().as_numpy_iterator()}
    return [path for path in paths if path not in whole]


def named_decode_error(error, sources):
    """A `ValueError` naming the damaged files behind `error`, or None.

    TensorFlow's decoders fail inside tf.data without naming the file
    ("Invalid PNG data", "jpeg::Uncompress failed"). When `error` is such a
    failure and one of `sources` is an image folder, its files are decoded
    again to find the damaged ones (`find_damaged`), and the error says
    which, and how to go on."""
    if not isinstance(error, tf.errors.InvalidArgumentError) or "Decode" not in str(error):
        return None
    for source in sources:
        damaged = find_damaged(source.files, source.decode) if source is not None and source.files else []
        if damaged:
            shown = ", ".join(damaged[:10]) + (f" and {len(damaged) - 10} more" if len(damaged) > 10 else "")
            return ValueError(
                f"{len(damaged)} damaged image(s) in {source.description} that TensorFlow cannot decode: "
                f"{shown}. Replace or delete them, or set damaged_images='skip' to leave them out with "
                "a warning; the same command then resumes from the last saved state."
            )
    return None


def make_source(dataset, split, data_dir=None, download=False, damaged="error"):
    """The `Source` of a config's `dataset`: "digits", a tfds name or "image_folder".

    For "image_folder", `data_dir` is the folder's root, and `damaged` says
    what to do with a file that does not decode (`image_folder_source`).
    """
    if dataset == "image_folder":
        if not data_dir:
            raise ValueError(
                "dataset='image_folder' needs `data_dir`, the folder's root "
                "(root/<class>/*.jpg|png or root/train/<class>/...)."
            )
        return image_folder_source(data_dir, split, damaged)
    if dataset == "digits":
        return digits_source(split)
    return tfds_source(dataset, split, data_dir=data_dir, download=download)
