"""keras_mixer.predict: the top classes of image files, from every kind of model file."""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_mixer import predict
from keras_mixer import sources
from base import keras_logits
from conftest import subprocess_env


def test_predict_prints_the_class_of_a_png(trained, exported, tmp_path):
    out, _ = exported
    _, (x_test, y_test) = sources.load_digits()
    scores = keras_logits(trained, x_test[:50])
    index = int(np.flatnonzero(scores.argmax(-1) == y_test[:50])[0])  # one it gets right
    png = tmp_path / "digit.png"
    tf.io.write_file(str(png), tf.io.encode_png(tf.cast(tf.round(x_test[index]), tf.uint8)))
    for model in (trained, out / "model_int8.tflite", out / "saved_model", out / "model.onnx"):
        best = predict.predict(model, [png])[0]
        top = f"digit {y_test[index]}" if model != trained else int(y_test[index])
        assert best[0][0] == top, (model, best)
        assert len(best) == 5 and abs(sum(p for _, p in best) - 1) < 0.5
    done = subprocess.run(
        [sys.executable, "-m", "keras_mixer.predict", "--model", str(out / "model.onnx"), str(png)],
        env=subprocess_env(keras.backend.backend()), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(f"{png}: digit {y_test[index]} ")


def test_a_missing_or_truncated_image_names_the_file(trained, tmp_path):
    png = tmp_path / "cut.png"
    encoded = tf.io.encode_png(tf.zeros((8, 8, 3), tf.uint8)).numpy()
    png.write_bytes(encoded[: len(encoded) // 2])
    with pytest.raises(ValueError, match=r"cut.png could not be decoded as a JPEG, PNG, BMP or GIF image: "
                                         r"it is truncated, corrupted"):
        predict.predict(trained, [png])
    with pytest.raises(FileNotFoundError, match=r"No image at .*absent.png"):
        predict.predict(trained, [tmp_path / "absent.png"])


def test_an_unknown_or_missing_model_file_is_a_clear_error(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"weights")
    with pytest.raises(ValueError, match="is not a model keras_mixer.predict reads: expected a .keras file"):
        predict.predict(tmp_path / "m.pt", [tmp_path / "x.png"])
    with pytest.raises(FileNotFoundError, match="No model at .*missing.keras"):
        predict.predict(tmp_path / "missing.keras", [tmp_path / "x.png"])
    done = subprocess.run([sys.executable, "-m", "keras_mixer.predict", "--model", str(tmp_path / "missing.keras"),
                           str(tmp_path / "x.png")], env=subprocess_env(keras.backend.backend()),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-2].startswith("error: No model at ")
