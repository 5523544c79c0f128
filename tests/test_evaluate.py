"""``moefpga eval --whole-model``: the printed table against the logits that ``moefpga logits``
writes for the same ids, compared here with NumPy; and its refusals."""

import numpy as np
import pytest
from cli_runner import main

from moefpga.hls_models import synthetic

VOCAB = 512
#: Half a unit of the last printed digit of each table column, and a little.
PRINTED = [6e-4, 6e-6, 6e-6, 6e-4, 6e-6]
IDS = np.array([3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 462, 64, 338, 327, 95, 288])
#: (eval's --setting, the logits command's options): int8 dense, int4 G=32 2:4.
SETTINGS = [("int8", ("--quant", "int8", "--sparsity", "dense")),
            ("int4/g32/2:4", ("--quant", "int4", "--group-size", "32", "--sparsity", "2:4"))]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", "olmoe",
                                      hidden_size=64, expert_ffn_size=64, vocab_size=VOCAB,
                                      seed=2)


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids") / "ids.npy"
    np.save(path, IDS)
    return path


def logits(model, ids_file, folder, name, *options):
    out = folder / f"{name}.npy"
    code, _, err = main("logits", "--checkpoint", model, "--ids", ids_file, "--output", out,
                        *options)
    assert code == 0, err
    return np.load(out).astype(np.float64)


def table_rows(out):
    """The rows of the whole-model table by setting: five numbers (percent as fractions)."""
    rows = {}
    for line in out.splitlines()[3:]:
        *name, top1, rel, abs_, dense_top1, dense_rel = line.split()
        rows[" ".join(name)] = [float(top1.rstrip("%")) / 100, float(rel), float(abs_),
                                float(dense_top1.rstrip("%")) / 100, float(dense_rel)]
    return rows


def test_whole_model_table_matches_the_logits(model, ids_file, tmp_path):
    code, out, err = main("eval", "--checkpoint", model, "--whole-model", "--ids", ids_file,
                          *(arg for setting, _ in SETTINGS for arg in ("--setting", setting)))
    assert code == 0, err
    assert out.splitlines()[0] == ("whole model, 16 tokens, logits of backend model against "
                                   "the float reference:")
    rows = table_rows(out)
    assert list(rows) == ["int8 per-channel dense", "int4 G=32 2:4"]
    dense = logits(model, ids_file, tmp_path, "dense", "--backend", "reference")
    for (name, values), (_, options) in zip(rows.items(), SETTINGS, strict=True):
        test = logits(model, ids_file, tmp_path, "test", "--backend", "model", *options)
        same = logits(model, ids_file, tmp_path, "same", "--backend", "reference", *options)
        expected = []
        for ref in (same, dense):
            diff = test - ref
            expected += [np.mean(test.argmax(1) == ref.argmax(1)),
                         np.sqrt(np.sum(diff ** 2) / np.sum(ref ** 2)), np.abs(diff).max()]
        del expected[5]                            # the table has no max abs for dense float
        # Within the rounding of what is printed (0.1 % and 5 decimals).
        assert (np.abs(np.subtract(values, expected)) <= PRINTED).all(), (name, values, expected)
        assert 0 < values[1] < 0.05 and values[0] >= 0.8
    # This model and sequence were chosen so that int4 2:4 changes a top-1 token (15 of 16).
    assert rows["int4 G=32 2:4"][0] < 1 and rows["int4 G=32 2:4"][3] < 1
    # Pruning 2:4 moves the logits away from the dense float model far more than quantizing.
    assert rows["int4 G=32 2:4"][4] > 2 * rows["int4 G=32 2:4"][1]
    dense_row = rows["int8 per-channel dense"]     # dense experts: both references are one
    assert dense_row[3:] == dense_row[:2]


def test_whole_model_default_sequence(model):
    """Without --ids: a seeded random sequence of --tokens ids; the same table twice."""
    runs = [main("eval", "--checkpoint", model, "--whole-model", "--tokens", "5", "--setting",
                 "int8/2:4") for _ in range(2)]
    assert runs[0][0] == 0 and runs[0][1] == runs[1][1]
    assert runs[0][1].startswith("whole model, 5 tokens,")
    assert list(table_rows(runs[0][1])) == ["int8 per-channel 2:4"]


def test_per_layer_table_is_the_default(model):
    code, out, err = main("eval", "--checkpoint", model, "--layers", "1", "--tokens", "8",
                          "--setting", "int8")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["layer", "setting", "cosine", "rel", "L2", "routing"]
    assert out.splitlines()[1].startswith("    1  int8 per-channel dense")


@pytest.mark.parametrize("options, fragment", [
    (("--whole-model", "--layers", "0"), "--layers applies to the per-layer table"),
    (("--whole-model", "--tokens", "3", "--ids", "IDS"), "give --ids or --tokens, not both"),
    (("--backend", "sim"), "--backend applies to --whole-model"),
    (("--ids", "IDS"), "--ids applies to --whole-model"),
    (("--whole-model", "--tokens", "5000"), "exceeds the model's context of 4096"),
    (("--whole-model", "--backend", "gpu"), "argument --backend: invalid choice"),
    (("--whole-model", "--backend", "serial"), "--backend serial needs --port"),
    (("--port", "/dev/x"), "--port is for --whole-model with --backend serial"),
    (("--lanes", "4"), "--lanes is for --whole-model with --backend sim and board-sim"),
    (("--whole-model", "--clock-mhz", "24"), "--clock-mhz is for --backend sim, not model"),
    (("--whole-model", "--setting", "int4/g48"), "group size must be one of"),
])
def test_whole_model_refusals(model, ids_file, options, fragment):
    options = [str(ids_file) if o == "IDS" else o for o in options]
    code, out, err = main("eval", "--checkpoint", model, *options)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and out == "", err
    assert lines[0].startswith("moefpga: error: ") and fragment in lines[0], lines[0]


def test_whole_model_refuses_ids_outside_the_vocabulary(model, tmp_path):
    np.save(tmp_path / "ids.npy", np.array([1, VOCAB]))
    code, _, err = main("eval", "--checkpoint", model, "--whole-model", "--ids",
                        tmp_path / "ids.npy")
    assert code == 2
    assert err.strip() == (f"moefpga: error: token id {VOCAB} at position 1 is outside the "
                           f"vocabulary (0..{VOCAB - 1})")
