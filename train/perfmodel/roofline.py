"""Pure cost formulas of the performance model: GEMM and memory-bound rooflines, ring
collectives, ZeRO memory, Korthikanti et al. activation memory.

Units: seconds, bytes, FLOPs; hardware fields as in ``train.hwspec`` (TFLOP/s, TB/s, GB/s).

* **GEMM** (torchao ``roofline_utils.get_individual_gemm_time_sympy``, same assumptions):
  ``max(2 M K N / (peak * gemm_efficiency), bytes / (hbm * mem_efficiency), kernel_launch)``,
  bytes = both operands at their element width plus the scales the GEMM reads, the output in
  BF16. Arithmetic intensity = FLOPs / bytes.
* **Memory-bound pass**: ``max(bytes / (hbm * mem_efficiency), kernels * kernel_launch)``.
* **Ring collectives** over ``p`` GPUs (NCCL's bus-bandwidth model, nccl-tests
  ``doc/PERFORMANCE.md``): all-reduce moves ``2 (p-1)/p S``, reduce-scatter and all-gather
  ``(p-1)/p S`` through each GPU's link, ``S`` the full buffer. The link is the intra-node
  fabric when all ``p`` GPUs sit in one NVLink domain, else the slower of it and the per-GPU NIC
  (a ring that leaves the domain crosses a NIC). No latency term beyond the kernel floor: the
  gradient buffers are large; the FP8 amax reduction (a few KB) is floored at one kernel launch,
  a lower bound.
* **ZeRO memory** (Rajbhandari et al. 2020, fig. 1, mixed-precision Adam, ``K = 12``): per GPU
  ``2 Psi + 2 Psi + 12 Psi`` (stage 0) with the optimizer state (1), then the gradients (2),
  then the parameters (3) divided by the data-parallel degree ``N_d``.
* **Activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", sec. 4.1, no tensor/sequence parallelism): per layer ``s b h (34 + 5 a s
  / h)`` bytes. lowbit's block has no dropout (drops the paper's two ``s b h`` masks and the
  ``a s^2 b`` one) and SDPA's fused kernels keep no score matrix (drops the ``5 a s^2 b`` term,
  the paper's "selective recomputation"); its MLP width is general: ``s b h (16 + 2 (F_fc + F)
  / h)``, 32 ``s b h`` at GELU ``F = 4h``. Full checkpointing per block keeps ``2 s b h`` per
  layer plus one block's activations while it recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass

from train.hwspec import HardwareConfig

#: bytes per element of BF16 activations / outputs
BF16 = 2


@dataclass(frozen=True)
class Roofline:
    time_s: float
    bound: str
    """compute | memory | network | latency (the kernel-launch floor decided)."""
    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        """FLOPs per byte (0 for a pass without FLOPs)."""
        return self.flops / self.bytes if self.bytes else 0.0


def _decide(times: dict[str, float]) -> tuple[float, str]:
    bound = max(times, key=lambda k: times[k])
    return times[bound], bound


def gemm(m: int, k: int, n: int, *, peak_tflops: float, bytes_moved: float, hw: HardwareConfig) -> Roofline:
    """One ``[m,k] x [k,n]`` GEMM moving ``bytes_moved`` bytes, at ``peak_tflops`` (dense)."""
    return kernel(2.0 * m * k * n, bytes_moved, peak_tflops=peak_tflops, hw=hw)


def gemm_bytes(m: int, k: int, n: int, *, a_bits: float, b_bits: float, scale_bytes: float = 0.0) -> float:
    """Operands at their element widths, the scales read, the ``[m,n]`` output in BF16."""
    return m * k * a_bits / 8 + k * n * b_bits / 8 + scale_bytes + m * n * BF16


def memory_pass(bytes_moved: float, *, hw: HardwareConfig, kernels: int = 1, flops: float = 0.0) -> Roofline:
    """A memory-bound pass of ``kernels`` kernels moving ``bytes_moved`` bytes."""
    t, bound = _decide({
        "memory": bytes_moved / (hw.hbm_tb_s * 1e12 * hw.mem_efficiency),
        "latency": kernels * hw.kernel_launch_us * 1e-6,
    })  # fmt: skip
    return Roofline(t, bound, flops, bytes_moved)


def kernel(flops: float, bytes_moved: float, *, peak_tflops: float, hw: HardwareConfig) -> Roofline:
    """One kernel of ``flops`` matmul FLOPs moving ``bytes_moved`` bytes: compute, memory or
    launch latency, whichever is longest."""
    t, bound = _decide({
        "compute": flops / (peak_tflops * 1e12 * hw.gemm_efficiency),
        "memory": bytes_moved / (hw.hbm_tb_s * 1e12 * hw.mem_efficiency),
        "latency": hw.kernel_launch_us * 1e-6,
    })  # fmt: skip
    return Roofline(t, bound, flops, bytes_moved)


def attention(flops: float, bytes_moved: float, *, peak_tflops: float, hw: HardwareConfig) -> Roofline:
    """A fused attention kernel: the roofline of its matmul FLOPs and its Q/K/V/O traffic."""
    return kernel(flops, bytes_moved, peak_tflops=peak_tflops, hw=hw)


#: bytes through each GPU's link per byte of buffer, as a function of the group size p
RING_FACTOR = {
    "all_reduce": lambda p: 2 * (p - 1) / p,
    "reduce_scatter": lambda p: (p - 1) / p,
    "all_gather": lambda p: (p - 1) / p,
}


def link_gb_s(hw: HardwareConfig, *, num_gpus: int) -> float:
    """The per-GPU, per-direction bandwidth a ring over ``num_gpus`` GPUs runs at."""
    if num_gpus <= hw.domain:
        return hw.intra_node_gb_s
    return min(hw.intra_node_gb_s, hw.inter_node_gb_s)


def ring(kind: str, size_bytes: float, *, num_gpus: int, hw: HardwareConfig) -> Roofline:
    """A ring ``kind`` collective of an ``size_bytes`` buffer over ``num_gpus`` GPUs."""
    if num_gpus <= 1:
        return Roofline(0.0, "network", 0.0, 0.0)
    moved = RING_FACTOR[kind](num_gpus) * size_bytes
    t, bound = _decide({
        "network": moved / (link_gb_s(hw, num_gpus=num_gpus) * 1e9),
        "latency": hw.kernel_launch_us * 1e-6,
    })  # fmt: skip
    return Roofline(t, bound, 0.0, moved)


def zero_memory(num_params: int, *, stage: int, dp: int) -> dict[str, float]:
    """Bytes per GPU of BF16 parameters, BF16 gradients and FP32 Adam state (master, m, v)
    under ZeRO ``stage`` over ``dp`` data-parallel ranks (Rajbhandari et al. 2020, fig. 1)."""
    return {
        "params": 2.0 * num_params / (dp if stage >= 3 else 1),
        "grads": 2.0 * num_params / (dp if stage >= 2 else 1),
        "optimizer": 12.0 * num_params / (dp if stage >= 1 else 1),
    }


def layer_activation_bytes(*, seq: int, batch: int, d_model: int, fc_out: int, ffn: int) -> float:
    """Korthikanti et al. 2022 per-layer activations of one micro-batch, lowbit's block (module
    docstring): ``s b h (16 + 2 (F_fc + F) / h)``."""
    sbh = seq * batch * d_model
    return sbh * 16 + seq * batch * 2 * (fc_out + ffn)


def activation_memory(
    *, layers: int, seq: int, batch: int, d_model: int, fc_out: int, ffn: int, checkpointing: bool
) -> float:
    """All layers' saved activations of one micro-batch; with per-block checkpointing the block
    inputs (``2 s b h`` each) plus one block's activations during its recompute."""
    per_layer = layer_activation_bytes(seq=seq, batch=batch, d_model=d_model, fc_out=fc_out, ffn=ffn)
    if checkpointing:
        return layers * BF16 * seq * batch * d_model + per_layer
    return layers * per_layer
