"""Checkpoint loading: shards, dtypes, family tensor names, shape checks and bad checkpoints."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moefpga.hls_models.checkpoint import Checkpoint
from moefpga.hls_models.errors import MoefpgaError
from moefpga.hls_models.synthetic import DEFAULT_MODEL, ensure_default_model, write_checkpoint

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
SMALL = {"num_layers": 2, "hidden_size": 16, "num_experts": 4, "expert_ffn_size": 8,
         "vocab_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
SMALL_SHARED = {"shared_expert_ffn_size": 12}


def small(path, family, **options):
    shared = SMALL_SHARED if family == "qwen2_moe" else {}
    return write_checkpoint(path, family, **(SMALL | shared | options))


def write_raw_safetensors(path, entries):
    """A safetensors file from ``(name, dtype, shape, data bytes)``, written from the format."""
    header, offset = {}, 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(e[3] for e in entries))


def rewrite_shard(path, edit):
    """Apply ``edit`` to the tensors of one float32 shard and write it back."""
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


# ---- dtypes ---------------------------------------------------------------------------------

def test_bf16_f16_f32_read_as_float32(tmp_path):
    small(tmp_path, "olmoe")
    (tmp_path / "model.safetensors").unlink()
    bf16 = {0x3F80: 1.0, 0xC020: -2.5, 0x3E20: 0.15625, 0x7F7F: 3.3895313892515355e38,
            0x0001: 9.183549615799121e-41, 0x8000: -0.0}
    write_raw_safetensors(tmp_path / "model.safetensors", [
        ("b", "BF16", [2, 3], np.array(list(bf16), dtype="<u2").tobytes()),
        ("h", "F16", [2], np.array([0.5, -65504.0], dtype="<f2").tobytes()),
        ("f", "F32", [1, 1, 2], np.array([1e-3, 7.0], dtype="<f4").tobytes()),
    ])
    ckpt = Checkpoint.open(tmp_path)
    b = ckpt.tensor("b")
    assert b.dtype == np.float32 and b.shape == (2, 3)
    assert b.ravel().tolist() == list(bf16.values())
    assert np.signbit(b[1, 2])
    assert ckpt.tensor("h").tolist() == [0.5, -65504.0]
    f = ckpt.tensor("f")
    assert f.dtype == np.float32 and f.shape == (1, 1, 2)
    assert f.ravel().tolist() == np.array([1e-3, 7.0], dtype=np.float32).tolist()


def test_unsupported_dtype_is_named(tmp_path):
    small(tmp_path, "olmoe")
    (tmp_path / "model.safetensors").unlink()
    write_raw_safetensors(tmp_path / "model.safetensors", [("q", "I8", [4], bytes(4))])
    with pytest.raises(MoefpgaError, match="tensor 'q' has dtype I8; supported: BF16, F16, F32"):
        Checkpoint.open(tmp_path).tensor("q")


def test_bf16_checkpoint_is_float32_rounded_to_nearest(tmp_path):
    f32 = Checkpoint.open(small(tmp_path / "f32", "qwen3_moe"))
    bf16 = Checkpoint.open(small(tmp_path / "bf16", "qwen3_moe", dtype="bfloat16"))
    for name in ("model.layers.1.mlp.experts.3.down_proj.weight", "model.norm.weight"):
        exact, rounded = f32.tensor(name), bf16.tensor(name)
        assert not (rounded.view(np.uint32) & 0xFFFF).any()
        below = (exact.view(np.uint32) & 0xFFFF0000).view(np.float32)
        above = ((exact.view(np.uint32) & 0xFFFF0000) + 0x10000).view(np.float32)
        nearest = np.minimum(abs(below - exact), abs(above - exact))
        assert (abs(rounded - exact) == nearest).all()


# ---- shards ---------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_index", [True, False])
def test_sharded_equals_single_file(tmp_path, keep_index):
    one = Checkpoint.open(small(tmp_path / "one", "qwen2_moe"))
    path = small(tmp_path / "many", "qwen2_moe", shards=3)
    assert sorted(p.name for p in path.glob("*.safetensors")) == [
        f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    if not keep_index:
        (path / "model.safetensors.index.json").unlink()
    many = Checkpoint.open(path)
    for layer in (0, 1):
        a, b = one.moe_layer(layer), many.moe_layer(layer)
        np.testing.assert_array_equal(a.router, b.router)
        np.testing.assert_array_equal(a.experts[3].down, b.experts[3].down)
        np.testing.assert_array_equal(a.shared.up, b.shared.up)
        np.testing.assert_array_equal(a.shared_gate, b.shared_gate)
    np.testing.assert_array_equal(one.tensor("lm_head.weight"), many.tensor("lm_head.weight"))


def test_index_names_a_missing_shard(tmp_path):
    path = small(tmp_path, "mixtral", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MoefpgaError,
                       match="names shard model-00002-of-00002.safetensors, which is missing"):
        Checkpoint.open(path)


def test_index_maps_a_tensor_to_the_wrong_shard(tmp_path):
    path = small(tmp_path, "mixtral", shards=2)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(MoefpgaError, match="maps tensor 'model.norm.weight' to "
                                           "model-00001-of-00002.safetensors, which does not"):
        Checkpoint.open(path).tensor("model.norm.weight")


def test_unreadable_index(tmp_path):
    path = small(tmp_path, "mixtral", shards=2)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(MoefpgaError, match="unreadable index"):
        Checkpoint.open(path)


def test_tensor_in_two_shards_without_index(tmp_path):
    path = small(tmp_path, "olmoe")
    save_file({"model.norm.weight": np.ones(16, np.float32)}, str(path / "extra.safetensors"))
    with pytest.raises(MoefpgaError, match="'model.norm.weight' is in both extra.safetensors "
                                           "and model.safetensors"):
        Checkpoint.open(path)


# ---- bad folders and headers ----------------------------------------------------------------

def test_missing_folder_config_or_weights(tmp_path):
    with pytest.raises(MoefpgaError, match="no such checkpoint folder"):
        Checkpoint.open(tmp_path / "absent")
    path = small(tmp_path / "m", "olmoe")
    (path / "config.json").rename(path / "config.bak")
    with pytest.raises(MoefpgaError, match="config.json: no such file"):
        Checkpoint.open(path)
    (path / "config.bak").rename(path / "config.json")
    (path / "model.safetensors").unlink()
    with pytest.raises(MoefpgaError, match=r"no \*.safetensors files"):
        Checkpoint.open(path)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:5], "file too short"),
    (lambda data: struct.pack("<Q", 1 << 40) + data[8:], "length 1099511627776"),
    (lambda data: data[:8] + b"\xff" * (len(data) - 8), "not JSON"),
    (lambda data: data[:-4], "does not fit the file"),
])
def test_unreadable_header(tmp_path, damage, message):
    path = small(tmp_path, "olmoe")
    shard = path / "model.safetensors"
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(MoefpgaError, match=f"model.safetensors: .*{message}"):
        Checkpoint.open(path)


def test_header_entry_with_wrong_byte_count(tmp_path):
    small(tmp_path, "olmoe")
    write_raw_safetensors(tmp_path / "model.safetensors", [("x", "F32", [3], bytes(8))])
    with pytest.raises(MoefpgaError, match=r"tensor 'x' \(F32, shape \[3\], bytes 0..8\) does"):
        Checkpoint.open(tmp_path)


def test_header_the_safetensors_library_rejects(tmp_path):
    small(tmp_path, "olmoe")
    overlapping = {name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for name in "ab"}
    text = json.dumps(overlapping).encode().ljust(128)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 128) + text + bytes(4))
    with pytest.raises(MoefpgaError, match="unreadable safetensors file .*invalid offset"):
        Checkpoint.open(tmp_path)


# ---- family layouts -------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_moe_layer_weights(tmp_path, family):
    ckpt = Checkpoint.open(small(tmp_path, family))
    layer = ckpt.moe_layer(1)
    assert layer.router.shape == (4, 16) and layer.router.dtype == np.float32
    assert len(layer.experts) == 4
    for expert in layer.experts:
        assert (expert.gate.shape, expert.up.shape, expert.down.shape) == ((8, 16), (8, 16),
                                                                            (16, 8))
    assert layer.top_k == 2
    assert layer.norm_topk_prob is (family in ("mixtral", "qwen3_moe"))
    if family == "qwen2_moe":
        assert (layer.shared.gate.shape, layer.shared.down.shape) == ((12, 16), (16, 12))
        assert layer.shared_gate.shape == (16,)
    else:
        assert layer.shared is None and layer.shared_gate is None


def test_mixtral_w1_w3_w2_are_gate_up_down(tmp_path):
    ckpt = Checkpoint.open(small(tmp_path, "mixtral"))
    expert = ckpt.expert(0, 2)
    prefix = "model.layers.0.block_sparse_moe.experts.2"
    np.testing.assert_array_equal(expert.gate, ckpt.tensor(f"{prefix}.w1.weight"))
    np.testing.assert_array_equal(expert.up, ckpt.tensor(f"{prefix}.w3.weight"))
    np.testing.assert_array_equal(expert.down, ckpt.tensor(f"{prefix}.w2.weight"))
    np.testing.assert_array_equal(ckpt.router(0),
                                  ckpt.tensor("model.layers.0.block_sparse_moe.gate.weight"))


@pytest.mark.parametrize("family, shapes", [
    ("mixtral", {"self_attn.q_proj.weight": (16, 16), "self_attn.k_proj.weight": (8, 16)}),
    ("olmoe", {"self_attn.q_norm.weight": (16,), "self_attn.k_norm.weight": (8,)}),
    ("qwen2_moe", {"self_attn.q_proj.bias": (16,), "self_attn.v_proj.bias": (8,),
                   "mlp.shared_expert_gate.weight": (1, 16)}),
    ("qwen3_moe", {"self_attn.q_norm.weight": (8,), "self_attn.k_norm.weight": (8,)}),
])
def test_family_attention_and_model_tensors(tmp_path, family, shapes):
    ckpt = Checkpoint.open(small(tmp_path, family))
    for layer in (0, 1):
        for name, shape in shapes.items():
            assert ckpt.tensor(f"model.layers.{layer}.{name}").shape == shape
        for name in ("input_layernorm", "post_attention_layernorm"):
            assert ckpt.tensor(f"model.layers.{layer}.{name}.weight").shape == (16,)
        assert ckpt.tensor(f"model.layers.{layer}.self_attn.o_proj.weight").shape == (16, 16)
    assert ckpt.tensor("model.embed_tokens.weight").shape == (32, 16)
    assert ckpt.tensor("lm_head.weight").shape == (32, 16)
    assert ckpt.tensor("model.norm.weight").shape == (16,)
    assert ("model.layers.0.self_attn.q_proj.bias" in ckpt) is (family == "qwen2_moe")


def test_norm_weight_is_post_attention_layernorm(tmp_path):
    ckpt = Checkpoint.open(small(tmp_path, "qwen3_moe"))
    np.testing.assert_array_equal(
        ckpt.norm_weight(1), ckpt.tensor("model.layers.1.post_attention_layernorm.weight"))
    assert abs(ckpt.norm_weight(0).mean() - 1) < 0.1


def test_dense_layers_of_qwen(tmp_path):
    ckpt = Checkpoint.open(small(tmp_path, "qwen2_moe", num_layers=3, mlp_only_layers=(1,)))
    assert ckpt.config.moe_layers == (0, 2)
    assert ckpt.tensor("model.layers.1.mlp.down_proj.weight").shape == (16, 16)
    assert ckpt.moe_layer(2).router.shape == (4, 16)
    assert ckpt.norm_weight(1).shape == (16,)
    with pytest.raises(MoefpgaError, match=r"layer 1 of .* is a dense MLP layer; "
                                           r"MoE layers are \[0, 2\]"):
        ckpt.moe_layer(1)


@pytest.mark.parametrize("layer", [-1, 2, True, "1", 1.0])
def test_layer_out_of_range(tmp_path, layer):
    ckpt = Checkpoint.open(small(tmp_path, "olmoe"))
    with pytest.raises(MoefpgaError, match=r"out of range: .* has 2 layers \(0..1\)"):
        ckpt.moe_layer(layer)
    with pytest.raises(MoefpgaError, match="out of range"):
        ckpt.norm_weight(layer)


def test_expert_out_of_range(tmp_path):
    ckpt = Checkpoint.open(small(tmp_path, "olmoe"))
    assert ckpt.expert(np.int64(1), np.int64(3)).gate.shape == (8, 16)
    with pytest.raises(MoefpgaError, match=r"expert 4 out of range: layers have 4 experts"):
        ckpt.expert(1, 4)


# ---- missing tensors and wrong shapes -------------------------------------------------------

@pytest.mark.parametrize("family, name", [
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w3.weight"),
    ("olmoe", "model.layers.0.mlp.gate.weight"),
    ("qwen2_moe", "model.layers.1.mlp.shared_expert_gate.weight"),
    ("qwen3_moe", "model.layers.1.mlp.experts.0.down_proj.weight"),
])
def test_missing_tensor(tmp_path, family, name):
    path = small(tmp_path, family)
    rewrite_shard(path / "model.safetensors", lambda tensors: tensors.pop(name))
    layer = int(name.split(".")[2])
    with pytest.raises(MoefpgaError, match=f"checkpoint has no tensor '{name}'"):
        Checkpoint.open(path).moe_layer(layer)


@pytest.mark.parametrize("family, name, shape, message", [
    ("olmoe", "model.layers.0.mlp.gate.weight", (4, 15),
     r"has shape \[4, 15\], expected \[4, 16\] \(num_experts, hidden_size from config.json\)"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.0.w2.weight", (8, 16),
     r"has shape \[8, 16\], expected \[16, 8\] \(hidden_size, expert_ffn_size"),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert.up_proj.weight", (8, 16),
     r"has shape \[8, 16\], expected \[12, 16\] \(shared_expert_ffn_size, hidden_size"),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight", (16,),
     r"has shape \[16\], expected \[1, 16\]"),
    ("qwen3_moe", "model.layers.1.post_attention_layernorm.weight", (8,),
     r"has shape \[8\], expected \[16\] \(hidden_size"),
])
def test_wrong_shape(tmp_path, family, name, shape, message):
    path = small(tmp_path, family)
    rewrite_shard(path / "model.safetensors",
                  lambda tensors: tensors.update({name: np.zeros(shape, np.float32)}))
    ckpt = Checkpoint.open(path)
    layer = int(name.split(".")[2])
    with pytest.raises(MoefpgaError, match=f"tensor '{name}' {message}"):
        ckpt.norm_weight(layer) if "layernorm" in name else ckpt.moe_layer(layer)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    path = small(tmp_path, "mixtral")
    name = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    def poison(tensors):
        tensors[name] = tensors[name].copy()
        tensors[name][2, 5] = bad
    rewrite_shard(path / "model.safetensors", poison)
    with pytest.raises(MoefpgaError, match=rf"tensor '{name}' holds NaN or Inf \(first at "
                                           r"\[2, 5\]\)"):
        Checkpoint.open(path).moe_layer(1)


def test_unknown_model_type(tmp_path):
    path = small(tmp_path, "olmoe")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "deepseek_v3"}))
    with pytest.raises(MoefpgaError, match="model_type 'deepseek_v3' is not supported"):
        Checkpoint.open(path)


# ---- synthetic writer -----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("style", ["legacy", "current"])
def test_synthetic_config_styles(tmp_path, family, style):
    config = json.loads((small(tmp_path, family, config_style=style) / "config.json").read_text())
    assert config["model_type"] == family
    if style == "legacy":
        assert "rope_theta" in config and "torch_dtype" in config
        assert "rope_parameters" not in config and "dtype" not in config
    else:
        assert config["rope_parameters"]["rope_type"] == "default"
        assert "rope_theta" not in config and "torch_dtype" not in config


def test_synthetic_is_seeded(tmp_path):
    a = Checkpoint.open(small(tmp_path / "a", "olmoe", seed=3)).tensor("lm_head.weight")
    b = Checkpoint.open(small(tmp_path / "b", "olmoe", seed=3)).tensor("lm_head.weight")
    c = Checkpoint.open(small(tmp_path / "c", "olmoe", seed=4)).tensor("lm_head.weight")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("options, message", [
    ({"family": "llama"}, "unknown family 'llama'"),
    ({"family": "olmoe", "shared_expert_ffn_size": 8}, "olmoe has no shared expert"),
    ({"family": "mixtral", "norm_topk_prob": False}, "mixtral always renormalizes"),
    ({"family": "olmoe", "mlp_only_layers": (0,)}, "olmoe has no dense layers"),
    ({"family": "qwen3_moe", "mlp_only_layers": (0, 1)}, "must be some, not all"),
    ({"family": "olmoe", "shards": 0}, "shards must be a positive integer"),
    ({"family": "olmoe", "shards": 10_000}, "exceeds the"),
    ({"family": "olmoe", "dtype": "float16"}, "dtype must be 'float32' or 'bfloat16'"),
    ({"family": "olmoe", "config_style": "v3"}, "config_style must be"),
])
def test_synthetic_rejects_bad_options(tmp_path, options, message):
    with pytest.raises(MoefpgaError, match=message):
        write_checkpoint(tmp_path / "m", **(SMALL | options))


def test_synthetic_never_overwrites(tmp_path):
    small(tmp_path, "olmoe")
    with pytest.raises(MoefpgaError, match="already holds a checkpoint"):
        small(tmp_path, "olmoe")


def test_default_model(tmp_path):
    path = ensure_default_model(tmp_path / "default")
    config = Checkpoint.open(path).config
    assert (config.family, config.num_layers, config.hidden_size) == (
        DEFAULT_MODEL["family"], DEFAULT_MODEL["num_layers"], DEFAULT_MODEL["hidden_size"])
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["default"]
