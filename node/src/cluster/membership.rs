//! Cluster membership in Redis: which nodes are alive and where their cluster (gRPC)
//! endpoints are.
//!
//! Each node keeps a key `{prefix}node:{id}` holding its endpoint, with a TTL that its
//! heartbeat refreshes; Redis expires the key of a node that stops, so liveness never
//! depends on the nodes' clocks agreeing. The set `{prefix}nodes` lists every id ever
//! announced; readers drop the ids whose key has expired. Joins and leaves are
//! published on `{prefix}events` so the other nodes refresh at once instead of at
//! their next periodic read (DESIGN.md invariant 3: Redis is never on a stanza's path,
//! nodes cache what they read here).

use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;

/// A node's identity and cluster endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Node {
    pub id: String,
    /// `host:port` of its cluster gRPC endpoint.
    pub endpoint: String,
}

/// What a membership change announces on the events channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Joined(String),
    Left(String),
}

impl Event {
    fn encode(&self) -> String {
        match self {
            Event::Joined(id) => format!("joined {id}"),
            Event::Left(id) => format!("left {id}"),
        }
    }

    /// Parses a message of the events channel; `None` for anything else.
    pub fn decode(msg: &str) -> Option<Event> {
        match msg.split_once(' ')? {
            ("joined", id) => Some(Event::Joined(id.to_owned())),
            ("left", id) => Some(Event::Left(id.to_owned())),
            _ => None,
        }
    }
}

/// This node's membership.
#[derive(Clone)]
pub struct Membership {
    redis: ConnectionManager,
    prefix: String,
    me: Node,
    ttl: Duration,
}

impl Membership {
    /// `ttl` is how long the node counts as alive after its last heartbeat; heartbeats
    /// should come at least three times per `ttl`.
    pub fn new(redis: ConnectionManager, prefix: &str, me: Node, ttl: Duration) -> Self {
        Self {
            redis,
            prefix: prefix.to_owned(),
            me,
            ttl,
        }
    }

    pub fn me(&self) -> &Node {
        &self.me
    }

    /// The channel membership events are published on.
    pub fn events_channel(&self) -> String {
        format!("{}events", self.prefix)
    }

    fn node_key(&self, id: &str) -> String {
        format!("{}node:{id}", self.prefix)
    }

    fn nodes_key(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// Announces this node: writes its key and tells the others.
    pub async fn join(&self) -> redis::RedisResult<()> {
        self.heartbeat().await?;
        let mut redis = self.redis.clone();
        redis
            .publish::<_, _, ()>(
                self.events_channel(),
                Event::Joined(self.me.id.clone()).encode(),
            )
            .await
    }

    /// Refreshes this node's key (and re-adds it should Redis have lost it).
    pub async fn heartbeat(&self) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.node_key(&self.me.id))
            .arg(&self.me.endpoint)
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .ignore()
            .sadd(self.nodes_key(), &self.me.id)
            .ignore()
            .query_async(&mut redis)
            .await
    }

    /// Tells the others this node released or claimed shards, so they run a round now
    /// (claiming what was released, learning the new owners) instead of at their next
    /// periodic one. Not a membership change ([`Event::decode`] reads it as nothing).
    pub async fn announce_shards(&self) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        redis
            .publish::<_, _, ()>(self.events_channel(), format!("shards {}", self.me.id))
            .await
    }

    /// Removes this node at once (graceful leave) and tells the others.
    pub async fn leave(&self) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        redis::pipe()
            .atomic()
            .del(self.node_key(&self.me.id))
            .ignore()
            .srem(self.nodes_key(), &self.me.id)
            .ignore()
            .publish(
                self.events_channel(),
                Event::Left(self.me.id.clone()).encode(),
            )
            .ignore()
            .query_async(&mut redis)
            .await
    }

    /// The live nodes, sorted by id. Ids whose key has expired are removed from the
    /// set on the way.
    pub async fn live(&self) -> redis::RedisResult<Vec<Node>> {
        let mut redis = self.redis.clone();
        let mut ids: Vec<String> = redis.smembers(self.nodes_key()).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        ids.sort();
        let keys: Vec<String> = ids.iter().map(|id| self.node_key(id)).collect();
        let endpoints: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut redis)
            .await?;
        let mut live = Vec::with_capacity(ids.len());
        let mut dead = Vec::new();
        for (id, endpoint) in ids.into_iter().zip(endpoints) {
            match endpoint {
                Some(endpoint) => live.push(Node { id, endpoint }),
                None => dead.push(id),
            }
        }
        if !dead.is_empty() {
            // A node that comes back re-adds itself with its next heartbeat.
            redis.srem::<_, _, ()>(self.nodes_key(), &dead).await?;
        }
        Ok(live)
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;
    use crate::testing::RedisServer;

    async fn member(redis: &RedisServer, id: &str, ttl_ms: u64) -> Membership {
        let client = redis::Client::open(redis.url()).unwrap();
        let conn = ConnectionManager::new(client).await.unwrap();
        let me = Node {
            id: id.into(),
            endpoint: format!("127.0.0.1:70{}", id.len()),
        };
        Membership::new(conn, "t:", me, Duration::from_millis(ttl_ms))
    }

    fn ids(nodes: &[Node]) -> Vec<&str> {
        nodes.iter().map(|n| n.id.as_str()).collect()
    }

    /// Joined nodes are listed with their endpoints; a leave removes one at once; a
    /// node that stops its heartbeat disappears once its TTL runs out.
    #[tokio::test]
    async fn joins_leaves_and_expiry() {
        let redis = RedisServer::start();
        let a = member(&redis, "a", 10_000).await;
        let b = member(&redis, "bb", 10_000).await;
        let c = member(&redis, "ccc", 300).await;

        let client = redis::Client::open(redis.url()).unwrap();
        let mut events = client.get_async_pubsub().await.unwrap();
        events.subscribe(a.events_channel()).await.unwrap();

        for m in [&a, &b, &c] {
            m.join().await.unwrap();
        }
        let live = a.live().await.unwrap();
        assert_eq!(ids(&live), ["a", "bb", "ccc"]);
        assert_eq!(live[1].endpoint, "127.0.0.1:702");

        b.leave().await.unwrap();
        assert_eq!(ids(&a.live().await.unwrap()), ["a", "ccc"]);

        // c's 300 ms TTL runs out without a heartbeat; a keeps beating.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            a.heartbeat().await.unwrap();
            if ids(&a.live().await.unwrap()) == ["a"] {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "c never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A heartbeat brings an expired node back.
        c.heartbeat().await.unwrap();
        assert_eq!(ids(&a.live().await.unwrap()), ["a", "ccc"]);

        let mut stream = events.on_message();
        let mut got = Vec::new();
        while got.len() < 4 {
            let msg = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("an event within 5 s")
                .expect("the subscription is open");
            let text: String = msg.get_payload().unwrap();
            got.push(Event::decode(&text).expect("a membership event"));
        }
        assert_eq!(
            got,
            [
                Event::Joined("a".into()),
                Event::Joined("bb".into()),
                Event::Joined("ccc".into()),
                Event::Left("bb".into()),
            ]
        );
    }

    #[test]
    fn events_round_trip() {
        for e in [Event::Joined("n1".into()), Event::Left("n-2".into())] {
            assert_eq!(Event::decode(&e.encode()), Some(e));
        }
        assert_eq!(Event::decode("hello"), None);
    }
}
