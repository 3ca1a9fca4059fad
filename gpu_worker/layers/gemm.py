"""The matrix multiply behind every linear layer.

On CPU with float32 weights, oneDNN's prepacked weight layout is about 2x
faster than torch's default (MKL) path at batch 1 and 1.5-2x at batch 32 on
AVX2 machines (bench/engine.py). Prepacking is done once after loading; the
packed tensor is opaque, so layers keep it beside (or instead of) their
plain weight. Everywhere else (CUDA, bf16 on CPUs without native bf16) this
falls back to ``F.linear``. This module is the only user of the private
``torch.ops.mkldnn`` ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# The batch size oneDNN tunes the packed layout for; any batch size works.
PREPACK_BATCH_HINT = 32


def can_prepack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """An opaque oneDNN copy of ``weight`` [out, in] for :func:`linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, PREPACK_BATCH_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor | None, packed: torch.Tensor | None,
           bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for x [tokens, in], using the packed weight when there is one."""
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)
