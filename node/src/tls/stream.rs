//! A server-side TLS stream that holds no buffer while its connection is idle.
//!
//! Most client connections sit idle most of the time, so what a connection keeps while
//! it waits decides how many fit in memory. A buffered `rustls` connection keeps a
//! 4 KiB receive buffer for its whole life; this stream drives rustls's unbuffered API
//! instead and owns the three buffers itself: received TLS bytes (`incoming`), TLS bytes
//! to send (`outgoing`) and decrypted bytes not yet read (`plaintext`). Each is
//! allocated when there is something to put in it and freed as soon as it is empty; the
//! receive buffer is only reserved once the socket is readable.
//!
//! Handshake records, post-handshake messages and alerts are queued in `outgoing` in
//! order with application data and go out with the next flush; a read also sends them
//! if the socket takes them at once.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::ServerConnectionData;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes reserved for one socket read.
const READ_SIZE: usize = 4096;

/// The most received bytes kept while waiting for the rest of a record or of a
/// handshake message (rustls accepts handshake messages up to 64 KiB).
const MAX_INCOMING: usize = 80 * 1024;

/// Encrypted bytes waiting to be sent beyond which a write first flushes.
const WRITE_HIGH_WATER: usize = 64 * 1024;

/// Per-record overhead estimate for TLS 1.3 (header, content type, AEAD tag); a record
/// carries at most 16 KiB of plaintext. Too small an estimate only costs a retry.
const RECORD_OVERHEAD: usize = 5 + 1 + 16;
const RECORD_PAYLOAD: usize = 16 * 1024;

/// A TLS server connection over a TCP stream.
pub struct ServerStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
    /// Bytes at the front of `outgoing` already sent.
    sent: usize,
    plaintext: Vec<u8>,
    /// Bytes at the front of `plaintext` already read.
    taken: usize,
    /// The peer sent close_notify or closed the socket: no more application data.
    peer_closed: bool,
    close_queued: bool,
}

/// Where the connection's state machine stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Handshake complete and nothing left to process.
    Idle,
    /// The handshake needs more bytes from the peer.
    NeedInput,
    /// Both sides have closed.
    Closed,
}

/// What to send once the connection may send application data.
#[derive(Clone, Copy)]
enum Out<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Runs the TLS handshake on `tcp` as a server.
pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<ServerStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
    let mut stream = ServerStream {
        tcp,
        conn,
        incoming: Vec::new(),
        outgoing: Vec::new(),
        sent: 0,
        plaintext: Vec::new(),
        taken: 0,
        peer_closed: false,
        close_queued: false,
    };
    loop {
        let step = match stream.process(Out::Nothing) {
            Ok(step) => step,
            Err(e) => {
                // The fatal alert goes out if the socket takes it now.
                let _ = stream.send_now();
                return Err(e);
            }
        };
        poll_fn(|cx| stream.poll_send(cx)).await?;
        match step {
            Step::Idle => return Ok(stream),
            Step::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
            Step::NeedInput => {
                if poll_fn(|cx| stream.poll_fill(cx)).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
}

impl ServerStream {
    /// The negotiated ALPN protocol, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The certificate chain the peer presented (end entity first), if it was asked
    /// for one and sent one.
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Runs rustls over the received bytes until it needs input or has nothing left to
    /// do: handshake records and alerts go to `outgoing`, application data to
    /// `plaintext`, and `out` is encrypted into `outgoing` once that is allowed. After
    /// an error, the fatal alert rustls prepared is in `outgoing`.
    fn process(&mut self, out: Out<'_>) -> io::Result<Step> {
        self.run(out).inspect_err(|_| {
            // The connection is dead: drop what was received (feeding it again would
            // fail again) and let rustls encode its alert.
            self.incoming = Vec::new();
            let _ = self.run(Out::Nothing);
        })
    }

    fn run(&mut self, mut out: Out<'_>) -> io::Result<Step> {
        loop {
            let Self {
                conn,
                incoming,
                outgoing,
                plaintext,
                peer_closed,
                ..
            } = self;
            let UnbufferedStatus { discard, state } = conn.process_tls_records(incoming);
            let result = match state {
                Err(e) => Err(invalid_data(e)),
                Ok(state) => on_state(state, outgoing, plaintext, peer_closed, &mut out),
            };
            incoming.drain(..discard);
            if incoming.is_empty() {
                *incoming = Vec::new();
            }
            if let Some(step) = result? {
                return Ok(step);
            }
        }
    }

    /// Reads what the socket has into `incoming`, reserving room only once it is
    /// readable. `Ok(0)` is end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(invalid_data(
                "TLS record or handshake message too large",
            )));
        }
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            self.incoming.reserve(READ_SIZE);
            match self.tcp.try_read_buf(&mut self.incoming) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.incoming.is_empty() {
                        self.incoming = Vec::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Sends everything in `outgoing`, then frees it.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Sends what the socket takes without waiting.
    fn send_now(&mut self) -> io::Result<()> {
        while self.sent < self.outgoing.len() {
            match self.tcp.try_write(&self.outgoing[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Ok(())
    }
}

/// Handles one state of the connection; `Some` ends [`ServerStream::process`].
fn on_state(
    state: ConnectionState<'_, '_, ServerConnectionData>,
    outgoing: &mut Vec<u8>,
    plaintext: &mut Vec<u8>,
    peer_closed: &mut bool,
    out: &mut Out<'_>,
) -> io::Result<Option<Step>> {
    match state {
        ConnectionState::ReadTraffic(mut traffic) => {
            while let Some(record) = traffic.next_record() {
                plaintext.extend_from_slice(record.map_err(invalid_data)?.payload);
            }
        }
        // Early data is not enabled in the server configuration; should a peer's
        // records arrive as such anyway, they are read like any other.
        ConnectionState::ReadEarlyData(mut early) => {
            while let Some(record) = early.next_record() {
                plaintext.extend_from_slice(record.map_err(invalid_data)?.payload);
            }
        }
        ConnectionState::EncodeTlsData(mut encode) => {
            append(outgoing, 1024, |buf| {
                encode.encode(buf).map_err(|e| match e {
                    EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                        Some(required_size)
                    }
                    EncodeError::AlreadyEncoded => None,
                })
            })?;
        }
        // Encoded records are already queued in order in `outgoing`.
        ConnectionState::TransmitTlsData(transmit) => transmit.done(),
        ConnectionState::BlockedHandshake => return Ok(Some(Step::NeedInput)),
        ConnectionState::PeerClosed => *peer_closed = true,
        ConnectionState::Closed => {
            *peer_closed = true;
            return Ok(Some(Step::Closed));
        }
        ConnectionState::WriteTraffic(mut traffic) => {
            match std::mem::replace(out, Out::Nothing) {
                Out::Nothing => {}
                Out::Data(data) => {
                    let estimate = data.len() + (data.len() / RECORD_PAYLOAD + 1) * RECORD_OVERHEAD;
                    append(outgoing, estimate, |buf| {
                        traffic.encrypt(data, buf).map_err(encrypt_size)
                    })?;
                }
                Out::CloseNotify => {
                    append(outgoing, 64, |buf| {
                        traffic.queue_close_notify(buf).map_err(encrypt_size)
                    })?;
                }
            }
            return Ok(Some(Step::Idle));
        }
        _ => return Err(invalid_data("unexpected TLS connection state")),
    }
    Ok(None)
}

fn encrypt_size(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(required_size)
        }
        _ => None,
    }
}

/// Appends what `write` produces to `out`: it is first given `estimate` bytes of room,
/// and if it answers that it needs more (`Err(Some(n))`), exactly that.
fn append(
    out: &mut Vec<u8>,
    estimate: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = estimate;
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Some(required)) if required > room => room = required,
            Err(_) => {
                out.truncate(start);
                return Err(io::Error::other("TLS record encoding failed"));
            }
        }
    }
}

fn invalid_data(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.plaintext.len() {
                let n = buf.remaining().min(this.plaintext.len() - this.taken);
                buf.put_slice(&this.plaintext[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.plaintext.len() {
                    this.plaintext = Vec::new();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if ready!(this.poll_fill(cx))? == 0 {
                if !this.incoming.is_empty() {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                // A peer that closes without close_notify ends the stream the same way:
                // XMPP frames its own end (`</stream:stream>`).
                this.peer_closed = true;
                continue;
            }
            let result = this.process(Out::Nothing);
            // Post-handshake messages and alerts go out now if the socket takes them.
            this.send_now()?;
            result?;
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.outgoing.len() - this.sent >= WRITE_HIGH_WATER {
            ready!(this.poll_send(cx))?;
        }
        if this.close_queued {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        match this.process(Out::Data(buf))? {
            Step::Idle => Poll::Ready(Ok(buf.len())),
            Step::NeedInput | Step::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            this.close_queued = true;
            // A connection that is already closed has nothing more to say.
            let _ = this.process(Out::CloseNotify);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::tls::test_support::{pair, serve_once};

    fn name() -> ServerName<'static> {
        ServerName::try_from("example.org").unwrap()
    }

    /// Many records each way, read in pieces smaller than a record and written in
    /// pieces larger than one, arrive intact and in order.
    #[tokio::test]
    async fn bulk_data_both_ways_in_odd_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let (config, connector) = pair(dir.path(), "example.org");
        let (addr, server) = serve_once(config, |mut tls| async move {
            let mut got = vec![0u8; 100_000];
            for chunk in got.chunks_mut(7) {
                tls.read_exact(chunk).await.unwrap();
            }
            for chunk in got.chunks(40_000) {
                tls.write_all(chunk).await.unwrap();
            }
            tls.shutdown().await.unwrap();
        })
        .await;
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut tls = connector
            .connect(name(), TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        tls.write_all(&data).await.unwrap();
        tls.flush().await.unwrap();
        let mut echoed = Vec::new();
        tls.read_to_end(&mut echoed).await.unwrap();
        assert!(echoed == data, "echo differs");
        server.await.unwrap();
    }

    /// Once what arrived has been read and what was written has been sent, the stream
    /// holds no buffer.
    #[tokio::test]
    async fn an_idle_stream_holds_no_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let (config, connector) = pair(dir.path(), "example.org");
        let (addr, server) = serve_once(config, |mut tls| async move {
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(b"pong").await.unwrap();
            tls.flush().await.unwrap();
            assert_eq!(
                (
                    tls.incoming.capacity(),
                    tls.outgoing.capacity(),
                    tls.plaintext.capacity()
                ),
                (0, 0, 0)
            );
            // The client's close_notify is the end of the stream.
            assert_eq!(tls.read(&mut buf).await.unwrap(), 0);
        })
        .await;
        let mut tls = connector
            .connect(name(), TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
        tls.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        tls.shutdown().await.unwrap();
        server.await.unwrap();
    }

    /// Sends `first` to a TLS server, then (unless `stay`) closes; the server's error.
    async fn failed_handshake(first: &[u8], stay: bool) -> (io::Error, TcpStream) {
        let dir = tempfile::tempdir().unwrap();
        let (config, _) = pair(dir.path(), "example.org");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(config, tcp).await.map(drop)
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(first).await.unwrap();
        if !stay {
            tcp.shutdown().await.unwrap();
        }
        (server.await.unwrap().unwrap_err(), tcp)
    }

    /// A peer speaking plaintext instead of TLS fails the handshake with a fatal alert.
    #[tokio::test]
    async fn plaintext_instead_of_a_client_hello_is_refused() {
        let (err, mut tcp) = failed_handshake(
            b"<?xml version='1.0'?><stream:stream to='example.org'>",
            true,
        )
        .await;
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let mut reply = Vec::new();
        tcp.read_to_end(&mut reply).await.unwrap();
        // A TLS alert record: content type 21.
        assert_eq!(reply.first(), Some(&21), "{reply:?}");
    }

    /// A handshake cut short by the peer is an error, not a stream.
    #[tokio::test]
    async fn a_peer_leaving_mid_handshake_is_an_error() {
        // The first bytes of a TLS handshake record, then nothing.
        let (err, _) = failed_handshake(&[22, 3, 1, 0, 200, 1], false).await;
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }
}
