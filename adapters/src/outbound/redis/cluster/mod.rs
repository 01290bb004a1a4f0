//! The subscriber of a Redis Cluster: sharded Pub/Sub (`SSUBSCRIBE`) over one cluster
//! connection of the `redis` crate, which holds one multiplexed connection per node. Commands
//! (publishes, scripts, presence, delivery ids) do not use it: they go through the per-master
//! pools of [`routing`], so that a failing master never delays the others.
//!
//! - A sharded channel lives on the master owning its hash slot, and one `SSUBSCRIBE` may only
//!   name channels of one slot: subscriptions are sent grouped by slot, each group on its own
//!   task, so a node that does not answer delays only its own channels.
//! - The cluster connection re-subscribes a reconnected node, and after a topology change
//!   (failover, slot migration) moves every subscription to its slot's new owner. Every
//!   subscription it re-established on its own (an `ssubscribe` confirmation this instance did
//!   not ask for) makes the application check its channels' positions, since what was published
//!   meanwhile never arrived.
//! - A slot migrated away ends its channels' subscriptions with a server-sent `sunsubscribe`:
//!   those channels are subscribed again, now on their new owner, and then checked likewise.
//! - Every probe interval the topology is read through the pools; channels whose slot changed
//!   owner are subscribed again, on the new owner, then checked.
//! - Each master has a probe channel (a name hashing to one of its slots); a probe is published
//!   to each every second through the pools, and judged by its own age as on one Redis (see
//!   `probe`): late, the instance is not ready; lost, the master's channels are subscribed
//!   again; when that does not help, the whole session starts over. A master that cannot be
//!   reached (failing over) does not make the instance unready: the other masters' channels
//!   work on, and its own resume once a replica took over.

pub(super) mod routing;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::{PushInfo, PushKind, Value};
use domain::channel::{GLOBAL_CHANNEL, SYSTEM_CHANNEL};
use tokio::sync::mpsc;
use tokio::time::Instant;

use routing::{ClusterPools, Topology, slot};

use super::probe::{self, ProbeTracker, Verdict};
use super::subscriber::{
    End, READY_AFTER_RECONCILE, READY_BEFORE_PROBE, confirmed, deliver, take_changes, with_backoff,
};
use super::target::cluster_client;
use super::{CONTROL_CHANNEL, RedisError, Shared};

/// Slot groups subscribed or unsubscribed at once.
const CONCURRENT_GROUPS: usize = 64;
/// Periods the oldest probe of a master may wait to come back before the whole session starts
/// over: its channels were subscribed again once it counted as lost, and that did not help.
const RECONNECT_AFTER: u32 = 6;
/// Delay before the positions are checked after a re-subscription, so that one topology change
/// (many confirmations) makes one check.
const CHECK_DELAY: Duration = Duration::from_millis(100);

/// The probe of one master.
struct Probe {
    channel: Arc<str>,
    tracker: Arc<Mutex<ProbeTracker>>,
    /// The master's channels were subscribed again since its probes count as lost: next, the
    /// session starts over.
    resubscribed: bool,
}

/// What a subscription task reports back.
struct Outcome {
    names: Vec<Arc<str>>,
    subscribe: bool,
    result: Result<(), RedisError>,
}

/// One connection to the cluster and what this instance asked of it.
struct Session<'a> {
    /// The pools commands go through, where the topology is read.
    pools: &'a ClusterPools,
    connection: ClusterConnection,
    topology: Topology,
    /// Probe channel per master.
    probes: HashMap<String, Probe>,
    /// The instance's own channels (broadcast, system, control, probes) subscribed, or being.
    internal: HashSet<Arc<str>>,
    internal_active: HashSet<Arc<str>>,
    /// Confirmations expected for this instance's own `SSUBSCRIBE`s and `SUNSUBSCRIBE`s.
    solicited_subscribe: HashMap<Arc<str>, u32>,
    solicited_unsubscribe: HashMap<Arc<str>, u32>,
    /// Channels whose subscription was lost: once subscribed again, positions are checked.
    lost: HashSet<Arc<str>>,
    /// Channels no longer wanted whose `SUNSUBSCRIBE` failed.
    unsubscribe_again: HashSet<Arc<str>>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    check_due: Option<Instant>,
    /// A subscription failed: reconcile again at the next probe tick.
    retry: bool,
}

pub(super) async fn run(shared: &Arc<Shared>, pools: &ClusterPools, nodes: &[String]) {
    let messages = (
        "Redis Cluster subscriber session lost; reconnecting",
        "Redis Cluster unreachable; retrying with backoff",
    );
    with_backoff(shared, messages, || async {
        let (pushes_tx, pushes) = mpsc::unbounded_channel();
        let connection = connect(shared, nodes, pushes_tx).await?;
        Ok(session(shared, pools, connection, pushes).await)
    })
    .await;
}

async fn connect(
    shared: &Shared,
    nodes: &[String],
    pushes: mpsc::UnboundedSender<PushInfo>,
) -> Result<ClusterConnection, RedisError> {
    let after = shared.settings.op_timeout * 3;
    let client = cluster_client(nodes, shared.settings.op_timeout, Some(pushes))?;
    match tokio::time::timeout(after, client.get_async_connection()).await {
        Ok(connection) => connection.map_err(RedisError::Connection),
        Err(_) => Err(RedisError::Timeout { what: "no connection to the Redis Cluster", after }),
    }
}

async fn session(
    shared: &Arc<Shared>,
    pools: &ClusterPools,
    connection: ClusterConnection,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
) -> End {
    let (outcomes_tx, mut outcomes) = mpsc::unbounded_channel();
    let mut session = Session {
        pools,
        connection,
        topology: Topology::default(),
        probes: HashMap::new(),
        internal: HashSet::new(),
        internal_active: HashSet::new(),
        solicited_subscribe: HashMap::new(),
        solicited_unsubscribe: HashMap::new(),
        lost: HashSet::new(),
        unsubscribe_again: HashSet::new(),
        outcomes: outcomes_tx,
        check_due: None,
        retry: false,
    };
    if let Err(reason) = session.refresh_topology(shared).await {
        return End::Lost(reason);
    }
    let base: Vec<Arc<str>> =
        [GLOBAL_CHANNEL, SYSTEM_CHANNEL, CONTROL_CHANNEL].into_iter().map(Arc::from).collect();
    session.internal.extend(base.iter().cloned());
    session.update_probes(shared);
    // Everything the instance needs before it is usable, confirmed before it says so.
    let mut first: Vec<Arc<str>> = session.internal.iter().cloned().collect();
    let (add, _) = take_changes(shared);
    first.extend(add);
    session.send(shared, first, true);
    let deadline = Instant::now() + shared.settings.confirm_timeout;
    while !session.internal.iter().all(|name| session.internal_active.contains(name)) {
        tokio::select! {
            outcome = outcomes.recv() => match outcome {
                Some(outcome) => session.apply(shared, outcome),
                None => return End::Stopped,
            },
            push = pushes.recv() => match push {
                Some(push) => if !session.on_push(shared, push) { return End::Stopped },
                None => return End::Lost(RedisError::ConnectionClosed),
            },
            () = tokio::time::sleep_until(deadline) => {
                return End::Lost(RedisError::Timeout {
                    what: "the cluster did not confirm the subscriptions",
                    after: shared.settings.confirm_timeout,
                });
            }
        }
    }
    shared.probe_missing.store(false, Ordering::Release);
    shared.subscriber_up.store(true, Ordering::Release);
    shared.bump();
    if let Some(handler) = shared.handler.get().and_then(std::sync::Weak::upgrade) {
        handler.on_resubscribed();
    }
    tracing::info!(masters = session.topology.masters.len(), "Redis Cluster subscriber connected");
    let mut probe = tokio::time::interval(shared.settings.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if shared.stopped.load(Ordering::Acquire) {
            return End::Stopped;
        }
        let check_due = session.check_due;
        tokio::select! {
            biased;
            () = shared.stop.notified() => return End::Stopped,
            // Subscription changes, their outcomes and probes come before messages, so a busy
            // channel never delays a new connection's subscription or the health check; some of
            // what arrived meanwhile follows each change, so that during a burst of connections
            // deliveries do not wait for the burst to end.
            () = shared.wish_changed.notified() => {
                session.reconcile(shared);
                if !session.drain(shared, &mut pushes, READY_AFTER_RECONCILE) {
                    return End::Stopped;
                }
            }
            Some(outcome) = outcomes.recv() => {
                session.apply(shared, outcome);
                if !session.drain(shared, &mut pushes, READY_AFTER_RECONCILE) {
                    return End::Stopped;
                }
            }
            _ = probe.tick() => {
                if !session.drain(shared, &mut pushes, READY_BEFORE_PROBE) {
                    return End::Stopped;
                }
                if let Err(reason) = session.tick(shared).await {
                    return End::Lost(reason);
                }
            }
            () = sleep_until(check_due) => {
                session.check_due = None;
                if let Some(handler) = shared.handler.get().and_then(std::sync::Weak::upgrade) {
                    handler.on_resubscribed();
                }
            }
            push = pushes.recv() => match push {
                Some(push) => if !session.on_push(shared, push) { return End::Stopped },
                None => return End::Lost(RedisError::ConnectionClosed),
            },
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

fn text(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

impl Session<'_> {
    /// Reads the topology through the publish pools. When slots changed owner, the channels
    /// of those slots are subscribed again (the cluster connection moves them too, but only once
    /// it notices), then checked.
    async fn refresh_topology(&mut self, shared: &Shared) -> Result<(), RedisError> {
        let refreshed = shared.timed(self.pools.refresh()).await;
        shared.publisher_up.store(refreshed.is_ok(), Ordering::Release);
        let topology = refreshed?;
        if *topology == self.topology {
            return Ok(());
        }
        tracing::info!(masters = topology.masters.len(), "Redis Cluster topology");
        let previous = std::mem::replace(&mut self.topology, (*topology).clone());
        if previous.masters.is_empty() {
            return Ok(());
        }
        let moved = |name: &Arc<str>| {
            let slot = slot(name.as_bytes());
            previous.owner(slot) != self.topology.owner(slot)
        };
        let mut channels: Vec<Arc<str>> = self.internal.iter().filter(|name| moved(name)).cloned().collect();
        channels.extend(shared.subscriptions().wanted.iter().filter(|name| moved(name)).cloned());
        if !channels.is_empty() {
            tracing::info!(
                channels = channels.len(),
                "channels moved to another master; subscribing them there"
            );
            self.mark_lost(shared, &channels);
            self.send(shared, channels, true);
        }
        Ok(())
    }

    /// One probe channel per master: masters that appeared get one, masters gone lose theirs.
    fn update_probes(&mut self, shared: &Shared) {
        let gone: Vec<String> =
            self.probes.keys().filter(|node| !self.topology.masters.contains_key(*node)).cloned().collect();
        let mut unsubscribe = Vec::new();
        for node in gone {
            if let Some(probe) = self.probes.remove(&node) {
                self.internal.remove(&probe.channel);
                self.internal_active.remove(&probe.channel);
                unsubscribe.push(probe.channel);
            }
        }
        let mut subscribe = Vec::new();
        let missing: HashSet<&String> =
            self.topology.masters.keys().filter(|node| !self.probes.contains_key(*node)).collect();
        if !missing.is_empty() {
            let mut found = HashMap::new();
            for n in 0..100_000u32 {
                let name = format!("{}:{n}", shared.probe_channel);
                if let Some(owner) = self.topology.owner(slot(name.as_bytes()))
                    && missing.contains(&owner.to_owned())
                    && !found.contains_key(owner)
                {
                    found.insert(owner.to_owned(), name);
                    if found.len() == missing.len() {
                        break;
                    }
                }
            }
            for (node, name) in found {
                let channel: Arc<str> = name.into();
                self.internal.insert(channel.clone());
                subscribe.push(channel.clone());
                let tracker = ProbeTracker::shared(shared.settings.probe_interval);
                let probe = Probe { channel, tracker, resubscribed: false };
                self.probes.insert(node, probe);
            }
        }
        self.send(shared, subscribe, true);
        self.send(shared, unsubscribe, false);
    }

    /// Sends `SSUBSCRIBE` (or `SUNSUBSCRIBE`) for `names`, one command per slot, each on its own
    /// task; the outcomes come back through `outcomes`.
    fn send(&mut self, shared: &Shared, names: Vec<Arc<str>>, subscribe: bool) {
        if names.is_empty() {
            return;
        }
        let mut groups: HashMap<u16, Vec<Arc<str>>> = HashMap::new();
        for name in names {
            let expected =
                if subscribe { &mut self.solicited_subscribe } else { &mut self.solicited_unsubscribe };
            *expected.entry(name.clone()).or_default() += 1;
            groups.entry(slot(name.as_bytes())).or_default().push(name);
        }
        let connection = self.connection.clone();
        let outcomes = self.outcomes.clone();
        let timeout = shared.settings.op_timeout;
        tokio::spawn(async move {
            use futures_util::StreamExt;
            futures_util::stream::iter(groups.into_values())
                .for_each_concurrent(CONCURRENT_GROUPS, |names| {
                    let mut connection = connection.clone();
                    let outcomes = outcomes.clone();
                    async move {
                        let args: Vec<&str> = names.iter().map(|name| &**name).collect();
                        let command = async {
                            if subscribe {
                                connection.ssubscribe(&args).await
                            } else {
                                connection.sunsubscribe(&args).await
                            }
                        };
                        let verb = if subscribe { "SSUBSCRIBE" } else { "SUNSUBSCRIBE" };
                        let result = confirmed(verb, timeout, command).await;
                        let _ = outcomes.send(Outcome { names, subscribe, result });
                    }
                })
                .await;
        });
    }

    /// Records what a subscription task reports.
    fn apply(&mut self, shared: &Shared, outcome: Outcome) {
        let expected =
            if outcome.subscribe { &mut self.solicited_subscribe } else { &mut self.solicited_unsubscribe };
        if let Err(error) = &outcome.result {
            // No confirmation will come for these.
            for name in &outcome.names {
                forget(expected, name);
            }
            let verb = if outcome.subscribe { "SSUBSCRIBE" } else { "SUNSUBSCRIBE" };
            tracing::warn!(%error, channels = outcome.names.len(), "{verb} failed; retrying");
            self.retry = true;
            if outcome.subscribe {
                let mut subscriptions = shared.subscriptions();
                for name in outcome.names {
                    if self.internal.contains(&name) {
                        self.internal_active.remove(&name);
                    } else {
                        subscriptions.active.remove(&name);
                        subscriptions.changed.insert(name);
                    }
                }
            } else {
                self.unsubscribe_again.extend(outcome.names);
            }
            return;
        }
        if !outcome.subscribe {
            return;
        }
        let mut recovered = false;
        {
            let mut subscriptions = shared.subscriptions();
            for name in outcome.names {
                recovered |= self.lost.remove(&name);
                if self.internal.contains(&name) {
                    self.internal_active.insert(name);
                } else if subscriptions.wanted.contains(&name) {
                    subscriptions.active.insert(name);
                }
            }
        }
        shared.bump();
        if recovered {
            self.schedule_check();
        }
    }

    fn schedule_check(&mut self) {
        self.check_due.get_or_insert_with(|| Instant::now() + CHECK_DELAY);
    }

    /// Subscribes what is wanted and not active, unsubscribes what is active and not wanted.
    fn reconcile(&mut self, shared: &Shared) {
        let (add, remove) = take_changes(shared);
        {
            // No longer counted as active from the moment the SUNSUBSCRIBE leaves.
            let mut subscriptions = shared.subscriptions();
            for name in &remove {
                subscriptions.active.remove(name);
            }
        }
        let mut remove = remove;
        remove.extend(self.unsubscribe_again.drain());
        self.send(shared, add, true);
        self.send(shared, remove, false);
    }

    /// Handles up to `limit` pushes that already arrived, without waiting for more. Returns
    /// `false` once the application is gone.
    fn drain(
        &mut self,
        shared: &Shared,
        pushes: &mut mpsc::UnboundedReceiver<PushInfo>,
        limit: usize,
    ) -> bool {
        for _ in 0..limit {
            // `try_recv` is outside Tokio's task budget: the drain ends only when nothing more
            // arrived. A closed queue is left to the session's loop.
            let Ok(push) = pushes.try_recv() else { break };
            if !self.on_push(shared, push) {
                return false;
            }
        }
        true
    }

    /// Handles one push of the connection. Returns `false` once the application is gone.
    fn on_push(&mut self, shared: &Shared, push: PushInfo) -> bool {
        let name = push.data.first().and_then(text).and_then(|n| std::str::from_utf8(n).ok());
        match (push.kind, name) {
            (PushKind::SMessage | PushKind::Message, Some(name)) => {
                let payload = push.data.get(1).and_then(text).unwrap_or_default();
                if let Some(probe) = self.probes.values().find(|probe| &*probe.channel == name) {
                    probe::lock(&probe.tracker).received(payload);
                    return true;
                }
                deliver(shared, name, payload)
            }
            (PushKind::SSubscribe, Some(name)) => {
                if !forget(&mut self.solicited_subscribe, name) {
                    // Re-established by the connection itself (after a reconnection or a
                    // topology change): what was published meanwhile never arrived.
                    self.schedule_check();
                }
                true
            }
            (PushKind::SUnsubscribe, Some(name)) => {
                if !forget(&mut self.solicited_unsubscribe, name) {
                    // The server ended it: its slot moved to another master.
                    self.lost_subscription(shared, name);
                }
                true
            }
            (PushKind::Disconnection, _) => {
                tracing::debug!("a Redis Cluster node connection closed; it reconnects and re-subscribes");
                true
            }
            _ => true,
        }
    }

    /// `name` is no longer subscribed although wanted: subscribe it again (on its slot's
    /// current owner), then check positions.
    fn lost_subscription(&mut self, shared: &Shared, name: &str) {
        let name: Arc<str> = name.into();
        if self.internal.contains(&name) {
            self.internal_active.remove(&name);
            self.lost.insert(name.clone());
            self.send(shared, vec![name], true);
            return;
        }
        let mut subscriptions = shared.subscriptions();
        if subscriptions.wanted.contains(&name) {
            subscriptions.active.remove(&name);
            subscriptions.changed.insert(name.clone());
            drop(subscriptions);
            self.lost.insert(name);
            shared.wish_changed.notify_one();
        }
    }

    /// Once per probe interval: refresh the topology, judge and publish the probes, retry what
    /// failed.
    async fn tick(&mut self, shared: &Arc<Shared>) -> Result<(), RedisError> {
        if let Err(reason) = self.refresh_topology(shared).await {
            tracing::debug!(%reason, "Redis Cluster topology not refreshed");
        }
        self.update_probes(shared);
        let mut missing = false;
        let mut deaf_nodes = Vec::new();
        let now = std::time::Instant::now();
        for (node, probe) in &mut self.probes {
            let (verdict, unreachable) = {
                let mut tracker = probe::lock(&probe.tracker);
                (tracker.judge(now), tracker.refused())
            };
            match verdict {
                Verdict::Lost { periods } if periods >= RECONNECT_AFTER => {
                    return Err(RedisError::MasterProbesLost { node: node.clone() });
                }
                Verdict::Lost { .. } => {
                    if !std::mem::replace(&mut probe.resubscribed, true) {
                        deaf_nodes.push(node.clone());
                    }
                }
                Verdict::OnTime | Verdict::Late => probe.resubscribed = false,
            }
            missing |= verdict != Verdict::OnTime;
            // A master that cannot be reached is failing over: its channels are unavailable
            // until a replica took over, the others work on.
            missing |= !unreachable && !self.internal_active.contains(&probe.channel);
        }
        shared.probe_missing.store(missing, Ordering::Release);
        for node in deaf_nodes {
            tracing::warn!(%node, "probe messages of a Redis Cluster master stopped arriving; subscribing its channels again");
            self.resubscribe_node(shared, &node);
        }
        for probe in self.probes.values() {
            tokio::spawn(probe::send(shared.clone(), probe.channel.clone(), probe.tracker.clone()));
        }
        // A lost channel no longer wanted will not be confirmed: nothing to check for it.
        if !self.lost.is_empty() {
            let subscriptions = shared.subscriptions();
            let internal = &self.internal;
            self.lost.retain(|name| internal.contains(name) || subscriptions.wanted.contains(name));
        }
        if std::mem::take(&mut self.retry) {
            let pending: Vec<Arc<str>> =
                self.internal.iter().filter(|name| !self.internal_active.contains(*name)).cloned().collect();
            let pending: Vec<Arc<str>> =
                pending.into_iter().filter(|name| !self.solicited_subscribe.contains_key(name)).collect();
            self.send(shared, pending, true);
            self.reconcile(shared);
        }
        Ok(())
    }

    /// `channels` are not (or no longer surely) subscribed: not active until confirmed again,
    /// and checked once they are.
    fn mark_lost(&mut self, shared: &Shared, channels: &[Arc<str>]) {
        let mut subscriptions = shared.subscriptions();
        for name in channels {
            self.internal_active.remove(name);
            subscriptions.active.remove(name);
            self.lost.insert(name.clone());
        }
        drop(subscriptions);
        shared.bump();
    }

    /// Subscribes again every channel of the slots `node` owns.
    fn resubscribe_node(&mut self, shared: &Shared, node: &str) {
        let owned = |name: &Arc<str>| self.topology.owner(slot(name.as_bytes())) == Some(node);
        let internal: Vec<Arc<str>> = self.internal.iter().filter(|name| owned(name)).cloned().collect();
        let mut channels: Vec<Arc<str>> = {
            let subscriptions = shared.subscriptions();
            subscriptions.wanted.iter().filter(|name| owned(name)).cloned().collect()
        };
        channels.extend(internal);
        self.mark_lost(shared, &channels);
        self.send(shared, channels, true);
    }
}

/// Removes one expected confirmation of `name`; `false` when none was expected.
fn forget(expected: &mut HashMap<Arc<str>, u32>, name: &str) -> bool {
    match expected.get_mut(name) {
        Some(count) if *count > 1 => {
            *count -= 1;
            true
        }
        Some(_) => {
            expected.remove(name);
            true
        }
        None => false,
    }
}
