//! Storage work a shard host hands off: loading a user, ordered writes, and jobs whose
//! results become stanzas (offline delivery, vCard, private storage, last activity,
//! password change, account removal).
//!
//! Each shard host owns one [`StorageQueue`]. A user's operations run one at a time in
//! submission order, so a read always sees the writes submitted before it and a user's
//! data is never read stale after an unload; different users' operations run side by
//! side (up to [`STORAGE_CONCURRENCY`]), so a slow disk sync for one user does not hold
//! up the others and their writes share one group commit. Jobs reply by routing stanzas or
//! delivering to session mailboxes with `try_send`; they never touch user state, which
//! belongs to the shard actor.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use jid::BareJid;
use metrics::Gauge;
use shoal_xmpp::error::{StanzaError, StanzaErrorCondition, StreamErrorCondition};
use shoal_xmpp::ns;
use shoal_xmpp::stanza::{Kind, Stanza, TopLevel, parse_top_level};
use shoal_xmpp::xml::{Element, NsContext};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::metrics::Mailbox;
use crate::router::Router;
use crate::shard::{Reload, SessionHandle};
use crate::storage::{Storage, StorageError, new_credentials};
use crate::user::{Job, Write};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Operations waiting past this count make the shard refuse optional work (storing
/// offline messages, vCard and private writes) with `<resource-constraint/>`, so a
/// storage backend slower than the traffic cannot grow the queue without bound.
/// Roster and subscription writes are always queued: they are small and losing one
/// would corrupt state.
pub const STORAGE_QUEUE_SOFT_LIMIT: usize = 10_000;

/// Most users whose operations run at the same time on one queue.
pub const STORAGE_CONCURRENCY: usize = 64;

enum Op {
    /// An operation on one user's data.
    User(BareJid, Task),
    /// Runs once everything submitted before it has finished; nothing submitted after
    /// it starts until then.
    Barrier(Task),
}

/// A shard host's storage worker: ordered per user, concurrent across users.
#[derive(Clone)]
pub struct StorageQueue {
    tx: mpsc::UnboundedSender<Op>,
    pending: Pending,
    pub storage: Storage,
}

/// Operations submitted and not finished: the queue's own count (for congestion) and
/// the node's gauge of all queues (`shoal_storage_queue_depth`).
#[derive(Clone)]
struct Pending {
    count: Arc<AtomicUsize>,
    gauge: Gauge,
}

impl Pending {
    fn add(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.gauge.increment(1.0);
    }

    fn done(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.gauge.decrement(1.0);
    }
}

impl StorageQueue {
    /// Starts the worker; `depth` is the gauge it keeps its count in.
    pub fn start(storage: Storage, depth: Gauge) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Pending {
            count: Arc::new(AtomicUsize::new(0)),
            gauge: depth,
        };
        tokio::spawn(run_queue(rx, pending.clone()));
        Self {
            tx,
            pending,
            storage,
        }
    }

    /// Whether optional work should be refused (see [`STORAGE_QUEUE_SOFT_LIMIT`]).
    pub fn is_congested(&self) -> bool {
        self.pending.count.load(Ordering::Acquire) >= STORAGE_QUEUE_SOFT_LIMIT
    }

    /// Queues an operation on `user`'s data, after the ones already queued for `user`.
    pub fn submit(&self, user: &BareJid, task: impl Future<Output = ()> + Send + 'static) {
        self.send(Op::User(user.clone(), Box::pin(task)));
    }

    /// Queues `task` to run after every operation submitted before it.
    pub fn barrier(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.send(Op::Barrier(Box::pin(task)));
    }

    fn send(&self, op: Op) {
        self.pending.add();
        if self.tx.send(op).is_err() {
            self.pending.done();
            warn!("storage queue stopped; operation dropped");
        }
    }
}

/// The queue's scheduler. A user is in `queued` while it has an operation running or
/// waiting; `ready` lists the users with a waiting operation and none running.
async fn run_queue(mut rx: mpsc::UnboundedReceiver<Op>, pending: Pending) {
    let mut queued: HashMap<BareJid, VecDeque<Task>> = HashMap::new();
    let mut ready: VecDeque<BareJid> = VecDeque::new();
    let mut running: JoinSet<()> = JoinSet::new();
    let mut running_users: HashMap<tokio::task::Id, BareJid> = HashMap::new();
    let mut barrier: Option<Task> = None;
    let mut open = true;
    loop {
        while running.len() < STORAGE_CONCURRENCY {
            let Some(user) = ready.pop_front() else { break };
            let Some(task) = queued.get_mut(&user).and_then(VecDeque::pop_front) else {
                continue;
            };
            let id = running.spawn(task).id();
            running_users.insert(id, user);
        }
        if running.is_empty()
            && queued.is_empty()
            && let Some(task) = barrier.take()
        {
            task.await;
            pending.done();
            continue;
        }
        if !open && running.is_empty() && queued.is_empty() && barrier.is_none() {
            return;
        }
        tokio::select! {
            op = rx.recv(), if open && barrier.is_none() => match op {
                Some(Op::User(user, task)) => match queued.get_mut(&user) {
                    Some(waiting) => waiting.push_back(task),
                    None => {
                        queued.insert(user.clone(), VecDeque::from([task]));
                        ready.push_back(user);
                    }
                },
                Some(Op::Barrier(task)) => barrier = Some(task),
                None => open = false,
            },
            Some(done) = running.join_next_with_id() => {
                pending.done();
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        warn!(error = %e, "storage operation failed to complete");
                        e.id()
                    }
                };
                let Some(user) = running_users.remove(&id) else { continue };
                if queued.get(&user).is_some_and(VecDeque::is_empty) {
                    queued.remove(&user);
                } else {
                    ready.push_back(user);
                }
            }
        }
    }
}

pub async fn write(storage: &Storage, user: &BareJid, w: Write) {
    let deadline = Instant::now() + WRITE_RETRY_FOR;
    let mut backoff = WRITE_BACKOFF_MIN;
    loop {
        let Err(e) = apply(storage, user.as_str(), &w).await else {
            if backoff > WRITE_BACKOFF_MIN {
                info!(user = %user, "storage write done after retrying");
            }
            return;
        };
        // A backend that is down (Redis restarting) comes back: the write waits for
        // it, holding this user's later operations behind it so their order stays.
        let transient = matches!(e, StorageError::Backend(_) | StorageError::Io(_));
        if !transient || Instant::now() + backoff >= deadline {
            warn!(user = %user, error = %e, write = ?w, "storage write failed");
            return;
        }
        if backoff == WRITE_BACKOFF_MIN {
            warn!(user = %user, error = %e, "storage write failed; retrying");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(WRITE_BACKOFF_MAX);
    }
}

/// How long a write keeps being retried while the backend fails: a Redis restart or
/// failover takes seconds; past a minute the write is given up and logged.
const WRITE_RETRY_FOR: Duration = Duration::from_secs(60);
const WRITE_BACKOFF_MIN: Duration = Duration::from_millis(100);
const WRITE_BACKOFF_MAX: Duration = Duration::from_secs(2);

async fn apply(storage: &Storage, key: &str, w: &Write) -> Result<(), StorageError> {
    match w {
        Write::PutItem(item) => storage.rosters.put_item(key, item).await.map(drop),
        Write::RemoveItem(c) => storage.rosters.remove_item(key, c).await.map(drop),
        Write::PendingIn(c, p) => storage.rosters.set_pending_in(key, c, p.as_deref()).await,
        Write::Blocklist(list) => storage.user_data.set_blocklist(key, list).await,
        Write::LastActivity { unix_secs, status } => {
            storage
                .user_data
                .set_last_activity(key, *unix_secs, status)
                .await
        }
        Write::RoomState { state, listed } => {
            storage.rooms.put_room(key, state, listed.as_deref()).await
        }
        Write::RoomOccupant(jid, record) => {
            storage
                .rooms
                .set_occupant(key, jid, record.as_deref())
                .await
        }
        Write::RoomDeleted => storage.rooms.delete_room(key).await,
    }
}

/// What a job needs besides the job itself.
#[derive(Clone)]
pub struct JobContext {
    pub storage: Storage,
    pub router: Router,
    pub max_offline: usize,
}

pub async fn run(cx: JobContext, user: BareJid, job: Job<SessionHandle>) {
    let since = Instant::now();
    let key = user.as_str();
    let reply = |request: &Stanza, payload: Option<&Element>| {
        cx.router.route(request.iq_result(payload), since);
    };
    let fail = |request: &Stanza, condition: StanzaErrorCondition| {
        cx.router
            .bounce(request, StanzaError::new(condition), since);
    };
    match job {
        Job::StoreOffline(stanza) => {
            let stamped = stanza.to_xml();
            match cx
                .storage
                .offline
                .push(key, &stamped, now_ms(), cx.max_offline)
                .await
            {
                Ok(true) => {}
                // RFC 6121 §8.5.2.2.1: over the bound the sender is told.
                Ok(false) => fail(&stanza, StanzaErrorCondition::ServiceUnavailable),
                Err(e) => {
                    warn!(%user, error = %e, "storing offline message failed");
                    fail(&stanza, StanzaErrorCondition::InternalServerError);
                }
            }
        }
        Job::DeliverOffline(session) => deliver_offline(&cx, &user, &session, since).await,
        Job::VcardGet { request, owner } => {
            match cx.storage.user_data.vcard(owner.as_str()).await {
                Ok(Some(xml)) => match parse_element(&xml) {
                    Some(v) => reply(&request, Some(&v)),
                    None => fail(&request, StanzaErrorCondition::InternalServerError),
                },
                // XEP-0054 §3.1: no vCard is an empty one.
                Ok(None) => reply(&request, Some(&Element::new("vCard", ns::VCARD))),
                Err(_) => fail(&request, StanzaErrorCondition::InternalServerError),
            }
        }
        Job::VcardSet { request, xml } => match cx.storage.user_data.set_vcard(key, &xml).await {
            Ok(()) => reply(&request, None),
            Err(_) => fail(&request, StanzaErrorCondition::InternalServerError),
        },
        Job::PrivateGet {
            request,
            name,
            ns: child_ns,
        } => {
            let key2 = format!("{name} {child_ns}");
            match cx.storage.user_data.private(key, &key2).await {
                Ok(stored) => {
                    let child = stored
                        .as_deref()
                        .and_then(parse_element)
                        .unwrap_or_else(|| Element::new(name, child_ns));
                    reply(
                        &request,
                        Some(&Element::new("query", ns::PRIVATE).child(child)),
                    );
                }
                Err(_) => fail(&request, StanzaErrorCondition::InternalServerError),
            }
        }
        Job::PrivateSet {
            request,
            key: k,
            xml,
        } => match cx.storage.user_data.set_private(key, &k, &xml).await {
            Ok(()) => reply(&request, None),
            Err(_) => fail(&request, StanzaErrorCondition::InternalServerError),
        },
        Job::LastActivity { request } => match cx.storage.user_data.last_activity(key).await {
            Ok(Some((at, status))) => {
                let seconds = (now_ms() / 1000).saturating_sub(at);
                let mut q = Element::new("query", ns::LAST).attr("seconds", seconds.to_string());
                if !status.is_empty() {
                    q = q.text(status);
                }
                reply(&request, Some(&q));
            }
            // Never logged in: nothing to tell (XEP-0012 §4 leaves it to the server).
            Ok(None) => fail(&request, StanzaErrorCondition::ServiceUnavailable),
            Err(_) => fail(&request, StanzaErrorCondition::InternalServerError),
        },
        Job::ChangePassword { request, password } => {
            let creds = tokio::task::spawn_blocking(move || new_credentials(&password)).await;
            let result = match creds {
                Ok(c) => cx.storage.accounts.set_credentials(key, &c).await,
                Err(_) => Err(StorageError::Unrepresentable(
                    "credential derivation failed",
                )),
            };
            match result {
                Ok(()) => {
                    info!(%user, "password changed");
                    reply(&request, None);
                }
                Err(e) => {
                    warn!(%user, error = %e, "password change failed");
                    fail(&request, StanzaErrorCondition::InternalServerError);
                }
            }
        }
        Job::RemoveAccount {
            request,
            requester,
            sessions,
        } => {
            // The account no longer exists in its shard, which drops stanzas routed to
            // it, so the answer goes straight to the session that asked.
            let answer = |reply: Option<Stanza>| {
                let (Some(reply), Some(session)) = (reply, &requester) else {
                    return;
                };
                let xml = Bytes::from(reply.to_xml());
                if cx
                    .router
                    .send_to_session(session, &xml, reply.kind, since)
                    .is_err()
                {
                    cx.router.metrics().mailbox_drop(Mailbox::Connection);
                }
            };
            match cx.storage.delete_user(key).await {
                Ok(_) => {
                    info!(%user, "account removed in-band");
                    answer(Some(request.iq_result(None)));
                    // XEP-0077 §3.2: the server closes the streams of the removed
                    // account, after the answer to the one that asked.
                    for s in sessions {
                        cx.router
                            .close_session(&s, StreamErrorCondition::NotAuthorized);
                    }
                }
                Err(e) => {
                    warn!(%user, error = %e, "account removal failed");
                    // The account was already cleared in memory; serve it as stored.
                    if cx
                        .router
                        .host_for(&user)
                        .try_send(Reload {
                            user: user.clone(),
                            attempts: 60,
                        })
                        .is_err()
                    {
                        cx.router.metrics().mailbox_drop(Mailbox::Shard);
                    }
                    answer(
                        request.error_reply(&StanzaError::new(
                            StanzaErrorCondition::InternalServerError,
                        )),
                    );
                }
            }
        }
    }
}

/// Hands stored messages to a session with a XEP-0203 delay stamp, then removes those
/// it accepted. A full mailbox stops the delivery; the rest stay stored for next time.
async fn deliver_offline(cx: &JobContext, user: &BareJid, session: &SessionHandle, since: Instant) {
    let messages = match cx.storage.offline.fetch(user.as_str()).await {
        Ok(m) => m,
        Err(e) => {
            warn!(%user, error = %e, "reading offline messages failed");
            return;
        }
    };
    let mut delivered = None;
    for m in &messages {
        let Some(stanza) = stamp_delay(&m.xml, m.stored_at_ms, cx.router.domain()) else {
            warn!(%user, seq = m.seq, "unreadable offline message skipped");
            delivered = Some(m.seq);
            continue;
        };
        let xml = Bytes::from(stanza.to_xml());
        if cx
            .router
            .send_to_session(session, &xml, stanza.kind, since)
            .is_err()
        {
            cx.router.metrics().mailbox_drop(Mailbox::Connection);
            break;
        }
        delivered = Some(m.seq);
    }
    if let Some(seq) = delivered
        && let Err(e) = cx.storage.offline.remove_through(user.as_str(), seq).await
    {
        warn!(%user, error = %e, "removing delivered offline messages failed");
    }
}

/// The stored message with `<delay xmlns='urn:xmpp:delay' from='domain' stamp='…'/>`.
fn stamp_delay(xml: &str, stored_at_ms: u64, domain: &BareJid) -> Option<Stanza> {
    let Ok(TopLevel::Stanza(mut st)) =
        parse_top_level(&Bytes::copy_from_slice(xml.as_bytes()), NsContext::CLIENT)
    else {
        return None;
    };
    if !matches!(st.kind, Kind::Message(_)) {
        return None;
    }
    let delay = Element::new("delay", ns::DELAY)
        .attr("from", domain.as_str())
        .attr("stamp", format_timestamp(stored_at_ms));
    let mut payload = String::from_utf8_lossy(&st.payload).into_owned();
    payload.push_str(&delay.to_xml(ns::CLIENT));
    st.payload = Bytes::from(payload);
    Some(st)
}

fn parse_element(xml: &str) -> Option<Element> {
    Element::parse(xml.as_bytes(), NsContext::CLIENT).ok()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// XEP-0082 date-time in UTC with milliseconds, e.g. `2026-11-22T05:30:00.123Z`.
pub fn format_timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use parking_lot::Mutex;

    use super::*;
    use crate::storage::MemoryStore;

    /// One user's operations run in order, one at a time, while another user's run
    /// alongside; a barrier waits for everything before it and holds back what follows.
    #[tokio::test]
    async fn queue_orders_per_user_and_runs_users_side_by_side() {
        let queue = StorageQueue::start(
            Storage::from_backend(Arc::new(MemoryStore::new())),
            crate::metrics::Metrics::new().storage_queue_depth(),
        );
        let log = Arc::new(Mutex::new(Vec::new()));
        let (a, b): (BareJid, BareJid) = ("a@x".parse().unwrap(), "b@x".parse().unwrap());
        let step = |name: &'static str, ms: u64| {
            let log = log.clone();
            async move {
                log.lock().push(format!("start {name}"));
                tokio::time::sleep(Duration::from_millis(ms)).await;
                log.lock().push(format!("end {name}"));
            }
        };
        queue.submit(&a, step("a1", 200));
        queue.submit(&a, step("a2", 0));
        queue.submit(&b, step("b1", 10));
        let (done, finished) = tokio::sync::oneshot::channel();
        queue.barrier(async move {
            let _ = done.send(());
        });
        queue.submit(&b, step("b2", 0));
        finished.await.unwrap();
        // The barrier ran after the first six entries; b2 may have started since.
        let at_barrier = log.lock().clone();
        assert_eq!(
            at_barrier[..6],
            [
                "start a1", "start b1", "end b1", "end a1", "start a2", "end a2"
            ],
            "b1 runs during a1, a2 waits for a1, b2 waits for the barrier"
        );
        for _ in 0..200 {
            if log.lock().len() == 8 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(log.lock()[6..], ["start b2", "end b2"]);
        assert!(!queue.is_congested());
    }

    #[test]
    fn timestamps_are_xep_0082() {
        assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_timestamp(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            format_timestamp(1_795_325_400_123),
            "2026-11-22T05:30:00.123Z"
        );
    }

    #[test]
    fn delay_is_appended() {
        let st = stamp_delay(
            "<message to='a@localhost' from='b@localhost/r' type='chat'><body>hi</body></message>",
            0,
            &BareJid::new("localhost").unwrap(),
        )
        .unwrap();
        assert_eq!(
            st.to_xml(),
            "<message to='a@localhost' from='b@localhost/r' type='chat'><body>hi</body><delay xmlns='urn:xmpp:delay' from='localhost' stamp='1970-01-01T00:00:00.000Z'/></message>"
        );
    }
}
