"""M:N pruning, the compressed M:N matrix and its byte serialization (hls_models/sparsity.py)."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moefpga.hls_models.errors import MoefpgaError
from moefpga.hls_models.sparsity import (
    DENSE,
    CompressedMN,
    Sparsity,
    compress,
    decompress,
    pack_positions,
    pack_values,
    packed_positions_nbytes,
    packed_values_nbytes,
    parse_sparsity,
    prune,
    unpack_positions,
    unpack_values,
)

FORMATS_DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"
PATTERNS = [DENSE] + [Sparsity(m, n) for m in (2, 4, 8, 16) for n in range(1, m)]
FAST = settings(max_examples=60, deadline=None)

# Small integers as floats make ties and zeros common; the wide floats cover the rest.
weights = st.one_of(
    st.integers(-3, 3).map(float),
    st.floats(-100, 100, width=32, allow_subnormal=False),
)


@st.composite
def pattern_and_matrix(draw, elements=weights):
    """A pattern and a float32 matrix whose width is a multiple of its M."""
    sp = draw(st.sampled_from(PATTERNS))
    rows, groups = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    shape = (rows, groups * sp.m)
    return sp, draw(hnp.arrays(np.float32, shape, elements=elements))


def reference_keep(group, n):
    """Indices a by-hand selection keeps: largest magnitude first, lower index on ties."""
    return sorted(sorted(range(len(group)), key=lambda i: (-abs(group[i]), i))[:n])


def reference_slots(group, n):
    """Canonical slots: the nonzero columns, then the lowest zero columns, ascending."""
    nonzero = [i for i, v in enumerate(group) if v != 0]
    zero = [i for i, v in enumerate(group) if v == 0]
    return sorted((nonzero + zero)[:n])


# --- patterns ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sp", PATTERNS, ids=str)
def test_parse_round_trips_every_allowed_pattern(sp):
    assert parse_sparsity(str(sp)) == sp


def test_parse_reads_kept_count_first():
    assert parse_sparsity("2:4") == Sparsity(m=4, n=2)
    assert parse_sparsity("1:4") == Sparsity(m=4, n=1)
    assert parse_sparsity("4:16") == Sparsity(m=16, n=4)
    assert parse_sparsity("dense") == DENSE == Sparsity(m=1, n=1)


@pytest.mark.parametrize(
    "text", ["2:3", "4:4", "5:4", "0:4", "2:32", "1:1", "", "2-4", "Dense", "2:4:8", " 2:4", "a:b"]
)
def test_parse_rejects_bad_strings_listing_accepted_forms(text):
    with pytest.raises(MoefpgaError, match="use 'dense' or 'N:M'"):
        parse_sparsity(text)


@pytest.mark.parametrize("m, n", [(3, 1), (4, 0), (4, 4), (32, 2), (1, 2), (4, 1.5)])
def test_sparsity_rejects_bad_parameters(m, n):
    with pytest.raises(MoefpgaError):
        Sparsity(m=m, n=n)


def test_sparsity_position_bits():
    assert [Sparsity(m, 1).position_bits for m in (2, 4, 8, 16)] == [1, 2, 3, 4]
    assert DENSE.position_bits == 0


# --- pruning ----------------------------------------------------------------------------------


@FAST
@given(pattern_and_matrix())
def test_prune_keeps_the_n_largest_with_ties_to_the_lower_index(case):
    sp, w = case
    pruned = prune(w, sp)
    assert pruned.dtype == np.float32 and pruned.shape == w.shape
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], sp.m):
            group, kept = w[r, start : start + sp.m], pruned[r, start : start + sp.m]
            keep = reference_keep(group.tolist(), sp.n)
            expected = np.zeros_like(group)
            expected[keep] = group[keep]
            np.testing.assert_array_equal(kept, expected)
            assert np.count_nonzero(kept) == min(sp.n, np.count_nonzero(group))


def test_prune_directed_ties_and_signs():
    w = np.array([[5, 2, -2, 1, 0, 0, 0, -4], [-1, 1, -1, 1, 3, -3, 3, -3]], dtype=np.float64)
    expected = [[5, 2, 0, 0, 0, 0, 0, -4], [-1, 1, 0, 0, 3, -3, 0, 0]]
    np.testing.assert_array_equal(prune(w, parse_sparsity("2:4")), expected)


def test_prune_dense_is_a_float32_copy():
    w = np.arange(6, dtype=np.float64).reshape(2, 3)
    pruned = prune(w, DENSE)
    np.testing.assert_array_equal(pruned, w)
    assert pruned.dtype == np.float32


def test_prune_rejects_a_width_that_is_not_a_multiple_of_m():
    with pytest.raises(
        MoefpgaError, match=r"^input width 100 is not a multiple of M=8 \(sparsity 2:8\)$"
    ):
        prune(np.ones((2, 100)), parse_sparsity("2:8"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_prune_rejects_non_finite_weights_naming_the_place(bad):
    w = np.ones((3, 8))
    w[2, 5] = bad
    with pytest.raises(MoefpgaError, match="row 2, column 5"):
        prune(w, parse_sparsity("2:4"))


def test_prune_rejects_a_vector():
    with pytest.raises(MoefpgaError, match="2-D"):
        prune(np.ones(8), parse_sparsity("2:4"))


# --- compressed form --------------------------------------------------------------------------


@FAST
@given(pattern_and_matrix())
def test_compress_is_canonical_and_round_trips(case):
    sp, w = case
    pruned = prune(w, sp)
    c = compress(pruned, sp)
    rows, cols = w.shape
    assert c.values.shape == c.positions.shape == (rows, cols // sp.m, sp.n)
    assert c.positions.dtype == np.uint8 and c.values.dtype == np.float32
    assert np.all(c.positions < sp.m) and np.all(np.diff(c.positions.astype(int), axis=-1) > 0)
    for r in range(rows):
        for g in range(cols // sp.m):
            group = pruned[r, g * sp.m : (g + 1) * sp.m].tolist()
            assert c.positions[r, g].tolist() == reference_slots(group, sp.n)
    np.testing.assert_array_equal(decompress(c), pruned)


@FAST
@given(pattern_and_matrix(elements=st.integers(-127, 127)))
def test_compress_keeps_int8_values(case):
    sp, w = case
    q = prune(w, sp).astype(np.int8)
    c = compress(q, sp)
    assert c.values.dtype == np.int8
    np.testing.assert_array_equal(decompress(c), q)


def test_compress_rejects_a_crowded_group():
    w = np.array([[1, 0, 0, 0, 1, 1, 1, 0]], dtype=np.float32)
    with pytest.raises(MoefpgaError, match="row 0, group 1 has more than N=2 nonzeros"):
        compress(w, parse_sparsity("2:4"))


def test_compress_dense_stores_one_slot_per_column():
    w = np.array([[1, 0, -3]], dtype=np.float32)
    c = compress(w, DENSE)
    assert c.values.shape == c.positions.shape == (1, 3, 1)
    assert not c.positions.any()
    assert pack_positions(c.positions, DENSE.m) == b""
    np.testing.assert_array_equal(decompress(c), w)


@pytest.mark.parametrize(
    "positions",
    [[[[1, 0]]], [[[1, 1]]], [[[0, 4]]], [[[0, 1, 2]]]],
    ids=["descending", "repeated", "out-of-range", "wrong-shape"],
)
def test_compressed_matrix_rejects_non_canonical_positions(positions):
    positions = np.array(positions, dtype=np.uint8)
    values = np.zeros(positions.shape, dtype=np.int8)
    with pytest.raises(MoefpgaError):
        CompressedMN(values, positions, parse_sparsity("2:4"), 4)


# --- value bytes ------------------------------------------------------------------------------


def reference_pack_int4(values):
    """Nibble pairs built one value at a time: first value low, second high."""
    nibbles = [v & 0xF for v in values] + [0] * (len(values) % 2)
    return bytes(lo | hi << 4 for lo, hi in zip(nibbles[0::2], nibbles[1::2], strict=True))


@FAST
@given(
    st.sampled_from([4, 8]).flatmap(
        lambda bits: st.tuples(
            st.just(bits),
            hnp.arrays(
                np.int8,
                hnp.array_shapes(min_dims=3, max_dims=3, min_side=0, max_side=5),
                elements=st.integers(-(1 << bits - 1), (1 << bits - 1) - 1),
            ),
        )
    )
)
def test_values_round_trip(case):
    bits, values = case
    data = pack_values(values, bits)
    assert len(data) == packed_values_nbytes(values.size, bits)
    flat = values.reshape(-1).tolist()
    expected = bytes(v & 0xFF for v in flat) if bits == 8 else reference_pack_int4(flat)
    assert data == expected
    back = unpack_values(data, bits, values.shape)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, values)


def test_values_int4_nibble_order_and_padding():
    assert pack_values(np.array([1, -1, 7]), 4) == bytes([0xF1, 0x07])
    assert pack_values(np.array([-8, 0]), 4) == bytes([0x08])


@pytest.mark.parametrize("bits, value", [(4, 8), (4, -9), (8, 128), (8, -129)])
def test_values_out_of_range_are_refused(bits, value):
    with pytest.raises(MoefpgaError, match="cannot be packed"):
        pack_values(np.array([value]), bits)


def test_values_bad_streams_are_refused():
    with pytest.raises(MoefpgaError, match="value bytes"):
        unpack_values(b"\x00\x00", 8, (1, 3))
    with pytest.raises(MoefpgaError, match="padding nibble"):
        unpack_values(b"\x00\x10", 4, (3,))
    with pytest.raises(MoefpgaError, match="4 or 8"):
        pack_values(np.zeros(2), 2)


# --- position bytes ---------------------------------------------------------------------------


def reference_pack_positions(positions, m):
    """Each row as one Python integer: position k at bit k*b, written out little-endian."""
    b = m.bit_length() - 1
    out = b""
    for row in positions:
        fields = row.reshape(-1).tolist()
        stream = sum(p << (k * b) for k, p in enumerate(fields))
        out += stream.to_bytes(-(-len(fields) * b // 8), "little")
    return out


@FAST
@given(
    st.sampled_from(PATTERNS).flatmap(
        lambda sp: st.tuples(
            st.just(sp),
            hnp.arrays(
                np.uint8,
                st.tuples(st.integers(0, 4), st.integers(0, 7), st.just(sp.n)),
                elements=st.integers(0, sp.m - 1),
            ),
        )
    )
)
def test_positions_round_trip_for_every_m(case):
    sp, positions = case
    data = pack_positions(positions, sp.m)
    assert len(data) == packed_positions_nbytes(positions.shape, sp.m)
    assert data == reference_pack_positions(positions, sp.m)
    back = unpack_positions(data, sp.m, positions.shape)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, positions)


def test_positions_pad_each_row_to_a_byte():
    positions = np.array([[[7], [1]], [[0], [5]]], dtype=np.uint8)
    assert pack_positions(positions, 8) == bytes([0b001_111, 0b101_000])


def test_positions_bad_streams_are_refused():
    with pytest.raises(MoefpgaError, match="position bytes"):
        unpack_positions(b"\x00", 8, (2, 2, 1))
    with pytest.raises(MoefpgaError, match="padding bits"):
        unpack_positions(b"\x40", 8, (1, 2, 1))
    with pytest.raises(MoefpgaError, match="outside 0..3"):
        pack_positions(np.array([[[4]]]), 4)
    with pytest.raises(MoefpgaError, match="power of two"):
        pack_positions(np.zeros((1, 1, 1)), 6)


# --- the worked example of docs/formats.md ----------------------------------------------------


def test_worked_example_of_the_format_document():
    sp = parse_sparsity("2:4")
    w = np.array([[5, 2, -2, 1, 0, 0, 0, -4]], dtype=np.float32)
    pruned = prune(w, sp)
    np.testing.assert_array_equal(pruned, [[5, 2, 0, 0, 0, 0, 0, -4]])
    c = compress(pruned.astype(np.int8), sp)
    assert c.values.tolist() == [[[5, 2], [0, -4]]]
    assert c.positions.tolist() == [[[0, 1], [0, 3]]]
    int8, int4, pos = (
        pack_values(c.values, 8).hex(" ").upper(),
        pack_values(c.values, 4).hex(" ").upper(),
        pack_positions(c.positions, sp.m).hex(" ").upper(),
    )
    assert (int8, int4, pos) == ("05 02 00 FC", "25 C0", "C4")
    doc = FORMATS_DOC.read_text()
    for row in (f"| `{int8}` |", f"| `{int4}` |", f"| `{pos}` |"):
        assert row in doc
