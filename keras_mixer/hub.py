"""Where timm weights come from: a Hugging Face Hub id, a local timm folder, or a weights file.

    MLPMixer.from_timm("hf://timm/mixer_b16_224.goog_in21k_ft_in1k")
    MLPMixer.from_timm("downloads/mixer_b16_224/")      # model.safetensors + config.json
    MLPMixer.from_timm("mixer_b16_224.safetensors")     # weights only

Every timm Mixer checkpoint lives on the Hub as `model.safetensors` (older
ones `pytorch_model.bin`) beside a `config.json` whose `pretrained_cfg`
gives the input size and the normalisation (`mean`, `std`) the weights were
trained with. Hub files come through `huggingface_hub` and its own cache
(`$HF_HOME/hub`, by default `~/.cache/huggingface/hub`), so
`HF_HUB_OFFLINE=1` and caches copied from another machine work. A bare
weights file has no `pretrained_cfg`: the caller gives the size, and the
normalisation is the official one (mean 0.5, std 0.5, the Google sets').
Standard library only; `huggingface_hub` is imported when an `hf://` id is read.
"""

import dataclasses
import json
import pathlib

HF_PREFIX = "hf://"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class TimmFiles:
    """A timm checkpoint on disk.

    Attributes:
        weights: the `.safetensors` or `.pth`/`.bin` file.
        pretrained_cfg: timm's `pretrained_cfg` (input_size, mean, std, ...),
            or {} when there is none.
        origin: where it came from, for messages.
    """

    weights: pathlib.Path
    pretrained_cfg: dict
    origin: str


def _pretrained_cfg(path):
    try:
        config = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable timm config.json ({error}).") from None
    return dict(config.get("pretrained_cfg") or {})


def _from_folder(folder):
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"The folder {folder} holds neither {' nor '.join(WEIGHT_FILES)}.")
    config = folder / "config.json"
    return TimmFiles(weights, _pretrained_cfg(config) if config.is_file() else {}, str(folder))


def _offline_error(uri, cache):
    repo_id = uri[len(HF_PREFIX):].partition("@")[0]
    return FileNotFoundError(
        f"{uri}: its files are not in the Hugging Face cache ({cache}) and could not be downloaded "
        "(HF_HUB_OFFLINE=1, or no connection). Where there is network, run "
        f"`hf download {repo_id} model.safetensors config.json` and copy the cache, or point HF_HOME at one."
    )


def _from_hub(uri):
    repo_id, _, revision = uri[len(HF_PREFIX):].partition("@")
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ImportError(f'Reading {uri} needs huggingface_hub: pip install "keras-mixer[timm]"') from None

    def download(filename):
        return pathlib.Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision or None))

    try:
        config = download("config.json")
        missing = []
        for name in WEIGHT_FILES:
            try:
                return TimmFiles(download(name), _pretrained_cfg(config), uri)
            except errors.EntryNotFoundError as error:
                missing.append(error)
        if any(isinstance(error, errors.LocalEntryNotFoundError) for error in missing):
            raise _offline_error(uri, huggingface_hub.constants.HF_HUB_CACHE)
        raise FileNotFoundError(f"{uri} holds neither {' nor '.join(WEIGHT_FILES)}: not a timm checkpoint.")
    except errors.LocalEntryNotFoundError:
        raise _offline_error(uri, huggingface_hub.constants.HF_HUB_CACHE) from None
    except errors.RepositoryNotFoundError:
        raise ValueError(f"{uri}: no such repository on the Hugging Face Hub (or it is private or gated: "
                         "log in with `hf auth login`).") from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"{uri}: no revision {revision!r} in {repo_id}.") from None


def timm_files(source):
    """The `TimmFiles` of `source`: "hf://<org>/<repo>[@revision]", a folder
    with timm's weights (and `config.json`), or the path of a weights file
    (checked when it is read)."""
    text = str(source)
    if text.startswith(HF_PREFIX):
        return _from_hub(text)
    path = pathlib.Path(source)
    if path.is_dir():
        return _from_folder(path)
    return TimmFiles(path, {}, text)
