"""The shared checks every layer and model test runs (KerasHub's TestCase idea, small)."""

import numpy as np
import keras


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
