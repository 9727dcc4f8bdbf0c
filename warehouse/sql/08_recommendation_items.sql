-- One row per shown item of every served list, with its click and what the click led to.
--
-- Attribution rule:
-- * A click is an event of type click or view whose rec_request_id is the list's request_id,
--   on an item of that list. Repeated clicks on the same item of the same list count once,
--   at the first one's time.
-- * An add_to_cart or purchase of the same item by the same person (user_id, else
--   anonymous_id) within 24 hours after a click is credited to that click. When several
--   clicks qualify, the latest one before the conversion takes it (last click), so no
--   conversion is ever credited twice. Attributed revenue = price * quantity (quantity
--   missing counts as 1).
CREATE OR REPLACE VIEW recommendation_items AS
WITH clicks AS (
    SELECT
        e.rec_request_id AS request_id,
        e.item_id,
        arg_min(e.person_id, e.ts) AS person_id,
        min(e.ts) AS clicked_at
    FROM events AS e
    WHERE e.rec_request_id IS NOT NULL AND e.event_type IN ('click', 'view') AND e.item_id IS NOT NULL
    GROUP BY e.rec_request_id, e.item_id
),
served_clicks AS (
    -- Only clicks on an item that the list really showed.
    SELECT c.*
    FROM clicks AS c
    SEMI JOIN impression_items AS i ON i.request_id = c.request_id AND i.item_id = c.item_id
),
conversions AS (
    SELECT person_id, item_id, ts, event_type, price * coalesce(quantity, 1) AS value
    FROM events
    WHERE event_type IN ('add_to_cart', 'purchase') AND item_id IS NOT NULL
),
credited AS (
    SELECT
        k.request_id,
        k.item_id,
        count(*) FILTER (WHERE v.event_type = 'add_to_cart') AS add_to_carts,
        count(*) FILTER (WHERE v.event_type = 'purchase') AS purchases,
        coalesce(sum(v.value) FILTER (WHERE v.event_type = 'purchase'), 0) AS revenue
    FROM conversions AS v
    ASOF JOIN served_clicks AS k
        ON v.person_id = k.person_id AND v.item_id = k.item_id AND v.ts >= k.clicked_at
    WHERE v.ts < k.clicked_at + INTERVAL 24 HOUR
    GROUP BY k.request_id, k.item_id
)
SELECT
    i.*,
    k.clicked_at,
    k.clicked_at IS NOT NULL AS clicked,
    coalesce(a.add_to_carts, 0) AS attributed_add_to_carts,
    coalesce(a.purchases, 0) AS attributed_purchases,
    coalesce(a.revenue, 0) AS attributed_revenue
FROM impression_items AS i
LEFT JOIN served_clicks AS k USING (request_id, item_id)
LEFT JOIN credited AS a USING (request_id, item_id);
