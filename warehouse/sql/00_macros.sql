-- Shared helpers: the UTC day of a timestamp, and the Wilson score interval of a proportion.
-- Wilson rather than the normal approximation: it stays inside [0, 1] and behaves for small
-- counts and rates near 0, which is where recommendation CTRs live.
CREATE OR REPLACE MACRO utc_day(t) AS CAST(timezone('UTC', t) AS DATE);

CREATE OR REPLACE MACRO safe_ratio(num, den) AS
    CASE WHEN den IS NULL OR den = 0 THEN NULL ELSE CAST(num AS DOUBLE) / den END;

-- z for a two-sided 95% interval (scipy.stats.norm.ppf(0.975)).
CREATE OR REPLACE MACRO z95() AS 1.959963984540054;

CREATE OR REPLACE MACRO wilson_low(k, n) AS
    CASE WHEN n IS NULL OR n = 0 THEN NULL ELSE
        (CAST(k AS DOUBLE) / n + z95() ^ 2 / (2 * n)
         - z95() * sqrt((CAST(k AS DOUBLE) / n) * (1 - CAST(k AS DOUBLE) / n) / n + z95() ^ 2 / (4 * n ^ 2)))
        / (1 + z95() ^ 2 / n)
    END;

CREATE OR REPLACE MACRO wilson_high(k, n) AS
    CASE WHEN n IS NULL OR n = 0 THEN NULL ELSE
        (CAST(k AS DOUBLE) / n + z95() ^ 2 / (2 * n)
         + z95() * sqrt((CAST(k AS DOUBLE) / n) * (1 - CAST(k AS DOUBLE) / n) / n + z95() ^ 2 / (4 * n ^ 2)))
        / (1 + z95() ^ 2 / n)
    END;
