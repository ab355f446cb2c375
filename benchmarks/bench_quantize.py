"""Keras int8/int4 weight quantization against float32 and the LiteRT int8 file: size, speed, agreement.

    KERAS_BACKEND=jax python benchmarks/bench_quantize.py [--digits_model runs/digits/model.keras]

For the digits model (the README's `python train.py`, trained here when no
`--digits_model` is given) and S/16 at 224x224 (random weights and a random
N(0, 0.02) head, since the paper's zero head makes every top-1 equal), per
mode: the `.keras` file's size, inference images/s with `model.predict`
(median of 3 timed passes after one warm-up, on this backend) and the
top-1 agreement with float32 on digits test images (resized to the model's
input). The LiteRT int8 row is `keras_mixer.export`'s file, calibrated on
the same images, run by the LiteRT interpreter one image at a time. Run it
once per backend; docs/benchmarks.md has the tables.
"""

import argparse
import json
import pathlib
import tempfile
import time

import keras
import numpy as np

import machine
from keras_mixer import MLPMixer
from keras_mixer import export
from keras_mixer import quantize
from keras_mixer import sources


def digits_images(image_shape, count=256):
    """`count` digits test images in [0, 255], resized to `image_shape` (channels repeated)."""
    import tensorflow as tf

    _, (x_test, _) = sources.load_digits()
    images = tf.image.resize(x_test[:count], image_shape[:2], method="bilinear").numpy()
    return np.repeat(images, image_shape[2], axis=-1) if image_shape[2] != 1 else images


def _images_per_second(model, images, batch):
    model.predict(images[:batch], batch_size=batch, verbose=0)  # compile / warm up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model.predict(images, batch_size=batch, verbose=0)
        times.append(time.perf_counter() - start)
    return len(images) / float(np.median(times))


def measure(name, path, images, batch, out):
    """Rows for the float model at `path` and its int8 and int4 copies."""
    rows, reference = [], None
    slug = name.replace("/", "").replace(" ", "_")  # "S/16 224" -> "S16_224"
    for mode in ("float32", *quantize.MODES):
        model = keras.saving.load_model(path, compile=False)
        if mode != "float32":
            quantize.quantize(model, mode)
        saved = out / f"{slug}_{mode}.keras"
        model.save(saved)
        top1 = quantize.top1(model, images)
        reference = top1 if reference is None else reference
        rows.append((name, mode, saved.stat().st_size, _images_per_second(model, images, batch),
                     float(np.mean(top1 == reference))))
    try:
        report = export.export(path, out / f"{slug}_litert", ["tflite"], ["int8"], representative_data=images)
    except export.ExportError:  # below the check's 95% agreement: the table shows by how much
        report = json.loads((out / f"{slug}_litert" / export.REPORT).read_text())
    entry = report["files"][0]
    rows.append((name, "LiteRT int8", entry["size_bytes"], 1e3 / entry["latency_ms_per_image"],
                 entry["top1_agreement"]))
    return rows


def _digits_model(out):
    from keras_mixer import config as config_lib
    from keras_mixer import training

    training.train(config_lib.load("digits"), out / "digits", verbose=0, distribution="none")
    return out / "digits" / "model.keras"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits_model", help="a trained digits .keras file (default: train one, ~1 min)")
    parser.add_argument("--skip_s16", action="store_true", help="only the digits model")
    args = parser.parse_args(argv)
    print(machine.describe())
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        digits = pathlib.Path(args.digits_model) if args.digits_model else _digits_model(out)
        rows = measure("digits", digits, digits_images((8, 8, 1), 360), 360, out)
        if not args.skip_s16:
            s16 = MLPMixer.from_variant("S/16", num_classes=1000, seed=0)
            head = s16.get_layer("head")
            head.kernel.assign(np.random.default_rng(0).normal(0, 0.02, head.kernel.shape).astype("float32"))
            s16.save(out / "s16.keras")
            rows += measure("S/16 224", out / "s16.keras", digits_images((224, 224, 3), 64), 16, out)
    print(f"\n{keras.backend.backend()}: Keras quantization vs float32 and LiteRT int8")
    print(f"{'model':<10} {'mode':<12} {'size MB':>9} {'images/s':>10} {'top-1 agreement':>16}")
    for name, mode, size, speed, agreement in rows:
        print(f"{name:<10} {mode:<12} {size / 1e6:>9.2f} {speed:>10.1f} {agreement:>16.4f}")


if __name__ == "__main__":
    main()
