"""Parameters and stream formats of the expert FFN datapath, with their host-side packing.

The layouts here define every beat of :class:`.expert_ffn.ExpertFFN`'s streams; the gateware
builds its ports from them and the host (and the tests) pack and unpack beats with the methods
below. Weights travel in the beat format of the sparse matmul engine
(:mod:`.sparse_matmul_params`). docs/ffn.md describes the formats and their order in prose.
"""

import numpy as np
from amaranth.hdl import signed, unsigned
from amaranth.lib import data
from amaranth.utils import bits_for

from ..hls_models.intmodel import ACT_BITS, OUT_BITS
from .requant import SHIFT_BITS, Multiplier
from .sparse_matmul_params import SparseMatmulParams

__all__ = ["ExpertFfnParams", "SILU_ENTRIES", "WEIGHT_BITS", "COMBINE_BITS"]

#: Entries of an expert's SiLU table, one per int8 SiLU input.
SILU_ENTRIES = 1 << ACT_BITS
#: Width of a Q1.15 routing weight (unsigned, 1.0 == 32768).
WEIGHT_BITS = 16
#: Width of an output accumulator: 48-bit products ``w * y``, sums of up to 9 terms.
COMBINE_BITS = 52


class ExpertFfnParams:
    """Elaboration parameters of :class:`.expert_ffn.ExpertFFN` and its stream formats.

    Parameters
    ----------
    lanes, m, n, weight_bits, group_size, acc_bits
        The engine's parameters (:class:`.sparse_matmul_params.SparseMatmulParams`). ``m`` and
        ``lanes`` must divide one another.
    max_tokens : int
        Most tokens of a batch (and of one expert's share of it).
    hidden : int
        Largest hidden size d; a multiple of ``group_size`` and of ``lanes``.
    ffn : int
        Largest expert FFN size f; a multiple of ``group_size`` and of ``lanes``.

    Attributes
    ----------
    engine_kwargs : dict
        The arguments of the engine, for :class:`.sparse_matmul.SparseMatmulEngine`.
    engine : SparseMatmulParams
        The engine's parameters: ``max_cols = max(hidden, ffn)``, ``max_rows = max(2 * ffn,
        hidden)``.
    h_width : int
        Activations per word of the hidden-activation buffer, ``max(lanes, m)``.
    command, meta, output_beat : Layout
        Payloads of the ``cmd``, ``meta`` and ``o`` streams (``x`` and ``w`` take the engine's
        activation and weight beats, ``silu`` one signed 8-bit table entry).
    """

    def __init__(self, *, lanes, m, n, weight_bits=8, group_size, max_tokens, hidden, ffn,
                 acc_bits=40):
        for name, value in [("hidden", hidden), ("ffn", ffn)]:
            if not isinstance(value, int) or value <= 0:
                raise TypeError(f"{name} must be a positive integer, not {value!r}")
            if value % group_size or value % lanes:
                raise ValueError(f"{name} = {value} is not a multiple of the group size "
                                 f"{group_size} and of the lane count {lanes}")
        if lanes % m and m % lanes:
            raise ValueError(f"lanes ({lanes}) and m ({m}) must divide one another")
        self.engine_kwargs = dict(
            lanes=lanes, m=m, n=n, weight_bits=weight_bits, group_size=group_size,
            max_tokens=max_tokens, max_cols=max(hidden, ffn), max_rows=max(2 * ffn, hidden),
            acc_bits=acc_bits)
        self.engine = SparseMatmulParams(**self.engine_kwargs)
        self.lanes      = lanes
        self.m          = m
        self.group_size = group_size
        self.max_tokens = max_tokens
        self.hidden     = hidden
        self.ffn        = ffn
        self.acc_bits   = acc_bits
        self.h_width    = max(lanes, m)

        self.command = data.StructLayout({
            "emit":          unsigned(1),
            "tokens":        unsigned(bits_for(max_tokens)),
            "hidden_groups": unsigned(bits_for(hidden // group_size)),
            "hidden_blocks": unsigned(bits_for(hidden // lanes)),
            "ffn_groups":    unsigned(bits_for(ffn // group_size)),
            "ffn_blocks":    unsigned(bits_for(ffn // lanes)),
            "gate_mult":     Multiplier,
            "up_mult":       Multiplier,
            "hidden_mult":   Multiplier,
            "down_mult":     Multiplier,
        })
        self.meta = data.StructLayout({
            "slot":   unsigned(bits_for(max_tokens - 1)),
            "exp":    signed(SHIFT_BITS),
            "weight": unsigned(WEIGHT_BITS),
        })
        self.output_beat = data.ArrayLayout(signed(OUT_BITS), lanes)

    @property
    def name(self):
        """A short name of the configuration, e.g. ``ffn_d64_f128_p4_2of4_w8_g32_t4_a40``."""
        e = self.engine
        return (f"ffn_d{self.hidden}_f{self.ffn}_p{self.lanes}_{e.n}of{e.m}_w{e.weight_bits}_"
                f"g{self.group_size}_t{self.max_tokens}_a{self.acc_bits}")

    def _check_tokens(self, tokens):
        if not 1 <= tokens <= self.max_tokens:
            raise ValueError(f"{tokens} tokens do not fit: the datapath takes 1 to "
                             f"{self.max_tokens}")

    def _check_size(self, what, value, limit):
        if not (0 < value <= limit and value % self.group_size == 0
                and value % self.lanes == 0):
            raise ValueError(f"{what} size {value} does not fit: the datapath takes a multiple "
                             f"of {self.group_size} and {self.lanes} up to {limit}")

    def expert_command(self, expert, tokens):
        """The command beat that runs ``expert`` (an ``intmodel.IntExpert``) on ``tokens``."""
        self._check_tokens(tokens)
        ffn, hidden = expert.gate.q.shape
        self._check_size("hidden", hidden, self.hidden)
        self._check_size("FFN", ffn, self.ffn)

        def mult(model):
            if not -(1 << (SHIFT_BITS - 1)) <= model.shift < 1 << (SHIFT_BITS - 1):
                raise ValueError(f"{model} has a shift beyond {SHIFT_BITS} signed bits")
            return {"mult": model.mult, "shift": model.shift}

        return self.command.const({
            "tokens": tokens,
            "hidden_groups": hidden // self.group_size, "hidden_blocks": hidden // self.lanes,
            "ffn_groups": ffn // self.group_size, "ffn_blocks": ffn // self.lanes,
            "gate_mult": mult(expert.gate_mult), "up_mult": mult(expert.up_mult),
            "hidden_mult": mult(expert.hidden_mult), "down_mult": mult(expert.down_mult),
        }).as_bits()

    def emit_command(self, tokens, hidden):
        """The command beat that emits and clears the outputs of slots ``0..tokens-1``."""
        self._check_tokens(tokens)
        self._check_size("hidden", hidden, self.hidden)
        return self.command.const({"emit": 1, "tokens": tokens,
                                   "hidden_blocks": hidden // self.lanes}).as_bits()

    def meta_beats(self, slots, exps, weights):
        """One beat per token: its output slot, its int8 exponent ``t`` and its Q1.15 weight."""
        if len(set(int(s) for s in slots)) != len(slots):
            raise ValueError("The tokens of one expert must go to distinct output slots")
        if np.any(np.asarray(weights) < 0) or np.any(np.asarray(weights) > 1 << 15):
            raise ValueError("Routing weights must lie in [0, 32768]")
        for slot in slots:
            if not 0 <= slot < self.max_tokens:
                raise ValueError(f"Slot {slot} does not exist: slots are 0 to "
                                 f"{self.max_tokens - 1}")
        return [self.meta.const({"slot": int(s), "exp": int(e), "weight": int(w)}).as_bits()
                for s, e, w in zip(slots, exps, weights, strict=True)]

    @staticmethod
    def silu_beats(table):
        """The 256 SiLU table entries, entry ``i + 128`` for the input ``i``, as unsigned beats."""
        table = np.asarray(table, dtype=np.int64)
        if table.shape != (SILU_ENTRIES,) or table.min() < -128 or table.max() > 127:
            raise ValueError("A SiLU table holds 256 int8 entries")
        return [int(v) & 0xff for v in table]

    def _engine_mant(self, qm):
        """``qm``'s mantissas with one per engine group: a model group of ``G_e`` columns
        repeats its mantissa ``G_e / group_size`` times."""
        if qm.group_size % self.group_size:
            raise ValueError(f"Weights with groups of {qm.group_size} do not fit the engine's "
                             f"group size {self.group_size}")
        return np.repeat(np.asarray(qm.mant, dtype=np.int64), qm.group_size // self.group_size,
                         axis=1)

    def _beats(self, qm):
        return self.engine.weight_beats(qm.q, self._engine_mant(qm))

    def weight_beats(self, expert):
        """The ``w`` beats of ``expert``: gate and up row blocks interleaved, then down.

        Gate block 0, up block 0, gate block 1, ... (each block ``lanes`` rows, ``hidden / m``
        beats), then the down projection's blocks in order (``ffn / m`` beats each).
        """
        ffn, hidden = expert.gate.q.shape
        per_block = hidden // self.m
        gate = np.array(self._beats(expert.gate), dtype=object).reshape(-1, per_block)
        up = np.array(self._beats(expert.up), dtype=object).reshape(-1, per_block)
        interleaved = np.stack([gate, up], axis=1).reshape(-1)
        return [int(b) for b in interleaved] + self._beats(expert.down)

    def outputs(self, beats, tokens):
        """The int32 outputs (tokens x hidden) from the beats of an emit command."""
        view = [data.Const(self.output_beat, bits) for bits in beats]
        out = np.array([[beat[p] for p in range(self.lanes)] for beat in view], dtype=np.int64)
        return out.reshape(tokens, -1)
