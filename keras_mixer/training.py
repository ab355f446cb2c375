"""Training recipes: config, optimizer, schedule, loss, callbacks, and `model.fit`.

This is where data and model meet; `train.py` only parses flags and calls
`train`. A config is plain data (see `keras_mixer/configs/`); `resolve_config`
fills in `DEFAULTS`, then the named `recipe`, then the config's own values.

Weight decay, the paper's "wd 0.1": the official pretraining code applied
decay as `param -= lr_t * wd * param`, i.e. multiplied by the scheduled
learning rate (big_vision's ImageNet configs later wrote the same setting
as a decoupled `wd=1e-4` with lr 1e-3, 0.1 x 1e-3 = 1e-4). Keras' `AdamW`
applies `var -= lr_t * weight_decay * var`, so the paper's 0.1 is
`weight_decay=0.1` here, with no rescaling: at the peak lr 1e-3 each step
shrinks kernels by 1e-4.
"""

import ast
import collections
import json
import logging
import math
import pathlib
import signal
import threading
import time

import keras
import numpy as np

from keras_mixer import augment as augment_lib
from keras_mixer import checkpoint as checkpoint_lib
from keras_mixer import data as data_lib
from keras_mixer import distribute as distribute_lib
from keras_mixer.model import MLPMixer

# Every config key, with its default. A None default lists its types in
# `_NONE_TYPES`.
DEFAULTS = dict(
    # Data.
    dataset="digits",           # "digits", a tfds name, or "image_folder"
    data_dir=None,              # tfds data_dir, or the image folder's root
    download=False,             # let tfds download missing data
    train_split="train",
    eval_split="test",          # None: no evaluation
    image_size=224,             # int or [height, width]; digits are always 8x8
    channels=3,
    crop_area=[0.05, 1.0],      # Inception crop's area range
    flip=True,
    eval_crop="resize-crop",    # or "resmall-crop"
    shift_pixels=1,             # digits only: random shift
    shuffle_buffer=50_000,
    # Augmentation (keras_mixer.augment).
    randaugment_layers=2,
    randaugment_magnitude=0.0,  # the paper's m; 0 is off
    mixup=0.0,                  # Beta(p, p); 0 is off
    cutmix=0.0,
    augment_impl="keras_cv",    # or "keras"
    # Model.
    variant=None,               # e.g. "B/16"; None: `model` gives every argument
    model={},                   # MLPMixer arguments (override the variant's)
    init_checkpoint=None,       # official .npz path or released name to start from
    reset_head=False,           # with init_checkpoint: start from a zero head
    # Recipe.
    recipe=None,                # "pretrain", "finetune" or None
    optimizer="adamw",          # or "sgd"
    learning_rate=1e-3,
    schedule="cosine",          # or "linear" (warmup, then linear decay to 0)
    warmup_steps=None,          # None: warmup_fraction of the run
    warmup_fraction=0.0,
    weight_decay=0.0,
    beta_1=0.9,
    beta_2=0.999,
    momentum=0.9,
    grad_clip_norm=1.0,         # None: no clipping
    grad_accum_steps="auto",    # "auto": the fewest that fit the device (plan_batch)
    ema_momentum=None,          # e.g. 0.9999: evaluate and save the EMA weights
    mixed_precision="auto",     # True: "mixed_bfloat16"; "auto": on TPU and GPU
    loss="softmax_xent",        # or "sigmoid_xent"
    label_smoothing=0.0,
    # Length and bookkeeping.
    epochs=1,
    train_steps=None,           # overrides epochs: optimizer updates in all
    steps_per_epoch=None,       # None: one pass over the training split
    batch_size=512,             # global, per optimizer update
    eval_batch_size=None,
    steps_per_execution="auto", # "auto": up to 32 on TPU, else 1 (plan_batch)
    checkpoint_every=1000,      # steps; states are also written every epoch
    keep_checkpoints=2,
    seed=0,
)
_NONE_TYPES = {
    "data_dir": (str,), "eval_split": (str,), "variant": (str,),
    "init_checkpoint": (str,), "recipe": (str,), "warmup_steps": (int,),
    "grad_clip_norm": (float,), "ema_momentum": (float,), "train_steps": (int,),
    "steps_per_epoch": (int,), "eval_batch_size": (int,),
}
# Keys that take "auto" (decided for the devices found by
# `distribute.plan_batch`) or a value of these types.
_AUTO_TYPES = {
    "mixed_precision": (bool,), "grad_accum_steps": (int,), "steps_per_execution": (int,),
}
CONFIG_KEYS = frozenset(DEFAULTS)

# The paper's recipes (Section 3 and Appendix B). Config values win.
RECIPES = {
    # Adam(W) 0.9/0.999, 10k steps of linear warmup then linear decay,
    # global-norm clipping at 1, weight decay on kernels only.
    "pretrain": dict(
        optimizer="adamw", beta_1=0.9, beta_2=0.999, schedule="linear",
        warmup_steps=10_000, grad_clip_norm=1.0, weight_decay=0.1,
        eval_crop="resize-crop",
    ),
    # SGD momentum 0.9, cosine decay with linear warmup, clipping at 1, no
    # weight decay, a fresh zero head.
    "finetune": dict(
        optimizer="sgd", momentum=0.9, schedule="cosine", warmup_steps=500,
        grad_clip_norm=1.0, weight_decay=0.0, reset_head=True, crop_area=[0.05, 1.0],
    ),
}
CHOICES = {
    "optimizer": ("adamw", "sgd"),
    "schedule": ("cosine", "linear"),
    "loss": ("softmax_xent", "sigmoid_xent"),
    "eval_crop": data_lib.EVAL_CROPS,
    "augment_impl": augment_lib.IMPLEMENTATIONS,
    "recipe": tuple(RECIPES),
}


# --- Config --------------------------------------------------------------------


def _types_of(key):
    default = DEFAULTS[key]
    if key in _AUTO_TYPES:
        return _AUTO_TYPES[key] + (str,)
    if default is None or key in _NONE_TYPES:
        types = _NONE_TYPES[key]
        return types + ((int,) if float in types else ()) + (type(None),)
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, float):
        return (float, int)
    if isinstance(default, dict):
        return (dict,)
    if isinstance(default, list):
        return (list, tuple)
    if key == "image_size":
        return (int, list, tuple)
    return (type(default),)


def _check_value(key, value):
    types = _types_of(key)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
        raise ValueError(f"Config key `{key}` must be {names}, got {value!r} ({type(value).__name__}).")
    if key in _AUTO_TYPES and isinstance(value, str) and value != "auto":
        raise ValueError(f"Config key `{key}` must be 'auto' or a {types[0].__name__}, got {value!r}.")
    if key in CHOICES and value is not None and value not in CHOICES[key]:
        raise ValueError(f"Config key `{key}` must be one of {', '.join(CHOICES[key])}, got {value!r}.")


def _unknown_keys_error(unknown):
    return ValueError(
        f"Unknown config key(s) {sorted(unknown)}. Valid keys: {', '.join(sorted(CONFIG_KEYS))}."
    )


def resolve_config(config):
    """Returns the full config: `DEFAULTS`, then the recipe's values, then `config`'s.

    Raises:
        ValueError: on an unknown key, a wrongly typed value or a bad choice.
    """
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise _unknown_keys_error(unknown)
    recipe = config.get("recipe")
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}. Valid: {', '.join(RECIPES)}.")
    resolved = {**DEFAULTS, **RECIPES.get(recipe, {}), **config}
    resolved["model"] = dict(resolved["model"])
    for key, value in resolved.items():
        _check_value(key, value)
    for key in ("epochs", "batch_size", "grad_accum_steps", "steps_per_execution",
                "keep_checkpoints", "randaugment_layers", "channels"):
        if resolved[key] != "auto" and resolved[key] <= 0:
            raise ValueError(f"`{key}` must be a positive integer, got {resolved[key]!r}.")
    if resolved["grad_accum_steps"] != "auto" and resolved["batch_size"] % resolved["grad_accum_steps"]:
        raise ValueError(
            f"`batch_size` {resolved['batch_size']} must be a multiple of "
            f"`grad_accum_steps` {resolved['grad_accum_steps']}: each update "
            "averages grad_accum_steps equal micro-batches."
        )
    return resolved


def parse_overrides(items):
    """Parses `--set key=value` strings into a dict.

    Values are Python literals (`0.1`, `True`, `None`, `[0.08, 1.0]`,
    `'B/16'`); anything else is taken as a string. `model.key=value` sets
    one MLPMixer argument.
    """
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if key.startswith("model."):
            overrides.setdefault("model", {})[key[len("model."):]] = value
            continue
        if key not in CONFIG_KEYS:
            raise _unknown_keys_error({key})
        overrides[key] = value
    return overrides


def apply_overrides(config, overrides):
    """`config` with `overrides` applied (`model` entries are merged)."""
    config = dict(config)
    for key, value in overrides.items():
        if key == "model":
            config["model"] = {**config.get("model", {}), **value}
        else:
            config[key] = value
    return config


# --- Optimizer, schedule, loss -------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_mixer")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to `peak`, then linear decay to `end` at `total_steps`.

    The paper's pretraining schedule (10k warmup steps). Keras has cosine
    decay with warmup but no linear one.

    Args:
        peak: float, the learning rate at the end of warmup.
        warmup_steps: int.
        total_steps: int, the step at which the rate reaches `end`.
        end: float, the final learning rate (0 in the paper).
    """

    def __init__(self, peak, warmup_steps, total_steps, end=0.0, name="warmup_linear_decay"):
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"Need 0 <= warmup_steps < total_steps, got {warmup_steps} and {total_steps}."
            )
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.end = end
        self.name = name

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        warmup = self.peak * step / max(self.warmup_steps, 1)
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        decay = self.peak + (self.end - self.peak) * ops.clip(progress, 0.0, 1.0)
        return ops.where(step < self.warmup_steps, warmup, decay)

    def get_config(self):
        return {
            "peak": self.peak, "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps, "end": self.end, "name": self.name,
        }


def make_schedule(kind, learning_rate, total_steps, warmup_steps):
    """The learning-rate schedule: "linear" (`WarmupLinearDecay`) or "cosine"."""
    warmup_steps = min(int(warmup_steps), int(total_steps) - 1)
    if kind == "linear":
        return WarmupLinearDecay(learning_rate, warmup_steps, int(total_steps))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(int(total_steps) - warmup_steps, 1),
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )


def make_optimizer(learning_rate, total_steps, warmup_steps, weight_decay, grad_clip_norm,
                   optimizer="adamw", schedule="cosine", beta_1=0.9, beta_2=0.999,
                   momentum=0.9, grad_accum_steps=1, ema_momentum=None):
    """The optimizer of a recipe: AdamW or SGD with momentum, on a schedule.

    Weight decay applies to kernels only: biases (the head's included) and
    LayerNorm scales and offsets are excluded, as in the official code.

    Args:
        learning_rate: float, the peak learning rate.
        total_steps: int, optimizer updates in the run.
        warmup_steps: int, updates of linear warmup from 0.
        weight_decay: float, Keras' decay, multiplied by the learning rate
            at each step (see the module docstring for the paper's "0.1").
        grad_clip_norm: float or None, the global gradient-norm limit.
        optimizer: "adamw" or "sgd".
        schedule: "cosine" or "linear".
        grad_accum_steps: int, micro-batches per update (Keras'
            `gradient_accumulation_steps`).
        ema_momentum: float or None, keep an exponential moving average of
            the weights (Keras' `use_ema`).
    """
    accum = int(grad_accum_steps)
    # Keras schedules see micro-steps when accumulating.
    lr = make_schedule(schedule, learning_rate, total_steps * accum, warmup_steps * accum)
    common = dict(
        learning_rate=lr,
        global_clipnorm=grad_clip_norm,
        gradient_accumulation_steps=accum if accum > 1 else None,
        use_ema=ema_momentum is not None,
        ema_momentum=ema_momentum if ema_momentum is not None else 0.99,
    )
    if optimizer == "sgd":
        opt = keras.optimizers.SGD(momentum=momentum, weight_decay=weight_decay or None, **common)
    elif optimizer == "adamw":
        opt = keras.optimizers.AdamW(
            weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2, **common
        )
    else:
        raise ValueError(f"Unknown optimizer {optimizer!r}. Valid: adamw, sgd.")
    opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return opt


@keras.saving.register_keras_serializable(package="keras_mixer")
def sigmoid_cross_entropy(y_true, y_pred):
    """Per-class sigmoid cross-entropy summed over classes (big_vision's `sigmoid_xent`)."""
    y_true = keras.ops.cast(y_true, y_pred.dtype)
    return keras.ops.sum(
        keras.ops.binary_crossentropy(y_true, y_pred, from_logits=True), axis=-1
    )


@keras.saving.register_keras_serializable(package="keras_mixer")
class SigmoidCrossEntropy(keras.losses.Loss):
    """`sigmoid_cross_entropy` as a `Loss`, averaged over the sample weights."""

    def __init__(self, reduction="mean_with_sample_weight", name="sigmoid_xent", dtype=None):
        super().__init__(reduction=reduction, name=name, dtype=dtype)

    def call(self, y_true, y_pred):
        return sigmoid_cross_entropy(y_true, y_pred)


def make_loss(kind, label_smoothing=0.0):
    """Softmax or sigmoid cross-entropy on one-hot or soft (MixUp) labels.

    The mean is over the sample weights: data-parallel evaluation pads the
    last batch with weight-0 examples (`data.pad_batches`), which must not
    count. Without weights (training) it is the plain batch mean.
    """
    if kind == "sigmoid_xent":
        if label_smoothing:
            raise ValueError("label_smoothing is implemented for softmax_xent only.")
        return SigmoidCrossEntropy()
    return keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=label_smoothing, reduction="mean_with_sample_weight"
    )


def jit_compile_setting(placement=None):
    """The `jit_compile` argument `compile_model` gives `model.compile`.

    True (XLA) on TensorFlow without a distribution strategy, Keras' "auto"
    elsewhere. Public so that benchmarks and notebooks compile a model as
    `train.py` does.
    """
    # Keras' "auto" turns XLA off for TensorFlow on CPU-only machines, but
    # with XLA a digits step took 17 ms instead of 26 on 2 CPU cores. On
    # PyTorch True would mean torch.compile, which was slower there. Under
    # a tf.distribute strategy XLA cannot reach the variables that other
    # replicas hold ("Trying to access resource ... located in device"), and
    # TPUs compile anyway: leave it to Keras there.
    if keras.backend.backend() != "tensorflow":
        return "auto"
    return "auto" if placement is not None and placement.strategy is not None else True


def _save_atomically(model, path):
    # Write next to the target, then rename: a crash mid-write leaves the
    # previous file intact.
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    model.save(tmp)
    tmp.replace(path)


# --- Callbacks -----------------------------------------------------------------


class Progress(keras.callbacks.Callback):
    """Tracks the global step, logs images/s and the learning rate per epoch,
    writes states every `every` steps and at epoch ends, and on SIGTERM
    writes a state and stops.

    Args:
        directory: where `state-<step>.npz` files go.
        start_step: the global step at which this `fit` call starts.
        batch_size: images per step (for images/s).
        every: int, steps between states (0: only at epoch ends).
        keep: int, states kept.
        chief: whether this host writes the files (every host takes part in
            gathering sharded arrays).
    """

    def __init__(self, directory, start_step, batch_size, every, keep, chief=True):
        super().__init__()
        self.chief = chief
        self.directory = directory
        self.step = start_step
        self.batch_size = batch_size
        self.every = every
        self.keep = keep
        self.last_saved = start_step
        self.preempted = False
        self.nan_message = None
        self.stash = None

    def set_start(self, start_step):
        self.step = self.last_saved = self._epoch_start = start_step

    def save(self):
        checkpoint_lib.save_state(
            self.directory, self.model, self.step, keep=self.keep, write=self.chief
        )
        self.last_saved = self.step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.step
        self._start_time = time.perf_counter()
        self._train_seconds = None

    def on_train_batch_end(self, batch, logs=None):
        self.step = self._epoch_start + batch + 1
        self._train_seconds = time.perf_counter() - self._start_time
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            self.nan_message = (
                f"The training loss became {float(loss)} at step {self.step} "
                f"(learning rate {lr:.3g}). Try a lower learning_rate, a longer "
                "warmup, grad_clip_norm=1.0, or mixed_precision=False. The last "
                f"good state (step {self.last_saved}) is kept: rerunning the "
                "same command with changed settings resumes from it."
            )
            logging.error(self.nan_message)
            self.model.stop_training = True
            return
        if _SIGTERM.is_set():
            self.save()
            self.preempted = True
            self.model.stop_training = True
        elif self.every and self.step // self.every > self.last_saved // self.every:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._train_seconds:
            steps = self.step - self._epoch_start
            logs["images_per_second"] = steps * self.batch_size / self._train_seconds
            logs["learning_rate"] = float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            )
        if self.nan_message is None and not self.preempted:
            self.save()
            if self.model.optimizer.use_ema:
                # `fit` replaces the weights by their EMA when it returns;
                # keep the raw ones so that a next `fit` call can continue.
                self.stash = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_variables]


class BestModel(keras.callbacks.Callback):
    """Saves `best.keras` (atomically) whenever `monitor` improves."""

    def __init__(self, path, monitor="val_accuracy", best=-np.inf):
        super().__init__()
        self.path = path
        self.monitor = monitor
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and value > self.best:
            self.best = float(value)
            _save_atomically(self.model, self.path)


_SIGTERM = threading.Event()


def _install_sigterm_handler():
    # Preemptible VMs and Colab send SIGTERM before killing: note it, and
    # let `Progress` write a state at the next step boundary.
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())


# --- Data and model ------------------------------------------------------------


def _image_shape(config):
    if config["dataset"] == "digits":
        return data_lib.DIGITS_IMAGE_SHAPE
    size = config["image_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (height, width, config["channels"])


Sources = collections.namedtuple("Sources", ["train", "eval", "num_classes", "num_examples"])
Sources.__doc__ = """A config's data before any pipeline: the training and evaluation
`data.Source` (None for the digits, which `make_datasets` builds itself, and
for a config without an eval split), the class count and the number of
training examples. Made once by `make_sources`: listing an image folder can
take minutes."""


def make_sources(config):
    """The `Sources` of a config: what the model and the batch plan need to
    know about the data (classes, examples) before the pipelines exist."""
    if config["dataset"] == "digits":
        (x_train, _), _ = data_lib.load_digits()
        return Sources(None, None, data_lib.DIGITS_NUM_CLASSES, len(x_train))
    train = data_lib.make_source(
        config["dataset"], config["train_split"], config["data_dir"], config["download"]
    )
    evaluation = None
    if config["eval_split"]:
        evaluation = data_lib.make_source(
            config["dataset"], config["eval_split"], config["data_dir"], config["download"]
        )
    return Sources(train, evaluation, train.num_classes, train.num_examples)


def make_datasets(config, micro_batch_size, placement=None, sources=None):
    """Returns `(train_fn, eval_ds, steps_per_data_epoch, num_classes, image_shape)`.

    `train_fn(start_step)` builds the training stream from that step. With
    a `distribute.Placement`, each host reads its shard at its part of
    `micro_batch_size` (the global batch of one step), and evaluation
    batches are padded to split evenly over the replicas. `sources` (from
    `make_sources`) saves reading the data's metadata a second time.
    """
    image_shape = _image_shape(config)
    num_shards, shard_index = placement.shard if placement else (1, 0)
    replicas = placement.num_replicas if placement else 1
    host_batch = placement.host_batch_size(micro_batch_size) if placement else micro_batch_size
    eval_batch = config["eval_batch_size"] or min(config["batch_size"], 512)
    if replicas > 1:
        eval_batch = max(replicas, eval_batch - eval_batch % replicas)
        placement.check_batch_size(eval_batch, "eval_batch_size")

    def for_replicas(eval_ds, num_examples):
        return pad_for_replicas(eval_ds, placement, eval_batch // num_shards, num_examples)

    if config["dataset"] == "digits":
        if num_shards > 1:
            raise ValueError(
                "The digits set is for one host; for several hosts use a tfds "
                "dataset or an image folder, which are read in per-host shards."
            )

        def train_fn(start_step):
            return data_lib.digits_datasets(
                host_batch, seed=config["seed"],
                shift_pixels=config["shift_pixels"], start_step=start_step,
            )[0]

        _, test, steps = data_lib.digits_datasets(host_batch, shift_pixels=0)
        eval_ds = None
        if config["eval_split"]:
            eval_ds = test if replicas == 1 else for_replicas(test.unbatch().batch(eval_batch), None)
        return train_fn, eval_ds, steps, data_lib.DIGITS_NUM_CLASSES, image_shape

    sources = sources or make_sources(config)
    source = sources.train
    batch_augment = augment_lib.batch_augmenter(
        randaugment_layers=config["randaugment_layers"],
        randaugment_magnitude=config["randaugment_magnitude"],
        mixup=config["mixup"], cutmix=config["cutmix"],
        implementation=config["augment_impl"], seed=config["seed"],
    )

    def train_fn(start_step):
        return data_lib.train_pipeline(
            source, host_batch, image_shape, seed=config["seed"],
            start_step=start_step, crop_area=tuple(config["crop_area"]),
            flip=config["flip"], batch_augment=batch_augment,
            shuffle_buffer=config["shuffle_buffer"],
            num_shards=num_shards, shard_index=shard_index,
        )[0]

    eval_ds = None
    if config["eval_split"]:
        eval_source = sources.eval
        eval_ds = for_replicas(data_lib.eval_pipeline(
            eval_source, eval_batch // num_shards, image_shape, config["eval_crop"],
            num_shards=num_shards, shard_index=shard_index,
        ), eval_source.num_examples)
    steps = source.num_examples // micro_batch_size
    if steps == 0:
        raise ValueError(
            f"`batch_size` {micro_batch_size} exceeds the {source.num_examples} "
            f"training examples of {source.description}."
        )
    return train_fn, eval_ds, steps, source.num_classes, image_shape


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
        return data_lib.pad_batches(eval_ds, placement.num_replicas, multiple=True)
    num_batches = math.ceil(math.ceil(num_examples / num_shards) / host_batch_size)
    return data_lib.pad_batches(eval_ds, host_batch_size, num_batches)


def make_model(config, image_shape, num_classes):
    """The `MLPMixer` of `config`.

    With `init_checkpoint` (an official `.npz` path or released name such as
    "imagenet21k/Mixer-B_16") the architecture comes from the checkpoint:
    its head is kept when the class count matches and `reset_head` is off,
    and an `image_size` that is K times the checkpoint's adapts the
    token-mixing MLPs (paper Appendix C). Otherwise: a paper `variant` with
    `model` overrides, or `model` alone.
    """
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


# --- Training ------------------------------------------------------------------


def choose_precision(config, placement=None, memory=None):
    """Whether `config` trains in "mixed_bfloat16" on `placement`'s devices
    (`mixed_precision`: True, False, or "auto": on TPUs and GPUs). Set
    Keras' dtype policy to match before building the model."""
    memory = memory or distribute_lib.device_memory(placement)
    return distribute_lib.choose_mixed_precision(config["mixed_precision"], memory)


def plan_run(config, model, placement=None, num_examples=None, memory=None):
    """The `distribute.BatchPlan` of `config` for `model` on `placement`'s devices.

    Keeps the config's global `batch_size`; "auto" accumulation and steps
    per execution are chosen from the device's memory (`num_examples`, the
    training set's size, gives the epoch length that steps per execution
    must divide). The precision is the dtype policy the model was built in.
    """
    config = resolve_config(config)
    updates_per_epoch = config["steps_per_epoch"]
    if updates_per_epoch is None and num_examples:
        updates_per_epoch = max(num_examples // config["batch_size"], 1)
    total = config["train_steps"] or (updates_per_epoch or 0) * config["epochs"] or None
    adam = config["optimizer"] == "adamw"
    return distribute_lib.plan_batch(
        model, config["batch_size"], placement,
        mixed_precision=keras.config.dtype_policy().name == "mixed_bfloat16",
        grad_accum_steps=config["grad_accum_steps"],
        steps_per_execution=config["steps_per_execution"],
        steps_per_epoch=updates_per_epoch, total_updates=total, memory=memory,
        # Weight, gradient and two Adam moments, or one SGD momentum, in float32.
        state_bytes=16 if adam else 12,
    )


def apply_plan(config, plan):
    """`config` with `plan`'s accumulation, steps per execution and precision."""
    return dict(config, grad_accum_steps=plan.grad_accum_steps,
                steps_per_execution=plan.steps_per_execution,
                mixed_precision=plan.mixed_precision)


def compile_model(model, config, total_updates, warmup_steps=None, placement=None, plan=None):
    """Compiles `model` with `config`'s optimizer, schedule, loss and metrics.

    This is what `train` compiles with; a notebook or script that calls
    `model.fit` itself gets the same recipe from it. `total_updates` is the
    number of optimizer updates the schedule spans; `warmup_steps` defaults
    to the config's (or its `warmup_fraction` of `total_updates`).

    `plan` (from `plan_run`) gives the gradient accumulation and steps per
    execution; the data must then yield `plan.step_batch` images a step.
    Without one, a config's "auto" means 1 for both: each step is one whole
    global batch, as the data was batched without a plan.

    Metrics are weighted metrics: data-parallel evaluation pads its last
    batch with weight-0 examples (`data.pad_batches`), which plain `metrics`
    would count. Returns `model`.
    """
    config = resolve_config(config)
    if plan is not None:
        config = apply_plan(config, plan)
    for key in ("grad_accum_steps", "steps_per_execution"):
        if config[key] == "auto":
            config[key] = 1
    if warmup_steps is None:
        warmup_steps = config["warmup_steps"]
        if warmup_steps is None:
            warmup_steps = round(config["warmup_fraction"] * total_updates)
    model.compile(
        optimizer=make_optimizer(
            config["learning_rate"], total_updates, warmup_steps, config["weight_decay"],
            config["grad_clip_norm"], optimizer=config["optimizer"],
            schedule=config["schedule"], beta_1=config["beta_1"], beta_2=config["beta_2"],
            momentum=config["momentum"], grad_accum_steps=config["grad_accum_steps"],
            ema_momentum=config["ema_momentum"],
        ),
        loss=make_loss(config["loss"], config["label_smoothing"]),
        weighted_metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, model.num_classes), name="top5"),
        ],
        jit_compile=jit_compile_setting(placement),
        steps_per_execution=config["steps_per_execution"],
    )
    return model


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
    if getattr(model, "_distribute_strategy", None) is not None:
        # Keras' TensorFlow trainer, for a model created under a
        # tf.distribute strategy, takes one batch from the training iterator
        # at the start of every `fit` to build the model, and that batch is
        # never trained on (Keras 3.15). Everything is built now, so drop
        # the model's own reference: Keras then reads the strategy from the
        # scope that `train` runs `fit` in (the same one) and skips that build.
        model._distribute_strategy = None


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


def _check_workdir_config(path, config):
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
    if changed:
        raise ValueError(
            f"{path.parent} holds a run with a different config ({', '.join(changed)} "
            "differ), so it cannot be resumed with this one. Use a new --workdir, "
            "or the original settings to resume."
        )


def _warn_if_bfloat16_is_slow(placement):
    from keras_mixer import runtime

    if placement.strategy is None and distribute_lib.cpu_only() and not runtime.cpu_has_bf16_matmul():
        logging.warning(
            "mixed_precision=True on a CPU without bfloat16 matrix instructions "
            "(AVX512-BF16 or AMX): bfloat16 is emulated there, and a Mixer ran at "
            "0.84-1.0x its float32 speed on JAX, 0.82-0.87x on TensorFlow and 0.02x "
            "on PyTorch (docs/benchmarks.md). Set mixed_precision=False unless this runs on a "
            "TPU, a GPU or such a CPU."
        )


def train(config, workdir, verbose="auto", distribution="auto", model_parallel_size=None):
    """Trains an `MLPMixer` as `config` says, resuming from `workdir` if it holds a run.

    Writes to `workdir`: `config.json` (resolved), `log.csv`, `tensorboard/`,
    `checkpoints/state-<step>.npz` (the last `keep_checkpoints`, every
    `checkpoint_every` steps, every epoch and on SIGTERM), `best.keras` (best
    validation accuracy), `model.keras` (final; EMA weights when on) and
    `results.json`. Running it again on the same `workdir` continues at the
    exact step where the last state was written: same batches, optimizer
    and schedule state.

    Args:
        config: dict, e.g. `keras_mixer.configs.get("digits")`.
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
    >>> from keras_mixer import configs, training
    >>> training.train(configs.get("digits"), "runs/digits")["test_accuracy"]
    0.98...
    """
    # Through JSON and back, so that a tuple in a config file compares equal
    # to the list that config.json holds when a run resumes.
    config = json.loads(json.dumps(resolve_config(config)))
    if isinstance(distribution, distribute_lib.Placement):
        placement = distribution
    else:
        placement = distribute_lib.setup(distribution, model_parallel_size)
    print(f"Distribution: {placement.description}.")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_workdir_config(workdir / "config.json", config)
    if placement.is_chief:
        (workdir / "config.json").write_text(json.dumps(config, indent=2))
        (workdir / "distribution.json").write_text(json.dumps(placement.to_dict(), indent=2))
    keras.utils.set_random_seed(config["seed"])
    memory = distribute_lib.device_memory(placement)
    # A resumed run keeps the plan it started with, so that its steps,
    # schedule and states mean the same on whatever hardware it resumes.
    saved_plan = _saved_plan(workdir / "plan.json", config)
    if saved_plan is not None:
        mixed = saved_plan["mixed_precision"]
    else:
        mixed = choose_precision(config, memory=memory)
    previous_policy = keras.config.dtype_policy()
    if mixed:
        _warn_if_bfloat16_is_slow(placement)
        keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        with placement.scope():
            return _train(config, workdir, verbose, placement, memory, saved_plan)
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _saved_plan(path, config):
    """The plan a run in this work directory started with, for its "auto" keys."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return {key: saved[key] if config[key] == "auto" else config[key]
            for key in ("grad_accum_steps", "steps_per_execution", "mixed_precision")}


def _train(config, workdir, verbose, placement, memory, saved_plan):
    # A global batch that cannot split over the replicas fails here, before
    # the data is listed and a checkpoint read for the plan.
    placement.check_batch_size(config["batch_size"])
    sources = make_sources(config)
    image_shape = _image_shape(config)
    model = make_model(config, image_shape, sources.num_classes)
    plan = plan_run(config if saved_plan is None else {**config, **saved_plan}, model,
                    placement, sources.num_examples, memory)
    print(f"Batch plan: {plan.describe()}.")
    if placement.is_chief:
        (workdir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=2))
    accum = plan.grad_accum_steps
    micro_batch = plan.step_batch
    placement.check_batch_size(
        micro_batch, "batch_size" if accum == 1 else "batch_size / grad_accum_steps"
    )
    train_fn, eval_ds, data_steps, num_classes, image_shape = make_datasets(
        config, micro_batch, placement, sources
    )
    # Keras steps are micro-batches; config steps are optimizer updates.
    steps_per_epoch = (config["steps_per_epoch"] or data_steps // accum) * accum
    if config["train_steps"]:
        total_updates = config["train_steps"]
    else:
        total_updates = config["epochs"] * steps_per_epoch // accum
    total = total_updates * accum

    compile_model(model, config, total_updates, placement=placement, plan=plan)
    _build_compiled_state(model, placement.host_batch_size(micro_batch), image_shape, num_classes)
    state_dir = workdir / "checkpoints"
    state = checkpoint_lib.restore_latest(state_dir, model)
    start = state["step"] if state else 0
    if state:
        print(f"Resuming from {state['path']} at step {start} of {total}.")

    progress = Progress(
        state_dir, start, micro_batch,
        config["checkpoint_every"] * accum, config["keep_checkpoints"],
        chief=placement.is_chief,
    )
    callbacks = [progress]
    if eval_ds is not None and placement.is_chief:
        callbacks.append(BestModel(workdir / "best.keras"))
    if config["ema_momentum"] is not None:
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if placement.is_chief:  # One host writes the logs and files.
        callbacks += [
            keras.callbacks.CSVLogger(str(workdir / "log.csv"), append=True),
            keras.callbacks.TensorBoard(str(workdir / "tensorboard"), write_graph=False),
        ]
    previous_handler = _install_sigterm_handler()
    begin = time.perf_counter()
    history = {}
    try:
        for epoch, num_epochs, steps, first_step in _segments(start, total, steps_per_epoch):
            progress.set_start(first_step)
            result = model.fit(
                train_fn(first_step), initial_epoch=epoch, epochs=epoch + num_epochs,
                steps_per_epoch=steps, validation_data=eval_ds, callbacks=callbacks,
                shuffle=False, verbose=verbose,
            )
            for key, values in result.history.items():
                history.setdefault(key, []).extend(values)
            if progress.nan_message or progress.preempted:
                break
            if progress.stash is not None and progress.step < total:
                for variable, value in zip(model.trainable_variables, progress.stash):
                    variable.assign(value)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        _SIGTERM.clear()
    seconds = time.perf_counter() - begin
    if progress.nan_message:
        raise FloatingPointError(progress.nan_message)

    results = {
        "steps": progress.step // accum if history else start // accum,
        "resumed_from": start // accum,
        "preempted": progress.preempted,
        "seconds": round(seconds, 1),
        "backend": keras.backend.backend(),
        "workdir": str(workdir),
    }
    if progress.preempted:
        return results
    if eval_ds is not None:
        if history.get("val_accuracy"):
            # The last epoch's validation already evaluated the final weights.
            metrics = {k[4:]: history[k][-1] for k in history if k.startswith("val_")}
        else:
            metrics = model.evaluate(eval_ds, return_dict=True, verbose=0)
        results.update(
            test_accuracy=float(metrics["accuracy"]), test_top5=float(metrics["top5"]),
            test_loss=float(metrics["loss"]),
        )
    if history.get("images_per_second"):
        results["images_per_second"] = round(float(np.median(history["images_per_second"])), 1)
    results["distribution"] = placement.description
    results["batch_plan"] = plan.describe()
    if placement.is_chief:
        _save_atomically(model, workdir / "model.keras")
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def representative_images(config, count=128):
    """Up to `count` evaluation images of the config's data (pixels in [0, 255]),
    for int8 calibration and export checks; None for the digits (the
    exporter's default) or without an eval split."""
    if config["dataset"] == "digits" or not config["eval_split"]:
        return None
    _, eval_ds, _, _, _ = make_datasets(resolve_config(config), min(config["batch_size"], count))
    images = [batch[0] for batch in eval_ds.unbatch().take(count).batch(count)]
    return keras.ops.convert_to_numpy(images[0])


def evaluate(config, checkpoint, verbose="auto"):
    """Evaluates a saved `.keras` model on the config's eval split.

    Returns a dict with `accuracy`, `top5` and `loss`.
    """
    config = resolve_config(config)
    if not config["eval_split"]:
        raise ValueError("The config has eval_split=None: nothing to evaluate on.")
    path = pathlib.Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist (expected a .keras file).")
    model = keras.saving.load_model(path, compile=False)
    _, eval_ds, _, num_classes, image_shape = make_datasets(config, config["batch_size"])
    if tuple(model.input_shape[1:]) != tuple(image_shape) or model.output_shape[-1] != num_classes:
        raise ValueError(
            f"{path} takes {model.input_shape[1:]} images and gives "
            f"{model.output_shape[-1]} classes; the config's data has "
            f"{image_shape} and {num_classes}."
        )
    model.compile(
        loss=make_loss(config["loss"], config["label_smoothing"]),
        weighted_metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
        ],
        jit_compile=jit_compile_setting(),
    )
    return {k: float(v) for k, v in model.evaluate(eval_ds, return_dict=True, verbose=verbose).items()}
