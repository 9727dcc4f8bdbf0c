-- The bandit's arms over time (experiments.mode = bandit: serving/core/experiments.py, common/bandit.py),
-- rebuilt from the lake: per day, context and variant (arm), the lists served, those clicked (a click
-- or view of a shown item carrying the list's request_id, as recommendation_items attributes it) and
-- those whose click was followed by a purchase of the same person in the same session (the second
-- reward); then each arm's Beta posteriors at the day's end, summed from its first day with the
-- bandit's uniform prior: alpha = 1 + rewarded lists, beta = 1 + lists − rewarded lists. share: the
-- arm's part of the context's lists that day. The live posteriors in Redis count the same rewards
-- for the current arm set only (its version), and also lists whose person gave no analytics consent.
CREATE OR REPLACE VIEW bandit_arms AS
WITH lists AS (
    SELECT
        request_id,
        any_value(served_day) AS day,
        any_value(coalesce(context, 'unknown')) AS context,
        any_value(variant) AS arm,
        any_value(person_id) AS person_id,
        min(clicked_at) AS clicked_at
    FROM recommendation_items
    GROUP BY request_id
),
sessions_of AS (
    SELECT request_id, any_value(session_id) AS session_id FROM impressions GROUP BY request_id
),
bought AS (
    SELECT DISTINCT l.request_id
    FROM lists AS l
    JOIN sessions_of AS s USING (request_id)
    JOIN events AS e
        ON e.event_type = 'purchase' AND e.person_id = l.person_id
        AND e.session_id IS NOT DISTINCT FROM s.session_id AND e.ts >= l.clicked_at
),
daily AS (
    SELECT
        l.day,
        l.context,
        l.arm,
        count(*) AS lists,
        count(l.clicked_at) AS clicked_lists,
        count(b.request_id) AS purchase_lists
    FROM lists AS l
    LEFT JOIN bought AS b USING (request_id)
    GROUP BY ALL
),
summed AS (
    SELECT
        *,
        safe_ratio(lists, sum(lists) OVER (PARTITION BY day, context)) AS share,
        1 + sum(clicked_lists) OVER to_date AS click_alpha,
        1 + sum(lists - clicked_lists) OVER to_date AS click_beta,
        1 + sum(purchase_lists) OVER to_date AS purchase_alpha,
        1 + sum(lists - purchase_lists) OVER to_date AS purchase_beta
    FROM daily
    WINDOW to_date AS (PARTITION BY context, arm ORDER BY day ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
)
SELECT
    day,
    context,
    arm,
    lists,
    clicked_lists,
    purchase_lists,
    share,
    CAST(click_alpha AS DOUBLE) AS click_alpha,
    CAST(click_beta AS DOUBLE) AS click_beta,
    click_alpha / (click_alpha + click_beta) AS click_mean,
    CAST(purchase_alpha AS DOUBLE) AS purchase_alpha,
    CAST(purchase_beta AS DOUBLE) AS purchase_beta,
    purchase_alpha / (purchase_alpha + purchase_beta) AS purchase_mean
FROM summed
ORDER BY day, context, arm;
