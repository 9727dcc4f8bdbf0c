-- Served recommendations by day, variant, model version, context and position (1-based).
-- impressions counts shown items; ctr = clicked items / shown items at that grain; the
-- attributed figures follow the rule in recommendation_items. Every measure is additive, so
-- sum over any columns to roll up (CTR then = sum(clicks) / sum(impressions)).
CREATE OR REPLACE VIEW recommendation_performance AS
SELECT
    served_day AS day,
    variant,
    coalesce(model_version, 'none') AS model_version,
    coalesce(context, 'unknown') AS context,
    position,
    count(*) AS impressions,
    count(DISTINCT request_id) AS lists,
    count(*) FILTER (WHERE clicked) AS clicks,
    safe_ratio(count(*) FILTER (WHERE clicked), count(*)) AS ctr,
    sum(attributed_add_to_carts) AS attributed_add_to_carts,
    sum(attributed_purchases) AS attributed_purchases,
    sum(attributed_revenue) AS attributed_revenue
FROM recommendation_items
GROUP BY ALL
ORDER BY day, variant, model_version, context, position;
