"""The time plan of one batch run: version name, work directory and the windows cut from the cutoff.

With E = eval_days, for cutoff C:  the dev ALS sees events before C-2E; ranker training requests
fall in [C-2E, C-E); early stopping uses [C-E, C-E/2); evaluation uses [C-E/2, C). The published
ALS factors are refit on everything before C, so the speed layer's deltas start exactly at C.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common.settings import Settings

INTERACTIONS = "interactions"
DEV_MODEL = "dev"  # the work directory's registry root, and the dev model's version name in it
STAGES = ("dev", "final")


@dataclass(frozen=True)
class Plan:
    cutoff: datetime
    engine: str
    eval_days: int
    work_dir: Path

    @property
    def version(self) -> str:
        return f"{self.cutoff.astimezone(UTC):%Y%m%dT%H%M%SZ}-{self.engine}"

    @property
    def dev_cutoff(self) -> datetime:
        return self.cutoff - timedelta(days=2 * self.eval_days)

    @property
    def train_window(self) -> tuple[datetime, datetime]:
        return self.dev_cutoff, self.cutoff - timedelta(days=self.eval_days)

    @property
    def valid_window(self) -> tuple[datetime, datetime]:
        return self.cutoff - timedelta(days=self.eval_days), self.cutoff - timedelta(days=self.eval_days / 2)

    @property
    def eval_window(self) -> tuple[datetime, datetime]:
        return self.cutoff - timedelta(days=self.eval_days / 2), self.cutoff

    def stage_cutoff(self, stage: str) -> datetime:
        return self.dev_cutoff if stage == "dev" else self.cutoff

    def interactions_dir(self, stage: str) -> Path:
        return self.work_dir / INTERACTIONS / stage

    @property
    def dev_registry(self) -> Path:
        return self.work_dir / DEV_MODEL

    @property
    def state_file(self) -> Path:
        return self.work_dir / "state.json"

    def windows(self) -> dict[str, str]:
        fmt = "{0:%Y-%m-%dT%H:%M}..{1:%Y-%m-%dT%H:%M}".format
        return {
            "dev_cutoff": self.dev_cutoff.isoformat(),
            "ranker_train": fmt(*self.train_window),
            "ranker_valid": fmt(*self.valid_window),
            "evaluation": fmt(*self.eval_window),
        }


def make_plan(settings: Settings, cutoff: datetime, engine: str | None = None) -> Plan:
    if cutoff.tzinfo is None:
        cutoff = cutoff.replace(tzinfo=UTC)
    # A plain UTC datetime, whatever came in (Airflow hands over pendulum DateTimes).
    cutoff = datetime.fromtimestamp(cutoff.timestamp(), UTC)
    engine = engine or settings.training.engine
    plan = Plan(cutoff, engine, settings.training.eval_days, Path())
    return Plan(cutoff, engine, settings.training.eval_days, work_root(settings) / plan.version)


def work_root(settings: Settings) -> Path:
    """Where the runs' work directories live."""
    return settings.var_dir / "batch"
