"""`python -m fusedaccum info | demo | bench` in subprocesses, as a user runs them."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import fusedaccum

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600, env=None):
    full_env = dict(os.environ)
    # The package under test, whether or not it is installed.
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), full_env.get("PYTHONPATH")) if p
    )
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fusedaccum", *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def _explain(proc):
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_info_lists_every_backend():
    proc = _run("info")
    assert proc.returncode == 0, _explain(proc)
    out = proc.stdout
    assert "torch" in out and "triton" in out
    backends = fusedaccum.available_backends()
    assert "\nbackends:\n" in out, out
    lines = out.split("\nbackends:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    for name in backends:
        line = next((ln for ln in lines if ln.split()[:1] == [name]), None)
        assert line is not None, f"backend {name!r} missing from info:\n{out}"
        # Whether the native backends run can change between two processes while the
        # C++ extension is being (re)built, so only the form is checked here.
        assert line.split(None, 1)[1].startswith(("runs here", "does not run here: ")), line
    ref_line = next(ln for ln in lines if ln.split()[:1] == ["reference"])
    assert "runs here" in ref_line and "does not" not in ref_line, ref_line
    assert "\nC++ gradient hook: o" in out, out
    assert "\ntriton batch flushes on a GPU: '" in out, out
    # what "auto" picks, as the registry resolves it in this process (where the same
    # backends run; see above)
    runs = {ln.split()[0] for ln in lines if ln.split(None, 1)[1].startswith("runs here")}
    if runs == {name for name, why in backends.items() if why is None}:
        for dev in ("cpu", "cuda"):
            want = fusedaccum.ops.resolve("auto", dev)
            line = next(ln for ln in out.splitlines() if ln.startswith(f"  {dev:<4} tensors -> "))
            assert line.split(" -> ", 1)[1].startswith(want), (dev, want, line)


def test_info_names_the_cpp_build_and_its_cpu_instruction_set(capsys):
    """README "What works today": `python -m fusedaccum info` lists the C++ build and its
    CPU instruction set: its "C++ extension:" line is the loader's account (how the
    extension was loaded, its kernels, the instruction set of its CPU loops as the
    library reports it), or why it did not load. (In-process: the same loader state.)"""
    import torch

    from fusedaccum import __main__ as cli
    from fusedaccum.ops import native

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    line = next((ln for ln in out.splitlines() if ln.startswith("C++ extension: ")), None)
    assert line == f"C++ extension: {native.build_info()}", out
    if native.unavailable_reason("cpu", None) is None:  # (built: its loops' set is named)
        isa = next(f.split("=", 1)[1] for f in
                   torch.ops.fusedaccum_native.build_info().split(",") if f.startswith("cpu-isa="))
        assert isa in ("avx512", "avx2", "baseline") and line.endswith(f"CPU loops: {isa})"), \
            line


def test_info_survives_a_bad_backend_override():
    proc = _run("info", env={"FUSEDACCUM_BACKEND": "no-such-backend"})
    assert proc.returncode == 0, _explain(proc)
    assert "error: RuntimeError" in proc.stdout


def test_info_lists_the_environment_and_says_why_the_extension_did_not_build(tmp_path):
    """README "Backends": `python -m fusedaccum info` lists the environment variables of
    the README's table (with the value of each one set), and where the first-use build of
    the C++ extension failed (no compiler), says why the cpu backend does not run."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Backends\n", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_]+)=", section, re.M))
    assert documented == set(fusedaccum.ops.ENV_VARS), documented
    proc = _run("info", env={"FUSEDACCUM_NATIVE": "jit", "FUSEDACCUM_CPU_ISA": "baseline",
                             "CXX": str(tmp_path / "no-such-c++"),
                             "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert proc.returncode == 0, _explain(proc)
    out = proc.stdout
    for var in fusedaccum.ops.ENV_VARS:
        assert re.search(rf"^{var}\s*= ", out, re.M), f"{var} missing from info:\n{out}"
    assert re.search(r"^FUSEDACCUM_CPU_ISA\s*= baseline$", out, re.M), out
    lines = out.split("\nbackends:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    cpu = next(ln for ln in lines if ln.split()[:1] == ["cpu"])
    assert "does not run here: " in cpu and "no C++ compiler found" in cpu, cpu


def test_demo_curves_agree():
    proc = _run("demo", "--steps", "6", "--accumulation-steps", "3", "--micro-batch", "8",
                "--no-progress")
    assert proc.returncode == 0, _explain(proc)
    out = proc.stdout
    assert "RESULT: the loss curves agree" in out, _explain(proc)
    assert "MISMATCH" not in out
    assert "time/update" in out
    # one table row per update (<= 25 updates are all shown)
    rows = [int(m.group(1)) for m in re.finditer(r"^\s*(\d+) \|", out, re.MULTILINE)]
    assert rows == list(range(1, 7)), out
    # peak memory per update, on CPU too (from a profiled run)
    peaks = re.findall(r"\| +([\d.]+) MiB$", out, re.MULTILINE)
    assert len(peaks) == 3 and all(float(p) > 0 for p in peaks), out


def test_demo_and_bench_refuse_bad_arguments_cleanly(tmp_path):
    not_a_folder = tmp_path / "a file"
    not_a_folder.write_text("")
    bad = [("demo", "--device", "xpu"), ("demo", "--device", "nonsense"),
           ("demo", "--threads", "0"), ("demo", "--lr", "nan"), ("demo", "--classes", "0"),
           # (0 was read as no clipping, 0.0 refused; the wrapper refuses 0)
           ("demo", "--max-grad-norm", "0"), ("demo", "--max-grad-norm", "abc"),
           ("bench", "--quick", "--backends", "nope"), ("bench", "--quick", "--device", "foo"),
           ("bench", "--quick", "--ops", "nope"), ("bench", "--quick", "--budget", "nan"),
           ("bench", "--quick", "--out", str(not_a_folder / "reports"))]
    if fusedaccum.ops.unavailable_reason("cuda", None) is not None:
        bad.append(("bench", "--quick", "--backends", "cuda"))  # nothing that runs: refused
    # (side by side, as many at a time as there are cores: each process spends seconds
    # importing torch)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        procs = list(pool.map(lambda args: _run(*args, "--no-progress", timeout=120), bad))
    for args, proc in zip(bad, procs):
        assert proc.returncode == 2, (args, _explain(proc))
        assert "Traceback" not in proc.stderr and proc.stderr.strip(), _explain(proc)


def test_no_command_or_a_bad_max_grad_norm_is_a_usage_error(capsys):
    """Bad usage exits 2 with argparse's message, in-process: no subcommand at all, and
    a --max-grad-norm the wrapper would refuse (0, negative, NaN, not a number)."""
    from fusedaccum import __main__ as cli

    for argv in ([], ["demo", "--max-grad-norm", "nan"], ["demo", "--max-grad-norm", "-1"],
                 ["demo", "--max-grad-norm", "0.0"], ["demo", "--max-grad-norm", "x"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv
        assert "usage: python -m fusedaccum" in capsys.readouterr().err, argv
    assert cli.build_parser().parse_args(["demo", "--max-grad-norm", "off"]).max_grad_norm is None
    assert cli.build_parser().parse_args(["demo", "--max-grad-norm", "inf"]).max_grad_norm \
        == math.inf


def test_bench_import_errors_other_than_its_own_absence_propagate(monkeypatch, capsys):
    """`bench` without fusedaccum/bench.py says so and exits 2; a dependency of the
    benchmarks that is missing is raised as it is, not taken for a build without them."""
    import importlib

    from fusedaccum import __main__ as cli

    def missing(name):
        def import_module(module, *args):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return import_module

    monkeypatch.setattr(importlib, "import_module", missing("fusedaccum.bench"))
    assert cli.main(["bench", "--quick"]) == 2
    assert "not part of this build" in capsys.readouterr().err
    monkeypatch.setattr(importlib, "import_module", missing("matplotlib"))
    with pytest.raises(ModuleNotFoundError, match="matplotlib"):
        cli.main(["bench", "--quick"])


@pytest.mark.parametrize("command", ["info", "demo"])
def test_unknown_option_is_named_with_its_subcommand_usage(command):
    """`info --bogus` printed the top-level usage, as if `info` were not understood."""
    proc = _run(command, "--bogus", timeout=120)
    assert proc.returncode == 2, _explain(proc)
    assert f"usage: python -m fusedaccum {command}" in proc.stderr, _explain(proc)
    assert "unrecognized arguments: --bogus" in proc.stderr, _explain(proc)


def test_bench_refuses_a_max_buffer_sets_below_one(tmp_path):
    """--max-buffer-sets 0 meant the default (4096 sets) and -1 started timing; both exit
    with status 2 before anything is timed, as the other bad flags do. (The flags around
    it keep the run tiny, should it ever start.)"""
    for value in ("0", "-1"):
        out = tmp_path / value
        proc = _run("bench", "--quick", "--ops", "none", "--no-windows", "--copy-size", "1K",
                    "--no-plot", "--no-progress", "--device", "cpu", "--out", str(out),
                    "--max-buffer-sets", value, timeout=300)
        assert proc.returncode == 2, _explain(proc)
        assert f"bench: --max-buffer-sets must be at least 1, got {value}" in proc.stderr, \
            _explain(proc)
        assert "Traceback" not in proc.stderr and not out.exists(), _explain(proc)


def test_bench_keeps_an_earlier_report_of_the_same_day(tmp_path):
    """A second run on the same day writes its own report (named with the time) instead
    of overwriting the first one, which the README may cite (README "What works today":
    the next one gets the time in its name)."""
    args = ("bench", "--quick", "--ops", "none", "--no-windows", "--copy-size", "1M",
            "--no-plot", "--no-progress", "--device", "cpu", "--out", str(tmp_path))
    for _ in range(2):
        proc = _run(*args, timeout=300)
        assert proc.returncode == 0, _explain(proc)
    reports = sorted(p.name for p in tmp_path.glob("*.md"))
    assert len(reports) == 2 and all(r.endswith("_quick.md") for r in reports), reports
    first, second = sorted(reports, key=len)
    assert re.fullmatch(re.escape(first[:-len("_quick.md")]) + r"_\d{6}_quick\.md", second), \
        reports  # (the first one's name, and the time as HHMMSS)


def test_demo_rejects_a_backend_that_cannot_run():
    # the cuda backend never runs on CPU tensors, so there is always one to reject here
    unavailable = [n for n in fusedaccum.ops.BACKENDS
                   if fusedaccum.ops.unavailable_reason(n, "cpu") is not None]
    assert "cuda" in unavailable
    proc = _run("demo", "--steps", "1", "--backend", unavailable[0], "--device", "cpu",
                "--no-progress")
    assert proc.returncode == 2, _explain(proc)
    assert unavailable[0] in proc.stderr


def test_bench_dispatch():
    proc = _run("bench", "--help")
    try:
        import fusedaccum.bench  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "fusedaccum.bench":
            raise
        assert proc.returncode == 2, _explain(proc)
        assert "not part of this build" in proc.stderr
    else:
        # argparse's --help exits 0; anything but a traceback is acceptable here
        assert "Traceback" not in proc.stderr, _explain(proc)


# the demo's verdict on made-up curves (its training runs replaced), in-process
_LOSS, _NORM = [2.3, 2.0, 1.7, 1.5], [3.0, 2.5, 2.0, 1.8]


def _demo_verdict(monkeypatch, capsys, loss=None, norm=None, errors=None, plain=None,
                  half="bf16"):
    """Exit status and stdout of `demo` whose plain run gives _LOSS and _NORM (or ``plain``:
    a (loss, norm) pair) and whose fused runs give those, but for ``loss``/``norm``/``errors``
    keyed by dtype name."""
    import torch

    from fusedaccum import __main__ as cli

    base_loss, base_norm = plain or (_LOSS, _NORM)

    def run(kind, args, device, data, progress, dtype_name="float32"):
        fused = kind != "plain"
        return {"loss": list((loss or {}).get(dtype_name, base_loss) if fused else base_loss),
                "norm": list((norm or {}).get(dtype_name, base_norm) if fused else base_norm),
                "ms": 1.0, "peak": None,
                "errors": list((errors or {}).get(dtype_name, [])) if fused else []}

    monkeypatch.setattr(cli, "_run", run)
    monkeypatch.setattr(cli, "_cpu_peak", lambda *a: None)
    rc = cli.main(["demo", "--steps", str(len(base_loss)), "-k", "2", "-b", "2", "--device",
                   "cpu", "--half", half, "--threads", str(torch.get_num_threads()),
                   "--no-progress"])
    return rc, capsys.readouterr().out


def _off(values, i, by):
    return [v + by if j == i else v for j, v in enumerate(values)]


def test_demo_exits_1_when_the_curves_disagree(monkeypatch, capsys):
    """The demo's verdict, not only its agreeing case: a fused fp32 loss 1e-3 relative off
    at one update (the size of a lost micro-batch or a wrong divisor, per _demo_tolerance),
    a grad norm 1e-3 relative off, a bf16 loss 0.2 off (tolerance 0.05 x 2.0 there), a
    NaN, or a wrapper protocol error each make it exit 1; differences within the
    tolerances (1e-6 relative in fp32, 0.05 in bf16) exit 0."""
    rc, out = _demo_verdict(monkeypatch, capsys)
    assert rc == 0 and "RESULT: the loss curves agree" in out and "MISMATCH" not in out, out
    for ok in (dict(loss={"float32": _off(_LOSS, 2, 1.7e-6)}),
               dict(norm={"float32": _off(_NORM, 1, 2.5e-6)}),
               dict(loss={"bfloat16": _off(_LOSS, 1, 0.05)})):
        rc, out = _demo_verdict(monkeypatch, capsys, **ok)
        assert rc == 0 and "MISMATCH" not in out, (ok, out)
    for bad in (dict(loss={"float32": _off(_LOSS, 2, 1.7e-3)}),
                dict(norm={"float32": _off(_NORM, 1, 2.5e-3)}),
                dict(loss={"bfloat16": _off(_LOSS, 1, 0.2)}),
                dict(loss={"float32": _off(_LOSS, 3, math.nan)}),
                dict(norm={"float32": _off(_NORM, 2, math.nan)}),  # (not the first)
                dict(errors={"float32": ["update 0 micro-batch 1: stepped=False"]})):
        rc, out = _demo_verdict(monkeypatch, capsys, **bad)
        assert rc == 1, (bad, out)
        assert "RESULT: the loss curves do NOT agree" in out, (bad, out)
        assert "MISMATCH" in out or "wrapper protocol: update 0" in out, (bad, out)


# (a second mutation audit of __main__.py: the tolerances' other terms, the usage checks,
# the reported time per update and the wrapper protocol checks)


def test_demo_tolerances_at_small_losses_large_norms_and_in_fp16(monkeypatch, capsys):
    """fp32: 1e-5 + 1e-4 x |loss|, so at a loss of 0.01 a difference of 5e-5 is a mismatch;
    bf16: 5% of max(1, |loss|), so 0.04 at a loss of 0.5 agrees; the grad norm is compared
    relatively (5e-5 of 1000 agrees); fp16 (--half fp16): 2%, so 0.035 at 1.5 is a mismatch
    and 0.025 agrees."""
    small = ([0.5, 0.3, 0.1, 0.01], [1000.0, 800.0, 600.0, 500.0])
    for kw, want in ((dict(loss={"float32": _off(small[0], 3, 5e-5)}), 1),
                     (dict(loss={"bfloat16": _off(small[0], 0, 0.04)}), 0),
                     (dict(norm={"float32": _off(small[1], 1, 0.04)}), 0),
                     (dict(norm={"float32": _off(small[1], 1, 0.4)}), 1)):
        rc, out = _demo_verdict(monkeypatch, capsys, plain=small, **kw)
        assert rc == want, (kw, out)
    for off, want in ((0.035, 1), (0.025, 0)):
        rc, out = _demo_verdict(monkeypatch, capsys, half="fp16",
                                loss={"float16": _off(_LOSS, 3, off)})
        assert "Fused fp16+master vs plain" in out and rc == want, (off, out)
    rc, out = _demo_verdict(monkeypatch, capsys, norm={"float32": _off(_NORM, 0, 1.5e-3)})
    assert rc == 1, out  # (5e-4 relative)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["-k", "0"], ["-b", "0"], ["--hidden", "0"],
                                  ["--features", "0"], ["--classes", "1"], ["--lr", "0"],
                                  ["--lr=-1e-3"], ["--lr", "inf"], ["--weight-decay=-0.1"],
                                  ["--weight-decay", "nan"]])
def test_demo_refuses_sizes_and_hyperparameters_that_prove_nothing(argv, capsys):
    """Exit 2 before any training: no update, micro-batch or class to compare, or an lr of
    0 (the curves would agree without a single update)."""
    from fusedaccum import __main__ as cli

    assert cli.main(["demo", "--device", "cpu", "--no-progress", *argv]) == 2
    assert "error: --" in capsys.readouterr().err


def test_demo_time_per_update_is_the_median_after_the_first_update(monkeypatch):
    """The first update (warm-up: 100 s on the fake clock) is left out and the median of
    the others is taken: 1, 2 and 9 s give 2000 ms (4000 is their mean, 5500 the median
    with the warm-up)."""
    import itertools

    import torch

    from fusedaccum import __main__ as cli

    ends = itertools.chain.from_iterable((t, t + d) for t, d in
                                         ((0.0, 100.0), (200.0, 1.0), (300.0, 2.0), (400.0, 9.0)))
    monkeypatch.setattr(cli, "time", type("Clock", (), {"perf_counter": lambda: next(ends)}))
    args = cli.build_parser().parse_args(["demo", "--steps", "4", "-k", "2", "-b", "2",
                                          "--hidden", "8", "--features", "4", "--classes", "2",
                                          "--backend", "reference"])
    res = cli._run("plain", args, torch.device("cpu"), cli._make_data(args), cli._NoProgress())
    assert res["ms"] == 2000.0 and len(res["loss"]) == 4


class _ProtocolWrapper:
    """The wrapper protocol the demo checks, done plainly (the loss divided by k into the
    params' .grad, clip and step at the k-th step()), with one thing broken by ``fault``."""

    fault = None

    def __init__(self, inner, accumulation_steps, max_grad_norm=None, **_kwargs):
        import torch

        self.inner, self.k, self.max_grad_norm = inner, accumulation_steps, max_grad_norm
        self.micro_step = self.update_count = self.skipped_steps = 0
        self.stepped, self.grad_norm = False, torch.zeros(())

    @property
    def accumulation_boundary(self):
        return self.fault != "boundary" and self.micro_step + 1 == self.k

    def scale_loss(self, loss):
        return loss / self.k

    def zero_grad(self):
        pass

    def step(self):
        import torch

        self.micro_step, self.stepped = self.micro_step + 1, False
        if self.micro_step < self.k:
            return
        self.micro_step = 0
        params = [p for g in self.inner.param_groups for p in g["params"]]
        self.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or math.inf)
        self.inner.step()
        self.inner.zero_grad()
        if self.fault == "skip":  # (a window skipped as non-finite, in fp32)
            self.skipped_steps += 1
            return
        self.stepped = self.fault != "stepped"
        self.update_count += self.fault != "count"


@pytest.mark.parametrize("fault, error", [
    (None, None), ("boundary", "micro-batch 1: micro_step=1, accumulation_boundary=False"),
    ("stepped", "micro-batch 1: stepped=False"),
    ("count", "update_count=0 + skipped_steps=0, expected 3 windows"),
    ("skip", "skipped_steps=3, expected 0")])
def test_demo_run_reports_each_wrapper_protocol_error(monkeypatch, fault, error):
    """A wrapper that gets the math right but misreports its window (the boundary flag,
    `stepped`, the update count, or skips in fp32) is a protocol error of the run, which
    makes the demo exit 1 (test_demo_exits_1_when_the_curves_disagree)."""
    import torch

    import fusedaccum
    from fusedaccum import __main__ as cli

    monkeypatch.setattr(_ProtocolWrapper, "fault", fault)
    monkeypatch.setattr(fusedaccum, "FusedAccumulator", _ProtocolWrapper)
    args = cli.build_parser().parse_args(["demo", "--steps", "3", "-k", "2", "-b", "2",
                                          "--hidden", "8", "--features", "4", "--classes", "2"])
    res = cli._run("fused", args, torch.device("cpu"), cli._make_data(args), cli._NoProgress())
    if error is None:
        assert res["errors"] == []
        plain = cli._run("plain", args, torch.device("cpu"), cli._make_data(args),
                         cli._NoProgress())
        torch.testing.assert_close(res["loss"], plain["loss"], rtol=1e-4, atol=1e-5)
    else:
        assert any(error in e for e in res["errors"]), res["errors"]
