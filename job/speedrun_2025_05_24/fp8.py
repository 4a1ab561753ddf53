"""The output layer's matmul in FP8, with the record's fixed scales (no amax bookkeeping): inputs and weights as
float8_e4m3fn, the incoming gradient as float8_e5m2, results in bf16 (the weight's gradient in fp32).

A custom op, so torch.compile treats it as one opaque call with a known output shape (its fake implementation)
while the scaled matmuls inside are compiled on their own. Used only where the GPU has FP8 tensor cores (compute
capability 8.9 and up: Ada, Hopper, Blackwell); elsewhere the layer is a plain bf16 matmul (job/speedrun_2025_05_24/gpt.py
says which, and the run's first log line too).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def fp8_supported(device: torch.device | str) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@functools.cache
def compiled(fn):
    """fn compiled on first use, not at import: importing the recipes (every config parse does) must not set up
    Inductor, whose cache directory the trainer chooses first (job.train.main). Called only inside the custom ops,
    which torch.compile does not trace into."""
    return torch.compile(fn)


def _scale(t: Tensor, s: float) -> Tensor:
    return t.new_tensor(s, dtype=torch.float32)


def _forward(x: Tensor, w: Tensor, x_s: float, w_s: float):
    x8 = x.div(x_s).to(torch.float8_e4m3fn)
    w8 = w.div(w_s).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x8, w8.T, out_dtype=torch.bfloat16, scale_a=_scale(x, x_s), scale_b=_scale(x, w_s),
                           use_fast_accum=True)
    return out, x8, w8


def _backward(g: Tensor, x8: Tensor, w8: Tensor, x_s: float, w_s: float, g_s: float):
    g8 = g.div(g_s).to(torch.float8_e5m2)
    # _scaled_mm wants its second operand column-major: .T.contiguous().T lays it out so.
    grad_x = torch._scaled_mm(g8, w8.T.contiguous().T, out_dtype=torch.bfloat16, scale_a=_scale(g, g_s),
                              scale_b=_scale(g, w_s), use_fast_accum=False)
    grad_w = torch._scaled_mm(x8.T.contiguous(), g8.T.contiguous().T, out_dtype=torch.float32, scale_a=_scale(g, x_s),
                              scale_b=_scale(g, g_s), use_fast_accum=False).T
    return grad_x, grad_w


@torch.library.custom_op("nanogpt_cloud::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """x @ w.T in FP8 (x: (N, in), w: (out, in), both contiguous); also returns the FP8 copies kept for backward."""
    return compiled(_forward)(x, w, x_s, w_s)


@fp8_mm.register_fake
def _(x: Tensor, w: Tensor, *_):
    return x @ w.T, x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)


@torch.library.custom_op("nanogpt_cloud::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(g: Tensor, x8: Tensor, w8: Tensor, x_s: float, w_s: float, grad_s: float) -> tuple[Tensor, Tensor]:
    return compiled(_backward)(g, x8, w8, x_s, w_s, grad_s)


@fp8_mm_backward.register_fake
def _(g: Tensor, x8: Tensor, w8: Tensor, *_):
    return x8.to(torch.bfloat16), w8.T.contiguous().T.to(torch.float32)


def _setup(ctx, inputs, output):
    *_, x_s, w_s, grad_s = inputs
    _, x8, w8 = output
    ctx.save_for_backward(x8, w8)
    ctx.scales = x_s, w_s, grad_s
    ctx.set_materialize_grads(False)


def _grad(ctx, grad_out: Tensor, *_):
    x8, w8 = ctx.saved_tensors
    grad_x, grad_w = torch.ops.nanogpt_cloud.fp8_mm_backward(grad_out, x8, w8, *ctx.scales)
    return grad_x, grad_w, None, None, None


fp8_mm.register_autograd(_grad, setup_context=_setup)
