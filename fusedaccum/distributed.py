"""Data parallel on torch.distributed: one gradient exchange per window, and ZeRO-1.

Each rank accumulates its own micro-batches into its flat fp32 accumulators; at the
window's boundary, and only there, the accumulators are summed across the process
group (one asynchronous all-reduce per bucket, or a reduce-scatter per bucket with
``shard_optimizer_state=True``), so N ranks with k micro-batches each make the update
one process would make with N*k micro-batches. ``num_items`` is each rank's LOCAL
item count; the wrapper sums the counts across ranks in the same small collective
that merges which params received a gradient anywhere.

With sharding, rank r owns the elements [lo, hi) of every flat buffer: it keeps the
fp32 master weights and the optimizer state for that range only, steps it, and the
updated params are all-gathered into every rank's model buffer.
"""

from __future__ import annotations

import gc
import math
import warnings

import torch
import torch.distributed as dist


def _collective(new: str, old: str):
    """torch 2.13 renamed some collectives; torch 2.11 only has the old names."""
    return getattr(dist, new, None) or getattr(dist, old)


def check_process_group(group) -> tuple[int, int]:
    """(rank, world size) within ``group``, or a clear error when it cannot be used."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            "this process is not a member of process_group (dist.new_group(ranks) returns "
            "a group that only its members may use): build the wrapper with a group this "
            "rank belongs to, or without process_group")
    return rank, dist.get_world_size(group)


def find_ddp_module(params) -> str | None:
    """A description of a live DistributedDataParallel that wraps any of ``params``."""
    ids = {id(p) for p in params}
    ddp_cls = torch.nn.parallel.DistributedDataParallel
    with warnings.catch_warnings():  # some objects warn when their class is looked up
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                is_ddp = isinstance(obj, ddp_cls)
            except Exception:  # objects whose __class__ lookup fails
                continue
            if is_ddp and any(id(p) in ids for p in obj.parameters()):
                return f"{type(obj.module).__name__} inside DistributedDataParallel"
    return None


def check_replicas(buckets, group, device) -> None:
    """All ranks must start from the same params: compare cheap per-bucket checksums."""
    sums = [len(buckets)]
    for b in buckets:
        flat = b.model.detach().double()
        sums += [b.total, flat.sum().item(), flat.abs().sum().item()]
    local = torch.tensor(sums, dtype=torch.float64, device=device)
    hi, lo = local.clone(), -local
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(hi, -lo):
        raise ValueError(
            "the params differ across the ranks of process_group (shapes, dtypes or values): "
            "every rank must build the same model from the same seed or checkpoint before "
            "wrapping it")


def merge_window(buckets, num_items, group, device, k: int, windows: int = 0,
                 resets: int = 0):
    """Union of the params touched on any rank, and the global item count (or None).

    One small all-reduce for both, which also checks that the ranks agree: every rank
    or none passes ``num_items`` (this rank's local count), every rank's window has the
    same length ``k``, has ended as many windows before (``windows``) and dropped as many
    partial windows (``resets``, reset_accumulation calls): each sees the same sums, so
    all raise together. (A rank that dropped a window alone would pair its micro-batches
    with the others' next ones, and at the end wait for a boundary they never reach.)"""
    flags = [float(t) for b in buckets for t in b.touched]
    items = 0.0 if num_items is None else num_items
    checks = [float(num_items is not None), float(k), float(k) ** 2, 1.0, float(windows),
              float(windows) ** 2, float(resets), float(resets) ** 2]
    if isinstance(items, torch.Tensor):
        vec = torch.cat([items.detach().reshape(1).to(device=device, dtype=torch.float64),
                         torch.tensor(checks + flags, dtype=torch.float64, device=device)])
    else:
        vec = torch.tensor([float(items), *checks, *flags], dtype=torch.float64,
                           device=device)
    dist.all_reduce(vec, group=group)
    total, with_items, k_sum, k_sq, world, w_sum, w_sq, r_sum, r_sq, *merged = \
        vec.cpu().tolist()
    if 0 < with_items < world:
        raise ValueError(
            f"step(num_items=...) was given on {with_items:.0f} of the {world:.0f} ranks at this "
            "boundary: give every rank its local item count, or none of them")
    if with_items and not (total > 0 and math.isfinite(total)):
        # (a rank's own count may be 0; the sum is the window's D)
        raise ValueError(
            f"num_items summed over the {world:.0f} ranks is {total:g} at this boundary: the "
            "window's item count must be a finite number > 0")
    if r_sq * world != r_sum ** 2:  # (Cauchy-Schwarz: equal only when all are the same)
        raise ValueError(
            "reset_accumulation() was called on some ranks of process_group and not on "
            "others: a rank that drops its partial window alone pairs its next micro-batches "
            "with the other ranks' current window. Call it on every rank at the same point "
            "(e.g. after a backward that failed on one rank, agree on it across the ranks)")
    if w_sq * world != w_sum ** 2:
        raise ValueError(
            "the ranks of process_group have ended different numbers of windows (a rank "
            "resumed from another checkpoint, or ran windows alone): every rank must run "
            "the same windows")
    if k_sq * world != k_sum ** 2:
        raise ValueError(
            "the ranks' accumulation windows have different lengths (accumulation_steps "
            "differs across ranks): every rank must run the same number of micro-batches "
            "per window")
    k = 0
    for b in buckets:
        for i in range(len(b)):
            b.touched[i] = b.touched[i] or merged[k] > 0
            k += 1
    return None if num_items is None else vec[0].to(torch.float32)


def reduce_gradients(buckets, group) -> None:
    """Sum the window's accumulators across ranks: in place, or into each rank's shard."""
    reduce_scatter = _collective("reduce_scatter_single", "reduce_scatter_tensor")
    works = []
    for b in buckets:
        if b.sharded:
            works.append(reduce_scatter(b.acc_local, b.acc, group=group, async_op=True))
        else:
            works.append(dist.all_reduce(b.acc, group=group, async_op=True))
    for w in works:
        w.wait()
    for b in buckets:
        if b.sharded:
            b.acc.zero_()  # the full accumulator is spent; the step reads acc_local


def global_norm(local_norm: torch.Tensor, norm_type: float, group) -> torch.Tensor:
    """Combine per-rank norms of disjoint shards into the norm of the whole."""
    if norm_type == math.inf:
        nonfinite = (~torch.isfinite(local_norm)).to(torch.float32)
        vec = torch.stack([torch.nan_to_num(local_norm, nan=0.0, posinf=0.0), nonfinite])
        dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
        return torch.where(vec[1] > 0, torch.full_like(vec[0], math.nan), vec[0])
    sq = local_norm.square()
    dist.all_reduce(sq, group=group)
    return sq.sqrt()


def sum_squares_if_finite(sq: torch.Tensor, finite: bool, group):
    """ZeRO-1's overflow retry: (the float64 sum of squares over the ranks, whether every
    rank's shard is finite)."""
    vec = torch.stack([sq.to(torch.float64), torch.tensor(0.0 if finite else 1.0,
                                                         dtype=torch.float64, device=sq.device)])
    dist.all_reduce(vec, group=group)
    return vec[0], bool(vec[1] == 0)


def gather_params(buckets, group) -> None:
    """After a sharded step, every rank's model buffer gets every shard."""
    all_gather = _collective("all_gather_single", "all_gather_into_tensor")
    works = [all_gather(b.model, b.model[b.lo:b.hi], group=group, async_op=True)
             for b in buckets if b.sharded]
    for w in works:
        w.wait()


def gather_flat(local: torch.Tensor, total: int, group) -> torch.Tensor:
    """The full [0, total) buffer assembled from every rank's [lo, hi) piece."""
    all_gather = _collective("all_gather_single", "all_gather_into_tensor")
    full = torch.empty(total, dtype=local.dtype, device=local.device)
    all_gather(full, local.contiguous(), group=group)
    return full


def sum_across(t: torch.Tensor, group) -> torch.Tensor:
    out = t.clone()
    dist.all_reduce(out, group=group)
    return out


def bytes_per_window(numel: int, param_bytes: int, world: int, k: int,
                     shard: bool) -> dict[str, float]:
    """Bytes each rank sends per window (ring algorithms), fusedaccum against DDP.

    ``numel`` elements of params stored in ``param_bytes`` bytes each. fusedaccum
    reduces the fp32 accumulators once per window: an all-reduce (2(N-1)/N of the
    buffer), or with ZeRO-1 a reduce-scatter of the fp32 accumulators plus an all-gather
    of the updated params ((N-1)/N of each). DDP all-reduces every micro-batch's
    gradient in the param dtype: k times 2(N-1)/N of it.
    """
    share = (world - 1) / world
    fused = (share * numel * 4 + share * numel * param_bytes) if shard \
        else 2 * share * numel * 4
    ddp = k * 2 * share * numel * param_bytes
    return {"fusedaccum": fused, "ddp_every_micro_batch": ddp, "ratio": ddp / fused if fused
            else float("nan")}
