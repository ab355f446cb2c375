"""Classify images with a trained or exported Mixer and print the top-5 classes.

    keras-mixer predict --model runs/digits/model.keras digit.png
    keras-mixer predict --model export/model_int8.tflite cat.jpg dog.png

`--model` is a `.keras` file, a SavedModel directory, a `.tflite` file or
a `.onnx` file. Images (JPEG, PNG, BMP, GIF) are resized and center-cropped
to the model's input as in evaluation ("resize-crop"; an image of exactly
the input size is used as it is); an RGB image given
to a one-channel model becomes grayscale. Class names come from
`class_names.json` beside the model (written by `keras_mixer.export` when
it is given `class_names`), or `--class_names`; otherwise classes print as
numbers.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

from keras_mixer import storage


def _input_shape(kind, path):
    if kind == "keras":
        import keras

        from keras_mixer import checkpoint

        model = checkpoint.load_model(path)
        return tuple(model.input_shape[1:]), lambda x: keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    from keras_mixer import export

    run = export.LOADERS[kind](path)
    if kind == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path))
        shape = tuple(int(d) for d in interpreter.get_input_details()[0]["shape"][1:])
    elif kind == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        shape = tuple(int(d) for d in session.get_inputs()[0].shape[1:])
    else:
        import tensorflow as tf

        signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        spec = next(iter(signature.structured_input_signature[1].values()))
        shape = tuple(int(d) for d in spec.shape[1:])
    return shape, run


def _kind(path):
    path = storage.path(path)
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}: give a .keras file, a SavedModel directory, "
                                "a .tflite file or a .onnx file.")
    if path.is_dir() and (path / "saved_model.pb").exists():
        return "saved_model"
    kinds = {".keras": "keras", ".tflite": "tflite", ".onnx": "onnx"}
    if path.suffix in kinds and path.is_file():
        return kinds[path.suffix]
    raise ValueError(
        f"{path} is not a model keras_mixer.predict reads: expected a .keras file, a "
        "SavedModel directory, a .tflite file or a .onnx file."
    )


def load_image(path, image_shape):
    """An image file as a float32 array of `image_shape`, pixels in [0, 255]."""
    import tensorflow as tf

    from keras_mixer.data import center_crop

    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"No image at {path}.")
    raw = tf.io.read_file(str(path))
    try:
        image = tf.io.decode_image(raw, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as error:
        reason = str(error.message).splitlines()[0] if error.message else "no message"
        raise ValueError(
            f"{path} could not be decoded as a JPEG, PNG, BMP or GIF image: it is truncated, "
            f"corrupted or another kind of file (TensorFlow: {reason})."
        ) from None
    if image_shape[2] == 1:
        image = tf.image.rgb_to_grayscale(image)
    image = tf.cast(image, tf.float32)
    if tuple(image.shape[:2]) != tuple(image_shape[:2]):  # Same size: used as it is.
        image = center_crop(image, image_shape[:2], "resize-crop")
    return image.numpy()


def predict(model_path, image_paths, class_names=None, top=5):
    """Returns, per image, the `top` (class, probability) pairs, best first.

    `model_path` may be a URL (gs://...): the model, and the class names
    beside it, are read through local copies (`keras_mixer.storage`)."""
    if class_names is None:
        # Beside the file, or beside the SavedModel directory.
        names_file = storage.path(model_path).parent / "class_names.json"
        if names_file.exists():
            class_names = json.loads(names_file.read_text())
    if storage.is_remote(model_path):
        if not storage.path(model_path).exists():
            _kind(model_path)  # the error that names what is missing
        with storage.reading(model_path) as local:
            return predict(local, image_paths, class_names or [], top)
    kind = _kind(model_path)
    shape, run = _input_shape(kind, model_path)
    images = np.stack([load_image(p, shape) for p in image_paths])
    logits = np.asarray(run(images), "float64")
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    results = []
    for row in probabilities:
        best = np.argsort(-row)[:top]
        results.append([(class_names[i] if class_names else int(i), float(row[i])) for i in best])
    return results


def main(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--class_names", help="a JSON list of class names")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    names = json.loads(pathlib.Path(args.class_names).read_text()) if args.class_names else None
    for path, best in zip(args.images, predict(args.model, args.images, names, args.top)):
        print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in best))
    return 0


if __name__ == "__main__":
    from keras_mixer import cli

    sys.exit(cli.run(main))
