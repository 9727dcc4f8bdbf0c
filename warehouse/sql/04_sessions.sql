-- Sessions: a person's events in event-time order; a gap of more than 30 minutes starts a new
-- session (a gap of exactly 30 minutes does not). Built from ts, not the client's session_id,
-- so every source of events (tracker, importer, generator) is sessionised the same way.
-- A session's day, device and country are those of its first event.
CREATE OR REPLACE VIEW sessions AS
WITH marked AS (
    SELECT
        person_id,
        event_id,
        ts,
        event_type,
        device,
        country,
        CASE WHEN event_type = 'purchase' THEN price * coalesce(quantity, 1) END AS purchase_value,
        CASE
            WHEN lag(ts) OVER by_person IS NULL THEN 1
            WHEN ts - lag(ts) OVER by_person > INTERVAL 30 MINUTE THEN 1
            ELSE 0
        END AS opens_session
    FROM events
    WINDOW by_person AS (PARTITION BY person_id ORDER BY ts, event_id)
),
numbered AS (
    SELECT
        *,
        sum(opens_session) OVER (PARTITION BY person_id ORDER BY ts, event_id ROWS UNBOUNDED PRECEDING)
            AS session_number
    FROM marked
)
SELECT
    person_id || '#' || session_number AS session_key,
    person_id,
    CAST(session_number AS INTEGER) AS session_number,
    min(ts) AS started_at,
    max(ts) AS ended_at,
    utc_day(min(ts)) AS day,
    epoch(max(ts) - min(ts)) AS duration_s,
    arg_min(device, ts) AS device,
    arg_min(country, ts) AS country,
    count(*) AS events,
    count(*) FILTER (WHERE event_type = 'view') AS views,
    count(*) FILTER (WHERE event_type = 'add_to_cart') AS add_to_carts,
    count(*) FILTER (WHERE event_type = 'purchase') AS purchases,
    coalesce(sum(purchase_value), 0) AS revenue
FROM numbered
GROUP BY person_id, session_number;
