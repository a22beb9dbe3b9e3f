# NixOS VM test: a host with a single-node Ceph (nixpkgs' ceph module) runs the documented
# example (../examples/two-vms.nix). Each VM boots a guest whose initrd writes the size of
# its disk and its CPU count, as the guest sees them, into the disk's first sector every
# second, so the test reads the guest's view straight from RBD. Configuration changes are applied the way an
# operator applies them: switch-to-configuration into a specialisation, which reloads the
# daemon and must not restart it or any VM.
#
#   grown       web01.diskGiB 50 -> 60: grown live, the guest sees 60 GiB
#   more-cores  and web01.cores 2 -> 3: pending, with a maintenance slot in `vmkeeper plan`
#   deleting    and db01.deleteAt: the deletion stages appear in `systemctl list-timers`
{ self }:

let
  fsid = "066ae264-2a5d-4729-8001-6ad265f50b03";
  osd = {
    key = "AQBCEJNa3s8nHRAANvdsr93KqzBznuIWm2gOGg==";
    uuid = "55ba2294-3e24-478f-bee0-9dca4c231dd9";
  };
  deleteAt = "2099-01-15";
  gib = 1024 * 1024 * 1024;
  sectors = diskGiB: toString (diskGiB * gib / 512);
in
{
  name = "vmkeeper";

  nodes.host =
    { config, lib, pkgs, ... }:
    let
      # A guest that never leaves its initrd: stage 1 loads virtio_blk and then reports.
      guest = pkgs.nixos {
        boot.initrd.systemd.enable = false;
        boot.initrd.kernelModules = [
          "virtio_pci"
          "virtio_blk"
        ];
        boot.initrd.postDeviceCommands = ''
          while true; do
            if [ -e /sys/block/vda/size ]; then
              size=$(cat /sys/block/vda/size)
              cpus=$(grep -c ^processor /proc/cpuinfo)
              echo "VMSIZE vda=$size cpus=$cpus"
              printf 'VMSIZE vda=%s cpus=%s\n' "$size" "$cpus" |
                dd of=/dev/vda bs=512 count=1 conv=sync,notrunc,fsync 2>/dev/null || true
            fi
            sleep 1
          done
        '';
        boot.loader.grub.enable = false;
        fileSystems."/".device = "/dev/vda";
        system.stateVersion = "25.11";
      };
      guestBoot = {
        kernel = "${guest.config.system.build.kernel}/${guest.config.system.boot.loader.kernelFile}";
        initrd = "${guest.config.system.build.initialRamdisk}/${guest.config.system.boot.loader.initrdFile}";
        append = "console=ttyS0 panic=-1";
      };
    in
    {
      imports = [
        self.nixosModules.default
        ../examples/two-vms.nix
      ];

      virtualisation = {
        memorySize = 6144;
        cores = 2;
        emptyDiskImages = [ 20480 ];
      };
      # The guests' memory is reserved, not used: they run in their initrd.
      boot.kernel.sysctl."vm.overcommit_memory" = 1;
      boot.kernelModules = [ "xfs" ];

      environment.systemPackages = [
        pkgs.ceph
        pkgs.xfsprogs
        pkgs.jq
      ];

      services.ceph = {
        enable = true;
        global = {
          inherit fsid;
          monHost = config.networking.primaryIPAddress;
          monInitialMembers = "a";
        };
        # One OSD holds the only copy.
        extraConfig = {
          "osd pool default size" = "1";
          "osd pool default min size" = "1";
          "osd pool default pg num" = "8";
          "osd pool default pgp num" = "8";
          "osd crush chooseleaf type" = "0";
          "mon allow pool size one" = "true";
          "mon warn on pool no redundancy" = "false";
        };
        mon = {
          enable = true;
          daemons = [ "a" ];
        };
        osd = {
          enable = true;
          daemons = [ "0" ];
          extraConfig = { };
        };
      };

      services.vmkeeper = {
        # Nested KVM is not a given on CI runners.
        qemu.accel = "tcg";
        vms.web01.boot = guestBoot;
        vms.db01.boot = guestBoot;
      };
      # Started by the test script once Ceph is bootstrapped.
      systemd.services.vmkeeper.wantedBy = lib.mkForce [ ];

      specialisation = {
        grown.configuration.services.vmkeeper.vms.web01.diskGiB = lib.mkForce 60;
        more-cores.configuration.services.vmkeeper.vms.web01 = {
          diskGiB = lib.mkForce 60;
          cores = lib.mkForce 3;
        };
        deleting.configuration.services.vmkeeper.vms = {
          web01 = {
            diskGiB = lib.mkForce 60;
            cores = lib.mkForce 3;
          };
          db01.deleteAt = deleteAt;
        };
      };
    };

  testScript =
    { nodes, ... }:
    let
      host = nodes.host;
      toplevel = host.system.build.toplevel;
      catalog = host.services.vmkeeper.package.catalog or null;
    in
    ''
      import re

      ip = "${host.networking.primaryIPAddress}"


      def switch_to(name):
          out = host.succeed(
              f"${toplevel}/specialisation/{name}/bin/switch-to-configuration test 2>&1"
          )
          assert not re.search(r"(stopping|restarting) the following units:.*vmkeeper", out), out


      def invocation(unit):
          return host.succeed(f"systemctl show -p InvocationID --value {unit}").strip()


      def guest_sees(vm, size, cpus):
          # The guest writes "VMSIZE vda=<sectors> cpus=<n>" into its disk's first sector.
          host.wait_until_succeeds(
              f"rados -p rbd get \"$(rbd info rbd/{vm} --format json | jq -r .block_name_prefix)\".0000000000000000 /tmp/{vm}.head"
              f" && head -c 64 /tmp/{vm}.head | grep -a -q 'VMSIZE vda={size} cpus={cpus}$'",
              timeout=600,
          )


      start_all()
      host.wait_for_unit("multi-user.target")

      with subtest("single-node Ceph with an rbd pool"):
          host.succeed(
              "runuser -u ceph -- ceph-authtool --create-keyring /tmp/ceph.mon.keyring --gen-key -n mon. --cap mon 'allow *'",
              "runuser -u ceph -- ceph-authtool --create-keyring /etc/ceph/ceph.client.admin.keyring --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *'",
              "runuser -u ceph -- ceph-authtool /tmp/ceph.mon.keyring --import-keyring /etc/ceph/ceph.client.admin.keyring",
              f"monmaptool --create --add a {ip} --fsid ${fsid} /tmp/monmap",
              "runuser -u ceph -- ceph-mon --mkfs -i a --monmap /tmp/monmap --keyring /tmp/ceph.mon.keyring",
              "runuser -u ceph -- touch /var/lib/ceph/mon/ceph-a/done",
              "systemctl start ceph-mon-a",
          )
          host.wait_for_unit("ceph-mon-a")
          host.wait_until_succeeds("ceph -s | grep 'mon: 1 daemons'")
          host.succeed(
              "mkfs.xfs /dev/vdb",
              "mkdir -p /var/lib/ceph/osd/ceph-0",
              "mount /dev/vdb /var/lib/ceph/osd/ceph-0",
              "ceph-authtool --create-keyring /var/lib/ceph/osd/ceph-0/keyring --name osd.0 --add-key ${osd.key}",
              """echo '{"cephx_secret": "${osd.key}"}' | ceph osd new ${osd.uuid} -i -""",
              "ceph-osd -i 0 --mkfs --osd-uuid ${osd.uuid}",
              "chown -R ceph:ceph /var/lib/ceph/osd",
              "systemctl start ceph-osd-0",
          )
          host.wait_until_succeeds("ceph osd stat | grep -E '1 osds: 1 up[^,]*, 1 in'")
          host.succeed("ceph osd pool create rbd 8 8", "rbd pool init rbd")
          # QEMU's own client, limited to the pool; its bare key where the module expects it.
          host.succeed(
              "ceph auth get-or-create client.vmkeeper-qemu mon 'profile rbd' osd 'profile rbd pool=rbd'",
              "ceph auth get-key client.vmkeeper-qemu -o /etc/ceph/ceph.client.vmkeeper-qemu.key",
              "systemd-tmpfiles --create",
              "test $(stat -c %a:%U /etc/ceph/ceph.client.vmkeeper-qemu.key) = 400:vmkeeper-qemu",
          )

      with subtest("the module's pieces are in place"):
          host.succeed("getent group sudo-srv")
          host.succeed("id vmkeeper-qemu | grep -q kvm")
          host.succeed("getent group shop-admins")
          host.succeed("vmkeeper check-config /etc/vmkeeper/config.json")
          host.succeed("systemctl show -p Type --value vmkeeper.service | grep -x notify")

      with subtest("the declared VMs run in their units"):
          host.succeed("systemctl start vmkeeper.service")
          host.wait_for_unit("vmkeeper.service")
          host.wait_for_unit("vmkeeper-vm-web01.service")
          host.wait_for_unit("vmkeeper-vm-db01.service")
          guest_sees("web01", "${sectors 50}", 2)
          guest_sees("db01", "${sectors 100}", 4)
          # QEMU runs unprivileged and sandboxed.
          pid = host.succeed("systemctl show -p MainPID --value vmkeeper-vm-web01.service").strip()
          status = host.succeed(f"cat /proc/{pid}/status")
          assert re.search(r"^Uid:\s+[1-9]", status, re.M), status
          assert re.search(r"^CapEff:\s+0+$", status, re.M), status
          assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
          assert re.search(r"^Seccomp:\s+2$", status, re.M), status
          print(host.succeed("systemd-analyze security vmkeeper-vm-web01.service vmkeeper.service"))
          daemon = invocation("vmkeeper.service")
          web01 = invocation("vmkeeper-vm-web01.service")
          db01 = invocation("vmkeeper-vm-db01.service")

      with subtest("a grown disk reaches the running guest; the switch only reloads"):
          switch_to("grown")
          guest_sees("web01", "${sectors 60}", 2)
          host.succeed("rbd info rbd/web01 --format json | jq -e '.size == ${toString (60 * gib)}'")
          assert invocation("vmkeeper.service") == daemon, "the switch restarted the daemon"
          assert invocation("vmkeeper-vm-web01.service") == web01, "the disk grow restarted web01"

      with subtest("a CPU change is pending with its maintenance slot"):
          switch_to("more-cores")
          host.wait_until_succeeds("systemctl list-timers --all --no-pager | grep -q vmkeeper-maint-web01.timer")
          plan = host.succeed("vmkeeper plan --config /etc/vmkeeper/config.json")
          pending = [
              line for line in plan.splitlines()
              if "web01" in line and re.search(r"pending", line, re.I)
          ]
          assert pending, f"no pending change for web01 in the plan:\n{plan}"
          assert any(re.search(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d", line) for line in pending), \
              f"the pending change of web01 has no slot:\n{plan}"
          # The VM keeps running with its old values until its maintenance slot.
          assert invocation("vmkeeper-vm-web01.service") == web01, "the CPU change restarted web01"
          guest_sees("web01", "${sectors 60}", 2)

      with subtest("a scheduled deletion shows its stages as timers"):
          switch_to("deleting")
          host.wait_until_succeeds("systemctl list-timers --all --no-pager | grep -q 'vmkeeper-delete-db01-'")
          print(host.succeed("systemctl list-timers --all --no-pager 'vmkeeper-*'"))
          assert invocation("vmkeeper-vm-db01.service") == db01, "scheduling the deletion stopped db01"
          assert invocation("vmkeeper.service") == daemon, "a switch restarted the daemon"
    ''
    + (
      if catalog == null then
        ""
      else
        ''

          with subtest("the journal catalog explains vmkeeper's messages"):
              first_id = host.succeed(
                  "grep -m1 -E '^-- [0-9a-fA-F]{32}' ${host.services.vmkeeper.package}/${catalog} | cut -c4-35"
              ).strip().lower()
              host.succeed(f"journalctl --list-catalog --no-pager | grep -i -q '^{first_id}'")
        ''
    );
}
