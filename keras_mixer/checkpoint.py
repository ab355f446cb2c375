"""Training state on disk, and saved models: written atomically, verified on load, resumed exactly.

A state file `state-<step>.npz` holds every model variable (weights and
seed-generator states), every optimizer variable (moments, iteration
count, EMA averages, gradient accumulators) and a JSON header with the
global step and the variable paths. It is written to a temporary file,
flushed to disk and renamed into place, so a crash mid-write leaves the
previous state intact. On load, files are tried newest first; a file that
is truncated or damaged (zip CRC, missing arrays, wrong shapes) is
reported and skipped, and the next older one is used. `save_model` writes
a `.keras` file the same way (best.keras, model.keras); `load_model`
reads one back with an error that says what is wrong with the file.
"""

import json
import logging
import re
import zipfile

import numpy as np

from keras_mixer import distribute
from keras_mixer import npz
from keras_mixer import storage

_PATTERN = re.compile(r"^state-(\d{9})\.npz$")


def _state_variables(model):
    distribute.sync_state(model)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    optimizer_variables = list(optimizer.variables) if optimizer is not None else []
    return list(model.variables), optimizer_variables


def state_path(directory, step):
    return storage.path(directory) / f"state-{step:09d}.npz"


def list_states(directory):
    """State files of `directory`, newest (highest step) first."""
    directory = storage.path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _PATTERN.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_state(directory, model, step, keep=2, extra=None, write=True):
    """Writes the model's and its optimizer's state at `step`; keeps the newest `keep`.

    `write=False` (hosts other than the chief) gathers without writing.
    Returns the path written (or that would be).
    """
    directory = storage.path(directory)
    if write:
        storage.mkdir(directory)
    model_variables, optimizer_variables = _state_variables(model)
    arrays = {}
    for prefix, variables in (("model", model_variables), ("optimizer", optimizer_variables)):
        for i, variable in enumerate(variables):
            arrays[f"{prefix}/{i:05d}"] = distribute.variable_to_numpy(variable)
    bad = [v.path for i, v in enumerate(model_variables)
           if np.issubdtype(arrays[f"model/{i:05d}"].dtype, np.floating)
           and not np.isfinite(arrays[f"model/{i:05d}"]).all()]
    if bad:
        # A state that cannot be trained on is no state: the last good one stays newest.
        raise FloatingPointError(
            f"The weights are no longer finite ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
        )
    header = {
        "step": int(step),
        "model": [v.path for v in model_variables],
        "optimizer": [v.path for v in optimizer_variables],
        **(extra or {}),
    }
    arrays["header"] = np.array(json.dumps(header))
    if not write:
        return state_path(directory, step)
    path = npz.write(state_path(directory, step), arrays)
    for old in list_states(directory)[keep:]:
        old.unlink()
    return path


def _read(path):
    arrays = npz.read(path)  # reads every array, so every CRC is checked
    header = json.loads(str(arrays.pop("header")))
    return header, arrays


def _check_matches(header, arrays, model_variables, optimizer_variables, path):
    for prefix, variables in (("model", model_variables), ("optimizer", optimizer_variables)):
        saved_paths = header[prefix]
        if len(saved_paths) != len(variables):
            raise ValueError(
                f"{path} holds {len(saved_paths)} {prefix} variables but this run "
                f"has {len(variables)}: the checkpoint comes from a different "
                "model or optimizer config. Use a new work directory."
            )
        for i, variable in enumerate(variables):
            array = arrays.get(f"{prefix}/{i:05d}")
            if array is None:
                raise ValueError(f"{path} lacks {prefix} variable {saved_paths[i]}.")
            if tuple(array.shape) != tuple(variable.shape):
                raise ValueError(
                    f"{path}: {prefix} variable {saved_paths[i]} has shape "
                    f"{tuple(array.shape)}, this run's {variable.path} has "
                    f"{tuple(variable.shape)}: a different config. Use a new work directory."
                )


def restore_latest(directory, model):
    """Restores the newest readable state of `directory` into `model` and its optimizer.

    Damaged files are logged and skipped. A state that does not fit the
    model (another config wrote it) is an error, not a skip: resuming the
    wrong run must not pass silently.

    Returns:
        The header dict of the state restored (with `step` and `path`), or
        None when there is none.
    """
    model_variables, optimizer_variables = _state_variables(model)
    for path in list_states(directory):
        try:
            header, arrays = _read(path)
        except (ValueError, KeyError) as error:
            # Renamed aside, so that it neither counts among the states kept
            # nor outranks the new ones (with keep=1 it would delete each).
            aside = storage.move(path, path.with_name(path.name + ".damaged"))
            logging.warning(
                "Checkpoint %s is damaged (%s: %s), probably cut off by a crash "
                "mid-write; moved it to %s and trying the previous one.",
                path, type(error).__name__, error, aside.name,
            )
            continue
        _check_matches(header, arrays, model_variables, optimizer_variables, path)
        for prefix, variables in (("model", model_variables), ("optimizer", optimizer_variables)):
            for i, variable in enumerate(variables):
                variable.assign(arrays[f"{prefix}/{i:05d}"])
        header["path"] = str(path)
        return header
    return None


def atomic_path(path):
    """Yields a temporary local path to write; it replaces `path` (a local
    path or a URL) when the block ends, and is removed if the block fails,
    so a crash mid-write leaves the previous file intact (`storage.writing`)."""
    return storage.writing(path)


def save_model(model, path, write=True):
    """`model.save(path)`, atomically.

    In a multi-host run (JAX, several processes) every process must call
    it: the weights span the hosts (sharded by "model" parallelism, or
    replicated over every host's devices), and gathering them takes every
    host's part, in the same order. The chief (`write=True`) then saves a
    copy of the model built outside the distribution with the gathered
    weights and the same compile settings; the file holds no optimizer
    state (the training states do). A one-process run with `write=False`
    does nothing.
    """
    if distribute.process_count() > 1:
        values = [distribute.variable_to_numpy(v) for v in model.weights]
        if write:
            _save_gathered(model, values, path)
        return storage.path(path)
    if not write:
        return storage.path(path)
    with atomic_path(path) as tmp:
        model.save(tmp)
    return storage.path(path)


def _save_gathered(model, values, path):
    import keras

    distribution = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        copy = model.__class__.from_config(model.get_config())
        copy.set_weights(values)
        compile_config = model.get_compile_config() if model.compiled else None
        if compile_config:
            copy.compile_from_config(compile_config)
        with atomic_path(path) as tmp:
            copy.save(tmp)
    finally:
        keras.distribution.set_distribution(distribution)


def save_json(path, value):
    """Writes `value` as JSON to `path`, atomically."""
    return storage.write_text(path, json.dumps(value, indent=2))


def _not_a_keras_file(path):
    return ValueError(
        f"{path} is not a readable .keras file: it is not a zip archive, so it is "
        "truncated, corrupted or another kind of file. Save it again with model.save()."
    )


def check_model_file(path):
    """Raises a clear error unless `path` is an existing `.keras` zip
    archive; cheap (no Keras), so a caller can check before starting work.
    A remote file is only checked to exist (its bytes are read on load)."""
    path = storage.path(path)
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}.")
    if storage.is_remote(path):
        if path.is_dir():
            raise ValueError(f"{path} is a folder, not a .keras file.")
        return
    if path.is_dir() or not zipfile.is_zipfile(path):
        raise _not_a_keras_file(path)


def load_model(path):
    """`keras.saving.load_model(path, compile=False)` with safe mode on (no
    Lambda layers or other Python code), and one clear error for a missing,
    corrupt or unsafe file. `path` may be a URL (read through a local copy)."""
    import keras

    check_model_file(path)
    with storage.reading(path) as local:
        if storage.is_remote(path) and not zipfile.is_zipfile(local):  # a local one is checked above
            raise _not_a_keras_file(path)
        try:
            return keras.saving.load_model(local, compile=False)
        except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as error:
            text = str(error)
            if "safe_mode" in text:
                # Keras' message suggests safe_mode=False, which runs the file's code.
                reason = "it holds Python code (a Lambda layer), which is never loaded"
            else:
                reason = f"{type(error).__name__}: {text.splitlines()[0] if text else 'no message'}"
            raise ValueError(f"{path} is not a model this package can load ({reason}).") from None
