"""One place that builds the SparkSession the batch jobs use (memory, partitions, time zone and any extra
option from settings), in-process or under spark-submit alike."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING

from common.settings import SparkSettings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def spark_session(settings: SparkSettings, master: str | None = None, app_name: str = "lambdarec") -> SparkSession:
    """Get or create the session. Under spark-submit pass no master: the one given to spark-submit wins."""
    from pyspark.sql import SparkSession

    # Python workers must run this interpreter (the venv's), not whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.driver.memory", settings.driver_memory)
        .config("spark.executor.memory", settings.executor_memory)
        .config("spark.sql.shuffle.partitions", str(settings.shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
    )
    for key, value in settings.conf.items():  # last, so a deployment can override any of the above
        builder = builder.config(key, value)
    if master:
        builder = builder.master(master)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    if spark.sparkContext.getCheckpointDir() is None and (spark.sparkContext.master or "").startswith("local"):
        # ALS's lineage grows with every iteration and, uncut, can overflow a task thread's stack
        # (seen at 15 iterations on the medium set). A cluster sets spark.checkpoint.dir (RECS_SPARK__CONF)
        # on storage that every executor sees.
        directory = tempfile.mkdtemp(prefix="lambdarec-checkpoints-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        spark.sparkContext.setCheckpointDir(directory)
    # py4j logs every connection close at INFO, even from __del__ after logging has shut down.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    return spark
