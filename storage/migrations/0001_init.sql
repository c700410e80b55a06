-- keywatch schema, version 1: rollups, alerts, revocation actions, the alert
-- outbox, engine checkpoints and Kafka offsets. Every table, view and column
-- is described with COMMENT ON so that `\d+` and Grafana users see what it
-- holds. Times are timestamptz; day and month buckets in the views are UTC.

-- Rollups ------------------------------------------------------------------

CREATE TABLE rollup_minute (
    user_id           text        NOT NULL,
    key_id            text        NOT NULL,
    minute            timestamptz NOT NULL,
    requests          bigint      NOT NULL DEFAULT 0,
    prompt_tokens     bigint      NOT NULL DEFAULT 0,
    completion_tokens bigint      NOT NULL DEFAULT 0,
    cost_micros       bigint      NOT NULL DEFAULT 0,
    cost_usd          numeric(20, 6) GENERATED ALWAYS AS (cost_micros::numeric / 1000000) STORED,
    errors            bigint      NOT NULL DEFAULT 0,
    latency_sum_ms    bigint      NOT NULL DEFAULT 0,
    latency_max_ms    bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, key_id, minute)
);
-- "Top spenders today" and every time-range scan start from the minute.
CREATE INDEX rollup_minute_minute_user ON rollup_minute (minute, user_id);

COMMENT ON TABLE rollup_minute IS
    'Traffic per user, key and minute (UTC), added to by every committed batch (additive upsert). Replays cannot double count: a batch''s rows are written in the same transaction as its Kafka offsets.';
COMMENT ON COLUMN rollup_minute.user_id IS 'The account.';
COMMENT ON COLUMN rollup_minute.key_id IS 'The API key id (kh_ + keyed hash when the gateway logged a raw key; never the raw key).';
COMMENT ON COLUMN rollup_minute.minute IS 'Start of the minute, by event time.';
COMMENT ON COLUMN rollup_minute.requests IS 'Requests counted in the minute (a request or exchange record counts one; a response record none).';
COMMENT ON COLUMN rollup_minute.prompt_tokens IS 'Input tokens.';
COMMENT ON COLUMN rollup_minute.completion_tokens IS 'Output tokens.';
COMMENT ON COLUMN rollup_minute.cost_micros IS 'Spend in millionths of a US dollar (exact integer sum).';
COMMENT ON COLUMN rollup_minute.cost_usd IS 'Spend in US dollars: cost_micros / 1e6 (generated).';
COMMENT ON COLUMN rollup_minute.errors IS 'Responses with an error status (4xx/5xx).';
COMMENT ON COLUMN rollup_minute.latency_sum_ms IS 'Sum of response latencies in milliseconds (divide by the responses that carried one for a mean).';
COMMENT ON COLUMN rollup_minute.latency_max_ms IS 'Largest response latency in milliseconds.';

CREATE VIEW rollup_hour AS
SELECT user_id,
       key_id,
       date_trunc('hour', minute, 'UTC')                   AS hour,
       sum(requests)::bigint                               AS requests,
       sum(prompt_tokens)::bigint                          AS prompt_tokens,
       sum(completion_tokens)::bigint                      AS completion_tokens,
       sum(cost_micros)::bigint                            AS cost_micros,
       (sum(cost_micros) / 1000000)::numeric(20, 6)        AS cost_usd,
       sum(errors)::bigint                                 AS errors,
       sum(latency_sum_ms)::bigint                         AS latency_sum_ms,
       max(latency_max_ms)                                 AS latency_max_ms
FROM rollup_minute
GROUP BY user_id, key_id, date_trunc('hour', minute, 'UTC');

COMMENT ON VIEW rollup_hour IS 'rollup_minute summed per user, key and UTC hour. For ranges over a large table, filter rollup_minute.minute directly: a filter on hour cannot use the index.';
COMMENT ON COLUMN rollup_hour.user_id IS 'The account.';
COMMENT ON COLUMN rollup_hour.key_id IS 'The API key id.';
COMMENT ON COLUMN rollup_hour.hour IS 'Start of the UTC hour.';
COMMENT ON COLUMN rollup_hour.requests IS 'Requests.';
COMMENT ON COLUMN rollup_hour.prompt_tokens IS 'Input tokens.';
COMMENT ON COLUMN rollup_hour.completion_tokens IS 'Output tokens.';
COMMENT ON COLUMN rollup_hour.cost_micros IS 'Spend in millionths of a US dollar.';
COMMENT ON COLUMN rollup_hour.cost_usd IS 'Spend in US dollars.';
COMMENT ON COLUMN rollup_hour.errors IS 'Responses with an error status.';
COMMENT ON COLUMN rollup_hour.latency_sum_ms IS 'Sum of response latencies in milliseconds.';
COMMENT ON COLUMN rollup_hour.latency_max_ms IS 'Largest response latency in milliseconds.';

CREATE VIEW rollup_day AS
SELECT user_id,
       key_id,
       (minute AT TIME ZONE 'UTC')::date                   AS day,
       sum(requests)::bigint                               AS requests,
       sum(prompt_tokens)::bigint                          AS prompt_tokens,
       sum(completion_tokens)::bigint                      AS completion_tokens,
       sum(cost_micros)::bigint                            AS cost_micros,
       (sum(cost_micros) / 1000000)::numeric(20, 6)        AS cost_usd,
       sum(errors)::bigint                                 AS errors,
       sum(latency_sum_ms)::bigint                         AS latency_sum_ms,
       max(latency_max_ms)                                 AS latency_max_ms
FROM rollup_minute
GROUP BY user_id, key_id, (minute AT TIME ZONE 'UTC')::date;

COMMENT ON VIEW rollup_day IS 'rollup_minute summed per user, key and UTC day. For ranges over a large table, filter rollup_minute.minute directly: a filter on day cannot use the index.';
COMMENT ON COLUMN rollup_day.user_id IS 'The account.';
COMMENT ON COLUMN rollup_day.key_id IS 'The API key id.';
COMMENT ON COLUMN rollup_day.day IS 'The UTC date.';
COMMENT ON COLUMN rollup_day.requests IS 'Requests.';
COMMENT ON COLUMN rollup_day.prompt_tokens IS 'Input tokens.';
COMMENT ON COLUMN rollup_day.completion_tokens IS 'Output tokens.';
COMMENT ON COLUMN rollup_day.cost_micros IS 'Spend in millionths of a US dollar.';
COMMENT ON COLUMN rollup_day.cost_usd IS 'Spend in US dollars.';
COMMENT ON COLUMN rollup_day.errors IS 'Responses with an error status.';
COMMENT ON COLUMN rollup_day.latency_sum_ms IS 'Sum of response latencies in milliseconds.';
COMMENT ON COLUMN rollup_day.latency_max_ms IS 'Largest response latency in milliseconds.';

CREATE VIEW spend_day AS
SELECT user_id,
       (minute AT TIME ZONE 'UTC')::date                   AS day,
       (sum(cost_micros) / 1000000)::numeric(20, 6)        AS cost_usd,
       sum(prompt_tokens)::bigint                          AS prompt_tokens,
       sum(completion_tokens)::bigint                      AS completion_tokens,
       sum(prompt_tokens + completion_tokens)::bigint      AS tokens,
       sum(requests)::bigint                               AS requests
FROM rollup_minute
GROUP BY user_id, (minute AT TIME ZONE 'UTC')::date;

COMMENT ON VIEW spend_day IS 'Spend, tokens and requests per user and UTC day, over all of the user''s keys. Budgets may use another time zone (engine.budgets); this view is UTC.';
COMMENT ON COLUMN spend_day.user_id IS 'The account.';
COMMENT ON COLUMN spend_day.day IS 'The UTC date.';
COMMENT ON COLUMN spend_day.cost_usd IS 'Spend in US dollars.';
COMMENT ON COLUMN spend_day.prompt_tokens IS 'Input tokens.';
COMMENT ON COLUMN spend_day.completion_tokens IS 'Output tokens.';
COMMENT ON COLUMN spend_day.tokens IS 'Input plus output tokens.';
COMMENT ON COLUMN spend_day.requests IS 'Requests.';

CREATE VIEW spend_month AS
SELECT user_id,
       date_trunc('month', minute AT TIME ZONE 'UTC')::date AS month,
       (sum(cost_micros) / 1000000)::numeric(20, 6)        AS cost_usd,
       sum(prompt_tokens)::bigint                          AS prompt_tokens,
       sum(completion_tokens)::bigint                      AS completion_tokens,
       sum(prompt_tokens + completion_tokens)::bigint      AS tokens,
       sum(requests)::bigint                               AS requests
FROM rollup_minute
GROUP BY user_id, date_trunc('month', minute AT TIME ZONE 'UTC')::date;

COMMENT ON VIEW spend_month IS 'Spend, tokens and requests per user and UTC calendar month, over all of the user''s keys.';
COMMENT ON COLUMN spend_month.user_id IS 'The account.';
COMMENT ON COLUMN spend_month.month IS 'First day of the UTC month.';
COMMENT ON COLUMN spend_month.cost_usd IS 'Spend in US dollars.';
COMMENT ON COLUMN spend_month.prompt_tokens IS 'Input tokens.';
COMMENT ON COLUMN spend_month.completion_tokens IS 'Output tokens.';
COMMENT ON COLUMN spend_month.tokens IS 'Input plus output tokens.';
COMMENT ON COLUMN spend_month.requests IS 'Requests.';

-- Alerts ---------------------------------------------------------------------

CREATE TABLE alerts (
    id         text             PRIMARY KEY,
    kind       text             NOT NULL,
    severity   text             NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    action     text             NOT NULL CHECK (action IN ('notify', 'throttle', 'block')),
    user_id    text             NOT NULL,
    key_id     text,
    ip         text,
    ts         timestamptz      NOT NULL,
    observed   double precision,
    baseline   double precision,
    threshold  double precision,
    budget     jsonb,
    expires_at timestamptz,
    reason     text             NOT NULL,
    alert      jsonb            NOT NULL,
    created_at timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX alerts_user_ts ON alerts (user_id, ts);
CREATE INDEX alerts_kind_ts ON alerts (kind, ts);

COMMENT ON TABLE alerts IS
    'Every detector decision, once: ids are deterministic and inserts are ON CONFLICT (id) DO NOTHING, so a replayed batch adds nothing.';
COMMENT ON COLUMN alerts.id IS 'Deterministic alert id (the same decision on the same data always gets the same id); also the webhook-id of its deliveries.';
COMMENT ON COLUMN alerts.kind IS 'The detector: budget_threshold, token_quota, request_spike, token_spike, repeated_prompt, prompt_farming, leaked_key, runaway_spend.';
COMMENT ON COLUMN alerts.severity IS 'info, warning or critical.';
COMMENT ON COLUMN alerts.action IS 'What a gateway should do: notify, throttle or block.';
COMMENT ON COLUMN alerts.user_id IS 'The account.';
COMMENT ON COLUMN alerts.key_id IS 'The key, when the subject is (or names) a key.';
COMMENT ON COLUMN alerts.ip IS 'The address, when the subject is an address.';
COMMENT ON COLUMN alerts.ts IS 'Event time of the record that made the condition true.';
COMMENT ON COLUMN alerts.observed IS 'What was seen.';
COMMENT ON COLUMN alerts.baseline IS 'What was expected.';
COMMENT ON COLUMN alerts.threshold IS 'The limit crossed.';
COMMENT ON COLUMN alerts.budget IS 'Budget details of a budget_threshold alert (period, period_start, limit_usd, spent_usd, percent), as in the contract JSON.';
COMMENT ON COLUMN alerts.expires_at IS 'When a throttle or block lapses on its own; null: until lifted (or not an enforcement).';
COMMENT ON COLUMN alerts.reason IS 'One sentence for the person on call.';
COMMENT ON COLUMN alerts.alert IS 'The alert exactly as the contract JSON (contracts/alerts-and-feed.md) that notifiers send.';
COMMENT ON COLUMN alerts.created_at IS 'When the batch holding the alert was committed.';

-- Revocation actions -----------------------------------------------------------

CREATE TABLE revocation_actions (
    seq        bigserial   PRIMARY KEY,
    key_id     text,
    user_id    text        NOT NULL,
    action     text        NOT NULL CHECK (action IN ('block', 'throttle', 'unblock')),
    reason     text        NOT NULL,
    alert_id   text        UNIQUE REFERENCES alerts (id),
    issued_at  timestamptz NOT NULL,
    expires_at timestamptz
);
CREATE INDEX revocation_actions_user ON revocation_actions (user_id, issued_at);

COMMENT ON TABLE revocation_actions IS
    'The feed gateways poll: one row per throttle or block alert (written in the alert''s batch transaction) and per manual unblock. Sequence numbers are assigned at insert, not commit: a poller reading seq > cursor must allow for transactions that commit out of order.';
COMMENT ON COLUMN revocation_actions.seq IS 'Position in the feed.';
COMMENT ON COLUMN revocation_actions.key_id IS 'The key the action applies to; null: every key of the user (user-level budget blocks).';
COMMENT ON COLUMN revocation_actions.user_id IS 'The account.';
COMMENT ON COLUMN revocation_actions.action IS 'block, throttle or unblock.';
COMMENT ON COLUMN revocation_actions.reason IS 'Why (the alert''s reason for detector actions).';
COMMENT ON COLUMN revocation_actions.alert_id IS 'The alert that issued the action (unique: an alert issues at most one); null for manual actions.';
COMMENT ON COLUMN revocation_actions.issued_at IS 'When the action starts: the alert''s event time.';
COMMENT ON COLUMN revocation_actions.expires_at IS 'When the action lapses on its own; null: until an unblock.';

-- Alert outbox -------------------------------------------------------------------

CREATE TABLE alert_outbox (
    alert_id     text        PRIMARY KEY REFERENCES alerts (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    claimed_at   timestamptz,
    delivered_at timestamptz,
    attempts     int         NOT NULL DEFAULT 0
);
CREATE INDEX alert_outbox_pending ON alert_outbox (created_at) WHERE delivered_at IS NULL;

COMMENT ON TABLE alert_outbox IS
    'Alerts waiting for delivery: one row per new alert, written in the alert''s batch transaction, so an alert is stored and queued or neither.';
COMMENT ON COLUMN alert_outbox.alert_id IS 'The alert to deliver.';
COMMENT ON COLUMN alert_outbox.created_at IS 'When the row was queued.';
COMMENT ON COLUMN alert_outbox.claimed_at IS 'When a dispatcher last took the row (a stale claim may be taken again).';
COMMENT ON COLUMN alert_outbox.delivered_at IS 'When every receiver had it; null: pending.';
COMMENT ON COLUMN alert_outbox.attempts IS 'Delivery attempts so far.';

-- Engine checkpoints and offsets -------------------------------------------------

CREATE TABLE engine_checkpoints (
    topic     text        NOT NULL,
    partition int         NOT NULL,
    at_offset bigint      NOT NULL,
    state     bytea       NOT NULL,
    taken_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

COMMENT ON TABLE engine_checkpoints IS
    'The latest detector-engine snapshot of each Kafka partition (only the latest is kept), written in a batch transaction together with the offsets it is valid at.';
COMMENT ON COLUMN engine_checkpoints.topic IS 'Kafka topic.';
COMMENT ON COLUMN engine_checkpoints.partition IS 'Kafka partition.';
COMMENT ON COLUMN engine_checkpoints.at_offset IS 'The next offset to feed the restored engine: the snapshot covers every record before it.';
COMMENT ON COLUMN engine_checkpoints.state IS 'The engine''s serialized state (opaque to Postgres).';
COMMENT ON COLUMN engine_checkpoints.taken_at IS 'When the snapshot was stored.';

CREATE TABLE consumer_offsets (
    topic       text        NOT NULL,
    partition   int         NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

COMMENT ON TABLE consumer_offsets IS
    'Where each Kafka partition resumes: the source of truth for keywatch''s offsets (not Kafka''s group offsets). Moved only by a batch transaction whose start offset matches the stored one (the fence).';
COMMENT ON COLUMN consumer_offsets.topic IS 'Kafka topic.';
COMMENT ON COLUMN consumer_offsets.partition IS 'Kafka partition.';
COMMENT ON COLUMN consumer_offsets.next_offset IS 'The first offset not yet committed: every record before it is in the rollups, alerts and lake.';
COMMENT ON COLUMN consumer_offsets.updated_at IS 'When a batch last moved the offset.';
