-- Every event in the lake, with the context struct flattened and the person resolved.
-- person_id = user_id once known, else the device's anonymous_id (as serving keys it).
CREATE OR REPLACE VIEW events AS
SELECT
    event_id,
    event_type,
    ts,
    received_at,
    dt,
    utc_day(ts) AS event_day,
    anonymous_id,
    user_id,
    coalesce(user_id, anonymous_id) AS person_id,
    session_id,
    item_id,
    quantity,
    price,
    dwell_ms,
    scroll_depth,
    query,
    context.device AS device,
    context.country AS country,
    context.referrer AS referrer,
    context.page AS page,
    context.extra AS context_extra,
    rec_request_id,
    schema_version
FROM lake_events;
