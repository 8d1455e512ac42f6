//! Socket plumbing for client connections: the transport (plain or TLS), the bounded
//! outbound queue with its writer task, and the shaped reader task.
//!
//! Nothing here understands XMPP. The writer enforces the outbound bound: bytes queued
//! but not yet accepted by the socket are counted, and a session whose count passes the
//! limit is told to drop the client instead of buffering more (DESIGN.md invariant 4).
//!
//! Idle connections are the common case, so neither side keeps a buffer while it waits:
//! the outbound queue is one byte buffer that the writer takes whole (nothing is
//! allocated while it is empty), and the reader sizes each read from the last one, so an
//! idle connection holds a small read buffer rather than a full chunk.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::either::Either;

use crate::ratelimit::TokenBucket;

/// A client socket, before or after TLS.
pub type Transport = Either<TcpStream, Box<crate::tls::ServerStream>>;

/// How long a closing connection may take to flush what is queued for it.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The smallest and largest read buffers. A read that fills its buffer doubles the next
/// one; a read that uses less than a quarter halves it.
const READ_MIN: usize = 512;
const READ_MAX: usize = 16 * 1024;

/// Why an enqueue was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueFull {
    /// More than the configured bound is waiting for a client that does not read.
    OverLimit,
    /// The writer has stopped (socket error).
    Closed,
}

/// What the session and the writer task share.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    /// Wakes the writer: bytes were queued, or the queue was closed.
    wake: Notify,
}

#[derive(Default)]
struct QueueState {
    /// Bytes queued for the writer, coalesced.
    queued: BytesMut,
    /// Bytes the writer took and has not finished writing.
    in_flight: usize,
    /// No more bytes will be queued: flush and shut the socket down.
    closing: bool,
    /// The writer stopped (socket error); enqueues are refused.
    dead: bool,
}

/// The sending side of a connection's outbound queue.
pub struct Outbound {
    queue: Arc<Queue>,
    limit: usize,
    writer: tokio::task::JoinHandle<()>,
}

impl Outbound {
    /// Starts the writer task for `write`. The queue is bounded in bytes by `limit`,
    /// checked on every enqueue against what is queued plus what is being written.
    pub fn start<W>(write: W, limit: usize) -> Self
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let queue = Arc::new(Queue::default());
        let writer = tokio::spawn(write_loop(write, queue.clone()));
        Self {
            queue,
            limit,
            writer,
        }
    }

    pub fn send(&self, bytes: &[u8]) -> Result<(), QueueFull> {
        {
            let mut state = self.queue.state.lock();
            if state.dead {
                return Err(QueueFull::Closed);
            }
            if state.queued.len() + state.in_flight + bytes.len() > self.limit {
                return Err(QueueFull::OverLimit);
            }
            state.queued.extend_from_slice(bytes);
        }
        self.queue.wake.notify_one();
        Ok(())
    }

    /// Flushes what is queued (bounded by a timeout) and closes the socket.
    pub fn close(self) {
        self.queue.state.lock().closing = true;
        self.queue.wake.notify_one();
        let writer = self.writer;
        // A session stopped while its worker shuts down has no runtime left to flush
        // on: the socket is dropped.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return writer.abort();
        };
        runtime.spawn(async move {
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

/// Writes whatever is queued in one write per wake-up, until the queue is closed and
/// drained (then shuts the socket down) or the socket fails.
async fn write_loop<W>(mut write: W, queue: Arc<Queue>)
where
    W: AsyncWrite + Unpin,
{
    loop {
        let (batch, closing) = {
            let mut state = queue.state.lock();
            let batch = std::mem::take(&mut state.queued);
            state.in_flight = batch.len();
            (batch, state.closing)
        };
        if batch.is_empty() {
            if closing {
                break;
            }
            queue.wake.notified().await;
            continue;
        }
        let result = match write.write_all(&batch).await {
            Ok(()) => write.flush().await,
            Err(e) => Err(e),
        };
        // The batch is dropped here, before the next wait: nothing is held while idle.
        drop(batch);
        let mut state = queue.state.lock();
        state.in_flight = 0;
        if result.is_err() {
            state.dead = true;
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
    let mut size = READ_MIN;
    loop {
        let mut buf = BytesMut::with_capacity(size);
        let n = match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        size = next_read_size(size, n);
        // The whole buffer goes to the session, which frees it once it is consumed.
        if !deliver(Some(buf.freeze())).await {
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

/// The next read's buffer size after a read of `n` bytes into `size`.
fn next_read_size(size: usize, n: usize) -> usize {
    if n >= size {
        (size * 2).min(READ_MAX)
    } else if n < size / 4 {
        (size / 2).max(READ_MIN)
    } else {
        size
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_size_follows_the_traffic() {
        assert_eq!(next_read_size(READ_MIN, READ_MIN), 2 * READ_MIN);
        assert_eq!(next_read_size(READ_MAX, READ_MAX), READ_MAX);
        assert_eq!(next_read_size(4096, 100), 2048);
        assert_eq!(next_read_size(READ_MIN, 1), READ_MIN);
        assert_eq!(next_read_size(4096, 2000), 4096);
    }

    /// Everything queued reaches the socket in order, the bound counts bytes not yet
    /// written, and close flushes before shutting down.
    #[tokio::test]
    async fn queue_bounds_bytes_and_flushes_on_close() {
        let (client, mut server) = tokio::io::duplex(64);
        let out = Outbound::start(client, 100);
        out.send(b"hello ").unwrap();
        out.send(b"world").unwrap();
        assert_eq!(out.send(&[b'x'; 100]), Err(QueueFull::OverLimit));
        out.close();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
    }

    /// A peer that stops reading leaves bytes in flight; they count against the bound.
    #[tokio::test]
    async fn bytes_in_flight_count_against_the_bound() {
        let (client, _server) = tokio::io::duplex(8);
        let out = Outbound::start(client, 64);
        out.send(&[b'a'; 40]).unwrap();
        tokio::task::yield_now().await;
        // The writer took the 40 bytes and is stuck after 8 of them.
        assert_eq!(out.send(&[b'b'; 20]), Ok(()));
        assert_eq!(out.send(&[b'c'; 10]), Err(QueueFull::OverLimit));
        out.abort();
    }

    /// A failed socket makes later enqueues fail as closed.
    #[tokio::test]
    async fn a_dead_writer_refuses_bytes() {
        let (client, server) = tokio::io::duplex(8);
        drop(server);
        let out = Outbound::start(client, 64);
        out.send(b"lost").unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(out.send(b"more"), Err(QueueFull::Closed));
    }
}
