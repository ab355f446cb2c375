"""The released checkpoints: their names, the download cache, mirrors.

The official checkpoints live at `gs://mixer_models` (served over HTTPS
as `OFFICIAL_URL`). `fetch` downloads one once into the cache (by default
`mixer_models/` under Keras' home, where Keras keeps its own downloads),
checks that it reads as an `.npz`, and renames it into place, so a cut
download never passes for a checkpoint. Without network access, a mirror
(a folder or URL that holds `<set>/<file>.npz`) stands in.
"""

import logging
import os
import pathlib
import shutil
import urllib.error
import urllib.request

from keras_mixer import npz

OFFICIAL_URL = "https://storage.googleapis.com/mixer_models"
# The released files, as "<set>/<file>".
NAMES = (
    "imagenet1k/Mixer-B_16", "imagenet1k/Mixer-L_16",
    "imagenet21k/Mixer-B_16", "imagenet21k/Mixer-L_16",
    "sam/Mixer-B_16", "sam/Mixer-B_32",
)


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
        return pathlib.Path(os.environ["KERAS_MIXER_CACHE"])
    return keras_home() / "mixer_models"


def _cache_dir(cache_dir=None):
    return pathlib.Path(cache_dir) if cache_dir else default_cache_dir()


def fetch(name, cache_dir=None, mirror=None, timeout=10.0):
    """Returns the local path of the released checkpoint `name`, downloading it once.

    Args:
        name: one of `NAMES`, e.g. "imagenet21k/Mixer-B_16".
        cache_dir: where files are kept (default: `default_cache_dir()`:
            `$KERAS_MIXER_CACHE`, else `mixer_models/` under Keras' home,
            `$KERAS_HOME` or `~/.keras`), as `<cache_dir>/<set>/<file>.npz`.
        mirror: a base URL or a local folder holding `<set>/<file>.npz`
            (default: `$KERAS_MIXER_MIRROR`, else the official bucket).
        timeout: seconds to wait for the server before giving up.
    """
    if name not in NAMES:
        raise ValueError(
            f"Unknown checkpoint name {name!r}. Released: {', '.join(NAMES)}; "
            "or pass the path of an .npz file."
        )
    target = _cache_dir(cache_dir) / f"{name}.npz"
    if target.is_file():
        try:
            npz.read(target)
            return target
        except ValueError as error:
            logging.warning("Cached %s is damaged (%s); downloading it again.", target, error)
            target.unlink()
    mirror = mirror or os.environ.get("KERAS_MIXER_MIRROR") or OFFICIAL_URL
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.download")
    if os.path.isdir(mirror):
        source = pathlib.Path(mirror) / f"{name}.npz"
        if not source.is_file():
            raise FileNotFoundError(f"The mirror folder {mirror!r} has no {name}.npz.")
        shutil.copyfile(source, tmp)
        origin = str(source)
    else:
        origin = f"{mirror.rstrip('/')}/{name}.npz"
        try:
            with urllib.request.urlopen(origin, timeout=timeout) as response, open(tmp, "wb") as f:
                expected = response.headers.get("Content-Length")
                shutil.copyfileobj(response, f)
                received = f.tell()
        except (urllib.error.URLError, OSError) as error:
            tmp.unlink(missing_ok=True)
            reason = getattr(error, "reason", error)
            raise ConnectionError(
                f"Could not download {origin} ({reason}). Without network access, "
                f"download it elsewhere and put it at {target}, or set "
                "KERAS_MIXER_MIRROR to a folder or URL that holds "
                f"{name}.npz."
            ) from None
        if expected is not None and int(expected) != received:
            tmp.unlink(missing_ok=True)
            raise ValueError(
                f"The download of {origin} was cut off ({received} of {expected} "
                "bytes); nothing was cached. Try again."
            )
    try:
        npz.read(tmp)
    except ValueError as error:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{origin} did not give a valid checkpoint; nothing was cached. {error}") from None
    os.replace(tmp, target)
    return target
