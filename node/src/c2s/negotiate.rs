//! Drives one client connection from its first byte to a bound resource.
//!
//! Before binding nothing can be routed to a connection, so negotiation is a plain task
//! that owns the socket: it carries out the [`C2sStream`] actions (TLS upgrade,
//! credential lookup, in-band account registration, binding through the user's shard
//! host) under the negotiation timeout, then turns the connection into a [`Session`]
//! actor. Authentication failures and registrations count against the peer address's
//! budgets. A registration's password goes from the machine straight into the key
//! derivation and is never logged.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::BytesMut;
use jid::{BareJid, FullJid};
use shoal_xmpp::c2s::{Action, C2sStream};
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition, StreamError, StreamErrorCondition};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::either::Either;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::c2s::io::{self, Outbound, Transport};
use crate::c2s::session::{Incoming, Session, SessionParts};
use crate::c2s::{Shared, fresh_id, mechanism_label, stream_error_label};
use crate::metrics::{ConnectionGuard, Listener, RegistrationResult};
use crate::shard::{Bind, BindReplyTo, BindResult, SessionHandle};
use crate::storage::{self, StorageError};
use crate::user::UserShared;

/// How long the final stream error may take to reach a peer that is being closed.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The connection while it negotiates. The transport is an `Option` because a TLS
/// upgrade consumes the plaintext socket; it is `None` only while a handshake runs.
struct Conn {
    transport: Option<Transport>,
    stream: C2sStream,
    buf: BytesMut,
}

/// A connection that bound a resource, ready to become a session actor.
struct Bound {
    transport: Transport,
    stream: C2sStream,
    buf: BytesMut,
    ctx: Context<Session>,
    jid: FullJid,
    id: u64,
    shared: Arc<UserShared>,
}

/// Serves one accepted connection until it is bound (then hands over) or closed.
/// `peer` is the client's address: the socket's, or the one a trusted load balancer's
/// PROXY header named.
pub async fn run(tcp: TcpStream, peer: SocketAddr, kind: Listener, shared: Arc<Shared>) {
    // Every line logged while negotiating names the client.
    let span = info_span!("c2s", %peer, listener = kind.as_str());
    serve(tcp, peer, kind, shared).instrument(span).await;
}

async fn serve(tcp: TcpStream, peer: SocketAddr, kind: Listener, shared: Arc<Shared>) {
    let guard = shared.metrics.connection_accepted(kind);
    let direct_tls = kind == Listener::DirectTls;
    let mut conn = Conn {
        transport: None,
        stream: C2sStream::new(shared.stream_config.clone(), direct_tls),
        buf: BytesMut::with_capacity(4096),
    };
    let mut shutdown = shared.shutdown.clone();
    let outcome = tokio::select! {
        r = tokio::time::timeout(
            shared.config.c2s.negotiation_timeout,
            negotiate(&mut conn, tcp, peer, direct_tls, &shared),
        ) => r.unwrap_or_else(|_| Err(StreamErrorCondition::ConnectionTimeout.into())),
        _ = shutdown.changed() => Err(shared.farewell()),
    };
    match outcome {
        Ok(Some(bound)) => return start_session(*bound, guard, &shared),
        Ok(None) => {}
        Err(error) => {
            info!(%error, "closing connection during negotiation");
            shared
                .metrics
                .stream_error(stream_error_label(error.condition));
            if let Some(mut t) = conn.transport.take() {
                let mut bytes = String::new();
                for a in conn.stream.close_with(error) {
                    if let Action::Send(s) = a {
                        bytes.push_str(&s);
                    }
                }
                // A peer that does not read must not hold the task: bounded flush.
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
                    let _ = io::write_now(&mut t, &bytes).await;
                    let _ = t.shutdown().await;
                })
                .await;
            }
        }
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
}

/// Runs negotiation. `Ok(None)`: the stream ended (any stream error was sent and
/// logged). `Err` is never produced here; it stands for the timeout and shutdown arms.
async fn negotiate(
    conn: &mut Conn,
    tcp: TcpStream,
    peer: SocketAddr,
    direct_tls: bool,
    shared: &Shared,
) -> Result<Option<Box<Bound>>, StreamError> {
    conn.transport = Some(if direct_tls {
        let Some(tls) = &shared.tls else {
            return Ok(None);
        };
        match crate::tls::accept(tls.clone(), tcp).await {
            Ok(s) => Either::Right(Box::new(s)),
            Err(e) => {
                debug!(error = %e, "direct TLS handshake failed");
                return Ok(None);
            }
        }
    } else {
        Either::Left(tcp)
    });
    let mut pending_bind: Option<(Context<Session>, u64, oneshot::Receiver<BindResult>)> = None;
    let mut actions: VecDeque<Action> = VecDeque::new();
    loop {
        if let Some((ctx, id, rx)) = pending_bind.take() {
            let result = rx.await.unwrap_or_else(|_| {
                Err(StanzaError::new(StanzaErrorCondition::InternalServerError))
            });
            let bound = result.as_ref().ok().cloned();
            actions.extend(conn.stream.bind_result(result.map(|(jid, _)| jid)));
            if let Some((jid, user_shared)) = bound {
                // The bind result is written before the session takes the socket.
                for a in actions.drain(..) {
                    if let Action::Send(s) = a
                        && write(conn, &s).await.is_err()
                    {
                        return Ok(None);
                    }
                }
                let transport = conn.transport.take().expect("transport present");
                return Ok(Some(Box::new(Bound {
                    transport,
                    stream: std::mem::replace(
                        &mut conn.stream,
                        C2sStream::new(shared.stream_config.clone(), true),
                    ),
                    // Bytes pipelined behind the bind request; the session must not
                    // inherit the empty negotiation buffer's capacity.
                    buf: if conn.buf.is_empty() {
                        BytesMut::new()
                    } else {
                        std::mem::take(&mut conn.buf)
                    },
                    ctx,
                    jid,
                    id,
                    shared: user_shared,
                })));
            }
        } else {
            let Some(t) = conn.transport.as_mut() else {
                return Ok(None);
            };
            conn.buf.reserve(4096);
            match t.read_buf(&mut conn.buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
            actions.extend(conn.stream.receive(&mut conn.buf, &mut fresh_id));
        }
        while let Some(action) = actions.pop_front() {
            match action {
                Action::Send(s) => {
                    if write(conn, &s).await.is_err() {
                        return Ok(None);
                    }
                }
                Action::StartTls => {
                    let (Some(Either::Left(tcp)), Some(tls)) = (conn.transport.take(), &shared.tls)
                    else {
                        return Ok(None);
                    };
                    match crate::tls::accept(tls.clone(), tcp).await {
                        Ok(s) => conn.transport = Some(Either::Right(Box::new(s))),
                        Err(e) => {
                            info!(error = %e, "TLS handshake after STARTTLS failed");
                            return Ok(None);
                        }
                    }
                }
                Action::LookupCredentials { user } => {
                    let creds = match shared.storage.accounts.credentials(user.as_str()).await {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(error = %e, "credential lookup failed");
                            None
                        }
                    };
                    actions.extend(conn.stream.credentials(creds.as_ref(), &mut fresh_id));
                }
                Action::Authenticated { user, mechanism } => {
                    shared.metrics.auth_success(mechanism_label(mechanism));
                    debug!(%user, mechanism = mechanism.name(), "authenticated");
                }
                Action::AuthFailed {
                    mechanism,
                    condition,
                } => {
                    if let Some(m) = mechanism {
                        shared.metrics.auth_failure(mechanism_label(m));
                    }
                    info!(
                        condition = condition.element_name(),
                        "authentication failed"
                    );
                    if !shared.auth_limiter.check(peer.ip(), Instant::now()) {
                        warn!("too many authentication failures from this address");
                        actions.clear();
                        actions.extend(conn.stream.close_with(StreamError::with_text(
                            StreamErrorCondition::PolicyViolation,
                            "too many failed authentication attempts from your address",
                        )));
                    }
                }
                Action::Register { user, password } => {
                    let result = register(shared, peer, &user, password).await;
                    actions.extend(conn.stream.register_result(result));
                    // A client may have pipelined its SASL exchange behind the
                    // registration; the machine held it back until now.
                    actions.extend(conn.stream.receive(&mut conn.buf, &mut fresh_id));
                }
                Action::Bind { resource } => {
                    let Some(user) = conn.stream.user().cloned() else {
                        return Ok(None);
                    };
                    let ctx = Context::<Session>::new();
                    let id = shared.next_session_id();
                    let (tx, rx) = oneshot::channel();
                    shared.router.bind(Bind {
                        user: user.clone(),
                        resource: resource.unwrap_or_else(fresh_id),
                        id,
                        session: SessionHandle::Local(ctx.address()),
                        reply: BindReplyTo::Local(tx),
                    });
                    pending_bind = Some((ctx, id, rx));
                }
                Action::Close { error } => {
                    if let Some(e) = &error {
                        info!(
                            condition = e.condition.as_str(),
                            text = e.text.as_deref().unwrap_or(""),
                            "stream error during negotiation"
                        );
                        shared.metrics.stream_error(stream_error_label(e.condition));
                    }
                    if let Some(t) = conn.transport.as_mut() {
                        let _ = t.shutdown().await;
                    }
                    return Ok(None);
                }
                // The machine only emits stanzas once bound, which ends this loop.
                Action::Stanza(_) => debug!("stanza before binding ignored"),
            }
        }
    }
}

/// Creates `user` for an in-band registration (XEP-0077) from `peer`: the answer for
/// [`C2sStream::register_result`].
async fn register(
    shared: &Shared,
    peer: SocketAddr,
    user: &BareJid,
    password: String,
) -> Result<(), StanzaError> {
    let refuse = |condition, text: &str| {
        shared.metrics.registration(RegistrationResult::Refused);
        Err(StanzaError::with_text(condition, text))
    };
    // The machine only asks when registration is enabled, as configured here; this is
    // the driver's own guard, should the two ever disagree.
    if !shared.config.registration.enabled {
        return refuse(
            StanzaErrorCondition::NotAllowed,
            "in-band registration is disabled",
        );
    }
    // Every attempt that reaches storage costs a token, conflicts included, so the
    // budget also bounds probing for existing account names.
    if !shared.register_limiter.check(peer.ip(), Instant::now()) {
        info!(%user, "registration refused: too many from this address");
        return refuse(
            StanzaErrorCondition::ResourceConstraint,
            "too many registrations from your address; try again later",
        );
    }
    // PBKDF2 at thousands of iterations, twice: milliseconds of CPU that must not stall
    // the worker's other connections.
    let creds = match tokio::task::spawn_blocking(move || storage::new_credentials(&password)).await
    {
        Ok(c) => c,
        Err(e) => {
            warn!(%user, error = %e, "registration: deriving credentials failed");
            return refuse(StanzaErrorCondition::InternalServerError, "internal error");
        }
    };
    match shared
        .storage
        .accounts
        .create_account(user.as_str(), &creds)
        .await
    {
        Ok(()) => {
            shared.metrics.registration(RegistrationResult::Created);
            info!(%user, "account registered in-band");
            Ok(())
        }
        Err(StorageError::AlreadyExists) => {
            shared.metrics.registration(RegistrationResult::Conflict);
            info!(%user, "registration refused: account exists");
            Err(StanzaError::new(StanzaErrorCondition::Conflict))
        }
        Err(e) => {
            warn!(%user, error = %e, "registration: storing the account failed");
            refuse(StanzaErrorCondition::InternalServerError, "internal error")
        }
    }
}

async fn write(conn: &mut Conn, s: &str) -> std::io::Result<()> {
    match conn.transport.as_mut() {
        Some(t) => io::write_now(t, s).await,
        None => Err(std::io::ErrorKind::NotConnected.into()),
    }
}

/// Turns a bound connection into a session actor with its reader and writer tasks.
fn start_session(bound: Bound, connection: ConnectionGuard, shared: &Arc<Shared>) {
    let Bound {
        transport,
        stream,
        buf,
        ctx,
        jid,
        id,
        shared: user_shared,
    } = bound;
    let addr = ctx.address();
    let (read, write) = io::split(transport);
    let outbound = Outbound::start(write, shared.config.c2s.outbound_buffer_max);
    let shaping = match shared.config.c2s.read_rate_bytes_per_sec {
        0 => None,
        rate => Some((rate, shared.config.c2s.read_burst_bytes)),
    };
    let reader = tokio::spawn(async move {
        io::read_loop(read, shaping, |chunk| {
            let addr = addr.clone();
            async move { addr.send(Incoming(chunk)).await.unwrap_or(false) }
        })
        .await;
    });
    let open = shared.clone();
    let session = Session::new(SessionParts {
        stream,
        buf,
        jid,
        id,
        outbound,
        reader: reader.abort_handle(),
        router: shared.router.clone(),
        metrics: shared.metrics.clone(),
        idle_timeout: shared.config.c2s.idle_timeout,
        connection,
        shared: user_shared,
        on_stop: Box::new(move || {
            open.open.fetch_sub(1, Ordering::Relaxed);
        }),
    });
    ctx.run(session);
}
