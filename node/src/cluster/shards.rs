//! Shard ownership: which node serves which shard, by leases in Redis.
//!
//! The cluster has a fixed number of shards. The *target* owner of a shard is chosen
//! by rendezvous hashing over the live nodes ([`target`]): every node computes the same
//! answer from the same member list, and a node joining or leaving moves only the
//! shards it gains or loses. A node serves a shard only while it holds the shard's
//! lease: the key `{prefix}shard:{n}` holding `"{node} {epoch}"` with a TTL.
//!
//! - A claim succeeds only on a free shard (never held, released, or expired) and takes
//!   a new epoch from `{prefix}shard-epoch:{n}`; the epoch fences a slow former owner.
//! - Renewal is one script call for all of a node's shards: a lease is extended only
//!   if it is still held by that node.
//! - A node counts a lease valid until the moment it *sent* the claim or renewal plus
//!   the TTL minus a safety margin, so it stops serving a shard before Redis can hand
//!   the shard to another node, even if Redis becomes unreachable (DESIGN.md: "a node
//!   that cannot renew stops serving the shard before the lease expires").
//! - Release deletes only the node's own leases, so a moved shard is claimable at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use redis::Script;
use redis::aio::ConnectionManager;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// A shard number, `0..shard_count`.
pub type ShardId = u32;

/// The live node that should own `shard`: the highest rendezvous score. `None` with no
/// live node.
pub fn target(shard: ShardId, nodes: &[String]) -> Option<&str> {
    nodes
        .iter()
        .max_by_key(|node| (score(shard, node), node.as_str()))
        .map(String::as_str)
}

fn score(shard: ShardId, node: &str) -> u64 {
    xxh3_64_with_seed(node.as_bytes(), u64::from(shard))
}

/// A lease this node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Fencing token: higher for every new owner of the shard.
    pub epoch: u64,
    /// Serve the shard only before this instant.
    pub valid_until: Instant,
}

/// Claims the free shards among KEYS (pairs: lease key, epoch counter key): returns a
/// new epoch per pair, or 0 where another node holds the shard. A lease this node
/// already holds is kept with its epoch.
const CLAIM: &str = r"
local out = {}
for i = 1, #KEYS, 2 do
  local cur = redis.call('GET', KEYS[i])
  local got = 0
  if cur then
    local owner, epoch = string.match(cur, '^(%S+) (%d+)$')
    if owner == ARGV[1] then
      redis.call('PEXPIRE', KEYS[i], ARGV[2])
      got = tonumber(epoch)
    end
  else
    got = redis.call('INCR', KEYS[i + 1])
    redis.call('SET', KEYS[i], ARGV[1] .. ' ' .. got, 'PX', ARGV[2])
  end
  out[#out + 1] = got
end
return out
";

/// Extends every lease in KEYS still held by ARGV[1]; returns 1/0 per key.
const RENEW: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  if cur and string.match(cur, '^(%S+) ') == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
";

/// Deletes every lease in KEYS still held by ARGV[1].
const RELEASE: &str = r"
for _, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  if cur and string.match(cur, '^(%S+) ') == ARGV[1] then
    redis.call('DEL', key)
  end
end
return 0
";

/// This node's side of shard ownership.
pub struct Leases {
    redis: ConnectionManager,
    prefix: String,
    node: String,
    ttl: Duration,
    /// Taken off every lease's validity for clock drift and request latency.
    margin: Duration,
    held: BTreeMap<ShardId, Lease>,
    claim: Script,
    renew: Script,
    release: Script,
}

impl Leases {
    pub fn new(redis: ConnectionManager, prefix: &str, node: &str, ttl: Duration) -> Self {
        Self {
            redis,
            prefix: prefix.to_owned(),
            node: node.to_owned(),
            ttl,
            margin: ttl / 5,
            held: BTreeMap::new(),
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }

    fn key(&self, shard: ShardId) -> String {
        format!("{}shard:{shard}", self.prefix)
    }

    fn valid_from(&self, sent: Instant) -> Instant {
        sent + self.ttl.saturating_sub(self.margin)
    }

    /// The lease on `shard` if this node may serve it now.
    pub fn valid(&self, shard: ShardId, now: Instant) -> Option<Lease> {
        self.held
            .get(&shard)
            .copied()
            .filter(|l| now < l.valid_until)
    }

    /// The shards this node holds a lease on (valid or not yet renewed).
    pub fn held(&self) -> impl Iterator<Item = ShardId> + '_ {
        self.held.keys().copied()
    }

    /// Tries to claim `shards` in one call; the leases this node got (or already had).
    pub async fn claim(&mut self, shards: &[ShardId]) -> redis::RedisResult<Vec<(ShardId, Lease)>> {
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let sent = Instant::now();
        let mut invocation = self.claim.prepare_invoke();
        for &shard in shards {
            invocation
                .key(self.key(shard))
                .key(format!("{}shard-epoch:{shard}", self.prefix));
        }
        invocation.arg(&self.node).arg(self.ttl.as_millis() as u64);
        let mut redis = self.redis.clone();
        let epochs: Vec<u64> = invocation.invoke_async(&mut redis).await?;
        let valid_until = self.valid_from(sent);
        let mut got = Vec::new();
        for (&shard, epoch) in shards.iter().zip(epochs) {
            if epoch == 0 {
                self.held.remove(&shard);
            } else {
                let lease = Lease { epoch, valid_until };
                self.held.insert(shard, lease);
                got.push((shard, lease));
            }
        }
        Ok(got)
    }

    /// The current owner of every shard `0..count` as Redis has it (`None`: free), for
    /// the routing cache.
    pub async fn owners(&self, count: u32) -> redis::RedisResult<Vec<Option<String>>> {
        let keys: Vec<String> = (0..count).map(|s| self.key(s)).collect();
        let mut redis = self.redis.clone();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut redis)
            .await?;
        Ok(values
            .into_iter()
            .map(|v| v.and_then(|v| v.split_once(' ').map(|(node, _)| node.to_owned())))
            .collect())
    }

    /// Renews every held lease in one call. Returns the shards lost (taken over after
    /// an expiry); they are no longer held. On a Redis error nothing is extended, so
    /// the leases lapse locally at their `valid_until`.
    pub async fn renew(&mut self) -> redis::RedisResult<Vec<ShardId>> {
        if self.held.is_empty() {
            return Ok(Vec::new());
        }
        let shards: Vec<ShardId> = self.held.keys().copied().collect();
        let sent = Instant::now();
        let mut invocation = self.renew.prepare_invoke();
        for &shard in &shards {
            invocation.key(self.key(shard));
        }
        invocation.arg(&self.node).arg(self.ttl.as_millis() as u64);
        let mut redis = self.redis.clone();
        let renewed: Vec<u8> = invocation.invoke_async(&mut redis).await?;
        let valid_until = self.valid_from(sent);
        let mut lost = Vec::new();
        for (shard, ok) in shards.into_iter().zip(renewed) {
            if ok == 1 {
                if let Some(l) = self.held.get_mut(&shard) {
                    l.valid_until = valid_until;
                }
            } else {
                self.held.remove(&shard);
                lost.push(shard);
            }
        }
        Ok(lost)
    }

    /// Gives up `shards` (after draining them, on a handoff or a graceful leave).
    pub async fn release(&mut self, shards: &[ShardId]) -> redis::RedisResult<()> {
        if shards.is_empty() {
            return Ok(());
        }
        for shard in shards {
            self.held.remove(shard);
        }
        let mut invocation = self.release.prepare_invoke();
        for &shard in shards {
            invocation.key(self.key(shard));
        }
        invocation.arg(&self.node);
        let mut redis = self.redis.clone();
        invocation.invoke_async(&mut redis).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RedisServer;

    fn nodes(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    /// Every node gets a fair share, and a joining node takes shards only for itself:
    /// no shard moves between the nodes that were already there.
    #[test]
    fn rendezvous_is_balanced_and_moves_little() {
        const SHARDS: u32 = 1024;
        let three = nodes(&["node-a", "node-b", "node-c"]);
        let four = nodes(&["node-a", "node-b", "node-c", "node-d"]);
        let mut share = BTreeMap::new();
        for shard in 0..SHARDS {
            let before = target(shard, &three).unwrap();
            *share.entry(before).or_insert(0) += 1;
            let after = target(shard, &four).unwrap();
            assert!(
                after == before || after == "node-d",
                "shard {shard} moved {before} → {after}"
            );
        }
        for (node, n) in share {
            assert!((290..=400).contains(&n), "{node} has {n} of {SHARDS}");
        }
        let moved = (0..SHARDS)
            .filter(|&s| target(s, &four) == Some("node-d"))
            .count();
        assert!(
            (200..=320).contains(&moved),
            "{moved} shards moved to node-d"
        );
        assert_eq!(target(7, &[]), None);
    }

    async fn leases(redis: &RedisServer, node: &str, ttl_ms: u64) -> Leases {
        let client = redis::Client::open(redis.url()).unwrap();
        let conn = ConnectionManager::new(client).await.unwrap();
        Leases::new(conn, "t:", node, Duration::from_millis(ttl_ms))
    }

    async fn claim_one(leases: &mut Leases, shard: ShardId) -> Option<Lease> {
        let got = leases.claim(&[shard]).await.unwrap();
        got.first().map(|&(_, lease)| lease)
    }

    /// A held shard cannot be claimed by another node; after a release it can at once,
    /// after an expiry once the TTL has passed, each time with a higher epoch. The old
    /// owner's renewal then reports the shard lost.
    #[tokio::test]
    async fn leases_are_exclusive_and_fenced() {
        let redis = RedisServer::start();
        let mut a = leases(&redis, "a", 400).await;
        let mut b = leases(&redis, "b", 400).await;

        let first = claim_one(&mut a, 5).await.expect("free shard");
        assert_eq!(
            claim_one(&mut a, 5).await.map(|l| l.epoch),
            Some(first.epoch)
        );
        assert_eq!(claim_one(&mut b, 5).await, None);
        assert!(a.valid(5, Instant::now()).is_some());
        assert!(b.valid(5, Instant::now()).is_none());

        a.release(&[5]).await.unwrap();
        let second = claim_one(&mut b, 5).await.expect("released shard");
        assert!(second.epoch > first.epoch);

        // b stops renewing; a may take the shard once the lease has expired in Redis.
        assert_eq!(claim_one(&mut a, 5).await, None);
        let deadline = Instant::now() + Duration::from_secs(5);
        let third = loop {
            if let Some(lease) = claim_one(&mut a, 5).await {
                break lease;
            }
            assert!(Instant::now() < deadline, "b's lease never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            b.valid(5, Instant::now()).is_none(),
            "b stopped serving before the expiry"
        );
        assert!(third.epoch > second.epoch);
        assert_eq!(b.renew().await.unwrap(), vec![5]);
        assert_eq!(b.held().count(), 0);
        assert_eq!(a.renew().await.unwrap(), Vec::<ShardId>::new());
    }

    /// Renewal keeps a lease alive past its TTL (1.6 s of renewals on a 1 s TTL); when Redis is gone the renewal fails
    /// and the node's own validity runs out before the lease could expire in Redis.
    #[tokio::test]
    async fn a_node_cut_off_from_redis_stops_serving_in_time() {
        let mut redis = RedisServer::start();
        let mut a = leases(&redis, "a", 1000).await;
        let shards: Vec<ShardId> = (0..8).collect();
        assert_eq!(a.claim(&shards).await.unwrap().len(), 8);
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(a.renew().await.unwrap(), Vec::<ShardId>::new());
        }
        let renewed_at = Instant::now();
        assert!((0..8).all(|s| a.valid(s, renewed_at).is_some()));

        redis.kill();
        assert!(a.renew().await.is_err());
        let lapse = (0..8).map(|s| a.held[&s].valid_until).max().unwrap();
        assert!(
            lapse <= renewed_at + Duration::from_millis(1000),
            "validity ends within the TTL of the last renewal"
        );
        assert!((0..8).all(|s| a.valid(s, lapse).is_none()));
    }
}
