//! Presence: who is online in a tenant, and who is a present member of a topic, over every
//! instance; and the `presence.join` / `presence.leave` announcements, published on the scope's
//! presence channel (`presence:{tenant}`, `presence:{tenant}:{topic}`) so that only the
//! connections that asked for them receive them.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use domain::envelope::{kind, raw_payload};
use domain::{Channel, PresenceScope, UserId};
use serde::Serialize;

use crate::frames::FrameFactory;
use crate::hub::Hub;
use crate::ports::{BrokerError, MessageBroker, Presence, PresenceChange, PresentUser};
use crate::use_cases::publish_timed;

#[derive(Serialize)]
struct Who<'a> {
    user_id: &'a str,
}

/// The presence use-case. Without a [`Presence`] store (presence turned off) it does nothing
/// and lists nothing.
pub struct TrackPresence {
    store: Option<Arc<dyn Presence>>,
    hub: Arc<Hub>,
    broker: Arc<dyn MessageBroker>,
    frames: FrameFactory,
    /// Scopes and users whose local presence changed and is not recorded yet (sessions that
    /// started or ended, subscriptions ended by a delivery): recorded by the next
    /// [`TrackPresence::settle`]. One entry per such change at most.
    unsettled: Mutex<Vec<(PresenceScope, UserId)>>,
    /// Wakes whoever waits in [`TrackPresence::unsettled`].
    pending: tokio::sync::Notify,
}

impl std::fmt::Debug for TrackPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackPresence").field("on", &self.store.is_some()).finish_non_exhaustive()
    }
}

impl TrackPresence {
    pub fn new(
        store: Option<Arc<dyn Presence>>,
        hub: Arc<Hub>,
        broker: Arc<dyn MessageBroker>,
        frames: FrameFactory,
    ) -> Self {
        Self {
            store,
            hub,
            broker,
            frames,
            unsettled: Mutex::new(Vec::new()),
            pending: tokio::sync::Notify::new(),
        }
    }

    pub fn is_on(&self) -> bool {
        self.store.is_some()
    }

    /// The user's present connections in `scope` on this instance changed (one opened or
    /// closed, a subscription with presence began or ended): records the new count and
    /// announces a join or a leave when there is one. Failures are logged: presence never holds
    /// a connection up.
    pub async fn changed(&self, scope: &PresenceScope, user: &UserId) {
        let Some(store) = &self.store else { return };
        let connections = self.hub.present_connections_of(scope, user);
        match store.set(scope, user, connections).await {
            Ok(change) => self.announce(scope, user, change).await,
            Err(error) => tracing::warn!(%error, %scope, "presence not updated"),
        }
    }

    /// Like [`TrackPresence::changed`], without waiting for the store: recorded by the next
    /// [`TrackPresence::settle`]. A connection's opening or end thus costs no round trip to the
    /// store, and the changes of a burst of connections of one user are recorded once.
    pub(crate) fn changed_later(&self, scope: &PresenceScope, user: &UserId) {
        if self.store.is_some() {
            self.unsettled.lock().unwrap_or_else(PoisonError::into_inner).push((scope.clone(), user.clone()));
            self.pending.notify_one();
        }
    }

    /// Resolves once a change waits for [`TrackPresence::settle`] (at once when one already
    /// does); never with presence off.
    pub async fn unsettled(&self) {
        if self.store.is_some() {
            self.pending.notified().await;
        } else {
            std::future::pending::<()>().await;
        }
    }

    /// Records the changes left by [`TrackPresence::changed_later`]. Run it whenever
    /// [`TrackPresence::unsettled`] resolves: until then, such a join or leave is not announced.
    pub async fn settle(&self) {
        let unsettled: BTreeSet<_> =
            std::mem::take(&mut *self.unsettled.lock().unwrap_or_else(PoisonError::into_inner))
                .into_iter()
                .collect();
        for (scope, user) in unsettled {
            self.changed(&scope, &user).await;
        }
    }

    /// The scope's present users, sorted by user id.
    ///
    /// # Errors
    /// [`BrokerError::Unavailable`] when the store cannot be reached; `Ok(None)` when presence
    /// is turned off.
    pub async fn list(&self, scope: &PresenceScope) -> Result<Option<Vec<PresentUser>>, BrokerError> {
        let Some(store) = &self.store else { return Ok(None) };
        let mut users = store.list(scope).await?;
        users.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        Ok(Some(users))
    }

    /// Keeps this instance's entries alive and announces the leave of users whose instance
    /// stopped keeping theirs (it crashed). Call it well within the presence TTL.
    pub async fn refresh(&self) {
        let Some(store) = &self.store else { return };
        let tenants = self.hub.local_users().into_iter().map(|(t, u, n)| (PresenceScope::tenant(t), u, n));
        let members = tenants.chain(self.hub.topic_presence_members());
        let mut scopes = BTreeSet::new();
        for (scope, user, connections) in members {
            match store.set(&scope, &user, connections).await {
                // An entry that had expired (Redis lost it, say) comes back as a join.
                Ok(change) => self.announce(&scope, &user, change).await,
                Err(error) => {
                    tracing::warn!(%error, "presence not refreshed; retrying at the next round");
                    return;
                }
            }
            scopes.insert(scope);
        }
        for scope in scopes {
            match store.sweep(&scope).await {
                Ok(gone) => {
                    for user in gone {
                        self.announce(&scope, &user, PresenceChange::Left).await;
                    }
                }
                Err(error) => tracing::warn!(%error, %scope, "presence not swept"),
            }
        }
    }

    async fn announce(&self, scope: &PresenceScope, user: &UserId, change: PresenceChange) {
        let kind = match change {
            PresenceChange::Joined => kind::PRESENCE_JOIN,
            PresenceChange::Left => kind::PRESENCE_LEAVE,
            PresenceChange::Unchanged => return,
        };
        let channel = Channel::Presence(scope.clone());
        let payload = raw_payload(&Who { user_id: user.as_str() });
        let envelope = self.frames.envelope(kind, payload, None, Some(channel.clone()));
        let metrics = crate::ports::NoMetrics;
        if let Err(error) = publish_timed(&*self.broker, &metrics, &channel, &envelope, None).await {
            tracing::warn!(%error, %scope, kind, "presence change not announced");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::{MockMessageBroker, MockPresence};
    use crate::use_cases::test_support::*;
    use domain::TenantId;
    use serde_json::Value;

    fn broker(announced: Arc<std::sync::Mutex<Vec<(String, String)>>>) -> MockMessageBroker {
        let mut broker = MockMessageBroker::new();
        broker.expect_subscribe().returning(|_| ());
        broker.expect_unsubscribe().returning(|_| ());
        broker.expect_until_active().returning(|_| ack_ok());
        broker.expect_history().returning(|_, _| Ok(crate::ports::HistoryRead::default()));
        broker.expect_publish().returning(move |channel, bytes| {
            let v: Value = serde_json::from_slice(&bytes).expect("json");
            let who = v["payload"]["user_id"].as_str().unwrap_or_default().to_owned();
            announced
                .lock()
                .expect("lock")
                .push((format!("{}@{}", v["type"].as_str().unwrap_or_default(), channel.name()), who));
            assert_eq!(v["channel"].as_str(), Some(channel.name().as_str()));
            Ok(None)
        });
        broker
    }

    #[tokio::test]
    async fn joins_and_leaves_are_announced_to_the_tenant_and_refresh_announces_expired_users() {
        let announced = Arc::new(std::sync::Mutex::new(Vec::new()));
        let broker: Arc<dyn MessageBroker> = Arc::new(broker(announced.clone()));
        let hub = Arc::new(Hub::new(broker.clone(), 10));
        let mut store = MockPresence::new();
        let mut calls = 0;
        store.expect_set().returning(move |_, _, n| {
            calls += 1;
            Ok(match (calls, n) {
                (1, 1) => PresenceChange::Joined,
                (_, 0) => PresenceChange::Left,
                _ => PresenceChange::Unchanged,
            })
        });
        store.expect_sweep().returning(|_| Ok(vec![UserId::parse("ghost").expect("valid")]));
        let presence = TrackPresence::new(Some(Arc::new(store)), hub.clone(), broker, frames());
        let acme = PresenceScope::tenant(TenantId::parse("acme").expect("valid"));
        let alice = UserId::parse("alice").expect("valid");
        let first = session(&hub, "alice", "acme").await;
        presence.changed(&acme, &alice).await;
        let second = session(&hub, "alice", "acme").await;
        presence.changed(&acme, &alice).await;
        presence.refresh().await;
        drop(first);
        drop(second);
        presence.changed(&acme, &alice).await;
        let got = announced.lock().expect("lock").clone();
        assert_eq!(
            got,
            [
                ("presence.join@presence:acme".to_owned(), "alice".to_owned()),
                ("presence.leave@presence:acme".to_owned(), "ghost".to_owned()),
                ("presence.leave@presence:acme".to_owned(), "alice".to_owned()),
            ]
        );
    }

    #[tokio::test]
    async fn without_a_store_nothing_is_tracked_or_listed() {
        let broker: Arc<dyn MessageBroker> = Arc::new(MockMessageBroker::new());
        let hub = Arc::new(Hub::new(broker.clone(), 10));
        let presence = TrackPresence::new(None, hub, broker, frames());
        assert!(!presence.is_on());
        let acme = PresenceScope::tenant(TenantId::parse("acme").expect("valid"));
        assert_eq!(presence.list(&acme).await, Ok(None));
        presence.refresh().await;
    }
}
