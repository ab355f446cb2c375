"""A small Mixer on scikit-learn's embedded digits (8x8 grey, 10 classes).

Run: `python train.py` (this is the default config), on any backend
(`KERAS_BACKEND=jax|tensorflow|torch`). On 2 CPU cores it reached 98.3% to
99.2% test accuracy (360 held-out images) in 1.5 to 2.5 minutes depending on
the backend; the README records the measured figures.

Patch 2 gives 16 tokens of 4 pixels. Random shifts of up to one pixel,
label smoothing and a strong weight decay stand in for the paper's heavier
regularisation. In a small sweep (seeds 0 and 1), 60 epochs beat 40, weight
decay 0.2 beat 0.05, and stochastic depth 0.1 or dropout 0.1 hurt.
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
        epochs=60,
        batch_size=32,
        eval_batch_size=512,  # the 360 test images in one batch: cheap per-epoch validation
        learning_rate=3e-3,
        warmup_fraction=0.1,
        weight_decay=0.2,
        grad_clip_norm=1.0,
        label_smoothing=0.1,
        shift_pixels=1,
        seed=0,
    )
