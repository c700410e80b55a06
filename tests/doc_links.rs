//! Every relative link in the project's Markdown resolves to a file inside
//! the repository (a reader of a clean checkout has nothing beside it).

use std::path::{Path, PathBuf};

/// The Markdown files of the repository (target and dot-directories left out).
fn markdown(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if name.starts_with('.') || name == "target" || name == "keywatch-data" {
            continue;
        }
        if path.is_dir() {
            markdown(&path, out);
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// The targets of `[text](target)` links in `text`.
fn links(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            found.push(rest[..end].trim());
        }
    }
    found
}

#[test]
fn every_relative_link_resolves_inside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root_abs = root.canonicalize().unwrap();
    let mut files = Vec::new();
    markdown(root, &mut files);
    assert!(files.len() > 5, "found only {files:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for link in links(&text) {
            let target = link
                .split('#')
                .next()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap_or("");
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let path = file.parent().unwrap().join(target);
            match path.canonicalize() {
                Ok(p) if p.starts_with(&root_abs) => {}
                Ok(p) => broken.push(format!(
                    "{}: {link} leaves the repository ({})",
                    file.display(),
                    p.display()
                )),
                Err(_) => broken.push(format!("{}: {link} does not exist", file.display())),
            }
        }
    }
    assert!(checked > 20, "checked only {checked} links");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
