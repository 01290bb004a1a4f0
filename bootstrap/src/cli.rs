//! The command line: `lq-realtime` serves; `lq-realtime token …` mints a token.

use std::process::ExitCode;

use adapters::outbound::jwt::{JwtIssuer, TokenRequest};
use adapters::outbound::system::SystemClock;
use application::ports::Clock;
use domain::{Allowed, Caps, SCOPE_WS_CONNECT, TenantId, TopicName, UserId};

use crate::app::Application;
use crate::config::{
    Config, DEFAULT_DEMO_BIND_ADDR, ENV_BIND_ADDR, ENV_JWT_AUDIENCE, ENV_JWT_ISSUER, ENV_JWT_PUBLIC_KEY_FILE,
    ENV_JWT_SECRET_KEY, jwt_secret_from_lookup, listen_addr,
};
use crate::telemetry;

const USAGE: &str = "\
usage:
  lq-realtime                      serve (configured by environment variables, see docs/configuration.md)
  lq-realtime token --user U --tenant T [--ttl SECS] [--scope \"ws:connect\"] [--caps JSON]
                                   print a connection token signed with JWT_SECRET_KEY; --caps
                                   '[{\"channels\":[\"chat.*\"],\"allow\":[\"sub\",\"pub\"]}]' lets it use topics
  lq-realtime token --user U --tenant T --channel TOPIC [--allow sub,pub,presence,history] [--ttl SECS]
                                   print a subscription token for one topic (default --allow sub)
  lq-realtime --help | --version   (also: lq-realtime token --help)";

/// Exit code for bad configuration or usage.
const EXIT_CONFIG: u8 = 2;

/// Runs the command line with the process's arguments and environment.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let lookup = |key: &str| std::env::var(key).ok();
    match args.first().map(String::as_str) {
        None => serve(lookup),
        Some("token") => token(&args[1..], lookup),
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("--version" | "-V") => {
            println!("lq-realtime {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("error: unknown command {other:?}\n{USAGE}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn serve(lookup: impl Fn(&str) -> Option<String>) -> ExitCode {
    let config = match Config::from_lookup(lookup) {
        Ok(config) => config,
        Err(errors) => {
            for error in &errors.0 {
                eprintln!("configuration error: {error}");
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::init(&config.log_filter, config.log_format);
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    for miss in crate::environment::near_misses(names) {
        tracing::warn!("{miss}");
    }
    runtime.block_on(async {
        let app = match Application::build(config).await {
            Ok(app) => app,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(token) = app.demo_token() {
            let port = app.local_addr().port();
            tracing::warn!(
                "JWT_SECRET_KEY is not set: tokens are signed with a random secret that dies with this \
                 process. Set JWT_SECRET_KEY (32+ bytes) for anything but a trial. A demo token for \
                 user demo of tenant demo is printed on stdout."
            );
            println!("demo token (user demo, tenant demo, valid 1 h): {token}");
            println!("connect:    ws://127.0.0.1:{port}/ws?token={token}");
            let (console, dashboard) = app.pages();
            if console {
                println!("console:    http://127.0.0.1:{port}/");
            }
            if dashboard {
                println!("dashboard:  http://127.0.0.1:{port}/admin");
            }
        }
        let (first, second) = (tokio::sync::oneshot::channel::<()>(), tokio::sync::oneshot::channel::<()>());
        let (first_sent, first_received) = first;
        let (second_sent, second_received) = second;
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = first_sent.send(());
            shutdown_signal().await;
            let _ = second_sent.send(());
        });
        app.run_until_hurried(
            async {
                let _ = first_received.await;
            },
            async {
                if second_received.await.is_err() {
                    std::future::pending::<()>().await;
                }
            },
        )
        .await;
        ExitCode::SUCCESS
    })
}

/// Without `JWT_SECRET_KEY`: asks the demo instance running on this machine (on `BIND_ADDR`'s
/// port, 8080 by default) for a token of `--user` and `--tenant`, or says what to do.
fn token_from_demo(args: &TokenArgs, bind_addr: Option<String>) -> ExitCode {
    if args.caps.is_some()
        || args.channel.is_some()
        || args.ttl_secs != 3600
        || args.scope != SCOPE_WS_CONNECT
    {
        eprintln!(
            "error: without {ENV_JWT_SECRET_KEY}, tokens come from a running demo instance, for --user and \
             --tenant only (valid 1 h, every topic allowed); set {ENV_JWT_SECRET_KEY} to the instances' secret \
             to choose --ttl, --scope, --caps or --channel"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    // Where the demo listens, reached from this machine: an address that listens everywhere is
    // reached on loopback.
    let listen = bind_addr.as_deref().map(str::trim).filter(|raw| !raw.is_empty());
    let mut addr = listen
        .or(Some(DEFAULT_DEMO_BIND_ADDR))
        .and_then(listen_addr)
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 8080)));
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let path = format!("/console/token?user={}&tenant={}", args.user, args.tenant);
    match demo_request(addr, &path) {
        Ok((200, body)) => match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(answer) if answer["token"].is_string() => {
                println!("{}", answer["token"].as_str().unwrap_or_default());
                ExitCode::SUCCESS
            }
            _ => {
                eprintln!("error: the instance on {addr} answered without a token: {body}");
                ExitCode::FAILURE
            }
        },
        Ok((status, body)) => {
            eprintln!(
                "error: {ENV_JWT_SECRET_KEY} is not set, and the instance on {addr} gives no demo token \
                 ({status} {body}): set {ENV_JWT_SECRET_KEY} to the instances' secret to mint tokens here"
            );
            ExitCode::from(EXIT_CONFIG)
        }
        Err(error) => {
            eprintln!(
                "error: {ENV_JWT_SECRET_KEY} is not set, and no demo instance answers on {addr} ({error}). \
                 Start one with `lq-realtime` (no configuration: demo mode) and run this again, or set \
                 {ENV_JWT_SECRET_KEY} to the instances' secret (BIND_ADDR names another port)"
            );
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `GET path` on `addr`, HTTP/1.0: the status and the body.
fn demo_request(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    stream.take(64 * 1024).read_to_string(&mut answer)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

/// The options of `lq-realtime token`.
#[derive(Debug, PartialEq, Eq)]
struct TokenArgs {
    user: UserId,
    tenant: TenantId,
    ttl_secs: u64,
    scope: String,
    /// The `caps` claim, checked like the service checks it.
    caps: Option<serde_json::Value>,
    /// A subscription token's topic and what it grants.
    channel: Option<TopicName>,
    allow: Option<Vec<String>>,
}

fn parse_token_args(args: &[String]) -> Result<TokenArgs, String> {
    let (mut user, mut tenant, mut ttl, mut scope) = (None, None, None, None);
    let (mut caps, mut channel, mut allow) = (None, None, None);
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().cloned().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--user" => user = Some(value()?),
            "--tenant" => tenant = Some(value()?),
            "--ttl" => ttl = Some(value()?),
            "--scope" => scope = Some(value()?),
            "--caps" => caps = Some(value()?),
            "--channel" => channel = Some(value()?),
            "--allow" => allow = Some(value()?),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let user = UserId::parse(&user.ok_or("--user is required")?).map_err(|e| format!("--user: {e}"))?;
    let tenant =
        TenantId::parse(&tenant.ok_or("--tenant is required")?).map_err(|e| format!("--tenant: {e}"))?;
    let ttl_secs = match ttl {
        None => 3600,
        Some(raw) => match raw.parse::<u64>() {
            Ok(n) if (1..=31_536_000).contains(&n) => n,
            _ => return Err(format!("--ttl: expected seconds between 1 and 31536000, got {raw:?}")),
        },
    };
    let caps = caps
        .map(|raw| {
            let value: serde_json::Value =
                serde_json::from_str(&raw).map_err(|e| format!("--caps: not JSON: {e}"))?;
            Caps::from_claim(Some(&value)).map_err(|e| format!("--caps: {e}"))?;
            Ok::<_, String>(value)
        })
        .transpose()?;
    let channel =
        channel.map(|name| TopicName::parse(&name).map_err(|e| format!("--channel: {e}"))).transpose()?;
    let allow = match allow {
        Some(_) if channel.is_none() => {
            return Err("--allow goes with --channel (a subscription token)".to_owned());
        }
        Some(list) => {
            let names: Vec<String> =
                list.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
            Allowed::parse(&names).map_err(|e| format!("--allow: {e}"))?;
            Some(names)
        }
        None => None,
    };
    Ok(TokenArgs {
        user,
        tenant,
        ttl_secs,
        scope: scope.unwrap_or_else(|| SCOPE_WS_CONNECT.to_owned()),
        caps,
        channel,
        allow,
    })
}

const TOKEN_USAGE: &str = "\
usage:
  lq-realtime token --user U --tenant T [--ttl SECS] [--scope \"ws:connect\"] [--caps JSON]
      a connection token, signed with JWT_SECRET_KEY (and JWT_ISSUER, JWT_AUDIENCE when set),
      valid --ttl seconds (3600); --caps '[{\"channels\":[\"chat.*\"],\"allow\":[\"sub\",\"pub\"]}]'
      lets it use topics
  lq-realtime token --user U --tenant T --channel TOPIC [--allow sub,pub,presence,history] [--ttl SECS]
      a subscription token for one topic (default --allow sub)
  lq-realtime token --help | --version";

fn token(args: &[String], lookup: impl Fn(&str) -> Option<String>) -> ExitCode {
    if args.iter().any(|arg| matches!(arg.as_str(), "--help" | "-h")) {
        println!("{TOKEN_USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|arg| matches!(arg.as_str(), "--version" | "-V")) {
        println!("lq-realtime {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let args = match parse_token_args(args) {
        Ok(args) => args,
        Err(problem) => {
            eprintln!("error: {problem}\n{TOKEN_USAGE}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if lookup(ENV_JWT_PUBLIC_KEY_FILE).is_some_and(|v| !v.trim().is_empty()) {
        eprintln!(
            "configuration error: {ENV_JWT_PUBLIC_KEY_FILE}: instances verifying with a public key accept only tokens \
             signed with its private key, which this command does not have; sign tokens where that key lives"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let secret = match jwt_secret_from_lookup(&lookup) {
        Ok(Some(secret)) => secret,
        Ok(None) => return token_from_demo(&args, lookup(ENV_BIND_ADDR)),
        Err(error) => {
            eprintln!("configuration error: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let now = SystemClock.now().unix_seconds();
    let request = TokenRequest {
        user_id: args.user.to_string(),
        tenant_id: args.tenant.to_string(),
        scope: args.scope,
        iat: now,
        exp: now + args.ttl_secs,
        iss: lookup(ENV_JWT_ISSUER).filter(|v| !v.trim().is_empty()).map(|v| v.trim().to_owned()),
        aud: lookup(ENV_JWT_AUDIENCE).filter(|v| !v.trim().is_empty()).map(|v| v.trim().to_owned()),
        caps: args.caps,
        channel: args.channel.map(|topic| topic.to_string()),
        allow: args.allow,
    };
    match JwtIssuer::hs256(secret.as_bytes()).issue(&request) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn token_options_have_defaults_for_ttl_and_scope() {
        let parsed = parse_token_args(&args(&["--user", "bob", "--tenant", "acme"])).expect("valid");
        assert_eq!(parsed.user.as_str(), "bob");
        assert_eq!(parsed.tenant.as_str(), "acme");
        assert_eq!(parsed.ttl_secs, 3600);
        assert_eq!(parsed.scope, "ws:connect");
        let parsed =
            parse_token_args(&args(&["--tenant", "t", "--user", "u", "--ttl", "60", "--scope", "a b"]))
                .expect("valid");
        assert_eq!((parsed.ttl_secs, parsed.scope.as_str()), (60, "a b"));
        let parsed = parse_token_args(&args(&[
            "--user",
            "u",
            "--tenant",
            "t",
            "--channel",
            "orders",
            "--allow",
            "sub, pub",
        ]))
        .expect("valid");
        assert_eq!(parsed.channel.map(|c| c.to_string()), Some("orders".to_owned()));
        assert_eq!(parsed.allow, Some(vec!["sub".to_owned(), "pub".to_owned()]));
        let caps = r#"[{"channels":["chat.*"],"allow":["sub"]}]"#;
        let parsed =
            parse_token_args(&args(&["--user", "u", "--tenant", "t", "--caps", caps])).expect("valid");
        assert_eq!(parsed.caps, Some(serde_json::json!([{"channels": ["chat.*"], "allow": ["sub"]}])));
    }

    #[test]
    fn bad_token_options_are_explained() {
        for (list, expected) in [
            (&["--tenant", "t"][..], "--user is required"),
            (&["--user", "u"][..], "--tenant is required"),
            (&["--user", "u:x", "--tenant", "t"][..], "--user:"),
            (&["--user", "u", "--tenant", "t", "--ttl", "0"][..], "--ttl"),
            (&["--user"][..], "--user needs a value"),
            (&["--nope"][..], "unknown option"),
            (&["--user", "u", "--tenant", "t", "--caps", "[{"][..], "--caps: not JSON"),
            (
                &["--user", "u", "--tenant", "t", "--caps", r#"[{"channels":["a:b"],"allow":["sub"]}]"#][..],
                "--caps: invalid channel pattern",
            ),
            (&["--user", "u", "--tenant", "t", "--channel", "a b"][..], "--channel:"),
            (&["--user", "u", "--tenant", "t", "--allow", "sub"][..], "--allow goes with --channel"),
            (
                &["--user", "u", "--tenant", "t", "--channel", "a", "--allow", "sub,admin"][..],
                "--allow: unknown capability",
            ),
        ] {
            let error = parse_token_args(&args(list)).expect_err("invalid");
            assert!(error.contains(expected), "{list:?}: {error}");
        }
    }
}
