//! The `lq-realtime` binary as a process: signals, bad configuration, the token command, logs.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::helpers::*;

/// The `lq-realtime` entry point (`bootstrap::cli::main`), built by cargo with this test.
fn binary() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_lq-realtime-under-test"))
}

/// A running `lq-realtime` process, killed if the test ends early.
pub(crate) struct Process {
    child: Child,
    pub(crate) addr: String,
    output: tokio::task::JoinHandle<Vec<String>>,
}

fn command(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(binary());
    command.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for (key, value) in env {
        command.env(key, value);
    }
    command.kill_on_drop(true);
    command
}

/// Starts the binary on a free port with JSON logs and waits for its "listening" line.
pub(crate) async fn start(extra_env: &[(&str, &str)]) -> Process {
    let mut env = vec![
        ("BIND_ADDR", "127.0.0.1:0"),
        ("JWT_SECRET_KEY", JWT_SECRET),
        ("LOG_FORMAT", "json"),
        ("DRAIN_GRACE_SECS", "0"),
        ("DRAIN_SECS", "1"),
        // As in `test_config`: the presence tests turn it on.
        ("PRESENCE", "off"),
    ];
    env.extend_from_slice(extra_env);
    let mut child = command(&env).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = stdout.next_line().await {
            seen.push(line.clone());
            if let Ok(log) = serde_json::from_str::<Value>(&line)
                && log["message"] == "lq-realtime listening"
            {
                return log["addr"].as_str().expect("addr field").to_owned();
            }
        }
        panic!("the process ended before listening: {seen:?}");
    })
    .await
    .expect("listening within 30 s");
    let output = tokio::spawn(async move {
        let mut lines = seen;
        loop {
            tokio::select! {
                line = stdout.next_line() => match line { Ok(Some(line)) => lines.push(line), _ => break },
                line = stderr.next_line() => match line { Ok(Some(line)) => lines.push(line), _ => break },
            }
        }
        while let Ok(Some(line)) = stderr.next_line().await {
            lines.push(line);
        }
        lines
    });
    Process { child, addr, output }
}

impl Process {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    pub(crate) fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status =
            std::process::Command::new("kill").args([&format!("-{name}"), &pid]).status().expect("kill runs");
        assert!(status.success());
    }

    async fn connect(&self, user: &str, tenant: &str) -> WsClient {
        let url = format!("ws://{}/ws?token={}", self.addr, token(user, tenant));
        let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .expect("request");
        let mut client = WsClient::connect(request).await.expect("connected");
        assert_eq!(client.next_json().await["type"], "welcome");
        client
    }

    /// Waits for the exit (at most `within`) and returns its code and everything it printed.
    async fn exit(mut self, within: Duration) -> (Option<i32>, Vec<String>) {
        let status =
            tokio::time::timeout(within, self.child.wait()).await.expect("exits in time").expect("status");
        let output = self.output.await.expect("output");
        (status.code(), output)
    }
}

async fn sigterm_or_sigint_closes_clients_with_1001_and_exits_0(signal: &str) {
    let process = start(&[]).await;
    let mut a = process.connect("bob", "acme").await;
    let mut b = process.connect("eve", "globex").await;
    process.signal(signal);
    for client in [&mut a, &mut b] {
        let frame = client.expect_close().await.expect("a close frame with a code");
        assert_eq!(frame.code, CloseCode::Away);
    }
    let (code, output) = process.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{output:#?}");
}

#[tokio::test]
async fn the_start_sums_the_instance_up_in_one_line_and_warns_of_a_near_miss_variable() {
    let process = start(&[
        ("API_KEYS", "summary-api-key-0123456789"),
        ("WEBHOOK_SECRETS", r#"{"acme":"s1","globex":"s2"}"#),
        ("JWT_SECRET", "meant-to-be-the-jwt-secret-key"),
        ("REDIS_ULR", "redis://127.0.0.1:1"),
    ])
    .await;
    process.signal("TERM");
    let (code, output) = process.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{output:#?}");
    let lines: Vec<Value> = output.iter().filter_map(|line| serde_json::from_str(line).ok()).collect();
    let summary = lines.iter().find(|l| l["message"] == "lq-realtime listening").expect("the start-up line");
    assert_eq!(summary["console"], "off");
    assert_eq!(summary["dashboard"], "off");
    assert_eq!(summary["broker"], "in-process (single instance)");
    assert_eq!(summary["server_api"], "on (1 key)");
    assert_eq!(
        summary["webhooks"],
        "2 tenants (2 with WEBHOOK_SECRETS, 0 provider entries in WEBHOOK_CONFIG)"
    );
    assert_eq!(summary["history"], "100 messages per channel for 3600 s");
    assert_eq!((summary["presence"].as_bool(), summary["persistence"].as_bool()), (Some(false), Some(false)));
    let warnings: Vec<&str> =
        lines.iter().filter(|l| l["level"] == "WARN").filter_map(|l| l["message"].as_str()).collect();
    for expected in [
        "JWT_SECRET is not a variable lq-realtime reads; did you mean JWT_SECRET_KEY?",
        "REDIS_ULR is not a variable lq-realtime reads; did you mean REDIS_URL?",
    ] {
        assert!(warnings.contains(&expected), "{expected:?} in {warnings:#?}");
    }
    let all = output.join("\n");
    assert!(!all.contains("meant-to-be-the-jwt-secret-key"), "a value never reaches the logs");
}

#[tokio::test]
async fn every_command_answers_help_and_version_on_stdout_with_0() {
    for args in [
        &["--help"][..],
        &["-h"],
        &["token", "--help"],
        &["token", "-h"],
        &["token", "--user", "x", "--help"],
    ] {
        let output = command(&[]).args(args).output().await.expect("runs");
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("usage:") && stdout.contains("lq-realtime token"), "{args:?}: {stdout}");
        assert!(output.stderr.is_empty(), "{args:?}");
    }
    for args in [&["--version"][..], &["-V"], &["token", "--version"]] {
        let output = command(&[]).args(args).output().await.expect("runs");
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        assert!(String::from_utf8_lossy(&output.stdout).starts_with("lq-realtime "), "{args:?}");
    }
}

#[tokio::test]
async fn with_no_connection_open_and_no_grace_asked_for_a_signal_stops_the_process_at_once() {
    // An empty value counts as unset: the default grace, skipped with nobody to drain.
    let process = start(&[("DRAIN_GRACE_SECS", ""), ("DRAIN_SECS", "60")]).await;
    process.signal("INT");
    // Well within the 5 s grace and the minute of batches.
    let (code, output) = process.exit(Duration::from_secs(4)).await;
    assert_eq!(code, Some(0), "{output:#?}");
    assert!(output.iter().any(|line| line.contains("no connection open: stopping at once")), "{output:#?}");
}

#[tokio::test]
async fn a_second_signal_during_the_drain_closes_every_connection_at_once() {
    let process = start(&[("DRAIN_GRACE_SECS", "60"), ("DRAIN_SECS", "60")]).await;
    let mut client = process.connect("bob", "acme").await;
    process.signal("TERM");
    let ready = format!("http://{}/ready", process.addr);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while reqwest::get(&ready).await.map(|r| r.status().as_u16()).unwrap_or(0) != 503 {
        assert!(std::time::Instant::now() < deadline, "/ready did not turn 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.expect_nothing_pending().await;
    process.signal("TERM");
    let frame = client.expect_close().await.expect("a close frame with a code");
    assert_eq!(frame.code, CloseCode::Away);
    let (code, output) = process.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{output:#?}");
    assert!(
        output.iter().any(|line| line.contains("second signal: closing every connection now")),
        "{output:#?}"
    );
}

#[tokio::test]
async fn sigterm_closes_every_client_with_1001_and_exits_0_within_10_s() {
    sigterm_or_sigint_closes_clients_with_1001_and_exits_0("TERM").await;
}

#[tokio::test]
async fn sigint_closes_every_client_with_1001_and_exits_0_within_10_s() {
    sigterm_or_sigint_closes_clients_with_1001_and_exits_0("INT").await;
}

#[tokio::test]
async fn bad_configuration_stops_the_process_with_one_line_per_problem() {
    let output = command(&[
        ("BIND_ADDR", "not-an-address"),
        ("JWT_SECRET_KEY", "short"),
        ("WEBHOOK_SECRETS", "{broken"),
        ("MAX_CONNECTIONS", "many"),
        ("LOG_FORMAT", "xml"),
    ])
    .output()
    .await
    .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 5, "{stderr}");
    for variable in ["BIND_ADDR", "JWT_SECRET_KEY", "WEBHOOK_SECRETS", "MAX_CONNECTIONS", "LOG_FORMAT"] {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("configuration error: {variable}: "))),
            "{variable}: {stderr}"
        );
    }
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[tokio::test]
async fn a_malformed_webhook_configuration_file_stops_the_process_naming_each_line() {
    let file = crate::helpers::TempFile::with_contents(
        "webhooks.toml",
        "[tenants.acme.providers.github]\nscheme = \"github\"\nsecrets = []\n\n[tenants.acme.providers.stripe]\nscheme = \"stripe\"\nsecrets = [\"sk_live_1\"]\n",
    );
    let output = command(&[("WEBHOOK_CONFIG", file.path_str())]).output().await.expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let path = file.path_str();
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            format!(
                "configuration error: WEBHOOK_CONFIG: {path} line 3: secrets: lists no secret: at least one is required"
            ),
            format!(
                "configuration error: WEBHOOK_CONFIG: {path} line 7: secrets: secret 1: Stripe signing secrets start with whsec_ (Stripe Dashboard → Webhooks → Signing secret)"
            ),
        ],
        "{stderr}"
    );
    let broken = crate::helpers::TempFile::with_contents(
        "broken.toml",
        "[tenants.acme.providers.github\nscheme = 1\n",
    );
    let output = command(&[("WEBHOOK_CONFIG", broken.path_str())]).output().await.expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("configuration error: WEBHOOK_CONFIG: {} line 1: ", broken.path_str())),
        "{stderr}"
    );
    let missing = command(&[("WEBHOOK_CONFIG", "/nonexistent/webhooks.toml")]).output().await.expect("runs");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.starts_with("configuration error: WEBHOOK_CONFIG: cannot read /nonexistent/webhooks.toml: "),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_port_already_in_use_is_reported_without_a_panic() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let output =
        command(&[("BIND_ADDR", &addr), ("JWT_SECRET_KEY", JWT_SECRET)]).output().await.expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("BIND_ADDR") && stderr.contains(&addr), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn the_token_command_prints_a_token_the_service_accepts() {
    let output = command(&[("JWT_SECRET_KEY", JWT_SECRET)])
        .args(["token", "--user", "dana", "--tenant", "acme", "--ttl", "120"])
        .output()
        .await
        .expect("runs");
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let token = stdout.lines().last().expect("a line").trim().to_owned();
    let app = spawn_app().await;
    let mut client = app.try_connect(&token).await.expect("the minted token is accepted");
    assert_eq!(client.next_json().await["payload"]["user_id"], "dana");
}

#[tokio::test]
async fn the_token_command_explains_what_is_missing() {
    // No secret, and no demo instance on the port: it says what to do.
    let port = crate::redis_support::free_port();
    let bind = format!("127.0.0.1:{port}");
    let output = command(&[("BIND_ADDR", &bind)])
        .args(["token", "--user", "dana", "--tenant", "acme"])
        .output()
        .await
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "JWT_SECRET_KEY is not set, and no demo instance answers on 127.0.0.1:{port}"
        )) && stderr.contains("Start one with `lq-realtime`"),
        "{stderr}"
    );
    let output = command(&[("JWT_SECRET_KEY", JWT_SECRET)])
        .args(["token", "--tenant", "acme"])
        .output()
        .await
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--user is required"));
    let output = command(&[("JWT_PUBLIC_KEY_FILE", "/etc/keys/public.pem")])
        .args(["token", "--user", "dana", "--tenant", "acme"])
        .output()
        .await
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("JWT_PUBLIC_KEY_FILE"));
}

/// Starts the binary with no configuration but a free port (demo mode), and reads the
/// `name: value` lines it prints until every one of `wanted` is there; the process ends with the
/// returned child.
async fn start_demo(wanted: &[&str]) -> (tokio::process::Child, std::collections::HashMap<String, String>) {
    let mut child = command(&[("BIND_ADDR", "127.0.0.1:0"), ("LOG_FORMAT", "json")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let printed = tokio::time::timeout(Duration::from_secs(30), async {
        let mut printed = std::collections::HashMap::new();
        while let Ok(Some(line)) = stdout.next_line().await {
            if let Some((name, value)) = line.split_once(": ") {
                printed.insert(name.trim().to_owned(), value.trim().to_owned());
            }
            if wanted.iter().all(|name| printed.contains_key(*name)) {
                return printed;
            }
        }
        panic!("not every one of {wanted:?} was printed: {printed:?}");
    })
    .await
    .expect("printed in time");
    (child, printed)
}

#[tokio::test]
async fn in_demo_mode_two_users_get_their_tokens_from_the_instance_and_exchange_a_direct_message() {
    let (_demo, printed) = start_demo(&["connect"]).await;
    let url = &printed["connect"];
    let addr = url.trim_start_matches("ws://").split('/').next().expect("address").to_owned();
    // Alice's token from the command line, Bob's as the console gets it.
    let output = command(&[("BIND_ADDR", &addr)])
        .args(["token", "--user", "alice", "--tenant", "acme"])
        .output()
        .await
        .expect("runs");
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let alice_token = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let bob: Value = reqwest::get(format!("http://{addr}/console/token?user=bob&tenant=acme"))
        .await
        .expect("GET /console/token")
        .json()
        .await
        .expect("JSON");
    assert_eq!((bob["user"].as_str(), bob["tenant"].as_str()), (Some("bob"), Some("acme")));
    let connect = |token: String| {
        let url = format!("ws://{addr}/ws?token={token}");
        async move {
            let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .expect("request");
            let mut client = WsClient::connect(request).await.expect("connected");
            let welcome = client.next_json().await;
            assert_eq!(welcome["type"], "welcome");
            (client, welcome)
        }
    };
    let (mut alice, welcome) = connect(alice_token).await;
    assert_eq!(
        (welcome["payload"]["user_id"].as_str(), welcome["payload"]["tenant_id"].as_str()),
        (Some("alice"), Some("acme"))
    );
    let (mut bob, _) = connect(bob["token"].as_str().expect("token").to_owned()).await;
    alice
        .send_json(&serde_json::json!({"type": "direct", "to_user": "bob", "payload": {"text": "hi bob"}}))
        .await;
    let direct = loop {
        let frame = bob.next_json().await;
        if frame["type"] == "direct" {
            break frame;
        }
    };
    assert_eq!(
        (direct["from_user"].as_str(), direct["payload"]["text"].as_str()),
        (Some("alice"), Some("hi bob"))
    );
    // A page that merely resolves to this machine gets no token.
    let rebound = reqwest::Client::new()
        .get(format!("http://{addr}/console/token?user=mallory&tenant=acme"))
        .header("host", "lq.example.com")
        .send()
        .await
        .expect("GET");
    assert_eq!(rebound.status(), 403);
}

#[tokio::test]
async fn with_no_configuration_at_all_it_prints_a_demo_token_that_works() {
    let (_demo, mut printed) = start_demo(&["connect", "console", "dashboard"]).await;
    let url = printed.remove("connect").expect("connect");
    let (console, dashboard) = (printed.remove("console"), printed.remove("dashboard"));
    let (console, dashboard) = (console.expect("console"), dashboard.expect("dashboard"));
    let request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).expect("request");
    let mut client = WsClient::connect(request).await.expect("the demo URL connects");
    assert_eq!(client.next_json().await["payload"]["tenant_id"], "demo");
    for page in [console, dashboard] {
        let answer = reqwest::get(&page).await.expect("the printed page answers");
        assert_eq!(answer.status(), 200, "{page}");
    }
}

#[tokio::test]
async fn tokens_and_secrets_never_appear_in_the_logs() {
    let process =
        start(&[("RUST_LOG", "trace"), ("WEBHOOK_SECRETS", r#"{"acme":"webhook-secret-in-env"}"#)]).await;
    let token = token("bob", "acme");
    let url = format!("ws://{}/ws?token={token}", process.addr);
    let request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).expect("request");
    let mut client = WsClient::connect(request).await.expect("connected");
    assert_eq!(client.next_json().await["type"], "welcome");
    // A refused token is not logged either.
    let refused = format!("ws://{}/ws?token={token}x", process.addr);
    let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(refused)
        .expect("request");
    assert!(WsClient::connect(request).await.is_err());
    client.close().await;
    // A refused webhook: its reason is logged at INFO with the id its answer carries.
    let body = br#"{"n":1}"#.to_vec();
    let refused = reqwest::Client::new()
        .post(format!("http://{}/webhooks/github/acme", process.addr))
        .header("x-signature", signature("not-the-webhook-secret", &body))
        .body(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(refused.status(), 401);
    let request_id = refused.headers()["x-request-id"].to_str().expect("ASCII").to_owned();
    process.signal("TERM");
    let (code, output) = process.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0));
    let refusal = output
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["message"] == "request refused" && line["request_id"] == request_id.as_str())
        .unwrap_or_else(|| panic!("no refusal logged for {request_id}: {output:?}"));
    assert_eq!(refusal["level"], "INFO");
    assert_eq!(refusal["code"], "signature_mismatch");
    assert!(refusal["reason"].as_str().is_some_and(|r| r.contains("does not match")), "{refusal}");
    for line in &output {
        assert!(
            serde_json::from_str::<Value>(line).is_ok_and(|v| v.is_object()),
            "not a JSON object: {line}"
        );
    }
    let all = output.join("\n");
    assert!(all.contains("/ws"), "requests are logged: {all}");
    assert!(!all.contains(&token), "a token leaked into the logs");
    assert!(!all.contains(JWT_SECRET), "the JWT secret leaked into the logs");
    assert!(!all.contains("webhook-secret-in-env"), "a webhook secret leaked into the logs");
}

#[tokio::test]
async fn on_sigterm_ready_turns_503_before_any_client_is_closed_and_all_are_closed_within_the_drain() {
    let process = start(&[("DRAIN_GRACE_SECS", "1"), ("DRAIN_SECS", "2")]).await;
    let mut clients = Vec::new();
    for n in 0..10 {
        clients.push(process.connect(&format!("user-{n}"), "acme").await);
    }
    let ready = |addr: String| async move {
        reqwest::get(format!("http://{addr}/ready")).await.map(|r| r.status().as_u16()).unwrap_or(0)
    };
    assert_eq!(ready(process.addr.clone()).await, 200);
    let signalled = std::time::Instant::now();
    process.signal("TERM");
    // Within the grace period: not ready, and every client still connected.
    let mut saw_503 = false;
    while signalled.elapsed() < Duration::from_millis(800) {
        if ready(process.addr.clone()).await == 503 {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_503, "/ready did not turn 503 during the grace period");
    for client in &mut clients {
        client.expect_nothing_pending().await;
    }
    for client in &mut clients {
        let frame = client.expect_close().await.expect("a close frame with a code");
        assert_eq!(frame.code, CloseCode::Away);
    }
    assert!(signalled.elapsed() < Duration::from_secs(4), "closed after {:?}", signalled.elapsed());
    let (code, output) = process.exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{output:#?}");
}
