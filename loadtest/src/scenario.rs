//! The scenarios: login storm, open-loop chat, idle soak, step, roster provisioning,
//! presence fan-out and multi-user chat, built from the connector (`conn`), live
//! sessions (`session`), the schedule, the contact ring (`roster`) and the room layout
//! (`muc`).
//!
//! Chat, presence and groupchat are the same machinery: a traffic phase is a set of
//! senders, each with a schedule, a carrier (chat body, presence status or groupchat
//! body) and the sessions each of its stanzas must reach; the accounting of expected,
//! received, lost, duplicated and reordered deliveries is one function for all.
//!
//! Each scenario is bounded: a fixed number of clients, fixed durations, and every wait
//! either has a deadline or ends when the work it waits for does.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use shoal_xmpp::stanza::{IqType, Kind};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cli::{
    Common, DayArgs, IdleArgs, LoginArgs, MucArgs, OpenLoop, PresenceArgs, RostersArgs, StepArgs,
    StepLimits, TrafficArgs,
};
use crate::conn::{Connector, Established};
use crate::muc::{self, JoinAnswer};
use crate::negotiate::{Outcome, stanza_error_condition};
use crate::roster;
use crate::schedule::Schedule;
use crate::session::{
    Carrier, Counters, Live, PhaseReceived, Reconnect, RunContext, SendPlan, send_phase,
};
use crate::stats::{Failures, Latency, Percentiles, Timeline};
use crate::sysmon;

/// Results of the login phase of any scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoginReport {
    pub attempted: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub failures: Failures,
    pub wall_secs: f64,
    /// Successful logins per second of wall time.
    pub logins_per_sec: f64,
    /// The login rate asked for (0: as fast as the concurrency allows).
    pub target_rate: f64,
    pub connect: Percentiles,
    /// Absent for plain TCP.
    pub tls: Option<Percentiles>,
    pub auth: Percentiles,
    pub bind: Percentiles,
    /// Connect to initial presence.
    pub total: Percentiles,
}

/// Results of in-band registration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegisterReport {
    pub created: u64,
    pub existing: u64,
    pub failed: u64,
    pub failures: Failures,
    pub wall_secs: f64,
}

/// Results of one traffic phase of one carrier: the whole `chat` or `presence` run, one
/// step of a step search, or one activity of `day`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseReport {
    pub phase: u32,
    pub target_rate: f64,
    pub duration_secs: f64,
    pub size: usize,
    pub senders: u64,
    /// Stanzas scheduled in the phase (what the target rate asked for).
    pub scheduled: u64,
    pub sent: u64,
    /// Deliveries the sent stanzas call for: one per chat message, one per contact
    /// session for a presence update, one per other occupant for a groupchat message
    /// (the sender's own copy is reported apart, as its echo).
    pub expected: u64,
    /// Distinct expected deliveries received.
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Distinct deliveries that came with an XEP-0203 delay: kept in offline storage
    /// while the receiver had no session (`--reconnect`), then delivered.
    pub delayed: u64,
    /// Distinct deliveries from a sender the receiver does not expect (none with a
    /// correct server and rosters provisioned as asked).
    pub unexpected: u64,
    /// Lost deliveries over expected ones.
    pub loss_fraction: f64,
    /// Stanzas sent per second.
    pub send_rate: f64,
    /// Deliveries received per second.
    pub receive_rate: f64,
    /// End-to-end latency from each message's scheduled send time.
    pub latency: Percentiles,
    /// CPU over the phase (sending and drain), in percent of one core.
    pub generator_cpu_percent: f64,
    pub server_cpu_percent: Option<f64>,
}

/// Results of the idle soak.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleReport {
    pub sessions: u64,
    pub held_secs: f64,
    pub disconnected: u64,
    pub server_rss_kib_before: Option<u64>,
    pub server_rss_kib_after: Option<u64>,
    pub metrics_sessions_before: Option<f64>,
    pub metrics_sessions_after: Option<f64>,
    /// Server RSS growth divided by the sessions held.
    pub bytes_per_session: Option<f64>,
}

/// Results of roster provisioning.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RostersReport {
    pub clients: u64,
    pub contacts: u64,
    /// Roster items the ring calls for (clients × contacts).
    pub items_expected: u64,
    /// Items already mutual when the run started.
    pub items_present_before: u64,
    pub subscribe_sent: u64,
    pub subscribed_sent: u64,
    /// Subscription requests answered as they arrived.
    pub requests_approved: u64,
    /// Roster checks made (one roster get per session each).
    pub rounds: u32,
    /// Items not mutual at the end (a client that could not log in counts all of its).
    pub items_missing: u64,
    pub clients_incomplete: u64,
    pub complete: bool,
    pub wall_secs: f64,
}

/// How the initial presence fan-out of `presence`, or the occupants' presence of `muc`'s
/// joins, settled before the traffic.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SettleReport {
    /// One available presence per session and contact that is online; for `muc`, the
    /// square of each room's occupants (every occupant told of every other, and itself).
    pub expected: u64,
    pub received: u64,
    pub secs: f64,
}

/// Results of `day` besides its chat and presence phases.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DayReport {
    /// Clients given each activity.
    pub idle_clients: u64,
    pub chat_clients: u64,
    pub presence_clients: u64,
    pub churn_clients: u64,
    pub duration_secs: f64,
    pub churn: ChurnReport,
}

/// What the churning clients did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnReport {
    pub reconnects: u64,
    pub failed: u64,
    pub failures: Failures,
    /// Connect to initial presence of each reconnect.
    pub reconnect: Percentiles,
}

/// How the `muc` occupants got into their rooms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MucReport {
    pub service: String,
    pub rooms: u64,
    pub occupants_per_room: u64,
    /// Joins tried (one per session that logged in).
    pub joins_attempted: u64,
    pub joined: u64,
    pub join_failed: u64,
    /// Failed joins by reason (`timeout`, `session-closed`, the room's error condition,
    /// or `configure:` and the condition when the creator's instant-room form failed).
    pub join_failures: Failures,
    /// Rooms that answered their first joiner with 201 (created), and of those the
    /// ones whose instant-room form was accepted.
    pub rooms_created: u64,
    pub rooms_configured: u64,
    /// From the first join sent to the last occupant's own presence.
    pub join_wall_secs: f64,
    /// Each join, from the join presence sent to the client's own presence (110); a
    /// creator's includes configuring the room.
    pub join_latency: Percentiles,
    /// The occupants' presence the joins caused, until it stopped arriving.
    pub presence: SettleReport,
    /// Senders per room (at most --senders; fewer where fewer occupants got in).
    pub senders: u64,
}

/// Results of the step search.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepReport {
    /// The highest step rate that met both thresholds.
    pub highest_sustained_rate: Option<f64>,
    pub stopped_because: String,
}

/// What a scenario produced, besides the login phase.
#[derive(Debug, Default)]
pub struct Outcomes {
    pub registration: Option<RegisterReport>,
    pub login: LoginReport,
    pub chat: Vec<PhaseReport>,
    pub presence: Vec<PhaseReport>,
    pub groupchat: Vec<PhaseReport>,
    pub echo: Vec<PhaseReport>,
    pub muc: Option<MucReport>,
    pub idle: Option<IdleReport>,
    pub step: Option<StepReport>,
    pub rosters: Option<RostersReport>,
    pub settle: Option<SettleReport>,
    pub day: Option<DayReport>,
}

/// One sender of a traffic phase.
pub struct Sender {
    /// Its position among the phase's sessions.
    pub at: usize,
    pub carrier: Carrier,
    /// The bare JID its stanzas are addressed to: the chat partner's or the room's
    /// (empty for presence).
    pub address: String,
    /// Positions of the sessions each of its stanzas must reach (for chat, the one the
    /// messages are addressed to; for groupchat, the room's other occupants).
    pub to: Vec<usize>,
    pub schedule: Schedule,
}

/// Where one sender of [`Run::carrier_phase`] sends, whatever the phase's rate.
#[derive(Debug, Clone)]
pub struct Route {
    pub at: usize,
    pub address: String,
    pub to: Vec<usize>,
}

/// How long a phase sends, how long it then waits for deliveries in flight, and the
/// probe size.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub duration: Duration,
    pub drain: Duration,
    pub size: usize,
}

impl Pace {
    fn new(duration: f64, drain: f64, size: usize) -> Self {
        Self {
            duration: Duration::from_secs_f64(duration),
            drain: Duration::from_secs_f64(drain),
            size,
        }
    }
}

/// What [`Run::open_loop`] measured: the carrier's reports (one per phase), the
/// groupchat senders' echoes, and the step search's verdict when there was one.
struct Measured {
    reports: Vec<PhaseReport>,
    echoes: Vec<PhaseReport>,
    step: Option<StepReport>,
}

/// A traffic phase: senders of any carriers over the same sessions, measured together.
pub struct Phase {
    pub phase: u32,
    pub pace: Pace,
    pub senders: Vec<Sender>,
}

/// A phase's reports, one per carrier that had senders, and one of the groupchat
/// senders' echoes.
#[derive(Debug, Default)]
pub struct PhaseResults {
    pub chat: Option<PhaseReport>,
    pub presence: Option<PhaseReport>,
    pub groupchat: Option<PhaseReport>,
    pub echo: Option<PhaseReport>,
}

impl PhaseResults {
    fn take(&mut self, carrier: Carrier) -> Option<PhaseReport> {
        match carrier {
            Carrier::Chat => self.chat.take(),
            Carrier::Presence => self.presence.take(),
            Carrier::Groupchat => self.groupchat.take(),
        }
    }
}

/// Shared state of a run.
pub struct Run {
    pub connector: Arc<Connector>,
    pub counters: Arc<Counters>,
    /// Probe timestamps are microseconds since this instant.
    pub epoch: Instant,
    pub server_pid: Option<u32>,
    pub metrics_url: Option<String>,
    /// Per-second latencies, kept when a plot is asked for.
    pub timeline: Option<Arc<Timeline>>,
    /// How sessions log in again when their connection ends (`--reconnect`).
    pub reconnect: Option<Reconnect>,
}

impl Run {
    fn context(&self) -> RunContext {
        RunContext {
            epoch: self.epoch,
            counters: self.counters.clone(),
            timeline: self.timeline.clone(),
            reconnect: self.reconnect.clone(),
        }
    }

    /// Registers clients `0..count` by XEP-0077.
    pub async fn register_all(&self, count: usize, concurrency: usize) -> RegisterReport {
        let start = Instant::now();
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore open");
            let connector = self.connector.clone();
            tasks.push(tokio::spawn(async move {
                let r = connector.register(i).await;
                drop(permit);
                r
            }));
        }
        let mut report = RegisterReport::default();
        for t in tasks {
            match t.await {
                Ok(Ok(Outcome::Registered)) => report.created += 1,
                Ok(Ok(_)) => report.existing += 1,
                Ok(Err(e)) => {
                    report.failed += 1;
                    report.failures.add(e.reason());
                }
                Err(_) => {
                    report.failed += 1;
                    report.failures.add("panic".into());
                }
            }
        }
        report.wall_secs = start.elapsed().as_secs_f64();
        report
    }

    /// Logs clients `0..count` in, starting `rate` per second (0: as fast as
    /// `concurrency` allows), at most `concurrency` in flight. An open-loop login
    /// schedule slips only when the concurrency bound is reached.
    pub async fn login_all(
        &self,
        count: usize,
        rate: f64,
        concurrency: usize,
    ) -> (Vec<Established>, LoginReport) {
        let start = Instant::now();
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            if rate > 0.0 {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            }
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore open");
            let connector = self.connector.clone();
            let counters = self.counters.clone();
            counters.logins_started.fetch_add(1, Ordering::Relaxed);
            tasks.push(tokio::spawn(async move {
                let r = connector.login(i).await;
                drop(permit);
                let counter = if r.is_ok() {
                    &counters.logins_ok
                } else {
                    &counters.logins_failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
                (r, Instant::now())
            }));
        }
        let mut sessions = Vec::with_capacity(count);
        let mut report = LoginReport {
            attempted: count as u64,
            target_rate: rate,
            ..Default::default()
        };
        let mut connect = Latency::default();
        let mut tls = Latency::default();
        let mut auth = Latency::default();
        let mut bind = Latency::default();
        let mut total = Latency::default();
        let mut last = start;
        for t in tasks {
            match t.await {
                Ok((Ok(s), at)) => {
                    last = last.max(at);
                    connect.record(s.timings.connect);
                    if let Some(d) = s.timings.tls {
                        tls.record(d);
                    }
                    auth.record(s.timings.auth);
                    bind.record(s.timings.bind);
                    total.record(s.timings.total);
                    sessions.push(s);
                }
                Ok((Err(e), _)) => report.failures.add(e.reason()),
                Err(_) => report.failures.add("panic".into()),
            }
        }
        report.succeeded = sessions.len() as u64;
        report.failed = report.failures.total();
        report.wall_secs = last.duration_since(start).as_secs_f64();
        report.logins_per_sec = if report.wall_secs > 0.0 {
            report.succeeded as f64 / report.wall_secs
        } else {
            0.0
        };
        report.connect = connect.summary();
        report.tls = (tls.count() > 0).then(|| tls.summary());
        report.auth = auth.summary();
        report.bind = bind.summary();
        report.total = total.summary();
        (sessions, report)
    }

    /// Starts the readers; each approves subscription requests from `approve(index)`.
    fn start_sessions(
        &self,
        sessions: Vec<Established>,
        approve: impl Fn(usize) -> Vec<String>,
    ) -> Vec<Live> {
        let ctx = self.context();
        sessions
            .into_iter()
            .map(|s| {
                let a = approve(s.index);
                Live::start(s, &ctx, a)
            })
            .collect()
    }

    /// Runs one traffic phase over `lives` and accounts for it per carrier.
    pub async fn traffic_phase(&self, lives: &[Live], p: Phase) -> PhaseResults {
        let Pace {
            duration,
            drain,
            size,
        } = p.pace;
        let received_before = self.counters.received.load(Ordering::Relaxed)
            + self.counters.echoes.load(Ordering::Relaxed);
        let cpu_before = self.cpu_samples();
        // A short lead so every sender task is waiting before the first stanza is due.
        let phase_start = Instant::now() + Duration::from_millis(100);
        let mut tasks = Vec::with_capacity(p.senders.len());
        for s in &p.senders {
            let plan = SendPlan {
                writer: lives[s.at].writer(),
                carrier: s.carrier,
                to: s.address.clone(),
                sender: lives[s.at].index as u32,
                phase: p.phase,
                schedule: s.schedule,
                size,
                phase_start,
                epoch: self.epoch,
            };
            tasks.push(tokio::spawn(send_phase(plan, self.counters.clone())));
        }
        let mut sent = vec![0u64; p.senders.len()];
        for (k, t) in tasks.into_iter().enumerate() {
            sent[k] = t.await.unwrap_or(0);
        }
        let sending_done = Instant::now();
        // Every delivery, the rooms' echoes to groupchat senders included.
        let expected: u64 = p
            .senders
            .iter()
            .zip(&sent)
            .map(|(s, n)| n * (s.to.len() as u64 + u64::from(s.carrier == Carrier::Groupchat)))
            .sum();
        let received = || {
            self.counters.received.load(Ordering::Relaxed)
                + self.counters.echoes.load(Ordering::Relaxed)
        };
        // Drain: wait for deliveries in flight, no longer than `drain`.
        let drain_end = sending_done + drain;
        while received() - received_before < expected && Instant::now() < drain_end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let receiving_secs = phase_start.elapsed().as_secs_f64().max(1e-9);
        let cpu_after = self.cpu_samples();
        let mut got = Vec::with_capacity(lives.len());
        for live in lives {
            got.push(live.collect(p.phase).await);
        }
        let ids: Vec<u32> = lives.iter().map(|l| l.index as u32).collect();
        let report = |carrier, echo| {
            let mut r = account(carrier, echo, &ids, &p.senders, &sent, &got)?;
            r.phase = p.phase;
            r.duration_secs = duration.as_secs_f64();
            r.size = size;
            r.send_rate = r.sent as f64 / duration.as_secs_f64().max(1e-9);
            r.receive_rate = r.received as f64 / receiving_secs;
            if let (Some(b), Some(a)) = (&cpu_before.0, &cpu_after.0) {
                r.generator_cpu_percent = sysmon::cpu_percent(b, a);
            }
            if let (Some(b), Some(a)) = (&cpu_before.1, &cpu_after.1) {
                r.server_cpu_percent = Some(sysmon::cpu_percent(b, a));
            }
            Some(r)
        };
        PhaseResults {
            chat: report(Carrier::Chat, false),
            presence: report(Carrier::Presence, false),
            groupchat: report(Carrier::Groupchat, false),
            echo: report(Carrier::Groupchat, true),
        }
    }

    /// Runs one phase of one carrier: each route's sender sends, `rate` in total; its
    /// stanzas are expected at the route's sessions. Returns the carrier's report and,
    /// for groupchat, the report of the senders' echoes.
    pub async fn carrier_phase(
        &self,
        lives: &[Live],
        carrier: Carrier,
        routes: &[Route],
        phase: u32,
        rate: f64,
        pace: Pace,
    ) -> (PhaseReport, Option<PhaseReport>) {
        let senders = routes
            .iter()
            .enumerate()
            .map(|(k, r)| Sender {
                at: r.at,
                carrier,
                address: r.address.clone(),
                to: r.to.clone(),
                schedule: Schedule::for_sender(k, routes.len(), rate, pace.duration),
            })
            .collect();
        let p = Phase {
            phase,
            pace,
            senders,
        };
        let mut results = self.traffic_phase(lives, p).await;
        let mut r = results.take(carrier).unwrap_or_else(|| PhaseReport {
            phase,
            duration_secs: pace.duration.as_secs_f64(),
            size: pace.size,
            ..Default::default()
        });
        r.target_rate = rate;
        let echo = results.echo.map(|mut e| {
            e.target_rate = rate;
            e
        });
        (r, echo)
    }

    /// Raises the rate from `first` by `step` while `run(phase, rate)` stays within
    /// `limits`; returns every step's report and the verdict.
    async fn step_search(
        &self,
        first: f64,
        step: f64,
        limits: &StepLimits,
        unit: &str,
        sessions: usize,
        mut run: impl AsyncFnMut(u32, f64) -> PhaseReport,
    ) -> (Vec<PhaseReport>, StepReport) {
        let mut reports = Vec::new();
        let mut best = None;
        let mut rate = first;
        let mut stopped_because = format!("reached --max-steps {}", limits.max_steps);
        // A step that fails is run once more at the same rate before the search stops,
        // so one hiccup (a server warming up right after the logins, a pause) does not
        // end it; both runs are reported.
        let mut retried = false;
        for phase in 0..limits.max_steps {
            let r = run(phase, rate).await;
            let p99_ms = r.latency.p99_us as f64 / 1000.0;
            let verdict = if p99_ms > limits.p99_max_ms {
                Some(format!(
                    "p99 {p99_ms:.1} ms > {} ms at {rate} {unit}",
                    limits.p99_max_ms
                ))
            } else if r.loss_fraction > limits.max_loss {
                Some(format!(
                    "loss {:.4} > {} at {rate} {unit}",
                    r.loss_fraction, limits.max_loss
                ))
            } else if self.counters.sessions_open.load(Ordering::Relaxed) < sessions as u64 {
                Some(format!("sessions were disconnected at {rate} {unit}"))
            } else {
                None
            };
            reports.push(r);
            if let Some(v) = verdict {
                if !retried {
                    retried = true;
                    continue;
                }
                stopped_because = v;
                break;
            }
            retried = false;
            best = Some(rate);
            rate += step;
            if rate > limits.max_rate {
                stopped_because = format!("reached --max-rate {}", limits.max_rate);
                break;
            }
        }
        let verdict = StepReport {
            highest_sustained_rate: best,
            stopped_because,
        };
        (reports, verdict)
    }

    pub async fn login(&self, a: &LoginArgs) -> Outcomes {
        let c = &a.common;
        let mut out = Outcomes::default();
        if c.register {
            out.registration = Some(self.register_all(a.clients, c.concurrency).await);
        }
        let rate = if a.rate > 0.0 {
            a.rate
        } else {
            login_rate(c, a.clients)
        };
        let (sessions, report) = self.login_all(a.clients, rate, c.concurrency).await;
        out.login = report;
        let lives = self.start_sessions(sessions, |_| Vec::new());
        if a.hold > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
        }
        close_all(lives).await;
        out
    }

    pub async fn chat(&self, a: &TrafficArgs) -> Outcomes {
        let mut out = Outcomes::default();
        let lives = self.prepare(&a.common, a.clients, &mut out).await;
        let m = self
            .open_loop(&lives, Carrier::Chat, &chat_routes(&lives), &a.load, None)
            .await;
        out.chat = m.reports;
        close_all(lives).await;
        out
    }

    pub async fn step(&self, a: &StepArgs) -> Outcomes {
        let mut out = Outcomes::default();
        let lives = self.prepare(&a.chat.common, a.chat.clients, &mut out).await;
        let routes = chat_routes(&lives);
        let step = Some((a.step, &a.limits));
        let m = self
            .open_loop(&lives, Carrier::Chat, &routes, &a.chat.load, step)
            .await;
        out.chat = m.reports;
        out.step = m.step;
        close_all(lives).await;
        out
    }

    /// Makes every client's roster hold its ring contacts with subscription both.
    pub async fn rosters(&self, a: &RostersArgs) -> Outcomes {
        let c = &a.common;
        let mut out = Outcomes::default();
        if c.register {
            out.registration = Some(self.register_all(a.clients, c.concurrency).await);
        }
        let start = Instant::now();
        let (sessions, login) = self
            .login_all(a.clients, login_rate(c, a.clients), c.concurrency)
            .await;
        out.login = login;
        let cfg = self.connector.config();
        let wanted = |i: usize| -> Vec<String> {
            roster::contacts(i, a.clients, a.contacts)
                .into_iter()
                .map(|j| cfg.bare_jid(j))
                .collect()
        };
        let lives = self.start_sessions(sessions, wanted);
        let mut report = RostersReport {
            clients: a.clients as u64,
            contacts: a.contacts as u64,
            items_expected: (a.clients * a.contacts) as u64,
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs_f64(a.wait);
        let not_logged_in = (a.clients - lives.len()) as u64 * a.contacts as u64;
        let mut last_send = None;
        loop {
            // Every session's roster, asked of all before any answer is awaited. The
            // first round also comes before any request is sent: some servers deliver
            // subscription requests only to resources that have asked for the roster.
            let id = format!("roster{}", report.rounds);
            let mut answers = Vec::with_capacity(lives.len());
            for l in &lives {
                answers.push(l.ask(&id, roster::roster_get(&id)).await);
            }
            let mut todo = Vec::with_capacity(lives.len());
            for answer in answers {
                let items = match answer {
                    Some(rx) => tokio::time::timeout_at(deadline, rx)
                        .await
                        .ok()
                        .and_then(|r| r.ok()),
                    None => None,
                };
                todo.push(items.as_ref().and_then(roster::parse_roster));
            }
            report.rounds += 1;
            let mut missing = not_logged_in;
            let mut incomplete = a.clients - lives.len();
            let mut sends = Vec::with_capacity(lives.len());
            for (l, items) in lives.iter().zip(&todo) {
                let m = roster::missing(items.as_deref().unwrap_or(&[]), &wanted(l.index));
                if report.rounds == 1 {
                    report.items_present_before += a.contacts as u64 - m.contacts;
                }
                missing += m.contacts;
                incomplete += usize::from(m.contacts > 0);
                sends.push(m);
            }
            report.items_missing = missing;
            report.clients_incomplete = incomplete as u64;
            if missing == 0 || Instant::now() >= deadline {
                break;
            }
            // Send what is missing on the first round and again every few seconds in
            // case a server dropped a request; answers arriving meanwhile are approved
            // by the readers.
            if last_send.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(3)) {
                for (l, m) in lives.iter().zip(&sends) {
                    if !m.stanzas.is_empty() && l.send(m.stanzas.as_bytes()).await.is_ok() {
                        report.subscribe_sent += m.subscribe;
                        report.subscribed_sent += m.subscribed;
                    }
                }
                last_send = Some(Instant::now());
            }
            let pause = if report.rounds == 1 { 200 } else { 1000 };
            tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(pause)))
                .await;
        }
        report.requests_approved = self.counters.approved.load(Ordering::Relaxed);
        report.complete = report.items_missing == 0;
        report.wall_secs = start.elapsed().as_secs_f64();
        out.rosters = Some(report);
        close_all(lives).await;
        out
    }

    /// Presence updates fanned out to each client's contacts, at one rate or stepped.
    pub async fn presence(&self, a: &PresenceArgs) -> Outcomes {
        let t = &a.traffic;
        let mut out = Outcomes::default();
        let lives = self.prepare(&t.common, t.clients, &mut out).await;
        let contacts = contact_positions(&lives, t.clients, a.contacts);
        let expected = contacts.iter().map(|c| c.len() as u64).sum();
        let bound = Duration::from_secs_f64(a.settle);
        let presence = &self.counters.presence_plain;
        out.settle = Some(self.settle(presence, expected, bound).await);
        let routes: Vec<Route> = contacts
            .into_iter()
            .enumerate()
            .map(|(at, to)| Route {
                at,
                address: String::new(),
                to,
            })
            .collect();
        let step = a.step.map(|s| (s, &a.limits));
        let m = self
            .open_loop(&lives, Carrier::Presence, &routes, &t.load, step)
            .await;
        out.presence = m.reports;
        out.step = m.step;
        close_all(lives).await;
        out
    }

    /// Groupchat in MUC rooms: the sessions join their rooms (the first of each creates
    /// it), then the first `--senders` occupants of each room send, at one rate or
    /// stepped.
    pub async fn muc(&self, a: &MucArgs) -> Outcomes {
        let mut out = Outcomes::default();
        let lives = self
            .prepare(&a.common, a.rooms * a.occupants, &mut out)
            .await;
        let (rooms, report) = self.join_rooms(&lives, a).await;
        out.muc = Some(report);
        let routes: Vec<Route> = rooms
            .iter()
            .flat_map(|(room, inside)| {
                inside.iter().take(a.senders).map(|&at| Route {
                    at,
                    address: room.clone(),
                    to: inside.iter().copied().filter(|&p| p != at).collect(),
                })
            })
            .collect();
        if !routes.is_empty() {
            let step = a.step.map(|s| (s, &a.limits));
            let m = self
                .open_loop(&lives, Carrier::Groupchat, &routes, &a.load, step)
                .await;
            out.groupchat = m.reports;
            out.echo = m.echoes;
            out.step = m.step;
        }
        close_all(lives).await;
        out
    }

    /// The traffic of a scenario over `routes`: one phase as `load` says, or with
    /// `step` (added rate, limits) a step search from `load.rate`.
    async fn open_loop(
        &self,
        lives: &[Live],
        carrier: Carrier,
        routes: &[Route],
        load: &OpenLoop,
        step: Option<(f64, &StepLimits)>,
    ) -> Measured {
        let mut echoes = Vec::new();
        let Some((step, limits)) = step else {
            let pace = Pace::new(load.duration, load.drain, load.size);
            let (r, echo) = self
                .carrier_phase(lives, carrier, routes, 0, load.rate, pace)
                .await;
            echoes.extend(echo);
            return Measured {
                reports: vec![r],
                echoes,
                step: None,
            };
        };
        let unit = match carrier {
            Carrier::Chat | Carrier::Groupchat => "msg/s",
            Carrier::Presence => "updates/s",
        };
        let pace = Pace::new(limits.step_duration, load.drain, load.size);
        let (reports, verdict) = self
            .step_search(
                load.rate,
                step,
                limits,
                unit,
                lives.len(),
                async |phase, rate| {
                    let (r, echo) = self
                        .carrier_phase(lives, carrier, routes, phase, rate, pace)
                        .await;
                    echoes.extend(echo);
                    r
                },
            )
            .await;
        Measured {
            reports,
            echoes,
            step: Some(verdict),
        }
    }

    /// Joins every session to its room, at most `--join-concurrency` joins in flight:
    /// first each room's creator (its first session), which configures the room if it
    /// is new, then everyone else; then waits for the occupants' presence to settle.
    /// Returns each room's bare JID with the positions of the sessions that got in, in
    /// client order.
    async fn join_rooms(
        &self,
        lives: &[Live],
        a: &MucArgs,
    ) -> (Vec<(String, Vec<usize>)>, MucReport) {
        let start = Instant::now();
        let service = a.service();
        let cfg = self.connector.config();
        let timeout = Duration::from_secs_f64(a.common.timeout);
        let names: Vec<String> = (0..a.rooms)
            .map(|r| muc::room_jid(&cfg.prefix, r, &service))
            .collect();
        let room_of = |p: usize| muc::room_of(lives[p].index, a.occupants);
        let mut first = vec![None; a.rooms];
        for p in 0..lives.len() {
            first[room_of(p)].get_or_insert(p);
        }
        let creators: Vec<usize> = first.iter().flatten().copied().collect();
        let others: Vec<usize> = (0..lives.len())
            .filter(|&p| first[room_of(p)] != Some(p))
            .collect();
        // Each join's answer is awaited in a task of its own holding a permit, so the
        // time to the client's own presence is taken when it arrives.
        let join = async |positions: &[usize]| {
            let permits = Arc::new(Semaphore::new(a.join_concurrency));
            let mut tasks = Vec::with_capacity(positions.len());
            for &p in positions {
                let permit = (permits.clone().acquire_owned().await).expect("semaphore open");
                let sent = Instant::now();
                let nick = cfg.username(lives[p].index);
                let answer = lives[p].join(&names[room_of(p)], &nick).await;
                tasks.push(tokio::spawn(async move {
                    let answer = answer_within(answer, timeout).await;
                    drop(permit);
                    (p, sent.elapsed(), answer)
                }));
            }
            join_tasks(tasks).await
        };
        let mut report = MucReport {
            service: service.clone(),
            rooms: a.rooms as u64,
            occupants_per_room: a.occupants as u64,
            joins_attempted: lives.len() as u64,
            ..Default::default()
        };
        // A new room is configured before anyone else comes in: servers may keep it
        // locked until its owner accepts the instant room.
        let mut answers = Vec::new();
        let mut configuring = Vec::new();
        for (p, took, answer) in join(&creators).await {
            if answer != Ok(JoinAnswer::Entered { created: true }) {
                answers.push((p, took, answer));
                continue;
            }
            report.rooms_created += 1;
            let id = format!("instant{}", room_of(p));
            let asked = Instant::now();
            let iq = lives[p]
                .ask(&id, muc::instant_room(&names[room_of(p)], &id))
                .await;
            configuring.push(tokio::spawn(async move {
                let answer = match answer_within(iq, timeout).await {
                    Ok(iq) if iq.kind == Kind::Iq(IqType::Result) => {
                        Ok(JoinAnswer::Entered { created: true })
                    }
                    Ok(iq) => Err(format!("configure:{}", stanza_error_condition(&iq))),
                    Err(reason) => Err(format!("configure:{reason}")),
                };
                (p, took + asked.elapsed(), answer)
            }));
        }
        let configured = join_tasks(configuring).await;
        report.rooms_configured = configured.iter().filter(|(_, _, a)| a.is_ok()).count() as u64;
        answers.extend(configured);
        answers.extend(join(&others).await);
        let mut latency = Latency::default();
        let mut inside = vec![Vec::new(); a.rooms];
        for (p, took, answer) in answers {
            match answer {
                Ok(JoinAnswer::Entered { .. }) => {
                    latency.record(took);
                    inside[room_of(p)].push(p);
                }
                Ok(JoinAnswer::Refused(condition)) => report.join_failures.add(condition),
                Err(reason) => report.join_failures.add(reason),
            }
        }
        report.join_wall_secs = start.elapsed().as_secs_f64();
        report.joined = inside.iter().map(|o| o.len() as u64).sum();
        report.join_failed = report.join_failures.total();
        report.join_latency = latency.summary();
        report.senders = inside
            .iter()
            .map(|o| o.len().min(a.senders) as u64)
            .max()
            .unwrap_or(0);
        let expected = inside.iter().map(|o| (o.len() as u64).pow(2)).sum();
        let presence = &self.counters.room_presence;
        report.presence = self.settle(presence, expected, timeout).await;
        for o in &mut inside {
            o.sort_unstable();
        }
        (names.into_iter().zip(inside).collect(), report)
    }

    /// A mixed day: logins over a ramp, then chat, presence changes, churn and idle
    /// sessions side by side for `--duration`.
    pub async fn day(&self, a: &DayArgs) -> Outcomes {
        let c = &a.common;
        let mut out = Outcomes::default();
        if c.register {
            out.registration = Some(self.register_all(a.clients, c.concurrency).await);
        }
        let roles = day_roles(a);
        let mut day = DayReport {
            duration_secs: a.duration,
            ..Default::default()
        };
        for r in &roles {
            *match r {
                Role::Idle => &mut day.idle_clients,
                Role::Chat => &mut day.chat_clients,
                Role::Presence => &mut day.presence_clients,
                Role::Churn => &mut day.churn_clients,
            } += 1;
        }
        let rate = if c.login_rate > 0.0 || c.ramp > 0.0 {
            login_rate(c, a.clients)
        } else {
            a.clients as f64 / (a.duration / 10.0).max(1e-3)
        };
        let (sessions, login) = self.login_all(a.clients, rate, c.concurrency).await;
        out.login = login;
        let (churning, stable): (Vec<_>, Vec<_>) = sessions
            .into_iter()
            .partition(|s| roles[s.index] == Role::Churn);
        let lives = self.start_sessions(stable, |_| Vec::new());
        let role_at = |p: usize| roles[lives[p].index];
        let pace = Pace::new(a.duration, a.drain, a.size);
        let mut senders = Vec::new();
        // Chat pairs among the chatting sessions, in order; an odd last one idles.
        let chatting: Vec<usize> = (0..lives.len())
            .filter(|&p| role_at(p) == Role::Chat)
            .collect();
        let pairs = if a.chat_rate > 0.0 {
            chatting.len() / 2 * 2
        } else {
            0
        };
        for k in 0..pairs {
            senders.push(Sender {
                at: chatting[k],
                carrier: Carrier::Chat,
                address: bare(&lives[chatting[k ^ 1]].jid).to_owned(),
                to: vec![chatting[k ^ 1]],
                schedule: Schedule::for_sender(k, pairs, a.chat_rate * pairs as f64, pace.duration),
            });
        }
        let contacts = if a.contacts > 0 {
            contact_positions(&lives, a.clients, a.contacts)
        } else {
            vec![Vec::new(); lives.len()]
        };
        let changing: Vec<usize> = (0..lives.len())
            .filter(|&p| role_at(p) == Role::Presence && a.presence_rate > 0.0)
            .collect();
        for (k, &p) in changing.iter().enumerate() {
            senders.push(Sender {
                at: p,
                carrier: Carrier::Presence,
                address: String::new(),
                to: contacts[p].clone(),
                schedule: Schedule::for_sender(
                    k,
                    changing.len(),
                    a.presence_rate * changing.len() as f64,
                    pace.duration,
                ),
            });
        }
        let end = Instant::now() + pace.duration;
        let every = Duration::from_secs_f64(a.churn_every);
        let n = churning.len().max(1) as u32;
        let churners: Vec<_> = churning
            .into_iter()
            .enumerate()
            .map(|(j, est)| {
                // Staggered, so reconnects are spread over each interval.
                let first = every * (j as u32 + 1) / n;
                tokio::spawn(churn(
                    self.connector.clone(),
                    self.context(),
                    est,
                    first,
                    every,
                    end,
                ))
            })
            .collect();
        let results = self
            .traffic_phase(
                &lives,
                Phase {
                    phase: 0,
                    pace,
                    senders,
                },
            )
            .await;
        let mut reconnect = Latency::default();
        for t in churners {
            if let Ok((stats, latency)) = t.await {
                day.churn.reconnects += stats.reconnects;
                day.churn.failed += stats.failed;
                day.churn.failures.merge(&stats.failures);
                reconnect.merge(&latency);
            }
        }
        day.churn.reconnect = reconnect.summary();
        if let Some(mut r) = results.chat {
            r.target_rate = a.chat_rate * pairs as f64;
            out.chat.push(r);
        }
        if let Some(mut r) = results.presence {
            r.target_rate = a.presence_rate * changing.len() as f64;
            out.presence.push(r);
        }
        out.day = Some(day);
        close_all(lives).await;
        out
    }

    /// Waits until the presence counted by `counter` (a run counter that starts at
    /// zero) reaches `expected`, nothing more has arrived for a second, or `bound` has
    /// passed.
    async fn settle(&self, counter: &AtomicU64, expected: u64, bound: Duration) -> SettleReport {
        let start = Instant::now();
        let seen = || counter.load(Ordering::Relaxed);
        let (mut last, mut changed) = (seen(), start);
        while seen() < expected && start.elapsed() < bound {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = seen();
            if now != last {
                (last, changed) = (now, Instant::now());
            } else if changed.elapsed() >= Duration::from_secs(1) {
                break;
            }
        }
        SettleReport {
            expected,
            received: seen(),
            secs: start.elapsed().as_secs_f64(),
        }
    }

    pub async fn idle(&self, a: &IdleArgs) -> Outcomes {
        let c = &a.common;
        let mut out = Outcomes::default();
        if c.register {
            out.registration = Some(self.register_all(a.clients, c.concurrency).await);
        }
        let mut idle = IdleReport {
            server_rss_kib_before: self.server_rss(),
            metrics_sessions_before: self.sessions_metric().await,
            ..Default::default()
        };
        let (sessions, report) = self
            .login_all(a.clients, login_rate(c, a.clients), c.concurrency)
            .await;
        out.login = report;
        let lives = self.start_sessions(sessions, |_| Vec::new());
        idle.sessions = lives.len() as u64;
        let held_from = Instant::now();
        let end = held_from + Duration::from_secs_f64(a.duration);
        let keepalive = Duration::from_secs_f64(a.keepalive.max(1.0));
        let mut next_keepalive = held_from + keepalive;
        while Instant::now() < end {
            if Instant::now() >= next_keepalive {
                for l in &lives {
                    let _ = l.send(b" ").await;
                }
                next_keepalive += keepalive;
            }
            tokio::time::sleep_until(end.min(next_keepalive)).await;
        }
        idle.held_secs = held_from.elapsed().as_secs_f64();
        idle.server_rss_kib_after = self.server_rss();
        idle.metrics_sessions_after = self.sessions_metric().await;
        idle.disconnected = self.counters.disconnected.load(Ordering::Relaxed);
        if let (Some(before), Some(after)) = (idle.server_rss_kib_before, idle.server_rss_kib_after)
            && idle.sessions > 0
        {
            idle.bytes_per_session =
                Some((after as f64 - before as f64) * 1024.0 / idle.sessions as f64);
        }
        out.idle = Some(idle);
        close_all(lives).await;
        out
    }

    /// Registration (if asked) and logins of `clients` sessions for the traffic
    /// scenarios, then the readers.
    async fn prepare(&self, c: &Common, clients: usize, out: &mut Outcomes) -> Vec<Live> {
        if c.register {
            out.registration = Some(self.register_all(clients, c.concurrency).await);
        }
        let (sessions, report) = self
            .login_all(clients, login_rate(c, clients), c.concurrency)
            .await;
        out.login = report;
        // Pairs are formed from the sessions that did log in, so a failed login costs
        // one pair rather than a partner that can never receive.
        self.start_sessions(sessions, |_| Vec::new())
    }

    /// This process's and the server's CPU readings, where available.
    fn cpu_samples(&self) -> (Option<sysmon::ProcSample>, Option<sysmon::ProcSample>) {
        (
            sysmon::sample("self").ok(),
            self.server_pid
                .and_then(|pid| sysmon::sample(&pid.to_string()).ok()),
        )
    }

    fn server_rss(&self) -> Option<u64> {
        let pid = self.server_pid?;
        sysmon::sample(&pid.to_string()).ok().map(|s| s.rss_kib)
    }

    async fn sessions_metric(&self) -> Option<f64> {
        let url = self.metrics_url.as_deref()?;
        sysmon::scrape(url, "shoal_sessions").await.ok().flatten()
    }
}

/// The login rate for the logins before a scenario: --login-rate, else spread over
/// --ramp, else as fast as possible.
fn login_rate(c: &Common, clients: usize) -> f64 {
    if c.login_rate > 0.0 {
        c.login_rate
    } else if c.ramp > 0.0 {
        clients as f64 / c.ramp
    } else {
        0.0
    }
}

/// What a client does during `day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Idle,
    Chat,
    Presence,
    Churn,
}

/// Every client's role: the shares are exact (rounded), and the roles are interleaved
/// over the indices (ordered by a golden-ratio sequence) so that ring contacts and
/// login order mix all activities.
fn day_roles(a: &DayArgs) -> Vec<Role> {
    let n = a.clients;
    let mut order: Vec<usize> = (0..n).collect();
    let key = |i: usize| (i as f64 * 0.618_033_988_749_895).fract();
    order.sort_by(|&x, &y| key(x).total_cmp(&key(y)));
    let count = |share: f64| (share * n as f64).round() as usize;
    let mut roles = vec![Role::Idle; n];
    let mut next = order.into_iter();
    for (role, share) in [
        (Role::Chat, a.chat_share),
        (Role::Presence, a.presence_share),
        (Role::Churn, a.churn_share),
    ] {
        for i in next.by_ref().take(count(share)) {
            roles[i] = role;
        }
    }
    roles
}

/// What one churning client did.
#[derive(Debug, Default)]
struct ChurnStats {
    reconnects: u64,
    failed: u64,
    failures: Failures,
}

/// One churning client until `end`: holds its session for `first`, then closes it and
/// logs in again every `every`. A failed login is retried at the next interval.
async fn churn(
    connector: Arc<Connector>,
    ctx: RunContext,
    est: Established,
    first: Duration,
    every: Duration,
    end: Instant,
) -> (ChurnStats, Latency) {
    let index = est.index;
    let mut stats = ChurnStats::default();
    let mut latency = Latency::default();
    let mut live = Some(Live::start(est, &ctx, Vec::new()));
    let mut next = Instant::now() + first;
    while next < end {
        tokio::time::sleep_until(next).await;
        if let Some(l) = live.take() {
            l.close().await;
        }
        match connector.login(index).await {
            Ok(est) => {
                stats.reconnects += 1;
                latency.record(est.timings.total);
                live = Some(Live::start(est, &ctx, Vec::new()));
            }
            Err(e) => {
                stats.failed += 1;
                stats.failures.add(e.reason());
            }
        }
        next += every;
    }
    tokio::time::sleep_until(end).await;
    if let Some(l) = live {
        l.close().await;
    }
    (stats, latency)
}

/// For each session, the positions of its ring contacts among the sessions that logged
/// in (a contact whose login failed cannot receive).
fn contact_positions(lives: &[Live], clients: usize, k: usize) -> Vec<Vec<usize>> {
    let position: HashMap<usize, usize> = lives
        .iter()
        .enumerate()
        .map(|(p, l)| (l.index, p))
        .collect();
    lives
        .iter()
        .map(|l| {
            roster::contacts(l.index, clients, k)
                .iter()
                .filter_map(|c| position.get(c).copied())
                .collect()
        })
        .collect()
}

/// The report of `carrier`'s part of a phase, without its timing fields; `None` when
/// it had no senders. `ids[position]` is the client index of each session, which is
/// the flow key its probes carry; `sent[k]` is what `senders[k]` sent, `got[position]`
/// what each session received. With `echo`, the report is of the copies the senders
/// got back themselves (groupchat) instead of the deliveries to their targets.
fn account(
    carrier: Carrier,
    echo: bool,
    ids: &[u32],
    senders: &[Sender],
    sent: &[u64],
    got: &[PhaseReceived],
) -> Option<PhaseReport> {
    let mut r = PhaseReport::default();
    // The senders each session expects, and each sender by flow key.
    let mut expects: Vec<Vec<usize>> = vec![Vec::new(); ids.len()];
    let mut by_id = HashMap::new();
    for (k, s) in senders.iter().enumerate() {
        if s.carrier != carrier {
            continue;
        }
        by_id.insert(ids[s.at], k);
        r.senders += 1;
        r.scheduled += s.schedule.count();
        r.sent += sent[k];
        let targets = if echo {
            std::slice::from_ref(&s.at)
        } else {
            &s.to[..]
        };
        r.expected += sent[k] * targets.len() as u64;
        for &to in targets {
            expects[to].push(k);
        }
    }
    if r.senders == 0 {
        return None;
    }
    let mut latency = Latency::default();
    for (at, received) in got.iter().enumerate() {
        let received = if echo {
            &received.echo
        } else {
            received.of(carrier)
        };
        latency.merge(&received.latency);
        r.delayed += received.delayed;
        for (id, flow) in &received.flows {
            match by_id.get(id) {
                Some(k) if expects[at].contains(k) => {
                    r.received += flow.unique();
                    r.duplicated += flow.duplicated();
                    r.out_of_order += flow.out_of_order();
                }
                _ => r.unexpected += flow.unique(),
            }
        }
        // An expected sender with no flow here lost everything it sent.
        for &k in &expects[at] {
            let id = ids[senders[k].at];
            r.lost += received
                .flows
                .iter()
                .find(|(s, _)| *s == id)
                .map_or(sent[k], |(_, f)| f.lost(sent[k]));
        }
    }
    r.loss_fraction = if r.expected > 0 {
        r.lost as f64 / r.expected as f64
    } else {
        0.0
    };
    r.latency = latency.summary();
    Some(r)
}

/// Chat pairs by position (0↔1, 2↔3, ...; an odd last session stays idle).
fn chat_routes(lives: &[Live]) -> Vec<Route> {
    (0..lives.len() / 2 * 2)
        .map(|k| Route {
            at: k,
            address: bare(&lives[k ^ 1].jid).to_owned(),
            to: vec![k ^ 1],
        })
        .collect()
}

/// The answer on `rx`, waited for at most `timeout`; the reason when there is none
/// (`timeout`, or `session-closed` when the session went away first).
async fn answer_within<T>(
    rx: Option<oneshot::Receiver<T>>,
    timeout: Duration,
) -> Result<T, String> {
    match rx {
        Some(rx) => match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err("session-closed".into()),
            Err(_) => Err("timeout".into()),
        },
        None => Err("session-closed".into()),
    }
}

/// The results of `tasks` in order, leaving out any that panicked.
async fn join_tasks<T>(tasks: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(r) = t.await {
            out.push(r);
        }
    }
    out
}

fn bare(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}

/// Closes every session, concurrently.
pub async fn close_all(lives: Vec<Live>) {
    let tasks: Vec<_> = lives.into_iter().map(|l| tokio::spawn(l.close())).collect();
    join_tasks(tasks).await;
}
