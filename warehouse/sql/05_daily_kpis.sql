-- Daily KPIs, each counted on the UTC day its session started (a session over midnight counts
-- once, on its first day). An order is a session with at least one purchase, so
-- conversion_rate = orders / sessions and aov = revenue / orders.
-- Revenue = sum(price * quantity) of purchase events (quantity missing counts as 1).
CREATE OR REPLACE VIEW daily_kpis AS
SELECT
    day,
    count(DISTINCT person_id) AS active_users,
    count(*) AS sessions,
    sum(views) AS views,
    sum(add_to_carts) AS add_to_carts,
    sum(purchases) AS purchases,
    count(*) FILTER (WHERE add_to_carts > 0) AS sessions_with_cart,
    count(*) FILTER (WHERE purchases > 0) AS orders,
    safe_ratio(count(*) FILTER (WHERE add_to_carts > 0), count(*)) AS add_to_cart_rate,
    safe_ratio(count(*) FILTER (WHERE purchases > 0), count(*)) AS conversion_rate,
    sum(revenue) AS revenue,
    safe_ratio(sum(revenue), count(*) FILTER (WHERE purchases > 0)) AS aov
FROM sessions
GROUP BY day
ORDER BY day;
