"""How the commands report errors: one line for a user's mistake, a traceback on request.

The `keras-mixer` subcommands (keras_mixer/commands.py) and `train.py`
run their `main` through `run`: an error a user can fix (a missing or
unreadable file, a bad setting, a model that does not fit the data, a full
disk, a busy work directory) prints `error: <what and how to fix it>` and
exits with status 1. `--debug` on the command line, or
`KERAS_MIXER_DEBUG=1`, shows the traceback instead. Standard library only.
"""

import os
import sys

DEBUG_FLAG = "--debug"
DEBUG_ENV = "KERAS_MIXER_DEBUG"
# What a user's input or machine causes; anything else is a bug and keeps
# its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError, RuntimeError)


# What makes a process one of several: Keras' variables, JAX's coordinator
# variable, and KERAS_MIXER_MULTI_HOST (JAX finds the rest on a TPU pod or
# under SLURM). A value of "" or "0" counts as unset.
MULTI_HOST_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                  "JAX_COORDINATOR_ADDRESS", "KERAS_MIXER_MULTI_HOST")


# The extra that installs each backend's framework.
BACKEND_EXTRAS = {"tensorflow": "train", "jax": "jax", "torch": "torch"}


def backend_import_error(error):
    """An `ImportError` that says which extra to install, for `error` raised
    while Keras imported the framework of its backend; None for any other."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    if name not in BACKEND_EXTRAS:
        return None
    backend = os.environ.get("KERAS_BACKEND", "tensorflow (Keras' default)")
    extra = BACKEND_EXTRAS[name]
    return ImportError(
        f"Keras' backend {backend} needs {name}, which this environment lacks: "
        f'pip install "keras-mixer[{extra}]", or choose an installed backend with KERAS_BACKEND=jax, '
        "tensorflow or torch.")


def multi_host_process(environ=None):
    """`(index, count)` of this process in a multi-host run (`"?"` where JAX
    finds them itself), or None for a one-process run."""
    environ = os.environ if environ is None else environ
    if not any(environ.get(k) not in (None, "", "0") for k in MULTI_HOST_ENV):
        return None
    return (environ.get("KERAS_DISTRIBUTION_PROCESS_ID", "?"),
            environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "?"))


def run(main, argv=None):
    """Calls `main(argv)` (argv without `--debug`); returns its exit status.

    In a multi-host run an error ends the process at once after its two
    lines (`os._exit`): JAX's exit handler would otherwise wait at a
    shutdown barrier for the partners and end in a C++ stack trace that
    hides the reason.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV) == "1"
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        status = main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        host = multi_host_process()
        if host is None:
            print(f"(run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
            return 1
        print(f"error: process {host[0]} of {host[1]} of a multi-host run stops here. A run needs "
              "every process: when a partner was lost (a closed connection, a heartbeat timeout), "
              "its own log says why. Fix the cause, then start every process again with the same "
              "command; train.py resumes from the last saved state.", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return status if isinstance(status, int) else 0
