//! Settings of the Kafka pipeline.

use std::collections::BTreeMap;
use std::path::PathBuf;

use detectors::decode::Format;
use serde::{Deserialize, Serialize};

/// One input topic: its name, and the format its records are in when it
/// is not `kafka.format`.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TopicEntry {
    /// A topic read in `kafka.format`.
    Name(String),
    /// A topic with its own format.
    Table {
        /// The topic.
        name: String,
        /// Its records' format.
        format: Format,
    },
}

impl TopicEntry {
    /// The topic's name.
    pub fn name(&self) -> &str {
        match self {
            TopicEntry::Name(n) | TopicEntry::Table { name: n, .. } => n,
        }
    }
}

/// The table form of a topic entry, read strictly (an unknown field or
/// format is named in the error).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicTable {
    name: String,
    format: Format,
}

impl<'de> Deserialize<'de> for TopicEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = TopicEntry;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a topic name, or a table { name = \"...\", format = \"...\" }")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TopicEntry, E> {
                Ok(TopicEntry::Name(v.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TopicEntry, A::Error> {
                let t = TopicTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(TopicEntry::Table {
                    name: t.name,
                    format: t.format,
                })
            }
        }
        d.deserialize_any(Entry)
    }
}

impl From<&str> for TopicEntry {
    fn from(s: &str) -> Self {
        TopicEntry::Name(s.to_string())
    }
}

/// Where the records come from and where bad ones go.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated (`host:port,host:port`).
    pub brokers: String,
    /// Topics of gateway records, keyed by `user_id` (so one user's records
    /// stay in one partition): a name (read in `format`), or a table
    /// `{ name = "kong-logs", format = "kong" }`.
    pub topics: Vec<TopicEntry>,
    /// The log format of topics listed by name only: `canonical`,
    /// `litellm`, `kong`, `apisix`, `envoy-ai-gateway`, or `auto` (each
    /// record's format recognised by its shape).
    pub format: Format,
    /// Consumer group: instances with the same group split the partitions.
    pub group_id: String,
    /// Topic for records that cannot be decoded, with headers naming their origin and the error.
    pub dead_letter_topic: String,
    /// Where a partition with no stored offset starts: `earliest` or `latest`.
    pub start_from: StartFrom,
    /// Further librdkafka settings passed through unchanged: security
    /// (`security.protocol`, `sasl.mechanisms`, `sasl.username`,
    /// `sasl.password`, `ssl.ca.location`, …) and tuning. Values are never
    /// logged. keywatch sets `enable.auto.commit=false` itself: offsets live
    /// in Postgres.
    pub settings: BTreeMap<String, String>,
    /// librdkafka settings whose values come from environment variables at
    /// start-up: setting name to variable name (`"sasl.password" =
    /// "KAFKA_PASSWORD"`), so secrets stay out of the file.
    pub settings_from_env: BTreeMap<String, String>,
    /// This instance's static group membership id (`group.instance.id`,
    /// KIP-345), unique per instance and stable across its restarts (a pod
    /// or host name): a restart then takes its partitions back at once
    /// instead of after the session timeout. Unset: dynamic membership.
    pub instance_id: Option<String>,
    /// The second stage: its internal topic and consumer group.
    #[serde(default)]
    pub subjects: SubjectsTopicConfig,
}

/// The second stage's internal topic (see `detectors::subject`): stage one
/// writes each record's projection there, routed by subject (address,
/// network, key, prompt); stage two reads it in a consumer group of its own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SubjectsTopicConfig {
    /// Runs the second stage (key cycling, credential stuffing, key sharing,
    /// prompt farming across accounts). Off: nothing is projected.
    pub enabled: bool,
    /// The internal topic.
    pub topic: String,
    /// Its partitions, when keywatch creates it (an existing topic keeps its
    /// own; adding partitions later moves subjects to other partitions, and
    /// their learned state with them is relearned).
    pub partitions: i32,
    /// Its replication factor, when keywatch creates it.
    pub replication: i32,
    /// The second stage's consumer group (default: `kafka.group_id` + `.subjects`).
    pub group_id: Option<String>,
    /// A stage-one partition that has read nothing for this many milliseconds
    /// tells the second stage it is idle, so its event time is not waited for.
    pub idle_after_ms: u64,
}

impl Default for SubjectsTopicConfig {
    fn default() -> Self {
        SubjectsTopicConfig {
            enabled: true,
            topic: "keywatch.by-subject".into(),
            partitions: 6,
            replication: 1,
            group_id: None,
            idle_after_ms: 2000,
        }
    }
}

/// Where a partition with no offset stored in Postgres starts reading.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The oldest record the broker still has.
    #[default]
    Earliest,
    /// Only records produced from now on.
    Latest,
}

impl StartFrom {
    /// librdkafka's `auto.offset.reset` value.
    pub fn as_str(self) -> &'static str {
        match self {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".into(),
            topics: vec!["gateway-events".into()],
            format: Format::Canonical,
            group_id: "keywatch".into(),
            dead_letter_topic: "gateway-events-dlq".into(),
            start_from: StartFrom::Earliest,
            settings: BTreeMap::new(),
            settings_from_env: BTreeMap::new(),
            instance_id: None,
            subjects: SubjectsTopicConfig::default(),
        }
    }
}

/// How partitions are worked. Each partition's worker holds one open batch
/// and hands it, closed, to its committer, reading on while that batch
/// commits; it waits for that commit before it hands over the next, so
/// memory per partition is bounded by two batches (`batch_max_records`
/// each), and a slow Postgres slows the read rather than growing a queue.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// A batch closes at this many records…
    pub batch_max_records: usize,
    /// …or this many milliseconds after its first record, whichever comes first.
    pub batch_max_ms: u64,
    /// The engine is checkpointed this often (seconds; what changed since
    /// the last checkpoint, stored behind the batches), and always on a
    /// partition's first commit, on revoke and on shutdown; after a crash a
    /// partition resumes from its checkpoint and re-reads (without writing)
    /// up to its committed offset.
    pub checkpoint_interval_secs: u64,
    /// A periodic checkpoint is written at most this fast per partition
    /// (megabytes a second; 0: as fast as Postgres takes it), so that a
    /// checkpoint of many active accounts does not take Postgres from the
    /// batches behind it.
    pub checkpoint_write_mb_per_sec: u64,
    /// The rollups (`rollup_minute`, `address_minute`), budget ledger rows
    /// and second-stage marks are held in memory across batches and
    /// written this many seconds after the last write, in a transaction of
    /// their own beside the batches (0: in every batch's transaction), and
    /// always with a checkpoint (so at least every
    /// `checkpoint_interval_secs`), in a partition's first and last
    /// commit, and when a partition holds `batch_max_records` rows; alerts,
    /// actions and the offset still commit with every batch. An account
    /// active every few seconds then costs one row update a flush instead
    /// of one a record. After a crash the records since the last flush are
    /// re-read and their rollups rebuilt (`consumer_offsets.rollups_offset`).
    pub rollup_flush_secs: u64,
    /// Directory of the Parquet lake (`dt=YYYY-MM-DD/<topic>-<partition>-<first>-<last>.parquet`); unset: no Parquet.
    pub parquet_dir: Option<PathBuf>,
    /// The largest record read, in bytes (a Kafka message or an NDJSON
    /// line); a larger one is dead-lettered (`record: N bytes, more than
    /// pipeline.max_record_bytes`) with only its first 64 KiB kept, and a
    /// line on standard input is dropped as it is read, never held.
    pub max_record_bytes: usize,
}

/// The least and most `pipeline.max_record_bytes` may be.
pub const RECORD_BYTES_RANGE: std::ops::RangeInclusive<usize> = 1024..=(1 << 30);

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            batch_max_records: 20_000,
            batch_max_ms: 500,
            checkpoint_interval_secs: 60,
            checkpoint_write_mb_per_sec: 4,
            rollup_flush_secs: 10,
            parquet_dir: Some(PathBuf::from("keywatch-data/lake")),
            max_record_bytes: crate::ndjson::MAX_LINE_BYTES,
        }
    }
}

/// Why a pipeline setting was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct PipelineConfigError {
    /// The dotted path of the field at fault.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl KafkaConfig {
    /// The second stage's consumer group.
    pub fn subjects_group(&self) -> String {
        self.subjects
            .group_id
            .clone()
            .unwrap_or_else(|| format!("{}.subjects", self.group_id))
    }

    /// The input topics' names.
    pub fn topic_names(&self) -> Vec<&str> {
        self.topics.iter().map(TopicEntry::name).collect()
    }

    /// The format `topic`'s records are read in.
    pub fn format_of(&self, topic: &str) -> Format {
        self.topics
            .iter()
            .find_map(|t| match t {
                TopicEntry::Table { name, format } if name == topic => Some(*format),
                _ => None,
            })
            .unwrap_or(self.format)
    }

    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<(), PipelineConfigError> {
        let bad = |field, problem: &str| {
            Err(PipelineConfigError {
                field,
                problem: problem.to_string(),
            })
        };
        if self.brokers.trim().is_empty() {
            return bad("kafka.brokers", "must name at least one broker");
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.name().trim().is_empty()) {
            return bad("kafka.topics", "must list at least one topic, none empty");
        }
        for (i, t) in self.topics.iter().enumerate() {
            if self.topics[..i].iter().any(|u| u.name() == t.name()) {
                return bad("kafka.topics", "lists a topic twice");
            }
        }
        if self.group_id.trim().is_empty() {
            return bad("kafka.group_id", "must not be empty");
        }
        if self.dead_letter_topic.trim().is_empty()
            || self
                .topics
                .iter()
                .any(|t| t.name() == self.dead_letter_topic)
        {
            return bad(
                "kafka.dead_letter_topic",
                "must be set and differ from the input topics",
            );
        }
        let sc = &self.subjects;
        if sc.topic.trim().is_empty()
            || sc.topic == self.dead_letter_topic
            || self.topics.iter().any(|t| t.name() == sc.topic)
        {
            return bad(
                "kafka.subjects.topic",
                "must be set and differ from the input and dead-letter topics",
            );
        }
        if sc.partitions < 1 || sc.replication < 1 {
            return bad(
                "kafka.subjects",
                "partitions and replication must be at least 1",
            );
        }
        if sc.idle_after_ms == 0 {
            return bad("kafka.subjects.idle_after_ms", "must be at least 1");
        }
        if self.subjects_group() == self.group_id {
            return bad("kafka.subjects.group_id", "must differ from kafka.group_id");
        }
        if let Some(id) = &self.instance_id {
            if id.trim().is_empty() || id.len() > 249 || id.chars().any(char::is_control) {
                return bad(
                    "kafka.instance_id",
                    "must be 1 to 249 characters without control characters",
                );
            }
        }
        for k in [
            "enable.auto.commit",
            "group.id",
            "bootstrap.servers",
            "group.instance.id",
        ] {
            if self.settings.contains_key(k) || self.settings_from_env.contains_key(k) {
                return bad("kafka.settings", &format!("{k} is set by keywatch (use the dedicated field, or offsets live in Postgres)"));
            }
        }
        Ok(())
    }

    /// The librdkafka settings in force: `settings`, plus `settings_from_env`
    /// read from the environment (a missing variable is an error naming it).
    pub fn client_settings(&self) -> Result<BTreeMap<String, String>, PipelineConfigError> {
        let mut all = self.settings.clone();
        for (k, var) in &self.settings_from_env {
            let v = std::env::var(var).map_err(|_| PipelineConfigError {
                field: "kafka.settings_from_env",
                problem: format!("{k}: environment variable {var} is not set"),
            })?;
            all.insert(k.clone(), v);
        }
        Ok(all)
    }
}

impl PipelineConfig {
    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<(), PipelineConfigError> {
        let bad = |field, problem: &str| {
            Err(PipelineConfigError {
                field,
                problem: problem.to_string(),
            })
        };
        if self.batch_max_records == 0 {
            return bad("pipeline.batch_max_records", "must be at least 1");
        }
        if self.batch_max_ms == 0 {
            return bad("pipeline.batch_max_ms", "must be at least 1");
        }
        if self.checkpoint_interval_secs == 0 {
            return bad("pipeline.checkpoint_interval_secs", "must be at least 1");
        }
        if !RECORD_BYTES_RANGE.contains(&self.max_record_bytes) {
            return bad(
                "pipeline.max_record_bytes",
                &format!(
                    "must be from 1024 to 1073741824 (1 GiB), got {}",
                    self.max_record_bytes
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct K {
        kafka: KafkaConfig,
    }

    #[test]
    fn topics_take_a_name_or_a_table_with_a_format() {
        let k: K = toml::from_str(
            r#"[kafka]
topics = ["plain", { name = "kong-logs", format = "kong" }]
format = "auto""#,
        )
        .unwrap();
        assert_eq!(k.kafka.topic_names(), ["plain", "kong-logs"]);
        assert_eq!(k.kafka.format_of("plain"), Format::Auto);
        assert_eq!(k.kafka.format_of("kong-logs"), Format::Kong);
        assert!(k.kafka.validate().is_ok());
        for (text, want) in [
            (r#"topics = [{ name = "x", format = "kongg" }]"#, "kongg"),
            (r#"topics = [{ name = "x", fromat = "kong" }]"#, "fromat"),
            (r#"topics = [{ name = "x" }]"#, "format"),
            (r#"topics = [3]"#, "a topic name, or a table"),
        ] {
            let e = toml::from_str::<K>(&format!("[kafka]\n{text}"))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let twice: K = toml::from_str(
            r#"[kafka]
topics = ["a", { name = "a", format = "kong" }]"#,
        )
        .unwrap();
        assert_eq!(
            twice.kafka.validate().unwrap_err().to_string(),
            "kafka.topics: lists a topic twice"
        );
    }
}
