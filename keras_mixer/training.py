"""Training recipes: optimizer, schedule, loss, callbacks, and `model.fit`.

This is where data and model meet; `train.py` only parses flags and calls
`train`.
"""

import json
import os
import pathlib
import time

import keras

from keras_mixer import data as data_lib
from keras_mixer.model import MLPMixer

CONFIG_KEYS = frozenset({
    "dataset", "model", "epochs", "batch_size", "learning_rate",
    "warmup_fraction", "weight_decay", "grad_clip_norm", "label_smoothing",
    "shift_pixels", "seed",
})
DATASETS = ("digits",)


def make_optimizer(learning_rate, total_steps, warmup_steps, weight_decay, grad_clip_norm):
    """AdamW with linear warmup then cosine decay, global-norm clipping.

    Weight decay applies to kernels only: biases and LayerNorm scales and
    offsets are excluded, as in the official training code.

    Args:
        learning_rate: float, the peak learning rate.
        total_steps: int, the number of optimizer steps of the run.
        warmup_steps: int, linear warmup from 0 to the peak.
        weight_decay: float, Keras AdamW's decoupled decay (multiplied by
            the learning rate at each step).
        grad_clip_norm: float or None, the global gradient norm limit.
    """
    warmup_steps = min(int(warmup_steps), int(total_steps) - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(int(total_steps) - warmup_steps, 1),
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=weight_decay,
        global_clipnorm=grad_clip_norm,
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def _check_config(config):
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"Unknown config key(s) {unknown}. Valid keys: {', '.join(sorted(CONFIG_KEYS))}."
        )
    if config["dataset"] not in DATASETS:
        raise ValueError(
            f"Unknown dataset {config['dataset']!r}. Supported: {', '.join(DATASETS)}."
        )
    for key in ("epochs", "batch_size"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"`{key}` must be a positive integer, got {value!r}.")


def _jit_compile():
    # Keras' "auto" turns XLA off for TensorFlow on CPU-only machines, but
    # with XLA a digits step took 17 ms instead of 26 on 2 CPU cores. On
    # PyTorch True would mean torch.compile, which was slower there.
    return True if keras.backend.backend() == "tensorflow" else "auto"


def _save_atomically(model, path):
    # Write next to the target, then rename: a crash mid-write leaves the
    # previous file intact.
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    model.save(tmp)
    os.replace(tmp, path)


def train(config, workdir, verbose="auto"):
    """Trains an `MLPMixer` as `config` says and writes the run to `workdir`.

    Writes `config.json`, `log.csv` (per-epoch loss and accuracy),
    `model.keras` (the trained model) and `results.json` (test accuracy,
    seconds, backend).

    Args:
        config: dict, e.g. `keras_mixer.configs.get("digits")`.
        workdir: path of the run's directory (created).
        verbose: as `model.fit`'s `verbose`.

    Returns:
        dict with `test_accuracy`, `test_loss`, `seconds`, `backend` and
        `workdir`.

    Example:
    >>> from keras_mixer import configs, training
    >>> training.train(configs.get("digits"), "runs/digits")["test_accuracy"]
    0.98...
    """
    _check_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config, indent=2))
    keras.utils.set_random_seed(config["seed"])

    train_ds, test_ds, steps_per_epoch = data_lib.digits_datasets(
        config["batch_size"], seed=config["seed"], shift_pixels=config["shift_pixels"]
    )
    model = MLPMixer(
        image_shape=data_lib.DIGITS_IMAGE_SHAPE,
        num_classes=data_lib.DIGITS_NUM_CLASSES,
        seed=config["seed"],
        **config["model"],
    )
    total_steps = config["epochs"] * steps_per_epoch
    model.compile(
        optimizer=make_optimizer(
            config["learning_rate"],
            total_steps,
            round(config["warmup_fraction"] * total_steps),
            config["weight_decay"],
            config["grad_clip_norm"],
        ),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config["label_smoothing"]
        ),
        metrics=["accuracy"],
        jit_compile=_jit_compile(),
    )
    start = time.perf_counter()
    history = model.fit(
        train_ds,
        epochs=config["epochs"],
        steps_per_epoch=steps_per_epoch,
        validation_data=test_ds,
        callbacks=[keras.callbacks.CSVLogger(str(workdir / "log.csv"))],
        shuffle=False,  # The pipeline shuffles.
        verbose=verbose,
    )
    seconds = time.perf_counter() - start
    # The last epoch's validation already evaluated the final weights on the
    # test split; no second pass.
    test_loss = history.history["val_loss"][-1]
    test_accuracy = history.history["val_accuracy"][-1]
    _save_atomically(model, workdir / "model.keras")
    results = {
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "seconds": round(seconds, 1),
        "backend": keras.backend.backend(),
        "workdir": str(workdir),
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results
