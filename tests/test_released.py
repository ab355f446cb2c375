"""Released checkpoints: download once from a mirror, cache hits, bad downloads, default cache."""

import http.server
import threading
import time

import numpy as np
import pytest

from keras_mixer import MLPMixer
from keras_mixer import npz
from keras_mixer import released
from keras_mixer import weights
from base import to_numpy

NAME = "imagenet21k/Mixer-B_16"


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
                released.fetch(name, cache_dir=cache, mirror=server.url)
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
        released.fetch(NAME, cache_dir=cache)
    assert time.perf_counter() - start < 10
    assert f"{url}/{NAME}.npz" in str(error.value)
    assert str(cache / f"{NAME}.npz") in str(error.value)
    with pytest.raises(ValueError, match=r"Unknown checkpoint name 'Mixer-B_16'. Released: imagenet1k/Mixer-B_16"):
        released.fetch("Mixer-B_16", cache_dir=cache)


def test_a_damaged_cache_file_is_downloaded_again(official_npz, tmp_path, caplog):
    path, _, _, _ = official_npz
    cached = tmp_path / "cache" / f"{NAME}.npz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"broken")
    mirror = tmp_path / "mirror" / "imagenet21k"
    mirror.mkdir(parents=True)
    (mirror / "Mixer-B_16.npz").write_bytes(path.read_bytes())
    got = released.fetch(NAME, cache_dir=tmp_path / "cache", mirror=str(tmp_path / "mirror"))
    assert got == cached and "is damaged" in caplog.text
    assert set(npz.read(got)) == set(npz.read(path))


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
    assert f"{released.OFFICIAL_URL}/{NAME}.npz" in result.stderr
    assert str(home / ".keras" / "mixer_models" / f"{NAME}.npz") in result.stderr
    assert time.perf_counter() - start < 60
    assert not list(home.rglob("*.npz"))


def test_default_cache_is_keras_home(official_npz, tmp_path, monkeypatch):
    path, _, _, arrays = official_npz
    for variable in ("KERAS_HOME", "KERAS_MIXER_CACHE", "KERAS_MIXER_MIRROR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert released.default_cache_dir() == tmp_path / "home" / ".keras" / "mixer_models"
    server = Server({f"/{NAME}.npz": path.read_bytes()})
    try:
        model = MLPMixer.from_checkpoint(NAME, mirror=server.url, include_preprocessing=False)
    finally:
        server.close()
    assert (tmp_path / "home" / ".keras" / "mixer_models" / f"{NAME}.npz").is_file()
    assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6
    # Keras' own variable moves the cache with Keras' home; ours overrides both.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    assert released.default_cache_dir() == tmp_path / "keras_home" / "mixer_models"
    monkeypatch.setenv("KERAS_MIXER_CACHE", str(tmp_path / "ours"))
    assert released.default_cache_dir() == tmp_path / "ours"
