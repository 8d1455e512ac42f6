//! The in-memory backend: maps behind short-lived locks, lost when the process exits.
//!
//! Owns nothing but its maps. Locks are `parking_lot` mutexes held only for a map
//! operation and never across an `.await`, so they cannot stall the async runtime.

use std::collections::HashMap;

use async_trait::async_trait;
use parking_lot::Mutex;
use shoal_xmpp::sasl::StoredCredentials;

use super::{AccountStore, StorageError};

/// Every store, kept in process memory. For tests and throwaway nodes.
#[derive(Default)]
pub struct MemoryStore {
    accounts: Mutex<HashMap<String, StoredCredentials>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl AccountStore for MemoryStore {
    async fn create_account(
        &self,
        user: &str,
        creds: &StoredCredentials,
    ) -> Result<(), StorageError> {
        let mut accounts = self.accounts.lock();
        if accounts.contains_key(user) {
            return Err(StorageError::AlreadyExists);
        }
        accounts.insert(user.to_owned(), creds.clone());
        Ok(())
    }

    async fn credentials(&self, user: &str) -> Result<Option<StoredCredentials>, StorageError> {
        Ok(self.accounts.lock().get(user).cloned())
    }

    async fn set_credentials(
        &self,
        user: &str,
        creds: &StoredCredentials,
    ) -> Result<(), StorageError> {
        match self.accounts.lock().get_mut(user) {
            Some(slot) => {
                *slot = creds.clone();
                Ok(())
            }
            None => Err(StorageError::NotFound),
        }
    }

    async fn delete_account(&self, user: &str) -> Result<bool, StorageError> {
        Ok(self.accounts.lock().remove(user).is_some())
    }

    async fn list_accounts(&self) -> Result<Vec<String>, StorageError> {
        let mut users: Vec<String> = self.accounts.lock().keys().cloned().collect();
        // Sort outside the lock: it is the slow part and needs no consistency.
        users.sort_unstable();
        Ok(users)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        super::super::conformance::accounts(&MemoryStore::new()).await;
    }
}
