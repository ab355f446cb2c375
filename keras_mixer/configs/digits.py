"""A small Mixer on scikit-learn's embedded digits (8x8 grey, 10 classes).

Run: `python train.py` (this is the default config), on any backend
(`KERAS_BACKEND=jax|tensorflow|torch`). On 2 CPU cores it reaches about
98.5% test accuracy (360 held-out images) in 1 to 2 minutes; the README
records measured figures per backend.

Patch 2 gives 16 tokens of 4 pixels. Random shifts of up to one pixel and
label smoothing stand in for the paper's heavier regularisation, which a
1,437-image training set does not need.
"""


def get_config():
    return dict(
        dataset="digits",
        model=dict(
            patch_size=2,
            num_blocks=4,
            hidden_dim=64,
            tokens_mlp_dim=64,
            channels_mlp_dim=256,
            dropout_rate=0.0,
            stochastic_depth_rate=0.0,
        ),
        epochs=40,
        batch_size=32,
        learning_rate=3e-3,
        warmup_fraction=0.1,
        weight_decay=0.05,
        grad_clip_norm=1.0,
        label_smoothing=0.1,
        shift_pixels=1,
        seed=0,
    )
