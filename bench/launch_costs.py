"""The host cost of one batch flush, taken apart: what a flush of the wrapper's batch of
small gradients costs the host per call, and each piece of it.

    python bench/launch_costs.py [--device cuda] [--rounds 15] [--calls 20]

On the H200 (2026-11-26, bench/results/NVIDIA-H200_2026-11-26_phases.md) the Triton
backend's batch flushes took 2.7-4.8 ms of host time per gpt2-124m window against
1.0-1.5 ms for the cuda backend, and nothing on the CPU can say where: a Triton flush
builds a table of data pointers, pins it, uploads it and launches through Triton's Python
launcher, where the cuda backend passes the pointers as kernel arguments from C++. This
script times those pieces and the whole calls on one batch: one GPT-2 block's gradients
(12 bf16 tensors, 7.1M elements, into fp32 accumulators).

The table can reach the device pinned (torch's caching host allocator, then an
asynchronous upload), pageable (``non_blocking=True`` from an ordinary tensor, staged by
the driver: the launcher's default since the H100 run of 2026-11-26) or cached
(uploaded once per distinct set of entries; here every call hits): each is timed in the
whole launcher, the first two also alone, so that ``triton._TABLE_UPLOAD`` can be set to
the cheapest.

Each row is the median over shuffled rounds of the mean host time of ``--calls``
back-to-back calls; the device is synchronized before each batch of calls (outside the
timing), so a full launch queue never blocks one. On CUDA a second table times the same
calls while the device is still busy with a sleep kernel queued before them, as in a
window where the host runs ahead: pinned blocks cannot be recycled until their uploads ran.
The C++ batch flush (csrc/hooks.cpp flush_batch, since 2026-11-26 evening what the C++
hook and FusedAccumulator._flush run for a batch without a norm statistic: the native op,
or on the triton backend the kernel table built in C++ and one Python launcher) is timed
on the same batch, each call refilling it first (a row times the refill alone).
The boundary's norm and AdamW step on one of those buffers are timed too, the triton
backend's through Triton's launcher ("jit") and launched directly (ops/triton.py _run,
every eager launch since 2026-11-27's fifth session), the extension's beside them.
Rows needing CUDA or Triton are left out where they cannot run (on a CPU only the
extension's rows run, with real work in them).
"""

from __future__ import annotations

import argparse
import array
import functools
import random
import statistics
import time
import types

import torch

from fusedaccum import bench
from fusedaccum.ops import native
from fusedaccum.ops import triton as tri

# one GPT-2 (124M) block's params: ln_1, attn c_attn, attn c_proj, ln_2, mlp c_fc, c_proj
BLOCK_SHAPES = [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,),
                (768, 3072), (3072,), (3072, 768), (768,)]


def contenders(device: torch.device) -> dict:
    """name -> zero-argument callable, each one call of the piece it names."""
    accs = [torch.zeros(s, device=device).view(-1) for s in BLOCK_SHAPES]
    grads = [torch.randn(s, device=device).to(torch.bfloat16).view(-1) for s in BLOCK_SHAPES]
    out = {}
    hooks = native.hooks_module(load=False)
    if native.unavailable_reason("cuda" if device.type == "cuda" else "cpu", device) is None:
        out["native accumulate_many_ (12 pairs)"] = lambda: native.accumulate_many_(
            accs, grads, 1.0, trusted=True)
        out["native accumulate_ (1 pair, 2.4M)"] = lambda: native.accumulate_(
            accs[10], grads[10], 1.0)
        if hooks is not None:
            out.update(_flush_batch_rows(hooks, device, grads, None, 0, 0, "native op"))
    if device.type != "cuda" and tri.unavailable_reason("triton", device) is not None:
        return out
    table = tri.table_flush(device, torch.bfloat16)
    if hooks is not None and table is not None:
        out.update(_flush_batch_rows(hooks, device, grads, *table, "triton table"))
    if device.type != "cuda":
        return out
    out["torch add_ (1 pair, 2.4M)"] = lambda: accs[10].add_(grads[10])
    out["torch.cuda.device(dev) enter+exit"] = lambda: _enter_exit(device)
    out["triton _device_of(t) enter+exit (the current device: no switch)"] = (
        lambda: _enter_exit_device_of(accs[0]))
    if tri.unavailable_reason("triton", device) is not None:
        return out
    block, warps = tri._config("accumulate")
    ints, _, grid = tri._many_table(accs, grads, block)
    pinned = torch.tensor(ints, dtype=torch.int64, pin_memory=True)
    on_device = pinned.to(device)
    out["table: torch.tensor(list)"] = lambda: torch.tensor(ints, dtype=torch.int64)
    out["table: torch.frombuffer(array) (the launcher's)"] = lambda: torch.frombuffer(
        array.array("q", ints), dtype=torch.int64)
    out["table: torch.tensor(list, pin_memory=True)"] = lambda: torch.tensor(
        ints, dtype=torch.int64, pin_memory=True)
    out["table: pinned.to(dev, non_blocking=True)"] = lambda: pinned.to(device,
                                                                       non_blocking=True)
    out["table: torch.tensor(list).to(dev, non_blocking=True) (pageable)"] = lambda: torch.tensor(
        ints, dtype=torch.int64).to(device, non_blocking=True)
    out["table: torch.tensor(list, device=dev)"] = lambda: torch.tensor(
        ints, dtype=torch.int64, device=device)

    def kernel_only():
        with tri._device_of(accs[0]):
            tri._accumulate_many_kernel[(grid,)](on_device, len(accs), 1.0,
                                                 LOG_T=(len(accs) - 1).bit_length(),
                                                 GRAD_KIND=tri._BF16, INTERPRETED=False,
                                                 BLOCK=block, num_warps=warps)

    out["triton: accumulate_many kernel launch only"] = kernel_only

    def kernel_only_direct():
        with tri._device_of(accs[0]):
            tri._launch_many_kernel(grid, on_device, len(accs), 1.0,
                                    (len(accs) - 1).bit_length(), tri._BF16, block, warps,
                                    "direct")

    out["triton: accumulate_many kernel launch only, direct"] = kernel_only_direct
    out["triton: _launch_accumulate_many (12 pairs, pageable table, direct launch)"] = (
        lambda: tri._launch_accumulate_many(accs, grads, 1.0, upload="pageable",
                                            launch="direct"))
    for mode in tri._TABLE_MODES:
        out[f"triton: _launch_accumulate_many (12 pairs, {mode} table, jit launch)"] = (
            lambda mode=mode: tri._launch_accumulate_many(accs, grads, 1.0, upload=mode,
                                                          launch="jit"))
    out["triton: accumulate_many_ (12 pairs, the op)"] = lambda: tri.accumulate_many_(
        accs, grads, 1.0, trusted=True)
    out["triton: accumulate_ (1 pair, 2.4M)"] = lambda: tri.accumulate_(accs[10], grads[10],
                                                                         1.0)
    out.update(_boundary_rows(device, accs[10], grads[10]))
    return out


def _boundary_rows(device, acc, half) -> dict:
    """The boundary's ops on one 2.4M-element buffer: the norm (two launches) and the
    AdamW step, the triton backend's launched through Triton's launcher ("jit") and
    directly (ops/triton.py _run), the extension's beside them."""
    state = [torch.zeros_like(acc) for _ in range(3)]
    one, zero = torch.ones((), device=device), torch.zeros((), device=device)

    def adamw(module):
        module.adamw_step_(state[0], acc, state[1], state[2], None, half, grad_mult=one,
                           found_inf=zero, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8,
                           weight_decay=0.1, step=10, zero_acc=False, trusted=True)

    rows = {}
    for mode in ("jit", "direct"):
        rows[f"triton: grad_norm (1 tensor, 2.4M), {mode} launches"] = functools.partial(
            _in_mode, mode, lambda: tri.grad_norm([acc]))
        rows[f"triton: adamw_step_ (2.4M, bf16 copy), {mode} launch"] = functools.partial(
            _in_mode, mode, lambda: adamw(tri))
    if native.unavailable_reason("cuda", device) is None:
        rows["native grad_norm (1 tensor, 2.4M)"] = lambda: native.grad_norm([acc])
        rows["native adamw_step_ (2.4M, bf16 copy)"] = lambda: adamw(native)
    return rows


def _in_mode(mode: str, fn) -> None:
    """``fn()`` with ops/triton.py's launch mode set to ``mode``."""
    saved, tri._LAUNCH = tri._LAUNCH, mode
    try:
        fn()
    finally:
        tri._LAUNCH = saved


def _flush_batch_rows(hooks, device, grads, launcher, block, kind, what) -> dict:
    """The C++ batch flush (csrc/hooks.cpp flush_batch: what FusedAccumulator._flush and
    the C++ hook run) of the 12 gradients into views of one flat accumulator, as a bucket
    holds them; each call first refills the batch (the second row: that refill alone)."""
    from fusedaccum.buffers import HOOK_FIELDS

    flat = torch.zeros(sum(g.numel() for g in grads), device=device)
    views = list(torch.split(flat, [g.numel() for g in grads]))
    bucket = types.SimpleNamespace(acc=flat, hook_fields=[None] * len(HOOK_FIELDS))
    at = {name: k for k, name in enumerate(HOOK_FIELDS)}
    fields = bucket.hook_fields
    fields[at["stats_version"]] = fields[at["clean_version"]] = -1

    def refill():
        fields[at["pending"]] = list(range(len(grads)))
        fields[at["pending_accs"]] = list(views)
        fields[at["pending_grads"]] = list(grads)
        fields[at["pending_ow"]] = [0] * len(grads)
        fields[at["pending_bytes"]] = 1
        fields[at["is_pending"]] = [True] * len(grads)

    def flush():
        refill()
        if not hooks.flush_batch(bucket, launcher, block, kind):
            raise RuntimeError("flush_batch left the batch to Python")

    if launcher is None:
        return {f"C++ flush_batch, {what} (12 pairs, with the refill)": flush,
                "C++ flush_batch: the refill alone": refill}

    def flush_as(mode):  # (cxx: the first call registers the kernel: warm-up)
        saved, tri._LAUNCH = tri._LAUNCH, mode
        try:
            flush()
        finally:
            tri._LAUNCH = saved

    # the triton table, handed to Python's launcher (jit: Triton's launcher; direct: the
    # compiled kernel it returned) or launched from C++ (cxx, a CUDA build)
    modes = tri._LAUNCH_MODES if device.type == "cuda" else ("jit", "direct")
    rows = {f"C++ flush_batch, {what} launched as '{mode}' (12 pairs, with the refill)":
            functools.partial(flush_as, mode) for mode in modes}
    rows["C++ flush_batch: the refill alone"] = refill
    return rows


def _enter_exit(device):
    with torch.cuda.device(device):
        pass


def _enter_exit_device_of(t):
    with tri._device_of(t):
        pass


def measure(device: torch.device, rounds: int, calls: int, seed: int = 0,
            busy_cycles: int = 0) -> dict:
    """Medians per call. With ``busy_cycles`` (CUDA), each batch of calls is timed while
    the device still runs a sleep kernel of that many clock cycles queued just before, as
    in a window, where the host runs ahead of the device: pinned tables then stay in use
    until their upload has run."""
    fns = contenders(device)
    for name, fn in list(fns.items()):  # warm-up: compilation, caches, allocator pools
        try:
            for _ in range(3):
                fn()
        except Exception as exc:  # noqa: BLE001 - one piece that cannot run here
            print(f"{name}: failed, left out: {type(exc).__name__}: {exc}")
            del fns[name]
    bench.sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    rng = random.Random(seed)
    names = list(fns)
    with bench.gc_paused():
        for _ in range(rounds):
            rng.shuffle(names)
            for name in names:
                fn = fns[name]
                bench.sync(device)
                if busy_cycles:
                    torch.cuda._sleep(busy_cycles)
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / calls)
    bench.sync(device)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(device: torch.device, medians: dict, rounds: int, calls: int,
           busy: str = "") -> str:
    lines = [f"### host time per call: one GPT-2 block's batch (12 bf16 grads, 7.1M elements), "
             f"{bench.device_name(device)}, {rounds} rounds x {calls} calls{busy}",
             "| piece | median per call |", "|---|---|"]
    lines += [f"| {name} | {bench.fmt_time(t)} |" for name, t in medians.items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--busy-cycles", type=int, default=10_000_000,
                    help="CUDA: also time every piece with the device busy this many clock "
                    "cycles (about 5 ms on an H200; 0: not)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(report(device, measure(device, args.rounds, args.calls), args.rounds, args.calls))
    if device.type == "cuda" and args.busy_cycles:
        medians = measure(device, args.rounds, args.calls, busy_cycles=args.busy_cycles)
        print()
        print(report(device, medians, args.rounds, args.calls,
                     f", device busy ({args.busy_cycles:,} cycles queued before each batch)"))


if __name__ == "__main__":
    main()
