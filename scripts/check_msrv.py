#!/usr/bin/env python3
"""The declared minimum Rust version holds: every crate of the workspace
declares the workspace's `rust-version`, and no dependency in Cargo.lock
needs a newer compiler than it.

Our own code is checked against the same version by clippy's
`incompatible_msrv` lint (it flags a standard-library API newer than the
declared `rust-version`), which `scripts/test` runs with warnings as errors.

Reads `cargo metadata`; prints what it checked and exits 1 on a mismatch.
"""
import json
import subprocess
import sys


def version(text):
    """`1.85` and `1.85.0` are the same version."""
    parts = [int(x) for x in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    members = set(meta["workspace_members"])
    ours = [p for p in meta["packages"] if p["id"] in members]
    declared = {p["name"]: p.get("rust_version") for p in ours}
    wanted = {v for v in declared.values()}
    problems = []
    missing = sorted(n for n, v in declared.items() if not v)
    if missing:
        problems.append(f"no rust-version in: {', '.join(missing)} (add rust-version.workspace = true)")
    if len(wanted - {None}) > 1:
        problems.append(f"crates declare different rust-versions: {declared}")
    msrv = max((v for v in wanted if v), key=version, default=None)
    if msrv is None:
        print("check-msrv: no crate declares rust-version")
        return 1
    # Only what the build actually resolves (the lock's packages).
    resolved = {n["id"] for n in meta["resolve"]["nodes"]}
    newer = sorted(
        (version(p["rust_version"]), p["name"], p["version"])
        for p in meta["packages"]
        if p["id"] in resolved and p["id"] not in members and p.get("rust_version")
        and version(p["rust_version"]) > version(msrv)
    )
    for v, name, ver in newer:
        problems.append(f"{name} {ver} needs Rust {'.'.join(map(str, v))}, above the declared {msrv}")
    needing = max(
        (version(p["rust_version"]) for p in meta["packages"] if p["id"] in resolved and p.get("rust_version")),
        default=(0,),
    )
    print(
        f"check-msrv: {len(ours)} crates at rust-version {msrv}; "
        f"{len(resolved) - len(ours)} dependencies, the most demanding needs "
        f"{'.'.join(map(str, needing[:2]))}"
    )
    for p in problems:
        print(f"check-msrv: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
