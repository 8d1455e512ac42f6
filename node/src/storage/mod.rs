//! Persistent state behind one trait family, with interchangeable backends: in-memory
//! (tests, throwaway nodes) and an embedded redb file (the single-node default).
//!
//! This module owns the storage traits, their error type, the on-disk record encoding
//! and the choice of backend from [`StorageConfig`]. It must never store a password:
//! accounts hold salted SCRAM keys only. It knows nothing of sessions, routing or the
//! wire protocol; callers pass bare JIDs as plain strings and get typed records back.
//!
//! Every trait is object-safe and used as `Arc<dyn …>`, so a node, a test and a future
//! Redis backend all hand the same shapes to the rest of the server.

mod embedded;
mod memory;

use std::sync::Arc;

use async_trait::async_trait;
use rand::RngCore;
use shoal_xmpp::sasl::StoredCredentials;

use crate::config::{StorageBackend, StorageConfig};

pub use embedded::EmbeddedStore;
pub use memory::MemoryStore;

/// What went wrong in a storage operation.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The record to create exists already.
    #[error("record already exists")]
    AlreadyExists,
    /// The record to update does not exist.
    #[error("record not found")]
    NotFound,
    /// A stored record could not be decoded. The data is left as it is so an operator
    /// can inspect it; the server refuses to guess.
    #[error("corrupt record {record}: {reason}")]
    Corrupt { record: String, reason: String },
    /// A value cannot be represented in the storage format.
    #[error("value cannot be stored: {0}")]
    Unrepresentable(&'static str),
    /// Creating the store's directory or file failed.
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The backend itself failed (database error, worker task lost).
    #[error("storage backend: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Accounts and their authentication credentials, keyed by bare JID (`local@domain`).
#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Creates an account; [`StorageError::AlreadyExists`] if `user` has one.
    async fn create_account(
        &self,
        user: &str,
        creds: &StoredCredentials,
    ) -> Result<(), StorageError>;
    /// The account's credentials, or `None` if there is no such account.
    async fn credentials(&self, user: &str) -> Result<Option<StoredCredentials>, StorageError>;
    /// Replaces the credentials (password change); [`StorageError::NotFound`] if there is
    /// no such account.
    async fn set_credentials(
        &self,
        user: &str,
        creds: &StoredCredentials,
    ) -> Result<(), StorageError>;
    /// Deletes the account; whether it existed.
    async fn delete_account(&self, user: &str) -> Result<bool, StorageError>;
    /// Every account's bare JID, sorted by byte order.
    async fn list_accounts(&self) -> Result<Vec<String>, StorageError>;
}

/// Handles to every store of one backend. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    pub accounts: Arc<dyn AccountStore>,
}

/// Opens the backend `cfg` selects. The embedded backend creates its file (and parent
/// directories) on first use; this blocks briefly, so call it at startup.
pub fn open(cfg: &StorageConfig) -> Result<Storage, StorageError> {
    match cfg.backend {
        StorageBackend::Memory => Ok(Storage {
            accounts: Arc::new(MemoryStore::new()),
        }),
        StorageBackend::Embedded => {
            let store = Arc::new(EmbeddedStore::open(&cfg.path)?);
            Ok(Storage { accounts: store })
        }
    }
}

/// Fresh credentials for `password`, with a new random salt per hash.
///
/// This runs PBKDF2 twice at [`StoredCredentials::DEFAULT_ITERATIONS`], which takes
/// milliseconds of CPU: call it from `spawn_blocking` on busy async paths.
pub fn new_credentials(password: &str) -> StoredCredentials {
    // 16 bytes is the salt length RFC 5802's examples use and well beyond collision risk.
    let mut salt_sha1 = [0u8; 16];
    let mut salt_sha256 = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt_sha1);
    rand::rngs::OsRng.fill_bytes(&mut salt_sha256);
    StoredCredentials::derive(
        password,
        &salt_sha1,
        &salt_sha256,
        StoredCredentials::DEFAULT_ITERATIONS,
    )
}

/// The binary record format, shared by every backend that stores bytes.
///
/// Each record starts with a version byte so the format can change without a migration
/// step: readers accept every version they know and reject the rest as corrupt.
pub(crate) mod codec {
    use shoal_xmpp::sasl::{ScramCredentials, StoredCredentials};

    use super::StorageError;

    /// Version 1: for SHA-1 then SHA-256, `iterations` (u32 BE), then `salt`,
    /// `stored_key` and `server_key`, each a u16 BE length and the bytes.
    const CREDENTIALS_V1: u8 = 1;

    pub(crate) fn encode_credentials(creds: &StoredCredentials) -> Result<Vec<u8>, StorageError> {
        let mut out = Vec::with_capacity(1 + 2 * (4 + 6 + 16 + 32 + 32));
        out.push(CREDENTIALS_V1);
        for scram in [&creds.sha1, &creds.sha256] {
            out.extend_from_slice(&scram.iterations.to_be_bytes());
            for field in [&scram.salt, &scram.stored_key, &scram.server_key] {
                let len = u16::try_from(field.len())
                    .map_err(|_| StorageError::Unrepresentable("credential field over 64 KiB"))?;
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(field);
            }
        }
        Ok(out)
    }

    /// Decodes a record written by [`encode_credentials`]. `record` names it in errors.
    pub(crate) fn decode_credentials(
        record: &str,
        bytes: &[u8],
    ) -> Result<StoredCredentials, StorageError> {
        let corrupt = |reason: String| StorageError::Corrupt {
            record: record.to_owned(),
            reason,
        };
        let mut r = Cursor(bytes);
        match r.take(1).map(|v| v[0]) {
            Some(CREDENTIALS_V1) => {}
            Some(v) => return Err(corrupt(format!("unknown credentials version {v}"))),
            None => return Err(corrupt("empty record".to_owned())),
        }
        let mut scram = || -> Option<ScramCredentials> {
            let iterations = u32::from_be_bytes(r.take(4)?.try_into().ok()?);
            Some(ScramCredentials {
                iterations,
                salt: r.field()?,
                stored_key: r.field()?,
                server_key: r.field()?,
            })
        };
        let truncated = || corrupt("truncated".to_owned());
        let sha1 = scram().ok_or_else(truncated)?;
        let sha256 = scram().ok_or_else(truncated)?;
        if !r.0.is_empty() {
            return Err(corrupt(format!("{} trailing bytes", r.0.len())));
        }
        Ok(StoredCredentials { sha1, sha256 })
    }

    /// Reads from the front of a byte slice; `None` when it runs out.
    struct Cursor<'a>(&'a [u8]);

    impl<'a> Cursor<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (head, tail) = self.0.split_at(n);
            self.0 = tail;
            Some(head)
        }

        /// A u16-length-prefixed byte string.
        fn field(&mut self) -> Option<Vec<u8>> {
            let len = u16::from_be_bytes(self.take(2)?.try_into().ok()?);
            self.take(len.into()).map(<[u8]>::to_vec)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trip() {
            let creds = StoredCredentials::derive("pw", b"salt-a", b"salt-bb", 4096);
            let bytes = encode_credentials(&creds).unwrap();
            assert_eq!(bytes[0], CREDENTIALS_V1);
            assert_eq!(decode_credentials("u", &bytes).unwrap(), creds);
        }

        #[test]
        fn rejects_damage_without_panicking() {
            let creds = StoredCredentials::derive("pw", b"salt-a", b"salt-bb", 4096);
            let bytes = encode_credentials(&creds).unwrap();
            // Every truncation, an unknown version and trailing garbage are all errors.
            for n in 0..bytes.len() {
                let err = decode_credentials("u", &bytes[..n]).unwrap_err();
                assert!(matches!(err, StorageError::Corrupt { .. }), "{n}: {err}");
            }
            let mut bad = bytes.clone();
            bad[0] = 99;
            assert!(matches!(
                decode_credentials("u", &bad),
                Err(StorageError::Corrupt { .. })
            ));
            let mut long = bytes;
            long.push(0);
            assert!(matches!(
                decode_credentials("u", &long),
                Err(StorageError::Corrupt { .. })
            ));
        }
    }
}

/// Behaviour every backend must share, run by each backend's tests.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;

    pub(crate) fn creds(password: &str) -> StoredCredentials {
        // Fixed salts and the minimum iteration count keep the suite fast and repeatable.
        StoredCredentials::derive(password, b"sha1-salt", b"sha256-salt", 4096)
    }

    pub(crate) async fn accounts(store: &dyn AccountStore) {
        assert_eq!(store.list_accounts().await.unwrap(), Vec::<String>::new());
        assert!(
            store
                .credentials("alice@example.org")
                .await
                .unwrap()
                .is_none()
        );

        store
            .create_account("alice@example.org", &creds("a"))
            .await
            .unwrap();
        assert!(matches!(
            store
                .create_account("alice@example.org", &creds("other"))
                .await,
            Err(StorageError::AlreadyExists)
        ));
        // The failed duplicate left the original untouched.
        let got = store
            .credentials("alice@example.org")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, creds("a"));
        assert!(got.verify_password("a"));

        store
            .set_credentials("alice@example.org", &creds("b"))
            .await
            .unwrap();
        let got = store
            .credentials("alice@example.org")
            .await
            .unwrap()
            .unwrap();
        assert!(got.verify_password("b") && !got.verify_password("a"));
        assert!(matches!(
            store
                .set_credentials("nobody@example.org", &creds("x"))
                .await,
            Err(StorageError::NotFound)
        ));
        assert!(
            store
                .credentials("nobody@example.org")
                .await
                .unwrap()
                .is_none()
        );

        for user in ["zed@example.org", "bob@example.org", "carol@example.net"] {
            store.create_account(user, &creds(user)).await.unwrap();
        }
        assert_eq!(
            store.list_accounts().await.unwrap(),
            [
                "alice@example.org",
                "bob@example.org",
                "carol@example.net",
                "zed@example.org"
            ]
        );

        assert!(store.delete_account("bob@example.org").await.unwrap());
        assert!(!store.delete_account("bob@example.org").await.unwrap());
        assert!(
            store
                .credentials("bob@example.org")
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(store.list_accounts().await.unwrap().len(), 3);
        // A deleted account's name is free again.
        store
            .create_account("bob@example.org", &creds("new"))
            .await
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn new_credentials_uses_fresh_salts() {
        let a = new_credentials("pw");
        let b = new_credentials("pw");
        assert!(a.verify_password("pw"));
        assert_eq!(a.sha1.salt.len(), 16);
        assert_eq!(a.sha256.iterations, StoredCredentials::DEFAULT_ITERATIONS);
        assert_ne!(a.sha1.salt, a.sha256.salt);
        assert_ne!(a.sha256.salt, b.sha256.salt);
    }

    #[tokio::test]
    async fn open_selects_backend() {
        let storage = open(&StorageConfig {
            backend: StorageBackend::Memory,
            path: PathBuf::from("/nonexistent/unused.redb"),
        })
        .unwrap();
        conformance::accounts(storage.accounts.as_ref()).await;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/shoal.redb");
        let storage = open(&StorageConfig {
            backend: StorageBackend::Embedded,
            path: path.clone(),
        })
        .unwrap();
        conformance::accounts(storage.accounts.as_ref()).await;
        assert!(path.exists());
    }
}
