//! The command line: one subcommand per scenario, each with the connection options
//! flattened in, so options may follow the scenario name. Every run is bounded: client
//! counts, durations and rates have upper limits checked in [`validate`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::negotiate::{Mech, TlsMode};

#[derive(Debug, Parser)]
#[command(
    name = "shoal-load",
    version,
    about = "Simulated XMPP clients for load tests (login storm, open-loop chat, idle soak, step, presence fan-out, MUC)",
    long_about = "Simulated XMPP clients for load tests of any XMPP server.\n\n\
        Usernames are PREFIX0..PREFIX{N-1}, all with one password; create them with \
        --register (XEP-0077) or `shoal user import`. For presence, first provision \
        the rosters once with `shoal-load rosters --clients N --contacts K`, then run \
        `shoal-load presence --clients N --contacts K` with the same N and K. `shoal-load \
        muc --rooms R --occupants N` uses accounts PREFIX0..PREFIX{R*N-1} and rooms \
        PREFIXroom0..PREFIXroom{R-1} on conference.DOMAIN (--service)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Clone, Subcommand, Serialize)]
#[serde(tag = "scenario", rename_all = "lowercase")]
pub enum Scenario {
    /// Login storm: open --clients sessions at --rate per second, report logins/s and
    /// connect/TLS/auth/bind latency.
    Login(LoginArgs),
    /// 1:1 chat between paired sessions at a fixed open-loop message rate.
    Chat(TrafficArgs),
    /// Idle soak: hold authenticated sessions, report server memory per session.
    Idle(IdleArgs),
    /// Raise the chat rate step by step until p99 or loss crosses a threshold.
    Step(StepArgs),
    /// Provision mutual rosters in band, idempotently: each client gets its --contacts
    /// nearest clients on a ring (i±1, i±2, …; when K is odd also i+N/2) with
    /// subscription both. Run once before `presence`.
    Rosters(RostersArgs),
    /// Presence fan-out: every client sends presence updates on an open-loop schedule,
    /// each delivered to its --contacts contacts (provisioned by `rosters`); with
    /// --step, raise the rate until p99 or loss crosses a threshold.
    Presence(PresenceArgs),
    /// Multi-user chat (XEP-0045): --rooms rooms of --occupants sessions each join, then
    /// --senders occupants per room send groupchat messages at an open-loop --rate in
    /// total, each delivered to every occupant; with --step, raise the rate until p99
    /// or loss crosses a threshold.
    Muc(MucArgs),
    /// A mixed "day": clients log in over a ramp, then for --duration some chat, some
    /// change presence, some disconnect and reconnect (churn) and the rest stay idle;
    /// counts and latencies per activity.
    Day(DayArgs),
}

impl Scenario {
    pub fn common(&self) -> &Common {
        match self {
            Scenario::Login(a) => &a.common,
            Scenario::Chat(a) => &a.common,
            Scenario::Idle(a) => &a.common,
            Scenario::Step(a) => &a.chat.common,
            Scenario::Rosters(a) => &a.common,
            Scenario::Presence(a) => &a.traffic.common,
            Scenario::Muc(a) => &a.common,
            Scenario::Day(a) => &a.common,
        }
    }

    /// Where `--plot` asks the SVG to go, for the scenarios that have it.
    pub fn plot(&self) -> Option<&std::path::Path> {
        match self {
            Scenario::Chat(a) => a.load.plot.as_deref(),
            Scenario::Step(a) => a.chat.load.plot.as_deref(),
            Scenario::Presence(a) => a.traffic.load.plot.as_deref(),
            Scenario::Muc(a) => a.load.plot.as_deref(),
            Scenario::Day(a) => a.plot.as_deref(),
            Scenario::Login(_) | Scenario::Idle(_) | Scenario::Rosters(_) => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Login(_) => "login",
            Scenario::Chat(_) => "chat",
            Scenario::Idle(_) => "idle",
            Scenario::Step(_) => "step",
            Scenario::Rosters(_) => "rosters",
            Scenario::Presence(_) => "presence",
            Scenario::Muc(_) => "muc",
            Scenario::Day(_) => "day",
        }
    }
}

/// Options every scenario shares.
#[derive(Debug, Clone, Args, Serialize)]
pub struct Common {
    /// Server endpoint (IP:port); repeat it or give a comma-separated list (`--servers
    /// A,B,C`) for several nodes: clients are spread round-robin, and with --reconnect
    /// a client whose node goes away logs in at the next one.
    #[arg(
        long = "server",
        visible_alias = "servers",
        value_delimiter = ',',
        default_value = "127.0.0.1:5222"
    )]
    pub servers: Vec<SocketAddr>,
    /// The XMPP domain (stream `to`, TLS server name, JID domain).
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    #[arg(long, value_enum, default_value_t = TlsMode::Starttls)]
    pub tls: TlsMode,
    /// CA / certificate file (PEM) to trust for TLS.
    #[arg(long)]
    pub cafile: Option<PathBuf>,
    /// Trust any server certificate (handshake signatures are still checked).
    #[arg(long)]
    pub insecure: bool,
    #[arg(long, value_enum, default_value_t = Mech::ScramSha256)]
    pub mech: Mech,
    /// Usernames are PREFIX0, PREFIX1, ...
    #[arg(long, default_value = "load")]
    pub prefix: String,
    /// The password every simulated user has (kept out of the JSON report).
    #[arg(long, default_value = "load-password")]
    #[serde(skip)]
    pub password: String,
    /// Spread connections over source addresses 127.0.0.1..=127.0.0.K (loopback targets
    /// only), so more connections fit than one address's ephemeral port range.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_addrs: u8,
    /// Seconds one login (or registration, or MUC join) may take before it counts as
    /// failed.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Logins in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Logins started per second (0: as fast as --concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    pub login_rate: f64,
    /// Spread the logins over this many seconds (sets the login rate when --login-rate
    /// is 0).
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// Create the accounts by XEP-0077 in-band registration before the run.
    #[arg(long)]
    pub register: bool,
    /// Write machine-readable results to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Print the live progress line even when stderr is not a terminal.
    #[arg(long)]
    pub progress: bool,
    /// The server's process id (same machine): report its CPU and RSS.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// The server's Prometheus page (http://IP:port/metrics) for `shoal_sessions`.
    #[arg(long)]
    pub metrics_url: Option<String>,
    /// Allow endpoints outside 127.0.0.0/8 and ::1.
    #[arg(long)]
    pub allow_remote: bool,
    /// When the server ends a session (`<system-shutdown/>`, `<see-other-host/>`, any
    /// other close) or its connection drops, log in again: at the host see-other-host
    /// names, else at the next --server in turn, with backoff (50 ms doubling to 2 s).
    /// The session keeps counting, so messages delivered after the reconnect (offline
    /// ones, with an XEP-0203 delay) count as delivered. Rooms are not joined again.
    #[arg(long)]
    pub reconnect: bool,
    /// Logins a reconnecting session tries before it gives up.
    #[arg(long, default_value_t = 10)]
    pub reconnect_attempts: u32,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct LoginArgs {
    #[command(flatten)]
    pub common: Common,
    /// Sessions to open.
    #[arg(long)]
    pub clients: usize,
    /// Logins per second (0: as fast as --concurrency allows); same as --login-rate.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds to hold all sessions open after the last login.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
}

/// The sessions and open-loop traffic of `chat`, `step` and `presence`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct TrafficArgs {
    #[command(flatten)]
    pub common: Common,
    /// Sessions. Chat pairs them up (client 2k talks to 2k+1; an odd last one stays
    /// idle); presence gives each its --contacts ring neighbours.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub load: OpenLoop,
}

/// The open-loop offered load of the traffic scenarios (`chat`, `step`, `presence`,
/// `muc`).
#[derive(Debug, Clone, Args, Serialize)]
pub struct OpenLoop {
    /// Stanzas per second offered in total (chat messages, presence updates or
    /// groupchat messages), on an open-loop schedule.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Chat body, presence status or groupchat body size in bytes (at least the probe
    /// header, ~30 bytes).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds of measured traffic.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to wait after the last send for stanzas in flight.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Write an SVG of sent/received per second and p50/p99 latency per second.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long)]
    pub clients: usize,
    /// Seconds to hold the sessions idle.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds between whitespace keepalives on each session.
    #[arg(long, default_value_t = 60.0)]
    pub keepalive: f64,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct StepArgs {
    /// --rate is the first step's rate, --duration is ignored (see --step-duration).
    #[command(flatten)]
    pub chat: TrafficArgs,
    /// Messages per second added at each step.
    #[arg(long, default_value_t = 1000.0)]
    pub step: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub limits: StepLimits,
}

/// When a step search stops. A step that crosses a limit is run once more at the same
/// rate; the search stops when it crosses a limit again.
#[derive(Debug, Clone, Args, Serialize)]
pub struct StepLimits {
    /// Seconds each step runs.
    #[arg(long, default_value_t = 10.0)]
    pub step_duration: f64,
    /// Stop when a step's p99 latency exceeds this many milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub p99_max_ms: f64,
    /// Stop when a step loses more than this fraction of its expected deliveries.
    #[arg(long, default_value_t = 0.001)]
    pub max_loss: f64,
    /// Never offer more than this many stanzas per second.
    #[arg(long, default_value_t = 1_000_000.0)]
    pub max_rate: f64,
    /// At most this many steps.
    #[arg(long, default_value_t = 50)]
    pub max_steps: u32,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct RostersArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long)]
    pub clients: usize,
    /// Contacts per client (an odd number needs an even --clients).
    #[arg(long, default_value_t = 10)]
    pub contacts: usize,
    /// Seconds to wait for every roster to be complete before reporting what is missing.
    #[arg(long, default_value_t = 60.0)]
    pub wait: f64,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct PresenceArgs {
    /// --rate is presence updates per second from all clients together; each is
    /// delivered to --contacts sessions.
    #[command(flatten)]
    pub traffic: TrafficArgs,
    /// Contacts per client, as provisioned by `rosters`.
    #[arg(long, default_value_t = 10)]
    pub contacts: usize,
    /// At most this many seconds to wait for the initial presence fan-out to settle
    /// before the updates start.
    #[arg(long, default_value_t = 10.0)]
    pub settle: f64,
    /// Step mode: add this many updates per second at each step (--rate is the first
    /// step's, --duration is ignored: see --step-duration).
    #[arg(long)]
    pub step: Option<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub limits: StepLimits,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct MucArgs {
    #[command(flatten)]
    pub common: Common,
    /// Rooms, named PREFIXroomR (lowercase) on --service.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Occupants per room: client i joins room i / OCCUPANTS with its username as
    /// nick, so the run uses accounts PREFIX0..PREFIX{ROOMS*OCCUPANTS-1}.
    #[arg(long, default_value_t = 100)]
    pub occupants: usize,
    /// The MUC service (default: conference.DOMAIN).
    #[arg(long)]
    pub service: Option<String>,
    /// Occupants per room that send (the first ones, all of them when there are fewer);
    /// --rate is shared by the senders of all rooms.
    #[arg(long, default_value_t = 5)]
    pub senders: usize,
    /// Joins in flight at once. Each join makes the server send the newcomer every
    /// occupant's presence and every occupant the newcomer's, so a room's joins cost
    /// presence traffic that grows with the square of its occupants: 32 joins at once
    /// into a room of 1000 overflowed Shoal's shard mailboxes (presence dropped,
    /// joins timed out), 4 did not.
    #[arg(long, default_value_t = 4)]
    pub join_concurrency: usize,
    /// --rate is groupchat messages per second from all senders together; each is
    /// delivered to every other occupant of its room (the sender's own copy is
    /// counted apart, as its echo).
    #[command(flatten)]
    #[serde(flatten)]
    pub load: OpenLoop,
    /// Step mode: add this many messages per second at each step (--rate is the first
    /// step's, --duration is ignored: see --step-duration).
    #[arg(long)]
    pub step: Option<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub limits: StepLimits,
}

impl MucArgs {
    /// The MUC service's domain: --service, else `conference.` + the XMPP domain.
    pub fn service(&self) -> String {
        self.service
            .clone()
            .unwrap_or_else(|| format!("conference.{}", self.common.domain))
    }
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct DayArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Seconds of activity after the logins (which take --ramp, or a tenth of this
    /// when neither --ramp nor --login-rate is given).
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Seconds to wait after the last send for stanzas in flight.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Chat body and presence status size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Share of clients that chat in pairs; the clients not given an activity stay idle.
    #[arg(long, default_value_t = 0.3)]
    pub chat_share: f64,
    /// Share of clients that change presence.
    #[arg(long, default_value_t = 0.2)]
    pub presence_share: f64,
    /// Share of clients that disconnect and reconnect.
    #[arg(long, default_value_t = 0.1)]
    pub churn_share: f64,
    /// Messages per second each chatting client sends.
    #[arg(long, default_value_t = 0.5)]
    pub chat_rate: f64,
    /// Presence updates per second each presence client sends.
    #[arg(long, default_value_t = 0.1)]
    pub presence_rate: f64,
    /// Seconds each churning client stays connected between reconnects.
    #[arg(long, default_value_t = 10.0)]
    pub churn_every: f64,
    /// Contacts per client as provisioned by `rosters` (0: rosters are not assumed, and
    /// presence updates are counted as sent only).
    #[arg(long, default_value_t = 0)]
    pub contacts: usize,
    /// Write an SVG of sent/received per second and p50/p99 latency per second.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// Upper bounds that keep every run finite and sized for one machine.
pub const MAX_CLIENTS: usize = 1_000_000;
pub const MAX_SECONDS: f64 = 24.0 * 3600.0;
pub const MAX_RATE: f64 = 10_000_000.0;

/// Checks the arguments; all problems are reported at once.
pub fn validate(s: &Scenario) -> anyhow::Result<()> {
    let errors = std::cell::RefCell::new(Vec::new());
    let c = s.common();
    let secs = |name: &str, v: f64| {
        if !(0.0..=MAX_SECONDS).contains(&v) {
            errors.borrow_mut().push(format!(
                "--{name} must be between 0 and {MAX_SECONDS} seconds"
            ));
        }
    };
    let contacts = |clients: usize, k: usize| {
        if let Err(e) = crate::roster::check(clients, k) {
            errors.borrow_mut().push(e);
        }
    };
    // The open-loop options of a traffic scenario; returns its first rate.
    let open_loop = |l: &OpenLoop, timed: bool| {
        if timed {
            secs("duration", l.duration);
        }
        secs("drain", l.drain);
        ("rate", l.rate)
    };
    secs("timeout", c.timeout);
    secs("ramp", c.ramp);
    let (clients, rates): (usize, Vec<(&str, f64)>) = match s {
        Scenario::Login(a) => {
            secs("hold", a.hold);
            (a.clients, vec![("rate", a.rate)])
        }
        Scenario::Chat(a) => (a.clients, vec![open_loop(&a.load, true)]),
        Scenario::Idle(a) => {
            secs("duration", a.duration);
            secs("keepalive", a.keepalive);
            (a.clients, vec![])
        }
        Scenario::Step(a) => {
            secs("step-duration", a.limits.step_duration);
            (
                a.chat.clients,
                vec![
                    open_loop(&a.chat.load, false),
                    ("step", a.step),
                    ("max-rate", a.limits.max_rate),
                ],
            )
        }
        Scenario::Rosters(a) => {
            secs("wait", a.wait);
            contacts(a.clients, a.contacts);
            (a.clients, vec![])
        }
        Scenario::Presence(a) => {
            let t = &a.traffic;
            secs("settle", a.settle);
            secs("step-duration", a.limits.step_duration);
            contacts(t.clients, a.contacts);
            let mut rates = vec![open_loop(&t.load, true), ("max-rate", a.limits.max_rate)];
            rates.extend(a.step.map(|s| ("step", s)));
            (t.clients, rates)
        }
        Scenario::Muc(a) => {
            secs("step-duration", a.limits.step_duration);
            let mut muc = errors.borrow_mut();
            if a.occupants < 2 {
                muc.push("--occupants must be at least 2".into());
            }
            if a.senders == 0 {
                muc.push("--senders must be at least 1".into());
            }
            if a.join_concurrency == 0 {
                muc.push("--join-concurrency must be at least 1".into());
            }
            if a.service
                .as_deref()
                .is_some_and(|s| s.is_empty() || s.contains(['@', '/']))
            {
                muc.push("--service must be a domain".into());
            }
            drop(muc);
            let mut rates = vec![open_loop(&a.load, true), ("max-rate", a.limits.max_rate)];
            rates.extend(a.step.map(|s| ("step", s)));
            (a.rooms.saturating_mul(a.occupants), rates)
        }
        Scenario::Day(a) => {
            secs("duration", a.duration);
            secs("drain", a.drain);
            secs("churn-every", a.churn_every);
            if a.contacts > 0 {
                contacts(a.clients, a.contacts);
            }
            let shares = [a.chat_share, a.presence_share, a.churn_share];
            if shares.iter().any(|s| !(0.0..=1.0).contains(s)) || shares.iter().sum::<f64>() > 1.0 {
                errors.borrow_mut().push(
                    "the --*-share values must be between 0 and 1 and add up to at most 1".into(),
                );
            }
            if a.churn_every <= 0.0 {
                errors
                    .borrow_mut()
                    .push("--churn-every must be positive".into());
            }
            (
                a.clients,
                vec![
                    ("chat-rate", a.chat_rate),
                    ("presence-rate", a.presence_rate),
                ],
            )
        }
    };
    let mut errors = errors.into_inner();
    if c.timeout <= 0.0 {
        errors.push("--timeout must be positive".into());
    }
    if !(1..=MAX_CLIENTS).contains(&clients) {
        let what = match s {
            Scenario::Muc(_) => "--rooms x --occupants",
            _ => "--clients",
        };
        errors.push(format!("{what} must be between 1 and {MAX_CLIENTS}"));
    }
    if matches!(s, Scenario::Chat(_) | Scenario::Step(_)) && clients < 2 {
        errors.push("chat needs at least 2 clients".into());
    }
    if matches!(
        s,
        Scenario::Chat(_) | Scenario::Step(_) | Scenario::Presence(_) | Scenario::Muc(_)
    ) && rates[0].1 <= 0.0
    {
        errors.push("--rate must be positive".into());
    }
    for (name, v) in rates.into_iter().chain([("login-rate", c.login_rate)]) {
        if !(0.0..=MAX_RATE).contains(&v) {
            errors.push(format!("--{name} must be between 0 and {MAX_RATE}"));
        }
    }
    if c.concurrency == 0 {
        errors.push("--concurrency must be at least 1".into());
    }
    if c.reconnect && c.reconnect_attempts == 0 {
        errors.push("--reconnect-attempts must be at least 1".into());
    }
    if c.servers.is_empty() {
        errors.push("at least one --server is needed".into());
    }
    if !c.allow_remote {
        for s in &c.servers {
            if !s.ip().is_loopback() {
                errors.push(format!(
                    "{s} is not a loopback address (pass --allow-remote to load a remote server)"
                ));
            }
        }
    }
    if c.tls != TlsMode::None && c.cafile.is_none() && !c.insecure {
        errors.push("TLS needs --cafile FILE or --insecure".into());
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("invalid arguments:\n  {}", errors.join("\n  "))
    }
}

/// The source addresses to spread connections over: 127.0.0.1..=127.0.0.K when every
/// endpoint is IPv4 loopback, otherwise none (the OS picks).
pub fn source_addresses(c: &Common) -> Vec<IpAddr> {
    let all_loopback_v4 = c
        .servers
        .iter()
        .all(|s| matches!(s.ip(), IpAddr::V4(v4) if v4.is_loopback()));
    if !all_loopback_v4 {
        return Vec::new();
    }
    (1..=c.source_addrs)
        .map(|k| IpAddr::V4(Ipv4Addr::new(127, 0, 0, k)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Scenario {
        let mut v = vec!["shoal-load"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().scenario
    }

    #[test]
    fn parses_and_validates() {
        let s = parse(&[
            "chat",
            "--clients",
            "10",
            "--rate",
            "100",
            "--tls",
            "none",
            "--mech",
            "plain",
        ]);
        validate(&s).unwrap();
        assert_eq!(s.common().source_addrs, 8);
        assert_eq!(source_addresses(s.common()).len(), 8);
        assert!(!s.common().reconnect);

        let s = parse(&[
            "chat",
            "--servers",
            "127.0.0.1:5222,127.0.0.2:5223",
            "--server",
            "127.0.0.3:5224",
            "--reconnect",
            "--tls",
            "none",
        ]);
        validate(&s).unwrap();
        let ports: Vec<u16> = s.common().servers.iter().map(|a| a.port()).collect();
        assert_eq!(ports, [5222, 5223, 5224]);
        assert_eq!(s.common().reconnect_attempts, 10);
        let s = parse(&[
            "chat",
            "--reconnect",
            "--reconnect-attempts",
            "0",
            "--tls",
            "none",
        ]);
        let err = validate(&s).unwrap_err().to_string();
        assert!(err.contains("--reconnect-attempts"), "{err}");

        let s = parse(&["login", "--clients", "0", "--server", "10.1.2.3:5222"]);
        let err = validate(&s).unwrap_err().to_string();
        assert!(err.contains("--clients"), "{err}");
        assert!(err.contains("not a loopback"), "{err}");
        assert!(err.contains("--cafile"), "{err}");

        let s = parse(&[
            "step",
            "--clients",
            "4",
            "--tls",
            "direct",
            "--insecure",
            "--step",
            "500",
        ]);
        validate(&s).unwrap();
        let s = parse(&[
            "presence",
            "--clients",
            "5",
            "--contacts",
            "3",
            "--tls",
            "none",
            "--step",
            "1e9",
        ]);
        let err = validate(&s).unwrap_err().to_string();
        assert!(err.contains("odd --contacts"), "{err}");
        assert!(err.contains("--step"), "{err}");
        let s = parse(&[
            "rosters",
            "--clients",
            "6",
            "--contacts",
            "3",
            "--tls",
            "none",
        ]);
        validate(&s).unwrap();
        let s = parse(&["muc", "--rooms", "3", "--occupants", "4", "--tls", "none"]);
        validate(&s).unwrap();
        let Scenario::Muc(m) = &s else { unreachable!() };
        assert_eq!(m.service(), "conference.localhost");
        let s = parse(&[
            "muc",
            "--occupants",
            "1",
            "--senders",
            "0",
            "--join-concurrency",
            "0",
            "--service",
            "a@b",
            "--tls",
            "none",
        ]);
        let err = validate(&s).unwrap_err().to_string();
        for what in [
            "--occupants",
            "--senders",
            "--join-concurrency",
            "--service",
        ] {
            assert!(err.contains(what), "{what}: {err}");
        }
        let s = parse(&[
            "muc",
            "--rooms",
            "2000",
            "--occupants",
            "1000",
            "--tls",
            "none",
        ]);
        let err = validate(&s).unwrap_err().to_string();
        assert!(err.contains("--rooms x --occupants"), "{err}");
        let s = parse(&[
            "idle",
            "--clients",
            "4",
            "--tls",
            "none",
            "--duration",
            "100000",
        ]);
        assert!(validate(&s).is_err());
    }
}
