"""The expert loader: packed expert records from a byte stream into the expert slots.

:class:`ExpertLoader` parses each record of the packed expert stream (docs/formats.md), checks
its header against the hardware, writes its SiLU table and weight beats into
:class:`.expert_slots.ExpertSlots` through the slots' ``load`` port, checks its CRC-32 and
commits or aborts the load; docs/loader.md describes the ports, the status and the cycles.
"""

import math

from amaranth import Array, Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from ..hls_models.intmodel import ACT_BITS
from .crc32 import CRC32
from .expert_ffn_params import SILU_ENTRIES
from .expert_slots import LoadOp
from .expert_stream import (
    CRC_BYTES,
    CRC_RESIDUE,
    HEADER_BYTES,
    MAGIC,
    SHARED_EXPERT,
    VERSION,
    Header,
    beat_bytes,
    payload_bytes,
)
from .requant import Multiplier

__all__ = ["AXIS_BYTES", "StatusKind", "ExpertLoader"]

#: A byte stream with AXI-Stream member names; ``tlast`` marks the last byte of a record.
AXIS_BYTES = wiring.Signature({
    "tdata":  Out(8),
    "tvalid": Out(1),
    "tready": In(1),
    "tlast":  Out(1),
})

_MULTS = ("gate_mult", "up_mult", "hidden_mult", "down_mult")


class StatusKind(enum.Enum, shape=3):
    """Outcome of one record, on the ``status`` stream."""
    OK          = 0    #: committed into ``slot``
    BAD_MAGIC   = 1    #: the first four bytes are not ``MAGIC``
    BAD_VERSION = 2    #: the format version is not ``VERSION``
    MISMATCH    = 3    #: packed for other hardware, or sizes, indices or multipliers out of range
    BAD_LENGTH  = 4    #: ``payload_bytes`` disagrees with d and f, or ``tlast`` early or late
    BAD_CRC     = 5    #: the CRC-32 of the record is wrong


class ExpertLoader(wiring.Component):
    """Loads packed expert records from ``s_axis`` into expert slots, checked.

    Per record (``tlast`` on its last byte): the 36-byte header is checked, in this order, for
    the magic, the version, the hardware (weight bits, M, N, G, P equal to ``params``'; d and f
    nonzero multiples of G and P up to ``params.hidden`` and ``params.ffn``; ``layer <
    layers``; ``expert < experts`` or the shared expert; every ``mult`` normalized, bit 15 set)
    and the payload length (``payload_bytes == 256 + 3 d f / (P M) * B``). A record that passes
    is loaded: ``BEGIN`` with its tag, a ``WORD`` per SiLU byte and per weight beat (``B``
    little-endian bytes), then ``COMMIT`` when the record ends with its CRC and the CRC-32 over
    the whole record equals ``CRC_RESIDUE``; otherwise ``ABORT`` (the slots then leave the
    victim slot empty). A record that fails the header check is not loaded at all. Either way
    the loader reads on to ``tlast`` and reports the record on ``status``; nothing is
    committed unless the kind is ``OK``. ``tlast`` before the CRC's last byte, or not on it,
    is ``BAD_LENGTH``; header kinds are reported before the CRC is known, so a corrupt header
    gives the header's kind.

    The shared expert (``SHARED_EXPERT``) takes the tag expert index ``experts``: the slots
    must be built with ``experts + 1`` experts per layer (:attr:`tag` is their tag).

    On commit, the record's d, f and four multipliers are written into a per-slot table, read
    combinationally on ``info`` for the slot on ``info_slot``: what the FFN command needs.

    Throughput: one byte per cycle while ``load`` takes every beat; ``s_axis`` is not ready in
    the cycle after the header, while ``BEGIN`` waits for a free slot, in the cycle after the
    CRC and while the end of a record is reported (at least 3 cycles per record). Stalls on
    ``s_axis`` and back-pressure on ``load`` and ``status`` lose and duplicate nothing.

    Parameters
    ----------
    params : ExpertFfnParams
        The datapath the slots feed.
    layers, experts : int
        Layers and routed experts per layer.
    slots : int
        Number of slots of the :class:`.expert_slots.ExpertSlots` fed.

    Attributes
    ----------
    tag, load_beat, status_beat, info_layout : Layout
        Payloads of the members below.

    Members
    -------
    s_axis : In(AXIS_BYTES)
        The records.
    load : Out(stream.Signature(load_beat))
        To the slots' ``load``: ``StructLayout({"op": LoadOp, "data": unsigned(width)})``.
    load_slot : In(slot)
        The slots' ``load_slot`` (the victim of the running load).
    status : Out(stream.Signature(StructLayout({"kind", "layer", "expert", "slot"})))
        One beat per record: ``StatusKind``, the header's 16-bit layer and expert (as received;
        meaningless for a truncated header) and the slot loaded (``OK``) or emptied (``BAD_CRC``
        and ``BAD_LENGTH`` after a good header); 0 when no load began.
    info_slot : In(slot)
    info : Out(StructLayout({"hidden", "ffn", "gate_mult", "up_mult", "hidden_mult",
        "down_mult"}))
        What was committed last into ``info_slot``.
    """

    def __init__(self, params, *, layers, experts, slots):
        for name, value in [("layers", layers), ("experts", experts), ("slots", slots)]:
            if not isinstance(value, int) or value <= 0:
                raise TypeError(f"{name} must be a positive integer, not {value!r}")
        if layers > 1 << 16 or experts >= SHARED_EXPERT:
            raise ValueError(f"{layers} layers of {experts} experts do not fit the header")
        self.params  = params
        self.layers  = layers
        self.experts = experts
        self.slots   = slots

        slot = unsigned(max(1, bits_for(slots - 1)))
        self.tag = data.StructLayout({"layer":  unsigned(max(1, bits_for(layers - 1))),
                                      "expert": unsigned(bits_for(experts))})
        width = max(params.engine.weight_beat.size, ACT_BITS, self.tag.size)
        self.load_beat   = data.StructLayout({"op": LoadOp, "data": unsigned(width)})
        self.status_beat = data.StructLayout({"kind": StatusKind, "layer": unsigned(16),
                                              "expert": unsigned(16), "slot": slot})
        self.info_layout = data.StructLayout({"hidden": unsigned(16), "ffn": unsigned(16),
                                              **{key: Multiplier for key in _MULTS}})
        super().__init__({
            "s_axis":    In(AXIS_BYTES),
            "load":      Out(stream.Signature(self.load_beat)),
            "load_slot": In(slot),
            "status":    Out(stream.Signature(self.status_beat)),
            "info_slot": In(slot),
            "info":      Out(self.info_layout),
        })

    def _verdict(self, m, h):
        """The :class:`StatusKind` of header ``h`` (a view), before its payload is seen; valid
        two cycles after ``h`` last changed."""
        p, e = self.params, self.params.engine
        step = math.lcm(p.group_size, p.lanes)

        def fits(size, limit):
            return (size != 0) & (size <= limit) & (size % step == 0)

        mismatch = ((h.weight_bits != e.weight_bits) | (h.m != e.m) | (h.n != e.n)
                    | (h.group_size != p.group_size) | (h.lanes != p.lanes)
                    | ~fits(h.hidden, p.hidden) | ~fits(h.ffn, p.ffn)
                    | (h.layer >= self.layers)
                    | (h.expert >= self.experts) & (h.expert != SHARED_EXPERT)
                    | ~Cat(h[key].mult[-1] for key in _MULTS).all())
        # The length check in two registered steps (two multiplies are too long for one cycle):
        # it is valid in the third cycle after the header's last byte is taken.
        pm = p.lanes * p.m
        d, f = h.hidden[:bits_for(p.hidden)], h.ffn[:bits_for(p.ffn)]
        df, length_ok = Signal(range(p.hidden * p.ffn + 1)), Signal()
        m.d.sync += [df.eq(d * f),
                     length_ok.eq(h.payload_bytes * pm == 3 * beat_bytes(p) * df
                                  + SILU_ENTRIES * pm)]
        verdict = Signal(StatusKind)
        with m.If(h.magic != MAGIC):
            m.d.comb += verdict.eq(StatusKind.BAD_MAGIC)
        with m.Elif(h.version != VERSION):
            m.d.comb += verdict.eq(StatusKind.BAD_VERSION)
        with m.Elif(mismatch):
            m.d.comb += verdict.eq(StatusKind.MISMATCH)
        with m.Elif(~length_ok):
            m.d.comb += verdict.eq(StatusKind.BAD_LENGTH)
        with m.Else():
            m.d.comb += verdict.eq(StatusKind.OK)
        return verdict

    def elaborate(self, platform):
        m = Module()
        p = self.params
        B = beat_bytes(p)
        m.submodules.crc = crc = CRC32()

        s, ld, st = self.s_axis, self.load, self.status
        take = s.tvalid & s.tready
        m.d.comb += [crc.i.valid.eq(take), crc.i.payload.eq(s.tdata)]

        h = Signal(Header)
        count = Signal(range(max(HEADER_BYTES, payload_bytes(p, p.hidden, p.ffn)) + 1))
        kind  = Signal(StatusKind)
        began = Signal()
        slot  = Signal.like(self.load_slot)
        acc   = Signal(8 * B)
        pos   = Signal(range(B))
        word  = Cat(acc[8:], s.tdata)
        table = Array(Signal(self.info_layout, name=f"info{i}") for i in range(self.slots))
        m.d.comb += self.info.eq(table[self.info_slot])

        expert = Mux(h.expert == SHARED_EXPERT, self.experts, h.expert)
        tag = Cat(h.layer[:self.tag["layer"].shape.width],
                  expert[:self.tag["expert"].shape.width])
        free = ~ld.valid | ld.ready
        with m.If(ld.ready):
            m.d.sync += ld.valid.eq(0)
        with m.If(st.ready):
            m.d.sync += st.valid.eq(0)

        def issue(op, value=0):
            return [ld.valid.eq(1), ld.payload.op.eq(op), ld.payload.data.eq(value)]

        def end(next_kind):
            m.d.sync += kind.eq(next_kind)
            m.next = "END"

        verdict = self._verdict(m, h)
        with m.FSM():
            with m.State("HEADER"):
                m.d.comb += s.tready.eq(1)
                with m.If(s.tvalid):
                    m.d.sync += [h.eq(Cat(h.as_value()[8:], s.tdata)), count.eq(count + 1)]
                    with m.If(s.tlast):
                        end(StatusKind.BAD_LENGTH)
                    with m.Elif(count == HEADER_BYTES - 1):
                        m.d.sync += count.eq(0)
                        m.next = "LENGTH"
            with m.State("LENGTH"):
                m.d.sync += count.eq(count + 1)
                with m.If(count == 1):
                    m.d.sync += count.eq(0)
                    m.next = "CHECK"
            with m.State("CHECK"):
                m.d.sync += kind.eq(verdict)
                with m.If(verdict == StatusKind.OK):
                    m.next = "BEGIN"
                with m.Else():
                    m.next = "SKIP"
            with m.State("BEGIN"):
                with m.If(free):
                    m.d.sync += [*issue(LoadOp.BEGIN, tag), began.eq(1)]
                    m.next = "PAYLOAD"
            with m.State("PAYLOAD"):
                m.d.comb += s.tready.eq(free)
                with m.If(take):
                    m.d.sync += count.eq(count + 1)
                    with m.If(count < SILU_ENTRIES):
                        m.d.sync += issue(LoadOp.WORD, s.tdata)
                    with m.Else():
                        m.d.sync += [acc.eq(word), pos.eq(Mux(pos == B - 1, 0, pos + 1))]
                        with m.If(pos == B - 1):
                            m.d.sync += issue(LoadOp.WORD, word)
                    with m.If(s.tlast):
                        end(StatusKind.BAD_LENGTH)
                    with m.Elif(count == h.payload_bytes - 1):
                        m.d.sync += count.eq(0)
                        m.next = "CRC"
            with m.State("CRC"):
                m.d.comb += s.tready.eq(1)
                with m.If(s.tvalid):
                    m.d.sync += count.eq(count + 1)
                    with m.If(count == CRC_BYTES - 1):
                        with m.If(s.tlast):
                            m.next = "CRC_CHECK"
                        with m.Else():
                            m.d.sync += kind.eq(StatusKind.BAD_LENGTH)
                            m.next = "SKIP"
                    with m.Elif(s.tlast):
                        end(StatusKind.BAD_LENGTH)
            with m.State("CRC_CHECK"):
                end(Mux(crc.crc == CRC_RESIDUE, StatusKind.OK, StatusKind.BAD_CRC))
            with m.State("SKIP"):
                m.d.comb += s.tready.eq(1)
                with m.If(s.tvalid & s.tlast):
                    m.next = "END"
            with m.State("END"):
                # Every beat issued so far has been taken, so load_slot names the victim.
                with m.If(~ld.valid):
                    m.d.sync += slot.eq(Mux(began, self.load_slot, 0))
                    with m.If(began):
                        m.d.sync += issue(Mux(kind == StatusKind.OK, LoadOp.COMMIT,
                                              LoadOp.ABORT))
                    m.next = "REPORT"
            with m.State("REPORT"):
                with m.If(~ld.valid & (~st.valid | st.ready)):
                    m.d.sync += [st.valid.eq(1), st.payload.kind.eq(kind),
                                 st.payload.layer.eq(h.layer), st.payload.expert.eq(h.expert),
                                 st.payload.slot.eq(slot),
                                 count.eq(0), began.eq(0), pos.eq(0)]
                    m.d.comb += crc.clear.eq(1)
                    with m.If(began & (kind == StatusKind.OK)):
                        m.d.sync += table[slot].eq(Cat(h.hidden, h.ffn,   # info_layout order
                                                       *(h[key] for key in _MULTS)))
                    m.next = "HEADER"
        return m
