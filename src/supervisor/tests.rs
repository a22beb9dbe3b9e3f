//! The supervisor against event sequences the daemon meets: its own reboots, stale events of
//! old instances, outside stops and restarts, guest resets, lost signals.

use super::*;

fn id(c: char) -> InvocationId {
    c.to_string().repeat(32).parse().unwrap()
}

fn up(c: char) -> UnitSeen {
    UnitSeen::Running {
        instance: Some(id(c)),
    }
}

fn down(c: char, failed: bool) -> UnitSeen {
    UnitSeen::Stopped {
        instance: Some(id(c)),
        failed,
    }
}

/// A supervisor whose VM runs instance `a`, adopted at `t0`.
fn running_a(t0: Instant) -> Supervisor {
    let mut s = Supervisor::new("web01".parse().unwrap());
    let d = s.unit_event(&up('a'), t0);
    assert_eq!(
        d,
        [
            Decision::Adopted {
                instance: Some(id('a'))
            },
            Decision::Connect {
                instance: Some(id('a'))
            }
        ]
    );
    s.link_event(&id('a'), true, t0);
    s
}

fn alarms(d: &[Decision]) -> Vec<UnplannedKind> {
    d.iter()
        .filter_map(|d| match d {
            Decision::Alarm { kind, .. } | Decision::Ended { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

const T: Duration = Duration::from_secs(600);

#[test]
fn after_its_own_reboot_the_new_instance_is_supervised_like_the_old() {
    let t0 = Instant::now();
    let mut s = running_a(t0);
    s.begin(1, OpKind::Reboot, t0, T);
    // The stop of `a` is planned, in whichever order the signal and the report come.
    assert_eq!(alarms(&s.unit_event(&down('a', false), t0)), []);
    assert_eq!(s.stopped(), []);
    // The new QEMU's signal may come before the operation reports it.
    assert_eq!(
        s.unit_event(&up('b'), t0),
        [Decision::Connect {
            instance: Some(id('b'))
        }]
    );
    assert_eq!(s.started(Some(id('b')), Some(42), t0), []);
    assert_eq!(s.finish(1, t0, Ok(()), None), None);
    // A stale "connection gone" of the old QEMU does not touch the new connection.
    s.link_event(&id('b'), true, t0);
    s.link_event(&id('a'), false, t0);
    assert!(matches!(s.link, Link::Connected { .. }));
    // A guest reboot inside the new QEMU is unplanned and alarms once for its double RESET.
    let t1 = t0 + Duration::from_secs(120);
    assert_eq!(
        alarms(&s.guest_reset(&id('b'), "guest-reset", t1)),
        [UnplannedKind::GuestReset]
    );
    assert_eq!(
        s.guest_reset(&id('b'), "guest-reset", t1 + Duration::from_millis(70)),
        []
    );
    // A late event of the old instance changes nothing.
    assert_eq!(s.unit_event(&down('a', true), t1), []);
    assert_eq!(s.instance(), Some(&id('b')));
    // An outside stop of the new instance is unplanned.
    assert_eq!(
        alarms(&s.unit_event(&down('b', false), t1)),
        [UnplannedKind::UnitStopped]
    );
}

#[test]
fn unplanned_ends_are_told_apart() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_secs(300);
    let mut s = running_a(t0);
    assert_eq!(
        alarms(&s.unit_event(&down('a', true), t1)),
        [UnplannedKind::QemuExited]
    );
    let mut s = running_a(t0);
    s.guest_shutdown(&id('a'), "guest-shutdown");
    assert_eq!(
        alarms(&s.unit_event(&down('a', false), t1)),
        [UnplannedKind::GuestPoweroff]
    );
    // A guest shutdown of another instance says nothing about this one.
    let mut s = running_a(t0);
    s.guest_shutdown(&id('e'), "guest-shutdown");
    assert_eq!(
        alarms(&s.unit_event(&down('a', false), t1)),
        [UnplannedKind::UnitStopped]
    );
    // Restarted from outside: one alarm about the old instance, the new one is connected.
    let mut s = running_a(t0);
    let d = s.unit_event(&up('b'), t1);
    assert_eq!(
        d,
        [
            Decision::Alarm {
                kind: UnplannedKind::UnitRestarted,
                instance: Some(id('a')),
                detail: "the unit was restarted from outside vmkeeper".into()
            },
            Decision::Connect {
                instance: Some(id('b'))
            }
        ]
    );
}

#[test]
fn a_stop_seen_by_a_resync_before_its_signal_alarms_once() {
    let t0 = Instant::now();
    let mut s = running_a(t0);
    let t1 = t0 + Duration::from_secs(300);
    assert_eq!(
        alarms(&s.unit_event(&UnitSeen::Absent, t1)),
        [UnplannedKind::UnitStopped]
    );
    // The signal arrives late: the same end, no second alarm.
    assert_eq!(s.unit_event(&down('a', false), t1), []);
    assert_eq!(s.unit_removed(), []);
    // A unit that vanished while it ran is looked at again rather than guessed about.
    let mut s = running_a(t0);
    assert_eq!(s.unit_removed(), [Decision::Resync]);
}

#[test]
fn an_operation_past_its_deadline_no_longer_hides_an_unplanned_stop() {
    let t0 = Instant::now();
    let mut s = running_a(t0);
    s.begin(7, OpKind::Stop, t0, Duration::from_secs(90));
    let late = t0 + Duration::from_secs(91);
    assert_eq!(s.overdue(late).map(|op| op.id), Some(7));
    let wait = s.finish(7, late, Err("timed out".into()), None).unwrap();
    assert_eq!(wait, 2 * MIN_BACKOFF);
    assert_eq!(
        alarms(&s.unit_event(&down('a', false), late)),
        [UnplannedKind::UnitStopped]
    );
}

#[test]
fn a_planned_stop_targets_one_instance() {
    let t0 = Instant::now();
    let mut s = running_a(t0);
    s.begin(1, OpKind::Reboot, t0, T);
    s.unit_event(&down('a', false), t0);
    s.started(Some(id('b')), None, t0);
    // The reboot's new QEMU dies while the operation still waits for it: not planned.
    assert_eq!(
        alarms(&s.unit_event(&down('b', true), t0 + Duration::from_secs(1))),
        [UnplannedKind::QemuExited]
    );
}

#[test]
fn a_qemu_nobody_started_is_adopted_and_stale_starts_ignored() {
    let t0 = Instant::now();
    let mut s = running_a(t0);
    s.begin(1, OpKind::Stop, t0, T);
    s.unit_event(&down('a', false), t0);
    s.finish(1, t0, Ok(()), None);
    // A late "activating" of the instance that just stopped.
    assert_eq!(s.unit_event(&up('a'), t0), []);
    assert!(!s.unit.is_up());
    // Someone ran `systemctl start`: taken over, not an alarm.
    let d = s.unit_event(&up('c'), t0);
    assert_eq!(
        d[0],
        Decision::Adopted {
            instance: Some(id('c'))
        }
    );
    assert_eq!(alarms(&d), []);
}

#[test]
fn a_qemu_that_crashes_at_once_is_restarted_on_a_growing_backoff() {
    let t0 = Instant::now();
    let mut s = Supervisor::new("web01".parse().unwrap());
    s.unit_event(&UnitSeen::Absent, t0);
    let mut t = t0;
    let mut waits = vec![];
    for i in 0..3 {
        assert!(!s.backing_off(OpKind::Start, t, None), "attempt {i}");
        s.begin(i, OpKind::Start, t, T);
        s.started(Some(id(char::from(b'a' + i as u8))), None, t);
        s.finish(i, t, Ok(()), None);
        let d = s.unit_event(&UnitSeen::Absent, t + Duration::from_secs(1));
        assert_eq!(alarms(&d), [UnplannedKind::UnitStopped]);
        let b = &s.backoff[&OpKind::Start];
        waits.push(b.not_before.unwrap() - (t + Duration::from_secs(1)));
        t = b.not_before.unwrap();
    }
    assert_eq!(waits, [4, 8, 16].map(Duration::from_secs));
    // One that ran for a while before it ended is restarted at once.
    s.begin(9, OpKind::Start, t, T);
    s.started(Some(id('f')), None, t);
    s.finish(9, t, Ok(()), None);
    s.unit_event(&UnitSeen::Absent, t + CRASH_LOOP_WINDOW);
    assert!(!s.backing_off(OpKind::Start, t + CRASH_LOOP_WINDOW, None));
}

#[test]
fn a_new_grow_target_is_not_held_back_by_the_old_ones_backoff() {
    let t0 = Instant::now();
    let mut s = running_a(t0);
    s.begin(1, OpKind::Grow, t0, T);
    s.finish(1, t0, Err("ETIMEDOUT".into()), Some(40));
    assert!(s.backing_off(OpKind::Grow, t0, Some(40)));
    assert!(!s.backing_off(OpKind::Grow, t0, Some(45)));
    assert_eq!(
        s.backoff[&OpKind::Grow].last_error.as_deref(),
        Some("ETIMEDOUT")
    );
    s.begin(2, OpKind::Grow, t0, T);
    s.finish(2, t0, Ok(()), None);
    assert!(!s.backoff.contains_key(&OpKind::Grow));
}

#[test]
fn results_of_an_older_operation_are_ignored() {
    let t0 = Instant::now();
    let mut s = running_a(t0);
    s.begin(5, OpKind::Grow, t0, T);
    assert_eq!(s.finish(4, t0, Err("old".into()), None), None);
    assert!(s.busy());
    s.finish(5, t0, Ok(()), None);
    assert!(!s.busy());
}
