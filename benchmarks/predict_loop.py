"""`model.predict` and `model.evaluate` on NumPy arrays against a loop over the same batches.

    KERAS_BACKEND=tensorflow python benchmarks/predict_loop.py
    KERAS_BACKEND=torch python benchmarks/predict_loop.py --images 256 --batch_size 32

Times, in turn and `--repeats` times, on the small config (`shapes.py`):
- predict: `MLPMixer.predict(x)`, the user's call (a NumPy array in and out);
- keras_own: Keras' own `keras.Model.predict` on the same model (its input
  pipeline: tf.data on TensorFlow, a data loader on PyTorch);
- evaluate: `MLPMixer.evaluate(x, y)` (mean squared error, the compiled
  loss of a plain `compile(loss="mse")`), and keras_own_evaluate: Keras'
  own `keras.Model.evaluate`; a forward pass and a loss per batch, so
  their reference is loop_forward too;
- loop_numpy: `predict_on_batch` over NumPy slices;
- loop_forward: the model's forward pass over the same batches, already
  tensors on the device (TensorFlow: `tf.function(jit_compile=True)`;
  PyTorch: `model(x)` under `torch.no_grad()`; JAX: `jax.jit`), the
  same-math loop with no input handling at all.
Prints the median images/s, the spread and each ratio to loop_forward.
"""

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def forward_loop(model, x, batch_size):
    import keras

    backend = keras.backend.backend()
    batches = [keras.ops.convert_to_tensor(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    if backend == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda t: model(t, training=False), jit_compile=True)
        return lambda: [step(b).numpy() for b in batches]
    if backend == "torch":
        import torch

        def run():
            with torch.no_grad():
                return [model(b, training=False).cpu().numpy() for b in batches]
        return run
    import jax

    step = jax.jit(lambda t: model(t, training=False))
    return lambda: [jax.device_get(step(b)) for b in batches]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    import keras
    import numpy as np

    import machine
    from keras_mixer import MLPMixer
    from shapes import CONFIGS
    from shapes import arch

    print(machine.describe())
    cfg = CONFIGS["small"]
    model = MLPMixer(**arch(cfg))
    model.compile(loss="mse")  # a plain compile, as a notebook does
    x = np.random.default_rng(0).uniform(0, 255, (args.images, *cfg["image_shape"])).astype("float32")
    y = np.zeros((args.images, cfg["num_classes"]), "float32")
    size = args.batch_size
    runs = {
        "predict": lambda: model.predict(x, batch_size=size, verbose=0),
        "keras_own": lambda: keras.Model.predict(model, x, batch_size=size, verbose=0),
        "evaluate": lambda: model.evaluate(x, y, batch_size=size, verbose=0),
        "keras_own_evaluate": lambda: keras.Model.evaluate(model, x, y, batch_size=size, verbose=0),
        "loop_numpy": lambda: [model.predict_on_batch(x[i:i + size]) for i in range(0, len(x), size)],
        "loop_forward": forward_loop(model, x, size),
    }
    for run in runs.values():  # compile and warm up
        run()
        run()
    rates = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            begin = time.perf_counter()
            run()
            rates[name].append(len(x) / (time.perf_counter() - begin))
    reference = statistics.median(rates["loop_forward"])
    print(f"{keras.backend.backend()}, small config, {len(x)} images in batches of {size}, "
          f"{args.repeats} repeats")
    print(f"{'call':<19} {'img/s':>8} {'(min-max)':>12} {'x loop_forward':>15}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<19} {median:>8.1f} {min(values):>5.0f}-{max(values):<6.0f} {median / reference:>15.2f}")


if __name__ == "__main__":
    main()
