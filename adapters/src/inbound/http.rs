//! The HTTP surface: the server, health, readiness and webhooks, with the server API, the client
//! transports (WebSocket, Server-Sent Events), the console and the dashboard mounted beside.

use std::sync::Arc;
use std::time::Duration;

use application::ports::{Headers, SignatureError};
use application::use_cases::ingest_webhook::TENANT_HEADER;
use application::{Realtime, WebhookError, WebhookRequest};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, StatusCode};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::inbound::admin::{self, AdminSettings};
use crate::inbound::console::{self, ConsoleSettings};
use crate::inbound::error::{ApiError, NO_SUCH_ROUTE, Refusal, recover};
use crate::inbound::server_api;
use crate::inbound::sse::{self, SseSettings};
use crate::inbound::ws::{self, WsSettings};
use crate::outbound::prometheus::PrometheusMetrics;

/// Largest accepted webhook body: 1 MiB.
pub const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

/// Webhook bodies received at once at most; beyond it, 503 with `Retry-After`. With 1 MiB each,
/// this bounds the memory unauthenticated senders can hold to 256 MiB.
pub const MAX_CONCURRENT_WEBHOOK_BODIES: usize = 256;

/// Longest a webhook body may take to arrive, once its headers are in.
pub const WEBHOOK_BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Kernel send buffer of each client socket (Linux doubles it for bookkeeping).
const SOCKET_SEND_BUFFER: usize = 128 * 1024;

/// Tuning of the HTTP server.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// A connection that has not sent a complete request head within this time is closed
    /// (slow-loris protection); also the limit on an idle keep-alive connection.
    pub header_read_timeout: Duration,
    /// Served at `GET /metrics`.
    pub metrics: Option<Arc<PrometheusMetrics>>,
    /// `/metrics` is served by [`serve_metrics`] on its own listener, not on the main one.
    pub separate_metrics_listener: bool,
    /// The browser console at `/`, when served.
    pub console: Option<ConsoleSettings>,
    /// The operators' dashboard at `/admin`, when served.
    pub admin: Option<AdminSettings>,
    /// The WebSocket transport at `/ws`.
    pub websocket: WsSettings,
    /// The Server-Sent Events transport at `/sse`.
    pub sse: SseSettings,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            metrics: None,
            separate_metrics_listener: false,
            console: None,
            admin: None,
            websocket: WsSettings::default(),
            sse: SseSettings::default(),
        }
    }
}

/// Serves only `GET /metrics` on `listener` until `stop` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<PrometheusMetrics>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let routes = metrics_route(Some(metrics)).recover(recover).unify();
    warp::serve(routes).incoming(listener).graceful(stop).run().await;
}

/// Serves every route on `listener` until `stop` resolves, then finishes the requests in
/// flight. Upgraded WebSocket connections are not waited for: they are closed by the caller.
///
/// warp's own server has no header-read timeout, so the connections are served here by hyper's
/// HTTP/1 server with a timer.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<Realtime>,
    http: HttpSettings,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let header_read_timeout = http.header_read_timeout;
    let service = warp::service(routes(app, http));
    let ids = Arc::new(RequestIds::new());
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    // Every connection task holds a sender; the receiver sees the channel close once the last
    // one finished.
    let (alive, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    let (shutting_down, shutdown) = tokio::sync::watch::channel(false);
    let mut stop = std::pin::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, typically: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Bounds the kernel's buffering towards a client that stops reading, so a slow
        // consumer fills its (bounded) outbound queue instead of server memory.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SOCKET_SEND_BUFFER);
        let service = TowerToHyperService::new(WithContext {
            inner: service.clone(),
            peer: PeerAddr(peer),
            ids: ids.clone(),
        });
        // Served as `TokioIo<TcpStream>`, so the WebSocket upgrade gets the socket itself back.
        let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let (alive, mut shutdown) = (alive.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
                    // Finishes the request in flight, then closes.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::debug!(error = %error, "HTTP connection ended with an error");
            }
            drop(alive);
        });
    }
    drop(listener);
    let _ = shutting_down.send(true);
    drop(alive);
    let _ = all_done.recv().await;
}

/// The address of the client that sent a request, in the request's extensions (routes read it
/// with `warp::ext::optional::<PeerAddr>()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Whether a request comes from this machine: from a loopback address, and naming a loopback
/// host in its `Host` header (`localhost`, `127.x.y.z`, `[::1]`, with or without a port) rather
/// than a name that merely resolves to it (a DNS-rebinding page's). What demo mode hands out
/// (a key of the server API, tokens of any tenant) goes to such requests only.
fn from_this_machine(peer: Option<PeerAddr>, host: Option<&str>) -> bool {
    peer.is_some_and(|peer| peer.0.ip().to_canonical().is_loopback()) && host.is_some_and(names_this_machine)
}

/// Whether a request comes from this machine ([`from_this_machine`]) and no proxy relayed it: a
/// proxy on this machine (nginx, `ssh -L`, `kubectl port-forward`) makes any client look local,
/// and the usual ones say so with `Forwarded` or `X-Forwarded-For`.
pub(crate) fn this_machine() -> impl Filter<Extract = (bool,), Error = Rejection> + Clone {
    warp::ext::optional::<PeerAddr>()
        .and(warp::header::optional::<String>("host"))
        .and(warp::header::optional::<String>("forwarded"))
        .and(warp::header::optional::<String>("x-forwarded-for"))
        .map(
            |peer: Option<PeerAddr>,
             host: Option<String>,
             forwarded: Option<String>,
             relayed_for: Option<String>| {
                forwarded.is_none() && relayed_for.is_none() && from_this_machine(peer, host.as_deref())
            },
        )
}

fn names_this_machine(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A service that puts the connection's [`PeerAddr`] and the request's [`RequestId`] into every
/// request before `inner` sees it.
#[derive(Clone)]
struct WithContext<S> {
    inner: S,
    peer: PeerAddr,
    ids: Arc<RequestIds>,
}

/// The id of a request: the client's `x-request-id` when it is 1 to 64 characters of
/// `A-Z a-z 0-9 . _ -`, otherwise one drawn here. Refusals are logged with it, and every answer
/// carries it back in `x-request-id`, so a sender can quote it to the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

/// Draws request ids: a per-process random prefix and a counter.
#[derive(Debug)]
struct RequestIds {
    prefix: String,
    next: std::sync::atomic::AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let prefix = crate::outbound::system::random_hex(4).unwrap_or_else(|_| "00000000".to_owned());
        Self { prefix, next: std::sync::atomic::AtomicU64::new(1) }
    }

    fn of<B>(&self, request: &http::Request<B>) -> RequestId {
        let given = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::trim);
        match given.filter(|id| domain::MessageId::parse(id).is_ok() && id.len() <= 64) {
            Some(id) => RequestId(id.into()),
            None => {
                let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                RequestId(format!("{}-{n}", self.prefix).into())
            }
        }
    }
}

impl<S, B> tower_service::Service<http::Request<B>> for WithContext<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let id = self.ids.of(&request);
        request.extensions_mut().insert(self.peer);
        request.extensions_mut().insert(id);
        self.inner.call(request)
    }
}

/// Every route of the service, errors answered as JSON.
pub fn routes(
    app: Arc<Realtime>,
    http: HttpSettings,
) -> impl Filter<Extract = (impl Reply,), Error = std::convert::Infallible> + Clone + Send + Sync + 'static {
    let metrics = if http.separate_metrics_listener { None } else { http.metrics };
    let health = warp::path!("health")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({"status": "ok"})).into_response());
    let ready = warp::path!("ready").and(warp::get()).and(with(app.clone())).and(this_machine()).map(
        |app: Arc<Realtime>, local: bool| match app.unready_reason() {
            None => warp::reply::json(&json!({"status": "ready"})).into_response(),
            Some(reason) => {
                // Where Redis is and why it fails is for this machine (and the logs); the
                // network is told that the broker is unavailable.
                let reason =
                    if local || app.is_draining() { reason } else { "message broker unavailable".to_owned() };
                let mut response = ApiError::unavailable(reason).into_response();
                // Probes ask every few seconds: not a refusal worth a log line each.
                response.extensions_mut().remove::<Refusal>();
                response
            }
        },
    );
    let bodies = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_WEBHOOK_BODIES));
    // `POST /webhooks/{provider}` names the tenant in `x-tenant-id`; senders that cannot add
    // a header name it in the path.
    let by_header = warp::path!("webhooks" / String).and(warp::post()).map(|provider| (provider, None));
    let by_path = warp::path!("webhooks" / String / String)
        .and(warp::post())
        .map(|provider, tenant| (provider, Some(tenant)));
    let webhooks = by_header
        .or(by_path)
        .unify()
        .and(with((app.clone(), bodies)))
        .and(warp::ext::optional::<RequestId>())
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and_then(webhook);
    let routes = health
        .or(ready)
        .unify()
        .or(metrics_route(metrics))
        .unify()
        .or(ws::route(app.clone(), http.websocket))
        .unify()
        .or(sse::routes(app.clone(), http.sse))
        .unify()
        .or(webhooks)
        .unify()
        .or(server_api::routes(app.clone()))
        .unify()
        .or(admin::routes(http.admin))
        .unify()
        .or(console::routes(app, http.console))
        .unify()
        .recover(recover)
        .unify();
    warp::ext::optional::<RequestId>()
        .and(routes)
        .map(|id: Option<RequestId>, mut response: Response| {
            let id = id.map_or_else(|| Arc::from("-"), |id| id.0);
            let refusal = response.extensions().get::<Refusal>();
            // A path that does not exist is a scanner's, not a refusal worth an INFO line.
            if let Some(refusal) = refusal.filter(|refusal| refusal.message != NO_SUCH_ROUTE) {
                tracing::info!(
                    target: "lq_realtime::http",
                    request_id = %id,
                    status = response.status().as_u16(),
                    code = refusal.code,
                    reason = %refusal.message,
                    "request refused"
                );
            }
            if let Ok(value) = http::HeaderValue::from_str(&id) {
                response.headers_mut().insert("x-request-id", value);
            }
            response
        })
        .with(warp::log::custom(log_request))
}

/// `GET /metrics` when `metrics` is set; otherwise the route does not exist.
pub fn metrics_route(
    metrics: Option<Arc<PrometheusMetrics>>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
    warp::path!("metrics").and(warp::get()).and_then(move || {
        let metrics = metrics.clone();
        async move {
            let Some(metrics) = metrics else { return Err(warp::reject::not_found()) };
            let mut response = Response::new(metrics.render().into());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(response)
        }
    })
}

pub(crate) fn with<T: Clone + Send + Sync + 'static>(
    value: T,
) -> impl Filter<Extract = (T,), Error = std::convert::Infallible> + Clone {
    warp::any().map(move || value.clone())
}

/// Logs method, path and status — never the query string, which may carry a token.
fn log_request(info: warp::log::Info<'_>) {
    tracing::info!(
        target: "lq_realtime::http",
        method = %info.method(),
        path = info.path(),
        status = info.status().as_u16(),
        elapsed_us = u64::try_from(info.elapsed().as_micros()).unwrap_or(u64::MAX),
        "request"
    );
}

async fn read_limited<S, B>(mut body: S, limit: usize) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let mut collected = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|_| ApiError::bad_request("request body could not be read"))?;
        if collected.len() + chunk.remaining() > limit {
            return Err(too_large(limit));
        }
        collected.put(chunk);
    }
    Ok(collected.freeze())
}

/// Reads a body of at most [`MAX_WEBHOOK_BODY`] that must arrive within
/// [`WEBHOOK_BODY_TIMEOUT`]; a late one is answered 408 with `late`.
pub(crate) async fn read_in_time<S, B>(body: S, late: &'static str) -> Result<Bytes, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    read_limited_in_time(body, MAX_WEBHOOK_BODY, late).await
}

/// Reads a body of at most `limit` bytes (413 beyond) that must arrive within
/// [`WEBHOOK_BODY_TIMEOUT`]; a late one is answered 408 with `late`.
pub(crate) async fn read_limited_in_time<S, B>(
    body: S,
    limit: usize,
    late: &'static str,
) -> Result<Bytes, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    match tokio::time::timeout(WEBHOOK_BODY_TIMEOUT, read_limited(body, limit)).await {
        Ok(read) => read.map_err(warp::reject::custom),
        Err(_) => {
            Err(warp::reject::custom(ApiError::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", late)))
        }
    }
}

fn too_large(limit: usize) -> ApiError {
    let size = if limit == MAX_WEBHOOK_BODY { "1 MiB".to_owned() } else { format!("{limit} bytes") };
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("request body exceeds {size}"))
}

/// Refuses a request whose `Content-Length` announces more than [`MAX_WEBHOOK_BODY`], before
/// any of its body is read.
pub(crate) fn refuse_announced_too_large(content_length: Option<u64>) -> Result<(), Rejection> {
    if content_length.is_some_and(|len| len > MAX_WEBHOOK_BODY as u64) {
        return Err(warp::reject::custom(too_large(MAX_WEBHOOK_BODY)));
    }
    Ok(())
}

async fn webhook<S, B>(
    (provider, path_tenant): (String, Option<String>),
    (app, bodies): (Arc<Realtime>, Arc<tokio::sync::Semaphore>),
    request_id: Option<RequestId>,
    content_length: Option<u64>,
    headers: HeaderMap,
    body: S,
) -> Result<Response, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin + Send,
    B: Buf + Send,
{
    refuse_announced_too_large(content_length)?;
    // Bodies are buffered before the signature can be checked: their number is bounded too.
    let _receiving = bodies.try_acquire().map_err(|_| {
        warp::reject::custom(ApiError::unavailable("too many webhooks being received; retry later"))
    })?;
    // The signature can only be checked on the whole body: a sender that trickles it is cut off.
    let body = read_in_time(body, "the webhook body did not arrive in time").await?;
    // A value that is not visible ASCII can never be a valid signature, timestamp or id.
    let pairs: Vec<(&str, &str)> =
        headers.iter().map(|(name, value)| (name.as_str(), value.to_str().unwrap_or("\u{fffd}"))).collect();
    let request = WebhookRequest {
        provider: &provider,
        path_tenant: path_tenant.as_deref(),
        headers: Headers(&pairs),
        body: &body,
    };
    // Only validated values name the span: the rest of the request is untrusted text.
    let tenant = path_tenant.as_deref().or_else(|| request.headers.get(TENANT_HEADER));
    let span = tracing::info_span!(
        "webhook",
        provider = domain::Provider::parse(&provider).ok().map(|p| p.to_string()),
        tenant = tenant.and_then(|t| domain::TenantId::parse(t).ok()).map(|t| t.to_string()),
        request_id = request_id.as_ref().map(|id| id.0.to_string()),
    );
    let outcome = tracing::Instrument::instrument(app.webhooks().ingest(request), span.clone()).await;
    let _entered = span.enter();
    match outcome {
        Ok(accepted) => {
            let message_id = accepted.message_id.as_str();
            tracing::debug!(message_id, duplicate = accepted.duplicate, "webhook accepted");
            let mut body = json!({"status": "accepted", "message_id": message_id});
            if accepted.duplicate {
                body["duplicate"] = json!(true);
            }
            Ok(warp::reply::json(&body).into_response())
        }
        Err(error) => {
            // Logged at INFO with the request id where every answer passes (see `routes`).
            tracing::debug!(%error, "webhook refused");
            Err(warp::reject::custom(webhook_error(&error)))
        }
    }
}

pub(crate) fn webhook_error(error: &WebhookError) -> ApiError {
    match error {
        WebhookError::InvalidProvider(_) => ApiError::not_found(),
        WebhookError::MissingTenant
        | WebhookError::InvalidTenant(_)
        | WebhookError::TenantMismatch
        | WebhookError::InvalidEvent => ApiError::bad_request(error.to_string()),
        WebhookError::TooLarge(_) => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", error.to_string())
        }
        WebhookError::Unauthorized(why) => {
            let code = match why {
                SignatureError::UnknownTenant => {
                    return ApiError::new(
                        StatusCode::NOT_FOUND,
                        "unknown_webhook_endpoint",
                        format!("{why} (WEBHOOK_SECRETS or WEBHOOK_CONFIG)"),
                    );
                }
                SignatureError::Missing { .. } => "signature_missing",
                SignatureError::Malformed { .. } => "signature_malformed",
                SignatureError::Mismatch => "signature_mismatch",
                SignatureError::Expired { .. } => "signature_expired",
            };
            ApiError::new(StatusCode::UNAUTHORIZED, code, why.to_string())
        }
        WebhookError::InvalidJson(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", error.to_string())
        }
        WebhookError::Broker(_) => ApiError::unavailable("message broker unavailable, retry later"),
        WebhookError::InvalidDeliveryId => ApiError::bad_request(error.to_string()),
        WebhookError::InProgress => {
            ApiError::new(StatusCode::CONFLICT, "delivery_in_progress", error.to_string()).retry_after(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::names_this_machine;

    #[test]
    fn only_loopback_names_name_this_machine() {
        for local in [
            "localhost",
            "localhost:8080",
            "LOCALHOST:1",
            "127.0.0.1:8080",
            "127.1.2.3",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(names_this_machine(local), "{local}");
        }
        for other in
            ["example.com", "evil.localhost.example:8080", "10.0.0.1:8080", "[::2]:80", "", "0.0.0.0:8080"]
        {
            assert!(!names_this_machine(other), "{other}");
        }
    }
}
