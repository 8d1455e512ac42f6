//! The PROXY protocol (HAProxy's v1 text and v2 binary headers) on listeners behind a
//! TCP load balancer: where a connection really comes from.
//!
//! [`real_source`] is the whole interface for a listener: given a freshly accepted
//! socket and the listener's [`ProxyProtocolConfig`], it refuses untrusted sources,
//! reads exactly one header under the header timeout, and returns the client's address
//! for everything that keys on the peer (per-address limits, log lines). It logs and
//! counts every outcome (`shoal_proxy_headers_total`).
//!
//! The header is framed here ([`frame`]: how long it is, from its first bytes) and
//! parsed by the `ppp` crate. This module must never read a byte past the header: what
//! follows belongs to the XMPP stream or the TLS handshake, which take the socket as it
//! is. So it peeks, and consumes only bytes known to belong to the header.

use std::net::SocketAddr;

use ppp::v2::PROTOCOL_PREFIX as V2_SIGNATURE;
use ppp::{v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::config::ProxyProtocolConfig;
use crate::metrics::{Metrics, ProxyResult, ProxyService};

/// The longest header accepted. A v1 header is at most 107 bytes (the protocol's own
/// limit); a v2 header from a balancer carries the addresses (36 bytes for IPv6) and a
/// few optional TLVs (unique id, authority, TLS details) in well under this. Anything
/// longer is refused rather than buffered.
pub const MAX_HEADER: usize = 1024;

/// The protocol's bound on a v1 header, CRLF included.
const V1_MAX: usize = 107;

/// How a v1 header starts.
const V1_PREFIX: &[u8] = b"PROXY ";

/// A v2 header's fixed part: signature (12), version and command, family and protocol,
/// and the length of what follows (2).
const V2_FIXED: usize = 16;

/// Why a connection did not yield a source address.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the connection did not start with a PROXY header")]
    NotProxy,
    #[error("the PROXY header is longer than {max} bytes")]
    TooLarge { max: usize },
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("the connection closed before the PROXY header was complete")]
    Closed,
    #[error("reading the PROXY header failed: {0}")]
    Io(#[from] std::io::Error),
}

/// How much of a connection's first bytes is its PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The header is the first `n` bytes.
    Complete(usize),
    /// Every byte seen so far belongs to the header, and more are needed.
    Incomplete,
}

/// Frames a header at the start of `buf` (sans-IO). `Incomplete` promises that all of
/// `buf` is header, so the caller may consume it.
pub fn frame(buf: &[u8]) -> Result<Framing, HeaderError> {
    let starts = |prefix: &[u8]| {
        let n = buf.len().min(prefix.len());
        buf[..n] == prefix[..n]
    };
    if starts(V2_SIGNATURE) {
        if buf.len() < V2_FIXED {
            return Ok(Framing::Incomplete);
        }
        let len = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > MAX_HEADER {
            return Err(HeaderError::TooLarge { max: MAX_HEADER });
        }
        return Ok(if buf.len() >= len {
            Framing::Complete(len)
        } else {
            Framing::Incomplete
        });
    }
    if starts(V1_PREFIX) {
        // A v1 header is text ending at its first line feed.
        let window = &buf[..buf.len().min(V1_MAX)];
        return match window.iter().position(|&b| b == b'\n') {
            Some(i) => Ok(Framing::Complete(i + 1)),
            None if buf.len() >= V1_MAX => Err(HeaderError::TooLarge { max: V1_MAX }),
            None => Ok(Framing::Incomplete),
        };
    }
    Err(HeaderError::NotProxy)
}

/// The client address a complete header names. Headers that name none (v1 `UNKNOWN`,
/// v2 `LOCAL` as sent by health checks, Unix sockets) stand for the connection itself:
/// `peer` is returned.
pub fn source_of(header: &[u8], peer: SocketAddr) -> Result<SocketAddr, HeaderError> {
    let malformed = |e: &dyn std::fmt::Display| HeaderError::Malformed(e.to_string());
    // The framing already told the versions apart by their first bytes.
    if header.starts_with(V2_SIGNATURE) {
        let h = v2::Header::try_from(header).map_err(|e| malformed(&e))?;
        return Ok(match (h.command, h.addresses) {
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                SocketAddr::from((a.source_address, a.source_port))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                SocketAddr::from((a.source_address, a.source_port))
            }
            _ => peer,
        });
    }
    let h = v1::Header::try_from(header).map_err(|e| malformed(&e))?;
    Ok(match h.addresses {
        v1::Addresses::Tcp4(a) => SocketAddr::from((a.source_address, a.source_port)),
        v1::Addresses::Tcp6(a) => SocketAddr::from((a.source_address, a.source_port)),
        v1::Addresses::Unknown => peer,
    })
}

/// Where the connection `tcp`, accepted from `peer`, really comes from, on a listener
/// with the PROXY protocol on. `None`: the connection must be closed (the reason is
/// logged and counted). On return the socket is positioned at the first byte after the
/// header. Listeners call it right after accepting, before any TLS or stream
/// handshake.
pub async fn real_source(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    settings: &ProxyProtocolConfig,
    service: ProxyService,
    metrics: &Metrics,
) -> Option<SocketAddr> {
    let listener = service.as_str();
    if !settings.trusts(peer.ip()) {
        info!(%peer, listener, "connection refused: PROXY protocol is on and the source is not a trusted proxy");
        metrics.proxy_header(service, ProxyResult::Rejected);
        return None;
    }
    match tokio::time::timeout(settings.header_timeout, read_header(tcp, peer)).await {
        Ok(Ok(source)) => {
            debug!(%peer, %source, listener, "PROXY header accepted");
            metrics.proxy_header(service, ProxyResult::Accepted);
            Some(source)
        }
        Ok(Err(error)) => {
            info!(%peer, listener, %error, "connection closed: no valid PROXY header");
            metrics.proxy_header(service, ProxyResult::Invalid);
            None
        }
        Err(_) => {
            info!(%peer, listener, timeout = ?settings.header_timeout, "connection closed: no PROXY header in time");
            metrics.proxy_header(service, ProxyResult::Timeout);
            None
        }
    }
}

/// Reads one header, never past its end: peeks at what has arrived, frames it, and
/// consumes only what the framing says is header.
async fn read_header(tcp: &mut TcpStream, peer: SocketAddr) -> Result<SocketAddr, HeaderError> {
    let mut buf = [0u8; MAX_HEADER];
    let mut have = 0;
    loop {
        // Waits until something arrives; returns it without consuming it.
        let n = tcp.peek(&mut buf[have..]).await?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        let seen = have + n;
        match frame(&buf[..seen])? {
            Framing::Complete(len) => {
                tcp.read_exact(&mut buf[have..len]).await?;
                return source_of(&buf[..len], peer);
            }
            Framing::Incomplete => {
                // All header: consume it, so the next peek waits for new bytes.
                tcp.read_exact(&mut buf[have..seen]).await?;
                have = seen;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Command, Protocol, Version};

    fn v2_header(command: Command, source: &str, destination: &str) -> Vec<u8> {
        let addresses = (
            source.parse::<SocketAddr>().unwrap(),
            destination.parse::<SocketAddr>().unwrap(),
        );
        Builder::with_addresses(Version::Two | command, Protocol::Stream, addresses)
            .build()
            .unwrap()
    }

    const PEER: &str = "10.0.0.2:40000";

    fn peer() -> SocketAddr {
        PEER.parse().unwrap()
    }

    #[test]
    fn v1_is_framed_at_its_line_feed_whatever_follows() {
        let header = b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 5222\r\n";
        let mut input = header.to_vec();
        input.extend_from_slice(b"<?xml version='1.0'?>");
        assert_eq!(frame(&input).unwrap(), Framing::Complete(header.len()));
        assert_eq!(
            source_of(header, peer()).unwrap(),
            "192.0.2.1:56324".parse().unwrap()
        );
        // Every split point before the end is incomplete, never an error.
        for cut in 0..header.len() {
            assert_eq!(frame(&header[..cut]).unwrap(), Framing::Incomplete, "{cut}");
        }
    }

    #[test]
    fn v1_ipv6_and_unknown() {
        let header = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 5222\r\n";
        assert_eq!(
            source_of(header, peer()).unwrap(),
            "[2001:db8::1]:4000".parse().unwrap()
        );
        // UNKNOWN: the connection's own address stands.
        assert_eq!(source_of(b"PROXY UNKNOWN\r\n", peer()).unwrap(), peer());
    }

    #[test]
    fn v2_is_framed_by_its_length_field() {
        let header = v2_header(Command::Proxy, "[2001:db8::7]:1234", "[2001:db8::1]:5223");
        // 16 fixed bytes and two IPv6 addresses with ports.
        assert_eq!(header.len(), 16 + 36);
        let mut input = header.clone();
        input.extend_from_slice(&[0x16, 0x03, 0x01]); // a TLS ClientHello follows
        assert_eq!(frame(&input).unwrap(), Framing::Complete(header.len()));
        for cut in 0..header.len() {
            assert_eq!(frame(&header[..cut]).unwrap(), Framing::Incomplete, "{cut}");
        }
        assert_eq!(
            source_of(&header, peer()).unwrap(),
            "[2001:db8::7]:1234".parse().unwrap()
        );
        let v4 = v2_header(Command::Proxy, "192.0.2.9:999", "10.0.0.1:5222");
        assert_eq!(
            source_of(&v4, peer()).unwrap(),
            "192.0.2.9:999".parse().unwrap()
        );
    }

    #[test]
    fn v2_local_is_the_connection_itself() {
        // What a balancer's health check sends.
        let header = v2_header(Command::Local, "192.0.2.9:999", "10.0.0.1:5222");
        assert_eq!(source_of(&header, peer()).unwrap(), peer());
    }

    #[test]
    fn xmpp_and_tls_without_a_header_are_not_proxy() {
        for input in [
            &b"<?xml version='1.0'?>"[..],
            b"<stream:stream",
            b"\x16\x03\x01",
            b"PROXX",
        ] {
            assert!(
                matches!(frame(input), Err(HeaderError::NotProxy)),
                "{input:?}"
            );
        }
    }

    #[test]
    fn oversized_headers_are_refused() {
        let mut v1 = b"PROXY TCP4 ".to_vec();
        v1.resize(V1_MAX, b'1');
        assert!(matches!(
            frame(&v1),
            Err(HeaderError::TooLarge { max: V1_MAX })
        ));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11]);
        v2.extend_from_slice(&u16::try_from(MAX_HEADER).unwrap().to_be_bytes());
        assert!(matches!(
            frame(&v2),
            Err(HeaderError::TooLarge { max: MAX_HEADER })
        ));
    }

    #[test]
    fn malformed_headers_say_why() {
        let e = source_of(b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\n", peer()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed PROXY header: Header contains invalid IP address for the source."
        );
        let mut bad_version = v2_header(Command::Proxy, "192.0.2.9:999", "10.0.0.1:5222");
        bad_version[12] = 0x31;
        let e = source_of(&bad_version, peer()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed PROXY header: Expected version 30 to be equal to 2."
        );
    }
}
