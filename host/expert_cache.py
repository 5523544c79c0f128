"""The host's mirror of the on-chip expert slots, and what to stream into them and when.

The MoE layer top (``rtl/moe_layer.py``, docs/moe_layer.md) holds S experts, each tagged
``(layer, expert)``, and picks every victim itself: the lowest-numbered empty slot, else the least
recently used slot that is not in use (docs/slots.md). The host cannot name a victim; it decides
only *which records it sends and when*. This module keeps a mirror that predicts the hardware's
choices exactly, and on top of it a host policy that decides which prefetches are worth their
victim (docs/cache.md):

- :class:`SlotMirror` is the hardware's table: tags per slot and the LRU order, with the top's
  rules for a batch (resident experts first, each group in index order, the shared expert last of
  its group; a hit and a committed load both make the slot the most recently used; a plain
  lookup changes nothing).
- A :class:`Policy` (``lru`` or ``lfu``, :func:`make_policy`) ranks the resident experts the host
  would give up. Demand loads are forced (the hardware asked), so they always go where the
  hardware's LRU puts them. A prefetch is sent only into the slot the hardware will evict, and
  only if the policy agrees that this resident expert is the one to give up; with ``lru`` it
  always agrees, with ``lfu`` it vetoes evicting an expert used more often than another resident
  one.
- :class:`ExpertCache` takes one hardware batch of one layer (the experts its tokens picked) and
  the predictions for the next layer, returns the records to send, in order, and keeps the
  statistics.

Prefetches are sent after the batch has ended (its last result beat), never during it: then no
slot is in use, the victim is exactly the mirror's LRU slot, and a prefetch can never evict a
resident expert the batch has yet to claim. The loads overlap what runs between two batches
(the host's attention and norms, the next batch's routing); if the next batch's lookup comes
before a prefetched record is committed, the top requests it, and the host answers that
request with nothing more than the record already on its way.
"""

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..hls_models.errors import MoefpgaError

__all__ = ["SHARED_EXPERT", "Load", "CacheStats", "SlotMirror", "Policy", "LruPolicy",
           "LfuPolicy", "POLICIES", "make_policy", "batch_order", "ExpertCache"]

#: The shared expert's number in a tag, as the record header numbers it
#: (``rtl.expert_stream.SHARED_EXPERT``; kept here so the mirror needs no gateware imports).
SHARED_EXPERT = 0xFFFF

Tag = tuple[int, int]


@dataclass(frozen=True)
class Load:
    """One record to send: expert ``expert`` of layer ``layer`` (:data:`SHARED_EXPERT` for the
    shared one), ``kind`` ``"demand"`` (the batch will request it) or ``"prefetch"``; the slot
    the hardware will put it in, the tag it evicts (None for an empty slot) and its size."""
    layer: int
    expert: int
    kind: str
    slot: int
    evicted: Tag | None
    nbytes: int


@dataclass
class CacheStats:
    """Counts since the cache was made.

    ``hits`` and ``demand_loads`` count every expert a batch runs, the shared one included, as
    the hardware's ``hits`` and ``loads`` counters do; ``routed_*`` count the routed experts
    only. ``useful_prefetches`` counts prefetched experts found resident by a batch before being
    evicted, ``wasted_prefetches`` those evicted unused.
    """
    hits: int = 0
    demand_loads: int = 0
    routed_hits: int = 0
    routed_accesses: int = 0
    prefetches: int = 0
    useful_prefetches: int = 0
    wasted_prefetches: int = 0
    demand_bytes: int = 0
    prefetch_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.demand_loads)

    @property
    def routed_hit_rate(self) -> float:
        return self.routed_hits / max(1, self.routed_accesses)

    @property
    def bytes_streamed(self) -> int:
        return self.demand_bytes + self.prefetch_bytes


class SlotMirror:
    """The hardware's slot table: which tag is in which slot, and the LRU order.

    Victim: the lowest-numbered empty slot, else the least recently used slot (the host only
    loads when no slot is in use, or, for a batch's demand loads, the slots in use are the most
    recently used ones, so the hardware's "least recently used free slot" is this one).
    """

    def __init__(self, slots: int):
        if slots < 1:
            raise MoefpgaError(f"the cache needs at least one slot, not {slots}")
        self.tags: list[Tag | None] = [None] * slots
        self._recency: list[int] = []          # valid slots, least recently used first

    def slot_of(self, tag: Tag) -> int | None:
        """The slot holding ``tag``, or None."""
        return self.tags.index(tag) if tag in self.tags else None

    def resident(self) -> list[Tag]:
        """The resident tags, least recently used first."""
        return [self.tags[s] for s in self._recency]

    def victim(self) -> int:
        """The slot the hardware's next load goes into."""
        return self.tags.index(None) if None in self.tags else self._recency[0]

    def use(self, slot: int) -> None:
        """A claiming lookup's read (or a commit) of ``slot``: most recently used."""
        if slot in self._recency:
            self._recency.remove(slot)
        self._recency.append(slot)

    def load(self, tag: Tag) -> tuple[int, Tag | None]:
        """Load ``tag`` into the victim; return the slot and the tag it held."""
        slot = self.victim()
        evicted, self.tags[slot] = self.tags[slot], tag
        self.use(slot)
        return slot, evicted


class Policy:
    """A host replacement policy: which resident expert the host would give up.

    :meth:`observe` sees every expert a batch runs; :meth:`choose` gets the candidates (resident
    tags the host may evict, least recently used first) and returns the one to give up.
    """

    name = ""

    def observe(self, tag: Tag) -> None:
        """An expert ran in a batch."""

    def choose(self, candidates: Sequence[Tag]) -> Tag:
        raise NotImplementedError


class LruPolicy(Policy):
    """Least recently used: the hardware's own order, so it never vetoes a prefetch."""

    name = "lru"

    def choose(self, candidates):
        return candidates[0]


class LfuPolicy(Policy):
    """Least frequently used: the expert that ran in the fewest batches since the start, ties
    to the least recently used."""

    name = "lfu"

    def __init__(self):
        self.uses: Counter[Tag] = Counter()

    def observe(self, tag):
        self.uses[tag] += 1

    def choose(self, candidates):
        return min(candidates, key=lambda tag: self.uses[tag])   # min keeps the first of ties


POLICIES = {policy.name: policy for policy in (LruPolicy, LfuPolicy)}


def make_policy(name: str) -> Policy:
    """The policy called ``name``; a MoefpgaError naming the choices for any other name."""
    if name not in POLICIES:
        raise MoefpgaError(f"unknown cache policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name]()


def batch_order(tags: Iterable[Tag], resident: Iterable[Tag]) -> list[Tag]:
    """The order in which the MoE layer top runs a batch's experts: those in ``resident``
    first, then the others; each group in index order with the shared expert last."""
    resident = set(resident)
    return sorted(tags, key=lambda t: (t not in resident, t[1] == SHARED_EXPERT, t[1]))


class ExpertCache:
    """The mirror of S slots with a host policy, deciding the records to send.

    Parameters
    ----------
    slots : int
        S, the hardware's expert slots.
    policy : str
        ``lru`` or ``lfu`` (:func:`make_policy`).
    shared : bool
        The MoE layers have a shared expert (run by every batch).
    record_bytes : callable, optional
        ``record_bytes(layer, expert)``: the packed record's size in bytes (0 if not given).
    """

    def __init__(self, slots: int, policy: str = "lru", *, shared: bool = False,
                 record_bytes: Callable[[int, int], int] | None = None):
        self.policy = make_policy(policy)
        self.mirror = SlotMirror(slots)
        self.shared = shared
        self.record_bytes = record_bytes or (lambda layer, expert: 0)
        self.stats = CacheStats()
        self._unused_prefetches: set[Tag] = set()

    def step(self, layer: int, experts: Iterable[int], next_layer: int | None = None,
             predicted: Sequence[int] | None = None) -> list[Load]:
        """One hardware batch of ``layer`` whose tokens picked ``experts``, then its prefetches.

        Returns the records to send in order: first the batch's demand loads, in the order the
        top requests them; then, when ``predicted`` (experts of ``next_layer``, most likely
        first) is given, the prefetches to send after the batch: the next layer's shared expert
        (certain to be needed) and then the predicted experts, each only while
        :meth:`_admit` allows. ``predicted=None`` prefetches nothing.
        """
        loads = self._run_batch(layer, set(experts))
        if predicted is not None and next_layer is not None:
            wanted = [SHARED_EXPERT] if self.shared else []
            loads += self._prefetch([(next_layer, e) for e in (*wanted, *predicted)])
        return loads

    def _run_batch(self, layer, experts):
        tags = [(layer, e) for e in experts] + ([(layer, SHARED_EXPERT)] if self.shared else [])
        loads = []
        for tag in batch_order(tags, self.mirror.resident()):
            slot = self.mirror.slot_of(tag)
            hit = slot is not None
            if hit:
                self.mirror.use(slot)
                self.stats.hits += 1
                if tag in self._unused_prefetches:
                    self._unused_prefetches.discard(tag)
                    self.stats.useful_prefetches += 1
            else:
                loads.append(self._load(tag, "demand"))
                self.stats.demand_loads += 1
                self.stats.demand_bytes += loads[-1].nbytes
            if tag[1] != SHARED_EXPERT:
                self.stats.routed_accesses += 1
                self.stats.routed_hits += hit
            self.policy.observe(tag)
        return loads

    def _prefetch(self, candidates):
        loads, protected = [], set()
        for tag in dict.fromkeys(candidates):
            if self.mirror.slot_of(tag) is None:
                if not self._admit(protected):
                    break
                loads.append(self._load(tag, "prefetch"))
                self._unused_prefetches.add(tag)
                self.stats.prefetches += 1
                self.stats.prefetch_bytes += loads[-1].nbytes
            protected.add(tag)
        return loads

    def _admit(self, protected):
        """Whether a prefetch may go into the hardware's victim: an empty slot, or a resident
        expert that is not itself wanted now (``protected``) and that the policy would give up
        first among the resident experts not wanted now."""
        victim = self.mirror.tags[self.mirror.victim()]
        if victim is None:
            return True
        candidates = [t for t in self.mirror.resident() if t not in protected]
        return victim not in protected and self.policy.choose(candidates) == victim

    def _load(self, tag, kind):
        slot, evicted = self.mirror.load(tag)
        if evicted in self._unused_prefetches:
            self._unused_prefetches.discard(evicted)
            self.stats.wasted_prefetches += 1
        return Load(tag[0], tag[1], kind, slot, evicted, self.record_bytes(*tag))
