//! Where to connect for a remote domain: DNS resolution for outbound server-to-server
//! streams (RFC 6120 §3.2, XEP-0368).
//!
//! [`Resolver::candidates`] turns a domain into the ordered endpoints to try, each a host,
//! a port and whether to open TLS at once (`_xmpps-server`) or negotiate STARTTLS
//! (`_xmpp-server`, or the port-5269 fallback). [`Resolver::addresses`] turns one endpoint
//! into the socket addresses to connect to. The ordering rules (priorities, RFC 2782
//! weighted selection, "." targets, when to fall back) are plain functions over the SRV
//! answers, so they are tested without DNS as well as against a real DNS server.
//!
//! This module only asks DNS. It never connects, never decides how long a connection
//! attempt may take and never builds stream or stanza errors: the connector does, from the
//! kind of [`ResolveError`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config as dns;
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::rdata::SRV;
use hickory_resolver::proto::rr::{Name, RData};
use rand::Rng;

/// The IANA port of the `xmpp-server` service: where to connect, with STARTTLS, when DNS
/// has no SRV records for a domain (RFC 6120 §3.2.2) or the domain is an IP address.
pub const DEFAULT_PORT: u16 = 5269;

/// SRV owner-name prefixes: direct TLS (XEP-0368) and STARTTLS (RFC 6120 §3.2.1).
const XMPPS_SERVER: &str = "_xmpps-server._tcp";
const XMPP_SERVER: &str = "_xmpp-server._tcp";

/// How a [`Resolver`] asks DNS.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// The nameservers to ask, each over UDP and TCP on the given port. Empty means the
    /// system's configuration (`/etc/resolv.conf`); tests point this at their own server.
    pub nameservers: Vec<SocketAddr>,
    /// How long one try of one query may take, across all nameservers.
    pub timeout: Duration,
    /// How many times a query that failed (timeout, SERVFAIL, network error) is tried again.
    pub retries: usize,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            // A healthy recursive resolver answers well within a second even when it has to
            // walk the tree; two seconds leave room for a slow authority without making a
            // stanza to an unreachable domain wait long for its bounce.
            timeout: Duration::from_secs(2),
            // One retry covers a lost UDP datagram. A failing lookup therefore gives up
            // after about (retries + 1) × timeout = 4 s, instead of hickory's (and glibc's)
            // 3 × 5 s.
            retries: 1,
        }
    }
}

/// One endpoint to try for a remote domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The SRV target, or the domain itself (or its IP address) when there is no SRV
    /// record. Never has a trailing dot.
    pub host: String,
    pub port: u16,
    /// Open TLS as soon as TCP connects (`_xmpps-server`, XEP-0368) rather than negotiate
    /// STARTTLS on the stream.
    pub direct_tls: bool,
}

/// Why a domain could not be resolved, sorted by what the sender should be told.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The input is neither a DNS name nor an IP address; nothing was asked.
    #[error("{0:?} is not a domain name or an IP address")]
    InvalidDomain(String),
    /// DNS answered that the name does not exist or has no address: the remote domain's
    /// configuration, or a mistaken address. Bounce with `<remote-server-not-found/>`.
    #[error("{0} has no address records")]
    NotFound(String),
    /// The domain publishes a "." target for `_xmpp-server` and no usable `_xmpps-server`
    /// record: it declares that it takes no federation. Bounce with
    /// `<remote-server-not-found/>`.
    #[error("{0} offers no server-to-server service")]
    NoService(String),
    /// DNS gave no usable answer (timeout, SERVFAIL, REFUSED, network error), so nothing is
    /// known about the name; trying later may work. Bounce with
    /// `<remote-server-timeout/>`.
    #[error("DNS lookup of {name} failed: {source}")]
    Failure {
        name: String,
        #[source]
        source: NetError,
    },
}

/// The resolver could not be set up: the system DNS configuration is missing or unreadable.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the DNS resolver: {0}")]
pub struct ResolverConfigError(#[from] NetError);

/// Resolves remote domains for outbound server-to-server streams.
///
/// Built on hickory's resolver, which caches answers (negative ones too) for their TTL.
/// Cheap to clone: clones share the cache and the nameserver connections.
#[derive(Debug, Clone)]
pub struct Resolver {
    dns: TokioResolver,
    /// Draws a number in `0..=sum` for the RFC 2782 weighted selection; random except in
    /// tests, which fix it to make the order deterministic.
    pick: fn(u32) -> u32,
}

impl Resolver {
    /// A resolver asking `config.nameservers`, or the system's nameservers when that is
    /// empty.
    pub fn new(config: &ResolverConfig) -> Result<Self, ResolverConfigError> {
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio()?
        } else {
            let nameservers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = dns::ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = dns::ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    dns::NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                dns::ResolverConfig::from_name_servers(nameservers),
                TokioRuntimeProvider::default(),
            )
        };
        let options = builder.options_mut();
        options.timeout = config.timeout;
        options.attempts = config.retries;
        // Ask for both families at once and list IPv6 first, the default preference of
        // RFC 6724; an answer for either family alone is enough.
        options.ip_strategy = dns::LookupIpStrategy::Ipv6AndIpv4;
        Ok(Self {
            dns: builder.build()?,
            pick: random_pick,
        })
    }

    /// The endpoints to try for `domain`, best first; never empty.
    ///
    /// Queries `_xmpps-server._tcp.DOMAIN` and `_xmpp-server._tcp.DOMAIN` together and
    /// orders their records as one set: by priority, then by RFC 2782 weighted random
    /// selection, `_xmpps-server` first among records of equal priority and weight. Only
    /// without any SRV record does it fall back to the domain itself on port 5269 with
    /// STARTTLS (RFC 6120 §3.2.2): a domain that publishes records has said where it
    /// listens, and RFC 6120 §3.2.1 asks not to fall back when they all fail. Whether the
    /// fallback name has addresses is for [`Resolver::addresses`] to find out. An IP
    /// address (`192.0.2.1`, or `[2001:db8::1]` as RFC 7622 §3.2 writes it in a JID) is
    /// that one endpoint, with no DNS query.
    pub async fn candidates(&self, domain: &str) -> Result<Vec<Candidate>, ResolveError> {
        let name = match parse_domain(domain)? {
            Domain::Ip(ip) => {
                return Ok(vec![Candidate {
                    host: ip.to_string(),
                    port: DEFAULT_PORT,
                    direct_tls: false,
                }]);
            }
            Domain::Name(name) => name,
        };
        let (direct, starttls) =
            tokio::join!(self.srv(XMPPS_SERVER, &name), self.srv(XMPP_SERVER, &name));
        let mut pick = self.pick;
        plan(&name, direct, starttls, &mut pick)
    }

    /// The socket addresses of `candidate`, to try in this order (IPv6 first); never
    /// empty. A host that is an IP address is returned as it is.
    pub async fn addresses(&self, candidate: &Candidate) -> Result<Vec<SocketAddr>, ResolveError> {
        let name = match parse_domain(&candidate.host)? {
            Domain::Ip(ip) => return Ok(vec![SocketAddr::new(ip, candidate.port)]),
            Domain::Name(name) => name,
        };
        let lookup = match self.dns.lookup_ip(name.clone()).await {
            Ok(lookup) => lookup,
            Err(e) if e.is_no_records_found() => return Err(not_found(&name)),
            Err(source) => {
                return Err(ResolveError::Failure {
                    name: host_of(&name),
                    source,
                });
            }
        };
        let addresses: Vec<SocketAddr> = lookup
            .iter()
            .map(|ip| SocketAddr::new(ip, candidate.port))
            .collect();
        if addresses.is_empty() {
            return Err(not_found(&name));
        }
        Ok(addresses)
    }

    /// What the SRV records of one service say.
    async fn srv(&self, service: &str, domain: &Name) -> Result<Service, ResolveError> {
        let name = Name::from_ascii(service)
            .and_then(|service| service.append_domain(domain))
            // The prefix can push a name near the 255-octet limit over it.
            .map_err(|_| ResolveError::InvalidDomain(host_of(domain)))?;
        match self.dns.srv_lookup(name.clone()).await {
            Ok(lookup) => Ok(Service::from_answers(
                lookup
                    .answers()
                    .iter()
                    .filter_map(|record| match &record.data {
                        RData::SRV(srv) => Some(srv.clone()),
                        _ => None,
                    })
                    .collect(),
            )),
            // NXDOMAIN or NODATA: the service has no records at all.
            Err(e) if e.is_no_records_found() => Ok(Service::Absent),
            Err(source) => Err(ResolveError::Failure {
                name: host_of(&name),
                source,
            }),
        }
    }
}

/// What a domain's SRV records say about one service.
#[derive(Debug)]
enum Service {
    /// Records with a host to connect to; never empty.
    Offered(Vec<SRV>),
    /// No SRV record (NXDOMAIN or NODATA): the domain says nothing about the service.
    Absent,
    /// A single record with the target ".", which RFC 2782 defines as "the service is
    /// decidedly not available at this domain".
    NotOffered,
}

impl Service {
    fn from_answers(records: Vec<SRV>) -> Self {
        if records.is_empty() {
            return Self::Absent;
        }
        // Among several records a "." target names no host to try, so it is skipped; if
        // that leaves nothing, the domain has still said "not here".
        let offered: Vec<SRV> = records
            .into_iter()
            .filter(|record| !record.target.is_root())
            .collect();
        if offered.is_empty() {
            Self::NotOffered
        } else {
            Self::Offered(offered)
        }
    }
}

/// Combines what the two services say into the endpoints to try.
///
/// Records of either service are used even when the other service's query failed: they
/// are what the domain publishes, and the connector tries them before giving up. With no
/// records, a failed query is a [`ResolveError::Failure`] rather than a reason to fall
/// back, since the failure may hide records. The fallback to the domain on port 5269 is
/// the `xmpp-server` service, so it is taken when `_xmpp-server` has no records and not
/// when it says ".", whatever `_xmpps-server` said.
fn plan(
    domain: &Name,
    direct: Result<Service, ResolveError>,
    starttls: Result<Service, ResolveError>,
    pick: &mut impl FnMut(u32) -> u32,
) -> Result<Vec<Candidate>, ResolveError> {
    match (direct, starttls) {
        (Ok(Service::Offered(direct)), Ok(Service::Offered(starttls))) => {
            Ok(order(direct, starttls, pick))
        }
        (Ok(Service::Offered(direct)), _) => Ok(order(direct, Vec::new(), pick)),
        (_, Ok(Service::Offered(starttls))) => Ok(order(Vec::new(), starttls, pick)),
        (Err(e), _) | (_, Err(e)) => Err(e),
        (Ok(_), Ok(Service::Absent)) => Ok(vec![Candidate {
            host: host_of(domain),
            port: DEFAULT_PORT,
            direct_tls: false,
        }]),
        (Ok(_), Ok(Service::NotOffered)) => Err(ResolveError::NoService(host_of(domain))),
    }
}

/// Orders the records of both services as one set, as XEP-0368 asks: by priority, lowest
/// first, then within a priority by RFC 2782 weighted random selection.
///
/// RFC 2782 lets the records of one priority be arranged in any order before the
/// selection, as long as weight-0 records come first. Sorting by weight does that, and
/// among records that tie on priority and weight `_xmpps-server` comes first: with no
/// weights at all (the common case) direct TLS is then tried first, which XEP-0368
/// allows ("clients MAY choose to prefer one type of connection") and which saves the
/// STARTTLS round trips. Each record's chance of being chosen stays what RFC 2782 gives
/// it, in proportion to its weight.
fn order(
    direct: Vec<SRV>,
    starttls: Vec<SRV>,
    pick: &mut impl FnMut(u32) -> u32,
) -> Vec<Candidate> {
    let mut records: Vec<(SRV, bool)> = direct
        .into_iter()
        .map(|record| (record, true))
        .chain(starttls.into_iter().map(|record| (record, false)))
        .collect();
    records.sort_by(|(a, a_direct), (b, b_direct)| {
        (a.priority, a.weight, !a_direct, &a.target, a.port)
            .cmp(&(b.priority, b.weight, !b_direct, &b.target, b.port))
    });
    let mut ordered = Vec::with_capacity(records.len());
    for group in records.chunk_by(|(a, _), (b, _)| a.priority == b.priority) {
        let mut left = group.to_vec();
        while !left.is_empty() {
            // At most a DNS message's worth of records, each at most 65,535: the sum
            // cannot overflow.
            let sum: u32 = left
                .iter()
                .map(|(record, _)| u32::from(record.weight))
                .sum();
            let drawn = pick(sum).min(sum);
            // The first record whose running sum reaches the drawn number; the last
            // record's running sum is `sum`, so there always is one.
            let mut running = 0;
            let index = left
                .iter()
                .position(|(record, _)| {
                    running += u32::from(record.weight);
                    running >= drawn
                })
                .unwrap_or(0);
            let (record, direct_tls) = left.remove(index);
            ordered.push(Candidate {
                host: host_of(&record.target),
                port: record.port,
                direct_tls,
            });
        }
    }
    ordered
}

/// A uniformly random number in `0..=sum`, as RFC 2782's selection draws it.
fn random_pick(sum: u32) -> u32 {
    rand::thread_rng().gen_range(0..=sum)
}

enum Domain {
    Ip(IpAddr),
    Name(Name),
}

/// Reads a domainpart or an SRV target: an IP address, or a DNS name made absolute.
fn parse_domain(domain: &str) -> Result<Domain, ResolveError> {
    let invalid = || ResolveError::InvalidDomain(domain.to_owned());
    // RFC 7622 §3.2: an IPv6 address stands in brackets in a JID; SRV targets and
    // `Candidate::host` carry it bare.
    if let Some(bracketed) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        return match bracketed.parse() {
            Ok(IpAddr::V6(ip)) => Ok(Domain::Ip(IpAddr::V6(ip))),
            _ => Err(invalid()),
        };
    }
    if let Ok(ip) = domain.parse() {
        return Ok(Domain::Ip(ip));
    }
    let mut name = Name::from_utf8(domain).map_err(|_| invalid())?;
    // Host names only: after IDNA, letters, digits and hyphens (RFC 5890 §2.3.1). hickory
    // would carry other bytes in a label, which no remote server can be named by.
    let host_name = name.num_labels() > 0
        && name.iter().all(|label| {
            !label.is_empty()
                && label
                    .iter()
                    .all(|byte| byte.is_ascii_alphanumeric() || *byte == b'-')
        });
    if !host_name {
        return Err(invalid());
    }
    // A remote domain is never relative to our own search domains (`search` in
    // resolv.conf), which would otherwise be tried first.
    name.set_fqdn(true);
    Ok(Domain::Name(name))
}

/// A name as an ASCII host name without the trailing dot.
fn host_of(name: &Name) -> String {
    let mut host = name.to_ascii();
    if host.ends_with('.') && host.len() > 1 {
        host.pop();
    }
    host
}

fn not_found(name: &Name) -> ResolveError {
    ResolveError::NotFound(host_of(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Instant;

    use hickory_server::proto::rr::Record;
    use hickory_server::proto::rr::rdata::{A, AAAA};

    use crate::testing::dns::{TestDns, bind_udp_and_tcp};

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> SRV {
        SRV::new(priority, weight, port, name(target))
    }

    fn candidate(host: &str, port: u16, direct_tls: bool) -> Candidate {
        Candidate {
            host: host.to_owned(),
            port,
            direct_tls,
        }
    }

    fn fallback(host: &str) -> Vec<Candidate> {
        vec![candidate(host, DEFAULT_PORT, false)]
    }

    /// The zone `test.` that the DNS tests resolve in.
    fn zone() -> Vec<Record> {
        // (service, domain under `test.`, priority, weight, port, target under the domain)
        let services = [
            // Both services, over three priorities.
            ("xmpps", "both", 5, 0, 5270, "tls1"),
            ("xmpps", "both", 20, 0, 443, "tls2"),
            ("xmpp", "both", 10, 0, 5269, "plain1"),
            ("xmpp", "both", 20, 0, 5269, "plain2"),
            // One priority, three weights.
            ("xmpp", "weighted", 0, 10, 5269, "w10"),
            ("xmpp", "weighted", 0, 60, 5269, "w60"),
            ("xmpp", "weighted", 0, 30, 5269, "w30"),
            // No direct TLS here, STARTTLS on a custom port.
            ("xmpps", "starttls", 0, 0, 0, "."),
            ("xmpp", "starttls", 0, 0, 5999, "xmpp"),
            // No federation at all.
            ("xmpps", "closed", 0, 0, 0, "."),
            ("xmpp", "closed", 0, 0, 0, "."),
        ];
        let mut records = vec![
            // No SRV records, addresses of both families.
            Record::from_rdata(
                name("plain.test."),
                300,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
            ),
            Record::from_rdata(
                name("plain.test."),
                300,
                RData::AAAA(AAAA(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7))),
            ),
        ];
        records.extend(
            services.map(|(service, domain, priority, weight, port, target)| {
                let owner = format!("_{service}-server._tcp.{domain}.test.");
                let target = match target {
                    "." => ".".to_owned(),
                    host => format!("{host}.{domain}.test."),
                };
                let record = srv(priority, weight, port, &target);
                Record::from_rdata(name(&owner), 300, RData::SRV(record))
            }),
        );
        records
    }

    /// An authoritative DNS server for [`zone`] on loopback.
    async fn test_dns() -> TestDns {
        TestDns::start("test.", zone()).await
    }

    fn resolver(dns: &TestDns) -> Resolver {
        let mut resolver = Resolver::new(&ResolverConfig {
            nameservers: vec![dns.addr],
            ..ResolverConfig::default()
        })
        .unwrap();
        // Without weights, the lowest draw: the first record of each priority.
        resolver.pick = |_| 0;
        resolver
    }

    #[tokio::test]
    async fn both_services_are_ordered_by_priority() {
        let dns = test_dns().await;
        let candidates = resolver(&dns).candidates("both.test").await.unwrap();
        assert_eq!(
            candidates,
            vec![
                candidate("tls1.both.test", 5270, true),
                candidate("plain1.both.test", 5269, false),
                // Equal priority and weight: direct TLS first.
                candidate("tls2.both.test", 443, true),
                candidate("plain2.both.test", 5269, false),
            ]
        );
    }

    #[tokio::test]
    async fn weights_order_one_priority() {
        let dns = test_dns().await;
        let mut resolver = resolver(&dns);
        // The highest draw always lands on the heaviest record left, the lowest on the
        // lightest.
        let highest: fn(u32) -> u32 = |sum| sum;
        let lowest: fn(u32) -> u32 = |_| 0;
        let draws = [
            (highest, ["w60", "w30", "w10"]),
            (lowest, ["w10", "w30", "w60"]),
        ];
        for (pick, expected) in draws {
            resolver.pick = pick;
            let candidates = resolver.candidates("weighted.test").await.unwrap();
            let hosts: Vec<&str> = candidates
                .iter()
                .map(|c| c.host.trim_end_matches(".weighted.test"))
                .collect();
            assert_eq!(hosts, expected);
        }
    }

    #[tokio::test]
    async fn a_dot_target_withdraws_only_its_service() {
        let dns = test_dns().await;
        assert_eq!(
            resolver(&dns).candidates("starttls.test").await.unwrap(),
            vec![candidate("xmpp.starttls.test", 5999, false)]
        );
    }

    #[tokio::test]
    async fn dot_targets_for_both_services_mean_no_federation() {
        let dns = test_dns().await;
        let err = resolver(&dns).candidates("closed.test").await.unwrap_err();
        assert!(
            matches!(&err, ResolveError::NoService(domain) if domain == "closed.test"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn without_srv_records_the_domain_itself_on_5269() {
        let dns = test_dns().await;
        let resolver = resolver(&dns);
        let candidates = resolver.candidates("plain.test").await.unwrap();
        assert_eq!(candidates, fallback("plain.test"));
        assert_eq!(
            resolver.addresses(&candidates[0]).await.unwrap(),
            [
                "[2001:db8::7]:5269".parse::<SocketAddr>().unwrap(),
                "192.0.2.7:5269".parse().unwrap(),
            ]
        );
    }

    #[tokio::test]
    async fn a_domain_that_does_not_exist_is_not_found() {
        let dns = test_dns().await;
        let resolver = resolver(&dns);
        // NXDOMAIN for the SRV names says nothing about the domain itself: fall back...
        let candidates = resolver.candidates("nowhere.test").await.unwrap();
        assert_eq!(candidates, fallback("nowhere.test"));
        // ...and find out there.
        let err = resolver.addresses(&candidates[0]).await.unwrap_err();
        assert!(
            matches!(&err, ResolveError::NotFound(host) if host == "nowhere.test"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_refusing_nameserver_is_a_failure_not_an_absence() {
        let dns = test_dns().await;
        // The test server answers REFUSED outside its zone.
        let err = resolver(&dns).candidates("example.org").await.unwrap_err();
        assert!(matches!(err, ResolveError::Failure { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_silent_nameserver_is_a_failure_within_the_timeout() {
        // Bound but never read or accepted: queries go unanswered.
        let (udp, tcp) = bind_udp_and_tcp().await;
        let resolver = Resolver::new(&ResolverConfig {
            nameservers: vec![udp.local_addr().unwrap()],
            timeout: Duration::from_millis(200),
            retries: 0,
        })
        .unwrap();
        let started = Instant::now();
        let err = resolver.candidates("silent.test").await.unwrap_err();
        assert!(matches!(err, ResolveError::Failure { .. }), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        drop((udp, tcp));
    }

    #[tokio::test]
    async fn an_ip_address_is_its_own_endpoint() {
        // No DNS is asked: the resolver points at a port nobody serves.
        let (udp, _tcp) = bind_udp_and_tcp().await;
        let resolver = Resolver::new(&ResolverConfig {
            nameservers: vec![udp.local_addr().unwrap()],
            ..ResolverConfig::default()
        })
        .unwrap();
        let v4 = resolver.candidates("127.0.0.1").await.unwrap();
        assert_eq!(v4, fallback("127.0.0.1"));
        assert_eq!(
            resolver.addresses(&v4[0]).await.unwrap(),
            ["127.0.0.1:5269".parse::<SocketAddr>().unwrap()]
        );
        let v6 = resolver.candidates("[::1]").await.unwrap();
        assert_eq!(v6, fallback("::1"));
        assert_eq!(
            resolver.addresses(&v6[0]).await.unwrap(),
            ["[::1]:5269".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn invalid_domains_are_rejected_before_any_query() {
        for domain in [
            "",
            ".",
            "[192.0.2.1]",
            "[::1",
            "a..b",
            "exa mple.com",
            "a/b.com",
            "_xmpp-server._tcp.example.com",
        ] {
            assert!(
                matches!(parse_domain(domain), Err(ResolveError::InvalidDomain(_))),
                "{domain:?}"
            );
        }
        for domain in [
            "example.com",
            "example.com.",
            "xn--bcher-kva.example",
            "bücher.example",
        ] {
            assert!(
                matches!(parse_domain(domain), Ok(Domain::Name(_))),
                "{domain:?}"
            );
        }
    }

    #[test]
    fn a_single_dot_target_is_not_offered_and_a_dot_among_others_is_skipped() {
        assert!(matches!(
            Service::from_answers(vec![srv(0, 0, 0, ".")]),
            Service::NotOffered
        ));
        assert!(matches!(Service::from_answers(Vec::new()), Service::Absent));
        match Service::from_answers(vec![srv(0, 0, 0, "."), srv(1, 0, 5269, "x.test.")]) {
            Service::Offered(records) => assert_eq!(records, [srv(1, 0, 5269, "x.test.")]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fallback_follows_the_xmpp_server_service() {
        let domain = name("example.test.");
        let plan = |direct, starttls| plan(&domain, Ok(direct), Ok(starttls), &mut |_| 0);
        assert_eq!(
            plan(Service::Absent, Service::Absent).unwrap(),
            fallback("example.test")
        );
        // No direct TLS says nothing about STARTTLS on 5269.
        assert_eq!(
            plan(Service::NotOffered, Service::Absent).unwrap(),
            fallback("example.test")
        );
        // No STARTTLS service rules out the fallback, which is that service.
        for direct in [Service::Absent, Service::NotOffered] {
            let err = plan(direct, Service::NotOffered).unwrap_err();
            assert!(matches!(err, ResolveError::NoService(_)), "{err:?}");
        }
    }

    #[test]
    fn a_failed_query_hides_nothing_the_other_service_offers() {
        let domain = name("example.test.");
        let failure = || {
            Err(ResolveError::Failure {
                name: "_xmpps-server._tcp.example.test".to_owned(),
                source: NetError::Timeout,
            })
        };
        let offered = Ok(Service::Offered(vec![srv(
            0,
            0,
            5269,
            "xmpp.example.test.",
        )]));
        assert_eq!(
            plan(&domain, failure(), offered, &mut |_| 0).unwrap(),
            [candidate("xmpp.example.test", 5269, false)]
        );
        // Without records, the failure may be hiding some: no fallback, whichever failed.
        for (direct, starttls) in [
            (failure(), Ok(Service::Absent)),
            (failure(), Ok(Service::NotOffered)),
            (Ok(Service::Absent), failure()),
            (Ok(Service::NotOffered), failure()),
        ] {
            let err = plan(&domain, direct, starttls, &mut |_| 0).unwrap_err();
            assert!(matches!(err, ResolveError::Failure { .. }), "{err:?}");
        }
    }

    #[test]
    fn weighted_selection_follows_the_draw() {
        let records = vec![
            srv(0, 60, 5269, "w60.test."),
            srv(0, 0, 5269, "w0.test."),
            srv(0, 30, 5269, "w30.test."),
            srv(0, 10, 5269, "w10.test."),
        ];
        // Arranged as w0, w10, w30, w60: running sums 0, 10, 40, 100.
        let mut draws = [41, 0, 5, 0].into_iter();
        let mut sums = Vec::new();
        let ordered = order(Vec::new(), records, &mut |sum| {
            sums.push(sum);
            draws.next().unwrap()
        });
        let hosts: Vec<&str> = ordered.iter().map(|c| c.host.as_str()).collect();
        // 41 passes 40: w60. A draw of 0 takes the weight-0 record, as RFC 2782 intends.
        assert_eq!(hosts, ["w60.test", "w0.test", "w10.test", "w30.test"]);
        assert_eq!(sums, [100, 40, 40, 30]);
    }

    #[test]
    fn random_selection_is_proportional_to_weight() {
        let mut heavy_first = 0;
        for _ in 0..10_000 {
            let records = vec![
                srv(0, 25, 5269, "light.test."),
                srv(0, 75, 5269, "heavy.test."),
            ];
            if order(Vec::new(), records, &mut random_pick)[0].host == "heavy.test" {
                heavy_first += 1;
            }
        }
        // Draws 26..=100 of 0..=100 pick the heavy record: 74.3%, give or take 0.5%.
        assert!((7_000..7_800).contains(&heavy_first), "{heavy_first}");
    }
}
