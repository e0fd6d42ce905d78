//! The controller's state: config, persisted decisions and ids, and the
//! current [`Model`]. Every change (admin action, reload) is computed on a
//! copy, persisted, and only then made current and published, so a failed
//! write or an invalid config leaves the running state as it was.
//!
//! The datapath learns of changes through [`Controller::subscribe`]: a
//! `tokio::sync::watch` channel carrying the latest `Arc<Model>`. A consumer
//! keeps the model it last applied and calls `Model::diff(&applied, &latest)`.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    approval::{self, Access, Action, ConnectionState, Refusal},
    config::{Config, ConfigError, Diagnostic},
    events::{self, Event, Events, Trigger},
    model::{EndpointModel, Model, ModelDiff, ModelError},
    state::{self, EndpointIdentity, PersistedState, ReconcileError, StateError, StateStore},
};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Ids(#[from] ReconcileError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] crate::fleet::StoreError),
    #[error("no endpoint named {0:?}; `plink-ctl endpoints list` shows them")]
    NoSuchEndpoint(String),
    #[error("cannot {action} endpoint {endpoint:?}: {why}")]
    Refused {
        endpoint: String,
        action: Action,
        why: Refusal,
    },
    #[error(
        "reload refused: {0} changed; it takes effect only when plink-ctl starts. Restart plink-ctl, or put the old value back and reload"
    )]
    RestartOnly(String),
    #[error(
        "reload refused: the Maglev tables need {needed} lookup-table slots (two per table slot, for the swap) but the table was sized at start for {capacity}; reduce maglev_table_size or the number of services, or restart plink-ctl to resize"
    )]
    LookupTableFull { needed: u64, capacity: u64 },
    /// Found by the plan before anything was written.
    #[error("refused: {0}; nothing was changed")]
    Plan(String),
    /// A write into the dataplane failed part way.
    #[error("the dataplane did not take the change: {why}. {}", restore_note(.restored))]
    ApplyFailed {
        why: String,
        /// `Some(error)` when putting the previous configuration back failed too.
        restored: Option<String>,
    },
    /// The first apply at start did not take.
    #[error("the dataplane did not take the configuration at start: {0}")]
    StartFailed(String),
    #[error(
        "refusing to adopt the dataplane pinned under {pin_dir}: the state file {state_file} does not belong to it ({}, the pins are dataplane {pinned}). The flows in the pins carry endpoint, network and backend ids from the state they were created with; combined with another state, flows could be handed to the wrong endpoint or consumer. If you have the state file of these pins, put it back and start again; otherwise run `plink-ctl down --config FILE` (detaches XDP and removes the pins: live flows are lost) and start again", recorded_note(.recorded)
    )]
    ForeignPins {
        pin_dir: PathBuf,
        state_file: PathBuf,
        pinned: String,
        recorded: Option<String>,
    },
}

fn restore_note(restored: &Option<String>) -> String {
    match restored {
        None => {
            "The dataplane was put back to the previous configuration; nothing was saved".into()
        }
        Some(e) => format!(
            "Putting the previous configuration back failed too ({e}): the dataplane has DIVERGED from the saved state (`plink-ctl status` shows it; a successful reload or restart converges it); nothing was saved"
        ),
    }
}

fn recorded_note(recorded: &Option<String>) -> String {
    match recorded {
        None => {
            "it records no dataplane: it is new, was reset, or predates dataplane identities".into()
        }
        Some(id) => format!("it records dataplane {id}"),
    }
}

/// Applies a model to the running dataplane (the gateway implements it).
pub trait Applier: Send {
    fn apply(&mut self, model: &Model) -> Result<(), ApplyFailure>;
    /// `plink-ctl drain`: withdraw every announced route from the next apply on.
    fn set_draining(&mut self, _on: bool) {}
}

/// Why [`Applier::apply`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyFailure {
    /// Found before anything was written: the dataplane is as it was.
    Refused(String),
    /// A write failed part way.
    Failed(String),
}

impl std::fmt::Display for ApplyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyFailure::Refused(s) | ApplyFailure::Failed(s) => f.write_str(s),
        }
    }
}

/// Whether the dataplane holds the committed model, for `status` and
/// `/metrics` (read without the controller's lock).
#[derive(Debug)]
pub struct ApplyHealth {
    attached: AtomicBool,
    in_sync: AtomicBool,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Default for ApplyHealth {
    fn default() -> Self {
        Self {
            attached: AtomicBool::new(false),
            in_sync: AtomicBool::new(true),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }
}

impl ApplyHealth {
    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// Returns true when the dataplane was out of sync before.
    fn synced(&self) -> bool {
        !self.in_sync.swap(true, Ordering::SeqCst)
    }

    fn failed(&self, why: &str) {
        self.failures.fetch_add(1, Ordering::SeqCst);
        self.in_sync.store(false, Ordering::SeqCst);
        self.set_error(Some(why.to_owned()));
    }

    /// True while the dataplane holds the committed model.
    pub fn in_sync(&self) -> bool {
        self.in_sync.load(Ordering::SeqCst)
    }

    /// Applies that failed part way since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> DataplaneStatus {
        DataplaneStatus {
            attached: self.attached.load(Ordering::SeqCst),
            in_sync: self.in_sync(),
            apply_failures: self.failures(),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// The dataplane part of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneStatus {
    /// A dataplane is attached (false for a controller without one).
    pub attached: bool,
    /// The kernel holds the committed configuration; false = diverged.
    pub in_sync: bool,
    /// Applies that failed part way since the controller started.
    pub apply_failures: u64,
    /// The last failure, kept after the dataplane converged again.
    pub last_error: Option<String>,
}

impl Default for DataplaneStatus {
    fn default() -> Self {
        Self {
            attached: false,
            in_sync: true,
            apply_failures: 0,
            last_error: None,
        }
    }
}

impl ControllerError {
    /// Config diagnostics, for the admin API to pass on one by one.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ControllerError::Config(e) => e.diagnostics(),
            _ => &[],
        }
    }
}

/// The result of an admin action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionOutcome {
    pub endpoint: EndpointModel,
    /// False when the endpoint already was in the asked-for state.
    pub changed: bool,
}

/// The result of a reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    pub config: PathBuf,
    /// One line per kind of object that changed; empty if nothing did.
    pub changes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub config: PathBuf,
    pub state_file: PathBuf,
    /// Seconds since the Unix epoch.
    pub started_at: u64,
    pub uptime_seconds: u64,
    pub generation: u64,
    pub interfaces: usize,
    pub networks: usize,
    pub services: usize,
    pub backends: usize,
    pub endpoints_pending: usize,
    pub endpoints_approved: usize,
    pub endpoints_rejected: usize,
    pub endpoints_removed: usize,
    /// Whether the kernel holds what the controller committed.
    #[serde(default)]
    pub dataplane: DataplaneStatus,
    /// The dataplane identity the state file is bound to.
    #[serde(default)]
    pub dataplane_id: Option<String>,
    /// The node and its shared store, in a fleet.
    #[serde(default)]
    pub fleet: Option<FleetStatus>,
    /// `plink-ctl drain` was run: nothing is announced, flows keep forwarding.
    #[serde(default)]
    pub draining: bool,
}

pub struct Controller {
    config_path: PathBuf,
    config: Config,
    store: StateStore,
    /// The state as loaded from the file (before this config was folded in).
    loaded: PersistedState,
    state: PersistedState,
    model: Arc<Model>,
    started: SystemTime,
    publish: watch::Sender<Arc<Model>>,
    dataplane: Option<Arc<dyn DataplaneQueries>>,
    /// Writes models into the running dataplane; a change is committed (and
    /// saved) only once it took.
    applier: Option<Box<dyn Applier>>,
    apply_health: Arc<ApplyHealth>,
    /// Lookup-table slots the dataplane was sized for at start.
    lb_capacity: u64,
    /// Where decisions are recorded (docs/EVENTS.md).
    events: Events,
    /// The fleet's shared store and the revision of its document this
    /// state was read from or written as; `None`: the state file alone.
    shared: Option<(crate::fleet::SharedStore, i64)>,
    /// `plink-ctl drain` was run (until the controller restarts).
    draining: bool,
}

/// `status` of a fleet node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FleetStatus {
    pub node: Option<String>,
    /// `etcd ENDPOINTS KEY`, or `state.json` when decisions are not shared.
    pub store: String,
    /// Whether the shared store answers; false: forwarding goes on with the
    /// last decisions, approvals are refused until it is back.
    pub store_up: bool,
    /// Revision of the shared document this node applied.
    pub revision: i64,
}

/// Questions the admin API asks the running dataplane.
pub trait DataplaneQueries: Send + Sync {
    /// Live flows with their NAT mapping, handed to `row` one by one as they
    /// are read (an error from `row` stops the listing).
    fn conntrack(
        &self,
        row: &mut dyn FnMut(crate::admin::FlowRow) -> anyhow::Result<()>,
    ) -> anyhow::Result<()>;
}

impl Controller {
    /// Loads and validates the config, opens (and locks) its state directory,
    /// restores the saved decisions and ids, folds the config in, saves.
    pub fn open(config_path: &Path) -> Result<Self, ControllerError> {
        let config = Config::load(config_path)?;
        Self::with_config(config_path, config)
    }

    /// Like `open` with an already validated config.
    pub fn with_config(config_path: &Path, config: Config) -> Result<Self, ControllerError> {
        let c = Self::prepare(config_path, config)?;
        c.store.save(&c.state)?;
        Ok(c)
    }

    /// Like `with_config`, without saving: [`Controller::start`] saves once
    /// the dataplane holds the model.
    pub fn prepare(config_path: &Path, config: Config) -> Result<Self, ControllerError> {
        let store = StateStore::open(&config.gateway.state_dir)?;
        let local = store.load()?.unwrap_or_default();
        let etcd = config.fleet.as_ref().and_then(|f| f.etcd.as_ref());
        let (loaded, state, shared) = match etcd {
            None => {
                let state = state::reconcile(&config, &local)?;
                (local, state, None)
            }
            Some(etcd) => {
                let shared = crate::fleet::SharedStore::start(etcd)?;
                let (loaded, state, revision) = join_shared(&config, &local, &shared)?;
                (loaded, state, Some((shared, revision)))
            }
        };
        let model = Arc::new(Model::build(&config, &state)?);
        let (publish, _) = watch::channel(model.clone());
        let lb_capacity = config.lb_table_slots();
        Ok(Self {
            config_path: config_path.to_owned(),
            config,
            store,
            loaded,
            state,
            model,
            started: SystemTime::now(),
            publish,
            dataplane: None,
            applier: None,
            apply_health: Arc::new(ApplyHealth::default()),
            lb_capacity,
            events: Events::default(),
            shared,
            draining: false,
        })
    }

    /// The fleet store's updates (documents other nodes wrote), taken once
    /// by whoever applies them with [`Controller::apply_shared`].
    pub fn take_shared_updates(
        &mut self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<crate::fleet::Shared>> {
        self.shared.as_mut().and_then(|(s, _)| s.take_updates())
    }

    /// Whether the fleet store answers (None: no fleet store), for `/metrics`.
    pub fn store_up_flag(&self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        self.shared.as_ref().map(|(s, _)| s.up_flag())
    }

    /// Applies a document another node wrote to the fleet store: its
    /// decisions and ids become this node's (kernel first, then the local
    /// cache). Older revisions than the one held are ignored. If this
    /// node's config has objects the document lacks, the folded state is
    /// written back (a conflict means a newer document is on its way).
    pub fn apply_shared(&mut self, update: crate::fleet::Shared) -> Result<(), ControllerError> {
        let held = self.shared.as_ref().map(|(_, r)| *r).unwrap_or(i64::MAX);
        if update.revision <= held {
            return Ok(());
        }
        let base = PersistedState {
            dataplane: self.state.dataplane.clone(),
            ..update.state
        };
        let folded = state::reconcile(&self.config, &base)?;
        let config = self.config.clone();
        if crate::fleet::adds_to(&folded, &base) {
            // Objects of our config have no shared id yet: allocate them
            // for the fleet (a transaction on the revision just read).
            if let Some((_, r)) = self.shared.as_mut() {
                *r = update.revision;
            }
            self.commit(config, folded)?;
        } else {
            // Run it, without writing back what only our config releases or
            // re-judges: two nodes between two configs during a roll-out
            // would otherwise undo each other's writes without end.
            self.commit_at(config, folded, Some(update.revision))?;
        }
        Ok(())
    }

    /// Records decisions into `events` from now on.
    pub fn set_events(&mut self, events: Events) {
        self.events = events;
    }

    pub fn events(&self) -> Events {
        self.events.clone()
    }

    /// The config errors of `e` as `file:line:column: path: message`.
    pub fn diagnostic_lines(&self, e: &ControllerError) -> Vec<String> {
        e.diagnostics()
            .iter()
            .map(|d| {
                let at = if d.yaml_path.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", d.yaml_path)
                };
                format!(
                    "{}:{}:{}: {at}{}",
                    self.config_path.display(),
                    d.line,
                    d.column,
                    d.message
                )
            })
            .collect()
    }

    fn synced(&self) {
        if self.apply_health.synced() {
            self.events.emit(Event::DataplaneInSync {
                apply_failures: self.apply_health.failures(),
            });
        }
    }

    fn apply_failed(&self, why: &str, restored: bool) {
        self.events.emit(Event::ApplyFailed {
            error: why.to_owned(),
            restored,
        });
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn model(&self) -> Arc<Model> {
        self.model.clone()
    }

    /// Connects the admin API's dataplane questions to a running dataplane.
    pub fn set_dataplane(&mut self, queries: Arc<dyn DataplaneQueries>) {
        self.dataplane = Some(queries);
    }

    pub fn dataplane(&self) -> Option<Arc<dyn DataplaneQueries>> {
        self.dataplane.clone()
    }

    /// The dataplane identity the saved state is bound to.
    pub fn dataplane_id(&self) -> Option<&str> {
        self.state.dataplane.as_deref()
    }

    /// Refuses pins that do not belong to the saved state (SPEC §9: pins and
    /// state file carry one dataplane identity). `pinned` is the identity of
    /// the pins found under `pin_dir`, `None` when there are none (a fresh
    /// start binds the state to the new dataplane).
    pub fn check_pins(&self, pinned: Option<&str>, pin_dir: &Path) -> Result<(), ControllerError> {
        match pinned {
            Some(id) if self.state.dataplane.as_deref() != Some(id) => {
                Err(ControllerError::ForeignPins {
                    pin_dir: pin_dir.to_owned(),
                    state_file: self.store.path(),
                    pinned: id.to_owned(),
                    recorded: self.state.dataplane.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Binds the saved state to a dataplane this controller just created
    /// (no flows yet), before anything is forwarded: a start that fails
    /// later leaves pins that the next start may adopt. Only the identity
    /// is written; decisions are saved once they are applied.
    pub fn bind_fresh_dataplane(&mut self, identity: &str) -> Result<(), ControllerError> {
        if self.state.dataplane.as_deref() == Some(identity) {
            return Ok(());
        }
        let mut loaded = self.loaded.clone();
        loaded.dataplane = Some(identity.to_owned());
        self.store.save(&loaded)?;
        self.loaded = loaded;
        self.state.dataplane = Some(identity.to_owned());
        Ok(())
    }

    /// Binds the controller to a running dataplane: records its identity,
    /// applies the model (an adopting start purges what it no longer
    /// allows), and only then saves the state.
    pub fn start(
        &mut self,
        mut applier: Box<dyn Applier>,
        identity: Option<String>,
    ) -> Result<(), ControllerError> {
        applier
            .apply(&self.model)
            .map_err(|why| ControllerError::StartFailed(why.to_string()))?;
        self.apply_health.attached.store(true, Ordering::SeqCst);
        self.apply_health.synced();
        self.applier = Some(applier);
        if identity.is_some() {
            self.state.dataplane = identity;
        }
        self.store.save(&self.state)?;
        // What this start decided against the saved state: new endpoints,
        // visibility narrowed while we were down, endpoints left the config.
        for e in events::endpoint_events(
            None,
            &self.loaded.decisions,
            &self.config,
            &self.state.decisions,
        ) {
            self.events.emit(e);
        }
        Ok(())
    }

    /// Whether the dataplane holds the committed model (shared with `/metrics`).
    pub fn apply_health(&self) -> Arc<ApplyHealth> {
        self.apply_health.clone()
    }

    /// Applies the committed model again (backend health changed, or to
    /// converge after a failure).
    pub fn reapply(&mut self) -> Result<(), ControllerError> {
        let Some(applier) = self.applier.as_mut() else {
            return Ok(());
        };
        match applier.apply(&self.model) {
            Ok(()) => {
                self.synced();
                Ok(())
            }
            Err(ApplyFailure::Refused(why)) => Err(ControllerError::Plan(why)),
            Err(ApplyFailure::Failed(why)) => {
                self.apply_health.failed(&why);
                self.apply_failed(&why, false);
                Err(ControllerError::ApplyFailed {
                    why,
                    restored: Some("the committed configuration is the one that failed".into()),
                })
            }
        }
    }

    /// Applies `model`; when a write fails part way, puts the committed
    /// model back.
    fn apply_or_restore(&mut self, model: &Model) -> Result<(), ControllerError> {
        let Some(applier) = self.applier.as_mut() else {
            return Ok(());
        };
        match applier.apply(model) {
            Ok(()) => {
                self.synced();
                Ok(())
            }
            Err(ApplyFailure::Refused(why)) => Err(ControllerError::Plan(why)),
            Err(ApplyFailure::Failed(why)) => {
                self.apply_health.failed(&why);
                tracing::error!(
                    "applying a change failed: {why}; putting the previous configuration back"
                );
                let restore = applier.apply(&self.model);
                self.apply_failed(&why, restore.is_ok());
                let restored = match restore {
                    Ok(()) => {
                        self.synced();
                        None
                    }
                    Err(e) => {
                        tracing::error!("the dataplane has diverged: restoring failed: {e}");
                        if matches!(e, ApplyFailure::Failed(_)) {
                            self.apply_health.failed(&format!(
                                "{why}; restoring the previous configuration: {e}"
                            ));
                        }
                        self.apply_health.in_sync.store(false, Ordering::SeqCst);
                        Some(e.to_string())
                    }
                };
                Err(ControllerError::ApplyFailed { why, restored })
            }
        }
    }

    /// A receiver that sees every new model (the latest one, if several
    /// changes came faster than it looked).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Model>> {
        self.publish.subscribe()
    }

    /// Persists `state` and makes it current, with the model built from it.
    fn commit(
        &mut self,
        config: Config,
        state: PersistedState,
    ) -> Result<ModelDiff, ControllerError> {
        self.commit_at(config, state, None)
    }

    /// [`Controller::commit`]; `applied`: the state is the fleet store's
    /// document at that revision (nothing to write back).
    fn commit_at(
        &mut self,
        config: Config,
        state: PersistedState,
        applied: Option<i64>,
    ) -> Result<ModelDiff, ControllerError> {
        let model = Arc::new(Model::build(&config, &state)?);
        // The shared store first: what the fleet did not take is not decided.
        if let Some((store, revision)) = self.shared.as_mut() {
            match applied {
                Some(r) => *revision = r,
                None => {
                    if !crate::fleet::same_shared(&state, &self.state) || *revision == 0 {
                        *revision = store.put(&state, *revision)?;
                    }
                }
            }
        }
        // The kernel first: a decision is saved only once it holds it.
        self.apply_or_restore(&model)?;
        if let Err(e) = self.store.save(&state) {
            // Saving failed: the kernel must not hold what the disk does not.
            if let Err(restore) = self.apply_or_restore(&self.model.clone()) {
                tracing::error!("after a failed save: {restore}");
            }
            return Err(e.into());
        }
        let diff = Model::diff(&self.model, &model);
        let decided = events::endpoint_events(
            Some(&self.config),
            &self.state.decisions,
            &config,
            &state.decisions,
        );
        self.config = config;
        self.state = state;
        self.model = model.clone();
        self.publish.send_replace(model);
        // Recorded once the kernel and the disk hold the decisions.
        for e in decided {
            self.events.emit(e);
        }
        Ok(diff)
    }

    pub fn endpoints(&self) -> Vec<EndpointModel> {
        let mut v: Vec<_> = self.model.endpoints.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Approves, rejects or removes the endpoint called `name`. In a fleet,
    /// when another node wrote the shared state meanwhile, the newer state
    /// is taken and the action judged again against it (a few times).
    pub fn act(&mut self, name: &str, action: Action) -> Result<ActionOutcome, ControllerError> {
        let mut tries = 0;
        loop {
            match self.act_once(name, action) {
                Err(ControllerError::Store(crate::fleet::StoreError::Conflict)) if tries < 4 => {
                    tries += 1;
                    self.refresh_shared()?;
                }
                r => return r,
            }
        }
    }

    /// Reads the fleet store's document now and applies it if it is newer.
    fn refresh_shared(&mut self) -> Result<(), ControllerError> {
        let Some((store, _)) = self.shared.as_ref() else {
            return Ok(());
        };
        if let Some(update) = store.load()? {
            self.apply_shared(update)?;
        }
        Ok(())
    }

    fn act_once(&mut self, name: &str, action: Action) -> Result<ActionOutcome, ControllerError> {
        let endpoint = self
            .config
            .endpoints
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| ControllerError::NoSuchEndpoint(name.to_owned()))?;
        let identity = EndpointIdentity::of(endpoint);
        let service = self
            .config
            .services
            .iter()
            .find(|s| s.name == endpoint.service)
            .ok_or_else(|| ControllerError::NoSuchEndpoint(name.to_owned()))?;
        let access = Access::of(service, &endpoint.tenant);
        let current = *self
            .state
            .decisions
            .get(&identity)
            .ok_or_else(|| ControllerError::NoSuchEndpoint(name.to_owned()))?;
        let next = approval::apply(current, action, &access).map_err(|why| {
            self.events.emit(Event::EndpointActionRefused {
                endpoint: name.to_owned(),
                action,
                error: why.to_string(),
            });
            ControllerError::Refused {
                endpoint: name.to_owned(),
                action,
                why,
            }
        })?;
        let changed = next.is_some();
        if let Some(decision) = next {
            let mut state = self.state.clone();
            state.decisions.insert(identity, decision);
            let config = self.config.clone();
            self.commit(config, state)?;
            tracing::info!(endpoint = name, %action, state = %decision.state, "endpoint decision");
        }
        let endpoint = self
            .model
            .endpoint_by_name(name)
            .cloned()
            .ok_or_else(|| ControllerError::NoSuchEndpoint(name.to_owned()))?;
        Ok(ActionOutcome { endpoint, changed })
    }

    /// Re-reads the config file this controller was started with. An invalid
    /// config, or one that changes a restart-only field, is refused and
    /// nothing changes.
    pub fn reload(&mut self) -> Result<ReloadOutcome, ControllerError> {
        self.reload_via(Trigger::Admin)
    }

    /// [`Controller::reload`], recording what asked for it.
    pub fn reload_via(&mut self, via: Trigger) -> Result<ReloadOutcome, ControllerError> {
        let mut result = self.reload_inner();
        // Another fleet node wrote meanwhile: fold into the newer state.
        for _ in 0..4 {
            if !matches!(
                result,
                Err(ControllerError::Store(crate::fleet::StoreError::Conflict))
            ) {
                break;
            }
            result = self.refresh_shared().and_then(|()| self.reload_inner());
        }
        let config = self.config_path.clone();
        match &result {
            Ok(out) => self.events.emit(Event::ReloadApplied {
                config,
                via,
                changes: out.changes.clone(),
            }),
            Err(e) => {
                let errors = self.diagnostic_lines(e);
                // The errors are listed one by one; the headline says what
                // happened instead of repeating them.
                let error = if errors.is_empty() {
                    e.to_string()
                } else {
                    let n = errors.len();
                    format!(
                        "{} is invalid ({n} error{}); the running configuration is unchanged",
                        config.display(),
                        if n == 1 { "" } else { "s" }
                    )
                };
                self.events.emit(Event::ReloadRefused {
                    config,
                    via,
                    error,
                    errors,
                })
            }
        }
        result
    }

    fn reload_inner(&mut self) -> Result<ReloadOutcome, ControllerError> {
        let config = Config::load_node(&self.config_path, self.config.node.as_deref())?;
        if let Some(field) = restart_only_change(&self.config, &config) {
            return Err(ControllerError::RestartOnly(field));
        }
        let needed = config.lb_table_slots();
        if needed > self.lb_capacity {
            return Err(ControllerError::LookupTableFull {
                needed,
                capacity: self.lb_capacity,
            });
        }
        let state = state::reconcile(&config, &self.state)?;
        let diff = self.commit(config, state)?;
        let changes = diff.summary();
        tracing::info!(config = %self.config_path.display(), ?changes, "config reloaded");
        Ok(ReloadOutcome {
            config: self.config_path.clone(),
            changes,
        })
    }

    pub fn status(&self) -> Status {
        let count = |s: ConnectionState| {
            self.model
                .endpoints
                .values()
                .filter(|e| e.state == s)
                .count()
        };
        let started_at = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config: self.config_path.clone(),
            state_file: self.store.path(),
            started_at,
            uptime_seconds: self.started.elapsed().map(|d| d.as_secs()).unwrap_or(0),
            generation: self.state.generation,
            interfaces: self.model.interfaces.len(),
            networks: self.model.networks.len(),
            services: self.model.services.len(),
            backends: self.model.services.values().map(|s| s.backends.len()).sum(),
            endpoints_pending: count(ConnectionState::Pending),
            endpoints_approved: count(ConnectionState::Approved),
            endpoints_rejected: count(ConnectionState::Rejected),
            endpoints_removed: count(ConnectionState::Removed),
            dataplane: self.apply_health.status(),
            dataplane_id: self.state.dataplane.clone(),
            fleet: self.config.fleet.as_ref().map(|_| FleetStatus {
                node: self.config.node.clone(),
                store: match &self.shared {
                    Some((s, _)) => format!("etcd {} {}", s.endpoints(), s.key()),
                    None => "state.json (not shared)".into(),
                },
                store_up: self.shared.as_ref().is_none_or(|(s, _)| s.up()),
                revision: self.shared.as_ref().map(|(_, r)| *r).unwrap_or(0),
            }),
            draining: self.draining,
        }
    }

    /// `plink-ctl drain`: withdraws every announced route (the consumer
    /// router stops sending new flows here); existing flows keep forwarding.
    /// Answers once the routes are out of the kernel table FRR reads.
    pub fn drain(&mut self) -> Result<(), ControllerError> {
        self.draining = true;
        if let Some(applier) = self.applier.as_mut() {
            applier.set_draining(true);
        }
        self.reapply()
    }
}

/// Joins the fleet store at start: the shared document (or, if no node wrote
/// one yet, this node's state file) with this config folded in, written
/// back when that changed anything. Retries when another node wrote in
/// between. Returns the state read, the state to run and its revision.
fn join_shared(
    config: &Config,
    local: &PersistedState,
    store: &crate::fleet::SharedStore,
) -> Result<(PersistedState, PersistedState, i64), ControllerError> {
    let mut last = None;
    for _ in 0..8 {
        let found = store.load()?;
        let (loaded, revision) = match found {
            Some(s) => (
                PersistedState {
                    dataplane: local.dataplane.clone(),
                    ..s.state
                },
                s.revision,
            ),
            None => (local.clone(), 0),
        };
        let state = state::reconcile(config, &loaded)?;
        if revision != 0 && crate::fleet::same_shared(&state, &loaded) {
            // Nothing of ours is missing: run the document as it is.
            return Ok((loaded.clone(), loaded, revision));
        }
        match store.put(&state, revision) {
            Ok(rev) => return Ok((loaded, state, rev)),
            Err(e @ crate::fleet::StoreError::Conflict) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.unwrap_or(crate::fleet::StoreError::Conflict).into())
}

/// The first field that a reload cannot apply, if `new` changes one. These
/// size maps, name where things live, or are bound once at start; interfaces
/// are attached at start (hot-adding them is future work).
fn restart_only_change(old: &Config, new: &Config) -> Option<String> {
    let (o, n) = (&old.gateway, &new.gateway);
    let fields = [
        ("gateway.xdp_mode", o.xdp_mode != n.xdp_mode),
        ("gateway.metrics", o.metrics != n.metrics),
        ("gateway.admin_socket", o.admin_socket != n.admin_socket),
        ("gateway.state_dir", o.state_dir != n.state_dir),
        ("gateway.bpffs_root", o.bpffs_root != n.bpffs_root),
        ("gateway.conntrack.max_flows", o.conntrack != n.conntrack),
        ("gateway.event_log", o.event_log != n.event_log),
        ("gateway.flow_logs", o.flow_logs != n.flow_logs),
        ("interfaces", old.interfaces != new.interfaces),
        ("fleet", old.fleet.is_some() != new.fleet.is_some()),
        (
            "fleet.etcd",
            old.fleet.as_ref().map(|f| &f.etcd) != new.fleet.as_ref().map(|f| &f.etcd),
        ),
    ];
    fields
        .into_iter()
        .find(|(_, changed)| *changed)
        .map(|(f, _)| f.to_owned())
}
