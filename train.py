"""Train or evaluate an MLP-Mixer with `model.fit`.

    python train.py                      # the digits config: no download needed
    KERAS_BACKEND=torch python train.py  # the same on PyTorch (or jax, tensorflow)
    python train.py --config cifar10_finetune --set data_dir=/data/tfds
    python train.py --config my_config.py --set learning_rate=3e-4 model.dropout_rate=0.1
    python train.py --eval_only --checkpoint runs/x/model.keras --config digits

Every config key is set with --set KEY=VALUE (listed at the end of --help,
from the schema in keras_mixer/config.py); an unknown key is an error.

Running the same command with the same --workdir again resumes the run at
the exact step of its last checkpoint (written every `checkpoint_every`
steps, every epoch, and on SIGTERM).

Devices: every TPU core, GPU or JAX device found is used (data parallel,
`--distribution auto`); `--distribution model --model_parallel_size N`
shards the large kernels on JAX. The choice is printed and written to
<workdir>/distribution.json. See docs/distributed.md.

The backend is chosen the Keras way, by the KERAS_BACKEND environment
variable (default: tensorflow, or what ~/.keras/keras.json says).
"""

import argparse
import datetime
import importlib.util
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TF's start-up chatter out.


def _schema_help():
    # The key list comes from the schema itself, so --help cannot go stale.
    try:
        from keras_mixer import config
    except ImportError:
        return None
    return config.describe()


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=_schema_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", default="digits",
        help="a config name in keras_mixer/configs/ (digits, cifar10_finetune, "
        "imagenet1k_pretrain, ...) or the path of a .py file with get_config() "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE",
        help="override config values, e.g. --set epochs=3 batch_size=64 "
        "learning_rate=3e-4 model.dropout_rate=0.1 (values are Python literals; "
        "an unknown key is an error that lists the valid ones)",
    )
    parser.add_argument(
        "--workdir", default=None,
        help="directory of the run: config.json, log.csv, tensorboard/, checkpoints/, "
        "best.keras, model.keras, results.json (default: runs/<config>-<date>-<time>); "
        "an existing one is resumed",
    )
    parser.add_argument(
        "--distribution", choices=("auto", "data", "model", "none"), default="auto",
        help="devices: auto (every TPU core/GPU/JAX device, data parallel), data, "
        "model (JAX: shard the MLP kernels over --model_parallel_size devices), "
        "none (one device) (default: %(default)s); see docs/distributed.md",
    )
    parser.add_argument(
        "--model_parallel_size", type=int, default=None,
        help="with --distribution model: devices per model copy (default: one host's)",
    )
    parser.add_argument(
        "--tpu", default=None,
        help="TensorFlow: a TPU name or grpc:// address to connect to (default: "
        "$TPU_NAME, else Colab's or this TPU VM's, if any)",
    )
    parser.add_argument(
        "--export", nargs="+", default=[], metavar="FORMAT",
        help="after training, export model.keras to <workdir>/export in these formats "
        "(saved_model, tflite, onnx), each checked against Keras (keras_mixer.export)",
    )
    parser.add_argument(
        "--quantization", nargs="+", default=["float32"],
        help="with --export tflite: float32, float16, dynamic_range and/or int8 "
        "(calibrated on evaluation images) (default: float32)",
    )
    parser.add_argument(
        "--quantize", choices=("int8", "int4"), default=None,
        help="after training, also write model_<MODE>.keras: every Dense quantized by "
        "Keras (keras_mixer.quantize), with its size and top-1 agreement printed",
    )
    parser.add_argument(
        "--eval_only", action="store_true",
        help="evaluate --checkpoint (a .keras file) on the config's eval split and exit "
        "(keras_mixer.evaluation, whose command also runs few-shot probes)",
    )
    parser.add_argument("--checkpoint", help="the .keras model that --eval_only evaluates")
    parser.add_argument(
        "--debug", action="store_true",
        help="show the traceback of an error (also KERAS_MIXER_DEBUG=1); otherwise one line",
    )
    parser.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), default=None,
        help="model.fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch "
        "(default: progress bar in a terminal, one line per epoch otherwise)",
    )
    args = parser.parse_args(argv)
    if args.eval_only and not args.checkpoint:
        parser.error("--eval_only needs --checkpoint PATH.keras")
    return args


# What train.py needs beyond the core package, by the extra that installs it.
EXTRAS = {"tensorflow": "train", "tensorflow_datasets": "train", "sklearn": "train",
          "tensorboard": "train", "jax": "jax", "torch": "torch"}


def missing_extras(backend):
    """The `pip install` that train.py still needs on `backend`, or None."""
    needed = ["tensorflow", "tensorflow_datasets", "sklearn", "tensorboard"]
    if backend in ("jax", "torch"):
        needed.append(backend)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    extras = ",".join(sorted({EXTRAS[name] for name in missing}))
    return (f"train.py needs {', '.join(missing)}, which this environment lacks: "
            f'pip install "keras-mixer[{extras}]" (or pip install -e ".[{extras}]" in a checkout).')


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = missing_extras(os.environ.get("KERAS_BACKEND", _keras_json_backend()))
    if problem:
        raise ImportError(problem)
    from keras_mixer import config as config_lib

    # The config is checked before any device, data or model is touched.
    config = config_lib.apply_overrides(config_lib.load(args.config), config_lib.parse_overrides(args.set))
    config_lib.resolve(config)
    import keras

    from keras_mixer import training

    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    name = pathlib.Path(args.config).stem
    if args.eval_only:
        from keras_mixer import evaluation

        metrics = evaluation.evaluate(args.checkpoint, config)
        print(evaluation.format_results(args.checkpoint, metrics) + f" ({keras.backend.backend()})")
        return metrics
    workdir = args.workdir or os.path.join(
        "runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    print(f"keras-mixer: config {args.config}, backend {keras.backend.backend()}, workdir {workdir}")
    from keras_mixer import distribute

    placement = distribute.setup(args.distribution, args.model_parallel_size, tpu=args.tpu)
    if not placement.is_chief:
        verbose = 0  # Process 0 reports progress and results; the others train quietly.
    results = training.train(config, workdir, verbose=verbose, distribution=placement)
    if not placement.is_chief:
        print(f"process {placement.process_index} of {placement.num_processes}: "
              f"{'stopped by SIGTERM' if results['preempted'] else 'done'} after "
              f"{results['steps']} steps (process 0 writes the files and reports the results)")
        if results["preempted"]:
            sys.exit(143)
        return results
    if results["preempted"]:
        print(
            f"Stopped by SIGTERM at step {results['steps']}; the state is saved. "
            "Run the same command to resume."
        )
        sys.exit(143)
    if "test_accuracy" in results:
        print(
            f"test accuracy {results['test_accuracy']:.4f} (top-5 {results['test_top5']:.4f}, "
            f"loss {results['test_loss']:.4f}) after {results['steps']} steps in "
            f"{results['seconds']:.0f} s on {results['backend']}"
        )
    print(f"saved {os.path.join(workdir, 'model.keras')} and {os.path.join(workdir, 'log.csv')}")
    if (args.quantize or args.export) and placement.is_chief:
        from keras_mixer import data

        # Evaluation images, read once: the quantized model's agreement check,
        # int8 calibration and the export checks.
        images = data.representative_images(config_lib.resolve(config))
    if args.quantize and placement.is_chief:
        from keras_mixer import quantize

        report = quantize.quantize_file(os.path.join(workdir, "model.keras"), args.quantize, images)
        print(quantize.describe(report))
        results["quantized"] = report
    if args.export and placement.is_chief:
        from keras_mixer import export

        try:
            report = export.export(
                os.path.join(workdir, "model.keras"), os.path.join(workdir, "export"),
                args.export, args.quantization,
                representative_data=images,
            )
        except export.ExportError as error:
            print(f"export failed: {error}", file=sys.stderr)
            sys.exit(1)
        print(export.format_report(report))
        results["export"] = report
    return results


def _keras_json_backend():
    # Keras' own default when KERAS_BACKEND is unset: keras.json, else TensorFlow.
    import json

    path = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "keras.json")
    try:
        with open(path) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def _standalone(name):
    """keras_mixer/<name>.py (standard library only) loaded without the package,
    whose import starts Keras and a backend: runtime.py's settings must come
    first, and cli.py must report a missing extra that Keras would trip on."""
    package = importlib.util.find_spec("keras_mixer")
    if package is None or not package.submodule_search_locations:
        sys.exit('error: keras_mixer is not installed: pip install -e ".[train]" in the checkout.')
    path = os.path.join(list(package.submodule_search_locations)[0], f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_keras_mixer_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    # May re-execute this command once; then only the interpreter start is repeated.
    _standalone("runtime").ensure_malloc_tunables()
    sys.exit(_standalone("cli").run(main))
