"""Weight and activation quantization (hls_models/quant.py)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moefpga.hls_models.errors import MoefpgaError
from moefpga.hls_models.quant import (
    EXP_MAX,
    EXP_MIN,
    MANT_BITS,
    QMAX,
    QuantizedMatrix,
    dequantize_activations,
    packed_matrix_nbytes,
    quantize_activations,
    quantize_weights,
    resolve_group_size,
)
from moefpga.hls_models.sparsity import (
    DENSE,
    Sparsity,
    decompress,
    pack_positions,
    pack_values,
    parse_sparsity,
    prune,
)

FAST = settings(max_examples=40, deadline=None)
PATTERNS = [DENSE] + [Sparsity(m, n) for m in (2, 4, 8, 16) for n in (1, m // 2, m - 1)]
MANT_ONE = 1 << MANT_BITS

weights = st.one_of(
    st.integers(-3, 3).map(float),
    st.floats(-1000, 1000, width=32, allow_subnormal=False),
)


@st.composite
def weight_case(draw):
    """(w, bits, group_size, sparsity) with a width that every choice divides."""
    bits = draw(st.sampled_from([8, 4]))
    group_size = draw(st.sampled_from([None, 32, 64, 128]))
    sp = draw(st.sampled_from(PATTERNS))
    cols = 128 * draw(st.integers(1, 2)) if group_size else 16 * draw(st.integers(1, 9))
    w = draw(hnp.arrays(np.float32, (draw(st.integers(1, 3)), cols), elements=weights))
    return w, bits, group_size, sp


def group_view(a, g):
    return np.asarray(a, dtype=np.float64).reshape(a.shape[0], -1, g)


# --- weights ----------------------------------------------------------------------------------


@FAST
@given(weight_case())
def test_weights_are_within_half_a_step_and_never_clip(case):
    w, bits, group_size, sp = case
    qm = quantize_weights(w, bits, group_size, sp)
    g = qm.group_size
    assert g == (group_size or w.shape[1])
    pruned = prune(w, sp)
    assert qm.q.dtype == np.int8 and qm.q.shape == w.shape
    assert np.abs(qm.q.astype(int)).max() <= QMAX[bits]
    assert np.all(qm.q[pruned == 0] == 0)

    step = qm.step.astype(np.float64)[..., None]
    err = np.abs(group_view(qm.dequantize(), g) - group_view(pruned, g))
    assert np.all(err <= step / 2 * (1 + 1e-6) + 2.0**-149)

    s_g = np.abs(group_view(pruned, g)).max(axis=-1) / QMAX[bits]
    exact_step = np.float64(qm.scale) * qm.mant / MANT_ONE
    assert np.all(exact_step >= s_g)


@FAST
@given(weight_case())
def test_scale_and_mantissas_are_tight(case):
    w, bits, group_size, sp = case
    qm = quantize_weights(w, bits, group_size, sp)
    assert qm.mant.dtype == np.uint16 and qm.mant.shape == (w.shape[0], w.shape[1] // qm.group_size)
    assert qm.mant.min() >= 1 and qm.mant.max() <= MANT_ONE
    assert isinstance(qm.scale, np.float32)
    s_g = np.abs(group_view(prune(w, sp), qm.group_size)).max(axis=-1) / QMAX[bits]
    scale = np.float64(qm.scale)
    if s_g.max() == 0:
        assert scale == 1.0
        return
    assert scale >= s_g.max() > np.float64(np.nextafter(qm.scale, np.float32(0)))
    smaller = np.maximum(qm.mant.astype(np.float64) - 1, 0)
    assert np.all((qm.mant == 1) | (scale * smaller / MANT_ONE < s_g))


@FAST
@given(weight_case())
def test_compressed_codes_and_stored_size(case):
    w, bits, group_size, sp = case
    qm = quantize_weights(w, bits, group_size, sp)
    c = qm.compressed()
    assert c.values.dtype == np.int8 and c.sparsity == sp
    np.testing.assert_array_equal(decompress(c), qm.q)
    payload = len(pack_values(c.values, bits)) + len(pack_positions(c.positions, sp.m))
    assert qm.nbytes_packed == payload + 2 * qm.mant.size + 4
    assert packed_matrix_nbytes(*w.shape, bits, group_size, sp) == qm.nbytes_packed


def test_zero_matrix_has_unit_scale():
    qm = quantize_weights(np.zeros((2, 64)), 4, 32, parse_sparsity("2:4"))
    assert qm.scale == np.float32(1.0)
    assert np.all(qm.mant == 1) and not qm.q.any() and not qm.dequantize().any()


def test_scales_example_of_the_format_document():
    w = np.zeros((2, 32), dtype=np.float32)
    w[0, 0], w[1, 0] = 1.27, 0.3
    qm = quantize_weights(w, 8, None, DENSE)
    assert qm.group_size == 32
    assert qm.mant.tolist() == [[256], [61]]
    assert qm.scale == np.nextafter(np.float32(0.01), np.float32(1))
    np.testing.assert_allclose(qm.step[:, 0], [0.01, 0.0023828], rtol=1e-4)
    assert qm.q[:, 0].tolist() == [127, 126]


def test_extreme_codes_are_symmetric():
    w = np.array([[-1.0, 1.0] + [0.0] * 30])
    for bits in (8, 4):
        assert quantize_weights(w, bits).q[0, :2].tolist() == [-QMAX[bits], QMAX[bits]]


def test_rounding_is_half_to_even():
    # Per channel with max 127: step 1 exactly, so 2.5 -> 2 and 3.5 -> 4.
    w = np.array([[127.0, 2.5, 3.5, -2.5] + [0.0] * 28])
    assert quantize_weights(w, 8).q[0, :4].tolist() == [127, 2, 4, -2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 3}, "weight bits must be 4 or 8, not 3"),
        ({"group_size": 48}, "group size 48 is not one of"),
        ({"group_size": 128}, "group size 128 does not divide the input width 96"),
        ({"sparsity": Sparsity(16, 1), "shape": (2, 40)}, "input width 40 .* M=16"),
    ],
)
def test_bad_weight_arguments_are_refused(kwargs, message):
    shape = kwargs.pop("shape", (2, 96))
    args = {"bits": 8, "group_size": None, "sparsity": DENSE} | kwargs
    with pytest.raises(MoefpgaError, match=message):
        quantize_weights(np.ones(shape), **args)


@pytest.mark.parametrize(
    "args, message",
    [
        ((2, 40, 8, None, Sparsity(16, 4)), "input width 40 is not a multiple of M=16"),
        ((2, 96, 8, 64, DENSE), "group size 64 does not divide the input width 96"),
        ((2, 96, 5, None, DENSE), "weight bits must be 4 or 8"),
    ],
)
def test_stored_size_refuses_what_quantization_refuses(args, message):
    with pytest.raises(MoefpgaError, match=message):
        packed_matrix_nbytes(*args)


def test_nan_weight_is_refused_naming_the_place():
    w = np.ones((2, 32))
    w[1, 7] = np.nan
    with pytest.raises(MoefpgaError, match="row 1, column 7"):
        quantize_weights(w, 8, 32, parse_sparsity("2:4"))


def test_resolve_group_size():
    assert resolve_group_size(96, None) == 96
    assert resolve_group_size(96, 32) == 32
    with pytest.raises(MoefpgaError, match="needs input columns"):
        resolve_group_size(0, None)


@pytest.mark.parametrize(
    "change",
    [
        {"mant": np.zeros((1, 1), np.uint16)},
        {"mant": np.full((1, 1), 257, np.uint16)},
        {"mant": np.ones((1, 2), np.uint16)},
        {"q": np.full((1, 32), 8, np.int8)},
        {"q": np.zeros((1, 32), np.int16)},
        {"scale": np.float32(0)},
        {"scale": np.float32(np.nan)},
        {"bits": 2},
    ],
)
def test_corrupted_quantized_matrix_is_refused(change):
    fields = {
        "q": np.zeros((1, 32), np.int8),
        "mant": np.ones((1, 1), np.uint16),
        "scale": np.float32(1),
        "bits": 4,
        "group_size": 32,
        "sparsity": DENSE,
    }
    with pytest.raises(MoefpgaError):
        QuantizedMatrix(**(fields | change))


# --- activations ------------------------------------------------------------------------------


def brute_force_exponent(amax, qmax):
    """Smallest integer e with amax / 2**e <= qmax, by search, clamped; 0 for a zero token."""
    if amax == 0:
        return 0
    e = next(e for e in range(-200, 200) if amax / 2.0**e <= qmax)
    return min(max(e, EXP_MIN), EXP_MAX)


tokens = hnp.arrays(
    np.float32,
    st.tuples(st.integers(0, 5), st.integers(1, 16)),
    elements=st.one_of(
        st.just(0.0),
        st.floats(-1e6, 1e6, width=32),
        st.integers(-300, 300).map(lambda v: v / 2),
    ),
)


@settings(max_examples=100, deadline=None)
@given(tokens, st.sampled_from([(8, 127, np.int8), (16, 32767, np.int16)]))
def test_activations_exponent_is_exact_and_error_is_half_a_step(x, width):
    bits, qmax, dtype = width
    xq, exp = quantize_activations(x, bits)
    assert xq.dtype == dtype and exp.dtype == np.int8
    assert xq.shape == x.shape and exp.shape == x.shape[:1]
    assert np.abs(xq.astype(int)).max(initial=0) <= qmax
    amax = np.abs(x.astype(np.float64)).max(axis=1, initial=0)
    assert exp.tolist() == [brute_force_exponent(a, qmax) for a in amax.tolist()]
    deq = dequantize_activations(xq, exp)
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, xq * np.exp2(exp.astype(np.float64))[:, None])
    step = np.exp2(exp.astype(np.float64))[:, None]
    assert np.all(np.abs(x - deq.astype(np.float64)) <= step / 2)
    tight = (amax > 0) & (exp > EXP_MIN)
    half = (qmax + 1) // 2
    assert np.all(np.abs(xq[tight].astype(int)).max(axis=1, initial=half) >= half)


@pytest.mark.parametrize(
    "amax, exp, code",
    [
        (127.0, 0, 127),
        (127.5, 1, 64),
        (63.5, -1, 127),
        (254.0, 1, 127),
        (254.5, 2, 64),
        (1.0, -6, 64),
        (0.0, 0, 0),
        (1e-30, EXP_MIN, 0),
        (1e30, EXP_MAX, 127),
    ],
)
def test_activation_exponent_edges(amax, exp, code):
    xq, e = quantize_activations(np.array([[amax, -amax / 4]], dtype=np.float32), 8)
    assert (int(e[0]), int(xq[0, 0])) == (exp, code)


def test_int16_token_exponent_edges():
    xq, exp = quantize_activations(np.array([[32767.0], [32767.5], [1.0]]))
    assert exp.tolist() == [0, 1, -14] and xq[:, 0].tolist() == [32767, 16384, 16384]


def test_zero_token_between_nonzero_tokens():
    xq, exp = quantize_activations(np.array([[1.0, 0], [0, 0], [0, -3.0]]), 8)
    assert exp.tolist() == [-6, 0, -5] and xq.tolist() == [[64, 0], [0, 0], [0, -96]]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activation_is_refused_naming_the_token(bad):
    x = np.ones((4, 3), dtype=np.float32)
    x[2, 1] = bad
    with pytest.raises(MoefpgaError, match="^activation token 2 has a non-finite value$"):
        quantize_activations(x)


def test_bad_activation_shapes_are_refused():
    with pytest.raises(MoefpgaError, match="2-D"):
        quantize_activations(np.ones(3))
    with pytest.raises(MoefpgaError, match="16 or 8"):
        quantize_activations(np.ones((1, 3)), 4)
    with pytest.raises(MoefpgaError, match="one exponent per token"):
        dequantize_activations(np.ones((2, 3), np.int8), np.zeros(3, np.int8))
