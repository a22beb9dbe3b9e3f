use std::str::FromStr;

use chrono::{NaiveDate, Offset, TimeZone};
use chrono_tz::Tz;
use proptest::prelude::*;

use super::*;
use crate::localtime::{parse_instant, rfc3339, start_of_day};

fn hm(h: u32, m: u32) -> NaiveTime {
    NaiveTime::from_hms_opt(h, m, 0).unwrap()
}

fn daily(tz: Tz, start: NaiveTime, end: NaiveTime) -> Policy {
    Policy {
        tz,
        rule: WindowRule::Daily {
            start,
            end,
            weekdays: WeekdaySet::ALL,
        },
        announce_ahead: TimeDelta::hours(24),
        max_parallel: 1,
        expected_duration: TimeDelta::minutes(15),
        blackouts: vec![],
    }
}

/// The slots of a project alone on its host: its own are all there are, no host-wide limit.
fn alone(taken: &[Slot]) -> Taken<'_> {
    Taken {
        project: taken,
        host: taken,
        host_max_parallel: u32::MAX,
    }
}

fn berlin() -> Policy {
    daily(chrono_tz::Europe::Berlin, hm(22, 0), hm(5, 0))
}

fn t(s: &str) -> DateTime<Utc> {
    parse_instant(s).unwrap()
}

fn window_starting(p: &Policy, local_start: &str) -> Window {
    let from = t(local_start) - TimeDelta::minutes(1);
    p.windows(from)
        .find(|w| w.start.with_timezone(&Utc) >= from)
        .unwrap()
}

#[test]
fn the_spring_night_window_lasts_six_hours() {
    let w = window_starting(&berlin(), "2027-03-27T22:00:00+01:00");
    assert_eq!(rfc3339(w.start), "2027-03-27T22:00:00+01:00");
    assert_eq!(rfc3339(w.end), "2027-03-28T05:00:00+02:00");
    assert_eq!(w.duration(), TimeDelta::hours(6));
}

#[test]
fn the_autumn_night_window_lasts_eight_hours() {
    let w = window_starting(&berlin(), "2026-10-24T22:00:00+02:00");
    assert_eq!(rfc3339(w.start), "2026-10-24T22:00:00+02:00");
    assert_eq!(rfc3339(w.end), "2026-10-25T05:00:00+01:00");
    assert_eq!(w.duration(), TimeDelta::hours(8));
}

#[test]
fn an_ordinary_night_lasts_seven_hours_and_an_open_window_is_listed() {
    let p = berlin();
    let ws: Vec<Window> = p.windows(t("2026-11-30T02:00:00+01:00")).take(3).collect();
    // The window of the night 29/30 is still open at 02:00 and comes first.
    assert_eq!(rfc3339(ws[0].start), "2026-11-29T22:00:00+01:00");
    assert!(ws.iter().all(|w| w.duration() == TimeDelta::hours(7)));
    assert_eq!(rfc3339(ws[2].start), "2026-12-01T22:00:00+01:00");
}

#[test]
fn a_window_inside_the_skipped_hour_starts_at_the_jump() {
    let p = daily(chrono_tz::Europe::Berlin, hm(2, 30), hm(4, 0));
    let w = window_starting(&p, "2027-03-28T01:00:00+01:00");
    assert_eq!(rfc3339(w.start), "2027-03-28T03:00:00+02:00");
    assert_eq!(w.duration(), TimeDelta::hours(1));
    // Entirely inside the gap: no window that night at all.
    let p = daily(chrono_tz::Europe::Berlin, hm(2, 10), hm(2, 50));
    let w = window_starting(&p, "2027-03-28T00:00:00+01:00");
    assert_eq!(rfc3339(w.start), "2027-03-29T02:10:00+02:00");
}

#[test]
fn a_window_in_the_repeated_hour_takes_the_longest_reading() {
    let p = daily(chrono_tz::Europe::Berlin, hm(2, 15), hm(2, 45));
    let w = window_starting(&p, "2026-10-25T00:00:00+02:00");
    assert_eq!(rfc3339(w.start), "2026-10-25T02:15:00+02:00");
    assert_eq!(rfc3339(w.end), "2026-10-25T02:45:00+01:00");
    assert_eq!(w.duration(), TimeDelta::minutes(90));
}

#[test]
fn weekdays_select_the_day_a_window_starts_on() {
    let mut p = berlin();
    p.rule = WindowRule::Daily {
        start: hm(22, 0),
        end: hm(5, 0),
        weekdays: WeekdaySet::of(&[Weekday::Sat, Weekday::Sun]),
    };
    let ws: Vec<Window> = p.windows(t("2026-11-30T12:00:00+01:00")).take(3).collect();
    let starts: Vec<String> = ws.iter().map(|w| rfc3339(w.start)).collect();
    assert_eq!(
        starts,
        [
            "2026-12-05T22:00:00+01:00",
            "2026-12-06T22:00:00+01:00",
            "2026-12-12T22:00:00+01:00"
        ]
    );
}

#[test]
fn a_cron_schedule_gives_the_first_sunday_of_each_month() {
    let mut p = berlin();
    p.rule = WindowRule::Cron {
        schedule: Box::new(cron::Schedule::from_str("0 0 22 1-7 * Sun").unwrap()),
        length: TimeDelta::hours(6),
    };
    let ws: Vec<Window> = p.windows(t("2026-11-29T12:00:00+01:00")).take(3).collect();
    let got: Vec<String> = ws.iter().map(|w| w.to_string()).collect();
    assert_eq!(
        got,
        [
            "2026-12-06T22:00:00+01:00 – 2026-12-07T04:00:00+01:00",
            "2027-01-03T22:00:00+01:00 – 2027-01-04T04:00:00+01:00",
            "2027-02-07T22:00:00+01:00 – 2027-02-08T04:00:00+01:00"
        ]
    );
}

#[test]
fn a_cron_window_over_the_spring_change_is_an_hour_shorter() {
    let mut p = berlin();
    p.rule = WindowRule::Cron {
        schedule: Box::new(cron::Schedule::from_str("0 0 1 28 3 *").unwrap()),
        length: TimeDelta::hours(3),
    };
    let w = p.windows(t("2027-03-01T00:00:00Z")).next().unwrap();
    assert_eq!(
        w.to_string(),
        "2027-03-28T01:00:00+01:00 – 2027-03-28T04:00:00+02:00"
    );
    assert_eq!(w.duration(), TimeDelta::hours(2));
}

#[test]
fn blackouts_cut_windows() {
    let mut p = berlin();
    p.blackouts = vec![Blackout {
        tz: chrono_tz::Europe::Berlin,
        from: NaiveDate::from_ymd_opt(2026, 12, 23).unwrap(),
        to: NaiveDate::from_ymd_opt(2027, 1, 2).unwrap(),
        reason: "holiday freeze".into(),
    }];
    let ws: Vec<Window> = p.windows(t("2026-12-22T12:00:00+01:00")).take(2).collect();
    // The night of the 22nd ends at midnight, when the freeze starts.
    assert_eq!(
        ws[0].to_string(),
        "2026-12-22T22:00:00+01:00 – 2026-12-23T00:00:00+01:00"
    );
    // The freeze ends with the 2nd: the next window is what is left of that night.
    assert_eq!(
        ws[1].to_string(),
        "2027-01-03T00:00:00+01:00 – 2027-01-03T05:00:00+01:00"
    );
    assert_eq!(
        p.blackout_on(NaiveDate::from_ymd_opt(2027, 1, 1).unwrap())
            .unwrap()
            .reason,
        "holiday freeze"
    );
}

#[test]
fn a_slot_is_announced_a_day_ahead_in_the_next_window() {
    let p = berlin();
    let s = p
        .pick_slot(t("2026-11-30T10:00:00+01:00"), Taken::NONE)
        .unwrap();
    assert_eq!(
        s.to_string(),
        "2026-12-01T22:00:00+01:00 – 2026-12-01T22:15:00+01:00"
    );
    // Announced during a window: a day later the same window is open, so the slot starts
    // exactly 24 h later, on the next whole minute.
    let s = p
        .pick_slot(t("2026-11-30T23:10:20+01:00"), Taken::NONE)
        .unwrap();
    assert_eq!(rfc3339(s.start), "2026-12-01T23:11:00+01:00");
}

#[test]
fn a_slot_must_fit_before_the_window_closes() {
    let p = berlin();
    let s = p
        .pick_slot(t("2026-11-30T04:50:00+01:00"), Taken::NONE)
        .unwrap();
    assert_eq!(rfc3339(s.start), "2026-12-01T22:00:00+01:00");
    let s = p
        .pick_slot(t("2026-11-30T04:45:00+01:00"), Taken::NONE)
        .unwrap();
    assert_eq!(rfc3339(s.start), "2026-12-01T04:45:00+01:00");
}

#[test]
fn slots_of_several_vms_are_spread_by_max_parallel() {
    let mut p = berlin();
    let now = t("2026-11-30T10:00:00+01:00");
    let mut taken = vec![];
    for _ in 0..3 {
        let s = p.pick_slot(now, alone(&taken)).unwrap();
        taken.push(s);
    }
    let starts: Vec<String> = taken.iter().map(|s| rfc3339(s.start)).collect();
    assert_eq!(
        starts,
        [
            "2026-12-01T22:00:00+01:00",
            "2026-12-01T22:15:00+01:00",
            "2026-12-01T22:30:00+01:00"
        ]
    );
    p.max_parallel = 2;
    let mut taken = vec![];
    for _ in 0..3 {
        let s = p.pick_slot(now, alone(&taken)).unwrap();
        taken.push(s);
    }
    let starts: Vec<String> = taken.iter().map(|s| rfc3339(s.start)).collect();
    assert_eq!(
        starts,
        [
            "2026-12-01T22:00:00+01:00",
            "2026-12-01T22:00:00+01:00",
            "2026-12-01T22:15:00+01:00"
        ]
    );
}

#[test]
fn nothing_fits_gives_none() {
    let mut p = berlin();
    p.expected_duration = TimeDelta::hours(9);
    assert_eq!(
        p.pick_slot(t("2026-11-30T10:00:00+01:00"), Taken::NONE),
        None
    );
}

#[test]
fn the_autumn_night_fits_a_duration_no_other_night_does() {
    let mut p = berlin();
    p.expected_duration = TimeDelta::hours(8);
    let s = p
        .pick_slot(t("2026-10-01T10:00:00+02:00"), Taken::NONE)
        .unwrap();
    assert_eq!(
        s.to_string(),
        "2026-10-24T22:00:00+02:00 – 2026-10-25T05:00:00+01:00"
    );
}

#[test]
fn two_projects_in_different_zones_get_slots_in_their_own_nights() {
    let berlin = berlin();
    let new_york = daily(chrono_tz::America::New_York, hm(22, 0), hm(5, 0));
    let now = t("2026-11-30T10:00:00+01:00");
    let b = berlin.pick_slot(now, Taken::NONE).unwrap();
    let host = [b];
    // Asked at the same instant, a day ahead: Berlin's next night, and the rest of New York's
    // current night (10:00 in Berlin is 04:00 in New York). They do not overlap, so the
    // host-wide limit of one does not move either.
    let taken = Taken {
        project: &[],
        host: &host,
        host_max_parallel: 1,
    };
    let n = new_york.pick_slot(now, taken).unwrap();
    assert_eq!(
        b.to_string(),
        "2026-12-01T22:00:00+01:00 – 2026-12-01T22:15:00+01:00"
    );
    assert_eq!(
        n.to_string(),
        "2026-12-01T04:00:00-05:00 – 2026-12-01T04:15:00-05:00"
    );
    // New York's daylight saving ends on the first Sunday of November, Berlin's a week
    // earlier: the New York night keeps its wall-clock times across its own change.
    let n = new_york
        .pick_slot(t("2026-10-31T10:00:00-04:00"), Taken::NONE)
        .unwrap();
    assert_eq!(
        n.to_string(),
        "2026-11-01T22:00:00-05:00 – 2026-11-01T22:15:00-05:00"
    );
}

#[test]
fn the_host_wide_limit_holds_across_projects() {
    let mut a = berlin();
    let mut b = berlin();
    a.max_parallel = 2;
    b.max_parallel = 2;
    let now = t("2026-11-30T10:00:00+01:00");
    let mut held: Vec<(char, Slot)> = vec![];
    for (project, p) in [('a', &a), ('b', &b), ('a', &a), ('b', &b)] {
        let own: Vec<Slot> = held
            .iter()
            .filter(|(q, _)| *q == project)
            .map(|x| x.1)
            .collect();
        let host: Vec<Slot> = held.iter().map(|x| x.1).collect();
        let taken = Taken {
            project: &own,
            host: &host,
            host_max_parallel: 3,
        };
        held.push((project, p.pick_slot(now, taken).unwrap()));
    }
    let starts: Vec<String> = held
        .iter()
        .map(|(q, s)| format!("{q} {}", rfc3339(s.start)))
        .collect();
    // Three at once host-wide; the fourth waits although its project has room.
    assert_eq!(
        starts,
        [
            "a 2026-12-01T22:00:00+01:00",
            "b 2026-12-01T22:00:00+01:00",
            "a 2026-12-01T22:00:00+01:00",
            "b 2026-12-01T22:15:00+01:00"
        ]
    );
}

#[test]
fn a_host_wide_blackout_is_in_the_host_zone_and_a_projects_own_in_its_zone() {
    let mut new_york = daily(chrono_tz::America::New_York, hm(18, 0), hm(23, 0));
    new_york.announce_ahead = TimeDelta::zero();
    // The host (Berlin) freezes on 2026-12-02: until 2026-12-02T18:00-05:00 in New York.
    new_york.blackouts = vec![Blackout {
        tz: chrono_tz::Europe::Berlin,
        from: NaiveDate::from_ymd_opt(2026, 12, 2).unwrap(),
        to: NaiveDate::from_ymd_opt(2026, 12, 2).unwrap(),
        reason: "host freeze".into(),
    }];
    let windows = |p: &Policy| -> Vec<String> {
        p.windows(t("2026-12-01T12:00:00-05:00"))
            .take(2)
            .map(|w| w.to_string())
            .collect()
    };
    // Berlin's 2 December is 1 December 18:00 to 2 December 18:00 in New York: that
    // night's window is gone, the next one is whole.
    assert_eq!(
        windows(&new_york),
        [
            "2026-12-02T18:00:00-05:00 – 2026-12-02T23:00:00-05:00",
            "2026-12-03T18:00:00-05:00 – 2026-12-03T23:00:00-05:00"
        ]
    );
    // The project's own freeze of that date is New York's day.
    new_york.blackouts[0].tz = chrono_tz::America::New_York;
    assert_eq!(
        windows(&new_york),
        [
            "2026-12-01T18:00:00-05:00 – 2026-12-01T23:00:00-05:00",
            "2026-12-03T18:00:00-05:00 – 2026-12-03T23:00:00-05:00"
        ]
    );
}

const ZONES: [&str; 6] = [
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "UTC",
    "America/Santiago",
];

fn arb_policy() -> impl Strategy<Value = Policy> {
    (
        0..ZONES.len(),
        0u32..24 * 4,
        1u32..24 * 4,
        0i64..72 * 60,
        1i64..240,
        1u32..3,
        1u8..128,
    )
        .prop_map(|(z, start_q, len_q, ahead, dur, par, days)| {
            let start = hm(start_q / 4, start_q % 4 * 15);
            let end_q = (start_q + len_q) % (24 * 4);
            Policy {
                tz: Tz::from_str(ZONES[z]).unwrap(),
                rule: WindowRule::Daily {
                    start,
                    end: hm(end_q / 4, end_q % 4 * 15),
                    weekdays: WeekdaySet(days),
                },
                announce_ahead: TimeDelta::minutes(ahead),
                max_parallel: par,
                expected_duration: TimeDelta::minutes(dur),
                blackouts: vec![],
            }
        })
        .prop_filter("start != end", |p| match p.rule {
            WindowRule::Daily { start, end, .. } => start != end,
            WindowRule::Cron { .. } => true,
        })
}

fn arb_now() -> impl Strategy<Value = DateTime<Utc>> {
    // 2026-01-01 .. 2028-12-31: covers three years of DST changes in every zone.
    (1_767_225_600i64..1_861_833_600).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap())
}

/// Whether a slot starting at `start` would be valid: inside one window, within the
/// parallelism limit.
fn valid(p: &Policy, windows: &[Window], taken: &[Slot], start: DateTime<Tz>) -> bool {
    let end = start + p.expected_duration;
    windows.iter().any(|w| w.contains_interval(start, end))
        && taken
            .iter()
            .filter(|s| s.start < end && start < s.end)
            .count()
            < p.max_parallel as usize
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn windows_follow_the_wall_clock(p in arb_policy(), now in arb_now()) {
        let WindowRule::Daily { start, end, weekdays } = p.rule else { unreachable!() };
        let ws: Vec<Window> = p.windows(now).take(40).collect();
        prop_assert!(!ws.is_empty());
        for pair in ws.windows(2) {
            prop_assert!(pair[0].end < pair[1].start, "windows overlap or touch: {pair:?}");
        }
        for w in &ws {
            prop_assert!(w.end > now);
            prop_assert!(w.start < w.end);
            // Away from a DST change the window shows exactly the policy's wall-clock times.
            let s_off = w.start.offset().fix();
            let e_off = w.end.offset().fix();
            let shifted = p.tz.offset_from_utc_datetime(&(w.start - TimeDelta::hours(3)).naive_utc()).fix() != s_off
                || p.tz.offset_from_utc_datetime(&(w.end + TimeDelta::hours(3)).naive_utc()).fix() != e_off;
            if !shifted && s_off == e_off {
                prop_assert_eq!(w.start.time(), start);
                prop_assert_eq!(w.end.time(), end);
                prop_assert!(weekdays.contains(w.start.weekday()));
            }
        }
    }

    #[test]
    fn the_slot_is_the_earliest_valid_one(
        p in arb_policy(),
        now in arb_now(),
        taken_offsets in proptest::collection::vec(0i64..4 * 24 * 60, 0..4),
    ) {
        let tz = p.tz;
        let earliest = (now + p.announce_ahead).with_timezone(&tz);
        // Other VMs' slots, placed the way the planner places them.
        let mut taken: Vec<Slot> = vec![];
        for off in taken_offsets {
            if let Some(s) = p.pick_slot(now + TimeDelta::minutes(off), alone(&taken)) {
                taken.push(s);
            }
        }
        let Some(slot) = p.pick_slot(now, alone(&taken)) else {
            // Nothing within the horizon: every window long enough is held by other slots
            // at every minute.
            let horizon = now + TimeDelta::days(HORIZON_DAYS);
            let windows: Vec<Window> = p.windows(now).take_while(|w| w.start < horizon).collect();
            for w in windows.iter().filter(|w| w.duration() >= p.expected_duration) {
                let mut c = ceil_minute_tz(w.start.max(earliest));
                while c + p.expected_duration <= w.end {
                    prop_assert!(!valid(&p, &windows, &taken, c), "{} was free", rfc3339(c));
                    c += TimeDelta::minutes(1);
                }
            }
            return Ok(());
        };
        prop_assert!(slot.start >= earliest);
        prop_assert_eq!(slot.end - slot.start, p.expected_duration);
        let windows: Vec<Window> = p.windows(now).take_while(|w| w.start <= slot.end).collect();
        prop_assert!(valid(&p, &windows, &taken, slot.start), "slot {slot} not valid");
        // No earlier whole-minute start is valid.
        let mut c = ceil_minute_tz(earliest);
        while c < slot.start {
            prop_assert!(!valid(&p, &windows, &taken, c), "{} would have been valid before {}", rfc3339(c), slot);
            // Skip ahead to the next window when c lies outside all windows: nothing there is valid.
            match windows.iter().find(|w| w.end > c) {
                Some(w) if w.start > c => c = ceil_minute_tz(w.start),
                Some(_) => c += TimeDelta::minutes(1),
                None => break,
            }
        }
    }
}

/// A freeze of `len` more days from `days` after the local date of `now` in `tz`.
fn blackout(tz: Tz, now: DateTime<Utc>, days: u64, len: u64) -> Blackout {
    let from = now.with_timezone(&tz).date_naive() + chrono::Days::new(days);
    Blackout {
        tz,
        from,
        to: from + chrono::Days::new(len),
        reason: "freeze".into(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Two projects of one host, in different zones, each with its own windows, blackouts and
    /// maxParallel, under a host-wide limit and a host-wide blackout: VMs of both ask for
    /// slots in turn, at different times.
    #[test]
    fn two_projects_keep_their_windows_blackouts_and_limits(
        a in arb_policy(),
        b in arb_policy(),
        now in arb_now(),
        host_max in 1u32..4,
        host_freeze in proptest::option::of((0u64..6, 0u64..3)),
        own_freezes in proptest::collection::vec((0usize..2, 0u64..6, 0u64..3), 0..3),
        requests in proptest::collection::vec((0usize..2, 0i64..3 * 24 * 60), 1..10),
    ) {
        prop_assume!(a.tz != b.tz);
        let host_tz = chrono_tz::Europe::Berlin;
        let mut projects = [a, b];
        for p in &mut projects {
            if let Some((days, len)) = host_freeze {
                p.blackouts.push(blackout(host_tz, now, days, len));
            }
        }
        for (i, days, len) in own_freezes {
            let tz = projects[i].tz;
            projects[i].blackouts.push(blackout(tz, now, days, len));
        }
        let mut held: Vec<(usize, Slot)> = vec![];
        for (i, off) in requests {
            let p = &projects[i];
            let at = now + TimeDelta::minutes(off);
            let own: Vec<Slot> = held.iter().filter(|(j, _)| *j == i).map(|x| x.1).collect();
            let host: Vec<Slot> = held.iter().map(|x| x.1).collect();
            let taken = Taken { project: &own, host: &host, host_max_parallel: host_max };
            let Some(slot) = p.pick_slot(at, taken) else { continue };
            prop_assert!(slot.start >= at + p.announce_ahead);
            // In one of its own project's windows, in its own zone.
            prop_assert_eq!(slot.start.timezone(), p.tz);
            let windows: Vec<Window> = p.windows(at).take_while(|w| w.start <= slot.end).collect();
            prop_assert!(
                windows.iter().any(|w| w.contains_interval(slot.start, slot.end)),
                "slot {} outside the windows of {}", slot, p.tz
            );
            // Never across one of its project's freezes, the host's included, each counted
            // in its own zone.
            for f in &p.blackouts {
                let from = start_of_day(f.tz, f.from);
                let to = start_of_day(f.tz, f.to + chrono::Days::new(1));
                prop_assert!(
                    slot.end <= from || slot.start >= to,
                    "slot {} crosses the freeze {}..={} ({})", slot, f.from, f.to, f.tz
                );
            }
            held.push((i, slot));
        }
        // Overlaps are greatest at some slot's start: check each.
        for (i, s) in &held {
            let at = s.start;
            let open = |t: &Slot| t.start <= at && at < t.end;
            let same = held.iter().filter(|(j, t)| j == i && open(t)).count();
            let all = held.iter().filter(|(_, t)| open(t)).count();
            prop_assert!(same <= projects[*i].max_parallel as usize, "{same} of project {i} at {}", rfc3339(at));
            prop_assert!(all <= host_max as usize, "{all} on the host at {}", rfc3339(at));
        }
    }
}
