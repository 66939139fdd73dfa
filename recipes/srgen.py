"""The seeded stochastic-rounding generator every quantized recipe owns (``recipes.quantizers``).

One ``torch.Generator`` per device, seeded ``SR_SEED + rank`` (the data-parallel rank), saved in
and restored from checkpoints, so stochastic rounding is reproducible and resumes exactly.
"""

from __future__ import annotations

import torch

__all__ = ["SR_SEED", "SRGenerator"]

#: seed of the stochastic-rounding generator (the DP rank is added)
SR_SEED = 0x10B17


class SRGenerator:
    """One ``torch.Generator`` per device for stochastic rounding, seeded ``SR_SEED + rank``."""

    def __init__(self, seed: int = SR_SEED):
        self.seed = seed
        self._gens: dict[torch.device, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator:
        if device not in self._gens:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self._gens[device] = torch.Generator(device=device).manual_seed(self.seed + rank)
        return self._gens[device]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(dev): g.get_state() for dev, g in self._gens.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for dev, gen_state in state.items():
            self.get(torch.device(dev)).set_state(gen_state)
