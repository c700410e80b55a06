//! The lake: each committed batch's events as one zstd Parquet file, named by
//! its Kafka offset range so that a replayed batch rewrites its file instead
//! of adding a second one.
//!
//! Layout: `<dir>/dt=YYYY-MM-DD/<topic>-<partition>-<first_offset>-<last_offset>.parquet`,
//! both offsets inclusive, `dt` the UTC date of the batch's first event (a
//! batch that straddles midnight keeps its later events in the earlier
//! day's directory: filter on `ts`, use `dt` to prune). Hive-style, so
//! DuckDB (`read_parquet('lake/*/*.parquet', hive_partitioning = true)`),
//! pyarrow and Spark read `dt` as a column.
//!
//! A file appears whole or not at all: it is written to a hidden temporary
//! file (`.<name>.<pid>-<n>.tmp`, which `*.parquet` globs skip), synced,
//! renamed over the final name, and the directory is synced.
//!
//! # Columns
//!
//! One row per event, in offset order. No prompt text and no raw keys: the
//! decoder never keeps them.
//!
//! | column | Arrow type (Parquet) | null | meaning |
//! |---|---|---|---|
//! | `ts` | Timestamp(ms, UTC) (INT64 TIMESTAMP(MILLIS, UTC)) | no | event time |
//! | `request_id` | Utf8 (STRING) | no | the gateway's request id |
//! | `phase` | Utf8 | no | `exchange`, `request` or `response` |
//! | `user_id` | Utf8 | no | the account |
//! | `key_id` | Utf8 | no | the key id (`kh_` + keyed hash when the log had a raw key) |
//! | `tier` | Utf8 | yes | the tier the record named |
//! | `ip` | Utf8 | yes | client address |
//! | `asn` | UInt32 (INT32 unsigned) | yes | client network (autonomous system number) |
//! | `endpoint` | Utf8 | yes | API endpoint |
//! | `model` | Utf8 | yes | model name |
//! | `status` | UInt16 (INT32 unsigned 16) | yes | HTTP status |
//! | `prompt_tokens` | Int64 | no | input tokens counted by this record |
//! | `completion_tokens` | Int64 | no | output tokens counted by this record |
//! | `cost_usd` | Float64 | yes | cost in US dollars |
//! | `latency_ms` | Int64 | yes | response latency |
//! | `prompt_fingerprint` | Utf8 | yes | keyed hash of the prompt |
//! | `kafka_offset` | Int64 | no | the record's Kafka offset (the topic and partition are in the file name) |
//! | `duplicate` | Boolean | no | a repeat of (`request_id`, `phase`) that the detectors ignored |
//! | `repaired` | Utf8 | yes | descriptive fields the decoder cut or dropped because they broke the contract, comma-separated (`user_agent,model`); null when none: the record was counted all the same |
//! | `kafka_element` | UInt32 | yes | the record's index in its message's JSON array (Kong, APISIX and LiteLLM batch records so); null when the message was one record |
//! | `format` | Utf8 | no | the log format the record was read as (`canonical`, `litellm`, `kong`, `apisix`, `envoy-ai-gateway`) |
//!
//! Token counts are `u64` in memory and Int64 in the file (every lake engine
//! reads signed 64-bit integers; no token count comes near 2^63).

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use ::parquet::arrow::ArrowWriter;
use ::parquet::basic::{Compression, ZstdLevel};
use ::parquet::file::properties::WriterProperties;
use arrow_array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray, UInt16Array, UInt32Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::error::StorageError;

/// One event as the lake stores it (no prompt text, no raw keys: the decoder never keeps them).
#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    /// Event time, Unix milliseconds.
    pub ts_ms: i64,
    /// The gateway's request id.
    pub request_id: String,
    /// `exchange`, `request` or `response`.
    pub phase: &'static str,
    /// The account.
    pub user_id: String,
    /// The key id.
    pub key_id: String,
    /// The tier the record named.
    pub tier: Option<String>,
    /// Client address.
    pub ip: Option<String>,
    /// Client network.
    pub asn: Option<u32>,
    /// API endpoint.
    pub endpoint: Option<String>,
    /// Model name.
    pub model: Option<String>,
    /// HTTP status.
    pub status: Option<u16>,
    /// Input tokens counted by this record.
    pub prompt_tokens: u64,
    /// Output tokens counted by this record.
    pub completion_tokens: u64,
    /// Cost in US dollars.
    pub cost_usd: Option<f64>,
    /// Response latency, milliseconds.
    pub latency_ms: Option<u64>,
    /// Keyed hash of the prompt.
    pub prompt_fingerprint: Option<String>,
    /// The record's Kafka offset.
    pub offset: i64,
    /// A repeat that the detectors ignored.
    pub duplicate: bool,
    /// Descriptive fields cut or dropped by the decoder, comma-separated.
    pub repaired: Option<String>,
    /// The record's index in its message's JSON array, if the message held one.
    pub element: Option<u32>,
    /// The log format the record was read as.
    pub format: &'static str,
}

/// The Arrow schema of a lake file (see the module docs for the table).
pub fn event_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new(
                    "ts",
                    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                    false,
                ),
                Field::new("request_id", DataType::Utf8, false),
                Field::new("phase", DataType::Utf8, false),
                Field::new("user_id", DataType::Utf8, false),
                Field::new("key_id", DataType::Utf8, false),
                Field::new("tier", DataType::Utf8, true),
                Field::new("ip", DataType::Utf8, true),
                Field::new("asn", DataType::UInt32, true),
                Field::new("endpoint", DataType::Utf8, true),
                Field::new("model", DataType::Utf8, true),
                Field::new("status", DataType::UInt16, true),
                Field::new("prompt_tokens", DataType::Int64, false),
                Field::new("completion_tokens", DataType::Int64, false),
                Field::new("cost_usd", DataType::Float64, true),
                Field::new("latency_ms", DataType::Int64, true),
                Field::new("prompt_fingerprint", DataType::Utf8, true),
                Field::new("kafka_offset", DataType::Int64, false),
                Field::new("duplicate", DataType::Boolean, false),
                Field::new("repaired", DataType::Utf8, true),
                Field::new("kafka_element", DataType::UInt32, true),
                Field::new("format", DataType::Utf8, false),
            ]))
        })
        .clone()
}

/// Writes the batch's events as a zstd Parquet file
/// `<dir>/dt=YYYY-MM-DD/<topic>-<partition>-<first_offset>-<last_offset>.parquet`
/// (dt = UTC date of the first event, or of `fallback_day_ms` when `rows` is
/// empty), atomically (temp file + fsync + rename), so writing the same range
/// again replaces the file instead of adding one. Returns the path.
///
/// `fallback_day_ms` must be the same when a batch is replayed (for example
/// the Kafka timestamp of the batch's first record, not the wall clock), or an
/// empty batch's file could land in a second `dt=` directory.
pub fn write_batch(
    dir: &Path,
    topic: &str,
    partition: i32,
    first_offset: i64,
    last_offset: i64,
    rows: &[EventRow],
    fallback_day_ms: i64,
) -> Result<PathBuf, StorageError> {
    check_topic(dir, topic)?;
    let day_ms = rows.first().map_or(fallback_day_ms, |r| r.ts_ms);
    let day_dir = dir.join(day_dir_name(day_ms));
    if !day_dir.is_dir() {
        fs::create_dir_all(&day_dir).map_err(io_error(&day_dir))?;
        // Make the new directory's entry durable too.
        sync_dir(dir)?;
    }
    let name = file_name(topic, partition, first_offset, last_offset);
    let path = day_dir.join(&name);

    // A unique temporary name: two writers of the same range (an old owner
    // that has not noticed it was fenced, and the new one) must never write
    // into the same temporary file.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = day_dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = write_file(&tmp, rows)
        .and_then(|()| fs::rename(&tmp, &path).map_err(io_error(&path)))
        .and_then(|()| sync_dir(&day_dir));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

/// Finds an existing file of this topic/partition starting at `first_offset`
/// (any dt= directory) and returns its last offset: a batch resumed after a
/// crash must end where the file ends, so it rewrites the same file.
///
/// Lists the `dt=` directories newest first and stops at the first match;
/// when there is none (the usual case after a clean shutdown) it lists them
/// all, so call it once per partition assignment, not per batch.
pub fn existing_batch_end(
    dir: &Path,
    topic: &str,
    partition: i32,
    first_offset: i64,
) -> Result<Option<i64>, StorageError> {
    check_topic(dir, topic)?;
    let mut days = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(io_error(dir))?;
                let name = entry.file_name();
                if name.to_str().is_some_and(|n| n.starts_with("dt=")) {
                    days.push(entry.path());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(dir)(e)),
    }
    // `dt=YYYY-MM-DD` sorts by date.
    days.sort_unstable_by(|a, b| b.cmp(a));
    let prefix = format!("{topic}-{partition}-{first_offset}-");
    for day in days {
        let entries = match fs::read_dir(&day) {
            Ok(entries) => entries,
            // Not a directory, or removed meanwhile.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                continue
            }
            Err(e) => return Err(io_error(&day)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error(&day))?;
            let name = entry.file_name();
            let Some(last) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|rest| rest.strip_suffix(".parquet"))
            else {
                continue;
            };
            // Only digits: "a-1-5-7.parquet" must not match topic "a-1-5" files.
            if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(last) = last.parse::<i64>() {
                    return Ok(Some(last));
                }
            }
        }
    }
    Ok(None)
}

/// `<topic>-<partition>-<first_offset>-<last_offset>.parquet`.
fn file_name(topic: &str, partition: i32, first_offset: i64, last_offset: i64) -> String {
    format!("{topic}-{partition}-{first_offset}-{last_offset}.parquet")
}

/// `dt=YYYY-MM-DD` of the UTC day holding `ms`.
fn day_dir_name(ms: i64) -> String {
    let (y, m, d) = detectors::time::civil_from_days(ms.div_euclid(86_400_000));
    format!("dt={y:04}-{m:02}-{d:02}")
}

/// Kafka topic names are `[a-zA-Z0-9._-]`, at most 249 bytes; anything else
/// could escape `dir` or break the name parsing.
fn check_topic(dir: &Path, topic: &str) -> Result<(), StorageError> {
    let legal = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if legal {
        Ok(())
    } else {
        Err(StorageError::Io {
            path: dir.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{topic:?} is not a legal Kafka topic name"),
            ),
        })
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// Encodes `rows` into `path` and syncs it.
fn write_file(path: &Path, rows: &[EventRow]) -> Result<(), StorageError> {
    let parquet_error = |source| StorageError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let batch = record_batch(rows).map_err(|e| parquet_error(e.into()))?;
    let file = File::create(path).map_err(io_error(path))?;
    // zstd level 1: most of level 3's ratio on this data for a fraction of
    // the CPU, which the hot path shares with decoding and detection. Columns
    // unique per row (request ids, fingerprints, addresses, offsets) skip
    // dictionary encoding: a dictionary as large as the column costs time and
    // saves nothing.
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).map_err(parquet_error)?,
        ))
        .set_created_by(concat!("keywatch ", env!("CARGO_PKG_VERSION")).to_owned());
    for column in [
        "request_id",
        "prompt_fingerprint",
        "ip",
        "kafka_offset",
        "ts",
    ] {
        props = props.set_column_dictionary_enabled(column.into(), false);
    }
    let props = props.build();
    let mut writer = ArrowWriter::try_new(BufWriter::new(file), batch.schema(), Some(props))
        .map_err(parquet_error)?;
    // An empty batch still gets a file: it carries the schema, and its name
    // records the offset range.
    if !rows.is_empty() {
        writer.write(&batch).map_err(parquet_error)?;
    }
    let mut out = writer.into_inner().map_err(parquet_error)?;
    out.flush().map_err(io_error(path))?;
    let file = out
        .into_inner()
        .map_err(|e| io_error(path)(e.into_error()))?;
    file.sync_all().map_err(io_error(path))
}

/// The events as one Arrow record batch of [`event_schema`].
fn record_batch(rows: &[EventRow]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    fn strings<'a>(rows: &'a [EventRow], f: impl Fn(&'a EventRow) -> &'a str) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    }
    fn opt_strings<'a>(
        rows: &'a [EventRow],
        f: impl Fn(&'a EventRow) -> Option<&'a str>,
    ) -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    }
    // Saturate rather than wrap; see the module docs.
    let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.ts_ms))
                .with_timezone("UTC"),
        ),
        strings(rows, |r| &r.request_id),
        strings(rows, |r| r.phase),
        strings(rows, |r| &r.user_id),
        strings(rows, |r| &r.key_id),
        opt_strings(rows, |r| r.tier.as_deref()),
        opt_strings(rows, |r| r.ip.as_deref()),
        Arc::new(rows.iter().map(|r| r.asn).collect::<UInt32Array>()),
        opt_strings(rows, |r| r.endpoint.as_deref()),
        opt_strings(rows, |r| r.model.as_deref()),
        Arc::new(rows.iter().map(|r| r.status).collect::<UInt16Array>()),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| signed(r.prompt_tokens)),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| signed(r.completion_tokens)),
        )),
        Arc::new(rows.iter().map(|r| r.cost_usd).collect::<Float64Array>()),
        Arc::new(
            rows.iter()
                .map(|r| r.latency_ms.map(signed))
                .collect::<Int64Array>(),
        ),
        opt_strings(rows, |r| r.prompt_fingerprint.as_deref()),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.duplicate))
                .collect::<BooleanArray>(),
        ),
        opt_strings(rows, |r| r.repaired.as_deref()),
        Arc::new(rows.iter().map(|r| r.element).collect::<UInt32Array>()),
        strings(rows, |r| r.format),
    ];
    RecordBatch::try_new(event_schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use ::parquet::file::reader::{FileReader, SerializedFileReader};
    use arrow_array::Array;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "kw-lake-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// 2026-11-23T14:02:11.120Z
    const TS: i64 = 1_795_442_531_120;

    fn row(offset: i64) -> EventRow {
        EventRow {
            ts_ms: TS + offset * 1000,
            request_id: format!("req-{offset}"),
            phase: "exchange",
            user_id: "acct_42".into(),
            key_id: "kh_abc".into(),
            tier: Some("pro".into()),
            ip: Some("203.0.113.7".into()),
            asn: Some(64_500),
            endpoint: Some("/v1/chat/completions".into()),
            model: Some("gpt-4o".into()),
            status: Some(200),
            prompt_tokens: 120,
            completion_tokens: 80 + offset as u64,
            cost_usd: Some(0.0015),
            latency_ms: Some(900),
            prompt_fingerprint: Some("pf_1".into()),
            offset,
            duplicate: false,
            repaired: None,
            element: None,
            format: "canonical",
        }
    }

    fn read(path: &Path) -> Vec<RecordBatch> {
        let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
        assert_eq!(builder.schema(), &event_schema());
        builder.build().unwrap().map(|b| b.unwrap()).collect()
    }

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for day in fs::read_dir(dir).unwrap() {
            for f in fs::read_dir(day.unwrap().path()).unwrap() {
                out.push(f.unwrap().path());
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_batch_reads_back_with_the_arrow_reader() {
        let dir = TempDir::new("read");
        let mut rows: Vec<EventRow> = (100..=102).map(row).collect();
        rows[1].phase = "request";
        rows[1].asn = None;
        rows[1].status = None;
        rows[1].cost_usd = None;
        rows[1].latency_ms = None;
        rows[1].tier = None;
        rows[2].duplicate = true;
        rows[1].repaired = Some("user_agent,model".into());
        rows[2].prompt_tokens = u64::MAX;

        let path = write_batch(&dir.0, "gateway-logs", 3, 100, 102, &rows, 0).unwrap();
        assert_eq!(
            path,
            dir.0
                .join("dt=2026-11-23")
                .join("gateway-logs-3-100-102.parquet")
        );

        let batches = read(&path);
        let total: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(total, 3);
        let b = &batches[0];
        let col = |name: &str| b.column(b.schema().index_of(name).unwrap()).clone();
        let ts = col("ts");
        let ts = ts
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .unwrap();
        assert_eq!(ts.value(0), TS + 100_000);
        let users = col("user_id");
        let users = users.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(users.value(2), "acct_42");
        let phase = col("phase");
        let phase = phase.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(phase.value(1), "request");
        let asn = col("asn");
        let asn = asn.as_any().downcast_ref::<UInt32Array>().unwrap();
        assert_eq!((asn.value(0), asn.is_null(1)), (64_500, true));
        let status = col("status");
        let status = status.as_any().downcast_ref::<UInt16Array>().unwrap();
        assert_eq!((status.value(0), status.is_null(1)), (200, true));
        let tier = col("tier");
        assert!(tier.is_null(1) && !tier.is_null(0));
        let cost = col("cost_usd");
        let cost = cost.as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!((cost.value(0), cost.is_null(1)), (0.0015, true));
        let pt = col("prompt_tokens");
        let pt = pt.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!((pt.value(0), pt.value(2)), (120, i64::MAX));
        let offsets = col("kafka_offset");
        let offsets = offsets.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(offsets.values().to_vec(), vec![100, 101, 102]);
        let dup = col("duplicate");
        let dup = dup.as_any().downcast_ref::<BooleanArray>().unwrap();
        assert_eq!((dup.value(0), dup.value(2)), (false, true));
        let repaired = col("repaired");
        let repaired = repaired.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(
            (repaired.is_null(0), repaired.value(1)),
            (true, "user_agent,model")
        );

        // zstd, as promised.
        let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
        let rg = reader.metadata().row_group(0);
        assert!(rg
            .columns()
            .iter()
            .all(|c| matches!(c.compression(), Compression::ZSTD(_))));
    }

    #[test]
    fn rewriting_a_range_replaces_its_file() {
        let dir = TempDir::new("rewrite");
        let first: Vec<EventRow> = (0..10).map(row).collect();
        let p1 = write_batch(&dir.0, "t", 0, 0, 9, &first, 0).unwrap();
        let mut second = first.clone();
        second[0].user_id = "acct_7".into();
        let p2 = write_batch(&dir.0, "t", 0, 0, 9, &second, 0).unwrap();
        assert_eq!(p1, p2);
        assert_eq!(files(&dir.0), vec![p1.clone()], "one file, no temporaries");
        let batches = read(&p1);
        let users = batches[0]
            .column(3)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .value(0)
            .to_owned();
        assert_eq!(users, "acct_7");
    }

    #[test]
    fn an_empty_batch_is_filed_under_the_fallback_day() {
        let dir = TempDir::new("empty");
        let path = write_batch(&dir.0, "t", 1, 5, 9, &[], 86_400_000 * 2 + 1).unwrap();
        assert_eq!(path, dir.0.join("dt=1970-01-03").join("t-1-5-9.parquet"));
        assert_eq!(read(&path).iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    }

    #[test]
    fn existing_batch_end_finds_the_file_of_a_start_offset() {
        let dir = TempDir::new("end");
        assert_eq!(
            existing_batch_end(&dir.0.join("missing"), "t", 0, 0).unwrap(),
            None
        );
        assert_eq!(existing_batch_end(&dir.0, "t", 0, 0).unwrap(), None);

        let day1: Vec<EventRow> = (100..=200).map(row).collect();
        let mut day2: Vec<EventRow> = (201..=300).map(row).collect();
        day2[0].ts_ms += 86_400_000;
        write_batch(&dir.0, "t", 0, 100, 200, &day1, 0).unwrap();
        write_batch(&dir.0, "t", 0, 201, 300, &day2, 0).unwrap();
        // Look-alikes that must not match: another partition, a topic whose
        // name extends ours, and stray files.
        write_batch(&dir.0, "t", 1, 100, 150, &day1[..51], 0).unwrap();
        write_batch(&dir.0, "t-0-100", 7, 8, 9, &[], TS).unwrap();
        fs::write(dir.0.join("dt=2026-11-23").join("t-0-100-.parquet"), b"").unwrap();
        fs::write(dir.0.join("README"), b"").unwrap();

        assert_eq!(existing_batch_end(&dir.0, "t", 0, 100).unwrap(), Some(200));
        assert_eq!(existing_batch_end(&dir.0, "t", 0, 201).unwrap(), Some(300));
        assert_eq!(existing_batch_end(&dir.0, "t", 1, 100).unwrap(), Some(150));
        assert_eq!(existing_batch_end(&dir.0, "t", 0, 150).unwrap(), None);
        assert_eq!(existing_batch_end(&dir.0, "t", 0, 301).unwrap(), None);
        assert_eq!(existing_batch_end(&dir.0, "t", 2, 100).unwrap(), None);
    }

    #[test]
    fn day_directories_are_utc_dates() {
        assert_eq!(day_dir_name(0), "dt=1970-01-01");
        assert_eq!(day_dir_name(-1), "dt=1969-12-31");
        assert_eq!(day_dir_name(TS), "dt=2026-11-23");
        assert_eq!(day_dir_name(1_709_164_800_000), "dt=2024-02-29");
    }

    #[test]
    fn illegal_topic_names_are_refused() {
        let dir = TempDir::new("topic");
        for topic in ["", "..", "a/b", "../x", "a b"] {
            let err = write_batch(&dir.0, topic, 0, 0, 0, &[], 0).unwrap_err();
            assert!(matches!(err, StorageError::Io { .. }), "{topic:?}: {err}");
            assert!(existing_batch_end(&dir.0, topic, 0, 0).is_err());
        }
    }
}
