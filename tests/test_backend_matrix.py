"""The whole wrapper suite again with every other backend that runs here.

`python -m pytest` runs the wrapper tests with the reference backend; this module runs
the same files in a child pytest per backend (FUSEDACCUM_TEST_BACKEND selects it), so
one test command covers reference, cpu (C++ extension), triton (on CPU through
TRITON_INTERPRET=1) and, on a GPU machine, cuda and triton on the GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedaccum import ops

HERE = Path(__file__).parent
SUITE = ["test_accumulator.py", "test_amp.py", "test_state_dict.py", "test_errors.py",
         "test_host_paths.py", "test_fuzz.py"]


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_wrapper_suite_on_backend(backend):
    why = ops.unavailable_reason(backend, _device())
    if why is not None:
        pytest.skip(f"backend {backend} not available on {_device()}: {why}")
    env = dict(os.environ, FUSEDACCUM_TEST_BACKEND=backend)
    files = [str(HERE / f) for f in SUITE]
    if backend == "cpu":
        files.append(str(HERE / "test_distributed.py"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
        env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=1500)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"wrapper suite failed with backend={backend}:\n{tail}"
    print(tail.splitlines()[-1])


def test_wrapper_suite_on_cpu_without_batches():
    """The cpu suite with gradients of over 8 elements accumulated one param at a time
    (by the C++ hook's direct mode where it applies, else the Python hook)."""
    why = ops.unavailable_reason("cpu", "cpu")
    if why is not None:
        pytest.skip(f"backend cpu not available: {why}")
    env = dict(os.environ, FUSEDACCUM_TEST_BACKEND="cpu", FUSEDACCUM_TEST_BATCH_MAX_NUMEL="8")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         *[str(HERE / f) for f in SUITE]],
        env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=1500)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"cpu wrapper suite without batches failed:\n{tail}"
