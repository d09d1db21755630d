//! Safe by default, against the real binary: a gateway that other machines could reach without API keys refuses to
//! start unless that is said (`INGEST_ALLOW_ANONYMOUS=true`), and says which it is in `ingest_auth_enabled` and
//! `/stats`; with keys on such a listener, the operator's routes need the admin token while `/healthz` stays open.

use std::path::Path;

use ingest_gateway::keys_file::hashed;

use crate::helpers::{connection_string, fresh_database, refused_start, shared_cluster, GatewayProcess};

/// The environment of a gateway on a new database of the shared cluster, its data under `dir`.
fn envs_on_new_database(dir: &Path) -> Vec<(&'static str, String)> {
    let cluster = shared_cluster();
    let name = fresh_database(cluster);
    vec![
        ("DATABASE_URL", connection_string(&cluster.config(&name))),
        ("INGEST_DATA_DIR", dir.join("data").display().to_string()),
    ]
}

/// Status, body and `WWW-Authenticate` of a GET, with `token` as a Bearer token if given.
fn get(address: &str, path: &str, token: Option<&str>) -> (u16, String, Option<String>) {
    let mut request = ureq::get(&format!("{address}{path}"));
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let response = match request.call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = response.status();
    let challenge = response.header("WWW-Authenticate").map(str::to_owned);
    (status, response.into_string().unwrap(), challenge)
}

#[test]
fn without_keys_a_gateway_refuses_to_listen_beyond_loopback_unless_told_and_says_it_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let (status, stderr) = refused_start(&[
        ("INGEST_LISTEN", "0.0.0.0:0".into()),
        ("INGEST_DATA_DIR", dir.path().join("never").display().to_string()),
    ]);
    eprintln!("refused: {}", stderr.lines().last().unwrap_or_default());
    assert!(!status.success());
    assert!(
        stderr.contains("0.0.0.0:0")
            && stderr.contains("INGEST_API_KEYS_FILE")
            && stderr.contains("INGEST_ALLOW_ANONYMOUS=true"),
        "{stderr}"
    );
    assert!(!dir.path().join("never").exists(), "refused before anything is touched");
    let (status, stderr) = refused_start(&[
        ("INGEST_LISTEN", "127.0.0.1:0".into()),
        ("INGEST_OSMAND_LISTEN", "[::]:0".into()),
        ("INGEST_DATA_DIR", dir.path().join("never").display().to_string()),
    ]);
    assert!(!status.success() && stderr.contains("[::]:0"), "{stderr}");

    let mut envs = envs_on_new_database(dir.path());
    envs.push(("INGEST_LISTEN", "0.0.0.0:0".into()));
    envs.push(("INGEST_ALLOW_ANONYMOUS", "true".into()));
    let open = GatewayProcess::start(&envs);
    let (_, metrics, _) = get(&open.address, "/metrics", None);
    assert!(metrics.contains("ingest_auth_enabled 0"), "{metrics}");
    let (_, stats, _) = get(&open.address, "/stats", None);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["auth"]["enabled"], false, "{stats}");
}

#[test]
fn with_keys_beyond_loopback_the_operator_routes_need_the_admin_token_and_healthz_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("fleet {} streams=location\n", hashed("igk_fleet"))).unwrap();
    let token_file = dir.path().join("admin-token");
    let token = "a5f0c1e2d3b4a5f6e7d8c9b0a1f2e3d4";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut envs = envs_on_new_database(dir.path());
    envs.push(("INGEST_LISTEN", "0.0.0.0:0".into()));
    envs.push(("INGEST_API_KEYS_FILE", keys.display().to_string()));
    envs.push(("INGEST_ADMIN_TOKEN_FILE", token_file.display().to_string()));
    let gateway = GatewayProcess::start(&envs);
    let address = &gateway.address;

    let mut answers = Vec::new();
    for path in ["/metrics", "/stats", "/"] {
        let (without, body, challenge) = get(address, path, None);
        let (wrong, _, _) = get(address, path, Some("igk_fleet"));
        let (with, _, _) = get(address, path, Some(token));
        answers.push((path, without, wrong, with));
        assert!(body.contains("admin token"), "{body}");
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"ingest-gateway-admin\""));
    }
    eprintln!("operator routes (path, no token, an API key, the admin token): {answers:?}");
    assert!(
        answers.iter().all(|(_, a, b, c)| (*a, *b, *c) == (401, 401, 200)),
        "{answers:?}"
    );
    let (_, metrics, _) = get(address, "/metrics", Some(token));
    assert!(metrics.contains("ingest_auth_enabled 1") && metrics.contains("ingest_api_keys 1"));
    assert_eq!(get(address, "/healthz", None).0, 200);
    let (status, body, _) = get(address, "/readyz", None);
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ready"}"#));
}

#[test]
fn with_keys_and_no_admin_token_the_operator_routes_say_both_ways_to_them_and_loopback_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("fleet {} streams=location\n", hashed("igk_fleet"))).unwrap();
    let mut envs = envs_on_new_database(dir.path());
    envs.push(("INGEST_API_KEYS_FILE", keys.display().to_string()));
    let mut exposed_envs = envs.clone();
    exposed_envs.push(("INGEST_LISTEN", "0.0.0.0:0".into()));
    let exposed = GatewayProcess::start(&exposed_envs);
    let (status, body, _) = get(&exposed.address, "/stats", None);
    assert_eq!(status, 401);
    assert!(
        body.contains("INGEST_ADMIN_TOKEN_FILE") && body.contains("INGEST_ADMIN_LISTEN"),
        "{body}"
    );
    drop(exposed);

    // On loopback only, the operator's routes are what they were: open to whoever shares the host.
    envs.retain(|(k, _)| *k != "INGEST_DATA_DIR");
    envs.push(("INGEST_DATA_DIR", dir.path().join("data-2").display().to_string()));
    let local = GatewayProcess::start(&envs);
    assert_eq!(get(&local.address, "/metrics", None).0, 200);
}
