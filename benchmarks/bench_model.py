"""Images/s of keras-mixer next to the implementations users would otherwise pick.

    python benchmarks/bench_model.py                          # small config, float32 + bfloat16
    python benchmarks/bench_model.py --configs small s16 b16 --repeats 5
    python benchmarks/bench_model.py --backends jax --dtypes float32

Needs the benchmark extra (`pip install -e ".[benchmark]"`: flax, timm).

One worker subprocess per Keras backend, each timing keras-mixer and that
backend's reference in the same process, alternating between them:
- JAX: the official Flax module (`flax_reference.py`, checked against the
  official fixture before any timing), with optax Adam.
- TensorFlow: the same math written in plain TensorFlow, compiled with XLA
  (`tf.function(jit_compile=True)`), with a hand-written Adam update.
- PyTorch: the same math in eager `torch.nn.functional` ("torch_fn":
  `F.linear`, `F.layer_norm`, tanh GELU, per-block weights, as timm's
  `MlpMixer` computes it), with torch.optim.Adam. `--torch_reference timm`
  takes timm's `MlpMixer` instead (exact GELU, as timm has it; keras-mixer
  is then built with `gelu_approximate=False`, the same math; timm needs a
  torchvision built for the installed torch). With `--torch_compile`, also
  keras-mixer compiled with `jit_compile=True` (torch.compile with
  Inductor) as "keras_tc"; the default is eager, as `train.py` runs it.

Both sides of a pair run the same shapes, batch, dtype and GELU. Modes:
"infer" is a forward pass (keras-mixer: `model.predict_on_batch`);
"predict" is `model.predict` over `PREDICT_BATCHES` batches, the call a
notebook makes (the references run their forward pass as often; the impl
"keras_own" is the same model through Keras' own `Model.predict`, which
`MLPMixer.predict` replaces for NumPy arrays on TensorFlow and PyTorch); "train" is
a full step: forward, backward, Adam update (`model.train_on_batch`).
"keras" is compiled as `train.py` compiles it (`optim.compile_model`'s
`jit_compile`); "keras_plain" as a notebook user writes it, a plain
`model.compile(optimizer=Adam, loss=...)` with every other argument at its
default (`MLPMixer.compile`'s). bfloat16 is
Keras' "mixed_bfloat16" policy (float32 variables, bfloat16 compute), Flax
`dtype=bfloat16`, TensorFlow bfloat16 casts, and `torch.autocast`.

Each (implementation, config, dtype, mode) is timed `--repeats` times, in
turn with its reference, `--steps` steps per timing after a warm-up; the
table shows the median and the spread (min-max) of images/s, the ratio of
the medians to the reference, the model's FLOP/s and the fraction of the
backend's measured matmul peak (`gemm_peak.py`, same process and dtype).

The configs and their FLOP counts are `shapes.py`'s.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from shapes import CONFIGS  # noqa: E402
from shapes import arch  # noqa: E402
from shapes import forward_flops  # noqa: E402
from shapes import num_tokens  # noqa: E402

REFERENCES = {"jax": "flax", "tensorflow": "tf_xla", "torch": "torch_fn"}
# "predict" mode: `model.predict` over this many batches per call (a small
# test set), the references' forward pass as often.
PREDICT_BATCHES = 4


def _data(cfg, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (cfg["batch"], *cfg["image_shape"])).astype("float32")
    labels = rng.integers(0, cfg["num_classes"], cfg["batch"]).astype("int32")
    return images, labels


def _repeated(forward):
    """A reference's "predict": its forward pass once per batch of keras-mixer's call."""
    def run():
        for _ in range(PREDICT_BATCHES):
            out = forward()
        return out

    return run


# --- keras-mixer -------------------------------------------------------------


def keras_runner(cfg, dtype, gelu_approximate=True, jit_compile=None, plain=False):
    """keras-mixer compiled as `train.py` compiles it, or with `plain` as a
    notebook does: `model.compile(optimizer, loss)` and nothing else."""
    import keras
    import numpy as np

    from keras_mixer import MLPMixer
    from keras_mixer import distribute

    keras.config.set_dtype_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
    model = MLPMixer(**arch(cfg), gelu_approximate=gelu_approximate)
    keras.config.set_dtype_policy("float32")
    settings = {}
    if not plain:
        # XLA as `train.py` compiles (Keras' "auto" leaves TensorFlow on CPU without it).
        settings["jit_compile"] = distribute.jit_compile_setting() if jit_compile is None else jit_compile
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **settings)
    images, labels = _data(cfg)
    # On the backend's device, as the references hold theirs: on a GPU, numpy
    # inputs would add a host-to-device copy of the batch to every step.
    images, labels = keras.ops.convert_to_tensor(images), keras.ops.convert_to_tensor(labels)

    def train():
        return model.train_on_batch(images, labels)

    def infer():
        return keras.ops.convert_to_numpy(model.predict_on_batch(images))

    many = np.concatenate([keras.ops.convert_to_numpy(images)] * PREDICT_BATCHES)

    def predict():
        return model.predict(many, batch_size=len(images), verbose=0)

    def keras_own_predict():
        # Keras' own `Model.predict` (its input pipeline), which MLPMixer.predict
        # replaces for NumPy arrays on TensorFlow and PyTorch: the "before".
        return keras.Model.predict(model, many, batch_size=len(images), verbose=0)

    return {"train": train, "infer": infer, "predict": predict, "keras_own_predict": keras_own_predict}


# --- References ----------------------------------------------------------------


def flax_runner(cfg, dtype):
    import flax_reference
    import jax
    import jax.numpy as jnp
    import optax

    module = flax_reference.MlpMixer(
        patch_size=(cfg["patch_size"], cfg["patch_size"]), num_blocks=cfg["num_blocks"],
        hidden_dim=cfg["hidden_dim"], tokens_mlp_dim=cfg["tokens_mlp_dim"],
        channels_mlp_dim=cfg["channels_mlp_dim"], num_classes=cfg["num_classes"],
        dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32,
    )
    images, labels = _data(cfg)
    # The official model takes [-1, 1] inputs; keras-mixer rescales inside.
    images = jnp.asarray(images / 127.5 - 1.0)
    labels = jnp.asarray(labels)
    params = module.init(jax.random.PRNGKey(0), images)
    optimizer = optax.adam(1e-3)
    state = {"params": params, "opt": optimizer.init(params)}

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = module.apply(p, x).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    forward = jax.jit(module.apply)

    def train():
        state["params"], state["opt"], loss = step(state["params"], state["opt"], images, labels)
        return float(loss)

    def infer():
        return forward(state["params"], images).block_until_ready()

    return {"train": train, "infer": infer, "predict": _repeated(infer)}


def tf_xla_runner(cfg, dtype):
    import tensorflow as tf

    compute = tf.bfloat16 if dtype == "bfloat16" else tf.float32
    rng = tf.random.Generator.from_seed(0)
    tokens = num_tokens(cfg)
    c, p = cfg["hidden_dim"], cfg["patch_size"]

    def var(shape, fan_in):
        return tf.Variable(rng.normal(shape) / fan_in ** 0.5)

    weights = {"stem_k": var((p, p, 3, c), p * p * 3), "stem_b": tf.Variable(tf.zeros([c]))}
    for i in range(cfg["num_blocks"]):
        for n in ("ln0", "ln1"):
            weights[f"{i}{n}_g"], weights[f"{i}{n}_b"] = tf.Variable(tf.ones([c])), tf.Variable(tf.zeros([c]))
        for name, width, hidden in (("tok", tokens, cfg["tokens_mlp_dim"]), ("ch", c, cfg["channels_mlp_dim"])):
            weights[f"{i}{name}_w0"] = var((width, hidden), width)
            weights[f"{i}{name}_b0"] = tf.Variable(tf.zeros([hidden]))
            weights[f"{i}{name}_w1"] = var((hidden, width), hidden)
            weights[f"{i}{name}_b1"] = tf.Variable(tf.zeros([width]))
    weights["ln_g"], weights["ln_b"] = tf.Variable(tf.ones([c])), tf.Variable(tf.zeros([c]))
    weights["head_w"] = tf.Variable(tf.zeros([c, cfg["num_classes"]]))
    weights["head_b"] = tf.Variable(tf.zeros([cfg["num_classes"]]))
    keys = sorted(weights)
    variables = [weights[k] for k in keys]
    moments = [(tf.Variable(tf.zeros_like(v)), tf.Variable(tf.zeros_like(v))) for v in variables]
    step_count = tf.Variable(0.0)

    def w(name):
        return tf.cast(weights[name], compute)

    def norm(x, name):
        x = tf.cast(x, tf.float32)
        mean, var_ = tf.nn.moments(x, axes=[-1], keepdims=True)
        y = (x - mean) * tf.math.rsqrt(var_ + 1e-6) * weights[name + "_g"] + weights[name + "_b"]
        return tf.cast(y, compute)

    def mlp(x, prefix):
        y = tf.nn.gelu(tf.matmul(x, w(prefix + "_w0")) + w(prefix + "_b0"), approximate=True)
        return tf.matmul(y, w(prefix + "_w1")) + w(prefix + "_b1")

    def model(images):
        x = tf.cast(images / 127.5 - 1.0, compute)
        x = tf.nn.conv2d(x, w("stem_k"), strides=p, padding="VALID") + w("stem_b")
        x = tf.reshape(x, (-1, tokens, c))
        for i in range(cfg["num_blocks"]):
            y = tf.transpose(norm(x, f"{i}ln0"), (0, 2, 1))
            x = x + tf.transpose(mlp(y, f"{i}tok"), (0, 2, 1))
            x = x + mlp(norm(x, f"{i}ln1"), f"{i}ch")
        x = tf.reduce_mean(norm(x, "ln"), axis=1)
        return tf.matmul(tf.cast(x, tf.float32), weights["head_w"]) + weights["head_b"]

    images, labels = _data(cfg)
    images, labels = tf.constant(images), tf.constant(labels)

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, model(x)))
        grads = tape.gradient(loss, variables)
        step_count.assign_add(1.0)
        correction = tf.sqrt(1 - 0.999 ** step_count) / (1 - 0.9 ** step_count)
        for v, g, (m, s) in zip(variables, grads, moments):
            m.assign(0.9 * m + 0.1 * g)
            s.assign(0.999 * s + 0.001 * tf.square(g))
            v.assign_sub(1e-3 * correction * m / (tf.sqrt(s) + 1e-7))
        return loss

    forward = tf.function(model, jit_compile=True)
    infer = lambda: forward(images).numpy()  # noqa: E731
    return {"train": lambda: float(step(images, labels)), "infer": infer, "predict": _repeated(infer)}


def _torch_device():
    """"cuda" where PyTorch sees a GPU (as Keras' PyTorch backend then uses), else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_batch(cfg, device):
    """`_data`'s batch as the references take it: [-1, 1], NCHW, on `device`."""
    import torch

    images, labels = _data(cfg)
    x = torch.from_numpy(images / 127.5 - 1.0).float().permute(0, 3, 1, 2).contiguous().to(device)
    return x, torch.from_numpy(labels).long().to(device)


def timm_runner(cfg, dtype):
    import torch
    from timm.models.mlp_mixer import MlpMixer

    device = _torch_device()

    model = MlpMixer(
        num_classes=cfg["num_classes"], img_size=cfg["image_shape"][0], patch_size=cfg["patch_size"],
        num_blocks=cfg["num_blocks"], embed_dim=cfg["hidden_dim"],
        mlp_ratio=(cfg["tokens_mlp_dim"] / cfg["hidden_dim"], cfg["channels_mlp_dim"] / cfg["hidden_dim"]),
    )
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _torch_batch(cfg, device)
    autocast = dtype == "bfloat16"

    def train():
        model.train()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)

    def infer():
        model.eval()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return model(x).float().cpu().numpy()

    return {"train": train, "infer": infer, "predict": _repeated(infer)}


def torch_fn_runner(cfg, dtype):
    """The official math in eager `torch.nn.functional`, per-block weights:
    the code a PyTorch user writes by hand (timm's `MlpMixer` computes the
    same, with the exact GELU)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    device = _torch_device()
    tokens = num_tokens(cfg)
    c, p = cfg["hidden_dim"], cfg["patch_size"]

    def param(*shape, fan_in=None, fill=0.0):
        value = torch.randn(*shape) / fan_in ** 0.5 if fan_in else torch.full(shape, fill)
        return torch.nn.Parameter(value.to(device))

    weights = {"stem_w": param(c, 3, p, p, fan_in=3 * p * p), "stem_b": param(c)}
    for i in range(cfg["num_blocks"]):
        for n in ("ln0", "ln1"):
            weights[f"{i}{n}_g"], weights[f"{i}{n}_b"] = param(c, fill=1.0), param(c)
        for name, width, hidden in (("tok", tokens, cfg["tokens_mlp_dim"]), ("ch", c, cfg["channels_mlp_dim"])):
            weights[f"{i}{name}_w0"], weights[f"{i}{name}_b0"] = param(hidden, width, fan_in=width), param(hidden)
            weights[f"{i}{name}_w1"], weights[f"{i}{name}_b1"] = param(width, hidden, fan_in=hidden), param(width)
    weights["ln_g"], weights["ln_b"] = param(c, fill=1.0), param(c)
    weights["head_w"], weights["head_b"] = param(cfg["num_classes"], c), param(cfg["num_classes"])
    w = weights

    def mlp(x, prefix):
        y = F.gelu(F.linear(x, w[prefix + "_w0"], w[prefix + "_b0"]), approximate="tanh")
        return F.linear(y, w[prefix + "_w1"], w[prefix + "_b1"])

    def model(x):
        x = F.conv2d(x, w["stem_w"], w["stem_b"], stride=p).flatten(2).transpose(1, 2)
        for i in range(cfg["num_blocks"]):
            y = F.layer_norm(x, (c,), w[f"{i}ln0_g"], w[f"{i}ln0_b"], 1e-6)
            x = x + mlp(y.transpose(1, 2), f"{i}tok").transpose(1, 2)
            x = x + mlp(F.layer_norm(x, (c,), w[f"{i}ln1_g"], w[f"{i}ln1_b"], 1e-6), f"{i}ch")
        x = F.layer_norm(x, (c,), w["ln_g"], w["ln_b"], 1e-6).mean(1)
        return F.linear(x, w["head_w"], w["head_b"])

    optimizer = torch.optim.Adam(weights.values(), lr=1e-3)
    x, y = _torch_batch(cfg, device)
    autocast = dtype == "bfloat16"

    def train():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)

    def infer():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            return model(x).float().cpu().numpy()

    return {"train": train, "infer": infer, "predict": _repeated(infer)}


RUNNERS = {"keras": keras_runner, "flax": flax_runner, "tf_xla": tf_xla_runner, "timm": timm_runner,
           "torch_fn": torch_fn_runner}


def _time(fn, steps):
    fn()  # warm up: compilation, first allocation
    fn()
    begin = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - begin) / steps


def worker(backend, configs, dtypes, modes, repeats, steps, torch_compile=False,
           torch_reference="torch_fn", plain=True):
    """Runs in a subprocess with KERAS_BACKEND=backend; prints one JSON line per result."""
    import gemm_peak

    REFERENCES["torch"] = torch_reference

    if backend == "jax":
        import flax_reference

        diff = max(flax_reference.check_fixture())
        if diff > 1e-5:
            raise SystemExit(f"The Flax reference differs from the official fixture by {diff}.")
    for name in configs:
        cfg = CONFIGS[name]
        for dtype in dtypes:
            peak = gemm_peak.measure(backend, dtype)
            # Same math on both sides: timm has the exact GELU, the official
            # model (Flax, and the TF code written after it) the tanh one.
            gelu_approximate = REFERENCES[backend] != "timm"
            runners = {"keras": keras_runner(cfg, dtype, gelu_approximate),
                       REFERENCES[backend]: RUNNERS[REFERENCES[backend]](cfg, dtype)}
            if plain:
                runners["keras_plain"] = keras_runner(cfg, dtype, gelu_approximate, plain=True)
            if "predict" in modes:
                # The same model through Keras' own `Model.predict`, side by side.
                own = runners["keras"]
                runners["keras_own"] = {"predict": own["keras_own_predict"]}
            if torch_compile and backend == "torch":
                # keras-mixer under `jit_compile=True`: torch.compile (Inductor).
                runners["keras_tc"] = keras_runner(cfg, dtype, gelu_approximate, jit_compile=True)
            for mode in modes:
                samples = {impl: [] for impl in runners}
                for _ in range(repeats):  # alternate: both see the same machine state
                    for impl, fns in runners.items():
                        if mode not in fns:
                            continue
                        batches = PREDICT_BATCHES if mode == "predict" else 1
                        samples[impl].append(batches * cfg["batch"] / _time(fns[mode], steps))
                for impl, values in samples.items():
                    if not values:
                        continue
                    print("RESULT " + json.dumps(dict(
                        backend=backend, impl=impl, config=name, dtype=dtype, mode=mode,
                        images_per_second=values, peak_gflops=peak,
                        gflop_per_image=forward_flops(cfg) * (3 if mode == "train" else 1) / 1e9,
                    )), flush=True)


def table(results):
    rows = [f"{'backend':<10} {'malloc':<7} {'config':<6} {'dtype':<9} {'mode':<7} {'impl':<11} "
            f"{'img/s median':>12} {'(min-max)':>15} {'x ref':>6} {'GFLOP/s':>8} {'% peak':>7}"]
    for r in results:
        reference = REFERENCES[r["backend"]]
        ref = next(x for x in results if x["backend"] == r["backend"] and x["config"] == r["config"]
                   and x["malloc"] == r["malloc"]
                   and x["dtype"] == r["dtype"] and x["mode"] == r["mode"] and x["impl"] == reference
                   ) if r["impl"] != reference else None
        median = statistics.median(r["images_per_second"])
        ratio = f"{median / statistics.median(ref['images_per_second']):.2f}" if ref else ""
        gflops = median * r["gflop_per_image"]
        rows.append(
            f"{r['backend']:<10} {r['malloc']:<7} {r['config']:<6} {r['dtype']:<9} {r['mode']:<7} {r['impl']:<11} "
            f"{median:>12.1f} {min(r['images_per_second']):>7.1f}-{max(r['images_per_second']):<7.1f} "
            f"{ratio:>6} {gflops:>8.1f} {100 * gflops / r['peak_gflops']:>6.0f}%"
        )
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow", "torch"])
    parser.add_argument("--configs", nargs="+", default=["small"], choices=sorted(CONFIGS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["infer", "predict", "train"],
                        choices=["infer", "predict", "train"])
    parser.add_argument("--torch_reference", choices=["torch_fn", "timm"], default="torch_fn",
                        help="PyTorch's reference: the same math in torch.nn.functional, or timm")
    parser.add_argument("--no_plain", action="store_true",
                        help="leave out keras_plain (the plain model.compile() of a notebook)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--malloc", choices=["tuned", "default", "both"], default="tuned",
        help="glibc malloc settings of the workers: keras_mixer.runtime's (what "
             "train.py applies; the default), glibc's defaults, or both in turn")
    parser.add_argument(
        "--torch_compile", action="store_true",
        help="on PyTorch, also time keras-mixer compiled with jit_compile=True "
             "(torch.compile; needs a C++ compiler) as the impl keras_tc")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.configs, args.dtypes, args.modes, args.repeats, args.steps,
               args.torch_compile, args.torch_reference, not args.no_plain)
        return
    REFERENCES["torch"] = args.torch_reference
    import machine

    print(machine.describe(), flush=True)
    from keras_mixer import runtime

    results = []
    settings = ["tuned", "default"] if args.malloc == "both" else [args.malloc]
    for backend in args.backends:
        for malloc in settings:
            command = [sys.executable, __file__, "--worker", backend, "--configs", *args.configs,
                       "--dtypes", *args.dtypes, "--modes", *args.modes,
                       "--repeats", str(args.repeats), "--steps", str(args.steps)]
            if args.torch_compile:
                command.append("--torch_compile")
            if args.no_plain:
                command.append("--no_plain")
            command += ["--torch_reference", args.torch_reference]
            env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
            env.pop("GLIBC_TUNABLES", None)
            if malloc == "tuned":
                env["GLIBC_TUNABLES"] = runtime.MALLOC_TUNABLES
            run = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [line[7:] for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode:
                print(f"{backend} worker failed:\n{run.stderr[-3000:]}", file=sys.stderr)
            results += [dict(json.loads(line), malloc=malloc) for line in lines]
            print(f"{backend} (malloc {malloc}): {len(lines)} results", flush=True)
    print(table(results))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
