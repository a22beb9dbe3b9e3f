//! Benchmark for issue 4: the cost of observing N VM units with one `ListUnitsByPatterns`
//! call, against a shell loop of `systemctl show` per unit.
//!
//! Run it under the harness (`scripts/bench-observe.sh`): it needs `DBUS_SYSTEM_BUS_ADDRESS`
//! and `VMKEEPER_NSENTER` (empty when the host's systemd is the manager). Arguments are the
//! unit counts to measure, ascending (default 10 100 1000). It creates stand-in units
//! `vmkeeper-vm-benchNNNN.service` running `sleep infinity` and stops them all at the end.

use std::time::{Duration, Instant};

use vmkeeper::exec::systemd::{ActiveState, Systemd};

#[path = "standins/mod.rs"]
mod standins;
use standins::*;

/// Repetitions of the D-Bus measurements; the median is printed.
const ROUNDS: usize = 5;

/// One observation pass as the daemon does it: one call, every VM unit's state.
async fn observe_once(
    sd: &Systemd,
    expected: usize,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let t = Instant::now();
    let units = sd.list_units(&[PATTERN]).await?;
    let took = t.elapsed();
    let running = units
        .iter()
        .filter(|u| u.active_state == ActiveState::Active && u.sub_state == "running")
        .count();
    if running != expected {
        return Err(format!("expected {expected} running bench units, listed {running}").into());
    }
    Ok(took)
}

/// Main pid and exit details of every unit, one unit at a time (what adoption after a daemon
/// restart needs once, not what every pass needs).
async fn details_once(sd: &Systemd, n: usize) -> Result<Duration, Box<dyn std::error::Error>> {
    let t = Instant::now();
    for i in 0..n {
        let details = sd.service_details(&unit_name(i)).await?;
        if details.main_pid.is_none() {
            return Err(format!("{} has no main pid", unit_name(i)).into());
        }
    }
    Ok(t.elapsed())
}

/// The same observation by a shell loop of `systemctl show` per unit, run inside the manager's
/// namespaces (one nsenter for the whole loop, so it is not charged to every unit).
async fn bench(
    sd: &Systemd,
    nsenter: &[String],
    counts: &[usize],
) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "{:>6} | {:>22} | {:>24} | {:>22}",
        "N", "vmkeeper: 1 call (ms)", "vmkeeper: per-unit (ms)", "shell loop (ms)"
    );
    let mut created = 0;
    for &n in counts {
        let t = Instant::now();
        start_units(sd, created, n).await?;
        eprintln!(
            "# started {} units in {:.0} ms",
            n - created,
            ms(t.elapsed())
        );
        created = n;

        let mut one_call = Vec::new();
        for _ in 0..ROUNDS {
            one_call.push(observe_once(sd, n).await?);
        }
        let per_unit = details_once(sd, n).await?;
        let shell = shell_loop(nsenter, n, "ActiveState,SubState,MainPID")?;
        println!(
            "{n:>6} | {:>22.2} | {:>24.1} | {:>22.1}",
            ms(median(one_call)),
            ms(per_unit),
            ms(shell)
        );
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .map_err(|_| "DBUS_SYSTEM_BUS_ADDRESS is not set: run under harness/run.sh")?;
    let nsenter: Vec<String> = std::env::var("VMKEEPER_NSENTER")
        .map_err(|_| "VMKEEPER_NSENTER is not set: run under harness/run.sh")?
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
        return Err("unit counts must be positive and ascending".into());
    }

    let sd = Systemd::connect(Some(&address)).await?;
    let stale = stop_all(&sd).await?;
    if stale > 0 {
        eprintln!("# stopped {stale} units left over from an earlier run");
    }
    let outcome = bench(&sd, &nsenter, &counts).await;
    let t = Instant::now();
    let stopped = stop_all(&sd).await?;
    eprintln!(
        "# stopped {stopped} bench units in {:.0} ms",
        ms(t.elapsed())
    );
    outcome
}
