//! Command-line interface: parse arguments, call the core or the daemon, print results;
//! never decides anything itself.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

use crate::config::{self, LoadError};
use crate::localtime::{format_duration, parse_instant, rfc3339};
use crate::plan::{self, Action, Observed, Plan, StageStatus};
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
    },
    /// Show every VM's state as the daemon sees it.
    Status {
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reboot a VM: at once with --now (root and the authorized group), otherwise in its next
    /// maintenance slot.
    Reboot {
        /// The VM.
        name: crate::model::VmName,
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
    /// Schedule a VM's deletion for a local date (T = midnight at its start); root and the
    /// authorized group only.
    Delete {
        /// The VM.
        name: crate::model::VmName,
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
        name: crate::model::VmName,
        #[command(flatten)]
        daemon: DaemonArgs,
        /// Judge the request as of this instant (RFC 3339); root only.
        #[arg(long, value_parser = instant)]
        now: Option<DateTime<Utc>>,
    },
    /// List the next maintenance windows as instants with UTC offsets.
    Windows {
        /// The JSON configuration.
        #[arg(long)]
        config: PathBuf,
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
        name: crate::model::VmName,
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
        Command::Daemon { config } => {
            init_logging();
            // One thread runs the loop; librbd calls go to tokio's blocking pool.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(crate::daemon::run(&config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { daemon, json } => {
            let Some(socket) = api_socket(daemon)? else {
                return Ok(ExitCode::FAILURE);
            };
            let value = call_daemon(&socket, &crate::api::Request::Status)?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &value)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", render_status(&value))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reboot { name, now, daemon } => {
            let Some(socket) = api_socket(daemon)? else {
                return Ok(ExitCode::FAILURE);
            };
            if now {
                call_daemon(&socket, &crate::api::Request::Reboot { vm: name.clone() })?;
                println!("{name} rebooted");
            } else {
                let req = crate::api::Request::MaintenanceRequest {
                    vm: name.clone(),
                    reason: "reboot requested".into(),
                };
                let v = call_daemon(&socket, &req)?;
                println!(
                    "{name} reboots in its maintenance slot {} – {}",
                    v["slot"]["start"].as_str().unwrap_or("?"),
                    v["slot"]["end"].as_str().unwrap_or("?")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Maintenance { command } => match command {
            MaintenanceCommand::List { daemon, json } => {
                let Some(socket) = api_socket(daemon)? else {
                    return Ok(ExitCode::FAILURE);
                };
                let v = call_daemon(&socket, &crate::api::Request::MaintenanceList)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
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
                }
                Ok(ExitCode::SUCCESS)
            }
            MaintenanceCommand::Request {
                name,
                reason,
                daemon,
            } => {
                let Some(socket) = api_socket(daemon)? else {
                    return Ok(ExitCode::FAILURE);
                };
                let req = crate::api::Request::MaintenanceRequest {
                    vm: name.clone(),
                    reason,
                };
                let v = call_daemon(&socket, &req)?;
                println!(
                    "maintenance of {name} in slot {} – {}, announced",
                    v["slot"]["start"].as_str().unwrap_or("?"),
                    v["slot"]["end"].as_str().unwrap_or("?")
                );
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::RunDue { daemon, now } => {
            let Some(socket) = api_socket(daemon)? else {
                return Ok(ExitCode::FAILURE);
            };
            let value = call_daemon(&socket, &crate::api::Request::RunDue { now })?;
            println!(
                "ran what was due at {}",
                value["ranAt"].as_str().unwrap_or("?")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete {
            name,
            at,
            daemon,
            now,
        } => {
            let Some(socket) = api_socket(daemon)? else {
                return Ok(ExitCode::FAILURE);
            };
            let req = crate::api::Request::Delete {
                vm: name.clone(),
                date: at,
                now,
            };
            let value = call_daemon(&socket, &req)?;
            println!("{name} is deleted on {at}:");
            for s in value["stages"].as_array().into_iter().flatten() {
                println!(
                    "  {:<15} {}",
                    s["stage"].as_str().unwrap_or("?"),
                    s["at"].as_str().unwrap_or("?")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::CancelDeletion { name, daemon, now } => {
            let Some(socket) = api_socket(daemon)? else {
                return Ok(ExitCode::FAILURE);
            };
            call_daemon(
                &socket,
                &crate::api::Request::CancelDeletion {
                    vm: name.clone(),
                    now,
                },
            )?;
            println!("the deletion of {name} is cancelled; the VM is kept as it was");
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file } => check_config(&file),
        Command::Plan {
            config,
            state_dir,
            now,
            json,
        } => {
            let Some(checked) = load_or_report(&config)? else {
                return Ok(ExitCode::FAILURE);
            };
            let cfg = checked.config;
            let dir = state_dir.unwrap_or_else(|| cfg.state_dir.clone());
            let state = State::load(&dir)?;
            // The CLI is an edge: it may read the clock; the core only gets `now`.
            let now = now.unwrap_or_else(Utc::now);
            let p = plan::plan(&cfg, &Observed::as_recorded(&state), &state, now);
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &p)?;
                writeln!(out)?;
            } else {
                write!(out, "{}", render_plan(&p))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Windows {
            config,
            from,
            count,
            json,
        } => {
            let Some(checked) = load_or_report(&config)? else {
                return Ok(ExitCode::FAILURE);
            };
            let policy = &checked.config.maintenance;
            let from = from.unwrap_or_else(Utc::now);
            let windows: Vec<_> = policy.windows(from).take(count).collect();
            let mut out = std::io::stdout().lock();
            if json {
                #[derive(serde::Serialize)]
                #[serde(rename_all = "camelCase")]
                struct Row {
                    start: String,
                    end: String,
                    duration_minutes: i64,
                }
                let rows: Vec<Row> = windows
                    .iter()
                    .map(|w| Row {
                        start: rfc3339(w.start),
                        end: rfc3339(w.end),
                        duration_minutes: w.duration().num_minutes(),
                    })
                    .collect();
                serde_json::to_writer_pretty(&mut out, &rows)?;
                writeln!(out)?;
            } else {
                for w in &windows {
                    writeln!(out, "{w}  ({})", format_duration(w.duration()))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check_config(file: &std::path::Path) -> Result<ExitCode> {
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

/// Loads a configuration; on problems prints each on its own line and returns `None`.
fn load_or_report(file: &std::path::Path) -> Result<Option<config::Checked>> {
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

/// The daemon's API socket: given, from the configuration's runtimeDir, or the default.
fn api_socket(daemon: DaemonArgs) -> Result<Option<PathBuf>> {
    Ok(Some(match (daemon.socket, daemon.config) {
        (Some(s), _) => s,
        (None, Some(c)) => match load_or_report(&c)? {
            Some(checked) => checked.config.runtime_dir.join(crate::api::SOCKET),
            None => return Ok(None),
        },
        (None, None) => PathBuf::from("/run/vmkeeper").join(crate::api::SOCKET),
    }))
}

/// One request to the daemon; its refusal or failure becomes this command's error.
fn call_daemon(socket: &std::path::Path, req: &crate::api::Request) -> Result<serde_json::Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(crate::api::call(socket, req))? {
        crate::api::Response::Ok(v) => Ok(v),
        crate::api::Response::Error(e) => anyhow::bail!("{e}"),
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

fn render_status(v: &serde_json::Value) -> String {
    let mut s = format!(
        "{:<16} {:<8} {:>8}  {:<22} {:<22} {}\n",
        "VM", "STATE", "PID", "APPLIED", "DECLARED", "NOTES"
    );
    let res = |r: &serde_json::Value| {
        if r.is_null() {
            "-".to_owned()
        } else {
            format!("{}c/{}M/{}G", r["cores"], r["memoryMiB"], r["diskGiB"])
        }
    };
    for vm in v.as_array().into_iter().flatten() {
        let mut notes = vec![];
        if !vm["pending"].is_null() {
            notes.push(format!(
                "pending {} in {} – {}",
                res(&vm["pending"]),
                vm["maintenanceSlot"]["start"].as_str().unwrap_or("?"),
                vm["maintenanceSlot"]["end"].as_str().unwrap_or("?")
            ));
        }
        if let Some(date) = vm["deletionDate"].as_str() {
            notes.push(format!("deleted on {date}"));
        }
        if vm["inMaintenance"].as_bool() == Some(true) {
            notes.push("IN MAINTENANCE".into());
        }
        for r in vm["refusals"].as_array().into_iter().flatten() {
            notes.push(format!("refused: {}", r.as_str().unwrap_or("")));
        }
        if let Some(u) = vm["lastUnplanned"].as_object() {
            notes.push(format!(
                "last unplanned: {} at {}",
                u["kind"].as_str().unwrap_or("?"),
                u["at"].as_str().unwrap_or("?")
            ));
        }
        s.push_str(&format!(
            "{:<16} {:<8} {:>8}  {:<22} {:<22} {}\n",
            vm["name"].as_str().unwrap_or("?"),
            if vm["running"].as_bool() == Some(true) {
                "running"
            } else {
                "stopped"
            },
            vm["qemuPid"]
                .as_u64()
                .map_or("-".to_owned(), |p| p.to_string()),
            res(&vm["applied"]),
            res(&vm["declared"]),
            notes.join("; ")
        ));
    }
    s
}

fn render_plan(p: &Plan) -> String {
    let mut s = format!("Plan at {} ({})\n", rfc3339(p.now), p.timezone);
    let section = |s: &mut String, title: &str, lines: Vec<String>| {
        if !lines.is_empty() {
            s.push_str(&format!("\n{title}:\n"));
            for l in lines {
                s.push_str(&format!("  {l}\n"));
            }
        }
    };
    section(&mut s, "Warnings", p.warnings.clone());
    section(
        &mut s,
        "Actions now",
        p.actions.iter().map(render_action).collect(),
    );
    section(
        &mut s,
        "Pending (applied by a maintenance reboot)",
        p.pending
            .iter()
            .map(|x| {
                format!(
                    "{}: pending cores {} -> {}, memoryMiB {} -> {}; reboot in slot {}, announced {}",
                    x.vm,
                    x.from.cores,
                    x.to.cores,
                    x.from.memory_mib,
                    x.to.memory_mib,
                    x.slot,
                    rfc3339(x.announced_at)
                )
            })
            .collect(),
    );
    section(
        &mut s,
        "Refused",
        p.refusals.iter().map(ToString::to_string).collect(),
    );
    section(
        &mut s,
        "Deletions",
        p.deletions
            .iter()
            .flat_map(|d| {
                let mut lines = vec![format!(
                    "{} on {} (cancellable until {})",
                    d.vm,
                    d.date,
                    rfc3339(d.cancellable_until)
                )];
                lines.extend(d.stages.iter().map(|st| {
                    let status = match st.status {
                        StageStatus::Done => "done",
                        StageStatus::Due => "due now",
                        StageStatus::Upcoming => "upcoming",
                    };
                    format!("  {:<15} {}  {status}", st.stage.as_str(), rfc3339(st.at))
                }));
                lines
            })
            .collect(),
    );
    section(
        &mut s,
        "Reserved names",
        p.reserved_names
            .iter()
            .map(|r| format!("{} is free on {}", r.vm, r.free_on))
            .collect(),
    );
    if p.actions.is_empty() && p.pending.is_empty() && p.refusals.is_empty() {
        s.push_str("\nNothing to do.\n");
    }
    s
}

fn render_action(a: &Action) -> String {
    match a {
        Action::CreateDisk {
            vm,
            size_gib,
            clone_from: None,
        } => {
            format!("{vm}: create disk {size_gib} GiB (thin)")
        }
        Action::CreateDisk {
            vm,
            size_gib,
            clone_from: Some(b),
        } => format!(
            "{vm}: create disk {size_gib} GiB as a clone of {}{}@{}",
            b.pool
                .as_deref()
                .map(|p| format!("{p}/"))
                .unwrap_or_default(),
            b.name,
            b.snapshot
        ),
        Action::Start { vm, resources: r } => format!(
            "{vm}: start with {} vCPU, {} MiB RAM, {} GiB disk",
            r.cores, r.memory_mib, r.disk_gib
        ),
        Action::GrowDisk {
            vm,
            from_gib,
            to_gib,
            live,
        } => format!(
            "{vm}: grow disk {from_gib} -> {to_gib} GiB{}",
            if *live {
                " live (QMP block_resize)"
            } else {
                ""
            }
        ),
        Action::Stop { vm, reason } => format!("{vm}: stop ({reason})"),
        Action::MaintenanceReboot { vm, slot } => {
            format!("{vm}: maintenance reboot in slot {slot}")
        }
        Action::ScheduleMaintenance {
            vm, slot, replaces, ..
        } => match replaces {
            Some(old) if old != slot => {
                format!("{vm}: move maintenance from {old} to {slot}, announce")
            }
            Some(_) => format!("{vm}: update maintenance in slot {slot}, announce"),
            None => format!("{vm}: schedule maintenance in slot {slot}, announce"),
        },
        Action::CancelMaintenance { vm, reason } => {
            format!("{vm}: cancel maintenance ({reason}), announce")
        }
        Action::ScheduleDeletion { vm, date, .. } => format!("{vm}: schedule deletion on {date}"),
        Action::CancelDeletion { vm, reason } => format!("{vm}: cancel deletion ({reason})"),
        Action::RunDeletionStage { vm, stage } => format!("{vm}: run deletion stage {stage}"),
    }
}
