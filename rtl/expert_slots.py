"""On-chip expert slots: a table of resident experts, LRU replacement, and read-out to the FFN.

:class:`ExpertSlots` holds ``slots`` experts, each a SiLU table and up to the largest expert's
weight beats (:class:`.expert_ffn_params.ExpertFfnParams`), in synchronous-read memories: the
weight beats in block RAM (:class:`DualPortBeatStore`) or, on the iCE40 UP5K, packed into SPRAM
(:class:`SpramBeatStore`). A loader writes one slot while the FFN reads another; docs/slots.md
describes the protocol, the word formats and the measured overlap.
"""

from amaranth import Array, Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, exact_log2

from ..hls_models.intmodel import ACT_BITS
from .expert_ffn import read_stage
from .expert_ffn_params import SILU_ENTRIES
from .single_port_memory import SPRAM_DEPTH, SPRAM_WIDTH, SinglePortMemory
from .skid_buffer import SkidBuffer

__all__ = ["ExpertSlots", "LoadOp", "EventKind", "COUNTER_BITS", "MEMORY_KINDS",
           "DualPortBeatStore", "SpramBeatStore"]

#: Width of each event counter (they wrap).
COUNTER_BITS = 32

#: Where the slots' weight beats live: block RAM (a write and a read port), or iCE40 SPRAM.
MEMORY_KINDS = ("ebr", "spram")


def _onehot(index, count):
    """``count`` bits with bit ``index`` set."""
    return Cat(index == i for i in range(count))


def _store_members(beat, depth):
    return {"w_en": In(1), "w_addr": In(range(depth)), "w_data": In(beat),
            "r_en": In(1), "r_addr": In(range(depth)), "r_ready": Out(1), "r_data": Out(beat)}


class DualPortBeatStore(wiring.Component):
    """``depth`` words of ``beat`` in one memory with a write port and a read port (block RAM).

    A write (``w_en``) takes effect at the end of its cycle. A read request (``r_en``) is
    always accepted (``r_ready`` is high): the word at ``r_addr`` appears on ``r_data`` in the
    next cycle and stays there until the next request. Members as :class:`SpramBeatStore`.
    """

    def __init__(self, beat, depth):
        self.beat, self.depth = beat, depth
        super().__init__(_store_members(beat, depth))

    def elaborate(self, platform):
        m = Module()
        m.submodules.mem = mem = Memory(shape=self.beat, depth=self.depth, init=[])
        wr, rd = mem.write_port(), mem.read_port()
        m.d.comb += [wr.addr.eq(self.w_addr), wr.data.eq(self.w_data), wr.en.eq(self.w_en),
                     rd.addr.eq(self.r_addr), rd.en.eq(self.r_en), self.r_ready.eq(1),
                     self.r_data.eq(rd.data)]
        return m


class SpramBeatStore(wiring.Component):
    """``depth`` engine weight beats in iCE40 SPRAM, without the mantissas' idle bits.

    A weight beat (:attr:`.sparse_matmul_params.SparseMatmulParams.weight_beat`) carries its
    lanes' mantissas only on the last beat of each quantization group of ``K = G / M`` beats;
    elsewhere they are 0. The store keeps the beats' entries in one
    :class:`.single_port_memory.SinglePortMemory` and, in a second one of 16-bit words, the
    group's mantissas in the side words of the group's first ``ceil(9 P / 16)`` beats. Both
    memories are SPRAM tiles (``SB_SPRAM256KA``): at P=4, 2:4 int4 three tiles of entries and
    one of side words hold 16384 beats.

    Contract (that of the slots' read-out): beats are written and read in ascending address
    order within a group of ``K`` aligned addresses, and a group's first beats are read before
    its last one. A read returns the entries as written, the mantissas of the group on its last
    beat (the side words read before it in that group), and 0 as mantissas on every other beat.

    Writes (``w_en``) are always taken, and registered: a beat is written into the SPRAM in the
    cycle after it is offered (which keeps the writer's logic off the SPRAM's enables), and a
    group's last beat writes its side words in the ``ceil(9 P / 16)`` cycles after that. A read
    request (``r_en``) is accepted (``r_ready``) in a cycle in which neither memory writes: a
    read after a write of the same address sees the written beat. The word of an accepted
    read appears on ``r_data`` in the next cycle and stays there until the next accepted
    request.

    Parameters
    ----------
    engine : SparseMatmulParams
        The engine whose weight beats are stored; ``K`` must be a power of two larger than the
        number of side words.
    depth : int
        Number of beats, a multiple of ``K``, at most 16384.
    spram_model : type or None
        Passed to :class:`.single_port_memory.SinglePortMemory` (simulation).

    Members
    -------
    w_en, w_addr, w_data : In
    r_en, r_addr : In
    r_ready : Out(1)
    r_data : Out(engine.weight_beat)
    """

    def __init__(self, engine, depth, *, spram_model=None):
        self.check(engine, depth)
        beat = engine.weight_beat
        self.entry_bits  = beat["entries"].shape.size
        self.mant_bits   = beat["mant"].shape.size
        self.group_beats = engine.beats_per_group
        self.side_words  = -(-self.mant_bits // SPRAM_WIDTH)
        self.depth = depth
        self.spram_model = spram_model
        super().__init__(_store_members(beat, depth))

    @staticmethod
    def check(engine, depth):
        """Raise ``ValueError`` unless ``depth`` beats of ``engine`` fit this store."""
        K, words = engine.beats_per_group, -(-engine.weight_beat["mant"].shape.size // SPRAM_WIDTH)
        if K & (K - 1) or words >= K:
            raise ValueError(f"SPRAM slots need G / M beats per group to be a power of two "
                             f"larger than the {words} side words of the mantissas, not {K}")
        if depth % K or depth > SPRAM_DEPTH:
            raise ValueError(f"SPRAM slots hold a multiple of {K} beats up to {SPRAM_DEPTH}, "
                             f"not {depth}")

    def elaborate(self, platform):
        m = Module()
        K, words = self.group_beats, self.side_words
        phase_bits = exact_log2(K)
        memory = dict(spram=True, spram_model=self.spram_model)
        m.submodules.entries = entries = SinglePortMemory(self.entry_bits, self.depth, **memory)
        m.submodules.side = side = SinglePortMemory(SPRAM_WIDTH, self.depth, **memory)
        w_en, w_addr = Signal(), Signal(range(self.depth))
        w_data = Signal(Value.cast(self.w_data).shape())
        m.d.sync += [w_en.eq(self.w_en), w_addr.eq(self.w_addr), w_data.eq(self.w_data)]

        # Writes, a cycle late: the entries; a group's mantissas, on its last beat, into the
        # side words of its first beats, one per cycle after it.
        pending   = Signal(words * SPRAM_WIDTH)
        side_addr = Signal(range(self.depth))
        side_left = Signal(range(words + 1))
        m.d.comb += [
            entries.w_en.eq(w_en), entries.w_addr.eq(w_addr),
            entries.w_data.eq(w_data[:self.entry_bits]),
            side.w_en.eq(side_left != 0), side.w_addr.eq(side_addr),
            side.w_data.eq(pending[:SPRAM_WIDTH]),
        ]
        with m.If(w_en & (w_addr[:phase_bits] == K - 1)):
            m.d.sync += [pending.eq(w_data[self.entry_bits:]),
                         side_addr.eq(w_addr - (K - 1)), side_left.eq(words)]
        with m.Elif(side_left != 0):
            m.d.sync += [pending.eq(pending[SPRAM_WIDTH:]), side_addr.eq(side_addr + 1),
                         side_left.eq(side_left - 1)]

        # Reads: both memories at one address; the side words of a group's first beats are
        # collected and given as the mantissas of its last beat.
        accept = Signal()
        fresh, phase = Signal(), Signal(phase_bits)
        collected = Signal(words * SPRAM_WIDTH)
        m.d.comb += [
            self.r_ready.eq(entries.r_ready & side.r_ready),
            accept.eq(self.r_en & self.r_ready),
            entries.r_en.eq(accept), entries.r_addr.eq(self.r_addr),
            side.r_en.eq(accept), side.r_addr.eq(self.r_addr),
        ]
        m.d.sync += fresh.eq(accept)
        with m.If(accept):
            m.d.sync += phase.eq(self.r_addr[:phase_bits])
        with m.If(fresh & (phase < words)):
            m.d.sync += collected.eq(Cat(collected[SPRAM_WIDTH:], side.r_data))
        m.d.comb += self.r_data.eq(Cat(entries.r_data,
                                       Mux(phase == K - 1, collected[:self.mant_bits], 0)))
        return m


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
    in the formats :class:`.expert_ffn.ExpertFFN` consumes; ``w`` leaves through a
    :class:`.skid_buffer.SkidBuffer`, so nothing on it is combinational from the memory or to
    its read enables), and it stays in use until both last beats have been taken. A slot that
    is not valid (or does not exist) gives a ``REFUSED`` event and no beats.

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
    memory : str
        Where the weight beats live (:data:`MEMORY_KINDS`): ``"ebr"`` (default), one block-RAM
        memory with a write and a read port (:class:`DualPortBeatStore`); ``"spram"``, iCE40
        SPRAM (:class:`SpramBeatStore`): a read-out beat waits a cycle in each cycle the loader
        writes, and the mantissa fields of a beat that is not the last of its quantization
        group are not stored (read back as 0, as the engine's weight beats have them).
    spram_model : type or None
        With ``memory="spram"``, a model of ``SB_SPRAM256KA`` for simulation
        (:class:`.single_port_memory.SpramModel`).

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

    def __init__(self, params, *, slots, layers, experts, memory="ebr", spram_model=None):
        for name, value in [("slots", slots), ("layers", layers), ("experts", experts)]:
            if not isinstance(value, int) or value <= 0:
                raise TypeError(f"{name} must be a positive integer, not {value!r}")
        if memory not in MEMORY_KINDS:
            raise ValueError(f"memory must be one of {', '.join(MEMORY_KINDS)}, not {memory!r}")
        self.memory   = memory
        self.spram_model = spram_model
        self.params   = params
        self.slots    = slots
        self.experts  = experts
        self.capacity = 3 * params.hidden * params.ffn // (params.lanes * params.m)

        beat = params.engine.weight_beat
        if memory == "spram":
            SpramBeatStore.check(params.engine, slots * self.capacity)
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
        if self.memory == "spram":
            w_store = SpramBeatStore(self.params.engine, S * cap, spram_model=self.spram_model)
        else:
            w_store = DualPortBeatStore(self.params.engine.weight_beat, S * cap)
        m.submodules.w_store = w_store
        silu_wr, silu_rd = silu_mem.write_port(), silu_mem.read_port()
        # The weight beats leave through registers: the beat store's read multiplexer (over
        # every block RAM of the slots) and the consumer's logic are then on separate paths.
        m.submodules.w_out = w_out = SkidBuffer(self.params.engine.weight_beat)
        wiring.connect(m, w_out.o, wiring.flipped(self.w))
        w_read = w_out.i

        # The table; `bases` are the slots' first weight-beat addresses (constants, no multiply).
        bases  = Array(Const(s * cap, range(S * cap + 1)) for s in range(S))
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
                         count.eq(0), overflow.eq(0), w_addr.eq(bases[victim]),
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
            w_store.w_addr.eq(w_addr),
            w_store.w_data.eq(ld.payload.data[:self.params.engine.weight_beat.size]),
            w_store.w_en.eq(word & (count >= SILU_ENTRIES) & (count < self.words)),
        ]
        with m.If(word):
            with m.If(count < self.words):
                m.d.sync += count.eq(count + 1)
            with m.Else():
                m.d.sync += overflow.eq(1)
        with m.If(w_store.w_en):
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
                              & (w_left == 0) & ~w_read.valid & ~self.w.valid)
        next_slot = Mux(q_valid, q_slot, take_slot)
        with m.If(~r_active | ending):
            m.d.sync += [r_active.eq(q_valid | take), q_valid.eq(0)]
            with m.If(q_valid | take):
                m.d.sync += [r_slot.eq(next_slot), silu_i.eq(0),
                             w_left.eq(counts[next_slot]), r_addr.eq(bases[next_slot])]
        with m.Elif(take):
            m.d.sync += [q_valid.eq(1), q_slot.eq(take_slot)]
        with m.If(read_stage(m, silu_rd.en, self.silu.valid, self.silu.ready,
                              r_active & (silu_i != SILU_ENTRIES))):
            m.d.sync += silu_i.eq(silu_i + 1)
        with m.If(read_stage(m, w_store.r_en, w_read.valid, w_read.ready,
                              r_active & (w_left != 0), accepted=w_store.r_ready)):
            m.d.sync += [w_left.eq(w_left - 1), r_addr.eq(r_addr + 1)]
        m.d.comb += [
            silu_rd.addr.eq(Cat(silu_i[:ACT_BITS], r_slot)),
            w_store.r_addr.eq(r_addr),
            self.silu.payload.eq(silu_rd.data),
            w_read.payload.eq(w_store.r_data),
            in_use.eq(Mux(r_active, _onehot(r_slot, S), 0) | Mux(q_valid, _onehot(q_slot, S), 0)),
        ]
        return m
