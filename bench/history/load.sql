-- 1,000 users with a USD account each; 500,000 settled transfers of 0.01 between them,
-- one every 30 s of 2026 (times grow with ids, as settlement writes them); account of
-- user 'load1' takes part in a fifth of them. Two postings per transfer: 1,000,000.
-- Nobody is funded, so balance_after goes negative: the load is for plans, not audits.
INSERT INTO users (username, password_hash)
SELECT 'load' || g, 'x' FROM generate_series(1, 1000) g;
INSERT INTO accounts (user_id, currency, balance)
SELECT id, 'USD', 0 FROM users WHERE username LIKE 'load%';
CREATE TEMP TABLE acct AS
SELECT row_number() OVER (ORDER BY id) AS n, id, user_id FROM accounts
WHERE user_id IN (SELECT id FROM users WHERE username LIKE 'load%');
CREATE TEMP TABLE plan AS
SELECT g AS n,
       CASE WHEN g % 5 = 0 THEN 1 ELSE 2 + (hashint4(g) & 1023) % 999 END AS a_from,
       2 + (hashint4(g + 7777777) & 1023) % 998 AS a_to0,
       timestamptz '2026-01-01 00:00:00+00' + g * interval '30 seconds' AS at
FROM generate_series(1, 500000) g;
-- distinct accounts: shift the payee past the payer when they collide
UPDATE plan SET a_to0 = CASE WHEN a_to0 >= a_from THEN a_to0 + 1 ELSE a_to0 END;
UPDATE plan SET a_to0 = 1 WHERE a_to0 > 1000;
UPDATE plan SET a_to0 = CASE WHEN a_to0 = a_from THEN 3 ELSE a_to0 END;
INSERT INTO transfers (id, status, from_account_id, to_account_id, from_user_id, to_user_id,
                       currency, amount, commission, requested_by, created_at, settled_at, attempts)

SELECT 1000000 + p.n, 'settled', f.id, t.id, f.user_id, t.user_id, 'USD', 1, 0, f.user_id,
       p.at, p.at, 1
FROM plan p JOIN acct f ON f.n = p.a_from JOIN acct t ON t.n = p.a_to0;
INSERT INTO postings (transfer_id, account_id, leg, amount, balance_after, created_at)
SELECT transfer_id, account_id, leg, amount,
       sum(amount) OVER (PARTITION BY account_id ORDER BY transfer_id, leg) , created_at
FROM (
  SELECT id AS transfer_id, from_account_id AS account_id, 'debit' AS leg, -1 AS amount, created_at
  FROM transfers WHERE id > 1000000
  UNION ALL
  SELECT id, to_account_id, 'credit', 1, created_at FROM transfers WHERE id > 1000000
) legs
ORDER BY transfer_id, leg;
VACUUM ANALYZE postings;
VACUUM ANALYZE transfers;
