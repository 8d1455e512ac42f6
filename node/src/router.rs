//! Routing: where a stanza goes next (RFC 6120 §10).
//!
//! The [`Router`] decides, from the `to` address alone, whether a stanza is for the
//! server itself, for a local account (and then which shard owns it), or for another
//! domain. It hands the stanza to the owner's mailbox with `try_send` and never waits:
//! a full mailbox is a counted drop and an error back to the sender (DESIGN.md
//! invariant 4). It holds no per-user state; that lives in the shard actors.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use actix::Addr;
use jid::{BareJid, Jid};
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition};
use shoal_xmpp::stanza::Stanza;
use tracing::debug;

use crate::metrics::{Mailbox, Metrics};
use crate::server_iq::{self, ServerInfo};
use crate::shard::{RouteToUser, ShardHost};

/// Which shard owns a bare JID. A stable hash (not std's, whose algorithm may change
/// between Rust releases) so every node of a cluster computes the same owner.
pub fn shard_of(bare: &BareJid, shard_count: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(bare.as_str().as_bytes()) % u64::from(shard_count)) as u32
}

struct Inner {
    domain: BareJid,
    shard_count: u32,
    /// Filled once the shard hosts have started (they need a router themselves).
    hosts: OnceLock<Vec<Addr<ShardHost>>>,
    metrics: Metrics,
    info: ServerInfo,
}

/// Cheap to clone; one per node, shared by every actor.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl Router {
    pub fn new(domain: BareJid, shard_count: u32, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                domain,
                shard_count,
                hosts: OnceLock::new(),
                metrics,
                info: ServerInfo {
                    started: Instant::now(),
                },
            }),
        }
    }

    /// Installs the shard hosts; called once at start.
    pub fn set_hosts(&self, hosts: Vec<Addr<ShardHost>>) {
        assert!(!hosts.is_empty(), "at least one shard host");
        if self.inner.hosts.set(hosts).is_err() {
            panic!("shard hosts installed twice");
        }
    }

    pub fn domain(&self) -> &BareJid {
        &self.inner.domain
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn hosts(&self) -> &[Addr<ShardHost>] {
        self.inner
            .hosts
            .get()
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The shard host actor that owns `bare`.
    pub fn host_for(&self, bare: &BareJid) -> &Addr<ShardHost> {
        let hosts = self.hosts();
        let shard = shard_of(bare, self.inner.shard_count) as usize;
        &hosts[shard % hosts.len()]
    }

    /// Whether `jid` is served here (the domain or an account on it).
    pub fn is_local(&self, jid: &Jid) -> bool {
        jid.domain() == self.inner.domain.domain()
    }

    /// Routes a stanza whose `from` is already trustworthy. `since` is when it entered
    /// the server, for the latency histogram.
    pub fn route(&self, stanza: Stanza, since: Instant) {
        let Some(to) = stanza.to.clone() else {
            // Stanzas without 'to' are resolved by the session before routing; one
            // reaching here is addressed to the server.
            return self.to_server(stanza, since);
        };
        if !self.is_local(&to) {
            // Federation arrives with the s2s work; until then other domains are
            // unreachable, which RFC 6120 §10.4 says to report this way.
            debug!(to = %to, "no route to remote domain");
            return self.bounce(
                &stanza,
                StanzaError::new(StanzaErrorCondition::RemoteServerNotFound),
                since,
            );
        }
        if to.node().is_none() {
            return self.to_server(stanza, since);
        }
        let bare = to.to_bare();
        let msg = RouteToUser { stanza, since };
        if let Err(e) = self.host_for(&bare).try_send(msg) {
            self.inner.metrics.mailbox_drop(Mailbox::Shard);
            let msg = e.into_inner();
            self.bounce(
                &msg.stanza,
                StanzaError::with_text(
                    StanzaErrorCondition::ResourceConstraint,
                    "server overloaded, try again",
                ),
                since,
            );
        }
    }

    /// Stanzas for the server itself (RFC 6120 §10.3 "to the server").
    fn to_server(&self, stanza: Stanza, since: Instant) {
        if let Some(reply) = server_iq::handle(&stanza, &self.inner.info) {
            self.route_reply(reply, since);
        }
    }

    /// Sends the error reply for `stanza` back to its sender (nothing for errors).
    pub fn bounce(&self, stanza: &Stanza, error: StanzaError, since: Instant) {
        if let Some(reply) = stanza.error_reply(&error) {
            self.route_reply(reply, since);
        }
    }

    /// Routes a reply generated by the server. A reply addressed nowhere (the original
    /// had no sender) is dropped: there is no one to tell.
    fn route_reply(&self, reply: Stanza, since: Instant) {
        match &reply.to {
            Some(to) if to.node().is_some() => self.route(reply, since),
            _ => debug!("reply without a local recipient dropped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_of_is_stable_and_spread() {
        let a = BareJid::new("juliet@localhost").unwrap();
        // Pinned: changing the hash moves every user of a running cluster.
        assert_eq!(shard_of(&a, 1024), shard_of(&a, 1024));
        let mut counts = vec![0u32; 16];
        for i in 0..16_000 {
            let j = BareJid::new(&format!("user{i}@localhost")).unwrap();
            counts[shard_of(&j, 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
