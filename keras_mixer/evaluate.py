"""Evaluate a saved Mixer: top-1, top-5, confusion matrix, and few-shot linear probes.

    python -m keras_mixer.evaluate --model runs/digits/model.keras --config digits
    python -m keras_mixer.evaluate --model m.keras --config cifar10_finetune \
        --set data_dir=/data/tfds eval_crop=resmall-crop --few_shot 1 5 10 25 --out_dir eval/

Writes `<out_dir>/evaluation.json` (accuracy, top-5, count, confusion
matrix, and with `--few_shot` the probe's mean, spread and per-seed
accuracies), and `<out_dir>/confusion.png` when matplotlib is installed.
The few-shot probe draws its training images from the config's train split,
preprocessed like evaluation images, and tests on the eval split (protocol:
`keras_mixer.evaluation`).
"""

import argparse
import json
import pathlib
import sys

import numpy as np


def _split_arrays(config, split, limit):
    """Images and integer labels of a split, evaluation-preprocessed, at most `limit`."""
    from keras_mixer import data, training

    if config["dataset"] == "digits":
        (x_train, y_train), (x_test, y_test) = data.load_digits()
        x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
        return x[:limit], y[:limit]
    source = data.make_source(config["dataset"], config[f"{split}_split"], config["data_dir"], config["download"])
    dataset = data.eval_pipeline(source, 256, training._image_shape(config), config["eval_crop"])
    images, labels = [], []
    for x, y in dataset.unbatch().take(limit).batch(256):
        images.append(x.numpy())
        labels.append(y.numpy().argmax(-1))
    return np.concatenate(images), np.concatenate(labels)


def run(model_path, config, few_shot=(), seeds=5, few_shot_train=10_000, out_dir=None):
    """Evaluates `model_path` on `config`'s data; returns (and with `out_dir` writes) the results."""
    import keras

    from keras_mixer import evaluation, training

    config = training.resolve_config(config)
    if not config["eval_split"]:
        raise ValueError("The config has eval_split=None: nothing to evaluate on.")
    model = keras.saving.load_model(model_path, compile=False)
    _, eval_ds, _, num_classes, image_shape = training.make_datasets(config, config["batch_size"])
    if tuple(model.input_shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"{model_path} takes {model.input_shape[1:]} images; the config's data has {image_shape}."
        )
    report = evaluation.classification_report(model, eval_ds, num_classes)
    results = {k: report[k] for k in ("accuracy", "top5", "count")}
    results["confusion_matrix"] = report["confusion_matrix"].tolist()
    if few_shot:
        train_x, train_y = _split_arrays(config, "train", few_shot_train)
        test_x, test_y = _split_arrays(config, "eval", few_shot_train)
        results["few_shot"] = {
            str(k): v for k, v in evaluation.few_shot(
                evaluation.pre_logits(model, train_x), train_y,
                evaluation.pre_logits(model, test_x), test_y, num_classes,
                shots=tuple(few_shot), seeds=tuple(range(seeds)),
            ).items()
        }
    if out_dir is not None:
        out_dir = pathlib.Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "evaluation.json").write_text(json.dumps(results, indent=2))
        try:
            from keras_mixer import visualize

            visualize.plot_confusion(report["confusion_matrix"], out_dir / "confusion.png")
        except ImportError:
            pass  # matplotlib is optional: the JSON holds the matrix.
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras file")
    parser.add_argument("--config", default="digits", help="config name or .py file (its data)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--few_shot", nargs="*", type=int, default=[], metavar="SHOTS",
                        help="few-shot linear probes with these shots per class, e.g. 1 5 10 25")
    parser.add_argument("--seeds", type=int, default=5, help="draws per shot count (default: %(default)s)")
    parser.add_argument("--few_shot_train", type=int, default=10_000,
                        help="images read from each split for the probes (default: %(default)s)")
    parser.add_argument("--out_dir", default=None, help="where evaluation.json and confusion.png go")
    args = parser.parse_args(argv)
    from keras_mixer import configs, training

    config = training.apply_overrides(configs.get(args.config), training.parse_overrides(args.set))
    results = run(args.model, config, args.few_shot, args.seeds, args.few_shot_train, args.out_dir)
    print(f"{args.model}: top-1 {results['accuracy']:.4f}, top-5 {results['top5']:.4f} "
          f"on {results['count']} images")
    for shots, r in results.get("few_shot", {}).items():
        print(f"  {shots}-shot linear: {r['mean']:.4f} +- {r['std']:.4f} over {len(r['accuracies'])} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
