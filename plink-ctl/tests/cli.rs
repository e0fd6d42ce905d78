//! The CLI as a user runs it: exit codes and messages of `check` and of an
//! admin command with no daemon.

use std::process::Command;

fn plink_ctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_plink-ctl"))
        .args(args)
        .output()
        .expect("run plink-ctl")
}

#[test]
fn check_accepts_the_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/plink.yaml");
    let out = plink_ctl(&["check", "--config", example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": OK\n"));
}

#[test]
fn check_reports_every_error_with_its_position_and_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "interfaces:\n  - {name: c1, role: consumer}\n  - {name: p0, role: provider}\nendpoints:\n  - {name: e, tenant: t, network: vnet-a, address: 192.0.2.1, service: nope}\n",
    )
    .expect("write");
    let out = plink_ctl(&["check", "--config", path.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(
        stderr.contains(&format!(
            "{p}:2:5: interfaces[0]: consumer interface \"c1\" has no network"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{p}:5:35: endpoints[0].network: consumer network \"vnet-a\" has no interface"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{p}:5:72: endpoints[0].service: unknown service \"nope\""
        )),
        "{stderr}"
    );
    assert!(stderr.contains("3 errors found"), "{stderr}");
}

#[test]
fn admin_commands_without_a_daemon_fail_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("none.sock");
    let out = plink_ctl(&[
        "endpoints",
        "list",
        "--socket",
        sock.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to") && stderr.contains("Is `plink-ctl run` running"),
        "{stderr}"
    );
}
