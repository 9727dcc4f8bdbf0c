-- Every model version in the registry: one row per (version, strategy, metric) of its offline
-- evaluation, with the gate's status and decision; a version without metrics has one row with
-- strategy and metric NULL. is_current marks the version models/CURRENT points at.
-- Read live from the manifest.json files, so a new version shows without a rebuild.
CREATE OR REPLACE VIEW model_runs AS
WITH strategies AS (
    SELECT version, unnest(map_entries(metrics)) AS s FROM registry_manifests
),
metric_values AS (
    SELECT version, s.key AS strategy, unnest(map_entries(s.value)) AS m FROM strategies
)
SELECT
    r.version,
    r.created_at,
    r.cutoff,
    r.engine,
    r.status,
    r.decision,
    r.version IN (SELECT version FROM registry_current) AS is_current,
    mv.strategy,
    mv.m.key AS metric,
    mv.m.value AS value,
    r.parameters,
    r.counts
FROM registry_manifests AS r
LEFT JOIN metric_values AS mv USING (version)
ORDER BY r.created_at, r.version, mv.strategy, metric;
