"""``backend="auto"`` on CUDA tensors when both the cuda and triton backends run: each op
call goes to whichever of the two measured faster for that op and size.

Measured on an NVIDIA H200 (torch 2.11, Triton 3.6, 2026-11-26; bench/results/
NVIDIA-H200_2026-11-26.md), per call, medians, inputs rotated past the L2 cache:

- the cuda backend costs ~6-15 us of host time per call, Triton ~25-40 us, so up to 1M
  elements cuda wins every op by 2-4x;
- from 16M elements on, Triton's AdamW and SGD steps ran 6-11% faster (98-99% of the
  copy bandwidth against 90-92%), and its accumulate_ of fp32 gradients 11-15% faster
  (96-103% against 86-90%);
- accumulate_ of fp16/bf16 gradients and grad_norm ran as fast or faster on cuda at every
  size; accumulate_many_ is one launch per 64 tensors on cuda and needs no host-to-device
  table, so it stays there.

An NVIDIA H100 (torch 2.11, Triton 3.6, 2026-11-26; bench/results/
NVIDIA-H100-80GB-HBM3_2026-11-26.md, Triton launched through its launcher then) keeps
every choice: the steps from 16M elements on 1-3% faster on Triton (96-99% of the copy
bandwidth against 93-97%), accumulate_ of fp32 gradients even from 64M on (100% both;
96% against 94% at 16M), the rest within 1% or faster on cuda, and below 16M cuda about
3x faster per call.

Below TRITON_FROM elements an op goes to cuda, from there on to Triton where the table
says so. Re-measure with ``python -m fusedaccum bench`` on another GPU.
"""

from __future__ import annotations

import torch

TRITON_FROM = 1 << 24  # 16M elements: the smallest measured size where Triton won


class Router:
    """The op functions of a backend module, each routed to ``cuda`` or ``triton``."""

    def __init__(self, cuda, triton):
        self.cuda, self.triton = cuda, triton

    def _pick(self, numel: int):
        return self.triton if numel >= TRITON_FROM else self.cuda

    @staticmethod
    def unavailable_reason(name, device):  # pragma: no cover - not a backend name
        return None

    def accumulate_(self, acc, grad, scale=1.0, *, overwrite=False, norm_type=None):
        big_fp32 = (isinstance(grad, torch.Tensor) and grad.dtype == torch.float32
                    and acc.numel() >= TRITON_FROM)  # (a bad grad: cuda's checks name it)
        mod = self.triton if big_fp32 and norm_type is None else self.cuda
        return mod.accumulate_(acc, grad, scale, overwrite=overwrite, norm_type=norm_type)

    def accumulate_many_(self, accs, grads, scale=1.0, *, overwrite=None, norm_type=None,
                         trusted=False):
        return self.cuda.accumulate_many_(accs, grads, scale, overwrite=overwrite,
                                          norm_type=norm_type, trusted=trusted)

    def grad_norm(self, tensors, norm_type=2.0):
        return self.cuda.grad_norm(tensors, norm_type)

    def adamw_step_(self, param, acc, *args, **kwargs):
        return self._pick(param.numel()).adamw_step_(param, acc, *args, **kwargs)

    def sgd_step_(self, param, acc, *args, **kwargs):
        return self._pick(param.numel()).sgd_step_(param, acc, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<fusedaccum auto router: cuda, triton from {TRITON_FROM} elements>"
