//! What the subscribers of both topologies share: the reconnection loop with backoff, handing a
//! message to the application, and reading what changed in the wish. `single` holds the
//! subscriber on one Redis (or the master Sentinel names), `cluster` the one on a Redis Cluster.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use domain::Channel;

use super::target::{Master, RedisTarget};
use super::{CONTROL_CHANNEL, RedisError, Shared};

/// First pause after a failed connection; doubled up to `max_backoff`.
pub(super) const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// Messages dispatched after each subscription change at most, before the next change is looked
/// at: during a burst of connections the wish changes all the time, and deliveries must not wait
/// for the burst to end.
pub(super) const READY_AFTER_RECONCILE: usize = 1024;
/// Messages dispatched before the probes are judged at most: what already arrived (a probe
/// queued behind a backlog is not missing), unless the subscriber is that far behind.
pub(super) const READY_BEFORE_PROBE: usize = 16 * 1024;

/// Why a subscriber session ended.
pub(super) enum End {
    Stopped,
    Lost(RedisError),
}

/// The subscriber task of the broker's topology, until the broker stops.
pub(super) async fn run(shared: Arc<Shared>) {
    match &shared.settings.target {
        RedisTarget::Url(url) => super::single::run(&shared, &Master::Url(url)).await,
        RedisTarget::Sentinel { sentinels, master } => {
            super::single::run(&shared, &Master::Sentinel { sentinels, master }).await;
        }
        RedisTarget::Cluster { nodes } => {
            // `PublishPool::new` gives a cluster, and only a cluster, its pools per master.
            if let Some(pools) = shared.pool.cluster() {
                super::cluster::run(&shared, pools, nodes).await;
            }
        }
    }
}

/// Runs `attempt` — connect, then a session until it ends — again and again until the broker
/// stops, pausing with capped exponential backoff after each failure. `messages` are what the
/// log says when a session is lost and (once per outage) when Redis cannot be reached.
pub(super) async fn with_backoff<F, Fut>(shared: &Shared, messages: (&str, &str), mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<End, RedisError>>,
{
    let (lost, unreachable) = messages;
    let mut backoff = INITIAL_BACKOFF;
    let mut reported_down = false;
    while !shared.stopped.load(Ordering::Acquire) {
        match attempt().await {
            Ok(end) => {
                backoff = INITIAL_BACKOFF;
                shared.subscriber_up.store(false, Ordering::Release);
                shared.subscriptions().reset();
                shared.bump();
                match end {
                    End::Stopped => return,
                    End::Lost(reason) => {
                        shared.failed(&reason);
                        tracing::warn!(redis = %shared.settings.target.location(), %reason, "{lost}");
                        reported_down = true;
                        // A failover may have left pooled connections on the old master.
                        shared.pool.reset();
                    }
                }
            }
            Err(reason) => {
                shared.failed(&reason);
                if !reported_down {
                    let location = shared.settings.target.location();
                    let retry = format!(
                        "retrying after {} ms, then twice as long each time up to every {} ms",
                        INITIAL_BACKOFF.as_millis(),
                        shared.settings.max_backoff.as_millis()
                    );
                    tracing::warn!(redis = %location, %reason, %retry, "{unreachable}");
                    reported_down = true;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shared.stop.notified() => {}
        }
        backoff = (backoff * 2).min(shared.settings.max_backoff);
    }
}

/// Hands the message `payload` of channel `name` to the application: a control command, or a
/// message of an application channel. Returns `false` once the application is gone.
pub(super) fn deliver(shared: &Shared, name: &str, payload: &[u8]) -> bool {
    let Some(handler) = shared.handler.get().and_then(std::sync::Weak::upgrade) else {
        return false;
    };
    if name == CONTROL_CHANNEL {
        match serde_json::from_slice(payload) {
            Ok(command) => handler.on_control(command),
            Err(error) => tracing::warn!(%error, "control command not understood; ignored"),
        }
        return true;
    }
    match Channel::parse(name) {
        Ok(channel) => handler.on_message(channel, Bytes::copy_from_slice(payload)),
        Err(error) => {
            let count = shared.invalid_channels.fetch_add(1, Ordering::Relaxed);
            if count.is_power_of_two() || count == 0 {
                tracing::warn!(%error, dropped_so_far = count + 1, "message on an unknown channel dropped");
            }
        }
    }
    true
}

/// Channels wanted and not active, and active and no longer wanted, among those whose wish
/// changed since the last call.
pub(super) fn take_changes(shared: &Shared) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
    let mut subscriptions = shared.subscriptions();
    let changed = std::mem::take(&mut subscriptions.changed);
    changed
        .into_iter()
        .filter(|name| subscriptions.wanted.contains(name) != subscriptions.active.contains(name))
        .partition(|name| subscriptions.wanted.contains(name))
}

/// Waits for Redis to confirm a subscription `command`, at most `after`.
pub(super) async fn confirmed(
    command: &'static str,
    after: Duration,
    confirmation: impl std::future::Future<Output = deadpool_redis::redis::RedisResult<()>>,
) -> Result<(), RedisError> {
    match tokio::time::timeout(after, confirmation).await {
        Ok(result) => result.map_err(|source| RedisError::Subscription { command, source }),
        Err(_) => Err(RedisError::NotConfirmed { command, after }),
    }
}
