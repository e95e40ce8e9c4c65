"""Faster CPU kernels for decoding: the output projection through a prepacked oneDNN weight.

A decoding step multiplies a few rows (one per sequence in the batch) by the whole output
projection. For gemma-3-270m that weight is 262,144 x 640 floats (671 MB) and half of every
step: torch's dense path (MKL) re-reads and repacks it on every call, while oneDNN multiplies
against a copy packed once at load (on a 2-core AVX2 CPU: 328 -> 171 ms per call at batch 32;
1.28x on a whole gemma+rules batch, identical greedy outputs; `benchmarks/generation.py` with
and without ``HARNESS_KERNELS=plain``). The other layers' small matmuls gained nothing, so only
the output projection changes. The kernel is part of a variant's output identity (rounding can
differ), and ``HARNESS_KERNELS=plain`` turns it off, which restores the plain keys.
"""

from __future__ import annotations

import os
from typing import Any

#: The output-projection kernel's name and version, as recorded in cache keys.
ONEDNN = "onednn-lm-head-1"
PLAIN = "plain"
#: Inputs with more rows than this (a prefill that needs every position's logits, scoring a
#: long sequence) take the dense path: oneDNN's gain is for the few rows of a decoding step.
MAX_ROWS = 256


def choose(dtype: str) -> str:
    """The output-projection kernel for a float dtype on this machine: ONEDNN or PLAIN."""
    if os.environ.get("HARNESS_KERNELS", "").strip().lower() in ("plain", "off", "0"):
        return PLAIN
    if dtype != "float32":
        return PLAIN
    import torch

    return ONEDNN if torch.backends.mkldnn.is_available() else PLAIN


def install(model: Any, kernel: str) -> None:
    """Route an eval-mode model's output projection through the kernel (PLAIN: unchanged)."""
    if kernel == PLAIN:
        return
    import torch

    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype != torch.float32:
        return
    packed = head.weight.detach().to_mkldnn()  # a copy; tied embeddings keep their own
    bias = None if head.bias is None else head.bias.detach().contiguous()
    dense = head.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS or x.dtype != torch.float32 or torch.is_grad_enabled():
            return dense(x)
        flat = x.reshape(rows, x.shape[-1]).contiguous()
        # dense in, dense out against the packed weight: the same oneDNN product as
        # mkldnn_linear (bit-identical) without converting the [rows, vocab] result back
        # (41 ms of 317 at 72 rows x 262k)
        y = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])

    head.forward = forward
