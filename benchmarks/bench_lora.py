"""LoRA against full fine-tuning: trainable parameters, file size, step time, peak memory, accuracy.

    KERAS_BACKEND=jax python benchmarks/bench_lora.py [--b16_steps 3] [--skip_b16]

B/16 at 224x224 with a 10-class head: the trainable parameters and the
size of the file that holds them (model.keras for full fine-tuning,
`save_lora_weights` for LoRA) are counted on the built model; the step time
(median of `--b16_steps` `train_on_batch` calls at batch 8 after one
warm-up) and the peak resident memory above the interpreter's baseline
(`/proc/self/status` VmHWM) are measured in one subprocess per setting.

Digits: the digits config trained for 3 epochs is the "pretrained" model
(saved in the official layout); from it, 20 more epochs of full
fine-tuning and of LoRA (ranks 4 and 16, head trainable) through
`training.train` with `init_checkpoint` and `lora_rank`; the test accuracy
of each. Run once per backend; docs/benchmarks.md has the tables.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import machine

HERE = pathlib.Path(__file__).resolve().parent
RANKS = (4, 8, 16)


def _vmhwm_gib():
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def b16_worker(rank, steps):
    """One setting in this process: prints a JSON line."""
    import time

    import keras
    import numpy as np

    from keras_mixer import MLPMixer

    baseline = _vmhwm_gib()
    model = MLPMixer.from_variant("B/16", num_classes=10, seed=0)
    if rank:
        model.enable_lora(rank)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    images = np.random.default_rng(0).uniform(0, 255, (8, 224, 224, 3)).astype("float32")
    labels = np.arange(8) % 10
    model.train_on_batch(images, labels)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(images, labels)
        times.append(time.perf_counter() - start)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / ("lora.npz" if rank else "model.keras")
        model.save_lora_weights(path) if rank else model.save(path)
        size = path.stat().st_size
    print(json.dumps({"rank": rank, "trainable": trainable, "total": model.count_params(), "file_bytes": size,
                      "step_s": float(np.median(times)), "peak_gib": _vmhwm_gib() - baseline}))


def b16_rows(steps):
    rows = []
    for rank in (0, *RANKS):
        done = subprocess.run([sys.executable, __file__, "--b16_worker", str(rank), "--b16_steps", str(steps)],
                              capture_output=True, text=True, timeout=3000)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def digits_rows(out):
    import numpy as np

    from keras_mixer import config as config_lib
    from keras_mixer import save_official
    from keras_mixer import training
    from keras_mixer.checkpoint import load_model

    start = training.train(config_lib.apply_overrides(config_lib.load("digits"), {"epochs": 3}), out / "pre",
                           verbose=0, distribution="none")
    print(f"the 3-epoch start: test accuracy {start['test_accuracy']:.4f}")
    save_official(load_model(out / "pre" / "model.keras"), out / "pre.npz")
    rows = []
    for rank in (None, 4, 16):
        config = config_lib.apply_overrides(config_lib.load("digits"), {
            "epochs": 20, "init_checkpoint": str(out / "pre.npz"), "lora_rank": rank})
        workdir = out / f"rank{rank}"
        results = training.train(config, workdir, verbose=0, distribution="none")
        model = load_model(workdir / "model.keras")
        if rank:
            model.enable_lora(rank)
        trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        saved = workdir / ("lora.npz" if rank else "model.keras")
        rows.append({"rank": rank or 0, "trainable": trainable, "file_bytes": saved.stat().st_size,
                     "images_per_second": results["images_per_second"], "accuracy": results["test_accuracy"]})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b16_steps", type=int, default=3)
    parser.add_argument("--skip_b16", action="store_true")
    parser.add_argument("--b16_worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.b16_worker is not None:
        return b16_worker(args.b16_worker, args.b16_steps)
    import keras

    print(machine.describe())
    if not args.skip_b16:
        print(f"\nB/16 at 224, 10 classes, batch 8, {keras.backend.backend()}")
        print(f"{'setting':<10} {'trainable':>12} {'share':>7} {'file MB':>9} {'step s':>8} {'peak GiB':>9}")
        for r in b16_rows(args.b16_steps):
            print(f"{'full' if not r['rank'] else 'LoRA r' + str(r['rank']):<10} {r['trainable']:>12,} "
                  f"{r['trainable'] / r['total']:>7.2%} {r['file_bytes'] / 1e6:>9.2f} {r['step_s']:>8.2f} "
                  f"{r['peak_gib']:>9.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = digits_rows(pathlib.Path(tmp))
    print(f"\ndigits: 20 epochs from a 3-epoch model, {keras.backend.backend()}")
    print(f"{'setting':<10} {'trainable':>10} {'file KB':>9} {'images/s':>9} {'test acc':>9}")
    for r in rows:
        print(f"{'full' if not r['rank'] else 'LoRA r' + str(r['rank']):<10} {r['trainable']:>10,} "
              f"{r['file_bytes'] / 1e3:>9.1f} {r['images_per_second']:>9.0f} {r['accuracy']:>9.4f}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
