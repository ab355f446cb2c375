"""Evaluation: the few-shot linear probe on cases with known answers, confusion matrices."""

import json

import numpy as np
import pytest

from keras_mixer import MLPMixer, data, evaluation
from keras_mixer import config as config_lib
from keras_mixer import optim
from keras_mixer import sources
from keras_mixer import weights
from base import to_numpy


def separable(n_per_class, num_classes=4, dim=4, seed=0):
    """Features whose class is a shift of 5 along its own axis, over noise of
    scale 0.3: linearly separable with a wide margin. (Extra pure-noise
    dimensions would not keep it easy: the protocol standardises every
    feature, so noise gets the signal's scale.)"""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = rng.normal(scale=0.3, size=(len(y), dim))
    x[np.arange(len(y)), y] += 5.0
    return x, y


def test_separable_features_give_100_percent():
    train_x, train_y = separable(30)
    test_x, test_y = separable(50, seed=1)
    results = evaluation.few_shot(train_x, train_y, test_x, test_y, 4, shots=(1, 5, 10), seeds=(0, 1, 2))
    for k in (1, 5, 10):
        assert results[k]["accuracies"] == [1.0, 1.0, 1.0] and results[k]["std"] == 0.0


def test_primal_and_dual_solutions_agree():
    # 40 examples and 32 features use the primal form; 40 and 64 the dual.
    # Constant features (zero after standardising) change neither the fit
    # nor the scores.
    x, y = separable(10, dim=32)
    padded = np.concatenate([x, np.zeros((len(x), 32))], axis=1)
    a = evaluation.fit_linear(x, y, 4, l2_reg=3.0)(x)
    b = evaluation.fit_linear(padded, y, 4, l2_reg=3.0)(padded)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_few_shot_on_digits_pixels_is_deterministic_and_improves_with_shots():
    (x_train, y_train), (x_test, y_test) = sources.load_digits()
    train = x_train.reshape(len(x_train), -1)
    test = x_test.reshape(len(x_test), -1)
    first = evaluation.few_shot(train, y_train, test, y_test, 10, shots=(1, 10), seeds=(0, 1))
    again = evaluation.few_shot(train, y_train, test, y_test, 10, shots=(1, 10), seeds=(0, 1))
    assert first == again
    assert first[10]["mean"] > first[1]["mean"] > 0.3  # well above chance (0.1)
    assert first[10]["mean"] > 0.75
    with pytest.raises(ValueError, match="fewer than 500 shots"):
        evaluation.few_shot(train, y_train, test, y_test, 10, shots=(500,))


def test_pre_logits_are_the_headless_model_output():
    model = MLPMixer(image_shape=(8, 8, 1), patch_size=2, num_blocks=1, hidden_dim=16,
                     tokens_mlp_dim=8, channels_mlp_dim=32, num_classes=10)
    images = np.random.default_rng(0).uniform(0, 255, (6, 8, 8, 1)).astype("float32")
    features = evaluation.pre_logits(model, images)
    assert features.shape == (6, 16)
    headless = weights.reset_head(model, None)
    np.testing.assert_allclose(features, evaluation.pre_logits(headless, images), atol=1e-6)
    # The features model shares the model's weights: no copy is made.
    sub = evaluation.features(model)
    assert {id(v) for v in sub.weights} <= {id(v) for v in model.weights}
    norm = model.get_layer("pre_head_layer_norm")
    norm.beta.assign(np.full(norm.beta.shape, 3.0, "float32"))
    np.testing.assert_allclose(to_numpy(sub(images)), features + 3.0, atol=1e-5)


def test_confusion_matrix_and_report():
    matrix = evaluation.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    model = MLPMixer(image_shape=(8, 8, 1), patch_size=2, num_blocks=1, hidden_dim=16,
                     tokens_mlp_dim=8, channels_mlp_dim=32, num_classes=10)
    test = data.eval_pipeline(sources.digits_source("test"), 32, (8, 8, 1))
    report = evaluation.classification_report(model, test, 10, optim.make_loss("softmax_xent"))
    assert report["loss"] == pytest.approx(np.log(10), abs=1e-5)  # equal scores
    assert report["count"] == 360 and report["confusion_matrix"].sum() == 360
    # A zero head gives equal scores: top-1 is class 0, top-5 classes 0-4.
    assert report["accuracy"] == pytest.approx(np.mean(sources.load_digits()[1][1] == 0))
    assert report["top5"] == pytest.approx(np.mean(sources.load_digits()[1][1] < 5))


def test_evaluate_cli_matches_keras_evaluate_and_writes_its_files(tmp_path, capsys):
    import keras

    from keras_mixer import training

    config = config_lib.load("digits")
    config.update(epochs=2, model=dict(config["model"], num_blocks=1, hidden_dim=16,
                                       tokens_mlp_dim=16, channels_mlp_dim=32))
    training.train(config, tmp_path / "run", verbose=0, distribution="none")
    model_path = tmp_path / "run" / "model.keras"
    assert evaluation.main(["--model", str(model_path), "--config", "digits", "--few_shot", "1", "5",
                            "--seeds", "2", "--out_dir", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    # Keras' own evaluate, compiled as training compiles, is the reference.
    resolved = config_lib.resolve(config_lib.load("digits"))
    model = keras.saving.load_model(model_path, compile=False)
    model.compile(loss=optim.make_loss(resolved["loss"], resolved["label_smoothing"]),
                  weighted_metrics=optim.make_metrics(10))
    expected = model.evaluate(data.make_datasets(resolved, 32).eval, return_dict=True, verbose=0)
    assert results["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert results["top5"] == pytest.approx(expected["top5"], abs=1e-6)
    assert results["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    assert results["count"] == 360 and np.sum(results["confusion_matrix"]) == 360
    assert set(results["few_shot"]) == {"1", "5"}
    assert len(results["few_shot"]["5"]["accuracies"]) == 2
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 0
    assert "5-shot linear:" in capsys.readouterr().out

    other = MLPMixer(image_shape=(16, 16, 3), patch_size=4, num_blocks=1, hidden_dim=8,
                     tokens_mlp_dim=8, channels_mlp_dim=8, num_classes=10)
    other.save(tmp_path / "other.keras")
    with pytest.raises(ValueError, match=r"takes \(16, 16, 3\) images and gives 10 classes; "
                       r"the config's data has \(8, 8, 1\) images and 10 classes"):
        evaluation.evaluate(tmp_path / "other.keras", config_lib.load("digits"))
    five = MLPMixer(image_shape=(8, 8, 1), patch_size=2, num_blocks=1, hidden_dim=8,
                    tokens_mlp_dim=8, channels_mlp_dim=8, num_classes=5)
    with pytest.raises(ValueError, match=r"gives 5 classes; the config's data has \(8, 8, 1\) images and 10"):
        evaluation.evaluate(five, config_lib.load("digits"))
    with pytest.raises(FileNotFoundError, match="No model at .*missing.keras"):
        evaluation.evaluate(tmp_path / "missing.keras", config_lib.load("digits"))
    (tmp_path / "cut.keras").write_bytes(model_path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.keras is not a readable .keras file: it is not a zip archive"):
        evaluation.evaluate(tmp_path / "cut.keras", config_lib.load("digits"))


def test_a_damaged_image_stops_the_evaluation_naming_it(tmp_path):
    """`keras-mixer evaluate` and `train --eval_only` name the file, as `train` does."""
    from conftest import write_image_folder
    from test_sources import damage_body

    paths = write_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    damage_body(paths[6])
    config = dict(config_lib.load("digits"), dataset="image_folder", data_dir=str(tmp_path / "images"),
                  image_size=16, train_split="train", eval_split="train", batch_size=4)
    model = MLPMixer(image_shape=(16, 16, 3), patch_size=4, num_blocks=1, hidden_dim=8,
                     tokens_mlp_dim=8, channels_mlp_dim=8, num_classes=2)
    with pytest.raises(ValueError, match=f"damaged image.*{paths[6]}.*damaged_images='skip'"):
        evaluation.evaluate(model, config)
    results = evaluation.evaluate(model, dict(config, damaged_images="skip"))
    assert results["count"] == 7
