//! Webhook signatures per [Standard Webhooks](https://www.standardwebhooks.com/)
//! (the scheme Svix uses), so a receiver can check a delivery with any of
//! the spec's libraries instead of code written for keywatch.
//!
//! A secret is `whsec_` followed by the base64 of the key bytes. The signed
//! content is `{webhook-id}.{webhook-timestamp}.{body}`; the signature is
//! the base64 of its HMAC-SHA256. The `webhook-signature` header holds one
//! `v1,<signature>` per configured secret, separated by spaces, so a
//! receiver can rotate its secret without a window where deliveries fail.
//!
//! The Standard Webhooks project's own `standardwebhooks` crate signs one
//! secret at a time and decodes secrets strictly (an unpadded base64 key,
//! common in the wild, is refused), and would bring a second base64, `time`
//! and `http` into the build for the twenty lines of HMAC below; so it is a
//! dev-dependency instead: the tests check that every signature here is
//! byte for byte the one that library makes, and that it verifies a
//! delivery signed with several rotated secrets.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The prefix every Standard Webhooks secret carries.
pub const SECRET_PREFIX: &str = "whsec_";

/// Decodes secrets with or without `=` padding: both forms are in the wild.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a signing secret was refused. The texts never hold the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// No secret at all (only separators or whitespace).
    #[error("no signing secret given")]
    Empty,
    /// The n-th secret (from 1) does not start with `whsec_`.
    #[error("secret {0} does not start with \"whsec_\" (Standard Webhooks secrets are whsec_ + base64 of the key)")]
    MissingPrefix(usize),
    /// The n-th secret's key part is not valid base64.
    #[error("secret {0}: the part after \"whsec_\" is not valid base64")]
    BadBase64(usize),
    /// The n-th secret is `whsec_` with nothing (or an empty key) after it.
    #[error("secret {0}: the key after \"whsec_\" is empty")]
    EmptyKey(usize),
}

/// The keys a webhook receiver's deliveries are signed with: one or more,
/// each producing one signature in the header.
#[derive(Clone)]
pub struct Signer {
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("keys", &format_args!("<{} redacted>", self.keys.len()))
            .finish()
    }
}

impl Signer {
    /// Parses secrets separated by spaces or commas (`whsec_... whsec_...`).
    pub fn parse(secrets: &str) -> Result<Signer, SecretError> {
        let keys = secrets
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .enumerate()
            .map(|(i, s)| parse_secret(s, i + 1))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Signer { keys })
    }

    /// How many secrets sign each delivery.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a signer has at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The `webhook-signature` header value for a delivery: `v1,<sig>` per
    /// secret, space-separated.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut out = String::with_capacity(self.keys.len() * 48);
        for key in &self.keys {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str("v1,");
            STANDARD.encode_string(mac(key, id, timestamp, body), &mut out);
        }
        out
    }

    /// Whether `header` (a `webhook-signature` value) holds a `v1` signature
    /// made by any of this signer's keys. Compares in constant time. For
    /// tests and for receivers written in Rust; keywatch itself only signs.
    pub fn verify(&self, header: &str, id: &str, timestamp: i64, body: &[u8]) -> bool {
        let expected: Vec<[u8; 32]> = self
            .keys
            .iter()
            .map(|k| mac(k, id, timestamp, body))
            .collect();
        header
            .split_whitespace()
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|sig| STANDARD.decode(sig).ok())
            .any(|sig| {
                expected
                    .iter()
                    .any(|e| bool::from(e.as_slice().ct_eq(&sig)))
            })
    }
}

/// One `v1,<signature>` entry for one secret: the form the spec's test
/// vectors are given in.
pub fn sign_one(
    secret: &str,
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, SecretError> {
    let key = parse_secret(secret, 1)?;
    Ok(format!(
        "v1,{}",
        STANDARD.encode(mac(&key, id, timestamp, body))
    ))
}

/// Decodes one `whsec_` secret; `index` (from 1) names it in errors.
fn parse_secret(s: &str, index: usize) -> Result<Vec<u8>, SecretError> {
    let b64 = s
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SecretError::MissingPrefix(index))?;
    if b64.is_empty() {
        return Err(SecretError::EmptyKey(index));
    }
    let key = LENIENT
        .decode(b64)
        .map_err(|_| SecretError::BadBase64(index))?;
    if key.is_empty() {
        return Err(SecretError::EmptyKey(index));
    }
    Ok(key)
}

/// HMAC-SHA256 of `{id}.{timestamp}.{body}`.
fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    m.update(id.as_bytes());
    m.update(b".");
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Standard Webhooks / Svix published test vector.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn reproduces_the_published_test_vector() {
        assert_eq!(sign_one(SECRET, ID, TS, BODY).unwrap(), EXPECTED);
        let signer = Signer::parse(SECRET).unwrap();
        assert_eq!(signer.sign(ID, TS, BODY), EXPECTED);
        assert!(signer.verify(EXPECTED, ID, TS, BODY));
    }

    /// What a receiver using the Standard Webhooks project's own library
    /// sees: it verifies every delivery, with each rotated secret, and our
    /// signatures are byte for byte the ones that library makes.
    #[test]
    fn the_projects_own_library_agrees() {
        let secrets = [
            SECRET,
            "whsec_AAECAwQFBgcICQoLDA0ODxAREhM=",
            "whsec_c2VjcmV0LWtleS0z",
        ];
        let signer = Signer::parse(&secrets.join(" ")).unwrap();
        let header = signer.sign(ID, TS, BODY);
        for (i, secret) in secrets.iter().enumerate() {
            let theirs = standardwebhooks::Webhook::new(secret).unwrap();
            assert_eq!(
                header.split(' ').nth(i).unwrap(),
                theirs.sign(ID, TS, BODY).unwrap(),
                "secret {i}"
            );
            // It checks the timestamp's age too: sign as of now.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            let mut headers = http::HeaderMap::new();
            headers.insert("webhook-id", ID.parse().unwrap());
            headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
            headers.insert(
                "webhook-signature",
                signer.sign(ID, now, BODY).parse().unwrap(),
            );
            theirs
                .verify(BODY, &headers)
                .unwrap_or_else(|e| panic!("secret {i}: {e}"));
        }
    }

    #[test]
    fn unpadded_secret_is_the_same_key() {
        // 32 base64 chars need no padding; a 20-byte key does (28 chars, one '=').
        let padded = "whsec_AAECAwQFBgcICQoLDA0ODxAREhM=";
        let unpadded = "whsec_AAECAwQFBgcICQoLDA0ODxAREhM";
        assert_eq!(
            sign_one(padded, ID, TS, BODY).unwrap(),
            sign_one(unpadded, ID, TS, BODY).unwrap()
        );
    }

    #[test]
    fn every_secret_signs_for_rotation() {
        let other = "whsec_AAECAwQFBgcICQoLDA0ODxAREhM=";
        let signer = Signer::parse(&format!("{SECRET}, {other}")).unwrap();
        assert_eq!(signer.len(), 2);
        let header = signer.sign(ID, TS, BODY);
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], EXPECTED);
        assert_eq!(entries[1], sign_one(other, ID, TS, BODY).unwrap());
        // A receiver that knows only one of the two accepts the delivery.
        assert!(Signer::parse(other).unwrap().verify(&header, ID, TS, BODY));
        assert!(Signer::parse(SECRET).unwrap().verify(&header, ID, TS, BODY));
        // ...but not a changed body, id or timestamp.
        assert!(!signer.verify(&header, ID, TS, b"{}"));
        assert!(!signer.verify(&header, "msg_other", TS, BODY));
        assert!(!signer.verify(&header, ID, TS + 1, BODY));
    }

    #[test]
    fn parse_errors_name_the_problem_without_the_secret() {
        let cases = [
            ("", SecretError::Empty),
            (" , ", SecretError::Empty),
            (
                "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                SecretError::MissingPrefix(1),
            ),
            ("whsec_", SecretError::EmptyKey(1)),
            ("whsec_not*base64!", SecretError::BadBase64(1)),
            (
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw whsec_%%%%",
                SecretError::BadBase64(2),
            ),
        ];
        for (input, want) in cases {
            let err = Signer::parse(input).unwrap_err();
            assert_eq!(err, want, "{input:?}");
            let text = err.to_string();
            assert!(!text.contains("MfKQ9r8"), "{text}");
            assert!(!text.contains("base64!"), "{text}");
        }
    }

    #[test]
    fn debug_hides_the_keys() {
        let signer = Signer::parse(SECRET).unwrap();
        let debug = format!("{signer:?}");
        assert!(!debug.contains("MfKQ"), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
    }
}
