"""The project's one on-disk array format: `.npz` files, read verified, written atomically.

Official checkpoints, the download cache and training states are all
`.npz` mappings of arrays. `read` loads every array (so zipfile checks
every CRC) and never unpickles; `write` goes through a temporary file that
is flushed to disk and renamed, so a crash mid-write leaves any previous
file intact.
"""

import os
import pathlib
import tempfile
import zipfile

import numpy as np


def read(path):
    """Every array of the `.npz` at `path`, as a dict, with clear errors for bad files.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable mapping of arrays (truncated,
            corrupted, a single array, or pickled objects).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(path)!r} does not exist.")
    try:
        data = np.load(path, allow_pickle=False)
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


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write(path, arrays):
    """Writes `arrays` to an `.npz` at `path` atomically; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: two writers of one path never share a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise OSError(
            error.errno, f"Could not write {path} ({error.strerror or error}); nothing was "
            "left behind and any previous file is intact. Free disk space or choose "
            "another directory."
        ) from None
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path
