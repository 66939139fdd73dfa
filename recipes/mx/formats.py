"""OCP MX v1.0 element formats, the E8M0 scale format, and the option names.

Element formats (values are those of one element *before* the block scale X
is applied; "quantum" is the spacing of representable values):

============  =====  =====  ====  ====  ========  =====================  ==========================
name          ebits  mbits  emax  emin  max_norm  smallest subnormal     notes
============  =====  =====  ====  ====  ========  =====================  ==========================
fp8_e4m3      4      3      8     -6    448       2^-9                   OFP8 E4M3 (torch e4m3fn)
fp8_e5m2      5      2      15    -14   57344     2^-16                  OFP8 E5M2 (torch e5m2)
fp6_e3m2      3      2      4     -2    28        2^-4                   no Inf/NaN
fp6_e2m3      2      3      2     0     7.5       2^-3                   no Inf/NaN
fp4_e2m1      2      1      2     0     6         0.5                    no Inf/NaN
int8          0      6      0     0     127/64    (quantum 2^-6)         two's complement 1.6 fixed
============  =====  =====  ====  ====  ========  =====================  ==========================

* ``mbits`` counts stored mantissa (fraction) bits. For ``int8`` it is the six
  fraction bits of the 8-bit two's-complement fixed-point value
  ``code * 2^-6``; with ``emin = 0`` the float formulas give its fixed quantum
  ``2^(0 - 6)``.
* ``emax`` is the exponent of the largest power of two in the format (the
  ``emax_elem`` of the spec's scale rule); ``emin`` the exponent of the
  smallest normal (``1 - bias``).
* MXINT8 quantization is symmetric: ``-2.0`` (code 0x80) is decodable but
  never produced, as in microxcaling.

E8M0 scale: an 8-bit biased exponent, ``X = 2^(byte - 127)`` for bytes
0..254 (2^-127 .. 2^127), byte 0xFF = NaN; no zero, no Inf.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "E8M0_BIAS",
    "E8M0_NAN",
    "ElemFormat",
    "FORMATS",
    "ROUNDINGS",
    "SCALE_RULES",
    "check_rounding",
    "check_scale_rule",
    "get_format",
]

E8M0_BIAS = 127
E8M0_NAN = 0xFF
#: smallest and largest unbiased E8M0 exponent
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127

#: element rounding modes (see ``recipes.mx.quantize`` for the exact rules)
ROUNDINGS = ("nearest_even", "nearest_away", "toward_zero", "stochastic")
#: shared-exponent (block scale) rules
SCALE_RULES = ("floor", "ceil", "rceil", "even")


@dataclass(frozen=True)
class ElemFormat:
    """One MX element format: bit layout and the derived range constants."""

    name: str
    #: exponent bits (0 for int8)
    ebits: int
    #: stored mantissa / fraction bits
    mbits: int
    #: exponent of the largest power of two representable
    emax: int
    #: exponent of the smallest normal (int8: 0, giving the fixed quantum 2^-mbits)
    emin: int
    #: largest finite magnitude; quantize saturates to it
    max_norm: float
    #: two's-complement fixed point (MXINT8) rather than a float format
    is_int: bool = False

    @property
    def bits(self) -> int:
        """Storage width of one element code, sign included."""
        return 1 + self.ebits + self.mbits + (1 if self.is_int else 0)

    @property
    def bias(self) -> int:
        """Exponent bias of the element encoding (0 for int8)."""
        return 0 if self.is_int else 2 ** (self.ebits - 1) - 1

    @property
    def min_subnormal(self) -> float:
        """Smallest positive magnitude (the quantum below 2^emin)."""
        return 2.0 ** (self.emin - self.mbits)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal (int8: 1.0, where the quantum stays 2^-6)."""
        return 2.0**self.emin

    @property
    def sign_bit(self) -> int:
        """Mask of the sign bit inside a code (the MSB of the element's width)."""
        return 1 << (self.bits - 1)

    @property
    def torch_dtype_name(self) -> str | None:
        """Name of the torch dtype with the same bit layout, if torch has one."""
        return {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}.get(self.name)


FORMATS: dict[str, ElemFormat] = {
    f.name: f
    for f in (
        ElemFormat("fp8_e4m3", ebits=4, mbits=3, emax=8, emin=-6, max_norm=448.0),
        ElemFormat("fp8_e5m2", ebits=5, mbits=2, emax=15, emin=-14, max_norm=57344.0),
        ElemFormat("fp6_e3m2", ebits=3, mbits=2, emax=4, emin=-2, max_norm=28.0),
        ElemFormat("fp6_e2m3", ebits=2, mbits=3, emax=2, emin=0, max_norm=7.5),
        ElemFormat("fp4_e2m1", ebits=2, mbits=1, emax=2, emin=0, max_norm=6.0),
        ElemFormat("int8", ebits=0, mbits=6, emax=0, emin=0, max_norm=127.0 / 64.0, is_int=True),
    )
}


def get_format(fmt: str | ElemFormat) -> ElemFormat:
    """Look up an element format by name (an ``ElemFormat`` passes through)."""
    if isinstance(fmt, ElemFormat):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown MX element format {fmt!r}; valid names: {', '.join(FORMATS)}") from None


def check_rounding(rounding: str) -> str:
    """Return ``rounding`` if it is a known mode, else raise a ValueError naming the valid ones."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDINGS)}")
    return rounding


def check_scale_rule(scale_rule: str) -> str:
    """Return ``scale_rule`` if it is known, else raise a ValueError naming the valid ones."""
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown scale_rule {scale_rule!r}; valid: {', '.join(SCALE_RULES)}")
    return scale_rule
