//! The server API for backends: `POST /api/publish`, `POST /api/disconnect`,
//! `POST /api/unsubscribe`, `GET /api/channels/{channel}/presence` (and
//! `GET /api/tenants/{tenant}/presence`), `GET /api/channels/{channel}/history`, and the
//! statistics of [`crate::inbound::stats`], each behind an `Authorization: Bearer <key>` checked
//! before anything else is read.

use std::borrow::Cow;
use std::sync::Arc;

use application::ports::HistoryQuery;
use application::{HistoryError, Realtime, ServerApiError};
use bytes::Buf;
use domain::{Channel, ChannelError, StreamPosition, TenantId, TopicName, UserId};
use futures_util::Stream;
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::inbound::error::ApiError;
use crate::inbound::http::{read_in_time, refuse_announced_too_large, with};

/// Every route of the server API.
pub(crate) fn routes(
    app: Arc<Realtime>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
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
    let app_for_stats = app;
    api_publish
        .or(api_disconnect)
        .unify()
        .or(api_unsubscribe)
        .unify()
        .or(api_presence)
        .unify()
        .or(api_history)
        .unify()
        .or(crate::inbound::stats::routes(app_for_stats))
        .unify()
}

/// The key of an `Authorization: Bearer <key>` header.
pub(crate) fn bearer(authorization: Option<&str>) -> Option<&str> {
    let (scheme, key) = authorization?.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

pub(crate) fn api_rejection(error: &ServerApiError) -> Rejection {
    warp::reject::custom(match error {
        ServerApiError::Unauthorized => ApiError::unauthorized(error.to_string()),
        ServerApiError::Disabled => ApiError::new(StatusCode::NOT_FOUND, "api_disabled", error.to_string()),
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
