"""Host time per param of the wrapper's gradient hooks: what a backward of many small half
params costs with the C++ hook, with the Python hook, and with neither (plain autograd).

    python bench/hook_costs.py [--device cuda] [--params 148] [--numel 64] [--rounds 30]

Windows of many small tensors (GPT-2's 148) are bound by host time per param, not by
bytes (README, "Where the targets stand"): this isolates that cost. Each contender runs
micro-batches of one backward from one scalar root (the benchmark harness,
``fusedaccum.bench._backward``) plus ``opt.step()`` (never a boundary: the window is
longer than the run), over ``--params`` bf16 params of ``--numel`` elements:

* ``plain autograd``: no wrapper; ``p.grad = None`` after each backward;
* ``C++ hook`` / ``Python hook`` (``FUSEDACCUM_FAST_HOOKS=0``): the wrapper, batching the
  gradients and flushing at the end of each backward;
* ``... flush per grad``: the batch limit at 1 byte, so every gradient fills its batch
  and is flushed at once (by the C++ hook, or in Python);
* ``C++ hook after AccumulateGrad``: the C++ hook without its tensor pre-hook
  (``accumulator._PRE_HOOK``): AccumulateGrad makes each ``.grad`` and the
  post-accumulate-grad hook takes it.

Each backward hands every param a new copy of its gradient, as a model's backward makes
fresh gradients (``bench._Deliver.fresh``: the copies are made in the backward, for every
contender). ``--premade-grads`` hands the same tensors every time instead: AccumulateGrad
then copies each (it cannot take a gradient someone else holds), except where the C++
hook takes it before AccumulateGrad.

Rows: the median over shuffled rounds of the host time of one micro-batch, divided by
the number of params, and that minus the plain-autograd row: the hook's own cost per
param. ``--out DIR`` also writes ``<device>_<date>_hook_costs.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import random
import statistics
import sys
import time

import torch

from fusedaccum import bench
from fusedaccum.accumulator import FusedAccumulator


class _Plain:
    def __init__(self, params):
        self.params = params

    def micro_batch(self, grads):
        bench._backward(self.params, grads)
        for p in self.params:
            p.grad = None


class _Wrapped:
    def __init__(self, params, backend, fast: bool, flush_bytes: int | None,
                 pre_hook: bool = True):
        self.params = params
        with bench.hook_settings(fast, flush_bytes, pre_hook=pre_hook):
            self.opt = FusedAccumulator(torch.optim.SGD(params, lr=1e-3),
                                        accumulation_steps=1 << 30, backend=backend)

    def micro_batch(self, grads):
        bench._backward(self.params, grads)
        self.opt.step()


def contenders(device: torch.device, backend: str, n_params: int, numel: int) -> dict:
    def params():
        return [torch.zeros(numel, dtype=torch.bfloat16, device=device, requires_grad=True)
                for _ in range(n_params)]

    out = {"plain autograd": _Plain(params())}
    for fast, label in ((True, "C++ hook"), (False, "Python hook")):
        out[label] = _Wrapped(params(), backend, fast, None)
        out[f"{label}, flush per grad"] = _Wrapped(params(), backend, fast, 1)
    out["C++ hook after AccumulateGrad"] = _Wrapped(params(), backend, True, None, False)
    return out


def measure(device, backend, n_params, numel, rounds, seed=0) -> dict:
    grads = [torch.randn(numel, device=device).to(torch.bfloat16) for _ in range(n_params)]
    cs = contenders(device, backend, n_params, numel)
    for c in cs.values():  # warm-up
        for _ in range(3):
            c.micro_batch(grads)
    bench.sync(device)
    times = {name: [] for name in cs}
    names = list(cs)
    rng = random.Random(seed)
    with bench.gc_paused():
        for _ in range(rounds):
            rng.shuffle(names)
            for name in names:
                bench.sync(device)
                t0 = time.perf_counter()
                cs[name].micro_batch(grads)
                times[name].append(time.perf_counter() - t0)
    bench.sync(device)
    return {name: statistics.median(ts) / n_params for name, ts in times.items()}


def report(device, backend, n_params, numel, rounds, per_param: dict) -> str:
    base = per_param["plain autograd"]
    grads = "fresh gradients" if bench._Deliver.fresh else "gradients made once"
    lines = [f"### host time per param of one micro-batch (backward + step()): {n_params} bf16 "
             f"params of {numel} elements, {bench.device_name(device)}, backend {backend!r}, "
             f"{grads}, {rounds} rounds",
             "| contender | per param | over plain autograd |", "|---|---|---|"]
    for name, t in per_param.items():
        extra = "" if name == "plain autograd" else bench.fmt_time(t - base)
        lines.append(f"| {name} | {bench.fmt_time(t)} | {extra} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="default: cuda on CUDA, else cpu")
    ap.add_argument("--params", type=int, default=148)
    ap.add_argument("--numel", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--premade-grads", action="store_true",
                    help="hand every backward the same gradients (AccumulateGrad copies them)")
    ap.add_argument("--out", default=None, help="directory for <device>_<date>_hook_costs.md")
    args = ap.parse_args(argv)
    bench._Deliver.fresh = not args.premade_grads
    device = torch.device(args.device)
    backend = args.backend or ("cuda" if device.type == "cuda" else "cpu")
    per_param = measure(device, backend, args.params, args.numel, args.rounds)
    text = report(device, backend, args.params, args.numel, args.rounds, per_param)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        now = _dt.datetime.now()
        path = os.path.join(args.out, f"{bench.sanitize(bench.device_name(device))}_"
                            f"{now.date().isoformat()}_hook_costs.md")
        with open(path, "w") as f:
            f.write(f"# Hook costs\n\n- date: {now:%Y-%m-%d %H:%M}\n- torch {torch.__version__}"
                    f"\n- command: `python bench/hook_costs.py {' '.join(argv or sys.argv[1:])}`"
                    f"\n\n{text}\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
