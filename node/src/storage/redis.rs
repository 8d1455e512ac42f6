//! The Redis backend: every store in one Redis server, shared by all nodes of a cluster.
//!
//! Owns the connection (a [`ConnectionManager`], which reconnects by itself after the
//! server restarts or the link drops), the key layout and the Lua scripts that make
//! read-modify-write updates atomic. Records are the versioned bytes of
//! [`super::codec`], exactly as the embedded store writes them; this module must never
//! store serde-derived or otherwise unversioned layouts. Durability is Redis's: run it
//! with the append-only file on (`appendonly yes`), or a crash loses recent writes.
//!
//! # Key layout
//!
//! `P` is `storage.redis_key_prefix` (default `shoal:`), so several deployments can
//! share one Redis. `U` is the per-user prefix `P` `u:{` *len* `:` *bare JID* `}`,
//! where *len* is the JID's length in bytes in decimal. JIDs may contain `:`, `{` and
//! `}`, but with the length in front the JID's end is known without looking at its
//! bytes, so no two users' keys can collide. The braces make the JID part a Redis
//! Cluster hash tag: all of one user's keys share their text up to the first `}` after
//! the first `{`, so they would hash to one slot and a script may touch them together.
//! (The store talks to one Redis server or its failover endpoint; it does not speak
//! the Redis Cluster protocol.)
//!
//! | key                 | type   | contents                                              |
//! |---------------------|--------|-------------------------------------------------------|
//! | `P accounts`        | hash   | bare JID → credentials record                         |
//! | `U :roster:items`   | hash   | contact bare JID → roster item record                 |
//! | `U :roster:pending` | hash   | contact bare JID → text record (pending-in payload)   |
//! | `U :roster:version` | string | counter record: the roster version (absent = 0)       |
//! | `U :offline`        | hash   | seq in decimal → offline message record               |
//! | `U :offline:seq`    | string | counter record: the last seq handed out (kept when the queue empties) |
//! | `U :vcard`          | string | text record                                           |
//! | `U :private`        | hash   | `"name ns"` → text record                             |
//! | `U :blocklist`      | string | blocklist record (absent = empty)                     |
//! | `U :last`           | string | last activity record                                  |
//! | `P rooms`           | hash   | MUC room bare JID → text record (the room's state)    |
//! | `P rooms:listed`    | hash   | room bare JID → text record (the name it is listed under) |
//! | `R :occupants`      | hash   | occupant full JID → text record                       |
//!
//! `R` is the per-room prefix `P` `r:{` *len* `:` *room JID* `}`, built like `U`.
//!
//! Accounts share one hash so that `list_accounts` is one `HKEYS` rather than a `SCAN`
//! of the whole keyspace; everything else a user has lives under `U`, so deleting a
//! user deletes a fixed list of keys and nothing else. Rooms likewise share two hashes
//! so the service's directory is one read.
//!
//! # Atomicity
//!
//! Updates that read before they write run as Lua scripts ([`redis::Script`], sent by
//! SHA with `EVALSHA` and reloaded after a server restart): roster version bumps only
//! when an item really changes, the offline limit check with the seq bump and append,
//! `remove_through`, and the must-exist credentials update. Redis runs a script alone,
//! so no other client's command interleaves with it and one round trip suffices;
//! WATCH/MULTI would need a round trip per step and a retry loop under contention
//! (concurrent pushes to one user's queue are exactly that case). Creating an account
//! is a single `HSETNX`. Reads that span keys (a roster, loading a user) are one
//! `MULTI`/`EXEC` pipeline, so no write lands between their reads. Counters are codec
//! counter records (version byte 1, u64 big-endian), which the scripts read and write
//! with Redis's `struct` library; Lua numbers are doubles, exact up to 2^53, which no
//! roster version or seq reaches.
//!
//! # Connection loss
//!
//! A command that fails because the connection dropped is sent once more, on the
//! connection the manager re-establishes, when repeating it cannot change the outcome
//! (reads, overwrites, deletes, the roster updates, which compare before bumping).
//! Creating an account, deleting one and pushing an offline message are not repeated:
//! the first attempt may have been applied, and a repeat would answer "already
//! exists", "did not exist" or store the message twice. Those fail with
//! [`StorageError::Backend`] and the caller's usual error path.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisResult, Script, ScriptInvocation};
use shoal_xmpp::sasl::StoredCredentials;

use super::codec::{
    decode_blocklist, decode_counter, decode_credentials, decode_last_activity, decode_offline,
    decode_roster_item, decode_text, encode_blocklist_record, encode_credentials,
    encode_last_activity, encode_offline, encode_roster_item, encode_text,
};
use super::{
    AccountStore, OfflineStore, RoomStore, RosterStore, StorageError, StoredRoom, UserDataStore,
    UserLoader,
};
use crate::model::{OfflineMessage, Roster, RosterItem, UserData};

/// How long one connection attempt may take. Redis answers in well under a millisecond
/// on a healthy network; a few seconds covers a slow DNS lookup or TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a command may wait for its answer. Scripts here touch one user's keys and
/// finish in microseconds, so a command still unanswered after this is lost, and the
/// caller is better served by an error than by a stalled shard queue.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect attempts per connection loss, with exponential backoff from
/// [`RECONNECT_MIN_DELAY`] up to [`RECONNECT_MAX_DELAY`]: about 3 s in all, which rides
/// out a Redis restart or failover and still reports an unreachable server at startup
/// promptly.
const RECONNECT_RETRIES: usize = 5;
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// Reads and writes the codec's counter record (`codec::encode_counter`: version byte
/// 1, then the value as a u64 big-endian). A damaged counter aborts the script with a
/// `CORRUPT` error before anything is written.
const LUA_COUNTERS: &str = r"
local function read_counter(key)
  local v = redis.call('GET', key)
  if not v then return 0 end
  if #v ~= 9 or string.byte(v, 1) ~= 1 then
    error({err = 'CORRUPT counter record'})
  end
  return (struct.unpack('>I8', v, 2))
end
local function write_counter(key, n)
  redis.call('SET', key, struct.pack('>BI8', 1, n))
end
";

/// KEYS: accounts hash. ARGV: user, credentials record. 1 if replaced, 0 if absent.
const SET_CREDENTIALS: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
";

/// KEYS: roster items, roster version. ARGV: contact, item record. The version after.
const PUT_ITEM: &str = r"
local version = read_counter(KEYS[2])
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return version end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
version = version + 1
write_counter(KEYS[2], version)
return version
";

/// KEYS: roster items, roster version. ARGV: contact. The version after.
const REMOVE_ITEM: &str = r"
local version = read_counter(KEYS[2])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return version end
version = version + 1
write_counter(KEYS[2], version)
return version
";

/// KEYS: offline queue, offline seq. ARGV: max, message record. The new seq, or 0 when
/// the queue is full.
const PUSH: &str = r"
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local seq = read_counter(KEYS[2]) + 1
write_counter(KEYS[2], seq)
redis.call('HSET', KEYS[1], string.format('%d', seq), ARGV[2])
return seq
";

/// KEYS: offline queue. ARGV: through. How many were removed. Fields that are not
/// numbers are left for `fetch` to report as corrupt.
const REMOVE_THROUGH: &str = r"
local through = tonumber(ARGV[1])
local removed = 0
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  local seq = tonumber(field)
  if seq and seq <= through then
    redis.call('HDEL', KEYS[1], field)
    removed = removed + 1
  end
end
return removed
";

/// The scripts, hashed once.
struct Scripts {
    set_credentials: Script,
    put_item: Script,
    remove_item: Script,
    push: Script,
    remove_through: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_counters = |body: &str| Script::new(&format!("{LUA_COUNTERS}{body}"));
        Self {
            set_credentials: Script::new(SET_CREDENTIALS),
            put_item: with_counters(PUT_ITEM),
            remove_item: with_counters(REMOVE_ITEM),
            push: with_counters(PUSH),
            remove_through: Script::new(REMOVE_THROUGH),
        }
    }
}

/// One of a user's keys (see the module's key layout).
#[derive(Clone, Copy)]
enum UserKey {
    RosterItems,
    RosterPending,
    RosterVersion,
    Offline,
    OfflineSeq,
    Vcard,
    Private,
    Blocklist,
    LastActivity,
}

impl UserKey {
    fn suffix(self) -> &'static str {
        match self {
            Self::RosterItems => ":roster:items",
            Self::RosterPending => ":roster:pending",
            Self::RosterVersion => ":roster:version",
            Self::Offline => ":offline",
            Self::OfflineSeq => ":offline:seq",
            Self::Vcard => ":vcard",
            Self::Private => ":private",
            Self::Blocklist => ":blocklist",
            Self::LastActivity => ":last",
        }
    }
}

/// Builds key names under the configured prefix.
struct Keys {
    prefix: String,
    accounts: String,
    rooms: String,
    rooms_listed: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            accounts: format!("{prefix}accounts"),
            rooms: format!("{prefix}rooms"),
            rooms_listed: format!("{prefix}rooms:listed"),
        }
    }

    /// `P u:{len:user}`, the part every key of `user` starts with.
    fn user_base(&self, user: &str) -> String {
        format!("{}u:{{{}:{user}}}", self.prefix, user.len())
    }

    /// `R :occupants`: a room's occupants.
    fn room_occupants(&self, room: &str) -> String {
        format!("{}r:{{{}:{room}}}:occupants", self.prefix, room.len())
    }

    fn user(&self, user: &str, key: UserKey) -> String {
        let mut name = self.user_base(user);
        name.push_str(key.suffix());
        name
    }
}

/// Whether a command may be sent again after the connection dropped under it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// Repeating it cannot change the outcome.
    Safe,
    /// The first attempt may have been applied; repeating it could answer wrongly.
    Never,
}

/// Something that can be sent on a connection: a command, a pipeline or a script.
trait Request: Sync {
    fn send<T: FromRedisValue + Send>(
        &self,
        conn: &mut ConnectionManager,
    ) -> impl Future<Output = RedisResult<T>> + Send;
}

impl Request for Cmd {
    async fn send<T: FromRedisValue + Send>(&self, conn: &mut ConnectionManager) -> RedisResult<T> {
        self.query_async(conn).await
    }
}

impl Request for Pipeline {
    async fn send<T: FromRedisValue + Send>(&self, conn: &mut ConnectionManager) -> RedisResult<T> {
        self.query_async(conn).await
    }
}

impl Request for ScriptInvocation<'_> {
    async fn send<T: FromRedisValue + Send>(&self, conn: &mut ConnectionManager) -> RedisResult<T> {
        self.invoke_async(conn).await
    }
}

/// A failed Redis operation, naming what was being done and where.
#[derive(Debug)]
struct RedisOpError {
    op: &'static str,
    server: String,
    source: RedisError,
}

impl fmt::Display for RedisOpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "redis {} on {}: {}", self.op, self.server, self.source)
    }
}

impl std::error::Error for RedisOpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Every store, in one Redis server. Cheap to share: commands from all callers are
/// multiplexed over one connection.
pub struct RedisStore {
    conn: ConnectionManager,
    keys: Keys,
    scripts: Scripts,
    /// The server's address without credentials, for error messages.
    server: String,
}

impl RedisStore {
    /// Connects to `url` and checks the server answers `PING`. Fails with a message
    /// naming the server (never the password a URL may carry) when the URL is invalid
    /// or the server cannot be reached within a few seconds.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<Self, StorageError> {
        let client = redis::Client::open(url).map_err(|source| {
            StorageError::Backend(Box::new(RedisOpError {
                op: "parse URL",
                server: "(invalid URL)".to_owned(),
                source,
            }))
        })?;
        let server = client.get_connection_info().addr().to_string();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|source| {
                StorageError::Backend(Box::new(RedisOpError {
                    op: "connect",
                    server: server.clone(),
                    source,
                }))
            })?;
        let store = Self {
            conn,
            keys: Keys::new(key_prefix),
            scripts: Scripts::new(),
            server,
        };
        let _: String = store
            .exec("ping", Replay::Safe, &redis::cmd("PING"))
            .await?;
        store.warn_without_aof().await;
        Ok(store)
    }

    /// Logs a warning when the server says its append-only file is off: then a Redis
    /// crash loses whatever was written since the last snapshot. Managed services
    /// often refuse `CONFIG`; that is not worth a warning.
    async fn warn_without_aof(&self) {
        let cmd = redis::cmd("CONFIG").arg("GET").arg("appendonly").to_owned();
        let answer: Result<Vec<String>, _> = self.exec("config get", Replay::Safe, &cmd).await;
        if let Ok(answer) = answer
            && answer.get(1).is_some_and(|v| v == "no")
        {
            tracing::warn!(
                server = %self.server,
                "Redis runs without the append-only file (appendonly no): a Redis crash \
                 will lose recent writes"
            );
        }
    }

    /// Sends `request`, once more after a dropped connection when `replay` allows.
    async fn exec<T: FromRedisValue + Send>(
        &self,
        op: &'static str,
        replay: Replay,
        request: &impl Request,
    ) -> Result<T, StorageError> {
        let mut conn = self.conn.clone();
        let result = match request.send(&mut conn).await {
            // The manager has started reconnecting; the repeat waits for it.
            Err(e) if replay == Replay::Safe && e.is_io_error() => request.send(&mut conn).await,
            other => other,
        };
        result.map_err(|source| self.error(op, source))
    }

    /// Wraps a Redis error with the operation and the server it failed on.
    fn error(&self, op: &'static str, source: RedisError) -> StorageError {
        StorageError::Backend(Box::new(RedisOpError {
            op,
            server: self.server.clone(),
            source,
        }))
    }

    /// Like [`Self::exec`] for a script that reads the counter at `counter`, whose
    /// damage is reported as corruption of that record.
    async fn exec_counting<T: FromRedisValue + Send>(
        &self,
        op: &'static str,
        replay: Replay,
        request: &ScriptInvocation<'_>,
        counter: &str,
    ) -> Result<T, StorageError> {
        self.exec(op, replay, request).await.map_err(|e| match e {
            StorageError::Backend(inner) if is_corrupt_counter(inner.as_ref()) => {
                StorageError::Corrupt {
                    record: counter.to_owned(),
                    reason: "unknown counter encoding".to_owned(),
                }
            }
            other => other,
        })
    }

    fn user_key(&self, user: &str, key: UserKey) -> String {
        self.keys.user(user, key)
    }

    /// Adds the reads of `user`'s roster keys to `pipe`; [`Self::decode_roster`] takes
    /// their answers.
    fn queue_roster_reads(&self, pipe: &mut Pipeline, user: &str) {
        pipe.cmd("GET")
            .arg(self.user_key(user, UserKey::RosterVersion));
        pipe.cmd("HGETALL")
            .arg(self.user_key(user, UserKey::RosterItems));
        pipe.cmd("HGETALL")
            .arg(self.user_key(user, UserKey::RosterPending));
    }

    /// Decodes a roster from its three keys' raw contents.
    fn decode_roster(
        &self,
        user: &str,
        version: Option<Vec<u8>>,
        items: BTreeMap<String, Vec<u8>>,
        pending: BTreeMap<String, Vec<u8>>,
    ) -> Result<Roster, StorageError> {
        let version = match version {
            Some(bytes) => decode_counter(&self.user_key(user, UserKey::RosterVersion), &bytes)?,
            None => 0,
        };
        let mut roster = Roster {
            version,
            ..Roster::default()
        };
        let items_key = self.user_key(user, UserKey::RosterItems);
        for (contact, bytes) in items {
            let item = decode_roster_item(&format!("{items_key}/{contact}"), &contact, &bytes)?;
            roster.items.insert(contact, item);
        }
        let pending_key = self.user_key(user, UserKey::RosterPending);
        for (contact, bytes) in pending {
            let payload = decode_text(&format!("{pending_key}/{contact}"), &bytes)?;
            roster.pending_in.insert(contact, payload);
        }
        Ok(roster)
    }

    /// Reads and decodes the string at `user`'s `key`.
    async fn get_record<T>(
        &self,
        op: &'static str,
        user: &str,
        key: UserKey,
        decode: impl FnOnce(&str, &[u8]) -> Result<T, StorageError>,
    ) -> Result<Option<T>, StorageError> {
        let name = self.user_key(user, key);
        let bytes: Option<Vec<u8>> = self
            .exec(op, Replay::Safe, redis::cmd("GET").arg(&name))
            .await?;
        bytes.map(|b| decode(&name, &b)).transpose()
    }

    /// Replaces (`Some`) or deletes (`None`) the string at `user`'s `key`.
    async fn set_record(
        &self,
        op: &'static str,
        user: &str,
        key: UserKey,
        bytes: Option<Vec<u8>>,
    ) -> Result<(), StorageError> {
        let name = self.user_key(user, key);
        let cmd = match bytes {
            Some(bytes) => redis::cmd("SET").arg(&name).arg(bytes).to_owned(),
            None => redis::cmd("DEL").arg(&name).to_owned(),
        };
        self.exec::<()>(op, Replay::Safe, &cmd).await
    }

    /// Deletes `user`'s `keys`.
    async fn delete_keys(
        &self,
        op: &'static str,
        user: &str,
        keys: &[UserKey],
    ) -> Result<(), StorageError> {
        let mut cmd = redis::cmd("DEL");
        for &key in keys {
            cmd.arg(self.user_key(user, key));
        }
        self.exec::<()>(op, Replay::Safe, &cmd).await
    }
}

/// Whether `e` is a script's abort over a damaged counter record.
fn is_corrupt_counter(e: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    e.downcast_ref::<RedisOpError>()
        .is_some_and(|e| e.source.code() == Some("CORRUPT"))
}

#[async_trait]
impl AccountStore for RedisStore {
    async fn create_account(
        &self,
        user: &str,
        creds: &StoredCredentials,
    ) -> Result<(), StorageError> {
        let cmd = redis::cmd("HSETNX")
            .arg(&self.keys.accounts)
            .arg(user)
            .arg(encode_credentials(creds)?)
            .to_owned();
        let created: bool = self.exec("create account", Replay::Never, &cmd).await?;
        if created {
            Ok(())
        } else {
            Err(StorageError::AlreadyExists)
        }
    }

    async fn credentials(&self, user: &str) -> Result<Option<StoredCredentials>, StorageError> {
        let cmd = redis::cmd("HGET")
            .arg(&self.keys.accounts)
            .arg(user)
            .to_owned();
        let bytes: Option<Vec<u8>> = self.exec("read credentials", Replay::Safe, &cmd).await?;
        let record = || format!("{}/{user}", self.keys.accounts);
        bytes.map(|b| decode_credentials(&record(), &b)).transpose()
    }

    async fn set_credentials(
        &self,
        user: &str,
        creds: &StoredCredentials,
    ) -> Result<(), StorageError> {
        let bytes = encode_credentials(creds)?;
        let mut call = self.scripts.set_credentials.key(&self.keys.accounts);
        call.arg(user).arg(bytes);
        let replaced: bool = self.exec("set credentials", Replay::Safe, &call).await?;
        if replaced {
            Ok(())
        } else {
            Err(StorageError::NotFound)
        }
    }

    async fn delete_account(&self, user: &str) -> Result<bool, StorageError> {
        let cmd = redis::cmd("HDEL")
            .arg(&self.keys.accounts)
            .arg(user)
            .to_owned();
        self.exec("delete account", Replay::Never, &cmd).await
    }

    async fn list_accounts(&self) -> Result<Vec<String>, StorageError> {
        let cmd = redis::cmd("HKEYS").arg(&self.keys.accounts).to_owned();
        let mut users: Vec<String> = self.exec("list accounts", Replay::Safe, &cmd).await?;
        // Redis keeps hash fields unordered; the trait promises byte order.
        users.sort_unstable();
        Ok(users)
    }
}

/// Loading a user is one `MULTI`/`EXEC` pipeline: account existence, roster and
/// blocklist in one round trip, read together so no script runs between the reads.
#[async_trait]
impl UserLoader for RedisStore {
    async fn load_user(&self, user: &str) -> Result<UserData, StorageError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HEXISTS").arg(&self.keys.accounts).arg(user);
        self.queue_roster_reads(&mut pipe, user);
        pipe.cmd("GET").arg(self.user_key(user, UserKey::Blocklist));
        type Loaded = (
            bool,
            Option<Vec<u8>>,
            BTreeMap<String, Vec<u8>>,
            BTreeMap<String, Vec<u8>>,
            Option<Vec<u8>>,
        );
        let (exists, version, items, pending, blocklist): Loaded =
            self.exec("load user", Replay::Safe, &pipe).await?;
        let blocklist_key = self.user_key(user, UserKey::Blocklist);
        Ok(UserData {
            exists,
            roster: self.decode_roster(user, version, items, pending)?,
            blocklist: blocklist
                .map(|b| decode_blocklist(&blocklist_key, &b))
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

#[async_trait]
impl RosterStore for RedisStore {
    async fn roster(&self, user: &str) -> Result<Roster, StorageError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.queue_roster_reads(&mut pipe, user);
        let (version, items, pending) = self.exec("read roster", Replay::Safe, &pipe).await?;
        self.decode_roster(user, version, items, pending)
    }

    async fn put_item(&self, user: &str, item: &RosterItem) -> Result<u64, StorageError> {
        let bytes = encode_roster_item(item)?;
        let version_key = self.user_key(user, UserKey::RosterVersion);
        let mut call = self
            .scripts
            .put_item
            .key(self.user_key(user, UserKey::RosterItems));
        call.key(&version_key).arg(&item.jid).arg(bytes);
        // Safe to repeat: a repeat finds the item already written and does not bump.
        self.exec_counting("put roster item", Replay::Safe, &call, &version_key)
            .await
    }

    async fn remove_item(&self, user: &str, contact: &str) -> Result<u64, StorageError> {
        let version_key = self.user_key(user, UserKey::RosterVersion);
        let mut call = self
            .scripts
            .remove_item
            .key(self.user_key(user, UserKey::RosterItems));
        call.key(&version_key).arg(contact);
        // Safe to repeat: a repeat finds the item gone and does not bump.
        self.exec_counting("remove roster item", Replay::Safe, &call, &version_key)
            .await
    }

    async fn set_pending_in(
        &self,
        user: &str,
        contact: &str,
        payload: Option<&str>,
    ) -> Result<(), StorageError> {
        let key = self.user_key(user, UserKey::RosterPending);
        let cmd = match payload {
            Some(payload) => redis::cmd("HSET")
                .arg(&key)
                .arg(contact)
                .arg(encode_text(payload)?)
                .to_owned(),
            None => redis::cmd("HDEL").arg(&key).arg(contact).to_owned(),
        };
        self.exec::<()>("set pending-in", Replay::Safe, &cmd).await
    }

    async fn delete_user(&self, user: &str) -> Result<(), StorageError> {
        let keys = [
            UserKey::RosterItems,
            UserKey::RosterPending,
            UserKey::RosterVersion,
        ];
        self.delete_keys("delete roster", user, &keys).await
    }
}

#[async_trait]
impl OfflineStore for RedisStore {
    async fn push(
        &self,
        user: &str,
        xml: &str,
        stored_at_ms: u64,
        max: usize,
    ) -> Result<bool, StorageError> {
        let bytes = encode_offline(stored_at_ms, xml)?;
        let seq_key = self.user_key(user, UserKey::OfflineSeq);
        let mut call = self.scripts.push.key(self.user_key(user, UserKey::Offline));
        call.key(&seq_key).arg(max).arg(bytes);
        let seq: u64 = self
            .exec_counting("push offline message", Replay::Never, &call, &seq_key)
            .await?;
        Ok(seq > 0)
    }

    async fn fetch(&self, user: &str) -> Result<Vec<OfflineMessage>, StorageError> {
        let key = self.user_key(user, UserKey::Offline);
        let cmd = redis::cmd("HGETALL").arg(&key).to_owned();
        let stored: BTreeMap<String, Vec<u8>> =
            self.exec("fetch offline", Replay::Safe, &cmd).await?;
        let mut messages = Vec::with_capacity(stored.len());
        for (field, bytes) in stored {
            let record = format!("{key}/{field}");
            let seq = field.parse().map_err(|_| StorageError::Corrupt {
                record: record.clone(),
                reason: "the field is not a seq".to_owned(),
            })?;
            messages.push(decode_offline(&record, seq, &bytes)?);
        }
        messages.sort_unstable_by_key(|m| m.seq);
        Ok(messages)
    }

    async fn remove_through(&self, user: &str, through: u64) -> Result<(), StorageError> {
        let mut call = self
            .scripts
            .remove_through
            .key(self.user_key(user, UserKey::Offline));
        call.arg(through);
        self.exec::<u64>("remove offline", Replay::Safe, &call)
            .await
            .map(drop)
    }

    async fn count(&self, user: &str) -> Result<usize, StorageError> {
        let cmd = redis::cmd("HLEN")
            .arg(self.user_key(user, UserKey::Offline))
            .to_owned();
        self.exec("count offline", Replay::Safe, &cmd).await
    }

    async fn delete_user(&self, user: &str) -> Result<(), StorageError> {
        let keys = [UserKey::Offline, UserKey::OfflineSeq];
        self.delete_keys("delete offline", user, &keys).await
    }
}

#[async_trait]
impl UserDataStore for RedisStore {
    async fn vcard(&self, user: &str) -> Result<Option<String>, StorageError> {
        self.get_record("read vcard", user, UserKey::Vcard, decode_text)
            .await
    }

    async fn set_vcard(&self, user: &str, xml: &str) -> Result<(), StorageError> {
        let bytes = encode_text(xml)?;
        self.set_record("set vcard", user, UserKey::Vcard, Some(bytes))
            .await
    }

    async fn private(&self, user: &str, key: &str) -> Result<Option<String>, StorageError> {
        let name = self.user_key(user, UserKey::Private);
        let cmd = redis::cmd("HGET").arg(&name).arg(key).to_owned();
        let bytes: Option<Vec<u8>> = self.exec("read private", Replay::Safe, &cmd).await?;
        bytes
            .map(|b| decode_text(&format!("{name}/{key}"), &b))
            .transpose()
    }

    async fn set_private(&self, user: &str, key: &str, xml: &str) -> Result<(), StorageError> {
        let cmd = redis::cmd("HSET")
            .arg(self.user_key(user, UserKey::Private))
            .arg(key)
            .arg(encode_text(xml)?)
            .to_owned();
        self.exec::<()>("set private", Replay::Safe, &cmd).await
    }

    async fn blocklist(&self, user: &str) -> Result<Vec<String>, StorageError> {
        self.get_record("read blocklist", user, UserKey::Blocklist, decode_blocklist)
            .await
            .map(Option::unwrap_or_default)
    }

    async fn set_blocklist(&self, user: &str, jids: &[String]) -> Result<(), StorageError> {
        let bytes = encode_blocklist_record(jids)?;
        self.set_record("set blocklist", user, UserKey::Blocklist, bytes)
            .await
    }

    async fn last_activity(&self, user: &str) -> Result<Option<(u64, String)>, StorageError> {
        self.get_record(
            "read last activity",
            user,
            UserKey::LastActivity,
            decode_last_activity,
        )
        .await
    }

    async fn set_last_activity(
        &self,
        user: &str,
        unix_secs: u64,
        status: &str,
    ) -> Result<(), StorageError> {
        let bytes = encode_last_activity(unix_secs, status)?;
        self.set_record(
            "set last activity",
            user,
            UserKey::LastActivity,
            Some(bytes),
        )
        .await
    }

    async fn delete_user(&self, user: &str) -> Result<(), StorageError> {
        let keys = [
            UserKey::Vcard,
            UserKey::Private,
            UserKey::Blocklist,
            UserKey::LastActivity,
        ];
        self.delete_keys("delete user data", user, &keys).await
    }
}

/// A room's reads and its multi-key writes are `MULTI`/`EXEC` pipelines.
#[async_trait]
impl RoomStore for RedisStore {
    async fn room(&self, room: &str) -> Result<Option<StoredRoom>, StorageError> {
        let occupants_key = self.keys.room_occupants(room);
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HGET").arg(&self.keys.rooms).arg(room);
        pipe.cmd("HGETALL").arg(&occupants_key);
        let (state, occupants): (Option<Vec<u8>>, BTreeMap<String, Vec<u8>>) =
            self.exec("read room", Replay::Safe, &pipe).await?;
        let Some(state) = state else {
            return Ok(None);
        };
        Ok(Some(StoredRoom {
            state: decode_text(&format!("{}/{room}", self.keys.rooms), &state)?,
            occupants: occupants
                .into_iter()
                .map(|(jid, b)| {
                    let record = decode_text(&format!("{occupants_key}/{jid}"), &b)?;
                    Ok((jid, record))
                })
                .collect::<Result<_, StorageError>>()?,
        }))
    }

    async fn put_room(
        &self,
        room: &str,
        state: &str,
        listed: Option<&str>,
    ) -> Result<(), StorageError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HSET")
            .arg(&self.keys.rooms)
            .arg(room)
            .arg(encode_text(state)?);
        match listed {
            Some(name) => pipe
                .cmd("HSET")
                .arg(&self.keys.rooms_listed)
                .arg(room)
                .arg(encode_text(name)?),
            None => pipe.cmd("HDEL").arg(&self.keys.rooms_listed).arg(room),
        };
        self.exec::<()>("put room", Replay::Safe, &pipe).await
    }

    async fn set_occupant(
        &self,
        room: &str,
        occupant: &str,
        record: Option<&str>,
    ) -> Result<(), StorageError> {
        let key = self.keys.room_occupants(room);
        let cmd = match record {
            Some(record) => redis::cmd("HSET")
                .arg(&key)
                .arg(occupant)
                .arg(encode_text(record)?)
                .to_owned(),
            None => redis::cmd("HDEL").arg(&key).arg(occupant).to_owned(),
        };
        self.exec::<()>("set occupant", Replay::Safe, &cmd).await
    }

    async fn delete_room(&self, room: &str) -> Result<(), StorageError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HDEL").arg(&self.keys.rooms).arg(room);
        pipe.cmd("HDEL").arg(&self.keys.rooms_listed).arg(room);
        pipe.cmd("DEL").arg(self.keys.room_occupants(room));
        self.exec::<()>("delete room", Replay::Safe, &pipe).await
    }

    async fn rooms(&self) -> Result<Vec<(String, Option<String>)>, StorageError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HKEYS").arg(&self.keys.rooms);
        pipe.cmd("HGETALL").arg(&self.keys.rooms_listed);
        let (mut rooms, listed): (Vec<String>, BTreeMap<String, Vec<u8>>) =
            self.exec("list rooms", Replay::Safe, &pipe).await?;
        rooms.sort_unstable();
        rooms
            .into_iter()
            .map(|room| {
                let name = listed
                    .get(&room)
                    .map(|b| decode_text(&format!("{}/{room}", self.keys.rooms_listed), b))
                    .transpose()?;
                Ok((room, name))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{Storage, conformance};
    use super::*;
    use crate::storage::codec::encode_counter;
    use crate::testing::RedisServer;

    async fn store(server: &RedisServer) -> RedisStore {
        RedisStore::connect(&server.url(), "shoal:").await.unwrap()
    }

    /// A plain connection for looking at (or damaging) what the store wrote.
    async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(server.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    }

    async fn keys(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(conn).await.unwrap();
        keys.sort_unstable();
        keys
    }

    #[tokio::test]
    async fn conformance() {
        let server = RedisServer::start();
        conformance::all(&Storage::from_backend(Arc::new(store(&server).await))).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_on_many_threads() {
        let server = RedisServer::start();
        conformance::concurrent(&Storage::from_backend(Arc::new(store(&server).await))).await;
    }

    /// Many pushes racing for the last free places of one queue: exactly the limit is
    /// stored, every seq is distinct, and seqs keep rising after the queue is drained.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_offline_pushes_respect_the_limit() {
        let server = RedisServer::start();
        let store = Arc::new(store(&server).await);
        let user = "pat@example.org";
        assert!(store.push(user, "<first/>", 0, 10).await.unwrap());
        let pushes: Vec<_> = (0..100)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.push(user, &format!("<m{i}/>"), i, 10).await })
            })
            .collect();
        let mut accepted = 0;
        for push in pushes {
            accepted += usize::from(push.await.unwrap().unwrap());
        }
        assert_eq!(accepted, 9);
        let stored = store.fetch(user).await.unwrap();
        assert_eq!(stored.len(), 10);
        assert_eq!(store.count(user).await.unwrap(), 10);
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert_eq!(seqs, (1..=10).collect::<Vec<_>>());

        store.remove_through(user, u64::MAX).await.unwrap();
        let again: Vec<_> = (0..20)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.push(user, "<again/>", i, 5).await })
            })
            .collect();
        for push in again {
            push.await.unwrap().unwrap();
        }
        let seqs: Vec<u64> = store
            .fetch(user)
            .await
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(seqs, (11..=15).collect::<Vec<_>>());
    }

    /// Data written before Redis is killed is there after it restarts (append-only file),
    /// and the same store reconnects by itself: no new store, no error to the caller.
    #[tokio::test]
    async fn survives_a_redis_restart_and_reconnects() {
        let mut server = RedisServer::start();
        let storage = Storage::from_backend(Arc::new(store(&server).await));
        let written = conformance::before_restart(&storage).await;
        server.restart();
        // The first call after the restart meets the dropped connection and is repeated
        // on the new one; the scripts, gone from the new server's cache, are reloaded.
        conformance::after_restart(&storage, written).await;

        // A second restart while idle: a push, which is never repeated, works once the
        // connection is back.
        server.restart();
        let _ = storage.accounts.list_accounts().await.unwrap();
        let offline = &storage.offline;
        assert!(
            offline
                .push("gil@example.org", "<o/>", 3, 10)
                .await
                .unwrap()
        );
        assert_eq!(offline.count("gil@example.org").await.unwrap(), 2);
    }

    /// While Redis is down, calls fail with an error naming the operation; they work
    /// again when it is back, on the same store.
    #[tokio::test]
    async fn outage_is_a_backend_error_then_recovers() {
        let mut server = RedisServer::start();
        let store = store(&server).await;
        store
            .create_account("ann@example.org", &conformance::creds("a"))
            .await
            .unwrap();
        server.kill();
        let err = store.credentials("ann@example.org").await.unwrap_err();
        assert!(matches!(err, StorageError::Backend(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("redis read credentials on 127.0.0.1:"),
            "{text}"
        );
        server.restart();
        let creds = store.credentials("ann@example.org").await.unwrap();
        assert_eq!(creds, Some(conformance::creds("a")));
    }

    /// The documented key layout, byte for byte, for JIDs whose characters could break
    /// a naive layout; and deleting a user removes exactly that user's keys.
    #[tokio::test]
    async fn key_layout_is_exact() {
        let keys_of = Keys::new("p:");
        assert_eq!(
            keys_of.user("a:b}c@x", UserKey::RosterVersion),
            "p:u:{7:a:b}c@x}:roster:version"
        );
        assert_eq!(keys_of.accounts, "p:accounts");
        // With the length in front, a JID that looks like another's key still differs.
        assert_ne!(
            keys_of.user("a@x}:vcard", UserKey::Offline),
            keys_of.user("a@x", UserKey::Vcard)
        );

        let server = RedisServer::start();
        let storage = Storage::from_backend(Arc::new(store(&server).await));
        let tricky = "a:1:{b}@example.org";
        let plain = "a@example.org";
        conformance::fill(&storage, tricky).await;
        conformance::fill(&storage, plain).await;
        let mut conn = raw(&server).await;
        let base = format!("shoal:u:{{{}:{tricky}}}", tricky.len());
        let all = keys(&mut conn).await;
        let tricky_keys: Vec<_> = all.iter().filter(|k| k.starts_with(&base)).collect();
        let suffixes: Vec<_> = tricky_keys.iter().map(|k| &k[base.len()..]).collect();
        assert_eq!(
            suffixes,
            [
                ":blocklist",
                ":last",
                ":offline",
                ":offline:seq",
                ":private",
                ":roster:items",
                ":roster:pending",
                ":roster:version",
                ":vcard"
            ]
        );
        // Counters are the codec's records, written by Lua and read back by Rust.
        let version: Vec<u8> = redis::cmd("GET")
            .arg(format!("{base}:roster:version"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(version, encode_counter(3));
        let seq: Vec<u8> = redis::cmd("GET")
            .arg(format!("{base}:offline:seq"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(seq, encode_counter(3));

        assert!(storage.delete_user(tricky).await.unwrap());
        let left = keys(&mut conn).await;
        let removed: Vec<_> = all.iter().filter(|k| !left.contains(k)).collect();
        assert_eq!(removed, tricky_keys);
        conformance::check_empty(&storage, tricky).await;
        conformance::check_filled(&storage, plain).await;
    }

    /// Two prefixes on one server are two separate stores.
    #[tokio::test]
    async fn prefixes_separate_deployments() {
        let server = RedisServer::start();
        let a = RedisStore::connect(&server.url(), "a:").await.unwrap();
        let b = RedisStore::connect(&server.url(), "b:").await.unwrap();
        a.create_account("x@example.org", &conformance::creds("a"))
            .await
            .unwrap();
        b.create_account("x@example.org", &conformance::creds("b"))
            .await
            .unwrap();
        assert!(a.push("x@example.org", "<m/>", 1, 1).await.unwrap());
        assert_eq!(b.count("x@example.org").await.unwrap(), 0);
        let creds = a.credentials("x@example.org").await.unwrap();
        assert_eq!(creds, Some(conformance::creds("a")));
    }

    /// Damaged records surface as `Corrupt` naming the key, also when a script is the
    /// reader, and nothing is written past a damaged counter.
    #[tokio::test]
    async fn corrupt_records_are_errors() {
        let server = RedisServer::start();
        let storage = Storage::from_backend(Arc::new(store(&server).await));
        let user = "mallory@example.org";
        conformance::fill(&storage, user).await;
        conformance::fill(&storage, "fine@example.org").await;
        let mut conn = raw(&server).await;
        let base = format!("shoal:u:{{{}:{user}}}", user.len());
        let garbage: &[u8] = &[1, 0xff];
        let set = |key: String| redis::cmd("SET").arg(key).arg(garbage).to_owned();
        let hset = |key: String, field: &str| {
            redis::cmd("HSET")
                .arg(key)
                .arg(field)
                .arg(garbage)
                .to_owned()
        };
        fn is_corrupt<T: std::fmt::Debug>(result: Result<T, StorageError>, record: &str) {
            match result {
                Err(StorageError::Corrupt { record: r, .. }) if r == record => {}
                other => panic!("expected Corrupt {record}, got {other:?}"),
            }
        }
        let damage = [
            hset("shoal:accounts".to_owned(), user),
            set(format!("{base}:roster:version")),
            set(format!("{base}:offline:seq")),
            hset(format!("{base}:offline"), "2"),
            set(format!("{base}:vcard")),
        ];
        for cmd in &damage {
            let () = cmd.query_async(&mut conn).await.unwrap();
        }
        let accounts = storage.accounts.credentials(user).await;
        is_corrupt(accounts, &format!("shoal:accounts/{user}"));
        let version = format!("{base}:roster:version");
        is_corrupt(storage.rosters.roster(user).await, &version);
        is_corrupt(storage.loader.load_user(user).await, &version);
        let item = RosterItem {
            jid: "z@example.org".to_owned(),
            ..RosterItem::default()
        };
        is_corrupt(storage.rosters.put_item(user, &item).await, &version);
        is_corrupt(
            storage.rosters.remove_item(user, "bob@example.org").await,
            &version,
        );
        let seq = format!("{base}:offline:seq");
        is_corrupt(storage.offline.push(user, "<m/>", 1, 10).await, &seq);
        is_corrupt(
            storage.offline.fetch(user).await,
            &format!("{base}:offline/2"),
        );
        is_corrupt(
            storage.user_data.vcard(user).await,
            &format!("{base}:vcard"),
        );

        // The scripts stopped before writing: the item is not there, the queue did not
        // grow.
        let items: Vec<String> = redis::cmd("HKEYS")
            .arg(format!("{base}:roster:items"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(items, ["bob@example.org"]);
        assert_eq!(storage.offline.count(user).await.unwrap(), 2);

        // Others are untouched, and the damaged user can still be deleted.
        conformance::check_filled(&storage, "fine@example.org").await;
        assert!(storage.delete_user(user).await.unwrap());
        conformance::check_empty(&storage, user).await;
    }
}
