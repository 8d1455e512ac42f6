//! The run's results: one serialisable [`Report`] (the `--json` file, every number
//! included) and the human summary table printed from it.

use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::Scenario;
use crate::scenario::{
    DayReport, IdleReport, LoginReport, MucReport, PhaseReport, RegisterReport, RostersReport,
    SettleReport, StepReport,
};
use crate::stats::{Failures, Percentiles, ms};
use crate::sysmon::ProcReport;

/// Generator CPU above this share of one core makes the generator a suspect.
pub const GENERATOR_CPU_WARN_PERCENT: f64 = 90.0;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    pub wall_secs: f64,
    pub params: Scenario,
    pub registration: Option<RegisterReport>,
    pub login: LoginReport,
    /// One entry for `chat`, one per step for `step`, none otherwise.
    pub chat: Vec<PhaseReport>,
    /// One entry for `presence`, one per step with `presence --step`.
    pub presence: Vec<PhaseReport>,
    /// One entry for `muc`, one per step with `muc --step`: deliveries to the other
    /// occupants of the sender's room.
    pub groupchat: Vec<PhaseReport>,
    /// The same phases' copies of each groupchat message back to its sender.
    pub echo: Vec<PhaseReport>,
    pub muc: Option<MucReport>,
    pub rosters: Option<RostersReport>,
    pub settle: Option<SettleReport>,
    pub day: Option<DayReport>,
    pub step: Option<StepReport>,
    pub idle: Option<IdleReport>,
    /// Probe messages that arrived after their phase had been counted.
    pub late_messages: u64,
    /// Probe messages the server sent back to their sender as errors.
    pub bounced_messages: u64,
    /// Sessions the server closed during the run (not counting our own closes).
    pub disconnected: u64,
    /// How they ended: `system-shutdown`, `see-other-host`, `stream-error:CONDITION`,
    /// `closed` (a close without error), `dropped` (no close), `framing`.
    pub ends: Failures,
    /// Sessions logged in again after their connection ended (`--reconnect`).
    pub reconnects: u64,
    /// Sessions that gave up after `--reconnect-attempts` failed logins.
    pub reconnects_given_up: u64,
    /// Probes in writes that failed under a broken connection (counted as sent).
    pub write_failed: u64,
    pub generator: ProcReport,
    pub server: Option<ProcReport>,
    pub warnings: Vec<String>,
}

impl Report {
    /// Adds the warnings derived from the numbers.
    pub fn add_warnings(&mut self) {
        if self.generator.cpu_percent_of_core > GENERATOR_CPU_WARN_PERCENT {
            self.warnings.push(format!(
                "WARNING: the generator used {:.0}% of a core: it may be the limit, not the server \
                 (use more --threads or a second generator process)",
                self.generator.cpu_percent_of_core
            ));
        }
        if self.login.failed > 0 {
            self.warnings.push(format!(
                "{} of {} logins failed",
                self.login.failed, self.login.attempted
            ));
        }
        if self.disconnected > self.reconnects {
            self.warnings.push(format!(
                "{} sessions were closed by the server ({} came back)",
                self.disconnected, self.reconnects
            ));
        }
        if self.reconnects_given_up > 0 {
            self.warnings.push(format!(
                "{} sessions gave up reconnecting",
                self.reconnects_given_up
            ));
        }
        if self.write_failed > 0 {
            self.warnings.push(format!(
                "{} stanzas were in writes that failed (the connection broke)",
                self.write_failed
            ));
        }
        if let Some(r) = &self.rosters
            && !r.complete
        {
            self.warnings.push(format!(
                "rosters incomplete: {} of {} items are not mutual ({} clients)",
                r.items_missing, r.items_expected, r.clients_incomplete
            ));
        }
        if let Some(s) = &self.settle
            && s.received < s.expected
        {
            self.warnings.push(format!(
                "initial presence: {} of {} contact presences arrived (are the rosters \
                 provisioned with `shoal-load rosters` and the same --clients/--contacts?)",
                s.received, s.expected
            ));
        }
        if let Some(m) = &self.muc {
            if m.join_failed > 0 {
                self.warnings.push(format!(
                    "{} of {} MUC joins failed",
                    m.join_failed, m.joins_attempted
                ));
            }
            if m.rooms_configured < m.rooms_created {
                self.warnings.push(format!(
                    "{} of {} new rooms refused the instant-room form",
                    m.rooms_created - m.rooms_configured,
                    m.rooms_created
                ));
            }
        }
        for c in self
            .chat
            .iter()
            .chain(&self.presence)
            .chain(&self.groupchat)
        {
            if c.generator_cpu_percent > GENERATOR_CPU_WARN_PERCENT {
                self.warnings.push(format!(
                    "WARNING: phase {}: the generator used {:.0}% of a core: it may be the limit, not the server",
                    c.phase, c.generator_cpu_percent
                ));
            }
            if c.scheduled > c.sent {
                self.warnings.push(format!(
                    "phase {}: only {} of {} scheduled stanzas were sent",
                    c.phase, c.sent, c.scheduled
                ));
            }
        }
    }

    /// The human summary table.
    pub fn human(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "shoal-load {} — {:.1} s", self.scenario, self.wall_secs);
        if let Some(r) = &self.registration {
            let _ = writeln!(
                o,
                "registration   created {}  existing {}  failed {}  in {:.1} s",
                r.created, r.existing, r.failed, r.wall_secs
            );
            failures(&mut o, &r.failures);
        }
        let l = &self.login;
        let _ = writeln!(
            o,
            "logins         {} ok / {} attempted, {} failed, {:.1} s, {:.0} logins/s",
            l.succeeded, l.attempted, l.failed, l.wall_secs, l.logins_per_sec
        );
        failures(&mut o, &l.failures);
        let _ = writeln!(
            o,
            "  latency ms   {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "p50", "p90", "p99", "p99.9", "max", "count"
        );
        row(&mut o, "connect", &l.connect);
        if let Some(t) = &l.tls {
            row(&mut o, "tls", t);
        }
        row(&mut o, "auth", &l.auth);
        row(&mut o, "bind", &l.bind);
        row(&mut o, "login total", &l.total);
        if let Some(r) = &self.rosters {
            let _ = writeln!(
                o,
                "rosters        {} clients x {} contacts: {} of {} items mutual{}, {:.1} s, {} checks",
                r.clients,
                r.contacts,
                r.items_expected - r.items_missing,
                r.items_expected,
                if r.complete { "" } else { " (INCOMPLETE)" },
                r.wall_secs,
                r.rounds
            );
            let _ = writeln!(
                o,
                "  sent         subscribe {}  subscribed {}  requests approved {}  (mutual before: {})",
                r.subscribe_sent, r.subscribed_sent, r.requests_approved, r.items_present_before
            );
        }
        if let Some(s) = &self.settle {
            let _ = writeln!(
                o,
                "initial presence {} of {} contact presences in {:.1} s",
                s.received, s.expected, s.secs
            );
        }
        if let Some(d) = &self.day {
            let _ = writeln!(
                o,
                "day            {:.0} s: {} idle, {} chat, {} presence, {} churn clients",
                d.duration_secs,
                d.idle_clients,
                d.chat_clients,
                d.presence_clients,
                d.churn_clients
            );
            let ch = &d.churn;
            let _ = writeln!(
                o,
                "  churn        {} reconnects, {} failed",
                ch.reconnects, ch.failed
            );
            failures(&mut o, &ch.failures);
            row(&mut o, "reconnect", &ch.reconnect);
        }
        for c in &self.chat {
            phase(&mut o, "chat", "msg/s", c);
        }
        for c in &self.presence {
            phase(&mut o, "presence", "updates/s", c);
        }
        if let Some(m) = &self.muc {
            let _ = writeln!(
                o,
                "muc            {} rooms x {} occupants on {}: {} of {} joined in {:.1} s, {} rooms created ({} configured)",
                m.rooms,
                m.occupants_per_room,
                m.service,
                m.joined,
                m.joins_attempted,
                m.join_wall_secs,
                m.rooms_created,
                m.rooms_configured
            );
            failures(&mut o, &m.join_failures);
            row(&mut o, "join", &m.join_latency);
            let _ = writeln!(
                o,
                "  presence     {} of {} occupant presences in {:.1} s after the joins",
                m.presence.received, m.presence.expected, m.presence.secs
            );
        }
        for (c, e) in self.groupchat.iter().zip(&self.echo) {
            phase(&mut o, "groupchat", "msg/s", c);
            let _ = writeln!(
                o,
                "  echoes       expected {}  received {}  lost {}  dup {}  ooo {}",
                e.expected, e.received, e.lost, e.duplicated, e.out_of_order
            );
            row(&mut o, "echo", &e.latency);
        }
        if let Some(s) = &self.step {
            let _ = writeln!(
                o,
                "step           highest sustained rate: {}; stopped: {}",
                s.highest_sustained_rate
                    .map_or("none".into(), |r| format!("{r:.0}/s")),
                s.stopped_because
            );
        }
        if let Some(i) = &self.idle {
            let _ = writeln!(
                o,
                "idle           {} sessions held {:.0} s, {} disconnected",
                i.sessions, i.held_secs, i.disconnected
            );
            if let (Some(b), Some(a)) = (i.server_rss_kib_before, i.server_rss_kib_after) {
                let _ = writeln!(o, "  server RSS   {b} KiB -> {a} KiB");
            }
            if let (Some(b), Some(a)) = (i.metrics_sessions_before, i.metrics_sessions_after) {
                let _ = writeln!(o, "  shoal_sessions {b} -> {a}");
            }
            if let Some(per) = i.bytes_per_session {
                let _ = writeln!(o, "  memory/session {:.1} KiB", per / 1024.0);
            }
        }
        if self.late_messages > 0 {
            let _ = writeln!(o, "late messages  {}", self.late_messages);
        }
        if self.bounced_messages > 0 {
            let _ = writeln!(
                o,
                "bounced messages {} (errors back to the sender)",
                self.bounced_messages
            );
        }
        if self.disconnected > 0 {
            let _ = writeln!(
                o,
                "sessions ended by the server {}, reconnected {}, gave up {}, write failures {}",
                self.disconnected, self.reconnects, self.reconnects_given_up, self.write_failed
            );
            for (reason, n) in &self.ends.0 {
                let _ = writeln!(o, "  ended: {reason} x{n}");
            }
        }
        let g = &self.generator;
        let _ = writeln!(
            o,
            "generator      CPU {:.0}% of a core ({:.1} s), RSS peak {} KiB",
            g.cpu_percent_of_core, g.cpu_seconds, g.rss_kib_peak
        );
        if let Some(s) = &self.server {
            let _ = writeln!(
                o,
                "server         CPU {:.0}% of a core ({:.1} s), RSS {} -> {} KiB (peak {})",
                s.cpu_percent_of_core,
                s.cpu_seconds,
                s.rss_kib_start,
                s.rss_kib_end,
                s.rss_kib_peak
            );
        }
        for w in &self.warnings {
            let _ = writeln!(o, "{w}");
        }
        o
    }
}

/// One traffic phase: what was sent, what arrived, latency and CPU.
fn phase(o: &mut String, what: &str, unit: &str, c: &PhaseReport) {
    let _ = writeln!(
        o,
        "{what} phase {}  target {:.0} {unit}, {} senders, {} B probes, {:.0} s",
        c.phase, c.target_rate, c.senders, c.size, c.duration_secs
    );
    let _ = writeln!(
        o,
        "  stanzas      scheduled {}  sent {}",
        c.scheduled, c.sent
    );
    let _ = writeln!(
        o,
        "  deliveries   expected {}  received {}  lost {}  dup {}  ooo {}  unexpected {}  (loss {:.4}%)",
        c.expected,
        c.received,
        c.lost,
        c.duplicated,
        c.out_of_order,
        c.unexpected,
        c.loss_fraction * 100.0
    );
    if c.delayed > 0 {
        let _ = writeln!(o, "  delayed      {} (from offline storage)", c.delayed);
    }
    let _ = writeln!(
        o,
        "  rates        sent {:.0} {unit}  received {:.0} deliveries/s",
        c.send_rate, c.receive_rate
    );
    row(o, "end-to-end", &c.latency);
    let _ = writeln!(
        o,
        "  cpu          generator {:.0}% of a core{}",
        c.generator_cpu_percent,
        c.server_cpu_percent
            .map_or(String::new(), |s| format!(", server {s:.0}%"))
    );
}

fn row(o: &mut String, name: &str, p: &Percentiles) {
    let _ = writeln!(
        o,
        "  {name:<12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        ms(p.p50_us),
        ms(p.p90_us),
        ms(p.p99_us),
        ms(p.p999_us),
        ms(p.max_us),
        p.count
    );
}

fn failures(o: &mut String, f: &Failures) {
    for (reason, n) in &f.0 {
        let _ = writeln!(o, "  failed: {reason} x{n}");
    }
}
