"""Fidelity of the integer model against the float reference on the same pruned weights."""

from dataclasses import dataclass

import numpy as np

from . import intmodel, reference
from .calibrate import prune_layer, quantize_layer
from .quant import quantize_activations

__all__ = ["LayerFidelity", "relative_l2", "cosine", "routing_agreement", "evaluate_layer"]


@dataclass(frozen=True)
class LayerFidelity:
    """How closely the integer model follows the float reference on one layer.

    Members
    -------
    rel_l2 : float
        ``||y - y_ref|| / ||y_ref||`` over all tokens.
    cosine : float
        Cosine similarity of the flattened outputs.
    routing_agreement : float
        Fraction of tokens whose set of top-k experts equals the reference's.
    """
    rel_l2:            float
    cosine:            float
    routing_agreement: float


def relative_l2(test, ref):
    """``||test - ref|| / ||ref||`` (float64)."""
    test, ref = np.asarray(test, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(test - ref) / np.linalg.norm(ref))


def cosine(test, ref):
    """Cosine similarity of two arrays, flattened (float64)."""
    test, ref = np.ravel(test).astype(np.float64), np.ravel(ref).astype(np.float64)
    return float(test @ ref / (np.linalg.norm(test) * np.linalg.norm(ref)))


def routing_agreement(picks, ref_picks):
    """Fraction of tokens (rows) whose expert sets are equal, whatever their order."""
    return float(np.mean(np.all(np.sort(picks, axis=1) == np.sort(ref_picks, axis=1), axis=1)))


def evaluate_layer(weights, spec, tokens, calibration):
    """Run the float reference (on the pruned weights) and the integer model; compare.

    Parameters
    ----------
    weights : MoELayerWeights
        Float layer, unpruned.
    spec : QuantSpec
    tokens : ndarray of float32, shape (tokens, hidden)
        Evaluation inputs.
    calibration : ndarray of float32, shape (tokens, hidden)
        Calibration inputs (kept apart from ``tokens`` for an honest measurement).
    """
    y_ref, (ref_picks, _) = reference.moe_layer(
        tokens, prune_layer(weights, spec.sparsity), return_routing=True)
    layer = quantize_layer(weights, spec, calibration)
    xq, exp = quantize_activations(tokens)
    out, picks, _ = intmodel.moe_layer(xq, exp, layer, return_routing=True)
    y = out * layer.out_scale
    return LayerFidelity(rel_l2=relative_l2(y, y_ref), cosine=cosine(y, y_ref),
                         routing_agreement=routing_agreement(picks, ref_picks))
