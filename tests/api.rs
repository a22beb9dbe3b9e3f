//! The local API against a real daemon: arbitrary bytes and arbitrary JSON requests from an
//! unprivileged user are each answered with an error naming what was wrong (or, for a
//! well-formed read-only request, its answer) and change nothing; 2,000 idle connections and
//! a writer that sends one byte a second, from an unprivileged user, do not keep an
//! authorized user's `status` and `reboot --now` from completing (their latency is printed).

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{Value, json};
use support::host::*;
use vmkeeper::api::{Request, Response};

/// nobody: the unprivileged peer.
const NOBODY: u32 = 65534;

/// Runs `f` on a thread of its own whose credentials (this thread only: raw system calls,
/// not glibc's process-wide wrappers) are those of `uid` with no supplementary groups, so the
/// sockets it connects carry that user's identity. The test process itself stays root.
fn as_user<T: Send + 'static>(uid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: setgroups/setresgid/setresuid as raw system calls change only the calling
        // thread's credentials; their arguments are plain integers and a null list of length 0.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        f()
    })
    .join()
    .expect("the thread with the other user's credentials panicked")
}

/// Lets other users reach the daemon's socket: the directories above it become traversable.
fn open_the_way(host: &Host) -> PathBuf {
    let socket = host.dir.join("run/api.sock");
    let mut p = socket.parent().unwrap().to_path_buf();
    while p.starts_with(&host.h.dir) || p == host.h.dir {
        Command::new("chmod").arg("o+x").arg(&p).status().unwrap();
        if !p.pop() {
            break;
        }
    }
    socket
}

/// Sends `bytes`, ends the request (shutdown of our side) and reads the whole answer.
fn exchange(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The daemon may answer (and close) before it read everything: a failed write is fine.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    answer
}

/// JSON that looks like requests: real and made-up commands, with fields of every kind.
fn arb_request() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![
            "api-a",
            "no-such-vm",
            "API-A",
            "",
            "2030-01-01",
            "2030-01-01T00:00:00Z",
            "1999-12-31",
            "x,y=z",
        ])
        .prop_map(Value::from),
        "\\PC{0,40}".prop_map(Value::from),
    ];
    let value = leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    let command = prop::sample::select(vec![
        "status",
        "reboot",
        "maintenance-request",
        "maintenance-list",
        "run-due",
        "delete",
        "cancel-deletion",
        "reload",
        "Status",
        "shutdown",
        "",
    ]);
    let key = prop::sample::select(vec!["vm", "reason", "now", "date", "command", "extra"]);
    (
        prop::option::of(command),
        prop::collection::btree_map(key, value, 0..4),
    )
        .prop_map(|(command, fields)| {
            let mut m: serde_json::Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            if let Some(c) = command {
                m.insert("command".into(), c.into());
            }
            Value::Object(m)
        })
}

#[derive(Debug, Clone)]
enum Input {
    /// Any bytes at all.
    Bytes(Vec<u8>),
    /// A JSON document and how it is framed.
    Json(Value, &'static str),
}

impl Input {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Input::Bytes(b) => b.clone(),
            Input::Json(v, end) => format!("{v}{end}").into_bytes(),
        }
    }
}

fn arb_input() -> impl Strategy<Value = Input> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Input::Bytes),
        (
            arb_request(),
            prop::sample::select(vec!["\n", "", " \n", "\n{}\n"])
        )
            .prop_map(|(v, end)| Input::Json(v, end)),
    ]
}

/// What the daemon must answer to `bytes` from an unprivileged user, if it is well-formed.
fn expected(bytes: &[u8]) -> Option<Request> {
    let line = bytes.split_inclusive(|b| *b == b'\n').next().unwrap_or(&[]);
    serde_json::from_slice::<Request>(line).ok()
}

#[test]
fn arbitrary_bytes_and_requests_are_answered_with_errors_and_change_nothing() {
    let host = Host::new("api-fuzz", &[("api-a", json!({ "online": false }))]);
    host.start_daemon();
    let state_path = host.dir.join("state/state.json");
    wait_until(Duration::from_secs(60), "the disk is created", || {
        host.vm_status("api-a")["applied"]["diskGiB"] == 30
    });
    // Let the state reach the disk before it is compared.
    std::thread::sleep(Duration::from_secs(2));
    let before = std::fs::read_to_string(&state_path).unwrap();
    let pid = host
        .h
        .systemctl(&["show", "-p", "MainPID", "--value", &host.unit])
        .stdout;
    let socket = open_the_way(&host);

    let failures = as_user(NOBODY, move || {
        let mut runner = TestRunner::new(ProptestConfig {
            cases: 300,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let answered = std::cell::Cell::new((0, 0, 0));
        let result = runner.run(&arb_input(), |input| {
            let bytes = input.bytes();
            let answer = exchange(&socket, &bytes);
            let resp: Response = serde_json::from_str(answer.trim_end())
                .map_err(|e| TestCaseError::fail(format!("{answer:?} is no response: {e}")))?;
            match (expected(&bytes), resp) {
                (Some(req), Response::Ok(_)) if !req.is_mutating() => {
                    answered.set((answered.get().0 + 1, answered.get().1, answered.get().2));
                }
                (Some(req), Response::Error(e)) if req.is_mutating() => {
                    prop_assert!(e.starts_with("not authorized"), "{req:?}: {e}");
                    answered.set((answered.get().0, answered.get().1 + 1, answered.get().2));
                }
                (None, Response::Error(e)) => {
                    prop_assert!(e.starts_with("bad request: "), "{e}");
                    prop_assert!(e.len() > "bad request: ".len() + 10, "says too little: {e}");
                    answered.set((answered.get().0, answered.get().1, answered.get().2 + 1));
                }
                (req, resp) => prop_assert!(false, "{input:?} ({req:?}) got {resp:?}"),
            }
            Ok(())
        });
        let (read_only, refused, malformed) = answered.get();
        println!(
            "answered: {read_only} read-only requests, {refused} refused mutations, {malformed} malformed inputs"
        );
        result.err().map(|e| e.to_string())
    });
    assert_eq!(failures, None);

    // Nothing changed: the same daemon process runs, the state is what it was.
    assert!(host.active(&host.unit));
    assert_eq!(
        host.h
            .systemctl(&["show", "-p", "MainPID", "--value", &host.unit])
            .stdout,
        pid
    );
    assert_eq!(std::fs::read_to_string(&state_path).unwrap(), before);
    // The daemon journals why it refused; it never logged a panic.
    let out = host
        .h
        .journalctl(&["-u", &host.unit, "--no-pager", "-o", "cat"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("panicked"));
}

/// The group and user of the authorized operator.
fn operator() -> String {
    let run = |args: &[&str]| Command::new(args[0]).args(&args[1..]).output().unwrap();
    run(&["groupadd", "-f", "sudo-srv"]);
    if !run(&["id", "vmk-operator"]).status.success() {
        let out = run(&[
            "useradd",
            "-M",
            "-N",
            "-s",
            "/usr/sbin/nologin",
            "-G",
            "sudo-srv",
            "vmk-operator",
        ]);
        assert!(out.status.success(), "useradd: {out:?}");
    }
    "vmk-operator".into()
}

#[test]
fn idle_and_slow_connections_do_not_take_the_api_away() {
    let operator = operator();
    let host = Host::new("api-abuse", &[("abuse-a", json!({}))]);
    host.start_daemon();
    host.wait_vmsize("abuse-a", Host::sectors(30), 0, BOOT);
    let socket = open_the_way(&host);

    // Room for 2,000 sockets in this process.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        hard.min(65_536),
        hard.min(65_536),
    )
    .unwrap();

    // The attack, as nobody: one connection that sends a byte a second and never ends its
    // request (opened first, so it holds one of nobody's slots until the read timeout), and
    // 2,000 that send nothing.
    let s = socket.clone();
    let slow = as_user(NOBODY, move || UnixStream::connect(&s).expect("connect"));
    let s = socket.clone();
    let idle: Vec<UnixStream> = as_user(NOBODY, move || {
        (0..2000)
            .map(|_| UnixStream::connect(&s).expect("connect"))
            .collect()
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        let mut slow = slow;
        std::thread::spawn(move || {
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if slow.write_all(b"{").is_err() {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            sent
        })
    };
    // And it keeps knocking: every connection the daemon closes is opened again.
    let knocker = {
        let stop = stop.clone();
        let s = socket.clone();
        std::thread::spawn(move || {
            as_user(NOBODY, move || {
                let mut again = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(mut c) = UnixStream::connect(&s) {
                        let mut b = [0u8; 256];
                        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                        let _ = c.read(&mut b);
                        again += 1;
                    }
                }
                again
            })
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    let as_operator = |args: &[&str]| {
        let t = Instant::now();
        let out = Command::new("runuser")
            .args(["-u", &operator, "--", env!("CARGO_BIN_EXE_vmkeeper")])
            .args(args)
            .args(["--socket", socket.to_str().unwrap(), "--timeout", "120s"])
            .output()
            .unwrap();
        (out, t.elapsed())
    };
    let (out, status_latency) = as_operator(&["status"]);
    assert!(out.status.success(), "status: {out:?}");
    let pid = host.vm_status("abuse-a")["qemuPid"].clone();
    let mark = host.console_len("abuse-a");
    let (out, reboot_latency) = as_operator(&["reboot", "abuse-a", "--now"]);
    assert!(out.status.success(), "reboot --now: {out:?}");
    let (out, status_after) = as_operator(&["status", "--json"]);
    assert!(out.status.success(), "status: {out:?}");
    host.wait_vmsize("abuse-a", Host::sectors(30), mark, BOOT);
    assert_ne!(host.vm_status("abuse-a")["qemuPid"], pid, "a new QEMU runs");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let bytes = trickle.join().unwrap();
    let reconnects = knocker.join().unwrap();
    // What the idle connections were told: refused at once, or timed out after 5 s.
    let (mut busy, mut timed_out, mut other) = (0, 0, 0);
    for mut c in idle {
        let mut answer = String::new();
        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = c.read_to_string(&mut answer);
        if answer.contains("too many connections") {
            busy += 1;
        } else if answer.contains("no complete request") {
            timed_out += 1;
        } else {
            other += 1;
        }
    }
    println!(
        "under 2000 idle connections, a byte-a-second writer ({bytes} bytes sent) and \
         {reconnects} reconnects from nobody: operator's status {status_latency:?}, \
         reboot --now {reboot_latency:?} (answered once the new QEMU runs), status after {status_after:?}; idle connections: {busy} refused \
         at once, {timed_out} timed out, {other} other"
    );
    assert_eq!(
        busy + timed_out,
        2000,
        "{other} idle connections got another answer"
    );
    assert!(host.active(&host.unit));
}
