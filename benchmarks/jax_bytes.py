"""Where a JAX training step's memory traffic goes: keras-mixer against the Flax module.

    python benchmarks/jax_bytes.py                  # S/16 at 224, batch 8
    python benchmarks/jax_bytes.py --config small --top 15

Needs flax and optax (the benchmark extra). Both models take the same
step, written here once: optax Adam on softmax cross-entropy, keras-mixer
through `model.stateless_call`, so that only the models' graphs differ.
Each step is compiled by XLA for the CPU; the script prints XLA's own cost
analysis (FLOPs, bytes accessed) and then an estimate per part of the
model: every instruction of the compiled entry computation (fusions,
dots, copies, ...) is counted as the bytes of its operands plus its
result, and charged to the layer its `op_name` metadata names, forward
or backward ("transpose(" in the name), with the block number dropped so
that a part's rows sum over the blocks. The estimate counts each operand
once per instruction that reads it, as XLA:CPU's loops do; its total is
close to, not equal to, XLA's figure.
"""

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from shapes import CONFIGS  # noqa: E402
from shapes import arch  # noqa: E402

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8,
               "s64": 8, "u64": 8}
SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|s8|u8|pred|f64|s64|u64)\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) (\w[\w\-]*)\((.*?)\)(.*)$")
SKIP = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all"}


def _bytes(text):
    total = 0
    for dtype, dims in SHAPE.findall(text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * DTYPE_BYTES[dtype]
    return total


def _part(op_name):
    """A readable part of the model from an instruction's op_name."""
    backward = "transpose(" in op_name
    name = re.sub(r"jit\([^)]*\)/", "", op_name)
    name = re.sub(r"[\w\-]+\(", "", name).replace(")", "")  # jvp(...), transpose(...)
    name = re.sub(r"(block_|MixerBlock_)\d+", "block", name)
    name = re.sub(r"(^|/)(mlp_mixer|MlpMixer)(/|$)", r"\1", name)
    keep = [p for p in name.split("/") if p and not p.startswith(("while", "body", "closed_call"))]
    # Up to the layer: drop the primitive (dot_general, add, ...).
    label = "/".join(keep[:-1]) if len(keep) > 1 else (keep[0] if keep else "?")
    return ("bwd " if backward else "fwd ") + (label or "?")


def breakdown(hlo):
    """{part: bytes} over the entry computation's instructions."""
    entry = hlo[hlo.index("\nENTRY"):]
    shapes, parts = {}, collections.Counter()
    for line in entry.splitlines()[1:]:
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, result, opcode, operands, rest = match.groups()
        shapes[name] = _bytes(result)
        if opcode in SKIP:
            continue
        read = sum(shapes.get(o, 0) for o in re.findall(r"%([\w.\-]+)", operands))
        op_name = re.search(r'op_name="([^"]*)"', rest)
        parts[_part(op_name.group(1) if op_name else opcode)] += read + shapes[name]
    return parts


def keras_step(cfg):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from keras_mixer import MLPMixer

    model = MLPMixer(**arch(cfg))
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    optimizer = optax.adam(1e-3)

    def step(trainable, opt_state, images, labels):
        def loss_fn(trainable):
            logits, _ = model.stateless_call(trainable, non_trainable, images, training=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(0, 255, (cfg["batch"], *cfg["image_shape"])).astype("float32"))
    labels = jnp.asarray(rng.integers(0, cfg["num_classes"], cfg["batch"]))
    return jax.jit(step).lower(trainable, optimizer.init(trainable), images, labels).compile()


def flax_step(cfg):
    import flax_reference
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    module = flax_reference.MlpMixer(
        patch_size=(cfg["patch_size"],) * 2, num_blocks=cfg["num_blocks"], hidden_dim=cfg["hidden_dim"],
        tokens_mlp_dim=cfg["tokens_mlp_dim"], channels_mlp_dim=cfg["channels_mlp_dim"],
        num_classes=cfg["num_classes"])
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, (cfg["batch"], *cfg["image_shape"])).astype("float32"))
    labels = jnp.asarray(rng.integers(0, cfg["num_classes"], cfg["batch"]))
    params = module.init(jax.random.PRNGKey(0), images)
    optimizer = optax.adam(1e-3)

    def step(params, opt_state, images, labels):
        def loss_fn(params):
            logits = module.apply(params, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step).lower(params, optimizer.init(params), images, labels).compile()


def _cost(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost.get("flops", 0.0), cost.get("bytes accessed", 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="s16", choices=sorted(CONFIGS))
    parser.add_argument("--top", type=int, default=25, help="rows of the per-part table")
    parser.add_argument("--hlo", help="also write both optimised HLO texts to this prefix")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    import machine

    print(machine.describe())
    compiled = {"keras": keras_step(cfg), "flax": flax_step(cfg)}
    print(f"{args.config}, batch {cfg['batch']}, one training step (optax Adam on both sides), XLA:CPU")
    print(f"{'':<8} {'GFLOP':>8} {'GB accessed (XLA)':>18} {'GB (estimate)':>14}")
    parts = {}
    for impl, step in compiled.items():
        hlo = step.as_text()
        if args.hlo:
            with open(f"{args.hlo}_{impl}.hlo", "w") as f:
                f.write(hlo)
        parts[impl] = breakdown(hlo)
        flops, traffic = _cost(step)
        print(f"{impl:<8} {flops / 1e9:>8.1f} {traffic / 1e9:>18.2f} {sum(parts[impl].values()) / 1e9:>14.2f}")
    keras_parts, flax_parts = parts["keras"], parts["flax"]
    print("\nGB per part (layer names as keras-mixer's, which follow the official "
          "checkpoint's; Flax's match), the largest differences first")
    print(f"{'part':<52} {'keras':>8} {'flax':>8} {'diff':>8}")
    names = set(keras_parts) | set(flax_parts)
    rows = sorted(names, key=lambda n: -abs(keras_parts[n] - flax_parts[n]))
    for part in rows[:args.top]:
        k, f = keras_parts[part] / 1e9, flax_parts[part] / 1e9
        print(f"{part[:52]:<52} {k:>8.3f} {f:>8.3f} {k - f:>+8.3f}")


if __name__ == "__main__":
    main()
