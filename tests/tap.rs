//! Tap devices against the real kernel, in a network namespace of the test's own with a real
//! bridge: made owned by the given user, on the bridge and up; made afresh over an old one;
//! removed; refused for a bridge that is missing or is no bridge.
//!
//! Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for the namespace) and `ip` (iproute2), no harness.

use std::process::Command;

use vmkeeper::exec::tap;

/// Moves the calling thread (the test's; nextest runs each test in a process of its own) into
/// a new, empty network namespace; programs it starts inherit it.
fn private_network() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("unshare(CLONE_NEWNET): run as root");
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn details(dev: &str) -> serde_json::Value {
    let json = ip(&["-j", "-d", "link", "show", "dev", dev]);
    serde_json::from_str::<serde_json::Value>(&json).unwrap()[0].clone()
}

#[test]
fn a_tap_is_made_for_its_owner_on_the_bridge_and_removed() {
    private_network();
    ip(&["link", "add", "vmkbr0", "type", "bridge"]);
    ip(&["link", "set", "vmkbr0", "up"]);
    ip(&[
        "link",
        "add",
        "notabridge0",
        "type",
        "veth",
        "peer",
        "name",
        "notabridge1",
    ]);

    tap::create("vmk-test0", "vmkbr0", 65534, 65533).unwrap();
    let d = details("vmk-test0");
    println!("{d}");
    assert_eq!(d["master"], "vmkbr0");
    assert!(
        d["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{d}"
    );
    let info = &d["linkinfo"]["info_data"];
    assert_eq!(info["type"], "tap");
    assert_eq!(info["pi"], false);
    assert_eq!(info["vnet_hdr"], true);
    assert_eq!(info["persist"], true);
    assert_eq!(info["user"], "nobody");
    assert_eq!(info["group"], 65533);

    // Made afresh: a second create replaces the device with one for the new owner.
    tap::create("vmk-test0", "vmkbr0", 0, 0).unwrap();
    let info = details("vmk-test0")["linkinfo"]["info_data"].clone();
    assert_eq!(info["user"], "root");
    assert_eq!(details("vmk-test0")["master"], "vmkbr0");

    tap::remove("vmk-test0").unwrap();
    assert!(!tap::exists("vmk-test0"));
    tap::remove("vmk-test0").unwrap();

    for bridge in ["nosuchbr0", "notabridge0"] {
        let e = tap::create("vmk-test1", bridge, 0, 0).unwrap_err();
        assert!(matches!(e, tap::TapError::NoBridge(_)), "{bridge}: {e}");
        assert!(!tap::exists("vmk-test1"), "no tap is left behind");
    }
}
