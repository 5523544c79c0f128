"""The bit-accurate integer model of the accelerator: the specification the RTL must equal.

Every rounding, saturation and bit width here is stated in docs/numerics.md; the gateware in
``moefpga.rtl`` computes exactly these functions.
"""

import numpy as np

from .fixedpoint import saturate

__all__ = ["matvec"]


def matvec(q, mant, group_size, x, acc_bits):
    """Integer matrix-vector products of a quantized (and possibly M:N-pruned) weight matrix.

    For every token ``t`` and output row ``r``: the exact partial sum of each quantization group,
    ``psum = sum(q[r, i] * x[t, i] for i in group)``, is multiplied by the group's mantissa and
    added to a saturating ``acc_bits``-bit accumulator, group by group in column order::

        acc = saturate(acc + psum * mant[r, g], acc_bits)

    Pruned weights are zeros in ``q`` and contribute nothing, so the dense and compressed forms
    of a matrix give the same result.

    Parameters
    ----------
    q : ndarray of int, shape (rows, cols)
        Weights (int8 range for 8-bit, int4 range for 4-bit weights).
    mant : ndarray of int, shape (rows, cols // group_size)
        Unsigned per-group scale mantissas.
    group_size : int
        Columns per quantization group; divides ``cols``.
    x : ndarray of int, shape (tokens, cols)
        Activations, int8 range.
    acc_bits : int
        Width of the signed accumulator.

    Returns
    -------
    ndarray of int64, shape (tokens, rows)
    """
    q = np.asarray(q, dtype=np.int64)
    x = np.asarray(x, dtype=np.int64)
    rows, cols = q.shape
    groups = cols // group_size
    psum = np.einsum("rgi,tgi->tgr", q.reshape(rows, groups, group_size),
                     x.reshape(-1, groups, group_size))
    scaled = psum * np.asarray(mant, dtype=np.int64).T[None]
    acc = np.zeros((x.shape[0], rows), dtype=np.int64)
    for g in range(groups):
        acc = saturate(acc + scaled[:, g], acc_bits)
    return acc
