"""The model registry: versioned model directories, manifests, and the atomic CURRENT pointer.

Layout under the registry root:
    <version>/manifest.json   version, cutoff, parameters, metrics, gate decision, file hashes
    <version>/...             artifacts (names in ARTIFACT_FILES)
    <version>/drift.json      the latest drift check of the version (common/drift.py)
    <version>/DRIFTED         written once, by the first check that found it drifted
    CURRENT                   the serving version's name, replaced atomically
    HISTORY.jsonl             one line per activation, for rollback
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.messages import ModelEvent
from common.storage import Store

# Artifact file names inside a version directory (every engine writes the same ones).
USER_FACTORS = "user_factors.npy"
ITEM_FACTORS = "item_factors.npy"
USER_IDS = "user_ids.json"
ITEM_IDS = "item_ids.json"
RANKER = "ranker.txt"
POPULARITY = "popularity.parquet"
COVISITATION = "covisitation.parquet"
CONTENT_MAP = "content_map.npz"  # item content -> item factors (common/content.py), for items new since the cutoff
DRIFT_BASELINE = "drift_baseline.parquet"  # a bounded sample of the ranker's training rows (common/drift.py)
HISTORY = "history.npz"  # per person, the items engaged with before the cutoff (common/model.py: PersonHistory)
# Per person, the item rows of their batch vector's top scores and the lowest of those (common/model.py: BatchTops).
TOP_ROWS = "user_top_rows.npy"
TOP_FLOORS = "user_top_floors.npy"
ARTIFACT_FILES = (
    USER_FACTORS, ITEM_FACTORS, USER_IDS, ITEM_IDS, RANKER, POPULARITY, COVISITATION, CONTENT_MAP, DRIFT_BASELINE,
    HISTORY, TOP_ROWS, TOP_FLOORS,
)
# Beside the manifest, never in it: a drift check must not rewrite what the gate decided on.
DRIFT_LATEST = "drift.json"
DRIFT_MARKER = "DRIFTED"

Status = Literal["candidate", "published", "rejected"]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    created_at: datetime
    cutoff: datetime = Field(description="The model saw events with received_at < cutoff.")
    engine: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    # strategy (popular, als, als_ranker) -> metric name -> value
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="artifact name -> sha256")
    status: Status = "candidate"
    decision: str | None = Field(None, description="Why the gate published or rejected it.")
    ranker_unused: str | None = Field(
        None,
        description="Why serving orders this version's pools without its ranker (it lost to their heuristic "
        "order on the held-out window); None: the ranker ranks.",
    )
    counts: dict[str, int] = Field(default_factory=dict)


class DriftCheck(BaseModel):
    """The outcome of one drift check of a version (the report itself lives beside the warehouse report)."""

    model_config = ConfigDict(extra="forbid")

    version: str
    checked_at: datetime
    psi_max: float = Field(description="The largest PSI over the ranker's features.")
    drifted: bool
    reasons: list[str] = Field(default_factory=list)
    requests: int = Field(description="Sampled served requests the check compared.")


class RegistryError(RuntimeError):
    pass


class Registry(Store):
    """Model versions under one root URL (a local path by default)."""

    # ------------------------------------------------------------ versions

    def version_dir(self, version: str) -> str:
        return self.path(version)

    def versions(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        out = []
        for p in self.fs.ls(self.root, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if self.fs.exists(self.path(name, "manifest.json")):
                out.append(name)
        return sorted(out)

    def manifests(self) -> list[Manifest]:
        return [self.read_manifest(v) for v in self.versions()]

    def read_manifest(self, version: str) -> Manifest:
        target = self.path(version, "manifest.json")
        if not self.fs.exists(target):
            raise RegistryError(f"model version {version!r} not found under {self.root_url}")
        with self.fs.open(target, "rb") as f:
            return Manifest.model_validate_json(f.read())

    def write_manifest(self, manifest: Manifest) -> None:
        """Write the manifest, hashing every artifact present in the version directory."""
        files = {}
        for name in ARTIFACT_FILES:
            p = self.path(manifest.version, name)
            if self.fs.exists(p):
                files[name] = self._sha256(p)
        manifest = manifest.model_copy(update={"files": files})
        self.write_bytes(self.path(manifest.version, "manifest.json"), manifest.model_dump_json(indent=2).encode())

    def verify(self, version: str) -> None:
        """Raise if an artifact's hash no longer matches its manifest."""
        manifest = self.read_manifest(version)
        for name, digest in manifest.files.items():
            if self._sha256(self.path(version, name)) != digest:
                raise RegistryError(f"artifact {name} of {version} does not match its manifest hash")

    def reject(self, version: str, reason: str) -> Manifest:
        manifest = self.read_manifest(version).model_copy(update={"status": "rejected", "decision": reason})
        self.write_bytes(self.path(version, "manifest.json"), manifest.model_dump_json(indent=2).encode())
        return manifest

    # ------------------------------------------------------------ drift

    def record_drift(self, check: DriftCheck) -> None:
        """Keep the latest check; the first drifted one also leaves the marker, which later checks keep."""
        body = check.model_dump_json(indent=2).encode()
        self.write_bytes(self.path(check.version, DRIFT_LATEST), body)
        if check.drifted and self.drift_marker(check.version) is None:
            self.write_bytes(self.path(check.version, DRIFT_MARKER), body)

    def latest_drift(self, version: str) -> DriftCheck | None:
        return self._read_check(version, DRIFT_LATEST)

    def drift_marker(self, version: str) -> DriftCheck | None:
        """The check that first found the version drifted, or None while it has not."""
        return self._read_check(version, DRIFT_MARKER)

    def _read_check(self, version: str, name: str) -> DriftCheck | None:
        p = self.path(version, name)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "rb") as f:
            return DriftCheck.model_validate_json(f.read())

    # ------------------------------------------------------------ CURRENT and history

    def current(self) -> str | None:
        p = self.path("CURRENT")
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "rb") as f:
            return f.read().decode().strip() or None

    def history(self) -> list[dict[str, str]]:
        p = self.path("HISTORY.jsonl")
        if not self.fs.exists(p):
            return []
        with self.fs.open(p, "rb") as f:
            return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]

    def activate(self, version: str, kind: Literal["published", "activated", "rolled_back"] = "activated") -> ModelEvent:
        """Point CURRENT at `version` atomically; returns the message to publish to serving."""
        manifest = self.read_manifest(version)
        if manifest.status == "rejected" and kind == "published":
            raise RegistryError(f"version {version} was rejected by the gate: {manifest.decision}")
        previous = self.current()
        if manifest.status != "published":
            manifest = manifest.model_copy(update={"status": "published"})
            self.write_bytes(self.path(version, "manifest.json"), manifest.model_dump_json(indent=2).encode())
        self.write_bytes(self.path("CURRENT"), version.encode())
        entry = {"version": version, "at": datetime.now(UTC).isoformat(), "kind": kind}
        history = self.history() + [entry]
        self.write_bytes(self.path("HISTORY.jsonl"), "".join(json.dumps(h) + "\n" for h in history).encode())
        return ModelEvent(kind=kind, version=version, cutoff=manifest.cutoff, previous=previous)

    def rollback(self) -> ModelEvent:
        """Re-activate the version that was serving before the current one."""
        current = self.current()
        if current is None:
            raise RegistryError("nothing to roll back: no version is active")
        for entry in reversed(self.history()):
            if entry["version"] != current:
                return self.activate(entry["version"], kind="rolled_back")
        raise RegistryError(f"nothing to roll back to: {current} is the only version ever activated")

    # ------------------------------------------------------------ internals

    def _sha256(self, path: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def publish_model_event(redis_client: Any, event: ModelEvent) -> int:
    """Tell serving and the speed layer; returns how many subscribers heard it."""
    from common.redis_keys import MODELS_CHANNEL

    return int(redis_client.publish(MODELS_CHANNEL, event.model_dump_json()))
