"""The board-independent top: the host link (rtl/link.py) in front of one MoE layer
(rtl/moe_layer.py). ``boards/`` wraps it with a board's clock, reset and UART pins.

docs/link.md ("Board top") gives the message payloads and what each does.
"""

from amaranth import Cat, Module, ResetInserter, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..host.link import LINK_VERSION, MAX_PAYLOAD, Identity, Type
from .expert_stream import VERSION
from .link import Link, MessageByte, SendByte
from .moe_layer import MoeLayer
from .requant import Multiplier

__all__ = ["BoardTop", "ROUTER_HEADER_BYTES"]

#: ROUTER's payload starts with router_mult (3), gate_mult (3), normalize (1), layer (2).
ROUTER_HEADER_BYTES = 9


class _Device(wiring.Component):
    """The MoE layer with its ports turned into link messages: takes :data:`MessageByte` beats
    on ``o`` and sends :data:`SendByte` beats on ``i`` (the link's names). ``reset`` asks for a
    reset of this whole component (a RESET message)."""

    def __init__(self, layer):
        self.layer = layer
        super().__init__({
            "o":     In(stream.Signature(MessageByte)),
            "i":     Out(stream.Signature(SendByte)),
            "reset": Out(1),
        })

    def _gather(self, m, port, nbytes, take, last):
        """Bytes of ``take`` beats into ``port``'s ``tdata`` (``nbytes`` little-endian bytes a
        beat); the final byte passes straight through. A message ending inside a beat ends it,
        padded with zeros. Returns the ready of the current byte."""
        held = Signal(8 * (nbytes - 1))
        index = Signal(range(nbytes))
        o = self.o
        final = (index == nbytes - 1) | last
        ready = Signal()
        with m.If(take & final):
            m.d.comb += [port.tvalid.eq(1),
                         port.tdata.eq(held | (o.payload.data << (index * 8))),
                         ready.eq(port.tready)]
            if hasattr(port, "tlast"):
                m.d.comb += port.tlast.eq(last)
            with m.If(port.tready):
                m.d.sync += [index.eq(0), held.eq(0)]
        with m.Elif(take):
            m.d.comb += ready.eq(1)
            for k in range(nbytes - 1):
                with m.If(index == k):
                    m.d.sync += held.word_select(k, 8).eq(o.payload.data)
            m.d.sync += index.eq(index + 1)
        return ready

    def elaborate(self, platform):
        m = Module()
        m.submodules.layer = layer = self.layer
        o, i = self.o, self.i
        kind, byte, last = o.payload.type, o.payload.data, o.payload.last
        data_beat = o.valid & ~o.payload.empty

        def of(*types):
            return Cat(kind == int(t) for t in types).any()

        # LOAD EXPERT, PREFETCH EXPERT: the record, byte for byte, into the loader.
        expert = of(Type.LOAD_EXPERT, Type.PREFETCH_EXPERT)
        m.d.comb += [layer.s_expert.tdata.eq(byte), layer.s_expert.tlast.eq(last),
                     layer.s_expert.tvalid.eq(data_beat & expert)]

        # RUN TOKENS: three bytes a token beat.
        tokens_ready = self._gather(m, layer.s_tokens, 3, data_beat & of(Type.RUN_TOKENS), last)

        # ROUTER: the multipliers, normalize and layer into registers, then int16 weights.
        config = Signal(8 * ROUTER_HEADER_BYTES)
        count = Signal(range(ROUTER_HEADER_BYTES + 1))
        router = data_beat & of(Type.ROUTER)
        in_header = count < ROUTER_HEADER_BYTES
        weights_ready = self._gather(m, layer.s_router, 2, router & ~in_header, last)
        with m.If(router & in_header):
            m.d.sync += count.eq(count + 1)
            for k in range(ROUTER_HEADER_BYTES):
                with m.If(count == k):
                    m.d.sync += config.word_select(k, 8).eq(byte)
        with m.If(router & last & (in_header | weights_ready)):
            m.d.sync += count.eq(0)
        mult = Multiplier.as_shape().size
        m.d.comb += [layer.router_mult.eq(config[:mult]), layer.normalize.eq(config[48]),
                     layer.layer.eq(config[56:72])]
        if "gate_mult" in layer.signature.members:
            m.d.comb += layer.gate_mult.eq(config[24:24 + mult])

        # READ COUNTERS: a snapshot, sent as COUNTERS.
        counters = Signal(layer.counters_layout.size)
        asked = Signal()
        read = o.valid & of(Type.READ_COUNTERS)
        with m.If(read & ~asked):
            m.d.sync += [counters.eq(layer.counters.as_value()), asked.eq(1)]

        m.d.comb += [
            o.ready.eq(Cat(
                expert & (o.payload.empty | layer.s_expert.tready),
                of(Type.RUN_TOKENS) & (o.payload.empty | tokens_ready),
                of(Type.ROUTER) & (o.payload.empty | in_header | weights_ready),
                of(Type.READ_COUNTERS) & ~asked,
                of(Type.RESET),
            ).any()),
            self.reset.eq(o.valid & of(Type.RESET)),
        ]

        # Messages out, one at a time: REQUEST, COUNTERS, RESULTS (a flags byte, then data).
        request, result = layer.m_request, layer.m_result
        result_bytes = len(result.tdata) // 8
        index = Signal(range(max(4, result_bytes, len(counters) // 8)))
        flagged = Signal()
        owner = Signal(range(4))        # 0 none, 1 REQUEST, 2 COUNTERS, 3 RESULTS
        with m.If(owner == 0):
            with m.If(request.tvalid):
                m.d.sync += owner.eq(1)
            with m.Elif(asked):
                m.d.sync += owner.eq(2)
            with m.Elif(result.tvalid):
                m.d.sync += owner.eq(3)
        moved = i.valid & i.ready
        with m.If(moved):
            m.d.sync += index.eq(index + 1)
            with m.If(i.payload.last):
                m.d.sync += owner.eq(0)
        with m.Switch(owner):
            with m.Case(1):
                m.d.comb += [i.valid.eq(1), i.payload.type.eq(int(Type.REQUEST)),
                             i.payload.data.eq(request.tdata.word_select(index[:2], 8)),
                             i.payload.last.eq(index == 3),
                             request.tready.eq(moved & (index == 3))]
                with m.If(moved & (index == 3)):
                    m.d.sync += index.eq(0)
            with m.Case(2):
                end = len(counters) // 8 - 1
                m.d.comb += [i.valid.eq(1), i.payload.type.eq(int(Type.COUNTERS)),
                             i.payload.data.eq(counters.word_select(index, 8)),
                             i.payload.last.eq(index == end)]
                with m.If(moved & (index == end)):
                    m.d.sync += [index.eq(0), asked.eq(0)]
            with m.Case(3):
                m.d.comb += [i.valid.eq(result.tvalid), i.payload.type.eq(int(Type.RESULTS))]
                with m.If(~flagged):
                    m.d.comb += i.payload.data.eq(result.tuser)
                    with m.If(moved):
                        m.d.sync += [flagged.eq(1), index.eq(0)]
                with m.Else():
                    beat_end = index == result_bytes - 1
                    m.d.comb += [i.payload.data.eq(result.tdata.word_select(index, 8)),
                                 i.payload.last.eq(beat_end & result.tlast),
                                 result.tready.eq(moved & beat_end)]
                    with m.If(moved & beat_end):
                        m.d.sync += index.eq(0)
                        with m.If(result.tlast):
                            m.d.sync += flagged.eq(0)
        return m


class BoardTop(wiring.Component):
    """One MoE layer (:class:`.moe_layer.MoeLayer`, same parameters) behind the host link
    (:class:`.link.Link` at ``divisor`` cycles a bit), for a board clocked at ``clock_hz``.

    IDENTIFY reports the parameters (:attr:`identity`). A HELLO or a RESET message resets the
    layer and the message adapters around it (the slots are emptied, the counters cleared).
    ``load_timeout`` goes to the layer's port of that name (cycles to wait for a requested
    record; 0 waits forever). ``fmax_khz`` is reported in IDENTIFY as the clock place and route
    achieved (0: unknown, as in a simulation; a board build synthesizes 0 and writes the measured
    value into the IDENTIFY ROM of the finished bitstream, ``boards.build.patch_identity``).
    ``slot_memory`` and ``spram_model`` go to the
    layer (where its slots keep weight beats; the SPRAM model a simulation builds instead of the
    primitive).

    Members
    -------
    rx : In(1)
    tx : Out(1)
        The UART lines.
    busy : Out(1)
        The layer's ``busy`` (for a LED).
    gave_up : Out(1)
        The link stopped resending a frame (the host is gone).
    """
    rx:      In(1, init=1)
    tx:      Out(1, init=1)
    busy:    Out(1)
    gave_up: Out(1)

    def __init__(self, params, *, hidden, experts, top_k, slots, shared=True, shared_gate=True,
                 layers=1, macs=1, divisor, clock_hz, ack_timeout, retries=8, load_timeout=0,
                 max_payload=MAX_PAYLOAD, fmax_khz=0, slot_memory="ebr", spram_model=None):
        self.layer = MoeLayer(params, hidden=hidden, experts=experts, top_k=top_k,
                              slots=slots, shared=shared, shared_gate=shared_gate,
                              layers=layers, macs=macs, slot_memory=slot_memory,
                              spram_model=spram_model)
        e = params.engine
        self.identity = Identity(
            link_version=LINK_VERSION, record_version=VERSION, lanes=params.lanes, m=e.m,
            n=e.n, weight_bits=e.weight_bits, group_size=params.group_size, hidden=hidden,
            ffn=params.ffn, experts=experts, top_k=top_k,
            shared=0 if not shared else 2 if shared_gate else 1, slots=slots, layers=layers,
            max_tokens=params.max_tokens, clock_hz=clock_hz, max_payload=max_payload,
            fmax_khz=fmax_khz)
        self.link = Link(divisor=divisor, identity=self.identity.to_bytes(),
                         ack_timeout=ack_timeout, retries=retries, max_payload=max_payload)
        self.load_timeout = load_timeout
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        link, layer = self.link, self.layer
        device = _Device(layer)
        # The reset reaches every flip-flop of the layer, so it comes from a register (the
        # cycle after the HELLO or RESET), and the device takes no byte while it is pending.
        reset = Signal()
        m.submodules.link = link
        m.submodules.device = ResetInserter(reset)(device)
        m.d.sync += reset.eq(link.hello | device.reset)
        m.d.comb += [link.rx.eq(self.rx), self.tx.eq(link.tx),
                     self.busy.eq(layer.busy), self.gave_up.eq(link.gave_up)]
        if "load_timeout" in layer.signature.members:
            m.d.comb += layer.load_timeout.eq(self.load_timeout)
        m.d.comb += [device.o.valid.eq(link.o.valid & ~reset),
                     device.o.payload.eq(link.o.payload),
                     link.o.ready.eq(device.o.ready & ~reset)]
        wiring.connect(m, device.i, link.i)
        return m
