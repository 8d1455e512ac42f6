//! `shoal-load`: thousands of simulated XMPP clients in one process, for measuring Shoal
//! (or any XMPP server) under a login storm, open-loop 1:1 chat, an idle soak, a stepped
//! search for the highest sustainable message rate, presence fan-out to rosters it
//! provisions itself, groupchat in MUC rooms it fills itself, or a mixed day.
//!
//! Scenarios (`shoal-load SCENARIO --help` for every option):
//! - `login`, `idle`: a login storm; sessions held idle for server memory per session.
//! - `chat`, `step`: open-loop 1:1 messages between pairs, at one rate or stepped up
//!   until p99 latency or loss crosses a threshold.
//! - `rosters`: provisions, in band and idempotently, mutual rosters on a ring (each
//!   client with its `--contacts` nearest clients); run once per server and data set.
//! - `presence`: open-loop presence updates, each counted at every contact's session
//!   (expected, received, lost, duplicated, reordered, latency); `--step` searches
//!   the highest sustainable update rate like `step`.
//! - `muc`: `--rooms` MUC rooms of `--occupants` sessions each (joins bounded by
//!   `--join-concurrency`; each room's first joiner creates it and accepts the instant
//!   room), then open-loop groupchat messages from `--senders` occupants per room, each
//!   counted at every other occupant (the sender's own copy is reported apart as its
//!   echo); `--step` searches the highest sustainable message rate.
//! - `day`: ramped logins, then chat, presence changes, reconnect churn and idle
//!   sessions side by side, reported per activity.
//!
//! Several nodes: `--servers A,B,C` (or `--server` repeated) spreads the clients
//! round-robin. `--reconnect` keeps every session alive across the server ending it,
//! for rolling restarts: a client whose stream ends (`<system-shutdown/>`,
//! `<see-other-host/>`, any other close) or whose connection drops answers the close
//! with its own, logs in again (at the host see-other-host names, else at the next
//! endpoint in turn; backoff from 50 ms doubling to 2 s, at most
//! `--reconnect-attempts` logins) and keeps counting into the same phase. Senders wait
//! while their session reconnects and never write a stanza twice, so the final tally
//! is exact: every chat message counts once as delivered (live, or from offline
//! storage with an XEP-0203 delay: `delayed`), as a duplicate, or as lost after the
//! drain; the report adds how sessions ended (`ended: system-shutdown xN`),
//! reconnects, clients that gave up, and stanzas whose write met a broken connection.
//! `tests/tests/rolling.rs` restarts the three nodes of a cluster one by one under
//! `chat --reconnect` and asserts that nothing is lost or duplicated.
//!
//! `--plot FILE.svg` (chat, step, presence, muc, day) draws sent/received per second and
//! p50/p99 latency per second. A typical presence run on accounts `load0..load999`:
//! `shoal-load rosters --clients 1000 --contacts 10`, then `shoal-load presence
//! --clients 1000 --contacts 10 --rate 500 --step 500 --plot presence.svg`. Echoes of
//! groupchat messages are left out of the plot and of the progress line's received
//! count, as they are out of the deliveries. A muc run on accounts `load0..load1999`:
//! `shoal-load muc --rooms 2 --occupants 1000 --rate 20 --step 20`.
//!
//! Code map:
//! - `negotiate`: the client negotiation as a sans-IO state machine over `shoal-xmpp`
//!   (framer, stream headers, SCRAM/PLAIN client).
//! - `conn`: the async driver of one connection (source address, TLS, deadlines).
//! - `schedule`: the open-loop send schedule and per-flow loss/duplicate/order
//!   accounting, sans-IO.
//! - `session`: reader and sender tasks of established sessions.
//! - `roster`: the contact ring of the presence scenarios and its roster stanzas,
//!   sans-IO.
//! - `muc`: the room layout of the muc scenario and its XEP-0045 stanzas, sans-IO.
//! - `scenario`: the scenarios; `monitor`, `sysmon`, `stats`, `report`: measurement and
//!   output; `plot`: the `--plot` SVG; `cli`: the command line.
//!
//! The generator talks to servers only over sockets and never reaches into a server's
//! internals; it reads a co-located server's `/proc` entries and `/metrics` page, nothing
//! else.

pub mod cli;
pub mod conn;
pub mod monitor;
pub mod muc;
pub mod negotiate;
pub mod plot;
pub mod report;
pub mod roster;
pub mod scenario;
pub mod schedule;
pub mod session;
pub mod stats;
pub mod sysmon;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cli::Scenario;
use conn::{ConnectConfig, Connector};
use report::Report;
use scenario::Run;
use session::Counters;
use sysmon::ProcReport;

/// Runs one scenario to completion and returns its report (with warnings added).
pub async fn run(scenario: Scenario) -> anyhow::Result<Report> {
    cli::validate(&scenario)?;
    let c = scenario.common();
    let tls_config = match c.tls {
        negotiate::TlsMode::None => None,
        _ => Some(tls::client_config(c.cafile.as_deref(), c.insecure)?),
    };
    let connector = Arc::new(Connector::new(ConnectConfig {
        servers: c.servers.clone(),
        sources: cli::source_addresses(c),
        domain: c.domain.clone(),
        tls: c.tls,
        tls_config,
        mech: c.mech,
        prefix: c.prefix.clone(),
        password: c.password.clone(),
        timeout: Duration::from_secs_f64(c.timeout),
    }));
    let counters = Arc::new(Counters::default());
    let server_pid = c.server_pid;
    let server_before = match server_pid {
        Some(pid) => Some(sysmon::sample(&pid.to_string())?),
        None => None,
    };
    let self_before = sysmon::sample("self")?;
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let epoch = tokio::time::Instant::now();
    let monitor = monitor::Monitor::start(
        scenario.name(),
        epoch,
        counters.clone(),
        server_pid,
        c.progress,
    );
    let timeline = scenario
        .plot()
        .map(|_| Arc::new(stats::Timeline::default()));
    let run = Run {
        connector: connector.clone(),
        counters: counters.clone(),
        epoch,
        server_pid,
        metrics_url: c.metrics_url.clone(),
        timeline: timeline.clone(),
        reconnect: c.reconnect.then(|| session::Reconnect {
            connector: connector.clone(),
            attempts: c.reconnect_attempts,
            allow_remote: c.allow_remote,
        }),
    };
    let out = match &scenario {
        Scenario::Login(a) => run.login(a).await,
        Scenario::Chat(a) => run.chat(a).await,
        Scenario::Idle(a) => run.idle(a).await,
        Scenario::Step(a) => run.step(a).await,
        Scenario::Rosters(a) => run.rosters(a).await,
        Scenario::Presence(a) => run.presence(a).await,
        Scenario::Muc(a) => run.muc(a).await,
        Scenario::Day(a) => run.day(a).await,
    };
    let observed = monitor.finish().await;
    let peaks = observed.peaks;
    if let (Some(path), Some(timeline)) = (scenario.plot(), &timeline) {
        let title = format!("shoal-load {}", scenario.name());
        plot::write_svg(path, &title, &observed.ticks, &timeline.summary())?;
    }
    let self_after = sysmon::sample("self")?;
    let server = match (server_pid, server_before) {
        (Some(pid), Some(before)) => sysmon::sample(&pid.to_string())
            .ok()
            .map(|after| ProcReport::between(&before, &after, peaks.server_rss_kib)),
        _ => None,
    };
    let mut report = Report {
        scenario: scenario.name(),
        started_unix,
        wall_secs: self_after.at.duration_since(self_before.at).as_secs_f64(),
        params: scenario.clone(),
        registration: out.registration,
        login: out.login,
        chat: out.chat,
        presence: out.presence,
        groupchat: out.groupchat,
        echo: out.echo,
        muc: out.muc,
        rosters: out.rosters,
        settle: out.settle,
        day: out.day,
        step: out.step,
        idle: out.idle,
        late_messages: counters.late.load(Ordering::Relaxed),
        bounced_messages: counters.bounced.load(Ordering::Relaxed),
        disconnected: counters.disconnected.load(Ordering::Relaxed),
        ends: counters.ends.lock().clone(),
        reconnects: counters.reconnects.load(Ordering::Relaxed),
        reconnects_given_up: counters.reconnects_given_up.load(Ordering::Relaxed),
        write_failed: counters.write_failed.load(Ordering::Relaxed),
        generator: ProcReport::between(&self_before, &self_after, peaks.own_rss_kib),
        server,
        warnings: Vec::new(),
    };
    report.add_warnings();
    Ok(report)
}

/// What the unit tests of the sans-IO modules share.
#[cfg(test)]
mod testing {
    use bytes::Bytes;
    use shoal_xmpp::stanza::{Stanza, TopLevel, parse_top_level};
    use shoal_xmpp::xml::NsContext;

    /// `xml` parsed as a client stream's stanza; panics on anything else.
    pub fn stanza(xml: &str) -> Stanza {
        match parse_top_level(&Bytes::copy_from_slice(xml.as_bytes()), NsContext::CLIENT) {
            Ok(TopLevel::Stanza(s)) => s,
            other => panic!("not a stanza: {other:?}"),
        }
    }
}
