"""The project's one on-disk array format: `.npz` files, read verified, written atomically.

Official checkpoints, the download cache and training states are all
`.npz` mappings of arrays. `read` loads every array (so zipfile checks
every CRC) and never unpickles; `write` goes through a temporary file that
is flushed to disk and renamed, so a crash mid-write leaves any previous
file intact.
"""

import os
import pathlib
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
        raise ValueError(
            f"{str(path)!r} is not a readable .npz checkpoint ({type(error).__name__}: "
            f"{error}). It may be truncated or corrupted: delete it and download "
            "it again, or check that it is an official MLP-Mixer .npz file."
        ) from None


def write(path, arrays):
    """Writes `arrays` to an `.npz` at `path` atomically; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
