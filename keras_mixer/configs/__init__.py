"""Experiment configs: one Python file per experiment, each with `get_config()`.

Configs are plain data (dicts); they never import the trainer. Keys not set
take the trainer's defaults and the named `recipe`'s values
(`keras_mixer.training.DEFAULTS`, `RECIPES`).
"""

import importlib
import importlib.util
import pathlib
import pkgutil


def available():
    """Names of the configs shipped in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def get(name):
    """Returns the config dict of the experiment `name` (e.g. "digits") or of a
    `.py` file path whose module defines `get_config()`."""
    if str(name).endswith(".py"):
        path = pathlib.Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
        spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"Config file {str(path)!r} defines no get_config().")
        return module.get_config()
    if name not in available():
        raise ValueError(
            f"Unknown config {name!r}. Available configs: {', '.join(available())}; "
            "or pass the path of a .py file with get_config()."
        )
    return importlib.import_module(f"{__name__}.{name}").get_config()
