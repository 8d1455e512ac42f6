//! The operations material in `deploy/` checked against real nodes and the real
//! configuration loader:
//!
//! - every metric that a Grafana dashboard (`deploy/grafana/*.json`), a Prometheus
//!   rule or the autoscaler's adapter rule (`deploy/prometheus/*.yaml`) queries is
//!   exported by a running node's `/metrics` (a two-node cluster on a real Redis,
//!   with clients chatting in a MUC room across the nodes, so labelled series exist);
//! - the ConfigMap's `shoal.toml` loads with the environment the StatefulSet and each
//!   overlay give the node, and the pod's termination grace period covers the drain.
//!
//! The names are read out of the PromQL expressions with a PromQL parser, so a
//! dashboard that queries a metric the node does not export fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};
use shoal_node::config::Config;
use shoal_tests::im::*;
use shoal_tests::{Client, TestCluster, eventually};
use yaml_rust2::{Yaml, YamlLoader};

/// Series Prometheus records itself for every scrape target, not the node.
const SCRAPE_SERIES: &[&str] = &["up"];

/// What Grafana's interval variables stand for when an expression is parsed.
const GRAFANA_INTERVALS: &[&str] = &["$__rate_interval", "$__interval", "$__range"];

const ROOM: &str = "lobby@conference.localhost";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .join("deploy")
}

/// The files of `dir` whose names end in `suffix`, sorted.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    found.sort();
    found
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The metric names a PromQL expression selects. Grafana's interval variables are
/// replaced by a duration first; its other variables only appear inside label
/// matchers' strings, which the parser takes as they are.
fn selected_names(expr: &str) -> Result<BTreeSet<String>, String> {
    struct Names(BTreeSet<String>);
    impl ExprVisitor for Names {
        type Error = String;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
            let selector = match expr {
                Expr::VectorSelector(vs) => vs,
                Expr::MatrixSelector(ms) => &ms.vs,
                _ => return Ok(true),
            };
            match &selector.name {
                Some(name) => self.0.insert(name.clone()),
                None => return Err(format!("selector without a metric name: {selector}")),
            };
            Ok(true)
        }
    }
    let expr = GRAFANA_INTERVALS
        .iter()
        .fold(expr.to_owned(), |e, var| e.replace(var, "5m"));
    let ast = parser::parse(&expr).map_err(|e| format!("{expr}: {e}"))?;
    let mut names = Names(BTreeSet::new());
    walk_expr(&mut names, &ast)?;
    Ok(names.0)
}

/// The PromQL inside a Grafana variable query: `label_values(SELECTOR, label)` gives
/// its selector, anything else is taken as an expression.
fn grafana_variable_expr(query: &str) -> &str {
    query
        .strip_prefix("label_values(")
        .and_then(|inner| inner.strip_suffix(')'))
        .and_then(|inner| inner.rsplit_once(','))
        .map_or(query, |(selector, _label)| selector)
}

/// Every PromQL expression of a Grafana dashboard: panel targets and variable
/// queries, wherever they are nested.
fn dashboard_exprs(json: &serde_json::Value, out: &mut Vec<String>) {
    match json {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    ("definition", serde_json::Value::String(q)) => {
                        out.push(grafana_variable_expr(q).to_owned())
                    }
                    _ => dashboard_exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

/// What the files under `deploy/` query: metric names with the files naming them.
/// Names that a rule file records itself are left out.
fn queried_names() -> BTreeMap<String, BTreeSet<String>> {
    let mut exprs: Vec<(String, String)> = Vec::new();
    for path in files(&deploy_dir().join("grafana"), ".json") {
        let json: serde_json::Value = serde_json::from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut found = Vec::new();
        dashboard_exprs(&json, &mut found);
        assert!(!found.is_empty(), "{} has no queries", path.display());
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        exprs.extend(found.into_iter().map(|e| (file.clone(), e)));
    }
    let mut recorded = BTreeSet::new();
    for path in files(&deploy_dir().join("prometheus"), ".yaml") {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let doc = &yaml(&path)[0];
        if let Some(groups) = doc["groups"].as_vec() {
            // A rule file: alerting and recording rules.
            for rule in groups
                .iter()
                .flat_map(|g| g["rules"].as_vec().expect("rules"))
            {
                exprs.push((
                    file.clone(),
                    rule["expr"].as_str().expect("expr").to_owned(),
                ));
                if let Some(name) = rule["record"].as_str() {
                    recorded.insert(name.to_owned());
                }
            }
        } else if let Some(rules) = doc["rules"].as_vec() {
            // The Prometheus adapter's rules: only the series query is PromQL.
            for rule in rules {
                let series = rule["seriesQuery"].as_str().expect("seriesQuery");
                exprs.push((file.clone(), series.to_owned()));
            }
        } else {
            // promtool's unit tests of the rules name what they feed in, not queries.
            assert!(
                doc["tests"].as_vec().is_some(),
                "{}: neither rules nor rule tests",
                path.display()
            );
        }
    }
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, expr) in exprs {
        for name in selected_names(&expr).unwrap_or_else(|e| panic!("{file}: {e}")) {
            names.entry(name).or_default().insert(file.clone());
        }
    }
    names.retain(|name, _| !recorded.contains(name) && !SCRAPE_SERIES.contains(&name.as_str()));
    names
}

/// The metric names in a Prometheus text exposition (histograms as their `_bucket`,
/// `_sum` and `_count` series, as Prometheus stores them).
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The queried names that are not exported, with the files that query them.
fn missing<'a>(
    queried: &'a BTreeMap<String, BTreeSet<String>>,
    exported: &BTreeSet<String>,
) -> Vec<(&'a String, &'a BTreeSet<String>)> {
    queried
        .iter()
        .filter(|(name, _)| !exported.contains(*name))
        .collect()
}

#[test]
fn names_are_read_out_of_promql() {
    let names = |e: &str| selected_names(e).unwrap().into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (pod, le) (rate(shoal_routing_latency_seconds_bucket{job="shoal",pod=~"$pod"}[$__rate_interval])))"#
        ),
        ["shoal_routing_latency_seconds_bucket"]
    );
    // Both sides of binary operators, functions' arguments, aggregations; label names
    // (`by`, `on`), label values and function names are not metrics.
    assert_eq!(
        names(
            r#"sum by (pod) (process_resident_memory_bytes{kind="message"}) / on (pod) clamp_min(sum by (pod) (shoal_c2s_connections), 1) > bool 3"#
        ),
        ["process_resident_memory_bytes", "shoal_c2s_connections"]
    );
    assert_eq!(
        names("1 - sum(rate(a_total[1h])) / sum(rate(b_total[1h] offset 1d)) and up == 0"),
        ["a_total", "b_total", "up"]
    );
    assert_eq!(
        names(grafana_variable_expr(
            r#"label_values(shoal_sessions{job="shoal"}, pod)"#
        )),
        ["shoal_sessions"]
    );
    // Nothing to check in a selector by label alone, and a typo must not pass.
    assert!(selected_names(r#"{job="shoal"}"#).is_err());
    assert!(selected_names("sum(rate(shoal_stanzas_in_total[5m])").is_err());
}

#[test]
fn a_name_the_node_does_not_export_is_reported() {
    let exported = exported_names(
        "# HELP shoal_sessions Bound resources.\n# TYPE shoal_sessions gauge\nshoal_sessions 3\n\
         shoal_routing_latency_seconds_bucket{le=\"0.05\"} 2\nshoal_routing_latency_seconds_count 2\n",
    );
    assert_eq!(
        exported.into_iter().collect::<Vec<_>>(),
        [
            "shoal_routing_latency_seconds_bucket",
            "shoal_routing_latency_seconds_count",
            "shoal_sessions"
        ]
    );
    let exported = exported_names("shoal_sessions 3\nshoal_routing_latency_seconds_count 2\n");
    let queried: BTreeMap<String, BTreeSet<String>> = [
        ("shoal_sessions", "a.json"),
        ("shoal_routing_latency_seconds_bucket", "b.yaml"),
        ("shoal_sesions", "a.json"),
    ]
    .into_iter()
    .map(|(n, f)| (n.to_owned(), BTreeSet::from([f.to_owned()])))
    .collect();
    let missing: Vec<&str> = missing(&queried, &exported)
        .into_iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(
        missing,
        ["shoal_routing_latency_seconds_bucket", "shoal_sesions"]
    );
}

/// `nick` enters the room and reads what the room sends it on entering: the presence
/// of each occupant already there (`before` of them), its own, and the subject.
async fn enter(c: &mut Client, nick: &str, before: usize) {
    c.send(&format!(
        "<presence to='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc'/></presence>"
    ))
    .await
    .unwrap();
    for _ in 0..before + 1 {
        let presence = next(c).await;
        assert!(presence.starts_with("<presence"), "{presence}");
    }
    let subject = next(c).await;
    assert!(subject.contains("<subject/>"), "{subject}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queried_metric_is_exported() {
    let queried = queried_names();
    // The dashboards cover the node's components: a few names that must be among them.
    for name in [
        "shoal_c2s_connections",
        "shoal_routed_total",
        "shoal_cluster_forward_latency_seconds_bucket",
        "shoal_cluster_redis_seconds_bucket",
        "shoal_muc_occupants",
        "shoal_s2s_streams",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(queried.contains_key(name), "nothing queries {name}");
    }

    let cluster = TestCluster::start(2, &[("juliet", PW), ("romeo", PW)]);
    cluster.settled().await;
    let mut j = login(cluster.node(0), "juliet", "balcony").await;
    let mut r = login(cluster.node(1), "romeo", "orchard").await;
    // juliet creates the room and accepts it as an instant room; romeo enters from
    // the other node, so the room's copies cross nodes.
    enter(&mut j, "juliet", 0).await;
    let me = jid(&j);
    assert_eq!(
        ask(&mut j, &format!("<iq to='{ROOM}' id='instant' type='set'><query xmlns='http://jabber.org/protocol/muc#owner'><x xmlns='jabber:x:data' type='submit'/></query></iq>")).await,
        format!("<iq to='{me}' from='{ROOM}' id='instant' type='result'/>")
    );
    enter(&mut r, "romeo", 1).await;
    assert!(next(&mut j).await.contains(&format!("from='{ROOM}/romeo'")));
    r.send(&format!(
        "<message to='{ROOM}' id='g1' type='groupchat'><body>Across</body></message>"
    ))
    .await
    .unwrap();
    for c in [&mut r, &mut j] {
        assert!(next(c).await.contains("<body>Across</body>"));
    }

    // The nodes of this test share the process's metrics registry, so either node's
    // /metrics shows them all: one room with two occupants, one groupchat message.
    let node = cluster.node(0);
    assert_eq!(node.metric("shoal_muc_rooms"), 1.0);
    assert_eq!(node.metric("shoal_muc_occupants"), 2.0);
    assert_eq!(
        node.metric(r#"shoal_routed_total{kind="message",route="room"}"#),
        1.0
    );
    assert_eq!(node.metric("shoal_cluster_shards"), 64.0);

    let mut exported = BTreeSet::new();
    for i in cluster.running() {
        exported.extend(exported_names(&cluster.node(i).metrics()));
    }
    let missing = missing(&queried, &exported);
    assert!(
        missing.is_empty(),
        "queried under deploy/ but not exported by the node: {missing:?}"
    );

    // Leaving empties the temporary room, which goes away: the gauges follow.
    for (c, nick) in [(&mut j, "juliet"), (&mut r, "romeo")] {
        c.send(&format!(
            "<presence to='{ROOM}/{nick}' type='unavailable'/>"
        ))
        .await
        .unwrap();
    }
    eventually(Duration::from_secs(5), "the room is gone", || {
        node.metric("shoal_muc_rooms") == 0.0 && node.metric("shoal_muc_occupants") == 0.0
    })
    .await;
}

/// The environment a container of `statefulset.yaml` gets: its `env` list, with
/// values from the downward API and from secrets made up, and `$(VAR)` references
/// expanded as the kubelet does.
fn container_env(container: &Yaml) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container["env"].as_vec().expect("env") {
        let name = var["name"].as_str().expect("name").to_owned();
        let value = match (var["value"].as_str(), &var["valueFrom"]) {
            (Some(value), _) => env.iter().fold(value.to_owned(), |v, (k, x)| {
                v.replace(&format!("$({k})"), x)
            }),
            (None, from) => match from["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => "shoal-0".to_owned(),
                Some("metadata.namespace") => "shoal".to_owned(),
                Some(other) => panic!("unexpected fieldRef {other}"),
                None => {
                    let key = from["secretKeyRef"]["key"].as_str().expect("secret key");
                    format!("{key}-value")
                }
            },
        };
        env.push((name, value));
    }
    env
}

/// The `literals` of the `shoal-env` ConfigMap a kustomization generates or merges.
fn shoal_env_literals(kustomization: &Path) -> Vec<(String, String)> {
    let doc = &yaml(kustomization)[0];
    doc["configMapGenerator"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter(|g| g["name"].as_str() == Some("shoal-env"))
        .flat_map(|g| g["literals"].as_vec().expect("literals"))
        .map(|l| {
            let (k, v) = l.as_str().expect("literal").split_once('=').expect("K=V");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn the_configmap_loads_with_the_pods_environment() {
    let base = deploy_dir().join("base");
    let statefulsets = yaml(&base.join("statefulset.yaml"));
    let pod = &statefulsets[0]["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env = container_env(container);
    let config_path = base.join("shoal.toml");
    let config_file = env
        .iter()
        .find(|(k, _)| k == "SHOAL_CONFIG")
        .map(|(_, v)| v.clone())
        .expect("SHOAL_CONFIG");
    assert_eq!(config_file, "/etc/shoal/shoal.toml");

    for overlay in [None, Some("dev"), Some("prod")] {
        let mut vars = env.clone();
        vars.extend(shoal_env_literals(&base.join("kustomization.yaml")));
        if let Some(o) = overlay {
            let path = deploy_dir()
                .join("overlays")
                .join(o)
                .join("kustomization.yaml");
            vars.extend(shoal_env_literals(&path));
        }
        let config = Config::load(Some(&config_path), vars)
            .unwrap_or_else(|e| panic!("overlay {overlay:?}: {e}"));
        assert!(config.cluster.enabled);
        assert_eq!(config.cluster.node_id, "shoal-0");
        assert_eq!(
            config.cluster.endpoint,
            "shoal-0.shoal-cluster.shoal.svc:7070"
        );
        assert_eq!(
            config.storage.redis_url,
            "redis://:redis-password-value@redis.shoal.svc:6379/"
        );
        // Probes and Prometheus reach the admin port from outside the pod.
        assert_eq!(
            config.admin.bind.map(|a| a.to_string()).as_deref(),
            Some("0.0.0.0:9090")
        );
        // dev has no certificate Secret: each node makes its own.
        assert_eq!(config.tls.self_signed, overlay == Some("dev"));
    }

    // The pod is killed terminationGracePeriodSeconds after deletion starts: the
    // preStop pause and the whole drain must fit (statefulset.yaml's comment).
    let config = Config::load(Some(&config_path), env).expect("config");
    let pre_stop = container["lifecycle"]["preStop"]["exec"]["command"][1]
        .as_str()
        .and_then(|s| s.parse::<u64>().ok())
        .expect("preStop sleep seconds");
    let grace_period = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds") as u64;
    let drain = 3 * config.shutdown.grace.as_secs() + 5;
    assert!(
        grace_period > pre_stop + drain,
        "terminationGracePeriodSeconds {grace_period} ≤ preStop {pre_stop} s + drain {drain} s"
    );
}
