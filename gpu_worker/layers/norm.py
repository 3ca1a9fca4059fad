"""RMSNorm, optionally fused with the residual add before it (one C call on the CPU when the kernels load)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpu_worker.kernels.cpu_ops import CpuKernels


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, computed in float32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.kernels: CpuKernels | None = None  # set by LlamaForCausalLM.prepare_for_inference

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalize ``x``; with ``residual``, normalize ``x + residual`` and also return that sum.

        The fused kernel writes that sum into ``residual`` in place (the
        residual stream is the layers' own); the torch path makes a new one.
        """
        if self.kernels is not None and x.dim() == 2:
            normed = self.kernels.rms_norm(x, self.weight, self.eps, residual)
            return normed if residual is None else (normed, residual)
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32:
            normed = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        else:
            normed = self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)
        return normed if residual is None else (normed, residual)
