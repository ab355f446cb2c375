"""Images/s of the training input pipeline, stage by stage, at 224x224.

    python benchmarks/input_pipeline.py                 # both implementations
    python benchmarks/input_pipeline.py --batches 40 --batch_size 64
    KERAS_BACKEND=jax python benchmarks/input_pipeline.py --keras_own_equalization

Writes a folder of JPEGs (ImageNet-like sizes around 400x350) to a temp
directory and times `keras_mixer.data.train_pipeline` with more and more
of the paper's stages switched on, for KerasCV and for the Keras-core
fallback, in one run so that the ratios are comparable on a shared
machine. Everything runs in tf.data, so the Keras backend does not matter.

The rows "as of fcd1949" rebuild the pipelines as they were before issue
30: whole JPEGs decoded before the crop; KerasCV's RandAugment over each
batch (with its zero shear) and MixUp/CutMix on the host, CutMix
relabelled through a one-hot of every pixel's origin. `mix_on=device` rows time what the host still
does when MixUp and CutMix run in the train step: it draws their
parameters only.

Then, per CPU core, how many cores each pipeline needs to feed an
accelerator training B/16 at 224: the accelerator's rate is its bf16
peak x an assumed MFU / (3 x the forward FLOPs of an image), the
assumptions printed beside the table.

Everything runs in tf.data, and KerasCV's layers run the same on every
Keras backend. Keras core's layers do not quite: its Equalization picks
its histogram code by the global Keras backend, which is why keras-mixer
replaces it (`augment._equalization_by_bincount`). The table prints the
backend; `--keras_own_equalization` adds a row of Keras' RandAugment with
its own Equalization (slow under JAX, Colab's backend: 2 timed batches).
"""

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_mixer import augment  # noqa: E402
from keras_mixer import data  # noqa: E402
from keras_mixer import sources  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import machine  # noqa: E402
import shapes  # noqa: E402

# bf16 dense peaks per chip (vendor figures) and the MFU assumed for B/16.
ACCELERATORS = (("TPU v5e-1", 197e12), ("TPU v5e-8", 8 * 197e12), ("H100 SXM", 989e12))
MFU = 0.5


def write_folder(root, num_images, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        height, width = rng.integers(300, 500, size=2)
        # Smooth random images compress like photos, unlike white noise.
        small = rng.integers(0, 256, size=(height // 16, width // 16, 3)).astype("float32")
        image = tf.image.resize(small, (height, width), method="bicubic")
        image = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
        folder = pathlib.Path(root) / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())


def images_per_second(dataset, batches, batch_size, warm_up=3):
    iterator = iter(dataset)
    for _ in range(warm_up):  # warm up tf.data's threads and autotuning
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def decode_only(source, batch_size):
    dataset = source.dataset.repeat().map(
        lambda raw, label: tf.image.resize(source.decode(raw, 3), (224, 224)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def before_issue_30(randaugment_magnitude=15, mixup=0.5, cutmix=1.0, seed=0):
    """The pretraining augmentation as of fcd1949, over batches (see the docstring)."""
    import keras_cv

    randaugment = keras_cv.layers.RandAugment(
        value_range=(0, 255), augmentations_per_image=2,
        magnitude=augment.randaugment_strength(randaugment_magnitude), seed=seed)
    mix = keras_cv.layers.MixUp(alpha=mixup, seed=seed + 1)
    cut = keras_cv.layers.CutMix(alpha=cutmix, seed=seed + 2)

    def cut_with_one_hot_labels(images, labels):
        batch = tf.shape(images)[0]
        marker = tf.broadcast_to(tf.cast(tf.range(batch), images.dtype)[:, None, None, None],
                                 tf.concat([tf.shape(images)[:-1], [1]], 0))
        out = cut({"images": tf.concat([images, marker], -1), "labels": labels})
        mixed = tf.cast(out["images"], tf.float32)
        origin = tf.cast(tf.round(mixed[..., -1]), tf.int32)
        shares = tf.reduce_mean(tf.one_hot(origin, batch), axis=[1, 2])
        return mixed[..., :-1], tf.matmul(shares, tf.cast(labels, tf.float32))

    def mix_up(images, labels):
        out = mix({"images": images, "labels": labels})
        return tf.cast(out["images"], tf.float32), tf.cast(out["labels"], tf.float32)

    def batch(images, labels, step):
        images = tf.clip_by_value(tf.cast(randaugment(tf.cast(images, tf.float32)), tf.float32), 0.0, 255.0)
        coin = tf.random.stateless_uniform([], seed=tf.stack([tf.cast(seed, tf.int64), step]))
        return tf.cond(coin < 0.5, lambda: mix_up(images, labels),
                       lambda: cut_with_one_hot_labels(images, labels))

    return batch


def keras_own_equalization(source, batch_size, shape):
    """The Keras-core RandAugment pipeline with Keras' Equalization left in."""
    replace = augment._equalization_by_bincount
    augment._equalization_by_bincount = lambda randaugment: randaugment
    try:
        image, _ = augment.augmenters(implementation="keras", randaugment_magnitude=15)
    finally:
        augment._equalization_by_bincount = replace
    return data.train_pipeline(source, batch_size, shape, image_augment=image)[0]


def cores_table(rows, cores):
    b16 = shapes.CONFIGS["b16"]
    step_flops = 3 * shapes.forward_flops(b16)
    names = [name for name, _ in ACCELERATORS]
    print(f"\nhost CPU cores to feed B/16 at 224 (training {step_flops / 1e9:.1f} GFLOP/image, "
          f"MFU {MFU:.0%} of the bf16 peak assumed)")
    print(f"{'pipeline':<48} {'img/s/core':>10} " + " ".join(f"{n:>11}" for n in names))
    print(f"{'accelerator images/s':<48} {'':>10} "
          + " ".join(f"{peak * MFU / step_flops:>11.0f}" for _, peak in ACCELERATORS))
    for name, rate in rows:
        per_core = rate / cores
        need = " ".join(f"{peak * MFU / step_flops / per_core:>11.0f}" for _, peak in ACCELERATORS)
        print(f"{name:<48} {per_core:>10.1f} {need}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--keras_own_equalization", action="store_true",
                        help="add Keras' RandAugment with its own Equalization (see the docstring)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        write_folder(root, args.images)
        source = sources.image_folder_source(root)
        shape = (224, 224, 3)
        rows = [("decode + resize", "-", decode_only(source, args.batch_size))]
        rows.append(("+ Inception crop, flip", "-",
                     data.train_pipeline(source, args.batch_size, shape)[0]))
        whole = dataclasses.replace(source, read=None)  # decodes whole JPEGs, as before issue 30
        rows.append(("+ Inception crop, flip, as of fcd1949", "-",
                     data.train_pipeline(whole, args.batch_size, shape)[0]))
        rows.append(("+ RandAugment + MixUp/CutMix, as of fcd1949", "keras_cv", data.train_pipeline(
            whole, args.batch_size, shape, batch_augment=before_issue_30())[0]))
        stages = [
            ("+ RandAugment(2, 15)", dict(randaugment_magnitude=15)),
            ("+ RandAugment + MixUp/CutMix, mix_on=host", dict(
                randaugment_magnitude=15, mixup=0.5, cutmix=1.0, mix_on="host")),
            ("+ RandAugment + MixUp/CutMix, mix_on=device", dict(
                randaugment_magnitude=15, mixup=0.5, cutmix=1.0, mix_on="device")),
        ]
        for implementation in augment.IMPLEMENTATIONS:
            for name, kwargs in stages:
                image, batch = augment.augmenters(implementation=implementation, **kwargs)
                dataset = data.train_pipeline(source, args.batch_size, shape,
                                              image_augment=image, batch_augment=batch)[0]
                rows.append((name, implementation, dataset))
        if args.keras_own_equalization:
            rows.append(("+ RandAugment(2, 15), Keras' own Equalization", "keras",
                         keras_own_equalization(source, args.batch_size, shape)))

        cores = len(os.sched_getaffinity(0))
        print(machine.describe())
        print(f"input pipeline at 224x224, batch {args.batch_size}, {cores} CPU cores, "
              f"{args.batches} timed batches, Keras backend {keras.backend.backend()}")
        print(f"{'stage':<48} {'implementation':<15} {'images/s':>9} {'vs crop+flip':>12}")
        baseline, rates = None, {}
        for name, implementation, dataset in rows:
            slow = name.endswith("Keras' own Equalization")
            rate = images_per_second(dataset, min(args.batches, 2) if slow else args.batches,
                                     args.batch_size, warm_up=1 if slow else 3)
            rates[name, implementation] = rate
            if name == "+ Inception crop, flip":
                baseline = rate
            ratio = f"{rate / baseline:.2f}x" if baseline else "-"
            print(f"{name:<48} {implementation:<15} {rate:>9.1f} {ratio:>12}", flush=True)
        before = rates["+ RandAugment + MixUp/CutMix, as of fcd1949", "keras_cv"]
        after = rates["+ RandAugment + MixUp/CutMix, mix_on=device", "keras_cv"]
        tuned = rates["+ Inception crop, flip", "-"] / rates["+ Inception crop, flip, as of fcd1949", "-"]
        print(f"\npretraining pipeline (KerasCV): {after / before:.2f}x the images/s of fcd1949; "
              f"fine-tuning pipeline {tuned:.2f}x")
        cores_table([
            ("fine-tuning as of fcd1949", rates["+ Inception crop, flip, as of fcd1949", "-"]),
            ("fine-tuning: crop, flip", rates["+ Inception crop, flip", "-"]),
            ("pretraining as of fcd1949", before),
            ("pretraining, mix_on=device", after),
        ], cores)


if __name__ == "__main__":
    main()
