"""A byte-serial CRC-32 equal to ``zlib.crc32``, for checking packed expert records."""

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["POLY", "CRC32"]

#: The IEEE 802.3 polynomial 0x04C11DB7, bit-reversed for an LSB-first register.
POLY = 0xEDB88320
_ONES = 0xFFFFFFFF


def _shift_in(register, byte):
    """The reflected CRC register after shifting in the 8 bits of ``byte``, LSB first."""
    for i in range(8):
        register = register[1:] ^ Mux(register[0] ^ byte[i], POLY, 0)
    return register


class CRC32(wiring.Component):
    """CRC-32 of zlib (reflected polynomial ``0xEDB88320``, init and final XOR ``0xFFFFFFFF``)
    over a byte stream, one byte per cycle.

    ``crc`` equals ``zlib.crc32`` of the bytes transferred since the last ``clear`` (or reset),
    from the cycle after the last of them. After a whole packed expert record, its CRC included,
    it equals :data:`.expert_stream.CRC_RESIDUE` exactly when the CRC matches.

    Members
    -------
    i : In(stream.Signature(8))
        The bytes. Always ready.
    clear : In(1)
        Start a new CRC: the register returns to its initial value. A byte transferred in the
        same cycle is the first byte of the new CRC.
    crc : Out(32)
        The running CRC.
    """
    i:     In(stream.Signature(8))
    clear: In(1)
    crc:   Out(32)

    def elaborate(self, platform):
        m = Module()
        register = Signal(32, init=_ONES)
        start = Mux(self.clear, _ONES, register)
        m.d.comb += [self.i.ready.eq(1), self.crc.eq(~register)]
        with m.If(self.i.valid):
            m.d.sync += register.eq(_shift_in(start, self.i.payload))
        with m.Elif(self.clear):
            m.d.sync += register.eq(_ONES)
        return m
