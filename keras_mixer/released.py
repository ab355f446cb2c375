"""The released checkpoints: what each name promises, the download cache, mirrors.

The official checkpoints live at `gs://mixer_models` (served over HTTPS
as `OFFICIAL_URL`). `fetch` downloads one once into the cache (by default
`mixer_models/` under Keras' home, where Keras keeps its own downloads).
A file is cached only when it is what its name promises: a readable
`.npz` with exactly the parameter keys and shapes of that architecture
and class count (`Release`). Its SHA-256 is then recorded beside it
(`<file>.npz.sha256`, in `sha256sum` format) and checked on every later
use, so a file changed in the cache is noticed and downloaded again.

Without network access, a mirror (a folder or URL that holds
`<set>/<file>.npz`) stands in. Plain `http://` mirrors are refused, since
anyone on the path could swap the file, unless the user opts in
(`allow_http=True` or `KERAS_MIXER_ALLOW_HTTP=1`); loopback addresses
(`localhost`, `127.x.x.x`, `::1`) never leave the machine and are allowed.
The official files' hashes are not pinned here: they could not be fetched
where this was written, so the first download is trusted once it has the
right shapes (a `Release` may carry a `sha256` to pin one).
"""

import dataclasses
import hashlib
import ipaddress
import logging
import os
import pathlib
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from keras_mixer import npz
from keras_mixer import storage

OFFICIAL_URL = "https://storage.googleapis.com/mixer_models"


@dataclasses.dataclass(frozen=True)
class Release:
    """What a released file must hold: the official parameter layout of one
    architecture (the paper's Table 1 sizes) and head.

    Args:
        patch: square patch side.
        hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim: the
            architecture.
        num_tokens: patches per image at the training size (196 for patch
            16 at 224x224).
        num_classes: head classes.
        channels: image channels.
        sha256: the file's hex digest when it is known in advance; None
            trusts the first download that has the right shapes.
    """

    patch: int
    hidden_dim: int
    num_blocks: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    num_tokens: int
    num_classes: int
    channels: int = 3
    sha256: str = None

    def shapes(self):
        """{official key: shape} of every parameter the file must hold."""
        c, t = self.hidden_dim, self.num_tokens
        shapes = {"stem/kernel": (self.patch, self.patch, self.channels, c), "stem/bias": (c,),
                  "pre_head_layer_norm/scale": (c,), "pre_head_layer_norm/bias": (c,),
                  "head/kernel": (c, self.num_classes), "head/bias": (self.num_classes,)}
        for i in range(self.num_blocks):
            block = f"MixerBlock_{i}"
            for norm in ("LayerNorm_0", "LayerNorm_1"):
                shapes[f"{block}/{norm}/scale"] = shapes[f"{block}/{norm}/bias"] = (c,)
            for mixing, width, mlp in (("token_mixing", t, self.tokens_mlp_dim),
                                       ("channel_mixing", c, self.channels_mlp_dim)):
                shapes[f"{block}/{mixing}/Dense_0/kernel"] = (width, mlp)
                shapes[f"{block}/{mixing}/Dense_0/bias"] = (mlp,)
                shapes[f"{block}/{mixing}/Dense_1/kernel"] = (mlp, width)
                shapes[f"{block}/{mixing}/Dense_1/bias"] = (width,)
        return shapes

    def describe(self):
        return (f"patch {self.patch}, width {self.hidden_dim}, {self.num_blocks} blocks, "
                f"{self.num_tokens} tokens, {self.num_classes} classes")


_B16 = dict(patch=16, hidden_dim=768, num_blocks=12, tokens_mlp_dim=384, channels_mlp_dim=3072, num_tokens=196)
_B32 = dict(_B16, patch=32, num_tokens=49)
_L16 = dict(patch=16, hidden_dim=1024, num_blocks=24, tokens_mlp_dim=512, channels_mlp_dim=4096, num_tokens=196)
# The released files, as "<set>/<file>", and what each must hold. All were
# trained at 224x224; ImageNet-21k has 21843 classes.
RELEASES = {
    "imagenet1k/Mixer-B_16": Release(**_B16, num_classes=1000),
    "imagenet1k/Mixer-L_16": Release(**_L16, num_classes=1000),
    "imagenet21k/Mixer-B_16": Release(**_B16, num_classes=21843),
    "imagenet21k/Mixer-L_16": Release(**_L16, num_classes=21843),
    "sam/Mixer-B_16": Release(**_B16, num_classes=1000),
    "sam/Mixer-B_32": Release(**_B32, num_classes=1000),
}
# The official names (`register` adds others to RELEASES, not here).
NAMES = tuple(RELEASES)


def register(name, release):
    """Adds a checkpoint name: a file in the official layout that a mirror
    serves as `<mirror>/<name>.npz` (e.g. a team's own fine-tuned model on an
    internal server), checked and cached like the official ones. Returns
    `name`, so `MLPMixer.from_checkpoint(register(...))` reads in one line."""
    if not isinstance(release, Release):
        raise TypeError(f"register({name!r}, ...) needs a released.Release, got {type(release).__name__}.")
    known = RELEASES.get(name)
    if known is not None and known != release:
        raise ValueError(f"{name!r} is already registered as {known.describe()}; choose another name.")
    RELEASES[name] = release
    return name


def keras_home():
    """Keras' home folder, resolved the way Keras resolves it at import:
    `$KERAS_HOME`, else `~/.keras`, else `/tmp/.keras` when the home folder
    is not writable (a read-only CI or container home). Read at call time,
    so a changed `HOME` or `KERAS_HOME` is seen; Keras keeps the value in a
    private function, which this does not call."""
    if "KERAS_HOME" in os.environ:
        return pathlib.Path(os.environ["KERAS_HOME"])
    base = os.path.expanduser("~")
    if not os.access(base, os.W_OK):
        base = "/tmp"
    return pathlib.Path(base) / ".keras"


def default_cache_dir():
    """Where released checkpoints are kept: `$KERAS_MIXER_CACHE`, else
    `<keras_home()>/mixer_models` (by default `~/.keras/mixer_models`)."""
    if os.environ.get("KERAS_MIXER_CACHE"):
        return _local_cache(os.environ["KERAS_MIXER_CACHE"], "KERAS_MIXER_CACHE")
    return keras_home() / "mixer_models"


def _local_cache(folder, what):
    """`folder` as a Path; a URL is an error: the cache keeps a SHA-256
    record beside each file and replaces files by renaming, which an object
    store cannot do, and pathlib would turn gs://b/c into a local gs:/b/c."""
    if storage.is_remote(str(folder)):
        raise ValueError(
            f"{what}={folder}: the checkpoint cache must be a local folder (it is checked "
            "and replaced file by file). Use a local path; each host downloads its own copy once."
        )
    return pathlib.Path(folder)


def sha256(path):
    """The hex SHA-256 digest of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record(target):
    return target.with_name(target.name + ".sha256")


def _write_record(target, digest):
    # Unique and renamed into place: concurrent fetches each write whole files.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".sha256")
    with os.fdopen(fd, "w") as f:
        f.write(f"{digest}  {target.name}\n")
    os.replace(tmp, _record(target))


def check_release(name, params, origin):
    """Raises a ValueError unless `params` (official keys, `params/` prefix
    allowed) are exactly what `RELEASES[name]` promises."""
    release = RELEASES[name]
    prefix = "params/"
    if params and all(k.startswith(prefix) for k in params):
        params = {k[len(prefix):]: v for k, v in params.items()}
    missing, unexpected, wrong = npz.shape_differences(release.shapes(), params)
    # Wrong shapes say most about what the file is; they come first.
    problems = [f"{k} is {found}, not {shape}" for k, found, shape in wrong]
    problems += [f"no {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(
            f"{origin} is not {name}, which is {release.describe()}: {'; '.join(problems[:3])}{more}. "
            "Nothing was cached. Check the mirror (KERAS_MIXER_MIRROR) serves the released file, "
            "or load your own file by its path."
        )


def _cached(name, target):
    """`target` when it holds a checked copy of `name`, else None (a
    damaged or changed file is removed, with a warning)."""
    if not target.is_file():
        return None
    record = _record(target)
    if record.is_file():
        recorded = record.read_text().split()[:1]
        if recorded == [sha256(target)]:
            return target
        problem = f"its SHA-256 no longer matches the one recorded in {record} at download"
    else:
        # Placed by hand (the offline route) or cached by an older version:
        # checked once, then recorded.
        try:
            _write_record(target, _verify(name, target, str(target)))
            return target
        except ValueError as error:
            problem = str(error)
    logging.warning("Cached %s is damaged or changed (%s); downloading it again.", target, problem)
    target.unlink()
    record.unlink(missing_ok=True)
    return None


def _verify(name, path, origin):
    """Checks the file at `path` against `RELEASES[name]` and records its
    SHA-256 beside `path`'s final place; returns the digest."""
    try:
        params = npz.read(path)
    except ValueError as error:
        raise ValueError(f"{origin} did not give a valid checkpoint; nothing was cached. {error}") from None
    check_release(name, params, origin)
    digest = sha256(path)
    pinned = RELEASES[name].sha256
    if pinned and digest != pinned:
        raise ValueError(f"{origin} has SHA-256 {digest}, not the {pinned} of {name}; nothing was cached.")
    return digest


def _check_url(origin, allow_http):
    parts = urllib.parse.urlsplit(origin)
    if parts.scheme == "https":
        return
    if parts.scheme != "http":
        raise ValueError(f"The mirror {origin!r} is neither an https:// URL nor an existing folder.")
    host = parts.hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if allow_http is None:
        allow_http = os.environ.get("KERAS_MIXER_ALLOW_HTTP") == "1"
    if not (loopback or allow_http):
        raise ValueError(
            f"Refusing the plain-http mirror {origin}: anyone on the network path could replace the "
            "file. Use an https:// URL or a local folder, or opt in with allow_http=True or "
            "KERAS_MIXER_ALLOW_HTTP=1."
        )


def _download(origin, tmp, target, name, timeout):
    try:
        with urllib.request.urlopen(origin, timeout=timeout) as response, open(tmp, "wb") as f:
            expected = response.headers.get("Content-Length")
            shutil.copyfileobj(response, f)
            received = f.tell()
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(
            f"Could not download {origin} ({reason}). Without network access, download it "
            f"elsewhere and put it at {target}, or set KERAS_MIXER_MIRROR to a folder or URL "
            f"that holds {name}.npz."
        ) from None
    if expected is not None and int(expected) != received:
        raise ValueError(
            f"The download of {origin} was cut off ({received} of {expected} bytes); nothing "
            "was cached. Try again."
        )


def _get(name, mirror, tmp, target, timeout, allow_http):
    """Copies or downloads `name` from `mirror` to `tmp`; returns its origin."""
    if os.path.isdir(mirror):
        source = pathlib.Path(mirror) / f"{name}.npz"
        if not source.is_file():
            raise FileNotFoundError(f"The mirror folder {mirror!r} has no {name}.npz.")
        shutil.copyfile(source, tmp)
        return str(source)
    origin = f"{mirror.rstrip('/')}/{name}.npz"
    _check_url(origin, allow_http)
    _download(origin, tmp, target, name, timeout)
    return origin


def fetch(name, cache_dir=None, mirror=None, timeout=10.0, allow_http=None):
    """Returns the local path of the released checkpoint `name`, downloading it once.

    Args:
        name: a key of `RELEASES`: one of `NAMES`, e.g.
            "imagenet21k/Mixer-B_16", or one added with `register`.
        cache_dir: where files are kept (default: `default_cache_dir()`:
            `$KERAS_MIXER_CACHE`, else `mixer_models/` under Keras' home,
            `$KERAS_HOME` or `~/.keras`), as `<cache_dir>/<set>/<file>.npz`
            with its `.sha256` record beside it.
        mirror: a base URL or a local folder holding `<set>/<file>.npz`
            (default: `$KERAS_MIXER_MIRROR`, else the official bucket).
        timeout: seconds to wait for the server before giving up.
        allow_http: accept a plain `http://` mirror on another machine
            (default: `$KERAS_MIXER_ALLOW_HTTP` is "1").

    Raises:
        ValueError: an unknown name, a refused mirror, or a file that is
            not what the name promises (nothing is cached).
        ConnectionError: the server could not be reached.
    """
    if name not in RELEASES:
        raise ValueError(
            f"Unknown checkpoint name {name!r}. Released: {', '.join(RELEASES)}; "
            "or pass the path of an .npz file."
        )
    target = (_local_cache(cache_dir, "cache_dir") if cache_dir else default_cache_dir()) / f"{name}.npz"
    if _cached(name, target):
        return target
    mirror = str(mirror or os.environ.get("KERAS_MIXER_MIRROR") or OFFICIAL_URL)
    target.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: concurrent downloads of one file never share one.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".download")
    os.close(fd)
    try:
        digest = _verify(name, tmp, _get(name, mirror, tmp, target, timeout, allow_http))
        _record(target).unlink(missing_ok=True)
        os.replace(tmp, target)
        _write_record(target, digest)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)
    return target
