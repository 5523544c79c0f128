"""The ``moefpga`` command line, run as a user runs it: a subprocess, its output and exit code."""

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from moefpga.hls_models import synthetic
from moefpga.hls_models.calibrate import calibration_tokens
from moefpga.hls_models.checkpoint import Checkpoint
from moefpga.hls_models.fidelity import cosine


def moefpga(*args):
    return subprocess.run([sys.executable, "-m", "moefpga.host.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", "qwen2_moe",
                                      num_layers=2, hidden_size=64, expert_ffn_size=64,
                                      shared_expert_ffn_size=64)


@pytest.fixture(scope="module")
def tokens(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("x") / "x.npy"
    np.save(path, calibration_tokens(64, count=24, seed=3))
    return path


def assert_user_error(result, *fragments):
    """Exit status 2 and exactly one line on standard error, naming the problem."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moefpga: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_info_reports_architecture_and_storage(model):
    result = moefpga("info", "--checkpoint", model)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "qwen2_moe" in out and "8 routed, top-2" in out and "MoE layers: 0-1" in out
    # 8 experts of 3 64x64 matrices, plus a shared one: 9 * 3 * 4096 float32 weights.
    assert f"{9 * 3 * 4096 * 4 / 1e6:.3f} MB" in out
    assert "int4 G=32 2:4" in out
    # 8 routed experts and a shared one of 3 x 64 x 64, a router of (8 + 1 gate) x 64.
    per_layer = 8 * 3 * 4096 + 3 * 4096 + 9 * 64
    assert f"per MoE layer {per_layer:,}:" in out and f"layers {2 * per_layer:,}" in out


def test_demo_runs_the_main_job(tmp_path):
    result = moefpga("demo", "--workdir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "family        qwen2_moe" in result.stdout
    rows = [line.split() for line in result.stdout.split("against the float reference:")[1]
            .splitlines()[2:]]
    assert len(rows) == 16
    assert all(float(row[-3]) > 0.98 and row[-1] == "100.0%" for row in rows)
    assert np.load(tmp_path / "y_model.npy").shape == (64, 128)
    assert_user_error(moefpga("demo", "--workdir", tmp_path / "y_model.npy"),
                      "cannot create the default model")


@pytest.mark.parametrize("options", [[], ["--quant", "int4", "--group-size", "32",
                                          "--sparsity", "2:4"]])
def test_run_model_backend_follows_reference(model, tokens, tmp_path, options):
    outputs = {}
    for backend in ("reference", "model"):
        out = tmp_path / f"{backend}.npy"
        result = moefpga("run", "--checkpoint", model, "--layer", 1, "--input", tokens,
                         "--output", out, "--backend", backend, *options)
        assert result.returncode == 0, result.stderr
        outputs[backend] = np.load(out)
    assert outputs["model"].dtype == np.float32 and outputs["model"].shape == (24, 64)
    assert cosine(outputs["model"], outputs["reference"]) > 0.97


def test_reference_run_equals_library_call(model, tokens, tmp_path):
    from moefpga.hls_models import reference
    from moefpga.hls_models.calibrate import prune_layer
    from moefpga.hls_models.sparsity import parse_sparsity
    out = tmp_path / "y.npy"
    result = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", tokens,
                     "--output", out, "--backend", "reference", "--sparsity", "2:4")
    assert result.returncode == 0, result.stderr
    layer = prune_layer(Checkpoint.open(model).moe_layer(0), parse_sparsity("2:4"))
    np.testing.assert_array_equal(np.load(out), reference.moe_layer(np.load(tokens), layer))


def test_eval_prints_a_row_per_layer_and_setting(model):
    result = moefpga("eval", "--checkpoint", model, "--setting", "int8",
                     "--setting", "int4/g32/2:4", "--tokens", 64)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [(row[0], row[1]) for row in rows] == [("0", "int8"), ("0", "int4"),
                                                  ("1", "int8"), ("1", "int4")]
    assert all(float(row[-3]) > 0.97 for row in rows)


def test_run_keeps_an_existing_output_when_it_fails(model, tmp_path):
    out = tmp_path / "y.npy"
    out.write_bytes(b"precious")
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((2, 64), np.nan, np.float32))
    result = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", bad, "--output", out)
    assert_user_error(result, "NaN or Inf in token 0")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("change,fragments", [
    (["--layer", 7], ["layer 7"]),
    (["--sparsity", "5:4"], ["5:4"]),
    (["--sparsity", "2:3"], ["2:3"]),
    (["--group-size", "48"], ["group size", "48"]),
    (["--input", "missing.npy"], ["missing.npy", "does not exist"]),
    (["--calibration", "missing.npy"], ["calibration", "does not exist"]),
])
def test_run_bad_options_are_one_line_errors(model, tokens, tmp_path, change, fragments):
    args = {"--checkpoint": model, "--layer": 0, "--input": tokens,
            "--output": tmp_path / "y.npy"}
    for flag, value in zip(change[::2], change[1::2], strict=True):
        args[flag] = value
    result = moefpga("run", *[v for pair in args.items() for v in pair])
    assert_user_error(result, *fragments)


def test_run_rejects_bad_input_arrays(model, tmp_path):
    cases = {
        "shape": (np.zeros((3, 10), np.float32), "expected (tokens, 64)"),
        "text": (np.array([["a"] * 64]), "expected real numbers"),
    }
    for name, (array, fragment) in cases.items():
        path = tmp_path / f"{name}.npy"
        np.save(path, array)
        result = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", path,
                         "--output", tmp_path / "y.npy")
        assert_user_error(result, fragment)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not numpy")
    result = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", garbage,
                     "--output", tmp_path / "y.npy")
    assert_user_error(result, "not a readable .npy")


@pytest.mark.parametrize("backend", ["model", "reference"])
def test_widths_that_m_or_g_do_not_divide_are_named(tmp_path, backend):
    model = synthetic.write_checkpoint(tmp_path / "odd", "mixtral", hidden_size=36,
                                       expert_ffn_size=40, num_attention_heads=4,
                                       num_key_value_heads=2)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((2, 36), np.float32))
    def run(*options):
        return moefpga("run", "--checkpoint", model, "--layer", 0, "--input", x,
                       "--output", tmp_path / "y.npy", "--backend", backend, *options)
    assert_user_error(run("--sparsity", "2:8"), "hidden size 36 is not a multiple of M=8")
    assert_user_error(run("--sparsity", "1:16"), "hidden size 36 is not a multiple of M=16")
    if backend == "model":
        assert_user_error(run("--group-size", "32"), "group size 32 does not divide the "
                                                     "hidden size 36")


def test_ffn_width_is_named(tmp_path):
    model = synthetic.write_checkpoint(tmp_path / "odd", "olmoe", hidden_size=48,
                                       expert_ffn_size=36)
    x = tmp_path / "x.npy"
    np.save(x, np.ones((2, 48), np.float32))
    result = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", x,
                     "--output", tmp_path / "y.npy", "--sparsity", "2:8")
    assert_user_error(result, "expert ffn size 36 is not a multiple of M=8")


def test_run_warns_when_inputs_outgrow_the_calibration(model, tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, 10 * calibration_tokens(64, count=16, seed=4))
    result = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", x,
                     "--output", tmp_path / "y.npy")
    assert result.returncode == 0, result.stderr
    assert "moefpga: warning:" in result.stderr and "saturated" in result.stderr
    calm = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", x,
                   "--output", tmp_path / "y.npy", "--calibration", x)
    assert calm.returncode == 0 and "warning" not in calm.stderr


def test_zero_calibration_and_float32_overflow_are_refused(model, tmp_path):
    zeros, huge = tmp_path / "zeros.npy", tmp_path / "huge.npy"
    np.save(zeros, np.zeros((4, 64), np.float32))
    np.save(huge, np.full((2, 64), 1e300))
    result = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", zeros,
                     "--output", tmp_path / "y.npy", "--calibration", zeros)
    assert_user_error(result, "calibration tokens are all zero")
    result = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", huge,
                     "--output", tmp_path / "y.npy")
    assert_user_error(result, "beyond the float32 range in token 0")


def test_argparse_mistakes_are_one_line_errors(model):
    assert_user_error(moefpga("run", "--checkpoint", model, "--layer", "x"), "--layer")
    assert_user_error(moefpga("frobnicate"), "frobnicate")
    assert_user_error(moefpga("eval", "--checkpoint", model, "--setting", "int8/g32/g64"),
                      "group size twice")


def test_unwritable_output_is_refused_before_work(model, tokens, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", tokens,
                         "--output", locked / "y.npy")
    finally:
        locked.chmod(0o700)
    if result.returncode == 0:      # root ignores directory permissions
        assert (locked / "y.npy").exists()
    else:
        assert_user_error(result, "cannot write")


def test_bad_checkpoints_are_one_line_errors(model, tmp_path):
    assert_user_error(moefpga("info", "--checkpoint", tmp_path / "nowhere"), "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((model / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    assert_user_error(moefpga("info", "--checkpoint", broken), "llama")


def test_eval_bad_options(model):
    assert_user_error(moefpga("eval", "--checkpoint", model, "--setting", "int3"), "int3")
    assert_user_error(moefpga("eval", "--checkpoint", model, "--layers", "x"), "--layers")
    assert_user_error(moefpga("eval", "--checkpoint", model, "--layers", "5"), "layer 5")
    result = moefpga("eval", "--checkpoint", model, "--tokens", "0")
    assert result.returncode == 2 and "positive whole number" in result.stderr


def test_run_checks_the_output_folder_before_working(model, tokens, tmp_path):
    result = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", tokens,
                     "--output", tmp_path / "nowhere" / "y.npy")
    assert_user_error(result, "output folder", "does not exist")
    assert "tokens on backend" not in result.stderr
    result = moefpga("run", "--checkpoint", model, "--layer", 0, "--input", tmp_path,
                     "--output", tmp_path / "y.npy")
    assert_user_error(result, "is not a file")


def test_shape_too_large_for_the_accumulators(model, tokens):
    from moefpga.hls_models.calibrate import QuantSpec, max_inputs, quantize_layer
    from moefpga.hls_models.errors import MoefpgaError
    assert max_inputs(40) == 131071
    assert max_inputs(24) == 1
    layer = Checkpoint.open(model).moe_layer(0)
    with pytest.raises(MoefpgaError, match="hidden size 64 is too large for 28-bit accumulators: "
                                           "at most 31 inputs per row"):
        quantize_layer(layer, QuantSpec(acc_bits=28), np.load(tokens))


def test_interrupt_is_one_line_and_status_130(model):
    """Ctrl-C during long work: ``moefpga: interrupted`` and status 130, no traceback. The
    child gets SIGINT's default disposition, as a terminal gives it (a shell's background job
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moefpga.host.cli", "eval", "--checkpoint", str(model),
         "--tokens", "200000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert process.stderr.readline().startswith("eval: layer")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert err.strip().splitlines()[-1] == "moefpga: interrupted"
    assert "Traceback" not in err
