"""Devices: which accelerators a run uses, and how the model and batches are split.

The only module with per-backend branches for devices, and the only one
that reaches into private Keras or tf.distribute attributes (each such
reach has a test in tests/test_distribute.py). It also answers what the
trainer asks of the backend: XLA or not (`jit_compile_setting`), a
variable's full value on any placement (`variable_to_numpy`), and how much
memory a device has (`device_memory`, which `keras_mixer.plan` plans
batches for). `setup` returns a
`Placement`; the training code builds the model and optimizer inside
`placement.scope()`, feeds each host the batch `placement.host_batch_size`
of its `placement.shard` of the data, and writes `placement.to_dict()`
into the work directory.

- TensorFlow: a TPU (this TPU VM's, or a named one) gives a
  `TPUStrategy`; several GPUs give a `MirroredStrategy`; otherwise the
  default strategy. Keras splits each global batch over the replicas. A
  TPU that TensorFlow cannot initialise (the TensorFlow pip installs has no
  TPU support, as on Colab's TPU runtime) is an error naming the fixes:
  the JAX backend, or `tensorflow-tpu` on a Cloud TPU VM.
- JAX: `keras.distribution.DataParallel` over every device, or
  `ModelParallel` on a ("batch", "model") mesh whose "model" axis shards
  the MLP kernels (see `layout_map`). Several hosts start through
  `keras.distribution.initialize()`; each host reads its own shard.
- PyTorch: one device. Asking for data or model parallelism is an error.

Global batch and learning rate: configs give the global batch size (the
one the recipes' learning rates were tuned for), so moving from 1 to 8
devices changes neither; each device gets `batch_size / num_replicas`.
"""

import contextlib
import dataclasses
import glob
import logging
import os

import keras
import numpy as np

from keras_mixer import cli


MODES = ("auto", "data", "model", "none")

# Environment variables that start a multi-host JAX run: Keras' own, JAX's
# coordinator variable and KERAS_MIXER_MULTI_HOST. cli.py holds the list
# (it reads it before Keras is imported).
MULTI_HOST_ENV = cli.MULTI_HOST_ENV


@dataclasses.dataclass
class Placement:
    """Where a run lives. Build with `setup`.

    Attributes:
        backend: the Keras backend.
        mode: "none", "data" or "model" (resolved: "auto" never remains).
        num_replicas: how many ways each global batch is split.
        model_parallel_size: devices one model is sharded over (1 unless "model").
        num_devices: accelerators (or CPU devices) in use, over all hosts.
        num_processes: hosts (processes) in the run.
        process_index: this host's index.
        strategy: the `tf.distribute.Strategy` (TensorFlow), else None.
        distribution: the `keras.distribution.Distribution` (JAX), else None.
        description: one line for logs, e.g. "DataParallel over 8 TPU devices".
    """

    backend: str
    mode: str
    num_replicas: int = 1
    model_parallel_size: int = 1
    num_devices: int = 1
    num_processes: int = 1
    process_index: int = 0
    strategy: object = None
    distribution: object = None
    description: str = "one device"

    def scope(self):
        """The scope in which to create the model, compile it and call `fit`."""
        if self.strategy is not None:
            return self.strategy.scope()
        if self.distribution is not None:
            return self.distribution.scope()
        return contextlib.nullcontext()

    @property
    def shard(self):
        """`(num_shards, shard_index)` of this host's part of the training data.

        Hosts that hold parts of one model copy (model parallelism wider
        than a host) read the same shard.
        """
        if self.strategy is not None or self.num_processes == 1:
            return 1, 0
        if self.num_replicas >= self.num_processes:
            return self.num_processes, self.process_index
        return self.num_replicas, self.process_index // (self.num_processes // self.num_replicas)

    @property
    def is_chief(self):
        """Whether this host writes files (checkpoints, logs, models)."""
        return self.process_index == 0

    def check_batch_size(self, batch_size, name="batch_size"):
        """Raises a `ValueError` unless `batch_size` splits evenly over replicas and hosts."""
        for count, what in ((self.num_replicas, "replicas"), (self.shard[0], "input shards")):
            if batch_size % count:
                lower = batch_size - batch_size % count
                raise ValueError(
                    f"{name}={batch_size} (the global batch) does not split over the "
                    f"{count} {what} of {self.description}. Use a multiple of {count}, "
                    f"e.g. {lower or count} or {lower + count}."
                )

    def host_batch_size(self, batch_size):
        """The part of a global batch that one host's input pipeline produces."""
        self.check_batch_size(batch_size)
        return batch_size // self.shard[0]  # A TF client feeds every replica; Keras splits.

    def to_dict(self):
        return {
            "backend": self.backend, "mode": self.mode, "num_replicas": self.num_replicas,
            "model_parallel_size": self.model_parallel_size, "num_devices": self.num_devices,
            "num_processes": self.num_processes, "process_index": self.process_index,
            "description": self.description,
        }


def setup(mode="auto", model_parallel_size=None, tpu=None):
    """Finds the devices and returns the `Placement` of a run.

    Args:
        mode: "auto" (every device found, data parallel), "data", "model"
            (shard the large kernels; JAX only) or "none" (one device).
        model_parallel_size: with "model", devices per model copy (the
            "model" mesh axis; default: the devices of one host).
        tpu: TensorFlow only: a TPU name or address to connect to (default:
            `$TPU_NAME`, else this TPU VM's chips, found from its device
            files without a network round trip). A TPU that cannot be used
            is an error, never a silent CPU run.

    Returns:
        A `Placement`.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown distribution mode {mode!r}. Valid: {', '.join(MODES)}.")
    if model_parallel_size is not None and mode != "model":
        raise ValueError(
            f"model_parallel_size={model_parallel_size} needs mode='model' (got {mode!r})."
        )
    backend = keras.backend.backend()
    if tpu is not None and backend != "tensorflow":
        raise ValueError(
            f"tpu={tpu!r} names a TPU for TensorFlow's TPUStrategy; the {backend} "
            "backend finds its devices itself (JAX lists a TPU VM's cores). Drop it."
        )
    if backend != "jax":
        _refuse_multi_process(backend)
    if backend == "jax":
        placement = _setup_jax(mode, model_parallel_size)
    elif backend == "tensorflow":
        placement = _setup_tensorflow(mode, tpu)
    else:
        placement = _setup_single(backend, mode)
    logging.info("Distribution: %s", placement.description)
    return placement


def _tf_config_workers(environ):
    import json

    try:
        cluster = json.loads(environ.get("TF_CONFIG") or "{}").get("cluster", {})
    except (ValueError, AttributeError):
        return 0
    return sum(len(cluster.get(kind, ())) for kind in ("chief", "worker"))


def _refuse_multi_process(backend, environ=None):
    """A multi-process start on TensorFlow or PyTorch is an error that names JAX.

    PyTorch: Keras 3.15 has no multi-process training. TensorFlow:
    `MultiWorkerMirroredStrategy` fails inside Keras 3.15 (keras issue
    20585, tensorflow 72388) unless patched; keras-mixer's multi-host path
    is JAX's, tested with real processes (docs/distributed.md).
    """
    environ = os.environ if environ is None else environ
    workers = _tf_config_workers(environ) if backend == "tensorflow" else 0
    if not (multi_host_wanted(environ) or workers > 1):
        return
    what = (f"TF_CONFIG names {workers} workers" if workers > 1 else
            "the environment describes a multi-process run (" + ", ".join(
                k for k in MULTI_HOST_ENV if environ.get(k)) + ")")
    why = ("Keras has no multi-process training for PyTorch yet" if backend == "torch"
           else "MultiWorkerMirroredStrategy fails inside Keras (keras issue 20585)")
    raise ValueError(
        f"{what}, but keras-mixer trains across processes on the JAX backend only "
        f"({backend}: {why}). "
        "Set KERAS_BACKEND=jax on every host (docs/distributed.md), or unset those variables "
        "to train in one process."
    )


def _one_device(backend, mode, why):
    if mode in ("data", "model"):
        logging.warning("Distribution %r asked for, but %s: training on one device.", mode, why)
    return Placement(backend=backend, mode="none", description=f"one device ({why})")


# --- PyTorch (and any other backend) -------------------------------------------


def _setup_single(backend, mode):
    if mode in ("data", "model"):
        raise ValueError(
            f"{'Data' if mode == 'data' else 'Model'} parallelism is not available on the "
            f"{backend} backend: keras-mixer distributes through tf.distribute "
            "(KERAS_BACKEND=tensorflow: TPUs, several GPUs) and keras.distribution "
            "(KERAS_BACKEND=jax: data and model parallel, several hosts). Use one of "
            "those backends, or mode 'none' to train on one device."
        )
    return Placement(backend=backend, mode="none", description=f"one device ({backend} backend)")


# --- TensorFlow ---------------------------------------------------------------


def _tpu_devices():
    """The TPU device files of this machine (a TPU VM: Colab's TPU runtime,
    Kaggle's, a Cloud TPU VM), from the file system only: a machine without
    a TPU learns it in microseconds, with no network round trip."""
    return sorted(glob.glob("/dev/accel[0-9]*") + glob.glob("/dev/vfio/[0-9]*"))


def _tpu_resolver(tpu):
    import tensorflow as tf

    return tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)


def _tensorflow_cannot_use_tpu(devices, error):
    import tensorflow as tf

    return RuntimeError(
        f"This machine has a TPU ({', '.join(devices[:2])}), but TensorFlow "
        f"{tf.__version__} cannot initialise it ({type(error).__name__}: {error}). "
        "The TensorFlow that `pip install` brings has no TPU support; Colab's and "
        "Kaggle's TPU runtimes are such machines. Either train on the JAX backend "
        "(set KERAS_BACKEND=jax before Keras is imported: keras-mixer then runs on "
        "the TPU through keras.distribution and uses TensorFlow only for tf.data on "
        "the CPU), or, on a Cloud TPU VM, install the `tensorflow-tpu` build that "
        "matches this TensorFlow. To train on the CPU anyway, pass distribution 'none'."
    )


def connect_tpu(tpu):
    """Connects to a TPU and returns its `TPUStrategy`.

    `tpu`: a name or "grpc://host:port" (a TPU reached over the network), or
    "local" (this TPU VM's own chips). Failure is a `RuntimeError` that says
    what to check; it never falls back to the CPU silently.
    """
    import tensorflow as tf

    try:
        resolver = _tpu_resolver(tpu)
        if tpu != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except Exception as error:  # the resolver raises many kinds; say one thing
        if tpu == "local":
            raise _tensorflow_cannot_use_tpu(_tpu_devices(), error) from error
        raise RuntimeError(
            f"Could not connect to TPU {tpu!r}: {type(error).__name__}: {error}. "
            "Check the name and zone (`gcloud compute tpus list`), that this VM may "
            "reach it, and that it runs a TensorFlow version matching this one. To "
            "train without it, pass distribution 'none'."
        ) from error


def _setup_tensorflow(mode, tpu):
    import tensorflow as tf

    if mode == "model":
        raise ValueError(
            "Model parallelism (sharded kernels) uses keras.distribution, which "
            "Keras implements for the JAX backend: set KERAS_BACKEND=jax. On "
            "TensorFlow, use mode 'data' (TPUStrategy or MirroredStrategy)."
        )
    if mode == "none":
        return Placement(backend="tensorflow", mode="none", description="one device (mode 'none')")
    # A named TPU (TPU_NAME: a TPU reached over the network), else this
    # VM's own. Colab's retired TPU Node (COLAB_TPU_ADDR) is not looked for:
    # Colab's TPU runtimes are TPU VMs now.
    target = tpu or os.environ.get("TPU_NAME") or ("local" if _tpu_devices() else None)
    if target is not None:
        strategy = connect_tpu(target)
        replicas = strategy.num_replicas_in_sync
        return Placement(
            backend="tensorflow", mode="data", num_replicas=replicas,
            num_devices=replicas, strategy=strategy,
            description=f"TPUStrategy over {replicas} TPU cores",
        )
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        devices = [d.name for d in gpus]
        kind = "GPUs"
    elif mode == "data" and len(tf.config.list_logical_devices("CPU")) > 1:
        # Logical CPU devices: how tests (and CPU-only debugging) run the
        # multi-replica path without accelerators.
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        kind = "CPU devices"
    else:
        return _one_device("tensorflow", mode, "no TPU and fewer than 2 GPUs found")
    strategy = tf.distribute.MirroredStrategy(devices)
    return Placement(
        backend="tensorflow", mode="data", num_replicas=len(devices), num_devices=len(devices),
        strategy=strategy, description=f"MirroredStrategy over {len(devices)} {kind}",
    )


# --- JAX ----------------------------------------------------------------------


# How long the coordination service waits for a silent process before it
# ends the others (JAX's default is 100 s): seconds, or the variable.
HEARTBEAT_TIMEOUT_S = 10
HEARTBEAT_ENV = "KERAS_MIXER_HEARTBEAT_TIMEOUT"


def multi_host_wanted(environ=None):
    """Whether the environment describes a multi-host run (see `initialize_multi_host`)."""
    return cli.multi_host_process(environ) is not None


def initialize_multi_host(environ=None):
    """Starts a multi-host JAX run when the environment describes one.

    Must run before any JAX computation: it asks nothing of JAX's backend
    (`jax.distributed.is_initialized` is the guard; `jax.process_count`
    would start a one-process backend, after which JAX refuses to join a
    cluster). Reads Keras' variables (`KERAS_DISTRIBUTION_JOB_ADDRESSES`,
    its first address the coordinator, `..._NUM_PROCESSES`,
    `..._PROCESS_ID`) or JAX's `JAX_COORDINATOR_ADDRESS`; on a TPU pod
    slice or under SLURM set `KERAS_MIXER_MULTI_HOST=1` and JAX finds the
    rest itself. Returns whether a multi-host run is on.

    It calls `jax.distributed.initialize` itself rather than through
    `keras.distribution.initialize`, for what only that call takes: the
    heartbeat timeout (`KERAS_MIXER_HEARTBEAT_TIMEOUT`, default 10 s),
    after which a lost process's partners are ended instead of waiting
    ~100 s, and on CPU hosts gloo as JAX's cross-process collectives (JAX
    has none on CPUs by default).
    """
    environ = os.environ if environ is None else environ
    if not multi_host_wanted(environ):
        return False
    import jax

    if jax.distributed.is_initialized():  # Already started (by the user, or an earlier call).
        return True
    addresses = environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES") or None
    count = environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES")
    index = environ.get("KERAS_DISTRIBUTION_PROCESS_ID")
    if addresses and "," in addresses:
        listed = addresses.split(",")
        if count is not None and int(count) != len(listed):
            raise ValueError(
                f"KERAS_DISTRIBUTION_JOB_ADDRESSES lists {len(listed)} addresses but "
                f"KERAS_DISTRIBUTION_NUM_PROCESSES={count}: give every process the same list "
                "(or only the coordinator's address) and the process count."
            )
        addresses = listed[0]
    try:
        heartbeat = int(environ.get(HEARTBEAT_ENV, HEARTBEAT_TIMEOUT_S))
    except ValueError:
        raise ValueError(f"{HEARTBEAT_ENV}={environ[HEARTBEAT_ENV]!r}: give whole seconds, e.g. 10.") from None
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in environ:
        # Only the CPU client reads it: TPU and GPU hosts keep their own.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import inspect

    kwargs = dict(coordinator_address=addresses, num_processes=int(count) if count else None,
                  process_id=int(index) if index else None)
    accepted = inspect.signature(jax.distributed.initialize).parameters
    if "heartbeat_timeout_seconds" in accepted:
        kwargs["heartbeat_timeout_seconds"] = heartbeat
    if "shutdown_timeout_seconds" in accepted:
        kwargs["shutdown_timeout_seconds"] = max(heartbeat * 3, 30)
    jax.distributed.initialize(**kwargs)
    logging.info("Joined a multi-host run as process %d of %d.", jax.process_index(), jax.process_count())
    return True


def layout_map(device_mesh):
    """The `LayoutMap` of `ModelParallel`: which kernels the "model" axis shards.

    Each MLP's first Dense is split by output units and its second by input
    units (so one all-reduce per MLP, as in Megatron), in the token-mixing
    and channel-mixing MLPs of every block; the head is split by class.
    Everything else (stem, LayerNorms, second biases) is replicated. Keys
    are the model's stable sublayer paths.
    """
    layouts = keras.distribution.LayoutMap(device_mesh)
    mlp = r"block_\d+/(token|channel)_mixing"
    layouts[mlp + r"/Dense_0/kernel"] = (None, "model")
    layouts[mlp + r"/Dense_0/bias"] = ("model",)
    layouts[mlp + r"/Dense_1/kernel"] = ("model", None)
    layouts[r"head/kernel"] = (None, "model")
    layouts[r"head/bias"] = ("model",)
    return layouts


class MixerModelParallel(keras.distribution.ModelParallel):
    """`ModelParallel` that replicates a variable whose sharded dimension
    does not divide by the mesh axis (e.g. a 21843-class head over 8
    devices), instead of failing deep inside JAX."""

    def get_variable_layout(self, variable):
        layout = super().get_variable_layout(variable)
        mesh = dict(zip(self.device_mesh.axis_names, self.device_mesh.shape))
        for size, axis in zip(variable.shape, layout.axes):
            if axis is not None and size % mesh[axis]:
                logging.warning(
                    "%s (shape %s) is replicated: dimension %d does not split over "
                    "the %d devices of the %r axis.", variable.path, tuple(variable.shape),
                    size, mesh[axis], axis,
                )
                return keras.distribution.TensorLayout([None] * len(variable.shape), self.device_mesh)
        return layout


def _setup_jax(mode, model_parallel_size):
    import jax

    initialize_multi_host()
    devices = jax.devices()
    count = len(devices)
    processes, index = jax.process_count(), jax.process_index()
    kind = f"{devices[0].platform.upper()} devices"
    hosts = f" on {processes} hosts" if processes > 1 else ""
    if mode == "none" or (mode in ("auto", "data") and count == 1):
        if mode == "none" and processes > 1:
            raise ValueError("mode 'none' cannot run on several hosts; use 'data' or 'model'.")
        if mode == "none":
            return Placement(backend="jax", mode="none", description="one device (mode 'none')")
        return _one_device("jax", mode, f"JAX sees one {devices[0].platform} device")
    keras_devices = keras.distribution.list_devices()
    if mode in ("auto", "data"):
        distribution = keras.distribution.DataParallel(
            devices=keras_devices, auto_shard_dataset=False
        )
        return Placement(
            backend="jax", mode="data", num_replicas=count, num_devices=count,
            num_processes=processes, process_index=index, distribution=distribution,
            description=f"DataParallel over {count} {kind}{hosts}",
        )
    size = model_parallel_size or jax.local_device_count()
    if size < 1 or count % size:
        raise ValueError(
            f"model_parallel_size={size} must divide the {count} devices "
            f"({', '.join(str(s) for s in range(1, count + 1) if count % s == 0)} do)."
        )
    mesh = keras.distribution.DeviceMesh(
        shape=(count // size, size), axis_names=("batch", "model"), devices=keras_devices
    )
    distribution = MixerModelParallel(
        layout_map=layout_map(mesh), batch_dim_name="batch", auto_shard_dataset=False
    )
    return Placement(
        backend="jax", mode="model", num_replicas=count // size, model_parallel_size=size,
        num_devices=count, num_processes=processes, process_index=index,
        distribution=distribution,
        description=f"ModelParallel over {count} {kind}{hosts}: mesh {count // size} (batch) x {size} (model)",
    )


# --- What the trainer asks of the backend ----------------------------------------
# Each reach into a private Keras or tf.distribute attribute below has a
# test in tests/test_distribute.py that fails when Keras changes under it.


def jit_compile_setting(placement=None):
    """The `jit_compile` argument `optim.compile_model` gives `model.compile`,
    and what `MLPMixer.compile` makes of `jit_compile="auto"`.

    True (XLA) on TensorFlow without a distribution strategy (`placement`'s,
    or, without a placement, one whose scope is open), Keras' "auto"
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
    if placement is None:
        import tensorflow as tf

        return "auto" if tf.distribute.has_strategy() else True
    return "auto" if placement.strategy is not None else True


def process_count():
    """The processes (hosts) of this run: JAX's count, 1 on other backends."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def any_process(flag):
    """Whether `flag` is true on any process of the run; every process must
    call it at the same point. One process: the flag itself."""
    if process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32))).any())


def variable_to_numpy(variable):
    """The full value of a model or optimizer variable as a NumPy array, on
    every placement: sharded over hosts, mirrored over replicas, or local.

    A JAX array sharded over several hosts is gathered, and every host
    takes part, so every host must call this (only the chief writes).
    """
    value = variable.value
    if getattr(value, "is_fully_addressable", True) is False:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    if hasattr(value, "values") and hasattr(value, "_primary"):
        # A tf.distribute mirrored variable: every replica holds the same
        # value; read the primary copy (tf.distribute's private `_primary`).
        value = value._primary
    return np.asarray(keras.ops.convert_to_numpy(value))


def sync_state(model):
    """Copies the JAX trainer's state back into `model`'s variables.

    Mid-epoch, Keras' JAX trainer keeps the state outside the variables;
    reading them (to write a training state) needs this first, and the
    next step reads them again. Nothing to do on other backends.
    """
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def feeds_batches_itself(model):
    """Whether `MLPMixer.predict` may feed a NumPy array to the compiled
    predict step batch by batch: on TensorFlow without a tf.distribute
    strategy (the model's own or an open scope), and on PyTorch. JAX, a
    strategy, or a distribution take Keras' own `predict`."""
    backend = keras.backend.backend()
    if backend == "torch":
        return keras.distribution.distribution() is None
    if backend != "tensorflow":
        return False
    import tensorflow as tf

    return getattr(model, "_distribute_strategy", None) is None and not tf.distribute.has_strategy()


def release_strategy(model):
    """Lets a built model's `fit` take its tf.distribute strategy from the scope.

    Keras' TensorFlow trainer, for a model created under a tf.distribute
    strategy, takes one batch from the training iterator at the start of
    every `fit` to build the model, and that batch is never trained on
    (Keras 3.15). Once everything is built (`training` does it with a zero
    batch), dropping the model's private reference makes Keras read the
    strategy from the scope that `fit` runs in (the same one) and skip
    that build.
    """
    if getattr(model, "_distribute_strategy", None) is not None:
        model._distribute_strategy = None


# --- What the devices offer -------------------------------------------------------


def cpu_only():
    """Whether this process computes on CPUs only (no GPU or TPU), on any backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return all(device.platform == "cpu" for device in jax.devices())
    if backend == "tensorflow":
        import tensorflow as tf

        return not (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    if backend == "torch":
        import torch

        return not torch.cuda.is_available()
    return False


# High-bandwidth memory of one JAX TPU device, by `device_kind`, for when
# the runtime does not report it (GiB; v2 and v3 devices are cores).
TPU_MEMORY_GIB = (
    ("v6 lite", 32), ("v6e", 32), ("v5 lite", 16), ("v5e", 16), ("v5p", 95), ("v5", 95),
    ("v4", 32), ("v3", 16), ("v2", 8),
)
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """The memory of one device a run trains on.

    Attributes:
        kind: "tpu", "gpu" or "cpu".
        name: e.g. "TPU v5 lite", "NVIDIA H200", "CPU".
        bytes: memory one device may use.
        source: where the figure came from, for the printed plan.
    """

    kind: str
    name: str
    bytes: int
    source: str

    def describe(self):
        return f"{self.name} ({self.bytes / GIB:.1f} GiB, {self.source})"


def _tpu_table_bytes(name):
    lowered = name.lower()
    for key, gib in TPU_MEMORY_GIB:
        if key in lowered:
            return gib * GIB
    return None


def _host_memory_bytes(meminfo="/proc/meminfo"):
    """Available host RAM (MemAvailable), else the physical total."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _nvidia_smi_bytes():
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()
        return int(out[0]) * 1024 ** 2 if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def device_memory(placement=None):
    """Finds the kind and memory of the devices a run trains on.

    `$KERAS_MIXER_DEVICE_MEMORY_GB` overrides the figure (a shared GPU, a
    TPU the runtime does not describe). TPUs: the runtime's own limit on
    JAX, else `TPU_MEMORY_GIB` by chip (TensorFlow reads the chip from
    `$TPU_ACCELERATOR_TYPE`, which TPU VMs set). GPUs: the runtime's limit
    (JAX: what XLA may allocate; PyTorch: the card's total), else
    `nvidia-smi`. CPUs: the available RAM, shared by the CPU devices.
    """
    backend = keras.backend.backend()
    kind, name, size, source = "cpu", "CPU", None, "available RAM"
    devices = 1
    if backend == "jax":
        import jax

        local = jax.local_devices()
        device = local[0]
        kind = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(device.platform, "cpu")
        devices = len(local)
        if kind != "cpu":
            name = device.device_kind
            if kind == "tpu" and not name.upper().startswith("TPU"):
                name = f"TPU {name}"
            try:
                size = (device.memory_stats() or {}).get("bytes_limit")
                source = "reported by JAX"
            except Exception:  # not every runtime implements memory_stats
                size = None
            if size is None and kind == "tpu":
                size, source = _tpu_table_bytes(device.device_kind), "HBM per chip"
    elif backend == "tensorflow":
        import tensorflow as tf

        strategy = getattr(placement, "strategy", None)
        if strategy is not None and "TPU" in type(strategy).__name__:
            kind = "tpu"
            accelerator = os.environ.get("TPU_ACCELERATOR_TYPE", "")
            name = f"TPU {accelerator}".strip()
            size, source = _tpu_table_bytes(accelerator.replace("litepod", " lite")), "HBM per chip"
        elif tf.config.list_logical_devices("GPU"):
            kind, name = "gpu", "GPU"
            devices = len(tf.config.list_logical_devices("GPU"))
            size, source = _nvidia_smi_bytes(), "nvidia-smi"
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            kind, name = "gpu", torch.cuda.get_device_name(0)
            size, source = torch.cuda.get_device_properties(0).total_memory, "reported by PyTorch"
    if kind == "cpu":
        devices = max(devices, getattr(placement, "num_replicas", 1) or 1)
        size = _host_memory_bytes() // devices
        if devices > 1:
            source = f"available RAM / {devices} devices"
    override = os.environ.get("KERAS_MIXER_DEVICE_MEMORY_GB")
    if override:
        size, source = int(float(override) * 1e9), "KERAS_MIXER_DEVICE_MEMORY_GB"
    if size is None:
        size, source = 16 * GIB, "not reported: assumed 16 GiB (set KERAS_MIXER_DEVICE_MEMORY_GB)"
    return DeviceMemory(kind=kind, name=name, bytes=int(size), source=source)
