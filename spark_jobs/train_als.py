"""Spark entry point of the batch run, launched with `spark-submit --master <settings.spark.master>`.

Stages (one JVM each): `interactions` writes the dev and final interactions as Parquet into the
work directory; `als` fits Spark MLlib ALS on each and writes factors and id maps through
`common.model.save_factors` (dev into the work registry, final into the new registry version).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from common.lake import Lake
from common.model import save_factors
from common.registry import Registry
from common.settings import SparkSettings, TrainingSettings
from spark_jobs.als import fit_spark
from spark_jobs.interactions import spark_interactions
from spark_jobs.plan import DEV_MODEL, STAGES, Plan
from spark_jobs.spark import spark_session


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage", choices=["interactions", "als"], required=True)
    parser.add_argument("--cutoff", required=True, help="ISO timestamp; events received before it")
    parser.add_argument("--work", required=True, help="the run's work directory")
    parser.add_argument("--lake", required=True)
    parser.add_argument("--models", required=True)
    parser.add_argument("--training", required=True, help="TrainingSettings as JSON")
    parser.add_argument("--spark", required=True, help="SparkSettings as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    training = TrainingSettings.model_validate_json(args.training)
    plan = Plan(datetime.fromisoformat(args.cutoff), "spark", training.eval_days, Path(args.work))
    spark = spark_session(SparkSettings.model_validate_json(args.spark), app_name=f"lambdarec-{args.stage}")
    counts: dict[str, int] = {}
    try:
        for stage in STAGES:
            if args.stage == "interactions":
                frame = spark_interactions(spark, Lake(args.lake), plan.stage_cutoff(stage), training)
                frame.write.mode("overwrite").parquet(str(plan.interactions_dir(stage)))
            else:
                frame = spark.read.parquet(str(plan.interactions_dir(stage)))
                factors = fit_spark(spark, frame, training)
                registry, version = (
                    (Registry(str(plan.dev_registry)), DEV_MODEL) if stage == "dev" else (Registry(args.models), plan.version)
                )
                save_factors(
                    registry, version, factors.user_ids, factors.user_factors, factors.item_ids, factors.item_factors,
                    top_items=training.top_items_kept,
                )
                counts[f"{stage}_users"], counts[f"{stage}_items"] = len(factors.user_ids), len(factors.item_ids)
    finally:
        spark.stop()
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
