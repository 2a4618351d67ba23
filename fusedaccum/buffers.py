"""Flat per-(group, device, dtype) buffers and the param views into them.

A :class:`Bucket` owns, for the params of one param group that share a device and a
dtype, one flat fp32 accumulator, the stepped fp32 tensors (the params themselves
when fp32, else fp32 master copies unless master weights are off), the flat
half-precision model buffer the params point into, and the optimizer state. Every
param's ``main_grad``, master and state entries are views into those buffers, so a
boundary op is one launch per contiguous run of params instead of one per param.
"""

from __future__ import annotations

import array

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
IN_BATCH = "in a batch statistic"  # Bucket.stats[i]: covered by one of Bucket.batch_stats
ALIGN = 16  # elements; every param starts on a 64-byte boundary of the fp32 buffers


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _own_storage(view: torch.Tensor) -> torch.Tensor:
    """``view``'s memory, as a tensor with a storage of its own (DLPack: that storage
    keeps the flat buffer alive). A param that viewed the flat buffer shared its storage
    with every param of the bucket, and tools that find tied weights by their storage
    took them all for one: accelerate's save_model kept one param per bucket and dropped
    the rest, silently; safetensors' save_model refused the model. (Pickling a param
    itself, torch.save(p) or torch.save(model), also takes its ``main_grad`` attribute,
    a view of the bucket's accumulator, which must stay one: save state dicts.)"""
    return torch.from_dlpack(view)


def memory_order(p: torch.Tensor) -> tuple[int, ...] | None:
    """The dims of ``p`` from outermost to innermost in memory when ``p`` is dense but
    not row-major (channels_last, a transpose); None when row-major, or not dense (a view
    with gaps or overlaps: such a param gets row-major views, as a copy would have).

    Every view of a param into the flat buffers keeps the param's memory layout, as
    torch.optim never changes a param's strides and its state is ``zeros_like(p)``: a
    channels_last model stays channels_last, and its gradients (which autograd makes
    with the param's strides) are read in memory order, without a copy."""
    row_major, n = [], 1
    for size in reversed(p.shape):
        row_major.append(n)
        n *= size
    if p.stride() == tuple(reversed(row_major)):
        return None
    # (a stable sort; equal strides are size-1 dims, whose place is_contiguous ignores.
    # A channels_last 1x1 conv weight is contiguous too, but its strides are kept)
    perm = tuple(sorted(range(p.dim()), key=lambda d: -p.stride(d)))
    return perm if p.permute(perm).is_contiguous() else None


# The per-param fields the C++ batching hook (csrc/hooks.cpp) reads and writes, kept in
# one list, Bucket.hook_fields, in this order: the hook reaches all of them with one
# attribute lookup. Each is a property over that list, so rebinding one updates the list.
HOOK_FIELDS = ("released", "is_pending", "stats", "exposed", "touched", "stepped",
               "main_grads", "pending", "pending_accs", "pending_grads", "pending_bytes",
               "ride_norm", "stats_version", "clean_version", "dirty", "pending_ow")


def _hook_field(k: int) -> property:
    def get(self):
        return self.hook_fields[k]

    def set(self, value):
        self.hook_fields[k] = value

    return property(get, set)


class Bucket:
    """The params of one group that live on one device with one dtype."""

    def __init__(self, params: list[torch.Tensor], indices: list[int], *, use_master: bool,
                 shard: tuple[int, int] | None = None):
        self.hook_fields: list = [None] * len(HOOK_FIELDS)
        self.params = params
        self.indices = indices  # position of each param in its param group's list
        p0 = params[0]
        self.device, self.dtype = p0.device, p0.dtype
        self.is_half = self.dtype in HALF_DTYPES
        self.has_master = self.is_half and use_master
        self.numels = [p.numel() for p in params]
        self.shapes = [p.shape for p in params]
        self.perms = [memory_order(p) for p in params]  # see memory_order
        self.strides = [p.stride() for p in params]
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += _align(n)
        self.offsets.append(total)  # padded end of the last param
        # ZeRO-1: rank r of w owns elements [lo, hi) of every flat buffer; the master
        # weights, the optimizer state and the reduced gradient exist for that range only
        self.sharded = shard is not None
        rank, world = shard if shard is not None else (0, 1)
        total = -(-total // (ALIGN * world)) * ALIGN * world
        self.total = total
        self.lo, self.hi = rank * total // world, (rank + 1) * total // world
        f32 = dict(dtype=torch.float32, device=self.device)
        self.acc = torch.zeros(total, **f32)
        # the gradient the local step reads: acc itself, or this rank's reduced shard of it
        self.acc_local = torch.zeros(self.hi - self.lo, **f32) if self.sharded else self.acc
        # the flat buffer the model params point into
        self.model = torch.zeros(total, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for i, p in enumerate(params):
                view = self.view(self.model, i)
                view.copy_(p.detach())
                p.data = _own_storage(view)
        # where each param's data must stay: params whose storage was replaced after
        # wrapping (p.data = ..., module.to(...)) would silently stop training
        self.ptrs = [p.data_ptr() for p in params]
        self.master = self.model[self.lo:self.hi].float() if self.has_master else None
        # the flat tensor the optimizer steps, in local coordinates [lo, hi): the fp32
        # master, or the params themselves
        self.stepped_flat = self.master if self.has_master else self.model[self.lo:self.hi]
        self.model_out = self.model[self.lo:self.hi] if self.has_master else None
        self.main_grads = [self.view(self.acc, i) for i in range(len(params))]
        if self.has_master and not self.sharded:
            self.stepped = [self.view(self.master, i) for i in range(len(params))]
        else:
            self.stepped = list(params)
        for p, g in zip(params, self.main_grads):
            p.main_grad = g
        self.touched = [False] * len(params)  # got a gradient in this window
        self.exposed = [False] * len(params)  # its stepped tensor's .grad views the window
        # the norm statistic (sum of squares or max |x|) each param's last accumulation
        # produced (or IN_BATCH: part of a statistic of batch_stats), and the accumulator's
        # version after our last write: the boundary uses them instead of a separate norm
        # pass when nothing else wrote the accumulator since (-1: no statistic in this
        # window yet, -2: the statistics are stale)
        self.stats: list = [None] * len(params)
        self.batch_stats: list[torch.Tensor] = []
        self.stats_version = -1
        # The accumulator's version while every param neither touched in this window nor
        # dirty (below) is known to hold zeros in it (-1: not known). Kept after each of
        # our own writes (they write touched or dirty params only), set at every boundary
        # (which zeroes the rest); any other write to the buffer through torch's ops
        # (p.main_grad.add_(...)) changes the version (GradScaler's unscale_ does not, but
        # it runs right before a boundary, which resets the window). While it holds, a
        # param's first gradient of the window is written into its accumulator instead of
        # added (overwrite: 4 bytes per element less to read). overwrite_first=False turns
        # that off, and the dirty accumulators with it (benchmarks).
        self.overwrite_first = True
        self.clean_version = self.acc._version if self.is_half else -1
        # Params whose accumulator still holds an earlier window's sum (no gradient of
        # this window reached them yet): a boundary of the fused path leaves the stepped
        # params' accumulators as they are instead of zeroing them (4 bytes per element
        # less to write, DESIGN.md section 3), and each one's first gradient of the next
        # window overwrites it. A dirty param is never touched; whatever else would read
        # a dirty accumulator (the end of a backward, the boundary, state_dict) zeroes it
        # first (FusedAccumulator._zero_stale). An fp32 param's .grad, the accumulator
        # view that autograd adds to, is left None for its first gradient, which post_hook
        # then writes over the accumulator. Not sharded (ZeRO-1: the step's accumulator is
        # the reduce-scatter's output).
        self.dirty = [False] * len(params)
        self.lazy_zero = not self.sharded
        # small half gradients waiting to be accumulated together (one op call for many):
        # the params' indices, their accumulator views and grads (parallel lists), their
        # bytes, and which params are among them
        self.pending: list[int] = []
        self.pending_accs: list[torch.Tensor] = []
        self.pending_grads: list[torch.Tensor] = []
        self.pending_bytes = 0
        self.pending_ow = []  # per waiting gradient: 1 if it overwrites its accumulator
        self.is_pending = [False] * len(params)
        # how FusedAccumulator._flush accumulates the batch in C++ (csrc/hooks.cpp
        # flush_batch, with its arguments after it): set when the wrapper installs the
        # C++ hooks; None (not set) or False: in Python
        self.cxx_flush: tuple | bool | None = None
        self.released = [False] * len(params)
        self.state_flat: dict[str, torch.Tensor] = {}
        self._state_views: dict[str, list[torch.Tensor]] = {}
        self.steps = [0] * len(params)  # per-param optimizer step counts (Adam)
        self.has_buf = [False] * len(params)  # per-param momentum history (SGD)
        self.step_flat: torch.Tensor | None = None  # see step_views
        self._step_views: list[torch.Tensor] | None = None
        # step_flat's version counter after our last write: another write (a step entry
        # changed in place, state[p]["step"].fill_(0)) shows (FusedAccumulator._sync_state)
        self.step_version = -1
        # params whose optimizer-state entries the last boundaries made or checked, for the
        # state keys ``recorded_keys`` (see FusedAccumulator._record_fused_steps)
        self.recorded = [False] * len(params)
        self.recorded_keys: tuple[str, ...] | None = None
        # each half param's version counter when its master was last in step with it: we
        # write the half params through self.model (its views share one counter, not the
        # params'), so a change means someone else wrote that param (model.load_state_dict,
        # nn.init, p.mul_): check_params re-reads its master
        self.param_seen = [p._version for p in params]

    def check_params(self, name, cxx=None) -> None:
        """Before the masters are read. RuntimeError naming the first param (``name(i)``)
        whose data no longer lives in this bucket's flat buffer, or changed dtype, since
        wrapping; and for each half param someone else wrote, its master re-read from it
        where they differ (every other element keeps its fp32 bits). ``cxx``: the C++
        extension's module (csrc/hooks.cpp), which tells at C speed when there is nothing
        to do (the loop below costs about 0.25 us per param on the 2-core CPU)."""
        released, seen, resync = self.released, self.param_seen, self.has_master
        if cxx is not None and not any(released) and cxx.params_in_place(
                self.params, self.ptrs, self.dtype, seen if resync else None):
            return
        for i, p in enumerate(self.params):
            if released[i]:
                continue
            if p.data_ptr() != self.ptrs[i] or p.dtype != self.dtype:
                raise RuntimeError(
                    f"{name(i)} no longer views the buffer FusedAccumulator steps (its .data "
                    f"was replaced, now {p.dtype} on {p.device}: p.data = ..., module.to(...), "
                    ".half(), .float() or share_memory_() after wrapping); move or convert the "
                    "model before wrapping it, or wrap it again")
            if resync and p._version != seen[i]:
                self._resync_master(i)
                seen[i] = p._version

    @torch.no_grad()
    def masters_to_model(self) -> None:
        """The half params := their fp32 masters, rounded (after someone else moved the
        masters); their version counters bumped, and the new versions in step."""
        self.model_out.copy_(self.master)
        torch.autograd.graph.increment_version(
            [p for p, r in zip(self.params, self.released) if not r])
        self.param_seen = [p._version for p in self.params]

    @torch.no_grad()
    def _resync_master(self, i: int) -> None:
        o, n = self.offsets[i], self.numels[i]
        a, e = max(o, self.lo), min(o + n, self.hi)
        if a < e:
            half = self.model[a:e]
            master = self.master[a - self.lo:e - self.lo]
            master.copy_(torch.where(half != master.to(self.dtype), half.float(), master))

    def __len__(self) -> int:
        return len(self.params)

    def flat_slice(self, buf: torch.Tensor, i: int) -> torch.Tensor:
        o = self.offsets[i]
        return buf[o:o + self.numels[i]]

    def view(self, buf: torch.Tensor, i: int) -> torch.Tensor:
        """Param ``i``'s elements of the full-size flat ``buf``, in the param's shape and
        memory layout."""
        flat, shape = self.flat_slice(buf, i), self.shapes[i]
        if self.perms[i] is None:
            return flat.view(shape)
        # the param's own strides (those of size-1 dims too): its elements fill the range
        # in memory order
        return flat.as_strided(shape, self.strides[i])

    def flat_of(self, value: torch.Tensor, i: int) -> torch.Tensor:
        """A tensor of param ``i``'s shape, as 1-D in the flat buffers' element order (a
        view where its layout is the param's)."""
        perm = self.perms[i]
        return (value if perm is None else value.permute(perm)).reshape(-1)

    def state_buffer(self, name: str) -> torch.Tensor:
        """The flat fp32 optimizer-state buffer ``name`` over [lo, hi), zeroed on first use."""
        buf = self.state_flat.get(name)
        if buf is None:
            buf = torch.zeros(self.hi - self.lo, dtype=torch.float32, device=self.device)
            self.state_flat[name] = buf
        return buf

    def state_views(self, name: str) -> list[torch.Tensor]:
        """Every param's view of state buffer ``name`` (made once, then reused)."""
        views = self._state_views.get(name)
        if views is None:
            buf = self.state_buffer(name)
            views = [self.view(buf, k) for k in range(len(self.params))]
            self._state_views[name] = views
        return views

    def state_view(self, name: str, i: int) -> torch.Tensor:
        """Param ``i``'s view of state buffer ``name``."""
        return self.state_views(name)[i]

    def step_views(self) -> list[torch.Tensor]:
        """Every param's ``state['step']`` tensor (Adam): a 0-dim fp32 CPU tensor, as torch's
        own, viewing one flat buffer (made once), so that write_steps() is one copy."""
        if self._step_views is None:
            self.step_flat = torch.tensor(self.steps, dtype=torch.float32)
            self._step_views = [self.step_flat[k] for k in range(len(self.params))]
            self.step_version = self.step_flat._version
        return self._step_views

    def write_steps(self, plus_one: bool = False) -> None:
        """Copy ``steps`` into the step tensors, if made; ``plus_one``: the caller knows
        they held ``steps`` minus 1 each (every param stepped once since write_steps), so
        one add_ does it (exact: counts stay far below 2**24)."""
        if self.step_flat is None:
            return
        if plus_one:
            self.step_flat.add_(1.0)
        else:  # (via array: a third of torch.tensor(list)'s time)
            self.step_flat.copy_(torch.frombuffer(array.array("f", self.steps),
                                                  dtype=torch.float32))
        self.step_version = self.step_flat._version

    def read_steps(self) -> bool:
        """``steps`` read back from the step tensors where something else wrote them since
        write_steps (a step entry changed in place): True if so."""
        if self.step_flat is None or self.step_flat._version == self.step_version:
            return False
        self.steps[:] = [int(v) for v in self.step_flat.tolist()]
        self.step_version = self.step_flat._version
        return True

    def runs(self, keys: list | None = None,
             which: list | None = None) -> list[tuple[slice, object]]:
        """Local element ranges of the maximal runs of touched params (or of those
        ``which`` marks) with equal keys (``keys[i]`` for param ``i``; None: all equal).

        A run of params [i, j) is one contiguous element range [offsets[i], offsets[j])
        of every flat buffer (alignment padding between params is always zero in every
        buffer, so a step over it changes nothing); it is returned clipped to [lo, hi)
        and shifted to local coordinates, with its key (None when ``keys`` is None).
        """
        marked = self.touched if which is None else which
        n = len(self.params)
        # (every boundary: all params marked, one key, is one run, found at C speed)
        if all(marked) and (keys is None or keys.count(keys[0]) == n):
            a, e = max(self.offsets[0], self.lo), min(self.offsets[n], self.hi)
            return [(slice(a - self.lo, e - self.lo), None if keys is None else keys[0])] \
                if a < e else []
        out: list[tuple[slice, object]] = []
        i = 0
        while i < n:
            if not marked[i]:
                i += 1
                continue
            k = None if keys is None else keys[i]
            j = i + 1
            while j < n and marked[j] and (keys is None or keys[j] == k):
                j += 1
            a, e = max(self.offsets[i], self.lo), min(self.offsets[j], self.hi)
            if a < e:
                out.append((slice(a - self.lo, e - self.lo), k))
            i = j
        return out

    def cut(self, buf: torch.Tensor | None, s: slice) -> torch.Tensor | None:
        """``buf[s]`` for a local range from runs(): ``buf`` itself when ``s`` spans it
        (no view op: host time per boundary), None for None."""
        if buf is None or (s.start == 0 and s.stop == buf.numel()):
            return buf
        return buf[s]


for _k, _name in enumerate(HOOK_FIELDS):
    setattr(Bucket, _name, _hook_field(_k))
