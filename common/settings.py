"""One validated settings object for every layer, read from `RECS_*` environment variables.

Nested sections use a double underscore: `RECS_REDIS__URL`, `RECS_API__PORT`. Unknown keys
are refused at start-up, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.sequence import MAX_STEPS

ENV_PREFIX = "RECS_"
NESTED_DELIMITER = "__"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VAR = PROJECT_ROOT / "var"
LOOPBACK = "127.0.0.1"

Scope = Literal["events:write", "recs:read", "admin"]


class SettingsError(ValueError):
    """Raised with a readable message when the configuration is invalid."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(Section):
    url: str | None = Field(
        None,
        description="External Redis URL. Unset: the project runs its own redis-server under var/redis. "
        "A Redis Cluster: redis+cluster://host:port[,host:port...] (seed nodes; the client learns the rest).",
    )
    host: str = "127.0.0.1"
    port: int = Field(6391, ge=0, le=65535, description="Port of the private redis-server; 0 picks a free one.")
    data_dir: Path | None = Field(None, description="Default: <var_dir>/redis.")
    stream: str = "events"
    retention_hours: float = Field(
        48.0,
        ge=48.0,
        description="The stream keeps entries this long (a model switch rebuilds from it); older ones go once "
        "every consumer group has acknowledged them, never before.",
    )
    socket_timeout_s: float = Field(0.5, gt=0)
    cluster_replica_acks: int = Field(
        1,
        ge=0,
        description="Redis Cluster: a speed-layer batch counts as applied (and is acknowledged) once this many "
        "replicas of every master it wrote have its effects (WAIT); short of that it is retried, which dedup "
        "makes harmless. 0: no wait, and a failover may lose the effects of batches acknowledged in the "
        "replication lag before it (README, 'Redis Cluster').",
    )
    cluster_replica_timeout_ms: int = Field(1000, ge=1, description="How long that WAIT may take.")
    max_memory_mb: int = Field(
        4096,
        ge=1,
        description="The embedded redis-server's maxmemory. Past it Redis refuses writes (policy noeviction, "
        "common/redis_server.py): the API answers 503 and consumers retry, nothing is evicted. The TTLs and "
        "the stream's retention must fit it (README, 'Memory budget'); `recs speed status` shows the use.",
    )

    @property
    def stream_retention_ms(self) -> int:
        return int(self.retention_hours * 3_600_000)

    @property
    def effective_url(self) -> str:
        return self.url or f"redis://{self.host}:{self.port}/0"


class LakeSettings(Section):
    root: str = Field("", description="Local path or any fsspec URL (s3://bucket/lake). Default: <var_dir>/lake.")
    flush_events: int = Field(5000, ge=1, description="Lake writer flushes after this many events ...")
    flush_seconds: float = Field(10.0, gt=0, description="... or after this many seconds, whichever comes first.")
    dedup_window_s: float = Field(
        600.0,
        gt=0,
        description="The lake writer drops an event already in the lake if it was written since this long before "
        "the flush's oldest stream entry: a redelivery after a crash (claimed within seconds) or a client's retry "
        "(tracker.js retries within seconds). It holds the window's event ids in memory (about 250 B each).",
    )


class ModelsSettings(Section):
    root: str = Field("", description="Model registry root (local path or fsspec URL). Default: <var_dir>/models.")
    gate_tolerance: float = Field(
        0.02,
        ge=0,
        le=1,
        description="A new version is refused when its replayed MRR@20 or HR@20 is surely (95 %) below the "
        "serving version's by more than this share of it.",
    )
    content_vectors: bool = Field(
        True,
        description="Give an item with no batch vector (new since the cutoff) a vector from its title, category, "
        "brand and price through the version's content map, so ALS scoring, fold-in and similar items reach it.",
    )
    gate_sessions: int = Field(
        1000,
        ge=1,
        description="Sessions of the evaluation window the gate's replay scores (a seeded sample); every event "
        "of the window still goes through the speed layer.",
    )


class SparkSettings(Section):
    master: str = "local[*]"
    driver_memory: str = "2g"
    executor_memory: str = Field("1g", description="Per executor on a cluster; must fit in one worker's memory.")
    shuffle_partitions: int = Field(4, ge=1)
    conf: dict[str, str] = Field(
        default_factory=dict,
        description='Any other Spark option, as JSON: {"spark.driver.host": "127.0.0.1", "spark.eventLog.enabled": "true"}.',
    )


class ClusterSettings(Section):
    """`recs cluster up`: every role of a deployment as local processes on loopback."""

    spark_port: int = Field(7077, ge=1, le=65535)
    spark_ui_port: int = Field(8090, ge=1, le=65535, description="Master web UI and its /json/ status (8080 is Airflow's).")
    spark_workers: int = Field(2, ge=1)
    redis_cluster_port: int = Field(
        7101,
        ge=1,
        le=55530,
        description="`up --redis-cluster`: its 3 masters and 3 replicas listen on this port and the 5 after it "
        "(each node's cluster bus 10000 above).",
    )
    worker_cores: int = Field(1, ge=1)
    worker_memory: str = Field("1g", description="What each worker offers its executors (>= spark.executor_memory).")
    speed_consumers: int = Field(2, ge=1, description="Speed-layer processes, one group member each.")

    @property
    def spark_master_url(self) -> str:
        return f"spark://{LOOPBACK}:{self.spark_port}"


class ApiSettings(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(2, ge=1)
    # key -> scopes. Empty means auth is off (the embedded demo); production sets RECS_API__KEYS.
    keys: dict[str, list[Scope]] = Field(default_factory=dict)
    cors_origins: list[str] = Field(default_factory=list)
    token_secret: SecretStr | None = Field(
        None,
        min_length=32,
        description="HMAC key of the session tokens POST /v1/tokens issues (a browser's credential for its own "
        "session: EventSource cannot send a key header). Unset: no tokens are issued.",
    )
    token_previous_secret: SecretStr | None = Field(
        None,
        min_length=32,
        description="The secret before a rotation: tokens it signed are still accepted; they all expire within "
        "token_ttl_s of the rotation, after which it can be dropped.",
    )
    token_ttl_s: int = Field(900, ge=30, le=86_400, description="How long a session token is valid.")
    demo_key: SecretStr | None = Field(
        None,
        description="One of `keys` (events:write and recs:read) that the /demo page's server side uses to "
        "serve the storefront and issue its tokens; it never reaches the browser. Unset with keys configured: "
        "/demo needs a recs:read key in a header, as every route.",
    )
    max_batch: int = Field(500, ge=1)
    max_body_bytes: int = Field(
        2 * 1024 * 1024,
        ge=1024,
        description="A request body over this size is refused (413) before it is read on, parsed or authenticated; "
        "the default holds a full batch of events with room to spare.",
    )
    max_head_bytes: int = Field(64 * 1024, ge=1024, description="Request line and headers over this size: 431.")
    head_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request's line and headers must arrive within this time of the connection's opening or "
        "of the previous response; else the connection is closed (slow or silent clients hold no socket).",
    )
    keep_alive_s: int = Field(5, ge=1, description="An idle kept-alive connection is closed after this time.")
    impressions_flush_s: float = Field(
        10.0, gt=0, description="How often a worker writes its served lists to the lake (one file each time)."
    )
    max_stream_lag: int = Field(100_000, ge=1, description="Above this consumer-group lag, POST /v1/events answers 503.")
    today_counts_refresh_s: float = Field(
        1.0,
        ge=0,
        description="While a worker's requests ask for more of today's item counts than today holds, it keeps a "
        "copy of them re-read this often, instead of a round trip per request (0: always read live). Today's "
        "counts then lag by at most twice this.",
    )
    overload_wait_ms: float = Field(
        50.0,
        ge=0,
        description="A recommendation request that waited this long for its worker (the requests before it) is "
        "answered without session-kNN, ~70 % of Redis' work on a read (0: never). `degraded` says so.",
    )
    overload_batch_only_wait_ms: float = Field(
        200.0,
        ge=0,
        description="One that waited this long is answered from the batch model alone, as without Redis (0: never).",
    )
    push_helper: bool = Field(
        True,
        description="Compute the lists of a worker's live streams (SSE, WebSocket) in a helper process of lower "
        "priority, started with its first stream, so that requests never wait for them; it holds its own copy of "
        "the model. False: the worker computes them between its requests.",
    )
    push_helper_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="The helper's niceness: 10 gives the workers ~90 % of a core the helper wants too, and still "
        "leaves pushes ~10 % when requests take every core.",
    )
    rules_file: Path = PROJECT_ROOT / "serving" / "rules.yaml"

    @model_validator(mode="after")
    def _tokens_configured(self) -> ApiSettings:
        if self.token_previous_secret is not None and self.token_secret is None:
            raise ValueError("token_previous_secret needs token_secret (the one tokens are signed with now)")
        if self.demo_key is not None:
            if self.demo_key.get_secret_value() not in self.keys:
                raise ValueError("demo_key must be one of keys")
            if self.token_secret is None:
                raise ValueError("demo_key needs token_secret: the demo page works with session tokens")
        return self


class CandidatePool(Section):
    """How many items each generator proposes. The ranker learns on pools of these sizes, the version's
    manifest records them, and serving builds its pools the same way for that version."""

    als: int = Field(40, ge=0, le=5000)
    covis: int = Field(30, ge=0, le=5000)
    next: int = Field(20, ge=0, le=5000, description="Items that most often follow the session's most recent item.")
    trending: int = Field(20, ge=0, le=5000)
    category: int = Field(10, ge=0, le=5000)
    new_arrivals: int = Field(20, ge=0, le=5000)
    new_max_age_days: float = Field(14.0, ge=0, description="An item created this recently is a new arrival.")
    neighbours: int = Field(30, ge=0, le=5000, description="Items from the session's nearest sessions (session-kNN).")
    neighbour_sample: int = Field(500, ge=1, le=5000, description="Session-kNN: the most recent sessions sharing an item.")
    neighbour_k: int = Field(100, ge=1, le=1000, description="Session-kNN: of those, the most similar ones that vote.")
    history: int = Field(
        30, ge=0, le=5000, description="Items of the person's history (common/gatherer.py: earlier_items)."
    )


class TrainingSettings(Section):
    engine: Literal["spark", "implicit"] = "implicit"
    # Implicit-feedback weight per event type (view < add_to_cart < purchase).
    weights: dict[str, float] = Field(
        default_factory=lambda: {
            "view": 1.0,
            "click": 1.0,
            "search": 0.0,
            "wishlist": 2.0,
            "add_to_cart": 3.0,
            "remove_from_cart": 0.0,
            "purchase": 5.0,
            "identify": 0.0,
        }
    )
    dwell_bonus_per_minute: float = Field(0.5, ge=0)
    dwell_bonus_cap: float = Field(2.0, ge=0)
    half_life_days: float = Field(30.0, gt=0)
    factors: int = Field(64, ge=2)
    regularization: float = Field(0.05, ge=0)
    alpha: float = Field(10.0, gt=0)
    iterations: int = Field(15, ge=1)
    seed: int = 42
    eval_days: int = Field(2, ge=1, description="Days before the cutoff held out for ranker validation and evaluation.")
    history_kept: int = Field(
        200, ge=0, le=1000, description="Items a version keeps per person of what they engaged with (its history)."
    )
    # Ten times the default ALS pool (40), so that a live delta of a few percent of the batch vector still
    # leaves the top 40 among them (docs/performance.md, 2026-12-07).
    top_items_kept: int = Field(
        400, ge=0, le=5000,
        description="Items a version keeps per person of their batch vector's highest scores, so that serving "
        "scans every item for few known people (common/model.py: BatchTops); 0 keeps none. Costs the nightly run "
        "people x items products and 4 bytes a kept item a person on disk.",
    )  # fmt: skip
    # 4,000 starved the ranker: 20,000 raised full's replay HR@20 by ~0.005 on YooChoose, Online Retail and
    # the medium shop (README, "Real clicks"); its cost is the nightly run's time, linear up to the cap.
    max_requests: int = Field(
        20_000, ge=10, description="Moments (requests) sampled per ranker training, early-stopping and evaluation window."
    )
    candidates: CandidatePool = CandidatePool()
    volume_factor: float = Field(
        5.0, gt=1, description="A day with more than this factor more or fewer events than the trailing week fails validation."
    )


class SpeedSettings(Section):
    group: str = "speed"
    lake_group: str = "lake-writer"
    batch_size: int = Field(500, ge=1)
    block_ms: int = Field(100, ge=1)
    claim_idle_ms: int = Field(30_000, ge=100)
    session_ttl_s: int = Field(1800, ge=60)
    dedup_ttl_s: int = Field(7 * 86400, ge=60)
    recent_items: int = Field(20, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    l2: float = Field(0.01, ge=0)
    negatives: int = Field(5, ge=0)
    max_delta_norm: float = Field(1.0, gt=0)
    trending_bucket_s: int = Field(300, ge=10)
    trending_half_life_s: int = Field(3600, ge=60)
    trending_window_s: int = Field(6 * 3600, ge=60)
    covis_top_n: int = Field(50, ge=1, description="Co-visits kept per item (trimmed when twice as many).")
    neighbour_sessions_per_item: int = Field(
        100, ge=1, description="Session-kNN: the most recent sessions indexed per item (trimmed when twice as many)."
    )
    neighbour_session_ttl_s: int = Field(
        2 * 86400, ge=60, description="Session-kNN: how long a session stays a neighbour after its last new item."
    )
    covis_steps: int = Field(
        10,
        ge=1,
        le=MAX_STEPS,
        description="Ordered co-visitation: b counts for a when it follows within this many items.",
    )
    affinity_half_life_s: int = Field(900, ge=10, description="Half-life of a session's category affinity.")
    history_ttl_s: int = Field(30 * 86400, ge=60, description="TTL of person_items, purchases and aliases.")
    erased_ttl_s: int = Field(
        30 * 86400,
        ge=86400,
        description="How long an erased user's and their devices' ids stay tombstoned: the speed layer and the "
        "lake writer drop every event naming them meanwhile.",
    )
    purchases_kept: int = Field(50, ge=1)
    bestsellers_half_life_s: int = Field(7 * 86400, ge=3600)
    bestsellers_top_n: int = Field(200, ge=1, description="Items kept per category (trimmed when twice as many).")
    trending_top_n: int = Field(500, ge=1, description="Size of the materialised trending list.")
    trending_refresh_s: float = Field(
        5.0, gt=0,
        description="How often one consumer re-sums the trending buckets (reading those written since); less "
        "often when a re-sum takes longer than 0.5 % of the time (speed_layer/consumer.py: trending_pause_s).",
    )  # fmt: skip
    claim_interval_s: float = Field(5.0, gt=0, description="How often a consumer looks for idle pending entries.")
    restart_backoff_s: float = Field(
        1.0, gt=0, description="`recs speed run --consumers N` restarts a dead child after this, doubled while it "
        "keeps dying within a minute of its start (at most 30 s).",
    )
    restarts_per_minute: int = Field(
        10, ge=1, description="Past this many restarts within a minute, `--consumers N` stops every child and exits 1."
    )
    dead_consumer_idle_ms: int = Field(
        600_000,
        ge=100,
        description="A group member idle this long and holding no pending entry (a dead process whose entries "
        "were claimed) is removed from the group by the live ones, after their claim step.",
    )
    conflict_retries: int = Field(5, ge=1, description="Re-reads of a person's delta after a concurrent write.")
    # Events a script call applies (speed_layer/effects.py: chunk_size). A call holds Redis while it runs:
    # with 100 another client's read waited p99 ~4-5 ms instead of ~2.5 while a backlog drained (200: ~6-7).
    script_chunk: int = Field(100, ge=1, description="Most events a script call applies (a backlog's full batches).")
    script_chunk_min: int = Field(
        50, ge=1, description="Fewest events a script call applies when a batch is split (a live rate's small batches)."
    )


class MetricsSettings(Section):
    """Where the speed layer's processes expose Prometheus metrics (the API serves /metrics on its own port)."""

    host: str = Field("127.0.0.1", description="Interface of the metrics ports; 0.0.0.0 in a container.")
    speed_port: int = Field(
        9110,
        ge=0,
        le=65535,
        description="`recs speed run`: its metrics port, one for all of --consumers N (multiprocess mode); 0: none.",
    )
    lake_writer_port: int = Field(9109, ge=0, le=65535, description="`recs lake-writer run`: its metrics port; 0: none.")
    stream_refresh_s: float = Field(
        5.0, gt=0, description="How often each process reads the stream's group lag, pending and dead letters."
    )


class ExperimentSettings(Section):
    # variant -> share of users; shares must add up to 1. In bandit mode the variants are the arms and
    # the shares are only the fallback while Redis is down.
    shares: dict[str, float] = Field(default_factory=lambda: {"ranker": 0.8, "als_only": 0.1, "popular": 0.1})
    control: str = "popular"
    name: str = Field("recs", pattern=r"^[A-Za-z0-9_.-]{1,40}$", description="Names the experiment's keys and metrics.")
    mode: Literal["ab", "bandit"] = Field(
        "ab",
        description="ab: a person's variant is a fixed hash share. bandit: Thompson sampling over the variants "
        "per context, sticky per person and session, learning from the served lists' clicks (common/bandit.py).",
    )
    reward: Literal["click", "purchase"] = Field(
        "click", description="The posterior the bandit samples: a click on the list, or a purchase in the session after one."
    )
    floor: float = Field(0.05, ge=0.0, description="Bandit mode: the least share of traffic each arm keeps.")
    epoch: int = Field(
        1, ge=1, description="Part of the posteriors' version (with the arm set): raise it to start the bandit afresh."
    )
    posterior_ttl_s: int = Field(
        30 * 86_400, ge=3600, description="A posterior without an impression this long expires (an abandoned version)."
    )
    cache_s: float = Field(1.0, ge=0.0, description="How long a serving worker reuses the posteriors it read.")
    count_interval_s: float = Field(
        2.0, gt=0, description="How often each speed consumer counts the bandit's served lists (its housekeeping)."
    )
    impressions_kept: int = Field(
        100_000, ge=100, description="The bandit's impression stream is trimmed to about this many entries."
    )

    @model_validator(mode="after")
    def _shares_add_up(self) -> ExperimentSettings:
        total = sum(self.shares.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"experiment shares must add up to 1, got {total:g}")
        if self.control not in self.shares:
            raise ValueError(f"control variant {self.control!r} is not one of {sorted(self.shares)}")
        if self.floor * len(self.shares) > 1.0:
            raise ValueError(f"a floor of {self.floor:g} for {len(self.shares)} arms exceeds the whole traffic")
        bad = [v for v in self.shares if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,40}", v)]
        if bad:
            raise ValueError(f"variant names must be 1-40 of [A-Za-z0-9_.+-]: {bad}")
        return self


class DriftSettings(Section):
    """Drift monitoring: serving samples its ranked pools, `recs drift report` compares them with training's."""

    sample_rate: float = Field(
        0.02, ge=0, le=1, description="Share of ranker-scored requests whose pool is logged (0 turns it off)."
    )
    sample_requests: int = Field(
        2000, ge=10, description="Sampled requests kept (a capped Redis stream; the oldest go first)."
    )
    rows_per_request: int = Field(
        32, ge=1, le=1000, description="Pool rows (features and score) kept of each sampled request, drawn at random."
    )
    baseline_rows: int = Field(
        20_000, ge=100, description="Training feature rows kept with a model version as its drift baseline."
    )
    bins: int = Field(10, ge=2, le=100, description="Quantile bins of the baseline that PSI compares shares in.")
    psi_threshold: float = Field(
        0.25, gt=0, description="PSI of a feature, the score or the category mix above this marks the version drifted."
    )
    cold_start_threshold: float = Field(
        0.2, gt=0, le=1, description="A change of the cold-start share of requests by more than this marks it too."
    )
    min_requests: int = Field(
        100, ge=1, description="Fewer sampled requests than this: the report is written, no version is marked."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    var_dir: Path = DEFAULT_VAR
    redis: RedisSettings = RedisSettings()
    lake: LakeSettings = LakeSettings()
    models: ModelsSettings = ModelsSettings()
    spark: SparkSettings = SparkSettings()
    api: ApiSettings = ApiSettings()
    training: TrainingSettings = TrainingSettings()
    speed: SpeedSettings = SpeedSettings()
    metrics: MetricsSettings = MetricsSettings()
    experiments: ExperimentSettings = ExperimentSettings()
    cluster: ClusterSettings = ClusterSettings()
    drift: DriftSettings = DriftSettings()

    @model_validator(mode="after")
    def _paths_under_var_dir(self) -> Settings:
        """Places left unset live under var_dir, so RECS_VAR_DIR alone moves everything."""
        if self.redis.data_dir is None:
            object.__setattr__(self, "redis", self.redis.model_copy(update={"data_dir": self.var_dir / "redis"}))
        if not self.lake.root:
            object.__setattr__(self, "lake", self.lake.model_copy(update={"root": str(self.var_dir / "lake")}))
        if not self.models.root:
            object.__setattr__(self, "models", self.models.model_copy(update={"root": str(self.var_dir / "models")}))
        return self


def _unknown_env_keys(environ: dict[str, str]) -> list[str]:
    """Names of RECS_* variables that match no setting (pydantic-settings ignores them otherwise)."""
    unknown = []
    for name in environ:
        if not name.startswith(ENV_PREFIX) or name in _NOT_SETTINGS:
            continue
        path = name[len(ENV_PREFIX) :].lower().split(NESTED_DELIMITER)
        model: type[BaseModel] = Settings
        for i, part in enumerate(path):
            field = model.model_fields.get(part)
            if field is None:
                unknown.append(name)
                break
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                model = annotation
            elif i < len(path) - 1:
                unknown.append(name)  # a nested key under a plain value
                break
    return unknown


# Variables with our prefix that are not settings: the CLI and tests read them directly.
_NOT_SETTINGS = {"RECS_BIN"}


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment; raise SettingsError naming each bad key."""
    unknown = _unknown_env_keys(dict(os.environ))
    if unknown:
        raise SettingsError(f"unknown setting(s): {', '.join(sorted(unknown))} (see `recs config`)")
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{ENV_PREFIX}{NESTED_DELIMITER.join(str(p).upper() for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        )
        raise SettingsError(f"invalid settings: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()


def dump_settings(settings: Settings) -> str:
    """Settings as JSON with every secret hidden (`redacted`)."""
    return json.dumps(redacted(json.loads(settings.model_dump_json())), indent=2, default=str)


# A setting (or an entry of a mapping setting, as spark.conf's) whose name says it holds a secret.
_SECRET_NAME = re.compile(r"key|secret|passw|token|credential", re.IGNORECASE)


def redacted(value: Any, secret: bool = False) -> Any:
    """`value` (settings as JSON data, or one setting such as a URL) fit to print: every string held by
    a setting whose name says key, secret, password or token is masked (a mapping there is listed as
    "<masked key>: <value>" lines, its non-string values shown: API keys -> their scopes), and so is
    the password of any URL, in its user part or its query. `secret`: the value's name says so."""
    if isinstance(value, dict):
        if secret:
            return [f"{_mask(str(k))}: {_shown(v)}" for k, v in value.items()]
        return {k: redacted(v, bool(_SECRET_NAME.search(str(k)))) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, secret) for v in value]
    if isinstance(value, str):
        return _mask(value) if secret else _url_redacted(value)
    return value


def _mask(text: str) -> str:
    """A secret as `***` and, when long enough that they give little away, its last four characters
    (so operators can tell two API keys apart)."""
    return f"***{text[-4:]}" if len(text) >= 12 else "***"


def _shown(value: Any) -> str:
    """A value under a secret mapping's key: strings are masked, lists of scopes and the like shown."""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return _mask(value) if isinstance(value, str) else json.dumps(value)


def _url_redacted(text: str) -> str:
    """The URL with its password, and any query parameter whose name says secret, masked; other text as is."""
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return text
    if not parts.scheme or not parts.netloc:
        return text
    query = parse_qsl(parts.query, keep_blank_values=True)
    secret_query = any(_SECRET_NAME.search(name) for name, _ in query)
    if password is None and not secret_query:
        return text
    netloc = parts.netloc
    if password is not None:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    if secret_query:
        masked = [(name, "***" if _SECRET_NAME.search(name) else v) for name, v in query]
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(masked, safe="*"), parts.fragment))
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
