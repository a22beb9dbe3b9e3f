//! Command-line interface: parse arguments, call the core or the daemon, print results;
//! never decides anything itself. One small function per command.

mod render;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

use crate::api::{Request, Response};
use crate::config::{self, LoadError};
use crate::localtime::{format_duration, parse_instant, rfc3339};
use crate::model::{ProjectName, VmName};
use crate::plan::{self, Observed};
use crate::state::State;

/// Supervise the VMs of this host.
#[derive(Debug, Parser)]
#[command(name = "vmkeeper", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration file: exit 0 (warnings printed) or 1 with every problem.
    CheckConfig {
        /// The JSON configuration.
        file: PathBuf,
    },
    /// Show what would happen now: actions, pending changes with their slots, refusals,
    /// deletion stages. Changes nothing.
    Plan {
        /// The JSON configuration.
        #[arg(long)]
        config: PathBuf,
        /// State directory; defaults to the configuration's stateDir.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Plan as of this instant (RFC 3339) instead of the clock.
        #[arg(long, value_parser = instant)]
        now: Option<DateTime<Utc>>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the supervisor: make the host's VMs match the configuration.
    Daemon {
        /// The JSON configuration; SIGHUP re-reads it.
        #[arg(long)]
        config: PathBuf,
        /// Accept `--now` from root on the API (`run-due --now`, `delete --now`): moves time,
        /// for tests only; a production daemon refuses it.
        #[arg(long)]
        test_clock: bool,
    },
    /// Make the daemon read its configuration again and apply it (as SIGHUP does); returns
    /// once what that started is done.
    Reload {
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Show every VM's state as the daemon sees it.
    Status {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reboot a VM: at once with --now (root, the operator group and its project's authorized
    /// group), otherwise in its next maintenance slot.
    Reboot {
        /// The VM.
        name: VmName,
        /// Reboot immediately instead of in the next maintenance slot.
        #[arg(long)]
        now: bool,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Maintenance reboots: list them, or request one.
    Maintenance {
        #[command(subcommand)]
        command: MaintenanceCommand,
    },
    /// Run what is due now: the command maintenance and deletion timers run.
    RunDue {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Act as of this instant (RFC 3339) instead of the clock; root only.
        #[arg(long, value_parser = instant)]
        now: Option<DateTime<Utc>>,
    },
    /// Schedule a VM's deletion for a local date in its project's zone (T = midnight at its
    /// start); root, the operator group and its project's authorized group only.
    Delete {
        /// The VM.
        name: VmName,
        /// The date D (YYYY-MM-DD); at least the date that begins at the next local midnight.
        #[arg(long, value_parser = crate::localtime::parse_date)]
        at: chrono::NaiveDate,
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Judge the request as of this instant (RFC 3339); root only.
        #[arg(long, value_parser = instant)]
        now: Option<DateTime<Utc>>,
    },
    /// Cancel a deletion requested with `vmkeeper delete`, until T + 3 days.
    CancelDeletion {
        /// The VM.
        name: VmName,
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Judge the request as of this instant (RFC 3339); root only.
        #[arg(long, value_parser = instant)]
        now: Option<DateTime<Utc>>,
    },
    /// Take the existing RBD image under a declared VM's name as that VM's disk: vmkeeper never
    /// uses an image it did not create unless told so (root and the authorized group).
    AdoptDisk {
        /// The VM.
        name: VmName,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Confirm the deletion of VMs removed from the configuration, held because more were
    /// removed at once than `removal.maxAtOnce` allows (root and the authorized group).
    ConfirmRemoval {
        /// The VMs.
        #[arg(required = true)]
        names: Vec<VmName>,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// List the next maintenance windows of a project as instants with UTC offsets.
    Windows {
        /// The JSON configuration.
        #[arg(long)]
        config: PathBuf,
        /// The project whose windows (in its zone, with its blackouts and the host's);
        /// default: the default project, whose windows are the host-wide ones.
        #[arg(long, default_value = crate::model::ProjectName::DEFAULT)]
        project: ProjectName,
        /// First instant of interest (RFC 3339); defaults to the clock.
        #[arg(long, value_parser = instant)]
        from: Option<DateTime<Utc>>,
        /// How many windows.
        #[arg(long, default_value_t = 7)]
        count: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How the CLI reaches the daemon.
#[derive(Debug, clap::Args)]
struct DaemonArgs {
    /// The daemon's configuration (to find its API socket under runtimeDir).
    #[arg(long, conflicts_with = "socket")]
    config: Option<PathBuf>,
    /// The daemon's API socket; default /run/vmkeeper/api.sock.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Give up when the daemon has not answered after this long (a reboot waits for the
    /// guest's ACPI shutdown and the new QEMU).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Subcommand)]
enum MaintenanceCommand {
    /// List announced maintenances.
    List {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask for a maintenance reboot of a VM in its next slot (announced as usual).
    Request {
        /// The VM.
        name: VmName,
        /// Why, for the announcement.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
}

fn instant(s: &str) -> Result<DateTime<Utc>, String> {
    parse_instant(s)
}

/// Runs the command named on the command line and reports its error chain once.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmkeeper: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Plan {
            config,
            state_dir,
            now,
            json,
        } => plan(&config, state_dir, now, json),
        Command::Windows {
            config,
            project,
            from,
            count,
            json,
        } => windows(&config, &project, from, count, json),
        Command::Daemon { config, test_clock } => daemon(&config, test_clock),
        Command::Reload { daemon } => with_daemon(daemon, &Request::Reload, |_| {
            println!("configuration applied")
        }),
        Command::Status { daemon, json } => with_daemon(daemon, &Request::Status, |v| {
            if json {
                print_json(&v);
            } else {
                print!("{}", render::status(&v));
            }
        }),
        Command::Reboot { name, now, daemon } => reboot(&name, now, daemon),
        Command::Maintenance { command } => maintenance(command),
        Command::RunDue { daemon, now } => with_daemon(daemon, &Request::RunDue { now }, |v| {
            println!("ran what was due at {}", v["ranAt"].as_str().unwrap_or("?"));
        }),
        Command::Delete {
            name,
            at,
            daemon,
            now,
        } => {
            let req = Request::Delete {
                vm: name.clone(),
                date: at,
                now,
            };
            with_daemon(daemon, &req, |v| {
                println!("{name} is deleted on {at}:");
                for s in v["stages"].as_array().into_iter().flatten() {
                    println!(
                        "  {:<15} {}",
                        s["stage"].as_str().unwrap_or("?"),
                        s["at"].as_str().unwrap_or("?")
                    );
                }
            })
        }
        Command::AdoptDisk { name, daemon } => {
            with_daemon(daemon, &Request::AdoptDisk { vm: name.clone() }, |_| {
                println!("the image of {name} is adopted as its disk; the VM takes it next");
            })
        }
        Command::ConfirmRemoval { names, daemon } => {
            let req = Request::ConfirmRemoval { vms: names.clone() };
            with_daemon(daemon, &req, |_| {
                for n in &names {
                    println!("{n}: removal confirmed, its deletion is scheduled");
                }
            })
        }
        Command::CancelDeletion { name, daemon, now } => {
            let req = Request::CancelDeletion {
                vm: name.clone(),
                now,
            };
            with_daemon(daemon, &req, |_| {
                println!("the deletion of {name} is cancelled; the VM is kept as it was");
            })
        }
    }
}

fn daemon(config: &Path, test_clock: bool) -> Result<ExitCode> {
    init_logging();
    // Two worker threads: the loop and the operations' async parts share them; librbd calls,
    // state writes and user lookups go to the blocking pool.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(crate::daemon::run(config, test_clock))?;
    Ok(ExitCode::SUCCESS)
}

fn reboot(name: &VmName, now: bool, daemon: DaemonArgs) -> Result<ExitCode> {
    if now {
        return with_daemon(daemon, &Request::Reboot { vm: name.clone() }, |_| {
            println!("{name} rebooted");
        });
    }
    let req = Request::MaintenanceRequest {
        vm: name.clone(),
        reason: "reboot requested".into(),
    };
    with_daemon(daemon, &req, |v| {
        println!(
            "{name} reboots in its maintenance slot {} – {}",
            v["slot"]["start"].as_str().unwrap_or("?"),
            v["slot"]["end"].as_str().unwrap_or("?")
        );
    })
}

fn maintenance(command: MaintenanceCommand) -> Result<ExitCode> {
    match command {
        MaintenanceCommand::List { daemon, json } => {
            with_daemon(daemon, &Request::MaintenanceList, |v| {
                if json {
                    print_json(&v);
                    return;
                }
                for m in v.as_array().into_iter().flatten() {
                    let reasons: Vec<&str> = m["reasons"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r.as_str())
                        .collect();
                    println!(
                        "{}: {} – {} (announced {}): {}",
                        m["vm"].as_str().unwrap_or("?"),
                        m["slot"]["start"].as_str().unwrap_or("?"),
                        m["slot"]["end"].as_str().unwrap_or("?"),
                        m["announcedAt"].as_str().unwrap_or("?"),
                        reasons.join("; ")
                    );
                }
            })
        }
        MaintenanceCommand::Request {
            name,
            reason,
            daemon,
        } => {
            let req = Request::MaintenanceRequest {
                vm: name.clone(),
                reason,
            };
            with_daemon(daemon, &req, |v| {
                println!(
                    "maintenance of {name} in slot {} – {}, announced",
                    v["slot"]["start"].as_str().unwrap_or("?"),
                    v["slot"]["end"].as_str().unwrap_or("?")
                );
            })
        }
    }
}

fn check_config(file: &Path) -> Result<ExitCode> {
    match load_or_report(file)? {
        Some(checked) => {
            for w in &checked.warnings {
                println!("warning: {w}");
            }
            println!("{}: ok, {} VM(s)", file.display(), checked.config.vms.len());
            Ok(ExitCode::SUCCESS)
        }
        None => Ok(ExitCode::FAILURE),
    }
}

fn plan(
    config: &Path,
    state_dir: Option<PathBuf>,
    now: Option<DateTime<Utc>>,
    json: bool,
) -> Result<ExitCode> {
    let Some(checked) = load_or_report(config)? else {
        return Ok(ExitCode::FAILURE);
    };
    let cfg = checked.config;
    let dir = state_dir.unwrap_or_else(|| cfg.state_dir.clone());
    let state = State::load(&dir)?;
    // The CLI is an edge: it may read the clock; the core only gets `now`.
    let now = now.unwrap_or_else(Utc::now);
    let p = plan::plan(&cfg, &Observed::as_recorded(&state), &state, now);
    if json {
        print_json(&serde_json::to_value(&p)?);
    } else {
        print!("{}", render::plan(&p));
    }
    Ok(ExitCode::SUCCESS)
}

fn windows(
    config: &Path,
    project: &ProjectName,
    from: Option<DateTime<Utc>>,
    count: usize,
    json: bool,
) -> Result<ExitCode> {
    let Some(checked) = load_or_report(config)? else {
        return Ok(ExitCode::FAILURE);
    };
    let Some(project) = checked.config.projects.get(project) else {
        let names: Vec<&str> = checked.config.projects.keys().map(|p| p.as_str()).collect();
        anyhow::bail!(
            "no project {project} (the projects are {})",
            names.join(", ")
        );
    };
    let from = from.unwrap_or_else(Utc::now);
    let windows: Vec<_> = project.maintenance.windows(from).take(count).collect();
    if json {
        let rows: Vec<serde_json::Value> = windows
            .iter()
            .map(|w| {
                serde_json::json!({
                    "start": rfc3339(w.start),
                    "end": rfc3339(w.end),
                    "durationMinutes": w.duration().num_minutes(),
                })
            })
            .collect();
        print_json(&serde_json::Value::Array(rows));
    } else {
        for w in &windows {
            println!("{w}  ({})", format_duration(w.duration()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, v);
    let _ = writeln!(out);
}

/// Loads a configuration; on problems prints each on its own line and returns `None`.
fn load_or_report(file: &Path) -> Result<Option<config::Checked>> {
    match config::load(file) {
        Ok(c) => Ok(Some(c)),
        Err(LoadError::Invalid { problems, .. }) => {
            for p in &problems {
                println!("{p}");
            }
            Ok(None)
        }
        Err(e) => Err(e).context("cannot load the configuration"),
    }
}

/// Sends `req` to the daemon and prints its answer with `show`; the daemon's refusal or
/// failure becomes this command's error.
fn with_daemon(
    daemon: DaemonArgs,
    req: &Request,
    show: impl FnOnce(serde_json::Value),
) -> Result<ExitCode> {
    let socket = match (daemon.socket, daemon.config) {
        (Some(s), _) => s,
        (None, Some(c)) => match load_or_report(&c)? {
            Some(checked) => checked.config.runtime_dir.join(crate::api::SOCKET),
            None => return Ok(ExitCode::FAILURE),
        },
        (None, None) => PathBuf::from("/run/vmkeeper").join(crate::api::SOCKET),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(crate::api::call(&socket, req, daemon.timeout))? {
        Response::Ok(v) => {
            show(v);
            Ok(ExitCode::SUCCESS)
        }
        Response::Error(e) => anyhow::bail!("{e}"),
    }
}

/// Logs to the journal when it is there (fields VM=, ACTION=, ... and MESSAGE_ID=), and to
/// stderr. `error!` is reserved for alarms and written at alert priority.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMKEEPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journald = tracing_journald::layer().ok().map(|l| {
        let mut prio = tracing_journald::PriorityMappings::new();
        prio.error = tracing_journald::Priority::Alert;
        l.with_field_prefix(None)
            .with_syslog_identifier("vmkeeper".into())
            .with_priority_mappings(prio)
    });
    // Under systemd stderr goes to the journal too: write each entry once.
    let under_journal = journald.is_some() && std::env::var_os("JOURNAL_STREAM").is_some();
    let stderr = (!under_journal).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .init();
}
