//! The WebSocket transport in echo mode: every message comes back as it came (text as text,
//! binary as binary), through the same handshake checks, codec, outbox and close handling that
//! client sessions get. It exists so that the transport can be run against the WebSocket
//! conformance suite (`tests/src/bin/lq-ws-echo.rs`); the service itself never serves it.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use domain::CloseReason;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use warp::Reply;
use warp::reply::Response;

use super::connection::{Connection, Peer};
use super::outbox::Outbox;
use super::{WsSettings, accept_key, switching_protocols, upgraded};
use application::ports::ClientSink;

/// Answers every message with itself.
#[derive(Debug, Clone, Copy)]
struct Echo;

impl Peer for Echo {
    async fn message(&self, outbox: &Outbox, text: bool, payload: Vec<u8>) -> Option<CloseReason> {
        let payload = Bytes::from(payload);
        let queued = if text { outbox.push(payload) } else { outbox.push_binary(payload) };
        queued.err().map(|_| CloseReason::SlowConsumer)
    }

    fn alive(&self) {}
}

/// Serves the echo on every path of `listener`, each upgrade with `settings`, until the task is
/// dropped.
pub async fn serve(listener: TcpListener, settings: WsSettings) {
    let settings = Arc::new(settings);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let settings = settings.clone();
        let service = hyper::service::service_fn(move |request| {
            let settings = settings.clone();
            async move { Ok::<_, Infallible>(answer(request, settings)) }
        });
        tokio::spawn(async move {
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "echo connection ended with an error");
            }
        });
    }
}

/// The `101` answer, the echo running once the upgrade completes; or the handshake's refusal.
fn answer(mut request: Request<Incoming>, settings: Arc<WsSettings>) -> Response {
    let accept = match accept_key(request.headers()) {
        Ok(accept) => accept,
        Err(error) => return error.into_response(),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Some((stream, leftover)) = upgraded(on_upgrade).await {
            let outbox = Arc::new(Outbox::new(settings.outbound_queue_bytes));
            Connection { peer: &Echo, settings, outbox }.run(Arc::new(stream), leftover).await;
        }
    });
    switching_protocols(accept)
}
