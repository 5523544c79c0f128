"""The integer model against docs/numerics.md, re-implemented here with plain Python ints."""

import math

import numpy as np
import pytest

from moefpga.hls_models import intmodel
from moefpga.hls_models.fixedpoint import multiplier_for, requantize, round_shift, saturate
from moefpga.hls_models.intmodel import IntExpert, IntLayer
from moefpga.hls_models.quant import quantize_weights
from moefpga.hls_models.sparsity import parse_sparsity

# --- the spec, written out one scalar at a time -------------------------------------------------


def spec_sat(v, bits):
    return max(-(1 << (bits - 1)), min((1 << (bits - 1)) - 1, v))


def spec_rq(acc, mult, shift, bits):
    v = acc * mult
    if shift > 0:
        v = math.floor((v + 2 ** (shift - 1)) / 2 ** shift)
    elif shift < 0:
        v = v * 2 ** -shift
    return spec_sat(v, bits)


def spec_matvec_row(q_row, mant_row, group_size, x, acc_bits):
    acc = 0
    for g in range(len(q_row) // group_size):
        cols = range(g * group_size, (g + 1) * group_size)
        psum = sum(int(q_row[i]) * int(x[i]) for i in cols)
        acc = spec_sat(acc + psum * int(mant_row[g]), acc_bits)
    return acc


def spec_exp(a):
    b = math.floor((a * 23637 + 2 ** 17) / 2 ** 18)
    table = round(2 ** 15 * 2 ** (-(b % 256) / 256))
    return table >> (b // 256) if b // 256 < 16 else 0


def spec_logit(weights_row, x16, t, mult):
    acc = spec_matvec_row(weights_row, [1], len(weights_row), x16, 48)
    return spec_rq(acc, mult.mult, mult.shift - t, 20)


def spec_expert(x, t, ex, acc_bits):
    def project(qm, vec):
        return [spec_matvec_row(qm.q[r], qm.mant[r], qm.group_size, vec, acc_bits)
                for r in range(qm.rows)]
    g = [spec_rq(a, ex.gate_mult.mult, ex.gate_mult.shift - t, 8) for a in project(ex.gate, x)]
    u = [spec_rq(a, ex.up_mult.mult, ex.up_mult.shift - t, 16) for a in project(ex.up, x)]
    h = [spec_rq(int(ex.silu_table[gi + 128]) * ui, ex.hidden_mult.mult, ex.hidden_mult.shift, 8)
         for gi, ui in zip(g, u, strict=True)]
    return [spec_rq(a, ex.down_mult.mult, ex.down_mult.shift, 32) for a in project(ex.down, h)]


def spec_layer_token(x16, t16, layer):
    z = [spec_logit(row, x16, t16, layer.router_mult) for row in layer.router]
    x = [spec_sat(math.floor((int(v) + 128) / 256), 8) for v in x16]
    t = t16 + 8
    order = sorted(range(len(z)), key=lambda e: (-z[e], e))[:layer.top_k]
    e = [spec_exp(max(z) - zi) for zi in z]
    denom = sum(e[i] for i in order) if layer.normalize else sum(e)
    terms = [((e[i] << 15) // denom, spec_expert(x, t, layer.experts[i], layer.acc_bits))
             for i in order]
    if layer.shared is not None:
        w_sh = 1 << 15
        if layer.shared_gate is not None:
            zs = spec_logit(layer.shared_gate, x16, t16, layer.shared_gate_mult)
            es = spec_exp(abs(zs))
            w_sh = (1 << 30) // (2 ** 15 + es) if zs >= 0 else (es << 15) // (2 ** 15 + es)
        terms.append((w_sh, spec_expert(x, t, layer.shared, layer.acc_bits)))
    out = [sum(w * y[j] for w, y in terms) for j in range(len(x))]
    return order, [spec_sat(math.floor((v + 2 ** 14) / 2 ** 15), 32) for v in out]


# --- fixtures -----------------------------------------------------------------------------------


def random_expert(rng, hidden, ffn, bits, group_size, sparsity):
    def qm(rows, cols):
        return quantize_weights(rng.standard_normal((rows, cols)).astype(np.float32), bits,
                                group_size, parse_sparsity(sparsity))
    def mult():
        return multiplier_for(float(rng.uniform(1e-6, 1e-2)))
    return IntExpert(gate=qm(ffn, hidden), up=qm(ffn, hidden), down=qm(hidden, ffn),
                     gate_mult=mult(), silu_table=rng.integers(-128, 128, 256),
                     up_mult=mult(), hidden_mult=mult(), down_mult=mult())


def random_layer(rng, *, hidden=32, ffn=32, experts=8, top_k=2, normalize=True, shared=True,
                 gate=True, bits=8, group_size=None, sparsity="dense", acc_bits=40):
    def ex():
        return random_expert(rng, hidden, ffn, bits, group_size, sparsity)
    return IntLayer(
        router=rng.integers(-32767, 32768, (experts, hidden)),
        router_mult=multiplier_for(float(rng.uniform(1e-7, 1e-5))),
        experts=[ex() for _ in range(experts)], top_k=top_k, normalize=normalize,
        shared=ex() if shared else None,
        shared_gate=rng.integers(-32767, 32768, hidden) if shared and gate else None,
        shared_gate_mult=multiplier_for(float(rng.uniform(1e-7, 1e-5))) if gate else None,
        out_scale=1.0, acc_bits=acc_bits)


# --- tests --------------------------------------------------------------------------------------


def test_round_shift_rounds_half_up():
    assert [round_shift(v, 1) for v in (5, -5, 4, -4, 3, -3)] == [3, -2, 2, -2, 2, -1]
    assert round_shift(7, 0) == 7


def test_requantize_saturates_both_ways_and_on_left_shifts():
    assert requantize(1000, 1, 0, 8) == 127
    assert requantize(-1000, 1, 0, 8) == -128
    assert requantize(1, 3, -70, 32) == 2 ** 31 - 1
    assert requantize(-1, 3, -70, 32) == -2 ** 31
    assert requantize(0, 3, -70, 32) == 0
    assert requantize(3, 5, -2, 8) == 60
    values = np.array([1, -1, 0, 2])
    assert requantize(values, 3, -70, 8).tolist() == [127, -128, 0, 127]
    for bits in (8, 16, 20, 32):
        for v in (1, -1, 1 << 16, -(1 << 16), 5):
            for left in (1, 7, bits - 1, bits, 32, 70):
                want = spec_sat(v * 3 * 2 ** left, bits)
                assert requantize(v, 3, -left, bits) == want
                assert requantize(np.array([v]), 3, -left, bits).tolist() == [want]


def test_saturate_matches_spec_at_the_edges():
    for bits in (8, 16, 32):
        for v in (2 ** (bits - 1), 2 ** (bits - 1) - 1, -2 ** (bits - 1), -2 ** (bits - 1) - 1):
            assert saturate(v, bits) == spec_sat(v, bits)


@pytest.mark.parametrize("factor", [1e-9, 3e-4, 0.3, 1.0, 1.5, 65535.9, 7e6])
def test_multiplier_keeps_16_significant_bits(factor):
    m = multiplier_for(factor)
    assert 2 ** 15 <= m.mult < 2 ** 16
    assert abs(float(m) - factor) <= factor * 2 ** -16


def test_multiplier_rejects_nonpositive():
    with pytest.raises(ValueError):
        multiplier_for(0.0)


@pytest.mark.parametrize("acc_bits", [40, 20])
def test_matvec_equals_scalar_spec_including_saturation(acc_bits):
    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, (6, 64))
    mant = rng.integers(1, 257, (6, 2))
    x = rng.integers(-128, 128, (3, 64))
    x[0] = -128
    q[0] = -128                  # the largest product, saturating a 20-bit accumulator
    got = intmodel.matvec(q, mant, 32, x, acc_bits)
    want = [[spec_matvec_row(q[r], mant[r], 32, x[t], acc_bits) for r in range(6)]
            for t in range(3)]
    assert got.tolist() == want
    if acc_bits == 20:
        assert got[0, 0] == 2 ** 19 - 1


def test_exp_matches_spec_and_exp_within_1_4e_3():
    a = np.arange(0, 1 << 21, 97)
    got = intmodel.exp_neg(a)
    assert got.tolist() == [spec_exp(int(v)) for v in a]
    assert np.abs(got / 2 ** 15 - np.exp(-a / 4096)).max() < 1.4e-3
    assert intmodel.exp_neg(0) == 32768


def test_expert_input_rounds_and_saturates():
    x8, t8 = intmodel.expert_input(np.array([[32767, -32768, 127, 128, -129, 0]]), np.array([-3]))
    assert x8.tolist() == [[127, -128, 0, 1, -1, 0]]
    assert t8.tolist() == [5]


def test_softmax_topk_ties_go_to_lower_index():
    z = np.array([[5, 9, 9, 1, 9], [0, 0, 0, 0, 0]])
    picks, weights = intmodel.softmax_topk(z, 2, normalize=True)
    assert picks.tolist() == [[1, 2], [0, 1]]
    assert weights.tolist() == [[16384, 16384], [16384, 16384]]


def test_softmax_weights_follow_float_softmax():
    rng = np.random.default_rng(2)
    z = rng.integers(-32000, 32000, (200, 16))
    for normalize in (True, False):
        picks, weights = intmodel.softmax_topk(z, 4, normalize)
        p = np.exp((z - z.max(1, keepdims=True)) / 4096)
        ref = np.take_along_axis(p, picks, 1)
        ref /= (ref if normalize else p).sum(1, keepdims=True)
        assert np.abs(weights / 2 ** 15 - ref).max() < 2e-3
        assert weights.max() <= 32768


def test_sigmoid_matches_spec_and_float():
    z = np.arange(-600000, 600000, 537)
    got = intmodel.sigmoid(z)
    e = [spec_exp(abs(int(v))) for v in z]
    want = [(1 << 30) // (2 ** 15 + ei) if v >= 0 else (ei << 15) // (2 ** 15 + ei)
            for v, ei in zip(z, e, strict=True)]
    assert got.tolist() == want
    assert np.abs(got / 2 ** 15 - 1 / (1 + np.exp(-z / 4096))).max() < 1e-3


@pytest.mark.parametrize("bits,group_size,sparsity", [
    (8, None, "dense"), (4, 32, "2:4"), (8, 32, "1:4"), (4, 64, "2:8"),
])
def test_expert_ffn_equals_scalar_spec(bits, group_size, sparsity):
    rng = np.random.default_rng(3)
    ex = random_expert(rng, 64, 64, bits, group_size, sparsity)
    x = rng.integers(-128, 128, (4, 64))
    x[0] = 127
    t = np.array([-7, 0, 3, -64])
    got = intmodel.expert_ffn(x, t, ex, 40)
    want = [spec_expert(x[i], int(t[i]), ex, 40) for i in range(4)]
    assert got.tolist() == want


@pytest.mark.parametrize("options", [
    {}, {"normalize": False}, {"shared": False}, {"gate": False}, {"top_k": 1, "experts": 4},
    {"top_k": 8, "experts": 16, "bits": 4, "group_size": 32, "sparsity": "2:4"},
    {"acc_bits": 24},
])
def test_moe_layer_equals_scalar_spec(options):
    rng = np.random.default_rng(4)
    layer = random_layer(rng, **options)
    x = rng.integers(-32768, 32768, (5, 32))
    x[1] = 0                                   # all logits equal: ties everywhere
    x[2] = 32767                               # the int8 expert input saturates
    t = rng.integers(-18, 3, 5)
    out, picks, _ = intmodel.moe_layer(x, t, layer, return_routing=True)
    for i in range(5):
        order, want = spec_layer_token(x[i], int(t[i]), layer)
        assert picks[i].tolist() == order
        assert out[i].tolist() == want
