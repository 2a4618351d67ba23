"""FusedAccumulator: a torch.optim.Optimizer that wraps any torch optimizer.

It owns the accumulation window: gradients go into flat fp32 accumulators as
backward produces them (post-accumulate-grad hooks), the boundary ``step()``
computes the global norm, clips, removes the loss scale, skips non-finite windows,
and runs the update — on the fused path for Adam, AdamW and SGD (one op call per
contiguous run of params per bucket), or through the inner optimizer (the generic
path) for every other torch optimizer. See DESIGN.md sections 1 and 2.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections import OrderedDict

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fusedaccum import ops
from fusedaccum.buffers import Bucket
from fusedaccum.scaling import LossScaler

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_STATE_VERSION = 1

# param -> (weakref to its wrapper, hook handles): a param belongs to one live wrapper
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _check_norm_type(norm_type) -> float:
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        norm_type = math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")
    norm_type = float(norm_type)
    if norm_type != 2.0 and norm_type != math.inf:
        raise ValueError(f"norm_type must be 2.0 or inf (math.inf), got {norm_type!r}")
    return norm_type


def _check_k(k, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{what} must be an int >= 1, got {k!r}")
    return int(k)


def _fused_kind(opt: torch.optim.Optimizer) -> str | None:
    """'adam' or 'sgd' when ``opt`` runs on the fused path, else None (generic)."""
    if type(opt) in (torch.optim.Adam, torch.optim.AdamW):
        kind = "adam"
    elif type(opt) is torch.optim.SGD:
        kind = "sgd"
    else:
        return None
    if any(g.get("differentiable", False) for g in opt.param_groups):
        return None  # differentiable optimizers need autograd through the step
    return kind


class FusedAccumulator(torch.optim.Optimizer):
    """Gradient accumulation, clipping, loss scaling and fused steps around ``optimizer``.

    See DESIGN.md section 2 for the full contract. ``param_groups``, ``defaults`` and
    ``state`` are the inner optimizer's own objects.
    """

    # torch.amp.GradScaler hands us grad_scale/found_inf instead of skipping step() itself
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, *, accumulation_steps=1,
                 max_grad_norm=None, norm_type=2.0, loss_scale=None, master_weights=None,
                 backend="auto", process_group=None, shard_optimizer_state=False):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("FusedAccumulator wraps a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if isinstance(optimizer, FusedAccumulator):
            raise ValueError("the optimizer is already a FusedAccumulator; wrap the inner one")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("LBFGS re-evaluates the loss inside step(), which cannot be "
                             "accumulated over micro-batches; use another optimizer")
        if callable(accumulation_steps):
            self._k_fn = accumulation_steps
        else:
            self._k_fn = None
            _check_k(accumulation_steps, "accumulation_steps")
        self.accumulation_steps = accumulation_steps
        if max_grad_norm is not None:
            if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, numbers.Real) \
                    or not max_grad_norm > 0 or not math.isfinite(max_grad_norm):
                raise ValueError(f"max_grad_norm must be None or a finite number > 0, got "
                                 f"{max_grad_norm!r}")
            max_grad_norm = float(max_grad_norm)
        self.max_grad_norm = max_grad_norm
        self.norm_type = _check_norm_type(norm_type)
        if master_weights not in (None, True, False):
            raise ValueError(f"master_weights must be None, True or False, got "
                             f"{master_weights!r}")
        self.master_weights = master_weights is not False
        if not isinstance(backend, str):
            raise ValueError(f"backend must be a string, got {backend!r}")
        if backend != "auto" and backend not in ops.BACKENDS:
            raise RuntimeError(f"unknown backend {backend!r}; choose 'auto' or one of "
                               f"{', '.join(ops.BACKENDS)}")
        self.backend = backend
        if process_group is not None or shard_optimizer_state:
            raise NotImplementedError(
                "process_group and shard_optimizer_state (data parallel) are not available "
                "in this version of fusedaccum; run one process per model for now")

        # torch.optim.Optimizer's own bookkeeping, without its param-group building
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        self.inner = optimizer
        self._kind = _fused_kind(optimizer)
        self._buckets: list[list[Bucket]] = []  # per param group
        self._handles: list = []
        self._check_params(optimizer.param_groups)
        first = next((p for g in optimizer.param_groups for p in g["params"]), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._scaler = None if loss_scale is None else LossScaler(loss_scale, self._device)
        for gi in range(len(optimizer.param_groups)):
            self._build_group(gi)
        self._adopt_state({self._index_of(t): st for t, st in optimizer.state.items()
                           if self._index_of(t) is not None})

        self.micro_step = 0
        self.update_count = 0
        self.skipped_steps = 0
        self.stepped = False
        self._warned_skip = False
        self.grad_norm = torch.zeros((), dtype=torch.float32, device=self._device)
        self._window_k = self._next_k()

    # -- the inner optimizer's objects, at all times ---------------------------------
    @property
    def param_groups(self):
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.inner.param_groups = value

    @property
    def defaults(self):
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value):
        self.inner.defaults = value

    @property
    def state(self):
        return self.inner.state

    @state.setter
    def state(self, value):
        self.inner.state = value

    def __repr__(self) -> str:
        return (f"FusedAccumulator({self.inner!r}, accumulation_steps="
                f"{self.accumulation_steps!r}, max_grad_norm={self.max_grad_norm!r})")

    def __reduce_ex__(self, protocol):
        raise TypeError("a FusedAccumulator cannot be pickled or deep-copied: it is tied to "
                        "its model's params by hooks. Save opt.state_dict() (and the model's) "
                        "and load them into a new FusedAccumulator")

    # -- window bookkeeping --------------------------------------------------------
    @property
    def accumulation_boundary(self) -> bool:
        """True iff the next ``step()`` call ends the window."""
        return self.micro_step + 1 >= self._window_k

    @property
    def loss_scale(self):
        if self._scaler is None:
            return 1.0
        return self._scaler.scale if self._scaler.dynamic else float(self._scaler.scale)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the current loss scale (unchanged without loss scaling)."""
        if self._scaler is None:
            return loss
        return loss * self._scaler.scale.to(loss.device)

    def _next_k(self) -> int:
        if self._k_fn is None:
            return int(self.accumulation_steps)
        return _check_k(self._k_fn(self.update_count + self.skipped_steps),
                        "accumulation_steps(windows_ended)")

    def _all_buckets(self):
        for buckets in self._buckets:
            yield from buckets

    def reset_accumulation(self) -> None:
        """Drop the partial window: accumulators zeroed, micro_step back to 0."""
        with torch.no_grad():
            for b in self._all_buckets():
                b.acc.zero_()
        self._end_window()
        self.micro_step = 0
        self._window_k = self._next_k()

    def _end_window(self) -> None:
        for b in self._all_buckets():
            for i in range(len(b)):
                if b.touched[i]:
                    b.touched[i] = False
                    b.stepped[i].grad = None
                    if not b.released[i] and b.params[i].grad is not None:
                        b.params[i].grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``p.grad``; the accumulated window is never dropped (either way)."""
        for b in self._all_buckets():
            for i, p in enumerate(b.params):
                if not b.released[i] and p.grad is not None:
                    p.grad = None
                if b.has_master and b.stepped[i].grad is not None:
                    b.stepped[i].grad = None

    # -- params, buckets and hooks -------------------------------------------------
    def _param_name(self, group: dict, gi: int, pi: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        name = f"{names[pi]!r} " if names and pi < len(names) else ""
        return (f"parameter {name}(group {gi}, index {pi}, shape {tuple(p.shape)}, "
                f"dtype {p.dtype})")

    def _check_params(self, groups, start: int = 0) -> None:
        seen = {id(t) for b in self._all_buckets() for t in b.params}
        for gi, group in enumerate(groups, start):
            for pi, p in enumerate(group["params"]):
                name = self._param_name(group, gi, pi, p)
                if p.is_complex():
                    raise TypeError(f"{name} is complex; fusedaccum supports fp32, fp16 and "
                                    "bf16 params")
                if not p.is_floating_point():
                    raise TypeError(f"{name} has integer dtype; only floating point params "
                                    "can be optimized")
                if p.dtype not in _SUPPORTED_DTYPES:
                    raise TypeError(f"{name}: fusedaccum accumulates in fp32 and supports fp32, "
                                    "fp16 and bf16 params")
                if p.is_sparse:
                    raise TypeError(f"{name} is sparse; fusedaccum needs dense params")
                if id(p) in seen:
                    raise ValueError(f"{name} appears more than once in the optimizer's "
                                     "param groups")
                seen.add(id(p))

    def _build_group(self, gi: int) -> None:
        group = self.inner.param_groups[gi]
        params = list(group["params"])
        keyed: dict[tuple, list[int]] = {}
        for pi, p in enumerate(params):
            keyed.setdefault((p.device, p.dtype), []).append(pi)
        buckets = []
        for (device, _), idx in keyed.items():
            self._backend_module(device)  # an unusable explicit backend fails here, early
            members = [params[pi] for pi in idx]
            for p in members:
                self._release_from_previous_owner(p)
            grads = [p.grad for p in members]
            b = Bucket(members, idx, use_master=self.master_weights)
            b.ops = self._backend_module(device)
            buckets.append(b)
            for i, p in enumerate(members):
                self._install_hooks(b, i, p)
                if grads[i] is not None:  # a gradient that was there before wrapping
                    with torch.no_grad():
                        b.main_grads[i].copy_(grads[i])
                    b.touched[i] = True
                    p.grad = None
                    self._expose_grad(b, i)
                group["params"][idx[i]] = b.stepped[i]
        self._buckets.append(buckets)

    def _backend_module(self, device):
        return ops.get(self.backend, device)

    def _release_from_previous_owner(self, p: torch.Tensor) -> None:
        prev = _OWNERS.get(p)
        if prev is None:
            return
        owner_ref, handles = prev
        for h in handles:
            h.remove()
        owner = owner_ref()
        if owner is not None and owner is not self:
            owner._release(p)

    def _release(self, p: torch.Tensor) -> None:
        for b in self._all_buckets():
            for i, q in enumerate(b.params):
                if q is p:
                    b.released[i] = True
                    b.touched[i] = False
                    with torch.no_grad():
                        b.main_grads[i].zero_()
                    b.stepped[i].grad = None

    def _install_hooks(self, b: Bucket, i: int, p: torch.Tensor) -> None:
        frozen = not p.requires_grad
        if frozen:  # hooks need requires_grad; the param may be unfrozen later
            p.requires_grad_(True)
        handles = [p.register_post_accumulate_grad_hook(self._make_post_hook(b, i))]
        if not b.is_half:
            handles.append(p.register_hook(self._make_pre_hook(b, i, weakref.ref(p))))
        if frozen:
            p.requires_grad_(False)
        self._handles.extend(handles)
        _OWNERS[p] = (weakref.ref(self), handles)

    def _expose_grad(self, b: Bucket, i: int) -> None:
        """Give the stepped tensor a ``.grad`` viewing the window (GradScaler sees it)."""
        if b.has_master or not b.is_half:
            b.stepped[i].grad = b.main_grads[i]

    def _bad_grad(self, b: Bucket, i: int, grad: torch.Tensor) -> None:
        if grad.is_sparse or grad.layout != torch.strided:
            gi = next(g for g, bs in enumerate(self._buckets) if b in bs)
            name = self._param_name(self.inner.param_groups[gi], gi, b.indices[i], b.params[i])
            raise RuntimeError(f"{name} received a sparse gradient; fusedaccum accumulates "
                               "dense gradients only (use a dense embedding, sparse=False)")

    def _make_pre_hook(self, b: Bucket, i: int, p_ref):
        """fp32 params: make ``p.grad`` the accumulator view, so autograd adds in place."""
        view = b.main_grads[i]

        def pre_hook(grad):
            p = p_ref()
            if p is None or b.released[i]:
                return None
            self._bad_grad(b, i, grad)
            cur = p.grad
            if cur is not view:
                if cur is not None:  # a .grad the user assigned: part of the window
                    with torch.no_grad():
                        view.add_(cur)
                p.grad = view
            b.touched[i] = True
            return None

        return pre_hook

    def _make_post_hook(self, b: Bucket, i: int):
        view = b.main_grads[i]
        flat = b.flat_slice(b.acc, i)

        def post_hook(p):
            if b.released[i]:
                return
            grad = p.grad
            if grad is None:
                return
            self._bad_grad(b, i, grad)
            if b.is_half:
                with torch.no_grad():
                    b.ops.accumulate_(flat, grad.detach().reshape(-1), 1.0)
                p.grad = None
            elif grad is not view:
                # autograd replaced .grad out of place (create_graph=True): it holds the
                # previous window sum plus this grad
                with torch.no_grad():
                    view.copy_(grad.detach())
                p.grad = view
            b.touched[i] = True
            self._expose_grad(b, i)

        return post_hook

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        self._check_params([dict(param_group, params=params)], start=len(self._buckets))
        self.inner.add_param_group(dict(param_group, params=params))
        self._build_group(len(self.inner.param_groups) - 1)

    # -- step ----------------------------------------------------------------------
    def step(self, closure=None, *, num_items=None):
        """Count a micro-batch; at the window's boundary apply the update.

        Returns the closure's loss (the closure runs with grad enabled), or None.
        """
        if num_items is not None:
            self._check_num_items(num_items)
        scaler_attrs = "grad_scale" in self.__dict__ or "found_inf" in self.__dict__
        if scaler_attrs:
            if self._k_fn is not None or self._window_k != 1:
                raise RuntimeError(
                    "torch.amp.GradScaler.step() needs accumulation_steps=1 (the scale could "
                    "change inside a window): accumulate with the tutorial loop and call "
                    "scaler.step(opt) at your own boundaries, or use loss_scale='dynamic'")
            if self._scaler is not None:
                raise RuntimeError("use either torch.amp.GradScaler or the wrapper's own "
                                   f"loss_scale={self._scaler_spec()!r}, not both")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.micro_step + 1 < self._window_k:
            self.micro_step += 1
            self.stepped = False
            return loss
        grad_scale = self.__dict__.get("grad_scale") if scaler_attrs else None
        found_inf = self.__dict__.get("found_inf") if scaler_attrs else None
        self._boundary(num_items, grad_scale, found_inf)
        self.micro_step = 0
        self._window_k = self._next_k()
        return loss

    def _scaler_spec(self):
        return "dynamic" if self._scaler.dynamic else float(self._scaler.scale)

    @staticmethod
    def _check_num_items(num_items) -> None:
        if isinstance(num_items, torch.Tensor):
            if num_items.numel() != 1:
                raise ValueError(f"num_items must be a single number, got shape "
                                 f"{tuple(num_items.shape)}")
            if num_items.device.type == "cpu" and not num_items.item() > 0:
                raise ValueError(f"num_items must be > 0, got {num_items.item()}")
            return
        if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real) \
                or not num_items > 0:
            raise ValueError(f"num_items must be a number > 0 (the window's item count), "
                             f"got {num_items!r}")

    def _total_norm(self) -> torch.Tensor:
        """Norm over every accumulator (raw: loss scale and 1/D not yet removed)."""
        per_device: dict[torch.device, list[torch.Tensor]] = {}
        for b in self._all_buckets():
            per_device.setdefault(b.device, []).append(b.acc)
        norms = []
        for accs in per_device.values():
            n = ops.grad_norm(accs, self.norm_type, backend=self.backend)
            norms.append(n.to(self._device, non_blocking=True))
        if not norms:
            return torch.zeros((), dtype=torch.float32, device=self._device)
        if len(norms) == 1:
            return norms[0]
        stacked = torch.stack(norms)
        return stacked.amax() if self.norm_type == math.inf else stacked.square().sum().sqrt()

    @torch.no_grad()
    def _boundary(self, num_items, grad_scale, scaler_found_inf) -> None:
        dev = self._device
        denom = num_items if num_items is not None else self._window_k
        if isinstance(denom, torch.Tensor):
            denom = denom.to(device=dev, dtype=torch.float32)
        scale = grad_scale if grad_scale is not None else (
            self._scaler.scale if self._scaler is not None else None)
        if scale is None:
            inv = torch.full((), 1.0, dtype=torch.float32, device=dev) / denom
        else:
            inv = (scale.to(device=dev, dtype=torch.float32) * denom).reciprocal()
        norm = self._total_norm() * inv
        found = ~torch.isfinite(norm)
        if scaler_found_inf is not None:
            found = found | (scaler_found_inf.to(dev) > 0)
        if self.max_grad_norm is not None:
            mult = inv * (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        else:
            mult = inv
        self.grad_norm = norm
        found_f = found.to(torch.float32)
        if self._kind is not None:
            self._fused_update(mult, found_f)
            skipped = bool(found_f.item())  # the boundary's one host read
            if not skipped:
                self._record_fused_steps()
        else:
            skipped = bool(found_f.item())
            if not skipped:
                self._generic_update(mult)
            for b in self._all_buckets():
                b.acc.zero_()
        if self._scaler is not None:
            self._scaler.update(skipped)
        self._end_window()
        self.stepped = not skipped
        if skipped:
            self.skipped_steps += 1
            if not self._warned_skip:
                self._warned_skip = True
                warnings.warn("fusedaccum: non-finite gradients (inf/NaN) in the accumulation "
                              "window; the update was skipped and the window discarded. This "
                              "warning is shown once; opt.skipped_steps counts skips.",
                              RuntimeWarning, stacklevel=3)
        else:
            self.update_count += 1

    # -- fused path ----------------------------------------------------------------
    def _has_buffer(self, b: Bucket):
        out = []
        for t in b.stepped:
            st = self.inner.state.get(t)
            out.append(bool(st) and st.get("momentum_buffer") is not None)
        return out

    def _fused_update(self, mult: torch.Tensor, found: torch.Tensor) -> None:
        for gi, buckets in enumerate(self._buckets):
            group = self.inner.param_groups[gi]
            for b in buckets:
                if not any(b.touched):
                    continue
                m = mult if mult.device == b.device else mult.to(b.device)
                f = found if found.device == b.device else found.to(b.device)
                out_flat = b.model if b.has_master else None
                if self._kind == "adam":
                    self._adam_bucket(b, group, m, f, out_flat)
                else:
                    self._sgd_bucket(b, group, m, f, out_flat)

    def _adam_bucket(self, b: Bucket, group: dict, mult, found, out_flat) -> None:
        amsgrad = bool(group.get("amsgrad", False))
        exp_avg = b.state_buffer("exp_avg")
        exp_avg_sq = b.state_buffer("exp_avg_sq")
        vmax = b.state_buffer("max_exp_avg_sq") if amsgrad else None
        beta1, beta2 = group["betas"]
        decoupled = group.get("decoupled_weight_decay", type(self.inner) is torch.optim.AdamW)
        hp = dict(lr=_as_float(group["lr"]), beta1=_as_float(beta1), beta2=_as_float(beta2),
                  eps=_as_float(group["eps"]), weight_decay=_as_float(group["weight_decay"]),
                  decoupled_weight_decay=bool(decoupled), amsgrad=amsgrad,
                  maximize=bool(group.get("maximize", False)))
        steps = b.steps
        for i, j, step in b.runs(lambda k: steps[k]):
            s = b.elems(i, j)
            b.ops.adamw_step_(b.stepped_flat[s], b.acc[s], exp_avg[s], exp_avg_sq[s],
                              None if vmax is None else vmax[s],
                              None if out_flat is None else out_flat[s],
                              grad_mult=mult, found_inf=found, step=step + 1, zero_acc=True,
                              **hp)

    def _sgd_bucket(self, b: Bucket, group: dict, mult, found, out_flat) -> None:
        momentum = _as_float(group["momentum"])
        buf = b.state_buffer("momentum_buffer") if momentum != 0 else None
        has = self._has_buffer(b)
        hp = dict(lr=_as_float(group["lr"]), momentum=momentum,
                  dampening=_as_float(group["dampening"]),
                  weight_decay=_as_float(group["weight_decay"]),
                  nesterov=bool(group["nesterov"]), maximize=bool(group.get("maximize", False)))
        for i, j, had in b.runs(lambda k: has[k]):
            s = b.elems(i, j)
            b.ops.sgd_step_(b.stepped_flat[s], b.acc[s], None if buf is None else buf[s],
                            None if out_flat is None else out_flat[s], grad_mult=mult,
                            found_inf=found, first_step=not had, zero_acc=True, **hp)

    def _record_fused_steps(self) -> None:
        """After an applied update: state entries (views) and step counts, as torch keeps."""
        for gi, buckets in enumerate(self._buckets):
            group = self.inner.param_groups[gi]
            keys = ()
            if self._kind == "adam":
                keys = _ADAM_KEYS if group.get("amsgrad", False) else _ADAM_KEYS[:2]
            elif _as_float(group["momentum"]) != 0:
                keys = ("momentum_buffer",)
            for b in buckets:
                for i, t in enumerate(b.stepped):
                    if not b.touched[i]:
                        continue
                    st = self.inner.state[t]
                    if self._kind == "adam":
                        b.steps[i] += 1
                        step = st.get("step")
                        if isinstance(step, torch.Tensor):
                            step.fill_(b.steps[i])
                        else:
                            st["step"] = torch.tensor(float(b.steps[i]))
                    for key in keys:
                        st[key] = b.state_view(key, i)

    # -- generic path --------------------------------------------------------------
    def _generic_update(self, mult: torch.Tensor) -> None:
        half_grads = []
        for b in self._all_buckets():
            b.acc.mul_(mult if mult.device == b.device else mult.to(b.device))
            for i, t in enumerate(b.stepped):
                if not b.touched[i]:
                    t.grad = None
                elif b.is_half and not b.has_master:
                    t.grad = b.main_grads[i].to(t.dtype)  # torch optimizers need grad dtype
                    half_grads.append(t)
                else:
                    t.grad = b.main_grads[i]
        try:
            self.inner.step()
        finally:
            for t in half_grads:
                t.grad = None
        for b in self._all_buckets():
            if b.has_master:
                b.model.copy_(b.master)

    # -- state dict ----------------------------------------------------------------
    def _index_map(self) -> dict[int, tuple[Bucket, int]]:
        """state_dict index (torch's numbering over all groups) -> (bucket, position)."""
        out, base = {}, 0
        for gi, group in enumerate(self.inner.param_groups):
            for b in self._buckets[gi]:
                for i, pi in enumerate(b.indices):
                    out[base + pi] = (b, i)
            base += len(group["params"])
        return out

    def _index_of(self, t: torch.Tensor) -> int | None:
        for idx, (b, i) in self._index_map().items():
            if b.stepped[i] is t or b.params[i] is t:
                return idx
        return None

    def state_dict(self) -> dict:
        sd = self.inner.state_dict()
        extra = {
            "version": _STATE_VERSION,
            "micro_step": self.micro_step,
            "window_k": self._window_k,
            "update_count": self.update_count,
            "skipped_steps": self.skipped_steps,
            "warned_skip": self._warned_skip,
            "loss_scale": None if self._scaler is None else self._scaler.state_dict(),
            "masters": {},
            "accumulators": {},
        }
        for idx, (b, i) in self._index_map().items():
            if b.has_master:
                extra["masters"][idx] = b.stepped[i].detach().clone()
            if b.touched[i]:
                extra["accumulators"][idx] = b.main_grads[i].detach().clone()
        sd["fusedaccum"] = extra
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        extra = sd.pop("fusedaccum", None)
        if self._kind is not None:
            # torch would cast the state to the stepped tensors' dtype (half, without
            # masters); fp32 state is never downcast, so it is copied in by _adopt_state
            loaded_state = sd.get("state", {})
            self.inner.load_state_dict({"state": {}, "param_groups": sd["param_groups"]})
            self._adopt_state(loaded_state)
        else:
            self.inner.load_state_dict(sd)
        if extra is None:
            return
        with torch.no_grad():
            index = self._index_map()
            for idx, master in extra.get("masters", {}).items():
                b, i = index[int(idx)]
                if b.has_master:
                    b.stepped[i].copy_(master)
                    b.view(b.model, i).copy_(b.stepped[i])
            for b in self._all_buckets():
                b.acc.zero_()
            self._end_window()
            for idx, acc in extra.get("accumulators", {}).items():
                b, i = index[int(idx)]
                b.main_grads[i].copy_(acc)
                b.touched[i] = True
                self._expose_grad(b, i)
        self.micro_step = int(extra["micro_step"])
        self._window_k = int(extra["window_k"])
        self.update_count = int(extra["update_count"])
        self.skipped_steps = int(extra["skipped_steps"])
        self._warned_skip = bool(extra.get("warned_skip", False))
        if extra.get("loss_scale") is not None and self._scaler is not None:
            self._scaler.load_state_dict(extra["loss_scale"])

    @torch.no_grad()
    def _adopt_state(self, loaded: dict) -> None:
        """Fused path: copy per-param state (by state_dict index) into the flat buffers."""
        if self._kind is None:
            # generic path: the inner optimizer keeps its own state; only re-key it
            for b, i in self._index_map().values():
                st = self.inner.state.pop(b.params[i], None)
                if st is not None and b.stepped[i] is not b.params[i]:
                    self.inner.state[b.stepped[i]] = st
            return
        for idx, (b, i) in self._index_map().items():
            t = b.stepped[i]
            self.inner.state.pop(b.params[i], None)
            src = loaded.get(idx, loaded.get(str(idx)))
            new = {}
            for key in (*_ADAM_KEYS, "momentum_buffer"):
                if key in b.state_flat:
                    b.flat_slice(b.state_flat[key], i).zero_()
            b.steps[i] = 0
            if src:
                for key, value in src.items():
                    if key in (*_ADAM_KEYS, "momentum_buffer") and value is not None:
                        view = b.state_view(key, i)
                        view.copy_(value.reshape(view.shape))
                        new[key] = view
                    elif key == "step":
                        b.steps[i] = int(_as_float(value))
                        new[key] = torch.tensor(float(b.steps[i]), dtype=torch.float32)
                    else:
                        new[key] = value
            if new:
                self.inner.state[t] = new
            else:
                self.inner.state.pop(t, None)
