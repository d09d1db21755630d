//! The OpenAPI document at `GET /api/v1/openapi.json` against the README and against the running gateway: every
//! route and every answer the README lists is in it, and every route in it is served.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;

use serde_json::Value;

use crate::helpers::{location_json, spawn_app, TestApp};

const OPENAPI: &str = "/api/v1/openapi.json";
const README: &str = include_str!("../../README.md");

fn document(app: &TestApp) -> Value {
    let answer = app.get(OPENAPI);
    assert_eq!(answer.status, 200, "{}", answer.body);
    answer.json()
}

/// The rows of the first Markdown table after `heading`, as their cells without the outer pipes.
fn readme_table(heading: &str) -> Vec<Vec<String>> {
    let section = README
        .split_once(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("the README has no `{heading}`"))
        .1;
    section
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        // The header row and the separator row.
        .skip(2)
        .map(|row| {
            row.trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().to_owned())
                .collect()
        })
        .collect()
}

/// The `(method, path)` pairs of the README's HTTP API table, e.g. `("post", "/api/v1/location/update")`.
fn readme_routes() -> BTreeSet<(String, String)> {
    readme_table("## HTTP API (v1)")
        .iter()
        .map(|row| {
            let route = row[0].trim_matches('`');
            let (method, path) = route
                .split_once(' ')
                .unwrap_or_else(|| panic!("not `METHOD /path`: {route}"));
            (method.to_ascii_lowercase(), path.to_owned())
        })
        .collect()
}

/// The `(status, error code)` pairs of the README's Responses table; the code is `None` for a success.
fn readme_answers() -> Vec<(String, Option<String>)> {
    readme_table("### Responses")
        .iter()
        .map(|row| {
            (
                row[0].clone(),
                row[1].strip_prefix('`').map(|c| c.trim_end_matches('`').to_owned()),
            )
        })
        .collect()
}

fn document_routes(document: &Value) -> BTreeSet<(String, String)> {
    let paths = document["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let methods = item.as_object().expect("a path item");
            methods.keys().map(move |method| (method.clone(), path.clone()))
        })
        .collect()
}

/// Sends a request with a header value `ureq` would not send, and returns the status.
fn raw_post(app: &TestApp, path: &str, header: &[u8], body: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(app.address.trim_start_matches("http://")).expect("connect");
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(header);
    request.extend_from_slice(b"\r\n\r\n");
    request.extend_from_slice(body);
    stream.write_all(&request).expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    answer
        .split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"))
}

#[test]
fn the_document_is_openapi_3_1_and_lists_exactly_the_routes_of_the_readme() {
    let app = spawn_app(|_| {});
    let document = document(&app);

    let version = document["openapi"].as_str().expect("an `openapi` version");
    assert!(version.starts_with("3.1."), "{version}");
    let readme = readme_routes();
    assert!(readme.contains(&("get".to_owned(), OPENAPI.to_owned())), "{readme:?}");
    assert_eq!(document_routes(&document), readme);
}

#[test]
fn every_route_of_the_document_is_served() {
    let app = spawn_app(|_| {});
    let document = document(&app);

    for (method, path) in document_routes(&document) {
        let status = match method.as_str() {
            "get" => app.get(&path).status,
            "post" => app.post_json(&path, &location_json("contract-1")).status,
            other => panic!("a method the gateway does not serve: {other}"),
        };
        assert!(![404, 405].contains(&status), "{method} {path}: {status}");
    }
}

#[test]
fn both_ingest_routes_list_every_answer_of_the_readme() {
    let app = spawn_app(|_| {});
    let document = document(&app);

    for path in ["/api/v1/location/update", "/api/v1/poll/update"] {
        let responses = &document["paths"][path]["post"]["responses"];
        for (status, code) in readme_answers() {
            let response = &responses[&status];
            assert!(response.is_object(), "{path} lacks {status}");
            let Some(code) = code else { continue };
            let examples = response["content"]["application/json"]["examples"]
                .as_object()
                .unwrap_or_else(|| panic!("{path} {status} has no examples"));
            assert!(
                examples.values().any(|e| e["value"]["error"] == code.as_str()),
                "{path} {status} has no example of `{code}`"
            );
        }
        assert!(responses["503"]["headers"]["Retry-After"].is_object(), "{path}");
        let parameters = document["paths"][path]["post"]["parameters"]
            .as_array()
            .expect("parameters");
        let ack = parameters.iter().find(|p| p["name"] == "ack").expect("`ack`");
        assert_eq!(ack["schema"]["enum"], serde_json::json!(["commit"]));
    }
}

#[test]
fn unknown_paths_and_methods_answer_as_the_document_names_them() {
    let app = spawn_app(|_| {});
    let document = document(&app);
    let responses = &document["components"]["responses"];

    let answer = app.get("/api/v1/nothing");
    assert_eq!(answer.status, 404);
    assert_eq!(
        answer.json(),
        responses["NotFound"]["content"]["application/json"]["example"]
    );

    let error = ureq::request("DELETE", &format!("{}/stats", app.address))
        .call()
        .expect_err("DELETE /stats is refused");
    let ureq::Error::Status(405, answer) = error else {
        panic!("not a 405: {error}")
    };
    assert_eq!(answer.header("Allow"), Some("GET"));
    assert!(responses["MethodNotAllowed"]["headers"]["Allow"].is_object());
}

#[test]
fn an_empty_content_encoding_means_none_and_one_that_is_not_text_is_refused() {
    let app = spawn_app(|_| {});
    let body = format!("[{}]", location_json("encoding-1"));

    assert_eq!(
        raw_post(&app, "/api/v1/location/update", b"Content-Encoding:", body.as_bytes()),
        202
    );
    assert_eq!(
        raw_post(
            &app,
            "/api/v1/location/update",
            b"Content-Encoding: gz\xffip",
            body.as_bytes()
        ),
        415
    );
}
