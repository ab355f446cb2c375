"""Images/s of the training input pipeline, stage by stage, at 224x224.

    python benchmarks/input_pipeline.py                 # both implementations
    python benchmarks/input_pipeline.py --batches 40 --batch_size 64

Writes a folder of JPEGs (ImageNet-like sizes around 400x350) to a temp
directory and times `keras_mixer.data.train_pipeline` with more and more
of the paper's stages switched on, for KerasCV and for the Keras-core
fallback, in one run so that the ratios are comparable on a shared
machine. Everything runs in tf.data, so the Keras backend does not matter.
"""

import argparse
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_mixer import augment  # noqa: E402
from keras_mixer import data  # noqa: E402
from keras_mixer import sources  # noqa: E402


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


def images_per_second(dataset, batches, batch_size):
    iterator = iter(dataset)
    for _ in range(3):  # warm up tf.data's threads and autotuning
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        write_folder(root, args.images)
        source = sources.image_folder_source(root)
        shape = (224, 224, 3)
        rows = [("decode + resize", "-", decode_only(source, args.batch_size))]
        rows.append(("+ Inception crop, flip", "-",
                     data.train_pipeline(source, args.batch_size, shape)[0]))
        stages = [
            ("+ RandAugment(2, 15)", dict(randaugment_magnitude=15)),
            ("+ RandAugment + MixUp 0.5", dict(randaugment_magnitude=15, mixup=0.5)),
            ("+ RandAugment + MixUp/CutMix", dict(randaugment_magnitude=15, mixup=0.5, cutmix=1.0)),
        ]
        for implementation in augment.IMPLEMENTATIONS:
            for name, kwargs in stages:
                fn = augment.batch_augmenter(implementation=implementation, **kwargs)
                dataset = data.train_pipeline(source, args.batch_size, shape, batch_augment=fn)[0]
                rows.append((name, implementation, dataset))

        print(f"input pipeline at 224x224, batch {args.batch_size}, "
              f"{os.cpu_count()} CPU cores, {args.batches} timed batches")
        print(f"{'stage':<32} {'implementation':<15} {'images/s':>9} {'vs crop+flip':>12}")
        baseline = None
        for name, implementation, dataset in rows:
            rate = images_per_second(dataset, args.batches, args.batch_size)
            if name.startswith("+ Inception"):
                baseline = rate
            ratio = f"{rate / baseline:.2f}x" if baseline else "-"
            print(f"{name:<32} {implementation:<15} {rate:>9.1f} {ratio:>12}")


if __name__ == "__main__":
    main()
