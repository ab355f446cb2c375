"""Export a trained Mixer to SavedModel, TFLite/LiteRT and ONNX, each checked against Keras.

    keras-mixer export --model runs/digits/model.keras --out_dir export/ \
        --formats saved_model tflite onnx --quantization float16 dynamic_range int8

Keras writes these files from the TensorFlow backend, so `export` loads the
model there: in this process when it runs TensorFlow, else in a
TensorFlow-backend subprocess (a torch- or JAX-trained `.keras` file loads
with `compile=False`). The writers are Keras' own `model.export` (formats
"tf_saved_model", "litert" with converter options, and "onnx" through
tf2onnx). After every export the file is run on one batch next to the
Keras model: float32 files must match the logits to 1e-4 (max abs),
float16 to 1e-2, and quantized files must agree on the top-1 class for at
least 95% of the batch. `export_report.json` records each file's size,
difference or agreement and latency; a file that fails its check is kept,
renamed `<name>.failed<ext>`, and the export raises `ExportError` (the CLI
exits with status 1).

Inputs of every exported file: images in [0, 255], float32 (uint8 for the
int8 TFLite file), shape (batch, height, width, channels) with a dynamic
batch. Outputs: logits, or pooled features for a headless model.
"""

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from keras_mixer import storage

FORMATS = ("saved_model", "tflite", "onnx")
QUANTIZATIONS = ("float32", "float16", "dynamic_range", "int8")
# Check thresholds: max abs logits difference, or top-1 agreement.
TOLERANCES = {"float32": 1e-4, "float16": 1e-2}
MIN_AGREEMENT = 0.95
EXTRAS = {"onnx": ("tf2onnx", "onnxruntime"), "tflite": ("ai_edge_litert",)}
REPORT = "export_report.json"
CLASS_NAMES = "class_names.json"


class ExportError(RuntimeError):
    """An exported file failed its check against the Keras model."""


def _check_arguments(formats, quantization):
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"Unknown export format(s) {unknown or formats}. Valid: {', '.join(FORMATS)}.")
    if quantization is None:
        quantization = ("float32",)
    elif isinstance(quantization, str):
        quantization = (quantization,)
    quantization = tuple(quantization)
    unknown = [q for q in quantization if q not in QUANTIZATIONS]
    if unknown or not quantization:
        raise ValueError(
            f"Unknown quantization(s) {unknown or quantization}. Valid: {', '.join(QUANTIZATIONS)} "
            "(they apply to the tflite format)."
        )
    if quantization != ("float32",) and "tflite" not in formats:
        raise ValueError(f"quantization {quantization} applies to TFLite: add 'tflite' to formats.")
    for fmt in formats:
        for module in EXTRAS.get(fmt, ()):
            try:
                __import__(module)
            except ImportError as error:
                raise ImportError(
                    f"Exporting {fmt} needs the {module!r} package: pip install 'keras-mixer[export]' "
                    f"(or pip install -e '.[export]' in a checkout)."
                ) from error
    return formats, quantization


def export(model_or_path, out_dir, formats=FORMATS, quantization=None,
           representative_data=None, model_config=None, class_names=None):
    """Exports a Mixer and checks every file against Keras. Returns the report dict.

    Args:
        model_or_path: a Keras model (any backend), or the path of a
            `.keras` file, or of a `.weights.h5` file with `model_config`.
        out_dir: where the files and `export_report.json` go.
        formats: any of "saved_model", "tflite", "onnx".
        quantization: for TFLite, one or more of "float32" (the default),
            "float16", "dynamic_range", "int8".
        representative_data: images of the model's data in [0, 255], shape
            (N, H, W, C), for int8 calibration and for the checks; e.g.
            `keras_mixer.data.representative_images(config)`. Needed for
            int8; without them the float checks run on seeded noise
            (`noise_images`).
        model_config: `MLPMixer` arguments (a dict or a JSON file) for a
            `.weights.h5` file.
        class_names: optional list of class names, written next to the
            files for `keras_mixer.predict`.

    Raises:
        ExportError: when a file fails its check (after writing the report).
    """
    formats, quantization = _check_arguments(formats, quantization)
    if isinstance(model_or_path, (str, os.PathLike)):
        check_model_path(model_or_path)
    if "tflite" in formats and "int8" in quantization and representative_data is None:
        raise ValueError(
            "int8 TFLite is calibrated on images of the model's data: pass "
            "representative_data (N, H, W, C) in [0, 255], e.g. "
            "keras_mixer.data.representative_images(config), or on the command "
            "line --representative_data images.npy."
        )
    if storage.is_remote(out_dir) or (isinstance(model_or_path, (str, os.PathLike))
                                      and storage.is_remote(model_or_path)):
        return _export_through_local_copies(model_or_path, out_dir, formats, quantization,
                                            representative_data, model_config, class_names)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if not isinstance(model_or_path, (str, os.PathLike)):
            path = tmp / "model.keras"
            model_or_path.save(path)
            model_or_path = path
        if isinstance(model_config, dict):
            (tmp / "model_config.json").write_text(json.dumps(model_config))
            model_config = tmp / "model_config.json"
        data_path = None
        if representative_data is not None:
            data_path = tmp / "representative.npy"
            np.save(data_path, np.asarray(representative_data, "float32"))
        if class_names is not None:
            (out_dir / CLASS_NAMES).write_text(json.dumps(list(class_names)))
        if keras.backend.backend() == "tensorflow":
            report = _export_here(model_or_path, out_dir, formats, quantization, data_path, model_config)
        else:
            report = _export_in_subprocess(model_or_path, out_dir, formats, quantization, data_path, model_config)
    failed = [entry for entry in report["files"] if not entry["passed"]]
    if failed:
        raise ExportError(
            "Exported file(s) failed the check against Keras: "
            + "; ".join(f"{e['file']}: {e['check']}" for e in failed)
            + f". See {out_dir / REPORT}."
        )
    return report


def _export_in_subprocess(path, out_dir, formats, quantization, data_path, model_config):
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    command = [sys.executable, "-m", "keras_mixer.export", "--model", str(path),
               "--out_dir", str(out_dir), "--formats", *formats, "--quantization", *quantization,
               "--no-raise"]
    if data_path:
        command += ["--representative_data", str(data_path)]
    if model_config:
        command += ["--config", str(model_config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        # The process reports a user error as one "error: ..." line (keras_mixer.cli).
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        detail = errors[-1][len("error: "):] if errors else "\n" + done.stderr[-3000:]
        raise RuntimeError(f"The TensorFlow-backend export process failed: {detail}")
    return json.loads((out_dir / REPORT).read_text())


def _export_through_local_copies(model_or_path, out_dir, *args):
    """`export` from or to a URL (gs://...): a remote model is read through a
    local copy, the files are written and checked in a local folder, then
    uploaded to `out_dir` (also when a check failed: the report says which),
    and the local copies removed."""
    target = storage.check_directory(out_dir, "--out_dir")
    with tempfile.TemporaryDirectory(prefix="keras-mixer-export-") as local, \
            contextlib.ExitStack() as stack:
        if isinstance(model_or_path, (str, os.PathLike)):
            model_or_path = stack.enter_context(storage.reading(model_or_path))
        try:
            return export(model_or_path, local, *args)
        except ExportError as error:
            raise ExportError(str(error).replace(local, str(target))) from None
        finally:
            storage.upload_folder(local, target)


# --- In a TensorFlow-backend process ---------------------------------------------


def check_model_path(path):
    """`path` as a Path, when it names an existing `.weights.h5` file or a
    readable `.keras` archive; else a clear error. Cheap: `export` checks
    before it starts a TensorFlow process."""
    from keras_mixer import checkpoint

    path = storage.path(path)
    if path.name.endswith(".weights.h5"):
        if not path.is_file():
            raise FileNotFoundError(f"No model at {path}.")
    elif path.suffix == ".keras":
        checkpoint.check_model_file(path)
    else:
        raise ValueError(f"Cannot export {path}: expected a .keras file or a .weights.h5 file.")
    return path


def load_model(path, model_config=None):
    """Loads a `.keras` file (compile=False) or a `.weights.h5` file with its config."""
    from keras_mixer import checkpoint
    from keras_mixer.model import MLPMixer

    path = check_model_path(path)
    if path.name.endswith(".weights.h5"):
        if model_config is None:
            raise ValueError(
                f"{path} holds weights only: pass the MLPMixer arguments as model_config "
                "(a dict or a JSON file, e.g. from model.get_config())."
            )
        if not isinstance(model_config, dict):
            model_config = json.loads(pathlib.Path(model_config).read_text())
        model = MLPMixer.from_config(model_config)
        model.load_weights(path)
        return model
    return checkpoint.load_model(path)


def noise_images(image_shape, count=64, seed=0):
    """`count` seeded uniform-noise images in [0, 255]: what the float checks
    run on when the caller gives no images of its data."""
    return np.random.default_rng(seed).uniform(0, 255, (count, *image_shape)).astype("float32")


def _check_data(images, image_shape):
    images = np.asarray(images, "float32")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"representative_data has shape {images.shape}; the model takes "
            f"(N, {', '.join(map(str, image_shape))}) images in [0, 255]."
        )
    return images


def _tflite_options(quantization, images):
    import tensorflow as tf

    if quantization == "float32":
        return {}
    options = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantization == "float16":
        options["target_spec"] = {"supported_types": [tf.float16]}
    elif quantization == "int8":
        def representative():
            for image in images:
                yield [image[None]]

        options.update(
            representative_dataset=representative,
            target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
            inference_input_type=tf.uint8,
        )
    return options


def load_tflite(path):
    """A function running a TFLite file with the LiteRT interpreter, one image at a time."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]

    def run(images):
        outputs = []
        for image in images:
            value = image[None]
            if inp["dtype"] == np.uint8:
                value = np.clip(np.round(value), 0, 255)
            interpreter.set_tensor(inp["index"], value.astype(inp["dtype"]))
            interpreter.invoke()
            result = interpreter.get_tensor(out["index"])
            if out["dtype"] != np.float32:
                scale, zero = out["quantization"]
                result = (result.astype("float32") - zero) * scale
            outputs.append(result[0])
        return np.stack(outputs)

    return run


def load_saved_model(path):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return lambda images: loaded.serve(tf.constant(images, tf.float32)).numpy()


def load_onnx(path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: np.asarray(images, np.float32)})[0]


LOADERS = {"saved_model": load_saved_model, "tflite": load_tflite, "onnx": load_onnx}


def _timed(kind, path, images):
    run = LOADERS[kind](path)
    run(images[:1])  # warm up
    begin = time.perf_counter()
    outputs = run(images)
    return outputs, (time.perf_counter() - begin) * 1000 / len(images)


def verify(kind, quantization, path, expected, images):
    """Runs one exported file and compares it with Keras' `expected` outputs."""
    outputs, latency = _timed(kind, path, images)
    entry = {"format": kind, "quantization": quantization, "file": path.name,
             "size_bytes": _size(path), "latency_ms_per_image": round(latency, 3)}
    if quantization in TOLERANCES:
        difference = float(np.abs(outputs - expected).max())
        tolerance = TOLERANCES[quantization]
        entry.update(max_abs_difference=difference, tolerance=tolerance,
                     passed=difference <= tolerance,
                     check=f"max abs difference {difference:.3g} (limit {tolerance})")
    else:
        agreement = float(np.mean(outputs.argmax(-1) == expected.argmax(-1)))
        entry.update(top1_agreement=agreement, min_agreement=MIN_AGREEMENT,
                     passed=agreement >= MIN_AGREEMENT,
                     check=f"top-1 agreement {agreement:.3f} (limit {MIN_AGREEMENT})")
    return entry


def _size(path):
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _mark_failed(path):
    failed = path.with_name(f"{path.stem}.failed{path.suffix}")
    if failed.exists():
        shutil.rmtree(failed) if failed.is_dir() else failed.unlink()
    path.rename(failed)
    return failed


def _check_quantized(model, formats):
    from keras_mixer import quantize

    modes = quantize.quantized_modes(model)
    if modes and "tflite" in formats:
        raise ValueError(
            f"This model's weights are quantized by Keras ({', '.join(modes)}), which the TFLite "
            "converter cannot convert. Export the float model with --quantization int8 (or "
            "dynamic_range): the converter quantizes it. SavedModel and ONNX take this model."
        )


def _float32(model):
    """`model` computing in float32, with the same (float32) weights.

    A model trained under "mixed_bfloat16" (`mixed_precision`, which
    `"auto"` picks on TPUs, GPUs and some CPUs) computes in bfloat16,
    which the TFLite converter refuses ("'tf.MatMul' op is neither a custom
    op nor a flex op") and which most serving CPUs emulate. The exported
    files compute in float32 (and in TFLite's own quantizations from
    there), and are checked against this float32 model.
    """
    from keras_mixer import quantize
    from keras_mixer.model import MLPMixer

    if (not isinstance(model, MLPMixer) or model.dtype_policy.compute_dtype == "float32"
            or quantize.quantized_modes(model)):
        return model
    float_model = MLPMixer.from_config(dict(model.get_config(), dtype="float32"))
    float_model.set_weights(model.get_weights())
    return float_model


def _export_here(path, out_dir, formats, quantization, data_path, model_config):
    import keras

    model = load_model(path, model_config) if isinstance(path, (str, os.PathLike)) else path
    _check_quantized(model, formats)
    model = _float32(model)
    image_shape = tuple(model.input_shape[1:])
    if data_path is not None:
        images = _check_data(np.load(data_path), image_shape)
    else:
        images = noise_images(image_shape)
    check = images[:64]
    expected = keras.ops.convert_to_numpy(model.predict(check, verbose=0))
    signature = [keras.InputSpec(shape=(None, *image_shape), dtype="float32")]
    files = []
    targets = []
    if "saved_model" in formats:
        target = out_dir / "saved_model"
        shutil.rmtree(target, ignore_errors=True)
        model.export(str(target), format="tf_saved_model", verbose=False)
        targets.append(("saved_model", "float32", target))
    if "tflite" in formats:
        for q in quantization:
            target = out_dir / f"model_{q}.tflite"
            model.export(str(target), format="litert", verbose=False,
                         input_signature=signature, **_tflite_options(q, images))
            targets.append(("tflite", q, target))
    if "onnx" in formats:
        target = out_dir / "model.onnx"
        model.export(str(target), format="onnx", verbose=False, input_signature=signature)
        targets.append(("onnx", "float32", target))
    for kind, q, target in targets:
        entry = verify(kind, q, target, expected, check)
        if not entry["passed"]:
            entry["file"] = _mark_failed(target).name
        files.append(entry)
    report = {
        "model": str(path), "image_shape": list(image_shape),
        "outputs": "logits" if model.num_classes else "features",
        "check_images": len(check), "files": files,
    }
    (out_dir / REPORT).write_text(json.dumps(report, indent=2))
    return report


def format_report(report):
    lines = [f"{'file':<28} {'size':>10} {'check':<48} {'ms/image':>9}  result"]
    for e in report["files"]:
        lines.append(
            f"{e['file']:<28} {e['size_bytes'] / 1e6:>8.2f}MB {e['check']:<48} "
            f"{e['latency_ms_per_image']:>9.3f}  {'ok' if e['passed'] else 'FAILED'}"
        )
    return "\n".join(lines)


def _write_preset(source, preset_dir):
    """`--formats kerashub`: a KerasHub preset (keras_mixer.kerashub.save_preset)."""
    from keras_mixer import kerashub  # an ImportError names the extra

    kerashub.save_preset(source, preset_dir)
    print(f"wrote the KerasHub preset {preset_dir} (keras_hub.models.ImageClassifier.from_preset"
          f"({str(preset_dir)!r}); keras_hub.upload_preset('hf://user/repo', {str(preset_dir)!r}) shares it)")


def main(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras file, or a .weights.h5 file with --config")
    parser.add_argument("--config", help="JSON file of MLPMixer arguments (for .weights.h5)")
    parser.add_argument("--out_dir", default="export", help="(default: %(default)s)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS),
                        help=f"any of {', '.join(FORMATS)} (default), and kerashub: a KerasHub preset in "
                        "<out_dir>/kerashub, for which --model may also be an official checkpoint "
                        "(imagenet21k/Mixer-B_16, a .npz) or timm weights (hf://timm/...)")
    parser.add_argument("--quantization", nargs="+", default=["float32"],
                        help=f"TFLite: any of {', '.join(QUANTIZATIONS)} (default: float32)")
    parser.add_argument("--representative_data",
                        help=".npy of images (N, H, W, C) in [0, 255] of the model's data: int8 "
                        "calibration and the checks (needed for int8; default: the float checks run on noise)")
    parser.add_argument("--no-raise", dest="no_raise", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.no_raise:  # The subprocess of `export`: write the report, let the parent judge.
        formats, quantization = _check_arguments(args.formats, args.quantization)
        out_dir = pathlib.Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        _export_here(args.model, out_dir, formats, quantization, args.representative_data, args.config)
        return 0
    formats = [f for f in args.formats if f != "kerashub"]
    if "kerashub" in args.formats:
        _write_preset(args.model, pathlib.Path(args.out_dir) / "kerashub")
        if not formats:
            return 0
    data = np.load(args.representative_data) if args.representative_data else None
    try:
        report = export(args.model, args.out_dir, formats, args.quantization, data, args.config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ExportError as error:
        print(format_report(json.loads((storage.path(args.out_dir) / REPORT).read_text())))
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"wrote {storage.path(args.out_dir) / REPORT}")
    return 0


if __name__ == "__main__":
    from keras_mixer import cli

    sys.exit(cli.run(main))
