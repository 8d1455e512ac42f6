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
    /// selection, `_xmpps-server` first among records of equal priority and weight. Without any SRV record, falls back
    /// to the domain itself on port 5269 with STARTTLS (RFC 6120 §3.2.2); whether that
    /// name has addresses is for [`Resolver::addresses`] to find out. An IP address
    /// (`192.0.2.1`, or `[2001:db8::1]` as RFC 7622 §3.2 writes it in a JID) is that
    /// one endpoint, with no DNS query.
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
/// STARTTLS round trips. Each record's chance of being chosen stays proportional to its
/// weight.
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
    if name.is_root() {
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
