#!/usr/bin/env bash
# The lent GPU machines run torch 2.11 (CUDA 13) and Triton 3.6, not CI's torch 2.13.
# Their Dynamo and inductor differ: on 2026-11-26 a compiled train step's batch flush was
# miscompiled there only (garbage in the accumulators). This builds the C++ extension
# against torch 2.11 in a venv, as the GPU image does (with the CUDA kernels when nvcc is
# here), and runs the wrapper suite with backend="cpu", the ops and the hook tests on the
# CPU (the CUDA build of torch runs there too), and the Triton op tests under the
# interpreter, from a copy of the checkout so that the main environment's build is left
# alone. About 3 minutes.
#   bash .ci/gpu_image_versions.sh        (VENV=... to reuse a venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-/tmp/fusedaccum-gpu-image-venv}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ ! -x "$venv/bin/python" ]; then
  python -m venv "$venv"
fi
# (numpy < 2.3: Triton 3.6's interpreter converts 1-element arrays to ints, which newer
# NumPy refuses)
"$venv/bin/pip" install -q --disable-pip-version-check torch==2.11.0 "triton==3.6.*" \
  "numpy<2.3" ninja setuptools pytest pytest-timeout
"$venv/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$work"
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
  export CUDA_HOME=/usr/local/cuda  # (nvcc on PATH may be a wrapper script elsewhere)
fi
echo "build against torch 2.11 (CUDA_HOME=${CUDA_HOME:-none})"
(cd "$work" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 "$venv/bin/python" setup.py -q \
  build_ext --inplace >build.log 2>&1) || { tail -30 "$work/build.log"; exit 1; }
if ! ls "$work"/fusedaccum/_native*.so >/dev/null 2>&1; then
  tail -30 "$work/build.log"; echo "the extension was not built"; exit 1
fi

cd "$work"
PYTHONPATH=$work FUSEDACCUM_TEST_BACKEND=cpu "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  --timeout 300 tests/test_accumulator.py tests/test_amp.py tests/test_state_dict.py \
  tests/test_errors.py tests/test_batch_hook.py tests/test_native_library.py \
  tests/test_host_paths.py tests/test_distributed.py tests/test_fuzz.py "tests/test_ops.py" \
  -k "not triton"
# The Triton kernels against the reference under Triton 3.6's interpreter: what a GPU
# compiles, as far as the language goes. (Its interpreter hands loop bounds over as
# 1-element arrays, which NumPy warns about; the triton_op registration is refused there.)
PYTHONPATH=$work TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  --timeout 300 -W ignore::DeprecationWarning tests/test_ops.py tests/test_triton_library.py \
  -k "triton and not registered_as_triton_op"
