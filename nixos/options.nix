# Options of services.vmkeeper. They mirror the JSON configuration (docs/usage/configuration.md)
# key for key; the implementation in ./default.nix turns them into that file.
{ config
, lib
, pkgs
, ...
}:

let
  inherit (lib) literalExpression mkEnableOption mkOption types;

  cfg = config.services.vmkeeper;
  jsonFormat = pkgs.formats.json { };

  date = types.strMatching "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])" // {
    description = "date (YYYY-MM-DD)";
  };
  duration = types.strMatching "([0-9]+ *[a-z]+ *)+" // {
    description = "duration (such as \"24h\", \"90m\" or \"1h 30m\")";
  };
  clock = "([01][0-9]|2[0-3]):[0-5][0-9]";
  window = types.strMatching "${clock}-${clock}" // {
    description = "window (\"HH:MM-HH:MM\")";
  };
  absolutePath = types.strMatching "/.*" // {
    description = "absolute path";
  };
  listenAddress = types.strMatching "([0-9]{1,3}([.][0-9]{1,3}){3}|[[][0-9a-fA-F:.]+[]]):[0-9]{1,5}" // {
    description = "address and port (such as \"127.0.0.1:9848\" or \"[::1]:9848\")";
  };
  alertmanagerUrl = types.strMatching "http://[^/?#@ ]+(/[^?# ]*)?" // {
    description = "http:// URL (such as \"http://127.0.0.1:9093\")";
  };
  groupName = types.strMatching "[a-z_][a-z0-9_-]{0,31}" // {
    description = "group name";
  };
  zoneName = types.strMatching "[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*" // {
    description = "IANA time zone name";
  };
  weekday = types.enum [
    "mon"
    "tue"
    "wed"
    "thu"
    "fri"
    "sat"
    "sun"
  ];

  blackoutOptions = {
    options = {
      from = mkOption {
        type = date;
        description = "First local date (inclusive) on which no maintenance is scheduled.";
      };
      to = mkOption {
        type = date;
        description = "Last local date (inclusive) on which no maintenance is scheduled.";
      };
      reason = mkOption {
        type = types.str;
        description = "Why nothing is scheduled; shown in `vmkeeper plan`.";
      };
    };
  };

  maintenanceOptions = {
    options = {
      window = mkOption {
        type = types.nullOr window;
        default = null;
        defaultText = literalExpression ''null # vmkeeper uses "22:00-05:00"'';
        example = "23:00-04:00";
        description = ''
          Daily maintenance window in local wall-clock time of {option}`services.vmkeeper.timezone`.
          An end at or before the start crosses midnight. Exclusive with `schedule`.
        '';
      };
      weekdays = mkOption {
        type = types.nullOr (types.listOf weekday);
        default = null;
        defaultText = literalExpression "null # all seven days";
        example = [
          "tue"
          "thu"
        ];
        description = "Days on which a window starts. Exclusive with `schedule`.";
      };
      schedule = mkOption {
        type = types.nullOr (
          types.submodule {
            options = {
              cron = mkOption {
                type = types.str;
                example = "0 0 23 * * Tue,Thu *";
                description = "Cron expression (seconds first) giving window starts, in the host's maintenance time zone.";
              };
              length = mkOption {
                type = duration;
                example = "5h";
                description = "Length of each window.";
              };
            };
          }
        );
        default = null;
        description = "Window starts from a cron expression, instead of `window` and `weekdays`.";
      };
      announceAhead = mkOption {
        type = duration;
        default = "24h";
        description = "A maintenance slot starts no sooner than this after it is announced.";
      };
      maxParallel = mkOption {
        type = types.ints.positive;
        default = 1;
        description = "How many VMs of this host may be in maintenance at the same time.";
      };
      expectedDuration = mkOption {
        type = duration;
        default = "15m";
        description = "Planned length of one maintenance reboot; all of it must fit in one window.";
      };
      blackouts = mkOption {
        type = types.listOf (types.submodule blackoutOptions);
        default = [ ];
        example = literalExpression ''
          [ { from = "2026-12-23"; to = "2027-01-02"; reason = "holiday freeze"; } ]
        '';
        description = "Date ranges on which no maintenance is scheduled.";
      };
    };
  };

  # A project's maintenance: every key null takes the host-wide one (services.vmkeeper.maintenance).
  inherited = "null # the host-wide value";
  projectMaintenanceOptions = {
    options = {
      window = mkOption {
        type = types.nullOr window;
        default = null;
        defaultText = literalExpression inherited;
        example = "01:00-05:00";
        description = ''
          Daily window in the project's time zone. Without `window`, `weekdays` or `schedule`
          the project has the host's windows (in its own zone); a `schedule` replaces the
          host's window and weekdays, a `window` keeps the host's `weekdays` and vice versa.
        '';
      };
      weekdays = mkOption {
        type = types.nullOr (types.listOf weekday);
        default = null;
        defaultText = literalExpression inherited;
        description = "Days on which the project's windows start.";
      };
      schedule = mkOption {
        type = types.nullOr (
          types.submodule {
            options = {
              cron = mkOption {
                type = types.str;
                description = "Cron expression (seconds first) giving window starts, in the project's time zone.";
              };
              length = mkOption {
                type = duration;
                description = "Length of each window.";
              };
            };
          }
        );
        default = null;
        defaultText = literalExpression inherited;
        description = "Window starts from a cron expression, instead of `window` and `weekdays`.";
      };
      announceAhead = mkOption {
        type = types.nullOr duration;
        default = null;
        defaultText = literalExpression inherited;
        description = "A slot of the project starts no sooner than this after it is announced.";
      };
      maxParallel = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        defaultText = literalExpression inherited;
        description = ''
          How many VMs of the project may be in maintenance at once. The host-wide
          {option}`services.vmkeeper.maintenance.maxParallel` limits all projects together.
        '';
      };
      expectedDuration = mkOption {
        type = types.nullOr duration;
        default = null;
        defaultText = literalExpression inherited;
        description = "Planned length of one maintenance reboot of the project's VMs.";
      };
      blackouts = mkOption {
        type = types.listOf (types.submodule blackoutOptions);
        default = [ ];
        description = ''
          The project's own blackouts, local dates in its time zone. The host-wide blackouts
          apply to every project as well, in the host's time zone.
        '';
      };
    };
  };

  projectOptions = {
    options = {
      timezone = mkOption {
        type = types.nullOr zoneName;
        default = null;
        defaultText = literalExpression inherited;
        example = "America/New_York";
        description = "IANA time zone of the project's windows, blackouts and deletion dates.";
      };
      maintenance = mkOption {
        type = types.submodule projectMaintenanceOptions;
        default = { };
        description = "The project's maintenance policy; each key defaults to the host-wide one.";
      };
      contacts = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        defaultText = literalExpression inherited;
        example = [ "it@shop.example" ];
        description = "Technical contacts that the project's announcements and alarms go to.";
      };
      notifyCommand = mkOption {
        type = types.nullOr types.path;
        default = null;
        defaultText = literalExpression inherited;
        description = "Hook run for each of the project's announcements and alarms (its JSON names the project).";
      };
      authorizedGroup = mkOption {
        type = types.nullOr groupName;
        default = null;
        defaultText = literalExpression inherited;
        example = "shop-admins";
        description = ''
          Group whose members may reboot, request maintenance for, delete and cancel-delete
          this project's VMs, and see them in `vmkeeper status`. The module creates it. Give
          every customer its own: a project without one shares the host-wide group.
        '';
      };
    };
  };

  vmOptions =
    { name, ... }:
    {
      options = {
        project = mkOption {
          type = types.nullOr types.str;
          default = null;
          defaultText = literalExpression "null # the default project";
          example = "shop";
          description = ''
            The project (customer) the VM belongs to: a name in
            {option}`services.vmkeeper.projects`. Without one it is in the default project,
            whose values are the host-wide options.
          '';
        };
        cores = mkOption {
          type = types.ints.between 1 12;
          example = 2;
          description = "Virtual CPUs. A change is applied by a maintenance reboot.";
        };
        memoryMiB = mkOption {
          type = types.ints.between 1024 131072;
          example = 4096;
          description = ''
            RAM in MiB, at most `memoryLimitMiB`. A change is applied by a maintenance reboot.
          '';
        };
        memoryLimitMiB = mkOption {
          type = types.ints.between 65536 131072;
          default = 65536;
          description = ''
            Operator override of the customer-facing 64 GiB limit for this VM's `memoryMiB`.
          '';
        };
        diskGiB = mkOption {
          type = types.addCheck types.int (n: n >= 30) // {
            description = "integer of at least 30";
          };
          example = 50;
          description = ''
            Size of the RBD disk `${name}` in GiB. Growing is applied live. **Disks never
            shrink:** a smaller value is refused and nothing changes.
          '';
        };
        allowHugeDisk = mkOption {
          type = types.bool;
          default = false;
          description = "Operator acknowledgement for a disk of 10 TiB (10240 GiB) and more.";
        };
        online = mkOption {
          type = types.bool;
          default = true;
          description = "Whether the VM runs. `false` stops it as a planned stop and keeps it stopped.";
        };
        generation = mkOption {
          type = types.ints.positive;
          default = 1;
          description = ''
            Which VM of this name it is. A name used again after its VM was deleted (and the
            name released) needs a higher generation: an old declaration never recreates a
            deleted VM.
          '';
        };
        deleteAt = mkOption {
          type = types.nullOr date;
          default = null;
          example = "2027-03-01";
          description = ''
            Local date on which the VM is shut down; its disk goes three days later.
            See the deletion lifecycle in docs/usage/deletion.md.
          '';
        };
        ipAddresses = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [ "192.0.2.10" ];
          description = "IPv4/IPv6 addresses of the VM; unique across the host's VMs.";
        };
        image = mkOption {
          type = types.nullOr (
            types.submodule {
              options = {
                pool = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  description = "Pool of the base image; the disk pool when null.";
                };
                name = mkOption {
                  type = types.str;
                  description = "RBD image to clone the disk from.";
                };
                snapshot = mkOption {
                  type = types.str;
                  description = "Snapshot of that image.";
                };
              };
            }
          );
          default = null;
          description = "Base image the disk is cloned from; an empty thin disk when null.";
        };
        network = mkOption {
          type = types.nullOr (
            types.submodule {
              options = {
                bridge = mkOption {
                  type = types.str;
                  example = "br0";
                  description = "Host bridge the VM's virtio-net NIC is attached to.";
                };
                macAddress = mkOption {
                  type = types.strMatching "52:54:00(:[0-9a-fA-F]{2}){3}";
                  example = "52:54:00:12:34:56";
                  description = "MAC address of the NIC, in QEMU's locally administered range.";
                };
              };
            }
          );
          default = null;
          description = "One NIC on a host bridge; no NIC when null.";
        };
        boot = mkOption {
          type = types.nullOr (
            types.submodule {
              options = {
                kernel = mkOption {
                  type = types.path;
                  description = "Kernel image for direct kernel boot.";
                };
                initrd = mkOption {
                  type = types.nullOr types.path;
                  default = null;
                  description = "Initial ramdisk.";
                };
                append = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                  description = "Kernel command line.";
                };
              };
            }
          );
          default = null;
          description = "Direct kernel boot; the VM boots from its disk when null.";
        };
      };
    };
in
{
  options.services.vmkeeper = {
    enable = mkEnableOption "vmkeeper, the supervisor of this host's declared VMs";

    package = mkOption {
      type = types.package;
      defaultText = literalExpression "vmkeeper.packages.\${system}.default # set by the flake's nixosModules.default";
      description = "The vmkeeper package.";
    };

    timezone = mkOption {
      type = zoneName;
      default = "Europe/Berlin";
      description = ''
        IANA time zone of maintenance windows, blackouts and deletion dates of the default
        project, and of every project that sets none; host-wide blackouts are in it.
        Independent of `time.timeZone`: these are times promised to the VMs' users.
      '';
    };

    maintenance = mkOption {
      type = types.submodule maintenanceOptions;
      default = { };
      description = ''
        The maintenance policy of the default project and the default of every project's;
        its `maxParallel` limits the maintenances of all projects together and its
        blackouts apply to every project.
      '';
    };

    contacts = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "ops@example.com" ];
      description = "Technical contacts that announcements go to (of the default project, and of every project that names none).";
    };

    notifyCommand = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = literalExpression ''
        pkgs.writeShellScript "vmkeeper-notify" '''
          ''${pkgs.jq}/bin/jq -c . | ''${pkgs.util-linux}/bin/logger -t vmkeeper-notify
        '''
      '';
      description = "Executable run with one JSON event on stdin for every announcement and alarm.";
    };

    authorizedGroup = mkOption {
      type = groupName;
      default = "sudo-srv";
      description = ''
        Group whose members (and root) may reboot at once, request maintenance and delete
        the default project's VMs through `vmkeeper`, and those of every project that names
        no group of its own. The module creates it.
      '';
    };

    operatorGroup = mkOption {
      type = types.nullOr groupName;
      default = null;
      example = "vmkeeper-operators";
      description = ''
        Host-wide operators: members may act on (and see) the VMs of every project. Without
        one only root may. The module creates it. Never a customer's group.
      '';
    };

    projects = mkOption {
      type = types.attrsOf (types.submodule projectOptions);
      default = { };
      example = literalExpression ''
        {
          shop = {
            timezone = "America/New_York";
            contacts = [ "it@shop.example" ];
            authorizedGroup = "shop-admins";
            maintenance.window = "01:00-05:00";
          };
        }
      '';
      description = ''
        Projects (customers), by name (1 to 63 of `a-z`, `0-9` and `-`, starting with a
        letter; `default` is the implicit project of the host-wide options). Each has its own
        maintenance policy, time zone, contacts, hook and authorized group, every one
        defaulting to the host-wide option.
      '';
    };

    ceph = {
      conf = mkOption {
        type = absolutePath;
        default = "/etc/ceph/ceph.conf";
        description = "Ceph configuration file.";
      };
      clientId = mkOption {
        type = types.str;
        default = "admin";
        description = "Ceph client id (without `client.`).";
      };
      keyring = mkOption {
        type = types.nullOr absolutePath;
        default = null;
        description = "Keyring of that client; librados finds it through `conf` when null.";
      };
      pool = mkOption {
        type = types.str;
        default = "rbd";
        description = "Pool holding the VMs' disks.";
      };
      qemuClientId = mkOption {
        type = types.strMatching "[A-Za-z0-9_.-]+";
        default = "vmkeeper-qemu";
        description = ''
          Ceph client id (without `client.`) that QEMU connects as: a client of its own, not
          the daemon's, with caps limited to the pool, e.g. created with
          `ceph auth get-or-create client.vmkeeper-qemu mon 'profile rbd' osd 'profile rbd pool=rbd'`.
        '';
      };
      qemuKeyFile = mkOption {
        type = types.nullOr absolutePath;
        default = "/etc/ceph/ceph.client.vmkeeper-qemu.key";
        description = ''
          File holding only the bare base64 key of `qemuClientId`
          (`ceph auth get-key client.vmkeeper-qemu -o FILE`). The module keeps it readable by
          QEMU's user only (0400); QEMU reads it as a secret object. Never put the key into the
          Nix store. Null: QEMU's librados finds a keyring through
          `conf` itself, which QEMU's user must then be able to read.
        '';
      };
    };

    qemu = {
      package = mkOption {
        type = types.package;
        default = pkgs.qemu_kvm.override { cephSupport = true; };
        defaultText = literalExpression "pkgs.qemu_kvm.override { cephSupport = true; }";
        description = "QEMU, built with the RBD block driver (nixpkgs' default build lacks it).";
      };
      binary = mkOption {
        type = absolutePath;
        default = "${cfg.qemu.package}/bin/qemu-system-${pkgs.stdenv.hostPlatform.qemuArch}";
        defaultText = literalExpression ''"''${config.services.vmkeeper.qemu.package}/bin/qemu-system-''${pkgs.stdenv.hostPlatform.qemuArch}"'';
        description = "QEMU system emulator the VM units run.";
      };
      accel = mkOption {
        type = types.enum [
          "kvm"
          "tcg"
        ];
        default = "kvm";
        description = "Accelerator; `tcg` only for hosts whose KVM is unusable.";
      };
      machine = mkOption {
        type = types.str;
        default = if pkgs.stdenv.hostPlatform.isx86 then "q35" else "virt";
        defaultText = literalExpression ''if pkgs.stdenv.hostPlatform.isx86 then "q35" else "virt"'';
        description = "QEMU machine type.";
      };
      stopTimeout = mkOption {
        type = duration;
        default = "60s";
        description = "How long a graceful `system_powerdown` may take before harder means.";
      };
      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Arguments appended to every QEMU command line.";
      };
      maxConcurrentStarts = mkOption {
        type = types.ints.between 1 1000;
        default = 4;
        description = ''
          How many QEMUs may be starting at once on this host: a host that boots with many VMs
          starts them a few at a time, each holding its slot until its QEMU answers QMP.
        '';
      };
      user = mkOption {
        type = types.strMatching "[a-z_][a-z0-9_-]*";
        default = "vmkeeper-qemu";
        description = ''
          Unprivileged system user that every VM's QEMU runs as (one for all VMs; see
          docs/development/security.md). The module creates it, in the `kvm` group.
        '';
      };
    };

    removal.maxAtOnce = mkOption {
      type = types.ints.unsigned;
      default = 3;
      description = ''
        VMs scheduled for deletion at once for being removed from the configuration. When one
        change removes more, none of them is deleted until each is confirmed
        (`vmkeeper confirm-removal NAME`, or `removal.confirmed`): one accidental deploy must
        not shut down a host.
      '';
    };

    removal.confirmed = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Removed VMs whose deletion is confirmed although more were removed at once.";
    };

    clock.requireSync = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Destructive deletion stages (purge, delete-backups, release-name) wait while the clock
        is not known to be synchronized (`clock.syncedFlag`, systemd-timesyncd's
        `/run/systemd/timesync/synchronized` by default). Turn off only on hosts without a
        time synchronization daemon that keeps such a flag.
      '';
    };

    clock.syncedFlag = mkOption {
      type = types.str;
      default = "/run/systemd/timesync/synchronized";
      description = "The file whose existence says the clock is synchronized.";
    };

    metrics.listen = mkOption {
      type = types.nullOr listenAddress;
      default = null;
      example = "127.0.0.1:9848";
      description = ''
        Address and port of the Prometheus metrics listener (`/metrics`, OpenMetrics or
        Prometheus text); off when null. An address, not a host name; `[::1]:9848` for IPv6.
        The metrics carry VM names: listen on loopback or an internal network, and open the
        firewall for it yourself. A change takes effect when the daemon restarts.
      '';
    };

    monitoring.alertmanager.url = mkOption {
      type = types.nullOr alertmanagerUrl;
      default = null;
      example = "http://127.0.0.1:9093";
      description = ''
        Alertmanager (API v2, plain HTTP) that gets the monitoring downtimes as silences:
        every alert labelled `vm="<name>"` is silenced from a VM's deletion date until its name
        is released, and for each announced maintenance slot. An unreachable Alertmanager is
        retried with backoff and never delays a stage or a reboot.
      '';
    };

    vms = mkOption {
      type = types.attrsOf (types.submodule vmOptions);
      default = { };
      example = literalExpression ''
        {
          web01 = { cores = 2; memoryMiB = 4096; diskGiB = 50; ipAddresses = [ "192.0.2.10" ]; };
        }
      '';
      description = ''
        The declared VMs, by name (1 to 63 of `a-z`, `0-9` and `-`, starting with a
        letter). Removing a VM schedules its deletion for the earliest allowed date.
      '';
    };

    settings = mkOption {
      type = types.submodule { freeformType = jsonFormat.type; };
      default = { };
      example = {
        vms.web01.boot.append = "console=ttyS0";
      };
      description = ''
        Further keys of the JSON configuration, merged recursively over the ones generated
        from the options above (see docs/usage/configuration.md). Unknown keys make
        `nixos-rebuild` fail: the file is validated with `vmkeeper check-config` at build time.
      '';
    };

    configFile = mkOption {
      type = types.path;
      readOnly = true;
      description = "The generated and validated configuration file, /etc/vmkeeper/config.json.";
    };

    finalSettings = mkOption {
      type = jsonFormat.type;
      readOnly = true;
      internal = true;
      description = "The JSON document written to {option}`services.vmkeeper.configFile`.";
    };
  };
}
