//! `Prosody`: a real Prosody (Debian's `prosody` package, installed by
//! `scripts/test-deps.sh`) on loopback ports, for federation interop tests. It gets its
//! own configuration, data and self-signed certificate in a temporary directory, and
//! resolves other domains only through the DNS server the test gives it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::program::Program;

/// A running Prosody serving one domain; killed when dropped. A test that fails while
/// one runs prints the end of its log.
pub struct Prosody {
    pub domain: String,
    pub c2s: SocketAddr,
    program: Program,
}

impl Prosody {
    /// Starts Prosody for `domain` with client streams on a free port and federation on
    /// `s2s_port` (what the test's DNS names for `domain`), asking `dns` (UDP and TCP)
    /// for every name it resolves. It accepts accounts made in-band, and authenticates
    /// peers with self-signed certificates by dialback, as a test peer must.
    pub fn start(domain: &str, s2s_port: u16, dns: SocketAddr) -> Self {
        let dir = TempDir::new().expect("temp dir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        let (cert, key) = (path("cert.pem"), path("key.pem"));
        shoal_node::tls::generate_self_signed(domain, cert.as_ref(), key.as_ref())
            .expect("Prosody's test certificate");
        std::fs::create_dir(path("data")).expect("Prosody's data directory");
        let c2s = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let config = format!(
            r#"-- written by shoal-tests (tests/src/prosody.rs)
run_as_root = true
certificates = "{certs}"
pidfile = "{pid}"
data_path = "{data}"
log = {{ {{ levels = {{ min = "debug" }}, to = "file", filename = "{log}" }} }}
network_backend = "epoll"
c2s_ports = {{ {c2s_port} }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ {s2s_port} }}
s2s_interfaces = {{ "127.0.0.1" }}
component_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
modules_enabled = {{ "roster"; "saslauth"; "tls"; "dialback"; "disco"; "ping"; "register" }}
authentication = "internal_hashed"
storage = "internal"
allow_registration = true
-- Peers in tests present self-signed certificates: authenticate them by dialback.
s2s_secure_auth = false
-- Only the test's DNS server: no resolv.conf, no hosts file.
unbound = {{ resolvconf = false; hoststxt = false; forward = "{dns_ip}@{dns_port}" }}
ssl = {{ certificate = "{cert}"; key = "{key}" }}
VirtualHost "{domain}"
"#,
            certs = dir.path().display(),
            pid = path("prosody.pid"),
            data = path("data"),
            log = path("prosody.log"),
            c2s_port = c2s.port(),
            dns_ip = dns.ip(),
            dns_port = dns.port(),
        );
        let config_path = path("prosody.cfg.lua");
        std::fs::write(&config_path, config).expect("write Prosody's configuration");
        let mut command = Command::new("prosody");
        command.args(["-F", "--config", &config_path]);
        let mut program = Program::spawn("prosody", command, dir, &["prosody.log"]);
        program.wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(c2s).is_ok()
        });
        Prosody {
            domain: domain.to_owned(),
            c2s,
            program,
        }
    }

    /// Prosody's certificate, for its clients to trust.
    pub fn cert_path(&self) -> PathBuf {
        self.program.dir().join("cert.pem")
    }
}
