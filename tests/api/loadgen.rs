//! `lq-loadgen`, the load generator users size their deployments with, against the binary: its
//! report accounts for every connection and every message.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::process;
use crate::redis_support::RedisServer;

const WEBHOOK_SECRET: &str = "loadgen-webhook-secret";

/// Runs `lq-loadgen` with `args`; its exit code, its stdout parsed as JSON (null when it is not
/// JSON) and its stderr.
async fn loadgen(args: &[&str]) -> (Option<i32>, Value, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lq-loadgen")).args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("lq-loadgen ends within 60 s")
    .expect("lq-loadgen runs");
    let report = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output.status.code(), report, String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test]
async fn the_load_generator_reports_every_connection_delivery_and_the_servers_memory() {
    let secrets = json!({"bench0": WEBHOOK_SECRET, "bench1": WEBHOOK_SECRET}).to_string();
    let server = process::start(&[("WEBHOOK_SECRETS", &secrets)]).await;
    let (ws, http) = (format!("ws://{}", server.addr), format!("http://{}", server.addr));
    let (pid, metrics) = (server.pid().to_string(), format!("{http}/metrics"));
    let (code, report, stderr) = loadgen(&[
        "--ws",
        &ws,
        "--connections",
        "20",
        "--connect-rate",
        "200",
        "--tenants",
        "2",
        "--sources",
        "2",
        "--jwt-secret-key",
        JWT_SECRET,
        "--load",
        "webhook",
        "--webhook",
        &http,
        "--webhook-secrets",
        &secrets,
        "--messages",
        "40",
        "--publish-rate",
        "200",
        "--server-pid",
        &pid,
        "--metrics",
        &metrics,
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("connected: 20"), "progress goes to stderr: {stderr}");
    let connections = &report["connections"];
    assert_eq!(
        (connections["established"].as_u64(), connections["failed"].as_u64()),
        (Some(20), Some(0)),
        "{report}"
    );
    assert!(connections["per_sec"].as_f64().is_some_and(|rate| rate > 0.0), "{report}");
    // 40 messages over 2 tenants of 10 connections: 400 deliveries, none lost or repeated.
    let load = &report["load"];
    assert_eq!((load["kind"].as_str(), load["published"].as_u64()), (Some("webhook"), Some(40)), "{report}");
    assert_eq!(
        (load["expected_deliveries"].as_u64(), load["deliveries"].as_u64()),
        (Some(400), Some(400)),
        "{report}"
    );
    assert_eq!((report["lost"].as_u64(), report["duplicated"].as_u64()), (Some(0), Some(0)), "{report}");
    assert!(load["server_cpu_us_per_delivery"].as_f64().is_some(), "{report}");
    let latency = &report["latency_ms"];
    assert_eq!(latency["samples"].as_u64(), Some(400), "one latency per delivery: {report}");
    for key in ["p50", "p99", "p99_9"] {
        assert!(latency[key].as_f64().is_some_and(|ms| ms >= 0.0), "{key}: {report}");
    }
    assert!(latency["p50"].as_f64() <= latency["p99"].as_f64(), "{report}");
    assert!(report["server"]["rss_kib_per_connection"].as_f64().is_some(), "{report}");
    assert!(report["metrics"][0]["lq_connections"].as_f64().is_some(), "{report}");
}

#[tokio::test]
async fn messages_that_never_arrive_are_reported_lost_and_refused_connections_with_their_reason() {
    // The messages go to a Redis the instance does not listen to: all published, none delivered.
    let redis = RedisServer::start();
    let server = process::start(&[]).await;
    let ws = format!("ws://{}", server.addr);
    let (code, report, stderr) = loadgen(&[
        "--ws",
        &ws,
        "--connections",
        "4",
        "--tenants",
        "1",
        "--jwt-secret-key",
        JWT_SECRET,
        "--load",
        "redis",
        "--redis",
        &redis.url(),
        "--messages",
        "5",
        "--drain",
        "1",
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        (report["load"]["published"].as_u64(), report["load"]["deliveries"].as_u64()),
        (Some(5), Some(0)),
        "{report}"
    );
    assert_eq!(
        (report["lost"].as_u64(), report["duplicated"].as_u64()),
        (Some(20), Some(0)),
        "5 messages × 4 connections: {report}"
    );
    // Tokens signed with another secret: every connection is refused, with the server's status.
    let (code, report, stderr) = loadgen(&[
        "--ws",
        &ws,
        "--connections",
        "3",
        "--tenants",
        "1",
        "--jwt-secret-key",
        "another-secret-0123456789",
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let connections = &report["connections"];
    assert_eq!(
        (connections["established"].as_u64(), connections["failed"].as_u64()),
        (Some(0), Some(3)),
        "{report}"
    );
    assert!(connections["failures"].to_string().contains("HTTP 401"), "{report}");
}

#[tokio::test]
async fn with_topics_each_connection_subscribes_and_receives_exactly_its_topics_messages() {
    let redis = RedisServer::start();
    let server = process::start(&[("REDIS_URL", &redis.url())]).await;
    let (ws, pid) = (format!("ws://{}", server.addr), server.pid().to_string());
    let (code, report, stderr) = loadgen(&[
        "--ws",
        &ws,
        "--connections",
        "20",
        "--tenants",
        "2",
        "--jwt-secret-key",
        JWT_SECRET,
        "--topics",
        "5",
        "--subscriptions",
        "2",
        "--load",
        "topic",
        "--redis",
        &redis.url(),
        "--messages",
        "50",
        "--server-pid",
        &pid,
    ])
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let subscriptions = &report["subscriptions"];
    assert_eq!(
        (
            subscriptions["asked"].as_u64(),
            subscriptions["subscribed"].as_u64(),
            subscriptions["refused"].as_u64()
        ),
        (Some(40), Some(40), Some(0)),
        "{report}"
    );
    // 50 messages over 2 tenants × 5 topics: 5 per topic; each topic has 4 of its tenant's 10
    // connections (2 topics each): 50 × 4 deliveries.
    let load = &report["load"];
    assert_eq!(
        (load["expected_deliveries"].as_u64(), load["deliveries"].as_u64()),
        (Some(200), Some(200)),
        "{report}"
    );
    assert_eq!((report["lost"].as_u64(), report["duplicated"].as_u64()), (Some(0), Some(0)), "{report}");
    assert!(report["server"]["rss_bytes_per_subscription"].as_f64().is_some(), "{report}");
}

#[tokio::test]
async fn bad_options_are_named_with_a_pointer_to_the_help_and_exit_2() {
    let (code, report, stderr) = loadgen(&["--connections", "many", "--load", "carrier-pigeon"]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(report.is_null(), "no report on stdout: {report}");
    assert!(stderr.contains("--connections: expected a number, got \"many\""), "{stderr}");
    assert!(stderr.contains("lq-loadgen --help lists the options"), "{stderr}");
    let (code, _, stderr) = loadgen(&[
        "--ws",
        "ws://127.0.0.1:1",
        "--jwt-secret-key",
        "k",
        "--load",
        "webhook",
        "--webhook",
        "http://127.0.0.1:1",
        "--messages",
        "1",
    ])
    .await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("missing: bench0, bench1"), "the secrets it lacks are named: {stderr}");
}

#[tokio::test]
async fn help_and_version_go_to_stdout_and_exit_0() {
    for flag in ["--help", "-h"] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_lq-loadgen"))
            .arg(flag)
            .output()
            .await
            .expect("runs");
        assert_eq!(output.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&output.stdout).contains("--webhook-secrets J"), "{flag}");
    }
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_lq-loadgen"))
        .arg("--version")
        .output()
        .await
        .expect("runs");
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("lq-loadgen "));
}

#[tokio::test]
async fn when_every_message_is_refused_it_says_why_and_exits_1() {
    let secrets = json!({"bench0": "a-secret-the-server-does-not-have", "bench1": "another"}).to_string();
    let server = process::start(&[("WEBHOOK_SECRETS", r#"{"bench0":"s0","bench1":"s1"}"#)]).await;
    let (ws, http) = (format!("ws://{}", server.addr), format!("http://{}", server.addr));
    let (code, report, stderr) = loadgen(&[
        "--ws",
        &ws,
        "--connections",
        "4",
        "--tenants",
        "2",
        "--jwt-secret-key",
        JWT_SECRET,
        "--load",
        "webhook",
        "--webhook",
        &http,
        "--webhook-secrets",
        &secrets,
        "--messages",
        "4",
        "--publish-rate",
        "100",
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(report.is_null(), "{report}");
    assert!(
        stderr.contains("every message published was refused; the first answer: 401")
            && stderr.contains("signature_mismatch"),
        "{stderr}"
    );
}
