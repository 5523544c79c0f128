"""The accelerator session (host/accelerator.py) and ``moefpga run --backend serial|board-sim``
against peers that are not a working device: nothing on the line, garbage, a device built for
other hardware or smaller frames, a twin that fails; and the options that do not belong to a
backend. Pure Python: the peers are threads on a pseudo-terminal, the failing twin a stand-in
script; the Verilator twin is tested in sim_tests/test_board_sim.py."""

import dataclasses
import errno
import gc
import os
import random
import select
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from cli_runner import main

from moefpga.hls_models.calibrate import QuantSpec, calibration_tokens, quantize_layer
from moefpga.hls_models.checkpoint import Checkpoint
from moefpga.hls_models.errors import MoefpgaError
from moefpga.hls_models.sparsity import parse_sparsity
from moefpga.hls_models.synthetic import write_checkpoint
from moefpga.host import board_sim
from moefpga.host.accelerator import (
    open_accelerator,
    requirements,
    router_message,
    token_message,
)
from moefpga.host.board_sim import BoardSim, twin_sizes
from moefpga.host.cli import default_calibration
from moefpga.host.link import (
    LINK_VERSION,
    MAX_PAYLOAD,
    FrameError,
    Identity,
    Link,
    Type,
    decode_frame,
)
from moefpga.host.sim import hardware_for
from moefpga.host.sim_options import SimOptions
from moefpga.rtl.expert_stream import VERSION
from moefpga.rtl.moe_layer import COUNTER_BITS


def read_master(fd, limit, timeout):
    """What the host wrote to the pseudo-terminal, or b"" after ``timeout`` seconds (also
    while no one has the slave open, when the master reads as an I/O error)."""
    if select.select([fd], [], [], max(timeout, 0.0))[0]:
        try:
            return os.read(fd, limit)
        except OSError as error:
            if error.errno != errno.EIO:
                raise
            time.sleep(timeout)
    return b""


class MasterTransport:
    """The device's end of a pseudo-terminal: its master file descriptor as a Transport."""

    def __init__(self, fd):
        self.fd = fd

    def read(self, limit, timeout):
        return read_master(self.fd, limit, timeout)

    def write(self, data):
        os.write(self.fd, data)

    def close(self):
        pass


@pytest.fixture
def pty():
    """A pseudo-terminal: (master fd, slave path); the slave is closed so the host can open
    it exclusively."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    yield master, path
    os.close(master)


def serve(target):
    """Run ``target(stop)`` in a thread until the test's block ends."""
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("accelerator")
    path = write_checkpoint(folder / "ck", "qwen2_moe", num_layers=2, hidden_size=32,
                            num_experts=4, top_k=2, expert_ffn_size=32,
                            shared_expert_ffn_size=32, vocab_size=64)
    np.save(folder / "x.npy", calibration_tokens(32, count=5, seed=1).astype(np.float32))
    return path, folder / "x.npy"


def _run(checkpoint, tmp_path, *args):
    path, x = checkpoint
    return main("run", "--checkpoint", path, "--layer", 0, "--input", x, "--output",
                tmp_path / "y.npy", "--quant", "int4", "--sparsity", "2:4", *args)


#: A device the test layer does not fit: a board top built for the default model.
OTHER = Identity(link_version=LINK_VERSION, record_version=VERSION, lanes=4, m=4, n=2,
                 weight_bits=4, group_size=32, hidden=128, ffn=256, experts=8, top_k=2, shared=2,
                 slots=2, layers=1, max_tokens=4, clock_hz=24_000_000, max_payload=MAX_PAYLOAD,
                 fmax_khz=27_456)
#: One the test layer fits (int4 2:4, one scale per channel of 32).
FITS = dataclasses.replace(OTHER, hidden=32, experts=4, layers=2)
#: One it fits, but whose parameters no hardware has (a batch of no tokens).
IMPOSSIBLE = dataclasses.replace(FITS, max_tokens=0)


@pytest.mark.parametrize(("identity", "message"), [
    (OTHER, "the device does not fit this model: hidden: device 128, needed 32; experts: "
            "device 8, needed 4; layers: device 1, needed at least 2"),
    (IMPOSSIBLE, "the device's IDENTIFY describes hardware that cannot be built"),
    (dataclasses.replace(FITS, max_payload=0),
     f"the device does not fit this model: max_payload: device 0, needed 1 to {MAX_PAYLOAD}"),
    (dataclasses.replace(FITS, max_payload=MAX_PAYLOAD + 1),
     f"the device does not fit this model: max_payload: device {MAX_PAYLOAD + 1}, needed 1 "
     f"to {MAX_PAYLOAD}"),
])
def test_device_for_other_hardware_is_refused(checkpoint, tmp_path, pty, identity, message):
    """A device whose IDENTIFY does not fit the layer, or describes impossible hardware: one
    error line (naming each mismatch), exit status 2, nothing written."""
    master, path = pty

    def device(stop):
        link = Link(MasterTransport(master), timeout=0.2)
        while not stop.is_set():
            try:
                if link.receive(0.05).type == Type.HELLO:
                    link.send(Type.IDENTIFY, identity.to_bytes())
            except MoefpgaError:
                pass

    stop, thread = serve(device)
    code, out, err = _run(checkpoint, tmp_path, "--backend", "serial", "--port", path)
    stop.set()
    thread.join(5)
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith(f"moefpga: error: {message}")
    assert "Traceback" not in err and not (tmp_path / "y.npy").exists()


class SmallFrames(MasterTransport):
    """The device's end of a link whose frames carry at most ``limit`` bytes: a frame with a
    longer payload is lost (never acknowledged), as a device with that ``max_payload`` loses
    it. ``largest`` is the longest payload the host sent."""

    def __init__(self, fd, limit):
        super().__init__(fd)
        self.limit, self.largest, self._partial = limit, 0, b""

    def read(self, limit, timeout):
        *frames, self._partial = (self._partial + super().read(limit, timeout)).split(b"\0")
        kept = []
        for raw in frames:
            try:
                length = len(decode_frame(raw).payload) if raw else 0
            except FrameError:
                length = 0
            self.largest = max(self.largest, length)
            kept.append(raw if length <= self.limit else b"")
        return b"\0".join([*kept, b""]) if frames else b""


def test_frames_follow_the_devices_max_payload(checkpoint, pty):
    """A device whose IDENTIFY says max_payload 64: the host cuts every message (a ROUTER of
    332 bytes here) into frames of at most 64 bytes, and the session runs."""
    master, path = pty
    ck = Checkpoint.open(checkpoint[0])
    spec = QuantSpec(bits=4, sparsity=parse_sparsity("2:4"))
    layers = {0: quantize_layer(ck.moe_layer(0), spec, default_calibration(ck, 0))}
    identity = dataclasses.replace(FITS, max_payload=64)
    transport = SmallFrames(master, 64)
    received = {}
    counters = bytes(10 * COUNTER_BITS // 8)  # the ten counters of docs/moe_layer.md

    def device(stop):
        link = Link(transport, timeout=0.2)
        answers = {Type.HELLO: lambda p: (Type.IDENTIFY, identity.to_bytes()),
                   Type.READ_COUNTERS: lambda p: (Type.COUNTERS, counters),
                   Type.RUN_TOKENS: lambda p: (Type.RESULTS, bytes(1 + 4 * (len(p) // 3)))}
        while not stop.is_set():
            try:
                message = link.receive(0.05)
                received[message.type] = message.payload
                if message.type in answers:
                    link.send(*answers[message.type](message.payload))
            except MoefpgaError:
                pass

    stop, thread = serve(device)
    x = calibration_tokens(32, count=3, seed=2)
    xq = np.round(x * 64).astype(np.int16)
    try:
        with open_accelerator("serial", layers, num_layers=2, port=path,
                              link_timeout=0.2) as accelerator:
            y = accelerator.run_layer(0, xq, np.zeros(3, np.int8))
    finally:
        stop.set()
        thread.join(5)
    assert y.shape == (3, 32)
    assert received[Type.ROUTER] == router_message(layers[0], 0)
    assert len(received[Type.ROUTER]) > 64 and transport.largest == 64


def test_garbage_peer_is_one_error(checkpoint, tmp_path, pty):
    """A peer that sends only random bytes: one error line after the HELLO's tries."""
    master, path = pty

    def garbage(stop):
        rng = random.Random(1)
        while not stop.is_set():
            os.write(master, bytes(rng.randrange(256) for _ in range(64)))
            read_master(master, 4096, 0.01)      # swallow what the host sends

    stop, thread = serve(garbage)
    start = time.monotonic()
    code, out, err = _run(checkpoint, tmp_path, "--backend", "serial", "--port", path)
    stop.set()
    thread.join(5)
    assert code == 2 and time.monotonic() - start < 30
    assert err.splitlines()[-1] == (
        f"moefpga: error: no moefpga device answers on {path}: link: HELLO frame 0 was not "
        "acknowledged after 9 tries of 0.5 s: the device does not answer")


def test_silent_peer_is_one_error(checkpoint, pty):
    """Nobody on the line: HELLO gives up after its tries (short here)."""
    _, path = pty
    ck = Checkpoint.open(checkpoint[0])
    layers = {0: quantize_layer(ck.moe_layer(0), QuantSpec(), default_calibration(ck, 0))}
    start = time.monotonic()
    with pytest.raises(MoefpgaError, match=f"no moefpga device answers on {path}: link: HELLO "
                                           "frame 0 was not acknowledged after 9 tries"):
        with open_accelerator("serial", layers, num_layers=2, port=path, link_timeout=0.05):
            pass
    assert time.monotonic() - start < 5


def test_requirements_name_groups_lanes_and_sparsity(checkpoint):
    """The bounds IDENTIFY must meet besides equal fields: groups, lanes and the N:M pattern
    (the layer: hidden 32, FFN 32, int4 2:4 with one scale per channel)."""
    ck = Checkpoint.open(checkpoint[0])
    spec = QuantSpec(bits=4, sparsity=parse_sparsity("2:4"))
    layers = {0: quantize_layer(ck.moe_layer(0), spec, default_calibration(ck, 0))}
    fits = Identity(link_version=LINK_VERSION, record_version=VERSION, lanes=4, m=4, n=2,
                    weight_bits=8, group_size=16, hidden=32, ffn=64, experts=4, top_k=2,
                    shared=2, slots=2, layers=2, max_tokens=4, clock_hz=1, max_payload=64)
    assert requirements(fits, layers, num_layers=2) == []
    bad = dataclasses.replace(fits, lanes=3, group_size=64, m=4, n=4)
    assert requirements(bad, layers, num_layers=2) == [
        "group_size: device 64, needed a divisor of [32]",
        "lanes: device 3, needed a divisor of [32]",
        "sparsity: device dense, needed 2:4"]


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "serial"], "--backend serial needs --port (the board's serial port)"),
    (["--backend", "serial", "--port", "/dev/ttyNOPE", "--board", "icebreaker"],
     "--board is for --backend board-sim, not serial"),
    (["--backend", "board-sim", "--port", "/dev/ttyNOPE"],
     "--port is for --backend serial, not board-sim"),
    (["--backend", "model", "--port", "/dev/x", "--board", "nosuch"],
     "--port is for --backend serial, not model"),
    (["--backend", "model", "--baud", "115200"], "--baud is for --backend serial, not model"),
    (["--backend", "serial", "--port", "/dev/ttyNOPE", "--slots", "2"],
     "--slots is for --backend sim and board-sim, not serial"),
    (["--backend", "board-sim", "--board", "icebreaker", "--max-tokens", "4"],
     "--max-tokens does not apply with --board: the board's YAML fixes the hardware"),
    (["--backend", "sim", "--policy", "lru"],
     "--policy is for --backend board-sim and serial, not sim"),
    (["--backend", "serial", "--port", "/dev/ttyNOPE", "--clock-mhz", "24"],
     "unrecognized arguments: --clock-mhz 24 (see 'moefpga --help')"),
    (["--backend", "serial", "--port", "/dev/ttyNOPE"],
     "serial port /dev/ttyNOPE does not exist"),
    (["--backend", "serial", "--port", "/dev/ttyNOPE", "--predictor", "oracle"], None),
])
def test_bad_options_are_one_error(checkpoint, tmp_path, args, message):
    """Options a backend does not take (also given at their default value), a missing or
    absent port: one error line before any work, nothing written."""
    code, out, err = _run(checkpoint, tmp_path, *args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "y.npy").exists()
    last = err.strip().splitlines()[-1]
    assert last.startswith("moefpga: error: ")
    if message:
        assert last == f"moefpga: error: {message}"


def test_message_layouts():
    """ROUTER and RUN TOKENS payloads byte by byte, as docs/link.md and docs/moe_layer.md
    lay them out."""
    assert token_message(np.array([[1, -2]]), np.array([-3])) == bytes(
        [1, 0, 0xFD, 0xFE, 0xFF, 0xFD])

    class Mult:
        def __init__(self, mult, shift):
            self.mult, self.shift = mult, shift

    class Layer:
        router = np.array([[1, -1], [256, 2]])
        router_mult = Mult(0x8001, -2)
        shared_gate = np.array([3, 4])
        shared_gate_mult = Mult(0xFFFF, 5)
        normalize = True

    assert router_message(Layer, 0x102) == bytes(
        [0x01, 0x80, 0xFE, 0xFF, 0xFF, 0x05, 1, 0x02, 0x01,
         1, 0, 0xFF, 0xFF, 0, 1, 2, 0, 3, 0, 4, 0])


def test_twin_that_does_not_start_is_one_error(tmp_path):
    """A twin executable that fails, or does not exist: one MoefpgaError, no hang."""
    failing = tmp_path / "Vboard_top"
    failing.write_text("#!/bin/sh\necho 'error: cannot open a pseudo-terminal' >&2\nexit 1\n")
    failing.chmod(0o755)
    with pytest.raises(MoefpgaError, match="^the board twin did not start: error: cannot open "
                                           "a pseudo-terminal$"):
        BoardSim(failing)
    with pytest.raises(MoefpgaError, match="^cannot start the board twin"):
        BoardSim(tmp_path / "missing")


#: A stand-in for the twin's executable: it opens a pseudo-terminal as ``board_sim.cpp``
#: does, answers HELLO with IDENTITY and READ COUNTERS with zeros, and at the first RUN TOKENS
#: fails as the driver fails: one ``error: ...`` line on standard error, exit status 1.
FAKE_TWIN = """#!{python}
import os, select, sys
from moefpga.hls_models.errors import MoefpgaError
from moefpga.host.link import Link, Type

class Master:
    def __init__(self, fd):
        self.fd = fd
    def read(self, limit, timeout):
        return os.read(self.fd, limit) if select.select([self.fd], [], [], timeout)[0] else b""
    def write(self, data):
        os.write(self.fd, data)

master, hold = os.openpty()
print("pty", os.ttyname(hold), flush=True)
link = Link(Master(master), timeout=0.2)
while True:
    try:
        message = link.receive(1.0)
    except MoefpgaError:          # nothing within the second: wait on
        continue
    if message.type == Type.HELLO:
        link.send(Type.IDENTIFY, bytes.fromhex("{identity}"))
    elif message.type == Type.READ_COUNTERS:
        link.send(Type.COUNTERS, bytes({counter_bytes}))
    elif message.type == Type.RUN_TOKENS:
        print("error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
"""


def _int4_layers(checkpoint):
    ck = Checkpoint.open(checkpoint[0])
    spec = QuantSpec(bits=4, sparsity=parse_sparsity("2:4"))
    return {0: quantize_layer(ck.moe_layer(0), spec, default_calibration(ck, 0))}


def test_twin_error_line_reaches_the_user(checkpoint, tmp_path, monkeypatch):
    """A twin that fails during a batch: the session's error ends with the twin's own
    ``error: ...`` line."""
    fake = tmp_path / "Vboard_top"
    fake.write_text(FAKE_TWIN.format(python=sys.executable, identity=FITS.to_bytes().hex(),
                                     counter_bytes=10 * COUNTER_BITS // 8,
                                     error="poll: the simulated line broke"))
    fake.chmod(0o755)
    monkeypatch.setattr(board_sim, "build", lambda top, progress=None: fake)
    layers = _int4_layers(checkpoint)
    start = time.monotonic()
    with pytest.raises(MoefpgaError) as error:
        with open_accelerator("board-sim", layers, num_layers=2, link_timeout=0.2,
                              options=SimOptions(max_tokens=4)) as accelerator:
            accelerator.run_layer(0, np.ones((2, 32), np.int16), np.zeros(2, np.int8))
    assert str(error.value).endswith("(the board twin: error: poll: the simulated line broke)")
    assert time.monotonic() - start < 30


def test_board_twin_that_does_not_fit_is_refused_before_the_build(checkpoint, tmp_path,
                                                                  monkeypatch):
    """--board names a twin sized for the default model: a model it does not fit is one error
    line before any Verilog is generated or built."""
    def build(top, progress=None):
        raise AssertionError("the twin was built")

    monkeypatch.setattr(board_sim, "build", build)
    code, out, err = _run(checkpoint, tmp_path, "--backend", "board-sim", "--board",
                          "icebreaker")
    assert code == 2 and out == "" and not (tmp_path / "y.npy").exists()
    # boards/icebreaker.yaml on the default model: hidden 128, 8 experts, 4 layers, G = 32,
    # 4 lanes of 2:4 int4; the test layer: hidden 32, 4 experts, FFN 32, 2 layers.
    assert err.strip().splitlines()[-1] == (
        "moefpga: error: the twin of board icebreaker does not fit this model: hidden: device "
        "128, needed 32; experts: device 8, needed 4")


def test_sizing_the_twin_leaves_no_unused_elaboratable(checkpoint):
    """``twin_sizes`` reads the sizes of ``hardware_for``'s MoeLayer without amaranth's "created
    but never used" warning, which an unused MoeLayer does give once anything was elaborated
    (as the twin's Verilog is)."""
    from amaranth.hdl import Fragment, Module, UnusedElaboratable

    weights = Checkpoint.open(checkpoint[0]).moe_layer(0)
    spec = QuantSpec(bits=4, sparsity=parse_sparsity("2:4"))
    Fragment.get(Module(), None)         # elaborated: amaranth's warning is live from now on

    def unused_warnings(make):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make()
            gc.collect()
        return [w for w in caught if issubclass(w.category, UnusedElaboratable)]

    assert unused_warnings(lambda: hardware_for(weights, spec, num_layers=2))   # the control
    sizes = []
    assert unused_warnings(lambda: sizes.append(twin_sizes(weights, spec, num_layers=2))) == []
    assert (sizes[0].hidden, sizes[0].experts, sizes[0].params.lanes) == (32, 4, 4)
