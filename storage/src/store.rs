//! The Postgres store: migrations, where a partition resumes, and the batch commit.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use detectors::{Action, Alert, Checkpoint, Entry, EntryKind};
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};

use crate::error::{query_error, StorageError};

/// The migrations in `storage/migrations`, compiled in: `(version, description, sql)`.
/// A test checks that every file of the directory is listed here.
///
/// `sqlx::migrate!` would read the directory itself, but it needs sqlx's
/// `macros` feature, which builds sqlx-core and the Postgres driver a second
/// time for the proc-macro host: a cold build pays for that twice. The
/// migrations this source yields are the ones `migrate!` would (same version,
/// description and checksum), so the two can replace each other.
pub(crate) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (
        2,
        "budget periods",
        include_str!("../migrations/0002_budget_periods.sql"),
    ),
    (
        3,
        "delivery",
        include_str!("../migrations/0003_delivery.sql"),
    ),
    (
        4,
        "second stage",
        include_str!("../migrations/0004_second_stage.sql"),
    ),
    (
        5,
        "checkpoint entries",
        include_str!("../migrations/0005_checkpoint_entries.sql"),
    ),
    (
        6,
        "rollup fillfactor",
        include_str!("../migrations/0006_rollup_fillfactor.sql"),
    ),
    (
        7,
        "rollups offset",
        include_str!("../migrations/0007_rollups_offset.sql"),
    ),
    (
        8,
        "dedup chunks",
        include_str!("../migrations/0008_dedup_chunks.sql"),
    ),
];

/// The compiled-in migrations as a sqlx migration source.
#[derive(Debug)]
struct EmbeddedMigrations;

impl MigrationSource<'static> for EmbeddedMigrations {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Where a partition's stored rollups end, as SQL over its
/// `consumer_offsets` row: `rollups_offset`, unless a keywatch from before
/// that column (which writes a batch's rollups with the batch) has moved
/// `next_offset` since the last commit that kept it
/// (`rollups_next_offset`): then `next_offset`. Every statement that reads
/// or fences on the stored rollups uses this one rule.
macro_rules! stored_rollups {
    () => {
        "(CASE WHEN rollups_next_offset = next_offset THEN rollups_offset ELSE next_offset END)"
    };
}

/// keywatch's Postgres database: a connection pool and the statements that
/// move data in and out of it. Cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

/// Where a partition resumes, as [`Store::load_partition`] finds it.
///
/// The checkpoint, when present, is never ahead of the stored rollups,
/// nor they of the offset: `checkpoint.0 <= rollups_offset <= next_offset`.
/// To resume, restore the engine from the checkpoint, feed it the records
/// from `checkpoint.0` up to `next_offset` *for state only* (their alerts
/// and files are already stored), adding those from `rollups_offset` on to
/// the rollups held for the next flush, then process from `next_offset` on.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PartitionStart {
    /// The first offset not yet committed; `None`: the partition was never
    /// committed (start where the consumer's reset policy says).
    pub next_offset: Option<i64>,
    /// The first offset whose rollups are not stored (`None` when
    /// `next_offset` is; rows from before migration 7: `next_offset`).
    pub rollups_offset: Option<i64>,
    /// The latest engine checkpoint: the offset it is valid at (the next record
    /// it has not seen) and its core's bytes.
    pub checkpoint: Option<(i64, Vec<u8>)>,
    /// That checkpoint's accounts and keys (stage one's; none without a
    /// checkpoint).
    pub entries: Vec<Entry>,
}

/// One batch of a partition's work, stored by [`Store::commit_batch`] in one transaction.
#[derive(Clone, Copy, Debug)]
pub struct BatchCommit<'a> {
    /// The Kafka topic.
    pub topic: &'a str,
    /// The Kafka partition.
    pub partition: i32,
    /// The first offset of the batch: must equal the stored offset (or no
    /// offset may be stored yet), else the commit is fenced.
    pub start_offset: i64,
    /// The offset after the batch's last record: where the partition resumes
    /// once this batch is committed.
    pub next_offset: i64,
    /// The rollups held since the last flush, at most one row per (user,
    /// key, minute); they are added to what is stored.
    pub rollups: &'a [RollupRow],
    /// Whether this commit flushes the rollups: `rollups`, `budgets`,
    /// `addresses` and `sources` hold everything counted since the last
    /// flush, and the stored rollups then go up to `next_offset`
    /// (`consumer_offsets.rollups_offset`). Without it they must be empty:
    /// what was counted is held for a later commit.
    pub flush: bool,
    /// The stored rollups offset a flushing commit expects (the one its
    /// rollups start at); another one stored (a retry of a commit that
    /// did land, another owner's flush) fences it. None: no offset is
    /// stored yet, or the commit does not flush.
    pub rollups_from: Option<i64>,
    /// The batch's alerts; ones already stored (same id) are skipped.
    pub alerts: &'a [Alert],
    /// Engine snapshot valid at `next_offset` (taken every few minutes, not
    /// every batch): its core, and its entries that changed.
    pub checkpoint: Option<&'a Checkpoint>,
    /// The budget ledger of the users counted since the last flush (absolute values).
    pub budgets: &'a [BudgetRow],
    /// Traffic per address and minute (the second stage's); added to what is stored.
    pub addresses: &'a [AddressRow],
    /// Where the second stage stands in each source (absolute values).
    pub sources: &'a [SourceRow],
}

/// The rows a partition held since its last flush, written on their own
/// by [`Store::flush_rollups`] after the batches they cover committed,
/// so that no batch waits for them.
#[derive(Clone, Copy, Debug)]
pub struct RollupFlush<'a> {
    /// The Kafka topic.
    pub topic: &'a str,
    /// The Kafka partition.
    pub partition: i32,
    /// Where the stored rollups end now, and these rows start
    /// (`consumer_offsets.rollups_offset`): any other value fences it.
    pub from: i64,
    /// Where the stored rollups end once these are written; at most the
    /// stored `next_offset` (the batches must have committed).
    pub to: i64,
    /// Traffic per user, key and minute counted from `from` to `to`
    /// (added to what is stored).
    pub rollups: &'a [RollupRow],
    /// The budget ledger of the users counted (absolute values).
    pub budgets: &'a [BudgetRow],
    /// Traffic per address and minute (the second stage's; added).
    pub addresses: &'a [AddressRow],
    /// Where the second stage stands in each source (absolute values).
    pub sources: &'a [SourceRow],
}

/// A checkpoint stored on its own, after the batch that ends at its offset
/// committed ([`Store::store_checkpoint`]).
#[derive(Clone, Copy, Debug)]
pub struct CheckpointWrite<'a> {
    /// The Kafka topic.
    pub topic: &'a str,
    /// The Kafka partition.
    pub partition: i32,
    /// The offset it is valid at.
    pub at: i64,
    /// The stored checkpoint it was taken against (its writer's last).
    pub previous: Option<i64>,
    /// The checkpoint.
    pub checkpoint: &'a Checkpoint,
    /// Its entries are written at most this fast (None or 0: unpaced).
    pub bytes_per_sec: Option<u64>,
}

/// Traffic of one address in one minute, as a second-stage batch adds it to `address_minute`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AddressRow {
    /// The address, as text.
    pub ip: String,
    /// Start of the minute, Unix milliseconds.
    pub minute_ms: i64,
    /// Requests.
    pub requests: i64,
    /// Responses with an error status.
    pub errors: i64,
    /// Responses refusing credentials.
    pub auth_failures: i64,
    /// Input tokens.
    pub prompt_tokens: i64,
    /// Output tokens.
    pub completion_tokens: i64,
    /// Spend, micro-dollars.
    pub cost_micros: i64,
}

/// A second-stage partition's mark in one source, as `stage_two_sources` holds it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SourceRow {
    /// The gateway topic.
    pub source_topic: String,
    /// Its partition.
    pub source_partition: i32,
    /// The last projection taken: offset and element plus one (None: none yet).
    pub mark: Option<(i64, i32)>,
    /// The largest event time the source reported, Unix ms (None: none).
    pub frontier_ms: Option<i64>,
    /// The source said it was idle.
    pub idle: bool,
}

/// One user's budget and spend in one period, as the detectors' ledger has it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct BudgetRow {
    /// The account.
    pub user_id: String,
    /// `day` or `month`.
    pub period: &'static str,
    /// Start of the period, Unix ms.
    pub period_start_ms: i64,
    /// The budget in force, micro-dollars.
    pub limit_micros: i64,
    /// Spend so far, micro-dollars.
    pub spent_micros: i64,
    /// Tokens so far.
    pub tokens: i64,
}

/// Traffic of one user and key in one minute, as a batch adds it to `rollup_minute`.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RollupRow {
    /// The account.
    pub user_id: String,
    /// The key id.
    pub key_id: String,
    /// Start of the minute, Unix milliseconds (a multiple of 60,000).
    pub minute_ms: i64,
    /// Requests counted.
    pub requests: i64,
    /// Input tokens.
    pub prompt_tokens: i64,
    /// Output tokens.
    pub completion_tokens: i64,
    /// Spend in millionths of a US dollar.
    pub cost_micros: i64,
    /// Responses with an error status.
    pub errors: i64,
    /// Sum of response latencies, milliseconds.
    pub latency_sum_ms: i64,
    /// Largest response latency, milliseconds.
    pub latency_max_ms: i64,
}

impl Store {
    /// Connects (pool of `max_connections`). `url` is a libpq-style URL, e.g.
    /// `postgres://user:password@host:5432/keywatch` (the `DATABASE_URL`
    /// convention); connections are opened now, so a wrong URL fails here.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StorageError> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(url)
            .await
            .map_err(StorageError::Connect)?;
        Ok(Store { pool })
    }

    /// Runs the migrations in storage/migrations, idempotent: applied ones are
    /// skipped, and concurrent callers wait on sqlx's advisory lock.
    pub async fn migrate(&self) -> Result<(), StorageError> {
        let migrator = Migrator::new(EmbeddedMigrations)
            .await
            .map_err(StorageError::Migrate)?;
        migrator
            .run(&self.pool)
            .await
            .map_err(StorageError::Migrate)
    }

    /// Where a partition resumes: its stored next offset (None: never
    /// committed) and the latest engine checkpoint (offset it was taken at,
    /// core, entries), read in one snapshot so they are consistent.
    pub async fn load_partition(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<PartitionStart, StorageError> {
        // One snapshot for the offset, the core and its entries: a commit
        // by another owner in between cannot mix two checkpoints.
        let mut tx = self.pool.begin().await.map_err(query_error("begin"))?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(query_error("begin a snapshot"))?;
        let row = sqlx::query(concat!(
            "SELECT o.next_offset, ",
            stored_rollups!(),
            ", c.at_offset, c.state
             FROM (SELECT $1::text AS topic, $2::int AS partition) p
             LEFT JOIN consumer_offsets o USING (topic, partition)
             LEFT JOIN engine_checkpoints c USING (topic, partition)",
        ))
        .bind(topic)
        .bind(partition)
        .fetch_one(&mut *tx)
        .await
        .map_err(query_error("load the partition's offset and checkpoint"))?;
        let get = |e| StorageError::Query {
            what: "read the partition's offset and checkpoint",
            source: e,
        };
        let next_offset: Option<i64> = row.try_get(0).map_err(get)?;
        let rollups_offset: Option<i64> = row.try_get(1).map_err(get)?;
        let at_offset: Option<i64> = row.try_get(2).map_err(get)?;
        let state: Option<Vec<u8>> = row.try_get(3).map_err(get)?;
        let mut entries = Vec::new();
        if at_offset.is_some() {
            let rows = sqlx::query_as::<_, (String, String, Vec<u8>)>(
                "SELECT kind, id, state FROM engine_checkpoint_entries
                 WHERE topic = $1 AND partition = $2",
            )
            .bind(topic)
            .bind(partition)
            .fetch_all(&mut *tx)
            .await
            .map_err(query_error("load the checkpoint's entries"))?;
            entries.reserve_exact(rows.len());
            for (kind, id, state) in rows {
                // The table's CHECK admits no other kind.
                let kind = EntryKind::parse(&kind).ok_or_else(|| StorageError::Corrupt {
                    what: format!(
                        "engine_checkpoint_entries of {topic}[{partition}]: kind {kind:?} of {id:?}"
                    ),
                })?;
                entries.push(Entry {
                    kind,
                    id: id.into(),
                    state,
                });
            }
        }
        tx.commit().await.map_err(query_error("commit"))?;
        Ok(PartitionStart {
            next_offset,
            rollups_offset,
            checkpoint: at_offset.zip(state),
            entries,
        })
    }

    /// One transaction: when it flushes, the rollups held since the last
    /// flush (additive upsert), budget ledger and second-stage marks, and
    /// `rollups_offset` moved to `next_offset` (else left); alerts (ON CONFLICT (id) DO
    /// NOTHING), revocation actions for the new alerts whose action is
    /// throttle/block, outbox rows (one per new alert), the engine checkpoint
    /// if given, and the offset row moved from `start_offset` to
    /// `next_offset`, guarded: if the stored offset is not `start_offset`
    /// (another consumer took over and committed), the whole transaction rolls
    /// back and `Err(StorageError::Fenced{..})` is returned. When no row exists
    /// yet, the row is created, and a concurrent creator is fenced the same way.
    ///
    /// The offset row is locked first, so two committers of one partition
    /// queue on it and the loser writes nothing. Each table gets one
    /// statement per batch (UNNEST over array binds).
    pub async fn commit_batch(&self, batch: &BatchCommit<'_>) -> Result<(), StorageError> {
        if batch.next_offset < batch.start_offset {
            return Err(StorageError::OffsetsBackwards {
                topic: batch.topic.to_owned(),
                partition: batch.partition,
                start_offset: batch.start_offset,
                next_offset: batch.next_offset,
            });
        }
        debug_assert!(
            batch.flush
                || (batch.rollups.is_empty()
                    && batch.budgets.is_empty()
                    && batch.addresses.is_empty()
                    && batch.sources.is_empty()),
            "rollups in a commit that does not flush them"
        );
        // Encode before taking any lock.
        let alert_columns = AlertColumns::new(batch.alerts)?;

        let mut tx = self.pool.begin().await.map_err(query_error("begin"))?;
        if let Err(e) = advance_offset(&mut tx, batch).await {
            // Release the offset row lock now rather than when the pool gets to it.
            let _ = tx.rollback().await;
            return Err(e);
        }
        let held = RollupFlush {
            topic: batch.topic,
            partition: batch.partition,
            from: batch.rollups_from.unwrap_or(batch.start_offset),
            to: batch.next_offset,
            rollups: batch.rollups,
            budgets: batch.budgets,
            addresses: batch.addresses,
            sources: batch.sources,
        };
        write_held(&mut tx, &held).await?;
        if let Some(cp) = batch.checkpoint {
            write_checkpoint(
                &mut tx,
                batch.topic,
                batch.partition,
                batch.next_offset,
                cp,
                None,
            )
            .await?;
        }
        // Last: new block/throttle actions take the feed's ordering lock
        // (see migration 0003), held until the commit just below.
        if !batch.alerts.is_empty() {
            alert_columns.insert(&mut tx).await?;
        }
        tx.commit().await.map_err(query_error("commit"))
    }

    /// Writes the rows a partition held since its last flush in a
    /// transaction of their own and moves `rollups_offset` from `from` to
    /// `to`, beside the batches (which never touch these tables when they
    /// do not flush). The offset row is locked last, for the moment of the
    /// commit only, so the partition's batches do not queue behind the
    /// rows. Fenced ([`StorageError::RollupsFenced`], nothing stored) when
    /// the stored rollups do not end at `from` (a retry of a flush that
    /// landed, another consumer's flush) or the stored `next_offset` is
    /// below `to`.
    pub async fn flush_rollups(&self, f: &RollupFlush<'_>) -> Result<(), StorageError> {
        if f.to < f.from {
            return Err(StorageError::OffsetsBackwards {
                topic: f.topic.to_owned(),
                partition: f.partition,
                start_offset: f.from,
                next_offset: f.to,
            });
        }
        let mut tx = self.pool.begin().await.map_err(query_error("begin"))?;
        write_held(&mut tx, f).await?;
        let moved = sqlx::query(concat!(
            "UPDATE consumer_offsets SET rollups_offset = $4, rollups_next_offset = next_offset
             WHERE topic = $1 AND partition = $2 AND next_offset >= $4 AND $3 = ",
            stored_rollups!(),
        ))
        .bind(f.topic)
        .bind(f.partition)
        .bind(f.from)
        .bind(f.to)
        .execute(&mut *tx)
        .await
        .map_err(query_error("move the partition's rollups offset"))?
        .rows_affected();
        if moved == 1 {
            return tx.commit().await.map_err(query_error("commit"));
        }
        let stored: Option<i64> = sqlx::query_scalar(concat!(
            "SELECT ",
            stored_rollups!(),
            " FROM consumer_offsets WHERE topic = $1 AND partition = $2",
        ))
        .bind(f.topic)
        .bind(f.partition)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_error("read the partition's rollups offset"))?
        .flatten();
        let _ = tx.rollback().await;
        Err(StorageError::RollupsFenced {
            topic: f.topic.to_owned(),
            partition: f.partition,
            expected: f.from,
            stored: stored.unwrap_or(-1),
        })
    }

    /// Stores a checkpoint valid at offset `at` in a transaction of its own,
    /// after the batch that ends there committed, so a batch need not wait
    /// for it. It is stored only on top of what it was taken against: a
    /// delta (not `full`) only when the stored checkpoint is at `previous`,
    /// the last one its writer stored; a full one only when the stored one
    /// is older than `at`. Returns whether it was stored (false: another
    /// writer moved on, and the caller's next checkpoint must be full).
    /// The stored row is locked first, so a batch's own checkpoint and
    /// this one queue rather than mix. With `bytes_per_sec`, its entries go
    /// in at most that fast (a pause after each statement), so a big
    /// checkpoint spreads over time instead of taking Postgres from the
    /// batches.
    pub async fn store_checkpoint(&self, w: &CheckpointWrite<'_>) -> Result<bool, StorageError> {
        let mut tx = self.pool.begin().await.map_err(query_error("begin"))?;
        let stored: Option<i64> = sqlx::query_scalar(
            "SELECT at_offset FROM engine_checkpoints
             WHERE topic = $1 AND partition = $2 FOR UPDATE",
        )
        .bind(w.topic)
        .bind(w.partition)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_error("lock the engine checkpoint"))?;
        if !w.fits(stored) {
            let _ = tx.rollback().await;
            return Ok(false);
        }
        let (topic, partition, at) = (w.topic, w.partition, w.at);
        write_checkpoint(&mut tx, topic, partition, at, w.checkpoint, w.bytes_per_sec).await?;
        tx.commit().await.map_err(query_error("commit"))?;
        Ok(true)
    }

    /// The pool, for tests and later issues.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl CheckpointWrite<'_> {
    /// Whether it may be stored over the checkpoint stored at `stored`:
    /// a delta only on top of the one it was taken against, a full one
    /// only over an older one.
    pub(crate) fn fits(&self, stored: Option<i64>) -> bool {
        if self.checkpoint.full {
            stored.is_none_or(|s| s < self.at)
        } else {
            stored.is_some() && stored == self.previous && stored.is_some_and(|p| p <= self.at)
        }
    }
}

/// Entries written per statement at most (a statement's binds stay a few MB)…
const ENTRY_CHUNK: usize = 5_000;
/// …and bytes of state per statement at most (one entry may hold more: a
/// chunk of the duplicate window is 512 KiB), far below Postgres' 1 GB
/// message limit.
const STATEMENT_BYTES: usize = 16 << 20;

/// `entries` cut into the runs one statement writes: at most
/// [`ENTRY_CHUNK`] entries and, past its first entry, [`STATEMENT_BYTES`].
fn statements(entries: &[Entry]) -> impl Iterator<Item = &[Entry]> {
    let mut rest = entries;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let n = rest
            .iter()
            .take(ENTRY_CHUNK)
            .position(|e| {
                bytes += e.state.len();
                bytes > STATEMENT_BYTES
            })
            .unwrap_or(rest.len().min(ENTRY_CHUNK))
            .max(1);
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
}

/// Writes an engine checkpoint valid at offset `at`: its core in
/// `engine_checkpoints`; its entries in `engine_checkpoint_entries` (all
/// replaced when it is full, else the forgotten deleted, then the changed
/// written), paced to `bytes_per_sec` when given.
async fn write_checkpoint(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    at: i64,
    cp: &Checkpoint,
    bytes_per_sec: Option<u64>,
) -> Result<(), StorageError> {
    let started = std::time::Instant::now();
    let mut written = 0u64;
    sqlx::query(
        "INSERT INTO engine_checkpoints (topic, partition, at_offset, state)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (topic, partition) DO UPDATE
         SET at_offset = excluded.at_offset, state = excluded.state, taken_at = now()",
    )
    .bind(topic)
    .bind(partition)
    .bind(at)
    .bind(&cp.core)
    .execute(&mut **tx)
    .await
    .map_err(query_error("store the engine checkpoint"))?;
    if cp.full {
        sqlx::query("DELETE FROM engine_checkpoint_entries WHERE topic = $1 AND partition = $2")
            .bind(topic)
            .bind(partition)
            .execute(&mut **tx)
            .await
            .map_err(query_error("replace the checkpoint's entries"))?;
    }
    for chunk in cp.forgotten.chunks(ENTRY_CHUNK) {
        let kinds: Vec<&str> = chunk.iter().map(|(k, _)| k.as_str()).collect();
        let ids: Vec<&str> = chunk.iter().map(|(_, id)| &**id).collect();
        sqlx::query(
            "DELETE FROM engine_checkpoint_entries e
             USING UNNEST($3::text[], $4::text[]) AS f(kind, id)
             WHERE e.topic = $1 AND e.partition = $2 AND e.kind = f.kind AND e.id = f.id",
        )
        .bind(topic)
        .bind(partition)
        .bind(kinds)
        .bind(ids)
        .execute(&mut **tx)
        .await
        .map_err(query_error("delete forgotten checkpoint entries"))?;
    }
    for chunk in statements(&cp.changed) {
        let kinds: Vec<&str> = chunk.iter().map(|e| e.kind.as_str()).collect();
        let ids: Vec<&str> = chunk.iter().map(|e| &*e.id).collect();
        let states: Vec<&[u8]> = chunk.iter().map(|e| e.state.as_slice()).collect();
        sqlx::query(
            "INSERT INTO engine_checkpoint_entries (topic, partition, kind, id, state)
             SELECT $1, $2, k, i, s FROM UNNEST($3::text[], $4::text[], $5::bytea[]) AS c(k, i, s)
             ON CONFLICT (topic, partition, kind, id) DO UPDATE SET state = excluded.state",
        )
        .bind(topic)
        .bind(partition)
        .bind(kinds)
        .bind(ids)
        .bind(states)
        .execute(&mut **tx)
        .await
        .map_err(query_error("store the checkpoint's entries"))?;
        written += chunk.iter().map(|e| e.state.len() as u64).sum::<u64>();
        if let Some(rate) = bytes_per_sec.filter(|&r| r > 0) {
            let due = std::time::Duration::from_secs_f64(written as f64 / rate as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(ahead).await;
            }
        }
    }
    Ok(())
}

/// Moves the partition's offset from `start_offset` to `next_offset`, or
/// creates it when the partition was never committed; `Fenced` otherwise.
async fn advance_offset(
    tx: &mut Transaction<'_, Postgres>,
    batch: &BatchCommit<'_>,
) -> Result<(), StorageError> {
    // Under READ COMMITTED a second committer blocks on the row lock here and,
    // once the first commits, re-checks `next_offset = $3` against the new
    // row: it updates nothing and falls through to the fence.
    let moved = sqlx::query(concat!(
        "UPDATE consumer_offsets SET next_offset = $4, updated_at = now(),
             rollups_offset = CASE WHEN $5 THEN $4 ELSE ",
        stored_rollups!(),
        " END,
             rollups_next_offset = $4
         WHERE topic = $1 AND partition = $2 AND next_offset = $3
             AND ($6::int8 IS NULL OR $6 = ",
        stored_rollups!(),
        ")",
    ))
    .bind(batch.topic)
    .bind(batch.partition)
    .bind(batch.start_offset)
    .bind(batch.next_offset)
    .bind(batch.flush)
    .bind(batch.rollups_from.filter(|_| batch.flush))
    .execute(&mut **tx)
    .await
    .map_err(query_error("move the partition's offset"))?
    .rows_affected();
    if moved == 1 {
        return Ok(());
    }
    // No row with our start offset: either none at all (first commit), or the
    // stored offset differs. A concurrent creator's uncommitted row makes this
    // insert wait, then do nothing once that row commits.
    let created = sqlx::query(
        "INSERT INTO consumer_offsets (topic, partition, next_offset, rollups_offset,
             rollups_next_offset)
         VALUES ($1, $2, $3, $4, $3)
         ON CONFLICT (topic, partition) DO NOTHING",
    )
    .bind(batch.topic)
    .bind(batch.partition)
    .bind(batch.next_offset)
    .bind(if batch.flush {
        batch.next_offset
    } else {
        batch.start_offset
    })
    .execute(&mut **tx)
    .await
    .map_err(query_error("create the partition's offset"))?
    .rows_affected();
    if created == 1 {
        return Ok(());
    }
    let stored: Option<i64> = sqlx::query_scalar(
        "SELECT next_offset FROM consumer_offsets WHERE topic = $1 AND partition = $2",
    )
    .bind(batch.topic)
    .bind(batch.partition)
    .fetch_optional(&mut **tx)
    .await
    .map_err(query_error("read the partition's offset"))?;
    Err(StorageError::Fenced {
        topic: batch.topic.to_owned(),
        partition: batch.partition,
        expected: batch.start_offset,
        stored: stored.unwrap_or(-1),
    })
}

/// Writes held rows (rollups, budget ledger, address traffic, source
/// marks), one statement per table that has any.
async fn write_held(
    tx: &mut Transaction<'_, Postgres>,
    f: &RollupFlush<'_>,
) -> Result<(), StorageError> {
    if !f.rollups.is_empty() {
        upsert_rollups(tx, f.rollups).await?;
    }
    if !f.budgets.is_empty() {
        upsert_budgets(tx, f.budgets).await?;
    }
    if !f.addresses.is_empty() {
        upsert_addresses(tx, f.addresses).await?;
    }
    if !f.sources.is_empty() {
        upsert_sources(tx, f.topic, f.partition, f.sources).await?;
    }
    Ok(())
}

/// Adds the batch's address rows to `address_minute` in one statement.
async fn upsert_addresses(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[AddressRow],
) -> Result<(), StorageError> {
    let col = |f: fn(&AddressRow) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
    let ips: Vec<&str> = rows.iter().map(|r| r.ip.as_str()).collect();
    sqlx::query(
        "INSERT INTO address_minute AS a (ip, minute, requests, errors, auth_failures,
             prompt_tokens, completion_tokens, cost_micros)
         SELECT ip, to_timestamp(m / 1000.0), sum(rq), sum(e), sum(af), sum(pt), sum(ct), sum(c)
         FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[],
             $7::int8[], $8::int8[]) AS b(ip, m, rq, e, af, pt, ct, c)
         GROUP BY ip, m
         ORDER BY ip, m
         ON CONFLICT (ip, minute) DO UPDATE SET
             requests = a.requests + excluded.requests,
             errors = a.errors + excluded.errors,
             auth_failures = a.auth_failures + excluded.auth_failures,
             prompt_tokens = a.prompt_tokens + excluded.prompt_tokens,
             completion_tokens = a.completion_tokens + excluded.completion_tokens,
             cost_micros = a.cost_micros + excluded.cost_micros",
    )
    .bind(ips)
    .bind(col(|r| r.minute_ms))
    .bind(col(|r| r.requests))
    .bind(col(|r| r.errors))
    .bind(col(|r| r.auth_failures))
    .bind(col(|r| r.prompt_tokens))
    .bind(col(|r| r.completion_tokens))
    .bind(col(|r| r.cost_micros))
    .execute(&mut **tx)
    .await
    .map_err(query_error("upsert address rollups"))?;
    Ok(())
}

/// Writes where the second-stage partition stands in each source.
async fn upsert_sources(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    partition: i32,
    rows: &[SourceRow],
) -> Result<(), StorageError> {
    let topics: Vec<&str> = rows.iter().map(|r| r.source_topic.as_str()).collect();
    let parts: Vec<i32> = rows.iter().map(|r| r.source_partition).collect();
    let offsets: Vec<Option<i64>> = rows.iter().map(|r| r.mark.map(|m| m.0)).collect();
    let elements: Vec<Option<i32>> = rows.iter().map(|r| r.mark.map(|m| m.1)).collect();
    let frontiers: Vec<Option<i64>> = rows.iter().map(|r| r.frontier_ms).collect();
    let idle: Vec<bool> = rows.iter().map(|r| r.idle).collect();
    sqlx::query(
        "INSERT INTO stage_two_sources AS s (topic, partition, source_topic, source_partition,
             source_offset, source_element, frontier, idle)
         SELECT $1, $2, st, sp, so, se, to_timestamp(f / 1000.0), i
         FROM UNNEST($3::text[], $4::int4[], $5::int8[], $6::int4[], $7::int8[], $8::bool[])
             AS b(st, sp, so, se, f, i)
         ORDER BY st, sp
         ON CONFLICT (topic, partition, source_topic, source_partition) DO UPDATE SET
             source_offset = excluded.source_offset,
             source_element = excluded.source_element,
             frontier = excluded.frontier,
             idle = excluded.idle,
             updated_at = now()",
    )
    .bind(topic)
    .bind(partition)
    .bind(topics)
    .bind(parts)
    .bind(offsets)
    .bind(elements)
    .bind(frontiers)
    .bind(idle)
    .execute(&mut **tx)
    .await
    .map_err(query_error("store the second stage's source marks"))?;
    Ok(())
}

/// Adds the batch's rollups to `rollup_minute` in one statement.
async fn upsert_budgets(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[BudgetRow],
) -> Result<(), StorageError> {
    let users: Vec<&str> = rows.iter().map(|r| r.user_id.as_str()).collect();
    let periods: Vec<&str> = rows.iter().map(|r| r.period).collect();
    let starts: Vec<i64> = rows.iter().map(|r| r.period_start_ms).collect();
    let limits: Vec<i64> = rows.iter().map(|r| r.limit_micros).collect();
    let spent: Vec<i64> = rows.iter().map(|r| r.spent_micros).collect();
    let tokens: Vec<i64> = rows.iter().map(|r| r.tokens).collect();
    // The ledger's values are absolute: the latest write wins (DISTINCT ON keeps
    // one row per key if a caller repeats one; ORDER BY fixes the lock order).
    sqlx::query(
        "INSERT INTO budget_periods AS b (user_id, period, period_start, limit_micros, spent_micros, tokens)
         SELECT DISTINCT ON (u, p, s) u, p, to_timestamp(s / 1000.0), l, sp, t
         FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])
             WITH ORDINALITY AS x(u, p, s, l, sp, t, i)
         ORDER BY u, p, s, i DESC
         ON CONFLICT (user_id, period, period_start) DO UPDATE SET
             limit_micros = excluded.limit_micros,
             spent_micros = excluded.spent_micros,
             tokens = excluded.tokens,
             updated_at = now()",
    )
    .bind(&users)
    .bind(&periods)
    .bind(&starts)
    .bind(&limits)
    .bind(&spent)
    .bind(&tokens)
    .execute(&mut **tx)
    .await
    .map_err(query_error("upsert budget periods"))?;
    Ok(())
}

async fn upsert_rollups(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[RollupRow],
) -> Result<(), StorageError> {
    let n = rows.len();
    let mut user_ids = Vec::with_capacity(n);
    let mut key_ids = Vec::with_capacity(n);
    let mut minutes = Vec::with_capacity(n);
    let mut requests = Vec::with_capacity(n);
    let mut prompt_tokens = Vec::with_capacity(n);
    let mut completion_tokens = Vec::with_capacity(n);
    let mut cost_micros = Vec::with_capacity(n);
    let mut errors = Vec::with_capacity(n);
    let mut latency_sum_ms = Vec::with_capacity(n);
    let mut latency_max_ms = Vec::with_capacity(n);
    for r in rows {
        user_ids.push(r.user_id.as_str());
        key_ids.push(r.key_id.as_str());
        minutes.push(r.minute_ms);
        requests.push(r.requests);
        prompt_tokens.push(r.prompt_tokens);
        completion_tokens.push(r.completion_tokens);
        cost_micros.push(r.cost_micros);
        errors.push(r.errors);
        latency_sum_ms.push(r.latency_sum_ms);
        latency_max_ms.push(r.latency_max_ms);
    }
    // GROUP BY keeps the statement valid even if a caller repeats a (user,
    // key, minute) within a batch (ON CONFLICT DO UPDATE may touch a row only
    // once per statement); ORDER BY takes row locks in one order for everyone.
    sqlx::query(
        "INSERT INTO rollup_minute AS r (user_id, key_id, minute, requests, prompt_tokens,
             completion_tokens, cost_micros, errors, latency_sum_ms, latency_max_ms)
         SELECT u, k, to_timestamp(m / 1000.0), sum(rq), sum(pt), sum(ct), sum(c), sum(e),
             sum(ls), max(lm)
         FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[],
             $7::int8[], $8::int8[], $9::int8[], $10::int8[])
             AS b(u, k, m, rq, pt, ct, c, e, ls, lm)
         GROUP BY u, k, m
         ORDER BY u, k, m
         ON CONFLICT (user_id, key_id, minute) DO UPDATE SET
             requests = r.requests + excluded.requests,
             prompt_tokens = r.prompt_tokens + excluded.prompt_tokens,
             completion_tokens = r.completion_tokens + excluded.completion_tokens,
             cost_micros = r.cost_micros + excluded.cost_micros,
             errors = r.errors + excluded.errors,
             latency_sum_ms = r.latency_sum_ms + excluded.latency_sum_ms,
             latency_max_ms = GREATEST(r.latency_max_ms, excluded.latency_max_ms)",
    )
    .bind(user_ids)
    .bind(key_ids)
    .bind(minutes)
    .bind(requests)
    .bind(prompt_tokens)
    .bind(completion_tokens)
    .bind(cost_micros)
    .bind(errors)
    .bind(latency_sum_ms)
    .bind(latency_max_ms)
    .execute(&mut **tx)
    .await
    .map_err(query_error("upsert rollups"))?;
    Ok(())
}

/// A batch's alerts as one array per column, ready to bind.
struct AlertColumns<'a> {
    ids: Vec<&'a str>,
    kinds: Vec<&'static str>,
    severities: Vec<&'static str>,
    actions: Vec<&'static str>,
    user_ids: Vec<&'a str>,
    key_ids: Vec<Option<&'a str>>,
    ips: Vec<Option<&'a str>>,
    ts_ms: Vec<i64>,
    observed: Vec<Option<f64>>,
    baseline: Vec<Option<f64>>,
    threshold: Vec<Option<f64>>,
    budgets: Vec<Option<String>>,
    expires_ms: Vec<Option<i64>>,
    reasons: Vec<&'a str>,
    documents: Vec<String>,
}

impl<'a> AlertColumns<'a> {
    fn new(alerts: &'a [Alert]) -> Result<Self, StorageError> {
        let n = alerts.len();
        let mut c = AlertColumns {
            ids: Vec::with_capacity(n),
            kinds: Vec::with_capacity(n),
            severities: Vec::with_capacity(n),
            actions: Vec::with_capacity(n),
            user_ids: Vec::with_capacity(n),
            key_ids: Vec::with_capacity(n),
            ips: Vec::with_capacity(n),
            ts_ms: Vec::with_capacity(n),
            observed: Vec::with_capacity(n),
            baseline: Vec::with_capacity(n),
            threshold: Vec::with_capacity(n),
            budgets: Vec::with_capacity(n),
            expires_ms: Vec::with_capacity(n),
            reasons: Vec::with_capacity(n),
            documents: Vec::with_capacity(n),
        };
        for a in alerts {
            let encode = |source| StorageError::Encode {
                alert_id: a.id.clone(),
                source,
            };
            c.ids.push(a.id.as_str());
            c.kinds.push(a.kind.as_str());
            c.severities.push(a.severity.as_str());
            c.actions.push(a.action.as_str());
            c.user_ids.push(a.user_id.as_str());
            c.key_ids.push(a.key_id.as_deref());
            c.ips.push(a.ip.as_deref());
            c.ts_ms.push(a.ts);
            c.observed.push(a.observed);
            c.baseline.push(a.baseline);
            c.threshold.push(a.threshold);
            c.budgets.push(
                a.budget
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(encode)?,
            );
            c.expires_ms.push(a.expires_at);
            c.reasons.push(a.reason.as_str());
            c.documents.push(serde_json::to_string(a).map_err(encode)?);
        }
        Ok(c)
    }

    /// Inserts the alerts and, for the ones not stored before, their
    /// revocation actions and outbox rows: one statement, one INSERT per table.
    async fn insert(self, tx: &mut Transaction<'_, Postgres>) -> Result<(), StorageError> {
        // Only alerts this statement inserted (RETURNING) get actions and
        // outbox rows: a replay must not requeue an alert the dispatcher has
        // already delivered, or revive an action someone lifted.
        sqlx::query(
            "WITH new_alerts AS (
                 INSERT INTO alerts (id, kind, severity, action, user_id, key_id, ip, ts,
                     observed, baseline, threshold, budget, expires_at, reason, alert)
                 SELECT id, kind, severity, action, user_id, key_id, ip,
                     to_timestamp(ts_ms / 1000.0), observed, baseline, threshold, budget::jsonb,
                     to_timestamp(expires_ms / 1000.0), reason, alert::jsonb
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::int8[], $9::float8[], $10::float8[],
                     $11::float8[], $12::text[], $13::int8[], $14::text[], $15::text[])
                     AS b(id, kind, severity, action, user_id, key_id, ip, ts_ms, observed,
                         baseline, threshold, budget, expires_ms, reason, alert)
                 ORDER BY id
                 ON CONFLICT (id) DO NOTHING
                 RETURNING id, action, user_id, key_id, ip, reason, ts, expires_at
             ),
             new_actions AS (
                 INSERT INTO revocation_actions (key_id, user_id, ip, action, reason, alert_id,
                     issued_at, expires_at)
                 SELECT key_id,
                     -- An address action (no key, an address) names no account;
                     -- a key's alert may carry an address only as context.
                     CASE WHEN key_id IS NULL AND ip IS NOT NULL THEN '' ELSE user_id END,
                     CASE WHEN key_id IS NULL THEN ip END,
                     action, reason, id, ts, expires_at
                 FROM new_alerts
                 WHERE action IN ($16, $17)
                 ORDER BY ts, id
                 ON CONFLICT (alert_id) DO NOTHING
             )
             INSERT INTO alert_outbox (alert_id)
             SELECT id FROM new_alerts ORDER BY id
             ON CONFLICT DO NOTHING",
        )
        .bind(self.ids)
        .bind(self.kinds)
        .bind(self.severities)
        .bind(self.actions)
        .bind(self.user_ids)
        .bind(self.key_ids)
        .bind(self.ips)
        .bind(self.ts_ms)
        .bind(self.observed)
        .bind(self.baseline)
        .bind(self.threshold)
        .bind(self.budgets)
        .bind(self.expires_ms)
        .bind(self.reasons)
        .bind(self.documents)
        .bind(Action::Throttle.as_str())
        .bind(Action::Block.as_str())
        .execute(&mut **tx)
        .await
        .map_err(query_error(
            "insert alerts, revocation actions and outbox rows",
        ))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(sizes: &[usize]) -> Vec<Entry> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Entry {
                kind: EntryKind::Dedup,
                id: format!("0.{i}").into(),
                state: vec![0; n],
            })
            .collect()
    }

    #[test]
    fn statements_hold_a_bounded_number_of_entries_and_bytes() {
        let runs = |sizes: &[usize]| {
            let e = entries(sizes);
            statements(&e).map(<[Entry]>::len).collect::<Vec<_>>()
        };
        assert_eq!(runs(&[1; 6_000]), vec![5_000, 1_000]);
        let mb = 1 << 20;
        assert_eq!(runs(&[10 * mb, 10 * mb, 5 * mb]), vec![1, 2]);
        assert_eq!(runs(&[20 * mb, 1]), vec![1, 1], "a larger entry goes alone");
        assert!(runs(&[]).is_empty());
    }
}
