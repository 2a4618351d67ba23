"""A real client: Hugging Face ``transformers.Trainer`` driving ``FusedAccumulator``.

The Trainer does its own gradient accumulation (``gradient_accumulation_steps=G``):
G ``backward()`` calls, then ``clip_grad_norm_(model.parameters(), max_grad_norm)``
through accelerate, ``optimizer.step()``, ``lr_scheduler.step()`` and
``model.zero_grad()``. The wrapper, with its default ``accumulation_steps=1``, must be
a drop-in replacement for the inner ``torch.optim.AdamW`` there (DESIGN.md section 1,
"The loop from any gradient-accumulation tutorial ... also works unchanged"): fp32
params' ``p.grad`` shares storage with the window's accumulator, so HF's clipping acts
on the window, and every ``step()`` is a boundary. Accelerate also wraps the optimizer
(``AcceleratedOptimizer``), which round-trips ``state_dict()``/``load_state_dict()``
on construction and forwards ``step``/``zero_grad``/``param_groups``.

Both runs use the same seed, the same initial weights, the same data in the same
(sequential) order, no dropout, and CPU fp32, so the final parameters, the optimizer
state, the learning rates and the logged losses and grad norms must match to fp32
rounding.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
# Trainer cannot be constructed without accelerate (a hard dependency of Trainer).
pytest.importorskip("accelerate")

import fusedaccum  # noqa: E402

VOCAB, SEQ, N_SAMPLES = 97, 16, 48
BATCH = 2  # per-device micro-batch
MAX_STEPS = 5
MAX_GRAD_NORM = 0.5  # below the initial grad norm of the tiny model: clipping is active
LR, WD = 3e-3, 0.01


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=N_SAMPLES, seq=SEQ, seed=1234):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class SequentialTrainer(transformers.Trainer):
    """Same data order in every run, whatever the installed version's sampler options."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _tiny_gpt2():
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).float()


def _training_args(tmp_path, grad_accum):
    wanted = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        max_steps=MAX_STEPS,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=grad_accum,
        max_grad_norm=MAX_GRAD_NORM,
        learning_rate=LR,  # unused (we pass the optimizer), kept equal for the record
        weight_decay=WD,
        logging_steps=1,
        seed=42,
        data_seed=42,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    if "use_cpu" not in fields:  # older transformers
        wanted["no_cuda"] = wanted.pop("use_cpu")
    if "eval_strategy" not in fields:
        wanted["evaluation_strategy"] = wanted.pop("eval_strategy")
    return transformers.TrainingArguments(**{k: v for k, v in wanted.items() if k in fields})


def _train(tmp_path, grad_accum, wrap):
    model = _tiny_gpt2()
    inner = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    opt = fusedaccum.FusedAccumulator(inner) if wrap else inner
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (MAX_STEPS + 1))
    trainer = SequentialTrainer(
        model=model,
        args=_training_args(tmp_path, grad_accum),
        train_dataset=RandomTokens(),
        optimizers=(opt, sched),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return model, opt, sched, trainer, logs


def _split_key_bias(name, got, ref):
    """Check the key part of GPT-2's fused q/k/v bias loosely; return the rest.

    Adding a constant vector to every key shifts all of a query's attention logits
    by the same amount, which softmax ignores: the key bias has an exactly zero
    gradient in exact arithmetic, and its computed gradient is fp32 rounding noise
    (~1e-8). AdamW divides by sqrt(v), so it turns that noise into steps of up to
    ~lr in a direction set by the noise: an optimizer that differs from
    torch.optim.AdamW by one ulp anywhere (allowed; e.g. a C++ kernel) makes these
    elements differ by up to ~lr per step, while every other element stays within a
    few ulp. So they are only held to that bound.
    """
    e = got.numel() // 3
    bound = 4 * LR * MAX_STEPS
    key_diff = (got[e:2 * e] - ref[e:2 * e]).abs().max().item()
    assert key_diff <= bound, f"param {name} (key part): |diff| {key_diff} > {bound}"
    return torch.cat([got[:e], got[2 * e:]]), torch.cat([ref[:e], ref[2 * e:]])


@pytest.mark.parametrize("grad_accum", [4])
def test_trainer_with_wrapper_matches_plain_adamw(tmp_path, grad_accum):
    ref_model, ref_opt, ref_sched, ref_trainer, ref_logs = _train(tmp_path / "plain", grad_accum,
                                                                  wrap=False)
    model, opt, sched, trainer, logs = _train(tmp_path / "fused", grad_accum, wrap=True)

    assert isinstance(opt, fusedaccum.FusedAccumulator)
    assert trainer.state.global_step == ref_trainer.state.global_step == MAX_STEPS
    # With accumulation_steps=1 every step() the Trainer makes is a boundary.
    assert opt.update_count == MAX_STEPS
    assert opt.skipped_steps == 0
    assert opt.stepped is True

    # The learning-rate schedule went through the wrapper's param_groups.
    assert sched.get_last_lr() == pytest.approx(ref_sched.get_last_lr())
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])

    # Logged loss and grad norm per update (HF computes the norm from p.grad of
    # model.parameters(), which for fp32 params must be the window's gradient).
    assert len(logs) == len(ref_logs) == MAX_STEPS
    for got, want in zip(logs, ref_logs):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
        if "grad_norm" in want:
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5, abs=1e-7)
    norms = [h["grad_norm"] for h in ref_logs if "grad_norm" in h]
    if norms:  # the test is only meaningful if HF's clipping actually scaled something
        assert max(norms) > MAX_GRAD_NORM, norms
        assert all(math.isfinite(n) for n in norms)

    # The training moved the weights, identically in both runs.
    init = _tiny_gpt2().state_dict()
    params = dict(model.named_parameters())
    ref_params = dict(ref_model.named_parameters())
    assert params.keys() == ref_params.keys()
    moved = 0
    for name, ref in ref_params.items():
        got, ref = params[name].detach(), ref.detach()
        assert got.dtype == torch.float32
        moved += not torch.equal(ref, init[name])
        if name.endswith("attn.c_attn.bias"):
            got, ref = _split_key_bias(name, got, ref)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"param {name}: {m}")
    assert moved == len(ref_params)

    # Optimizer state in the inner optimizer's format (DESIGN.md section 2, state_dict).
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()
    assert set(sd["state"]) == set(ref_sd["state"])
    for idx, ref_state in ref_sd["state"].items():
        for key, ref_val in ref_state.items():
            got_val = sd["state"][idx][key]
            where = f"optimizer state[{idx}][{key}]"
            if isinstance(ref_val, torch.Tensor):
                torch.testing.assert_close(torch.as_tensor(got_val).float(), ref_val.float(),
                                           rtol=1e-5, atol=1e-7,
                                           msg=lambda m, where=where: f"{where}: {m}")
            else:
                assert got_val == ref_val, where


# ------------------------------------------------------------------ accelerate on its own

K, WINDOWS, CLIP = 3, 4, 0.05


def _fresh_accelerator():
    """A new Accelerator accumulating K micro-batches (its state is a process singleton:
    reset, as a new process would start)."""
    import accelerate
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return accelerate.Accelerator(cpu=True, gradient_accumulation_steps=K)


def _accelerate_build(acc, wrap, dtype):
    """The model prepared first, then the optimizer (the wrapper's default
    accumulation_steps=1, clipping with max_grad_norm for half params) and a schedule."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(),
                                torch.nn.Linear(10, 3)).to(dtype)
    model = acc.prepare(model)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt = inner
    if wrap:
        opt = fusedaccum.FusedAccumulator(
            inner, max_grad_norm=CLIP if dtype != torch.float32 else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    opt, sched = acc.prepare(opt, sched)
    return model, opt, sched


def _accelerate_run(wrap, dtype=torch.float32, resume_after=None, tmp_path=None):
    """accelerate's accumulation loop (accumulate(), clip_grad_norm_ on sync, step,
    scheduler step, zero_grad every micro-batch) over K * WINDOWS micro-batches; with
    ``resume_after=n``, save_state after micro-batch n and go on from load_state in a new
    Accelerator, model and optimizer. The params, the norms clip_grad_norm_ returned and
    the (inner) optimizer."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g))
               for _ in range(K * WINDOWS)]
    acc = _fresh_accelerator()
    try:
        model, opt, sched = _accelerate_build(acc, wrap, dtype)
        norms = []
        for i, (x, y) in enumerate(batches):
            with acc.accumulate(model):
                acc.backward(torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y))
                if acc.sync_gradients:
                    norms.append(float(acc.clip_grad_norm_(model.parameters(), CLIP)))
                opt.step()
                sched.step()
                opt.zero_grad()
            if i + 1 == resume_after:
                acc.save_state(str(tmp_path))
                acc = _fresh_accelerator()
                model, opt, sched = _accelerate_build(acc, wrap, dtype)
                acc.load_state(str(tmp_path))
        return [p.detach().clone() for p in model.parameters()], norms, opt.optimizer
    finally:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.mark.parametrize("resume", [False, True], ids=["straight", "resume_mid_window"])
def test_accelerate_loop_with_wrapper_matches_plain_adamw(tmp_path, resume):
    """docs/usage.md: under accelerate's own accumulation (gradient_accumulation_steps=K, the
    wrapper's default accumulation_steps=1) the wrapper trains as plain AdamW, its clipping
    and schedule included, also resumed (save_state/load_state) from a checkpoint taken in
    the middle of a window: the wrapper's state dict holds the partial window, which plain
    torch's would lose."""
    want, want_norms, _ = _accelerate_run(False)
    got, norms, opt = _accelerate_run(True, resume_after=K + 1 if resume else None,
                                      tmp_path=tmp_path)
    assert isinstance(opt, fusedaccum.FusedAccumulator)
    assert opt.update_count == WINDOWS
    assert norms == pytest.approx(want_norms, rel=1e-5)
    assert max(want_norms) > CLIP  # (the clipping scaled something)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accelerate_clip_grad_norm_of_half_params_is_zero_and_grad_norm_has_it():
    """docs/usage.md: fp16/bf16 params have no p.grad for accelerate's clip_grad_norm_,
    which then clips nothing and returns a norm of 0; the wrapper's max_grad_norm clips
    and opt.grad_norm holds the window's norm (here as the fp32 run's, to bf16 rounding)."""
    _, norms, opt = _accelerate_run(True, torch.bfloat16)
    _, fp32_norms, _ = _accelerate_run(False)
    assert norms == [0.0] * WINDOWS and opt.update_count == WINDOWS
    assert float(opt.grad_norm) > CLIP
    assert float(opt.grad_norm) == pytest.approx(fp32_norms[-1], rel=0.05)
