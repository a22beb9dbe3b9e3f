//! Benchmark of a live disk grow, run by scripts/bench-grow.sh under harness/run.sh.
//!
//! Boots the test guest on an RBD image, then grows the disk N times in each of two ways
//! and prints the latencies side by side:
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

    println!(
        "live grow latency, {n} grows each (size check + block_resize + query-block confirms)"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9}",
        "method", "median", "p95", "min", "max"
    );
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
