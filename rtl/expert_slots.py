"""On-chip expert slots: a table of resident experts, LRU replacement, and read-out to the FFN.

:class:`ExpertSlots` holds ``slots`` experts, each a SiLU table and up to the largest expert's
weight beats (:class:`.expert_ffn_params.ExpertFfnParams`), in synchronous-read memories. A
loader writes one slot while the FFN reads another; docs/slots.md describes the protocol, the
word formats and the measured overlap.
"""

from amaranth import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for

from ..hls_models.intmodel import ACT_BITS
from .expert_ffn import read_stage
from .expert_ffn_params import SILU_ENTRIES

__all__ = ["ExpertSlots", "LoadOp", "EventKind", "COUNTER_BITS"]

#: Width of each event counter (they wrap).
COUNTER_BITS = 32


def _onehot(index, count):
    """``count`` bits with bit ``index`` set."""
    return Cat(index == i for i in range(count))


class LoadOp(enum.Enum, shape=2):
    """Operation of a beat on the ``load`` stream."""
    BEGIN  = 0
    WORD   = 1
    COMMIT = 2
    ABORT  = 3


class EventKind(enum.Enum, shape=3):
    """Kind of a beat on the ``event`` stream."""
    LOAD    = 0    #: a load committed: ``tag`` is now valid in ``slot``
    HIT     = 1    #: a lookup found ``tag`` in ``slot``
    EVICT   = 2    #: a begin chose the valid ``slot`` as victim; ``tag`` was resident there
    ABORT   = 3    #: a load into ``slot`` was aborted or bad; ``slot`` is empty
    REFUSED = 4    #: a read named ``slot`` which holds no valid expert; nothing was streamed


class ExpertSlots(wiring.Component):
    """``slots`` on-chip expert slots with a (layer, expert) tag table and LRU replacement.

    Each slot holds an expert's 256-entry SiLU table and up to :attr:`capacity` engine weight
    beats, the largest expert of ``params`` (``3 d f / (P M)``). A slot is *empty* or *valid*
    (holds a committed expert with its tag and its weight-beat count), and *in use* from the
    cycle a read of it is taken until that read has streamed it. No two valid slots hold the
    same tag.

    **Loading** (``load``, one beat per operation, ``LoadOp`` in ``op``):

    - ``BEGIN`` with the tag in the low bits of ``data``: waits (``ready`` low) until some slot
      is *free*: not in use, not named by a read taken in the same cycle, and not the hit of a
      claiming lookup offered in the same cycle (taken or not). Then it picks the victim:
      the lowest-numbered such empty slot, else the least recently used such slot (an ``EVICT``
      event names its old tag). The victim, and any slot that holds the same tag, become empty;
      ``loading`` rises and ``load_slot`` names the victim until the load ends.
    - ``WORD``: the load's words in order: words 0..255 are the SiLU table (entry ``i`` in the
      low 8 bits of word ``i``, the order of ``ExpertFfnParams.silu_beats``), then the weight
      beats in ``ExpertFfnParams.weight_beats`` order, one beat per word. Each is written into
      the victim in the cycle it is accepted.
    - ``COMMIT``: if more than 256 and at most ``256 + capacity`` words came, the victim
      becomes valid with the tag, the most recently used slot, and a ``LOAD`` event follows;
      otherwise it is handled as ``ABORT``.
    - ``ABORT``: the victim stays empty (its old contents are gone); an ``ABORT`` event follows.

    A ``BEGIN`` during a load aborts that load and then begins anew; ``WORD``, ``COMMIT`` and
    ``ABORT`` outside a load are discarded. ``load`` is otherwise always ready (a word per
    cycle), except while the event it causes waits for ``event``.

    **Lookup**: a tag on ``lookup`` gives ``found`` one cycle later (when ``found`` is not
    back-pressured): ``hit`` and ``slot``, from the table as it stood in the cycle the lookup was
    accepted. A hit also sends a ``HIT`` event. A plain lookup does not change the LRU order. A
    *claiming* lookup (``claim`` set) that hits is also a read of its slot, taken in the same
    cycle, so no load can evict the expert between finding and reading it; it waits while a
    read is queued or offered on ``read``.

    **Read**: a slot number on ``read``, taken when no read is queued. Reads run one at a time
    in the order they are taken: one taken while another runs is *queued* and starts when that
    one ends. A valid slot becomes the most recently used slot and in use when its read is
    taken; its 256 SiLU entries stream on ``silu`` and its weight beats on ``w`` (independently,
    in the formats :class:`.expert_ffn.ExpertFFN` consumes), and it stays in use until both last
    beats have been taken. A slot that is not valid (or does not exist) gives a ``REFUSED``
    event and no beats.

    **Residency**: ``resident`` has bit ``e`` set when expert ``e`` of layer ``resident_layer``
    is valid in some slot (combinational, from the table as it stands).

    When a commit and a read make two slots most recently used in one cycle, the read's slot is
    the more recent. ``event`` goes to one source per cycle: a read's, else the load's, else a
    lookup's; the others wait. Every stream may stall in any cycle without loss.

    Parameters
    ----------
    params : ExpertFfnParams
        The expert FFN the slots feed; sets :attr:`capacity` and the weight-beat layout.
    slots : int
        Number of slots, at least 1.
    layers, experts : int
        Number of layers and of experts per layer; they size the tag.

    Attributes
    ----------
    capacity : int
        Weight beats per slot.
    tag, load_beat, lookup_beat, found_beat, event_beat, counters_layout : Layout
        Payload layouts (see Members).

    Members
    -------
    load : In(stream.Signature(StructLayout({"op": LoadOp, "data": unsigned(width)})))
        ``width`` is the widest of a weight beat, 8 and the tag.
    loading : Out(1)
    load_slot : Out(slot)
    lookup : In(stream.Signature(StructLayout({"tag": tag, "claim": 1})))
        ``tag`` is ``StructLayout({"layer", "expert"})``.
    found : Out(stream.Signature(StructLayout({"hit": 1, "slot": slot})))
    read : In(stream.Signature(slot))
        ``slot`` is ``unsigned(max(1, bits_for(slots - 1)))``.
    in_use : Out(slots)
        Bit ``s`` is set while slot ``s`` is read or queued for a read.
    resident_layer : In(layer)
    resident : Out(experts)
    silu : Out(stream.Signature(signed(8)))
    w : Out(stream.Signature(params.engine.weight_beat))
    event : Out(stream.Signature(StructLayout({"kind": EventKind, "slot": slot, "tag": tag})))
    counters : Out(StructLayout({"loads", "hits", "evictions", "aborts", "refused"}))
        Events sent so far, by kind, ``COUNTER_BITS`` each.
    """

    def __init__(self, params, *, slots, layers, experts):
        for name, value in [("slots", slots), ("layers", layers), ("experts", experts)]:
            if not isinstance(value, int) or value <= 0:
                raise TypeError(f"{name} must be a positive integer, not {value!r}")
        self.params   = params
        self.slots    = slots
        self.experts  = experts
        self.capacity = 3 * params.hidden * params.ffn // (params.lanes * params.m)

        beat = params.engine.weight_beat
        slot = unsigned(max(1, bits_for(slots - 1)))
        self.slot_shape = slot
        self.tag = data.StructLayout({"layer":  unsigned(max(1, bits_for(layers - 1))),
                                      "expert": unsigned(max(1, bits_for(experts - 1)))})
        width = max(beat.size, ACT_BITS, self.tag.size)
        self.load_beat  = data.StructLayout({"op": LoadOp, "data": unsigned(width)})
        self.lookup_beat = data.StructLayout({"tag": self.tag, "claim": unsigned(1)})
        self.found_beat = data.StructLayout({"hit": unsigned(1), "slot": slot})
        self.event_beat = data.StructLayout({"kind": EventKind, "slot": slot, "tag": self.tag})
        self.counters_layout = data.StructLayout({
            name: unsigned(COUNTER_BITS)
            for name in ["loads", "hits", "evictions", "aborts", "refused"]})
        super().__init__({
            "load":      In(stream.Signature(self.load_beat)),
            "loading":   Out(1),
            "load_slot": Out(slot),
            "lookup":    In(stream.Signature(self.lookup_beat)),
            "found":     Out(stream.Signature(self.found_beat)),
            "read":      In(stream.Signature(slot)),
            "in_use":    Out(slots),
            "resident_layer": In(self.tag["layer"].shape),
            "resident":  Out(experts),
            "silu":      Out(stream.Signature(signed(ACT_BITS))),
            "w":         Out(stream.Signature(beat)),
            "event":     Out(stream.Signature(self.event_beat)),
            "counters":  Out(self.counters_layout),
        })

    @property
    def words(self):
        """Most words of one load: the SiLU table and :attr:`capacity` weight beats."""
        return SILU_ENTRIES + self.capacity

    def elaborate(self, platform):
        m = Module()
        S, cap = self.slots, self.capacity

        m.submodules.silu_mem = silu_mem = Memory(shape=signed(ACT_BITS),
                                                  depth=S * SILU_ENTRIES, init=[])
        m.submodules.w_mem = w_mem = Memory(shape=self.params.engine.weight_beat,
                                            depth=S * cap, init=[])
        silu_wr, silu_rd = silu_mem.write_port(), silu_mem.read_port()
        w_wr, w_rd = w_mem.write_port(), w_mem.read_port()

        # The table.
        valid  = Signal(S)
        tags   = Array(Signal(self.tag.size, name=f"tag{s}") for s in range(S))
        counts = Array(Signal(range(cap + 1), name=f"count{s}") for s in range(S))
        ages   = Array(Signal(range(S), name=f"age{s}", init=s) for s in range(S))
        in_use = self.in_use

        # The event register: one source per cycle, a read's before the load's before a lookup's.
        ev = self.event
        ev_free = ~ev.valid | ev.ready
        ev_kind, ev_slot, ev_tag = Signal(EventKind), Signal(self.slot_shape), Signal(self.tag)

        # Reads: the running one (`r_*`) and at most one queued behind it (`q_*`). A read is
        # taken from `read`, or from a claiming lookup that hits, when none is queued.
        r_active = Signal()
        r_slot   = Signal(self.slot_shape)
        q_valid  = Signal()
        q_slot   = Signal(self.slot_shape)
        rd = self.read
        rd_exists = rd.payload < S
        rd_valid  = rd_exists & valid.bit_select(rd.payload, 1)
        rd_ev     = rd.valid & ~q_valid & ~rd_valid
        rd_go     = rd.valid & ~q_valid & (rd_valid | ev_free)
        m.d.comb += rd.ready.eq(rd_go)

        lk, fd = self.lookup, self.found
        hits = Cat(valid[s] & (tags[s] == lk.payload.tag.as_value()) for s in range(S))
        hit_slot = Signal(self.slot_shape)
        for s in range(S):
            with m.If(hits[s]):
                m.d.comb += hit_slot.eq(s)
        hit = hits.any()
        claim_hit = lk.valid & lk.payload.claim & hit       # offered, taken or not

        take      = Signal()                                  # a read of a valid slot is taken
        take_slot = Signal(self.slot_shape)

        # Victim: among slots neither in use, nor just taken for a read, nor the hit of an
        # offered claim, the lowest empty one, else the least recently used one.
        busy = Signal(S)
        m.d.comb += busy.eq(in_use | Mux(rd_go & rd_valid, _onehot(rd.payload, S), 0)
                            | Mux(claim_hit, _onehot(hit_slot, S), 0))
        found_victim, victim = Const(0), Const(0, self.slot_shape)
        victim_empty, victim_age = Const(0), Const(0)
        for s in range(S):
            free, empty = ~busy[s], ~valid[s]
            better = Signal(name=f"better{s}")
            m.d.comb += better.eq(free & (~found_victim | empty & ~victim_empty
                                          | ~empty & ~victim_empty & (ages[s] < victim_age)))
            found_victim = found_victim | free
            victim_empty = Mux(better, empty, victim_empty)
            victim_age   = Mux(better, ages[s], victim_age)
            victim       = Mux(better, s, victim)

        # Loading.
        ld = self.load
        loading, load_slot, load_tag = self.loading, self.load_slot, Signal(self.tag.size)
        count = Signal(range(self.words + 1))
        overflow = Signal()
        w_addr = Signal(range(S * cap + 1))
        op = ld.payload.op
        begin_tag = ld.payload.data[:self.tag.size]
        victim_valid = valid.bit_select(victim, 1)
        good = ~overflow & (count > SILU_ENTRIES)
        ld_ev = Signal()
        ld_kind = Signal(EventKind)
        with m.If(~loading):
            m.d.comb += [ld_ev.eq((op == LoadOp.BEGIN) & found_victim & victim_valid),
                         ld_kind.eq(EventKind.EVICT)]
        with m.Elif(op == LoadOp.BEGIN):
            m.d.comb += [ld_ev.eq(1), ld_kind.eq(EventKind.ABORT)]
        with m.Elif(op == LoadOp.COMMIT):
            m.d.comb += [ld_ev.eq(1), ld_kind.eq(Mux(good, EventKind.LOAD, EventKind.ABORT))]
        with m.Elif(op == LoadOp.ABORT):
            m.d.comb += [ld_ev.eq(1), ld_kind.eq(EventKind.ABORT)]
        ld_go = (ld.valid & (loading | (op != LoadOp.BEGIN) | found_victim)
                 & (~ld_ev | (ev_free & ~rd_ev)))
        m.d.comb += ld.ready.eq(ld_go & ~(loading & (op == LoadOp.BEGIN)))

        commit = Signal()
        m.d.comb += commit.eq(ld_go & loading & (op == LoadOp.COMMIT) & good)
        matches = Cat(valid[s] & (tags[s] == begin_tag) for s in range(S))
        with m.If(ld_go & ~loading & (op == LoadOp.BEGIN)):
            m.d.sync += [loading.eq(1), load_slot.eq(victim), load_tag.eq(begin_tag),
                         count.eq(0), overflow.eq(0), w_addr.eq(victim * cap),
                         valid.eq(valid & ~matches & ~_onehot(victim, S))]
        with m.If(ld_go & loading & (op != LoadOp.WORD)):
            m.d.sync += loading.eq(0)
        with m.If(commit):
            m.d.sync += [valid.bit_select(load_slot, 1).eq(1), tags[load_slot].eq(load_tag),
                         counts[load_slot].eq(count - SILU_ENTRIES)]
        word = ld_go & loading & (op == LoadOp.WORD)
        m.d.comb += [
            silu_wr.addr.eq(Cat(count[:ACT_BITS], load_slot)),
            silu_wr.data.eq(ld.payload.data[:ACT_BITS]),
            silu_wr.en.eq(word & (count < SILU_ENTRIES)),
            w_wr.addr.eq(w_addr),
            w_wr.data.eq(ld.payload.data),
            w_wr.en.eq(word & (count >= SILU_ENTRIES) & (count < self.words)),
        ]
        with m.If(word):
            with m.If(count < self.words):
                m.d.sync += count.eq(count + 1)
            with m.Else():
                m.d.sync += overflow.eq(1)
        with m.If(w_wr.en):
            m.d.sync += w_addr.eq(w_addr + 1)

        # Lookup: a claiming hit is also a read, so it waits while a read is queued or offered.
        lk_go = (lk.valid & (~fd.valid | fd.ready)
                 & (~hit | (ev_free & ~rd_ev & ~(ld_go & ld_ev)))
                 & ~(lk.payload.claim & hit & (q_valid | rd.valid)))
        m.d.comb += lk.ready.eq(lk_go)
        with m.If(lk_go):
            m.d.sync += [fd.valid.eq(1), fd.payload.hit.eq(hit), fd.payload.slot.eq(hit_slot)]
        with m.Elif(fd.ready):
            m.d.sync += fd.valid.eq(0)
        with m.If(rd_go & rd_valid):
            m.d.comb += [take.eq(1), take_slot.eq(rd.payload)]
        with m.Elif(lk_go & claim_hit):
            m.d.comb += [take.eq(1), take_slot.eq(hit_slot)]

        # LRU order: a commit's slot, then a taken read's slot, become the most recent.
        for s in range(S):
            older = ((commit & (ages[load_slot] < ages[s])).as_unsigned()
                     + (take & (ages[take_slot] < ages[s])).as_unsigned())
            with m.If(take & (take_slot == s)):
                m.d.sync += ages[s].eq(S - 1)
            with m.Elif(commit & (load_slot == s)):
                m.d.sync += ages[s].eq(S - 1 - take)
            with m.Else():
                m.d.sync += ages[s].eq(ages[s] - older)

        layer_bits = self.tag["layer"].shape.width
        for s in range(S):
            with m.If(valid[s] & (tags[s][:layer_bits] == self.resident_layer)):
                m.d.comb += self.resident.bit_select(tags[s][layer_bits:], 1).eq(1)

        # Events and counters.
        with m.If(rd_go & rd_ev):
            m.d.comb += [ev_kind.eq(EventKind.REFUSED), ev_slot.eq(rd.payload)]
        with m.Elif(ld_go & ld_ev):
            m.d.comb += [ev_kind.eq(ld_kind),
                         ev_slot.eq(Mux(loading, load_slot, victim)),
                         ev_tag.eq(Mux(loading, load_tag, tags[victim]))]
        with m.Else():
            m.d.comb += [ev_kind.eq(EventKind.HIT), ev_slot.eq(hit_slot), ev_tag.eq(lk.payload.tag)]
        send = (rd_go & rd_ev) | (ld_go & ld_ev) | (lk_go & hit)
        with m.If(send):
            m.d.sync += [ev.valid.eq(1), ev.payload.kind.eq(ev_kind), ev.payload.slot.eq(ev_slot),
                         ev.payload.tag.eq(ev_tag)]
            for kind, name in [(EventKind.LOAD, "loads"), (EventKind.HIT, "hits"),
                               (EventKind.EVICT, "evictions"), (EventKind.ABORT, "aborts"),
                               (EventKind.REFUSED, "refused")]:
                counter = getattr(self.counters, name)
                with m.If(ev_kind == kind):
                    m.d.sync += counter.eq(counter + 1)
        with m.Elif(ev.ready):
            m.d.sync += ev.valid.eq(0)

        # Read-out of the running read; the queued one starts when it ends.
        silu_i = Signal(range(SILU_ENTRIES + 1))
        w_left = Signal(range(cap + 1))
        r_addr = Signal(range(S * cap + 1))
        ending = Signal()
        m.d.comb += ending.eq(r_active & (silu_i == SILU_ENTRIES) & ~self.silu.valid
                              & (w_left == 0) & ~self.w.valid)
        next_slot = Mux(q_valid, q_slot, take_slot)
        with m.If(~r_active | ending):
            m.d.sync += [r_active.eq(q_valid | take), q_valid.eq(0)]
            with m.If(q_valid | take):
                m.d.sync += [r_slot.eq(next_slot), silu_i.eq(0),
                             w_left.eq(counts[next_slot]), r_addr.eq(next_slot * cap)]
        with m.Elif(take):
            m.d.sync += [q_valid.eq(1), q_slot.eq(take_slot)]
        with m.If(read_stage(m, silu_rd, self.silu.valid, self.silu.ready,
                              r_active & (silu_i != SILU_ENTRIES))):
            m.d.sync += silu_i.eq(silu_i + 1)
        with m.If(read_stage(m, w_rd, self.w.valid, self.w.ready, r_active & (w_left != 0))):
            m.d.sync += [w_left.eq(w_left - 1), r_addr.eq(r_addr + 1)]
        m.d.comb += [
            silu_rd.addr.eq(Cat(silu_i[:ACT_BITS], r_slot)),
            w_rd.addr.eq(r_addr),
            self.silu.payload.eq(silu_rd.data),
            self.w.payload.eq(w_rd.data),
            in_use.eq(Mux(r_active, _onehot(r_slot, S), 0) | Mux(q_valid, _onehot(q_slot, S), 0)),
        ]
        return m
