//! Channels: where a message is published and who receives it.

use std::fmt;

use crate::id::{IdError, TenantId, TopicName, UserId};

/// A channel a message travels on. Its wire name is also the broker channel name.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Channel {
    /// `tenant:{tenant_id}`: every connection of the tenant.
    Tenant(TenantId),
    /// `user:{tenant_id}:{user_id}`: every connection of one user of one tenant.
    User(TenantId, UserId),
    /// `topic:{tenant_id}:{name}`: the connections of the tenant that subscribed to the topic.
    Topic(TenantId, TopicName),
    /// `presence:{tenant_id}` or `presence:{tenant_id}:{topic}`: the joins and leaves of a
    /// tenant or of one of its topics, for the connections that asked for them.
    Presence(PresenceScope),
    /// `global:broadcast`: every connection.
    Global,
    /// `system:events`: every connection; system-level notices.
    System,
}

/// Wire name of [`Channel::Global`].
pub const GLOBAL_CHANNEL: &str = "global:broadcast";
/// Wire name of [`Channel::System`].
pub const SYSTEM_CHANNEL: &str = "system:events";

/// Whose presence: a whole tenant, or the members of one of its topics.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct PresenceScope {
    pub tenant: TenantId,
    /// `None`: the tenant's.
    pub topic: Option<TopicName>,
}

impl PresenceScope {
    /// The presence of a whole tenant.
    pub fn tenant(tenant: TenantId) -> Self {
        Self { tenant, topic: None }
    }

    /// The presence of one topic of a tenant.
    pub fn topic(tenant: TenantId, topic: TopicName) -> Self {
        Self { tenant, topic: Some(topic) }
    }

    /// The channel whose members are present: the tenant's or the topic's.
    pub fn members(&self) -> Channel {
        match &self.topic {
            None => Channel::Tenant(self.tenant.clone()),
            Some(topic) => Channel::Topic(self.tenant.clone(), topic.clone()),
        }
    }
}

impl fmt::Display for PresenceScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.topic {
            None => write!(f, "presence:{}", self.tenant),
            Some(topic) => write!(f, "presence:{}:{topic}", self.tenant),
        }
    }
}

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error(
        "unknown channel {0:?}: expected tenant:{{tenant}}, user:{{tenant}}:{{user}}, topic:{{tenant}}:{{name}}, global:broadcast or system:events"
    )]
    Unknown(String),
    #[error("invalid channel: {0}")]
    InvalidId(#[from] IdError),
}

impl Channel {
    /// The channel's wire name, e.g. `tenant:acme`.
    pub fn name(&self) -> String {
        self.to_string()
    }

    /// Parses a wire name.
    ///
    /// # Errors
    /// [`ChannelError`] when the name has no known prefix or holds an invalid id.
    pub fn parse(name: &str) -> Result<Self, ChannelError> {
        match name {
            GLOBAL_CHANNEL => return Ok(Self::Global),
            SYSTEM_CHANNEL => return Ok(Self::System),
            _ => {}
        }
        if let Some(tenant) = name.strip_prefix("tenant:") {
            return Ok(Self::Tenant(TenantId::parse(tenant)?));
        }
        if let Some(rest) = name.strip_prefix("user:")
            && let Some((tenant, user)) = rest.split_once(':')
        {
            return Ok(Self::User(TenantId::parse(tenant)?, UserId::parse(user)?));
        }
        if let Some(rest) = name.strip_prefix("topic:")
            && let Some((tenant, topic)) = rest.split_once(':')
        {
            return Ok(Self::Topic(TenantId::parse(tenant)?, TopicName::parse(topic)?));
        }
        if let Some(rest) = name.strip_prefix("presence:") {
            let scope = match rest.split_once(':') {
                None => PresenceScope::tenant(TenantId::parse(rest)?),
                Some((tenant, topic)) => {
                    PresenceScope::topic(TenantId::parse(tenant)?, TopicName::parse(topic)?)
                }
            };
            return Ok(Self::Presence(scope));
        }
        Err(ChannelError::Unknown(name.chars().take(200).collect()))
    }

    /// Whether every connection of the instance listens on this channel.
    pub fn is_broadcast(&self) -> bool {
        matches!(self, Self::Global | Self::System)
    }

    /// Whether connections receive this channel only once they subscribed to it (topics, and
    /// presence announcements), rather than by being who they are.
    pub fn is_subscribed_to(&self) -> bool {
        matches!(self, Self::Topic(..) | Self::Presence(_))
    }

    /// The tenant a channel belongs to; `None` for broadcasts.
    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            Self::Tenant(tenant) | Self::User(tenant, _) | Self::Topic(tenant, _) => Some(tenant),
            Self::Presence(scope) => Some(&scope.tenant),
            Self::Global | Self::System => None,
        }
    }

    /// Whether messages of this channel are kept in a history with offsets: `tenant:`, `user:`
    /// and `topic:` channels are; broadcasts and presence announcements are not.
    pub fn has_history(&self) -> bool {
        matches!(self, Self::Tenant(_) | Self::User(..) | Self::Topic(..))
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tenant(tenant) => write!(f, "tenant:{tenant}"),
            Self::User(tenant, user) => write!(f, "user:{tenant}:{user}"),
            Self::Topic(tenant, topic) => write!(f, "topic:{tenant}:{topic}"),
            Self::Presence(scope) => scope.fmt(f),
            Self::Global => f.write_str(GLOBAL_CHANNEL),
            Self::System => f.write_str(SYSTEM_CHANNEL),
        }
    }
}

impl serde::Serialize for Channel {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(s: &str) -> TenantId {
        TenantId::parse(s).expect("valid tenant")
    }

    #[test]
    fn wire_names_follow_the_documented_scheme() {
        let user = UserId::parse("bob").expect("valid user");
        assert_eq!(Channel::Tenant(tenant("acme")).name(), "tenant:acme");
        assert_eq!(Channel::User(tenant("acme"), user).name(), "user:acme:bob");
        assert_eq!(Channel::Global.name(), "global:broadcast");
        assert_eq!(Channel::System.name(), "system:events");
    }

    #[test]
    fn wire_names_parse_back_to_the_same_channel() {
        for name in [
            "tenant:acme",
            "user:acme:bob",
            "topic:acme:chat.room-1",
            "presence:acme",
            "presence:acme:orders",
            "global:broadcast",
            "system:events",
        ] {
            assert_eq!(Channel::parse(name).map(|c| c.name()), Ok(name.to_string()));
        }
    }

    #[test]
    fn user_channels_are_scoped_by_tenant() {
        let bob = UserId::parse("bob").expect("valid user");
        assert_ne!(Channel::User(tenant("acme"), bob.clone()), Channel::User(tenant("globex"), bob));
    }

    #[test]
    fn topics_are_scoped_by_tenant_and_keep_a_history() {
        let orders = TopicName::parse("orders").expect("valid topic");
        let acme = Channel::Topic(tenant("acme"), orders.clone());
        assert_ne!(acme, Channel::Topic(tenant("globex"), orders.clone()));
        assert_eq!(acme.tenant(), Some(&tenant("acme")));
        assert!(acme.has_history() && acme.is_subscribed_to() && !acme.is_broadcast());
        let presence = Channel::Presence(PresenceScope::topic(tenant("acme"), orders));
        assert!(!presence.has_history() && presence.is_subscribed_to());
        let Channel::Presence(scope) = presence else { unreachable!() };
        assert_eq!(scope.members(), acme);
        assert_eq!(PresenceScope::tenant(tenant("acme")).members(), Channel::Tenant(tenant("acme")));
    }

    #[test]
    fn malformed_names_are_rejected() {
        for bad in [
            "",
            "tenant:",
            "tenant:a:b",
            "user:acme",
            "user:a:b:c",
            "global",
            "tenant:*",
            "other:x",
            "topic:acme",
            "topic:acme:",
            "topic:acme:a:b",
            "topic:acme:chat*",
            "presence:",
            "presence:a:b:c",
        ] {
            assert!(Channel::parse(bad).is_err(), "{bad:?}");
        }
    }
}
