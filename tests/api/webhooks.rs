//! `POST /webhooks/{provider}`: signatures, delivery and every error status.

use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn a_signed_webhook_is_accepted_and_delivered_to_every_client_of_its_tenant_only() {
    let app = spawn_app().await;
    let mut bob = app.connect("bob", "acme").await;
    let mut eve = app.connect("eve", "acme").await;
    let mut outsider = app.connect("bob", "globex").await;

    let body = json!({"action": "opened", "number": 42});
    let answer = app.post_signed_webhook("github", "acme", ACME_SECRET, &body).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.body["status"], "accepted");
    let message_id = answer.body["message_id"].as_str().expect("message id").to_owned();

    for client in [&mut bob, &mut eve] {
        let frame = client.next_json().await;
        assert_eq!(frame["type"], "webhook");
        assert_eq!(frame["payload"], json!({"provider": "github", "data": body}));
        assert_eq!(frame["from_user"], serde_json::Value::Null);
        assert_eq!(frame["channel"], "tenant:acme");
        assert_eq!(frame["message_id"], message_id.as_str());
    }
    outsider.expect_nothing_pending().await;
}

#[tokio::test]
async fn any_json_body_is_relayed_verbatim() {
    let app = spawn_app().await;
    let mut client = app.connect("bob", "acme").await;
    for body in [json!([1, "two", {"three": 3}]), json!("text"), json!(7), json!(null)] {
        let answer = app.post_signed_webhook("stripe", "acme", ACME_SECRET, &body).await;
        assert_eq!(answer.status, 200);
        assert_eq!(client.next_json().await["payload"]["data"], body);
    }
}

#[tokio::test]
async fn a_webhook_without_a_tenant_header_is_refused_with_400() {
    let app = spawn_app().await;
    let body = b"{}".to_vec();
    let answer = app.post_webhook("github", None, Some(&signature(ACME_SECRET, &body)), body).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["code"], "bad_request");
}

#[tokio::test]
async fn each_signature_failure_gets_its_own_answer_naming_the_request() {
    let app = spawn_app().await;
    let body = br#"{"a":1}"#.to_vec();
    let hex = &signature(ACME_SECRET, &body)["sha256=".len()..];
    let cases = [
        ("missing signature", "acme", None, 401, "signature_missing", "the x-signature header is missing"),
        (
            "wrong secret",
            "acme",
            Some(signature(GLOBEX_SECRET, &body)),
            401,
            "signature_mismatch",
            "the signature does not match",
        ),
        (
            "signature of another body",
            "acme",
            Some(signature(ACME_SECRET, b"{\"a\":2}")),
            401,
            "signature_mismatch",
            "the signature does not match",
        ),
        (
            "not sha256=",
            "acme",
            Some("sha1=0123".to_owned()),
            401,
            "signature_malformed",
            "expected x-signature: sha256=<64 hex digits",
        ),
        (
            "the hex without sha256=",
            "acme",
            Some(hex.to_owned()),
            401,
            "signature_malformed",
            "expected x-signature: sha256=<64 hex digits",
        ),
        (
            "tenant without a secret",
            "nosecret",
            Some(signature(ACME_SECRET, &body)),
            404,
            "unknown_webhook_endpoint",
            "no webhook secret is configured for this tenant and provider",
        ),
    ];
    for (case, tenant, signature, status, code, says) in cases {
        let answer = app.post_webhook("github", Some(tenant), signature.as_deref(), body.clone()).await;
        assert_eq!(
            (answer.status, answer.body["code"].as_str()),
            (status, Some(code)),
            "{case}: {}",
            answer.body
        );
        let message = answer.body["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{case}: {message}");
        for secret in [ACME_SECRET, GLOBEX_SECRET] {
            assert!(!message.contains(secret), "{case}: no secret in the answer");
        }
        assert!(answer.headers.contains_key("x-request-id"), "{case}");
    }
    // A sender's own request id comes back, so that it can quote it to the operator.
    let response = app
        .http
        .post(app.url("/webhooks/github"))
        .header("x-tenant-id", "acme")
        .header("x-request-id", "delivery-42.retry_1")
        .body(body.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(response.headers()["x-request-id"], "delivery-42.retry_1");
}

#[tokio::test]
async fn a_body_that_is_not_json_is_refused_with_400() {
    let app = spawn_app().await;
    let body = b"action=opened".to_vec();
    let answer = app.post_webhook("github", Some("acme"), Some(&signature(ACME_SECRET, &body)), body).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["code"], "invalid_json");
}

#[tokio::test]
async fn a_body_over_one_mebibyte_is_refused_with_413() {
    let app = spawn_app().await;
    let body = format!("\"{}\"", "x".repeat(1024 * 1024)).into_bytes();
    let answer = app.post_webhook("github", Some("acme"), Some(&signature(ACME_SECRET, &body)), body).await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.body["code"], "payload_too_large");
}

#[tokio::test]
async fn a_body_of_exactly_one_mebibyte_is_accepted() {
    let app = spawn_app().await;
    let body = format!("\"{}\"", "x".repeat(1024 * 1024 - 2)).into_bytes();
    assert_eq!(body.len(), 1024 * 1024);
    let answer = app.post_webhook("github", Some("acme"), Some(&signature(ACME_SECRET, &body)), body).await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn an_invalid_provider_name_is_not_found() {
    let app = spawn_app().await;
    let body = b"{}".to_vec();
    for provider in ["GitHub", "a.b", &"p".repeat(65)] {
        let answer = app
            .post_webhook(provider, Some("acme"), Some(&signature(ACME_SECRET, &body)), body.clone())
            .await;
        assert_eq!(answer.status, 404, "{provider}");
        assert_eq!(answer.body["code"], "not_found");
    }
}

async fn post_with_delivery_id(app: &TestApp, header: &str, id: &str, body: &serde_json::Value) -> Answer {
    app.post_acme_webhook_with(header, id, body).await
}

#[tokio::test]
async fn a_retried_delivery_is_relayed_once_and_answered_with_the_original_message_id() {
    let app = spawn_app().await;
    let mut client = app.connect("bob", "acme").await;
    for header in ["x-webhook-id", "webhook-id", "x-github-delivery"] {
        let id = format!("delivery-{header}");
        let first = post_with_delivery_id(&app, header, &id, &json!({"via": header})).await;
        assert_eq!(first.status, 200);
        assert_eq!(first.body.get("duplicate"), None);
        let retry = post_with_delivery_id(&app, header, &id, &json!({"via": header})).await;
        assert_eq!(retry.status, 200, "{header}");
        assert_eq!(retry.body["message_id"], first.body["message_id"], "{header}");
        assert_eq!(retry.body["duplicate"], true);
        assert_eq!(client.next_json().await["payload"]["data"]["via"], header);
        client.expect_nothing_pending().await;
    }
}

#[tokio::test]
async fn an_invalid_delivery_id_is_refused_with_400() {
    let app = spawn_app().await;
    let answer = post_with_delivery_id(&app, "x-webhook-id", "not valid!", &json!({})).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.body["code"], "bad_request");
}

#[tokio::test]
async fn with_deduplication_off_every_delivery_is_relayed() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("WEBHOOK_DEDUP_SECS".into(), "0".into());
    }))
    .await;
    let mut client = app.connect("bob", "acme").await;
    for n in 0..2 {
        let answer = post_with_delivery_id(&app, "x-webhook-id", "same-id", &json!({"n": n})).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body.get("duplicate"), None);
        assert_eq!(client.next_json().await["payload"]["data"]["n"], n);
    }
}
