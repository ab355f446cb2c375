"""The one config schema: every key, its default, type, choices and meaning.

A config is plain data (a dict; see `keras_mixer/configs/`). `resolve`
fills in the defaults, then the named `recipe`'s values, then the config's
own, and checks every value; `train.py --help` lists the keys from
`SCHEMA`. Unknown keys are errors, `model.*` keys included: they are
`MLPMixer` arguments, listed in `MODEL_KEYS` (a test keeps that table equal
to `MLPMixer`'s signature, since this module imports nothing but the
standard library).

Weight decay, the paper's "wd 0.1": the official pretraining code applied
decay as `param -= lr_t * wd * param`, i.e. multiplied by the scheduled
learning rate (big_vision's ImageNet configs later wrote the same setting
as a decoupled `wd=1e-4` with lr 1e-3, 0.1 x 1e-3 = 1e-4). Keras' `AdamW`
applies `var -= lr_t * weight_decay * var`, so the paper's 0.1 is
`weight_decay=0.1` here, with no rescaling: at the peak lr 1e-3 each step
shrinks kernels by 1e-4.
"""

import ast
import dataclasses
import importlib
import importlib.util
import pathlib
import pkgutil

NONE = type(None)
AUTO = "auto"  # Keys with `auto=True` take it: decided for the devices found.
# Evaluation crops of `data.center_crop` and implementations of `augment`;
# written out here (this module imports neither), checked equal by the tests.
EVAL_CROPS = ("resize-crop", "resmall-crop")
# What an image folder does with a file whose body TensorFlow cannot decode
# (keras_mixer.sources.image_folder_source).
DAMAGED_IMAGES = ("error", "skip")
AUGMENT_IMPLEMENTATIONS = ("keras_cv", "keras")
MIX_ON = ("device", "host")


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its default, the types it takes, its choices, its meaning."""

    name: str
    default: object
    types: tuple
    doc: str
    choices: tuple = ()
    auto: bool = False  # also takes "auto"
    positive: bool = False  # an int > 0
    bounds: str = ""  # a number's range: ">= 0", "> 0", "[0, 1)" or "[0, 1]"

    def check(self, value, label=None):
        label = label or self.name
        if self.auto and value == AUTO:
            return
        ok = isinstance(value, self.types) and not (isinstance(value, bool) and bool not in self.types)
        if not ok:
            names = " or ".join("None" if t is NONE else t.__name__ for t in self.types)
            if self.auto:
                names = f"'auto' or {names}"
            raise ValueError(f"Config key `{label}` must be {names}, got {value!r} ({type(value).__name__}).")
        if self.choices and value is not None and value not in self.choices:
            raise ValueError(f"Config key `{label}` must be one of {', '.join(self.choices)}, got {value!r}.")
        if self.positive and value is not None and value <= 0:
            raise ValueError(f"`{label}` must be a positive integer, got {value!r}.")
        if self.bounds and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not _within(value, self.bounds):
                raise ValueError(f"`{label}` must be {_bounds_text(self.bounds)}, got {value!r}.")


def _within(value, bounds):
    if bounds.startswith(">="):
        return value >= float(bounds[2:])
    if bounds.startswith(">"):
        return value > float(bounds[1:])
    low, high = (float(v) for v in bounds[1:-1].split(","))
    return low <= value and (value <= high if bounds.endswith("]") else value < high)


def _bounds_text(bounds):
    if bounds.startswith(">="):
        return f"at least {bounds[2:].strip()}"
    if bounds.startswith(">"):
        return f"greater than {bounds[1:].strip()}"
    return f"in {bounds}"


_INT = (int,)
_FLOAT = (float, int)
_PAIR = (int, list, tuple)

# The paper's recipes (Section 3 and Appendix B). Config values win.
RECIPES = {
    # Adam(W) 0.9/0.999, 10k steps of linear warmup then linear decay,
    # global-norm clipping at 1, weight decay on kernels only.
    "pretrain": dict(
        optimizer="adamw", beta_1=0.9, beta_2=0.999, schedule="linear",
        warmup_steps=10_000, grad_clip_norm=1.0, weight_decay=0.1,
        eval_crop="resize-crop",
    ),
    # SGD momentum 0.9, cosine decay with linear warmup, clipping at 1, no
    # weight decay, a fresh zero head.
    "finetune": dict(
        optimizer="sgd", momentum=0.9, schedule="cosine", warmup_steps=500,
        grad_clip_norm=1.0, weight_decay=0.0, reset_head=True, crop_area=[0.05, 1.0],
    ),
}


SCHEMA = (
    # Data.
    Key("dataset", "digits", (str,), '"digits" (embedded), a tfds name, or "image_folder"'),
    Key("data_dir", None, (str, NONE), "tfds data_dir, or the image folder's root"),
    Key("download", False, (bool,), "let tfds download missing data"),
    Key("damaged_images", "error", (str,), "image folders: a file that does not decode stops the run "
        "naming it (error), or is left out with a warning (skip: every file is decoded once first)",
        choices=DAMAGED_IMAGES),
    Key("train_split", "train", (str,), "the training split"),
    Key("eval_split", "test", (str, NONE), "the evaluation split; None: no evaluation"),
    Key("image_size", 224, _PAIR, "int or [height, width]; the digits are always 8x8"),
    Key("channels", 3, _INT, "image channels", positive=True),
    Key("crop_area", [0.05, 1.0], (list, tuple), "the Inception crop's area range"),
    Key("flip", True, (bool,), "random horizontal flips"),
    Key("eval_crop", "resize-crop", (str,), "how evaluation images are cropped", choices=EVAL_CROPS),
    Key("shift_pixels", 1, _INT, "digits: the largest random shift", bounds=">= 0"),
    Key("shuffle_buffer", 50_000, _INT, "examples in the shuffle buffer", positive=True),
    # Augmentation (keras_mixer.augment).
    Key("randaugment_layers", 2, _INT, "RandAugment ops per image", positive=True),
    Key("randaugment_magnitude", 0.0, _FLOAT, "the paper's RandAugment m; 0 is off", bounds=">= 0"),
    Key("mixup", 0.0, _FLOAT, "MixUp's Beta(p, p); 0 is off", bounds=">= 0"),
    Key("cutmix", 0.0, _FLOAT, "CutMix's Beta(p, p); 0 is off", bounds=">= 0"),
    Key("augment_impl", "keras_cv", (str,), "augmentation implementation", choices=AUGMENT_IMPLEMENTATIONS),
    Key("mix_on", "device", (str,), "where MixUp/CutMix run: in the train step (device) or in tf.data (host, "
        "with augment_impl's layers)", choices=MIX_ON),
    # Model.
    Key("variant", None, (str, NONE), 'a paper variant, e.g. "B/16"; None: `model` gives every argument'),
    Key("model", {}, (dict,), "MLPMixer arguments, over the variant's (model.<key>, see below)"),
    Key("init_checkpoint", None, (str, NONE), "an official .npz path or released name to start from"),
    Key("reset_head", False, (bool,), "with init_checkpoint: start from a zero head"),
    Key("lora_rank", None, (int, NONE), "LoRA adapters of this rank on the MLPs (all else frozen but the head; "
        "lora.npz saved); None: every weight trains", positive=True),
    # Recipe.
    Key("recipe", None, (str, NONE), "the paper's recipe, under the config's own values", choices=tuple(RECIPES)),
    Key("optimizer", "adamw", (str,), "the optimizer", choices=("adamw", "sgd")),
    Key("learning_rate", 1e-3, _FLOAT, "the peak learning rate", bounds="> 0"),
    Key("schedule", "cosine", (str,), "warmup, then cosine or linear decay to 0", choices=("cosine", "linear")),
    Key("warmup_steps", None, (int, NONE), "updates of linear warmup; None: warmup_fraction of the run", bounds=">= 0"),
    Key("warmup_fraction", 0.0, _FLOAT, "the share of the run spent in warmup", bounds="[0, 1)"),
    Key("weight_decay", 0.0, _FLOAT, "Keras' decay on kernels, times the learning rate", bounds=">= 0"),
    Key("beta_1", 0.9, _FLOAT, "AdamW's beta_1", bounds="[0, 1)"),
    Key("beta_2", 0.999, _FLOAT, "AdamW's beta_2", bounds="[0, 1)"),
    Key("momentum", 0.9, _FLOAT, "SGD's momentum", bounds="[0, 1)"),
    Key("grad_clip_norm", 1.0, (float, int, NONE), "global gradient-norm clipping; None: none", bounds="> 0"),
    Key("grad_accum_steps", AUTO, _INT, "micro-batches per update; auto: the fewest that fit the device",
        auto=True, positive=True),
    Key("ema_momentum", None, (float, int, NONE), "e.g. 0.9999: evaluate and save the EMA weights",
        bounds="[0, 1)"),
    Key("mixed_precision", AUTO, (bool,), 'True: "mixed_bfloat16"; auto: on TPU and GPU', auto=True),
    Key("loss", "softmax_xent", (str,), "the loss", choices=("softmax_xent", "sigmoid_xent")),
    Key("label_smoothing", 0.0, _FLOAT, "softmax_xent's label smoothing", bounds="[0, 1)"),
    # Length and bookkeeping.
    Key("epochs", 1, _INT, "passes over the training split", positive=True),
    Key("train_steps", None, (int, NONE), "optimizer updates in all; overrides epochs", positive=True),
    Key("steps_per_epoch", None, (int, NONE), "updates per epoch; None: one pass over the training split",
        positive=True),
    Key("batch_size", 512, _INT, "the global batch, per optimizer update", positive=True),
    Key("eval_batch_size", None, (int, NONE), "None: min(batch_size, 512)", positive=True),
    Key("steps_per_execution", AUTO, _INT, "steps per compiled call; auto: up to 32 on TPU, else 1",
        auto=True, positive=True),
    Key("checkpoint_every", 1000, _INT, "updates between states (also every epoch and on SIGTERM); 0: epoch ends only",
        bounds=">= 0"),
    Key("keep_checkpoints", 2, _INT, "states kept", positive=True),
    Key("seed", 0, _INT, "data order, augmentation and initialisation"),
)
KEYS = {key.name: key for key in SCHEMA}
DEFAULTS = {key.name: key.default for key in SCHEMA}

# `MLPMixer` arguments a config may set under `model`. The image shape and
# the class count come from the data, the dtype from `mixed_precision`.
MODEL_KEYS = {key.name: key for key in (
    Key("patch_size", 16, _PAIR, "patch side, or [height, width]"),
    Key("num_blocks", 12, _INT, "Mixer blocks", positive=True),
    Key("hidden_dim", 768, _INT, "channels per token", positive=True),
    Key("tokens_mlp_dim", 384, _INT, "the token-mixing MLP's width", positive=True),
    Key("channels_mlp_dim", 3072, _INT, "the channel-mixing MLP's width", positive=True),
    Key("dropout_rate", 0.0, _FLOAT, "dropout before the head", bounds="[0, 1)"),
    Key("stochastic_depth_rate", 0.0, _FLOAT, "drop-path rate of the last block (linear in depth)",
        bounds="[0, 1)"),
    Key("layer_norm_epsilon", 1e-6, _FLOAT, "LayerNorm's epsilon", bounds="> 0"),
    Key("gelu_approximate", True, (bool,), "tanh GELU (official); False: exact (timm)"),
    Key("include_preprocessing", True, (bool,), "the model rescales [0, 255] pixels itself"),
    Key("pixel_mean", None, (list, NONE), "per-channel mean in [0, 1] units; None: the official 0.5"),
    Key("pixel_std", None, (list, NONE), "per-channel std in [0, 1] units; None: the official 0.5"),
    Key("seed", None, (int, NONE), "initialisation and dropout; None: the config's seed"),
    Key("remat", False, (bool,), "recompute blocks in the backward pass to save memory"),
    Key("name", "mlp_mixer", (str,), "the model's name"),
)}



def _unknown_keys_error(unknown, model=False):
    if model:
        return ValueError(
            f"Unknown model key(s) {sorted(f'model.{k}' for k in unknown)}. Valid: "
            f"{', '.join(f'model.{k}' for k in MODEL_KEYS)}."
        )
    return ValueError(f"Unknown config key(s) {sorted(unknown)}. Valid keys: {', '.join(sorted(KEYS))}.")


def check_model_arguments(model):
    """Checks a config's `model` dict: known `MLPMixer` arguments of the right types."""
    unknown = set(model) - set(MODEL_KEYS)
    if unknown:
        raise _unknown_keys_error(unknown, model=True)
    for name, value in model.items():
        MODEL_KEYS[name].check(value, f"model.{name}")


def resolve(config):
    """Returns the full config: the defaults, then the recipe's values, then `config`'s.

    Raises:
        ValueError: on an unknown key (`model.*` included), a wrongly typed
            value or a bad choice.
    """
    unknown = set(config) - set(KEYS)
    if unknown:
        raise _unknown_keys_error(unknown)
    recipe = config.get("recipe")
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}. Valid: {', '.join(RECIPES)}.")
    resolved = {**DEFAULTS, **RECIPES.get(recipe, {}), **config}
    for name, value in resolved.items():
        KEYS[name].check(value)
    resolved["model"] = dict(resolved["model"])
    check_model_arguments(resolved["model"])
    _check_pairs(resolved)
    accum = resolved["grad_accum_steps"]
    if accum != AUTO and resolved["batch_size"] % accum:
        raise ValueError(
            f"`batch_size` {resolved['batch_size']} must be a multiple of "
            f"`grad_accum_steps` {accum}: each update averages grad_accum_steps "
            "equal micro-batches."
        )
    return resolved


def _check_pairs(config):
    size = config["image_size"]
    sides = [size] if isinstance(size, int) else list(size)
    if len(sides) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides):
        raise ValueError(f"`image_size` must be a positive int or [height, width], got {size!r}.")
    area = config["crop_area"]
    if (len(area) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in area)
            or not 0 < area[0] <= area[1] <= 1):
        raise ValueError(
            f"`crop_area` must be [min, max] fractions of the image with 0 < min <= max <= 1, got {area!r}."
        )


def check_resolved(config):
    """Raises a `ValueError` unless `config` is a resolved one (every key present).

    Library functions below the trainer (`data.make_datasets`,
    `optim.compile_model`, ...) take resolved configs: the config is
    resolved once, where it enters, and checked here rather than failing
    with a `KeyError` deep inside.
    """
    missing = set(KEYS) - set(config)
    if missing:
        raise ValueError(
            f"Not a resolved config (no {', '.join(sorted(missing)[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): pass keras_mixer.config.resolve(config)."
        )
    return config


def image_shape(config):
    """(height, width, channels) of the config's `image_size` and `channels`.
    A source with a fixed shape (the digits) has its own: `data.Source.image_shape`."""
    size = config["image_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (height, width, config["channels"])


def parse_overrides(items):
    """Parses `--set key=value` strings into a dict.

    Values are Python literals (`0.1`, `True`, `None`, `[0.08, 1.0]`,
    `'B/16'`); anything else is taken as a string. `model.key=value` sets
    one MLPMixer argument. Unknown keys are errors here already.
    """
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if key.startswith("model."):
            name = key[len("model."):]
            if name not in MODEL_KEYS:
                raise _unknown_keys_error({name}, model=True)
            overrides.setdefault("model", {})[name] = value
            continue
        if key not in KEYS:
            raise _unknown_keys_error({key})
        overrides[key] = value
    return overrides


def apply_overrides(config, overrides):
    """`config` with `overrides` applied (`model` entries are merged)."""
    config = dict(config)
    for key, value in overrides.items():
        if key == "model":
            config["model"] = {**config.get("model", {}), **value}
        else:
            config[key] = value
    return config


def describe():
    """The schema as text: one line per key (`train.py --help` prints it)."""
    def line(prefix, key):
        default = "auto" if key.default == AUTO else repr(key.default)
        choices = f" [{'|'.join(key.choices)}]" if key.choices else ""
        return f"  {prefix}{key.name:<{24 - len(prefix)}} {default:<14} {key.doc}{choices}"

    lines = ["config keys (--set KEY=VALUE; default, meaning):"]
    lines += [line("", key) for key in SCHEMA]
    lines.append("model keys (--set model.KEY=VALUE; MLPMixer arguments, over the variant's):")
    lines += [line("model.", key) for key in MODEL_KEYS.values()]
    return "\n".join(lines)


# --- Configs by name -------------------------------------------------------------

_PACKAGE = "keras_mixer.configs"


def available():
    """Names of the experiment configs shipped in `keras_mixer/configs/`."""
    spec = importlib.util.find_spec(_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations))


def load(name):
    """The config dict of the experiment `name` (e.g. "digits") or of a `.py`
    file whose module defines `get_config()`."""
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
    return importlib.import_module(f"{_PACKAGE}.{name}").get_config()
