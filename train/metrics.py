"""Pure metric functions. Keys are slash-namespaced with units."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


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


def grad_global_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm over all gradients, in FP32, without a host sync."""
    grads = [p.grad.float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
