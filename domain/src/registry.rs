//! The connection registry: which connections exist, whose they are, and which channels the
//! instance therefore needs.
//!
//! It is a plain data structure (no locks, no I/O); the application decides how to share it.
//! Its job beyond bookkeeping is to report transitions: registering the first connection of a
//! tenant (or of a user) means its channel must be subscribed; removing the last one means it
//! may be unsubscribed.

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

/// Connections and the seed's maps over them. `H` is whatever the caller uses to reach a
/// connection (a handle or sender); it is cloned into the per-tenant and per-user maps so that
/// a fan-out reaches each recipient without a second lookup.
#[derive(Debug)]
pub struct ConnectionRegistry<H> {
    connections: HashMap<ConnectionId, (ConnectionInfo, H)>,
    tenants: HashMap<TenantId, HashMap<ConnectionId, H>>,
    /// A user has few connections (`MAX_CONNECTIONS_PER_USER`): a short list costs less than a
    /// map per user.
    users: HashMap<(TenantId, UserId), Vec<(ConnectionId, H)>>,
}

impl<H> Default for ConnectionRegistry<H> {
    fn default() -> Self {
        Self { connections: HashMap::new(), tenants: HashMap::new(), users: HashMap::new() }
    }
}

impl<H: Clone> ConnectionRegistry<H> {
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
        }
        user.push((info.id.clone(), handle.clone()));
        slot.insert((info, handle));
        Ok(needed)
    }

    /// Removes a connection and returns it with the channels no longer needed by anyone: its
    /// tenant's channel if it was the tenant's last connection, its user's channel if it was
    /// the user's last one. `None` when the id is unknown.
    pub fn unregister(&mut self, id: &ConnectionId) -> Option<(ConnectionInfo, H, Vec<Channel>)> {
        let (info, handle) = self.connections.remove(id)?;
        let mut released = Vec::new();
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

    /// The handles of every connection that receives messages on `channel`.
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
            Channel::Global | Channel::System => Box::new(self.connections.values().map(|(_, h)| h)),
        }
    }

    /// How many tenant and user channels the registered connections need.
    pub fn channel_count(&self) -> usize {
        self.tenants.len() + self.users.len()
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
        self.connections.values().map(|(info, handle)| (info, handle))
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
        let mut reg = ConnectionRegistry::new();
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
        let mut reg = ConnectionRegistry::new();
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
        let mut reg = ConnectionRegistry::new();
        reg.register(info("c1", "bob", "acme"), 1).expect("new");
        assert!(reg.register(info("c1", "eve", "globex"), 2).is_err());
        assert_eq!(reg.len(), 1);
        assert_eq!(reg.channel_count(), 2);
    }

    #[test]
    fn recipients_are_exactly_the_channel_members() {
        let mut reg = ConnectionRegistry::new();
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
