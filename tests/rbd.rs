//! exec::rbd against the harness's real Ceph cluster: every assertion about the cluster's
//! state is checked with the `rbd` CLI, not only through the wrapper under test.

mod support;

use std::time::{Duration, Instant};

use support::{Harness, harness};
use vmkeeper::exec::rbd::{Cluster, ClusterOptions, Errno, Grown, IoCtx, RbdError};

const GIB: u64 = 1 << 30;

fn cluster(h: &Harness) -> Cluster {
    Cluster::connect(&ClusterOptions::new(&h.ceph_conf, &h.ceph_client))
        .expect("connect to the harness cluster")
}

fn pool(h: &Harness) -> IoCtx {
    cluster(h)
        .ioctx(&h.ceph_pool)
        .expect("open the harness pool")
}

fn rbd_json(h: &Harness, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["--format", "json"]);
    serde_json::from_str(&h.rbd_ok(&all)).expect("rbd prints JSON")
}

fn errno_of(e: &RbdError) -> Errno {
    e.errno()
        .unwrap_or_else(|| panic!("expected a Ceph errno in {e:?}"))
}

/// The error and all its sources, as a log line shows them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
fn create_is_thin_and_sized() {
    let h = harness();
    let io = pool(h);
    let name = "rbdt-create-thin";
    io.create(name, 40 * GIB).expect("create");

    assert_eq!(h.image_size(name), 40 * GIB);
    let du = rbd_json(h, &["du", &h.image_spec(name)]);
    let used = du["images"][0]["used_size"]
        .as_u64()
        .expect("rbd du used_size");
    assert!(
        used < 64 << 20,
        "a fresh image must be thin, rbd du says {used} bytes used"
    );
    let info = rbd_json(h, &["info", &h.image_spec(name)]);
    let features: Vec<&str> = info["features"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(features.contains(&"layering"), "features {features:?}");

    let stat = io.stat(name).expect("stat");
    assert_eq!(stat.size, 40 * GIB);
    assert_eq!(stat.objects, 40 * GIB / stat.object_size);
    assert!(io.exists(name).unwrap());
    assert!(io.list().unwrap().iter().any(|n| n == name));

    let err = io
        .create(name, GIB)
        .expect_err("second create of the same name");
    assert_eq!(errno_of(&err), Errno(libc::EEXIST));
    io.remove(name).expect("remove");
    assert!(!io.exists(name).unwrap());
}

#[test]
fn grow_only_grows() {
    let h = harness();
    let io = pool(h);
    let name = "rbdt-grow";
    io.create(name, GIB).unwrap();

    assert_eq!(
        io.grow(name, 3 * GIB).unwrap(),
        Grown {
            from: GIB,
            to: 3 * GIB
        }
    );
    assert_eq!(h.image_size(name), 3 * GIB);
    // The same size again changes nothing and is no error.
    assert_eq!(
        io.grow(name, 3 * GIB).unwrap(),
        Grown {
            from: 3 * GIB,
            to: 3 * GIB
        }
    );

    let err = io.grow(name, 2 * GIB).expect_err("shrink must be refused");
    match &err {
        RbdError::ShrinkRefused {
            pool,
            image,
            current,
            requested,
        } => {
            assert_eq!(
                (pool.as_str(), image.as_str()),
                (h.ceph_pool.as_str(), name)
            );
            assert_eq!((*current, *requested), (3 * GIB, 2 * GIB));
        }
        other => panic!("expected ShrinkRefused, got {other:?}"),
    }
    assert!(err.to_string().contains("provision a new VM"), "{err}");
    assert_eq!(
        h.image_size(name),
        3 * GIB,
        "a refused shrink must leave the image alone"
    );
    assert_eq!(io.open(name).unwrap().grow_to(1).unwrap_err().errno(), None);
    assert_eq!(h.image_size(name), 3 * GIB);
    io.remove(name).unwrap();
}

#[test]
fn clone_from_snapshot() {
    let h = harness();
    let io = pool(h);
    let (base, child) = ("rbdt-clone-base", "rbdt-clone-child");
    io.create(base, 2 * GIB).unwrap();
    io.open(base).unwrap().create_snapshot("gold").unwrap();

    io.clone_from(&io, base, "gold", child).expect("clone");
    let info = rbd_json(h, &["info", &h.image_spec(child)]);
    assert_eq!(info["parent"]["image"], base, "rbd info {info}");
    assert_eq!(info["parent"]["snapshot"], "gold");
    assert_eq!(info["size"].as_u64(), Some(2 * GIB));
    assert_eq!(io.stat(child).unwrap().size, 2 * GIB);
    // A clone is grown like any image.
    io.grow(child, 4 * GIB).unwrap();
    assert_eq!(h.image_size(child), 4 * GIB);

    let err = io
        .clone_from(&io, base, "no-such-snap", "rbdt-clone-bad")
        .unwrap_err();
    assert_eq!(errno_of(&err), Errno(libc::ENOENT), "{err:?}");

    io.remove(child).unwrap();
    let b = io.open(base).unwrap();
    if b.snapshot_is_protected("gold").unwrap() {
        b.unprotect_snapshot("gold").unwrap();
    }
    b.remove_snapshot("gold").unwrap();
    drop(b);
    io.remove(base).unwrap();
}

#[test]
fn snapshots_and_trash_round_trip() {
    let h = harness();
    let io = pool(h);
    let name = "rbdt-trash";
    io.create(name, GIB).unwrap();
    {
        let img = io.open(name).unwrap();
        img.create_snapshot("backup-1").unwrap();
        img.grow_to(2 * GIB).unwrap();
        img.create_snapshot("backup-2").unwrap();
        let snaps = img.snapshots().unwrap();
        let listed: Vec<(&str, u64)> = snaps.iter().map(|s| (s.name.as_str(), s.size)).collect();
        assert_eq!(listed, [("backup-1", GIB), ("backup-2", 2 * GIB)]);
        let cli = rbd_json(h, &["snap", "ls", &h.image_spec(name)]);
        assert_eq!(cli.as_array().unwrap().len(), 2, "rbd snap ls {cli}");
    }

    let id = io.trash_move(name).expect("trash move");
    assert!(!io.exists(name).unwrap());
    assert!(!io.list().unwrap().iter().any(|n| n == name));
    let entry = io
        .trash_list()
        .unwrap()
        .into_iter()
        .find(|e| e.id == id)
        .expect("in trash");
    assert_eq!(entry.name, name);
    let cli = rbd_json(h, &["trash", "ls", &h.ceph_pool]);
    assert!(
        cli.as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == id.as_str()),
        "{cli}"
    );

    io.trash_restore(&id, name).expect("restore");
    assert_eq!(h.image_size(name), 2 * GIB);
    assert_eq!(io.open(name).unwrap().snapshots().unwrap().len(), 2);

    // Deletion's last stage: a trashed image with snapshots (backups) is removed by
    // removing the snapshots through its id, then the image itself.
    let id = io.trash_move(name).unwrap();
    let err = io.trash_remove(&id, false).expect_err("snapshots keep it");
    assert_eq!(errno_of(&err), Errno(libc::ENOTEMPTY), "{err:?}");
    {
        let img = io.open_by_id(&id).expect("open a trashed image by id");
        for s in img.snapshots().unwrap() {
            img.remove_snapshot(&s.name).unwrap();
        }
        assert!(img.snapshots().unwrap().is_empty());
    }
    io.trash_remove(&id, false).expect("trash remove");
    assert!(io.trash_list().unwrap().iter().all(|e| e.id != id));
    let err = io.trash_restore(&id, name).unwrap_err();
    assert_eq!(errno_of(&err), Errno(libc::ENOENT));
}

#[test]
fn errors_name_the_operation_and_errno() {
    let h = harness();
    let c = cluster(h);
    let err = c.ioctx("vmkeeper-no-such-pool").unwrap_err();
    assert!(matches!(err, RbdError::OpenPool { .. }), "{err:?}");
    assert_eq!(
        chain(&err),
        "cannot open pool vmkeeper-no-such-pool: ENOENT (No such file or directory)"
    );

    let io = c.ioctx(&h.ceph_pool).unwrap();
    let missing = "rbdt-missing";
    let err = io.stat(missing).unwrap_err();
    assert!(err.is_not_found());
    assert_eq!(
        chain(&err),
        format!(
            "cannot open image {}/{missing}: ENOENT (No such file or directory)",
            h.ceph_pool
        )
    );
    let err = io.remove(missing).unwrap_err();
    assert!(
        matches!(err, RbdError::RemoveImage { .. }) && err.is_not_found(),
        "{err:?}"
    );
    assert!(chain(&err).contains("ENOENT"));
    let err = io.grow(missing, GIB).unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    assert!(!io.exists(missing).unwrap());
    assert!(matches!(
        io.create("bad\0name", GIB),
        Err(RbdError::InvalidName(_))
    ));
}

#[test]
fn unreachable_cluster_times_out() {
    let h = harness();
    // A monitor address nobody listens on: take a free port and close it again.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = h.scratch("rbd-unreachable");
    let conf = dir.join("ceph.conf");
    let keyring = dir.join("keyring");
    let key = h.ceph(&["auth", "get", &format!("client.{}", h.ceph_client)]);
    assert!(
        key.status.success(),
        "ceph auth get: {}",
        String::from_utf8_lossy(&key.stderr)
    );
    std::fs::write(&keyring, &key.stdout).unwrap();
    std::fs::write(
        &conf,
        format!(
            "[global]\nmon host = [v2:127.0.0.1:{port}]\nauth client required = cephx\n\
             log to stderr = false\nlog file = {}\n",
            dir.join("client.log").display()
        ),
    )
    .unwrap();

    let mut opts = ClusterOptions::new(&conf, &h.ceph_client);
    opts.keyring = Some(keyring);
    opts.mount_timeout = Duration::from_secs(2);
    let t = Instant::now();
    let err = Cluster::connect(&opts).expect_err("no monitor listens there");
    let took = t.elapsed();
    assert!(matches!(err, RbdError::Connect { .. }), "{err:?}");
    assert_eq!(errno_of(&err), Errno(libc::ETIMEDOUT), "{}", chain(&err));
    assert!(
        took < Duration::from_secs(8),
        "connect took {took:?} with a 2 s timeout"
    );
    eprintln!("unreachable cluster: {} after {took:?}", chain(&err));
}

#[tokio::test]
async fn blocking_calls_run_off_the_runtime() {
    let h = harness();
    let c = cluster(h);
    let pool = h.ceph_pool.clone();
    let size = c
        .run(move |c| {
            let io = c.ioctx(&pool)?;
            io.create("rbdt-async", GIB)?;
            let size = io.stat("rbdt-async")?.size;
            io.remove("rbdt-async")?;
            Ok(size)
        })
        .await
        .expect("blocking closure");
    assert_eq!(size, GIB);
    let err = c
        .run(|c| c.ioctx("vmkeeper-no-such-pool").map(drop))
        .await
        .unwrap_err();
    assert!(err.is_not_found());
}
