"""The layers' arithmetic as direct PyTorch calls, for eager PyTorch.

On the PyTorch backend Keras runs eagerly: every `layer(x)` is Python
around the layer's ops (about 65 us for an identity layer on 2 CPU
cores, 150 us for a `LayerNormalization`), and every `keras.ops` call
checks its arguments for symbolic tensors before it reaches PyTorch
(about 40 us for a `reshape`). A Mixer block is four sublayer calls and
a dozen ops around five PyTorch kernels, so on a small model that Python
was a measurable share of inference: one 32x32 image took 20 ms through
keras-mixer and 8 ms through the same math in `torch.nn.functional`, and
a batch of 32 ran at 0.95x (`benchmarks/bench_model.py`).

The functions here compute exactly what the Keras path computes, with
the same PyTorch kernels in the same order, so the numbers are identical
(tests/test_torch_eager.py compares them bit for bit). They read each
layer's own variables through `.value`, which applies the enclosing
layer's autocast scope (mixed precision) and any stateless scope, as the
layers' own `call`s read them.

Where each one applies:
- `dense`: any call of a built float `Dense` with a bias (not quantized,
  no LoRA: those layers compute their kernels in `Dense.call`).
- `layer_norm`: `LayerNorm.call` on PyTorch (Keras' own call reaches the
  same `F.layer_norm` through `ops.layer_normalization`).
- `mixer_block`: `MixerBlock.call` at inference, and in training where
  its dropout and stochastic depth rates are 0 and it is not
  rematerialised (`applies_to_mixer_block`): the same kernels in the same
  order, so the outputs and, through autograd, the gradients are the
  Keras path's. A block that draws dropout or stochastic depth masks, or
  recomputes itself in the backward pass, keeps the Keras path with its
  sublayer calls, so those behave as Keras defines them.

Only `keras_mixer.layers` calls these, and only on the PyTorch backend;
this module imports PyTorch when a function runs, never at import.
"""


def _value(variable):
    return None if variable is None else variable.value


def plain_dense(layer):
    """Whether `dense` computes `layer`: float, with a bias, no quantization, no LoRA."""
    return layer.quantization_mode is None and not layer.lora_enabled and layer.bias is not None


def dense(layer, x):
    """`layer(x)` for a `plain_dense` layer and a 2D `x`: one `torch.addmm`.

    The bias is added inside the matmul, as `torch.nn.Linear` computes it.
    `Dense` adds its bias as an op of its own (`keras.ops` has no
    matmul-plus-bias), and in eager PyTorch that add is a pass over every
    activation: it took a quarter of the forward pass's CPU time (small
    config, `torch.profiler`).
    """
    import torch

    return torch.addmm(layer.bias.value, x, layer.kernel.value)


def layer_norm(layer, x):
    """`LayerNorm.call` (last axis, not RMS): statistics in at least float32,
    the result in the layer's compute dtype, as Keras computes it.

    A bfloat16 `x` on the CPU goes to PyTorch's mixed-dtype kernel as it
    is: it reads bfloat16, computes in float32 with the float32 `gamma`
    and `beta`, and writes bfloat16, where casting `x` to float32 first
    and the result back took two more passes over the activations each
    way (1.5x the time of a LayerNorm's forward and backward,
    benchmarks/torch_bf16_profile.py). The two differ in the last bit of
    about one value in 10^5.
    """
    import torch

    mixed_dtype_kernel = x.dtype == torch.bfloat16 and x.device.type == "cpu"
    if x.dtype in (torch.float16, torch.bfloat16) and not mixed_dtype_kernel:
        x = x.float()
    y = torch.nn.functional.layer_norm(
        x, x.shape[-1:], _value(layer.gamma), _value(layer.beta), layer.epsilon
    )
    return y.to(getattr(torch, layer.compute_dtype))


def _mlp(block, x):
    """`MLPBlock.call` at inference on a 2D `x` (dropout is the identity)."""
    import torch

    x = dense(block.dense_0, x)
    x = torch.nn.functional.gelu(x, approximate="tanh" if block.gelu_approximate else "none")
    return dense(block.dense_1, x)


def applies_to_mixer_block(block, training):
    """Whether `mixer_block` computes this call of `block`.

    Plain Dense layers and non-RMS LayerNorms, and a call whose arithmetic
    is the Keras path's: at inference (dropout and stochastic depth are the
    identity), or in training where both rates are 0; and no `remat` while
    gradients are on (the Keras path recomputes the block in the backward
    pass instead of keeping its activations). Autograd then differentiates
    the same kernels, so the gradients are the Keras path's too.
    """
    import torch

    random = block.stochastic_depth_rate > 0 or any(
        mlp.dropout_rate > 0 for mlp in (block.token_mixing, block.channel_mixing))
    return (
        not (training and random)
        and not (block.remat and torch.is_grad_enabled())
        and all(plain_dense(d) for mlp in (block.token_mixing, block.channel_mixing)
                for d in (mlp.dense_0, mlp.dense_1))
        and not (block.token_norm.rms_scaling or block.channel_norm.rms_scaling)
    )


def mixer_block(block, x):
    """`MixerBlock.call(x, training=False)`: the same kernels as the Keras
    path (LayerNorm, transpose, reshape, addmm, GELU, addmm, ...), without
    its four sublayer calls and its `keras.ops` wrappers."""
    batch, tokens, channels = x.shape
    y = layer_norm(block.token_norm, x).transpose(1, 2).reshape(batch * channels, tokens)
    y = _mlp(block.token_mixing, y).reshape(batch, channels, tokens).transpose(1, 2)
    x = x + y
    y = layer_norm(block.channel_norm, x).reshape(batch * tokens, channels)
    return x + _mlp(block.channel_mixing, y).reshape(batch, tokens, channels)
