//! The fleet's shared store: approval decisions and stable ids in etcd
//! (docs/FLEET.md, "The shared store").
//!
//! The shared part of the state (ids, decisions, generation: a
//! [`PersistedState`] without the node-local `dataplane` binding) is one JSON
//! document under `<prefix>/state`. Every write is a transaction that
//! compares the key's mod revision with the one the writer last read, so
//! two nodes never allocate ids or decide from different bases: the loser
//! re-reads and folds its change into the newer document. Each node watches
//! the key and applies what another node wrote; a probe every
//! [`PROBE_INTERVAL`] keeps `up` current while nothing changes and, after
//! etcd comes back, brings a node up to date even if the watch missed a
//! change.
//!
//! The etcd client is async; the controller is not. The client lives on a
//! thread of its own with a current-thread runtime, and the controller's
//! calls are requests answered over a channel with a deadline, so they work
//! from any thread, inside or outside another runtime.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
        mpsc as std_mpsc,
    },
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use crate::{config::EtcdConfig, state::PersistedState};

/// How often a node checks that etcd answers (and what it holds).
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the fleet store (etcd at {endpoints}) does not answer: {why}. Check that etcd runs and that this node reaches it (`etcdctl --endpoints={endpoints} endpoint health`)"
    )]
    Unreachable { endpoints: String, why: String },
    #[error(
        "another node changed the fleet's shared state at the same time; this node has taken the newer state, retry the command"
    )]
    Conflict,
    #[error("the fleet store's state under {key} is not readable: {why}")]
    Corrupt { key: String, why: String },
}

/// A shared document as read: the state and the key's mod revision.
#[derive(Debug, Clone)]
pub struct Shared {
    pub state: PersistedState,
    pub revision: i64,
}

/// A document as etcd holds it: its bytes and mod revision.
type Raw = (Vec<u8>, i64);

enum Request {
    Load(std_mpsc::Sender<Result<Option<Raw>, String>>),
    /// Write `value` if the key's mod revision is still `expected` (0: the
    /// key must not exist). Answers the new revision, or None if it moved.
    Put {
        value: Vec<u8>,
        expected: i64,
        reply: std_mpsc::Sender<Result<Option<i64>, String>>,
    },
}

/// A connection to the fleet's etcd (see the module docs).
pub struct SharedStore {
    requests: mpsc::UnboundedSender<Request>,
    updates: Option<mpsc::UnboundedReceiver<Shared>>,
    up: Arc<AtomicBool>,
    /// Highest revision seen by the watch or the probe.
    seen: Arc<AtomicI64>,
    key: String,
    endpoints: String,
    timeout: Duration,
}

impl SharedStore {
    /// Starts the client thread. Nothing is contacted yet: [`SharedStore::load`]
    /// is the first request.
    pub fn start(cfg: &EtcdConfig) -> Result<Self, StoreError> {
        let key = format!("{}/state", cfg.prefix);
        let endpoints = cfg.endpoints.join(",");
        let timeout = cfg.timeout.0;
        let (requests, rx) = mpsc::unbounded_channel();
        let (updates_tx, updates) = mpsc::unbounded_channel();
        let up = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicI64::new(0));
        let worker = Worker {
            endpoints: cfg.endpoints.clone(),
            key: key.clone(),
            timeout,
            up: up.clone(),
            seen: seen.clone(),
            updates: updates_tx,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unreachable {
                endpoints: endpoints.clone(),
                why: format!("starting the client's runtime: {e}"),
            })?;
        std::thread::Builder::new()
            .name("plink-etcd".into())
            .spawn(move || runtime.block_on(worker.run(rx)))
            .map_err(|e| StoreError::Unreachable {
                endpoints: endpoints.clone(),
                why: format!("starting the client's thread: {e}"),
            })?;
        Ok(Self {
            requests,
            updates: Some(updates),
            up,
            seen,
            key,
            endpoints,
            timeout,
        })
    }

    /// Whether etcd answered the last request, watch or probe.
    pub fn up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// The flag behind [`SharedStore::up`], for `/metrics`.
    pub fn up_flag(&self) -> Arc<AtomicBool> {
        self.up.clone()
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Documents other nodes wrote (from the watch and the probe), newest
    /// last; taken once, by whoever applies them.
    pub fn take_updates(&mut self) -> Option<mpsc::UnboundedReceiver<Shared>> {
        self.updates.take()
    }

    fn unreachable(&self, why: impl Into<String>) -> StoreError {
        StoreError::Unreachable {
            endpoints: self.endpoints.clone(),
            why: why.into(),
        }
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(std_mpsc::Sender<Result<T, String>>) -> Request,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std_mpsc::channel();
        self.requests
            .send(make(tx))
            .map_err(|_| self.unreachable("the client thread stopped"))?;
        // The worker bounds each request by `timeout`; a little slack for
        // the hand-over.
        match rx.recv_timeout(self.timeout * 2 + Duration::from_millis(500)) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(why)) => Err(self.unreachable(why)),
            Err(_) => Err(self.unreachable(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// The shared document, or None if no node wrote one yet.
    pub fn load(&self) -> Result<Option<Shared>, StoreError> {
        let Some((value, revision)) = self.ask(Request::Load)? else {
            return Ok(None);
        };
        let state = decode(&self.key, &value)?;
        Ok(Some(Shared { state, revision }))
    }

    /// Writes `state` if the document is still at `expected` (0: absent);
    /// returns the new revision. [`StoreError::Conflict`] if another node
    /// wrote in between.
    pub fn put(&self, state: &PersistedState, expected: i64) -> Result<i64, StoreError> {
        let shared = PersistedState {
            dataplane: None,
            ..state.clone()
        };
        let value = serde_json::to_vec(&shared).map_err(|e| StoreError::Corrupt {
            key: self.key.clone(),
            why: e.to_string(),
        })?;
        match self.ask(|reply| Request::Put {
            value,
            expected,
            reply,
        })? {
            Some(rev) => Ok(rev),
            None => Err(StoreError::Conflict),
        }
    }

    /// Highest revision of the document seen so far.
    pub fn seen_revision(&self) -> i64 {
        self.seen.load(Ordering::SeqCst)
    }
}

fn decode(key: &str, value: &[u8]) -> Result<PersistedState, StoreError> {
    let mut state: PersistedState =
        serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
            key: key.to_owned(),
            why: e.to_string(),
        })?;
    if let Err(why) = state.check_shared() {
        return Err(StoreError::Corrupt {
            key: key.to_owned(),
            why,
        });
    }
    state.version = crate::state::STATE_VERSION;
    Ok(state)
}

struct Worker {
    endpoints: Vec<String>,
    key: String,
    timeout: Duration,
    up: Arc<AtomicBool>,
    seen: Arc<AtomicI64>,
    updates: mpsc::UnboundedSender<Shared>,
}

impl Worker {
    async fn client(&self, slot: &mut Option<Client>) -> Result<Client, String> {
        if let Some(c) = slot {
            return Ok(c.clone());
        }
        let opts = ConnectOptions::new()
            .with_timeout(self.timeout)
            .with_connect_timeout(self.timeout);
        let c = tokio::time::timeout(self.timeout, Client::connect(&self.endpoints, Some(opts)))
            .await
            .map_err(|_| format!("connecting took longer than {:?}", self.timeout))?
            .map_err(|e| format!("connecting: {e}"))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn get(&self, slot: &mut Option<Client>) -> Result<Option<Raw>, String> {
        let mut c = self.client(slot).await?;
        let r = tokio::time::timeout(self.timeout, c.get(self.key.as_str(), None))
            .await
            .map_err(|_| format!("reading {} took longer than {:?}", self.key, self.timeout))
            .and_then(|r| r.map_err(|e| format!("reading {}: {e}", self.key)));
        self.up.store(r.is_ok(), Ordering::SeqCst);
        if r.is_err() {
            // A fresh connection for the next request.
            *slot = None;
        }
        let r = r?;
        Ok(r.kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    async fn put(
        &self,
        slot: &mut Option<Client>,
        value: Vec<u8>,
        expected: i64,
    ) -> Result<Option<i64>, String> {
        let mut c = self.client(slot).await?;
        let key = self.key.as_str();
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key, value, None)]);
        let r = tokio::time::timeout(self.timeout, c.txn(txn))
            .await
            .map_err(|_| format!("writing {key} took longer than {:?}", self.timeout))
            .and_then(|r| r.map_err(|e| format!("writing {key}: {e}")));
        self.up.store(r.is_ok(), Ordering::SeqCst);
        if r.is_err() {
            *slot = None;
        }
        let r = r?;
        if !r.succeeded() {
            return Ok(None);
        }
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        Ok(Some(rev))
    }

    /// Hands a document to the controller if it is newer than any seen.
    fn offer(&self, value: &[u8], revision: i64) {
        if revision <= self.seen.load(Ordering::SeqCst) {
            return;
        }
        self.seen.store(revision, Ordering::SeqCst);
        match decode(&self.key, value) {
            Ok(state) => {
                let _ = self.updates.send(Shared { state, revision });
            }
            Err(e) => tracing::error!("fleet store: ignoring revision {revision}: {e}"),
        }
    }

    async fn run(self, mut requests: mpsc::UnboundedReceiver<Request>) {
        let mut client: Option<Client> = None;
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch: Option<etcd_client::WatchStream> = None;
        loop {
            tokio::select! {
                req = requests.recv() => {
                    let Some(req) = req else { return };
                    match req {
                        Request::Load(reply) => {
                            let r = self.get(&mut client).await;
                            if let Ok(Some((_, rev))) = &r {
                                self.seen.fetch_max(*rev, Ordering::SeqCst);
                            }
                            let _ = reply.send(r);
                        }
                        Request::Put { value, expected, reply } => {
                            let r = self.put(&mut client, value, expected).await;
                            if let Ok(Some(rev)) = &r {
                                // Our own write: not an update to apply.
                                self.seen.fetch_max(*rev, Ordering::SeqCst);
                            }
                            let _ = reply.send(r);
                        }
                    }
                }
                msg = async {
                    match watch.as_mut() {
                        Some(w) => w.message().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match msg {
                        Ok(Some(resp)) => {
                            self.up.store(true, Ordering::SeqCst);
                            for ev in resp.events() {
                                if ev.event_type() == EventType::Put
                                    && let Some(kv) = ev.kv()
                                {
                                    self.offer(kv.value(), kv.mod_revision());
                                }
                            }
                        }
                        Ok(None) | Err(_) => {
                            tracing::warn!("fleet store: the watch on {} ended; the probe re-opens it", self.key);
                            self.up.store(false, Ordering::SeqCst);
                            watch = None;
                            client = None;
                        }
                    }
                }
                _ = probe.tick() => {
                    match self.get(&mut client).await {
                        Ok(found) => {
                            if let Some((value, rev)) = found {
                                self.offer(&value, rev);
                            }
                            if watch.is_none()
                                && let Ok(mut c) = self.client(&mut client).await
                            {
                                let from = self.seen.load(Ordering::SeqCst) + 1;
                                let opts = WatchOptions::new().with_start_revision(from);
                                match tokio::time::timeout(self.timeout, c.watch(self.key.as_str(), Some(opts))).await {
                                    Ok(Ok(s)) => watch = Some(s),
                                    Ok(Err(e)) => tracing::debug!("fleet store: watch: {e}"),
                                    Err(_) => tracing::debug!("fleet store: watch timed out"),
                                }
                            }
                        }
                        Err(e) => {
                            if self.up.swap(false, Ordering::SeqCst) {
                                tracing::warn!("fleet store down: {e}; forwarding goes on with the last decisions");
                            }
                            client = None;
                            watch = None;
                        }
                    }
                }
            }
        }
    }
}

/// Whether two states agree on everything the fleet shares (ids and
/// decisions), whatever their generations.
pub fn same_shared(a: &PersistedState, b: &PersistedState) -> bool {
    a.networks == b.networks
        && a.services == b.services
        && a.backends == b.backends
        && a.endpoints == b.endpoints
        && a.link_ids == b.link_ids
        && a.decisions == b.decisions
}

/// Whether `folded` (a node's config folded into `base`) has ids or
/// decisions `base` lacks: the objects of that node's config the fleet has
/// not allocated yet, which the node must write before it can run them.
pub fn adds_to(folded: &PersistedState, base: &PersistedState) -> bool {
    fn new_keys<K: Ord + Clone>(
        a: &crate::state::IdTable<K>,
        b: &crate::state::IdTable<K>,
    ) -> bool {
        a.iter().any(|(k, _)| b.get(k).is_none())
    }
    new_keys(&folded.networks, &base.networks)
        || new_keys(&folded.services, &base.services)
        || new_keys(&folded.backends, &base.backends)
        || new_keys(&folded.endpoints, &base.endpoints)
        || folded
            .link_ids
            .iter()
            .any(|(k, _)| base.link_ids.get(k).is_none())
        || folded
            .decisions
            .keys()
            .any(|k| !base.decisions.contains_key(k))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::Config, state};

    const BASE: &str = "\
interfaces:
  - {name: c1, role: consumer, network: vnet-a}
  - {name: p0, role: provider}
services:
  - name: orders
    protocol: tcp
    ports: [{port: 80}]
    backends: [{address: 198.51.100.10}]
    nat: {addresses: [198.51.100.201]}
    visibility: ['*']
endpoints:
  - {name: orders-a, tenant: t, network: vnet-a, address: 192.0.2.50, service: orders}
";

    fn cfg(text: &str) -> Config {
        Config::parse(Path::new("t.yaml"), text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_same_config_folds_into_the_shared_state_without_changes() {
        let shared = state::reconcile(&cfg(BASE), &PersistedState::default()).unwrap();
        let folded = state::reconcile(&cfg(BASE), &shared).unwrap();
        assert!(same_shared(&folded, &shared));
        assert!(!adds_to(&folded, &shared));
        assert_ne!(
            folded.generation, shared.generation,
            "generations do not matter"
        );
    }

    #[test]
    fn a_node_with_a_new_endpoint_adds_to_the_shared_state_one_without_does_not() {
        let shared = state::reconcile(&cfg(BASE), &PersistedState::default()).unwrap();
        let more = format!(
            "{BASE}  - {{name: orders-b, tenant: t, network: vnet-a, address: 192.0.2.51, service: orders}}\n"
        );
        let folded = state::reconcile(&cfg(&more), &shared).unwrap();
        assert!(adds_to(&folded, &shared) && !same_shared(&folded, &shared));
        // The older config releases orders-b: a difference, but no addition,
        // so the node runs it without writing back (no ping-pong).
        let back = state::reconcile(&cfg(BASE), &folded).unwrap();
        assert!(!same_shared(&back, &folded));
        assert!(!adds_to(&back, &folded));
    }

    #[test]
    fn a_shared_state_of_another_version_or_with_bad_ids_is_refused() {
        let mut s = state::reconcile(&cfg(BASE), &PersistedState::default()).unwrap();
        assert!(s.check_shared().is_ok());
        let text = serde_json::to_vec(&s).unwrap();
        assert!(decode("/k", &text).is_ok());
        s.version = 99;
        let text = serde_json::to_vec(&s).unwrap();
        assert!(matches!(
            decode("/k", &text),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            decode("/k", b"{"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
