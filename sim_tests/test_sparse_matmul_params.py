"""The engine's stream formats: the worked example of docs/engine.md and the packing's errors."""

import numpy as np
import pytest

from moefpga.rtl.sparse_matmul_params import SparseMatmulParams

# The configuration of the worked example in docs/engine.md.
EXAMPLE = SparseMatmulParams(lanes=2, m=4, n=2, weight_bits=8, group_size=8, max_tokens=2,
                             max_cols=16)


def test_worked_example():
    q = np.zeros((2, 8), dtype=np.int64)
    q[0, 1], q[0, 3], q[1, 6] = -3, 5, 7
    assert EXAMPLE.weight_beat.size == 58
    assert EXAMPLE.weight_beats(q, np.array([[10], [20]])) == [0x40000C15FD, 0x280A81C0040000]
    assert EXAMPLE.activation_beats([[1, -2, 3, -4, 5, -6, 7, -128]]) == [0xFC03FE01,
                                                                          0x8007FA05]
    assert EXAMPLE.command_bits(tokens=1, cols=8) == 0x0B
    assert EXAMPLE.command_bits(tokens=2, cols=16, rows=4) == 0x54
    out = [EXAMPLE.output_beat.const(beat).as_bits() for beat in ([-1, 5], [2**39 - 1, -2**39])]
    assert EXAMPLE.outputs(out, tokens=2).tolist() == [[-1, 5], [2**39 - 1, -2**39]]


def test_dense_has_no_positions():
    dense = SparseMatmulParams(lanes=1, m=2, n=2, weight_bits=4, group_size=2, max_tokens=1,
                               max_cols=4)
    assert dense.pos_bits == 0
    assert dense.weight_beats([[-8, 7, 0, -1]], [[256, 1]]) == [0x10078, 0x001F0]


@pytest.mark.parametrize("call, message", [
    (lambda: EXAMPLE.weight_beats(np.ones((2, 8)), np.ones((2, 1))), "not 2:4 sparse"),
    (lambda: EXAMPLE.weight_beats(np.full((2, 8), 0) - 129, np.ones((2, 1))),
     r"\[-128, 127\]"),
    (lambda: EXAMPLE.weight_beats(np.zeros((2, 8)), np.full((2, 1), 512)), r"\[0, 511\]"),
    (lambda: EXAMPLE.weight_beats(np.zeros((3, 8)), np.ones((3, 1))), "3 rows do not fit"),
    (lambda: EXAMPLE.weight_beats(np.zeros((2, 12)), np.ones((2, 1))), "12 columns"),
    (lambda: EXAMPLE.activation_beats(np.zeros((3, 8))), "3 tokens do not fit"),
    (lambda: EXAMPLE.activation_beats(np.full((1, 8), 128)), r"\[-128, 127\]"),
])
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("kwargs, message", [
    (dict(m=3, n=1), "power of two"),
    (dict(m=4, n=5), "n <= m"),
    (dict(m=4, n=2, weight_bits=6), "8 or 4 bits"),
    (dict(m=4, n=2, group_size=6), "not a multiple of m"),
])
def test_bad_parameters_are_refused(kwargs, message):
    kwargs = {"lanes": 2, "group_size": 8, "max_tokens": 1, "max_cols": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        SparseMatmulParams(**kwargs)
