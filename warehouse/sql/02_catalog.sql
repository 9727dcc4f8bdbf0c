-- The item catalog as of its newest snapshot (each snapshot is a full copy).
CREATE OR REPLACE VIEW catalog AS
SELECT
    item_id,
    title,
    category_path,
    category,
    brand,
    price,
    in_stock,
    promoted,
    created_at,
    snapshot
FROM lake_catalog
WHERE snapshot = (SELECT max(snapshot) FROM lake_catalog);
