"""``moefpga bench --quick`` on a tiny model: results.json checked against facts computed here
from the model's shapes and the board file, not taken from the bench, and the plots written.

One configuration (the iCEBreaker's: 4 lanes of 2:4 int4, T_max 4, two slots) so the run takes
one Verilator build of a small top (about 1-2 minutes cold), in the test session's build cache
(conftest.py)."""

import json
import math
from pathlib import Path

import pytest
import yaml
from cli_runner import main

from moefpga.hls_models.calibrate import QuantSpec, quantize_layer
from moefpga.hls_models.checkpoint import Checkpoint
from moefpga.hls_models.sparsity import Sparsity
from moefpga.hls_models.synthetic import write_checkpoint
from moefpga.host.bench import board_clock
from moefpga.host.cli import default_calibration

REPO = Path(__file__).resolve().parents[1]
BOARD = yaml.safe_load((REPO / "boards" / "icebreaker.yaml").read_text())
#: The tiny model: routed and shared experts of the same size, so every record has one size.
D, F, EXPERTS, TOP_K, LAYERS = 32, 32, 4, 2, 2
PREFILL, DECODE = 8, 1      # what --quick runs


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bench") / "model", "qwen2_moe",
                            num_layers=LAYERS, hidden_size=D, num_experts=EXPERTS, top_k=TOP_K,
                            expert_ffn_size=F, shared_expert_ffn_size=F, vocab_size=64)


@pytest.fixture(scope="module")
def bench(model, tmp_path_factory):
    """``(results, folder, stdout)`` of one quick bench run on the tiny model."""
    folder = tmp_path_factory.mktemp("bench-out")
    code, out, err = main("bench", "--checkpoint", model, "--quick", "--configs",
                          "icebreaker", "--output", folder / "out")
    assert code == 0, err
    return json.loads((folder / "out" / "results.json").read_text()), folder, out


def _config(results):
    [config] = results["configs"]
    assert config["name"] == "icebreaker"
    return config


def test_multiplies_are_kept_weights_times_tokens(bench):
    """Every expert a token picks, and the shared expert, multiplies its kept weights (2 of
    every 4 of 3 d f) once per token; a run multiplies nothing else."""
    config = _config(bench[0])
    kept = 3 * D * F * BOARD["n"] // BOARD["m"]
    for entry in config["layers"]:
        for phase, tokens in (("prefill", PREFILL), ("decode", DECODE)):
            assert entry[phase]["tokens"] == tokens
            assert entry[phase]["multiplies"] == kept * tokens * (TOP_K + 1)
    assert config["prefill"]["multiplies"] == kept * PREFILL * (TOP_K + 1) * LAYERS


def test_utilization_and_per_token_figures(bench):
    """Utilization is multiplies over cycles times the board's P x N multipliers; per-token
    figures divide by tokens and layers; compute and stall fit in the cycles."""
    config = _config(bench[0])
    multipliers = BOARD["lanes"] * BOARD["n"]
    for phase in ("prefill", "decode"):
        s = config[phase]
        layers = config["layers"]
        assert s["cycles"] == sum(e[phase]["cycles"] for e in layers)
        assert s["utilization"] == pytest.approx(s["multiplies"] / (s["cycles"] * multipliers))
        assert 0 < s["utilization"] < 1
        assert s["cycles_per_token_per_layer"] == pytest.approx(
            s["cycles"] / (s["tokens"] * LAYERS))
        assert s["dense_equivalent_macs_per_cycle"] == pytest.approx(
            s["multiplies"] * BOARD["m"] / BOARD["n"] / s["cycles"])
        for e in layers:
            assert e[phase]["compute"] + e[phase]["stall"] <= e[phase]["cycles"]
            assert e[phase]["compute"] > 0


def test_decode_on_empty_slots_loads_every_expert(bench, model):
    """A single token on empty slots loads its k experts and the shared expert, hits nothing,
    and streams that many records of the size host.pack gives this hardware."""
    from moefpga.boards.config import load_board
    from moefpga.host.pack import pack_layer
    from moefpga.rtl.expert_ffn_params import ExpertFfnParams

    results, _, _ = bench
    config = _config(results)
    checkpoint = Checkpoint.open(model)
    spec = QuantSpec(bits=BOARD["weight_bits"], group_size=BOARD["group_size"],
                     sparsity=Sparsity(m=BOARD["m"], n=BOARD["n"]))
    weights = checkpoint.moe_layer(0)
    params = ExpertFfnParams(**load_board("icebreaker").ffn_kwargs(
        {"hidden_size": D, "expert_ffn_size": F, "shared_expert_ffn_size": F}))
    records = pack_layer(quantize_layer(weights, spec, default_calibration(checkpoint, 0)), 0,
                         params)
    assert len({len(r) for r in records}) == 1
    for entry in config["layers"]:
        assert (entry["decode"]["loads"], entry["decode"]["hits"]) == (TOP_K + 1, 0)
    decode = config["decode"]
    assert decode["record_bytes_per_token"] == LAYERS * (TOP_K + 1) * len(records[0])
    # On the link: at least the records and the token beats, at most 1 % framing on top
    payload = decode["record_bytes_per_token"] + LAYERS * 3 * D
    assert payload < decode["link_bytes_per_token"]["to_device"] < 1.01 * payload + 2000


def test_tokens_per_second_from_clock_and_link(bench):
    """Clock-limited rate = clock / cycles per token over all layers; link-limited = (baud /
    10) / bytes on the busier direction; the bound is the smaller."""
    config = _config(bench[0])
    rate = config["board_rate"]
    clock, _ = board_clock("icebreaker")
    assert rate["clock_mhz"] == clock
    assert rate["baud"] == BOARD["baud"]
    for phase in ("prefill", "decode"):
        s, r = config[phase], rate[phase]
        assert r["clock_limited_tokens_per_s"] == pytest.approx(
            clock * 1e6 * s["tokens"] / s["cycles"])
        assert r["link_limited_tokens_per_s"] == pytest.approx(
            BOARD["baud"] / 10 / max(s["link_bytes_per_token"].values()))
        assert r["tokens_per_s"] == min(r["clock_limited_tokens_per_s"],
                                        r["link_limited_tokens_per_s"])


def test_cache_rows_and_tools(bench):
    """Each predictor has a row (no accuracy without one); the speed ratio is the two measured
    speeds; Verilator's speed is over the prefill runs; packing measured."""
    results = bench[0]
    rows = {row["predictor"]: row for row in _config(results)["cache"]}
    assert set(rows) == {"none", "gate", "history"}
    assert rows["none"]["prediction_accuracy"] is None
    for row in rows.values():
        assert 0 <= row["hit_rate"] <= 1 and row["tokens"] == 8 and row["slots"] == 2
    assert 0 <= rows["gate"]["prediction_accuracy"] <= 1
    tools = results["tools"]
    assert tools["amaranth"]["cycles"] + tools["amaranth"]["warmup_cycles"] == 300
    assert tools["verilator_over_amaranth"] == pytest.approx(
        tools["verilator"]["cycles_per_s"] / tools["amaranth"]["cycles_per_s"])
    # the driver's cycles include loading the router weights, outside the counted batches
    assert tools["verilator"]["cycles"] > _config(results)["prefill"]["cycles"]
    assert tools["packing"]["mb_per_s"] > 0 and not math.isnan(tools["packing"]["mb_per_s"])


def test_plots_and_table(bench):
    """Three PNG files, not empty; the table printed names the configuration."""
    _, folder, out = bench
    for name in ("cycles.png", "utilization.png", "roofline.png"):
        data = (folder / "out" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert "icebreaker" in out and "results.json" in out


def test_unknown_configuration_is_one_error_line():
    code, out, err = main("bench", "--configs", "dense,nosuch", "--quick")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "moefpga: error: unknown configuration 'nosuch'; choose from dense, 2:4, 1:4, "
        "dense-1slot, icebreaker, ulx3s-85f"]


def test_outputs_that_differ_from_the_integer_model_stop_the_bench(bench, model, tmp_path,
                                                                    monkeypatch):
    """A design whose outputs are not the integer model's is not measured: one error line,
    status 2, no results.json (the top is the bench fixture's, already built)."""
    from moefpga.host import bench as bench_module
    reference = bench_module.intmodel.moe_layer
    monkeypatch.setattr(bench_module.intmodel, "moe_layer",
                        lambda *args, **kw: reference(*args, **kw) + 1)
    code, out, err = main("bench", "--checkpoint", model, "--quick", "--configs",
                          "icebreaker", "--output", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("moefpga: error: the simulated layer ")
    assert "differ from the integer model" in lines[-1]
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_checkpoint_leaves_no_output_folder(tmp_path):
    code, _, err = main("bench", "--checkpoint", tmp_path / "nowhere", "--output",
                        tmp_path / "out")
    assert code == 2 and "nowhere" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("report, expected", [
    (None, BOARD["target_mhz"]),
    ({"core": "board_top", "timing_met": True, "fmax_mhz": 25.5}, 25.5),
    ({"core": "board_top", "timing_met": False, "fmax_mhz": 14.2}, BOARD["target_mhz"]),
    ({"core": "router in the development harness (not the board top)", "timing_met": True,
      "fmax_mhz": 30.7}, BOARD["target_mhz"]),
    ("not json", BOARD["target_mhz"]),
])
def test_board_clock_is_a_built_board_tops_fmax_or_the_target(tmp_path, report, expected):
    """Only the report of a board top that met timing gives the board's clock."""
    if report is not None:
        (tmp_path / "icebreaker").mkdir()
        (tmp_path / "icebreaker" / "report.json").write_text(
            report if isinstance(report, str) else json.dumps(report))
    assert board_clock("icebreaker", tmp_path)[0] == expected
