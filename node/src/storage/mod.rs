//! Persistent state behind one trait family, with interchangeable backends: in-memory
//! (tests, throwaway nodes), an embedded redb file (the single-node default) and Redis
//! (shared by the nodes of a cluster).
//!
//! This module owns the storage traits, their error type, the on-disk record encoding
//! and the choice of backend from [`StorageConfig`]. It must never store a password:
//! accounts hold salted SCRAM keys only. It knows nothing of sessions, routing or the
//! wire protocol; callers pass bare JIDs as plain strings and get typed records back.
//!
//! Every trait is object-safe and used as `Arc<dyn …>`, so every backend hands the same
//! shapes to the rest of the server.

mod codec;
mod committer;
mod embedded;
mod memory;
mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use rand::RngCore;
use shoal_xmpp::sasl::StoredCredentials;

use crate::config::{StorageBackend, StorageConfig};
use crate::model::{OfflineMessage, Roster, RosterItem, UserData};

pub use self::redis::RedisStore;
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

/// Rosters (RFC 6121 §2) with their versions and the pending inbound subscription
/// requests, keyed by the user's bare JID and then the contact's bare JID.
///
/// The store keeps what it is given: it does not run the subscription state machine,
/// and removing an item leaves any pending-in request for that contact in place.
#[async_trait]
pub trait RosterStore: Send + Sync {
    /// The whole roster (empty, version 0, when the user has none).
    async fn roster(&self, user: &str) -> Result<Roster, StorageError>;
    /// Inserts or replaces the item keyed by `item.jid`; bumps the roster version by one
    /// and returns it. Writing an item identical to the stored one changes nothing and
    /// returns the current version unbumped.
    async fn put_item(&self, user: &str, item: &RosterItem) -> Result<u64, StorageError>;
    /// Removes an item if present; bumps and returns the new version (unchanged version
    /// if absent).
    async fn remove_item(&self, user: &str, contact: &str) -> Result<u64, StorageError>;
    /// Records (`Some`) or clears (`None`) an inbound subscription request ("Pending
    /// In") from `contact` with its payload XML. Pending requests are not part of the
    /// roster proper, so this never changes the version.
    async fn set_pending_in(
        &self,
        user: &str,
        contact: &str,
        payload: Option<&str>,
    ) -> Result<(), StorageError>;
    /// Deletes the user's roster, pending requests and version. Part of
    /// [`Storage::delete_user`]; a later roster starts again at version 0.
    async fn delete_user(&self, user: &str) -> Result<(), StorageError>;
}

/// Per-user queues of messages stored while the user was offline (XEP-0160).
///
/// Each message gets a `seq` from a per-user counter: strictly increasing and never
/// reused, even after the messages are removed, so a session can remove exactly what
/// it delivered while newer messages keep arriving.
#[async_trait]
pub trait OfflineStore: Send + Sync {
    /// Appends a message unless the user already has `max` stored; `Ok(false)` when
    /// full. The check and the append are atomic, so concurrent pushes never exceed
    /// `max`.
    async fn push(
        &self,
        user: &str,
        xml: &str,
        stored_at_ms: u64,
        max: usize,
    ) -> Result<bool, StorageError>;
    /// All stored messages in `seq` order (not removed).
    async fn fetch(&self, user: &str) -> Result<Vec<OfflineMessage>, StorageError>;
    /// Removes messages with `seq <= through` (after they were handed to a session).
    async fn remove_through(&self, user: &str, through: u64) -> Result<(), StorageError>;
    /// How many messages the user has stored.
    async fn count(&self, user: &str) -> Result<usize, StorageError>;
    /// Deletes the user's queue and its seq counter. Part of [`Storage::delete_user`].
    async fn delete_user(&self, user: &str) -> Result<(), StorageError>;
}

/// Small per-user documents: vCard (XEP-0054), private XML (XEP-0049), blocklist
/// (XEP-0191) and last activity (XEP-0012). XML is stored as given and never parsed.
#[async_trait]
pub trait UserDataStore: Send + Sync {
    /// The user's vCard XML, if one was set.
    async fn vcard(&self, user: &str) -> Result<Option<String>, StorageError>;
    /// Replaces the user's vCard XML.
    async fn set_vcard(&self, user: &str, xml: &str) -> Result<(), StorageError>;
    /// Private XML stored under `key`, which is `"name ns"` of the child element.
    async fn private(&self, user: &str, key: &str) -> Result<Option<String>, StorageError>;
    /// Replaces the private XML stored under `key`.
    async fn set_private(&self, user: &str, key: &str, xml: &str) -> Result<(), StorageError>;
    /// The blocked JIDs, sorted by byte order without duplicates; empty if none.
    async fn blocklist(&self, user: &str) -> Result<Vec<String>, StorageError>;
    /// Replaces the blocklist; the store sorts and deduplicates `jids`.
    async fn set_blocklist(&self, user: &str, jids: &[String]) -> Result<(), StorageError>;
    /// When the user last logged out (unix seconds) and the status they left with.
    async fn last_activity(&self, user: &str) -> Result<Option<(u64, String)>, StorageError>;
    /// Replaces the last activity record.
    async fn set_last_activity(
        &self,
        user: &str,
        unix_secs: u64,
        status: &str,
    ) -> Result<(), StorageError>;
    /// Deletes all of the above for the user. Part of [`Storage::delete_user`].
    async fn delete_user(&self, user: &str) -> Result<(), StorageError>;
}

/// A stored MUC room: its state record and its occupants' records by full JID, both
/// XML documents the room module writes (never parsed here).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredRoom {
    pub state: String,
    pub occupants: Vec<(String, String)>,
}

/// Multi-user chat rooms (XEP-0045), keyed by the room's bare JID: each room's state
/// (configuration, affiliations, subject), its occupants (so that a room outlives the
/// node hosting it), and which rooms are listed in the service's directory, by name.
#[async_trait]
pub trait RoomStore: Send + Sync {
    /// The room's state and occupants, occupants sorted by JID; `None` if not stored.
    async fn room(&self, room: &str) -> Result<Option<StoredRoom>, StorageError>;
    /// Replaces the room's state and its directory entry: `listed` is the name it is
    /// listed under, `None` when it is hidden.
    async fn put_room(
        &self,
        room: &str,
        state: &str,
        listed: Option<&str>,
    ) -> Result<(), StorageError>;
    /// Replaces (`Some`) or removes (`None`) one occupant's record.
    async fn set_occupant(
        &self,
        room: &str,
        occupant: &str,
        record: Option<&str>,
    ) -> Result<(), StorageError>;
    /// Deletes the room: state, occupants and directory entry.
    async fn delete_room(&self, room: &str) -> Result<(), StorageError>;
    /// Every stored room with the name it is listed under (`None`: hidden), sorted by
    /// JID.
    async fn rooms(&self) -> Result<Vec<(String, Option<String>)>, StorageError>;
}

/// Loads what a shard needs to serve an account. The default reads each store in turn;
/// a backend that can read them together (one transaction) overrides it.
#[async_trait]
pub trait UserLoader: AccountStore + RosterStore + UserDataStore {
    async fn load_user(&self, user: &str) -> Result<UserData, StorageError> {
        Ok(UserData {
            exists: self.credentials(user).await?.is_some(),
            roster: self.roster(user).await?,
            blocklist: self.blocklist(user).await?,
        })
    }
}

/// Handles to every store of one backend. Cheap to clone.
#[derive(Clone)]
pub struct Storage {
    pub accounts: Arc<dyn AccountStore>,
    pub rosters: Arc<dyn RosterStore>,
    pub offline: Arc<dyn OfflineStore>,
    pub user_data: Arc<dyn UserDataStore>,
    pub loader: Arc<dyn UserLoader>,
    pub rooms: Arc<dyn RoomStore>,
}

impl Storage {
    /// Every store served by one backend object.
    pub fn from_backend<B>(backend: Arc<B>) -> Self
    where
        B: UserLoader + OfflineStore + RoomStore + 'static,
    {
        Self {
            accounts: backend.clone(),
            rosters: backend.clone(),
            offline: backend.clone(),
            user_data: backend.clone(),
            rooms: backend.clone(),
            loader: backend,
        }
    }

    /// Deletes everything stored for a user: account, roster, offline, vcard, private,
    /// blocklist, last activity (XEP-0077 account removal). `Ok(false)` if the account
    /// did not exist; leftover data for a name without an account is deleted anyway.
    ///
    /// The stores are separate, so this is not one transaction. The user's data goes
    /// first and the account last: if the process dies half-way, the account still
    /// exists and the removal can simply be repeated, whereas the opposite order could
    /// leave data behind for the next person to register the name. Callers must stop
    /// writing for the user (close sessions, refuse new offline messages) before
    /// calling, since a write racing with this call can land after its purge.
    pub async fn delete_user(&self, user: &str) -> Result<bool, StorageError> {
        self.rosters.delete_user(user).await?;
        self.offline.delete_user(user).await?;
        self.user_data.delete_user(user).await?;
        self.accounts.delete_account(user).await
    }
}

/// Opens the backend `cfg` selects. The embedded backend creates its file (and parent
/// directories) on first use, blocking briefly; the Redis backend connects and checks
/// the server answers, failing within a few seconds when it does not. Call it at
/// startup, inside a tokio runtime (the Redis connection's task runs on it).
pub async fn open(cfg: &StorageConfig) -> Result<Storage, StorageError> {
    match cfg.backend {
        StorageBackend::Memory => Ok(Storage::from_backend(Arc::new(MemoryStore::new()))),
        StorageBackend::Embedded => {
            let store = EmbeddedStore::open(&cfg.path)?;
            Ok(Storage::from_backend(Arc::new(store)))
        }
        StorageBackend::Redis => {
            let store = RedisStore::connect(&cfg.redis_url, &cfg.redis_key_prefix).await?;
            Ok(Storage::from_backend(Arc::new(store)))
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

/// Behaviour every backend must share, run by each backend's tests.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;
    use crate::model::Subscription;

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

    /// Every check below against one fresh `storage`; the checks use disjoint users
    /// except `accounts`, which runs first because it expects no accounts at all.
    pub(crate) async fn all(storage: &Storage) {
        accounts(storage.accounts.as_ref()).await;
        rosters(storage.rosters.as_ref()).await;
        offline(storage.offline.as_ref()).await;
        user_data(storage.user_data.as_ref()).await;
        rooms(storage.rooms.as_ref()).await;
        concurrent(storage).await;
        delete_user(storage).await;
    }

    fn item(jid: &str, name: Option<&str>, subscription: Subscription) -> RosterItem {
        RosterItem {
            jid: jid.to_owned(),
            name: name.map(str::to_owned),
            groups: vec!["Friends".to_owned(), "Work".to_owned()],
            subscription,
            ask: false,
            approved: false,
        }
    }

    pub(crate) async fn rosters(store: &dyn RosterStore) {
        let user = "rosa@example.org";
        assert_eq!(store.roster(user).await.unwrap(), Roster::default());
        // Removing from a roster that does not exist changes nothing.
        assert_eq!(store.remove_item(user, "bob@example.org").await.unwrap(), 0);

        let bob = RosterItem {
            ask: true,
            ..item("bob@example.org", Some("Bob"), Subscription::To)
        };
        assert_eq!(store.put_item(user, &bob).await.unwrap(), 1);
        // Writing the same item again is no change, so no new version.
        assert_eq!(store.put_item(user, &bob).await.unwrap(), 1);
        let carol = RosterItem {
            groups: vec![],
            approved: true,
            ..item("carol@example.net", None, Subscription::None)
        };
        assert_eq!(store.put_item(user, &carol).await.unwrap(), 2);
        let bob2 = item("bob@example.org", None, Subscription::Both);
        assert_eq!(store.put_item(user, &bob2).await.unwrap(), 3);

        let roster = store.roster(user).await.unwrap();
        assert_eq!(roster.version, 3);
        assert_eq!(
            roster.items.into_iter().collect::<Vec<_>>(),
            [
                ("bob@example.org".to_owned(), bob2.clone()),
                ("carol@example.net".to_owned(), carol.clone()),
            ]
        );
        assert!(roster.pending_in.is_empty());

        assert_eq!(
            store.remove_item(user, "nobody@example.org").await.unwrap(),
            3
        );
        assert_eq!(store.remove_item(user, "bob@example.org").await.unwrap(), 4);
        assert_eq!(store.remove_item(user, "bob@example.org").await.unwrap(), 4);
        let roster = store.roster(user).await.unwrap();
        assert_eq!(roster.version, 4);
        assert_eq!(roster.items.values().collect::<Vec<_>>(), [&carol]);

        // Pending-in requests: set, replace, clear; none of it touches the version.
        let dave = "dave@example.org";
        store
            .set_pending_in(user, dave, Some("<status>hi</status>"))
            .await
            .unwrap();
        store
            .set_pending_in(user, "erin@example.org", Some(""))
            .await
            .unwrap();
        store
            .set_pending_in(user, dave, Some("<status>again</status>"))
            .await
            .unwrap();
        let roster = store.roster(user).await.unwrap();
        assert_eq!(roster.version, 4);
        assert_eq!(roster.items.len(), 1);
        assert_eq!(
            roster.pending_in.into_iter().collect::<Vec<_>>(),
            [
                (dave.to_owned(), "<status>again</status>".to_owned()),
                ("erin@example.org".to_owned(), String::new()),
            ]
        );
        store.set_pending_in(user, dave, None).await.unwrap();
        store
            .set_pending_in(user, "never@example.org", None)
            .await
            .unwrap();
        let roster = store.roster(user).await.unwrap();
        assert_eq!(
            roster.pending_in.keys().collect::<Vec<_>>(),
            ["erin@example.org"]
        );
        assert_eq!(roster.version, 4);

        // Other users are separate, including one whose name extends this one's.
        for other in ["rosa@example.orgx", "rosa@example.or", "ros"] {
            assert_eq!(store.roster(other).await.unwrap(), Roster::default());
        }
        store
            .set_pending_in("rosa@example.orgx", dave, Some("x"))
            .await
            .unwrap();
        let other = store.roster("rosa@example.orgx").await.unwrap();
        assert_eq!((other.version, other.items.len()), (0, 0));
        assert_eq!(other.pending_in.len(), 1);
        assert_eq!(store.roster(user).await.unwrap().pending_in.len(), 1);
    }

    pub(crate) async fn offline(store: &dyn OfflineStore) {
        let user = "otto@example.org";
        assert!(store.fetch(user).await.unwrap().is_empty());
        assert_eq!(store.count(user).await.unwrap(), 0);
        store.remove_through(user, 10).await.unwrap();
        // A limit of zero stores nothing.
        assert!(!store.push(user, "<message/>", 1, 0).await.unwrap());

        for (i, xml) in ["<m1/>", "<m2/>", "<m3/>"].into_iter().enumerate() {
            assert!(store.push(user, xml, 1000 + i as u64, 3).await.unwrap());
        }
        assert!(!store.push(user, "<m4/>", 2000, 3).await.unwrap());
        assert_eq!(store.count(user).await.unwrap(), 3);
        let got = store.fetch(user).await.unwrap();
        assert_eq!(
            got.iter()
                .map(|m| (m.xml.as_str(), m.stored_at_ms))
                .collect::<Vec<_>>(),
            [("<m1/>", 1000), ("<m2/>", 1001), ("<m3/>", 1002)]
        );
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq), "{got:?}");
        // Fetching does not remove.
        assert_eq!(store.fetch(user).await.unwrap(), got);

        // Removing through the second leaves the third, and frees room under the limit.
        store.remove_through(user, got[1].seq).await.unwrap();
        assert_eq!(store.fetch(user).await.unwrap(), [got[2].clone()]);
        assert_eq!(store.count(user).await.unwrap(), 1);
        assert!(store.push(user, "<m4/>", 3000, 3).await.unwrap());
        let m4 = store.fetch(user).await.unwrap().pop().unwrap();
        assert_eq!((m4.xml.as_str(), m4.stored_at_ms), ("<m4/>", 3000));
        assert!(m4.seq > got[2].seq);

        // Emptying the queue does not reset the sequence.
        store.remove_through(user, u64::MAX).await.unwrap();
        assert_eq!(store.count(user).await.unwrap(), 0);
        assert!(store.push(user, "<m5/>", 4000, 3).await.unwrap());
        let m5 = store.fetch(user).await.unwrap();
        assert_eq!(m5.len(), 1);
        assert!(m5[0].seq > m4.seq, "{} reused after {}", m5[0].seq, m4.seq);
        // Removing through an older seq removes nothing newer.
        store.remove_through(user, m4.seq).await.unwrap();
        assert_eq!(store.fetch(user).await.unwrap(), m5);

        // Queues are per user.
        let other = "otto@example.orgx";
        assert_eq!(store.count(other).await.unwrap(), 0);
        assert!(store.push(other, "<o/>", 1, 1).await.unwrap());
        assert!(!store.push(other, "<o2/>", 1, 1).await.unwrap());
        store.remove_through(user, u64::MAX).await.unwrap();
        assert_eq!(store.count(other).await.unwrap(), 1);
        assert_eq!(store.fetch(other).await.unwrap()[0].xml, "<o/>");
    }

    pub(crate) async fn user_data(store: &dyn UserDataStore) {
        let user = "uma@example.org";
        let other = "uma@example.orgx";

        assert_eq!(store.vcard(user).await.unwrap(), None);
        store
            .set_vcard(user, "<vCard xmlns='vcard-temp'><FN>Uma</FN></vCard>")
            .await
            .unwrap();
        store
            .set_vcard(user, "<vCard xmlns='vcard-temp'><FN>Uma U</FN></vCard>")
            .await
            .unwrap();
        assert_eq!(
            store.vcard(user).await.unwrap().as_deref(),
            Some("<vCard xmlns='vcard-temp'><FN>Uma U</FN></vCard>")
        );
        assert_eq!(store.vcard(other).await.unwrap(), None);

        let bookmarks = "storage storage:bookmarks";
        let prefs = "prefs urn:example:prefs";
        assert_eq!(store.private(user, bookmarks).await.unwrap(), None);
        store
            .set_private(user, bookmarks, "<storage xmlns='storage:bookmarks'/>")
            .await
            .unwrap();
        store
            .set_private(user, prefs, "<prefs xmlns='urn:example:prefs'>1</prefs>")
            .await
            .unwrap();
        store
            .set_private(user, prefs, "<prefs xmlns='urn:example:prefs'>2</prefs>")
            .await
            .unwrap();
        assert_eq!(
            store.private(user, bookmarks).await.unwrap().as_deref(),
            Some("<storage xmlns='storage:bookmarks'/>")
        );
        assert_eq!(
            store.private(user, prefs).await.unwrap().as_deref(),
            Some("<prefs xmlns='urn:example:prefs'>2</prefs>")
        );
        assert_eq!(store.private(user, "prefs urn:other").await.unwrap(), None);
        assert_eq!(store.private(other, bookmarks).await.unwrap(), None);

        assert!(store.blocklist(user).await.unwrap().is_empty());
        let jids = [
            "z@example.org",
            "a@example.org",
            "m@example.org/r",
            "a@example.org",
        ];
        let jids = jids.map(str::to_owned);
        store.set_blocklist(user, &jids).await.unwrap();
        assert_eq!(
            store.blocklist(user).await.unwrap(),
            ["a@example.org", "m@example.org/r", "z@example.org"]
        );
        store.set_blocklist(user, &jids[..1]).await.unwrap();
        assert_eq!(store.blocklist(user).await.unwrap(), ["z@example.org"]);
        assert!(store.blocklist(other).await.unwrap().is_empty());
        store.set_blocklist(user, &[]).await.unwrap();
        assert!(store.blocklist(user).await.unwrap().is_empty());

        assert_eq!(store.last_activity(user).await.unwrap(), None);
        store.set_last_activity(user, 100, "bye").await.unwrap();
        assert_eq!(
            store.last_activity(user).await.unwrap(),
            Some((100, "bye".to_owned()))
        );
        store.set_last_activity(user, 200, "").await.unwrap();
        assert_eq!(
            store.last_activity(user).await.unwrap(),
            Some((200, String::new()))
        );
        assert_eq!(store.last_activity(other).await.unwrap(), None);
    }

    pub(crate) async fn rooms(store: &dyn RoomStore) {
        let room = "lounge@conference.example.org";
        let other = "lounge@conference.example.orgx";
        assert_eq!(store.room(room).await.unwrap(), None);
        assert!(store.rooms().await.unwrap().is_empty());
        store.put_room(room, "<v1/>", Some("Lounge")).await.unwrap();
        store.put_room(other, "<o/>", None).await.unwrap();
        store
            .put_room(room, "<v2/>", Some("The lounge"))
            .await
            .unwrap();
        for (jid, record) in [("b@example.org/r", "<b/>"), ("a@example.org/r", "<a1/>")] {
            store.set_occupant(room, jid, Some(record)).await.unwrap();
        }
        store
            .set_occupant(room, "a@example.org/r", Some("<a2/>"))
            .await
            .unwrap();
        store
            .set_occupant(room, "c@example.org/r", Some("<c/>"))
            .await
            .unwrap();
        store
            .set_occupant(room, "c@example.org/r", None)
            .await
            .unwrap();
        assert_eq!(
            store.room(room).await.unwrap(),
            Some(StoredRoom {
                state: "<v2/>".to_owned(),
                occupants: vec![
                    ("a@example.org/r".to_owned(), "<a2/>".to_owned()),
                    ("b@example.org/r".to_owned(), "<b/>".to_owned()),
                ],
            })
        );
        assert_eq!(
            store.rooms().await.unwrap(),
            [
                (room.to_owned(), Some("The lounge".to_owned())),
                (other.to_owned(), None),
            ]
        );
        // Hidden again, then gone with everything it had.
        store.put_room(room, "<v3/>", None).await.unwrap();
        assert_eq!(store.rooms().await.unwrap()[0], (room.to_owned(), None));
        store.delete_room(room).await.unwrap();
        assert_eq!(store.room(room).await.unwrap(), None);
        store.put_room(room, "<v4/>", None).await.unwrap();
        assert!(
            store
                .room(room)
                .await
                .unwrap()
                .unwrap()
                .occupants
                .is_empty()
        );
        store.delete_room(room).await.unwrap();
        assert_eq!(store.rooms().await.unwrap(), [(other.to_owned(), None)]);
        store.delete_room(other).await.unwrap();
    }

    /// Concurrent writers cannot exceed the offline limit or lose a version bump.
    pub(crate) async fn concurrent(storage: &Storage) {
        let user = "cora@example.org";
        let pushes = (0..32).map(|i| {
            let offline = Arc::clone(&storage.offline);
            tokio::spawn(async move { offline.push(user, &format!("<m{i}/>"), i, 5).await })
        });
        let puts = (0..16).map(|i| {
            let rosters = Arc::clone(&storage.rosters);
            let contact = format!("c{i}@example.org");
            tokio::spawn(async move {
                let item = item(&contact, None, Subscription::None);
                rosters.put_item(user, &item).await
            })
        });
        let puts: Vec<_> = puts.collect();
        let mut stored = 0;
        for push in pushes {
            stored += usize::from(push.await.unwrap().unwrap());
        }
        assert_eq!(stored, 5);
        let got = storage.offline.fetch(user).await.unwrap();
        assert_eq!(got.len(), 5);
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq), "{got:?}");

        let mut versions = Vec::new();
        for put in puts {
            versions.push(put.await.unwrap().unwrap());
        }
        versions.sort_unstable();
        assert_eq!(versions, (1..=16).collect::<Vec<u64>>());
        let roster = storage.rosters.roster(user).await.unwrap();
        assert_eq!((roster.version, roster.items.len()), (16, 16));
    }

    /// Gives `user` an account and one of everything.
    pub(crate) async fn fill(storage: &Storage, user: &str) {
        storage
            .accounts
            .create_account(user, &creds(user))
            .await
            .unwrap();
        let rosters = &storage.rosters;
        let bob = item("bob@example.org", Some("Bob"), Subscription::Both);
        rosters.put_item(user, &bob).await.unwrap();
        rosters
            .put_item(user, &item("gone@example.org", None, Subscription::To))
            .await
            .unwrap();
        rosters.remove_item(user, "gone@example.org").await.unwrap();
        rosters
            .set_pending_in(user, "dave@example.org", Some("<status>hi</status>"))
            .await
            .unwrap();
        let offline = &storage.offline;
        for (i, xml) in ["<gone/>", "<m1/>", "<m2/>"].into_iter().enumerate() {
            assert!(offline.push(user, xml, i as u64, 10).await.unwrap());
        }
        let first = offline.fetch(user).await.unwrap()[0].seq;
        offline.remove_through(user, first).await.unwrap();
        let data = &storage.user_data;
        data.set_vcard(user, "<vCard/>").await.unwrap();
        data.set_private(user, "a b", "<a xmlns='b'/>")
            .await
            .unwrap();
        data.set_blocklist(user, &["spam@example.org".to_owned()])
            .await
            .unwrap();
        data.set_last_activity(user, 42, "away").await.unwrap();
    }

    /// Asserts `user` holds exactly what [`fill`] left.
    pub(crate) async fn check_filled(storage: &Storage, user: &str) {
        let got = storage.accounts.credentials(user).await.unwrap();
        assert_eq!(got, Some(creds(user)), "{user}");
        let roster = storage.rosters.roster(user).await.unwrap();
        assert_eq!(roster.version, 3, "{user}");
        assert_eq!(
            roster.items.values().collect::<Vec<_>>(),
            [&item("bob@example.org", Some("Bob"), Subscription::Both)]
        );
        assert_eq!(
            roster.pending_in.into_iter().collect::<Vec<_>>(),
            [(
                "dave@example.org".to_owned(),
                "<status>hi</status>".to_owned()
            )]
        );
        let offline = storage.offline.fetch(user).await.unwrap();
        assert_eq!(
            offline
                .iter()
                .map(|m| (m.xml.as_str(), m.stored_at_ms))
                .collect::<Vec<_>>(),
            [("<m1/>", 1), ("<m2/>", 2)]
        );
        assert_eq!(storage.offline.count(user).await.unwrap(), 2);
        let data = &storage.user_data;
        assert_eq!(data.vcard(user).await.unwrap().as_deref(), Some("<vCard/>"));
        assert_eq!(
            data.private(user, "a b").await.unwrap().as_deref(),
            Some("<a xmlns='b'/>")
        );
        assert_eq!(data.blocklist(user).await.unwrap(), ["spam@example.org"]);
        assert_eq!(
            data.last_activity(user).await.unwrap(),
            Some((42, "away".to_owned()))
        );
        // The loader's one read agrees with the stores read one by one.
        let loaded = storage.loader.load_user(user).await.unwrap();
        assert!(loaded.exists, "{user}");
        assert_eq!(loaded.roster, storage.rosters.roster(user).await.unwrap());
        assert_eq!(loaded.blocklist, ["spam@example.org"]);
    }

    /// Asserts nothing at all is stored for `user`.
    pub(crate) async fn check_empty(storage: &Storage, user: &str) {
        assert_eq!(storage.accounts.credentials(user).await.unwrap(), None);
        assert_eq!(
            storage.rosters.roster(user).await.unwrap(),
            Roster::default()
        );
        assert!(storage.offline.fetch(user).await.unwrap().is_empty());
        assert_eq!(storage.offline.count(user).await.unwrap(), 0);
        let data = &storage.user_data;
        assert_eq!(data.vcard(user).await.unwrap(), None);
        assert_eq!(data.private(user, "a b").await.unwrap(), None);
        assert!(data.blocklist(user).await.unwrap().is_empty());
        assert_eq!(data.last_activity(user).await.unwrap(), None);
        let loaded = storage.loader.load_user(user).await.unwrap();
        assert!(!loaded.exists && loaded.blocklist.is_empty());
        assert_eq!(loaded.roster, Roster::default());
    }

    /// What [`before_restart`] wrote that [`after_restart`] needs to know.
    pub(crate) struct Written {
        m2_seq: u64,
        drained_seq: u64,
    }

    /// Writes what a durable backend must still hold after a restart (of the process
    /// or of the server behind it): accounts, one deleted, a [`fill`]ed user, and a
    /// drained offline queue whose last seq must not be forgotten.
    pub(crate) async fn before_restart(storage: &Storage) -> Written {
        let accounts = &storage.accounts;
        for user in ["alice@example.org", "bob@example.org"] {
            accounts.create_account(user, &creds(user)).await.unwrap();
        }
        assert!(accounts.delete_account("bob@example.org").await.unwrap());
        fill(storage, "fred@example.org").await;
        let offline = &storage.offline;
        assert!(
            offline
                .push("gil@example.org", "<m/>", 1, 10)
                .await
                .unwrap()
        );
        let drained_seq = offline.fetch("gil@example.org").await.unwrap()[0].seq;
        offline
            .remove_through("gil@example.org", drained_seq)
            .await
            .unwrap();
        let m2_seq = offline.fetch("fred@example.org").await.unwrap()[1].seq;
        Written {
            m2_seq,
            drained_seq,
        }
    }

    /// Checks what [`before_restart`] wrote is all there, and that counters carry on
    /// from where they were, not from zero.
    pub(crate) async fn after_restart(storage: &Storage, written: Written) {
        assert_eq!(
            storage.accounts.list_accounts().await.unwrap(),
            ["alice@example.org", "fred@example.org"]
        );
        let got = storage.accounts.credentials("alice@example.org").await;
        assert_eq!(got.unwrap(), Some(creds("alice@example.org")));
        check_filled(storage, "fred@example.org").await;

        let item = RosterItem {
            jid: "new@example.org".to_owned(),
            ..RosterItem::default()
        };
        let version = storage.rosters.put_item("fred@example.org", &item).await;
        assert_eq!(version.unwrap(), 4);
        let offline = &storage.offline;
        assert!(
            offline
                .push("fred@example.org", "<m3/>", 3, 10)
                .await
                .unwrap()
        );
        assert!(offline.fetch("fred@example.org").await.unwrap()[2].seq > written.m2_seq);
        assert!(
            offline
                .push("gil@example.org", "<n/>", 2, 10)
                .await
                .unwrap()
        );
        let gil = offline.fetch("gil@example.org").await.unwrap();
        assert!(gil[0].seq > written.drained_seq);
    }

    pub(crate) async fn delete_user(storage: &Storage) {
        let user = "dora@example.org";
        // Neighbours in key order must survive the range deletes.
        let neighbours = ["dora@example.orgx", "dora@example.or", "dor"];
        fill(storage, user).await;
        for other in neighbours {
            fill(storage, other).await;
        }
        check_filled(storage, user).await;

        assert!(storage.delete_user(user).await.unwrap());
        check_empty(storage, user).await;
        for other in neighbours {
            check_filled(storage, other).await;
        }
        assert!(!storage.delete_user(user).await.unwrap());
        assert!(!storage.delete_user("nobody@example.org").await.unwrap());

        // Leftover data without an account is removed too, though the answer is false.
        storage.user_data.set_vcard(user, "<vCard/>").await.unwrap();
        assert!(!storage.delete_user(user).await.unwrap());
        check_empty(storage, user).await;

        // The name can be registered again and starts from nothing.
        fill(storage, user).await;
        check_filled(storage, user).await;
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

    fn config(backend: StorageBackend, path: PathBuf, redis_url: String) -> StorageConfig {
        StorageConfig {
            backend,
            path,
            redis_url,
            redis_key_prefix: "test:".to_owned(),
        }
    }

    #[tokio::test]
    async fn open_selects_backend() {
        let unused_url = "redis://127.0.0.1:1/".to_owned();
        let unused_path = PathBuf::from("/nonexistent/unused.redb");
        let cfg = config(
            StorageBackend::Memory,
            unused_path.clone(),
            unused_url.clone(),
        );
        conformance::all(&open(&cfg).await.unwrap()).await;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/shoal.redb");
        let cfg = config(StorageBackend::Embedded, path.clone(), unused_url);
        conformance::all(&open(&cfg).await.unwrap()).await;
        assert!(path.exists());

        let server = crate::testing::RedisServer::start();
        let cfg = config(StorageBackend::Redis, unused_path, server.url());
        let storage = open(&cfg).await.unwrap();
        conformance::all(&storage).await;
        // The configured prefix is the one used.
        let client = ::redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let accounts: usize = ::redis::cmd("HLEN")
            .arg("test:accounts")
            .query_async(&mut conn)
            .await
            .unwrap();
        let listed = storage.accounts.list_accounts().await.unwrap();
        assert!(!listed.is_empty());
        assert_eq!(accounts, listed.len());
    }

    #[tokio::test]
    async fn unreachable_redis_is_a_clear_error() {
        // A port that was free a moment ago: nothing answers there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let url = format!("redis://:secret@127.0.0.1:{port}/");
        let cfg = config(StorageBackend::Redis, PathBuf::new(), url);
        let started = std::time::Instant::now();
        let err = open(&cfg).await.err().expect("no server there").to_string();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert!(
            err.contains(&format!("redis connect on 127.0.0.1:{port}")),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
    }
}
