//! Stand-in VM units for the benchmarks: `sleep infinity` services named like VM units, and
//! the shell-loop observation they are compared against. Shared by bench_observe and
//! bench_daemon (`#[path]`-included; not an example of its own).

use std::process::Command;
use std::time::{Duration, Instant};

use vmkeeper::exec::systemd::{ActiveState, JobResult, Systemd, TransientService};

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Every stand-in unit.
pub const PATTERN: &str = "vmkeeper-vm-bench*";

/// The VM name of stand-in `i`.
pub fn vm_name(i: usize) -> String {
    format!("bench{i:04}")
}

/// The unit of stand-in `i`.
pub fn unit_name(i: usize) -> String {
    format!("vmkeeper-vm-{}.service", vm_name(i))
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Starts stand-ins `from..to`.
pub async fn start_units(sd: &Systemd, from: usize, to: usize) -> Res<()> {
    for i in from..to {
        let name = unit_name(i);
        let argv = vec!["/bin/sleep".to_owned(), "infinity".to_owned()];
        let mut service = TransientService::new(&name, "vmkeeper benchmark stand-in", argv);
        service.stop.timeout = Duration::from_secs(5);
        let result = sd.start_service(&service).await?;
        if result != JobResult::Done {
            return Err(format!("start of {name}: {result:?}").into());
        }
    }
    Ok(())
}

/// Stops every stand-in; returns how many there were.
pub async fn stop_all(sd: &Systemd) -> Res<usize> {
    let units = sd.list_units(&[PATTERN]).await?;
    for unit in &units {
        match sd.stop_unit(&unit.name).await {
            Ok(_) => {}
            Err(e) if e.is_no_such_unit() => {}
            Err(e) => return Err(e.into()),
        }
        if unit.active_state == ActiveState::Failed {
            sd.reset_failed(&unit.name).await?;
        }
    }
    Ok(units.len())
}

/// The obvious alternative: a shell loop of `systemctl show -p PROPS` per stand-in `0..n`, run
/// inside the manager's namespaces (one nsenter for the whole loop, so it is not charged to
/// every unit). Fails unless it saw all `n` running.
pub fn shell_loop(nsenter: &[String], n: usize, props: &str) -> Res<Duration> {
    let units: Vec<String> = (0..n).map(unit_name).collect();
    let script = format!("for u in \"$@\"; do systemctl show -p {props} \"$u\"; done");
    let mut cmd = match nsenter.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg("--").arg("/bin/sh");
            c
        }
        None => Command::new("/bin/sh"),
    };
    cmd.args(["-c", &script, "sh"]).args(&units);
    let t = Instant::now();
    let out = cmd.output()?;
    let took = t.elapsed();
    if !out.status.success() {
        return Err(format!(
            "shell loop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let running = String::from_utf8_lossy(&out.stdout)
        .matches("SubState=running")
        .count();
    if running != n {
        return Err(format!("shell loop saw {running} running units of {n}").into());
    }
    Ok(took)
}
