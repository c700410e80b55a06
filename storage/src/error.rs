//! What can go wrong at the durable edge, and which of it is worth retrying.

use std::path::PathBuf;

/// A failure of the Postgres store or of the Parquet writer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The pool could not be opened: a bad URL, an unreachable server or a refused login.
    #[error("cannot connect to Postgres")]
    Connect(#[source] sqlx::Error),
    /// A migration failed, or the database holds migrations this build does not know
    /// (or whose text changed since they were applied).
    #[error("cannot migrate the database")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A statement failed; `what` names the step (`"begin"`, `"insert alerts"`, ...).
    #[error("Postgres failed to {what}")]
    Query {
        /// The step that failed.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Another consumer moved this partition's offset since this one loaded it:
    /// this consumer no longer owns the partition, and nothing of the batch was stored.
    #[error("{topic}[{partition}] is fenced: the batch starts at offset {expected} but the stored offset is {stored}")]
    Fenced {
        /// The Kafka topic.
        topic: String,
        /// The Kafka partition.
        partition: i32,
        /// The batch's start offset.
        expected: i64,
        /// The offset found in `consumer_offsets` (-1 if the row vanished meanwhile).
        stored: i64,
    },
    /// A rollup flush expected the stored rollups to end where its rows
    /// start, and they do not (its earlier attempt landed, or another
    /// consumer flushed), or the batches it covers are not committed:
    /// nothing of it was stored.
    #[error("{topic}[{partition}]: the rollups flush starts at offset {expected} but the stored rollups end at {stored}")]
    RollupsFenced {
        /// The Kafka topic.
        topic: String,
        /// The Kafka partition.
        partition: i32,
        /// Where the flush's rows start.
        expected: i64,
        /// Where the stored rollups end (-1 if the row is missing).
        stored: i64,
    },
    /// The batch's offsets go backwards (`next_offset < start_offset`): a caller bug.
    #[error("{topic}[{partition}]: batch offsets go backwards ({start_offset} to {next_offset})")]
    OffsetsBackwards {
        /// The Kafka topic.
        topic: String,
        /// The Kafka partition.
        partition: i32,
        /// The batch's start offset.
        start_offset: i64,
        /// The batch's next offset.
        next_offset: i64,
    },
    /// A stored row breaks the schema's promises (a hand edit, a foreign writer).
    #[error("corrupt row in {what}")]
    Corrupt {
        /// The table, partition and row.
        what: String,
    },
    /// An alert could not be rendered as JSON.
    #[error("cannot encode alert {alert_id} as JSON")]
    Encode {
        /// The alert's id.
        alert_id: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// Parquet (or Arrow) refused to encode or write a file.
    #[error("cannot write Parquet file {}", path.display())]
    Parquet {
        /// The file being written.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: parquet::errors::ParquetError,
    },
    /// A file system operation failed.
    #[error("file system error at {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// Wraps a driver error with the step that failed, for `map_err`.
pub(crate) fn query_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> StorageError {
    move |source| StorageError::Query { what, source }
}

impl StorageError {
    /// The error and every cause under it, `: `-separated, for a log line
    /// (`Display` alone names only the step that failed).
    pub fn detail(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }

    /// Whether the same call may succeed if tried again after a pause: lost or
    /// refused connections, pool timeouts, serialization failures and deadlocks,
    /// a server shutting down or starting up, and file system errors (a full disk
    /// may be freed). Not retryable: [`StorageError::Fenced`] (the partition is
    /// gone: stop its task and reload), schema, constraint and data errors (the
    /// same batch fails the same way).
    pub fn is_transient(&self) -> bool {
        match self {
            // A transaction that could not begin has done nothing: whatever
            // kept it from starting (a restart, a database closed to new
            // connections, a rotated password) is worth waiting out, loudly.
            StorageError::Query { what: "begin", .. } => true,
            StorageError::Connect(e) | StorageError::Query { source: e, .. } => transient_sqlx(e),
            StorageError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => transient_sqlx(e),
            StorageError::Io { .. } => true,
            StorageError::Parquet { source, .. } => {
                matches!(source, parquet::errors::ParquetError::External(e) if e.is::<std::io::Error>())
            }
            StorageError::Migrate(_)
            | StorageError::Fenced { .. }
            | StorageError::RollupsFenced { .. }
            | StorageError::OffsetsBackwards { .. }
            | StorageError::Corrupt { .. }
            | StorageError::Encode { .. } => false,
        }
    }
}

fn transient_sqlx(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // SQLSTATE classes: 08 connection exception, 40001 serialization
            // failure, 40P01 deadlock, 53 insufficient resources, 57P0x shutdown
            // or not yet accepting connections.
            code.starts_with("08")
                || code.starts_with("53")
                || matches!(&*code, "40001" | "40P01" | "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}
