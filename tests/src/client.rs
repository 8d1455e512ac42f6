//! A small XMPP client for tests, built on the same framer and parsers as the server
//! (`shoal-xmpp`), speaking over real TCP and TLS. Every wait has a timeout so a test
//! fails instead of hanging.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{Bytes, BytesMut};
use jid::FullJid;
use rustls::pki_types::ServerName;
use shoal_xmpp::framer::{Frame, Framer, FramerLimits};
use shoal_xmpp::ns;
use shoal_xmpp::sasl::{ScramClient, ScramHash, plain_initial_response};
use shoal_xmpp::stanza::{Stanza, StanzaParseError, TopLevel, parse_top_level};
use shoal_xmpp::stream::initial_header;
use shoal_xmpp::xml::{Element, NsContext};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

/// How long any single wait may take.
pub const WAIT: Duration = Duration::from_secs(10);

type Transport = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// Something the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A stream header (start tag bytes).
    Header(String),
    Stanza(Stanza),
    /// A nonza (features, SASL, stream errors appear as `error` in the streams ns), or
    /// a stanza the strict stanza parser refuses, such as the id-less error a server
    /// sends in answer to an iq without `id`.
    Element(Element),
    /// `</stream:stream>`.
    StreamClose,
    /// The socket closed.
    Eof,
}

impl Received {
    /// The stream error condition, if this is a `<stream:error/>`.
    pub fn stream_error(&self) -> Option<String> {
        match self {
            Received::Element(e) if e.is("error", ns::STREAM) => e
                .elements()
                .find(|c| c.ns == ns::STREAM_ERRORS && c.name != "text")
                .map(|c| c.name.clone()),
            _ => None,
        }
    }
}

pub struct Client {
    transport: Option<Transport>,
    framer: Framer,
    buf: BytesMut,
    domain: String,
    /// The bound JID after [`Client::bind`].
    pub jid: Option<FullJid>,
}

impl Client {
    /// Opens a plain TCP connection (STARTTLS comes later).
    pub async fn connect(addr: SocketAddr, domain: &str) -> anyhow::Result<Client> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(Self::with_transport(Either::Left(tcp), domain))
    }

    /// Opens a plain TCP connection from a chosen local address (any `127.x.y.z` works
    /// on Linux loopback), so a test can appear as a different client address.
    pub async fn connect_from(
        addr: SocketAddr,
        domain: &str,
        local: IpAddr,
    ) -> anyhow::Result<Client> {
        let tcp = tcp_from(addr, local).await?;
        Ok(Self::with_transport(Either::Left(tcp), domain))
    }

    /// Opens a direct TLS connection (XEP-0368) trusting `cert`.
    pub async fn connect_direct_tls(
        addr: SocketAddr,
        domain: &str,
        cert: &Path,
    ) -> anyhow::Result<Client> {
        let tcp = TcpStream::connect(addr).await?;
        Self::direct_tls_over(tcp, domain, cert).await
    }

    /// [`Client::connect_direct_tls`] from a chosen local address, like
    /// [`Client::connect_from`].
    pub async fn connect_direct_tls_from(
        addr: SocketAddr,
        domain: &str,
        cert: &Path,
        local: IpAddr,
    ) -> anyhow::Result<Client> {
        let tcp = tcp_from(addr, local).await?;
        Self::direct_tls_over(tcp, domain, cert).await
    }

    async fn direct_tls_over(tcp: TcpStream, domain: &str, cert: &Path) -> anyhow::Result<Client> {
        let tls = connector(cert)?
            .connect(ServerName::try_from(domain.to_string())?, tcp)
            .await?;
        Ok(Self::with_transport(Either::Right(Box::new(tls)), domain))
    }

    /// This end's address (the source address the server sees without a proxy).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        let tcp = match self.transport.as_ref().context("not connected")? {
            Either::Left(tcp) => tcp,
            Either::Right(tls) => tls.get_ref().0,
        };
        Ok(tcp.local_addr()?)
    }

    fn with_transport(t: Transport, domain: &str) -> Client {
        Client {
            transport: Some(t),
            framer: Framer::new(FramerLimits {
                max_stanza_size: 16 * 1024 * 1024,
                max_depth: 64,
            }),
            buf: BytesMut::new(),
            domain: domain.to_string(),
            jid: None,
        }
    }

    /// Logs in the usual way: STARTTLS, SCRAM-SHA-256, bind.
    pub async fn login(
        addr: SocketAddr,
        domain: &str,
        cert: &Path,
        user: &str,
        password: &str,
        resource: Option<&str>,
    ) -> anyhow::Result<Client> {
        let mut c = Client::connect(addr, domain).await?;
        c.negotiate(cert, user, password, resource).await?;
        Ok(c)
    }

    /// A SCRAM-SHA-256 attempt with a wrong password for `user` (after STARTTLS) on a
    /// new connection to `addr` from `from`, which must fail with `<not-authorized/>`.
    /// The connection is returned as the server left it.
    pub async fn wrong_password_from(
        addr: SocketAddr,
        domain: &str,
        cert: &Path,
        user: &str,
        from: IpAddr,
    ) -> anyhow::Result<Client> {
        let mut c = Client::connect_from(addr, domain, from).await?;
        c.open().await?;
        c.starttls(cert).await?;
        c.open().await?;
        match c.auth_scram(ScramHash::Sha256, user, "wrong").await {
            Err(e) if e.to_string() == "not-authorized" => Ok(c),
            other => bail!("expected <not-authorized/> for a wrong password, got {other:?}"),
        }
    }

    /// The rest of [`Client::login`] on a fresh plain connection: STARTTLS,
    /// SCRAM-SHA-256, bind.
    pub async fn negotiate(
        &mut self,
        cert: &Path,
        user: &str,
        password: &str,
        resource: Option<&str>,
    ) -> anyhow::Result<FullJid> {
        self.open().await?;
        self.starttls(cert).await?;
        self.open().await?;
        self.auth_scram(ScramHash::Sha256, user, password).await?;
        self.open().await?;
        self.bind(resource).await
    }

    pub async fn send_raw(&mut self, data: impl AsRef<[u8]>) -> anyhow::Result<()> {
        let t = self.transport.as_mut().context("not connected")?;
        t.write_all(data.as_ref()).await?;
        t.flush().await?;
        Ok(())
    }

    pub async fn send(&mut self, stanza_xml: &str) -> anyhow::Result<()> {
        self.send_raw(stanza_xml).await
    }

    /// Sends our header and returns the features element.
    pub async fn open(&mut self) -> anyhow::Result<Element> {
        self.framer.reset();
        self.send_raw(initial_header(ns::CLIENT, &self.domain))
            .await?;
        match self.recv().await? {
            Received::Header(_) => {}
            other => bail!("expected a stream header, got {other:?}"),
        }
        match self.recv().await? {
            Received::Element(e) if e.is("features", ns::STREAM) => Ok(e),
            other => bail!("expected stream features, got {other:?}"),
        }
    }

    pub async fn starttls(&mut self, cert: &Path) -> anyhow::Result<()> {
        self.send_raw(format!("<starttls xmlns='{}'/>", ns::TLS))
            .await?;
        match self.recv().await? {
            Received::Element(e) if e.is("proceed", ns::TLS) => {}
            other => bail!("expected <proceed/>, got {other:?}"),
        }
        let Some(Either::Left(tcp)) = self.transport.take() else {
            bail!("already TLS");
        };
        let tls = connector(cert)?
            .connect(ServerName::try_from(self.domain.clone())?, tcp)
            .await?;
        self.transport = Some(Either::Right(Box::new(tls)));
        self.buf.clear();
        Ok(())
    }

    /// SCRAM authentication; `Err` carries the SASL failure condition.
    pub async fn auth_scram(
        &mut self,
        hash: ScramHash,
        user: &str,
        password: &str,
    ) -> anyhow::Result<()> {
        let mech = match hash {
            ScramHash::Sha1 => "SCRAM-SHA-1",
            ScramHash::Sha256 => "SCRAM-SHA-256",
        };
        let mut scram = ScramClient::new(hash, user, password, "testclientnonce".into());
        self.send_raw(format!(
            "<auth xmlns='{}' mechanism='{mech}'>{}</auth>",
            ns::SASL,
            B64.encode(scram.client_first())
        ))
        .await?;
        let challenge = self.sasl_step("challenge").await?;
        let response = scram
            .handle_challenge(&challenge)
            .map_err(|e| anyhow!("{e}"))?;
        self.send_raw(format!(
            "<response xmlns='{}'>{}</response>",
            ns::SASL,
            B64.encode(response)
        ))
        .await?;
        let v = self.sasl_step("success").await?;
        scram.verify_success(&v).map_err(|e| anyhow!("{e}"))?;
        self.buf.clear();
        Ok(())
    }

    pub async fn auth_plain(&mut self, user: &str, password: &str) -> anyhow::Result<()> {
        self.send_raw(format!(
            "<auth xmlns='{}' mechanism='PLAIN'>{}</auth>",
            ns::SASL,
            B64.encode(plain_initial_response(user, password))
        ))
        .await?;
        self.sasl_step("success").await?;
        Ok(())
    }

    /// Waits for `<want/>` in the SASL namespace and returns its decoded payload; a
    /// `<failure/>` becomes an error whose message is the condition.
    async fn sasl_step(&mut self, want: &str) -> anyhow::Result<Vec<u8>> {
        match self.recv().await? {
            Received::Element(e) if e.is(want, ns::SASL) => {
                let text = e.text_content();
                Ok(if text.is_empty() || text == "=" {
                    Vec::new()
                } else {
                    B64.decode(text.trim())?
                })
            }
            Received::Element(e) if e.is("failure", ns::SASL) => {
                let cond = e.elements().next().map(|c| c.name.clone());
                Err(anyhow!(cond.unwrap_or_default()))
            }
            other => bail!("expected <{want}/>, got {other:?}"),
        }
    }

    /// Submits an in-band registration (XEP-0077) with iq id `id` and returns the
    /// server's answer, a result or an error iq.
    pub async fn register(
        &mut self,
        id: &str,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Stanza> {
        let query = Element::new("query", ns::REGISTER)
            .child(Element::new("username", ns::REGISTER).text(user))
            .child(Element::new("password", ns::REGISTER).text(password));
        self.send_raw(format!(
            "<iq type='set' id='{id}'>{}</iq>",
            query.to_xml(ns::CLIENT)
        ))
        .await?;
        self.recv_stanza().await
    }

    /// Binds a resource (server-chosen when `None`).
    pub async fn bind(&mut self, resource: Option<&str>) -> anyhow::Result<FullJid> {
        let inner = resource
            .map(|r| format!("<resource>{r}</resource>"))
            .unwrap_or_default();
        self.send_raw(format!(
            "<iq type='set' id='bind1'><bind xmlns='{}'>{inner}</bind></iq>",
            ns::BIND
        ))
        .await?;
        let st = self.recv_stanza().await?;
        let bind = st
            .iq_payload()?
            .filter(|b| b.is("bind", ns::BIND))
            .ok_or_else(|| anyhow!("bind failed: {}", st.to_xml()))?;
        let jid = FullJid::new(
            &bind
                .get_child("jid", ns::BIND)
                .context("no jid")?
                .text_content(),
        )?;
        self.jid = Some(jid.clone());
        Ok(jid)
    }

    /// The next thing the server sends.
    pub async fn recv(&mut self) -> anyhow::Result<Received> {
        tokio::time::timeout(WAIT, self.recv_inner())
            .await
            .map_err(|_| anyhow!("nothing received within {WAIT:?}"))?
    }

    /// Like `recv`, but `None` if nothing arrives within `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> anyhow::Result<Option<Received>> {
        match tokio::time::timeout(wait, self.recv_inner()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    async fn recv_inner(&mut self) -> anyhow::Result<Received> {
        recv_from(self.transport.as_mut(), &mut self.framer, &mut self.buf).await
    }

    /// The next stanza, skipping nothing: anything else is an error.
    pub async fn recv_stanza(&mut self) -> anyhow::Result<Stanza> {
        match self.recv().await? {
            Received::Stanza(s) => Ok(s),
            other => bail!("expected a stanza, got {other:?}"),
        }
    }

    /// Waits for a stream error and the close that must follow, answers the close with
    /// ours (RFC 6120 §4.4: a server that closed a bound stream reads until then);
    /// returns the condition.
    pub async fn expect_stream_error(&mut self) -> anyhow::Result<String> {
        let error = self.expect_stream_error_element().await?;
        Received::Element(error)
            .stream_error()
            .context("a stream error without a condition")
    }

    /// Like [`Client::expect_stream_error`], but returns the whole `<stream:error/>`
    /// (for its text, or the content of `<see-other-host/>`).
    pub async fn expect_stream_error_element(&mut self) -> anyhow::Result<Element> {
        loop {
            match self.recv().await? {
                Received::Element(e) if e.is("error", ns::STREAM) => {
                    return match self.recv().await? {
                        Received::StreamClose => {
                            // The server may have dropped the connection already.
                            let _ = self.close().await;
                            Ok(e)
                        }
                        Received::Eof => Ok(e),
                        other => bail!("expected the stream close after the error, got {other:?}"),
                    };
                }
                Received::Header(_) => continue,
                other => bail!("expected a stream error, got {other:?}"),
            }
        }
    }

    /// Waits until the server closes the socket (reading and discarding until EOF).
    pub async fn expect_eof(&mut self) -> anyhow::Result<()> {
        loop {
            if let Received::Eof = self.recv().await? {
                return Ok(());
            }
        }
    }

    /// Like [`Client::expect_eof`], but also accepts an abrupt close: a TLS stream cut
    /// without `close_notify`, possibly in the middle of a stanza, as when the server
    /// drops a connection instead of closing it.
    pub async fn expect_closed(&mut self) -> anyhow::Result<()> {
        loop {
            match self.recv().await {
                Ok(Received::Eof) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    let abrupt = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                        matches!(
                            io.kind(),
                            std::io::ErrorKind::UnexpectedEof
                                | std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::ConnectionAborted
                        )
                    });
                    return if abrupt { Ok(()) } else { Err(e) };
                }
            }
        }
    }

    /// Splits the connection so one task can write while another reads (flood tests).
    /// [`ClientReader::unsplit`] puts it back together.
    pub fn split(mut self) -> anyhow::Result<(ClientReader, ClientWriter)> {
        let t = self.transport.take().context("not connected")?;
        let (read, write) = tokio::io::split(t);
        Ok((
            ClientReader {
                read,
                framer: self.framer,
                buf: self.buf,
                domain: self.domain,
                jid: self.jid,
            },
            ClientWriter { write },
        ))
    }

    /// Sends a ping iq to the server and waits for its result: proves the session works.
    pub async fn ping(&mut self) -> anyhow::Result<()> {
        self.send(&format!(
            "<iq to='{}' id='ping1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>",
            self.domain
        ))
        .await?;
        let st = self.recv_stanza().await?;
        if st.id.as_deref() != Some("ping1") || !st.to_xml().contains("type='result'") {
            bail!("unexpected ping answer {}", st.to_xml());
        }
        Ok(())
    }

    /// Closes our side of the stream.
    pub async fn close(&mut self) -> anyhow::Result<()> {
        self.send_raw("</stream:stream>").await
    }
}

/// The reading half of a [`Client::split`] connection.
pub struct ClientReader {
    read: ReadHalf<Transport>,
    framer: Framer,
    buf: BytesMut,
    domain: String,
    jid: Option<FullJid>,
}

impl ClientReader {
    /// The next thing the server sends (see [`Client::recv`]).
    pub async fn recv(&mut self) -> anyhow::Result<Received> {
        self.recv_within(WAIT)
            .await?
            .ok_or_else(|| anyhow!("nothing received within {WAIT:?}"))
    }

    /// Like `recv`, but `None` if nothing arrives within `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> anyhow::Result<Option<Received>> {
        match tokio::time::timeout(
            wait,
            recv_from(Some(&mut self.read), &mut self.framer, &mut self.buf),
        )
        .await
        {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Rejoins the halves of one connection.
    pub fn unsplit(self, writer: ClientWriter) -> Client {
        Client {
            transport: Some(self.read.unsplit(writer.write)),
            framer: self.framer,
            buf: self.buf,
            domain: self.domain,
            jid: self.jid,
        }
    }
}

/// The writing half of a [`Client::split`] connection.
pub struct ClientWriter {
    write: WriteHalf<Transport>,
}

impl ClientWriter {
    pub async fn send_raw(&mut self, data: impl AsRef<[u8]>) -> anyhow::Result<()> {
        self.write.write_all(data.as_ref()).await?;
        self.write.flush().await?;
        Ok(())
    }
}

/// Reads until `framer` yields a frame; `None` for `read` means already closed.
async fn recv_from<R: AsyncRead + Unpin>(
    mut read: Option<&mut R>,
    framer: &mut Framer,
    buf: &mut BytesMut,
) -> anyhow::Result<Received> {
    loop {
        match framer.next_frame(buf)? {
            Some(Frame::StreamOpen(tag)) => {
                return Ok(Received::Header(String::from_utf8_lossy(&tag).into()));
            }
            Some(Frame::Element(bytes)) => return parse(&bytes),
            Some(Frame::StreamClose) => return Ok(Received::StreamClose),
            Some(Frame::Whitespace) => continue,
            None => {}
        }
        let Some(t) = read.as_deref_mut() else {
            return Ok(Received::Eof);
        };
        buf.reserve(8192);
        match t.read_buf(buf).await {
            Ok(0) => return Ok(Received::Eof),
            Ok(_) => {}
            // A reset after the server closed is the same as EOF for tests.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(Received::Eof);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn parse(bytes: &Bytes) -> anyhow::Result<Received> {
    match parse_top_level(bytes, NsContext::CLIENT) {
        Ok(TopLevel::Stanza(s)) => Ok(Received::Stanza(s)),
        Ok(TopLevel::Nonza(e)) => Ok(Received::Element(e)),
        // Well-formed, but not a stanza a client may send: still worth asserting on.
        Err(StanzaParseError::Stanza { .. }) => {
            Ok(Received::Element(Element::parse(bytes, NsContext::CLIENT)?))
        }
        Err(e) => bail!("server sent something unparseable: {e:?}"),
    }
}

/// A TLS connector that trusts exactly the node's certificate.
/// A TCP connection to `addr` from `local` (any `127.x.y.z` works on Linux loopback).
async fn tcp_from(addr: SocketAddr, local: IpAddr) -> anyhow::Result<TcpStream> {
    let socket = match local {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(local, 0))?;
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

fn connector(cert: &Path) -> anyhow::Result<TlsConnector> {
    let pem = std::fs::read(cert).with_context(|| format!("read {}", cert.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
