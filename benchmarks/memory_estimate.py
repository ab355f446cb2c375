"""Per-device training memory of the paper's variants, by batch and sharding.

    python benchmarks/memory_estimate.py [--batch_per_replica 32] [--image_size 224]

Prints a Markdown table (copied into docs/distributed.md) from
`keras_mixer.plan.memory_per_device`: weights, gradients and Adam
moments in float32 (Keras keeps them in float32 under "mixed_bfloat16"
too), plus the activations kept for the backward pass in float32 or
bfloat16, for model-parallel sizes 1, 2, 4 and 8. It computes, it does not
measure: the parameter counts are exact (a test checks them against
Keras), the activations an estimate.
"""

import argparse

from keras_mixer import plan as plan_lib

GB = 1024**3


def table(batch_per_replica, image_size, sizes=(1, 2, 4, 8)):
    head = ["variant", "params", "float32 state, 1 device"] + [
        f"total GB, model {m}: fp32 / bf16" for m in sizes
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in ("S/16", "B/16", "L/16", "H/14"):
        base = plan_lib.memory_per_device(variant, batch_per_replica, image_size=image_size)
        cells = [variant, f"{base['params'] / 1e6:.0f}M", f"{base['state'] / GB:.1f} GB"]
        for m in sizes:
            fp32 = plan_lib.memory_per_device(
                variant, batch_per_replica, m, image_size=image_size)["total"]
            bf16 = plan_lib.memory_per_device(
                variant, batch_per_replica, m, image_size=image_size, activation_bytes=2)["total"]
            cells.append(f"{fp32 / GB:.1f} / {bf16 / GB:.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_per_replica", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args()
    print(f"Per-device memory at {args.image_size}x{args.image_size}, "
          f"{args.batch_per_replica} images per model copy:\n")
    print(table(args.batch_per_replica, args.image_size))


if __name__ == "__main__":
    main()
