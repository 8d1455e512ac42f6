//! The embedded backend: one redb file, durable across restarts, no external service.
//!
//! Owns the database handle and the table layout. redb is a blocking API, so no call
//! runs on an async worker thread: reads run on tokio's blocking pool via
//! `spawn_blocking`, writes on the group-commit writer thread ([`super::committer`]),
//! which commits many writes with one disk sync. Records are written in the versioned format of [`super::codec`]; this module
//! must never store serde-derived or otherwise unversioned layouts, which would make
//! every struct change a silent data loss. Counters are codec records too, never redb's
//! native integers, whose decoding panics on damaged bytes.
//!
//! Layout: per-user records are keyed by the user's bare JID; per-contact records by
//! the tuple `(user, contact)` and offline messages by `(user, seq)`, so one user's
//! records are one contiguous key range (see [`user_range`]). Every update that reads
//! before it writes (version bumps, the offline limit) is one write transaction, and
//! redb admits one writer at a time, so concurrent calls cannot interleave inside it.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{
    Database, ReadTransaction, ReadableTable, TableDefinition, TableHandle, WriteTransaction,
};
use shoal_xmpp::sasl::StoredCredentials;

use super::codec::{
    decode_blocklist, decode_counter, decode_credentials, decode_last_activity, decode_offline,
    decode_roster_item, decode_text, encode_blocklist_record, encode_counter, encode_credentials,
    encode_last_activity, encode_offline, encode_roster_item, encode_text,
};
use super::committer::Committer;
use super::{
    AccountStore, OfflineStore, RoomStore, RosterStore, StorageError, StoredRoom, UserDataStore,
    UserLoader,
};
use crate::model::{OfflineMessage, Roster, RosterItem, UserData};

/// Bare JID → encoded [`StoredCredentials`].
const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
/// User → counter record: the roster version. Absent means version 0.
const ROSTER_VERSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("roster_versions");
/// (user, contact) → roster item record.
const ROSTER_ITEMS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("roster_items");
/// (user, contact) → text record: the pending-in request's payload XML.
const ROSTER_PENDING_IN: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("roster_pending_in");
/// User → counter record: the last offline seq handed out. Kept when the queue empties
/// so seqs are never reused; absent means none was ever handed out.
const OFFLINE_SEQS: TableDefinition<&str, &[u8]> = TableDefinition::new("offline_seqs");
/// (user, seq) → offline message record.
const OFFLINE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("offline");
/// User → text record: vCard XML.
const VCARDS: TableDefinition<&str, &[u8]> = TableDefinition::new("vcards");
/// (user, "name ns") → text record: private XML.
const PRIVATE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("private");
/// User → blocklist record. Absent means empty.
const BLOCKLISTS: TableDefinition<&str, &[u8]> = TableDefinition::new("blocklists");
/// User → last activity record.
const LAST_ACTIVITY: TableDefinition<&str, &[u8]> = TableDefinition::new("last_activity");
/// Room bare JID → text record: the MUC room's state.
const ROOMS: TableDefinition<&str, &[u8]> = TableDefinition::new("rooms");
/// Room bare JID → text record: the name a listed room is listed under.
const ROOMS_LISTED: TableDefinition<&str, &[u8]> = TableDefinition::new("rooms_listed");
/// (room, occupant full JID) → text record: the occupant.
const ROOM_OCCUPANTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("room_occupants");

/// The exclusive upper bound of `user`'s keys in a `(user, contact)` table: `user`
/// followed by NUL is the smallest string greater than `user`, and tuples compare
/// element by element, so `(user, "")..(user_range(user), "")` holds exactly the keys
/// whose first element is `user`.
fn user_range(user: &str) -> String {
    format!("{user}\0")
}

/// Every store, in one redb database file.
pub struct EmbeddedStore {
    db: Arc<Database>,
    committer: Committer,
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
        for table in [
            ROSTER_VERSIONS,
            OFFLINE_SEQS,
            VCARDS,
            BLOCKLISTS,
            LAST_ACTIVITY,
            ROOMS,
            ROOMS_LISTED,
        ] {
            txn.open_table(table).map_err(backend)?;
        }
        for table in [ROSTER_ITEMS, ROSTER_PENDING_IN, PRIVATE, ROOM_OCCUPANTS] {
            txn.open_table(table).map_err(backend)?;
        }
        txn.open_table(OFFLINE).map_err(backend)?;
        txn.commit().map_err(backend)?;
        let db = Arc::new(db);
        let committer = Committer::start(db.clone())?;
        Ok(Self { db, committer })
    }

    /// Runs `write` in the writer's next transaction (see [`Committer::write`]).
    async fn write<T, F>(&self, write: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> Result<T, StorageError> + Send + 'static,
    {
        self.committer.write(write).await
    }

    /// Reads and decodes `user`'s record from `def` on the blocking pool.
    async fn user_record<T, D>(
        &self,
        def: UserTable,
        user: &str,
        decode: D,
    ) -> Result<Option<T>, StorageError>
    where
        T: Send + 'static,
        D: FnOnce(&str, &[u8]) -> Result<T, StorageError> + Send + 'static,
    {
        let user = user.to_owned();
        self.blocking(move |db| {
            read_user_record(&db.begin_read().map_err(backend)?, def, &user, decode)
        })
        .await
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
        self.write(move |txn| {
            {
                let mut table = txn.open_table(ACCOUNTS).map_err(backend)?;
                let exists = table.get(user.as_str()).map_err(backend)?.is_some();
                match (expect, exists) {
                    // An error aborts the write (see the committer).
                    (Presence::MustBeAbsent, true) => return Err(StorageError::AlreadyExists),
                    (Presence::MustExist, false) => return Err(StorageError::NotFound),
                    _ => {}
                }
                table
                    .insert(user.as_str(), bytes.as_slice())
                    .map_err(backend)?;
            }
            Ok(())
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
        self.write(move |txn| {
            let existed = {
                let mut table = txn.open_table(ACCOUNTS).map_err(backend)?;
                let removed = table.remove(user.as_str()).map_err(backend)?;
                removed.is_some()
            };
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

/// `user`'s roster: version, items and pending-in requests.
fn read_roster(txn: &ReadTransaction, user: &str) -> Result<Roster, StorageError> {
    let versions = txn.open_table(ROSTER_VERSIONS).map_err(backend)?;
    let mut roster = Roster {
        version: read_counter(&versions, ROSTER_VERSIONS, user)?,
        ..Roster::default()
    };
    let end = user_range(user);
    let range = (user, "")..(end.as_str(), "");

    let items = txn.open_table(ROSTER_ITEMS).map_err(backend)?;
    for entry in items.range(range.clone()).map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        let contact = key.value().1;
        let record = format!("{}/{user}/{contact}", ROSTER_ITEMS.name());
        let item = decode_roster_item(&record, contact, value.value())?;
        roster.items.insert(contact.to_owned(), item);
    }

    let pending = txn.open_table(ROSTER_PENDING_IN).map_err(backend)?;
    for entry in pending.range(range).map_err(backend)? {
        let (key, value) = entry.map_err(backend)?;
        let contact = key.value().1;
        let record = format!("{}/{user}/{contact}", ROSTER_PENDING_IN.name());
        let payload = decode_text(&record, value.value())?;
        roster.pending_in.insert(contact.to_owned(), payload);
    }
    Ok(roster)
}

/// Loading a user is one read transaction instead of three.
#[async_trait]
impl UserLoader for EmbeddedStore {
    async fn load_user(&self, user: &str) -> Result<UserData, StorageError> {
        let user = user.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let exists = txn
                .open_table(ACCOUNTS)
                .map_err(backend)?
                .get(user.as_str())
                .map_err(backend)?
                .is_some();
            Ok(UserData {
                exists,
                roster: read_roster(&txn, &user)?,
                blocklist: read_user_record(&txn, BLOCKLISTS, &user, decode_blocklist)?
                    .unwrap_or_default(),
            })
        })
        .await
    }
}

/// A `user`-keyed table of encoded records.
type UserTable = TableDefinition<'static, &'static str, &'static [u8]>;
/// A `(user, contact)`-keyed table of encoded records.
type PairTable = TableDefinition<'static, (&'static str, &'static str), &'static [u8]>;

/// Reads and decodes `user`'s record from `def`.
fn read_user_record<T>(
    txn: &ReadTransaction,
    def: UserTable,
    user: &str,
    decode: impl FnOnce(&str, &[u8]) -> Result<T, StorageError>,
) -> Result<Option<T>, StorageError> {
    let table = txn.open_table(def).map_err(backend)?;
    let Some(value) = table.get(user).map_err(backend)? else {
        return Ok(None);
    };
    decode(&format!("{}/{user}", def.name()), value.value()).map(Some)
}

/// Replaces (`Some`) or deletes (`None`) `user`'s record in `def`.
fn write_user_record(
    txn: &WriteTransaction,
    def: UserTable,
    user: &str,
    bytes: Option<&[u8]>,
) -> Result<(), StorageError> {
    let mut table = txn.open_table(def).map_err(backend)?;
    match bytes {
        Some(bytes) => table.insert(user, bytes).map(drop),
        None => table.remove(user).map(drop),
    }
    .map_err(backend)
}

/// `user`'s counter in `def` (roster version, last offline seq); 0 when absent.
fn read_counter(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    def: UserTable,
    user: &str,
) -> Result<u64, StorageError> {
    match table.get(user).map_err(backend)? {
        Some(value) => decode_counter(&format!("{}/{user}", def.name()), value.value()),
        None => Ok(0),
    }
}

/// Deletes every `(user, _)` key of a contact-keyed table.
fn delete_user_pairs(
    txn: &WriteTransaction,
    def: PairTable,
    user: &str,
) -> Result<(), StorageError> {
    let end = user_range(user);
    let mut table = txn.open_table(def).map_err(backend)?;
    table
        .retain_in((user, "")..(end.as_str(), ""), |_, _| false)
        .map_err(backend)
}

#[async_trait]
impl RosterStore for EmbeddedStore {
    async fn roster(&self, user: &str) -> Result<Roster, StorageError> {
        let user = user.to_owned();
        self.blocking(move |db| read_roster(&db.begin_read().map_err(backend)?, &user))
            .await
    }

    async fn put_item(&self, user: &str, item: &RosterItem) -> Result<u64, StorageError> {
        let bytes = encode_roster_item(item)?;
        let user = user.to_owned();
        let contact = item.jid.clone();
        self.write(move |txn| {
            let version = {
                let mut items = txn.open_table(ROSTER_ITEMS).map_err(backend)?;
                let mut versions = txn.open_table(ROSTER_VERSIONS).map_err(backend)?;
                let current = read_counter(&versions, ROSTER_VERSIONS, &user)?;
                let key = (user.as_str(), contact.as_str());
                // The encoding is deterministic, so equal bytes mean an equal item. A
                // stored record that does not decode is simply replaced.
                let unchanged = items
                    .get(key)
                    .map_err(backend)?
                    .is_some_and(|old| old.value() == bytes.as_slice());
                if unchanged {
                    return Ok(current);
                }
                let next = current + 1;
                items.insert(key, bytes.as_slice()).map_err(backend)?;
                versions
                    .insert(user.as_str(), encode_counter(next).as_slice())
                    .map_err(backend)?;
                next
            };
            Ok(version)
        })
        .await
    }

    async fn remove_item(&self, user: &str, contact: &str) -> Result<u64, StorageError> {
        let user = user.to_owned();
        let contact = contact.to_owned();
        self.write(move |txn| {
            let version = {
                let mut items = txn.open_table(ROSTER_ITEMS).map_err(backend)?;
                let mut versions = txn.open_table(ROSTER_VERSIONS).map_err(backend)?;
                let current = read_counter(&versions, ROSTER_VERSIONS, &user)?;
                let removed = items
                    .remove((user.as_str(), contact.as_str()))
                    .map_err(backend)?
                    .is_some();
                if !removed {
                    return Ok(current);
                }
                let next = current + 1;
                versions
                    .insert(user.as_str(), encode_counter(next).as_slice())
                    .map_err(backend)?;
                next
            };
            Ok(version)
        })
        .await
    }

    async fn set_pending_in(
        &self,
        user: &str,
        contact: &str,
        payload: Option<&str>,
    ) -> Result<(), StorageError> {
        let bytes = payload.map(encode_text).transpose()?;
        let user = user.to_owned();
        let contact = contact.to_owned();
        self.write(move |txn| {
            {
                let mut pending = txn.open_table(ROSTER_PENDING_IN).map_err(backend)?;
                let key = (user.as_str(), contact.as_str());
                match &bytes {
                    Some(bytes) => pending.insert(key, bytes.as_slice()).map(drop),
                    None => pending.remove(key).map(drop),
                }
                .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn delete_user(&self, user: &str) -> Result<(), StorageError> {
        let user = user.to_owned();
        self.write(move |txn| {
            delete_user_pairs(txn, ROSTER_ITEMS, &user)?;
            delete_user_pairs(txn, ROSTER_PENDING_IN, &user)?;
            txn.open_table(ROSTER_VERSIONS)
                .map_err(backend)?
                .remove(user.as_str())
                .map_err(backend)?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl OfflineStore for EmbeddedStore {
    async fn push(
        &self,
        user: &str,
        xml: &str,
        stored_at_ms: u64,
        max: usize,
    ) -> Result<bool, StorageError> {
        let bytes = encode_offline(stored_at_ms, xml)?;
        let user = user.to_owned();
        self.write(move |txn| {
            {
                let mut queue = txn.open_table(OFFLINE).map_err(backend)?;
                let mut seqs = txn.open_table(OFFLINE_SEQS).map_err(backend)?;
                // Count, stopping at `max`, inside the same write transaction as the
                // insert: redb's single writer makes check-then-append atomic.
                let mut stored = 0usize;
                let range = (user.as_str(), 0u64)..=(user.as_str(), u64::MAX);
                for entry in queue.range(range).map_err(backend)? {
                    entry.map_err(backend)?;
                    stored += 1;
                    if stored >= max {
                        break;
                    }
                }
                if stored >= max {
                    return Ok(false);
                }
                let seq = read_counter(&seqs, OFFLINE_SEQS, &user)?
                    .checked_add(1)
                    .ok_or(StorageError::Unrepresentable("offline seq exhausted"))?;
                queue
                    .insert((user.as_str(), seq), bytes.as_slice())
                    .map_err(backend)?;
                seqs.insert(user.as_str(), encode_counter(seq).as_slice())
                    .map_err(backend)?;
            }
            Ok(true)
        })
        .await
    }

    async fn fetch(&self, user: &str) -> Result<Vec<OfflineMessage>, StorageError> {
        let user = user.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let queue = txn.open_table(OFFLINE).map_err(backend)?;
            let range = (user.as_str(), 0u64)..=(user.as_str(), u64::MAX);
            let mut messages = Vec::new();
            for entry in queue.range(range).map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                let seq = key.value().1;
                let record = format!("{}/{user}/{seq}", OFFLINE.name());
                messages.push(decode_offline(&record, seq, value.value())?);
            }
            Ok(messages)
        })
        .await
    }

    async fn remove_through(&self, user: &str, through: u64) -> Result<(), StorageError> {
        let user = user.to_owned();
        self.write(move |txn| {
            txn.open_table(OFFLINE)
                .map_err(backend)?
                .retain_in((user.as_str(), 0u64)..=(user.as_str(), through), |_, _| {
                    false
                })
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn count(&self, user: &str) -> Result<usize, StorageError> {
        let user = user.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let queue = txn.open_table(OFFLINE).map_err(backend)?;
            let range = (user.as_str(), 0u64)..=(user.as_str(), u64::MAX);
            let mut stored = 0;
            for entry in queue.range(range).map_err(backend)? {
                entry.map_err(backend)?;
                stored += 1;
            }
            Ok(stored)
        })
        .await
    }

    async fn delete_user(&self, user: &str) -> Result<(), StorageError> {
        let user = user.to_owned();
        self.write(move |txn| {
            txn.open_table(OFFLINE)
                .map_err(backend)?
                .retain_in((user.as_str(), 0u64)..=(user.as_str(), u64::MAX), |_, _| {
                    false
                })
                .map_err(backend)?;
            txn.open_table(OFFLINE_SEQS)
                .map_err(backend)?
                .remove(user.as_str())
                .map_err(backend)?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl UserDataStore for EmbeddedStore {
    async fn vcard(&self, user: &str) -> Result<Option<String>, StorageError> {
        self.user_record(VCARDS, user, decode_text).await
    }

    async fn set_vcard(&self, user: &str, xml: &str) -> Result<(), StorageError> {
        let bytes = encode_text(xml)?;
        let user = user.to_owned();
        self.write(move |txn| write_user_record(txn, VCARDS, &user, Some(&bytes)))
            .await
    }

    async fn private(&self, user: &str, key: &str) -> Result<Option<String>, StorageError> {
        let user = user.to_owned();
        let key = key.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(PRIVATE).map_err(backend)?;
            let Some(value) = table.get((user.as_str(), key.as_str())).map_err(backend)? else {
                return Ok(None);
            };
            let record = format!("{}/{user}/{key}", PRIVATE.name());
            decode_text(&record, value.value()).map(Some)
        })
        .await
    }

    async fn set_private(&self, user: &str, key: &str, xml: &str) -> Result<(), StorageError> {
        let bytes = encode_text(xml)?;
        let user = user.to_owned();
        let key = key.to_owned();
        self.write(move |txn| {
            txn.open_table(PRIVATE)
                .map_err(backend)?
                .insert((user.as_str(), key.as_str()), bytes.as_slice())
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn blocklist(&self, user: &str) -> Result<Vec<String>, StorageError> {
        self.user_record(BLOCKLISTS, user, decode_blocklist)
            .await
            .map(Option::unwrap_or_default)
    }

    async fn set_blocklist(&self, user: &str, jids: &[String]) -> Result<(), StorageError> {
        let bytes = encode_blocklist_record(jids)?;
        let user = user.to_owned();
        self.write(move |txn| write_user_record(txn, BLOCKLISTS, &user, bytes.as_deref()))
            .await
    }

    async fn last_activity(&self, user: &str) -> Result<Option<(u64, String)>, StorageError> {
        self.user_record(LAST_ACTIVITY, user, decode_last_activity)
            .await
    }

    async fn set_last_activity(
        &self,
        user: &str,
        unix_secs: u64,
        status: &str,
    ) -> Result<(), StorageError> {
        let bytes = encode_last_activity(unix_secs, status)?;
        let user = user.to_owned();
        self.write(move |txn| write_user_record(txn, LAST_ACTIVITY, &user, Some(&bytes)))
            .await
    }

    async fn delete_user(&self, user: &str) -> Result<(), StorageError> {
        let user = user.to_owned();
        self.write(move |txn| {
            for def in [VCARDS, BLOCKLISTS, LAST_ACTIVITY] {
                txn.open_table(def)
                    .map_err(backend)?
                    .remove(user.as_str())
                    .map_err(backend)?;
            }
            delete_user_pairs(txn, PRIVATE, &user)?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl RoomStore for EmbeddedStore {
    async fn room(&self, room: &str) -> Result<Option<StoredRoom>, StorageError> {
        let room = room.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let Some(state) = read_user_record(&txn, ROOMS, &room, decode_text)? else {
                return Ok(None);
            };
            let end = user_range(&room);
            let table = txn.open_table(ROOM_OCCUPANTS).map_err(backend)?;
            let mut occupants = Vec::new();
            for entry in table
                .range((room.as_str(), "")..(end.as_str(), ""))
                .map_err(backend)?
            {
                let (key, value) = entry.map_err(backend)?;
                let jid = key.value().1.to_owned();
                let record = format!("{}/{room}/{jid}", ROOM_OCCUPANTS.name());
                occupants.push((jid, decode_text(&record, value.value())?));
            }
            Ok(Some(StoredRoom { state, occupants }))
        })
        .await
    }

    async fn put_room(
        &self,
        room: &str,
        state: &str,
        listed: Option<&str>,
    ) -> Result<(), StorageError> {
        let state = encode_text(state)?;
        let listed = listed.map(encode_text).transpose()?;
        let room = room.to_owned();
        self.write(move |txn| {
            write_user_record(txn, ROOMS, &room, Some(&state))?;
            write_user_record(txn, ROOMS_LISTED, &room, listed.as_deref())
        })
        .await
    }

    async fn set_occupant(
        &self,
        room: &str,
        occupant: &str,
        record: Option<&str>,
    ) -> Result<(), StorageError> {
        let record = record.map(encode_text).transpose()?;
        let (room, occupant) = (room.to_owned(), occupant.to_owned());
        self.write(move |txn| {
            let mut table = txn.open_table(ROOM_OCCUPANTS).map_err(backend)?;
            let key = (room.as_str(), occupant.as_str());
            match &record {
                Some(bytes) => table.insert(key, bytes.as_slice()).map(drop),
                None => table.remove(key).map(drop),
            }
            .map_err(backend)
        })
        .await
    }

    async fn delete_room(&self, room: &str) -> Result<(), StorageError> {
        let room = room.to_owned();
        self.write(move |txn| {
            write_user_record(txn, ROOMS, &room, None)?;
            write_user_record(txn, ROOMS_LISTED, &room, None)?;
            delete_user_pairs(txn, ROOM_OCCUPANTS, &room)
        })
        .await
    }

    async fn rooms(&self) -> Result<Vec<(String, Option<String>)>, StorageError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let listed = txn.open_table(ROOMS_LISTED).map_err(backend)?;
            let mut out = Vec::new();
            for entry in txn
                .open_table(ROOMS)
                .map_err(backend)?
                .iter()
                .map_err(backend)?
            {
                let room = entry.map_err(backend)?.0.value().to_owned();
                let name = match listed.get(room.as_str()).map_err(backend)? {
                    Some(v) => Some(decode_text(
                        &format!("{}/{room}", ROOMS_LISTED.name()),
                        v.value(),
                    )?),
                    None => None,
                };
                out.push((room, name));
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Storage, conformance};
    use super::*;

    fn storage(path: &Path) -> Storage {
        Storage::from_backend(Arc::new(EmbeddedStore::open(path).unwrap()))
    }

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        conformance::all(&storage(&dir.path().join("shoal.redb"))).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_on_many_threads() {
        let dir = tempfile::tempdir().unwrap();
        conformance::concurrent(&storage(&dir.path().join("shoal.redb"))).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.redb");
        let written = conformance::before_restart(&storage(&path)).await;
        let storage = storage(&path);
        conformance::after_restart(&storage, written).await;

        assert!(storage.delete_user("fred@example.org").await.unwrap());
        drop(storage);
        conformance::check_empty(&self::storage(&path), "fred@example.org").await;
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

    /// Damage to every kind of record surfaces as `Corrupt` from the calls that read
    /// it, without a panic, and leaves other users alone.
    #[tokio::test]
    async fn corrupt_user_records_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.redb");
        let user = "mallory@example.org";
        {
            let storage = storage(&path);
            conformance::fill(&storage, user).await;
            conformance::fill(&storage, "fine@example.org").await;
        }
        let garbage: &[u8] = &[1, 0xff];
        let break_record = |damage: &dyn Fn(&WriteTransaction)| {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            damage(&txn);
            txn.commit().unwrap();
        };
        let pair = |def: PairTable, contact: &'static str| {
            move |txn: &WriteTransaction| {
                txn.open_table(def)
                    .unwrap()
                    .insert((user, contact), garbage)
                    .unwrap();
            }
        };
        let single = |def: UserTable| {
            move |txn: &WriteTransaction| {
                txn.open_table(def).unwrap().insert(user, garbage).unwrap();
            }
        };
        fn is_corrupt<T: std::fmt::Debug>(result: Result<T, StorageError>) {
            match result {
                Err(StorageError::Corrupt { .. }) => {}
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }

        break_record(&pair(ROSTER_ITEMS, "bob@example.org"));
        let storage = storage(&path);
        is_corrupt(storage.rosters.roster(user).await);
        // A damaged item can be overwritten with a good one.
        let item = RosterItem {
            jid: "bob@example.org".to_owned(),
            ..RosterItem::default()
        };
        assert_eq!(storage.rosters.put_item(user, &item).await.unwrap(), 4);
        assert_eq!(storage.rosters.roster(user).await.unwrap().items.len(), 1);
        drop(storage);

        break_record(&pair(ROSTER_PENDING_IN, "dave@example.org"));
        is_corrupt(self::storage(&path).rosters.roster(user).await);

        break_record(&single(ROSTER_VERSIONS));
        let storage = self::storage(&path);
        is_corrupt(storage.rosters.roster(user).await);
        is_corrupt(storage.rosters.put_item(user, &item).await);
        is_corrupt(storage.rosters.remove_item(user, "bob@example.org").await);
        drop(storage);

        break_record(&|txn| {
            txn.open_table(OFFLINE)
                .unwrap()
                .insert((user, 2u64), garbage)
                .unwrap();
        });
        is_corrupt(self::storage(&path).offline.fetch(user).await);

        break_record(&single(OFFLINE_SEQS));
        let storage = self::storage(&path);
        is_corrupt(storage.offline.push(user, "<m/>", 1, 10).await);
        drop(storage);

        break_record(&single(VCARDS));
        break_record(&pair(PRIVATE, "a b"));
        break_record(&single(BLOCKLISTS));
        break_record(&single(LAST_ACTIVITY));
        let storage = self::storage(&path);
        is_corrupt(storage.user_data.vcard(user).await);
        is_corrupt(storage.user_data.private(user, "a b").await);
        is_corrupt(storage.user_data.blocklist(user).await);
        is_corrupt(storage.user_data.last_activity(user).await);

        // Another user's records are untouched, and the damaged user can still be
        // deleted without reading what was damaged.
        conformance::check_filled(&storage, "fine@example.org").await;
        assert!(storage.delete_user(user).await.unwrap());
        conformance::check_empty(&storage, user).await;
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
