//! The planner with several projects: slots in each project's windows and zone, limits per
//! project and host-wide, a VM moved between projects, deletion dates in the project's zone.

use serde_json::json;

use super::*;

/// A host in Berlin with a project in New York whose maintenance may run two at once, under
/// a host-wide limit of two.
fn two_projects(vms: serde_json::Value) -> Config {
    crate::config::parse(
        &json!({
            "timezone": "Europe/Berlin",
            "contacts": ["ops@example.com"],
            "maintenance": { "maxParallel": 2 },
            "projects": {
                "shop": {
                    "timezone": "America/New_York",
                    "contacts": ["it@shop.example"],
                    "authorizedGroup": "shop-admins",
                    "maintenance": { "window": "01:00-04:00", "maxParallel": 2 }
                },
                "blog": { "maintenance": { "maxParallel": 1 } }
            },
            "vms": vms
        })
        .to_string(),
    )
    .unwrap()
    .config
}

fn in_project(project: &str, cores: u32) -> serde_json::Value {
    json!({ "cores": cores, "memoryMiB": 2048, "diskGiB": 30, "project": project })
}

fn scheduled(p: &Plan) -> Vec<String> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::ScheduleMaintenance {
                vm, project, slot, ..
            } => Some(format!("{vm} {project} {slot}")),
            _ => None,
        })
        .collect()
}

#[test]
fn each_project_gets_slots_in_its_own_windows_and_zone() {
    let c = two_projects(json!({
        "web": vm(4, 2048, 30),
        "shop-a": in_project("shop", 4),
        "shop-b": in_project("shop", 4),
        "shop-c": in_project("shop", 4),
    }));
    let mut s = State::default();
    for name in ["web", "shop-a", "shop-b", "shop-c"] {
        running(&mut s, name, res(2, 2048, 30));
    }
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    assert_eq!(
        scheduled(&p),
        [
            // New York's 01:00-04:00 (a day from 04:00 there, the night after next), two at
            // once: the third waits for the first two.
            "shop-a shop 2026-12-02T01:00:00-05:00 – 2026-12-02T01:15:00-05:00",
            "shop-b shop 2026-12-02T01:00:00-05:00 – 2026-12-02T01:15:00-05:00",
            "shop-c shop 2026-12-02T01:15:00-05:00 – 2026-12-02T01:30:00-05:00",
            "web default 2026-12-01T22:00:00+01:00 – 2026-12-01T22:15:00+01:00",
        ]
    );
    let pending: Vec<String> = p
        .pending
        .iter()
        .map(|x| format!("{} {} {}", x.vm, x.project, rfc3339(x.announced_at)))
        .collect();
    assert_eq!(
        pending,
        [
            "shop-a shop 2026-11-30T04:00:00-05:00",
            "shop-b shop 2026-11-30T04:00:00-05:00",
            "shop-c shop 2026-11-30T04:00:00-05:00",
            "web default 2026-11-30T10:00:00+01:00",
        ]
    );
}

#[test]
fn the_host_wide_limit_spreads_projects_that_share_a_night() {
    // blog and the default project share Berlin's nights; the host allows two at once and
    // blog one of its own.
    let c = two_projects(json!({
        "blog-a": in_project("blog", 4),
        "blog-b": in_project("blog", 4),
        "web-a": vm(4, 2048, 30),
        "web-b": vm(4, 2048, 30),
    }));
    let mut s = State::default();
    for name in ["blog-a", "blog-b", "web-a", "web-b"] {
        running(&mut s, name, res(2, 2048, 30));
    }
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    assert_eq!(
        scheduled(&p),
        [
            "blog-a blog 2026-12-01T22:00:00+01:00 – 2026-12-01T22:15:00+01:00",
            // blog's own limit of one.
            "blog-b blog 2026-12-01T22:15:00+01:00 – 2026-12-01T22:30:00+01:00",
            // The default project's limit is two, the host's too: blog-a holds one at 22:00.
            "web-a default 2026-12-01T22:00:00+01:00 – 2026-12-01T22:15:00+01:00",
            "web-b default 2026-12-01T22:15:00+01:00 – 2026-12-01T22:30:00+01:00",
        ]
    );
}

#[test]
fn a_vm_moved_to_another_project_is_cancelled_for_the_old_and_planned_in_the_new() {
    let c = two_projects(json!({ "web": in_project("shop", 4) }));
    let mut s = State::default();
    running(&mut s, "web", res(2, 2048, 30));
    // Announced in the default project (Berlin) before the move.
    s.maintenances.insert(
        n("web"),
        Maintenance {
            reasons: vec![Reason::PendingResources {
                from: res(2, 2048, 30),
                to: res(4, 2048, 30),
            }],
            slot_start: t("2026-12-01T22:00:00+01:00"),
            slot_end: t("2026-12-01T22:15:00+01:00"),
            announced_at: t("2026-11-30T09:00:00+01:00"),
            notice: None,
            delivered_at: None,
            project: ProjectName::default(),
        },
    );
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    let [
        Action::CancelMaintenance { vm, reason },
        Action::ScheduleMaintenance {
            project,
            slot,
            replaces: None,
            ..
        },
    ] = &p.actions[..]
    else {
        panic!("{:?}", p.actions)
    };
    assert_eq!(vm, &n("web"));
    assert_eq!(
        reason,
        "web moved from project default to project shop; its maintenance is planned and \
         announced there"
    );
    assert_eq!(project.as_str(), "shop");
    assert_eq!(
        slot.to_string(),
        "2026-12-02T01:00:00-05:00 – 2026-12-02T01:15:00-05:00"
    );
    // Once moved it is kept like any other.
    let mut s2 = s.clone();
    s2.maintenances.get_mut(&n("web")).unwrap().project = "shop".parse().unwrap();
    s2.maintenances.get_mut(&n("web")).unwrap().slot_start = slot.start.with_timezone(&Utc);
    s2.maintenances.get_mut(&n("web")).unwrap().slot_end = slot.end.with_timezone(&Utc);
    let p = plan(&c, &Observed::as_recorded(&s2), &s2, t(NOW));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
}

#[test]
fn deletion_dates_are_midnights_in_the_projects_zone() {
    let c = two_projects(json!({
        "web": { "cores": 2, "memoryMiB": 2048, "diskGiB": 30, "project": "shop", "deleteAt": "2026-12-10" }
    }));
    let mut s = State::default();
    running(&mut s, "web", res(2, 2048, 30));
    let p = plan(&c, &Observed::as_recorded(&s), &s, t(NOW));
    let shutdown = &p.deletions[0].stages[1];
    assert_eq!(shutdown.stage, Stage::Shutdown);
    assert_eq!(rfc3339(shutdown.at), "2026-12-10T00:00:00-05:00");
    // A VM removed from the configuration is deleted in the project it was recorded in: at
    // 02:00 on 1 December in Berlin it is still 30 November in New York.
    let c = two_projects(json!({}));
    let mut s = State::default();
    running(&mut s, "old", res(2, 2048, 30));
    s.projects.insert(n("old"), "shop".parse().unwrap());
    let now = t("2026-12-01T02:00:00+01:00");
    let p = plan(&c, &Observed::as_recorded(&s), &s, now);
    assert_eq!(
        p.actions[0],
        Action::ScheduleDeletion {
            vm: n("old"),
            date: "2026-12-01".parse().unwrap(),
            source: DeletionSource::Removed
        }
    );
    assert_eq!(
        rfc3339(p.deletions[0].stages[1].at),
        "2026-12-01T00:00:00-05:00"
    );
    // In the default project (Berlin) the next midnight is that of 2 December.
    s.projects.clear();
    let p = plan(&c, &Observed::as_recorded(&s), &s, now);
    assert_eq!(
        p.actions[0],
        Action::ScheduleDeletion {
            vm: n("old"),
            date: "2026-12-02".parse().unwrap(),
            source: DeletionSource::Removed
        }
    );
}
