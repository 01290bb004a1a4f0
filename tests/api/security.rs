//! The security suite: one test per defence of docs/security.md, and the attack classes of
//! jwt_tool against the token check.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::helpers::*;

/// A P-256 key pair used only by these tests.
const EC_PRIVATE_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgcBMmV7qsWGQiOmpU
TtCtsqheVCudRDTFx/bC8ASF1fqhRANCAAS4Kv58MaxKY/GJn12KE+lADCRfbbzm
9MDR+3/KJgCO+Ux7w7mVEFfXVDg44G6bYlakVGIhK5NUtK8P8by6AFk4
-----END PRIVATE KEY-----
";
const EC_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEuCr+fDGsSmPxiZ9dihPpQAwkX228
5vTA0ft/yiYAjvlMe8O5lRBX11Q4OOBum2JWpFRiISuTVLSvD/G8ugBZOA==
-----END PUBLIC KEY-----
";

fn claims(exp: u64) -> Value {
    json!({"user_id": "bob", "tenant_id": "acme", "scope": "ws:connect", "exp": exp})
}

async fn app_with(vars: &[(&str, &str)]) -> TestApp {
    let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    spawn_app_with(test_config(|map| map.extend(vars))).await
}

async fn assert_refused(app: &TestApp, case: &str, token: &str, status: u16) {
    match app.try_connect(token).await {
        Ok(_) => panic!("{case}: accepted"),
        Err((got, body)) => {
            assert_eq!(got, status, "{case}: {body}");
            assert!(body["code"].is_string(), "{case}: {body}");
        }
    }
}

async fn assert_welcomed(app: &TestApp, case: &str, token: &str) {
    let mut client = app.try_connect(token).await.unwrap_or_else(|e| panic!("{case}: refused {e:?}"));
    assert_eq!(client.next_json().await["type"], "welcome", "{case}");
}

fn replace_payload(token: &str, edit: impl FnOnce(&mut Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut payload: Value = serde_json::from_slice(&b64url_decode(parts[1])).expect("payload JSON");
    edit(&mut payload);
    format!("{}.{}.{}", parts[0], b64url(payload.to_string().as_bytes()), parts[2])
}

// === tokens: the jwt_tool attack classes ===

#[tokio::test]
async fn every_jwt_tool_attack_on_the_token_is_refused_with_401() {
    let app = spawn_app().await;
    let exp = now_secs() + 600;
    let good = sign_claims(&claims(exp), Algorithm::HS256, JWT_SECRET);
    let parts: Vec<&str> = good.split('.').collect();
    let mut crit = Header::new(Algorithm::HS256);
    crit.crit = Some(vec!["exp".to_owned()]);
    let cases: Vec<(&str, String)> = vec![
        ("alg none", unsigned_token("none", &claims(exp))),
        ("alg None", unsigned_token("None", &claims(exp))),
        ("alg NONE", unsigned_token("NONE", &claims(exp))),
        (
            "alg none with the original signature",
            format!(
                "{}.{}.{}",
                unsigned_token("none", &claims(exp)).split('.').next().unwrap_or_default(),
                parts[1],
                parts[2]
            ),
        ),
        ("HS384 header", sign_claims(&claims(exp), Algorithm::HS384, JWT_SECRET)),
        ("HS512 header", sign_claims(&claims(exp), Algorithm::HS512, JWT_SECRET)),
        ("RS256 header over an HMAC signature", {
            let header = b64url(br#"{"alg":"RS256","typ":"JWT"}"#);
            format!("{header}.{}.{}", parts[1], parts[2])
        }),
        ("empty signature", format!("{}.{}.", parts[0], parts[1])),
        (
            "signature from another key",
            sign_claims(&claims(exp), Algorithm::HS256, "another-secret-that-is-long-enough-000"),
        ),
        ("tampered payload", replace_payload(&good, |p| p["user_id"] = json!("admin"))),
        ("tenant swapped in the payload", replace_payload(&good, |p| p["tenant_id"] = json!("globex"))),
        (
            "missing exp",
            sign_claims(
                &json!({"user_id": "bob", "tenant_id": "acme", "scope": "ws:connect"}),
                Algorithm::HS256,
                JWT_SECRET,
            ),
        ),
        (
            "exp as a string",
            sign_claims(
                &json!({"user_id": "bob", "tenant_id": "acme", "scope": "ws:connect", "exp": exp.to_string()}),
                Algorithm::HS256,
                JWT_SECRET,
            ),
        ),
        (
            "nbf in the future",
            sign_claims(
                &json!({"user_id": "bob", "tenant_id": "acme", "scope": "ws:connect", "exp": exp, "nbf": now_secs() + 300}),
                Algorithm::HS256,
                JWT_SECRET,
            ),
        ),
        (
            "unknown crit header",
            jsonwebtoken::encode(&crit, &claims(exp), &EncodingKey::from_secret(JWT_SECRET.as_bytes()))
                .expect("signed"),
        ),
        ("two dots only", "..".to_owned()),
        ("not base64", "%%%.%%%.%%%".to_owned()),
    ];
    for (case, token) in cases {
        assert_refused(&app, case, &token, 401).await;
    }
    assert_welcomed(&app, "the untouched token", &good).await;
}

#[tokio::test]
async fn the_leeway_accepts_a_token_one_second_inside_it_and_refuses_one_second_outside() {
    let app = app_with(&[("JWT_LEEWAY_SECS", "30")]).await;
    assert_welcomed(
        &app,
        "expired 29 s ago",
        &sign_claims(&claims(now_secs() - 29), Algorithm::HS256, JWT_SECRET),
    )
    .await;
    assert_refused(
        &app,
        "expired 31 s ago",
        &sign_claims(&claims(now_secs() - 31), Algorithm::HS256, JWT_SECRET),
        401,
    )
    .await;
}

#[tokio::test]
async fn issuer_and_audience_are_enforced_when_configured() {
    let app = app_with(&[("JWT_ISSUER", "https://auth.example.com"), ("JWT_AUDIENCE", "lq-realtime")]).await;
    let exp = now_secs() + 600;
    let with = |iss: Value, aud: Value| {
        let mut c = claims(exp);
        c["iss"] = iss;
        c["aud"] = aud;
        sign_claims(&c, Algorithm::HS256, JWT_SECRET)
    };
    assert_welcomed(&app, "matching", &with(json!("https://auth.example.com"), json!("lq-realtime"))).await;
    assert_welcomed(
        &app,
        "audience list",
        &with(json!("https://auth.example.com"), json!(["other", "lq-realtime"])),
    )
    .await;
    for (case, iss, aud) in [
        ("wrong issuer", json!("https://evil.example.com"), json!("lq-realtime")),
        ("wrong audience", json!("https://auth.example.com"), json!("billing")),
        ("no issuer", Value::Null, json!("lq-realtime")),
        ("no audience", json!("https://auth.example.com"), Value::Null),
    ] {
        let mut c = claims(exp);
        if !iss.is_null() {
            c["iss"] = iss;
        }
        if !aud.is_null() {
            c["aud"] = aud;
        }
        assert_refused(&app, case, &sign_claims(&c, Algorithm::HS256, JWT_SECRET), 401).await;
    }
}

#[tokio::test]
async fn a_public_key_pins_its_algorithm_and_defeats_key_confusion() {
    let dir = std::env::temp_dir().join(format!("lq-realtime-key-{}-{}", std::process::id(), now_secs()));
    std::fs::create_dir_all(&dir).expect("dir");
    let key_file = dir.join("public.pem");
    std::fs::write(&key_file, EC_PUBLIC_KEY).expect("key file");
    let key_path = key_file.to_str().expect("utf-8").to_owned();
    let app = spawn_app_with(test_config(|vars| {
        vars.remove("JWT_SECRET_KEY");
        vars.insert("JWT_PUBLIC_KEY_FILE".into(), key_path);
    }))
    .await;
    let exp = now_secs() + 600;
    let es256 = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims(exp),
        &EncodingKey::from_ec_pem(EC_PRIVATE_KEY.as_bytes()).expect("EC key"),
    )
    .expect("signed");
    assert_welcomed(&app, "ES256 signed with the private key", &es256).await;
    // The classic confusion: HMAC with the public key as the secret.
    assert_refused(
        &app,
        "HS256 keyed with the public key",
        &sign_claims(&claims(exp), Algorithm::HS256, EC_PUBLIC_KEY),
        401,
    )
    .await;
    assert_refused(
        &app,
        "HS256 with the old shared secret",
        &sign_claims(&claims(exp), Algorithm::HS256, JWT_SECRET),
        401,
    )
    .await;
    assert_refused(&app, "alg none", &unsigned_token("none", &claims(exp)), 401).await;
    let _ = std::fs::remove_dir_all(dir);
}

// === token lifetime on live connections ===

#[tokio::test]
async fn a_connection_is_closed_with_4001_when_its_token_expires() {
    let app = app_with(&[("JWT_LEEWAY_SECS", "0")]).await;
    let token = sign_claims(&claims(now_secs() + 2), Algorithm::HS256, JWT_SECRET);
    let mut client = app.try_connect(&token).await.expect("connected");
    assert_eq!(client.next_json().await["type"], "welcome");
    let frame = client.expect_close().await.expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 4001);
}

#[tokio::test]
async fn a_refreshed_token_extends_the_connection_and_a_bad_refresh_changes_nothing() {
    let app = app_with(&[("JWT_LEEWAY_SECS", "0")]).await;
    let mut client = app
        .try_connect(&sign_claims(&claims(now_secs() + 2), Algorithm::HS256, JWT_SECRET))
        .await
        .expect("connected");
    assert_eq!(client.next_json().await["type"], "welcome");

    let other_user = sign_claims(
        &json!({"user_id": "eve", "tenant_id": "acme", "scope": "ws:connect", "exp": now_secs() + 600}),
        Algorithm::HS256,
        JWT_SECRET,
    );
    for (token, code) in [("garbage", "unauthorized"), (other_user.as_str(), "forbidden")] {
        client.send_json(&json!({"type": "refresh", "token": token})).await;
        let error = client.next_json().await;
        assert_eq!((error["type"].as_str(), error["payload"]["code"].as_str()), (Some("error"), Some(code)));
    }

    let new_exp = now_secs() + 600;
    client
        .send_json(
            &json!({"type": "refresh", "token": sign_claims(&claims(new_exp), Algorithm::HS256, JWT_SECRET)}),
        )
        .await;
    let refreshed = client.next_json().await;
    assert_eq!(refreshed["type"], "refreshed");
    assert_eq!(refreshed["payload"]["exp"], new_exp);
    // Past the first token's expiry, the connection lives on.
    client.pump_for(Duration::from_secs(3)).await;
    client.expect_nothing_pending().await;
}

// === origins ===

#[tokio::test]
async fn only_allowed_origins_may_open_a_websocket_from_a_browser() {
    let app = app_with(&[("ALLOWED_ORIGINS", "https://app.example.com")]).await;
    let connect = |origin: Option<&'static str>| {
        let mut request =
            app.ws_url(&format!("?token={}", token("bob", "acme"))).into_client_request().expect("request");
        if let Some(origin) = origin {
            request.headers_mut().insert("origin", origin.parse().expect("header"));
        }
        WsClient::connect(request)
    };
    for origin in
        ["https://evil.example.com", "null", "https://app.example.com.evil.test", "http://app.example.com"]
    {
        let (status, body) = connect(Some(origin)).await.err().unwrap_or_else(|| panic!("{origin} accepted"));
        assert_eq!(status, 403, "{origin}");
        assert_eq!(body["code"], "origin_not_allowed");
    }
    assert!(connect(Some("https://app.example.com")).await.is_ok());
    assert!(connect(None).await.is_ok(), "non-browser clients send no Origin");
}

// === message size ===

#[tokio::test]
async fn a_message_over_max_message_bytes_is_closed_with_1009_and_a_reason() {
    let app = app_with(&[("MAX_MESSAGE_BYTES", "2048")]).await;
    let mut client = app.connect("bob", "acme").await;
    client.send_json(&json!({"type": "message", "payload": "x".repeat(1500)})).await;
    assert_eq!(client.next_json().await["type"], "message", "under the limit passes");
    client.send_json(&json!({"type": "message", "payload": "x".repeat(3000)})).await;
    let frame = client.expect_close().await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Size);
    assert!(!frame.reason.is_empty());
}

// === limits ===

#[tokio::test]
async fn a_user_over_max_connections_per_user_gets_429() {
    let app = app_with(&[("MAX_CONNECTIONS_PER_USER", "2")]).await;
    let _a = app.connect("bob", "acme").await;
    let _b = app.connect("bob", "acme").await;
    let (status, body) = app.try_connect(&token("bob", "acme")).await.err().expect("refused");
    assert_eq!(status, 429);
    assert_eq!(body["code"], "too_many_connections");
    let _other_user = app.connect("eve", "acme").await;
    let _same_name_other_tenant = app.connect("bob", "globex").await;
}

#[tokio::test]
async fn frames_over_the_rate_limit_are_refused_and_never_published() {
    let app = app_with(&[("RATE_LIMIT_PER_SEC", "1"), ("RATE_LIMIT_BURST", "3")]).await;
    let mut sender = app.connect("bob", "acme").await;
    let mut listener = app.connect("eve", "acme").await;
    for n in 0..5 {
        sender.send_json(&json!({"type": "message", "payload": n})).await;
    }
    let mut echoed = 0;
    let mut limited = 0;
    for _ in 0..5 {
        let frame = sender.next_json().await;
        match frame["type"].as_str() {
            Some("message") => echoed += 1,
            Some("error") => {
                assert_eq!(frame["payload"]["code"], "rate_limited");
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((echoed, limited), (3, 2));
    for n in 0..3 {
        assert_eq!(listener.next_json().await["payload"], n);
    }
    listener.expect_nothing_pending().await;
}

#[tokio::test]
async fn a_client_that_keeps_flooding_for_ten_seconds_is_closed_with_1008() {
    let app = app_with(&[("RATE_LIMIT_PER_SEC", "1"), ("RATE_LIMIT_BURST", "1")]).await;
    let mut client = app.connect("bob", "acme").await;
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(20), "never closed");
        client.send_json(&json!({"type": "message", "payload": "flood"})).await;
        let frame = tokio::time::timeout(Duration::from_millis(500), client.next_message()).await;
        if let Ok(tokio_tungstenite::tungstenite::Message::Close(frame)) = frame {
            let frame = frame.expect("a close code");
            assert_eq!(frame.code, CloseCode::Policy);
            assert!(started.elapsed() >= Duration::from_secs(9), "closed after {:?}", started.elapsed());
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// === slow consumers ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_4008_without_delaying_anyone_else() {
    let app = app_with(&[("OUTBOUND_QUEUE_BYTES", "65536")]).await;
    let url = app.ws_url(&format!("?token={}", token("slow", "acme")));
    let mut slow = WsClient::connect_with_small_buffer(&url, 4096).await;
    assert_eq!(slow.next_json().await["type"], "welcome");

    const MESSAGES: u64 = 300;
    let mut readers = Vec::new();
    for n in 0..100 {
        let mut reader = app.connect(&format!("reader-{n}"), "acme").await;
        readers.push(tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            for expected in 0..MESSAGES {
                let tokio_tungstenite::tungstenite::Message::Text(text) = reader.next_message().await else {
                    panic!("expected a text frame");
                };
                // The webhook body is relayed verbatim; read its leading fields without
                // parsing the filler.
                let (seq, sent_ms) = leading_numbers(text.as_str());
                assert_eq!(seq, expected, "in order, nothing missing");
                worst = worst.max(Duration::from_millis(now_millis().saturating_sub(sent_ms)));
            }
            worst
        }));
    }
    let filler = "x".repeat(8 * 1024);
    for seq in 0..MESSAGES {
        let body = format!(r#"{{"seq":{seq},"sent_ms":{},"filler":"{filler}"}}"#, now_millis()).into_bytes();
        let answer = app.post_webhook("load", Some("acme"), Some(&signature(ACME_SECRET, &body)), body).await;
        assert_eq!(answer.status, 200);
        tokio::time::sleep(Duration::from_millis(2)).await;
        if seq == 150 {
            // Well past what the slow client's buffers and its 64 KiB queue hold: read now.
            let frame = slow.expect_close().await.expect("a close frame with a code");
            assert_eq!(u16::from(frame.code), 4008);
        }
    }
    for reader in readers {
        let worst = reader.await.expect("reader");
        assert!(worst < Duration::from_secs(2), "a reader waited {worst:?} for a message");
    }
}

/// `seq` and `sent_ms` from the start of a relayed load-test body.
fn leading_numbers(frame: &str) -> (u64, u64) {
    let number = |key: &str| -> u64 {
        let start = frame.find(key).expect(key) + key.len();
        frame[start..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().expect("a number")
    };
    (number("\"seq\":"), number("\"sent_ms\":"))
}

fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_millis() as u64
}

// === heartbeats ===

#[tokio::test]
async fn a_client_that_answers_pings_stays_and_a_silent_one_is_closed_after_the_idle_timeout() {
    let app = app_with(&[("PING_INTERVAL_SECS", "1"), ("IDLE_TIMEOUT_SECS", "2")]).await;
    let mut alive = app.connect("bob", "acme").await;
    let mut silent = app.connect("eve", "acme").await;
    // `alive` reads, and so answers the server's pings; `silent` reads nothing.
    alive.pump_for(Duration::from_millis(3500)).await;
    alive.expect_nothing_pending().await;
    let frame = silent.expect_close().await.expect("a close frame with a code");
    assert_eq!(frame.code, CloseCode::Away);
    assert_eq!(frame.reason.as_str(), "idle timeout");
}

#[tokio::test]
async fn a_connection_that_only_answers_pings_is_closed_with_4003_after_the_inactivity_timeout() {
    let app = app_with(&[
        ("PING_INTERVAL_SECS", "1"),
        ("IDLE_TIMEOUT_SECS", "10"),
        ("INACTIVITY_TIMEOUT_SECS", "2"),
    ])
    .await;
    let mut client = app.connect("bob", "acme").await;
    let frame = client.expect_close().await.expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 4003);
}

// === HTTP ===

#[tokio::test]
async fn a_half_sent_request_is_closed_within_the_header_read_timeout() {
    let app = app_with(&[("HEADER_READ_TIMEOUT_SECS", "1")]).await;
    let addr = app.addr;
    let closed_after = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let started = Instant::now();
        stream.write_all(b"GET /health HT").expect("half a request line");
        let mut buf = [0u8; 1024];
        // Either EOF or an error answer followed by EOF: the server gives up on the request.
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        started.elapsed()
    })
    .await
    .expect("joined");
    assert!(closed_after < Duration::from_secs(5), "closed after {closed_after:?}");
}

#[tokio::test]
async fn ids_outside_the_allowed_alphabet_are_refused_wherever_they_enter() {
    let app = spawn_app().await;
    let body = b"{}".to_vec();
    for tenant in ["acme:*", "a b", "ünïcode", &"t".repeat(129)] {
        let answer = app
            .post_webhook("github", Some(tenant), Some(&signature(ACME_SECRET, &body)), body.clone())
            .await;
        assert_eq!(answer.status, 400, "{tenant}");
        assert_eq!(answer.body["code"], "bad_request");
    }
    for (user, tenant) in [("bob*", "acme"), ("bob", "acme:x"), ("", "acme")] {
        let token = sign_claims(
            &json!({"user_id": user, "tenant_id": tenant, "scope": "ws:connect", "exp": now_secs() + 60}),
            Algorithm::HS256,
            JWT_SECRET,
        );
        assert_refused(&app, &format!("{user}@{tenant}"), &token, 401).await;
    }
}

#[tokio::test]
async fn webhook_bodies_being_received_at_once_are_bounded() {
    let app = spawn_app().await;
    // 256 senders that send their headers and then nothing: each holds a slot.
    let mut slow = Vec::new();
    for _ in 0..256 {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.expect("connect");
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"POST /webhooks/github HTTP/1.1\r\nHost: x\r\nx-tenant-id: acme\r\ncontent-length: 10\r\n\r\n",
        )
        .await
        .expect("headers");
        slow.push(stream);
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({})).await;
        if answer.status == 503 {
            assert_eq!(answer.body["code"], "unavailable");
            assert!(answer.headers.contains_key("retry-after"));
            break;
        }
        assert!(Instant::now() < deadline, "the 257th body was never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(slow);
    let deadline = Instant::now() + PATIENCE;
    while app.post_signed_webhook("github", "acme", ACME_SECRET, &json!({})).await.status != 200 {
        assert!(Instant::now() < deadline, "slots were not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
