//! Benchmark of the metrics listener, run by scripts/bench-metrics.sh under harness/run.sh:
//! for N VMs (default 10, 100, 1000) a real daemon (release build, a transient unit of the
//! harness systemd) is scraped over HTTP, and its scrape time and size are printed beside
//! the obvious alternative: a textfile-collector style script that runs `vmkeeper status
//! --json` and turns it into Prometheus text with python3.
//!
//! The VMs are declared `online: false` and on record in the state (their disks "exist"), so
//! the daemon idles: nothing is created or started, and what is measured is the scrape. A
//! scrape's cost does not depend on whether VMs run: every VM has the same series.
//!
//! Usage: bench_metrics [N...]. Needs `VMKEEPER_BIN`, the vmkeeper binary the daemon runs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use vmkeeper::model::Resources;
use vmkeeper::state::{State, VmRecord};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Scrapes timed per N (after one warm-up); the median and the slowest are printed.
const SCRAPES: usize = 30;
/// Runs of the shell alternative per N.
const SHELL_RUNS: usize = 5;

/// The alternative: what `vmkeeper status --json` shows, as Prometheus text.
const STATUS_TO_PROM: &str = r#"
import json, sys
s = json.load(sys.stdin)
out = []
def g(name, vm, value, extra=""):
    out.append('vmkeeper_vm_%s{vm="%s",project="default"%s} %s' % (name, vm, extra, value))
for v in s["vms"]:
    n = v["name"]
    g("running", n, int(v["running"]))
    for k, r in (("declared", v["declared"]), ("applied", v["applied"])):
        if r:
            g(k + "_cpus", n, r["cores"])
            g(k + "_memory_bytes", n, r["memoryMiB"] << 20)
            g(k + "_disk_bytes", n, r["diskGiB"] << 30)
    g("change_pending", n, int(v["pending"] is not None))
    g("in_maintenance", n, int(v["inMaintenance"]))
    g("monitoring_downtime", n, int(v["monitoringDowntime"]))
    g("qmp_connected", n, int(v["qmp"] == "connected"))
    g("operation_failing", n, len(v["failures"]))
print("\n".join(out))
"#;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run this under the harness: scripts/bench-metrics.sh")
    })
}

fn nsenter() -> Vec<String> {
    env("VMKEEPER_NSENTER")
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn inside(program: &str, args: &[String]) -> Res<()> {
    let ns = nsenter();
    let mut cmd = match ns.split_first() {
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
    Ok(())
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One scrape: (time, body bytes).
fn scrape(port: u16, openmetrics: bool) -> Res<(Duration, usize)> {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    let accept = if openmetrics {
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    } else {
        "text/plain"
    };
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("scrape: {head}").into());
    }
    Ok((took, body.len()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Row {
    n: usize,
    median: Duration,
    max: Duration,
    bytes: usize,
    lines: usize,
    classic_bytes: usize,
    shell_median: Duration,
    shell_bytes: usize,
}

fn run(n: usize, root: &Path, bin: &str) -> Res<Row> {
    let dir = root.join(format!("bench-metrics-{n}"));
    std::fs::create_dir_all(dir.join("state"))?;
    let port = free_port()?;
    let mut vms = serde_json::Map::new();
    let mut state = State::default();
    let applied = Resources {
        cores: 2,
        memory_mib: 2048,
        disk_gib: 30,
    };
    for i in 0..n {
        let name = format!("bench{i:04}");
        vms.insert(
            name.clone(),
            json!({ "cores": 2, "memoryMiB": 2048, "diskGiB": 30, "online": false }),
        );
        state.vms.insert(
            name.parse()?,
            VmRecord {
                applied,
                running: false,
                instance: None,
                ip_addresses: vec![],
                last_unplanned: None,
                argv: vec![],
                image_id: None,
                generation: 1,
            },
        );
    }
    state.save(&dir.join("state"))?;
    let config = json!({
        "stateDir": dir.join("state"),
        "runtimeDir": dir.join("run"),
        "ceph": { "conf": env("CEPH_CONF"), "pool": env("VMKEEPER_CEPH_POOL"),
                  "clientId": env("VMKEEPER_CEPH_CLIENT") },
        "qemu": { "accel": env("VMKEEPER_QEMU_ACCEL") },
        "metrics": { "listen": format!("127.0.0.1:{port}") },
        "vms": vms,
    });
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_string(&config)?)?;
    let unit = format!("vmkeeper-bench-metrics-{n}.service");
    inside(
        "systemd-run",
        &[
            "--unit".into(),
            unit.clone(),
            "--property".into(),
            "Type=notify".into(),
            "--setenv".into(),
            "VMKEEPER_LOG=warn".into(),
            bin.into(),
            "daemon".into(),
            "--config".into(),
            config_path.display().to_string(),
        ],
    )?;
    let result = (|| -> Res<Row> {
        // Warm-up: the first scrape after start also waits for the first pass.
        scrape(port, true)?;
        let mut times = vec![];
        let mut bytes = 0;
        for _ in 0..SCRAPES {
            let (t, b) = scrape(port, true)?;
            times.push(t);
            bytes = b;
        }
        times.sort();
        let (_, classic_bytes) = scrape(port, false)?;
        let lines = {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )?;
            let mut r = String::new();
            s.read_to_string(&mut r)?;
            r.lines().filter(|l| !l.starts_with('#')).count()
        };
        let script = format!(
            "{bin} status --json --config {} | python3 -c '{}'",
            config_path.display(),
            STATUS_TO_PROM.replace('\'', "'\\''")
        );
        let mut shell = vec![];
        let mut shell_bytes = 0;
        for _ in 0..SHELL_RUNS {
            let t = Instant::now();
            let out = Command::new("sh").args(["-c", &script]).output()?;
            shell.push(t.elapsed());
            if !out.status.success() {
                return Err(
                    format!("status + python3: {}", String::from_utf8_lossy(&out.stderr)).into(),
                );
            }
            shell_bytes = out.stdout.len();
        }
        shell.sort();
        Ok(Row {
            n,
            median: times[times.len() / 2],
            max: times[times.len() - 1],
            bytes,
            lines,
            classic_bytes,
            shell_median: shell[shell.len() / 2],
            shell_bytes,
        })
    })();
    inside("systemctl", &["stop".into(), unit])?;
    result
}

fn main() -> Res<()> {
    let counts: Vec<usize> = match std::env::args().skip(1).map(|a| a.parse()).collect() {
        Ok(v) if !Vec::<usize>::is_empty(&v) => v,
        Ok(_) => vec![10, 100, 1000],
        Err(e) => return Err(format!("usage: bench_metrics [N...]: {e}").into()),
    };
    let bin = env("VMKEEPER_BIN");
    let root = PathBuf::from(env("VMKEEPER_HARNESS_DIR")).join("t");
    let mut rows = vec![];
    for n in counts {
        eprintln!("bench-metrics: {n} VMs");
        rows.push(run(n, &root, &bin)?);
    }
    println!();
    println!(
        "scrape of GET /metrics (release build, loopback, median and slowest of {SCRAPES}; \
         OpenMetrics body, sample lines; classic text body)"
    );
    println!(
        "{:>6}  {:>10} {:>10} {:>11} {:>8} {:>11}   {:>22} {:>11}",
        "VMs",
        "median ms",
        "max ms",
        "bytes",
        "samples",
        "text bytes",
        "status+python3 ms",
        "its bytes"
    );
    for r in &rows {
        println!(
            "{:>6}  {:>10.2} {:>10.2} {:>11} {:>8} {:>11}   {:>22.1} {:>11}",
            r.n,
            ms(r.median),
            ms(r.max),
            r.bytes,
            r.lines,
            r.classic_bytes,
            ms(r.shell_median),
            r.shell_bytes
        );
    }
    println!(
        "\nThe alternative (median of {SHELL_RUNS}) runs `vmkeeper status --json` and a python3 \
         script that prints the gauges status shows (no counters or histograms: status has \
         none), as a textfile collector would on every scrape."
    );
    Ok(())
}
