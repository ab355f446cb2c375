"""What the benchmarks ran on: CPU model, cores, matrix features, library versions.

The development machines vary (shared, different CPUs), and bfloat16 speed
depends on the CPU's matrix instructions: AVX-512 (float32 FMA),
AVX512-BF16 (bf16 dot products) and AMX (tile matrix units). Every
benchmark prints `describe()` above its table.
"""

import os
import platform

FEATURES = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX512-BF16",
    "amx_bf16": "AMX-BF16",
    "amx_tile": "AMX",
}


def cpu_info():
    """(model name, sorted matrix features present) from /proc/cpuinfo (Linux)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if model != "unknown" and flags:
                    break
    except OSError:
        pass
    return model, [name for flag, name in FEATURES.items() if flag in flags]


def describe():
    model, features = cpu_info()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"CPU: {model}, {cores} cores available; matrix features: {', '.join(features) or 'none found'}",
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
