"""The whole wrapper suite again with every other backend that runs here.

`python -m pytest` runs the wrapper tests with the reference backend; this module runs
the same files in a child pytest per backend (FUSEDACCUM_TEST_BACKEND selects it), so
one test command covers reference, cpu (C++ extension), triton (on CPU through
TRITON_INTERPRET=1) and, on a GPU machine, cuda and triton on the GPU.

The children run side by side, as many at a time as the machine has cores (longest
first), and each test waits for its own: on CI's two cores the module took 241 s, where
one after the other took 365 s.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fusedaccum import ops

HERE = Path(__file__).parent
SUITE = ["test_accumulator.py", "test_amp.py", "test_state_dict.py", "test_errors.py",
         "test_host_paths.py", "test_fuzz.py"]
TIMEOUT_S = 1500


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# name -> (test files, extra environment) of every child suite, longest first
_SUITE_FILES = [str(HERE / f) for f in SUITE]
CHILDREN = {
    "triton": (_SUITE_FILES, {"FUSEDACCUM_TEST_BACKEND": "triton"}),
    "cuda": (_SUITE_FILES, {"FUSEDACCUM_TEST_BACKEND": "cuda"}),
    "cpu": (_SUITE_FILES + [str(HERE / "test_distributed.py")],
            {"FUSEDACCUM_TEST_BACKEND": "cpu"}),
    # gradients of over 8 elements accumulated one param at a time (by the C++ hook's
    # direct mode where it applies, else the Python hook)
    "cpu-unbatched": (_SUITE_FILES, {"FUSEDACCUM_TEST_BACKEND": "cpu",
                                     "FUSEDACCUM_TEST_BATCH_MAX_NUMEL": "8"}),
}


def _why_not(name: str):
    backend = CHILDREN[name][1]["FUSEDACCUM_TEST_BACKEND"]
    device = _device() if name != "cpu-unbatched" else "cpu"
    return ops.unavailable_reason(backend, device)


class _Children:
    """The child pytests that can run here, started in order as slots free up, each one's
    output in a temporary file (a pipe nobody reads while others run could fill)."""

    def __init__(self, wanted: set[str]):
        self.pending = [name for name in CHILDREN if name in wanted and _why_not(name) is None]
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self.slots = max(1, len(cores) if cores else os.cpu_count() or 1)
        self.running = {}  # name -> (Popen, output file, start time)
        self.done = {}  # name -> (return code, last lines of output)

    def _start(self, name: str) -> None:
        files, extra = CHILDREN[name]
        out = tempfile.TemporaryFile(mode="w+")
        # (PASSIVE: an OpenMP worker of one child that waits for work sleeps instead of
        # spinning on the core another child needs; 265 s -> 241 s here)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
            env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **extra), cwd=HERE.parent, stdout=out,
            stderr=subprocess.STDOUT, text=True)
        self.running[name] = (proc, out, time.monotonic())

    def _reap(self) -> None:
        for name, (proc, out, t0) in list(self.running.items()):
            rc = proc.poll()
            if rc is None and time.monotonic() - t0 > TIMEOUT_S:
                proc.kill()
                rc = proc.wait()
                out.write(f"\n(killed after {TIMEOUT_S} s)")
            if rc is not None:
                out.seek(0)
                self.done[name] = (rc, "\n".join(out.read().splitlines()[-60:]))
                out.close()
                del self.running[name]

    def result(self, name: str) -> tuple[int, str]:
        """Return code and output tail of child ``name``, after it ended."""
        while name not in self.done:
            while self.pending and len(self.running) < self.slots:
                self._start(self.pending.pop(0))
            self._reap()
            if name not in self.done:
                time.sleep(0.2)
        return self.done[name]

    def stop(self) -> None:
        for proc, out, _ in self.running.values():  # (a test that failed before waiting)
            proc.kill()
            proc.wait()
            out.close()


def _child_of(item) -> str:
    """The child suite a test of this module waits for."""
    callspec = getattr(item, "callspec", None)
    return callspec.params["backend"] if callspec is not None else "cpu-unbatched"


@pytest.fixture(scope="module")
def children(request):
    """The pool of the child suites this session's selected tests of the module wait for
    (``-k`` may select some): only those run."""
    wanted = {_child_of(item) for item in request.session.items
              if getattr(item, "module", None) is request.module}
    pool = _Children(wanted)
    yield pool
    pool.stop()


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_wrapper_suite_on_backend(backend, children):
    why = _why_not(backend)
    if why is not None:
        pytest.skip(f"backend {backend} not available on {_device()}: {why}")
    rc, tail = children.result(backend)
    assert rc == 0, f"wrapper suite failed with backend={backend}:\n{tail}"
    print(tail.splitlines()[-1])


def test_wrapper_suite_on_cpu_without_batches(children):
    """The cpu suite with gradients of over 8 elements accumulated one param at a time
    (by the C++ hook's direct mode where it applies, else the Python hook)."""
    why = _why_not("cpu-unbatched")
    if why is not None:
        pytest.skip(f"backend cpu not available: {why}")
    rc, tail = children.result("cpu-unbatched")
    assert rc == 0, f"cpu wrapper suite without batches failed:\n{tail}"
