//! Webhooks from real providers: GitHub, Stripe and Standard Webhooks signatures configured per
//! tenant and provider in `WEBHOOK_CONFIG`, the tenant in the path, rotation, replay windows
//! and deduplication by each scheme's delivery id.

use adapters::outbound::signatures::sign;
use serde_json::{Value, json};

use crate::helpers::*;

const STRIPE_SECRET: &str = "whsec_stripe_integration_secret";
const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

const CONFIG: &str = r#"
[tenants.acme.providers.github]
scheme = "github"
secrets = ["gh-new-secret", "gh-old-secret"]

[tenants.acme.providers.stripe]
scheme = "stripe"
secrets = ["whsec_stripe_integration_secret"]
tolerance_secs = 60

[tenants.acme.providers.billing]
scheme = "standard-webhooks"
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]

[tenants.acme.providers.tiny]
scheme = "github"
secrets = ["tiny-secret"]
max_body_bytes = 64
"#;

/// An instance with [`CONFIG`] beside the test configuration's `WEBHOOK_SECRETS`.
async fn spawn() -> (TestApp, TempFile) {
    let file = TempFile::with_contents("webhooks.toml", CONFIG);
    let path = file.path_str().to_owned();
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("WEBHOOK_CONFIG".to_owned(), path);
    }))
    .await;
    (app, file)
}

impl TestApp {
    async fn post_with(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        let mut request = self.http.post(self.url(path)).body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Answer::from_response(request.send().await.expect("request")).await
    }
}

fn now() -> i64 {
    i64::try_from(now_secs()).expect("a time in range")
}

/// The `payload` of the next frame, once its envelope fields are checked.
async fn next_webhook(client: &mut WsClient, message_id: &Value) -> Value {
    let frame = client.next_json().await;
    assert_eq!(frame["type"], "webhook", "{frame}");
    assert_eq!(frame["channel"], "tenant:acme", "{frame}");
    assert_eq!(&frame["message_id"], message_id, "{frame}");
    frame["payload"].clone()
}

/// The answer is `status` with `code`, and its message holds `says`.
fn assert_refused(answer: &Answer, status: u16, code: &str, says: &str) {
    assert_eq!((answer.status, answer.body["code"].as_str()), (status, Some(code)), "{:?}", answer.body);
    let message = answer.body["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{message:?} should say {says:?}");
}

fn assert_mismatch(answer: &Answer) {
    assert_refused(answer, 401, "signature_mismatch", "the signature does not match");
}

#[tokio::test]
async fn a_github_delivery_to_the_tenants_url_arrives_with_its_event_and_is_relayed_once() {
    let (app, _file) = spawn().await;
    let mut client = app.connect("bob", "acme").await;
    let body = br#"{"ref":"refs/heads/main","commits":[]}"#;
    let signature = sign::sha256_header(b"gh-new-secret", body);
    let headers = [
        ("X-Hub-Signature-256", signature.as_str()),
        ("X-GitHub-Event", "push"),
        ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        ("Content-Type", "application/json"),
    ];
    let answer = app.post_with("/webhooks/github/acme", &headers, body).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let payload = next_webhook(&mut client, &answer.body["message_id"]).await;
    assert_eq!(
        payload,
        json!({"provider": "github", "event": "push", "data": {"ref": "refs/heads/main", "commits": []}})
    );
    // GitHub redelivers with the same X-GitHub-Delivery: answered with the original id.
    let again = app.post_with("/webhooks/github/acme", &headers, body).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body["duplicate"], true);
    assert_eq!(again.body["message_id"], answer.body["message_id"]);
    client.expect_nothing_pending().await;
    // The header form reaches the same configuration.
    let by_header = [("x-tenant-id", "acme"), headers[0], ("X-GitHub-Event", "ping")];
    let answer = app.post_with("/webhooks/github", &by_header, body).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(next_webhook(&mut client, &answer.body["message_id"]).await["event"], "ping");
}

#[tokio::test]
async fn during_a_rotation_both_secrets_are_accepted_and_any_other_is_refused() {
    let (app, _file) = spawn().await;
    let mut client = app.connect("bob", "acme").await;
    for secret in ["gh-new-secret", "gh-old-secret"] {
        let body = format!(r#"{{"signed_with":"{secret}"}}"#);
        let signature = sign::sha256_header(secret.as_bytes(), body.as_bytes());
        let answer = app
            .post_with("/webhooks/github/acme", &[("x-hub-signature-256", &signature)], body.as_bytes())
            .await;
        assert_eq!(answer.status, 200, "{secret}: {:?}", answer.body);
        assert_eq!(
            next_webhook(&mut client, &answer.body["message_id"]).await["data"]["signed_with"],
            secret
        );
    }
    // A secret taken out of the list, and the tenant's WEBHOOK_SECRETS secret, which the
    // provider's own entry replaces.
    for secret in ["gh-removed-secret", ACME_SECRET] {
        let signature = sign::sha256_header(secret.as_bytes(), b"{}");
        assert_mismatch(
            &app.post_with("/webhooks/github/acme", &[("x-hub-signature-256", &signature)], b"{}").await,
        );
    }
    let legacy = sign::sha256_header(ACME_SECRET.as_bytes(), b"{}");
    assert_refused(
        &app.post_with("/webhooks/github/acme", &[("x-signature", &legacy)], b"{}").await,
        401,
        "signature_missing",
        "the X-Hub-Signature-256 header is missing",
    );
    // Providers without an entry keep the tenant's WEBHOOK_SECRETS secret, without an event.
    let answer = app.post_with("/webhooks/shop/acme", &[("x-signature", &legacy)], b"{}").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        next_webhook(&mut client, &answer.body["message_id"]).await,
        json!({"provider": "shop", "data": {}})
    );
    client.expect_nothing_pending().await;
}

fn stripe_event(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"id": id, "object": "event", "type": "invoice.paid", "data": {"object": {"amount_paid": 2000}}}))
        .expect("json")
}

#[tokio::test]
async fn a_stripe_event_arrives_with_its_type_inside_the_tolerance_and_is_refused_outside() {
    let (app, _file) = spawn().await;
    let mut client = app.connect("bob", "acme").await;
    let body = stripe_event("evt_1");
    let header = sign::stripe(STRIPE_SECRET, now(), &body);
    let answer = app.post_with("/webhooks/stripe/acme", &[("Stripe-Signature", &header)], &body).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let payload = next_webhook(&mut client, &answer.body["message_id"]).await;
    assert_eq!(payload["provider"], "stripe");
    assert_eq!(payload["event"], "invoice.paid");
    assert_eq!(payload["data"]["data"]["object"]["amount_paid"], 2000);
    // Stripe retries an event with a new signature and the same id: relayed once.
    let retry = sign::stripe(STRIPE_SECRET, now(), &body);
    let again = app.post_with("/webhooks/stripe/acme", &[("Stripe-Signature", &retry)], &body).await;
    assert_eq!((again.status, &again.body["duplicate"]), (200, &json!(true)));
    assert_eq!(again.body["message_id"], answer.body["message_id"]);
    // The tolerance is 60 s here: 61 s either way is refused, 55 s is not.
    for (n, (offset, accepted)) in
        [(-61, false), (61, false), (-55, true), (55, true)].into_iter().enumerate()
    {
        let body = stripe_event(&format!("evt_edge_{n}"));
        let header = sign::stripe(STRIPE_SECRET, now() + offset, &body);
        let answer = app.post_with("/webhooks/stripe/acme", &[("stripe-signature", &header)], &body).await;
        if accepted {
            assert_eq!(answer.status, 200, "{offset}: {:?}", answer.body);
            assert_eq!(next_webhook(&mut client, &answer.body["message_id"]).await["event"], "invoice.paid");
        } else {
            assert_refused(&answer, 401, "signature_expired", "more than 60 s away from the server's clock");
        }
    }
    client.expect_nothing_pending().await;
}

fn standard_headers<'a>(id: &'a str, timestamp: &'a str, signature: &'a str) -> [(&'a str, &'a str); 3] {
    [("webhook-id", id), ("webhook-timestamp", timestamp), ("webhook-signature", signature)]
}

#[tokio::test]
async fn a_standard_webhooks_message_arrives_once_per_webhook_id_within_five_minutes() {
    let (app, _file) = spawn().await;
    let mut client = app.connect("bob", "acme").await;
    let body = br#"{"type":"invoice.paid","timestamp":"2026-11-28T06:00:00Z","data":{"invoice":"in_1"}}"#;
    let t = now().to_string();
    let signature = sign::standard_webhooks(STANDARD_SECRET, "msg_2Lf1", now(), body).expect("secret");
    let answer =
        app.post_with("/webhooks/billing/acme", &standard_headers("msg_2Lf1", &t, &signature), body).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let payload = next_webhook(&mut client, &answer.body["message_id"]).await;
    assert_eq!(payload["provider"], "billing");
    assert_eq!(payload["event"], "invoice.paid");
    assert_eq!(payload["data"]["data"], json!({"invoice": "in_1"}));
    // A retry carries the same webhook-id, signed again at a later time.
    let later = (now() + 2).to_string();
    let resigned = sign::standard_webhooks(STANDARD_SECRET, "msg_2Lf1", now() + 2, body).expect("secret");
    let again =
        app.post_with("/webhooks/billing/acme", &standard_headers("msg_2Lf1", &later, &resigned), body).await;
    assert_eq!((again.status, &again.body["message_id"]), (200, &answer.body["message_id"]));
    // The default tolerance is 300 s, either way.
    for (n, (offset, accepted)) in
        [(-301, false), (301, false), (-295, true), (295, true)].into_iter().enumerate()
    {
        let id = format!("msg_edge_{n}");
        let t = now() + offset;
        let signature = sign::standard_webhooks(STANDARD_SECRET, &id, t, body).expect("secret");
        let t = t.to_string();
        let answer =
            app.post_with("/webhooks/billing/acme", &standard_headers(&id, &t, &signature), body).await;
        if accepted {
            assert_eq!(answer.status, 200, "{offset}: {:?}", answer.body);
            next_webhook(&mut client, &answer.body["message_id"]).await;
        } else {
            assert_refused(&answer, 401, "signature_expired", "more than 300 s away from the server's clock");
        }
    }
    // The signature covers the id: the same signature and timestamp under another id are refused,
    // under their own id accepted.
    let at = now();
    let t = at.to_string();
    let signature = sign::standard_webhooks(STANDARD_SECRET, "msg_own", at, body).expect("secret");
    assert_mismatch(
        &app.post_with("/webhooks/billing/acme", &standard_headers("msg_other", &t, &signature), body).await,
    );
    let own =
        app.post_with("/webhooks/billing/acme", &standard_headers("msg_own", &t, &signature), body).await;
    assert_eq!(own.status, 200, "{:?}", own.body);
    next_webhook(&mut client, &own.body["message_id"]).await;
    client.expect_nothing_pending().await;
}

#[tokio::test]
async fn unknown_endpoints_wrong_schemes_and_wrong_signatures_each_get_an_answer_that_says_what_to_fix() {
    let (app, _file) = spawn().await;
    let body = stripe_event("evt_probe");
    let stripe = sign::stripe(STRIPE_SECRET, now(), &body);
    let github = sign::sha256_header(b"gh-new-secret", &body);
    let stripe_format = "expected Stripe-Signature: t=<Unix seconds>,v1=<64 hex digits";
    // Path, header, then the status, code and words of the answer.
    type Case<'a> = (&'a str, (&'a str, &'a str), u16, &'a str, &'a str);
    let cases: [Case<'_>; 7] = [
        // A tenant nobody configured.
        (
            "/webhooks/stripe/initech",
            ("stripe-signature", &stripe),
            404,
            "unknown_webhook_endpoint",
            "no webhook secret is configured for this tenant and provider",
        ),
        // A tenant with only its WEBHOOK_SECRETS secret, under the hmac-sha256 scheme.
        (
            "/webhooks/stripe/globex",
            ("stripe-signature", &stripe),
            401,
            "signature_missing",
            "the x-signature header is missing",
        ),
        // Stripe's signature sent to the GitHub endpoint, and GitHub's to Stripe's.
        (
            "/webhooks/github/acme",
            ("stripe-signature", &stripe),
            401,
            "signature_missing",
            "the X-Hub-Signature-256 header is missing",
        ),
        (
            "/webhooks/stripe/acme",
            ("x-hub-signature-256", &github),
            401,
            "signature_missing",
            "the Stripe-Signature header is missing",
        ),
        // A signature in the wrong format, a wrong one, and none.
        ("/webhooks/stripe/acme", ("stripe-signature", "v1=00"), 401, "signature_malformed", stripe_format),
        (
            "/webhooks/github/acme",
            ("x-hub-signature-256", &github[7..]),
            401,
            "signature_malformed",
            "expected X-Hub-Signature-256: sha256=<64 hex digits",
        ),
        (
            "/webhooks/stripe/acme",
            ("x-nothing", ""),
            401,
            "signature_missing",
            "the Stripe-Signature header is missing",
        ),
    ];
    for (path, header, status, code, says) in cases {
        let answer = app.post_with(path, &[header], &body).await;
        assert_refused(&answer, status, code, says);
        assert!(answer.headers.contains_key("x-request-id"), "{path}: every answer names its request");
    }
    let wrong = sign::stripe("whsec_not_this_one", now(), &body);
    assert_mismatch(&app.post_with("/webhooks/stripe/acme", &[("stripe-signature", &wrong)], &body).await);
}

#[tokio::test]
async fn the_tenant_in_the_path_must_agree_with_the_header_and_a_providers_body_limit_holds() {
    let (app, _file) = spawn().await;
    let signature = sign::sha256_header(b"gh-new-secret", b"{}");
    let answer = app
        .post_with(
            "/webhooks/github/acme",
            &[("x-hub-signature-256", &signature), ("x-tenant-id", "globex")],
            b"{}",
        )
        .await;
    assert_eq!(answer.status, 400, "{:?}", answer.body);
    assert_eq!(answer.body["message"], "the x-tenant-id header names another tenant than the path");
    let answer =
        app.post_with("/webhooks/github/not%20valid", &[("x-hub-signature-256", &signature)], b"{}").await;
    assert_eq!(answer.status, 400, "{:?}", answer.body);
    // `tiny` accepts 64 bytes: a larger signed body is 413, a wrongly signed one 401 as any other.
    let big = format!(r#"{{"padding":"{}"}}"#, "x".repeat(80));
    let signed = sign::sha256_header(b"tiny-secret", big.as_bytes());
    let answer =
        app.post_with("/webhooks/tiny/acme", &[("x-hub-signature-256", &signed)], big.as_bytes()).await;
    assert_eq!(answer.status, 413, "{:?}", answer.body);
    assert_eq!(answer.body["code"], "payload_too_large");
    assert_mismatch(
        &app.post_with("/webhooks/tiny/acme", &[("x-hub-signature-256", &signature)], big.as_bytes()).await,
    );
    let small = sign::sha256_header(b"tiny-secret", b"{}");
    assert_eq!(
        app.post_with("/webhooks/tiny/acme", &[("x-hub-signature-256", &small)], b"{}").await.status,
        200
    );
}
