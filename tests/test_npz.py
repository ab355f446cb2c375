"""The one on-disk array format: atomic writes, verified reads, clear errors."""

import os

import numpy as np
import pytest

from keras_mixer import npz


def test_write_then_read_round_trips_and_leaves_no_temporary_file(tmp_path):
    arrays = {"a/b": np.arange(6, dtype="float32").reshape(2, 3), "header": np.array('{"step": 3}')}
    path = npz.write(tmp_path / "deep" / "x.npz", arrays)
    assert path == tmp_path / "deep" / "x.npz"
    got = npz.read(path)
    assert set(got) == set(arrays)
    np.testing.assert_array_equal(got["a/b"], arrays["a/b"])
    assert str(got["header"]) == '{"step": 3}'
    assert os.listdir(path.parent) == ["x.npz"]


def test_a_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = npz.write(tmp_path / "x.npz", {"v": np.zeros(3)})

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk gone"):
        npz.write(path, {"v": np.ones(3)})
    np.testing.assert_array_equal(npz.read(path)["v"], np.zeros(3))


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        npz.read(tmp_path / "missing.npz")
    good = npz.write(tmp_path / "good.npz", {"v": np.arange(1000.0)})
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, obj=np.array([{"a": 1}], dtype=object))
    for bad in (cut, single, pickled):
        with pytest.raises(ValueError, match="is not a readable .npz file .*truncated or corrupted"):
            npz.read(bad)
