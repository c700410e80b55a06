//! Hashing: a fast, stable 64-bit hash for state keys, and keyed hashes for
//! secrets.
//!
//! State is snapshotted and restored by other builds, so its hashes must not
//! depend on the Rust version or a per-process seed (`std`'s `DefaultHasher`
//! promises neither). [`stable_hash`] is a multiply-xorshift hash in the
//! style of wyhash's mixing with a murmur3 finalizer: good enough spread for
//! hash tables and 64-bit duplicate detection; inputs are not adversarial
//! (ids are assigned by the gateway, and prompts arrive already hashed).
//! Secrets (raw API keys, prompt text) get HMAC-SHA256 under the operator's
//! key instead, so a leaked state or alert reveals nothing about them.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

const K0: u64 = 0xa076_1d64_78bd_642f;
const K1: u64 = 0xe703_7ed1_a0b4_28db;

#[inline]
fn mix(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline]
fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A stable 64-bit hash of `bytes`, seeded by `seed` (use distinct seeds for
/// distinct namespaces so, for example, a user id and a key id with the same
/// text do not collide by construction).
#[inline]
pub fn stable_hash(seed: u64, bytes: &[u8]) -> u64 {
    let len = bytes.len();
    let mut h = seed ^ K0 ^ (len as u64).wrapping_mul(K1);
    if len >= 8 {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            h = mix(h ^ read8(c), K1);
        }
        if !chunks.remainder().is_empty() {
            // The last eight bytes, overlapping the previous chunk: no copy,
            // no byte-by-byte assembly (the length is already mixed in).
            h = mix(h ^ read8(&bytes[len - 8..]), K0);
        }
    } else if len >= 4 {
        let lo = read4(&bytes[..4]) as u64;
        let hi = read4(&bytes[len - 4..]) as u64;
        h = mix(h ^ (lo | hi << 32), K0);
    } else if len > 0 {
        let w = (bytes[0] as u64) | (bytes[len / 2] as u64) << 8 | (bytes[len - 1] as u64) << 16;
        h = mix(h ^ w, K0);
    }
    fmix(h)
}

#[inline(always)]
fn read8(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("eight bytes"))
}

#[inline(always)]
fn read4(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("four bytes"))
}

/// Combines two hashes into one (order matters).
#[inline]
pub fn combine(a: u64, b: u64) -> u64 {
    fmix(mix(a ^ K0, b ^ K1) ^ a.rotate_left(17))
}

fn hex(bytes: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 15) as usize] as char);
    }
}

/// A keyed hash (HMAC-SHA256) used for secrets the gateway should not have
/// sent: the raw API key and the prompt text.
#[derive(Clone)]
pub struct SecretHasher {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for SecretHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHasher(..)")
    }
}

impl SecretHasher {
    /// A hasher under `key` (the operator's `privacy.hash_key`).
    pub fn new(key: &[u8]) -> Self {
        // HMAC takes keys of any length; this cannot fail.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
        SecretHasher { mac }
    }

    fn digest(&self, domain: &[u8], bytes: &[u8]) -> [u8; 32] {
        let mut m = self.mac.clone();
        m.update(domain);
        m.update(bytes);
        m.finalize().into_bytes().into()
    }

    /// The key id keywatch uses for a record that carried only a raw API key:
    /// `kh_` and 32 hex digits of its keyed hash.
    pub fn key_id(&self, raw_key: &str) -> String {
        let d = self.digest(b"api_key\0", raw_key.as_bytes());
        let mut s = String::with_capacity(35);
        s.push_str("kh_");
        hex(&d[..16], &mut s);
        s
    }

    /// The fingerprint of a raw prompt: its text normalized (lowercased,
    /// runs of whitespace collapsed, trimmed), keyed-hashed, as 16 hex digits.
    ///
    /// Gateways log whole request bodies (kilobytes), so the normalized
    /// text goes to the hash in blocks, not a character at a time, with a
    /// fast path for ASCII; the bytes hashed are exactly those of
    /// lowercasing and collapsing each `char` (a test holds it to that).
    pub fn prompt_fingerprint(&self, prompt: &str) -> String {
        let mut m = self.mac.clone();
        m.update(b"prompt\0");
        let mut buf = [0u8; 1024];
        let mut n = 0;
        let mut pending_space = false;
        let mut started = false;
        let b = prompt.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if n + 16 > buf.len() {
                m.update(&buf[..n]);
                n = 0;
            }
            // Eight bytes at a time while they are ASCII with no control
            // byte, and their spaces are single and inside the eight (so
            // none needs collapsing): lowercased by SWAR (each byte in A-Z
            // gets 0x20), copied whole. Prose takes this path for most of
            // its bytes.
            if i + 8 <= b.len() {
                const ONES: u64 = 0x0101_0101_0101_0101;
                const HIGH: u64 = 0x8080_8080_8080_8080;
                const ENDS: u64 = 0x8000_0000_0000_0080;
                let w = u64::from_le_bytes(b[i..i + 8].try_into().expect("eight bytes"));
                let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
                // Spaces (a byte after a space may show as one too, which
                // only sends these eight bytes the slow way).
                let x = w ^ (ONES * 0x20);
                let spaces = x.wrapping_sub(ONES) & !x & HIGH;
                if w & HIGH == 0
                    && control == 0
                    && spaces & ENDS == 0
                    && spaces & (spaces >> 8) == 0
                {
                    if pending_space {
                        buf[n] = b' ';
                        n += 1;
                        pending_space = false;
                    }
                    started = true;
                    let at_least_a = w.wrapping_add(ONES * (0x80 - 0x41));
                    let past_z = w.wrapping_add(ONES * (0x80 - 0x5B));
                    let upper = at_least_a & !past_z & HIGH;
                    buf[n..n + 8].copy_from_slice(&(w | (upper >> 2)).to_le_bytes());
                    n += 8;
                    i += 8;
                    continue;
                }
            }
            let c = b[i];
            if c < 0x80 {
                i += 1;
                // char::is_whitespace on ASCII: \t \n \x0B \x0C \r and space.
                if matches!(c, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ') {
                    pending_space = started;
                    continue;
                }
                if pending_space {
                    buf[n] = b' ';
                    n += 1;
                    pending_space = false;
                }
                started = true;
                buf[n] = c.to_ascii_lowercase();
                n += 1;
                continue;
            }
            let ch = prompt[i..].chars().next().expect("a char starts here");
            i += ch.len_utf8();
            if ch.is_whitespace() {
                pending_space = started;
                continue;
            }
            if pending_space {
                buf[n] = b' ';
                n += 1;
                pending_space = false;
            }
            started = true;
            for lc in ch.to_lowercase() {
                if n + 4 > buf.len() {
                    m.update(&buf[..n]);
                    n = 0;
                }
                n += lc.encode_utf8(&mut buf[n..]).len();
            }
        }
        m.update(&buf[..n]);
        let d = m.finalize().into_bytes();
        let mut s = String::with_capacity(16);
        hex(&d[..8], &mut s);
        s
    }
}

/// A deterministic id: 32 hex digits of SHA-256 over `parts` joined by a
/// separator that cannot appear in them ambiguously (each part is length-prefixed).
pub fn deterministic_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    let mut s = String::with_capacity(32);
    hex(&d[..16], &mut s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_stable_and_spreads() {
        // Pinned values: a change here breaks restored snapshots.
        assert_eq!(stable_hash(0, b""), stable_hash(0, b""));
        assert_ne!(stable_hash(0, b"a"), stable_hash(1, b"a"));
        assert_ne!(stable_hash(0, b"abc"), stable_hash(0, b"abc\0"));
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000u32 {
            assert!(seen.insert(stable_hash(7, format!("req_{i}").as_bytes())));
        }
        // Every length path: short, 4-7, whole chunks, chunks plus a tail.
        for len in 0..40usize {
            let a: Vec<u8> = (0..len as u8).collect();
            let mut b = a.clone();
            if let Some(x) = b.last_mut() {
                *x ^= 1;
                assert_ne!(stable_hash(0, &a), stable_hash(0, &b), "len {len}");
            }
            assert!(seen.insert(stable_hash(7, &a)), "len {len}");
        }
    }

    #[test]
    fn secrets_are_keyed_and_normalized() {
        let a = SecretHasher::new(b"k1");
        let b = SecretHasher::new(b"k2");
        assert_ne!(a.key_id("sk-live-123"), b.key_id("sk-live-123"));
        assert!(a.key_id("sk-live-123").starts_with("kh_"));
        assert!(!a.key_id("sk-live-123").contains("sk-live"));
        assert_eq!(
            a.prompt_fingerprint("  Hello   World\n"),
            a.prompt_fingerprint("hello world")
        );
        assert_ne!(
            a.prompt_fingerprint("hello world"),
            a.prompt_fingerprint("hello  worlds")
        );
        assert_eq!(a.prompt_fingerprint("x").len(), 16);
    }

    /// The fingerprint as first written, a `char` at a time: the blocked
    /// one must hash exactly the same bytes.
    fn fingerprint_by_char(h: &SecretHasher, prompt: &str) -> String {
        let mut m = h.mac.clone();
        m.update(b"prompt\0");
        let mut pending_space = false;
        let mut started = false;
        let mut buf = [0u8; 4];
        for c in prompt.chars() {
            if c.is_whitespace() {
                pending_space = started;
                continue;
            }
            if pending_space {
                m.update(b" ");
                pending_space = false;
            }
            started = true;
            for lc in c.to_lowercase() {
                m.update(lc.encode_utf8(&mut buf).as_bytes());
            }
        }
        let d = m.finalize().into_bytes();
        let mut s = String::new();
        hex(&d[..8], &mut s);
        s
    }

    proptest::proptest! {
        #[test]
        fn blocked_fingerprints_equal_char_by_char_ones(
            parts in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::prelude::Just("A".to_string()),
                    proptest::prelude::Just(" \t\n\u{b}\u{c}\r".to_string()),
                    proptest::prelude::Just("\u{a0}\u{2003}\u{3000}".to_string()),
                    proptest::prelude::Just("İSTANBUL ǅ Σ ß".to_string()),
                    proptest::prelude::Just("日本語のテキスト".to_string()),
                    "[ -~]{0,40}",
                    ".{0,20}",
                ],
                0..120,
            ),
        ) {
            let h = SecretHasher::new(b"k");
            let text = parts.concat();
            proptest::prop_assert_eq!(h.prompt_fingerprint(&text), fingerprint_by_char(&h, &text));
        }
    }

    #[test]
    fn long_prompts_cross_block_boundaries_alike() {
        let h = SecretHasher::new(b"k");
        for len in [1000, 1015, 1016, 1017, 1023, 1024, 1025, 5000] {
            for unit in ["a", "İ", " x", "日"] {
                let text = unit.repeat(len / unit.len().max(1));
                assert_eq!(
                    h.prompt_fingerprint(&text),
                    fingerprint_by_char(&h, &text),
                    "{len} {unit}"
                );
            }
        }
    }

    #[test]
    fn ids_are_deterministic_and_unambiguous() {
        assert_eq!(deterministic_id(&["a", "b"]), deterministic_id(&["a", "b"]));
        assert_ne!(deterministic_id(&["ab", ""]), deterministic_id(&["a", "b"]));
        assert_eq!(deterministic_id(&["x"]).len(), 32);
    }
}
