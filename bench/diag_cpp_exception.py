"""Does a TORCH_CHECK raised in a freshly compiled C++ op reach Python as an exception here?

A lent GPU machine's image segfaulted on every error raised by fusedaccum's extension (its
torch and the system compiler differ). This builds a one-function op with torch's own
cpp_extension, per variant of link flags, and calls it in a child process, so a crash
shows as an exit status instead of killing the caller.
    python bench/diag_cpp_exception.py
"""

import os
import subprocess
import sys
import tempfile

SRC = r"""
#include <ATen/ATen.h>
#include <torch/library.h>
at::Tensor chk(const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.numel() == 0, "diag: a ValueError raised in C++");
  return t;
}
TORCH_LIBRARY(fa_diag_NAME, m) {
  m.def("chk(Tensor t) -> Tensor");
  m.impl("chk", c10::DispatchKey::CPU, TORCH_FN(chk));
}
"""

CHILD = r"""
import sys, torch
from torch.utils.cpp_extension import load_inline
name, flags, d = sys.argv[1], sys.argv[2].split(), sys.argv[3]
load_inline(name, cpp_sources=[SRC.replace("NAME", name)], extra_ldflags=flags,
            is_python_module=False, build_directory=d)
try:
    getattr(torch.ops, "fa_diag_" + name).chk(torch.ones(1))
except ValueError as e:
    print("caught ValueError:", str(e).splitlines()[0])
"""


def main() -> int:
    import torch

    print("torch", torch.__version__, "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
    print([ln.strip() for ln in torch.__config__.show().splitlines() if "GCC" in ln or
           "CXX_COMPILER" in ln][:3])
    cxx = os.environ.get("CXX", "c++")
    print(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
          .splitlines()[0])
    for name, flags in (("plain", ""), ("static_libstdcxx", "-static-libstdc++ -static-libgcc")):
        d = tempfile.mkdtemp(prefix=f"fa_diag_{name}_")
        code = "SRC = " + repr(SRC) + "\n" + CHILD
        r = subprocess.run([sys.executable, "-c", code, name, flags or " ", d],
                           capture_output=True, text=True, timeout=240)
        tail = (r.stdout + r.stderr).strip().splitlines()[-2:]
        print(f"{name}: exit {r.returncode}: {tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
