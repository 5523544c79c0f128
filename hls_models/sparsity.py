"""M:N structured pruning, the compressed M:N matrix and its byte serialization.

An "N:M" pattern keeps ``n`` of every ``m`` consecutive input weights of a row ("2:4" keeps 2 of
every 4). The compressed form stores, per row and per group of ``m`` columns, exactly ``n`` values
and their positions inside the group. The byte layout is specified in ``docs/formats.md``
(section "Compressed M:N matrix"); this module is its reference implementation.

Dense matrices use the same code paths with ``Sparsity(m=1, n=1)``: every group is one column,
every position is 0 and takes 0 bits, so a dense matrix serializes to no position bytes at all.
"""

import re
from dataclasses import dataclass

import numpy as np

from moefpga.hls_models.errors import MoefpgaError

__all__ = [
    "DENSE",
    "CompressedMN",
    "Sparsity",
    "check_weight_bits",
    "check_width",
    "compress",
    "decompress",
    "pack_positions",
    "pack_values",
    "packed_positions_nbytes",
    "packed_values_nbytes",
    "parse_sparsity",
    "prune",
    "unpack_positions",
    "unpack_values",
]

MAX_M = 16
ACCEPTED_FORMS = "'dense' or 'N:M' with M a power of two in 2..16 and 1 <= N < M (e.g. '2:4')"
VALUE_RANGES = {8: (-128, 127), 4: (-8, 7)}


@dataclass(frozen=True)
class Sparsity:
    """An M:N pattern: keep ``n`` of every ``m`` consecutive input weights.

    Parameters
    ----------
    m : int
        Group size: 1 for dense, otherwise a power of two in 2..16.
    n : int
        Weights kept per group: 1 for dense, otherwise 1 <= n < m.

    Raises
    ------
    MoefpgaError
        If (m, n) is neither dense (1, 1) nor an allowed N:M pattern.
    """

    m: int
    n: int

    def __post_init__(self):
        if (self.m, self.n) == (1, 1):
            return
        allowed = _is_power_of_two(self.m) and 2 <= self.m <= MAX_M
        if not (allowed and isinstance(self.n, int) and 1 <= self.n < self.m):
            raise MoefpgaError(f"sparsity {self.n}:{self.m} is not allowed; use {ACCEPTED_FORMS}")

    @property
    def is_dense(self):
        """bool: True for the dense pattern (m = n = 1)."""
        return self.m == 1

    @property
    def position_bits(self):
        """int: bits per stored position, log2(m) (0 for dense)."""
        return self.m.bit_length() - 1

    def __str__(self):
        return "dense" if self.is_dense else f"{self.n}:{self.m}"


DENSE = Sparsity(m=1, n=1)


def _is_power_of_two(value):
    return isinstance(value, int) and value > 0 and value & (value - 1) == 0


def parse_sparsity(text):
    """Parse ``"dense"`` or an ``"N:M"`` string such as ``"2:4"`` (keep 2 of every 4).

    Parameters
    ----------
    text : str
        The pattern as people write it: kept count first, group size second.

    Returns
    -------
    Sparsity

    Raises
    ------
    MoefpgaError
        If the string is malformed or names a pattern that is not allowed.
    """
    if text == "dense":
        return DENSE
    match = re.fullmatch(r"(\d+):(\d+)", text) if isinstance(text, str) else None
    if match is None:
        raise MoefpgaError(f"sparsity {text!r} is not understood; use {ACCEPTED_FORMS}")
    n, m = int(match[1]), int(match[2])
    if m == 1:
        raise MoefpgaError(f"sparsity {text!r} is not allowed; use {ACCEPTED_FORMS}")
    return Sparsity(m=m, n=n)


def check_width(cols, sp, name="input width"):
    """Raise :class:`MoefpgaError` unless a matrix of ``cols`` input columns fits ``sp``.

    ``name`` says what ``cols`` is in the message (e.g. "hidden size").
    """
    if cols % sp.m:
        raise MoefpgaError(f"{name} {cols} is not a multiple of M={sp.m} (sparsity {sp})")


def _check_matrix(w, sp, what):
    """Return ``w`` as a 2-D array after checking its width fits ``sp``."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise MoefpgaError(f"{what} must be 2-D (rows, cols), not of shape {w.shape}")
    check_width(w.shape[1], sp)
    return w


def _check_finite(w, what):
    bad = np.argwhere(~np.isfinite(w))
    if len(bad):
        row, col = bad[0]
        raise MoefpgaError(f"{what} has a non-finite value at row {row}, column {col}")


def prune(w, sp):
    """Keep the ``n`` largest-magnitude weights of every group of ``m`` consecutive columns.

    Parameters
    ----------
    w : array_like, shape (rows, cols)
        Real weights; converted to float32 before magnitudes are compared.
    sp : Sparsity

    Returns
    -------
    numpy.ndarray of float32, shape (rows, cols)
        ``w`` with all but ``n`` weights of each group set to 0. Among equal magnitudes the lower
        column index is kept. Dense returns a float32 copy.

    Raises
    ------
    MoefpgaError
        If ``w`` is not 2-D, has a non-finite value, or ``cols`` is not a multiple of ``m``.
    """
    w = _check_matrix(w, sp, "weight matrix").astype(np.float32)
    _check_finite(w, "weight matrix")
    if sp.is_dense:
        return w
    rows, cols = w.shape
    groups = w.reshape(rows, cols // sp.m, sp.m)
    order = np.argsort(-np.abs(groups), axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., : sp.n], True, axis=-1)
    return np.where(keep, groups, np.float32(0)).reshape(rows, cols)


@dataclass(frozen=True, eq=False)
class CompressedMN:
    """A matrix in compressed M:N form: ``n`` values and positions per group of ``m`` columns.

    Parameters
    ----------
    values : numpy.ndarray, shape (rows, cols // m, n)
        The kept values, any numeric dtype (int8 after quantization, for 4- and 8-bit weights).
    positions : numpy.ndarray of uint8, shape (rows, cols // m, n)
        Column of each value inside its group: every entry < m, strictly ascending within a group
        (the canonical form). All zeros for dense.
    sparsity : Sparsity
    cols : int
        Width of the dense matrix, a multiple of ``sparsity.m``.

    Raises
    ------
    MoefpgaError
        If the shapes disagree or the positions are not canonical (a corrupted matrix).
    """

    values: np.ndarray
    positions: np.ndarray
    sparsity: Sparsity
    cols: int

    def __post_init__(self):
        sp = self.sparsity
        if self.cols % sp.m or self.values.ndim != 3:
            raise MoefpgaError(f"compressed matrix of width {self.cols} does not fit {sp}")
        expected = (self.values.shape[0], self.cols // sp.m, sp.n)
        if self.values.shape != expected or self.positions.shape != expected:
            raise MoefpgaError(
                f"compressed matrix shapes {self.values.shape} (values) and "
                f"{self.positions.shape} (positions) do not match {expected} for {sp}"
            )
        pos = self.positions.astype(np.int64)
        if np.any(pos >= sp.m) or np.any(pos < 0) or np.any(np.diff(pos, axis=-1) <= 0):
            raise MoefpgaError(
                f"compressed matrix positions are not strictly ascending in 0..{sp.m - 1}"
            )

    @property
    def rows(self):
        """int: rows of the dense matrix."""
        return self.values.shape[0]


def compress(w_pruned, sp):
    """Compress a pruned matrix into canonical M:N form.

    Each group keeps its nonzero columns; a group with fewer than ``n`` nonzeros is filled up with
    its lowest-index zero columns. The kept columns are stored in ascending order.

    Parameters
    ----------
    w_pruned : array_like, shape (rows, cols)
        At most ``n`` nonzeros per group of ``m`` columns; any numeric dtype, which is kept.
    sp : Sparsity

    Returns
    -------
    CompressedMN

    Raises
    ------
    MoefpgaError
        If ``cols`` is not a multiple of ``m`` or a group holds more than ``n`` nonzeros.
    """
    w = _check_matrix(w_pruned, sp, "pruned matrix")
    rows, cols = w.shape
    groups = w.reshape(rows, cols // sp.m, sp.m)
    zero = groups == 0
    crowded = np.argwhere(np.sum(~zero, axis=-1) > sp.n)
    if len(crowded):
        row, group = crowded[0]
        raise MoefpgaError(
            f"row {row}, group {group} has more than N={sp.n} nonzeros (sparsity {sp})"
        )
    key = zero * sp.m + np.arange(sp.m)
    slots = np.sort(np.argsort(key, axis=-1, kind="stable")[..., : sp.n], axis=-1)
    values = np.take_along_axis(groups, slots, axis=-1)
    return CompressedMN(values, slots.astype(np.uint8), sp, cols)


def decompress(c):
    """Expand a :class:`CompressedMN` back to its dense matrix.

    Parameters
    ----------
    c : CompressedMN

    Returns
    -------
    numpy.ndarray, shape (c.rows, c.cols)
        Dtype of ``c.values``; zeros at the columns that are not stored.
    """
    sp = c.sparsity
    groups = np.zeros((c.rows, c.cols // sp.m, sp.m), dtype=c.values.dtype)
    np.put_along_axis(groups, c.positions.astype(np.intp), c.values, axis=-1)
    return groups.reshape(c.rows, c.cols)


def check_weight_bits(bits):
    """Raise :class:`MoefpgaError` unless ``bits`` is a weight width the hardware takes (8, 4)."""
    if bits not in VALUE_RANGES:
        raise MoefpgaError(f"weight bits must be 4 or 8, not {bits!r}")


def packed_values_nbytes(count, bits):
    """Bytes that :func:`pack_values` produces for ``count`` values of ``bits`` bits."""
    check_weight_bits(bits)
    return count if bits == 8 else (count + 1) // 2


def pack_values(values, bits):
    """Serialize integer values, row-major, as int8 bytes or int4 nibble pairs.

    Parameters
    ----------
    values : array_like of int
        Typically :attr:`CompressedMN.values`, shape (rows, groups, n); flattened in C order
        (row, group, slot).
    bits : {8, 4}
        8: one two's complement byte per value. 4: two values per byte, the first in the low
        nibble, each a two's complement nibble; an odd count ends with a zero high nibble.

    Returns
    -------
    bytes

    Raises
    ------
    MoefpgaError
        If ``bits`` is not 4 or 8, or a value is outside the signed range of ``bits`` bits.
    """
    check_weight_bits(bits)
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    low, high = VALUE_RANGES[bits]
    if flat.size and (flat.min() < low or flat.max() > high):
        raise MoefpgaError(f"values outside {low}..{high} cannot be packed in {bits} bits")
    if bits == 8:
        return flat.astype(np.int8).tobytes()
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def unpack_values(data, bits, shape):
    """Inverse of :func:`pack_values`.

    Parameters
    ----------
    data : bytes
    bits : {8, 4}
    shape : tuple of int
        Shape of the values, e.g. (rows, groups, n).

    Returns
    -------
    numpy.ndarray of int8, shape ``shape``

    Raises
    ------
    MoefpgaError
        If ``data`` has the wrong length or a nonzero padding nibble.
    """
    count = int(np.prod(shape))
    expected = packed_values_nbytes(count, bits)
    if len(data) != expected:
        raise MoefpgaError(
            f"{len(data)} value bytes where {count} {bits}-bit values need {expected}"
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.view(np.int8).reshape(shape).copy()
    nibbles = np.stack([raw & 0xF, raw >> 4], axis=-1).reshape(-1)
    if count % 2 and nibbles[-1]:
        raise MoefpgaError("the padding nibble after an odd count of 4-bit values is not zero")
    signed = (nibbles[:count].astype(np.int8) ^ 8) - 8
    return signed.reshape(shape)


def _position_bits(m):
    if not _is_power_of_two(m) or m > MAX_M:
        raise MoefpgaError(f"group size M={m!r} is not a power of two in 1..{MAX_M}")
    return m.bit_length() - 1


def packed_positions_nbytes(shape, m):
    """Bytes that :func:`pack_positions` produces for positions of ``shape`` = (rows, groups, n).

    Each row takes ``ceil(groups * n * log2(m) / 8)`` bytes.
    """
    rows, groups, n = shape
    return rows * -(-groups * n * _position_bits(m) // 8)


def pack_positions(positions, m):
    """Serialize positions as log2(m)-bit fields in an LSB-first bit stream, one per row.

    Parameters
    ----------
    positions : array_like of int, shape (rows, groups, n)
        Each entry < ``m``. Within a row, field k (in order group, slot) occupies stream bits
        ``k*b .. k*b + b - 1`` with ``b = log2(m)``, least significant bit first; stream bit j
        is bit ``j % 8`` of byte ``j // 8``. Each row's stream is padded with zero bits to a
        whole byte; rows follow one another.
    m : int
        Group size, a power of two in 1..16 (1 gives no bytes).

    Returns
    -------
    bytes

    Raises
    ------
    MoefpgaError
        If ``m`` is not allowed, ``positions`` is not 3-D, or an entry is outside 0..m-1.
    """
    b = _position_bits(m)
    pos = np.asarray(positions).astype(np.int64)
    if pos.ndim != 3:
        raise MoefpgaError(f"positions must be 3-D (rows, groups, n), not of shape {pos.shape}")
    if pos.size and (pos.min() < 0 or pos.max() >= m):
        raise MoefpgaError(f"positions outside 0..{m - 1} cannot be packed for M={m}")
    rows, groups, n = pos.shape
    bits = ((pos[..., None] >> np.arange(b)) & 1).reshape(rows, groups * n * b)
    return np.packbits(bits.astype(np.uint8), axis=1, bitorder="little").tobytes()


def unpack_positions(data, m, shape):
    """Inverse of :func:`pack_positions`.

    Parameters
    ----------
    data : bytes
    m : int
        Group size, a power of two in 1..16.
    shape : tuple of int
        (rows, groups, n).

    Returns
    -------
    numpy.ndarray of uint8, shape ``shape``

    Raises
    ------
    MoefpgaError
        If ``data`` has the wrong length or a nonzero padding bit.
    """
    b = _position_bits(m)
    rows, groups, n = shape
    fields = groups * n
    row_bytes = -(-fields * b // 8)
    if len(data) != rows * row_bytes:
        raise MoefpgaError(
            f"{len(data)} position bytes where shape {shape} at M={m} needs {rows * row_bytes}"
        )
    raw = np.frombuffer(data, dtype=np.uint8).reshape(rows, row_bytes)
    bits = np.unpackbits(raw, axis=1, bitorder="little")
    if np.any(bits[:, fields * b :]):
        raise MoefpgaError("a position row has nonzero padding bits")
    bits = bits[:, : fields * b].reshape(rows, fields, b).astype(np.uint8)
    pos = np.sum(bits << np.arange(b, dtype=np.uint8), axis=-1, dtype=np.uint8)
    return pos.reshape(shape)
