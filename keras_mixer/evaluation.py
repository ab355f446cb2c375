"""Evaluation: top-1, top-5, loss, confusion matrix and the paper's few-shot linear probe.

    keras-mixer evaluate --model runs/digits/model.keras --config digits
    keras-mixer evaluate --model m.keras --config cifar10_finetune \
        --set data_dir=/data/tfds eval_crop=resmall-crop --few_shot 1 5 10 25 --out_dir eval/

`evaluate` is the one evaluation path: this command and `train.py
--eval_only` call it. It writes `<out_dir>/evaluation.json` (accuracy,
top-5, loss, count, confusion matrix, and with `few_shot` the probe's mean,
spread and per-seed accuracies), and `<out_dir>/confusion.png` when
matplotlib is installed. The few-shot probe draws its training images from
the config's train split, preprocessed like evaluation images, and tests on
the eval split.

Few-shot protocol (paper Section 3, "linear 5-shot"; as big_vision's
evaluator computes it), implemented here in NumPy:
1. Features are the frozen pre-logits (`features`: the model's own layers
   up to "pre_logits", as a functional sub-model; nothing is copied).
2. For each shot count k and seed, k training images per class are drawn
   without replacement (seeded, so each seed gives the same draw on every
   backend).
3. Features are standardised with the mean and standard deviation of the
   k x classes training features (std + 1e-5), and a constant feature of
   `BIAS_FEATURE` = 100 is appended: the bias weight then needs only a
   1/100 coefficient, so the L2 penalty barely touches it.
4. Targets are one-hot vectors mapped to {-1, +1}. The weights solve
   min ||X W - Y||^2 + l2_reg ||W||^2 in closed form: (X^T X + l2 I)^-1
   X^T Y when there are at least as many examples as features, else the
   equal dual form X^T (X X^T + l2 I)^-1 Y, whichever matrix is smaller.
5. The test accuracy of argmax(X_test W) is reported: mean and standard
   deviation over the seeds.
`l2_reg` defaults to 1.0 here. big_vision picks it from a grid on held-out
training data; `few_shot(..., l2_reg=[...])` takes such a grid and selects on
a validation slice of the sampled training images when k >= 2.

The probe measures transfer when the model was trained on other data (the
paper probes ImageNet-pretrained features on other datasets). On the
classes a model was trained on, its features collapse to one point per
class, and a probe from even one image per class gives the head's own
answers: the digits model of `configs/digits.py` scores its top-1 (0.9889)
at every shot count and seed, with a within-class to between-class feature
variance ratio of 0.027. That is the probe working, not a fault.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

BIAS_FEATURE = 100.0


def features(model):
    """The functional sub-model from `model`'s images to its pooled pre-logits.

    It shares `model`'s layers and weights (no copy), so it sees any later
    change to them.
    """
    import keras

    return keras.Model(model.input, model.get_layer("pre_logits").output, name=f"{model.name}_features")


def pre_logits(model, images, batch_size=256):
    """Frozen features of `images` (pixels as the model takes them), float64."""
    import keras

    return np.asarray(
        keras.ops.convert_to_numpy(features(model).predict(images, batch_size=batch_size, verbose=0)),
        np.float64,
    )


def fit_linear(train_x, train_y, num_classes, l2_reg=1.0):
    """Closed-form ridge regression to {-1, +1} one-hot targets.

    Returns a function mapping features to class scores (standardisation
    and bias feature included).
    """
    train_x = np.asarray(train_x, np.float64)
    mean = train_x.mean(axis=0, keepdims=True)
    std = train_x.std(axis=0, keepdims=True) + 1e-5

    def prepare(features):
        features = (np.asarray(features, np.float64) - mean) / std
        return np.concatenate([features, np.full((len(features), 1), BIAS_FEATURE)], axis=1)

    x = prepare(train_x)
    y = 2.0 * np.eye(num_classes)[np.asarray(train_y)] - 1.0
    n, d = x.shape
    if n >= d:
        w = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)
    else:
        w = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)

    return lambda features: prepare(features) @ w


def _sample(train_y, shots, num_classes, rng):
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(train_y == label)
        if len(members) < shots:
            raise ValueError(
                f"Class {label} has {len(members)} training examples, fewer than {shots} shots."
            )
        chosen.append(rng.choice(members, shots, replace=False))
    return np.stack(chosen, axis=1).reshape(-1)  # shot-major: one of each class, then again


def few_shot(train_x, train_y, test_x, test_y, num_classes, shots=(1, 5, 10, 25),
             seeds=(0, 1, 2, 3, 4), l2_reg=1.0):
    """Few-shot linear evaluation on frozen features (see the module docstring).

    Args:
        train_x, test_x: features, (N, D).
        train_y, test_y: integer labels.
        num_classes: int.
        shots: training examples per class.
        seeds: one draw of the training examples per seed.
        l2_reg: the regulariser, or a list to select from on held-out
            sampled examples (the last shot of each class) when shots >= 2.

    Returns:
        `{shots: {"mean": float, "std": float, "accuracies": [per seed]}}`.
    """
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    grid = list(l2_reg) if isinstance(l2_reg, (list, tuple)) else [l2_reg]
    results = {}
    for k in shots:
        accuracies = []
        for seed in seeds:
            index = _sample(train_y, k, num_classes, np.random.default_rng(seed))
            reg = grid[0]
            if len(grid) > 1 and k >= 2:
                fit, held = index[: (k - 1) * num_classes], index[(k - 1) * num_classes:]
                scores = [
                    np.mean(fit_linear(train_x[fit], train_y[fit], num_classes, r)(train_x[held]).argmax(-1)
                            == train_y[held])
                    for r in grid
                ]
                reg = grid[int(np.argmax(scores))]
            predict = fit_linear(train_x[index], train_y[index], num_classes, reg)
            accuracies.append(float(np.mean(predict(test_x).argmax(-1) == test_y)))
        results[k] = {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)),
                      "accuracies": accuracies}
    return results


def confusion_matrix(labels, predictions, num_classes):
    """`matrix[true, predicted]` counts."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    return matrix


def classification_report(model, dataset, num_classes, loss=None):
    """Top-1, top-5, the confusion matrix and (with a Keras `loss`) the mean
    loss of `model` on a dataset of `(images, one-hot or integer labels)`
    batches, in one pass."""
    import keras

    labels, targets, scores = [], [], []
    for images, y in dataset:
        scores.append(keras.ops.convert_to_numpy(model(images, training=False)))
        y = np.asarray(y)
        labels.append(y.argmax(-1) if y.ndim == 2 else y)
        targets.append(y if y.ndim == 2 else np.eye(num_classes, dtype="float32")[y])
    labels, scores = np.concatenate(labels), np.concatenate(scores)
    top5 = np.argsort(-scores, axis=-1)[:, : min(5, num_classes)]
    report = {
        "accuracy": float(np.mean(top5[:, 0] == labels)),
        "top5": float(np.mean(np.any(top5 == labels[:, None], axis=-1))),
        "confusion_matrix": confusion_matrix(labels, top5[:, 0], num_classes),
        "count": int(len(labels)),
    }
    if loss is not None:
        value = loss(np.concatenate(targets), scores.astype("float32"))
        report["loss"] = float(keras.ops.convert_to_numpy(value))
    return report


# --- A saved model on a config's data ------------------------------------------------


def _split_arrays(config, source, limit):
    """Images and integer labels of a source, evaluation-preprocessed, at most `limit`."""
    from keras_mixer import data

    dataset = data.eval_pipeline(source, 256, data.image_shape(config, source), config["eval_crop"])
    images, labels = [], []
    for x, y in dataset.unbatch().take(limit).batch(256):
        images.append(x.numpy())
        labels.append(y.numpy().argmax(-1))
    return np.concatenate(images), np.concatenate(labels)


def check_model_fits(model, image_shape, num_classes, where="the model"):
    """A `ValueError` unless `model` takes `image_shape` images and gives `num_classes` scores."""
    if tuple(model.input_shape[1:]) != tuple(image_shape) or model.output_shape[-1] != num_classes:
        raise ValueError(
            f"{where} takes {tuple(model.input_shape[1:])} images and gives "
            f"{model.output_shape[-1]} classes; the config's data has "
            f"{tuple(image_shape)} images and {num_classes} classes. Evaluate it "
            "with the config it was trained with."
        )


def evaluate(model, config, shots=(), seeds=5, few_shot_train=10_000, out_dir=None):
    """Evaluates a model (or a `.keras` path) on `config`'s eval split.

    Returns (and with `out_dir` writes as `evaluation.json`) a dict with
    `accuracy`, `top5`, `loss` (the config's loss), `count`,
    `confusion_matrix` and, with `shots` (few-shot shot counts, e.g.
    (1, 5)), the linear probes under "few_shot".
    """
    from keras_mixer import checkpoint
    from keras_mixer import config as config_lib
    from keras_mixer import data
    from keras_mixer import optim

    config = config_lib.resolve(config)
    if not config["eval_split"]:
        raise ValueError("The config has eval_split=None: nothing to evaluate on.")
    where = "the model"
    if not hasattr(model, "predict"):
        model, where = checkpoint.load_model(model), str(model)
    sources = data.make_sources(config)
    datasets = data.make_datasets(config, config["batch_size"], sources=sources)
    check_model_fits(model, datasets.image_shape, datasets.num_classes, where)
    loss = optim.make_loss(config["loss"], config["label_smoothing"])
    # A damaged image stops the evaluation naming its file, as in `train`.
    with data.naming_damaged_images(sources):
        report = classification_report(model, datasets.eval, datasets.num_classes, loss)
        results = {k: report[k] for k in ("accuracy", "top5", "loss", "count")}
        results["confusion_matrix"] = report["confusion_matrix"].tolist()
        if shots:
            results["few_shot"] = _few_shot(model, config, sources, datasets.num_classes, shots, seeds,
                                            few_shot_train)
    if out_dir is not None:
        _write(results, report["confusion_matrix"], pathlib.Path(out_dir))
    return results


def _few_shot(model, config, sources, num_classes, shots, seeds, few_shot_train):
    train_x, train_y = _split_arrays(config, sources.train, few_shot_train)
    test_x, test_y = _split_arrays(config, sources.eval, few_shot_train)
    return {
        str(k): v for k, v in few_shot(
            pre_logits(model, train_x), train_y, pre_logits(model, test_x), test_y,
            num_classes, shots=tuple(shots), seeds=tuple(range(seeds)),
        ).items()
    }


def _write(results, matrix, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(results, indent=2))
    try:
        from keras_mixer import visualize

        visualize.plot_confusion(matrix, out_dir / "confusion.png")
    except ImportError:
        pass  # matplotlib is optional: the JSON holds the matrix.


def format_results(name, results):
    """`evaluate`'s results as the lines the command prints."""
    lines = [f"{name}: top-1 {results['accuracy']:.4f}, top-5 {results['top5']:.4f}, "
             f"loss {results['loss']:.4f} on {results['count']} images"]
    for shots, r in results.get("few_shot", {}).items():
        lines.append(f"  {shots}-shot linear: {r['mean']:.4f} +- {r['std']:.4f} over "
                     f"{len(r['accuracies'])} seeds")
    return "\n".join(lines)


def main(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    from keras_mixer import config as config_lib

    config = config_lib.apply_overrides(config_lib.load(args.config), config_lib.parse_overrides(args.set))
    results = evaluate(args.model, config, args.few_shot, args.seeds, args.few_shot_train, args.out_dir)
    print(format_results(args.model, results))
    return 0


if __name__ == "__main__":
    from keras_mixer import cli

    sys.exit(cli.run(main))
