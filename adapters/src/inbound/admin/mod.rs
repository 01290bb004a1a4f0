//! The operators' dashboard at `GET /admin`: one page, its script and style, embedded in the
//! binary. The page signs in with a server API key typed into it (kept in the tab's session
//! storage, never in a URL), reads `GET /api/stats/stream` and acts through `POST
//! /api/disconnect` and `POST /api/publish`. In demo mode, `GET /admin/config` hands the demo's
//! key to a page of this machine (a loopback peer naming a loopback host), and to nobody else.

use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::inbound::console::{asset, served_only_when};
use crate::inbound::http::this_machine;

const PAGE: &str = include_str!("admin.html");
const SCRIPT: &str = include_str!("admin.js");
const STYLE: &str = include_str!("admin.css");

/// The dashboard, when served.
#[derive(Clone, Default)]
pub struct AdminSettings {
    /// In demo mode: the server API key the process drew for itself, offered to the page.
    pub demo_key: Option<String>,
}

impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field("demo_key", &self.demo_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The dashboard's routes; with `settings` unset none of them exists.
pub fn routes(
    settings: Option<AdminSettings>,
) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static {
    let enabled = settings.is_some();
    let demo_key = settings.and_then(|s| s.demo_key);
    let on = served_only_when(enabled);
    let page = warp::path!("admin").and(warp::get()).map(|| asset(PAGE, "text/html; charset=utf-8"));
    let script = warp::path!("admin" / "admin.js")
        .and(warp::get())
        .map(|| asset(SCRIPT, "text/javascript; charset=utf-8"));
    let style =
        warp::path!("admin" / "admin.css").and(warp::get()).map(|| asset(STYLE, "text/css; charset=utf-8"));
    let config =
        warp::path!("admin" / "config").and(warp::get()).and(this_machine()).map(move |local: bool| {
            // The demo key opens the whole server API: only a page of this machine gets it.
            let key = demo_key.as_ref().filter(|_| local);
            let mut response = warp::reply::json(&serde_json::json!({"demo_key": key})).into_response();
            response
                .headers_mut()
                .insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
            response
        });
    on.and(page.or(script).unify().or(style).unify().or(config).unify())
}
