//! The async driver of one client connection: TCP (from a chosen loopback source
//! address), TLS, then the [`Negotiator`] fed from `shoal-xmpp`'s framer until the
//! session is established or the registration answered.
//!
//! It owns sockets and deadlines and timestamps the negotiator's phase marks; it never
//! decides what to send (that is `negotiate`'s job). Every wait is bounded by the
//! per-login timeout, so a stalled server costs a counted failure, not a hung task.

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use shoal_xmpp::framer::{FrameError, Framer, FramerLimits};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::negotiate::{
    Action, Goal, Mech, NegotiationError, Negotiator, Outcome, Params, Phase, TlsMode,
};

/// A byte stream after negotiation, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How every client connects and logs in.
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// Endpoints; client `i` uses `servers[i % len]`.
    pub servers: Vec<SocketAddr>,
    /// Source addresses; client `i` binds `sources[i % len]`. Empty: the OS chooses.
    pub sources: Vec<IpAddr>,
    pub domain: String,
    pub tls: TlsMode,
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    pub mech: Mech,
    /// Usernames are `{prefix}{i}`.
    pub prefix: String,
    pub password: String,
    /// Bound on one whole login (connect to presence) or registration.
    pub timeout: Duration,
}

impl ConnectConfig {
    pub fn username(&self, index: usize) -> String {
        format!("{}{index}", self.prefix)
    }

    pub fn bare_jid(&self, index: usize) -> String {
        format!("{}{index}@{}", self.prefix, self.domain)
    }
}

/// How long each step of one login took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoginTimings {
    pub connect: Duration,
    pub tls: Option<Duration>,
    pub auth: Duration,
    pub bind: Duration,
    /// From the start of the TCP connect to initial presence sent.
    pub total: Duration,
}

/// An established session, ready for stanzas. The framer and buffer carry over any
/// bytes that arrived behind the bind result.
pub struct Established {
    pub index: usize,
    /// The endpoint it is connected to.
    pub server: SocketAddr,
    pub io: Box<dyn Io>,
    pub framer: Framer,
    pub buf: BytesMut,
    pub jid: String,
    pub timings: LoginTimings,
}

/// Why a login or registration failed. [`LoginError::reason`] is the key failures are
/// counted by.
#[derive(Debug)]
pub enum LoginError {
    Connect(io::ErrorKind),
    Timeout(&'static str),
    Tls(String),
    Io(&'static str, io::ErrorKind),
    Eof(&'static str),
    Framing(FrameError),
    Negotiation(NegotiationError),
}

impl LoginError {
    pub fn reason(&self) -> String {
        match self {
            LoginError::Connect(kind) => format!("connect:{}", kind_name(*kind)),
            LoginError::Timeout(state) => format!("timeout:{state}"),
            LoginError::Tls(_) => "tls-handshake".into(),
            LoginError::Io(state, kind) => format!("io:{state}:{}", kind_name(*kind)),
            LoginError::Eof(state) => format!("eof:{state}"),
            LoginError::Framing(_) => "framing".into(),
            LoginError::Negotiation(e) => e.reason(),
        }
    }
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoginError::Tls(e) => write!(f, "TLS handshake: {e}"),
            LoginError::Framing(e) => write!(f, "framing: {e}"),
            LoginError::Negotiation(e) => write!(f, "{e}"),
            other => f.write_str(&other.reason()),
        }
    }
}

impl std::error::Error for LoginError {}

/// `ErrorKind`'s Debug form is its stable variant name (`ConnectionRefused`, ...).
fn kind_name(kind: io::ErrorKind) -> String {
    format!("{kind:?}")
}

/// Plain until STARTTLS, TLS afterwards.
enum Socket {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Largest frame accepted from the server: generous, since the generator must not be
/// the one that refuses a big roster or a padded message.
const CLIENT_FRAMER_LIMITS: FramerLimits = FramerLimits {
    max_stanza_size: 16 << 20,
    max_depth: 64,
};

/// Opens connections and runs negotiations for all clients of a run.
pub struct Connector {
    cfg: ConnectConfig,
    tls: Option<TlsConnector>,
    nonce_keys: std::collections::hash_map::RandomState,
    nonce_counter: AtomicU64,
}

impl Connector {
    pub fn new(cfg: ConnectConfig) -> Self {
        let tls = cfg.tls_config.clone().map(TlsConnector::from);
        Self {
            cfg,
            tls,
            nonce_keys: Default::default(),
            nonce_counter: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &ConnectConfig {
        &self.cfg
    }

    /// The endpoint client `index` uses first.
    pub fn server_for(&self, index: usize) -> SocketAddr {
        self.cfg.servers[index % self.cfg.servers.len()]
    }

    /// Logs client `index` in at its own endpoint: connect, TLS, SASL, bind, initial
    /// presence.
    pub async fn login(&self, index: usize) -> Result<Established, LoginError> {
        self.login_via(index, self.server_for(index)).await
    }

    /// Logs client `index` in at `server` (a reconnect goes to another endpoint).
    pub async fn login_via(
        &self,
        index: usize,
        server: SocketAddr,
    ) -> Result<Established, LoginError> {
        let (socket, framer, buf, outcome, timings) = self
            .negotiate(index, server, Goal::Login { resource: None })
            .await?;
        let Outcome::Established { jid } = outcome else {
            unreachable!("a login goal ends established");
        };
        Ok(Established {
            index,
            server,
            io: Box::new(socket),
            framer,
            buf,
            jid,
            timings,
        })
    }

    /// Registers client `index` by XEP-0077 and closes the stream.
    pub async fn register(&self, index: usize) -> Result<Outcome, LoginError> {
        let server = self.server_for(index);
        let (mut socket, _, _, outcome, _) = self.negotiate(index, server, Goal::Register).await?;
        // Best effort: the account exists either way.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            socket.write_all(b"</stream:stream>").await?;
            socket.shutdown().await
        })
        .await;
        Ok(outcome)
    }

    /// A fresh SCRAM client nonce: 32 hex digits from the process's random hash keys
    /// and a counter (unique per exchange; SCRAM needs no more from the client side).
    fn nonce(&self) -> String {
        let n = self.nonce_counter.fetch_add(1, Ordering::Relaxed);
        let mut a = self.nonce_keys.build_hasher();
        a.write_u64(n);
        let mut b = self.nonce_keys.build_hasher();
        b.write_u64(!n);
        format!("{:016x}{:016x}", a.finish(), b.finish())
    }

    async fn tcp_connect(&self, index: usize, server: SocketAddr) -> io::Result<TcpStream> {
        let stream = if self.cfg.sources.is_empty() {
            TcpStream::connect(server).await?
        } else {
            let source = self.cfg.sources[index % self.cfg.sources.len()];
            let socket = match source {
                IpAddr::V4(_) => TcpSocket::new_v4()?,
                IpAddr::V6(_) => TcpSocket::new_v6()?,
            };
            // Lets a port whose previous connection sits in TIME_WAIT be reused, so
            // back-to-back runs do not exhaust a source address's ports.
            socket.set_reuseaddr(true)?;
            socket.bind(SocketAddr::new(source, 0))?;
            socket.connect(server).await?
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn handshake(&self, socket: Socket, deadline: Instant) -> Result<Socket, LoginError> {
        let Socket::Plain(tcp) = socket else {
            return Err(LoginError::Tls("TLS requested twice".into()));
        };
        let connector = self
            .tls
            .as_ref()
            .ok_or_else(|| LoginError::Tls("no TLS configuration".into()))?;
        let name = ServerName::try_from(self.cfg.domain.clone())
            .map_err(|e| LoginError::Tls(e.to_string()))?;
        let tls = timeout_at(deadline, connector.connect(name, tcp))
            .await
            .map_err(|_| LoginError::Timeout("tls"))?
            .map_err(|e| LoginError::Tls(e.to_string()))?;
        Ok(Socket::Tls(Box::new(tls)))
    }

    async fn negotiate(
        &self,
        index: usize,
        server: SocketAddr,
        goal: Goal,
    ) -> Result<(Socket, Framer, BytesMut, Outcome, LoginTimings), LoginError> {
        let start = Instant::now();
        let deadline = start + self.cfg.timeout;
        let tcp = timeout_at(deadline, self.tcp_connect(index, server))
            .await
            .map_err(|_| LoginError::Timeout("connect"))?
            .map_err(|e| LoginError::Connect(e.kind()))?;
        let mut timings = LoginTimings {
            connect: start.elapsed(),
            ..Default::default()
        };
        let mut socket = Socket::Plain(tcp);
        if self.cfg.tls == TlsMode::Direct {
            let t = Instant::now();
            socket = self.handshake(socket, deadline).await?;
            timings.tls = Some(t.elapsed());
        }
        let (mut negotiator, first) = Negotiator::new(Params {
            domain: self.cfg.domain.clone(),
            username: self.cfg.username(index),
            password: self.cfg.password.clone(),
            mech: self.cfg.mech,
            tls: self.cfg.tls,
            nonce: self.nonce(),
            goal,
        });
        let mut pending: std::collections::VecDeque<Action> = first.into();
        let mut framer = Framer::new(CLIENT_FRAMER_LIMITS);
        let mut buf = BytesMut::with_capacity(4096);
        let mut began = [start; 3];
        let slot = |p: Phase| match p {
            Phase::Tls => 0,
            Phase::Auth => 1,
            Phase::Bind => 2,
        };
        loop {
            while let Some(action) = pending.pop_front() {
                match action {
                    Action::Send(data) => {
                        let state = negotiator.state_name();
                        timeout_at(deadline, async {
                            socket.write_all(data.as_bytes()).await?;
                            socket.flush().await
                        })
                        .await
                        .map_err(|_| LoginError::Timeout(state))?
                        .map_err(|e| LoginError::Io(state, e.kind()))?;
                    }
                    Action::StartTls => {
                        socket = self.handshake(socket, deadline).await?;
                        pending.extend(negotiator.tls_established());
                    }
                    Action::ResetStream => {
                        framer.reset();
                        buf.clear();
                    }
                    Action::Begin(p) => began[slot(p)] = Instant::now(),
                    Action::End(p) => {
                        let took = began[slot(p)].elapsed();
                        match p {
                            Phase::Tls => timings.tls = Some(took),
                            Phase::Auth => timings.auth = took,
                            Phase::Bind => timings.bind = took,
                        }
                    }
                    Action::Done(outcome) => {
                        timings.total = start.elapsed();
                        return Ok((socket, framer, buf, outcome, timings));
                    }
                }
            }
            let frame = loop {
                if let Some(frame) = framer.next_frame(&mut buf).map_err(LoginError::Framing)? {
                    break frame;
                }
                let state = negotiator.state_name();
                buf.reserve(4096);
                let n = timeout_at(deadline, socket.read_buf(&mut buf))
                    .await
                    .map_err(|_| LoginError::Timeout(state))?
                    .map_err(|e| LoginError::Io(state, e.kind()))?;
                if n == 0 {
                    return Err(LoginError::Eof(state));
                }
            };
            pending.extend(negotiator.handle(frame).map_err(LoginError::Negotiation)?);
        }
    }
}
