# Evaluates the vmkeeper module with lib.evalModules against nixpkgs' lib alone (see
# ./eval-stubs.nix) and checks what it generates: the JSON for the documented example, one
# assertion message per offending VM, and the service's reload/hardening settings.
# `check` is a derivation that builds with /bin/sh only when every case holds; evaluating it
# throws with the list of failed cases otherwise.
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

  example = evaluate [ ../examples/two-vms.nix ];
  withExample = extra: evaluate [
    ../examples/two-vms.nix
    extra
  ];

  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  qemuArch = (lib.systems.elaborate system).qemuArch;
  settings = example.services.vmkeeper.finalSettings;
  service = example.systemd.services.vmkeeper;

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
    ceph = {
      conf = "/etc/ceph/ceph.conf";
      clientId = "admin";
      pool = "rbd";
    };
    qemu = {
      accel = "kvm";
      machine = if lib.hasPrefix "x86_64" system then "q35" else "virt";
      stopTimeout = "60s";
      extraArgs = [ ];
    };
    vms = {
      web01 = {
        cores = 2;
        memoryMiB = 2048;
        memoryLimitMiB = 65536;
        diskGiB = 50;
        allowHugeDisk = false;
        online = true;
        ipAddresses = [ "192.0.2.10" ];
      };
      db01 = {
        cores = 4;
        memoryMiB = 4096;
        memoryLimitMiB = 65536;
        diskGiB = 100;
        allowHugeDisk = false;
        online = true;
        ipAddresses = [ "192.0.2.11" ];
      };
    };
  };

  cases = {
    "example generates the documented JSON" =
      lib.recursiveUpdate settings { qemu.binary = null; }
      == lib.recursiveUpdate expectedSettings { qemu.binary = null; };

    "example runs QEMU with the RBD driver for the host's architecture" =
      lib.hasSuffix "-qemu-with-rbd/bin/qemu-system-${qemuArch}" settings.qemu.binary;

    "example passes its assertions" = failedAssertions example == [ ];

    "config file is installed at /etc/vmkeeper/config.json" =
      example.environment.etc."vmkeeper/config.json".source == example.services.vmkeeper.configFile;

    "authorized group is created" = example.users.groups ? sudo-srv;

    "journal catalog is linked where journalctl looks, and indexed before the daemon starts" =
      example.systemd.tmpfiles.rules == [
        "d /usr/local/lib/systemd/catalog 0755 root root -"
        "L+ /usr/local/lib/systemd/catalog/vmkeeper.catalog - - - - ${stubs.package}/lib/systemd/catalog/vmkeeper.catalog"
      ]
      && lib.length service.serviceConfig.ExecStartPre == 1
      && lib.hasSuffix "/bin/journalctl --update-catalog" (lib.head service.serviceConfig.ExecStartPre);

    "daemon is Type=notify and reads the config path" =
      service.serviceConfig.Type == "notify"
      && lib.hasSuffix "/bin/vmkeeper daemon --config /etc/vmkeeper/config.json" service.serviceConfig.ExecStart;

    "switch reloads the daemon on a config change" =
      service.reloadTriggers == [ example.services.vmkeeper.configFile ]
      && lib.hasSuffix "kill -HUP $MAINPID" service.serviceConfig.ExecReload;

    "runtime directory outlives the daemon" = service.serviceConfig.RuntimeDirectoryPreserve == "yes";

    "service is hardened" =
      service.serviceConfig.NoNewPrivileges
      && service.serviceConfig.ProtectSystem == "strict"
      && service.serviceConfig.ProtectHome
      && service.serviceConfig.PrivateTmp
      && service.serviceConfig.DeviceAllow == [ "/dev/kvm rw" ]
      && service.serviceConfig.SystemCallArchitectures == "native";

    "memory above the VM's limit fails with a message naming the VM" =
      failedAssertions
        (withExample {
          services.vmkeeper.vms.db01.memoryMiB = lib.mkForce 98304;
        }) == [
        "services.vmkeeper.vms.db01: memoryMiB 98304 exceeds memoryLimitMiB 65536 (the customer-facing limit is 64 GiB; an operator may raise memoryLimitMiB up to 131072)"
      ];

    "a raised memory limit allows more than 64 GiB" =
      failedAssertions
        (withExample {
          services.vmkeeper.vms.db01 = {
            memoryMiB = lib.mkForce 98304;
            memoryLimitMiB = 131072;
          };
        }) == [ ];

    "a huge disk needs allowHugeDisk" =
      failedAssertions
        (withExample {
          services.vmkeeper.vms.db01.diskGiB = lib.mkForce 10240;
        }) == [
        "services.vmkeeper.vms.db01: diskGiB 10240 is 10 TiB or more and needs allowHugeDisk = true (consider object storage instead)"
      ];

    "an allowed huge disk still warns" =
      let
        config = withExample {
          services.vmkeeper.vms.db01 = {
            diskGiB = lib.mkForce 10240;
            allowHugeDisk = true;
          };
        };
      in
      failedAssertions config == [ ]
      && config.warnings == [
        "services.vmkeeper.vms.db01: a 10240 GiB disk is allowed by allowHugeDisk; object storage is the better home for data of this size"
      ];

    "a shared IP address is reported for each VM holding it" =
      failedAssertions
        (withExample {
          services.vmkeeper.vms.db01.ipAddresses = lib.mkForce [ "192.0.2.10" ];
        }) == [
        "services.vmkeeper.vms.db01: ipAddresses 192.0.2.10 also belong to another VM"
        "services.vmkeeper.vms.web01: ipAddresses 192.0.2.10 also belong to another VM"
      ];

    "a bad VM name is reported" =
      failedAssertions
        (withExample {
          services.vmkeeper.vms."Web_02" = {
            cores = 1;
            memoryMiB = 1024;
            diskGiB = 30;
          };
        }) == [
        "services.vmkeeper.vms.Web_02: the name must be 1 to 63 characters of a-z, 0-9 and '-', starting with a letter"
      ];

    "schedule excludes window" =
      failedAssertions
        (withExample {
          services.vmkeeper.maintenance.schedule = {
            cron = "0 0 23 * * Tue *";
            length = "5h";
          };
        }) == [ "services.vmkeeper.maintenance: schedule excludes window and weekdays" ];

    "13 cores is refused by the option type" =
      !(builtins.tryEval (withExample { services.vmkeeper.vms.web01.cores = lib.mkForce 13; }).services.vmkeeper.vms.web01.cores).success;

    "a disk under 30 GiB is refused by the option type" =
      !(builtins.tryEval (withExample { services.vmkeeper.vms.web01.diskGiB = lib.mkForce 29; }).services.vmkeeper.vms.web01.diskGiB).success;

    "settings add keys the options lack" =
      (withExample {
        services.vmkeeper.settings.vms.web01.boot.append = "console=ttyS0";
      }).services.vmkeeper.finalSettings.vms.web01 == expectedSettings.vms.web01 // {
        boot.append = "console=ttyS0";
      };

    "a disabled module defines nothing" =
      let
        config = evaluate [{ services.vmkeeper.vms = example.services.vmkeeper.vms; }];
      in
      config.systemd.services == { } && config.environment.etc == { } && config.assertions == [ ];
  };

  failed = lib.attrNames (lib.filterAttrs (_: ok: !ok) cases);
in
{
  inherit cases;

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

  # For scripts/nix-check.sh: evaluating this must fail with an error naming web01's cores.
  tooManyCores = (withExample { services.vmkeeper.vms.web01.cores = lib.mkForce 13; }).services.vmkeeper.finalSettings;

  check =
    if failed != [ ] then
      throw "vmkeeper module evaluation: failed cases:\n  ${lib.concatStringsSep "\n  " failed}"
    else
      derivation {
        name = "vmkeeper-module-eval";
        inherit system;
        builder = "/bin/sh";
        args = [
          "-c"
          "echo '${toString (lib.length (lib.attrNames cases))} cases passed' > $out"
        ];
      };
}
