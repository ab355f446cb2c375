"""Keras weight quantization of a trained Mixer: int8 or int4 `Dense` kernels, in a `.keras` file.

    python train.py --quantize int8        # also writes <workdir>/model_int8.keras

`quantize(model, mode)` is Keras' own `model.quantize` on every `Dense`
(the token- and channel-mixing MLPs and the head; the stem convolution and
the norms stay float). `MLPMixer.get_config` then records each quantized
layer's policy in a `DTypePolicyMap`, so the file reloads with the same
quantized layers and identical outputs on every backend. int8 keeps one
scale per output channel; int4 (Keras' default block size, 128) one per
block of input rows. `quantize_file` does it for a saved model and reports
the file sizes and the top-1 agreement with the float model.

Such a file exports to SavedModel and ONNX (`keras_mixer.export`); the
TFLite converter cannot take Keras' int8 matmuls, so for TFLite export the
float model with `--quantization int8` or `dynamic_range` instead, which
quantize in the converter.
"""


import numpy as np

from keras_mixer import storage

MODES = ("int8", "int4")


def _is_dense(layer):
    import keras

    return type(layer) is keras.layers.Dense


def quantized_modes(model):
    """The Keras quantization modes of `model`'s layers (empty for a float model)."""
    return sorted({layer.quantization_mode for layer in model._flatten_layers() if layer.quantization_mode})


def quantize(model, mode):
    """Quantizes every `Dense` of `model` in place with Keras; returns it.

    Raises:
        ValueError: an unknown mode, or a model already quantized.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown quantization mode {mode!r}. Valid: {', '.join(MODES)}.")
    done = quantized_modes(model)
    if done:
        raise ValueError(f"The model is already quantized ({', '.join(done)}); quantize its float version.")
    model.quantize(mode, filters=_is_dense)
    return model


def top1(model, images):
    """`model`'s top-1 class of each image."""
    import keras

    return np.asarray(keras.ops.convert_to_numpy(model.predict(images, batch_size=64, verbose=0))).argmax(-1)


def quantize_file(path, mode, images, out_path=None):
    """Writes the `mode`-quantized copy of the `.keras` model at `path`.

    Args:
        path: a float `.keras` model.
        mode: "int8" or "int4".
        images: (N, H, W, C) images of the model's data in [0, 255], on
            which the quantized model's top-1 is compared with the float one.
        out_path: where to write it (default: `<path stem>_<mode>.keras`
            beside `path`).

    Returns:
        dict: file, mode, size_bytes, float_size_bytes, top1_agreement,
        images (the count compared).
    """
    from keras_mixer import checkpoint

    path = storage.path(path)  # local, or a URL (gs://...)
    out_path = storage.path(out_path) if out_path else path.with_name(f"{path.stem}_{mode}.keras")
    model = checkpoint.load_model(path)
    images = np.asarray(images, "float32")
    expected = top1(model, images)
    quantize(model, mode)
    agreement = float(np.mean(top1(model, images) == expected))
    checkpoint.save_model(model, out_path)
    return {"file": str(out_path), "mode": mode, "size_bytes": out_path.stat().st_size,
            "float_size_bytes": path.stat().st_size, "top1_agreement": agreement, "images": len(images)}


def describe(report):
    return (f"saved {report['file']}: {report['mode']} weights, {report['size_bytes'] / 1e6:.2f} MB "
            f"(float {report['float_size_bytes'] / 1e6:.2f} MB), top-1 agreement with the float model "
            f"{report['top1_agreement']:.4f} on {report['images']} evaluation images")
