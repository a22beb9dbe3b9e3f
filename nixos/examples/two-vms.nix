# A host with two VMs of two customers: web01 in the default project (the host-wide
# maintenance policy, contacts and group), db01 in project shop with its own time zone, night,
# contacts and group. docs/usage/nixos.md shows this file, and the NixOS VM test
# (nixos/tests/vmkeeper.nix) runs it.
{
  services.vmkeeper = {
    enable = true;

    timezone = "Europe/Berlin";
    maintenance = {
      # Tuesday and Thursday nights, announced a day ahead, one VM at a time.
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
    contacts = [ "ops@example.com" ];

    # A second customer: announcements go to its own contacts, its own group may reboot and
    # delete its VMs, its window is New York's night (on the host's Tuesdays and Thursdays).
    projects.shop = {
      timezone = "America/New_York";
      contacts = [ "it@shop.example" ];
      authorizedGroup = "shop-admins";
      maintenance.window = "01:00-05:00";
    };

    ceph.pool = "rbd";

    vms = {
      web01 = {
        cores = 2;
        memoryMiB = 2048;
        diskGiB = 50;
        ipAddresses = [ "192.0.2.10" ];
      };
      db01 = {
        project = "shop";
        cores = 4;
        memoryMiB = 4096;
        diskGiB = 100;
        ipAddresses = [ "192.0.2.11" ];
      };
    };
  };
}
