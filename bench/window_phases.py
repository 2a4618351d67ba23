"""Where a window's time goes: the host time of each phase of one accumulation window, for
fusedaccum and for the plain peers, on the benchmark's harness (fusedaccum/bench.py).

    python bench/window_phases.py [--model gpt2-124m] [--device cuda] [--backends cuda,triton]
                                  [--rounds 20] [--sync]

Phases (medians over the rounds, per window): each contender's k backward passes (the
hooks and, for fusedaccum, the batched accumulations run inside them: also shown on their
own, "of which"), its per-micro-batch calls (`step()`/`zero_grad()`), and the boundary;
fusedaccum's boundary is split into its parts (the checks of the params and the buckets,
the hyperparameters' read, the norm, the fused step, the wait for the found-inf flag, the
state bookkeeping, the params' version counters, the inner optimizer's step counts and
schedulers, the end of the window; "rest" is the scalar math and the rest of
`_boundary`'s own code). Host time: on a GPU the kernels run behind it, except where a
phase waits for them. The found-inf read waits for the work queued before the norm's flag
(the backward's last accumulations and the norm), not for the update queued after it: its
row is that wait, which a GPU that keeps up with the host makes short.
`--sync` synchronizes the device after every phase, so each phase also carries its own
kernels' time.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import random
import statistics
import sys
import time
from collections import defaultdict

import torch

from fusedaccum import accumulator as acc_mod
from fusedaccum import bench
from fusedaccum.ops import native
from fusedaccum.ops import triton as tri

_PARTS = ("_flush", "_check_buckets", "_fused_prepare", "_total_norm", "_fused_update",
          "_record_fused_steps", "_bump_updated_params", "_inner_stepped", "_end_window")
_READ_LABEL = " boundary: found-inf read (the wait)"


# every batch flush in Python: at the end of a backward, and in the Python hook when a
# batch is full (with the C++ hook on the extension's backends, full batches are flushed
# in C++, inside the backward's time but not in this row)
_FLUSH_LABEL = " of which batch flushes in Python (_flush)"


class Clock:
    def __init__(self, device: torch.device, sync: bool):
        self.device, self.sync = device, sync
        self.times: dict[str, list[float]] = defaultdict(list)
        self.window: dict[str, float] = defaultdict(float)
        self.in_boundary = False

    def now(self) -> float:
        if self.sync:
            bench.sync(self.device)
        return time.perf_counter()

    def add(self, name: str, dt: float) -> None:
        self.window[name] += dt

    def end_window(self, prefix: str) -> None:
        for name, dt in self.window.items():
            self.times[f"{prefix}{name}"].append(dt)
        self.window.clear()


def _instrument(clock: Clock):
    """Time the wrapper's boundary parts (class-level wrappers, every instance); returns
    the function that puts the originals back."""
    F = acc_mod.FusedAccumulator
    saved = {name: F.__dict__[name] for name in (*_PARTS, "_boundary", "_read_later")}
    for name in _PARTS:
        real = getattr(F, name)

        @functools.wraps(real)
        def timed(self, *args, _real=real, _name=name, **kwargs):
            if _name != "_flush" and not clock.in_boundary:  # (a check outside one)
                return _real(self, *args, **kwargs)
            t0 = clock.now()
            out = _real(self, *args, **kwargs)
            label = (_FLUSH_LABEL if _name == "_flush" else f" boundary: {_name}")
            clock.add(label, clock.now() - t0)
            return out

        setattr(F, name, timed)

    def boundary(self, *args, _real=F._boundary, **kwargs):
        t0 = clock.now()
        clock.in_boundary = True
        try:
            out = _real(self, *args, **kwargs)
        finally:
            clock.in_boundary = False
        clock.add("boundary (all)", clock.now() - t0)
        return out

    F._boundary = boundary

    def read_later(self, *args, _real=F._read_later, **kwargs):
        read = _real(self, *args, **kwargs)

        def timed_read():  # (not clock.now(): --sync would move the wait out of this row)
            t0 = time.perf_counter()
            out = read()
            clock.add(_READ_LABEL, time.perf_counter() - t0)
            return out

        return timed_read

    F._read_later = read_later

    def restore():
        for name, fn in saved.items():
            setattr(F, name, fn)

    return restore


# what the C++ batching hook did inside the backward (csrc/hooks.cpp batch_hook_times, its
# own host time) and how often, per window: counts are the rows whose phase starts with "#"
_CXX_FLUSH_LABEL = " of which full batches flushed by the C++ hook"
_CXX_DIRECT_LABEL = " of which large gradients added by the C++ hook"
_CXX_COUNT_LABELS = ("# full batches flushed by the C++ hook", "# large gradients added by it")


def _cxx_counters():
    """(full-batch flush ns, direct add ns, full-batch flushes, direct adds) so far, or
    None where the extension's hook module (with these counters) is not loaded."""
    hooks = native.hooks_module(load=False)
    if hooks is None or not hasattr(hooks, "batch_hook_times"):
        return None
    flush_ns, _, direct_ns, direct = hooks.batch_hook_times()
    return flush_ns, direct_ns, hooks.batch_hook_flushes()[0], direct


def _add_cxx(clock: Clock, before, after) -> None:
    if before is None or after is None:
        return
    d = [a - b for a, b in zip(after, before)]
    clock.add(_CXX_FLUSH_LABEL, d[0] * 1e-9)
    clock.add(_CXX_DIRECT_LABEL, d[1] * 1e-9)
    clock.add(_CXX_COUNT_LABELS[0], d[2])
    clock.add(_CXX_COUNT_LABELS[1], d[3])


def run_ours(c: bench.FusedContender, clock: Clock) -> None:
    k = c.wl.k
    for i in range(k):
        t0 = clock.now()
        before = _cxx_counters()
        bench._backward(c.params, c.wl.grads)
        _add_cxx(clock, before, _cxx_counters())
        t1 = clock.now()
        c.opt.step()
        t2 = clock.now()
        c.opt.zero_grad()
        t3 = clock.now()
        clock.add("backward x k (hooks, batches)", t1 - t0)
        if i < k - 1:
            clock.add("step() between boundaries", t2 - t1)
        clock.add("zero_grad()", t3 - t2)


def run_peer(c, clock: Clock) -> None:
    t0 = clock.now()
    for _ in range(c.wl.k):
        bench._backward(c.params, c.grads if isinstance(c, bench.TutorialContender)
                        else c.wl.grads)
    t1 = clock.now()
    if isinstance(c, bench.TutorialContender):
        torch.nn.utils.clip_grad_norm_(c.params, bench.MAX_GRAD_NORM)
        c.opt.step()
        c.opt.zero_grad()
    else:
        c._boundary()
    t2 = clock.now()
    clock.add("backward x k (hooks)", t1 - t0)
    clock.add("boundary", t2 - t1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-124m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default=None, help="default: every backend but reference")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--flush-mib", type=float, default=None,
                    help="the wrapper's batch flush size (default: its own, "
                    f"{acc_mod._BATCH_FLUSH_BYTES >> 20} MiB on GPUs, "
                    f"{acc_mod._BATCH_FLUSH_BYTES_CPU >> 20} MiB on CPUs)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the medians there: {contender: {phase: seconds}}")
    grads = ap.add_mutually_exclusive_group()
    grads.add_argument("--fresh-grads", action="store_true",
                       help="hand each param a new copy of its gradient (the default; python -m "
                       "fusedaccum bench --help)")
    grads.add_argument("--premade-grads", action="store_true",
                       help="hand the pre-made gradients (python -m fusedaccum bench --help)")
    ap.add_argument("--profile", default="", metavar="NAMES",
                    help="after the tables, cProfile these contenders (comma-separated, as the "
                    "table names them, e.g. 'fusedaccum[triton]') over --profile-windows "
                    "windows each and print the functions with the most own time")
    ap.add_argument("--profile-windows", type=int, default=10)
    ap.add_argument("--variants", default="",
                    help="extra contenders in the same rounds, comma-separated: "
                    "'python-hooks' (FUSEDACCUM_FAST_HOOKS=0), 'python-flush' (the "
                    "C++ hook on, but a triton bucket's full batches flushed in Python: "
                    "accumulator.py _TABLE_FLUSH), 'no-pre-hook' (the C++ hook takes the "
                    "gradients after AccumulateGrad made .grad: accumulator.py _PRE_HOOK), "
                    "'flush=<MiB>', 'batch-max=<elements>' (half "
                    "gradients up to that size join batches, e.g. 16M: accumulator.py "
                    "_BATCH_MAX_NUMEL), "
                    "'table=pinned|pageable|cached' (how a Triton flush uploads its table: "
                    "ops/triton.py _TABLE_UPLOAD), 'launch=jit|direct|cxx|auto' (how it launches "
                    "its kernel: ops/triton.py _LAUNCH), 'no-overwrite' (a window's first "
                    "gradients added to the zeroed accumulators, not written: "
                    "Bucket.overwrite_first; also zeroes them at the boundary), 'no-lazy' (the "
                    "boundary zeroes the accumulators instead of leaving them dirty for the "
                    "next window's first gradients to overwrite: Bucket.lazy_zero), "
                    "'python-walks' (the boundary's walks over the params in Python, not "
                    "csrc/hooks.cpp's), 'flag-first' (the boundary reads its found-inf flag "
                    "before launching the update: accumulator.py _READ_FLAG_LATE), "
                    "'no-read' (the boundary does not wait for its found-inf flag and "
                    "takes every window as finite, which the benchmark's are: how much "
                    "the one host read per window costs, an upper bound on what reading "
                    "it later would gain; not a mode of the wrapper), "
                    "'ride'/'no-ride' (the clipping norm rides on "
                    "the last micro-batch's accumulations, or one norm pass: "
                    "Bucket.ride_norm); of the first backend, or of another one as "
                    "'<backend>:<variant>'")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    backends = (args.backends.split(",") if args.backends else
                [b for b in bench.bench_backends(dev)[0] if b != "reference"])
    if dev.type == "cuda" and "cuda" in backends and "triton" in backends:
        backends.append("auto")
    bench._Deliver.fresh = not args.premade_grads
    clock = Clock(dev, args.sync)
    restore = _instrument(clock)
    flush = None if args.flush_mib is None else int(args.flush_mib * (1 << 20))
    try:
        with bench.hook_settings(flush_bytes=flush):
            contenders = _run(args, dev, backends, clock)
        restore()  # (the profiles below without the phase timers)
        _profile(args, contenders, dev)
    finally:
        bench._Deliver.fresh = True
        restore()
    return 0


def _profile(args, contenders: dict, dev) -> None:
    """--profile: each named contender's windows under cProfile, the top functions by own
    time (host time, where the next GPU session can see what a slower host spends)."""
    for name in filter(None, args.profile.split(",")):
        c = contenders.get(name)
        if c is None:
            raise SystemExit(f"--profile: no contender {name!r}; the table names "
                             f"{', '.join(contenders)}")
        saved = {attr: getattr(tri, attr) for attr, _ in _TRITON_SETTINGS.values()}
        _apply_settings(c, saved)
        prof = cProfile.Profile()
        try:
            with bench.gc_paused():
                prof.enable()
                for _ in range(args.profile_windows):
                    c.window()
                prof.disable()
                bench.sync(dev)
        finally:
            _apply_settings(None, saved)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(f"\n#### cProfile of {name}, {args.profile_windows} windows (own time first)\n"
              f"```\n{out.getvalue().strip()}\n```")


# variant key -> (the ops/triton.py setting it sets, the tuple of its modes there)
_TRITON_SETTINGS = {"table": ("_TABLE_UPLOAD", "_TABLE_MODES"),
                    "launch": ("_LAUNCH", "_LAUNCH_MODES")}


def _apply_settings(c, triton_defaults: dict) -> None:
    """The module settings contender ``c`` runs with: its variant's (``triton_settings``,
    ``accumulator_settings``), else ``triton_defaults`` and the accumulator's defaults
    (``c=None``: all defaults, to put them back)."""
    for attr, value in triton_defaults.items():
        setattr(tri, attr, getattr(c, "triton_settings", {}).get(attr, value))
    acc_mod._READ_FLAG_LATE = getattr(c, "accumulator_settings", {}).get(
        "_READ_FLAG_LATE", True)


def _variant(wl, backend: str, variant: str) -> bench.FusedContender:
    """A contender built with the C++ hook off or another flush size (both are fixed when
    a wrapper installs its hooks), to compare with the plain one in the same rounds."""
    if variant == "python-hooks":
        with bench.hook_settings(fast=False):
            return bench.FusedContender(wl, backend)
    if variant == "python-flush":
        with bench.hook_settings(table_flush=False):
            return bench.FusedContender(wl, backend)
    if variant == "no-pre-hook":
        with bench.hook_settings(pre_hook=False):
            return bench.FusedContender(wl, backend)
    if variant.startswith("batch-max="):
        # gradients of up to this many elements join batches; larger ones are a flush
        # (triton) or an op call (cuda) of their own each
        with bench.hook_settings(batch_max_numel=bench.parse_size(variant[10:])):
            return bench.FusedContender(wl, backend)
    if variant.startswith("flush="):
        with bench.hook_settings(flush_bytes=int(float(variant[6:]) * (1 << 20))):
            return bench.FusedContender(wl, backend)
    if variant == "python-walks":  # the boundary's walks over the params in Python
        c = bench.FusedContender(wl, backend)
        c.opt._cxx = None
        return c
    if variant == "flag-first":  # read at each boundary: set around the contender's windows
        c = bench.FusedContender(wl, backend)
        c.accumulator_settings = {"_READ_FLAG_LATE": False}
        return c
    if variant == "no-read":  # (the instance's method hides the class's, and its timing)
        c = bench.FusedContender(wl, backend)
        c.opt._read_later = lambda flag: (lambda: False)
        return c
    if variant in ("no-overwrite", "no-lazy", "ride", "no-ride"):  # read at each use
        c = bench.FusedContender(wl, backend)
        for b in c.opt._all_buckets():
            if variant == "no-overwrite":
                b.overwrite_first, b.clean_version = False, -1
            elif variant == "no-lazy":
                b.lazy_zero = False
            else:
                b.ride_norm = variant == "ride"
        return c
    key, _, value = variant.partition("=")
    if key in _TRITON_SETTINGS:  # read at each flush: set around the contender's windows
        attr, modes = _TRITON_SETTINGS[key]
        if value not in getattr(tri, modes):
            raise SystemExit(f"unknown {key} mode {value!r}: one of "
                             f"{', '.join(getattr(tri, modes))}")
        c = bench.FusedContender(wl, backend)
        c.triton_settings = {attr: value}
        return c
    raise SystemExit(f"unknown variant {variant!r}: python-hooks, python-flush, no-pre-hook, "
                     "python-walks, flag-first, no-read, flush=<MiB>, "
                     "batch-max=<elements>, no-overwrite, "
                     f"no-lazy, ride, no-ride, table={'|'.join(tri._TABLE_MODES)} or "
                     f"launch={'|'.join(tri._LAUNCH_MODES)}")


def _run(args, dev, backends, clock: Clock) -> None:
    wl = bench.Workload(bench.MODELS[args.model], dev, torch.bfloat16)
    contenders = {f"fusedaccum[{b}]": bench.FusedContender(wl, b) for b in backends}
    for variant in filter(None, args.variants.split(",")):
        backend, _, variant = variant.rpartition(":")
        backend = backend or backends[0]
        contenders[f"fusedaccum[{backend}] {variant}"] = _variant(wl, backend, variant)
    contenders["tutorial"] = bench.TutorialContender(wl)
    contenders["recipe"] = bench.RecipeContender(wl)
    defaults = {attr: getattr(tri, attr) for attr, _ in _TRITON_SETTINGS.values()}
    rng = random.Random(0)
    failed: dict[str, str] = {}  # a contender that raised: left out, the others go on
    try:
        with bench.gc_paused():
            for r in range(args.rounds + 2):
                order = [name for name in contenders if name not in failed]
                rng.shuffle(order)
                for name in order:
                    c = contenders[name]
                    _apply_settings(c, defaults)
                    t0 = clock.now()
                    try:
                        (run_ours if isinstance(c, bench.FusedContender) else run_peer)(c, clock)
                    except Exception as exc:  # noqa: BLE001 - reported in the table's place
                        failed[name] = f"round {r}: {type(exc).__name__}: {exc}"
                        clock.window.clear()
                        for key in [k for k in clock.times if k.startswith(f"{name}\t")]:
                            del clock.times[key]
                        continue
                    clock.add("window", clock.now() - t0)
                    if r >= 2:
                        clock.end_window(f"{name}\t")
                    else:
                        clock.window.clear()
    finally:
        _apply_settings(None, defaults)
    print(f"# window phases: {args.model} ({wl.model.tensors} tensors, {wl.numel / 1e6:.1f}M "
          f"params), {bench.device_name(dev)}, k={wl.k}, {args.rounds} rounds, "
          f"{'device synced after every phase' if args.sync else 'host time'}, batch flush "
          f"{acc_mod._flush_bytes(dev) / (1 << 20):g} MiB, C++ batching hook "
          f"{'on' if native.hooks_module(load=False) is not None else 'off'}"
          f"{', pre-made gradients' if args.premade_grads else ', fresh gradients'}")
    print("| contender | phase | median per window |")
    print("|---|---|---|")
    order = ["window", "backward x k (hooks, batches)", "backward x k (hooks)",
             _FLUSH_LABEL, _CXX_FLUSH_LABEL, _CXX_DIRECT_LABEL, *_CXX_COUNT_LABELS,
             "step() between boundaries",
             "zero_grad()", "boundary", "boundary (all)"]

    def rank(key):
        name, phase = key.split("\t")
        return name, order.index(phase) if phase in order else len(order)

    med = {key: statistics.median(v) for key, v in clock.times.items()}
    for name in contenders:
        parts = [v for key, v in med.items() if key.startswith(f"{name}\t boundary: ")]
        if parts and f"{name}\tboundary (all)" in med:
            med[f"{name}\t boundary: rest"] = med[f"{name}\tboundary (all)"] - sum(parts)
    for key in sorted(med, key=rank):
        name, phase = key.split("\t")
        value = f"{med[key]:g}" if phase.startswith("#") else bench.fmt_time(med[key])
        print(f"| {name} | {phase} | {value} |")
    for name, why in failed.items():
        print(f"| {name} | failed, left out | {why[:300]} |")
    if args.json:
        table: dict[str, dict[str, float]] = defaultdict(dict)
        for key, v in med.items():
            name, phase = key.split("\t")
            table[name][phase.strip()] = v
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    recipe = med.get("recipe\twindow")
    if recipe:  # the ratios the benchmark reports: of these medians, and round by round
        print("\n| contender | recipe window / its window | per round (quartiles) |"
              "\n|---|---|---|")
        for name in contenders:
            mine = med.get(name + "\twindow")
            if name.startswith("fusedaccum") and mine:
                # (every contender runs once per round: its window times line up)
                per_round = [p / o for p, o in zip(clock.times["recipe\twindow"],
                                                   clock.times[name + "\twindow"])]
                q1, q3 = bench.quartiles(per_round)
                print(f"| {name} | {recipe / mine:.2f}x | {statistics.median(per_round):.2f}x "
                      f"({q1:.2f}-{q3:.2f}) |")
    return contenders


if __name__ == "__main__":
    sys.exit(main())
