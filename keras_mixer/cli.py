"""How the commands report errors: one line for a user's mistake, a traceback on request.

`train.py`, `python -m keras_mixer.evaluation`, `.export` and `.predict`
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


def run(main, argv=None):
    """Calls `main(argv)` (argv without `--debug`); returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV) == "1"
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        status = main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        print(f"(run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0
