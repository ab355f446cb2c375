import numpy as np
import pytest
import keras

from keras_mixer import MixerBlock
from keras_mixer import MLPMixer
from keras_mixer import VARIANTS
from keras_mixer import load_official
from base import check_model
from base import fixture_model
from base import fixture_params
from base import to_numpy
from conftest import once


def tiny(**kwargs):
    config = dict(
        image_shape=(16, 16, 3), patch_size=4, num_blocks=2, hidden_dim=16,
        tokens_mlp_dim=8, channels_mlp_dim=32, num_classes=5,
    )
    config.update(kwargs)
    return MLPMixer(**config)


# --- Fidelity to the official Flax model -------------------------------------


def test_matches_official_flax_logits_and_pre_logits(official_fixture):
    config, arrays = official_fixture
    model = fixture_model(config, num_classes=config["num_classes"])
    load_official(model, fixture_params(arrays))
    logits = to_numpy(model(arrays["inputs"]))
    assert np.abs(logits - arrays["logits"]).max() <= 1e-6

    features = fixture_model(config, num_classes=None)
    load_official(features, fixture_params(arrays))
    pre_logits = to_numpy(features(arrays["inputs"]))
    assert np.abs(pre_logits - arrays["pre_logits"]).max() <= 1e-6


def test_exact_gelu_is_distinguishable_from_official(official_fixture):
    config, arrays = official_fixture
    model = fixture_model(config, num_classes=config["num_classes"], gelu_approximate=False)
    load_official(model, fixture_params(arrays))
    logits = to_numpy(model(arrays["inputs"]))
    assert np.abs(logits - arrays["logits"]).max() > 1e-5


def test_preprocessing_maps_pixels_to_official_range(official_fixture):
    config, arrays = official_fixture
    raw = fixture_model(config, num_classes=config["num_classes"])
    config_kwargs = {k: v for k, v in raw.get_config().items() if k != "name"}
    config_kwargs["include_preprocessing"] = True
    pixels_model = MLPMixer(**config_kwargs)
    load_official(raw, fixture_params(arrays))
    load_official(pixels_model, fixture_params(arrays))
    pixels = (arrays["inputs"].clip(-1, 1) + 1.0) * 127.5
    np.testing.assert_allclose(
        to_numpy(pixels_model(pixels)),
        to_numpy(raw((pixels / 127.5 - 1.0).astype("float32"))),
        atol=1e-6,
    )


# --- Variants and parameter counts -------------------------------------------

HEADLESS_COUNTS = {
    "S/32": 18_591_624, "S/16": 18_015_264, "B/32": 59_524_428, "B/16": 59_111_472,
    "L/32": 205_914_264, "L/16": 207_171_168, "H/14": 431_069_952,
}
HEAD_COUNTS = {"B/16": 59_880_472, "B/32": 60_293_428, "L/16": 208_196_168}


@pytest.mark.parametrize("name", ["S/32", "S/16", "B/32", "B/16"])
def test_parameter_counts_headless(name):
    model = MLPMixer.from_variant(name, num_classes=None)
    assert model.count_params() == HEADLESS_COUNTS[name]


@pytest.mark.parametrize("name", ["B/32", "B/16"])
def test_parameter_counts_with_head(name):
    assert MLPMixer.from_variant(name).count_params() == HEAD_COUNTS[name]


@pytest.mark.slow
@once("a count of variable shapes, built by the same code on every backend (the small "
      "variants' counts run on each); initialising 0.2 to 0.4 billion weights three times "
      "cost CI two minutes")
@pytest.mark.parametrize("name, classes", [("L/32", None), ("L/16", None), ("L/16", 1000), ("H/14", None)])
def test_parameter_counts_large(name, classes):
    model = MLPMixer.from_variant(name, num_classes=classes)
    expected = HEADLESS_COUNTS[name] if classes is None else HEAD_COUNTS[name]
    assert model.count_params() == expected


def test_variant_table_has_the_papers_seven():
    assert VARIANTS == ("S/32", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14")
    model = MLPMixer.from_variant("S/32", image_shape=(64, 64, 3), num_classes=3, stochastic_depth_rate=0.1)
    assert (model.num_blocks, model.hidden_dim, model.tokens_mlp_dim, model.channels_mlp_dim) == (8, 512, 256, 2048)
    assert model.patch_size == (32, 32) and model.num_tokens == 4
    assert model.output_shape == (None, 3)


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError) as info:
        MLPMixer.from_variant("B/8")
    message = str(info.value)
    assert "'B/8'" in message
    for name in VARIANTS:
        assert name in message


@pytest.mark.parametrize("build, owner", [
    (lambda: tiny(droput_rate=0.5), "MLPMixer"),
    (lambda: MLPMixer.from_variant("S/32", droput_rate=0.5), "MLPMixer.from_variant"),
    # Checked before the checkpoint is looked for: no download, no cache.
    (lambda: MLPMixer.from_checkpoint("imagenet21k/Mixer-B_16", droput_rate=0.5), "MLPMixer.from_checkpoint"),
    (lambda: MLPMixer.from_timm("hf://timm/mixer_b16_224.goog_in21k", droput_rate=0.5), "MLPMixer.from_timm"),
])
def test_a_misspelt_argument_is_a_type_error_that_names_the_right_one(build, owner):
    # Keras' functional model ignores keys it does not know: this built a
    # model without dropout before.
    with pytest.raises(TypeError, match=rf"^{owner} got an unexpected keyword argument `droput_rate`\. "
                       r"Did you mean `dropout_rate`\?"):
        build()


def test_predict_on_an_array_gives_keras_own_outputs_callbacks_and_progress(capsys):
    # On TensorFlow and PyTorch MLPMixer.predict feeds the batches itself
    # (faster there); the numbers, callbacks and progress bar are Keras'.
    model = tiny()
    rng = np.random.default_rng(0)
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.2, variable.shape).astype("float32"))
    images = rng.uniform(0, 255, (70,) + model.image_shape).astype("float32")
    expected = keras.Model.predict(model, images, batch_size=32, verbose=0)

    class Seen(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.batches = []

        def on_predict_batch_end(self, batch, logs=None):
            self.batches.append((batch, logs["outputs"].shape[0]))

    seen = Seen()
    outputs = model.predict(images, callbacks=[seen], verbose=1)
    np.testing.assert_array_equal(outputs, to_numpy(expected))
    assert isinstance(outputs, np.ndarray) and seen.batches == [(0, 32), (1, 32), (2, 6)]
    assert "3/3" in capsys.readouterr().out
    # A dataset, and `steps`, take Keras' own path, with the same numbers.
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices(images).batch(32)
    np.testing.assert_allclose(model.predict(dataset, verbose=0), outputs, atol=1e-6)
    np.testing.assert_allclose(model.predict(images, steps=2, batch_size=32, verbose=0), outputs[:64], atol=1e-6)

    class Stop(keras.callbacks.Callback):
        def on_predict_batch_end(self, batch, logs=None):
            self.model.stop_predicting = True

    assert model.predict(images, callbacks=[Stop()], verbose=0).shape[0] == 32


def test_evaluate_on_arrays_gives_keras_own_results_callbacks_and_progress(capsys):
    # On TensorFlow and PyTorch MLPMixer.evaluate feeds the batches itself,
    # as predict does; the metrics, callbacks and progress bar are Keras'.
    model = tiny(num_classes=3)
    rng = np.random.default_rng(0)
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.2, variable.shape).astype("float32"))
    model.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy", keras.metrics.TopKCategoricalAccuracy(2, name="top2")])
    images = rng.uniform(0, 255, (70,) + model.image_shape).astype("float32")
    labels = np.eye(3, dtype="float32")[rng.integers(0, 3, 70)]
    weights = rng.uniform(0.5, 2, 70).astype("float32")
    for kwargs in ({}, {"sample_weight": weights}):
        expected = keras.Model.evaluate(model, images, labels, batch_size=32, verbose=0, return_dict=True, **kwargs)
        got = model.evaluate(images, labels, batch_size=32, verbose=0, return_dict=True, **kwargs)
        assert got.keys() == expected.keys() == {"loss", "accuracy", "top2"}
        for name in got:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, err_msg=name)
    as_list = model.evaluate(images, labels, verbose=1)
    assert "3/3" in capsys.readouterr().out
    assert as_list == keras.Model.evaluate(model, images, labels, verbose=0)

    class Stop(keras.callbacks.Callback):
        def on_test_batch_end(self, batch, logs=None):
            self.seen = batch
            self.model.stop_evaluating = True

    stop = Stop()
    first = model.evaluate(images, labels, callbacks=[stop], verbose=0, return_dict=True)
    assert stop.seen == 0
    np.testing.assert_allclose(first["loss"], model.evaluate(images[:32], labels[:32], verbose=0)[0], rtol=1e-6)


def test_a_file_saved_before_pixel_mean_and_remat_existed_still_loads(tmp_path):
    # The oldest config the model has saved lacked pixel_mean, pixel_std
    # and remat: a file of that version, made by removing them from a file
    # of this one, loads with their defaults and the same outputs.
    import json
    import zipfile

    model = tiny(num_classes=3)
    model.save(tmp_path / "new.keras")
    with zipfile.ZipFile(tmp_path / "new.keras") as old, zipfile.ZipFile(tmp_path / "old.keras", "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                for key in ("pixel_mean", "pixel_std", "remat"):
                    del config["config"][key]
                data = json.dumps(config).encode()
            new.writestr(item, data)
    reloaded = keras.saving.load_model(tmp_path / "old.keras")
    assert (reloaded.pixel_mean, reloaded.remat) == (None, False)
    images = np.random.default_rng(0).uniform(0, 255, (2,) + model.image_shape).astype("float32")
    np.testing.assert_array_equal(to_numpy(reloaded(images)), to_numpy(model(images)))


# --- Architecture details ----------------------------------------------------


def test_official_initialisation():
    model = tiny()
    head = model.get_layer("head")
    assert not np.any(to_numpy(head.kernel)) and not np.any(to_numpy(head.bias))
    for layer in (model.get_layer("stem"), model.get_layer("block_0").channel_mixing.dense_0):
        kernel = to_numpy(layer.kernel)
        fan_in = int(np.prod(kernel.shape[:-1]))
        assert not np.any(to_numpy(layer.bias))
        # LeCun normal: std sqrt(1 / fan_in), truncated at 2 std.
        assert abs(kernel.std() - np.sqrt(1 / fan_in)) < 0.25 * np.sqrt(1 / fan_in)
        assert np.abs(kernel).max() <= 2 * np.sqrt(1 / fan_in) / 0.87962566 + 1e-6


def test_stable_sublayer_names():
    names = [layer.name for layer in tiny().layers]
    assert names == [
        "images", "rescaling", "stem", "tokens", "block_0", "block_1",
        "pre_head_layer_norm", "pre_logits", "head",
    ]
    block = tiny().get_layer("block_0")
    assert [block.token_norm.name, block.token_mixing.name, block.channel_norm.name, block.channel_mixing.name] == [
        "LayerNorm_0", "token_mixing", "LayerNorm_1", "channel_mixing",
    ]


def test_stochastic_depth_grows_linearly_with_depth():
    model = tiny(num_blocks=5, stochastic_depth_rate=0.2)
    rates = [model.get_layer(f"block_{i}").stochastic_depth_rate for i in range(5)]
    np.testing.assert_allclose(rates, [0.0, 0.05, 0.1, 0.15, 0.2])


def test_non_square_images_and_patches():
    model = tiny(image_shape=(12, 32, 3), patch_size=(3, 8), num_classes=None)
    assert model.num_tokens == 16
    assert tuple(model(np.zeros((2, 12, 32, 3), "float32")).shape) == (2, 16)


def test_model_round_trips_fits_and_saves(tmp_path):
    x = np.random.RandomState(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    y = np.arange(8) % 5
    model = tiny(stochastic_depth_rate=0.1, dropout_rate=0.1, seed=1, gelu_approximate=False)
    reloaded = check_model(model, x, y, tmp_path)
    assert isinstance(reloaded.get_layer("block_1"), MixerBlock)


def test_a_plain_compile_takes_xla_where_it_was_faster_and_reloads_compiled(tmp_path):
    """`model.compile(optimizer, loss)` as a notebook writes it: XLA on JAX and
    TensorFlow (Keras' "auto" would leave TensorFlow on CPU without it),
    eager PyTorch; an explicit `jit_compile` or `run_eagerly` wins; a saved
    model reloads compiled, with its optimizer state, and without Keras'
    "compile() was not called" warning."""
    import warnings

    x = np.random.RandomState(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    y = np.arange(8) % 5
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = keras.backend.backend() != "torch"
    model = tiny()
    model.compile(optimizer="adam", loss=loss)
    assert model.jit_compile is expected
    model.compile(optimizer="adam", loss=loss, jit_compile=False)
    assert model.jit_compile is False
    model.compile(optimizer="adam", loss=loss, run_eagerly=True)
    assert model.jit_compile is False
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=loss)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        reloaded = keras.saving.load_model(tmp_path / "model.keras")
    assert reloaded.compiled and reloaded.jit_compile is expected
    assert isinstance(reloaded.optimizer, keras.optimizers.SGD)
    assert int(to_numpy(reloaded.optimizer.iterations)) == 2
    np.testing.assert_allclose(to_numpy(reloaded.predict(x, verbose=0)),
                               to_numpy(model.predict(x, verbose=0)), atol=1e-6)


def _train_weights(model, x, y, steps=2):
    from keras_mixer import distribute

    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=distribute.jit_compile_setting(),
    )
    losses = [float(model.train_on_batch(x, y)) for _ in range(steps)]
    return losses, [np.array(w) for w in model.get_weights()]


def test_remat_trains_exactly_like_the_plain_model(tmp_path):
    # Same seeds, so the same stochastic-depth masks: a rematerialised block
    # that drew its masks again in the backward pass would give other
    # gradients. Compiled as train.py compiles (XLA on TensorFlow).
    x = np.random.RandomState(0).uniform(0, 255, (8, 16, 16, 3)).astype("float32")
    y = np.arange(8) % 5
    results = []
    for remat in (False, True):
        keras.utils.set_random_seed(3)
        model = tiny(num_blocks=3, stochastic_depth_rate=0.5, seed=7, remat=remat)
        results.append(_train_weights(model, x, y))
    (plain_losses, plain_weights), (remat_losses, remat_weights) = results
    np.testing.assert_allclose(remat_losses, plain_losses, rtol=1e-5)
    assert plain_losses[1] != plain_losses[0]
    for a, b in zip(plain_weights, remat_weights):
        np.testing.assert_allclose(b, a, atol=1e-5)
    reloaded = check_model(tiny(remat=True, stochastic_depth_rate=0.1, seed=1), x, y, tmp_path)
    assert all(reloaded.get_layer(f"block_{i}").remat for i in range(2))


def test_remat_with_dropout_is_refused():
    with pytest.raises(ValueError, match=r"`remat=True` cannot be combined with `dropout_rate`.*dropout_rate=0"):
        tiny(remat=True, dropout_rate=0.1)


# --- Bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_shape": (30, 32, 3)},
         r"Image height 30 is not divisible by the patch height 4.*multiple of 4 \(e\.g\. 28 or 32\)"),
        ({"image_shape": (32, 30, 3)}, r"Image width 30 is not divisible by the patch width 4"),
        ({"image_shape": (32, 32)}, r"`image_shape` must be \(height, width, channels\)"),
        ({"image_shape": (0, 32, 3)}, r"`image_shape` must be a positive integer"),
        ({"patch_size": 0}, r"`patch_size` must be a positive integer"),
        ({"patch_size": (4, 4, 4)}, r"`patch_size` must be an int or a pair"),
        ({"num_blocks": 0}, r"`num_blocks` must be a positive integer"),
        ({"hidden_dim": -3}, r"`hidden_dim` must be a positive integer"),
        ({"num_classes": 0}, r"`num_classes` must be a positive integer"),
        ({"dropout_rate": 1.0}, r"`dropout_rate` must be in \[0, 1\)"),
        ({"stochastic_depth_rate": -0.5}, r"`stochastic_depth_rate` must be in \[0, 1\)"),
    ],
)
def test_bad_arguments_name_problem_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((16, 16, 3), r"expects a batch of images of shape \(batch, 16, 16, 3\).*rank 3.*Add a batch dimension"),
        ((2, 16, 16, 1), r"expects images with 3 channels.*got 1 channels.*image_shape=\(16, 16, 1\)"),
        ((2, 32, 32, 3), r"built for 16x16 images.*got 32x32.*Resize or crop"),
    ],
)
def test_wrong_input_shapes_name_problem_and_fix(shape, message):
    model = tiny()
    with pytest.raises(ValueError, match=message):
        model(np.zeros(shape, "float32"))
    with pytest.raises(ValueError, match=message):
        model.predict(np.zeros(shape, "float32"), verbose=0)


@pytest.mark.parametrize("dtype, head", [("bfloat16", "bfloat16"), ("mixed_bfloat16", "float32")])
def test_a_model_reloads_with_the_policy_it_was_built_with(dtype, head, tmp_path):
    """The model's own policy is its layers' (Keras' functional constructor
    drops a `dtype` argument), so a bfloat16 model does not reload as float32."""
    model = MLPMixer(image_shape=(8, 8, 3), patch_size=4, num_blocks=1, hidden_dim=8, tokens_mlp_dim=4,
                     channels_mlp_dim=8, num_classes=3, dtype=dtype)
    assert model.dtype_policy.name == dtype
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert reloaded.dtype_policy.name == reloaded.get_layer("block_0").dtype_policy.name == dtype
    assert reloaded.get_layer("head").dtype_policy.name == head
