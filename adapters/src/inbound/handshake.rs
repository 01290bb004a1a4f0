//! What every client transport reads from the HTTP request that opens a session — the token,
//! the positions to resume from, whether it wants the tenant's presence announcements, the
//! origin — and how it answers a refused session.

use application::session::Opening;
use application::{ConnectError, Realtime, Resume, SessionRequest};
use domain::StreamPosition;
use http::{HeaderMap, StatusCode, header};

use crate::inbound::error::ApiError;

/// The token from `?token=` or, failing that, from `Authorization: Bearer`.
pub(crate) fn token(query: Option<&str>, headers: &HeaderMap) -> Option<String> {
    let from_query = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(key, _)| key == "token")
            .map(|(_, value)| value.into_owned())
    });
    from_query.or_else(|| {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
    })
}

/// The positions a reconnecting client asks to resume from, in a query string or in the same
/// form elsewhere (an SSE `Last-Event-ID`): `since=<epoch>:<offset>` for its tenant channel,
/// `user_since=<epoch>:<offset>` for its user channel. The first of each counts.
///
/// # Errors
/// 400 `invalid_position` naming the parameter.
pub(crate) fn resume(query: Option<&str>) -> Result<Resume, ApiError> {
    let mut resume = Resume::default();
    add_resume(&mut resume, query.unwrap_or_default())?;
    Ok(resume)
}

/// Adds the positions of `query` that `resume` does not have yet, and `presence=1` (the
/// tenant's presence announcements).
///
/// # Errors
/// 400 `invalid_position` naming the parameter, or `invalid_presence`.
pub(crate) fn add_resume(resume: &mut Resume, query: &str) -> Result<(), ApiError> {
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match &*key {
            "since" => &mut resume.since,
            "user_since" => &mut resume.user_since,
            "presence" => {
                resume.presence = match &*value {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => {
                        let message = "presence is 1 (send the tenant's joins and leaves) or 0";
                        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_presence", message));
                    }
                };
                continue;
            }
            _ => continue,
        };
        let position = StreamPosition::parse(&value).map_err(|error| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_position", format!("invalid {key}: {error}"))
        })?;
        slot.get_or_insert(position);
    }
    Ok(())
}

/// The `Origin` header, when it is text.
pub(crate) fn origin(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ORIGIN).map(|origin| origin.to_str().unwrap_or("\u{fffd}"))
}

/// Opens the session of a client of `transport` whose request had `query` and `headers`,
/// resuming from `resume`; a refusal is the HTTP answer of [`refusal`].
pub(crate) async fn open(
    app: &Realtime,
    transport: &'static str,
    query: Option<&str>,
    headers: &HeaderMap,
    resume: Resume,
) -> Result<Opening, warp::Rejection> {
    let token = token(query, headers);
    let request = SessionRequest { transport, token: token.as_deref(), resume, origin: origin(headers) };
    app.sessions().open(request).await.map_err(|e| rejection(&e))
}

/// The HTTP answer to a session that may not open (or a request its session refuses).
pub(crate) fn refusal(error: &ConnectError) -> ApiError {
    match error {
        ConnectError::MissingToken | ConnectError::InvalidToken(_) | ConnectError::InvalidClaims(_) => {
            ApiError::unauthorized(error.to_string())
        }
        ConnectError::Forbidden | ConnectError::NotThisSession => {
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", error.to_string())
        }
        ConnectError::OriginNotAllowed => {
            ApiError::new(StatusCode::FORBIDDEN, "origin_not_allowed", error.to_string())
        }
        ConnectError::AtCapacity => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "at_capacity", error.to_string()).retry_after(1)
        }
        ConnectError::Overloaded => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", error.to_string()).retry_after(1)
        }
        ConnectError::TooManyConnections(_) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_connections", error.to_string())
        }
        ConnectError::Broker(_) | ConnectError::Gone => ApiError::unavailable(error.to_string()),
    }
}

/// [`refusal`] as a warp rejection.
pub(crate) fn rejection(error: &ConnectError) -> warp::Rejection {
    warp::reject::custom(refusal(error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_token_comes_from_the_query_first_then_from_a_bearer_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(token(Some("token=abc.def"), &headers), Some("abc.def".into()));
        assert_eq!(token(Some("a=1&token=x%2By"), &headers), Some("x+y".into()));
        assert_eq!(token(None, &headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer hdr.tok"));
        assert_eq!(token(None, &headers), Some("hdr.tok".into()));
        assert_eq!(token(Some("other=1"), &headers), Some("hdr.tok".into()));
        assert_eq!(token(Some("token=q"), &headers), Some("q".into()));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcg=="));
        assert_eq!(token(None, &headers), None);
    }

    #[test]
    fn resume_positions_are_read_once_each_and_a_bad_one_is_named() {
        let mut resume = resume(Some("since=e1:3&user_since=e2:4&since=e9:9")).expect("valid");
        assert_eq!(resume.since, Some(StreamPosition::new("e1", 3)));
        assert_eq!(resume.user_since, Some(StreamPosition::new("e2", 4)));
        add_resume(&mut resume, "since=e5:5").expect("valid");
        assert_eq!(resume.since, Some(StreamPosition::new("e1", 3)), "the first one counts");
        let error = super::resume(Some("user_since=nope")).expect_err("invalid");
        assert_eq!((error.status, error.code), (StatusCode::BAD_REQUEST, "invalid_position"));
        assert!(error.message.contains("user_since"), "{}", error.message);
    }
}
