//! Proves the test harness itself: systemd over D-Bus, Ceph RBD, and the test guest in QEMU.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use support::{GuestOpts, TestGuest, harness};
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

const GIB: u64 = 1 << 30;
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

const DEST: &str = "org.freedesktop.systemd1";
const PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";

async fn property(c: &zbus::Connection, path: &str, iface: &str, name: &str) -> OwnedVariant {
    let reply = c
        .call_method(
            Some(DEST),
            path,
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &(iface, name),
        )
        .await
        .unwrap_or_else(|e| panic!("get {iface}.{name}: {e}"));
    reply.body().deserialize().expect("a variant")
}

#[tokio::test]
async fn systemd_answers_over_dbus_and_runs_a_transient_unit() {
    let h = harness();
    let c = zbus::connection::Builder::address(h.dbus_address.as_str())
        .build()
        .await
        .expect("connect to the harness system bus");
    let version = String::try_from(property(&c, PATH, MANAGER, "Version").await).expect("a string");
    assert!(!version.is_empty(), "systemd reports a version");

    let scratch = h.scratch("systemd_transient");
    let marker = scratch.join("marker");
    let token = format!("ran-{}", std::process::id());
    let unit = format!("harness-probe-{}.service", std::process::id());
    let script = format!("echo {token}; echo {token} > {}", marker.display());
    let exec: Vec<(String, Vec<String>, bool)> = vec![(
        "/bin/sh".into(),
        vec!["/bin/sh".into(), "-c".into(), script],
        false,
    )];
    let props: Vec<(&str, Variant<'_>)> = vec![
        ("Description", Variant::from("harness self-test")),
        ("Type", Variant::from("oneshot")),
        ("RemainAfterExit", Variant::from(true)),
        ("ExecStart", Variant::from(exec)),
    ];
    let aux: Vec<(&str, Vec<(&str, Variant<'_>)>)> = Vec::new();
    c.call_method(
        Some(DEST),
        PATH,
        Some(MANAGER),
        "StartTransientUnit",
        &(unit.as_str(), "replace", props, aux),
    )
    .await
    .expect("StartTransientUnit");

    let unit_path: OwnedObjectPath = c
        .call_method(
            Some(DEST),
            PATH,
            Some(MANAGER),
            "GetUnit",
            &(unit.as_str(),),
        )
        .await
        .expect("GetUnit")
        .body()
        .deserialize()
        .expect("an object path");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = String::try_from(
            property(
                &c,
                unit_path.as_str(),
                "org.freedesktop.systemd1.Unit",
                "ActiveState",
            )
            .await,
        )
        .expect("a string");
        if state == "active" {
            break;
        }
        assert!(state != "failed", "{unit} failed");
        assert!(Instant::now() < deadline, "{unit} still {state} after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = i32::try_from(
        property(
            &c,
            unit_path.as_str(),
            "org.freedesktop.systemd1.Service",
            "ExecMainStatus",
        )
        .await,
    )
    .expect("an int");
    assert_eq!(status, 0, "the unit's command exited 0");
    assert_eq!(
        std::fs::read_to_string(&marker)
            .expect("the unit wrote its marker")
            .trim(),
        token
    );

    // The unit's stdout reaches the harness journal.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = h.journalctl(&["-u", &unit, "-o", "cat", "--no-pager"]);
        if String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l == token)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{token} not in the journal of {unit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    c.call_method(
        Some(DEST),
        PATH,
        Some(MANAGER),
        "StopUnit",
        &(unit.as_str(), "replace"),
    )
    .await
    .expect("StopUnit");
    let shown = h.systemctl(&["show", "-P", "ActiveState", &unit]);
    let state = String::from_utf8_lossy(&shown.stdout);
    assert!(
        matches!(state.trim(), "inactive" | "deactivating"),
        "after StopUnit: {state}"
    );
}

#[test]
fn rbd_create_and_resize_work_against_the_cluster() {
    let h = harness();
    let image = "harness-rbd-resize";
    h.create_image(image, GIB);
    assert_eq!(h.image_size(image), GIB);
    h.rbd_ok(&[
        "resize",
        "--no-progress",
        "--size",
        "2G",
        &h.image_spec(image),
    ]);
    assert_eq!(h.image_size(image), 2 * GIB);
    let shrink = h.rbd(&[
        "resize",
        "--no-progress",
        "--size",
        "1G",
        &h.image_spec(image),
    ]);
    assert!(
        !shrink.status.success(),
        "rbd refuses to shrink without --allow-shrink"
    );
    assert_eq!(h.image_size(image), 2 * GIB);
    h.rbd_ok(&["rm", "--no-progress", &h.image_spec(image)]);
    let listed = h.rbd_ok(&["ls", &h.ceph_pool]);
    assert!(
        !listed.lines().any(|l| l == image),
        "image removed: {listed}"
    );
}

#[test]
fn guest_boots_and_prints_its_disk_size() {
    let h = harness();
    let image = "harness-guest-size";
    h.create_image(image, 3 * GIB);
    let guest = TestGuest::boot(
        h,
        "guest_boots_and_prints_its_disk_size",
        image,
        &GuestOpts::default(),
    );
    guest.wait_booted(BOOT_TIMEOUT).expect("guest boots");
    guest
        .wait_vmsize(3 * GIB / 512, Duration::from_secs(5))
        .expect("guest reports 3 GiB");
    assert_eq!(guest.last_vmsize(), Some(3 * GIB / 512));
}

/// A minimal QMP exchange: enough to press the power button, not the project's client.
fn qmp_execute(
    stream: &mut UnixStream,
    reader: &mut impl BufRead,
    command: &str,
) -> serde_json::Value {
    stream
        .write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
        .expect("send to QMP");
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            reader.read_line(&mut line).expect("read from QMP") > 0,
            "QMP closed during {command}"
        );
        let msg: serde_json::Value = serde_json::from_str(&line).expect("QMP sends JSON lines");
        if msg.get("return").is_some() || msg.get("error").is_some() {
            return msg;
        }
    }
}

#[test]
fn guest_powers_off_on_system_powerdown() {
    let h = harness();
    let image = "harness-guest-powerdown";
    h.create_image(image, GIB);
    let guest = TestGuest::boot(
        h,
        "guest_powers_off_on_system_powerdown",
        image,
        &GuestOpts::default(),
    );
    guest.wait_booted(BOOT_TIMEOUT).expect("guest boots");
    // The button handler is armed before the first VMSIZE line.
    guest
        .wait_console_after(0, "VMTEST POWERBUTTON handler=", Duration::ZERO)
        .expect("power button handler");

    let mut stream = UnixStream::connect(guest.qmp_socket()).expect("connect to QMP");
    let mut reader = BufReader::new(stream.try_clone().expect("clone the QMP stream"));
    let mut greeting = String::new();
    reader.read_line(&mut greeting).expect("QMP greeting");
    assert!(greeting.contains("\"QMP\""), "QMP greeting: {greeting}");
    let reply = qmp_execute(&mut stream, &mut reader, "qmp_capabilities");
    assert!(reply.get("return").is_some(), "qmp_capabilities: {reply}");
    let reply = qmp_execute(&mut stream, &mut reader, "system_powerdown");
    assert!(reply.get("return").is_some(), "system_powerdown: {reply}");

    let status = guest
        .wait_exit(Duration::from_secs(60))
        .expect("QEMU exits after the power button");
    assert_eq!(
        status.code(),
        Some(0),
        "QEMU exit status after a guest poweroff"
    );
    guest
        .wait_console("VMTEST POWEROFF", Duration::from_secs(1))
        .expect("the guest powered itself off");
}

#[test]
fn guest_reboots_on_command_and_powers_off_by_itself() {
    let h = harness();
    let image = "harness-guest-commands";
    h.create_image(image, GIB);
    let opts = GuestOpts {
        append: "vmtest.poweroff_after=15".into(),
        ..GuestOpts::default()
    };
    let guest = TestGuest::boot(h, "guest_reboots_on_command", image, &opts);
    guest.wait_booted(BOOT_TIMEOUT).expect("guest boots");
    guest.send_command("reboot");
    guest
        .wait_console("VMTEST CMD reboot", Duration::from_secs(10))
        .expect("the guest takes the command");
    guest.wait_booted(BOOT_TIMEOUT).expect("guest boots again");
    assert_eq!(guest.last_vmsize(), Some(GIB / 512));
    // vmtest.poweroff_after counts from each boot: the guest leaves on its own.
    let status = guest
        .wait_exit(Duration::from_secs(120))
        .expect("QEMU exits after poweroff_after");
    assert_eq!(status.code(), Some(0));
    guest
        .wait_console("VMTEST poweroff_after", Duration::ZERO)
        .expect("the guest says why it left");
}

#[test]
fn scratch_dirs_are_fresh_and_short() {
    let h = harness();
    let name = "a_very_long_test_name_that_keeps_going_and_going_and_going_on";
    let a = h.scratch(name);
    let b = h.scratch(name);
    assert_ne!(a, b);
    assert!(a.is_dir() && b.is_dir() && a.starts_with(&h.dir));
    assert!(
        a.join("cmd.sock").as_os_str().len() <= 107,
        "{} is too long for a socket",
        a.display()
    );
}
