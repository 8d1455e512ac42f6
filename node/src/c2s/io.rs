//! Socket plumbing for client connections: the transport (plain or TLS), the bounded
//! outbound queue with its writer task, and the shaped reader task.
//!
//! Nothing here understands XMPP. The writer enforces the outbound bound: bytes queued
//! but not yet accepted by the socket are counted, and a session whose count passes the
//! limit is told to drop the client instead of buffering more (DESIGN.md invariant 4).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;

use crate::ratelimit::TokenBucket;

/// A client socket, before or after TLS.
pub type Transport = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// How long a closing connection may take to flush what is queued for it.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes read per socket read.
const READ_CHUNK: usize = 4096;

/// Why an enqueue was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueFull {
    /// More than the configured bound is waiting for a client that does not read.
    OverLimit,
    /// The writer has stopped (socket error).
    Closed,
}

/// The sending side of a connection's outbound queue.
pub struct Outbound {
    tx: mpsc::UnboundedSender<Bytes>,
    /// Bytes queued and not yet written to the socket.
    pending: Arc<AtomicUsize>,
    limit: usize,
    writer: tokio::task::JoinHandle<()>,
}

impl Outbound {
    /// Starts the writer task for `write`. The channel is unbounded in messages but
    /// bounded in bytes by `limit`, checked on every enqueue.
    pub fn start<W>(write: W, limit: usize) -> Self
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn(write_loop(write, rx, pending.clone()));
        Self {
            tx,
            pending,
            limit,
            writer,
        }
    }

    pub fn send(&self, bytes: Bytes) -> Result<(), QueueFull> {
        let len = bytes.len();
        let before = self.pending.fetch_add(len, Ordering::AcqRel);
        if before + len > self.limit {
            self.pending.fetch_sub(len, Ordering::AcqRel);
            return Err(QueueFull::OverLimit);
        }
        self.tx.send(bytes).map_err(|_| QueueFull::Closed)
    }

    /// Flushes what is queued (bounded by a timeout) and closes the socket.
    pub fn close(self) {
        drop(self.tx);
        let writer = self.writer;
        tokio::spawn(async move {
            let abort = writer.abort_handle();
            if tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, writer)
                .await
                .is_err()
            {
                abort.abort();
            }
        });
    }

    /// Drops the socket at once without flushing (slow consumer).
    pub fn abort(self) {
        self.writer.abort();
    }
}

async fn write_loop<W>(
    mut write: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    pending: Arc<AtomicUsize>,
) where
    W: AsyncWrite + Unpin,
{
    let mut batch = Vec::with_capacity(32);
    loop {
        if rx.recv_many(&mut batch, 64).await == 0 {
            break;
        }
        // Coalesce what arrived together into one write.
        let total: usize = batch.iter().map(Bytes::len).sum();
        let result = if batch.len() == 1 {
            write.write_all(&batch[0]).await
        } else {
            let mut joined = BytesMut::with_capacity(total);
            batch.iter().for_each(|b| joined.extend_from_slice(b));
            write.write_all(&joined).await
        };
        batch.clear();
        pending.fetch_sub(total, Ordering::AcqRel);
        if result.is_err() || write.flush().await.is_err() {
            return;
        }
    }
    let _ = write.shutdown().await;
}

/// Reads from `read` until EOF or error, handing each chunk to `deliver`, which awaits
/// the session's mailbox (input back-pressure). With a rate, reads are paced by a token
/// bucket (per-connection traffic shaping).
pub async fn read_loop<R, F, Fut>(mut read: R, shaping: Option<(u64, u64)>, mut deliver: F)
where
    R: AsyncRead + Unpin,
    F: FnMut(Option<Bytes>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut bucket =
        shaping.map(|(rate, burst)| TokenBucket::new(rate as f64, burst as f64, Instant::now()));
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(READ_CHUNK);
        let n = match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !deliver(Some(buf.split().freeze())).await {
            return;
        }
        if let Some(bucket) = bucket.as_mut() {
            let delay = bucket.delay_for(n as f64, Instant::now());
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
    }
    deliver(None).await;
}

/// Splits a transport for the reader and writer tasks.
pub fn split(t: Transport) -> (ReadHalf<Transport>, WriteHalf<Transport>) {
    tokio::io::split(t)
}

/// Writes everything, for the negotiation phase where the connection has one task.
pub async fn write_now(t: &mut Transport, s: &str) -> io::Result<()> {
    t.write_all(s.as_bytes()).await?;
    t.flush().await
}
