-- The duplicate window in chunks (issue 16). A stage-one engine's
-- duplicate window (every record hash of the last two horizons, an hour
-- at the default) was inside engine_checkpoints.state and rewritten whole
-- by every checkpoint: 12 million hashes for a partition at 3,300
-- records/s. Now it is kept in engine_checkpoint_entries as chunks of
-- packed 8-byte hashes (kind 'dedup', id GENERATION.N): a checkpoint
-- writes the hashes added since the previous one and deletes the chunks
-- of a generation that rotated out.
ALTER TABLE engine_checkpoint_entries DROP CONSTRAINT engine_checkpoint_entries_kind_check;
ALTER TABLE engine_checkpoint_entries ADD CONSTRAINT engine_checkpoint_entries_kind_check
    CHECK (kind IN ('user', 'key', 'dedup'));

COMMENT ON TABLE engine_checkpoint_entries IS
    'Per account, per key and per chunk of the duplicate window, the engine state of the latest checkpoint of a Kafka partition (engine_checkpoints holds the rest and the offset it is valid at).';
COMMENT ON COLUMN engine_checkpoint_entries.kind IS 'user: an account''s state; key: a key''s state; dedup: a chunk of the duplicate window (record hashes, 8 little-endian bytes each).';
COMMENT ON COLUMN engine_checkpoint_entries.id IS 'The user id or key id; for a dedup chunk, GENERATION.N (the generation''s start in Unix ms, and the chunk''s number).';
