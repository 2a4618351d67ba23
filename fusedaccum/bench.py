"""Microbenchmarks: ``python -m fusedaccum bench`` (DESIGN.md sections 3, 3b and 4).

What is measured (bench/README.md has the long form):

* **copy bandwidth** of the device, in the same run: on a CPU the better of
  ``dst.copy_(src)`` and an in-place ``x.mul_(c)`` over large fp32 tensors with the
  thread count every other measurement uses; on CUDA a large device-to-device
  ``copy_`` timed with CUDA events. Bytes = read + write (8 per element).
* **ops** (``accumulate_``, ``grad_norm``, ``adamw_step_``, ``sgd_step_``) per backend
  that runs on the device and per size: the median time per call after warm-up, over
  many calls, with the inputs rotated among enough buffer sets that one pass over them
  overflows the last-level cache (so small sizes are not served from cache); GB/s
  computed from the bytes the op must move (:func:`byte_breakdown`), and that as a
  fraction of the copy bandwidth.
* **windows** (k micro-batches + the boundary) on transformer-shaped param lists:
  :class:`FusedAccumulator` per backend against the plain-PyTorch peers, alternated
  round by round in the same run; speed ratio = peer time / our time (> 1: ours is
  faster), peak memory and launches (op calls, CUDA kernels) per window.

Every micro-batch of every contender is a real autograd pass from one scalar root, as
``loss.backward()`` runs: one autograd node hands every param its pre-made gradient (in the
param dtype), which runs the params' ``AccumulateGrad`` nodes and therefore every hook
exactly as a training backward does (no model forward or matmuls, which would be the same for all
contenders). Our contender is the public wrapper used as DESIGN.md section 1 writes it.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import csv
import datetime as _dt
import gc
import importlib.util
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from fusedaccum import ops as _ops

KI = 1024
FULL_SIZES = [KI * 4**i for i in range(10)]  # 1K, 4K, ..., 64M, 256M elements
QUICK_SIZES = [KI, 16 * KI, 256 * KI, 1024 * KI]

# hyper-parameters shared by every contender (the math must be the same everywhere)
K_WINDOW = 4
LR, BETAS, EPS, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-3, (0.9, 0.999), 1e-8, 0.1, 1.0
SGD_MOMENTUM, SGD_WEIGHT_DECAY = 0.9, 0.01
GRAD_STD, INIT_STD = 1e-2, 0.02
# an op's calls rotate through input sets totalling this many times the last-level cache
ROTATION_CACHE_MULTIPLE = 8

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# =============================================================================== bytes


def byte_breakdown(op: str, *, grad_dtype: torch.dtype = torch.bfloat16, half_copy: bool = True,
                   zero_acc: bool = True, momentum: bool = True, amsgrad: bool = False,
                   overwrite: bool = False) -> list[tuple[str, int]]:
    """The bytes per element ``op`` must read or write, as ``(what, bytes)`` pairs.

    These are the floors of DESIGN.md section 3: every input read once, every output
    written once, nothing else. GB/s in the reports = sum of these * numel / time.
    """
    if op == "accumulate_":
        g = torch.empty((), dtype=grad_dtype).element_size()
        parts = [(f"read grad ({_DTYPE_NAMES.get(grad_dtype, str(grad_dtype))})", g)]
        if not overwrite:
            parts.append(("read acc (fp32)", 4))
        parts.append(("write acc (fp32)", 4))
    elif op == "grad_norm":
        parts = [("read acc (fp32)", 4)]
    elif op == "adamw_step_":
        parts = [("read acc", 4), ("read param (fp32 master)", 4), ("read exp_avg", 4),
                 ("read exp_avg_sq", 4)]
        if amsgrad:
            parts.append(("read max_exp_avg_sq", 4))
        parts += [("write param", 4), ("write exp_avg", 4), ("write exp_avg_sq", 4)]
        if amsgrad:
            parts.append(("write max_exp_avg_sq", 4))
        if half_copy:
            parts.append(("write bf16/fp16 model copy", 2))
        if zero_acc:
            parts.append(("zero acc", 4))
    elif op == "sgd_step_":
        parts = [("read acc", 4), ("read param (fp32 master)", 4)]
        if momentum:
            parts.append(("read momentum_buffer", 4))
        parts.append(("write param", 4))
        if momentum:
            parts.append(("write momentum_buffer", 4))
        if half_copy:
            parts.append(("write bf16/fp16 model copy", 2))
        if zero_acc:
            parts.append(("zero acc", 4))
    elif op in ("copy_", "mul_"):
        parts = [("read (fp32)", 4), ("write (fp32)", 4)]
    else:
        raise ValueError(f"unknown op {op!r}")
    return parts


def bytes_per_element(op: str, **kwargs) -> int:
    """Sum of :func:`byte_breakdown`: 10 for accumulate_ of a bf16 grad, 34 for AdamW ..."""
    return sum(b for _, b in byte_breakdown(op, **kwargs))


def window_floor_bytes_per_param(k: int = K_WINDOW, grad_itemsize: int = 2,
                                 norm_pass: bool = True) -> int:
    """Bytes per param element the fused path must move in one window of our harness.

    Per micro-batch: the backward's fresh gradient, the harness's copy of the pre-made one
    (read + write, ``2 * grad_itemsize``; with ``--premade-grads`` AccumulateGrad's copy
    into ``p.grad`` for the peers, which ours skips) and ``accumulate_`` (``grad_itemsize`` + 8,
    but the window's first one overwrites the accumulator the last boundary left: 4
    less); at the boundary the norm (4, where it makes a pass of its own: ``norm_pass``)
    and the AdamW step without zeroing the accumulator: 30 with the half copy of fp16/bf16
    params, 28 for fp32 params (``grad_itemsize`` 4), which are themselves the master.
    """
    return (k * (3 * grad_itemsize + 8) - 4 + (4 if norm_pass else 0)
            + bytes_per_element("adamw_step_", zero_acc=False, half_copy=grad_itemsize != 4))


def norm_makes_a_pass(device: torch.device, grad_itemsize: int) -> bool:
    """Whether the window's clipping norm reads the accumulators in a pass of its own: on a
    CPU, for half gradients in one process, it rides on the last micro-batch's
    accumulations instead (DESIGN.md section 4: 34 B at the boundary, 38 when it cannot)."""
    return not (device.type == "cpu" and grad_itemsize == 2)


@dataclass(frozen=True)
class OpSpec:
    key: str  # name on the command line and in the reports
    op: str  # function of fusedaccum.ops
    grad_dtype: torch.dtype | None = None

    def breakdown(self) -> list[tuple[str, int]]:
        return byte_breakdown(self.op, grad_dtype=self.grad_dtype or torch.float32)

    @property
    def bytes_per_element(self) -> int:
        return sum(b for _, b in self.breakdown())

    @property
    def label(self) -> str:
        if self.op == "accumulate_":
            return f"accumulate_ ({_DTYPE_NAMES[self.grad_dtype]} grad)"
        if self.op == "sgd_step_":
            return "sgd_step_ (momentum)"
        return self.op


OP_SPECS = {s.key: s for s in (
    OpSpec("accumulate_bf16", "accumulate_", torch.bfloat16),
    OpSpec("accumulate_fp32", "accumulate_", torch.float32),
    OpSpec("grad_norm", "grad_norm"),
    OpSpec("adamw_step_", "adamw_step_"),
    OpSpec("sgd_step_", "sgd_step_"),
)}


# =============================================================================== helpers


def parse_size(text: str) -> int:
    """'1K' -> 1024, '64M' -> 67108864, '2G', '4096', '2^20' (binary units)."""
    t = text.strip().upper().replace("_", "")
    m = re.fullmatch(r"2\^(\d+)", t)
    if m:
        return 1 << int(m.group(1))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]?)I?B?", t)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 4096, 64K, 16M, 2^20")
    value = float(m.group(1)) * {"": 1, "K": KI, "M": KI**2, "G": KI**3}[m.group(2)]
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"bad size {text!r}: must be a whole number >= 1")
    return int(value)


def parse_sizes(text: str) -> list[int]:
    return sorted({parse_size(s) for s in text.split(",") if s.strip()})


def fmt_size(n: int) -> str:
    for unit, div in (("G", KI**3), ("M", KI**2), ("K", KI)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def fmt_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def fmt_time(s: float | None) -> str:
    if s is None or math.isnan(s):
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def sanitize(name: str) -> str:
    s = re.sub(r"\((?:R|TM|tm|r)\)", "", name)
    s = re.sub(r"[^A-Za-z0-9.+]+", "-", s).strip("-.")
    return s or "device"


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            m = re.fullmatch(r"(\d+)([KMG]?)", text)
            if m:
                best = max(best, int(m.group(1)) * {"": 1, "K": KI, "M": KI**2,
                                                     "G": KI**3}[m.group(2)])
    except OSError:
        pass
    return best or 32 * 2**20


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off while windows are timed, as ``timeit`` does:
    with torch imported a full collection is a pause of ~50 ms (167k objects on the
    2-core CPU), which lands on whichever contender's window happens to allocate then;
    over a few windows of a large model (5 on the H200's 1.5B list) one such pause moves a
    median. Collected once after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.collect()


@contextlib.contextmanager
def hook_settings(fast: bool | None = None, flush_bytes: int | None = None,
                  batch_max_numel: int | None = None, table_flush: bool | None = None,
                  pre_hook: bool | None = None):
    """Wrappers made inside get the C++ batching hook on or off (``FUSEDACCUM_FAST_HOOKS``),
    another batch flush size, another largest batched gradient (larger ones are
    accumulated alone), a triton bucket's full batches flushed by the C++ hook or in
    Python (``accumulator._TABLE_FLUSH``) and/or the C++ hook taking gradients before
    AccumulateGrad or not (``accumulator._PRE_HOOK``): all are read when a wrapper
    installs its hooks, so a contender built here keeps them. Put back after."""
    from fusedaccum import accumulator as acc_mod

    env = os.environ.get("FUSEDACCUM_FAST_HOOKS")
    flush = acc_mod._BATCH_FLUSH_BYTES, acc_mod._BATCH_FLUSH_BYTES_CPU
    batch_max, table, pre = acc_mod._BATCH_MAX_NUMEL, acc_mod._TABLE_FLUSH, acc_mod._PRE_HOOK
    try:
        if table_flush is not None:
            acc_mod._TABLE_FLUSH = table_flush
        if pre_hook is not None:
            acc_mod._PRE_HOOK = pre_hook
        if fast is not None:
            os.environ["FUSEDACCUM_FAST_HOOKS"] = "1" if fast else "0"
        if flush_bytes is not None:  # (on every device)
            acc_mod._BATCH_FLUSH_BYTES = acc_mod._BATCH_FLUSH_BYTES_CPU = flush_bytes
        if batch_max_numel is not None:
            acc_mod._BATCH_MAX_NUMEL = batch_max_numel
        yield
    finally:
        acc_mod._BATCH_FLUSH_BYTES, acc_mod._BATCH_FLUSH_BYTES_CPU = flush
        acc_mod._BATCH_MAX_NUMEL, acc_mod._TABLE_FLUSH = batch_max, table
        acc_mod._PRE_HOOK = pre
        if env is None:
            os.environ.pop("FUSEDACCUM_FAST_HOOKS", None)
        else:
            os.environ["FUSEDACCUM_FAST_HOOKS"] = env


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _short(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fill_random_(t: torch.Tensor, lo: float, hi: float, seed: int) -> torch.Tensor:
    """Fill ``t`` with uniform values in [lo, hi): a random block of up to 64K elements,
    tiled by copies (memory speed; drawing 64M random numbers takes ~1 s on a CPU)."""
    flat = t.view(-1)
    n = flat.numel()
    if n == 0:
        return t
    gen = torch.Generator(device=t.device).manual_seed(seed)
    block = min(n, 1 << 16)
    base = torch.empty(block, dtype=torch.float32, device=t.device).uniform_(lo, hi,
                                                                              generator=gen)
    base = base.to(t.dtype)
    reps, tail = divmod(n, block)
    with torch.no_grad():
        if reps:
            flat[:reps * block].view(reps, block).copy_(base.expand(reps, block))
        if tail:
            flat[reps * block:].copy_(base[:tail])
    return t


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = (st.device.type, st.data_ptr())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


class Progress:
    """tqdm on a terminal when importable; plain lines on stderr otherwise (verbose only)."""

    # plain lines: at most one per this many seconds
    INTERVAL_S = 1.0

    def __init__(self, total: int, enabled: bool = True, desc: str = "bench"):
        self._bar, self.enabled, self.n, self.total = None, enabled, 0, total
        self.desc, self._last = desc, -math.inf
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                                 dynamic_ncols=True)

    def set(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)
        elif self.enabled and time.perf_counter() - self._last >= self.INTERVAL_S:
            # (no tqdm, or stderr is not a terminal: a log, CI, `| tee`)
            self._last = time.perf_counter()
            print(f"{self.desc} [{self.n}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def write(self, text: str = "") -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_table(headers: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    cols = len(headers)
    rows = [[str(c) for c in r] + [""] * (cols - len(r)) for r in rows]
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * cols) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(headers[i]), *(len(r[i]) for r in rows)) if rows else len(headers[i])
              for i in range(cols)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                     for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


# =============================================================================== timing


@dataclass
class Timing:
    median_s: float
    q1_s: float
    q3_s: float
    samples: int
    calls_per_sample: int
    n_sets: int = 1


@dataclass
class TimingConfig:
    budget_s: float = 0.5  # time spent sampling one measurement (after warm-up)
    warmup_s: float = 0.05
    min_samples: int = 5
    max_samples: int = 200
    target_sample_s: float = 2e-3  # calls are batched until one sample lasts this long


def time_calls(fn, device: torch.device, tc: TimingConfig, n_sets: int = 1) -> Timing:
    """Median seconds per ``fn(i)`` call (``i``: running call number, used to rotate sets).

    Warm-up: at least 2 calls and ``warmup_s``. Then samples of ``calls_per_sample``
    back-to-back calls (so that one sample lasts ``target_sample_s``), timed with
    ``perf_counter`` on CPU and CUDA events on GPU; median and quartiles over samples,
    divided by the calls per sample.
    """
    calls = 0
    singles = []
    t_end = time.perf_counter() + tc.warmup_s
    while calls < 2 or (time.perf_counter() < t_end and calls < 10_000):
        t0 = time.perf_counter()
        fn(calls)
        sync(device)
        singles.append(time.perf_counter() - t0)
        calls += 1
    per_call = max(min(singles[-5:]), 1e-7)
    inner = max(1, int(math.ceil(tc.target_sample_s / per_call)))
    samples = int(tc.budget_s / (inner * per_call))
    samples = max(tc.min_samples, min(tc.max_samples, samples))
    times = []
    if device.type == "cuda":
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(samples)]
        for start, end in evs:
            start.record()
            for _ in range(inner):
                fn(calls)
                calls += 1
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) * 1e-3 for start, end in evs]
    else:
        for _ in range(samples):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn(calls)
                calls += 1
            times.append(time.perf_counter() - t0)
    per = sorted(t / inner for t in times)
    q1, q3 = quartiles(per)
    return Timing(statistics.median(per), q1, q3, samples, inner, n_sets)


def quartiles(values) -> tuple[float, float]:
    """First and third quartiles of the values measured, interpolated between them
    (never beyond them: the default "exclusive" method extrapolates from a few samples,
    and gave a negative quartile of a per-round ratio from two rounds); one value: it."""
    values = list(values)
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# =============================================================================== copy BW


@dataclass
class CopyBandwidth:
    gbps: float  # the reference: the better of the methods measured
    method: str
    numel: int
    results: dict[str, float] = field(default_factory=dict)  # method -> GB/s
    threads: int = 1


def measure_copy_bandwidth(device: torch.device, numel: int, tc: TimingConfig) -> CopyBandwidth:
    src = fill_random_(torch.empty(numel, device=device), -1.0, 1.0, seed=1)
    dst = torch.empty_like(src)
    nbytes = bytes_per_element("copy_") * numel
    results = {}
    t = time_calls(lambda i: dst.copy_(src), device, tc)
    results["copy_"] = nbytes / t.median_s / 1e9
    factors = (1.0001, 1.0 / 1.0001)  # alternate so the values stay bounded
    t = time_calls(lambda i: src.mul_(factors[i & 1]), device, tc)
    results["mul_"] = nbytes / t.median_s / 1e9
    if device.type == "cuda":
        method = "copy_"  # DESIGN.md section 4: a large device-to-device copy on a GPU
    else:
        method = max(results, key=results.get)
    return CopyBandwidth(results[method], method, numel, results, torch.get_num_threads())


# =============================================================================== ops


def combine_copy_bandwidth(measurements: list[CopyBandwidth]) -> CopyBandwidth:
    """All measurements of one run (before each op and at the end); the reference is the best.

    Taking the best one means a slow moment of a shared machine cannot inflate the
    fractions of the ops measured against it. ``results`` keeps every measurement
    (``"mul_ #2"``: the second measurement of ``mul_``).
    """
    if len(measurements) == 1:
        return measurements[0]
    results = {}
    for i, m in enumerate(measurements, 1):
        results.update({f"{k} #{i}": v for k, v in m.results.items()})
    best_i = max(range(len(measurements)), key=lambda i: measurements[i].gbps)
    best = measurements[best_i]
    return CopyBandwidth(best.gbps, f"{best.method} #{best_i + 1}", best.numel, results,
                         best.threads)


def make_op_sets(spec: OpSpec, n: int, device: torch.device, n_sets: int = 1,
                 seed: int = 0) -> list[dict]:
    """``n_sets`` independent input sets of ``n`` elements for ``spec``'s op.

    Each kind of buffer of all sets is one allocation, filled once; the sets are its
    contiguous rows (so creating thousands of small sets stays cheap).
    """
    f32 = dict(dtype=torch.float32, device=device)

    def buf(lo, hi, s, dtype=torch.float32):
        t = torch.empty(n_sets, n, dtype=dtype, device=device)
        return fill_random_(t, lo, hi, seed + s)

    if spec.op == "accumulate_":
        cols = {"acc": buf(-1e-3, 1e-3, 0), "grad": buf(-1e-3, 1e-3, 1, spec.grad_dtype)}
    elif spec.op == "grad_norm":
        cols = {"acc": buf(-1e-3, 1e-3, 0)}
    else:
        cols = {"param": buf(-0.05, 0.05, 0), "acc": buf(-1e-2, 1e-2, 1)}
        cols["model_out"] = cols["param"].to(torch.bfloat16)
        if spec.op == "adamw_step_":
            cols["exp_avg"] = buf(-1e-3, 1e-3, 2)
            cols["exp_avg_sq"] = buf(1e-8, 1e-6, 3)
        elif spec.op == "sgd_step_":
            cols["momentum_buffer"] = buf(-1e-3, 1e-3, 2)
    sets = []
    for i in range(n_sets):
        x = {k: v[i] for k, v in cols.items()}
        if spec.op in ("adamw_step_", "sgd_step_"):
            x["grad_mult"] = torch.full((), 0.25, **f32)
            x["found_inf"] = torch.zeros((), **f32)
        sets.append(x)
    return sets


def make_op_inputs(spec: OpSpec, n: int, device: torch.device, seed: int = 0) -> dict:
    """One input set (see :func:`make_op_sets`)."""
    return make_op_sets(spec, n, device, 1, seed)[0]


def op_set_bytes(spec: OpSpec, n: int) -> int:
    """Bytes of one input set (what one call touches)."""
    if spec.op == "accumulate_":
        return n * (4 + torch.empty((), dtype=spec.grad_dtype).element_size())
    if spec.op == "grad_norm":
        return 4 * n
    return n * (2 + 4 * (4 if spec.op == "adamw_step_" else 3))


def op_callable(spec: OpSpec, mod, inputs: dict):
    """A zero-argument call of the op on ``inputs`` through backend module ``mod``."""
    x = inputs
    if spec.op == "accumulate_":
        acc, grad = x["acc"], x["grad"]
        return lambda: mod.accumulate_(acc, grad, 1.0)
    if spec.op == "grad_norm":
        tensors = [x["acc"]]
        return lambda: mod.grad_norm(tensors, 2.0)
    if spec.op == "adamw_step_":
        args = (x["param"], x["acc"], x["exp_avg"], x["exp_avg_sq"], None, x["model_out"])
        kw = dict(grad_mult=x["grad_mult"], found_inf=x["found_inf"], lr=LR, beta1=BETAS[0],
                  beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY, step=10)
        return lambda: mod.adamw_step_(*args, **kw)
    if spec.op == "sgd_step_":
        args = (x["param"], x["acc"], x["momentum_buffer"], x["model_out"])
        kw = dict(grad_mult=x["grad_mult"], found_inf=x["found_inf"], lr=LR,
                  momentum=SGD_MOMENTUM, dampening=0.0, weight_decay=SGD_WEIGHT_DECAY,
                  nesterov=False, maximize=False, first_step=False)
        return lambda: mod.sgd_step_(*args, **kw)
    raise ValueError(spec.op)


PEER = "torch"  # the op benchmarks' plain-PyTorch contender (TorchPeer)


class TorchPeer:
    """Each op done the strongest plain-PyTorch way, with the backends' signatures, timed
    beside them in the op benchmarks (the ratio columns: its time / the backend's):

    * ``accumulate_``: ``acc.add_(grad, alpha=scale)`` (Megatron's ``main_grad`` add);
    * ``grad_norm``: ``clip_grad_norm_``'s norm, ``torch._foreach_norm`` + a 2-norm of those;
    * ``adamw_step_`` / ``sgd_step_``: ``torch.optim.AdamW(fused=True)``'s and
      ``SGD(fused=True)``'s kernels (``torch._fused_adamw_`` / ``_fused_sgd_``, given
      ``1 / grad_mult`` as their ``grad_scale`` and the ``found_inf`` flag, so no separate
      scaling pass), then the copy into the half model params and the zeroing of the
      accumulator: three passes where a backend makes one.

    The GB/s column counts the bytes the op must move, for the peer too: the same work.
    """

    def __init__(self):
        # what a training loop keeps between steps, not made per call: the step counts
        # (torch.optim's state) and the divisor given as grad_scale (GradScaler's scale)
        self._steps: dict = {}
        self._inverse: dict = {}

    def accumulate_(self, acc, grad, scale=1.0):
        acc.add_(grad, alpha=scale)

    def grad_norm(self, tensors, norm_type=2.0):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, norm_type)),
                                        norm_type)

    def _step_tensor(self, device, step):
        key = (device, step)
        if key not in self._steps:
            self._steps[key] = torch.full((), float(step), dtype=torch.float32, device=device)
        return self._steps[key]

    def _grad_scale(self, grad_mult):
        key = id(grad_mult)  # (the inputs hold their grad_mult for the whole run)
        if key not in self._inverse:
            self._inverse[key] = (grad_mult, grad_mult.reciprocal())
        return self._inverse[key][1]

    def adamw_step_(self, param, acc, exp_avg, exp_avg_sq, max_exp_avg_sq=None, model_out=None,
                    *, grad_mult, found_inf, lr, beta1, beta2, eps, weight_decay, step,
                    **_flags):
        torch._fused_adamw_([param], [acc], [exp_avg], [exp_avg_sq], [],
                            [self._step_tensor(param.device, step)], lr=lr, beta1=beta1,
                            beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False,
                            maximize=False, grad_scale=self._grad_scale(grad_mult),
                            found_inf=found_inf)
        if model_out is not None:
            model_out.copy_(param)
        acc.zero_()

    def sgd_step_(self, param, acc, momentum_buffer=None, model_out=None, *, grad_mult,
                  found_inf, lr, momentum, dampening, weight_decay, nesterov, maximize,
                  first_step):
        torch._fused_sgd_([param], [acc], [] if momentum_buffer is None else [momentum_buffer],
                          weight_decay=weight_decay, momentum=momentum, lr=lr,
                          dampening=dampening, nesterov=nesterov, maximize=maximize,
                          is_first_step=first_step, grad_scale=self._grad_scale(grad_mult),
                          found_inf=found_inf)
        if model_out is not None:
            model_out.copy_(param)
        acc.zero_()


def bench_backends(device: torch.device, requested: list[str] | None = None):
    """(backends to time, {backend: why excluded}) for tensors on ``device``."""
    runnable, excluded = [], {}
    for name in _ops.BACKENDS:
        if requested is not None and name not in requested:
            continue
        why = _ops.unavailable_reason(name, device)
        if why is None and name == "triton" and device.type != "cuda":
            why = ("runs on CPU only through the Triton interpreter (TRITON_INTERPRET=1), "
                   "whose timings say nothing about kernel speed; timed on CUDA only")
        if why is None:
            runnable.append(name)
        else:
            excluded[name] = why
    if requested is not None:
        for name in requested:
            if name == "auto":  # (windows: timed wherever cuda and triton both run)
                if not {"cuda", "triton"} <= set(runnable):
                    excluded[name] = ("auto is timed in the windows when cuda and triton are "
                                      "both timed (list them too)")
            elif name not in _ops.BACKENDS:
                excluded[name] = f"unknown backend; choose from {', '.join(_ops.BACKENDS)}"
    return runnable, excluded


@dataclass
class OpResult:
    op: str
    label: str
    backend: str
    numel: int
    bytes_per_elem: int
    timing: Timing | None = None
    gbps: float = float("nan")
    frac: float = float("nan")
    note: str = ""


def run_op_benchmarks(specs, sizes, backends, device, tc: TimingConfig, copy_bw: float,
                      progress: Progress, max_sets: int = 4096,
                      before_op=None) -> list[OpResult]:
    """Every op x size x backend; ``before_op(spec)`` runs before each op's size sweep (the
    CLI re-measures the copy bandwidth there, to follow a shared machine's drift)."""
    results: list[OpResult] = []
    target = ROTATION_CACHE_MULTIPLE * last_level_cache_bytes(device)
    # resolved once, as the wrapper does; PEER is plain PyTorch
    modules = {b: TorchPeer() if b == PEER else _ops.get(b, device) for b in backends}
    for i, spec in enumerate(specs):
        if before_op is not None and i > 0:
            before_op(spec)
        for n in sizes:
            set_bytes = op_set_bytes(spec, n)
            n_sets = max(1, min(max_sets, math.ceil(target / max(1, set_bytes))))
            # room for the sets and for a backend's temporaries (reference: ~8 fp32 per elt)
            need = set_bytes * n_sets + 40 * n
            avail = available_memory(device)
            base = dict(op=spec.key, label=spec.label, numel=n,
                        bytes_per_elem=spec.bytes_per_element)
            if need > 0.7 * avail:
                for b in backends:
                    results.append(OpResult(backend=b, note=f"skipped: needs ~{fmt_bytes(need)}"
                                            f", {fmt_bytes(avail)} available", **base))
                    progress.update()
                continue
            progress.set(f"{spec.key} {fmt_size(n)}")
            try:
                sets = make_op_sets(spec, n, device, n_sets, seed=17)
            except Exception as exc:  # noqa: BLE001 - out of memory and the like
                for b in backends:
                    results.append(OpResult(backend=b, note=f"setup failed: {_short(exc)}",
                                            **base))
                    progress.update()
                continue
            calls: list = []
            for b in backends:
                calls = [op_callable(spec, modules[b], s) for s in sets]
                res = OpResult(backend=b, **base)
                try:
                    with torch.no_grad():
                        res.timing = time_calls(lambda i, c=calls, m=n_sets: c[i % m](), device, tc,
                                                n_sets)
                    res.gbps = spec.bytes_per_element * n / res.timing.median_s / 1e9
                    res.frac = res.gbps / copy_bw
                except Exception as exc:  # noqa: BLE001 - a backend still being written
                    res.note = f"error: {_short(exc)}"
                results.append(res)
                progress.update()
            del sets, calls
            if set_bytes * n_sets > 2**28:
                gc.collect()  # (slow with torch imported: only for large buffers)
    return results


# =============================================================================== models


@dataclass(frozen=True)
class ModelShape:
    name: str
    d: int  # width
    layers: int
    vocab: int  # 0: no token embedding
    ctx: int  # 0: no position embedding
    label: str
    note: str = ""

    def shapes(self) -> list[tuple[int, ...]]:
        """GPT-2 parameter shapes in ``GPT2LMHeadModel.parameters()`` order (lm_head tied)."""
        d = self.d
        out: list[tuple[int, ...]] = []
        if self.vocab:
            out.append((self.vocab, d))
        if self.ctx:
            out.append((self.ctx, d))
        for _ in range(self.layers):
            out += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                    (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
        out += [(d,), (d,)]
        return out

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes())

    @property
    def tensors(self) -> int:
        return len(self.shapes())


MODELS = {m.name: m for m in (
    ModelShape("gpt2-124m", 768, 12, 50257, 1024, "GPT-2 124M"),
    ModelShape("gpt2-124m/4", 192, 12, 12565, 256, "GPT-2-124M-shaped, scaled down",
               "same 148 tensors, width/vocab/context divided by 4"),
    ModelShape("gpt2-124m/8", 96, 12, 6283, 128, "GPT-2-124M-shaped, scaled down",
               "same 148 tensors, width/vocab/context divided by 8"),
    ModelShape("gpt2-1.5b", 1600, 48, 50257, 1024, "GPT-2 XL 1.5B"),
    ModelShape("gpt2-1.5b-2layers", 1600, 2, 0, 0, "stand-in for the 1.5B list",
               "2 of GPT-2 XL's 48 transformer blocks at full width (its large tensors), "
               "no embeddings"),
    ModelShape("gpt2-1.5b-1layer", 1600, 1, 0, 0, "stand-in for the 1.5B list",
               "1 of GPT-2 XL's 48 transformer blocks at full width (its large tensors), "
               "no embeddings"),
    ModelShape("gpt2-1.5b-2layers/4", 400, 2, 0, 0, "stand-in for the 1.5B list, scaled down",
               "2 GPT-2-XL-shaped blocks at width 1600/4, no embeddings"),
    ModelShape("gpt2-124m-host", 16, 12, 256, 16, "GPT-2-124M's tensors at width 16",
               "the same 148 tensors, tiny: host time per window only (window_phases.py)"),
    ModelShape("tiny", 32, 2, 64, 16, "tiny (tests)", "2 blocks of width 32"),
)}


def default_models(device: torch.device, quick: bool) -> list[str]:
    if device.type == "cuda":
        return ["gpt2-124m/4", "gpt2-1.5b-1layer"] if quick else ["gpt2-124m", "gpt2-1.5b"]
    if quick:
        return ["gpt2-124m/8", "gpt2-1.5b-2layers/4"]
    return ["gpt2-124m/4", "gpt2-1.5b-1layer"]


# =============================================================================== windows


class Workload:
    """The param list of one model, its initial values and the synthetic gradients."""

    def __init__(self, model: ModelShape, device: torch.device, dtype: torch.dtype,
                 k: int = K_WINDOW, seed: int = 0):
        self.model, self.device, self.dtype, self.k, self.seed = model, device, dtype, k, seed
        self.shapes = model.shapes()
        self.numel = model.numel
        self._init = None
        self._grads_div_k = None
        # one gradient per param, the same in every micro-batch ("what autograd produced")
        self.grads = [self._rand(s, GRAD_STD, seed + 100_003 + i)
                      for i, s in enumerate(self.shapes)]

    @property
    def grads_div_k(self) -> list[torch.Tensor]:
        """The tutorial loop divides its loss by k, so its grads are ``grads / k``."""
        if self._grads_div_k is None:
            self._grads_div_k = [g / self.k for g in self.grads]
        return self._grads_div_k

    def _rand(self, shape, std, seed):
        t = torch.empty(shape, dtype=self.dtype, device=self.device)
        return fill_random_(t, -std * math.sqrt(3), std * math.sqrt(3), seed)

    @property
    def init(self) -> list[torch.Tensor]:
        if self._init is None:
            self._init = [self._rand(s, INIT_STD, self.seed + i)
                          for i, s in enumerate(self.shapes)]
        return self._init

    def release(self) -> None:
        """Drop the initial values and the tutorial's grads (rebuilt on demand)."""
        self._init = None
        self._grads_div_k = None

    def fresh_params(self) -> list[torch.Tensor]:
        return [t.clone().requires_grad_(True) for t in self.init]

    def shared_bytes(self, tutorial: bool = True) -> int:
        """The grads, the initial values while building, the tutorial's grads."""
        return (2 + tutorial) * self.numel * torch.empty((), dtype=self.dtype).element_size()


class Contender(abc.ABC):
    """One way of running an accumulation window; subclasses fill in the parts."""

    name = "?"
    ours = False
    est_bytes_per_param = 18.0  # persistent + transient, for the memory planner

    def __init__(self, wl: Workload):
        self.wl = wl
        self.windows = 0
        self.compile_s: float | None = None

    @abc.abstractmethod
    def window(self) -> None:
        """Run one window: k micro-batches and the boundary."""

    @abc.abstractmethod
    def model_params(self) -> list[torch.Tensor]:
        """The model's params (param dtype) after the windows run so far."""

    @abc.abstractmethod
    def fp32_weights(self) -> list[torch.Tensor]:
        """The fp32 weights the optimizer steps (masters, or the fp32 params)."""

    @abc.abstractmethod
    def persistent_tensors(self) -> list[torch.Tensor]:
        """Params, masters, accumulators and optimizer state it keeps between windows."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release what the contender holds."""


class _Deliver(torch.autograd.Function):
    """The stand-in for a model: a scalar "loss" whose one backward node hands every param
    its pre-made gradient, so that ``loss.backward()`` runs each param's AccumulateGrad node
    (p.grad handling and every post-accumulate-grad hook) as in training."""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return params[0].new_zeros(())

    # hand each param a new copy, as a real backward makes fresh gradients (the default
    # since 2026-11-27); --premade-grads: the pre-made tensors, which AccumulateGrad copies
    # into a released p.grad for every contender but ours, whose C++ hook takes them
    # before AccumulateGrad (accumulator._PRE_HOOK): a copy no model's backward makes
    fresh = True

    @staticmethod
    def backward(ctx, _):
        if _Deliver.fresh:
            return (None, *(g.clone() for g in ctx.grads))
        return (None, *ctx.grads)


def _backward(params, grads) -> None:
    """One micro-batch's backward, from one scalar root as ``loss.backward()`` runs.

    (``torch.autograd.backward(params, grads)``, used before 2026-11-26, validated each of
    the many roots in Python, about 8 us per param on the 2-core CPU: host time no training
    loop spends, added to every contender alike.)"""
    _Deliver.apply(grads, *params).backward()


class FusedContender(Contender):
    """Ours: ``FusedAccumulator(AdamW)`` used exactly as DESIGN.md section 1 writes it."""

    ours = True

    def __init__(self, wl: Workload, backend: str):
        super().__init__(wl)
        from fusedaccum.accumulator import FusedAccumulator

        self.backend = backend
        self.name = f"fusedaccum[{backend}]"
        self.params = wl.fresh_params()
        inner = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, eps=EPS,
                                  weight_decay=WEIGHT_DECAY)
        self.opt = FusedAccumulator(inner, accumulation_steps=wl.k,
                                    max_grad_norm=MAX_GRAD_NORM, backend=backend)

    def window(self) -> None:
        grads = self.wl.grads
        for _ in range(self.wl.k):
            _backward(self.params, grads)
            self.opt.step()
            self.opt.zero_grad()
        if not self.opt.stepped:
            raise RuntimeError(f"{self.name}: the k-th step() applied no update "
                               f"(skipped_steps={self.opt.skipped_steps})")
        self.windows += 1

    def model_params(self):
        return [p.detach() for p in self.params]

    def fp32_weights(self):
        return [t.detach() for g in self.opt.param_groups for t in g["params"]]

    def persistent_tensors(self):
        out = list(self.model_params()) + self.fp32_weights()
        out += [p.main_grad for p in self.params if hasattr(p, "main_grad")]
        for st in self.opt.state.values():
            out += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return out


class TutorialContender(Contender):
    """Peer 1, the tutorial loop: ``(loss / k).backward()`` accumulates in ``p.grad`` in the
    param dtype; at the boundary ``clip_grad_norm_``, ``AdamW.step()`` (torch's default
    implementation for the device), ``zero_grad()``. No master weights."""

    name = "tutorial"

    def __init__(self, wl: Workload):
        super().__init__(wl)
        self.params = wl.fresh_params()
        self.grads = wl.grads_div_k
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, eps=EPS,
                                     weight_decay=WEIGHT_DECAY)

    def window(self) -> None:
        for _ in range(self.wl.k):
            _backward(self.params, self.grads)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.opt.step()
        self.opt.zero_grad()
        self.windows += 1

    def model_params(self):
        return [p.detach() for p in self.params]

    def fp32_weights(self):
        return [p.detach().float() for p in self.params]

    def persistent_tensors(self):
        out = self.model_params()
        for st in self.opt.state.values():
            out += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return out


class RecipeContender(Contender):
    """Peer 2, the strongest plain-PyTorch recipe (DESIGN.md section 4): a post-accumulate-
    grad hook per param does ``main_grad.add_(grad, alpha=1/k)`` into an fp32 buffer and
    releases ``p.grad``; the boundary is ``clip_grad_norm_(foreach=True)`` on the fp32
    masters (whose ``.grad`` are the main grads), ``AdamW(fused=True)`` on the masters,
    a foreach copy back to the half params and a foreach zeroing of the main grads.

    ``compile=True`` (peer 3) runs that same boundary function under ``torch.compile``.
    ``optimizer="deepspeed"`` (peer 4, CPU) steps the masters with DeepSpeedCPUAdam.
    """

    def __init__(self, wl: Workload, *, compile: bool = False, optimizer: str = "torch"):
        super().__init__(wl)
        self.params = wl.fresh_params()
        self.model_views = [p.detach() for p in self.params]
        self.masters = [p.detach().to(torch.float32, copy=True) for p in self.params]
        self.main_grads = [torch.zeros_like(m) for m in self.masters]
        for m, g in zip(self.masters, self.main_grads):
            m.grad = g
        inv_k = 1.0 / wl.k
        self._hooks = []
        for p, mg in zip(self.params, self.main_grads):
            def hook(param, mg=mg):
                mg.add_(param.grad, alpha=inv_k)
                param.grad = None
            self._hooks.append(p.register_post_accumulate_grad_hook(hook))
        if optimizer == "deepspeed":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.opt = DeepSpeedCPUAdam(self.masters, lr=LR, betas=BETAS, eps=EPS,
                                        weight_decay=WEIGHT_DECAY, adamw_mode=True)
            self.name = "recipe+DeepSpeedCPUAdam"
        else:
            self.opt = torch.optim.AdamW(self.masters, lr=LR, betas=BETAS, eps=EPS,
                                         weight_decay=WEIGHT_DECAY, fused=True)
            self.name = "recipe+compile" if compile else "recipe"
        self.compiled = compile
        self._boundary = torch.compile(self.boundary_eager) if compile else self.boundary_eager

    def boundary_eager(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.masters, MAX_GRAD_NORM, foreach=True)
        self.opt.step()
        torch._foreach_copy_(self.model_views, self.masters)
        torch._foreach_zero_(self.main_grads)

    def window(self) -> None:
        for _ in range(self.wl.k):
            _backward(self.params, self.wl.grads)
        if self.compiled and self.compile_s is None:
            t0 = time.perf_counter()
            self._boundary()  # the first call compiles
            sync(self.wl.device)
            self.compile_s = time.perf_counter() - t0
        else:
            self._boundary()
        self.windows += 1

    def model_params(self):
        return self.model_views

    def fp32_weights(self):
        return self.masters

    def persistent_tensors(self):
        out = self.model_views + self.masters + self.main_grads
        for st in self.opt.state.values():
            out += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def estimate_bytes_per_param(kind: str, dtype: torch.dtype, backend: str | None = None) -> float:
    """Persistent + transient bytes per param element, for the memory planner."""
    s = torch.empty((), dtype=dtype).element_size()
    master = 4 if s < 4 else 0
    if kind == "ours":  # model, accumulator, master, m, v (+ the reference's fp32 temporaries)
        return s + 4 + master + 8 + (40 if backend == "reference" else 1)
    if kind == "tutorial":  # param, grad, m, v in the param dtype + foreach temporaries
        return 4 * s + 3 * s
    # model, main grad, master, m, v (+ what inductor may allocate)
    return s + 4 + 4 + 8 + (4 if kind == "recipe+compile" else 1)


@dataclass
class WindowResult:
    model: str
    model_label: str
    model_note: str
    numel: int
    tensors: int
    dtype: str
    contender: str
    ours: bool
    times: list[float] = field(default_factory=list)
    peak_bytes: float | None = None
    persistent_bytes: int | None = None
    ops_per_window: int | None = None
    kernels_per_window: int | None = None
    max_param_diff: float | None = None  # vs the first of ours, after the same windows
    compile_s: float | None = None
    group: int = 0
    note: str = ""

    @property
    def median_s(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")


class _QuietStderr:
    """Silence the C++ side's stderr (kineto prints a line per profiler start/stop)."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            self._null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self._null, 2)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            os.close(self._null)
        return False


def _profile_window(c: Contender, device: torch.device) -> tuple:
    """(peak bytes above the window's start, outermost op calls, CUDA kernels, note)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    cuda = device.type == "cuda"
    if cuda:
        acts.append(ProfilerActivity.CUDA)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with _QuietStderr(), profile(activities=acts, profile_memory=not cuda) as prof:
        c.window()
        sync(device)
    peak = None
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    n_ops = 0
    for e in prof.events():
        if not _is_op_name(e.name):
            continue
        parent, nested = e.cpu_parent, False
        while parent is not None:
            if _is_op_name(parent.name):
                nested = True
                break
            parent = parent.cpu_parent
        n_ops += not nested
    n_kernels = None
    events = _trace_events(prof)
    if cuda:
        n_kernels = sum(1 for ev in events
                        if ev.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy"))
    else:
        peak = cpu_peak_allocated(prof, events)
    return peak, n_ops, n_kernels


def _trace_events(prof) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    return trace.get("traceEvents", trace) if isinstance(trace, dict) else trace


def cpu_peak_allocated(prof, events=None) -> int:
    """The largest total of CPU tensor bytes allocated while ``prof`` (a
    ``torch.profiler.profile(profile_memory=True)``) ran, above what was allocated when
    it started: torch keeps no peak counter for CPU tensors, the profiler's memory events
    carry the running total."""
    events = _trace_events(prof) if events is None else events
    totals = [ev.get("args", {}).get("Total Allocated") for ev in events
              if ev.get("name") == "[memory]" and ev.get("args", {}).get("Device Type", 0) == 0]
    return max([0, *(t for t in totals if isinstance(t, (int, float)))])


_NOT_OPS = ("autograd::", "torch::autograd", "ProfilerStep", "[memory]", "Optimizer.")


def _is_op_name(name: str) -> bool:
    return "::" in name and not name.startswith(_NOT_OPS)


@dataclass
class WindowConfig:
    budget_s: float = 20.0  # timed rounds per model (after warm-up)
    warmup_rounds: int = 1
    min_rounds: int = 3
    max_rounds: int = 30
    profile: bool = True


def _contender_factories(wl: Workload, backends: list[str], compile_mode: bool,
                         notes: list[str]):
    """[(name, kind, backend, factory)]: ours per backend, then the peers that run here."""
    out = [(f"fusedaccum[{b}]", "ours", b, lambda b=b: FusedContender(wl, b)) for b in backends]
    if wl.device.type == "cuda" and {"cuda", "triton"} <= set(backends):
        # what backend="auto" gives on a GPU: each op to the faster of the two
        out.append(("fusedaccum[auto]", "ours", "auto", lambda: FusedContender(wl, "auto")))
    out.append(("tutorial", "tutorial", None, lambda: TutorialContender(wl)))
    out.append(("recipe", "recipe", None, lambda: RecipeContender(wl)))
    if compile_mode:
        out.append(("recipe+compile", "recipe+compile", None,
                    lambda: RecipeContender(wl, compile=True)))
    if wl.device.type == "cpu":
        if importlib.util.find_spec("deepspeed") is not None:
            out.append(("recipe+DeepSpeedCPUAdam", "recipe", None,
                        lambda: RecipeContender(wl, optimizer="deepspeed")))
        else:
            notes.append("peer 4 (DeepSpeedCPUAdam) skipped: deepspeed is not importable "
                         "(not installed here)")
    return out


_MEMORY_USE = 0.9  # the fraction of the free memory the contenders may plan to take


def _plan_groups(factories, wl: Workload, notes: list[str]):
    """All contenders in one alternated group when they fit in memory together; else one
    group per (ours, peer) pair; contenders that do not fit even in a pair are dropped."""
    free = available_memory(wl.device)
    # (the estimates hold each contender's transients already; 90% lets GPT-2 XL's list
    # run against the recipe on an 80 GB card: ~61 GiB estimated, 68.9 GiB free)
    avail = _MEMORY_USE * free
    est = {name: estimate_bytes_per_param(kind, wl.dtype, backend) * wl.numel
           for name, kind, backend, _ in factories}
    if wl.shared_bytes() + sum(est.values()) <= avail:
        return [factories]
    ours = [f for f in factories if f[1] == "ours"]
    peers = [f for f in factories if f[1] != "ours"]
    groups = []
    for o in ours:
        for p in peers:
            need = wl.shared_bytes(tutorial=p[1] == "tutorial") + est[o[0]] + est[p[0]]
            if need <= avail:
                groups.append([o, p])
            else:
                notes.append(f"{o[0]} vs {p[0]} on `{wl.model.name}` skipped: needs "
                             f"~{fmt_bytes(need)}, {fmt_bytes(free)} free")
    notes.append("not every contender fits in memory at once: each (ours, peer) pair was "
                 "built and alternated on its own")
    return groups


def run_windows(model: ModelShape, device: torch.device, dtype: torch.dtype,
                backends: list[str], wc: WindowConfig, compile_mode: bool,
                progress: Progress, notes: list[str]) -> list[WindowResult]:
    wl = Workload(model, device, dtype)
    factories = _contender_factories(wl, backends, compile_mode, notes)
    groups = _plan_groups(factories, wl, notes)
    results: list[WindowResult] = []
    base = dict(model=model.name, model_label=model.label, model_note=model.note,
                numel=wl.numel, tensors=model.tensors, dtype=_DTYPE_NAMES[dtype])
    for gi, group in enumerate(groups):
        contenders: list[Contender] = []
        group_results: dict[str, WindowResult] = {}
        for name, kind, _backend, factory in group:
            r = WindowResult(contender=name, ours=kind == "ours", group=gi, **base)
            try:
                contenders.append(factory())
            except Exception as exc:  # noqa: BLE001 - a backend or a peer that cannot run
                r.note = f"could not be built: {_short(exc)}"
            group_results[name] = r
            results.append(r)
        wl.release()  # the contenders hold what they need
        alive = list(contenders)
        order_rng = random.Random(gi)
        rounds_done, t_round = 0, []
        target = None
        with gc_paused():  # (see gc_paused)
            while True:
                if not alive:
                    break
                # a fresh order every round: in a fixed cyclic order each contender would
                # always follow the same one and inherit its cache, allocator and page state
                # (seen on CPU: fusedaccum[cpu] 26 ms per window alone, 37 ms when it always
                # followed the reference backend, whose temporaries change the allocator's
                # state; the recipe moved the other way)
                order = list(alive)
                order_rng.shuffle(order)
                t_this = 0.0
                for c in order:
                    r = group_results[c.name]
                    progress.set(f"{model.name} {c.name}")
                    try:
                        sync(device)
                        t0 = time.perf_counter()
                        c.window()
                        sync(device)
                        dt = time.perf_counter() - t0
                    except Exception as exc:  # noqa: BLE001
                        r.note = f"failed: {_short(exc)}"
                        if _is_oom(exc):
                            r.note = "out of memory: " + r.note
                        alive.remove(c)
                        c.close()
                        continue
                    t_this += dt
                    if rounds_done >= wc.warmup_rounds:
                        r.times.append(dt)
                    if c.compile_s is not None:
                        r.compile_s = c.compile_s
                rounds_done += 1
                if rounds_done == wc.warmup_rounds:
                    progress.update()
                if rounds_done > wc.warmup_rounds:
                    t_round.append(t_this)
                    progress.update()
                if target is None and rounds_done >= wc.warmup_rounds + 1:
                    per_round = max(t_round[-1], 1e-6)
                    target = max(wc.min_rounds,
                                 min(wc.max_rounds, int(wc.budget_s / len(groups) / per_round)))
                    progress.total += max(0, target - 1)
                    if progress._bar is not None:
                        progress._bar.total = progress.total
                        progress._bar.refresh()
                if target is not None and rounds_done - wc.warmup_rounds >= target:
                    break
        if wc.profile:
            for c in alive:
                r = group_results[c.name]
                progress.set(f"{model.name} {c.name} (profiling)")
                try:
                    r.peak_bytes, r.ops_per_window, r.kernels_per_window = \
                        _profile_window(c, device)
                except Exception as exc:  # noqa: BLE001
                    r.note = (r.note + "; " if r.note else "") + f"profiling failed: {_short(exc)}"
        for c in alive:
            group_results[c.name].persistent_bytes = storage_bytes(c.persistent_tensors())
            if c.compile_s is not None:
                notes.append(f"{c.name} on `{model.name}`: torch.compile of the boundary took "
                             f"{c.compile_s:.1f} s (first call; not in the timings)")
        # the same windows ran everywhere: how far each contender's model is from ours
        ref = next((c for c in alive if c.ours), None)
        if ref is not None:
            ref_params = ref.model_params()
            for c in alive:
                if c.windows != ref.windows:
                    continue
                diff = max(float((a.float() - b.float()).abs().max())
                           for a, b in zip(c.model_params(), ref_params))
                group_results[c.name].max_param_diff = diff
        for c in contenders:
            c.close()
        del contenders, alive, ref
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def paired_ratio(ours: WindowResult, peer: WindowResult) -> tuple[float, float, float] | None:
    """(median, first quartile, third quartile) of ``peer / ours`` round by round, over the
    rounds both ran (every round times each contender once, in a shuffled order, and a
    contender that fails stops adding times). A change of the host's speed during the run
    moves both windows of a round and cancels here, where it can pull the two medians of
    window_ratios apart (an H100's host, 2026-11-27: one contender's windows ranged over a
    third of their length)."""
    n = min(len(ours.times), len(peer.times))
    if n == 0:
        return None
    per_round = [p / o for o, p in zip(ours.times[:n], peer.times[:n])]
    return statistics.median(per_round), *quartiles(per_round)


def window_ratios(results: list[WindowResult]) -> list[tuple[WindowResult, WindowResult, float]]:
    """(ours, peer, peer median / our median) for every pair measured in the same group."""
    out = []
    for o in results:
        if not o.ours or not o.times:
            continue
        for p in results:
            if p.ours or p.model != o.model or p.group != o.group or not p.times:
                continue
            out.append((o, p, p.median_s / o.median_s))
    return out


# =============================================================================== reports


CSV_FIELDS = ["section", "name", "backend", "numel", "model", "model_label", "params",
              "tensors", "dtype", "bytes_per_elem", "bytes_moved", "median_s", "q1_s", "q3_s",
              "samples", "calls_per_sample", "buffer_sets", "gbps", "frac_copy_bw",
              "ratio_peer_over_ours", "ratio_per_round_median", "ratio_per_round_q1",
              "ratio_per_round_q3", "peak_mem_bytes", "persistent_bytes", "ops_per_window",
              "cuda_kernels_per_window", "max_param_diff_vs_ours", "compile_s", "note"]


def _csv_rows(copy: CopyBandwidth, ops_results, win_results, ratios):
    rows = []
    for method, gbps in copy.results.items():
        rows.append(dict(section="copy_bw", name=method, numel=copy.numel, bytes_per_elem=8,
                         bytes_moved=8 * copy.numel, gbps=f"{gbps:.4f}",
                         frac_copy_bw=f"{gbps / copy.gbps:.4f}",
                         note="reference" if method == copy.method else ""))
    for r in ops_results:
        t = r.timing
        row = dict(section="op", name=r.op, backend=r.backend, numel=r.numel,
                   bytes_per_elem=r.bytes_per_elem, bytes_moved=r.bytes_per_elem * r.numel,
                   note=r.note)
        if t is not None:
            row.update(median_s=f"{t.median_s:.9g}", q1_s=f"{t.q1_s:.9g}", q3_s=f"{t.q3_s:.9g}",
                       samples=t.samples, calls_per_sample=t.calls_per_sample,
                       buffer_sets=t.n_sets, gbps=f"{r.gbps:.4f}", frac_copy_bw=f"{r.frac:.4f}")
        rows.append(row)
    for r in win_results:
        row = dict(section="window", name=r.contender, model=r.model, model_label=r.model_label,
                   params=r.numel, tensors=r.tensors, dtype=r.dtype,
                   samples=len(r.times), note=r.note)
        if r.ours:
            row["backend"] = r.contender[len("fusedaccum["):-1]
        if r.times:
            q1, q3 = quartiles(r.times)
            row.update(median_s=f"{r.median_s:.9g}", q1_s=f"{q1:.9g}", q3_s=f"{q3:.9g}")
        for key, val in (("peak_mem_bytes", r.peak_bytes), ("persistent_bytes",
                         r.persistent_bytes), ("ops_per_window", r.ops_per_window),
                         ("cuda_kernels_per_window", r.kernels_per_window),
                         ("max_param_diff_vs_ours", r.max_param_diff),
                         ("compile_s", r.compile_s)):
            if val is not None:
                row[key] = f"{val:.6g}" if isinstance(val, float) else val
        rows.append(row)
    for o, p, ratio in ratios:
        row = dict(section="window_ratio", name=f"{p.contender} / {o.contender}",
                   backend=o.contender[len("fusedaccum["):-1], model=o.model,
                   params=o.numel, tensors=o.tensors, dtype=o.dtype,
                   ratio_peer_over_ours=f"{ratio:.4f}")
        paired = paired_ratio(o, p)
        if paired is not None:
            row.update(zip(("ratio_per_round_median", "ratio_per_round_q1",
                            "ratio_per_round_q3"), (f"{x:.4f}" for x in paired)))
        rows.append(row)
    return rows


def _fmt_paired(ours: WindowResult, peer: WindowResult) -> str:
    paired = paired_ratio(ours, peer)
    if paired is None:
        return "-"
    med, q1, q3 = paired
    return f"{med:.2f}x ({q1:.2f}-{q3:.2f})"


def _fmt_frac(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"


def _ops_table_rows(ops_results, backends):
    """One row per (op, size); per backend: time, GB/s, fraction of copy bandwidth."""
    rows = []
    keyed = {(r.op, r.numel, r.backend): r for r in ops_results}
    for op in dict.fromkeys(r.op for r in ops_results):
        for n in sorted({r.numel for r in ops_results if r.op == op}):
            row = [OP_SPECS[op].label if op in OP_SPECS else op, fmt_size(n),
                   str(OP_SPECS[op].bytes_per_element) if op in OP_SPECS else ""]
            peer = keyed.get((op, n, PEER))
            for b in backends:
                r = keyed.get((op, n, b))
                if r is None:
                    row += ["", "", ""]
                elif r.timing is None:
                    row += ["-", "-", r.note.split(":")[0]]
                else:
                    row += [fmt_time(r.timing.median_s), f"{r.gbps:.2f}", _fmt_frac(r.frac)]
            for b in backends:
                if b == PEER or PEER not in backends:
                    continue
                r = keyed.get((op, n, b))
                ok = r is not None and r.timing and peer is not None and peer.timing
                row.append(f"{peer.timing.median_s / r.timing.median_s:.2f}x" if ok else "")
            rows.append(row)
    headers = ["op", "size", "B/elt"]
    for b in backends:
        headers += [f"{b} time", f"{b} GB/s", f"{b} %copy"]
    if PEER in backends:
        headers += [f"{b} vs {PEER}" for b in backends if b != PEER]
    return headers, rows


def _window_table_rows(win_results, ratios, copy_bw: float, k: int,
                       device: torch.device):
    rows = []
    ratio_of = {}
    for o, p, ratio in ratios:
        ratio_of.setdefault((o.model, o.contender), []).append(f"{p.contender} {ratio:.2f}x")
    for r in win_results:
        grad_item = 2 if r.dtype in ("bf16", "fp16") else 4
        floor = window_floor_bytes_per_param(
            k, grad_item, norm_makes_a_pass(device, grad_item)) * r.numel
        eff = ""
        if r.ours and r.times:
            eff = _fmt_frac(floor / r.median_s / 1e9 / copy_bw)
        rows.append([
            r.model, r.contender, fmt_time(r.median_s) if r.times else "-",
            str(len(r.times)), eff, fmt_bytes(r.peak_bytes), fmt_bytes(r.persistent_bytes),
            "" if r.ops_per_window is None else str(r.ops_per_window),
            "" if r.kernels_per_window is None else str(r.kernels_per_window),
            "" if r.max_param_diff is None else f"{r.max_param_diff:.2e}",
            "; ".join(ratio_of.get((r.model, r.contender), [])) or r.note,
        ])
    headers = ["model", "contender", "median/window", "windows", "floor %copy",
               "peak extra mem", "persistent mem", "op calls", "CUDA kernels",
               "max abs dparam vs ours", "speed ratio peer/ours (or note)"]
    if all(r.kernels_per_window is None for r in win_results):  # CPU: no kernel column
        headers.pop(8)
        rows = [row[:8] + row[9:] for row in rows]
    return headers, rows


def _env_settings() -> str:
    """The package's environment variables that are set (ops.ENV_VARS), for reports."""
    env = [f"`{v}={os.environ[v]}`" for v in _ops.ENV_VARS if v in os.environ]
    return ", ".join(env) if env else "no FUSEDACCUM_* or TRITON_INTERPRET variable set"


def _env_lines(device, copy: CopyBandwidth, args_line: str, wall: float | None):
    lines = [
        f"- device: {device_name(device)} ({device.type}"
        + (f", {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
           if device.type == "cpu" else "") + ")",
        f"- torch {torch.__version__}, python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}",
        f"- date: {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- command: `python -m fusedaccum bench {args_line}`".rstrip(),
    ]
    lines.append(f"- environment: {_env_settings()}")
    if device.type == "cpu":
        try:
            load = os.getloadavg()
            lines.append(f"- load average at the end of the run: {load[0]:.2f} {load[1]:.2f} "
                         f"{load[2]:.2f} (other processes share these cores)")
        except OSError:
            pass
    if wall is not None:
        lines.append(f"- wall time of the run: {wall:.1f} s")
    by_method: dict[str, list[float]] = {}
    for key, g in copy.results.items():
        by_method.setdefault(key.split(" ")[0], []).append(g)
    res = ", ".join(
        f"`{m}` {v[0]:.2f} GB/s" if len(v) == 1 else
        f"`{m}` {min(v):.2f} to {max(v):.2f} GB/s over {len(v)} measurements"
        for m, v in by_method.items())
    lines.append(f"- copy bandwidth (reference for every %copy): **{copy.gbps:.2f} GB/s** "
                 f"(`{copy.method}`, the best of: {res}; fp32, {fmt_size(copy.numel)} "
                 f"elements, read + write bytes, {copy.threads} threads; every measurement "
                 "is in the CSV)")
    return lines


def write_markdown(path, *, device, copy, ops_results, backends, excluded, win_results,
                   ratios, notes, args_line, wall, k, quick, plot_note):
    md = ["# fusedaccum benchmark" + (" (--quick)" if quick else ""), ""]
    md.append("Generated by `python -m fusedaccum bench`; do not edit by hand. "
              "See bench/README.md for the method.")
    md.append("")
    md += _env_lines(device, copy, args_line, wall)
    md.append(f"- backends timed: {', '.join(backends) or 'none'}")
    for name, why in excluded.items():
        md.append(f"- backend `{name}` not timed: {why}")
    md.append("")
    if ops_results:
        md.append("## Ops")
        md.append("")
        md.append("Median time per call (inputs rotated among enough buffer sets to overflow "
                  "the last-level cache), GB/s = bytes the op must move / time, and that as a "
                  "fraction of the copy bandwidth above. A fraction above 100% is possible: a "
                  "copy is half writes, and ops whose traffic is mostly reads (grad_norm only "
                  "reads) can stream faster than a copy. `torch` is the same work done the "
                  "plain-PyTorch way: `acc.add_(grad, alpha=s)`; `torch._foreach_norm` and the "
                  "norm of those (`clip_grad_norm_`'s); the fused AdamW/SGD kernels of "
                  "`torch.optim` (`fused=True`, grad_scale = 1/grad_mult), then the copy to "
                  "the half params and the zeroing of the accumulator. `<backend> vs torch`: "
                  "torch's time / the backend's (> 1: the backend is faster).")
        md.append("")
        headers, rows = _ops_table_rows(ops_results, [*backends, PEER])
        md.append(format_table(headers, rows, markdown=True))
        md.append("")
        md.append("Bytes per element counted (reads + writes the op cannot avoid):")
        md.append("")
        for key in dict.fromkeys(r.op for r in ops_results):
            spec = OP_SPECS[key]
            parts = " + ".join(f"{what} {b}" for what, b in spec.breakdown())
            md.append(f"- `{spec.label}`: {parts} = **{spec.bytes_per_element}**")
        md.append("")
        largest = _largest_rows(ops_results)
        if largest:
            md.append("At the largest size measured per op:")
            md.append("")
            md.append(format_table(["op", "backend", "size", "GB/s", "%copy"], [
                [OP_SPECS[r.op].label, r.backend, fmt_size(r.numel), f"{r.gbps:.2f}",
                 _fmt_frac(r.frac)] for r in largest], markdown=True))
            md.append("")
        if plot_note:
            md.append(plot_note)
            md.append("")
    if win_results:
        md.append(f"## Windows (k={k} micro-batches + boundary, AdamW, clip "
                  f"{MAX_GRAD_NORM:g})")
        md.append("")
        for name in dict.fromkeys(r.model for r in win_results):
            m = MODELS[name]
            note = f" ({m.note})" if m.note else ""
            md.append(f"- `{name}`: {m.label}{note}: {m.numel / 1e6:.2f}M params in "
                      f"{m.tensors} tensors")
        md.append("")
        headers, rows = _window_table_rows(win_results, ratios, copy.gbps, k, device)
        md.append(format_table(headers, rows, markdown=True))
        md.append("")
        if ratios:
            md.append("Speed ratios (peer time / our time per window, same run, alternated "
                      "round by round; > 1 means fusedaccum is faster): the ratio of the "
                      "two medians, and the median and quartiles of the ratios of the "
                      "windows each round timed (where the host's speed changed during "
                      "the run, the two can differ):")
            md.append("")
            md.append(format_table(["model", "ours", "peer", "ratio", "per round (quartiles)"], [
                [o.model, o.contender, p.contender, f"{ratio:.2f}x", _fmt_paired(o, p)]
                for o, p, ratio in ratios], markdown=True))
            md.append("")
        md += _window_legend(device, k)
        md.append("")
        md += _communication_lines(win_results, k)
    if notes:
        md.append("## Notes")
        md.append("")
        md += [f"- {n}" for n in dict.fromkeys(notes)]
        md.append("")
    with open(path, "w") as f:
        f.write("\n".join(md))


def _communication_lines(win_results, k):
    """Data parallel: bytes each rank sends per window, fusedaccum against DDP (computed)."""
    from fusedaccum.distributed import bytes_per_window

    rows = []
    for name in dict.fromkeys(r.model for r in win_results):
        m = MODELS[name]
        for world in (2, 8):
            plain = bytes_per_window(m.numel, 2, world, k, shard=False)
            zero = bytes_per_window(m.numel, 2, world, k, shard=True)
            rows.append([name, str(world), fmt_bytes(plain["ddp_every_micro_batch"]),
                         fmt_bytes(plain["fusedaccum"]), f"{plain['ratio']:.2f}x",
                         fmt_bytes(zero["fusedaccum"]), f"{zero['ratio']:.2f}x"])
    return [f"## Data parallel: bytes each rank sends per window (k={k}, bf16 params)", "",
            "Computed from ring-algorithm byte counts (`fusedaccum.distributed."
            "bytes_per_window`), not measured on a network: DDP all-reduces every "
            "micro-batch's bf16 gradient; fusedaccum all-reduces the fp32 accumulators once "
            "per window, or with ZeRO-1 reduce-scatters them and all-gathers the bf16 params.",
            "", format_table(["model", "ranks", "DDP every micro-batch", "fusedaccum",
                              "DDP/ours", "fusedaccum ZeRO-1", "DDP/ours ZeRO-1"], rows,
                             markdown=True), ""]


def _window_legend(device, k):
    norm_pass = norm_makes_a_pass(device, 2)
    floor = window_floor_bytes_per_param(k, 2, norm_pass)
    mem = ("`torch.cuda.max_memory_allocated` during one window minus the allocation at its "
           "start" if device.type == "cuda" else
           "high-water of CPU tensor allocations made during one window, above the "
           "allocation at its start (torch.profiler memory events: 'Total Allocated'); "
           "the process RSS is not used")
    return [
        "Legend:",
        "",
        "- every micro-batch is one scalar root's `backward()` whose one autograd node hands "
        "every param its pre-made gradient in the param dtype (a real autograd pass through "
        "the params' AccumulateGrad nodes and hooks; no forward or matmuls, which all "
        "contenders would share); ours calls `step()` and `zero_grad()` after each of the "
        f"k={k} micro-batches. "
        + ("That node hands each param a new copy (one kernel per param, as a real backward "
           "makes fresh gradients), which AccumulateGrad takes over (ours takes it before "
           "AccumulateGrad)."
           if _Deliver.fresh else
           "With --premade-grads the gradients are held elsewhere, so AccumulateGrad copies "
           "each one into a released `p.grad` (the recipe, the tutorial's first micro-batch; "
           "not ours, whose hook takes each gradient before AccumulateGrad): a copy no real "
           "backward makes, which flatters ours."),
        "- tutorial: grads divided by k accumulate in `p.grad` in the param dtype; "
        "`clip_grad_norm_`, `torch.optim.AdamW` (default implementation), `zero_grad()`.",
        "- recipe: post-accumulate-grad hooks `main_grad.add_(grad, alpha=1/k)` into fp32; "
        "`clip_grad_norm_(foreach=True)` and `AdamW(fused=True)` on fp32 masters; "
        "`_foreach_copy_` back to the half params; `_foreach_zero_` of the main grads. It "
        "does not check for inf/NaN (ours does, with one host read per window).",
        "- recipe+compile: the same recipe with its boundary function under `torch.compile` "
        "(compile time excluded from the timings, shown in the CSV).",
        f"- floor %copy (ours): {floor} B per param per window of bf16 gradients (k x (the "
        "backward's fresh gradient 4 + accumulate 10) - 4 (the window's first accumulation "
        "overwrites) + "
        + ("norm 4 + " if norm_pass else "no norm pass (on a CPU the norm rides on the last "
           "micro-batch's accumulations) + ")
        + "AdamW 30 (the boundary leaves the accumulator for the next "
        "window to overwrite)) / median time, as a fraction of the copy bandwidth"
        + ("." if _Deliver.fresh else " (with --premade-grads ours makes no copy of the "
           "gradient: the floor counts 4 B per micro-batch it does not move)."),
        f"- peak extra mem: {mem}. persistent mem: distinct storages of the contender's "
        "params, masters, accumulators and optimizer state.",
        "- op calls: outermost dispatcher ops (aten and custom ops) per window in "
        "torch.profiler, i.e. what Python launched; CUDA kernels: kernel/memset/memcpy "
        "events on the GPU per window.",
        "- max abs dparam vs ours: largest difference of the model params from the first "
        "fusedaccum contender after the same windows (the same math; the tutorial "
        "accumulates and steps in the param dtype, so it differs by rounding).",
    ]


def _largest_rows(ops_results):
    out = []
    for op in dict.fromkeys(r.op for r in ops_results):
        done = [r for r in ops_results if r.op == op and r.timing is not None]
        if not done:
            continue
        n = max(r.numel for r in done)
        out += [r for r in done if r.numel == n]
    return out


def write_plot(path, ops_results, backends, copy: CopyBandwidth, title: str) -> str:
    """PNG of GB/s vs size per backend with the copy-bandwidth line; '' or why not."""
    if importlib.util.find_spec("matplotlib") is None:
        return "No plot: matplotlib is not installed (it is optional; `pip install matplotlib`)."
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    op_keys = list(dict.fromkeys(r.op for r in ops_results))
    if not op_keys:
        return ""
    fig, axes = plt.subplots(1, len(op_keys), figsize=(4.2 * len(op_keys), 3.8), sharey=True,
                             squeeze=False)
    for ax, op in zip(axes[0], op_keys):
        for b in backends:
            pts = sorted((r.numel, r.gbps) for r in ops_results
                         if r.op == op and r.backend == b and r.timing is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
        ax.axhline(copy.gbps, color="k", linestyle="--", linewidth=1,
                   label=f"copy ({copy.method}) {copy.gbps:.1f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements")
        ax.set_title(OP_SPECS[op].label, fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("GB/s (bytes the op must move)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"Plot: `{os.path.basename(path)}` (GB/s vs size per backend, copy bandwidth dashed)."


# =============================================================================== main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fusedaccum bench",
        description="fusedaccum microbenchmarks: per op/backend/size GB/s and fraction of the "
                    "measured copy bandwidth; whole accumulation windows against plain-PyTorch "
                    "peers. Writes <device>_<date>.md/.csv (and .png) under --out.")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and models, few repeats (under a minute)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help="comma-separated element counts, e.g. 1K,64K,1M,64M "
                        "(default 1K..256M in powers of 4; --quick: 1K,16K,256K,1M)")
    p.add_argument("--max-size", type=parse_size, default=None,
                   help="drop sizes above this (e.g. 64M)")
    p.add_argument("--ops", default=None,
                   help=f"comma-separated ops to time, or 'none' (default all: "
                        f"{','.join(OP_SPECS)}); 'accumulate_' selects both grad dtypes")
    p.add_argument("--backends", default=None,
                   help="comma-separated backends (default: every one that runs on the device)")
    p.add_argument("--windows", action=argparse.BooleanOptionalAction, default=True,
                   help="also time whole accumulation windows against the peers (default on)")
    p.add_argument("--models", default=None,
                   help=f"comma-separated param lists for the windows: {', '.join(MODELS)} "
                        "(default depends on device and --quick)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="peer 3 (recipe with its boundary under torch.compile): auto = on for "
                        "CUDA full runs, off on CPU and under --quick (compiling takes minutes "
                        "there)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of sampling per op measurement (default 0.5; --quick 0.08)")
    p.add_argument("--window-budget", type=float, default=None,
                   help="seconds of timed window rounds per model (default 30; --quick 3)")
    p.add_argument("--window-rounds", type=int, default=WindowConfig.max_rounds,
                   help="most timed window rounds per model, within --window-budget "
                        f"(default {WindowConfig.max_rounds}; fast windows on a noisy host "
                        "want more)")
    p.add_argument("--max-buffer-sets", type=int, default=None,
                   help="most input sets an op rotates through (default 4096; --quick 1024); "
                        "as many are used as needed to make one pass over them 8x the "
                        "last-level cache")
    p.add_argument("--copy-size", type=parse_size, default=None,
                   help="elements of the copy-bandwidth tensors (default 64M on CPU, 256M on "
                        "CUDA)")
    p.add_argument("--out", default=os.path.join("bench", "results"),
                   help="directory of the reports (default bench/results)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the profiled window (peak memory, launch counts)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    grads = p.add_mutually_exclusive_group()
    grads.add_argument("--fresh-grads", action="store_true",
                       help="windows: each micro-batch's backward hands every param a new copy "
                            "of its gradient (one kernel per param, as a real backward makes "
                            "fresh gradients), which AccumulateGrad takes over (the default)")
    grads.add_argument("--premade-grads", action="store_true",
                       help="windows: hand the pre-made tensors instead, which AccumulateGrad "
                            "copies into a released p.grad (before 2026-11-27 the default; "
                            "flatters ours, whose hook takes them before AccumulateGrad)")
    return p


def _select_ops(text: str | None) -> list[OpSpec]:
    if text is None:
        return list(OP_SPECS.values())
    if text.strip().lower() in ("", "none"):
        return []
    out = []
    for name in (s.strip() for s in text.split(",") if s.strip()):
        matched = [s for s in OP_SPECS.values() if name in (s.key, s.op, s.op.rstrip("_"))]
        if not matched:
            raise SystemExit(f"bench: unknown op {name!r}; choose from {', '.join(OP_SPECS)}")
        out += [m for m in matched if m not in out]
    return out


def main(argv_or_namespace=None) -> int:
    """Entry point of ``python -m fusedaccum bench``; takes argv (list of str) or a Namespace."""
    try:
        return _main(argv_or_namespace)
    finally:
        _Deliver.fresh = True  # (--premade-grads) for whatever runs next in this process


def _main(argv_or_namespace) -> int:
    if isinstance(argv_or_namespace, argparse.Namespace):
        args = argv_or_namespace
        argv = []
    else:
        argv = list(sys.argv[1:] if argv_or_namespace is None else argv_or_namespace)
        args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    defaults = build_parser().parse_args([])
    for key, val in vars(defaults).items():  # a partial Namespace gets the defaults
        if not hasattr(args, key):
            setattr(args, key, val)

    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            print(f"bench: bad --device {args.device!r} ({exc}); use cpu or cuda[:N]",
                  file=sys.stderr)
            return 2
    for flag, value in (("--budget", args.budget), ("--window-budget", args.window_budget)):
        if value is not None and not (math.isfinite(value) and value > 0):
            print(f"bench: {flag} must be a finite number of seconds > 0, got {value}",
                  file=sys.stderr)
            return 2
    for flag, value in (("--window-rounds", args.window_rounds),
                        ("--max-buffer-sets", args.max_buffer_sets)):
        if value is not None and value < 1:  # (0 sets would have meant the default)
            print(f"bench: {flag} must be at least 1, got {value}", file=sys.stderr)
            return 2
    _Deliver.fresh = not getattr(args, "premade_grads", False)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench: --device cuda requested but torch sees no CUDA device",
                  file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        print(f"bench: unsupported device {device}", file=sys.stderr)
        return 2

    quick = bool(args.quick)
    try:
        specs = _select_ops(args.ops)
    except SystemExit as exc:  # (an unknown op: bad usage, as the other arguments)
        print(exc, file=sys.stderr)
        return 2
    sizes = args.sizes or (QUICK_SIZES if quick else FULL_SIZES)
    if args.max_size is not None:
        sizes = [n for n in sizes if n <= args.max_size]
    requested = None if args.backends is None else [
        b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in requested or () if b not in _ops.BACKENDS and b != "auto"]
    if unknown:  # a typo: say so, rather than time nothing and exit 0
        print(f"bench: unknown backend(s) {', '.join(map(repr, unknown))} in --backends; "
              f"choose from {', '.join(_ops.BACKENDS)} (and auto)", file=sys.stderr)
        return 2
    backends, excluded = bench_backends(device, requested)
    if requested and not backends:
        why = "; ".join(f"{name}: {reason}" for name, reason in excluded.items())
        print(f"bench: none of --backends {args.backends} runs on {device} ({why}); nothing "
              "to time", file=sys.stderr)
        return 2
    # where the reports go, checked before minutes of timing: a folder that cannot be
    # written fails now, and a report of the same name from earlier today is kept (this
    # run's name gets the time)
    stem = f"{sanitize(device_name(device))}_{_dt.date.today().isoformat()}"
    try:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as exc:
        print(f"bench: cannot write the reports into --out {args.out!r} ({exc})",
              file=sys.stderr)
        return 2
    suffix = "_quick" if quick else ""
    if os.path.exists(os.path.join(args.out, stem + suffix + ".md")):
        stem += _dt.datetime.now().strftime("_%H%M%S")
    stem += suffix
    tc = TimingConfig(budget_s=args.budget if args.budget is not None else
                      (0.08 if quick else 0.5),
                      warmup_s=0.02 if quick else 0.1,
                      min_samples=3 if quick else 5, max_samples=50 if quick else 200)
    copy_numel = args.copy_size or (256 if device.type == "cuda" else 64) * KI**2
    wc = WindowConfig(budget_s=args.window_budget if args.window_budget is not None else
                      (3.0 if quick else 30.0),
                      warmup_rounds=1, min_rounds=min(3 if quick else 5, args.window_rounds),
                      max_rounds=args.window_rounds,
                      profile=not args.no_profile)
    if args.compile == "auto":
        compile_mode = device.type == "cuda" and not quick
    else:
        compile_mode = args.compile == "on"
    if compile_mode:
        wc.warmup_rounds = 2  # the first compiled call compiles, the second may recompile
    model_names = (default_models(device, quick) if args.models is None else
                   [m.strip() for m in args.models.split(",") if m.strip()])
    for m in model_names:
        if m not in MODELS:
            print(f"bench: unknown model {m!r}; choose from {', '.join(MODELS)}",
                  file=sys.stderr)
            return 2
    notes: list[str] = []
    if not args.windows:
        model_names = []
    elif device.type == "cpu" and "gpt2-1.5b" not in model_names:
        notes.append("the 1.5B-parameter list (`gpt2-1.5b`) is timed on GPUs; on a small CPU "
                     "one window round of all contenders would take minutes, so a labelled "
                     "stand-in is used")
        if "gpt2-124m" not in model_names:
            notes.append("the full GPT-2 124M list (`--models gpt2-124m`) takes about 3 "
                         "minutes of windows on a 2-core CPU; the default CPU run uses its "
                         "scaled-down version with the same 148 tensors")
    dname = device_name(device)
    print(f"fusedaccum bench on {dname} ({device}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads" + (" [--quick]" if quick else ""))
    print(f"backends timed: {', '.join(backends) or 'none'}; environment: {_env_settings()}")
    for name, why in excluded.items():
        print(f"  not timed: {name}: {why}")
    if "reference" in backends:
        notes.append("`reference` is the readable plain-PyTorch definition of the math (one "
                     "aten op per term, fp32 temporaries), timed as a baseline, not a target")

    # the op benchmarks also time each op the plain-PyTorch way (TorchPeer)
    op_contenders = [*backends, PEER] if backends else []
    total = len(specs) * len(sizes) * len(op_contenders)
    total += len(model_names) * (wc.warmup_rounds > 0)
    total += len(model_names) * (1 + wc.min_rounds)
    progress = Progress(total, enabled=not args.no_progress)
    try:
        progress.set("copy bandwidth")
        copy_tc = TimingConfig(budget_s=0.3 if quick else 1.0, warmup_s=0.05, min_samples=5,
                               max_samples=50, target_sample_s=0.0)
        copy = measure_copy_bandwidth(device, copy_numel, copy_tc)
        res = ", ".join(f"{m} {g:.2f} GB/s" for m, g in copy.results.items())
        progress.write(f"copy bandwidth: {copy.gbps:.2f} GB/s ({copy.method}; {res}; "
                       f"{fmt_size(copy_numel)} fp32 elements)")

        ops_results: list[OpResult] = []
        if specs and backends:
            max_sets = args.max_buffer_sets or (1024 if quick else 4096)
            copies = [copy]

            def remeasure(_spec=None):
                progress.set("copy bandwidth (again)")
                copies.append(measure_copy_bandwidth(device, copy_numel, copy_tc))

            ops_results = run_op_benchmarks(specs, sizes, op_contenders, device, tc, copy.gbps,
                                            progress, max_sets=max(1, max_sets),
                                            before_op=remeasure)
            remeasure()
            # the reference is the best of all measurements (drift-proof, never flattering)
            copy = combine_copy_bandwidth(copies)
            lo, hi = min(c.gbps for c in copies), max(c.gbps for c in copies)
            progress.write(f"copy bandwidth over {len(copies)} measurements (before each op "
                           f"and at the end): best {hi:.2f} GB/s, worst {lo:.2f} GB/s; "
                           f"reference {copy.gbps:.2f} GB/s ({copy.method})")
            if hi > 1.15 * lo:
                notes.append(
                    f"the copy bandwidth drifted during the run ({lo:.1f} to {hi:.1f} GB/s over "
                    f"{len(copies)} measurements; see the CSV): the machine's memory bandwidth "
                    "is not steady (a shared host), so every %copy is against the best "
                    "measurement and ops timed in a slow phase look lower than they are")
            for r in ops_results:
                r.frac = r.gbps / copy.gbps
            headers, rows = _ops_table_rows(ops_results, op_contenders)
            progress.write("")
            progress.write(format_table(headers, rows))
            errors = sorted({f"{r.backend} {r.op}: {r.note}" for r in ops_results
                             if r.note and r.timing is None})
            for e in errors[:20]:
                progress.write(f"  {e}")
            notes += errors

        win_results: list[WindowResult] = []
        dtype = torch.bfloat16
        if model_names and not backends:
            notes.append("windows skipped: no backend to run FusedAccumulator on")
            model_names = []
        if model_names:
            if device.type == "cpu" and not compile_mode:
                notes.append(
                    "peer 3 (recipe with its boundary under torch.compile) skipped on CPU"
                    + (" and under --quick" if quick else "")
                    + ": inductor can take a minute or more per param list to compile the "
                      "boundary on a small CPU; run with --compile on to include it")
            elif device.type == "cuda" and not compile_mode:
                notes.append("peer 3 (torch.compile) skipped: --quick or --compile off")
        for name in model_names:
            m = MODELS[name]
            if m.note:
                notes.append(f"window param list `{name}` is a {m.label}: {m.note}")
            try:
                win_results += run_windows(m, device, dtype, backends, wc, compile_mode,
                                           progress, notes)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory building the grads
                notes.append(f"windows on {name} failed: {_short(exc)}")
            gc.collect()
        ratios = window_ratios(win_results)
        if win_results:
            headers, rows = _window_table_rows(win_results, ratios, copy.gbps, K_WINDOW,
                                               device)
            progress.write("")
            progress.write(format_table(headers, rows))
    finally:
        progress.close()

    wall = time.perf_counter() - t_start
    base_path = os.path.join(args.out, stem)
    plot_note = ""
    if ops_results and not args.no_plot:
        try:
            plot_note = write_plot(base_path + ".png", ops_results, op_contenders, copy,
                                   f"fusedaccum ops on {dname}")
        except Exception as exc:  # noqa: BLE001 - a plot is never worth failing the run
            plot_note = f"No plot: {_short(exc)}"
    args_line = " ".join(argv)
    write_markdown(base_path + ".md", device=device, copy=copy, ops_results=ops_results,
                   backends=backends, excluded=excluded, win_results=win_results,
                   ratios=ratios, notes=notes, args_line=args_line, wall=wall, k=K_WINDOW,
                   quick=quick, plot_note=plot_note)
    with open(base_path + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in _csv_rows(copy, ops_results, win_results, ratios):
            w.writerow(row)
    print()
    if plot_note:
        print(plot_note)
    print(f"wrote {base_path}.md and {base_path}.csv ({wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
