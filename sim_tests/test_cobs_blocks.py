"""Amaranth-simulator tests of the streaming COBS encoder and decoder (rtl/cobs.py) against
``host.link.cobs_encode`` / ``cobs_decode``, with random stalls on both sides."""

import random

from amaranth.sim import Simulator

from moefpga.host.link import FrameError, cobs_decode, cobs_encode
from moefpga.rtl.cobs import CobsDecoder, CobsEncoder

_RUN = bytes(range(1, 255))


def _frames(seed):
    """Frames that exercise every kind of block: zeros at the ends, runs of 254 and 255
    nonzero bytes, long random frames."""
    rng = random.Random(seed)
    frames = [b"\0", b"\0\0", b"\x11\0", b"\x11", _RUN, _RUN + b"\xff", b"\0" + _RUN,
              _RUN + b"\0", _RUN * 2, bytes(range(2, 256)) + b"\0\x01"]
    frames += [rng.randbytes(rng.randrange(1, 700)) for _ in range(6)]
    frames += [bytes(rng.choice([0, 0, 1, 7, 255]) for _ in range(rng.randrange(1, 60)))
               for _ in range(10)]
    return frames


def _simulate(dut, send, receive, *, seed, stall, cycles):
    """Drive ``dut.i`` with the beats of ``send`` (payload values) and collect ``dut.o``'s
    payloads, each side pausing with probability ``stall``; returns the payloads received."""
    rng = random.Random(seed)
    out = []

    async def source(ctx):
        for payload in send:
            while rng.random() < stall:
                await ctx.tick()
            ctx.set(dut.i.payload, payload)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)

    async def sink(ctx):
        while True:
            ready = rng.random() >= stall
            ctx.set(dut.o.ready, ready)
            if ready and ctx.get(dut.o.valid):
                out.append(receive(ctx.get(dut.o.payload)))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run_until(cycles * 1e-6)
    return out


def test_encoder_equals_host():
    """Every frame of :func:`_frames` comes out as ``00 | cobs_encode(frame) | 00``."""
    frames = _frames(1)
    beats = [{"data": b, "last": k == len(f) - 1} for f in frames for k, b in enumerate(f)]
    expected = b"".join(b"\0" + cobs_encode(f) + b"\0" for f in frames)
    out = _simulate(CobsEncoder(), beats, int, seed=2, stall=0.3, cycles=6 * len(expected))
    assert bytes(out) == expected


def test_decoder_equals_host():
    """Good frames, doubled delimiters, garbage and cut frames: each segment between
    delimiters gives its decoded bytes and an ``end`` beat whose ``ok`` says whether
    ``cobs_decode`` accepts it; empty segments give nothing."""
    rng = random.Random(3)
    segments = []
    for frame in _frames(4):
        encoded = cobs_encode(frame)
        segments.append(encoded)
        if rng.random() < 0.5:
            segments.append(encoded[:rng.randrange(1, len(encoded))])
        if rng.random() < 0.3:
            segments.append(rng.randbytes(rng.randrange(1, 30)).replace(b"\0", b"\x02"))
    wire = b"\0\0" + b"\0".join(segments) + b"\0"

    expected = []
    for segment in segments:
        try:
            expected += [(b, 0, 0) for b in cobs_decode(segment)] + [(0, 1, 1)]
        except FrameError:
            expected.append("bad")
    assert "bad" in expected

    def receive(beat):
        return int(beat.data), int(beat.end), int(beat.ok)

    out = _simulate(CobsDecoder(), wire, receive, seed=5, stall=0.3, cycles=4 * len(wire))
    got = []
    for beat in out:                         # a broken frame's bytes are not compared
        if beat[1] and not beat[2]:
            while got and got[-1] != (0, 1, 1) and got[-1] != "bad":
                got.pop()
            got.append("bad")
        else:
            got.append(beat)
    assert got == expected
