"""Experiment configs: one Python file per experiment, each with `get_config()`.

Configs are plain data (dicts); they never import the trainer. Load one
with `keras_mixer.config.load(name)`; keys not set take the schema's
defaults and the named `recipe`'s values (`keras_mixer.config`).
"""
