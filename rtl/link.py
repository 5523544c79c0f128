"""The device side of the host link (docs/link.md): frames over a UART, checked, acknowledged,
and handed on as messages.

:class:`FrameRx` buffers each decoded frame, checks its length and CRC-32, answers with ACK or
NAK and hands the payload of each new frame on; :class:`FrameTx` sends messages as frames,
keeps each until it is acknowledged and sends it again on a NAK or a timeout, and sends the
receiver's ACKs and NAKs; :class:`Link` joins them to :class:`.uart.UartRx` /
:class:`.uart.UartTx` through :class:`.cobs.CobsDecoder` / :class:`.cobs.CobsEncoder` and
answers HELLO with IDENTIFY. The protocol constants come from ``host.link``, the reference.
"""

import hashlib

from amaranth import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..host.link import CRC_BYTES, HEADER_BYTES, MAX_PAYLOAD, Type
from .cobs import CobsDecoder, CobsEncoder, DecodedByte, FrameByte
from .crc32 import CRC32
from .expert_stream import CRC_RESIDUE
from .uart import UartRx, UartTx

__all__ = ["MessageByte", "SendByte", "Control", "LINK_STATS", "FrameRx", "FrameTx", "Link",
           "DEVICE_TYPES", "IDENTITY_ROM_DEPTH", "identity_rom"]

#: A byte of a received message on :attr:`FrameRx.o`: the message ``type``, the byte, ``last``
#: on the message's last byte (the last of a frame without ``MORE``), ``empty`` on the single
#: beat of a message without payload (``data`` 0).
MessageByte = data.StructLayout({"type": unsigned(7), "data": unsigned(8), "last": 1,
                                 "empty": 1})

#: A byte of a message to send on :attr:`FrameTx.i`; every message has at least one byte.
SendByte = data.StructLayout({"type": unsigned(7), "data": unsigned(8), "last": 1})

#: An ACK (``nak`` = 0) or NAK of sequence number ``seq``.
Control = data.StructLayout({"nak": 1, "seq": unsigned(8)})

#: The message types a device takes (HELLO is the link's own).
DEVICE_TYPES = (Type.LOAD_EXPERT, Type.PREFETCH_EXPERT, Type.ROUTER, Type.RUN_TOKENS,
                Type.READ_COUNTERS, Type.RESET)

_ACK, _NAK, _HELLO = (Const(int(t), 8) for t in (Type.ACK, Type.NAK, Type.HELLO))

_STATS = data.StructLayout({"bad": unsigned(16), "busy": unsigned(16),
                            "duplicates": unsigned(16), "unknown": unsigned(16)})

#: :attr:`Link.stats`: the receiver's counters, then frames resent, UART framing errors and
#: overruns; 16 bits each, wrapping.
LINK_STATS = data.StructLayout({**{name: unsigned(16) for name in _STATS.members},
                                "resent": unsigned(16), "framing": unsigned(16),
                                "overrun": unsigned(16)})


#: Bytes of the IDENTIFY ROM: 512 x 8 bits is one SB_RAM40_4K on iCE40 and fits one DP16KD on
#: ECP5, and is a whole number of the bit slices the bitstream patchers (icebram: 256 words,
#: ecpbram: 512 words) look for.
IDENTITY_ROM_DEPTH = 512


def identity_rom(identity):
    """The contents of :class:`Link`'s IDENTIFY ROM for the IDENTIFY payload ``identity``:
    its bytes, then a fill up to :data:`IDENTITY_ROM_DEPTH` bytes that is the same for every
    identity (SHAKE-256 of a fixed string). The fill makes every bit column of the ROM
    pseudo-random, so synthesis keeps the memory whole (no constant bit is optimized away) and
    a bitstream patcher finds these contents in exactly one block RAM; a build replaces them
    with those of another identity of the same length (boards/build.py puts the achieved
    Fmax in).
    """
    identity = bytes(identity)
    if not 1 <= len(identity) <= IDENTITY_ROM_DEPTH:
        raise ValueError(f"identity must have 1..{IDENTITY_ROM_DEPTH} bytes, not "
                         f"{len(identity)}")
    fill = hashlib.shake_256(b"moefpga IDENTIFY ROM").digest(IDENTITY_ROM_DEPTH)
    return list(identity + fill[len(identity):])


def _check_payload(max_payload):
    if not isinstance(max_payload, int) or not 1 <= max_payload <= MAX_PAYLOAD:
        raise ValueError(f"max_payload must be an integer 1..{MAX_PAYLOAD}, not {max_payload!r}")


class FrameRx(wiring.Component):
    """Receives frames from a :class:`.cobs.CobsDecoder`, checks them and hands on their
    messages (docs/link.md, "Reliability", is the contract; this is the device's receiver).

    ``i`` is always ready. The frame's payload goes into a memory of ``max_payload`` bytes
    (the CRC's bytes after it too, where they fit) while a CRC-32 runs over the whole frame.
    At the frame's end it is *good* if its COBS was intact, it has at least 8 bytes, no more
    than ``max_payload + 8``, its length field equals its size less 8, and its CRC holds.
    Then, in this order:

    - not good: dropped, a NAK of the expected ``seq`` on ``reply``, ``stats.bad`` counted;
    - ACK or NAK: on ``peer`` for the transmitter;
    - HELLO: ``hello`` for a cycle, any delivery dropped (``o.valid`` falls: the consumer is
      reset with it), the expected ``seq`` becomes its ``seq + 1``, an ACK on ``reply``;
    - while the previous frame is still being handed on (not yet acknowledged), or if its
      payload arrived partly while it was: dropped without an answer, counted (``busy``); a
      stop-and-wait peer only sends the frame being handed on again, and gets its ACK when
      it is through;
    - ``seq`` not the expected one: a duplicate, ACKed again and dropped (``duplicates``);
    - a type not in ``types``: ACKed, dropped, counted (``unknown``), the ``seq`` advances;
    - else it is taken: the ``seq`` advances and its payload goes out on ``o`` (one
      :data:`MessageByte` a byte, or one ``empty`` beat); after its last beat, an ACK of its
      ``seq`` on ``reply``. Nothing of a frame leaves before its CRC is checked.

    Members
    -------
    i : In(stream.Signature(DecodedByte))
    o : Out(stream.Signature(MessageByte))
    reply : Out(stream.Signature(Control))
        ACKs and NAKs to send; one from the end of a delivery and one from a judged frame may
        wait at once (the delivery's first); a newer one of the same source replaces the
        older.
    peer : Out(stream.Signature(Control))
        ACKs and NAKs received, ``valid`` for one cycle; ``ready`` is ignored.
    hello : Out(1)
        A HELLO was taken (one cycle).
    stats : Out(StructLayout({"bad", "busy", "duplicates", "unknown"}))
        16-bit counters of dropped frames, wrapping.
    """

    def __init__(self, *, max_payload=MAX_PAYLOAD, types=DEVICE_TYPES):
        _check_payload(max_payload)
        self.max_payload = max_payload
        self.types = tuple(int(t) for t in types)
        super().__init__({
            "i":     In(stream.Signature(DecodedByte)),
            "o":     Out(stream.Signature(MessageByte)),
            "reply": Out(stream.Signature(Control)),
            "peer":  Out(stream.Signature(Control)),
            "hello": Out(1),
            "stats": Out(_STATS),
        })

    def elaborate(self, platform):
        m = Module()
        limit = self.max_payload + HEADER_BYTES + CRC_BYTES
        m.submodules.crc = crc = CRC32()
        m.submodules.buffer = buffer = Memory(shape=8, depth=self.max_payload, init=[])
        wr, rd = buffer.write_port(), buffer.read_port()

        # Reception.
        count = Signal(range(limit + 1))
        overflow = Signal()
        clash = Signal()                    # payload bytes came while a delivery ran
        header = Signal(8 * HEADER_BYTES)
        kind, more = header[:7], header[7]
        seq, length = header[8:16], header[16:32]
        delivering = Signal()
        beat = self.i.payload
        byte_in = self.i.valid & ~beat.end
        m.d.comb += [self.i.ready.eq(1),
                     crc.i.valid.eq(byte_in), crc.i.payload.eq(beat.data),
                     crc.clear.eq(count == 0),
                     wr.addr.eq(count - HEADER_BYTES), wr.data.eq(beat.data),
                     wr.en.eq(byte_in & (count >= HEADER_BYTES) & ~delivering
                              & (count < HEADER_BYTES + self.max_payload))]
        with m.If(byte_in):
            with m.Switch(count):
                for k in range(HEADER_BYTES):
                    with m.Case(k):
                        m.d.sync += header.word_select(k, 8).eq(beat.data)
            with m.If(count == limit):
                m.d.sync += overflow.eq(1)
            with m.Else():
                m.d.sync += count.eq(count + 1)
            with m.If((count >= HEADER_BYTES) & delivering):
                m.d.sync += clash.eq(1)
        frame_end = self.i.valid & beat.end
        with m.If(frame_end):
            m.d.sync += [count.eq(0), overflow.eq(0), clash.eq(0)]

        # Judgement at the frame's end.
        expect = Signal(8)
        good = (beat.ok & ~overflow & (count >= HEADER_BYTES + CRC_BYTES)
                & (length == count - HEADER_BYTES - CRC_BYTES) & (crc.crc == CRC_RESIDUE))
        known = Cat(kind == t for t in self.types).any()
        decided = Signal(Control)           # the judgement's ACK or NAK, waiting
        decided_valid = Signal()
        acked = Signal(Control)             # the delivery's ACK, waiting
        acked_valid = Signal()

        answering = Signal()

        def answer(nak, number):
            m.d.comb += answering.eq(1)
            m.d.sync += [decided_valid.eq(1), decided.nak.eq(nak), decided.seq.eq(number)]

        def count_up(name):
            m.d.sync += self.stats[name].eq(self.stats[name] + 1)

        d_type, d_more, d_seq = Signal(7), Signal(), Signal(8)
        d_length = Signal(range(self.max_payload + 1))
        index = Signal(range(self.max_payload))
        start = Signal()
        with m.If(frame_end):
            with m.If(~good):
                answer(1, expect)
                count_up("bad")
            with m.Elif((kind == _ACK[:7]) | (kind == _NAK[:7])):
                m.d.comb += [self.peer.valid.eq(1), self.peer.payload.nak.eq(kind == _NAK[:7]),
                             self.peer.payload.seq.eq(seq)]
            with m.Elif(kind == _HELLO[:7]):
                m.d.comb += self.hello.eq(1)
                m.d.sync += [delivering.eq(0), expect.eq(seq + 1), acked_valid.eq(0)]
                answer(0, seq)
            with m.Elif(delivering | (clash & (length != 0))):
                count_up("busy")
            with m.Elif(seq != expect):
                answer(0, seq)
                count_up("duplicates")
            with m.Elif(~known):
                m.d.sync += expect.eq(seq + 1)
                answer(0, seq)
                count_up("unknown")
            with m.Else():
                m.d.comb += start.eq(1)
                m.d.sync += [expect.eq(seq + 1), delivering.eq(1), d_type.eq(kind),
                             d_more.eq(more), d_seq.eq(seq), d_length.eq(length)]

        # Delivery from the buffer; ``rd`` reads the byte at ``index`` one cycle ahead.
        o = self.o
        empty = d_length == 0
        end_of_frame = empty | (index == d_length - 1)
        moved = o.valid & o.ready
        next_index = Signal.like(index)
        m.d.comb += [
            o.valid.eq(delivering),
            o.payload.type.eq(d_type), o.payload.data.eq(Mux(empty, 0, rd.data)),
            o.payload.last.eq(end_of_frame & ~d_more), o.payload.empty.eq(empty),
            next_index.eq(Mux(start, 0, Mux(moved, index + 1, index))),
            rd.addr.eq(next_index),
        ]
        m.d.sync += index.eq(next_index)
        with m.If(moved & end_of_frame & ~(frame_end & good & (kind == _HELLO[:7]))):
            m.d.sync += [delivering.eq(0), acked_valid.eq(1), acked.nak.eq(0),
                         acked.seq.eq(d_seq)]

        # The waiting answers, the delivery's first.
        r = self.reply
        m.d.comb += [r.valid.eq(acked_valid | decided_valid),
                     r.payload.eq(Mux(acked_valid, acked, decided))]
        with m.If(r.ready):
            with m.If(acked_valid):
                m.d.sync += acked_valid.eq(0)
            with m.Elif(~answering):
                m.d.sync += decided_valid.eq(0)
        return m


class FrameTx(wiring.Component):
    """Sends messages as frames to a :class:`.cobs.CobsEncoder`, stop-and-wait, and the
    receiver's ACKs and NAKs (docs/link.md, "Reliability"; this is the device's sender).

    A message from ``i`` fills the frame buffer (``max_payload`` bytes); a full buffer before
    the message's ``last`` becomes a frame with ``MORE``. The frame is sent with the next
    sequence number and kept: an ACK of that number on ``peer`` frees the buffer for the next
    frame (``i`` is not ready until then); a NAK of it, or ``ack_timeout`` cycles after its
    last byte went to ``o`` without an ACK, sends it again. After ``retries`` such resends it
    stops sending (``gave_up``) but still takes an ACK. ``reply`` frames (ACK/NAK, 8 bytes) go
    first whenever no frame is being sent. ``restart`` (a HELLO) drops the frame and the
    message being gathered and restarts the sequence at 0, once the frame on ``o`` is
    finished.

    Members
    -------
    i : In(stream.Signature(SendByte))
    reply : In(stream.Signature(Control))
    peer : In(stream.Signature(Control))
        Always ready.
    restart : In(1)
    o : Out(stream.Signature(FrameByte))
    gave_up : Out(1)
    resent : Out(16)
        Frames sent again (wrapping).
    """

    def __init__(self, *, max_payload=MAX_PAYLOAD, ack_timeout, retries=8):
        _check_payload(max_payload)
        for name, value in [("ack_timeout", ack_timeout), ("retries", retries)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        self.max_payload, self.ack_timeout, self.retries = max_payload, ack_timeout, retries
        super().__init__({
            "i":       In(stream.Signature(SendByte)),
            "reply":   In(stream.Signature(Control)),
            "peer":    In(stream.Signature(Control)),
            "restart": In(1),
            "o":       Out(stream.Signature(FrameByte)),
            "gave_up": Out(1),
            "resent":  Out(16),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.crc = crc = CRC32()
        m.submodules.buffer = buffer = Memory(shape=8, depth=self.max_payload, init=[])
        wr, rd = buffer.write_port(), buffer.read_port()

        # The frame buffer: FILL -> DUE (to send) -> SENT (awaiting the ACK) -> FILL.
        f_type, f_more = Signal(7), Signal()
        f_length = Signal(range(self.max_payload + 1))
        seq = Signal(8)
        tries = Signal(range(self.retries + 1))
        timer = Signal(range(self.ack_timeout + 1))
        restarting = Signal()
        filling, due, sent = Signal(init=1), Signal(), Signal()
        timing = Signal()                   # the frame has left; the timer runs
        sending_data = Signal()             # the serializer reads the buffer

        i = self.i
        m.d.comb += [i.ready.eq(filling & ~sending_data & ~restarting & ~self.restart),
                     wr.addr.eq(f_length), wr.data.eq(i.payload.data)]
        with m.If(i.valid & i.ready):
            m.d.comb += wr.en.eq(1)
            m.d.sync += [f_length.eq(f_length + 1), f_type.eq(i.payload.type)]
            with m.If(i.payload.last | (f_length == self.max_payload - 1)):
                m.d.sync += [f_more.eq(~i.payload.last), filling.eq(0), due.eq(1)]

        peer = self.peer.payload
        m.d.comb += self.peer.ready.eq(1)
        for_us = self.peer.valid & (peer.seq == seq) & (due | sent) & ~filling
        with m.If(for_us & ~peer.nak & (sent | (tries != 0))):
            m.d.sync += [filling.eq(1), due.eq(0), sent.eq(0), timing.eq(0), tries.eq(0),
                         f_length.eq(0), seq.eq(seq + 1), self.gave_up.eq(0)]
        with m.Elif(sent & ((for_us & peer.nak) | (timing & (timer == 0)))):
            m.d.sync += timing.eq(0)
            with m.If(tries == self.retries):
                m.d.sync += self.gave_up.eq(1)
            with m.Else():
                m.d.sync += [sent.eq(0), due.eq(1), tries.eq(tries + 1),
                             self.resent.eq(self.resent + 1)]
        with m.Elif(timing):
            m.d.sync += timer.eq(timer - 1)

        # The serializer: header, payload (from the buffer or none), CRC.
        s_header = Signal(8 * HEADER_BYTES)
        s_length = Signal.like(f_length)
        position = Signal(range(HEADER_BYTES + self.max_payload + CRC_BYTES))
        o = self.o
        moved = o.valid & o.ready
        crc_at = HEADER_BYTES + s_length
        in_crc = position >= crc_at
        next_position = Signal.like(position)
        m.d.comb += [next_position.eq(Mux(moved, position + 1, position)),
                     rd.addr.eq(next_position - HEADER_BYTES)]
        m.d.sync += position.eq(next_position)
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += next_position.eq(0)
                with m.If(restarting | self.restart):
                    m.d.sync += [filling.eq(1), due.eq(0), sent.eq(0), timing.eq(0),
                                 tries.eq(0), f_length.eq(0), seq.eq(0), restarting.eq(0),
                                 self.gave_up.eq(0)]
                with m.Elif(self.reply.valid):
                    m.d.comb += self.reply.ready.eq(1)
                    reply = self.reply.payload
                    m.d.sync += [s_header.eq(Cat(Mux(reply.nak, _NAK, _ACK), reply.seq)),
                                 s_length.eq(0)]
                    m.next = "SEND"
                with m.Elif(due & ~self.gave_up):
                    m.d.sync += [s_header.eq(Cat(f_type, f_more, seq, f_length)),
                                 s_length.eq(f_length), due.eq(0), sent.eq(1),
                                 sending_data.eq(1)]
                    m.next = "SEND"
            with m.State("SEND"):
                with m.If(self.restart):
                    m.d.sync += restarting.eq(1)
                byte = Mux(position < HEADER_BYTES,
                           s_header.word_select(position[:2], 8),
                           Mux(in_crc, crc.crc.word_select((position - crc_at)[:2], 8),
                               rd.data))
                m.d.comb += [o.valid.eq(1), o.payload.data.eq(byte),
                             o.payload.last.eq(position == crc_at + CRC_BYTES - 1),
                             crc.i.valid.eq(moved & ~in_crc), crc.i.payload.eq(byte),
                             crc.clear.eq(position == 0)]
                with m.If(moved & o.payload.last):
                    m.d.sync += [sending_data.eq(0), timer.eq(self.ack_timeout)]
                    with m.If(sending_data):
                        m.d.sync += timing.eq(1)
                    m.next = "IDLE"
        return m


class Link(wiring.Component):
    """The device's end of the host link: ``rx``/``tx`` at ``divisor`` cycles per bit, messages
    in and out as AXI-Stream-like byte streams.

    ``rx`` -> :class:`.uart.UartRx` -> :class:`.cobs.CobsDecoder` -> :class:`FrameRx` -> ``o``;
    ``i`` -> :class:`FrameTx` -> :class:`.cobs.CobsEncoder` -> :class:`.uart.UartTx` -> ``tx``.
    A HELLO raises ``hello`` for a cycle (the device resets what uses the link), restarts the
    transmitter and sends IDENTIFY with the payload ``identity`` (``host.link.Identity``'s
    bytes) as the next message, ahead of ``i`` (which is not ready meanwhile; a message of
    ``i`` that began before the HELLO is dropped with the transmitter's buffer, the rest of it
    is sent). ``types`` are the message types delivered on ``o``; others are acknowledged and
    dropped. The IDENTIFY bytes are read from a ROM in one block RAM whose contents are
    :attr:`rom_init` (:func:`identity_rom` of ``identity``, 1..512 bytes), so a finished
    bitstream can be given other ones of the same length.

    Members
    -------
    rx : In(1)
    tx : Out(1)
    o : Out(stream.Signature(MessageByte))
    i : In(stream.Signature(SendByte))
    hello : Out(1)
    stats : Out(LINK_STATS)
        16-bit counters (wrapping): frames dropped by :class:`FrameRx`, frames resent, UART
        framing errors and overruns.
    gave_up : Out(1)
        :class:`FrameTx` stopped resending a frame.
    """

    def __init__(self, *, divisor, identity, ack_timeout, retries=8, max_payload=MAX_PAYLOAD,
                 types=DEVICE_TYPES):
        self.rom_init = identity_rom(identity)
        self.divisor, self.identity = divisor, bytes(identity)
        self.rx_side = FrameRx(max_payload=max_payload, types=types)
        self.tx_side = FrameTx(max_payload=max_payload, ack_timeout=ack_timeout,
                               retries=retries)
        self.uart_rx, self.uart_tx = UartRx(divisor), UartTx(divisor)
        super().__init__({
            "rx":      In(1, init=1),
            "tx":      Out(1, init=1),
            "o":       Out(stream.Signature(MessageByte)),
            "i":       In(stream.Signature(SendByte)),
            "hello":   Out(1),
            "stats":   Out(LINK_STATS),
            "gave_up": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        rx, tx = self.rx_side, self.tx_side
        m.submodules.uart_rx, m.submodules.uart_tx = self.uart_rx, self.uart_tx
        m.submodules.decoder = decoder = CobsDecoder()
        m.submodules.encoder = encoder = CobsEncoder()
        m.submodules.frame_rx, m.submodules.frame_tx = rx, tx
        wiring.connect(m, self.uart_rx.o, decoder.i)
        wiring.connect(m, decoder.o, rx.i)
        wiring.connect(m, rx.reply, tx.reply)
        wiring.connect(m, rx.peer, tx.peer)
        wiring.connect(m, tx.o, encoder.i)
        wiring.connect(m, encoder.o, self.uart_tx.i)
        wiring.connect(m, wiring.flipped(self.o), rx.o)
        m.d.comb += [self.uart_rx.rx.eq(self.rx), self.tx.eq(self.uart_tx.tx),
                     tx.restart.eq(rx.hello), self.hello.eq(rx.hello),
                     self.gave_up.eq(tx.gave_up), self.stats.resent.eq(tx.resent)]
        m.d.comb += [self.stats[name].eq(rx.stats[name]) for name in _STATS.members]
        for name, strobe in [("framing", self.uart_rx.framing_error),
                             ("overrun", self.uart_rx.overrun)]:
            with m.If(strobe):
                m.d.sync += self.stats[name].eq(self.stats[name] + 1)

        # IDENTIFY goes in at a message boundary of ``i``. Its bytes come from a block RAM ROM
        # (boards/build.py patches them in the bitstream); ``rom`` reads the byte at ``index``
        # one cycle ahead, so ``rd.data`` is always the byte at ``index``.
        m.submodules.rom = rom = Memory(shape=8, depth=IDENTITY_ROM_DEPTH,
                                        init=self.rom_init)
        rd = rom.read_port()
        identify, sending_id = Signal(), Signal()
        inside = Signal()                   # a message of ``i`` has begun and not ended
        # The full address width, so no synthesis may drop the fill as unaddressed (Yosys 0.70
        # keeps it even behind a 5-bit address; the patch checks that the whole ROM is there).
        index = Signal(range(IDENTITY_ROM_DEPTH))
        next_index = Signal.like(index)
        last = index == len(self.identity) - 1
        m.d.comb += [next_index.eq(index), rd.addr.eq(next_index)]
        m.d.sync += index.eq(next_index)
        with m.If(sending_id):
            m.d.comb += [tx.i.valid.eq(1), tx.i.payload.type.eq(int(Type.IDENTIFY)),
                         tx.i.payload.data.eq(rd.data), tx.i.payload.last.eq(last)]
            with m.If(tx.i.ready):
                m.d.comb += next_index.eq(Mux(last, 0, index + 1))
                with m.If(last):
                    m.d.sync += sending_id.eq(0)
        with m.Else():
            wiring.connect(m, wiring.flipped(self.i), tx.i)
            with m.If(self.i.valid & self.i.ready):
                m.d.sync += inside.eq(~self.i.payload.last)
            with m.If(identify & ~inside):
                m.d.comb += [tx.i.valid.eq(0), self.i.ready.eq(0)]
                m.d.sync += [identify.eq(0), sending_id.eq(1)]
        with m.If(rx.hello):
            m.d.comb += next_index.eq(0)
            m.d.sync += [identify.eq(1), sending_id.eq(0), inside.eq(0)]
        return m
