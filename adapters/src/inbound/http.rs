//! The HTTP surface: health, readiness, webhooks and the server API, with the client transports
//! (WebSocket, Server-Sent Events) and the console mounted beside.

use std::sync::Arc;
use std::time::Duration;

use application::ports::{Headers, HistoryQuery};
use application::use_cases::ingest_webhook::TENANT_HEADER;
use application::{HistoryError, Realtime, ServerApiError, WebhookError, WebhookRequest};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use domain::{Channel, ChannelError, StreamPosition, TenantId, TopicName, UserId};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, StatusCode};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use std::borrow::Cow;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::inbound::console::{self, ConsoleSettings};
use crate::inbound::error::{ApiError, recover};
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
        let stream = match accepted {
            Ok((stream, _)) => stream,
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
        let service = TowerToHyperService::new(service.clone());
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

/// Every route of the service, errors answered as JSON.
pub fn routes(
    app: Arc<Realtime>,
    http: HttpSettings,
) -> impl Filter<Extract = (impl Reply,), Error = std::convert::Infallible> + Clone + Send + Sync + 'static {
    let metrics = if http.separate_metrics_listener { None } else { http.metrics };
    let health = warp::path!("health")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({"status": "ok"})).into_response());
    let ready = warp::path!("ready").and(warp::get()).and(with(app.clone())).map(|app: Arc<Realtime>| {
        if app.is_draining() {
            ApiError::unavailable("instance is draining").into_response()
        } else if app.is_ready() {
            warp::reply::json(&json!({"status": "ready"})).into_response()
        } else {
            ApiError::unavailable("message broker unavailable").into_response()
        }
    });
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
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and_then(webhook);
    let api_publish =
        warp::path!("api" / "publish").and(warp::post()).and(api_call(app.clone(), ApiCall::Publish));
    let api_disconnect =
        warp::path!("api" / "disconnect").and(warp::post()).and(api_call(app.clone(), ApiCall::Disconnect));
    let api_unsubscribe =
        warp::path!("api" / "unsubscribe").and(warp::post()).and(api_call(app.clone(), ApiCall::Unsubscribe));
    let api_history = warp::path!("api" / "channels" / String / "history")
        .and(warp::get())
        .and(with(app.clone()))
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::query::raw().map(Some).or(warp::any().map(|| None)).unify())
        .and_then(api_history);
    let presence_of_channel = warp::path!("api" / "channels" / String / "presence").and(warp::get());
    let presence_of_tenant = warp::path!("api" / "tenants" / String / "presence")
        .and(warp::get())
        .map(|tenant: String| format!("tenant:{tenant}"));
    let api_presence = presence_of_channel
        .or(presence_of_tenant)
        .unify()
        .and(with(app.clone()))
        .and(warp::header::optional::<String>("authorization"))
        .and_then(api_presence);
    health
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
        .or(api_publish)
        .unify()
        .or(api_disconnect)
        .unify()
        .or(api_unsubscribe)
        .unify()
        .or(api_presence)
        .unify()
        .or(api_history)
        .unify()
        .or(console::routes(app, http.console))
        .unify()
        .recover(recover)
        .unify()
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

/// The key of an `Authorization: Bearer <key>` header.
fn bearer(authorization: Option<&str>) -> Option<&str> {
    let (scheme, key) = authorization?.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

fn api_rejection(error: &ServerApiError) -> Rejection {
    warp::reject::custom(match error {
        ServerApiError::Unauthorized => ApiError::unauthorized(error.to_string()),
        ServerApiError::BadRequest(message) => ApiError::bad_request(message.clone()),
        ServerApiError::InProgress => ApiError::new(StatusCode::CONFLICT, "in_progress", error.to_string()),
        ServerApiError::Broker(_) | ServerApiError::History(HistoryError::Unavailable(_)) => {
            ApiError::unavailable(error.to_string())
        }
        ServerApiError::History(HistoryError::NoHistory | HistoryError::Limit(_)) => {
            ApiError::bad_request(error.to_string())
        }
        ServerApiError::History(HistoryError::PersistenceOff) => {
            ApiError::new(StatusCode::NOT_FOUND, "persistence_off", error.to_string())
        }
        ServerApiError::History(HistoryError::UnknownPosition(message)) => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_position", message.clone())
        }
    })
}

/// `GET /api/channels/{channel}/history`'s query.
#[derive(Debug, Default)]
struct HistoryParams {
    since: Option<String>,
    before: Option<String>,
    limit: Option<usize>,
    order: Option<String>,
}

/// `GET /api/channels/{channel}/history?since=&before=&limit=&order=`: a page of the channel's
/// kept history.
async fn api_history(
    channel: String,
    app: Arc<Realtime>,
    authorization: Option<String>,
    raw_query: Option<String>,
) -> Result<Response, Rejection> {
    app.api().authorize(bearer(authorization.as_deref())).map_err(|e| api_rejection(&e))?;
    let channel = parse_channel(&percent_decoded(&channel))?;
    let params: HistoryParams = history_params(raw_query.as_deref().unwrap_or_default())?;
    let position = |name: &str, raw: Option<String>| {
        raw.map(|raw| {
            StreamPosition::parse(&raw).map_err(|e| {
                warp::reject::custom(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_position",
                    format!("invalid {name}: {e}"),
                ))
            })
        })
        .transpose()
    };
    let (after, before) = (position("since", params.since)?, position("before", params.before)?);
    let newest_first = match params.order.as_deref() {
        None => after.is_none(),
        Some("desc") => true,
        Some("asc") => false,
        Some(other) => return Err(bad_body(format!("order is asc or desc, not {other:?}"))),
    };
    let query = HistoryQuery { after, before, limit: params.limit.unwrap_or(100), newest_first };
    let page = app.api().history(&channel, query).await.map_err(|e| api_rejection(&e))?;
    let messages = page
        .messages
        .iter()
        .map(|m| serde_json::from_slice::<&RawValue>(m).map(|v| v.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            warp::reject::custom(ApiError::unavailable(format!("a kept message is not JSON: {e}")))
        })?;
    let next = page.next.map(|p| format!("{}:{}", p.epoch, p.offset));
    Ok(warp::reply::json(&json!({"messages": messages, "next": next})).into_response())
}

/// The parameters of a query string, or 400 naming the problem.
fn history_params(query: &str) -> Result<HistoryParams, Rejection> {
    let mut params = HistoryParams::default();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        match &*key {
            "since" => params.since = Some(value),
            "before" => params.before = Some(value),
            "order" => params.order = Some(value),
            "limit" => {
                params.limit = Some(
                    value.parse().map_err(|_| bad_body(format!("limit is a whole number, not {value:?}")))?,
                );
            }
            other => {
                return Err(bad_body(format!(
                    "unknown parameter {other:?}: expected since, before, limit or order"
                )));
            }
        }
    }
    Ok(params)
}

/// `GET /api/channels/{channel}/presence` (`tenant:…` or `topic:…`) and
/// `GET /api/tenants/{tenant}/presence`: the users present.
async fn api_presence(
    channel: String,
    app: Arc<Realtime>,
    authorization: Option<String>,
) -> Result<Response, Rejection> {
    app.api().authorize(bearer(authorization.as_deref())).map_err(|e| api_rejection(&e))?;
    let channel = parse_channel(&percent_decoded(&channel))?;
    match app.api().presence(&channel).await.map_err(|e| api_rejection(&e))? {
        Some(users) => Ok(warp::reply::json(&json!({"users": users})).into_response()),
        None => Err(warp::reject::custom(ApiError::new(
            StatusCode::NOT_FOUND,
            "presence_off",
            "presence is turned off on this deployment",
        ))),
    }
}

/// The calls of the server API.
#[derive(Debug, Clone, Copy)]
enum ApiCall {
    /// `POST /api/publish`.
    Publish,
    /// `POST /api/disconnect`.
    Disconnect,
    /// `POST /api/unsubscribe`.
    Unsubscribe,
}

/// The rest of a server API `POST` route, after its path and method.
fn api_call(
    app: Arc<Realtime>,
    call: ApiCall,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
    with(app)
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::header::optional::<String>("idempotency-key"))
        .and(warp::body::stream())
        .and_then(move |app, authorization, content_length, key, body| {
            answer_api_call(app, (authorization, key), content_length, body, call)
        })
}

/// A server API call: the key is checked before the body is read.
async fn answer_api_call<S, B>(
    app: Arc<Realtime>,
    (authorization, idempotency_key): (Option<String>, Option<String>),
    content_length: Option<u64>,
    body: S,
    call: ApiCall,
) -> Result<Response, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin + Send,
    B: Buf + Send,
{
    app.api().authorize(bearer(authorization.as_deref())).map_err(|e| api_rejection(&e))?;
    refuse_announced_too_large(content_length)?;
    let body = read_in_time(body, "the request body did not arrive in time").await?;
    let answer = match call {
        ApiCall::Publish => {
            let body: PublishBody<'_> = parse_body(&body, "{\"channel\",\"type\",\"payload\"}")?;
            let channel = parse_channel(&body.channel)?;
            match idempotency_key {
                None => {
                    let published = app.api().publish(channel, &body.kind, body.payload).await;
                    json!({"message_id": published.map_err(|e| api_rejection(&e))?.as_str()})
                }
                Some(key) => {
                    let key = key.trim();
                    if domain::MessageId::parse(key).is_err() {
                        return Err(bad_body(
                            "invalid Idempotency-Key: expected 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' or '-'"
                                .to_owned(),
                        ));
                    }
                    let published = app.api().publish_once(channel, &body.kind, body.payload, key).await;
                    let published = published.map_err(|e| api_rejection(&e))?;
                    json!({"message_id": published.message_id.as_str(), "duplicate": published.duplicate})
                }
            }
        }
        ApiCall::Disconnect => {
            let body: DisconnectBody = parse_body(&body, "{\"tenant_id\",\"user_id\"}")?;
            let instances = app.api().disconnect(body.tenant_id, body.user_id).await;
            json!({"instances": instances.map_err(|e| api_rejection(&e))?})
        }
        ApiCall::Unsubscribe => {
            let body: UnsubscribeBody = parse_body(&body, "{\"tenant_id\",\"user_id\",\"channel\"}")?;
            let instances = app.api().unsubscribe(body.tenant_id, body.user_id, body.channel).await;
            json!({"instances": instances.map_err(|e| api_rejection(&e))?})
        }
    };
    Ok(warp::reply::json(&answer).into_response())
}

/// `POST /api/publish`'s body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// `POST /api/disconnect`'s body; the ids are checked like token claims.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    tenant_id: TenantId,
    user_id: UserId,
}

/// `POST /api/unsubscribe`'s body: the topic is named by its name alone, as clients name it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeBody {
    tenant_id: TenantId,
    user_id: UserId,
    channel: TopicName,
}

/// A channel's wire name, or 400 saying what is wrong with it.
fn parse_channel(name: &str) -> Result<Channel, Rejection> {
    Channel::parse(name).map_err(|e| match e {
        ChannelError::Unknown(_) => bad_body(format!("invalid channel: {e}")),
        ChannelError::InvalidId(_) => bad_body(e.to_string()),
    })
}

/// A path segment with its `%XX` escapes decoded (a channel name's `:` may come as `%3A`).
fn percent_decoded(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

fn bad_body(message: String) -> Rejection {
    api_rejection(&ServerApiError::BadRequest(message))
}

/// A server API body of the form `expected`, or 400 saying what is wrong with it.
fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8], expected: &str) -> Result<T, Rejection> {
    serde_json::from_slice(body).map_err(|e| bad_body(format!("expected {expected}: {e}")))
}

async fn webhook<S, B>(
    (provider, path_tenant): (String, Option<String>),
    (app, bodies): (Arc<Realtime>, Arc<tokio::sync::Semaphore>),
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
        // One answer for every signature problem, so tenants cannot be probed.
        WebhookError::Unauthorized(_) => ApiError::unauthorized("invalid signature"),
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
