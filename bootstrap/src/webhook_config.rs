//! The webhook configuration file (`WEBHOOK_CONFIG`): per tenant and provider, the signature
//! scheme, the active secrets and the optional tolerance and body limit.
//!
//! ```toml
//! [tenants.acme.providers.github]
//! scheme = "github"
//! secrets = ["new-secret", "old-secret"]
//! ```
//!
//! Every problem is reported with the line it is on.

use std::collections::BTreeMap;

use adapters::inbound::http::MAX_WEBHOOK_BODY;
use adapters::outbound::signatures::{Endpoint, MAX_TOLERANCE_SECS, Scheme};
use domain::{Provider, TenantId};
use serde::Deserialize;
use toml::Spanned;

/// The verification settings of one tenant's provider.
#[derive(Debug, Clone)]
pub struct WebhookEndpoint {
    pub tenant: TenantId,
    pub provider: Provider,
    pub endpoint: Endpoint,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tenants: BTreeMap<Spanned<String>, Spanned<TenantEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    #[serde(default)]
    providers: BTreeMap<Spanned<String>, Spanned<ProviderEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderEntry {
    scheme: Spanned<String>,
    /// Read as any value and checked here, so that no parser message can quote a secret.
    secrets: Spanned<toml::Value>,
    tolerance_secs: Option<Spanned<i64>>,
    max_body_bytes: Option<Spanned<i64>>,
}

/// Parses the text of a webhook configuration file.
///
/// # Errors
/// One line per problem, each starting with `line <n>: `.
pub fn parse(text: &str) -> Result<Vec<WebhookEndpoint>, Vec<String>> {
    let at = |span: std::ops::Range<usize>| line_of(text, span.start);
    let file: File = toml::from_str(text).map_err(|error| {
        let line = error.span().map_or(1, at);
        vec![format!("line {line}: {}", error.message().trim())]
    })?;
    let mut endpoints = Vec::new();
    let mut problems = Vec::new();
    for (tenant_key, tenant) in &file.tenants {
        let tenant_id = TenantId::parse(tenant_key.get_ref())
            .map_err(|e| {
                problems.push(format!(
                    "line {}: tenant {:?}: {e}",
                    at(tenant_key.span()),
                    tenant_key.get_ref()
                ))
            })
            .ok();
        if tenant.get_ref().providers.is_empty() {
            problems.push(format!(
                "line {}: tenant {:?} lists no provider: add a [tenants.{}.providers.<name>] table",
                at(tenant.span()),
                tenant_key.get_ref(),
                tenant_key.get_ref(),
            ));
        }
        for (provider_key, entry) in &tenant.get_ref().providers {
            let provider = Provider::parse(provider_key.get_ref())
                .map_err(|e| {
                    problems.push(format!(
                        "line {}: provider {:?}: {e}",
                        at(provider_key.span()),
                        provider_key.get_ref()
                    ));
                })
                .ok();
            let mut report = |span, problem: String| problems.push(format!("line {}: {problem}", at(span)));
            let endpoint = endpoint(entry.get_ref(), &mut report);
            if let (Some(tenant), Some(provider), Some(endpoint)) = (tenant_id.clone(), provider, endpoint) {
                endpoints.push(WebhookEndpoint { tenant, provider, endpoint });
            }
        }
    }
    if problems.is_empty() { Ok(endpoints) } else { Err(problems) }
}

/// The endpoint an entry describes; its problems go to `report` with their spans.
fn endpoint(
    entry: &ProviderEntry,
    report: &mut impl FnMut(std::ops::Range<usize>, String),
) -> Option<Endpoint> {
    let scheme = Scheme::parse(entry.scheme.get_ref());
    if scheme.is_none() {
        let names: Vec<&str> = Scheme::ALL.iter().map(|s| s.name()).collect();
        report(
            entry.scheme.span(),
            format!("unknown scheme {:?}: expected one of {}", entry.scheme.get_ref(), names.join(", ")),
        );
    }
    let tolerance = entry.tolerance_secs.as_ref().and_then(|tolerance| {
        let secs = u64::try_from(*tolerance.get_ref()).ok().filter(|s| (1..=MAX_TOLERANCE_SECS).contains(s));
        if secs.is_none() {
            report(tolerance.span(), format!("tolerance_secs: expected 1 to {MAX_TOLERANCE_SECS} seconds"));
        }
        if scheme.is_some_and(|scheme| !scheme.is_timestamped()) {
            report(
                tolerance.span(),
                "tolerance_secs applies only to the stripe and standard-webhooks schemes, which sign a timestamp"
                    .to_owned(),
            );
        }
        secs
    });
    let max_body = entry.max_body_bytes.as_ref().and_then(|max| {
        let bytes = usize::try_from(*max.get_ref()).ok().filter(|b| (1..=MAX_WEBHOOK_BODY).contains(b));
        if bytes.is_none() {
            report(max.span(), format!("max_body_bytes: expected 1 to {MAX_WEBHOOK_BODY} bytes"));
        }
        bytes
    });
    let Some(secrets) = secret_list(entry.secrets.get_ref()) else {
        report(
            entry.secrets.span(),
            "secrets: expected a list of strings, such as [\"new-secret\", \"old-secret\"]".to_owned(),
        );
        return None;
    };
    let scheme = scheme?;
    let mut endpoint = match Endpoint::new(scheme, &secrets) {
        Ok(endpoint) => endpoint,
        Err(problems) => {
            for problem in problems {
                report(entry.secrets.span(), format!("secrets: {problem}"));
            }
            return None;
        }
    };
    if let Some(secs) = tolerance {
        endpoint = endpoint.with_tolerance_secs(secs);
    }
    if let Some(bytes) = max_body {
        endpoint = endpoint.with_max_body_bytes(bytes);
    }
    Some(endpoint)
}

/// The strings of a list of strings.
fn secret_list(value: &toml::Value) -> Option<Vec<&str>> {
    value.as_array()?.iter().map(toml::Value::as_str).collect()
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes().iter().take(offset).filter(|b| **b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[tenants.acme.providers.github]
scheme = "github"
secrets = ["new-secret", "old-secret"]

[tenants.acme.providers.stripe]
scheme = "stripe"
secrets = ["whsec_abc"]
tolerance_secs = 300

[tenants.acme.providers.billing]
scheme = "standard-webhooks"
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
max_body_bytes = 65536

[tenants.globex.providers.shop]
scheme = "hmac-sha256"
secrets = ["s3cret"]
"#;

    #[test]
    fn the_documented_shape_is_read() {
        let endpoints = parse(EXAMPLE).expect("valid");
        let found: Vec<(String, String, Scheme)> = endpoints
            .iter()
            .map(|e| (e.tenant.to_string(), e.provider.to_string(), e.endpoint.scheme()))
            .collect();
        assert_eq!(
            found,
            [
                ("acme".into(), "billing".into(), Scheme::StandardWebhooks),
                ("acme".into(), "github".into(), Scheme::GitHub),
                ("acme".into(), "stripe".into(), Scheme::Stripe),
                ("globex".into(), "shop".into(), Scheme::HmacSha256),
            ]
        );
        assert!(parse("").expect("an empty file is valid").is_empty());
    }

    #[test]
    fn every_problem_names_its_line() {
        let text = r#"[tenants."a b".providers.github]
scheme = "github"
secrets = ["x"]

[tenants.acme.providers.GitHub]
scheme = "github"
secrets = ["x"]

[tenants.acme.providers.stripe]
scheme = "strype"
secrets = ["whsec_x"]

[tenants.acme.providers.billing]
scheme = "standard-webhooks"
secrets = ["not-whsec"]
tolerance_secs = 0

[tenants.acme.providers.gh]
scheme = "github"
secrets = []
tolerance_secs = 30
max_body_bytes = 2000000
"#;
        let problems = parse(text).expect_err("refused");
        let expected = [
            "line 1: tenant \"a b\": ",
            "line 15: secrets: secret 1: expected whsec_ followed by the secret in base64",
            "line 16: tolerance_secs: expected 1 to 86400 seconds",
            "line 20: secrets: lists no secret: at least one is required",
            "line 21: tolerance_secs applies only to the stripe and standard-webhooks schemes",
            "line 22: max_body_bytes: expected 1 to 1048576 bytes",
            "line 5: provider \"GitHub\": ",
            "line 10: unknown scheme \"strype\": expected one of hmac-sha256, github, stripe, standard-webhooks",
        ];
        for prefix in expected {
            assert!(problems.iter().any(|p| p.starts_with(prefix)), "no {prefix:?} in {problems:#?}");
        }
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    }

    #[test]
    fn syntax_errors_and_unknown_keys_name_their_line() {
        let problems = parse("[tenants.acme.providers.github]\nscheme = \"github\"\nsecrets = [\"x\"\n")
            .expect_err("bad");
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("line 3: "), "{problems:?}");
        let problems = parse(
            "[tenants.acme.providers.github]\nscheme = \"github\"\nsecrets = [\"x\"]\nsecret = \"y\"\n",
        )
        .expect_err("bad");
        assert!(problems[0].starts_with("line ") && problems[0].contains("secret"), "{problems:?}");
        let problems = parse("[tenants.acme.providers.github]\nsecrets = [\"x\"]\n").expect_err("bad");
        assert!(problems[0].contains("scheme"), "{problems:?}");
        for not_a_list in ["\"whsec_top-secret\"", "[\"whsec_top-secret\", 5]"] {
            let text =
                format!("[tenants.acme.providers.stripe]\nscheme = \"stripe\"\nsecrets = {not_a_list}\n");
            let problems = parse(&text).expect_err("bad");
            assert_eq!(
                problems,
                ["line 3: secrets: expected a list of strings, such as [\"new-secret\", \"old-secret\"]"],
                "no secret is quoted"
            );
        }
        let problems = parse("[tenants.acme]\n").expect_err("bad");
        assert_eq!(
            problems,
            ["line 1: tenant \"acme\" lists no provider: add a [tenants.acme.providers.<name>] table"]
        );
    }
}
