import os

import torch

# Triton runs its kernels on CPU tensors only through its interpreter, which must be
# chosen before triton is imported. On a machine without a GPU that is how the Triton
# backend is tested for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
