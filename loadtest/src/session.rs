//! Established sessions at run time: one reader task per session that accounts for
//! every probe message it receives and answers server pings, and open-loop sender
//! tasks that write a [`Schedule`] of probe messages.
//!
//! The reader owns the read half and its per-phase bookkeeping; the controller asks it
//! for a phase's results over a channel, so no lock is taken per message. The write half
//! is shared behind an async mutex by the sender of the current phase and the reader's
//! ping answers (both rare contenders on one session).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use shoal_xmpp::framer::{Frame, Framer};
use shoal_xmpp::ns;
use shoal_xmpp::stanza::{IqType, Kind, MessageType, TopLevel, parse_top_level};
use shoal_xmpp::xml::{NsContext, escape};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::conn::{Established, Io};
use crate::schedule::{Arrival, FlowTracker, Probe, Schedule, latency};
use crate::stats::Latency;

/// Run-wide counters, for the progress line and for early completion checks.
#[derive(Debug, Default)]
pub struct Counters {
    pub logins_started: AtomicU64,
    pub logins_ok: AtomicU64,
    pub logins_failed: AtomicU64,
    pub sessions_open: AtomicU64,
    pub disconnected: AtomicU64,
    pub sent: AtomicU64,
    /// Distinct probe messages received in their own phase.
    pub received: AtomicU64,
    pub duplicated: AtomicU64,
    /// Probe messages that arrived after their phase had been collected.
    pub late: AtomicU64,
}

/// What one receiver saw in one phase.
#[derive(Debug, Default)]
pub struct PhaseReceived {
    /// One tracker per sender that reached this receiver.
    pub flows: Vec<(u32, FlowTracker)>,
    pub latency: Latency,
}

impl PhaseReceived {
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

struct Collect {
    phase: u32,
    reply: oneshot::Sender<PhaseReceived>,
}

type Writer = Arc<Mutex<WriteHalf<Box<dyn Io>>>>;

/// A running session.
pub struct Live {
    pub index: usize,
    pub jid: String,
    writer: Writer,
    control: mpsc::Sender<Collect>,
    reader: JoinHandle<()>,
}

impl Live {
    /// Starts the reader task. `epoch` is the run's time origin that probe timestamps
    /// are relative to.
    pub fn start(est: Established, epoch: Instant, counters: Arc<Counters>) -> Live {
        let (read, write) = tokio::io::split(est.io);
        let writer: Writer = Arc::new(Mutex::new(write));
        // One outstanding request at a time is all the controller ever makes.
        let (control, requests) = mpsc::channel(1);
        let reader = tokio::spawn(read_loop(
            Reader {
                read,
                framer: est.framer,
                buf: est.buf,
                writer: writer.clone(),
                epoch,
                counters,
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
        if self.control.send(Collect { phase, reply }).await.is_err() {
            return PhaseReceived::default();
        }
        answer.await.unwrap_or_default()
    }

    pub async fn send(&self, data: &[u8]) -> std::io::Result<()> {
        write(&self.writer, data).await
    }

    /// A clone of the write half, for a sender task.
    pub fn writer(&self) -> Writer {
        self.writer.clone()
    }

    /// Stops the reader, then closes the stream politely. The reader goes first so the
    /// server's answering close is not counted as a disconnection.
    pub async fn close(self) {
        drop(self.control);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.reader).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut w = self.writer.lock().await;
            let _ = w.write_all(b"</stream:stream>").await;
            let _ = w.shutdown().await;
        })
        .await;
    }
}

async fn write(writer: &Writer, data: &[u8]) -> std::io::Result<()> {
    let mut w = writer.lock().await;
    w.write_all(data).await?;
    w.flush().await
}

struct Reader {
    read: ReadHalf<Box<dyn Io>>,
    framer: Framer,
    buf: BytesMut,
    writer: Writer,
    epoch: Instant,
    counters: Arc<Counters>,
}

async fn read_loop(mut r: Reader, mut requests: mpsc::Receiver<Collect>) {
    let mut phase = 0u32;
    let mut current = PhaseReceived::default();
    let mut open = true;
    r.counters.sessions_open.fetch_add(1, Ordering::Relaxed);
    loop {
        while open {
            match r.framer.next_frame(&mut r.buf) {
                Ok(Some(frame)) => {
                    if !r.on_frame(frame, phase, &mut current).await {
                        open = false;
                    }
                }
                Ok(None) => break,
                Err(_) => open = false,
            }
            if !open {
                r.counters.sessions_open.fetch_sub(1, Ordering::Relaxed);
                r.counters.disconnected.fetch_add(1, Ordering::Relaxed);
            }
        }
        r.buf.reserve(8192);
        tokio::select! {
            request = requests.recv() => match request {
                Some(Collect { phase: p, reply }) => {
                    let done = if p == phase { std::mem::take(&mut current) } else { PhaseReceived::default() };
                    phase = p + 1;
                    let _ = reply.send(done);
                }
                None => break,
            },
            n = r.read.read_buf(&mut r.buf), if open => {
                if !matches!(n, Ok(n) if n > 0) {
                    open = false;
                    r.counters.sessions_open.fetch_sub(1, Ordering::Relaxed);
                    r.counters.disconnected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    if open {
        r.counters.sessions_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Reader {
    /// Handles one frame; `false` when the stream is over.
    async fn on_frame(&mut self, frame: Frame, phase: u32, current: &mut PhaseReceived) -> bool {
        let bytes = match frame {
            Frame::Element(b) => b,
            Frame::Whitespace | Frame::StreamOpen(_) => return true,
            Frame::StreamClose => return false,
        };
        let Ok(top) = parse_top_level(&bytes, NsContext::CLIENT) else {
            return true; // a stanza the strict parser refuses is not one of ours
        };
        let stanza = match top {
            TopLevel::Stanza(s) => s,
            TopLevel::Nonza(e) => return !e.is("error", ns::STREAM),
        };
        match stanza.kind {
            Kind::Message(t) if t != MessageType::Error => {
                let Some(probe) = body(&stanza.payload).and_then(Probe::decode) else {
                    return true;
                };
                if probe.phase != phase {
                    // An earlier phase was already collected (a later one cannot have
                    // started before this phase was collected).
                    self.counters.late.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                let arrived = self.epoch.elapsed();
                match current.flow(probe.sender).record(probe.seq) {
                    Arrival::InOrder | Arrival::OutOfOrder => {
                        current
                            .latency
                            .record(latency(Duration::from_micros(probe.scheduled_us), arrived));
                        self.counters.received.fetch_add(1, Ordering::Relaxed);
                    }
                    Arrival::Duplicate => {
                        self.counters.duplicated.fetch_add(1, Ordering::Relaxed);
                    }
                    Arrival::Bogus => {}
                }
            }
            Kind::Iq(IqType::Get | IqType::Set) => {
                // Answer pings (servers use them to find dead clients); refuse the rest
                // as a simple client would.
                let id = escape(stanza.id.as_deref().unwrap_or(""));
                let to = stanza
                    .from
                    .as_ref()
                    .map(|j| format!(" to='{}'", escape(&j.to_string())))
                    .unwrap_or_default();
                let is_ping = stanza
                    .iq_payload()
                    .ok()
                    .flatten()
                    .is_some_and(|p| p.is("ping", ns::PING));
                let reply = if is_ping {
                    format!("<iq type='result' id='{id}'{to}/>")
                } else {
                    format!(
                        "<iq type='error' id='{id}'{to}><error type='cancel'><service-unavailable xmlns='{}'/></error></iq>",
                        ns::STANZA_ERRORS
                    )
                };
                if write(&self.writer, reply.as_bytes()).await.is_err() {
                    return false;
                }
            }
            _ => {}
        }
        true
    }
}

/// The text of the first `<body>` in a message payload (probe bodies need no
/// unescaping: digits, letters and spaces only).
fn body(payload: &[u8]) -> Option<&[u8]> {
    let start = find(payload, b"<body")?;
    let open_end = start + payload[start..].iter().position(|&b| b == b'>')?;
    if payload[open_end - 1] == b'/' {
        return None;
    }
    let text_start = open_end + 1;
    let len = find(&payload[text_start..], b"</body>")?;
    Some(&payload[text_start..text_start + len])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One sender's part of a chat phase.
pub struct SendPlan {
    pub writer: Writer,
    /// The bare JID messages go to.
    pub to: String,
    pub sender: u32,
    pub phase: u32,
    pub schedule: Schedule,
    pub size: usize,
    pub phase_start: Instant,
    pub epoch: Instant,
}

/// Sends `plan`'s messages at their scheduled times; returns how many were written.
/// Whatever is due when the task wakes goes out in one write, each message stamped with
/// its own scheduled time, so a stall delays the messages without thinning them out.
pub async fn send_phase(plan: SendPlan, counters: Arc<Counters>) -> u64 {
    let to = escape(&plan.to);
    let base = plan.phase_start.duration_since(plan.epoch);
    let mut next = 0;
    let mut out = String::new();
    while let Some(due) = plan.schedule.next_due(next) {
        tokio::time::sleep_until(plan.phase_start + due).await;
        let batch = plan.schedule.due(next, plan.phase_start.elapsed());
        out.clear();
        for seq in batch.clone() {
            out.push_str("<message to='");
            out.push_str(&to);
            out.push_str("' type='chat'><body>");
            Probe {
                phase: plan.phase,
                sender: plan.sender,
                seq,
                scheduled_us: (base + plan.schedule.due_at(seq)).as_micros() as u64,
            }
            .encode(plan.size, &mut out);
            out.push_str("</body></message>");
        }
        if write(&plan.writer, out.as_bytes()).await.is_err() {
            break;
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
    fn finds_bodies() {
        assert_eq!(body(b"<body>abc</body>"), Some(&b"abc"[..]));
        assert_eq!(
            body(b"<thread>t</thread><body xml:lang='en'>x y</body><x/>"),
            Some(&b"x y"[..])
        );
        assert_eq!(body(b"<body/>"), None);
        assert_eq!(body(b"<subject>s</subject>"), None);
    }
}
