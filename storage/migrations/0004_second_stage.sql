-- The second stage (issue 15): detectors keyed by address, network, key and
-- prompt. Its batches commit like stage one's (fenced offsets of the
-- internal topic in consumer_offsets, its engine in engine_checkpoints),
-- and add the tables below. Address actions go into the same feed.

-- Address actions in the feed ---------------------------------------------------

ALTER TABLE revocation_actions ADD COLUMN ip text;

COMMENT ON COLUMN revocation_actions.ip IS
    'The address the action applies to (key cycling, credential stuffing); null: the action is about a key or user. An address action names no account: its user_id is empty and its key_id null.';

CREATE OR REPLACE VIEW active_revocations AS
SELECT a.*
FROM revocation_actions a
WHERE a.action IN ('block', 'throttle')
  AND (a.expires_at IS NULL OR a.expires_at > now())
  AND NOT EXISTS (
      SELECT 1 FROM revocation_actions u
      WHERE u.action = 'unblock' AND u.seq > a.seq
        AND ((a.ip IS NULL AND u.ip IS NULL AND u.user_id = a.user_id
              AND (u.key_id IS NULL OR u.key_id = a.key_id))
          OR (a.ip IS NOT NULL AND u.ip = a.ip)));

COMMENT ON VIEW active_revocations IS
    'Blocks and throttles in force now (not expired, not lifted by a later unblock of the key, of the user, or of the address): what /v1/blocklist serves.';
COMMENT ON COLUMN active_revocations.ip IS 'The address blocked; null: a key or user action.';

-- Traffic per address ------------------------------------------------------------

CREATE TABLE address_minute (
    ip                text        NOT NULL,
    minute            timestamptz NOT NULL,
    requests          bigint      NOT NULL DEFAULT 0,
    errors            bigint      NOT NULL DEFAULT 0,
    auth_failures     bigint      NOT NULL DEFAULT 0,
    prompt_tokens     bigint      NOT NULL DEFAULT 0,
    completion_tokens bigint      NOT NULL DEFAULT 0,
    cost_micros       bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (ip, minute)
);
CREATE INDEX address_minute_minute ON address_minute (minute);

COMMENT ON TABLE address_minute IS
    'Traffic per client address and minute (UTC), over every account, added to by the second stage''s batches in the transaction that moves its offsets: exact through crashes and restarts, as rollup_minute is.';
COMMENT ON COLUMN address_minute.ip IS 'The client address, as text.';
COMMENT ON COLUMN address_minute.minute IS 'Start of the minute, by event time.';
COMMENT ON COLUMN address_minute.requests IS 'Requests from the address (a request or exchange record counts one).';
COMMENT ON COLUMN address_minute.errors IS 'Responses with an error status (4xx/5xx).';
COMMENT ON COLUMN address_minute.auth_failures IS 'Responses refusing credentials (401, 403).';
COMMENT ON COLUMN address_minute.prompt_tokens IS 'Input tokens.';
COMMENT ON COLUMN address_minute.completion_tokens IS 'Output tokens.';
COMMENT ON COLUMN address_minute.cost_micros IS 'Spend in millionths of a US dollar.';

-- Where the second stage stands in each source -------------------------------

CREATE TABLE stage_two_sources (
    topic            text        NOT NULL,
    partition        int         NOT NULL,
    source_topic     text        NOT NULL,
    source_partition int         NOT NULL,
    source_offset    bigint,
    source_element   int,
    frontier         timestamptz,
    idle             boolean     NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, source_topic, source_partition)
);

COMMENT ON TABLE stage_two_sources IS
    'Per second-stage partition and source (a gateway topic partition): the high-water mark of projections taken (a projection at or before it is a repeat and is dropped), written in the batch transaction that moves the internal topic''s offset. The engine checkpoint holds the same marks; this table shows them.';
COMMENT ON COLUMN stage_two_sources.topic IS 'The internal topic (kafka.subjects.topic).';
COMMENT ON COLUMN stage_two_sources.partition IS 'Its partition.';
COMMENT ON COLUMN stage_two_sources.source_topic IS 'The gateway topic the projections came from.';
COMMENT ON COLUMN stage_two_sources.source_partition IS 'Its partition.';
COMMENT ON COLUMN stage_two_sources.source_offset IS 'Offset of the last projection taken; null: none yet.';
COMMENT ON COLUMN stage_two_sources.source_element IS 'Its JSON-array element plus one (0: the message was one record).';
COMMENT ON COLUMN stage_two_sources.frontier IS 'The largest event time the source has reported.';
COMMENT ON COLUMN stage_two_sources.idle IS 'The source last said it had no records (stage two does not wait for it).';
COMMENT ON COLUMN stage_two_sources.updated_at IS 'When a batch last wrote the row.';
