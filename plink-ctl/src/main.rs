//! `plink-ctl`: the plink controller.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use plink_ctl::{
    admin::{self, AdminListener, Request, Response},
    config::{Config, DEFAULT_ADMIN_SOCKET},
    controller::{ActionOutcome, Controller, ReloadOutcome, Status},
    dataplane,
    events::{self, Event, Events},
    gateway::{self, Gateway, GatewayApplier, GatewayQueries},
    health::{HealthChecker, HealthMap},
    hostcheck, linkwatch, metrics,
    model::{EndpointModel, Model},
};

const DEFAULT_CONFIG: &str = "/etc/plink/plink.yaml";

/// plink: a Private Link gateway. XDP programs do endpoint DNAT, SNAT and load
/// balancing in the kernel; this controller loads them, fills their maps from
/// a YAML config and runs the approval workflow.
///
/// The admin commands (status, endpoints, reload) talk to a running
/// `plink-ctl run` over its Unix socket and must be run as root.
#[derive(Parser)]
#[command(name = "plink-ctl", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config, restore saved decisions, load and attach the XDP
    /// programs to every interface it names, and serve the admin socket until
    /// SIGINT or SIGTERM. SIGHUP reloads the config and reopens the event
    /// log (`gateway.event_log`, for logrotate).
    ///
    /// `run` refuses to start when the host breaks the forwarding contract
    /// (consumer interface with forwarding on or an address, provider
    /// interface with forwarding off): each violation is printed with the
    /// command that fixes it.
    Run {
        /// The YAML config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Start even though the forwarding contract is broken (the gateway's
        /// kernel may then route consumer traffic before XDP drops it, or
        /// FIB lookups fail). For debugging only.
        #[arg(long, env = "PLINK_ALLOW_BROKEN_CONTRACT")]
        allow_broken_contract: bool,
        /// In a fleet (`fleet.nodes` in the config): the name of this
        /// gateway's node section. Default: the host name up to its first dot.
        #[arg(long, env = "PLINK_NODE")]
        node: Option<String>,
    },
    /// Validate a config file (syntax and meaning) without touching the
    /// system. Every error names file:line:column and how to fix it; exits
    /// non-zero if there is any.
    Check {
        /// The YAML config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Also check this host against the forwarding contract: bpffs,
        /// kernel features, native XDP per interface, MTUs, offloads,
        /// forwarding and rp_filter, managed neighbour support. Exits
        /// non-zero if any check fails.
        #[arg(long)]
        host: bool,
        /// With --host: print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the per-interface packet counters of the running dataplane.
    Stats {
        /// The YAML config file (for `gateway.bpffs_root`).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Detach the dataplane and remove its bpffs pins (and withdraw the
    /// routes it announced, with `announce` set).
    Down {
        /// The YAML config file (for `gateway.bpffs_root`).
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the running controller: config, state file, uptime, counts of
    /// services, backends and endpoints by connection state.
    Status(AdminArgs),
    /// List endpoints, or approve, reject or remove one (the approval
    /// workflow; decisions are saved and survive restarts).
    Endpoints {
        #[command(subcommand)]
        command: EndpointsCommand,
    },
    /// Make the running controller re-read the config file it was started
    /// with. An invalid config is refused with its errors and the running
    /// state is left unchanged; so is a change to a field that only takes
    /// effect on restart (sizes, paths, interfaces).
    Reload(AdminArgs),
    /// List the live flows with their NAT mapping: consumer network and
    /// client, endpoint, NAT address and port, backend, time left, and the
    /// bytes of the PROXY protocol header a flow sends (`-`: none).
    Conntrack(AdminArgs),
    /// Take this node out of a fleet without breaking flows (docs/FLEET.md):
    /// withdraw every announced route, keep forwarding the flows the node
    /// holds, wait until they end (TCP flows close, others expire) and no
    /// new flow arrives, or the deadline passes, then exit. Stop the node after it.
    Drain {
        /// Longest wait for the flows to end.
        #[arg(long, default_value = "5m")]
        deadline: plink_ctl::config::HumanDuration,
        /// How long no live flow and no new flow must be seen before the
        /// node counts as drained (longer than the router's idle timer).
        #[arg(long, default_value = "5s")]
        quiet: plink_ctl::config::HumanDuration,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show the controller's recent decisions (the event log kept in
    /// memory, the last 1024; docs/EVENTS.md). With --json, one record per
    /// line as in the `gateway.event_log` file.
    Events {
        /// Keep printing new events as they happen, until interrupted.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Switch the datapath's debug messages (drops with their reason, flows
    /// opened) on or off at runtime; they go to the controller's log
    /// (target `datapath`). Off at every start. Without on/off: show.
    Debug {
        #[arg(value_parser = ["on", "off"])]
        state: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum EndpointsCommand {
    /// List every endpoint with its tenant, network, address, service,
    /// connection state and the reason for it, its id and, where its
    /// service sends PROXY protocol headers, its link id and TLV.
    List(AdminArgs),
    /// Approve an endpoint: it starts passing traffic. Refused if its tenant
    /// is not in the service's visibility list, or if it was removed.
    Approve {
        /// The endpoint's name in the config.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Reject an endpoint: its flows are purged and it passes no traffic
    /// until approved again. Refused if it was removed.
    Reject {
        /// The endpoint's name in the config.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove an endpoint: final for its identity (name, network, address,
    /// service). To offer it again, delete it from the config, reload, and
    /// add it back.
    Remove {
        /// The endpoint's name in the config.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Args)]
struct AdminArgs {
    /// The admin socket of the running controller. Default: the config's
    /// `gateway.admin_socket` (from --config, else /etc/plink/plink.yaml if it
    /// exists), else /run/plink/plink.sock.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The config whose `gateway.admin_socket` to use when --socket is not given.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Print the response as JSON (for scripts) instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            config,
            allow_broken_contract,
            node,
        } => run(config, allow_broken_contract, node).map(|()| ExitCode::SUCCESS),
        Command::Check { config, host, json } => {
            let cfg = Config::load(&config)?;
            println!("{}: OK", config.display());
            if !host {
                return Ok(ExitCode::SUCCESS);
            }
            let findings = hostcheck::check_host(&cfg);
            if json {
                println!("{}", serde_json::to_string_pretty(&findings)?);
            } else {
                for f in &findings {
                    println!(
                        "{:<4} {:<20} {:<10} {}",
                        f.severity, f.check, f.subject, f.message
                    );
                }
            }
            let failed = findings
                .iter()
                .any(|f| f.severity == hostcheck::Severity::Fail);
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Stats { config, json } => stats(config, json).map(|()| ExitCode::SUCCESS),
        Command::Down { config } => {
            let cfg = Config::load(&config)?;
            // Not while a controller runs on these pins (it would re-pin them).
            let _pins = if dataplane::pin_dir(&cfg.gateway.bpffs_root).exists() {
                Some(dataplane::lock_pins(&cfg.gateway.bpffs_root)?)
            } else {
                None
            };
            // Nothing forwards any more: withdraw what FRR announces for us.
            if cfg.announce.is_some() {
                let gone = plink_ctl::announce::RouteTable::MAIN
                    .sync(&Default::default(), 0)
                    .context("withdrawing the announced routes")?;
                for a in gone.removed {
                    println!("withdrew {a}/32");
                }
            }
            if dataplane::remove_pins(&cfg.gateway.bpffs_root)? {
                println!("removed pins under {}", cfg.gateway.bpffs_root.display());
            } else {
                println!("nothing pinned under {}", cfg.gateway.bpffs_root.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(a) => admin_command(&a, Request::Status, |r| {
            print_status(&decode::<Status>(r)?);
            Ok(())
        }),
        Command::Reload(a) => admin_command(&a, Request::Reload, |r| {
            let out: ReloadOutcome = decode(r)?;
            println!("reloaded {}", out.config.display());
            if out.changes.is_empty() {
                println!("  no changes");
            }
            for line in out.changes {
                println!("  {line}");
            }
            Ok(())
        }),
        Command::Conntrack(a) => {
            let mut shown = 0u64;
            admin_listing(
                &a,
                Request::Conntrack,
                ("{\"data\":{\"flows\":[", "]}"),
                || {
                    println!(
                        "{:<14} {:<9} {:<5} {:<21} {:<21} {:<21} {:<21} {:>9} {:>5}",
                        "ENDPOINT",
                        "NETWORK",
                        "PROTO",
                        "CLIENT",
                        "ENDPOINT ADDR",
                        "NAT",
                        "BACKEND",
                        "EXPIRES",
                        "PROXY"
                    )
                },
                |f: admin::FlowRow| {
                    shown += 1;
                    println!(
                        "{:<14} {:<9} {:<5} {:<21} {:<21} {:<21} {:<21} {:>8}s {:>5}",
                        f.endpoint.as_deref().unwrap_or("-"),
                        f.network.as_deref().unwrap_or("-"),
                        f.protocol,
                        f.client.to_string(),
                        f.endpoint_address.to_string(),
                        f.nat.to_string(),
                        f.backend.to_string(),
                        f.expires_in_ms / 1000,
                        match f.proxy_header_len {
                            0 => "-".to_owned(),
                            n => format!("{n}B"),
                        }
                    );
                },
            )
            .inspect(|code| {
                if *code == ExitCode::SUCCESS && !a.json {
                    println!("{shown} flows");
                }
            })
        }
        Command::Events { follow, admin } => events_command(&admin, follow),
        Command::Drain {
            deadline,
            quiet,
            admin,
        } => drain_command(&admin, deadline.0, quiet.0),
        Command::Debug { state, admin } => {
            let on = state.map(|s| s == "on");
            admin_command(&admin, Request::Debug { on }, |r| {
                let v: serde_json::Value = decode(r)?;
                let on = v["debug"].as_bool().unwrap_or(false);
                println!("datapath debug messages: {}", if on { "on" } else { "off" });
                Ok(())
            })
        }
        Command::Endpoints { command } => match command {
            EndpointsCommand::List(a) => {
                // Columns are aligned to the widest cell: the table is
                // printed once every row arrived (endpoints are few).
                let mut list = Vec::new();
                let code = admin_listing(
                    &a,
                    Request::ListEndpoints,
                    ("{\"data\":[", "]"),
                    || {},
                    |e: EndpointModel| list.push(e),
                )?;
                if code == ExitCode::SUCCESS && !a.json {
                    print_endpoints(&list);
                }
                Ok(code)
            }
            EndpointsCommand::Approve { name, admin } => {
                admin_command(&admin, Request::Approve { name }, print_action)
            }
            EndpointsCommand::Reject { name, admin } => {
                admin_command(&admin, Request::Reject { name }, print_action)
            }
            EndpointsCommand::Remove { name, admin } => {
                admin_command(&admin, Request::Remove { name }, print_action)
            }
        },
    }
}

/// Where the admin socket is: --socket, else the config's, else the default.
fn admin_socket(a: &AdminArgs) -> anyhow::Result<PathBuf> {
    if let Some(s) = &a.socket {
        return Ok(s.clone());
    }
    let from_config = |path: &Path| -> anyhow::Result<Option<PathBuf>> {
        // Only this one field matters here: read it leniently so that a
        // client still finds the daemon while the file is being edited.
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading {} for gateway.admin_socket", path.display()))?;
        let doc: serde_yaml::Value = serde_yaml::from_str(&text)
            .with_context(|| format!("{} is not valid YAML; pass --socket", path.display()))?;
        Ok(doc
            .get("gateway")
            .and_then(|g| g.get("admin_socket"))
            .and_then(|s| s.as_str())
            .map(PathBuf::from))
    };
    let configured = match &a.config {
        Some(c) => from_config(c)?,
        None if Path::new(DEFAULT_CONFIG).exists() => {
            from_config(Path::new(DEFAULT_CONFIG)).ok().flatten()
        }
        None => None,
    };
    Ok(configured.unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET)))
}

/// Sends `req`; prints the answer with `human` (or as JSON). A refusal is
/// printed with its reasons and gives a non-zero exit.
fn admin_command(
    a: &AdminArgs,
    req: Request,
    human: impl FnOnce(Response) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    let socket = admin_socket(a)?;
    let response = admin::request(&socket, &req)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
        return Ok(if response.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if !response.ok {
        print_refusal(&response);
        return Ok(ExitCode::FAILURE);
    }
    human(response)?;
    Ok(ExitCode::SUCCESS)
}

/// Sends a listing request and takes its rows as they arrive: `human` gets
/// each (after `header`), or with `--json` each is printed at once inside
/// `json` (the document's opening and closing around the rows), followed by
/// the closing response's fields. A refusal or a failure part way gives a
/// non-zero exit.
fn admin_listing<T: serde::de::DeserializeOwned>(
    a: &AdminArgs,
    req: Request,
    json: (&str, &str),
    header: impl FnOnce(),
    mut human: impl FnMut(T),
) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let socket = admin_socket(a)?;
    let mut out = std::io::stdout().lock();
    let mut header = Some(header);
    let mut first = true;
    if a.json {
        write!(out, "{}", json.0)?;
    }
    let response = admin::request_rows(&socket, &req, |row| {
        if a.json {
            let sep = if first { "" } else { "," };
            writeln!(out, "{sep}{row}").map_err(|e| admin::ClientError::Row(e.to_string()))?;
        } else {
            let row: T = serde_json::from_value(row).map_err(|e| {
                admin::ClientError::Row(format!(
                    "the controller's answer does not match this plink-ctl's version: {e}"
                ))
            })?;
            if let Some(h) = header.take() {
                h();
            }
            human(row);
        }
        first = false;
        Ok(())
    })?;
    if a.json {
        // The closing response's fields (`ok`, `error`, `details`) after the
        // rows: key order does not matter to a JSON reader.
        let closing = serde_json::to_string(&Response {
            data: None,
            ..response.clone()
        })?;
        writeln!(
            out,
            "{},{}",
            json.1,
            closing.strip_prefix('{').unwrap_or(&closing)
        )?;
    } else if response.ok {
        if let Some(h) = header.take() {
            h();
        }
    } else {
        print_refusal(&response);
    }
    Ok(if response.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `plink-ctl events`: rows as they arrive, JSON lines with `--json` (a
/// followed stream never ends, so it is not one JSON document).
fn events_command(a: &AdminArgs, follow: bool) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let socket = admin_socket(a)?;
    let mut out = std::io::stdout().lock();
    let response = admin::request_rows(&socket, &Request::Events { follow }, |row| {
        let line = if a.json {
            row.to_string()
        } else {
            let r: events::Record = serde_json::from_value(row).map_err(|e| {
                admin::ClientError::Row(format!(
                    "the controller's answer does not match this plink-ctl's version: {e}"
                ))
            })?;
            let details = serde_json::to_value(&r)
                .ok()
                .and_then(|v| v.get("details").map(|d| d.to_string()))
                .unwrap_or_default();
            format!(
                "{}  {:<24} {:<20} {:<12} {details}",
                r.time,
                r.kind(),
                r.subject,
                r.outcome
            )
        };
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|e| admin::ClientError::Row(e.to_string()))
    });
    let response = match response {
        // A followed stream has no end of its own: the controller went away.
        Err(admin::ClientError::NoAnswer { path }) if follow => {
            anyhow::bail!(
                "{} closed the stream: the controller stopped",
                path.display()
            )
        }
        r => r?,
    };
    if !response.ok {
        print_refusal(&response);
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a refused admin request: its reason and one line per detail.
fn print_refusal(response: &Response) {
    eprintln!(
        "error: {}",
        response
            .error
            .as_deref()
            .unwrap_or("refused without a reason")
    );
    for d in &response.details {
        eprintln!("  {d}");
    }
}

fn decode<T: serde::de::DeserializeOwned>(r: Response) -> anyhow::Result<T> {
    let data = r.data.context("the controller answered without data")?;
    serde_json::from_value(data)
        .context("the controller's answer does not match this plink-ctl's version")
}

fn print_action(r: Response) -> anyhow::Result<()> {
    let out: ActionOutcome = decode(r)?;
    let e = &out.endpoint;
    if out.changed {
        println!("{}: {} ({})", e.name, e.state, e.reason);
    } else {
        println!(
            "{}: already {} ({}); nothing changed",
            e.name, e.state, e.reason
        );
    }
    Ok(())
}

fn print_endpoints(list: &[EndpointModel]) {
    let rows: Vec<[String; 10]> = list
        .iter()
        .map(|e| {
            let ports: Vec<String> = e.ports.iter().map(|p| p.port.to_string()).collect();
            [
                e.name.clone(),
                e.tenant.clone(),
                e.network.clone(),
                // Both of a dual-stack endpoint's.
                e.addresses()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                e.service.clone(),
                format!("{}/{}", e.protocol, ports.join(",")),
                e.state.to_string(),
                e.reason.to_string(),
                e.id.to_string(),
                // The link id is what backends see only where the service
                // sends PROXY protocol headers: `-` elsewhere.
                match e.proxy_protocol {
                    Some(tlv) => format!("{} ({tlv})", e.link_id),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let header = [
        "NAME", "TENANT", "NETWORK", "ADDRESS", "SERVICE", "PORTS", "STATE", "REASON", "ID",
        "LINK ID",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// `plink-ctl drain`: withdraw, then wait for the node's flows to end and
/// for new ones to stop arriving (a router's resilient group moves a
/// drained node's buckets only as they go idle).
fn drain_command(
    a: &AdminArgs,
    deadline: std::time::Duration,
    quiet: std::time::Duration,
) -> anyhow::Result<ExitCode> {
    use std::collections::BTreeSet;
    let quiet_args = AdminArgs {
        socket: a.socket.clone(),
        config: a.config.clone(),
        json: false,
    };
    let code = admin_command(&quiet_args, Request::Drain, |_| {
        println!("draining: every route withdrawn, flows keep forwarding");
        Ok(())
    })?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let start = std::time::Instant::now();
    let mut seen: Option<BTreeSet<String>> = None;
    let mut quiet_since = std::time::Instant::now();
    let (mut live, mut new_flows);
    loop {
        live = 0u64;
        let mut now_seen = BTreeSet::new();
        let code = admin_listing(
            &quiet_args,
            Request::Conntrack,
            ("", ""),
            || {},
            |f: admin::FlowRow| {
                let ended = f.protocol == "tcp" && f.tcp_state == plink_common::tcp_state::CLOSING;
                if !ended {
                    live += 1;
                }
                now_seen.insert(format!(
                    "{}/{}/{}/{}",
                    f.network_id, f.protocol, f.client, f.endpoint_address
                ));
            },
        )?;
        if code != ExitCode::SUCCESS {
            return Ok(code);
        }
        new_flows = seen.as_ref().map_or(0, |s| now_seen.difference(s).count());
        seen = Some(now_seen);
        if live > 0 || new_flows > 0 {
            quiet_since = std::time::Instant::now();
        }
        if quiet_since.elapsed() >= quiet || start.elapsed() >= deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    if quiet_since.elapsed() >= quiet {
        println!(
            "drained: no live flows and no new ones for {}s ({:.1}s); stop the node now",
            quiet.as_secs(),
            start.elapsed().as_secs_f64()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "deadline passed with {live} live flows ({new_flows} new in the last poll); stopping the node now breaks them"
        );
        Ok(ExitCode::from(2))
    }
}

fn print_status(s: &Status) {
    println!("plink-ctl {} (pid {})", s.version, s.pid);
    println!("config:      {}", s.config.display());
    println!(
        "state file:  {} (generation {})",
        s.state_file.display(),
        s.generation
    );
    println!("uptime:      {}s", s.uptime_seconds);
    println!(
        "interfaces:  {} ({} consumer networks)",
        s.interfaces, s.networks
    );
    println!("services:    {} ({} backends)", s.services, s.backends);
    println!(
        "endpoints:   {} approved, {} pending, {} rejected, {} removed",
        s.endpoints_approved, s.endpoints_pending, s.endpoints_rejected, s.endpoints_removed
    );
    let d = &s.dataplane;
    let state = match (d.attached, d.in_sync) {
        (false, _) => "none attached".to_owned(),
        (true, true) => "in sync".to_owned(),
        (true, false) => "DIVERGED: the kernel does not hold the committed configuration; a successful reload or restart converges it".to_owned(),
    };
    println!("dataplane:   {state}");
    if let Some(f) = &s.fleet {
        println!(
            "fleet:       node {}, store {}",
            f.node.as_deref().unwrap_or("-"),
            f.store
        );
        if f.store_up {
            println!("  store:     up (revision {})", f.revision);
        } else {
            println!(
                "  store:     DOWN: forwarding with the last decisions (revision {}); approvals are refused until it is back",
                f.revision
            );
        }
    }
    if s.draining {
        println!("draining:    yes (nothing announced; flows keep forwarding)");
    }
    if let Some(id) = &s.dataplane_id {
        println!("  identity:  {id}");
    }
    if d.apply_failures > 0 {
        println!("  failed applies: {}", d.apply_failures);
    }
    if let Some(e) = &d.last_error {
        println!("  last failure: {e}");
    }
}

/// `plink-ctl run`: opens the event log, then runs the controller,
/// recording why it stopped.
fn run(
    config_path: PathBuf,
    allow_broken_contract: bool,
    node: Option<String>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // SIGHUP's default action kills: catch it before the (slow) start, and
    // keep it: a reload asked for during start-up runs once we are up.
    let hup = {
        let _rt = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("catching SIGHUP")?
    };
    let config = Config::load_node(&config_path, node.as_deref())?;
    let events = Events::open(config.gateway.event_log.as_ref())?;
    let result = run_with(
        runtime,
        hup,
        (config_path, config),
        allow_broken_contract,
        &events,
    );
    events.emit(match &result {
        Ok(signal) => Event::ControllerStopped {
            pid: std::process::id(),
            signal: Some(signal.to_string()),
            error: None,
        },
        Err(e) => Event::ControllerStopped {
            pid: std::process::id(),
            signal: None,
            error: Some(format!("{e:#}")),
        },
    });
    // The writer thread dies with the process: let it finish first.
    events.flush();
    result.map(|_| ())
}

/// Runs the controller until a signal stops it; returns the signal's name.
fn run_with(
    runtime: tokio::runtime::Runtime,
    mut hup: tokio::signal::unix::Signal,
    (config_path, config): (PathBuf, Config),
    allow_broken_contract: bool,
    events: &Events,
) -> anyhow::Result<&'static str> {
    // One controller per dataplane, held until this process exits.
    let _pins = dataplane::lock_pins(&config.gateway.bpffs_root)?;
    // Observe before touching anything: the pins (if any) and their identity.
    let pinned = dataplane::pinned_identity(&config.gateway.bpffs_root)?;
    // The saved decisions are restored before anything touches the system:
    // a corrupt state file stops us here. Nothing is saved until the
    // dataplane holds the model.
    let mut controller = Controller::prepare(&config_path, config.clone())?;
    controller.set_events(events.clone());
    controller.check_pins(
        pinned.as_deref(),
        &dataplane::pin_dir(&config.gateway.bpffs_root),
    )?;
    let findings = hostcheck::check_host(&config);
    let broken = hostcheck::contract_violations(&findings);
    if !broken.is_empty() && !allow_broken_contract {
        let list: Vec<String> = broken.iter().map(|f| format!("  {}", f.message)).collect();
        anyhow::bail!(
            "the host breaks plink's forwarding contract; fix it and start again \
             (or pass --allow-broken-contract, for debugging only):\n{}",
            list.join("\n")
        );
    }
    for f in findings {
        match f.severity {
            hostcheck::Severity::Ok => {
                tracing::debug!(check = f.check, subject = %f.subject, "{}", f.message)
            }
            hostcheck::Severity::Warn => {
                tracing::warn!(check = f.check, subject = %f.subject, "{}", f.message)
            }
            hostcheck::Severity::Fail => {
                tracing::error!(check = f.check, subject = %f.subject, "{} (see `plink-ctl check --host`)", f.message)
            }
        }
    }
    let mut gateway = Gateway::start(&config)?;
    gateway.events = events.clone();
    let identity = gateway
        .dp
        .identity()
        .context("reading the dataplane's identity")?;
    if pinned.is_none() {
        controller.bind_fresh_dataplane(&identity)?;
    }
    // Health as the running dataplane recorded it: a backend a previous
    // controller took down stays out of the table until it passes `rise` probes.
    let health = HealthMap::default();
    let adopted_down = gateway.adopted_down_backends(&controller.model());
    for id in &adopted_down {
        health.seed_down(*id);
    }
    let gateway = Arc::new(Mutex::new(gateway));
    // The first apply: an adopting start purges the flows the config no
    // longer allows; only then is the state saved, bound to these pins.
    controller
        .start(
            Box::new(GatewayApplier::new(
                gateway.clone(),
                Box::new(health.clone()),
            )),
            Some(identity),
        )
        .context("writing the config into the dataplane maps")?;
    if let Some(dataplane_id) = pinned.clone() {
        events.emit(adoption_event(
            dataplane_id,
            &config,
            &controller.model(),
            &adopted_down,
            &gateway::lock(&gateway),
        ));
    }
    let apply_health = controller.apply_health();
    let store_up = controller.store_up_flag();
    let mut shared_updates = controller.take_shared_updates();
    let signal = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let socket = config.gateway.admin_socket.clone();
        let listener = AdminListener::bind(&socket)
            .with_context(|| format!("serving the admin API on {}", socket.display()))?;
        let controller = Arc::new(Mutex::new(controller));
        // What other fleet nodes decided (etcd watch): applied as it comes.
        if let Some(mut updates) = shared_updates.take() {
            let c = controller.clone();
            tokio::spawn(async move {
                while let Some(update) = updates.recv().await {
                    let c = c.clone();
                    let rev = update.revision;
                    match tokio::task::spawn_blocking(move || lock(&c).apply_shared(update)).await {
                        Ok(Ok(())) => tracing::info!(revision = rev, "applied the fleet's shared state"),
                        Ok(Err(e)) => tracing::warn!("applying the fleet's shared state (revision {rev}): {e:#}"),
                        Err(e) => tracing::warn!("applying the fleet's shared state: {e}"),
                    }
                }
            });
        }
        let models = lock(&controller).subscribe();
        let flows = match dataplane::FlowReader::open(&config.gateway.bpffs_root) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("conntrack listings will wait for applies: {e:#}");
                None
            }
        };
        lock(&controller).set_dataplane(Arc::new(GatewayQueries {
            gateway: gateway.clone(),
            models: models.clone(),
            flows,
        }));

        // Every committed change (admin action, reload) was applied by the
        // controller before it was published; the health checker follows
        // the published model. A health change (a backend went down or came
        // back) re-applies the committed model: the lookup tables follow the
        // health map.
        let (health_tx, mut health_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut checker = HealthChecker::new(health.clone(), health_tx).with_events(events.clone());
        checker.reconcile(&models.borrow().clone());
        let model_task = {
            let mut models = models.clone();
            let controller = controller.clone();
            tokio::spawn(async move {
                let mut seen: Arc<Model> = models.borrow_and_update().clone();
                loop {
                    tokio::select! {
                        changed = models.changed() => {
                            if changed.is_err() {
                                break;
                            }
                            let latest = models.borrow_and_update().clone();
                            let diff = Model::diff(&seen, &latest);
                            tracing::info!(changes = ?diff.summary(), "model changed");
                            checker.reconcile(&latest);
                            seen = latest;
                        }
                        Some(()) = health_rx.recv() => {
                            // Several backends may have changed at once: one apply.
                            while health_rx.try_recv().is_ok() {}
                            tracing::info!("backend health changed: updating the lookup tables");
                            let c = controller.clone();
                            let result = tokio::task::spawn_blocking(move || lock(&c).reapply()).await;
                            match result {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => tracing::error!("applying the health change failed: {e}"),
                                Err(e) => tracing::error!("applying the health change panicked: {e}"),
                            }
                        }
                    }
                }
            })
        };

        // Conntrack GC on the datapath's clock, once a second.
        // Interfaces deleted and re-created while we run get their program
        // back (rtnetlink link events); a deleted one shows as a failed
        // apply (status DIVERGED) until it is back. Neighbour and route
        // events move the next-hop generation flows cache their hop under.
        let link_task = {
            let (link_tx, mut link_rx) = tokio::sync::mpsc::unbounded_channel();
            match linkwatch::LinkEvents::subscribe() {
                Ok(events) => {
                    std::thread::spawn(move || {
                        loop {
                            match events.next() {
                                Ok(batch) => {
                                    for e in batch {
                                        if link_tx.send(e).is_err() {
                                            return;
                                        }
                                    }
                                }
                                // The socket overflowed: events were lost, so
                                // next hops are looked up again (as for a route).
                                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                                    tracing::warn!("rtnetlink events overflowed; refreshing next hops");
                                    if link_tx.send(linkwatch::LinkEvent::Route).is_err() {
                                        return;
                                    }
                                }
                                Err(e) => {
                                    tracing::error!("rtnetlink events stopped: {e}");
                                    return;
                                }
                            }
                        }
                    });
                }
                Err(e) => tracing::error!("not watching interfaces (rtnetlink): {e}"),
            }
            let gateway = gateway.clone();
            let controller = controller.clone();
            tokio::spawn(async move {
                let mut hops = linkwatch::HopTracker::default();
                while let Some(event) = link_rx.recv().await {
                    if hops.moves_hops(&event) {
                        let g = gateway.clone();
                        let bumped =
                            tokio::task::spawn_blocking(move || gateway::lock(&g).dp.bump_hop_gen()).await;
                        match bumped {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::error!("refreshing next hops failed: {e:#}"),
                            Err(e) => tracing::error!("refreshing next hops panicked: {e}"),
                        }
                    }
                    let Some(name) = event.name() else { continue };
                    let configured = lock(&controller)
                        .config()
                        .interfaces
                        .iter()
                        .any(|i| i.name == name);
                    if !configured {
                        continue;
                    }
                    // A re-created veth pair sends a burst: act once on it.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    while link_rx.try_recv().is_ok() {}
                    tracing::info!(?event, "a configured interface changed");
                    let (g, c) = (gateway.clone(), controller.clone());
                    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                        let config = lock(&c).config().clone();
                        {
                            let mut gw = gateway::lock(&g);
                            let missing = gw.dp.unattached_interfaces(&config);
                            if !missing.is_empty() {
                                tracing::info!(interfaces = ?missing, "attaching XDP to re-created interfaces");
                                gw.dp.attach_all(&config)?;
                            }
                        }
                        // The interface map follows (ifindex, MAC, answers).
                        lock(&c).reapply()?;
                        Ok(())
                    })
                    .await;
                    match result {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::error!("following the interface change failed: {e:#}"),
                        Err(e) => tracing::error!("following the interface change panicked: {e}"),
                    }
                }
            })
        };

        let gc_task = {
            let gateway = gateway.clone();
            let controller = controller.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let gw = gateway.clone();
                    let r = tokio::task::spawn_blocking(move || {
                        let mut g = gateway::lock(&gw);
                        g.gc().map(|()| g.nat_converge_due())
                    })
                    .await;
                    match r {
                        Ok(Err(e)) => tracing::warn!("conntrack GC: {e:#}"),
                        // A draining NAT address lost its last flow (or a
                        // retired one's grace ran out): the plan moves it on.
                        Ok(Ok(true)) => {
                            let c = controller.clone();
                            let r = tokio::task::spawn_blocking(move || lock(&c).reapply()).await;
                            if let Ok(Err(e)) = r {
                                tracing::warn!("converging NAT addresses: {e}");
                            }
                        }
                        _ => {}
                    }
                }
            })
        };

        let caps_task = caps_task(&config, models.clone(), events.clone(), pinned.is_some());

        let metrics_listener = metrics::bind(config.gateway.metrics).await?;
        let metrics_task = {
            let gateway = gateway.clone();
            let models = models.clone();
            let apply_health = apply_health.clone();
            // Counters through our own descriptors of the pinned maps: a
            // scrape holds the gateway only to copy its small view.
            let counters = match dataplane::CounterReader::open(&config.gateway.bpffs_root) {
                Ok(r) => Some(Mutex::new((r, None))),
                Err(e) => {
                    tracing::warn!("scrapes will wait for applies and the GC: {e:#}");
                    None
                }
            };
            let snapshot: metrics::SnapshotFn = Arc::new(move || {
                let model = models.borrow().clone();
                let read = match &counters {
                    Some(c) => {
                        let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
                        let (reader, last_view) = &mut *c;
                        gateway::scrape(&gateway, reader, last_view, &model)
                    }
                    None => gateway::lock(&gateway).snapshot(&model),
                };
                let mut snap = match read {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("reading counters for /metrics: {e:#}");
                        metrics::Snapshot::default()
                    }
                };
                snap.dataplane_in_sync = apply_health.in_sync();
                snap.apply_failures = apply_health.failures();
                snap.fleet_store_up = store_up
                    .as_ref()
                    .map(|f| f.load(std::sync::atomic::Ordering::SeqCst));
                snap
            });
            tokio::spawn(metrics::serve(metrics_listener, snapshot))
        };

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(admin::serve(listener, controller.clone(), async {
            let _ = stopped.await;
        }));
        tracing::info!(socket = %socket.display(), "plink is running; SIGHUP reloads, SIGINT or SIGTERM stops the controller");
        events.emit(Event::ControllerStarted {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            config: config_path.clone(),
            dataplane: if pinned.is_some() {
                events::DataplaneStart::Adopted
            } else {
                events::DataplaneStart::Created
            },
            dataplane_id: lock(&controller).dataplane_id().map(str::to_owned),
        });
        // Readiness marker on stdout for supervisors and tests.
        println!("ready");
        let signal = loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received"); break "SIGTERM"; }
                _ = int.recv() => { tracing::info!("SIGINT received"); break "SIGINT"; }
                _ = hup.recv() => {
                    let (c, log) = (controller.clone(), events.clone());
                    let result = tokio::task::spawn_blocking(move || {
                        // SIGHUP is also logrotate's signal: the event log is
                        // reopened first, so the reload's event is in the new file.
                        if let Err(e) = log.reopen() {
                            tracing::error!("SIGHUP: {e}");
                        }
                        lock(&c).reload_via(events::Trigger::Signal)
                    })
                    .await;
                    match result {
                        Ok(Ok(out)) => tracing::info!(changes = ?out.changes, "SIGHUP: config reloaded"),
                        Ok(Err(e)) => tracing::error!("SIGHUP: reload refused, running state unchanged:\n{e}"),
                        Err(e) => tracing::error!("SIGHUP: reload failed: {e}"),
                    }
                }
            }
        };
        let _ = stop.send(());
        let _ = server.await;
        model_task.abort();
        gc_task.abort();
        link_task.abort();
        metrics_task.abort();
        if let Some(t) = caps_task {
            t.abort();
        }
        anyhow::Ok(signal)
    })?;
    drop(gateway);
    Ok(signal)
}

/// What an adopting start found in the pins and what its first apply did.
fn adoption_event(
    dataplane_id: String,
    config: &Config,
    model: &Model,
    down: &[plink_ctl::model::BackendId],
    gw: &Gateway,
) -> Event {
    let down_backends = model
        .services
        .values()
        .flat_map(|s| s.backends.iter().map(move |b| (s, b)))
        .filter(|(_, b)| down.contains(&b.id))
        .map(|(s, b)| events::BackendRef {
            service: s.name.clone(),
            address: b.address,
        })
        .collect();
    let (mut draining_nat, mut retired_nat) = (Vec::new(), Vec::new());
    if let Some(spec) = &gw.spec {
        draining_nat = spec
            .services
            .iter()
            .flat_map(|s| s.nat.iter())
            .filter(|n| n.draining && !n.addr.is_unspecified())
            .map(|n| n.addr)
            .collect();
        retired_nat = spec.retired_nat.keys().copied().collect();
    }
    Event::DataplaneAdopted {
        dataplane_id,
        pin_dir: dataplane::pin_dir(&config.gateway.bpffs_root),
        purged_flows: gw
            .first_apply
            .iter()
            .flat_map(|r| r.purged.iter())
            .map(|(why, n)| (why.name().to_owned(), *n))
            .collect(),
        down_backends,
        draining_nat,
        retired_nat,
    }
}

/// Watches the datapath's per-endpoint refusal counters (caps reached)
/// once a second through its own map descriptors; `cap_reached` events are
/// rate-limited per endpoint by [`events::CapWatch`].
fn caps_task(
    config: &Config,
    models: tokio::sync::watch::Receiver<Arc<Model>>,
    events: Events,
    adopted: bool,
) -> Option<tokio::task::JoinHandle<()>> {
    let reader = match dataplane::CounterReader::open(&config.gateway.bpffs_root) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("no cap_reached events (cannot read the endpoint counters): {e:#}");
            return None;
        }
    };
    let state = Arc::new(Mutex::new((
        reader,
        events::CapWatch::new(events::CAP_EVENT_INTERVAL, adopted),
    )));
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let (state, model, events) = (state.clone(), models.borrow().clone(), events.clone());
            let r = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                use plink_ctl::dataplane::CounterSource as _;
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                let (reader, watch) = &mut *st;
                let now = std::time::Instant::now();
                let mut ids = std::collections::BTreeSet::new();
                for e in model.endpoints.values() {
                    if e.state == plink_ctl::approval::ConnectionState::Removed {
                        continue;
                    }
                    ids.insert(e.id.0);
                    let c = reader.counters(dataplane::CounterKind::Endpoint, e.id.0)?;
                    let subject = events::CapSubject {
                        id: e.id.0,
                        endpoint: e.name.clone(),
                        service: e.service.clone(),
                        max_flows: e.limits.max_flows,
                        new_flows_per_second: e.limits.new_flows_per_second,
                    };
                    let counts = events::Refusals {
                        max_flows: c.refused_max_flows,
                        rate: c.refused_rate,
                    };
                    if let Some(ev) = watch.observe(&subject, counts, now) {
                        events.emit(ev);
                    }
                }
                watch.retain(&ids);
                watch.first_pass_done();
                Ok(())
            })
            .await;
            if let Ok(Err(e)) = r {
                tracing::debug!("reading the endpoint counters for cap events: {e:#}");
            }
        }
    }))
}

fn lock(c: &Mutex<Controller>) -> std::sync::MutexGuard<'_, Controller> {
    // Changes replace the state whole (Controller::commit), so a poisoned
    // lock still guards a coherent state.
    c.lock().unwrap_or_else(|p| p.into_inner())
}

fn stats(config_path: PathBuf, json: bool) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    let stats = dataplane::read_interface_stats(&config.gateway.bpffs_root)?;
    if json {
        let rows: Vec<_> = stats
            .iter()
            .map(|(index, s)| {
                serde_json::json!({
                    "ifindex": index,
                    "name": dataplane::ifname(*index),
                    "packets": s.packets,
                    "bytes": s.bytes,
                    "ipv4_packets": s.ipv4_packets,
                    "arp_packets": s.arp_packets,
                    "ipv6_packets": s.ipv6_packets,
                    "verdicts": plink_common::XDP_VERDICT_NAMES
                        .iter()
                        .zip(s.verdicts)
                        .map(|(name, n)| (name.to_string(), serde_json::json!(n)))
                        .collect::<serde_json::Map<_, _>>(),
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "interfaces": rows }));
    } else {
        println!(
            "{:<16} {:>8} {:>12} {:>14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
            "INTERFACE",
            "IFINDEX",
            "PACKETS",
            "BYTES",
            "IPV4",
            "ARP",
            "IPV6",
            "ABORTED",
            "DROP",
            "PASS",
            "TX",
            "REDIRECT"
        );
        for (index, s) in &stats {
            let name = dataplane::ifname(*index).unwrap_or_else(|| "?".into());
            let [aborted, drop, pass, tx, redirect] = s.verdicts;
            println!(
                "{:<16} {:>8} {:>12} {:>14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
                name,
                index,
                s.packets,
                s.bytes,
                s.ipv4_packets,
                s.arp_packets,
                s.ipv6_packets,
                aborted,
                drop,
                pass,
                tx,
                redirect
            );
        }
    }
    Ok(())
}
