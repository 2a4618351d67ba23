"""Which builds of fusedaccum's C++ extension crash when one of their checks fails?

On one lent H200 image (2026-11-26) every failing TORCH_CHECK in the extension killed
the process with SIGSEGV, while a one-op extension built with load_inline raised
normally (bench/diag_cpp_exception.py). A lead: c10::Error records a C++ backtrace when
it is made, and the unwinder has segfaulted elsewhere on bad unwind tables
(pytorch/pytorch#117645). Each case below runs in a child process, so a crash is an
exit status (-11) rather than the end of this script:

- the extension as installed (ahead-of-time build, or JIT with CUDA on a GPU machine),
  with TORCH_SHOW_CPP_STACKTRACES unset, 0 and 1;
- a JIT build without the CUDA objects (CPU kernels only) in a fresh build directory,
  compiled by torch's cpp_extension with `c++` (setup.py's build_ext uses the compiler
  Python was built with, which on that image is another one: printed first).

    python bench/diag_native_errors.py
"""

import os
import subprocess
import sys
import tempfile

CALL = r"""
import sys, torch
from fusedaccum.ops import native
if sys.argv[1] == "cpu-only-jit":
    from torch.utils import cpp_extension
    native._state = None
    torch.ops.load_library(native._jit_build(with_cuda=False))
else:
    native._ops()
acc = torch.zeros(10)
try:
    # straight into C++: the Python-side checks of native.py are not in the way
    torch.ops.fusedaccum_native.accumulate_(acc, torch.zeros(10, dtype=torch.int32), 1.0, False)
except TypeError as e:
    print("caught TypeError:", str(e).splitlines()[0])
"""


def run(case: str, env_extra: dict) -> str:
    env = dict(os.environ, **env_extra)
    if case == "cpu-only-jit":
        env["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="fa_diag_ext_")
    r = subprocess.run([sys.executable, "-c", CALL, case], capture_output=True, text=True,
                       env=env, timeout=300)
    tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or [""]
    return f"exit {r.returncode}: {tail[0][:160]}"


def toolchain() -> None:
    """The compilers each build path uses, and what the installed build links to."""
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


def main() -> int:
    toolchain()
    cases = [("installed", {}), ("installed", {"TORCH_SHOW_CPP_STACKTRACES": "0"}),
             ("installed", {"TORCH_SHOW_CPP_STACKTRACES": "1"}), ("cpu-only-jit", {})]
    for case, env in cases:
        label = case + "".join(f" {k}={v}" for k, v in env.items())
        print(f"{label}: {run(case, env)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
