-- Session funnel view -> cart -> purchase by day, device and country. A session reaches a
-- step if it has an event of that step or of a later one (a purchase implies the item was in
-- a cart and seen), so the steps always nest even when a source logs no views (an import of
-- orders only).
CREATE OR REPLACE VIEW funnel AS
SELECT
    day,
    coalesce(device, 'unknown') AS device,
    coalesce(country, 'unknown') AS country,
    count(*) AS sessions,
    count(*) FILTER (WHERE views + add_to_carts + purchases > 0) AS viewed,
    count(*) FILTER (WHERE add_to_carts + purchases > 0) AS carted,
    count(*) FILTER (WHERE purchases > 0) AS purchased,
    safe_ratio(count(*) FILTER (WHERE add_to_carts + purchases > 0),
               count(*) FILTER (WHERE views + add_to_carts + purchases > 0)) AS view_to_cart,
    safe_ratio(count(*) FILTER (WHERE purchases > 0),
               count(*) FILTER (WHERE add_to_carts + purchases > 0)) AS cart_to_purchase,
    safe_ratio(count(*) FILTER (WHERE purchases > 0),
               count(*) FILTER (WHERE views + add_to_carts + purchases > 0)) AS view_to_purchase
FROM sessions
GROUP BY ALL
ORDER BY day, device, country;
