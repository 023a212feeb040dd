//! `arw-cli` against a running server.

mod common;

#[test]
fn state_cluster_table_and_json() {
    let server = common::Launch::new()
        .env("ARW_NODE_ID", "cli-node-1")
        .start();
    let base = server.base();
    let token = server.token.clone();
    let env = [("ARW_ADMIN_TOKEN", token.as_str())];

    let out = common::cli(&["state", "cluster", "--base", &base], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "Cluster snapshot", "{text}");
    assert_eq!(lines[2], "  TTL       : 360s", "{text}");
    assert_eq!(lines[3], "  Nodes     : 1", "{text}");
    assert!(
        lines[5].starts_with("ID                   Role       Health     Last Seen"),
        "{text}"
    );
    assert!(
        lines[6].starts_with("cli-node-1           edge       ok         "),
        "{text}"
    );
    assert!(
        lines[6].contains(" no     "),
        "local node must not be stale: {text}"
    );

    let out = common::cli(
        &[
            "state",
            "cluster",
            "--json",
            "--base",
            &base,
            "--admin-token",
            &token,
        ],
        &[],
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim_end().lines().count(), 1, "--json is one line");
    let view: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(view["nodes"][0]["id"], "cli-node-1");

    let out = common::cli(
        &["--base", &base, "state", "cluster", "--json", "--pretty"],
        &env,
    );
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).lines().count() > 5,
        "--pretty spans lines"
    );
}

#[test]
fn unauthorized_and_usage_errors_exit_non_zero_with_a_hint() {
    let server = common::Launch::new().start();
    let base = server.base();
    let out = common::cli(
        &[
            "state",
            "cluster",
            "--base",
            &base,
            "--admin-token",
            "wrong",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        format!(
            "request to {base}/state/cluster returned 401 Unauthorized; supply an admin token via --admin-token or ARW_ADMIN_TOKEN"
        )
    );

    let out = common::cli(&["state", "cluster", "--pretty", "--base", &base], &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "--pretty without --json is a usage error"
    );

    let out = common::cli(
        &[
            "hierarchy",
            "role",
            "captain",
            "--base",
            &base,
            "--admin-token",
            &server.token,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed (422 Unprocessable Entity)") && err.contains("unknown_role"),
        "{err}"
    );
}

#[test]
fn hierarchy_commands_and_local_token_fallback() {
    let server = common::Launch::new().start();
    let base = server.base();
    let env = [("ARW_ADMIN_TOKEN", server.token.as_str())];
    let out = common::cli(&["hierarchy", "role", "home", "--base", &base], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("role: root"));

    let out = common::cli(
        &[
            "hierarchy",
            "hello",
            "--id",
            "w-1",
            "--role",
            "worker",
            "--scope-tag",
            "gpu",
            "--base",
            &base,
        ],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second hello with the default epoch reuses the stored epoch with a fresh nonce.
    let out = common::cli(
        &["hierarchy", "hello", "--id", "w-1", "--base", &base],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = common::cli(&["hierarchy", "state", "--base", &base], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Node         : w-1") && text.contains("Role         : edge"),
        "{text}"
    );

    // With no token given, arw-cli uses the token file of the server in ARW_STATE_DIR.
    std::fs::write(
        server.state_dir.join("admin-token"),
        format!("{}\n", server.token),
    )
    .expect("write");
    let state_dir = server.state_dir.display().to_string();
    let out = common::cli(
        &["state", "cluster", "--base", &base, "--json"],
        &[("ARW_STATE_DIR", &state_dir)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
