//! The browser console at `GET /`: one static page, its script and style, and the reference
//! JavaScript client (`lq-client.js`), all embedded in the binary. In demo mode (no
//! `JWT_SECRET_KEY`), `GET /console/config` hands the page a fresh demo token and
//! `POST /console/webhook` relays a correctly signed test webhook to the demo tenant.

use std::sync::Arc;

use application::ports::Headers;
use application::{Realtime, WebhookRequest};
use domain::{TenantId, UserId};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::inbound::error::ApiError;
use crate::inbound::http::this_machine;
use crate::inbound::http::{read_in_time, refuse_announced_too_large};
use crate::outbound::signatures::sign;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("console.js");
const CLIENT: &str = include_str!("lq-client.js");
const STYLE: &str = include_str!("console.css");

/// The provider name of the console's test webhooks.
pub const CONSOLE_PROVIDER: &str = "console";
/// The tenant of the demo token and of the console's test webhooks.
pub const DEMO_TENANT: &str = "demo";

/// The page's own resources only; requests and WebSockets to this origin only.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Mints a demo token for a user of a tenant.
pub type DemoTokens = Arc<dyn Fn(&UserId, &TenantId) -> Option<String> + Send + Sync>;

/// What the console offers in demo mode.
#[derive(Clone)]
pub struct Demo {
    /// Mints a token, valid an hour, for any user of any tenant.
    pub token: DemoTokens,
    /// The secret the demo tenant's `console` provider verifies with (`hmac-sha256`).
    pub webhook_secret: Arc<[u8]>,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demo").finish_non_exhaustive()
    }
}

/// The console, when served.
#[derive(Debug, Clone, Default)]
pub struct ConsoleSettings {
    /// Set in demo mode only.
    pub demo: Option<Demo>,
}

/// A static resource of the console or the dashboard, with the headers that keep it to its
/// own origin.
pub(crate) fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = Response::new(body.into());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// Passes every request when `on`; otherwise rejects it as a route that does not exist, so that
/// pages turned off answer like any unknown path.
pub(crate) fn served_only_when(
    on: bool,
) -> impl Filter<Extract = (), Error = Rejection> + Clone + Send + Sync + 'static {
    warp::any()
        .and_then(move || async move { if on { Ok(()) } else { Err(warp::reject::not_found()) } })
        .untuple_one()
}

/// The console's routes; with `settings` unset none of them exists.
pub fn routes(
    app: Arc<Realtime>,
    settings: Option<ConsoleSettings>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
    let enabled = settings.is_some();
    let demo = settings.and_then(|s| s.demo);
    let on = served_only_when(enabled);
    let page = warp::path::end().and(warp::get()).map(|| asset(INDEX, "text/html; charset=utf-8"));
    let script = warp::path!("console" / "console.js")
        .and(warp::get())
        .map(|| asset(SCRIPT, "text/javascript; charset=utf-8"));
    let client = warp::path!("console" / "lq-client.js")
        .and(warp::get())
        .map(|| asset(CLIENT, "text/javascript; charset=utf-8"));
    let style = warp::path!("console" / "console.css")
        .and(warp::get())
        .map(|| asset(STYLE, "text/css; charset=utf-8"));
    let config_demo = demo.clone();
    let tokens_demo = demo.clone();
    let config = warp::path!("console" / "config").and(warp::get()).map(move || {
        let token = config_demo.as_ref().and_then(|demo| demo_token(demo, DEMO_TENANT, DEMO_TENANT));
        let body = json!({"demo": token.is_some(), "token": token, "tenant": token.as_ref().map(|_| DEMO_TENANT), "webhook": config_demo.is_some()});
        let mut response = warp::reply::json(&body).into_response();
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    });
    let webhook = warp::path!("console" / "webhook")
        .and(warp::post())
        .and(warp::header::optional::<String>("origin"))
        .and(warp::header::optional::<String>("host"))
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::body::stream())
        .and_then(move |origin: Option<String>, host: Option<String>, length: Option<u64>, body| {
            let (app, demo) = (app.clone(), demo.clone());
            async move {
                // Only the console's own page may post: a page of another site could otherwise
                // post into the demo tenant from a visitor's browser.
                let same_origin = |origin: &str| {
                    let host = host.as_deref().unwrap_or_default();
                    origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host)
                };
                if origin.as_deref().is_some_and(|origin| !same_origin(origin)) {
                    return Err(warp::reject::custom(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "origin_not_allowed",
                        "the test webhook is posted by the console's own page only",
                    )));
                }
                // As any webhook: at most 1 MiB, within 30 s.
                refuse_announced_too_large(length)?;
                let body = read_in_time(body, "the webhook body did not arrive in time").await?;
                test_webhook(&app, demo.as_ref(), &body).await
            }
        });
    let token = warp::path!("console" / "token")
        .and(warp::get())
        .and(warp::query::<TokenQuery>())
        .and(this_machine())
        .and_then(move |query: TokenQuery, local: bool| {
            let demo = tokens_demo.clone();
            async move { mint(demo.as_ref(), &query, local) }
        });
    on.and(
        page.or(script)
            .unify()
            .or(client)
            .unify()
            .or(style)
            .unify()
            .or(config)
            .unify()
            .or(token)
            .unify()
            .or(webhook)
            .unify(),
    )
}

/// `GET /console/token`'s query.
#[derive(Debug, serde::Deserialize)]
struct TokenQuery {
    user: Option<String>,
    tenant: Option<String>,
}

fn demo_token(demo: &Demo, user: &str, tenant: &str) -> Option<String> {
    (demo.token)(&UserId::parse(user).ok()?, &TenantId::parse(tenant).ok()?)
}

/// Demo mode, from this machine only: a token for `?user=` of `?tenant=` (both `demo` when
/// absent), so that several users of several tenants can be tried side by side.
fn mint(demo: Option<&Demo>, query: &TokenQuery, local: bool) -> Result<Response, Rejection> {
    let refuse =
        |status, code, message: &str| Err(warp::reject::custom(ApiError::new(status, code, message)));
    let Some(demo) = demo else {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "demo tokens exist in demo mode only (without JWT_SECRET_KEY): ask your backend for a token",
        );
    };
    if !local {
        return refuse(
            StatusCode::FORBIDDEN,
            "not_this_machine",
            "demo tokens are handed to this machine only: open the console at http://localhost:<port>/",
        );
    }
    let (user, tenant) =
        (query.user.as_deref().unwrap_or(DEMO_TENANT), query.tenant.as_deref().unwrap_or(DEMO_TENANT));
    let user_id = match UserId::parse(user) {
        Ok(user_id) => user_id,
        Err(error) => return refuse(StatusCode::BAD_REQUEST, "bad_request", &format!("user: {error}")),
    };
    let tenant_id = match TenantId::parse(tenant) {
        Ok(tenant_id) => tenant_id,
        Err(error) => return refuse(StatusCode::BAD_REQUEST, "bad_request", &format!("tenant: {error}")),
    };
    let Some(token) = (demo.token)(&user_id, &tenant_id) else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the token could not be signed");
    };
    let mut response =
        warp::reply::json(&json!({"token": token, "user": user, "tenant": tenant})).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Signs `body` as the demo tenant's `console` provider would and relays it like any webhook.
async fn test_webhook(app: &Realtime, demo: Option<&Demo>, body: &[u8]) -> Result<Response, Rejection> {
    let Some(demo) = demo else {
        return Err(warp::reject::custom(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the test webhook exists in demo mode only (without JWT_SECRET_KEY)",
        )));
    };
    let signature = sign::sha256_header(&demo.webhook_secret, body);
    let headers = [("x-signature", signature.as_str())];
    let request = WebhookRequest {
        provider: CONSOLE_PROVIDER,
        path_tenant: Some(DEMO_TENANT),
        headers: Headers(&headers),
        body,
    };
    match app.webhooks().ingest(request).await {
        Ok(accepted) => {
            Ok(warp::reply::json(&json!({"status": "accepted", "message_id": accepted.message_id.as_str()}))
                .into_response())
        }
        Err(error) => Err(warp::reject::custom(crate::inbound::http::webhook_error(&error))),
    }
}
