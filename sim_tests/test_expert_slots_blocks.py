"""Amaranth-simulator tests of the expert slots' table: LRU victim choice, lookups, aborts.

:class:`SlotsModel` is the reference model of :class:`moefpga.rtl.expert_slots.ExpertSlots`,
cycle by cycle; the Verilator test in ``test_expert_slots.py`` drives it with concurrent,
stalled streams. Here the operations run one at a time on small slots, so every LRU decision is
checked in isolation.
"""

import numpy as np
import pytest
from amaranth import Fragment, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from moefpga.rtl.expert_ffn import ExpertFFN
from moefpga.rtl.expert_ffn_params import SILU_ENTRIES, ExpertFfnParams
from moefpga.rtl.expert_slots import EventKind, ExpertSlots, LoadOp

# The smallest expert the FFN takes: 64 weight beats a slot.
TINY = dict(lanes=2, m=4, n=2, weight_bits=4, group_size=16, max_tokens=1, hidden=16, ffn=16)


class SlotsModel:
    """The slots' table, LRU order and contents, updated as the hardware does in one cycle.

    :meth:`cycle` takes what transferred in one clock cycle (a load beat, a read command, a
    lookup, claiming or not), the ``in_use`` bits before it and the tag of a claiming lookup
    offered in that cycle, and returns what the hardware answers: the event, the lookup result,
    the read's contents.
    """

    def __init__(self, slots, capacity):
        self.slots, self.capacity = slots, capacity
        self.valid    = [False] * slots
        self.tags     = [None] * slots
        self.contents = [None] * slots
        self.ages     = list(range(slots))
        self.load     = None          # (slot, tag, words) of the running load
        self.counts   = dict.fromkeys(EventKind, 0)

    def victim(self, busy):
        """The slot a begin picks when the slots in ``busy`` may not be chosen, or None."""
        free = [s for s in range(self.slots) if s not in busy]
        empty = [s for s in free if not self.valid[s]]
        if empty:
            return empty[0]
        return min(free, key=lambda s: self.ages[s], default=None)

    def _touch(self, slot):
        for s in range(self.slots):
            if self.ages[s] > self.ages[slot]:
                self.ages[s] -= 1
        self.ages[slot] = self.slots - 1

    def lookup(self, tag):
        """``(hit, slot)`` for ``tag``."""
        for s in range(self.slots):
            if self.valid[s] and self.tags[s] == tag:
                return True, s
        return False, 0

    def cycle(self, *, in_use=(), load=None, read=None, lookup=None, claim=False, offered=None):
        """Apply one cycle's transfers. ``load`` is ``(op, data)`` (a tag for a begin, a word
        otherwise), ``read`` a slot, ``lookup`` a tag (a claiming one if ``claim``), ``offered``
        the tag of a claiming lookup offered in the cycle, taken or not. Returns ``(event,
        found, contents, victim)``: the event ``(kind, slot, tag)`` or None, the lookup's
        ``(hit, slot)`` or None, the contents ``(silu, weights)`` of the read taken (from
        ``read`` or a claiming hit) or None, the slot a begin chose or None."""
        event = found = contents = victim = None
        commit = None
        if read is not None:
            if read < self.slots and self.valid[read]:
                contents = self.contents[read]
            else:
                event = (EventKind.REFUSED, read, None)
        busy = set(in_use) | ({read} if contents is not None else set())
        if offered is not None and self.lookup(offered)[0]:
            busy.add(self.lookup(offered)[1])
        if lookup is not None:
            found = self.lookup(lookup)
            if found[0] and claim:
                assert read is None, "a claiming hit was taken with a read"
                read, contents = found[1], self.contents[found[1]]
        if load is not None:
            op, value = load
            if self.load is None and op == LoadOp.BEGIN:
                victim = self.victim(busy)
                assert victim is not None, "a begin was accepted with every slot busy"
                if self.valid[victim]:
                    event = (EventKind.EVICT, victim, self.tags[victim])
                for s in range(self.slots):
                    if s == victim or self.tags[s] == value:
                        self.valid[s] = False
                self.load = (victim, value, [])
            elif self.load is not None and op == LoadOp.WORD:
                self.load[2].append(value)
            elif self.load is not None:
                slot, tag, words = self.load
                good = (op == LoadOp.COMMIT and
                        SILU_ENTRIES < len(words) <= SILU_ENTRIES + self.capacity)
                event = (EventKind.LOAD if good else EventKind.ABORT, slot, tag)
                if good:
                    self.valid[slot], self.tags[slot] = True, tag
                    self.contents[slot] = (words[:SILU_ENTRIES], words[SILU_ENTRIES:])
                    commit = slot
                self.load = None
        if found is not None and found[0]:
            event = (EventKind.HIT, found[1], lookup)
        if commit is not None:
            self._touch(commit)
        if contents is not None:
            self._touch(read)
        if event is not None:
            self.counts[event[0]] += 1
        return event, found, contents, victim


def _run_sequential(dut, ops, model):
    """Run ``ops`` one at a time (each waits for its answer) and check every answer, and the
    residency of layers 0 and 1 before each, against ``model``. ``ops``: ``("load", tag,
    n_weights, commit)``, ``("lookup", tag)``, ``("claim", tag)`` (a claiming lookup: a hit
    is read out), ``("read", slot)``. Returns the victim slot of every load."""
    rng = np.random.default_rng(1)
    victims = []
    beat_mask = (1 << dut.params.engine.weight_beat.size) - 1
    data_mask = (1 << dut.load_beat["data"].shape.width) - 1

    async def put(ctx, port, payload):
        ctx.set(port.payload, payload)
        ctx.set(port.valid, 1)
        await ctx.tick().until(port.ready)
        ctx.set(port.valid, 0)

    async def take(ctx, port):
        ctx.set(port.ready, 1)
        value, = await ctx.tick().sample(port.payload).until(port.valid)
        ctx.set(port.ready, 0)
        return value

    async def event(ctx, expected):
        got = await take(ctx, dut.event)
        tag = (int(got.tag.layer), int(got.tag.expert))
        assert (got.kind, int(got.slot)) == expected[:2]
        if expected[2] is not None:
            assert tag == expected[2]

    async def read_out(ctx, contents):
        silu = [await take(ctx, dut.silu) for _ in range(SILU_ENTRIES)]
        assert [int(v) & 0xff for v in silu] == [w & 0xff for w in contents[0]]
        weights = [await take(ctx, dut.w) for _ in contents[1]]
        assert [w.as_bits() for w in weights] == contents[1]
        await ctx.tick().until(dut.in_use == 0)

    def check_resident(ctx):
        for layer in range(2):
            ctx.set(dut.resident_layer, layer)
            expected = sum(1 << tag[1] for tag, valid in zip(model.tags, model.valid, strict=True)
                           if valid and tag[0] == layer)
            assert ctx.get(dut.resident) == expected, (layer, model.tags, model.valid)

    async def bench(ctx):
        for op in ops:
            check_resident(ctx)
            if op[0] == "load":
                _, tag, n_weights, commit = op
                evt, _, _, victim = model.cycle(load=(LoadOp.BEGIN, tag))
                victims.append(victim)
                await put(ctx, dut.load, {"op": LoadOp.BEGIN,
                                          "data": tag[0] | tag[1] << dut.tag["layer"].width})
                if evt is not None:
                    await event(ctx, evt)
                assert ctx.get(dut.loading) and ctx.get(dut.load_slot) == victim
                words = [int(v) & data_mask for v in rng.integers(0, 1 << 62, SILU_ENTRIES)]
                words += [int(v) & beat_mask for v in rng.integers(0, 1 << 62, n_weights)]
                for word in words:
                    model.cycle(load=(LoadOp.WORD, word))
                    await put(ctx, dut.load, {"op": LoadOp.WORD, "data": word})
                end = LoadOp.COMMIT if commit else LoadOp.ABORT
                evt, *_ = model.cycle(load=(end, 0))
                await put(ctx, dut.load, {"op": end, "data": 0})
                await event(ctx, evt)
            elif op[0] in ("lookup", "claim"):
                claim = op[0] == "claim"
                evt, found, contents, _ = model.cycle(lookup=op[1], claim=claim)
                await put(ctx, dut.lookup, {"tag": {"layer": op[1][0], "expert": op[1][1]},
                                            "claim": claim})
                got = await take(ctx, dut.found)
                assert (bool(got.hit), int(got.slot) if got.hit else 0) == found
                if evt is not None:
                    await event(ctx, evt)
                if contents is not None:
                    await read_out(ctx, contents)
            else:
                evt, _, contents, _ = model.cycle(read=op[1])
                await put(ctx, dut.read, op[1])
                if evt is not None:
                    await event(ctx, evt)
                    continue
                await read_out(ctx, contents)
        counters = ctx.get(dut.counters)
        assert [counters.loads, counters.hits, counters.evictions, counters.aborts,
                counters.refused] == [model.counts[k] for k in EventKind]

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    return victims


def test_lru_victims():
    """Four slots: empty slots fill lowest first; then the least recently used goes, where a
    read (or a claiming lookup's) refreshes a slot and a plain lookup does not; an aborted
    slot is refilled first; a reload of a resident tag empties its old slot; reads of empty
    slots are refused."""
    dut = ExpertSlots(ExpertFfnParams(**TINY), slots=4, layers=2, experts=8)
    model = SlotsModel(4, dut.capacity)
    ops = [("load", (0, e), 3, True) for e in range(4)]          # slots 0..3 in order
    ops += [("read", 0), ("lookup", (0, 1)), ("claim", (0, 2))]   # LRU order now 1, 3, 0, 2
    ops += [("load", (1, 5), 64, True)]                            # evicts (0, 1) from slot 1
    ops += [("lookup", (0, 1)), ("lookup", (1, 5)), ("read", 1)]
    ops += [("load", (1, 6), 2, False), ("read", 3)]               # aborted: slot 3 empty
    ops += [("load", (1, 7), 0, True)]                             # no weights: bad, aborted
    ops += [("read", 3), ("lookup", (0, 3))]
    ops += [("load", (0, 0), 5, True), ("lookup", (0, 0))]         # reload empties slot 0
    ops += [("read", 0), ("load", (0, 4), 1, True), ("lookup", (0, 4))]
    assert _run_sequential(dut, ops, model) == [0, 1, 2, 3, 1, 3, 3, 3, 0]
    assert model.valid == [True, True, True, True]


@pytest.mark.parametrize("slots", [1, 3])
def test_random_sequential(slots):
    """Random loads (committed, aborted, too short), lookups, claims and reads, one at a
    time."""
    rng = np.random.default_rng(slots)
    dut = ExpertSlots(ExpertFfnParams(**TINY), slots=slots, layers=2, experts=4)
    model = SlotsModel(slots, dut.capacity)
    ops = []
    for _ in range(30):
        tag = (int(rng.integers(2)), int(rng.integers(4)))
        kind = rng.integers(4)
        if kind == 0:
            ops.append(("load", tag, int(rng.choice([0, 1, 7, dut.capacity])),
                        bool(rng.random() < 0.8)))
        elif kind in (1, 2):
            ops.append((("lookup", "claim")[kind - 1], tag))
        else:
            ops.append(("read", int(rng.integers(1 << dut.slot_shape.width))))
    _run_sequential(dut, ops, model)
    assert sum(model.counts.values()) > 0


def test_feeds_expert_ffn():
    """The ``silu`` and ``w`` streams have the signatures of ExpertFFN's inputs, so a slot
    connects to the datapath in place of the host."""
    slots = ExpertSlots(ExpertFfnParams(**TINY), slots=2, layers=1, experts=1)
    ffn = ExpertFFN(**TINY)
    m = Module()
    m.submodules.slots, m.submodules.ffn = slots, ffn
    wiring.connect(m, slots.silu, ffn.silu)
    wiring.connect(m, slots.w, ffn.w)
    assert slots.w.signature.members["payload"].shape == ffn.params.engine.weight_beat
    Fragment.get(m, None)                                    # and the pair elaborates


def test_read_queue():
    """Two slots: a read taken while another runs is queued and follows it without a gap; a
    third read and a claiming lookup that would hit wait while one is queued; a begin waits
    while both slots are in use; the read-outs come in the order taken."""
    dut = ExpertSlots(ExpertFfnParams(**TINY), slots=2, layers=1, experts=2)
    rng = np.random.default_rng(3)
    contents = {e: [int(v) for v in rng.integers(0, 256, SILU_ENTRIES)] for e in range(2)}

    async def bench(ctx):
        for e in range(2):
            for op, word in ([(LoadOp.BEGIN, e)] + [(LoadOp.WORD, w) for w in contents[e]]
                             + [(LoadOp.WORD, 1)] + [(LoadOp.COMMIT, 0)]):
                ctx.set(dut.load.payload, {"op": op, "data": word})
                ctx.set(dut.load.valid, 1)
                await ctx.tick().until(dut.load.ready)
            ctx.set(dut.load.valid, 0)
            ctx.set(dut.event.ready, 1)
            await ctx.tick().repeat(2)
        ctx.set(dut.read.valid, 1)
        for slot in (0, 1):
            ctx.set(dut.read.payload, slot)
            assert ctx.get(dut.read.ready)
            await ctx.tick()
        assert ctx.get(dut.in_use) == 0b11
        assert not ctx.get(dut.read.ready)                  # a third read waits
        ctx.set(dut.read.valid, 0)
        ctx.set(dut.lookup.payload, {"tag": {"layer": 0, "expert": 0}, "claim": 1})
        ctx.set(dut.lookup.valid, 1)
        ctx.set(dut.load.payload, {"op": LoadOp.BEGIN, "data": 1})
        ctx.set(dut.load.valid, 1)
        assert not ctx.get(dut.lookup.ready) and not ctx.get(dut.load.ready)
        ctx.set(dut.load.valid, 0)
        ctx.set(dut.silu.ready, 1)
        ctx.set(dut.w.ready, 1)
        silu, claimed = [], False
        while len(silu) < 3 * SILU_ENTRIES:
            taken = not claimed and ctx.get(dut.lookup.ready)
            _, _, valid, value = await ctx.tick().sample(dut.silu.valid, dut.silu.payload)
            if taken:
                claimed = True
                ctx.set(dut.lookup.valid, 0)
            if valid:
                silu.append(int(value) & 0xff)
            assert claimed == (len(silu) > SILU_ENTRIES) or len(silu) == SILU_ENTRIES
        assert silu == contents[0] + contents[1] + contents[0]

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()


# A constructor that raises leaves an object Amaranth warns about as never elaborated.
@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_memory_kind_checked():
    params = ExpertFfnParams(**TINY)
    with pytest.raises(ValueError, match="memory must be one of ebr, spram, not 'bram'"):
        ExpertSlots(params, slots=2, layers=1, experts=2, memory="bram")
    # G / M = 2 beats a group cannot carry the 2 side words of two lanes' mantissas.
    coarse = ExpertFfnParams(**{**TINY, "group_size": 8})
    with pytest.raises(ValueError, match="larger than the 2 side words of the mantissas, not 2"):
        ExpertSlots(coarse, slots=2, layers=1, experts=2, memory="spram")
    # 6 slots of 3 d f / (P M) = 3 * 64 * 128 / (2 * 4) = 3072 beats exceed an SPRAM's depth.
    big = ExpertFfnParams(**{**TINY, "hidden": 64, "ffn": 128})
    with pytest.raises(ValueError, match="up to 16384, not 18432"):
        ExpertSlots(big, slots=6, layers=1, experts=2, memory="spram")
