//! End-to-end: protected branches. Only merges change them: their NBD exports are read-only
//! (qemu-io cannot write, nbdinfo lists them read-only), resets and deletes are refused, and a
//! merge into one goes through (pre-merge hooks permitting). Unprotecting restores writes.

mod support;

use serde_json::Value;
use support::{assert_patterns, qemu_io, require_nbd_tools, write_pattern, Grove, MIB};

fn branch(grove: &Grove, name: &str) -> Value {
    let reply = grove.http("GET", &format!("/v1/volumes/p/branches/{name}"), None);
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.json()
}

#[test]
fn only_merges_change_a_protected_branch() {
    require_nbd_tools();
    let grove = Grove::start();
    grove.create_volume("p", "8MiB");
    write_pattern(&grove.unix_uri("p"), 0x11, 0, MIB);
    let base = grove.commit("p", "base");
    grove.cli_ok(&["branch", "create", "p", "dev"]);
    write_pattern(&grove.unix_uri("p@dev"), 0x22, MIB, MIB);
    grove.commit("p@dev", "on dev");
    grove.wait_no_sessions();

    let out = grove.cli_ok(&["branch", "protect", "p", "main"]);
    assert!(out.contains("protected"), "{out}");
    assert_eq!(branch(&grove, "main")["protected"], true);
    assert!(grove
        .cli_ok(&["branch", "list", "p"])
        .lines()
        .any(|l| l.starts_with("main") && l.contains("yes")));

    // Writes over NBD are refused and change nothing.
    let write = qemu_io(
        &grove.unix_uri("p"),
        &["write -P 0x33 0 64k".to_string()],
        false,
    );
    assert!(
        !write.success() || write.combined().contains("failed"),
        "a write to a protected branch went through:\n{}",
        write.report()
    );
    let listed = support::nbdinfo_list(&grove.tcp_server_uri());
    let main = listed["exports"]
        .as_array()
        .and_then(|exports| exports.iter().find(|e| e["export-name"] == "p"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(main["is_read_only"], true, "nbdinfo --list: {listed}");
    grove.wait_no_sessions();

    // Resets and deletes are refused.
    let reset = grove.http(
        "POST",
        "/v1/volumes/p/branches/main/reset",
        Some(&format!(
            "{{\"to\": \"{base}\", \"discard_uncommitted\": true}}"
        )),
    );
    assert_eq!(reset.status, 409, "{reset:?}");
    assert!(reset.body.contains("protected"), "{reset:?}");
    grove.cli_ok(&["branch", "protect", "p", "dev"]);
    let delete = grove.http("DELETE", "/v1/volumes/p/branches/dev", None);
    assert_eq!(delete.status, 409, "{delete:?}");
    grove.cli_ok(&["branch", "unprotect", "p", "dev"]);

    // A merge goes through.
    let merged = grove.cli_ok(&["merge", "p", "--from", "dev", "--into", "main"]);
    assert!(merged.contains("fast-forward"), "{merged}");
    assert_patterns(&grove.unix_uri("p"), &[(0x11, 0, MIB), (0x22, MIB, MIB)]);
    grove.wait_no_sessions();

    // Protection survives a restart, and lifting it restores writes.
    let mut grove = grove;
    grove.kill9();
    grove.restart_after_kill9();
    assert_eq!(branch(&grove, "main")["protected"], true);
    grove.cli_ok(&["branch", "unprotect", "p", "main"]);
    assert_eq!(branch(&grove, "main")["protected"], false);
    write_pattern(&grove.unix_uri("p"), 0x33, 0, 64 * 1024);
    assert_patterns(&grove.unix_uri("p"), &[(0x33, 0, 64 * 1024)]);

    // Protection events are logged.
    let events = grove
        .http("GET", "/v1/events?type=branch.protected", None)
        .json();
    let flags: Vec<(String, bool)> = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["branch"].as_str().unwrap_or_default().to_string(),
                e["protected"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        flags,
        [
            ("main".to_string(), true),
            ("dev".to_string(), true),
            ("dev".to_string(), false),
            ("main".to_string(), false)
        ]
    );
}
