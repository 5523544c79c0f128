"""A memory with one address for reads and writes, the shape iCE40 SPRAM takes.

iCE40 UP5K SPRAM (SB_SPRAM256KA, 16K words of 16 bits, four of them) has a single port: one
address per cycle, shared by reading and writing. A memory with a read address and a separate
write address (as a loader writing one slot while the FFN reads another) can never map to it.
:class:`SinglePortMemory` puts the arbitration in front of one address: writes win, reads wait.

Yosys does not infer SPRAM from an Amaranth 0.5 ``Memory`` even with one shared address:
Amaranth always emits the memory's initial contents (zeros), and SPRAM cannot be initialized,
so ``memory_libmap`` only offers block RAM. With ``spram=True`` the memory is therefore built
from ``SB_SPRAM256KA`` instances directly (one per 16 bits of width). docs/boards.md has the
measurements.
"""

from amaranth import Cat, ClockSignal, Module, Mux, Shape, Signal, Value
from amaranth.hdl import Instance
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

__all__ = ["SinglePortMemory", "SPRAM_DEPTH", "SPRAM_WIDTH", "SpramModel"]

#: Words and bits of one SB_SPRAM256KA.
SPRAM_DEPTH, SPRAM_WIDTH = 16384, 16


class SpramModel(wiring.Component):
    """The behaviour of one SB_SPRAM256KA with CHIPSELECT, POWEROFF high and STANDBY, SLEEP
    low, as Yosys's ``cells_sim.v`` models it: ``cs & ~wren`` reads ``address`` into
    ``dataout``; ``cs & wren`` writes the nibbles selected by ``maskwren`` and leaves
    ``dataout`` undefined (here: changed to ``~dataout``, so a user that relies on it fails);
    without ``cs`` nothing changes. For simulation only."""

    address:  In(14)
    datain:   In(SPRAM_WIDTH)
    maskwren: In(4)
    wren:     In(1)
    cs:       In(1)
    dataout:  Out(SPRAM_WIDTH)

    def elaborate(self, platform):
        m = Module()
        m.submodules.mem = mem = Memory(shape=SPRAM_WIDTH, depth=SPRAM_DEPTH, init=[])
        write, read = mem.write_port(granularity=4), mem.read_port(domain="comb")
        m.d.comb += [write.addr.eq(self.address), read.addr.eq(self.address),
                     write.data.eq(self.datain)]
        with m.If(self.cs & self.wren):
            m.d.comb += write.en.eq(self.maskwren)
            m.d.sync += self.dataout.eq(~self.dataout)
        with m.Elif(self.cs):
            m.d.sync += self.dataout.eq(read.data)
        return m


class SinglePortMemory(wiring.Component):
    """``depth`` words of ``shape`` behind one address shared by a write and a read requester.

    A write (``w_en``) is always taken, at the clock edge that ends its cycle. A read request
    (``r_en`` with ``r_addr``) is accepted in a cycle without a write (``r_ready`` is
    ``~w_en``); the word appears on ``r_data`` in the next cycle and stays there until the next
    accepted read. Reads and writes of one address take effect in the order of their cycles.

    Parameters
    ----------
    shape : ShapeLike
        Shape of a word.
    depth : int
        Number of words; at most :data:`SPRAM_DEPTH` with ``spram``.
    spram : bool
        Build from ``SB_SPRAM256KA`` instances (iCE40 UP5K), ``ceil(width / 16)`` of them, with
        a register that holds ``r_data`` while a write runs (SPRAM's output is undefined after
        a write). Otherwise an Amaranth ``Memory`` (block RAM or LUT RAM).
    spram_model : type or None
        With ``spram``, a component with :class:`SpramModel`'s members to use instead of the
        primitive; for simulation.

    Members
    -------
    w_en : In(1)
    w_addr : In(range(depth))
    w_data : In(shape)
    r_en : In(1)
    r_addr : In(range(depth))
    r_ready : Out(1)
        The read request is accepted in this cycle.
    r_data : Out(shape)
    """

    def __init__(self, shape, depth, *, spram=False, spram_model=None):
        if not isinstance(depth, int) or depth <= 0:
            raise TypeError(f"depth must be a positive integer, not {depth!r}")
        if spram and depth > SPRAM_DEPTH:
            raise ValueError(f"an SPRAM holds {SPRAM_DEPTH} words, not {depth}")
        self.shape = shape
        self.depth = depth
        self.spram = spram
        self.spram_model = spram_model
        super().__init__({
            "w_en":    In(1),
            "w_addr":  In(range(depth)),
            "w_data":  In(shape),
            "r_en":    In(1),
            "r_addr":  In(range(depth)),
            "r_ready": Out(1),
            "r_data":  Out(shape),
        })

    def _spram(self, m, address, read):
        """The SPRAM tiles; returns their concatenated outputs, valid after a read."""
        width = Shape.cast(self.shape).width
        w_data = Value.cast(self.w_data)
        outputs = []
        for tile in range(-(-width // SPRAM_WIDTH)):
            data = w_data[tile * SPRAM_WIDTH:(tile + 1) * SPRAM_WIDTH]
            out = Signal(SPRAM_WIDTH, name=f"spram{tile}_out")
            cs = self.w_en | read
            if self.spram_model is not None:
                m.submodules[f"spram{tile}"] = model = self.spram_model()
                m.d.comb += [model.address.eq(address), model.datain.eq(data),
                             model.maskwren.eq(0b1111), model.wren.eq(self.w_en),
                             model.cs.eq(cs), out.eq(model.dataout)]
            else:
                m.submodules[f"spram{tile}"] = Instance(
                    "SB_SPRAM256KA", i_ADDRESS=address, i_DATAIN=data, i_MASKWREN=0b1111,
                    i_WREN=self.w_en, i_CHIPSELECT=cs, i_CLOCK=ClockSignal("sync"),
                    i_STANDBY=0, i_SLEEP=0, i_POWEROFF=1, o_DATAOUT=out)
            outputs.append(out)
        return Cat(*outputs)[:width]

    def elaborate(self, platform):
        m = Module()
        address = Mux(self.w_en, self.w_addr, self.r_addr)
        read = Signal()
        m.d.comb += [read.eq(self.r_en & ~self.w_en), self.r_ready.eq(~self.w_en)]
        if self.spram:
            fresh, held = Signal(), Signal(self.r_data.shape())
            data = self._spram(m, address, read)
            m.d.sync += fresh.eq(read)
            with m.If(fresh):
                m.d.sync += held.eq(data)
            m.d.comb += self.r_data.eq(Mux(fresh, data, held))
        else:
            m.submodules.mem = mem = Memory(shape=self.shape, depth=self.depth, init=[])
            write, port = mem.write_port(), mem.read_port()
            m.d.comb += [
                write.addr.eq(address), write.data.eq(self.w_data), write.en.eq(self.w_en),
                port.addr.eq(address), port.en.eq(read), self.r_data.eq(port.data),
            ]
        return m
