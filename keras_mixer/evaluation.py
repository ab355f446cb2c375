"""Evaluation: accuracy, confusion matrix, and the paper's few-shot linear probe.

Few-shot protocol (paper Section 3, "linear 5-shot"; as big_vision's
evaluator computes it), implemented here in NumPy:
1. Features are the frozen pre-logits (`weights.reset_head(model, None)`).
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
"""

import numpy as np

BIAS_FEATURE = 100.0


def pre_logits(model, images, batch_size=256):
    """Frozen features of `images` (pixels as the model takes them): the pooled pre-logits."""
    import keras

    from keras_mixer import weights

    features = model if model.num_classes is None else weights.reset_head(model, None)
    return np.asarray(
        keras.ops.convert_to_numpy(features.predict(images, batch_size=batch_size, verbose=0)),
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


def classification_report(model, dataset, num_classes):
    """Top-1, top-5 and the confusion matrix of `model` on a dataset of
    `(images, one-hot or integer labels)` batches."""
    import keras

    labels, scores = [], []
    for images, y in dataset:
        scores.append(keras.ops.convert_to_numpy(model(images, training=False)))
        y = np.asarray(y)
        labels.append(y.argmax(-1) if y.ndim == 2 else y)
    labels, scores = np.concatenate(labels), np.concatenate(scores)
    top5 = np.argsort(-scores, axis=-1)[:, : min(5, num_classes)]
    return {
        "accuracy": float(np.mean(top5[:, 0] == labels)),
        "top5": float(np.mean(np.any(top5 == labels[:, None], axis=-1))),
        "confusion_matrix": confusion_matrix(labels, top5[:, 0], num_classes),
        "count": int(len(labels)),
    }
