"""Which builds of fusedaccum's C++ extension crash when one of their checks fails, and
what in a pytest process makes them crash?

On one lent H200 image (2026-11-26) every failing TORCH_CHECK in the extension killed
the process with SIGSEGV, while a one-op extension built with load_inline raised
normally (bench/diag_cpp_exception.py). A lead: c10::Error records a C++ backtrace when
it is made, and the unwinder has segfaulted elsewhere on bad unwind tables
(pytorch/pytorch#117645). The next run showed that the same direct call raised normally
in a fresh ``python -c`` child, and crashed only inside pytest
(tests/test_native_library.py::test_input_checks_name_the_argument, test_binding_checks_too).
Each case below runs in a child process, so a crash is an exit status (-11) rather than
the end of this script:

- the extension as installed (ahead-of-time build, or JIT with CUDA on a GPU machine),
  with TORCH_SHOW_CPP_STACKTRACES unset, 0 and 1;
- a JIT build without the CUDA objects (CPU kernels only) in a fresh build directory,
  compiled by torch's cpp_extension with `c++` (setup.py's build_ext uses the compiler
  Python was built with, which on that image is another one: printed first);
- the installed extension after a "prelude" that does one of the things a pytest process
  does before the failing call: CUDA initialised, ``import triton``, ``import
  fusedaccum.ops.triton`` plus one Triton kernel launch, ``import pytest`` plus
  ``faulthandler.enable()``, the failing call on CUDA tensors, all of them together;
- the test functions of tests/test_native_library.py called directly, without the pytest
  runner;
- the crashing test itself under pytest, with its full faulthandler output.

Every child makes two failing direct C++ calls per device: ``accumulate_`` with an int32
grad (TypeError) and ``adamw_step_`` with amsgrad and no max_exp_avg_sq (ValueError).
One line per case: exit status, the child's last stdout line (on a crash: the call it was
in), and on a failure the top frame of its faulthandler traceback if it printed one. The
cases run in parallel and print as they finish.

    python bench/diag_native_errors.py
"""

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE_TIMEOUT = 75  # s per child; the pytest one too (gpu_session.sh gives the script 90)

CALL = r"""
import os, sys
build, preludes, devices = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
notes = []
if "triton-pkg" in preludes and not os.environ.get("FA_DIAG_CUDA"):
    os.environ["TRITON_INTERPRET"] = "1"  # a CPU launch needs the interpreter, set pre-import
import torch
if "cuda" in preludes:
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    notes.append("cuda init")
if "triton" in preludes:
    import triton
    notes.append("triton " + triton.__version__)
if "triton-pkg" in preludes:
    import fusedaccum.ops.triton as fat
    why = fat.unavailable_reason("triton", None)
    dev = "cuda" if os.environ.get("FA_DIAG_CUDA") else "cpu"
    if why is None:
        a = torch.zeros(4096, device=dev)
        fat.accumulate_(a, torch.ones(4096, device=dev), 2.0)
        notes.append(f"triton launch on {dev}: {float(a.sum()):g}")
    else:
        notes.append("fusedaccum.ops.triton imported, no launch: " + why[:60])
if "pytest" in preludes:
    import faulthandler, pytest
    faulthandler.enable()
    notes.append("pytest " + pytest.__version__ + " + faulthandler")
from fusedaccum.ops import native
if build == "cpu-only-jit":
    native._state = None
    torch.ops.load_library(native._jit_build(with_cuda=False))
else:
    native._ops()
ops = torch.ops.fusedaccum_native
import re
what = native.build_info() if build == "installed" else "fresh JIT, CPU kernels only"
what = re.sub(r" /\S+", "", what)  # without the library's path
print("prelude:", ", ".join(notes) or "none", "| build:", what, flush=True)

def adamw_args(dev):
    t = lambda: torch.zeros(10, device=dev)
    s = lambda v: torch.tensor(v, device=dev)
    return (t(), t(), t(), t(), None, None, s(1.0), s(0.0),
            1e-2, 0.9, 0.99, 1e-8, 0.1, 3, True, True, False, True)

results = []
for dev in devices:
    acc = torch.zeros(10, device=dev)
    # straight into C++: the Python-side checks of native.py are not in the way
    for name, call in (
            ("accumulate_", lambda: ops.accumulate_(
                acc, torch.zeros(10, dtype=torch.int32, device=dev), 1.0, False)),
            ("adamw_step_", lambda: ops.adamw_step_(*adamw_args(dev)))):
        print(f"calling {name} on {dev} (crashed there)", flush=True)
        try:
            call()
            results.append(f"{dev} {name}: no error!")
        except Exception as e:
            results.append(f"{dev} {name}: {type(e).__name__} {str(e).splitlines()[0][:40]!r}")
print("; ".join(results), f"[{', '.join(notes) or 'no prelude'}; {what}]", flush=True)
"""

TEST_DIRECT = r"""
import sys
sys.path.insert(0, "tests")
import test_native_library as t
print("calling test_binding_checks_too('cpu') (crashed there)", flush=True)
t.test_binding_checks_too("cpu")
print("calling test_input_checks_name_the_argument('cpu') (crashed there)", flush=True)
t.test_input_checks_name_the_argument("cpu")
print("both test functions passed, called without the pytest runner", flush=True)
"""

PYTEST_CMD = ["-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:xdist", "-p",
              "no:cacheprovider", "-x", "tests/test_native_library.py", "-k",
              "input_checks and cpu"]


def _child(args: list, env: dict, timeout: float = CASE_TIMEOUT):
    """(exit status, stdout, stderr) of ``python *args``; its process group is killed on
    timeout (a JIT build's ninja and compilers too)."""
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return f"timeout {timeout}s", out, err


def _top_frame(err: str) -> str:
    """The innermost Python frame of a faulthandler traceback, else stderr's last line."""
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith(("Current thread", "Thread 0x")) and i + 1 < len(lines):
            return "top frame: " + lines[i + 1]
    return "stderr: " + lines[-1] if lines else ""


def run_case(build: str, preludes: str = "none", devices: str = "cpu",
             env_extra: dict | None = None) -> str:
    env = dict(os.environ, **(env_extra or {}))
    if build == "cpu-only-jit":
        env["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="fa_diag_ext_")
    rc, out, err = _child(["-c", CALL, build, preludes, devices], env)
    return _line(rc, out, err)


def _line(rc, out: str, err: str) -> str:
    last = (out.strip().splitlines() or [""])[-1]
    line = f"exit {rc}: {last[:300]}"
    hint = _top_frame(err) if rc != 0 else ""
    if hint:
        line += " | " + hint[:200]
    return line


def run_test_direct() -> str:
    rc, out, err = _child(["-c", TEST_DIRECT], dict(os.environ))
    return _line(rc, out, err)


def run_pytest() -> str:
    """The crashing test under pytest: its whole output (capped at 150 lines of 300
    characters), so the top of the faulthandler traceback is in the log."""
    t0 = time.time()
    rc, out, err = _child(PYTEST_CMD, dict(os.environ))
    lines = [ln[:300] for ln in (out + err).rstrip().splitlines()]
    if len(lines) > 150:
        lines = lines[:150] + [f"... ({len(lines) - 150} more lines)"]
    body = "\n".join("    | " + ln for ln in lines)
    return (f"exit {rc} after {time.time() - t0:.0f}s, python {shlex.join(PYTEST_CMD)}; "
            f"stdout then stderr:\n{body}\n    +-- end of pytest output")


def toolchain() -> bool:
    """The compilers each build path uses, and what the installed build links to.
    Returns whether CUDA is available."""
    import sysconfig

    import torch

    from fusedaccum.ops import native

    print("sysconfig CC/CXX (setup.py's build_ext):", sysconfig.get_config_var("CC"), "|",
          sysconfig.get_config_var("CXX"))
    for cxx in {os.environ.get("CXX", "c++"), (sysconfig.get_config_var("CXX") or "").split()[0]}:
        if cxx:
            r = subprocess.run([cxx, "--version"], capture_output=True, text=True)
            print(f"{cxx}: {(r.stdout or r.stderr).splitlines()[:1]}")
    aot = native._aot_library()
    if aot is not None:
        r = subprocess.run(["ldd", str(aot)], capture_output=True, text=True)
        print("ldd", aot.name, [ln.strip() for ln in r.stdout.splitlines()
                                if "stdc++" in ln or "gcc_s" in ln or "gomp" in ln])
    print("torch", torch.__version__, torch.__config__.show().count("gcc-toolset"))
    # only the driver query, as conftest does: this process stays light
    return torch.cuda.is_available()


def main() -> int:
    t0 = time.time()
    cuda = toolchain()
    # build the extension (JIT on first use) once here, so the children only load it
    from fusedaccum.ops import native

    print("installed build:", native.build_info(), flush=True)
    env_cuda = {"FA_DIAG_CUDA": "1"} if cuda else {}
    cases = {  # label -> (function, args); CUDA-only ones are None without a GPU
        "installed": (run_case, ("installed",)),
        "installed TORCH_SHOW_CPP_STACKTRACES=0": (
            run_case, ("installed", "none", "cpu", {"TORCH_SHOW_CPP_STACKTRACES": "0"})),
        "installed TORCH_SHOW_CPP_STACKTRACES=1": (
            run_case, ("installed", "none", "cpu", {"TORCH_SHOW_CPP_STACKTRACES": "1"})),
        "cpu-only-jit": (run_case, ("cpu-only-jit",)),
        "(a) prelude cuda init": cuda and (run_case, ("installed", "cuda", "cpu")),
        "(b) prelude import triton": (run_case, ("installed", "triton", "cpu")),
        "(c) prelude fusedaccum.ops.triton + launch": (
            run_case, ("installed", "triton-pkg", "cpu", env_cuda)),
        "(d) prelude import pytest + faulthandler.enable()": (
            run_case, ("installed", "pytest", "cpu")),
        "(e) failing checks on cuda tensors": cuda and (
            run_case, ("installed", "cuda", "cuda")),
        "(f) all preludes, then cpu and cuda tensors": cuda and (
            run_case, ("installed", "cuda,triton,triton-pkg,pytest", "cpu,cuda", env_cuda)),
        "(g) test functions called directly, no pytest runner": (run_test_direct, ()),
        "(h) the crashing test under pytest": (run_pytest, ()),
    }
    for label, job in cases.items():
        if not job:
            print(f"{label}: skipped (needs CUDA; torch.cuda.is_available() is False)")
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {pool.submit(fn, *args): label for label, job in cases.items() if job
                   for fn, args in [job]}
        for fut in as_completed(futures):
            try:
                res = fut.result()
            except Exception as exc:  # a bug here must not hide the other cases
                res = f"diag error {type(exc).__name__}: {exc}"
            print(f"{futures[fut]}: {res}", flush=True)
    print(f"diag_native_errors done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
