"""The expert slots on Verilator: concurrent random traffic against the reference model, and the
overlap of a load with a read that double buffering buys.

``random_traffic`` drives loads (committed, aborted, too short, too long, cut off by a new
begin), reads of random slots and lookups at the same time, with random stalls on every input
and back-pressure on every output. A monitor feeds each cycle's transfers to
``SlotsModel`` (``test_expert_slots_blocks.py``), which predicts every victim, event, lookup
answer and read-out; a slot being read is checked never to be written. ``overlap`` times a load
into one slot while the other is read, on streams that never stall. Both run on the block-RAM
slots and on the SPRAM slots (with a behavioural model of ``SB_SPRAM256KA``).
"""

import random

import cocotb
import pytest
from amaranth.lib import data
from cocotb.triggers import ClockCycles, RisingEdge
from harness import beat, params, report, run, start, stream_sink, stream_source, sweep, transfers
from test_expert_slots_blocks import SlotsModel

from moefpga.rtl.expert_ffn_params import SILU_ENTRIES, ExpertFfnParams
from moefpga.rtl.expert_slots import EventKind, ExpertSlots, LoadOp
from moefpga.rtl.single_port_memory import SpramModel

FFN = dict(lanes=2, m=4, n=2, weight_bits=4, group_size=16, max_tokens=1, hidden=32, ffn=32)
LAYERS, EXPERTS = 2, 4
# (slots, memory of the weight beats)
CONFIGS = sweep(default=[(1, "ebr"), (2, "ebr"), (2, "spram")], full=[(4, "ebr")])


def _slots(slots, memory):
    return ExpertSlots(ExpertFfnParams(**FFN), slots=slots, layers=LAYERS, experts=EXPERTS,
                       memory=memory, spram_model=SpramModel)


@pytest.mark.parametrize(("slots", "memory"), CONFIGS, ids=[f"slots{s}_{m}" for s, m in CONFIGS])
def test_expert_slots(slots, memory, sim_report):
    dut = _slots(slots, memory)
    records = run(dut, name="expert_slots", config=f"slots{slots}_{memory}_{dut.params.name}",
                  test_module=__name__, parameters={"slots": slots, "memory": memory})
    sim_report.extend(record["text"] for record in records)
    assert {record["test"] for record in records} == {"random_traffic", "overlap"}
    overlap = next(record for record in records if record["test"] == "overlap")
    alone = overlap["read"] + overlap["load"]
    if slots == 1:
        assert overlap["together"] >= alone
    elif memory == "ebr":
        assert overlap["together"] <= max(overlap["read"], overlap["load"]) + 2
    else:       # SPRAM: a read waits in every cycle the load writes a weight word
        assert overlap["together"] < alone


class Slots:
    """The slots' streams, with ``stall`` on every input and output, and the word formats."""

    def __init__(self, dut, *, seed, stall):
        self.dut = dut
        self.hw = _slots(params()["slots"], params()["memory"])
        self.sources = {name: stream_source(dut, name, seed=seed + i, stall=stall)
                        for i, name in enumerate(["load", "read", "lookup"])}
        self.sinks = {name: stream_sink(dut, name, seed=seed + 3 + i, stall=stall)
                      for i, name in enumerate(["found", "event", "silu", "w"])}
        self.data_bits = self.hw.load_beat["data"].shape.width
        engine = self.hw.params.engine
        self.beat_bits = engine.weight_beat.size
        self.group_beats = engine.beats_per_group
        # SPRAM slots keep a beat's mantissas only on the last beat of its group.
        entry_bits = engine.weight_beat["entries"].shape.size
        self.mant_kept = ((1 << self.beat_bits) - 1 if self.hw.memory == "ebr"
                          else (1 << entry_bits) - 1)
        self.layer_bits = self.hw.tag["layer"].shape.width

    def tag_bits(self, tag):
        return tag[0] | tag[1] << self.layer_bits

    def tag_of(self, bits):
        return bits & ((1 << self.layer_bits) - 1), bits >> self.layer_bits

    def lookup_bits(self, tag, claim):
        return self.tag_bits(tag) | claim << self.hw.tag.size

    def lookup_of(self, bits):
        """``(tag, claim)`` of a lookup payload."""
        return self.tag_of(bits & ((1 << self.hw.tag.size) - 1)), bool(bits >> self.hw.tag.size)

    def send(self, name, payload):
        self.sources[name].send_nowait(beat(payload))

    def load(self, op, value=0):
        self.send("load", self.hw.load_beat.const({"op": op, "data": value}).as_bits())

    def words(self, rng, weights):
        """SiLU words with junk above bit 7, then weight beats."""
        return ([rng.getrandbits(self.data_bits) for _ in range(SILU_ENTRIES)]
                + [rng.getrandbits(self.beat_bits) for _ in range(weights)])

    def stored(self, index, word):
        """What the slot gives back for ``word``, its weight beat ``index``."""
        last = index % self.group_beats == self.group_beats - 1
        return word & ((1 << self.beat_bits) - 1 if last else self.mant_kept)

    def received(self, name):
        sink, out = self.sinks[name], []
        while not sink.empty():
            out.append(int(sink.recv_nowait().payload))
        return out

    def event(self, bits):
        view = data.Const(self.hw.event_beat, bits)
        return EventKind(view.kind), view.slot, (view.tag.layer, view.tag.expert)


class Monitor:
    """Feeds every cycle's transfers to the model and collects what the DUT must answer."""

    def __init__(self, slots, model):
        self.slots, self.model, self.dut = slots, model, slots.dut
        self.events, self.found, self.silu, self.w = [], [], [], []
        self.reading = []             # [slot, beats not yet taken] of the running, queued reads
        self.running = True
        cocotb.start_soon(self._watch())

    def _take(self, name):
        valid, ready = getattr(self.dut, f"{name}__valid"), getattr(self.dut, f"{name}__ready")
        if valid.value == 1 and ready.value == 1:
            return int(getattr(self.dut, f"{name}__payload").value)
        return None

    def _sample(self):
        """This cycle's transfers, before the clock edge."""
        dut, s = self.dut, self.slots
        in_use = int(dut.in_use.value)
        cycle = {"busy": {i for i in range(self.model.slots) if in_use >> i & 1},
                 "loading": dut.loading.value == 1, "load_slot": int(dut.load_slot.value),
                 "read": self._take("read"), "lookup": self._take("lookup"), "load": None,
                 "beats": sum(self._take(name) is not None for name in ["silu", "w"])}
        bits = int(dut.load__payload.value)
        view = data.Const(s.hw.load_beat, bits)
        op, value = LoadOp(view.op), int(view.data)
        # A begin during a load aborts it without being taken; the load then ends.
        cycle["begin_waits"] = (dut.load__valid.value == 1 and dut.load__ready.value == 0
                                and cycle["loading"] and op == LoadOp.BEGIN)
        if self._take("load") is not None:
            if op == LoadOp.BEGIN:
                value = s.tag_of(value & ((1 << s.hw.tag.size) - 1))
            cycle["load"] = (op, value)
        cycle["claim"] = False
        if cycle["lookup"] is not None:
            cycle["lookup"], cycle["claim"] = s.lookup_of(cycle["lookup"])
        offered, claim = s.lookup_of(int(dut.lookup__payload.value))
        cycle["offered"] = offered if dut.lookup__valid.value == 1 and claim else None
        return cycle

    def _apply(self, cycle, after):
        """Feed ``cycle`` to the model; ``after`` is the next cycle's sample."""
        model, s = self.model, self.slots
        load = cycle["load"]
        if load is None and cycle["begin_waits"] and not after["loading"]:
            load = (LoadOp.ABORT, 0)
        if load is not None and load[0] == LoadOp.WORD and model.load is not None:
            assert model.load[0] not in cycle["busy"], "a word was written into a slot in use"
        event, found, contents, victim = model.cycle(
            in_use=cycle["busy"], load=load, read=cycle["read"], lookup=cycle["lookup"],
            claim=cycle["claim"], offered=cycle["offered"])
        if victim is not None:
            assert after["loading"] and after["load_slot"] == victim
        for slot, _ in self.reading:
            assert slot in cycle["busy"], "a slot was released before its last beat"
        if self.reading:
            self.reading[0][1] -= cycle["beats"]
            if not self.reading[0][1]:
                self.reading.pop(0)
        if event is not None:
            self.events.append(event)
        if found is not None:
            self.found.append(found)
        if contents is not None:
            slot = cycle["read"] if cycle["read"] is not None else found[1]
            self.reading.append([slot, len(contents[0]) + len(contents[1])])
            self.silu += [word & 0xff for word in contents[0]]
            self.w += [s.stored(i, word) for i, word in enumerate(contents[1])]

    async def _watch(self):
        previous = None
        while self.running:
            await RisingEdge(self.dut.clk)
            cycle = self._sample()
            if previous is not None:
                self._apply(previous, cycle)
            previous = cycle

    def check(self):
        """Compare everything the DUT sent with what the model predicted."""
        s = self.slots
        self.running = False
        events = [s.event(bits) for bits in s.received("event")]
        assert len(events) == len(self.events)
        for got, expected in zip(events, self.events, strict=True):
            assert got[:2] == expected[:2], (got, expected)
            assert expected[2] is None or got[2] == expected[2], (got, expected)
        found = [data.Const(s.hw.found_beat, bits) for bits in s.received("found")]
        assert [(bool(f.hit), f.slot) for f in found] == self.found
        assert s.received("silu") == self.silu
        assert s.received("w") == self.w
        counters = data.Const(s.hw.counters_layout, int(s.dut.counters.value))
        assert ([counters.loads, counters.hits, counters.evictions, counters.aborts,
                 counters.refused] == [self.model.counts[k] for k in EventKind])


_TIMEOUT = dict(timeout_time=50, timeout_unit="ms")


async def _idle(dut):
    """Wait until no read and no load runs (a command taken in this cycle shows next cycle)."""
    await ClockCycles(dut.clk, 2)
    while int(dut.in_use.value) or dut.loading.value:
        await RisingEdge(dut.clk)


@cocotb.test(**_TIMEOUT)
async def random_traffic(dut):
    """Loads, reads and lookups (30 % of them claiming) at once, with 30 % stalls
    everywhere."""
    await start(dut)
    s = Slots(dut, seed=1, stall=0.3)
    cap = s.hw.capacity
    model = SlotsModel(s.hw.slots, cap)
    monitor = Monitor(s, model)
    rng = random.Random(2)
    tags = [(layer, expert) for layer in range(LAYERS) for expert in range(EXPERTS)]

    async def loader():
        for _ in range(40):
            s.load(LoadOp.BEGIN, s.tag_bits(rng.choice(tags)))
            ending = rng.choices(["commit", "abort", "short", "long", "cut"], [6, 1, 1, 1, 1])[0]
            weights = {"short": 0, "long": cap + 2}.get(ending, rng.randint(1, cap))
            for word in s.words(rng, weights):
                s.load(LoadOp.WORD, word)
            if ending != "cut":
                s.load(LoadOp.ABORT if ending == "abort" else LoadOp.COMMIT)
            await s.sources["load"].wait()
            await ClockCycles(dut.clk, rng.randint(1, 1000))     # lets one slot be read
        s.load(LoadOp.COMMIT)                      # ends a load the last "cut" may have left
        s.load(LoadOp.WORD, 0)                     # outside a load: discarded
        await s.sources["load"].wait()

    async def requests(name, count, gap, payload):
        for _ in range(count):
            await ClockCycles(dut.clk, rng.randint(1, gap))
            s.send(name, payload())
            await s.sources[name].wait()

    tasks = [cocotb.start_soon(loader()),
             cocotb.start_soon(requests("read", 50, 600,
                                        lambda: rng.randrange(1 << s.hw.slot_shape.width))),
             cocotb.start_soon(requests("lookup", 200, 150, lambda: s.lookup_bits(
                 rng.choice(tags), rng.random() < 0.3)))]
    for task in tasks:
        await task
    await _idle(dut)
    await ClockCycles(dut.clk, 20)
    monitor.check()
    counts = {kind.name.lower(): n for kind, n in model.counts.items()}
    report(f"random traffic, {model.slots} slot(s): {len(monitor.silu) // SILU_ENTRIES} reads, "
           f"{len(monitor.found)} lookups, events {counts}, all equal to the model",
           test="random_traffic")


@cocotb.test(**_TIMEOUT)
async def overlap(dut):
    """On streams that never stall: a full-size read alone, a full-size load alone, then a
    read of one resident expert and a load of another started in the same cycle."""
    await start(dut)
    s = Slots(dut, seed=3, stall=0)
    rng = random.Random(4)
    loads, reads = transfers(dut, "load"), transfers(dut, "read")
    silu, w = transfers(dut, "silu"), transfers(dut, "w")

    async def load(tag):
        s.load(LoadOp.BEGIN, s.tag_bits(tag))
        for word in s.words(rng, s.hw.capacity):
            s.load(LoadOp.WORD, word)
        s.load(LoadOp.COMMIT)
        await s.sources["load"].wait()

    async def settle():
        await s.sources["read"].wait()
        await _idle(dut)

    await load((0, 0))
    await settle()
    load_alone = loads[-1] - loads[-(SILU_ENTRIES + s.hw.capacity + 2)] + 1
    s.send("read", 0)
    await settle()
    read_alone = max(silu[-1], w[-1]) - reads[-1] + 1
    s.send("read", 0)
    await load((1, 1))
    await settle()
    together = max(silu[-1], w[-1], loads[-1]) - reads[-1] + 1
    slots = s.hw.slots
    report(f"{slots} slot(s), {s.hw.capacity} weight beats: read alone {read_alone} cycles, "
           f"load alone {load_alone}, both at once {together} "
           f"({'overlapped' if together < read_alone + load_alone else 'serialized'})",
           test="overlap", read=read_alone, load=load_alone, together=together)
