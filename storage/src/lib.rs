//! keywatch's durable edge: the Postgres schema (sqlx migrations), the batch
//! commit that stores rollups, alerts, revocation actions, outbox rows,
//! detector state and Kafka offsets in one transaction, and the Parquet
//! writer for the lake. It arrives with the Kafka ingest issue; until then
//! `keywatch replay` runs the detectors without storage.
