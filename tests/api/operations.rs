//! `/health`, `/ready`, unknown routes and graceful shutdown in-process.

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::helpers::*;

#[tokio::test]
async fn health_answers_ok() {
    let app = spawn_app().await;
    let answer = app.get("/health").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, serde_json::json!({"status": "ok"}));
}

#[tokio::test]
async fn ready_answers_200_with_the_in_process_broker() {
    let app = spawn_app().await;
    let answer = app.get("/ready").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["status"], "ready");
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = spawn_app().await;
    let answer = app.get("/nope").await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.body["code"], "not_found");
    assert_eq!(answer.headers["content-type"], "application/json");
    let answer = crate::helpers::Answer::from_response(
        app.http.delete(app.url("/health")).send().await.expect("sent"),
    )
    .await;
    assert_eq!(answer.status, 405);
    assert_eq!(answer.body["code"], "method_not_allowed");
}

#[tokio::test]
async fn shutdown_closes_every_client_with_1001() {
    let app = spawn_app().await;
    let mut a = app.connect("bob", "acme").await;
    let mut b = app.connect("eve", "globex").await;
    let shutdown = tokio::spawn(app.shutdown());
    for client in [&mut a, &mut b] {
        let frame = client.expect_close().await.expect("a close frame with a code");
        assert_eq!(frame.code, CloseCode::Away);
    }
    shutdown.await.expect("shut down");
}
