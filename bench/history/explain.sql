SELECT count(*) AS postings FROM postings;
SELECT account_id, count(*) FROM postings GROUP BY 1 ORDER BY 2 DESC LIMIT 2;
SELECT id AS hot_account FROM accounts WHERE user_id = (SELECT id FROM users WHERE username = 'load1') \gset
PREPARE balance_at(bigint, timestamptz) AS
SELECT CAST($2 AS timestamptz) > statement_timestamp(),
 (SELECT balance_after FROM postings WHERE account_id = $1
  AND created_at <= CAST($2 AS timestamptz) ORDER BY created_at DESC, id DESC LIMIT 1);
EXPLAIN (ANALYZE, BUFFERS) EXECUTE balance_at(:hot_account, '2026-04-15T12:00:00Z');
EXPLAIN (ANALYZE, BUFFERS) EXECUTE balance_at(:hot_account, '2025-12-31T00:00:00Z');
EXPLAIN (ANALYZE, BUFFERS) EXECUTE balance_at(:hot_account, '2026-12-01T00:00:00Z');
EXECUTE balance_at(:hot_account, '2026-04-15T12:00:00Z');
SELECT pg_size_pretty(pg_relation_size('ix_postings_account_id_created_at_id')) AS new_index,
       pg_size_pretty(pg_relation_size('ix_postings_account_id_id')) AS listing_index,
       pg_size_pretty(pg_relation_size('postings')) AS heap;
-- The same with the plan psycopg's prepared statements settle on after five runs.
SET plan_cache_mode = force_generic_plan;
EXPLAIN (ANALYZE, BUFFERS) EXECUTE balance_at(:hot_account, '2026-04-15T12:00:00Z');
RESET plan_cache_mode;
-- Without the index: what the query costs on the statement's (account_id, id) index.
BEGIN;
DROP INDEX ix_postings_account_id_created_at_id;
EXPLAIN (ANALYZE, BUFFERS) EXECUTE balance_at(:hot_account, '2026-04-15T12:00:00Z');
ROLLBACK;
