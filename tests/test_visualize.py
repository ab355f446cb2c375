"""Visualisations: pairing and ordering on synthetic units with known answers; PNG files."""

import struct

import numpy as np
import pytest

from keras_mixer import MLPMixer, visualize


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def sinusoid(frequency, grid=8, phase=0.3):
    y, x = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.cos(2 * np.pi * frequency * x / grid + phase) + 0.5 * np.cos(2 * np.pi * frequency * y / grid)


def test_units_pair_with_their_inverses_low_frequency_first():
    frequencies = [3, 1, 2]
    units = [sinusoid(f) for f in frequencies] + [-sinusoid(f) for f in frequencies]
    order = np.random.default_rng(0).permutation(len(units))
    shuffled = np.stack([units[k] for k in order])
    pairs = visualize.pair_inverse_units(shuffled)
    assert len(pairs) == 3
    found = []
    for i, j, correlation, frequency in pairs:
        a, b = order[i], order[j]
        assert abs(a - b) == 3  # a unit and its own negative
        assert correlation == pytest.approx(-1.0)
        found.append(frequencies[min(a, b)])
    assert found == [1, 2, 3]
    assert [p[3] for p in pairs] == sorted(p[3] for p in pairs)


def test_spatial_frequency_of_pure_waves():
    y, x = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    for f in (1, 2, 5):
        assert visualize.spatial_frequency(np.cos(2 * np.pi * f * x / 16)) == pytest.approx(f)
    assert visualize.spatial_frequency(np.ones((16, 16))) == 0.0


@pytest.fixture
def model():
    return MLPMixer(image_shape=(16, 16, 3), patch_size=4, num_blocks=2, hidden_dim=16,
                    tokens_mlp_dim=8, channels_mlp_dim=32, num_classes=10)


def test_token_mixing_units_follow_the_patch_grid(model):
    units = visualize.token_mixing_units(model, block=1)
    assert units.shape == (8, 4, 4)
    kernel = np.asarray(model.get_layer("block_1").token_mixing.dense_0.kernel)
    np.testing.assert_allclose(units[3].reshape(-1), kernel[:, 3])  # raster order


def test_every_plot_writes_a_png_of_its_size(model, tmp_path):
    assert png_size(visualize.plot_token_mixing(model, tmp_path / "tm.png", width=640, height=480)) == (640, 480)
    assert png_size(visualize.plot_stem(model, tmp_path / "stem.png", width=400, height=400)) == (400, 400)
    filters = visualize.stem_filters(model)
    assert filters.shape == (16, 4, 4, 3) and filters.min() >= 0 and filters.max() <= 1
    log = tmp_path / "log.csv"
    log.write_text("epoch,accuracy,loss,val_accuracy,val_loss\n0,0.5,1.2,0.6,1.0\n1,0.7,0.8,0.75,0.7\n")
    assert png_size(visualize.plot_curves(log, tmp_path / "curves.png")) == (1000, 400)
    matrix = np.array([[5, 1], [0, 6]])
    assert png_size(visualize.plot_confusion(matrix, tmp_path / "cm.png", ["a", "b"])) == (600, 600)
    empty = tmp_path / "empty.csv"
    empty.write_text("epoch,loss\n")
    with pytest.raises(ValueError, match="holds no epochs yet"):
        visualize.plot_curves(empty, tmp_path / "x.png")
