//! `HmacWebhookVerifier`: HMAC-SHA256 webhook signatures, GitHub's `X-Hub-Signature-256` format.

use std::collections::HashMap;

use application::ports::{SignatureError, WebhookVerifier};
use async_trait::async_trait;
use domain::TenantId;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of the `x-signature` header value.
pub const SIGNATURE_PREFIX: &str = "sha256=";

/// A webhook secret. Its `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Checks `x-signature: sha256=<hex of HMAC-SHA256(body, tenant secret)>`.
#[derive(Debug, Clone)]
pub struct HmacWebhookVerifier {
    secrets: HashMap<TenantId, Secret>,
}

impl HmacWebhookVerifier {
    pub fn new(secrets: HashMap<TenantId, Secret>) -> Self {
        Self { secrets }
    }

    /// The signature header value for `body` under `secret`, as a sender computes it.
    pub fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = mac(secret);
        mac.update(body);
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(SIGNATURE_PREFIX.len() + 64);
        out.push_str(SIGNATURE_PREFIX);
        for byte in digest {
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        out
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
}

fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    hex.as_bytes().chunks(2).map(|pair| Some((nibble(pair[0])? << 4) | nibble(pair[1])?)).collect()
}

#[async_trait]
impl WebhookVerifier for HmacWebhookVerifier {
    async fn verify<'a>(
        &self,
        tenant: &TenantId,
        body: &[u8],
        signature: Option<&'a str>,
    ) -> Result<(), SignatureError> {
        let signature = signature.ok_or(SignatureError::Missing)?;
        let provided = signature
            .trim()
            .strip_prefix(SIGNATURE_PREFIX)
            .and_then(decode_hex)
            .filter(|bytes| bytes.len() == 32)
            .ok_or(SignatureError::Malformed)?;
        let (secret, known) = match self.secrets.get(tenant) {
            Some(secret) => (secret.0.as_slice(), true),
            // The same work for an unknown tenant, so timing does not reveal which tenants exist.
            None => (&b"lq-realtime: tenant without a webhook secret"[..], false),
        };
        let mut mac = mac(secret);
        mac.update(body);
        let matches = mac.verify_slice(&provided).is_ok();
        match (known, matches) {
            (false, _) => Err(SignatureError::UnknownTenant),
            (true, false) => Err(SignatureError::Mismatch),
            (true, true) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> HmacWebhookVerifier {
        let acme = TenantId::parse("acme").expect("valid");
        HmacWebhookVerifier::new(HashMap::from([(acme, Secret::new("s3cret"))]))
    }

    async fn check(tenant: &str, body: &[u8], signature: Option<&str>) -> Result<(), SignatureError> {
        verifier().verify(&TenantId::parse(tenant).expect("valid"), body, signature).await
    }

    #[test]
    fn signatures_match_the_github_format() {
        // HMAC-SHA256("It's a Secret to Everybody", "Hello, World!") from GitHub's documentation.
        assert_eq!(
            HmacWebhookVerifier::sign(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[tokio::test]
    async fn a_correct_signature_is_accepted_in_either_hex_case() {
        let signature = HmacWebhookVerifier::sign(b"s3cret", b"{}");
        assert_eq!(check("acme", b"{}", Some(&signature)).await, Ok(()));
        let upper = format!("sha256={}", signature[7..].to_uppercase());
        assert_eq!(check("acme", b"{}", Some(&upper)).await, Ok(()));
    }

    #[tokio::test]
    async fn every_wrong_signature_is_refused() {
        let good = HmacWebhookVerifier::sign(b"s3cret", b"{}");
        assert_eq!(check("acme", b"{}", None).await, Err(SignatureError::Missing));
        assert_eq!(check("acme", b"{}", Some("sha1=abc")).await, Err(SignatureError::Malformed));
        assert_eq!(check("acme", b"{}", Some("sha256=zz")).await, Err(SignatureError::Malformed));
        assert_eq!(check("acme", b"{}", Some("sha256=abcd")).await, Err(SignatureError::Malformed));
        assert_eq!(check("acme", b"{ }", Some(&good)).await, Err(SignatureError::Mismatch));
        assert_eq!(check("globex", b"{}", Some(&good)).await, Err(SignatureError::UnknownTenant));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        assert!(!format!("{:?}", verifier()).contains("s3cret"));
    }
}

/// Property-based fuzz target for the `x-signature` header parser and check. Run longer with
/// `PROPTEST_CASES=<n> cargo test --release -p adapters fuzz_`.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const BODY: &[u8] = br#"{"action":"opened"}"#;

    fn verifier() -> HmacWebhookVerifier {
        HmacWebhookVerifier::new(HashMap::from([(
            TenantId::parse("acme").expect("valid"),
            Secret::new("s3cret"),
        )]))
    }

    /// Headers near the real one: the true signature with one character changed, inserted or
    /// removed, other prefixes, other lengths, arbitrary text.
    fn headers() -> impl Strategy<Value = String> {
        let real = HmacWebhookVerifier::sign(b"s3cret", BODY);
        let mutated = (any::<usize>(), any::<char>(), 0..3u8).prop_map(move |(at, c, op)| {
            let mut chars: Vec<char> = real.chars().collect();
            let at = at % chars.len();
            match op {
                0 => chars[at] = c,
                1 => chars.insert(at, c),
                _ => {
                    chars.remove(at);
                }
            }
            chars.into_iter().collect::<String>()
        });
        prop_oneof![mutated, "sha(1|256|512)?=[0-9a-fA-F]{0,70}", any::<String>(),]
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn fuzz_signature_header(header in headers()) {
            let real = HmacWebhookVerifier::sign(b"s3cret", BODY);
            let result = futures_executor_block_on(verifier().verify(
                &TenantId::parse("acme").expect("valid"),
                BODY,
                Some(&header),
            ));
            let is_real = header.trim().strip_prefix(SIGNATURE_PREFIX).is_some_and(|hex| hex.eq_ignore_ascii_case(&real[7..]));
            prop_assert_eq!(result.is_ok(), is_real, "header {:?}", header);
        }
    }

    /// The verifier never awaits anything: polling it once completes it.
    fn futures_executor_block_on<F: std::future::Future>(future: F) -> F::Output {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(future)
    }
}
