//! The connection registry: which connections exist, whose they are, and which channels the
//! instance therefore needs.
//!
//! It is a plain data structure (no locks, no I/O); the application decides how to share it.
//! Its job beyond bookkeeping is to report transitions: registering the first connection of a
//! tenant (or of a user) means its channel must be subscribed; removing the last one means it
//! may be unsubscribed. The same holds for the channels connections subscribe to (topics,
//! presence announcements): the first subscriber needs the channel, the last one releases it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use crate::channel::Channel;
use crate::id::{ConnectionId, TenantId, UserId};
use crate::time::Timestamp;

/// What is known about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub id: ConnectionId,
    pub user_id: UserId,
    pub tenant_id: TenantId,
    pub connected_at: Timestamp,
}

/// Why a connection cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("connection {0} is already registered")]
    Duplicate(ConnectionId),
}

/// Why a connection cannot subscribe to a channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("the connection is not registered")]
    UnknownConnection,
    #[error("already subscribed to {0}")]
    Already(Channel),
    #[error("at most {0} topic subscriptions per connection")]
    Limit(usize),
}

/// A registered connection: what is known about it, its handle, and the channels it
/// subscribed to.
#[derive(Debug)]
struct Registered<H> {
    info: ConnectionInfo,
    handle: H,
    subscribed: Vec<Channel>,
}

/// The subscribers of one channel.
#[derive(Debug)]
struct Members<S> {
    connections: HashMap<ConnectionId, (UserId, S)>,
    /// Subscribed connections per user; kept for presence channels only (their members are
    /// what presence counts).
    users: HashMap<UserId, usize>,
}

/// Connections and the seed's maps over them. `H` is whatever the caller uses to reach a
/// connection (a handle or sender); it is cloned into the per-tenant and per-user maps so that
/// a fan-out reaches each recipient without a second lookup. `S` is what it uses to reach one
/// subscription of a connection.
#[derive(Debug)]
pub struct ConnectionRegistry<H, S = H> {
    connections: HashMap<ConnectionId, Registered<H>>,
    tenants: HashMap<TenantId, HashMap<ConnectionId, H>>,
    /// A user has few connections (`MAX_CONNECTIONS_PER_USER`): a short list costs less than a
    /// map per user.
    users: HashMap<(TenantId, UserId), Vec<(ConnectionId, H)>>,
    /// Channels connections subscribed to (topics, presence announcements).
    subscribed: HashMap<Channel, Members<S>>,
    /// Subscriptions to topics, over every connection.
    topic_subscriptions: usize,
}

impl<H, S> Default for ConnectionRegistry<H, S> {
    fn default() -> Self {
        Self {
            connections: HashMap::new(),
            tenants: HashMap::new(),
            users: HashMap::new(),
            subscribed: HashMap::new(),
            topic_subscriptions: 0,
        }
    }
}

impl<H: Clone, S> ConnectionRegistry<H, S> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a connection and returns the channels that became needed by it: its tenant's
    /// channel if it is the tenant's first connection, its user's channel if it is the user's
    /// first connection.
    ///
    /// # Errors
    /// [`RegistryError::Duplicate`] when the id is already registered; nothing changes then.
    pub fn register(&mut self, info: ConnectionInfo, handle: H) -> Result<Vec<Channel>, RegistryError> {
        let Entry::Vacant(slot) = self.connections.entry(info.id.clone()) else {
            return Err(RegistryError::Duplicate(info.id));
        };
        let mut needed = Vec::new();
        let tenant = self.tenants.entry(info.tenant_id.clone()).or_default();
        if tenant.is_empty() {
            needed.push(Channel::Tenant(info.tenant_id.clone()));
        }
        tenant.insert(info.id.clone(), handle.clone());
        let user_key = (info.tenant_id.clone(), info.user_id.clone());
        let user = self.users.entry(user_key).or_default();
        if user.is_empty() {
            needed.push(Channel::User(info.tenant_id.clone(), info.user_id.clone()));
            // Most users hold one connection: room for one, not the four of a first push.
            user.reserve_exact(1);
        }
        user.push((info.id.clone(), handle.clone()));
        slot.insert(Registered { info, handle, subscribed: Vec::new() });
        Ok(needed)
    }

    /// Subscribes connection `id` to `channel` (a topic or presence channel), reached through
    /// `handle`; returns whether the channel became needed by it (its first subscriber).
    /// `max_topics` bounds the connection's topic subscriptions (0: no bound).
    ///
    /// # Errors
    /// [`SubscribeError`]; nothing changes then.
    pub fn subscribe(
        &mut self,
        id: &ConnectionId,
        channel: Channel,
        handle: S,
        max_topics: usize,
    ) -> Result<bool, SubscribeError> {
        let registered = self.connections.get_mut(id).ok_or(SubscribeError::UnknownConnection)?;
        if registered.subscribed.contains(&channel) {
            return Err(SubscribeError::Already(channel));
        }
        if matches!(channel, Channel::Topic(..))
            && max_topics > 0
            && registered.subscribed.iter().filter(|c| matches!(c, Channel::Topic(..))).count() >= max_topics
        {
            return Err(SubscribeError::Limit(max_topics));
        }
        registered.subscribed.push(channel.clone());
        if matches!(channel, Channel::Topic(..)) {
            self.topic_subscriptions += 1;
        }
        let user = registered.info.user_id.clone();
        let counted = matches!(channel, Channel::Presence(_));
        let members = self
            .subscribed
            .entry(channel)
            .or_insert_with(|| Members { connections: HashMap::new(), users: HashMap::new() });
        let needed = members.connections.is_empty();
        if counted {
            *members.users.entry(user.clone()).or_default() += 1;
        }
        members.connections.insert(id.clone(), (user, handle));
        Ok(needed)
    }

    /// Ends connection `id`'s subscription to `channel`; returns its handle and whether the
    /// channel is no longer needed by anyone. `None` when there was no such subscription.
    pub fn unsubscribe(&mut self, id: &ConnectionId, channel: &Channel) -> Option<(S, bool)> {
        let registered = self.connections.get_mut(id)?;
        let at = registered.subscribed.iter().position(|c| c == channel)?;
        registered.subscribed.swap_remove(at);
        self.remove_member(id, channel)
    }

    fn remove_member(&mut self, id: &ConnectionId, channel: &Channel) -> Option<(S, bool)> {
        let Entry::Occupied(mut members) = self.subscribed.entry(channel.clone()) else { return None };
        let (user, handle) = members.get_mut().connections.remove(id)?;
        if matches!(channel, Channel::Topic(..)) {
            self.topic_subscriptions -= 1;
        }
        if let Entry::Occupied(mut count) = members.get_mut().users.entry(user) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
        let released = members.get().connections.is_empty();
        if released {
            members.remove();
        }
        Some((handle, released))
    }

    /// Subscriptions to topics, over every connection.
    pub fn topic_subscriptions(&self) -> usize {
        self.topic_subscriptions
    }

    /// The channels connection `id` subscribed to.
    pub fn subscriptions_of(&self, id: &ConnectionId) -> &[Channel] {
        self.connections.get(id).map_or(&[], |registered| &registered.subscribed)
    }

    /// The subscribers of `channel`, with their connection ids.
    pub fn subscribers<'a>(
        &'a self,
        channel: &Channel,
    ) -> impl Iterator<Item = (&'a ConnectionId, &'a S)> + 'a {
        self.subscribed
            .get(channel)
            .into_iter()
            .flat_map(|members| members.connections.iter().map(|(id, (_, handle))| (id, handle)))
    }

    /// How many connections of `user` subscribed to presence channel `channel`.
    pub fn subscribed_connections_of(&self, channel: &Channel, user: &UserId) -> usize {
        self.subscribed.get(channel).and_then(|members| members.users.get(user)).copied().unwrap_or(0)
    }

    /// Every presence channel with subscribers, with each subscribed user and how many of its
    /// connections are.
    pub fn presence_members(&self) -> impl Iterator<Item = (&Channel, &UserId, usize)> + '_ {
        self.subscribed
            .iter()
            .flat_map(|(channel, members)| members.users.iter().map(move |(user, n)| (channel, user, *n)))
    }

    /// Removes a connection and its subscriptions, and returns it with the channels no longer
    /// needed by anyone: those it was the last subscriber of, its tenant's channel if it was
    /// the tenant's last connection, its user's channel if it was the user's last one. `None`
    /// when the id is unknown.
    pub fn unregister(&mut self, id: &ConnectionId) -> Option<(ConnectionInfo, H, Vec<Channel>)> {
        let Registered { info, handle, subscribed } = self.connections.remove(id)?;
        let mut released = Vec::new();
        for channel in subscribed {
            if let Some((_, true)) = self.remove_member(id, &channel) {
                released.push(channel);
            }
        }
        if let Entry::Occupied(mut tenant) = self.tenants.entry(info.tenant_id.clone()) {
            tenant.get_mut().remove(id);
            if tenant.get().is_empty() {
                tenant.remove();
                released.push(Channel::Tenant(info.tenant_id.clone()));
            }
        }
        if let Entry::Occupied(mut user) = self.users.entry((info.tenant_id.clone(), info.user_id.clone())) {
            user.get_mut().retain(|(other, _)| other != id);
            if user.get().is_empty() {
                user.remove();
                released.push(Channel::User(info.tenant_id.clone(), info.user_id.clone()));
            }
        }
        Some((info, handle, released))
    }

    /// The handles of every connection that receives messages on `channel` by being who it is:
    /// its tenant's, its user's and the broadcasts (see [`Self::subscribers`] for the others).
    pub fn recipients<'a>(&'a self, channel: &Channel) -> Box<dyn Iterator<Item = &'a H> + 'a> {
        match channel {
            Channel::Tenant(tenant) => match self.tenants.get(tenant) {
                Some(map) => Box::new(map.values()),
                None => Box::new(std::iter::empty()),
            },
            Channel::User(tenant, user) => match self.users.get(&(tenant.clone(), user.clone())) {
                Some(list) => Box::new(list.iter().map(|(_, h)| h)),
                None => Box::new(std::iter::empty()),
            },
            Channel::Global | Channel::System => Box::new(self.connections.values().map(|r| &r.handle)),
            Channel::Topic(..) | Channel::Presence(_) => Box::new(std::iter::empty()),
        }
    }

    /// How many tenant, user and subscribed channels the registered connections need.
    pub fn channel_count(&self) -> usize {
        self.tenants.len() + self.users.len() + self.subscribed.len()
    }

    /// How many connections `user` of `tenant` has.
    pub fn connections_of(&self, tenant: &TenantId, user: &UserId) -> usize {
        self.users.get(&(tenant.clone(), user.clone())).map_or(0, Vec::len)
    }

    /// Every user with a connection, with how many it has.
    pub fn users(&self) -> impl Iterator<Item = (&TenantId, &UserId, usize)> + '_ {
        self.users.iter().map(|((tenant, user), list)| (tenant, user, list.len()))
    }

    /// Every registered connection.
    pub fn iter(&self) -> impl Iterator<Item = (&ConnectionInfo, &H)> + '_ {
        self.connections.values().map(|registered| (&registered.info, &registered.handle))
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, user: &str, tenant: &str) -> ConnectionInfo {
        ConnectionInfo {
            id: ConnectionId::parse(id).expect("valid"),
            user_id: UserId::parse(user).expect("valid"),
            tenant_id: TenantId::parse(tenant).expect("valid"),
            connected_at: Timestamp::from_unix_millis(0),
        }
    }

    fn names(channels: &[Channel]) -> Vec<String> {
        channels.iter().map(Channel::name).collect()
    }

    #[test]
    fn the_first_connection_of_a_tenant_and_of_a_user_needs_their_channels() {
        let mut reg: ConnectionRegistry<i32> = ConnectionRegistry::new();
        let first = reg.register(info("c1", "bob", "acme"), 1).expect("new");
        assert_eq!(names(&first), ["tenant:acme", "user:acme:bob"]);
        let second_same_user = reg.register(info("c2", "bob", "acme"), 2).expect("new");
        assert!(second_same_user.is_empty());
        let other_user = reg.register(info("c3", "eve", "acme"), 3).expect("new");
        assert_eq!(names(&other_user), ["user:acme:eve"]);
        let other_tenant_same_user = reg.register(info("c4", "bob", "globex"), 4).expect("new");
        assert_eq!(names(&other_tenant_same_user), ["tenant:globex", "user:globex:bob"]);
    }

    #[test]
    fn the_last_connection_leaving_releases_the_channels() {
        let mut reg: ConnectionRegistry<i32> = ConnectionRegistry::new();
        reg.register(info("c1", "bob", "acme"), 1).expect("new");
        reg.register(info("c2", "eve", "acme"), 2).expect("new");
        let (_, handle, released) =
            reg.unregister(&ConnectionId::parse("c1").expect("valid")).expect("known");
        assert_eq!(handle, 1);
        assert_eq!(names(&released), ["user:acme:bob"]);
        let (_, _, released) = reg.unregister(&ConnectionId::parse("c2").expect("valid")).expect("known");
        assert_eq!(names(&released), ["tenant:acme", "user:acme:eve"]);
        assert!(reg.is_empty());
        assert_eq!(reg.channel_count(), 0);
        assert!(reg.unregister(&ConnectionId::parse("c2").expect("valid")).is_none());
    }

    #[test]
    fn duplicates_are_refused_without_changing_anything() {
        let mut reg: ConnectionRegistry<i32> = ConnectionRegistry::new();
        reg.register(info("c1", "bob", "acme"), 1).expect("new");
        assert!(reg.register(info("c1", "eve", "globex"), 2).is_err());
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.channel_count(), 2);
    }

    fn topic(tenant: &str, name: &str) -> Channel {
        Channel::parse(&format!("topic:{tenant}:{name}")).expect("valid")
    }

    fn id(text: &str) -> ConnectionId {
        ConnectionId::parse(text).expect("valid")
    }

    #[test]
    fn the_first_subscriber_needs_a_topic_and_the_last_one_releases_it() {
        let mut reg: ConnectionRegistry<i32> = ConnectionRegistry::new();
        reg.register(info("c1", "bob", "acme"), 1).expect("new");
        reg.register(info("c2", "eve", "acme"), 2).expect("new");
        let orders = topic("acme", "orders");
        assert_eq!(reg.subscribe(&id("c1"), orders.clone(), 10, 0), Ok(true));
        assert_eq!(reg.subscribe(&id("c2"), orders.clone(), 20, 0), Ok(false));
        let mut got: Vec<i32> = reg.subscribers(&orders).map(|(_, s)| *s).collect();
        got.sort_unstable();
        assert_eq!(got, [10, 20]);
        assert_eq!(reg.recipients(&orders).count(), 0, "subscribers only");
        assert_eq!(reg.unsubscribe(&id("c1"), &orders), Some((10, false)));
        assert_eq!(reg.unsubscribe(&id("c1"), &orders), None);
        assert_eq!(reg.unsubscribe(&id("c2"), &orders), Some((20, true)));
        assert_eq!(reg.subscribers(&orders).count(), 0);
        assert_eq!(reg.channel_count(), 3, "tenant and two users");
    }

    #[test]
    fn a_connection_leaving_releases_the_topics_it_was_the_last_subscriber_of() {
        let mut reg: ConnectionRegistry<i32> = ConnectionRegistry::new();
        reg.register(info("c1", "bob", "acme"), 1).expect("new");
        reg.register(info("c2", "eve", "acme"), 2).expect("new");
        let (orders, chat) = (topic("acme", "orders"), topic("acme", "chat"));
        reg.subscribe(&id("c1"), orders.clone(), 10, 0).expect("subscribed");
        reg.subscribe(&id("c1"), chat.clone(), 11, 0).expect("subscribed");
        reg.subscribe(&id("c2"), chat.clone(), 20, 0).expect("subscribed");
        assert_eq!(reg.subscriptions_of(&id("c1")), [orders.clone(), chat.clone()]);
        let (_, _, released) = reg.unregister(&id("c1")).expect("known");
        assert_eq!(names(&released), ["topic:acme:orders", "user:acme:bob"]);
        assert_eq!(reg.subscribers(&chat).count(), 1);
        assert_eq!(reg.topic_subscriptions(), 1);
    }

    #[test]
    fn subscriptions_are_refused_twice_beyond_the_limit_and_for_unknown_connections() {
        let mut reg: ConnectionRegistry<i32> = ConnectionRegistry::new();
        reg.register(info("c1", "bob", "acme"), 1).expect("new");
        reg.subscribe(&id("c1"), topic("acme", "a"), 1, 2).expect("first");
        assert_eq!(
            reg.subscribe(&id("c1"), topic("acme", "a"), 1, 2),
            Err(SubscribeError::Already(topic("acme", "a")))
        );
        reg.subscribe(&id("c1"), topic("acme", "b"), 1, 2).expect("second");
        assert_eq!(reg.subscribe(&id("c1"), topic("acme", "c"), 1, 2), Err(SubscribeError::Limit(2)));
        let presence = Channel::parse("presence:acme:a").expect("valid");
        assert_eq!(reg.subscribe(&id("c1"), presence, 1, 2), Ok(true), "presence is not a topic");
        assert_eq!(
            reg.subscribe(&id("nobody"), topic("acme", "a"), 1, 2),
            Err(SubscribeError::UnknownConnection)
        );
        assert_eq!(reg.subscriptions_of(&id("c1")).len(), 3);
    }

    #[test]
    fn presence_channels_count_their_subscribers_per_user() {
        let mut reg: ConnectionRegistry<i32> = ConnectionRegistry::new();
        reg.register(info("c1", "bob", "acme"), 1).expect("new");
        reg.register(info("c2", "bob", "acme"), 2).expect("new");
        reg.register(info("c3", "eve", "acme"), 3).expect("new");
        let presence = Channel::parse("presence:acme:chat").expect("valid");
        for c in ["c1", "c2", "c3"] {
            reg.subscribe(&id(c), presence.clone(), 0, 0).expect("subscribed");
        }
        let bob = UserId::parse("bob").expect("valid");
        assert_eq!(reg.subscribed_connections_of(&presence, &bob), 2);
        let mut members: Vec<_> = reg.presence_members().map(|(_, user, n)| (user.to_string(), n)).collect();
        members.sort();
        assert_eq!(members, [("bob".to_owned(), 2), ("eve".to_owned(), 1)]);
        reg.unregister(&id("c1"));
        assert_eq!(reg.subscribed_connections_of(&presence, &bob), 1);
        reg.unsubscribe(&id("c2"), &presence);
        assert_eq!(reg.subscribed_connections_of(&presence, &bob), 0);
        assert_eq!(reg.presence_members().count(), 1);
    }

    #[test]
    fn recipients_are_exactly_the_channel_members() {
        let mut reg: ConnectionRegistry<i32> = ConnectionRegistry::new();
        reg.register(info("c1", "bob", "acme"), 1).expect("new");
        reg.register(info("c2", "eve", "acme"), 2).expect("new");
        reg.register(info("c3", "bob", "globex"), 3).expect("new");
        let sorted = |channel: Channel| {
            let mut v: Vec<i32> = reg.recipients(&channel).copied().collect();
            v.sort_unstable();
            v
        };
        let acme = TenantId::parse("acme").expect("valid");
        let bob = UserId::parse("bob").expect("valid");
        assert_eq!(sorted(Channel::Tenant(acme.clone())), [1, 2]);
        assert_eq!(sorted(Channel::User(acme, bob)), [1]);
        assert_eq!(sorted(Channel::Tenant(TenantId::parse("none").expect("valid"))), Vec::<i32>::new());
        assert_eq!(sorted(Channel::Global), [1, 2, 3]);
        assert_eq!(sorted(Channel::System), [1, 2, 3]);
    }
}
