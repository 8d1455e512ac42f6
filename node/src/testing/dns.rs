//! An authoritative DNS server on loopback (hickory-server) serving one test zone, so
//! federation tests resolve remote domains without the network.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use tokio::net::{TcpListener, UdpSocket};

/// A DNS server for one zone, UDP and TCP on one free loopback port; stops when dropped.
pub struct TestDns {
    pub addr: SocketAddr,
    _server: Server<Catalog>,
}

impl TestDns {
    /// Serves `records` as the zone `origin` (e.g. `"test."`), with an SOA of its own.
    pub async fn start(origin: &str, records: Vec<Record>) -> Self {
        let origin = name(origin);
        let mut handler: InMemoryZoneHandler =
            InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa = SOA::new(
            name(&format!("ns.{origin}")),
            name(&format!("hostmaster.{origin}")),
            1,
            3600,
            600,
            86400,
            60,
        );
        assert!(handler.upsert_mut(Record::from_rdata(origin.clone(), 300, RData::SOA(soa)), 1));
        for record in records {
            assert!(handler.upsert_mut(record, 1));
        }
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![Arc::new(handler)]);
        let (udp, tcp) = bind_udp_and_tcp().await;
        let addr = udp.local_addr().expect("bound");
        let mut server = Server::new(catalog);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 32);
        Self {
            addr,
            _server: server,
        }
    }
}

/// An absolute DNS name.
pub fn name(text: &str) -> Name {
    Name::from_ascii(text).expect("a valid DNS name")
}

/// `owner SRV priority weight port target`.
pub fn srv(owner: &str, priority: u16, weight: u16, port: u16, target: &str) -> Record {
    let rdata = RData::SRV(SRV::new(priority, weight, port, name(target)));
    Record::from_rdata(name(owner), 300, rdata)
}

/// `owner A|AAAA ip`.
pub fn address(owner: &str, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name(owner), 300, rdata)
}

/// The records announcing `domain`'s XMPP server on `port` of 127.0.0.1:
/// `_xmpp-server._tcp.<domain>.` (or `_xmpps-server`, direct TLS) naming
/// `xmpp.<domain>.`, and that name's address.
pub fn xmpp_server(domain: &str, port: u16, direct_tls: bool) -> Vec<Record> {
    let service = if direct_tls { "xmpps" } else { "xmpp" };
    let target = format!("xmpp.{domain}.");
    vec![
        srv(
            &format!("_{service}-server._tcp.{domain}."),
            0,
            0,
            port,
            &target,
        ),
        address(&target, IpAddr::V4(Ipv4Addr::LOCALHOST)),
    ]
}

/// A UDP socket and a TCP listener on the same free loopback port.
pub async fn bind_udp_and_tcp() -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind UDP");
        let addr = udp.local_addr().expect("bound");
        // The port is free for UDP; another test may hold it for TCP.
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp);
        }
    }
    panic!("no loopback port free for both UDP and TCP");
}
