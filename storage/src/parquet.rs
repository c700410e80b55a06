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

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use ::parquet::arrow::ArrowWriter;
use ::parquet::basic::{Compression, ZstdLevel};
use ::parquet::file::properties::WriterProperties;
use arrow_array::builder::{
    ArrayBuilder, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMillisecondBuilder, UInt16Builder, UInt32Builder,
};
use arrow_array::{Array, ArrayRef, RecordBatch, TimestampMillisecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

use detectors::decode::Format;
use detectors::Event;

use crate::error::StorageError;

/// Where a lake row's record came from: its message's offset, its index in
/// the message's JSON array, the format it was read as.
#[derive(Clone, Copy, Debug)]
pub struct RowOrigin {
    /// The message's Kafka offset.
    pub offset: i64,
    /// The record's index in the message's JSON array, if it held one.
    pub element: Option<u32>,
    /// The format the record was read as.
    pub format: Format,
}

/// A batch's lake rows, built column by column as its events are counted:
/// each value goes straight from the decoded event into its Arrow column
/// (no row structs, no owned strings per record), and [`LakeRows::finish`]
/// hands the columns over as one record batch, leaving the builder empty
/// for the next batch. No prompt text and no raw keys: the decoder never
/// keeps them.
pub struct LakeRows {
    ts: TimestampMillisecondBuilder,
    request_id: StringBuilder,
    phase: StringBuilder,
    user_id: StringBuilder,
    key_id: StringBuilder,
    tier: StringBuilder,
    ip: StringBuilder,
    asn: UInt32Builder,
    endpoint: StringBuilder,
    model: StringBuilder,
    status: UInt16Builder,
    prompt_tokens: Int64Builder,
    completion_tokens: Int64Builder,
    cost_usd: Float64Builder,
    latency_ms: Int64Builder,
    prompt_fingerprint: StringBuilder,
    offset: Int64Builder,
    duplicate: BooleanBuilder,
    repaired: StringBuilder,
    element: UInt32Builder,
    format: StringBuilder,
}

impl Default for LakeRows {
    fn default() -> Self {
        LakeRows {
            ts: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            request_id: StringBuilder::new(),
            phase: StringBuilder::new(),
            user_id: StringBuilder::new(),
            key_id: StringBuilder::new(),
            tier: StringBuilder::new(),
            ip: StringBuilder::new(),
            asn: UInt32Builder::new(),
            endpoint: StringBuilder::new(),
            model: StringBuilder::new(),
            status: UInt16Builder::new(),
            prompt_tokens: Int64Builder::new(),
            completion_tokens: Int64Builder::new(),
            cost_usd: Float64Builder::new(),
            latency_ms: Int64Builder::new(),
            prompt_fingerprint: StringBuilder::new(),
            offset: Int64Builder::new(),
            duplicate: BooleanBuilder::new(),
            repaired: StringBuilder::new(),
            element: UInt32Builder::new(),
            format: StringBuilder::new(),
        }
    }
}

impl LakeRows {
    /// Adds a decoded record's row.
    pub fn push(&mut self, ev: &Event<'_>, at: RowOrigin, duplicate: bool) {
        // Saturate rather than wrap; see the module docs.
        let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.ts.append_value(ev.ts_ms);
        self.request_id.append_value(&ev.request_id);
        self.phase.append_value(ev.phase.as_str());
        self.user_id.append_value(&ev.user_id);
        self.key_id.append_value(&ev.key_id);
        self.tier.append_option(ev.tier.as_deref());
        match ev.ip {
            Some(ip) => {
                // Written in place: an address's text is never its own String.
                let _ = write!(self.ip, "{ip}");
                self.ip.append_value("");
            }
            None => self.ip.append_null(),
        }
        self.asn.append_option(ev.asn);
        self.endpoint.append_option(ev.endpoint.as_deref());
        self.model.append_option(ev.model.as_deref());
        self.status.append_option(ev.status);
        self.prompt_tokens.append_value(signed(ev.prompt_tokens));
        self.completion_tokens
            .append_value(signed(ev.completion_tokens));
        self.cost_usd.append_option(ev.cost_usd);
        self.latency_ms.append_option(ev.latency_ms.map(signed));
        self.prompt_fingerprint
            .append_option(ev.prompt_fingerprint.as_deref());
        self.offset.append_value(at.offset);
        self.duplicate.append_value(duplicate);
        if ev.repaired == 0 {
            self.repaired.append_null();
        } else {
            for (i, field) in detectors::decode::repaired_fields(ev.repaired).enumerate() {
                let _ = write!(self.repaired, "{}{field}", if i == 0 { "" } else { "," });
            }
            self.repaired.append_value("");
        }
        self.element.append_option(at.element);
        self.format.append_value(at.format.as_str());
    }

    /// How many rows were added since the last [`LakeRows::finish`].
    pub fn len(&self) -> usize {
        self.ts.len()
    }

    /// Whether no row was added since the last [`LakeRows::finish`].
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows so far as one record batch of [`event_schema`], in the
    /// order they were added; the builder is empty after.
    pub fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.ts.finish()),
            Arc::new(self.request_id.finish()),
            Arc::new(self.phase.finish()),
            Arc::new(self.user_id.finish()),
            Arc::new(self.key_id.finish()),
            Arc::new(self.tier.finish()),
            Arc::new(self.ip.finish()),
            Arc::new(self.asn.finish()),
            Arc::new(self.endpoint.finish()),
            Arc::new(self.model.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.prompt_tokens.finish()),
            Arc::new(self.completion_tokens.finish()),
            Arc::new(self.cost_usd.finish()),
            Arc::new(self.latency_ms.finish()),
            Arc::new(self.prompt_fingerprint.finish()),
            Arc::new(self.offset.finish()),
            Arc::new(self.duplicate.finish()),
            Arc::new(self.repaired.finish()),
            Arc::new(self.element.finish()),
            Arc::new(self.format.finish()),
        ];
        RecordBatch::try_new(event_schema(), columns)
            .expect("the builders make the schema's columns, of equal length")
    }
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

/// Writes the batch's events (a record batch of [`event_schema`], as
/// [`LakeRows::finish`] makes) as a zstd Parquet file
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
    rows: &RecordBatch,
    fallback_day_ms: i64,
) -> Result<PathBuf, StorageError> {
    check_topic(dir, topic)?;
    if rows.schema_ref() != &event_schema() {
        return Err(StorageError::Parquet {
            path: dir.to_path_buf(),
            source: ::parquet::errors::ParquetError::General(format!(
                "a lake batch must have the lake's schema (storage::parquet::event_schema), not {}",
                rows.schema_ref()
            )),
        });
    }
    let day_ms = rows
        .column(0)
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .filter(|ts| !ts.is_empty())
        .map_or(fallback_day_ms, |ts| ts.value(0));
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
fn write_file(path: &Path, batch: &RecordBatch) -> Result<(), StorageError> {
    let parquet_error = |source| StorageError::Parquet {
        path: path.to_path_buf(),
        source,
    };
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
    if batch.num_rows() > 0 {
        writer.write(batch).map_err(parquet_error)?;
    }
    let mut out = writer.into_inner().map_err(parquet_error)?;
    out.flush().map_err(io_error(path))?;
    let file = out
        .into_inner()
        .map_err(|e| io_error(path)(e.into_error()))?;
    file.sync_all().map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use ::parquet::file::reader::{FileReader, SerializedFileReader};
    use arrow_array::{
        BooleanArray, Float64Array, Int64Array, StringArray, UInt16Array, UInt32Array,
    };
    use detectors::Phase;

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

    /// The lake rows of offsets `offsets`: one exchange each of account
    /// `acct_42`, every field set, then changed by `edit` (the row's index,
    /// its event, whether it is a duplicate).
    fn rows(
        offsets: std::ops::RangeInclusive<i64>,
        edit: impl Fn(usize, &mut Event<'static>, &mut bool),
    ) -> RecordBatch {
        let mut lake = LakeRows::default();
        for (i, offset) in offsets.enumerate() {
            let mut ev = Event::new(TS + offset * 1000, "", "acct_42", "kh_abc");
            ev.request_id = format!("req-{offset}").into();
            ev.tier = Some("pro".into());
            ev.ip = Some("203.0.113.7".parse().unwrap());
            ev.asn = Some(64_500);
            ev.endpoint = Some("/v1/chat/completions".into());
            ev.model = Some("gpt-4o".into());
            ev.status = Some(200);
            ev.prompt_tokens = 120;
            ev.completion_tokens = 80 + offset as u64;
            ev.cost_usd = Some(0.0015);
            ev.latency_ms = Some(900);
            ev.prompt_fingerprint = Some("pf_1".into());
            let mut duplicate = false;
            edit(i, &mut ev, &mut duplicate);
            let at = RowOrigin {
                offset,
                element: None,
                format: Format::Canonical,
            };
            lake.push(&ev, at, duplicate);
        }
        lake.finish()
    }

    fn as_is(_: usize, _: &mut Event<'static>, _: &mut bool) {}

    fn empty() -> RecordBatch {
        LakeRows::default().finish()
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
        let rows = rows(100..=102, |i, ev, duplicate| match i {
            1 => {
                ev.phase = Phase::Request;
                ev.asn = None;
                ev.status = None;
                ev.cost_usd = None;
                ev.latency_ms = None;
                ev.tier = None;
                ev.ip = Some("2001:db8::7".parse().unwrap());
                // user_agent and model (bits 10 and 12) were repaired.
                ev.repaired = (1 << 10) | (1 << 12);
            }
            2 => {
                *duplicate = true;
                ev.prompt_tokens = u64::MAX;
            }
            _ => {}
        });

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
        let ip = col("ip");
        let ip = ip.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!((ip.value(0), ip.value(1)), ("203.0.113.7", "2001:db8::7"));
        let format = col("format");
        let format = format.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(format.value(2), "canonical");
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
        let first = rows(0..=9, as_is);
        let p1 = write_batch(&dir.0, "t", 0, 0, 9, &first, 0).unwrap();
        let second = rows(0..=9, |i, ev, _| {
            if i == 0 {
                ev.user_id = "acct_7".into();
            }
        });
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
        let path = write_batch(&dir.0, "t", 1, 5, 9, &empty(), 86_400_000 * 2 + 1).unwrap();
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

        let day1 = rows(100..=200, as_is);
        let day2 = rows(201..=300, |i, ev, _| {
            if i == 0 {
                ev.ts_ms += 86_400_000;
            }
        });
        write_batch(&dir.0, "t", 0, 100, 200, &day1, 0).unwrap();
        write_batch(&dir.0, "t", 0, 201, 300, &day2, 0).unwrap();
        // Look-alikes that must not match: another partition, a topic whose
        // name extends ours, and stray files.
        write_batch(&dir.0, "t", 1, 100, 150, &day1.slice(0, 51), 0).unwrap();
        write_batch(&dir.0, "t-0-100", 7, 8, 9, &empty(), TS).unwrap();
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
    fn a_batch_of_another_schema_is_refused() {
        let dir = TempDir::new("schema");
        let other = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("ts", DataType::Int64, false)])),
            vec![Arc::new(Int64Array::from(vec![1]))],
        )
        .unwrap();
        let err = write_batch(&dir.0, "t", 0, 0, 0, &other, 0).unwrap_err();
        assert!(format!("{err:?}").contains("the lake's schema"), "{err:?}");
        assert_eq!(
            existing_batch_end(&dir.0, "t", 0, 0).unwrap(),
            None,
            "no file written"
        );
    }

    #[test]
    fn illegal_topic_names_are_refused() {
        let dir = TempDir::new("topic");
        for topic in ["", "..", "a/b", "../x", "a b"] {
            let err = write_batch(&dir.0, topic, 0, 0, 0, &empty(), 0).unwrap_err();
            assert!(matches!(err, StorageError::Io { .. }), "{topic:?}: {err}");
            assert!(existing_batch_end(&dir.0, topic, 0, 0).is_err());
        }
    }
}
