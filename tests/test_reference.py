"""The float reference MoE block against an independent plain-Python, float64 implementation."""

import dataclasses
import math

import numpy as np
import pytest

from moefpga.hls_models.checkpoint import Checkpoint, ExpertWeights, MoELayerWeights
from moefpga.hls_models.errors import MoefpgaError
from moefpga.hls_models.reference import expert_ffn, moe_layer, route, router_logits
from moefpga.hls_models.synthetic import write_checkpoint

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
D, E, FFN, SHARED = 32, 8, 24, 16
DIMS = {"hidden_size": D, "num_experts": E, "expert_ffn_size": FFN, "vocab_size": 16,
        "num_attention_heads": 4, "num_key_value_heads": 2}


# ---- the independent implementation ---------------------------------------------------------

def loop_route(logits, top_k, normalize):
    """Softmax with math.exp; top-k by repeated scans, a later expert winning only if greater."""
    peak = max(logits)
    exps = [math.exp(v - peak) for v in logits]
    probs = [v / sum(exps) for v in exps]
    picked = []
    for _ in range(top_k):
        best = None
        for e in range(len(probs)):
            if e not in picked and (best is None or probs[e] > probs[best]):
                best = e
        picked.append(best)
    weights = [probs[e] for e in picked]
    if normalize:
        weights = [w / sum(weights) for w in weights]
    return picked, weights


def loop_dot(row, x):
    return sum(a * b for a, b in zip(row, x, strict=True))


def loop_ffn(x, gate, up, down):
    hidden = []
    for g_row, u_row in zip(gate, up, strict=True):
        g = loop_dot(g_row, x)
        hidden.append(g / (1 + math.exp(-g)) * loop_dot(u_row, x))
    return [loop_dot(d_row, hidden) for d_row in down]


def loop_moe(x, layer):
    """``x`` (T, d) as a nested list; ``layer`` a MoELayerWeights; returns y, picks, weights."""
    router = layer.router.tolist()
    experts = [(e.gate.tolist(), e.up.tolist(), e.down.tolist()) for e in layer.experts]
    shared = layer.shared and (layer.shared.gate.tolist(), layer.shared.up.tolist(),
                               layer.shared.down.tolist())
    ys, all_picked, all_weights = [], [], []
    for token in x:
        logits = [loop_dot(row, token) for row in router]
        picked, weights = loop_route(logits, layer.top_k, layer.norm_topk_prob)
        y = [0.0] * len(token)
        for e, w in zip(picked, weights, strict=True):
            y = [acc + w * v for acc, v in zip(y, loop_ffn(token, *experts[e]), strict=True)]
        if shared:
            scale = 1.0
            if layer.shared_gate is not None:
                scale = 1 / (1 + math.exp(-loop_dot(layer.shared_gate.tolist(), token)))
            y = [acc + scale * v for acc, v in zip(y, loop_ffn(token, *shared), strict=True)]
        ys.append(y)
        all_picked.append(picked)
        all_weights.append(weights)
    return np.array(ys), all_picked, np.array(all_weights)


def assert_matches_loop(x, layer):
    y, (experts, weights) = moe_layer(x, layer, return_routing=True)
    want, picked, want_weights = loop_moe(x.tolist(), layer)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert experts.dtype == np.int64 and weights.dtype == np.float32
    assert experts.tolist() == picked
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5)
    assert np.linalg.norm(y - want) / np.linalg.norm(want) < 1e-5


def tokens(count, seed=1):
    return np.random.default_rng(seed).standard_normal((count, D)).astype(np.float32)


# ---- every family, config style, sharding and dtype -----------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("style", ["legacy", "current"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_loop_implementation(tmp_path, family, style, shards, dtype):
    shared = {"shared_expert_ffn_size": SHARED} if family == "qwen2_moe" else {}
    path = write_checkpoint(tmp_path, family, **DIMS, **shared, config_style=style,
                            shards=shards, dtype=dtype, seed=len(family))
    ckpt = Checkpoint.open(path)
    for layer in ckpt.config.moe_layers:
        assert_matches_loop(tokens(6, seed=layer), ckpt.moe_layer(layer))


def test_every_moe_layer_of_interleaved_qwen(tmp_path):
    path = write_checkpoint(tmp_path, "qwen2_moe", **DIMS, shared_expert_ffn_size=SHARED,
                            num_layers=4, mlp_only_layers=(1,))
    ckpt = Checkpoint.open(path)
    assert ckpt.config.moe_layers == (0, 2, 3)
    outputs = []
    for layer in (0, 2, 3):
        weights = ckpt.moe_layer(layer)
        assert_matches_loop(tokens(4), weights)
        outputs.append(moe_layer(tokens(4), weights))
    assert not np.array_equal(outputs[0], outputs[1])
    with pytest.raises(MoefpgaError, match="layer 1 .* is a dense MLP layer"):
        ckpt.moe_layer(1)


# ---- routing --------------------------------------------------------------------------------

def test_ties_go_to_the_lower_expert_index():
    logits = np.random.default_rng(5).integers(0, 3, size=(64, 16)).astype(np.float32)
    experts, weights = route(logits, 4, normalize=False)
    for row, picks, ws in zip(logits.tolist(), experts.tolist(), weights, strict=True):
        want, want_weights = loop_route(row, 4, normalize=False)
        assert picks == want
        np.testing.assert_allclose(ws, want_weights, rtol=1e-6)


def test_equal_logits_pick_the_first_experts():
    experts, weights = route(np.zeros((3, 8), np.float32), 3, normalize=False)
    assert experts.tolist() == [[0, 1, 2]] * 3
    np.testing.assert_allclose(weights, 1 / 8)


def test_picks_are_ordered_by_descending_weight():
    experts, weights = route(np.array([[0.0, 2.0, 1.0, 2.0, -1.0]], np.float32), 4, False)
    assert experts.tolist() == [[1, 3, 2, 0]]
    assert (np.diff(weights[0]) <= 0).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_normalize(normalize):
    logits = np.random.default_rng(2).standard_normal((10, E)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    experts, weights = route(logits, 3, normalize)
    picked = np.take_along_axis(probs, experts, axis=1)
    want = picked / picked.sum(axis=1, keepdims=True) if normalize else picked
    np.testing.assert_allclose(weights, want, rtol=1e-6)


def test_router_with_equal_rows_picks_lower_indices():
    layer = random_layer(shared=False)
    layer = dataclasses.replace(layer, router=np.zeros((E, D), np.float32))
    _, (experts, weights) = moe_layer(tokens(5), layer, return_routing=True)
    assert experts.tolist() == [[0, 1]] * 5
    np.testing.assert_allclose(weights, 0.5)


def test_router_logits():
    layer = random_layer(shared=False)
    x = tokens(3)
    np.testing.assert_allclose(router_logits(x, layer), x @ layer.router.T, rtol=1e-6)


# ---- layer variants -------------------------------------------------------------------------

def random_expert(rng, ffn):
    return ExpertWeights(*(0.2 * rng.standard_normal(shape).astype(np.float32)
                           for shape in ((ffn, D), (ffn, D), (D, ffn))))


def random_layer(shared, seed=0, top_k=2, normalize=True):
    rng = np.random.default_rng(seed)
    return MoELayerWeights(
        router=rng.standard_normal((E, D)).astype(np.float32) / math.sqrt(D),
        experts=[random_expert(rng, FFN) for _ in range(E)],
        shared=random_expert(rng, SHARED) if shared else None,
        shared_gate=rng.standard_normal(D).astype(np.float32) / math.sqrt(D) if shared else None,
        top_k=top_k,
        norm_topk_prob=normalize,
    )


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("top_k", [1, 3, E])
def test_top_k_and_normalize_variants(top_k, normalize):
    assert_matches_loop(tokens(5), random_layer(False, top_k=top_k, normalize=normalize))


def test_shared_expert_with_and_without_gate():
    gated = random_layer(shared=True)
    ungated = dataclasses.replace(gated, shared_gate=None)
    routed_only = dataclasses.replace(gated, shared=None, shared_gate=None)
    x = tokens(7)
    assert_matches_loop(x, gated)
    assert_matches_loop(x, ungated)
    shared_out = expert_ffn(x, gated.shared)
    scale = 1 / (1 + np.exp(-(x @ gated.shared_gate)))
    np.testing.assert_allclose(moe_layer(x, ungated) - moe_layer(x, routed_only), shared_out,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(moe_layer(x, gated) - moe_layer(x, routed_only),
                               shared_out * scale[:, None], rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("error")
def test_expert_ffn_is_finite_for_large_activations():
    expert = random_expert(np.random.default_rng(3), FFN)
    y = expert_ffn(1e4 * tokens(4), expert)
    assert y.dtype == np.float32 and np.isfinite(y).all()


def test_input_conversion_and_empty_batch():
    layer = random_layer(shared=True)
    x = tokens(3)
    np.testing.assert_array_equal(moe_layer(x.astype(np.float64), layer), moe_layer(x, layer))
    assert moe_layer(np.zeros((0, D), np.float32), layer).shape == (0, D)


# ---- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("x, message", [
    (np.zeros(D, np.float32), rf"shape \(tokens, {D}\), not \[{D}\]"),
    (np.zeros((2, D + 1), np.float32), rf"shape \(tokens, {D}\), not \[2, {D + 1}\]"),
    (np.array([["a"] * D]), "numeric"),
])
def test_bad_tokens(x, message):
    with pytest.raises(MoefpgaError, match=message):
        moe_layer(x, random_layer(shared=False))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_non_finite_token_is_named(bad):
    x = tokens(6).astype(np.float64)
    x[3, 5] = x[4, 0] = bad
    with pytest.raises(MoefpgaError, match="token 3 is not finite"):
        moe_layer(x, random_layer(shared=False))


@pytest.mark.parametrize("top_k", [0, E + 1, 1.5, True])
def test_bad_top_k(top_k):
    with pytest.raises(MoefpgaError, match=f"top_k must be in 1..{E}"):
        route(np.zeros((1, E), np.float32), top_k, normalize=True)


def test_bad_logits():
    with pytest.raises(MoefpgaError, match="finite"):
        route(np.array([[0.0, np.inf]], np.float32), 1, normalize=True)
    with pytest.raises(MoefpgaError, match=r"got shape \[4\]"):
        route(np.zeros(4, np.float32), 1, normalize=True)
