//! The systemd edge against a real systemd manager: transient services and timers, one-call
//! observation and signal-driven events, including stops that vmkeeper did not make.
//!
//! Every test names its units after itself and this process, so tests run in parallel
//! against one manager.

use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use vmkeeper::exec::systemd::{
    ActiveState, JobResult, KillWhom, MainExit, PropertyValue, Subscription, Systemd, SystemdEvent,
    TimerTrigger, TransientService, TransientTimer,
};

mod support;

use support::harness;

/// Upper bound for any single wait on systemd in these tests.
const WAIT: Duration = Duration::from_secs(20);

async fn connect() -> Systemd {
    Systemd::connect(Some(&harness().dbus_address))
        .await
        .expect("connect to the harness systemd")
        .with_job_timeout(WAIT)
}

/// A unit name unique to this test and this test process.
fn unit(test: &str, suffix: &str) -> String {
    format!("vmkeeper-vm-t{}-{test}.{suffix}", std::process::id())
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn sleeper(name: &str) -> TransientService {
    let mut service =
        TransientService::new(name, "vmkeeper test sleeper", argv(&["/bin/sleep", "300"]));
    service
        .environment
        .push(("VMKEEPER_VM".into(), name.into()));
    service.stop.timeout = Duration::from_secs(5);
    service
}

/// Waits for the first event matching `wanted`, returning it and every event seen before.
async fn wait_event(
    events: &mut Subscription,
    what: &str,
    wanted: impl Fn(&SystemdEvent) -> bool,
) -> Vec<SystemdEvent> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) => {
                let done = wanted(&event);
                seen.push(event);
                if done {
                    return seen;
                }
            }
            Ok(None) => panic!("subscription ended while waiting for {what}; saw {seen:?}"),
            Err(_) => panic!("no {what} within {WAIT:?}; saw {seen:?}"),
        }
    }
}

fn state_change(unit: &str, state: ActiveState) -> impl Fn(&SystemdEvent) -> bool {
    let unit = unit.to_owned();
    move |e| {
        matches!(e, SystemdEvent::UnitStateChanged { unit: u, active_state, .. }
            if *u == unit && *active_state == state)
    }
}

/// The unit stopped: an `inactive` state change, or its removal. systemd may collect a stopped
/// transient unit before it emits the `inactive` change, so either one counts.
fn stopped(unit: &str) -> impl Fn(&SystemdEvent) -> bool {
    let inactive = state_change(unit, ActiveState::Inactive);
    let unit = unit.to_owned();
    move |e| inactive(e) || matches!(e, SystemdEvent::UnitRemoved { unit: u } if *u == unit)
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn started_service_is_listed_active_with_its_main_pid() {
    let sd = connect().await;
    let name = unit("listed", "service");
    assert_eq!(
        sd.start_service(&sleeper(&name)).await.expect("start"),
        JobResult::Done
    );

    let units = sd.list_units(&[&name]).await.expect("list");
    assert_eq!(units.len(), 1, "{units:?}");
    assert_eq!(units[0].name, name);
    assert_eq!(units[0].load_state, "loaded");
    assert_eq!(units[0].active_state, ActiveState::Active);
    assert_eq!(units[0].sub_state, "running");
    assert_eq!(units[0].description, "vmkeeper test sleeper");

    let details = sd.service_details(&name).await.expect("details");
    assert_eq!(details.active_state, ActiveState::Active);
    assert_eq!(details.main_exit, MainExit::None);
    assert!(details.invocation_id.is_some(), "{details:?}");
    assert!(
        details
            .active_enter
            .is_some_and(|t| (Utc::now() - t).num_seconds() < 60)
    );
    // The pid is in the manager's pid namespace: look at it from there.
    let pid = details.main_pid.expect("a running service has a main pid");
    let cmdline = harness()
        .inside("cat", [&format!("/proc/{pid}/cmdline")])
        .output()
        .expect("read the main process's command line");
    assert_eq!(stdout(&cmdline), "/bin/sleep\u{0}300\u{0}");
    let environ = harness()
        .inside("cat", [&format!("/proc/{pid}/environ")])
        .output()
        .expect("read the main process's environment");
    assert!(stdout(&environ).contains(&format!("VMKEEPER_VM={name}")));

    assert_eq!(sd.stop_unit(&name).await.expect("stop"), JobResult::Done);
    assert!(
        sd.list_units(&[&name]).await.expect("list").is_empty(),
        "stopped unit is collected"
    );
}

#[tokio::test]
async fn own_stop_is_seen_through_signals() {
    let sd = connect().await;
    let name = unit("ownstop", "service");
    let mut events = sd.subscribe(&[&name]).await.expect("subscribe");
    sd.start_service(&sleeper(&name)).await.expect("start");
    wait_event(
        &mut events,
        "active",
        state_change(&name, ActiveState::Active),
    )
    .await;

    assert_eq!(sd.stop_unit(&name).await.expect("stop"), JobResult::Done);
    let seen = wait_event(
        &mut events,
        "unit removal",
        |e| matches!(e, SystemdEvent::UnitRemoved { unit } if *unit == name),
    )
    .await;
    assert!(
        seen.iter().any(|e| matches!(e, SystemdEvent::JobRemoved { unit, result: JobResult::Done, .. } if *unit == name)),
        "{seen:?}"
    );
}

#[tokio::test]
async fn outside_systemctl_stop_is_seen_through_signals() {
    let sd = connect().await;
    let name = unit("outside", "service");
    let mut events = sd.subscribe(&[&name]).await.expect("subscribe");
    sd.start_service(&sleeper(&name)).await.expect("start");
    wait_event(
        &mut events,
        "active",
        state_change(&name, ActiveState::Active),
    )
    .await;

    let out = harness().systemctl(&["stop", &name]);
    assert!(
        out.status.success(),
        "systemctl stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_event(&mut events, "inactive", stopped(&name)).await;
    assert!(sd.list_units(&[&name]).await.expect("list").is_empty());
}

#[tokio::test]
async fn events_of_other_units_are_filtered_out() {
    let sd = connect().await;
    let mine = unit("filter-mine", "service");
    let other = unit("filter-other", "service");
    let mut events = sd.subscribe(&[&mine]).await.expect("subscribe");
    sd.start_service(&sleeper(&other))
        .await
        .expect("start other");
    sd.start_service(&sleeper(&mine)).await.expect("start mine");
    let seen = wait_event(
        &mut events,
        "active",
        state_change(&mine, ActiveState::Active),
    )
    .await;
    sd.stop_unit(&other).await.expect("stop other");
    sd.stop_unit(&mine).await.expect("stop mine");
    let more = wait_event(&mut events, "inactive", stopped(&mine)).await;
    for event in seen.iter().chain(&more) {
        let unit = match event {
            SystemdEvent::UnitStateChanged { unit, .. }
            | SystemdEvent::JobRemoved { unit, .. }
            | SystemdEvent::UnitNew { unit }
            | SystemdEvent::UnitRemoved { unit } => unit,
            SystemdEvent::Lagged => panic!("lagged on a quiet manager"),
        };
        assert_eq!(*unit, mine, "{event:?}");
    }
}

#[tokio::test]
async fn failing_process_leaves_a_failed_unit_with_its_exit_status() {
    let sd = connect().await;
    let name = unit("fails", "service");
    let mut events = sd.subscribe(&[&name]).await.expect("subscribe");
    let service = TransientService::new(
        &name,
        "exits 7",
        argv(&["/bin/sh", "-c", "sleep 0.2; exit 7"]),
    );
    assert_eq!(
        sd.start_service(&service).await.expect("start"),
        JobResult::Done
    );
    wait_event(
        &mut events,
        "failed",
        state_change(&name, ActiveState::Failed),
    )
    .await;

    let units = sd.list_units(&[&name]).await.expect("list");
    assert_eq!(units.len(), 1, "a failed unit stays loaded: {units:?}");
    assert_eq!(units[0].active_state, ActiveState::Failed);
    let details = sd.service_details(&name).await.expect("details");
    assert_eq!(details.main_exit, MainExit::Exited(7));
    assert_eq!(details.result, "exit-code");
    assert_eq!(details.main_pid, None);
    assert_eq!(details.n_restarts, 0, "systemd must not restart a VM unit");
    assert!(details.inactive_enter.is_some());

    let again = sd
        .start_service(&service)
        .await
        .expect_err("the name is still taken");
    assert!(again.is_unit_exists(), "{again:?}");
    sd.reset_failed(&name).await.expect("reset-failed");
    wait_event(
        &mut events,
        "removal",
        |e| matches!(e, SystemdEvent::UnitRemoved { unit } if *unit == name),
    )
    .await;
    let gone = sd
        .service_details(&name)
        .await
        .expect_err("collected after reset-failed");
    assert!(gone.is_no_such_unit(), "{gone:?}");
    assert_eq!(
        sd.start_service(&service).await.expect("start again"),
        JobResult::Done
    );
    wait_event(
        &mut events,
        "failed again",
        state_change(&name, ActiveState::Failed),
    )
    .await;
    sd.reset_failed(&name).await.expect("reset-failed");
}

#[tokio::test]
async fn killed_main_process_is_reported_with_its_signal() {
    let sd = connect().await;
    let name = unit("killed", "service");
    let mut events = sd.subscribe(&[&name]).await.expect("subscribe");
    sd.start_service(&sleeper(&name)).await.expect("start");
    sd.kill_unit(&name, KillWhom::Main, libc::SIGKILL)
        .await
        .expect("kill");
    wait_event(
        &mut events,
        "failed",
        state_change(&name, ActiveState::Failed),
    )
    .await;
    let details = sd.service_details(&name).await.expect("details");
    assert_eq!(details.main_exit, MainExit::Killed(libc::SIGKILL));
    assert_eq!(details.result, "signal");
    sd.reset_failed(&name).await.expect("reset-failed");
}

#[tokio::test]
async fn extra_properties_of_every_value_type_take_effect() {
    let sd = connect().await;
    let name = unit("hardened", "service");
    let dir = harness().scratch("hardened");
    let dir = dir.to_str().expect("utf-8 path").to_owned();
    let mut service = sleeper(&name);
    service.working_directory = Some(dir.clone().into());
    let strs = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    service.properties = vec![
        ("ProtectSystem".into(), PropertyValue::Str("strict".into())),
        ("ReadWritePaths".into(), PropertyValue::Strs(strs(&[&dir]))),
        ("NoNewPrivileges".into(), PropertyValue::Bool(true)),
        ("LimitNOFILE".into(), PropertyValue::U64(4096)),
        ("Nice".into(), PropertyValue::I32(5)),
        (
            "DeviceAllow".into(),
            PropertyValue::Pairs(vec![("/dev/null".into(), "rw".into())]),
        ),
        (
            "SystemCallFilter".into(),
            PropertyValue::FlaggedStrs(true, strs(&["@system-service"])),
        ),
        (
            "RestrictAddressFamilies".into(),
            PropertyValue::FlaggedStrs(true, strs(&["AF_UNIX", "AF_INET"])),
        ),
    ];
    assert_eq!(
        sd.start_service(&service).await.expect("start"),
        JobResult::Done
    );

    let keys = "ProtectSystem,ReadWritePaths,NoNewPrivileges,LimitNOFILE,Nice,DeviceAllow,\
                SystemCallFilter,RestrictAddressFamilies,WorkingDirectory,KillMode,Restart,\
                TimeoutStopUSec,SendSIGKILL";
    let shown = stdout(&harness().systemctl(&["show", "-p", keys, &name]));
    for expected in [
        "ProtectSystem=strict".to_owned(),
        format!("ReadWritePaths={dir}"),
        "NoNewPrivileges=yes".to_owned(),
        "LimitNOFILE=4096".to_owned(),
        "Nice=5".to_owned(),
        "DeviceAllow=/dev/null rw".to_owned(),
        "RestrictAddressFamilies=AF_INET AF_UNIX".to_owned(),
        format!("WorkingDirectory={dir}"),
        "KillMode=mixed".to_owned(),
        "Restart=no".to_owned(),
        "TimeoutStopUSec=5s".to_owned(),
        "SendSIGKILL=yes".to_owned(),
    ] {
        assert!(
            shown.lines().any(|l| l == expected),
            "no {expected} in:\n{shown}"
        );
    }
    let filter = shown
        .lines()
        .find(|l| l.starts_with("SystemCallFilter="))
        .expect("a filter");
    assert!(
        filter.contains("openat") && !filter.starts_with("SystemCallFilter=~"),
        "{filter}"
    );
    assert_eq!(sd.stop_unit(&name).await.expect("stop"), JobResult::Done);
}

#[tokio::test]
async fn unexecutable_program_fails_the_start_job() {
    let sd = connect().await;
    let name = unit("noexec", "service");
    let service = TransientService::new(&name, "missing program", argv(&["/nonexistent/qemu"]));
    assert_eq!(
        sd.start_service(&service).await.expect("start call"),
        JobResult::Failed
    );
    let details = sd.service_details(&name).await.expect("details");
    assert_eq!(details.active_state, ActiveState::Failed);
    assert_eq!(details.result, "exit-code");
    sd.reset_failed(&name).await.expect("reset-failed");
}

#[tokio::test]
async fn missing_unit_is_recognisable() {
    let sd = connect().await;
    let name = unit("missing", "service");
    let err = sd.stop_unit(&name).await.expect_err("nothing to stop");
    assert!(err.is_no_such_unit(), "{err:?}");
    assert_eq!(err.to_string(), format!("Cannot stop {name}"));
}

#[tokio::test]
async fn future_calendar_timer_is_listed_with_its_next_elapse() {
    let sd = connect().await;
    let name = unit("future", "timer").replace("vmkeeper-vm-", "vmkeeper-maint-");
    let at = DateTime::from_timestamp(Utc::now().timestamp(), 0).expect("now") + TimeDelta::days(3);
    let timer = TransientTimer {
        name: name.clone(),
        description: "vmkeeper test maintenance".into(),
        trigger: TimerTrigger::At(at),
        argv: argv(&["/bin/true"]),
        environment: Vec::new(),
    };
    assert_eq!(
        sd.start_timer(&timer).await.expect("start timer"),
        JobResult::Done
    );

    let timers = sd.list_timers(&[&name]).await.expect("list timers");
    assert_eq!(timers.len(), 1, "{timers:?}");
    assert_eq!(timers[0].name, name);
    assert_eq!(timers[0].active_state, ActiveState::Active);
    assert_eq!(timers[0].unit, timer.service_name());
    assert_eq!(timers[0].next_elapse, Some(at));
    assert_eq!(timers[0].last_trigger, None);

    let out = harness().systemctl(&["list-timers", "--all", "--no-pager"]);
    let listing = stdout(&out);
    let line = listing
        .lines()
        .find(|l| l.contains(&name))
        .unwrap_or_else(|| panic!("{name} not in systemctl list-timers:\n{listing}"));
    assert!(line.contains(&timer.service_name()), "{line}");

    assert_eq!(
        sd.stop_unit(&name).await.expect("stop timer"),
        JobResult::Done
    );
    assert!(
        sd.list_timers(&[&name])
            .await
            .expect("list timers")
            .is_empty()
    );
}

#[tokio::test]
async fn started_timer_runs_its_service() {
    let sd = connect().await;
    let name = unit("fires", "timer").replace("vmkeeper-vm-", "vmkeeper-delete-");
    let dir = harness().scratch("timer-fires");
    let marker = dir.join("fired");
    let timer = TransientTimer {
        name: name.clone(),
        description: "vmkeeper test deletion stage".into(),
        trigger: TimerTrigger::AfterStart(Duration::from_secs(1)),
        argv: argv(&["/bin/sh", "-c", "echo \"$STAGE\" > \"$MARKER\""]),
        environment: vec![
            ("STAGE".into(), "trash".into()),
            ("MARKER".into(), marker.to_str().expect("utf-8 path").into()),
        ],
    };
    let service = timer.service_name();
    let mut events = sd.subscribe(&[&service]).await.expect("subscribe");
    sd.start_timer(&timer).await.expect("start timer");

    let seen = wait_event(
        &mut events,
        "the service's job",
        |e| matches!(e, SystemdEvent::JobRemoved { unit, .. } if *unit == service),
    )
    .await;
    assert!(
        seen.iter().any(|e| matches!(
            e,
            SystemdEvent::JobRemoved {
                result: JobResult::Done,
                ..
            }
        )),
        "{seen:?}"
    );
    assert_eq!(read(&marker).trim(), "trash");
    wait_gone(&sd, &name).await;
}

#[tokio::test]
async fn past_calendar_timer_elapses_without_running() {
    // systemd documents nothing for a one-off OnCalendar that already passed; it drops the
    // timer without running its service, so the daemon must run overdue stages itself.
    let sd = connect().await;
    let name = unit("past", "timer").replace("vmkeeper-vm-", "vmkeeper-delete-");
    let dir = harness().scratch("timer-past");
    let marker = dir.join("fired");
    let timer = TransientTimer {
        name: name.clone(),
        description: "vmkeeper test overdue stage".into(),
        trigger: TimerTrigger::At(Utc::now() - TimeDelta::hours(1)),
        argv: argv(&["/bin/sh", "-c", &format!("touch {}", marker.display())]),
        environment: Vec::new(),
    };
    sd.start_timer(&timer).await.expect("start timer");
    wait_gone(&sd, &name).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !marker.exists(),
        "an overdue calendar timer ran its service"
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

async fn wait_gone(sd: &Systemd, unit: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !sd.list_units(&[unit]).await.expect("list").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{unit} still loaded after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
