"""FP8 linear layers: one switch for pretraining and inference (bf16 stays the default).

:func:`to_fp8` swaps the ``nn.Linear`` layers of a BERT encoder (Q/K/V, attention output,
feed-forward in and out) for :class:`FP8Linear`, which runs its matmul through
``torch._scaled_mm`` in float8 e4m3 with dynamic per-tensor scales (amax / 448, computed
each call, so no scale history to tune or checkpoint). The backward pass stays in the
input's precision (bf16 on GPU): gradients of a masked-LM loss are small and e5m2 gradients
would need loss-scaling machinery; FP8 forward already carries most of the speed-up of the
feed-forward and projection matmuls. Embeddings, LayerNorms, the MLM head (its decoder is
tied to the embeddings) and attention's softmax stay as they are.

Why ``torch._scaled_mm`` rather than torchao's float8 training: it is part of torch (the GPU
machines have torch, not torchao), and it is all that a per-tensor dynamic recipe needs.

Weights stay the module's own ``weight`` parameter (same state-dict keys), so an FP8 run
saves a plain ``BertForMaskedLM`` checkpoint and :func:`from_fp8` undoes the swap.

Hardware: FP8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper,
Blackwell). Elsewhere :func:`to_fp8` raises :class:`FP8Unsupported` naming the device,
except on CPU with ``allow_cpu=True``, where torch emulates the same arithmetic (slowly):
that is how the CPU tests and ``bench/gpu.sh --cpu-dry-run`` check the numerics.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["FP8Linear", "FP8Unsupported", "fp8_unsupported_reason", "from_fp8", "to_fp8"]

E4M3_MAX = 448.0
MIN_CAPABILITY = (8, 9)
#: Linear layers of a Hugging Face BERT encoder that become FP8 (by module name suffix).
ENCODER_LINEARS = ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                   "output.dense")  # fmt: skip


class FP8Unsupported(RuntimeError):
    """FP8 was asked for on a device that has no FP8 matmul."""


def fp8_unsupported_reason(device: torch.device | str, *, allow_cpu: bool = False) -> str | None:
    """Why ``device`` cannot run :class:`FP8Linear` (None when it can)."""
    device = torch.device(device)
    if device.type == "cpu":
        if allow_cpu:
            return None
        return ("FP8 needs an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper or newer); "
                "this run is on the CPU. Set fp8 off (bf16 is the default)")  # fmt: skip
    if device.type != "cuda":
        return f"FP8 needs an NVIDIA GPU of compute capability >= 8.9; this run is on {device}"
    name = torch.cuda.get_device_name(device)
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"FP8 needs compute capability >= 8.9; {name} has {capability[0]}.{capability[1]}"
                ". Set fp8 off (bf16 is the default) or run on an Ada, Hopper or newer GPU")  # fmt: skip
    return None


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` in float8 e4m3 with one dynamic scale: x ~= q.float() * scale."""
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


class _FP8Matmul(torch.autograd.Function):
    """y = x @ w.T in FP8 (forward); gradients in the input's precision."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        qx, sx = _quantize(x2)
        qw, sw = _quantize(weight)
        # _scaled_mm wants the first operand row-major and the second column-major
        out = torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw, out_dtype=x.dtype)
        return out.reshape(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = (g2 @ weight.to(g2.dtype)).reshape(x.shape)
        grad_w = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(weight.dtype)
        return grad_x, grad_w


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose matmul runs in FP8 (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _FP8Matmul.apply(x, self.weight)
        return out + self.bias.to(out.dtype) if self.bias is not None else out


def _swap_encoder_linears(model: nn.Module) -> int:
    n = 0
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or ".encoder." not in f".{name}":
            continue
        # _scaled_mm needs both dimensions divisible by 16
        if name.endswith(ENCODER_LINEARS) and not (
            module.in_features % 16 or module.out_features % 16
        ):
            module.__class__ = FP8Linear  # same parameters and keys, an FP8 forward
            n += 1
    return n


def to_fp8(model: nn.Module, *, allow_cpu: bool = False) -> nn.Module:
    """Run the encoder's linear layers of ``model`` in FP8, in place; returns ``model``.

    Raises :class:`FP8Unsupported` naming the device when it has no FP8 matmul (see the
    module docstring; ``allow_cpu`` lets the CPU emulate it for tests)."""
    device = next(model.parameters()).device
    reason = fp8_unsupported_reason(device, allow_cpu=allow_cpu)
    if reason is not None:
        raise FP8Unsupported(reason)
    n = _swap_encoder_linears(model)
    logger.info("fp8: %d linear layers of the encoder run in float8 e4m3", n)
    return model


def from_fp8(model: nn.Module) -> nn.Module:
    """Undo :func:`to_fp8` in place (plain ``nn.Linear`` again); returns ``model``."""
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module.__class__ = nn.Linear
    return model
