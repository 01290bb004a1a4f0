//! Which web pages may open a client session: the `Origin` rule against cross-site hijacking.

use std::collections::HashSet;

/// The origins whose pages may connect. A request without an `Origin` (not a browser page) is
/// never refused by it; browsers send one on every request a page opens to another origin and
/// on every request that upgrades to another protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OriginPolicy {
    /// Every origin (no `ALLOWED_ORIGINS`).
    #[default]
    Any,
    /// Only these, matched exactly (scheme, host and port).
    Only(HashSet<String>),
}

impl OriginPolicy {
    /// Whether a request from `origin` (none: not a browser page) may connect.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match (self, origin) {
            (Self::Any, _) | (Self::Only(_), None) => true,
            (Self::Only(allowed), Some(origin)) => allowed.contains(origin),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_and_requests_without_one_pass() {
        let policy = OriginPolicy::Only(["https://app.example.com".to_owned()].into());
        assert!(policy.allows(None), "no Origin: not a browser");
        for (origin, ok) in [
            ("https://app.example.com", true),
            ("https://app.example.com.evil.test", false),
            ("http://app.example.com", false),
            ("null", false),
        ] {
            assert_eq!(policy.allows(Some(origin)), ok, "{origin}");
            assert!(OriginPolicy::Any.allows(Some(origin)), "unset: every origin");
        }
    }
}
