-- Budgets and spend per user and period, as the detectors' ledger has them:
-- the limit in force and the spend so far (exact micro-dollars), in the
-- budget time zone of the config. Written in each batch's transaction for
-- the users the batch touched; the values are the ledger's, not increments,
-- so a replayed batch writes the same row again.

CREATE TABLE budget_periods (
    user_id       text        NOT NULL,
    period        text        NOT NULL CHECK (period IN ('day', 'month')),
    period_start  timestamptz NOT NULL,
    limit_micros  bigint      NOT NULL,
    spent_micros  bigint      NOT NULL,
    tokens        bigint      NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, period, period_start)
);
CREATE INDEX budget_periods_start ON budget_periods (period, period_start);

COMMENT ON TABLE budget_periods IS
    'Each user''s budget and spend per period (calendar day, and month when a monthly budget applies, in the configured budget time zone), from the detectors'' ledger: the numbers the budget alerts fire on.';
COMMENT ON COLUMN budget_periods.user_id IS 'The account.';
COMMENT ON COLUMN budget_periods.period IS 'day or month.';
COMMENT ON COLUMN budget_periods.period_start IS 'Start of the period.';
COMMENT ON COLUMN budget_periods.limit_micros IS 'The budget in force, in millionths of a US dollar.';
COMMENT ON COLUMN budget_periods.spent_micros IS 'Spend so far in the period, in millionths of a US dollar.';
COMMENT ON COLUMN budget_periods.tokens IS 'Tokens so far in the period (input plus output).';
COMMENT ON COLUMN budget_periods.updated_at IS 'When a batch last wrote the row.';

CREATE VIEW budget_status AS
SELECT user_id,
       period,
       period_start,
       (limit_micros::numeric / 1000000)::numeric(20, 6)              AS limit_usd,
       (spent_micros::numeric / 1000000)::numeric(20, 6)              AS spent_usd,
       round(100.0 * spent_micros / nullif(limit_micros, 0), 1)       AS percent,
       tokens
FROM budget_periods;

COMMENT ON VIEW budget_status IS 'budget_periods in dollars with the percent of the budget spent: who is near 80 or 100%.';
COMMENT ON COLUMN budget_status.user_id IS 'The account.';
COMMENT ON COLUMN budget_status.period IS 'day or month.';
COMMENT ON COLUMN budget_status.period_start IS 'Start of the period.';
COMMENT ON COLUMN budget_status.limit_usd IS 'The budget in US dollars.';
COMMENT ON COLUMN budget_status.spent_usd IS 'Spend so far in US dollars.';
COMMENT ON COLUMN budget_status.percent IS 'Spend as a percent of the budget.';
COMMENT ON COLUMN budget_status.tokens IS 'Tokens so far in the period.';
