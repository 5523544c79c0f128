"""Weight and activation quantization in the integer forms the hardware consumes.

Weights are pruned first (:func:`moefpga.hls_models.sparsity.prune`), then quantized
symmetrically to int8 or int4 with one scale per group of ``G`` consecutive input weights of a row.
A group's scale is the matrix scale ``S`` (float32) times an unsigned mantissa ``mant / 2**8``;
the hardware multiplies each group's integer partial sum by ``mant`` and folds ``S`` into the
requantization. Activations are int8 per token with a power-of-two scale ``2**exp``, applied as
a shift. ``docs/formats.md`` (section "Scales") specifies both forms.

Every division and rounding is done in float64; :func:`round_half_even` is the one rounding rule.
"""

from dataclasses import dataclass

import numpy as np

from moefpga.hls_models.errors import MoefpgaError
from moefpga.hls_models.intmodel import TOKEN_BITS
from moefpga.hls_models.sparsity import (
    DENSE,
    Sparsity,
    check_weight_bits,
    check_width,
    compress,
    packed_positions_nbytes,
    packed_values_nbytes,
    prune,
)

__all__ = [
    "ACT_QMAX",
    "TOKEN_BITS",
    "EXP_MAX",
    "EXP_MIN",
    "GROUP_SIZES",
    "MANT_BITS",
    "QMAX",
    "QuantizedMatrix",
    "dequantize_activations",
    "packed_matrix_nbytes",
    "quantize_activations",
    "quantize_weights",
    "resolve_group_size",
    "round_half_even",
]

QMAX = {8: 127, 4: 7}
MANT_BITS = 8
GROUP_SIZES = (32, 64, 128)
#: Largest activation code per width: int8 activations, int16 tokens (what the host sends).
ACT_QMAX = {8: 127, TOKEN_BITS: 32767}
EXP_MIN, EXP_MAX = -64, 63

_MANT_ONE = 1 << MANT_BITS


def round_half_even(x):
    """Round to the nearest integer, ties to even (``numpy.rint``); returns floats."""
    return np.rint(x)


def resolve_group_size(cols, group_size, name="input width"):
    """Return the scale group size ``G`` for a matrix of ``cols`` input columns.

    Parameters
    ----------
    cols : int
    group_size : {32, 64, 128} or None
        None means one scale per output channel (``G = cols``).
    name : str
        What ``cols`` is, for the message (e.g. "hidden size").

    Returns
    -------
    int

    Raises
    ------
    MoefpgaError
        If ``group_size`` is not one of the allowed sizes or does not divide ``cols``.

    Notes
    -----
    ``G`` is then a multiple of every allowed M: 32, 64 and 128 are multiples of 16, and
    ``G = cols`` is a multiple of M because pruning requires it.
    """
    if cols <= 0:
        raise MoefpgaError(f"a weight matrix needs input columns, not {cols}")
    if group_size is None:
        return cols
    if group_size not in GROUP_SIZES:
        raise MoefpgaError(f"group size {group_size!r} is not one of {GROUP_SIZES} or None")
    if cols % group_size:
        raise MoefpgaError(f"group size {group_size} does not divide the {name} {cols}")
    return group_size


def _stored_nbytes(rows, cols, bits, g, sp):
    shape = (rows, cols // sp.m, sp.n)
    payload = packed_values_nbytes(rows * shape[1] * sp.n, bits)
    return payload + packed_positions_nbytes(shape, sp.m) + 2 * rows * (cols // g) + 4


def packed_matrix_nbytes(rows, cols, bits, group_size, sparsity):
    """Stored bytes of a (rows, cols) matrix quantized with these settings, without quantizing.

    Equals :attr:`QuantizedMatrix.nbytes_packed` of :func:`quantize_weights` with the same
    arguments: packed values and positions, 2 bytes per mantissa, 4 for the scale.

    Raises
    ------
    MoefpgaError
        For bad ``bits`` or ``group_size``, ``cols`` not a multiple of M, or ``G`` not dividing
        ``cols``.
    """
    check_weight_bits(bits)
    check_width(cols, sparsity)
    return _stored_nbytes(rows, cols, bits, resolve_group_size(cols, group_size), sparsity)


def _matrix_scale(group_steps):
    """The float32 matrix scale: max of the group steps, rounded up to float32 (1.0 if all 0)."""
    top = float(group_steps.max(initial=0.0))
    if top == 0.0:
        return np.float32(1.0)
    scale = np.float32(top)
    return np.nextafter(scale, np.float32(np.inf)) if np.float64(scale) < top else scale


def _mantissas(group_steps, scale):
    """Smallest ``mant`` in 1..2**MANT_BITS with ``scale * mant / 2**MANT_BITS >= step``.

    This is ``ceil(step / scale * 2**MANT_BITS)``, corrected by one where float64 rounding of the
    quotient lands on the wrong side, so that the comparison holds exactly in float64.
    """
    s = np.float64(scale)
    mant = np.ceil(group_steps / s * _MANT_ONE)
    mant -= s * (mant - 1) / _MANT_ONE >= group_steps
    mant += s * mant / _MANT_ONE < group_steps
    return np.clip(mant, 1, _MANT_ONE).astype(np.uint16)


def quantize_weights(w, bits, group_size=None, sparsity=DENSE):
    """Prune, then quantize a weight matrix symmetrically with integer-mantissa group scales.

    Parameters
    ----------
    w : array_like, shape (rows, cols)
        Float weights (converted to float32 by pruning).
    bits : {8, 4}
        Codes lie in -qmax..qmax with qmax = 127 or 7; -128 / -8 is never produced.
    group_size : {32, 64, 128} or None
        Consecutive input weights sharing one scale; None is one scale per output channel.
    sparsity : Sparsity
        Applied before quantization, so pruned weights are exactly 0.

    Returns
    -------
    QuantizedMatrix
        With ``s_g = max|w_group| / qmax``, ``S`` = max ``s_g`` rounded up to float32 (1.0 for an
        all-zero matrix), ``mant = ceil(s_g / S * 2**8)`` in 1..256 and
        ``q = clip(round_half_even(w / (S * mant / 2**8)), -qmax, qmax)``, all in float64.
        Since ``S * mant / 2**8 >= s_g``, no weight clips and every weight is within half a step.

    Raises
    ------
    MoefpgaError
        For bad ``bits`` or ``group_size``, a non-finite weight, ``cols`` not a multiple of M,
        or ``G`` not dividing ``cols``.
    """
    check_weight_bits(bits)
    pruned = prune(w, sparsity).astype(np.float64)
    rows, cols = pruned.shape
    g = resolve_group_size(cols, group_size)
    groups = pruned.reshape(rows, cols // g, g)
    group_steps = np.abs(groups).max(axis=-1, initial=0.0) / QMAX[bits]
    scale = _matrix_scale(group_steps)
    mant = _mantissas(group_steps, scale)
    step = np.float64(scale) * mant / _MANT_ONE
    q = np.clip(round_half_even(groups / step[..., None]), -QMAX[bits], QMAX[bits])
    return QuantizedMatrix(q.astype(np.int8).reshape(rows, cols), mant, scale, bits, g, sparsity)


@dataclass(frozen=True, eq=False)
class QuantizedMatrix:
    """A pruned, quantized weight matrix: int codes plus the integer scale form.

    Parameters
    ----------
    q : numpy.ndarray of int8, shape (rows, cols)
        Codes in -qmax..qmax, dense, with zeros at pruned places (int4 codes are held in int8).
    mant : numpy.ndarray of uint16, shape (rows, cols // group_size)
        Group mantissas in 1..2**MANT_BITS.
    scale : numpy.float32
        The matrix scale ``S``, positive and finite.
    bits : {8, 4}
    group_size : int
        ``G``, resolved (``cols`` for per-channel scales).
    sparsity : Sparsity

    Raises
    ------
    MoefpgaError
        If the arrays disagree with each other or hold values out of range (a corrupted matrix).
    """

    q: np.ndarray
    mant: np.ndarray
    scale: np.float32
    bits: int
    group_size: int
    sparsity: Sparsity

    def __post_init__(self):
        check_weight_bits(self.bits)
        if self.q.ndim != 2 or self.q.dtype != np.int8 or self.cols % self.group_size:
            raise MoefpgaError(
                f"quantized codes of shape {self.q.shape} and dtype {self.q.dtype} do not fit "
                f"group size {self.group_size}"
            )
        if np.any(np.abs(self.q.astype(np.int16)) > QMAX[self.bits]):
            raise MoefpgaError(f"quantized codes outside +-{QMAX[self.bits]} for {self.bits} bits")
        expected = (self.rows, self.cols // self.group_size)
        if self.mant.shape != expected or np.any((self.mant < 1) | (self.mant > _MANT_ONE)):
            raise MoefpgaError(f"group mantissas must be {expected} values in 1..{_MANT_ONE}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise MoefpgaError(f"matrix scale {self.scale} is not positive and finite")

    @property
    def rows(self):
        """int: output channels."""
        return self.q.shape[0]

    @property
    def cols(self):
        """int: input columns."""
        return self.q.shape[1]

    def _step64(self):
        return np.float64(self.scale) * self.mant.astype(np.float64) / _MANT_ONE

    @property
    def step(self):
        """numpy.ndarray of float32, shape (rows, cols // G): each group's ``S * mant / 2**8``."""
        return self._step64().astype(np.float32)

    def dequantize(self):
        """Return ``q * step`` (computed in float64) as float32, shape (rows, cols)."""
        groups = self.q.reshape(self.rows, -1, self.group_size).astype(np.float64)
        return (groups * self._step64()[..., None]).astype(np.float32).reshape(self.q.shape)

    def compressed(self):
        """Return the codes in compressed M:N form (:class:`CompressedMN` with int8 values)."""
        return compress(self.q, self.sparsity)

    @property
    def nbytes_packed(self):
        """int: stored bytes: packed values and positions, 2 per mantissa, 4 for the scale."""
        return _stored_nbytes(self.rows, self.cols, self.bits, self.group_size, self.sparsity)


def _check_tokens(x):
    x = np.asarray(x)
    if x.ndim != 2:
        raise MoefpgaError(f"activations must be 2-D (tokens, features), not of shape {x.shape}")
    bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
    if len(bad):
        raise MoefpgaError(f"activation token {bad[0]} has a non-finite value")
    return x.astype(np.float64)


def _token_exponents(amax, bits):
    """Smallest integer ``e`` with ``amax / 2**e <= qmax``, per token, clamped; 0 for zero tokens.

    With ``qmax = 2**(b-1) - 1`` and ``amax = f * 2**k``, ``0.5 <= f < 1`` (``numpy.frexp``,
    exact), ``amax / 2**(k-b+1)`` is ``2**(b-1) f`` in [2**(b-2), 2**(b-1)):
    ``e = k - b + 1`` if ``2**(b-1) f <= qmax``, else one more.
    """
    frac, k = np.frexp(amax)
    exp = k - (bits - 1) + (frac > ACT_QMAX[bits] / 2 ** (bits - 1))
    return np.where(amax == 0, 0, np.clip(exp, EXP_MIN, EXP_MAX)).astype(np.int8)


def quantize_activations(x, bits=TOKEN_BITS):
    """Quantize activations per token to ``bits`` (16 or 8) with a power-of-two scale.

    Parameters
    ----------
    x : array_like, shape (T, d)
        Real activations, one row per token.
    bits : {16, 8}
        16 for tokens as the host sends them; the hardware derives int8 from those.

    Returns
    -------
    xq : numpy.ndarray of int16 or int8, shape (T, d)
        ``clip(round_half_even(x / 2**exp), -qmax, qmax)``, qmax = 32767 or 127.
    exp : numpy.ndarray of int8, shape (T,)
        Per token the smallest integer with ``max|x_t| / 2**exp <= qmax``, clamped to -64..63
        (only a clamp at 63 can clip); 0 for an all-zero token. Unless clamped,
        ``max|xq_t| >= (qmax + 1) / 2`` for a nonzero token.

    Raises
    ------
    MoefpgaError
        If ``x`` is not 2-D or a token holds a non-finite value (the message names the token).
    """
    if bits not in ACT_QMAX:
        raise MoefpgaError(f"activation bits must be 16 or 8, not {bits!r}")
    x = _check_tokens(x)
    exp = _token_exponents(np.abs(x).max(axis=1, initial=0.0), bits)
    scaled = np.ldexp(x, -exp.astype(np.int32)[:, None])
    qmax = ACT_QMAX[bits]
    xq = np.clip(round_half_even(scaled), -qmax, qmax).astype(np.int8 if bits == 8 else np.int16)
    return xq, exp


def dequantize_activations(xq, exp):
    """Return ``xq * 2**exp`` per token as float32 (exact), shape (T, d).

    Raises
    ------
    MoefpgaError
        If ``xq`` is not 2-D or ``exp`` does not hold one exponent per token.
    """
    xq, exp = np.asarray(xq), np.asarray(exp)
    if xq.ndim != 2 or exp.shape != xq.shape[:1]:
        raise MoefpgaError(
            f"activation codes of shape {xq.shape} need one exponent per token, not {exp.shape}"
        )
    return np.ldexp(xq.astype(np.float32), exp.astype(np.int32)[:, None])
