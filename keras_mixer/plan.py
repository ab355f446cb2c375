"""Batch plans: the memory a Mixer needs to train, and how a global batch fits the devices.

`training_memory` estimates one device's memory for a model and batch;
`plan_batch` keeps the recipe's global batch and chooses gradient
accumulation and steps per execution so that the estimate fits the
memory `distribute.device_memory` found; `choose_mixed_precision` picks
bfloat16 where the hardware runs it fast. Pure arithmetic: the questions
to the backend are `distribute`'s.
"""

import dataclasses
import logging
import math

import keras

from keras_mixer import distribute
from keras_mixer.distribute import GIB
from keras_mixer.distribute import DeviceMemory
from keras_mixer.layers import check_pair
from keras_mixer.model import variant_config


def training_memory(arch, batch_per_replica, model_parallel_size=1, activation_bytes=4,
                    state_bytes=16):
    """Estimates one device's memory for training an `MLPMixer`, in bytes.

    State: every parameter's weight, gradient and two Adam moments
    (`state_bytes` per parameter: 16 in float32, which Keras keeps under
    "mixed_bfloat16" too; 12 for SGD with momentum); the kernels that
    `layout_map` shards count `1 / model_parallel_size`. Activations: the
    tensors a Mixer block keeps for the backward pass, per image (six of
    tokens x channels, and the two hidden layers of each MLP, sharded like
    their kernels), times `batch_per_replica`, at `activation_bytes` (2
    under "mixed_bfloat16"). With `remat` only each block's input is kept,
    plus one block's activations while it is recomputed. XLA fuses and
    rematerialises, so treat activations as +-50%.

    Args:
        arch: an `MLPMixer`, or a dict of its arguments (`image_shape`,
            `patch_size`, `num_blocks`, `hidden_dim`, `tokens_mlp_dim`,
            `channels_mlp_dim`, `num_classes`, optionally `remat`).

    Returns:
        dict with `params`, `state`, `activations` and `total` (bytes).
    """
    if hasattr(arch, "get_config"):
        arch = arch.get_config()
    m = model_parallel_size
    patch_h, patch_w = check_pair("patch_size", arch["patch_size"])
    height, width, channels = arch["image_shape"]
    blocks, c = arch["num_blocks"], arch["hidden_dim"]
    ds, dc = arch["tokens_mlp_dim"], arch["channels_mlp_dim"]
    classes = arch.get("num_classes") or 0
    s = (height // patch_h) * (width // patch_w)
    sharded = blocks * (s * ds + ds + ds * s + c * dc + dc + dc * c) + c * classes + classes
    replicated = patch_h * patch_w * channels * c + c + blocks * (4 * c + s + c) + 2 * c
    params = sharded + replicated
    state = state_bytes * (replicated + sharded / m)
    block = 6 * s * c + (2 * c * ds + 2 * s * dc) / m
    per_image = (blocks * s * c + block if arch.get("remat") else blocks * block) + 2 * s * c
    activations = batch_per_replica * per_image * activation_bytes
    return dict(params=params, state=state, activations=activations, total=state + activations)


def memory_per_device(variant, batch_per_replica, model_parallel_size=1, image_size=224,
                      num_classes=1000, activation_bytes=4, state_bytes=16, remat=False):
    """`training_memory` of a paper variant (e.g. "B/16") at `image_size`, in bytes."""
    arch = dict(variant_config(variant), image_shape=(image_size, image_size, 3),
                num_classes=num_classes, remat=remat)
    return training_memory(arch, batch_per_replica, model_parallel_size, activation_bytes,
                           state_bytes)


def mixed_precision_choice(setting, memory, backend=None, cpu_bf16=None):
    """(whether to train in "mixed_bfloat16", why), for `train.py` to print.

    `setting` when it is a bool. For "auto", from what was measured
    (docs/benchmarks.md, "bfloat16"):
    - TPUs and GPUs: yes; their matrix units run bfloat16 at 2x float32 or more.
    - CPUs on PyTorch: only with bfloat16 matrix instructions (`cpu_bf16`:
      AVX512-BF16 or AMX; `runtime.cpu_has_bf16_matmul` when None), where
      a small Mixer's step ran 1.70x faster; without them PyTorch emulates
      bfloat16 and ran at 0.02x.
    - CPUs on JAX and TensorFlow: no. XLA:CPU converts a bfloat16 dot's
      operands to float32, multiplies in float32 and rounds every
      elementwise result back (`benchmarks/xla_bf16.py` prints the
      optimised HLO), so bfloat16 only adds passes: 0.64-0.82x float32 on
      a CPU with AVX512-BF16, 0.84-1.0x on one with AVX2 only.
    `backend` defaults to Keras' backend.
    """
    if setting != "auto":
        return bool(setting), "as the config sets it"
    if memory.kind in ("tpu", "gpu"):
        return True, f"bfloat16 matrix units on the {memory.kind.upper()}"
    backend = backend or keras.backend.backend()
    if backend == "torch":
        if cpu_bf16 is None:
            from keras_mixer import runtime

            cpu_bf16 = runtime.cpu_has_bf16_matmul()
        if cpu_bf16:
            return True, "PyTorch on a CPU with bfloat16 matrix instructions (AVX512-BF16 or AMX)"
        return False, ("PyTorch emulates bfloat16 on a CPU without AVX512-BF16 or AMX "
                       "(0.02x float32 measured)")
    return False, (f"XLA on the CPU ({backend}) computes bfloat16 matmuls in float32 with "
                   "conversions around them (0.64-1.0x float32 measured)")


def choose_mixed_precision(setting, memory, backend=None, cpu_bf16=None):
    """Whether to train in "mixed_bfloat16": `mixed_precision_choice`'s answer."""
    return mixed_precision_choice(setting, memory, backend, cpu_bf16)[0]


# Of a device's memory, what the estimate may fill: activations are +-50%,
# and XLA, the runtime and the input pipeline need room of their own.
BUDGET_FRACTION = {"tpu": 0.8, "gpu": 0.8, "cpu": 0.6}
MAX_STEPS_PER_EXECUTION = 32


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How a global batch is computed on the devices found; see `plan_batch`.

    Attributes:
        global_batch: images per optimizer update (the recipe's batch).
        grad_accum_steps: Keras steps (micro-batches) per update.
        step_batch: images per Keras step, over all devices
            (`global_batch / grad_accum_steps`): the batch the data yields.
        per_device_batch: images per device per step.
        num_replicas: model copies the step batch is split over.
        mixed_precision: train in "mixed_bfloat16".
        steps_per_execution: Keras steps per compiled call.
        estimated_bytes: `training_memory` of one device at this plan.
        memory: the `DeviceMemory` planned for.
        budget_bytes: the part of it the estimate may fill.
    """

    global_batch: int
    grad_accum_steps: int
    step_batch: int
    per_device_batch: int
    num_replicas: int
    mixed_precision: bool
    steps_per_execution: int
    estimated_bytes: float
    memory: DeviceMemory
    budget_bytes: float

    @property
    def fits(self):
        return self.estimated_bytes <= self.budget_bytes

    def describe(self):
        accum = (f" = {self.grad_accum_steps} accumulated steps of {self.step_batch}"
                 if self.grad_accum_steps > 1 else "")
        return (
            f"global batch {self.global_batch}{accum}, {self.per_device_batch} per device "
            f"on {self.num_replicas} x {self.memory.describe()}; "
            f"{'bfloat16' if self.mixed_precision else 'float32'}; steps_per_execution "
            f"{self.steps_per_execution}; estimated {_size(self.estimated_bytes)} per "
            f"device of a {_size(self.budget_bytes)} budget"
        )

    def to_dict(self):
        out = dataclasses.asdict(self)
        out["memory"] = dataclasses.asdict(self.memory)
        out["description"] = self.describe()
        return out


def _size(num_bytes):
    """Bytes as GiB, or MiB below one GiB (a digits model needs 13 MiB)."""
    if num_bytes < GIB:
        return f"{num_bytes / 1024 ** 2:.0f} MiB"
    return f"{num_bytes / GIB:.1f} GiB"


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batch(model, global_batch, placement=None, mixed_precision=False,
               grad_accum_steps="auto", steps_per_execution="auto", steps_per_epoch=None,
               total_updates=None, memory=None, state_bytes=16):
    """Chooses gradient accumulation and steps per execution for the devices found.

    The global batch (the recipe's, which its learning rate was tuned for)
    is kept. With `grad_accum_steps="auto"` it is split into the fewest
    equal accumulated steps whose per-device share fits the device's memory
    budget by `training_memory`. `steps_per_execution="auto"` is 1 except on
    TPUs, where a compiled call of up to `MAX_STEPS_PER_EXECUTION` steps
    saves a host round trip per step; it divides the epoch and the run, so
    that Keras' epochs, the schedule and resumed runs stay aligned.

    Args:
        model: the `MLPMixer` (or a dict of its arguments) to train.
        global_batch: images per optimizer update.
        placement: the run's `Placement` (default: one device).
        mixed_precision: bool, whether the run uses "mixed_bfloat16"
            (see `choose_mixed_precision`).
        grad_accum_steps, steps_per_execution: "auto" or a fixed int.
        steps_per_epoch, total_updates: optimizer updates per epoch and in
            all, for `steps_per_execution`.
        memory: a `DeviceMemory` (default: `device_memory(placement)`).
        state_bytes: bytes of optimizer state per parameter (16 for Adam,
            12 for SGD with momentum).

    Returns:
        A `BatchPlan`; `plan.fits` is False (and a warning says what to do)
        when even one image per device exceeds the estimate's budget.
    """
    if placement is not None:
        placement.check_batch_size(global_batch)  # with the multiples that would split
    memory = memory or distribute.device_memory(placement)
    replicas = getattr(placement, "num_replicas", 1) or 1
    model_parallel = getattr(placement, "model_parallel_size", 1) or 1
    budget = BUDGET_FRACTION[memory.kind] * memory.bytes
    act_bytes = 2 if mixed_precision else 4

    def estimate(accum):
        per_device = global_batch // accum // replicas
        return training_memory(model, per_device, model_parallel, act_bytes, state_bytes)["total"]

    if grad_accum_steps == "auto":
        # Accumulated steps must split the global batch evenly over replicas
        # (1 always does: the global batch was checked above).
        options = [a for a in _divisors(global_batch) if (global_batch // a) % replicas == 0]
        accum = next((a for a in options if estimate(a) <= budget), options[-1])
    else:
        accum = int(grad_accum_steps)
    step_batch = global_batch // accum
    if steps_per_execution == "auto":
        spe = 1
        if memory.kind == "tpu" and steps_per_epoch:
            span = math.gcd(steps_per_epoch * accum, (total_updates or steps_per_epoch) * accum)
            spe = max(d for d in _divisors(span) if d <= MAX_STEPS_PER_EXECUTION)
    else:
        spe = int(steps_per_execution)
    plan = BatchPlan(
        global_batch=global_batch, grad_accum_steps=accum, step_batch=step_batch,
        per_device_batch=step_batch // replicas, num_replicas=replicas,
        mixed_precision=bool(mixed_precision), steps_per_execution=spe,
        estimated_bytes=estimate(accum), memory=memory, budget_bytes=budget,
    )
    if not plan.fits:
        logging.warning(
            "The estimate for this plan (%s) exceeds the device's memory budget. Use "
            "mixed_precision=True, --set model.remat=True, model parallelism on JAX "
            "(--distribution model), more devices, or a smaller batch_size (scale "
            "learning_rate with it).", plan.describe(),
        )
    return plan
