//! Ingest a webhook: check who sent it, relay it to the tenant, and only then say "accepted".

use std::sync::Arc;
use std::time::Instant;

use domain::envelope::{kind, raw_payload};
use domain::{Channel, IdError, MessageId, Provider, TenantId};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::frames::FrameFactory;
use crate::ports::{
    BrokerError, DeliveryClaim, DeliveryLog, DeliveryRecord, Headers, MessageBroker, MessageSource, Metrics,
    NoMetrics, SignatureError, SignedWebhook, WebhookVerifier,
};
use crate::stats::{Activity, WebhookTarget, WebhookVerdict};
use crate::use_cases::publish_timed;

/// A webhook as the HTTP adapter received it. The service-wide body size limit is the
/// adapter's job; a tenant's lower limit for a provider is checked here.
#[derive(Debug, Clone, Copy)]
pub struct WebhookRequest<'a> {
    pub provider: &'a str,
    /// The tenant named in the path (`POST /webhooks/{provider}/{tenant}`), if the route has
    /// one; otherwise the `x-tenant-id` header names it.
    pub path_tenant: Option<&'a str>,
    /// Every header of the request (signatures, timestamps, event names, delivery ids).
    pub headers: Headers<'a>,
    pub body: &'a [u8],
}

/// The header that names the tenant on `POST /webhooks/{provider}`.
pub const TENANT_HEADER: &str = "x-tenant-id";

/// Longest accepted provider event name, in bytes.
pub const MAX_EVENT_LEN: usize = 128;

/// What an accepted webhook became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub message_id: MessageId,
    /// The delivery id was already accepted: nothing was relayed again.
    pub duplicate: bool,
}

/// How long a claimed but unfinished delivery blocks its retries.
const PENDING_DELIVERY_SECS: u64 = 10;

/// Why a webhook was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The provider path segment is not `[a-z0-9_-]{1,64}`. HTTP 404.
    #[error("unknown webhook provider: {0}")]
    InvalidProvider(IdError),
    /// No tenant in the path and no `x-tenant-id` header. HTTP 400.
    #[error("missing x-tenant-id header")]
    MissingTenant,
    /// The tenant (path segment or `x-tenant-id` header) is not a valid tenant id. HTTP 400.
    #[error("invalid tenant: {0}")]
    InvalidTenant(IdError),
    /// An `x-tenant-id` header that names another tenant than the path. HTTP 400.
    #[error("the x-tenant-id header names another tenant than the path")]
    TenantMismatch,
    /// A body over the limit configured for this tenant and provider. HTTP 413.
    #[error("request body exceeds the {0} bytes accepted from this provider")]
    TooLarge(usize),
    /// The provider's event name is not 1 to 128 visible ASCII characters. HTTP 400.
    #[error("invalid event name: expected 1 to 128 visible ASCII characters")]
    InvalidEvent,
    /// No secret for this tenant and provider (HTTP 404), or a missing, malformed, wrong or
    /// expired signature (HTTP 401), each with its own answer.
    #[error("{0}")]
    Unauthorized(SignatureError),
    /// The body is not JSON. HTTP 400.
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The broker did not take the message. HTTP 503 with `Retry-After`.
    #[error(transparent)]
    Broker(BrokerError),
    /// The delivery id is not `[A-Za-z0-9._-]{1,128}`. HTTP 400.
    #[error("invalid delivery id: expected 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
    InvalidDeliveryId,
    /// The same delivery is being processed by another request. HTTP 409; retry later.
    #[error("this delivery is being processed; retry later")]
    InProgress,
}

#[derive(Serialize)]
struct WebhookPayload<'a> {
    provider: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<&'a str>,
    data: &'a RawValue,
}

/// The ingest-webhook use-case.
pub struct IngestWebhook {
    verifier: Arc<dyn WebhookVerifier>,
    broker: Arc<dyn MessageBroker>,
    frames: FrameFactory,
    metrics: Arc<dyn Metrics>,
    deliveries: Option<(Arc<dyn DeliveryLog>, u64)>,
    activity: Option<Arc<Activity>>,
}

/// Whom a webhook was addressed to, once its provider and tenant are valid names.
struct Addressed {
    tenant: TenantId,
    provider: Provider,
    /// Its signature was verified.
    verified: bool,
}

impl std::fmt::Debug for IngestWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestWebhook").finish_non_exhaustive()
    }
}

impl IngestWebhook {
    pub fn new(
        verifier: Arc<dyn WebhookVerifier>,
        broker: Arc<dyn MessageBroker>,
        frames: FrameFactory,
    ) -> Self {
        Self { verifier, broker, frames, metrics: Arc::new(NoMetrics), deliveries: None, activity: None }
    }

    /// Relays each delivery id at most once within `keep_secs` (0: no deduplication).
    pub fn with_delivery_log(mut self, log: Arc<dyn DeliveryLog>, keep_secs: u64) -> Self {
        self.deliveries = (keep_secs > 0).then_some((log, keep_secs));
        self
    }

    /// Reports to `metrics` instead of nowhere.
    pub fn with_metrics(mut self, metrics: Arc<dyn Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Counts every webhook, and keeps the latest refusals, in `activity`.
    pub fn with_activity(mut self, activity: Arc<Activity>) -> Self {
        self.activity = Some(activity);
        self
    }

    /// Verifies the webhook and publishes `{"provider":…,"event":…,"data":<body>}` as a
    /// `webhook` message to `tenant:<tenant>`. Returns the message id once the broker accepted
    /// it.
    ///
    /// # Errors
    /// [`WebhookError`], checked in this order: provider, tenant, signature, body size, event
    /// name, JSON, delivery id (when deduplication is on), broker.
    pub async fn ingest(&self, request: WebhookRequest<'_>) -> Result<Accepted, WebhookError> {
        let started = Instant::now();
        let mut addressed = None;
        let result = self.process(request, &mut addressed).await;
        let label = match &result {
            Ok(Accepted { duplicate: true, .. }) => "duplicate",
            Ok(_) => "accepted",
            Err(WebhookError::InvalidDeliveryId) => "bad_request",
            Err(WebhookError::InProgress) => "in_progress",
            Err(WebhookError::InvalidProvider(_)) => "not_found",
            Err(
                WebhookError::MissingTenant
                | WebhookError::InvalidTenant(_)
                | WebhookError::TenantMismatch
                | WebhookError::InvalidEvent,
            ) => "bad_request",
            Err(WebhookError::TooLarge(_)) => "too_large",
            Err(WebhookError::Unauthorized(SignatureError::UnknownTenant)) => "not_found",
            Err(WebhookError::Unauthorized(_)) => "unauthorized",
            Err(WebhookError::InvalidJson(_)) => "invalid_json",
            Err(WebhookError::Broker(_)) => "unavailable",
        };
        // Only a verified sender names a provider in the metrics, so nobody else can create
        // label values.
        let verified = addressed.as_ref().filter(|a| a.verified).map(|a| &a.provider);
        let provider = verified.map_or("unverified", Provider::as_str);
        self.metrics.webhook(provider, label, started.elapsed().as_secs_f64());
        if let Some(activity) = &self.activity {
            record(activity, &request, addressed.as_ref(), &result, label);
        }
        result
    }

    async fn process(
        &self,
        request: WebhookRequest<'_>,
        addressed: &mut Option<Addressed>,
    ) -> Result<Accepted, WebhookError> {
        let provider = Provider::parse(request.provider).map_err(WebhookError::InvalidProvider)?;
        let tenant = tenant(&request)?;
        *addressed = Some(Addressed { tenant: tenant.clone(), provider: provider.clone(), verified: false });
        let webhook = SignedWebhook {
            tenant: &tenant,
            provider: &provider,
            headers: request.headers,
            body: request.body,
        };
        let verified = self.verifier.verify(&webhook).await.map_err(WebhookError::Unauthorized)?;
        if let Some(addressed) = addressed {
            addressed.verified = true;
        }
        if let Some(limit) = verified.max_body_bytes.filter(|limit| request.body.len() > *limit) {
            return Err(WebhookError::TooLarge(limit));
        }
        let event = verified.event.as_deref();
        if event.is_some_and(|e| {
            e.is_empty() || e.len() > MAX_EVENT_LEN || !e.bytes().all(|b| b.is_ascii_graphic())
        }) {
            return Err(WebhookError::InvalidEvent);
        }
        let text = std::str::from_utf8(request.body)
            .map_err(|_| WebhookError::InvalidJson("body is not UTF-8".to_owned()))?;
        let data: &RawValue =
            serde_json::from_str(text).map_err(|e| WebhookError::InvalidJson(e.to_string()))?;
        if domain::envelope::has_lone_surrogate(data.get()) {
            return Err(WebhookError::InvalidJson("lone UTF-16 surrogate escape".to_owned()));
        }
        let payload = raw_payload(&WebhookPayload { provider: provider.as_str(), event, data });
        let delivery = match (verified.delivery_id.as_deref(), &self.deliveries) {
            (Some(id), Some((log, keep))) => {
                MessageId::parse(id).map_err(|_| WebhookError::InvalidDeliveryId)?;
                match log.claim(&tenant, id, PENDING_DELIVERY_SECS).await.map_err(WebhookError::Broker)? {
                    DeliveryClaim::Claimed => Some((log, id, *keep)),
                    DeliveryClaim::InProgress => return Err(WebhookError::InProgress),
                    DeliveryClaim::Delivered(message_id) => {
                        return Ok(Accepted { message_id, duplicate: true });
                    }
                }
            }
            _ => None,
        };
        let channel = Channel::Tenant(tenant.clone());
        let envelope = self.frames.envelope(kind::WEBHOOK, payload, None, Some(channel.clone()));
        self.metrics.message_received(MessageSource::Webhook);
        let record = delivery.map(|(log, id, keep)| {
            let record = DeliveryRecord {
                tenant: tenant.clone(),
                delivery_id: id.to_owned(),
                message_id: envelope.message_id.clone(),
                keep_secs: keep,
            };
            (log, record)
        });
        let published = publish_timed(
            &*self.broker,
            &*self.metrics,
            &channel,
            &envelope,
            record.as_ref().map(|(_, r)| r),
        )
        .await;
        match (published, record) {
            (Ok(()), Some((log, record))) => {
                if let Err(error) = log.complete(&record).await {
                    // Relayed all the same, and recorded with the publish where the broker can.
                    tracing::warn!(%error, "webhook delivery relayed but not recorded");
                }
            }
            (Err(error), Some((log, record))) => {
                log.release(&tenant, &record.delivery_id).await;
                return Err(WebhookError::Broker(error));
            }
            (Err(error), None) => return Err(WebhookError::Broker(error)),
            (Ok(()), None) => {}
        }
        Ok(Accepted { message_id: envelope.message_id, duplicate: false })
    }
}

/// Counts a webhook in `activity`: per tenant and provider when both are configured, and as a
/// failure (with the names the request gave, when they are valid) when it was refused.
fn record(
    activity: &Activity,
    request: &WebhookRequest<'_>,
    addressed: Option<&Addressed>,
    result: &Result<Accepted, WebhookError>,
    label: &'static str,
) {
    let unknown = matches!(result, Err(WebhookError::Unauthorized(SignatureError::UnknownTenant)));
    let named_tenant = request.path_tenant.or_else(|| request.headers.get(TENANT_HEADER));
    let target = WebhookTarget {
        configured: addressed.filter(|_| !unknown).map(|a| (&a.tenant, &a.provider)),
        tenant: named_tenant.filter(|t| TenantId::parse(t).is_ok()),
        provider: Some(request.provider).filter(|p| Provider::parse(p).is_ok()),
    };
    match result {
        Ok(_) => activity.webhook(target, WebhookVerdict::Accepted),
        Err(error) => {
            let reason = error.to_string();
            activity.webhook(target, WebhookVerdict::Refused { result: label, reason: &reason });
        }
    }
}

/// The tenant a webhook is addressed to: the path's, or the `x-tenant-id` header's.
fn tenant(request: &WebhookRequest<'_>) -> Result<TenantId, WebhookError> {
    let header = request.headers.get(TENANT_HEADER);
    let name = match (request.path_tenant, header) {
        (Some(path), Some(header)) if path != header => return Err(WebhookError::TenantMismatch),
        (Some(name), _) | (None, Some(name)) => name,
        (None, None) => return Err(WebhookError::MissingTenant),
    };
    TenantId::parse(name).map_err(WebhookError::InvalidTenant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{MockDeliveryLog, MockMessageBroker, MockWebhookVerifier, Verified};
    use crate::use_cases::test_support::*;
    use serde_json::{Value, json};

    fn verifier(result: Result<(), SignatureError>) -> MockWebhookVerifier {
        verified(result.map(|()| Verified::default()))
    }

    fn verified(result: Result<Verified, SignatureError>) -> MockWebhookVerifier {
        let mut verifier = MockWebhookVerifier::new();
        verifier.expect_verify().returning(move |_| result.clone());
        verifier
    }

    fn request<'a>(provider: &'a str, tenant: Option<&'a str>, body: &'a [u8]) -> WebhookRequest<'a> {
        WebhookRequest { provider, path_tenant: tenant, headers: Headers::default(), body }
    }

    fn use_case(verifier: MockWebhookVerifier, broker: MockMessageBroker) -> IngestWebhook {
        IngestWebhook::new(Arc::new(verifier), Arc::new(broker), frames())
    }

    #[tokio::test]
    async fn a_verified_webhook_is_published_to_its_tenant_and_its_id_returned() {
        let mut broker = MockMessageBroker::new();
        broker
            .expect_publish()
            .withf(|channel, bytes| {
                let v: Value = serde_json::from_slice(bytes).expect("json");
                channel.name() == "tenant:acme"
                    && v["type"] == "webhook"
                    && v["payload"] == json!({"provider": "github", "data": {"action": "opened"}})
                    && v["from_user"] == Value::Null
                    && v["channel"] == "tenant:acme"
                    && v["message_id"] == "m1"
            })
            .times(1)
            .returning(|_, _| Ok(None));
        let id = use_case(verifier(Ok(())), broker)
            .ingest(request("github", Some("acme"), br#"{"action":"opened"}"#))
            .await
            .expect("accepted");
        assert_eq!(id, Accepted { message_id: MessageId::parse("m1").expect("valid"), duplicate: false });
    }

    #[tokio::test]
    async fn requests_are_checked_in_order_and_nothing_is_published_on_failure() {
        type Check = fn(&WebhookError) -> bool;
        let cases: Vec<(WebhookRequest<'_>, Result<(), SignatureError>, Check)> = vec![
            (request("GitHub", Some("acme"), b"{}"), Ok(()), |e| {
                matches!(e, WebhookError::InvalidProvider(_))
            }),
            (request("github", None, b"{}"), Ok(()), |e| matches!(e, WebhookError::MissingTenant)),
            (
                WebhookRequest {
                    headers: Headers(&[("X-Tenant-Id", "globex")]),
                    ..request("github", Some("acme"), b"{}")
                },
                Ok(()),
                |e| matches!(e, WebhookError::TenantMismatch),
            ),
            (
                WebhookRequest {
                    headers: Headers(&[("x-tenant-id", "a:b")]),
                    ..request("github", None, b"{}")
                },
                Ok(()),
                |e| matches!(e, WebhookError::InvalidTenant(_)),
            ),
            (request("github", Some("a:b"), b"{}"), Ok(()), |e| matches!(e, WebhookError::InvalidTenant(_))),
            (request("github", Some("acme"), b"{}"), Err(SignatureError::Mismatch), |e| {
                matches!(e, WebhookError::Unauthorized(SignatureError::Mismatch))
            }),
            (request("github", Some("acme"), b"not json"), Ok(()), |e| {
                matches!(e, WebhookError::InvalidJson(_))
            }),
            (request("github", Some("acme"), b"\xff"), Ok(()), |e| matches!(e, WebhookError::InvalidJson(_))),
            (request("github", Some("acme"), br#"{"a":"\ud800"}"#), Ok(()), |e| {
                matches!(e, WebhookError::InvalidJson(_))
            }),
        ];
        for (req, signature, expected) in cases {
            let mut broker = MockMessageBroker::new();
            broker.expect_publish().never();
            let err = use_case(verifier(signature), broker).ingest(req).await.expect_err("refused");
            assert!(expected(&err), "{req:?}: {err:?}");
        }
    }

    fn with_id(body: &[u8]) -> WebhookRequest<'_> {
        request("github", Some("acme"), body)
    }

    /// A verifier that finds delivery id `id` in the webhook.
    fn verifier_with_id(id: &str) -> MockWebhookVerifier {
        verified(Ok(Verified { delivery_id: Some(id.to_owned()), ..Verified::default() }))
    }

    fn log(claim: DeliveryClaim) -> MockDeliveryLog {
        let mut log = MockDeliveryLog::new();
        log.expect_claim()
            .withf(|tenant, id, pending| {
                tenant.as_str() == "acme" && id == "d-1" && *pending == PENDING_DELIVERY_SECS
            })
            .times(1)
            .returning(move |_, _, _| Ok(claim.clone()));
        log
    }

    #[tokio::test]
    async fn a_new_delivery_id_is_claimed_relayed_and_recorded() {
        let mut log = log(DeliveryClaim::Claimed);
        let recorded = |record: &DeliveryRecord| {
            record.tenant.as_str() == "acme"
                && record.delivery_id == "d-1"
                && record.message_id.as_str() == "m1"
                && record.keep_secs == 86_400
        };
        log.expect_complete().withf(recorded).times(1).returning(|_| Ok(()));
        log.expect_release().never();
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().never();
        // Recorded with the publish where the broker can, so no crash in between lets a retry
        // through.
        broker
            .expect_publish_recorded()
            .withf(move |_, _, r| recorded(r))
            .times(1)
            .returning(|_, _, _| Ok(None));
        let ingest = use_case(verifier_with_id("d-1"), broker).with_delivery_log(Arc::new(log), 86_400);
        let accepted = ingest.ingest(with_id(b"{}")).await.expect("accepted");
        assert!(!accepted.duplicate);
    }

    #[tokio::test]
    async fn a_delivery_already_relayed_answers_its_message_id_and_relays_nothing() {
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().never();
        let ingest = use_case(verifier_with_id("d-1"), broker).with_delivery_log(
            Arc::new(log(DeliveryClaim::Delivered(MessageId::parse("orig").expect("valid")))),
            60,
        );
        let accepted = ingest.ingest(with_id(b"{}")).await.expect("accepted");
        assert_eq!(
            accepted,
            Accepted { message_id: MessageId::parse("orig").expect("valid"), duplicate: true }
        );
    }

    #[tokio::test]
    async fn a_delivery_in_progress_is_refused_for_now() {
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().never();
        let ingest = use_case(verifier_with_id("d-1"), broker)
            .with_delivery_log(Arc::new(log(DeliveryClaim::InProgress)), 60);
        assert_eq!(ingest.ingest(with_id(b"{}")).await, Err(WebhookError::InProgress));
    }

    #[tokio::test]
    async fn a_failed_publish_releases_the_claim_so_the_retry_is_relayed() {
        let mut log = log(DeliveryClaim::Claimed);
        log.expect_release().withf(|_, id| id == "d-1").times(1).returning(|_, _| ());
        log.expect_complete().never();
        let mut broker = MockMessageBroker::new();
        broker.expect_publish_recorded().returning(|_, _, _| Err(BrokerError::Unavailable("down".into())));
        let ingest = use_case(verifier_with_id("d-1"), broker).with_delivery_log(Arc::new(log), 60);
        assert!(matches!(ingest.ingest(with_id(b"{}")).await, Err(WebhookError::Broker(_))));
    }

    #[tokio::test]
    async fn an_invalid_delivery_id_is_a_bad_request() {
        let mut log = MockDeliveryLog::new();
        log.expect_claim().never();
        let ingest =
            use_case(verifier_with_id("a b"), MockMessageBroker::new()).with_delivery_log(Arc::new(log), 60);
        assert_eq!(ingest.ingest(with_id(b"{}")).await, Err(WebhookError::InvalidDeliveryId));
    }

    #[tokio::test]
    async fn the_tenant_is_taken_from_the_header_when_the_path_has_none_and_both_reach_the_verifier() {
        for (path, headers) in
            [(None, &[("x-tenant-id", "acme")][..]), (Some("acme"), &[("X-TENANT-ID", "acme")][..])]
        {
            let mut verifier = MockWebhookVerifier::new();
            verifier
                .expect_verify()
                .withf(|w| w.tenant.as_str() == "acme" && w.provider.as_str() == "github" && w.body == b"{}")
                .times(1)
                .returning(|_| Ok(Verified::default()));
            let mut broker = MockMessageBroker::new();
            broker.expect_publish().times(1).returning(|_, _| Ok(None));
            let request = WebhookRequest {
                path_tenant: path,
                headers: Headers(headers),
                ..request("github", None, b"{}")
            };
            use_case(verifier, broker).ingest(request).await.expect("accepted");
        }
    }

    #[tokio::test]
    async fn the_event_name_of_the_scheme_joins_the_payload() {
        let mut broker = MockMessageBroker::new();
        broker
            .expect_publish()
            .withf(|_, bytes| {
                let v: Value = serde_json::from_slice(bytes).expect("json");
                v["payload"]
                    == json!({"provider": "stripe", "event": "invoice.paid", "data": {"id": "evt_1"}})
            })
            .times(1)
            .returning(|_, _| Ok(None));
        let verifier = verified(Ok(Verified { event: Some("invoice.paid".into()), ..Verified::default() }));
        use_case(verifier, broker)
            .ingest(request("stripe", Some("acme"), br#"{"id":"evt_1"}"#))
            .await
            .expect("accepted");
    }

    #[tokio::test]
    async fn a_bad_event_name_or_a_body_over_the_providers_limit_is_refused_after_the_signature() {
        let cases = [
            (Verified { event: Some("push\n".into()), ..Verified::default() }, WebhookError::InvalidEvent),
            (Verified { event: Some(String::new()), ..Verified::default() }, WebhookError::InvalidEvent),
            (Verified { event: Some("\u{fffd}".into()), ..Verified::default() }, WebhookError::InvalidEvent),
            (Verified { event: Some("a b".into()), ..Verified::default() }, WebhookError::InvalidEvent),
            (
                Verified { event: Some("e".repeat(MAX_EVENT_LEN + 1)), ..Verified::default() },
                WebhookError::InvalidEvent,
            ),
            (Verified { max_body_bytes: Some(2), ..Verified::default() }, WebhookError::TooLarge(2)),
        ];
        for (verified_as, expected) in cases {
            let mut broker = MockMessageBroker::new();
            broker.expect_publish().never();
            let result = use_case(verified(Ok(verified_as)), broker)
                .ingest(request("github", Some("acme"), b"{ }"))
                .await;
            assert_eq!(result, Err(expected));
        }
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().times(1).returning(|_, _| Ok(None));
        let at_limit = verified(Ok(Verified { max_body_bytes: Some(3), ..Verified::default() }));
        use_case(at_limit, broker).ingest(request("github", Some("acme"), b"{ }")).await.expect("accepted");
    }

    #[tokio::test]
    async fn a_broker_failure_is_reported_so_the_sender_retries() {
        let mut broker = MockMessageBroker::new();
        broker.expect_publish().returning(|_, _| Err(BrokerError::Unavailable("down".into())));
        let err = use_case(verifier(Ok(())), broker).ingest(request("github", Some("acme"), b"[]")).await;
        assert_eq!(err, Err(WebhookError::Broker(BrokerError::Unavailable("down".into()))));
    }
}
