"""Data parallel on Gloo: N ranks x k micro-batches == one process with N*k micro-batches.

``num_items`` is each rank's LOCAL item count of the window; the wrapper sums them.

Each case spawns 2 or 3 processes on 127.0.0.1 that train the same seeded model on
their own slices of the data, and compares the params and optimizer state with a
single-process run over all the micro-batches. The tensors live on the test backend's
first device (_models.DEFAULT_DEVICE): with FUSEDACCUM_TEST_BACKEND=cuda every rank
trains on the one GPU, and Gloo exchanges CUDA tensors (the wrapper's asynchronous
all-reduces of GPU buffers, as with NCCL, which needs a GPU per rank).
"""

import contextlib
import copy
import math
import os
import sys
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _models import DEFAULT_DEVICE, _backend_runs_on, assert_unchanged, snapshot

import fusedaccum

BACKEND = os.environ.get("FUSEDACCUM_TEST_BACKEND", "reference")
DEVICE = DEFAULT_DEVICE
pytestmark = pytest.mark.skipif(not _backend_runs_on(DEVICE),
                                reason=f"backend {BACKEND!r} runs on no device here")
K = 2  # micro-batches per rank per window
WINDOWS = 3
MB = 4  # items per micro-batch


def _finish() -> None:
    """Leave together, then skip the interpreter's teardown.

    With torch 2.13 on Gloo, a child that has finished all its work (results written,
    process group destroyed, atexit handlers run) now and then aborts afterwards in a
    native thread during static destruction ("terminate called without an active
    exception"), with any backend, fusedaccum's or not. That is not what these tests
    check, so a worker that got here exits at once with status 0.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def _rank(rank, world, init):
    """This process as rank ``rank`` of a Gloo group met at ``init`` for the body; then leave
    together (_finish), or tear the group down and re-raise."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


def _rendezvous(tmp_path) -> str:
    """Where a test's ranks meet: a file of its own (FileStore) rather than a free TCP
    port, which another process on the machine could take between our look and rank 0's
    bind."""
    return f"file://{tmp_path}/rendezvous-{uuid.uuid4().hex}"


# What a rank imports before it runs (spawned, a rank spent 2-3 s of CPU importing torch,
# Dynamo and fusedaccum: most of a case on CI's 2 cores; see spawn_ranks)
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "fusedaccum", "_models"]


def spawn_ranks(fn, args, nprocs) -> None:
    """``torch.multiprocessing.spawn(fn, args, nprocs)``, with the ranks forked from a
    forkserver that imported torch, Dynamo and fusedaccum once (Python's multiprocessing
    starts it on first use, with this process's sys.path and environment; each rank
    imports ``fn``'s module after the fork). As with spawn, each rank starts from freshly
    imported modules, never from this process's state, and a rank's exception comes back
    with its traceback; what a rank prints goes where this process's output went when
    the forkserver started. Without a GPU only: a process that initialized CUDA cannot
    be forked, and the GPU machines have cores to spare. On CI's 2 cores the module's 57
    cases took 95 s instead of about 380."""
    if torch.cuda.is_available():
        mp.spawn(fn, args=args, nprocs=nprocs, join=True)
        return
    import multiprocessing.forkserver as forkserver

    forkserver.set_forkserver_preload(_PRELOAD)  # (no effect once it runs)
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def _model(dtype):
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
    # the last weight column-major (strides (1, 3)): the flat buffers, and so the shards,
    # hold a param's elements in its memory order
    last = model[2]
    last.weight = torch.nn.Parameter(last.weight.detach().t().contiguous().t())
    return model.to(device=DEVICE, dtype=dtype)


def _data(world):
    g = torch.Generator().manual_seed(3)
    n = (WINDOWS + 1) * world * K * MB  # one spare window for resuming elsewhere
    return torch.randn(n, 6, generator=g).to(DEVICE), torch.randn(n, 3, generator=g).to(DEVICE)


def _opt(cfg, model, **kw):
    if cfg["opt"] == "sgd":
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return fusedaccum.FusedAccumulator(inner, max_grad_norm=cfg["clip"],
                                       norm_type=cfg.get("norm_type", 2.0), backend=BACKEND, **kw)


def _micro_batches(x, y, window, world, rank):
    """The micro-batches rank ``rank`` of ``world`` runs in ``window``."""
    base = window * world * K
    for j in range(K):
        idx = base + rank * K + j
        yield x[idx * MB:(idx + 1) * MB], y[idx * MB:(idx + 1) * MB]


def _loss(model, x, y, cfg):
    out = model(x.to(cfg["dtype"])).float()
    if cfg["num_items"]:
        return torch.nn.functional.mse_loss(out, y, reduction="sum") / 3
    return torch.nn.functional.mse_loss(out, y)


def _backward(cfg, model, loss, poisoned):
    """``loss.backward()``; a poisoned micro-batch has an inf in its loss, or with
    ``poison_fc1`` in the first layer's weight gradient only (with ZeRO-1 on 2 ranks, the
    first half of the flat buffers, rank 0's shard: the other rank's is finite)."""
    handle = None
    if poisoned and cfg.get("poison_fc1"):
        handle = model[0].weight.register_hook(lambda g: torch.full_like(g, math.inf))
    elif poisoned:
        loss = loss * float("inf")
    loss.backward()
    if handle is not None:
        handle.remove()


def _train(cfg, model, opt, x, y, world, rank, windows, poison_window=None):
    for w in windows:
        for x_mb, y_mb in _micro_batches(x, y, w, world, rank):
            _backward(cfg, model, _loss(model, x_mb, y_mb, cfg),
                      poison_window == w and rank == world - 1)
            opt.step(num_items=K * MB if cfg["num_items"] else None)


def _worker(rank, world, init, cfg, out_dir):
    idle = int(cfg.get("idle_rank", False))
    with _rank(rank, world + idle, init):
        group = dist.group.WORLD
        if idle:  # the group is global ranks 1..world; global rank 0 is not in it
            group = dist.new_group(list(range(1, world + 1)))  # (every process calls it)
            if rank == 0:
                return
            rank -= 1  # (the rank in the group)
        x, y = _data(world)
        model = _model(cfg["dtype"])
        kw = dict(accumulation_steps=K, process_group=group,
                  shard_optimizer_state=cfg["shard"])
        opt = _opt(cfg, model, **kw)
        poison = cfg.get("poison")
        checkpoint = [k for k in ("resume_mid_window", "resume_before_step",
                                  "state_dict_mid_window") if cfg.get(k)]
        if checkpoint:
            _train(cfg, model, opt, x, y, world, rank, range(1), poison)
            # one micro-batch of window 1, then checkpoint, rebuild and resume (or, before
            # its step(), at micro-batch 0, or only take the state dict and go on)
            x_mb, y_mb = next(_micro_batches(x, y, 1, world, rank))
            _loss(model, x_mb, y_mb, cfg).backward()
            if checkpoint != ["resume_before_step"]:
                opt.step(num_items=K * MB if cfg["num_items"] else None)
            sd = copy.deepcopy(opt.state_dict())  # a collective: every rank calls it
            if checkpoint != ["state_dict_mid_window"]:
                msd = copy.deepcopy(model.state_dict())
                model = _model(cfg["dtype"])
                model.load_state_dict(msd)
                opt = _opt(cfg, model, **kw)
                opt.load_state_dict(sd)
            if checkpoint == ["resume_before_step"]:
                opt.step(num_items=K * MB if cfg["num_items"] else None)
            x_mb, y_mb = list(_micro_batches(x, y, 1, world, rank))[1]
            _loss(model, x_mb, y_mb, cfg).backward()
            opt.step(num_items=K * MB if cfg["num_items"] else None)
            _train(cfg, model, opt, x, y, world, rank, range(2, WINDOWS), poison)
        else:
            _train(cfg, model, opt, x, y, world, rank, range(WINDOWS), poison)
        sd = opt.state_dict()
        if rank == 0:
            torch.save({"params": [p.detach().clone() for p in model.parameters()],
                        "state": sd["state"], "masters": sd["fusedaccum"]["masters"],
                        "counts": (opt.update_count, opt.skipped_steps),
                        "memory": opt.optimizer_memory_bytes(),
                        "full": sd, "model": model.state_dict()},
                       os.path.join(out_dir, "result.pt"))


def _single(cfg, world, windows=WINDOWS, model=None, opt=None, start=0):
    """One process, N*k micro-batches per window."""
    x, y = _data(world)
    if model is None:
        model = _model(cfg["dtype"])
        opt = _opt(cfg, model, accumulation_steps=world * K)
    for w in range(start, windows):
        for r in range(world):
            for x_mb, y_mb in _micro_batches(x, y, w, world, r):
                _backward(cfg, model, _loss(model, x_mb, y_mb, cfg),
                          cfg.get("poison") == w and r == world - 1)
                opt.step(num_items=world * K * MB if cfg["num_items"] else None)
    return model, opt


CASES = [
    dict(world=2, shard=False, dtype=torch.float32, opt="adamw", clip=0.05, num_items=False),
    dict(world=2, shard=True, dtype=torch.bfloat16, opt="adamw", clip=None, num_items=True),
    dict(world=3, shard=True, dtype=torch.float32, opt="adamw", clip=0.05, num_items=False),
    dict(world=3, shard=True, dtype=torch.float16, opt="sgd", clip=0.1, num_items=False),
    dict(world=2, shard=True, dtype=torch.float32, opt="adamw", clip=0.05, num_items=False,
         resume_mid_window=True),
    dict(world=2, shard=False, dtype=torch.bfloat16, opt="adamw", clip=None, num_items=False,
         resume_mid_window=True),
    dict(world=2, shard=True, dtype=torch.float32, opt="adamw", clip=None, num_items=False,
         poison=1),
    # process_group a subgroup (global ranks 1 and 2 of 3): its own ranks and size, not the
    # default group's, for the shards, the window's D and the state dict's world_size; a
    # mid-window state_dict() taken and training going on leaves the window as it was
    dict(world=2, shard=False, dtype=torch.float32, opt="sgd", clip=None, num_items=False,
         idle_rank=True, state_dict_mid_window=True),
    dict(world=2, shard=True, dtype=torch.float32, opt="adamw", clip=0.05, num_items=False,
         idle_rank=True, resume_mid_window=True),
    # inf-norm clipping over ZeRO-1 shards, and an inf in rank 0's shard only: every rank
    # skips the window (the global inf-norm is the largest of the ranks', NaN if any is)
    dict(world=2, shard=True, dtype=torch.float32, opt="sgd", clip=0.05, num_items=False,
         norm_type=math.inf, poison=1, poison_fc1=True),
    # ZeRO-1, a checkpoint after the backward of a window's first micro-batch and before
    # its step(): the consolidated state dict holds every rank's gradients
    dict(world=2, shard=True, dtype=torch.float32, opt="sgd", clip=None, num_items=False,
         resume_before_step=True),
]


def _case_id(c):
    parts = [f"w{c['world']}", "zero1" if c["shard"] else "allreduce",
             str(c["dtype"]).split(".")[-1], c["opt"]]
    parts += [k for k in ("resume_mid_window", "resume_before_step", "state_dict_mid_window",
                          "poison", "poison_fc1", "num_items", "idle_rank")
              if c.get(k) is not None and c.get(k) is not False]
    parts += ["inf_norm"] if c.get("norm_type") == math.inf else []
    return "-".join(parts)


@pytest.mark.parametrize("cfg", CASES, ids=[_case_id(c) for c in CASES])
def test_data_parallel_equals_single_process(cfg, tmp_path):
    world = cfg["world"]
    spawn_ranks(_worker, args=(world, _rendezvous(tmp_path), cfg, str(tmp_path)),
                nprocs=world + cfg.get("idle_rank", False))
    got = torch.load(tmp_path / "result.pt")
    model, opt = _single(cfg, world)
    half = cfg["dtype"] != torch.float32
    tol = dict(rtol=1e-2, atol=1e-2) if half else dict(rtol=1e-5, atol=1e-6)
    for p_got, p_want in zip(got["params"], model.parameters()):
        torch.testing.assert_close(p_got, p_want.detach(), **tol)
    want_sd = opt.state_dict()
    assert got["counts"] == (opt.update_count, opt.skipped_steps)
    assert set(got["state"]) == set(want_sd["state"])
    for idx, st in want_sd["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(got["state"][idx][key], value, rtol=1e-4, atol=1e-6)
    for idx, m in want_sd["fusedaccum"]["masters"].items():
        torch.testing.assert_close(got["masters"][idx], m, rtol=1e-5, atol=1e-6)
    # ZeRO-1: masters + optimizer state per rank are about 1/N of one process's
    full = opt.optimizer_memory_bytes()
    if cfg["shard"]:
        assert full / world <= got["memory"] <= full / world + 4096, (got["memory"], full)
    else:
        assert got["memory"] == full


def _refusal_worker(rank, world, init, out_dir, case):
    """Build the wrapper on a model the wrapper must refuse; rank 0 saves the error."""
    with _rank(rank, world, init):
        model = _model(torch.float32)
        if case == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        elif case == "other ddp":  # (a DDP around another module of this process)
            other = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2).to(DEVICE))
        elif case == "fsdp2":  # (its params become DTensors, sharded over the ranks)
            from torch.distributed.fsdp import fully_shard
            model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Linear(10, 3))
            fully_shard(model)  # (contiguous params only)
        elif case == "mismatch" and rank == 1:  # rank 1 starts from other values
            with torch.no_grad():
                model[0].weight.add_(1.0)
        try:
            opt = fusedaccum.FusedAccumulator(torch.optim.AdamW(model.parameters()),
                                              process_group=dist.group.WORLD)
            if case == "ddp after wrapping":  # (fp32 params: the first step() looks for it)
                ddp = torch.nn.parallel.DistributedDataParallel(model)
                x, y = torch.randn(MB, 6, device=DEVICE), torch.randn(MB, 3, device=DEVICE)
                torch.nn.functional.mse_loss(ddp(x), y).backward()
                opt.step()
            msg = "no error"
        except (RuntimeError, ValueError, TypeError) as exc:
            msg = f"{type(exc).__name__}: {exc}"
        if case == "other ddp":
            del other
        if rank == 0:
            torch.save(msg, os.path.join(out_dir, "msg.pt"))


def _refusal(tmp_path, case) -> str:
    spawn_ranks(_refusal_worker, args=(2, _rendezvous(tmp_path), str(tmp_path), case), nprocs=2)
    return torch.load(tmp_path / "msg.pt")


@pytest.mark.parametrize("case", ["ddp", "ddp after wrapping"])
def test_ddp_wrapped_model_is_refused(tmp_path, case):
    """A DDP around the model, wrapped before the wrapper (its constructor refuses it) or
    after it, before the first step() (which refuses it before anything changes)."""
    msg = _refusal(tmp_path, case)
    assert msg.startswith("RuntimeError") and "DistributedDataParallel" in msg
    assert "process_group" in msg


def test_a_ddp_around_another_module_is_not_refused(tmp_path):
    """Only a DDP that holds the wrapper's params is refused, not one around another model
    of the same process."""
    assert _refusal(tmp_path, "other ddp") == "no error"


def _late_ddp_worker(rank, world, init, out_dir, case):
    """A bf16 model trains one window under the wrapper (process_group= set), then the
    second window's backwards run through a DistributedDataParallel wrapped around it
    ("late_ddp"; "late_ddp_static" with static_graph=True and "late_ddp_unused" with
    find_unused_parameters=True, whose reducers write no .grad: with the C++ hooks, which
    see their hooks), or with a .grad set by hand on each param ("by_hand"). Rank 0 saves
    what the second boundary's step() did and whether params, masters and state
    changed."""
    with _rank(rank, world, init):
        model = _model(torch.bfloat16)
        static, unused = case == "late_ddp_static", case == "late_ddp_unused"
        backend = "cpu" if (static or unused) and DEVICE == "cpu" else BACKEND
        opt = fusedaccum.FusedAccumulator(torch.optim.AdamW(model.parameters(), lr=1e-2),
                                          accumulation_steps=K, backend=backend,
                                          process_group=dist.group.WORLD)
        if (static or unused) and opt._cxx is None:
            if rank == 0:
                torch.save({"msg": "no C++ hooks"}, os.path.join(out_dir, "late.pt"))
            return
        x, y = _data(world)
        cfg = {"dtype": torch.bfloat16, "num_items": False}
        _train(cfg, model, opt, x, y, world, rank, [0])
        window = 1
        if case == "by_hand_then_ddp":  # a window with a .grad set by hand, a clean one
            for x_mb, y_mb in _micro_batches(x, y, 1, world, rank):
                _loss(model, x_mb, y_mb, cfg).backward()
                for p in model.parameters():
                    p.grad = torch.ones_like(p)
                opt.step()
            _train(cfg, model, opt, x, y, world, rank, [2])
            window = 3
        run = model
        if case != "by_hand":
            run = torch.nn.parallel.DistributedDataParallel(
                model, static_graph=static, find_unused_parameters=unused)
        snap = snapshot(model, opt)  # the params, masters and optimizer state
        for x_mb, y_mb in _micro_batches(x, y, window, world, rank):
            loss = _loss(run, x_mb, y_mb, cfg)
            loss.backward()
            if case == "by_hand":
                for p in model.parameters():
                    p.grad = torch.ones_like(p)
            try:
                opt.step()
                msg = "no error"
            except RuntimeError as exc:
                msg = f"RuntimeError: {exc}"
        try:
            assert_unchanged(snap, model, opt)
            changed = False
        except AssertionError:
            changed = True
        if rank == 0:
            torch.save({"msg": msg, "updates": opt.update_count, "changed": changed},
                       os.path.join(out_dir, "late.pt"))


@pytest.mark.parametrize("case", ["late_ddp", "late_ddp_static", "late_ddp_unused",
                                  "by_hand", "by_hand_then_ddp"])
def test_ddp_wrapped_after_the_first_step_is_refused_at_the_boundary(tmp_path, case):
    """DDP all-reduces zeros for the half params, whose .grad the hooks released: the
    ranks' windows would drift apart unseen. Its reducer writes a .grad into each after
    the hooks (none with static_graph=True or find_unused_parameters=True, where the C++
    hooks see its node hooks). A
    .grad set by hand is no DDP, and steps as before (the boundary drops it); a DDP wrapped
    after such a window and a window without any is refused as well."""
    spawn_ranks(_late_ddp_worker, args=(2, _rendezvous(tmp_path), str(tmp_path), case), nprocs=2)
    got = torch.load(tmp_path / "late.pt")
    if got["msg"] == "no C++ hooks":
        pytest.skip("the C++ extension's hooks do not run here")
    if case != "by_hand":
        assert got["msg"].startswith("RuntimeError") and "DistributedDataParallel" in got["msg"]
        assert "process_group" in got["msg"]
        assert got["updates"] == (3 if case == "by_hand_then_ddp" else 1)
        assert not got["changed"]
    else:
        assert got["msg"] == "no error" and got["updates"] == 2 and got["changed"]


def test_fsdp2_sharded_params_are_refused(tmp_path):
    """fully_shard's DTensor params: refused as tensor subclasses, saying what to use
    (they were refused as tied weights, which they are not). On CPU tensors only: with
    a GPU fully_shard's mesh would be a CUDA one, which Gloo's group does not serve."""
    if DEVICE != "cpu":
        pytest.skip("fully_shard with Gloo runs on CPU tensors; the test device is a GPU")
    msg = _refusal(tmp_path, "fsdp2")
    assert msg.startswith("TypeError") and "DTensor" in msg and "process_group" in msg


def test_params_that_differ_across_ranks_are_refused(tmp_path):
    msg = _refusal(tmp_path, "mismatch")
    assert msg.startswith("ValueError") and "differ across the ranks" in msg


def test_process_group_without_init_is_a_clear_error():
    model = _model(torch.float32)
    with pytest.raises(RuntimeError, match="not initialized"):
        fusedaccum.FusedAccumulator(torch.optim.AdamW(model.parameters()),
                                    process_group=object())


def test_sharding_needs_a_process_group():
    model = _model(torch.float32)
    with pytest.raises(ValueError, match="process_group"):
        fusedaccum.FusedAccumulator(torch.optim.AdamW(model.parameters()),
                                    shard_optimizer_state=True)


def test_bytes_per_window_counts_one_exchange_per_window():
    from fusedaccum.distributed import bytes_per_window

    n = 1_000_000
    # 4 ranks, k=8, bf16 params: DDP moves 8 bf16 all-reduces, we move one fp32 one
    b = bytes_per_window(n, 2, world=4, k=8, shard=False)
    assert b["fusedaccum"] == 2 * 0.75 * n * 4
    assert b["ddp_every_micro_batch"] == 8 * 2 * 0.75 * n * 2
    assert b["ratio"] == 4.0
    z = bytes_per_window(n, 2, world=4, k=8, shard=True)
    assert z["fusedaccum"] == 0.75 * n * 4 + 0.75 * n * 2
    assert bytes_per_window(n, 2, world=1, k=8, shard=False)["fusedaccum"] == 0


@pytest.mark.parametrize("cfg", [CASES[2], CASES[3]], ids=[_case_id(CASES[2]), _case_id(CASES[3])])
def test_sharded_checkpoint_resumes_on_another_world_size(cfg, tmp_path):
    """The consolidated state dict of N ranks resumes in one process, same trajectory."""
    world = cfg["world"]
    spawn_ranks(_worker, args=(world, _rendezvous(tmp_path), cfg, str(tmp_path)), nprocs=world)
    got = torch.load(tmp_path / "result.pt")
    model = _model(cfg["dtype"])
    opt = _opt(cfg, model, accumulation_steps=world * K)
    model.load_state_dict(got["model"])
    opt.load_state_dict(got["full"])
    _single(cfg, world, WINDOWS + 1, model, opt, start=WINDOWS)
    want_model, want_opt = _single(cfg, world, WINDOWS + 1)
    half = cfg["dtype"] != torch.float32
    tol = dict(rtol=1e-2, atol=1e-2) if half else dict(rtol=1e-5, atol=1e-6)
    for p_got, p_want in zip(model.parameters(), want_model.parameters()):
        torch.testing.assert_close(p_got.detach(), p_want.detach(), **tol)
    assert opt.update_count == want_opt.update_count == WINDOWS + 1
    got_sd, want_sd = opt.state_dict(), want_opt.state_dict()
    for idx, st in want_sd["state"].items():
        for key, value in st.items():
            torch.testing.assert_close(got_sd["state"][idx][key], value, rtol=1e-4, atol=1e-6)


def _misuse_worker(rank, world, init, out_dir, case):
    """Data-parallel misuse each rank must refuse with the same clear error (or, for the
    state dict cases, use that must work); rank 0 saves what happened."""
    with _rank(rank, world, init):
        torch.manual_seed(0)
        model = _model(torch.float32)
        group = dist.group.WORLD
        if case == "non-member":
            group = dist.new_group([0, 1])  # (every rank must call new_group)
        x, y = torch.randn(MB, 6, device=DEVICE), torch.randn(MB, 3, device=DEVICE)
        out = {}
        try:
            opt = fusedaccum.FusedAccumulator(
                torch.optim.AdamW(model.parameters()), backend=BACKEND, process_group=group,
                accumulation_steps=(K + rank) if case == "k differs" else K)
            if case == "gradscaler":
                opt = fusedaccum.FusedAccumulator(torch.optim.AdamW(model.parameters()),
                                                  backend=BACKEND, process_group=group)
                scaler = torch.amp.GradScaler(torch.device(DEVICE).type, init_scale=1024.0)
                scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
                scaler.step(opt)
            if case == "add_param_group differs":  # (a new head, seeded per rank)
                torch.manual_seed(rank)
                head = torch.nn.Linear(3, 2).to(DEVICE)
                opt.add_param_group({"params": list(head.parameters())})
            if case == "reset on one rank, then every rank loads a checkpoint":
                sd0 = copy.deepcopy(opt.state_dict())  # (at a boundary: this rank's own)
                try:  # as "reset on one rank": the boundary raises on every rank
                    for i in range(2 * K):
                        torch.nn.functional.mse_loss(model(x * (i + rank)), y).backward()
                        opt.step()
                        if rank == 1 and i == 0:
                            opt.reset_accumulation()
                except ValueError:
                    out["refused"] = True
                opt.load_state_dict(sd0)  # every rank: they agree again, and train on
            if case == "windows differ":
                sd0 = copy.deepcopy(opt.state_dict())  # (before the first window)
            for i in range(2 * K):
                if case == "reset on one rank":  # (one rank drops its partial window)
                    torch.nn.functional.mse_loss(model(x * (i + rank)), y).backward()
                    opt.step()
                    if rank == 1 and i == 0:
                        opt.reset_accumulation()
                    continue
                if case == "reset on every rank twice":  # (after micro-batches 0 and 1)
                    torch.nn.functional.mse_loss(model(x * (i + rank)), y).backward()
                    opt.step()
                    if i < 2:
                        opt.reset_accumulation()
                    continue
                if case == "state dict after a backward on one rank":
                    if rank == 0 or i % K:
                        torch.nn.functional.mse_loss(model(x * (i + rank)), y).backward()
                    if i % K == 0:  # a boundary was the last step(): every rank saves
                        out["sd"] = opt.state_dict()
                    opt.step()
                    continue
                torch.nn.functional.mse_loss(model(x * (i + rank)), y).backward()
                num_items = {"num_items on one rank": MB if rank == 0 else None,
                             # (a rank whose items were all masked, say)
                             "num_items 0 on one rank": 0 if rank == 0 else MB,
                             "num_items 0 on every rank": 0}.get(case)
                opt.step(num_items=num_items)
                if case == "windows differ" and rank == 1 and i == K - 1:
                    opt.load_state_dict(sd0)  # (rank 1 resumes from a window back)
                if case == "state dict on rank 0" and rank == 0 and opt.stepped:
                    out["sd"] = opt.state_dict()  # a boundary, unsharded: local
                if case == "mid-window state dict" and i == 0:
                    out["sd"] = opt.state_dict()  # a collective: every rank calls it
            out["msg"] = "no error"
            # the replicas are still the same (no collective went astray)
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            hi, lo = flat.clone(), -flat
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(lo, op=dist.ReduceOp.MAX, group=group)
            out["replicas_equal"] = torch.equal(hi, -lo)
        except (RuntimeError, ValueError) as exc:
            out["msg"] = f"{type(exc).__name__}: {exc}"
        # (the non-member case: the last rank is the one refused)
        if rank == (world - 1 if case == "non-member" else 0):
            torch.save(out, os.path.join(out_dir, "out.pt"))


@pytest.mark.parametrize("case,world,expected", [
    ("num_items on one rank", 2, "ValueError: step(num_items=...) was given on 1 of the 2"),
    ("num_items 0 on one rank", 2, "no error"),
    ("num_items 0 on every rank", 2, "ValueError: num_items summed over the 2 ranks is 0"),
    ("k differs", 2, "ValueError: the ranks' accumulation windows have different lengths"),
    # (it paired one rank's micro-batches with the other's next window, and then waited
    # for a boundary the other never reached)
    ("reset on one rank", 2, "ValueError: reset_accumulation() was called on some ranks"),
    ("reset on every rank twice", 2, "no error"),
    # (the ranks that disagreed are refused until they agree again: a load on every rank)
    ("reset on one rank, then every rank loads a checkpoint", 2, "no error"),
    ("windows differ", 2, "ValueError: the ranks of process_group have ended different "
                          "numbers of windows"),
    # (taken as it was: the replicas then differed for good)
    ("add_param_group differs", 2, "ValueError: the params differ across the ranks"),
    ("gradscaler", 2, "RuntimeError: torch.amp.GradScaler with process_group"),
    ("non-member", 3, "ValueError: this process is not a member of process_group"),
    ("state dict on rank 0", 2, "no error"),
    ("state dict after a backward on one rank", 2, "no error"),
    ("mid-window state dict", 2, "no error"),
])
def test_data_parallel_misuse_is_refused_on_every_rank(tmp_path, case, world, expected):
    spawn_ranks(_misuse_worker, args=(world, _rendezvous(tmp_path), str(tmp_path), case),
                nprocs=world)
    out = torch.load(tmp_path / "out.pt")
    if expected is not None:
        assert out["msg"].startswith(expected), out["msg"]
    if out["msg"] == "no error":
        assert out["replicas_equal"]
    if case == "mid-window state dict":
        # taken after one of K micro-batches on 2 ranks: it resumes on 2 ranks only
        model = _model(torch.float32)
        opt = fusedaccum.FusedAccumulator(torch.optim.AdamW(model.parameters()),
                                          backend=BACKEND, accumulation_steps=2 * K)
        with pytest.raises(ValueError, match="in the middle of a window .* on 2 process"):
            opt.load_state_dict(out["sd"])
        assert opt.micro_step == 0 and opt.update_count == 0
    if case == "state dict on rank 0":
        assert out["sd"]["fusedaccum"]["world_size"] == 2
    if case == "reset on one rank, then every rank loads a checkpoint":
        assert out["refused"]


def _retry_worker(rank, world, init, out_dir, shard, how):
    """A boundary that raises, then retried: an inner pre-hook that raises after the
    gradients were exchanged ("hook"), or a group's betas the update cannot read, refused
    before the exchange ("betas", set right for the retry). The same update as without
    the failure, bitwise (the window is not exchanged twice, nor lost under ZeRO-1, nor
    left unexchanged)."""
    with _rank(rank, world, init):
        def train(fail):
            torch.manual_seed(0)
            model = _model(torch.float32)
            inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
            failed = []

            def pre(o, args, kwargs):
                if fail and how == "hook" and not failed:
                    failed.append(True)
                    raise RuntimeError("a pre-hook failed")

            inner.register_step_pre_hook(pre)
            opt = fusedaccum.FusedAccumulator(
                inner, backend=BACKEND, accumulation_steps=K, max_grad_norm=0.5,
                process_group=dist.group.WORLD, shard_optimizer_state=shard)
            g = torch.Generator().manual_seed(100 + rank)
            for _ in range(2 * K):
                x = torch.randn(MB, 6, generator=g).to(DEVICE)
                y = torch.randn(MB, 3, generator=g).to(DEVICE)
                torch.nn.functional.mse_loss(model(x), y).backward()
                if fail and how == "betas" and not failed and opt.accumulation_boundary:
                    inner.param_groups[0]["betas"] = (0.9,)
                try:
                    opt.step()
                except (RuntimeError, ValueError):
                    if how == "betas":
                        failed.append(True)
                        inner.param_groups[0]["betas"] = (0.9, 0.999)
                    opt.step()  # the retry
                opt.zero_grad()
            assert opt.update_count == 2 and failed == ([True] if fail else [])
            return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

        same = torch.equal(train(False), train(True))
        if rank == 0:
            torch.save(same, os.path.join(out_dir, "same.pt"))


@pytest.mark.parametrize("shard,how", [(False, "hook"), (True, "hook"), (True, "betas")],
                         ids=["allreduce", "zero1", "zero1-refused_before_the_exchange"])
def test_a_boundary_retried_after_the_exchange_is_not_exchanged_again(tmp_path, shard, how):
    spawn_ranks(_retry_worker, args=(2, _rendezvous(tmp_path), str(tmp_path), shard, how), nprocs=2)
    assert torch.load(tmp_path / "same.pt")


class _TwoHeads(torch.nn.Module):
    """A trunk and two heads; a micro-batch goes through one head. (A third head no
    micro-batch reaches: no state entry for its params, as in torch.optim.)"""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(6, 10)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(10, 3) for _ in range(3)])

    def forward(self, x, head):
        return self.heads[head](torch.tanh(self.trunk(x)))


def _two_heads(shard, dtype, world, out_dir, rank=None):
    """Train _TwoHeads with the micro-batches of rank r going through head r % 2: on
    ``rank`` of a process group (saving its params), or in one process over every rank's
    micro-batches (``rank`` None; returns the params). fp32 params with AdamW, half params
    with SGD (whose update is proportional to the clip coefficient)."""
    x, y = _data(world)
    torch.manual_seed(11)
    model = _TwoHeads().to(device=DEVICE, dtype=dtype)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1) \
        if dtype == torch.float32 else torch.optim.SGD(model.parameters(), lr=0.5)
    kw = dict(accumulation_steps=K, process_group=dist.group.WORLD,
              shard_optimizer_state=shard) if rank is not None else \
        dict(accumulation_steps=world * K)
    opt = fusedaccum.FusedAccumulator(inner, max_grad_norm=0.05, backend=BACKEND, **kw)
    for w in range(WINDOWS):
        for r in range(world) if rank is None else [rank]:
            for x_mb, y_mb in _micro_batches(x, y, w, world, r):
                torch.nn.functional.mse_loss(model(x_mb.to(dtype), r % 2).float(), y_mb).backward()
                opt.step()
                opt.zero_grad()
    assert opt.update_count == WINDOWS
    params = [p.detach().clone() for p in model.parameters()]
    keys = sorted(opt.state_dict()["state"])  # (a collective with ZeRO-1: every rank)
    if rank is None:
        return params, keys
    torch.save((params, keys), os.path.join(out_dir, f"rank{rank}.pt"))
    return None


def _two_heads_worker(rank, world, init, shard, dtype, out_dir):
    with _rank(rank, world, init):
        _two_heads(shard, dtype, world, out_dir, rank)


@pytest.mark.parametrize("shard,dtype", [(False, torch.float32), (True, torch.float32),
                                         (False, torch.bfloat16)],
                         ids=["allreduce-fp32", "zero1-fp32", "allreduce-bf16"])
def test_a_param_only_another_rank_gave_a_gradient_is_updated_on_every_rank(tmp_path, shard,
                                                                             dtype):
    """Each rank's micro-batches reach one head only (rank r: head r % 2): every param got a
    gradient somewhere in the window, so every rank updates every param (which params
    take part is merged over the ranks at the boundary), the replicas stay equal, and
    they equal one process over all the micro-batches, clipped by the norm of the summed
    gradient (half params: not by a norm of this rank's own part, taken while it was
    accumulated). The state dict, consolidated with ZeRO-1, has an entry for each param
    that was stepped, as one process's, and none for a head no rank reached."""
    world = 2
    spawn_ranks(_two_heads_worker, args=(world, _rendezvous(tmp_path), shard, dtype, str(tmp_path)),
                nprocs=world)
    want, want_keys = _two_heads(shard, dtype, world, str(tmp_path))
    assert not {6, 7} & set(want_keys)  # (the third head's params)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for rank in range(world):
        got, keys = torch.load(tmp_path / f"rank{rank}.pt")
        assert keys == want_keys, f"rank {rank}"
        for i, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, b, **tol,
                                       msg=lambda m, i=i, rank=rank: f"rank {rank}, param {i}: {m}")


def _hook_sees_other_ranks_grads_worker(rank, world, init, out_dir):
    """Rank r's micro-batches reach head r % 2 only; the inner optimizer's pre-hook records
    each stepped tensor's .grad at the boundary (the heads' ones this rank never reached
    included). fp32 params, bf16 ones (fp32 masters), and fp32 ones with ZeRO-1."""
    with _rank(rank, world, init):
        x, y = _data(world)
        out = {}
        for dtype, shard in ((torch.float32, False), (torch.bfloat16, False),
                             (torch.float32, True)):
            torch.manual_seed(11)
            model = _TwoHeads().to(device=DEVICE, dtype=dtype)
            inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
            seen = out[str(dtype), shard] = []
            inner.register_step_pre_hook(lambda o, args, kwargs, seen=seen: seen.append(
                [None if t.grad is None else t.grad.detach().clone()
                 for g in o.param_groups for t in g["params"]]))
            opt = fusedaccum.FusedAccumulator(inner, backend=BACKEND, accumulation_steps=K,
                                              process_group=dist.group.WORLD,
                                              shard_optimizer_state=shard)
            for x_mb, y_mb in _micro_batches(x, y, 0, world, rank):
                torch.nn.functional.mse_loss(model(x_mb.to(dtype), rank % 2).float(),
                                             y_mb).backward()
                opt.step()
                opt.zero_grad()
            assert opt.update_count == 1
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_an_inner_pre_hook_sees_the_grad_only_another_rank_gave(tmp_path):
    """docs/usage.md: with a process group, the inner optimizer's pre-hooks find every param
    of the window with its .grad, also one only another rank's backward reached (here each
    rank's head the other rank trained): the same prepared (all-reduced) gradient on every
    rank; the third head, which no rank reached, has none. fp32 and bf16 params. With
    ZeRO-1 (the update reads the rank's reduced shard, which no .grad views) the hooks
    see no prepared gradient: a .grad is None, or zeros (the params this rank's backward
    reached: their accumulators, reduce-scattered away)."""
    world = 2
    spawn_ranks(_hook_sees_other_ranks_grads_worker,
                args=(world, _rendezvous(tmp_path), str(tmp_path)), nprocs=world)
    seen = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]
    for rank in range(world):
        calls = seen[rank][str(torch.float32), True]
        assert len(calls) == 1, f"ZeRO-1, rank {rank}"
        assert all(g is None or not g.any() for g in calls[0]), f"ZeRO-1, rank {rank}"
    for dtype in (torch.float32, torch.bfloat16):
        for rank in range(world):
            calls = seen[rank][str(dtype), False]
            assert len(calls) == 1, (dtype, rank)
            grads = calls[0]  # trunk (2 tensors), heads 0, 1, 2 (2 each)
            assert all(g is not None for g in grads[:6]), (dtype, rank)
            assert grads[6] is None and grads[7] is None, (dtype, rank)
            assert all(float(g.abs().sum()) > 0 for g in grads[:6]), (dtype, rank)
            for a, b in zip(grads[:6], seen[0][str(dtype), False][0][:6]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def _resume_at_shard_edge_worker(rank, world, init, out_dir):
    """ZeRO-1 with params that fill their shards to the last element (no alignment padding
    at the shard edge: elements 95 and 96 of the flat buffers are both fc1.weight's): a
    run that saves a state dict part-way through window 1 and resumes from it in a new
    model and wrapper, against one that does not stop."""
    with _rank(rank, world, init):
        x, y = _data(world)

        def build():
            torch.manual_seed(5)
            model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                        torch.nn.Linear(16, 3)).to(DEVICE)
            inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            return model, fusedaccum.FusedAccumulator(
                inner, accumulation_steps=K, max_grad_norm=0.05, backend=BACKEND,
                process_group=dist.group.WORLD, shard_optimizer_state=True)

        def micro(model, opt, w, j):
            x_mb, y_mb = list(_micro_batches(x, y, w, world, rank))[j]
            torch.nn.functional.mse_loss(model(x_mb), y_mb).backward()
            opt.step()
            opt.zero_grad()

        model, opt = build()
        for w in range(WINDOWS):
            for j in range(K):
                micro(model, opt, w, j)
        want = [p.detach().clone() for p in model.parameters()]
        want_state = opt.state_dict()["state"]
        model, opt = build()
        for w, j in [(0, j) for j in range(K)] + [(1, 0)]:
            micro(model, opt, w, j)
        sd, msd = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
        model, opt = build()
        model.load_state_dict(msd)
        opt.load_state_dict(sd)
        for w, j in [(1, j) for j in range(1, K)] + [(w, j) for w in range(2, WINDOWS)
                                                     for j in range(K)]:
            micro(model, opt, w, j)
        got = [p.detach().clone() for p in model.parameters()]
        torch.save({"want": want, "got": got, "want_state": want_state,
                    "got_state": opt.state_dict()["state"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_sharded_resume_with_params_filling_the_shard_edge(tmp_path):
    """Resuming a ZeRO-1 run loads every element of each rank's shard of the masters and
    the optimizer state, the shard's last one too (the cases above have alignment padding
    there, which a load that missed the last element would not show)."""
    world = 2
    spawn_ranks(_resume_at_shard_edge_worker, args=(world, _rendezvous(tmp_path), str(tmp_path)),
                nprocs=world)
    for rank in range(world):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for i, (a, b) in enumerate(zip(out["got"], out["want"])):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8,
                                       msg=lambda m, i=i, rank=rank: f"rank {rank}, param {i}: {m}")
        assert out["got_state"].keys() == out["want_state"].keys()
        for idx, st in out["want_state"].items():
            for key, value in st.items():
                torch.testing.assert_close(out["got_state"][idx][key], value, rtol=1e-6,
                                           atol=1e-8)


def _overflow_run(shard, hooked, world, out_dir, rank=None):
    """AdamW with loss_scale=2^70, clipped: on ``rank`` of a process group (saving what it
    got), or in one process over every rank's micro-batches (``rank`` None; returns it).
    Every accumulated value is finite, but their fp32 sum of squares overflows."""
    x, y = _data(world)
    model = _model(torch.float32)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if hooked:  # (the boundary then reads the skip flag before the update)
        inner.register_step_pre_hook(lambda o, args, kwargs: None)
    kw = dict(accumulation_steps=K, process_group=dist.group.WORLD,
              shard_optimizer_state=shard) if rank is not None else \
        dict(accumulation_steps=world * K)
    opt = fusedaccum.FusedAccumulator(inner, max_grad_norm=0.5, loss_scale=2.0 ** 70,
                                      backend=BACKEND, **kw)
    for w in range(WINDOWS):
        for r in range(world) if rank is None else [rank]:
            for x_mb, y_mb in _micro_batches(x, y, w, world, r):
                opt.scale_loss(torch.nn.functional.mse_loss(model(x_mb), y_mb)).backward()
                opt.step()
    got = {"params": [p.detach().clone() for p in model.parameters()],
           "counts": (opt.update_count, opt.skipped_steps), "norm": opt.grad_norm.clone()}
    if rank is None:
        return got
    torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    return None


def _overflow_worker(rank, world, init, shard, hooked, out_dir):
    with _rank(rank, world, init):
        _overflow_run(shard, hooked, world, out_dir, rank)


@pytest.mark.parametrize("shard,hooked", [(False, False), (True, False), (True, True)],
                         ids=["allreduce", "zero1", "zero1-hooked"])
def test_a_window_whose_scaled_norm_overflows_fp32_is_applied(tmp_path, shard, hooked):
    """As in one process (test_amp.py): torch removes the scale before any norm, so a window
    whose values are finite is applied, clipped by its true norm, also when its scaled
    fp32 sum of squares overflows; with ZeRO-1 too, where each rank holds a shard of the
    window (with a fixed loss scale it was skipped, every window, for good)."""
    world = 2
    spawn_ranks(_overflow_worker, args=(world, _rendezvous(tmp_path), shard, hooked, str(tmp_path)),
                nprocs=world)
    want = _overflow_run(shard, hooked, world, str(tmp_path))
    assert want["counts"] == (WINDOWS, 0)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["counts"] == want["counts"], f"rank {rank}"
        torch.testing.assert_close(got["norm"], want["norm"], rtol=1e-5, atol=0)
        for a, b in zip(got["params"], want["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _fp32_late_ddp_worker(rank, world, init, out_dir):
    """fp32 params (process_group= set) train window 0 plainly, then the other windows'
    backwards through a DistributedDataParallel wrapped around the model; rank 0 saves
    what step() said and the params."""
    with _rank(rank, world, init):
        cfg = dict(dtype=torch.float32, num_items=False, opt="adamw", clip=0.05)
        x, y = _data(world)
        model = _model(torch.float32)
        opt = _opt(cfg, model, accumulation_steps=K, process_group=dist.group.WORLD)
        _train(cfg, model, opt, x, y, world, rank, [0])
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        msg = "no error"
        try:
            for w in range(1, WINDOWS):
                for x_mb, y_mb in _micro_batches(x, y, w, world, rank):
                    _loss(ddp, x_mb, y_mb, cfg).backward()
                    opt.step()
        except RuntimeError as exc:
            msg = f"RuntimeError: {exc}"
        if rank == 0:
            torch.save({"msg": msg, "updates": opt.update_count,
                        "params": [p.detach().clone() for p in model.parameters()]},
                       os.path.join(out_dir, "late.pt"))


def test_an_fp32_model_wrapped_in_ddp_after_the_first_step_still_sums_the_window(tmp_path):
    """README, Data parallel: fp32 params are not checked for a DDP wrapped after the first
    step(), because DDP averages their accumulator views in place every micro-batch, which
    still sums the window correctly: the update is one process's over all the
    micro-batches, clipped on the global norm."""
    world = 2
    spawn_ranks(_fp32_late_ddp_worker, args=(world, _rendezvous(tmp_path), str(tmp_path)),
                nprocs=world)
    got = torch.load(tmp_path / "late.pt")
    cfg = dict(dtype=torch.float32, num_items=False, opt="adamw", clip=0.05)
    model, opt = _single(cfg, world)
    assert got["msg"] == "no error"
    assert got["updates"] == opt.update_count == WINDOWS
    for a, b in zip(got["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def _zero1_views_worker(rank, world, init, out_dir):
    """ZeRO-1 on fp32 and bf16 params: what opt.state and opt.param_groups hold between
    state_dict() calls, and what state_dict() returns; then a wrapper of RMSprop (not the
    fused path) with shard_optimizer_state=True. Rank 0 saves what it saw."""
    with _rank(rank, world, init):
        out = {}
        x, y = _data(world)
        for dtype in (torch.float32, torch.bfloat16):
            model = _model(dtype)
            opt = _opt(dict(opt="adamw", clip=None), model, accumulation_steps=K,
                       process_group=dist.group.WORLD, shard_optimizer_state=True)
            _train(dict(dtype=dtype, num_items=False), model, opt, x, y, world, rank, [0, 1])
            seen = {"updates": opt.update_count, "state": len(opt.state),
                    "groups_are_the_models": [a is b for a, b in zip(
                        opt.param_groups[0]["params"], model.parameters())]}
            sd = opt.state_dict()  # (a collective: every rank)
            seen["sd_state"] = sorted(sd["state"])
            seen["state_after_sd"] = len(opt.state)
            out[str(dtype)] = seen
        try:
            fusedaccum.FusedAccumulator(torch.optim.RMSprop(_model(torch.float32).parameters()),
                                        backend=BACKEND, process_group=dist.group.WORLD,
                                        shard_optimizer_state=True)
            out["rmsprop"] = "no error"
        except (ValueError, RuntimeError, TypeError) as exc:
            out["rmsprop"] = f"{type(exc).__name__}: {exc}"
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "zero1.pt"))


def test_zero1_leaves_opt_state_empty_and_the_models_params_in_the_groups(tmp_path):
    """README, Data parallel: with shard_optimizer_state=True opt.state stays empty between
    state_dict() calls (each rank's state is a shard of flat buffers), before and after
    one, while state_dict() returns every param's state; opt.param_groups holds the
    model's params, not fp32 masters (bf16 too); and sharding an optimizer that is not on
    the fused path (AdamW, Adam, SGD) is refused with a ValueError."""
    world = 2
    spawn_ranks(_zero1_views_worker, args=(world, _rendezvous(tmp_path), str(tmp_path)),
                nprocs=world)
    out = torch.load(tmp_path / "zero1.pt")
    n_params = len(list(_model(torch.float32).parameters()))
    for dtype in (torch.float32, torch.bfloat16):
        seen = out[str(dtype)]
        assert seen["updates"] == 2
        assert seen["state"] == seen["state_after_sd"] == 0
        assert seen["groups_are_the_models"] == [True] * n_params
        assert seen["sd_state"] == list(range(n_params))
    assert out["rmsprop"].startswith("ValueError: shard_optimizer_state=True runs on the "
                                     "fused path only")


def _load_onto_zero1_worker(rank, world, init, cfg, ckpt, out_dir):
    """Load one process's state dict, saved at a boundary, onto ``world`` ranks with
    ZeRO-1, and train the spare window; each rank saves its params and its state dict."""
    with _rank(rank, world, init):
        x, y = _data(world)
        saved = torch.load(ckpt)
        model = _model(cfg["dtype"])
        model.load_state_dict(saved["model"])
        opt = _opt(cfg, model, accumulation_steps=K, process_group=dist.group.WORLD,
                   shard_optimizer_state=True)
        opt.load_state_dict(saved["opt"])
        _train(cfg, model, opt, x, y, world, rank, [WINDOWS])
        sd = opt.state_dict()  # (a collective: every rank)
        torch.save({"params": [p.detach().clone() for p in model.parameters()],
                    "state": sd["state"], "counts": (opt.update_count, opt.skipped_steps)},
                   os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("cfg", [CASES[0], CASES[3]], ids=[_case_id(CASES[0]), _case_id(CASES[3])])
def test_a_boundary_checkpoint_of_one_process_resumes_on_zero1_ranks(cfg, tmp_path):
    """README, Data parallel: a state dict saved at a boundary loads onto any world size,
    with or without sharding: one process's, unsharded, resumes on ``world`` ranks with
    ZeRO-1 (each rank takes its shard of the masters and the optimizer state), on the
    trajectory of one process that does not stop."""
    world = cfg["world"]
    model, opt = _single(cfg, world)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    spawn_ranks(_load_onto_zero1_worker,
                args=(world, _rendezvous(tmp_path), cfg, str(tmp_path / "ckpt.pt"), str(tmp_path)),
                nprocs=world)
    want_model, want_opt = _single(cfg, world, WINDOWS + 1)
    want_sd = want_opt.state_dict()
    half = cfg["dtype"] != torch.float32
    tol = dict(rtol=1e-2, atol=1e-2) if half else dict(rtol=1e-5, atol=1e-6)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["counts"] == (want_opt.update_count, want_opt.skipped_steps) == (WINDOWS + 1, 0)
        for a, b in zip(got["params"], want_model.parameters()):
            torch.testing.assert_close(a, b.detach(), **tol)
        assert set(got["state"]) == set(want_sd["state"])
        for idx, st in want_sd["state"].items():
            for key, value in st.items():
                torch.testing.assert_close(got["state"][idx][key], value, rtol=1e-4, atol=1e-6)


def _local_then_summed_worker(rank, world, init, out_dir):
    """fp32, unsharded: after a window's boundary, a backward of this rank's own
    micro-batch, state_dict() (at the boundary: local), then step() and state_dict() again
    (mid-window: summed over the ranks). Each rank saves both state dicts' accumulators and
    its own gradients, by plain autograd on a copy of the model, and their sum."""
    with _rank(rank, world, init):
        cfg = dict(dtype=torch.float32, num_items=False, opt="sgd", clip=None)
        x, y = _data(world)
        model = _model(torch.float32)
        opt = _opt(cfg, model, accumulation_steps=K, process_group=dist.group.WORLD)
        _train(cfg, model, opt, x, y, world, rank, [0])
        x_mb, y_mb = next(_micro_batches(x, y, 1, world, rank))
        plain = copy.deepcopy(model)  # (a plain model: the hooks are not copied)
        _loss(plain, x_mb, y_mb, cfg).backward()
        own = [p.grad.detach().clone() for p in plain.parameters()]
        summed = [g.clone() for g in own]
        for g in summed:
            dist.all_reduce(g)
        _loss(model, x_mb, y_mb, cfg).backward()
        at_boundary = copy.deepcopy(opt.state_dict()["fusedaccum"])
        opt.step()
        mid_window = copy.deepcopy(opt.state_dict()["fusedaccum"])  # (a collective)
        torch.save({"own": own, "summed": summed, "at_boundary": at_boundary,
                    "mid_window": mid_window}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_a_state_dict_at_a_boundary_holds_this_ranks_gradients_and_mid_window_their_sum(
        tmp_path):
    """README, Data parallel: without sharding, state_dict() at a boundary is local, and
    gradients a backward left since that step are this rank's own; in the middle of a
    window it sums the partial window over the ranks."""
    world = 2
    spawn_ranks(_local_then_summed_worker, args=(world, _rendezvous(tmp_path), str(tmp_path)),
                nprocs=world)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["at_boundary"]["micro_step"] == 0 and got["mid_window"]["micro_step"] == 1
        for when, want in (("at_boundary", got["own"]), ("mid_window", got["summed"])):
            accs = got[when]["accumulators"]
            assert sorted(accs) == list(range(len(want))), when
            for i, g in enumerate(want):
                torch.testing.assert_close(accs[i], g, rtol=1e-6, atol=1e-7,
                                           msg=lambda m, when=when, i=i: f"{when} {i}: {m}")
        assert not torch.equal(got["own"][0], got["summed"][0])  # (the ranks' data differ)


def _count_all_reduces_worker(rank, world, init, out_dir):
    """fp32 params and a bf16 layer (two flat buffers: one per dtype), K micro-batches per
    window: each step()'s calls of dist.all_reduce (async or not, dtype, elements)."""
    with _rank(rank, world, init):
        x, y = _data(world)
        model = _model(torch.float32)
        model[2].to(torch.bfloat16)
        opt = fusedaccum.FusedAccumulator(torch.optim.AdamW(model.parameters()),
                                          accumulation_steps=K, backend=BACKEND,
                                          process_group=dist.group.WORLD)
        calls, per_step = [], []
        all_reduce = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append((kwargs.get("async_op", False), tensor.dtype, tensor.numel()))
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting
        try:
            for w in range(2):
                for x_mb, y_mb in _micro_batches(x, y, w, world, rank):
                    h = torch.tanh(model[0](x_mb)).bfloat16()
                    torch.nn.functional.mse_loss(model[2](h).float(), y_mb).backward()
                    opt.step()
                    per_step.append(list(calls))
                    calls.clear()
        finally:
            dist.all_reduce = all_reduce
        if rank == 0:
            torch.save(per_step, os.path.join(out_dir, "calls.pt"))


def test_the_window_is_exchanged_in_one_async_all_reduce_per_flat_buffer(tmp_path):
    """README, Data parallel: at the window's boundary the fp32 accumulators are summed
    across the group once, one asynchronous all-reduce per flat buffer (here two: the fp32
    params' and the bf16 params' fp32 accumulators, each holding all of its params'
    elements); no micro-batch before the boundary exchanges anything. (Besides, a small
    synchronous check the ranks agree: test_data_parallel_misuse_is_refused_on_every_rank.)"""
    world = 2
    spawn_ranks(_count_all_reduces_worker, args=(world, _rendezvous(tmp_path), str(tmp_path)),
                nprocs=world)
    per_step = torch.load(tmp_path / "calls.pt")
    model = _model(torch.float32)
    fp32_elems = sum(p.numel() for p in model[0].parameters())
    bf16_elems = sum(p.numel() for p in model[2].parameters())
    assert len(per_step) == 2 * K
    for j, calls in enumerate(per_step):
        exchanged = sorted(n for is_async, _, n in calls if is_async)
        if j % K < K - 1:
            assert calls == [], j
        else:
            assert all(dt == torch.float32 for is_async, dt, _ in calls if is_async), calls
            assert len(exchanged) == 2, calls
            assert bf16_elems <= exchanged[0] < fp32_elems <= exchanged[1], calls
