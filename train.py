"""`keras-mixer train` from a checkout: python train.py [flags] (python train.py --help).

The command itself lives in the package (keras_mixer/commands.py), which
the wheel installs as `keras-mixer`; this file runs the same `train`, after
two steps that must come before Keras is imported: glibc's malloc settings
(keras_mixer/runtime.py re-executes this command once with them), and the
one-line error report of keras_mixer/cli.py, which also covers a backend
that Keras cannot import.
"""

import importlib.util
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TF's start-up chatter out.


def main(argv=None):
    from keras_mixer import commands

    return commands.train(argv, prog="train.py")


def _standalone(name):
    """keras_mixer/<name>.py (standard library only) loaded without the package,
    whose import starts Keras and a backend."""
    package = importlib.util.find_spec("keras_mixer")
    if package is None or not package.submodule_search_locations:
        sys.exit('error: keras_mixer is not installed: pip install -e ".[train]" in the checkout.')
    path = os.path.join(list(package.submodule_search_locations)[0], f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_keras_mixer_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    # May re-execute this command once; then only the interpreter start is repeated.
    _standalone("runtime").ensure_malloc_tunables()
    sys.exit(_standalone("cli").run(main))
