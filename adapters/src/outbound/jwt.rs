//! JSON Web Tokens: `JwtVerifier` for clients' tokens and `JwtIssuer` for the `token` command.
//!
//! The algorithm is pinned by the key: HS256 for a shared secret, RS256 or ES256 for an RSA or
//! EC public key. A token whose header names any other algorithm — `none` included — is
//! refused before its signature is looked at, and so is one with a `crit` header (no JWS
//! extension is understood here, RFC 7515 §4.1.11).

use application::ports::{TokenError, TokenVerifier};
use async_trait::async_trait;
use domain::Claims;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;

/// Default seconds of clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

/// What else a token must satisfy besides its signature and validity window.
#[derive(Debug, Clone)]
pub struct JwtRules {
    /// When set, the `iss` claim must equal it.
    pub issuer: Option<String>,
    /// When set, the `aud` claim must contain it.
    pub audience: Option<String>,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
}

impl Default for JwtRules {
    fn default() -> Self {
        Self { issuer: None, audience: None, leeway_secs: LEEWAY_SECS }
    }
}

/// Why a verification key is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a PEM-encoded RSA or EC (P-256) public key")]
pub struct KeyError;

/// Verifies client tokens with one key and one algorithm.
pub struct JwtVerifier {
    key: DecodingKey,
    algorithm: Algorithm,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier").field("algorithm", &self.algorithm).finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// HS256 with a shared secret and the default rules.
    pub fn hs256(secret: &[u8]) -> Self {
        Self::with_secret(secret, &JwtRules::default())
    }

    /// HS256 with a shared secret.
    pub fn with_secret(secret: &[u8], rules: &JwtRules) -> Self {
        Self::new(DecodingKey::from_secret(secret), Algorithm::HS256, rules)
    }

    /// RS256 or ES256, chosen by the type of the PEM public key.
    ///
    /// # Errors
    /// [`KeyError`] when `pem` is neither an RSA nor an EC public key.
    pub fn with_public_key(pem: &[u8], rules: &JwtRules) -> Result<Self, KeyError> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::new(key, Algorithm::RS256, rules));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(Self::new(key, Algorithm::ES256, rules));
        }
        Err(KeyError)
    }

    fn new(key: DecodingKey, algorithm: Algorithm, rules: &JwtRules) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = rules.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &rules.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Without a configured audience, a token carrying one is still accepted.
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &rules.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Self { key, algorithm, validation }
    }
}

fn token_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
            TokenError::WrongAlgorithm
        }
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim.clone()),
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        _ => TokenError::Malformed,
    }
}

#[async_trait]
impl TokenVerifier for JwtVerifier {
    async fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| token_error(e.kind()))?;
        if header.alg != self.algorithm {
            return Err(TokenError::WrongAlgorithm);
        }
        if header.crit.is_some() {
            return Err(TokenError::UnsupportedCritical);
        }
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| token_error(e.kind()))
    }
}

/// Signs HS256 tokens, for trying the service and for scripts.
pub struct JwtIssuer {
    key: EncodingKey,
}

impl std::fmt::Debug for JwtIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtIssuer").finish_non_exhaustive()
    }
}

/// What an issued token claims.
#[derive(Debug, Clone, Serialize)]
pub struct TokenRequest {
    pub user_id: String,
    pub tenant_id: String,
    pub scope: String,
    /// Issued-at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issuer, when verifiers require one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience, when verifiers require one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// What the token allows on topics (see `domain::permissions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caps: Option<serde_json::Value>,
    /// A subscription token's topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// What a subscription token grants on its topic.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
}

/// Why a token could not be signed.
#[derive(Debug, thiserror::Error)]
#[error("cannot sign token: {0}")]
pub struct SigningError(String);

impl JwtIssuer {
    pub fn hs256(secret: &[u8]) -> Self {
        Self { key: EncodingKey::from_secret(secret) }
    }

    /// Signs `claims`.
    ///
    /// # Errors
    /// [`SigningError`] when the crypto backend refuses to sign.
    pub fn issue(&self, claims: &TokenRequest) -> Result<String, SigningError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.key)
            .map_err(|e| SigningError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn sign(claims: &serde_json::Value, alg: Algorithm, secret: &[u8]) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).expect("signed")
    }

    fn b64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
            for i in 0..=chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }

    async fn verify(token: &str) -> Result<Claims, TokenError> {
        JwtVerifier::hs256(SECRET).verify(token).await
    }

    #[tokio::test]
    async fn an_issued_token_verifies_and_carries_its_claims() {
        let token = JwtIssuer::hs256(SECRET)
            .issue(&TokenRequest {
                user_id: "bob".into(),
                tenant_id: "acme".into(),
                scope: "ws:connect".into(),
                iat: now(),
                exp: now() + 60,
                iss: None,
                aud: None,
                caps: None,
                channel: None,
                allow: None,
            })
            .expect("signed");
        let claims = verify(&token).await.expect("valid");
        assert_eq!(claims.user_id.as_deref(), Some("bob"));
        assert_eq!(claims.tenant_id.as_deref(), Some("acme"));
        assert_eq!(claims.scope.as_deref(), Some("ws:connect"));
    }

    #[tokio::test]
    async fn every_bad_token_is_refused_with_its_reason() {
        let good = serde_json::json!({"sub": "bob", "tenant_id": "acme", "exp": now() + 60});
        assert_eq!(verify("garbage").await, Err(TokenError::Malformed));
        assert_eq!(
            verify(&sign(&good, Algorithm::HS256, b"another secret of 32 bytes......")).await,
            Err(TokenError::BadSignature)
        );
        assert_eq!(verify(&sign(&good, Algorithm::HS512, SECRET)).await, Err(TokenError::WrongAlgorithm));
        let expired = serde_json::json!({"sub": "bob", "exp": now() - 3600});
        assert_eq!(verify(&sign(&expired, Algorithm::HS256, SECRET)).await, Err(TokenError::Expired));
        let early = serde_json::json!({"sub": "bob", "exp": now() + 3600, "nbf": now() + 600});
        assert_eq!(verify(&sign(&early, Algorithm::HS256, SECRET)).await, Err(TokenError::NotYetValid));
        let no_exp = serde_json::json!({"sub": "bob"});
        assert_eq!(
            verify(&sign(&no_exp, Algorithm::HS256, SECRET)).await,
            Err(TokenError::MissingClaim("exp".into()))
        );
    }

    #[tokio::test]
    async fn an_unsigned_token_with_alg_none_is_refused() {
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let body =
            b64(format!(r#"{{"sub":"bob","tenant_id":"acme","scope":"ws:connect","exp":{}}}"#, now() + 60)
                .as_bytes());
        for token in [format!("{header}.{body}."), format!("{header}.{body}")] {
            assert!(verify(&token).await.is_err(), "{token}");
        }
    }

    #[tokio::test]
    async fn a_token_within_the_leeway_is_still_accepted() {
        let almost = serde_json::json!({"sub": "bob", "exp": now() - 2});
        assert!(verify(&sign(&almost, Algorithm::HS256, SECRET)).await.is_ok());
    }
}
