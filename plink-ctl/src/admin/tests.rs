//! The admin API end to end, in-process: a real Unix socket in a temp dir,
//! the real controller and state file, no XDP.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use super::*;
use crate::{
    approval::{ConnectionState, Reason},
    controller::{
        ActionOutcome, Applier, ApplyFailure, Controller, ControllerError, ReloadOutcome, Status,
    },
    model::EndpointModel,
    state::StateError,
};

const CONFIG: &str = "\
gateway:
  admin_socket: DIR/plink.sock
  state_dir: DIR/state
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: c2, role: consumer, network: vnet-b}
  - {name: p0, role: provider}
services:
  - name: orders
    protocol: tcp
    ports: [{port: 80, target_port: 8080}]
    backends: [{address: 198.51.100.10}, {address: 198.51.100.11}]
    nat: {addresses: [198.51.100.200]}
    visibility: [tenant-a, tenant-b]
    auto_approve: [tenant-a]
endpoints:
  - {name: orders-a, tenant: tenant-a, network: vnet-a, address: 192.0.2.50, service: orders}
  - {name: orders-b, tenant: tenant-b, network: vnet-b, address: 192.0.2.50, service: orders}
  - {name: orders-c, tenant: tenant-c, network: vnet-b, address: 192.0.2.51, service: orders}
";

/// A temp dir with a config file in it.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Self { dir };
        s.write_config(CONFIG);
        s
    }
    fn config_path(&self) -> PathBuf {
        self.dir.path().join("plink.yaml")
    }
    fn socket(&self) -> PathBuf {
        self.dir.path().join("plink.sock")
    }
    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state/state.json")
    }
    fn write_config(&self, text: &str) {
        let text = text.replace("DIR", &self.dir.path().display().to_string());
        std::fs::write(self.config_path(), text).expect("write config");
    }
    fn start(&self) -> Daemon {
        Daemon::start(&self.config_path()).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// An admin server on its own thread and runtime; stopped when dropped.
struct Daemon {
    controller: Arc<Mutex<Controller>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(config: &Path) -> Result<Self, ControllerError> {
        Self::serve(Controller::open(config)?)
    }

    /// With a dataplane stand-in that answers as `script` says.
    fn start_with(config: &Path, script: Script) -> Result<Self, ControllerError> {
        let mut controller = Controller::prepare(config, crate::config::Config::load(config)?)?;
        controller.start(
            Box::new(ScriptedApplier(script)),
            Some("test-dataplane".into()),
        )?;
        Self::serve(controller)
    }

    fn serve(controller: Controller) -> Result<Self, ControllerError> {
        let socket = controller.config().gateway.admin_socket.clone();
        let controller = Arc::new(Mutex::new(controller));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // Bound before the thread starts: once `start` returns, clients connect.
        let listener = rt
            .block_on(async { AdminListener::bind(&socket) })
            .expect("bind");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = serve(listener, controller.clone(), async {
            let _ = stopped.await;
        });
        let thread = std::thread::spawn(move || rt.block_on(server));
        Ok(Self {
            controller,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the stand-in dataplane answers to the next applies (then `Ok`).
type Script = Arc<Mutex<std::collections::VecDeque<Result<(), ApplyFailure>>>>;

struct ScriptedApplier(Script);

impl Applier for ScriptedApplier {
    fn apply(&mut self, _: &crate::model::Model) -> Result<(), ApplyFailure> {
        self.0.lock().expect("script").pop_front().unwrap_or(Ok(()))
    }
}

/// The saved state of endpoint `name` in the state file.
fn saved_state(s: &Setup, name: &str) -> String {
    let text = std::fs::read_to_string(s.state_file()).expect("state file");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    json["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .find(|d| d["endpoint"]["name"] == name)
        .and_then(|d| d["state"].as_str())
        .expect("decision")
        .to_owned()
}

fn call(socket: &Path, req: Request) -> Response {
    request(socket, &req).unwrap_or_else(|e| panic!("{e}"))
}

fn data<T: serde::de::DeserializeOwned>(r: Response) -> T {
    assert!(r.ok, "refused: {r:?}");
    serde_json::from_value(r.data.expect("data")).expect("decode")
}

fn endpoint(socket: &Path, name: &str) -> EndpointModel {
    // Streamed rows, collected by `request` into an array.
    let list: Vec<EndpointModel> = data(call(socket, Request::ListEndpoints));
    list.into_iter().find(|e| e.name == name).expect("listed")
}

fn refused(r: Response, words: &str) {
    assert!(!r.ok, "accepted: {r:?}");
    let all = format!(
        "{} {}",
        r.error.clone().unwrap_or_default(),
        r.details.join("\n")
    );
    assert!(all.contains(words), "{words:?} not in {all}");
}

#[test]
fn approval_workflow_over_the_socket() {
    let s = Setup::new();
    let _d = s.start();
    let sock = s.socket();
    let list: Vec<EndpointModel> = data(call(&sock, Request::ListEndpoints));
    let states: Vec<_> = list
        .iter()
        .map(|e| (e.name.as_str(), e.state, e.reason))
        .collect();
    assert_eq!(
        states,
        [
            ("orders-a", ConnectionState::Approved, Reason::AutoApproved),
            (
                "orders-b",
                ConnectionState::Pending,
                Reason::AwaitingApproval
            ),
            ("orders-c", ConnectionState::Rejected, Reason::NotVisible),
        ]
    );

    let out: ActionOutcome = data(call(
        &sock,
        Request::Approve {
            name: "orders-b".into(),
        },
    ));
    assert!(out.changed);
    assert_eq!(out.endpoint.state, ConnectionState::Approved);
    let again: ActionOutcome = data(call(
        &sock,
        Request::Approve {
            name: "orders-b".into(),
        },
    ));
    assert!(!again.changed);

    // Approving an endpoint whose tenant is not visible is refused, with why.
    refused(
        call(
            &sock,
            Request::Approve {
                name: "orders-c".into(),
            },
        ),
        "tenant \"tenant-c\" is not in the visibility list of service \"orders\"",
    );
    assert_eq!(endpoint(&sock, "orders-c").state, ConnectionState::Rejected);

    let out: ActionOutcome = data(call(
        &sock,
        Request::Reject {
            name: "orders-a".into(),
        },
    ));
    assert_eq!(out.endpoint.state, ConnectionState::Rejected);
    let out: ActionOutcome = data(call(
        &sock,
        Request::Approve {
            name: "orders-a".into(),
        },
    ));
    assert_eq!(out.endpoint.state, ConnectionState::Approved);

    let out: ActionOutcome = data(call(
        &sock,
        Request::Remove {
            name: "orders-b".into(),
        },
    ));
    assert_eq!(out.endpoint.state, ConnectionState::Removed);
    refused(
        call(
            &sock,
            Request::Approve {
                name: "orders-b".into(),
            },
        ),
        "removed, which is final",
    );
    refused(
        call(
            &sock,
            Request::Reject {
                name: "orders-b".into(),
            },
        ),
        "removed, which is final",
    );

    refused(
        call(
            &sock,
            Request::Approve {
                name: "nope".into(),
            },
        ),
        "no endpoint named \"nope\"",
    );

    let st: Status = data(call(&sock, Request::Status));
    assert_eq!(
        (
            st.endpoints_approved,
            st.endpoints_rejected,
            st.endpoints_removed,
            st.endpoints_pending
        ),
        (1, 1, 1, 0)
    );
    assert_eq!(st.state_file, s.state_file());
}

#[test]
fn bad_requests_are_answered_not_dropped() {
    use std::io::{BufRead as _, Write as _};
    let s = Setup::new();
    let _d = s.start();
    let mut stream = std::os::unix::net::UnixStream::connect(s.socket()).expect("connect");
    stream
        .write_all(b"{\"command\":\"fly\"}\n{\"command\":\"status\"}\n")
        .expect("write");
    let mut lines = std::io::BufReader::new(stream).lines();
    let first: Response =
        serde_json::from_str(&lines.next().expect("line").expect("read")).expect("json");
    refused(first, "bad request");
    let second: Response =
        serde_json::from_str(&lines.next().expect("line").expect("read")).expect("json");
    assert!(second.ok, "the connection stays usable: {second:?}");
}

#[test]
fn decisions_persist_across_a_restart() {
    let s = Setup::new();
    {
        let _d = s.start();
        data::<ActionOutcome>(call(
            &s.socket(),
            Request::Approve {
                name: "orders-b".into(),
            },
        ));
        data::<ActionOutcome>(call(
            &s.socket(),
            Request::Remove {
                name: "orders-a".into(),
            },
        ));
    }
    assert!(!s.socket().exists(), "a stopped server removes its socket");
    let saved = std::fs::read_to_string(s.state_file()).expect("state file");
    assert!(saved.contains("\"approved\""), "{saved}");

    let _d = s.start();
    assert_eq!(
        endpoint(&s.socket(), "orders-b").state,
        ConnectionState::Approved
    );
    assert_eq!(
        endpoint(&s.socket(), "orders-a").state,
        ConnectionState::Removed
    );
    let ids_before = endpoint(&s.socket(), "orders-b").id;
    drop(_d);
    let _d = s.start();
    assert_eq!(
        endpoint(&s.socket(), "orders-b").id,
        ids_before,
        "ids survive restarts"
    );
}

#[test]
fn a_corrupt_state_file_is_refused_and_kept() {
    let s = Setup::new();
    drop(s.start());
    let garbage = "{\"version\": 1, \"generation\": 3, \"networks\": tru";
    std::fs::write(s.state_file(), garbage).expect("write");
    let err = match Daemon::start(&s.config_path()) {
        Ok(_) => panic!("started with a corrupt state file"),
        Err(e) => e,
    };
    assert!(
        matches!(err, ControllerError::State(StateError::Corrupt { .. })),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&s.state_file().display().to_string()), "{msg}");
    assert!(
        msg.contains("is corrupt") && msg.contains("line 1 column"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(s.state_file()).expect("read"),
        garbage,
        "left untouched"
    );
    assert!(!s.socket().exists(), "nothing was served");

    // A state file from a future format says so.
    std::fs::write(s.state_file(), "{\"version\": 99}").expect("write");
    let err = Controller::open(&s.config_path()).err().expect("refused");
    assert!(err.to_string().contains("format version 99"), "{err}");
}

#[test]
fn one_controller_per_state_dir() {
    let s = Setup::new();
    let _c = Controller::open(&s.config_path()).expect("first");
    let err = Controller::open(&s.config_path())
        .err()
        .expect("second refused");
    assert!(
        matches!(err, ControllerError::State(StateError::Locked { .. })),
        "{err:?}"
    );
}

#[test]
fn reload_applies_valid_and_refuses_invalid_config() {
    let s = Setup::new();
    let d = s.start();
    let mut models = d.controller.lock().expect("lock").subscribe();
    let sock = s.socket();
    data::<ActionOutcome>(call(
        &sock,
        Request::Approve {
            name: "orders-b".into(),
        },
    ));
    assert!(
        models.has_changed().expect("sender alive"),
        "approval published a model"
    );
    let published = models.borrow_and_update().clone();
    assert_eq!(
        published.endpoint_by_name("orders-b").expect("b").state,
        ConnectionState::Approved
    );

    // Invalid: refused with file:line:column, nothing changes.
    s.write_config(&CONFIG.replace("[198.51.100.200]", "[198.51.100.10]"));
    let r = call(&sock, Request::Reload);
    let cfg = s.config_path().display().to_string();
    refused(r.clone(), "running configuration is unchanged");
    refused(
        r,
        &format!(
            "{cfg}:13:23: services[0].nat.addresses[0]: NAT address 198.51.100.10 is also a backend"
        ),
    );
    assert_eq!(endpoint(&sock, "orders-b").state, ConnectionState::Approved);
    assert!(
        !models.has_changed().expect("alive"),
        "a refused reload publishes nothing"
    );

    // Restart-only fields are refused and named.
    s.write_config(&CONFIG.replace("gateway:\n", "gateway:\n  conntrack: {max_flows: 1000}\n"));
    refused(
        call(&sock, Request::Reload),
        "gateway.conntrack.max_flows changed",
    );

    // Tables that do not fit the lookup table sized at start are refused
    // before anything changes (the dataplane could not apply them).
    s.write_config(&CONFIG.replace(
        "    auto_approve: [tenant-a]\n",
        "    auto_approve: [tenant-a]\n    maglev_table_size: 16777213\n",
    ));
    refused(
        call(&sock, Request::Reload),
        "need 33554426 lookup-table slots",
    );
    assert!(
        !models.has_changed().expect("alive"),
        "a refused reload publishes nothing"
    );

    // Narrowing visibility turns approved into rejected.
    s.write_config(&CONFIG.replace("visibility: [tenant-a, tenant-b]", "visibility: [tenant-a]"));
    let out: ReloadOutcome = data(call(&sock, Request::Reload));
    assert_eq!(out.changes, ["endpoints: 0 added, 0 removed, 1 changed"]);
    let b = endpoint(&sock, "orders-b");
    assert_eq!(
        (b.state, b.reason),
        (ConnectionState::Rejected, Reason::VisibilityNarrowed)
    );
    assert!(models.has_changed().expect("alive"));
}

#[test]
fn socket_mode_is_0600() {
    let s = Setup::new();
    let _d = s.start();
    let mode = std::fs::metadata(s.socket())
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
}

#[test]
fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
    let s = Setup::new();
    let _d = s.start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let err = rt
        .block_on(async { AdminListener::bind(&s.socket()) })
        .err()
        .expect("in use");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    drop(_d);
    // A socket file nobody listens on (a crashed daemon's) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(s.socket()).expect("stale");
    drop(stale);
    assert!(s.socket().exists());
    let _d = s.start();
    assert!(call(&s.socket(), Request::Status).ok);
}

/// Runs `f` in a forked child that has dropped to uid/gid 65534 (nobody)
/// and returns the child's exit code. The tests run as root.
fn as_nobody(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: plain fork; the child only makes syscalls and small
    // allocations (glibc's malloc is fork-safe), then _exit()s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // Drop every inherited fd at once: the parent's other tests hold
        // state-dir locks (flock follows the open file) that a child must
        // not keep alive.
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
        let code = unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                100
            } else {
                f()
            }
        };
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid);
    assert!(libc::WIFEXITED(status), "child died: {status}");
    libc::WEXITSTATUS(status)
}

#[test]
fn non_root_clients_are_refused() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root to drop to nobody"
    );
    let s = Setup::new();
    let _d = s.start();
    // Let nobody reach the socket file, so the socket's own mode decides.
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let sock = s.socket();

    // Mode 0600: the kernel refuses the connect itself.
    let code = as_nobody(|| match std::os::unix::net::UnixStream::connect(&sock) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => 0,
        Err(_) => 2,
        Ok(_) => 1,
    });
    assert_eq!(
        code, 0,
        "a non-root connect to the 0600 socket must fail with EACCES"
    );

    // Even with the mode loosened, SO_PEERCRED keeps non-root out.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod sock");
    let code = as_nobody(|| match request(&sock, &Request::ListEndpoints) {
        Ok(r)
            if !r.ok
                && r.error
                    .as_deref()
                    .is_some_and(|e| e.contains("permission denied"))
                && r.data.is_none() =>
        {
            0
        }
        Ok(_) => 1,
        Err(_) => 2,
    });
    assert_eq!(code, 0, "a non-root client must get a refusal and no data");
    // Root still gets served.
    assert!(call(&sock, Request::Status).ok);
}

/// Issue 14: an admin command answers only once the kernel holds its
/// result, and a decision is saved only then. The old controller saved the
/// decision, answered `rejected` and left the failure to its log.
#[test]
fn a_change_the_dataplane_did_not_take_is_an_error_and_is_not_saved() {
    let s = Setup::new();
    let script: Script = Arc::default();
    let _d = Daemon::start_with(&s.config_path(), script.clone()).expect("start");
    let reject = || {
        call(
            &s.socket(),
            Request::Reject {
                name: "orders-a".into(),
            },
        )
    };
    let status = || data::<Status>(call(&s.socket(), Request::Status));
    assert!(status().dataplane.attached && status().dataplane.in_sync);
    assert_eq!(status().dataplane_id.as_deref(), Some("test-dataplane"));

    // A write fails part way; putting the previous model back works.
    script.lock().unwrap().extend([
        Err(ApplyFailure::Failed("map ENDPOINTS: no space left".into())),
        Ok(()),
    ]);
    refused(reject(), "no space left");
    assert_eq!(saved_state(&s, "orders-a"), "approved", "nothing was saved");
    assert_eq!(
        endpoint(&s.socket(), "orders-a").state,
        ConnectionState::Approved
    );
    let st = status();
    assert!(st.dataplane.in_sync, "restored: {st:?}");
    assert_eq!(st.dataplane.apply_failures, 1);
    assert!(
        st.dataplane
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("no space left"))
    );

    // Putting it back fails too: the dataplane has diverged, and says so.
    script.lock().unwrap().extend([
        Err(ApplyFailure::Failed("first".into())),
        Err(ApplyFailure::Failed("second".into())),
    ]);
    refused(reject(), "DIVERGED");
    assert!(!status().dataplane.in_sync);
    assert_eq!(saved_state(&s, "orders-a"), "approved");

    // A change the plan refuses wrote nothing: no failure counted.
    script
        .lock()
        .unwrap()
        .push_back(Err(ApplyFailure::Refused("NAT address in use".into())));
    refused(reject(), "nothing was changed");
    assert_eq!(status().dataplane.apply_failures, 3);

    // The next change that takes converges the dataplane and is saved.
    let out: ActionOutcome = data(reject());
    assert_eq!(out.endpoint.state, ConnectionState::Rejected);
    assert_eq!(saved_state(&s, "orders-a"), "rejected");
    assert!(status().dataplane.in_sync);
}

/// A dataplane stand-in with `n` flows.
struct ManyFlows(u32);

impl crate::controller::DataplaneQueries for ManyFlows {
    fn conntrack(&self, row: &mut dyn FnMut(FlowRow) -> anyhow::Result<()>) -> anyhow::Result<()> {
        use std::net::{Ipv4Addr, SocketAddrV4};
        for i in 0..self.0 {
            row(FlowRow {
                endpoint: Some("orders-a".into()),
                network: Some("vnet-a".into()),
                network_id: 1,
                protocol: "tcp".into(),
                client: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), (1024 + i % 60_000) as u16)
                    .into(),
                endpoint_address: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 50), 80).into(),
                nat: SocketAddrV4::new(
                    Ipv4Addr::new(198, 51, 100, 200),
                    (20_000 + i % 10_000) as u16,
                )
                .into(),
                backend: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 10), 8080).into(),
                backend_id: 0,
                tcp_state: 3,
                ingress_ifindex: 2,
                expires_in_ms: 7_440_000,
                proxy_header_len: 0,
            })?;
        }
        Ok(())
    }
}

/// Issue 14, item 8: a listing of thousands of flows used to overflow the
/// client's 1 MiB answer limit (about 4,000 flows), then was one line of
/// any size; now it streams one line per flow, read back as the typed row.
#[test]
fn a_conntrack_listing_of_any_size_streams_row_by_row() {
    use std::io::{BufRead as _, Write as _};
    let s = Setup::new();
    let mut controller = Controller::open(&s.config_path()).expect("controller");
    controller.set_dataplane(Arc::new(ManyFlows(20_000)));
    let _d = Daemon::serve(controller).expect("serve");

    // On the wire: one line per row, each small, then the closing response.
    let mut raw = std::os::unix::net::UnixStream::connect(s.socket()).expect("connect");
    raw.write_all(b"{\"command\":\"conntrack\"}\n")
        .expect("send");
    let mut lines = std::io::BufReader::new(raw).lines();
    let mut rows = 0;
    let closing = loop {
        let line = lines.next().expect("an answer line").expect("read");
        assert!(
            line.len() < 1024,
            "a line of {} bytes: not streamed",
            line.len()
        );
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        match v.get("row") {
            Some(row) => {
                let f: FlowRow = serde_json::from_value(row.clone()).expect("a typed flow row");
                assert_eq!(f.nat.ip(), std::net::Ipv4Addr::new(198, 51, 100, 200));
                rows += 1;
            }
            None => break v,
        }
    };
    assert_eq!(rows, 20_000);
    assert_eq!(closing["ok"], true, "{closing}");
    assert_eq!(closing["data"]["rows"], 20_000, "{closing}");

    // Through the client: rows one by one, typed.
    let mut seen = 0;
    let r = request_rows(&s.socket(), &Request::Conntrack, |row| {
        let f: FlowRow =
            serde_json::from_value(row).map_err(|e| ClientError::Row(e.to_string()))?;
        assert_eq!(f.endpoint.as_deref(), Some("orders-a"));
        seen += 1;
        Ok(())
    })
    .expect("the whole answer arrives");
    assert!(r.ok, "{r:?}");
    assert_eq!(seen, 20_000);
}

/// Issue 14, item 8: listings are built without the controller's lock,
/// which an apply holds for as long as it writes the maps.
#[test]
fn listings_answer_while_an_apply_holds_the_controller() {
    let s = Setup::new();
    let mut controller = Controller::open(&s.config_path()).expect("controller");
    controller.set_dataplane(Arc::new(ManyFlows(3)));
    let d = Daemon::serve(controller).expect("serve");
    let held = d.controller.lock().expect("lock");
    for req in [Request::ListEndpoints, Request::Conntrack] {
        let (tx, rx) = std::sync::mpsc::channel();
        let socket = s.socket();
        let asked = req.clone();
        std::thread::spawn(move || {
            let _ = tx.send(request(&socket, &asked));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("{req:?} waited for the controller's lock"))
            .expect("answer");
        let rows = r.data.as_ref().and_then(|d| d.as_array()).map(Vec::len);
        // Three endpoints in the config, three flows in the stand-in.
        assert_eq!(rows, Some(3), "{req:?}: {r:?}");
    }
    drop(held);
}

/// Issue 14, item 3: the state file records the dataplane it belongs to;
/// pins of any other dataplane (or pins with a state that records none) are
/// refused with what to do.
#[test]
fn pins_are_adopted_only_with_the_state_file_bound_to_them() {
    let s = Setup::new();
    let pin_dir = s.dir.path().join("pins");
    {
        let mut c = Controller::prepare(
            &s.config_path(),
            crate::config::Config::load(&s.config_path()).expect("config"),
        )
        .expect("prepare");
        // Nothing pinned: a fresh start, whatever the state says.
        c.check_pins(None, &pin_dir).expect("fresh start");
        // Pins, and a state that records no dataplane.
        let err = c.check_pins(Some("boot b map 7"), &pin_dir).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("records no dataplane")
                && text.contains("plink-ctl down")
                && text.contains("boot b map 7"),
            "{text}"
        );
        // Binding a fresh dataplane writes the identity before any decision.
        c.bind_fresh_dataplane("boot b map 7").expect("bind");
        let saved = std::fs::read_to_string(s.state_file()).expect("state file");
        assert!(saved.contains("\"dataplane\": \"boot b map 7\""), "{saved}");
        c.check_pins(Some("boot b map 7"), &pin_dir)
            .expect("its own pins");
    }
    let c = Controller::prepare(
        &s.config_path(),
        crate::config::Config::load(&s.config_path()).expect("config"),
    )
    .expect("prepare");
    assert_eq!(
        c.dataplane_id(),
        Some("boot b map 7"),
        "the binding persists"
    );
    c.check_pins(Some("boot b map 7"), &pin_dir)
        .expect("adopts its own pins");
    let text = c
        .check_pins(Some("boot b map 9"), &pin_dir)
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("records dataplane boot b map 7") && text.contains("put it back"),
        "{text}"
    );
}

fn event_rows(socket: &Path) -> Vec<crate::events::Record> {
    data(call(socket, Request::Events { follow: false }))
}

fn kinds(records: &[crate::events::Record]) -> Vec<(String, String, String)> {
    records
        .iter()
        .map(|r| (r.kind(), r.subject.clone(), r.outcome.clone()))
        .collect()
}

#[test]
fn events_are_listed_and_followed_over_the_socket() {
    let s = Setup::new();
    let script = Script::default();
    let d = Daemon::start_with(&s.config_path(), script.clone()).expect("start");
    let t = |k: &str, s: &str, o: &str| (k.to_owned(), s.to_owned(), o.to_owned());
    // The first start decided every endpoint.
    assert_eq!(
        kinds(&event_rows(&s.socket())),
        [
            t("endpoint_created", "orders-a", "approved"),
            t("endpoint_approved", "orders-a", "approved"),
            t("endpoint_created", "orders-b", "pending"),
            t("endpoint_created", "orders-c", "rejected"),
            t("endpoint_rejected", "orders-c", "rejected"),
        ]
    );

    // A follower gets the ring, then each new event as it happens.
    let (tx, rx) = std::sync::mpsc::channel();
    let socket = s.socket();
    let follower = std::thread::spawn(move || {
        request_rows(&socket, &Request::Events { follow: true }, |row| {
            let _ = tx.send(row);
            Ok(())
        })
    });
    let next = || -> crate::events::Record {
        let row = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a followed event");
        serde_json::from_value(row).expect("a record")
    };
    for _ in 0..5 {
        next();
    }

    let r = call(
        &s.socket(),
        Request::Approve {
            name: "orders-b".into(),
        },
    );
    assert!(r.ok, "{r:?}");
    let e = next();
    assert_eq!(
        (e.kind(), e.subject.as_str(), e.outcome.as_str()),
        ("endpoint_approved".into(), "orders-b", "approved")
    );
    let v = serde_json::to_value(&e).expect("json");
    assert_eq!(v["details"]["by"], "admin");
    assert_eq!(v["details"]["from"], "pending");

    refused(
        call(
            &s.socket(),
            Request::Approve {
                name: "orders-c".into(),
            },
        ),
        "visibility",
    );
    assert_eq!(next().kind(), "endpoint_action_refused");

    // A refused reload lists each config error with its position.
    s.write_config(&CONFIG.replace("198.51.100.11", "198.51.100.999"));
    refused(call(&s.socket(), Request::Reload), "invalid");
    let e = next();
    assert_eq!(
        (e.kind(), e.outcome.as_str()),
        ("reload_refused".into(), "refused")
    );
    let crate::events::Event::ReloadRefused { errors, via, .. } = &e.event else {
        unreachable!()
    };
    assert_eq!(*via, crate::events::Trigger::Admin);
    assert!(
        errors.len() == 1 && errors[0].contains("plink.yaml:12:"),
        "{errors:?}"
    );

    // An apply that fails part way and is put back: both are recorded.
    s.write_config(CONFIG);
    script
        .lock()
        .expect("script")
        .push_back(Err(ApplyFailure::Failed("map full".into())));
    refused(
        call(
            &s.socket(),
            Request::Reject {
                name: "orders-b".into(),
            },
        ),
        "map full",
    );
    let failed = next();
    assert_eq!(
        (failed.kind(), failed.outcome.as_str()),
        ("apply_failed".into(), "restored")
    );
    assert_eq!(next().kind(), "dataplane_in_sync");

    drop(d);
    // The daemon is gone: the follow ends (an error, as the connection closed).
    let _ = follower.join().expect("follower thread");
}
