"""KerasHub's Mixer classes, tested with KerasHub's own helpers from the installed wheel
(`keras_hub.src.tests.test_case.TestCase`, as KerasHub tests its image classifiers), on
every backend; presets from the official fixture match `MLPMixer.from_checkpoint`."""

import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub", reason="the kerashub extra (keras-hub>=0.32 needs keras>=3.15)")
if tuple(int(p) for p in keras_hub.__version__.split(".")[:2]) < (0, 32):
    pytest.skip(f"keras-hub {keras_hub.__version__} is older than the kerashub extra's 0.32",
                allow_module_level=True)

# The module, not its class: pytest would collect a TestCase in this file's namespace.
from keras_hub.src.tests import test_case as hub_test_case  # noqa: E402

from keras_mixer import MLPMixer  # noqa: E402
from keras_mixer import kerashub  # noqa: E402
from keras_mixer.kerashub import MixerBackbone  # noqa: E402
from keras_mixer.kerashub import MixerImageClassifier  # noqa: E402
from keras_mixer.kerashub import MixerImageClassifierPreprocessor  # noqa: E402
from keras_mixer.kerashub import MixerImageConverter  # noqa: E402
from base import to_numpy  # noqa: E402
from conftest import once  # noqa: E402
from conftest import subprocess_env  # noqa: E402

TINY = dict(image_shape=(16, 16, 3), patch_size=4, num_blocks=2, hidden_dim=8, tokens_mlp_dim=4,
            channels_mlp_dim=16)


@pytest.fixture
def case(tmp_path):
    """KerasHub's TestCase outside its repository: its helpers, called directly."""
    test_case = hub_test_case.TestCase()
    test_case.get_temp_dir = lambda: str(tmp_path)
    return test_case


def images(n=2, size=16, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def test_backbone_passes_kerashub_s_backbone_test(case):
    # Serialization, eager and compiled predict, tf.data input, the class
    # name in the model's name, mixed precision (not on PyTorch's CPU, as
    # KerasHub decides) and int8/float8 quantization (not on PyTorch).
    # Tensors, as KerasHub's own tests pass (Keras' compute_output_spec
    # takes no NumPy arrays).
    scaled = keras.ops.convert_to_tensor(images() / 127.5 - 1)
    case.run_backbone_test(MixerBackbone, TINY, scaled, (2, 4, 4, 8))
    case.run_model_saving_test(MixerBackbone, TINY, scaled)


def classifier_kwargs():
    converter = MixerImageConverter(image_size=(16, 16), scale=1 / 127.5, offset=-1.0)
    return {"backbone": MixerBackbone(**TINY), "num_classes": 3,
            "preprocessor": MixerImageClassifierPreprocessor(converter)}


def test_classifier_passes_kerashub_s_task_and_saving_tests(case):
    # predict and fit with the preprocessor inside, on a dataset and split
    # from it; default compile; serialization; a saved .keras file reloads.
    case.run_task_test(MixerImageClassifier, classifier_kwargs(), (images(4, size=24), np.array([0, 1, 2, 1])),
                       expected_output_shape=(4, 3))
    case.run_model_saving_test(MixerImageClassifier, classifier_kwargs(), keras.ops.convert_to_tensor(images(2)))


def random_mixer(**kwargs):
    model = MLPMixer(**TINY, num_classes=3, **kwargs)
    rng = np.random.default_rng(1)
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.2, variable.shape).astype("float32"))
    return model


@pytest.mark.parametrize("normalisation", [
    {}, {"pixel_mean": [0.485, 0.456, 0.406], "pixel_std": [0.229, 0.224, 0.225]}, {"include_preprocessing": False}])
def test_conversion_both_ways_keeps_the_weights_and_the_logits(normalisation):
    model = random_mixer(**normalisation)
    classifier = kerashub.to_kerashub(model)
    assert isinstance(classifier, MixerImageClassifier)
    x = images() if normalisation.get("include_preprocessing", True) else images() / 127.5 - 1
    np.testing.assert_allclose(to_numpy(classifier.predict(x, verbose=0)), to_numpy(model.predict(x, verbose=0)),
                               atol=1e-6)
    back = kerashub.from_kerashub(classifier)
    assert back.get_config() | {"name": None} == model.get_config() | {"name": None, "pixel_mean": back.pixel_mean,
                                                                        "pixel_std": back.pixel_std}
    if "pixel_mean" in normalisation:
        np.testing.assert_allclose(back.pixel_mean, normalisation["pixel_mean"], rtol=1e-6)
    for ours, theirs in zip(model.weights, back.weights):
        np.testing.assert_array_equal(to_numpy(ours), to_numpy(theirs))
    # No head: a backbone, whose pooled grid is the model's pre-logits.
    features = kerashub.to_kerashub(MLPMixer(**TINY, num_classes=None))
    assert isinstance(features, MixerBackbone) and features.output_shape == (None, 4, 4, 8)


def test_an_official_checkpoint_preset_reloads_through_keras_hub_with_the_same_logits(official_npz, tmp_path, case):
    path, _, config, arrays = official_npz
    pixels = (arrays["inputs"] + 1.0) * 127.5  # the [0, 255] pixels the fixture's inputs scale from
    reference = to_numpy(MLPMixer.from_checkpoint(path).predict(pixels, verbose=0))
    np.testing.assert_allclose(reference, arrays["logits"], atol=1e-4)
    kerashub.save_preset(path, tmp_path / "preset")
    assert {"config.json", "model.weights.h5", "task.json", "task.weights.h5", "preprocessor.json",
            "metadata.json"} <= {p.name for p in (tmp_path / "preset").iterdir()}
    for cls in (keras_hub.models.ImageClassifier, MixerImageClassifier):
        classifier = cls.from_preset(str(tmp_path / "preset"))
        assert type(classifier) is MixerImageClassifier
        assert np.abs(to_numpy(classifier.predict(pixels, verbose=0)) - reference).max() <= 1e-6
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "preset"))
    assert type(backbone) is MixerBackbone and backbone.num_blocks == config["num_blocks"]
    # KerasHub's preset test: a wrong name fails, the weights load or not.
    case.run_preset_test(MixerImageClassifier, str(tmp_path / "preset"), pixels, expected_output_shape=(4, 10))


def test_a_trained_model_s_preset_from_a_hugging_face_repo_loads_offline(tmp_path):
    """A fresh process, as a user runs it: a preset in the Hugging Face cache
    (as `keras_hub.upload_preset("hf://...")` then a download leaves it),
    HF_HUB_OFFLINE=1, and `import keras_mixer` before KerasHub's own loading."""
    model = random_mixer()
    x = images(3)
    expected = to_numpy(model.predict(x, verbose=0))
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "home" / "hub" / "models--someone--mixer-digits"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    kerashub.save_preset(model, repo / "snapshots" / revision)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, keras_mixer, keras_hub\n"
            "classifier = keras_hub.models.ImageClassifier.from_preset('hf://someone/mixer-digits')\n"
            "np.save(sys.argv[1] + '/y.npy', np.asarray(classifier.predict(np.load(sys.argv[1] + '/x.npy'), "
            "verbose=0)))\n"
            "print(type(classifier).__name__)\n")
    env = {k: v for k, v in subprocess_env(keras.backend.backend()).items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "MixerImageClassifier"
    assert np.abs(np.load(tmp_path / "y.npy") - expected).max() <= 1e-6


@once("registration is Python import machinery, the same on every backend; the subprocesses run JAX")
def test_the_classes_register_whether_keras_hub_is_imported_before_or_after(tmp_path):
    model = random_mixer()
    kerashub.save_preset(model, tmp_path / "preset")
    for order in ("import keras_mixer, keras_hub", "import keras_hub, keras_mixer"):
        code = (f"{order}\nimport sys\n"
                f"print(type(keras_hub.models.Backbone.from_preset({str(tmp_path / 'preset')!r})).__name__, "
                "'keras_mixer.kerashub' in sys.modules)\n")
        result = subprocess.run([sys.executable, "-c", code], env=subprocess_env("jax"),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1] == "MixerBackbone True", order
    # Without keras_hub imported, keras_mixer does not import it (~2 s).
    code = "import sys, keras_mixer\nprint('keras_hub' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env("jax"),
                            capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stderr[-2000:]


def test_unknown_arguments_and_wrong_models_are_clear_errors():
    with pytest.raises(TypeError, match="MixerBackbone got an unexpected keyword argument `num_block`. "
                       "Did you mean `num_blocks`"):
        MixerBackbone(**TINY, num_block=3)
    with pytest.raises(TypeError, match="from_kerashub takes a MixerImageClassifier or a MixerBackbone"):
        kerashub.from_kerashub(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="multiples of the patch size|multiple"):
        MixerBackbone(**{**TINY, "image_shape": (18, 16, 3)})
    from keras_mixer import quantize

    quantized = random_mixer()
    quantize.quantize(quantized, "int8")
    with pytest.raises(ValueError, match=r"is quantized \(int8\); convert the float model, then quantize"):
        kerashub.to_kerashub(quantized)


def test_preset_metadata_names_the_classes(tmp_path):
    kerashub.save_preset(random_mixer(), tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    task = json.loads((tmp_path / "p" / "task.json").read_text())
    assert config["registered_name"] == "keras_mixer>MixerBackbone"
    assert task["registered_name"] == "keras_mixer>MixerImageClassifier"


@once("the command writes the same files on every backend; the subprocess runs JAX")
def test_keras_mixer_export_writes_a_preset_of_an_official_checkpoint(official_npz, tmp_path):
    path, _, _, arrays = official_npz
    command = pathlib.Path(sys.executable).parent / "keras-mixer"
    result = subprocess.run([str(command), "export", "--model", str(path), "--formats", "kerashub",
                             "--out_dir", str(tmp_path / "out")], env=subprocess_env("jax"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote the KerasHub preset {tmp_path / 'out' / 'kerashub'}" in result.stdout
    pixels = (arrays["inputs"] + 1.0) * 127.5
    classifier = keras_hub.models.ImageClassifier.from_preset(str(tmp_path / "out" / "kerashub"))
    reference = to_numpy(MLPMixer.from_checkpoint(path).predict(pixels, verbose=0))
    assert np.abs(to_numpy(classifier.predict(pixels, verbose=0)) - reference).max() <= 1e-6
