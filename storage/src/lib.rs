//! keywatch's durable edge: the Postgres schema (migrations in
//! `storage/migrations/`), the batch commit, engine checkpoints, and the
//! Parquet writer for the lake.
//!
//! # Guarantees
//!
//! - **Offsets move in the same transaction as the work they cover.**
//!   [`Store::commit_batch`] stores a batch's rollups, alerts, revocation
//!   actions, outbox rows and (every few minutes) the engine checkpoint
//!   together with the partition's next offset in `consumer_offsets`. Either
//!   all of it is committed or none of it; a crash anywhere replays the batch
//!   from the stored offset, which [`Store::load_partition`] returns. Postgres,
//!   not Kafka's group offsets, is the source of truth for where a partition
//!   resumes.
//! - **A consumer that lost its partition cannot write.** The offset row moves
//!   only from the batch's `start_offset`; if another consumer has committed
//!   meanwhile, the stored offset differs, the whole transaction rolls back and
//!   the call returns [`StorageError::Fenced`]. Two committers from the same
//!   offset queue on the offset row's lock: exactly one succeeds. The first
//!   commit of a partition creates the row, and a concurrent creator is fenced
//!   the same way.
//! - **Alert rows are idempotent.** Alert ids are deterministic; alerts are
//!   inserted `ON CONFLICT (id) DO NOTHING`, and only the alerts a commit
//!   actually inserted get a revocation action (throttle and block) and an
//!   outbox row. Replaying a batch, even one whose offsets were never
//!   committed, never stores, queues or enforces an alert twice.
//! - **Rollups are counted once.** They are additive upserts, held by the
//!   consumer across batches and written either with a batch
//!   ([`BatchCommit::flush`]) or on their own after the batches they cover
//!   ([`Store::flush_rollups`]); either way `consumer_offsets.rollups_offset`
//!   moves in the same transaction, fenced on its stored value, so a retry
//!   or another consumer's flush of the same records is refused, and a
//!   consumer that takes a partition over re-counts exactly the records from
//!   `rollups_offset` on.
//! - **Lake files are named by offset range.** [`parquet::write_batch`] writes
//!   `dt=YYYY-MM-DD/<topic>-<partition>-<first>-<last>.parquet` atomically
//!   (temporary file, fsync, rename), so replaying a range replaces its file.
//!   A batch resumed after a crash must end where an existing file of the
//!   same start ends ([`parquet::existing_batch_end`]) so that it rewrites
//!   that file rather than adding an overlapping one.
//!
//! # Errors
//!
//! [`StorageError::is_transient`] tells which failures are worth retrying
//! (lost connections, pool timeouts, serialization failures, deadlocks, file
//! system errors). After a transient failure of `commit_batch`, retry the
//! same batch: if the failed attempt had in fact committed (the reply was
//! lost), the retry is fenced with `stored == next_offset`. Any `Fenced`
//! means the same thing to the caller: stop the partition's task, and reload
//! with `load_partition` if the partition is still assigned; nothing is lost,
//! since the stored state is consistent with the stored offset.
//!
//! Text values must not contain NUL (`\0`): Postgres refuses it in `text` and
//! `jsonb`, so a batch holding one fails with a non-transient
//! [`StorageError::Query`] every time it is retried.

mod error;
pub mod feed;
pub mod memory;
pub mod outbox;
pub mod parquet;
mod store;

pub use error::StorageError;
pub use memory::{Backend, MemoryStore};
pub use parquet::{existing_batch_end, write_batch, LakeRows, RowOrigin};
pub use store::{
    AddressRow, BatchCommit, BudgetRow, CheckpointWrite, PartitionStart, RollupFlush, RollupRow,
    SourceRow, Store,
};

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// Every migration file is compiled in, in order, under the name sqlx's
    /// `migrate!` would give it.
    #[test]
    fn every_migration_file_is_embedded() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        let files: BTreeSet<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        let embedded: BTreeSet<String> = crate::store::MIGRATIONS
            .iter()
            .map(|(v, d, _)| format!("{v:04}_{}.sql", d.replace(' ', "_")))
            .collect();
        assert_eq!(files, embedded);
        for (name, (_, _, sql)) in files.iter().zip(crate::store::MIGRATIONS) {
            let on_disk = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
            assert_eq!(&on_disk, sql, "{name}");
        }
        let versions: Vec<i64> = crate::store::MIGRATIONS.iter().map(|m| m.0).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]));
    }
}
