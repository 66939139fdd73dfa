"""OCP Microscaling (MX v1.0) formats: pure quantize / encode / decode functions (no autograd).

Numerics are documented in ``recipes.mx.quantize`` (MX fake quantization, scale
rules, rounding, saturation, NaN/Inf and the deliberate differences from
microxcaling and torchao) and ``recipes.mx.nvfp4`` (NVIDIA's two-level FP4).

    from recipes.mx import quantize_mx, encode_mx, decode_mx, quantize_nvfp4
    y = quantize_mx(x, "fp8_e4m3")                       # 32-element blocks on the last axis
    y = quantize_mx(x, "fp4_e2m1", axis=0, rounding="stochastic", seed=0)
    mx = encode_mx(x, "fp6_e2m3"); x_hat = decode_mx(mx)  # uint8 codes + E8M0 scale bytes
"""

from recipes.mx.encode import MXTensor, decode_mx, element_values, encode_mx
from recipes.mx.formats import FORMATS, ROUNDINGS, SCALE_RULES, ElemFormat, get_format
from recipes.mx.nvfp4 import quantize_nvfp4
from recipes.mx.quantize import quantize_mx, quantize_mx_compiled

__all__ = [
    "FORMATS",
    "ROUNDINGS",
    "SCALE_RULES",
    "ElemFormat",
    "MXTensor",
    "decode_mx",
    "element_values",
    "encode_mx",
    "get_format",
    "quantize_mx",
    "quantize_mx_compiled",
    "quantize_nvfp4",
]
