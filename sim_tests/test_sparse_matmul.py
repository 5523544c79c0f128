"""The M:N sparse matmul engine on Verilator against ``intmodel.matvec``, bit for bit.

The pytest functions build one engine per configuration and run the cocotb tests below on it:
random batches and directed corners with random stalls on every stream, and the cycle count of
whole matrices with streams that never stall.
"""

import cocotb
import numpy as np
import pytest
from cocotb.triggers import RisingEdge
from harness import beat, params, report, run, start, stream_sink, stream_source, sweep, transfers

from moefpga.hls_models.intmodel import matvec
from moefpga.rtl.sparse_matmul import SparseMatmulEngine
from moefpga.rtl.sparse_matmul_params import SparseMatmulParams

# The dense engine of a pair has the sparse engine's lanes and multipliers per lane (n).
_P4_2OF4 = dict(lanes=4, m=4, n=2, weight_bits=8, group_size=32, max_tokens=4, max_cols=128)
_P4_DENSE = dict(_P4_2OF4, m=2)
_P8_2OF4 = dict(lanes=8, m=4, n=2, weight_bits=4, group_size=16, max_tokens=2, max_cols=128)
_P8_DENSE = dict(_P8_2OF4, m=2)

CONFIGS = sweep(
    default=[
        _P4_2OF4,
        _P4_DENSE,
        dict(lanes=1, m=1, n=1, weight_bits=4, group_size=16, max_tokens=2, max_cols=128),
        dict(lanes=8, m=4, n=1, weight_bits=8, group_size=8, max_tokens=3, max_cols=128,
             acc_bits=24),
    ],
    full=[
        dict(lanes=8, m=8, n=2, weight_bits=4, group_size=32, max_tokens=4, max_cols=128),
        dict(lanes=1, m=4, n=2, weight_bits=4, group_size=4, max_tokens=1, max_cols=128,
             acc_bits=20),
        dict(lanes=4, m=4, n=1, weight_bits=4, group_size=64, max_tokens=4, max_cols=128),
        dict(lanes=4, m=8, n=2, weight_bits=8, group_size=8, max_tokens=2, max_cols=128),
        dict(lanes=8, m=4, n=4, weight_bits=8, group_size=32, max_tokens=2, max_cols=128),
        _P8_2OF4,
        _P8_DENSE,
    ],
)
PAIRS = sweep(default=[(_P4_2OF4, _P4_DENSE)], full=[(_P8_2OF4, _P8_DENSE)])

THROUGHPUT_SHAPES = [(64, 64), (128, 128)]   # rows x cols of the matrices timed
MIN_UTILIZATION = 0.95


def _simulate(config, *, pattern=None, testcase=None):
    """Run the cocotb tests on the engine of ``config``; the timed matrices are pruned to
    ``pattern`` (n, m), by default the engine's own."""
    engine = SparseMatmulEngine(**config)
    pattern = pattern or (config["n"], config["m"])
    return run(engine, name="sparse_matmul", config=engine.params.name, test_module=__name__,
               parameters={"engine": config, "pattern": pattern}, testcase=testcase)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: SparseMatmulParams(**c).name)
def test_sparse_matmul(config, sim_report):
    records = _simulate(config)
    sim_report.extend(record["text"] for record in records)
    assert any(record.get("cycles") for record in records)


@pytest.mark.parametrize("sparse, dense", PAIRS,
                         ids=lambda c: SparseMatmulParams(**c).name)
def test_dense_vs_sparse_cycles(sparse, dense, sim_report):
    """The same M:N-pruned matrices on an M:N engine and on the dense engine with as many
    multipliers: the sparse engine needs n/m of the dense engine's cycles, up to the latency."""
    records = {}
    for config in (sparse, dense):
        for record in _simulate(config, pattern=(sparse["n"], sparse["m"]),
                                testcase="throughput"):
            if record["tokens"] == 1:
                records.setdefault(record["shape"], []).append(record)
    ideal = sparse["n"] / sparse["m"]
    for shape, (on_sparse, on_dense) in records.items():
        ratio = on_sparse["cycles"] / on_dense["cycles"]
        sim_report.append(f"{shape} matrix, 1 token: {sparse['n']}:{sparse['m']} "
                          f"{on_sparse['cycles']} cycles, dense {on_dense['cycles']} cycles, "
                          f"ratio {ratio:.3f} (ideal {ideal:.3f}; sustained "
                          f"{on_sparse['sustained'] / on_dense['sustained']:.3f})")
        assert ratio <= ideal * 1.05


# Test vectors


def _weights(rng, p, rows, cols, *, fill=None, pattern=None):
    """Random ``rows`` x ``cols`` weights with at most n non-zeros in every group of m columns
    (``pattern`` (n, m), by default the engine's), a tenth of the groups with fewer; every kept
    weight is ``fill`` if given."""
    n, m = pattern or (p.n, p.m)
    lo, hi = -(1 << (p.weight_bits - 1)), (1 << (p.weight_bits - 1)) - 1
    q = rng.integers(lo, hi + 1, (rows, cols)) if fill is None else np.full((rows, cols), fill)
    keep = rng.permuted(np.broadcast_to(np.arange(m) < n, (rows, cols // m, m)), axis=-1)
    if fill is None:
        keep &= rng.random(keep.shape) >= 0.1
    return q * keep.reshape(rows, cols)


def _mantissas(rng, p, rows, cols):
    return rng.integers(1, 257, (rows, cols // p.group_size))


class Engine:
    """The engine's streams, with the given stall probabilities on inputs and output."""

    def __init__(self, dut, *, seed, stall):
        self.p = SparseMatmulParams(**params()["engine"])
        self.cmd = stream_source(dut, "cmd", seed=seed, stall=stall)
        self.x = stream_source(dut, "x", seed=seed + 1, stall=stall)
        self.w = stream_source(dut, "w", seed=seed + 2, stall=stall)
        self.o = stream_sink(dut, "o", seed=seed + 3, stall=stall)

    def load(self, x):
        self.cmd.send_nowait(beat(self.p.command_bits(tokens=x.shape[0], cols=x.shape[1])))
        for bits in self.p.activation_beats(x):
            self.x.send_nowait(beat(bits))

    def queue_run(self, q, mant, tokens):
        rows, cols = q.shape
        self.cmd.send_nowait(beat(self.p.command_bits(tokens=tokens, cols=cols, rows=rows)))
        for bits in self.p.weight_beats(q, mant):
            self.w.send_nowait(beat(bits))

    async def check(self, q, mant, x):
        """Receive the results of the queued run of ``q`` on ``x``; check them bit for bit."""
        count = q.shape[0] // self.p.lanes * len(x)
        got = self.p.outputs([int((await self.o.recv()).payload) for _ in range(count)], len(x))
        expected = matvec(q, mant, self.p.group_size, x, self.p.acc_bits)
        mismatch = np.argwhere(got != expected)
        assert not len(mismatch), (f"{len(mismatch)} results differ, first at (token, row) "
                                   f"{tuple(mismatch[0])}: {got[tuple(mismatch[0])]} != "
                                   f"{expected[tuple(mismatch[0])]}")

    async def run(self, q, mant, x):
        """Run ``q`` on the loaded activations ``x`` and check the results bit for bit."""
        self.queue_run(q, mant, len(x))
        await self.check(q, mant, x)


# cocotb tests

_TIMEOUT = dict(timeout_time=5, timeout_unit="ms")   # a hang fails in about 20 s


@cocotb.test(**_TIMEOUT)
async def random_batches(dut):
    """Random shapes, weights, mantissas and activations; 30 % stalls on every stream."""
    await start(dut)
    engine = Engine(dut, seed=10, stall=0.3)
    p, rng = engine.p, np.random.default_rng(11)
    for _ in range(6):
        tokens = int(rng.integers(1, p.max_tokens + 1))
        cols = p.group_size * int(rng.integers(1, p.max_cols // p.group_size + 1))
        x = rng.integers(-128, 128, (tokens, cols))
        engine.load(x)
        for _ in range(2):                      # two matrices on the same activations
            rows = p.lanes * int(rng.integers(1, 4))
            await engine.run(_weights(rng, p, rows, cols), _mantissas(rng, p, rows, cols), x)
    report(f"random: 12 matrices on {p.name} equal intmodel.matvec with stalls on every stream")


@cocotb.test(**_TIMEOUT)
async def corners(dut):
    """Extreme weights, activations and mantissas; all-zero groups; saturation both ways."""
    await start(dut)
    engine = Engine(dut, seed=20, stall=0.5)
    p, rng = engine.p, np.random.default_rng(21)
    w_min, w_max = -(1 << (p.weight_bits - 1)), (1 << (p.weight_bits - 1)) - 1
    rows, tokens, cols = 2 * p.lanes, p.max_tokens, p.max_cols
    x_ones = np.ones((tokens, cols), dtype=np.int64)
    mant_max = np.full((rows, cols // p.group_size), 256)
    for x_fill in (-128, 127):
        x = x_ones * x_fill
        engine.load(x)
        for w_fill in (w_min, w_max):
            await engine.run(_weights(rng, p, rows, cols, fill=w_fill), mant_max, x)
    x = rng.integers(-128, 128, (tokens, cols))
    engine.load(x)
    q = _weights(rng, p, rows, cols)
    q[:, : 2 * p.m] = 0                          # all-zero groups
    q[::2, p.group_size:] = 0                    # whole zero rows after the first group
    await engine.run(q, _mantissas(rng, p, rows, cols), x)
    # An accumulator that climbs until it saturates, then falls until it saturates.
    x = x_ones * -128
    engine.load(x)
    q = _weights(rng, p, rows, cols, fill=w_min)
    q[:, cols // 2:] = np.where(q[:, cols // 2:], w_max, 0)
    expected = matvec(q, mant_max, p.group_size, x, p.acc_bits)
    await engine.run(q, mant_max, x)
    saturated = (np.abs(expected) >= (1 << (p.acc_bits - 1)) - 1).any()
    report(f"corners: extremes, zero groups and saturation ({'' if saturated else 'not '}"
           f"reached at {p.acc_bits} bits) equal intmodel.matvec")


@cocotb.test(**_TIMEOUT)
async def throughput(dut):
    """Whole matrices with streams that never stall, two back to back on the same activations.

    *Cycles* run from accepting the first matrix's command to its last result; *sustained*
    cycles from the first matrix's last result to the second's, the rate of back-to-back runs.
    Utilization is the fraction of those cycles in which all ``lanes * n`` multipliers work.
    """
    await start(dut)
    engine = Engine(dut, seed=30, stall=0)
    commands, outputs = transfers(dut, "cmd"), transfers(dut, "o")
    p, rng = engine.p, np.random.default_rng(31)
    pattern = tuple(params()["pattern"])
    for rows, cols in THROUGHPUT_SHAPES:
        for tokens in sorted({1, p.max_tokens}):
            x = rng.integers(-128, 128, (tokens, cols))
            engine.load(x)
            matrices = [(_weights(rng, p, rows, cols, pattern=pattern),
                         _mantissas(rng, p, rows, cols)) for _ in range(2)]
            for q, mant in matrices:
                engine.queue_run(q, mant, tokens)
            for q, mant in matrices:
                await engine.check(q, mant, x)
            await RisingEdge(dut.clk)
            per_run = rows // p.lanes * tokens
            first_end, second_end = outputs[-1 - per_run], outputs[-1]
            cycles, sustained = first_end - commands[-2], second_end - first_end
            busy = rows * cols * tokens // (p.lanes * p.m)
            report(f"{rows}x{cols} matrix, {tokens} token(s): {cycles} cycles "
                   f"({busy / cycles:.1%} of {p.lanes * p.n} multipliers busy), sustained "
                   f"{sustained} cycles ({busy / sustained:.1%}, "
                   f"{rows * cols * tokens / sustained:.2f} dense-equivalent MACs/cycle)",
                   shape=f"{rows}x{cols}", tokens=tokens, cycles=cycles, sustained=sustained)
            assert cycles == busy + SparseMatmulEngine.LATENCY
            assert sustained == busy + 1
            assert busy / sustained >= MIN_UTILIZATION
