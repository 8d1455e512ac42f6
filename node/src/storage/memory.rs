//! The in-memory backend: maps behind short-lived locks, lost when the process exits.
//!
//! Owns nothing but its maps. Locks are `parking_lot` mutexes held only for a map
//! operation and never across an `.await`, so they cannot stall the async runtime.

use std::collections::{BTreeMap, HashMap, VecDeque};

use async_trait::async_trait;
use parking_lot::Mutex;
use shoal_xmpp::sasl::StoredCredentials;

use super::{
    AccountStore, OfflineStore, RoomStore, RosterStore, StorageError, StoredRoom, UserDataStore,
    UserLoader,
};
use crate::model::{OfflineMessage, Roster, RosterItem};

/// Every store, kept in process memory. For tests and throwaway nodes.
///
/// One mutex per store, so a multi-step update of one store (version bump and item
/// write, count check and append) happens under a single lock and is atomic.
#[derive(Default)]
pub struct MemoryStore {
    accounts: Mutex<HashMap<String, StoredCredentials>>,
    rosters: Mutex<HashMap<String, Roster>>,
    offline: Mutex<HashMap<String, OfflineQueue>>,
    user_data: Mutex<HashMap<String, UserData>>,
    rooms: Mutex<BTreeMap<String, Room>>,
}

#[derive(Default)]
struct Room {
    state: String,
    listed: Option<String>,
    occupants: BTreeMap<String, String>,
}

/// One user's offline messages and the last seq handed out.
#[derive(Default)]
struct OfflineQueue {
    /// Survives the queue emptying, so seqs are never reused.
    last_seq: u64,
    messages: VecDeque<OfflineMessage>,
}

#[derive(Default)]
struct UserData {
    vcard: Option<String>,
    private: BTreeMap<String, String>,
    blocklist: Vec<String>,
    last_activity: Option<(u64, String)>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Nothing to gain from reading the maps together.
impl UserLoader for MemoryStore {}

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

#[async_trait]
impl RosterStore for MemoryStore {
    async fn roster(&self, user: &str) -> Result<Roster, StorageError> {
        Ok(self.rosters.lock().get(user).cloned().unwrap_or_default())
    }

    async fn put_item(&self, user: &str, item: &RosterItem) -> Result<u64, StorageError> {
        let mut rosters = self.rosters.lock();
        let roster = rosters.entry(user.to_owned()).or_default();
        if roster.items.get(&item.jid) != Some(item) {
            roster.items.insert(item.jid.clone(), item.clone());
            roster.version += 1;
        }
        Ok(roster.version)
    }

    async fn remove_item(&self, user: &str, contact: &str) -> Result<u64, StorageError> {
        let mut rosters = self.rosters.lock();
        let Some(roster) = rosters.get_mut(user) else {
            return Ok(0);
        };
        if roster.items.remove(contact).is_some() {
            roster.version += 1;
        }
        Ok(roster.version)
    }

    async fn set_pending_in(
        &self,
        user: &str,
        contact: &str,
        payload: Option<&str>,
    ) -> Result<(), StorageError> {
        let mut rosters = self.rosters.lock();
        match payload {
            Some(payload) => {
                let roster = rosters.entry(user.to_owned()).or_default();
                roster
                    .pending_in
                    .insert(contact.to_owned(), payload.to_owned());
            }
            None => {
                if let Some(roster) = rosters.get_mut(user) {
                    roster.pending_in.remove(contact);
                }
            }
        }
        Ok(())
    }

    async fn delete_user(&self, user: &str) -> Result<(), StorageError> {
        self.rosters.lock().remove(user);
        Ok(())
    }
}

#[async_trait]
impl OfflineStore for MemoryStore {
    async fn push(
        &self,
        user: &str,
        xml: &str,
        stored_at_ms: u64,
        max: usize,
    ) -> Result<bool, StorageError> {
        let mut offline = self.offline.lock();
        let queue = offline.entry(user.to_owned()).or_default();
        if queue.messages.len() >= max {
            return Ok(false);
        }
        queue.last_seq += 1;
        queue.messages.push_back(OfflineMessage {
            seq: queue.last_seq,
            stored_at_ms,
            xml: xml.to_owned(),
        });
        Ok(true)
    }

    async fn fetch(&self, user: &str) -> Result<Vec<OfflineMessage>, StorageError> {
        Ok(self
            .offline
            .lock()
            .get(user)
            .map(|q| q.messages.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn remove_through(&self, user: &str, through: u64) -> Result<(), StorageError> {
        if let Some(queue) = self.offline.lock().get_mut(user) {
            // The queue is in seq order, so the delivered messages are a prefix.
            while queue.messages.front().is_some_and(|m| m.seq <= through) {
                queue.messages.pop_front();
            }
        }
        Ok(())
    }

    async fn count(&self, user: &str) -> Result<usize, StorageError> {
        Ok(self
            .offline
            .lock()
            .get(user)
            .map_or(0, |q| q.messages.len()))
    }

    async fn delete_user(&self, user: &str) -> Result<(), StorageError> {
        self.offline.lock().remove(user);
        Ok(())
    }
}

#[async_trait]
impl UserDataStore for MemoryStore {
    async fn vcard(&self, user: &str) -> Result<Option<String>, StorageError> {
        Ok(self
            .user_data
            .lock()
            .get(user)
            .and_then(|d| d.vcard.clone()))
    }

    async fn set_vcard(&self, user: &str, xml: &str) -> Result<(), StorageError> {
        self.user_data
            .lock()
            .entry(user.to_owned())
            .or_default()
            .vcard = Some(xml.to_owned());
        Ok(())
    }

    async fn private(&self, user: &str, key: &str) -> Result<Option<String>, StorageError> {
        Ok(self
            .user_data
            .lock()
            .get(user)
            .and_then(|d| d.private.get(key).cloned()))
    }

    async fn set_private(&self, user: &str, key: &str, xml: &str) -> Result<(), StorageError> {
        self.user_data
            .lock()
            .entry(user.to_owned())
            .or_default()
            .private
            .insert(key.to_owned(), xml.to_owned());
        Ok(())
    }

    async fn blocklist(&self, user: &str) -> Result<Vec<String>, StorageError> {
        Ok(self
            .user_data
            .lock()
            .get(user)
            .map(|d| d.blocklist.clone())
            .unwrap_or_default())
    }

    async fn set_blocklist(&self, user: &str, jids: &[String]) -> Result<(), StorageError> {
        // Sort outside the lock, as in `list_accounts`.
        let mut jids = jids.to_vec();
        jids.sort_unstable();
        jids.dedup();
        self.user_data
            .lock()
            .entry(user.to_owned())
            .or_default()
            .blocklist = jids;
        Ok(())
    }

    async fn last_activity(&self, user: &str) -> Result<Option<(u64, String)>, StorageError> {
        Ok(self
            .user_data
            .lock()
            .get(user)
            .and_then(|d| d.last_activity.clone()))
    }

    async fn set_last_activity(
        &self,
        user: &str,
        unix_secs: u64,
        status: &str,
    ) -> Result<(), StorageError> {
        self.user_data
            .lock()
            .entry(user.to_owned())
            .or_default()
            .last_activity = Some((unix_secs, status.to_owned()));
        Ok(())
    }

    async fn delete_user(&self, user: &str) -> Result<(), StorageError> {
        self.user_data.lock().remove(user);
        Ok(())
    }
}

#[async_trait]
impl RoomStore for MemoryStore {
    async fn room(&self, room: &str) -> Result<Option<StoredRoom>, StorageError> {
        Ok(self.rooms.lock().get(room).map(|r| StoredRoom {
            state: r.state.clone(),
            occupants: r
                .occupants
                .iter()
                .map(|(jid, record)| (jid.clone(), record.clone()))
                .collect(),
        }))
    }

    async fn put_room(
        &self,
        room: &str,
        state: &str,
        listed: Option<&str>,
    ) -> Result<(), StorageError> {
        let mut rooms = self.rooms.lock();
        let r = rooms.entry(room.to_owned()).or_default();
        r.state = state.to_owned();
        r.listed = listed.map(str::to_owned);
        Ok(())
    }

    async fn set_occupant(
        &self,
        room: &str,
        occupant: &str,
        record: Option<&str>,
    ) -> Result<(), StorageError> {
        let mut rooms = self.rooms.lock();
        let occupants = &mut rooms.entry(room.to_owned()).or_default().occupants;
        match record {
            Some(record) => occupants.insert(occupant.to_owned(), record.to_owned()),
            None => occupants.remove(occupant),
        };
        Ok(())
    }

    async fn delete_room(&self, room: &str) -> Result<(), StorageError> {
        self.rooms.lock().remove(room);
        Ok(())
    }

    async fn rooms(&self) -> Result<Vec<(String, Option<String>)>, StorageError> {
        Ok(self
            .rooms
            .lock()
            .iter()
            .map(|(jid, r)| (jid.clone(), r.listed.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use super::super::{Storage, conformance};

    #[tokio::test]
    async fn conformance() {
        conformance::all(&Storage::from_backend(Arc::new(MemoryStore::new()))).await;
    }
}
