"""`recs bench train`: fit time, peak memory and Recall@20 of one ALS engine on the same interactions."""

from __future__ import annotations

import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
import pyarrow as pa

from common.lake import EVENTS_DATASET, Lake
from common.settings import Settings


class PeakRss:
    """Samples the resident memory of this process and its children (Spark's JVM) in the background."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def _pairs(table: pa.Table) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for person, item in zip(table["person_id"].to_pylist(), table["item_id"].to_pylist(), strict=True):
        out.setdefault(person, set()).add(item)
    return out


def bench_train(settings: Settings, engine: str, lake_root: str | None = None, seed: int = 42) -> dict[str, Any]:
    """Fit `engine` on interactions before (end - eval_days), measure Recall@20 on the days after."""
    from spark_jobs.als import fit_implicit, fit_spark
    from spark_jobs.evaluate import holdout_recall
    from spark_jobs.interactions import local_interactions

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        if lake_root is None:
            from recs.generate import generate

            lake_root = f"{tmp}/lake"
            generate("small", seed, Lake(lake_root))
        lake = Lake(lake_root)
        days = lake.partitions(EVENTS_DATASET)
        if not days:
            raise ValueError(f"no events in the lake at {lake_root}")
        end = datetime.combine(days[-1] + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        split = end - timedelta(days=settings.training.eval_days)
        train = local_interactions(lake, split, settings.training)
        later = local_interactions(lake, end, settings.training)
        events = lake.read_events(end=split, columns=["event_id"]).num_rows

        if engine == "spark":
            from spark_jobs.spark import spark_session

            spark = spark_session(settings.spark, master=settings.spark.master)
            frame = spark.createDataFrame(train.to_pandas()).cache()
            frame.count()  # materialise, so fit_s times the fit and not the hand-over
            with PeakRss() as rss:
                clock = time.perf_counter()
                factors = fit_spark(spark, frame, settings.training)
                fit_s = time.perf_counter() - clock
            spark.stop()
        else:
            with PeakRss() as rss:
                clock = time.perf_counter()
                factors = fit_implicit(train, settings.training)
                fit_s = time.perf_counter() - clock

    seen = _pairs(train)
    recall = holdout_recall(
        factors.user_ids, factors.user_factors, factors.item_ids, factors.item_factors, seen, _pairs(later)
    )
    return {
        "engine": engine,
        "events": events,
        "fit_s": round(fit_s, 3),
        "peak_rss_mb": round(rss.peak / 2**20, 1),
        "recall_at_20": round(recall, 4),
    }
