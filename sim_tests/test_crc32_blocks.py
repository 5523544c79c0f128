"""Amaranth-simulator test of the byte-serial CRC-32 (rtl/crc32.py) against ``zlib.crc32``."""

import random
import zlib

from amaranth.sim import Simulator

from moefpga.rtl.crc32 import CRC32
from moefpga.rtl.expert_stream import CRC_RESIDUE


def _run(messages, *, seed, stall):
    """Send each message after a ``clear`` (alone in a cycle, or with the message's first byte),
    with random stalls; return ``(bytes since the clear, CRC)`` read after every cycle."""
    rng = random.Random(seed)
    dut = CRC32()
    seen = []

    async def testbench(ctx):
        sent = b""
        for message in messages:
            with_first_byte = bool(message) and rng.random() < 0.5
            if not with_first_byte:
                ctx.set(dut.clear, 1)
                await ctx.tick()
                ctx.set(dut.clear, 0)
                sent = b""
                seen.append((sent, ctx.get(dut.crc)))
            for k, byte in enumerate(message):
                while rng.random() < stall:
                    await ctx.tick()
                    seen.append((sent, ctx.get(dut.crc)))
                ctx.set(dut.clear, with_first_byte and k == 0)
                ctx.set(dut.i.payload, byte)
                ctx.set(dut.i.valid, 1)
                assert ctx.get(dut.i.ready)
                await ctx.tick()
                ctx.set(dut.i.valid, 0)
                ctx.set(dut.clear, 0)
                sent = message[:k + 1]
                seen.append((sent, ctx.get(dut.crc)))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return seen


def test_crc32_equals_zlib():
    """Random byte strings of 0 to 300 bytes, all-zero and all-ones strings, with 40 % stalls:
    the running CRC equals ``zlib.crc32`` of the bytes so far after every cycle."""
    rng = random.Random(4)
    messages = [rng.randbytes(rng.randrange(301)) for _ in range(12)]
    messages += [b"", b"\0" * 40, b"\xff" * 40, b"123456789"]
    seen = _run(messages, seed=1, stall=0.4)
    assert len(seen) > sum(map(len, messages))
    for prefix, crc in seen:
        assert crc == zlib.crc32(prefix), prefix
    assert zlib.crc32(b"123456789") == 0xCBF43926


def test_crc32_residue_of_a_record():
    """A message followed by its CRC, little-endian, leaves ``CRC_RESIDUE``; one flipped bit
    anywhere does not."""
    body = random.Random(5).randbytes(64)
    record = body + zlib.crc32(body).to_bytes(4, "little")
    flipped = bytearray(record)
    flipped[17] ^= 0x08
    seen = _run([record, bytes(flipped)], seed=2, stall=0.2)
    ends = [crc for prefix, crc in seen if len(prefix) == len(record)]
    assert ends == [CRC_RESIDUE, zlib.crc32(flipped)]
    assert ends[1] != CRC_RESIDUE
