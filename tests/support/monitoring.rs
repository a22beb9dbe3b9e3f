//! The real Prometheus and Alertmanager of Debian's `prometheus` and
//! `prometheus-alertmanager` packages, run by a test on loopback ports with their data under
//! the test's scratch directory; killed when dropped (and when the test process dies).

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::host::wait_until;

/// A free TCP port on 127.0.0.1 (bound once and released: the harness does the same for Ceph).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// `curl` with a deadline: (HTTP status, body). Status 0 when nothing answered.
pub fn http(method: &str, url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// GET that must answer 200 with JSON.
pub fn get_json(url: &str) -> Value {
    let (code, body) = http("GET", url);
    assert_eq!(code, 200, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: {e}: {body}"))
}

/// A child process killed on drop and when the test process dies.
#[derive(Debug)]
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(program: &str, args: &[String], log: PathBuf) -> Daemon {
        let file = std::fs::File::create(&log).expect("create the log");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone the log handle"))
            .stderr(file);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; the kernel
        // kills the child when the test process dies without running Drop.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("start {program} (scripts/install-deps.sh installs it): {e}")
        });
        Daemon { child, log }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Prometheus that scrapes one target every second and evaluates `rules`.
pub struct Prometheus {
    pub url: String,
    daemon: Daemon,
}

impl Prometheus {
    /// Starts Prometheus in `dir`, scraping `target` (`host:port`), and waits until its API
    /// answers.
    pub fn start(dir: &Path, target: &str, rules: &Path) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: vmkeeper\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let daemon = Daemon::spawn(
            "prometheus",
            &[
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
                "--log.level=warn".into(),
            ],
            dir.join("prometheus.log"),
        );
        let p = Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            daemon,
        };
        wait_until(Duration::from_secs(60), "Prometheus ready", || {
            http("GET", &format!("{}/-/ready", p.url)).0 == 200
        });
        p
    }

    /// The result vector of an instant query.
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--get"])
            .arg(format!("{}/api/v1/query", self.url))
            .arg("--data-urlencode")
            .arg(format!("query={promql}"))
            .output()
            .expect("run curl");
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("query {promql}: {e}; log: {}", self.daemon.log_tail()));
        assert_eq!(v["status"], "success", "query {promql}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of the one series `promql` selects, if there is exactly one.
    pub fn value(&self, promql: &str) -> Option<f64> {
        match self.query(promql).as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// The scrape target's health as Prometheus reports it (`up`, `down`, `unknown`).
    pub fn target_health(&self) -> String {
        let v = get_json(&format!("{}/api/v1/targets", self.url));
        v["data"]["activeTargets"][0]["health"]
            .as_str()
            .unwrap_or("none")
            .to_owned()
    }
}

/// An Alertmanager (clustering off) on a loopback port, its data in `dir`.
pub struct Alertmanager {
    pub url: String,
    pub port: u16,
    dir: PathBuf,
    daemon: Option<Daemon>,
}

impl Alertmanager {
    /// Configuration and port, not started yet.
    pub fn new(dir: &Path) -> Alertmanager {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("alertmanager.yml"),
            "route:\n  receiver: 'null'\nreceivers:\n  - name: 'null'\n",
        )
        .unwrap();
        let port = free_port();
        Alertmanager {
            url: format!("http://127.0.0.1:{port}"),
            port,
            dir: dir.to_owned(),
            daemon: None,
        }
    }

    /// Starts it (again, with the same data) and waits until it answers.
    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "already running");
        self.daemon = Some(Daemon::spawn(
            "prometheus-alertmanager",
            &[
                format!(
                    "--config.file={}",
                    self.dir.join("alertmanager.yml").display()
                ),
                format!("--storage.path={}", self.dir.join("data").display()),
                format!("--web.listen-address=127.0.0.1:{}", self.port),
                // No HA mesh: it would listen on 0.0.0.0:9094.
                "--cluster.listen-address=".into(),
                "--log.level=warn".into(),
            ],
            self.dir.join("alertmanager.log"),
        ));
        wait_until(Duration::from_secs(60), "Alertmanager ready", || {
            http("GET", &format!("{}/-/ready", self.url)).0 == 200
        });
    }

    /// Stops it (its silences stay in its data directory, written on shutdown).
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            // SIGTERM, so it writes its snapshot of silences.
            let _ = Command::new("kill").arg(d.child.id().to_string()).status();
            let _ = d.child.wait();
            d.stop();
        }
    }

    /// Every silence whose only matcher is `vm="<vm>"`.
    pub fn silences_of(&self, vm: &str) -> Vec<Value> {
        get_json(&format!("{}/api/v2/silences", self.url))
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["matchers"]
                    .as_array()
                    .is_some_and(|m| m.len() == 1 && m[0]["name"] == "vm" && m[0]["value"] == vm)
            })
            .cloned()
            .collect()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        self.stop();
    }
}
