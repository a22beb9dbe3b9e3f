//! exec::qmp against a real QEMU (the harness's tiny guest on an RBD disk).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{GuestOpts, TestGuest, harness};
use vmkeeper::exec::qmp::{CommandError, Qmp, QmpError, QmpEvent, QmpOptions, RunState};

const GIB: u64 = 1 << 30;
const BOOT: Duration = Duration::from_secs(120);

/// Runs a blocking wait of the guest helper without stalling the runtime's QMP reader.
async fn on_guest<T: Send + 'static>(
    guest: &Arc<TestGuest>,
    f: impl FnOnce(&TestGuest) -> T + Send + 'static,
) -> T {
    let guest = Arc::clone(guest);
    tokio::task::spawn_blocking(move || f(&guest))
        .await
        .expect("blocking helper")
}

fn boot(name: &str, image: &str, size: u64) -> Arc<TestGuest> {
    let h = harness();
    h.create_image(image, size);
    Arc::new(TestGuest::boot(h, name, image, &GuestOpts::default()))
}

#[tokio::test]
async fn grow_live_then_power_down() {
    let h = harness();
    let guest = boot("qmp-grow", "qmpt-grow", GIB);
    let mut qmp = Qmp::connect(guest.qmp_socket()).await.expect("connect");
    let mut events = qmp.take_events().expect("events");
    assert!(qmp.take_events().is_none());

    assert_eq!(qmp.query_status().await.unwrap(), RunState::Running);
    let blocks = qmp.query_block().await.unwrap();
    let root = blocks
        .iter()
        .find(|b| b.node_name.as_deref() == Some("root0"));
    let root = root.unwrap_or_else(|| panic!("no node root0 in {blocks:?}"));
    assert_eq!(root.size_bytes, Some(GIB));

    on_guest(&guest, |g| g.wait_booted(BOOT))
        .await
        .expect("guest boots");
    assert_eq!(guest.last_vmsize(), Some(GIB / 512));

    // Grow: QEMU resizes the RBD image and tells the guest.
    let t = Instant::now();
    qmp.block_resize("root0", 2 * GIB)
        .await
        .expect("block_resize");
    let resized = t.elapsed();
    let blocks = qmp.query_block().await.unwrap();
    let root = blocks
        .iter()
        .find(|b| b.node_name.as_deref() == Some("root0"))
        .unwrap();
    assert_eq!(root.size_bytes, Some(2 * GIB));
    let line = on_guest(&guest, |g| {
        g.wait_vmsize(2 * GIB / 512, Duration::from_secs(10))
    })
    .await
    .expect("the guest sees the new size");
    eprintln!(
        "block_resize took {resized:?}; guest printed `{line}` {:?} after",
        t.elapsed()
    );
    assert_eq!(h.image_size("qmpt-grow"), 2 * GIB);

    // QEMU's own errors come back as typed errors naming the operation.
    let err = qmp.block_resize("no-such-node", 4 * GIB).await.unwrap_err();
    match &err {
        QmpError::BlockResize {
            node_name,
            source: CommandError::Qemu { class, .. },
            ..
        } => {
            assert_eq!(
                (node_name.as_str(), class.as_str()),
                ("no-such-node", "GenericError")
            );
        }
        other => panic!("expected a QEMU error, got {other:?}"),
    }

    // Power button: the guest shuts down by itself, QEMU exits cleanly.
    let t = Instant::now();
    qmp.system_powerdown().await.expect("system_powerdown");
    let ev = events
        .wait_for(Duration::from_secs(30), |e| *e == QmpEvent::Powerdown)
        .await;
    assert_eq!(ev, Some(QmpEvent::Powerdown));
    let ev = events
        .wait_for(Duration::from_secs(60), |e| {
            matches!(e, QmpEvent::Shutdown { .. })
        })
        .await
        .expect("SHUTDOWN event");
    assert_eq!(
        ev,
        QmpEvent::Shutdown {
            guest: true,
            reason: "guest-shutdown".into()
        }
    );
    eprintln!("SHUTDOWN {:?} after system_powerdown", t.elapsed());
    let status = on_guest(&guest, |g| g.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success(), "QEMU exited with {status}");

    // The stream ends with the connection, and commands fail rather than hang.
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while events.recv().await.is_some() {}
    })
    .await;
    assert!(rest.is_ok(), "event stream did not end after QEMU exited");
    let err = qmp.query_status().await.unwrap_err();
    assert!(
        matches!(
            err,
            QmpError::QueryStatus(CommandError::Disconnected | CommandError::Write(_))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn guest_reboot_gives_reset_and_quit_stops() {
    let guest = boot("qmp-reboot", "qmpt-reboot", GIB);
    let mut qmp = Qmp::connect(guest.qmp_socket()).await.expect("connect");
    let mut events = qmp.take_events().unwrap();
    on_guest(&guest, |g| g.wait_booted(BOOT))
        .await
        .expect("guest boots");

    let t = Instant::now();
    guest.send_command("reboot");
    let ev = events
        .wait_for(Duration::from_secs(60), |e| {
            matches!(e, QmpEvent::Reset { .. })
        })
        .await
        .expect("RESET event");
    assert_eq!(
        ev,
        QmpEvent::Reset {
            guest: true,
            reason: "guest-reset".into()
        }
    );
    eprintln!("RESET {:?} after the guest's reboot command", t.elapsed());
    on_guest(&guest, |g| g.wait_booted(BOOT))
        .await
        .expect("guest boots again");
    assert_eq!(qmp.query_status().await.unwrap(), RunState::Running);

    qmp.quit().await.expect("quit");
    let ev = events
        .wait_for(Duration::from_secs(30), |e| {
            matches!(e, QmpEvent::Shutdown { .. })
        })
        .await
        .expect("SHUTDOWN event");
    assert_eq!(
        ev,
        QmpEvent::Shutdown {
            guest: false,
            reason: "host-qmp-quit".into()
        }
    );
    let status = on_guest(&guest, |g| g.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success(), "QEMU exited with {status}");
}

#[tokio::test]
async fn connect_failures_are_bounded() {
    let h = harness();
    let dir = h.scratch("qmp-connect");

    let missing = dir.join("missing.sock");
    let err = Qmp::connect(&missing).await.unwrap_err();
    assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");

    // A peer that accepts and never greets: connect gives up after the greeting timeout.
    let silent = dir.join("silent.sock");
    let listener = tokio::net::UnixListener::bind(&silent).unwrap();
    let accept = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
    let opts = QmpOptions {
        greeting_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let t = Instant::now();
    let err = Qmp::connect_with(&silent, opts).await.unwrap_err();
    assert!(matches!(err, QmpError::GreetingTimeout { .. }), "{err:?}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    drop(accept.await);
}
