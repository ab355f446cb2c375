"""`python -m keras_mixer`: the `keras-mixer` command (keras_mixer.commands)."""

import sys

from keras_mixer import commands

sys.exit(commands.main())
