//! Channels: where a message is published and who receives it.

use std::fmt;

use crate::id::{IdError, TenantId, UserId};

/// A channel a message travels on. Its wire name is also the broker channel name.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Channel {
    /// `tenant:{tenant_id}`: every connection of the tenant.
    Tenant(TenantId),
    /// `user:{tenant_id}:{user_id}`: every connection of one user of one tenant.
    User(TenantId, UserId),
    /// `global:broadcast`: every connection.
    Global,
    /// `system:events`: every connection; system-level notices.
    System,
}

/// Wire name of [`Channel::Global`].
pub const GLOBAL_CHANNEL: &str = "global:broadcast";
/// Wire name of [`Channel::System`].
pub const SYSTEM_CHANNEL: &str = "system:events";

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error(
        "unknown channel {0:?}: expected tenant:{{tenant}}, user:{{tenant}}:{{user}}, global:broadcast or system:events"
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
        Err(ChannelError::Unknown(name.chars().take(200).collect()))
    }

    /// Whether every connection of the instance listens on this channel.
    pub fn is_broadcast(&self) -> bool {
        matches!(self, Self::Global | Self::System)
    }

    /// The tenant a `tenant:` or `user:` channel belongs to; `None` for broadcasts.
    pub fn tenant(&self) -> Option<&TenantId> {
        match self {
            Self::Tenant(tenant) | Self::User(tenant, _) => Some(tenant),
            Self::Global | Self::System => None,
        }
    }

    /// Whether messages of this channel are kept in a history with offsets: `tenant:` and
    /// `user:` channels are, broadcasts are not.
    pub fn has_history(&self) -> bool {
        !self.is_broadcast()
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tenant(tenant) => write!(f, "tenant:{tenant}"),
            Self::User(tenant, user) => write!(f, "user:{tenant}:{user}"),
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
        for name in ["tenant:acme", "user:acme:bob", "global:broadcast", "system:events"] {
            assert_eq!(Channel::parse(name).map(|c| c.name()), Ok(name.to_string()));
        }
    }

    #[test]
    fn user_channels_are_scoped_by_tenant() {
        let bob = UserId::parse("bob").expect("valid user");
        assert_ne!(Channel::User(tenant("acme"), bob.clone()), Channel::User(tenant("globex"), bob));
    }

    #[test]
    fn malformed_names_are_rejected() {
        for bad in ["", "tenant:", "tenant:a:b", "user:acme", "user:a:b:c", "global", "tenant:*", "other:x"] {
            assert!(Channel::parse(bad).is_err(), "{bad:?}");
        }
    }
}
