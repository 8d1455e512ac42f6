//! `Prosody`: a real Prosody (Debian's `prosody` package, installed by
//! `scripts/test-deps.sh`) on loopback ports, for federation interop tests. It gets its
//! own configuration, data and self-signed certificate in a temporary directory, and
//! resolves other domains only through the DNS server the test gives it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running Prosody serving one domain; killed when dropped. A test that fails while
/// one runs prints the end of its log.
pub struct Prosody {
    pub domain: String,
    pub c2s: SocketAddr,
    dir: TempDir,
    child: Child,
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
        let stdout = std::fs::File::create(path("stdout.log")).expect("Prosody's stdout log");
        let child = Command::new("prosody")
            .args(["-F", "--config", &config_path])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stderr(stdout.try_clone().expect("log file"))
            .stdout(stdout)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run prosody ({e}): run `bash scripts/test-deps.sh` to install it")
            });
        let mut prosody = Prosody {
            domain: domain.to_owned(),
            c2s,
            dir,
            child,
        };
        prosody.wait_listening();
        prosody
    }

    /// Prosody's certificate, for its clients to trust.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// What Prosody wrote to its log and to stdout so far.
    pub fn log(&self) -> String {
        ["stdout.log", "prosody.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.c2s).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prosody exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "prosody did not listen on {} within 30 s:\n{}",
                self.c2s,
                self.log()
            );
            std::thread::sleep(crate::POLL);
        }
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!("--- the last lines of Prosody's log ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}
