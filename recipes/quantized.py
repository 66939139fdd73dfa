"""The quantized-GEMM recipe: MX, NVFP4 and FP8, emulated or on real FP8 GEMMs.

Kinds (``recipe.quantizer``): every entry of ``recipes.kinds.QUANTIZER_KINDS``. Backends
(``recipes.backends``): ``emulated`` (any device, fake quantization: the numerics below),
``torch`` (the FP8 kinds' GEMMs as real FP8 scaled matmuls, ``recipes.scaled_linear``: the same
quantized operands, the scale applied to the accumulator) and ``te`` (Transformer Engine modules,
``recipes.te_backend``).

Numerics
--------
Engine: exactly the ``bf16`` recipe's (DeepSpeed bf16 mode: BF16 parameters,
activations and gradients, FP32 master weights and AdamW state, FP32 gradient
reduction under ZeRO). Only the operands of the converted GEMMs differ.

Converted layers (``recipes.filter``): every ``nn.Linear`` except the ones a
``recipe.skip_modules`` regex matches (default: ``lm_head``) and those in the
first ``keep_first_blocks`` / last ``keep_last_blocks`` blocks. Embeddings,
norms, GELU, softmax, the loss and residual adds stay BF16/FP32. With
``quantize_attention`` the QK^T and PV matmuls are quantized too: Q, K, P and V
in ``input_format`` (blocks along the head dim for QK^T, along keys for PV),
their gradients dS and dO in ``grad_output_format``, the backward copies of
the operands in ``input_wgrad_format``; scaling, masking and softmax stay FP32.

In each converted Linear (``recipes.qlinear``), with ``x:[M,K]``, ``W:[N,K]``:

======================  =====================  ==========================  ================
operand                 format field           blocks along                rounding
======================  =====================  ==========================  ================
x   (forward)           ``input_format``       K                           ``rounding``
W   (forward)           ``weight_format``      K (or 2-D tiles)            ``rounding``
dY  (dgrad, wgrad)      ``grad_output_format`` N (dgrad), tokens (wgrad)   ``grad_rounding``
W   (dgrad)             ``weight_dgrad_format`` N (or 2-D tiles)           ``rounding``
x   (wgrad)             ``input_wgrad_format`` tokens                      ``rounding``
======================  =====================  ==========================  ================

A null format keeps that operand in high precision; ``same`` copies the forward role's format.
Every GEMM accumulates in FP32 over the quantized values (``recipe.emulated_gemm``: in BF16 where
they are exact there; per-tensor FP8 and NVFP4 on their codes, the scales applied to the output;
``recipes.qlinear``), rounds to BF16 and adds the bias in FP32. The backward pass re-quantizes
from the BF16 ``x`` and ``W``. Per-layer formats (``recipe.layer_formats``, emulated only): the
first module-name regex (``recipes.filter``) matching a converted Linear replaces its role
fields before ``same`` resolves; block size, rounding, scales, kind and attention stay the recipe's.

Scale granularity and rule, per ``recipe.quantizer``:

* ``mx``: OCP MX, ``block_size`` elements share an E8M0 scale
  ``2^(floor(log2 amax) - emax)`` (``scale_rule: floor``; ``rceil`` =
  NVIDIA's round-up ``2^ceil(log2(amax/max))``), elements saturate to the
  format's max, subnormals kept, a block with NaN/Inf becomes all NaN
  (``recipes.mx.quantize``).
* ``nvfp4``: FP4 E2M1 in 16-element blocks with E4M3 block scales and an FP32
  tensor scale, in TE's order of the scale arithmetic (``nvfp4_scale_order: torchao``
  for torchao's); ``weight_2d_blocks`` gives TE's 16x16 weight tiles;
  ``grad_rounding: stochastic`` is TE's SR on gradients; ``wgrad_hadamard``
  applies TE's random 16x16 Hadamard transform (its fixed sign vector) to both wgrad
  operands, refusing a micro-batch whose token count is not a multiple of 16 (as TE).
* ``fp8_current``: one FP32 scale per tensor ``fp8_max / amax`` of the tensor
  itself (TE ``Float8CurrentScaling``).
* ``fp8_delayed``: one FP32 scale per tensor from the max of an
  ``amax_history_len``-step history of *earlier* steps,
  ``(fp8_max / amax) / 2^margin`` (TE ``DelayedScaling``); histories are
  updated once per optimizer step (``recipe.amax_update: microbatch``: after
  every micro-batch, TE's cadence) and amax-reduced (MAX) across data-parallel
  ranks; evaluation forwards do not record amaxes.
* ``fp8_rowwise``: one scale per row along the reduction dim, power-of-2,
  amax floor 1e-12 (torchao ``rowwise``'s layout; power-of-2 rounding by bit mask, which differs
  from torchao's FP32 ``log2`` just below a power of two: ``recipes.fp8.blockwise``).
* ``fp8_block``: 1 x ``block_size`` activation / gradient blocks along the
  reduction dim and ``block_size``-square weight tiles, power-of-2 FP32 scales
  (TE ``Float8BlockScaling``).

FP8 elements are E4M3 (max 448) for x and W and, under ``fp8_format: HYBRID``, E5M2 (max
57344) for dY; casts are round-to-nearest-even and saturating (``recipes.fp8``).

``recipe.compile`` (auto = on for CUDA only) runs the same functions under ``torch.compile``:
whole forward/backward GEMM bodies for pure quantizers (MX, NVFP4 and FP8 current/rowwise/block
without stochastic rounding), the pure parts of each quantizer otherwise. Same bits as eager.

Not emulated: TE's FP8 storage of weights and activations between ops, its fused kernels'
accumulation (FP32 split accumulation for dgrad / wgrad and block scaling; TE's per-tensor FP8
forward GEMM on Hopper runs with ``use_split_accumulator=False``, reduced-precision accumulation,
which lowbit's FP32 accumulation does not reproduce), and FP8 attention scales (``fp8_dpa``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from recipes import backends
from recipes.base import ConversionReport, Recipe, iter_linears, register_recipe
from recipes.config import ELEMENT_GEMM_FAMILY, SAME, RecipeConfig, resolve_same
from recipes.filter import FilterDecision, num_blocks, select_modules
from recipes.fp8 import DelayedScaling, DelayedScalingState
from recipes.fp8.gemm import check_dims
from recipes.kinds import QUANTIZER_KINDS, RoleRequest
from recipes.mx.nvfp4 import HADAMARD_SIZE, hadamard_tokens
from recipes.numerics import FormatSpec, get_spec, mx_format_name
from recipes.qattention import MatmulQuantizers, QuantAttentionCore
from recipes.qlinear import LinearQuantizers, QuantLinear, set_submodule
from recipes.quantized_checks import (
    check_block_dims,
    check_layer_keys,
    check_recipe_config,
    config_error,
    layer_config,
    layer_override,
    padded_wgrad,
    quantizer_kind,
    resolve_compile,
    role_formats,
)
from recipes.quantizers import RoleQuantizer, SRGenerator
from recipes.scaled_linear import CastEpoch, ScaledGemms, ScaledLinear

__all__ = ["QuantizedRecipe", "check_recipe_config"]


@register_recipe(*QUANTIZER_KINDS)
class QuantizedRecipe(Recipe):
    """Quantized GEMM operands on the BF16 engine (module docstring)."""

    backends = ("te", "torch", "emulated")

    def __init__(self, cfg: RecipeConfig):
        super().__init__(cfg)
        self.device: str | None = None
        self.sr = SRGenerator()
        self.delayed: DelayedScalingState | None = None
        kind = QUANTIZER_KINDS.get(cfg.quantizer)  # an unknown one is refused by check()
        if kind is not None and kind.delayed:
            self.delayed = DelayedScalingState(DelayedScaling(
                fp8_format=cfg.fp8_format.upper(), margin=cfg.margin, amax_history_len=cfg.amax_history_len,
                amax_compute_algo=cfg.amax_compute_algo,
            ))  # fmt: skip
        self.attention: list[str] = []
        self.roles: dict[str, str] = {}
        self._shared: dict[str | None, LinearQuantizers] = {}  # per recipe.layer_formats key
        self.num_attention = 0
        self.cast_epoch = CastEpoch()
        self._te: backends.TEModules | None = None  # backend te

    # ------------------------------------------------------------------ protocol
    def resolve_backend(self, device: str) -> tuple[str, str | None]:
        """``recipes.backends.resolve``: auto picks te, then torch (CUDA), then emulated."""
        check_recipe_config(self.cfg)
        self.device = device
        return backends.resolve(self.cfg, device)

    @property
    def gemm_impl(self) -> str:
        """What runs the converted GEMMs (``resolved.recipe.gemm_impl``)."""
        if self.backend is None or self.device is None:
            return "unresolved"
        return backends.gemm_impl(self.backend, self.cfg, self.device, emulated_gemm=self.emulated_gemm)

    @property
    def compile(self) -> bool:
        return resolve_compile(self.cfg.compile, self.device)

    @property
    def emulated_gemm(self) -> str:  # codes | bf16 | fp32; auto: compiled bodies keep FP32 (no graph break)
        g = self.cfg.emulated_gemm
        return ("fp32" if self.compile else "codes") if g == "auto" else g

    def check_tokens(self, tokens: int) -> None:
        if self.cfg.wgrad_hadamard and tokens % HADAMARD_SIZE:
            raise config_error("wgrad_hadamard", True, f"the {HADAMARD_SIZE}x{HADAMARD_SIZE} transform runs "
                               f"over tokens, {tokens} per micro-batch here (trainer.micro_batch_size x "
                               f"model.seq_len): make it a multiple of {HADAMARD_SIZE}, as TE requires")  # fmt: skip

    def padded_gemms(self, tokens: int) -> dict[str, str]:
        return padded_wgrad(self.cfg, self.report.converted, tokens)

    def check(self, model: nn.Module) -> None:
        """Settings, ``layer_formats`` keys vs the converted layers, then block size vs their dims."""
        cfg = self.cfg
        check_recipe_config(cfg)  # first: it checks the regexes select() compiles
        decision, linears = self.select(model), dict(iter_linears(model))
        check_layer_keys(cfg, decision.converted, decision.kept)
        if self.backend == "torch" and self.device is not None:
            for name in decision.converted:
                lin = linears[name]
                dims = {f"{name}.in_features": lin.in_features, f"{name}.out_features": lin.out_features}
                if why := check_dims(self.device, dims):
                    raise config_error("backend", "torch", f"{why}; keep {name} in high precision via "
                                       "recipe.skip_modules, or use recipe.backend=emulated")  # fmt: skip
        if not quantizer_kind(cfg).blocked:
            return
        check_block_dims(cfg, {name: linears[name] for name in decision.converted})
        if cfg.quantize_attention:
            for name, attn in self._attention_modules(model):
                if int(attn.head_dim) % cfg.block_size:  # type: ignore[arg-type]  # an int attribute of a Module
                    raise config_error("block_size", cfg.block_size, f"must divide the head dim {attn.head_dim} of "
                                       f"{name} (QK^T reduction) when recipe.quantize_attention=true")  # fmt: skip

    def convert(self, model: nn.Module) -> ConversionReport:
        self.check(model)
        decision = self.select(model)
        linears = dict(iter_linears(model))
        if self.backend == "te":
            self._te = backends.TEModules.convert(model, list(decision.converted), self.cfg)
            self.roles = {"te": self._te.describe()}
        for name in decision.converted if self.backend != "te" else ():
            if self.backend == "torch":
                gemms = self._scaled_gemms(name)
                set_submodule(model, name, ScaledLinear.from_linear(linears[name], gemms, name=name))
                self.roles = gemms.describe()
                continue
            qs = self._linear_quantizers(name)
            set_submodule(model, name, QuantLinear.from_linear(linears[name], qs, name=name))
            if not self.roles or layer_override(self.cfg, name)[0] is None:  # the recipe's own formats
                self.roles = qs.describe()
        self.attention = []
        self.num_attention = len(self._attention_modules(model))
        if self.cfg.quantize_attention:
            for name, attn in self._attention_modules(model):
                core = f"{name}.core"
                if core in self._select_names([core], model).converted:
                    attn.core = QuantAttentionCore(self._matmul_quantizers(f"{core}.qk"),
                                                   self._matmul_quantizers(f"{core}.pv"), name=core)  # fmt: skip
                    self.attention.append(core)
        self.report = ConversionReport(
            converted=list(decision.converted), kept=list(decision.kept), reasons=dict(decision.reasons)
        )
        return self.report

    def grad_format(self) -> FormatSpec | None:
        """dY's format as a statistics spec. MX and NVFP4 map exactly (element, block size, scale
        rule); FP8 kinds map to dY's element with per-tensor *current* scaling: exact for
        ``fp8_current``, an approximation for the others (delayed scales lag the amax, rowwise
        and block scales are finer)."""
        cfg = self.cfg
        fmt = role_formats(cfg)["grad_output_dgrad_format"]
        if fmt is None:
            return None
        family = quantizer_kind(cfg).family
        if family == "mx":
            spec = get_spec(mx_format_name(fmt))
            return dataclasses.replace(
                spec, block_size=cfg.block_size or spec.block_size, scale_rule=cfg.scale_rule
            )
        if family == "nvfp4":
            return get_spec("nvfp4")
        return get_spec(fmt)  # FP8 kinds: fp8_e4m3 | fp8_e5m2, checked against fp8_format

    def gemm_family(self) -> str:
        """The rate class of the forward GEMM: its input operand's element format (an emulated
        recipe still runs its GEMMs in BF16 today; this names the format whose peak it models)."""
        fmt = self.cfg.input_format or self.cfg.weight_format
        if quantizer_kind(self.cfg).family == "nvfp4":
            return "fp4"
        return ELEMENT_GEMM_FAMILY.get(fmt or "", self.precision)

    def on_micro_batch(self) -> None:
        """``recipe.amax_update=microbatch``: update the delayed scales after each backward (TE)."""
        if self.delayed is not None and self.cfg.amax_update == "microbatch":
            self.delayed.step(_amax_allreduce())
            self.cast_epoch.advance()

    def on_optimizer_step(self) -> None:
        if self.delayed is not None and self.cfg.amax_update == "step":
            self.delayed.step(_amax_allreduce())
        self.cast_epoch.advance()  # the weights changed: cached weight casts are stale

    def forward_context(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext() if self._te is None else self._te.autocast()

    def telemetry(self) -> dict[str, Any]:
        """Delayed scaling: ``fp8/<layer>/<role>/scale``, ``.../amax``, ``.../amax_history_max`` and,
        with several ranks, ``fp8/rank_scale_spread`` (``DelayedScalingState.metrics``)."""
        return {} if self.delayed is None else self.delayed.metrics(prefix="fp8/")

    def state_dict(self) -> dict[str, Any]:
        """Delayed-scaling histories/scales and the stochastic-rounding generator states."""
        out: dict[str, Any] = {"sr": self.sr.state_dict()}
        if self.delayed is not None:
            out["delayed_scaling"] = self.delayed.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.delayed is not None and "delayed_scaling" in state:
            self.delayed.load_state_dict(state["delayed_scaling"])
        self.sr.load_state_dict(state.get("sr", {}))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["quantizer"] = self.cfg.quantizer
        d["roles"] = dict(self.roles)
        d["compile"], d["emulated_gemm"] = self.compile, self.emulated_gemm
        att = f"QK^T and PV quantized in {len(self.attention)}/{self.num_attention} attention cores"
        d["attention"] = att if self.cfg.quantize_attention else "QK^T and PV in high precision"
        if overrides := {n: o for n in self.report.converted if (o := layer_override(self.cfg, n)[1])}:
            d["layer_formats"] = overrides  # converted layer -> the role fields its key replaces
        if self.delayed is not None:
            d["delayed_scaling_tensors"] = len(self.delayed.names)
        return d

    # ------------------------------------------------------------------ helpers
    def select(self, model: nn.Module) -> FilterDecision:
        """Which Linear layers convert (``recipe.skip_modules``, ``keep_*_blocks``)."""
        return self._select_names([n for n, _ in iter_linears(model)], model)

    def _select_names(self, names: list[str], model: nn.Module) -> FilterDecision:
        total = num_blocks(n for n, _ in model.named_modules())
        return select_modules(
            names,
            skip=self.cfg.skip_modules,
            keep_first_blocks=self.cfg.keep_first_blocks,
            keep_last_blocks=self.cfg.keep_last_blocks,
            total_blocks=total,
        )

    @staticmethod
    def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Modules with a replaceable ``core`` and a ``head_dim`` (``train.model.Attention``)."""
        return [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(getattr(m, "core", None), nn.Module) and hasattr(m, "head_dim")
        ]

    def _role(self, fmt: str | None, *, tensor: str, grad: bool = False, two_d: bool = False,
              cfg: RecipeConfig | None = None) -> RoleQuantizer | None:  # fmt: skip
        """The quantizer of one operand (its kind's factory); ``tensor`` = ``"<layer>/<role>"``,
        ``cfg`` the layer's settings (``layer_config``; default: the recipe's)."""
        if fmt is None:
            return None
        req = RoleRequest(resolve_same(cfg or self.cfg), fmt, tensor, grad=grad, two_d=two_d,
                          compile=self.compile, sr=self.sr, delayed=self.delayed)  # fmt: skip
        return quantizer_kind(self.cfg).make(req)

    def _linear_quantizers(self, name: str) -> LinearQuantizers:
        """Per-layer quantizers; pure ones (no state, no randomness) are built once per
        ``recipe.layer_formats`` key (None: no key) and shared, and under ``compile`` run as two
        compiled graphs per layer shape (forward, backward)."""
        key = layer_override(self.cfg, name)[0]
        if key in self._shared:
            return self._shared[key]
        qs = self.linear_quantizers(name)
        if qs.pure:
            qs = qs.compiled_bodies() if self.compile else qs
            self._shared[key] = qs
        return qs

    def linear_quantizers(self, name: str) -> LinearQuantizers:
        """Layer ``name``'s role quantizers in its formats (``layer_config``; public: the parity
        harness reuses them); a dgrad / wgrad copy in the forward role's format shares that role's."""
        cfg = layer_config(self.cfg, name)
        f, two_d, role = role_formats(cfg), cfg.weight_2d_blocks, functools.partial(self._role, cfg=cfg)
        inp = role(f["input_format"], tensor=f"{name}/input")
        w = role(f["weight_format"], tensor=f"{name}/weight", two_d=two_d)
        g_fmt, gw_fmt = f["grad_output_dgrad_format"], f["grad_output_wgrad_format"]
        g = role(g_fmt, tensor=f"{name}/grad_output", grad=True)
        gw = SAME if gw_fmt == g_fmt else role(gw_fmt, tensor=f"{name}/grad_output", grad=True)
        wd_fmt, xw_fmt = f["weight_dgrad_format"], f["input_wgrad_format"]
        wd = w if wd_fmt == f["weight_format"] else role(wd_fmt, tensor=f"{name}/weight", two_d=two_d)
        xw = inp if xw_fmt == f["input_format"] else role(xw_fmt, tensor=f"{name}/input")
        transform = hadamard_tokens if self.cfg.wgrad_hadamard else None
        return LinearQuantizers(inp, w, g, wd, xw, transform, grad_output_wgrad=gw, gemm=self.emulated_gemm)

    def _scaled_gemms(self, name: str) -> ScaledGemms:
        """backend=torch: the same role quantizers, called through ``cast``."""
        qs = self.linear_quantizers(name)
        roles = (qs.input, qs.weight, qs.grad_output, qs.weight_dgrad, qs.input_wgrad)
        assert all(r is not None and r.castable for r in roles) and not qs.split_dy, (
            "backends.torch_problem admits castable roles only, one dY format (FP8: fp8_format's)"
        )
        c = self.cfg
        fast = (c.fast_accum_forward, c.fast_accum_dgrad, c.fast_accum_wgrad)
        return ScaledGemms(*roles, fast_accum=fast, epoch=self.cast_epoch)  # type: ignore[arg-type]

    def _matmul_quantizers(self, name: str) -> MatmulQuantizers:
        """QK^T / PV: both operands in input_format, dY in grad_output_format, backward copies in input_wgrad_format."""
        f = role_formats(self.cfg)
        a = self._role(f["input_format"], tensor=f"{name}.a/input")
        b = self._role(f["input_format"], tensor=f"{name}.b/input")
        g = self._role(f["grad_output_dgrad_format"], tensor=f"{name}/grad_output", grad=True)
        if f["input_wgrad_format"] == f["input_format"]:
            a_bwd, b_bwd = a, b
        else:
            a_bwd = self._role(f["input_wgrad_format"], tensor=f"{name}.a/input")
            b_bwd = self._role(f["input_wgrad_format"], tensor=f"{name}.b/input")
        return MatmulQuantizers(a, b, g, a_bwd, b_bwd)


def _amax_allreduce() -> Callable[[torch.Tensor], Any] | None:
    """MAX all-reduce over the default group when torch.distributed runs with world size > 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return None
