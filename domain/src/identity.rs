//! Who a token says the client is, and what it may do.

use std::sync::Arc;

use serde::Deserialize;

use crate::id::{IdError, TenantId, UserId};
use crate::permissions::{Caps, PermissionError};

/// The scope a token needs to open a client connection (the name predates other transports).
pub const SCOPE_WS_CONNECT: &str = "ws:connect";

/// The claims of a verified token that matter to the service. Signature, `exp` and `nbf` are
/// checked by the token verifier before these are looked at.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Claims {
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Space-separated scopes (OAuth 2.0 style).
    #[serde(default)]
    pub scope: Option<String>,
    /// Scopes as an array of strings.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Expiry, seconds since the Unix epoch (checked by the verifier; kept to end the
    /// connection when it passes).
    #[serde(default)]
    pub exp: Option<u64>,
    /// A connection token's permissions on topics (see [`crate::permissions`]).
    #[serde(default)]
    pub caps: Option<serde_json::Value>,
    /// A subscription token's topic name.
    #[serde(default)]
    pub channel: Option<String>,
    /// What a subscription token grants on its topic.
    #[serde(default)]
    pub allow: Option<serde_json::Value>,
}

/// Why claims do not make an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    #[error("token has neither user_id nor sub")]
    MissingUser,
    #[error("token has no tenant_id")]
    MissingTenant,
    #[error("token user: {0}")]
    InvalidUser(IdError),
    #[error("token tenant: {0}")]
    InvalidTenant(IdError),
    #[error("token caps: {0}")]
    InvalidCaps(PermissionError),
}

/// An authenticated client: a user of a tenant with a set of scopes and its caps on topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    user_id: UserId,
    tenant_id: TenantId,
    scopes: Vec<String>,
    expires_at: Option<u64>,
    /// `None`: no caps, nothing allowed on topics (kept out of line: most tokens have none).
    caps: Option<Arc<Caps>>,
}

impl Identity {
    /// Builds an identity from verified claims. `user_id` wins over `sub` when both are present.
    ///
    /// # Errors
    /// [`ClaimsError`] when the user or tenant is missing or not a valid id, or the caps are
    /// malformed.
    pub fn from_claims(claims: Claims) -> Result<Self, ClaimsError> {
        let user = claims.user_id.or(claims.sub).ok_or(ClaimsError::MissingUser)?;
        let user_id = UserId::parse(&user).map_err(ClaimsError::InvalidUser)?;
        let tenant = claims.tenant_id.ok_or(ClaimsError::MissingTenant)?;
        let tenant_id = TenantId::parse(&tenant).map_err(ClaimsError::InvalidTenant)?;
        let mut scopes: Vec<String> =
            claims.scope.as_deref().unwrap_or_default().split_whitespace().map(str::to_owned).collect();
        // An empty entry is no scope at all.
        scopes.extend(claims.scopes.unwrap_or_default().into_iter().filter(|s| !s.is_empty()));
        let caps = Caps::from_claim(claims.caps.as_ref()).map_err(ClaimsError::InvalidCaps)?;
        let caps = (!caps.is_empty()).then(|| Arc::new(caps));
        Ok(Self { user_id, tenant_id, scopes, expires_at: claims.exp, caps })
    }

    /// An identity with the given scopes, no caps and no expiry.
    pub fn new(user_id: UserId, tenant_id: TenantId, scopes: Vec<String>) -> Self {
        Self { user_id, tenant_id, scopes, expires_at: None, caps: None }
    }

    /// The token's caps on topics; `None` when it has none (nothing is allowed).
    pub fn caps(&self) -> Option<&Arc<Caps>> {
        self.caps.as_ref()
    }

    /// When the token that proved this identity expires, in seconds since the Unix epoch.
    pub fn expires_at(&self) -> Option<u64> {
        self.expires_at
    }

    /// Whether `other` is the same user of the same tenant.
    pub fn same_principal(&self, other: &Identity) -> bool {
        self.user_id == other.user_id && self.tenant_id == other.tenant_id
    }

    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    pub fn tenant_id(&self) -> &TenantId {
        &self.tenant_id
    }

    /// Whether the identity holds `scope` as a whole token: `ws:connect` is not granted by
    /// `ws:connect-admin` nor by `ws`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(user: Option<&str>, sub: Option<&str>, tenant: Option<&str>) -> Claims {
        Claims {
            user_id: user.map(Into::into),
            sub: sub.map(Into::into),
            tenant_id: tenant.map(Into::into),
            ..Claims::default()
        }
    }

    #[test]
    fn user_id_is_preferred_over_sub() {
        let id = Identity::from_claims(claims(Some("u1"), Some("s1"), Some("t"))).expect("valid");
        assert_eq!(id.user_id().as_str(), "u1");
        let id = Identity::from_claims(claims(None, Some("s1"), Some("t"))).expect("valid");
        assert_eq!(id.user_id().as_str(), "s1");
    }

    #[test]
    fn missing_or_invalid_user_and_tenant_are_rejected() {
        assert_eq!(Identity::from_claims(claims(None, None, Some("t"))), Err(ClaimsError::MissingUser));
        assert_eq!(Identity::from_claims(claims(Some("u"), None, None)), Err(ClaimsError::MissingTenant));
        assert!(matches!(
            Identity::from_claims(claims(Some("u:x"), None, Some("t"))),
            Err(ClaimsError::InvalidUser(_))
        ));
        assert!(matches!(
            Identity::from_claims(claims(Some("u"), None, Some("t*"))),
            Err(ClaimsError::InvalidTenant(_))
        ));
    }

    #[test]
    fn scopes_match_whole_space_separated_tokens_only() {
        let mut c = claims(Some("u"), None, Some("t"));
        c.scope = Some("read  ws:connect-admin\tws".into());
        let id = Identity::from_claims(c.clone()).expect("valid");
        assert!(!id.has_scope(SCOPE_WS_CONNECT));
        assert!(id.has_scope("ws"));
        c.scope = Some("read ws:connect".into());
        assert!(Identity::from_claims(c).expect("valid").has_scope(SCOPE_WS_CONNECT));
    }

    #[test]
    fn an_empty_scope_is_never_granted() {
        let mut c = claims(Some("u"), None, Some("t"));
        c.scopes = Some(vec![String::new(), "ws:connect".into()]);
        c.scope = Some("  ".into());
        let id = Identity::from_claims(c).expect("valid");
        assert!(!id.has_scope(""));
        assert!(id.has_scope("ws:connect"));
    }

    #[test]
    fn caps_come_with_the_identity_and_malformed_ones_refuse_it() {
        let mut c = claims(Some("u"), None, Some("t"));
        c.caps = Some(serde_json::json!([{"channels": ["orders"], "allow": ["sub"]}]));
        let id = Identity::from_claims(c.clone()).expect("valid");
        let orders = crate::TopicName::parse("orders").expect("valid");
        assert!(
            id.caps().is_some_and(|caps| caps.allows(&orders, crate::permissions::Capability::Subscribe))
        );
        c.caps = Some(serde_json::json!([{"channels": ["a:b"], "allow": ["sub"]}]));
        assert!(matches!(Identity::from_claims(c), Err(ClaimsError::InvalidCaps(_))));
        assert!(Identity::from_claims(claims(Some("u"), None, Some("t"))).expect("valid").caps().is_none());
    }

    #[test]
    fn scopes_may_come_as_an_array() {
        let mut c = claims(Some("u"), None, Some("t"));
        c.scopes = Some(vec!["ws:connect".into()]);
        assert!(Identity::from_claims(c).expect("valid").has_scope(SCOPE_WS_CONNECT));
    }
}
