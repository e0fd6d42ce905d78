//! Event log tests: the record format is a public interface (field names,
//! version, kinds), the sink follows rotation, the ring is bounded.

use std::{net::Ipv4Addr, path::Path};

use super::*;
use crate::{
    approval::{self, Action, Reason},
    state::{self, PersistedState},
};

fn at(secs: u64, millis: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
}

fn change(state: ConnectionState, reason: Reason, by: By) -> EndpointChange {
    EndpointChange {
        endpoint: "orders-b".into(),
        tenant: Some("tenant-b".into()),
        service: "orders".into(),
        network: "vnet-b".into(),
        address: Ipv4Addr::new(192, 0, 2, 50).into(),
        from: Some(ConnectionState::Pending),
        state,
        reason: Some(reason),
        by,
    }
}

#[test]
fn a_record_is_one_line_with_stable_field_names() {
    let r = Record::new(
        Event::EndpointApproved(change(
            ConnectionState::Approved,
            Reason::ApprovedByAdmin,
            By::Admin,
        )),
        at(1_796_170_210, 123),
    );
    let line = serde_json::to_string(&r).unwrap();
    assert_eq!(
        line,
        r#"{"v":1,"time":"2026-12-02T00:10:10.123Z","kind":"endpoint_approved","subject":"orders-b","outcome":"approved","details":{"endpoint":"orders-b","tenant":"tenant-b","service":"orders","network":"vnet-b","address":"192.0.2.50","from":"pending","state":"approved","reason":"approved_by_admin","by":"admin"}}"#
    );
    // Readers get back what was written.
    let back: Record = serde_json::from_str(&line).unwrap();
    assert_eq!(back, r);
    assert_eq!(back.kind(), "endpoint_approved");
}

/// One of every kind, for the checks below.
fn one_of_each() -> Vec<Event> {
    let a = std::net::IpAddr::V4(Ipv4Addr::new(198, 51, 100, 200));
    let target = std::net::SocketAddr::from(([198, 51, 100, 10], 8080));
    vec![
        Event::ControllerStarted {
            version: "0.1.0".into(),
            pid: 42,
            config: "/etc/plink/plink.yaml".into(),
            dataplane: DataplaneStart::Adopted,
            dataplane_id: Some("abc".into()),
        },
        Event::ControllerStopped {
            pid: 42,
            signal: Some("SIGTERM".into()),
            error: None,
        },
        Event::DataplaneAdopted {
            dataplane_id: "abc".into(),
            pin_dir: "/sys/fs/bpf/plink/v1".into(),
            purged_flows: BTreeMap::from([("endpoint_gone".to_owned(), 3)]),
            down_backends: vec![BackendRef {
                service: "orders".into(),
                address: target.ip(),
            }],
            draining_nat: vec![a],
            retired_nat: vec![],
        },
        Event::EndpointCreated(change(
            ConnectionState::Pending,
            Reason::AwaitingApproval,
            By::Config,
        )),
        Event::EndpointApproved(change(
            ConnectionState::Approved,
            Reason::AutoApproved,
            By::AutoApprove,
        )),
        Event::EndpointRejected(change(
            ConnectionState::Rejected,
            Reason::VisibilityNarrowed,
            By::Visibility,
        )),
        Event::EndpointRemoved(change(
            ConnectionState::Removed,
            Reason::RemovedByAdmin,
            By::Admin,
        )),
        Event::EndpointActionRefused {
            endpoint: "orders-b".into(),
            action: Action::Approve,
            error: "not visible".into(),
        },
        Event::ReloadApplied {
            config: "/etc/plink/plink.yaml".into(),
            via: Trigger::Signal,
            changes: vec!["services: 1 changed".into()],
        },
        Event::ReloadRefused {
            config: "/etc/plink/plink.yaml".into(),
            via: Trigger::Admin,
            error: "invalid".into(),
            errors: vec!["/etc/plink/plink.yaml:3:5: gateway.x: unknown".into()],
        },
        Event::ApplyFailed {
            error: "map full".into(),
            restored: true,
        },
        Event::DataplaneInSync { apply_failures: 1 },
        Event::BackendDown {
            service: "orders".into(),
            address: target.ip(),
            target,
            error: Some("connect: refused".into()),
        },
        Event::BackendUp {
            service: "orders".into(),
            address: target.ip(),
            target,
        },
        Event::NatAddressAdded {
            service: "orders".into(),
            address: a,
        },
        Event::NatAddressDraining {
            service: "orders".into(),
            address: a,
        },
        Event::NatAddressRetired {
            address: a,
            grace_seconds: 7440,
        },
        Event::NatAddressReleased { address: a },
        Event::CapReached {
            endpoint: "orders-b".into(),
            service: "orders".into(),
            refused_max_flows: 5,
            refused_rate: 0,
            max_flows: 100,
            new_flows_per_second: 10,
            interval_seconds: 10,
        },
    ]
}

#[test]
fn every_kind_has_the_envelope_and_is_documented() {
    let docs = include_str!("../../../docs/EVENTS.md");
    let kinds: Vec<String> = one_of_each()
        .into_iter()
        .map(|e| {
            let r = Record::new(e, at(0, 0));
            let v = serde_json::to_value(&r).unwrap();
            let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(
                keys,
                ["details", "kind", "outcome", "subject", "time", "v"],
                "{v}"
            );
            assert_eq!(v["v"], SCHEMA_VERSION);
            assert!(v["details"].is_object(), "{v}");
            assert!(!r.subject.is_empty() && !r.outcome.is_empty(), "{v}");
            let back: Record = serde_json::from_value(v).unwrap();
            assert_eq!(back, r);
            r.kind()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "controller_started",
            "controller_stopped",
            "dataplane_adopted",
            "endpoint_created",
            "endpoint_approved",
            "endpoint_rejected",
            "endpoint_removed",
            "endpoint_action_refused",
            "reload_applied",
            "reload_refused",
            "apply_failed",
            "dataplane_in_sync",
            "backend_down",
            "backend_up",
            "nat_address_added",
            "nat_address_draining",
            "nat_address_retired",
            "nat_address_released",
            "cap_reached",
        ]
    );
    for k in &kinds {
        assert!(
            docs.contains(&format!("### `{k}`")),
            "docs/EVENTS.md does not document {k}"
        );
    }
}

#[test]
fn times_are_rfc3339_utc() {
    assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
    // A leap day, and the end of a leap year.
    assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
    assert_eq!(rfc3339(at(1_735_689_599, 999)), "2024-12-31T23:59:59.999Z");
    assert_eq!(rfc3339(at(1_796_170_210, 123)), "2026-12-02T00:10:10.123Z");
}

fn lines(path: &Path) -> Vec<Record> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn stopped(n: u32) -> Event {
    Event::ControllerStopped {
        pid: n,
        signal: Some(format!("SIG{n}")),
        error: None,
    }
}

#[test]
fn the_file_is_appended_to_and_follows_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log/events.jsonl");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "earlier line\n").unwrap();
    let events = Events::open(Some(&EventLogTarget::File(path.clone()))).unwrap();
    events.emit(stopped(1));
    events.flush();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("earlier line\n"), "not appended: {text}");
    assert_eq!(text.lines().count(), 2);

    // logrotate renames the file: the next event goes to a new one at the
    // path, not world-readable.
    let rotated = dir.path().join("log/events.jsonl.1");
    std::fs::rename(&path, &rotated).unwrap();
    events.emit(stopped(2));
    events.flush();
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap().lines().count(),
        2
    );
    let new = lines(&path);
    assert_eq!(new.len(), 1);
    let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
    assert_eq!(
        mode & 0o007,
        0,
        "the new file is world-accessible: {mode:o}"
    );
    assert_eq!(new[0].event, stopped(2));

    // Deleted, then an explicit reopen (SIGHUP): a fresh file again.
    std::fs::remove_file(&path).unwrap();
    events.reopen().unwrap();
    assert!(path.exists(), "reopen did not create the file");
    events.emit(stopped(3));
    events.flush();
    assert_eq!(lines(&path).len(), 1);
}

#[test]
fn an_unwritable_log_is_an_error_at_open() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be.
    let err = Events::open(Some(&EventLogTarget::File(dir.path().to_owned()))).unwrap_err();
    assert!(err.to_string().contains("opening the event log"), "{err}");
}

#[test]
fn the_ring_keeps_the_latest_and_followers_see_what_comes_next() {
    let events = Events::with_capacity(3);
    for n in 0..5 {
        events.emit(stopped(n));
    }
    let recent: Vec<Event> = events.recent().into_iter().map(|r| r.event).collect();
    assert_eq!(recent, [stopped(2), stopped(3), stopped(4)]);
    let (now, mut rx) = events.subscribe();
    assert_eq!(now.len(), 3);
    events.emit(stopped(5));
    assert_eq!(rx.try_recv().unwrap().event, stopped(5));
    assert!(rx.try_recv().is_err(), "one event, one record");
}

const CONFIG: &str = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: c2, role: consumer, network: vnet-b}
  - {name: p0, role: provider}
services:
  - name: orders
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 198.51.100.10}]
    nat: {addresses: [198.51.100.200], ports: 1024-65535}
    visibility: [tenant-a, tenant-b]
    auto_approve: [tenant-a]
endpoints:
  - {name: orders-a, tenant: tenant-a, network: vnet-a, address: 192.0.2.50, service: orders}
  - {name: orders-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.50, service: orders}
";

fn config(text: &str) -> Config {
    Config::parse(Path::new("/etc/plink/test.yaml"), text).unwrap()
}

fn kinds_and_by(events: &[Event]) -> Vec<(String, String, Option<By>)> {
    events
        .iter()
        .map(|e| {
            let by = match e {
                Event::EndpointCreated(c)
                | Event::EndpointApproved(c)
                | Event::EndpointRejected(c)
                | Event::EndpointRemoved(c) => Some(c.by),
                _ => None,
            };
            let r = Record::new(e.clone(), at(0, 0));
            (r.kind(), r.subject, by)
        })
        .collect()
}

#[test]
fn endpoint_decisions_name_who_made_them() {
    let cfg = config(CONFIG);
    let fresh = state::reconcile(&cfg, &PersistedState::default()).unwrap();
    // A first start: both new; orders-a auto-approved, orders-b pending.
    let got = endpoint_events(None, &BTreeMap::new(), &cfg, &fresh.decisions);
    assert_eq!(
        kinds_and_by(&got),
        [
            (
                "endpoint_created".into(),
                "orders-a".into(),
                Some(By::AutoApprove)
            ),
            (
                "endpoint_approved".into(),
                "orders-a".into(),
                Some(By::AutoApprove)
            ),
            (
                "endpoint_created".into(),
                "orders-b".into(),
                Some(By::Config)
            ),
        ]
    );
    // The same state again: nothing was decided.
    assert!(endpoint_events(Some(&cfg), &fresh.decisions, &cfg, &fresh.decisions).is_empty());

    // An admin approves orders-b.
    let mut approved = fresh.clone();
    let (id, d) = approved
        .decisions
        .iter_mut()
        .find(|(id, _)| id.name == "orders-b")
        .unwrap();
    let access = approval::Access::of(&cfg.services[0], "tenant-b");
    *d = approval::apply(*d, Action::Approve, &access)
        .unwrap()
        .unwrap();
    let id = id.clone();
    let got = endpoint_events(Some(&cfg), &fresh.decisions, &cfg, &approved.decisions);
    assert_eq!(
        kinds_and_by(&got),
        [(
            "endpoint_approved".into(),
            "orders-b".into(),
            Some(By::Admin)
        )]
    );
    let Event::EndpointApproved(c) = &got[0] else {
        unreachable!()
    };
    assert_eq!(c.from, Some(ConnectionState::Pending));
    assert_eq!(c.tenant.as_deref(), Some("tenant-b"));

    // A reload narrows visibility past tenant-b and deletes orders-a.
    let narrowed = config(
        &CONFIG
            .replace("visibility: [tenant-a, tenant-b]", "visibility: [tenant-a]")
            .replace(
                "  - {name: orders-a, tenant: tenant-a, network: vnet-a, address: 192.0.2.50, service: orders}\n",
                "",
            ),
    );
    let reloaded = state::reconcile(&narrowed, &approved).unwrap();
    let got = endpoint_events(
        Some(&cfg),
        &approved.decisions,
        &narrowed,
        &reloaded.decisions,
    );
    assert_eq!(
        kinds_and_by(&got),
        [
            (
                "endpoint_rejected".into(),
                "orders-b".into(),
                Some(By::Visibility)
            ),
            (
                "endpoint_removed".into(),
                "orders-a".into(),
                Some(By::Config)
            ),
        ]
    );
    let Event::EndpointRemoved(c) = &got[1] else {
        unreachable!()
    };
    assert_eq!(
        c.tenant.as_deref(),
        Some("tenant-a"),
        "tenant from the old config"
    );
    assert_eq!(c.reason, None);
    assert!(reloaded.decisions.contains_key(&id));
}

fn view(active: &[(&str, [u8; 4])], draining: &[(&str, [u8; 4])], retired: &[[u8; 4]]) -> NatView {
    let set = |l: &[(&str, [u8; 4])]| {
        l.iter()
            .map(|(s, a)| (s.to_string(), Ipv4Addr::from(*a).into()))
            .collect()
    };
    NatView {
        active: set(active),
        draining: set(draining),
        retired: retired.iter().map(|a| Ipv4Addr::from(*a).into()).collect(),
    }
}

#[test]
fn nat_addresses_are_added_drained_retired_and_released() {
    let (a, b) = ([198, 51, 100, 200], [198, 51, 100, 201]);
    let g = Duration::from_secs(60);
    let kinds = |old: &NatView, new: &NatView| -> Vec<(String, String)> {
        nat_events(old, new, g)
            .into_iter()
            .map(|e| {
                let r = Record::new(e, at(0, 0));
                (r.kind(), r.subject)
            })
            .collect()
    };
    let start = view(&[("orders", a)], &[], &[]);
    assert_eq!(
        kinds(&NatView::default(), &start),
        [("nat_address_added".into(), "198.51.100.200".into())]
    );
    assert!(kinds(&start, &start).is_empty());
    // a drains, b is added in its place.
    let moving = view(&[("orders", b)], &[("orders", a)], &[]);
    assert_eq!(
        kinds(&start, &moving),
        [
            ("nat_address_added".into(), "198.51.100.201".into()),
            ("nat_address_draining".into(), "198.51.100.200".into()),
        ]
    );
    let retired = view(&[("orders", b)], &[], &[a]);
    let got = nat_events(&moving, &retired, g);
    assert_eq!(
        got,
        [Event::NatAddressRetired {
            address: a.into(),
            grace_seconds: 60
        }]
    );
    assert_eq!(
        kinds(&retired, &view(&[("orders", b)], &[], &[])),
        [("nat_address_released".into(), "198.51.100.200".into())]
    );
    // Retired, then configured again: back in use, not released.
    assert!(
        kinds(&retired, &view(&[("orders", b), ("orders", a)], &[], &[]))
            .iter()
            .all(|(k, _)| k != "nat_address_released")
    );
}

#[test]
fn cap_events_are_rate_limited_per_endpoint_and_lose_no_count() {
    let mut w = CapWatch::new(Duration::from_secs(10), true);
    let t0 = Instant::now();
    let s = |id: u32| CapSubject {
        id,
        endpoint: format!("ep-{id}"),
        service: "orders".into(),
        max_flows: 100,
        new_flows_per_second: 10,
    };
    let r = |max_flows, rate| Refusals { max_flows, rate };
    let refused = |e: Option<Event>| match e {
        Some(Event::CapReached {
            endpoint,
            refused_max_flows,
            refused_rate,
            ..
        }) => Some((endpoint, refused_max_flows, refused_rate)),
        None => None,
        Some(other) => panic!("{other:?}"),
    };
    // The first reading is the baseline: what was refused before is old news.
    assert_eq!(refused(w.observe(&s(1), r(50, 7), t0)), None);
    assert_eq!(
        refused(w.observe(&s(1), r(50, 7), t0 + Duration::from_secs(1))),
        None
    );
    assert_eq!(
        refused(w.observe(&s(1), r(53, 7), t0 + Duration::from_secs(2))),
        Some(("ep-1".into(), 3, 0))
    );
    // Within the interval: no event; the counts wait for the next one.
    assert_eq!(
        refused(w.observe(&s(1), r(60, 9), t0 + Duration::from_secs(5))),
        None
    );
    // Another endpoint has its own interval.
    assert_eq!(
        refused(w.observe(&s(2), r(0, 0), t0 + Duration::from_secs(5))),
        None
    );
    assert_eq!(
        refused(w.observe(&s(2), r(0, 4), t0 + Duration::from_secs(6))),
        Some(("ep-2".into(), 0, 4))
    );
    assert_eq!(
        refused(w.observe(&s(1), r(61, 9), t0 + Duration::from_secs(12))),
        Some(("ep-1".into(), 8, 2))
    );
    // Counters reset (new pins): a new baseline, no bogus event.
    assert_eq!(
        refused(w.observe(&s(1), r(1, 0), t0 + Duration::from_secs(30))),
        None
    );
    assert_eq!(
        refused(w.observe(&s(1), r(2, 0), t0 + Duration::from_secs(31))),
        Some(("ep-1".into(), 1, 0))
    );
    // A forgotten endpoint starts over from a baseline.
    w.retain(&BTreeSet::from([2]));
    assert_eq!(
        refused(w.observe(&s(1), r(9, 9), t0 + Duration::from_secs(50))),
        None
    );
}

#[test]
fn a_stalled_sink_costs_records_in_the_file_not_time() {
    // A pipe nobody reads: the writer blocks once the pipe is full.
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[1] is ours; the File owns and closes it.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    let m = file.metadata().unwrap();
    // The path names the pipe itself, so the rotation check leaves it be.
    let sink = Sink::File {
        path: format!("/proc/self/fd/{}", fds[1]).into(),
        file,
        id: (m.dev(), m.ino()),
    };
    let events = Events::build(16, Some(sink), 4);
    let (done_tx, done) = std::sync::mpsc::channel();
    let emitter = events.clone();
    std::thread::spawn(move || {
        // About 2 MB of records: far more than the pipe holds.
        for n in 0..20_000 {
            emitter.emit(stopped(n));
        }
        let _ = done_tx.send(());
    });
    done.recv_timeout(Duration::from_secs(10))
        .expect("emitting waited for the stalled sink");
    assert!(events.lost() > 0, "nothing was counted as lost");
    assert_eq!(events.recent().len(), 16, "the ring has the latest");
    // SAFETY: the read end is ours; closing it lets the writer fail and go.
    unsafe { libc::close(fds[0]) };
}

#[test]
fn on_a_fresh_dataplane_refusals_before_the_first_reading_are_reported() {
    let mut w = CapWatch::new(Duration::from_secs(10), false);
    let s = CapSubject {
        id: 4,
        endpoint: "ep-4".into(),
        service: "dns".into(),
        max_flows: 3,
        new_flows_per_second: 0,
    };
    let counts = Refusals {
        max_flows: 2,
        rate: 0,
    };
    match w.observe(&s, counts, Instant::now()) {
        Some(Event::CapReached {
            refused_max_flows, ..
        }) => assert_eq!(refused_max_flows, 2),
        other => panic!("{other:?}"),
    }
}
