"""The Triton backend: every op of :mod:`fusedaccum.ops` as Triton kernels.

Same signatures and math as :mod:`fusedaccum.ops.reference` (the definition). Layout:
shared ``@triton.jit`` helpers first, then per op its private kernel followed by its
launcher, then the ``torch.library`` registrations and the public functions.

Rules every kernel follows:

* element offsets are int64 (``_block_offsets``), so buffers over 2**31 elements work;
  every load and store is masked at the tail;
* all math is fp32; fp16/bf16 are only a storage format. fp32 -> bf16 is rounded to
  nearest even with integer bit arithmetic (``_f32_to_bf16_rne``) and bf16 -> fp32 is
  a 16-bit shift, because the interpreter truncates (and mishandles subnormals in) its
  own bf16 conversions: that way the interpreter and a GPU give identical bits;
* no host syncs: ``grad_mult`` and ``found_inf`` are device tensors read inside the
  kernel; with ``found_inf != 0`` the step kernels read nothing and write nothing but
  the zeroed accumulator;
* reductions (norms) are deterministic: each block writes one partial into a buffer,
  then a single program folds the partials in a fixed order. No atomics.

The ops (``fusedaccum::triton_*``) are ``torch.library.triton_op``s on a GPU, so that
inductor sees the kernels (``wrap_triton``), and opaque ``custom_op``s with fake
implementations under the interpreter, where ``triton_op`` fails ``opcheck`` (torch
2.13, Triton 3.9); ``accumulate_many_`` (a host-side table of data pointers) is always
opaque. Eager calls skip the op layer and launch directly (see ``_compiling``).

The module imports without triton; :func:`unavailable_reason` then says why it cannot run.
"""

import array
import inspect
import itertools
import math
import os
import re
import sys
import threading
import warnings
from collections import OrderedDict
from contextlib import nullcontext

import torch

from fusedaccum.ops.reference import (
    FLOAT_DTYPES,
    _check_flat,
    check_accumulate_args,
    check_adamw_inputs,
    check_many_args,
    check_norm_inputs,
    check_norm_type,
    check_sgd_inputs,
    device_scalar,
    many_stat,
    norm_value,
)

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _TRITON_IMPORT_ERROR = None
except ImportError as _exc:  # the module must still import; unavailable_reason says why
    _TRITON_IMPORT_ERROR = _exc

    class _NoTriton:
        """Stands in for ``triton`` and ``triton.language`` when triton is missing, so the
        kernels below still define (as plain functions that are never launched)."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            return None

    triton = tl = _NoTriton()


_SETTINGS = sys.modules[__name__]  # csrc/hooks.cpp reads its _LAUNCH at each flush


# Block sizes, per kernel: (elements per program, num_warps) on a GPU. Chosen by
# bench/tune_triton.py on an H200 (2026-11-26, 64M elements): accumulate 101%, norm 87%,
# AdamW 98%, SGD 98% of the copy bandwidth; the neighbouring configs were within 1-3%.
# Under the interpreter every program costs Python overhead, so blocks there are large to
# keep the number of programs small.
_GPU_CONFIG = {
    "accumulate": (1024, 4),
    "norm": (8192, 8),
    "finish": (1024, 4),
    "adamw": (1024, 4),
    "sgd": (1024, 4),
}
_INTERPRET_BLOCK = 1 << 16
_INTERPRET_FINISH_BLOCK = 1024

# Storage kinds of a tensor as the kernels see them (a constexpr per pointer).
_F32, _F16, _BF16 = 0, 1, 2
_KIND = {torch.float32: _F32, torch.float16: _F16, torch.bfloat16: _BF16}
# Norm codes (constexpr): sum of squares (2-norm) or NaN-aware max |x| (inf-norm).
_NORM_NONE, _NORM_2, _NORM_INF = 0, 1, 2


# --------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------


@triton.jit
def _block_offsets(pid, BLOCK: tl.constexpr):
    """Offsets of the BLOCK elements of program ``pid``, in int64: pid * BLOCK would
    overflow int32 on buffers of 2**31 elements or more."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _load_f32(ptr, offs, mask, KIND: tl.constexpr):
    """Load fp32/fp16/bf16 elements as fp32 (masked elements read as 0)."""
    if KIND == 2:
        # bf16 -> fp32 is exact: the bf16 bits become the fp32's upper half. Done on the
        # bits because the interpreter's own conversion mishandles bf16 subnormals.
        bits = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.uint16, bitcast=True)
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _f32_to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even (as torch's ``.to(torch.bfloat16)``).

    Adding 0x7FFF plus the lowest kept bit to the fp32 bits and dropping the low half
    rounds to nearest with ties to even; a carry into the exponent gives the next binade
    or inf, as it should. NaN would carry into the sign, so it becomes the canonical
    quiet NaN 0x7FC0. The interpreter truncates ``x.to(tl.bfloat16)``; this gives the
    same bits under the interpreter and on a GPU.
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    hi = tl.where(x != x, 0x7FC0, rounded)
    return hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store_f32(ptr, offs, x, mask, KIND: tl.constexpr):
    """Store fp32 values into an fp32/fp16/bf16 tensor, rounding to nearest even."""
    if KIND == 2:
        tl.store(ptr + offs, _f32_to_bf16_rne(x), mask=mask)
    elif KIND == 1:
        # fp32 -> fp16 is round-to-nearest-even both on a GPU (cvt.rn.f16.f32) and under
        # the interpreter (numpy's astype), subnormals and overflow to inf included.
        tl.store(ptr + offs, x.to(tl.float16), mask=mask)
    else:
        tl.store(ptr + offs, x, mask=mask)


@triton.jit
def _neg(x):
    """-x for fp32 x, as torch negates: the sign bit flipped. Triton 3.6 computes -x as
    0 - x, which gives +0.0 for +0.0."""
    return (x.to(tl.uint32, bitcast=True) ^ 0x80000000).to(tl.float32, bitcast=True)


@triton.jit
def _mul_rn(a, b, INTERPRETED: tl.constexpr):
    """``a * b`` rounded on its own, never fused into a following add. On a GPU Triton lets
    the compiler contract a product and a sum into one multiply-add (its default, and
    ptxas fuses a plain mul.f32 and add.f32 too), so ``acc * grad_mult - exp_avg`` and
    ``p * decay + update`` were each rounded once there, and twice under the interpreter
    and in torch; and one boundary of the wrapper (which multiplies the accumulators by
    grad_mult first, before its pre-hooks) differed from the other in an ulp. libdevice's
    mul_rn is PTX mul.rn.f32, which no compiler fuses. The interpreter fuses nothing."""
    if INTERPRETED:
        return a * b
    else:
        return libdevice.mul_rn(a, b)


@triton.jit
def _fma(a, b, c, EMULATE: tl.constexpr):
    """``a * b + c`` rounded once, where torch's kernels fuse a multiply-add (``add(x, y,
    alpha=a)``, ``lerp``, ``addcmul``; csrc/math.h calls fmaf at the same places).

    On a GPU that is ``tl.fma``. The interpreter of Triton 3.6 rounds its ``tl.fma``
    twice, so with EMULATE (under the interpreter) it is done in fp64: the product of two
    fp32 values is exact there, the sum's rounding error is recovered exactly (Knuth's
    two-sum), and the sum is rounded to odd on its last bit where it was inexact, after
    which one rounding to fp32 is the correctly rounded result (53 bits >= 24 + 2).
    """
    if EMULATE:
        # (tl.cast: a Python float scalar argument becomes fp32 first, as on a GPU)
        p = tl.cast(a, tl.float64) * tl.cast(b, tl.float64)
        c64 = tl.cast(c, tl.float64)
        s = p + c64
        t = s - p
        err = (p - (s - t)) + (c64 - t)
        bits = s.to(tl.int64, bitcast=True)
        # inexact and finite (inf and NaN make err NaN), on an even last bit: step to the
        # odd neighbour on the exact value's side (further from zero when err has s's sign)
        fix = (err != 0.0) & ((err - err) == 0.0) & ((bits & 1) == 0)
        bits = tl.where(fix, tl.where((err > 0.0) == (s > 0.0), bits + 1, bits - 1), bits)
        return bits.to(tl.float64, bitcast=True).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _block_stat(x, NORM: tl.constexpr):
    """One block's norm statistic: sum of squares (NORM == 1) or max |x| (NORM == 2).

    ``tl.max`` does not propagate NaN on a GPU, so NaNs are counted separately and
    turn the result into NaN. Masked-out elements must be 0.
    """
    if NORM == 1:
        return tl.sum(x * x, axis=0)
    else:
        isnan = x != x
        amax = tl.max(tl.where(isnan, 0.0, tl.abs(x)), axis=0)
        return tl.where(tl.max(isnan.to(tl.int32), axis=0) > 0, float("nan"), amax)


# --------------------------------------------------------------------------------------
# norm reductions: stage 2 (shared by accumulate_ and grad_norm)
# --------------------------------------------------------------------------------------


@triton.jit
def _finish_kernel(partial_ptr, out_ptr, n_partials, NORM: tl.constexpr, SQRT: tl.constexpr,
                   BLOCK: tl.constexpr):
    """One program folds all partials in a fixed order: the result is bitwise
    reproducible for a given number of partials."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(partial_ptr + offs, mask=offs < n_partials, other=0.0)
        if NORM == 1:
            total += x
        else:
            isnan = x != x
            nan = nan | isnan.to(tl.int32)
            total = tl.maximum(total, tl.where(isnan, 0.0, x))
    if NORM == 1:
        result = tl.sum(total, axis=0)
        if SQRT:
            result = tl.sqrt_rn(result)
    else:
        result = tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.max(total, axis=0))
    tl.store(out_ptr, result)


def _raw(kernel):
    """The kernel itself: how the eager path launches (see _wrap_for_ops)."""
    return kernel


# --------------------------------------------------------------------------------------
# launching: through Triton's launcher, or its compiled kernel directly
# --------------------------------------------------------------------------------------


# Every eager launch on a GPU in the "direct" and "auto" modes (see _LAUNCH): the first
# launch of a key goes through Triton's launcher (kernel[grid](...): it binds the
# arguments, works out their specialization, looks the compiled kernel up, compiling it
# the first time), which returns the CompiledKernel it ran; later launches with the same
# key launch that one themselves (CompiledKernel[grid](*every argument in the kernel's
# order)). The key: the kernel, the device, num_warps, the constexprs (names and values)
# and _spec of each runtime argument, which is at least as fine as what Triton
# specializes them on, so that one key never stands for two compiled kernels (checked
# against Triton's own specialization: tests/test_triton_library.py
# test_launch_key_is_at_least_as_fine_as_tritons_specialization). On an H100 (Triton 3.6,
# 2026-11-27, bench/launch_costs.py) a table flush's launch took 16.4 us of host time
# directly against 24.4 us through the launcher; its binder's cost grows with the
# arguments (the AdamW kernel has 17 and 10 constexprs).
_COMPILED: dict = {}  # launch key (see _run) -> Triton's CompiledKernel
_DIRECT_FAILED: list = []  # the error that turned "direct" off, if any
_I32_MIN, _I32_END, _U64_START = -(1 << 31), 1 << 31, 1 << 63


def _cdiv(n: int, block: int) -> int:
    """Blocks of ``block`` covering ``n`` (ints): triton.cdiv's value, without the
    argument unwrapping its decorator does on every call (about 1.5 us of host time here)."""
    return -(-n // block)


def _spec(arg):
    """What a launch key holds of one runtime argument: at least what Triton (3.6, 3.9:
    native_specialize_impl) specializes it on. A tensor: its dtype (the pointer type) and
    whether its address is a multiple of 16; an int: whether it is 1 (then a constexpr),
    a multiple of 16, and its type (i32, i64, u64 by range); a bool (u1): its value; a
    float: nothing (always fp32); anything else: its type and value."""
    kind = type(arg)
    if kind is float:
        return float
    if kind is int:
        return (arg == 1, arg % 16 == 0, _I32_MIN <= arg < _I32_END, arg < _U64_START)
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    return kind, arg


def _direct_failed(exc: BaseException) -> None:
    """A compiled kernel's direct launch raised before launching (a Triton whose
    CompiledKernel launches otherwise): every launch goes through Triton's launcher from
    now on, with one warning."""
    _DIRECT_FAILED.append(exc)
    _COMPILED.clear()
    warnings.warn(f"fusedaccum: launching Triton's compiled kernel directly failed "
                  f"({type(exc).__name__}: {exc}); kernels are launched through Triton's "
                  "launcher from now on", RuntimeWarning, stacklevel=3)


def _run(kernel, grid: int, args: tuple, consts: dict, warps: int, wrap=_raw,
         direct: bool | None = None):
    """``wrap(kernel)[(grid,)](*args, **consts, num_warps=warps)``: ``args`` the runtime
    arguments, ``consts`` the constexprs, together every parameter of the kernel in its
    order. Eager launches (``wrap`` is _raw) on a GPU with ``direct`` (default: the
    "direct" and "auto" modes) launch the compiled kernel of their key directly once
    Triton's launcher returned it (see _COMPILED). Returns what the launch returned: the
    compiled kernel (the interpreter's launches return None)."""
    if direct is None:
        direct = _LAUNCH in ("direct", "auto")
    key = None
    if direct and wrap is _raw and not _INTERPRETED and not _DIRECT_FAILED:
        # (the kernel by identity: a JITFunction hashes its source's key; floats, most of
        # the step kernels' arguments, need no call)
        key = (id(kernel), args[0].device.index, warps, *consts.items(),
               *[float if type(a) is float else _spec(a) for a in args])
        compiled = _COMPILED.get(key)
        if compiled is not None:
            try:
                # (a compiled kernel's runner reads all three grid dimensions)
                compiled[(grid, 1, 1)](*args, *consts.values())
                return compiled
            except (TypeError, AttributeError, IndexError) as exc:
                _direct_failed(exc)
                key = None
    compiled = wrap(kernel)[(grid,)](*args, **consts, num_warps=warps)
    # (kept only where the positional launch passes every parameter in the kernel's order)
    if key is not None and hasattr(compiled, "__getitem__") \
            and list(consts) == list(getattr(kernel, "arg_names", ()))[len(args):]:
        _COMPILED[key] = compiled
    return compiled


def _finish(partials: torch.Tensor, norm: int, sqrt: bool, wrap=_raw) -> torch.Tensor:
    out = torch.empty((), dtype=torch.float32, device=partials.device)
    block, warps = _config("finish")
    with _device_of(partials):
        _run(_finish_kernel, 1, (partials, out, partials.numel()),
             dict(NORM=norm, SQRT=sqrt, BLOCK=block), warps, wrap)
    return out


# --------------------------------------------------------------------------------------
# accumulate_
# --------------------------------------------------------------------------------------


@triton.jit
def _accumulate_block(acc_ptr, grad_ptr, offs, mask, scale, GRAD_KIND: tl.constexpr,
                      OVERWRITE: tl.constexpr, INTERPRETED: tl.constexpr):
    """The updated accumulator of one block, stored and returned: the element math of
    accumulate_ and accumulate_many_ (one helper, so both give the same bits)."""
    g = _load_f32(grad_ptr, offs, mask, GRAD_KIND)
    if OVERWRITE:
        acc = g * scale  # the accumulator is not read at all
    else:  # acc.add_(g, alpha=scale): one multiply-add, as torch's CPU and CUDA kernels
        acc = _fma(scale, g, tl.load(acc_ptr + offs, mask=mask, other=0.0), INTERPRETED)
    tl.store(acc_ptr + offs, acc, mask=mask)
    return acc


@triton.jit
def _accumulate_kernel(acc_ptr, grad_ptr, partial_ptr, n, scale,
                       GRAD_KIND: tl.constexpr, OVERWRITE: tl.constexpr, NORM: tl.constexpr,
                       INTERPRETED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = _block_offsets(pid, BLOCK)
    mask = offs < n
    acc = _accumulate_block(acc_ptr, grad_ptr, offs, mask, scale, GRAD_KIND, OVERWRITE,
                            INTERPRETED)
    if NORM != 0:  # this block's statistic of the updated accumulator, past n left out
        # (there the lanes hold scale * 0: NaN for an infinite scale)
        tl.store(partial_ptr + pid, _block_stat(tl.where(mask, acc, 0.0), NORM))


def _launch_accumulate(acc, grad, scale, overwrite, norm, wrap=_raw):
    n = acc.numel()
    if n == 0:
        return None if norm == _NORM_NONE else acc.new_zeros(())
    block, warps = _config("accumulate")
    grid = _cdiv(n, block)
    partials = acc if norm == _NORM_NONE else acc.new_empty(grid)  # acc: never written
    with _device_of(acc):
        _run(_accumulate_kernel, grid, (acc, grad, partials, n, scale),
             dict(GRAD_KIND=_KIND[grad.dtype], OVERWRITE=overwrite, NORM=norm,
                  INTERPRETED=_INTERPRETED, BLOCK=block), warps, wrap)
    if norm == _NORM_NONE:
        return None
    return _finish(partials, norm, sqrt=False, wrap=wrap)


# --------------------------------------------------------------------------------------
# accumulate_many_
# --------------------------------------------------------------------------------------


# (specialized on neither n_tensors' value nor the table's alignment: see _LAUNCH)
@triton.jit(do_not_specialize=["n_tensors"], do_not_specialize_on_alignment=["table_ptr"])
def _accumulate_many_kernel(table_ptr, n_tensors, scale, LOG_T: tl.constexpr,
                            GRAD_KIND: tl.constexpr, INTERPRETED: tl.constexpr,
                            BLOCK: tl.constexpr):
    """accumulate_ (no norm) of T = n_tensors pairs in one launch.

    ``table_ptr`` is an int64 table [acc address x T, grad address x T, numel x T,
    block start x (T + 1)] (non-empty pairs only, so the starts strictly increase; the
    last one is the grid size); a pair that overwrites its acc has its numel negated.
    Each program finds its pair by a binary search over the starts, LOG_T =
    ceil(log2(T)) fixed steps (unrolled), keeping starts[lo] <= pid < starts[hi], and
    then does one block of that pair.

    A block that lies wholly inside its pair, whose two addresses are 16-byte aligned
    (the common case: every accumulator starts on a 64-byte boundary of its flat buffer,
    buffers.ALIGN, and the caching allocator hands out 512-byte aligned gradients), runs
    unmasked with the alignment declared, so the compiler emits 16-byte vector loads and
    stores (ld.global.v4 in the PTX: tests/test_triton_library.py compiles it for sm_90).
    Addresses loaded from a table carry no alignment the compiler can see, and a mask
    against a numel it cannot see splits every access into scalar ones: without this,
    each thread loads its 8 elements one by one. The other blocks (a pair's last block,
    unaligned tensors) run masked as before; both run the same element math.
    """
    pid = tl.program_id(0).to(tl.int64)
    starts_ptr = table_ptr + 3 * n_tensors
    lo = 0
    hi = n_tensors
    for _ in tl.static_range(LOG_T):
        mid = (lo + hi) // 2
        right = tl.load(starts_ptr + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    acc_addr = tl.load(table_ptr + lo)
    grad_addr = tl.load(table_ptr + n_tensors + lo)
    acc_ptr = acc_addr.to(tl.pointer_type(tl.float32))
    if GRAD_KIND == 2:
        grad_ptr = grad_addr.to(tl.pointer_type(tl.bfloat16))
    elif GRAD_KIND == 1:
        grad_ptr = grad_addr.to(tl.pointer_type(tl.float16))
    else:
        grad_ptr = grad_addr.to(tl.pointer_type(tl.float32))
    signed_n = tl.load(table_ptr + 2 * n_tensors + lo)
    n = tl.where(signed_n < 0, -signed_n, signed_n)
    block = pid - tl.load(starts_ptr + lo)
    offs = _block_offsets(block, BLOCK)
    whole = (block < n // BLOCK) & (acc_addr % 16 == 0) & (grad_addr % 16 == 0)
    if whole:  # (uniform across the program, as the overwrite flag)
        acc_ptr = tl.multiple_of(acc_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        every = tl.full([BLOCK], 1, tl.int1)
        if signed_n < 0:
            _accumulate_block(acc_ptr, grad_ptr, offs, every, scale, GRAD_KIND, True, INTERPRETED)
        else:
            _accumulate_block(acc_ptr, grad_ptr, offs, every, scale, GRAD_KIND, False, INTERPRETED)
    elif signed_n < 0:
        _accumulate_block(acc_ptr, grad_ptr, offs, offs < n, scale, GRAD_KIND, True, INTERPRETED)
    else:
        _accumulate_block(acc_ptr, grad_ptr, offs, offs < n, scale, GRAD_KIND, False, INTERPRETED)


def _many_table(accs, grads, block: int, overwrite=None) -> tuple[list[int], int, int]:
    """The entries of _accumulate_many_kernel's table (non-empty pairs), their count and
    the grid size; ([], 0, 0) when every pair is empty. ``overwrite``: None or one 0/1
    per pair. (Host time per flush: one list per column, no tuple per pair.)"""
    numels = [a.numel() for a in accs]
    if 0 in numels:  # empty pairs have no row
        keep = [i for i, n in enumerate(numels) if n]
        if not keep:
            return [], 0, 0
        accs, grads = [accs[i] for i in keep], [grads[i] for i in keep]
        numels = [numels[i] for i in keep]
        overwrite = [overwrite[i] for i in keep] if overwrite else None
    signed = [-n if ow else n for n, ow in zip(numels, overwrite)] if overwrite else numels
    starts = list(itertools.accumulate([-(-n // block) for n in numels]))
    return ([*[a.data_ptr() for a in accs], *[g.data_ptr() for g in grads], *signed, 0,
             *starts], len(numels), starts[-1])


# The largest half gradient a triton bucket batches (accumulator.py _batch_max_numel):
# 16M elements, where the other backends batch up to 4M. Each larger gradient is a flush
# of its own, a table and a launch; on the GPT-2 XL list (580 tensors) 145 gradients per
# micro-batch lie between 4M and 16M elements (the 7.7M and 10.2M weights). Batched, they
# share flushes: a batch holds at most the flush size (32 MiB) plus one gradient (at most
# 32 MiB in bf16) that autograd would have freed a little earlier. On an H100
# (2026-11-27, bench/window_phases.py, two GPT-2 XL blocks, device synced, "direct"
# launches) the window took 7.60 ms against 8.75 ms with 4M.
BATCH_MAX_NUMEL = 1 << 24


# How a flush's table reaches the GPU: "pinned" (a page-locked copy from torch's caching
# host allocator, then an asynchronous upload), "pageable" (an ordinary CPU tensor,
# uploaded with non_blocking=True: the driver stages it at once, without waiting on the
# device, and torch's host allocator is not involved) or "cached" (pinned, but a table
# with the same entries, on the same device and stream, is uploaded once and reused: the
# caching allocator tends to hand a backward's gradients the same addresses every
# micro-batch, and the accumulators never move; the entries are the key, so a reused
# table is right by construction, and nothing ever writes a table after its upload).
# All are correct. Host time per flush of a 12-gradient batch on an H100 (torch 2.11,
# bench/launch_costs.py, 2026-11-26): pinned 50.7 us, pageable 45.2 us, cached 35.2 us
# with the device idle; 61.1, 54.4 and 43.4 us with it busy. Per GPT-2 124M window
# (window_phases.py, one process): pinned 23.6 ms, pageable 22.6 ms, cached 22.7 ms (a
# backward's gradients do not always come back at the same addresses): pageable, the
# simplest, holds no device memory and takes nothing from torch's host allocator.
_TABLE_UPLOAD = "pageable"
_TABLE_MODES = ("pinned", "pageable", "cached")
_TABLE_CACHE: OrderedDict = OrderedDict()  # (device, stream, *entries) -> table, LRU
_TABLE_CACHE_SIZE = 256
_TABLE_LOCK = threading.Lock()


def _upload_table(entries: list[int], device: torch.device, mode: str) -> torch.Tensor:
    if mode == "cached":
        stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
        key = (device, stream, *entries)
        with _TABLE_LOCK:  # (one autograd thread per device may flush at once)
            table = _TABLE_CACHE.get(key)
            if table is not None:
                _TABLE_CACHE.move_to_end(key)
                return table
        table = _upload_table(entries, device, "pinned")
        with _TABLE_LOCK:
            _TABLE_CACHE[key] = table
            if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
                _TABLE_CACHE.popitem(last=False)
        return table
    if mode not in _TABLE_MODES:
        raise ValueError(f"table upload mode must be one of {_TABLE_MODES}, got {mode!r}")
    # (from an array: a third of torch.tensor(list)'s host time; the tensor keeps it alive)
    table = torch.frombuffer(array.array("q", entries), dtype=torch.int64)
    if device.type != "cuda":
        return table
    if mode == "pinned":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


# How the kernels launch on a GPU: "jit" (kernel[grid](...), Triton's launcher: it binds
# the arguments, works out their specialization and looks the compiled kernel up on every
# call), "direct" (after the first such launch of a key, the compiled kernel it returned
# is launched itself, CompiledKernel[(blocks, 1, 1)](...): see _run; until 2026-11-27's
# fifth session only the table flushes did, now every eager launch), "cxx" or "auto",
# the default. On an H100 (2026-11-27, bench/launch_costs.py, Triton 3.6) a table flush's
# launch took 16.4 us of host time directly against 24.4 us through the launcher, a
# whole Python flush 51.3 against 64.6 us, and its GPU tests passed there. A Triton whose
# compiled kernels cannot be launched that way (the call raised before launching:
# TypeError, AttributeError, IndexError) falls back to "jit" for good, with one warning.
# "cxx": Python launches as "jit" (each of its launches registers the kernel, below), and
# the C++ hook's table flushes (csrc/hooks.cpp, the common case inside a backward) launch
# the compiled kernel themselves through the CUDA driver, with no Python at all: each
# (device, GRAD_KIND, LOG_T, BLOCK) variant is registered with the extension after
# Triton's launcher ran it once (_register_cxx), if its arguments and launch are what the
# C++ launch passes (_cxx_spec; Triton 3.6 and 3.9 agree on them). The C++ side reads
# _LAUNCH at each flush. Needs the extension built with CUDA; otherwise (or for a kernel
# it cannot take) it warns once and flushes as "jit". On the H100 its flush took 15.5 us
# against 24.6 us with Python launching the table directly and 30.9 us through Triton's
# launcher (2026-11-27, second session), and its GPU tests passed.
# "auto" (the default) is both where each can run: Python launches as "direct", and the
# C++ hook's flushes launch from C++ as with "cxx" wherever the extension (built with
# CUDA) takes the kernel; where it does not (no extension, no CUDA build, a kernel it
# cannot take), every flush stays "direct", without a warning. A launch the driver
# refused in C++ still warns. Measured the best of the four on an H100 (2026-11-27,
# bench/window_phases.py, host time per window): GPT-2 124M "cxx" 13.18 ms against
# "direct" 13.70 and "jit" 13.78; two GPT-2 XL blocks (device synced) "cxx" 7.70 against
# 8.75 and 8.49 ms.
# FUSEDACCUM_TRITON_LAUNCH=jit|direct|cxx|auto sets it for a process (bench/gpu_session.sh
# benchmarks with the mode its window phases measured fastest).
_LAUNCH_MODES = ("jit", "direct", "cxx", "auto")


def _launch_from_env() -> str:
    """The launch mode FUSEDACCUM_TRITON_LAUNCH names ("auto" if unset; a value that is
    not a mode warns and is ignored)."""
    value = os.environ.get("FUSEDACCUM_TRITON_LAUNCH", "").strip()
    if value in _LAUNCH_MODES:
        return value
    if value:
        warnings.warn(f"fusedaccum: FUSEDACCUM_TRITON_LAUNCH={value!r} is not one of "
                      f"{', '.join(repr(m) for m in _LAUNCH_MODES)} (lower case); ignored: "
                      "Triton kernels are launched as 'auto'", RuntimeWarning, stacklevel=2)
    return "auto"


_LAUNCH = _launch_from_env()
# (device index, GRAD_KIND, LOG_T, BLOCK) -> the CompiledKernel registered with the C++
# hook: kept here for good, since it owns the CUDA function the C++ side launches
_CXX_KERNELS: dict = {}
_CXX_REFUSED: list = []  # why "cxx" launches nothing from C++, once known
_CXX_UNLOADED = "the C++ hook is off or its extension is not loaded"


def _cxx_spec(compiled) -> tuple[int, int, int] | str:
    """(CUDA function handle, num_warps, shared memory bytes) of a compiled
    _accumulate_many_kernel that csrc/cuda/triton_launch.cu can launch as Triton's own
    launcher does: arguments (*i64, i32, fp32) then two null scratch pointers, a plain
    one-dimensional grid of 32 * num_warps threads. Else why not, as a phrase."""
    meta, src = getattr(compiled, "metadata", None), getattr(compiled, "src", None)
    function, signature = getattr(compiled, "function", None), getattr(src, "signature", None)
    if meta is None or not isinstance(signature, dict) or not isinstance(function, int) \
            or function <= 0:
        return "no CUDA function handle, metadata or signature on Triton's compiled kernel"
    target = getattr(meta, "target", None)
    if getattr(target, "backend", "cuda") != "cuda":
        return f"a kernel compiled for {target.backend}, not CUDA"
    args = [t for t in signature.values() if t != "constexpr"]
    if args != ["*i64", "i32", "fp32"]:
        return f"its arguments are {args}, where the C++ launch passes ['*i64', 'i32', 'fp32']"
    warp = getattr(meta, "warp_size", getattr(target, "warp_size", 32))
    shared = getattr(meta, "shared", 0)
    if (getattr(meta, "num_ctas", 1) != 1 or getattr(meta, "launch_cooperative_grid", False)
            or getattr(meta, "launch_pdl", False) or getattr(meta, "global_scratch_size", 0)
            or getattr(meta, "profile_scratch_size", 0) or warp != 32
            or not 0 <= shared <= 228 * 1024):
        return ("its launch needs what the C++ launch does not set up (clusters, cooperative "
                "or PDL launch, scratch memory, oversized shared memory, warps of 32)")
    params = _ptx_params(getattr(compiled, "asm", {}).get("ptx"))
    if params is not None and (params[:3] != [".u64", ".u32", ".f32"] or
                               any(t != ".u64" for t in params[3:]) or len(params) > 5):
        return (f"its PTX entry takes {params}, where the C++ launch passes .u64, .u32, "
                ".f32 and at most two .u64 scratch pointers")
    return function, int(meta.num_warps), int(shared)


def _ptx_params(ptx) -> list[str] | None:
    """The parameter types of a PTX module's one kernel entry (".u64", ...), or None."""
    if not isinstance(ptx, str):
        return None
    entry = re.search(r"\.entry\s+[\w$]+\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        return None
    return [p.split()[1] for p in entry.group(1).split(",") if len(p.split()) > 1]


def _forget_cxx() -> None:
    """Every "cxx" registration undone (the C++ side's first: it launches the functions
    the kernels kept here own) and refusals forgotten: the next launches register anew."""
    from fusedaccum.ops import native

    hooks = native.hooks_module(load=False)
    if hooks is not None and hasattr(hooks, "clear_triton_kernels"):
        hooks.clear_triton_kernels()
    _CXX_KERNELS.clear()
    _CXX_REFUSED.clear()


def _register_cxx(compiled, device_index: int, log_t: int, kind: int, block: int,
                  quiet: bool = False) -> None:
    """Hand a compiled _accumulate_many_kernel to the C++ hook for "cxx" and "auto" launches
    (once per variant); the first refusal is recorded in _CXX_REFUSED, with one warning
    (none when ``quiet``: "auto", whose flushes then stay "direct"), and registers nothing
    more (until table_flush finds the extension loaded, if it was not). Also where a launch
    the driver refused in C++ (which dropped every registered kernel and sent its flush
    here) is reported, quiet or not."""
    if _CXX_REFUSED:
        return
    from fusedaccum.ops import native

    hooks = native.hooks_module(load=False)
    failed = getattr(hooks, "triton_cxx_error", lambda: None)()
    key = (device_index, kind, log_t, block)
    if key in _CXX_KERNELS and not failed:
        return
    spec = _cxx_spec(compiled)
    if failed:
        why, quiet = f"a launch from C++ failed: {failed}", False
    elif isinstance(spec, str):
        why = spec
    elif hooks is None or not hasattr(hooks, "register_triton_kernel"):
        why = _CXX_UNLOADED
    elif not hooks.register_triton_kernel(_SETTINGS, *key, *spec):
        why = "the extension was built without CUDA"
    else:
        _CXX_KERNELS[key] = compiled
        return
    _CXX_REFUSED.append(why)
    if not quiet:
        warnings.warn(f"fusedaccum: Triton flush kernels cannot be launched from C++ ({why}); "
                      "flushes go through Triton's launcher", RuntimeWarning, stacklevel=2)


def _launch_many_kernel(blocks: int, table, n_tensors: int, scale: float, log_t: int,
                        kind: int, block: int, warps: int, mode: str) -> None:
    if mode not in _LAUNCH_MODES:
        raise ValueError(f"launch mode must be one of {_LAUNCH_MODES}, got {mode!r}")
    compiled = _run(_accumulate_many_kernel, blocks, (table, n_tensors, scale),
                    dict(LOG_T=log_t, GRAD_KIND=kind, INTERPRETED=_INTERPRETED, BLOCK=block),
                    warps, direct=mode in ("direct", "auto"))
    # (Python launches the flushes the C++ hook does not: rare where it runs, and each
    # is where a failed C++ launch gets reported)
    if mode in ("cxx", "auto") and table.device.type == "cuda" and not _CXX_REFUSED:
        _register_cxx(compiled, table.device.index, log_t, kind, block, quiet=mode == "auto")


def _launch_accumulate_many(accs, grads, scale, overwrite=None, *, upload: str | None = None,
                            launch: str | None = None):
    if not accs:
        return
    device = accs[0].device
    if _INTERPRETED and device.type != "cpu":
        # The interpreter runs kernels on host copies of the tensor arguments; addresses
        # in a table would be device addresses it cannot read. Same math, per pair.
        for acc, grad, ow in zip(accs, grads, overwrite or itertools.repeat(0)):
            _launch_accumulate(acc, grad, scale, bool(ow), _NORM_NONE)
        return
    block = _config("accumulate")[0]
    entries, n_tensors, blocks = _many_table(accs, grads, block, overwrite)
    if not n_tensors:
        return
    table = _upload_table(entries, device, upload or _TABLE_UPLOAD)
    _launch_table(table, n_tensors, blocks, _KIND[grads[0].dtype], block, scale, launch)


def _launch_table(table: torch.Tensor, n_tensors: int, blocks: int, kind: int, block: int,
                  scale: float = 1.0, launch: str | None = None) -> None:
    """_accumulate_many_kernel over a table on the pairs' device (_many_table's entries,
    made for ``block`` elements per program: the kernel must use that block). Also the C++
    hook's flushes (csrc/hooks.cpp, table flush), which build the table themselves: see
    table_flush."""
    warps = _config("accumulate")[1]
    with _device_of(table):
        _launch_many_kernel(blocks, table, n_tensors, scale, (n_tensors - 1).bit_length(),
                            kind, block, warps, launch or _LAUNCH)


def table_flush(device: torch.device, dtype: torch.dtype) -> tuple | None:
    """What the C++ batching hook needs to flush a full batch of ``dtype`` gradients on
    ``device`` without running _flush in Python: (launcher, block, kind), the launcher
    called as ``launcher(table, n_tensors, blocks, kind, block)`` with a table the hook
    built as _many_table does, ``block`` elements per program; None where Triton is
    missing or the interpreter would read a GPU table (_launch_accumulate_many's per-pair
    case)."""
    if _TRITON_IMPORT_ERROR is not None or (_INTERPRETED and device.type != "cpu") \
            or dtype not in _KIND:
        return None
    if _CXX_REFUSED == [_CXX_UNLOADED]:  # (the hook asking has the extension loaded now)
        _CXX_REFUSED.clear()
    return _launch_table, _config("accumulate")[0], _KIND[dtype]


def launch_summary(hooks_on: bool, cuda_build: bool) -> str:
    """How the triton backend's batch flushes launch on a GPU, as ``python -m fusedaccum
    info`` says it: the mode in effect (_LAUNCH), given whether the C++ hook is on and the
    extension was built with CUDA (what "cxx" and "auto" need)."""
    if _TRITON_IMPORT_ERROR is not None:
        return "none (Triton is not importable)"
    if _LAUNCH == "jit":
        return "'jit' (Triton's launcher, every flush)"
    if _LAUNCH == "direct":
        return "'direct' (Triton's compiled kernel, launched by Python)"
    why = ("the C++ hook is off" if not hooks_on else
           "the extension was built without CUDA" if not cuda_build else
           f"refused: {_CXX_REFUSED[0]}" if _CXX_REFUSED else None)
    if why is None:
        return (f"'{_LAUNCH}' (from the C++ hook, through the CUDA driver, once Triton compiled "
                "each kernel variant)")
    if _LAUNCH == "cxx":
        return f"'cxx', but through Triton's launcher, with a warning ({why})"
    return f"'auto': 'direct' from Python ({why})"


# --------------------------------------------------------------------------------------
# grad_norm
# --------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["base"])
def _norm_partials_kernel(x_ptr, partial_ptr, base, n, NORM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = _block_offsets(pid, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(partial_ptr + base + pid.to(tl.int64), _block_stat(x, NORM))


def _launch_grad_norm(tensors, norm, wrap=_raw):
    # Stage 1: one launch per non-empty tensor, all writing into one partials buffer at
    # fixed offsets; stage 2: one program folds the buffer. The flat per-group buffers
    # make the tensor count small (one per group), so per-tensor launches are cheap.
    block, warps = _config("norm")
    counts = [_cdiv(t.numel(), block) for t in tensors]
    total = sum(counts)
    device = tensors[0].device
    if total == 0:
        return torch.zeros((), dtype=torch.float32, device=device)
    partials = torch.empty(total, dtype=torch.float32, device=device)
    base = 0
    with _device_of(partials):
        for t, count in zip(tensors, counts):
            if count:
                _run(_norm_partials_kernel, count, (t, partials, base, t.numel()),
                     dict(NORM=norm, BLOCK=block), warps, wrap)
                base += count
    return _finish(partials, norm, sqrt=norm == _NORM_2, wrap=wrap)


# --------------------------------------------------------------------------------------
# adamw_step_
# --------------------------------------------------------------------------------------


@triton.jit
def _zero_acc(acc_ptr, offs, mask, BLOCK: tl.constexpr):
    """Zero this program's acc elements, after every thread has read them.

    The zeros depend on no loaded value, so Triton may lay the store out over the threads
    differently from the load of acc: without the barrier one thread can zero an element
    that another has not read yet (seen on an H100/H200 class GPU: ~1% of the elements of
    an SGD step lost their gradient). Every thread's reads are complete here, since the
    stores above used them.
    """
    tl.debug_barrier()
    tl.store(acc_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)


@triton.jit
def _step_inputs(param_ptr, acc_ptr, grad_mult_ptr, found_inf_ptr, n, PARAM_KIND: tl.constexpr,
                 MAXIMIZE: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK: tl.constexpr):
    """What every step kernel starts from: offsets, the in-range mask, the live mask, the
    gradient ``acc * grad_mult`` (negated to maximize) and the param, both in fp32."""
    offs = _block_offsets(tl.program_id(0), BLOCK)
    mask = offs < n
    # found_inf set: no element is live, so nothing is read and nothing but acc is written.
    # (A scalar bound rather than `mask & keep`: `&` of a block and a scalar bool fails
    # under the interpreter of triton 3.9.)
    live = offs < tl.where(tl.load(found_inf_ptr).to(tl.float32) == 0.0, n, 0)
    g = _mul_rn(tl.load(acc_ptr + offs, mask=live, other=0.0),
                tl.load(grad_mult_ptr).to(tl.float32), INTERPRETED)
    if MAXIMIZE:
        g = _neg(g)
    p = _load_f32(param_ptr, offs, live, PARAM_KIND)
    return offs, mask, live, g, p


@triton.jit
def _adamw_kernel(param_ptr, acc_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, out_ptr,
                  grad_mult_ptr, found_inf_ptr, n,
                  decay, weight_decay, lerp_weight, beta2, one_minus_beta2, bias_correction2_sqrt,
                  eps, neg_step_size,
                  PARAM_KIND: tl.constexpr, OUT_KIND: tl.constexpr, HAS_OUT: tl.constexpr,
                  WD_MODE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
                  LERP_FROM_START: tl.constexpr, ZERO_ACC: tl.constexpr, INTERPRETED: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs, mask, live, g, p = _step_inputs(param_ptr, acc_ptr, grad_mult_ptr, found_inf_ptr, n,
                                          PARAM_KIND, MAXIMIZE, INTERPRETED, BLOCK)
    new_p = p
    if WD_MODE == 1:  # decoupled (AdamW): p * (1 - lr * weight_decay)
        new_p = _mul_rn(p, decay, INTERPRETED)
    elif WD_MODE == 2:  # L2 (Adam): g.add(p, alpha=weight_decay)
        g = _fma(weight_decay, p, g, INTERPRETED)
    m = tl.load(exp_avg_ptr + offs, mask=live, other=0.0)
    # exp_avg.lerp(g, 1 - beta1), with torch's two formulas for small and large weights
    # (w - 1 is exactly -(1 - w))
    if LERP_FROM_START:
        m = _fma(lerp_weight, g - m, m, INTERPRETED)
    else:
        m = _fma(lerp_weight - 1.0, g - m, g, INTERPRETED)
    # exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    v = _fma(one_minus_beta2 * g, g, tl.load(exp_avg_sq_ptr + offs, mask=live, other=0.0) * beta2,
             INTERPRETED)
    if AMSGRAD:
        vmax = tl.maximum(tl.load(max_exp_avg_sq_ptr + offs, mask=live, other=0.0), v,
                          propagate_nan=tl.PropagateNan.ALL)
        tl.store(max_exp_avg_sq_ptr + offs, vmax, mask=live)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bias_correction2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    new_p = new_p + tl.div_rn(neg_step_size * m, denom)
    tl.store(exp_avg_ptr + offs, m, mask=live)
    tl.store(exp_avg_sq_ptr + offs, v, mask=live)
    _store_f32(param_ptr, offs, new_p, live, PARAM_KIND)
    if HAS_OUT:
        _store_f32(out_ptr, offs, new_p, live, OUT_KIND)
    if ZERO_ACC:
        _zero_acc(acc_ptr, offs, mask, BLOCK)


def _launch_adamw(param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq, model_out, grad_mult,
                  found_inf, lr, beta1, beta2, eps, weight_decay, step, decoupled_weight_decay,
                  amsgrad, maximize, zero_acc, wrap=_raw):
    n = param.numel()
    if n == 0:
        return
    # Host-side scalars in fp64, as the reference forms them; the kernel gets them as fp32.
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    wd_mode = 0 if weight_decay == 0 else (1 if decoupled_weight_decay else 2)
    lerp_weight = 1 - beta1
    block, warps = _config("adamw")
    with _device_of(param):
        _run(_adamw_kernel, _cdiv(n, block), (
            param, acc, exp_avg, exp_avg_sq,
            exp_avg_sq if max_exp_avg_sq is None else max_exp_avg_sq,  # dummy: never touched
            param if model_out is None else model_out,  # dummy: never touched
            grad_mult, found_inf, n,
            float(1 - lr * weight_decay), float(weight_decay), float(lerp_weight),
            float(beta2), float(1 - beta2), float(bias_correction2_sqrt), float(eps),
            float(-(lr / bias_correction1)),
        ), dict(
            PARAM_KIND=_KIND[param.dtype],
            OUT_KIND=_F32 if model_out is None else _KIND[model_out.dtype],
            HAS_OUT=model_out is not None, WD_MODE=wd_mode, AMSGRAD=bool(amsgrad),
            MAXIMIZE=bool(maximize), LERP_FROM_START=abs(lerp_weight) < 0.5,
            ZERO_ACC=bool(zero_acc), INTERPRETED=_INTERPRETED, BLOCK=block,
        ), warps, wrap)


# --------------------------------------------------------------------------------------
# sgd_step_
# --------------------------------------------------------------------------------------


@triton.jit
def _sgd_kernel(param_ptr, acc_ptr, buf_ptr, out_ptr, grad_mult_ptr, found_inf_ptr, n,
                lr, momentum, one_minus_dampening, weight_decay,
                PARAM_KIND: tl.constexpr, OUT_KIND: tl.constexpr, HAS_OUT: tl.constexpr,
                HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, FIRST_STEP: tl.constexpr,
                NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, ZERO_ACC: tl.constexpr,
                INTERPRETED: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, live, g, p = _step_inputs(param_ptr, acc_ptr, grad_mult_ptr, found_inf_ptr, n,
                                          PARAM_KIND, MAXIMIZE, INTERPRETED, BLOCK)
    # torch.optim.SGD's add(..., alpha=) forms, each one multiply-add
    if HAS_WD:
        g = _fma(weight_decay, p, g, INTERPRETED)
    if HAS_MOMENTUM:
        if FIRST_STEP:  # torch: buf = clone(g), no dampening
            buf = g
        else:
            buf = _fma(one_minus_dampening, g,
                       tl.load(buf_ptr + offs, mask=live, other=0.0) * momentum, INTERPRETED)
        tl.store(buf_ptr + offs, buf, mask=live)
        if NESTEROV:
            g = _fma(momentum, buf, g, INTERPRETED)
        else:
            g = buf
    # param.add_(g, alpha=-lr): lr * (-g), the same product; not -lr, which Triton 3.6's
    # interpreter would hand over as +0.0 for lr == 0 (it drops a float argument's sign
    # of zero), so that a -0.0 param would become +0.0
    new_p = _fma(lr, _neg(g), p, INTERPRETED)
    _store_f32(param_ptr, offs, new_p, live, PARAM_KIND)
    if HAS_OUT:
        _store_f32(out_ptr, offs, new_p, live, OUT_KIND)
    if ZERO_ACC:
        _zero_acc(acc_ptr, offs, mask, BLOCK)


def _launch_sgd(param, acc, momentum_buffer, model_out, grad_mult, found_inf, lr, momentum,
                dampening, weight_decay, nesterov, maximize, first_step, zero_acc, wrap=_raw):
    n = param.numel()
    if n == 0:
        return
    block, warps = _config("sgd")
    with _device_of(param):
        _run(_sgd_kernel, _cdiv(n, block), (
            param, acc,
            acc if momentum_buffer is None else momentum_buffer,  # dummy: never touched
            param if model_out is None else model_out,  # dummy: never touched
            grad_mult, found_inf, n,
            float(lr), float(momentum), float(1 - dampening), float(weight_decay),
        ), dict(
            PARAM_KIND=_KIND[param.dtype],
            OUT_KIND=_F32 if model_out is None else _KIND[model_out.dtype],
            HAS_OUT=model_out is not None, HAS_WD=weight_decay != 0,
            HAS_MOMENTUM=momentum != 0, FIRST_STEP=bool(first_step), NESTEROV=bool(nesterov),
            MAXIMIZE=bool(maximize), ZERO_ACC=bool(zero_acc), INTERPRETED=_INTERPRETED,
            BLOCK=block,
        ), warps, wrap)


# --------------------------------------------------------------------------------------
# where the kernels run
# --------------------------------------------------------------------------------------


def _kernels_interpreted() -> bool:
    """Whether the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 when
    this module was imported; triton decides at decoration time)."""
    return type(_accumulate_kernel).__name__ == "InterpretedFunction"


_INTERPRETED = _TRITON_IMPORT_ERROR is None and _kernels_interpreted()


def _config(kernel: str) -> tuple[int, int]:
    if _INTERPRETED:
        block = _INTERPRET_FINISH_BLOCK if kernel == "finish" else _INTERPRET_BLOCK
        return block, 4
    return _GPU_CONFIG[kernel]


_NO_SWITCH = nullcontext()  # (reusable: it holds no state)


def _device_of(t: torch.Tensor):
    """Where a launch runs: on the tensor's GPU (triton launches on the current device).
    The switch is skipped where that is the current device already, the common case (one
    GPU, or a rank per GPU): entering and leaving torch.cuda.device took 4.3 us of host
    time per launch on an H100 (bench/launch_costs.py). Under the interpreter, on CPU
    tensors, the kernels run as NumPy, which warns where a GPU computes in silence: an
    inf or NaN input makes _fma's emulated error term inf - inf."""
    dev = t.device
    if dev.type != "cuda":
        return _quiet_numpy() if _INTERPRETED else _NO_SWITCH
    if dev.index == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(dev)


def _quiet_numpy():
    import numpy  # (the interpreter's own dependency)

    return numpy.errstate(invalid="ignore", over="ignore")


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def unavailable_reason(name: str, device: torch.device | None) -> str | None:
    """None if the Triton kernels run on ``device`` (None: on this machine), else why not."""
    if _TRITON_IMPORT_ERROR is not None:
        return f"triton is not installed (import failed: {_TRITON_IMPORT_ERROR})"
    late = (" (TRITON_INTERPRET is set now, but was not when fusedaccum.ops.triton was "
            "imported: triton reads it at import time)") if _env_interpret() else ""
    cuda = torch.cuda.is_available()
    if device is None:
        if cuda or _INTERPRETED:
            return None
        return ("no CUDA device and TRITON_INTERPRET is not set; set TRITON_INTERPRET=1 "
                "(before importing fusedaccum) to run Triton kernels on CPU tensors" + late)
    device = torch.device(device)
    if device.type == "cuda":
        return None if cuda else "CUDA is not available to torch on this machine"
    if device.type == "cpu":
        if _INTERPRETED:
            return None
        return ("Triton runs on CPU tensors only through its interpreter; set "
                "TRITON_INTERPRET=1 before importing fusedaccum to use it" + late)
    return (f"Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
            f"not on {device.type} tensors")


# --------------------------------------------------------------------------------------
# torch.library registration: opaque custom ops with fakes
# --------------------------------------------------------------------------------------


def _norm_code(norm_type) -> int:
    return _NORM_2 if norm_value(norm_type) == 2.0 else _NORM_INF  # (ValueError otherwise)


def _use_triton_op() -> bool:
    """Register the ops with ``torch.library.triton_op`` (inductor sees the kernels) on a
    GPU; with the opaque ``custom_op`` + fake under the interpreter, where ``triton_op``
    fails opcheck (torch 2.13, Triton 3.9). ``FUSEDACCUM_TRITON_OP=1``/``0`` forces it."""
    forced = os.environ.get("FUSEDACCUM_TRITON_OP", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return not _INTERPRETED and torch.cuda.is_available() \
        and hasattr(torch.library, "triton_op")


_TRITON_OP = _TRITON_IMPORT_ERROR is None and _use_triton_op()


def _define(name: str, mutates: tuple, fake=None, opaque: bool = False):
    """Decorator: op ``fusedaccum::<name>`` from ``fn(wrap, *args)``, ``wrap`` being
    ``torch.library.wrap_triton`` for a triton_op, else the identity (custom_op + fake).
    ``opaque`` ops (host-side tables of data pointers) are always custom_op."""

    def deco(fn):
        if _TRITON_OP and not opaque:
            wrap_triton = torch.library.wrap_triton

            def body(*args):
                return fn(wrap_triton, *args)

            body.__signature__ = _without_wrap(fn)
            body.__annotations__ = {k: v for k, v in fn.__annotations__.items() if k != "wrap"}
            try:
                return torch.library.triton_op(f"fusedaccum::{name}", body,
                                               mutates_args=mutates)
            except Exception as exc:  # noqa: BLE001 - an older torch: the opaque op still works
                warnings.warn(f"fusedaccum: triton_op registration of {name} failed ({exc}); "
                              "registering it as an opaque custom_op", RuntimeWarning,
                              stacklevel=2)

        def opaque_body(*args):
            return fn(_raw, *args)

        opaque_body.__signature__ = _without_wrap(fn)
        opaque_body.__annotations__ = {k: v for k, v in fn.__annotations__.items()
                                       if k != "wrap"}
        op = torch.library.custom_op(f"fusedaccum::{name}", opaque_body, mutates_args=mutates)
        op.register_fake(fake)
        return op

    return deco


def _without_wrap(fn):
    sig = inspect.signature(fn)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


if _TRITON_IMPORT_ERROR is None:

    @_define("triton_accumulate_", ("acc",), fake=lambda acc, grad, scale, overwrite: None)
    def _accumulate_op(wrap, acc: torch.Tensor, grad: torch.Tensor, scale: float,
                       overwrite: bool) -> None:
        _launch_accumulate(acc, grad, scale, overwrite, _NORM_NONE, wrap)

    @_define("triton_accumulate_norm_", ("acc",),
             fake=lambda acc, grad, scale, overwrite, norm_type: acc.new_empty(()))
    def _accumulate_norm_op(wrap, acc: torch.Tensor, grad: torch.Tensor, scale: float,
                            overwrite: bool, norm_type: float) -> torch.Tensor:
        return _launch_accumulate(acc, grad, scale, overwrite, _norm_code(norm_type), wrap)

    @_define("triton_accumulate_many_", ("accs",),
             fake=lambda accs, grads, scale, overwrite: None, opaque=True)
    def _accumulate_many_op(wrap, accs: list[torch.Tensor], grads: list[torch.Tensor],
                            scale: float, overwrite: list[int]) -> None:
        _launch_accumulate_many(accs, grads, scale, overwrite or None)

    @_define("triton_grad_norm", (), fake=lambda tensors, norm_type: tensors[0].new_empty(()))
    def _grad_norm_op(wrap, tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
        return _launch_grad_norm(tensors, _norm_code(norm_type), wrap)

    @_define("triton_adamw_step_",
             ("param", "acc", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "model_out"),
             fake=lambda *args: None)
    def _adamw_op(wrap, param: torch.Tensor, acc: torch.Tensor, exp_avg: torch.Tensor,
                  exp_avg_sq: torch.Tensor, max_exp_avg_sq: torch.Tensor | None,
                  model_out: torch.Tensor | None, grad_mult: torch.Tensor,
                  found_inf: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, step: int, decoupled_weight_decay: bool, amsgrad: bool,
                  maximize: bool, zero_acc: bool) -> None:
        _launch_adamw(param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq, model_out, grad_mult,
                      found_inf, lr, beta1, beta2, eps, weight_decay, step,
                      decoupled_weight_decay, amsgrad, maximize, zero_acc, wrap)

    @_define("triton_sgd_step_", ("param", "acc", "momentum_buffer", "model_out"),
             fake=lambda *args: None)
    def _sgd_op(wrap, param: torch.Tensor, acc: torch.Tensor,
                momentum_buffer: torch.Tensor | None, model_out: torch.Tensor | None,
                grad_mult: torch.Tensor, found_inf: torch.Tensor, lr: float, momentum: float,
                dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
                first_step: bool, zero_acc: bool) -> None:
        _launch_sgd(param, acc, momentum_buffer, model_out, grad_mult, found_inf, lr,
                    momentum, dampening, weight_decay, nesterov, maximize, first_step, zero_acc,
                    wrap)


def _require_triton():
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(unavailable_reason("triton", None))


# --------------------------------------------------------------------------------------
# public ops (same signatures as fusedaccum.ops.reference)
# --------------------------------------------------------------------------------------


# In eager mode the public ops call the launchers directly and bump the version counters
# of what they wrote themselves: going through the custom ops costs ~10-50 us of Python
# per call (measured on an H200), more than the kernels of small tensors take. Under
# torch.compile the custom ops are what the graph records.
_compiling = torch.compiler.is_compiling
_bump = torch.autograd.graph.increment_version


def accumulate_(acc, grad, scale=1.0, *, overwrite=False, norm_type=None):
    _check_flat("acc", acc, (torch.float32,), None, None, True)  # (True: it is written)
    _check_flat("grad", grad, FLOAT_DTYPES, acc.numel(), acc.device)
    _require_triton()
    norm = _NORM_NONE if norm_type is None else _norm_code(norm_type)  # fails before writes
    scale, overwrite = check_accumulate_args(acc, grad, scale, overwrite)
    if not _compiling():
        out = _launch_accumulate(acc, grad, scale, overwrite, norm)
        _bump(acc)
        return out
    if norm_type is None:
        torch.ops.fusedaccum.triton_accumulate_(acc, grad, scale, overwrite)
        return None
    return torch.ops.fusedaccum.triton_accumulate_norm_(acc, grad, scale, overwrite,
                                                        float(norm_type))


def accumulate_many_(accs, grads, scale=1.0, *, overwrite=None, norm_type=None,
                     trusted=False):
    if norm_type is not None:  # the statistic by a separate pass (no fused form here)
        check_norm_type(norm_type)
        accumulate_many_(accs, grads, scale, overwrite=overwrite, trusted=trusted)
        return many_stat(accs, norm_type)
    if not trusted:  # the caller guarantees what check_many_args checks
        scale, overwrite = check_many_args(accs, grads, scale, overwrite)
    if not accs:
        return None
    _require_triton()
    if not _compiling():
        _launch_accumulate_many(accs, grads, float(scale), overwrite)
        _bump(accs)  # one call for the list (a Python call per acc cost ~1 us each)
        return None
    torch.ops.fusedaccum.triton_accumulate_many_(accs, grads, float(scale), list(overwrite or ()))
    return None


def grad_norm(tensors, norm_type=2.0):
    tensors = check_norm_inputs(tensors)
    norm = _norm_code(norm_type)
    _require_triton()
    if not _compiling():
        return _launch_grad_norm(tensors, norm)
    return torch.ops.fusedaccum.triton_grad_norm(tensors, float(norm_type))


def adamw_step_(param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq=None, model_out=None, *,
                grad_mult, found_inf, lr, beta1, beta2, eps, weight_decay, step,
                decoupled_weight_decay=True, amsgrad=False, maximize=False, zero_acc=True,
                trusted=False):
    if not trusted:  # (the wrapper's own flat buffers: it guarantees what these check)
        lr, beta1, beta2, eps, weight_decay, step = check_adamw_inputs(
            param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq, model_out, grad_mult=grad_mult,
            found_inf=found_inf, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, step=step, decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad, maximize=maximize, zero_acc=zero_acc)
    _require_triton()
    dev = param.device
    args = (
        param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else None, model_out,
        device_scalar("grad_mult", grad_mult, dev), device_scalar("found_inf", found_inf, dev),
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step),
        bool(decoupled_weight_decay), bool(amsgrad), bool(maximize), bool(zero_acc),
    )
    if _compiling():
        torch.ops.fusedaccum.triton_adamw_step_(*args)
        return
    _launch_adamw(*args)
    _bump([t for t in args[:6] if t is not None])


def sgd_step_(param, acc, momentum_buffer=None, model_out=None, *, grad_mult, found_inf,
              lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
              zero_acc=True, trusted=False):
    if not trusted:
        lr, momentum, dampening, weight_decay = check_sgd_inputs(
            param, acc, momentum_buffer, model_out, grad_mult=grad_mult, found_inf=found_inf,
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, first_step=first_step, zero_acc=zero_acc)
    _require_triton()
    dev = param.device
    args = (
        param, acc, momentum_buffer if momentum != 0 else None, model_out,
        device_scalar("grad_mult", grad_mult, dev), device_scalar("found_inf", found_inf, dev),
        float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov),
        bool(maximize), bool(first_step), bool(zero_acc),
    )
    if _compiling():
        torch.ops.fusedaccum.triton_sgd_step_(*args)
        return
    _launch_sgd(*args)
    _bump([t for t in args[:4] if t is not None])


__all__ = ["unavailable_reason", "accumulate_", "accumulate_many_", "grad_norm", "adamw_step_",
           "sgd_step_"]
