"""The lambda merge at request time: speed state + batch model -> candidates -> rules -> rank -> diversify.

One call of `recommend` reads Redis through `common.speed_state` (plus one follow-up pipeline
for what depends on its answers), never loads anything from disk, and degrades instead of
failing: without Redis it serves batch-only lists, without a model popular items, and to a request
that waited too long for its worker a cheaper list (serving/core/load.py).
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from itertools import compress

import numpy as np
import redis

from common.candidates import KnownTop, Scored, best_first, merge_sources
from common.events import DEFAULT_CONSENT, Consent
from common.features import (
    FEATURE_NAMES,
    SOURCES,
    Candidates,
    RequestState,
    compute_features,
    with_purchases_since,
)
from common.gatherer import (
    TOP_AFFINITY_CATEGORIES,
    Gathered,
    ItemColumns,
    describe,
    gather_lists,
    heuristic_scores,
    rank_scores,
)
from common.speed_state import NeighbourQuery, SpeedState, read_speed_state
from common.vectors import fold_in
from serving.core import metrics
from serving.core.catalog_view import UNCATEGORISED
from serving.core.experiments import assign_variant
from serving.core.load import Shed
from serving.core.lookups import ServingLookups, item_columns
from serving.core.metrics import StageClock
from serving.core.model_holder import ServingModel
from serving.core.rules import Rules
from serving.core.state import ServingState

log = logging.getLogger(__name__)

DAY_S = 86_400.0
EXPERIMENT = "recs"
REDIS_DOWN = "redis_unavailable: batch-only recommendations (no session, trending or stock updates)"
NO_MODEL = "no_model: popular items from the lake"
NO_CONSENT = "no_personalisation_consent: non-personal items (trending, new arrivals), nothing of the person used"


@dataclass(frozen=True)
class RecRequest:
    user_id: str | None
    anonymous_id: str | None
    session_id: str | None
    k: int
    context: str  # home | product | cart
    item_id: str | None = None
    consent: Consent = DEFAULT_CONSENT  # the page's, as its events carry it

    @property
    def personalised(self) -> bool:
        return self.consent is Consent.PERSONALISATION

    @property
    def person_id(self) -> str:
        person = self.user_id or self.anonymous_id
        assert person is not None, "the route checks that one id is given"
        return person


@dataclass
class Recommended:
    item_id: str
    score: float
    reason: str
    sources: list[str]
    category: str
    promoted: bool


@dataclass
class RankedPool:
    """What the ranker saw and said for the pool after rules (drift monitoring samples it)."""

    features: np.ndarray  # pool x FEATURE_NAMES
    scores: np.ndarray  # pool
    cold_start: bool  # no batch vector of the person was used: new, anonymous, erased or not consenting


@dataclass
class RecResult:
    request_id: str
    model_version: str | None
    variant: str
    degraded: str | None
    items: list[Recommended]
    candidates: int = 0
    ranked_pool: RankedPool | None = None  # set when the ranker scored the pool


@dataclass
class _Pool:
    """Candidates after rules: ids, their sources, their catalog columns (looked up once: the features and
    the boosts read them), and the sources' lists."""

    item_ids: list[str]
    sources: list[set[str]]
    columns: ItemColumns
    lists: dict[str, Scored] = field(default_factory=dict)

    @cached_property
    def source_scores(self) -> dict[str, dict[str, float]]:
        """One heuristic score per source (the ranker variant never reads them: computed on demand)."""
        return {source: rank_scores(pairs) for source, pairs in self.lists.items()}


def recommend(
    state: ServingState,
    req: RecRequest,
    now_s: float | None = None,
    clock: StageClock | None = None,
    shed: Shed = Shed.NOTHING,
) -> RecResult:
    # now_s: the moment the list is for; a replay (evaluation/) passes the replayed event's time.
    # clock: where the route records the time of each stage (metrics.STAGES).
    clock = clock or StageClock()
    now_s = time.time() if now_s is None else now_s
    model = state.models.current  # one snapshot for the whole request: a reload cannot mix versions
    reads_redis = shed is not Shed.SPEED_STATE
    variant, bandit_arm = choose_variant(state, req, reads_redis)
    # A shed list is a cheaper treatment than its arm's: counted for the arm, a long overload would
    # teach the posteriors about lists the arm does not serve otherwise. It keeps the session's arm.
    counts_for_arm = bandit_arm and shed is Shed.NOTHING
    rules = state.rules
    degraded: list[str] = [] if req.personalised else [NO_CONSENT]
    personal = variant != "popular" and req.personalised
    if shed.reason is not None:
        degraded.append(shed.reason)
        metrics.FALLBACKS.labels(reason=f"overload_{shed.value}").inc()

    speed = read_speed(state, req, model, now_s, neighbours=personal and shed is Shed.NOTHING) if reads_redis else None
    clock.lap("reads")
    if speed is None:
        if reads_redis:  # else the shed reason says why
            degraded.append(REDIS_DOWN)
    elif not req.personalised:
        speed = speed.impersonal()
    if model is None:
        degraded.insert(0, NO_MODEL)
        ranked, n_candidates = _without_model(state, rules, speed, req, now_s)
        result = _finish(state, req, variant, None, degraded, ranked, n_candidates)
        _record_arm(state, req, result, counts_for_arm)
        clock.lap("rules")
        return result

    request = gather_request(state, model, req, speed, personal=personal, now_s=now_s)
    clock.lap("candidates")
    pool = _apply_rules(state, rules, req, speed, request.gathered.lists, now_s)
    clock.lap("rules")
    features = None
    if variant == "ranker" and model.scorer is not None:
        features, scores = _ranker_scores(model, request, pool, clock)
    elif variant == "popular":
        scores = _source_score(pool, "trending") + 1e-3 * _source_score(pool, "new")
    else:  # als_only, or ranker on a version published without one
        scores = heuristic_scores(model.artifacts, pool.source_scores, pool.item_ids, request.moment.user_vector)
    clock.lap("ranker")
    ranked = _boost_and_diversify(rules, pool, scores, req.k)
    result = _finish(state, req, variant, model.version, degraded, ranked, len(pool.item_ids), speed, model)
    if features is not None:
        result.ranked_pool = RankedPool(features, scores, cold_start=_cold_start(state, model, req, speed))
    _record_arm(state, req, result, counts_for_arm)
    clock.lap("rules")
    return result


def choose_variant(state: ServingState, req: RecRequest, reads_redis: bool = True) -> tuple[str, bool]:
    """The request's variant, and whether the bandit chose it (then the list is recorded for it). The
    fixed hash share in A/B mode, and in bandit mode while Redis is down or not to be read (`reads_redis`)."""
    if state.bandit is not None and reads_redis and state.redis.available():
        try:
            arm = state.bandit.arm(
                state.redis.client, req.person_id, req.session_id, req.context, sticky=req.personalised
            )
        except redis.RedisError as exc:
            state.redis.failed(exc)
        else:
            return arm, True
    return assign_variant(req.person_id, state.settings.experiments.shares), False


def _record_arm(state: ServingState, req: RecRequest, result: RecResult, bandit_arm: bool) -> None:
    if not bandit_arm or state.bandit is None or not state.redis.available():
        return
    try:
        state.bandit.record(state.redis.client, result.request_id, req.context, result.variant)
    except redis.RedisError as exc:  # the list is served all the same; the bandit misses one impression
        state.redis.failed(exc)


@dataclass
class GatheredRequest:
    """One request's candidate lists and what its feature rows are built from (before the rules)."""

    moment: RequestState
    lookups: ServingLookups
    gathered: Gathered


def gather_request(
    state: ServingState,
    model: ServingModel,
    req: RecRequest,
    speed: SpeedState | None,
    *,
    personal: bool,
    now_s: float,
) -> GatheredRequest:
    """The gatherer (common/gatherer.py) on serving's lookups: what ranker training builds from the log."""
    person = speed.person_id if speed else req.person_id
    vector, known_top = _user_vector(state, model, person, speed) if req.personalised else (None, None)
    history = _history(state, model, person, speed) if req.personalised else {}
    moment = _request_state(state, speed, vector, known_top, history, now_s)
    lookups = ServingLookups(state, model, speed, now_s)
    anchor = req.item_id if req.context == "product" else None
    gathered = gather_lists(
        model.artifacts, lookups, moment, model.candidate_pool, _seeds(req, speed, now_s),
        anchor=anchor, personal=personal,
    )  # fmt: skip
    if gathered.als_found is not None:
        metrics.ALS_LISTS.labels(found=gathered.als_found).inc()
    return GatheredRequest(moment, lookups, gathered)


def feature_inputs(
    model: ServingModel,
    request: GatheredRequest,
    item_ids: list[str],
    sources: list[set[str]],
    columns: ItemColumns | None = None,
) -> Candidates:
    return describe(model.artifacts, request.lookups, request.gathered, item_ids, sources, columns)


# ---------------------------------------------------------------- reads


def read_speed(
    state: ServingState, req: RecRequest, model: ServingModel | None, now_s: float, *, neighbours: bool = True
) -> SpeedState | None:
    """The speed layer's state for this request, or None when Redis is down (then the breaker skips it).
    `neighbours` False (the popular variant, a shed request) skips the session-kNN scoring."""
    if not state.redis.available():
        metrics.FALLBACKS.labels(reason="redis_unavailable").inc()
        return None
    speed_settings = state.settings.speed
    sizes = model.candidate_pool if model is not None else state.settings.training.candidates
    covis_items = [req.item_id] if req.context == "product" and req.item_id else None
    try:
        speed = read_speed_state(
            state.redis.client,
            req.person_id,
            anonymous_id=req.anonymous_id,
            session_id=req.session_id,
            model_version=model.version if model else None,
            covis_items=covis_items,
            top_categories=TOP_AFFINITY_CATEGORIES,
            now_s=now_s,
            trending_n=sizes.trending,
            covis_n=speed_settings.covis_top_n,
            bestsellers_n=sizes.category,
            bestsellers_half_life_s=speed_settings.bestsellers_half_life_s,
            neighbours=NeighbourQuery(
                sizes.neighbour_sample, sizes.neighbour_k, sizes.neighbours if neighbours else 0,
                speed_settings.neighbour_sessions_per_item,
            ),
            flags=state.item_flags,
            trending=state.trending,
        )
    except redis.RedisError as exc:
        state.redis.failed(exc)
        metrics.FALLBACKS.labels(reason="redis_unavailable").inc()
        return None
    state.redis.succeeded()
    return speed


def _user_vector(
    state: ServingState, model: ServingModel, person: str, speed: SpeedState | None
) -> tuple[np.ndarray | None, KnownTop | None]:
    """x(u) + δ(u) for a known person, with where its top batch items lie (the version's list); the ALS
    fold-in of their items for a new or anonymous one, which has no list."""
    erased = state.erased.hides(person, model.artifacts.manifest.cutoff)
    batch = None if erased else model.artifacts.user_vector(person)
    if batch is not None:
        delta = speed.delta if speed is not None and speed.delta_is_current else None
        if delta is None or delta.shape != batch.shape:  # learnt on another version's vectors
            return batch, model.artifacts.known_top(person, None)
        return batch + delta, model.artifacts.known_top(person, delta)
    if speed is None or not speed.person_items:
        return None, None
    index = model.artifacts.item_index
    seen = [(index[i], w) for i, w in speed.person_items.items() if i in index and w > 0]
    if not seen:
        return None, None
    rows, weights = zip(*seen, strict=True)
    vector = fold_in(
        model.artifacts.item_factors, model.artifacts.yty, rows, weights, model.alpha, model.regularization
    )
    return vector, None


def _history(
    state: ServingState, model: ServingModel, person: str, speed: SpeedState | None
) -> dict[str, tuple[float, float]]:
    """The version's history of the person with their purchases since its cutoff; only the purchases
    when they asked to be erased since the cutoff."""
    cutoff = model.artifacts.manifest.cutoff
    batch = {} if state.erased.hides(person, cutoff) else model.artifacts.history_of(person)
    return with_purchases_since(batch, speed.purchases if speed else {}, cutoff.timestamp())


# ---------------------------------------------------------------- candidates and rules


def _seeds(req: RecRequest, speed: SpeedState | None, now_s: float) -> dict[str, float]:
    """Items whose co-visits become candidates, item -> recency (the product page's item counts as newest)."""
    seeds = dict(speed.session_items) if speed else {}
    if req.context == "cart" and speed:
        seeds.update({item: now_s for item in speed.cart})
    if req.context == "product" and req.item_id:
        seeds[req.item_id] = now_s + 1.0
    return seeds


def _excluded(
    state: ServingState, rules: Rules, req: RecRequest, speed: SpeedState | None, now_s: float
) -> tuple[set[str], frozenset[str]]:
    """Items the rules forbid for this request: the request's own, and the live out-of-stock set apart
    (thousands of items in a store, which a union would copy at every request)."""
    out: set[str] = set()
    if req.item_id:
        out.add(req.item_id)  # never recommend the page's own product
    if speed is None:
        return out, frozenset()
    window = rules.exclude.purchased_within_days * DAY_S
    out |= {item for item, at in speed.purchases.items() if at >= now_s - window}
    if rules.exclude.in_cart:
        out |= set(speed.cart)
    if rules.exclude.seen_in_session:
        out |= set(speed.session_items)
    return out, speed.out_of_stock if rules.exclude.out_of_stock else frozenset()


def _apply_rules(
    state: ServingState,
    rules: Rules,
    req: RecRequest,
    speed: SpeedState | None,
    lists: dict[str, Scored],
    now_s: float,
) -> _Pool:
    excluded, out_of_stock = _excluded(state, rules, req, speed, now_s)
    merged = merge_sources(lists)
    items = [item for item in merged if item not in excluded and item not in out_of_stock]
    infos = state.catalog.get_many(items)
    if rules.exclude.out_of_stock:  # the catalog's flag also holds while Redis (the live set) is down
        in_stock = [info is None or info.in_stock for info in infos]
        items, infos = list(compress(items, in_stock)), list(compress(infos, in_stock))
    return _Pool(items, list(map(merged.__getitem__, items)), item_columns(state, speed, items, infos, now_s), lists)


# ---------------------------------------------------------------- scoring


def _source_score(pool: _Pool, source: str) -> np.ndarray:
    scores = pool.source_scores.get(source, {})
    return np.array([scores.get(i, 0.0) for i in pool.item_ids], dtype=np.float64)


def _ranker_scores(
    model: ServingModel, request: GatheredRequest, pool: _Pool, clock: StageClock
) -> tuple[np.ndarray, np.ndarray]:
    """The pool's feature matrix and the ranker's scores of it."""
    if not pool.item_ids:
        return np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros(0)
    inputs = feature_inputs(model, request, pool.item_ids, pool.sources, pool.columns)
    features = compute_features(request.moment, inputs)
    clock.lap("features")
    assert model.scorer is not None, "the caller checks the version has a ranker"
    return features, model.scorer(features)


def _cold_start(state: ServingState, model: ServingModel, req: RecRequest, speed: SpeedState | None) -> bool:
    """As training counts it (spark_jobs/ranker.py): the list used no batch vector of the person."""
    person = speed.person_id if speed else req.person_id
    if not req.personalised or state.erased.hides(person, model.artifacts.manifest.cutoff):
        return True
    return model.artifacts.user_vector(person) is None


def _request_state(
    state: ServingState,
    speed: SpeedState | None,
    vector: np.ndarray | None,
    known_top: KnownTop | None,
    history: dict[str, tuple[float, float]],
    now_s: float,
) -> RequestState:
    if speed is None:
        return RequestState(now_s=now_s, user_vector=vector, user_top=known_top, history=history)
    engaged = set(speed.person_items) | set(speed.session_items)
    prices = [info.price for info in state.catalog.get_many(engaged) if info is not None and info.price > 0]
    return RequestState(
        now_s=now_s,
        user_vector=vector,
        user_top=known_top,
        session_items=speed.session_items,
        category_affinity=speed.category_affinity,
        cart=frozenset(speed.cart),
        purchases=speed.purchases,
        typical_price=statistics.median(prices) if prices else None,  # np.median's value, without its overhead
        history=history,
    )


# ---------------------------------------------------------------- boosts, quotas, diversity


def _boost_and_diversify(
    rules: Rules, pool: _Pool, scores: np.ndarray, k: int
) -> list[_Row]:
    """(item, score, sources, promoted, category) for the top k: promoted boosted, new arrivals reserved,
    category cap."""
    if not pool.item_ids:
        return []
    low, high = float(scores.min()), float(scores.max())
    spread = high - low if high > low else 1.0
    promoted = pool.columns.promoted
    final = (np.asarray(scores, dtype=np.float64) - low) / spread + np.where(promoted, rules.boost.promoted, 0.0)
    order = _ranked_positions(final, pool.item_ids)
    # The pool's columns in that order, each gathered at C level (map), then zipped into rows.
    rows = list(zip(
        map(pool.item_ids.__getitem__, order),
        final[order].tolist(),
        map(pool.sources.__getitem__, order),
        promoted[order].tolist(),
        map(pool.columns.categories.__getitem__, order),
        strict=True,
    ))  # fmt: skip
    return _pick(rules, rows, k)


def _ranked_positions(final: np.ndarray, item_ids: list[str]) -> list[int]:
    """Pool positions by score, best first, ties by item id."""
    order = np.argsort(-final, kind="stable")
    ranked = final[order]
    if len(ranked) > 1 and (bool(np.any(ranked[1:] == ranked[:-1])) or np.isnan(ranked[-1])):
        # Tied scores (NaNs, sorted last, count as tied): by id (numpy compares str by code point, as Python does).
        order = np.lexsort((np.array(item_ids), -final))
    positions: list[int] = order.tolist()
    return positions


_Row = tuple[str, float, set[str], bool, str]  # item, score, sources, promoted, category


def _pick(rules: Rules, rows: list[_Row], k: int) -> list[_Row]:
    """The top k under the category cap (items without a category are not capped), the best new
    arrivals placed first so the quota holds."""
    cap = rules.diversity.cap(k)
    per_category: dict[str, int] = {}
    chosen: list[_Row] = []
    chosen_ids: set[str] = set()

    def take(row: _Row) -> bool:
        category = row[4]
        if row[0] in chosen_ids or (category != UNCATEGORISED and per_category.get(category, 0) >= cap):
            return False
        per_category[category] = per_category.get(category, 0) + 1
        chosen.append(row)
        chosen_ids.add(row[0])
        return True

    reserved = min(rules.new_arrivals.reserved_slots, k)
    for row in rows:  # the best new arrivals first, so the quota holds whatever the scores say
        if reserved <= 0:
            break
        if "new" in row[2] and take(row):
            reserved -= 1
    for row in rows:
        if len(chosen) >= k:
            break
        take(row)
    return best_first(chosen)


# ---------------------------------------------------------------- no model


def _without_model(
    state: ServingState, rules: Rules, speed: SpeedState | None, req: RecRequest, now_s: float
) -> tuple[list[_Row], int]:
    """Popular items from the lake (then the catalog's newest), under the same rules and diversity."""
    n = state.settings.training.candidates.trending
    popular = state.lake_popular or [(i.item_id, i.created_at_s) for i in state.catalog.newest(0.0, n)]
    lists = {"trending": popular[:n]}
    pool = _apply_rules(state, rules, req, speed, lists, now_s)
    ranked = _boost_and_diversify(rules, pool, _source_score(pool, "trending"), req.k)
    return ranked, len(pool.item_ids)


# ---------------------------------------------------------------- reasons and the result


def _reason(
    state: ServingState,
    req: RecRequest,
    item: str,
    category: str,
    sources: set[str],
    speed: SpeedState | None,
    model: ServingModel | None,
    seeds: list[str],
) -> str:
    if model is not None and not sources.isdisjoint(_SEEDED):
        seed = _covis_seed(seeds, item, speed, model)
        if seed is not None:
            info = state.catalog.get(seed)
            label = info.label if info else seed
            if req.context == "product" and seed == req.item_id:
                return f"often viewed with {label}"
            if speed is not None and seed in speed.cart:
                return f"goes with {label} in your cart"
            return f"because you viewed {label}"
    if "history" in sources:
        return "from your earlier visits"
    if "neighbours" in sources:
        return "viewed in sessions like yours"
    if "als" in sources:
        if req.context == "product" and req.item_id:
            return "similar to this item"
        return "picked for you from your activity"
    if "category" in sources:
        return f"bestseller in {category}"
    if "new" in sources and "trending" not in sources:
        return f"new in {category}"
    return f"trending in {category}"


_SEEDED = frozenset({"covis", "next"})  # the sources whose reason names the seed item


def _seeds_newest_first(req: RecRequest, speed: SpeedState | None) -> list[str]:
    return [seed for seed, _ in sorted(_seeds(req, speed, time.time()).items(), key=lambda kv: -kv[1])]


def _covis_seed(seeds: list[str], item: str, speed: SpeedState | None, model: ServingModel) -> str | None:
    """The most recent seed item (`seeds`: newest first) whose co-visits include `item`."""
    for seed in seeds:
        if item in model.covis.get(seed, {}) or (speed and item in speed.covisitation.get(seed, {})):
            return seed
    return None


def _finish(
    state: ServingState,
    req: RecRequest,
    variant: str,
    version: str | None,
    degraded: list[str],
    ranked: list[_Row],
    n_candidates: int,
    speed: SpeedState | None = None,
    model: ServingModel | None = None,
) -> RecResult:
    seeds = _seeds_newest_first(req, speed) if any(not row[2].isdisjoint(_SEEDED) for row in ranked) else []
    items: list[Recommended] = []
    for item, score, sources, promoted, category in ranked:
        reason = _reason(state, req, item, category, sources, speed, model, seeds)
        listed = [s for s in SOURCES if s in sources]
        items.append(Recommended(item, round(score, 6), reason, listed, category, promoted))
    metrics.CANDIDATES.observe(n_candidates)
    if model is None:
        metrics.FALLBACKS.labels(reason="no_model").inc()
    return RecResult(
        request_id=uuid.uuid4().hex,
        model_version=version,
        variant=variant,
        degraded="; ".join(degraded) or None,
        items=items,
        candidates=n_candidates,
    )
