"""Experiment configs: one Python file per experiment, each with `get_config()`.

Configs are plain data (dicts); they never import the trainer.
"""

import importlib
import pkgutil


def available():
    """Names of the configs shipped in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def get(name):
    """Returns the config dict of the experiment `name` (e.g. "digits")."""
    if name not in available():
        raise ValueError(
            f"Unknown config {name!r}. Available configs: {', '.join(available())}."
        )
    return importlib.import_module(f"{__name__}.{name}").get_config()
