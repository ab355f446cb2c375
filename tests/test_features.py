"""feature_extractor: per-block features keyed by the model's sublayer names, as tokens or grids."""

import keras
import numpy as np
import pytest

from keras_mixer import adapt_resolution
from keras_mixer import feature_extractor
from keras_mixer import load_official
from keras_mixer.features import feature_names
from base import fixture_model
from base import fixture_params
from base import to_numpy


@pytest.fixture
def official(official_fixture):
    config, arrays = official_fixture
    model = fixture_model(config, num_classes=config["num_classes"])
    load_official(model, fixture_params(arrays))
    return model, arrays


def test_default_outputs_match_a_hand_computation_and_the_fixture(official):
    model, arrays = official
    images = arrays["inputs"]
    got = {k: to_numpy(v) for k, v in feature_extractor(model)(images).items()}
    # (Keras may return the dict in sorted key order.)
    assert sorted(got) == ["block_0", "block_1", "block_2", "pre_logits", "stem"]
    # The same layers called one by one.
    x = model.get_layer("tokens")(model.get_layer("stem")(images))
    np.testing.assert_allclose(got["stem"], to_numpy(x), atol=1e-6)
    for i in range(model.num_blocks):
        x = model.get_layer(f"block_{i}")(x)
        np.testing.assert_allclose(got[f"block_{i}"], to_numpy(x), atol=1e-5)
    assert got["stem"].shape == got["block_2"].shape == (len(images), 64, 48)
    # The official Flax model's pre-logits.
    np.testing.assert_allclose(got["pre_logits"], arrays["pre_logits"], atol=1e-6)


def test_grid_outputs_are_the_tokens_in_raster_order(official):
    model, arrays = official
    names = ["stem", "block_1", "pre_head_layer_norm", "pre_logits"]
    tokens = {k: to_numpy(v) for k, v in feature_extractor(model, names)(arrays["inputs"]).items()}
    grids = {k: to_numpy(v) for k, v in feature_extractor(model, names, grid=True)(arrays["inputs"]).items()}
    assert grids["block_1"].shape == (len(arrays["inputs"]), 8, 8, 48)
    for name in ("stem", "block_1", "pre_head_layer_norm"):
        for row, col in ((0, 0), (0, 7), (3, 5), (7, 0)):
            np.testing.assert_array_equal(grids[name][:, row, col], tokens[name][:, row * 8 + col], err_msg=name)
    np.testing.assert_array_equal(grids["stem"], to_numpy(model.get_layer("stem")(arrays["inputs"])))
    np.testing.assert_array_equal(grids["pre_logits"], tokens["pre_logits"])
    np.testing.assert_allclose(tokens["pre_head_layer_norm"].mean(1), tokens["pre_logits"], atol=1e-6)


def test_the_extractor_shares_the_weights_and_saves(official, tmp_path):
    model, arrays = official
    extractor = feature_extractor(model, ["block_0", "pre_logits"], grid=True)
    assert extractor.get_layer("block_0") is model.get_layer("block_0")
    assert len(extractor.weights) < len(model.weights)  # the blocks after block_0 and the head are left out
    extractor.save(tmp_path / "features.keras")
    reloaded = keras.saving.load_model(tmp_path / "features.keras")
    for name, value in extractor(arrays["inputs"]).items():
        np.testing.assert_array_equal(to_numpy(reloaded(arrays["inputs"])[name]), to_numpy(value))
    # Changing the model's weights changes the extractor's outputs.
    before = to_numpy(extractor(arrays["inputs"])["pre_logits"])
    stem = model.get_layer("stem")
    stem.bias.assign(np.random.default_rng(0).normal(size=stem.bias.shape))
    assert np.abs(to_numpy(extractor(arrays["inputs"])["pre_logits"]) - before).max() > 1e-3


def test_at_an_appendix_c_resolution(official):
    model, arrays = official
    big = adapt_resolution(model, (64, 64, 3))
    images = np.repeat(np.repeat(arrays["inputs"], 2, axis=1), 2, axis=2)
    got = {k: to_numpy(v) for k, v in feature_extractor(big, grid=True)(images).items()}
    assert got["stem"].shape == got["block_2"].shape == (len(images), 16, 16, 48)
    # The big model's logits are its head applied to these pre-logits.
    head = big.get_layer("head")
    logits = got["pre_logits"] @ to_numpy(head.kernel) + to_numpy(head.bias)
    np.testing.assert_allclose(logits, to_numpy(big(images)), atol=1e-5)


def test_unknown_names_list_the_valid_ones(official):
    model, _ = official
    assert feature_names(model) == ["stem", "block_0", "block_1", "block_2", "pre_head_layer_norm", "pre_logits"]
    with pytest.raises(ValueError, match=r"Unknown feature name\(s\) \['block_3', 'head'\] for this model. "
                                         r"Valid: stem, block_0, block_1, block_2, pre_head_layer_norm, pre_logits"):
        feature_extractor(model, ["block_0", "block_3", "head"])
    with pytest.raises(ValueError, match=r"Unknown feature name\(s\) \[\]"):
        feature_extractor(model, [])
