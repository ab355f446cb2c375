"""The `keras-mixer` command: train, evaluate, predict and export from the installed package.

    keras-mixer train                          # the digits config: no download needed
    KERAS_BACKEND=torch keras-mixer train      # the same on PyTorch (or jax, tensorflow)
    keras-mixer train --config cifar10_finetune --set data_dir=/data/tfds
    keras-mixer evaluate --model runs/x/model.keras --config digits --few_shot 5
    keras-mixer predict --model runs/x/model.keras cat.jpg dog.png
    keras-mixer export --model runs/x/model.keras --formats saved_model tflite
    python -m keras_mixer ...                  # the same command

The wheel installs it (`[project.scripts]`); `train.py` in a checkout is
`keras-mixer train`. Each subcommand's `--help` lists its flags. Errors a
user can fix print one line (`keras_mixer.cli`); `--debug` shows the
traceback.
"""

import argparse
import datetime
import difflib
import importlib
import importlib.util
import os
import pathlib
import sys

from keras_mixer import cli
from keras_mixer import runtime

# Subcommand -> (module whose `main(argv, prog)` runs it, one line of help).
SUBCOMMANDS = {
    "train": ("keras_mixer.commands", "train or fine-tune with model.fit (the paper's recipes, resumable runs)"),
    "evaluate": ("keras_mixer.evaluation", "top-1, top-5, loss, confusion matrix, few-shot probes of a .keras model"),
    "predict": ("keras_mixer.predict", "the top classes of image files"),
    "export": ("keras_mixer.export", "SavedModel, TFLite and ONNX files, each checked against Keras"),
}

TRAIN_DOC = """Train or evaluate an MLP-Mixer with `model.fit`.

    keras-mixer train                      # the digits config: no download needed
    python train.py                        # the same, from a checkout
    KERAS_BACKEND=torch keras-mixer train  # the same on PyTorch (or jax, tensorflow)
    keras-mixer train --config cifar10_finetune --set data_dir=/data/tfds
    keras-mixer train --config my_config.py --set learning_rate=3e-4 model.dropout_rate=0.1
    keras-mixer train --eval_only --checkpoint runs/x/model.keras --config digits

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


def usage():
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return ("usage: keras-mixer {" + ",".join(SUBCOMMANDS) + "} [--help] [flags]\n\n"
            "MLP-Mixer (Tolstikhin et al., 2021) on Keras 3: JAX, TensorFlow or PyTorch "
            "(KERAS_BACKEND).\n\nsubcommands:\n" + "\n".join(lines) + "\n\n"
            "`keras-mixer SUBCOMMAND --help` lists its flags; --debug shows the traceback of an error; "
            "--version prints the version.")


def main(argv=None):
    """The console script: `keras-mixer SUBCOMMAND [flags]`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == cli.DEBUG_FLAG:  # `keras-mixer --debug train ...`
        argv = argv[1:] + argv[:1]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from keras_mixer import __version__

        print(f"keras-mixer {__version__}")
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        print(f"error: unknown subcommand {name!r}.{hint} Subcommands: {', '.join(SUBCOMMANDS)} "
              "(keras-mixer --help).", file=sys.stderr)
        return 2
    if name == "train":
        # Training runs faster with glibc's malloc settings, read at process
        # start: re-executes this command once with them (runtime.py).
        runtime.ensure_malloc_tunables()
    module = importlib.import_module(SUBCOMMANDS[name][0])
    run = train if name == "train" else module.main
    return cli.run(lambda args: run(args, prog=f"keras-mixer {name}"), argv[1:])


def _schema_help():
    # The key list comes from the schema itself, so --help cannot go stale.
    from keras_mixer import config

    return config.describe()


def parse_train_args(argv, prog=None):
    parser = argparse.ArgumentParser(
        prog=prog, description=TRAIN_DOC, epilog=_schema_help(),
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
    _add_output_flags(parser)
    parser.add_argument(
        "--eval_only", action="store_true",
        help="evaluate --checkpoint (a .keras file) on the config's eval split and exit "
        "(keras-mixer evaluate also runs few-shot probes)",
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


def _add_output_flags(parser):
    """What `train` writes after training besides model.keras."""
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


# What training needs beyond the core package, by the extra that installs it
# (the backends' frameworks as `cli` names them for Keras' own import).
EXTRAS = {**cli.BACKEND_EXTRAS, "tensorflow_datasets": "train", "sklearn": "train", "tensorboard": "train"}


def missing_extras(backend):
    """The `pip install` that training still needs on `backend`, or None."""
    needed = ["tensorflow", "tensorflow_datasets", "sklearn", "tensorboard"]
    if backend in ("jax", "torch"):
        needed.append(backend)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    extras = ",".join(sorted({EXTRAS[name] for name in missing}))
    return (f"training needs {', '.join(missing)}, which this environment lacks: "
            f'pip install "keras-mixer[{extras}]" (or pip install -e ".[{extras}]" in a checkout).')


def train(argv=None, prog=None):
    """`keras-mixer train` (and `train.py`): returns the results dict."""
    args = parse_train_args(sys.argv[1:] if argv is None else argv, prog)
    import keras

    problem = missing_extras(keras.backend.backend())
    if problem:
        raise ImportError(problem)
    from keras_mixer import config as config_lib

    # The config is checked before any device, data or model is touched.
    config = config_lib.apply_overrides(config_lib.load(args.config), config_lib.parse_overrides(args.set))
    config_lib.resolve(config)
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    if args.eval_only:
        from keras_mixer import evaluation

        metrics = evaluation.evaluate(args.checkpoint, config)
        print(evaluation.format_results(args.checkpoint, metrics) + f" ({keras.backend.backend()})")
        return metrics
    name = pathlib.Path(args.config).stem
    workdir = args.workdir or os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    print(f"keras-mixer: config {args.config}, backend {keras.backend.backend()}, workdir {workdir}")
    from keras_mixer import distribute
    from keras_mixer import training

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
        print(f"Stopped by SIGTERM at step {results['steps']}; the state is saved. "
              "Run the same command to resume.")
        sys.exit(143)
    if "test_accuracy" in results:
        print(f"test accuracy {results['test_accuracy']:.4f} (top-5 {results['test_top5']:.4f}, "
              f"loss {results['test_loss']:.4f}) after {results['steps']} steps in "
              f"{results['seconds']:.0f} s on {results['backend']}")
    print(f"saved {os.path.join(workdir, 'model.keras')} and {os.path.join(workdir, 'log.csv')}")
    _after_training(args, config, workdir, results)
    return results


def _after_training(args, config, workdir, results):
    """--quantize and --export, on the chief, from the saved model.keras."""
    if not (args.quantize or args.export):
        return
    from keras_mixer import config as config_lib
    from keras_mixer import data

    # Evaluation images, read once: the quantized model's agreement check,
    # int8 calibration and the export checks.
    images = data.representative_images(config_lib.resolve(config))
    if args.quantize:
        from keras_mixer import quantize

        report = quantize.quantize_file(os.path.join(workdir, "model.keras"), args.quantize, images)
        print(quantize.describe(report))
        results["quantized"] = report
    if args.export:
        from keras_mixer import export

        try:
            report = export.export(os.path.join(workdir, "model.keras"), os.path.join(workdir, "export"),
                                   args.export, args.quantization, representative_data=images)
        except export.ExportError as error:
            print(f"export failed: {error}", file=sys.stderr)
            sys.exit(1)
        print(export.format_report(report))
        results["export"] = report
