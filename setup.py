"""Builds fusedaccum. Where torch and a C++ compiler are importable at build time (e.g.
`pip install --no-build-isolation -e .`), also the extension fusedaccum._native from csrc/
ahead of time, with the CUDA kernels when torch has CUDA and nvcc is found. Otherwise (pip's
default isolated build has no torch) the package is pure Python and fusedaccum/ops/native.py
compiles the extension with ninja on first use: wheels carry csrc/ as fusedaccum/_csrc for
that. A failed build only skips the extension."""

import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install compiles from the checkout's csrc/
            shutil.copytree("csrc", os.path.join(self.build_lib, "fusedaccum", "_csrc"),
                            dirs_exist_ok=True)


ext_modules, cmdclass = [], {"build_py": BuildPy}
try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    torch = None
if torch is not None and shutil.which(os.environ.get("CXX", "c++")) and os.environ.get(
        "FUSEDACCUM_NATIVE", "").lower() not in ("0", "off", "jit"):
    sources = ["csrc/bindings.cpp", "csrc/hooks.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    # at::parallel_for is inline: without OpenMP it would run on one thread
    openmp = sys.platform.startswith("linux") and torch.backends.openmp.is_available()
    cxx += ["-fopenmp"] if openmp else []
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cxx.append("-DFUSEDACCUM_WITH_CUDA")
    extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext_modules = [extension("fusedaccum._native", sources,
                             extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
                             extra_link_args=["-fopenmp"] if openmp else [])]

    class BuildExtension(cpp_extension.BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # the package still works: native.py compiles on use
                print(f"warning: fusedaccum._native not built ahead of time: {exc}")

    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
