//! The cluster side of a running node: joins, runs the coordinator's rounds in the
//! background and publishes the shard view the router reads.
//!
//! Rounds run every third of the lease TTL, and at once when a membership event
//! arrives on the events channel. Each round's outcome becomes a new [`ShardView`] on a
//! watch channel: which shards this node serves (and until when) and, for routing, the
//! owner of every shard as Redis has it. A round that fails (Redis unreachable) leaves
//! the view as it was, and the leases lapse locally at their `valid_until`, which
//! [`ShardView::serves`] checks: a node cut off from Redis stops serving in time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use metrics::Gauge;
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::coordinator::Coordinator;
use super::membership::{Membership, Node};
use super::shards::{Leases, ShardId};
use crate::metrics::{Metrics, RedisOp, ShardChange};

/// How a node takes part in the cluster.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node: Node,
    pub redis_url: String,
    /// Prefix of every key and channel, so several clusters can share a Redis.
    pub prefix: String,
    pub shards: u32,
    pub lease_ttl: Duration,
}

/// Stops this node serving shards, for the runtime to call before it releases them
/// (handoff, leave) or after it found them taken (lost). The node stops routing to
/// them locally, passes their waiting work on and finishes their storage writes.
pub trait Drain: Send + Sync + 'static {
    /// `generation` is the round doing it: views of earlier rounds, which still list
    /// these shards as served, must not make the node serve them again.
    fn drain(&self, shards: Vec<ShardId>, generation: u64) -> BoxFuture<'static, ()>;
}

/// What the node knows of shard ownership after the last round.
#[derive(Debug, Clone, Default)]
pub struct ShardView {
    /// The round that produced this view, counting from 1.
    pub generation: u64,
    /// Whether the last round reached Redis; false after a failed one.
    pub reachable: bool,
    /// Each live node's cluster endpoint, by id.
    pub endpoints: BTreeMap<String, String>,
    /// Shards this node holds, with the instant its lease stops being valid.
    pub mine: BTreeMap<ShardId, Instant>,
    /// The owner of every shard (`None`: unowned right now).
    pub owners: Vec<Option<String>>,
    /// Live node ids, sorted.
    pub live: Vec<String>,
}

impl ShardView {
    /// Whether this node may serve `shard` at `now`.
    pub fn serves(&self, shard: ShardId, now: Instant) -> bool {
        self.mine.get(&shard).is_some_and(|&until| now < until)
    }
}

/// A running cluster membership.
pub struct Cluster {
    /// Shards claimed by each round, for the node to ask for their sessions.
    gains: Option<mpsc::UnboundedReceiver<Vec<ShardId>>>,
    coordinator: Arc<Mutex<Coordinator>>,
    drain: Arc<dyn Drain>,
    view: watch::Receiver<ShardView>,
    task: JoinHandle<()>,
}

impl Cluster {
    /// Connects to Redis, joins, runs a first round and starts the background rounds.
    pub async fn start(
        settings: Settings,
        drain: Arc<dyn Drain>,
        metrics: Metrics,
    ) -> redis::RedisResult<Self> {
        let client = redis::Client::open(settings.redis_url.as_str())?;
        let redis = super::connect(client.clone(), settings.lease_ttl).await?;
        let membership = Membership::new(
            redis.clone(),
            &settings.prefix,
            settings.node.clone(),
            settings.lease_ttl,
        );
        let events = membership.events_channel();
        let leases = Leases::new(
            redis,
            &settings.prefix,
            &settings.node.id,
            settings.lease_ttl,
        );
        let coordinator = Coordinator::new(membership, leases, settings.shards);
        coordinator.join().await?;
        let coordinator = Arc::new(Mutex::new(coordinator));
        let (gains_tx, gains) = mpsc::unbounded_channel();
        metrics.shard_count(settings.shards);
        let observer = Observer {
            owned: metrics.shards_owned(&settings.node.id),
            metrics,
            gains: gains_tx,
        };
        let first = round(&coordinator, settings.shards, drain.as_ref(), &observer, 1).await?;
        let (tx, view) = watch::channel(first);
        let subscription = subscribe(&client, &events).await?;
        let task = tokio::spawn(run(
            coordinator.clone(),
            drain.clone(),
            observer,
            tx,
            Events {
                client,
                channel: events,
                stream: Some(subscription),
            },
            settings.shards,
            settings.lease_ttl / 3,
        ));
        info!(node = %settings.node.id, "joined the cluster");
        Ok(Self {
            gains: Some(gains),
            coordinator,
            drain,
            view,
            task,
        })
    }

    /// The shard view, updated after every round.
    /// The shards each round claimed (taken once): the node asks every node for the
    /// sessions of their accounts.
    pub fn gains(&mut self) -> mpsc::UnboundedReceiver<Vec<ShardId>> {
        self.gains.take().expect("gains taken once")
    }

    pub fn view(&self) -> watch::Receiver<ShardView> {
        self.view.clone()
    }

    /// Graceful leave: stops the rounds, releases every shard and leaves. The caller
    /// has drained the shards first.
    /// Stops taking part without a word to the others, as a crashed node would: its
    /// leases and membership expire on their own.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Leaves gracefully: out of the membership at once, then the background rounds
    /// hand every shard off (drained first) while the new owners claim them. Returns
    /// once the other nodes own every shard, or after `patience`, when whatever is
    /// still held is drained and released at once.
    pub async fn leave(mut self, patience: Duration) -> redis::RedisResult<()> {
        self.coordinator.lock().await.start_leaving().await?;
        let handed = tokio::time::timeout(
            patience,
            // Done when another node owns every shard, or at once when no other node
            // is left to take any.
            self.view.wait_for(|v| {
                v.mine.is_empty() && (v.live.is_empty() || v.owners.iter().all(Option::is_some))
            }),
        )
        .await;
        self.task.abort();
        let mut c = self.coordinator.lock().await;
        if handed.is_err() || c.held() > 0 {
            warn!(
                held = c.held(),
                "shards not handed off in time; releasing them"
            );
            let held: Vec<ShardId> = c.leases().held().collect();
            self.drain.drain(held, u64::MAX).await;
            c.leave().await?;
        }
        Ok(())
    }
}

/// Runs a round and reads the resulting ownership. Shards that move elsewhere are
/// released at once here: drains of shard state are the router's to add before this
/// hands them off.
/// Where the rounds report what they did.
struct Observer {
    metrics: Metrics,
    owned: Gauge,
    gains: mpsc::UnboundedSender<Vec<ShardId>>,
}

impl Observer {
    async fn timed<T>(
        &self,
        op: RedisOp,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        super::timed(&self.metrics, op, f).await
    }
}

async fn round(
    coordinator: &Mutex<Coordinator>,
    shards: u32,
    drain: &dyn Drain,
    observer: &Observer,
    generation: u64,
) -> redis::RedisResult<ShardView> {
    let mut c = coordinator.lock().await;
    let round = observer.timed(RedisOp::Round, c.round()).await?;
    let metrics = &observer.metrics;
    metrics.shard_change(ShardChange::Gained, round.gained.len());
    if !round.gained.is_empty() {
        let _ = observer.gains.send(round.gained.clone());
        c.announce_gains().await?;
    }
    if !round.lost.is_empty() {
        warn!(shards = ?round.lost, "shard leases were taken over by other nodes");
        metrics.shard_change(ShardChange::Lost, round.lost.len());
        // Nothing to hand over: the shards are someone else's already. Not waited
        // for, so the renewals of the shards still held are not delayed.
        tokio::spawn(drain.drain(round.lost.clone(), generation));
    }
    if !round.moving.is_empty() {
        info!(count = round.moving.len(), "handing shards off");
        drain.drain(round.moving.clone(), generation).await;
        observer
            .timed(RedisOp::Release, c.hand_off(&round.moving))
            .await?;
        metrics.shard_change(ShardChange::HandedOff, round.moving.len());
    }
    let now = Instant::now();
    let mine: BTreeMap<ShardId, Instant> = c
        .leases()
        .held()
        .filter_map(|s| c.leases().valid(s, now).map(|l| (s, l.valid_until)))
        .collect();
    observer.owned.set(mine.len() as f64);
    Ok(ShardView {
        generation,
        reachable: true,
        endpoints: round.endpoints,
        mine,
        owners: c.leases().owners(shards).await?,
        live: round.live,
    })
}

/// The membership events subscription, re-established after Redis comes back.
struct Events {
    client: redis::Client,
    channel: String,
    stream: Option<redis::aio::PubSubStream>,
}

impl Events {
    /// The next event; `None` when the subscription broke (then periodic rounds carry
    /// on, and the subscription is tried again on the next tick).
    async fn next(&mut self) -> Option<()> {
        match &mut self.stream {
            Some(stream) => {
                let event = stream.next().await;
                if event.is_none() {
                    warn!("cluster events subscription closed; relying on periodic rounds");
                    self.stream = None;
                }
                event.map(drop)
            }
            None => std::future::pending().await,
        }
    }

    async fn resubscribe(&mut self) {
        if self.stream.is_none()
            && let Ok(stream) = subscribe(&self.client, &self.channel).await
        {
            info!("cluster events subscription restored");
            self.stream = Some(stream);
        }
    }
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> redis::RedisResult<redis::aio::PubSubStream> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub.into_on_message())
}

async fn run(
    coordinator: Arc<Mutex<Coordinator>>,
    drain: Arc<dyn Drain>,
    observer: Observer,
    tx: watch::Sender<ShardView>,
    mut events: Events,
    shards: u32,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    let mut generation = 1;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // Bounded: a Redis that does not answer must not hold the round up.
                let _ = tokio::time::timeout(period, events.resubscribe()).await;
            }
            _ = events.next() => {}
        }
        generation += 1;
        match round(&coordinator, shards, drain.as_ref(), &observer, generation).await {
            Ok(view) => {
                let _ = tx.send(view);
            }
            Err(e) => {
                warn!(error = %e, "cluster round failed; leases lapse unless renewed");
                // Not ready while Redis cannot be reached (the rest of the view stands,
                // and the leases' own validity stops serving in time).
                tx.send_if_modified(|view| std::mem::replace(&mut view.reachable, false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::RedisServer;

    struct NoDrain;

    impl Drain for NoDrain {
        fn drain(&self, _: Vec<ShardId>, _: u64) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }

    fn settings(redis: &RedisServer, id: &str) -> Settings {
        Settings {
            node: Node {
                id: id.into(),
                endpoint: format!("{id}:7070"),
            },
            redis_url: redis.url(),
            prefix: "t:".into(),
            shards: 32,
            lease_ttl: Duration::from_millis(900),
        }
    }

    /// Waits until `view` satisfies `ok` (5 s at most).
    async fn until(view: &mut watch::Receiver<ShardView>, ok: impl Fn(&ShardView) -> bool) {
        tokio::time::timeout(Duration::from_secs(5), view.wait_for(|v| ok(v)))
            .await
            .expect("view reached within 5 s")
            .unwrap();
    }

    /// A second node joining is noticed through the events channel and both views
    /// converge on a split with every shard served exactly once; when one leaves, the
    /// other serves everything.
    #[tokio::test]
    async fn two_nodes_split_the_shards_and_one_takes_all_after_a_leave() {
        let redis = RedisServer::start();
        let a = Cluster::start(settings(&redis, "a"), Arc::new(NoDrain), Metrics::new())
            .await
            .unwrap();
        let mut va = a.view();
        until(&mut va, |v| v.mine.len() == 32).await;

        let b = Cluster::start(settings(&redis, "b"), Arc::new(NoDrain), Metrics::new())
            .await
            .unwrap();
        let mut vb = b.view();
        let split = |v: &ShardView| {
            v.live == ["a", "b"]
                && v.owners.iter().all(Option::is_some)
                && v.owners.iter().any(|o| o.as_deref() == Some("b"))
        };
        until(&mut va, split).await;
        until(&mut vb, split).await;
        let now = Instant::now();
        let (a_view, b_view) = (va.borrow().clone(), vb.borrow().clone());
        for s in 0..32 {
            assert!(
                !(a_view.serves(s, now) && b_view.serves(s, now)),
                "shard {s} served twice"
            );
        }

        b.leave(Duration::from_secs(5)).await.unwrap();
        until(&mut va, |v| v.live == ["a"] && v.mine.len() == 32).await;
    }
}
