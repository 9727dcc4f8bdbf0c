"""ALS on implicit feedback, two engines with one output: Spark MLlib (cluster) and `implicit` (one machine).

Both take the interactions (person_id, item_id, value r) and give `Factors` whose rows follow
sorted id lists, so `common.model.save_factors` writes the same artifacts whichever engine ran.
Confidence is c = 1 + alpha*r in both (see DESIGN.md, "Conventions differ between libraries").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.settings import TrainingSettings

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

ENGINES = ("spark", "implicit")


@dataclass
class Factors:
    user_ids: list[str]
    user_factors: np.ndarray  # float32, users x k
    item_ids: list[str]
    item_factors: np.ndarray  # float32, items x k


def fit_implicit(interactions: pa.Table, training: TrainingSettings) -> Factors:
    """Fit with `implicit` (CPU, conjugate gradient), the single-machine engine."""
    from implicit.cpu.als import AlternatingLeastSquares
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_limits

    user_ids, users = _codes(interactions["person_id"])
    item_ids, items = _codes(interactions["item_id"])
    values = interactions["value"].to_numpy().astype(np.float64)
    # implicit uses c = alpha*r; feeding r + 1/alpha gives Spark's c = 1 + alpha*r.
    matrix = csr_matrix((values + 1.0 / training.alpha, (users, items)), shape=(len(user_ids), len(item_ids)))
    # implicit parallelises itself; a BLAS thread pool on top of it only contends (implicit warns).
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=training.factors,
            regularization=training.regularization,
            alpha=training.alpha,
            iterations=training.iterations,
            random_state=training.seed,
        )
        model.fit(matrix.astype(np.float32), show_progress=False)
    return Factors(user_ids, np.asarray(model.user_factors), item_ids, np.asarray(model.item_factors))


def fit_spark(spark: SparkSession, interactions: DataFrame, training: TrainingSettings) -> Factors:
    """Fit with Spark MLlib ALS (implicitPrefs; lambda scaled per user and item count, ALS-WR)."""
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    interactions = interactions.cache()
    user_ids = sorted(r[0] for r in interactions.select("person_id").distinct().collect())
    item_ids = sorted(r[0] for r in interactions.select("item_id").distinct().collect())
    user_map = spark.createDataFrame(list(enumerate(user_ids)), "uid int, person_id string")
    item_map = spark.createDataFrame(list(enumerate(item_ids)), "iid int, item_id string")
    ratings = interactions.join(F.broadcast(user_map), "person_id").join(F.broadcast(item_map), "item_id")
    als = ALS(
        rank=training.factors,
        maxIter=training.iterations,
        regParam=training.regularization,
        alpha=training.alpha,
        implicitPrefs=True,
        seed=training.seed,
        userCol="uid",
        itemCol="iid",
        ratingCol="value",
        coldStartStrategy="drop",
        # One block per core: MLlib's default of 10 blocks is for clusters and only adds tasks on a laptop.
        numUserBlocks=max(2, spark.sparkContext.defaultParallelism),
        numItemBlocks=max(2, spark.sparkContext.defaultParallelism),
    )
    model = als.fit(ratings.select("uid", "iid", "value"))
    user_factors = _dense(model.userFactors.collect(), len(user_ids), training.factors)
    item_factors = _dense(model.itemFactors.collect(), len(item_ids), training.factors)
    interactions.unpersist()
    return Factors(user_ids, user_factors, item_ids, item_factors)


def _codes(column: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """Sorted distinct ids and each row's index into them."""
    ids = sorted(pc.unique(column).to_pylist())
    index = pc.index_in(column, value_set=pa.array(ids, pa.string())).to_numpy()
    return ids, index.astype(np.int64)


def _dense(rows: list, n: int, k: int) -> np.ndarray:
    out = np.zeros((n, k), dtype=np.float32)
    for row in rows:
        out[row["id"]] = row["features"]
    return out
