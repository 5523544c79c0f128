"""``moefpga run --backend sim`` against ``--backend model``, and the Verilator build cache.

Every family (synthetic checkpoints, small sizes) with int8 and int4 weights, dense and 2:4:
the sim backend's Y.npy must equal the model backend's bit for bit. Each hardware configuration
is one Verilator build (about a minute), so the default run takes two builds: int8 dense for
Mixtral, OLMoE and Qwen3-MoE (the same hardware at these sizes) and int4 2:4 for Qwen2-MoE;
``MOEFPGA_SIM_FULL=1`` runs all sixteen. The builds go to the test session's cache
(conftest.py: a folder under ``build/`` removed after the session, or
``MOEFPGA_TEST_SIM_CACHE`` to keep the builds between sessions).
"""

import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from harness import sweep

from moefpga.hls_models.calibrate import calibration_tokens
from moefpga.hls_models.errors import MoefpgaError
from moefpga.hls_models.synthetic import write_checkpoint
from moefpga.host import sim
from moefpga.host.cli import main
from moefpga.host.sim_build import build_executable

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
#: (weight width, sparsity, extra options); the second also checks groups of 32 columns.
SETTINGS = (("int8", "dense", ()), ("int4", "2:4", ("--group-size", "32")),
            ("int8", "2:4", ()), ("int4", "dense", ()))
#: Two builds by default: at these sizes Mixtral, OLMoE and Qwen3-MoE layers are the same
#: hardware (they differ in the ``normalize`` input), so three families share the int8 dense
#: build; Qwen2-MoE (a gated shared expert) runs int4 2:4. The full sweep runs every pair.
DEFAULT = [("mixtral", SETTINGS[0]), ("olmoe", SETTINGS[0]), ("qwen3_moe", SETTINGS[0]),
           ("qwen2_moe", SETTINGS[1])]
CASES = sweep(DEFAULT, [(f, s) for f in FAMILIES for s in SETTINGS if (f, s) not in DEFAULT])
#: Tokens per run and T_max: batches of 8, 8 and 4 tokens.
TOKENS, MAX_TOKENS = 20, 8


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """A small two-layer checkpoint per family (Qwen2-MoE's shared expert twice as wide as the
    routed ones, so the datapath is sized by the larger) and the tokens, X.npy."""
    folder = tmp_path_factory.mktemp("run_sim")
    paths = {}
    for index, family in enumerate(FAMILIES):
        paths[family] = write_checkpoint(
            folder / family, family, num_layers=2, hidden_size=32, num_experts=4, top_k=2,
            expert_ffn_size=32, vocab_size=64, seed=index,
            shared_expert_ffn_size=64 if family == "qwen2_moe" else None)
    x = calibration_tokens(32, count=TOKENS, seed=11) * 1.5
    np.save(folder / "x.npy", x.astype(np.float32))
    return paths, folder / "x.npy"


def _run(capsys, checkpoint, x, output, backend, quant, sparsity, extra=(), layer=1):
    """``moefpga run`` in process: exit status, standard output and error, Y. The sim backend
    gets ``--max-tokens`` :data:`MAX_TOKENS` (the model backend refuses hardware options)."""
    hardware = ["--max-tokens", str(MAX_TOKENS)] if backend == "sim" else []
    status = main(["run", "--checkpoint", str(checkpoint), "--layer", str(layer), "--input",
                   str(x), "--output", str(output), "--backend", backend, "--quant", quant,
                   "--sparsity", sparsity, *hardware, *extra])
    out, err = capsys.readouterr()
    return status, out, err, np.load(output) if status == 0 else None


def _counters(out):
    """The counters summary line of ``run --backend sim`` as a dict of name to number."""
    line = next(line for line in out.splitlines() if line.startswith("counters: "))
    return {name: int(value) for name, value in
            (part.split() for part in line.removeprefix("counters: ").split(", "))}


@pytest.mark.parametrize("family, setting", CASES,
                         ids=[f"{f}-{s[0]}-{s[1]}" for f, s in CASES])
def test_sim_equals_model(capsys, checkpoints, tmp_path, family, setting, sim_report):
    paths, x = checkpoints
    quant, sparsity, extra = setting
    status, _, err, y_model = _run(capsys, paths[family], x, tmp_path / "model.npy", "model",
                                   quant, sparsity, extra)
    assert status == 0, err
    status, out, err, y_sim = _run(capsys, paths[family], x, tmp_path / "sim.npy", "sim",
                                   quant, sparsity, extra)
    assert status == 0, err
    assert y_model.any() and y_sim.dtype == y_model.dtype == np.float32
    assert np.array_equal(y_sim.view(np.uint32), y_model.view(np.uint32))
    assert "batch 3/3 done" in err
    counters = _counters(out)
    assert counters["cycles"] > 0 and 0 < counters["compute"] <= counters["cycles"]
    assert counters["loads"] > 0 and counters["rejected"] == counters["malformed"] == 0
    sim_report.append(f"{family} {quant} {sparsity}: equal to the model bit for bit; "
                      + "; ".join(line for line in out.splitlines()
                                  if line.startswith(("counters:", "per token:"))))


def test_cached_build(capsys, checkpoints, tmp_path):
    """A second run of a configuration takes the build from the cache; another layer of the
    same checkpoint is the same hardware."""
    paths, x = checkpoints
    quant, sparsity, extra = SETTINGS[0]
    for layer in (1, 0):
        status, _, err, y_sim = _run(capsys, paths["mixtral"], x, tmp_path / "sim.npy", "sim",
                                     quant, sparsity, extra, layer=layer)
        assert status == 0, err
    assert "using the cached Verilator model" in err and "building" not in err
    status, _, err, y_model = _run(capsys, paths["mixtral"], x, tmp_path / "model.npy",
                                   "model", quant, sparsity, extra, layer=0)
    assert np.array_equal(y_sim.view(np.uint32), y_model.view(np.uint32))


def test_hung_batch_is_an_error(capsys, checkpoints, tmp_path, monkeypatch):
    """A batch beyond its cycle budget (here made too small) stops the simulation: one line."""
    paths, x = checkpoints
    monkeypatch.setattr(sim, "_cycle_budget", lambda hw, records: 1000)
    quant, sparsity, extra = SETTINGS[0]
    status, _, err, _ = _run(capsys, paths["mixtral"], x, tmp_path / "y.npy", "sim", quant,
                             sparsity, extra)
    assert status == 2 and not (tmp_path / "y.npy").exists()
    assert _one_error_line(err).endswith("the simulation failed: the layer did not finish "
                                         "running a batch within 1000 cycles")


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert lines[-1].startswith("moefpga: error: ") and "Traceback" not in err, err
    return lines[-1]


@pytest.mark.parametrize("options, patch, expected", [
    (("--lanes", "64"), None, "hidden size 32 does not fit the simulated hardware: it is not a "
                              "multiple of 64 lanes"),
    (("--lanes", "3"), None, "not a multiple of 3 lanes"),
    (("--max-tokens", "65"), None, "--max-tokens 65 is out of range"),
    ((), ("SLOT_BYTES_LIMIT", 1000), "is larger than a simulated slot holds (1000 bytes)"),
])
def test_shapes_that_cannot_be_built(capsys, checkpoints, tmp_path, monkeypatch, options,
                                     patch, expected):
    paths, x = checkpoints
    if patch:
        monkeypatch.setattr(sim, *patch)
    status, _, err, _ = _run(capsys, paths["olmoe"], x, tmp_path / "y.npy", "sim", "int8",
                             "dense", options)
    assert status == 2 and expected in _one_error_line(err)
    assert "building" not in err and not (tmp_path / "y.npy").exists()


def test_too_many_experts(capsys, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "wide", "olmoe", num_layers=1, hidden_size=8,
                                  num_experts=257, top_k=2, expert_ffn_size=8, vocab_size=16,
                                  num_attention_heads=2, num_key_value_heads=1)
    np.save(tmp_path / "x.npy", np.ones((2, 8), np.float32))
    status, _, err, _ = _run(capsys, checkpoint, tmp_path / "x.npy", tmp_path / "y.npy", "sim",
                             "int8", "dense", ("--lanes", "4"), layer=0)
    assert status == 2 and "the simulated router takes 2 to 256" in _one_error_line(err)


def test_verilator_missing(capsys, checkpoints, tmp_path, monkeypatch):
    paths, x = checkpoints
    monkeypatch.setitem(__import__("sys").modules, "verilator", None)
    status, _, err, _ = _run(capsys, paths["olmoe"], x, tmp_path / "y.npy", "sim", "int8",
                             "dense")
    assert status == 2 and "Verilator is not installed" in _one_error_line(err)


def test_build_failure_names_its_log(capsys, checkpoints, tmp_path, monkeypatch):
    """A driver that does not compile: one line naming the kept log, which holds the error."""
    paths, x = checkpoints
    broken = tmp_path / "sim_moe_layer.cpp"
    broken.write_text('#error "deliberately broken driver"\n')
    monkeypatch.setattr(sim, "_DRIVER", broken)
    status, _, err, _ = _run(capsys, paths["olmoe"], x, tmp_path / "y.npy", "sim", "int8",
                             "dense")
    line = _one_error_line(err)
    assert status == 2 and "the Verilator build failed" in line
    log = Path(line.split("see its log ")[1])
    assert "deliberately broken driver" in log.read_text()
    assert not [p for p in log.parent.iterdir() if p.name.startswith(".")]   # no staging left


COUNTER_V = """module counter(input clk, input rst, output reg [7:0] count);
  always @(posedge clk) count <= rst ? 8'd0 : count + 8'd1;
endmodule
"""
COUNTER_CPP = """#include <cstdio>
#include "Vcounter.h"
int main() {
    Vcounter top;
    top.rst = 1; top.clk = 0; top.eval(); top.clk = 1; top.eval(); top.rst = 0;
    for (int i = 0; i < 10; ++i) { top.clk = 0; top.eval(); top.clk = 1; top.eval(); }
    std::printf("%d\\n", top.count);
    return 0;
}
"""


def test_concurrent_builds(tmp_path, monkeypatch):
    """Two builds of one design at the same time: both get the same working executable, one
    cache entry, no staging folder left."""
    monkeypatch.setenv("MOEFPGA_CACHE", str(tmp_path))
    results = []

    def build():
        try:
            results.append(build_executable(COUNTER_V, "counter", {"main.cpp": COUNTER_CPP}))
        except MoefpgaError as error:
            results.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert len(results) == 2 and results[0] == results[1], results
    assert sorted(p.name for p in (tmp_path / "verilator").iterdir()) == [results[0].parent.name]
    done = subprocess.run([str(results[0])], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "10"
