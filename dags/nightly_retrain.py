"""Nightly retrain of the batch layer: orchestration only; every task calls one tested function of
spark_jobs/pipeline.py, or of evaluation/gate_replay.py for the replay the gate reads.

validate -> apply erasures (whatever validation found) -> interactions -> ALS -> ranker -> evaluate ->
replay gate -> gate/publish -> refresh warehouse -> notify. The cutoff is the data interval's end, never now(); XCom carries
small summaries and names, the data itself moves through the lake, work directory and registry.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import TriggerRule, dag, get_current_context, task

DEFAULT_ARGS = {
    "owner": "recs-platform",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=20),
}


def _cutoff() -> datetime:
    context = get_current_context()
    end = context.get("data_interval_end") or context.get("logical_date")
    if end is None:
        raise ValueError("nightly_retrain needs a data interval: run it from the schedule or with a date")
    return end


def _plan() -> Any:
    from common.settings import get_settings
    from spark_jobs.plan import make_plan

    return make_plan(get_settings(), _cutoff())


@dag(
    dag_id="nightly_retrain",
    schedule="0 2 * * *",
    # Early, so a run for any date of an imported history creates its tasks (Airflow creates none
    # for a logical date before start_date); catchup=False keeps the scheduler from backfilling.
    start_date=datetime(2000, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["lambdarec", "batch", "training"],
    doc_md=__doc__,
)
def nightly_retrain() -> None:
    @task
    def validate() -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from common.settings import get_settings
        from spark_jobs import pipeline
        from spark_jobs.quality import DataQualityError

        try:
            return pipeline.validate(get_settings(), _cutoff())
        except DataQualityError as exc:  # bad data does not heal on retry
            raise AirflowFailException(str(exc)) from exc

    # Erasure is owed whatever validation found (all_done: after it, so the lake is not rewritten
    # while it is read); training still needs both to succeed.
    @task(trigger_rule=TriggerRule.ALL_DONE)
    def apply_erasures() -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from common.settings import get_settings
        from spark_jobs import pipeline
        from spark_jobs.quality import DataQualityError

        try:
            return pipeline.erase(get_settings())
        except DataQualityError as exc:  # an unreadable partition does not heal on retry
            raise AirflowFailException(str(exc)) from exc

    @task
    def interactions() -> dict[str, Any]:
        from common.settings import get_settings
        from spark_jobs import pipeline

        return pipeline.build_interactions(_plan(), get_settings())

    @task
    def train_als() -> dict[str, Any]:
        from common.settings import get_settings
        from spark_jobs import pipeline

        return pipeline.train_als(_plan(), get_settings())

    @task
    def train_content_map() -> dict[str, Any]:
        from common.settings import get_settings
        from spark_jobs import pipeline

        return pipeline.train_content_map(_plan(), get_settings())

    @task
    def train_ranker() -> dict[str, Any]:
        from common.settings import get_settings
        from spark_jobs import pipeline

        return pipeline.train_ranker(_plan(), get_settings())

    @task
    def evaluate() -> dict[str, Any]:
        from common.settings import get_settings
        from spark_jobs import pipeline

        return pipeline.evaluate(_plan(), get_settings())

    @task
    def replay_gate() -> dict[str, Any]:
        from common.settings import get_settings
        from evaluation.gate_replay import replay_gate as replay

        return replay(_plan(), get_settings())

    @task
    def gate_publish() -> dict[str, Any]:
        from common.settings import get_settings
        from spark_jobs import pipeline

        return pipeline.gate_and_publish(_plan(), get_settings())

    @task
    def refresh_warehouse() -> None:
        from common.settings import get_settings
        from warehouse.build import refresh_warehouse as refresh

        refresh(get_settings())

    @task
    def notify(decision: dict[str, Any]) -> bool:
        from common.settings import get_settings
        from spark_jobs import pipeline

        return pipeline.notify(get_settings(), decision.get("event"))

    decision = gate_publish()
    checked = validate()
    erased = apply_erasures()
    built = interactions()
    als = train_als()
    content = train_content_map()
    ranker = train_ranker()
    measured = evaluate()
    replayed = replay_gate()
    refreshed = refresh_warehouse()
    checked >> erased
    told = notify(decision)  # type: ignore[arg-type]  # TaskFlow hands the XComArg over, resolved at run time
    [checked, erased] >> built >> als >> content >> ranker >> measured >> replayed >> decision >> refreshed >> told


nightly_retrain()
