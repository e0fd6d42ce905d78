//! The event log end to end (issue 20 item 1, docs/EVENTS.md): an approval,
//! a reject, a refused reload and a backend going down each appear in the
//! `gateway.event_log` file with the documented fields, `plink-ctl events
//! --json` returns them, `--follow` streams them as they happen, the file is
//! reopened on SIGHUP after logrotate moved it, the stop is recorded, and
//! so is what an adopting start adopted; a NAT address moved by a reload is
//! added, drains and retires.

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
    let lines = plink_tests::logs::read_complete_lines(path)?;
    parse_records(&lines.join("\n"))
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

    // A reload moves orders to another NAT address: the new one is added,
    // the old one (no flow holds it) drains and retires.
    let text = std::fs::read_to_string(&plink.config_path).unwrap();
    let moved = text.replacen(
        "nat: {addresses: [198.51.100.200]",
        "nat: {addresses: [198.51.100.203]",
        1,
    );
    assert_ne!(text, moved);
    std::fs::write(&plink.config_path, moved).unwrap();
    plink.ctl(&net.gw, &["reload"]).unwrap();
    let added = wait_event(&log, "nat_address_added", "198.51.100.203");
    assert_eq!(added["details"]["service"], "orders");
    let draining = wait_event(&log, "nat_address_draining", "198.51.100.200");
    assert_eq!(draining["details"]["service"], "orders");
    let retired = wait_event(&log, "nat_address_retired", "198.51.100.200");
    assert!(
        retired["details"]["grace_seconds"].as_u64().unwrap() > 0,
        "{retired}"
    );
    let applied = wait_event(&log, "reload_applied", &config);
    assert_eq!(applied["details"]["via"], "admin");

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
    assert_eq!(hup["details"]["changes"], serde_json::json!([]));
    let old = read_log(&rotated).unwrap();
    assert!(
        old.iter()
            .any(|v| is(v, "backend_down", &format!("orders/{dead}")))
            && !old
                .iter()
                .any(|v| v["kind"] == "reload_applied" && v["details"]["via"] == "signal"),
        "the rotated file is not the old one"
    );

    // The stop is the last record.
    let out = net.topo.stop(plink.child).unwrap();
    assert!(out.status.success(), "plink-ctl exited with {}", out.status);
    let last = read_log(&log).unwrap().pop().unwrap();
    assert!(is(&last, "controller_stopped", "controller"), "{last}");
    assert_eq!(last["details"]["signal"], "SIGTERM");
    assert_eq!(last["details"]["pid"], pid);
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

/// Seconds since the epoch of a record's `time` (checked by `check_envelope`).
fn epoch_seconds(time: &str) -> f64 {
    let n = |a: usize, b: usize| time[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    // Days from civil (H. Hinnant), independent of the code under test.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60 + n(17, 19)) as f64
        + n(20, 23) as f64 / 1000.0
}

#[test]
fn caps_reached_are_reported_at_most_once_per_interval_and_lose_no_count() {
    use std::net::SocketAddrV4;
    netns::require_root_and_tools();
    let mut net = PrivateLink::build().unwrap();
    let log = net.topo.scratch_dir().unwrap().join("events.jsonl");
    const CAP: u16 = 3;
    let plink = net
        .start_plink_with(&pl::Options {
            gateway_extra: format!(
                "  event_log: {}\n  endpoint_defaults: {{max_flows: {CAP}, new_flows_per_second: 10000}}\n",
                log.display()
            ),
            ..Default::default()
        })
        .unwrap();
    let burst = |first_port: u16| {
        for i in 0..(3 * CAP) {
            let src = SocketAddrV4::new(pl::CLIENT, first_port + i);
            // Refused probes time out: that is the point.
            let _ = plink_tests::servers::udp_probe(
                &net.consumer_a,
                src,
                pl::endpoint_udp(),
                Duration::from_millis(300),
            );
        }
    };
    let caps = || -> anyhow::Result<Vec<Value>> {
        Ok(read_log(&log)?
            .into_iter()
            .filter(|v| is(v, "cap_reached", "dns-a"))
            .collect())
    };
    burst(47000);
    let first = wait_for("a cap_reached event", Duration::from_secs(15), || {
        Ok(caps()?.into_iter().next())
    })
    .unwrap();
    assert_eq!(first["outcome"], "rate_limited");
    assert_eq!(first["details"]["service"], "dns");
    assert_eq!(first["details"]["max_flows"], CAP);
    assert_eq!(first["details"]["interval_seconds"], 10);
    assert_eq!(first["details"]["refused_rate"], 0);
    // Refused again right away: the next event waits for the interval and
    // carries every refusal since the first.
    burst(48000);
    let both = wait_for(
        "a second cap_reached event",
        Duration::from_secs(20),
        || {
            let c = caps()?;
            Ok((c.len() >= 2).then_some(c))
        },
    )
    .unwrap();
    let gap = epoch_seconds(both[1]["time"].as_str().unwrap())
        - epoch_seconds(both[0]["time"].as_str().unwrap());
    assert!(gap >= 9.99, "two cap_reached events {gap}s apart");
    let reported: u64 = both
        .iter()
        .map(|v| v["details"]["refused_max_flows"].as_u64().unwrap())
        .sum();
    let counted = Gateway::sample(
        &plink.scrape(&net.gw).unwrap(),
        "plink_endpoint_refused_flows_total{endpoint=\"dns-a\",service=\"dns\",cap=\"max_flows\"}",
    );
    assert!(counted > 0);
    assert_eq!(reported, counted, "refusals reported vs counted: {both:#?}");
    // The other consumer's endpoint reached nothing.
    assert!(
        !read_log(&log)
            .unwrap()
            .iter()
            .any(|v| is(v, "cap_reached", "dns-b")),
        "dns-b was reported"
    );
}
