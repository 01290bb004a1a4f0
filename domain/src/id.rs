//! Validated identifiers.
//!
//! Every id that can end up in a channel name is restricted to `[A-Za-z0-9._-]{1,128}`: no `:`
//! (the channel separator), no glob characters (`*`, `?`, `[`), no whitespace. That restriction is
//! what makes channel injection impossible, so once an id value exists nothing re-checks it.

use std::fmt;
use std::sync::Arc;

/// Longest accepted identifier, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} characters")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} may only contain {allowed}")]
    InvalidCharacter { kind: &'static str, allowed: &'static str },
}

/// The characters of an identifier, as error messages name them.
const ID_CHARACTERS: &str = "A-Z, a-z, 0-9, '.', '_' and '-'";

fn check(
    kind: &'static str,
    value: &str,
    max: usize,
    (allowed, described): (fn(u8) -> bool, &'static str),
) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    if !value.bytes().all(allowed) {
        return Err(IdError::InvalidCharacter { kind, allowed: described });
    }
    Ok(())
}

fn id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Parses and validates an identifier.
            ///
            /// # Errors
            /// [`IdError`] when the value is empty, longer than 128 bytes or holds a character
            /// outside `[A-Za-z0-9._-]`.
            pub fn parse(value: &str) -> Result<Self, IdError> {
                check($kind, value, MAX_ID_LEN, (id_byte, ID_CHARACTERS))?;
                Ok(Self(Arc::from(value)))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                Self::parse(&raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

identifier!(
    /// A tenant: the unit of isolation. No message crosses from one tenant to another.
    TenantId,
    "tenant id"
);
identifier!(
    /// A user within a tenant. Equal user ids in two tenants are two different users.
    UserId,
    "user id"
);
identifier!(
    /// A topic of a tenant, named by its clients: `orders`, `chat.room-1`. The same name in two
    /// tenants names two different topics.
    TopicName,
    "topic name"
);
identifier!(
    /// One client connection, unique within the cluster.
    ConnectionId,
    "connection id"
);
identifier!(
    /// One message, unique within the cluster.
    MessageId,
    "message id"
);

/// The name of a webhook provider as it appears in `POST /webhooks/{provider}`:
/// `[a-z0-9_-]{1,64}`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Provider(Arc<str>);

/// Longest accepted provider name, in bytes.
pub const MAX_PROVIDER_LEN: usize = 64;

impl Provider {
    /// Parses and validates a provider name.
    ///
    /// # Errors
    /// [`IdError`] when the value is empty, longer than 64 bytes or holds a character outside
    /// `[a-z0-9_-]`.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        check(
            "provider",
            value,
            MAX_PROVIDER_LEN,
            (
                |b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'),
                "a-z, 0-9, '_' and '-'",
            ),
        )?;
        Ok(Self(Arc::from(value)))
    }

    /// The provider name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Provider({:?})", &*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_of_letters_digits_dots_underscores_and_dashes_are_accepted() {
        for ok in ["a", "acme", "user-1", "A.b_C-9", &"x".repeat(128)] {
            assert_eq!(TenantId::parse(ok).map(|t| t.to_string()), Ok(ok.to_string()));
        }
    }

    #[test]
    fn ids_that_could_inject_a_channel_are_rejected() {
        for bad in ["a:b", "tenant*", "a?", "[a]", "a b", "a\tb", "a\nb", "é", "a/b"] {
            assert_eq!(
                UserId::parse(bad),
                Err(IdError::InvalidCharacter { kind: "user id", allowed: ID_CHARACTERS }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn empty_and_overlong_ids_are_rejected() {
        assert_eq!(TenantId::parse(""), Err(IdError::Empty { kind: "tenant id" }));
        assert_eq!(TenantId::parse(&"x".repeat(129)), Err(IdError::TooLong { kind: "tenant id", max: 128 }));
    }

    #[test]
    fn ids_deserialize_only_when_valid() {
        let ok: Result<UserId, _> = serde_json::from_str("\"bob\"");
        assert_eq!(ok.map(|u| u.to_string()).ok(), Some("bob".to_string()));
        let bad: Result<UserId, _> = serde_json::from_str("\"bob:admin\"");
        assert!(bad.is_err());
    }

    #[test]
    fn providers_are_lowercase_letters_digits_underscores_and_dashes() {
        assert!(Provider::parse("github").is_ok());
        assert!(Provider::parse("my_provider-2").is_ok());
        assert!(Provider::parse(&"p".repeat(64)).is_ok());
        assert!(Provider::parse(&"p".repeat(65)).is_err());
        assert!(Provider::parse("GitHub").is_err());
        assert!(Provider::parse("a.b").is_err());
        assert!(Provider::parse("").is_err());
    }
}
