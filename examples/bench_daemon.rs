//! Benchmark for issue 4: what the daemon costs the host, run by scripts/bench-daemon.sh under
//! harness/run.sh.
//!
//! 1. One periodic pass with nothing to do, for N declared VMs whose units run (stand-ins:
//!    transient `sleep infinity` services named `vmkeeper-vm-benchNNNN.service`), timed through
//!    the functions the daemon runs on every tick: `vmkeeper::daemon::resync::observe` (one
//!    `ListUnitsByPatterns` call; instances known from the previous look) and the pure
//!    planner. Beside it, the same observation by a shell loop of `systemctl show` per VM.
//! 2. A real idle daemon (transient unit of the harness systemd) running two real test guests:
//!    its context switches per minute (all threads, voluntary + involuntary) and its RSS, read
//!    from /proc inside the harness's pid namespace.
//!
//! Usage: bench_daemon [N...] (ascending, default 10 100 1000). Needs `VMKEEPER_BIN`, the
//! vmkeeper binary the idle daemon runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use vmkeeper::config::{self, Config};
use vmkeeper::daemon::resync;
use vmkeeper::exec::systemd::Systemd;
use vmkeeper::model::Resources;
use vmkeeper::plan;
use vmkeeper::state::{State, VmRecord};

#[path = "standins/mod.rs"]
mod standins;
use standins::*;

/// Repetitions of each in-process measurement; the median is printed.
const ROUNDS: usize = 7;
/// How long the idle daemon is watched.
const IDLE: Duration = Duration::from_secs(60);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this under the harness: scripts/bench-daemon.sh")
    })
}

/// Runs a program inside the harness's namespaces (directly when the prefix is empty).
fn inside(nsenter: &[String], program: &str, args: &[&str]) -> Res<Output> {
    let mut cmd = match nsenter.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg("--").arg(program);
            c
        }
        None => Command::new(program),
    };
    let out = cmd.args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(out)
}

/// The configuration JSON shared by both parts; `vms` maps names to their keys.
fn config_json(dir: &Path, vms: &serde_json::Value) -> serde_json::Value {
    json!({
        "stateDir": dir.join("state"),
        "runtimeDir": dir.join("run"),
        "ceph": { "conf": env("CEPH_CONF"), "pool": env("VMKEEPER_CEPH_POOL"),
                  "clientId": env("VMKEEPER_CEPH_CLIENT"),
                  "qemuClientId": env("VMKEEPER_CEPH_QEMU_CLIENT"),
                  "qemuKeyFile": env("VMKEEPER_CEPH_QEMU_KEY") },
        "qemu": { "accel": env("VMKEEPER_QEMU_ACCEL"), "stopTimeout": "20s",
                  "user": env("VMKEEPER_QEMU_USER") },
        "vms": vms,
    })
}

const DECLARED: Resources = Resources {
    cores: 1,
    memory_mib: 1024,
    disk_gib: 30,
};

/// `n` declared VMs, and a state in which each already runs with what is declared: a pass
/// over them has nothing to do.
fn declared(dir: &Path, n: usize) -> Res<(Config, State)> {
    let vms: serde_json::Map<String, serde_json::Value> = (0..n)
        .map(|i| (vm_name(i), serde_json::to_value(DECLARED).unwrap()))
        .collect();
    let text = config_json(dir, &vms.into()).to_string();
    let config = config::parse(&text)
        .map_err(|problems| format!("bench config invalid: {problems:?}"))?
        .config;
    let mut state = State::default();
    for (name, spec) in &config.vms {
        // Recorded as started with today's command line, so each pass compares it in full
        // (the outdated-QEMU check) and finds nothing to do.
        let paths = vmkeeper::render::VmPaths::new(&config.runtime_dir, name);
        let mut argv = vmkeeper::render::qemu_argv(&config, spec, DECLARED, &paths);
        argv[0] = vmkeeper::daemon::resolve_program(&argv[0]);
        state.vms.insert(
            name.clone(),
            VmRecord {
                applied: DECLARED,
                running: true,
                instance: None,
                ip_addresses: vec![],
                last_unplanned: None,
                argv,
                image_id: None,
                generation: 1,
            },
        );
    }
    Ok((config, state))
}

async fn passes(sd: &Systemd, nsenter: &[String], scratch: &Path, counts: &[usize]) -> Res<()> {
    println!(
        "One reconcile pass with nothing to do (median of {ROUNDS}; shell loop: median of 3, \
         1 round above 100 VMs)"
    );
    println!(
        "{:>6} | {:>20} | {:>16} | {:>22} | {:>8}",
        "VMs", "vmkeeper pass (ms)", "of it plan (ms)", "systemctl show loop (ms)", "ratio"
    );
    let mut created = 0;
    for &n in counts {
        let t = Instant::now();
        start_units(sd, created, n).await?;
        eprintln!(
            "# started {} stand-in units in {:.0} ms",
            n - created,
            ms(t.elapsed())
        );
        created = n;
        let (config, state) = declared(scratch, n)?;
        // The daemon's first look (at start) reads every instance; later ones trust them.
        let first = resync::Request {
            id: 0,
            full: true,
            vms: config
                .vms
                .keys()
                .map(|vm| {
                    let belief = resync::Belief {
                        up: None,
                        pid: None,
                        epoch: 0,
                    };
                    (vm.clone(), belief)
                })
                .collect(),
        };
        let req = resync::Request {
            id: 1,
            full: false,
            vms: resync::observe(sd, &first).await?.beliefs(),
        };

        let mut pass = Vec::new();
        for _ in 0..ROUNDS {
            let now = Utc::now();
            let t = Instant::now();
            let report = resync::observe(sd, &req).await?;
            let p = plan::plan(&config, &report.observed(&state), &state, now);
            pass.push(t.elapsed());
            if !p.actions.is_empty() || !p.refusals.is_empty() || !p.pending.is_empty() {
                return Err(format!("the pass for {n} VMs is not idle: {p:?}").into());
            }
        }
        // The planner's share, on the same observation.
        let observed = resync::observe(sd, &req).await?.observed(&state);
        if observed.vms.values().filter(|v| v.running).count() != n {
            return Err(format!("not all {n} stand-ins observed running").into());
        }
        let mut planning = Vec::new();
        for _ in 0..ROUNDS {
            let now = Utc::now();
            let t = Instant::now();
            let p = plan::plan(&config, &observed, &state, now);
            planning.push(t.elapsed());
            std::hint::black_box(p);
        }
        let pass = median(pass);
        // The shell loop takes seconds per round at 1000 VMs: fewer rounds there.
        let rounds = if n > 100 { 1 } else { 3 };
        let shell = median(
            (0..rounds)
                .map(|_| shell_loop(nsenter, n, "ActiveState,SubState"))
                .collect::<Res<_>>()?,
        );
        println!(
            "{n:>6} | {:>20.2} | {:>16.3} | {:>24.1} | {:>7.0}x",
            ms(pass),
            ms(median(planning)),
            ms(shell),
            shell.as_secs_f64() / pass.as_secs_f64()
        );
    }
    Ok(())
}

/// Name and voluntary + involuntary context switches of every thread of `pid`, by thread id.
fn switches(nsenter: &[String], pid: u32) -> Res<BTreeMap<u32, (String, u64)>> {
    // One shell reads every thread's status, so all come from the same instant.
    let script =
        format!("for t in /proc/{pid}/task/*; do echo \"TID ${{t##*/}}\"; cat \"$t/status\"; done");
    let out = inside(nsenter, "/bin/sh", &["-c", &script])?;
    let mut by_tid: BTreeMap<u32, (String, u64)> = BTreeMap::new();
    let mut tid = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(t) = line.strip_prefix("TID ") {
            tid = t.parse()?;
        } else if let Some(name) = line.strip_prefix("Name:") {
            by_tid.entry(tid).or_default().0 = name.trim().to_owned();
        } else if let Some((key, value)) = line.split_once(':')
            && key.ends_with("ctxt_switches")
        {
            by_tid.entry(tid).or_default().1 += value.trim().parse::<u64>()?;
        }
    }
    Ok(by_tid)
}

fn status_field(nsenter: &[String], pid: u32, field: &str) -> Res<String> {
    let out = inside(nsenter, "/bin/cat", &[&format!("/proc/{pid}/status")])?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_owned())
        })
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

fn wait_for(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) -> Res<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(format!("timed out after {timeout:?} waiting for {what}").into())
}

/// Starts a real daemon with two real guests, lets it idle and reads its costs.
fn idle_daemon(nsenter: &[String], scratch: &Path) -> Res<()> {
    let bin = env("VMKEEPER_BIN");
    let dir = scratch.join("idle");
    std::fs::create_dir_all(&dir)?;
    let boot = json!({ "kernel": env("VMKEEPER_GUEST_KERNEL"),
                       "initrd": env("VMKEEPER_GUEST_INITRD"),
                       "append": "console=ttyS0 quiet" });
    let vms = ["idle-a", "idle-b"];
    let declared: serde_json::Map<String, serde_json::Value> = vms
        .iter()
        .map(|v| {
            let keys = json!({ "cores": 1, "memoryMiB": 1024, "diskGiB": 30, "boot": boot });
            ((*v).to_owned(), keys)
        })
        .collect();
    let config_path: PathBuf = dir.join("config.json");
    std::fs::write(
        &config_path,
        config_json(&dir, &declared.into()).to_string(),
    )?;
    let unit = "vmkeeper-bench-daemon.service";
    let config_arg = config_path.display().to_string();
    let t = Instant::now();
    inside(
        nsenter,
        "systemd-run",
        &[
            "--unit",
            unit,
            "--property",
            "Type=notify",
            &bin,
            "daemon",
            "--config",
            &config_arg,
        ],
    )?;
    let consoles: Vec<PathBuf> = vms
        .iter()
        .map(|v| dir.join("run/vms").join(v).join("console.log"))
        .collect();
    wait_for(Duration::from_secs(180), "both guests to boot", || {
        consoles
            .iter()
            .all(|c| std::fs::read_to_string(c).is_ok_and(|s| s.contains("VMSIZE vda=")))
    })?;
    eprintln!(
        "# daemon up, both guests booted in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let out = inside(
        nsenter,
        "systemctl",
        &["show", "-p", "MainPID", "--value", unit],
    )?;
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    // Past start-up: the blocking pool's threads (Ceph at start) end after 10 s idle.
    std::thread::sleep(Duration::from_secs(15));

    let before = switches(nsenter, pid)?;
    let t = Instant::now();
    std::thread::sleep(IDLE);
    let after = switches(nsenter, pid)?;
    let elapsed = t.elapsed();
    // Per thread name: the daemon's own thread (named like the binary) against the threads
    // librados keeps for its open cluster connection.
    let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
    for (tid, (name, n)) in &after {
        let was = before.get(tid).map_or(0, |(_, n)| *n);
        *by_name.entry(name.clone()).or_default() += n - was;
    }
    let delta: u64 = by_name.values().sum();
    let minute = |n: u64| n as f64 * 60.0 / elapsed.as_secs_f64();
    let per_minute = minute(delta);
    let rss = status_field(nsenter, pid, "VmRSS")?;
    let hwm = status_field(nsenter, pid, "VmHWM")?;
    let active = inside(nsenter, "systemctl", &["is-active", unit])?;

    println!();
    println!(
        "Idle daemon with {} running VMs, watched {:.0} s (debug build)",
        vms.len(),
        elapsed.as_secs_f64()
    );
    println!(
        "{:>8} | {:>22} | {:>12} | {:>12} | {:>8}",
        "threads", "context switches / min", "VmRSS", "VmHWM", "unit"
    );
    println!(
        "{:>8} | {:>22.1} | {:>12} | {:>12} | {:>8}",
        format!("{}->{}", before.len(), after.len()),
        per_minute,
        rss,
        hwm,
        String::from_utf8_lossy(&active.stdout).trim()
    );

    let mut ranked: Vec<(&String, &u64)> = by_name.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1));
    let breakdown: Vec<String> = ranked
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(name, n)| format!("{name} {:.0}", minute(**n)))
        .collect();
    println!("per thread name, switches / min: {}", breakdown.join(", "));

    let _ = inside(nsenter, "systemctl", &["stop", unit]);
    for v in vms {
        let _ = inside(
            nsenter,
            "systemctl",
            &["stop", &format!("vmkeeper-vm-{v}.service")],
        );
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Res<()> {
    let address = env("DBUS_SYSTEM_BUS_ADDRESS");
    let nsenter: Vec<String> = env("VMKEEPER_NSENTER")
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut counts: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    if counts.is_empty() {
        counts = vec![10, 100, 1000];
    }
    if counts.windows(2).any(|w| w[0] >= w[1]) || counts.first() == Some(&0) {
        return Err("VM counts must be positive and ascending".into());
    }
    let scratch = PathBuf::from(env("VMKEEPER_HARNESS_DIR")).join("bench-daemon");
    std::fs::create_dir_all(&scratch)?;

    let sd = Systemd::connect(Some(&address)).await?;
    let stale = stop_all(&sd).await?;
    if stale > 0 {
        eprintln!("# stopped {stale} units left over from an earlier run");
    }
    let outcome = passes(&sd, &nsenter, &scratch, &counts).await;
    let t = Instant::now();
    let stopped = stop_all(&sd).await?;
    eprintln!(
        "# stopped {stopped} stand-in units in {:.0} ms",
        ms(t.elapsed())
    );
    outcome?;
    idle_daemon(&nsenter, &scratch)
}
