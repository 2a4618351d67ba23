"""pytest-benchmark suite of the ops, per backend and size.

Not part of the default test run (pytest's testpaths is ``tests``); run it explicitly::

    python -m pytest bench/test_bench_ops.py                       # CPU, or CUDA if present
    FUSEDACCUM_BENCH_SIZES=1K,1M,64M python -m pytest bench/test_bench_ops.py
    python -m pytest bench/test_bench_ops.py --benchmark-json out.json

It calls the same measurement pieces as ``python -m fusedaccum bench`` (input sets,
op calls and byte counts from :mod:`fusedaccum.bench`) and stores GB/s and the fraction
of the copy bandwidth in each benchmark's ``extra_info``. pytest-benchmark times every
call on its own (with a device sync on CUDA, so small sizes include the launch and sync
latency); the CLI's numbers (batched calls, CUDA events) are the reference ones.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from fusedaccum import bench as B
from fusedaccum import ops

DEVICE = torch.device(os.environ.get("FUSEDACCUM_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
SIZES = B.parse_sizes(os.environ.get("FUSEDACCUM_BENCH_SIZES", "1K,64K,1M,16M"))
BACKENDS, EXCLUDED = B.bench_backends(DEVICE)
MAX_SETS = 1024


def _median(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return None
    return stats.stats.median


@pytest.fixture(scope="module")
def copy_bw() -> B.CopyBandwidth:
    numel = (256 if DEVICE.type == "cuda" else 64) * B.KI**2
    return B.measure_copy_bandwidth(DEVICE, numel, B.TimingConfig(
        budget_s=1.0, warmup_s=0.05, min_samples=5, max_samples=50, target_sample_s=0.0))


def test_copy_bandwidth(benchmark, copy_bw):
    n = copy_bw.numel
    src = B.fill_random_(torch.empty(n, device=DEVICE), -1.0, 1.0, seed=1)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        B.sync(DEVICE)

    benchmark(run)
    benchmark.extra_info.update(reference_gbps=copy_bw.gbps, reference_method=copy_bw.method,
                                **{f"{k}_gbps": v for k, v in copy_bw.results.items()})
    median = _median(benchmark)
    if median:
        benchmark.extra_info["copy_gbps_here"] = 8 * n / median / 1e9


@pytest.mark.skipif(not BACKENDS, reason=f"no backend runs on {DEVICE}: {EXCLUDED}")
@pytest.mark.parametrize("size", SIZES, ids=B.fmt_size)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(B.OP_SPECS))
def test_op(benchmark, copy_bw, op, backend, size):
    spec = B.OP_SPECS[op]
    target = B.ROTATION_CACHE_MULTIPLE * B.last_level_cache_bytes(DEVICE)
    n_sets = max(1, min(MAX_SETS, math.ceil(target / B.op_set_bytes(spec, size))))
    if B.op_set_bytes(spec, size) * n_sets + 40 * size > 0.7 * B.available_memory(DEVICE):
        pytest.skip("not enough memory")
    sets = B.make_op_sets(spec, size, DEVICE, n_sets, seed=17)
    mod = ops.get(backend, DEVICE)
    calls = [B.op_callable(spec, mod, s) for s in sets]
    counter = itertools.count()

    def run():
        calls[next(counter) % n_sets]()
        B.sync(DEVICE)

    with torch.no_grad():
        benchmark(run)
    benchmark.extra_info.update(op=spec.label, backend=backend, numel=size,
                                bytes_per_element=spec.bytes_per_element, buffer_sets=n_sets)
    median = _median(benchmark)
    if median:
        gbps = spec.bytes_per_element * size / median / 1e9
        benchmark.extra_info.update(gbps=gbps, frac_copy_bw=gbps / copy_bw.gbps)
