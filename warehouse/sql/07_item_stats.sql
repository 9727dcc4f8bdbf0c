-- Per item: views, carts, purchases, units, revenue, conversion (purchase events per view) and
-- a 7-day trend. The trend is measured back from the newest event in the lake, not from now(),
-- so it reads the same on a replayed or imported lake:
-- trend = views in the last 7 days / views in the 7 days before - 1 (NULL when there were none).
CREATE OR REPLACE VIEW item_stats AS
WITH latest AS (
    SELECT max(ts) AS newest FROM events
),
per_item AS (
    SELECT
        item_id,
        count(*) FILTER (WHERE event_type = 'view') AS views,
        count(*) FILTER (WHERE event_type = 'add_to_cart') AS add_to_carts,
        count(*) FILTER (WHERE event_type = 'purchase') AS purchases,
        coalesce(sum(coalesce(quantity, 1)) FILTER (WHERE event_type = 'purchase'), 0) AS units,
        coalesce(sum(price * coalesce(quantity, 1)) FILTER (WHERE event_type = 'purchase'), 0) AS revenue,
        count(DISTINCT person_id) AS people,
        count(*) FILTER (WHERE event_type = 'view' AND ts > newest - INTERVAL 7 DAY) AS views_last_7d,
        count(*) FILTER (
            WHERE event_type = 'view' AND ts <= newest - INTERVAL 7 DAY AND ts > newest - INTERVAL 14 DAY
        ) AS views_prior_7d
    FROM events, latest
    WHERE item_id IS NOT NULL
    GROUP BY item_id
)
SELECT
    p.item_id,
    c.title,
    c.category,
    c.brand,
    c.price AS catalog_price,
    p.views,
    p.add_to_carts,
    p.purchases,
    p.units,
    p.revenue,
    p.people,
    safe_ratio(p.purchases, p.views) AS conversion,
    p.views_last_7d,
    p.views_prior_7d,
    safe_ratio(p.views_last_7d, p.views_prior_7d) - 1 AS trend
FROM per_item AS p
LEFT JOIN catalog AS c USING (item_id);
