"""pytest-benchmark suite of whole accumulation windows (k micro-batches + boundary).

Not part of the default test run; run it explicitly::

    python -m pytest bench/test_bench_window.py
    FUSEDACCUM_BENCH_MODEL=gpt2-124m python -m pytest bench/test_bench_window.py
    FUSEDACCUM_BENCH_COMPILE=1 python -m pytest bench/test_bench_window.py  # + torch.compile peer

Each contender (FusedAccumulator per backend, the tutorial loop, the plain-PyTorch
recipe, optionally the recipe with a compiled boundary) is the same class that
``python -m fusedaccum bench`` times, on the same synthetic workload. Here the
contenders run one after the other, as pytest-benchmark does; the speed ratios in the
CLI's report come from rounds that alternate the contenders, which is the fairer
comparison on a machine whose speed drifts.
"""

from __future__ import annotations

import os

import pytest
import torch

from fusedaccum import bench as B

DEVICE = torch.device(os.environ.get("FUSEDACCUM_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
MODEL = os.environ.get("FUSEDACCUM_BENCH_MODEL") or B.default_models(DEVICE, quick=True)[0]
ROUNDS = int(os.environ.get("FUSEDACCUM_BENCH_ROUNDS", "10"))
BACKENDS, EXCLUDED = B.bench_backends(DEVICE)

CONTENDERS = [f"fusedaccum[{b}]" for b in BACKENDS] + ["tutorial", "recipe"]
if os.environ.get("FUSEDACCUM_BENCH_COMPILE") == "1":
    CONTENDERS.append("recipe+compile")


@pytest.fixture(scope="module")
def workload() -> B.Workload:
    return B.Workload(B.MODELS[MODEL], DEVICE, torch.bfloat16)


def _build(name: str, wl: B.Workload) -> B.Contender:
    if name.startswith("fusedaccum["):
        return B.FusedContender(wl, name[len("fusedaccum["):-1])
    if name == "tutorial":
        return B.TutorialContender(wl)
    return B.RecipeContender(wl, compile=name == "recipe+compile")


@pytest.mark.parametrize("name", CONTENDERS)
def test_window(benchmark, workload, name):
    contender = _build(name, workload)

    def run():
        contender.window()
        B.sync(DEVICE)

    try:
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2 if "compile" in name else 1)
    finally:
        contender.close()
    model = B.MODELS[MODEL]
    benchmark.extra_info.update(model=MODEL, params=model.numel, tensors=model.tensors,
                                k=workload.k, contender=name,
                                persistent_bytes=B.storage_bytes(contender.persistent_tensors()))
