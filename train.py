"""Train an MLP-Mixer with `model.fit`.

    python train.py                      # the digits config: no download needed
    KERAS_BACKEND=torch python train.py  # the same on PyTorch (or jax, tensorflow)

The backend is chosen the Keras way, by the KERAS_BACKEND environment
variable (default: tensorflow, or what ~/.keras/keras.json says).
"""

import argparse
import datetime
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TF's start-up chatter out.


def parse_args(argv):
    from keras_mixer import configs

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default="digits", choices=configs.available(),
        help="experiment config in keras_mixer/configs/ (default: %(default)s)",
    )
    parser.add_argument(
        "--workdir", default=None,
        help="directory for config.json, log.csv, model.keras and results.json "
        "(default: runs/<config>-<date>-<time>)",
    )
    parser.add_argument("--epochs", type=int, help="override the config's number of epochs")
    parser.add_argument("--batch_size", type=int, help="override the config's global batch size")
    parser.add_argument("--learning_rate", type=float, help="override the config's peak learning rate")
    parser.add_argument("--weight_decay", type=float, help="override the config's AdamW weight decay")
    parser.add_argument("--seed", type=int, help="override the config's seed (data order, augmentation, init)")
    parser.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), default=None,
        help="model.fit verbosity: 0 silent, 1 progress bar, 2 one line per epoch "
        "(default: progress bar in a terminal, one line per epoch otherwise)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import keras

    from keras_mixer import configs
    from keras_mixer import training

    config = configs.get(args.config)
    for key in ("epochs", "batch_size", "learning_rate", "weight_decay", "seed"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    workdir = args.workdir or os.path.join(
        "runs", f"{args.config}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    verbose = args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2)
    print(f"keras-mixer: config {args.config}, backend {keras.backend.backend()}, workdir {workdir}")
    results = training.train(config, workdir, verbose=verbose)
    print(
        f"test accuracy {results['test_accuracy']:.4f} "
        f"(loss {results['test_loss']:.4f}) in {results['seconds']:.0f} s "
        f"on {results['backend']}"
    )
    print(f"saved {os.path.join(workdir, 'model.keras')} and {os.path.join(workdir, 'log.csv')}")
    return results


if __name__ == "__main__":
    main()
