//! Test support: the real systemd, Ceph and QEMU guest that harness/up.sh brought up.
//!
//! Integration tests run under `harness/run.sh` (`scripts/test.sh` does that), which exports
//! the environment written by `harness/up.sh`. [`harness()`] reads it once per test process;
//! without it, it panics with instructions, so a test never passes without the real parts.
//!
//! Every test names its own VMs and RBD images (prefixed with the test name), so tests run in
//! parallel against one harness.

// Each integration test crate uses a different subset of this module.
#![allow(dead_code)]

pub mod host;
pub mod monitoring;

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How to run integration tests, for the panic when the harness is missing.
const HOW_TO_RUN: &str = "integration tests need the vmkeeper harness (real systemd, Ceph and \
     QEMU): run them as root with `scripts/test.sh`, or `harness/run.sh cargo nextest run \
     [FILTER]` (see docs/development/testing.md)";

/// Unix socket paths are limited to 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// The components brought up by harness/up.sh, as described by its `DIR/env`.
#[derive(Debug)]
pub struct Harness {
    /// Directory holding all harness state; removed by harness/down.sh.
    pub dir: PathBuf,
    /// D-Bus address of the system bus the systemd manager is on.
    pub dbus_address: String,
    /// Host pid of the systemd manager (1 when the host's own systemd is used).
    pub systemd_pid: u32,
    /// Command prefix that runs a program inside the manager's namespaces (empty for the
    /// host's systemd).
    pub nsenter: Vec<String>,
    /// Journal directory of the manager, for `journalctl -D`.
    pub journal_dir: PathBuf,
    /// Ceph configuration naming the mon and the admin keyring.
    pub ceph_conf: PathBuf,
    /// RBD pool for test images.
    pub ceph_pool: String,
    /// Ceph client id (without `client.`).
    pub ceph_client: String,
    /// QEMU's own Ceph client id, limited to the pool.
    pub ceph_qemu_client: String,
    /// That client's bare key (root only).
    pub ceph_qemu_key: PathBuf,
    /// The system user VM units run QEMU as.
    pub qemu_user: String,
    /// Test guest kernel.
    pub guest_kernel: PathBuf,
    /// Test guest initramfs.
    pub guest_initrd: PathBuf,
    /// QEMU accelerator that works on this host: `kvm` or `tcg`.
    pub accel: String,
}

/// The harness of this test run; panics with instructions when tests run without one.
pub fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| match Harness::from_env() {
        Ok(h) => h,
        Err(missing) => panic!("{missing}: {HOW_TO_RUN}"),
    })
}

impl Harness {
    fn from_env() -> Result<Self, String> {
        fn var(name: &str) -> Result<String, String> {
            std::env::var(name).map_err(|_| format!("{name} is not set"))
        }
        let dir = PathBuf::from(var("VMKEEPER_HARNESS_DIR")?);
        if !dir.join("env").is_file() {
            return Err(format!("harness directory {} is gone", dir.display()));
        }
        let systemd_pid = var("VMKEEPER_SYSTEMD_PID")?
            .parse()
            .map_err(|e| format!("VMKEEPER_SYSTEMD_PID: {e}"))?;
        Ok(Self {
            dir,
            dbus_address: var("DBUS_SYSTEM_BUS_ADDRESS")?,
            systemd_pid,
            nsenter: var("VMKEEPER_NSENTER")?
                .split_whitespace()
                .map(String::from)
                .collect(),
            journal_dir: var("VMKEEPER_JOURNAL_DIR")?.into(),
            ceph_conf: var("CEPH_CONF")?.into(),
            ceph_pool: var("VMKEEPER_CEPH_POOL")?,
            ceph_client: var("VMKEEPER_CEPH_CLIENT")?,
            ceph_qemu_client: var("VMKEEPER_CEPH_QEMU_CLIENT")?,
            ceph_qemu_key: var("VMKEEPER_CEPH_QEMU_KEY")?.into(),
            qemu_user: var("VMKEEPER_QEMU_USER")?,
            guest_kernel: var("VMKEEPER_GUEST_KERNEL")?.into(),
            guest_initrd: var("VMKEEPER_GUEST_INITRD")?.into(),
            accel: var("VMKEEPER_QEMU_ACCEL")?,
        })
    }

    /// A fresh, empty directory for one test under the harness directory; its name starts
    /// with `test_name` (shortened, so that socket paths inside stay short).
    pub fn scratch(&self, test_name: &str) -> PathBuf {
        let parent = self.dir.join("t");
        std::fs::create_dir_all(&parent).expect("create the harness scratch root");
        let prefix: String = test_name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        tempfile::Builder::new()
            .prefix(&format!("{prefix}."))
            .tempdir_in(&parent)
            .expect("create a scratch directory")
            .keep()
    }

    /// A command that runs `program` inside the systemd manager's namespaces, where
    /// /run/systemd/journal/socket and `systemctl` reach the harness manager.
    pub fn inside<I, S>(&self, program: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = match self.nsenter.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg("--").arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args);
        cmd
    }

    /// `systemctl ARGS` against the harness manager; panics when it cannot be run.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.inside("systemctl", args)
            .output()
            .expect("run systemctl inside the harness")
    }

    /// `journalctl -D JOURNAL_DIR ARGS` for the harness manager's journal.
    pub fn journalctl(&self, args: &[&str]) -> Output {
        Command::new("journalctl")
            .arg("-D")
            .arg(&self.journal_dir)
            .args(args)
            .output()
            .expect("run journalctl")
    }

    /// `rbd ARGS` against the harness cluster (test setup and assertions only).
    pub fn rbd(&self, args: &[&str]) -> Output {
        self.ceph_tool("rbd", args)
    }

    /// `ceph ARGS` against the harness cluster (test setup and assertions only).
    pub fn ceph(&self, args: &[&str]) -> Output {
        self.ceph_tool("ceph", args)
    }

    /// `rbd ARGS` that must succeed; returns its stdout.
    pub fn rbd_ok(&self, args: &[&str]) -> String {
        let out = self.rbd(args);
        assert!(
            out.status.success(),
            "rbd {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `rbd trash ls --all --long` entries of the images named `name` in the harness pool:
    /// id, deferment (`status`), ...
    pub fn trash_entries(&self, name: &str) -> Vec<serde_json::Value> {
        let out = self.rbd_ok(&[
            "trash",
            "ls",
            "--all",
            "--long",
            "--format",
            "json",
            &self.ceph_pool,
        ]);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == name)
            .cloned()
            .collect()
    }

    /// Creates RBD image `name` of `bytes` bytes in the harness pool.
    pub fn create_image(&self, name: &str, bytes: u64) {
        self.rbd_ok(&[
            "create",
            "--size",
            &format!("{}K", bytes / 1024),
            &self.image_spec(name),
        ]);
    }

    /// Size in bytes of RBD image `name`, as the cluster reports it.
    pub fn image_size(&self, name: &str) -> u64 {
        let info = self.rbd_ok(&["info", "--format", "json", &self.image_spec(name)]);
        let v: serde_json::Value = serde_json::from_str(&info).expect("rbd info prints JSON");
        v["size"].as_u64().expect("rbd info has a numeric size")
    }

    /// `pool/name` for an image in the harness pool.
    pub fn image_spec(&self, name: &str) -> String {
        format!("{}/{name}", self.ceph_pool)
    }

    fn ceph_tool(&self, tool: &str, args: &[&str]) -> Output {
        Command::new(tool)
            .arg("--conf")
            .arg(&self.ceph_conf)
            .arg("--id")
            .arg(&self.ceph_client)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"))
    }
}

/// How to start a test guest; `GuestOpts::default()` is a 128 MiB, one-vCPU guest.
#[derive(Debug, Clone)]
pub struct GuestOpts {
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Extra kernel command line, e.g. `vmtest.poweroff_after=5`.
    pub append: String,
    /// Extra QEMU arguments, appended last.
    pub extra_args: Vec<String>,
}

impl Default for GuestOpts {
    fn default() -> Self {
        Self {
            memory_mib: 128,
            cpus: 1,
            append: String::new(),
            extra_args: Vec::new(),
        }
    }
}

/// Where a guest's sockets and logs live.
#[derive(Debug, Clone)]
pub struct GuestPaths {
    /// QMP socket (QEMU is the server; one client at a time).
    pub qmp: PathBuf,
    /// The guest's ttyS0, written by QEMU.
    pub console: PathBuf,
    /// The guest's ttyS1 command port (QEMU is the server).
    pub command: PathBuf,
    /// QEMU's own stdout and stderr.
    pub qemu_log: PathBuf,
}

impl GuestPaths {
    /// The paths of a guest whose files live in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.log"),
            command: dir.join("cmd.sock"),
            qemu_log: dir.join("qemu.log"),
        }
    }
}

/// The QEMU command line of a test guest booting the harness kernel with RBD image `image`
/// of the harness pool as virtio-blk disk (`-blockdev` node-name `root0`, device `disk0`).
pub fn qemu_argv(h: &Harness, image: &str, paths: &GuestPaths, opts: &GuestOpts) -> Vec<String> {
    let blockdev = serde_json::json!({
        "driver": "rbd",
        "node-name": "root0",
        "pool": h.ceph_pool,
        "image": image,
        "conf": h.ceph_conf,
        "user": h.ceph_client,
        "cache": { "direct": false },
    });
    let append = format!("console=ttyS0 quiet {}", opts.append);
    let mut argv: Vec<String> = vec![
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-machine".into(),
        "q35".into(),
        "-accel".into(),
        h.accel.clone(),
    ];
    if h.accel == "kvm" {
        argv.extend(["-cpu".into(), "host".into()]);
    }
    argv.extend([
        "-m".into(),
        opts.memory_mib.to_string(),
        "-smp".into(),
        opts.cpus.to_string(),
        "-kernel".into(),
        path_str(&h.guest_kernel),
        "-initrd".into(),
        path_str(&h.guest_initrd),
        "-append".into(),
        append.trim_end().into(),
        "-blockdev".into(),
        blockdev.to_string(),
        "-device".into(),
        "virtio-blk-pci,drive=root0,id=disk0".into(),
        "-serial".into(),
        format!("file:{}", path_str(&paths.console)),
        "-chardev".into(),
        format!(
            "socket,id=cmd,path={},server=on,wait=off",
            path_str(&paths.command)
        ),
        "-serial".into(),
        "chardev:cmd".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path_str(&paths.qmp)),
    ]);
    argv.extend(opts.extra_args.iter().cloned());
    argv
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("harness paths are UTF-8").to_owned()
}

/// Why waiting on a test guest failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("no console line containing `{pattern}` within {timeout:?}; console tail:\n{tail}")]
    ConsoleTimeout {
        pattern: String,
        timeout: Duration,
        tail: String,
    },
    #[error("QEMU did not exit within {0:?}")]
    ExitTimeout(Duration),
    #[error("could not wait for QEMU")]
    Wait(#[source] io::Error),
}

/// A QEMU test guest started directly (not through systemd), killed when dropped.
#[derive(Debug)]
pub struct TestGuest {
    name: String,
    dir: PathBuf,
    paths: GuestPaths,
    child: Mutex<Child>,
    command_port: Mutex<UnixStream>,
    /// Console lines before this index were consumed by `wait_console`.
    cursor: Mutex<usize>,
}

impl TestGuest {
    /// Starts QEMU for guest `name` on RBD image `image` (which must exist) and returns once
    /// its QMP and command sockets accept connections; the guest itself is still booting
    /// (wait for it with [`TestGuest::wait_booted`]).
    pub fn boot(h: &Harness, name: &str, image: &str, opts: &GuestOpts) -> TestGuest {
        let dir = h.scratch(name);
        let paths = GuestPaths::in_dir(&dir);
        let longest = paths
            .qmp
            .as_os_str()
            .len()
            .max(paths.command.as_os_str().len());
        assert!(
            longest <= MAX_SOCKET_PATH,
            "socket path {} is too long for a unix socket: shorten VMKEEPER_HARNESS_PARENT",
            paths.command.display()
        );
        let log = std::fs::File::create(&paths.qemu_log).expect("create the qemu log");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(qemu_argv(h, image, &paths, opts))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the qemu log handle"))
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it makes the
        // kernel kill QEMU when the test process dies without running Drop (timeout, panic
        // with abort, SIGKILL).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        let mut child = cmd.spawn().expect("start qemu-system-x86_64");

        let deadline = Instant::now() + Duration::from_secs(30);
        let command_port = loop {
            if let Some(status) = child.try_wait().expect("poll qemu") {
                let log = std::fs::read_to_string(&paths.qemu_log).unwrap_or_default();
                panic!("QEMU for {name} exited at start ({status}): {log}");
            }
            if paths.qmp.exists()
                && let Ok(stream) = UnixStream::connect(&paths.command)
            {
                break stream;
            }
            assert!(
                Instant::now() < deadline,
                "QEMU for {name} did not open its sockets"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        TestGuest {
            name: name.to_owned(),
            dir,
            paths,
            child: Mutex::new(child),
            command_port: Mutex::new(command_port),
            cursor: Mutex::new(0),
        }
    }

    /// The guest's name as given to [`TestGuest::boot`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest's scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.lock().expect("guest lock").id()
    }

    /// QMP socket: QEMU accepts one client at a time.
    pub fn qmp_socket(&self) -> &Path {
        &self.paths.qmp
    }

    /// The guest's serial console (ttyS0) log.
    pub fn console_log(&self) -> &Path {
        &self.paths.console
    }

    /// Complete console lines so far.
    pub fn console_lines(&self) -> Vec<String> {
        let text = std::fs::read(&self.paths.console).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let mut lines: Vec<String> = text
            .split('\n')
            .map(|l| l.trim_end_matches('\r').to_owned())
            .collect();
        // The last piece is either empty (text ends with a newline) or a line still being written.
        lines.pop();
        lines
    }

    /// Number of complete console lines so far: a mark for [`TestGuest::wait_console_after`].
    pub fn console_mark(&self) -> usize {
        self.console_lines().len()
    }

    /// Waits for the next console line containing `pattern` after the last line matched by
    /// an earlier wait, and returns it; later waits start after it.
    pub fn wait_console(&self, pattern: &str, timeout: Duration) -> Result<String, GuestError> {
        let start = *self.cursor.lock().expect("cursor lock");
        self.wait_console_after(start, pattern, timeout)
    }

    /// Waits for a console line containing `pattern` at or after line index `mark`, and
    /// returns it; later [`TestGuest::wait_console`] calls start after it.
    pub fn wait_console_after(
        &self,
        mark: usize,
        pattern: &str,
        timeout: Duration,
    ) -> Result<String, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.console_lines();
            if let Some((i, line)) = lines
                .iter()
                .enumerate()
                .skip(mark)
                .find(|(_, l)| l.contains(pattern))
            {
                *self.cursor.lock().expect("cursor lock") = i + 1;
                return Ok(line.clone());
            }
            if Instant::now() >= deadline {
                let mut tail = String::new();
                for l in lines.iter().rev().take(15).rev() {
                    let _ = writeln!(tail, "  {l}");
                }
                return Err(GuestError::ConsoleTimeout {
                    pattern: pattern.to_owned(),
                    timeout,
                    tail,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the guest has booted: its first `VMSIZE` line after the next `VMTEST BOOT`.
    pub fn wait_booted(&self, timeout: Duration) -> Result<String, GuestError> {
        let start = Instant::now();
        self.wait_console("VMTEST BOOT", timeout)?;
        self.wait_console("VMSIZE ", timeout.saturating_sub(start.elapsed()))
    }

    /// The size of vda in 512-byte sectors from the last complete `VMSIZE` line.
    pub fn last_vmsize(&self) -> Option<u64> {
        self.console_lines().iter().rev().find_map(|l| parse_vda(l))
    }

    /// Waits for a `VMSIZE` line (after the cursor) reporting exactly `sectors` for vda.
    pub fn wait_vmsize(&self, sectors: u64, timeout: Duration) -> Result<String, GuestError> {
        let deadline = Instant::now() + timeout;
        let pattern = format!("VMSIZE vda={sectors}");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.wait_console(&pattern, left)?;
            // `vda=100` also matches `vda=1000`: only an exact value counts.
            if parse_vda(&line) == Some(sectors) {
                return Ok(line);
            }
        }
    }

    /// Sends one command line to the guest's ttyS1 (`reboot`, `poweroff`, `halt`, `panic`,
    /// `echo TEXT`, `run SHELLCMD`).
    pub fn send_command(&self, command: &str) {
        let mut port = self.command_port.lock().expect("command port lock");
        port.write_all(format!("{command}\n").as_bytes())
            .expect("write to the guest command port");
    }

    /// Waits up to `timeout` for QEMU to exit and returns its status.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus, GuestError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .lock()
                .expect("guest lock")
                .try_wait()
                .map_err(GuestError::Wait)?
            {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(GuestError::ExitTimeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills QEMU (SIGKILL) and reaps it; nothing happens if it already exited.
    pub fn kill(&self) {
        let mut child = self.child.lock().expect("guest lock");
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The vda value of a `VMSIZE vda=N ...` console line.
pub fn parse_vda(line: &str) -> Option<u64> {
    line.strip_prefix("VMSIZE ")?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("vda="))
        .and_then(|n| n.parse().ok())
}
