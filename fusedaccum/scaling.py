"""Loss scaling: a static or dynamic scale kept as a device tensor.

The dynamic policy is torch.amp.GradScaler's: start at 2**16, halve on a skipped
window, double after 2000 consecutive clean updates (unless that overflows: the scale
then stays, as GradScaler's does). The boundary already reads the
found-inf flag to the host once, so the bookkeeping (growth tracker) is host-side;
the scale itself stays a device tensor and is never read back.
"""

from __future__ import annotations

import math
import operator

import torch


class LossScaler:
    def __init__(self, spec, device: torch.device, *, init_scale: float = 2.0**16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.dynamic = spec == "dynamic"
        if not self.dynamic:
            if isinstance(spec, bool) or not isinstance(spec, (int, float)):
                raise ValueError(
                    f"loss_scale must be None, 'dynamic' or a positive float, got {spec!r}")
            # (in float32, where the scale is kept: 1e39 was inf there, 1e-46 was 0, and
            # every window was then skipped)
            if not (math.isfinite(spec) and spec > 0) or not (
                    0 < torch.tensor(float(spec), dtype=torch.float32).item() < math.inf):
                raise ValueError(f"loss_scale must be a positive finite float (in float32: "
                                 f"about 1.2e-38 to 3.4e38), got {spec!r}")
        self.scale = torch.tensor(float(init_scale if self.dynamic else spec),
                                  dtype=torch.float32, device=device)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.growth_tracker = 0
        # a static scale set by a loaded partial window (see load_state_dict), until it ends
        self._static = None if self.dynamic else float(spec)
        self._loaded_for_window = False

    def window_ended(self) -> None:
        """A static scale that a loaded partial window set (load_state_dict) goes back to
        the wrapper's own once that window is over: applied, skipped or dropped."""
        if self._loaded_for_window:
            self._loaded_for_window = False
            self.scale = torch.full((), self._static, dtype=torch.float32,
                                    device=self.scale.device)

    def update(self, skipped: bool) -> None:
        """At each window's end, applied or skipped."""
        if not self.dynamic:
            self.window_ended()
            return
        # (a new tensor, not in place: a scale read before, ``opt.loss_scale``, keeps its
        # value, as GradScaler.get_scale()'s does)
        if skipped:
            self.scale = self.scale * self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            # a scale that would overflow stays as it is, as torch's _amp_update_scale_
            # keeps it (an inf scale would skip every window after: inf * backoff is inf);
            # chosen on the device, once per growth_interval windows
            grown = self.scale * self.growth_factor
            self.scale = torch.where(torch.isfinite(grown), grown, self.scale)
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        return {"dynamic": self.dynamic, "scale": self.scale.detach().clone(),
                "growth_tracker": self.growth_tracker}

    @staticmethod
    def check_state_dict(entry: dict) -> None:
        """ValueError unless a saved loss scale is a positive finite number and its growth
        tracker a count: a scale of inf (or 0, or NaN) would skip every window after the load,
        and halving it never brings it back (read once, at the load)."""
        try:
            value = float(entry["scale"])
        except (TypeError, ValueError, RuntimeError):
            value = None
        if value is None or not (math.isfinite(value) and value > 0):
            raise ValueError(f"the state dict's loss scale is {entry['scale']!r}: not a positive "
                             "finite number (a window with it would never be applied); set "
                             "sd['fusedaccum']['loss_scale']['scale'] to one, e.g. 65536.0, the "
                             "dynamic scale's start")
        tracker = entry["growth_tracker"]
        try:  # (an int, or a 0-dim integer tensor where a checkpoint tool made one)
            count = None if isinstance(tracker, bool) else operator.index(tracker)
        except TypeError:
            count = None
        if count is None or count < 0:
            raise ValueError(f"the state dict's loss scale has growth_tracker={tracker!r}: not a "
                             "count")

    def load_state_dict(self, sd: dict, window_open: bool) -> None:
        """A saved scale. A static one (the wrapper was built with ``loss_scale=<float>``)
        keeps its own value, as it was asked for, except for a partial window
        (``window_open``): its saved gradients hold the saved scale, and so must the rest
        of that window's; the window's end brings back the static value (update)."""
        if not self.dynamic:
            self.window_ended()  # (a partial window an earlier load set is dropped by this one)
            value = torch.as_tensor(sd["scale"], dtype=torch.float32)
            self._loaded_for_window = window_open and float(value) != self._static
            if self._loaded_for_window:
                self.scale = value.to(self.scale.device, copy=True)
            return
        self.scale = torch.as_tensor(sd["scale"], dtype=torch.float32).to(
            self.scale.device, copy=True)
        self.growth_tracker = int(sd["growth_tracker"])
