// Cases are written as JSON literals handed over by value.
#![allow(clippy::needless_pass_by_value)]

use serde_json::json;

use super::*;
use crate::localtime::parse_instant;
use crate::localtime::rfc3339;
use crate::state::{Maintenance, VmRecord};

fn config(vms: serde_json::Value) -> Config {
    crate::config::parse(&json!({ "vms": vms }).to_string())
        .unwrap()
        .config
}

fn vm(cores: u32, mem: u64, disk: u64) -> serde_json::Value {
    json!({ "cores": cores, "memoryMiB": mem, "diskGiB": disk })
}

fn n(s: &str) -> VmName {
    s.parse().unwrap()
}

fn t(s: &str) -> DateTime<Utc> {
    parse_instant(s).unwrap()
}

fn res(cores: u32, memory_mib: u64, disk_gib: u64) -> Resources {
    Resources {
        cores,
        memory_mib,
        disk_gib,
    }
}

fn running(state: &mut State, name: &str, applied: Resources) {
    state.vms.insert(
        n(name),
        VmRecord {
            applied,
            running: true,
            instance: None,
            ip_addresses: vec![],
            last_unplanned: None,
            argv: vec![],
            image_id: None,
            generation: 1,
        },
    );
}

const NOW: &str = "2026-11-30T10:00:00+01:00";

#[test]
fn new_vms_get_a_disk_and_start() {
    let c = config(
        json!({ "web01": vm(2, 2048, 30), "web02": { "cores": 1, "memoryMiB": 1024, "diskGiB": 40, "online": false } }),
    );
    let p = plan(&c, &Observed::default(), &State::default(), t(NOW));
    assert_eq!(
        p.actions,
        [
            Action::CreateDisk {
                vm: n("web01"),
                size_gib: 30,
                clone_from: None
            },
            Action::Start {
                vm: n("web01"),
                resources: res(2, 2048, 30)
            },
            Action::CreateDisk {
                vm: n("web02"),
                size_gib: 40,
                clone_from: None
            },
        ]
    );
    assert!(p.pending.is_empty() && p.refusals.is_empty());
}

#[test]
fn a_cpu_change_waits_for_an_announced_slot() {
    let c = config(json!({ "web01": vm(4, 2048, 30) }));
    let mut s = State::default();
    running(&mut s, "web01", res(2, 2048, 30));
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    assert_eq!(p.pending.len(), 1);
    let pending = &p.pending[0];
    assert_eq!(
        pending.slot.to_string(),
        "2026-12-01T22:00:00+01:00 – 2026-12-01T22:15:00+01:00"
    );
    assert_eq!(rfc3339(pending.announced_at), "2026-11-30T10:00:00+01:00");
    assert_eq!(
        p.actions,
        [Action::ScheduleMaintenance {
            vm: n("web01"),
            project: ProjectName::default(),
            slot: pending.slot,
            reasons: vec![Reason::PendingResources {
                from: res(2, 2048, 30),
                to: res(4, 2048, 30)
            }],
            replaces: None,
        }]
    );
}

fn with_maintenance(
    s: &mut State,
    name: &str,
    from: Resources,
    to: Resources,
    start: &str,
    end: &str,
) {
    s.maintenances.insert(
        n(name),
        Maintenance {
            reasons: vec![Reason::PendingResources { from, to }],
            slot_start: t(start),
            slot_end: t(end),
            announced_at: t("2026-11-29T09:00:00+01:00"),
            notice: None,
            delivered_at: None,
            project: ProjectName::default(),
        },
    );
}

#[test]
fn an_announced_slot_is_kept_then_run_and_a_reverted_change_cancels_it() {
    let c = config(json!({ "web01": vm(4, 2048, 30) }));
    let mut s = State::default();
    running(&mut s, "web01", res(2, 2048, 30));
    with_maintenance(
        &mut s,
        "web01",
        res(2, 2048, 30),
        res(4, 2048, 30),
        "2026-11-30T22:00:00+01:00",
        "2026-11-30T22:15:00+01:00",
    );
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(
        rfc3339(p.pending[0].announced_at),
        "2026-11-29T09:00:00+01:00"
    );
    // In the slot: the reboot runs.
    let p = plan(
        &c,
        &Observed::as_recorded(&s),
        &s,
        t("2026-11-30T22:05:00+01:00"),
    );
    assert!(
        matches!(&p.actions[..], [Action::MaintenanceReboot { .. }]),
        "{:?}",
        p.actions
    );
    // Reverted: cancelled, announced.
    let c = config(json!({ "web01": vm(2, 2048, 30) }));
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    assert_eq!(
        p.actions,
        [Action::CancelMaintenance {
            vm: n("web01"),
            reason: "the change was reverted; no reboot is needed".into()
        }]
    );
}

#[test]
fn a_missed_slot_is_rescheduled_into_a_window() {
    let c = config(json!({ "web01": vm(4, 2048, 30) }));
    let mut s = State::default();
    running(&mut s, "web01", res(2, 2048, 30));
    with_maintenance(
        &mut s,
        "web01",
        res(2, 2048, 30),
        res(4, 2048, 30),
        "2026-11-29T22:00:00+01:00",
        "2026-11-29T22:15:00+01:00",
    );
    // The daemon comes back at 10:00 the next morning, outside any window.
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    let [
        Action::ScheduleMaintenance {
            slot,
            replaces: Some(old),
            ..
        },
    ] = &p.actions[..]
    else {
        panic!("{:?}", p.actions)
    };
    assert_eq!(rfc3339(slot.start), "2026-12-01T22:00:00+01:00");
    assert_eq!(rfc3339(old.start), "2026-11-29T22:00:00+01:00");
}

#[test]
fn maintenances_of_several_vms_are_spread() {
    let c = config(json!({ "a": vm(4, 2048, 30), "b": vm(4, 2048, 30) }));
    let mut s = State::default();
    running(&mut s, "a", res(2, 2048, 30));
    running(&mut s, "b", res(2, 4096, 30));
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    let starts: Vec<String> = p.pending.iter().map(|x| rfc3339(x.slot.start)).collect();
    assert_eq!(
        starts,
        ["2026-12-01T22:00:00+01:00", "2026-12-01T22:15:00+01:00"]
    );
}

#[test]
fn disks_grow_live_and_never_shrink() {
    let mut s = State::default();
    running(&mut s, "web01", res(2, 2048, 50));
    let c = config(json!({ "web01": vm(2, 2048, 60) }));
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    assert_eq!(
        p.actions,
        [Action::GrowDisk {
            vm: n("web01"),
            from_gib: 50,
            to_gib: 60,
            live: true
        }]
    );
    let c = config(json!({ "web01": vm(2, 2048, 40) }));
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    assert!(p.actions.is_empty());
    assert_eq!(
        p.refusals
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [
            "vms.web01.diskGiB: cannot shrink from 50 to 40 GiB; disks only grow — provision a new VM instead"
        ]
    );
    // The real image size wins over the record: a grown image is never shrunk back.
    let mut seen = Observed::as_recorded(&s);
    seen.vms.get_mut(&n("web01")).unwrap().disk_gib = Some(70);
    let c = config(json!({ "web01": vm(2, 2048, 60) }));
    let p = plan(&c, &seen, &s, t(NOW));
    assert!(p.actions.is_empty());
    assert_eq!(p.refusals.len(), 1);
}

#[test]
fn online_false_stops_and_a_stopped_vm_starts_with_its_declared_values() {
    let mut s = State::default();
    running(&mut s, "web01", res(2, 2048, 30));
    let c = crate::config::parse(&json!({ "vms": { "web01": { "cores": 4, "memoryMiB": 2048, "diskGiB": 30, "online": false } } }).to_string()).unwrap().config;
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    assert_eq!(
        p.actions,
        [Action::Stop {
            vm: n("web01"),
            reason: "online = false".into()
        }]
    );
    assert!(p.pending.is_empty());
    let c = config(json!({ "web01": vm(4, 2048, 30) }));
    let p = plan(&c, &Observed::default(), &s, t(NOW));
    assert_eq!(
        p.actions,
        [Action::Start {
            vm: n("web01"),
            resources: res(4, 2048, 30)
        }]
    );
}

#[test]
fn a_deletion_for_today_is_refused_with_the_earliest_date() {
    let c = config(
        json!({ "web01": { "cores": 2, "memoryMiB": 2048, "diskGiB": 30, "deleteAt": "2026-11-30" } }),
    );
    let p = plan(&c, &Observed::default(), &State::default(), t(NOW));
    assert_eq!(
        p.refusals
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["vms.web01.deleteAt: 2026-11-30 is too early: the earliest allowed date is 2026-12-01"]
    );
    // A VM declared gone already is not created.
    assert!(p.actions.is_empty());
}

#[test]
fn a_scheduled_deletion_shows_its_timeline() {
    let c = config(
        json!({ "web01": { "cores": 2, "memoryMiB": 2048, "diskGiB": 30, "deleteAt": "2026-12-03" } }),
    );
    let mut s = State::default();
    running(&mut s, "web01", res(2, 2048, 30));
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    assert_eq!(
        p.actions,
        [
            Action::ScheduleDeletion {
                vm: n("web01"),
                date: "2026-12-03".parse().unwrap(),
                source: DeletionSource::Config
            },
            // T is 3 days away: the announcement is due at once.
            Action::RunDeletionStage {
                vm: n("web01"),
                stage: Stage::Announce
            },
        ]
    );
    let stages: Vec<String> = p.deletions[0]
        .stages
        .iter()
        .map(|s| format!("{} {} {:?}", s.stage, rfc3339(s.at), s.status))
        .collect();
    assert_eq!(
        stages,
        [
            "announce 2026-11-28T00:00:00+01:00 Due",
            "shutdown 2026-12-03T00:00:00+01:00 Upcoming",
            "purge 2026-12-06T00:00:00+01:00 Upcoming",
            "delete-backups 2026-12-11T00:00:00+01:00 Upcoming",
            "release-name 2027-01-10T00:00:00+01:00 Upcoming",
        ]
    );
    assert_eq!(p.reserved_names, []);
}

fn deletion(s: &mut State, name: &str, date: &str, source: DeletionSource, last: Option<Stage>) {
    s.deletions.insert(
        n(name),
        Deletion {
            date: date.parse().unwrap(),
            source,
            requested_at: t("2026-11-01T00:00:00Z"),
            progress: last.map_or(Progress::Scheduled, |last| Progress::Done { last }),
            stage_started: None,
            ip_addresses: vec!["192.0.2.10".parse().unwrap()],
            downtime_from: None,
            done_at: Default::default(),
            trashed_image: None,
            announcement: None,
            stage_started_at: None,
            generation: 1,
        },
    );
}

#[test]
fn removing_a_vm_schedules_its_deletion_loudly_and_declaring_it_again_cancels() {
    let mut s = State::default();
    running(&mut s, "old", res(2, 2048, 30));
    let c = config(json!({}));
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    assert_eq!(
        p.actions[0],
        Action::ScheduleDeletion {
            vm: n("old"),
            date: "2026-12-01".parse().unwrap(),
            source: DeletionSource::Removed
        }
    );
    assert_eq!(
        p.warnings,
        [
            "old was removed from the configuration: it is deleted on 2026-12-01 (shut down at 2026-12-01T00:00:00+01:00); declare it again before 2026-12-04T00:00:00+01:00 to keep it"
        ]
    );
    deletion(
        &mut s,
        "old",
        "2026-12-01",
        DeletionSource::Removed,
        Some(Stage::Shutdown),
    );
    s.vms.get_mut(&n("old")).unwrap().running = false;
    let c = config(json!({ "old": vm(2, 2048, 30) }));
    let p = plan(
        &c,
        &Observed::as_recorded(&s),
        &s,
        t("2026-12-03T12:00:00+01:00"),
    );
    assert_eq!(
        p.actions,
        [
            Action::CancelDeletion {
                vm: n("old"),
                reason: "declared again in the configuration".into()
            },
            Action::Start {
                vm: n("old"),
                resources: res(2, 2048, 30)
            },
        ]
    );
    // After the purge it is too late: the name is held and the refusal says until when.
    deletion(
        &mut s,
        "old",
        "2026-12-01",
        DeletionSource::Removed,
        Some(Stage::Purge),
    );
    s.vms.remove(&n("old"));
    let p = plan(&c, &Observed::default(), &s, t("2026-12-05T12:00:00+01:00"));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(
        p.refusals
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["vms.old: the name belongs to a VM deleted on 2026-12-01; it is free again on 2027-01-08"]
    );
    assert_eq!(
        p.reserved_names,
        [ReservedName {
            vm: n("old"),
            free_on: "2027-01-08".parse().unwrap()
        }]
    );
    // Declared again or not, the remaining stages still run.
    let p = plan(&c, &Observed::default(), &s, t("2026-12-09T12:00:00+01:00"));
    assert_eq!(
        p.actions,
        [Action::RunDeletionStage {
            vm: n("old"),
            stage: Stage::DeleteBackups
        }]
    );
}

#[test]
fn a_mass_removal_is_held_until_each_is_confirmed_and_released_when_it_no_longer_waits() {
    let names = ["r1", "r2", "r3", "r4"];
    let mut s = State::default();
    for name in names {
        running(&mut s, name, res(1, 1024, 30));
    }
    // Four removed at once, one more than the default guard of three: all held, none deleted.
    let c = config(json!({}));
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    let all: Vec<VmName> = names.iter().map(|x| n(x)).collect();
    assert_eq!(p.actions, [Action::HoldRemovals { vms: all.clone() }]);
    assert_eq!(p.awaiting_removal, all);
    s.removal_held.extend(all.clone());

    // Two confirmed: those two are scheduled; the other two stay held although two are
    // within the guard, because they came together.
    s.confirmed_removals.extend([n("r1"), n("r2")]);
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    let scheduled: Vec<&VmName> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::ScheduleDeletion { vm, .. } => Some(vm),
            _ => None,
        })
        .collect();
    assert_eq!(scheduled, [&n("r1"), &n("r2")]);
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::HoldRemovals { .. }))
    );
    assert_eq!(p.awaiting_removal, [n("r3"), n("r4")]);
    assert!(
        released_removal_holds(&c, &s).is_empty(),
        "nothing released yet"
    );

    // Scheduled (r1), declared again (r3), gone from the state (r4): released; r2, confirmed
    // but not scheduled yet, still waits for its deletion to be scheduled.
    deletion(&mut s, "r1", "2026-12-01", DeletionSource::Removed, None);
    s.vms.remove(&n("r4"));
    let c = config(json!({ "r3": vm(1, 1024, 30) }));
    assert_eq!(released_removal_holds(&c, &s), [n("r1"), n("r3"), n("r4")]);
}

#[test]
fn addresses_of_a_vm_in_deletion_are_held_until_its_purge() {
    let mut s = State::default();
    running(&mut s, "old", res(2, 2048, 30));
    deletion(
        &mut s,
        "old",
        "2026-12-01",
        DeletionSource::Cli { by: "alice".into() },
        Some(Stage::Announce),
    );
    let c = config(
        json!({ "old": vm(2, 2048, 30), "new": { "cores": 1, "memoryMiB": 1024, "diskGiB": 30, "ipAddresses": ["192.0.2.10"] } }),
    );
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    assert_eq!(
        p.refusals
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [
            "vms.new.ipAddresses: 192.0.2.10 is still held by old, which is being deleted; it is released on 2026-12-04"
        ]
    );
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::CreateDisk { vm, .. } if vm.as_str() == "new"))
    );
    // A CLI deletion is not cancelled by the configuration.
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::CancelDeletion { .. }))
    );
}

#[test]
fn a_late_shutdown_does_not_bring_the_purge_forward() {
    let mut s = State::default();
    running(&mut s, "web01", res(2, 2048, 30));
    deletion(
        &mut s,
        "web01",
        "2026-12-01",
        DeletionSource::Config,
        Some(Stage::Announce),
    );
    let c = config(
        json!({ "web01": { "cores": 2, "memoryMiB": 2048, "diskGiB": 30, "deleteAt": "2026-12-01" } }),
    );
    // The host was down over T and T + 3: only the shutdown runs.
    let late = t("2026-12-05T08:00:00+01:00");
    let p = plan(&c, &Observed::as_recorded(&s), &s, late);
    assert_eq!(
        p.actions,
        [Action::RunDeletionStage {
            vm: n("web01"),
            stage: Stage::Shutdown
        }]
    );
    // Recorded as done then: the purge, and the cancel deadline, are three days later.
    let d = s.deletions.get_mut(&n("web01")).unwrap();
    d.progress = Progress::Done {
        last: Stage::Shutdown,
    };
    d.done_at.insert(Stage::Shutdown, late);
    s.vms.get_mut(&n("web01")).unwrap().running = false;
    let p = plan(
        &c,
        &Observed::as_recorded(&s),
        &s,
        t("2026-12-08T07:59:00+01:00"),
    );
    assert_eq!(p.actions, []);
    let timeline = &p.deletions[0];
    assert_eq!(
        rfc3339(timeline.cancellable_until),
        "2026-12-08T08:00:00+01:00"
    );
    assert_eq!(rfc3339(timeline.stages[2].at), "2026-12-08T08:00:00+01:00");
    assert_eq!(rfc3339(timeline.stages[3].at), "2026-12-13T08:00:00+01:00");
    let due = t("2026-12-08T08:00:00+01:00");
    let p = plan(&c, &Observed::as_recorded(&s), &s, due);
    assert_eq!(
        p.actions,
        [Action::RunDeletionStage {
            vm: n("web01"),
            stage: Stage::Purge
        }]
    );
    // Not on a clock that is not known to be right: held, and said so.
    let mut seen = Observed::as_recorded(&s);
    seen.clock_untrusted = Some("the clock is not synchronized".into());
    let p = plan(&c, &seen, &s, due);
    assert_eq!(p.actions, []);
    assert_eq!(p.held[0].stage, Stage::Purge);
}

#[test]
fn planning_is_deterministic() {
    let c = config(json!({ "a": vm(4, 2048, 30), "b": vm(2, 2048, 40) }));
    let mut s = State::default();
    running(&mut s, "a", res(2, 2048, 30));
    let seen = Observed::as_recorded(&s);
    assert_eq!(plan(&c, &seen, &s, t(NOW)), plan(&c, &seen, &s, t(NOW)));
}

#[test]
fn an_outdated_qemu_gets_a_maintenance_and_merges_with_a_cpu_change() {
    let c = config(json!({ "web01": vm(2, 2048, 30) }));
    let mut s = State::default();
    running(&mut s, "web01", res(2, 2048, 30));
    let mut seen = Observed::as_recorded(&s);
    seen.vms.get_mut(&n("web01")).unwrap().outdated = Some("QEMU binary changed".into());
    let p = plan(&c, &seen, &s, t(NOW));
    let [Action::ScheduleMaintenance { reasons, .. }] = &p.actions[..] else {
        panic!("{:?}", p.actions)
    };
    assert_eq!(
        reasons,
        &[Reason::Outdated {
            detail: "QEMU binary changed".into()
        }]
    );
    // No CPU/RAM change: nothing is pending, but the reboot is scheduled.
    assert!(p.pending.is_empty());
    let c = config(json!({ "web01": vm(4, 2048, 30) }));
    let p = plan(&c, &seen, &s, t(NOW));
    let [Action::ScheduleMaintenance { reasons, .. }] = &p.actions[..] else {
        panic!("{:?}", p.actions)
    };
    assert_eq!(
        reasons.len(),
        2,
        "one maintenance for both needs: {reasons:?}"
    );
}

mod projects;
