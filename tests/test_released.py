"""Released checkpoints: download once, what each name promises, SHA-256
records, mirrors (folders, https, refused plain http), concurrent downloads,
the default cache."""

import http.server
import threading
import time
import urllib.parse

import numpy as np
import pytest

from keras_mixer import MLPMixer
from keras_mixer import npz
from keras_mixer import released
from keras_mixer import weights
from base import to_numpy
from conftest import once

NAME = "imagenet21k/Mixer-B_16"


class Server:
    """Serves `files` ({url path: bytes}) on 127.0.0.1 and counts requests.
    Also answers as an HTTP proxy (a request line with a full URL), and
    sends bodies in `chunks` pieces `delay` seconds apart."""

    def __init__(self, files, chunks=1, delay=0.0):
        self.files = files
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(urllib.parse.urlsplit(self.path).path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = -(-len(body) // chunks)
                for start in range(0, len(body), step):
                    self.wfile.write(body[start:start + step])
                    self.wfile.flush()
                    time.sleep(delay)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _files(cache):
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())


def test_download_once_records_the_sha256_then_cache_hits(tiny_release, tmp_path):
    name, path, arrays = tiny_release
    server = Server({f"/{name}.npz": path.read_bytes()})
    cache = tmp_path / "cache"
    try:
        model = MLPMixer.from_checkpoint(name, cache_dir=cache, mirror=server.url, include_preprocessing=False)
        assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6
        weights.load_official(model, name, cache_dir=cache, mirror=server.url)
        assert server.requests == [f"/{name}.npz"]  # the second call read the cache
    finally:
        server.close()
    # The file and its record, in sha256sum's format; no temporary file left.
    assert _files(cache) == [f"{name}.npz", f"{name}.npz.sha256"]
    record = (cache / f"{name}.npz.sha256").read_text()
    assert record == f"{released.sha256(cache / f'{name}.npz')}  Mixer-tiny.npz\n"


def test_a_bucket_as_the_cache_is_refused_with_what_to_do(tiny_release, tmp_path, monkeypatch):
    name, _, _ = tiny_release
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("KERAS_MIXER_CACHE", "gs://my-bucket/mixer_models")
    with pytest.raises(ValueError, match=r"KERAS_MIXER_CACHE=gs://my-bucket/mixer_models: the checkpoint "
                                         r"cache must be a local folder"):
        released.fetch(name)
    with pytest.raises(ValueError, match=r"cache_dir=gs://b/c: the checkpoint cache must be a local folder"):
        released.fetch(name, cache_dir="gs://b/c")
    assert list(cwd.iterdir()) == []  # no local gs:/ folder


def test_a_file_that_is_not_what_its_name_promises_is_refused(tiny_release, tmp_path):
    """The tiny model served as the released B/16, by a URL or a folder mirror."""
    _, path, _ = tiny_release
    server = Server({f"/{NAME}.npz": path.read_bytes()})
    folder = tmp_path / "mirror" / NAME
    folder.parent.mkdir(parents=True)
    folder.with_suffix(".npz").write_bytes(path.read_bytes())
    cache = tmp_path / "cache"
    try:
        for mirror in (server.url, str(tmp_path / "mirror")):
            with pytest.raises(ValueError) as error:
                released.fetch(NAME, cache_dir=cache, mirror=mirror)
            message = str(error.value)
            assert f"is not {NAME}, which is patch 16, width 768, 12 blocks, 196 tokens, 21843 classes" in message
            assert "stem/kernel is (4, 4, 3, 48), not (16, 16, 3, 768)" in message
            assert "Nothing was cached" in message
    finally:
        server.close()
    assert _files(cache) == []


def test_bad_downloads_are_detected_and_not_cached(tiny_release, tmp_path, monkeypatch):
    name, path, _ = tiny_release
    data = path.read_bytes()
    server = Server({f"/{name}.npz": data[: len(data) // 2], "/sam/Mixer-B_32.npz": b"garbage" * 100})
    cache = tmp_path / "cache"
    try:
        for bad in (name, "sam/Mixer-B_32"):
            with pytest.raises(ValueError, match="did not give a valid checkpoint; nothing was cached"):
                released.fetch(bad, cache_dir=cache, mirror=server.url)
        assert _files(cache) == []
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
    assert _files(cache) == []
    with pytest.raises(ValueError, match=r"Unknown checkpoint name 'Mixer-B_16'. Released: imagenet1k/Mixer-B_16"):
        released.fetch("Mixer-B_16", cache_dir=cache)


def test_a_changed_cache_file_is_noticed_and_downloaded_again(tiny_release, tmp_path, caplog):
    """A valid file of the right shapes but other values (which only the
    SHA-256 record tells apart), then bytes that do not read at all."""
    name, path, _ = tiny_release
    mirror = tmp_path / "mirror"
    (mirror / name).parent.mkdir(parents=True)
    (mirror / f"{name}.npz").write_bytes(path.read_bytes())
    cache = tmp_path / "cache"
    cached = released.fetch(name, cache_dir=cache, mirror=str(mirror))
    original = npz.read(cached)
    changed = {k: v + 1 for k, v in original.items()}
    for damage in (lambda: np.savez(cached, **changed), lambda: cached.write_bytes(b"broken")):
        damage()
        caplog.clear()
        assert released.fetch(name, cache_dir=cache, mirror=str(mirror)) == cached
        assert "is damaged or changed" in caplog.text
        got = npz.read(cached)
        assert all(np.array_equal(got[k], original[k]) for k in original)


def test_a_file_placed_by_hand_is_checked_once_then_recorded(tiny_release, tmp_path, caplog):
    """The offline route the download error suggests: put the file in the cache."""
    name, path, _ = tiny_release
    cache = tmp_path / "cache"
    (cache / name).parent.mkdir(parents=True)
    (cache / f"{name}.npz").write_bytes(path.read_bytes())
    assert released.fetch(name, cache_dir=cache, mirror=str(tmp_path / "nowhere")) == cache / f"{name}.npz"
    assert (cache / f"{name}.npz.sha256").is_file()
    # The wrong file placed by hand is removed, and said so, not loaded.
    (cache / NAME).parent.mkdir(parents=True)
    (cache / f"{NAME}.npz").write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="has no imagenet21k/Mixer-B_16.npz"):
        released.fetch(NAME, cache_dir=cache, mirror=str(tmp_path))
    assert "is not imagenet21k/Mixer-B_16" in caplog.text
    assert not (cache / f"{NAME}.npz").exists()


@once("downloads and their checks are NumPy and urllib, the same on every backend")
def test_plain_http_mirrors_are_refused_unless_opted_in(tiny_release, tmp_path, monkeypatch):
    name, path, _ = tiny_release
    monkeypatch.delenv("KERAS_MIXER_ALLOW_HTTP", raising=False)
    cache = tmp_path / "cache"
    # Refused before any connection: mirror.example does not resolve here.
    with pytest.raises(ValueError, match=r"Refusing the plain-http mirror http://mirror.example/tests/Mixer-tiny"
                                         r".npz.*allow_http=True or KERAS_MIXER_ALLOW_HTTP=1"):
        released.fetch(name, cache_dir=cache, mirror="http://mirror.example")
    with pytest.raises(ValueError, match="neither an https:// URL nor an existing folder"):
        released.fetch(name, cache_dir=cache, mirror="ftp://mirror.example")
    assert _files(cache) == []
    # Opted in, the same mirror is used; a local server answers as its proxy.
    # A fresh process, since urllib reads the proxy variables once.
    import os
    import subprocess
    import sys

    from conftest import checkout_pythonpath

    server = Server({f"/{name}.npz": path.read_bytes()})
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "all_proxy")}
    env.update(http_proxy=server.url, PYTHONPATH=checkout_pythonpath(os.environ))
    code = ("import sys\nfrom keras_mixer import released\n"
            "released.register(sys.argv[1], released.Release(**eval(sys.argv[2])))\n"
            "print(released.fetch(sys.argv[1], cache_dir=sys.argv[3], mirror='http://mirror.example', "
            "allow_http=True if sys.argv[4] == 'argument' else None))\n")
    release = repr(released.RELEASES[name].__dict__)
    try:
        for how, extra in (("argument", {}), ("variable", {"KERAS_MIXER_ALLOW_HTTP": "1"})):
            result = subprocess.run([sys.executable, "-c", code, name, release, str(tmp_path / how), how],
                                    env={**env, **extra}, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == str(tmp_path / how / f"{name}.npz")
    finally:
        server.close()
    assert server.requests == [f"http://mirror.example/{name}.npz"] * 2


def test_concurrent_downloads_of_one_file_both_succeed(tiny_release, tmp_path):
    name, path, _ = tiny_release
    server = Server({f"/{name}.npz": path.read_bytes()}, chunks=8, delay=0.05)
    cache = tmp_path / "cache"
    results, errors = [], []

    def fetch():
        try:
            results.append(released.fetch(name, cache_dir=cache, mirror=server.url))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        server.close()
    assert errors == [] and results == [cache / f"{name}.npz"] * 2
    assert len(server.requests) == 2  # both were downloading at once
    assert _files(cache) == [f"{name}.npz", f"{name}.npz.sha256"]
    assert released.fetch(name, cache_dir=cache, mirror=str(tmp_path / "nowhere")) == results[0]


def test_release_shapes_are_the_official_layout(official_npz, tiny_release):
    """`Release.shapes` is every key and shape of an official file, and each
    released name's architecture is the paper's variant."""
    from keras_mixer.model import variant_config

    name, _, _ = tiny_release
    _, params, _, _ = official_npz
    assert released.RELEASES[name].shapes() == {k: v.shape for k, v in params.items()}
    variants = {"imagenet1k/Mixer-B_16": "B/16", "imagenet1k/Mixer-L_16": "L/16", "imagenet21k/Mixer-B_16": "B/16",
                "imagenet21k/Mixer-L_16": "L/16", "sam/Mixer-B_16": "B/16", "sam/Mixer-B_32": "B/32"}
    assert set(variants) == set(released.NAMES)
    for official, variant in variants.items():
        release, config = released.RELEASES[official], variant_config(variant)
        assert (release.patch, release.hidden_dim, release.num_blocks, release.tokens_mlp_dim,
                release.channels_mlp_dim) == (config["patch_size"], config["hidden_dim"], config["num_blocks"],
                                              config["tokens_mlp_dim"], config["channels_mlp_dim"])
        assert release.num_tokens == (224 // release.patch) ** 2
        assert release.num_classes == (21843 if official.startswith("imagenet21k") else 1000)


def test_register_adds_a_checked_name(tiny_release, monkeypatch):
    name, path, _ = tiny_release
    release = released.RELEASES[name]
    monkeypatch.setattr(released, "RELEASES", dict(released.RELEASES))
    assert released.register("team/Mixer-food", release) == "team/Mixer-food"
    assert released.register("team/Mixer-food", release) == "team/Mixer-food"  # the same again is fine
    with pytest.raises(ValueError, match="'team/Mixer-food' is already registered as patch 4"):
        released.register("team/Mixer-food", released.Release(**{**release.__dict__, "num_classes": 5}))
    with pytest.raises(TypeError, match="needs a released.Release, got dict"):
        released.register("team/other", {"patch": 4})
    # A pinned digest is checked on download.
    pinned = released.Release(**{**release.__dict__, "sha256": "0" * 64})
    released.register("team/pinned", pinned)
    mirror = path.parent / "mirror"
    (mirror / "team").mkdir(parents=True)
    (mirror / "team" / "pinned.npz").write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="has SHA-256 [0-9a-f]{64}, not the 0{64} of team/pinned"):
        released.fetch("team/pinned", cache_dir=path.parent / "cache", mirror=str(mirror))
    assert not (path.parent / "cache" / "team" / "pinned.npz").exists()
    right = released.Release(**{**release.__dict__, "sha256": released.sha256(path)})
    released.register("team/right", right)
    (mirror / "team" / "right.npz").write_bytes(path.read_bytes())
    assert released.fetch("team/right", cache_dir=path.parent / "cache", mirror=str(mirror)).is_file()


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


@once("the download fails before any model is built")
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


def test_default_cache_is_keras_home(tiny_release, tmp_path, monkeypatch):
    name, path, arrays = tiny_release
    for variable in ("KERAS_HOME", "KERAS_MIXER_CACHE", "KERAS_MIXER_MIRROR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert released.default_cache_dir() == tmp_path / "home" / ".keras" / "mixer_models"
    server = Server({f"/{name}.npz": path.read_bytes()})
    try:
        model = MLPMixer.from_checkpoint(name, mirror=server.url, include_preprocessing=False)
    finally:
        server.close()
    assert (tmp_path / "home" / ".keras" / "mixer_models" / f"{name}.npz").is_file()
    assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6
    # Keras' own variable moves the cache with Keras' home; ours overrides both.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    assert released.default_cache_dir() == tmp_path / "keras_home" / "mixer_models"
    monkeypatch.setenv("KERAS_MIXER_CACHE", str(tmp_path / "ours"))
    assert released.default_cache_dir() == tmp_path / "ours"
