"""``moefpga logits`` and ``moefpga generate``: the backends, the happy paths (as a subprocess, as a
user runs them) and every refusal (in process, through the same ``main``)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from cli_runner import main
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from moefpga.hls_models import reference, synthetic
from moefpga.hls_models.calibrate import QuantSpec, calibration_tokens, prune_layer
from moefpga.hls_models.checkpoint import Checkpoint
from moefpga.hls_models.sparsity import parse_sparsity
from moefpga.hls_models.transformer import Transformer, load_weights
from moefpga.host import cli
from moefpga.host.generate import ModelBackend, ReferenceBackend

VOCAB = 256


def moefpga(*args):
    return subprocess.run([sys.executable, "-m", "moefpga.host.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def assert_user_error(result, *fragments):
    """Exit status 2 and exactly one line on standard error, naming the problem."""
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moefpga: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", "qwen2_moe",
                                      hidden_size=64, expert_ffn_size=64,
                                      shared_expert_ffn_size=64, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def ids_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids") / "ids.npy"
    np.save(path, np.array([3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]))
    return path


def variant(model, tmp_path, config=None, drop=()):
    """A copy of ``model`` with ``config`` keys replaced and the tensors in ``drop`` removed."""
    path = shutil.copytree(model, tmp_path / "variant")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(raw | (config or {})))
    if drop:
        tensors = load_file(path / "model.safetensors")
        for name in drop:
            del tensors[name]
        save_file(tensors, str(path / "model.safetensors"))
    return path


def reference_transformer(path):
    checkpoint = Checkpoint.open(path)
    backend = ReferenceBackend(checkpoint, QuantSpec())
    return Transformer(checkpoint.config, load_weights(checkpoint), backend.layers)


def test_model_backend_layer_equals_run_backend_model(model):
    """Quantized once, the model backend's layer gives what ``moefpga run --backend model``
    computes for the same tokens, to the bit."""
    checkpoint = Checkpoint.open(model)
    spec = QuantSpec(bits=4, group_size=32, sparsity=parse_sparsity("2:4"))
    x = calibration_tokens(64, checkpoint.norm_weight(1), count=7, seed=11)
    ours = ModelBackend(checkpoint, spec).layers[1](x)
    run = cli.run_layer(checkpoint.moe_layer(1), x, "model", spec,
                        cli.default_calibration(checkpoint, 1))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, run)


def test_reference_backend_prunes_the_experts(model):
    checkpoint = Checkpoint.open(model)
    sparsity = parse_sparsity("2:4")
    x = calibration_tokens(64, count=5, seed=2)
    ours = ReferenceBackend(checkpoint, QuantSpec(sparsity=sparsity)).layers[0](x)
    expected = reference.moe_layer(x, prune_layer(checkpoint.moe_layer(0), sparsity))
    np.testing.assert_array_equal(ours, expected)
    assert not np.allclose(ours, reference.moe_layer(x, checkpoint.moe_layer(0)))


def test_logits_reference_as_a_user_runs_it(model, ids_file, tmp_path):
    out = tmp_path / "logits.npy"
    result = moefpga("logits", "--checkpoint", model, "--ids", ids_file, "--output", out,
                     "--backend", "reference")
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}: 12 x {VOCAB} float32" in result.stdout
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (12, VOCAB)
    expected = reference_transformer(model).forward(np.load(ids_file))
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("options, max_rel_l2", [
    ((), 0.01), (("--quant", "int4", "--group-size", "32", "--sparsity", "2:4"), 0.03)])
def test_logits_model_backend_is_close_to_reference(model, ids_file, tmp_path, options,
                                                     max_rel_l2):
    """Against the float reference on the same pruned experts (measured: relative L2 0.003
    for int8 dense, 0.009 for int4 G=32 2:4; the same top-1 token everywhere)."""
    sparsity = options[-1] if options else "dense"
    out, ref = tmp_path / "model.npy", tmp_path / "ref.npy"
    assert main("logits", "--checkpoint", model, "--ids", ids_file, "--output", out,
                *options)[0] == 0
    assert main("logits", "--checkpoint", model, "--ids", ids_file, "--output", ref,
                "--backend", "reference", "--sparsity", sparsity)[0] == 0
    a, b = np.load(out), np.load(ref)
    assert 0 < np.linalg.norm(a - b) / np.linalg.norm(b) < max_rel_l2
    assert (a.argmax(axis=1) == b.argmax(axis=1)).all()


def test_generate_prints_the_greedy_ids(model):
    result = moefpga("generate", "--checkpoint", model, "--prompt-ids", "1,2,3",
                     "--max-new-tokens", 6, "--backend", "reference")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "prompt ids 1 2 3"
    new = [int(v) for v in lines[1].split()[2:]]
    assert len(new) == 6 and len(lines) == 2
    logits = reference_transformer(model).forward(np.array([1, 2, 3, *new[:-1]]))
    assert list(np.argmax(logits[2:], axis=1)) == new
    assert "tokens/s" in result.stderr


def test_generate_decodes_with_the_tokenizer(model, tmp_path):
    path = variant(model, tmp_path)
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    code, out, err = main("generate", "--checkpoint", path, "--prompt-ids", "7,8",
                          "--max-new-tokens", 4)
    assert code == 0, err
    new = out.splitlines()[1].split()[2:]
    assert out.splitlines()[2] == "new text   " + " ".join(f"w{i}" for i in new)


def test_generate_warns_on_an_unreadable_tokenizer(model, tmp_path):
    path = variant(model, tmp_path)
    (path / "tokenizer.json").write_text("{not json")
    code, out, err = main("generate", "--checkpoint", path, "--prompt-ids", "7",
                          "--max-new-tokens", 2, "--backend", "reference")
    assert code == 0, err
    assert "moefpga: warning:" in err and "tokenizer.json is not readable" in err
    assert len(out.splitlines()) == 2


def test_generate_stops_at_eos(model, tmp_path):
    _, out, _ = main("generate", "--checkpoint", model, "--prompt-ids", "4,5",
                     "--max-new-tokens", 5, "--backend", "reference")
    new = out.splitlines()[1].split()[2:]
    path = variant(model, tmp_path, {"eos_token_id": [255, int(new[1])]})
    code, out, err = main("generate", "--checkpoint", path, "--prompt-ids", "4,5",
                          "--max-new-tokens", 5, "--backend", "reference")
    assert code == 0, err
    assert out.splitlines()[1].split()[2:] == new[:2]


def test_generate_model_backend_follows_the_argmax_of_full_passes(model):
    """Decoding with the KV cache on the integer model picks what full passes pick."""
    code, out, err = main("generate", "--checkpoint", model, "--prompt-ids", "9,8,7",
                          "--max-new-tokens", 4, "--backend", "model")
    assert code == 0, err
    new = [int(v) for v in out.splitlines()[1].split()[2:]]
    checkpoint = Checkpoint.open(model)
    backend = ModelBackend(checkpoint, QuantSpec())
    transformer = Transformer(checkpoint.config, load_weights(checkpoint), backend.layers)
    logits = transformer.forward(np.array([9, 8, 7, *new[:-1]]))
    assert list(np.argmax(logits[2:], axis=1)) == new


# ---- refusals ----------------------------------------------------------------------------

@pytest.mark.parametrize("options, fragment", [
    (("--backend", "serial"), "--backend serial needs --port"),
    (("--backend", "serial", "--port", "/dev/ttyUSB1", "--board", "icebreaker"),
     "--board is for --backend board-sim"),
    (("--backend", "board-sim", "--port", "/dev/ttyUSB1"), "--port is for --backend serial"),
    (("--backend", "serial", "--port", "/nonexistent/tty0"), "/nonexistent/tty0"),
    (("--backend", "serial", "--port", "x", "--policy", "fifo"), "argument --policy"),
    (("--backend", "model", "--port", "/dev/x"), "--port is for --backend serial, not model"),
    (("--backend", "model", "--clock-mhz", "5"), "--clock-mhz is for --backend sim, not model"),
    (("--backend", "serial", "--port", "/dev/x", "--clock-mhz", "24"),
     "--clock-mhz is for --backend sim, not serial"),
    (("--backend", "board-sim", "--clock-mhz", "24"),
     "--clock-mhz is for --backend sim, not board-sim"),
    (("--backend", "serial", "--port", "/dev/x", "--lanes", "4"),
     "--lanes is for --backend sim and board-sim, not serial"),
    (("--backend", "board-sim", "--board", "icebreaker", "--slots", "2"),
     "--slots does not apply with --board: the board's YAML fixes the hardware"),
    (("--backend", "reference", "--predictor", "none"),
     "--predictor is for --backend board-sim and serial, not reference"),
])
def test_board_backend_refusals(model, options, fragment):
    """Misused accelerator options (also at their default value), and a port with no
    device: one line, exit status 2."""
    assert_user_error(main("generate", "--checkpoint", model, "--prompt-ids", "1",
                           "--max-new-tokens", 1, *options), fragment)


@pytest.mark.parametrize("options, fragment", [
    (("--group-size", "48"), "group size must be one of"),
    (("--sparsity", "5:4"), "5:4"),
    (("--quant", "int3"), "argument --quant: invalid choice"),
    (("--backend", "gpu"), "argument --backend: invalid choice"),
])
def test_bad_options(model, ids_file, tmp_path, options, fragment):
    assert_user_error(main("logits", "--checkpoint", model, "--ids", ids_file, "--output",
                           tmp_path / "l.npy", *options), fragment)


def test_prompt_id_outside_the_vocabulary(model):
    assert_user_error(main("generate", "--checkpoint", model, "--prompt-ids", "1,256,3",
                           "--max-new-tokens", 2),
                      "token id 256 at position 1 is outside the vocabulary (0..255)")


def test_prompt_ids_that_are_not_numbers(model):
    assert_user_error(main("generate", "--checkpoint", model, "--prompt-ids", "1,x",
                           "--max-new-tokens", 2),
                      "--prompt-ids takes comma-separated token ids, not '1,x'")


def test_zero_new_tokens(model):
    assert_user_error(main("generate", "--checkpoint", model, "--prompt-ids", "1",
                           "--max-new-tokens", 0), "--max-new-tokens", "positive")


def test_generation_longer_than_the_context(model, tmp_path):
    path = variant(model, tmp_path, {"max_position_embeddings": 8})
    assert_user_error(main("generate", "--checkpoint", path, "--prompt-ids", "1,2,3,4,5",
                           "--max-new-tokens", 4),
                      "a sequence of 9 positions exceeds the model's context of 8 "
                      "(max_position_embeddings)")


def test_logits_longer_than_the_context(model, ids_file, tmp_path):
    path = variant(model, tmp_path, {"max_position_embeddings": 11})
    assert_user_error(main("logits", "--checkpoint", path, "--ids", ids_file, "--output",
                           tmp_path / "l.npy"), "12 positions exceeds the model's context of 11")
    assert not (tmp_path / "l.npy").exists()


@pytest.mark.parametrize("array, fragment", [
    (np.array([1.0, 2.0]), "hold float64 of shape [2]"),
    (np.zeros((2, 3), dtype=np.int64), "hold int64 of shape [2, 3]"),
    (np.array([], dtype=np.int32), "non-empty 1-D array"),
    (np.array([0, -4]), "token id -4 at position 1 is outside the vocabulary"),
])
def test_bad_ids_files(model, tmp_path, array, fragment):
    np.save(tmp_path / "ids.npy", array)
    assert_user_error(main("logits", "--checkpoint", model, "--ids", tmp_path / "ids.npy",
                           "--output", tmp_path / "l.npy", "--backend", "reference"), fragment)


def test_ids_file_missing_or_not_npy(model, tmp_path):
    assert_user_error(main("logits", "--checkpoint", model, "--ids", tmp_path / "none.npy",
                           "--output", tmp_path / "l.npy"), "does not exist")
    (tmp_path / "text.npy").write_text("hello")
    assert_user_error(main("logits", "--checkpoint", model, "--ids", tmp_path / "text.npy",
                           "--output", tmp_path / "l.npy"), "not a readable .npy array")


def test_logits_output_folder_missing(model, ids_file, tmp_path):
    assert_user_error(main("logits", "--checkpoint", model, "--ids", ids_file, "--output",
                           tmp_path / "no" / "l.npy"), "output folder", "does not exist")


@pytest.mark.parametrize("config, fragment", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
     "rotary embedding type 'yarn' is not supported"),
    ({"use_sliding_window": True, "sliding_window": 8},
     "sliding-window attention (sliding_window=8) is not supported"),
    ({"eos_token_id": "end"}, "'eos_token_id' must be a token id"),
])
def test_unsupported_configs(model, tmp_path, config, fragment):
    path = variant(model, tmp_path, config)
    assert_user_error(main("generate", "--checkpoint", path, "--prompt-ids", "1",
                           "--max-new-tokens", 1, "--backend", "reference"), fragment)


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.v_proj.bias", "lm_head.weight",
                                  "model.layers.0.mlp.experts.3.up_proj.weight"])
def test_missing_tensors(model, ids_file, tmp_path, name):
    path = variant(model, tmp_path, drop=[name])
    assert_user_error(main("logits", "--checkpoint", path, "--ids", ids_file, "--output",
                           tmp_path / "l.npy"), f"no tensor '{name}'")


def test_missing_checkpoint(tmp_path):
    assert_user_error(main("generate", "--checkpoint", tmp_path / "none", "--prompt-ids", "1",
                           "--max-new-tokens", 1), "no such checkpoint folder")


def test_a_refusal_as_a_user_sees_it(model):
    """The console path: one line, exit status 2, nothing on standard output."""
    result = moefpga("generate", "--checkpoint", model, "--prompt-ids", "300",
                     "--max-new-tokens", 1)
    assert result.returncode == 2
    assert result.stderr.strip() == ("moefpga: error: token id 300 at position 0 is outside "
                                     "the vocabulary (0..255)")
    assert result.stdout == ""
