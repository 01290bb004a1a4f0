//! The deployment files users run: `docker-compose.yml`, its load balancer configuration and
//! the Dockerfile. No Docker engine runs here, so they are parsed and checked, and the load
//! balancer configuration is run for real with nginx in front of real instances.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use yaml_rust2::{Yaml, YamlLoader};

use crate::helpers::*;
use crate::redis_support::{RedisServer, free_port};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Resolves `<<` merge keys, which YAML anchors in compose files rely on.
fn merged(node: &Yaml) -> Yaml {
    match node {
        Yaml::Hash(map) => {
            let mut out = yaml_rust2::yaml::Hash::new();
            if let Some(Yaml::Hash(base)) = map.get(&Yaml::String("<<".into())).map(merged) {
                out.extend(base);
            }
            for (key, value) in map {
                if key.as_str() != Some("<<") {
                    out.insert(key.clone(), merged(value));
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(items) => Yaml::Array(items.iter().map(merged).collect()),
        other => other.clone(),
    }
}

fn compose() -> Yaml {
    let text = std::fs::read_to_string(workspace().join("docker-compose.yml")).expect("docker-compose.yml");
    let docs = YamlLoader::load_from_str(&text).expect("docker-compose.yml is valid YAML");
    merged(&docs[0])
}

/// The environment of a service, whether written as a map or as a list of `K=V`.
fn environment(service: &Yaml) -> Vec<(String, String)> {
    match &service["environment"] {
        Yaml::Hash(map) => map
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    _ => String::new(),
                };
                (k.as_str().unwrap_or_default().to_owned(), value)
            })
            .collect(),
        Yaml::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str()?.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect(),
        _ => Vec::new(),
    }
}

/// The nginx configuration carried inline by the compose file, as nginx receives it (Compose
/// turns `$$` into `$`).
fn nginx_config(compose: &Yaml) -> String {
    let configs = compose["configs"].as_hash().expect("top-level configs");
    configs
        .values()
        .filter_map(|config| config["content"].as_str())
        .find(|content| content.contains("upstream"))
        .expect("an inline nginx configuration with an upstream")
        .replace("$$", "$")
}

const INSTANCES: [&str; 3] = ["lq-realtime-1", "lq-realtime-2", "lq-realtime-3"];

#[test]
fn docker_compose_runs_redis_three_instances_and_nginx_as_the_only_entry_point() {
    let compose = compose();
    let services = compose["services"].as_hash().expect("services");
    let names: HashSet<&str> = services.keys().filter_map(Yaml::as_str).collect();
    for expected in ["redis", "postgres", "nginx"].iter().chain(INSTANCES.iter()) {
        assert!(names.contains(expected), "service {expected} missing: {names:?}");
    }
    for instance in INSTANCES {
        let service = &compose["services"][instance];
        let env = environment(service);
        let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        assert_eq!(get("REDIS_URL"), Some("redis://redis:6379"), "{instance}");
        assert!(
            get("DATABASE_URL")
                .is_some_and(|v| v.starts_with("postgres://lq:") && v.ends_with("@postgres:5432/lq")),
            "{instance}"
        );
        assert_eq!(get("OUTBOX_TABLE"), Some("lq_outbox"), "{instance}");
        assert!(get("JWT_SECRET_KEY").is_some_and(|v| v.contains("JWT_SECRET_KEY")), "{instance}");
        // The dashboard, with the key it signs in with, is one variable away.
        for passed_on in ["API_KEYS", "ADMIN"] {
            assert_eq!(get(passed_on), Some(format!("${{{passed_on}:-}}").as_str()), "{instance}");
        }
        assert!(
            service["ports"].is_badvalue() || service["ports"].is_null(),
            "{instance} must only be reached through nginx"
        );
        assert!(
            service["build"]["dockerfile"].as_str().is_some_and(|d| workspace().join(d).is_file()),
            "{instance}"
        );
        let depends = format!("{:?}", service["depends_on"]);
        assert!(depends.contains("redis"), "{instance} depends on redis: {depends}");
        assert_eq!(
            service["depends_on"]["postgres"]["condition"].as_str(),
            Some("service_healthy"),
            "{instance}"
        );
    }
    let nginx = &compose["services"]["nginx"];
    let ports: Vec<&str> =
        nginx["ports"].as_vec().expect("nginx ports").iter().filter_map(Yaml::as_str).collect();
    assert_eq!(ports, ["8080:80"]);
    let config = nginx_config(&compose);
    for instance in INSTANCES {
        assert!(
            config.contains(&format!("server {instance}:8080 max_fails=0;")),
            "{instance} in the upstream"
        );
    }
    let directives: String =
        config.lines().map(|line| line.split('#').next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
    // Any instance serves any WebSocket client: no affinity there. An SSE stream's POSTs must
    // reach the instance holding it: /sse goes by client address.
    let upstream = |name: &str| {
        let start =
            directives.find(&format!("upstream {name} {{")).unwrap_or_else(|| panic!("upstream {name}"));
        directives[start..].split('}').next().unwrap_or_default().to_owned()
    };
    let main = upstream("lq_realtime");
    assert!(!main.contains("ip_hash") && !main.contains("sticky"), "no sticky sessions: {main}");
    assert!(upstream("lq_realtime_sse").contains("ip_hash;"), "SSE by client address");
    assert!(
        directives.contains("location /sse {") && directives.contains("proxy_pass http://lq_realtime_sse;")
    );
    for directive in ["proxy_http_version 1.1", "Upgrade $http_upgrade", "$connection_upgrade"] {
        assert!(config.contains(directive), "{directive} missing");
    }
}

#[test]
fn the_dockerfile_is_multi_stage_and_runs_as_a_non_root_user() {
    let text = std::fs::read_to_string(workspace().join("bootstrap/Dockerfile")).expect("Dockerfile");
    let instructions: Vec<&str> =
        text.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    assert!(instructions.iter().filter(|l| l.starts_with("FROM ")).count() >= 2, "multi-stage");
    let user = instructions.iter().rev().find(|l| l.starts_with("USER ")).expect("a USER instruction");
    let user = user.trim_start_matches("USER ").trim();
    assert!(user != "root" && user != "0" && !user.starts_with("0:"), "runs as {user}");
    assert!(instructions.iter().any(|l| l.starts_with("ENTRYPOINT") && l.contains("lq-realtime")));
    assert!(text.contains("--release") && text.contains("-p bootstrap"));
}

/// An nginx process of our own, on a free port, with the compose file's configuration.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    fn start(config: &str, instance_ports: &[u16]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("lq-realtime-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let mut site = config.to_owned();
        for (name, instance_port) in INSTANCES.iter().zip(instance_ports) {
            site =
                site.replace(&format!("server {name}:8080 "), &format!("server 127.0.0.1:{instance_port} "));
        }
        site = site.replace("listen 80;", &format!("listen 127.0.0.1:{port};"));
        site = site.replace("listen 80 default_server;", &format!("listen 127.0.0.1:{port} default_server;"));
        assert!(site.contains(&format!("127.0.0.1:{port}")), "the site listens on port 80: {config}");
        std::fs::write(dir.join("site.conf"), site).expect("site.conf");
        let d = dir.display();
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
                 include {d}/site.conf;\n}}\n"
            ),
        )
        .expect("nginx.conf");
        let nginx = || {
            let mut command = Command::new("nginx");
            command.arg("-p").arg(&dir).arg("-c").arg(dir.join("nginx.conf"));
            command
        };
        let test = nginx().arg("-t").output().unwrap_or_else(|e| {
            panic!("cannot run nginx ({e}); install it with `apt-get install -y nginx-light`")
        });
        assert!(test.status.success(), "nginx -t: {}", String::from_utf8_lossy(&test.stderr));
        let child = nginx().stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("nginx starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port, dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn websockets_and_webhooks_work_through_the_compose_load_balancer_configuration() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut instances = Vec::new();
    for _ in 0..3 {
        let url = url.clone();
        let app = spawn_app_with(test_config(|vars| {
            vars.insert("REDIS_URL".into(), url);
            vars.insert("API_KEYS".into(), crate::stats::KEY.into());
            vars.insert("ADMIN".into(), "on".into());
        }))
        .await;
        app.wait_ready(Duration::from_secs(10)).await;
        instances.push(app);
    }
    let ports: Vec<u16> = instances.iter().map(|app| app.addr.port()).collect();
    let nginx = Nginx::start(&nginx_config(&compose()), &ports);
    let front = format!("127.0.0.1:{}", nginx.port);

    // Round robin without stickiness spreads the clients over the instances.
    let mut clients = Vec::new();
    let mut instance_prefixes = HashSet::new();
    for user in ["u1", "u2", "u3", "u4", "u5", "u6"] {
        let request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            format!("ws://{front}/ws?token={}", token(user, "acme")),
        )
        .expect("request");
        let mut client = WsClient::connect(request).await.expect("connected through nginx");
        let welcome = client.next_json().await;
        let connection_id = welcome["payload"]["connection_id"].as_str().expect("id").to_owned();
        instance_prefixes.insert(connection_id.rsplit_once('-').expect("prefix-counter").0.to_owned());
        clients.push(client);
    }
    assert!(instance_prefixes.len() >= 2, "clients spread over instances: {instance_prefixes:?}");
    // An SSE stream through nginx, and its POSTs reach the instance that holds it.
    let http = reqwest::Client::new();
    let front_addr = front.parse().expect("address");
    let (mut stream, _) = crate::transport::Client::open_sse(front_addr, &http, "s1", "acme", "", &[], None)
        .await
        .expect("stream");
    stream.expect_nothing_pending().await;

    let body = serde_json::to_vec(&json!({"via": "nginx"})).expect("json");
    let response = reqwest::Client::new()
        .post(format!("http://{front}/webhooks/github"))
        .header("x-tenant-id", "acme")
        .header("x-signature", signature(ACME_SECRET, &body))
        .body(body)
        .send()
        .await
        .expect("sent through nginx");
    assert_eq!(response.status().as_u16(), 200);
    for client in &mut clients {
        assert_eq!(client.next_json().await["payload"]["data"]["via"], "nginx");
    }
    assert_eq!(stream.next_json().await["payload"]["data"]["via"], "nginx");

    // The dashboard through nginx, its statistics streamed unbuffered with every instance's
    // connections: six WebSockets and one SSE stream.
    assert_eq!(http.get(format!("http://{front}/admin")).send().await.expect("GET /admin").status(), 200);
    let response = http
        .get(format!("http://{front}/api/stats/stream"))
        .bearer_auth(crate::stats::KEY)
        .send()
        .await
        .expect("the statistics stream through nginx");
    assert_eq!(response.status(), 200);
    let mut events = crate::stats::EventReader::new(response);
    events.until("stats", |s| s["totals"]["instances"] == 3 && s["totals"]["connections"] == 7).await;
}

/// An inline config of the compose file, as its container receives it.
fn inline_config(compose: &Yaml, name: &str) -> String {
    compose["configs"][name]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("inline config {name} missing"))
        .replace("$$", "$")
}

#[test]
fn prometheus_scrapes_every_instance() {
    let compose = compose();
    let names: HashSet<&str> =
        compose["services"].as_hash().expect("services").keys().filter_map(Yaml::as_str).collect();
    assert!(names.contains("prometheus") && names.contains("grafana"), "{names:?}");
    let configs = compose["configs"].as_hash().expect("configs");
    let prometheus = configs
        .values()
        .filter_map(|c| c["content"].as_str())
        .find(|c| c.contains("scrape_configs"))
        .expect("a prometheus configuration");
    for instance in INSTANCES {
        assert!(prometheus.contains(&format!("{instance}:8080")), "{instance} is scraped");
    }
}

#[tokio::test]
async fn the_grafana_dashboard_is_valid_json_and_uses_only_metrics_that_exist() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&inline_config(&compose(), "grafana-dashboard")).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut used = HashSet::new();
    for panel in panels {
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()), "a panel without a title: {panel}");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            let mut rest = expr;
            while let Some(at) = rest.find("lq_") {
                let name: String =
                    rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                rest = &rest[at + name.len()..];
                used.insert(name);
            }
        }
    }
    assert!(!used.is_empty(), "the dashboard queries no lq_ metric");

    // Every name a running instance exposes, with the series suffixes of histograms. The
    // labelled counters appear once something is counted: a refused token and a webhook.
    let app = spawn_app().await;
    assert!(app.try_connect("garbage").await.is_err());
    assert_eq!(app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({})).await.status, 200);
    let text = app.http.get(app.url("/metrics")).send().await.expect("scraped").text().await.expect("text");
    let exposed: HashSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    for name in &used {
        assert!(exposed.contains(name), "the dashboard uses {name}, which no instance exposes: {exposed:?}");
    }
}
