"""keras-mixer: MLP-Mixer (Tolstikhin et al., 2021) for Keras 3 on JAX, TensorFlow and PyTorch."""

from keras_mixer import cli as _cli

try:
    import keras as _keras  # starts the backend (KERAS_BACKEND) and imports its framework
except ImportError as _error:
    _named = _cli.backend_import_error(_error)
    if _named is None:
        raise
    raise _named from None

from keras_mixer.features import feature_extractor
from keras_mixer.layers import LayerNorm
from keras_mixer.layers import MixerBlock
from keras_mixer.layers import MLPBlock
from keras_mixer.layers import StochasticDepth
from keras_mixer.model import MLPMixer
from keras_mixer.model import VARIANTS
from keras_mixer.model import variant_config
from keras_mixer.weights import adapt_resolution
from keras_mixer.weights import load_official
from keras_mixer.weights import load_timm
from keras_mixer.weights import reset_head
from keras_mixer.weights import save_official

__version__ = "0.1.0"


def _register_kerashub_classes():
    """Registers `keras_mixer.kerashub`'s classes with Keras once `keras_hub`
    is imported, before this package or after it, so that KerasHub's
    `from_preset` rebuilds a Mixer preset after `import keras_mixer`.

    Importing keras_hub takes ~2 s, so this package does not import it for
    users who never touch KerasHub: if it is not imported yet, a finder on
    `sys.meta_path` waits for its import and registers the classes right
    after it. A keras-hub too old for the classes (the `kerashub` extra
    needs 0.32) is left alone; `from keras_mixer import kerashub` says why.
    """
    import importlib
    import importlib.abc
    import importlib.util
    import sys

    def register():
        try:
            importlib.import_module("keras_mixer.kerashub")
        except ImportError:
            pass

    if "keras_hub" in sys.modules:
        register()
        return

    class AfterKerasHub(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname != "keras_hub":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                exec_module = spec.loader.exec_module

                def exec_then_register(module):
                    exec_module(module)
                    register()

                spec.loader.exec_module = exec_then_register
            return spec

    if importlib.util.find_spec("keras_hub") is not None:
        sys.meta_path.insert(0, AfterKerasHub())


_register_kerashub_classes()
