"""``moefpga logits`` and ``moefpga generate`` with ``--backend sim``: every MoE layer of a tiny
whole model on the Verilated MoE layer top, against ``--backend model``.

One Verilator build by default: the Mixtral checkpoint and hardware of ``test_run_sim``'s first
case (hidden 32, 4 experts of FFN 32, top-2, two layers, int8 dense, T_max 8), taken from
the test session's build cache (conftest.py) when that module ran first.
``MOEFPGA_SIM_FULL=1`` adds Qwen2-MoE (a gated shared expert) with int4 2:4 weights, one more
build.
"""

import re

import numpy as np
import pytest
from harness import sweep

from moefpga.hls_models.synthetic import write_checkpoint
from moefpga.host.cli import main

#: Prompt of 10 tokens: with T_max 8, a prefill of two batches per layer.
PROMPT = "1,2,3,4,5,6,7,8,9,10"
NEW_TOKENS = 3
LAYERS, HIDDEN, FFN, TOP_K, MAX_TOKENS = 2, 32, 32, 2, 8
CASES = sweep([("mixtral", ("--quant", "int8"))],
              [("qwen2_moe", ("--quant", "int4", "--group-size", "32", "--sparsity", "2:4"))])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generate_sim")
    return {family: write_checkpoint(
        folder / family, family, num_layers=LAYERS, hidden_size=HIDDEN, num_experts=4,
        top_k=TOP_K, expert_ffn_size=FFN, vocab_size=64, seed=0,
        shared_expert_ffn_size=64 if family == "qwen2_moe" else None)
        for family, _ in CASES}


def run(capsys, *args):
    """``moefpga`` in process: exit status, standard output and error."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as exc:      # argparse's refusals
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def report(err):
    """The accelerator backend's report on standard error: per phase (tokens, cycles, cycles
    per token per layer, tokens/s), and the counts it names (loads, hits, multiplies,
    multipliers; the last two only where the hardware counts multiplies)."""
    phases = {m[0]: (int(m[1]), _int(m[2]), _int(m[3]), float(m[4].replace(",", "")))
              for m in re.findall(r"  (prefill|decode) +(\d+) tokens x \d+ MoE layers, \d+ "
                                  r"batches: ([\d,]+) cycles, ([\d,]+) per token per layer; "
                                  r"([\d,.]+) tokens/s", err)}
    counts = dict(zip(("loads", "hits"), map(_int, re.search(
        r"experts ([\d,]+) loads, ([\d,]+) hits", err).groups()), strict=True))
    multiplies = re.search(r"\(([\d,]+) multiplies, (\d+) multipliers\)", err)
    if multiplies:
        counts |= {"multiplies": _int(multiplies[1]), "multipliers": _int(multiplies[2])}
    return phases, counts


def _int(text):
    return int(text.replace(",", ""))


@pytest.mark.parametrize("family, options", CASES, ids=[family for family, _ in CASES])
def test_logits_and_generate_equal_the_model(capsys, checkpoints, tmp_path, family, options,
                                             sim_report):
    path = checkpoints[family]
    np.save(tmp_path / "ids.npy", np.array([int(i) for i in PROMPT.split(",")]))
    common = ("--checkpoint", path, *options)
    logits = {}
    for backend in ("model", "sim"):
        hw = ("--max-tokens", MAX_TOKENS) if backend == "sim" else ()
        status, out, err = run(capsys, "logits", "--ids", tmp_path / "ids.npy", "--output",
                               tmp_path / f"{backend}.npy", "--backend", backend, *common, *hw)
        assert status == 0, err
        logits[backend] = np.load(tmp_path / f"{backend}.npy")
    assert logits["model"].shape == (10, 64)
    assert np.array_equal(logits["sim"].view(np.uint32), logits["model"].view(np.uint32))
    phases, _ = report(err)
    assert list(phases) == ["prefill"] and phases["prefill"][0] == 10

    outputs = {}
    for backend in ("model", "sim"):
        hw = ("--max-tokens", MAX_TOKENS) if backend == "sim" else ()
        status, out, err = run(capsys, "generate", "--prompt-ids", PROMPT, "--max-new-tokens",
                               NEW_TOKENS, "--backend", backend, *common, *hw)
        assert status == 0, err
        outputs[backend] = out
    assert outputs["sim"] == outputs["model"]
    assert len(outputs["sim"].splitlines()[1].split()) == 2 + NEW_TOKENS

    phases, counts = report(err)
    assert phases["prefill"][0] == 10 and phases["decode"][0] == NEW_TOKENS - 1
    for tokens, cycles, per_token, rate in phases.values():
        assert per_token == round(cycles / (tokens * LAYERS))
        assert rate == pytest.approx(tokens * 24e6 / cycles, rel=1e-3)   # default 24 MHz
    # Every token runs its top-k experts (and the shared one) on every layer, 3 d f multiplies
    # each, dense-equivalent; 2:4 multiplies half.
    shared = 64 if family == "qwen2_moe" else 0
    dense = (10 + NEW_TOKENS - 1) * LAYERS * 3 * HIDDEN * (TOP_K * FFN + shared)
    assert counts["multiplies"] == dense // (2 if "2:4" in options else 1)
    assert counts["multipliers"] == 16 // (2 if "2:4" in options else 1)
    # Each call starts with empty slots: a decoded token loads each of its experts.
    assert counts["loads"] >= (NEW_TOKENS - 1) * LAYERS * (TOP_K + bool(shared))
    assert "predict none" in err
    sim_report.append(f"{family} {' '.join(options)}: logits and generated ids equal the "
                      "model's; " + "; ".join(line.strip() for line in err.splitlines()
                                              if line.startswith("  ")))


@pytest.mark.parametrize("backend", ["sim", "board-sim"])
def test_without_verilator_is_refused_before_any_work(capsys, checkpoints, monkeypatch,
                                                      backend):
    monkeypatch.setitem(__import__("sys").modules, "verilator", None)
    status, out, err = run(capsys, "generate", "--checkpoint", checkpoints["mixtral"],
                           "--prompt-ids", "1", "--max-new-tokens", 1, "--backend", backend)
    assert status == 2 and out == ""
    assert err.strip().startswith("moefpga: error: Verilator is not installed")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("options, fragment", [
    (("--lanes", "64"), "hidden size 32 does not fit the simulated hardware: it is not a "
                        "multiple of 64 lanes"),
    (("--max-tokens", "65"), "--max-tokens 65 is out of range"),
    (("--clock-mhz", "0"), "argument --clock-mhz: must be a positive number of MHz"),
])
def test_shapes_the_sim_cannot_take_are_refused_before_any_work(capsys, checkpoints, options,
                                                                 fragment):
    status, out, err = run(capsys, "generate", "--checkpoint", checkpoints["mixtral"],
                           "--prompt-ids", "1", "--max-new-tokens", 1, "--backend", "sim",
                           *options)
    lines = err.strip().splitlines()
    assert status == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("moefpga: error: ") and fragment in lines[0]


def test_generate_on_board_sim_equals_the_model(capsys, tmp_path, sim_report):
    """The board top's Verilator twin through the host link, with the gate predictor
    prefetching: the same ids as the model backend and the session's report; then the logits
    of the prompt, bit for bit. The twin is ``test_board_sim``'s (a gated shared expert; 2 lanes
    of 2:4 int4, G = 32, T_max 4, 3 slots), one build shared with it through
    the session's build cache."""
    path = write_checkpoint(tmp_path / "qwen2", "qwen2_moe", num_layers=LAYERS,
                            hidden_size=HIDDEN, num_experts=4, top_k=TOP_K,
                            expert_ffn_size=FFN, shared_expert_ffn_size=FFN, vocab_size=64,
                            seed=3)
    model = ("--checkpoint", path, "--quant", "int4", "--group-size", "32", "--sparsity",
             "2:4")
    twin = ("--lanes", "2", "--max-tokens", "4", "--slots", "3")
    common = (*model, "--prompt-ids", PROMPT, "--max-new-tokens", NEW_TOKENS)
    status, model_out, err = run(capsys, "generate", *common, "--backend", "model")
    assert status == 0, err
    status, out, err = run(capsys, "generate", *common, "--backend", "board-sim",
                           "--predictor", "gate", *twin)
    assert status == 0, err
    assert out == model_out
    phases, counts = report(err)
    assert phases["prefill"][0] == 10 and phases["decode"][0] == NEW_TOKENS - 1
    assert "multiplies" not in counts and counts["loads"] > 0
    assert re.search(r"predict accuracy [\d.]+% \(\d+ of \d+ next-layer picks", err), err
    sim_report.append("board-sim: generated ids equal the model's; " + "; ".join(
        line.strip() for line in err.splitlines()
        if line.startswith("  ") and not line.startswith(("  layer", "  still"))))
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([int(i) for i in PROMPT.split(",")]))
    logits = {}
    for backend in ("model", "board-sim"):
        logits[backend] = tmp_path / f"{backend}.npy"
        status, _, logits_err = run(capsys, "logits", *model, "--ids", ids,
                                    "--output", logits[backend], "--backend", backend,
                                    *(twin if backend == "board-sim" else ()))
        assert status == 0, logits_err
    assert np.array_equal(np.load(logits["model"]).view(np.uint32),
                          np.load(logits["board-sim"]).view(np.uint32))
