"""config.json parsing for the four families, in the older and the current transformers style."""

import json

import pytest

from moefpga.hls_models.config import load_config, parse_config
from moefpga.hls_models.errors import MoefpgaError

# Excerpts of published config.json files (transformers 4.x style), shortened to the keys read.
MIXTRAL_8X7B = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
OLMOE_1B_7B = {
    "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "vocab_size": 50304,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "rope_scaling": None, "clip_qkv": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN15_MOE_A27B = {
    "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
    "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1, "norm_topk_prob": False,
    "vocab_size": 151936, "max_position_embeddings": 8192, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
    "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def current_style(raw):
    """The same config as transformers 5 writes it: rope_parameters and dtype, and Qwen3-MoE's
    expert count as num_local_experts (as transformers 5.23's Qwen3MoeConfig saves it)."""
    raw = dict(raw)
    theta = raw.pop("rope_theta")
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    raw["dtype"] = raw.pop("torch_dtype")
    if raw["model_type"] == "qwen3_moe":
        raw["num_local_experts"] = raw.pop("num_experts")
    return raw


def test_mixtral():
    c = parse_config(MIXTRAL_8X7B)
    assert (c.family, c.hidden_size, c.num_layers, c.num_experts, c.top_k) == (
        "mixtral", 4096, 32, 8, 2)
    assert (c.expert_ffn_size, c.shared_expert_ffn_size, c.dense_ffn_size) == (14336, 0, 0)
    assert c.norm_topk_prob is True
    assert c.moe_layers == tuple(range(32))
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 128)
    assert (c.rope_theta, c.rope_type, c.rms_norm_eps) == (1e6, "default", 1e-5)
    assert (c.vocab_size, c.max_position_embeddings, c.dtype) == (32000, 32768, "bfloat16")
    assert c.tie_word_embeddings is False
    assert c.raw is MIXTRAL_8X7B


def test_olmoe():
    c = parse_config(OLMOE_1B_7B)
    assert (c.family, c.num_experts, c.top_k, c.expert_ffn_size) == ("olmoe", 64, 8, 1024)
    assert c.norm_topk_prob is False
    assert c.moe_layers == tuple(range(16))
    assert (c.head_dim, c.rope_theta) == (128, 1e4)


def test_qwen2_moe():
    c = parse_config(QWEN15_MOE_A27B)
    assert (c.family, c.num_experts, c.top_k) == ("qwen2_moe", 60, 4)
    assert (c.expert_ffn_size, c.shared_expert_ffn_size) == (1408, 5632)
    assert c.norm_topk_prob is False
    assert c.moe_layers == tuple(range(24))
    assert c.dense_ffn_size == 0


def test_qwen3_moe_keeps_given_head_dim():
    c = parse_config(QWEN3_30B_A3B)
    assert (c.family, c.num_experts, c.top_k, c.expert_ffn_size) == ("qwen3_moe", 128, 8, 768)
    assert c.shared_expert_ffn_size == 0
    assert c.norm_topk_prob is True
    assert c.head_dim == 128 != c.hidden_size // c.num_attention_heads


@pytest.mark.parametrize("raw", [MIXTRAL_8X7B, OLMOE_1B_7B, QWEN15_MOE_A27B, QWEN3_30B_A3B],
                         ids=["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"])
def test_current_style_equals_legacy(raw):
    assert parse_config(current_style(raw)) == parse_config(raw)


def test_mixtral_num_experts_alias():
    raw = dict(MIXTRAL_8X7B)
    raw["num_experts"] = raw.pop("num_local_experts")
    assert parse_config(raw).num_experts == 8
    with pytest.raises(MoefpgaError, match="disagree"):
        parse_config(raw | {"num_local_experts": 4})


@pytest.mark.parametrize("raw", [OLMOE_1B_7B, QWEN15_MOE_A27B, QWEN3_30B_A3B])
def test_every_family_takes_either_expert_count_name(raw):
    renamed = dict(raw)
    renamed["num_local_experts"] = renamed.pop("num_experts")
    assert parse_config(renamed).num_experts == raw["num_experts"]
    with pytest.raises(MoefpgaError, match="disagree"):
        parse_config(renamed | {"num_experts": 3})
    del renamed["num_local_experts"]
    with pytest.raises(MoefpgaError, match="missing required key 'num_experts'"):
        parse_config(renamed)


def test_null_head_dim_and_kv_heads_take_defaults():
    c = parse_config(MIXTRAL_8X7B | {"head_dim": None, "num_key_value_heads": None})
    assert (c.head_dim, c.num_key_value_heads) == (128, 32)


def test_optional_keys_take_family_defaults():
    raw = {k: v for k, v in QWEN15_MOE_A27B.items()
           if k not in ("rope_theta", "rms_norm_eps", "norm_topk_prob", "decoder_sparse_step",
                        "max_position_embeddings", "tie_word_embeddings", "torch_dtype")}
    c = parse_config(raw)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (1e4, 1e-6, 32768)
    assert (c.norm_topk_prob, c.tie_word_embeddings, c.dtype) == (False, False, None)
    assert c.moe_layers == tuple(range(24))


def test_qwen_sparse_step_and_mlp_only_layers():
    c = parse_config(QWEN15_MOE_A27B | {"num_hidden_layers": 8, "decoder_sparse_step": 2,
                                        "mlp_only_layers": [3]})
    assert c.moe_layers == (1, 5, 7)
    assert c.dense_ffn_size == 5632


def test_scaled_rope_type_is_reported():
    c = parse_config(OLMOE_1B_7B | {"rope_scaling": {"type": "linear", "factor": 2.0}})
    assert c.rope_type == "linear"
    c = parse_config(current_style(QWEN3_30B_A3B) | {
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}})
    assert (c.rope_type, c.rope_theta) == ("yarn", 5e5)


def test_load_config_reads_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    assert load_config(tmp_path) == parse_config(QWEN3_30B_A3B)


@pytest.mark.parametrize("raw, message", [
    ({**OLMOE_1B_7B, "model_type": "llama"},
     "model_type 'llama' is not supported; supported: mixtral, olmoe, qwen2_moe, qwen3_moe"),
    ({k: v for k, v in OLMOE_1B_7B.items() if k != "model_type"}, "model_type None"),
    ({k: v for k, v in OLMOE_1B_7B.items() if k != "hidden_size"},
     "missing required key 'hidden_size'"),
    ({k: v for k, v in QWEN15_MOE_A27B.items() if k != "shared_expert_intermediate_size"},
     "missing required key 'shared_expert_intermediate_size'"),
    ({k: v for k, v in MIXTRAL_8X7B.items() if k != "num_local_experts"},
     "missing required key 'num_local_experts'"),
    (MIXTRAL_8X7B | {"hidden_size": "4096"}, "'hidden_size' must be an integer >= 1, not '4096'"),
    (MIXTRAL_8X7B | {"num_experts_per_tok": 9}, "num_experts_per_tok=9 exceeds the 8 experts"),
    (OLMOE_1B_7B | {"norm_topk_prob": "yes"}, "'norm_topk_prob' must be true or false"),
    (OLMOE_1B_7B | {"rope_theta": -1}, "'rope_theta' must be a positive number"),
    (OLMOE_1B_7B | {"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    (OLMOE_1B_7B | {"hidden_size": 2050}, "no 'head_dim', and hidden_size=2050"),
    (QWEN15_MOE_A27B | {"mlp_only_layers": "none"}, "'mlp_only_layers' must be a list"),
    (QWEN15_MOE_A27B | {"decoder_sparse_step": 0}, "'decoder_sparse_step' must be an integer"),
    (QWEN15_MOE_A27B | {"decoder_sparse_step": 25}, "no decoder layer is an MoE layer"),
    ({k: v for k, v in QWEN15_MOE_A27B.items() if k != "intermediate_size"}
     | {"mlp_only_layers": [0]}, "missing required key 'intermediate_size'"),
    ([1, 2], "expected a JSON object, found list"),
])
def test_bad_config(tmp_path, raw, message):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MoefpgaError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'config.json'}: ")
    assert message in str(info.value)


def test_missing_or_invalid_file(tmp_path):
    with pytest.raises(MoefpgaError, match="config.json: no such file"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MoefpgaError, match="config.json: not valid JSON"):
        load_config(tmp_path)
