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
