"""Optimizers, learning-rate schedules, losses and metrics: what `model.compile` gets.

`compile_model` compiles a model with a config's recipe; `train` calls it,
and a notebook that runs `model.fit` itself gets the same recipe from it.
The paper's "wd 0.1" and how it maps onto Keras' `weight_decay` are
explained in `keras_mixer.config`.
"""

import keras

from keras_mixer import config as config_lib
from keras_mixer import distribute


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
            at each step (see `keras_mixer.config` for the paper's "0.1").
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


def make_metrics(num_classes):
    """Top-1 and top-5 accuracy, as weighted metrics.

    Weighted: data-parallel evaluation pads its last batch with weight-0
    examples (`data.pad_batches`), which plain `metrics` would count.
    """
    return [
        keras.metrics.CategoricalAccuracy(name="accuracy"),
        keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
    ]


def apply_plan(config, plan):
    """`config` with `plan`'s accumulation, steps per execution and precision."""
    return dict(config, grad_accum_steps=plan.grad_accum_steps,
                steps_per_execution=plan.steps_per_execution,
                mixed_precision=plan.mixed_precision)


def compile_model(model, config, total_updates, warmup_steps=None, placement=None, plan=None):
    """Compiles `model` with a resolved config's optimizer, schedule, loss and metrics.

    This is what `train` compiles with; a notebook or script that calls
    `model.fit` itself gets the same recipe from it. `total_updates` is the
    number of optimizer updates the schedule spans; `warmup_steps` defaults
    to the config's (or its `warmup_fraction` of `total_updates`).

    `plan` (from `plan_run`) gives the gradient accumulation and steps per
    execution; the data must then yield `plan.step_batch` images a step.
    Without one, a config's "auto" means 1 for both: each step is one whole
    global batch, as the data was batched without a plan.

    Metrics are `make_metrics`'s. Returns `model`.
    """
    config_lib.check_resolved(config)
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
        weighted_metrics=make_metrics(model.num_classes),
        jit_compile=distribute.jit_compile_setting(placement),
        steps_per_execution=config["steps_per_execution"],
    )
    return model
