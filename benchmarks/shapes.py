"""The benchmarks' model configs and their arithmetic, in one place.

Configs use `MLPMixer`'s argument names (plus the benchmark's `batch`), so
`MLPMixer(**arch(cfg))` builds one. FLOPs are counted analytically, per
image, multiply-adds as 2: stem 2*T*(ph*pw*c)*C; per block, token mixing
2*C*(2*T*D_S) and channel mixing 2*T*(2*C*D_C); head 2*C*classes, with T
tokens, C `hidden_dim`, D_S `tokens_mlp_dim`, D_C `channels_mlp_dim`.
LayerNorm, GELU and the residual adds are left out (under 1% here). A
training step counts 3x the forward FLOPs (forward, then gradients of
activations and of weights). Parameter counts are the library's
(`keras_mixer.plan.training_memory`, checked against Keras by the
tests), not a second formula.
"""

CONFIGS = {
    "small": dict(image_shape=(32, 32, 3), patch_size=4, num_blocks=8, hidden_dim=256,
                  tokens_mlp_dim=128, channels_mlp_dim=1024, num_classes=10, batch=32),
    "s16": dict(image_shape=(224, 224, 3), patch_size=16, num_blocks=8, hidden_dim=512,
                tokens_mlp_dim=256, channels_mlp_dim=2048, num_classes=1000, batch=8),
    "b16": dict(image_shape=(224, 224, 3), patch_size=16, num_blocks=12, hidden_dim=768,
                tokens_mlp_dim=384, channels_mlp_dim=3072, num_classes=1000, batch=8),
}


def arch(cfg):
    """The `MLPMixer` arguments of a config (without the benchmark's batch)."""
    return {k: v for k, v in cfg.items() if k != "batch"}


def num_tokens(cfg):
    height, width = cfg["image_shape"][:2]
    return (height // cfg["patch_size"]) * (width // cfg["patch_size"])


def forward_flops(cfg):
    """FLOPs of one image's forward pass (see the module docstring)."""
    tokens, c, p = num_tokens(cfg), cfg["hidden_dim"], cfg["patch_size"]
    stem = 2 * tokens * (p * p * cfg["image_shape"][2]) * c
    block = 2 * c * (2 * tokens * cfg["tokens_mlp_dim"]) + 2 * tokens * (2 * c * cfg["channels_mlp_dim"])
    return stem + cfg["num_blocks"] * block + 2 * c * cfg["num_classes"]


def training_gemms(cfg):
    """(m, k, n, count) of every matmul in a training step of a config at its batch."""
    batch, tokens = cfg["batch"], num_tokens(cfg)
    c, blocks, p = cfg["hidden_dim"], cfg["num_blocks"], cfg["patch_size"]
    ds, dc = cfg["tokens_mlp_dim"], cfg["channels_mlp_dim"]
    forward = [  # (rows, inputs, outputs, times per step)
        (batch * tokens, p * p * cfg["image_shape"][2], c, 1),  # stem (a strided conv = a GEMM)
        (batch * c, tokens, ds, blocks),                        # token mixing, Dense_0
        (batch * c, ds, tokens, blocks),                        # token mixing, Dense_1
        (batch * tokens, c, dc, blocks),                        # channel mixing, Dense_0
        (batch * tokens, dc, c, blocks),                        # channel mixing, Dense_1
        (batch, c, cfg["num_classes"], 1),                      # head
    ]
    gemms = []
    for m, k, n, count in forward:
        # y = x @ w; dx = dy @ w.T; dw = x.T @ dy
        gemms += [(m, k, n, count), (m, n, k, count), (k, m, n, count)]
    return gemms


def parameter_count(cfg):
    from keras_mixer import plan as plan_lib

    return int(plan_lib.training_memory(arch(cfg), 1)["params"])
