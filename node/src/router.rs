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
use bytes::Bytes;
use jid::{BareJid, FullJid, Jid};
use shoal_proto::v1;
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition, StreamErrorCondition};
use shoal_xmpp::stanza::{IqType, Kind, MessageType, Stanza};
use tracing::{debug, warn};

use crate::c2s::session::{Close, Deliver, Session};
use crate::c2s::stanza_kind;
use crate::cluster::forward::{ForwardError, FrameKind, NodeId};
use crate::cluster::link::{self, ClusterLink, MAX_HOPS, Owner, ToOwner};
use crate::metrics::{Mailbox, Metrics, MucPath, RerouteReason, Route};
use crate::muc;
use crate::s2s::S2s;
use crate::server_iq::{self, ServerInfo};
use crate::shard::{Attached, Bind, BindReplyTo, RouteToUser, SessionHandle, ShardHost};
use crate::storage::RoomStore;
use crate::user::{SessionId, UserShared};

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
    /// Cluster mode: shard owners, peers, remote sessions.
    cluster: Option<Arc<ClusterLink>>,
    /// The multi-user chat service, when it is on.
    muc: Option<MucService>,
    /// Federation, unless it is off (`s2s.bind = ""`).
    s2s: OnceLock<S2s>,
}

/// The multi-user chat service as the router sees it.
pub struct MucService {
    /// Its domain (`muc.service`).
    pub domain: BareJid,
    /// Where its room directory is read from.
    pub rooms: Arc<dyn RoomStore>,
}

/// See [`Router::downgrade`].
pub struct WeakRouter(std::sync::Weak<Inner>);

impl WeakRouter {
    pub fn upgrade(&self) -> Option<Router> {
        self.0.upgrade().map(|inner| Router { inner })
    }
}

/// Where a session is, as a MUC room keeps it for each occupant: its copies of the
/// room's stanzas go there directly rather than through the occupant's account.
#[derive(Clone)]
pub enum Home {
    /// A session of this node, with what it reads of its account (the blocklist).
    Here(Addr<Session>, Arc<UserShared>),
    /// A session of another node.
    Node(NodeId),
}

/// Why a stanza did not reach a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFail {
    /// Its mailbox or its node's queue is full: bounce with `<resource-constraint/>`.
    Full,
    /// It is gone: forget it.
    Gone,
}

/// Whether a stanza that reached no session (its session stopped, or was closing) is
/// routed again to be handled as for a session that is gone: messages (another
/// resource, offline storage, RFC 6121 §8.5.2.2.1 and §8.5.3.2.1) and requests (the
/// sender's error, §8.5.3.2.3). Presence is not: the next session is sent current
/// presence anew, and errors and results have no one left to go to.
pub fn worth_handing_back(kind: Kind) -> bool {
    match kind {
        Kind::Message(t) => t != MessageType::Error,
        Kind::Iq(t) => matches!(t, IqType::Get | IqType::Set),
        Kind::Presence(_) => false,
    }
}

/// Cheap to clone; one per node, shared by every actor.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl Router {
    pub fn new(domain: BareJid, shard_count: u32, metrics: Metrics) -> Self {
        Self::with_parts(domain, shard_count, metrics, None, None)
    }

    /// A router with cluster mode (`cluster`) and the MUC service at `muc`.
    pub fn with_parts(
        domain: BareJid,
        shard_count: u32,
        metrics: Metrics,
        cluster: Option<Arc<ClusterLink>>,
        muc: Option<MucService>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                domain,
                shard_count,
                hosts: OnceLock::new(),
                metrics,
                info: ServerInfo {
                    started: Instant::now(),
                },
                cluster,
                muc,
                s2s: OnceLock::new(),
            }),
        }
    }

    /// A handle that does not keep the router alive, for callbacks held by the
    /// router's own parts.
    pub fn downgrade(&self) -> WeakRouter {
        WeakRouter(Arc::downgrade(&self.inner))
    }

    pub fn cluster(&self) -> Option<&Arc<ClusterLink>> {
        self.inner.cluster.as_ref()
    }

    /// Installs the shard hosts; called once at start.
    pub fn set_hosts(&self, hosts: Vec<Addr<ShardHost>>) {
        assert!(!hosts.is_empty(), "at least one shard host");
        if self.inner.hosts.set(hosts).is_err() {
            panic!("shard hosts installed twice");
        }
    }

    /// Turns federation on; called once at start.
    pub fn set_s2s(&self, s2s: S2s) {
        if self.inner.s2s.set(s2s).is_err() {
            panic!("s2s installed twice");
        }
    }

    /// The MUC service's domain, when it is on.
    pub fn muc_domain(&self) -> Option<&BareJid> {
        self.inner.muc.as_ref().map(|m| &m.domain)
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

    /// The shard host actor on this node for `bare`'s shard.
    pub fn host_for(&self, bare: &BareJid) -> &Addr<ShardHost> {
        let hosts = self.hosts();
        let shard = self.shard(bare) as usize;
        &hosts[shard % hosts.len()]
    }

    pub fn shard(&self, bare: &BareJid) -> u32 {
        shard_of(bare, self.inner.shard_count)
    }

    /// Who owns `bare`'s account now: always this node outside cluster mode.
    pub fn owner_of(&self, bare: &BareJid) -> Owner {
        match &self.inner.cluster {
            None => Owner::Here,
            Some(link) => link.owner(self.shard(bare)),
        }
    }

    /// Whether this node owns `bare`'s account now (the receiver's re-check).
    pub fn serves(&self, bare: &BareJid) -> bool {
        self.owner_of(bare) == Owner::Here
    }

    /// Hands work for an account to its owner: a local shard host, a frame to the
    /// owning node, or the park while the shard has no owner. Never waits; what cannot
    /// be handed over is bounced (stanzas) or counted and logged (session events).
    pub fn to_owner(&self, msg: ToOwner) {
        self.to_owner_from(msg, None)
    }

    /// [`to_owner`](Self::to_owner) for work another node (`from`) passed on.
    pub fn to_owner_from(&self, msg: ToOwner, from: Option<&NodeId>) {
        let Some(user) = msg.user() else { return };
        let owner = match &self.inner.cluster {
            None => Owner::Here,
            Some(link) => link.owner_for(self.shard(&user), from),
        };
        match owner {
            Owner::Here => self.to_host(&user, msg),
            Owner::Node(node) => self.forward_to_owner(&node, msg),
            Owner::Unknown => {
                let link = self.cluster().expect("only cluster mode has no owner");
                if let Some(msg) = link.park(msg) {
                    link::give_up(self, msg, "too much work waiting for a shard owner");
                }
            }
        }
    }

    fn to_host(&self, user: &BareJid, msg: ToOwner) {
        let host = self.host_for(user);
        let refused = match msg {
            ToOwner::Route(r, hops) => host
                .try_send(r)
                .map_err(|e| ToOwner::Route(e.into_inner(), hops)),
            ToOwner::FromSession(f) => host
                .try_send(f)
                .map_err(|e| ToOwner::FromSession(e.into_inner())),
            ToOwner::Unbind(u) => host
                .try_send(u)
                .map_err(|e| ToOwner::Unbind(e.into_inner())),
            ToOwner::Gone(g) => host.try_send(g).map_err(|e| ToOwner::Gone(e.into_inner())),
            ToOwner::Bind(b) => return self.bind_here(b),
        };
        if let Err(msg) = refused {
            self.inner.metrics.mailbox_drop(Mailbox::Shard);
            link::give_up(self, msg, "server overloaded, try again");
        }
    }

    fn forward_to_owner(&self, node: &NodeId, msg: ToOwner) {
        let link = self.cluster().expect("only cluster mode has other owners");
        let msg = match msg {
            ToOwner::Bind(b) => return link.bind_remote(node, b),
            // Passed around between nodes whose views of the owner disagree (a shard
            // changing hands): it waits here for the views to settle, and starts
            // counting again, instead of being bounced.
            ToOwner::Route(r, hops) if hops >= MAX_HOPS => {
                let parked = ToOwner::Route(r, 0);
                return self.not_forwarded(link, ForwardError::UnknownPeer, [parked]);
            }
            other => other,
        };
        let frame = match &msg {
            ToOwner::Bind(_) => unreachable!("binds went out above"),
            ToOwner::Route(r, hops) => {
                if *hops > 0 {
                    self.inner.metrics.rerouted(RerouteReason::NotOwner, 1);
                }
                FrameKind::ToBare(v1::ToBareJid {
                    to: r
                        .stanza
                        .to
                        .as_ref()
                        .map(|t| t.to_bare().to_string())
                        .unwrap_or_default(),
                    stanza: Bytes::from(r.stanza.to_xml()),
                    hops: hops + 1,
                })
            }
            ToOwner::FromSession(f) => FrameKind::FromSession(v1::FromSession {
                from: f.from.to_string(),
                kind: link::to_wire_kind(f.kind).into(),
                stanza: Bytes::from(f.stanza.to_xml()),
            }),
            ToOwner::Unbind(u) => session_event(&u.jid, link.me(), u.id),
            // Session id 0: whichever session of that full JID lived on that node.
            ToOwner::Gone(g) => session_event(&g.jid, &g.node, 0),
        };
        if let Err(e) = link.forward(node, frame) {
            self.not_forwarded(link, e, [msg]);
        }
    }

    /// Work whose frame the forwarder refused: parked when the peer link is just
    /// being replaced (the view is changing), bounced otherwise.
    fn not_forwarded(
        &self,
        link: &ClusterLink,
        error: ForwardError,
        work: impl IntoIterator<Item = ToOwner>,
    ) {
        for msg in work {
            if error != ForwardError::UnknownPeer {
                link::give_up(self, msg, &forward_failure(error));
            } else if let Some(msg) = link.park(msg) {
                link::give_up(self, msg, "too much work waiting for a shard owner");
            }
        }
    }

    /// Binds a new session of this node: at the local shard host, or through the
    /// owning node; while the account's shard has no owner the bind waits in the park
    /// (and is refused with `<resource-constraint/>` if no owner appears in time).
    pub fn bind(&self, bind: Bind) {
        self.to_owner(ToOwner::Bind(bind));
    }

    /// Hands a bind to the local shard host.
    pub fn bind_here(&self, bind: Bind) {
        if let Err(e) = self.host_for(&bind.user).try_send(bind) {
            self.inner.metrics.mailbox_drop(Mailbox::Shard);
            let bind = e.into_inner();
            bind.reply.refuse(
                self,
                bind.id,
                StanzaError::new(StanzaErrorCondition::ResourceConstraint),
            );
        }
    }

    /// Answers a bind request from node `to`.
    pub fn bind_reply(
        &self,
        to: &NodeId,
        id: SessionId,
        result: Result<(FullJid, &UserShared), StanzaError>,
    ) {
        let Some(link) = self.cluster() else { return };
        let reply = match result {
            Ok((jid, shared)) => {
                let (blocklist, carbons) = shared.snapshot();
                v1::BindReply {
                    session_id: id,
                    full_jid: jid.to_string(),
                    shared: Some(v1::SharedState {
                        user: jid.to_bare().to_string(),
                        blocklist,
                        carbons: carbons as u32,
                    }),
                    ..Default::default()
                }
            }
            Err(e) => v1::BindReply {
                session_id: id,
                error: e.condition.as_str().to_owned(),
                error_text: e.text.clone().unwrap_or_default(),
                ..Default::default()
            },
        };
        if let Err(e) = link.forward(to, FrameKind::BindReply(reply)) {
            debug!(node = %to, error = %e, "bind reply not sent");
        }
    }

    /// A session's answer to a new owner's reattach request.
    pub fn attached(&self, owner: &NodeId, attached: Attached) {
        let Some(link) = self.cluster() else { return };
        if owner == link.me() {
            return self.attached_here(attached);
        }
        let facts = attached.facts.unwrap_or_default();
        let frame = FrameKind::Attached(v1::Attached {
            full_jid: attached.jid.to_string(),
            session_id: attached.id,
            present: attached.handle.is_some(),
            presence: facts
                .presence
                .map(|p| Bytes::from(p.to_xml()))
                .unwrap_or_default(),
            roster_requested: facts.roster_requested,
            blocklist_requested: facts.blocklist_requested,
            carbons: facts.carbons,
        });
        if let Err(e) = link.forward(owner, frame) {
            debug!(node = %owner, error = %e, "attach answer not sent");
        }
    }

    pub fn attached_here(&self, attached: Attached) {
        let user = attached.jid.to_bare();
        if self.host_for(&user).try_send(attached).is_err() {
            self.inner.metrics.mailbox_drop(Mailbox::Shard);
        }
    }

    /// Asks node `node` to report its session `jid`/`id` to this node, the new owner.
    pub fn request_attach(&self, node: &NodeId, jid: FullJid, id: SessionId) {
        let Some(link) = self.cluster() else { return };
        if node == link.me() {
            return link.request_attach(node, jid, id, self);
        }
        let frame = FrameKind::Reattach(v1::Reattach {
            full_jid: jid.to_string(),
            session_id: id,
        });
        // Unreachable for now (the view is changing): the session reports itself
        // when its node asks for this node's sessions, or counts as gone when the
        // owner stops waiting.
        if let Err(e) = link.forward(node, frame) {
            debug!(%node, error = %e, "reattach request not sent");
        }
    }

    /// Writes serialised `xml` to a session, local or on another node.
    pub fn send_to_session(
        &self,
        session: &SessionHandle,
        xml: &Bytes,
        kind: Kind,
        since: Instant,
    ) -> Result<(), SendFail> {
        match session {
            SessionHandle::Local(addr) => {
                let msg = Deliver {
                    xml: xml.clone(),
                    kind,
                    since,
                };
                addr.try_send(msg).map_err(|e| match e {
                    actix::prelude::SendError::Full(_) => SendFail::Full,
                    actix::prelude::SendError::Closed(_) => SendFail::Gone,
                })
            }
            SessionHandle::Remote { node, jid, id } => {
                let link = self
                    .cluster()
                    .expect("remote sessions only in cluster mode");
                let frame = FrameKind::ToFull(v1::ToFullJid {
                    to: jid.to_string(),
                    stanza: xml.clone(),
                    session_id: *id,
                });
                link.forward(node, frame).map_err(|e| match e {
                    ForwardError::QueueFull => SendFail::Full,
                    ForwardError::UnknownPeer | ForwardError::Closed => SendFail::Gone,
                })
            }
        }
    }

    /// Closes a session with a stream error, local or on another node.
    pub fn close_session(&self, session: &SessionHandle, condition: StreamErrorCondition) {
        match session {
            // A full mailbox means the session is already being dropped as a slow
            // consumer; the close is then not needed.
            SessionHandle::Local(addr) => {
                let _ = addr.try_send(Close(condition.into()));
            }
            SessionHandle::Remote { node, jid, id } => {
                let link = self
                    .cluster()
                    .expect("remote sessions only in cluster mode");
                let frame = FrameKind::CloseSession(v1::CloseSession {
                    full_jid: jid.to_string(),
                    session_id: *id,
                    condition: condition.as_str().to_owned(),
                });
                let _ = link.forward(node, frame);
            }
        }
    }

    /// Sends the owner's copy of what sessions read to every node with a session of
    /// `user` (this node's sessions included: one may hold a previous owner's copy).
    pub fn shared_changed<'a>(
        &self,
        user: &BareJid,
        shared: &UserShared,
        sessions: impl Iterator<Item = &'a SessionHandle>,
    ) {
        let Some(link) = self.cluster() else { return };
        let (blocklist, carbons) = shared.snapshot();
        let mut nodes: Vec<&NodeId> = Vec::new();
        for s in sessions {
            let node = match s {
                SessionHandle::Local(_) => link.me(),
                SessionHandle::Remote { node, .. } => node,
            };
            if !nodes.contains(&node) {
                nodes.push(node);
            }
        }
        for node in nodes {
            if node == link.me() {
                link.update_shared(user, &blocklist, carbons);
                continue;
            }
            let frame = FrameKind::SharedState(v1::SharedState {
                user: user.to_string(),
                blocklist: blocklist.clone(),
                carbons: carbons as u32,
            });
            let _ = link.forward(node, frame);
        }
    }

    /// Work parked waiting for a shard owner (always 0 outside cluster mode).
    pub fn parked(&self) -> usize {
        self.cluster().map_or(0, |l| l.parked())
    }

    /// Routes parked work whose shard has an owner again.
    pub fn retry_parked(&self) {
        if let Some(link) = self.cluster() {
            link::retry_parked(self, link);
        }
    }

    /// Records a session started on this node (cluster mode: owners reach it by id).
    pub fn session_started(
        &self,
        jid: &FullJid,
        id: SessionId,
        addr: Addr<crate::c2s::session::Session>,
        shared: Arc<UserShared>,
    ) {
        if let Some(link) = self.cluster() {
            link.session_started(jid, id, addr, shared);
        }
    }

    pub fn session_ended(&self, jid: &FullJid, id: SessionId) {
        if let Some(link) = self.cluster() {
            link.session_ended(jid, id);
        }
    }

    /// Whether `jid` is served here (the domain, an account on it, the MUC service or
    /// one of its rooms).
    pub fn is_local(&self, jid: &Jid) -> bool {
        jid.domain() == self.inner.domain.domain() || self.is_muc(jid)
    }

    /// Whether `jid` is the MUC service or an address in it.
    pub fn is_muc(&self, jid: &Jid) -> bool {
        self.inner
            .muc
            .as_ref()
            .is_some_and(|m| jid.domain() == m.domain.domain())
    }

    /// Routes a stanza whose `from` is already trustworthy. `since` is when it entered
    /// the server, for the latency histogram.
    pub fn route(&self, stanza: Stanza, since: Instant) {
        self.route_from(stanza, since, None);
    }

    /// Routes a stanza a session of this node sent, which comes from `home`.
    pub fn route_from_session(&self, stanza: Stanza, since: Instant, home: Home) {
        self.route_from(stanza, since, Some(home));
    }

    fn route_from(&self, stanza: Stanza, since: Instant, origin: Option<Home>) {
        let kind = stanza_kind(stanza.kind);
        let route = |route| self.inner.metrics.routed(kind, route);
        let Some(to) = stanza.to.clone() else {
            // Stanzas without 'to' are resolved by the session before routing; one
            // reaching here is addressed to the server.
            route(Route::Server);
            return self.to_server(stanza, since);
        };
        if !self.is_local(&to) {
            route(Route::Remote);
            if let Some(s2s) = self.inner.s2s.get() {
                return s2s.send(self, stanza, since);
            }
            // Federation is off: other domains are unreachable, which RFC 6120 §10.4
            // says to report this way.
            debug!(to = %to, "no route to remote domain");
            return self.bounce(
                &stanza,
                StanzaError::new(StanzaErrorCondition::RemoteServerNotFound),
                since,
            );
        }
        if to.node().is_none() {
            route(Route::Server);
            if let Some(muc) = self.inner.muc.as_ref().filter(|_| self.is_muc(&to)) {
                if muc::is_room_listing(&stanza) {
                    let (rooms, router) = (muc.rooms.clone(), self.clone());
                    tokio::spawn(async move {
                        let reply = match rooms.rooms().await {
                            Ok(rooms) => muc::list_rooms(&stanza, &rooms),
                            Err(e) => {
                                warn!(error = %e, "reading the room directory failed");
                                let error =
                                    StanzaError::new(StanzaErrorCondition::InternalServerError);
                                match stanza.error_reply(&error) {
                                    Some(reply) => reply,
                                    None => return,
                                }
                            }
                        };
                        router.route_reply(reply, since);
                    });
                } else if let Some(reply) = muc::service_iq(&stanza) {
                    self.route_reply(reply, since);
                }
                return;
            }
            return self.to_server(stanza, since);
        }
        route(match self.is_muc(&to) {
            true => Route::Room,
            false => Route::Account,
        });
        self.to_owner(ToOwner::Route(
            RouteToUser {
                stanza,
                since,
                origin,
            },
            0,
        ));
    }

    /// Routes copies of one presence broadcast (equal but for `to`, each to a local
    /// account): each node owning some of the recipients gets the stanza once with
    /// the list of recipients (DESIGN.md "presence fan-out"); recipients owned here or
    /// by no node right now are routed one by one.
    pub fn route_fanout(&self, stanzas: Vec<Stanza>, since: Instant) {
        let Some(link) = self.cluster() else {
            for stanza in stanzas {
                self.route(stanza, since);
            }
            return;
        };
        let mut by_node: Vec<(NodeId, Vec<Stanza>)> = Vec::new();
        for stanza in stanzas {
            let remote = match stanza.to.as_ref() {
                Some(to) if self.is_local(to) && to.node().is_some() => {
                    match link.owner_for(self.shard(&to.to_bare()), None) {
                        Owner::Node(node) => Some(node),
                        _ => None,
                    }
                }
                _ => None,
            };
            match remote {
                Some(node) => match by_node.iter_mut().find(|(n, _)| *n == node) {
                    Some((_, group)) => group.push(stanza),
                    None => by_node.push((node, vec![stanza])),
                },
                None => self.route(stanza, since),
            }
        }
        for (node, group) in by_node {
            if group.len() == 1 {
                for stanza in group {
                    self.route(stanza, since);
                }
                continue;
            }
            let recipients = group
                .iter()
                .filter_map(|s| s.to.as_ref().map(ToString::to_string))
                .collect();
            debug!(%node, recipients = group.len(), "presence fan-out");
            let mut template = group[0].clone();
            template.to = None;
            let frame = FrameKind::PresenceFanout(v1::PresenceFanout {
                stanza: Bytes::from(template.to_xml()),
                recipients,
            });
            if let Err(e) = link.forward(&node, frame) {
                let work = group.into_iter().map(|stanza| {
                    let origin = None;
                    ToOwner::Route(
                        RouteToUser {
                            stanza,
                            since,
                            origin,
                        },
                        0,
                    )
                });
                self.not_forwarded(link, e, work);
            }
        }
    }

    /// Routes what a room sent, each copy with where its recipient's session is when
    /// the room knows it: copies for sessions here are handed to them at once, each
    /// other node gets one `RoomBroadcast` frame per run of copies equal but for `to`
    /// (the stanza once, with its recipients), and the rest go the usual way, through
    /// the recipients' accounts.
    pub fn route_room(&self, room: &BareJid, copies: Vec<(Stanza, Option<Home>)>, since: Instant) {
        // Copies by path, counted once per broadcast rather than once per copy.
        let mut counted = [0usize; 3];
        let link = self.cluster();
        let mut xml = Copies::default();
        // Per node, runs of equal copies in the room's order.
        let mut runs: Vec<(NodeId, Vec<Vec<Stanza>>)> = Vec::new();
        for (stanza, home) in copies {
            match home {
                Some(Home::Here(addr, shared)) => {
                    counted[MucPath::Here as usize] += 1;
                    let bytes = xml.of(&stanza);
                    self.hand_to(&addr, &shared, stanza, bytes, since);
                }
                Some(Home::Node(node)) if link.is_some() => {
                    counted[MucPath::Node as usize] += 1;
                    let i = match runs.iter().position(|(n, _)| *n == node) {
                        Some(i) => i,
                        None => {
                            runs.push((node, Vec::new()));
                            runs.len() - 1
                        }
                    };
                    let node_runs = &mut runs[i].1;
                    match node_runs.last_mut() {
                        Some(run) if same_but_to(&run[0], &stanza) => run.push(stanza),
                        _ => node_runs.push(vec![stanza]),
                    }
                }
                _ => {
                    counted[MucPath::Account as usize] += 1;
                    self.route(stanza, since);
                }
            }
        }
        for path in MucPath::ALL {
            self.inner
                .metrics
                .muc_copies(*path, counted[*path as usize]);
        }
        let Some(link) = link else { return };
        for (node, node_runs) in runs {
            for run in node_runs {
                let recipients = run
                    .iter()
                    .filter_map(|s| s.to.as_ref().map(ToString::to_string))
                    .collect();
                let mut template = run[0].clone();
                template.to = None;
                let frame = FrameKind::RoomBroadcast(v1::RoomBroadcast {
                    room: room.to_string(),
                    stanza: Bytes::from(template.to_xml()),
                    recipients,
                });
                if link.forward(&node, frame).is_err() {
                    // Not to that node now: the usual way, which parks or bounces.
                    for stanza in run {
                        self.route(stanza, since);
                    }
                }
            }
        }
    }

    /// A room's broadcast from another node: `template` (without `to`) for each of
    /// `recipients`, sessions of this node as far as that node knew.
    pub fn deliver_room_broadcast(&self, template: &Stanza, recipients: &[String], since: Instant) {
        let Some(link) = self.cluster() else { return };
        let mut xml = Copies::default();
        for to in recipients.iter().filter_map(|r| r.parse::<FullJid>().ok()) {
            let session = link.local_session_of(&to);
            let mut stanza = template.clone();
            stanza.to = Some(Jid::from(to));
            match session {
                Some((addr, shared)) => {
                    let bytes = xml.of(&stanza);
                    self.hand_to(&addr, &shared, stanza, bytes, since);
                }
                // Gone from here: its account's owner knows where it is now, if anywhere.
                None => self.route(stanza, since),
            }
        }
    }

    /// Hands a room's copy (`xml`) to a session of this node, unless it blocks the
    /// room or is gone or full (then its account's owner applies the rules).
    fn hand_to(
        &self,
        session: &Addr<Session>,
        shared: &UserShared,
        stanza: Stanza,
        xml: Bytes,
        since: Instant,
    ) {
        let blocked = stanza.from.as_ref().is_some_and(|f| shared.is_blocked(f));
        let handed = !blocked
            && session
                .try_send(Deliver {
                    kind: stanza.kind,
                    xml,
                    since,
                })
                .is_ok();
        if !handed {
            self.route(stanza, since);
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

fn session_event(jid: &FullJid, node: &NodeId, id: SessionId) -> FrameKind {
    FrameKind::SessionEvent(v1::SessionEvent {
        kind: v1::session_event::Kind::Unbound.into(),
        full_jid: jid.to_string(),
        node: node.to_string(),
        session_id: id,
    })
}

fn forward_failure(e: ForwardError) -> String {
    format!("cannot reach the account's node: {e}")
}

/// Where a bind's answer goes: a waiting connection here, or the node that asked.
impl BindReplyTo {
    pub fn refuse(self, router: &Router, id: SessionId, error: StanzaError) {
        match self {
            BindReplyTo::Local(tx) => {
                let _ = tx.send(Err(error));
            }
            BindReplyTo::Node(node) => router.bind_reply(&node, id, Err(error)),
        }
    }
}

/// Serialises copies of one stanza that differ only in `to`: the rest once per run,
/// the `to` attribute spliced in per copy (it is the first attribute written).
#[derive(Default)]
struct Copies {
    template: Option<(Stanza, String)>,
}

impl Copies {
    fn of(&mut self, stanza: &Stanza) -> Bytes {
        let (_, xml) = match &mut self.template {
            Some(t) if same_but_to(&t.0, stanza) => t,
            slot => {
                let mut template = stanza.clone();
                template.to = None;
                let xml = template.to_xml();
                slot.insert((template, xml))
            }
        };
        let Some(to) = &stanza.to else {
            return Bytes::from(xml.clone());
        };
        // After the element's name: `<message` then attributes, `>` or `/>`.
        let at = xml[1..].find([' ', '>', '/']).map_or(xml.len(), |i| i + 1);
        let mut out = String::with_capacity(xml.len() + to.as_str().len() + 6);
        out.push_str(&xml[..at]);
        out.push_str(" to='");
        shoal_xmpp::xml::escape_into(&mut out, to.as_str());
        out.push('\'');
        out.push_str(&xml[at..]);
        Bytes::from(out)
    }
}

impl std::fmt::Debug for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Home::Here(..) => f.write_str("Here"),
            Home::Node(node) => write!(f, "Node({node})"),
        }
    }
}

/// Whether two stanzas are copies of one broadcast: everything but `to` equal.
pub(crate) fn same_but_to(a: &Stanza, b: &Stanza) -> bool {
    a.kind == b.kind
        && a.from == b.from
        && a.id == b.id
        && a.payload == b.payload
        && a.extra_attrs == b.extra_attrs
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

    /// The `to` spliced into a run's template gives what serialising the copy gives.
    #[test]
    fn copies_splice_to_as_serialising_would() {
        let mut copies = Copies::default();
        let mut message = Stanza::new(Kind::Message(shoal_xmpp::stanza::MessageType::Groupchat));
        message.from = Some("coven@conference.localhost/first".parse().unwrap());
        message.id = Some("m1".into());
        message.payload = Bytes::from_static(b"<body>Hi &amp; bye</body>");
        let mut presence = Stanza::new(Kind::Presence(shoal_xmpp::stanza::PresenceType::Available));
        presence.from = Some("coven@conference.localhost/first".parse().unwrap());
        for to in ["a@localhost/x", "b@localhost/it's <me>", "c@localhost"] {
            for stanza in [&message, &presence] {
                let mut copy = stanza.clone();
                copy.to = Some(to.parse().unwrap());
                assert_eq!(copies.of(&copy), Bytes::from(copy.to_xml()), "{to}");
            }
        }
    }
}
