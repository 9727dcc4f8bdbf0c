"""Reference algorithms scored next to the product: sequential rules (`sr`) and session-kNN (`sknn`).

Written plainly from the published algorithms (Ludewig & Jannach, "Evaluation of session-based
recommendation algorithms", UMUAI 2018; Ludewig et al., "Empirical analysis of session-based
recommendation algorithms", UMUAI 2021; their code is rn5l/session-rec, `sr.py` and `vsknn.py`).
They share no code with serving/ or common/ on purpose: they are the independent yardstick the
product's lists are measured against, so this module imports nothing of ours.

Both learn from training sessions given as item-id sequences in arrival order (repeats kept), the
sessions ordered by their last event (oldest first), and recommend for a session prefix.

- `sr`: the items that followed the prefix's last item within `steps` (10) positions in training
  sessions, each occurrence weighted 1 / gap, strongest first.
- `sknn`: the items of the `k` (100) training sessions most similar to the prefix among the
  `sample_size` (500) most recent ones sharing an item with it; the similarity is a cosine of the
  prefix's position-weighted items with the neighbour's item set, an item's score the plain sum of
  the similarities of the neighbours holding it.

Both leave the prefix's own items out of their lists: the replay protocol never scores an item the
session already holds, so listing one only wastes a place, and a yardstick should be as strong as
the protocol lets it be. The published code keeps them (sr lists the last item's repeat rules;
vsknn's default `remind=True`), and its vsknn divides by the prefix's number of items only (`vec`,
whatever its `similarity` argument says). With these two changes the data README's Online Retail
yardsticks (last 7 days, 18,316 targets; HR@20 / MRR@20: sr 0.528 / 0.283, sknn 0.192 / 0.067) come
out as sr 0.5262 / 0.2816 and sknn 0.1914 / 0.0666 (`recs evaluate replay --test-days 7`); as
published, they gave sr 0.517 / 0.263 and sknn 0.104 / 0.022.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


class Reference(Protocol):
    def fit(self, sessions: Sequence[Sequence[str]]) -> Reference: ...

    def recommend(self, prefix: Sequence[str], n: int) -> list[str]: ...


class _Vocabulary:
    """Item ids <-> dense indices (ids sorted, so ties broken by index are broken by id)."""

    def __init__(self, sessions: Sequence[Sequence[str]]) -> None:
        self.items = np.array(sorted({item for session in sessions for item in session}), dtype=object)
        self.index = {item: i for i, item in enumerate(self.items.tolist())}

    def __len__(self) -> int:
        return len(self.items)

    def known(self, items: Sequence[str]) -> np.ndarray:
        """The indices of the distinct `items` that are in the vocabulary."""
        return np.array([self.index[item] for item in set(items) if item in self.index], dtype=np.int64)

    def encode(self, sessions: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(item index per event, session number per event) over the sessions laid end to end."""
        lengths = np.fromiter((len(s) for s in sessions), dtype=np.int64, count=len(sessions))
        codes = np.fromiter(
            (self.index[item] for session in sessions for item in session), dtype=np.int64, count=int(lengths.sum())
        )
        return codes, np.repeat(np.arange(len(sessions), dtype=np.int64), lengths)


class SequentialRules:
    """Sequential rules (session-rec `SequentialRules`, weighting "div").

    For every training session and every pair of positions i < j with j - i <= `steps`, the rule
    a -> b (a at i, b at j) gains 1 / (j - i). A prefix is scored by its last item alone: the items
    b with the largest w(last -> b), ties by item id, leaving out every item of the prefix (the last
    item's own repeat rule included; the published code keeps them). Items with no rule from the
    last item are not listed (the published code gives them score 0, in no meaningful order).
    session-rec prunes each item's rules to its 20 strongest; not done here, so that a list of n
    stays full after the prefix's items are dropped.
    """

    def __init__(self, steps: int = 10) -> None:
        self.steps = steps

    def fit(self, sessions: Sequence[Sequence[str]]) -> SequentialRules:
        self.vocab = _Vocabulary(sessions)
        codes, session = self.vocab.encode(sessions)
        size = len(self.vocab)
        keys, weights = [], []
        for gap in range(1, self.steps + 1):
            same = session[:-gap] == session[gap:]  # both positions in one session
            keys.append(codes[:-gap][same] * size + codes[gap:][same])
            weights.append(np.full(int(same.sum()), 1.0 / gap))
        all_keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        pairs, inverse = np.unique(all_keys, return_inverse=True)
        weight = np.bincount(inverse.ravel(), weights=np.concatenate(weights) if weights else None)
        source, target = pairs // size, pairs % size
        order = np.lexsort((target, -weight, source))  # by source, strongest rule first, then item id
        self._targets, self._weights = target[order], weight[order]
        self._start = np.searchsorted(source[order], np.arange(size + 1))  # rules of a: [start[a], start[a+1])
        return self

    def _rules(self, item: str) -> slice:
        a = self.vocab.index.get(item)
        return slice(0, 0) if a is None else slice(int(self._start[a]), int(self._start[a + 1]))

    def weight(self, a: str, b: str) -> float:
        """w(a -> b), 0.0 when b never followed a within `steps`."""
        rules, j = self._rules(a), self.vocab.index.get(b, -1)
        found = np.flatnonzero(self._targets[rules] == j)
        return float(self._weights[rules][found[0]]) if len(found) else 0.0

    def recommend(self, prefix: Sequence[str], n: int) -> list[str]:
        if not prefix:
            return []
        targets = self._targets[self._rules(prefix[-1])]
        return list(self.vocab.items[targets[~np.isin(targets, self.vocab.known(prefix))][:n]])


class SessionKnn:
    """Session-kNN after session-rec's `VMContextKNN` (V-SKNN).

    - Candidates: the `sample_size` most recent training sessions (by their last event) that share
      an item with the prefix.
    - Similarity: a cosine, the dot product of the prefix's item weights with the neighbour's item
      set divided by sqrt(distinct prefix items * distinct neighbour items) (vsknn computes `vec`,
      the dot product over the prefix's distinct items alone, whatever its `similarity` argument
      says). An item's weight decays linearly with its position: its latest position p (1-based) in
      a prefix of length L weighs p / L, so the last item weighs 1 (vsknn's default weighting,
      "div"; its "linear" option zeroes every position past the 10th).
    - Neighbours: the `k` most similar candidates (ties: the more recent first).
    - Item scores: the plain sum of the similarities of the neighbours holding the item (vsknn
      further divides each neighbour's share by how far back its latest shared prefix item is;
      left out).
    - The prefix's own items are never listed (vsknn's default `remind=True` keeps them).
    """

    def __init__(self, k: int = 100, sample_size: int = 500) -> None:
        self.k = k
        self.sample_size = sample_size

    def fit(self, sessions: Sequence[Sequence[str]]) -> SessionKnn:
        """`sessions` oldest first: a session's index is its recency rank."""
        self.vocab = _Vocabulary(sessions)
        codes, session = self.vocab.encode(sessions)
        pairs = np.unique(session * len(self.vocab) + codes)  # each item once per session, by session
        session, item = pairs // max(1, len(self.vocab)), pairs % max(1, len(self.vocab))
        self._session_items = item  # the items of session s: [session_start[s], session_start[s+1])
        self._session_start = np.searchsorted(session, np.arange(len(sessions) + 1))
        self._session_size = np.diff(self._session_start)  # distinct items per session
        by_item = np.lexsort((session, item))
        self._item_sessions = session[by_item]  # sessions holding item i, oldest first
        self._item_start = np.searchsorted(item[by_item], np.arange(len(self.vocab) + 1))
        self._sessions = len(sessions)
        return self

    def _prefix_items(self, prefix: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """(known item indices, their latest 1-based positions, distinct items in the prefix)."""
        latest = {item: position for position, item in enumerate(prefix, start=1)}
        known = [(self.vocab.index[item], p) for item, p in latest.items() if item in self.vocab.index]
        items = np.array([i for i, _ in known], dtype=np.int64)
        return items, np.array([p for _, p in known], dtype=np.float64), len(latest)

    def neighbours(self, prefix: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(training session indices, similarities) of the prefix's neighbours, the most similar first."""
        items, positions, distinct = self._prefix_items(prefix)
        if not len(items):
            return np.zeros(0, np.int64), np.zeros(0)
        starts, ends = self._item_start[items], self._item_start[items + 1]
        holders = np.concatenate([self._item_sessions[s:e] for s, e in zip(starts, ends, strict=True)])
        weights = np.repeat(positions / len(prefix), ends - starts)
        dot = np.bincount(holders, weights=weights, minlength=self._sessions)
        candidates = np.flatnonzero(dot)[-self.sample_size :]  # the most recent sharing an item
        similarity = dot[candidates] / np.sqrt(distinct * self._session_size[candidates])
        order = np.lexsort((-candidates, -similarity))[: self.k]
        return candidates[order], similarity[order]

    def recommend(self, prefix: Sequence[str], n: int) -> list[str]:
        sessions, similarity = self.neighbours(prefix)
        if not len(sessions):
            return []
        starts, ends = self._session_start[sessions], self._session_start[sessions + 1]
        held = np.concatenate([self._session_items[s:e] for s, e in zip(starts, ends, strict=True)])
        scores = np.bincount(held, weights=np.repeat(similarity, ends - starts), minlength=len(self.vocab))
        scores[self.vocab.known(prefix)] = 0.0  # the prefix's own items are never listed
        best = np.argsort(-scores, kind="stable")[:n]  # ties by item id
        return list(self.vocab.items[best[scores[best] > 0]])


# name -> a reference with the published defaults, not yet fitted
REFERENCES: dict[str, Callable[[], Reference]] = {"sknn": SessionKnn, "sr": SequentialRules}
