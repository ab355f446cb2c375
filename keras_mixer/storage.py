"""Where files live: local paths and URLs (gs://, s3://, ...) behind one API.

Every path the package reads or writes goes through `path(...)`: a local
path becomes a `pathlib.Path`, a URL a `upath.UPath` (universal-pathlib:
pathlib's API on fsspec, whose gs:// backend is gcsfs), so the code that
joins, lists, reads and deletes is the same for both. What differs is
writing, and this module owns it:

- `writing(target)` yields a local temporary file to write; when the block
  succeeds, a local target is replaced by a rename, a remote one by one
  upload, which an object store makes visible whole or not at all (a GCS
  object appears only once its upload completes). A failed block leaves
  the previous file or object untouched. There is no rename on an object
  store (gcsfs's move is a copy, and its move API is not in every server),
  so nothing is written under a temporary name there.
- `reading(source)` yields a local file to read (a remote one downloaded
  to a temporary file first), for readers that need a file name (Keras'
  `load_model`, NumPy).
- `check_directory` checks a remote work directory before a run starts:
  the backend installed, the bucket there, the credentials accepted; each
  is one error that says what to do. Object stores have no folders, so
  `mkdir` creates nothing remotely (gcsfs's `mkdir` would create a
  *bucket*).

A URL whose scheme has no installed backend is an `ImportError` naming
the extra to install (`pip install "keras-mixer[gcs]"` for gs://).
gcsfs asks, by default, a gRPC control API for each bucket's type, which
storage emulators lack (60 s per call against one); only zonal and
hierarchical-namespace buckets need it, so this module turns it off
(`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`) unless the variable is set.
`STORAGE_EMULATOR_HOST` (what Google's clients and gcsfs read) points
gs:// at an emulator; the tests run one.
"""

import contextlib
import os
import pathlib
import re
import shutil
import tempfile

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Scheme -> (the fsspec backend's module, the extra that installs it).
BACKENDS = {"gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3fs"),
            "az": ("adlfs", "adlfs"), "abfs": ("adlfs", "adlfs"), "memory": (None, None)}


def scheme(path):
    """The URL scheme of `path` ("gs", "s3", ...), or None for a local path."""
    match = _URL.match(os.fspath(path) if not isinstance(path, str) else path)
    if match is None or match.group(1) == "file":
        return None
    return match.group(1).lower()


def is_remote(path):
    """Whether `path` is a URL of a remote store (not a local path, not file://)."""
    return getattr(path, "protocol", None) not in (None, "", "file", "local") or (
        isinstance(path, str) and scheme(path) is not None)


def path(location):
    """A `pathlib.Path` for a local path, a `upath.UPath` for a URL.

    Raises:
        ImportError: the URL's scheme has no installed backend; names the extra.
        ValueError: a scheme no backend is known for.
    """
    if is_remote(location) and not isinstance(location, str):
        return location
    text = os.fspath(location)
    kind = scheme(text)
    if kind is None:
        return pathlib.Path(text[len("file://"):] if text.startswith("file://") else text)
    if kind not in BACKENDS:
        raise ValueError(
            f"{text}: no storage backend is known for {kind}://. Use a local path or one of "
            f"{', '.join(s + '://' for s in sorted(BACKENDS) if s != 'memory')}."
        )
    module, extra = BACKENDS[kind]
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        import upath

        if module:
            __import__(module)
    except ImportError:
        raise ImportError(
            f"{text} is a {kind}:// URL, which needs universal-pathlib and {module}: "
            f'pip install "keras-mixer[{extra}]"'
        ) from None
    return upath.UPath(text)


def check_directory(directory, what="--workdir"):
    """Checks, before any work, that a remote `directory` can be used: its
    bucket exists and the credentials are accepted. Local paths: nothing."""
    directory = path(directory)
    if not is_remote(directory):
        return directory
    bucket = re.match(r"^[^:]+://[^/]*", str(directory)).group(0)  # gs://bucket
    _check_reachable(directory, what)
    try:
        found = path(bucket).exists()
    except (OSError, ValueError, RuntimeError) as error:  # no credentials, refused, no network
        raise ValueError(
            f"{what} {directory}: cannot reach {bucket} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no message'}). Check the credentials "
            "(gcloud auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS) and the network."
        ) from None
    if not found:
        raise FileNotFoundError(
            f"{what} {directory}: the bucket {bucket} does not exist (or these credentials cannot "
            f"see it). Create it first (gcloud storage buckets create {bucket}) or fix the name."
        )
    return directory


def _check_reachable(directory, what):
    """A gs:// store's server answers a TCP connection within seconds, or
    this is the error: gcsfs would retry a failed connection for a minute
    and more before it says so."""
    if scheme(str(directory)) not in ("gs", "gcs"):
        return
    import socket
    import urllib.parse

    endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    parsed = urllib.parse.urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=10).close()
    except OSError as error:
        raise ValueError(
            f"{what} {directory}: cannot reach {parsed.hostname}:{port} ({error.strerror or error}). "
            "Check the network (or STORAGE_EMULATOR_HOST, if you meant an emulator)."
        ) from None


def mkdir(directory):
    """Creates a local folder (and its parents); nothing on an object store."""
    directory = path(directory)
    if not is_remote(directory):
        directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextlib.contextmanager
def writing(target, suffix=None):
    """Yields a local temporary path to write `target` through (see the module).

    Local: the file sits beside `target` (a unique name, so two writers never
    share one) and is renamed onto it. Remote: it sits in the system's
    temporary folder and is uploaded, then removed.
    """
    target = path(target)
    suffix = target.suffix if suffix is None else suffix
    remote = is_remote(target)
    if not remote:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=None if remote else target.parent,
                               prefix=f".{target.stem}.", suffix=f".tmp{suffix}")
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        if remote:
            target.fs.put_file(str(tmp), target.path)
        else:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
            tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def reading(source):
    """Yields a local path holding `source`'s bytes (a file, or a folder such
    as a SavedModel): itself when local, a downloaded temporary copy
    (removed afterwards) when remote."""
    source = path(source)
    if not is_remote(source):
        yield source
        return
    if not source.exists():
        raise FileNotFoundError(f"No file at {source}.")
    folder = tempfile.mkdtemp(prefix="keras-mixer-")
    local = pathlib.Path(folder) / source.name
    try:
        if source.is_dir():  # a SavedModel: the whole folder
            source.fs.get(source.path.rstrip("/") + "/", str(local), recursive=True)
        else:
            source.fs.get_file(source.path, str(local))
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_text(target, text):
    """Writes `text` to `target` whole (see `writing`)."""
    with writing(target) as tmp:
        tmp.write_text(text)
    return path(target)


def move(source, target):
    """Renames a file; on an object store, a copy then a delete."""
    source, target = path(source), path(target)
    if is_remote(source):
        source.fs.copy(source.path, target.path)
        source.fs.rm_file(source.path)
    else:
        source.replace(target)
    return target


def upload_folder(local, remote):
    """Copies the local file `local`, or every file under the local folder
    `local` (same relative paths), to `remote`, replacing what is there; a
    missing `local` copies nothing. For writers that only write local files
    (Keras' CSVLogger appends; TensorFlow's summary writer, whose gs://
    client reads no emulator variable and has no other backend)."""
    local, remote = pathlib.Path(local), path(remote)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for file in files:
        target = remote.joinpath(*file.relative_to(local).parts)
        target.fs.put_file(str(file), target.path)
