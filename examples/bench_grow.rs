//! Benchmark of a live disk grow, run by scripts/bench-grow.sh under harness/run.sh.
//!
//! Grows a running guest's disk N times in each of three ways and prints the latencies side by
//! side:
//! - through the daemon: a real `vmkeeper daemon` (the release binary `VMKEEPER_BIN`, a unit of
//!   the harness systemd) runs a VM; each grow raises `diskGiB` in its configuration and asks
//!   it to apply it (`reload` on its API, which answers once the grow is done: QEMU's
//!   `query-block` reports the new size). Covers reading and validating the configuration,
//!   planning, the operation task (size check with `query-block`, `block_resize`,
//!   `query-block`) and the state write;
//! - in-process: librbd size check (on the blocking pool, over the open cluster
//!   connection) + QMP `block_resize` + `query-block` until it shows the new size;
//! - shell: scripts/grow-shell.sh per grow: `rbd info` for the size check + a one-shot
//!   QMP client (python3) doing `block_resize` and `query-block`.
//!
//! Usage: bench_grow [N] (default 20 grows per method).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use vmkeeper::exec::qmp::Qmp;
use vmkeeper::exec::rbd::{Cluster, ClusterOptions};

const GIB: u64 = 1 << 30;
const STEP: u64 = 256 << 20;
const NODE: &str = "root0";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run this under the harness: harness/run.sh scripts/bench-grow.sh"
        )
    })
}

struct Setup {
    conf: PathBuf,
    pool: String,
    client: String,
    kernel: String,
    initrd: String,
    accel: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(20, |a| a.parse().expect("N is a number"));
    let s = Setup {
        conf: env("CEPH_CONF").into(),
        pool: env("VMKEEPER_CEPH_POOL"),
        client: env("VMKEEPER_CEPH_CLIENT"),
        kernel: env("VMKEEPER_GUEST_KERNEL"),
        initrd: env("VMKEEPER_GUEST_INITRD"),
        accel: env("VMKEEPER_QEMU_ACCEL"),
    };
    let shell_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/grow-shell.sh");
    let dir = tempfile::Builder::new()
        .prefix("bench-grow.")
        .tempdir()
        .expect("scratch dir");
    let image = format!("bench-grow-{}", std::process::id());

    let cluster = Cluster::connect(&ClusterOptions::new(&s.conf, &s.client)).expect("connect");
    let (pool, img) = (s.pool.clone(), image.clone());
    cluster
        .run(move |c| c.ioctx(&pool)?.create(&img, GIB))
        .await
        .expect("create image");

    let qmp_sock = dir.path().join("qmp.sock");
    let console = dir.path().join("console.log");
    let mut qemu = start_qemu(&s, &image, &qmp_sock, &console);
    wait_for(&console, "VMSIZE vda=", Duration::from_secs(120)).await;
    eprintln!(
        "guest booted; {n} grows per method, {} MiB each",
        STEP >> 20
    );

    // In-process, as the daemon does it.
    let mut inproc = Vec::with_capacity(n);
    {
        let qmp = Qmp::connect(&qmp_sock).await.expect("QMP connect");
        for _ in 0..n {
            let t = Instant::now();
            let (pool, img) = (s.pool.clone(), image.clone());
            let current = cluster
                .run(move |c| c.ioctx(&pool)?.open_read_only(&img)?.size())
                .await
                .expect("librbd size");
            let target = current + STEP;
            qmp.block_resize(NODE, target).await.expect("block_resize");
            loop {
                let blocks = qmp.query_block().await.expect("query-block");
                let size = blocks.iter().find(|b| b.node_name.as_deref() == Some(NODE));
                if size.and_then(|b| b.size_bytes) == Some(target) {
                    break;
                }
            }
            inproc.push(t.elapsed());
        }
    } // closes the QMP connection: QEMU serves one client at a time

    let mut shell = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = Command::new("bash")
            .arg(&shell_script)
            .args([
                &s.conf.to_string_lossy(),
                &s.client[..],
                &s.pool,
                &image,
                NODE,
            ])
            .arg(&qmp_sock)
            .arg(STEP.to_string())
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run grow-shell.sh");
        assert!(
            out.status.success(),
            "grow-shell.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        shell.push(t.elapsed());
    }

    let expected = GIB + 2 * n as u64 * STEP;
    let (pool, img) = (s.pool.clone(), image.clone());
    let size = cluster
        .run(move |c| c.ioctx(&pool)?.stat(&img))
        .await
        .expect("final size")
        .size;
    assert_eq!(size, expected, "image size after all grows");
    wait_for(
        &console,
        &format!("VMSIZE vda={}", expected / 512),
        Duration::from_secs(10),
    )
    .await;

    let mut daemon = through_daemon(&s, dir.path(), n).await;

    println!(
        "live grow latency, {n} grows each (size check + block_resize + query-block confirms)"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9}",
        "method", "median", "p95", "min", "max"
    );
    report("vmkeeper daemon (config + reload on its API)", &mut daemon);
    report("in-process (librbd + QMP client)", &mut inproc);
    report("shell (rbd info + python3 QMP one-shot)", &mut shell);
    println!("guest saw the final size: vda={} sectors", expected / 512);

    let _ = qemu.kill().await;
    let (pool, img) = (s.pool.clone(), image.clone());
    cluster
        .run(move |c| c.ioctx(&pool)?.remove(&img))
        .await
        .expect("remove image");
}

/// A real daemon runs one VM; each grow is a configuration change applied with `reload`.
async fn through_daemon(s: &Setup, dir: &Path, n: usize) -> Vec<Duration> {
    let bin = env("VMKEEPER_BIN");
    let nsenter: Vec<String> = env("VMKEEPER_NSENTER")
        .split_whitespace()
        .map(String::from)
        .collect();
    let vm = format!("bench-grow-d{}", std::process::id() % 10000);
    let config_path = dir.join("daemon.json");
    let write = |disk: u64| {
        let c = serde_json::json!({
            "stateDir": dir.join("state"),
            "runtimeDir": dir.join("run"),
            "ceph": { "conf": s.conf, "pool": s.pool, "clientId": s.client,
                      "qemuClientId": env("VMKEEPER_CEPH_QEMU_CLIENT"),
                      "qemuKeyFile": env("VMKEEPER_CEPH_QEMU_KEY") },
            "qemu": { "accel": s.accel, "stopTimeout": "10s", "user": env("VMKEEPER_QEMU_USER") },
            "vms": { vm.clone(): {
                "cores": 1, "memoryMiB": 1024, "diskGiB": disk,
                "boot": { "kernel": s.kernel, "initrd": s.initrd, "append": "console=ttyS0 quiet" }
            } }
        });
        std::fs::write(&config_path, c.to_string()).expect("write the daemon's configuration");
    };
    write(30);
    let unit = format!("vmkd-bench-grow-{}.service", std::process::id());
    let run = |args: &[&str]| {
        let (prog, rest) = nsenter.split_first().expect("VMKEEPER_NSENTER");
        std::process::Command::new(prog)
            .args(rest)
            .arg("--")
            .args(args)
            .status()
            .expect("nsenter")
    };
    let cfg = config_path.display().to_string();
    assert!(
        run(&[
            "systemd-run",
            "--unit",
            &unit,
            "--property",
            "Type=notify",
            &bin,
            "daemon",
            "--config",
            &cfg,
        ])
        .success(),
        "start the daemon"
    );
    let console = dir.join("run/vms").join(&vm).join("console.log");
    wait_for(&console, "VMSIZE vda=", Duration::from_secs(120)).await;
    let socket = dir.join("run").join(vmkeeper::api::SOCKET);
    // The QMP connection comes up right after the boot starts; wait until status says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = vmkeeper::api::call(
            &socket,
            &vmkeeper::api::Request::Status,
            Duration::from_secs(5),
        )
        .await
        .expect("status");
        let vmkeeper::api::Response::Ok(v) = st else {
            panic!("status: {st:?}")
        };
        if v["vms"][0]["qmp"] == "connected" {
            break;
        }
        assert!(Instant::now() < deadline, "QMP never connected: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut samples = Vec::with_capacity(n);
    for i in 1..=n as u64 {
        let t = Instant::now();
        write(30 + i);
        let r = vmkeeper::api::call(
            &socket,
            &vmkeeper::api::Request::Reload,
            Duration::from_secs(60),
        )
        .await
        .expect("reload");
        samples.push(t.elapsed());
        // One operation, the grow, and the answer came once it was done.
        let ok = matches!(&r, vmkeeper::api::Response::Ok(v) if v["operations"] == 1);
        assert!(ok, "reload did not grow the disk: {r:?}");
    }
    let want = (30 + n as u64) * GIB;
    wait_for(
        &console,
        &format!("VMSIZE vda={}", want / 512),
        Duration::from_secs(10),
    )
    .await;
    run(&["systemctl", "stop", &unit]);
    run(&["systemctl", "stop", &format!("vmkeeper-vm-{vm}.service")]);
    let cluster = Cluster::connect(&ClusterOptions::new(&s.conf, &s.client)).expect("connect");
    let (pool, img) = (s.pool.clone(), vm.clone());
    let size = cluster
        .run(move |c| c.ioctx(&pool)?.stat(&img))
        .await
        .expect("size")
        .size;
    assert_eq!(size, want, "the daemon's VM disk after all grows");
    let (pool, img) = (s.pool.clone(), vm.clone());
    cluster
        .run(move |c| c.ioctx(&pool)?.remove(&img))
        .await
        .expect("remove the daemon's image");
    samples
}

fn start_qemu(s: &Setup, image: &str, qmp: &Path, console: &Path) -> Child {
    let blockdev = serde_json::json!({
        "driver": "rbd", "node-name": NODE, "pool": s.pool, "image": image,
        "conf": s.conf, "user": s.client, "cache": {"direct": false},
    });
    Command::new("qemu-system-x86_64")
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-machine",
            "q35",
        ])
        .args(["-accel", &s.accel, "-m", "128", "-smp", "1"])
        .args([
            "-kernel",
            &s.kernel,
            "-initrd",
            &s.initrd,
            "-append",
            "console=ttyS0 quiet",
        ])
        .args(["-blockdev", &blockdev.to_string()])
        .args(["-device", "virtio-blk-pci,drive=root0,id=disk0"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start qemu-system-x86_64")
}

async fn wait_for(console: &Path, pattern: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        // A pattern ending in '=' is a prefix; otherwise the whole line must match.
        let hit =
            |l: &str| l.trim_end() == pattern || pattern.ends_with('=') && l.starts_with(pattern);
        if text.lines().any(hit) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no `{pattern}` on the console within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn report(method: &str, samples: &mut [Duration]) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9}",
        method,
        ms(at(0.5)),
        ms(at(0.95)),
        ms(samples[0]),
        ms(samples[samples.len() - 1])
    );
}
