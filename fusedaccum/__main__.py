"""Command line: ``python -m fusedaccum info | demo | bench``.

* ``info``  -- versions, the default device, every backend and whether it runs here
  (or why not), and what ``backend="auto"`` picks for CPU and CUDA tensors.
* ``demo``  -- trains a small seeded MLP classifier: plain ``torch.optim.AdamW`` on one
  large batch of k*B per update (clipped with ``clip_grad_norm_``), and
  ``FusedAccumulator(AdamW, accumulation_steps=k, max_grad_norm=...)`` on k micro-batches
  of B (loss NOT divided by k), then again with bf16 (fp16 on GPUs without bf16) params
  and fp32 master weights. Prints the loss curves and grad norms side by side, time and
  peak memory per update, and exits 0 iff the curves agree (1 if not, 2 on bad usage).
* ``bench`` -- the microbenchmarks (``fusedaccum.bench.main``); arguments after
  ``bench`` are passed to it as a list of strings.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time

# Agreement tolerances for the demo (see _demo_tolerance for the reasoning).
FP32_RTOL = 1e-4
FP32_ATOL = 1e-5
HALF_TOL = {"bfloat16": 0.05, "float16": 0.02}  # relative to max(1, |loss|)


# --------------------------------------------------------------------------- info


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - python < 3.8
        return "unknown"
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import fusedaccum
    from fusedaccum import ops

    cuda = torch.cuda.is_available()
    print(f"fusedaccum {fusedaccum.__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    print(f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})")
    print(f"triton     {_dist_version('triton')}")
    if cuda:
        idx = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        print(f"device     cuda:{idx} {torch.cuda.get_device_name(idx)} "
              f"(sm_{cap[0]}{cap[1]}, {torch.cuda.device_count()} visible)")
    else:
        print(f"device     cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch "
              f"threads); no CUDA device")
    for var in ops.ENV_VARS:
        print(f"{var:<25}= {os.environ.get(var, '(unset)')}")

    print()
    print("checking backends (the first check may build the C++ extension: up to a few "
          "minutes)...", file=sys.stderr, flush=True)
    sys.stdout.flush()
    backends = fusedaccum.available_backends()
    print("backends:")
    width = max(len(n) for n in backends)
    for name, why in backends.items():
        status = "runs here" if why is None else f"does not run here: {why}"
        print(f"  {name:<{width}}  {status}")

    print()
    print('backend="auto" picks:')
    for dev in ("cpu", "cuda"):
        note = ""
        if dev == "cuda" and not cuda:
            note = "  (no CUDA device on this machine; shown for completeness)"
        try:
            picked = ops.resolve("auto", dev)
            if dev == "cuda" and cuda and picked == "cuda" \
                    and ops.unavailable_reason("triton", dev) is None:
                from fusedaccum.ops.auto import TRITON_FROM

                picked = (f"cuda, and triton for AdamW/SGD steps and fp32-grad accumulation "
                          f"of {TRITON_FROM // 2**20}M+ elements (measured faster there)")
        except Exception as exc:  # noqa: BLE001 - report, never crash `info`
            picked = f"error: {type(exc).__name__}: {exc}"
        print(f"  {dev:<4} tensors -> {picked}{note}")

    from fusedaccum import accumulator
    from fusedaccum.ops import native

    when = "before AccumulateGrad makes .grad" if accumulator._PRE_HOOK else "from .grad"
    hooks = (f"on (csrc/hooks.cpp: half gradients are taken {when}; small ones join their "
             "batch, larger ones and full batches are added, without a Python hook call)"
             if native.hooks_module(load=False)
             else "off (FUSEDACCUM_FAST_HOOKS=0, or the C++ extension is not built)")
    print(f"\nC++ extension: {native.build_info()}")
    print(f"C++ gradient hook: {hooks}")
    from fusedaccum.ops import triton as triton_ops

    state = native._load()
    launch = triton_ops.launch_summary(native.hooks_module(load=False) is not None,
                                       state.error is None and state.cuda)
    print(f"triton batch flushes on a GPU: {launch}")
    return 0


# --------------------------------------------------------------------------- demo


class _Progress:
    """tqdm when importable, else a plain carriage-return counter on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.n, self.enabled, self._bar = total, 0, enabled, None
        if not enabled or not sys.stderr.isatty():  # no bar in logs and pipes
            self.enabled = False
            return
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._bar = tqdm(total=total, unit="update", file=sys.stderr, leave=False,
                             dynamic_ncols=True)

    def set_description(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)
        self._desc = text

    def update(self) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
        else:
            desc = getattr(self, "_desc", "")
            sys.stderr.write(f"\r{desc} {self.n}/{self.total} updates")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


def _make_model(args, device, dtype):
    import torch

    torch.manual_seed(args.seed)  # identical initial weights for every run
    model = torch.nn.Sequential(
        torch.nn.Linear(args.features, args.hidden),
        torch.nn.GELU(),
        torch.nn.Linear(args.hidden, args.hidden),
        torch.nn.GELU(),
        torch.nn.Linear(args.hidden, args.classes),
    )
    return model.to(device=device, dtype=dtype)


def _make_data(args):
    """Synthetic, seeded classification data: labels from a random noisy teacher."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    n = args.steps * args.accumulation_steps * args.micro_batch
    x = torch.randn(n, args.features, generator=g)
    teacher = torch.randn(args.features, args.classes, generator=g)
    logits = x @ teacher + 0.5 * torch.randn(n, args.classes, generator=g)
    y = logits.argmax(dim=1)
    kb = args.accumulation_steps * args.micro_batch
    return x.view(args.steps, kb, args.features), y.view(args.steps, kb)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(kind, args, device, data, progress, dtype_name="float32"):
    """One training run. Returns a dict of per-update losses, grad norms, timings, memory."""
    import torch
    import torch.nn.functional as F

    import fusedaccum

    dtype = getattr(torch, dtype_name)
    model = _make_model(args, device, dtype)
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    k, b = args.accumulation_steps, args.micro_batch
    protocol_errors: list[str] = []
    if kind == "plain":
        opt = inner
    else:
        kwargs = dict(accumulation_steps=k, max_grad_norm=args.max_grad_norm,
                      backend=args.backend)
        if dtype_name != "float32":
            kwargs["master_weights"] = True
            if dtype_name == "float16":
                kwargs["loss_scale"] = "dynamic"
        opt = fusedaccum.FusedAccumulator(inner, **kwargs)

    xs, ys = data
    losses, norms, times = [], [], []
    if device.type == "cuda":
        gc.collect()  # the previous run's tensors must not count in this run's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        if kind == "plain":
            x = xs[step].to(device=device, dtype=dtype)
            y = ys[step].to(device)
            loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            if args.max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            else:
                # max_norm=inf: returns the total norm and leaves the grads unchanged
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)
            opt.step()
            opt.zero_grad()
            step_loss = loss.detach()
        else:
            step_loss = torch.zeros((), device=device)
            for j in range(k):
                if opt.micro_step != j or opt.accumulation_boundary != (j == k - 1):
                    protocol_errors.append(
                        f"update {step} micro-batch {j}: micro_step={opt.micro_step}, "
                        f"accumulation_boundary={opt.accumulation_boundary}")
                x = xs[step, j * b:(j + 1) * b].to(device=device, dtype=dtype)
                y = ys[step, j * b:(j + 1) * b].to(device)
                loss = F.cross_entropy(model(x).float(), y)  # NOT divided by k
                opt.scale_loss(loss).backward()
                skipped_before = opt.skipped_steps
                opt.step()
                opt.zero_grad()
                # a boundary applies the update, unless the window was non-finite and
                # skipped (possible with fp16 and a dynamic loss scale)
                expect = j == k - 1 and opt.skipped_steps == skipped_before
                if opt.stepped != expect:
                    protocol_errors.append(
                        f"update {step} micro-batch {j}: stepped={opt.stepped}")
                step_loss = step_loss + loss.detach()
            step_loss = step_loss / k
            norm = opt.grad_norm.detach().clone()
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(step_loss)
        norms.append(norm.detach().float())
        progress.update()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if kind != "plain":
        if opt.update_count + opt.skipped_steps != args.steps:
            protocol_errors.append(f"update_count={opt.update_count} + skipped_steps="
                                   f"{opt.skipped_steps}, expected {args.steps} windows")
        if opt.skipped_steps and dtype_name != "float16":
            protocol_errors.append(f"skipped_steps={opt.skipped_steps}, expected 0")
        elif opt.skipped_steps:
            protocol_errors.append(f"{opt.skipped_steps} window(s) skipped as non-finite "
                                   f"(fp16 loss scale settling); the curves are shifted")
    steady = times[1:] if len(times) > 1 else times  # the first update includes warm-up
    return {
        "loss": [float(v) for v in torch.stack(losses).cpu()],
        "norm": [float(v) for v in torch.stack(norms).cpu()],
        "ms": 1e3 * statistics.median(steady),
        "peak": peak,
        "errors": protocol_errors,
    }


def _demo_tolerance(ref: float, dtype_name: str) -> float:
    """Allowed |loss difference| at one update.

    fp32 vs fp32: both runs see the same samples and the same math; they differ only in
    the order in which fp32 gradients are summed (k partial sums of B, then / k, versus
    one sum of k*B) and in how the clip norm is reduced, i.e. a few ulp (~1e-7
    relative) per update. AdamW divides by sqrt(v), so such differences are not
    damped but they stay far below 1e-4 relative over a demo's few dozen updates,
    while a wrong divisor, a lost micro-batch, a skipped or doubled update moves the
    loss by 1e-3..1e-1. Hence 1e-5 + 1e-4 * |loss|.

    bf16/fp16 params vs fp32: the forward and backward run in a 8-bit (bf16) or
    11-bit (fp16) mantissa, so each loss carries ~2^-8 (resp. 2^-11) relative noise
    that compounds through the layers; fp32 master weights keep the updates from
    stalling, which is what the looser HALF_TOL checks (5% / 2% of max(1, |loss|)).
    """
    if dtype_name == "float32":
        return FP32_ATOL + FP32_RTOL * abs(ref)
    return HALF_TOL[dtype_name] * max(1.0, abs(ref))


def _fmt_mem(peak) -> str:
    return "n/a" if peak is None else f"{peak / 2**20:.2f} MiB"


class _NoProgress:
    def update(self, n=1):
        pass


def _cpu_peak(kind, args, device, data, dtype_name) -> int | None:
    """Peak CPU tensor bytes of a run, from a separate run of at most 2 updates under
    torch.profiler (profile_memory=True; its overhead would spoil the timed run's times):
    from before the model is made, so params, accumulators, masters, optimizer state and
    activations all count, as torch.cuda.max_memory_allocated counts them on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    from fusedaccum import bench

    short = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 2)})
    gc.collect()
    try:
        with bench._QuietStderr(), profile(activities=[ProfilerActivity.CPU],
                                           profile_memory=True) as prof:
            _run(kind, short, device, data, _NoProgress(), dtype_name)
        return bench.cpu_peak_allocated(prof)
    except Exception:  # noqa: BLE001 - a profiler that cannot run here: no figure
        return None


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    import fusedaccum
    from fusedaccum import ops

    if min(args.steps, args.accumulation_steps, args.micro_batch, args.hidden,
           args.features) < 1 or (args.threads is not None and args.threads < 1):
        print("error: --steps, --accumulation-steps, --micro-batch, --hidden, --features and "
              "--threads must be >= 1", file=sys.stderr)
        return 2
    if args.classes < 2:
        print("error: --classes must be >= 2", file=sys.stderr)
        return 2
    if not (math.isfinite(args.lr) and args.lr > 0) or not (
            math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        print("error: --lr must be a finite number > 0 and --weight-decay a finite number "
              ">= 0", file=sys.stderr)
        return 2
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            print(f"error: --device {args.device!r}: {exc}", file=sys.stderr)
            return 2
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda requested but torch sees no CUDA device",
                  file=sys.stderr)
            return 2
        if device.type not in ("cpu", "cuda"):
            print(f"error: --device {args.device!r}: the demo runs on cpu or cuda",
                  file=sys.stderr)
            return 2
    if not hasattr(fusedaccum, "FusedAccumulator"):
        print("error: this build of fusedaccum has no FusedAccumulator yet", file=sys.stderr)
        return 2
    try:
        backend = ops.resolve(args.backend, device)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        # The model is tiny: intra-op threads do not speed it up, and on a shared
        # machine OpenMP's waits make the timings hostage to other processes.
        torch.set_num_threads(1)

    half = args.half
    if half == "auto":
        if device.type == "cuda":
            half = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            half = "bfloat16"  # ~2 ms/update on one core for this model (fp16: ~30x slower)
    half = {"bf16": "bfloat16", "fp16": "float16"}.get(half, half)

    k, b = args.accumulation_steps, args.micro_batch
    clip = "off" if args.max_grad_norm is None else f"{args.max_grad_norm:g}"
    print(f"fusedaccum demo on {device} (backend {args.backend!r} -> {backend}): "
          f"MLP {args.features}-{args.hidden}-{args.hidden}-{args.classes}, "
          f"AdamW lr={args.lr:g} wd={args.weight_decay:g}, clip={clip}, "
          f"{args.steps} updates of k={k} x B={b} = {k * b} samples, seed {args.seed}, "
          f"{torch.get_num_threads()} CPU thread(s)")
    data = _make_data(args)

    runs = [("plain", "float32", f"AdamW, batch {k * b}"),
            ("fused", "float32", f"Fused k={k}x{b}")]
    if half != "none":
        short = {"bfloat16": "bf16", "float16": "fp16"}[half]
        runs.append(("fused", half, f"Fused {short}+master"))
    progress = _Progress(args.steps * len(runs), enabled=not args.no_progress)
    results = []
    try:
        for kind, dtype_name, label in runs:
            progress.set_description(label)
            res = _run(kind, args, device, data, progress, dtype_name)
            if device.type == "cpu":
                res["peak"] = _cpu_peak(kind, args, device, data, dtype_name)
            results.append((label, dtype_name, res))
    finally:
        progress.close()

    base = results[0][2]
    # ---- loss table
    cols = [label for label, _, _ in results]
    header = f"{'update':>6} | " + " | ".join(f"{c:>20}" for c in cols)
    header += f" | {'|fused-plain|':>13} | {'grad norm plain':>15} | {'fused':>9}"
    print()
    print("loss per update (mean over the update's k*B samples, before the update) and the "
          "total grad norm before clipping")
    print(header)
    print("-" * len(header))
    n = args.steps
    rows = list(range(n)) if n <= 25 else sorted(set(range(0, n, max(1, n // 20))) | {n - 1})
    for i in rows:
        line = f"{i + 1:>6} | " + " | ".join(f"{r['loss'][i]:>20.6f}" for _, _, r in results)
        line += f" | {abs(results[1][2]['loss'][i] - base['loss'][i]):>13.2e}"
        line += f" | {base['norm'][i]:>15.4f} | {results[1][2]['norm'][i]:>9.4f}"
        print(line)
    if len(rows) < n:
        print(f"({len(rows)} of {n} updates shown)")

    # ---- agreement
    print()
    agree = True
    for label, dtype_name, res in results[1:]:
        diffs = [abs(a - r) for a, r in zip(res["loss"], base["loss"])]
        worst = max(range(n), key=lambda i: diffs[i] - _demo_tolerance(base["loss"][i],
                                                                        dtype_name))
        ok = all(d <= _demo_tolerance(r, dtype_name) and math.isfinite(a)
                 for d, r, a in zip(diffs, base["loss"], res["loss"]))
        tol_desc = (f"{FP32_ATOL:g} + {FP32_RTOL:g}*|loss|" if dtype_name == "float32"
                    else f"{HALF_TOL[dtype_name]:g}*max(1,|loss|)")
        print(f"{label:>20} vs plain: max |loss diff| {max(diffs):.3e} "
              f"(tolerance {tol_desc}; tightest at update {worst + 1}) -> "
              f"{'ok' if ok else 'MISMATCH'}")
        if dtype_name == "float32":
            ndiff = [abs(a - r) / max(1e-12, abs(r)) for a, r in zip(res["norm"], base["norm"])]
            nok = all(d <= 1e-4 for d in ndiff)  # (a NaN fails; max() could skip it)
            print(f"{'':>20}  grad norm per update (plain clip_grad_norm_ vs opt.grad_norm): "
                  f"max rel diff {max(ndiff):.3e} (tolerance 1e-4) -> "
                  f"{'ok' if nok else 'MISMATCH'}")
            ok = ok and nok
        for err in res["errors"][:5]:
            print(f"{'':>20}  wrapper protocol: {err}")
        if res["errors"]:
            ok = False
        agree = agree and ok
    first, last = base["loss"][0], base["loss"][-1]
    print(f"{'':>20}  (plain loss went {first:.4f} -> {last:.4f} over {n} updates)")

    # ---- cost
    print()
    print(f"{'run':>20} | {'time/update (median)':>20} | {'peak memory/update':>18}")
    for label, _, res in results:
        print(f"{label:>20} | {res['ms']:>17.2f} ms | {_fmt_mem(res['peak']):>18}")
    if device.type == "cpu":
        print("  peak = the most CPU tensor bytes allocated at once in a separate run of at "
              "most 2 updates under torch.profiler(profile_memory=True), counted from before "
              "the model was made: params, grads, accumulators, master weights, optimizer "
              "state and activations")
    else:
        print("  peak = torch.cuda.max_memory_allocated over the run's updates: that run's "
              "params, grads, accumulators, master weights, optimizer state and activations")

    print()
    if agree:
        print("RESULT: the loss curves agree: accumulating k micro-batches with "
              "FusedAccumulator matches one large batch.")
        return 0
    print("RESULT: the loss curves do NOT agree (see MISMATCH above).")
    return 1


# --------------------------------------------------------------------------- bench


def _cmd_bench(bench_args: list[str]) -> int:
    import importlib

    try:
        bench = importlib.import_module("fusedaccum.bench")
    except ModuleNotFoundError as exc:
        if exc.name == "fusedaccum.bench":
            print("error: the benchmarks (fusedaccum/bench.py) are not part of this build "
                  "of fusedaccum yet", file=sys.stderr)
            return 2
        raise
    rc = bench.main(list(bench_args))
    return 0 if rc is None else int(rc)


# --------------------------------------------------------------------------- main


def _positive_float_or_none(text: str):
    """--max-grad-norm: a number > 0 (as the wrapper takes it), or 'none'/'off'. (0 was
    read as 'off' while 0.0 was refused, and the wrapper refuses 0.)"""
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, or 'none' for no clipping, "
                                         f"got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fusedaccum",
        description="fusedaccum: fused gradient accumulation, clipping and optimizer steps.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{info,demo,bench}")
    sub.required = True

    p = sub.add_parser("info", help="versions, devices and which backends run here")
    p.set_defaults(func=_cmd_info, parser=p)

    p = sub.add_parser(
        "demo",
        help="train a small model with and without accumulation; check the curves agree",
        description="Train a small seeded MLP with plain AdamW on batches of k*B and with "
                    "FusedAccumulator on k micro-batches of B; exit 0 iff the curves agree.",
    )
    p.add_argument("--steps", type=int, default=30, help="optimizer updates (default 30)")
    p.add_argument("-k", "--accumulation-steps", type=int, default=4,
                   help="micro-batches per update (default 4)")
    p.add_argument("-b", "--micro-batch", type=int, default=32,
                   help="samples per micro-batch (default 32)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--backend", default="auto",
                   help="fusedaccum backend: auto, reference, triton, cuda, cpu (default auto)")
    p.add_argument("--half", default="auto",
                   choices=["auto", "none", "bf16", "fp16", "bfloat16", "float16"],
                   help="also run with half params + fp32 master weights (default: bf16, "
                        "or fp16 on GPUs without bf16; 'none' to skip)")
    p.add_argument("--max-grad-norm", type=_positive_float_or_none, default=1.0,
                   help="clip threshold for both runs, or 'none' (default 1.0)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU, where the model is too small "
                        "to gain from more; torch's default otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo, parser=p)

    # `bench` is dispatched in main() before parsing: everything after it, options
    # included, goes to fusedaccum.bench.main unchanged. Listed here for --help only.
    sub.add_parser("bench", help="microbenchmarks (fusedaccum.bench; --quick: under a minute; "
                                 "`bench -h` for its options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _cmd_bench(argv[1:])
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # named by the subcommand's own usage, not the top level's
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
