-- The A/B test per variant. Units: ctr = lists with at least one click / lists served;
-- conversion = users with at least one attributed purchase / users served. Both carry Wilson
-- score 95% intervals (see 00_macros.sql). Lift = rate / control's rate - 1, against the
-- control variant named in settings (experiments.control, stored in warehouse_info at build).
-- The difference to control has a 95% normal-approximation (unpooled) interval: an interval
-- that excludes 0 marks a significant difference. Lists of one user are not independent, so
-- the CTR interval is somewhat too narrow when users see many lists.
CREATE OR REPLACE VIEW experiment_results AS
WITH lists AS (
    SELECT
        request_id,
        variant,
        any_value(person_id) AS person_id,
        bool_or(clicked) AS clicked,
        sum(attributed_purchases) > 0 AS purchased
    FROM recommendation_items
    GROUP BY request_id, variant
),
users AS (
    SELECT variant, person_id, bool_or(purchased) AS purchased
    FROM lists
    GROUP BY variant, person_id
),
per_variant AS (
    SELECT
        l.variant,
        u.users,
        u.converted_users,
        count(*) AS lists,
        count(*) FILTER (WHERE l.clicked) AS clicked_lists
    FROM lists AS l
    JOIN (
        SELECT variant, count(*) AS users, count(*) FILTER (WHERE purchased) AS converted_users
        FROM users GROUP BY variant
    ) AS u USING (variant)
    GROUP BY l.variant, u.users, u.converted_users
),
rates AS (
    SELECT
        *,
        safe_ratio(clicked_lists, lists) AS ctr,
        safe_ratio(converted_users, users) AS conversion,
        variant = (SELECT control_variant FROM warehouse_info) AS is_control
    FROM per_variant
),
control AS (
    SELECT ctr AS c_ctr, lists AS c_lists, conversion AS c_conv, users AS c_users FROM rates WHERE is_control
)
SELECT
    variant,
    is_control,
    users,
    lists,
    clicked_lists,
    ctr,
    wilson_low(clicked_lists, lists) AS ctr_low,
    wilson_high(clicked_lists, lists) AS ctr_high,
    converted_users,
    conversion,
    wilson_low(converted_users, users) AS conversion_low,
    wilson_high(converted_users, users) AS conversion_high,
    safe_ratio(ctr, c_ctr) - 1 AS ctr_lift,
    ctr - c_ctr - z95() * sqrt(ctr * (1 - ctr) / lists + c_ctr * (1 - c_ctr) / c_lists) AS ctr_diff_low,
    ctr - c_ctr + z95() * sqrt(ctr * (1 - ctr) / lists + c_ctr * (1 - c_ctr) / c_lists) AS ctr_diff_high,
    safe_ratio(conversion, c_conv) - 1 AS conversion_lift,
    conversion - c_conv - z95() * sqrt(conversion * (1 - conversion) / users + c_conv * (1 - c_conv) / c_users)
        AS conversion_diff_low,
    conversion - c_conv + z95() * sqrt(conversion * (1 - conversion) / users + c_conv * (1 - c_conv) / c_users)
        AS conversion_diff_high
FROM rates
LEFT JOIN control ON true
ORDER BY is_control DESC, variant;
