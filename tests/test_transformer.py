"""The NumPy transformer against a separate, straightforward loop implementation of the families'
forward pass (per position, per head, float64), on synthetic checkpoints of each family."""

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from moefpga.hls_models import reference, synthetic
from moefpga.hls_models.checkpoint import Checkpoint
from moefpga.hls_models.config import parse_config
from moefpga.hls_models.errors import MoefpgaError
from moefpga.hls_models.transformer import (
    Transformer,
    check_ids,
    check_supported,
    generate,
    load_weights,
)

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
IDS = np.array([5, 17, 3, 250, 42, 42, 7, 0, 128, 99, 64, 1, 200, 31, 8, 255])
TOLERANCE = 1e-4


def make_checkpoint(path, family, config=None, drop=(), **options):
    """A synthetic checkpoint with sharp attention (q and k scaled up, a small rope theta, so
    that positions and the causal mask change the logits a lot), ``config`` keys replaced and
    the tensors in ``drop`` removed."""
    synthetic.write_checkpoint(path, family, **options)
    file = path / "model.safetensors"
    tensors = load_file(file)
    for name in tensors:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensors[name] = tensors[name] * 4
    for name in drop:
        del tensors[name]
    save_file(tensors, str(file), metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    if "rope_parameters" in raw:
        raw["rope_parameters"]["rope_theta"] = 100.0
    else:
        raw["rope_theta"] = 100.0
    raw |= config or {}
    (path / "config.json").write_text(json.dumps(raw))
    return path


def reference_model(path):
    checkpoint = Checkpoint.open(path)
    moe = {i: _reference_layer(checkpoint.moe_layer(i)) for i in checkpoint.config.moe_layers}
    return Transformer(checkpoint.config, load_weights(checkpoint), moe)


def _reference_layer(weights):
    return lambda x: reference.moe_layer(x, weights)


def loop_logits(path, ids, theta=None):
    """The families' forward pass written out with per-position and per-head loops in float64,
    reading config.json itself. The MoE blocks are the float reference's."""
    cfg = json.loads((path / "config.json").read_text())
    ck = Checkpoint.open(path)

    def w(name):
        return ck.tensor(name).astype(np.float64)

    family = cfg["model_type"]
    d, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // heads
    if theta is None:
        theta = cfg["rope_parameters"]["rope_theta"] if "rope_parameters" in cfg \
            else cfg["rope_theta"]
    eps = cfg["rms_norm_eps"]

    def norm(x, weight):
        return weight * x / math.sqrt(float(np.dot(x, x)) / len(x) + eps)

    def rotate(vec, pos):
        out, half = np.empty(hd), hd // 2
        for i in range(half):
            angle = pos * theta ** (-2 * i / hd)
            out[i] = vec[i] * math.cos(angle) - vec[i + half] * math.sin(angle)
            out[i + half] = vec[i + half] * math.cos(angle) + vec[i] * math.sin(angle)
        return out

    def silu(z):
        return z / (1 + np.exp(-z))

    hidden = [w("model.embed_tokens.weight")[i] for i in ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        a = f"{p}.self_attn"
        queries, keys, values = [], [], []
        for pos, h in enumerate(hidden):
            x = norm(h, w(f"{p}.input_layernorm.weight"))
            q, k, v = (w(f"{a}.{n}_proj.weight") @ x
                       + (w(f"{a}.{n}_proj.bias") if family == "qwen2_moe" else 0)
                       for n in "qkv")
            if family == "olmoe":
                q, k = norm(q, w(f"{a}.q_norm.weight")), norm(k, w(f"{a}.k_norm.weight"))
            q_heads = [q[j * hd:(j + 1) * hd] for j in range(heads)]
            k_heads = [k[j * hd:(j + 1) * hd] for j in range(kv_heads)]
            if family == "qwen3_moe":
                q_heads = [norm(qh, w(f"{a}.q_norm.weight")) for qh in q_heads]
                k_heads = [norm(kh, w(f"{a}.k_norm.weight")) for kh in k_heads]
            queries.append([rotate(qh, pos) for qh in q_heads])
            keys.append([rotate(kh, pos) for kh in k_heads])
            values.append([v[j * hd:(j + 1) * hd] for j in range(kv_heads)])
        after_attention = []
        for pos, h in enumerate(hidden):
            outs = []
            for j in range(heads):
                g = j // (heads // kv_heads)
                scores = [float(queries[pos][j] @ keys[s][g]) / math.sqrt(hd)
                          for s in range(pos + 1)]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                outs.append(sum(wt / total * values[s][g] for s, wt in enumerate(weights)))
            after_attention.append(h + w(f"{a}.o_proj.weight") @ np.concatenate(outs))
        hidden = after_attention
        x = np.stack([norm(h, w(f"{p}.post_attention_layernorm.weight")) for h in hidden])
        if f"{p}.mlp.gate_proj.weight" in ck:
            mlp = [w(f"{p}.mlp.down_proj.weight") @ (silu(w(f"{p}.mlp.gate_proj.weight") @ row)
                                                     * (w(f"{p}.mlp.up_proj.weight") @ row))
                   for row in x]
        else:
            mlp = reference.moe_layer(x.astype(np.float32), ck.moe_layer(layer))
        hidden = [h + m for h, m in zip(hidden, mlp, strict=True)]
    head = w("model.embed_tokens.weight" if cfg.get("tie_word_embeddings")
             else "lm_head.weight")
    return np.stack([head @ norm(h, w("model.norm.weight")) for h in hidden])


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


VARIANTS = {
    **{family: (family, {}, {}) for family in FAMILIES},
    "mixtral-legacy-headdim": ("mixtral", {}, {"config_style": "legacy", "head_dim": 8}),
    "olmoe-legacy": ("olmoe", {}, {"config_style": "legacy"}),
    "qwen2-dense-layer-tied": ("qwen2_moe", {"tie_word_embeddings": True},
                               {"mlp_only_layers": (0,)}),
    "qwen3-headdim-dense-layer": ("qwen3_moe", {}, {"head_dim": 32, "mlp_only_layers": (1,),
                                                    "config_style": "legacy"}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_the_loop_implementation(tmp_path, variant):
    family, config, options = VARIANTS[variant]
    path = make_checkpoint(tmp_path / "m", family, config, **options)
    logits = reference_model(path).forward(IDS)
    assert logits.dtype == np.float32 and logits.shape == (16, 256)
    assert rel_l2(logits, loop_logits(path, IDS)) < TOLERANCE


def test_the_comparison_sees_a_wrong_rotary_embedding(tmp_path):
    """The loop and the model part by far more than the tolerance when only theta differs."""
    path = make_checkpoint(tmp_path / "m", "qwen3_moe")
    logits = reference_model(path).forward(IDS)
    assert rel_l2(logits, loop_logits(path, IDS, theta=1e4)) > 100 * TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_one_full_pass(tmp_path, family):
    model = reference_model(make_checkpoint(tmp_path / "m", family))
    full = model.forward(IDS)
    cache = model.new_cache()
    chunks = [model.forward(IDS[start:stop], cache)
              for start, stop in ((0, 5), (5, 6), (6, 9), *((n, n + 1) for n in range(9, 16)))]
    assert cache.length == 16
    assert rel_l2(np.concatenate(chunks), full) < 1e-5


def test_config_styles_give_the_same_model(tmp_path):
    """rope_theta at the top level (legacy) or in rope_parameters (current); head_dim given or
    derived: the same weights give the same logits."""
    logits = [reference_model(make_checkpoint(tmp_path / style, "qwen2_moe",
                                              config_style=style)).forward(IDS)
              for style in ("legacy", "current")]
    np.testing.assert_array_equal(logits[0], logits[1])
    derived = reference_model(make_checkpoint(tmp_path / "derived", "qwen2_moe"))
    given = reference_model(make_checkpoint(tmp_path / "given", "qwen2_moe",
                                            {"head_dim": 16}))
    assert derived.config.head_dim == given.config.head_dim == 16
    np.testing.assert_array_equal(derived.forward(IDS), given.forward(IDS))


def test_greedy_generation_follows_the_argmax_of_full_passes(tmp_path):
    model = reference_model(make_checkpoint(tmp_path / "m", "olmoe"))
    prompt = IDS[:4]
    new = list(generate(model, prompt, 6))
    assert len(new) == 6
    logits = model.forward(np.concatenate([prompt, new[:-1]]))
    assert list(np.argmax(logits[3:], axis=1)) == new


def test_generation_stops_at_a_stop_id(tmp_path):
    model = reference_model(make_checkpoint(tmp_path / "m", "mixtral"))
    first = next(generate(model, IDS[:3], 5))
    assert list(generate(model, IDS[:3], 5, stop_ids=frozenset({first}))) == [first]


def base_config(**changes):
    raw = json.loads(json.dumps({
        "model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "vocab_size": 256,
        "max_position_embeddings": 32, "hidden_act": "silu"}))
    return parse_config(raw | changes)


@pytest.mark.parametrize("changes, fragment", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    ({"use_sliding_window": True, "sliding_window": 16}, "sliding-window attention"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window attention"),
    ({"attention_bias": True}, "attention_bias"),
    ({"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ({"hidden_act": "gelu"}, "'gelu'"),
])
def test_unsupported_variants_are_named(changes, fragment):
    with pytest.raises(MoefpgaError, match="not supported") as err:
        check_supported(base_config(**changes))
    assert fragment in str(err.value)


def test_mixtral_sliding_window_is_refused_but_null_is_fine():
    mixtral = {"model_type": "mixtral", "num_local_experts": 8, "intermediate_size": 32}
    check_supported(base_config(**mixtral, sliding_window=None))
    with pytest.raises(MoefpgaError, match="sliding_window=4096"):
        check_supported(base_config(**mixtral, sliding_window=4096))
    check_supported(base_config(use_sliding_window=False, sliding_window=4096))


@pytest.mark.parametrize("ids, start, extra, fragment", [
    (np.array([1, 256]), 0, 0, "token id 256 at position 1 is outside the vocabulary (0..255)"),
    (np.array([-1]), 3, 0, "token id -1 at position 3"),
    (np.arange(33), 0, 0, "33 positions exceeds the model's context of 32"),
    (np.arange(20), 0, 13, "33 positions exceeds"),
    (np.arange(2), 31, 0, "33 positions exceeds"),
    (np.array([1.0, 2.0]), 0, 0, "integer array"),
    (np.zeros((2, 2), dtype=int), 0, 0, "1-D integer array"),
    (np.array([], dtype=int), 0, 0, "non-empty"),
])
def test_bad_ids_are_refused(ids, start, extra, fragment):
    with pytest.raises(MoefpgaError) as err:
        check_ids(ids, base_config(), start, extra)
    assert fragment in str(err.value)


def test_a_missing_attention_tensor_is_named(tmp_path):
    name = "model.layers.1.self_attn.k_norm.weight"
    path = make_checkpoint(tmp_path / "m", "olmoe", drop=[name])
    with pytest.raises(MoefpgaError, match=f"no tensor '{name}'"):
        load_weights(Checkpoint.open(path))


def test_a_missing_moe_function_is_refused(tmp_path):
    checkpoint = Checkpoint.open(make_checkpoint(tmp_path / "m", "mixtral"))
    with pytest.raises(MoefpgaError, match=r"no MoE function for layers \[1\]"):
        Transformer(checkpoint.config, load_weights(checkpoint), {0: lambda x: x})
