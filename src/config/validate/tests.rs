// Test helpers take `json!` literals by value so the cases read as data.
#![allow(clippy::needless_pass_by_value)]

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::maintenance::{WeekdaySet, WindowRule};

fn problems(doc: serde_json::Value) -> Vec<String> {
    match parse(&doc.to_string()) {
        Ok(c) => panic!(
            "expected problems, got a valid config with warnings {:?}",
            c.warnings
        ),
        Err(p) => p.iter().map(ToString::to_string).collect(),
    }
}

fn vm(extra: serde_json::Value) -> serde_json::Value {
    let mut base = json!({ "cores": 2, "memoryMiB": 2048, "diskGiB": 30 });
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    base
}

#[test]
fn an_empty_document_gets_every_default() {
    let c = parse("{}").unwrap().config;
    assert_eq!(c.timezone, chrono_tz::Europe::Berlin);
    assert_eq!(c.default_project().authorized_group.as_str(), "sudo-srv");
    assert_eq!(c.max_parallel, 1);
    assert_eq!(c.operator_group, None);
    assert_eq!(
        c.default_project().maintenance.announce_ahead,
        TimeDelta::hours(24)
    );
    assert_eq!(c.default_project().maintenance.max_parallel, 1);
    assert_eq!(c.ceph.pool, "rbd");
    assert_eq!(c.qemu.accel, Accel::Kvm);
    assert!(matches!(
        c.default_project().maintenance.rule,
        WindowRule::Daily {
            weekdays: WeekdaySet::ALL,
            ..
        }
    ));
}

#[test]
fn a_full_vm_validates() {
    let c = parse(
        &json!({ "vms": { "web01": vm(json!({
            "online": false, "deleteAt": "2027-01-15", "ipAddresses": ["192.0.2.10", "2001:db8::1"],
            "image": { "name": "debian-12", "snapshot": "base" },
            "network": { "bridge": "br0", "macAddress": "52:54:00:AB:CD:EF" },
            "boot": { "kernel": "/boot/vmlinuz", "append": "console=ttyS0" }
        })) } })
        .to_string(),
    )
    .unwrap()
    .config;
    let web = &c.vms[&"web01".parse().unwrap()];
    assert_eq!(web.name.as_str(), "web01");
    assert!(!web.online);
    assert_eq!(web.ip_addresses.len(), 2);
    assert_eq!(
        web.network.as_ref().unwrap().mac_address,
        "52:54:00:ab:cd:ef"
    );
}

#[test]
fn every_problem_is_reported_with_its_path_and_rule() {
    let got = problems(json!({
        "timezone": "Europe/Berln",
        "vms": {
            "web01": { "cores": 13, "memoryMiB": 512, "diskGiB": 20 },
            "web02": vm(json!({ "corse": 2 })),
            "Bad_Name": vm(json!({})),
            "db01": vm(json!({ "memoryMiB": 98304 })),
        }
    }));
    assert_eq!(
        got,
        [
            "timezone: \"Europe/Berln\" is not a known IANA time zone",
            "vms.Bad_Name: name must start with a letter a-z",
            "vms.db01.memoryMiB: 98304 is above this VM's limit of 65536 MiB (64 GiB); only an operator can raise memoryLimitMiB (up to 131072)",
            "vms.web01.cores: 13 is outside 1..=12",
            "vms.web01.memoryMiB: 512 is outside 1024..=131072",
            "vms.web01.diskGiB: 20 is outside 30..=1048576",
            "vms.web02.corse: unknown key (did you mean `cores`?)",
        ]
    );
}

#[test]
fn memory_above_64_gib_needs_the_operator_limit() {
    let ok = parse(
        &json!({ "vms": { "db01": vm(json!({ "memoryMiB": 98304, "memoryLimitMiB": 131072 })) } })
            .to_string(),
    );
    assert!(ok.is_ok());
    let got = problems(
        json!({ "vms": { "db01": vm(json!({ "memoryMiB": 131073, "memoryLimitMiB": 262144 })) } }),
    );
    assert_eq!(
        got,
        [
            "vms.db01.memoryLimitMiB: 262144 is outside 65536..=131072",
            "vms.db01.memoryMiB: 131073 is outside 1024..=131072",
        ]
    );
}

#[test]
fn huge_disks_need_acknowledgement_and_always_warn() {
    let got = problems(json!({ "vms": { "big": vm(json!({ "diskGiB": 10240 })) } }));
    assert_eq!(
        got,
        [
            "vms.big.diskGiB: 10240 GiB is 10 TiB or more and needs allowHugeDisk = true from an operator (object storage is recommended instead)"
        ]
    );
    let c = parse(
        &json!({ "vms": { "big": vm(json!({ "diskGiB": 10240, "allowHugeDisk": true })) } })
            .to_string(),
    )
    .unwrap();
    assert_eq!(
        c.warnings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        [
            "vms.big.diskGiB: 10240 GiB is 10 TiB or more: object storage is recommended for data of this size"
        ]
    );
    let c =
        parse(&json!({ "vms": { "big": vm(json!({ "diskGiB": 10239 })) } }).to_string()).unwrap();
    assert!(c.warnings.is_empty());
}

#[test]
fn addresses_are_unique_across_vms() {
    let got = problems(json!({ "vms": {
        "a": vm(json!({ "ipAddresses": ["192.0.2.1", "192.0.2.1"] })),
        "b": vm(json!({ "ipAddresses": ["192.0.2.2", "x"], "network": { "bridge": "br0", "macAddress": "52:54:00:00:00:01" } })),
        "c": vm(json!({ "ipAddresses": ["192.0.2.2"], "network": { "bridge": "br0", "macAddress": "52:54:00:00:00:01" } })),
    } }));
    assert_eq!(
        got,
        [
            "vms.a.ipAddresses[1]: 192.0.2.1 is listed twice",
            "vms.b.ipAddresses[1]: \"x\" is not an IP address",
            // Claims of invalid VMs still count: b is invalid, c collides with it.
            "vms.c.ipAddresses: 192.0.2.2 is also assigned to b; addresses must be unique",
            "vms.c.network.macAddress: 52:54:00:00:00:01 is also used by b; MAC addresses must be unique",
        ]
    );
    let got = problems(json!({ "vms": {
        "b": vm(json!({ "ipAddresses": ["192.0.2.2"], "network": { "bridge": "br0", "macAddress": "52:54:00:00:00:01" } })),
        "c": vm(json!({ "ipAddresses": ["192.0.2.2"], "network": { "bridge": "br0", "macAddress": "52:54:00:00:00:01" } })),
    } }));
    assert_eq!(
        got,
        [
            "vms.c.ipAddresses: 192.0.2.2 is also assigned to b; addresses must be unique",
            "vms.c.network.macAddress: 52:54:00:00:00:01 is also used by b; MAC addresses must be unique",
        ]
    );
}

#[test]
fn maintenance_rules() {
    let got = problems(json!({ "maintenance": {
        "window": "22:00-22:00", "weekdays": ["mon", "funday"], "announceAhead": "soon",
        "maxParallel": 0, "expectedDuration": "30s", "blackouts": [{ "from": "2026-12-24", "to": "2026-12-20" }],
        "extra": 1
    } }));
    assert_eq!(
        got,
        [
            "maintenance.extra: unknown key (known keys: window, weekdays, schedule, announceAhead, maxParallel, expectedDuration, blackouts)",
            "maintenance.window: \"22:00-22:00\" has no length: start and end are equal",
            "maintenance.weekdays[1]: \"funday\" is not one of mon, tue, wed, thu, fri, sat, sun",
            "maintenance.announceAhead: \"soon\" is not a duration such as 24h, 90m or 1h 30m",
            "maintenance.maxParallel: 0 is outside 1..=1000",
            "maintenance.expectedDuration: 30s is shorter than the minimum of 1m",
            "maintenance.blackouts[0].to: 2026-12-20 is before from (2026-12-24)",
        ]
    );
    let got =
        problems(json!({ "maintenance": { "window": "01:00-03:00", "expectedDuration": "3h" } }));
    assert_eq!(
        got,
        ["maintenance.expectedDuration: 3h does not fit into a window of 2h"]
    );
    let got = problems(json!({ "maintenance": { "window": "1am-3am" } }));
    assert_eq!(
        got,
        ["maintenance.window: \"1am\" is not a time of the form HH:MM; write \"HH:MM-HH:MM\""]
    );
}

#[test]
fn a_cron_schedule_replaces_the_daily_window() {
    let c = parse(
        &json!({ "maintenance": { "schedule": { "cron": "0 0 22 1-7 * Sun", "length": "6h" } } })
            .to_string(),
    )
    .unwrap();
    assert!(matches!(
        c.config.default_project().maintenance.rule,
        WindowRule::Cron { .. }
    ));
    let got = problems(
        json!({ "maintenance": { "window": "22:00-05:00", "schedule": { "cron": "nope", "length": "6h" } } }),
    );
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0],
        "maintenance.window: cannot be combined with maintenance.schedule; use one"
    );
    assert!(
        got[1].starts_with("maintenance.schedule.cron: not a cron expression"),
        "{}",
        got[1]
    );
}

#[test]
fn type_errors_and_malformed_json_name_their_place() {
    let got = problems(
        json!({ "vms": { "a": vm(json!({ "cores": "two" })), "b": vm(json!({ "cores": 0 })) } }),
    );
    assert_eq!(
        got,
        [
            "vms.a.cores: invalid type: string \"two\", expected i64",
            "vms.b.cores: 0 is outside 1..=12"
        ]
    );
    let err = parse("{\n  \"vms\": {\n    \"a\": { \"cores\": 2,, }\n  }\n}").unwrap_err();
    assert_eq!(
        err[0].to_string(),
        "malformed JSON at line 3, column 23: key must be a string"
    );
    let err = parse("[]").unwrap_err();
    assert_eq!(
        err[0].to_string(),
        "the configuration must be a JSON object"
    );
    let got = problems(
        json!({ "contacts": ["ops@example.com", "not an address"], "notifyCommand": "hook.sh", "authorizedGroup": "Sudo Srv", "qemu": { "accel": "hvf" } }),
    );
    assert_eq!(
        got,
        [
            "contacts[1]: \"not an address\" is not an e-mail address",
            "notifyCommand: \"hook.sh\" must be an absolute path",
            "authorizedGroup: \"Sudo Srv\" is not a group name (a-z, 0-9, '_', '-', at most 32, starting with a letter or '_')",
            "qemu.accel: \"hvf\" is not one of kvm, tcg",
        ]
    );
}

#[test]
fn qemu_gets_its_own_user_and_ceph_client() {
    let c = parse("{}").unwrap().config;
    assert_eq!(c.qemu.user, "vmkeeper-qemu");
    assert_eq!(c.ceph.qemu_client_id, "vmkeeper-qemu");
    assert_eq!(c.ceph.qemu_key_file, None);
    let p = problems(json!({
        "qemu": { "user": "root" },
        "ceph": { "clientId": "vmk", "qemuClientId": "vmk", "qemuKeyFile": "relative.key" },
    }));
    assert_eq!(
        p,
        [
            "ceph.qemuClientId: \"vmk\" is the daemon's own client; QEMU gets a client of its own, limited to the pool",
            "ceph.qemuKeyFile: \"relative.key\" must be an absolute path",
            "qemu.user: QEMU never runs as root: name an unprivileged system user",
        ]
    );
}

#[test]
fn nothing_can_inject_a_qemu_option() {
    let p = problems(json!({
        "runtimeDir": "/run/vmk,server=off",
        "ceph": { "conf": "/etc/ceph/c=1.conf", "qemuKeyFile": "/k,format=raw" },
        "qemu": { "machine": "q35,accel=kvm" },
        "vms": {
            "web01": vm(json!({ "network": { "bridge": "br0,script=/x", "macAddress": "52:54:00:00:00:01" } })),
        },
    }));
    for path in [
        "runtimeDir",
        "ceph.conf",
        "ceph.qemuKeyFile",
        "qemu.machine",
        "vms.web01.network.bridge",
    ] {
        assert!(
            p.iter().any(|l| l.starts_with(&format!("{path}: "))),
            "{path} not refused: {p:#?}"
        );
    }
}

#[test]
fn two_vms_that_would_share_a_tap_device_are_refused() {
    let net = |mac: &str| vm(json!({ "network": { "bridge": "br0", "macAddress": mac } }));
    // Same first 6 characters and (by construction of this pair) the same 16-bit hash would
    // be needed; names that fit need no hash and never collide.
    assert!(
        parse(
            &json!({ "vms": { "web01": net("52:54:00:00:00:01"), "web02": net("52:54:00:00:00:02") } })
                .to_string()
        )
        .is_ok()
    );
    let names: Vec<String> = (0..20_000).map(|i| format!("customer-{i}")).collect();
    let mut seen = std::collections::BTreeMap::new();
    let pair = names
        .iter()
        .find_map(|n| {
            let tap = n.parse::<VmName>().unwrap().tap_name();
            seen.insert(tap, n.clone()).map(|first| (first, n.clone()))
        })
        .expect("16 bits of hash collide within 20000 names");
    let p = problems(json!({ "vms": {
        pair.0.clone(): net("52:54:00:00:00:01"),
        pair.1.clone(): net("52:54:00:00:00:02"),
    } }));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("would be the same as"), "{p:?}");
}

#[test]
fn metrics_and_alertmanager_are_off_by_default_and_checked_when_given() {
    let c = parse("{}").unwrap().config;
    assert_eq!(c.metrics_listen, None);
    assert_eq!(c.alertmanager, None);
    let c = parse(
        &json!({
            "metrics": { "listen": "[::1]:9848" },
            "monitoring": { "alertmanager": { "url": "http://am.example.net:9093/alertmanager/" } }
        })
        .to_string(),
    )
    .unwrap()
    .config;
    assert_eq!(c.metrics_listen, Some("[::1]:9848".parse().unwrap()));
    let am = c.alertmanager.unwrap();
    assert_eq!(
        (am.url.as_str(), am.host.as_str(), am.port, am.path.as_str()),
        (
            "http://am.example.net:9093/alertmanager",
            "am.example.net",
            9093,
            "/alertmanager"
        )
    );
    let am =
        parse(&json!({ "monitoring": { "alertmanager": { "url": "http://[::1]" } } }).to_string())
            .unwrap()
            .config
            .alertmanager
            .unwrap();
    assert_eq!(
        (am.host.as_str(), am.port, am.path.as_str()),
        ("::1", 80, "")
    );

    assert_eq!(
        problems(json!({
            "metrics": { "listen": "localhost:9848", "port": 1 },
            "monitoring": { "alertmanager": { "url": "https://am:9093" }, "prometheus": {} }
        })),
        [
            "metrics.port: unknown key (known keys: listen)",
            "metrics.listen: \"localhost:9848\" is not an address and port such as \"127.0.0.1:9848\" or \"[::1]:9848\" (host names are not resolved)",
            "monitoring.prometheus: unknown key (known keys: alertmanager)",
            "monitoring.alertmanager.url: \"https://am:9093\" uses https, which vmkeeper does not speak: give Alertmanager's plain http listener (or a local proxy)",
        ]
    );
    assert_eq!(
        problems(
            json!({ "metrics": { "listen": "127.0.0.1:0" }, "monitoring": { "alertmanager": {} } })
        ),
        [
            "metrics.listen: \"127.0.0.1:0\" needs a port other than 0",
            "monitoring.alertmanager.url: is required (e.g. \"http://127.0.0.1:9093\")",
        ]
    );
    for (url, why) in [
        ("am:9093", "must start with http://"),
        ("http://user:pw@am:9093", "must not carry credentials"),
        ("http://am:9093/?x=1", "must not have a query"),
        (
            "http:// am",
            "is not a URL such as \"http://127.0.0.1:9093\"",
        ),
    ] {
        assert_eq!(
            problems(json!({ "monitoring": { "alertmanager": { "url": url } } })),
            [format!("monitoring.alertmanager.url: {url:?} {why}")],
        );
    }
}

#[test]
fn nulls_mean_absent() {
    let c = parse(&json!({ "notifyCommand": null, "vms": { "a": vm(json!({ "deleteAt": null, "image": null })) } }).to_string()).unwrap();
    assert!(c.config.default_project().notify_command.is_none());
}

fn arb_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)),
        "[a-zA-Z0-9:@ ./-]{0,12}".prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            "22:00-05:00",
            "2026-12-24",
            "24h",
            "kvm",
            "mon",
            "0 0 22 * * *"
        ])
        .prop_map(serde_json::Value::from),
    ];
    let keys = prop::sample::select(vec![
        "vms",
        "web01",
        "cores",
        "memoryMiB",
        "diskGiB",
        "maintenance",
        "window",
        "weekdays",
        "schedule",
        "cron",
        "length",
        "blackouts",
        "from",
        "to",
        "ceph",
        "qemu",
        "accel",
        "image",
        "network",
        "boot",
        "ipAddresses",
        "deleteAt",
        "memoryLimitMiB",
        "allowHugeDisk",
        "timezone",
        "contacts",
        "x",
    ]);
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(keys.clone(), inner, 0..6).prop_map(|m| {
                serde_json::Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the input, parse returns; every problem names a rule.
    #[test]
    fn never_panics_on_structured_input(doc in arb_json()) {
        if let Err(problems) = parse(&doc.to_string()) {
            prop_assert!(!problems.is_empty());
            prop_assert!(problems.iter().all(|p| !p.message.is_empty()));
        }
    }

    #[test]
    fn never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }
}

fn warnings(doc: serde_json::Value) -> Vec<String> {
    parse(&doc.to_string())
        .unwrap()
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn without_projects_every_vm_is_in_the_default_project_of_the_host_wide_keys() {
    let c = parse(
        &json!({
            "timezone": "Europe/Berlin",
            "contacts": ["ops@example.com"],
            "notifyCommand": "/usr/local/bin/hook",
            "vms": { "web01": vm(json!({})) }
        })
        .to_string(),
    )
    .unwrap()
    .config;
    assert_eq!(
        c.projects.keys().map(|p| p.as_str()).collect::<Vec<_>>(),
        ["default"]
    );
    let web = "web01".parse().unwrap();
    let p = c.project_of(&web, None);
    assert!(p.name.is_default());
    assert_eq!(p.tz(), chrono_tz::Europe::Berlin);
    assert_eq!(p.contacts, ["ops@example.com"]);
    assert_eq!(p.authorized_group.as_str(), "sudo-srv");
    assert_eq!(
        p.notify_command.as_deref(),
        Some(std::path::Path::new("/usr/local/bin/hook"))
    );
    // A VM that is gone stays in the project it was recorded in, while that exists.
    let gone = "gone".parse().unwrap();
    assert!(
        c.project_of(&gone, Some(&"shop".parse().unwrap()))
            .name
            .is_default()
    );
}

#[test]
fn a_project_takes_every_key_it_does_not_set_from_the_host() {
    let c = parse(
        &json!({
            "contacts": ["ops@example.com"],
            "maintenance": {
                "window": "23:00-04:00", "weekdays": ["sat", "sun"], "maxParallel": 3,
                "blackouts": [{ "from": "2026-12-23", "to": "2027-01-02", "reason": "host freeze" }]
            },
            "projects": {
                "shop": {
                    "timezone": "America/New_York",
                    "contacts": ["it@shop.example"],
                    "authorizedGroup": "shop-admins",
                    "maintenance": {
                        "window": "01:00-05:00", "maxParallel": 2,
                        "blackouts": [{ "from": "2026-11-26", "to": "2026-11-27", "reason": "thanksgiving" }]
                    }
                },
                "blog": {}
            },
            "vms": { "web01": vm(json!({ "project": "shop" })), "web02": vm(json!({})) }
        })
        .to_string(),
    )
    .unwrap()
    .config;
    assert_eq!(c.max_parallel, 3);
    let shop = c.project_of(&"web01".parse().unwrap(), None);
    assert_eq!(shop.name.as_str(), "shop");
    assert_eq!(shop.tz(), chrono_tz::America::New_York);
    assert_eq!(shop.contacts, ["it@shop.example"]);
    assert_eq!(shop.authorized_group.as_str(), "shop-admins");
    assert_eq!(shop.maintenance.max_parallel, 2);
    assert_eq!(shop.maintenance.announce_ahead, TimeDelta::hours(24));
    // Its own window, the host's weekdays.
    let WindowRule::Daily {
        start, weekdays, ..
    } = &shop.maintenance.rule
    else {
        panic!("daily")
    };
    assert_eq!(start.to_string(), "01:00:00");
    assert!(weekdays.contains(Weekday::Sat) && !weekdays.contains(Weekday::Mon));
    // The host's blackout in the host's zone, then its own in its zone.
    let b = &shop.maintenance.blackouts;
    assert_eq!(
        b.iter()
            .map(|b| (b.reason.as_str(), b.tz))
            .collect::<Vec<_>>(),
        [
            ("host freeze", chrono_tz::Europe::Berlin),
            ("thanksgiving", chrono_tz::America::New_York)
        ]
    );
    // A project that sets nothing is the host-wide policy under another name.
    let blog = c.project_named(&"blog".parse().unwrap());
    assert_eq!(blog.contacts, ["ops@example.com"]);
    assert_eq!(blog.tz(), chrono_tz::Europe::Berlin);
    assert_eq!(blog.maintenance.max_parallel, 3);
    assert_eq!(blog.maintenance.blackouts.len(), 1);
    assert!(
        c.project_of(&"web02".parse().unwrap(), None)
            .name
            .is_default()
    );
}

#[test]
fn a_schedule_of_either_side_replaces_the_other_sides_window() {
    let c = parse(
        &json!({
            "maintenance": { "window": "22:00-05:00", "weekdays": ["tue"] },
            "projects": {
                "cron": { "maintenance": { "schedule": { "cron": "0 0 22 1-7 * Sun", "length": "6h" } } },
            }
        })
        .to_string(),
    )
    .unwrap()
    .config;
    let p = c.project_named(&"cron".parse().unwrap());
    assert!(matches!(p.maintenance.rule, WindowRule::Cron { .. }));
    let c = parse(
        &json!({
            "maintenance": { "schedule": { "cron": "0 0 22 1-7 * Sun", "length": "6h" } },
            "projects": { "daily": { "maintenance": { "weekdays": ["mon"] } } }
        })
        .to_string(),
    )
    .unwrap()
    .config;
    let p = c.project_named(&"daily".parse().unwrap());
    let WindowRule::Daily {
        start,
        end,
        weekdays,
    } = &p.maintenance.rule
    else {
        panic!("daily")
    };
    // The host has no window to give: the default one, on the project's days.
    assert_eq!(
        (start.to_string(), end.to_string()),
        ("22:00:00".into(), "05:00:00".into())
    );
    assert!(weekdays.contains(Weekday::Mon) && !weekdays.contains(Weekday::Tue));
}

#[test]
fn project_problems_name_their_field_path() {
    let got = problems(json!({
        "projects": {
            "shop": {
                "timezone": "America/New_Yrok",
                "contcts": [],
                "contacts": ["nope"],
                "authorizedGroup": "Shop Admins",
                "notifyCommand": "hook.sh",
                "maintenance": {
                    "window": "25:00-05:00", "maxParallel": 0, "announceAhead": "soon",
                    "blackouts": [{ "from": "2026-12-24", "to": "2026-12-20" }]
                }
            },
            "Bad_Name": {},
            "default": {},
        },
        "vms": {
            "web01": vm(json!({ "project": "shpo" })),
            "web02": vm(json!({ "project": "Bad_Name" })),
            "web03": vm(json!({ "project": "zzzzzzzz" })),
        }
    }));
    assert_eq!(
        got,
        [
            "projects.Bad_Name: name must start with a letter a-z",
            "projects.default: the default project is made of the host-wide keys (timezone, maintenance, contacts, notifyCommand, authorizedGroup); give this project another name",
            "projects.shop.contcts: unknown key (did you mean `contacts`?)",
            "projects.shop.timezone: \"America/New_Yrok\" is not a known IANA time zone",
            "projects.shop.maintenance.window: \"25:00\" is not a valid time; write \"HH:MM-HH:MM\"",
            "projects.shop.maintenance.announceAhead: \"soon\" is not a duration such as 24h, 90m or 1h 30m",
            "projects.shop.maintenance.maxParallel: 0 is outside 1..=1000",
            "projects.shop.maintenance.blackouts[0].to: 2026-12-20 is before from (2026-12-24)",
            "projects.shop.contacts[0]: \"nope\" is not an e-mail address",
            "projects.shop.notifyCommand: \"hook.sh\" must be an absolute path",
            "projects.shop.authorizedGroup: \"Shop Admins\" is not a group name (a-z, 0-9, '_', '-', at most 32, starting with a letter or '_')",
            "vms.web01.project: no project \"shpo\"; did you mean \"shop\"?",
            "vms.web03.project: no project \"zzzzzzzz\"; the projects are Bad_Name, default, shop",
        ]
    );
}

#[test]
fn an_inherited_problem_is_reported_once_where_it_is_written() {
    let got = problems(json!({
        "maintenance": { "window": "22:00-22:00" },
        "projects": { "shop": {}, "blog": { "maintenance": { "weekdays": ["sat"] } } }
    }));
    assert_eq!(
        got,
        ["maintenance.window: \"22:00-22:00\" has no length: start and end are equal"]
    );
    // A window too short for the host's expected duration is the project's window's fault.
    let got = problems(json!({
        "maintenance": { "expectedDuration": "3h" },
        "projects": { "shop": { "maintenance": { "window": "01:00-03:00" } } }
    }));
    assert_eq!(
        got,
        [
            "projects.shop.maintenance.window: a window of 2h is shorter than expectedDuration 3h (from maintenance.expectedDuration)"
        ]
    );
    let got = problems(json!({
        "projects": { "shop": { "maintenance": { "expectedDuration": "8h" } } }
    }));
    assert_eq!(
        got,
        ["projects.shop.maintenance.expectedDuration: 8h does not fit into a window of 7h"]
    );
    let got = problems(json!({ "projects": { "shop": [] }, "operatorGroup": "Ops" }));
    assert_eq!(
        got,
        [
            "operatorGroup: \"Ops\" is not a group name (a-z, 0-9, '_', '-', at most 32, starting with a letter or '_')",
            "projects.shop: invalid type: sequence, expected struct RawProject",
        ]
    );
}

#[test]
fn groups_that_let_one_customer_act_on_anothers_vms_are_warned_about() {
    let got = warnings(json!({
        "operatorGroup": "shop-admins",
        "projects": {
            "shop": { "authorizedGroup": "shop-admins", "maintenance": { "maxParallel": 2 } },
            "blog": {},
            "idle": {},
        },
        "vms": {
            "a": vm(json!({ "project": "shop" })),
            "b": vm(json!({ "project": "blog" })),
            "c": vm(json!({})),
        }
    }));
    assert_eq!(
        got,
        [
            "projects.shop.maintenance.maxParallel: 2 is more than the host-wide maintenance.maxParallel (1), which limits the VMs of all projects together",
            "projects.blog.authorizedGroup: \"sudo-srv\" (the host-wide authorizedGroup) is also the authorized group of project default: its members may act on the VMs of both",
            "operatorGroup: \"shop-admins\" is also the authorized group of project shop: its members may act on the VMs of every project",
        ]
    );
    // Each project with its own group, an operator group of its own: nothing to say.
    let got = warnings(json!({
        "operatorGroup": "ops",
        "projects": { "shop": { "authorizedGroup": "shop-admins" } },
        "vms": { "a": vm(json!({ "project": "shop" })), "c": vm(json!({})) }
    }));
    assert!(got.is_empty(), "{got:?}");
}
