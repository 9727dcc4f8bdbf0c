-- Every served recommendation list, and the same lists exploded to one row per shown item.
CREATE OR REPLACE VIEW impressions AS
SELECT
    request_id,
    served_at,
    dt,
    utc_day(served_at) AS served_day,
    person_id,
    user_id,
    anonymous_id,
    session_id,
    context,
    variant,
    model_version,
    degraded,
    items,
    scores,
    sources,
    len(items) AS list_length
FROM lake_impressions;

-- position is 1-based: the first item shown has position 1.
CREATE OR REPLACE VIEW impression_items AS
SELECT
    request_id,
    served_at,
    served_day,
    person_id,
    context,
    variant,
    model_version,
    degraded,
    position,
    items[position] AS item_id,
    scores[position] AS score,
    sources[position] AS source
FROM (SELECT *, generate_subscripts(items, 1) AS position FROM impressions);
