//! Every SQL example in docs/storage.md runs against the real schema
//! (created by `keywatch migrate` in a fresh database), so the documented
//! queries cannot rot.

mod common;

use common::services::Database;
use common::{keywatch, scratch};

#[test]
fn documented_queries_run_against_the_schema() {
    let db = Database::create("docs");
    let dir = scratch("docs-queries");
    let cfg = dir.join("keywatch.toml");
    std::fs::write(&cfg, format!("[postgres]\nurl = \"{}\"\n", db.url)).unwrap();
    // Migrating a second time is a no-op.
    for attempt in 1..=2 {
        let o = keywatch()
            .args(["migrate", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "migrate #{attempt}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/storage.md")).unwrap();
    let mut ran = 0;
    for block in doc.split("```sql").skip(1) {
        let sql = block.split("```").next().unwrap().trim();
        if sql.contains("read_parquet") {
            continue; // DuckDB over the lake, not Postgres
        }
        db.try_query(sql)
            .unwrap_or_else(|e| panic!("documented query failed: {e}\n{sql}"));
        ran += 1;
    }
    assert!(ran >= 6, "only {ran} queries found");
}
