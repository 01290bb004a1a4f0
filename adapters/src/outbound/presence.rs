//! `InMemoryPresence`: who is online, for a single instance (the in-process broker).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use application::ports::{BrokerError, Presence, PresenceChange, PresentUser};
use async_trait::async_trait;
use domain::{PresenceScope, UserId};

/// Connections per user, in this process. Nothing expires: this instance is the only one.
#[derive(Debug, Default)]
pub struct InMemoryPresence {
    users: Mutex<HashMap<PresenceScope, HashMap<UserId, usize>>>,
}

impl InMemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Presence for InMemoryPresence {
    async fn set(
        &self,
        scope: &PresenceScope,
        user: &UserId,
        connections: usize,
    ) -> Result<PresenceChange, BrokerError> {
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        let of_tenant = users.entry(scope.clone()).or_default();
        let before = of_tenant.get(user).copied().unwrap_or(0);
        if connections == 0 {
            of_tenant.remove(user);
            if of_tenant.is_empty() {
                users.remove(scope);
            }
        } else {
            of_tenant.insert(user.clone(), connections);
        }
        Ok(match (before, connections) {
            (0, n) if n > 0 => PresenceChange::Joined,
            (b, 0) if b > 0 => PresenceChange::Left,
            _ => PresenceChange::Unchanged,
        })
    }

    async fn list(&self, scope: &PresenceScope) -> Result<Vec<PresentUser>, BrokerError> {
        let users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(users.get(scope).map_or_else(Vec::new, |of_tenant| {
            of_tenant.iter().map(|(user, n)| PresentUser { user_id: user.clone(), connections: *n }).collect()
        }))
    }

    async fn sweep(&self, _scope: &PresenceScope) -> Result<Vec<UserId>, BrokerError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_connection_joins_the_last_leaves_and_the_list_counts_them() {
        let presence = InMemoryPresence::new();
        let acme = PresenceScope::tenant(domain::TenantId::parse("acme").expect("valid"));
        let alice = UserId::parse("alice").expect("valid");
        assert_eq!(presence.set(&acme, &alice, 1).await, Ok(PresenceChange::Joined));
        assert_eq!(presence.set(&acme, &alice, 2).await, Ok(PresenceChange::Unchanged));
        assert_eq!(
            presence.list(&acme).await,
            Ok(vec![PresentUser { user_id: alice.clone(), connections: 2 }])
        );
        assert_eq!(presence.set(&acme, &alice, 0).await, Ok(PresenceChange::Left));
        assert_eq!(presence.list(&acme).await, Ok(vec![]));
        assert_eq!(presence.set(&acme, &alice, 0).await, Ok(PresenceChange::Unchanged));
        let orders =
            PresenceScope::topic(acme.tenant.clone(), domain::TopicName::parse("orders").expect("valid"));
        assert_eq!(presence.set(&orders, &alice, 1).await, Ok(PresenceChange::Joined));
        assert_eq!(presence.list(&acme).await, Ok(vec![]), "a topic's members are not the tenant's");
    }
}
