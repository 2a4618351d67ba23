#!/usr/bin/env bash
# CI check of the CUDA kernels without a GPU and without torch: compiles every
# csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (compile only, -c), warnings as errors.
# The kernel sources must not include torch/ATen/c10 headers; this script checks that too.
# Usage: bash csrc/ci_compile_cuda.sh     (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc="${NVCC:-nvcc}"
if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "ci_compile_cuda: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi
shopt -s nullglob
sources=("$here"/cuda/*.cu)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "ci_compile_cuda: no .cu files under $here/cuda" >&2
  exit 2
fi
if grep -nE '#include *[<"](torch|ATen|c10)/' "$here"/cuda/* "$here"/math.h "$here"/params.h; then
  echo "ci_compile_cuda: kernel sources must not include torch headers (see above)" >&2
  exit 1
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$nvcc" --version | tail -n 1
status=0
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  echo "nvcc $name.cu (sm_80, sm_90)"
  # no -I for csrc/: its math.h would shadow the system <math.h>; includes are relative
  if ! "$nvcc" -c "$src" -o "$out/$name.o" -std=c++17 -O3 --fmad=false \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror; then
    echo "ci_compile_cuda: FAILED $src" >&2
    status=1
  fi
done
[ "$status" -eq 0 ] && echo "ci_compile_cuda: all ${#sources[@]} files compiled for sm_80 and sm_90"

# The binding layer's CUDA branch (FUSEDACCUM_WITH_CUDA) against torch's headers, syntax
# only, where a torch is importable: a CPU-only torch ships the c10/cuda headers but not
# the generated cuda_cmake_macros.h, which gets an empty stand-in.
torch_inc="$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null || true)"
cuda_inc="${CUDA_HOME:-/usr/local/cuda}/include"
if [ -n "$torch_inc" ] && [ -d "$torch_inc" ] && [ -f "$cuda_inc/cuda_runtime_api.h" ]; then
  mkdir -p "$out/stub/c10/cuda/impl"
  [ -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ] || : >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  echo "c++ -fsyntax-only bindings.cpp -DFUSEDACCUM_WITH_CUDA"
  if ! "${CXX:-c++}" -std=c++20 -fsyntax-only -DFUSEDACCUM_WITH_CUDA -Wall -Werror \
      -Wno-error=unused-parameter -isystem "$torch_inc" \
      -isystem "$torch_inc/torch/csrc/api/include" -isystem "$out/stub" -isystem "$cuda_inc" \
      $(python3-config --includes) "$here/bindings.cpp"; then
    echo "ci_compile_cuda: FAILED bindings.cpp with FUSEDACCUM_WITH_CUDA" >&2
    status=1
  fi
  echo "c++ -fsyntax-only hooks.cpp -Wall -Wextra (and with -DFUSEDACCUM_WITH_CUDA)"
  if ! "${CXX:-c++}" -std=c++20 -fsyntax-only -DTORCH_EXTENSION_NAME=_native -Wall -Wextra \
      -Werror -isystem "$torch_inc" -isystem "$torch_inc/torch/csrc/api/include" \
      $(python3-config --includes) "$here/hooks.cpp"; then
    echo "ci_compile_cuda: FAILED hooks.cpp" >&2
    status=1
  fi
  if ! "${CXX:-c++}" -std=c++20 -fsyntax-only -DTORCH_EXTENSION_NAME=_native \
      -DFUSEDACCUM_WITH_CUDA -Wall -Wextra -Werror -isystem "$torch_inc" \
      -isystem "$torch_inc/torch/csrc/api/include" -isystem "$out/stub" -isystem "$cuda_inc" \
      $(python3-config --includes) "$here/hooks.cpp"; then
    echo "ci_compile_cuda: FAILED hooks.cpp with FUSEDACCUM_WITH_CUDA" >&2
    status=1
  fi
else
  echo "ci_compile_cuda: no torch importable or no CUDA headers in $cuda_inc (set CUDA_HOME);" \
       "bindings.cpp's CUDA branch not checked"
fi
exit "$status"
