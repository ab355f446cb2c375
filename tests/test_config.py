"""The config schema: defaults, types, choices, recipes, --set parsing, configs by name."""

import inspect

import pytest

from keras_mixer import augment
from keras_mixer import config as config_lib
from keras_mixer import data
from keras_mixer import training
from keras_mixer.model import MLPMixer
from base import tiny_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epoch": 3}, r"Unknown config key\(s\) \['epoch'\]. Valid keys: .*batch_size"),
        ({"dataset": "mnist_typo"}, r"Unknown tensorflow-datasets name 'mnist_typo'"),
        ({"batch_size": 0}, r"`batch_size` must be a positive integer"),
        ({"batch_size": "64"}, r"`batch_size` must be int, got '64'"),
        ({"optimizer": "lamb"}, r"`optimizer` must be one of adamw, sgd"),
        ({"recipe": "distill"}, r"Unknown recipe 'distill'. Valid: pretrain, finetune"),
        ({"model": {"droput_rate": 0.5}}, r"Unknown model key\(s\) \['model.droput_rate'\]. Valid: model.patch_size"),
        ({"model": {"num_blocks": "4"}}, r"`model.num_blocks` must be int, got '4'"),
        ({"mixed_precision": "yes"}, r"`mixed_precision` must be 'auto' or bool, got 'yes'"),
    ],
)
def test_bad_config_is_rejected(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        training.train(tiny_config(**overrides), tmp_path, verbose=0)


def test_overrides_parse_literals_and_model_keys():
    got = config_lib.parse_overrides(
        ["epochs=3", "learning_rate=3e-4", "variant=B/16", "crop_area=[0.08, 1.0]",
         "ema_momentum=None", "flip=False", "model.dropout_rate=0.1"]
    )
    assert got == {"epochs": 3, "learning_rate": 3e-4, "variant": "B/16",
                   "crop_area": [0.08, 1.0], "ema_momentum": None, "flip": False,
                   "model": {"dropout_rate": 0.1}}
    config = config_lib.apply_overrides(config_lib.load("digits"), got)
    assert config["model"]["dropout_rate"] == 0.1 and config["model"]["num_blocks"] == 4
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['epoc'\]"):
        config_lib.parse_overrides(["epoc=3"])
    with pytest.raises(ValueError, match="expects key=value"):
        config_lib.parse_overrides(["epochs"])


def test_recipes_resolve_under_config_values():
    config = config_lib.resolve(config_lib.load("imagenet1k_pretrain"))
    assert (config["optimizer"], config["schedule"], config["warmup_steps"]) == ("adamw", "linear", 10_000)
    assert (config["beta_2"], config["grad_clip_norm"], config["weight_decay"]) == (0.999, 1.0, 0.1)
    finetune = config_lib.resolve(config_lib.load("cifar10_finetune"))
    assert (finetune["optimizer"], finetune["momentum"], finetune["weight_decay"]) == ("sgd", 0.9, 0.0)
    assert finetune["reset_head"] and finetune["schedule"] == "cosine"


def test_unknown_config_name_lists_available():
    with pytest.raises(ValueError, match=r"Unknown config 'imagenet'. Available configs: cifar10_finetune, digits"):
        config_lib.load("imagenet")


def test_model_keys_are_the_mlpmixer_arguments_a_config_may_set():
    """config.py imports no Keras, so its table of MLPMixer arguments is
    checked here against the real signature: the data sets image_shape and
    num_classes, mixed_precision sets dtype."""
    parameters = inspect.signature(MLPMixer.__init__).parameters
    settable = [p for p in parameters if p not in ("self", "kwargs", "image_shape", "num_classes", "dtype")]
    assert list(config_lib.MODEL_KEYS) == settable
    for name, key in config_lib.MODEL_KEYS.items():
        assert key.default == parameters[name].default, name


def test_choices_are_the_ones_the_data_code_takes():
    assert config_lib.EVAL_CROPS == data.EVAL_CROPS
    assert config_lib.AUGMENT_IMPLEMENTATIONS == augment.IMPLEMENTATIONS


def test_every_shipped_config_resolves():
    for name in config_lib.available():
        resolved = config_lib.resolve(config_lib.load(name))
        assert set(resolved) == set(config_lib.KEYS), name


def test_a_model_key_typo_fails_at_parse_time_and_in_a_run(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown model key\(s\) \['model.droput_rate'\]"):
        config_lib.parse_overrides(["model.droput_rate=0.5"])
    with pytest.raises(ValueError, match=r"Unknown model key"):
        training.train(tiny_config(model={"droput_rate": 0.5}), tmp_path, verbose=0)
    assert not (tmp_path / "config.json").exists()


def test_describe_lists_every_key_with_its_default():
    text = config_lib.describe()
    for key in config_lib.SCHEMA:
        line = next(line for line in text.splitlines() if line.split()[:1] == [key.name])
        assert ("auto" if key.default == "auto" else repr(key.default)) in line
    assert "model.droput_rate" not in text and "model.dropout_rate" in text


def test_load_a_config_file_and_clear_errors(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def get_config():\n    return dict(epochs=3)\n")
    assert config_lib.load(str(path)) == {"epochs": 3}
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        config_lib.load(str(tmp_path / "empty.py"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config_lib.load(str(tmp_path / "nowhere.py"))


def test_library_functions_take_resolved_configs_and_say_so():
    from keras_mixer import optim

    raw = config_lib.load("digits")
    with pytest.raises(ValueError, match=r"Not a resolved config \(no .*\): pass keras_mixer.config.resolve"):
        data.make_datasets(raw, 32)
    with pytest.raises(ValueError, match="Not a resolved config"):
        optim.compile_model(MLPMixer(image_shape=(8, 8, 1), patch_size=4, num_blocks=1, hidden_dim=4,
                                     tokens_mlp_dim=2, channels_mlp_dim=4, num_classes=10), raw, 10)
    resolved = config_lib.resolve(raw)
    assert config_lib.check_resolved(resolved) is resolved
    assert config_lib.resolve(resolved) == resolved  # resolving is idempotent
