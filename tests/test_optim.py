"""Optimizers, schedules and losses: what `model.compile` gets from a recipe."""

import keras
import numpy as np
import pytest

from keras_mixer import optim
from keras_mixer.model import MLPMixer
from base import to_numpy


def test_weight_decay_applies_to_kernels_only():
    model = MLPMixer(image_shape=(8, 8, 1), num_classes=3, patch_size=4, num_blocks=1,
                     hidden_dim=4, tokens_mlp_dim=2, channels_mlp_dim=4)
    for optimizer in ("adamw", "sgd"):
        opt = optim.make_optimizer(1.0, total_steps=10, warmup_steps=0, weight_decay=0.5,
                                      grad_clip_norm=1.0, optimizer=optimizer)
        for w in model.weights:
            w.assign(np.ones(w.shape, "float32"))
        opt.apply_gradients([(keras.ops.zeros(w.shape), w) for w in model.trainable_weights])
        for w in model.trainable_weights:
            name = w.path.split("/")[-1]
            changed = not np.all(to_numpy(w) == 1.0)
            assert changed == (name == "kernel"), (optimizer, w.path)  # head/bias too


def test_linear_schedule_values_and_serialization():
    schedule = optim.WarmupLinearDecay(1e-3, warmup_steps=100, total_steps=1100)
    values = [float(to_numpy(schedule(s))) for s in (0, 50, 100, 600, 1100, 1200)]
    np.testing.assert_allclose(values, [0, 5e-4, 1e-3, 5e-4, 0, 0], atol=1e-9)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert float(to_numpy(again(600))) == pytest.approx(5e-4)
    cosine = optim.make_schedule("cosine", 0.03, total_steps=1000, warmup_steps=100)
    np.testing.assert_allclose(
        [float(to_numpy(cosine(s))) for s in (0, 100, 550, 1000)], [0, 0.03, 0.015, 0], atol=1e-7
    )
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        optim.WarmupLinearDecay(1e-3, warmup_steps=10, total_steps=10)
