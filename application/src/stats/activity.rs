//! What this instance did over the last minute, per tenant and per channel, in bounded memory:
//! the [`Activity`] the use-cases record into, and the [`CountingBroker`] that records every
//! message published.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use domain::activity::{SlidingCount, SlidingTop};
use domain::{Channel, Provider, StreamPosition, TenantId};

use super::report::{
    ChannelFigures, FAILURES_KEPT, Flow, MAX_REPORTED_TENANTS, TOP_CHANNELS, TenantFigures, Verdicts,
    WebhookFailure,
};
use crate::ports::{
    BrokerError, Clock, ControlCommand, DeliveryRecord, HistoryRead, InboundHandler, MessageBroker,
    SubscribeAck,
};

/// Tenants whose activity is counted one by one; beyond it, new tenants count in the totals
/// only (until idle tenants are forgotten).
pub const MAX_TRACKED_TENANTS: usize = 10_000;

/// Providers counted one by one per tenant; beyond, they count together as [`OTHER_PROVIDERS`].
/// With `WEBHOOK_SECRETS` every provider name is configured for its tenant, so senders could
/// otherwise make up names.
pub const MAX_PROVIDERS_PER_TENANT: usize = 16;

/// The name the providers beyond [`MAX_PROVIDERS_PER_TENANT`] are reported under.
pub const OTHER_PROVIDERS: &str = "(other)";

/// Channels counted per slot to find the busiest.
const CHANNEL_COUNTERS: usize = 64;

#[derive(Debug, Default)]
struct Counts {
    messages_in: SlidingCount,
    messages_out: SlidingCount,
    webhooks_accepted: SlidingCount,
    webhooks_refused: SlidingCount,
}

impl Counts {
    fn flow(&self, second: u64) -> Flow {
        Flow {
            messages_in: self.messages_in.total(second),
            messages_out: self.messages_out.total(second),
            webhooks_accepted: self.webhooks_accepted.total(second),
            webhooks_refused: self.webhooks_refused.total(second),
        }
    }
}

#[derive(Debug, Default)]
struct TenantActivity {
    counts: Counts,
    /// Accepted and refused, per provider configured for the tenant (`None`: the providers
    /// beyond [`MAX_PROVIDERS_PER_TENANT`]).
    providers: HashMap<Option<Provider>, (SlidingCount, SlidingCount)>,
}

#[derive(Debug)]
struct State {
    totals: Counts,
    tenants: HashMap<TenantId, TenantActivity>,
    channels: SlidingTop<Channel>,
    /// Newest first.
    failures: VecDeque<WebhookFailure>,
}

/// How a webhook ended, as [`Activity::webhook`] records it.
#[derive(Debug, Clone, Copy)]
pub enum WebhookVerdict<'a> {
    Accepted,
    /// Refused: the outcome's label and the reason.
    Refused {
        result: &'static str,
        reason: &'a str,
    },
}

/// Whom a webhook was addressed to, as far as the request tells.
#[derive(Debug, Clone, Copy)]
pub struct WebhookTarget<'a> {
    /// The tenant and provider, when both are configured: only then are they counted per
    /// tenant, so that senders cannot make the instance count made-up tenants.
    pub configured: Option<(&'a TenantId, &'a Provider)>,
    /// The tenant and provider as the request named them, when they are valid names.
    pub tenant: Option<&'a str>,
    pub provider: Option<&'a str>,
}

/// The instance's recent activity. Every call takes one short lock; none waits on I/O.
pub struct Activity {
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity").finish_non_exhaustive()
    }
}

/// What only the hub knows of each tenant with connections here: its connections and distinct
/// users ([`crate::hub::Hub::tenants`]).
pub type TenantCounts = HashMap<TenantId, (usize, usize)>;

impl Activity {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            state: Mutex::new(State {
                totals: Counts::default(),
                tenants: HashMap::new(),
                channels: SlidingTop::new(CHANNEL_COUNTERS),
                failures: VecDeque::with_capacity(FAILURES_KEPT),
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        self.clock.now().unix_millis()
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A message was published on `channel`.
    pub fn published(&self, channel: &Channel) {
        let second = self.now_ms() / 1000;
        self.with_state(|state| {
            state.totals.messages_in.add(second, 1);
            state.channels.add(second, channel, 1);
            if let Some(tenant) = state.tenant(channel.tenant()) {
                tenant.counts.messages_in.add(second, 1);
            }
        });
    }

    /// `frames` frames of a message on `channel` were queued for this instance's clients.
    pub fn delivered(&self, channel: &Channel, frames: u64) {
        if frames == 0 {
            return;
        }
        let second = self.now_ms() / 1000;
        self.with_state(|state| {
            state.totals.messages_out.add(second, frames);
            if let Some(tenant) = state.tenant(channel.tenant()) {
                tenant.counts.messages_out.add(second, frames);
            }
        });
    }

    /// A webhook addressed to `target` ended with `verdict`.
    pub fn webhook(&self, target: WebhookTarget<'_>, verdict: WebhookVerdict<'_>) {
        let at_ms = self.now_ms();
        let second = at_ms / 1000;
        self.with_state(|state| {
            let accepted = matches!(verdict, WebhookVerdict::Accepted);
            let total = if accepted {
                &mut state.totals.webhooks_accepted
            } else {
                &mut state.totals.webhooks_refused
            };
            total.add(second, 1);
            if let Some((tenant, provider)) = target.configured
                && let Some(activity) = state.tenant(Some(tenant))
            {
                let counts = &mut activity.counts;
                if accepted { &mut counts.webhooks_accepted } else { &mut counts.webhooks_refused }
                    .add(second, 1);
                let (ok, refused) = activity.provider(provider);
                if accepted { ok } else { refused }.add(second, 1);
            }
            if let WebhookVerdict::Refused { result, reason } = verdict {
                if state.failures.len() == FAILURES_KEPT {
                    state.failures.pop_back();
                }
                state.failures.push_front(WebhookFailure {
                    at_ms,
                    tenant: target.tenant.map(str::to_owned),
                    provider: target.provider.map(str::to_owned),
                    result: result.to_owned(),
                    reason: reason.to_owned(),
                });
            }
        });
    }

    /// The figures of the last minute, with each tenant's connections and users from
    /// `counts`, and forgets the tenants (and providers) without connections nor activity.
    /// Each tenant's counts are summed once; figures are built for the named tenants only.
    pub fn figures(&self, counts: &TenantCounts) -> ActivityFigures {
        let second = self.now_ms() / 1000;
        self.with_state(|state| {
            let mut flows: HashMap<TenantId, Flow> = HashMap::with_capacity(state.tenants.len());
            state.tenants.retain(|tenant, activity| {
                let flow = activity.counts.flow(second);
                let keep = flow != Flow::default() || counts.contains_key(tenant);
                if keep {
                    activity
                        .providers
                        .retain(|_, (ok, refused)| ok.total(second) + refused.total(second) > 0);
                    flows.insert(tenant.clone(), flow);
                }
                keep
            });
            let mut ranked: Vec<(&TenantId, (usize, usize), Flow)> = counts
                .iter()
                .map(|(tenant, counts)| (tenant, *counts, flows.get(tenant).copied().unwrap_or_default()))
                .collect();
            ranked.extend(
                flows
                    .iter()
                    .filter(|(tenant, _)| !counts.contains_key(*tenant))
                    .map(|(t, f)| (t, (0, 0), *f)),
            );
            let listed = ranked.len();
            if listed > MAX_REPORTED_TENANTS {
                ranked.select_nth_unstable_by(MAX_REPORTED_TENANTS - 1, |a, b| {
                    (b.1.0, b.2.traffic()).cmp(&(a.1.0, a.2.traffic()))
                });
                ranked.truncate(MAX_REPORTED_TENANTS);
            }
            let tenants: Vec<TenantFigures> = ranked
                .into_iter()
                .map(|(tenant, (connections, users), flow)| TenantFigures {
                    tenant: tenant.to_string(),
                    connections,
                    users,
                    flow,
                    webhooks: state.tenants.get(tenant).map(|a| a.verdicts(second)).unwrap_or_default(),
                })
                .collect();
            ActivityFigures {
                totals: state.totals.flow(second),
                tenants_left_out: listed - tenants.len(),
                tenants,
                top_channels: state
                    .channels
                    .top(second, TOP_CHANNELS)
                    .into_iter()
                    .map(|(channel, messages)| ChannelFigures { channel: channel.to_string(), messages })
                    .collect(),
                webhook_failures: state.failures.iter().cloned().collect(),
            }
        })
    }
}

impl TenantActivity {
    /// Webhooks accepted and refused per provider, the providers beyond
    /// [`MAX_PROVIDERS_PER_TENANT`] together as `(other)`.
    fn verdicts(&self, second: u64) -> BTreeMap<String, Verdicts> {
        self.providers
            .iter()
            .map(|(provider, (ok, refused))| {
                let name = provider.as_ref().map_or_else(|| OTHER_PROVIDERS.to_owned(), Provider::to_string);
                (name, Verdicts { accepted: ok.total(second), refused: refused.total(second) })
            })
            .filter(|(_, verdicts)| *verdicts != Verdicts::default())
            .collect()
    }

    /// The counts of `provider`, or of the other providers once the tenant has
    /// [`MAX_PROVIDERS_PER_TENANT`].
    fn provider(&mut self, provider: &Provider) -> &mut (SlidingCount, SlidingCount) {
        let key = Some(provider.clone());
        let named = self.providers.keys().filter(|p| p.is_some()).count();
        if self.providers.contains_key(&key) || named < MAX_PROVIDERS_PER_TENANT {
            self.providers.entry(key).or_default()
        } else {
            self.providers.entry(None).or_default()
        }
    }
}

impl State {
    /// The activity of `tenant`, created unless [`MAX_TRACKED_TENANTS`] are tracked already.
    fn tenant(&mut self, tenant: Option<&TenantId>) -> Option<&mut TenantActivity> {
        let tenant = tenant?;
        if self.tenants.contains_key(tenant) {
            return self.tenants.get_mut(tenant);
        }
        if self.tenants.len() >= MAX_TRACKED_TENANTS {
            return None;
        }
        Some(self.tenants.entry(tenant.clone()).or_default())
    }
}

/// The part of an [`InstanceReport`](super::report::InstanceReport) [`Activity`] knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivityFigures {
    pub totals: Flow,
    pub tenants: Vec<TenantFigures>,
    pub tenants_left_out: usize,
    pub top_channels: Vec<ChannelFigures>,
    pub webhook_failures: Vec<WebhookFailure>,
}

/// The broker, with every message it accepted counted in an [`Activity`].
pub struct CountingBroker {
    inner: Arc<dyn MessageBroker>,
    activity: Arc<Activity>,
}

impl std::fmt::Debug for CountingBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingBroker").finish_non_exhaustive()
    }
}

impl CountingBroker {
    pub fn new(inner: Arc<dyn MessageBroker>, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

#[async_trait]
impl MessageBroker for CountingBroker {
    async fn publish(
        &self,
        channel: &Channel,
        message: Bytes,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        let position = self.inner.publish(channel, message).await?;
        self.activity.published(channel);
        Ok(position)
    }

    async fn publish_recorded(
        &self,
        channel: &Channel,
        message: Bytes,
        record: &DeliveryRecord,
    ) -> Result<Option<StreamPosition>, BrokerError> {
        let position = self.inner.publish_recorded(channel, message, record).await?;
        self.activity.published(channel);
        Ok(position)
    }

    async fn history(
        &self,
        channel: &Channel,
        since: Option<StreamPosition>,
    ) -> Result<HistoryRead, BrokerError> {
        self.inner.history(channel, since).await
    }

    async fn publish_control(&self, command: &ControlCommand) -> Result<usize, BrokerError> {
        self.inner.publish_control(command).await
    }

    fn subscribe(&self, channels: &[Channel]) {
        self.inner.subscribe(channels);
    }

    fn unsubscribe(&self, channels: &[Channel]) {
        self.inner.unsubscribe(channels);
    }

    fn until_active(&self, channels: &[Channel]) -> SubscribeAck {
        self.inner.until_active(channels)
    }

    fn start(&self, handler: Weak<dyn InboundHandler>) {
        self.inner.start(handler);
    }

    fn is_ready(&self) -> bool {
        self.inner.is_ready()
    }

    fn unavailable_reason(&self) -> Option<String> {
        self.inner.unavailable_reason()
    }
}

#[cfg(test)]
mod tests {
    use domain::UserId;

    use super::*;
    use crate::use_cases::test_support::SettableClock;

    fn tenant(name: &str) -> TenantId {
        TenantId::parse(name).expect("valid")
    }

    fn activity() -> (Activity, Arc<SettableClock>) {
        let clock = SettableClock::at(1_000_000);
        (Activity::new(clock.clone()), clock)
    }

    #[test]
    fn messages_count_for_their_tenant_and_channel_over_the_last_minute() {
        let (activity, clock) = activity();
        let acme = Channel::Tenant(tenant("acme"));
        let bob = Channel::User(tenant("acme"), UserId::parse("bob").expect("valid"));
        for _ in 0..3 {
            activity.published(&acme);
        }
        activity.published(&bob);
        activity.published(&Channel::Global);
        activity.delivered(&acme, 10);
        let presence = TenantCounts::from([(tenant("acme"), (4, 2)), (tenant("idle"), (1, 1))]);
        let figures = activity.figures(&presence);
        assert_eq!((figures.totals.messages_in, figures.totals.messages_out), (5, 10));
        let acme_figures = figures.tenants.iter().find(|t| t.tenant == "acme").expect("acme");
        assert_eq!((acme_figures.connections, acme_figures.users), (4, 2));
        assert_eq!((acme_figures.flow.messages_in, acme_figures.flow.messages_out), (4, 10));
        assert!(figures.tenants.iter().any(|t| t.tenant == "idle" && t.connections == 1));
        assert_eq!(
            figures.top_channels[0],
            ChannelFigures { channel: "tenant:acme".to_owned(), messages: 3 }
        );

        clock.advance(61_000);
        let figures = activity.figures(&TenantCounts::new());
        assert_eq!(figures.totals, Flow::default());
        assert!(figures.tenants.is_empty(), "idle tenants without connections are forgotten");
        assert!(figures.top_channels.is_empty());
    }

    #[test]
    fn webhooks_count_per_configured_provider_and_failures_are_kept_newest_first() {
        let (activity, _) = activity();
        let (acme, github) = (tenant("acme"), Provider::parse("github").expect("valid"));
        let configured = WebhookTarget {
            configured: Some((&acme, &github)),
            tenant: Some("acme"),
            provider: Some("github"),
        };
        activity.webhook(configured, WebhookVerdict::Accepted);
        activity.webhook(
            configured,
            WebhookVerdict::Refused { result: "unauthorized", reason: "signature does not match" },
        );
        let stranger = WebhookTarget { configured: None, tenant: Some("nobody"), provider: Some("github") };
        for _ in 0..FAILURES_KEPT {
            activity.webhook(
                stranger,
                WebhookVerdict::Refused { result: "unauthorized", reason: "unknown tenant" },
            );
        }
        let figures = activity.figures(&TenantCounts::new());
        assert_eq!(
            (figures.totals.webhooks_accepted, figures.totals.webhooks_refused),
            (1, 1 + FAILURES_KEPT as u64)
        );
        assert_eq!(figures.tenants.len(), 1, "a tenant that is not configured is not counted: {figures:?}");
        assert_eq!(figures.tenants[0].webhooks["github"], Verdicts { accepted: 1, refused: 1 });
        assert_eq!(figures.webhook_failures.len(), FAILURES_KEPT);
        assert_eq!(figures.webhook_failures[0].tenant.as_deref(), Some("nobody"));
    }

    #[test]
    fn made_up_provider_names_share_one_counter_beyond_the_limit() {
        let (activity, _) = activity();
        let acme = tenant("acme");
        for n in 0..MAX_PROVIDERS_PER_TENANT + 10 {
            let provider = Provider::parse(&format!("p{n}")).expect("valid");
            let target =
                WebhookTarget { configured: Some((&acme, &provider)), tenant: Some("acme"), provider: None };
            activity.webhook(target, WebhookVerdict::Refused { result: "unauthorized", reason: "missing" });
        }
        let figures = activity.figures(&TenantCounts::new());
        let webhooks = &figures.tenants[0].webhooks;
        assert_eq!(webhooks.len(), MAX_PROVIDERS_PER_TENANT + 1);
        assert_eq!(webhooks[OTHER_PROVIDERS], Verdicts { accepted: 0, refused: 10 });
    }

    #[test]
    fn at_most_the_busiest_tenants_are_named_and_the_rest_are_counted() {
        let (activity, _) = activity();
        let presence: TenantCounts =
            (0..MAX_REPORTED_TENANTS + 5).map(|n| (tenant(&format!("t{n}")), (n + 1, 1))).collect();
        let figures = activity.figures(&presence);
        assert_eq!(figures.tenants.len(), MAX_REPORTED_TENANTS);
        assert_eq!(figures.tenants_left_out, 5);
        assert!(figures.tenants.iter().all(|t| t.connections > 5), "the busiest are kept");
    }
}
