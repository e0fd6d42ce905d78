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
    sync::Arc,
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    approval::{self, Access, Action, ConnectionState, Refusal},
    config::{Config, ConfigError, Diagnostic},
    model::{EndpointModel, Model, ModelDiff, ModelError},
    state::{self, EndpointIdentity, IdsExhausted, PersistedState, StateError, StateStore},
};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Ids(#[from] IdsExhausted),
    #[error(transparent)]
    Model(#[from] ModelError),
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
}

pub struct Controller {
    config_path: PathBuf,
    config: Config,
    store: StateStore,
    state: PersistedState,
    model: Arc<Model>,
    started: SystemTime,
    publish: watch::Sender<Arc<Model>>,
    dataplane: Option<Arc<dyn DataplaneQueries>>,
    /// The model the dataplane last applied, when one runs: admin changes
    /// answer once their model is live.
    applied: Option<watch::Receiver<Arc<Model>>>,
    /// Lookup-table slots the dataplane was sized for at start.
    lb_capacity: u64,
}

/// Questions the admin API asks the running dataplane (answered as JSON).
pub trait DataplaneQueries: Send + Sync {
    /// Live flows with their NAT mapping.
    fn conntrack(&self) -> anyhow::Result<serde_json::Value>;
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
        let store = StateStore::open(&config.gateway.state_dir)?;
        let saved = store.load()?.unwrap_or_default();
        let state = state::reconcile(&config, &saved)?;
        let model = Arc::new(Model::build(&config, &state)?);
        store.save(&state)?;
        let (publish, _) = watch::channel(model.clone());
        let lb_capacity = config.lb_table_slots();
        Ok(Self {
            config_path: config_path.to_owned(),
            config,
            store,
            state,
            model,
            started: SystemTime::now(),
            publish,
            dataplane: None,
            applied: None,
            lb_capacity,
        })
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

    /// Tells the controller which model the dataplane has applied.
    pub fn set_applied(&mut self, applied: watch::Receiver<Arc<Model>>) {
        self.applied = Some(applied);
    }

    /// What to wait on after a change: the committed model and the
    /// dataplane's applied one (`None` without a dataplane).
    pub fn apply_wait(&self) -> Option<(Arc<Model>, watch::Receiver<Arc<Model>>)> {
        self.applied.clone().map(|rx| (self.model.clone(), rx))
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
        let model = Arc::new(Model::build(&config, &state)?);
        self.store.save(&state)?;
        let diff = Model::diff(&self.model, &model);
        self.config = config;
        self.state = state;
        self.model = model.clone();
        self.publish.send_replace(model);
        Ok(diff)
    }

    pub fn endpoints(&self) -> Vec<EndpointModel> {
        let mut v: Vec<_> = self.model.endpoints.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Approves, rejects or removes the endpoint called `name`.
    pub fn act(&mut self, name: &str, action: Action) -> Result<ActionOutcome, ControllerError> {
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
        let next =
            approval::apply(current, action, &access).map_err(|why| ControllerError::Refused {
                endpoint: name.to_owned(),
                action,
                why,
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
        let config = Config::load(&self.config_path)?;
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
        }
    }
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
        ("interfaces", old.interfaces != new.interfaces),
    ];
    fields
        .into_iter()
        .find(|(_, changed)| *changed)
        .map(|(f, _)| f.to_owned())
}
