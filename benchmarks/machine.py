"""What the benchmarks ran on: CPU model, cores, matrix features, library versions.

The development machines vary (shared, different CPUs), and bfloat16 speed
depends on the CPU's matrix instructions: AVX-512 (float32 FMA),
AVX512-BF16 (bf16 dot products) and AMX (tile matrix units). Every
benchmark prints `describe()` above its table.
"""

import platform

FEATURES = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX512-BF16",
    "amx_bf16": "AMX-BF16",
    "amx_tile": "AMX",
}


def cpu_info():
    """(model name, matrix features present), from `keras_mixer.runtime.cpu_info`."""
    from keras_mixer import runtime

    model, flags = runtime.cpu_info()
    model = model or platform.processor() or "unknown"
    return model, [name for flag, name in FEATURES.items() if flag in (flags or ())]


def describe():
    model, features = cpu_info()
    from keras_mixer import runtime

    cores = runtime.schedulable_cores()
    lines = [
        f"CPU: {model}, {cores} cores available; matrix features: {', '.join(features) or 'none found'}",
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
