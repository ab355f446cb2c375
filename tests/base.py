"""The shared checks every layer and model test runs (KerasHub's TestCase idea, small)."""

import numpy as np
import keras

from keras_mixer import config as config_lib
from keras_mixer.model import MLPMixer


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def check_layer(layer_cls, init_kwargs, input_shape, training=False):
    """Config round trip, eager vs symbolic shape, same output after round trip."""
    layer = layer_cls(**init_kwargs)
    x = np.random.RandomState(0).normal(size=input_shape).astype("float32")
    eager = layer(x, training=training)
    symbolic = layer(keras.Input(batch_shape=input_shape))
    assert tuple(eager.shape) == tuple(symbolic.shape) == tuple(
        layer.compute_output_shape(input_shape)
    )

    config = layer.get_config()
    for key, value in init_kwargs.items():
        assert config[key] == value, key
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config
    clone(x)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        to_numpy(clone(x, training=training)), to_numpy(eager), atol=1e-6
    )
    return layer


def check_model(model, x, y, tmp_path):
    """Config round trip, shapes, a decreasing fit, and a `.keras` round trip."""
    eager = model(x)
    symbolic = model(keras.Input(batch_shape=x.shape))
    assert tuple(eager.shape) == tuple(symbolic.shape)

    config = model.get_config()
    clone = type(model).from_config(config)
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(eager), atol=1e-6)

    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=len(x), epochs=3, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0], losses

    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert type(reloaded) is type(model)
    assert reloaded.get_config() == model.get_config()
    np.testing.assert_array_equal(
        to_numpy(reloaded.predict(x, verbose=0)), to_numpy(model.predict(x, verbose=0))
    )
    return reloaded


def tiny_config(**overrides):
    """The digits config with a one-block Mixer for 2 epochs of batch 128 (22 steps)."""
    config = config_lib.load("digits")
    config.update(epochs=2, batch_size=128)
    config["model"].update(num_blocks=1, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=16)
    config.update(overrides)
    return config


def fixture_model(config, **kwargs):
    """The model of a fixture's config (official: patch [4, 4]; timm: patch 4)."""
    return MLPMixer(
        image_shape=(*config["image"], 3),
        patch_size=config["patch"],
        num_blocks=config["num_blocks"],
        hidden_dim=config["hidden_dim"],
        tokens_mlp_dim=config["tokens_mlp_dim"],
        channels_mlp_dim=config["channels_mlp_dim"],
        include_preprocessing=False,
        **kwargs,
    )


def fixture_params(arrays):
    """The `params/...` arrays of a reference fixture."""
    return {k: v for k, v in arrays.items() if k.startswith("params/")}


def keras_logits(model_path, images):
    """The logits of a saved `.keras` model."""
    model = keras.saving.load_model(model_path, compile=False)
    return keras.ops.convert_to_numpy(model.predict(images, verbose=0))


def assert_errors(load, directory, cases, never=()):
    """For each `{file name: (error type, message pattern)}` of `cases`,
    `load(directory / name)` raises that error with that message, which
    holds none of the strings `never` (hints that would undo a safety check,
    or a wrong diagnosis)."""
    import pytest

    for name, (error, pattern) in cases.items():
        with pytest.raises(error, match=pattern) as info:
            load(directory / name)
        assert not [text for text in never if text in str(info.value)], (name, str(info.value))


def compiled_tiny_model():
    """An 8x8 one-block Mixer compiled with Adam: the smallest model with an
    optimizer state, for checkpoint tests."""
    model = MLPMixer(image_shape=(8, 8, 1), num_classes=3, patch_size=4, num_blocks=1,
                     hidden_dim=4, tokens_mlp_dim=2, channels_mlp_dim=4)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    return model
