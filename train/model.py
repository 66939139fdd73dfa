"""A GPT-style pre-norm decoder built from plain ``nn.Linear`` layers.

Recipes convert layers by swapping modules (``blocks.{i}.attn.qkv``,
``blocks.{i}.attn.proj``, ``blocks.{i}.mlp.fc``, ``blocks.{i}.mlp.proj``,
``lm_head``), so every GEMM of the network is an ``nn.Linear`` with a stable
name. Attention's two matmuls go through ``Attention.core`` (an
``nn.Module``), which a recipe may replace to quantize QK^T and PV.

Initial weights depend only on the seed and the model config: ``build_model``
seeds a private generator and initialises every parameter in FP32, in module
order, before any recipe or engine touches the model.

Shape legend: B batch, T sequence, D d_model, H heads, K head dim, V vocab, F FFN width.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang_TK = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return ang_TK.cos(), ang_TK.sin()


def apply_rope(x_BHTK: torch.Tensor, cos_TK: torch.Tensor, sin_TK: torch.Tensor) -> torch.Tensor:
    T = x_BHTK.shape[-2]
    cos, sin = cos_TK[:T].to(x_BHTK.dtype), sin_TK[:T].to(x_BHTK.dtype)
    x1, x2 = x_BHTK[..., 0::2], x_BHTK[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class CausalAttentionCore(nn.Module):
    """softmax(QK^T / sqrt(K)) V with a causal mask; replaceable by recipes."""

    def forward(self, q_BHTK: torch.Tensor, k_BHTK: torch.Tensor, v_BHTK: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=True)


class Attention(nn.Module):
    rope_cos: torch.Tensor  # buffers, registered with RoPE only
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.core = CausalAttentionCore()
        self.use_rope = cfg.pos == "rope"
        if self.use_rope:
            cos, sin = rope_cache(cfg.seq_len, self.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim)
        q_BHTK, k_BHTK, v_BHTK = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.use_rope:
            q_BHTK = apply_rope(q_BHTK, self.rope_cos, self.rope_sin)
            k_BHTK = apply_rope(k_BHTK, self.rope_cos, self.rope_sin)
        y_BHTK = self.core(q_BHTK, k_BHTK, v_BHTK)
        return self.proj(y_BHTK.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width = cfg.ffn_dim
        self.swiglu = cfg.mlp == "swiglu"
        self.fc = nn.Linear(cfg.d_model, 2 * width if self.swiglu else width, bias=cfg.bias)
        self.proj = nn.Linear(width, cfg.d_model, bias=cfg.bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h_BTF = self.fc(x_BTD)
        if self.swiglu:
            gate, up = h_BTF.chunk(2, dim=-1)
            h_BTF = F.silu(gate) * up
        else:
            h_BTF = F.gelu(h_BTF, approximate="tanh")
        return self.proj(h_BTF)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD))
        return x_BTD + self.mlp(self.norm2(x_BTD))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, *, vocab_size: int | None = None):
        """``vocab_size``: None takes ``cfg.vocab_size`` (a config from ``ModelConfig.resolve``)."""
        super().__init__()
        vocab_size = vocab_size or cfg.vocab_size
        if not vocab_size:
            raise ValueError("GPT needs a vocabulary size: pass vocab_size or a resolved ModelConfig")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.activation_checkpointing = False
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] without targets; the mean cross-entropy (FP32) with them."""
        T = idx_BT.shape[1]
        x_BTD = self.tok_emb(idx_BT)
        if self.pos_emb is not None:
            x_BTD = x_BTD + self.pos_emb.weight[:T]
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x_BTD = checkpoint(block, x_BTD, use_reentrant=False)
            else:
                x_BTD = block(x_BTD)
        logits_BTV = self.lm_head(self.norm_f(x_BTD))
        if targets_BT is None:
            return logits_BTV
        return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())


@torch.no_grad()
def init_weights(model: GPT, *, seed: int) -> None:
    """GPT-2 init in module order: N(0, std) for Linear/Embedding, residual
    output projections scaled by 1/sqrt(2 * n_layers), norms at 1, biases at 0."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    std = model.cfg.init_std
    resid_std = std / math.sqrt(2 * model.cfg.n_layers)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear | nn.Embedding):
            if mod is model.lm_head and model.cfg.tie_embeddings:
                continue
            s = resid_std if name.endswith(("attn.proj", "mlp.proj")) else std
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * s)
            if (bias := getattr(mod, "bias", None)) is not None:
                bias.zero_()
        elif isinstance(mod, nn.LayerNorm | RMSNorm):
            mod.weight.fill_(1.0)
            if (bias := getattr(mod, "bias", None)) is not None:
                bias.zero_()


def build_model(cfg: ModelConfig, *, vocab_size: int | None = None, seed: int) -> GPT:
    """The FP32 model with its seed-determined initial weights, on CPU."""
    model = GPT(cfg, vocab_size=vocab_size)
    init_weights(model, seed=seed)
    return model


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's FP32 bytes in name order (shared tensors once)."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if id(p) in seen:
            continue
        seen.add(id(p))
        h.update(name.encode())
        h.update(p.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def count_params(model: nn.Module, *, non_embedding: bool = False) -> int:
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen or (non_embedding and name.split(".")[0] in ("tok_emb", "pos_emb")):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
