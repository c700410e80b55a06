-- Rollups written every few seconds, not every batch.
--
-- A batch's alerts, revocation actions and offset still commit together;
-- its rollups (rollup_minute, address_minute), budget ledger rows
-- (budget_periods) and second-stage marks (stage_two_sources) are held in
-- memory across batches and written with a later batch (every
-- pipeline.rollup_flush_secs, and always with a checkpoint and at a
-- partition's first and last commit). rollups_offset says how far the
-- stored rollups go: every record before it is in them. After a crash,
-- the records from rollups_offset up to next_offset are re-read and their
-- rollups rebuilt (no alert is raised twice: they are below next_offset).
-- rollups_next_offset is the next_offset of the last commit that set
-- rollups_offset: where they differ, a keywatch from before this
-- migration (which writes a batch's rollups with the batch) committed
-- since, and the rollups go up to next_offset. NULL (rows written before
-- this migration): the same.
ALTER TABLE consumer_offsets ADD COLUMN rollups_offset bigint;
ALTER TABLE consumer_offsets ADD COLUMN rollups_next_offset bigint;

COMMENT ON COLUMN consumer_offsets.rollups_offset IS
    'The first offset whose rollups, budget ledger and second-stage marks are not yet written (they are held in memory, written every pipeline.rollup_flush_secs); never above next_offset. Read only where rollups_next_offset = next_offset; else (NULL, or an older keywatch committed since) the same as next_offset.';
COMMENT ON COLUMN consumer_offsets.rollups_next_offset IS
    'The next_offset of the last commit that kept rollups_offset (a keywatch with held rollups): where it differs from next_offset, rollups_offset is stale and the rollups go up to next_offset.';
COMMENT ON COLUMN consumer_offsets.next_offset IS
    'The first offset not yet committed: every record before it is in the alerts, actions and lake, and in the rollups up to rollups_offset.';
