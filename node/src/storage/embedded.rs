//! The embedded backend: one redb file, durable across restarts, no external service.
//!
//! Owns the database handle and the table layout. redb is a blocking API, so every call
//! runs on tokio's blocking pool via `spawn_blocking` and never on an async worker
//! thread. Records are written in the versioned format of [`super::codec`]; this module
//! must never store serde-derived or otherwise unversioned layouts, which would make
//! every struct change a silent data loss.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};
use shoal_xmpp::sasl::StoredCredentials;

use super::codec::{decode_credentials, encode_credentials};
use super::{AccountStore, StorageError};

/// Bare JID → encoded [`StoredCredentials`].
const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");

/// Every store, in one redb database file.
pub struct EmbeddedStore {
    db: Arc<Database>,
}

/// Maps any redb error to a backend error.
fn backend(e: impl Into<redb::Error>) -> StorageError {
    StorageError::Backend(Box::new(e.into()))
}

impl EmbeddedStore {
    /// Opens the database at `path`, creating it and its parent directories if needed.
    /// Blocks; call at startup. redb locks the file, so a second open of the same path
    /// (even in this process) fails until the first store is dropped.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let db = Database::create(path).map_err(backend)?;
        // Create every table up front so read transactions never meet a missing table.
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(ACCOUNTS).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs `f` against the database on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StorageError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            // A panic in redb or a runtime shutting down: report it rather than unwind.
            .map_err(|e| StorageError::Backend(Box::new(e)))?
    }
}

/// Whether a write expects the account to exist already.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Presence {
    MustBeAbsent,
    MustExist,
}

impl EmbeddedStore {
    /// Writes an account's credentials after checking it exists (or not). The check and
    /// the insert share one write transaction, and redb allows one writer at a time, so
    /// two concurrent creates cannot both succeed.
    async fn put(
        &self,
        user: &str,
        creds: &StoredCredentials,
        expect: Presence,
    ) -> Result<(), StorageError> {
        let user = user.to_owned();
        let bytes = encode_credentials(creds)?;
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(ACCOUNTS).map_err(backend)?;
                let exists = table.get(user.as_str()).map_err(backend)?.is_some();
                match (expect, exists) {
                    // Dropping the uncommitted transaction aborts it.
                    (Presence::MustBeAbsent, true) => return Err(StorageError::AlreadyExists),
                    (Presence::MustExist, false) => return Err(StorageError::NotFound),
                    _ => {}
                }
                table
                    .insert(user.as_str(), bytes.as_slice())
                    .map_err(backend)?;
            }
            txn.commit().map_err(backend)
        })
        .await
    }
}

#[async_trait]
impl AccountStore for EmbeddedStore {
    async fn create_account(
        &self,
        user: &str,
        creds: &StoredCredentials,
    ) -> Result<(), StorageError> {
        self.put(user, creds, Presence::MustBeAbsent).await
    }

    async fn credentials(&self, user: &str) -> Result<Option<StoredCredentials>, StorageError> {
        let user = user.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(ACCOUNTS).map_err(backend)?;
            let Some(value) = table.get(user.as_str()).map_err(backend)? else {
                return Ok(None);
            };
            decode_credentials(&format!("accounts/{user}"), value.value()).map(Some)
        })
        .await
    }

    async fn set_credentials(
        &self,
        user: &str,
        creds: &StoredCredentials,
    ) -> Result<(), StorageError> {
        self.put(user, creds, Presence::MustExist).await
    }

    async fn delete_account(&self, user: &str) -> Result<bool, StorageError> {
        let user = user.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            let existed = {
                let mut table = txn.open_table(ACCOUNTS).map_err(backend)?;
                let removed = table.remove(user.as_str()).map_err(backend)?;
                removed.is_some()
            };
            txn.commit().map_err(backend)?;
            Ok(existed)
        })
        .await
    }

    async fn list_accounts(&self) -> Result<Vec<String>, StorageError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(ACCOUNTS).map_err(backend)?;
            // redb keeps `&str` keys in byte order, which is the order promised.
            let mut users = Vec::new();
            for entry in table.iter().map_err(backend)? {
                let (key, _) = entry.map_err(backend)?;
                users.push(key.value().to_owned());
            }
            Ok(users)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::conformance;
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("shoal.redb")).unwrap();
        conformance::accounts(&store).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.redb");
        {
            let store = EmbeddedStore::open(&path).unwrap();
            store
                .create_account("alice@example.org", &conformance::creds("a"))
                .await
                .unwrap();
            store
                .create_account("bob@example.org", &conformance::creds("b"))
                .await
                .unwrap();
            assert!(store.delete_account("bob@example.org").await.unwrap());
        }
        let store = EmbeddedStore::open(&path).unwrap();
        assert_eq!(store.list_accounts().await.unwrap(), ["alice@example.org"]);
        let creds = store.credentials("alice@example.org").await.unwrap();
        assert_eq!(creds, Some(conformance::creds("a")));
    }

    #[tokio::test]
    async fn corrupt_record_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.redb");
        drop(EmbeddedStore::open(&path).unwrap());
        {
            // Write a record the codec cannot read, behind the store's back.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(ACCOUNTS)
                .unwrap()
                .insert("mallory@example.org", &[1u8, 0, 0][..])
                .unwrap();
            txn.commit().unwrap();
        }
        let store = EmbeddedStore::open(&path).unwrap();
        let err = store.credentials("mallory@example.org").await.unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        // The rest of the store keeps working.
        assert_eq!(
            store.list_accounts().await.unwrap(),
            ["mallory@example.org"]
        );
    }

    #[test]
    fn second_open_of_same_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.redb");
        let _first = EmbeddedStore::open(&path).unwrap();
        assert!(matches!(
            EmbeddedStore::open(&path),
            Err(StorageError::Backend(_))
        ));
    }
}
