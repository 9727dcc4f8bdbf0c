"""Model artifacts in memory: what a registry version holds, loaded once (serving, speed layer, replay).

Every ALS engine writes the same files through `save_factors`, and every reader goes through
`load_model`, so the layers agree on shapes, dtypes and id order.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import registry as reg
from common.candidates import PREFILTER_SAMPLE, KnownTop, Scored, als_top_n, sample_rows
from common.content import ContentMap, ItemContent
from common.registry import Manifest, Registry, RegistryError
from common.vectors import gramian

SIMILAR_CACHE_SIZE = 20_000  # (item, n) answers of similar_items kept per version (~20 pairs each)
# Over the ceiling of a precomputed list: the float32 rounding of the nightly's and serving's products (a
# 64-term sum rounds by at most ~4e-6 of |x||y|).
ROUNDING_MARGIN = 1e-4


@dataclass(frozen=True)
class PersonHistory:
    """What each of a version's people engaged with before its cutoff: rows [offsets[u], offsets[u+1]) belong
    to user row u, best first (most sessions, then most recent). Kept beside the user factors, in their
    order, so the people's ids are the version's one list and an erasure blanks both together."""

    offsets: np.ndarray  # int64, users + 1
    items: np.ndarray  # int32 rows of the version's item ids (ALS items: never a content vector's row)
    sessions: np.ndarray  # uint16: the person's sessions with a weighted event on the item; 0 once erased
    last_s: np.ndarray  # uint32 epoch seconds (whole) of the last such event: 10 bytes a row in all


@dataclass(frozen=True)
class BatchTops:
    """For each person (user row), the item rows of their batch vector's highest scores (as many as
    settings.training.top_items_kept) and the lowest of those scores: no other item scores above it.
    With a speed delta δ no other item can score above it + |δ| x the largest item norm, so a request
    whose n-th best of these rows beats that needs no scan of every item (candidates.als_top_n_listed).
    Written with the factors (`save_factors`)."""

    rows: np.ndarray  # int32, users x kept (unordered)
    floors: np.ndarray  # float32, users; NaN for an erased person (no list)


@dataclass
class ModelArtifacts:
    version: str
    manifest: Manifest
    item_ids: list[str]
    item_factors: np.ndarray  # float32, items x k
    user_ids: list[str]
    user_factors: np.ndarray  # float32, users x k
    yty: np.ndarray  # float64, k x k
    ranker: Any | None = None  # lightgbm.Booster when the version has one
    popularity: pa.Table | None = None  # item_id, count (events in the training window)
    covisitation: pa.Table | None = None  # item_id, other_id, count
    content_map: ContentMap | None = None  # when the version has one
    history: PersonHistory | None = None  # when the version has one
    tops: BatchTops | None = None  # when the version has them (catalogs larger than the lists kept)
    # Rows [0, batch_items) of the item factors are ALS's; rows after them are content vectors of items
    # new since the cutoff (`with_content_vectors`). -1: all rows are ALS's.
    batch_items: int = -1
    # With content vectors, item_factors is a stack that copied the batch rows: those rows as loaded (the
    # map the host's processes share, `_map_npy`), which the scans read instead (`scan_blocks`).
    loaded_batch_rows: np.ndarray | None = None
    item_index: dict[str, int] = field(default_factory=dict)
    user_index: dict[str, int] = field(default_factory=dict)
    _similar: dict[tuple[str, int], Scored] = field(default_factory=dict, repr=False)  # similar_items' answers

    def __post_init__(self) -> None:
        if self.batch_items < 0:
            self.batch_items = len(self.item_ids)
        self.item_index = {item: i for i, item in enumerate(self.item_ids)}
        self.user_index = {user: i for i, user in enumerate(self.user_ids)}

    @property
    def factors(self) -> int:
        return int(self.item_factors.shape[1])

    @property
    def cutoff_s(self) -> float:
        return self.manifest.cutoff.timestamp()

    def user_vector(self, person_id: str) -> np.ndarray | None:
        """The batch vector x(u), or None for a person the model has not seen."""
        i = self.user_index.get(person_id)
        return None if i is None else self.user_factors[i]

    def known_top(self, person_id: str, delta: np.ndarray | None) -> KnownTop | None:
        """Where the top batch items of the person's batch vector plus `delta` lie, from the version's
        precomputed list; None without one."""
        i = self.user_index.get(person_id)
        if i is None or self.tops is None:
            return None
        floor = float(self.tops.floors[i])
        if floor != floor:  # NaN: erased
            return None
        largest = self.largest_batch_norm
        spread = float(np.linalg.norm(delta)) * largest if delta is not None else 0.0
        margin = ROUNDING_MARGIN * float(np.linalg.norm(self.user_factors[i])) * largest
        return KnownTop(self.tops.rows[i], floor + spread + margin)

    @cached_property
    def largest_batch_norm(self) -> float:
        """The largest norm of a batch item's factors: what bounds a delta's share of any item's score."""
        rows = self.scan_blocks[0]
        return float(np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64).max())) if len(rows) else 0.0

    def history_of(self, person_id: str) -> dict[str, tuple[float, float]]:
        """item -> (sessions, last engaged, epoch s) of the person before the cutoff; {} for someone unknown."""
        i = self.user_index.get(person_id)
        history = self.history
        if i is None or history is None:
            return {}
        rows = slice(int(history.offsets[i]), int(history.offsets[i + 1]))
        return {
            self.item_ids[item]: (float(sessions), float(last))
            for item, sessions, last in zip(
                history.items[rows].tolist(), history.sessions[rows].tolist(), history.last_s[rows].tolist(), strict=True
            )
            if sessions > 0
        }

    def item_vector(self, item_id: str) -> np.ndarray | None:
        i = self.item_index.get(item_id)
        return None if i is None else self.item_factors[i]

    def has_batch_vector(self, item_id: str) -> bool:
        i = self.item_index.get(item_id)
        return i is not None and i < self.batch_items

    def is_content_vector(self, item_id: str) -> bool:
        i = self.item_index.get(item_id)
        return i is not None and i >= self.batch_items

    @property
    def scan_blocks(self) -> tuple[np.ndarray, ...]:
        """The item factors for `als_top_n`, as blocks of rows in order: the batch rows as loaded, then
        any content rows, so that a stack's private copy of the batch rows is only gathered from."""
        if self.loaded_batch_rows is None:
            return (self.item_factors,)
        return (self.loaded_batch_rows, self.item_factors[self.batch_items :])

    @property
    def batch_item_ids(self) -> list[str]:
        return self.item_ids[: self.batch_items]

    def with_content_vectors(self, contents: Mapping[str, ItemContent]) -> ModelArtifacts:
        """A copy that also holds the content vectors of the given items that have no batch vector (an
        item's earlier content vector is replaced); itself when the version has no content map or none
        of the items needs one. YᵀY stays the batch factors' (the fold-in's prior is the trained model)."""
        wanted = {
            item: content
            for item, content in contents.items()
            if content.has_text and not self.has_batch_vector(item)
        }
        if self.content_map is None or not wanted:
            return self
        kept = [i for i in range(self.batch_items, len(self.item_ids)) if self.item_ids[i] not in wanted]
        added = list(wanted)
        factors = np.vstack(
            [
                self.item_factors[: self.batch_items],
                self.item_factors[kept],
                self.content_map.vectors([wanted[i] for i in added]),
            ]
        )
        ids = self.item_ids[: self.batch_items] + [self.item_ids[i] for i in kept] + added
        # A cache of its own: the added vectors change other items' neighbours.
        loaded = self.scan_blocks[0][: self.batch_items]  # a view: still the map
        return replace(self, item_ids=ids, item_factors=factors, loaded_batch_rows=loaded, _similar={})

    def similar_items(self, item_id: str, n: int) -> Scored | None:
        """The ALS top n for the item's own vector (None for an unknown item). Cached: a version's answer
        never changes, and each product page asks it again (a 50k x 64 product, ~0.5 ms)."""
        key = (item_id, n)
        similar = self._similar.get(key)
        if similar is None:
            vector = self.item_vector(item_id)
            if vector is None:
                return None
            similar = als_top_n(vector, self.scan_blocks, self.item_ids, n)
            if len(self._similar) >= SIMILAR_CACHE_SIZE:
                self._similar.clear()  # a bound, not an LRU: popular pages are back within moments
            self._similar[key] = similar
        return similar


def save_factors(
    registry: Registry,
    version: str,
    user_ids: Sequence[str],
    user_factors: np.ndarray,
    item_ids: Sequence[str],
    item_factors: np.ndarray,
    top_items: int,
) -> None:
    """Write the ALS artifacts of a version (the manifest is written separately, last), with each person's
    `top_items` highest-scoring items (settings.training.top_items_kept; 0: none)."""
    if user_factors.shape[0] != len(user_ids) or item_factors.shape[0] != len(item_ids):
        raise ValueError("factor rows and id lists differ in length")
    _write_npy(registry, version, reg.USER_FACTORS, user_factors.astype(np.float32))
    _write_npy(registry, version, reg.ITEM_FACTORS, item_factors.astype(np.float32))
    _write_bytes(registry, version, reg.USER_IDS, json.dumps([str(u) for u in user_ids]).encode())
    _write_bytes(registry, version, reg.ITEM_IDS, json.dumps([str(i) for i in item_ids]).encode())
    if 0 < top_items < len(item_ids):  # else a list is every item: nothing to skip
        _write_tops(registry, version, batch_tops(user_factors, item_factors, top_items))


def batch_tops(user_factors: np.ndarray, item_factors: np.ndarray, kept: int) -> BatchTops:
    """Each user's `kept` highest-scoring item rows and the lowest of those scores, as serving scores them
    (float32 products), a block of users at a time (a block's scores ~64 MB) on up to 4 threads (numpy's
    products and partitions release the GIL: 2 threads took half the time of one for 20k x 50k)."""
    users, items = np.asarray(user_factors, np.float32), np.asarray(item_factors, np.float32)
    rows = np.empty((len(users), kept), np.int32)
    floors = np.empty(len(users), np.float32)
    block = max(1, (16 << 20) // max(1, len(items)))

    def fill(start: int) -> None:
        scores = users[start : start + block] @ items.T
        top = _highest_columns(scores, kept)
        rows[start : start + block] = top
        floors[start : start + block] = np.take_along_axis(scores, top, axis=1).min(axis=1)

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(0, len(users), block)))  # list(): a block's error is raised here
    return BatchTops(rows, floors)


def _highest_columns(scores: np.ndarray, kept: int) -> np.ndarray:
    """Each row's `kept` highest columns (unordered): as a partition of every row gives, 1.5-3x faster for 400
    of 50k. As in candidates.top_n_indices, a high value of a fixed sample of the columns bounds a row's
    kept-th highest from below whenever `kept` columns reach it; only those are sorted. Rows where fewer
    do are partitioned whole."""
    n_rows, n_cols = scores.shape
    if n_cols < 8 * PREFILTER_SAMPLE:
        return np.argpartition(scores, n_cols - kept, axis=1)[:, n_cols - kept :]
    sample = scores[:, sample_rows(n_cols)]
    above = min(sample.shape[1] - 1, 2 * kept * sample.shape[1] // n_cols)  # ~2 x kept expected over it
    bounds = np.partition(sample, sample.shape[1] - 1 - above, axis=1)[:, sample.shape[1] - 1 - above]
    row, col = np.nonzero(scores >= bounds[:, None])
    order = np.lexsort((-scores[row, col], row))  # by row, then highest first
    row, col = row[order], col[order]
    counts = np.bincount(row, minlength=n_rows)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    top = np.empty((n_rows, kept), np.int64)
    enough = counts >= kept
    top[enough] = col[starts[enough, None] + np.arange(kept)]
    short = ~enough
    if short.any():
        top[short] = np.argpartition(scores[short], n_cols - kept, axis=1)[:, n_cols - kept :]
    return top


def _write_tops(registry: Registry, version: str, tops: BatchTops) -> None:
    _write_npy(registry, version, reg.TOP_ROWS, tops.rows)
    _write_npy(registry, version, reg.TOP_FLOORS, tops.floors)


def _map_tops(registry: Registry, version: str) -> BatchTops | None:
    if not registry.fs.exists(registry.path(version, reg.TOP_FLOORS)):
        return None  # a small catalog, or a version trained before the lists existed
    return BatchTops(_map_npy(registry, version, reg.TOP_ROWS), _map_npy(registry, version, reg.TOP_FLOORS))


# The id an erased person's row is left under: no request can name it (ids are never empty).
FORGOTTEN_USER = ""


def forget_users(registry: Registry, version: str, people: Collection[str]) -> int:
    """Blank the people's ids, zero their factor rows, their history and their precomputed top items
    (BatchTops) in one version, then re-hash its manifest; returns the rows forgotten. Rows keep their
    places, so a reader between the writes pairs any file with the others and still cannot reach the
    people's factors or history."""
    user_ids = json.loads(_read_bytes(registry, version, reg.USER_IDS))
    rows = [row for row, user in enumerate(user_ids) if user in people]
    if not rows:
        return 0
    factors = _read_npy(registry, version, reg.USER_FACTORS)
    factors[rows] = 0.0
    for row in rows:
        user_ids[row] = FORGOTTEN_USER
    _write_npy(registry, version, reg.USER_FACTORS, factors)
    history = _read_history(registry, version)
    if history is not None:
        for row in rows:
            span = slice(int(history.offsets[row]), int(history.offsets[row + 1]))
            history.items[span], history.sessions[span], history.last_s[span] = 0, 0, 0
        _write_history(registry, version, history)
    if registry.fs.exists(registry.path(version, reg.TOP_FLOORS)):
        floors = _read_npy(registry, version, reg.TOP_FLOORS)
        top_rows = _read_npy(registry, version, reg.TOP_ROWS)
        floors[rows], top_rows[rows] = np.nan, 0
        _write_tops(registry, version, BatchTops(top_rows, floors))
    _write_bytes(registry, version, reg.USER_IDS, json.dumps(user_ids).encode())
    registry.write_manifest(registry.read_manifest(version))
    return len(rows)


def save_history(registry: Registry, version: str, interactions: pa.Table, kept: int) -> PersonHistory:
    """The version's person history from its interactions (spark_jobs/interactions.py: person_id, item_id,
    sessions, last_s), in the order of the user and item ids it saved: each person's `kept` best items,
    most sessions first, then the most recent (ties by item row)."""
    user_index = {user: i for i, user in enumerate(json.loads(_read_bytes(registry, version, reg.USER_IDS)))}
    item_index = {item: i for i, item in enumerate(json.loads(_read_bytes(registry, version, reg.ITEM_IDS)))}
    users = _rows_of(interactions["person_id"].to_pylist(), user_index)
    items = _rows_of(interactions["item_id"].to_pylist(), item_index)
    sessions = np.minimum(interactions["sessions"].to_numpy(), np.iinfo(np.uint16).max).astype(np.uint16)
    last_s = np.floor(interactions["last_s"].to_numpy()).astype(np.uint32)
    known = (users >= 0) & (items >= 0)
    users, items, sessions, last_s = users[known], items[known], sessions[known], last_s[known]
    order = np.lexsort((items, -last_s.astype(np.int64), -sessions.astype(np.int64), users))
    users, items, sessions, last_s = users[order], items[order], sessions[order], last_s[order]
    starts = np.searchsorted(users, users, side="left")
    best = np.arange(len(users)) - starts < kept  # each person's first `kept` rows
    users, items, sessions, last_s = users[best], items[best], sessions[best], last_s[best]
    offsets = np.zeros(len(user_index) + 1, np.int64)
    np.cumsum(np.bincount(users, minlength=len(user_index)), out=offsets[1:])
    history = PersonHistory(offsets, items.astype(np.int32), sessions, last_s)
    _write_history(registry, version, history)
    return history


def _rows_of(ids: Sequence[str], index: Mapping[str, int]) -> np.ndarray:
    """Each id's row in `index`, -1 where it has none."""
    return np.fromiter((index.get(i, -1) for i in ids), np.int64, len(ids))


def _write_history(registry: Registry, version: str, history: PersonHistory) -> None:
    sink = io.BytesIO()
    np.savez(
        sink, offsets=history.offsets, items=history.items, sessions=history.sessions, last_s=history.last_s
    )
    _write_bytes(registry, version, reg.HISTORY, sink.getvalue())


def _read_history(registry: Registry, version: str) -> PersonHistory | None:
    if not registry.fs.exists(registry.path(version, reg.HISTORY)):
        return None  # a version trained before person histories existed
    with np.load(io.BytesIO(_read_bytes(registry, version, reg.HISTORY)), allow_pickle=False) as data:
        return PersonHistory(data["offsets"], data["items"], data["sessions"], data["last_s"])


def save_table(registry: Registry, version: str, name: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    _write_bytes(registry, version, name, sink.getvalue())


def save_content_map(registry: Registry, version: str, content_map: ContentMap) -> None:
    sink = io.BytesIO()
    np.savez_compressed(  # the weights are mostly unused (zero) buckets
        sink,
        weights=content_map.weights,
        mean=content_map.mean,
        predicted_norms=content_map.predicted_norms,
        batch_norms=content_map.batch_norms,
    )
    _write_bytes(registry, version, reg.CONTENT_MAP, sink.getvalue())


def save_ranker(registry: Registry, version: str, booster: Any) -> None:
    _write_bytes(registry, version, reg.RANKER, booster.model_to_string().encode())


def load_model(registry: Registry, version: str | None = None, *, request_parts: bool = True) -> ModelArtifacts:
    """Load a version (default: CURRENT). Raises RegistryError when there is none. `request_parts` False
    leaves out what only a request reads (the ranker, the person history, the batch popularity and
    co-visit tables): a speed consumer applies events with the factors alone, and the history of a
    store's every person would otherwise sit unused in each consumer's memory."""
    version = version or registry.current()
    if version is None:
        raise RegistryError(f"no model version is active under {registry.root_url}")
    manifest = registry.read_manifest(version)
    item_factors = _map_npy(registry, version, reg.ITEM_FACTORS)
    ranker = None
    if request_parts and registry.fs.exists(registry.path(version, reg.RANKER)):
        import lightgbm  # only when a ranker exists: keeps light readers light

        ranker = lightgbm.Booster(model_str=_read_bytes(registry, version, reg.RANKER).decode())
    return ModelArtifacts(
        version=version,
        manifest=manifest,
        item_ids=json.loads(_read_bytes(registry, version, reg.ITEM_IDS)),
        item_factors=item_factors,
        user_ids=json.loads(_read_bytes(registry, version, reg.USER_IDS)),
        user_factors=_map_npy(registry, version, reg.USER_FACTORS),
        yty=gramian(item_factors),
        ranker=ranker,
        popularity=_read_table(registry, version, reg.POPULARITY) if request_parts else None,
        covisitation=_read_table(registry, version, reg.COVISITATION) if request_parts else None,
        content_map=_read_content_map(registry, version),
        history=_read_history(registry, version) if request_parts else None,
        tops=_map_tops(registry, version) if request_parts else None,
    )


def load_item_factors(registry: Registry, version: str) -> tuple[list[str], np.ndarray]:
    """A version's item ids and ALS item factors (readable before its manifest is written)."""
    return json.loads(_read_bytes(registry, version, reg.ITEM_IDS)), _read_npy(registry, version, reg.ITEM_FACTORS)


def _write_bytes(registry: Registry, version: str, name: str, data: bytes) -> None:
    registry.write_bytes(registry.path(version, name), data)


def _read_bytes(registry: Registry, version: str, name: str) -> bytes:
    path = registry.path(version, name)
    if not registry.fs.exists(path):
        raise RegistryError(f"model {version} has no {name}")
    with registry.fs.open(path, "rb") as f:
        return bytes(f.read())


def _write_npy(registry: Registry, version: str, name: str, array: np.ndarray) -> None:
    sink = io.BytesIO()
    np.save(sink, array, allow_pickle=False)
    _write_bytes(registry, version, name, sink.getvalue())


def _read_npy(registry: Registry, version: str, name: str) -> np.ndarray:
    return np.load(io.BytesIO(_read_bytes(registry, version, name)), allow_pickle=False)


def _map_npy(registry: Registry, version: str, name: str) -> np.ndarray:
    """A factor matrix, read-only. On this machine's files, a memory map of the version's file: the
    processes of one host (API workers, push helpers, the speed consumer) then hold one copy, and one's
    scans of the item factors keep them in the cache for the others (docs/performance.md, 2026-12-06).
    A version's files are replaced by renaming (erasure), never rewritten in place, so a map keeps the
    file it opened. Elsewhere (an object store), a private copy."""
    if not registry.is_local:
        array = _read_npy(registry, version, name)
        array.flags.writeable = False  # as the map is: a version's factors are the trained ones
        return array
    try:
        mapped = np.load(registry.path(version, name), mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise RegistryError(f"model {version} has no {name}") from None
    # A plain array over the map (its `base`): np.memmap's Python-level indexing costs ~1 µs a row or
    # a fancy index, taken on every request and event.
    return mapped.view(np.ndarray)


def _read_content_map(registry: Registry, version: str) -> ContentMap | None:
    if not registry.fs.exists(registry.path(version, reg.CONTENT_MAP)):
        return None  # a version trained before content maps existed
    with np.load(io.BytesIO(_read_bytes(registry, version, reg.CONTENT_MAP)), allow_pickle=False) as data:
        norms = {name: data[name] for name in ("predicted_norms", "batch_norms") if name in data}
        return ContentMap(weights=data["weights"], mean=data["mean"], **norms)


def _read_table(registry: Registry, version: str, name: str) -> pa.Table | None:
    path = registry.path(version, name)
    if not registry.fs.exists(path):
        return None
    return pq.read_table(io.BytesIO(_read_bytes(registry, version, name)))
