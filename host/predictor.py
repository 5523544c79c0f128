"""Next-layer expert predictors: guess the experts of MoE layer l+1 before its router runs.

Each predictor gives, per token of a batch of layer l, its top-k' guesses for the next MoE layer
(docs/cache.md):

- ``gate``: layer l+1's router applied to layer l's post-attention normalized hidden state (the
  input of layer l's MoE block), the method of the expert-offloading literature. It works
  because the residual stream changes little from one layer to the next.
- ``history``: a table counting, per pair of consecutive MoE layers, how often expert e' of the
  next layer was picked by a token that picked expert e in this one; a token's guesses are the
  e' with the largest counts summed over its picks. It learns online from the routings it sees.
- ``none``: no guesses; the cache then prefetches nothing.

Ties go to the lower expert index everywhere.
"""

from collections.abc import Mapping

import numpy as np

from ..hls_models.errors import MoefpgaError

__all__ = ["Predictor", "NoPredictor", "GatePredictor", "HistoryPredictor", "PREDICTORS",
           "make_predictor", "top_k", "rank_batch", "PredictionScore"]


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the indices of the ``k`` largest scores, largest first, ties to the lower index."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :k]


class Predictor:
    """Contract: :meth:`predict` returns int ``(T, k')`` guesses (most likely first) of the
    next layer's experts for each token, or None when it makes none; :meth:`observe` is told
    the routing of both layers once the next layer has been routed."""

    name = ""

    def predict(self, layer: int, next_layer: int, hidden: np.ndarray,
                picks: np.ndarray) -> np.ndarray | None:
        """Guesses for ``next_layer`` from ``layer``'s hidden state ``(T, d)`` (the MoE block's
        float input) and picks ``(T, k)``."""
        raise NotImplementedError

    def observe(self, layer: int, picks: np.ndarray, next_layer: int,
                next_picks: np.ndarray) -> None:
        """The tokens that picked ``picks`` at ``layer`` picked ``next_picks`` at
        ``next_layer``."""


class NoPredictor(Predictor):
    """No prediction: the demand-only baseline."""

    name = "none"

    def predict(self, layer, next_layer, hidden, picks):
        return None


class GatePredictor(Predictor):
    """The next layer's router on this layer's hidden state.

    Parameters
    ----------
    routers : mapping of int to ndarray
        Float router weights ``(E, d)`` of every MoE layer, by decoder layer index.
    k : int
        Guesses per token.
    """

    name = "gate"

    def __init__(self, routers: Mapping[int, np.ndarray], k: int):
        self.routers, self.k = routers, k

    def predict(self, layer, next_layer, hidden, picks):
        return top_k(np.asarray(hidden, dtype=np.float32) @ self.routers[next_layer].T, self.k)


class HistoryPredictor(Predictor):
    """Transition counts between the picks of consecutive MoE layers.

    Parameters
    ----------
    num_experts : int
        Routed experts per layer.
    k : int
        Guesses per token.
    """

    name = "history"

    def __init__(self, num_experts: int, k: int):
        self.num_experts, self.k = num_experts, k
        self.tables: dict[tuple[int, int], np.ndarray] = {}

    def _table(self, layer, next_layer):
        shape = (self.num_experts, self.num_experts)
        return self.tables.setdefault((layer, next_layer), np.zeros(shape, dtype=np.int64))

    def predict(self, layer, next_layer, hidden, picks):
        return top_k(self._table(layer, next_layer)[np.asarray(picks)].sum(axis=1), self.k)

    def observe(self, layer, picks, next_layer, next_picks):
        table = self._table(layer, next_layer)
        for now, then in zip(np.asarray(picks), np.asarray(next_picks), strict=True):
            np.add.at(table, (now[:, None], then[None, :]), 1)


PREDICTORS = ("gate", "history", "none")


def make_predictor(name: str, *, routers: Mapping[int, np.ndarray], num_experts: int,
                   k: int) -> Predictor:
    """The predictor called ``name`` making ``k`` guesses per token; a MoefpgaError naming the
    choices for any other name, or for ``k`` outside 1..``num_experts``."""
    if name not in PREDICTORS:
        raise MoefpgaError(f"unknown predictor {name!r}; choose from {', '.join(PREDICTORS)}")
    if not 1 <= k <= num_experts:
        raise MoefpgaError(f"the predictor's guesses per token must be 1 to {num_experts} "
                           f"(the experts of a layer), not {k}")
    if name == "gate":
        return GatePredictor(routers, k)
    if name == "history":
        return HistoryPredictor(num_experts, k)
    return NoPredictor()


def rank_batch(guesses: np.ndarray) -> list[int]:
    """The experts guessed for a batch, most wanted first: by the number of tokens guessing
    them, then by their best rank in a token's guesses, then by index."""
    guesses = np.asarray(guesses)
    votes, best = {}, {}
    for rank, column in enumerate(guesses.T):
        for expert in column.tolist():
            votes[expert] = votes.get(expert, 0) + 1
            best.setdefault(expert, rank)
    return sorted(votes, key=lambda e: (-votes[e], best[e], e))


class PredictionScore:
    """Prediction accuracy: the fraction of the next layer's picks (token by token) that were
    among that token's guesses."""

    def __init__(self):
        self.predicted = 0
        self.picks = 0

    def add(self, guesses: np.ndarray, next_picks: np.ndarray) -> None:
        """Score guesses ``(T, k')`` against the picks ``(T, k)`` the tokens then made."""
        for guess, picks in zip(np.asarray(guesses), np.asarray(next_picks), strict=True):
            self.predicted += len(set(guess.tolist()) & set(picks.tolist()))
            self.picks += len(picks)

    @property
    def accuracy(self) -> float | None:
        """None before any score."""
        return self.predicted / self.picks if self.picks else None
