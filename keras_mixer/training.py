"""The fit loop: `train(config, workdir)` builds, compiles, restores, fits and writes results.

This is where data and model meet; `train.py` only parses flags and calls
`train`. The config schema is `keras_mixer.config`, the recipe (optimizer,
schedule, loss, metrics) `keras_mixer.optim`, the callbacks
`keras_mixer.callbacks`, the input pipelines `keras_mixer.data`, the
devices and batch plan `keras_mixer.distribute`.
"""

import contextlib
import dataclasses
import json
import logging
import pathlib
import time

import keras
import numpy as np

from keras_mixer import callbacks as callbacks_lib
from keras_mixer import checkpoint
from keras_mixer import config as config_lib
from keras_mixer import data
from keras_mixer import distribute
from keras_mixer import optim
from keras_mixer import plan as plan_lib
from keras_mixer import storage
from keras_mixer.model import MLPMixer


def make_model(config, image_shape, num_classes):
    """The `MLPMixer` of a resolved config, with LoRA adapters when `lora_rank` is set.

    With `init_checkpoint` (an official `.npz` path or released name such as
    "imagenet21k/Mixer-B_16") the architecture comes from the checkpoint:
    its head is kept when the class count matches and `reset_head` is off,
    and an `image_size` that is K times the checkpoint's adapts the
    token-mixing MLPs (paper Appendix C). Otherwise: a paper `variant` with
    `model` overrides, or `model` alone.
    """
    config_lib.check_resolved(config)
    model = _make_model(config, image_shape, num_classes)
    if config["lora_rank"]:
        model.enable_lora(config["lora_rank"])
    return model


def _make_model(config, image_shape, num_classes):
    from keras_mixer import weights

    kwargs = dict(config["model"])
    kwargs.setdefault("seed", config["seed"])
    if config["init_checkpoint"]:
        params = weights.read_official(config["init_checkpoint"])
        if config["variant"]:
            _check_variant(config["variant"], weights.official_config(params), config["init_checkpoint"])
        if config["reset_head"]:
            params = {k: v for k, v in params.items() if not k.startswith("head/")}
        return weights.from_checkpoint(
            params, num_classes=num_classes, image_shape=image_shape, **kwargs
        )
    if config["variant"]:
        return MLPMixer.from_variant(
            config["variant"], image_shape=image_shape, num_classes=num_classes, **kwargs
        )
    return MLPMixer(image_shape=image_shape, num_classes=num_classes, **kwargs)


def _check_variant(variant, inferred, source):
    from keras_mixer.model import variant_config

    expected = variant_config(variant)
    found = {k: inferred[k] for k in ("num_blocks", "hidden_dim", "channels_mlp_dim")}
    found["patch_size"] = inferred["patch_size"][0]
    differ = {k: (expected[k], found[k]) for k in found if expected[k] != found[k]}
    if differ:
        raise ValueError(
            f"init_checkpoint {source!r} is not a {variant} (expected vs found: {differ}). "
            "Set `variant` to the checkpoint's, or None to take it from the file."
        )


def choose_precision(config, placement=None, memory=None):
    """Whether `config` trains in "mixed_bfloat16" on `placement`'s devices
    (`mixed_precision`: True, False, or "auto": on TPUs and GPUs, and on
    CPUs where it was measured faster; `plan.mixed_precision_choice`). Set
    Keras' dtype policy to match before building the model."""
    memory = memory or distribute.device_memory(placement)
    return plan_lib.choose_mixed_precision(config["mixed_precision"], memory)


def plan_run(config, model, placement=None, num_examples=None, memory=None):
    """The `plan.BatchPlan` of a resolved config for `model` on `placement`'s devices.

    Keeps the config's global `batch_size`; "auto" accumulation and steps
    per execution are chosen from the device's memory (`num_examples`, the
    training set's size, gives the epoch length that steps per execution
    must divide). The precision is the dtype policy the model was built in.
    """
    config_lib.check_resolved(config)
    updates_per_epoch = config["steps_per_epoch"]
    if updates_per_epoch is None and num_examples:
        updates_per_epoch = max(num_examples // config["batch_size"], 1)
    total = config["train_steps"] or (updates_per_epoch or 0) * config["epochs"] or None
    adam = config["optimizer"] == "adamw"
    return plan_lib.plan_batch(
        model, config["batch_size"], placement,
        mixed_precision=keras.config.dtype_policy().name == "mixed_bfloat16",
        grad_accum_steps=config["grad_accum_steps"],
        steps_per_execution=config["steps_per_execution"],
        steps_per_epoch=updates_per_epoch, total_updates=total, memory=memory,
        # Weight, gradient and two Adam moments, or one SGD momentum, in float32.
        state_bytes=16 if adam else 12,
    )


def _build_compiled_state(model, batch_size, image_shape, num_classes):
    """Builds the compiled loss, metrics and optimizer before `fit`.

    Keras' first `fit` on JAX and PyTorch builds the compiled loss and
    metrics from a batch it takes from the training iterator, and that
    batch is never trained on. Runs would then depend on how many `fit`
    calls they made, and a resumed run would not match an uninterrupted
    one. A zero batch here builds them without touching the data.
    """
    model.test_on_batch(
        np.zeros((batch_size,) + tuple(image_shape), "float32"),
        np.zeros((batch_size, num_classes), "float32"),
    )
    model.reset_metrics()
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    distribute.release_strategy(model)


def _segments(start, total, steps_per_epoch):
    """Splits steps [start, total) into `fit` calls of whole Keras epochs.

    A partial epoch (resuming mid-epoch, or a `train_steps` that is no
    multiple of the epoch) gets a call of its own, so Keras' epoch numbers
    stay aligned with global steps. Yields `(epoch, num_epochs, steps, first_step)`.
    """
    step = start
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        if offset or total - step < steps_per_epoch:
            steps = min(steps_per_epoch - offset, total - step)
            yield epoch, 1, steps, step
            step += steps
        else:
            epochs = (total - step) // steps_per_epoch
            yield epoch, epochs, steps_per_epoch, step
            step += epochs * steps_per_epoch


# Keys a resumed run may change: skipping the damaged images that stopped a
# run leaves out what deleting them would; where MixUp and CutMix run (the
# train step or tf.data) changes no weight, state or batch order.
RESUMABLE_CHANGES = ("damaged_images", "mix_on")


def _check_workdir_config(path, config):
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} is damaged ({error}), so the run in {path.parent} cannot be checked "
            "before resuming. Use a new --workdir, or restore that file."
        ) from None
    changed = sorted(k for k in set(previous) | set(config)
                     if previous.get(k) != config.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        raise ValueError(
            f"{path.parent} holds a run with a different config ({', '.join(changed)} "
            "differ), so it cannot be resumed with this one. Use a new --workdir, "
            "or the original settings to resume."
        )


def _warn_if_bfloat16_is_slow(placement, memory):
    """Warns when bfloat16 was asked for on a CPU where it was measured slower."""
    if placement.strategy is not None or memory.kind != "cpu":
        return
    faster, why = plan_lib.mixed_precision_choice("auto", memory)
    if not faster:
        logging.warning(
            "mixed_precision=True on this CPU, where bfloat16 ran slower than float32: %s "
            "(docs/benchmarks.md). Set mixed_precision=False or \"auto\" unless this runs on "
            "a TPU, a GPU or a CPU with bfloat16 matrix instructions on PyTorch.", why)


def _drop_repeated_rows(path, first_epoch):
    """Drops the log rows of epochs from `first_epoch` on: the run is about to
    repeat them (it resumes from a state written before they were logged)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < first_epoch]
    if len(keep) < len(lines):
        with checkpoint.atomic_path(path) as tmp:
            tmp.write_text("".join(keep))


def _saved_plan(path, config):
    """The plan a run in this work directory started with, for its "auto" keys."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return {key: saved[key] if config[key] == "auto" else config[key]
            for key in ("grad_accum_steps", "steps_per_execution", "mixed_precision")}


def train(config, workdir, verbose="auto", distribution="auto", model_parallel_size=None):
    """Trains an `MLPMixer` as `config` says, resuming from `workdir` if it holds a run.

    Writes to `workdir`: `config.json` (resolved), `plan.json`,
    `distribution.json`, `log.csv`, `tensorboard/`,
    `checkpoints/state-<step>.npz` (the last `keep_checkpoints`, every
    `checkpoint_every` steps, every epoch and on SIGTERM), `best.keras` (best
    validation accuracy), `model.keras` (final; EMA weights when on; with
    `lora_rank`, the adapters merged), `lora.npz` (with `lora_rank`: the
    adapters and the head, `MLPMixer.load_lora_weights`) and
    `results.json`. Running it again on the same `workdir` continues at the
    exact step where the last state was written: same batches, optimizer
    and schedule state.

    Args:
        config: dict, e.g. `keras_mixer.config.load("digits")`.
        workdir: path of the run's directory (created).
        verbose: as `model.fit`'s `verbose`.
        distribution: a `keras_mixer.distribute.setup` mode ("auto", "data",
            "model", "none") or a `Placement` from it. Not part of the
            config: a preempted run may resume on other hardware.
        model_parallel_size: with "model", devices per model copy.

    Returns:
        dict with `test_accuracy`, `test_top5`, `test_loss`, `steps`,
        `resumed_from`, `preempted`, `seconds`, `backend` and `workdir`.

    Example:
    >>> from keras_mixer import config, training
    >>> training.train(config.load("digits"), "runs/digits")["test_accuracy"]
    0.98...
    """
    # Through JSON and back, so that a tuple in a config file compares equal
    # to the list that config.json holds when a run resumes.
    config = json.loads(json.dumps(config_lib.resolve(config)))
    if isinstance(distribution, distribute.Placement):
        placement = distribution
    else:
        placement = distribute.setup(distribution, model_parallel_size)
    print(f"Distribution: {placement.description}.")
    if config["ema_momentum"] is not None and placement.mode == "model" and placement.num_processes > 1:
        # Keras' SwapEMAWeights reads every weight as a NumPy array in one
        # process, which a kernel sharded over hosts cannot give.
        raise ValueError(
            f"ema_momentum={config['ema_momentum']} with model parallelism over {placement.num_processes} "
            "hosts: Keras' SwapEMAWeights cannot read weights sharded across hosts. Use "
            "--distribution data on several hosts, model parallelism on one host, or ema_momentum=None."
        )
    workdir = storage.check_directory(workdir, "--workdir")  # a local path or a URL (gs://...)
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"--workdir {workdir} is a file, not a directory: choose another path.")
    storage.mkdir(workdir)
    _check_workdir_config(workdir / "config.json", config)
    with _exclusive(workdir, placement.is_chief):
        return _train_locked(config, workdir, verbose, placement)


@contextlib.contextmanager
def _exclusive(workdir, chief):
    """Holds `workdir/.lock` for the run: a second run on the same work
    directory would interleave its states and logs with this one's.

    A remote work directory (gs://...) is not locked: an object store has
    no lock that a killed run gives back, and gcsfs writes no conditional
    objects. Keeping one run per remote work directory is the user's part
    (docs/distributed.md)."""
    if not chief or storage.is_remote(workdir):
        yield
        return
    import fcntl

    with open(workdir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"Another run is using {workdir} (it holds {workdir / '.lock'}). Wait for it to "
                "finish, or use another --workdir."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _train_locked(config, workdir, verbose, placement):
    keras.utils.set_random_seed(config["seed"])
    memory = distribute.device_memory(placement)
    # A resumed run keeps the plan it started with, so that its steps,
    # schedule and states mean the same on whatever hardware it resumes.
    saved_plan = _saved_plan(workdir / "plan.json", config)
    if saved_plan:
        mixed, why = saved_plan["mixed_precision"], "as the run being resumed"
    else:
        mixed, why = plan_lib.mixed_precision_choice(config["mixed_precision"], memory)
    print(f"Precision: {'mixed_bfloat16' if mixed else 'float32'} "
          f"(mixed_precision={config['mixed_precision']}: {why}).")
    previous_policy = keras.config.dtype_policy()
    if mixed:
        _warn_if_bfloat16_is_slow(placement, memory)
        keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        with placement.scope():
            run = _prepare(config, workdir, placement, memory, saved_plan)
            if placement.is_chief:
                # Only once the data, model and state are ready: a run that
                # fails to start leaves no config behind to refuse its fix.
                checkpoint.save_json(workdir / "config.json", config)
                checkpoint.save_json(workdir / "distribution.json", placement.to_dict())
                checkpoint.save_json(workdir / "plan.json", run.plan.to_dict())
            history = _fit(run, verbose)
            return _results(run, history)
    finally:
        keras.config.set_dtype_policy(previous_policy)


@dataclasses.dataclass
class _Run:
    """A prepared run: what `_prepare` builds and `_fit` and `_results` use."""

    config: dict
    workdir: pathlib.Path
    placement: distribute.Placement
    model: MLPMixer
    plan: plan_lib.BatchPlan
    datasets: data.Datasets
    start: int  # micro-steps already done
    total: int  # micro-steps in all
    steps_per_epoch: int  # micro-steps
    best: float  # the validation accuracy best.keras holds (from the state resumed)
    saver: callbacks_lib.StateSaver = None
    seconds: float = 0.0
    staging: pathlib.Path = None  # a remote run's local copies of its appended files

    def appended(self, name):
        """Where the writers that append (Keras' CSVLogger, TensorBoard) write
        `name`: the work directory, or for a remote one the local staging
        folder (an object cannot be appended to), holding a copy of what
        the store has so far; `callbacks.Upload` sends it back."""
        if self.staging is None:
            return self.workdir / name
        local = self.staging / name
        remote = self.workdir / name
        if not local.exists() and remote.is_file():
            remote.fs.get_file(remote.path, str(local))
        return local


@contextlib.contextmanager
def _staging(run):
    """A local staging folder for a remote run's appended files, removed at the end."""
    if not (run.placement.is_chief and storage.is_remote(run.workdir)):
        yield
        return
    import shutil
    import tempfile

    run.staging = pathlib.Path(tempfile.mkdtemp(prefix="keras-mixer-staging-"))
    try:
        yield
    finally:
        shutil.rmtree(run.staging, ignore_errors=True)
        run.staging = None


def _prepare(config, workdir, placement, memory, saved_plan):
    """Builds the data, model and plan, compiles, and restores the last state."""
    # A global batch that cannot split over the replicas fails here, before
    # the data is listed and a checkpoint read for the plan.
    placement.check_batch_size(config["batch_size"])
    sources = data.make_sources(config)
    model = make_model(config, data.image_shape(config, sources.train), sources.num_classes)
    plan = plan_run(config if saved_plan is None else {**config, **saved_plan}, model,
                    placement, sources.num_examples, memory)
    print(f"Batch plan: {plan.describe()}.")
    accum = plan.grad_accum_steps
    placement.check_batch_size(
        plan.step_batch, "batch_size" if accum == 1 else "batch_size / grad_accum_steps"
    )
    datasets = data.make_datasets(config, plan.step_batch, placement, sources)
    # Keras steps are micro-batches; config steps are optimizer updates.
    steps_per_epoch = (config["steps_per_epoch"] or datasets.steps_per_epoch // accum) * accum
    total_updates = config["train_steps"] or config["epochs"] * steps_per_epoch // accum
    optim.compile_model(model, config, total_updates, placement=placement, plan=plan)
    _build_compiled_state(model, placement.host_batch_size(plan.step_batch),
                          datasets.image_shape, datasets.num_classes)
    state = checkpoint.restore_latest(workdir / "checkpoints", model)
    start = state["step"] if state else 0
    total = total_updates * accum
    if state:
        print(f"Resuming from {state['path']} at step {start} of {total}.")
    if placement.is_chief:
        _drop_repeated_rows(workdir / "log.csv", start // steps_per_epoch)
    best = state.get("best_val_accuracy", -np.inf) if state else -np.inf
    return _Run(config, workdir, placement, model, plan, datasets, start, total, steps_per_epoch, best)


def _callbacks(run, preemption):
    """The callbacks of a run, in the order they must run (see `keras_mixer.callbacks`).

    Returns `make(segment)`: the list for one `fit` call. Keras'
    SwapEMAWeights keeps whether the EMA weights are in the model, so each
    call gets a fresh one; the others carry the run's state across calls.
    """
    config, chief = run.config, run.placement.is_chief
    best = None
    if run.datasets.eval is not None:
        best = callbacks_lib.BestModel(run.workdir / "best.keras", best=run.best, chief=chief)
    run.saver = callbacks_lib.StateSaver(
        run.workdir / "checkpoints", config["checkpoint_every"] * run.plan.grad_accum_steps,
        config["keep_checkpoints"], preemption, chief=chief,
        header=(lambda: {"best_val_accuracy": best.best}) if best else None,
    )
    run.saver.begin_segment(run.start)
    first = [callbacks_lib.StopOnNaN(run.saver)] + ([best] if best else [])
    first += [callbacks_lib.Throughput(run.plan.step_batch),
              callbacks_lib.EpochSpan(run.saver, run.plan.grad_accum_steps)]
    last = []
    if chief:  # One host writes the logs and files.
        log, events = run.appended("log.csv"), run.appended("tensorboard")
        first.append(keras.callbacks.CSVLogger(str(log), append=True))
        last.append(keras.callbacks.TensorBoard(str(events), write_graph=False))
        if run.staging is not None:  # The epoch's row reaches the store before its state.
            first.append(callbacks_lib.Upload(log, run.workdir / "log.csv"))
            last.append(callbacks_lib.Upload(events, run.workdir / "tensorboard"))
    first.append(run.saver)
    ema = [callbacks_lib.KeepRawWeights()] if config["ema_momentum"] is not None else []

    def make():
        swap = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if ema else []
        return first + ema + swap + last

    return make


def _fit(run, verbose):
    """Runs `model.fit` over the remaining steps; returns the merged history."""
    history = {}
    begin = time.perf_counter()
    with callbacks_lib.Preemption() as preemption, _staging(run), data.naming_damaged_images(run.datasets.sources):
        make_callbacks = _callbacks(run, preemption)
        try:
            for epoch, num_epochs, steps, first_step in _segments(run.start, run.total, run.steps_per_epoch):
                run.saver.begin_segment(first_step)
                result = run.model.fit(
                    run.datasets.train_fn(first_step), initial_epoch=epoch, epochs=epoch + num_epochs,
                    steps_per_epoch=steps, validation_data=run.datasets.eval,
                    callbacks=make_callbacks(), shuffle=False, verbose=verbose,
                )
                for key, values in result.history.items():
                    history.setdefault(key, []).extend(values)
        except callbacks_lib.Preempted:
            pass  # The state is written; `results` says so.
    run.seconds = time.perf_counter() - begin
    return history


def _results(run, history):
    """The results dict; writes `model.keras` and `results.json` unless preempted."""
    accum = run.plan.grad_accum_steps
    results = {
        "steps": run.saver.step // accum,
        "resumed_from": run.start // accum,
        "preempted": run.saver.preempted,
        "seconds": round(run.seconds, 1),
        "backend": keras.backend.backend(),
        "workdir": str(run.workdir),
    }
    if run.saver.preempted:
        return results
    if run.datasets.eval is not None:
        if history.get("val_accuracy"):
            # The last epoch's validation already evaluated the final weights.
            metrics = {k[4:]: history[k][-1] for k in history if k.startswith("val_")}
        else:
            with data.naming_damaged_images(run.datasets.sources):
                metrics = run.model.evaluate(run.datasets.eval, return_dict=True, verbose=0)
        results.update(
            test_accuracy=float(metrics["accuracy"]), test_top5=float(metrics["top5"]),
            test_loss=float(metrics["loss"]),
        )
    if history.get("images_per_second"):
        results["images_per_second"] = round(float(np.median(history["images_per_second"])), 1)
    results["distribution"] = run.placement.description
    results["batch_plan"] = run.plan.describe()
    checkpoint.save_model(run.model, run.workdir / "model.keras", write=run.placement.is_chief)
    if run.placement.is_chief:
        if run.config["lora_rank"]:
            run.model.save_lora_weights(run.workdir / "lora.npz")
        checkpoint.save_json(run.workdir / "results.json", results)
    return results
