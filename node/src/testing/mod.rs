//! Support for tests that need real external parts, shared by this crate's unit tests
//! and the `shoal-tests` harness: a real `redis-server` on a free loopback port, and
//! (with the `testing` feature) a DNS server for test zones.
//!
//! Nothing here is used by the server itself.

#[cfg(any(test, feature = "testing"))]
pub mod dns;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process on 127.0.0.1, killed when dropped. Its data lives in
/// a directory of its own under the system temp dir with the append-only file on, so a [`restart`](Self::restart)
/// keeps what was written, as a production Redis with AOF would.
pub struct RedisServer {
    addr: SocketAddr,
    /// Removed when the server is dropped.
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    ///
    /// Panics with what to do when `redis-server` is not installed.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let dir = std::env::temp_dir().join(format!("shoal-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let mut server = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the server (no shutdown save beyond the AOF), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let child = Command::new(binary())
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.addr.port().to_string(),
            ])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; install it with `apt-get install redis-server` \
                     (scripts/test-deps.sh does)",
                    binary().display()
                )
            });
        self.child = Some(child);
        wait_for_ping(self.addr, &self.dir);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-server` from `SHOAL_REDIS_SERVER`, else the one on `PATH`.
fn binary() -> PathBuf {
    std::env::var_os("SHOAL_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// Waits (up to 10 s) until the server answers `PING` with `+PONG`.
fn wait_for_ping(addr: SocketAddr, dir: &Path) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answered = TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                s.write_all(b"PING\r\n")?;
                let mut buf = [0u8; 7];
                s.read_exact(&mut buf)?;
                Ok(&buf == b"+PONG\r\n")
            })
            .unwrap_or(false);
        if answered {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on {addr} (dir {}) did not answer PING within 10 s",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What was written before a kill is there after the restart (append-only file).
    #[tokio::test]
    async fn a_restarted_server_keeps_its_data() {
        let mut server = RedisServer::start();
        let client = redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
        server.restart();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let v: Option<String> = redis::cmd("GET")
            .arg("k")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(v.as_deref(), Some("v"));
    }
}
