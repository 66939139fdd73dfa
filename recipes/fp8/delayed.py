"""Emulated TE ``DelayedScaling``: per-tensor FP8 scales from an amax history of earlier steps.

Numerics
--------
Quantized tensors: each named GEMM operand (``"blocks.0.attn.qkv/input"``,
``".../weight"``, ``".../grad_output"``; the role is the part after the last
``/``). Format: ``E4M3`` for every role, or ``HYBRID`` = E4M3 for forward roles
(input, weight, output) and E5M2 for backward roles (grad_output, grad_input).
Elements: ``cast_fp8(clamp(x*s, -max, max))``, RNE, saturating, NaN propagates
(:mod:`recipes.fp8.formats`). Scales, amaxes and everything not passed in stay
FP32 / high precision.

State per tensor ``i`` (TE's layout, all tensors stacked in one buffer):
``H[j, i]`` for ``j = 0..L-1`` (``L = amax_history_len``) and ``s[i]``.
Row ``H[0]`` is the *current* step's slot; after a step the most recent
completed amax sits at ``H[L-1]``, the one before at ``H[L-2]``, ..., the
oldest at ``H[1]``.

Within optimizer step ``t`` (any number of micro-batches):

    x'        = quantize(x, s_t[i])                         s_t from steps < t only
    H[0, i]  <- max(H[0, i], amax(x))                       micro-batches max-combine

``step(reduce_fn)`` at the end of step ``t``, vectorised over all tensors:

    1. if recipe.reduce_amax and reduce_fn:  H[0] <- allreduce_MAX(H[0])   (data-parallel ranks)
    2. a_i  = max_j H[j, i]    ("max": the window of the last L steps, current included)
       a_i  = H[0, i]          ("most_recent")
    3. s_{t+1}[i] = fp32(fp8_max * 2^-margin) / a_i   if a_i finite and > 0
                  = s_t[i]                            otherwise (amax 0, Inf, NaN: keep the old scale)
       then FLT_MAX if the division overflowed.
    4. roll, only for tensors with H[0, i] != 0:
       H[:, i] <- (0, H[2, i], ..., H[L-1, i], H[0, i])  i.e. torch.roll(H, -1, 0) then H[0] = 0.

Initial state (first use of a tensor): ``H[:, i] = 0``, ``s[i] = 1.0`` (TE's init),
so step 0 quantizes with scale 1.0 and may saturate or underflow.

TE behaviour emulated (``common/recipe/delayed_scaling.cu``, the bulk
``amax_and_scale_update_after_reduction`` kernel of TE 2.x): the roll and the
"max" are skipped for a tensor whose current (reduced) amax is exactly 0
(unused this step, or all zeros), so such a step neither consumes a history
slot nor changes the scale. TE's older non-bulk kernel rolled unconditionally.

Where this emulation differs from TE:

* **Cadence.** TE updates forward scales at every ``autocast`` exit and
  backward scales at the end of every backward pass, i.e. once per
  *micro-batch*. Here :meth:`DelayedScalingState.step` is called by the
  caller; the trainer calls it once per *optimizer step* so micro-batches
  max-combine into one slot. Calling it after every micro-batch reproduces
  TE's cadence.
* TE quantizes with ``scale`` and dequantizes via ``scale_inv = 1/scale``
  (FP32); :meth:`quantize` divides by ``scale`` (up to 1 ulp apart).
* TE's amax comes from the same kernel as the cast (fused); the value is the
  same max|x| (NaN ignored via ``fmaxf``). TE keeps one amax per tensor even
  when it also writes a transposed copy; so does this emulation.
* TE reduces over ``amax_reduction_group`` (often TP x DP); the caller's
  ``reduce_fn`` decides the group here.
* ``scaling_factor_compute_algo`` and callable ``amax_compute_algo`` are not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from recipes.fp8.formats import FP8Format, amax, cast_to_fp8, format_for_role, quantize_fp8
from recipes.fp8.scaling import scale_from_amax

__all__ = ["DelayedScaling", "DelayedScalingState"]


@dataclass(frozen=True)
class DelayedScaling:
    """Config twin of TE's ``DelayedScaling`` recipe (TE defaults)."""

    fp8_format: str = "HYBRID"
    """``"E4M3"`` for all tensors, or ``"HYBRID"``: E4M3 forward, E5M2 for grad tensors."""
    margin: int = 0
    """Scale is divided by ``2^margin``: headroom above the history's amax."""
    amax_history_len: int = 1024
    """Steps kept in the window (Megatron/NeMo default to 1; TE to 1024)."""
    amax_compute_algo: str = "max"
    """``"max"`` over the window, or ``"most_recent"`` (this step's amax)."""
    reduce_amax: bool = True
    """All-reduce (MAX) the current amaxes across ranks before each update."""

    def __post_init__(self) -> None:
        if self.fp8_format.upper() not in ("E4M3", "HYBRID"):
            raise ValueError(f"fp8_format={self.fp8_format!r}: use 'E4M3' or 'HYBRID' (TE has no pure E5M2)")
        if not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin={self.margin!r} must be a non-negative int")
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len={self.amax_history_len} must be >= 1")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"amax_compute_algo={self.amax_compute_algo!r}: use 'max' or 'most_recent'")

    def format_for(self, role: str) -> FP8Format:
        return format_for_role(self.fp8_format, role)


class DelayedScalingState:
    """Amax histories and scales of all tensors under one :class:`DelayedScaling` recipe.

    Tensors are registered by name on first use (or up front via ``names``);
    storage grows by doubling, so ``step()`` is a fixed handful of tensor ops
    whatever the number of tensors. No method syncs with the host.
    """

    def __init__(
        self,
        recipe: DelayedScaling,
        *,
        names: Iterable[str] = (),
        device: torch.device | str | None = None,
    ) -> None:
        self.recipe = recipe
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_steps = 0
        self._names: list[str] = []
        self._hist = self._scale = self._fp8_max = torch.empty(0)  # sized by _alloc
        self._index: dict[str, int] = {}
        self._formats: list[FP8Format] = []
        self._alloc(16)
        for name in names:
            self.register(name)

    # ------------------------------------------------------------------ storage
    def _alloc(self, capacity: int) -> None:
        L, n = self.recipe.amax_history_len, len(self._names)
        hist = torch.zeros(L, capacity, dtype=torch.float32, device=self.device)
        scale = torch.ones(capacity, dtype=torch.float32, device=self.device)
        fp8_max = torch.ones(capacity, dtype=torch.float32, device=self.device)
        if n:
            hist[:, :n] = self._hist[:, :n]
            scale[:n] = self._scale[:n]
            fp8_max[:n] = self._fp8_max[:n]
        self._hist, self._scale, self._fp8_max = hist, scale, fp8_max

    def register(self, name: str) -> int:
        """Add a tensor (history zeros, scale 1.0); returns its column. Idempotent."""
        if name in self._index:
            return self._index[name]
        fmt = self.recipe.format_for(name.rsplit("/", 1)[-1])
        i = len(self._names)
        if i == self._scale.numel():
            self._alloc(2 * i)
        self._names.append(name)
        self._index[name] = i
        self._formats.append(fmt)
        self._fp8_max[i] = fmt.max
        return i

    def to(self, device: torch.device | str) -> DelayedScalingState:
        self.device = torch.device(device)
        self._hist, self._scale, self._fp8_max = (
            t.to(self.device) for t in (self._hist, self._scale, self._fp8_max)
        )
        return self

    # ------------------------------------------------------------------ views
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._names)

    @property
    def amax_history(self) -> torch.Tensor:
        """``[amax_history_len, num_tensors]`` view; row 0 is the current step's running amax."""
        return self._hist[:, : len(self._names)]

    @property
    def scales(self) -> torch.Tensor:
        """``[num_tensors]`` view of the scales the current step quantizes with."""
        return self._scale[: len(self._names)]

    def format(self, name: str) -> FP8Format:
        return self._formats[self._index[name]]

    def scale(self, name: str) -> torch.Tensor:
        """0-d copy of ``name``'s current scale (1.0 before its first update)."""
        return self._scale[self._index[name]].clone()

    def scale_inv(self, name: str) -> torch.Tensor:
        """TE's ``scale_inv = 1/scale`` (FP32)."""
        return torch.reciprocal(self.scale(name))

    # ------------------------------------------------------------------ per-call
    def record_amax(self, name: str, value: torch.Tensor) -> None:
        """Max-combine the amax ``value`` into ``name``'s current-step slot (NaN ignored, like TE)."""
        i = self.register(name)
        slot = self._hist[0, i]
        slot.copy_(torch.fmax(slot, value.to(device=self.device, dtype=torch.float32)))

    def quantize(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` with the delayed scale of ``name``; records ``amax(x)``."""
        i = self.register(name)
        self.record_amax(name, amax(x))
        return quantize_fp8(x, self._formats[i], self._scale[i].to(x.device))

    def cast(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`quantize` but returns ``(float8 tensor, scale_inv)`` for real kernels."""
        i = self.register(name)
        self.record_amax(name, amax(x))
        return cast_to_fp8(x, self._formats[i], self._scale[i].to(x.device))

    # ------------------------------------------------------------------ per-step
    def step(self, reduce_fn: Callable[[torch.Tensor], Any] | None = None) -> None:
        """End of an optimizer step: reduce amaxes, compute next scales, roll histories.

        ``reduce_fn`` receives a contiguous FP32 ``[num_tensors]`` tensor of the
        current amaxes and must reduce it in place with MAX (e.g.
        ``lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX)``); it is called
        only when ``recipe.reduce_amax``. Every rank must have registered the
        same names in the same order.
        """
        n = len(self._names)
        self.num_steps += 1
        if n == 0:
            return
        hist = self._hist[:, :n]
        if reduce_fn is not None and self.recipe.reduce_amax:
            cur = hist[0].contiguous().clone()
            reduce_fn(cur)
            hist[0].copy_(cur)
        cur = hist[0]
        active = cur != 0  # TE's bulk kernel skips the roll (and the max) when the amax is 0
        if self.recipe.amax_compute_algo == "max":
            a = torch.where(active, hist.amax(dim=0), torch.zeros_like(cur))
        else:
            a = cur.clone()
        self._scale[:n] = scale_from_amax(
            a, self._fp8_max[:n], margin=self.recipe.margin, prev_scale=self._scale[:n]
        )
        rolled = torch.roll(hist, shifts=-1, dims=0)
        rolled[0] = 0.0
        hist.copy_(torch.where(active.unsqueeze(0), rolled, hist))

    # ------------------------------------------------------------------ telemetry
    def metrics(self, prefix: str = "") -> dict[str, Any]:
        """Per tensor ``<prefix><name>/scale``, ``/amax`` (the newest completed amax),
        ``/amax_history_max`` (the window's max) and ``/amax_history_hist``: the window's finite
        non-zero amaxes binned per binade (bin ``[e, e+1)`` counts amaxes with ``floor(log2 amax)
        = e``), in W&B's histogram layout ``{"_type": "histogram", "bins", "values"}``; one host
        sync. Under torch.distributed with
        several ranks also ``<prefix>rank_scale_spread``: the largest relative spread of any
        scale over the ranks (0.0 when every rank quantizes with the same scales, which the amax
        all-reduce guarantees); one collective, so every rank must call it."""
        if not self._names:
            return {}
        hist, scales = self.amax_history.float(), self.scales.float()
        vals = torch.stack([scales, hist[-1], hist.amax(dim=0)], dim=1).tolist()
        ok = torch.isfinite(hist) & (hist > 0)
        exps = torch.where(ok, torch.floor(torch.log2(torch.where(ok, hist, 1.0))), 0.0).to(torch.int64)
        lo = torch.where(ok, exps, 1 << 20).amin(dim=0)
        # finite FP32 binades span -149..127: 277 bins from each tensor's lowest cover them all
        counts = torch.zeros(exps.shape[1], 277, dtype=torch.int64, device=exps.device)
        counts.scatter_add_(1, (exps - lo).clamp(0, 276).T, ok.T.long())
        lo_list, count_rows = lo.tolist(), counts.tolist()
        out: dict[str, Any] = {}
        for i, (name, (scale, recent, window)) in enumerate(zip(self._names, vals)):
            out[f"{prefix}{name}/scale"] = scale
            out[f"{prefix}{name}/amax"] = recent
            out[f"{prefix}{name}/amax_history_max"] = window
            out[f"{prefix}{name}/amax_history_hist"] = _binade_histogram(lo_list[i], count_rows[i])
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.cat([scales, -scales])
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            hi, lo = both[: len(scales)], -both[len(scales) :]
            out[f"{prefix}rank_scale_spread"] = float(((hi - lo) / hi).max())
        return out

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "recipe": asdict(self.recipe),
            "names": list(self._names),
            "amax_history": self.amax_history.clone(),
            "scale": self.scales.clone(),
            "num_steps": self.num_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore histories and scales by name (names not in ``state`` keep their values)."""
        hist = state["amax_history"]
        if hist.shape[0] != self.recipe.amax_history_len:
            raise ValueError(
                f"checkpoint amax_history_len={hist.shape[0]} != recipe.amax_history_len="
                f"{self.recipe.amax_history_len}; use the checkpoint's recipe or start fresh histories"
            )
        for j, name in enumerate(state["names"]):
            i = self.register(name)
            self._hist[:, i] = hist[:, j].to(self.device)
            self._scale[i] = state["scale"][j].to(self.device)
        self.num_steps = int(state.get("num_steps", 0))


def _binade_histogram(lo: int, counts: list[int]) -> dict[str, Any]:
    """Counts per binade from exponent ``lo`` up, trimmed to the occupied bins (an empty window:
    one empty bin ``[0, 1)``)."""
    used = [j for j, c in enumerate(counts) if c]
    if not used:
        return {"_type": "histogram", "bins": [0.0, 1.0], "values": [0]}
    top = used[-1] + 1
    return {"_type": "histogram", "bins": [float(lo + j) for j in range(top + 1)], "values": counts[:top]}
