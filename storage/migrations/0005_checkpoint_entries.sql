-- Checkpoints that scale with the accounts (issue 16). A stage-one engine's
-- checkpoint used to be one bytea per partition holding every account: 1.26
-- KB an account, so a partition of 800,000 accounts passed Postgres' 1 GB
-- bytea limit. Now engine_checkpoints.state holds what is not kept per
-- account (the engine's clock, the duplicate window), and every account and
-- key has a row of its own here, written only when it changed since the
-- previous checkpoint and deleted when the engine forgets it. Both are
-- written in the batch transaction that moves the offsets, so the rows and
-- at_offset always describe the same moment.

CREATE TABLE engine_checkpoint_entries (
    topic     text  NOT NULL,
    partition int   NOT NULL,
    kind      text  NOT NULL CHECK (kind IN ('user', 'key')),
    id        text  NOT NULL,
    state     bytea NOT NULL,
    PRIMARY KEY (topic, partition, kind, id)
);

COMMENT ON TABLE engine_checkpoint_entries IS
    'Per account and per key, the engine state of the latest checkpoint of a Kafka partition (engine_checkpoints holds the rest and the offset it is valid at).';
COMMENT ON COLUMN engine_checkpoint_entries.topic IS 'Kafka topic.';
COMMENT ON COLUMN engine_checkpoint_entries.partition IS 'Kafka partition.';
COMMENT ON COLUMN engine_checkpoint_entries.kind IS 'user: an account''s state; key: a key''s state.';
COMMENT ON COLUMN engine_checkpoint_entries.id IS 'The user id or key id.';
COMMENT ON COLUMN engine_checkpoint_entries.state IS 'Its serialized state (opaque to Postgres).';
COMMENT ON COLUMN engine_checkpoints.state IS 'The engine''s serialized state (opaque to Postgres); for stage one, without its accounts and keys, which are in engine_checkpoint_entries.';
