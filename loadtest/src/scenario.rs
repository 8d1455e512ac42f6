//! The scenarios: login storm, open-loop chat, idle soak and step, built from the
//! connector (`conn`), live sessions (`session`) and the schedule.
//!
//! Each scenario is bounded: a fixed number of clients, fixed durations, and every wait
//! either has a deadline or ends when the work it waits for does.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::cli::{ChatArgs, IdleArgs, LoginArgs, StepArgs};
use crate::conn::{Connector, Established};
use crate::negotiate::Outcome;
use crate::schedule::Schedule;
use crate::session::{Counters, Live, SendPlan, send_phase};
use crate::stats::{Failures, Latency, Percentiles};
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

/// Results of one chat phase (the whole `chat` run, or one step of `step`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatPhaseReport {
    pub phase: u32,
    pub target_rate: f64,
    pub duration_secs: f64,
    pub size: usize,
    pub senders: u64,
    /// Messages scheduled in the phase (what the target rate asked for).
    pub scheduled: u64,
    pub sent: u64,
    /// Distinct messages received.
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub loss_fraction: f64,
    pub send_rate: f64,
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
    pub chat: Vec<ChatPhaseReport>,
    pub idle: Option<IdleReport>,
    pub step: Option<StepReport>,
}

/// Shared state of a run.
pub struct Run {
    pub connector: Arc<Connector>,
    pub counters: Arc<Counters>,
    /// Probe timestamps are microseconds since this instant.
    pub epoch: Instant,
    pub server_pid: Option<u32>,
    pub metrics_url: Option<String>,
}

impl Run {
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

    fn start_sessions(&self, sessions: Vec<Established>) -> Vec<Live> {
        sessions
            .into_iter()
            .map(|s| Live::start(s, self.epoch, self.counters.clone()))
            .collect()
    }

    /// Runs one chat phase over `lives`, paired by position (0↔1, 2↔3, ...).
    pub async fn chat_phase(
        &self,
        lives: &[Live],
        phase: u32,
        rate: f64,
        duration: Duration,
        drain: Duration,
        size: usize,
    ) -> ChatPhaseReport {
        let senders = lives.len() / 2 * 2;
        let mut report = ChatPhaseReport {
            phase,
            target_rate: rate,
            duration_secs: duration.as_secs_f64(),
            size,
            senders: senders as u64,
            ..Default::default()
        };
        if senders == 0 {
            return report;
        }
        let received_before = self.counters.received.load(Ordering::Relaxed);
        let cpu_before = self.cpu_samples();
        // A short lead so every sender task is waiting before the first message is due.
        let phase_start = Instant::now() + Duration::from_millis(100);
        let mut tasks = Vec::with_capacity(senders);
        for (k, live) in lives[..senders].iter().enumerate() {
            let schedule = Schedule::for_sender(k, senders, rate, duration);
            report.scheduled += schedule.count();
            let plan = SendPlan {
                writer: live.writer(),
                to: bare(&lives[k ^ 1].jid).to_owned(),
                sender: k as u32,
                phase,
                schedule,
                size,
                phase_start,
                epoch: self.epoch,
            };
            tasks.push(tokio::spawn(send_phase(plan, self.counters.clone())));
        }
        let mut sent = vec![0u64; senders];
        for (k, t) in tasks.into_iter().enumerate() {
            sent[k] = t.await.unwrap_or(0);
        }
        let sending_done = Instant::now();
        report.sent = sent.iter().sum();
        // Drain: wait for messages in flight, no longer than `drain`.
        let drain_end = sending_done + drain;
        while self.counters.received.load(Ordering::Relaxed) - received_before < report.sent
            && Instant::now() < drain_end
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let receiving_done = Instant::now();
        let cpu_after = self.cpu_samples();
        if let (Some(b), Some(a)) = (cpu_before.0, cpu_after.0) {
            report.generator_cpu_percent = sysmon::cpu_percent(&b, &a);
        }
        if let (Some(b), Some(a)) = (cpu_before.1, cpu_after.1) {
            report.server_cpu_percent = Some(sysmon::cpu_percent(&b, &a));
        }
        let mut latency = Latency::default();
        // Per sender, the messages no receiver has accounted for yet.
        let mut unaccounted = sent.clone();
        for (k, live) in lives.iter().enumerate() {
            let got = live.collect(phase).await;
            latency.merge(&got.latency);
            for (sender, flow) in &got.flows {
                let s = *sender as usize;
                report.received += flow.unique();
                report.duplicated += flow.duplicated();
                report.out_of_order += flow.out_of_order();
                // Only the partner's flow is expected here; a stray flow is counted as
                // received but has nothing to lose.
                if s < senders && s ^ 1 == k {
                    report.lost += flow.lost(sent[s]);
                    unaccounted[s] = 0;
                }
            }
        }
        // Senders whose partner recorded nothing lost everything they sent.
        report.lost += unaccounted.iter().sum::<u64>();
        report.loss_fraction = if report.sent > 0 {
            report.lost as f64 / report.sent as f64
        } else {
            0.0
        };
        report.send_rate = report.sent as f64 / duration.as_secs_f64().max(1e-9);
        report.receive_rate = report.received as f64
            / receiving_done
                .duration_since(phase_start)
                .as_secs_f64()
                .max(1e-9);
        report.latency = latency.summary();
        report
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
        let lives = self.start_sessions(sessions);
        if a.hold > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
        }
        close_all(lives).await;
        out
    }

    pub async fn chat(&self, a: &ChatArgs) -> Outcomes {
        let mut out = Outcomes::default();
        let lives = self.prepare(a, &mut out).await;
        let report = self
            .chat_phase(
                &lives,
                0,
                a.rate,
                Duration::from_secs_f64(a.duration),
                Duration::from_secs_f64(a.drain),
                a.size,
            )
            .await;
        out.chat.push(report);
        close_all(lives).await;
        out
    }

    pub async fn step(&self, a: &StepArgs) -> Outcomes {
        let mut out = Outcomes::default();
        let lives = self.prepare(&a.chat, &mut out).await;
        let mut best = None;
        let mut rate = a.chat.rate;
        let mut stopped_because = format!("reached --max-steps {}", a.max_steps);
        for phase in 0..a.max_steps {
            let r = self
                .chat_phase(
                    &lives,
                    phase,
                    rate,
                    Duration::from_secs_f64(a.step_duration),
                    Duration::from_secs_f64(a.chat.drain),
                    a.chat.size,
                )
                .await;
            let p99_ms = r.latency.p99_us as f64 / 1000.0;
            let verdict = if p99_ms > a.p99_max_ms {
                Some(format!(
                    "p99 {p99_ms:.1} ms > {} ms at {rate} msg/s",
                    a.p99_max_ms
                ))
            } else if r.loss_fraction > a.max_loss {
                Some(format!(
                    "loss {:.4} > {} at {rate} msg/s",
                    r.loss_fraction, a.max_loss
                ))
            } else if self.counters.sessions_open.load(Ordering::Relaxed) < lives.len() as u64 {
                Some(format!("sessions were disconnected at {rate} msg/s"))
            } else {
                None
            };
            out.chat.push(r);
            if let Some(v) = verdict {
                stopped_because = v;
                break;
            }
            best = Some(rate);
            rate += a.step;
            if rate > a.max_rate {
                stopped_because = format!("reached --max-rate {}", a.max_rate);
                break;
            }
        }
        out.step = Some(StepReport {
            highest_sustained_rate: best,
            stopped_because,
        });
        close_all(lives).await;
        out
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
        let lives = self.start_sessions(sessions);
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

    /// Registration (if asked) and logins for the chat scenarios, then the readers.
    async fn prepare(&self, a: &ChatArgs, out: &mut Outcomes) -> Vec<Live> {
        let c = &a.common;
        if c.register {
            out.registration = Some(self.register_all(a.clients, c.concurrency).await);
        }
        let (sessions, report) = self
            .login_all(a.clients, login_rate(c, a.clients), c.concurrency)
            .await;
        out.login = report;
        // Pairs are formed from the sessions that did log in, so a failed login costs
        // one pair rather than a partner that can never receive.
        self.start_sessions(sessions)
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
fn login_rate(c: &crate::cli::Common, clients: usize) -> f64 {
    if c.login_rate > 0.0 {
        c.login_rate
    } else if c.ramp > 0.0 {
        clients as f64 / c.ramp
    } else {
        0.0
    }
}

fn bare(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}

/// Closes every session, concurrently.
pub async fn close_all(lives: Vec<Live>) {
    let tasks: Vec<_> = lives.into_iter().map(|l| tokio::spawn(l.close())).collect();
    for t in tasks {
        let _ = t.await;
    }
}
