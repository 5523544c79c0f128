"""The float32 reference MoE block, against which the quantized models and the RTL are measured.

It computes what the transformers blocks ``MixtralSparseMoeBlock``, ``OlmoeSparseMoeBlock``,
``Qwen2MoeSparseMoeBlock`` and ``Qwen3MoeSparseMoeBlock`` compute in float32:

1. router logits ``x @ router.T``; probabilities by a float32 softmax over all ``E`` experts;
2. the ``k`` most probable experts, ties going to the lower expert index (``torch.topk`` leaves
   that order unspecified; this model fixes it, and the integer model follows it);
3. the picked probabilities, divided by their sum when ``norm_topk_prob``;
4. the weighted sum of the picked experts' SwiGLU outputs ``down(silu(gate x) * up x)``;
5. plus the shared expert's output, scaled by ``sigmoid(shared_gate @ x)`` when there is a gate.
"""

import numpy as np

from moefpga.hls_models.checkpoint import ExpertWeights, MoELayerWeights
from moefpga.hls_models.errors import MoefpgaError

__all__ = ["expert_ffn", "moe_layer", "route", "router_logits"]


def router_logits(x: np.ndarray, layer: MoELayerWeights) -> np.ndarray:
    """Router logits of each token.

    Parameters
    ----------
    x : numpy.ndarray
        Tokens, shape ``(T, d)``, finite.
    layer : MoELayerWeights

    Returns
    -------
    numpy.ndarray
        float32, shape ``(T, E)``.

    Raises
    ------
    MoefpgaError
        If ``x`` is not a finite ``(T, d)`` array.
    """
    x = _checked_tokens(x, layer.router.shape[1])
    return x @ layer.router.T


def route(logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pick the ``top_k`` experts of each token and their weights.

    Parameters
    ----------
    logits : numpy.ndarray
        Router logits, shape ``(T, E)``, finite.
    top_k : int
        Experts per token, ``1 <= top_k <= E``.
    normalize : bool
        Divide the picked probabilities by their sum.

    Returns
    -------
    experts : numpy.ndarray
        int64, shape ``(T, top_k)``: by descending probability, equal probabilities in
        ascending expert index; so of equal candidates the lower indices are picked.
    weights : numpy.ndarray
        float32, shape ``(T, top_k)``: the softmax probabilities (over all ``E`` experts) of
        the picked experts, renormalized if asked.

    Raises
    ------
    MoefpgaError
        If ``logits`` is not a finite 2-D array or ``top_k`` is out of range.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or not np.isfinite(logits).all():
        raise MoefpgaError(f"router logits must be a finite (tokens, experts) array; got shape "
                           f"{list(logits.shape)}")
    num_experts = logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or not (
            1 <= top_k <= num_experts):
        raise MoefpgaError(f"top_k must be in 1..{num_experts}, not {top_k!r}")
    probs = _softmax(logits)
    experts = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, experts, axis=1)
    if normalize:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return experts.astype(np.int64), weights.astype(np.float32)


def expert_ffn(x: np.ndarray, expert: ExpertWeights) -> np.ndarray:
    """SwiGLU feed-forward network ``down(silu(gate x) * up x)`` of each token.

    Parameters
    ----------
    x : numpy.ndarray
        float32, shape ``(T, d)``.
    expert : ExpertWeights

    Returns
    -------
    numpy.ndarray
        float32, shape ``(T, d)``.
    """
    gate = x @ expert.gate.T
    return (gate * _sigmoid(gate) * (x @ expert.up.T)) @ expert.down.T


def moe_layer(x: np.ndarray, layer: MoELayerWeights, return_routing: bool = False
              ) -> np.ndarray | tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The output of one MoE block.

    Parameters
    ----------
    x : numpy.ndarray
        Tokens (the block's input, after its RMSNorm), shape ``(T, d)``, finite.
    layer : MoELayerWeights
    return_routing : bool
        Also return the routing decision.

    Returns
    -------
    y : numpy.ndarray
        float32, shape ``(T, d)``.
    routing : tuple of numpy.ndarray
        Only if ``return_routing``: ``(experts, weights)`` as :func:`route` returns them.

    Raises
    ------
    MoefpgaError
        If ``x`` is not 2-D, its width is not the layer's hidden size, or a token is not finite
        (the message names the first such token).
    """
    x = _checked_tokens(x, layer.router.shape[1])
    experts, weights = route(router_logits(x, layer), layer.top_k, layer.norm_topk_prob)
    y = np.zeros_like(x)
    for j in np.unique(experts):
        tokens, slot = np.nonzero(experts == j)
        y[tokens] += weights[tokens, slot, None] * expert_ffn(x[tokens], layer.experts[j])
    if layer.shared is not None:
        shared = expert_ffn(x, layer.shared)
        if layer.shared_gate is not None:
            shared = shared * _sigmoid(x @ layer.shared_gate)[:, None]
        y += shared
    return (y, (experts, weights)) if return_routing else y


def _checked_tokens(x: np.ndarray, hidden_size: int) -> np.ndarray:
    """``x`` as float32 ``(T, hidden_size)``, or a MoefpgaError saying what is wrong with it."""
    try:
        with np.errstate(over="ignore"):
            x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise MoefpgaError("tokens must be a numeric (tokens, hidden) array") from None
    if x.ndim != 2 or x.shape[1] != hidden_size:
        raise MoefpgaError(f"tokens must have shape (tokens, {hidden_size}), "
                           f"not {list(x.shape)}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise MoefpgaError(f"token {bad[0]} is not finite (NaN or Inf in float32)")
    return x


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function without overflow for large ``|z|``."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1, e) / (1 + e)
