"""Parameters and stream formats of the M:N sparse matmul engine, with their host-side packing.

The layouts here are the single definition of every stream beat: the gateware in
:mod:`.sparse_matmul` builds its ports from them, and :meth:`SparseMatmulParams.command`,
:meth:`~SparseMatmulParams.activation_beats`, :meth:`~SparseMatmulParams.weight_beats` and
:meth:`~SparseMatmulParams.outputs` pack and unpack the beats on the host (and in the tests) from
the same bit offsets. docs/engine.md describes the formats in prose.
"""

import numpy as np
from amaranth.hdl import Shape, signed, unsigned
from amaranth.lib import data
from amaranth.utils import bits_for, exact_log2

from ..hls_models.intmodel import ACT_BITS

__all__ = ["SparseMatmulParams"]


def _field(layout, path):
    """Bit offset and width of the field reached from ``layout`` through the keys in ``path``."""
    offset, shape = 0, layout
    for key in path:
        field = shape[key]
        offset, shape = offset + field.offset, field.shape
    return offset, Shape.cast(shape).width


def _pack(layout, fields):
    """Beats of ``layout`` as Python ints from ``fields``, a list of ``(path, values)`` where
    ``values`` holds one integer per beat for the field at ``path``."""
    beats = 0
    for path, values in fields:
        offset, width = _field(layout, path)
        bits = np.asarray(values, dtype=np.int64) & ((1 << width) - 1)
        beats = beats | (bits.astype(object) << offset)
    return [int(beat) for beat in beats]


class SparseMatmulParams:
    """Elaboration parameters of :class:`.sparse_matmul.SparseMatmulEngine` and its stream formats.

    Parameters
    ----------
    lanes : int
        P, output rows computed in parallel.
    m, n : int
        The M:N pattern: at most ``n`` non-zero weights in every group of ``m`` consecutive
        columns of a row. ``m`` is a power of two; ``n == m`` is dense (no positions are sent).
    weight_bits : int
        Width of the signed weights, 8 or 4.
    group_size : int
        G, columns per quantization group (one mantissa per row and group); a multiple of ``m``.
    max_tokens : int
        Most tokens in a batch; the activation memory holds ``max_tokens * max_cols`` values.
    max_cols : int
        Most columns of a matrix, a multiple of ``group_size``.
    max_rows : int
        Most rows of a matrix, a multiple of ``lanes``; it sets the width of a counter only.
    acc_bits : int
        Width of the saturating signed accumulator, 2 to 64.
    act_bits : int
        Width of the signed activations, the integer model's ``ACT_BITS`` (8) by default.

    Attributes
    ----------
    pos_bits : int
        Width of a weight's position within its group of ``m`` columns (0 when dense).
    beats_per_group : int
        Weight beats per quantization group, ``group_size // m``.
    command, activation_beat, weight_beat, output_beat : Layout
        Payload layouts of the engine's four streams (see docs/engine.md).
    entry : Layout
        One compressed weight: ``value`` and ``pos``.
    psum_shape : Shape
        Signed shape that holds the exact partial sum of one quantization group.
    """

    MANT_BITS = 9

    def __init__(self, *, lanes, m, n, weight_bits=8, group_size, max_tokens, max_cols,
                 max_rows=1 << 16, acc_bits=40, act_bits=ACT_BITS):
        for name, value in [("lanes", lanes), ("m", m), ("n", n), ("group_size", group_size),
                            ("max_tokens", max_tokens), ("max_cols", max_cols),
                            ("max_rows", max_rows)]:
            if not isinstance(value, int) or value <= 0:
                raise TypeError(f"{name} must be a positive integer, not {value!r}")
        if m & (m - 1):
            raise ValueError(f"m must be a power of two, not {m}")
        if not n <= m:
            raise ValueError(f"An M:N pattern needs n <= m, not {n}:{m}")
        if weight_bits not in (4, 8):
            raise ValueError(f"Weights are 8 or 4 bits wide, not {weight_bits!r}")
        if group_size % m:
            raise ValueError(f"Group size {group_size} is not a multiple of m = {m}")
        if max_cols % group_size:
            raise ValueError(f"max_cols {max_cols} is not a multiple of the group size "
                             f"{group_size}")
        if max_rows % lanes:
            raise ValueError(f"max_rows {max_rows} is not a multiple of the lane count {lanes}")
        if not 2 <= acc_bits <= 64:
            raise ValueError(f"Accumulator width must be 2 to 64 bits, not {acc_bits!r}")
        self.lanes       = lanes
        self.m           = m
        self.n           = n
        self.weight_bits = weight_bits
        self.group_size  = group_size
        self.max_tokens  = max_tokens
        self.max_cols    = max_cols
        self.max_rows    = max_rows
        self.acc_bits    = acc_bits
        self.act_bits    = act_bits

        self.pos_bits        = exact_log2(m) if n < m else 0
        self.beats_per_group = group_size // m
        largest_product = 1 << (weight_bits - 1 + act_bits - 1)
        self.psum_shape = signed(bits_for(self.beats_per_group * n * largest_product) + 1)

        self.entry = data.StructLayout({
            "value": signed(weight_bits),
            "pos":   unsigned(self.pos_bits),
        })
        self.command = data.StructLayout({
            "load":       unsigned(1),
            "tokens":     unsigned(bits_for(max_tokens)),
            "groups":     unsigned(bits_for(max_cols // group_size)),
            "row_blocks": unsigned(bits_for(max_rows // lanes)),
        })
        self.activation_beat = data.ArrayLayout(signed(act_bits), m)
        self.weight_beat = data.StructLayout({
            "entries": data.ArrayLayout(data.ArrayLayout(self.entry, n), lanes),
            "mant":    data.ArrayLayout(unsigned(self.MANT_BITS), lanes),
        })
        self.output_beat = data.ArrayLayout(signed(acc_bits), lanes)

    @property
    def name(self):
        """A short name of the configuration, e.g. ``p4_2of4_w8_g32_t4_c256_a40``."""
        return (f"p{self.lanes}_{self.n}of{self.m}_w{self.weight_bits}_g{self.group_size}_"
                f"t{self.max_tokens}_c{self.max_cols}_a{self.acc_bits}")

    def _check_shape(self, tokens, cols, rows=None):
        if not 1 <= tokens <= self.max_tokens:
            raise ValueError(f"{tokens} tokens do not fit: the engine takes 1 to "
                             f"{self.max_tokens}")
        if not (0 < cols <= self.max_cols and cols % self.group_size == 0):
            raise ValueError(f"{cols} columns do not fit: the engine takes a multiple of "
                             f"{self.group_size} up to {self.max_cols}")
        if rows is not None and not (0 < rows <= self.max_rows and rows % self.lanes == 0):
            raise ValueError(f"{rows} rows do not fit: the engine takes a multiple of "
                             f"{self.lanes} up to {self.max_rows}")

    def command_bits(self, *, tokens, cols, rows=None):
        """The command beat that loads activations (``rows`` None) or runs a matrix."""
        self._check_shape(tokens, cols, rows)
        return self.command.const({
            "load":       rows is None,
            "tokens":     tokens,
            "groups":     cols // self.group_size,
            "row_blocks": 0 if rows is None else rows // self.lanes,
        }).as_bits()

    def activation_beats(self, x):
        """The activation beats of ``x`` (tokens x cols): token by token, ``m`` columns a beat."""
        x = np.asarray(x, dtype=np.int64)
        self._check_shape(*x.shape)
        lo, hi = -(1 << (self.act_bits - 1)), (1 << (self.act_bits - 1)) - 1
        if x.min() < lo or x.max() > hi:
            raise ValueError(f"Activations must lie in [{lo}, {hi}]")
        groups = x.reshape(-1, self.m)
        return _pack(self.activation_beat, [((i,), groups[:, i]) for i in range(self.m)])

    def weight_beats(self, q, mant):
        """The weight beats of ``q`` (rows x cols, pruned weights zero) and ``mant``.

        Order: row blocks of ``lanes`` rows; in each, the column groups of ``m`` columns; in each
        beat, for every lane, the ``n`` kept weights of its row with their positions, in
        ascending position; a group with fewer than ``n`` non-zeros fills the free entries with
        its lowest-index zero columns (the canonical form of docs/formats.md). The lane's
        mantissa rides on the last beat of each quantization group and is 0 elsewhere.

        Raises
        ------
        ValueError
            If a weight is out of range, a group of ``m`` columns holds more than ``n``
            non-zeros, a mantissa does not fit in 9 bits, or the shape does not fit.
        """
        q, mant = np.asarray(q, dtype=np.int64), np.asarray(mant, dtype=np.int64)
        rows, cols = q.shape
        self._check_shape(1, cols, rows)
        P, M, N, K = self.lanes, self.m, self.n, self.beats_per_group
        lo, hi = -(1 << (self.weight_bits - 1)), (1 << (self.weight_bits - 1)) - 1
        if q.min() < lo or q.max() > hi:
            raise ValueError(f"Weights must lie in [{lo}, {hi}] for {self.weight_bits}-bit "
                             f"weights")
        if mant.shape != (rows, cols // self.group_size):
            raise ValueError(f"Mantissas have shape {mant.shape}, expected "
                             f"{(rows, cols // self.group_size)}")
        if mant.min() < 0 or mant.max() >= 1 << self.MANT_BITS:
            raise ValueError(f"Mantissas must lie in [0, {(1 << self.MANT_BITS) - 1}]")
        # (row block, column group, lane, column in group)
        groups = q.reshape(rows // P, P, cols // M, M).transpose(0, 2, 1, 3)
        if (np.count_nonzero(groups, axis=-1) > N).any():
            raise ValueError(f"Weights are not {N}:{M} sparse: a group of {M} columns holds "
                             f"more than {N} non-zeros")
        if N == M:
            pos = np.broadcast_to(np.arange(M), groups.shape)
        else:
            pos = np.sort(np.argsort(groups == 0, axis=-1, kind="stable")[..., :N], axis=-1)
        values = np.take_along_axis(groups, pos, axis=-1).reshape(-1, P, N)
        pos = pos.reshape(-1, P, N)
        last_beat = (np.arange(cols // M) % K == K - 1)[None, :, None]
        beat_mant = np.where(last_beat,
                             np.repeat(mant.reshape(rows // P, P, -1).transpose(0, 2, 1), K,
                                       axis=1),
                             0).reshape(-1, P)
        fields = []
        for p in range(P):
            for i in range(N):
                fields.append((("entries", p, i, "value"), values[:, p, i]))
                fields.append((("entries", p, i, "pos"), pos[:, p, i]))
            fields.append((("mant", p), beat_mant[:, p]))
        return _pack(self.weight_beat, fields)

    def outputs(self, beats, tokens):
        """The results (tokens x rows) from the output beats of one run."""
        view = [data.Const(self.output_beat, bits) for bits in beats]
        out = np.array([[beat[p] for p in range(self.lanes)] for beat in view], dtype=np.int64)
        return out.reshape(-1, tokens, self.lanes).transpose(1, 0, 2).reshape(tokens, -1)
