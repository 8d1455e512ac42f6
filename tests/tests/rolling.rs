//! A rolling restart of a three-node cluster under `shoal-load` chat traffic loses no
//! message.
//!
//! Clients are spread over the three nodes and paired across them (client 2k talks to
//! 2k+1, on the next node). While they chat on an open-loop schedule, each node in
//! turn is stopped the way SIGTERM stops it (the drain: streams closed with
//! `<system-shutdown/>`, storage flushed, shards handed off), started again under the
//! same node id on the same client port, and awaited until it is ready and every
//! client is logged in again. The generator's clients answer the server's close with
//! their own, log in at the next node and keep counting; messages that arrive while a
//! client has no session wait in offline storage and come with an XEP-0203 delay.
//! Every message carries its sender and sequence number, so at the end the tally is
//! exact: everything sent was delivered once, nothing was lost or duplicated (Shoal
//! does not implement XEP-0198, so the server never sends a stanza twice by design: a
//! duplicate could only be a routing fault).

use std::time::{Duration, Instant};

use clap::Parser;
use shoal_loadtest::cli::Cli;
use shoal_tests::{TestCluster, eventually};

/// Clients, paired across nodes.
const CLIENTS: usize = 90;
/// Messages per second from all senders together.
const RATE: &str = "60";
/// Seconds of traffic: longer than three restarts take, even on a slow machine (the
/// test checks that the traffic outlasted them).
const DURATION: &str = "30";
const PASSWORD: &str = "rolling-password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_no_message() {
    let names: Vec<String> = (0..CLIENTS).map(|i| format!("load{i}")).collect();
    let users: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), PASSWORD)).collect();
    let mut cluster = TestCluster::start(3, &users);
    cluster.settled().await;
    let servers: Vec<String> = cluster.c2s_addrs().iter().map(|a| a.to_string()).collect();
    let cert = cluster.node(0).cert_path().display().to_string();
    let clients = CLIENTS.to_string();
    let argv = [
        "shoal-load",
        "chat",
        "--servers",
        &servers.join(","),
        "--cafile",
        &cert,
        "--password",
        PASSWORD,
        "--clients",
        &clients,
        "--rate",
        RATE,
        "--duration",
        DURATION,
        // Ends as soon as every message has arrived.
        "--drain",
        "20",
        "--reconnect",
    ];
    let scenario = Cli::try_parse_from(argv).expect("arguments parse").scenario;
    let duration = Duration::from_secs(DURATION.parse().expect("seconds"));

    // The metrics registry is the process's, shared by the in-process nodes: the
    // sessions gauge counts the whole cluster's.
    let all_online = |cluster: &TestCluster| {
        let i = cluster.running()[0];
        cluster.node(i).metric("shoal_sessions") == CLIENTS as f64
    };
    let restarts = async {
        eventually(Duration::from_secs(60), "every client logged in", || {
            all_online(&cluster)
        })
        .await;
        // The traffic starts once every client is logged in.
        let traffic_ends = Instant::now() + duration;
        for i in 0..3 {
            let start = Instant::now();
            // Stopping and booting block this thread (the generator's sessions run on
            // the runtime's workers meanwhile).
            cluster.stop(i);
            cluster.restart(i);
            cluster.settled().await;
            eventually(
                Duration::from_secs(30),
                &format!("every client back after node {i} restarted"),
                || all_online(&cluster),
            )
            .await;
            println!(
                "node {i} restarted, every client back, in {:?}",
                start.elapsed()
            );
        }
        (Instant::now(), traffic_ends)
    };
    let (report, (restarted, traffic_ends)) = tokio::join!(shoal_loadtest::run(scenario), restarts);
    assert!(
        restarted < traffic_ends,
        "the traffic ended before the last restart was done: raise DURATION"
    );

    let report = report.expect("load run");
    let summary = report.human();
    println!("{summary}");
    assert_eq!(report.login.succeeded, CLIENTS as u64, "{summary}");
    let [chat] = &report.chat[..] else {
        panic!("one chat phase: {summary}");
    };
    assert!(chat.sent > 0, "{summary}");
    assert_eq!(
        chat.sent, chat.scheduled,
        "every message was sent: {summary}"
    );
    assert_eq!(
        (chat.expected, chat.received, chat.lost, chat.duplicated),
        (chat.sent, chat.sent, 0, 0),
        "every message delivered exactly once: {summary}"
    );
    assert_eq!(
        (
            chat.unexpected,
            report.late_messages,
            report.bounced_messages
        ),
        (0, 0, 0),
        "{summary}"
    );
    assert_eq!(
        report.write_failed, 0,
        "no write met a broken connection: {summary}"
    );
    // Each client's node was restarted at least once while it was connected, and
    // every stream the server ended it ended with <system-shutdown/>.
    assert!(report.reconnects >= CLIENTS as u64, "{summary}");
    assert_eq!(report.reconnects_given_up, 0, "{summary}");
    assert_eq!(report.disconnected, report.reconnects, "{summary}");
    let ends: Vec<&str> = report.ends.0.keys().map(String::as_str).collect();
    assert_eq!(ends, ["system-shutdown"], "{summary}");
}
