//! Cluster mode: several nodes acting as one server (DESIGN.md "Cluster coordination").
//!
//! Redis holds membership, shard leases and the session directory; nodes forward
//! stanzas to each other over one ordered gRPC stream per peer pair. Nothing here is on
//! a single node's path.

pub mod coordinator;
pub mod directory;
pub mod forward;
pub mod link;
pub mod membership;
pub mod runtime;
pub mod shards;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::metrics::{Metrics, RedisOp};

/// Runs one of the cluster's Redis operations, recording its duration and outcome.
pub async fn timed<T>(
    metrics: &Metrics,
    op: RedisOp,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    let start = std::time::Instant::now();
    let result = f.await;
    metrics.redis_op(op, start.elapsed(), result.is_ok());
    result
}

/// A connection for the cluster's coordination (membership, leases, directory): every
/// request fails within a third of the lease TTL instead of waiting for a reconnect, so
/// a round that cannot reach Redis fails in time and the node stops serving before its
/// leases can expire elsewhere.
pub async fn connect(
    client: redis::Client,
    lease_ttl: Duration,
) -> redis::RedisResult<ConnectionManager> {
    let step = lease_ttl / 3;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(step))
        .set_response_timeout(Some(step))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(step);
    ConnectionManager::new_with_config(client, config).await
}
