//! Established sessions at run time: one reader task per session that accounts for
//! every probe it receives (in a chat or groupchat message's body or a presence
//! update's status), answers server pings, roster pushes and the subscription requests
//! it was told to approve, and hands the controller the answers to its own iqs and MUC
//! joins; and open-loop sender tasks that write a [`Schedule`] of probe stanzas.
//!
//! The reader owns the read half and its per-phase bookkeeping; the controller asks it
//! for a phase's results over a channel, so no lock is taken per message. The write half
//! is shared behind an async mutex by the sender of the current phase and the reader's
//! answers (both rare contenders on one session).
//!
//! With `--reconnect`, a session outlives its connections: when the server ends the
//! stream (`<system-shutdown/>`, `<see-other-host/>`, any other close) or the
//! connection drops, the reader answers the server's close with its own (RFC 6120
//! §4.4: the server then knows it has everything the client sent), logs in again (at
//! the host `<see-other-host/>` names, else at the next endpoint, with backoff, a
//! bounded number of times) and goes on counting into the same phase, so a message
//! delivered late, from offline storage with an XEP-0203 delay, counts as delivered
//! and a second copy as a duplicate. Senders wait while the reader reconnects; what
//! they had written stays written, nothing is sent twice.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use shoal_xmpp::framer::{Frame, Framer};
use shoal_xmpp::ns;
use shoal_xmpp::stanza::{
    IqType, Kind, MessageType, PresenceType, Stanza, TopLevel, parse_top_level,
};
use shoal_xmpp::xml::{Element, NsContext, escape};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conn::{Connector, Established, Io};
use crate::muc::{self, JoinAnswer};
use crate::roster;
use crate::schedule::{Arrival, FlowTracker, Probe, Schedule, latency};
use crate::stats::{Failures, Latency, Timeline};

/// Run-wide counters, for the progress line and for early completion checks.
#[derive(Debug, Default)]
pub struct Counters {
    pub logins_started: AtomicU64,
    pub logins_ok: AtomicU64,
    pub logins_failed: AtomicU64,
    pub sessions_open: AtomicU64,
    pub disconnected: AtomicU64,
    pub sent: AtomicU64,
    /// Distinct probe messages received in their own phase (not counting echoes).
    pub received: AtomicU64,
    /// Distinct groupchat probes a room sent back to their own sender, in their phase.
    pub echoes: AtomicU64,
    pub duplicated: AtomicU64,
    /// Probe messages that arrived after their phase had been collected.
    pub late: AtomicU64,
    /// Available presence without a probe from someone else: the initial presence
    /// fan-out (a contact's broadcast or the answer to the server's probe).
    pub presence_plain: AtomicU64,
    /// Subscription requests the readers approved.
    pub approved: AtomicU64,
    /// Available presence from MUC rooms (occupants entering, mostly during joins).
    pub room_presence: AtomicU64,
    /// Probes in writes that failed (the connection broke under them): counted as sent,
    /// since the server may have read them.
    pub write_failed: AtomicU64,
    /// Probe messages the server sent back to their sender as errors (undeliverable).
    pub bounced: AtomicU64,
    /// Sessions logged in again after their connection ended (`--reconnect`).
    pub reconnects: AtomicU64,
    /// Sessions that gave up reconnecting after `--reconnect-attempts` logins failed.
    pub reconnects_given_up: AtomicU64,
    /// How the server ended sessions: `system-shutdown`, `see-other-host`,
    /// `stream-error:CONDITION`, `closed` (a close without error) or `dropped` (the
    /// connection ended without a close).
    pub ends: parking_lot::Mutex<Failures>,
}

/// What the readers of a run share: the time origin probe timestamps are relative to,
/// the counters, the per-second latency series when one is kept, and how to reconnect
/// when `--reconnect` asks for it.
#[derive(Clone)]
pub struct RunContext {
    pub epoch: Instant,
    pub counters: Arc<Counters>,
    pub timeline: Option<Arc<Timeline>>,
    pub reconnect: Option<Reconnect>,
}

/// How a session whose connection ended logs in again.
#[derive(Clone)]
pub struct Reconnect {
    pub connector: Arc<Connector>,
    /// Logins tried before giving up.
    pub attempts: u32,
    /// Whether a `<see-other-host/>` outside loopback may be followed.
    pub allow_remote: bool,
}

impl Reconnect {
    /// The wait before login `attempt` (0 is at once): 50 ms doubling up to 2 s, plus a
    /// few milliseconds that depend on the client, so that the sessions of a node that
    /// goes away do not all come back in the same instant.
    fn backoff(attempt: u32, index: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let base = Duration::from_millis(50 << (attempt - 1).min(6)).min(Duration::from_secs(2));
        base + Duration::from_millis(u64::from(index % 20) * 5)
    }

    /// Where login `attempt` goes: the host `<see-other-host/>` named first when there
    /// is one, then the endpoints in turn from the one after `current`.
    fn target(&self, current: SocketAddr, named: Option<SocketAddr>, attempt: u32) -> SocketAddr {
        let servers = &self.connector.config().servers;
        let attempt = match named {
            Some(addr) if attempt == 0 => return addr,
            Some(_) => attempt - 1,
            None => attempt,
        } as usize;
        let at = servers.iter().position(|s| *s == current).unwrap_or(0);
        servers[(at + 1 + attempt) % servers.len()]
    }
}

/// The stanza a probe travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// The body of a chat message to one contact.
    Chat,
    /// The status of a presence update, broadcast by the server to every contact.
    Presence,
    /// The body of a groupchat message to a MUC room, which sends it to every
    /// occupant, its sender included (that copy is the sender's *echo*).
    Groupchat,
}

/// What one receiver saw of one carrier's probes in one phase.
#[derive(Debug, Default)]
pub struct Received {
    /// One tracker per sender (client index) that reached this receiver.
    pub flows: Vec<(u32, FlowTracker)>,
    pub latency: Latency,
    /// Distinct probes that came with an XEP-0203 delay (from offline storage).
    pub delayed: u64,
}

/// What one receiver saw in one phase.
#[derive(Debug, Default)]
pub struct PhaseReceived {
    pub chat: Received,
    pub presence: Received,
    /// Groupchat messages from the other occupants.
    pub groupchat: Received,
    /// The receiver's own groupchat messages, sent back by the room.
    pub echo: Received,
}

impl PhaseReceived {
    pub fn of(&self, carrier: Carrier) -> &Received {
        match carrier {
            Carrier::Chat => &self.chat,
            Carrier::Presence => &self.presence,
            Carrier::Groupchat => &self.groupchat,
        }
    }

    fn of_mut(&mut self, carrier: Carrier) -> &mut Received {
        match carrier {
            Carrier::Chat => &mut self.chat,
            Carrier::Presence => &mut self.presence,
            Carrier::Groupchat => &mut self.groupchat,
        }
    }
}

impl Received {
    fn flow(&mut self, sender: u32) -> &mut FlowTracker {
        let i = match self.flows.iter().position(|(s, _)| *s == sender) {
            Some(i) => i,
            None => {
                self.flows.push((sender, FlowTracker::default()));
                self.flows.len() - 1
            }
        };
        &mut self.flows[i].1
    }
}

/// What the controller asks of a reader.
enum Control {
    /// Hand over `phase`'s results and move on to the next phase.
    Collect {
        phase: u32,
        reply: oneshot::Sender<PhaseReceived>,
    },
    /// Send the iq `xml` whose id is `id` and hand back the answer.
    Iq {
        id: String,
        xml: String,
        reply: oneshot::Sender<Stanza>,
    },
    /// Send the join presence `xml` for the room `room` (bare JID) and hand back how
    /// the room answered.
    Join {
        room: String,
        xml: String,
        reply: oneshot::Sender<JoinAnswer>,
    },
}

/// The write half of a session's current connection, shared by the phase's sender and
/// the reader's answers; none while the reader reconnects or once the session is over.
pub struct Link {
    half: Mutex<Option<WriteHalf<Box<dyn Io>>>>,
    state: watch::Sender<LinkState>,
    /// Connections made so far.
    connections: std::sync::atomic::AtomicU32,
}

/// Where a session's connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    /// Connection number `n` (from 0) is up.
    Up(u32),
    /// The reader is logging in again.
    Down,
    /// No connection will come any more.
    Gone,
}

type Writer = Arc<Link>;

impl Link {
    fn new(half: WriteHalf<Box<dyn Io>>) -> Writer {
        Arc::new(Link {
            half: Mutex::new(Some(half)),
            state: watch::Sender::new(LinkState::Up(0)),
            connections: 1.into(),
        })
    }

    /// Takes the write half away (the connection ended): senders wait from now on.
    async fn take(&self) -> Option<WriteHalf<Box<dyn Io>>> {
        let mut half = self.half.lock().await;
        self.state.send_replace(LinkState::Down);
        half.take()
    }

    /// Installs the write half of a new connection.
    async fn put(&self, new: WriteHalf<Box<dyn Io>>) {
        let mut half = self.half.lock().await;
        *half = Some(new);
        let n = self.connections.fetch_add(1, Ordering::Relaxed);
        self.state.send_replace(LinkState::Up(n));
    }

    /// Ends the session for its senders.
    async fn end(&self) {
        let mut half = self.half.lock().await;
        half.take();
        self.state.send_replace(LinkState::Gone);
    }

    /// Waits until a connection other than `not` is up; `false` when none will be.
    async fn wait_up(&self, not: Option<u32>) -> bool {
        let mut rx = self.state.subscribe();
        let usable = |s: &LinkState| match *s {
            LinkState::Up(n) => Some(n) != not,
            LinkState::Down => false,
            LinkState::Gone => true,
        };
        match rx.wait_for(usable).await {
            Ok(s) => *s != LinkState::Gone,
            Err(_) => false,
        }
    }

    fn connection(&self) -> Option<u32> {
        match *self.state.borrow() {
            LinkState::Up(n) => Some(n),
            _ => None,
        }
    }
}

/// A running session.
pub struct Live {
    pub index: usize,
    pub jid: String,
    writer: Writer,
    control: mpsc::Sender<Control>,
    reader: JoinHandle<()>,
}

impl Live {
    /// Starts the reader task. Subscription requests from the bare JIDs in `approve`
    /// are approved; any other is left unanswered.
    pub fn start(est: Established, ctx: &RunContext, approve: Vec<String>) -> Live {
        let (read, write) = tokio::io::split(est.io);
        let writer = Link::new(write);
        // One outstanding request at a time is all the controller ever makes.
        let (control, requests) = mpsc::channel(1);
        let own_bare = est
            .jid
            .split_once('/')
            .map_or(&*est.jid, |(b, _)| b)
            .to_owned();
        let reader = tokio::spawn(read_loop(
            Reader {
                read,
                server: est.server,
                framer: est.framer,
                buf: est.buf,
                writer: writer.clone(),
                index: est.index as u32,
                own_bare,
                approve,
                pending: HashMap::new(),
                joining: HashMap::new(),
                samples: Vec::new(),
                ctx: ctx.clone(),
            },
            requests,
        ));
        Live {
            index: est.index,
            jid: est.jid,
            writer,
            control,
            reader,
        }
    }

    /// Hands over what the reader recorded for `phase` and moves it to the next phase;
    /// empty if the reader is gone.
    pub async fn collect(&self, phase: u32) -> PhaseReceived {
        let (reply, answer) = oneshot::channel();
        if self
            .control
            .send(Control::Collect { phase, reply })
            .await
            .is_err()
        {
            return PhaseReceived::default();
        }
        answer.await.unwrap_or_default()
    }

    /// Sends the iq `xml` (whose id is `id`); its answer will come on the receiver.
    /// `None` when the session is gone. Many sessions can be asked before any answer is
    /// awaited.
    pub async fn ask(&self, id: &str, xml: String) -> Option<oneshot::Receiver<Stanza>> {
        let id = id.to_owned();
        self.request(|reply| Control::Iq { id, xml, reply }).await
    }

    /// Joins the MUC room `room` (bare JID) as `nick`; the room's answer will come on
    /// the receiver. `None` when the session is gone.
    pub async fn join(&self, room: &str, nick: &str) -> Option<oneshot::Receiver<JoinAnswer>> {
        let xml = muc::join(room, nick);
        let room = room.to_owned();
        self.request(|reply| Control::Join { room, xml, reply })
            .await
    }

    /// Hands the reader the request `make` builds around the reply channel.
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Control,
    ) -> Option<oneshot::Receiver<T>> {
        let (reply, answer) = oneshot::channel();
        self.control.send(make(reply)).await.ok()?;
        Some(answer)
    }

    pub async fn send(&self, data: &[u8]) -> std::io::Result<()> {
        write(&self.writer, data).await
    }

    /// A clone of the write half, for a sender task.
    pub fn writer(&self) -> Writer {
        self.writer.clone()
    }

    /// Stops the reader, then closes the stream politely. The reader goes first so the
    /// server's answering close is not counted as a disconnection; one still logging
    /// in again is stopped.
    pub async fn close(self) {
        drop(self.control);
        let reader = self.reader.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), self.reader)
            .await
            .is_err()
        {
            reader.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            if let Some(mut w) = self.writer.take().await {
                let _ = w.write_all(b"</stream:stream>").await;
                let _ = w.shutdown().await;
            }
        })
        .await;
        self.writer.end().await;
    }
}

/// Writes to the session's current connection; `NotConnected` while there is none.
async fn write(writer: &Writer, data: &[u8]) -> io::Result<()> {
    let mut half = writer.half.lock().await;
    let w = half.as_mut().ok_or(io::ErrorKind::NotConnected)?;
    w.write_all(data).await?;
    w.flush().await
}

/// Latency samples a reader gathers before handing them to the timeline in one lock.
const TIMELINE_BATCH: usize = 512;

struct Reader {
    read: ReadHalf<Box<dyn Io>>,
    /// The endpoint of the current connection.
    server: SocketAddr,
    framer: Framer,
    buf: BytesMut,
    writer: Writer,
    /// This client's index: its own presence updates echoed back are not deliveries.
    index: u32,
    own_bare: String,
    approve: Vec<String>,
    /// The controller's iqs awaiting an answer, by id.
    pending: HashMap<String, oneshot::Sender<Stanza>>,
    /// The controller's MUC joins awaiting the room's answer, by room bare JID.
    joining: HashMap<String, oneshot::Sender<JoinAnswer>>,
    /// (arrival second, latency) not yet handed to the timeline.
    samples: Vec<(u64, Duration)>,
    ctx: RunContext,
}

async fn read_loop(mut r: Reader, mut requests: mpsc::Receiver<Control>) {
    let mut phase = 0u32;
    let mut current = PhaseReceived::default();
    let mut open = true;
    let counters = r.ctx.counters.clone();
    counters.sessions_open.fetch_add(1, Ordering::Relaxed);
    loop {
        while open {
            let ending = match r.framer.next_frame(&mut r.buf) {
                Ok(Some(frame)) => r.on_frame(frame, phase, &mut current).await,
                Ok(None) => break,
                Err(_) => Some(Ending::dropped("framing")),
            };
            if let Some(ending) = ending {
                open = r.ended(ending).await;
            }
        }
        r.buf.reserve(8192);
        tokio::select! {
            request = requests.recv() => match request {
                Some(Control::Collect { phase: p, reply }) => {
                    r.flush_samples();
                    let done = if p == phase { std::mem::take(&mut current) } else { PhaseReceived::default() };
                    phase = p + 1;
                    let _ = reply.send(done);
                }
                Some(Control::Iq { id, xml, reply }) => {
                    // Registered before it is sent, so the answer cannot overtake it.
                    r.pending.insert(id, reply);
                    if write(&r.writer, xml.as_bytes()).await.is_err() {
                        r.pending.clear();
                    }
                }
                Some(Control::Join { room, xml, reply }) => {
                    r.joining.insert(room, reply);
                    if write(&r.writer, xml.as_bytes()).await.is_err() {
                        r.joining.clear();
                    }
                }
                None => break,
            },
            n = r.read.read_buf(&mut r.buf), if open => {
                if !matches!(n, Ok(n) if n > 0) {
                    open = r.ended(Ending::dropped("dropped")).await;
                }
            }
        }
    }
    r.flush_samples();
    if open {
        counters.sessions_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a connection ended.
#[derive(Debug)]
struct Ending {
    /// The key it is counted by in [`Counters::ends`].
    reason: String,
    /// The server closed its stream (a close, a stream error): ours answers it.
    closed: bool,
    /// Where `<see-other-host/>` sends the client.
    other_host: Option<String>,
}

impl Ending {
    /// The connection ended without a close from the server.
    fn dropped(reason: &str) -> Self {
        Ending {
            reason: reason.into(),
            closed: false,
            other_host: None,
        }
    }

    /// The server closed the stream, with `error` when it sent one.
    fn closed(error: Option<&Element>) -> Self {
        let condition = error.and_then(|e| {
            e.elements()
                .find(|c| c.ns == ns::STREAM_ERRORS && c.name != "text")
        });
        let reason = match condition {
            None => "closed".to_owned(),
            Some(c) if c.name == "system-shutdown" || c.name == "see-other-host" => c.name.clone(),
            Some(c) => format!("stream-error:{}", c.name),
        };
        Ending {
            reason,
            closed: true,
            other_host: condition
                .filter(|c| c.name == "see-other-host")
                .map(|c| c.text_content().trim().to_owned())
                .filter(|h| !h.is_empty()),
        }
    }
}

/// The address `<see-other-host/>` names (RFC 6120 §4.9.3.19: a host name or IP
/// address, IPv6 in brackets, with an optional port, 5222 by default), when it
/// resolves within a second and is on loopback or `allow_remote` lets it be elsewhere.
async fn other_host(named: &str, allow_remote: bool) -> Option<SocketAddr> {
    let addr = match named.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, 5222),
        Err(_) => {
            let lookup = async {
                match tokio::net::lookup_host(named).await {
                    Ok(mut found) => found.next(),
                    // No port given.
                    Err(_) => tokio::net::lookup_host((named, 5222)).await.ok()?.next(),
                }
            };
            tokio::time::timeout(Duration::from_secs(1), lookup)
                .await
                .ok()??
        }
    };
    (allow_remote || addr.ip().is_loopback()).then_some(addr)
}

impl Reader {
    /// Counts the end of the connection, answers the server's close, and with
    /// `--reconnect` logs in again; `true` when a new connection is up.
    async fn ended(&mut self, ending: Ending) -> bool {
        let counters = self.ctx.counters.clone();
        counters.sessions_open.fetch_sub(1, Ordering::Relaxed);
        counters.disconnected.fetch_add(1, Ordering::Relaxed);
        counters.ends.lock().add(ending.reason.clone());
        let old = self.writer.take().await;
        if let (Some(mut w), true) = (old, ending.closed) {
            // RFC 6120 §4.4: the server reads until our close, so everything written
            // before it reaches the server.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                w.write_all(b"</stream:stream>").await?;
                w.shutdown().await
            })
            .await;
        }
        // Answers to requests sent on the old connection will not come.
        self.pending.clear();
        self.joining.clear();
        let Some(policy) = self.ctx.reconnect.clone() else {
            self.writer.end().await;
            return false;
        };
        let named = match &ending.other_host {
            Some(host) => other_host(host, policy.allow_remote).await,
            None => None,
        };
        let index = self.index as usize;
        for attempt in 0..policy.attempts {
            tokio::time::sleep(Reconnect::backoff(attempt, self.index)).await;
            let server = policy.target(self.server, named, attempt);
            if let Ok(est) = policy.connector.login_via(index, server).await {
                let (read, write) = tokio::io::split(est.io);
                (self.read, self.server) = (read, est.server);
                (self.framer, self.buf) = (est.framer, est.buf);
                self.writer.put(write).await;
                counters.reconnects.fetch_add(1, Ordering::Relaxed);
                counters.sessions_open.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        counters.reconnects_given_up.fetch_add(1, Ordering::Relaxed);
        self.writer.end().await;
        false
    }

    /// Handles one frame; how the connection ended when it did.
    async fn on_frame(
        &mut self,
        frame: Frame,
        phase: u32,
        current: &mut PhaseReceived,
    ) -> Option<Ending> {
        let bytes = match frame {
            Frame::Element(b) => b,
            Frame::Whitespace | Frame::StreamOpen(_) => return None,
            Frame::StreamClose => return Some(Ending::closed(None)),
        };
        let Ok(top) = parse_top_level(&bytes, NsContext::CLIENT) else {
            return None; // a stanza the strict parser refuses is not one of ours
        };
        let stanza = match top {
            TopLevel::Stanza(s) => s,
            TopLevel::Nonza(e) if e.is("error", ns::STREAM) => {
                return Some(Ending::closed(Some(&e)));
            }
            TopLevel::Nonza(_) => return None,
        };
        if matches!(stanza.kind, Kind::Presence(_)) && self.on_room_presence(&stanza) {
            return None;
        }
        match stanza.kind {
            Kind::Message(t) if t != MessageType::Error => {
                if let Some(probe) = child_text(&stanza.payload, b"body").and_then(Probe::decode) {
                    let carrier = match t {
                        MessageType::Groupchat => Carrier::Groupchat,
                        _ => Carrier::Chat,
                    };
                    // XEP-0203: the server kept it (offline storage) before delivering.
                    let delayed = find(&stanza.payload, ns::DELAY.as_bytes()).is_some();
                    self.on_probe(carrier, probe, delayed, phase, current);
                }
            }
            // A probe the server refused comes back to its sender as an error.
            Kind::Message(MessageType::Error)
                if child_text(&stanza.payload, b"body")
                    .and_then(Probe::decode)
                    .is_some() =>
            {
                (self.ctx.counters.bounced).fetch_add(1, Ordering::Relaxed);
            }
            Kind::Presence(PresenceType::Available) => {
                match child_text(&stanza.payload, b"status").and_then(Probe::decode) {
                    // The server echoes our own updates back to us (RFC 6121 §4.4.2).
                    Some(probe) if probe.sender != self.index => {
                        self.on_probe(Carrier::Presence, probe, false, phase, current);
                    }
                    Some(_) => {}
                    None => {
                        let from_self = stanza
                            .from
                            .as_ref()
                            .is_some_and(|j| j.to_bare().as_str() == self.own_bare);
                        if !from_self {
                            (self.ctx.counters.presence_plain).fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Kind::Presence(PresenceType::Subscribe) => {
                // One without a sender is ignored (`None`: the stream goes on).
                let from = stanza.from.as_ref().map(|j| j.to_bare().to_string())?;
                if self.approve.contains(&from) {
                    if write(&self.writer, roster::approve(&escape(&from)).as_bytes())
                        .await
                        .is_err()
                    {
                        return Some(Ending::dropped("dropped"));
                    }
                    self.ctx.counters.approved.fetch_add(1, Ordering::Relaxed);
                }
            }
            Kind::Iq(IqType::Result | IqType::Error)
                if stanza
                    .id
                    .as_deref()
                    .is_some_and(|id| self.pending.contains_key(id)) =>
            {
                let id = stanza.id.as_deref().unwrap_or_default();
                if let Some(reply) = self.pending.remove(id) {
                    let _ = reply.send(stanza);
                }
            }
            Kind::Iq(IqType::Get | IqType::Set) => {
                // Answer pings (servers use them to find dead clients) and roster pushes
                // (RFC 6121 §2.1.6); refuse the rest as a simple client would.
                let id = escape(stanza.id.as_deref().unwrap_or(""));
                let to = stanza
                    .from
                    .as_ref()
                    .map(|j| format!(" to='{}'", escape(&j.to_string())))
                    .unwrap_or_default();
                let payload = stanza.iq_payload().ok().flatten();
                let acknowledged = payload.is_some_and(|p| {
                    p.is("ping", ns::PING)
                        || (stanza.kind == Kind::Iq(IqType::Set) && p.is("query", ns::ROSTER))
                });
                let reply = if acknowledged {
                    format!("<iq type='result' id='{id}'{to}/>")
                } else {
                    format!(
                        "<iq type='error' id='{id}'{to}><error type='cancel'><service-unavailable xmlns='{}'/></error></iq>",
                        ns::STANZA_ERRORS
                    )
                };
                if write(&self.writer, reply.as_bytes()).await.is_err() {
                    return Some(Ending::dropped("dropped"));
                }
            }
            _ => {}
        }
        None
    }

    /// Counts presence from a MUC room and hands a pending join its answer; `true`
    /// when the presence needs nothing more (a room's, or the error refusing a join).
    fn on_room_presence(&mut self, presence: &Stanza) -> bool {
        let error = presence.kind == Kind::Presence(PresenceType::Error);
        if !error && !muc::from_room(presence) {
            return false;
        }
        if !error {
            (self.ctx.counters.room_presence).fetch_add(1, Ordering::Relaxed);
        }
        let answer = presence
            .from
            .as_ref()
            .filter(|_| !self.joining.is_empty())
            .map(|j| j.to_bare())
            .filter(|room| self.joining.contains_key(room.as_str()))
            .and_then(|room| Some((room, muc::join_answer(presence)?)));
        if let Some((room, answer)) = answer
            && let Some(reply) = self.joining.remove(room.as_str())
        {
            let _ = reply.send(answer);
            return true;
        }
        !error
    }

    /// Accounts for one probe of `carrier` that arrived in `phase`, `delayed` when the
    /// server had stored it; a groupchat probe from this very client is its echo,
    /// counted apart.
    fn on_probe(
        &mut self,
        carrier: Carrier,
        probe: Probe,
        delayed: bool,
        phase: u32,
        current: &mut PhaseReceived,
    ) {
        let counters = &self.ctx.counters;
        if probe.phase != phase {
            // An earlier phase was already collected (a later one cannot have started
            // before this phase was collected).
            counters.late.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let arrived = self.ctx.epoch.elapsed();
        let echo = carrier == Carrier::Groupchat && probe.sender == self.index;
        let got = if echo {
            &mut current.echo
        } else {
            current.of_mut(carrier)
        };
        match got.flow(probe.sender).record(probe.seq) {
            Arrival::InOrder | Arrival::OutOfOrder => {
                let took = latency(Duration::from_micros(probe.scheduled_us), arrived);
                got.latency.record(took);
                got.delayed += u64::from(delayed);
                if echo {
                    counters.echoes.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                counters.received.fetch_add(1, Ordering::Relaxed);
                if self.ctx.timeline.is_some() {
                    self.samples.push((arrived.as_secs(), took));
                    if self.samples.len() >= TIMELINE_BATCH {
                        self.flush_samples();
                    }
                }
            }
            Arrival::Duplicate => {
                counters.duplicated.fetch_add(1, Ordering::Relaxed);
            }
            Arrival::Bogus => {}
        }
    }

    fn flush_samples(&mut self) {
        if let Some(t) = &self.ctx.timeline {
            t.record(&self.samples);
        }
        self.samples.clear();
    }
}

/// The text of the first `<name>` child in a stanza payload (probes need no unescaping:
/// digits, letters and spaces only).
fn child_text<'a>(payload: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut open = Vec::with_capacity(name.len() + 1);
    open.push(b'<');
    open.extend_from_slice(name);
    let mut from = 0;
    // Skip elements whose name merely starts with `name` (`<bodyx>`).
    let start = loop {
        let at = from + find(&payload[from..], &open)?;
        match payload.get(at + open.len()) {
            Some(b'>' | b' ' | b'/' | b'\t' | b'\n' | b'\r') => break at,
            _ => from = at + 1,
        }
    };
    let open_end = start + payload[start..].iter().position(|&b| b == b'>')?;
    if payload[open_end - 1] == b'/' {
        return None;
    }
    let text_start = open_end + 1;
    let mut close = Vec::with_capacity(name.len() + 3);
    close.extend_from_slice(b"</");
    close.extend_from_slice(name);
    close.push(b'>');
    let len = find(&payload[text_start..], &close)?;
    Some(&payload[text_start..text_start + len])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One sender's part of a traffic phase.
pub struct SendPlan {
    pub writer: Writer,
    pub carrier: Carrier,
    /// The bare JID chat and groupchat messages go to: the partner's or the room's
    /// (unused for presence).
    pub to: String,
    /// The sender's client index, the probes' flow key.
    pub sender: u32,
    pub phase: u32,
    pub schedule: Schedule,
    pub size: usize,
    pub phase_start: Instant,
    pub epoch: Instant,
}

/// Sends `plan`'s probes at their scheduled times; returns how many were written.
/// Whatever is due when the task wakes goes out in one write, each probe stamped with
/// its own scheduled time, so a stall delays the stanzas without thinning them out.
pub async fn send_phase(plan: SendPlan, counters: Arc<Counters>) -> u64 {
    let (open, close) = match plan.carrier {
        Carrier::Chat => (
            format!("<message to='{}' type='chat'><body>", escape(&plan.to)),
            "</body></message>",
        ),
        Carrier::Presence => ("<presence><status>".to_owned(), "</status></presence>"),
        Carrier::Groupchat => (
            format!("<message to='{}' type='groupchat'><body>", escape(&plan.to)),
            "</body></message>",
        ),
    };
    let base = plan.phase_start.duration_since(plan.epoch);
    let mut next = 0;
    let mut out = String::new();
    'schedule: while let Some(due) = plan.schedule.next_due(next) {
        tokio::time::sleep_until(plan.phase_start + due).await;
        let batch = plan.schedule.due(next, plan.phase_start.elapsed());
        out.clear();
        for seq in batch.clone() {
            out.push_str(&open);
            Probe {
                phase: plan.phase,
                sender: plan.sender,
                seq,
                scheduled_us: (base + plan.schedule.due_at(seq)).as_micros() as u64,
            }
            .encode(plan.size, &mut out);
            out.push_str(close);
        }
        loop {
            let connection = plan.writer.connection();
            match write(&plan.writer, out.as_bytes()).await {
                Ok(()) => break,
                // The reader is logging in again: the batch goes on the next connection.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    if !plan.writer.wait_up(None).await {
                        return next;
                    }
                }
                // The connection broke under the write: the server may have read some
                // of it, so it counts as sent and is not written again.
                Err(_) => {
                    let n = batch.end - next;
                    counters.write_failed.fetch_add(n, Ordering::Relaxed);
                    counters.sent.fetch_add(n, Ordering::Relaxed);
                    next = batch.end;
                    if !plan.writer.wait_up(connection).await {
                        return next;
                    }
                    continue 'schedule;
                }
            }
        }
        counters.sent.fetch_add(batch.end - next, Ordering::Relaxed);
        next = batch.end;
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_bodies_and_statuses() {
        let body = |p: &'static [u8]| child_text(p, b"body");
        assert_eq!(body(b"<body>abc</body>"), Some(&b"abc"[..]));
        assert_eq!(
            body(b"<thread>t</thread><body xml:lang='en'>x y</body><x/>"),
            Some(&b"x y"[..])
        );
        assert_eq!(body(b"<body/>"), None);
        assert_eq!(body(b"<subject>s</subject>"), None);
        assert_eq!(
            body(b"<bodyx>no</bodyx><body>yes</body>"),
            Some(&b"yes"[..])
        );
        assert_eq!(
            child_text(
                b"<show>away</show><status>s 1</status><c xmlns='x'/>",
                b"status"
            ),
            Some(&b"s 1"[..])
        );
        assert_eq!(child_text(b"<priority>1</priority>", b"status"), None);
    }
}

#[cfg(test)]
mod reconnect_tests {
    use super::*;
    use crate::conn::ConnectConfig;
    use crate::negotiate::{Mech, TlsMode};

    fn policy(ports: &[u16]) -> Reconnect {
        let servers = ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
        Reconnect {
            connector: Arc::new(Connector::new(ConnectConfig {
                servers,
                sources: Vec::new(),
                domain: "localhost".into(),
                tls: TlsMode::None,
                tls_config: None,
                mech: Mech::Plain,
                prefix: "load".into(),
                password: "pw".into(),
                timeout: Duration::from_secs(1),
            })),
            attempts: 5,
            allow_remote: false,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn reconnects_go_round_the_other_endpoints() {
        let p = policy(&[1, 2, 3]);
        let from_2: Vec<u16> = (0..4).map(|a| p.target(addr(2), None, a).port()).collect();
        assert_eq!(from_2, [3, 1, 2, 3]);
        // The host <see-other-host/> names comes first, then the list as before.
        let named = Some(addr(9));
        let told: Vec<u16> = (0..3).map(|a| p.target(addr(1), named, a).port()).collect();
        assert_eq!(told, [9, 2, 3]);
    }

    #[test]
    fn backoff_doubles_up_to_two_seconds_staggered_by_client() {
        let ms = |attempt, index| Reconnect::backoff(attempt, index).as_millis();
        assert_eq!(ms(0, 7), 0);
        assert_eq!(
            [ms(1, 0), ms(2, 0), ms(3, 0), ms(6, 0)],
            [50, 100, 200, 1600]
        );
        assert_eq!([ms(7, 0), ms(30, 0)], [2000, 2000]);
        assert_eq!([ms(1, 3), ms(1, 23)], [65, 65]);
    }

    fn ending(xml: &str) -> Ending {
        let e = Element::parse(xml.as_bytes(), NsContext::CLIENT).expect("element");
        Ending::closed(Some(&e))
    }

    #[test]
    fn stream_ends_are_told_apart() {
        const E: &str = "xmlns:stream='http://etherx.jabber.org/streams'";
        const NS: &str = "xmlns='urn:ietf:params:xml:ns:xmpp-streams'";
        let e = ending(&format!(
            "<stream:error {E}><system-shutdown {NS}/><text {NS}>bye</text></stream:error>"
        ));
        assert_eq!((e.reason.as_str(), e.closed), ("system-shutdown", true));
        assert_eq!(e.other_host, None);
        let e = ending(&format!(
            "<stream:error {E}><see-other-host {NS}>[::1]:5223</see-other-host></stream:error>"
        ));
        assert_eq!(e.reason, "see-other-host");
        assert_eq!(e.other_host.as_deref(), Some("[::1]:5223"));
        let e = ending(&format!(
            "<stream:error {E}><conflict {NS}/></stream:error>"
        ));
        assert_eq!(e.reason, "stream-error:conflict");
        assert_eq!(Ending::closed(None).reason, "closed");
        let e = Ending::dropped("dropped");
        assert!(!e.closed);
    }

    #[tokio::test]
    async fn see_other_host_names_are_resolved_on_loopback_only() {
        assert_eq!(
            other_host("127.0.0.2", false).await,
            Some("127.0.0.2:5222".parse().unwrap())
        );
        assert_eq!(
            other_host("[::1]:5223", false).await,
            Some("[::1]:5223".parse().unwrap())
        );
        assert_eq!(
            other_host("localhost:6000", false).await.map(|a| a.port()),
            Some(6000)
        );
        assert_eq!(other_host("192.0.2.1:5222", false).await, None);
        assert_eq!(
            other_host("192.0.2.1", true).await,
            Some("192.0.2.1:5222".parse().unwrap())
        );
    }
}
