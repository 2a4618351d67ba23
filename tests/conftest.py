import os
import sys
from pathlib import Path

import pytest
import torch

# Triton runs its kernels on CPU tensors only through its interpreter, which must be
# chosen before triton is imported. On a machine without a GPU that is how the Triton
# backend is tested for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A smaller limit for batching gradients (FusedAccumulator accumulates smaller half
# gradients in batches): test_backend_matrix runs the cpu suite once with it, so that the
# per-param path (Python and C++ hooks) carries the whole suite too
if os.environ.get("FUSEDACCUM_TEST_BATCH_MAX_NUMEL"):
    from fusedaccum import accumulator

    accumulator._BATCH_MAX_NUMEL = int(os.environ["FUSEDACCUM_TEST_BATCH_MAX_NUMEL"])

sys.path.insert(0, str(Path(__file__).parent))
from _models import DEVICES  # noqa: E402  (needs the interpreter choice above)


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device the backend under test runs on."""
    return request.param
