"""fusedaccum: fused gradient accumulation, clipping and optimizer steps for PyTorch."""

from fusedaccum import ops
from fusedaccum.accumulator import FusedAccumulator
from fusedaccum.ops import available_backends

__version__ = "0.1.0"

__all__ = ["FusedAccumulator", "ops", "available_backends", "__version__"]
