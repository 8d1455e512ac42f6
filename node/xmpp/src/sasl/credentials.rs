//! Stored SCRAM credentials (RFC 5802 §3): what the server keeps instead of a password.

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// The hash function a SCRAM variant is built on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScramHash {
    Sha1,
    Sha256,
}

impl ScramHash {
    /// `H(data)`.
    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha1 => Sha1::digest(data).to_vec(),
            Self::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    /// `HMAC(key, data)`.
    pub fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail here.
        match self {
            Self::Sha1 => {
                let mut mac = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes any key length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
            Self::Sha256 => {
                let mut mac =
                    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
                mac.update(data);
                mac.finalize().into_bytes().to_vec()
            }
        }
    }

    /// `Hi(password, salt, iterations)`: PBKDF2 with this hash's HMAC.
    pub fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        match self {
            Self::Sha1 => {
                let mut out = [0u8; 20];
                pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out);
                out.to_vec()
            }
            Self::Sha256 => {
                let mut out = [0u8; 32];
                pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
                out.to_vec()
            }
        }
    }
}

/// One SCRAM variant's stored keys for an account.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramCredentials {
    pub iterations: u32,
    pub salt: Vec<u8>,
    /// `H(HMAC(SaltedPassword, "Client Key"))`
    pub stored_key: Vec<u8>,
    /// `HMAC(SaltedPassword, "Server Key")`
    pub server_key: Vec<u8>,
}

// Keys are secrets: keep them out of logs even in debug output.
impl std::fmt::Debug for ScramCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramCredentials")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramCredentials {
    /// Derives the stored keys from a (SASLprep-normalised) password.
    pub fn derive(hash: ScramHash, password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = hash.salted_password(password.as_bytes(), salt, iterations);
        let client_key = hash.hmac(&salted, b"Client Key");
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: hash.hash(&client_key),
            server_key: hash.hmac(&salted, b"Server Key"),
        }
    }

    /// Whether `password` is the one these keys were derived from. Used by PLAIN, which
    /// receives the password itself and so must redo the derivation.
    pub fn verify_password(&self, hash: ScramHash, password: &str) -> bool {
        let other = Self::derive(hash, password, &self.salt, self.iterations);
        constant_time_eq(&other.stored_key, &self.stored_key)
    }
}

/// Everything stored for an account's authentication: one set of keys per SCRAM hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCredentials {
    pub sha1: ScramCredentials,
    pub sha256: ScramCredentials,
}

impl StoredCredentials {
    /// Iteration count for new credentials: RFC 7677 asks for at least 4096.
    pub const DEFAULT_ITERATIONS: u32 = 4096;

    /// Derives both variants. The salts come from the caller because this crate reads no
    /// randomness; each hash gets its own salt so the two key sets are unrelated.
    pub fn derive(password: &str, salt_sha1: &[u8], salt_sha256: &[u8], iterations: u32) -> Self {
        Self {
            sha1: ScramCredentials::derive(ScramHash::Sha1, password, salt_sha1, iterations),
            sha256: ScramCredentials::derive(ScramHash::Sha256, password, salt_sha256, iterations),
        }
    }

    /// The keys for one hash.
    pub fn for_hash(&self, hash: ScramHash) -> &ScramCredentials {
        match hash {
            ScramHash::Sha1 => &self.sha1,
            ScramHash::Sha256 => &self.sha256,
        }
    }

    /// Whether `password` matches (checked against the SHA-256 keys).
    pub fn verify_password(&self, password: &str) -> bool {
        self.sha256.verify_password(ScramHash::Sha256, password)
    }
}

/// Compares two byte strings in time independent of where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5802 §5 example: user "user", password "pencil", SCRAM-SHA-1.
    #[test]
    fn rfc5802_sha1_keys() {
        let salt = base64_decode("QSXCR+Q6sek8bf92");
        let c = ScramCredentials::derive(ScramHash::Sha1, "pencil", &salt, 4096);
        let salted = ScramHash::Sha1.salted_password(b"pencil", &salt, 4096);
        assert_eq!(hex(&salted), "1d96ee3a529b5a5f9e47c01f229a2cb8a6e15f7d");
        assert_eq!(c.server_key, ScramHash::Sha1.hmac(&salted, b"Server Key"));
        assert!(c.verify_password(ScramHash::Sha1, "pencil"));
        assert!(!c.verify_password(ScramHash::Sha1, "pencil2"));
    }

    #[test]
    fn stored_credentials_verify() {
        let c = StoredCredentials::derive("s3cret", b"salt-one", b"salt-two", 4096);
        assert!(c.verify_password("s3cret"));
        assert!(!c.verify_password("S3cret"));
        assert_ne!(c.sha1.salt, c.sha256.salt);
        assert!(!format!("{c:?}").contains("stored_key"));
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn base64_decode(s: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }
}
