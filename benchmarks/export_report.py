"""Export a paper variant (random weights) to every format and print the check report.

    KERAS_BACKEND=tensorflow python benchmarks/export_report.py --variant B/16 --out /tmp/b16

Sizes, differences against Keras and per-image latencies (CPU, one image at
a time for LiteRT, a batch of 64 for SavedModel and ONNX Runtime) of the
files `keras_mixer.export` writes. The head gets random weights (N(0, 0.02)),
since the paper's zero head would make every logit 0 and the top-1 checks
meaningless. Checks and int8 calibration use the digits set resized to the
model's input.
"""

import argparse
import time

import keras
import numpy as np

from bench_quantize import digits_images
from keras_mixer import MLPMixer, export


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--out", required=True)
    parser.add_argument("--formats", nargs="+", default=list(export.FORMATS))
    parser.add_argument("--quantization", nargs="+", default=list(export.QUANTIZATIONS))
    args = parser.parse_args()
    model = MLPMixer.from_variant(args.variant, num_classes=1000, seed=0)
    head = model.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.02, head.kernel.shape).astype("float32"))
    begin = time.perf_counter()
    report = export.export(model, args.out, args.formats, args.quantization,
                           representative_data=digits_images(model.input_shape[1:], 128))
    print(f"{args.variant} at {model.input_shape[1:]}, exported and checked in "
          f"{time.perf_counter() - begin:.0f} s on {keras.backend.backend()}:")
    print(export.format_report(report))


if __name__ == "__main__":
    main()
