"""FusedAccumulator: a torch.optim.Optimizer that wraps any torch optimizer.

It owns the accumulation window: gradients go into flat fp32 accumulators as
backward produces them (post-accumulate-grad hooks), the boundary ``step()``
computes the global norm, clips, removes the loss scale, skips non-finite windows,
and runs the update — on the fused path for Adam, AdamW and SGD (one op call per
contiguous run of params per bucket), or through the inner optimizer (the generic
path) for every other torch optimizer. See DESIGN.md sections 1 and 2.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator
import os
import sys
import warnings
import weakref
from collections import OrderedDict
from itertools import chain, repeat

import torch
from torch.optim import optimizer as _torch_optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
from torch.utils.weak import WeakIdKeyDictionary

from fusedaccum import distributed as dp
from fusedaccum import ops
from fusedaccum.buffers import HALF_DTYPES, IN_BATCH, Bucket
from fusedaccum.scaling import LossScaler

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_STATE_VERSION = 1
# Half gradients of at most this many elements wait in a per-bucket batch and are
# accumulated together, one op call for many (on a GPU one launch instead of one Python
# hook + launch each: that overhead dominates models of many small tensors). A batch is
# flushed when its gradients reach _flush_bytes(device), at the end of every backward
# pass and before anything reads the accumulators, so it holds at most that many bytes
# (plus one gradient) that plain autograd would have freed a little earlier. None: each
# backend's own largest batched gradient (its ops module's BATCH_MAX_NUMEL; 4M elements
# where it names none), a number: that one for every backend (tests, bench/hook_settings).
_BATCH_MAX_NUMEL: int | None = None
_BATCH_MAX_NUMEL_DEFAULT = 1 << 22
_BATCH_FLUSH_BYTES = 32 << 20
# On a CPU a batch is flushed while its gradients are still in cache: one op call costs
# microseconds there, not a launch. Measured on the 2-core EPYC (2026-11-26, window
# phases of the gpt2-124m/4 list, one process, 20 rounds): windows of 17.2, 17.1, 17.4,
# 19.2 and 19.1 ms with 1, 2, 4, 8 and 32 MiB batches.
_BATCH_FLUSH_BYTES_CPU = 2 << 20


# Whether the C++ hook flushes a triton bucket's full batches itself (csrc/hooks.cpp, table
# flush: it builds the kernel's table and calls ops/triton.py's _launch_table) and
# accumulates its gradients above the batching limit the same way (a table of one pair),
# and _flush its other batches through the same C++ (Bucket.cxx_flush), or Python does
# all of it. Read when a wrapper installs its hooks. A flush in Python costs several
# times its warm host time inside a backward, whose memory traffic evicts the caches
# (H100: ~200 us per flush in a gpt2-124m window, 45-50 us alone): with the kernels
# stubbed out on the development CPU, the op of a 28-gradient batch took 16 us warm and
# 87 us after a 64 MiB sweep, and the table flush cut a quarter-width gpt2-124m window's
# backward passes from 6.0 to 5.5 ms (bench/flush_host_cost.py, results/AMD-EPYC_
# 2026-11-26_flush_host_cost.md). Not measured on a GPU yet (window_phases.py variant
# python-flush).
_TABLE_FLUSH = True

# Whether the C++ hook also takes a half param's gradient before AccumulateGrad (a tensor
# pre-hook, csrc/hooks.cpp BatchPreHook): AccumulateGrad then receives nothing, so no .grad
# is made, set and cleared (nor copied, where autograd cannot hand the gradient over), and
# no post-accumulate-grad hook runs. Read when a wrapper installs its hooks.
_PRE_HOOK = True
# Whether a boundary reads its found-inf flag after queuing the update's kernels (the host
# waits for the norm while the device goes on; FusedAccumulator._boundary) rather than
# before launching them (benchmarks compare; read at each boundary).
_READ_FLAG_LATE = True


def _batch_max_numel(ops) -> int:
    """The largest half gradient a bucket running ``ops`` batches (larger ones are
    accumulated alone)."""
    if _BATCH_MAX_NUMEL is not None:
        return _BATCH_MAX_NUMEL
    return getattr(ops, "BATCH_MAX_NUMEL", _BATCH_MAX_NUMEL_DEFAULT)


def _flush_bytes(device: torch.device) -> int:
    """The batch flush size of a bucket on ``device`` (on CPUs never above the GPUs')."""
    if device.type == "cpu":
        return min(_BATCH_FLUSH_BYTES, _BATCH_FLUSH_BYTES_CPU)
    return _BATCH_FLUSH_BYTES


def _note_write(b: Bucket, before: int, made_stats: bool) -> None:
    """Keep ``b.stats_version`` right after one of our own writes to ``b.acc`` (whose
    version was ``before``): a write that made statistics keeps them valid unless they
    were stale already; one that made none keeps valid ones valid (it wrote params whose
    statistics were cleared). ``b.clean_version`` stays valid too (it wrote touched
    params)."""
    v = b.stats_version
    if made_stats:
        b.stats_version = b.acc._version if v in (-1, before) else -2
    elif v >= 0 and v == before:
        b.stats_version = b.acc._version
    if b.clean_version == before:
        b.clean_version = b.acc._version


def _mark_clean(b: Bucket) -> None:
    """``b``'s accumulators are known to hold zeros outside the touched and the dirty
    params (see Bucket.clean_version)."""
    b.clean_version = b.acc._version if b.overwrite_first and b.is_half else -1


def _all_zero(b: Bucket) -> None:
    """After ``b.acc`` was zeroed whole: no param's accumulator is dirty, all are clean."""
    b.dirty = [False] * len(b)
    _mark_clean(b)

# param -> (weakref to its wrapper, hook handles): a param belongs to one live wrapper
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
# the fp32 masters of wrapped half params (they take the params' places in the inner
# optimizer's groups): wrapping them would train tensors no backward reaches
_MASTERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_MISSING = object()
_VERSION = operator.attrgetter("_version")
# the code of torch's step wrapper (Optimizer.profile_hook_step), which runs the global
# and the optimizer's own step hooks around the optimizer's step
_TORCH_STEP_WRAPPER_CODE = getattr(
    torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: None), "__code__", None)


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel of the first frame outside fusedaccum and torch (its
    optim, amp and utils callers, and the torch.compiler.disable wrapper that step() runs
    through: _never_traced)."""
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _positional(sd: dict, extra: dict | None) -> tuple[dict, dict | None]:
    """``sd`` with its state keyed by each param's position in the saved groups (0, 1, ...
    over all groups in order), and those positions as the groups' ``params``; the
    ``"fusedaccum"`` entry ``extra`` with its per-param parts keyed the same way.

    torch.optim pairs the ids listed in the saved groups' ``params`` with the optimizer's
    params in order (where an id is listed twice, the last place wins), and finds each
    param's state under its id: positions in ``Optimizer.state_dict()``, but any keys
    elsewhere (names in ``torch.distributed.checkpoint``, the ids of a group taken out of
    a larger state dict, ids a load pre-hook relabelled). The entry's masters, partial
    window and cleared grads are keyed by the same ids. State under an id no group lists
    is dropped, as torch never finds it; a key that is the decimal string of a listed
    integer id (a JSON round trip) finds it."""
    pos = {pid: n for n, pid in enumerate(pid for g in sd["param_groups"] for pid in g["params"])}

    def where(key):
        n = pos.get(key)
        if n is None and isinstance(key, str) and key.isdigit():
            n = pos.get(int(key))
        return n

    def keyed(mapping: dict) -> dict:
        return {where(k): v for k, v in mapping.items() if where(k) is not None}

    groups, n = [], 0
    for g in sd["param_groups"]:
        groups.append(dict(g, params=list(range(n, n + len(g["params"])))))
        n += len(g["params"])
    sd = dict(sd, state=keyed(sd.get("state", {})), param_groups=groups)
    if extra is not None:
        extra = dict(extra)
        for part in ("masters", "accumulators"):
            if isinstance(extra.get(part), dict):
                extra[part] = keyed(extra[part])
        if isinstance(extra.get("cleared_grads"), list | tuple):
            extra["cleared_grads"] = [where(k) for k in extra["cleared_grads"]
                                      if where(k) is not None]
    return sd, extra


def _grad_cleared(b: Bucket, i: int) -> bool:
    """Whether the .grad view of the window of param ``i`` of ``b``, stepped as an fp32
    tensor, was cleared (a zero_grad(), the wrapper's or the model's)."""
    t = b.stepped[i]
    return t.dtype == torch.float32 and t.grad is None


def _as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _hyper(gi: int, key: str, value) -> float:
    """Group ``gi``'s hyperparameter ``key`` as a float; ValueError naming both where it is
    not a number (a string too: torch's math refuses "0.1", and float() read "nan")."""
    try:  # (the ops' own check: a string too is refused, not parsed)
        return ops.reference.check_number(key, value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"param group {gi}: {key}={value!r} is not a number ({exc})") from None


def _check_norm_type(norm_type) -> float:
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        norm_type = math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")
    norm_type = float(norm_type)
    if norm_type != 2.0 and norm_type != math.inf:
        raise ValueError(f"norm_type must be 2.0 or inf (math.inf), got {norm_type!r}")
    return norm_type


def _check_capturable(gi: int, name: str, buckets) -> None:
    """Param group ``gi`` asks for ``capturable=True``: as torch's Adam/AdamW step, refused
    (ValueError, naming the group) for params on a device that torch does not capture on
    (the CPU). The fused step itself needs no host value of ``step`` on any device."""
    supported = getattr(_torch_optimizer, "_get_capturable_supported_devices", None)
    devices = supported() if supported is not None else ["cuda", "xla"]
    bad = sorted({b.device.type for b in buckets} - set(devices))
    if bad:
        raise ValueError(f"param group {gi}: capturable=True, but its params are on {bad[0]}; "
                         f"torch.optim.{name} supports capturable=True only on "
                         f"{', '.join(devices)} (set capturable=False)")


def _fp32_state(st: dict) -> dict:
    """A param's optimizer state with its fp16/bf16 tensors in fp32 (per-element moments,
    Adafactor's row/column factors, ASGD's scalars alike)."""
    return {k: v.to(torch.float32) if isinstance(v, torch.Tensor) and v.dtype in HALF_DTYPES
            else v for k, v in st.items()}


def _forget_wrapper(handles: list, param_refs: list, acc_refs: list) -> None:
    """A wrapper was collected: its hooks leave the params, and so does each ``main_grad``
    that views one of its accumulators (not one another wrapper gave the param since), so
    that its accumulators are freed with it (the hooks' closures held views of them)."""
    for h in handles:
        h.remove()
    accs = {id(a) for a in (r() for r in acc_refs) if a is not None}
    for ref in param_refs:
        p = ref()
        if p is None:
            continue
        owner = _OWNERS.get(p)
        if owner is not None and owner[0]() is None:
            _OWNERS.pop(p, None)
        main_grad = p.__dict__.get("main_grad")
        if main_grad is not None and id(main_grad._base) in accs:
            del p.__dict__["main_grad"]


def _element_addresses(p: torch.Tensor) -> torch.Tensor:
    """The byte address of every element of ``p`` (int64, 1-D)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for n, st in zip(p.shape, p.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    return p.data_ptr() + offsets.reshape(-1) * p.element_size()


def _check_no_shared_elements(spans: list) -> None:
    """ValueError naming a param whose elements share memory with each other (an
    expand()ed or overlapping as_strided view: torch.optim cannot update it in place
    either), or two params whose elements share memory: tied weights restored as two
    Parameters (load_state_dict(assign=True) of a tied model), or views of one tensor.
    torch.optim updates that memory through both; the wrapper gives each param a buffer
    of its own, which would untie them silently. ``spans``: (tensor, name) pairs.

    Byte ranges first (one sort); a param with gaps (not dense) has its element addresses
    checked for repeats, and where ranges meet two dense params (or params of different
    element sizes) share memory, while views with gaps, which may interleave without
    sharing an element, have their element addresses compared (one sort per cluster)."""
    ranges = []
    for p, name in spans:
        n = p.numel()
        if n == 0:
            continue
        extent = 1 + sum((d - 1) * st for d, st in zip(p.shape, p.stride()))
        dense = extent == n and (p.is_contiguous() or _is_permuted_dense(p))
        if not dense and n > 1:
            a = _element_addresses(p).sort().values
            if bool((a[1:] == a[:-1]).any()):
                _self_overlap_error(name)
        first = p.data_ptr()
        ranges.append((str(p.device), first, first + extent * p.element_size(), dense, p,
                       name))
    ranges.sort(key=lambda r: (r[0], r[1]))
    cluster: list = []
    end = 0
    for r in [*ranges, None]:
        if r is not None and cluster and r[0] == cluster[0][0] and r[1] < end:
            cluster.append(r)
            end = max(end, r[2])
            continue
        if len(cluster) > 1:
            _check_cluster(cluster)
        if r is not None:
            cluster, end = [r], r[2]


def _is_permuted_dense(p: torch.Tensor) -> bool:
    """Dense in some dim order (channels_last, a transpose): no gaps, no repeats."""
    perm = sorted(range(p.dim()), key=lambda d: -p.stride(d))
    return p.permute(perm).is_contiguous()


def _check_cluster(cluster: list) -> None:
    for i, a in enumerate(cluster):
        for b in cluster[i + 1:]:
            meet = b[1] < a[2] and a[1] < b[2]
            if meet and (a[3] and b[3] or a[4].element_size() != b[4].element_size()):
                _shared_memory_error(a[5], b[5])
    addresses = [_element_addresses(r[4]) for r in cluster]
    flat = torch.cat(addresses).sort().values
    same = flat[1:] == flat[:-1]
    if bool(same.any()):
        address = flat[1:][same][0]
        a, b = [r for r, ad in zip(cluster, addresses) if bool((ad == address).any())][:2]
        _shared_memory_error(a[5], b[5])


def _self_overlap_error(name: str):
    raise ValueError(f"{name} has elements sharing memory (an expand()ed or overlapping "
                     "as_strided view), which torch.optim cannot update in place either; make "
                     "it a tensor of its own (.clone())")


def _shared_memory_error(first: str, second: str):
    raise ValueError(
        f"{first} and {second} share memory (tied weights restored as two Parameters, e.g. "
        "by load_state_dict(..., assign=True), or views of one tensor): torch.optim would "
        "update that memory through both, and FusedAccumulator gives every param a buffer "
        "of its own, which would untie them. Tie them as one Parameter before wrapping "
        "(model.head.weight = model.emb.weight), or .clone() one of them")


def _in_compiled_autograd() -> bool:
    """Whether compiled autograd runs this backward: it runs no callback queued on the
    autograd engine (and the hooks may run untraced there: Dynamo falls back to eager
    frames past its recompile limit)."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return ca is not None and bool(getattr(ca, "in_compiled_autograd_region", False))


def _eager_when_traced(body, traced: bool = False):
    """A hook that runs ``body`` and, when Dynamo traces it, runs ``body`` eagerly through
    torch.compiler.disable (a graph break), passing ``traced=True`` if asked (also under
    compiled autograd, traced or not): see FusedAccumulator's note on the hooks and
    Dynamo."""
    is_compiling = torch.compiler.is_compiling
    eager = torch.compiler.disable(body)

    if traced:
        def hook(arg):
            if is_compiling():
                return eager(arg, True)
            if _in_compiled_autograd():
                return body(arg, True)
            return body(arg)
    else:
        def hook(arg):
            if is_compiling():
                return eager(arg)
            return body(arg)
    return hook


@torch.compiler.disable
def _end_of_backward_eagerly(owner_ref) -> None:
    """``owner._end_of_backward()``, never traced. The autograd engine runs the callbacks
    queued on it at the end of backward; in a backward that a compiled function calls,
    Dynamo's frame callback is still set there, and it compiled the batch flush (the ops'
    accumulate_many_): inductor of torch 2.11 miscompiled its in-place writes into views
    of one flat buffer (garbage in the accumulators), and every batch length was one
    more recompile.

    The callback holds the wrapper weakly, as the hooks do: the engine keeps its
    callbacks as long as the backward's graph task lives, which on a GPU can end on the
    engine's device thread after ``backward()`` has returned (a wrapper deleted right
    after a backward kept its accumulators alive until then)."""
    owner = owner_ref()
    if owner is not None:
        owner._end_of_backward()


def _check_k(k, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{what} must be an int >= 1, got {k!r}")
    return int(k)


# func -> func run through torch.compiler.disable, for the wrapper's methods that Dynamo
# must not trace (_never_traced); made when the first wrapper is built (Dynamo's import
# takes a second, and building a wrapper imports it anyway: see _eager_when_traced)
_NEVER_TRACED: dict = {}


def _never_traced(func):
    """``func`` (a method that changes the wrapper's counters or windows), always run
    through torch.compiler.disable, as torch.optim's own state_dict() is: where Dynamo
    traces a call to it (``torch.compile(opt.step)``, a compiled train step calling
    ``opt.step()``) that is a graph break, as at the wrapper's hooks. Traced, torch 2.13
    dropped the writes to the wrapper's attributes that a graph break followed (it does
    so on any torch.optim.Optimizer): micro_step and update_count never moved, and every
    step() after the first boundary applied one micro-batch's gradient. (Checking
    torch.compiler.is_compiling() instead was not enough: after the graph break Dynamo
    runs this frame with its callback on, is_compiling() is False there, and it traced
    ``func``.) Host time: about 0.5 us per call."""
    _NEVER_TRACED[func] = None

    @functools.wraps(func)
    def method(*args, **kwargs):
        return _NEVER_TRACED[func](*args, **kwargs)

    return method


def _make_never_traced() -> None:
    for func, eager in list(_NEVER_TRACED.items()):
        if eager is None:
            _NEVER_TRACED[func] = torch.compiler.disable(func)


def _with_step_hooks(func):
    """``func`` (a ``step``) wrapped as torch.optim.Optimizer.profile_hook_step wraps it.

    Torch's wrapper enters ``record_function`` on every call, i.e. every micro-batch: two
    op calls, tens of us of host time on a cold cache after backward. This one enters it
    only while a profiler is on, and is otherwise the same: global then per-optimizer pre
    hooks (each may return new (args, kwargs)), ``func``, ``_optimizer_step_code()``, then
    per-optimizer then global post hooks. A nested call (a subclass's ``step`` calling
    ``super().step()``) runs ``func`` alone, so the hooks fire once per user call.
    """
    @functools.wraps(func)
    def step(*args, **kwargs):
        self = args[0]
        if self._in_step:
            return func(*args, **kwargs)
        if torch.autograd._profiler_enabled():
            name = f"Optimizer.step#{self.__class__.__name__}.step"
            with torch.autograd.profiler.record_function(name):
                return _run_step(func, self, args, kwargs)
        return _run_step(func, self, args, kwargs)

    step = _never_traced(step)
    step.hooked = True  # Optimizer._patch_step_function must not wrap it again
    return step


def _check_pre_hook_result(who, result) -> tuple:
    """A step pre-hook's ``result`` (not None): the (new_args, new_kwargs) it returned, or
    torch's step wrapper's error, naming ``who`` as torch does."""
    if isinstance(result, tuple) and len(result) == 2:
        return result
    raise RuntimeError(f"{who} must return None or a tuple of (new_args, new_kwargs), but got "
                       f"{result}.")


def _run_step(func, self, args, kwargs):
    pre_hooks = self._optimizer_step_pre_hooks
    if _global_optimizer_pre_hooks or pre_hooks:
        for pre_hook in chain(_global_optimizer_pre_hooks.values(), pre_hooks.values()):
            result = pre_hook(self, args, kwargs)
            if result is not None:
                args, kwargs = _check_pre_hook_result(func, result)
    self._in_step = True
    try:
        out = func(*args, **kwargs)
    finally:
        self._in_step = False
    self._optimizer_step_code()
    post_hooks = self._optimizer_step_post_hooks
    if post_hooks or _global_optimizer_post_hooks:
        for post_hook in chain(post_hooks.values(), _global_optimizer_post_hooks.values()):
            post_hook(self, args, kwargs)
    return out


def _fused_kind(opt: torch.optim.Optimizer) -> str | None:
    """'adam' or 'sgd' when ``opt`` runs on the fused path, else None (generic)."""
    if type(opt) in (torch.optim.Adam, torch.optim.AdamW):
        kind = "adam"
    elif type(opt) is torch.optim.SGD:
        kind = "sgd"
    else:
        return None
    if any(g.get("differentiable", False) for g in opt.param_groups):
        return None  # differentiable optimizers need autograd through the step
    return kind


class FusedAccumulator(torch.optim.Optimizer):
    """Gradient accumulation, clipping, loss scaling and fused steps around ``optimizer``.

    See DESIGN.md section 2 for the full contract. ``param_groups``, ``defaults`` and
    ``state`` are the inner optimizer's own objects.
    """

    # torch.amp.GradScaler hands us grad_scale/found_inf instead of skipping step() itself
    _step_supports_amp_scaling = True
    _in_step = False  # inside a hooked step() (see _with_step_hooks)
    _swapped = False  # the generic path's fp32 copies are in the groups (_generic_update)
    # data parallel: the global item count (or None) of a window whose gradients are
    # summed over the ranks already, by a boundary that raised after the exchange
    _reduced = _MISSING

    def __init__(self, optimizer: torch.optim.Optimizer, *, accumulation_steps=1,
                 max_grad_norm=None, norm_type=2.0, loss_scale=None, master_weights=None,
                 backend="auto", process_group=None, shard_optimizer_state=False):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("FusedAccumulator wraps a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if isinstance(optimizer, FusedAccumulator):
            raise ValueError("the optimizer is already a FusedAccumulator; wrap the inner one")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("LBFGS re-evaluates the loss inside step(), which cannot be "
                             "accumulated over micro-batches; use another optimizer")
        if isinstance(optimizer, torch.optim.SparseAdam):
            raise ValueError("SparseAdam steps sparse gradients only, and FusedAccumulator "
                             "accumulates dense ones; use torch.optim.Adam or AdamW")
        self.accumulation_steps = accumulation_steps  # (checked: the property's setter)
        self.max_grad_norm = max_grad_norm
        self.norm_type = _check_norm_type(norm_type)
        # (`is`, not `in`: 0 == False, and 0 or numpy's False_ kept the masters)
        if not (master_weights is None or master_weights is True or master_weights is False):
            raise ValueError(f"master_weights must be None, True or False, got "
                             f"{master_weights!r}")
        self.master_weights = master_weights is not False
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a string, got {backend!r}")
        if backend != "auto" and backend not in ops.BACKENDS:
            raise RuntimeError(f"unknown backend {backend!r}; choose 'auto' or one of "
                               f"{', '.join(ops.BACKENDS)}")
        self.backend = backend
        self._pg = process_group
        self._shard = None
        if shard_optimizer_state and process_group is None:
            raise ValueError("shard_optimizer_state=True splits the state across a "
                             "process_group: pass process_group (e.g. "
                             "torch.distributed.group.WORLD)")
        if process_group is not None:
            rank, world = dp.check_process_group(process_group)
            if shard_optimizer_state:
                self._shard = (rank, world)

        # torch.optim.Optimizer's own bookkeeping, without its param-group building
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        self.inner = optimizer
        self._kind = _fused_kind(optimizer)
        if self._shard is not None and self._kind is None:
            raise ValueError("shard_optimizer_state=True runs on the fused path only "
                             "(torch.optim.AdamW, Adam or SGD), not "
                             f"{type(optimizer).__name__}")
        self._buckets: list[list[Bucket]] = []  # per param group
        self._handles: list = []
        self._param_refs: list = []  # weak references to the params hooked
        self._acc_refs: list = []  # and to the buckets' accumulators
        weakref.finalize(self, _forget_wrapper, self._handles, self._param_refs,
                         self._acc_refs)
        self._check_params(optimizer.param_groups)
        first = next((p for g in optimizer.param_groups for p in g["params"]), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._scaler = None if loss_scale is None else LossScaler(loss_scale, self._device)
        all_params = [p for g in optimizer.param_groups for p in g["params"]]
        self._check_not_ddp(all_params)
        for dev in {p.device for p in all_params}:  # fail before any param is touched
            self._backend_module(dev)
        self.micro_step = 0
        self.update_count = 0
        self.skipped_steps = 0
        self.stepped = False
        self._warned_skip = False
        self._ddp_checked = False
        self._resets = 0  # reset_accumulation() calls (compared across ranks: merge_window)
        # a boundary saw signs of a DDP (half params with a .grad, hooks on their nodes) and
        # found none behind them (_check_late_ddp)
        self._strays_searched = False
        # the autograd graph task (backward) whose end flushes the batches, or None: a
        # backward that raised never runs its callbacks, and the next one queues again
        self._flush_queued = None
        # some param group has fp32 params (their .grad views: _end_of_backward)
        self._has_fp32 = False
        # some bucket has dirty accumulators (Bucket.dirty: _end_of_backward zeroes them)
        self._stale = False
        # a backward that accumulates a large half gradient at once (direct) must queue
        # _end_of_backward too: _has_fp32 or _stale (read by the C++ hook)
        self._wants_callback = False
        # the state dict, and its size, _record_fused_steps last made or checked entries in
        self._recorded_in, self._recorded_len = None, -1
        # the state entries as the last boundary left them (_sync_state); None: unknown
        self._set_snaps(None)
        self.grad_norm = torch.zeros((), dtype=torch.float32, device=self._device)
        # (device, pinned host tensor, CUDA event): the boundary's found-inf read
        # (_read_later), made on the first boundary on a CUDA device
        self._flag = None
        # (window length D, device, 1/D as a 0-dim fp32 tensor there): see _boundary
        self._inv = None
        # the C++ extension's module where it runs the hooks (csrc/hooks.cpp): also the
        # boundary's walks over the params (params_in_place, bump_versions, clear_grads,
        # any_grad); None: those in Python
        self._cxx = None
        self._window_k = self._next_k()  # a bad callable fails here, before any hook
        if backend != "auto" and not any(g["params"] for g in optimizer.param_groups):
            # (no param yet, so no device to check the backend against, as wrapping does
            # for each param's: one that runs on no device of this machine is refused now,
            # not at a later add_param_group)
            why = ops.unavailable_reason(backend)
            if why is not None:
                raise RuntimeError(f"fusedaccum backend {backend!r} cannot run here: {why}")

        with self._building(range(len(optimizer.param_groups))):
            if self._pg is not None:
                dp.check_replicas(list(self._all_buckets()), self._pg, self._device)
            where = self._index_map()
            index = {id(p): idx for idx, (b, i) in where.items()
                     for p in (b.params[i], b.stepped[i])}
            existing = {index[id(t)]: st for t, st in optimizer.state.items() if id(t) in index}
            if self._kind is not None:  # (copied into the flat buffers: checked first)
                for idx, st in existing.items():
                    self._check_entry(*where[idx], st)
            self._adopt_state(existing)

    # -- the inner optimizer's objects, at all times ---------------------------------
    @property
    def param_groups(self):
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.inner.param_groups = value

    @property
    def defaults(self):
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value):
        self.inner.defaults = value

    @property
    def state(self):
        return self.inner.state

    @state.setter
    def state(self, value):
        self.inner.state = value

    def __getattr__(self, name: str):
        # train()/eval() exist iff the inner optimizer has them (schedule-free optimizers:
        # accelerate and the HF Trainer call them where hasattr says they exist)
        if name in ("train", "eval"):
            inner = self.__dict__.get("inner")
            if callable(getattr(inner, name, None)):
                return functools.partial(self._inner_mode, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    @torch.no_grad()
    def _inner_mode(self, name: str):
        """``inner.train()`` or ``inner.eval()`` (a schedule-free optimizer moves the tensors
        it steps between its two points); then the half params take their masters' new
        values, as after an update."""
        self._sync_groups()
        self._check_buckets()  # (masters re-read where the params were written)
        # (the HF Trainer calls train() every micro-batch: only masters it moved are copied)
        return self._masters_to_model_after(getattr(self.inner, name))

    def _masters_to_model_after(self, fn):
        """``fn()``; then the half params of each bucket whose fp32 masters it wrote take
        their new values (Bucket.masters_to_model). Unsharded buckets: with ZeRO-1 only
        the fused step writes the masters, and its all-gather the params."""
        masters = [(b, b.master._version) for b in self._all_buckets()
                   if b.has_master and not b.sharded]
        out = fn()
        for b, version in masters:
            if b.master._version != version:
                b.masters_to_model()
        return out

    def __repr__(self) -> str:
        return (f"FusedAccumulator({self.inner!r}, accumulation_steps="
                f"{self.accumulation_steps!r}, max_grad_norm={self.max_grad_norm!r})")

    def __reduce_ex__(self, protocol):
        raise TypeError("a FusedAccumulator cannot be pickled or deep-copied: it is tied to "
                        "its model's params by hooks. Save opt.state_dict() (and the model's) "
                        "and load them into a new FusedAccumulator")

    def optimizer_memory_bytes(self) -> int:
        """Bytes this process holds for fp32 master weights and optimizer state.

        With ``shard_optimizer_state=True`` about 1/N of the unsharded figure. The
        accumulators and the model's own params are not counted; on the generic path
        the inner optimizer's own state tensors are.
        """
        total = 0
        for b in self._all_buckets():
            if b.master is not None:
                total += b.master.numel() * b.master.element_size()
            total += sum(t.numel() * t.element_size() for t in b.state_flat.values())
        if self._kind is None:
            for st in self.inner.state.values():
                total += sum(v.numel() * v.element_size() for v in st.values()
                             if isinstance(v, torch.Tensor) and v.dim() > 0)
        return total

    # -- window bookkeeping --------------------------------------------------------
    @property
    def accumulation_boundary(self) -> bool:
        """True iff the next ``step()`` call ends the window."""
        return self.micro_step + 1 >= self._k()

    @property
    def loss_scale(self):
        if self._scaler is None:
            return 1.0
        return self._scaler.scale if self._scaler.dynamic else float(self._scaler.scale)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the current loss scale (unchanged without loss scaling)."""
        if self._scaler is None:
            return loss
        return loss * self._scaler.scale.to(loss.device)

    @property
    def accumulation_steps(self):
        """Micro-batches per window: an int >= 1, or a callable(windows_ended) -> int.
        Set after construction: a window under way keeps its length; set between windows
        (no micro-batch of the next one counted yet), the next window takes it."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, value) -> None:
        if not callable(value):
            _check_k(value, "accumulation_steps")
        self._k_fn = value if callable(value) else None
        self._accumulation_steps = value
        if getattr(self, "micro_step", None) == 0:  # (asked again at the next step())
            self._window_k = None

    @property
    def max_grad_norm(self):
        """The clipping threshold (None: no clipping; inf: the norm is computed, nothing is
        clipped, as clip_grad_norm_ takes it). Set after construction, it applies from the
        next boundary."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value) -> None:
        if value is not None:
            # (> 0 in fp32, where the clip coefficient is computed: 1e-300 was 0 there, a
            # zero multiplier whose undo, after an inner pre-hook raised, divided by 0)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not value > 0 \
                    or not torch.tensor(float(value), dtype=torch.float32).item() > 0:
                raise ValueError(f"max_grad_norm must be None or a number > 0 (in float32), "
                                 f"got {value!r}")
            value = float(value)
        self._max_grad_norm = value

    def _next_k(self) -> int:
        if self._k_fn is None:
            return int(self.accumulation_steps)
        return _check_k(self._k_fn(self.update_count + self.skipped_steps),
                        "accumulation_steps(windows_ended)")

    def _start_k(self) -> None:
        """The next window's length, asked at its start. Where the callable raises (or
        gives a bad value) the length stays unknown (None) and the error propagates; the
        next step() (or accumulation_boundary) asks again, and raises again, rather than
        counting a micro-batch against the last window's length."""
        self._window_k = None
        self._window_k = self._next_k()

    def _k(self) -> int:
        """This window's length (see _start_k)."""
        if self._window_k is None:
            self._window_k = self._next_k()
        return self._window_k

    def _all_buckets(self):
        for buckets in self._buckets:
            yield from buckets

    @_never_traced
    def reset_accumulation(self) -> None:
        """Drop the partial window: accumulators zeroed, micro_step back to 0."""
        self._drop_pending()
        with torch.no_grad():
            for b in self._all_buckets():
                b.acc.zero_()
                _all_zero(b)
        self._stale = False
        self._end_window()
        self.micro_step = 0
        self._resets += 1
        if self._scaler is not None:
            self._scaler.window_ended()
        self._start_k()

    def _ride_norm(self) -> bool:
        """Whether this micro-batch's accumulations should also produce norm statistics."""
        # (no callable is asked here, inside a backward: an unknown length rides nothing)
        return self._pg is None and self._window_k is not None \
            and self.micro_step + 1 >= self._window_k

    def _end_window(self, defer_grads: bool = False, zeroed: bool = True, lazy: bool = False):
        """The window's per-param marks cleared, and the ``.grad`` views it gave; with
        ``defer_grads`` the tensors whose ``.grad`` to clear are returned instead.
        ``zeroed``: the touched params' accumulators hold zeros now (else the caller zeroes
        them and calls ``_mark_clean``), or, with ``lazy``, in the buckets that leave
        them (Bucket.lazy_zero), the applied window: they become dirty. Where something
        else wrote the buffer in the window, the untouched params' accumulators are zeroed
        (the boundary resets the whole window; none is dirty here: _zero_stale ran)."""
        self._reduced = _MISSING
        clear = []
        for b in self._all_buckets():
            if zeroed and b.is_half:
                if b.acc._version != b.clean_version and not all(b.touched):
                    with torch.no_grad():
                        for i, t in enumerate(b.touched):
                            if not t:
                                b.main_grads[i].zero_()
                _mark_clean(b)
            if zeroed and lazy and self._leaves_acc(b):
                b.dirty = list(b.touched)
                self._stale = self._stale or any(b.dirty)
            n = len(b)
            b.stats = [None] * n
            b.batch_stats = []
            b.stats_version = -1
            b.exposed = [False] * n
            # (the per-param fields are properties: read once, not per param)
            touched, stepped, released, params = b.touched, b.stepped, b.released, b.params
            if all(touched) and not any(released):  # (the common case: fewer steps)
                touched[:] = [False] * n
                clear += stepped
                # (else the params are the stepped; the hooks left the params' .grad
                # None, unless set by hand)
                if b.has_master and not b.sharded and (
                        self._cxx is None or self._cxx.any_grad(params) is not False):
                    clear += [p for p in params if p.grad is not None]
                continue
            for i, t in enumerate(touched):
                if t:
                    touched[i] = False
                    clear.append(stepped[i])
                    if not released[i] and params[i].grad is not None:
                        clear.append(params[i])
                elif not b.is_half and params[i].grad is b.main_grads[i] \
                        and not released[i]:
                    clear.append(params[i])  # set by pre_hook for an autograd.grad call
        self._wants_callback = self._has_fp32 or self._stale
        if defer_grads:
            return clear
        self._clear_grads(clear)
        return None

    def _clear_grads(self, tensors: list) -> None:
        """``t.grad = None`` for each (in C++ where the extension's hooks run: host time,
        every param at every boundary)."""
        if self._cxx is not None:
            self._cxx.clear_grads(tensors)
        else:
            for t in tensors:
                t.grad = None

    @staticmethod
    def _leaves_acc(b: Bucket) -> bool:
        """Whether the fused boundary leaves ``b``'s stepped accumulators dirty instead
        of zeroing them (Bucket.dirty)."""
        return b.lazy_zero and b.overwrite_first

    @torch.no_grad()
    def _zero_stale(self) -> None:
        """Zero every dirty accumulator (Bucket.dirty: an earlier window's sum, of a
        param no gradient of this window has reached yet), before anything reads it as
        this window's: at the end of the window's first backward (p.main_grad is the
        window's sum after backward), and before the boundary's norm and sums and a
        state_dict(). Keeps the buckets' statistics and clean_version (it writes none of
        the params they describe)."""
        self._stale = False
        self._wants_callback = self._has_fp32
        for b in self._all_buckets():
            dirty = b.dirty
            if any(dirty):
                before = b.acc._version
                for s, _ in b.runs(None, dirty):
                    b.acc_local[s].zero_()
                b.dirty = [False] * len(b)
                _note_write(b, before, False)

    @_never_traced
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad``; the accumulated window is never dropped (either way).

        The fp32 masters of half params keep their ``.grad`` view of the window (DESIGN.md
        section 2: it views the accumulator while the window holds a gradient); the
        boundary clears it. fp32 params are the stepped tensors themselves: their
        ``p.grad`` (the view) is cleared, and the end of the next backward restores it
        (also where that backward gave the param no gradient: _end_of_backward).
        """
        self._sync_groups()
        # Host time (every micro-batch, every param): reading p.grad costs as much as
        # setting it, so each param gets one of the two when nothing was released.
        for b in self._all_buckets():
            if b.has_master:
                # the hooks set p.grad = None after each backward: only a .grad assigned
                # by hand is left to clear
                if self._cxx is not None and self._cxx.any_grad(b.params) is False:
                    continue
                for p in b.params:
                    if p.grad is not None:
                        break
                else:
                    continue
                for i, p in enumerate(b.params):
                    if p.grad is not None and not b.released[i]:
                        p.grad = None
                continue
            if any(b.released):
                for i, p in enumerate(b.params):
                    if not b.released[i] and p.grad is not None:
                        p.grad = None
            else:
                for p in b.params:
                    p.grad = None
            b.exposed[:] = [False] * len(b)

    # -- params, buckets and hooks -------------------------------------------------
    def _param_name(self, group: dict, gi: int, pi: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        name = f"{names[pi]!r} " if names and pi < len(names) else ""
        return (f"parameter {name}(group {gi}, index {pi}, shape {tuple(p.shape)}, "
                f"dtype {p.dtype})")

    def _check_params(self, groups, start: int = 0) -> None:
        seen = {id(t) for b in self._all_buckets() for t in b.params}
        shared = []
        spans = [(t, "a param the wrapper holds") for b in self._all_buckets() for t in b.params]
        for gi, group in enumerate(groups, start):
            for pi, p in enumerate(group["params"]):
                if isinstance(p, torch.nn.parameter.UninitializedParameter):
                    names = group.get("param_names")
                    name = f"parameter {names[pi]!r} " if names and pi < len(names) else \
                        "a parameter "
                    raise ValueError(f"{name}(group {gi}, index {pi}) is uninitialized (a lazy "
                                     "module's): run one forward pass before wrapping")
                name = self._param_name(group, gi, pi, p)
                if type(p).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
                    raise TypeError(
                        f"{name} is a {type(p).__name__}, a tensor subclass that dispatches "
                        "its own operations (as FSDP2's fully_shard and tensor parallel make "
                        "DTensor params, or a quantized weight): fusedaccum moves each param "
                        "into a flat buffer of plain memory and supports plain tensors only. "
                        "For data parallel wrap the unsharded model and pass process_group= "
                        "(shard_optimizer_state=True shards the optimizer state, ZeRO-1)")
                if getattr(p, "_is_flat_param", False):  # (FlatParameter's own mark)
                    raise TypeError(
                        f"{name} is a FlatParameter of FullyShardedDataParallel: FSDP "
                        "reduces each backward's gradient itself, from the .grad fusedaccum "
                        "releases. Wrap the unsharded model and pass process_group= "
                        "(shard_optimizer_state=True shards the optimizer state, ZeRO-1)")
                if p.is_complex():
                    raise TypeError(f"{name} is complex; fusedaccum supports fp32, fp16 and "
                                    "bf16 params")
                if not p.is_floating_point():
                    raise TypeError(f"{name} has integer dtype; only floating point params "
                                    "can be optimized")
                if p.dtype not in _SUPPORTED_DTYPES:
                    raise TypeError(f"{name}: fusedaccum accumulates in fp32 and supports fp32, "
                                    "fp16 and bf16 params")
                if p.is_sparse:
                    raise TypeError(f"{name} is sparse; fusedaccum needs dense params")
                if p.is_meta:
                    raise ValueError(f"{name} is on the meta device (not materialized yet): "
                                     "materialize the model before wrapping it "
                                     "(model.to_empty(device=...) and reset_parameters(), or "
                                     "load its weights)")
                if p in _MASTERS:
                    raise ValueError(
                        f"{name} is the fp32 master weight of a half param that a "
                        "FusedAccumulator wraps (its inner optimizer's groups hold the masters, "
                        "not the model's params): no backward reaches it. Wrap an optimizer "
                        "built over model.parameters(), not one already wrapped")
                # (pigeonhole: fewer reachable addresses than elements, as expand() makes;
                # other repeats: _check_no_shared_elements)
                if p.numel() > 1 and 1 + sum((n - 1) * abs(st) for n, st in
                                             zip(p.shape, p.stride())) < p.numel():
                    _self_overlap_error(name)
                if p.device.type == "cpu" and p.is_shared() and self._pg is None:
                    # (with a process group each rank steps its own replica: mp.spawn
                    # shares the model it passes to the ranks, and that is fine)
                    shared.append(name)
                if id(p) in seen:
                    raise ValueError(f"{name} appears more than once in the optimizer's "
                                     "param groups")
                seen.add(id(p))
                spans.append((p, name))
        _check_no_shared_elements(spans)
        if shared:
            warnings.warn(f"{shared[0]} and {len(shared) - 1} more params are in shared memory "
                          "(share_memory_(), Hogwild, or passed through multiprocessing): "
                          "FusedAccumulator moves params into buffers of its own, so other "
                          "processes will not see its updates", RuntimeWarning,
                          stacklevel=_caller_stacklevel())

    @contextlib.contextmanager
    def _building(self, gis):
        """Build the param groups ``gis`` (and run the body) all or nothing. Building moves
        each param into the new flat buffers, hooks it, puts its master in the inner
        optimizer's group and re-keys its state; if anything raises on the way (a check
        of the replicas, the state, out of memory), every param, group, state entry and
        hook is put back as it was and the error propagates: the params stay with the
        wrapper that held them before (which loses nothing), or untouched, and the inner
        optimizer can be wrapped again. The previous owner gives a param up only once
        the new one is built."""
        inner = self.inner
        groups = [inner.param_groups[gi] for gi in gis]
        params = [p for g in groups for p in g["params"]]
        saved_params = [list(g["params"]) for g in groups]
        saved = [(p, p.data, p.__dict__.get("main_grad", _MISSING), p.grad, _OWNERS.get(p))
                 for p in params]
        saved_state = dict(inner.state)
        n_buckets, n_handles = len(self._buckets), len(self._handles)
        try:
            for gi in gis:
                self._build_group(gi)
            yield
        except BaseException:
            masters = [t for bs in self._buckets[n_buckets:] for b in bs for t in b.stepped
                       if t in _MASTERS]
            for h in self._handles[n_handles:]:
                h.remove()
            del self._handles[n_handles:], self._buckets[n_buckets:]
            kept_by: dict[int, tuple] = {}
            with torch.no_grad():
                for g, ps in zip(groups, saved_params):
                    g["params"][:] = ps
                for p, data, main_grad, grad, owner in saved:
                    p.data = data
                    if main_grad is _MISSING:
                        p.__dict__.pop("main_grad", None)
                    else:
                        p.main_grad = main_grad
                    p.grad = grad
                    if owner is None:
                        _OWNERS.pop(p, None)
                    else:
                        _OWNERS[p] = owner
                        prev = owner[0]()
                        if prev is not None:
                            kept_by.setdefault(id(prev), (prev, {}))[1][id(p)] = owner[1][0]
            for prev, handles in kept_by.values():
                prev._restore_fast_hooks(handles)
            for t in masters:
                _MASTERS.pop(t, None)
            inner.state.clear()
            inner.state.update(saved_state)
            raise
        # built: the previous owners let go (each gives up all its params at once: a walk
        # over its buckets per param made rewrapping a model quadratic in its params)
        given_up: dict[int, tuple] = {}
        for p, *_, owner in saved:
            if owner is not None:
                for h in owner[1]:
                    h.remove()
                prev = owner[0]()
                if prev is not None and prev is not self:
                    given_up.setdefault(id(prev), (prev, set()))[1].add(id(p))
        for prev, ids in given_up.values():
            prev._release(ids)

    def _build_group(self, gi: int) -> None:
        group = self.inner.param_groups[gi]
        params = list(group["params"])
        keyed: dict[tuple, list[int]] = {}
        for pi, p in enumerate(params):
            keyed.setdefault((p.device, p.dtype), []).append(pi)
        # an unusable explicit backend fails here, before any param is touched
        modules = {dev: self._backend_module(dev) for dev, _ in keyed}
        buckets = []
        for (device, _), idx in keyed.items():
            members = [params[pi] for pi in idx]
            # a gradient held before wrapping joins the window; the window of a previous
            # owner (an fp32 param's .grad viewing its accumulator) stays behind with it,
            # as a half param's does
            grads = [None if p in _OWNERS and p.grad is p.__dict__.get("main_grad")
                     else p.grad for p in members]
            b = Bucket(members, idx, use_master=self.master_weights, shard=self._shard)
            b.ops = modules[device]
            self._acc_refs.append(weakref.ref(b.acc))
            # The norm rides on the last micro-batch's accumulations (each large gradient's
            # and each batch's). Measured on CPU (2026-11-26): a window of one GPT-2-XL block
            # 8% faster than with a separate norm pass. On GPUs each such accumulation adds a
            # finalize launch; off until measured there.
            b.ride_norm = device.type == "cpu"
            buckets.append(b)
            self._has_fp32 = self._has_fp32 or not b.is_half
            self._wants_callback = self._has_fp32 or self._stale
            for i, p in enumerate(members):
                self._install_hooks(b, i, p)
                if grads[i] is not None:  # a gradient that was there before wrapping
                    with torch.no_grad():
                        b.main_grads[i].copy_(grads[i])
                    b.touched[i] = True
                    p.grad = None
                    self._expose_grad(b, i)
                group["params"][idx[i]] = b.stepped[i]
                if b.stepped[i] is not p:
                    _MASTERS[b.stepped[i]] = True
            _mark_clean(b)  # (the copies went to touched params)
        self._buckets.append(buckets)

    @staticmethod
    def _check_not_ddp(params) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        where = dp.find_ddp_module(params)
        if where is not None:
            raise RuntimeError(
                f"the params are wrapped by DistributedDataParallel ({where}): DDP would "
                "all-reduce every micro-batch into p.grad, which fusedaccum releases. Do not "
                "wrap the model in DDP; pass process_group= to FusedAccumulator instead, which "
                "averages the fp32 accumulators once per window")

    def _check_late_ddp(self) -> None:
        """Refuse a DistributedDataParallel wrapped around the model after the first
        step() (the constructor and that step look for one): it all-reduces zeros for the
        half params, whose .grad the hooks released, so the ranks' windows would drift
        apart unseen. The signs, read at each boundary while torch.distributed is
        initialized: the .grad its reducer then writes into each half param at the end of
        a backward, or (with static_graph=True, which writes none) its hooks on their
        AccumulateGrad nodes, which only the C++ extension can see. Only then are the
        process's objects searched, once while the signs keep appearing. Raised before
        the update, so nothing is changed."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        cxx = self._cxx
        halves = [[p for p, r in zip(b.params, b.released) if not r]
                  for b in self._all_buckets() if b.is_half]
        suspects = [p for params in halves
                    if cxx is None or cxx.any_grad(params) is not False
                    for p in params if p.grad is not None]
        if not suspects and cxx is not None and hasattr(cxx, "node_hooked"):
            suspects = next((params for params in halves if cxx.node_hooked(params)), [])
        if not suspects:
            self._strays_searched = False
        elif not self._strays_searched:
            self._check_not_ddp(suspects)
            # (a .grad set by hand, a hook of the user's: not searched every window)
            self._strays_searched = True

    def _backend_module(self, device):
        return ops.get(self.backend, device)

    def _restore_fast_hooks(self, handles: dict[int, object]) -> None:
        """Take the C++ batching hooks back for the params whose ``id`` keys ``handles``
        (each to its post-accumulate hook's handle): a param has one, and a wrapper whose
        building failed replaced ours when it installed its own."""
        for b in self._all_buckets():
            if b.is_half:
                for i, q in enumerate(b.params):
                    if id(q) in handles:
                        self._install_batch_hook(b, i, q, handles[id(q)])

    def _release(self, ids: set[int]) -> None:
        """Give up the params whose ``id`` is in ``ids`` (another wrapper took them)."""
        for b in self._all_buckets():
            for i, q in enumerate(b.params):
                if id(q) in ids:
                    b.released[i] = True
                    b.touched[i] = False
                    b.dirty[i] = False
                    with torch.no_grad():
                        b.main_grads[i].zero_()
                    t = b.stepped[i]
                    if t.grad is b.main_grads[i]:  # (not the new owner's view: fp32 params)
                        t.grad = None

    def _install_hooks(self, b: Bucket, i: int, p: torch.Tensor) -> None:
        frozen = not p.requires_grad
        if frozen:  # hooks need requires_grad; the param may be unfrozen later
            p.requires_grad_(True)
        handles = [p.register_post_accumulate_grad_hook(self._make_post_hook(b, i))]
        if b.is_half:
            self._install_batch_hook(b, i, p, handles[0])
        if not b.is_half:
            handles.append(p.register_hook(self._make_pre_hook(b, i, weakref.ref(p))))
        if frozen:
            p.requires_grad_(False)
        self._handles.extend(handles)
        self._param_refs.append(weakref.ref(p))
        _OWNERS[p] = (weakref.ref(self), handles)

    def _install_batch_hook(self, b: Bucket, i: int, p: torch.Tensor, handle) -> None:
        """Put the C++ hook (csrc/hooks.cpp) in front of a half param's Python hooks: in
        the common case it does what ``post_hook`` does without a Python call (host time
        per param per backward; ``post_hook`` stays the definition and runs in every
        other case): a batched grad joins its batch; where the bucket's backend
        accumulates half grads with the C++ extension's ops (native), a grad that fills
        its batch is flushed with it, and another is accumulated at once (direct).
        Not with the reference backend (pure Python by design), nor where the extension
        would have to be compiled just for this, nor for a param that is not row-major
        (its grads are accumulated in the param's memory order: Bucket.flat_of)."""
        from fusedaccum.ops import native
        from fusedaccum.ops import reference as reference_ops
        from fusedaccum.ops.auto import Router

        # (reference: also "auto" that FUSEDACCUM_BACKEND made reference)
        if b.ops is reference_ops:
            return
        is_native = b.ops is native or isinstance(b.ops, Router) and b.ops.cuda is native
        module = native.hooks_module(load=is_native)
        if module is None:
            return
        if self._cxx is None and hasattr(module, "params_in_place"):
            self._cxx = module
        if b.cxx_flush is None:  # once per bucket: how C++ accumulates its batches
            # (the triton backend: with a kernel table C++ builds, and this launcher)
            table_flush = getattr(b.ops, "table_flush", None) if _TABLE_FLUSH else None
            table = table_flush(b.device, b.dtype) if table_flush is not None else None
            b.cxx_flush = (module.flush_batch, *(table or (None, 0, 0))) \
                if is_native or table is not None else False
        launcher, block, kind = b.cxx_flush[1:] if b.cxx_flush else (None, 0, 0)
        if b.perms[i] is not None:
            return
        batched = b.numels[i] <= _batch_max_numel(b.ops)
        # (auto: half grads, accumulate_ and accumulate_many_, go to cuda; triton: a
        # larger grad is accumulated by its kernel over a table of one pair)
        direct = not batched and (is_native or launcher is not None)
        if not (batched or direct):
            return
        nbytes = b.numels[i] * p.element_size()
        module.install_batch_hook(p, p._post_accumulate_grad_hooks, handle.id,
                                  weakref.ref(self), weakref.ref(b), i, nbytes,
                                  _flush_bytes(b.device), direct, batched and is_native,
                                  launcher, block, kind, _PRE_HOOK)

    def _expose_grad(self, b: Bucket, i: int) -> None:
        """Give the stepped tensor a ``.grad`` viewing the window (GradScaler sees it)."""
        b.exposed[i] = True
        if b.stepped[i].dtype == torch.float32:  # not half params stepped in place
            b.stepped[i].grad = b.main_grads[i]

    def _bad_grad(self, b: Bucket, i: int, grad: torch.Tensor) -> None:
        if grad.is_sparse or grad.layout != torch.strided:
            gi = next(g for g, bs in enumerate(self._buckets) if b in bs)
            name = self._param_name(self.inner.param_groups[gi], gi, b.indices[i], b.params[i])
            raise RuntimeError(f"{name} received a sparse gradient; fusedaccum accumulates "
                               "dense gradients only (use a dense embedding, sparse=False). "
                               "The window holds the gradients this backward gave other "
                               "params before it: drop it with opt.reset_accumulation()")

    # The hooks live on the params and must not keep their wrapper (which holds the params)
    # alive: a param -> hook -> wrapper -> param cycle runs through C++ and is never
    # collected. They hold the wrapper and the bucket weakly; the wrapper holds the buckets.
    #
    # Dynamo must never trace them. A train step under torch.compile that calls
    # loss.backward() breaks its graph there, and Dynamo then compiles the Python frames
    # autograd calls, these hooks among them: their bookkeeping (the batch lists, flags)
    # became traced side effects that lost micro-batches. Compiled autograd traces them
    # too, and its AccumulateGrad did not see the pre-hook's ``p.grad = view``. So a traced
    # hook (torch.compiler.is_compiling()) runs its body through torch.compiler.disable: a
    # graph break, and the hook runs eagerly, on real tensors, in order (a half gradient
    # is then added at once, not batched).

    def _make_pre_hook(self, b: Bucket, i: int, p_ref):
        """fp32 params: make ``p.grad`` the accumulator view, so autograd adds in place.

        It also fires for ``torch.autograd.grad``, which accumulates nothing: the param
        counts as touched only once post_hook ran (AccumulateGrad did), and a view put in
        place for nothing is cleared at the window's end (_end_window)."""
        view = b.main_grads[i]
        owner_ref, b_ref = weakref.ref(self), weakref.ref(b)

        def pre_hook_body(grad):
            p, b = p_ref(), b_ref()
            if p is None or b is None or b.released[i]:
                return None
            if grad.layout is not torch.strided:
                owner_ref()._bad_grad(b, i, grad)
            if p.dtype is not view.dtype:  # converted after wrapping (model.half())
                owner_ref()._check_buckets()
            cur = p.grad
            if b.dirty[i]:  # the window's first gradient: the accumulator holds the last
                if cur is None:
                    # AccumulateGrad makes a fresh .grad (it takes the incoming gradient
                    # as is where it can), and post_hook writes it over the accumulator
                    return None
                with torch.no_grad():  # a .grad assigned by hand: part of the window
                    if cur is view:
                        view.zero_()
                    else:
                        view.copy_(cur)
                        b.touched[i] = True
                b.dirty[i] = False
            elif cur is not view and cur is not None:  # a .grad the user assigned
                with torch.no_grad():
                    view.add_(cur)
                b.touched[i] = True
            if cur is not view:
                p.grad = view
            return None

        # (the disabled wrapper holds the body, not the hook: no reference cycle, so a
        # removed hook and the accumulator views it holds are freed at once)
        return _eager_when_traced(pre_hook_body)

    def _make_post_hook(self, b: Bucket, i: int):
        view = b.main_grads[i]
        flat = b.flat_slice(b.acc, i)
        accumulate_ = b.ops.accumulate_
        strided = torch.strided
        owner_ref, b_ref = weakref.ref(self), weakref.ref(b)
        # autograd hands a param a gradient of its own shape and dtype: the batch decision
        # and the bytes are the param's, fixed here (host time per param matters: ~150
        # params x k micro-batches per window)
        batched = b.numels[i] <= _batch_max_numel(b.ops)
        nbytes = b.numels[i] * b.params[i].element_size()
        flush_bytes = _flush_bytes(b.device)  # (fixed per wrapper, as the C++ hook's)
        perm = b.perms[i]  # a param not row-major: its grad is accumulated as 1-D
        queue_callback = torch.autograd.Variable._execution_engine.queue_callback
        graph_task_id = torch._C._current_graph_task_id

        def queue_end_of_backward(self, traced):
            """_end_of_backward queued once per backward (graph task); compiled autograd
            runs no callback queued on the engine: a traced hook restores the cleared
            .grad views at once."""
            task = graph_task_id()
            if self._flush_queued != task:
                self._flush_queued = task
                queue_callback(functools.partial(_end_of_backward_eagerly, owner_ref))
                if traced:
                    self._restore_cleared_grads()
                    if self._stale:
                        self._zero_stale()

        def post_hook_body(p, traced=False):
            # the hot path: once per param per backward
            grad, b, self = p.grad, b_ref(), owner_ref()
            if grad is None or b is None or self is None or b.released[i]:
                return
            if grad.layout is not strided:
                self._bad_grad(b, i, grad)
            if b.is_half:
                g = grad.detach() if grad.requires_grad else grad  # create_graph=True
                if perm is not None:  # 1-D, in the accumulator's order (Bucket.flat_of)
                    g = g.permute(perm).reshape(-1)
                elif not g.is_contiguous():  # row-major, as the accumulator view
                    g = g.contiguous()
                # (a traced hook accumulates at once: compiled autograd runs the
                # end-of-backward callbacks of its own engine, not the one queued here)
                if batched and not traced:  # into the batch, in the param's shape
                    if b.is_pending[i]:  # a second backward without the end-of-backward flush
                        self._flush(b)
                    if b.stats[i] is not None:  # its batch statistic goes stale
                        b.stats_version = -2
                    b.is_pending[i] = True
                    b.pending.append(i)
                    b.pending_accs.append(view if perm is None else flat)
                    b.pending_grads.append(g)
                    # the window's first gradient of a dirty param overwrites it
                    if b.dirty[i]:
                        b.pending_ow.append(1)
                        b.dirty[i] = False
                    else:
                        b.pending_ow.append(0)
                    b.pending_bytes += nbytes
                    if b.pending_bytes >= flush_bytes:
                        self._flush(b)
                    queue_end_of_backward(self, False)
                else:
                    # in a window's last micro-batch the norm rides on the accumulation
                    ride = b.ride_norm and self._ride_norm()
                    g = g.view(-1)
                    norm_type = self.norm_type if ride else None
                    before = b.acc._version
                    # the window's first gradient of the param overwrites its accumulator
                    # where it holds an earlier window (dirty) or the bucket knows it holds
                    # zeros (reads 4 bytes/element less)
                    ow = not b.touched[i] and (b.dirty[i] or before == b.clean_version)
                    if torch.is_grad_enabled():  # create_graph=True
                        with torch.no_grad():
                            stat = accumulate_(flat, g, 1.0, overwrite=ow, norm_type=norm_type)
                    else:
                        stat = accumulate_(flat, g, 1.0, overwrite=ow, norm_type=norm_type)
                    b.stats[i] = stat
                    b.dirty[i] = False  # (before _zero_stale: a traced hook's runs at once)
                    _note_write(b, before, stat is not None)
                    if self._wants_callback:
                        queue_end_of_backward(self, traced)
                p.grad = None
            elif grad is not view:
                if b.dirty[i] or torch.is_grad_enabled():
                    # the window's first gradient of the param (pre_hook left .grad None:
                    # the accumulator holds the last window), or autograd replaced .grad
                    # out of place (create_graph=True): it holds the window's sum
                    with torch.no_grad():
                        view.copy_(grad.detach())
                else:
                    # a fresh grad: the AccumulateGrad of compiled autograd, specialized
                    # to a .grad of None, did not see the pre-hook's view
                    view.add_(grad)
                p.grad = view
            if not b.exposed[i]:  # first grad of the window, or since zero_grad()
                b.touched[i] = True
                b.dirty[i] = False
                self._expose_grad(b, i)
            if not b.is_half:
                queue_end_of_backward(self, traced)

        return _eager_when_traced(post_hook_body, traced=True)

    @torch.no_grad()
    def _flush(self, b: Bucket) -> None:
        """Accumulate the bucket's batch of small half gradients (one op call)."""
        if not b.pending:
            return
        # in a window's last micro-batch the norm rides on the batch too (one statistic
        # for the whole batch); the other params' statistics stay valid: this writes only
        # pending params
        ride = b.ride_norm and b.stats_version != -2 and self._ride_norm()
        # without a statistic, in C++ where the C++ hook runs (Bucket.cxx_flush): the
        # same steps as below, without their host time in Python (the end-of-backward
        # flush runs after the backward's memory traffic evicted the caches)
        fast = b.cxx_flush
        if fast and not ride:
            pending, ows = b.pending, b.pending_ow  # (C++ puts new lists in their place)
            try:
                if fast[0](b, *fast[1:]):
                    return
            except BaseException:
                self._flush_failed(b, pending, ows)
                raise
        pending, accs, grads, ows = b.pending, b.pending_accs, b.pending_grads, b.pending_ow
        b.pending, b.pending_accs, b.pending_grads, b.pending_bytes = [], [], [], 0
        b.pending_ow = []
        is_pending = b.is_pending
        every = len(pending) == len(is_pending)  # (each param is pending once at most)
        if every:
            is_pending[:] = [False] * len(pending)
        else:
            for i in pending:
                is_pending[i] = False
        before = b.acc._version
        # one device, one grad dtype, contiguous, equal numels: trusted
        try:
            stat = b.ops.accumulate_many_(accs, grads, 1.0, overwrite=ows if 1 in ows else None,
                                          norm_type=self.norm_type if ride else None,
                                          trusted=True)
        except BaseException:
            self._flush_failed(b, pending, ows)
            raise
        if stat is not None:
            b.batch_stats.append(stat)
            stats = b.stats
            if every:
                stats[:] = [IN_BATCH] * len(pending)
            else:
                for i in pending:
                    stats[i] = IN_BATCH
        _note_write(b, before, stat is not None)

    def _flush_failed(self, b: Bucket, pending: list, ows: list) -> None:
        """A flush that raised (its batch is gone; also the C++ hook's): a param whose
        window's first gradient was in it is as if that gradient had never come. Its
        accumulator still holds the window applied last (the gradient was to be written
        over it): dirty again, so that its next gradient overwrites it and anything that
        reads it first zeroes it (_zero_stale), untouched and without the .grad view."""
        for i, o in zip(pending, ows):
            if o:
                b.dirty[i] = True
                b.touched[i] = False
                if b.exposed[i]:
                    b.exposed[i] = False
                    if b.stepped[i].grad is b.main_grads[i]:
                        b.stepped[i].grad = None
                self._stale = self._wants_callback = True

    def _flush_all(self) -> None:
        """Accumulate every waiting gradient (end of backward, and before any read)."""
        self._flush_queued = None
        for b in self._all_buckets():
            if b.pending:
                self._flush(b)

    def _end_of_backward(self) -> None:
        """Queued by the hooks at the end of a backward: the batches flushed, and every
        fp32 param of the window whose ``.grad`` a zero_grad() (the wrapper's or the
        model's) cleared, and this backward did not restore, gets it back (the window's
        view), so that what reads ``p.grad`` between backward and step
        (GradScaler.unscale_, clip_grad_norm_) acts on the whole window (DESIGN.md
        section 2), also for a param this backward gave no gradient. (Host time: one
        .grad read per fp32 param of the window per backward.)

        Compiled autograd never runs the callbacks queued on the engine: there the first
        hook of each backward restores them at once (traced hooks)."""
        self._flush_all()
        self._restore_cleared_grads()
        if self._stale:
            self._zero_stale()

    def _restore_cleared_grads(self) -> None:
        for b in self._all_buckets():
            if not b.is_half:
                stepped = b.stepped
                for i, (t, r) in enumerate(zip(b.touched, b.released)):
                    if t and not r and stepped[i].grad is None:
                        self._expose_grad(b, i)

    def _drop_pending(self) -> None:
        """Forget the waiting gradients (the window they belong to is being dropped)."""
        self._flush_queued = None
        for b in self._all_buckets():
            b.pending, b.pending_accs, b.pending_grads, b.pending_bytes = [], [], [], 0
            b.pending_ow = []
            b.is_pending = [False] * len(b)

    @_never_traced
    def add_param_group(self, param_group: dict) -> None:
        self._sync_groups()
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        # torch's own checks and normalization first (a set of params refused, named
        # params split into param_names, defaults filled in)
        self.inner.add_param_group(param_group)
        gi = len(self.inner.param_groups) - 1
        try:
            self._check_params([self.inner.param_groups[gi]], start=gi)
            with self._building([gi]):
                self._check_new_replicas([gi])
        except BaseException:
            self.inner.param_groups.pop()  # as if it had never been added
            raise

    # -- step ----------------------------------------------------------------------
    def _patch_step_function(self) -> None:
        # torch would wrap a subclass's own step in profile_hook_step: give it ours
        self._zero_grad_profile_name = (
            f"Optimizer.zero_grad#{self.__class__.__name__}.zero_grad")
        cls = self.__class__
        if not getattr(cls.step, "hooked", None):
            cls.step = _with_step_hooks(cls.step)
        _make_never_traced()

    @_with_step_hooks
    def step(self, closure=None, *, num_items=None):
        """Count a micro-batch; at the window's boundary apply the update.

        Returns the closure's loss (the closure runs with grad enabled), or None.
        """
        if num_items is not None:
            # (with a process group each rank's local count: 0 on a rank is allowed,
            # and the sum over the ranks is checked at the boundary, dp.merge_window)
            self._check_num_items(num_items, local=self._pg is not None)
        self._flush_all()
        self._sync_groups()
        scaler_attrs = "grad_scale" in self.__dict__ or "found_inf" in self.__dict__
        if scaler_attrs:
            why = None
            if self._k_fn is not None or self._k() != 1:
                why = ("torch.amp.GradScaler.step() needs accumulation_steps=1 (the scale could "
                       "change inside a window): accumulate with the tutorial loop and call "
                       "scaler.step(opt) at your own boundaries, or use loss_scale='dynamic'")
            elif self._scaler is not None:
                why = ("use either torch.amp.GradScaler or the wrapper's own "
                       f"loss_scale={self._scaler_spec()!r}, not both")
            elif self._pg is not None:
                why = ("torch.amp.GradScaler with process_group: its inf checks see each "
                       "rank's own gradients before the wrapper sums them at the boundary, so "
                       "the ranks' scales would drift apart; use the wrapper's "
                       "loss_scale='dynamic' (GradScaler's policy, checked over all ranks)")
            elif any(b.is_half and not b.has_master for b in self._all_buckets()):
                why = ("torch.amp.GradScaler sees gradients through the .grad of the tensors "
                       "the optimizer steps, and fp16/bf16 params with master_weights=False "
                       "have none (their fp32 accumulators cannot be a half param's .grad): "
                       "its unscale_ and inf checks would miss them. Use master_weights=True "
                       "(the default), or the wrapper's own loss_scale='dynamic' instead")
            if why is not None:
                # the scaler deletes them only after a step that returned: a later step()
                # without it must not see them
                self.__dict__.pop("grad_scale", None)
                self.__dict__.pop("found_inf", None)
                raise RuntimeError(why)
        if not self._ddp_checked:
            self._ddp_checked = True
            self._check_not_ddp([p for b in self._all_buckets() for p in b.params])
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.micro_step + 1 < self._k():
            self.micro_step += 1
            self.stepped = False
            return loss
        self._check_late_ddp()
        grad_scale = self.__dict__.get("grad_scale") if scaler_attrs else None
        found_inf = self.__dict__.get("found_inf") if scaler_attrs else None
        if scaler_attrs and grad_scale is None:
            # GradScaler.unscale_ ran: it unscaled the window through the stepped tensors'
            # .grad; one of the window without it (a zero_grad() after the last backward)
            # was left scaled
            hidden = self._first_hidden_window()
            if hidden is not None:
                self.__dict__.pop("grad_scale", None)
                self.__dict__.pop("found_inf", None)
                raise RuntimeError(
                    f"torch.amp.GradScaler.unscale_() could not see the window of {hidden}: "
                    "its .grad was None (a zero_grad() after the last backward?), so its "
                    "gradient is still scaled where the others' were unscaled in place. No "
                    "param, master or state was changed; drop the window with "
                    "opt.reset_accumulation(), and call zero_grad() only after "
                    "scaler.step(opt), as in torch's accumulation pattern")
        if scaler_attrs and not isinstance(found_inf, torch.Tensor):
            # GradScaler recorded no inf check (no stepped tensor had a .grad: sum([]) ==
            # 0); it still hands over the scale, and the boundary checks the window itself
            found_inf = torch.zeros((), dtype=torch.float32, device=self._device)
        self._boundary(num_items, grad_scale, found_inf)
        return loss

    def _first_hidden_window(self) -> str | None:
        """The name of the first param of the window stepped as an fp32 tensor whose
        .grad is not its accumulator view (GradScaler could not see it), or None."""
        for gi, buckets in enumerate(self._buckets):
            for b in buckets:
                for i, (t, r) in enumerate(zip(b.touched, b.released)):
                    s = b.stepped[i]
                    if t and not r and s.dtype == torch.float32 and s.grad is not b.main_grads[i]:
                        return self._param_name(self.inner.param_groups[gi], gi, b.indices[i],
                                                b.params[i])
        return None

    def _sync_groups(self) -> None:
        """Param groups added to the inner optimizer directly (``inner.add_param_group``,
        ``opt.param_groups.append``): checked and built as ``add_param_group`` would; a
        gradient their params already hold becomes this window's, as when wrapping. Run
        by every method that walks the groups (step, zero_grad, add_param_group and the
        state dict methods)."""
        start = len(self._buckets)
        groups = self.inner.param_groups
        if len(groups) == start:
            return
        if len(groups) < start:
            raise RuntimeError(
                f"the optimizer has {len(groups)} param groups but the wrapper built {start}: "
                "a group was removed from param_groups; groups cannot be removed")
        self._check_params(groups[start:], start=start)
        with self._building(range(start, len(groups))):
            self._check_new_replicas(range(start, len(groups)))
        self._ddp_checked = False

    def _check_new_replicas(self, gis) -> None:
        """With a process group, the params of groups added after wrapping must be the same
        on every rank, as the wrapper's first ones (a collective: every rank adds them)."""
        if self._pg is not None:
            dp.check_replicas([b for gi in gis for b in self._buckets[gi]], self._pg,
                              self._device)

    def _scaler_spec(self):
        return "dynamic" if self._scaler.dynamic else float(self._scaler.scale)

    @staticmethod
    def _check_num_items(num_items, local: bool = False) -> None:
        """ValueError unless ``num_items`` is a finite number > 0 (>= 0 where ``local``:
        one rank's count, which may be 0 where the others' are not)."""
        def ok(n) -> bool:  # (finite in float32, where the boundary divides by it)
            try:
                f = float(n)
            except OverflowError:  # (an int past float's range)
                return False
            return (f >= 0 if local else f > 0) and f <= torch.finfo(torch.float32).max

        want = "a finite number >= 0 (this rank's item count of the window)" if local \
            else "a finite number > 0 (the window's item count)"
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a single number, got shape "
                                 f"{tuple(num_items.shape)}")
            if num_items.dtype == torch.bool or num_items.is_complex():
                raise ValueError(f"num_items must be a real number, got a {num_items.dtype} "
                                 "tensor")
            if num_items.is_meta:
                raise ValueError("num_items must be a number, got a meta tensor (no value)")
            if num_items.device.type == "cpu":
                n = num_items.item()
                if not ok(n):
                    raise ValueError(f"num_items must be {want}, got {n}")
            return
        if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real) \
                or not ok(num_items):
            raise ValueError(f"num_items must be {want}, got {num_items!r}")

    def _ridden_stat(self, b: Bucket) -> torch.Tensor | None:
        """The bucket's norm statistic, using what rode on its last accumulations.

        When some param of the window has a statistic from its latest accumulation (its
        own, or its batch's) and nothing but our own accumulations wrote the accumulator
        since (no user code or reset: the version counter tells; GradScaler's unscale_,
        which bumps no version, is ruled out by the caller), the statistic is those
        combined with one ``grad_norm`` pass over the other touched params' accumulators
        only. Otherwise None: the caller reads the whole buffer.
        """
        if not b.is_half or b.stats_version < 0 or b.acc._version != b.stats_version:
            return None
        stats, rest, b_stats = [], [], b.stats
        if all(b.touched) and not any(map(operator.is_, b_stats, repeat(None))):
            # (the common case: every param has a statistic, fewer steps)
            stats = [s for s in b_stats if s is not IN_BATCH]
        else:
            for i, t in enumerate(b.touched):
                if t:
                    s = b_stats[i]
                    if s is None:
                        rest.append(b.flat_slice(b.acc, i))
                    elif s is not IN_BATCH:
                        stats.append(s)
        stats += b.batch_stats
        if not stats:
            return None
        if rest:
            n = ops.grad_norm(rest, self.norm_type, backend=self.backend)
            stats.append(n if self.norm_type == math.inf else n.square())
        if len(stats) == 1:  # (the sum or max of one value: that value, two ops less)
            return stats[0]
        stacked = torch.stack(stats)
        return stacked.amax() if self.norm_type == math.inf else stacked.sum()

    def _total_norm(self, ridden_ok: bool) -> torch.Tensor:
        """Norm over every accumulator (raw: loss scale and 1/D not yet removed).

        Buckets whose statistics rode on the last accumulation are not read again; the
        others get one grad_norm pass per device. ``ridden_ok`` is False under
        torch.amp.GradScaler: its unscale_ rewrites the accumulators without bumping their
        version counter.
        """
        per_device: dict[torch.device, list[torch.Tensor]] = {}
        parts = []  # sums of squares (2-norm) or maxima (inf-norm), on the main device
        for b in self._all_buckets():
            stat = self._ridden_stat(b) if ridden_ok and self._shard is None else None
            if stat is None:
                per_device.setdefault(b.device, []).append(b.acc_local)
            else:
                parts.append(stat.to(self._device, non_blocking=True))
        norms = [ops.grad_norm(accs, self.norm_type, backend=self.backend)
                 .to(self._device, non_blocking=True) for accs in per_device.values()]
        if len(norms) == 1 and not parts:  # one device, nothing ridden: the norm as is
            total = norms[0]
        elif not norms and not parts:
            total = torch.zeros((), dtype=torch.float32, device=self._device)
        elif len(parts) == 1 and not norms:  # (one bucket, ridden: two ops less)
            total = parts[0] if self.norm_type == math.inf else parts[0].sqrt()
        else:
            if self.norm_type != math.inf:
                norms = [n.square() for n in norms]
            stacked = torch.stack(parts + norms)
            total = stacked.amax() if self.norm_type == math.inf else stacked.sum().sqrt()
        if self._shard is not None:  # each rank holds a disjoint shard of the gradient
            total = dp.global_norm(total, self.norm_type, self._pg)
        return total

    def _check_buckets(self) -> None:
        """Before the masters are read: params still where the wrapper steps them, and
        masters re-read where someone else wrote the half params (Bucket.check_params)."""
        for gi, buckets in enumerate(self._buckets):
            group = self.inner.param_groups[gi]
            if not self._swapped:  # (not the generic path's own fp32 copies, in place)
                self._check_group_list(gi, group, buckets)
            for b in buckets:
                b.check_params(lambda i, b=b, gi=gi, group=group: self._param_name(
                    group, gi, b.indices[i], b.params[i]), self._cxx)

    @staticmethod
    def _check_group_list(gi: int, group: dict, buckets: list[Bucket]) -> None:
        """RuntimeError if ``group["params"]`` no longer holds, at each position, the
        tensor the wrapper steps there (a param popped, swapped or replaced after
        wrapping): the updates, the state and the state dict's numbering would silently
        belong to other params."""
        params = group["params"]
        n = sum(len(b.indices) for b in buckets)
        bad = None if len(params) == n else min(len(params), n)
        if bad is None:
            for b in buckets:
                if all(map(operator.is_, map(params.__getitem__, b.indices), b.stepped)):
                    continue  # (the common case, at C speed)
                for i, pi in enumerate(b.indices):
                    if params[pi] is not b.stepped[i]:
                        bad = pi if bad is None else min(bad, pi)
        if bad is not None:
            raise RuntimeError(
                f"param group {gi}'s 'params' list changed after wrapping (it has "
                f"{len(params)} tensors where the wrapper holds {n}; position {bad} differs): "
                "FusedAccumulator cannot follow edits of group['params']. Add params with "
                "add_param_group(); to drop or reorder params, build and wrap a new optimizer")

    @torch.no_grad()
    def _boundary(self, num_items, grad_scale, scaler_found_inf) -> None:
        """The update (or the skip) of a window that ended, and the start of the next.

        The inner optimizer's hooks see ``.grad`` as around its own step(): the prepared
        gradient (clipped, unscaled, divided). A pre-hook that raises leaves the window as
        it was (up to rounding) for a retry; once the update is applied, the window ends
        whatever happens: a post-hook that raises leaves it applied and counted, as torch
        leaves an optimizer whose post-hook raised."""
        self._check_buckets()
        if self._stale:  # (before the sums and the norm read the accumulators)
            self._zero_stale()
        post_hooks = None
        keep_grad = False
        dev = self._device
        denom = num_items if num_items is not None else self._window_k
        hps = None
        if self._pg is not None:
            buckets = list(self._all_buckets())
            if self._reduced is _MISSING:
                items = dp.merge_window(buckets, num_items, self._pg, dev, self._window_k,
                                        self.update_count + self.skipped_steps, self._resets)
                if self._kind is not None:  # (a refusal here: before the exchange)
                    hps = self._fused_prepare()
                dp.reduce_gradients(buckets, self._pg)
                # a step() that raises after this (an inner pre-hook) and is retried must
                # not exchange the window again: it is summed over the ranks already
                self._reduced = items
            else:
                items = self._reduced
            world = torch.distributed.get_world_size(self._pg)
            denom = items if items is not None else self._window_k * world
            # (no scaler_found_inf here: step() refuses a GradScaler with a process group)
        if isinstance(denom, torch.Tensor):
            denom = denom.to(device=dev, dtype=torch.float32)
        scale = grad_scale if grad_scale is not None else (
            self._scaler.scale if self._scaler is not None else None)
        if scale is None and not isinstance(denom, torch.Tensor):
            # (the same every window of a fixed length: made once, two ops less per window)
            if self._inv is None or self._inv[0] != denom or self._inv[1] != dev:
                self._inv = (denom, dev,
                             torch.full((), 1.0, dtype=torch.float32, device=dev) / denom)
            inv = self._inv[2]
        elif scale is None:
            inv = torch.full((), 1.0, dtype=torch.float32, device=dev) / denom
        else:
            inv = (scale.to(device=dev, dtype=torch.float32) * denom).reciprocal()
        norm = self._total_norm(ridden_ok=grad_scale is not None or scaler_found_inf is None) \
            * inv
        # NaN where the norm is inf or NaN (x - x is NaN exactly then), else 0.0: every
        # backend's step skips on a found_inf that is not 0, NaN included, and bool(NaN) is
        # True; one small op where ~isfinite(norm) and a cast are six (host time, on a GPU)
        found_f = norm - norm
        if scaler_found_inf is not None:
            found_f = torch.where(scaler_found_inf.to(dev) > 0, 1.0, found_f)
        mult = self._clip_mult(inv, norm)
        self.grad_norm = norm
        if self._kind is not None:
            # hyperparameters read and state buffers made before anything is written: a
            # refusal then leaves the window as it was
            if hps is None:
                hps = self._fused_prepare()
            pre = self.inner._optimizer_step_pre_hooks
            if _READ_FLAG_LATE and not pre and not self.inner._optimizer_step_post_hooks:
                # The boundary's one host read, after the update is queued: with the flag
                # set its kernels write nothing (those that leave the accumulators for the
                # next window are followed by a zeroing), so they are queued before the
                # host waits, and the wait is for the accumulations and the norm only (a
                # GPU: a copy to pinned memory and an event, _read_later) while the device
                # goes on to the update. It was read first: the host waited for the norm,
                # then launched the update.
                read = self._read_later(found_f)
                self._fused_update(hps, mult, found_f, zero_acc=True, lazy=True)
                skipped = read()
                # (an overflowed norm: the update queued with the flag set wrote nothing
                # where every bucket leaves its accumulators, so it can be queued again)
                if skipped and all(self._leaves_acc(b) or b.sharded
                                   for b in self._all_buckets()):
                    found_f, mult, skipped = self._overflow_retry(norm, inv, scaler_found_inf,
                                                                  found_f, mult)
                    if not skipped:
                        self._fused_update(hps, mult, found_f, zero_acc=True, lazy=True)
                if skipped:  # (a skipped window is discarded, DESIGN.md section 2)
                    self._zero_left_accs()
            else:
                skipped = bool(found_f.item())
                if skipped:
                    found_f, mult, skipped = self._overflow_retry(norm, inv, scaler_found_inf,
                                                                  found_f, mult)
                keep_grad = not skipped and bool(self.inner._optimizer_step_post_hooks)
                if not skipped:
                    # the prepared gradient for the hooks: one more pass, and with
                    # post-hooks the step leaves it for them and it is zeroed after them
                    # (only when there are such hooks)
                    for b in self._all_buckets():
                        b.acc_local.mul_(mult)
                    try:
                        if pre:
                            hps = self._inner_pre_hooks(pre)
                    except BaseException:
                        for b in self._all_buckets():
                            b.acc_local.div_(mult)
                        raise
                    mult = torch.ones_like(mult)
                # (with found set: only zeroes acc; a skipped window is discarded, DESIGN.md
                # section 2, so then every bucket zeroes it)
                self._fused_update(hps, mult, found_f, zero_acc=not keep_grad,
                                   lazy=not skipped)
            if not skipped:
                self._record_fused_steps()
                if self._shard is not None:
                    dp.gather_params(list(self._all_buckets()), self._pg)
                self._bump_updated_params()
                post_hooks = self._inner_stepped()
        else:
            skipped = bool(found_f.item())
            if skipped:
                found_f, mult, skipped = self._overflow_retry(norm, inv, scaler_found_inf,
                                                              found_f, mult)
            keep_grad = True  # (the generic path zeroes acc after the step)
            if not skipped:
                post_hooks = self._generic_update(mult)
                self._bump_updated_params()
        # The window is over and counted before the post-hooks run (what they read of
        # the wrapper, opt.stepped, update_count, micro_step, a state_dict(), is after
        # the update); only .grad still holds the applied gradient, for them.
        self._count_window(skipped)
        grads = self._end_window(defer_grads=post_hooks is not None, zeroed=not keep_grad,
                                 lazy=self._kind is not None and not skipped)
        try:
            if post_hooks is not None:
                post_hooks()
        finally:
            if keep_grad:
                for b in self._all_buckets():
                    b.acc_local.zero_()
                    _mark_clean(b)
            if grads:
                self._clear_grads(grads)
            # the next window's length, asked at its start: after this update, so that a
            # callable may read opt.grad_norm or opt.update_count of the window that
            # ended (a bad value raises here, with this window applied and counted, and
            # again at the next step(): _start_k)
            self._start_k()

    def _clip_mult(self, inv: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """What the accumulators are multiplied by: ``inv`` (1/D and the loss scale's
        inverse), and the clip coefficient of ``norm`` (clip_grad_norm_'s) if clipping."""
        if self.max_grad_norm is not None and self.max_grad_norm != math.inf:
            return inv * (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        return inv

    def _overflow_retry(self, norm: torch.Tensor, inv: torch.Tensor, scaler_found_inf,
                        found: torch.Tensor, mult: torch.Tensor):
        """For a window the flag says to skip, ``(found, mult, skipped)``: where every
        accumulated value is finite and only the fp32 2-norm overflowed, with the loss
        scale still in (its sum of squares passes 3.4e38 once the scaled norm passes about
        1.8e19), again from the norm taken in float64 (``opt.grad_norm`` too); else as
        given, skipped (a real inf/NaN).

        torch removes the scale before any norm (GradScaler's unscale_), so there such a
        window is applied. Skipping it instead stopped training for good under a
        torch.amp.GradScaler stepped without unscale_: its own inf check sees finite values,
        so its scale kept growing, and every window from there on was skipped. Host reads
        and the passes over the accumulators happen only for windows flagged to skip.
        With ZeRO-1 each rank holds a shard of the window (which its update leaves, see
        _fused_update): the sum of squares and the finite check are summed over the ranks
        (every rank comes here alike: the norm it read is the global one)."""
        skip = (found, mult, True)
        if self.norm_type == math.inf:
            return skip  # (the largest |value| of finite values is finite)
        if not math.isinf(float(norm)):
            return skip  # (NaN: a NaN in the window)
        if scaler_found_inf is not None and float(scaler_found_inf) > 0:
            return skip
        accs = [b.acc_local for b in self._all_buckets() if any(b.touched)]
        finite = all(bool(torch.isfinite(a).all()) for a in accs)
        if self._shard is None and not finite:
            return skip
        sq = torch.zeros((), dtype=torch.float64, device=self._device)
        for a in accs:
            sq = sq + torch.linalg.vector_norm(a, dtype=torch.float64).to(self._device).square()
        if self._shard is not None:
            sq, finite = dp.sum_squares_if_finite(sq, finite, self._pg)
            if not finite:
                return skip
        norm = (sq.sqrt() * inv.double()).float()
        self.grad_norm = norm
        found = norm - norm
        return found, self._clip_mult(inv, norm), bool(found.item())

    def _read_later(self, flag: torch.Tensor):
        """A function returning ``bool(flag)`` (a 0-dim fp32 device tensor) as it is now,
        also when called after more work is queued: on a CUDA device the value is copied
        to pinned host memory behind the work queued so far and an event recorded after
        the copy, so that the call waits for that work only."""
        if flag.device.type != "cuda":
            return lambda: bool(flag.item())
        if self._flag is None or self._flag[0] != flag.device:
            self._flag = (flag.device, torch.empty((), dtype=torch.float32, pin_memory=True),
                          torch.cuda.Event())
        _, host, event = self._flag
        host.copy_(flag, non_blocking=True)
        event.record(torch.cuda.current_stream(flag.device))

        def read() -> bool:
            event.synchronize()
            return bool(host.item())

        return read

    @torch.no_grad()
    def _zero_left_accs(self) -> None:
        """After a skipped update queued as if applied (_boundary): the accumulators it
        left for the next window's first gradients to overwrite (Bucket.dirty) zeroed, as
        a skipped update zeroes them."""
        for b in self._all_buckets():
            if self._leaves_acc(b) and any(b.touched):
                for s, _ in b.runs():
                    b.acc_local[s].zero_()

    def _count_window(self, skipped: bool) -> None:
        """A window's update (or skip) counted: the counters, the loss scale."""
        if self._scaler is not None:
            self._scaler.update(skipped)
        self.stepped = not skipped
        if skipped:
            self.skipped_steps += 1
            if not self._warned_skip:
                self._warned_skip = True
                warnings.warn("fusedaccum: non-finite gradients (inf/NaN) in the accumulation "
                              "window; the update was skipped and the window discarded. This "
                              "warning is shown once; opt.skipped_steps counts skips.",
                              RuntimeWarning, stacklevel=_caller_stacklevel())
        else:
            self.update_count += 1
        self.micro_step = 0

    def _bump_updated_params(self) -> None:
        """After an applied update: bump the version counter of every param it wrote, as
        torch.optim's in-place step does, so that autograd still refuses a backward through
        tensors saved before the update ("modified by an inplace operation") instead of
        using the new values. The kernels write the flat buffers, whose counters are not
        the params'. The new versions are those the masters are in step with (see
        Bucket.check_params). One call per bucket."""
        for b in self._all_buckets():
            touched, released, seen = b.touched, b.released, b.param_seen
            if all(touched) and not any(released):  # (the common case, at C speed)
                if self._cxx is None or not self._cxx.bump_versions(b.params, seen):
                    torch.autograd.graph.increment_version(b.params)
                    seen[:] = map(_VERSION, b.params)
                continue
            written = [i for i in range(len(b)) if touched[i] and not released[i]]
            if written:
                params = b.params
                torch.autograd.graph.increment_version([params[i] for i in written])
                for i in written:
                    seen[i] = params[i]._version

    # -- fused path ----------------------------------------------------------------
    def _inner_step_hooks(self, hooks, pre: bool = False) -> None:
        """Run the inner optimizer's own step pre- or post-hooks (not the global ones: the
        wrapper's step() ran those) for an update of the fused path, which replaces
        ``inner.step()``, as the generic path's call of it does; they get no arguments,
        and a pre-hook's (args, kwargs) has none to replace, but what else it returns is
        refused as torch's step wrapper refuses it."""
        for hook in list(hooks.values()):
            result = hook(self.inner, (), {})
            if pre and result is not None:
                _check_pre_hook_result(hook, result)

    def _inner_pre_hooks(self, hooks) -> list:
        """The inner optimizer's step pre-hooks before a fused update, which then uses what
        torch's step would read after them: the groups' hyperparameters and the state
        (``_fused_prepare`` again: a warmup hook that sets ``lr``, a hook that replaces a
        state entry), and each stepped tensor's ``.grad``. The hooks find every param of
        the window with its ``.grad`` (also one a zero_grad() cleared since its last
        backward, and, with a process group, one another rank's backward reached). A
        ``.grad`` they edit in place is the prepared gradient itself; one they replace is
        copied into it; one they set to None leaves its param out of the update, as torch's
        step leaves a param without a gradient (no weight decay, no state change, its count
        kept), and its window is dropped (not with ZeRO-1, below). Returns the
        hyperparameters. Where a hook or a check raises, each ``.grad`` is put back and
        nothing else has changed (the caller undoes the prepared gradient)."""
        # (with ZeRO-1 the update reads the rank's reduced shard, which no .grad views:
        # there the hooks see no gradient, and what they set is not read)
        held = [(b, i, b.stepped[i].grad) for b in self._all_buckets() if not b.sharded
                for i, t in enumerate(b.touched) if t]
        shown = []
        try:
            for b, i, before in held:
                t = b.stepped[i]
                if before is None and t.dtype == torch.float32:
                    t.grad = b.main_grads[i]
                shown.append(t.grad)
            self._inner_step_hooks(hooks, pre=True)
            changed = [(b, i, g, b.stepped[i].grad) for (b, i, _), g in zip(held, shown)
                       if b.stepped[i].grad is not g]
            # (torch itself refuses a .grad of another shape, dtype or device)
            for b, i, _, g in changed:
                if g is not None and g.layout != torch.strided:
                    gi = next(gi for gi, bs in enumerate(self._buckets) if b in bs)
                    name = self._param_name(self.inner.param_groups[gi], gi, b.indices[i],
                                            b.params[i])
                    raise RuntimeError(
                        f"an inner optimizer step pre-hook set the .grad of {name} to a "
                        f"{g.layout} tensor; the fused update takes a dense (strided) "
                        "gradient, or None to leave the param out")
            hps = self._fused_prepare()
        except BaseException:
            for b, i, before in held:
                b.stepped[i].grad = before
            raise
        with torch.no_grad():
            for b, i, was, g in changed:
                view = b.main_grads[i]
                if g is None:
                    view.zero_()
                    b.touched[i] = False
                else:
                    view.copy_(g)
                    b.stepped[i].grad = was
        return hps

    def _inner_step(self) -> None:
        """``inner.step()`` for the generic path, without the global optimizer hooks
        (``register_optimizer_step_pre_hook``/``post_hook``): the wrapper's own step()
        ran them, and torch runs them once per update. The inner optimizer's own hooks
        run as torch's step wrapper runs them; a scheduler made on it learns it stepped.
        A ``step`` the user replaced on the instance is called as it is (with its hooks).
        Returns the runner of the post-hooks (see _boundary), or None."""
        inner = self.inner
        step = type(inner).step
        raw = getattr(step, "__wrapped__", None)
        own = vars(inner).get("step")
        # only torch's own step wrapper (Optimizer.profile_hook_step) is looked through,
        # and on the instance only an LR scheduler's wrapper of that very step
        if raw is None or getattr(step, "__code__", None) is not _TORCH_STEP_WRAPPER_CODE \
                or own is not None and not (getattr(own, "_wrapped_by_lr_sched", False)
                                            and getattr(own, "__wrapped__", None) is step):
            inner.step()
            return None
        if own is not None:  # what the scheduler's wrapper would record
            inner._opt_called = True
        args, kwargs = (inner,), {}
        for hook in list(inner._optimizer_step_pre_hooks.values()):
            result = hook(inner, args, kwargs)
            if result is not None:
                args, kwargs = _check_pre_hook_result(hook, result)
        raw(*args, **kwargs)
        inner._optimizer_step_code()
        hooks = list(inner._optimizer_step_post_hooks.values())
        if not hooks:
            return None

        def run():
            for hook in hooks:
                hook(inner, args, kwargs)

        return self._post_hook_runner(run)

    def _inner_stepped(self):
        """After an update of the fused path: what ``inner.step()`` would have done
        besides stepping. An LR scheduler made on the inner optimizer before wrapping
        (torch marks ``inner.step`` then) learns that it stepped, as its wrapper of
        ``inner.step`` would have told it, so that it does not warn that
        ``lr_scheduler.step()`` came before ``optimizer.step()``. Returns the runner of
        its post-hooks (see _boundary), or None."""
        if getattr(self.inner.step, "_wrapped_by_lr_sched", False):
            self.inner._opt_called = True
        hooks = self.inner._optimizer_step_post_hooks
        if not hooks:
            return None
        return self._post_hook_runner(lambda: self._inner_step_hooks(hooks))

    def _post_hook_runner(self, run):
        """``run`` (the inner optimizer's post-hooks) for _boundary to call once the update
        is applied; a hook that writes the stepped tensors (the fp32 masters of half
        params) reaches the model."""
        return lambda: self._masters_to_model_after(run)

    def _sync_state(self) -> None:
        """Fused path, before an update reads the optimizer state from the flat buffers:
        what was written into ``opt.state`` since the last update, taken in as torch's
        step would read it there. An entry cleared, emptied or deleted (``opt.state[p] =
        {}``, ``.clear()``, ``del``, ``opt.state = defaultdict(dict)``) starts that param
        afresh; values put in its place (``opt.state[p]["exp_avg"] = x``, a state dict
        loaded into the inner optimizer directly, ``momentum_buffer = None``) are copied
        into the buffers, and the entry views them again (``x`` itself is not updated
        after); a step tensor changed in place gives the step count. In-place writes to
        the entries' tensors need nothing: they view the buffers.

        Host time: one look at each entry of the state dict per boundary (its values'
        identity, against the snapshot of the last boundary: ``_snaps``; csrc/hooks.cpp
        ``entries_edited`` where the wrapper runs the C++ hooks), and a walk over every
        param only when the state dict is another object or has another size."""
        state = self.inner.state
        for b in self._all_buckets():
            b.read_steps()
        if self._snaps is not None and self._recorded_in is state \
                and self._recorded_len == len(state):
            edited = self._edited_entries(state)
            if not edited:
                return
        else:
            edited = [(b, i) for b in self._all_buckets() if not b.sharded
                      for i in range(len(b))
                      if not self._entry_is_ours(b, i, state.get(b.stepped[i]))]
        entries = [state.get(b.stepped[i]) for b, i in edited]
        for (b, i), entry in zip(edited, entries):  # (all checked before any is taken in)
            self._check_entry(b, i, entry)
        for (b, i), entry in zip(edited, entries):
            self._adopt_entry(b, i, entry)
        for b in {id(b): b for b, _ in edited}.values():
            b.write_steps()
        self._set_snaps(self._snapshot())
        self._recorded_in, self._recorded_len = state, len(state)

    def _check_entry(self, b: Bucket, i: int, entry) -> None:
        """ValueError naming the param and the key where a state tensor in ``opt.state``
        (put there since the last boundary, or there when wrapping) does not have the
        param's shape, or is not a real tensor with data, as torch's step would fail on it:
        before anything is taken in (_sync_state, __init__)."""
        for key in (*_ADAM_KEYS, "momentum_buffer", "step"):
            value = (entry or {}).get(key)
            if value is None or isinstance(value, numbers.Real) and key == "step":
                continue
            want = () if key == "step" else tuple(b.shapes[i])
            if not isinstance(value, torch.Tensor) or value.is_complex() or value.is_meta \
                    or (tuple(value.shape) != want and not (key == "step"
                                                            and value.numel() == 1)):
                gi = next(g for g, bs in enumerate(self._buckets) if b in bs)
                name = self._param_name(self.inner.param_groups[gi], gi, b.indices[i],
                                        b.params[i])
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
                raise ValueError(
                    f"opt.state of {name} has {key!r} = "
                    f"{type(value).__name__ if shape is None else f'a tensor of shape {shape}'}"
                    f", where the optimizer needs a real tensor of shape {want}: no state "
                    "was changed")

    def _entry_is_ours(self, b: Bucket, i: int, entry) -> bool:
        """Whether param ``i`` of ``b``'s state entry is what the fused path keeps: its
        state tensors and step the views of the flat buffers (or no entry where the param
        has no history)."""
        if not entry:
            return not (b.has_buf[i] or self._kind == "adam" and b.steps[i])
        for key in (*_ADAM_KEYS, "momentum_buffer"):
            value = entry.get(key)
            if value is not None or key in entry:
                views = b._state_views.get(key)
                if views is None or value is not views[i]:
                    return False
        if self._kind == "adam":
            return b._step_views is not None and entry.get("step") is b._step_views[i] \
                and "exp_avg" in entry and "exp_avg_sq" in entry
        return "momentum_buffer" in entry or not b.has_buf[i]

    def _snapshot(self) -> dict:
        """id(stepped tensor) -> (bucket, index, its state entry or None, the entry's
        values): what _edited_entries compares with."""
        state = self.inner.state
        snaps = {}
        for b in self._all_buckets():
            if b.sharded:
                continue
            for i, t in enumerate(b.stepped):
                entry = state.get(t)
                snaps[id(t)] = (b, i, entry, () if entry is None else tuple(entry.values()))
        return snaps

    def _set_snaps(self, snaps: dict | None) -> None:
        """``_snaps`` replaced; its copy in the state dict's order (``_snap_order``, made
        by _edited_entries) forgotten."""
        self._snaps = snaps
        self._snap_order = None

    def _edited_entries(self, state) -> list:
        """The (bucket, index) of the params whose state entry is another object, or holds
        other values, than at the last snapshot (``_snaps``).

        With the C++ hooks: first one pass over the state dict against ``_snap_order``,
        the snapshot as (key, entry, values) in the dict's order, which tells the usual
        "nothing changed" without an allocation; made after a boundary that found no edit,
        and dropped whenever ``_snaps`` changes."""
        snaps = self._snaps
        if self._cxx is not None:
            order = self._snap_order
            if order is not None and self._cxx.entries_unchanged(state, order):
                return []
            ids = self._cxx.entries_edited(state, snaps)
            if ids is not None:
                if not ids:
                    self._snap_order = tuple(
                        (k, None, None) if (s := snaps.get(id(k))) is None else (k, s[2], s[3])
                        for k in state)
                return [snaps[k][:2] for k in ids]
        edited = []
        for t, entry in state.items():  # (by the entries: no tensor is hashed)
            snap = snaps.get(id(t))
            if snap is not None and (snap[2] is not entry or len(entry) != len(snap[3])
                                     or not all(map(operator.is_, entry.values(), snap[3]))):
                edited.append(snap[:2])
        return edited

    def _fused_prepare(self) -> list:
        """Before a fused update writes anything: the hyperparameters of each group (None
        for a group no param of which got a gradient) and the state buffers."""
        self._sync_state()
        # Every group's hyperparameters are read (and refused, naming the group, if they
        # cannot be), and every state buffer this step needs exists, before the first
        # kernel runs: a bad value or out of memory making a buffer (the first boundary
        # allocates them) then changes nothing, and a retried step() finds the window as
        # it was; no bucket is updated while another fails.
        hps = [self._hparams(gi, group, buckets) if any(any(b.touched) for b in buckets)
               else None for gi, (group, buckets) in enumerate(zip(self.inner.param_groups,
                                                                   self._buckets))]
        for gi, buckets in enumerate(self._buckets):
            keys = self._state_keys(self.inner.param_groups[gi])
            for b in buckets:
                if any(b.touched):
                    for key in keys:
                        b.state_buffer(key)
        return hps

    def _fused_update(self, hps: list, mult: torch.Tensor, found: torch.Tensor,
                      zero_acc: bool, lazy: bool) -> None:
        for buckets, hp in zip(self._buckets, hps):
            for b in buckets:
                if not any(b.touched):
                    continue
                m = mult if mult.device == b.device else mult.to(b.device)
                f = found if found.device == b.device else found.to(b.device)
                # the buckets that leave their accumulators dirty (Bucket.dirty) do not
                # zero them: the next window's first gradients overwrite them; nor do
                # ZeRO-1's (acc_local is the reduce-scatter's output, written anew at each
                # boundary; an overflow retry reads it again, _overflow_retry)
                z = zero_acc and not b.sharded and not (lazy and self._leaves_acc(b))
                if self._kind == "adam":
                    self._adam_bucket(b, hp, m, f, z)
                else:
                    self._sgd_bucket(b, hp, m, f, z)

    def _hparams(self, gi: int, group: dict, buckets: list[Bucket]) -> dict:
        """Group ``gi``'s hyperparameters as the fused ops take them; ValueError naming
        the group and the key when one cannot be read as a number, or when the group asks
        for what torch's step refuses on its params' device (``capturable=True``)."""
        if group.get("capturable", False):
            _check_capturable(gi, type(self.inner).__name__, buckets)

        def num(key, value):
            return _hyper(gi, key, value)

        try:
            if self._kind == "adam":
                betas = group["betas"]
                if isinstance(betas, torch.Tensor) or not hasattr(betas, "__len__") \
                        or len(betas) != 2:
                    raise ValueError(f"param group {gi}: betas={betas!r} is not a pair")
                decoupled = group.get("decoupled_weight_decay",
                                      type(self.inner) is torch.optim.AdamW)
                return dict(lr=num("lr", group["lr"]), beta1=num("betas[0]", betas[0]),
                            beta2=num("betas[1]", betas[1]), eps=num("eps", group["eps"]),
                            weight_decay=num("weight_decay", group["weight_decay"]),
                            decoupled_weight_decay=bool(decoupled),
                            amsgrad=bool(group.get("amsgrad", False)),
                            maximize=bool(group.get("maximize", False)))
            return dict(lr=num("lr", group["lr"]), momentum=num("momentum", group["momentum"]),
                        dampening=num("dampening", group["dampening"]),
                        weight_decay=num("weight_decay", group["weight_decay"]),
                        nesterov=bool(group["nesterov"]),
                        maximize=bool(group.get("maximize", False)))
        except KeyError as exc:
            raise ValueError(f"param group {gi} has no {exc} entry") from None

    def _adam_bucket(self, b: Bucket, hp: dict, mult, found, zero_acc: bool) -> None:
        exp_avg = b.state_buffer("exp_avg")
        exp_avg_sq = b.state_buffer("exp_avg_sq")
        vmax = b.state_buffer("max_exp_avg_sq") if hp["amsgrad"] else None
        cut = b.cut
        for s, step in b.runs(b.steps):
            b.ops.adamw_step_(cut(b.stepped_flat, s), cut(b.acc_local, s), cut(exp_avg, s),
                              cut(exp_avg_sq, s), cut(vmax, s), cut(b.model_out, s),
                              grad_mult=mult, found_inf=found, step=step + 1,
                              zero_acc=zero_acc, trusted=True, **hp)

    def _sgd_bucket(self, b: Bucket, hp: dict, mult, found, zero_acc: bool) -> None:
        buf = b.state_buffer("momentum_buffer") if hp["momentum"] != 0 else None
        cut = b.cut
        for s, had in b.runs(b.has_buf):
            b.ops.sgd_step_(cut(b.stepped_flat, s), cut(b.acc_local, s), cut(buf, s),
                            cut(b.model_out, s), grad_mult=mult, found_inf=found,
                            first_step=not had, zero_acc=zero_acc, trusted=True, **hp)

    def _record_fused_steps(self) -> None:
        """After an applied update: step counts, and the state entries (views) as torch keeps.

        Once per window over every param, so host time counts: a param whose entries an
        earlier call made or checked (``b.recorded``) needs only its count, and a bucket's
        counts are one copy into the flat buffer its ``step`` entries view. ``recorded`` is
        dropped when entries may have been replaced: the state dict is another object
        (``inner.load_state_dict``, ``opt.state = ...``) or has another size (entries
        deleted), the group's state keys changed (amsgrad, momentum), or _adopt_state ran.
        A single entry a user overwrites by hand (``opt.state[p]["exp_avg"] = x``) is not
        seen: it was never read by the fused step either.
        """
        state = self.inner.state
        stale = self._recorded_in is not state or self._recorded_len != len(state)
        adam = self._kind == "adam"
        for gi, buckets in enumerate(self._buckets):
            keys = self._state_keys(self.inner.param_groups[gi])
            has_buf = "momentum_buffer" in keys
            for b in buckets:
                touched = b.touched
                any_touched = any(touched)
                # the step tensors hold b.steps (nothing wrote them since): one add_ below
                # brings them up to date when every param stepped
                in_step = b.step_flat is not None and b.step_flat._version == b.step_version
                if any_touched:
                    b.steps[:] = map(operator.add, b.steps, touched)  # +1 where touched
                    if has_buf:  # (with momentum 0 torch keeps the buffer for later)
                        b.has_buf[:] = [t or h for t, h in zip(touched, b.has_buf)]
                if b.sharded:  # (the state is materialized by state_dict())
                    continue
                if stale or b.recorded_keys != keys:
                    b.recorded = [False] * len(b)
                    b.recorded_keys = keys
                    for key in keys:  # every bucket's state buffers exist from here on
                        b.state_views(key)
                if not any_touched:
                    continue
                # any touched param not recorded yet?
                if not all(map(operator.or_, b.recorded, map(operator.not_, touched))):
                    self._record_entries(b, keys, state)
                if adam:
                    b.write_steps(plus_one=in_step and all(touched))
        self._recorded_in, self._recorded_len = state, len(state)

    def _record_entries(self, b: Bucket, keys: tuple[str, ...], state) -> None:
        """_record_fused_steps for the touched params of ``b`` not recorded yet."""
        views = [(key, b.state_views(key)) for key in keys]
        step_views = b.step_views() if self._kind == "adam" else None
        new_step_view = torch.get_default_dtype() == torch.float32
        steps, touched, recorded = b.steps, b.touched, b.recorded
        snaps = self._snaps
        self._snap_order = None  # (snaps change below)
        for i, t in enumerate(b.stepped):
            if not touched[i] or recorded[i]:
                continue
            if not views and step_views is None:  # SGD without momentum: torch makes no
                recorded[i] = True  # entry (state[t] would add an empty one)
                continue
            st = state[t]
            ok = True
            if step_views is not None:
                step = st.get("step")
                if step is not step_views[i]:
                    if isinstance(step, torch.Tensor):  # not ours (inner.load_state_dict)
                        step.fill_(steps[i])
                        ok = False
                    elif new_step_view:  # b.write_steps() sets its value
                        st["step"] = step_views[i]
                    else:  # torch's default dtype, as before (float64 under that default)
                        st["step"] = torch.tensor(float(steps[i]))
                        ok = False
            for key, vs in views:
                if st.get(key) is not vs[i]:
                    st[key] = vs[i]
            recorded[i] = ok
            if snaps is not None:  # (what _sync_state compares with at the next boundary)
                snaps[id(t)] = (b, i, st, tuple(st.values()))

    # -- generic path --------------------------------------------------------------
    def _generic_update(self, mult: torch.Tensor):
        """The inner optimizer steps the fp32 tensors, ``.grad`` viewing the accumulators.

        fp16/bf16 params without masters (``master_weights=False``) are stepped as fp32
        copies made for this step only, with their state in fp32 (upcast if the optimizer
        made it in half, as Adagrad does in ``__init__``), and then rounded back to nearest:
        fp32 math, as on the fused path, at a transient 4 bytes per such param.

        If the inner step raises (out of memory making its state, a pre-hook), the
        window's accumulators are divided back (exact up to rounding), so that a retried
        step() does not scale them twice; what the inner optimizer itself had already
        written before it raised stays written, as in torch, and reaches the model (the
        copies are rounded back, the masters into the half params). Returns the runner of
        the inner optimizer's post-hooks (see _inner_step).
        """
        # every torch optimizer reads lr: one that cannot be read is refused naming its
        # group before the prepared gradient is made (the others are the optimizer's own)
        for gi, (group, buckets) in enumerate(zip(self.inner.param_groups, self._buckets)):
            lr = group.get("lr")
            if any(any(b.touched) for b in buckets) and not (
                    isinstance(lr, torch.Tensor) and lr.numel() == 1):
                _hyper(gi, "lr", lr)
        swapped = []  # (the group's params list, position, half param, its fp32 copy)
        state = self.inner.state
        scaled = []
        for b in self._all_buckets():
            m = mult if mult.device == b.device else mult.to(b.device)
            b.acc.mul_(m)
            scaled.append((b, m))
        try:
            for gi, buckets in enumerate(self._buckets):
                params = self.inner.param_groups[gi]["params"]
                for b in buckets:
                    copies = b.is_half and not b.has_master
                    for i, t in enumerate(b.stepped):
                        if not b.touched[i]:
                            t.grad = None
                        elif copies:  # (made inside the try: an OOM here is undone too)
                            f = t.detach().to(torch.float32)
                            f.grad = b.main_grads[i]
                            pi = b.indices[i]
                            params[pi] = f
                            swapped.append((params, pi, t, f))
                            self._swapped = True
                            st = state.get(t)
                            if st is not None:  # (t's entry stays until f has its own)
                                state[f] = _fp32_state(st)
                                del state[t]
                        else:
                            t.grad = b.main_grads[i]
            post_hooks = self._inner_step()
        except BaseException:
            for b, m in scaled:
                b.acc.div_(m)
            raise
        finally:
            self._swapped = False
            for params, pi, t, f in swapped:
                t.copy_(f)  # round to nearest
                params[pi] = t
                st = state.pop(f, None)
                if st is not None:
                    state[t] = st
                f.grad = None
            for b in self._all_buckets():
                if b.has_master:
                    b.model.copy_(b.master)
        return post_hooks

    # -- state dict ----------------------------------------------------------------
    def _index_map(self) -> dict[int, tuple[Bucket, int]]:
        """state_dict index (torch's numbering over all groups) -> (bucket, position)."""
        out, base = {}, 0
        for gi, group in enumerate(self.inner.param_groups):
            for b in self._buckets[gi]:
                for i, pi in enumerate(b.indices):
                    out[base + pi] = (b, i)
            base += len(group["params"])
        return out

    @_never_traced
    def state_dict(self) -> dict:
        """The inner optimizer's format (fp32 state) plus a ``"fusedaccum"`` entry.

        With a process_group this is a collective (call it on every rank): the sharded
        state is gathered, and a partial window is summed over the ranks. The state-dict
        hooks registered on the wrapper run as torch.optim runs them.
        """
        for pre_hook in list(self._optimizer_state_dict_pre_hooks.values()):
            pre_hook(self)
        sd = self._state_dict()
        for post_hook in list(self._optimizer_state_dict_post_hooks.values()):
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _state_dict(self) -> dict:
        self._sync_groups()
        self._flush_all()
        if self._stale:
            self._zero_stale()
        self._check_buckets()
        self._drop_foreign_state()
        index = self._index_map()
        if self._shard is None:
            sd = self.inner.state_dict()
            masters = {idx: b.stepped[i].detach().clone()
                       for idx, (b, i) in index.items() if b.has_master}
        else:
            sd, masters = self._gathered_state(index)
        accumulators = {}
        for idx, (b, i) in index.items():
            if b.touched[i]:
                accumulators[idx] = b.main_grads[i].detach().clone()
        # a partial window of a data-parallel run is summed over the ranks (a collective);
        # unsharded and at a boundary (micro_step 0 on every rank alike) there is none, and
        # state_dict() is local, as a plain optimizer's (the usual `if rank == 0:
        # torch.save(opt.state_dict())`); gradients a backward left since the boundary are
        # then this rank's own
        if self._pg is not None and (self._shard is not None or self.micro_step > 0):
            buckets = list(self._all_buckets())
            dp.merge_window(buckets, None, self._pg, self._device,
                            self._window_k if self._window_k is not None else 1,
                            self.update_count + self.skipped_steps, self._resets)
            accumulators = {idx: dp.sum_across(b.main_grads[i].detach(), self._pg)
                            for idx, (b, i) in index.items() if b.touched[i]}
        sd["fusedaccum"] = {
            "version": _STATE_VERSION,
            "micro_step": self.micro_step,
            # (unknown only at micro-batch 0, where a load asks the callable anew: _start_k)
            "window_k": self._window_k if self._window_k is not None else 1,
            # a partial window is the sum of this many ranks' micro-batches
            "world_size": 1 if self._pg is None else torch.distributed.get_world_size(self._pg),
            "update_count": self.update_count,
            "skipped_steps": self.skipped_steps,
            "loss_scale": None if self._scaler is None else self._scaler.state_dict(),
            "masters": masters,
            "accumulators": accumulators,
            # window params whose stepped tensor's .grad view was cleared (zero_grad()
            # after the micro-batch: fp32 params): a resume leaves it cleared as well, so
            # that model.zero_grad(set_to_none=False) then drops nothing, as without stopping
            "cleared_grads": sorted(idx for idx in accumulators
                                    if _grad_cleared(*index[idx])),
        }
        return sd

    def _drop_foreign_state(self) -> None:
        """Empty entries of ``opt.state`` for tensors the groups do not hold (a lookup such
        as ``opt.state[model.weight]`` of a half param, whose state is its fp32 master's,
        makes one in torch's defaultdict) would fail torch's state_dict: dropped. A
        non-empty one is an error that says where the state is."""
        state = self.inner.state
        known = {id(t) for g in self.inner.param_groups for t in g["params"]}
        for key in [k for k in state if id(k) not in known]:
            if state[key]:
                raise RuntimeError(
                    "opt.state holds state for a tensor that is in no param group (for "
                    "fp16/bf16 params with master weights the state is keyed by their fp32 "
                    "masters, opt.param_groups[g]['params']): remove it before state_dict()")
            del state[key]

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        if self._kind == "adam":
            return _ADAM_KEYS if group.get("amsgrad", False) else _ADAM_KEYS[:2]
        if self._kind == "sgd" and _as_float(group["momentum"]) != 0:
            return ("momentum_buffer",)
        return ()

    def _gathered_state(self, index) -> tuple[dict, dict]:
        """ZeRO-1: the full per-param state and masters, assembled from every rank."""
        groups = self.inner.state_dict()["param_groups"]
        full: dict[tuple[int, str], torch.Tensor] = {}
        for gi, buckets in enumerate(self._buckets):
            keys = self._state_keys(self.inner.param_groups[gi])
            for bi, b in enumerate(buckets):
                for key in keys:
                    full[(gi, bi, key)] = dp.gather_flat(b.state_buffer(key), b.total, self._pg)
                if b.has_master:
                    full[(gi, bi, "master")] = dp.gather_flat(b.master, b.total, self._pg)
        state, masters = {}, {}
        for gi, buckets in enumerate(self._buckets):
            keys = self._state_keys(self.inner.param_groups[gi])
            for bi, b in enumerate(buckets):
                base = next(idx for idx, (bb, i) in index.items() if bb is b and i == 0) \
                    - b.indices[0]
                for i, pi in enumerate(b.indices):
                    idx = base + pi
                    if b.has_master:
                        masters[idx] = b.view(full[(gi, bi, "master")], i).clone()
                    if b.steps[i] == 0:
                        continue
                    st = {}
                    if self._kind == "adam":
                        st["step"] = torch.tensor(float(b.steps[i]))
                    for key in keys:
                        if key != "momentum_buffer" or b.has_buf[i]:
                            st[key] = b.view(full[(gi, bi, key)], i).clone()
                    if st:
                        state[idx] = st
        return {"state": state, "param_groups": groups}, masters

    @_never_traced
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this wrapper, or a plain inner-optimizer state dict.

        Everything is checked first (groups, shapes, the ``"fusedaccum"`` entry): a state
        dict that does not fit raises, naming what does not fit, and changes nothing.
        The load hooks registered on the wrapper run as torch.optim runs them."""
        state_dict = dict(state_dict)  # (shallow, as torch: hooks may edit it)
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        for post_hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            post_hook(self)

    def _check_loadable(self, sd: dict, extra) -> tuple[dict, dict | None]:
        """ValueError (changing nothing) unless ``sd`` fits this wrapper's groups: torch's
        checks of the group sizes, and the shapes of the state the fused path copies into
        its buffers and of the saved masters and partial window (torch checks no shapes;
        a mismatch would fail half way through the load, or broadcast silently), and the
        values of the ``"fusedaccum"`` entry that the load reads.

        Returns ``sd`` and ``extra`` keyed by position (see ``_positional``)."""
        groups, mine = sd.get("param_groups"), self.inner.param_groups
        if not isinstance(groups, list | tuple) or not isinstance(sd.get("state", {}), dict) \
                or not all(isinstance(g, dict) and isinstance(g.get("params"), list | tuple)
                           for g in groups):
            raise ValueError("not an optimizer state dict: it needs a 'param_groups' list "
                             "(of dicts with a 'params' list) and a 'state' dict")
        if len(groups) != len(mine):
            raise ValueError(f"the state dict has {len(groups)} param groups, the optimizer "
                             f"{len(mine)}")
        for gi, (g, m) in enumerate(zip(groups, mine)):
            if len(g["params"]) != len(m["params"]):
                raise ValueError(f"param group {gi} of the state dict has {len(g['params'])} "
                                 f"params, the optimizer's {len(m['params'])}")
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"the state dict's 'fusedaccum' entry is {type(extra).__name__}, "
                             "not a dict")
        if extra is not None:
            ids = {pid for g in groups for pid in g["params"]
                   if isinstance(pid, int | str) and not isinstance(pid, bool)}
            cleared = extra.get("cleared_grads", [])
            if not isinstance(cleared, list | tuple) or not all(
                    isinstance(x, int | str) and not isinstance(x, bool)
                    and (x in ids or isinstance(x, str) and x.isdigit() and int(x) in ids)
                    for x in cleared):
                raise ValueError(f"the state dict's 'fusedaccum' entry has cleared_grads="
                                 f"{cleared!r}: not a list of the saved params' ids")
        sd, extra = _positional(sd, extra)
        index = self._index_map()
        where = {}
        for gi, buckets in enumerate(self._buckets):
            for b in buckets:
                for i, pi in enumerate(b.indices):
                    where[id(b), i] = (gi, pi)

        def check(what: str, idx, value, need: bool = False) -> None:
            """A value the load copies into the flat buffers: None (absent, unless
            ``need``), or a real floating-point tensor of its param's shape (else the copy
            would fail half way through the load, or broadcast silently)."""
            b, i = index.get(int(idx), (None, 0))
            if b is None:
                raise ValueError(f"{what}: there is no param {idx} (the optimizer has "
                                 f"{len(index)})")
            if value is None and not need:
                return
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() \
                    or value.is_meta:
                kind = type(value).__name__ if not isinstance(value, torch.Tensor) else \
                    f"a {'meta' if value.is_meta else value.dtype} tensor"
                raise ValueError(f"{what} is {kind}, not a floating-point tensor with data")
            if tuple(value.shape) != tuple(b.shapes[i]):
                gi, pi = where[id(b), i]
                name = self._param_name(mine[gi], gi, pi, b.params[i])
                raise ValueError(f"{what} has shape {tuple(value.shape)}, but belongs to {name}")

        if self._kind is not None:
            self._check_loaded_groups(sd["param_groups"])
        for idx, st in sd["state"].items():
            if idx in index and not isinstance(st, dict):
                raise ValueError(f"state_dict['state'][{idx!r}] is {type(st).__name__}, not "
                                 "a dict")
            step = st.get("step") if isinstance(st, dict) else None
            if step is not None and not (
                    (isinstance(step, numbers.Real) and not isinstance(step, bool)) or (
                        isinstance(step, torch.Tensor) and step.numel() == 1
                        and not step.is_meta and not step.is_complex())):
                raise ValueError(f"state_dict['state'][{idx!r}]['step'] is {step!r}, not a "
                                 "number")
            if step is not None and not _as_float(step) >= 0:  # (a load reads it anyway)
                raise ValueError(f"state_dict['state'][{idx!r}]['step'] is {step!r}, not a "
                                 "count of steps (>= 0)")
            if self._kind is not None and idx in index and isinstance(st, dict):
                for key in (*_ADAM_KEYS, "momentum_buffer"):
                    check(f"state_dict['state'][{idx!r}][{key!r}]", idx, st.get(key))
        if extra is None:
            return sd, extra
        missing = [k for k in ("micro_step", "update_count", "skipped_steps") if k not in extra]
        if missing:
            raise ValueError(f"the state dict's 'fusedaccum' entry lacks {missing}")
        for key in ("micro_step", "update_count", "skipped_steps", "window_k"):
            v = extra.get(key, 1)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"the state dict's 'fusedaccum' entry has {key}={v!r}: not "
                                 "a count")
        if extra["micro_step"] > 0 and not extra.get("window_k", 0) > extra["micro_step"]:
            raise ValueError(
                f"the state dict's 'fusedaccum' entry was taken at micro-batch "
                f"{extra['micro_step']} of a window, but its window_k is "
                f"{extra.get('window_k')!r}: the window's length is needed to resume it")
        scale = extra.get("loss_scale")
        if scale is not None and self._scaler is not None and not (
                isinstance(scale, dict) and "scale" in scale and "growth_tracker" in scale):
            raise ValueError("the state dict's 'fusedaccum' entry has a loss_scale without "
                             "'scale' and 'growth_tracker'")
        if scale is not None and self._scaler is not None:
            LossScaler.check_state_dict(scale)
        if extra.get("accumulators") and (scale is None) != (self._scaler is None):
            # (a partial window holds its gradients as backward gave them: scaled by the
            # saving wrapper's loss scale, or not at all; the boundary removes this one's)
            saved = ("scaled by the loss scale of the wrapper that saved it" if scale is not None
                     else "not scaled (the wrapper that saved it had no loss_scale)")
            ours = (f"loss_scale={self._scaler_spec()!r}" if self._scaler is not None
                    else "no loss_scale")
            raise ValueError(
                f"the state dict holds a partial window ({len(extra['accumulators'])} params' "
                f"gradients), {saved}, and this wrapper has {ours}: its update would be off "
                "by the scale. Resume with loss_scale set as when it was saved, or save at a "
                "boundary (after the step() that applies an update)")
        saved_world = extra.get("world_size")
        world = 1 if self._pg is None else torch.distributed.get_world_size(self._pg)
        if int(extra["micro_step"]) > 0 and saved_world is not None and saved_world != world:
            raise ValueError(
                f"the state dict was taken in the middle of a window (micro-batch "
                f"{extra['micro_step']}) on {saved_world} process(es), and this wrapper runs on "
                f"{world}: the rest of that window cannot be the same. Resume it on "
                f"{saved_world} process(es), or save at a boundary (after the step() that "
                "applies an update) to change the number of processes")
        for part in ("masters", "accumulators"):
            entries = extra.get(part, {})
            if not isinstance(entries, dict):
                raise ValueError(f"the state dict's 'fusedaccum' entry has {part} of type "
                                 f"{type(entries).__name__}, not a dict")
            for idx, value in entries.items():
                check(f"state_dict['fusedaccum'][{part!r}][{idx!r}]", idx, value, need=True)
        return sd, extra

    def _check_loaded_groups(self, groups: list) -> None:
        """Fused path: ValueError (changing nothing) where a saved group, as torch's load
        makes it (its ``__setstate__`` fills in the keys newer than the checkpoint), has a
        hyperparameter the update cannot read: a state dict of another optimizer (SGD's
        into AdamW has no betas) loaded, and failed only at the next boundary."""
        cls = type(self.inner)
        try:
            probe = cls.__new__(cls)
            probe.__setstate__({"state": {}, "param_groups": [dict(g) for g in groups],
                                "defaults": dict(self.inner.defaults)})
            loaded = probe.param_groups
        except Exception:  # (an optimizer whose __setstate__ needs more: torch's checks only)
            return
        for gi, (group, buckets) in enumerate(zip(loaded, self._buckets)):
            try:
                self._hparams(gi, group, buckets)
            except ValueError as exc:
                why = f" (a state dict of another optimizer than {cls.__name__}?)" \
                    if "has no" in str(exc) else ""
                raise ValueError(f"the state dict's {exc}{why}") from None

    def _load_state_dict(self, state_dict: dict) -> None:
        self._sync_groups()
        self._check_buckets()
        sd = dict(state_dict)
        extra = sd.pop("fusedaccum", None)
        sd, extra = self._check_loadable(sd, extra)
        # the next window's length, where the load ends at a boundary: asked before
        # anything changes, so that a callable that raises leaves the wrapper as it was
        next_k = None
        if extra is not None and int(extra["micro_step"]) == 0 and self._k_fn is not None:
            next_k = _check_k(self._k_fn(int(extra["update_count"]) +
                                         int(extra["skipped_steps"])),
                              "accumulation_steps(windows_ended)")
        self._drop_pending()
        if self._kind is not None:
            # torch would cast the state to the stepped tensors' dtype (half, without
            # masters); fp32 state is never downcast, so it is copied in by _adopt_state
            loaded_state = sd.get("state", {})
            self.inner.load_state_dict({"state": {}, "param_groups": sd["param_groups"]})
            self._adopt_state(loaded_state)
        else:
            self.inner.load_state_dict(sd)
            self._keep_fp32_state(sd.get("state", {}))
        if extra is None:
            return
        # a partial window of a data-parallel run was saved summed over the ranks: one
        # rank resumes it, so the boundary's sum is the same
        keep_window = self._pg is None or torch.distributed.get_rank(self._pg) == 0
        with torch.no_grad():
            index = self._index_map()
            for idx, master in extra.get("masters", {}).items():
                b, i = index[int(idx)]
                if b.has_master:
                    self._copy_local(b, i, b.master, master)
                    b.view(b.model, i).copy_(master)
            for b in self._all_buckets():
                b.acc.zero_()
                _all_zero(b)
            self._stale = False
            self._end_window()
            cleared = {int(idx) for idx in extra.get("cleared_grads", ())}
            for idx, acc in extra.get("accumulators", {}).items():
                b, i = index[int(idx)]
                if keep_window:
                    b.main_grads[i].copy_(acc)
                b.touched[i] = True
                if int(idx) not in cleared:
                    self._expose_grad(b, i)
            for b in self._all_buckets():  # (the copies went to touched params)
                _mark_clean(b)
        self.micro_step = int(extra["micro_step"])
        self._resets = 0  # (every rank loads: they agree again)
        self.update_count = int(extra["update_count"])
        self.skipped_steps = int(extra["skipped_steps"])
        # a window saved part-way keeps the length it started with; otherwise the next
        # window's length comes from this wrapper's accumulation_steps (it may differ,
        # e.g. when resuming on another number of ranks)
        if self.micro_step > 0:
            self._window_k = int(extra["window_k"])
        else:
            self._window_k = next_k if next_k is not None else self._next_k()
        # (the skip warning is not restored: DESIGN gives one to the first skipped step()
        # of each wrapper, so a run resumed in a new process warns once again)
        if extra.get("loss_scale") is not None and self._scaler is not None:
            self._scaler.load_state_dict(extra["loss_scale"], window_open=self.micro_step > 0)

    @staticmethod
    def _copy_local(b: Bucket, i: int, local_flat: torch.Tensor, value: torch.Tensor) -> None:
        """Copy the part of param ``i``'s full-size ``value`` that lies in [lo, hi)."""
        o, n = b.offsets[i], b.numels[i]
        a, e = max(o, b.lo), min(o + n, b.hi)
        if a < e:
            local_flat[a - b.lo:e - b.lo].copy_(b.flat_of(value, i)[a - o:e - o])

    @torch.no_grad()
    def _keep_fp32_state(self, loaded: dict) -> None:
        """Generic path, after ``inner.load_state_dict``: torch cast the state of fp16/bf16
        params without masters to their dtype; their state is never downcast, so every
        floating-point value but ``step`` (which torch places by its own policy) is copied
        in again as saved (fp32), on the param's device."""
        for idx, (b, i) in self._index_map().items():
            t = b.stepped[i]
            src = loaded.get(idx, loaded.get(str(idx)))
            st = self.inner.state.get(t)
            if b.is_half and not b.has_master and src is not None and st is not None:
                st.update({k: _fp32_state({k: v})[k].to(device=t.device, copy=True)
                           for k, v in src.items() if k != "step"
                           and isinstance(v, torch.Tensor) and v.is_floating_point()})

    def _fp32_initial_state(self, st: dict, t: torch.Tensor) -> dict:
        """A half param's state, in fp32 for the fp32 tensor ``t`` that is stepped in its
        place. State that Adagrad's ``__init__`` made (step 0, ``sum`` full of the
        constructor's ``initial_accumulator_value``: torch fills every param's from it, a
        group's own value notwithstanding) is made again in fp32: upcast, its value would
        be the half-rounded one (bf16(0.1) = 0.10009765625), where torch over fp32 params
        starts from fp32(0.1). A ``sum`` set otherwise is upcast as it is."""
        init = self.inner.defaults.get("initial_accumulator_value")
        made = st.get("sum")
        if isinstance(self.inner, torch.optim.Adagrad) and isinstance(made, torch.Tensor) \
                and isinstance(init, numbers.Real) and _as_float(st.get("step", 1)) == 0 \
                and bool((made == torch.tensor(init, dtype=made.dtype)).all()):
            st = dict(st, sum=torch.full_like(t, init, dtype=torch.float32))
        return _fp32_state(st)

    @torch.no_grad()
    def _adopt_state(self, loaded: dict) -> None:
        """Fused path: copy per-param state (by state_dict index) into the flat buffers."""
        if self._kind is None:
            # generic path (called by __init__ only): the inner optimizer keeps its own
            # state; only re-key it
            for b in self._all_buckets():
                for i, t in enumerate(b.stepped):
                    if not b.is_half:
                        continue
                    # state made for the half param (Adagrad makes it in __init__)
                    # belongs to its fp32 master, or stays fp32 without one
                    st = self.inner.state.pop(b.params[i], None)
                    if st:
                        self.inner.state[t] = self._fp32_initial_state(st, t)
            return
        self._recorded_in = None  # entries replaced: _record_fused_steps checks them all
        self._set_snaps(None)
        for idx, (b, i) in self._index_map().items():
            self.inner.state.pop(b.params[i], None)
            self.inner.state.pop(b.stepped[i], None)
            self._adopt_entry(b, i, loaded.get(idx, loaded.get(str(idx))))
        for b in self._all_buckets():  # after every read of the loaded values
            b.write_steps()

    @torch.no_grad()
    def _adopt_entry(self, b: Bucket, i: int, src: dict | None) -> None:
        """Fused path: param ``i`` of ``b``'s state taken from ``src`` (an entry in torch's
        format, or None: none) into the flat buffers. Its state tensors are copied in
        (fp32), its step count and momentum history read, and what it lacks starts afresh
        (zeros). Its entry in the state dict (the same dict object where there is one)
        then views the buffers; the caller writes the step tensors (b.write_steps)."""
        state_keys = (*_ADAM_KEYS, "momentum_buffer")
        t = b.stepped[i]
        # the values may view our own buffers (opt.load_state_dict(opt.state_dict()), an
        # entry partly ours): copy them before the zeroing below
        src = {k: v.to(device=b.device, dtype=torch.float32, copy=True)
               if k in state_keys and isinstance(v, torch.Tensor) else v
               for k, v in (src or {}).items()}
        for key in state_keys:
            if key in b.state_flat:
                self._copy_local(b, i, b.state_flat[key],
                                 torch.zeros(b.shapes[i], device=b.device))
        b.steps[i] = 0
        b.has_buf[i] = False
        b.recorded[i] = False
        new = {}
        for key, value in src.items():
            if key in state_keys and value is not None:
                self._copy_local(b, i, b.state_buffer(key),
                                 value.to(device=b.device, dtype=torch.float32))
                if not b.sharded:
                    new[key] = b.state_view(key, i)
                b.has_buf[i] = b.has_buf[i] or key == "momentum_buffer"
            elif key == "step":
                b.steps[i] = int(_as_float(value))
                if self._kind == "adam" and not b.sharded:  # valued by write_steps
                    new[key] = b.step_views()[i]
                else:
                    new[key] = torch.tensor(float(b.steps[i]), dtype=torch.float32)
            elif key != "momentum_buffer":
                new[key] = value
        if self._kind == "sgd" and not b.has_buf[i]:
            b.steps[i] = 0
        elif self._kind == "sgd":
            b.steps[i] = max(b.steps[i], 1)
        entry = self.inner.state.get(t)
        if b.sharded or not new:
            if entry:  # (emptied in place: torch's step would fill that very dict)
                entry.clear()
        elif isinstance(entry, dict):
            entry.clear()
            entry.update(new)
        else:
            self.inner.state[t] = new
