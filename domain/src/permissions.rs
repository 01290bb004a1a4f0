//! What a client may do on the topics of its tenant: the `caps` of its connection token and
//! the grants of subscription tokens.
//!
//! ```json
//! "caps": [{"channels": ["orders", "chat.*"], "allow": ["sub", "pub", "presence"]},
//!          {"channels": ["*"], "allow": ["sub"]}]
//! ```
//! A rule's channel patterns are topic names, or a prefix followed by `*` (any suffix, the
//! empty one included). The first rule with a pattern that matches the topic decides; when none
//! matches, nothing is allowed.
//!
//! Checks cost the same whatever the size of the caps: [`Caps`] indexes exact names and
//! prefixes, so a check is at most one lookup per prefix length of the topic name (≤ 129).

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use serde::Deserialize;

use crate::id::{MAX_ID_LEN, TenantId, TopicName, UserId};
use crate::identity::Claims;

/// Most rules one token's `caps` may hold.
pub const MAX_CAP_RULES: usize = 64;
/// Most channel patterns one token's `caps` may hold, over all its rules.
pub const MAX_CAP_PATTERNS: usize = 1024;

/// One thing a client may do on a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// `sub`: subscribe and receive the topic's messages.
    Subscribe,
    /// `pub`: publish to the topic.
    Publish,
    /// `presence`: list the topic's members, and be one of them (announced when joining and
    /// leaving) by subscribing with `"presence": true`.
    Presence,
    /// `history`: read the topic's history.
    History,
}

impl Capability {
    const ALL: [Self; 4] = [Self::Subscribe, Self::Publish, Self::Presence, Self::History];

    /// The capability's name in tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscribe => "sub",
            Self::Publish => "pub",
            Self::Presence => "presence",
            Self::History => "history",
        }
    }

    /// Parses `sub`, `pub`, `presence` or `history`.
    ///
    /// # Errors
    /// [`PermissionError::UnknownCapability`] for anything else.
    pub fn parse(name: &str) -> Result<Self, PermissionError> {
        Self::ALL
            .into_iter()
            .find(|cap| cap.as_str() == name)
            .ok_or_else(|| PermissionError::UnknownCapability(name.chars().take(64).collect()))
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of capabilities.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Allowed(u8);

impl Allowed {
    /// Nothing allowed.
    pub const NONE: Self = Self(0);

    /// Only [`Capability::Subscribe`]: what a subscription token without `allow` grants.
    pub const SUBSCRIBE: Self = Self(1);

    /// Parses a list of capability names.
    ///
    /// # Errors
    /// [`PermissionError::UnknownCapability`] naming the first unknown one.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, PermissionError> {
        names.iter().try_fold(Self::NONE, |set, name| Ok(set.with(Capability::parse(name.as_ref())?)))
    }

    #[must_use]
    pub fn with(self, cap: Capability) -> Self {
        Self(self.0 | cap.bit())
    }

    /// Everything either set allows.
    #[must_use]
    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub fn contains(self, cap: Capability) -> bool {
        self.0 & cap.bit() != 0
    }
}

/// Why a token's `caps` or a subscription token cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermissionError {
    #[error("caps must be a list of {{\"channels\": [...], \"allow\": [...]}} rules: {0}")]
    Malformed(String),
    #[error("caps hold more than {MAX_CAP_RULES} rules or {MAX_CAP_PATTERNS} channel patterns")]
    TooMany,
    #[error(
        "invalid channel pattern {0:?}: a topic name, or a prefix of one followed by *, of A-Z a-z 0-9 . _ -"
    )]
    InvalidPattern(String),
    #[error("unknown capability {0:?}: expected sub, pub, presence or history")]
    UnknownCapability(String),
    #[error("a subscription token needs a string \"channel\" claim naming the topic")]
    MissingChannel,
    #[error("the subscription token is for topic {0:?}, not this one")]
    WrongChannel(String),
    #[error("the subscription token is for another user or tenant than this connection")]
    WrongPrincipal,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    channels: Vec<String>,
    allow: Vec<String>,
}

/// The `caps` of a connection token, indexed for checks in constant work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps {
    /// Exact topic name → (index of the first rule naming it, what it allows).
    exact: HashMap<Box<str>, (usize, Allowed)>,
    /// Prefix of a `prefix*` pattern → (index of the first rule with it, what it allows).
    prefixes: HashMap<Box<str>, (usize, Allowed)>,
    longest_prefix: usize,
}

impl Caps {
    /// Parses the `caps` claim (absent or `null`: no caps, nothing allowed).
    ///
    /// # Errors
    /// [`PermissionError`] naming what is wrong: the shape, a pattern, a capability, or more
    /// than [`MAX_CAP_RULES`] rules or [`MAX_CAP_PATTERNS`] patterns.
    pub fn from_claim(claim: Option<&serde_json::Value>) -> Result<Self, PermissionError> {
        let Some(claim) = claim.filter(|c| !c.is_null()) else { return Ok(Self::default()) };
        let rules = Vec::<Rule>::deserialize(claim).map_err(|e| PermissionError::Malformed(e.to_string()))?;
        if rules.len() > MAX_CAP_RULES
            || rules.iter().map(|r| r.channels.len()).sum::<usize>() > MAX_CAP_PATTERNS
        {
            return Err(PermissionError::TooMany);
        }
        let mut caps = Self::default();
        for (index, rule) in rules.iter().enumerate() {
            let allowed = Allowed::parse(&rule.allow)?;
            for pattern in &rule.channels {
                let (map, key) = match pattern.strip_suffix('*') {
                    Some(prefix) if prefix.is_empty() || TopicName::parse(prefix).is_ok() => {
                        caps.longest_prefix = caps.longest_prefix.max(prefix.len());
                        (&mut caps.prefixes, prefix)
                    }
                    None if TopicName::parse(pattern).is_ok() => (&mut caps.exact, pattern.as_str()),
                    _ => return Err(PermissionError::InvalidPattern(pattern.chars().take(140).collect())),
                };
                if let Entry::Vacant(slot) = map.entry(key.into()) {
                    slot.insert((index, allowed));
                }
            }
        }
        Ok(caps)
    }

    /// What the first rule matching `topic` allows; nothing when no rule matches.
    pub fn allowed(&self, topic: &TopicName) -> Allowed {
        let name = topic.as_str();
        let mut first = self.exact.get(name).copied();
        for len in 0..=self.longest_prefix.min(name.len()).min(MAX_ID_LEN) {
            if let Some(&(index, allowed)) = name.get(..len).and_then(|prefix| self.prefixes.get(prefix))
                && first.is_none_or(|(best, _)| index < best)
            {
                first = Some((index, allowed));
            }
        }
        first.map_or(Allowed::NONE, |(_, allowed)| allowed)
    }

    /// Whether `cap` is allowed on `topic`.
    pub fn allows(&self, topic: &TopicName, cap: Capability) -> bool {
        self.allowed(topic).contains(cap)
    }

    /// Whether the caps allow nothing at all.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

/// What a subscription token grants a connection of `user` of `tenant` on `topic`.
///
/// # Errors
/// [`PermissionError::MissingChannel`] or [`PermissionError::WrongChannel`] for a token of
/// another topic, [`PermissionError::WrongPrincipal`] for another user or tenant,
/// [`PermissionError::UnknownCapability`] for an `allow` it cannot understand.
pub fn subscription_grant(
    claims: &Claims,
    tenant: &TenantId,
    user: &UserId,
    topic: &TopicName,
) -> Result<Allowed, PermissionError> {
    let channel = claims.channel.as_deref().ok_or(PermissionError::MissingChannel)?;
    if channel != topic.as_str() {
        return Err(PermissionError::WrongChannel(channel.chars().take(140).collect()));
    }
    let claimed_user = claims.user_id.as_deref().or(claims.sub.as_deref());
    if claimed_user != Some(user.as_str()) || claims.tenant_id.as_deref() != Some(tenant.as_str()) {
        return Err(PermissionError::WrongPrincipal);
    }
    match claims.allow.as_ref().filter(|allow| !allow.is_null()) {
        None => Ok(Allowed::SUBSCRIBE),
        Some(allow) => {
            let names = Vec::<String>::deserialize(allow).map_err(|_| {
                PermissionError::Malformed("allow must be a list of capability names".to_owned())
            })?;
            Allowed::parse(&names)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn topic(name: &str) -> TopicName {
        TopicName::parse(name).expect("valid topic")
    }

    fn caps(value: serde_json::Value) -> Caps {
        Caps::from_claim(Some(&value)).expect("valid caps")
    }

    #[test]
    fn exact_names_and_prefixes_match_and_anything_else_is_refused() {
        let caps = caps(json!([{"channels": ["orders", "chat.*"], "allow": ["sub", "pub"]}]));
        assert!(caps.allows(&topic("orders"), Capability::Subscribe));
        assert!(caps.allows(&topic("chat.room-1"), Capability::Publish));
        assert!(caps.allows(&topic("chat."), Capability::Subscribe), "* matches the empty suffix");
        assert!(!caps.allows(&topic("chat"), Capability::Subscribe));
        assert!(!caps.allows(&topic("orders.eu"), Capability::Subscribe));
        assert!(!caps.allows(&topic("orders"), Capability::Presence));
        assert_eq!(caps.allowed(&topic("billing")), Allowed::NONE);
    }

    #[test]
    fn the_first_matching_rule_decides_even_when_a_later_one_allows_more() {
        let caps = caps(json!([
            {"channels": ["chat.secret"], "allow": []},
            {"channels": ["chat.*"], "allow": ["sub", "presence"]},
            {"channels": ["*"], "allow": ["sub", "pub", "presence", "history"]},
            {"channels": ["chat.secret"], "allow": ["pub"]},
        ]));
        assert_eq!(caps.allowed(&topic("chat.secret")), Allowed::NONE);
        assert!(caps.allows(&topic("chat.lobby"), Capability::Presence));
        assert!(!caps.allows(&topic("chat.lobby"), Capability::Publish), "the chat.* rule comes first");
        assert!(caps.allows(&topic("news"), Capability::History));
    }

    #[test]
    fn a_longer_prefix_in_a_later_rule_does_not_override_an_earlier_shorter_one() {
        let caps = caps(json!([
            {"channels": ["a*"], "allow": ["sub"]},
            {"channels": ["ab*"], "allow": ["pub"]},
        ]));
        assert_eq!(caps.allowed(&topic("abc")), Allowed::SUBSCRIBE);
    }

    #[test]
    fn no_caps_allow_nothing() {
        let none = Caps::from_claim(None).expect("absent");
        assert!(none.is_empty());
        assert!(!none.allows(&topic("orders"), Capability::Subscribe));
        assert_eq!(Caps::from_claim(Some(&serde_json::Value::Null)), Ok(Caps::default()));
    }

    #[test]
    fn malformed_caps_are_refused_with_what_is_wrong() {
        let cases = [
            (json!({"channels": ["a"], "allow": ["sub"]}), "Malformed"),
            (json!([{"channels": ["a"]}]), "Malformed"),
            (json!([{"channels": ["a"], "allow": ["sub"], "extra": 1}]), "Malformed"),
            (json!([{"channels": ["a:b"], "allow": ["sub"]}]), "InvalidPattern"),
            (json!([{"channels": ["*a"], "allow": ["sub"]}]), "InvalidPattern"),
            (json!([{"channels": ["a**"], "allow": ["sub"]}]), "InvalidPattern"),
            (json!([{"channels": [""], "allow": ["sub"]}]), "InvalidPattern"),
            (json!([{"channels": ["a"], "allow": ["admin"]}]), "UnknownCapability"),
        ];
        for (value, expected) in cases {
            let error = Caps::from_claim(Some(&value)).expect_err("refused");
            assert!(format!("{error:?}").starts_with(expected), "{value}: {error:?}");
        }
        let too_many: Vec<_> = (0..=MAX_CAP_RULES).map(|_| json!({"channels": ["a"], "allow": []})).collect();
        assert_eq!(Caps::from_claim(Some(&json!(too_many))), Err(PermissionError::TooMany));
    }

    #[test]
    fn a_subscription_token_grants_its_topic_to_its_user_only() {
        let (acme, bob, orders) =
            (TenantId::parse("acme").expect("valid"), UserId::parse("bob").expect("valid"), topic("orders"));
        let claims = Claims {
            sub: Some("bob".into()),
            tenant_id: Some("acme".into()),
            channel: Some("orders".into()),
            ..Claims::default()
        };
        assert_eq!(subscription_grant(&claims, &acme, &bob, &orders), Ok(Allowed::SUBSCRIBE));
        let with_allow = Claims { allow: Some(json!(["sub", "presence"])), ..claims.clone() };
        let granted = subscription_grant(&with_allow, &acme, &bob, &orders).expect("granted");
        assert!(granted.contains(Capability::Presence) && !granted.contains(Capability::Publish));
        assert_eq!(
            subscription_grant(&claims, &acme, &bob, &topic("billing")),
            Err(PermissionError::WrongChannel("orders".into()))
        );
        let eve = UserId::parse("eve").expect("valid");
        assert_eq!(subscription_grant(&claims, &acme, &eve, &orders), Err(PermissionError::WrongPrincipal));
        let globex = TenantId::parse("globex").expect("valid");
        assert_eq!(subscription_grant(&claims, &globex, &bob, &orders), Err(PermissionError::WrongPrincipal));
        let bad_allow = Claims { allow: Some(json!("sub")), ..claims.clone() };
        assert!(matches!(
            subscription_grant(&bad_allow, &acme, &bob, &orders),
            Err(PermissionError::Malformed(_))
        ));
        let no_channel = Claims { channel: None, ..claims };
        assert_eq!(
            subscription_grant(&no_channel, &acme, &bob, &orders),
            Err(PermissionError::MissingChannel)
        );
    }
}
