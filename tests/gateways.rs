//! Gateway log formats end to end: `keywatch simulate --format` writes the
//! same exchanges in each gateway's shape, detectors' adapters read them
//! back to the same per-user counts as the canonical records, and
//! `keywatch replay --format auto` reads a file mixing every format.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::*;
use detectors::decode::{split_records, Format, GatewayOptions, Origin, Piece};
use detectors::Decoder;

/// The gateway formats `keywatch simulate --format` writes.
const GATEWAYS: [&str; 4] = ["litellm", "kong", "apisix", "envoy-ai-gateway"];

/// The simulated run every comparison uses: a couple of hundred accounts
/// over a night and a morning, attacks included (floods bring 429s).
const RUN: [&str; 6] = ["--users", "200", "--hours", "12", "--seed", "23"];

/// Envoy AI Gateway logs no identity: the operator adds the tenant header
/// the gateway enforces to the access-log format, and names it here.
const ACCOUNT_FIELD: &str = "x-tenant-id";

/// What one account did, as the decoded events say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Usage {
    requests: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// Requests answered with a status of 400 or more.
    errors: u64,
}

/// A decoded file: per-user usage, and the records and lines read.
struct Decoded {
    users: BTreeMap<String, Usage>,
    records: u64,
    lines: u64,
    array_lines: u64,
    /// Events that name a prompt (its fingerprint).
    prompts: u64,
}

fn decoder(format: Format) -> Decoder {
    let options = match format {
        Format::EnvoyAiGateway => GatewayOptions {
            account_header: Some(ACCOUNT_FIELD.to_string()),
            ..GatewayOptions::default()
        },
        _ => GatewayOptions::default(),
    };
    Decoder::with_options(b"gateways-test-hash-key", options)
}

/// Decodes every record of `file` as `format` with detectors' decoder;
/// any record that does not decode fails the test.
fn decode_file(file: &Path, format: Format) -> Decoded {
    let dec = decoder(format);
    let text = std::fs::read(file).unwrap();
    let stream = file.display().to_string();
    let mut d = Decoded {
        users: BTreeMap::new(),
        records: 0,
        lines: 0,
        array_lines: 0,
        prompts: 0,
    };
    for (n, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        d.lines += 1;
        if line.first() == Some(&b'[') {
            d.array_lines += 1;
        }
        split_records(line, |piece| {
            let (bytes, element) = match piece {
                Piece::Record(bytes, element) => (bytes, element),
                Piece::Broken(_, i, e) => panic!("{format}: line {} element {i}: {e}", n + 1),
            };
            let origin = Origin {
                stream: &stream,
                partition: 0,
                offset: n as i64 + 1,
                element,
            };
            let (ev, read_as) = dec.decode_as(format, bytes, &origin).unwrap_or_else(|e| {
                panic!(
                    "{format}: line {}: {e}\n{}",
                    n + 1,
                    String::from_utf8_lossy(&bytes[..bytes.len().min(600)])
                )
            });
            assert_eq!(read_as, format);
            d.records += 1;
            d.prompts += u64::from(ev.prompt_fingerprint.is_some());
            let u = d.users.entry(ev.user_id.to_string()).or_default();
            u.requests += 1;
            u.prompt_tokens += ev.prompt_tokens;
            u.completion_tokens += ev.completion_tokens;
            u.errors += u64::from(ev.status.is_some_and(|s| s >= 400));
        });
    }
    d
}

fn simulate_as(dir: &Path, name: &str, extra: &[&str]) -> std::path::PathBuf {
    let (file, truth) = (
        dir.join(format!("{name}.ndjson")),
        dir.join(format!("{name}.truth.json")),
    );
    let args: Vec<&str> = RUN.iter().copied().chain(extra.iter().copied()).collect();
    simulate(&args, &file, &truth);
    file
}

#[test]
fn every_gateway_format_decodes_to_the_canonical_counts_per_user() {
    let dir = scratch("gateway-formats");
    // Gateways log whole exchanges, so the canonical reference has no
    // split records either.
    let canonical = decode_file(
        &simulate_as(&dir, "canonical", &["--split-fraction", "0"]),
        Format::Canonical,
    );
    let users: BTreeSet<&String> = canonical.users.keys().collect();
    let total = |f: fn(&Usage) -> u64| canonical.users.values().map(f).sum::<u64>();
    assert!(users.len() > 100, "{} users", users.len());
    assert!(total(|u| u.errors) > 20, "errors are exercised");
    assert!(total(|u| u.completion_tokens) > 0);
    for gateway in GATEWAYS {
        let format: Format = gateway.parse().unwrap();
        let logs_bodies = format != Format::EnvoyAiGateway;
        for (batch, payloads) in [(1usize, true), (7, true), (1, false)] {
            if !payloads && !logs_bodies {
                continue;
            }
            let b = batch.to_string();
            // A split fraction is ignored in a gateway format.
            let mut args = vec![
                "--format",
                gateway,
                "--batch",
                &b,
                "--split-fraction",
                "0.3",
            ];
            if !payloads {
                args.push("--no-payloads");
            }
            let what = args.join(" ");
            let name = format!("{gateway}-{batch}-{payloads}");
            let file = simulate_as(&dir, &name, &args);
            let got = decode_file(&file, format);
            // LiteLLM and APISIX log every body, Kong those of three keys in four.
            if logs_bodies && payloads {
                assert!(
                    got.prompts * 3 > got.records,
                    "{what}: {} prompts",
                    got.prompts
                );
            } else {
                assert_eq!(got.prompts, 0, "{what}: no bodies, no prompts");
            }
            assert_eq!(got.records, canonical.records, "{what}: records");
            if batch == 1 {
                assert_eq!((got.lines, got.array_lines), (got.records, 0), "{what}");
            } else {
                assert_eq!(got.lines, got.records.div_ceil(7), "{what}: lines");
                assert_eq!(got.array_lines, got.lines, "{what}: every line an array");
            }
            assert_eq!(
                got.users.keys().collect::<BTreeSet<_>>(),
                users,
                "{what}: users"
            );
            for (user, want) in &canonical.users {
                assert_eq!(&got.users[user], want, "{what}: {user}");
            }
        }
    }
    // Half a gigabyte of records: kept only when the test fails.
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn auto_reads_a_file_mixing_every_format() {
    let dir = scratch("gateway-auto");
    // Canonical with its split request/response records, the batching
    // gateways in arrays, the others one record a line.
    let parts = [
        ("canonical", vec![]),
        ("litellm", vec!["--format", "litellm", "--batch", "5"]),
        ("kong", vec!["--format", "kong"]),
        ("apisix", vec!["--format", "apisix", "--batch", "10"]),
        ("envoy-ai-gateway", vec!["--format", "envoy-ai-gateway"]),
    ];
    let mut want = BTreeMap::new();
    let mut files = Vec::new();
    for (name, args) in &parts {
        let file = simulate_as(&dir, name, args);
        let format: Format = name.parse().unwrap();
        want.insert(name.to_string(), decode_file(&file, format).records);
        files.push(std::fs::read_to_string(&file).unwrap());
    }
    // Line by line in turn, so neighbouring lines are of different formats.
    let mut iters: Vec<_> = files.iter().map(|f| f.lines()).collect();
    let mut mixed = String::new();
    loop {
        let before = mixed.len();
        for it in &mut iters {
            if let Some(l) = it.next() {
                mixed.push_str(l);
                mixed.push('\n');
            }
        }
        if mixed.len() == before {
            break;
        }
    }
    let input = dir.join("mixed.ndjson");
    std::fs::write(&input, mixed).unwrap();
    let o = keywatch()
        .args(["replay", "--format", "auto", "--json-summary"])
        .arg(&input)
        .env("KEYWATCH__GATEWAYS__ACCOUNT_HEADER", ACCOUNT_FIELD)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = summary(&o);
    let records: u64 = want.values().sum();
    assert_eq!(s["format"], "auto");
    assert_eq!(s["decode_errors"], 0, "{s}");
    assert_eq!(s["records"], records, "{s}");
    assert_eq!(s["decoded"], records, "{s}");
    let formats: BTreeMap<String, u64> = serde_json::from_value(s["formats"].clone()).unwrap();
    assert_eq!(formats, want, "records by format");
    assert!(s["array_lines"].as_u64().unwrap() > 0, "{s}");
    std::fs::remove_dir_all(&dir).unwrap();
}
