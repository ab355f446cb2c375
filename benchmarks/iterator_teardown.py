"""How long deleting a training pipeline's iterator takes, with tf.data's autotuning on and off.

    python benchmarks/iterator_teardown.py                 # 5 trials of 6 s each
    python benchmarks/iterator_teardown.py --trials 10 --seconds 20

Keras deletes its iterator over a dataset at the end of every `fit`,
`evaluate` and `predict`. With tf.data's autotuning on (tf.data's
default), that deletion waits for the autotuning thread, which can miss
its wake-up and sleep out the rest of its optimization period: a period
that doubles from 10 ms up to 60 s, so the longer the iterator lived, the
longer the pause. keras-mixer's pipelines turn autotuning off
(`keras_mixer.data.without_autotuning`). This script times both on the
same pipelines, in one run, alternating: each trial makes an iterator,
reads batches for `--seconds`, leaves it idle for `--pause` seconds, as
the end of an epoch does (validation, checkpoints), then deletes it. The
pause matters: a pipeline still busy at the deletion keeps the cores
taken, and the autotuning thread then rarely wins the race that makes it
oversleep.

Rows: the embedded digits (in memory), fine-tuning (Inception crop and
flip of JPEGs at 224) and pretraining (the same + RandAugment(2, 15), and
MixUp/CutMix parameters for the train step). A stall is a deletion over
0.5 s.
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from keras_mixer import augment  # noqa: E402
from keras_mixer import config as config_lib  # noqa: E402
from keras_mixer import data  # noqa: E402
from keras_mixer import sources  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import input_pipeline  # noqa: E402
import machine  # noqa: E402

STALL_SECONDS = 0.5
SETTINGS = ("tf.data default (autotuning)", "keras-mixer (autotuning off)")


def with_tf_data_default(dataset):
    """`dataset` with autotuning back on, from tf.data's default start of 16
    parallel calls (capped at the cores), as tf.data has it by default."""
    options = tf.data.Options()
    options.autotune.enabled = True
    options.autotune.initial_parallelism = 16
    return dataset.with_options(options)


def pipelines(root, batch_size):
    """`{name: make_dataset}`; each call builds a fresh pipeline."""
    digits = config_lib.resolve(dict(dataset="digits", batch_size=batch_size))
    folder = sources.image_folder_source(root)
    shape = (224, 224, 3)
    image, batch = augment.augmenters(randaugment_magnitude=15, mixup=0.5, cutmix=1.0)
    return {
        "digits (in memory)": lambda: data.make_datasets(digits, batch_size).train_fn(0),
        "fine-tuning: crop, flip at 224": lambda: data.train_pipeline(folder, batch_size, shape)[0],
        "pretraining: + RandAugment, MixUp/CutMix": lambda: data.train_pipeline(
            folder, batch_size, shape, image_augment=image, batch_augment=batch)[0],
    }


def trial(dataset, seconds, pause, batch_size):
    """`(images/s, seconds the deletion took)` of one iterator read for
    `seconds`, then left idle for `pause` seconds."""
    iterator = iter(dataset)
    next(iterator)  # the first batch starts the threads
    start = time.perf_counter()
    batches = 0
    while time.perf_counter() - start < seconds:
        next(iterator)
        batches += 1
    read = time.perf_counter() - start
    time.sleep(pause)
    begin = time.perf_counter()
    del iterator
    return batches * batch_size / read, time.perf_counter() - begin


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0, help="how long each iterator is read")
    parser.add_argument("--pause", type=float, default=1.0, help="idle seconds before the deletion")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="JPEGs in the generated folder")
    args = parser.parse_args()
    absl_logging.set_verbosity(absl_logging.ERROR)  # tf.data warns when an option is set twice

    with tempfile.TemporaryDirectory() as root:
        input_pipeline.write_folder(root, args.images)
        rows = pipelines(root, args.batch_size)
        results = {(name, setting): [] for name in rows for setting in SETTINGS}
        for _ in range(args.trials):
            for name, make in rows.items():
                for setting in SETTINGS:
                    dataset = make()
                    if setting == SETTINGS[0]:
                        dataset = with_tf_data_default(dataset)
                    results[name, setting].append(trial(dataset, args.seconds, args.pause, args.batch_size))

    print(machine.describe())
    print(f"iterator deletion after {args.seconds:g} s of reading and {args.pause:g} s idle, "
          f"batch {args.batch_size}, {args.trials} trials, TensorFlow {tf.__version__}")
    print(f"{'pipeline':<42} {'tf.data':<29} {'images/s':>9} {'delete median':>13} {'max':>7} "
          f"{'stalls':>7} {'lost':>7}")
    for (name, setting), runs in results.items():
        rates, deletes = np.array(runs).T
        stalls = int(np.sum(deletes > STALL_SECONDS))
        print(f"{name:<42} {setting:<29} {np.median(rates):>9.0f} {np.median(deletes):>12.2f}s "
              f"{deletes.max():>6.2f}s {stalls:>3}/{len(runs):<3} {deletes.sum():>6.1f}s")


if __name__ == "__main__":
    main()
