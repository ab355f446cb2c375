"""The project's one on-disk array format: `.npz` files, read verified, written atomically.

Official checkpoints, the download cache and training states are all
`.npz` mappings of arrays. `read` loads every array (so zipfile checks
every CRC) and never unpickles; `write` goes through a temporary file that
is flushed to disk and renamed (or uploaded whole to an object store), so
a crash mid-write leaves any previous file intact.
"""

import os
import zipfile

import numpy as np

from keras_mixer import storage


def read(path):
    """Every array of the `.npz` at `path` (a local path or a URL, see
    `keras_mixer.storage`), as a dict, with clear errors for bad files.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable mapping of arrays (truncated,
            corrupted, a single array, or pickled objects).
    """
    path = storage.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    try:
        with storage.reading(path) as local:
            data = np.load(local, allow_pickle=False)
            if not hasattr(data, "files"):  # A .npy file: one array, no context manager.
                raise ValueError("it holds a single array, not a mapping of parameters")
            with data:
                # Reading every array makes zipfile check every CRC.
                return {key: data[key] for key in data.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as error:
        reason = f"{type(error).__name__}: {error}"
        if "allow_pickle" in str(error):  # numpy's text suggests loading it unsafely
            reason = "it holds Python objects (pickles), which are never loaded"
        raise ValueError(
            f"{str(path)!r} is not a readable .npz file ({reason}). It may be truncated "
            "or corrupted, or not an array file at all."
        ) from None


def shape_differences(expected, arrays):
    """What keeps `arrays` ({key: array}) from being exactly `expected` ({key: shape}).

    Returns:
        (missing keys, unexpected keys, [(key, found shape, expected shape)]):
        missing and wrong shapes in `expected`'s order, unexpected keys in
        `arrays`' order. Official checkpoints, released files and LoRA files
        are all checked with it.
    """
    missing = [key for key in expected if key not in arrays]
    unexpected = [key for key in arrays if key not in expected]
    wrong = [(key, tuple(np.shape(arrays[key])), tuple(shape)) for key, shape in expected.items()
             if key in arrays and tuple(np.shape(arrays[key])) != tuple(shape)]
    return missing, unexpected, wrong


def write(path, arrays):
    """Writes `arrays` to an `.npz` at `path` atomically (`storage.writing`:
    a renamed local file, or one upload); returns the path."""
    path = storage.path(path)
    try:
        with storage.writing(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
    except OSError as error:
        raise OSError(
            error.errno, f"Could not write {path} ({error.strerror or error}); nothing was "
            "left behind and any previous file is intact. Free disk space or choose "
            "another directory."
        ) from None
    return path
