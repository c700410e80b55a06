-- Alert delivery (the outbox dispatcher) and the revocation feed's ordering.

-- The feed ----------------------------------------------------------------------
-- A poller reads `seq > cursor`. If sequence numbers were taken at insert
-- and transactions committed out of order, a poller could see seq 12, move
-- its cursor, and never see seq 11 committed a moment later. So every
-- insert takes one transaction-scoped advisory lock before it draws its
-- number: the lock is held to commit, so numbers become visible in order.
-- Only transactions that write actions (rare) take it; the batch commit
-- writes them last, just before COMMIT.

ALTER TABLE revocation_actions ALTER COLUMN seq DROP DEFAULT;
ALTER TABLE revocation_actions ADD COLUMN recorded_at timestamptz NOT NULL DEFAULT clock_timestamp();
ALTER TABLE revocation_actions ADD COLUMN actor text NOT NULL DEFAULT 'detector';

COMMENT ON COLUMN revocation_actions.recorded_at IS 'When the row was written (moments before its transaction committed); the feed latency is measured from it.';
COMMENT ON COLUMN revocation_actions.actor IS 'Who issued it: detector, or operator:NAME for `keywatch keys block|unblock`.';
COMMENT ON TABLE revocation_actions IS
    'The feed gateways poll: one row per throttle or block alert (written in the alert''s batch transaction) and per manual block or unblock. Sequence numbers are drawn under a transaction-scoped advisory lock held to commit, so they become visible in increasing order and a poller reading seq > cursor misses nothing.';

CREATE FUNCTION keywatch_feed_sequence() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- 7022365370425173348 = 'kwfeedsq' as bytes: keywatch's feed lock.
    PERFORM pg_advisory_xact_lock(7022365370425173348);
    NEW.seq := nextval(pg_get_serial_sequence('revocation_actions', 'seq'));
    NEW.recorded_at := clock_timestamp();
    PERFORM pg_notify('keywatch_feed', NEW.seq::text);
    RETURN NEW;
END
$$;

CREATE TRIGGER revocation_actions_sequence BEFORE INSERT ON revocation_actions
    FOR EACH ROW EXECUTE FUNCTION keywatch_feed_sequence();

-- What is blocked or throttled now: a block or throttle not expired and
-- not lifted by a later unblock of the same key, or of the whole user (an
-- unblock with key_id null). /v1/blocklist and `keywatch keys list` read it.
CREATE VIEW active_revocations AS
SELECT a.*
FROM revocation_actions a
WHERE a.action IN ('block', 'throttle')
  AND (a.expires_at IS NULL OR a.expires_at > now())
  AND NOT EXISTS (
      SELECT 1 FROM revocation_actions u
      WHERE u.action = 'unblock' AND u.user_id = a.user_id AND u.seq > a.seq
        AND (u.key_id IS NULL OR u.key_id = a.key_id));

COMMENT ON VIEW active_revocations IS
    'Blocks and throttles in force now (not expired, not lifted by a later unblock of the key or of the user): what /v1/blocklist serves.';
COMMENT ON COLUMN active_revocations.seq IS 'Position in the feed.';
COMMENT ON COLUMN active_revocations.key_id IS 'The key blocked or throttled; null: every key of the user.';
COMMENT ON COLUMN active_revocations.user_id IS 'The account.';
COMMENT ON COLUMN active_revocations.action IS 'block or throttle.';
COMMENT ON COLUMN active_revocations.reason IS 'Why.';
COMMENT ON COLUMN active_revocations.alert_id IS 'The alert that issued it; null for manual actions.';
COMMENT ON COLUMN active_revocations.issued_at IS 'When it started.';
COMMENT ON COLUMN active_revocations.expires_at IS 'When it lapses on its own; null: until an unblock.';
COMMENT ON COLUMN active_revocations.recorded_at IS 'When the row was written.';
COMMENT ON COLUMN active_revocations.actor IS 'Who issued it: detector, or operator:NAME.';

-- The outbox ---------------------------------------------------------------------
-- A batch that queues alerts wakes the dispatchers at commit.

ALTER TABLE alert_outbox ADD COLUMN routed_at timestamptz;
COMMENT ON COLUMN alert_outbox.routed_at IS 'When a dispatcher turned the row into one delivery per matching receiver; null: not yet.';
COMMENT ON COLUMN alert_outbox.delivered_at IS 'When every receiver''s delivery finished (delivered, given up or suppressed); null: pending.';
COMMENT ON COLUMN alert_outbox.claimed_at IS 'Unused since deliveries are leased per receiver (alert_deliveries.lease_until).';
COMMENT ON COLUMN alert_outbox.attempts IS 'Unused since attempts are counted per receiver (alert_deliveries.attempts).';
CREATE INDEX alert_outbox_unrouted ON alert_outbox (created_at) WHERE routed_at IS NULL;

CREATE FUNCTION keywatch_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keywatch_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER alert_outbox_notify AFTER INSERT ON alert_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION keywatch_outbox_notify();

-- Deliveries -----------------------------------------------------------------------

CREATE TABLE alert_deliveries (
    id              bigserial   PRIMARY KEY,
    alert_id        text        NOT NULL REFERENCES alerts (id),
    receiver        text        NOT NULL,
    user_id         text        NOT NULL,
    severity        text        NOT NULL,
    condition       text        NOT NULL,
    state           text        NOT NULL CHECK (state IN ('pending', 'delivered', 'failed', 'suppressed')),
    attempts        int         NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    not_before      timestamptz,
    lease_until     timestamptz,
    last_status     int,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    UNIQUE (alert_id, receiver)
);
CREATE INDEX alert_deliveries_due ON alert_deliveries (receiver, next_attempt_at) WHERE state = 'pending';
CREATE INDEX alert_deliveries_user_order ON alert_deliveries (receiver, user_id, id) WHERE state = 'pending';
CREATE INDEX alert_deliveries_repeat ON alert_deliveries (receiver, condition, finished_at) WHERE state = 'delivered';

COMMENT ON TABLE alert_deliveries IS
    'One row per (alert, receiver) the routing rules send it to: its state, attempts and schedule. A receiver gets one user''s alerts in order: a delivery that failed holds back that user''s later deliveries to the same receiver until it succeeds or is given up.';
COMMENT ON COLUMN alert_deliveries.id IS 'Order of routing (per user, the order alerts are sent in).';
COMMENT ON COLUMN alert_deliveries.alert_id IS 'The alert.';
COMMENT ON COLUMN alert_deliveries.receiver IS 'The receiver''s configured name.';
COMMENT ON COLUMN alert_deliveries.user_id IS 'The alert''s user (for per-user order).';
COMMENT ON COLUMN alert_deliveries.severity IS 'The alert''s severity (critical goes at once; lower ones wait to be grouped).';
COMMENT ON COLUMN alert_deliveries.condition IS 'What the alert is about (kind, subject, budget period and percent): the same condition is not re-sent within the repeat interval.';
COMMENT ON COLUMN alert_deliveries.state IS 'pending; delivered; failed (given up: rejected, receiver gone, or out of retries); suppressed (a repeat within the repeat interval).';
COMMENT ON COLUMN alert_deliveries.attempts IS 'Attempts so far.';
COMMENT ON COLUMN alert_deliveries.next_attempt_at IS 'Not before this time (group wait, retry backoff or Retry-After).';
COMMENT ON COLUMN alert_deliveries.not_before IS 'The receiver''s Retry-After: no attempt before it, even when other deliveries show the receiver answering again.';
COMMENT ON COLUMN alert_deliveries.lease_until IS 'A dispatcher is sending it until then; past it, another may (at least once).';
COMMENT ON COLUMN alert_deliveries.last_status IS 'HTTP status of the last answer, when there was one.';
COMMENT ON COLUMN alert_deliveries.last_error IS 'Why the last attempt failed (never holds a URL or secret).';
COMMENT ON COLUMN alert_deliveries.created_at IS 'When the alert was routed to the receiver.';
COMMENT ON COLUMN alert_deliveries.finished_at IS 'When it reached a final state.';

CREATE TABLE delivery_attempts (
    id          bigserial   PRIMARY KEY,
    delivery_id bigint      NOT NULL REFERENCES alert_deliveries (id),
    attempt     int         NOT NULL,
    started_at  timestamptz NOT NULL,
    duration_ms int         NOT NULL,
    outcome     text        NOT NULL CHECK (outcome IN ('delivered', 'retry', 'rejected', 'gone')),
    http_status int,
    error       text,
    grouped     int         NOT NULL DEFAULT 1
);
CREATE INDEX delivery_attempts_delivery ON delivery_attempts (delivery_id);
CREATE INDEX delivery_attempts_started ON delivery_attempts (started_at);

COMMENT ON TABLE delivery_attempts IS 'Every attempt to deliver an alert to a receiver and what came of it.';
COMMENT ON COLUMN delivery_attempts.id IS 'Order of attempts.';
COMMENT ON COLUMN delivery_attempts.delivery_id IS 'The delivery (alert and receiver).';
COMMENT ON COLUMN delivery_attempts.attempt IS 'Its number, from 1.';
COMMENT ON COLUMN delivery_attempts.started_at IS 'When the attempt started.';
COMMENT ON COLUMN delivery_attempts.duration_ms IS 'How long it took.';
COMMENT ON COLUMN delivery_attempts.outcome IS 'delivered, retry (will be tried again), rejected (given up) or gone (410: receiver disabled).';
COMMENT ON COLUMN delivery_attempts.http_status IS 'HTTP status, when there was an answer.';
COMMENT ON COLUMN delivery_attempts.error IS 'What went wrong (never holds a URL or secret).';
COMMENT ON COLUMN delivery_attempts.grouped IS 'How many alerts the message carried (Slack and email group them).';

CREATE TABLE receiver_status (
    receiver        text        PRIMARY KEY,
    disabled_at     timestamptz,
    disabled_reason text
);

COMMENT ON TABLE receiver_status IS 'Receivers an operator must look at: a 410 Gone disables one until `keywatch receivers enable NAME`.';
COMMENT ON COLUMN receiver_status.receiver IS 'The receiver''s configured name.';
COMMENT ON COLUMN receiver_status.disabled_at IS 'When it was disabled; null: enabled.';
COMMENT ON COLUMN receiver_status.disabled_reason IS 'Why (the receiver''s answer).';
