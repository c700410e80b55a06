//! docker-compose.yml, the Dockerfile, .dockerignore and
//! deploy/keywatch.compose.toml, checked without a Docker engine: the
//! compose file parses and hangs together (images, dependencies, ports,
//! mounts, healthchecks), the keywatch service's configuration loads through
//! the real binary (a typo in a `KEYWATCH__…` name fails), its email receiver
//! builds and points at Mailpit, its addresses name the compose services,
//! and the Dockerfile builds the whole workspace into a non-root image whose
//! entrypoint is keywatch. When `docker compose` is installed, its own
//! `config --quiet` must accept the file too (skipped otherwise).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_norway::{Mapping, Value as Yaml};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn root() -> &'static Path {
    Path::new(ROOT)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

// ------------------------------------------------------------ compose ---

fn compose() -> Yaml {
    let mut v: Yaml = serde_norway::from_str(&read("docker-compose.yml"))
        .unwrap_or_else(|e| panic!("docker-compose.yml is not valid YAML: {e}"));
    v.apply_merge()
        .expect("docker-compose.yml: YAML merge keys");
    v
}

fn services(c: &Yaml) -> &Mapping {
    c.get("services")
        .and_then(Yaml::as_mapping)
        .expect("docker-compose.yml: `services` must be a mapping")
}

fn service<'a>(c: &'a Yaml, name: &str) -> &'a Yaml {
    services(c)
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml: no service `{name}`"))
}

fn service_names(c: &Yaml) -> BTreeSet<String> {
    services(c)
        .keys()
        .map(|k| k.as_str().expect("service names are strings").to_string())
        .collect()
}

fn each_service(c: &Yaml) -> impl Iterator<Item = (&str, &Yaml)> {
    services(c)
        .iter()
        .map(|(k, v)| (k.as_str().expect("service names are strings"), v))
}

fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Compose's variable interpolation as a fresh `docker compose up` sees it
/// with no variable set (no `.env`): `${X:-d}` and `${X-d}` give `d`, `${X}`
/// and `$X` give nothing, `$$` gives `$`; `${X:?}` (required) fails.
fn interpolate(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {s:?}"));
            let expr = &r[..end];
            let name_len = expr
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(expr.len());
            assert!(name_len > 0, "bad variable in {s:?}");
            let op = &expr[name_len..];
            if let Some(d) = op.strip_prefix(":-").or_else(|| op.strip_prefix('-')) {
                out.push_str(d);
            } else if op.starts_with(":?") || op.starts_with('?') {
                panic!("{s:?} requires a variable to be set: the stack must come up without one");
            } else {
                assert!(
                    op.is_empty() || op.starts_with(":+") || op.starts_with('+'),
                    "unsupported interpolation {expr:?} in {s:?}"
                );
            }
            rest = &r[end + 1..];
        } else {
            let name_len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            rest = &after[name_len..];
        }
    }
    out.push_str(rest);
    out
}

/// A service's `environment:` (mapping or `K=V` list), interpolated; a
/// variable without a value (passed through from the host) is left out.
fn environment(svc: &Yaml) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    match svc.get("environment") {
        None => {}
        Some(Yaml::Mapping(m)) => {
            for (k, v) in m {
                let k = k.as_str().expect("environment names are strings");
                if let Some(v) = scalar(v) {
                    env.insert(k.to_string(), interpolate(&v));
                }
            }
        }
        Some(Yaml::Sequence(items)) => {
            for item in items {
                let item = item.as_str().expect("environment entries are strings");
                if let Some((k, v)) = item.split_once('=') {
                    env.insert(k.to_string(), interpolate(v));
                }
            }
        }
        Some(other) => panic!("environment must be a mapping or a list, not {other:?}"),
    }
    env
}

/// `depends_on:` as (target, condition).
fn depends_on(svc: &Yaml) -> Vec<(String, String)> {
    match svc.get("depends_on") {
        None => vec![],
        Some(Yaml::Sequence(items)) => items
            .iter()
            .map(|i| (i.as_str().unwrap().to_string(), "service_started".into()))
            .collect(),
        Some(Yaml::Mapping(m)) => m
            .iter()
            .map(|(k, v)| {
                let cond = v
                    .get("condition")
                    .and_then(Yaml::as_str)
                    .unwrap_or("service_started");
                (k.as_str().unwrap().to_string(), cond.to_string())
            })
            .collect(),
        Some(other) => panic!("depends_on must be a list or a mapping, not {other:?}"),
    }
}

/// One published port: host address, host port range (None: ephemeral),
/// container port range, protocol.
#[derive(Debug)]
struct Port {
    host_ip: String,
    host: Option<(u16, u16)>,
    container: (u16, u16),
    protocol: String,
}

fn port_range(s: &str) -> (u16, u16) {
    let parse = |p: &str| -> u16 {
        p.trim()
            .parse()
            .unwrap_or_else(|_| panic!("bad port {p:?}"))
    };
    match s.split_once('-') {
        Some((a, b)) => (parse(a), parse(b)),
        None => (parse(s), parse(s)),
    }
}

fn ports(svc: &Yaml) -> Vec<Port> {
    let Some(items) = svc.get("ports") else {
        return vec![];
    };
    let items = items.as_sequence().expect("ports must be a list");
    items
        .iter()
        .map(|item| match item {
            Yaml::Mapping(_) => {
                let published = item.get("published").and_then(scalar);
                Port {
                    host_ip: item
                        .get("host_ip")
                        .and_then(Yaml::as_str)
                        .unwrap_or("")
                        .to_string(),
                    host: published.map(|p| port_range(&interpolate(&p))),
                    container: port_range(&scalar(item.get("target").expect("target")).unwrap()),
                    protocol: item
                        .get("protocol")
                        .and_then(Yaml::as_str)
                        .unwrap_or("tcp")
                        .to_string(),
                }
            }
            other => {
                let s = interpolate(&scalar(other).expect("a port is a string or a number"));
                let (spec, protocol) = match s.split_once('/') {
                    Some((spec, proto)) => (spec.to_string(), proto.to_string()),
                    None => (s.clone(), "tcp".to_string()),
                };
                assert!(
                    !spec.starts_with('['),
                    "IPv6 host addresses are not parsed here: {s}"
                );
                let parts: Vec<&str> = spec.split(':').collect();
                let (host_ip, host, container) = match parts.as_slice() {
                    [c] => ("", None, *c),
                    [h, c] => ("", Some(*h), *c),
                    [ip, h, c] => (*ip, Some(*h), *c),
                    _ => panic!("bad port {s:?}"),
                };
                Port {
                    host_ip: host_ip.to_string(),
                    host: host.filter(|h| !h.is_empty()).map(port_range),
                    container: port_range(container),
                    protocol,
                }
            }
        })
        .collect()
}

/// One mount: source (host path or volume name), target, bind or volume.
#[derive(Debug)]
struct Mount {
    source: String,
    target: String,
    bind: bool,
}

fn mounts(svc: &Yaml) -> Vec<Mount> {
    let Some(items) = svc.get("volumes") else {
        return vec![];
    };
    items
        .as_sequence()
        .expect("volumes must be a list")
        .iter()
        .map(|item| match item {
            Yaml::String(s) => {
                let s = interpolate(s);
                let mut parts = s.splitn(3, ':');
                let source = parts.next().unwrap().to_string();
                let target = parts
                    .next()
                    .unwrap_or_else(|| panic!("anonymous volume {s:?}: give it a name"))
                    .to_string();
                let bind = source.starts_with('.') || source.starts_with('/');
                Mount {
                    source,
                    target,
                    bind,
                }
            }
            Yaml::Mapping(_) => Mount {
                source: interpolate(item.get("source").and_then(Yaml::as_str).unwrap_or("")),
                target: item
                    .get("target")
                    .and_then(Yaml::as_str)
                    .expect("target")
                    .to_string(),
                bind: item.get("type").and_then(Yaml::as_str) == Some("bind"),
            },
            other => panic!("bad volume {other:?}"),
        })
        .collect()
}

/// The keywatch service: the one built from this repository.
fn keywatch_service(c: &Yaml) -> &Yaml {
    let built: Vec<&str> = each_service(c)
        .filter(|(_, s)| s.get("build").is_some())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        built,
        ["keywatch"],
        "exactly one service, `keywatch`, is built from the Dockerfile"
    );
    service(c, "keywatch")
}

/// The keywatch container's environment: the image's `ENV`, then the
/// service's `environment:`.
fn keywatch_env(c: &Yaml) -> BTreeMap<String, String> {
    let mut env = dockerfile_env();
    env.extend(environment(keywatch_service(c)));
    env
}

/// The host file mounted at `target` in a service.
fn mounted_file(svc: &Yaml, target: &str) -> PathBuf {
    let m = mounts(svc)
        .into_iter()
        .find(|m| m.target == target)
        .unwrap_or_else(|| panic!("nothing is mounted at {target}"));
    assert!(
        m.bind,
        "{target} must be a file of the repository, bind-mounted"
    );
    let p = root().join(&m.source);
    assert!(
        p.is_file(),
        "{} (mounted at {target}) is not a file",
        m.source
    );
    p
}

// --------------------------------------------------------- config -----

/// keywatch.example.toml: every setting at its default.
fn example() -> toml::Table {
    read("keywatch.example.toml")
        .parse()
        .expect("keywatch.example.toml is TOML")
}

/// Every (section path, field) the example config names, set or shown in a
/// comment (fields without a default, such as `privacy.hash_key`, are
/// commented out there).
fn documented_fields() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    fn walk(prefix: &str, t: &toml::Table, out: &mut BTreeSet<String>) {
        for (k, v) in t {
            let p = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if let toml::Value::Table(t) = v {
                walk(&p, t, out);
            }
            out.insert(p);
        }
    }
    walk("", &example(), &mut out);
    let mut section = String::new();
    for line in read("keywatch.example.toml").lines() {
        let l = line.trim_start_matches('#').trim();
        if let Some(h) = l.strip_prefix('[') {
            section = h.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        if let Some((k, _)) = l.split_once('=') {
            let k = k.trim();
            if !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                out.insert(format!("{section}.{k}"));
            }
        }
    }
    out
}

/// A `KEYWATCH__A__B` name as the config path `a.b` (as src/config.rs reads it).
fn config_path(name: &str) -> Option<String> {
    let rest = name.strip_prefix("KEYWATCH__")?;
    let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
    assert!(
        parts.iter().all(|p| !p.is_empty()),
        "{name}: expected KEYWATCH__SECTION__FIELD"
    );
    Some(parts.join("."))
}

/// An override's value as src/config.rs reads it: TOML when it parses, else a string.
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The configuration the keywatch container runs with: the defaults (the
/// example file spells them out), the mounted config file, the environment.
fn effective_config(c: &Yaml) -> toml::Table {
    let env = keywatch_env(c);
    let svc = keywatch_service(c);
    let mut cfg = example();
    let file = env
        .get("KEYWATCH_CONFIG")
        .map(|p| mounted_file(svc, p))
        .expect("KEYWATCH_CONFIG names the mounted config file");
    let text = std::fs::read_to_string(&file).unwrap();
    merge(&mut cfg, text.parse().expect("the mounted config is TOML"));
    for (name, raw) in &env {
        let Some(path) = config_path(name) else {
            continue;
        };
        let parts: Vec<&str> = path.split('.').collect();
        let (last, parents) = parts.split_last().unwrap();
        let mut t = &mut cfg;
        for p in parents {
            t = t
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("{name}: {p} is not a section"));
        }
        t.insert(last.to_string(), env_value(raw));
    }
    cfg
}

fn get<'a>(t: &'a toml::Table, path: &str) -> &'a toml::Value {
    let mut parts = path.split('.');
    let mut v = t.get(parts.next().unwrap()).expect(path);
    for p in parts {
        v = v.get(p).unwrap_or_else(|| panic!("config has no {path}"));
    }
    v
}

// ----------------------------------------------------------- dockerfile ---

/// A Dockerfile instruction: (upper-case op, arguments).
type Instr = (String, String);

/// A build stage.
struct Stage {
    /// The FROM image.
    image: String,
    /// `AS name`.
    name: Option<String>,
    /// The instructions after FROM.
    body: Vec<Instr>,
}

/// Dockerfile instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<Instr> {
    let mut out = vec![];
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let full = std::mem::take(&mut current);
        let full = full.trim();
        if full.is_empty() {
            continue;
        }
        let (op, args) = full.split_once(char::is_whitespace).unwrap_or((full, ""));
        out.push((op.to_ascii_uppercase(), args.trim().to_string()));
    }
    out
}

/// Build stages.
fn stages() -> Vec<Stage> {
    let mut stages: Vec<Stage> = vec![];
    for (op, args) in dockerfile() {
        if op == "FROM" {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                [_] => None,
                _ => panic!("FROM {args}: expected IMAGE [AS NAME]"),
            };
            stages.push(Stage {
                image: words[0].to_string(),
                name,
                body: vec![],
            });
        } else if op != "ARG" || !stages.is_empty() {
            stages
                .last_mut()
                .unwrap_or_else(|| panic!("{op} before the first FROM"))
                .body
                .push((op, args));
        }
    }
    stages
}

/// `ENV` of the final stage.
fn dockerfile_env() -> BTreeMap<String, String> {
    let stages = stages();
    let last = stages.last().expect("a stage");
    let mut env = BTreeMap::new();
    for (op, args) in &last.body {
        if op != "ENV" {
            continue;
        }
        let words: Vec<&str> = args.split_whitespace().collect();
        if words.first().is_some_and(|w| !w.contains('=')) {
            env.insert(words[0].to_string(), words[1..].join(" "));
        } else {
            for w in words {
                let (k, v) = w.split_once('=').unwrap();
                env.insert(k.to_string(), v.trim_matches('"').to_string());
            }
        }
    }
    env
}

/// A COPY's flags, sources and destination.
fn copy_parts(args: &str) -> (Vec<String>, Vec<String>, String) {
    let words: Vec<String> = args.split_whitespace().map(String::from).collect();
    let (flags, rest): (Vec<String>, Vec<String>) =
        words.into_iter().partition(|w| w.starts_with("--"));
    let (dest, sources) = rest.split_last().expect("COPY SRC... DEST");
    (flags, sources.to_vec(), dest.clone())
}

fn normalize(p: &str) -> String {
    p.trim_start_matches("./").trim_end_matches('/').to_string()
}

fn json_array(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|_| panic!("{args}: use the exec (JSON array) form"))
}

/// What the workspace build reads: the root manifest and lock, every
/// member, every path dependency, and the root package's target files.
fn workspace_paths() -> BTreeSet<String> {
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let mut need: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "src"]
        .into_iter()
        .map(String::from)
        .collect();
    for m in get(&manifest, "workspace.members").as_array().unwrap() {
        need.insert(normalize(m.as_str().unwrap()));
    }
    if let Some(deps) = manifest["workspace"].get("dependencies") {
        for (_, d) in deps.as_table().unwrap() {
            if let Some(p) = d.get("path").and_then(toml::Value::as_str) {
                need.insert(normalize(p));
            }
        }
    }
    for kind in ["bin", "bench", "test", "example"] {
        for target in manifest
            .get(kind)
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
        {
            let path = match target.get("path").and_then(toml::Value::as_str) {
                Some(p) => p.to_string(),
                None if kind == "bench" => {
                    format!("benches/{}.rs", target["name"].as_str().unwrap())
                }
                None => continue,
            };
            need.insert(normalize(path.split('/').next().unwrap()));
        }
    }
    need
}

// ---------------------------------------------------------------- tests ---

#[test]
fn every_service_has_an_image_or_a_build() {
    let c = compose();
    let names = service_names(&c);
    for want in [
        "kafka",
        "kafka-init",
        "postgres",
        "mailpit",
        "grafana",
        "keywatch",
    ] {
        assert!(names.contains(want), "no `{want}` service: {names:?}");
    }
    for (name, svc) in each_service(&c) {
        let image = svc.get("image").and_then(Yaml::as_str).unwrap_or("");
        let build = svc.get("build");
        assert!(
            !image.is_empty() || build.is_some(),
            "service {name}: neither image nor build"
        );
        if let Some(b) = build {
            let context = match b {
                Yaml::String(s) => s.clone(),
                _ => b
                    .get("context")
                    .and_then(Yaml::as_str)
                    .unwrap_or(".")
                    .to_string(),
            };
            let dockerfile = b
                .get("dockerfile")
                .and_then(Yaml::as_str)
                .unwrap_or("Dockerfile");
            assert!(
                root().join(&context).join(dockerfile).is_file(),
                "service {name}: no {dockerfile} in build context {context}"
            );
        }
        if image.contains(':') {
            let tag = image.rsplit(':').next().unwrap();
            assert!(
                tag != "latest" && !tag.is_empty(),
                "service {name}: pin the image version ({image})"
            );
        }
    }
    let kafka = service(&c, "kafka");
    let image = kafka["image"].as_str().unwrap();
    assert!(image.starts_with("apache/kafka:3.9."), "{image}");
    let env = environment(kafka);
    assert_eq!(env["KAFKA_PROCESS_ROLES"], "broker,controller", "KRaft");
    let pg = service(&c, "postgres")["image"].as_str().unwrap();
    assert!(pg.starts_with("postgres:16"), "{pg}");
}

#[test]
fn depends_on_targets_exist_and_keywatch_waits_for_healthy_backends() {
    let c = compose();
    let names = service_names(&c);
    for (name, svc) in each_service(&c) {
        for (target, cond) in depends_on(svc) {
            assert!(
                names.contains(&target),
                "{name} depends on {target}, which is no service"
            );
            assert_ne!(name, target, "{name} depends on itself");
            assert!(
                [
                    "service_started",
                    "service_healthy",
                    "service_completed_successfully"
                ]
                .contains(&cond.as_str()),
                "{name} -> {target}: unknown condition {cond}"
            );
            if cond == "service_healthy" {
                let hc = service(&c, &target).get("healthcheck").unwrap_or_else(|| {
                    panic!(
                        "{name} waits for {target} to be healthy, but {target} has no healthcheck"
                    )
                });
                assert!(
                    hc.get("test").is_some() && hc.get("disable") != Some(&Yaml::Bool(true)),
                    "{target}: healthcheck without a test"
                );
            }
            if cond == "service_completed_successfully" {
                let restart = service(&c, &target)
                    .get("restart")
                    .and_then(Yaml::as_str)
                    .unwrap_or("no");
                assert_eq!(restart, "no", "{target} is a one-shot: it must not restart");
            }
        }
    }
    let deps: BTreeMap<String, String> = depends_on(keywatch_service(&c)).into_iter().collect();
    assert_eq!(
        deps.get("kafka").map(String::as_str),
        Some("service_healthy")
    );
    assert_eq!(
        deps.get("postgres").map(String::as_str),
        Some("service_healthy")
    );
    assert_eq!(
        deps.get("kafka-init").map(String::as_str),
        Some("service_completed_successfully"),
        "keywatch starts once its topics exist"
    );

    // No cycles: a topological order exists.
    let mut done: BTreeSet<String> = BTreeSet::new();
    while done.len() < names.len() {
        let ready: Vec<String> = each_service(&c)
            .filter(|(n, s)| {
                !done.contains(*n) && depends_on(s).iter().all(|(t, _)| done.contains(t))
            })
            .map(|(n, _)| n.to_string())
            .collect();
        assert!(!ready.is_empty(), "depends_on has a cycle among {names:?}");
        done.extend(ready);
    }
}

#[test]
fn host_ports_do_not_clash() {
    let c = compose();
    let mut published: Vec<(String, Port)> = vec![];
    for (name, svc) in each_service(&c) {
        for p in ports(svc) {
            if p.host.is_some() {
                published.push((name.to_string(), p));
            }
        }
    }
    assert!(!published.is_empty());
    let wildcard = |ip: &str| ip.is_empty() || ip == "0.0.0.0" || ip == "::";
    for (i, (a_name, a)) in published.iter().enumerate() {
        for (b_name, b) in &published[i + 1..] {
            let (a0, a1) = a.host.unwrap();
            let (b0, b1) = b.host.unwrap();
            let overlap = a0 <= b1 && b0 <= a1;
            let same_ip = a.host_ip == b.host_ip || wildcard(&a.host_ip) || wildcard(&b.host_ip);
            assert!(
                !(overlap && same_ip && a.protocol == b.protocol),
                "host port clash: {a_name} {a:?} and {b_name} {b:?}"
            );
        }
    }
    // What docs/deploy.md promises is where it says.
    let published_at = |svc: &str, container: u16| -> u16 {
        ports(service(&c, svc))
            .iter()
            .find(|p| p.container.0 == container)
            .and_then(|p| p.host)
            .unwrap_or_else(|| panic!("{svc}: container port {container} is not published"))
            .0
    };
    assert_eq!(published_at("grafana", 3000), 3000);
    assert_eq!(published_at("mailpit", 8025), 8025);
    assert_eq!(published_at("keywatch", 8787), 8787);
}

#[test]
fn mounts_exist_and_named_volumes_are_declared() {
    let c = compose();
    let declared: BTreeSet<String> = c
        .get("volumes")
        .and_then(Yaml::as_mapping)
        .map(|m| m.keys().map(|k| k.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    for (name, svc) in each_service(&c) {
        for m in mounts(svc) {
            if m.bind {
                assert!(
                    !m.source.starts_with('/'),
                    "{name}: bind-mount {} is outside the repository",
                    m.source
                );
                assert!(
                    root().join(&m.source).exists(),
                    "{name}: {} (mounted at {}) does not exist in the repository",
                    m.source,
                    m.target
                );
            } else {
                assert!(
                    declared.contains(&m.source),
                    "{name}: volume {} is not declared under `volumes:`",
                    m.source
                );
            }
        }
    }
}

#[test]
fn grafana_is_provisioned_from_the_repository() {
    let c = compose();
    let grafana = service(&c, "grafana");
    let ms = mounts(grafana);
    let mount = |target: &str| -> &Mount {
        ms.iter()
            .find(|m| m.target == target)
            .unwrap_or_else(|| panic!("grafana: nothing mounted at {target}"))
    };
    let prov = mount("/etc/grafana/provisioning");
    assert!(prov.bind && root().join(&prov.source).is_dir(), "{prov:?}");
    let env = environment(grafana);

    // The datasource reads its connection from grafana's environment.
    let ds_dir = root().join(&prov.source).join("datasources");
    let mut datasources = 0;
    for entry in std::fs::read_dir(&ds_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", ds_dir.display()))
        .map(Result::unwrap)
    {
        let text = std::fs::read_to_string(entry.path()).unwrap();
        let _: Yaml = serde_norway::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
        datasources += 1;
        for var in referenced_env(&text) {
            assert!(
                env.contains_key(&var),
                "{} reads ${var}, which the grafana service does not set",
                entry.path().display()
            );
        }
    }
    assert!(datasources > 0, "no datasource in {}", ds_dir.display());

    // Every dashboard provider's path is a directory mounted from the repository.
    let dash_dir = root().join(&prov.source).join("dashboards");
    let mut providers = 0;
    for entry in std::fs::read_dir(&dash_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dash_dir.display()))
        .map(Result::unwrap)
    {
        let y: Yaml = serde_norway::from_str(&std::fs::read_to_string(entry.path()).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
        for p in y
            .get("providers")
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
        {
            providers += 1;
            let path = p
                .get("options")
                .and_then(|o| o.get("path"))
                .and_then(Yaml::as_str)
                .expect("a file provider has options.path");
            let m = ms
                .iter()
                .filter(|m| path == m.target || path.starts_with(&format!("{}/", m.target)))
                .max_by_key(|m| m.target.len())
                .unwrap_or_else(|| panic!("grafana: provider path {path} is not mounted"));
            let host = root()
                .join(&m.source)
                .join(path[m.target.len()..].trim_start_matches('/'));
            assert!(
                host.is_dir(),
                "{path} -> {} is no directory",
                host.display()
            );
        }
    }
    assert!(
        providers > 0,
        "no dashboard provider in {}",
        dash_dir.display()
    );

    // The dashboard link in alert messages names a provisioned dashboard
    // and its variables.
    let cfg = effective_config(&c);
    let url = get(&cfg, "alerting.dashboard_url").as_str().unwrap();
    if let Some(rest) = url.split("/d/").nth(1) {
        let uid = rest.split(['/', '?']).next().unwrap();
        let mut dashboards = BTreeMap::new();
        collect_dashboards(&root().join("dashboards"), &mut dashboards);
        let vars = dashboards.get(uid).unwrap_or_else(|| {
            panic!(
                "alerting.dashboard_url links dashboard {uid}, not among {:?}",
                dashboards.keys()
            )
        });
        for part in url.split(['?', '&']).skip(1) {
            if let Some(var) = part.strip_prefix("var-") {
                let var = var.split('=').next().unwrap();
                assert!(
                    vars.contains(var),
                    "alerting.dashboard_url sets var-{var}; dashboard {uid} has {vars:?}"
                );
            }
        }
    }
}

/// `$NAME`, `${NAME}` and `$__env{NAME}` references (Grafana
/// provisioning's environment syntax; `$__file{…}` and the like are not).
fn referenced_env(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // Comments (which may show the syntax) do not count.
    let text: String = text
        .lines()
        .map(|l| {
            let cut = l
                .char_indices()
                .find(|&(i, c)| c == '#' && (i == 0 || l[..i].ends_with([' ', '\t'])))
                .map_or(l.len(), |(i, _)| i);
            format!("{}\n", &l[..cut])
        })
        .collect();
    for (i, _) in text.match_indices('$') {
        let rest = &text[i + 1..];
        let rest = rest.strip_prefix("__env{").unwrap_or(rest);
        if rest.starts_with("__") {
            continue;
        }
        let rest = rest.strip_prefix('{').unwrap_or(rest);
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit()) {
            out.insert(name);
        }
    }
    out
}

/// Dashboard JSON files under `dir`: uid -> template variable names.
fn collect_dashboards(dir: &Path, out: &mut BTreeMap<String, BTreeSet<String>>) {
    for entry in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .map(Result::unwrap)
    {
        let p = entry.path();
        if p.is_dir() {
            collect_dashboards(&p, out);
        } else if p.extension().is_some_and(|e| e == "json") {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            if let Some(uid) = v.get("uid").and_then(serde_json::Value::as_str) {
                let vars = v["templating"]["list"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t["name"].as_str().map(String::from))
                    .collect();
                out.insert(uid.to_string(), vars);
            }
        }
    }
}

#[test]
fn keywatch_env_names_documented_config_fields() {
    let c = compose();
    let env = keywatch_env(&c);
    let fields = documented_fields();
    let mut overrides = 0;
    for name in env.keys() {
        if let Some(path) = config_path(name) {
            overrides += 1;
            assert!(
                fields.contains(&path),
                "{name} sets {path}, which keywatch.example.toml does not have"
            );
        }
    }
    assert!(overrides >= 3, "{env:?}");
    for want in ["KEYWATCH__KAFKA__BROKERS", "KEYWATCH__FEED__LISTEN"] {
        assert!(
            env.contains_key(want),
            "keywatch service: {want} is not set"
        );
    }
    assert!(
        env.contains_key("DATABASE_URL") || env.contains_key("KEYWATCH__POSTGRES__URL"),
        "keywatch service: no database URL"
    );
}

/// Runs `keywatch replay` over empty input with the container's environment
/// and config file: `Config::load` reads and validates every section.
fn replay_with(env: &BTreeMap<String, String>, config: &Path) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keywatch"));
    cmd.env_clear()
        .envs(env)
        .env("KEYWATCH_CONFIG", config)
        .args(["replay", "--json-summary", "-"])
        .stdin(Stdio::null())
        .current_dir(std::env::temp_dir());
    cmd.output().expect("running keywatch")
}

#[test]
fn the_binary_loads_the_compose_config() {
    let c = compose();
    let env = keywatch_env(&c);
    let config = mounted_file(keywatch_service(&c), &env["KEYWATCH_CONFIG"]);
    let out = replay_with(&env, &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "keywatch rejects the compose configuration: {stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(stderr.lines().last().expect("a summary")).expect("JSON summary");
    assert_eq!(summary["records"], 0);
    // The environment took effect: the hash key is the compose file's, not the built-in one.
    assert_eq!(
        summary["hash_key_built_in"],
        !(env.contains_key("KEYWATCH__PRIVACY__HASH_KEY")
            || env.contains_key("KEYWATCH__PRIVACY__HASH_KEY_FILE")),
        "{stderr}"
    );

    // And the check has teeth: a misspelt override is refused, by name.
    let mut typo = env.clone();
    typo.insert("KEYWATCH__FEED__LISTN".into(), "0.0.0.0:8787".into());
    let out = replay_with(&typo, &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a typo was accepted");
    assert!(stderr.contains("KEYWATCH__FEED__LISTN"), "{stderr}");
}

#[test]
fn keywatch_addresses_name_the_compose_services() {
    let c = compose();
    let env = keywatch_env(&c);
    let cfg = effective_config(&c);

    // Kafka: every broker is a service advertising that address.
    let brokers = get(&cfg, "kafka.brokers").as_str().unwrap();
    for b in brokers.split(',') {
        let (host, port) = b.trim().rsplit_once(':').expect("broker host:port");
        let advertised = environment(service(&c, host))
            .get("KAFKA_ADVERTISED_LISTENERS")
            .cloned()
            .unwrap_or_default();
        assert!(
            advertised.contains(&format!("//{host}:{port}")),
            "kafka.brokers {b}: {host} advertises {advertised:?}"
        );
    }

    // Topics: kafka-init creates what keywatch reads and dead-letters to.
    let init = service(&c, "kafka-init");
    let script = match init.get("command") {
        Some(Yaml::Sequence(s)) => s.iter().filter_map(scalar).collect::<Vec<_>>().join(" "),
        Some(other) => scalar(other).unwrap(),
        None => panic!("kafka-init has no command"),
    };
    let script = interpolate(&script);
    assert!(script.contains("--create"), "{script}");
    let created: BTreeSet<&str> = script
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--topic")
        .map(|w| w[1])
        .collect();
    let mut wanted: Vec<String> = get(&cfg, "kafka.topics")
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    wanted.push(
        get(&cfg, "kafka.dead_letter_topic")
            .as_str()
            .unwrap()
            .into(),
    );
    for t in &wanted {
        assert!(
            created.contains(t.as_str()),
            "kafka-init does not create {t}: {script}"
        );
    }
    let partitions: Vec<u32> = script
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--partitions")
        .map(|w| w[1].parse().expect("a partition count"))
        .collect();
    assert!(
        partitions.iter().any(|&p| p >= 3),
        "the input topic needs partitions to scale out: {script}"
    );
    assert_eq!(
        environment(service(&c, "kafka")).get("KAFKA_AUTO_CREATE_TOPICS_ENABLE"),
        Some(&"false".to_string()),
        "topics come from kafka-init, with their partition count"
    );

    // Postgres: the URL's user, password, host and database are the postgres service's.
    let url = env
        .get("DATABASE_URL")
        .cloned()
        .or_else(|| env.get("KEYWATCH__POSTGRES__URL").cloned())
        .unwrap();
    let rest = url.strip_prefix("postgres://").expect("postgres:// URL");
    let (cred, rest) = rest.split_once('@').expect("user@host");
    let (user, password) = cred.split_once(':').unwrap_or((cred, ""));
    let (hostport, db) = rest.split_once('/').expect("host/db");
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5432"));
    let pg = environment(service(&c, host));
    assert_eq!(port, "5432");
    assert_eq!(pg.get("POSTGRES_USER").map(String::as_str), Some(user));
    assert_eq!(
        pg.get("POSTGRES_PASSWORD").map(String::as_str),
        Some(password)
    );
    assert_eq!(
        pg.get("POSTGRES_DB").map(String::as_str),
        Some(db.split('?').next().unwrap())
    );

    // The feed listens on every interface, on the port that is published
    // and that the healthcheck asks.
    let listen = get(&cfg, "feed.listen").as_str().unwrap();
    let (ip, port) = listen.rsplit_once(':').unwrap();
    assert_eq!(
        ip, "0.0.0.0",
        "feed.listen must be reachable from outside the container"
    );
    let port: u16 = port.parse().unwrap();
    assert!(ports(keywatch_service(&c))
        .iter()
        .any(|p| p.container.0 == port));
    let hc = serde_norway::to_string(&keywatch_service(&c)["healthcheck"]["test"]).unwrap();
    assert!(
        hc.contains(&format!("/{port}")) && hc.contains("/healthz"),
        "{hc}"
    );

    // The Parquet lake is on a volume.
    let lake = get(&cfg, "pipeline.parquet_dir").as_str().unwrap();
    assert!(
        mounts(keywatch_service(&c))
            .iter()
            .any(|m| !m.bind && lake.starts_with(&format!("{}/", m.target))),
        "pipeline.parquet_dir {lake} is not on a volume"
    );
}

#[test]
fn the_email_receiver_builds_and_sends_to_mailpit() {
    let c = compose();
    let cfg = effective_config(&c);
    let global: alerting::AlertingConfig = toml::Value::Table(
        get(&cfg, "alerting")
            .as_table()
            .expect("[alerting] is a table")
            .clone(),
    )
    .try_into()
    .expect("[alerting] deserializes");
    let emails: Vec<_> = global
        .receivers
        .iter()
        .filter_map(|r| match &r.transport {
            alerting::config::TransportConfig::Email(e) => Some(e),
            _ => None,
        })
        .collect();
    assert!(!emails.is_empty(), "no email receiver");
    // Every receiver builds as `keywatch run` builds it at start-up
    // (inside a runtime, as there).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    for r in &global.receivers {
        alerting::Receiver::build(r, &global)
            .unwrap_or_else(|e| panic!("receiver {}: {e}", r.name));
    }
    for r in emails {
        let host = r.smtp_host.as_str();
        let image = service(&c, host)["image"].as_str().unwrap();
        assert!(image.starts_with("axllent/mailpit:"), "{host} is {image}");
        assert_eq!(r.smtp_port, Some(1025), "Mailpit's SMTP port");
        assert_eq!(
            r.tls,
            alerting::config::SmtpTls::None,
            "Mailpit speaks plain SMTP"
        );
        let deps: BTreeSet<String> = depends_on(keywatch_service(&c))
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert!(deps.contains(host), "keywatch should start after {host}");
    }
}

#[test]
fn the_dockerfile_builds_the_workspace_and_runs_keywatch() {
    let stages = stages();
    assert!(stages.len() >= 2, "a multi-stage build");
    let last = stages.last().unwrap();
    let (runtime_image, runtime) = (&last.image, &last.body);
    assert!(
        runtime_image.starts_with("debian:bookworm-slim"),
        "runtime: {runtime_image}"
    );

    // The final stage takes the binary from the builder.
    let from_builder: Vec<(String, String)> = runtime
        .iter()
        .filter(|(op, _)| op == "COPY")
        .filter_map(|(_, a)| {
            let (flags, sources, dest) = copy_parts(a);
            let from = flags.iter().find_map(|f| f.strip_prefix("--from="))?;
            assert_eq!(sources.len(), 1, "{a}");
            Some((from.to_string(), dest))
        })
        .collect();
    assert_eq!(from_builder.len(), 1, "one COPY --from in the final stage");
    let (builder_name, dest) = &from_builder[0];
    assert!(
        dest.starts_with("/usr/local/bin/") || dest.starts_with("/usr/bin/"),
        "the binary goes on PATH, not {dest}"
    );
    let stage = stages
        .iter()
        .find(|s| s.name.as_deref() == Some(builder_name.as_str()))
        .unwrap_or_else(|| panic!("no stage named {builder_name}"));
    let (builder_image, builder) = (&stage.image, &stage.body);

    // Builder: Rust on the runtime's Debian release (glibc), new enough.
    let tag = builder_image
        .strip_prefix("rust:")
        .unwrap_or_else(|| panic!("builder: {builder_image}"));
    assert!(
        tag.ends_with("-bookworm"),
        "builder and runtime share Debian bookworm: {builder_image}"
    );
    let version = |s: &str| -> (u32, u32) {
        let mut it = s.split('.').map(|p| p.parse::<u32>().unwrap());
        (it.next().unwrap(), it.next().unwrap_or(0))
    };
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let msrv = get(&manifest, "workspace.package.rust-version")
        .as_str()
        .unwrap();
    assert!(
        version(tag.trim_end_matches("-bookworm")) >= version(msrv),
        "{builder_image} is older than rust-version {msrv}"
    );

    // Every workspace member and the root package's files are copied in.
    let mut copied = BTreeSet::new();
    for (op, args) in builder {
        if op == "COPY" || op == "ADD" {
            let (flags, sources, _) = copy_parts(args);
            assert!(flags.iter().all(|f| !f.starts_with("--from")), "{args}");
            copied.extend(sources.iter().map(|s| normalize(s)));
        }
    }
    if !copied.contains("") && !copied.contains(".") {
        for need in workspace_paths() {
            assert!(
                copied.contains(&need),
                "the builder does not COPY {need} (workspace member or target of Cargo.toml)"
            );
        }
    }
    let build = builder
        .iter()
        .find(|(op, a)| op == "RUN" && a.contains("cargo build"))
        .map(|(_, a)| a.as_str())
        .expect("the builder runs cargo build");
    assert!(
        build.contains("--release") && build.contains("--locked"),
        "{build}"
    );

    // Non-root, and the binary is the entrypoint with `run` as its default command.
    let last = |op: &str| {
        runtime
            .iter()
            .rev()
            .find(|(o, _)| o == op)
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| panic!("the final stage has no {op}"))
    };
    let user = last("USER");
    let user = user.split(':').next().unwrap();
    assert!(user != "root" && user != "0", "runs as root");
    assert_eq!(json_array(&last("ENTRYPOINT")), ["keywatch"]);
    assert_eq!(json_array(&last("CMD")), ["run"]);
}

#[test]
fn dockerignore_keeps_build_output_out_of_the_context() {
    let patterns: BTreeSet<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| normalize(l.trim_start_matches('/')))
        .collect();
    for want in ["target", ".git", "keywatch-data"] {
        assert!(patterns.contains(want), ".dockerignore lacks {want}");
    }
    // Nothing the Dockerfile copies from the context is ignored.
    for (op, args) in dockerfile() {
        if op == "COPY" || op == "ADD" {
            let (flags, sources, _) = copy_parts(&args);
            if flags.iter().any(|f| f.starts_with("--from")) {
                continue;
            }
            for s in sources {
                let s = normalize(&s);
                assert!(
                    !patterns
                        .iter()
                        .any(|p| s == *p || s.starts_with(&format!("{p}/"))),
                    ".dockerignore excludes {s}, which the Dockerfile copies"
                );
                assert!(
                    root().join(&s).exists(),
                    "the Dockerfile copies missing {s}"
                );
            }
        }
    }
}

/// `docker compose config` is client-side: when the plugin is installed it
/// must accept the file. Not installed (as on the CI machine): skipped.
#[test]
fn docker_compose_config_accepts_the_file_when_available() {
    let version = Command::new("docker")
        .args(["compose", "version"])
        .stdin(Stdio::null())
        .output();
    match version {
        Ok(o) if o.status.success() => {}
        _ => {
            eprintln!("skipped: `docker compose` is not installed here");
            return;
        }
    }
    let out = Command::new("docker")
        .args(["compose", "-f", "docker-compose.yml", "config", "--quiet"])
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .expect("running docker compose config");
    assert!(
        out.status.success(),
        "docker compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
