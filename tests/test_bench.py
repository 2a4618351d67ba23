"""Fast checks of the benchmark code itself (fusedaccum/bench.py).

A benchmark that counts the wrong bytes, or whose peers run different math from the
wrapper, reports meaningless numbers; these tests pin both, and that a --quick run on
tiny sizes writes its reports.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import re

import pytest
import torch

from fusedaccum import bench as B
from fusedaccum.ops import native
from fusedaccum.ops import triton as triton_ops

CPU = torch.device("cpu")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
PEERS = ["tutorial", "recipe"] + (["recipe+DeepSpeedCPUAdam"] if HAS_DEEPSPEED else [])


# --------------------------------------------------------------------------- bytes


def test_bytes_per_element_match_design():
    # DESIGN.md section 3/4 and the counts documented in bench/README.md
    assert B.bytes_per_element("accumulate_", grad_dtype=torch.bfloat16) == 2 + 4 + 4
    assert B.bytes_per_element("accumulate_", grad_dtype=torch.float16) == 10
    assert B.bytes_per_element("accumulate_", grad_dtype=torch.float32) == 4 + 4 + 4
    assert B.bytes_per_element("accumulate_", grad_dtype=torch.bfloat16, overwrite=True) == 6
    assert B.bytes_per_element("grad_norm") == 4
    assert B.bytes_per_element("adamw_step_") == 16 + 12 + 2 + 4 == 34
    assert B.bytes_per_element("adamw_step_", zero_acc=False) == 30
    assert B.bytes_per_element("adamw_step_", amsgrad=True) == 42
    assert B.bytes_per_element("sgd_step_") == 4 + 4 + 4 + 4 + 4 + 2 + 4 == 26
    assert B.bytes_per_element("sgd_step_", momentum=False) == 18
    assert B.bytes_per_element("copy_") == B.bytes_per_element("mul_") == 8
    with pytest.raises(ValueError):
        B.bytes_per_element("nonsense")


def test_op_specs_bytes_and_labels():
    expect = {"accumulate_bf16": 10, "accumulate_fp32": 12, "grad_norm": 4,
              "adamw_step_": 34, "sgd_step_": 26}
    assert {k: s.bytes_per_element for k, s in B.OP_SPECS.items()} == expect
    for spec in B.OP_SPECS.values():
        assert sum(b for _, b in spec.breakdown()) == spec.bytes_per_element
    # one window of the fused path: k x (autograd's grad clone 4 + accumulate 10) + 4 + 34
    assert B.window_floor_bytes_per_param(4, 2) == 4 * 14 - 4 + 4 + 30
    # on a CPU the norm of half gradients rides on the last accumulations: no pass of its own
    assert B.window_floor_bytes_per_param(4, 2, norm_pass=False) == 4 * 14 - 4 + 30
    # fp32 params are their own master: their step writes no half copy (28, not 30)
    assert B.window_floor_bytes_per_param(4, 4) == 4 * 20 - 4 + 4 + 28
    assert not B.norm_makes_a_pass(CPU, 2) and B.norm_makes_a_pass(CPU, 4)
    assert B.norm_makes_a_pass(torch.device("cuda"), 2)


def test_sizes_parse_and_format():
    assert B.parse_sizes("1K,64K,1M,2^4,4096") == [16, 1024, 4096, 65536, 1 << 20]
    assert B.parse_size("256M") == 256 << 20
    assert [B.fmt_size(n) for n in (1024, 3 << 20, 1000, 256 << 20)] == ["1K", "3M", "1000",
                                                                         "256M"]
    with pytest.raises(argparse.ArgumentTypeError):
        B.parse_size("12Q")
    assert B.FULL_SIZES[0] == 1024 and B.FULL_SIZES[-1] == 256 << 20


def test_model_shapes():
    gpt2 = B.MODELS["gpt2-124m"]
    assert gpt2.tensors == 148
    assert 124e6 < gpt2.numel < 125e6
    xl = B.MODELS["gpt2-1.5b"]
    assert 1.5e9 < xl.numel < 1.6e9
    assert B.MODELS["gpt2-124m/8"].tensors == 148  # scaled down, same tensor count


def test_backend_names_are_checked_and_auto_is_one(capsys):
    """gpu_session.sh passes --backends triton,cuda,auto: auto must not be a typo."""
    backends, excluded = B.bench_backends(CPU, ["reference", "auto"])
    assert backends == ["reference"] and "unknown" not in excluded.get("auto", "")
    assert B.main(["--backends", "reference,nope", "--quick", "--no-progress"]) == 2
    assert "unknown backend(s) 'nope'" in capsys.readouterr().err


def test_window_rounds_caps_the_rounds_the_budget_allows(tmp_path, capsys):
    """--window-rounds: the most timed rounds per model, however long the budget (the
    GPU session asks for more than the default 30 on GPT-2 124M's fast windows)."""
    assert B.main(_quick_args(tmp_path, "--window-rounds", "0")) == 2
    assert "--window-rounds must be at least 1" in capsys.readouterr().err
    args = _quick_args(tmp_path, "--no-plot", "--ops", "none", "--window-rounds", "4")
    args[args.index("--window-budget") + 1] = "30"
    assert B.main(args) == 0
    with open(next(tmp_path.glob("*.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r["section"] == "window"]
    assert rows and all(r["samples"] == "4" for r in rows), rows


def test_triton_never_timed_on_cpu():
    backends, excluded = B.bench_backends(CPU)
    assert "reference" in backends and "triton" not in backends and "cuda" not in backends
    assert "triton" in excluded


def test_progress_prints_plain_lines_without_a_terminal(capsys, monkeypatch):
    """Long runs show progress also where stderr is a log or a pipe (no tqdm bar there)."""
    monkeypatch.setattr(B.Progress, "INTERVAL_S", 0.0)
    progress = B.Progress(3)
    progress.set("copy bandwidth")
    progress.update()
    progress.set("gpt2-124m recipe")
    progress.close()
    assert capsys.readouterr().err.splitlines() == [
        "bench [0/3] copy bandwidth", "bench [1/3] gpt2-124m recipe"]
    quiet = B.Progress(3, enabled=False)  # --no-progress
    quiet.set("copy bandwidth")
    assert capsys.readouterr().err == ""


def test_timing_and_rotation_helpers():
    seen = []
    t = B.time_calls(lambda i: seen.append(i % 3), CPU,
                     B.TimingConfig(budget_s=0.002, warmup_s=0.0, min_samples=3,
                                    target_sample_s=1e-4), n_sets=3)
    assert t.median_s > 0 and t.samples >= 3 and t.q1_s <= t.median_s <= t.q3_s
    assert set(seen) == {0, 1, 2}  # every buffer set is used
    x = B.fill_random_(torch.empty(70_000), -1.0, 2.0, seed=3)
    assert float(x.min()) >= -1.0 and float(x.max()) < 2.0 and float(x.std()) > 0.5
    a = torch.zeros(8)
    assert B.storage_bytes([a, a[2:], torch.zeros(2)]) == 32 + 8
    assert B.sanitize("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz") == \
        "Intel-Xeon-Gold-6338-CPU-2.00GHz"


@pytest.mark.parametrize("key", list(B.OP_SPECS))
def test_op_inputs_run_on_reference_and_match_bytes(key):
    spec = B.OP_SPECS[key]
    x = B.make_op_inputs(spec, 100, CPU, seed=0)
    touched = sum(t.numel() * t.element_size() for t in x.values() if t.dim() == 1)
    assert touched == B.op_set_bytes(spec, 100)
    before = {k: v.clone() for k, v in x.items()}
    with torch.no_grad():
        B.op_callable(spec, B._ops.get("reference", CPU), x)()
    if spec.op == "accumulate_":
        torch.testing.assert_close(x["acc"], before["acc"] + before["grad"].float())
    if spec.op in ("adamw_step_", "sgd_step_"):
        assert not torch.equal(x["param"], before["param"])
        assert torch.count_nonzero(x["acc"]) == 0  # zero_acc: the 34/26 bytes include it
        torch.testing.assert_close(x["model_out"], x["param"].to(torch.bfloat16))


@pytest.mark.parametrize("key", list(B.OP_SPECS))
def test_torch_peer_does_the_same_work_as_the_reference(key):
    """The op benchmarks' plain-PyTorch contender computes what the op computes (every
    output, the half copy and the zeroed accumulator included): its ratio is fair."""
    spec = B.OP_SPECS[key]
    x = B.make_op_inputs(spec, 1000, CPU, seed=0)
    y = {k: v.clone() for k, v in x.items()}
    with torch.no_grad():
        want = B.op_callable(spec, B._ops.get("reference", CPU), x)()
        got = B.op_callable(spec, B.TorchPeer(), y)()
    if want is not None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for name in x:
        torch.testing.assert_close(y[name], x[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, name=name: f"{key} {name}: {m}")


# --------------------------------------------------------------------------- peers


def _window_backends():
    backends, _ = B.bench_backends(CPU)
    return backends


@pytest.mark.parametrize("backend", _window_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peers_compute_the_same_window_as_the_wrapper(backend, dtype):
    wl = B.Workload(B.MODELS["tiny"], CPU, dtype)
    init = [t.clone() for t in wl.init]
    ours = B.FusedContender(wl, backend)
    tutorial = B.TutorialContender(wl)
    recipe = B.RecipeContender(wl)
    for c in (ours, tutorial, recipe):
        c.window()
        assert c.windows == 1
    assert ours.opt.stepped and ours.opt.update_count == 1

    # the update moved the weights (else any comparison below is vacuous) ...
    moved = max(float((w.float() - i.float()).abs().max())
                for w, i in zip(ours.fp32_weights(), init))
    assert moved > 1e-4
    # ... and clipping was active (total norm of the synthetic grads > max_grad_norm)
    assert float(ours.opt.grad_norm) > B.MAX_GRAD_NORM

    # the recipe is the same math in fp32: masters agree to rounding
    for a, b in zip(ours.fp32_weights(), recipe.fp32_weights()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours.model_params(), recipe.model_params()):
        assert a.dtype == b.dtype == dtype
        # fp32: rounding of the same math; bf16: the same master rounded, at most 1 ulp
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
        torch.testing.assert_close(a.float(), b.float(), **tol)
    # the tutorial accumulates (g / k) in the param dtype: exact in fp32, bf16 rounding else
    for a, b in zip(ours.model_params(), tutorial.model_params()):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert float((a.float() - b.float()).abs().max()) <= 2e-3
    if HAS_DEEPSPEED:  # peer 4 when deepspeed is importable: the same math as the recipe
        ds = B.RecipeContender(wl, optimizer="deepspeed")
        ds.window()
        for a, b in zip(ours.fp32_weights(), ds.fp32_weights()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        ds.close()
    for c in (ours, tutorial, recipe):
        c.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fresh_gradients_give_the_same_windows(dtype, monkeypatch):
    """Fresh gradients (the default) or pre-made ones (--premade-grads) change what autograd
    copies, not the math: every contender ends a window in the same place either way, and
    the pre-made gradients stay untouched."""
    backend = _window_backends()[0]
    ends = {}
    for fresh in (False, True):
        monkeypatch.setattr(B._Deliver, "fresh", fresh)
        wl = B.Workload(B.MODELS["tiny"], CPU, dtype)
        held = [g.clone() for g in wl.grads]
        for c in (B.FusedContender(wl, backend), B.TutorialContender(wl), B.RecipeContender(wl)):
            c.window()
            ends[fresh, type(c).__name__] = [w.clone() for w in c.fp32_weights()]
            c.close()
        assert all(torch.equal(a, b) for a, b in zip(held, wl.grads))
    for name in ("FusedContender", "TutorialContender", "RecipeContender"):
        for a, b in zip(ends[False, name], ends[True, name]):
            assert torch.equal(a, b)


def test_alternated_windows_and_ratios():
    notes = []
    res = B.run_windows(B.MODELS["tiny"], CPU, torch.bfloat16, ["reference"],
                        B.WindowConfig(budget_s=0.01, warmup_rounds=1, min_rounds=2,
                                       max_rounds=2, profile=True),
                        compile_mode=False, progress=B.Progress(1, enabled=False), notes=notes)
    names = [r.contender for r in res]
    assert names == ["fusedaccum[reference]", *PEERS]
    for r in res:
        assert len(r.times) == 2, r.note
        assert r.persistent_bytes and r.persistent_bytes > 0
        assert r.ops_per_window and r.ops_per_window > 0
        assert r.peak_bytes is not None and r.peak_bytes >= 0
        assert r.max_param_diff is not None
    recipe = next(r for r in res if r.contender == "recipe")
    assert recipe.max_param_diff < 1e-2  # same math after the same 4 windows
    assert res[0].max_param_diff == 0.0  # (the differences are from ours, the first)
    ratios = B.window_ratios(res)
    assert {(o.contender, p.contender) for o, p, _ in ratios} == {
        ("fusedaccum[reference]", p) for p in PEERS}
    assert all(math.isfinite(x) and x > 0 for _, _, x in ratios)


def _timed(contender, times):
    return B.WindowResult(model="tiny", model_label="", model_note="", numel=1, tensors=1,
                          dtype="bf16", contender=contender,
                          ours=contender.startswith("fusedaccum"), times=list(times))


def test_per_round_ratio_follows_the_rounds():
    """The host ran 3x slower in rounds 3 to 5 for the peer and in rounds 4 and 5 for ours
    (a change between the two windows of round 3): each round's peer / ours is 1.5 but in
    round 3, which the per-round ratio gives, while the two medians fell on either side of
    the change (4.5 / 1)."""
    ours = _timed("fusedaccum[cuda]", [1.0, 1.0, 1.0, 3.0, 3.0])
    peer = _timed("recipe", [1.5, 1.5, 4.5, 4.5, 4.5, 9.0])  # (a round ours did not run)
    assert B.window_ratios([ours, peer])[0][2] == 4.5
    assert B.paired_ratio(ours, peer) == (1.5, 1.5, 1.5)  # (round 3's 4.5 beyond q3)
    ours.times[2] = 3.0  # no change inside a round: both read 1.5
    assert B.window_ratios([ours, peer])[0][2] == 1.5
    assert B.paired_ratio(ours, peer) == (1.5, 1.5, 1.5)
    assert B.paired_ratio(ours, _timed("recipe", [])) is None
    assert B.paired_ratio(ours, _timed("recipe", [2.0])) == (2.0, 2.0, 2.0)
    assert B.paired_ratio(_timed("fusedaccum[cuda]", [1.0, 1.0]),
                          _timed("recipe", [1.0, 3.0])) == (2.0, 1.5, 2.5)


def test_quartiles_stay_within_the_values():
    """Quartiles interpolate between the values measured, never beyond them: from two
    rounds, statistics.quantiles' default extrapolated a per-round ratio's first quartile
    below zero (window_phases printed "(-0.22-2.52)")."""
    assert B.quartiles([0.5, 5.0]) == (1.625, 3.875)
    assert B.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)
    assert B.quartiles([7.0]) == (7.0, 7.0)


def test_memory_plan_groups_what_fits_and_names_what_does_not(monkeypatch):
    """All contenders in one group when they fit together; else one group per (ours,
    peer) pair that fits, and a note for each pair that does not. GPT-2 XL's list on an
    80 GB card (68.9 GiB free, as an H100 had): ours against the recipe fits as a pair."""
    wl = B.Workload(B.MODELS["tiny"], CPU, torch.bfloat16)
    monkeypatch.setattr(wl, "numel", B.MODELS["gpt2-1.5b"].numel)
    factories = [f for f in B._contender_factories(wl, ["cuda"], False, [])
                 if f[0] in ("fusedaccum[cuda]", "tutorial", "recipe")]  # (not CPU peers)
    assert [f[0] for f in factories] == ["fusedaccum[cuda]", "tutorial", "recipe"]
    gib = 1 << 30
    monkeypatch.setattr(B, "available_memory", lambda device: 200 * gib)
    assert B._plan_groups(factories, wl, []) == [factories]  # all at once
    notes = []
    monkeypatch.setattr(B, "available_memory", lambda device: int(68.87 * gib))
    groups = B._plan_groups(factories, wl, notes)
    assert [[f[0] for f in g] for g in groups] == [["fusedaccum[cuda]", "tutorial"],
                                                   ["fusedaccum[cuda]", "recipe"]]
    notes = []
    monkeypatch.setattr(B, "available_memory", lambda device: 40 * gib)
    assert B._plan_groups(factories, wl, notes) == []
    assert any("fusedaccum[cuda] vs recipe" in n and "skipped" in n for n in notes)


# --------------------------------------------------------------------------- CLI


def _quick_args(tmp_path, *extra):
    return ["--quick", "--sizes", "1K,4K", "--models", "tiny", "--out", str(tmp_path),
            "--no-progress", "--copy-size", "256K", "--budget", "0.003",
            "--window-budget", "0.02", "--backends", "reference", "--max-buffer-sets", "4",
            *extra]


def test_quick_run_writes_markdown_and_csv(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FUSEDACCUM_TRITON_LAUNCH", "jit")
    monkeypatch.delenv("FUSEDACCUM_BACKEND", raising=False)
    assert B.main(_quick_args(tmp_path, "--no-plot")) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "GB/s" in out
    assert "environment: `FUSEDACCUM_TRITON_LAUNCH=jit`" in out
    md = sorted(p for p in os.listdir(tmp_path) if p.endswith(".md"))
    csvs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".csv"))
    assert len(md) == 1 and len(csvs) == 1
    assert md[0].endswith("_quick.md") and md[0][:-len("_quick.md")] == csvs[0][:-len("_quick.csv")]
    text = (tmp_path / md[0]).read_text()
    assert "## Ops" in text and "## Windows" in text and "copy bandwidth" in text
    assert "= **34**" in text  # the byte accounting is written out
    env_line = next(line for line in text.split("\n") if line.startswith("- environment: "))
    assert "`FUSEDACCUM_TRITON_LAUNCH=jit`" in env_line and "BACKEND" not in env_line
    with open(tmp_path / csvs[0]) as f:
        rows = list(csv.DictReader(f))
    ops_rows = [r for r in rows if r["section"] == "op"]
    assert len(ops_rows) == len(B.OP_SPECS) * 2 * 2  # 2 sizes x (reference, the torch peer)
    assert "| reference vs torch |" in text
    for r in ops_rows:
        assert r["backend"] in ("reference", B.PEER) and not r["note"], r
        assert float(r["gbps"]) > 0 and float(r["frac_copy_bw"]) >= 0  # (4 decimals)
        assert int(r["bytes_moved"]) == int(r["bytes_per_elem"]) * int(r["numel"])
    assert any(r["section"] == "copy_bw" and r["note"] == "reference" for r in rows)
    ratios = [r for r in rows if r["section"] == "window_ratio"]
    assert {r["name"] for r in ratios} == {f"{p} / fusedaccum[reference]" for p in PEERS}
    for r in ratios:
        q1, med, q3 = (float(r[f"ratio_per_round_{s}"]) for s in ("q1", "median", "q3"))
        assert 0 < q1 <= med <= q3, r
    assert "per round (quartiles)" in text
    assert not any(p.endswith(".png") for p in os.listdir(tmp_path))  # --no-plot


def test_main_accepts_a_namespace_and_selects_ops(tmp_path):
    ns = B.build_parser().parse_args(_quick_args(tmp_path, "--ops", "accumulate_",
                                                 "--no-windows"))
    assert B.main(ns) == 0
    (csv_path,) = [p for p in os.listdir(tmp_path) if p.endswith(".csv")]
    with open(tmp_path / csv_path) as f:
        rows = list(csv.DictReader(f))
    assert {r["name"] for r in rows if r["section"] == "op"} == {"accumulate_bf16",
                                                                 "accumulate_fp32"}
    assert not [r for r in rows if r["section"].startswith("window")]


def _bench_script(name):
    path = os.path.join(os.path.dirname(__file__), "..", "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_window_phases_reports_every_contender_and_restores_the_wrapper(capsys, tmp_path):
    from fusedaccum import accumulator
    from fusedaccum.accumulator import FusedAccumulator

    timed = ("_boundary", "_flush", "_check_buckets", "_fused_prepare", "_total_norm",
             "_fused_update", "_read_later", "_record_fused_steps", "_bump_updated_params",
             "_inner_stepped", "_end_window")
    flush = accumulator._BATCH_FLUSH_BYTES, accumulator._BATCH_FLUSH_BYTES_CPU
    before = {name: vars(FusedAccumulator)[name] for name in timed}
    table, launch = triton_ops._TABLE_UPLOAD, triton_ops._LAUNCH
    batch_max = accumulator._BATCH_MAX_NUMEL
    backends = [b for b in B.bench_backends(torch.device("cpu"))[0] if b != "triton"]
    _bench_script("window_phases").main(["--model", "tiny", "--device", "cpu", "--rounds", "2",
                                         "--backends", ",".join(backends), "--flush-mib", "1",
                                         "--variants",
                                         f"python-hooks,flush=2,{backends[-1]}:flush=3,"
                                         "table=cached,launch=direct,launch=cxx,"
                                         "python-flush,batch-max=64,python-walks,"
                                         "flag-first,no-read",
                                         "--premade-grads", "--json", str(tmp_path / "p.json"),
                                         "--profile", f"fusedaccum[{backends[0]}] flag-first",
                                         "--profile-windows", "1"])
    out = capsys.readouterr().out
    with open(tmp_path / "p.json") as f:  # the medians of the table, by contender and phase
        medians = json.load(f)
    assert set(medians) == {f"fusedaccum[{b}]" for b in backends} | {
        f"fusedaccum[{backends[0]}] {v}" for v in ("python-hooks", "flush=2", "table=cached",
                                                   "launch=direct", "launch=cxx",
                                                   "python-flush", "batch-max=64",
                                                   "python-walks", "flag-first",
                                                   "no-read")} | {
        f"fusedaccum[{backends[-1]}] flush=3", "recipe", "tutorial"}
    assert medians["recipe"]["window"] > 0 and "boundary" in medians["recipe"]
    assert f"{medians['tutorial']['window'] * 1e3:.2f} ms" in out
    parts = medians[f"fusedaccum[{backends[0]}]"]
    assert "boundary: rest" in parts
    # the read of the found-inf flag after the update is queued (not with flag-first),
    # and the boundary's other parts
    assert "boundary: found-inf read (the wait)" in parts
    for variant in ("flag-first", "no-read"):
        assert "boundary: found-inf read (the wait)" not in medians[
            f"fusedaccum[{backends[0]}] {variant}"]
    for part in ("_check_buckets", "_fused_prepare", "_total_norm", "_fused_update",
                 "_record_fused_steps", "_bump_updated_params", "_inner_stepped",
                 "_end_window"):
        assert 0 < parts[f"boundary: {part}"] < parts["boundary (all)"], part
    assert "batch flush 1 MiB" in out and "pre-made gradients" in out
    assert B._Deliver.fresh  # put back (fresh gradients are the default)
    assert f"| fusedaccum[{backends[0]}] python-hooks | window |" in out
    assert f"| fusedaccum[{backends[0]}] flush=2 | " in out and "| recipe window / its" in out
    assert re.search(rf"\| fusedaccum\[{backends[0]}\] \| [0-9.]+x \| [0-9.]+x "
                     rf"\([0-9.]+-[0-9.]+\) \|", out)  # the per-round ratio
    assert f"| fusedaccum[{backends[-1]}] flush=3 | window |" in out
    assert f"| fusedaccum[{backends[0]}] table=cached | window |" in out
    assert f"| fusedaccum[{backends[0]}] launch=direct | window |" in out
    assert f"| fusedaccum[{backends[0]}] launch=cxx | window |" in out
    assert f"| fusedaccum[{backends[0]}] python-flush | window |" in out
    assert f"| fusedaccum[{backends[0]}] flag-first | window |" in out
    assert f"#### cProfile of fusedaccum[{backends[0]}] flag-first, 1 windows" in out
    assert "function calls" in out.split("#### cProfile of")[1]  # (pstats header)
    assert accumulator._TABLE_FLUSH and accumulator._READ_FLAG_LATE  # put back
    assert os.environ.get("FUSEDACCUM_FAST_HOOKS") is None  # put back
    assert (triton_ops._TABLE_UPLOAD, triton_ops._LAUNCH) == (table, launch)  # put back
    assert (accumulator._BATCH_FLUSH_BYTES, accumulator._BATCH_FLUSH_BYTES_CPU) == flush
    assert accumulator._BATCH_MAX_NUMEL == batch_max  # put back
    for b in backends:
        assert f"| fusedaccum[{b}] | window |" in out
        assert f"| fusedaccum[{b}] |  boundary: _fused_update |" in out
    assert "| recipe | boundary |" in out and "| tutorial | window |" in out
    assert {name: vars(FusedAccumulator)[name] for name in timed} == before  # unwrapped


def test_window_phases_batch_max_holds_while_its_contender_is_built(monkeypatch):
    from fusedaccum import accumulator

    wp = _bench_script("window_phases")
    seen = []
    monkeypatch.setattr(B, "FusedContender",
                        lambda wl, backend: seen.append(accumulator._BATCH_MAX_NUMEL) or backend)
    before = accumulator._BATCH_MAX_NUMEL
    assert wp._variant(None, "triton", "batch-max=16M") == "triton"
    assert seen == [16 << 20] and accumulator._BATCH_MAX_NUMEL == before


def test_window_phases_leaves_out_a_contender_that_fails(capsys, tmp_path):
    """A contender that raises in a round (a launch mode this Triton cannot do) is
    reported as failed and left out; the others are timed and written as before."""
    wp = _bench_script("window_phases")
    real, calls = wp.run_ours, []

    def run_ours(c, clock):
        calls.append(c)
        if getattr(c, "triton_settings", {}).get("_LAUNCH") == "direct" and \
                calls.count(c) == 2:
            raise IndexError("tuple index out of range")
        real(c, clock)

    wp.run_ours = run_ours
    backend = [b for b in B.bench_backends(torch.device("cpu"))[0] if b != "triton"][0]
    wp.main(["--model", "tiny", "--device", "cpu", "--rounds", "3", "--backends", backend,
             "--variants", "launch=direct", "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    with open(tmp_path / "p.json") as f:
        medians = json.load(f)
    name = f"fusedaccum[{backend}] launch=direct"
    assert set(medians) == {f"fusedaccum[{backend}]", "recipe", "tutorial"}
    assert (f"| {name} | failed, left out | round 1: IndexError: tuple index out of range |"
            in out)
    assert len([c for c in calls if getattr(c, "triton_settings", None)]) == 2  # not after
    assert len(calls) == 5 + 2 and medians[f"fusedaccum[{backend}]"]["window"] > 0


def test_launch_costs_times_the_pieces_that_run_here(capsys):
    _bench_script("launch_costs").main(["--device", "cpu", "--rounds", "1", "--calls", "1"])
    out = capsys.readouterr().out
    assert "| piece | median per call |" in out
    if native.unavailable_reason("cpu", torch.device("cpu")) is None:
        assert "| native accumulate_many_ (12 pairs) |" in out
        assert "| C++ flush_batch, native op (12 pairs, with the refill) |" in out
    if native.hooks_module() is not None and \
            triton_ops.unavailable_reason("triton", torch.device("cpu")) is None:
        for mode in ("jit", "direct"):  # (cxx on CUDA only)
            assert (f"| C++ flush_batch, triton table launched as '{mode}' (12 pairs, with "
                    "the refill) |") in out
        assert "launched as 'cxx'" not in out


def test_many_bandwidth_times_both_paths_of_the_batch_kernel(capsys):
    if triton_ops.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("needs Triton's interpreter")
    _bench_script("many_bandwidth").main(["--device", "cpu", "--budget", "0.01"])
    out = capsys.readouterr().out
    assert "| shape | kernel | median per call | GB/s | of copy |" in out
    for case in ("one pair of 64K + 5", "three small pairs"):
        for kernel in ("triton batch kernel, aligned", "triton batch kernel, misaligned",
                       "triton accumulate_ per pair, aligned"):
            assert f"| {case} | {kernel} | " in out


def test_flush_host_cost_times_both_flushes_and_puts_triton_back(capsys):
    if native.hooks_module() is None or \
            triton_ops.unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("needs the C++ hook and Triton's interpreter")
    from fusedaccum import accumulator

    launch, flush = triton_ops._launch_many_kernel, accumulator._BATCH_FLUSH_BYTES
    _bench_script("flush_host_cost").main(["--model", "tiny", "--rounds", "1", "--calls", "2",
                                           "--flush-mib", "0.0001"])
    out = capsys.readouterr().out
    assert "accumulate_many_, 28 pairs:" in out
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip()
            for line in out.splitlines() if line.startswith("| ") and " ms |" in line}
    assert rows.keys() == {"table flush (C++ hook)", "python-flush"}
    assert int(rows["table flush (C++ hook)"]) > 0 and rows["python-flush"] == "0"
    assert (triton_ops._launch_many_kernel, accumulator._BATCH_FLUSH_BYTES) == (launch, flush)


def test_hook_costs_times_every_contender(tmp_path, capsys):
    if native.hooks_module() is None:
        pytest.skip("the C++ extension (with its batching hook) is unavailable here")
    _bench_script("hook_costs").main(["--device", "cpu", "--params", "20", "--rounds", "2",
                                      "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for row in ("plain autograd", "C++ hook", "C++ hook, flush per grad", "Python hook",
                "Python hook, flush per grad"):
        assert f"| {row} | " in out
    assert len(list(tmp_path.glob("*_hook_costs.md"))) == 1
    assert os.environ.get("FUSEDACCUM_FAST_HOOKS") is None  # put back


def test_cpu_adam_peers_times_our_step(tmp_path, capsys):
    _bench_script("cpu_adam_peers").main(["--sizes", "4M", "--rounds", "1", "--out",
                                          str(tmp_path)])
    out = capsys.readouterr().out
    assert "| 4M | fusedaccum cpu, keep acc | 28 |" in out
    assert "| 4M | torch AdamW(fused=True) | 28 |" in out
    assert len(list(tmp_path.glob("*_adam_peers.md"))) == 1


def test_gc_paused_while_timing_and_restored_after_an_error():
    import gc

    assert gc.isenabled()
    with pytest.raises(RuntimeError, match="boom"):
        with B.gc_paused():
            assert not gc.isenabled()
            raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with B.gc_paused():
            pass
        assert not gc.isenabled()  # it stays as the caller had it
    finally:
        gc.enable()


def test_pick_launch_takes_the_fastest_launch_mode_past_the_margin(tmp_path, capsys,
                                                                   monkeypatch):
    pick = _bench_script("pick_launch")
    table = {"fusedaccum[triton]": {"window": 0.0236},
             "fusedaccum[triton] launch=direct": {"window": 0.0220},
             "fusedaccum[triton] launch=cxx": {"window": 0.0185},
             "fusedaccum[triton] flush=128": {"window": 0.0100},  # not a launch mode
             "fusedaccum[cuda]": {"window": 0.0150}, "recipe": {"window": 0.0240}}
    assert pick.pick(table, "jit", 0.02)[0] == "cxx"
    table["fusedaccum[triton] launch=cxx"]["window"] = 0.0233  # both within 2%: kept
    table["fusedaccum[triton] launch=direct"]["window"] = 0.0234
    mode, why = pick.pick(table, "jit", 0.02)
    assert mode == "jit" and "2%" in why, why
    assert pick.pick(table, "jit", 0.05)[0] == "jit"
    assert pick.pick(table, "jit", 0.0)[0] == "cxx"  # the fastest of the two faster ones
    with pytest.raises(KeyError):
        pick.pick({"recipe": {"window": 1.0}}, "jit", 0.02)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("FUSEDACCUM_TRITON_LAUNCH", "direct")  # the plain contender's mode
    assert pick.main([str(path), "--margin", "0.01"]) == 0
    out, err = capsys.readouterr()
    assert out == "cxx\n" and "against 23.60 ms for direct" in err
    monkeypatch.delenv("FUSEDACCUM_TRITON_LAUNCH")  # unset: ops/triton.py's default
    assert pick.main([str(path), "--margin", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert out == f"{triton_ops._launch_from_env()}\n" == f"{pick.DEFAULT}\n", err
    path.write_text(json.dumps({"recipe": {"window": 1.0}}))
    assert pick.main([str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "no fusedaccum[triton] window" in err


# --------------------------------------------------------------------------- numbers
# (a mutation audit of bench.py found these computed numbers checked only for being > 0)


def test_time_calls_is_the_median_per_call_of_the_timed_samples(monkeypatch):
    """A fake clock that only the calls advance: two warm-up calls of 0.25 s, then five
    samples of 3 calls (target 0.75 s / 0.25 s per call) costing 1, 2, 3, 4 and 100 s per
    call. The result is the median per call (3: not the mean, 22; not a sample's total,
    9), with the quartiles of the samples, and the warm-up calls are not among them."""
    clock = [0.0]
    per_sample = [1.0, 2.0, 3.0, 4.0, 100.0]

    def call(i):
        clock[0] += 0.25 if i < 2 else per_sample[(i - 2) // 3]

    monkeypatch.setattr(B, "time", type("Clock", (), {"perf_counter": lambda: clock[0]}))
    t = B.time_calls(call, CPU, B.TimingConfig(budget_s=0.0, warmup_s=0.0, min_samples=5,
                                              target_sample_s=0.75))
    assert (t.samples, t.calls_per_sample) == (5, 3)
    assert (t.median_s, t.q1_s, t.q3_s) == (3.0, 2.0, 4.0)


def _fixed_timings(monkeypatch, medians):
    """B.time_calls replaced: each call runs ``fn`` over a few call numbers and returns
    the next of ``medians`` (seconds per call); returns the call numbers given."""
    it, seen = iter(medians), []

    def time_calls(fn, device, tc, n_sets=1):
        for i in range(3 * n_sets):
            fn(i)
            seen.append(i)
        return B.Timing(next(it), 0.0, 0.0, 1, 1, n_sets)

    monkeypatch.setattr(B, "time_calls", time_calls)
    return seen


def test_copy_bandwidth_counts_a_read_and_a_write_and_takes_the_faster_method(monkeypatch):
    n = 1000
    _fixed_timings(monkeypatch, [2e-3, 1e-3])  # copy_, then mul_ (twice as fast)
    bw = B.measure_copy_bandwidth(CPU, n, B.TimingConfig())
    moved = 2 * n * torch.empty((), dtype=torch.float32).element_size()  # read + write
    assert bw.results == pytest.approx({"copy_": moved / 2e-3 / 1e9, "mul_": moved / 1e-3 / 1e9})
    assert (bw.method, bw.gbps, bw.numel) == ("mul_", bw.results["mul_"], n)


def test_combined_copy_bandwidth_is_the_best_measurement():
    ms = [B.CopyBandwidth(g, "copy_", 64, {"copy_": g, "mul_": g / 2}) for g in (10.0, 30.0, 20.0)]
    best = B.combine_copy_bandwidth(ms)
    assert (best.gbps, best.method) == (30.0, "copy_ #2")
    assert best.results == {"copy_ #1": 10.0, "mul_ #1": 5.0, "copy_ #2": 30.0,
                            "mul_ #2": 15.0, "copy_ #3": 20.0, "mul_ #3": 10.0}


# which input tensors each op must read and write (DESIGN.md section 3): the bytes are
# counted from the tensors themselves here, not from bench.byte_breakdown
_READS = {"accumulate_": ("grad", "acc"), "grad_norm": ("acc",),
          "adamw_step_": ("acc", "param", "exp_avg", "exp_avg_sq"),
          "sgd_step_": ("acc", "param", "momentum_buffer")}
_WRITES = {"accumulate_": ("acc",), "grad_norm": (),
           "adamw_step_": ("param", "exp_avg", "exp_avg_sq", "model_out", "acc"),
           "sgd_step_": ("param", "momentum_buffer", "model_out", "acc")}


def test_op_gbps_counts_the_bytes_of_the_tensors_and_rotates_every_set(monkeypatch):
    """GB/s = the bytes of the tensors the op reads and writes / the median time per call,
    as a fraction of the copy bandwidth given; every call set of the rotation is used."""
    n, median, copy_bw = 1024, 2e-6, 50.0
    specs = list(B.OP_SPECS.values())
    _fixed_timings(monkeypatch, [median] * len(specs))
    monkeypatch.setattr(B, "last_level_cache_bytes", lambda device: 64 * 1024)
    ref, used = B._ops.get("reference", CPU), set()

    class Recording:  # the reference backend, noting the first tensor of each call
        def __getattr__(self, name):
            def call(first, *args, **kwargs):
                used.add((first[0] if isinstance(first, list) else first).data_ptr())
                return getattr(ref, name)(first, *args, **kwargs)
            return call

    monkeypatch.setattr(B._ops, "get", lambda name, device: Recording())
    for spec in specs:
        used.clear()
        (r,) = B.run_op_benchmarks([spec], [n], ["reference"], CPU, B.TimingConfig(), copy_bw,
                                   B.Progress(1, enabled=False))
        assert r.op == spec.key and not r.note, r
        x = B.make_op_inputs(spec, n, CPU)
        moved = sum(x[k].numel() * x[k].element_size()
                    for k in _READS[spec.op] + _WRITES[spec.op])
        assert r.gbps == pytest.approx(moved / median / 1e9), spec.key
        assert r.frac == pytest.approx(r.gbps / copy_bw), spec.key
        set_bytes = sum(t.numel() * t.element_size() for t in x.values() if t.dim() == 1)
        want_sets = math.ceil(B.ROTATION_CACHE_MULTIPLE * 64 * 1024 / set_bytes)
        assert r.timing.n_sets == want_sets > 1, spec.key
        assert len(used) == want_sets, spec.key  # every set is called (the sets rotate)


def _op_result(backend, median, gbps, frac):
    return B.OpResult(op="accumulate_bf16", label="", backend=backend, numel=1024,
                      bytes_per_elem=10, timing=B.Timing(median, median, median, 1, 1),
                      gbps=gbps, frac=frac)


def test_ops_table_columns_and_the_ratio_against_torch():
    """Per backend: time, GB/s, %copy; `<backend> vs torch` = torch's time / the backend's."""
    headers, rows = B._ops_table_rows([_op_result("reference", 2e-6, 5.12, 0.5),
                                       _op_result(B.PEER, 6e-6, 1.71, 0.25)],
                                      ["reference", B.PEER])
    (row,) = rows
    cell = dict(zip(headers, row))
    assert (cell["size"], cell["B/elt"]) == ("1K", "10")
    assert (cell["reference time"], cell["reference GB/s"], cell["reference %copy"]) == \
        ("2.0 us", "5.12", "50%")
    assert (cell["torch GB/s"], cell["torch %copy"]) == ("1.71", "25%")
    assert cell["reference vs torch"] == "3.00x"  # > 1: the backend is faster


def test_window_floor_fraction_counts_bf16_gradients():
    """floor %copy of ours: per param per window with k=4 bf16 gradients, 4 x (the
    backward's fresh copy: read 2 + write 2; accumulate: read grad 2, read acc 4, write acc
    4) - 4 (the first accumulation overwrites) + norm (read acc 4) + AdamW (read acc,
    master, m, v 16, write master, m, v 12, bf16 model 2) = 86 B; 86 MB in 1 ms against
    172 GB/s is 50%. On a CPU the norm rides on the last accumulations (no read of its
    own): 82 B, 82 MB in 1 ms against 164 GB/s."""
    ours = _timed("fusedaccum[cpu]", [1e-3])
    ours.numel = 1_000_000
    headers, rows = B._window_table_rows([ours], [], 172.0, 4, torch.device("cuda"))
    assert dict(zip(headers, rows[0]))["floor %copy"] == "50%"
    headers, rows = B._window_table_rows([ours], [], 164.0, 4, CPU)
    assert dict(zip(headers, rows[0]))["floor %copy"] == "50%"


def test_every_contender_runs_k_micro_batches_of_the_same_gradients(monkeypatch):
    """The window benchmark compares like with like: each contender's window is k
    backward passes of the workload's gradients; the recipe's fp32 main grads hold their
    mean, the tutorial's p.grad the sum of grads / k."""
    wl = B.Workload(B.MODELS["tiny"], CPU, torch.float32)
    passes = []
    real = B._backward

    def counting(params, grads):
        passes.append(len(params))
        real(params, grads)

    monkeypatch.setattr(B, "_backward", counting)
    for c in (B.FusedContender(wl, _window_backends()[0]), B.TutorialContender(wl),
              B.RecipeContender(wl)):
        passes.clear()
        c.window()
        assert passes == [len(wl.shapes)] * wl.k, c.name
        c.close()
    recipe, tutorial = B.RecipeContender(wl), B.TutorialContender(wl)
    for _ in range(wl.k):
        real(recipe.params, wl.grads)
        real(tutorial.params, tutorial.grads)
    for g, main_grad, p in zip(wl.grads, recipe.main_grads, tutorial.params):
        torch.testing.assert_close(main_grad, g, rtol=1e-6, atol=0)
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=0)
    recipe.close()


def test_reported_fractions_are_against_the_best_copy_measurement(tmp_path, monkeypatch):
    """The copy bandwidth is measured before the run, before each op but the first and at
    the end; every %copy in the CSV is against the best of them, the one marked reference."""
    gbps = iter([10.0, 40.0, 20.0])

    def measure(device, numel, tc):
        g = next(gbps)
        return B.CopyBandwidth(g, "copy_", numel, {"copy_": g, "mul_": g / 2})

    monkeypatch.setattr(B, "measure_copy_bandwidth", measure)
    assert B.main(_quick_args(tmp_path, "--ops", "accumulate_", "--no-windows",
                              "--no-plot")) == 0
    with open(next(tmp_path.glob("*.csv"))) as f:
        rows = list(csv.DictReader(f))
    copies = {r["name"]: r for r in rows if r["section"] == "copy_bw"}
    assert [n for n, r in copies.items() if r["note"] == "reference"] == ["copy_ #2"]
    assert float(copies["copy_ #3"]["frac_copy_bw"]) == 0.5
    ops_rows = [r for r in rows if r["section"] == "op"]
    assert len(ops_rows) == 2 * 2 * 2  # 2 ops x 2 sizes x (reference, torch)
    for r in ops_rows:
        assert float(r["frac_copy_bw"]) == pytest.approx(float(r["gbps"]) / 40.0, abs=1e-4)


# --------------------------------------------------------------------------- second audit
# (a second mutation audit of bench.py: arguments, report columns and pairings that a
# wrong line left passing)


@pytest.mark.parametrize("text", ["0", "1.5", "1.0001K", "-4"])
def test_parse_size_refuses_zero_fractions_and_negatives(text):
    with pytest.raises(argparse.ArgumentTypeError, match="bad size"):
        B.parse_size(text)


def test_fmt_size_uses_a_unit_only_for_whole_multiples():
    assert [B.fmt_size(n) for n in (1536, (1 << 20) + 1024, 3 << 30)] == ["1536", "1025K", "3G"]


def test_time_calls_caps_the_samples_at_max_samples(monkeypatch):
    """A budget that allows 100 samples of one 1 s call takes max_samples (4) of them."""
    clock = [0.0]

    def call(i):
        clock[0] += 1.0

    monkeypatch.setattr(B, "time", type("Clock", (), {"perf_counter": lambda: clock[0]}))
    t = B.time_calls(call, CPU, B.TimingConfig(budget_s=100.0, warmup_s=0.0, min_samples=2,
                                              max_samples=4, target_sample_s=1.0))
    assert (t.samples, t.calls_per_sample, t.median_s) == (4, 1, 1.0)


@pytest.mark.parametrize("key", list(B.OP_SPECS))
def test_op_results_carry_the_op_bytes_and_at_most_max_sets_buffer_sets(monkeypatch, key):
    """bytes_per_elem (the CSV's bytes columns) is what the op must move per element, not
    what one input set holds; --max-buffer-sets caps the rotation however small the op."""
    spec = B.OP_SPECS[key]
    _fixed_timings(monkeypatch, [1e-6])
    monkeypatch.setattr(B, "last_level_cache_bytes", lambda device: 1 << 20)
    (r,) = B.run_op_benchmarks([spec], [256], ["reference"], CPU, B.TimingConfig(), 10.0,
                               B.Progress(1, enabled=False), max_sets=3)
    assert r.bytes_per_elem == spec.bytes_per_element
    assert r.timing.n_sets == 3  # (8 MiB / one set of a few KiB: hundreds wanted)
    (row,) = B._csv_rows(B.CopyBandwidth(10.0, "copy_", 64), [r], [], [])
    assert row["bytes_moved"] == spec.bytes_per_element * 256 and row["buffer_sets"] == 3


def _window(contender, times, model="tiny", group=0):
    r = _timed(contender, times)
    r.model, r.group = model, group
    return r


def test_window_ratios_pair_ours_with_peers_of_its_own_model_and_group():
    """A peer is compared with ours only where both were timed in the same alternated
    group on the same param list; a peer that never completed a window gets no ratio."""
    res = [_window("fusedaccum[cpu]", [1.0], group=0), _window("tutorial", [2.0], group=0),
           _window("fusedaccum[cpu]", [1.0], group=1), _window("recipe", [3.0], group=1),
           _window("recipe+DeepSpeedCPUAdam", [], group=1),
           _window("fusedaccum[cpu]", [2.0], model="gpt2-124m/8"),
           _window("tutorial", [8.0], model="gpt2-124m/8")]
    got = [(o.model, o.group, p.contender, ratio) for o, p, ratio in B.window_ratios(res)]
    assert got == [("tiny", 0, "tutorial", 2.0), ("tiny", 1, "recipe", 3.0),
                   ("gpt2-124m/8", 0, "tutorial", 4.0)]


def test_window_reports_median_ratio_and_floor_on_the_right_rows():
    """The CSV's window median is the median of the timed windows (2 s of 1, 2, 9: not the
    mean, 4), ratio_peer_over_ours = peer median / ours (> 1: ours faster); the table puts
    the ratios on our row and a floor %copy on ours only (the peers' floors differ)."""
    ours = _timed("fusedaccum[cpu]", [1.0, 2.0, 9.0])
    peer = _timed("recipe", [3.0, 5.0, 30.0])
    ours.numel = peer.numel = 1_000_000_000
    ratios = B.window_ratios([ours, peer])
    rows = B._csv_rows(B.CopyBandwidth(10.0, "copy_", 64), [], [ours, peer], ratios)
    by_name = {r["name"]: r for r in rows}
    assert by_name["fusedaccum[cpu]"]["median_s"] == "2" and by_name["recipe"]["median_s"] == "5"
    assert by_name["recipe / fusedaccum[cpu]"]["ratio_peer_over_ours"] == "2.5000"
    headers, table = B._window_table_rows([ours, peer], ratios, 41.0, 4, CPU)
    cells = {row[1]: dict(zip(headers, row)) for row in table}
    assert cells["fusedaccum[cpu]"]["floor %copy"] == "100%"  # 82 B x 1e9 / 2 s / 41 GB/s
    assert cells["recipe"]["floor %copy"] == ""
    assert cells["fusedaccum[cpu]"]["speed ratio peer/ours (or note)"] == "recipe 2.50x"
    assert cells["recipe"]["speed ratio peer/ours (or note)"] == ""


def test_op_reports_median_and_quartiles_in_their_own_columns():
    r = B.OpResult(op="grad_norm", label="grad_norm", backend="reference", numel=4096,
                   bytes_per_elem=4, timing=B.Timing(2e-6, 1e-6, 5e-6, 9, 1), gbps=8.192,
                   frac=0.5)
    (row,) = B._csv_rows(B.CopyBandwidth(10.0, "copy_", 64), [r], [], [])
    assert (row["median_s"], row["q1_s"], row["q3_s"]) == ("2e-06", "1e-06", "5e-06")
    headers, rows = B._ops_table_rows([r], ["reference"])
    assert dict(zip(headers, rows[0]))["reference time"] == "2.0 us"


def test_largest_size_rows_are_the_largest_timed_size_per_op():
    def result(op, n, timed=True):
        timing = B.Timing(1e-6, 1e-6, 1e-6, 1, 1) if timed else None
        return B.OpResult(op=op, label=op, backend="reference", numel=n, bytes_per_elem=4,
                          timing=timing)

    rows = B._largest_rows([result("grad_norm", 1024), result("grad_norm", 4096),
                            result("grad_norm", 16384, timed=False),  # (skipped: no memory)
                            result("accumulate_bf16", 2048), result("accumulate_bf16", 1024)])
    assert [(r.op, r.numel) for r in rows] == [("grad_norm", 4096), ("accumulate_bf16", 2048)]


def test_profiled_window_counts_outermost_ops_only():
    """`op calls` counts what Python launched: torch.zeros is one call, though it runs
    aten::empty and aten::zero_ (and fill_) inside."""
    class Zeros(B.Contender):
        def window(self):
            torch.zeros(64).mul_(2.0)

        model_params = fp32_weights = persistent_tensors = lambda self: []

    _peak, n_ops, n_kernels = B._profile_window(Zeros(None), CPU)
    assert (n_ops, n_kernels) == (2, None)


def _fast_main(monkeypatch, tmp_path, *extra):
    """B.main on fixed copy bandwidths (20 GB/s) and op timings (1 us per call): exit
    status and the CSV's rows."""
    monkeypatch.setattr(B, "measure_copy_bandwidth", lambda device, numel, tc: B.CopyBandwidth(
        20.0, "copy_", numel, {"copy_": 20.0}))

    def time_calls(fn, device, tc, n_sets=1):
        fn(0)
        return B.Timing(1e-6, 1e-6, 1e-6, 1, 1, n_sets)

    monkeypatch.setattr(B, "time_calls", time_calls)
    rc = B.main(_quick_args(tmp_path, "--no-plot", *extra))
    paths = list(tmp_path.glob("*.csv"))
    if not paths:
        return rc, []
    with open(paths[0]) as f:
        return rc, list(csv.DictReader(f))


def test_max_size_keeps_the_sizes_up_to_and_including_it(tmp_path, monkeypatch):
    rc, rows = _fast_main(monkeypatch, tmp_path, "--ops", "grad_norm", "--no-windows",
                          "--sizes", "1K,4K,16K", "--max-size", "4K")
    assert rc == 0
    assert sorted({int(r["numel"]) for r in rows if r["section"] == "op"}) == [1024, 4096]


@pytest.mark.parametrize("flag", ["--budget", "--window-budget"])
@pytest.mark.parametrize("value", ["0", "-1", "inf"])
def test_budgets_must_be_positive_and_finite(tmp_path, capsys, flag, value):
    assert B.main(_quick_args(tmp_path, flag, value)) == 2
    assert f"bench: {flag} must be a finite number of seconds > 0" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.md"))


def test_window_rounds_below_the_quick_minimum_is_the_number_of_rounds(tmp_path, monkeypatch):
    """--window-rounds 1 under --quick (whose minimum is 3 rounds) times one round."""
    rc, rows = _fast_main(monkeypatch, tmp_path, "--ops", "none", "--window-rounds", "1",
                          "--no-profile")
    assert rc == 0
    windows = [r for r in rows if r["section"] == "window"]
    assert windows and all(r["samples"] == "1" for r in windows), windows


@pytest.mark.parametrize("flag, fresh", [("--premade-grads", False), ("--fresh-grads", True),
                                         (None, True)])
def test_premade_grads_flag_reaches_the_windows(tmp_path, monkeypatch, flag, fresh):
    seen = []

    def run_windows(*args, **kwargs):
        seen.append(B._Deliver.fresh)
        return []

    monkeypatch.setattr(B, "run_windows", run_windows)
    rc, _ = _fast_main(monkeypatch, tmp_path, "--ops", "none", *([flag] if flag else []))
    assert rc == 0 and seen == [fresh]
    assert B._Deliver.fresh  # put back for whatever runs next


def test_cpu_peak_is_the_largest_cpu_total_of_the_memory_events():
    """Peak extra memory on a CPU: the largest 'Total Allocated' of the profiler's CPU
    memory events (Device Type 0); CUDA events (1) and other events do not count."""
    def mem(total, device_type=0):
        return {"name": "[memory]", "args": {"Total Allocated": total,
                                             "Device Type": device_type}}

    events = [mem(100), mem(4096), mem(1 << 30, device_type=1), mem(512),
              {"name": "aten::add_", "args": {"Total Allocated": 1 << 20}}]
    assert B.cpu_peak_allocated(None, events) == 4096
    assert B.cpu_peak_allocated(None, [mem(-8)]) == 0  # (below the start: no extra)
