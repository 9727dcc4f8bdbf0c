"""Run the real `nightly_retrain` DAG (or another of dags/) in-process with `airflow dags test`, Airflow's home
under var/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

from common.settings import PROJECT_ROOT, Settings

DAG_ID = "nightly_retrain"


def airflow_env(settings: Settings) -> dict[str, str]:
    """Environment for the airflow CLI: home under var/, our dags/ folder, no examples, SQLite."""
    home = settings.var_dir / "airflow"
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        # The DAG's tasks read RECS_* settings; make them point where this process's settings point.
        "RECS_VAR_DIR": str(settings.var_dir),
        "RECS_LAKE__ROOT": settings.lake.root,
        "RECS_MODELS__ROOT": settings.models.root,
        **({"RECS_REDIS__URL": settings.redis.url} if settings.redis.url else {}),  # the model event's Redis
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        # Airflow's own subprocesses (standalone's components) call `airflow` by name.
        "PATH": os.pathsep.join(filter(None, [str(Path(sys.executable).parent), os.environ.get("PATH")])),
    }


def airflow_binary() -> str:
    local = Path(sys.executable).with_name("airflow")
    return str(local) if local.exists() else shutil.which("airflow") or "airflow"


def ensure_db(settings: Settings) -> None:
    """`airflow db migrate` once per Airflow home (a marker file remembers it)."""
    home = settings.var_dir / "airflow"
    marker = home / ".migrated"
    if marker.exists():
        return
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run([airflow_binary(), "db", "migrate"], env=airflow_env(settings), check=True, capture_output=True)
    marker.touch()


def dags_test(
    settings: Settings, day: date, capture: bool = False, dag_id: str = DAG_ID
) -> subprocess.CompletedProcess[str]:
    """One whole DAG run for the logical date `day` (cutoff = day 00:00 UTC). Returns the finished process."""
    ensure_db(settings)
    return subprocess.run(
        [airflow_binary(), "dags", "test", dag_id, day.isoformat()],
        env=airflow_env(settings),
        capture_output=capture,
        text=True,
    )
