"""The host link (host/link.py) over the in-process pipe transport: COBS, frames, and the
stop-and-wait protocol against a peer Link in a thread, with injected faults."""

import os
import random
import threading
import zlib

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from moefpga.hls_models.errors import MoefpgaError
from moefpga.host.link import (
    MAX_PAYLOAD,
    Frame,
    FrameError,
    Identity,
    Link,
    Type,
    cobs_decode,
    cobs_encode,
    decode_frame,
    encode_frame,
)
from moefpga.host.transport import SerialTransport, pipe_pair

# Examples of the COBS article on Wikipedia (without the trailing delimiter).
_RUN = bytes(range(1, 255))
COBS_EXAMPLES = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (_RUN, b"\xff" + _RUN),
    (b"\x00" + _RUN, b"\x01\xff" + _RUN),
    (_RUN + b"\xff", b"\xff" + _RUN + b"\x02\xff"),
    (bytes(range(2, 256)) + b"\x00", b"\xff" + bytes(range(2, 256)) + b"\x01\x01"),
    (bytes(range(3, 256)) + b"\x00\x01", b"\xfe" + bytes(range(3, 256)) + b"\x02\x01"),
]

IDENTITY = Identity(link_version=1, record_version=1, lanes=2, m=4, n=2, weight_bits=4,
                    group_size=16, hidden=32, ffn=32, experts=4, top_k=2, shared=2, slots=3,
                    layers=1, max_tokens=4, clock_hz=12_000_000, max_payload=MAX_PAYLOAD,
                    fmax_khz=27_456)


@pytest.mark.parametrize(("data", "encoded"), COBS_EXAMPLES)
def test_cobs_examples(data, encoded):
    assert cobs_encode(data) == encoded
    assert cobs_decode(encoded) == data


@given(st.binary(max_size=1200))
def test_cobs_round_trip(data):
    encoded = cobs_encode(data)
    assert 0 not in encoded
    assert len(encoded) <= len(data) + 1 + len(data) // 254
    assert cobs_decode(encoded) == data


@pytest.mark.parametrize("raw", [b"\x05\x11\x22", b"\x03\x11", b"\x02\x00"])
def test_cobs_rejects_broken_blocks(raw):
    with pytest.raises(FrameError):
        cobs_decode(raw)


def test_frame_bytes():
    """The decoded frame is type, seq, length LE, payload, zlib CRC-32 LE; on the wire it is
    COBS between two zero bytes."""
    wire = encode_frame(Frame(Type.RUN_TOKENS, 7, b"\x01\x00\x02", more=True))
    assert wire[0] == 0 and wire[-1] == 0 and 0 not in wire[1:-1]
    body = cobs_decode(wire[1:-1])
    assert body[:7] == bytes([0x86, 7, 3, 0, 1, 0, 2])
    assert body[7:] == zlib.crc32(body[:7]).to_bytes(4, "little")
    assert decode_frame(wire[1:-1]) == Frame(Type.RUN_TOKENS, 7, b"\x01\x00\x02", True)


@given(st.integers(0, 0x7F), st.integers(0, 255), st.binary(max_size=MAX_PAYLOAD),
       st.booleans(), st.data())
def test_frame_corruption_detected(kind, seq, payload, more, data):
    """A frame decodes to itself; one flipped bit or a cut anywhere is a FrameError."""
    raw = encode_frame(Frame(kind, seq, payload, more))[1:-1]
    assert decode_frame(raw)[1:] == (seq, payload, more)
    position = data.draw(st.integers(0, len(raw) - 1))
    flipped = bytearray(raw)
    flipped[position] ^= 1 << data.draw(st.integers(0, 7))
    assume(flipped[position] != 0)          # a zero would be a delimiter: a cut, tested below
    with pytest.raises(FrameError):
        decode_frame(bytes(flipped))
    with pytest.raises(FrameError):
        decode_frame(raw[:position])


def test_frame_payload_limit():
    with pytest.raises(ValueError):
        encode_frame(Frame(Type.RESULTS, 0, bytes(MAX_PAYLOAD + 1)))


def test_identity_round_trip_and_mismatches():
    assert Identity.from_bytes(IDENTITY.to_bytes()) == IDENTITY
    # 32 bytes as docs/link.md lays them out; fmax_khz is the last field, a u32.
    assert len(IDENTITY.to_bytes()) == 32
    assert IDENTITY.to_bytes()[-4:] == (27_456).to_bytes(4, "little")
    assert IDENTITY.mismatches(lanes=2, slots=3) == []
    assert IDENTITY.mismatches(lanes=4, m=4) == ["lanes: device 2, needed 4"]
    with pytest.raises(MoefpgaError, match="IDENTIFY has 3 bytes"):
        Identity.from_bytes(b"abc")


class Peer:
    """The device's side in a thread: a Link that answers HELLO with IDENTIFY and every other
    message with RESULTS carrying the payload reversed; ``received`` lists what it got."""

    def __init__(self, transport, **options):
        self.link = Link(transport, **options)
        self.received = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                message = self.link.receive(timeout=0.01)
            except MoefpgaError:
                continue
            self.received.append(message)
            try:
                if message.type == Type.HELLO:
                    self.link.send(Type.IDENTIFY, IDENTITY.to_bytes())
                else:
                    self.link.send(Type.RESULTS, message.payload[::-1])
            except MoefpgaError:
                return

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()


def _pair(host_fault=None, device_fault=None, **options):
    """A host Link and a Peer joined by a pipe; ``*_fault`` alter what that side writes."""
    host_end, device_end = pipe_pair()
    host_end.fault, device_end.fault = host_fault, device_fault
    options = {"timeout": 0.05, "retries": 20, **options}
    return Link(host_end, **options), Peer(device_end, **options)


def _exchange(host, messages):
    """Send each message, return the payloads of the answers."""
    answers = []
    for kind, payload in messages:
        host.send(kind, payload)
        answer = host.receive(timeout=5)
        assert answer.type == Type.RESULTS
        answers.append(answer.payload)
    return answers


def _messages(seed, count=6):
    rng = random.Random(seed)
    return [(Type.RUN_TOKENS, rng.randbytes(rng.choice([0, 1, 300, MAX_PAYLOAD, 2500])))
            for _ in range(count)]


def test_link_clean():
    """HELLO gives the identity; messages up to 2.5 frames long arrive once, in order, whole."""
    host, peer = _pair(timeout=1.0)
    try:
        assert host.hello(timeout=5) == IDENTITY
        messages = _messages(1)
        assert _exchange(host, messages) == [p[::-1] for _, p in messages]
        assert [(m.type, m.payload) for m in peer.received] == [(Type.HELLO, b""), *messages]
        assert host.stats["retransmitted"] == host.stats["bad"] == 0
    finally:
        peer.stop()


class Faults:
    """Seeded faults on written chunks: flip a bit, drop a byte, insert garbage, or cut the
    chunk, each with probability ``rate``; ``done`` counts the faults made."""

    def __init__(self, seed, rate):
        self.rng, self.rate, self.done = random.Random(seed), rate, 0

    def __call__(self, data):
        data = bytearray(data)
        if data and self.rng.random() < self.rate:
            self.done += 1
            where = self.rng.randrange(len(data))
            fault = self.rng.randrange(4)
            if fault == 0:
                data[where] ^= 1 << self.rng.randrange(8)
            elif fault == 1:
                del data[where]
            elif fault == 2:
                data[where:where] = self.rng.randbytes(self.rng.randrange(1, 20))
            else:
                del data[where:]
        return bytes(data)


def test_link_recovers_from_faults():
    """20 % of the chunks each side writes are corrupted, cut, shortened or padded with
    garbage: every message still arrives exactly once and in order, and both sides counted
    bad frames and retransmissions."""
    to_device, to_host = Faults(2, 0.2), Faults(3, 0.2)
    host, peer = _pair(to_device, to_host)
    try:
        assert host.hello(timeout=5) == IDENTITY
        messages = _messages(4, count=12)
        assert _exchange(host, messages) == [p[::-1] for _, p in messages]
        assert [(m.type, m.payload) for m in peer.received if m.type != Type.HELLO] == messages
        assert to_device.done > 0 and to_host.done > 0
        assert host.stats["retransmitted"] > 0 and peer.link.stats["retransmitted"] > 0
        assert host.stats["bad"] + peer.link.stats["bad"] > 0
    finally:
        peer.stop()


def test_lost_ack_gives_a_duplicate_applied_once():
    """The device's first ACK of a message is lost: the host sends the frame again, the device
    recognizes the duplicate by its sequence number, acknowledges it and applies it once."""
    dropped = []

    def lose_first_ack(data):
        if not dropped and data != b"\0":
            try:
                frame = decode_frame(data.strip(b"\0"))
            except FrameError:
                return data
            if frame.type == Type.ACK and frame.seq == 1:
                dropped.append(frame)
                return b""
        return data

    host, peer = _pair(device_fault=lose_first_ack, timeout=1.0)
    try:
        host.hello(timeout=5)
        assert _exchange(host, [(Type.ROUTER, b"abc")]) == [b"cba"]
        assert dropped and host.stats["retransmitted"] == 1
        assert peer.link.stats["duplicates"] == 1
        assert [m.payload for m in peer.received] == [b"", b"abc"]
    finally:
        peer.stop()


def test_identify_acknowledges_hello():
    """The ACK of HELLO is lost but IDENTIFY arrives: the host takes IDENTIFY as the answer
    and does not say HELLO again (which would restart the device a second time)."""
    dropped = []

    def lose_hello_ack(data):
        if not dropped and data != b"\0" and decode_frame(data.strip(b"\0")).type == Type.ACK:
            dropped.append(data)
            return b""
        return data

    host, peer = _pair(device_fault=lose_hello_ack, timeout=1.0)
    try:
        assert host.hello(timeout=5) == IDENTITY
        assert dropped and host.stats["retransmitted"] == 0
        assert [m.type for m in peer.received] == [Type.HELLO]
    finally:
        peer.stop()


def test_resync_after_garbage_truncation_bad_crc_and_unknown_type():
    """Written straight into the receiving side: garbage, a cut frame, a frame with a bad CRC,
    a frame of an unknown type, then a good frame. Only the good frame is delivered; the broken
    ones are NAKed, the unknown one acknowledged and counted."""
    host_end, device_end = pipe_pair()
    device = Link(device_end, timeout=0.05)
    good = encode_frame(Frame(Type.ROUTER, 1, b"weights"))
    body = bytearray(cobs_decode(good[1:-1]))
    body[-1] ^= 0x01
    bad_crc = b"\0" + cobs_encode(body) + b"\0"
    host_end.write(b"\x13\x37garbage" + good[:-6] + b"\0" + bad_crc
                   + encode_frame(Frame(0x55, 0, b"?")) + good)
    message = device.receive(timeout=1)
    assert message == (Type.ROUTER, b"weights")
    assert device.stats["bad"] == 3 and device.stats["unknown"] == 1
    replies = []
    while chunk := host_end.read(4096, 0.01):
        replies += [decode_frame(raw) for raw in chunk.split(b"\0") if raw]
    assert [(f.type, f.seq) for f in replies] == [
        (Type.NAK, 0), (Type.NAK, 0), (Type.NAK, 0), (Type.ACK, 0), (Type.ACK, 1)]


def test_endless_garbage_is_one_bad_frame():
    """20 kB without a delimiter, then a good frame: one NAK, then the frame; the receiver
    keeps at most one frame's worth of the garbage."""
    host_end, device_end = pipe_pair()
    device = Link(device_end, timeout=0.05)
    host_end.write(bytes(random.Random(5).randrange(1, 256) for _ in range(20_000))
                   + encode_frame(Frame(Type.RUN_TOKENS, 0, b"tokens")))
    assert device.receive(timeout=5) == (Type.RUN_TOKENS, b"tokens")
    assert device.stats["bad"] == 1


def test_restart_drops_a_cut_message():
    """The first frame of a RESULTS message, then IDENTIFY (the device restarted), then a whole
    RESULTS: the cut message is dropped, not joined to the next."""
    host_end, device_end = pipe_pair()
    host = Link(host_end, timeout=0.05)
    device_end.write(encode_frame(Frame(Type.RESULTS, 0, b"stale", more=True))
                     + encode_frame(Frame(Type.IDENTIFY, 0, IDENTITY.to_bytes()))
                     + encode_frame(Frame(Type.RESULTS, 1, b"fresh")))
    assert host.receive(timeout=1) == (Type.RESULTS, b"fresh")


def test_silent_peer_is_an_error():
    """Nobody answers: send gives up after the bounded tries, receive after its timeout, each
    with a MoefpgaError that says so."""
    host_end, _ = pipe_pair()
    host = Link(host_end, timeout=0.01, retries=3)
    with pytest.raises(MoefpgaError, match="not acknowledged after 4 tries"):
        host.send(Type.LOAD_EXPERT, b"record")
    assert host.stats["sent"] == 4
    with pytest.raises(MoefpgaError, match="no message from the device"):
        host.receive(timeout=0.01)
    with pytest.raises(MoefpgaError, match="not acknowledged"):
        host.hello()


def test_hello_without_identify_is_an_error():
    """A peer that acknowledges HELLO but never identifies itself."""
    host_end, device_end = pipe_pair()
    device = Link(device_end, timeout=0.01)
    thread = threading.Thread(target=lambda: [device.poll(0.01) for _ in range(50)])
    thread.start()
    host = Link(host_end, timeout=0.1)
    with pytest.raises(MoefpgaError, match="sent no IDENTIFY"):
        host.hello()
    thread.join()


def test_serial_transport_on_a_pseudo_terminal():
    """SerialTransport reads and writes a pseudo-terminal (as it would a board's port), times
    out with nothing to read, and refuses a busy or missing port with one clear message."""
    master, slave = os.openpty()
    try:
        name = os.ttyname(slave)
        port = SerialTransport(name)
        try:
            os.write(master, b"\x00frame\x00")
            assert port.read(100, 1.0) == b"\x00frame\x00"
            assert port.read(100, 0.01) == b""
            port.write(b"answer")
            assert os.read(master, 100) == b"answer"
            with pytest.raises(MoefpgaError, match=f"serial port {name} is busy"):
                SerialTransport(name)
        finally:
            port.close()
    finally:
        os.close(master)
        os.close(slave)
    with pytest.raises(MoefpgaError, match="serial port /dev/no-such-port does not exist"):
        SerialTransport("/dev/no-such-port")
