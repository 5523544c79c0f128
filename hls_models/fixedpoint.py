"""Fixed-point primitives shared by the integer model: saturation, rounding shifts, multipliers.

Every function works on Python ints or NumPy ``int64`` arrays and is exact. The rules here are the
ones docs/numerics.md states and the RTL implements.
"""

import math

import numpy as np

__all__ = ["MAX_SHIFT", "saturate", "round_shift", "requantize", "Multiplier", "multiplier_for"]

#: Right shifts are clamped here; no value of the datapath reaches 2**61 in magnitude.
MAX_SHIFT = 62


def saturate(value, bits):
    """Clamp ``value`` to the signed two's-complement range of ``bits`` bits."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.clip(value, lo, hi) if isinstance(value, np.ndarray) else max(lo, min(hi, value))


def round_shift(value, shift):
    """``value * 2**-shift`` rounded half up (toward +inf), for ``shift >= 0``.

    This is the one rounding rule of the datapath: add half an output LSB, then shift right
    arithmetically (``floor``). Values stay below 2**61 in magnitude, so every shift of 62 or
    more gives 0, and the shift is clamped there.
    """
    if shift < 0:
        raise ValueError(f"round_shift takes a right shift, not {shift}")
    if shift == 0:
        return value
    shift = min(shift, MAX_SHIFT)
    return (value + (1 << (shift - 1))) >> shift


def requantize(acc, mult, shift, bits):
    """Scale an accumulator by ``mult * 2**-shift`` and saturate it to ``bits`` signed bits.

    A right shift rounds half up (:func:`round_shift`). A negative ``shift`` is a left shift that
    saturates as an infinitely wide one would: any nonzero value that leaves the range saturates.
    ``|acc * mult|`` must stay below 2**61 (the widths in docs/numerics.md guarantee it).
    """
    value = acc * mult
    if shift >= 0:
        return saturate(round_shift(value, shift), bits)
    # Clipping to +-2**(bits-1) and shifting at most bits-1 places saturates exactly as the
    # infinitely wide shift does, and stays within 2**(2*bits - 2) <= 2**62.
    left = min(-shift, bits - 1)
    return saturate(saturate(value, bits) << left, bits)


class Multiplier:
    """A positive real factor held as ``mult * 2**-shift``, ``mult`` an unsigned 16-bit integer.

    ``mult`` is normalized to [2**15, 2**16), so the factor keeps 16 significant bits.

    Parameters
    ----------
    mult : int
        Mantissa, 2**15 <= mult < 2**16.
    shift : int
        Right shift; negative for factors of 2**16 or more.
    """

    BITS = 16

    def __init__(self, mult, shift):
        if not (1 << (self.BITS - 1)) <= mult < (1 << self.BITS):
            raise ValueError(f"Multiplier mantissa {mult} is not normalized to 16 bits")
        self.mult  = int(mult)
        self.shift = int(shift)

    def __float__(self):
        return math.ldexp(self.mult, -self.shift)

    def __repr__(self):
        return f"Multiplier({self.mult}, {self.shift})"

    def __eq__(self, other):
        return (isinstance(other, Multiplier)
                and (self.mult, self.shift) == (other.mult, other.shift))

    def apply(self, acc, bits, exp=0):
        """``requantize(acc, mult, shift - exp, bits)``: scale by this factor times ``2**exp``.

        ``exp`` is a token's power-of-two activation exponent (an array broadcasts per token).
        """
        if isinstance(exp, np.ndarray):
            out = np.empty(np.broadcast(acc, exp[:, None]).shape, dtype=np.int64)
            for token, token_exp in enumerate(exp):
                out[token] = requantize(acc[token], self.mult, self.shift - int(token_exp), bits)
            return out
        return requantize(acc, self.mult, self.shift - int(exp), bits)


def multiplier_for(factor):
    """The :class:`Multiplier` nearest to ``factor`` (> 0), its mantissa rounded half to even."""
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"Requantization factor must be positive and finite, not {factor!r}")
    frac, exp = math.frexp(factor)            # factor = frac * 2**exp, 0.5 <= frac < 1
    mult = round(frac * (1 << Multiplier.BITS))
    shift = Multiplier.BITS - exp
    if mult == 1 << Multiplier.BITS:
        mult, shift = mult >> 1, shift - 1
    return Multiplier(mult, shift)
