"""Drift check of the served model: orchestration only; the check is warehouse/drift.py's `check`.

check -> (the check marked the served version drifted just now) -> trigger nightly_retrain.
Every six hours the sampled served pools are compared with the version's training baseline
(`recs drift report` does the same on demand); the report lands under <var_dir>/reports/. The
first check that finds the version drifted marks it in the registry and triggers a retrain for
the run's logical date, and records an event of the MODEL_DRIFT asset (other DAGs may schedule on
it). Later checks of a marked version trigger nothing: one retrain per drift.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, dag, task

RETRAIN_DAG = "nightly_retrain"
MODEL_DRIFT = Asset(name="lambdarec_model_drift", uri="file:///lambdarec/models/drift")

DEFAULT_ARGS = {
    "owner": "recs-platform",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=20),
}


@dag(
    dag_id="drift_check",
    schedule="0 */6 * * *",
    start_date=datetime(2000, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["lambdarec", "monitoring", "drift"],
    doc_md=__doc__,
)
def drift_check() -> None:
    @task
    def check() -> dict[str, Any]:
        from common.registry import RegistryError
        from common.settings import get_settings
        from warehouse.drift import check as run_check

        settings = get_settings()
        try:
            outcome = run_check(settings, settings.var_dir / "reports")
        except RegistryError as exc:  # no version serving, or one trained before baselines: nothing to compare
            return {"version": None, "drifted": False, "newly_marked": False, "skipped": str(exc)}
        report = outcome.report
        return {
            "version": report.version,
            "drifted": report.drifted,
            "newly_marked": outcome.newly_marked,
            "psi_max": report.psi_max,
            "reasons": report.reasons,
            "report": str(outcome.html_path),
        }

    @task.short_circuit
    def newly_drifted(result: dict[str, Any]) -> bool:
        return bool(result["newly_marked"])

    trigger_retrain = TriggerDagRunOperator(
        task_id="trigger_retrain",
        trigger_dag_id=RETRAIN_DAG,
        logical_date="{{ logical_date }}",  # the retrain's cutoff: this check's moment
        skip_when_already_exists=True,  # the nightly run of that moment may exist already
        outlets=[MODEL_DRIFT],
    )
    newly_drifted(check()) >> trigger_retrain  # type: ignore[arg-type]  # TaskFlow resolves the XComArg at run time


drift_check()
