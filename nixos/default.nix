# services.vmkeeper: the JSON configuration (validated at build time), the hardened daemon
# service, the authorized group and the journal catalog. The VMs themselves are transient
# units that the daemon creates over D-Bus (vmkeeper-vm-<name>.service), so that a switch
# or a daemon restart never touches a running VM.
{ config
, lib
, pkgs
, ...
}:

let
  cfg = config.services.vmkeeper;
  jsonFormat = pkgs.formats.json { };

  # Fixed by the service's StateDirectory= and RuntimeDirectory= below.
  stateDir = "/var/lib/vmkeeper";
  runtimeDir = "/run/vmkeeper";
  configPath = "/etc/vmkeeper/config.json";

  hugeDiskGiB = 10240;
  catalog = cfg.package.catalog or null;

  dropNulls = lib.filterAttrs (_: v: v != null);
  pathString = p: if p == null then null else toString p;

  vmSettings =
    vm:
    dropNulls {
      inherit (vm)
        project
        cores
        memoryMiB
        memoryLimitMiB
        diskGiB
        allowHugeDisk
        online
        generation
        deleteAt
        ipAddresses
        ;
      image = if vm.image == null then null else dropNulls vm.image;
      network = vm.network;
      boot =
        if vm.boot == null then
          null
        else
          dropNulls {
            kernel = pathString vm.boot.kernel;
            initrd = pathString vm.boot.initrd;
            inherit (vm.boot) append;
          };
    };

  # A project's keys: only what it sets, so vmkeeper gives it the host-wide value for the rest.
  projectSettings =
    p:
    let
      maintenance = dropNulls {
        inherit (p.maintenance)
          window
          weekdays
          schedule
          announceAhead
          maxParallel
          expectedDuration
          ;
        blackouts = if p.maintenance.blackouts == [ ] then null else p.maintenance.blackouts;
      };
    in
    dropNulls {
      inherit (p) timezone contacts authorizedGroup;
      notifyCommand = pathString p.notifyCommand;
      maintenance = if maintenance == { } then null else maintenance;
    };

  generated = dropNulls {
    inherit (cfg) timezone contacts authorizedGroup operatorGroup;
    projects = if cfg.projects == { } then null else lib.mapAttrs (_: projectSettings) cfg.projects;
    inherit stateDir runtimeDir;
    notifyCommand = pathString cfg.notifyCommand;
    maintenance = dropNulls {
      inherit (cfg.maintenance)
        window
        weekdays
        schedule
        announceAhead
        maxParallel
        expectedDuration
        blackouts
        ;
    };
    ceph = dropNulls { inherit (cfg.ceph) conf clientId keyring pool qemuClientId qemuKeyFile; };
    qemu = {
      inherit (cfg.qemu)
        binary
        accel
        machine
        stopTimeout
        extraArgs
        user
        maxConcurrentStarts
        ;
    };
    metrics = if cfg.metrics.listen == null then null else { inherit (cfg.metrics) listen; };
    monitoring =
      if cfg.monitoring.alertmanager.url == null then
        null
      else
        { alertmanager = { inherit (cfg.monitoring.alertmanager) url; }; };
    removal = { inherit (cfg.removal) maxAtOnce confirmed; };
    clock = { inherit (cfg.clock) requireSync syncedFlag; };
    vms = lib.mapAttrs (_: vmSettings) cfg.vms;
  };

  unvalidated = jsonFormat.generate "vmkeeper-config-unvalidated.json" cfg.finalSettings;

  # Like nixpkgs' vector module: a configuration vmkeeper rejects fails the build, so
  # nixos-rebuild stops before anything on the host changes.
  validated =
    pkgs.runCommand "vmkeeper-config.json"
      {
        preferLocalBuild = true;
        nativeBuildInputs = [ cfg.package ];
      }
      ''
        vmkeeper check-config ${unvalidated}
        cp ${unvalidated} $out
      '';

  vmAssertions =
    name: vm:
    let
      where = "services.vmkeeper.vms.${name}";
      sharedIps = lib.filter (ip: lib.any (other: lib.elem ip other.ipAddresses) (otherVms name)) vm.ipAddresses;
    in
    [
      {
        assertion = builtins.match "[a-z][a-z0-9-]{0,62}" name != null;
        message = "${where}: the name must be 1 to 63 characters of a-z, 0-9 and '-', starting with a letter";
      }
      {
        assertion = vm.memoryMiB <= vm.memoryLimitMiB;
        message = "${where}: memoryMiB ${toString vm.memoryMiB} exceeds memoryLimitMiB ${toString vm.memoryLimitMiB} (the customer-facing limit is 64 GiB; an operator may raise memoryLimitMiB up to 131072)";
      }
      {
        assertion = vm.diskGiB < hugeDiskGiB || vm.allowHugeDisk;
        message = "${where}: diskGiB ${toString vm.diskGiB} is 10 TiB or more and needs allowHugeDisk = true (consider object storage instead)";
      }
      {
        assertion = sharedIps == [ ];
        message = "${where}: ipAddresses ${lib.concatStringsSep ", " sharedIps} also belong to another VM";
      }
      {
        assertion = vm.project == null || vm.project == "default" || cfg.projects ? ${vm.project};
        message = "${where}: project \"${toString vm.project}\" is not one of services.vmkeeper.projects (${lib.concatStringsSep ", " ([ "default" ] ++ lib.attrNames cfg.projects)})";
      }
    ];

  projectAssertions =
    name: p:
    let
      where = "services.vmkeeper.projects.${name}";
    in
    [
      {
        assertion = builtins.match "[a-z][a-z0-9-]{0,62}" name != null;
        message = "${where}: the name must be 1 to 63 characters of a-z, 0-9 and '-', starting with a letter";
      }
      {
        assertion = name != "default";
        message = "${where}: \"default\" is the project of the host-wide options; give this project another name";
      }
      {
        assertion = p.maintenance.schedule == null || (p.maintenance.window == null && p.maintenance.weekdays == null);
        message = "${where}.maintenance: schedule excludes window and weekdays";
      }
    ]
    ++ map
      (b: {
        assertion = b.from <= b.to;
        message = "${where}.maintenance.blackouts: ${b.from} to ${b.to} (${b.reason}) ends before it starts";
      })
      p.maintenance.blackouts;

  # The group that may act on each project's VMs, the host-wide one where it names none.
  projectGroup = p: if p.authorizedGroup == null then cfg.authorizedGroup else p.authorizedGroup;
  projectOf = vm: if vm.project == null then "default" else vm.project;
  usedProjects = lib.unique (map projectOf (lib.attrValues cfg.vms));
  groupOf = name: if name == "default" || !(cfg.projects ? ${name}) then cfg.authorizedGroup else projectGroup cfg.projects.${name};
  sharedGroupWarnings = lib.concatMap
    (name:
      let
        others = lib.filter (other: other < name && groupOf other == groupOf name) usedProjects;
      in
      lib.optional (others != [ ])
        "services.vmkeeper.projects.${name}: authorizedGroup ${groupOf name} is also that of project ${lib.head others}; its members may act on the VMs of both")
    usedProjects;

  otherVms = name: lib.attrValues (lib.filterAttrs (other: _: other != name) cfg.vms);
in
{
  imports = [ ./options.nix ];

  config = lib.mkIf cfg.enable {
    services.vmkeeper = {
      finalSettings = lib.recursiveUpdate generated cfg.settings;
      configFile = validated;
    };

    assertions = lib.concatLists (lib.mapAttrsToList vmAssertions cfg.vms)
      ++ lib.concatLists (lib.mapAttrsToList projectAssertions cfg.projects)
      ++ [
      {
        assertion =
          cfg.maintenance.schedule == null
            || (cfg.maintenance.window == null && cfg.maintenance.weekdays == null);
        message = "services.vmkeeper.maintenance: schedule excludes window and weekdays";
      }
      {
        assertion = !(cfg.settings ? stateDir || cfg.settings ? runtimeDir);
        message = "services.vmkeeper.settings: stateDir and runtimeDir are fixed by the service (${stateDir}, ${runtimeDir})";
      }
    ]
      ++ map
      (b: {
        assertion = b.from <= b.to;
        message = "services.vmkeeper.maintenance.blackouts: ${b.from} to ${b.to} (${b.reason}) ends before it starts";
      })
      cfg.maintenance.blackouts;

    warnings = lib.concatLists
      (
        lib.mapAttrsToList
          (
            name: vm:
              lib.optional (vm.diskGiB >= hugeDiskGiB && vm.allowHugeDisk)
                "services.vmkeeper.vms.${name}: a ${toString vm.diskGiB} GiB disk is allowed by allowHugeDisk; object storage is the better home for data of this size"
          )
          cfg.vms
      ) ++ sharedGroupWarnings;

    environment.etc."vmkeeper/config.json".source = cfg.configFile;
    environment.systemPackages = [ cfg.package ];

    # Every group that may act on VMs (the host-wide one, each project's, the operators'),
    # and QEMU's own.
    users.groups = lib.genAttrs
      (lib.unique ([ cfg.authorizedGroup cfg.qemu.user ]
        ++ map projectGroup (lib.attrValues cfg.projects)
        ++ lib.optional (cfg.operatorGroup != null) cfg.operatorGroup))
      (_: { });

    # QEMU's user: no login, no home, in kvm for /dev/kvm. One for all VMs (see
    # docs/development/security.md for why not one per VM).
    users.users.${cfg.qemu.user} = {
      isSystemUser = true;
      group = cfg.qemu.user;
      extraGroups = [ "kvm" ];
      description = "vmkeeper: QEMU of the VMs";
    };

    # NixOS' journalctl reads catalogs from systemd's own store path and from
    # /usr/local/lib/systemd/catalog only; the link and --update-catalog (ExecStartPre below)
    # make `journalctl -x` explain vmkeeper's MESSAGE_IDs.
    systemd.tmpfiles.rules = lib.optionals (catalog != null) [
      "d /usr/local/lib/systemd/catalog 0755 root root -"
      "L+ /usr/local/lib/systemd/catalog/vmkeeper.catalog - - - - ${cfg.package}/${catalog}"
    ]
    # QEMU's Ceph key: its directory exists, and the key (put there by the operator, never
    # through the store) is readable by QEMU's user only.
    ++ lib.optionals (cfg.ceph.qemuKeyFile != null) [
      "d ${dirOf cfg.ceph.qemuKeyFile} 0755 root root -"
      "z ${cfg.ceph.qemuKeyFile} 0400 ${cfg.qemu.user} ${cfg.qemu.user} -"
    ];

    systemd.services.vmkeeper = {
      description = "vmkeeper: supervisor of the declared VMs";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      # ceph.target orders a local cluster's daemons first; a remote one needs only the network.
      # time-sync.target: deletion dates are judged by the clock (and destructive stages
      # wait for it to be synchronized anyway).
      after = [
        "network-online.target"
        "ceph.target"
        "time-sync.target"
      ];

      # A changed configuration is re-read (SIGHUP): nixos-rebuild switch reloads instead of
      # restarting. A new binary restarts the daemon, which leaves the VM units running.
      reloadTriggers = [ cfg.configFile ];

      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        # "+": the catalog database under /var/lib/systemd is outside the sandbox below.
        ExecStartPre = lib.optional (catalog != null) "+${config.systemd.package}/bin/journalctl --update-catalog";
        ExecStart = "${lib.getExe cfg.package} daemon --config ${configPath}";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "on-failure";
        RestartSec = "5s";

        StateDirectory = "vmkeeper";
        StateDirectoryMode = "0700";
        RuntimeDirectory = "vmkeeper";
        RuntimeDirectoryMode = "0755";
        # QMP sockets and serial logs of running VMs live here; they outlive the daemon.
        RuntimeDirectoryPreserve = "yes";
        UMask = "0022";

        # Root, because it creates units through systemd's D-Bus API and reads the Ceph
        # keyring; CAP_CHOWN hands the VM directories to QEMU's user, CAP_NET_ADMIN makes the
        # tap devices; everything else is taken away.
        CapabilityBoundingSet = [
          "CAP_CHOWN"
          "CAP_DAC_OVERRIDE"
          "CAP_DAC_READ_SEARCH"
          "CAP_FOWNER"
          "CAP_KILL"
          "CAP_NET_ADMIN"
        ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        # librados may put its admin socket and log there; both are optional.
        ReadWritePaths = [
          "-/run/ceph"
          "-/var/log/ceph"
        ];
        ProtectHome = true;
        PrivateTmp = true;
        DevicePolicy = "closed";
        # /dev/net/tun: the daemon makes the VMs' tap devices (QEMU runs under its own sandbox).
        DeviceAllow = [ "/dev/net/tun rw" ];
        ProtectClock = true;
        ProtectControlGroups = true;
        ProtectHostname = true;
        ProtectKernelLogs = true;
        ProtectKernelModules = true;
        ProtectKernelTunables = true;
        RestrictAddressFamilies = [
          "AF_UNIX"
          "AF_INET"
          "AF_INET6"
          "AF_NETLINK"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@resources"
        ];
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
