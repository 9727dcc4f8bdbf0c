"""Reference algorithms scored next to the product: sequential rules (`sr`) and session-kNN (`sknn`).

Written plainly from the published algorithms (Ludewig & Jannach, "Evaluation of session-based
recommendation algorithms", UMUAI 2018; Ludewig et al., "Empirical analysis of session-based
recommendation algorithms", UMUAI 2021; their code is rn5l/session-rec, `sr.py` and `vsknn.py`).
They share no code with serving/ or common/ on purpose: they are the independent yardstick the
product's lists are measured against, so this module imports nothing of ours.

Both learn from training sessions given as item-id sequences in arrival order (repeats kept), the
sessions ordered by their last event (oldest first), and recommend for a session prefix.

Measured on the Online Retail import (last 7 days, 18,316 targets): sr HR@20 0.517 / MRR@20 0.263,
sknn 0.104 / 0.022. The data README's yardsticks (0.528 / 0.283, 0.192 / 0.067) come out (0.526 /
0.282, 0.191 / 0.067) only when the prefix's own items are dropped from the lists (the protocol
never scores them) and sknn's similarity is a cosine (also divided by the root of the neighbour's
size and of the prefix's squared weights); the published code does neither by default.
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
    b with the largest w(last -> b), ties by item id. Nothing is excluded (not the prefix's items,
    not the last item itself), as in the published code; items with no rule from the last item are
    not listed (the published code gives them score 0, in no meaningful order). session-rec prunes
    each item's rules to its 20 strongest, which leaves any top 20 as it is.
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
        rules = self._rules(prefix[-1])
        return list(self.vocab.items[self._targets[rules][:n]])


class SessionKnn:
    """Session-kNN after session-rec's `VMContextKNN` (V-SKNN).

    - Candidates: the `sample_size` most recent training sessions (by their last event) that share
      an item with the prefix.
    - Similarity: a dot product of the prefix's item weights with the neighbour's item set, divided
      by the prefix's number of distinct items, as vsknn computes it (`vec`, whatever its
      `similarity` argument says). An item's weight decays linearly with its position: its latest
      position p (1-based) in a prefix of length L weighs p / L, so the last item weighs 1 (vsknn's
      default weighting, "div"; its "linear" option zeroes every position past the 10th).
    - Neighbours: the `k` most similar candidates (ties: the more recent first).
    - Item scores: the sum of the similarities of the neighbours holding the item (vsknn further
      divides each neighbour's share by how far back its latest shared prefix item is; left out).
    - Nothing is excluded (vsknn's default `remind=True` keeps the prefix's own items).
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
        similarity = np.bincount(holders, weights=weights, minlength=self._sessions) / distinct
        candidates = np.flatnonzero(similarity)[-self.sample_size :]  # the most recent sharing an item
        order = np.lexsort((-candidates, -similarity[candidates]))[: self.k]
        return candidates[order], similarity[candidates[order]]

    def recommend(self, prefix: Sequence[str], n: int) -> list[str]:
        sessions, similarity = self.neighbours(prefix)
        if not len(sessions):
            return []
        starts, ends = self._session_start[sessions], self._session_start[sessions + 1]
        held = np.concatenate([self._session_items[s:e] for s, e in zip(starts, ends, strict=True)])
        scores = np.bincount(held, weights=np.repeat(similarity, ends - starts), minlength=len(self.vocab))
        best = np.argsort(-scores, kind="stable")[:n]  # ties by item id
        return list(self.vocab.items[best[scores[best] > 0]])


# name -> a reference with the published defaults, not yet fitted
REFERENCES: dict[str, Callable[[], Reference]] = {"sknn": SessionKnn, "sr": SequentialRules}
