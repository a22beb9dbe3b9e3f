//! Every combination of intent, unit and record: an explicit table for the cases a crash
//! produces, and invariants checked over all of them.

use chrono::DateTime;

use super::*;
use crate::model::Resources;
use crate::state::{Actor, RebootKind, StopReason, Unplanned};

fn id(c: char) -> InvocationId {
    c.to_string().repeat(32).parse().unwrap()
}

const RES: Resources = Resources {
    cores: 2,
    memory_mib: 2048,
    disk_gib: 30,
};

fn at() -> chrono::DateTime<chrono::Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap()
}

fn start(previous: Option<char>) -> Intent {
    Intent::Start {
        resources: RES,
        argv: vec![],
        previous: previous.map(id),
        at: at(),
    }
}

fn stop(instance: Option<char>) -> Intent {
    Intent::Stop {
        instance: instance.map(id),
        reason: StopReason::Offline,
        by: Actor::Vmkeeper,
        at: at(),
    }
}

fn reboot(instance: Option<char>) -> Intent {
    Intent::Reboot {
        instance: instance.map(id),
        kind: RebootKind::Immediate,
        resources: RES,
        argv: vec![],
        by: Actor::Vmkeeper,
        at: at(),
    }
}

fn record(running: bool, instance: Option<char>, alarmed: Option<char>) -> VmRecord {
    VmRecord {
        applied: RES,
        running,
        instance: instance.map(id),
        ip_addresses: vec![],
        last_unplanned: alarmed.map(|a| Unplanned {
            at: at(),
            kind: UnplannedKind::QemuExited,
            detail: String::new(),
            instance: Some(id(a)),
        }),
        argv: vec![],
        image_id: None,
        generation: 1,
    }
}

fn running(i: Option<char>) -> UnitSeen {
    UnitSeen::Running {
        instance: i.map(id),
    }
}

fn stopped(i: Option<char>, failed: bool) -> UnitSeen {
    UnitSeen::Stopped {
        instance: i.map(id),
        failed,
    }
}

fn all_seen() -> Vec<UnitSeen> {
    let mut v = vec![UnitSeen::Absent];
    for i in [None, Some('a'), Some('b')] {
        v.push(running(i));
        v.push(stopped(i, false));
        v.push(stopped(i, true));
    }
    v
}

fn all_intents() -> Vec<Option<Intent>> {
    let mut v = vec![None];
    for i in [None, Some('a')] {
        v.push(Some(start(i)));
        v.push(Some(stop(i)));
        v.push(Some(reboot(i)));
    }
    v
}

fn all_records() -> Vec<Option<VmRecord>> {
    vec![
        None,
        Some(record(false, None, None)),
        Some(record(false, Some('a'), None)),
        Some(record(true, None, None)),
        Some(record(true, Some('a'), None)),
        Some(record(true, Some('a'), Some('a'))),
        Some(record(true, Some('a'), Some('b'))),
    ]
}

fn alarm(kind: UnplannedKind, i: Option<char>) -> Option<Alarm> {
    Some(Alarm {
        kind,
        instance: i.map(id),
    })
}

#[test]
fn a_crash_in_a_reboot_leads_to_exactly_one_reboot() {
    let r = record(true, Some('a'), None);
    // Killed before the stop: the old QEMU runs, the whole reboot runs again.
    assert_eq!(
        recover(Some(&reboot(Some('a'))), &running(Some('a')), Some(&r)).fate,
        Fate::Resume
    );
    // Killed after the stop: nothing runs, the operation only starts the new QEMU.
    for seen in [
        UnitSeen::Absent,
        stopped(Some('a'), false),
        stopped(Some('a'), true),
    ] {
        assert_eq!(
            recover(Some(&reboot(Some('a'))), &seen, Some(&r)),
            Recovery {
                fate: Fate::Resume,
                alarm: None
            },
            "{seen:?}"
        );
    }
    // Killed after the start job, before the record: the new QEMU runs; never a second one.
    assert_eq!(
        recover(Some(&reboot(Some('a'))), &running(Some('b')), Some(&r)),
        Recovery {
            fate: Fate::Completed,
            alarm: None
        }
    );
    // A new QEMU whose id systemd does not tell cannot be told from the old one: resume, and
    // the operation finds it running as the old one (it stops it first).
    assert_eq!(
        recover(Some(&reboot(Some('a'))), &running(None), Some(&r)).fate,
        Fate::Resume
    );
}

#[test]
fn a_crash_in_a_stop_finishes_it_without_alarm() {
    let r = record(true, Some('a'), None);
    assert_eq!(
        recover(Some(&stop(Some('a'))), &running(Some('a')), Some(&r)).fate,
        Fate::Resume
    );
    for seen in [
        UnitSeen::Absent,
        stopped(Some('a'), false),
        stopped(Some('a'), true),
        // Stopped as planned, then someone started it again: the stop is done (the planner
        // stops the new one if the VM is still declared offline).
        running(Some('b')),
    ] {
        assert_eq!(
            recover(Some(&stop(Some('a'))), &seen, Some(&r)),
            Recovery {
                fate: Fate::Completed,
                alarm: None
            },
            "{seen:?}"
        );
    }
}

#[test]
fn a_crash_in_a_start_records_the_new_qemu_or_drops_the_start() {
    let r = record(false, Some('a'), None);
    assert_eq!(
        recover(Some(&start(Some('a'))), &running(Some('b')), Some(&r)).fate,
        Fate::Completed
    );
    assert_eq!(
        recover(Some(&start(None)), &running(None), Some(&r)).fate,
        Fate::Completed
    );
    for seen in [
        UnitSeen::Absent,
        stopped(Some('a'), true),
        stopped(None, false),
    ] {
        assert_eq!(
            recover(Some(&start(Some('a'))), &seen, Some(&r)),
            Recovery {
                fate: Fate::Abandoned,
                alarm: None
            },
            "{seen:?}"
        );
    }
    // The new QEMU started and died before it was recorded: that end was not planned.
    assert_eq!(
        recover(Some(&start(Some('a'))), &stopped(Some('b'), true), Some(&r)),
        Recovery {
            fate: Fate::Abandoned,
            alarm: alarm(UnplannedKind::QemuExited, Some('b'))
        }
    );
}

#[test]
fn without_an_intent_a_recorded_qemu_that_is_gone_alarms_once() {
    let r = record(true, Some('a'), None);
    let cases = [
        (running(Some('a')), None),
        (running(None), None),
        (
            running(Some('b')),
            alarm(UnplannedKind::UnitRestarted, Some('a')),
        ),
        (
            stopped(Some('a'), true),
            alarm(UnplannedKind::QemuExited, Some('a')),
        ),
        (
            stopped(Some('a'), false),
            alarm(UnplannedKind::UnitStopped, Some('a')),
        ),
        (
            stopped(Some('b'), false),
            alarm(UnplannedKind::UnitRestarted, Some('a')),
        ),
        (
            UnitSeen::Absent,
            alarm(UnplannedKind::UnitStopped, Some('a')),
        ),
    ];
    for (seen, want) in cases {
        assert_eq!(
            recover(None, &seen, Some(&r)),
            Recovery {
                fate: Fate::None,
                alarm: want
            },
            "{seen:?}"
        );
        // The same end found again (a second restart before it was handled): no second alarm.
        let alarmed = record(true, Some('a'), Some('a'));
        assert_eq!(recover(None, &seen, Some(&alarmed)).alarm, None, "{seen:?}");
    }
}

#[test]
fn invariants_hold_over_every_combination() {
    let mut n = 0;
    for intent in all_intents() {
        for seen in all_seen() {
            for rec in all_records() {
                n += 1;
                let r = recover(intent.as_ref(), &seen, rec.as_ref());
                let what = format!("{intent:?} / {seen:?} / {rec:?} -> {r:?}");
                match &intent {
                    None => assert_eq!(r.fate, Fate::None, "{what}"),
                    Some(_) => assert_ne!(r.fate, Fate::None, "{what}"),
                }
                // Planned work never alarms.
                if matches!(intent, Some(Intent::Stop { .. } | Intent::Reboot { .. })) {
                    assert_eq!(r.alarm, None, "{what}");
                }
                // A stop resumes only when something runs that may be its target.
                if matches!(intent, Some(Intent::Stop { .. })) && r.fate == Fate::Resume {
                    assert!(seen.running().is_some(), "{what}");
                }
                // A start or reboot counts as done only when a QEMU runs.
                if matches!(intent, Some(Intent::Start { .. } | Intent::Reboot { .. }))
                    && r.fate == Fate::Completed
                {
                    assert!(seen.running().is_some(), "{what}");
                }
                // A reboot is never both done and to be repeated, and it is done only with an
                // instance other than the one it stopped.
                if let Some(Intent::Reboot {
                    instance: Some(old),
                    ..
                }) = &intent
                    && r.fate == Fate::Completed
                {
                    assert_ne!(seen.running(), Some(Some(old)), "{what}");
                }
                // A VM not recorded as running and not being started never alarms.
                if intent.is_none() && !rec.as_ref().is_some_and(|x| x.running) {
                    assert_eq!(r.alarm, None, "{what}");
                }
                // An alarm is about an instance not alarmed before.
                if let (Some(a), Some(rec)) = (&r.alarm, &rec)
                    && a.instance.is_some()
                {
                    assert_ne!(
                        rec.last_unplanned
                            .as_ref()
                            .and_then(|u| u.instance.as_ref()),
                        a.instance.as_ref(),
                        "{what}"
                    );
                }
            }
        }
    }
    assert_eq!(n, 7 * 10 * 7);
}

#[test]
fn a_host_reboot_alarms_for_the_vms_that_ran_unless_vmkeeper_was_stopping_them() {
    let mut state = State::default();
    let names: Vec<VmName> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    state
        .vms
        .insert(names[0].clone(), record(true, Some('a'), None));
    state
        .vms
        .insert(names[1].clone(), record(true, Some('b'), None));
    state
        .vms
        .insert(names[2].clone(), record(false, Some('c'), None));
    state
        .vms
        .insert(names[3].clone(), record(true, Some('d'), None));
    state.intents.insert(names[1].clone(), stop(Some('b')));
    state.intents.insert(names[3].clone(), reboot(Some('d')));
    let alarms = after_host_reboot(&mut state);
    assert_eq!(alarms, [(names[0].clone(), Some(id('a')))]);
    assert!(state.vms.values().all(|r| !r.running));
    // The reboot is then finished: only its start is left to do.
    assert_eq!(
        recover(
            state.intents.get(&names[3]),
            &UnitSeen::Absent,
            state.vms.get(&names[3])
        )
        .fate,
        Fate::Resume
    );
}
