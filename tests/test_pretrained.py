"""Official checkpoints by file and name, head surgery, writing files back,
and the paper's Appendix C resolution adaptation."""

import http.server
import threading
import time

import numpy as np
import pytest

from keras_mixer import MLPMixer
from keras_mixer import weights
from base import to_numpy
from test_model import fixture_params

NAME = "imagenet21k/Mixer-B_16"


@pytest.fixture
def official_npz(official_fixture, tmp_path):
    """The fixture's parameters as a released-style file (no `params/` prefix)."""
    config, arrays = official_fixture
    params = {k[len("params/"):]: v for k, v in fixture_params(arrays).items()}
    path = tmp_path / "Mixer-tiny.npz"
    np.savez(path, **params)
    return path, params, config, arrays


def test_from_checkpoint_infers_the_fixture_config_and_matches_its_logits(official_npz):
    path, params, config, arrays = official_npz
    model = MLPMixer.from_checkpoint(path, include_preprocessing=False)
    inferred = weights.official_config(params)
    assert inferred == dict(
        image_shape=(*config["image"], 3), patch_size=tuple(config["patch"]),
        num_blocks=config["num_blocks"], hidden_dim=config["hidden_dim"],
        tokens_mlp_dim=config["tokens_mlp_dim"], channels_mlp_dim=config["channels_mlp_dim"],
        num_classes=config["num_classes"],
    )
    assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6


def test_save_official_round_trip_is_bit_exact(official_npz, tmp_path):
    path, params, _, arrays = official_npz
    model = MLPMixer.from_checkpoint(path, include_preprocessing=False)
    out = weights.save_official(model, tmp_path / "out" / "saved.npz")
    saved = weights.read_npz(out)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in params.items()}
    for key in params:
        np.testing.assert_array_equal(saved[key], params[key])
    again = MLPMixer.from_checkpoint(out, include_preprocessing=False)
    for a, b in zip(model.weights, again.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_head_surgery(official_npz, caplog):
    path, _, config, arrays = official_npz
    base = MLPMixer.from_checkpoint(path, include_preprocessing=False)
    same = weights.reset_head(base, config["num_classes"])
    np.testing.assert_array_equal(to_numpy(same(arrays["inputs"])), to_numpy(base(arrays["inputs"])))
    new = weights.reset_head(base, 7)
    assert "fresh zero head of 7 classes" in caplog.text
    np.testing.assert_array_equal(to_numpy(new(arrays["inputs"])), 0.0)  # zero head
    headless = weights.reset_head(base, None)
    features = to_numpy(headless(arrays["inputs"]))
    assert np.abs(features - arrays["pre_logits"]).max() <= 1e-6  # backbone unchanged
    assert [l.name for l in headless.layers] == [l.name for l in base.layers][:-1]
    # The original keeps working and shares no arrays with the copies.
    base.get_layer("stem").kernel.assign(np.zeros(base.get_layer("stem").kernel.shape))
    assert np.abs(to_numpy(headless(arrays["inputs"])) - arrays["pre_logits"]).max() <= 1e-6
    from_file = MLPMixer.from_checkpoint(path, num_classes=5, include_preprocessing=False)
    assert from_file.output_shape == (None, 5)


def windows_mean(model, images, factors):
    kh, kw = factors
    h, w = model.image_shape[:2]
    outs = [
        to_numpy(model(images[:, i * h:(i + 1) * h, j * w:(j + 1) * w]))
        for i in range(kh) for j in range(kw)
    ]
    return np.mean(outs, axis=0)


@pytest.mark.parametrize("factors", [(2, 2), (3, 3), (1, 2), (3, 2)])
def test_appendix_c_equals_the_mean_over_windows(factors, official_npz):
    path, _, _, _ = official_npz
    base = MLPMixer.from_checkpoint(path, include_preprocessing=False)
    headless = weights.reset_head(base, None)
    kh, kw = factors
    shape = (32 * kh, 32 * kw, 3)
    images = np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")
    adapted = weights.adapt_resolution(base, shape)
    assert adapted.num_tokens == base.num_tokens * kh * kw
    assert adapted.tokens_mlp_dim == base.tokens_mlp_dim * kh * kw
    logits_error = np.abs(to_numpy(adapted(images)) - windows_mean(base, images, factors)).max()
    adapted_features = weights.reset_head(adapted, None)
    features_error = np.abs(
        to_numpy(adapted_features(images)) - windows_mean(headless, images, factors)).max()
    print(f"Appendix C {factors}: logits {logits_error:.2e}, pre-logits {features_error:.2e}")
    assert logits_error <= 1e-5 and features_error <= 1e-5
    # The same through from_checkpoint.
    direct = MLPMixer.from_checkpoint(path, image_shape=shape, include_preprocessing=False)
    np.testing.assert_allclose(to_numpy(direct(images)), to_numpy(adapted(images)), atol=1e-6)


def test_non_integer_multiples_explain_the_rule(official_npz):
    path, _, _, _ = official_npz
    with pytest.raises(ValueError, match=r"height 48 is not an integer multiple of the pretraining height 32.*nearest valid heights are 32 and 64"):
        MLPMixer.from_checkpoint(path, image_shape=(48, 64, 3))
    base = MLPMixer.from_checkpoint(path)
    with pytest.raises(ValueError, match=r"width 70 is not an integer multiple"):
        weights.adapt_resolution(base, (64, 70, 3))


def test_bad_files_give_clear_errors(official_npz, tmp_path):
    path, params, _, _ = official_npz
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable .npz checkpoint.*truncated or corrupted"):
        MLPMixer.from_checkpoint(truncated)
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz"):
        weights.read_official(text)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a readable .npz"):
        weights.read_official(pickled)
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(ValueError, match="Not an official MLP-Mixer checkpoint: no stem/kernel"):
        MLPMixer.from_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="neither an existing .npz file nor a released"):
        MLPMixer.from_checkpoint(tmp_path / "missing.npz")
    model = MLPMixer.from_checkpoint(path)
    before = [to_numpy(w) for w in model.weights]
    broken = dict(params, **{"head/kernel": np.zeros((3, 3), "float32")})
    broken.pop("stem/bias")
    with pytest.raises(ValueError, match=r"1 missing keys:\n  stem/bias"):
        weights.load_official(model, broken)
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(to_numpy(w), b)  # nothing half-loaded


class Server:
    """Serves `files` ({url path: bytes}) on 127.0.0.1 and counts requests."""

    def __init__(self, files):
        self.files = files
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_once_from_a_mirror_then_cache_hits(official_npz, tmp_path):
    path, _, _, arrays = official_npz
    server = Server({f"/{NAME}.npz": path.read_bytes()})
    try:
        model = MLPMixer.from_checkpoint(NAME, cache_dir=tmp_path / "cache", mirror=server.url,
                                         include_preprocessing=False)
        assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6
        assert (tmp_path / "cache" / f"{NAME}.npz").is_file()
        weights.load_official(model, NAME, cache_dir=tmp_path / "cache", mirror=server.url)
        assert server.requests == [f"/{NAME}.npz"]  # the second call read the cache
    finally:
        server.close()


def test_bad_downloads_are_detected_and_not_cached(official_npz, tmp_path, monkeypatch):
    path, _, _, _ = official_npz
    data = path.read_bytes()
    server = Server({f"/{NAME}.npz": data[: len(data) // 2], "/sam/Mixer-B_32.npz": b"garbage" * 100})
    cache = tmp_path / "cache"
    try:
        for name in (NAME, "sam/Mixer-B_32"):
            with pytest.raises(ValueError, match="did not give a valid checkpoint; nothing was cached"):
                weights.fetch_official(name, cache_dir=cache, mirror=server.url)
        assert not [p for p in cache.rglob("*") if p.is_file()]
    finally:
        server.close()
    # A refused connection fails fast and says where to put the file.
    closed = Server({})
    url = closed.url
    closed.close()
    monkeypatch.setenv("KERAS_MIXER_MIRROR", url)
    start = time.perf_counter()
    with pytest.raises(ConnectionError) as error:
        weights.fetch_official(NAME, cache_dir=cache)
    assert time.perf_counter() - start < 10
    assert f"{url}/{NAME}.npz" in str(error.value)
    assert str(cache / f"{NAME}.npz") in str(error.value)
    with pytest.raises(ValueError, match=r"Unknown checkpoint name 'Mixer-B_16'. Released: imagenet1k/Mixer-B_16"):
        weights.fetch_official("Mixer-B_16", cache_dir=cache)


def test_a_damaged_cache_file_is_downloaded_again(official_npz, tmp_path, caplog):
    path, _, _, _ = official_npz
    cached = tmp_path / "cache" / f"{NAME}.npz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"broken")
    mirror = tmp_path / "mirror" / "imagenet21k"
    mirror.mkdir(parents=True)
    (mirror / "Mixer-B_16.npz").write_bytes(path.read_bytes())
    got = weights.fetch_official(NAME, cache_dir=tmp_path / "cache", mirror=str(tmp_path / "mirror"))
    assert got == cached and "is damaged" in caplog.text
    assert set(weights.read_npz(got)) == set(weights.read_npz(path))


def _user_env(home):
    """A user's environment: HOME at `home`, none of the project's or Keras'
    cache variables, and every HTTPS request sent to a closed local port, so
    that the default URL fails as it does offline (and never downloads)."""
    import os
    import socket

    from conftest import checkout_pythonpath

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KERAS_MIXER_") and k != "KERAS_HOME"
           and k.lower() not in ("no_proxy", "https_proxy", "http_proxy", "all_proxy")}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env.update(HOME=str(home), https_proxy=f"http://127.0.0.1:{port}",
               PYTHONPATH=checkout_pythonpath(os.environ), TF_CPP_MIN_LOG_LEVEL="2")
    return env


def test_default_cache_offline_names_the_url_and_the_file_to_place(tmp_path):
    """`MLPMixer.from_checkpoint(NAME)` as the README writes it, in a fresh
    process: no cache_dir, no KERAS_MIXER_CACHE, no KERAS_HOME."""
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    code = ("from keras_mixer import MLPMixer\n"
            f"MLPMixer.from_checkpoint({NAME!r})\n")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], env=_user_env(home),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ConnectionError" in result.stderr and "AttributeError" not in result.stderr
    assert f"{weights.OFFICIAL_URL}/{NAME}.npz" in result.stderr
    assert str(home / ".keras" / "mixer_models" / f"{NAME}.npz") in result.stderr
    assert time.perf_counter() - start < 60
    assert not list(home.rglob("*.npz"))


def test_default_cache_is_keras_home(official_npz, tmp_path, monkeypatch):
    path, _, _, arrays = official_npz
    for variable in ("KERAS_HOME", "KERAS_MIXER_CACHE", "KERAS_MIXER_MIRROR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert weights.default_cache_dir() == tmp_path / "home" / ".keras" / "mixer_models"
    server = Server({f"/{NAME}.npz": path.read_bytes()})
    try:
        model = MLPMixer.from_checkpoint(NAME, mirror=server.url, include_preprocessing=False)
    finally:
        server.close()
    assert (tmp_path / "home" / ".keras" / "mixer_models" / f"{NAME}.npz").is_file()
    assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6
    # Keras' own variable moves the cache with Keras' home; ours overrides both.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    assert weights.default_cache_dir() == tmp_path / "keras_home" / "mixer_models"
    monkeypatch.setenv("KERAS_MIXER_CACHE", str(tmp_path / "ours"))
    assert weights.default_cache_dir() == tmp_path / "ours"


def _non_square_model():
    # 40x24 images, 8x4 patches: a 5x6 grid of 30 tokens.
    return MLPMixer(image_shape=(40, 24, 3), patch_size=(8, 4), num_blocks=2, hidden_dim=16,
                    tokens_mlp_dim=12, channels_mlp_dim=24, num_classes=4,
                    include_preprocessing=False, seed=3)


def _randomise(model):
    rng = np.random.default_rng(1)
    for variable in model.weights:  # the zero head would hide mistakes
        variable.assign(rng.normal(scale=0.3, size=variable.shape).astype("float32"))


def test_non_square_checkpoint_round_trips_at_its_size(tmp_path):
    model = _non_square_model()
    _randomise(model)
    path = weights.save_official(model, tmp_path / "non_square.npz")
    images = np.random.default_rng(0).normal(size=(2, 40, 24, 3)).astype("float32")
    # Built at its own size, the grid is the image's.
    again = MLPMixer.from_checkpoint(path, image_shape=(40, 24, 3), include_preprocessing=False)
    np.testing.assert_array_equal(to_numpy(again(images)), to_numpy(model(images)))
    named = MLPMixer.from_checkpoint(path, pretrained_image_shape=(40, 24, 3),
                                     include_preprocessing=False)
    assert named.image_shape == (40, 24, 3)
    np.testing.assert_array_equal(to_numpy(named(images)), to_numpy(model(images)))
    # Without either, the error names the argument that fixes it.
    with pytest.raises(ValueError, match=r"30 tokens .*not a square grid.*pretrained_image_shape"):
        MLPMixer.from_checkpoint(path)
    with pytest.raises(ValueError, match=r"image_shape \(80, 48, 3\) gives 120 tokens.*pretrained_image_shape"):
        MLPMixer.from_checkpoint(path, image_shape=(80, 48, 3))
    with pytest.raises(ValueError, match=r"pretrained_image_shape \(40, 40, 3\).*gives 50 tokens; the checkpoint has 30"):
        MLPMixer.from_checkpoint(path, pretrained_image_shape=(40, 40, 3))


def test_non_square_checkpoint_at_twice_its_size_is_the_window_mean(tmp_path):
    model = _non_square_model()
    _randomise(model)
    path = weights.save_official(model, tmp_path / "non_square.npz")
    images = np.random.default_rng(0).normal(size=(2, 80, 48, 3)).astype("float32")
    expected = windows_mean(model, images, (2, 2))
    direct = MLPMixer.from_checkpoint(path, image_shape=(80, 48, 3),
                                      pretrained_image_shape=(40, 24, 3),
                                      include_preprocessing=False)
    assert direct.num_tokens == 4 * model.num_tokens
    assert np.abs(to_numpy(direct(images)) - expected).max() <= 1e-5
    adapted = weights.adapt_resolution(model, (80, 48, 3))
    np.testing.assert_allclose(to_numpy(adapted(images)), to_numpy(direct(images)), atol=1e-6)
    config = weights.official_config(weights.read_npz(path), (80, 48, 3), (40, 24, 3))
    assert config["image_shape"] == (40, 24, 3) and config["patch_size"] == (8, 4)
