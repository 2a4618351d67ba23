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
  if ! "$nvcc" -c "$src" -o "$out/$name.o" -std=c++17 -O3 \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror; then
    echo "ci_compile_cuda: FAILED $src" >&2
    status=1
  fi
done
[ "$status" -eq 0 ] && echo "ci_compile_cuda: all ${#sources[@]} files compiled for sm_80 and sm_90"
exit "$status"
