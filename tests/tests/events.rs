//! The event log end to end (issue 20 item 1, docs/EVENTS.md): an approval,
//! a reject, a refused reload and a backend going down each appear in the
//! `gateway.event_log` file with the documented fields, `plink-ctl events
//! --json` returns them, `--follow` streams them as they happen, the file is
//! reopened on SIGHUP after logrotate moved it, the stop is recorded, and
//! so is what an adopting start adopted.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    sync::mpsc,
    time::Duration,
};

use plink_tests::{
    gateway::{self, Gateway},
    netns::{self, wait_for},
    privatelink::{self as pl, PrivateLink},
};
use serde_json::Value;

/// Checks the envelope every record has, and returns the records.
fn parse_records(text: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| anyhow::anyhow!("not a JSON line: {line:?}: {e}"))?;
            check_envelope(&v)?;
            Ok(v)
        })
        .collect()
}

fn check_envelope(v: &Value) -> anyhow::Result<()> {
    anyhow::ensure!(v["v"] == 1, "schema version: {v}");
    let time = v["time"].as_str().unwrap_or_default();
    // 2026-12-02T00:10:10.123Z
    let b = time.as_bytes();
    anyhow::ensure!(
        b.len() == 24
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && b[19] == b'.'
            && b[23] == b'Z',
        "time is not RFC 3339 UTC with milliseconds: {v}"
    );
    for key in ["kind", "subject", "outcome"] {
        anyhow::ensure!(
            v[key].as_str().is_some_and(|s| !s.is_empty()),
            "{key} missing: {v}"
        );
    }
    anyhow::ensure!(v["details"].is_object(), "details missing: {v}");
    Ok(())
}

fn read_log(path: &Path) -> anyhow::Result<Vec<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_records(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

fn is(v: &Value, kind: &str, subject: &str) -> bool {
    v["kind"] == kind && v["subject"] == subject
}

/// Waits until the log at `path` has a `kind` record about `subject`.
fn wait_event(path: &Path, kind: &str, subject: &str) -> Value {
    wait_for(
        &format!("a {kind} event about {subject} in {}", path.display()),
        Duration::from_secs(15),
        || Ok(read_log(path)?.into_iter().find(|v| is(v, kind, subject))),
    )
    .unwrap()
}

#[test]
fn decisions_reach_the_event_log_and_plink_ctl_events() {
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let log = net.topo.scratch_dir().unwrap().join("log/events.jsonl");
    let opts = pl::Options {
        gateway_extra: format!("  event_log: {}\n", log.display()),
        // billing-b starts pending: an admin decides.
        billing_b_tenant: "tenant-x".into(),
        orders_extra:
            "    health_check: {type: tcp, interval: 300ms, timeout: 200ms, rise: 2, fall: 2}\n"
                .into(),
        ..Default::default()
    };
    let plink: Gateway = net.start_plink_with(&opts).unwrap();
    let config = plink.config_path.display().to_string();

    let started = wait_event(&log, "controller_started", "controller");
    assert_eq!(started["details"]["dataplane"], "created");
    let created = wait_event(&log, "endpoint_created", "billing-b");
    assert_eq!(created["outcome"], "pending");
    assert_eq!(created["details"]["by"], "config");
    assert_eq!(created["details"]["tenant"], "tenant-x");
    let auto = wait_event(&log, "endpoint_approved", "orders-a");
    assert_eq!(auto["details"]["by"], "auto_approve");
    wait_event(&log, "nat_address_added", "198.51.100.200");

    // A follower started now sees what happens next.
    let bin = gateway::plink_ctl_bin();
    let gw = net.gw.clone();
    let follower = net
        .topo
        .spawn(
            &gw,
            bin.to_str().unwrap(),
            &["events", "--follow", "--json", "--config", &config],
        )
        .unwrap();
    let (follow_tx, follow_rx) = mpsc::channel::<String>();
    let out = net.topo.child_mut(follower).stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if follow_tx.send(line).is_err() {
                return;
            }
        }
    });

    // Approve, then reject.
    plink
        .ctl(&net.gw, &["endpoints", "approve", "billing-b"])
        .unwrap();
    let approved = wait_event(&log, "endpoint_approved", "billing-b");
    assert_eq!(approved["outcome"], "approved");
    assert_eq!(approved["details"]["by"], "admin");
    assert_eq!(approved["details"]["from"], "pending");
    assert_eq!(approved["details"]["service"], "billing");
    assert_eq!(approved["details"]["network"], "vnet-b");
    assert_eq!(approved["details"]["address"], "192.0.2.50");
    plink
        .ctl(&net.gw, &["endpoints", "reject", "billing-b"])
        .unwrap();
    let rejected = wait_event(&log, "endpoint_rejected", "billing-b");
    assert_eq!(rejected["outcome"], "rejected");
    assert_eq!(rejected["details"]["by"], "admin");
    assert_eq!(rejected["details"]["from"], "approved");

    // The follower streamed the approval as it happened (after the ring).
    wait_for(
        "the follower to print the approval",
        Duration::from_secs(10),
        || {
            while let Ok(line) = follow_rx.try_recv() {
                let v: Value = serde_json::from_str(&line)?;
                check_envelope(&v)?;
                if is(&v, "endpoint_approved", "billing-b") {
                    return Ok(Some(()));
                }
            }
            Ok(None)
        },
    )
    .unwrap();

    // An invalid config is refused; the event lists the error with its position.
    let good = std::fs::read_to_string(&plink.config_path).unwrap();
    let bad = good.replacen("{address: 198.51.100.11}", "{address: 198.51.100.999}", 1);
    assert_ne!(good, bad);
    std::fs::write(&plink.config_path, &bad).unwrap();
    let reload = plink.ctl(&net.gw, &["reload"]);
    assert!(
        reload.is_err(),
        "an invalid config was reloaded: {reload:?}"
    );
    std::fs::write(&plink.config_path, &good).unwrap();
    let refused = wait_event(&log, "reload_refused", &config);
    assert_eq!(refused["outcome"], "refused");
    assert_eq!(refused["details"]["via"], "admin");
    let errors = refused["details"]["errors"].as_array().unwrap();
    assert!(
        errors.len() == 1
            && errors[0].as_str().is_some_and(
                |e| e.starts_with(&format!("{config}:")) && e.contains("198.51.100.999")
            ),
        "the refused reload's errors: {errors:?}"
    );

    // A backend goes down: its server stops, the health checks notice.
    let dead = pl::ORDERS_BACKENDS[0];
    drop(net.servers.remove(0));
    let down = wait_event(&log, "backend_down", &format!("orders/{dead}"));
    assert_eq!(down["outcome"], "down");
    assert_eq!(down["details"]["service"], "orders");
    assert_eq!(down["details"]["address"], dead.to_string());
    assert_eq!(down["details"]["target"], format!("{dead}:8080"));
    assert!(down["details"]["error"].is_string(), "{down}");

    // `plink-ctl events --json` has them all, in order.
    let listed = parse_records(&plink.ctl(&net.gw, &["events", "--json"]).unwrap()).unwrap();
    let position = |kind: &str, subject: &str| {
        listed
            .iter()
            .position(|v| is(v, kind, subject))
            .unwrap_or_else(|| panic!("`plink-ctl events` lacks {kind} {subject}: {listed:#?}"))
    };
    let order = [
        position("endpoint_approved", "billing-b"),
        position("endpoint_rejected", "billing-b"),
        position("reload_refused", &config),
        position("backend_down", &format!("orders/{dead}")),
    ];
    assert!(order.is_sorted(), "out of order: {order:?}");
    // The same records as the file.
    let in_file = read_log(&log).unwrap();
    assert!(
        in_file.contains(&listed[order[0]]),
        "{:?} not in the file",
        listed[order[0]]
    );

    // logrotate moves the file and sends SIGHUP: a new file, with the
    // reload the signal asked for.
    let rotated = log.with_extension("jsonl.1");
    std::fs::rename(&log, &rotated).unwrap();
    let pid = net.topo.child_mut(plink.child).id() as i32;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let hup = wait_event(&log, "reload_applied", &config);
    assert_eq!(hup["details"]["via"], "signal");
    let old = read_log(&rotated).unwrap();
    assert!(
        old.iter()
            .any(|v| is(v, "backend_down", &format!("orders/{dead}")))
            && !old.iter().any(|v| v["kind"] == "reload_applied"),
        "the rotated file is not the old one"
    );

    // The stop is the last record.
    let out = net.topo.stop(plink.child).unwrap();
    assert!(out.status.success(), "plink-ctl exited with {}", out.status);
    let last = read_log(&log).unwrap().pop().unwrap();
    assert!(is(&last, "controller_stopped", "controller"), "{last}");
    assert_eq!(last["details"]["signal"], "SIGTERM");
    let before_restart = read_log(&log).unwrap().len();

    // A new controller adopts the running dataplane: what it adopted is
    // recorded (the backend the first one's health checks took down), and
    // the saved decisions make no new endpoint decisions.
    let _again = net.start_plink_with(&opts).unwrap();
    let started = wait_for(
        "the second controller_started",
        Duration::from_secs(15),
        || {
            Ok(read_log(&log)?
                .into_iter()
                .skip(before_restart)
                .find(|v| is(v, "controller_started", "controller")))
        },
    )
    .unwrap();
    assert_eq!(started["details"]["dataplane"], "adopted");
    let after: Vec<Value> = read_log(&log).unwrap().split_off(before_restart);
    let adopted = after
        .iter()
        .find(|v| is(v, "dataplane_adopted", "dataplane"))
        .unwrap_or_else(|| panic!("no dataplane_adopted after the restart: {after:#?}"));
    assert_eq!(
        adopted["details"]["dataplane_id"],
        started["details"]["dataplane_id"]
    );
    assert_eq!(
        adopted["details"]["down_backends"],
        serde_json::json!([{"service": "orders", "address": dead.to_string()}])
    );
    assert!(adopted["details"]["purged_flows"].is_object(), "{adopted}");
    assert!(
        !after.iter().any(|v| v["kind"]
            .as_str()
            .is_some_and(|k| k.starts_with("endpoint_"))),
        "the adopting start re-decided endpoints: {after:#?}"
    );
}
