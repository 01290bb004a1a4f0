//! The subscriber on one Redis, or on the master Sentinel names: one dedicated Pub/Sub
//! connection; connect, subscribe everything wanted, dispatch messages, reconcile wishes, and
//! probe that deliveries still arrive.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use deadpool_redis::redis::Msg;
use deadpool_redis::redis::aio::PubSubSink;
use domain::channel::{GLOBAL_CHANNEL, SYSTEM_CHANNEL};
use futures_util::{FutureExt, StreamExt};

use super::probe::{self, ProbeTracker, Verdict};
use super::subscriber::{
    End, READY_AFTER_RECONCILE, READY_BEFORE_PROBE, confirmed, deliver, take_changes, with_backoff,
};
use super::target::{Master, connect_pubsub};
use super::{CONTROL_CHANNEL, RedisError, Shared};

/// Channels per SUBSCRIBE or UNSUBSCRIBE command.
const BATCH: usize = 500;

pub(super) async fn run(shared: &Arc<Shared>, master: &Master<'_>) {
    let messages =
        ("Redis subscriber connection lost; reconnecting", "Redis unreachable; retrying with backoff");
    with_backoff(shared, messages, || async {
        let pubsub = connect_pubsub(master, shared.settings.op_timeout).await?;
        Ok(session(shared, pubsub).await)
    })
    .await;
}

async fn session(shared: &Arc<Shared>, pubsub: deadpool_redis::redis::aio::PubSub) -> End {
    let (mut sink, mut stream) = pubsub.split();
    let op_timeout = shared.settings.op_timeout;
    let base = [
        GLOBAL_CHANNEL.to_owned(),
        SYSTEM_CHANNEL.to_owned(),
        CONTROL_CHANNEL.to_owned(),
        shared.probe_channel.to_string(),
    ];
    if let Err(error) = confirmed("SUBSCRIBE", op_timeout, sink.subscribe(&base[..])).await {
        return End::Lost(error);
    }
    if let Err(reason) = reconcile(shared, &mut sink).await {
        return End::Lost(reason);
    }
    shared.probe_missing.store(false, Ordering::Release);
    shared.subscriber_up.store(true, Ordering::Release);
    shared.bump();
    // Whatever was published while no subscriber listened never arrives: the application
    // checks its channels' positions.
    if let Some(handler) = shared.handler.get().and_then(std::sync::Weak::upgrade) {
        handler.on_resubscribed();
    }
    tracing::info!(channels = shared.subscriptions().active.len(), "Redis subscriber connected");
    // A tracker of its own: probes of an earlier session still on their way are not expected.
    let probes = ProbeTracker::shared(shared.settings.probe_interval);
    let mut probe = tokio::time::interval(shared.settings.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if shared.stopped.load(Ordering::Acquire) {
            return End::Stopped;
        }
        tokio::select! {
            biased;
            () = shared.stop.notified() => return End::Stopped,
            // Subscription changes and probes come before messages, so a busy channel never
            // delays a new connection's subscription or the health check.
            () = shared.wish_changed.notified() => {
                if let Err(reason) = reconcile(shared, &mut sink).await {
                    return End::Lost(reason);
                }
                // Then some of what arrived meanwhile: during a burst of connections the wishes
                // change all the time, and deliveries must not wait for the burst to end.
                if let Err(end) = dispatch_ready(shared, &probes, &mut stream, READY_AFTER_RECONCILE) {
                    return end;
                }
            }
            _ = probe.tick() => {
                // A probe queued behind a backlog is not missing: deliver what already arrived
                // before judging.
                if let Err(end) = dispatch_ready(shared, &probes, &mut stream, READY_BEFORE_PROBE) {
                    return end;
                }
                let verdict = probe::lock(&probes).judge(Instant::now());
                if let Verdict::Lost { .. } = verdict {
                    return End::Lost(RedisError::ProbesLost);
                }
                shared.probe_missing.store(verdict == Verdict::Late, Ordering::Release);
                tokio::spawn(probe::send(shared.clone(), shared.probe_channel.clone(), probes.clone()));
            }
            message = stream.next() => match message {
                Some(message) => {
                    if !dispatch(shared, &probes, &message) {
                        return End::Stopped;
                    }
                }
                None => return End::Lost(RedisError::ConnectionClosed),
            },
        }
    }
}

/// Dispatches up to `limit` messages that already arrived, without waiting for more.
fn dispatch_ready(
    shared: &Shared,
    probes: &Mutex<ProbeTracker>,
    stream: &mut (impl futures_util::Stream<Item = Msg> + Unpin),
    limit: usize,
) -> Result<(), End> {
    for _ in 0..limit {
        // Outside Tokio's per-task budget, which would otherwise end the drain after about 128
        // messages as if nothing more had arrived.
        match tokio::task::unconstrained(stream.next()).now_or_never() {
            Some(Some(message)) => {
                if !dispatch(shared, probes, &message) {
                    return Err(End::Stopped);
                }
            }
            Some(None) => return Err(End::Lost(RedisError::ConnectionClosed)),
            None => break,
        }
    }
    Ok(())
}

/// Hands one message to the application. Returns `false` once the application is gone.
fn dispatch(shared: &Shared, probes: &Mutex<ProbeTracker>, message: &Msg) -> bool {
    let name = message.get_channel_name();
    if name == &*shared.probe_channel {
        probe::lock(probes).received(message.get_payload_bytes());
        return true;
    }
    deliver(shared, name, message.get_payload_bytes())
}

/// Brings Redis in line with what is wanted: one SUBSCRIBE for everything missing, one
/// UNSUBSCRIBE for everything no longer wanted (in batches of [`BATCH`]). Only the channels
/// whose wish changed are looked at; a failure ends the session, and the next one subscribes
/// everything wanted again.
async fn reconcile(shared: &Shared, sink: &mut PubSubSink) -> Result<(), RedisError> {
    let (add, remove) = take_changes(shared);
    let op_timeout = shared.settings.op_timeout;
    for chunk in add.chunks(BATCH) {
        let names: Vec<&str> = chunk.iter().map(|name| &**name).collect();
        confirmed("SUBSCRIBE", op_timeout, sink.subscribe(&names)).await?;
        shared.subscriptions().active.extend(chunk.iter().cloned());
        shared.bump();
    }
    for chunk in remove.chunks(BATCH) {
        // No longer counted as active from the moment the UNSUBSCRIBE leaves: a connection that
        // wants the channel again meanwhile waits for the next SUBSCRIBE, not for this one.
        {
            let mut subscriptions = shared.subscriptions();
            for name in chunk {
                subscriptions.active.remove(name);
            }
        }
        let names: Vec<&str> = chunk.iter().map(|name| &**name).collect();
        confirmed("UNSUBSCRIBE", op_timeout, sink.unsubscribe(&names)).await?;
    }
    Ok(())
}
