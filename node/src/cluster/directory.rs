//! The session directory: on which node each bound resource lives.
//!
//! Per user, the hash `{prefix}sess:{bare}` maps resource → `"{node} {session id}"`;
//! per node, the set `{prefix}node-sess:{node}` lists the full JIDs bound there, so the
//! sessions of a node that died can be found and purged (and their contacts told they
//! went unavailable). A bare JID never contains `/`, so a full JID splits at its first
//! `/`. Every change is one Lua script, so the hash and the index never disagree.
//!
//! The directory is written by the owner of the user's shard when a session binds or
//! unbinds; it is read when a user's state is loaded, not per stanza (DESIGN.md
//! invariant 3).

use redis::aio::ConnectionManager;
use redis::{RedisResult, Script};

/// Runs `request` once more when the connection dropped under it (the connection
/// manager reconnects meanwhile, e.g. after a Redis restart). Only for requests whose
/// repetition changes nothing: reads, and writes of the same value.
async fn again_if_dropped<T, F: Future<Output = RedisResult<T>>>(
    request: impl Fn() -> F,
) -> RedisResult<T> {
    match request().await {
        Err(e) if e.is_connection_dropped() || e.is_io_error() => request().await,
        result => result,
    }
}

/// Where a session lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub node: String,
    pub session: u64,
}

impl Entry {
    fn encode(&self) -> String {
        format!("{} {}", self.node, self.session)
    }

    fn decode(s: &str) -> Option<Entry> {
        let (node, session) = s.split_once(' ')?;
        Some(Entry {
            node: node.to_owned(),
            session: session.parse().ok()?,
        })
    }
}

/// Binds KEYS[1] (user hash) field ARGV[1] (resource) to ARGV[2] (entry); KEYS[2] is
/// the new node's index, ARGV[3] the full JID, ARGV[4] the index key prefix. Returns
/// the previous entry, if any, and drops the full JID from the previous node's index
/// when the node changed.
const REGISTER: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
if old then
  local old_node = string.match(old, '^(%S+) ')
  local new_node = string.match(ARGV[2], '^(%S+) ')
  if old_node ~= new_node then
    redis.call('SREM', ARGV[4] .. old_node, ARGV[3])
  end
end
return old
";

/// Removes resource ARGV[1] from KEYS[1] only if it still holds ARGV[2] (a late unbind
/// must not remove the session that replaced it); KEYS[2] is the node's index, ARGV[3]
/// the full JID. Returns 1 if removed.
const UNREGISTER: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[3])
  return 1
end
return 0
";

/// Removes every session of node ARGV[1] listed in its index KEYS[1]; ARGV[2] is the
/// user hash key prefix. Returns the full JIDs removed.
const PURGE: &str = r"
local gone = {}
for _, full in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local slash = string.find(full, '/', 1, true)
  if slash then
    local key = ARGV[2] .. string.sub(full, 1, slash - 1)
    local resource = string.sub(full, slash + 1)
    local cur = redis.call('HGET', key, resource)
    if cur and string.match(cur, '^(%S+) ') == ARGV[1] then
      redis.call('HDEL', key, resource)
      gone[#gone + 1] = full
    end
  end
end
redis.call('DEL', KEYS[1])
return gone
";

pub struct Directory {
    redis: ConnectionManager,
    prefix: String,
    register: Script,
    unregister: Script,
    purge: Script,
}

impl Directory {
    pub fn new(redis: ConnectionManager, prefix: &str) -> Self {
        Self {
            redis,
            prefix: prefix.to_owned(),
            register: Script::new(REGISTER),
            unregister: Script::new(UNREGISTER),
            purge: Script::new(PURGE),
        }
    }

    fn user_key(&self, bare: &str) -> String {
        format!("{}sess:{bare}", self.prefix)
    }

    fn index_prefix(&self) -> String {
        format!("{}node-sess:", self.prefix)
    }

    fn index_key(&self, node: &str) -> String {
        format!("{}{node}", self.index_prefix())
    }

    /// Records that `bare/resource` is bound on `entry`. Returns the entry it replaces:
    /// a session elsewhere that must be closed with `<conflict/>`.
    pub async fn register(
        &self,
        bare: &str,
        resource: &str,
        entry: &Entry,
    ) -> redis::RedisResult<Option<Entry>> {
        let old: Option<String> = again_if_dropped(|| {
            let mut redis = self.redis.clone();
            let mut invocation = self.register.key(self.user_key(bare));
            invocation
                .key(self.index_key(&entry.node))
                .arg(resource)
                .arg(entry.encode())
                .arg(format!("{bare}/{resource}"))
                .arg(self.index_prefix());
            async move { invocation.invoke_async(&mut redis).await }
        })
        .await?;
        Ok(old.as_deref().and_then(Entry::decode))
    }

    /// Removes `bare/resource` if it is still `entry`; whether it was.
    pub async fn unregister(
        &self,
        bare: &str,
        resource: &str,
        entry: &Entry,
    ) -> redis::RedisResult<bool> {
        let removed: u8 = again_if_dropped(|| {
            let mut redis = self.redis.clone();
            let mut invocation = self.unregister.key(self.user_key(bare));
            invocation
                .key(self.index_key(&entry.node))
                .arg(resource)
                .arg(entry.encode())
                .arg(format!("{bare}/{resource}"));
            async move { invocation.invoke_async(&mut redis).await }
        })
        .await?;
        Ok(removed == 1)
    }

    /// Every bound resource of `bare` and where it lives, sorted by resource.
    pub async fn resources(&self, bare: &str) -> redis::RedisResult<Vec<(String, Entry)>> {
        let all: Vec<(String, String)> = again_if_dropped(|| {
            let mut redis = self.redis.clone();
            let cmd = redis::cmd("HGETALL").arg(self.user_key(bare)).clone();
            async move { cmd.query_async(&mut redis).await }
        })
        .await?;
        let mut out: Vec<(String, Entry)> = all
            .into_iter()
            .filter_map(|(resource, v)| Entry::decode(&v).map(|e| (resource, e)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes every session of a dead `node`; returns their full JIDs, so their
    /// users' owners can tell contacts they went unavailable.
    pub async fn purge_node(&self, node: &str) -> redis::RedisResult<Vec<String>> {
        let mut redis = self.redis.clone();
        let mut gone: Vec<String> = self
            .purge
            .key(self.index_key(node))
            .arg(node)
            .arg(format!("{}sess:", self.prefix))
            .invoke_async(&mut redis)
            .await?;
        gone.sort();
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RedisServer;

    fn on(node: &str, session: u64) -> Entry {
        Entry {
            node: node.into(),
            session,
        }
    }

    /// Binding a full JID already bound elsewhere returns the old entry (to close
    /// with `<conflict/>`) and moves the JID between the node indexes; a stale unbind
    /// removes nothing; purging a dead node removes exactly its sessions.
    #[tokio::test]
    async fn conflicts_stale_unbinds_and_purges() {
        let redis = RedisServer::start();
        let client = redis::Client::open(redis.url()).unwrap();
        let dir = Directory::new(ConnectionManager::new(client).await.unwrap(), "t:");
        let juliet = "juliet@example.com";

        assert_eq!(
            dir.register(juliet, "balcony", &on("a", 1)).await.unwrap(),
            None
        );
        assert_eq!(
            dir.register(juliet, "chamber/2", &on("b", 7))
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            dir.register("romeo@example.net", "r", &on("b", 8))
                .await
                .unwrap(),
            None
        );
        // The same full JID bound on node c replaces a's session.
        assert_eq!(
            dir.register(juliet, "balcony", &on("c", 3)).await.unwrap(),
            Some(on("a", 1))
        );
        // a's late unbind must not remove c's session.
        assert!(
            !dir.unregister(juliet, "balcony", &on("a", 1))
                .await
                .unwrap()
        );
        assert_eq!(
            dir.resources(juliet).await.unwrap(),
            [
                ("balcony".to_owned(), on("c", 3)),
                ("chamber/2".to_owned(), on("b", 7))
            ]
        );
        // Node a lists nothing any more; node b dies with two sessions.
        assert_eq!(dir.purge_node("a").await.unwrap(), Vec::<String>::new());
        assert_eq!(
            dir.purge_node("b").await.unwrap(),
            ["juliet@example.com/chamber/2", "romeo@example.net/r"]
        );
        assert_eq!(
            dir.resources(juliet).await.unwrap(),
            [("balcony".to_owned(), on("c", 3))]
        );
        assert!(
            dir.unregister(juliet, "balcony", &on("c", 3))
                .await
                .unwrap()
        );
        assert!(dir.resources(juliet).await.unwrap().is_empty());
        assert_eq!(dir.purge_node("c").await.unwrap(), Vec::<String>::new());
    }
}
