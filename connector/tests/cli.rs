//! `arw-connector` as operators start it: it names itself, teaches with --help, and refuses a
//! bad node id with the configuration exit status (64). Its NATS behaviour is tested with a
//! real broker in daemon/tests/nats.rs.

use std::process::Command;

fn connector() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arw-connector"));
    cmd.env_clear();
    cmd
}

#[test]
fn names_itself_and_teaches_with_help() {
    let out = connector().arg("--version").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), format!("arw-connector {}", env!("CARGO_PKG_VERSION")));
    let out = connector().arg("--help").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("arw.tasks") && text.contains("ARW_NATS_URL"), "{text}");
}

#[test]
fn a_bad_node_id_exits_64_naming_it() {
    let out = connector().env("ARW_NODE_ID", "not a valid id!").output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ARW_NODE_ID"), "{err}");
}
