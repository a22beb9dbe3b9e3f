# Evaluates the vmkeeper module with lib.evalModules against nixpkgs' lib alone (see
# ./eval-stubs.nix) and checks what it generates: the JSON for the documented example, one
# assertion message per offending VM, and the service's reload/hardening settings.
#
# `cases` below is a list of named cases, each a configuration and its expected outcome;
# adding a check is adding an entry there. `check` is a derivation that builds with /bin/sh
# only when every case holds (its output names them); evaluating it throws with each failed
# case and what went wrong otherwise. scripts/nix-check.sh reads `summary`, and evaluates
# each refused case on its own to see the error message (`refusedSettings`).
{ lib, system }:

let
  stubs = import ./eval-stubs.nix { inherit lib system; };

  evaluate =
    modules:
    (lib.evalModules {
      modules = [
        stubs.module
        ../default.nix
        { services.vmkeeper.package = stubs.package; }
      ]
      ++ modules;
    }).config;

  example = ../examples/two-vms.nix;
  exampleConfig = evaluate [ example ];

  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  qemuArch = (lib.systems.elaborate system).qemuArch;
  settings = exampleConfig.services.vmkeeper.finalSettings;
  serviceOf = config: config.systemd.services.vmkeeper;

  # The example's JSON document, key for key as docs/usage/configuration.md defines them.
  expectedSettings = {
    timezone = "Europe/Berlin";
    contacts = [ "ops@example.com" ];
    authorizedGroup = "sudo-srv";
    stateDir = "/var/lib/vmkeeper";
    runtimeDir = "/run/vmkeeper";
    maintenance = {
      window = "22:00-05:00";
      weekdays = [
        "tue"
        "thu"
      ];
      announceAhead = "24h";
      expectedDuration = "15m";
      maxParallel = 1;
      blackouts = [
        {
          from = "2026-12-23";
          to = "2027-01-02";
          reason = "holiday freeze";
        }
      ];
    };
    projects.shop = {
      timezone = "America/New_York";
      contacts = [ "it@shop.example" ];
      authorizedGroup = "shop-admins";
      maintenance.window = "01:00-05:00";
    };
    ceph = {
      conf = "/etc/ceph/ceph.conf";
      clientId = "admin";
      pool = "rbd";
      qemuClientId = "vmkeeper-qemu";
      qemuKeyFile = "/etc/ceph/ceph.client.vmkeeper-qemu.key";
    };
    qemu = {
      accel = "kvm";
      machine = if lib.hasPrefix "x86_64" system then "q35" else "virt";
      stopTimeout = "60s";
      extraArgs = [ ];
      user = "vmkeeper-qemu";
      maxConcurrentStarts = 4;
    };
    removal = {
      maxAtOnce = 3;
      confirmed = [ ];
    };
    clock = {
      requireSync = true;
      syncedFlag = "/run/systemd/timesync/synchronized";
    };
    vms = {
      web01 = {
        cores = 2;
        memoryMiB = 2048;
        memoryLimitMiB = 65536;
        diskGiB = 50;
        allowHugeDisk = false;
        online = true;
        generation = 1;
        ipAddresses = [ "192.0.2.10" ];
      };
      db01 = {
        project = "shop";
        cores = 4;
        memoryMiB = 4096;
        memoryLimitMiB = 65536;
        diskGiB = 100;
        allowHugeDisk = false;
        online = true;
        generation = 1;
        ipAddresses = [ "192.0.2.11" ];
      };
    };
  };

  # Each case is
  #   name        what it shows (unique; printed when it fails)
  #   modules     the configuration: NixOS modules on top of the vmkeeper module
  #               (default: [ example ], nixos/examples/two-vms.nix)
  # and its expected outcome:
  #   assertions  the messages of the failing assertions, in order (default [ ]: all hold)
  #   warnings    the warnings, in order (default [ ])
  #   check       config -> bool: anything else that must hold (default: nothing more)
  # or, instead of those three,
  #   refused     a text the evaluation error must contain: an option's type refuses the
  #               configuration, so evaluating its JSON fails. Nix's tryEval only sees that
  #               it fails; scripts/nix-check.sh also checks the message.
  cases = [
    {
      name = "example passes its assertions, without warnings";
    }
    {
      name = "example generates the documented JSON";
      check = config: withoutBinary config.services.vmkeeper.finalSettings == withoutBinary expectedSettings;
    }
    {
      name = "example runs QEMU with the RBD driver for the host's architecture";
      check = config: lib.hasSuffix "-qemu-with-rbd/bin/qemu-system-${qemuArch}" config.services.vmkeeper.finalSettings.qemu.binary;
    }
    {
      name = "config file is installed at /etc/vmkeeper/config.json";
      check = config: config.environment.etc."vmkeeper/config.json".source == config.services.vmkeeper.configFile;
    }
    {
      name = "authorized groups are created, the host's and each project's, and QEMU's";
      check = config: lib.attrNames config.users.groups == [ "shop-admins" "sudo-srv" "vmkeeper-qemu" ];
    }
    {
      name = "an operator group becomes its JSON key and is created";
      modules = [
        example
        { services.vmkeeper.operatorGroup = "vmkeeper-operators"; }
      ];
      check =
        config:
        config.services.vmkeeper.finalSettings.operatorGroup == "vmkeeper-operators"
        && config.users.groups ? vmkeeper-operators;
    }
    {
      name = "a project that sets nothing is an empty object: every key is the host's";
      modules = [
        example
        { services.vmkeeper.projects.blog = { }; }
      ];
      check = config: config.services.vmkeeper.finalSettings.projects.blog == { };
    }
    {
      name = "a project's maintenance keys and blackouts become its JSON keys";
      modules = [
        example
        {
          services.vmkeeper.projects.shop.maintenance = {
            maxParallel = 2;
            blackouts = [
              {
                from = "2026-11-26";
                to = "2026-11-27";
                reason = "thanksgiving";
              }
            ];
          };
        }
      ];
      check =
        config:
        config.services.vmkeeper.finalSettings.projects.shop.maintenance == {
          window = "01:00-05:00";
          maxParallel = 2;
          blackouts = [
            {
              from = "2026-11-26";
              to = "2026-11-27";
              reason = "thanksgiving";
            }
          ];
        };
    }
    {
      name = "a VM naming an undeclared project is reported";
      modules = [
        example
        { services.vmkeeper.vms.web01.project = "shpo"; }
      ];
      assertions = [
        "services.vmkeeper.vms.web01: project \"shpo\" is not one of services.vmkeeper.projects (default, shop)"
      ];
    }
    {
      name = "a project may not be called default, nor have a bad name";
      modules = [
        example
        {
          services.vmkeeper.projects = {
            default = { };
            "Shop_2" = { };
          };
        }
      ];
      assertions = [
        "services.vmkeeper.projects.Shop_2: the name must be 1 to 63 characters of a-z, 0-9 and '-', starting with a letter"
        "services.vmkeeper.projects.default: \"default\" is the project of the host-wide options; give this project another name"
      ];
    }
    {
      name = "a project's schedule excludes its window, and its blackouts are checked";
      modules = [
        example
        {
          services.vmkeeper.projects.shop.maintenance = {
            schedule = {
              cron = "0 0 1 * * Sun *";
              length = "4h";
            };
            blackouts = [
              {
                from = "2027-01-02";
                to = "2026-12-23";
                reason = "typo";
              }
            ];
          };
        }
      ];
      assertions = [
        "services.vmkeeper.projects.shop.maintenance: schedule excludes window and weekdays"
        "services.vmkeeper.projects.shop.maintenance.blackouts: 2027-01-02 to 2026-12-23 (typo) ends before it starts"
      ];
    }
    {
      name = "two projects with VMs sharing a group are warned about";
      modules = [
        example
        { services.vmkeeper.projects.shop.authorizedGroup = lib.mkForce null; }
      ];
      warnings = [
        "services.vmkeeper.projects.shop: authorizedGroup sudo-srv is also that of project default; its members may act on the VMs of both"
      ];
    }
    {
      name = "a project's time zone is refused unless it is a zone name";
      modules = [
        example
        { services.vmkeeper.projects.shop.timezone = lib.mkForce "New York"; }
      ];
      refused = "option `services.vmkeeper.projects.shop.timezone' is not of type `null or IANA time zone name'";
    }
    {
      name = "journal catalog is linked where journalctl looks, and indexed before the daemon starts";
      check =
        config:
        let
          service = serviceOf config;
        in
        lib.take 2 config.systemd.tmpfiles.rules == [
          "d /usr/local/lib/systemd/catalog 0755 root root -"
          "L+ /usr/local/lib/systemd/catalog/vmkeeper.catalog - - - - ${stubs.package}/lib/systemd/catalog/vmkeeper.catalog"
        ]
        && lib.length service.serviceConfig.ExecStartPre == 1
        && lib.hasSuffix "/bin/journalctl --update-catalog" (lib.head service.serviceConfig.ExecStartPre);
    }
    {
      name = "daemon is Type=notify and reads the config path";
      check =
        config:
        (serviceOf config).serviceConfig.Type == "notify"
        && lib.hasSuffix "/bin/vmkeeper daemon --config /etc/vmkeeper/config.json" (serviceOf config).serviceConfig.ExecStart;
    }
    {
      name = "switch reloads the daemon on a config change";
      check =
        config:
        (serviceOf config).reloadTriggers == [ config.services.vmkeeper.configFile ]
        && lib.hasSuffix "kill -HUP $MAINPID" (serviceOf config).serviceConfig.ExecReload;
    }
    {
      name = "runtime directory outlives the daemon";
      check = config: (serviceOf config).serviceConfig.RuntimeDirectoryPreserve == "yes";
    }
    {
      name = "service is hardened";
      check =
        config:
        let
          sc = (serviceOf config).serviceConfig;
        in
        sc.NoNewPrivileges
        && sc.ProtectSystem == "strict"
        && sc.ProtectHome
        && sc.PrivateTmp
        && sc.DevicePolicy == "closed"
        && sc.DeviceAllow == [ "/dev/net/tun rw" ]
        && sc.SystemCallArchitectures == "native"
        && sc.SystemCallFilter == [
          "@system-service"
          "~@resources"
        ]
        && sc.MemoryDenyWriteExecute
        && sc.RestrictSUIDSGID
        && !(lib.elem "CAP_SYS_ADMIN" sc.CapabilityBoundingSet)
        && !(lib.elem "CAP_SYS_PTRACE" sc.CapabilityBoundingSet);
    }
    {
      name = "the daemon may make tap devices and hand VM directories to QEMU's user, nothing more";
      check =
        config:
        let
          caps = (serviceOf config).serviceConfig.CapabilityBoundingSet;
        in
        lib.elem "CAP_NET_ADMIN" caps
        && lib.elem "CAP_CHOWN" caps
        && lib.sort lib.lessThan caps == [
          "CAP_CHOWN"
          "CAP_DAC_OVERRIDE"
          "CAP_DAC_READ_SEARCH"
          "CAP_FOWNER"
          "CAP_KILL"
          "CAP_NET_ADMIN"
        ];
    }
    {
      name = "QEMU's user is created: a system user with a group of its own, in kvm";
      check =
        config:
        let
          u = config.users.users.vmkeeper-qemu;
        in
        u.isSystemUser
        && u.group == "vmkeeper-qemu"
        && u.extraGroups == [ "kvm" ]
        && config.users.groups ? vmkeeper-qemu
        && !(u ? uid && u.uid == 0);
    }
    {
      name = "QEMU's user can be renamed, and the JSON follows";
      modules = [
        example
        { services.vmkeeper.qemu.user = "vmqemu"; }
      ];
      check =
        config:
        config.users.users ? vmqemu
        && config.users.groups ? vmqemu
        && config.services.vmkeeper.finalSettings.qemu.user == "vmqemu";
    }
    {
      name = "QEMU's Ceph key file has its directory and is readable by QEMU's user only";
      check =
        config:
        lib.drop 2 config.systemd.tmpfiles.rules == [
          "d /etc/ceph 0755 root root -"
          "z /etc/ceph/ceph.client.vmkeeper-qemu.key 0400 vmkeeper-qemu vmkeeper-qemu -"
        ];
    }
    {
      name = "without a key file QEMU's librados finds its keyring itself, and no rule is made";
      modules = [
        example
        { services.vmkeeper.ceph.qemuKeyFile = null; }
      ];
      check =
        config:
        !(config.services.vmkeeper.finalSettings.ceph ? qemuKeyFile)
        && lib.length config.systemd.tmpfiles.rules == 2;
    }
    {
      name = "memory above the VM's limit fails with a message naming the VM";
      modules = [
        example
        { services.vmkeeper.vms.db01.memoryMiB = lib.mkForce 98304; }
      ];
      assertions = [
        "services.vmkeeper.vms.db01: memoryMiB 98304 exceeds memoryLimitMiB 65536 (the customer-facing limit is 64 GiB; an operator may raise memoryLimitMiB up to 131072)"
      ];
    }
    {
      name = "a raised memory limit allows more than 64 GiB";
      modules = [
        example
        {
          services.vmkeeper.vms.db01 = {
            memoryMiB = lib.mkForce 98304;
            memoryLimitMiB = 131072;
          };
        }
      ];
    }
    {
      name = "a huge disk needs allowHugeDisk";
      modules = [
        example
        { services.vmkeeper.vms.db01.diskGiB = lib.mkForce 10240; }
      ];
      assertions = [
        "services.vmkeeper.vms.db01: diskGiB 10240 is 10 TiB or more and needs allowHugeDisk = true (consider object storage instead)"
      ];
    }
    {
      name = "an allowed huge disk still warns";
      modules = [
        example
        {
          services.vmkeeper.vms.db01 = {
            diskGiB = lib.mkForce 10240;
            allowHugeDisk = true;
          };
        }
      ];
      warnings = [
        "services.vmkeeper.vms.db01: a 10240 GiB disk is allowed by allowHugeDisk; object storage is the better home for data of this size"
      ];
    }
    {
      name = "a shared IP address is reported for each VM holding it";
      modules = [
        example
        { services.vmkeeper.vms.db01.ipAddresses = lib.mkForce [ "192.0.2.10" ]; }
      ];
      assertions = [
        "services.vmkeeper.vms.db01: ipAddresses 192.0.2.10 also belong to another VM"
        "services.vmkeeper.vms.web01: ipAddresses 192.0.2.10 also belong to another VM"
      ];
    }
    {
      name = "a bad VM name is reported";
      modules = [
        example
        {
          services.vmkeeper.vms."Web_02" = {
            cores = 1;
            memoryMiB = 1024;
            diskGiB = 30;
          };
        }
      ];
      assertions = [
        "services.vmkeeper.vms.Web_02: the name must be 1 to 63 characters of a-z, 0-9 and '-', starting with a letter"
      ];
    }
    {
      name = "schedule excludes window";
      modules = [
        example
        {
          services.vmkeeper.maintenance.schedule = {
            cron = "0 0 23 * * Tue *";
            length = "5h";
          };
        }
      ];
      assertions = [ "services.vmkeeper.maintenance: schedule excludes window and weekdays" ];
    }
    {
      name = "a blackout that ends before it starts is reported";
      modules = [
        example
        {
          services.vmkeeper.maintenance.blackouts = lib.mkForce [
            {
              from = "2027-01-02";
              to = "2026-12-23";
              reason = "typo";
            }
          ];
        }
      ];
      assertions = [
        "services.vmkeeper.maintenance.blackouts: 2027-01-02 to 2026-12-23 (typo) ends before it starts"
      ];
    }
    {
      name = "settings cannot move the state and runtime directories";
      modules = [
        example
        { services.vmkeeper.settings.stateDir = "/srv/vmkeeper"; }
      ];
      assertions = [
        "services.vmkeeper.settings: stateDir and runtimeDir are fixed by the service (/var/lib/vmkeeper, /run/vmkeeper)"
      ];
    }
    {
      name = "13 cores is refused by the option type, naming the VM";
      modules = [
        example
        { services.vmkeeper.vms.web01.cores = lib.mkForce 13; }
      ];
      refused = "option `services.vmkeeper.vms.web01.cores' is not of type `integer between 1 and 12";
    }
    {
      name = "a disk under 30 GiB is refused by the option type, naming the VM";
      modules = [
        example
        { services.vmkeeper.vms.web01.diskGiB = lib.mkForce 29; }
      ];
      refused = "option `services.vmkeeper.vms.web01.diskGiB' is not of type `integer of at least 30'";
    }
    {
      name = "metrics listener and Alertmanager are off unless set";
      check = config: !(config.services.vmkeeper.finalSettings ? metrics) && !(config.services.vmkeeper.finalSettings ? monitoring);
    }
    {
      name = "metrics listener and Alertmanager URL become their JSON keys";
      modules = [
        example
        {
          services.vmkeeper.metrics.listen = "127.0.0.1:9848";
          services.vmkeeper.monitoring.alertmanager.url = "http://alertmanager.internal:9093";
        }
      ];
      check =
        config:
        config.services.vmkeeper.finalSettings.metrics == { listen = "127.0.0.1:9848"; }
        && config.services.vmkeeper.finalSettings.monitoring == {
          alertmanager.url = "http://alertmanager.internal:9093";
        };
    }
    {
      name = "a metrics listener needs an address, not a host name";
      modules = [
        example
        { services.vmkeeper.metrics.listen = "localhost:9848"; }
      ];
      refused = "option `services.vmkeeper.metrics.listen' is not of type `null or address and port";
    }
    {
      name = "an https Alertmanager URL is refused";
      modules = [
        example
        { services.vmkeeper.monitoring.alertmanager.url = "https://am:9093"; }
      ];
      refused = "option `services.vmkeeper.monitoring.alertmanager.url' is not of type `null or http:// URL";
    }
    {
      name = "settings add keys the options lack";
      modules = [
        example
        { services.vmkeeper.settings.vms.web01.boot.append = "console=ttyS0"; }
      ];
      check =
        config:
        config.services.vmkeeper.finalSettings.vms.web01 == expectedSettings.vms.web01 // {
          boot.append = "console=ttyS0";
        };
    }
    {
      name = "a disabled module defines nothing";
      modules = [{ services.vmkeeper.vms = exampleConfig.services.vmkeeper.vms; }];
      check =
        config:
        config.systemd.services == { }
        && config.environment.etc == { }
        && config.users.groups == { }
        && config.users.users == { }
        && config.assertions == [ ];
    }
  ];

  withoutBinary = s: lib.recursiveUpdate s { qemu.binary = null; };

  # --- running the cases ------------------------------------------------------------------
  caseKeys = [
    "name"
    "modules"
    "assertions"
    "warnings"
    "check"
    "refused"
  ];
  defaults = {
    modules = [ example ];
    assertions = [ ];
    warnings = [ ];
    check = _: true;
    refused = null;
  };
  show = builtins.toJSON;

  run =
    case:
    let
      unknown = lib.subtractLists caseKeys (lib.attrNames case);
      c = defaults // case;
      config = evaluate c.modules;
      json = builtins.toJSON config.services.vmkeeper.finalSettings;
      got = {
        assertions = failedAssertions config;
        inherit (config) warnings;
      };
      problems =
        if c.refused != null then
          lib.optional (case ? assertions || case ? warnings || case ? check) "refused excludes assertions, warnings and check"
          ++ lib.optional (builtins.tryEval json).success "evaluates, but should be refused with: ${c.refused}"
        else
          lib.optional (got.assertions != c.assertions) "failing assertions: expected ${show c.assertions}, got ${show got.assertions}"
          ++ lib.optional (got.warnings != c.warnings) "warnings: expected ${show c.warnings}, got ${show got.warnings}"
          ++ lib.optional (!c.check config) "check does not hold";
    in
    if !(case ? name) then
      throw "vmkeeper module evaluation: a case without a name"
    else if unknown != [ ] then
      throw "vmkeeper module evaluation: case \"${case.name}\" has unknown keys ${show unknown} (known: ${show caseKeys})"
    else
      {
        inherit (c) name refused;
        ok = problems == [ ];
        inherit problems;
        inherit json;
      };

  names = map (c: c.name) cases;
  duplicates = lib.unique (lib.filter (n: lib.count (m: m == n) names > 1) names);
  results =
    if duplicates != [ ] then
      throw "vmkeeper module evaluation: duplicate case names ${show duplicates}"
    else
      map run cases;
  failed = lib.filter (r: !r.ok) results;
  refusedResults = lib.filter (r: r.refused != null) results;
in
{
  # For scripts/nix-check.sh: how many cases ran, which failed and why, and the refused
  # cases' expected messages.
  summary = {
    total = lib.length results;
    passed = lib.length results - lib.length failed;
    failed = map (r: { inherit (r) name problems; }) failed;
    refused = map (r: { inherit (r) name refused; }) refusedResults;
  };

  # For scripts/nix-check.sh: evaluating this fails with the refused case's error message.
  refusedSettings = name: (lib.findFirst (r: r.name == name) (throw "no case named ${name}") refusedResults).json;

  # For scripts/nix-check.sh: the example's JSON, and every visible option's name.
  exampleSettings = settings;
  optionNames =
    let
      options = (lib.evalModules {
        modules = [
          stubs.module
          ../default.nix
          { services.vmkeeper.package = stubs.package; }
        ];
      }).options.services.vmkeeper;
    in
    map (o: o.name) (lib.filter (o: o.visible && !o.internal) (lib.optionAttrSetToDocList options));

  check =
    if failed != [ ] then
      throw ''
        vmkeeper module evaluation: ${toString (lib.length failed)} of ${toString (lib.length results)} cases failed:
        ${lib.concatMapStrings (r: "  ${r.name}\n${lib.concatMapStrings (p: "    ${p}\n") r.problems}") failed}''
    else
      derivation {
        name = "vmkeeper-module-eval";
        inherit system;
        builder = "/bin/sh";
        summary = "${toString (lib.length results)} module evaluation cases passed (${system}):\n${lib.concatMapStrings (n: "  ${n}\n") names}";
        args = [
          "-c"
          "printf '%s' \"$summary\" > $out"
        ];
      };
}
