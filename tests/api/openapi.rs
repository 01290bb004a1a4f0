//! `docs/openapi.yaml` against the routes the code serves: every route in the code is in the
//! spec and every operation of the spec is served.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use crate::helpers::*;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// (method, path) of every operation in the spec, with `{parameters}` as written there.
fn spec_operations() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(workspace().join("docs/openapi.yaml")).expect("docs/openapi.yaml");
    let spec = YamlLoader::load_from_str(&text).expect("valid YAML").remove(0);
    assert_eq!(spec["openapi"].as_str(), Some("3.1.0"));
    let Yaml::Hash(paths) = &spec["paths"] else { panic!("paths") };
    let mut operations = BTreeSet::new();
    for (path, item) in paths {
        let Yaml::Hash(methods) = item else { panic!("path item") };
        for method in methods.keys() {
            let method = method.as_str().expect("method").to_uppercase();
            operations.insert((method, path.as_str().expect("path").to_owned()));
        }
    }
    operations
}

/// (method, path) of every route declared with `warp::path!` in the inbound adapters, a
/// `String` segment written as `{…}` named after the spec's convention for that position.
fn code_routes() -> BTreeSet<(String, String)> {
    let inbound = workspace().join("adapters/src/inbound");
    let mut routes = BTreeSet::new();
    for file in
        ["http.rs", "server_api.rs", "stats.rs", "ws/mod.rs", "sse/mod.rs", "console/mod.rs", "admin/mod.rs"]
    {
        let source = std::fs::read_to_string(inbound.join(file)).expect("source");
        let mut rest = source.as_str();
        while let Some(at) = rest.find("warp::path!(") {
            rest = &rest[at + "warp::path!(".len()..];
            let end = rest.find(')').expect("closing parenthesis");
            let segments: Vec<String> = rest[..end]
                .split('/')
                .map(|segment| {
                    let segment = segment.trim();
                    match segment.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                        Some(literal) => literal.to_owned(),
                        None => "{param}".to_owned(),
                    }
                })
                .collect();
            // The method filter follows the path within the same route.
            let window = &rest[end..rest.len().min(end + 120)];
            let method = ["get", "post", "put", "delete", "patch"]
                .into_iter()
                .find(|m| window.contains(&format!("warp::{m}()")))
                .unwrap_or_else(|| panic!("no method filter after warp::path!({})", &rest[..end]));
            routes.insert((method.to_uppercase(), format!("/{}", segments.join("/"))));
        }
        // The root, as `warp::path::end()` followed by its method.
        if let Some(at) = source.find("warp::path::end()") {
            let window = &source[at..source.len().min(at + 80)];
            let method = ["get", "post"]
                .into_iter()
                .find(|m| window.contains(&format!("warp::{m}()")))
                .expect("method");
            routes.insert((method.to_uppercase(), "/".to_owned()));
        }
    }
    routes
}

fn normalized(operations: &BTreeSet<(String, String)>) -> BTreeSet<(String, String)> {
    operations
        .iter()
        .map(|(method, path)| {
            let path: Vec<String> = path
                .split('/')
                .map(|s| if s.starts_with('{') { "{param}".to_owned() } else { s.to_owned() })
                .collect();
            (method.clone(), path.join("/"))
        })
        .collect()
}

#[test]
fn every_route_in_the_code_is_in_the_spec_and_every_operation_of_the_spec_is_in_the_code() {
    let code = code_routes();
    let spec = normalized(&spec_operations());
    assert!(code.len() >= 7, "routes found in the code: {code:?}");
    let missing_from_spec: Vec<_> = code.difference(&spec).collect();
    let missing_from_code: Vec<_> = spec.difference(&code).collect();
    assert!(missing_from_spec.is_empty(), "served but not in docs/openapi.yaml: {missing_from_spec:?}");
    assert!(missing_from_code.is_empty(), "in docs/openapi.yaml but not served: {missing_from_code:?}");
}

#[tokio::test]
async fn every_operation_of_the_spec_answers_something_other_than_no_such_route() {
    let app = spawn_app_with(test_config(|vars| {
        vars.insert("CONSOLE".to_owned(), "on".to_owned());
        vars.insert("ADMIN".to_owned(), "on".to_owned());
        vars.insert("API_KEYS".to_owned(), "openapi-test-key-0123456789".to_owned());
    }))
    .await;
    let http = reqwest::Client::new();
    for (method, path) in spec_operations() {
        let path = path
            .replace("{provider}", "github")
            .replace("{tenant}", "acme")
            .replace("{channel}", "tenant:acme");
        let request = match method.as_str() {
            "GET" => http.get(app.url(&path)),
            "POST" => http.post(app.url(&path)).body("{}"),
            other => panic!("unexpected method {other}"),
        };
        let answer = Answer::from_response(request.send().await.expect("request")).await;
        let no_such_route = answer.status == 404 && answer.body["message"] == "no such route";
        assert!(!no_such_route && answer.status != 405, "{method} {path}: {} {}", answer.status, answer.body);
    }
}
