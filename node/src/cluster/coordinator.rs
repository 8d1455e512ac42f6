//! The periodic round that keeps a node's shard ownership in line with the live
//! membership: heartbeat, read the live nodes, renew the leases held, claim the free
//! shards this node is the target of, and report the held shards whose target moved
//! elsewhere so the node can drain them and hand them off.
//!
//! Rounds run every third of the lease TTL and at once when a membership event
//! arrives. The coordinator only decides; the caller drains shards (their users'
//! state and queued work) before calling [`Coordinator::hand_off`], so a graceful leave
//! or a handoff loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use super::membership::Membership;
use super::shards::{Leases, ShardId, target};

/// What one round changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Shards this node now holds and did not before.
    pub gained: Vec<ShardId>,
    /// Shards whose lease was found taken (this node had lost them); stop serving.
    pub lost: Vec<ShardId>,
    /// Shards held whose target is another live node: drain, then hand off.
    pub moving: Vec<ShardId>,
    /// The live node ids, sorted.
    pub live: Vec<String>,
    /// Each live node's cluster endpoint, by id.
    pub endpoints: BTreeMap<String, String>,
}

pub struct Coordinator {
    membership: Membership,
    leases: Leases,
    shards: u32,
    /// Leaving gracefully: no heartbeat, and this node is no shard's target, so every
    /// round hands off what is still held.
    leaving: bool,
}

impl Coordinator {
    pub fn new(membership: Membership, leases: Leases, shards: u32) -> Self {
        Self {
            membership,
            leases,
            shards,
            leaving: false,
        }
    }

    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// Joins the cluster (first round follows).
    pub async fn join(&self) -> redis::RedisResult<()> {
        self.membership.join().await
    }

    /// One round; see the module documentation.
    pub async fn round(&mut self) -> redis::RedisResult<Round> {
        if !self.leaving {
            self.membership.heartbeat().await?;
        }
        let me = self.membership.me().id.clone();
        let mut nodes = self.membership.live().await?;
        if self.leaving {
            nodes.retain(|n| n.id != me);
        }
        let live: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
        let endpoints = nodes.into_iter().map(|n| (n.id, n.endpoint)).collect();
        let lost = self.leases.renew().await?;
        let held: BTreeSet<ShardId> = self.leases.held().collect();
        let (mine, moving): (Vec<ShardId>, Vec<ShardId>) = (0..self.shards)
            .map(|s| (s, target(s, &live) == Some(me.as_str())))
            .fold(
                (Vec::new(), Vec::new()),
                |(mut mine, mut moving), (s, is_mine)| {
                    if is_mine && !held.contains(&s) {
                        mine.push(s);
                    } else if !is_mine && held.contains(&s) {
                        moving.push(s);
                    }
                    (mine, moving)
                },
            );
        let gained = self
            .leases
            .claim(&mine)
            .await?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        Ok(Round {
            gained,
            lost,
            moving,
            live,
            endpoints,
        })
    }

    /// Releases `shards` once the caller has drained them, and tells the other nodes
    /// so their next round (which claims them) runs at once.
    pub async fn hand_off(&mut self, shards: &[ShardId]) -> redis::RedisResult<()> {
        self.leases.release(shards).await?;
        self.membership.announce_shards().await
    }

    /// Tells the others this node claimed shards (their next round learns the owners).
    pub async fn announce_gains(&self) -> redis::RedisResult<()> {
        self.membership.announce_shards().await
    }

    /// Starts a graceful leave: out of the membership at once; the following rounds
    /// hand every held shard off.
    pub async fn start_leaving(&mut self) -> redis::RedisResult<()> {
        self.leaving = true;
        self.membership.leave().await
    }

    /// Shards still held.
    pub fn held(&self) -> usize {
        self.leases.held().count()
    }

    /// Graceful leave: releases every shard held (drained by the caller) and leaves.
    pub async fn leave(&mut self) -> redis::RedisResult<()> {
        let held: Vec<ShardId> = self.leases.held().collect();
        self.leases.release(&held).await?;
        self.membership.leave().await
    }

    /// Whether this node may serve `shard` now.
    pub fn serves(&self, shard: ShardId, now: Instant) -> bool {
        self.leases.valid(shard, now).is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redis::aio::ConnectionManager;

    use super::*;
    use crate::cluster::membership::Node;
    use crate::testing::RedisServer;

    const SHARDS: u32 = 64;

    async fn node(redis: &RedisServer, id: &str, ttl: Duration) -> Coordinator {
        let client = redis::Client::open(redis.url()).unwrap();
        let conn = ConnectionManager::new(client).await.unwrap();
        let me = Node {
            id: id.into(),
            endpoint: format!("{id}:7070"),
        };
        let membership = Membership::new(conn.clone(), "t:", me, ttl);
        let leases = Leases::new(conn, "t:", id, ttl);
        let c = Coordinator::new(membership, leases, SHARDS);
        c.join().await.unwrap();
        c
    }

    /// Runs rounds on every node, handing off what moves, until a round changes
    /// nothing (at most 10 rounds).
    async fn settle(nodes: &mut [&mut Coordinator]) {
        for _ in 0..10 {
            let mut changed = false;
            for n in nodes.iter_mut() {
                let round = n.round().await.unwrap();
                if !round.moving.is_empty() {
                    n.hand_off(&round.moving).await.unwrap();
                }
                changed |= !(round.gained.is_empty() && round.moving.is_empty());
            }
            if !changed {
                return;
            }
        }
        panic!("ownership did not settle in 10 rounds");
    }

    /// Redis's owner of every shard equals its rendezvous target over `ids`.
    async fn assert_owned_by_targets(c: &Coordinator, ids: &[&str]) {
        let live: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let owners = c.leases().owners(SHARDS).await.unwrap();
        for (shard, owner) in (0..SHARDS).zip(owners) {
            assert_eq!(owner.as_deref(), target(shard, &live), "shard {shard}");
        }
    }

    /// Two nodes split the shards by target; a third joins and takes its share by
    /// handoff; one leaves gracefully and the others take its shards at once; one dies
    /// and its shards are taken over once its leases expire.
    #[tokio::test]
    async fn ownership_follows_membership() {
        let redis = RedisServer::start();
        let ttl = Duration::from_millis(1500);
        let mut a = node(&redis, "a", ttl).await;
        let mut b = node(&redis, "b", ttl).await;
        settle(&mut [&mut a, &mut b]).await;
        assert_owned_by_targets(&a, &["a", "b"]).await;
        let now = Instant::now();
        assert!((0..SHARDS).all(|s| a.serves(s, now) != b.serves(s, now)));

        let mut c = node(&redis, "c", ttl).await;
        settle(&mut [&mut a, &mut b, &mut c]).await;
        assert_owned_by_targets(&a, &["a", "b", "c"]).await;

        b.leave().await.unwrap();
        settle(&mut [&mut a, &mut c]).await;
        assert_owned_by_targets(&a, &["a", "c"]).await;

        // c dies: no more rounds, no release. a keeps its rounds going; it takes c's
        // shards only once c's node key and leases have expired, and loses none of its
        // own meanwhile.
        let died = Instant::now();
        let mut taken_over = None;
        while died.elapsed() < 2 * ttl {
            let round = a.round().await.unwrap();
            assert!(round.lost.is_empty(), "a lost {:?}", round.lost);
            if !round.gained.is_empty() {
                assert_eq!(round.live, ["a"]);
                taken_over = Some(died.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let after = taken_over.expect("c's shards taken over within two TTLs");
        assert!(
            after >= ttl / 2,
            "taken over after {after:?}, before c's leases expired"
        );
        assert_owned_by_targets(&a, &["a"]).await;
        assert!(!(0..SHARDS).any(|s| c.serves(s, Instant::now())));
    }
}
