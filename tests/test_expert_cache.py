"""The host expert cache (host/expert_cache.py), the predictors (host/predictor.py) and
``moefpga cache-sim`` (host/cache_sim.py): victims against models written here, accuracy on
hand-made routings, refusals."""

import random

import numpy as np
import pytest
from cli_runner import main

from moefpga.hls_models import synthetic
from moefpga.hls_models.errors import MoefpgaError
from moefpga.host.expert_cache import SHARED_EXPERT, ExpertCache, batch_order, make_policy
from moefpga.host.predictor import (
    GatePredictor,
    HistoryPredictor,
    PredictionScore,
    make_predictor,
    rank_batch,
)

SH = SHARED_EXPERT


class SlotsModel:
    """The hardware's slots and the host's prefetch rule, written from docs/slots.md and
    docs/cache.md with use times and counts instead of ordered lists."""

    def __init__(self, slots, policy):
        self.tag = [None] * slots
        self.last = [0] * slots           # time of the last read or commit
        self.uses = {}                    # batches that ran each tag (lfu)
        self.policy = policy
        self.time = 0

    def _touch(self, slot):
        self.time += 1
        self.last[slot] = self.time

    def victim(self):
        empty = [s for s, t in enumerate(self.tag) if t is None]
        return empty[0] if empty else min(range(len(self.tag)), key=self.last.__getitem__)

    def load(self, tag, kind):
        slot = self.victim()
        old, self.tag[slot] = self.tag[slot], tag
        self._touch(slot)
        return (tag, kind, slot, old)

    def batch(self, layer, experts, shared):
        tags = [(layer, e) for e in experts] + ([(layer, SH)] if shared else [])
        resident = [t for t in tags if t in self.tag]
        missing = [t for t in tags if t not in self.tag]
        out = []
        for group in (resident, missing):
            routed = sorted(t for t in group if t[1] != SH)
            for tag in routed + [t for t in group if t[1] == SH]:
                if tag in self.tag:
                    self._touch(self.tag.index(tag))
                else:
                    out.append(self.load(tag, "demand"))
                self.uses[tag] = self.uses.get(tag, 0) + 1
        return out

    def prefetch(self, tags):
        out, wanted = [], set()
        for tag in tags:
            if tag in wanted:
                continue
            if tag not in self.tag:
                v = self.victim()
                old = self.tag[v]
                if old is not None:
                    if old in wanted:
                        break
                    others = [s for s, t in enumerate(self.tag) if t is not None
                              and t not in wanted]
                    if self.policy == "lru":
                        pick = min(others, key=self.last.__getitem__)
                    else:
                        pick = min(others, key=lambda s: (self.uses.get(self.tag[s], 0),
                                                          self.last[s]))
                    if pick != v:
                        break
                out.append(self.load(tag, "prefetch"))
            wanted.add(tag)
        return out


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("slots", [1, 2, 3, 5])
@pytest.mark.parametrize("shared", [False, True])
def test_victims_equal_an_independent_model(policy, slots, shared):
    rng = random.Random(slots * 10 + shared)
    cache = ExpertCache(slots, policy, shared=shared)
    model = SlotsModel(slots, policy)
    layers, experts = 3, 6
    prefetched = 0
    for n in range(300):
        layer, nxt = n % layers, (n + 1) % layers
        needed = rng.sample(range(experts), rng.randint(1, 3))
        predicted = rng.sample(range(experts), rng.randint(0, 3)) if rng.random() < 0.8 else None
        loads = cache.step(layer, needed, nxt, predicted)
        expected = model.batch(layer, needed, shared)
        if predicted is not None:
            expected += model.prefetch([(nxt, SH)] * shared + [(nxt, e) for e in predicted])
        got = [((ld.layer, ld.expert), ld.kind, ld.slot, ld.evicted) for ld in loads]
        assert got == expected, f"batch {n}"
        assert cache.mirror.tags == model.tag
        prefetched += sum(kind == "prefetch" for _, kind, _, _ in expected)
    assert prefetched > 0


def test_a_batch_and_its_prefetches_by_hand():
    cache = ExpertCache(2, "lru", shared=True, record_bytes=lambda layer, e: 100 + (e == SH))
    loads = cache.step(0, [3, 1], 1, [2, 5])
    assert [(ld.layer, ld.expert, ld.kind, ld.slot, ld.evicted) for ld in loads] == [
        (0, 1, "demand", 0, None), (0, 3, "demand", 1, None), (0, SH, "demand", 0, (0, 1)),
        (1, SH, "prefetch", 1, (0, 3)), (1, 2, "prefetch", 0, (0, SH)),
    ]                                # (1, 5): the victim would be (1, SH), wanted: stop
    loads = cache.step(1, [2, 4])    # resident (1, 2) then (1, SH); then (1, 4) evicts (1, 2)
    assert [(ld.expert, ld.kind, ld.slot, ld.evicted) for ld in loads] == [
        (4, "demand", 0, (1, 2))]
    s = cache.stats
    assert (s.hits, s.demand_loads, s.routed_hits, s.routed_accesses) == (2, 4, 1, 4)
    assert (s.prefetches, s.useful_prefetches, s.wasted_prefetches) == (2, 2, 0)
    assert (s.demand_bytes, s.prefetch_bytes) == (401, 201)


def test_lfu_vetoes_a_prefetch_into_a_frequently_used_expert():
    cache = ExpertCache(2, "lfu")
    for _ in range(3):
        cache.step(0, [0])                 # (0, 0) used three times
    cache.step(1, [1])                     # LRU is now (0, 0)
    assert cache.step(1, [1], 2, [7]) == []   # (1, 1) ran twice: LFU gives it up, not (0, 0)
    lru = ExpertCache(2, "lru")
    for layer, e in [(0, 0), (0, 0), (0, 0), (1, 1)]:
        lru.step(layer, [e])
    assert [(ld.expert, ld.evicted) for ld in lru.step(1, [1], 2, [7])] == [(7, (0, 0))]


def test_batch_order_runs_resident_first_shared_last_of_its_group():
    tags = [(0, 5), (0, SH), (0, 1), (0, 3)]
    assert batch_order(tags, []) == [(0, 1), (0, 3), (0, 5), (0, SH)]
    assert batch_order(tags, [(0, 5), (0, SH)]) == [(0, 5), (0, SH), (0, 1), (0, 3)]


def test_shared_expert_number_is_the_record_headers():
    from moefpga.rtl.expert_stream import SHARED_EXPERT as HEADER_SHARED
    assert SHARED_EXPERT == HEADER_SHARED


def test_unknown_policy_and_predictor_are_refused():
    with pytest.raises(MoefpgaError, match="unknown cache policy 'fifo'; choose from lru, lfu"):
        make_policy("fifo")
    with pytest.raises(MoefpgaError, match="unknown predictor 'oracle'"):
        make_predictor("oracle", routers={}, num_experts=4, k=2)
    with pytest.raises(MoefpgaError, match="1 to 4"):
        make_predictor("gate", routers={}, num_experts=4, k=5)


def test_prediction_accuracy_counts_predicted_picks():
    score = PredictionScore()
    assert score.accuracy is None
    score.add(np.array([[0, 1], [2, 3]]), np.array([[1, 5], [6, 7]]))
    score.add(np.array([[4, 6]]), np.array([[6, 4]]))
    assert score.accuracy == 3 / 6


def test_gate_predictor_applies_the_next_layers_router():
    routers = {1: np.eye(4, dtype=np.float32)[[2, 0, 3, 1]]}   # expert e reads dimension r[e]
    hidden = np.array([[0.1, 0.9, 0.5, 0.0], [1.0, 0.0, 0.0, 2.0]], dtype=np.float32)
    guesses = GatePredictor(routers, 2).predict(0, 1, hidden, np.zeros((2, 2), int))
    assert guesses.tolist() == [[3, 0], [2, 1]]


def test_history_predictor_learns_transitions():
    p = HistoryPredictor(num_experts=4, k=2)
    assert p.predict(0, 1, None, np.array([[0, 1]])).tolist() == [[0, 1]]   # ties: lowest
    p.observe(0, np.array([[0, 1], [0, 2]]), 1, np.array([[3, 2], [3, 1]]))
    # from expert 0: 3 twice, 2 once, 1 once; from 2: 3, 1; from 1: 3, 2
    assert p.predict(0, 1, None, np.array([[0, 3]])).tolist() == [[3, 1]]
    assert p.predict(0, 1, None, np.array([[1, 2]])).tolist() == [[3, 1]]
    assert p.predict(1, 2, None, np.array([[0, 1]])).tolist() == [[0, 1]]    # other pair
    score = PredictionScore()
    score.add(p.predict(0, 1, None, np.array([[0, 2], [1, 3]])), np.array([[3, 1], [0, 2]]))
    assert score.accuracy == 3 / 4           # [3, 1] all right; [2, 3] has 2 of (0, 2)


def test_rank_batch_orders_by_votes_then_rank():
    assert rank_batch(np.array([[4, 1], [1, 2], [3, 1]])) == [1, 3, 4, 2]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("cache") / "m", "qwen2_moe",
                                      num_layers=3, hidden_size=32, expert_ffn_size=32,
                                      shared_expert_ffn_size=32, vocab_size=64)


def test_cache_sim_prints_a_row_per_configuration(model):
    code, out, err = main("cache-sim", "--checkpoint", model, "--tokens", 6,
                          "--slots", "2,3", "--predictor", "gate,none", "--policy", "lru")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("lru", "gate", "2"), ("lru", "none", "2"), ("lru", "gate", "3"), ("lru", "none", "3")]
    for gate, none in (rows[0:2], rows[2:4]):
        assert none[5] == "-" and none[7] == "0" and gate[5].endswith("%")
    # 6 tokens x 3 layers x (2 routed + shared) expert runs, all loaded without prefetch
    assert int(rows[1][6]) == 54


@pytest.mark.parametrize("args, message", [
    (["--policy", "lru,fifo"], "unknown policy 'fifo'"),
    (["--predictor", "oracle"], "unknown predictor 'oracle'"),
    (["--slots", "2,0"], "must be a positive whole number"),
    (["--tokens", "-3"], "must be a positive whole number"),
    (["--guesses", "9"], "--guesses 9 exceeds the 8 experts"),
    (["--backend", "reference"], "--backend reference is not available"),
    (["--tokens", "5000"], "exceeds the model's context"),
    (["--sparsity", "3:3"], ""),
])
def test_cache_sim_refusals_are_one_line(model, args, message):
    code, out, err = main("cache-sim", "--checkpoint", model, *args)
    assert code == 2 and out == ""
    assert err.startswith("moefpga: error: ") and err.count("\n") == 1, err
    assert message in err
