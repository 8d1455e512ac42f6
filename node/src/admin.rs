//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (liveness) and
//! `/readyz` (readiness), plus the [`Health`] flags components flip as they come up.
//!
//! This module only reports state. It must never take an action on the node (no admin
//! commands over HTTP here) and never block on anything slower than reading atomics and
//! rendering the metrics registry, so a probe cannot be stalled by a busy node.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

/// Prometheus text exposition format, version 0.0.4.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// How often histogram buffers are drained when nobody scrapes. Without upkeep an
/// unscraped node would buffer every latency sample, which is memory without bound.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// A part of the node that must be up before it reports ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReadyComponent {
    /// The c2s (and, later, s2s) listeners are bound and accepting.
    Listeners,
    /// The account/roster store is open.
    Storage,
    /// Cluster mode: this node is a member and every shard has a live owner.
    Cluster,
}

impl ReadyComponent {
    pub const ALL: &'static [ReadyComponent] = &[
        ReadyComponent::Listeners,
        ReadyComponent::Storage,
        ReadyComponent::Cluster,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ReadyComponent::Listeners => "listeners",
            ReadyComponent::Storage => "storage",
            ReadyComponent::Cluster => "cluster",
        }
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Readiness flags shared between the components that set them and `/readyz`.
/// Cloning is one `Arc` increment.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug)]
struct HealthInner {
    /// Components that must be ready; fixed at construction.
    required: u8,
    /// Components currently ready, one bit each.
    ready: AtomicU8,
}

impl Health {
    /// Readiness requires only the given components (e.g. no Redis in single-node mode).
    pub fn requiring(components: impl IntoIterator<Item = ReadyComponent>) -> Self {
        let required = components.into_iter().fold(0, |bits, c| bits | c.bit());
        Self {
            inner: Arc::new(HealthInner {
                required,
                ready: AtomicU8::new(0),
            }),
        }
    }

    pub fn set_ready(&self, component: ReadyComponent, ready: bool) {
        // Relaxed is enough: a probe seeing a flip a moment late is harmless, and no
        // other memory is published through these flags.
        if ready {
            self.inner
                .ready
                .fetch_or(component.bit(), Ordering::Relaxed);
        } else {
            self.inner
                .ready
                .fetch_and(!component.bit(), Ordering::Relaxed);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready().next().is_none()
    }

    /// Required components that are not ready yet, in declaration order.
    pub fn not_ready(&self) -> impl Iterator<Item = ReadyComponent> + use<> {
        let ready = self.inner.ready.load(Ordering::Relaxed);
        let required = self.inner.required;
        ReadyComponent::ALL
            .iter()
            .copied()
            .filter(move |c| required & c.bit() != 0 && ready & c.bit() == 0)
    }
}

#[derive(Clone)]
struct AdminState {
    handle: PrometheusHandle,
    health: Health,
}

/// Serves the admin endpoint on `listener` until `shutdown` completes, then finishes
/// in-flight requests and returns. The recorder's upkeep runs inside this future, so
/// dropping it (the node aborts the task once it has stopped) ends both.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let upkeep = {
        let handle = handle.clone();
        async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        }
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AdminState { handle, health });
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    tokio::select! {
        result = server => result,
        // The upkeep loop never ends.
        () = upkeep => Ok(()),
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    crate::metrics::collect_process();
    (
        [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        state.handle.render(),
    )
}

/// Liveness: answering at all is the signal.
async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    let missing: Vec<&str> = state
        .health
        .not_ready()
        .map(ReadyComponent::as_str)
        .collect();
    if missing.is_empty() {
        (StatusCode::OK, "ready".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", missing.join(", ")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    struct Response {
        status: u16,
        headers: String,
        body: String,
    }

    /// A deliberately minimal HTTP/1.1 client: one request per connection, and
    /// `Connection: close` so the body ends at EOF.
    async fn get(addr: std::net::SocketAddr, path: &str) -> Response {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("header terminator");
        let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        Response {
            status,
            headers: headers.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }

    #[test]
    fn readiness_requires_every_required_component() {
        let health = Health::requiring([ReadyComponent::Listeners, ReadyComponent::Storage]);
        assert!(!health.is_ready());
        health.set_ready(ReadyComponent::Storage, true);
        assert_eq!(
            health.not_ready().collect::<Vec<_>>(),
            [ReadyComponent::Listeners]
        );
        health.clone().set_ready(ReadyComponent::Listeners, true);
        assert!(health.is_ready());
        health.set_ready(ReadyComponent::Storage, false);
        assert!(!health.is_ready());

        let storage_only = Health::requiring([ReadyComponent::Storage]);
        storage_only.set_ready(ReadyComponent::Storage, true);
        assert!(storage_only.is_ready());
    }

    #[tokio::test]
    async fn serves_all_endpoints_over_tcp() {
        let metrics = crate::metrics::Metrics::new();
        metrics.stanza_in(crate::metrics::StanzaKind::Presence);
        let handle = crate::metrics::install_recorder();
        let health = Health::requiring([ReadyComponent::Listeners, ReadyComponent::Storage]);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, handle, health.clone(), async {
            let _ = stopped.await;
        }));

        let response = get(addr, "/healthz").await;
        assert_eq!((response.status, response.body.as_str()), (200, "ok"));

        let response = get(addr, "/metrics").await;
        assert_eq!(response.status, 200);
        assert!(
            response
                .headers
                .contains("content-type: text/plain; version=0.0.4"),
            "{}",
            response.headers
        );
        assert!(
            response
                .body
                .contains(r#"shoal_stanzas_in_total{kind="presence"}"#),
            "{}",
            response.body
        );

        let response = get(addr, "/readyz").await;
        assert_eq!(response.status, 503);
        assert_eq!(response.body, "not ready: listeners, storage");

        health.set_ready(ReadyComponent::Listeners, true);
        let response = get(addr, "/readyz").await;
        assert_eq!(
            (response.status, response.body.as_str()),
            (503, "not ready: storage")
        );

        health.set_ready(ReadyComponent::Storage, true);
        let response = get(addr, "/readyz").await;
        assert_eq!((response.status, response.body.as_str()), (200, "ready"));

        assert_eq!(get(addr, "/nope").await.status, 404);

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops after shutdown")
            .unwrap()
            .unwrap();
    }
}
