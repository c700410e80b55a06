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
-- NULL (rows written before this migration): the same as next_offset.
ALTER TABLE consumer_offsets ADD COLUMN rollups_offset bigint;

COMMENT ON COLUMN consumer_offsets.rollups_offset IS
    'The first offset whose rollups, budget ledger and second-stage marks are not yet written (they are held in memory, written every pipeline.rollup_flush_secs); never above next_offset. NULL: the same as next_offset.';
COMMENT ON COLUMN consumer_offsets.next_offset IS
    'The first offset not yet committed: every record before it is in the alerts, actions and lake, and in the rollups up to rollups_offset.';
