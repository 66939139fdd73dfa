"""Validate a RunConfig at the boundary, before any distributed or model start-up.

Every user error becomes a ``ConfigError(key, value, fix)``; the entry point
prints it as one line, ``lowbit: config error: <key>=<value>: <fix>``, and
exits with code 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from recipes.config import BACKENDS, PRECISIONS
from recipes.errors import ConfigError
from train.config import RunConfig
from train.data import nominal_vocab_size, source_files


@dataclass(frozen=True)
class Plan:
    """Facts derived from the config and the machine, fixed once validated."""

    world_size: int
    device: str
    micro_batch_size: int
    """Resolved: ``trainer.micro_batch_size``, or global / world size when that is 0."""
    grad_accum_steps: int


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _one_of(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(key, value, f"use one of: {', '.join(choices)}")


def check_recipe_on_model(cfg: RunConfig, *, device: str, micro_batch_size: int) -> None:
    """Look the recipe kind up (importing ``recipe.module`` first; an unknown kind or a failed
    import is a ConfigError), resolve its backend for ``device`` (an explicit backend that cannot
    run here is a ConfigError), then let the recipe inspect the model's layers (on the meta
    device: free)."""
    import torch

    from recipes.base import get_recipe
    from recipes.fp8.gemm import check_dims
    from train.model import GPT

    recipe = get_recipe(cfg.recipe)
    recipe.resolve(device)
    with torch.device("meta"):
        model = GPT(cfg.model.resolve(nominal_vocab_size(cfg.data)))
    recipe.check(model)
    recipe.check_tokens(micro_batch_size * cfg.model.seq_len)
    layer = cfg.debug.inject_layer
    d = cfg.debug
    if (d.inject_nonfinite_at_step or d.inject_outlier_at_step) and layer not in dict(model.named_modules()):
        raise ConfigError("debug.inject_layer", layer, "no such module in the model (e.g. blocks.0.mlp.fc)")
    if d.inject_outlier_at_step:
        width = getattr(model.get_submodule(layer), "in_features", 0)
        if not 0 <= d.inject_outlier_channel < width:
            raise ConfigError("debug.inject_outlier_channel", d.inject_outlier_channel,
                              f"must be an input feature of {layer} (0..{width - 1})")  # fmt: skip
        if not d.inject_outlier_growth > 1:
            raise ConfigError(
                "debug.inject_outlier_growth", d.inject_outlier_growth, "must be > 1 (a growth per step)"
            )
    if d.lr_boost_at_step and not d.lr_boost > 0:
        raise ConfigError("debug.lr_boost", d.lr_boost, "must be > 0 (a factor on the learning rate)")
    if recipe.backend == "te":
        check_te(cfg, recipe, model, tokens=micro_batch_size * cfg.model.seq_len)
    if recipe.backend == "torch":
        tokens = micro_batch_size * cfg.model.seq_len
        if why := check_dims(
            device, {"tokens per micro-batch (trainer.micro_batch_size x model.seq_len)": tokens}
        ):
            raise ConfigError(
                "recipe.backend", "torch", f"{why}; change the batch or use recipe.backend=emulated"
            )


def check_te(cfg: RunConfig, recipe, model, *, tokens: int) -> None:
    """backend=te: TE's dimension rules on the converted layers, and the ZeRO settings TE is known
    not to work with (``recipes.te_backend``)."""
    from recipes.te_backend import check_te_dims, te_parallel_problem

    linears = dict(model.named_modules())
    converted = recipe.select(model).converted
    check_te_dims({n: (linears[n].in_features, linears[n].out_features) for n in converted}, tokens,
                  quantizer=cfg.recipe.quantizer)  # fmt: skip
    p = cfg.parallel
    problem = te_parallel_problem(
        zero_stage=p.zero_stage, offload_optimizer=p.offload_optimizer, offload_param=p.offload_param,
        any_bias_false=bool(converted) and not cfg.model.bias, allow_offload=cfg.recipe.te_allow_offload,
        activation_checkpointing=cfg.trainer.activation_checkpointing,
    )  # fmt: skip
    if problem is not None:
        raise problem


def check_reference(cfg: RunConfig) -> None:
    from dataclasses import asdict

    from train.telemetry.divergence import load_reference_run, reference_mismatch

    ref = cfg.reference
    _one_of("reference.mode", ref.mode, ("none", "lockstep"))
    _one_of("reference.precision", ref.precision, ("bf16", "fp32"))
    if not 0 <= ref.ema < 1:
        raise ConfigError("reference.ema", ref.ema, "must be in [0, 1)")
    if ref.run_dir is None:
        return
    if ref.mode == "lockstep":
        raise ConfigError(
            "reference.run_dir", ref.run_dir, "use either reference.run_dir or reference.mode=lockstep"
        )
    if not (
        os.path.isfile(os.path.join(ref.run_dir, "metrics.jsonl"))
        and os.path.isfile(os.path.join(ref.run_dir, "run_config.yaml"))
    ):
        raise ConfigError(
            "reference.run_dir",
            ref.run_dir,
            "not a lowbit run directory (needs metrics.jsonl and run_config.yaml)",
        )
    ref_cfg, _ = load_reference_run(ref.run_dir)
    why = reference_mismatch({"config": asdict(cfg)}, ref_cfg)
    if why:
        raise ConfigError("reference.run_dir", ref.run_dir, f"not a reference for this run: {why}")


def check_corpus_files(cfg: RunConfig) -> None:
    """The data files exist (``train.data.source_files``) and hold something: an empty corpus would
    otherwise fail only in set-up (``prepare_data``), after the process group started."""
    files = source_files(cfg.data)
    if cfg.data.path is not None and not any(os.path.getsize(f) for f in files):
        what = "the file is empty" if len(files) == 1 else f"all {len(files)} data files are empty"
        raise ConfigError("data.path", cfg.data.path, f"{what} (0 bytes); point data.path at your corpus")


def validate(cfg: RunConfig, *, world_size: int) -> Plan:
    m, t, p, r = cfg.model, cfg.trainer, cfg.parallel, cfg.recipe
    # model
    if m.d_model % m.n_heads:
        raise ConfigError("model.n_heads", m.n_heads, f"must divide model.d_model={m.d_model}")
    if m.pos == "rope" and (m.d_model // m.n_heads) % 2:
        raise ConfigError("model.pos", m.pos, "RoPE needs an even head dimension (d_model / n_heads)")
    _one_of("model.mlp", m.mlp, ("gelu", "swiglu"))
    _one_of("model.norm", m.norm, ("layernorm", "rmsnorm"))
    _one_of("model.pos", m.pos, ("learned", "rope"))
    for key, val in (
        ("model.n_layers", m.n_layers),
        ("model.seq_len", m.seq_len),
        ("model.d_model", m.d_model),
    ):
        if val < 1:
            raise ConfigError(key, val, "must be >= 1")
    # trainer
    for key, val in (
        ("trainer.max_steps", t.max_steps),
        ("trainer.log_every", t.log_every),
        ("trainer.eval_every", t.eval_every),
        ("trainer.global_batch_size", t.global_batch_size),
        ("trainer.eval_sequences", t.eval_sequences),
    ):
        if val < 1:
            raise ConfigError(key, val, "must be >= 1")
    if t.checkpoint_every < 0:
        raise ConfigError(
            "trainer.checkpoint_every", t.checkpoint_every, "must be >= 0 (0 disables periodic checkpoints)"
        )
    if t.keep_checkpoints < 0:
        raise ConfigError(
            "trainer.keep_checkpoints", t.keep_checkpoints, "must be >= 0 (0 keeps every checkpoint)"
        )
    if t.micro_batch_size < 0:
        raise ConfigError(
            "trainer.micro_batch_size",
            t.micro_batch_size,
            "must be >= 1, or 0 for global_batch_size / world_size",
        )
    micro = t.micro_batch_size or max(t.global_batch_size // world_size, 1)
    per_step = micro * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            "trainer.global_batch_size",
            t.global_batch_size,
            f"must be divisible by micro_batch_size x world_size = {micro} x {world_size} = {per_step}; "
            "change trainer.global_batch_size or trainer.micro_batch_size",
        )
    _one_of("trainer.on_nonfinite", t.on_nonfinite, ("stop", "skip", "log"))
    _one_of("debug.inject_tensor", cfg.debug.inject_tensor, ("grad_output", "activation"))
    from train.faults import POINTS

    _one_of("debug.kill_in", cfg.debug.kill_in, POINTS)
    if not t.lr > 0:
        raise ConfigError(
            "trainer.lr", t.lr, "must be > 0 (the peak learning rate of the warm-up + cosine schedule)"
        )
    if not 0 <= t.warmup_frac < 1:
        raise ConfigError("trainer.warmup_frac", t.warmup_frac, "must be in [0, 1)")
    if t.resume not in ("none", "auto") and not os.path.isdir(t.resume):
        raise ConfigError("trainer.resume", t.resume, "use none, auto, or an existing checkpoint directory")
    _one_of("trainer.device", t.device, ("auto", "cpu", "cuda"))
    from recipes.numerics import FORMAT_SPECS

    for fmt in cfg.stats.shadow_formats:
        _one_of("stats.shadow_formats", fmt, sorted(FORMAT_SPECS))
    if cfg.stats.every < 0:
        raise ConfigError("stats.every", cfg.stats.every, "must be >= 0 (0 disables the heavy statistics)")
    from train.telemetry.selection import resolve as resolve_stats

    resolve_stats(cfg.stats)  # families, layer regexes, the TE debug YAML
    device = resolve_device(t.device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.device", t.device, "no CUDA device is visible; use trainer.device=cpu")
    # parallel
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero_stage", p.zero_stage, "use 0, 1, 2 or 3")
    if p.single_process and world_size > 1:
        raise ConfigError(
            "parallel",
            p.name,
            f"runs one process but the job has {world_size}; use parallel=ddp|zero1|zero2|zero3",
        )
    if p.offload_param and p.zero_stage < 3:
        raise ConfigError("parallel.offload_param", True, "parameter offload needs parallel.zero_stage=3")
    if cfg.launcher.collective_timeout_s < 1:
        raise ConfigError(
            "launcher.collective_timeout_s", cfg.launcher.collective_timeout_s, "must be >= 1 second"
        )
    if cfg.launcher.nproc_per_node < 1:
        raise ConfigError("launcher.nproc_per_node", cfg.launcher.nproc_per_node, "must be >= 1")
    from train.hostmem import check as check_host_malloc

    check_host_malloc(cfg.launcher.host_malloc)
    # recipe (recipe.name is a label; the kind, recipe.quantizer, is checked by the registry below)
    _one_of("recipe.precision", r.precision, PRECISIONS)
    _one_of("recipe.backend", r.backend, BACKENDS)
    if r.precision == "fp16" and device == "cpu":
        raise ConfigError(
            "recipe.precision",
            "fp16",
            "DeepSpeed refuses fp16 on its CPU accelerator; use +recipe=bf16 or run on a GPU",
        )
    check_recipe_on_model(cfg, device=device, micro_batch_size=micro)
    check_reference(cfg)
    # data (cheap checks only: files exist and are not all empty, corpus installed)
    check_corpus_files(cfg)
    _one_of("data.tokenizer", cfg.data.tokenizer, ("bytes", "bpe"))
    if not 0 < cfg.data.val_fraction < 0.5:
        raise ConfigError("data.val_fraction", cfg.data.val_fraction, "must be in (0, 0.5)")
    if m.vocab_size is not None and cfg.data.tokenizer == "bytes" and m.vocab_size < 256:
        raise ConfigError("model.vocab_size", m.vocab_size, "byte tokens need a vocabulary of at least 256")
    if cfg.logger.wandb.mode not in (None, "offline", "online", "disabled"):
        raise ConfigError("logger.wandb.mode", cfg.logger.wandb.mode, "use null, offline, online or disabled")
    if not cfg.logger.wandb.init_timeout_s > 0:
        raise ConfigError(
            "logger.wandb.init_timeout_s", cfg.logger.wandb.init_timeout_s, "must be > 0 seconds"
        )
    env_mode = os.environ.get("WANDB_MODE")
    if cfg.logger.wandb.mode is None and env_mode and env_mode not in ("offline", "online", "disabled"):
        raise ConfigError(
            "WANDB_MODE", env_mode, "use offline, online or disabled (or set logger.wandb.mode)"
        )
    if p.offload_optimizer and p.zero_stage == 0:
        raise ConfigError(
            "parallel.offload_optimizer", True, "optimizer offload needs parallel.zero_stage >= 1"
        )
    return Plan(
        world_size=world_size,
        device=device,
        micro_batch_size=micro,
        grad_accum_steps=t.global_batch_size // per_step,
    )
