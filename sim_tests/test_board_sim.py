"""The whole host stack against the Verilator twin of the board top (no cocotb: the twin is a
plain executable behind a pseudo-terminal).

:class:`~moefpga.host.accelerator.Accelerator` over :class:`~moefpga.host.link.Link` over
:class:`~moefpga.host.transport.SerialTransport` (pyserial) on the twin's pseudo-terminal, the
code path of a real board: outputs equal ``intmodel.moe_layer`` bit for bit over two layers of
three batches each, with the predictor off and on (prefetches turn loads into hits and cut the
stall cycles); faults injected into the byte stream both ways, and a stalled twin, are
recovered with the same answers; a twin that dies is one error; a model the twin does not fit
is refused naming every mismatch; a decode trace gives the hits, loads and prediction accuracy
of ``moefpga cache-sim``'s replay; ``moefpga run --backend board-sim`` and ``--backend serial``
(on a running twin) write the same Y.npy as ``--backend model``.

One twin build (a Qwen2-MoE layer: hidden 32, 4 experts of FFN 32, top-2, a gated shared
expert; P = 2 lanes of 2:4 int4, G = 32, T_max 4, 3 slots), about a minute, in the test
session's build cache (conftest.py), which ``test_generate_sim`` reuses.
"""

import os
import random
import signal
import threading
import time

import numpy as np
import pytest
from harness import FULL_SWEEP

from moefpga.hls_models import intmodel
from moefpga.hls_models.calibrate import QuantSpec, calibration_tokens, quantize_layer
from moefpga.hls_models.checkpoint import Checkpoint
from moefpga.hls_models.errors import MoefpgaError
from moefpga.hls_models.quant import quantize_activations
from moefpga.hls_models.sparsity import parse_sparsity
from moefpga.hls_models.synthetic import write_checkpoint
from moefpga.host import board_sim
from moefpga.host.accelerator import Accelerator
from moefpga.host.cache_sim import record_trace, replay
from moefpga.host.cli import default_calibration, main
from moefpga.host.link import Link
from moefpga.host.pack import pack_layer
from moefpga.host.predictor import top_k
from moefpga.host.sim_options import SimOptions
from moefpga.host.transport import SerialTransport

SPEC = QuantSpec(bits=4, group_size=32, sparsity=parse_sparsity("2:4"))
OPTIONS = SimOptions(lanes=2, max_tokens=4, slots=3)
#: 10 tokens: batches of 4, 4 and 2.
TOKENS = 10
CLI_SPEC = ["--quant", "int4", "--group-size", "32", "--sparsity", "2:4"]
CLI_HW = ["--lanes", "2", "--max-tokens", "4", "--slots", "3"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A two-layer Qwen2-MoE checkpoint, its layers quantized as ``run`` quantizes them, the
    tokens as float (X.npy) and quantized."""
    folder = tmp_path_factory.mktemp("board_sim")
    path = write_checkpoint(folder / "qwen2", "qwen2_moe", num_layers=2, hidden_size=32,
                            num_experts=4, top_k=2, expert_ffn_size=32,
                            shared_expert_ffn_size=32, vocab_size=64, seed=3)
    checkpoint = Checkpoint.open(path)
    layers = {i: quantize_layer(checkpoint.moe_layer(i), SPEC, default_calibration(checkpoint, i))
              for i in checkpoint.config.moe_layers}
    x = (calibration_tokens(32, count=TOKENS, seed=11) * 1.5).astype(np.float32)
    np.save(folder / "x.npy", x)
    return path, layers, folder / "x.npy", quantize_activations(x)


@pytest.fixture(scope="module")
def twin(model):
    """The twin's board top and executable."""
    _, layers, _, _ = model
    top = board_sim.twin_for_layers(layers, num_layers=2, options=OPTIONS)
    return top, board_sim.build(top)


def session(executable, layers, predictor="none", wrap=None, timeout=2.0):
    """A started twin and an Accelerator on its pseudo-terminal (closed and stopped by the
    caller: ``with twin_process: ...``)."""
    process = board_sim.BoardSim(executable)
    transport = SerialTransport(process.port)
    link = Link(wrap(transport) if wrap else transport, timeout=timeout)
    try:
        accelerator = Accelerator(link, layers, num_layers=2, predictor=predictor,
                                  reply_timeout=120)
    except BaseException:
        transport.close()
        process.stop()
        raise
    return process, accelerator


def run_both_layers(accelerator, layers, xq, exp):
    """Layer 0 then layer 1 on the same tokens; each must equal the integer model."""
    for index, layer in layers.items():
        out = accelerator.run_layer(index, xq, exp)
        assert out.dtype == np.int64
        assert np.array_equal(out, intmodel.moe_layer(xq, exp, layer)), f"layer {index}"


def test_two_layers_predictor_off_and_on(model, twin, sim_report):
    """Bit for bit over two layers and six batches; with the gate predictor the next layer's
    experts are prefetched after layer 0, so layer 1 hits them and stalls less."""
    _, layers, _, (xq, exp) = model
    top, executable = twin
    results = {}
    for predictor in ("none", "gate"):
        process, accelerator = session(executable, layers, predictor)
        with process:
            assert accelerator.identity == top.identity
            assert accelerator.identity.fmax_khz == 0
            run_both_layers(accelerator, layers, xq, exp)
            stats = accelerator.stats
            accelerator.close()
        results[predictor] = stats
        sizes = {i: [len(r) for r in pack_layer(layer, i, top.layer.params)]
                 for i, layer in layers.items()}
        assert stats.tokens == 2 * TOKENS and stats.batches == 6
        assert stats.requests == stats.loads       # the device counts demand loads only
        assert stats.mirror_differences == 0, "the slot mirror must predict every request"
        assert stats.bytes_streamed == (stats.requests + stats.prefetches) * sizes[0][0]
        assert stats.compute > 0 and stats.stall > 0 and stats.cycles >= stats.compute
        sim_report.append(f"twin, predictor {predictor}: {stats.cycles} cycles, stall "
                          f"{stats.stall}, loads {stats.loads}, hits {stats.hits}, "
                          f"{stats.requests} requested + {stats.prefetches} prefetched records, "
                          f"{stats.bytes_streamed} bytes; accuracy {stats.accuracy}; "
                          f"twin ran {process.summary['cycles']} cycles")
    off, on = results["none"], results["gate"]
    assert off.prefetches == 0 and off.accuracy is None and off.predicted == 0
    # The gate predictor's accuracy, scored here independently: layer 1's router on the
    # tokens (the host's guesses) against layer 1's picks by the integer model.
    _, picks, _ = intmodel.moe_layer(xq, exp, layers[1], return_routing=True)
    hidden = xq * np.exp2(exp.astype(np.float64))[:, None]
    guesses = top_k(hidden @ layers[1].router.T.astype(np.float64), 2)
    right = sum(len(set(g) & set(p)) for g, p in zip(guesses.tolist(), picks.tolist(),
                                                      strict=True))
    assert (on.predicted_correct, on.picks, on.predicted) == (right, picks.size, guesses.size)
    assert on.prefetches > 0
    assert on.hits > off.hits and on.requests < off.requests
    assert on.stall < off.stall, (on.stall, off.stall)


def test_decode_trace_equals_cache_replay(model, twin, sim_report):
    """Tokens decoded one at a time through the whole model (``cache_sim.record_trace``), each
    MoE step run on the twin with the history predictor: the device's hits and loads, the
    prefetches and the prediction accuracy equal ``cache_sim.replay`` of the same trace
    (pure Python), and every output equals the integer model."""
    checkpoint, layers, _, _ = model
    _, executable = twin
    predictors = ("history", "gate", "none") if FULL_SWEEP else ("history",)
    trace = record_trace(Checkpoint.open(checkpoint), SPEC, 16 if FULL_SWEEP else 6)
    for predictor in predictors:
        process, accelerator = session(executable, layers, predictor)
        with process:
            for steps in trace.tokens:
                for step in steps:
                    xq, exp = quantize_activations(step.hidden)
                    out = accelerator.run_layer(step.layer, xq, exp)
                    assert np.array_equal(out, intmodel.moe_layer(xq, exp, layers[step.layer]))
            stats = accelerator.stats
            accelerator.close()
        replayed = replay(trace, slots=OPTIONS.slots, policy="lru", predictor=predictor)
        assert (stats.hits, stats.loads, stats.prefetches, stats.accuracy) == (
            replayed.stats.hits, replayed.stats.demand_loads, replayed.stats.prefetches,
            replayed.accuracy)
        sim_report.append(f"decode trace of {len(trace.tokens)} tokens, {predictor}: hit rate "
                          f"{stats.hit_rate:.1%}, accuracy {stats.accuracy}, stall "
                          f"{stats.stall} of {stats.cycles} cycles, as cache-sim's replay")


class FaultyTransport:
    """A transport that corrupts what passes through it (seeded): a written chunk (one frame)
    with probability ``rate``, a read chunk with probability ``byte_rate`` per byte (reads are
    often single bytes: the twin writes a byte at a time), gets a bit flipped, a byte dropped,
    a garbage byte inserted or its tail cut; now and then a write waits ``stall`` seconds
    first (a host that stalls)."""

    def __init__(self, inner, seed, rate=0.08, byte_rate=0.0005, stall=0.3):
        self.inner, self.rate, self.byte_rate, self.stall = inner, rate, byte_rate, stall
        self.random = random.Random(seed)
        self.faults = 0

    def _spoil(self, data, rate):
        if not data or self.random.random() >= rate:
            return data
        self.faults += 1
        data = bytearray(data)
        at = self.random.randrange(len(data))
        kind = self.random.randrange(4)
        if kind == 0:
            data[at] ^= 1 << self.random.randrange(8)
        elif kind == 1:
            del data[at]
        elif kind == 2:
            data.insert(at, self.random.randrange(256))
        else:
            del data[at:]
        return bytes(data)

    def read(self, limit, timeout):
        data = self.inner.read(limit, timeout)
        return self._spoil(data, 1 - (1 - self.byte_rate) ** len(data))

    def write(self, data):
        if self.random.random() < self.rate / 4:
            time.sleep(self.stall)
        self.inner.write(self._spoil(data, self.rate))

    def close(self):
        self.inner.close()


def test_faults_are_recovered(model, twin, sim_report):
    """Corrupted bytes both ways, a stalling host and a twin stopped for 2 s mid-run: the
    same outputs, with the retransmissions counted."""
    _, layers, _, (xq, exp) = model
    _, executable = twin
    faulty = []

    def wrap(transport):
        faulty.append(FaultyTransport(transport, seed=5))
        return faulty[-1]

    process, accelerator = session(executable, layers, "gate", wrap=wrap, timeout=1.0)
    with process:
        pause = threading.Timer(1.0, lambda: os.kill(process.pid, signal.SIGSTOP))
        resume = threading.Timer(3.0, lambda: os.kill(process.pid, signal.SIGCONT))
        pause.start()
        resume.start()
        try:
            run_both_layers(accelerator, layers, xq, exp)
            if FULL_SWEEP:
                run_both_layers(accelerator, layers, xq, exp)
        finally:
            resume.join()
            pause.join()
        stats = accelerator.stats
        accelerator.close()
    assert faulty[0].faults >= 5, faulty[0].faults
    assert stats.resent > 0 and stats.bad_frames > 0
    assert stats.mirror_differences == 0
    sim_report.append(f"twin with {faulty[0].faults} chunks corrupted and a 2 s stop: "
                      f"same outputs; host resent {stats.resent} frames, received "
                      f"{stats.bad_frames} broken ones")


def test_dead_twin_is_one_error(model, twin):
    """The twin killed during a batch: a MoefpgaError naming the port, within seconds."""
    _, layers, _, (xq, exp) = model
    _, executable = twin
    process, accelerator = session(executable, layers)
    with process:
        threading.Timer(0.5, os.kill, (process.pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(MoefpgaError, match=f"serial port {process.port}|link: "):
            for _ in range(20):
                accelerator.run_layer(0, xq, exp)
        assert time.monotonic() - start < 30
        accelerator.close()


def test_identity_mismatch_refused(twin, tmp_path):
    """A model the twin does not fit: one MoefpgaError naming every mismatch."""
    _, executable = twin
    path = write_checkpoint(tmp_path / "mixtral", "mixtral", num_layers=2, hidden_size=64,
                            num_experts=8, top_k=2, expert_ffn_size=64, vocab_size=64)
    checkpoint = Checkpoint.open(path)
    layers = {i: quantize_layer(checkpoint.moe_layer(i), QuantSpec(),
                                default_calibration(checkpoint, i)) for i in (0, 1)}
    with pytest.raises(MoefpgaError) as error:
        session(executable, layers)
    assert str(error.value) == (
        "the device does not fit this model: hidden: device 32, needed 64; experts: device 4, "
        "needed 8; shared: device 2, needed 0; ffn: device 32, needed at least 64; "
        "weight_bits: device 4, needed at least 8; sparsity: device 2:4, needed dense")


def _y(capsys, checkpoint, x, output, *args):
    status = main(["run", "--checkpoint", str(checkpoint), "--layer", "1", "--input", str(x),
                   "--output", str(output), *CLI_SPEC, *args])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out, np.load(output)


def test_run_board_sim_and_serial_equal_model(model, twin, tmp_path, capsys, sim_report):
    """``run --backend board-sim`` (the twin sized for the checkpoint: the cached build) and
    ``run --backend serial`` on a running twin's pseudo-terminal write the model's Y.npy."""
    checkpoint, _, x, _ = model
    _, executable = twin
    _, expected = _y(capsys, checkpoint, x, tmp_path / "model.npy", "--backend", "model")
    out, y = _y(capsys, checkpoint, x, tmp_path / "board.npy", "--backend", "board-sim",
                "--predictor", "gate", "--policy", "lfu", *CLI_HW)
    assert np.array_equal(y, expected)
    assert "device: 2 lanes, 2:4 int4 G=32, hidden 32" in out and "Fmax unknown" in out
    assert "board-sim layer 1: 10 tokens in 3 batches, policy lfu, predictor gate" in out
    assert "cache: hit rate" in out and "prediction accuracy: -" in out
    sim_report.append("run --backend board-sim: " + out.splitlines()[2])
    with board_sim.BoardSim(executable) as process:
        out, y = _y(capsys, checkpoint, x, tmp_path / "serial.npy", "--backend", "serial",
                    "--port", process.port)
    assert np.array_equal(y, expected)
    assert "serial layer 1: 10 tokens in 3 batches" in out
