"""Faster CPU kernels for decoding: linear layers through weights prepacked for oneDNN.

A decoding step multiplies a few rows (one per sequence in the batch) by every weight of the
model, and torch's dense path (MKL) repacks each weight on every call; here the linear layers
multiply against a copy reordered once at load into oneDNN's blocked layout for a PACK_ROWS-row
batch (`torch.ops.mkldnn._reorder_linear_weight`). Larger inputs take the dense path where it
wins: above BODY_MAX_ROWS rows for a body layer, above HEAD_MAX_ROWS for the output projection.
The kernel is part of a variant's output identity (rounding can differ), and
``HARNESS_KERNELS=plain`` turns it off, which restores the plain keys. Timings: README.md, Speed.
"""

from __future__ import annotations

import os
from typing import Any

#: The kernel's name and version, as recorded in cache keys (onednn-lm-head-1: the output
#: projection only, in oneDNN's plain layout, up to 256 rows).
ONEDNN = "onednn-blocked-2"
PLAIN = "plain"
#: The batch size the blocked layout is chosen for: the default decoding batch.
PACK_ROWS = 72
#: Row limits of the oneDNN path (see the module docstring).
HEAD_MAX_ROWS = 1024
BODY_MAX_ROWS = 128
#: The body's linears get blocked copies only while these copies stay within this many bytes:
#: a copy doubles their memory, so a larger model's body keeps the dense path and only its
#: output projection is copied (sizes: README.md, Speed).
BODY_PACK_MAX_BYTES = 2 << 30


def choose(dtype: str) -> str:
    """The output-projection kernel for a float dtype on this machine: ONEDNN or PLAIN."""
    if os.environ.get("HARNESS_KERNELS", "").strip().lower() in ("plain", "off", "0"):
        return PLAIN
    if dtype != "float32":
        return PLAIN
    import torch

    return ONEDNN if torch.backends.mkldnn.is_available() else PLAIN


def _route(linear: Any, max_rows: int) -> None:
    """Send the linear layer's inputs of up to max_rows rows through a blocked oneDNN copy."""
    import torch

    packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS)
    bias = None if linear.bias is None else linear.bias.detach().contiguous()
    dense = linear.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > max_rows or x.dtype != torch.float32 or torch.is_grad_enabled():
            return dense(x)
        flat = x.reshape(rows, x.shape[-1]).contiguous()
        # dense in, dense out against the packed weight (no conversion of the result)
        y = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])

    linear.forward = forward


def install(model: Any, kernel: str) -> None:
    """Route an eval-mode model's fp32 linear layers through the kernel (PLAIN: unchanged)."""
    if kernel == PLAIN:
        return
    import torch

    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype != torch.float32:
        return
    _route(head, HEAD_MAX_ROWS)
    body = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
            and m.weight.dtype == torch.float32]
    if sum(m.weight.nbytes for m in body) <= BODY_PACK_MAX_BYTES:
        for module in body:
            _route(module, BODY_MAX_ROWS)
