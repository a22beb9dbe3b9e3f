# vmkeeper built from this repository's Cargo.lock, linked against nixpkgs' librbd and librados.
{ lib
, rustPlatform
, pkg-config
, ceph
,
}:

let
  root = ../.;
  catalog = ../dist/vmkeeper.catalog;
in
rustPlatform.buildRustPackage {
  pname = "vmkeeper";
  inherit ((lib.importTOML ../Cargo.toml).package) version;

  # Only what cargo needs: editing docs or Nix files must not rebuild the binary.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../src
      (lib.fileset.maybeMissing ../build.rs)
      (lib.fileset.maybeMissing ../examples)
      (lib.fileset.maybeMissing ../tests)
      (lib.fileset.maybeMissing ../benches)
      (lib.fileset.maybeMissing ../dist)
    ];
  };

  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [ pkg-config ];
  # The crate links `rbd` and `rados` with #[link]; ceph's dev output propagates the libraries.
  buildInputs = [ ceph ];

  # The integration tests need a running systemd, a Ceph cluster and QEMU, none of which
  # exist in the build sandbox; they run in the NixOS VM test instead. Unit tests of the
  # pure core run here.
  cargoTestFlags = [ "--lib" ];

  # The journald catalog gives every MESSAGE_ID an explanation in `journalctl -x`; the
  # NixOS module links it where journalctl looks (its `catalog` attribute says it is there).
  postInstall = lib.optionalString (builtins.pathExists catalog) ''
    install -Dm444 dist/vmkeeper.catalog $out/lib/systemd/catalog/vmkeeper.catalog
    mkdir -p $out/share/vmkeeper/catalog
    ln -s $out/lib/systemd/catalog/vmkeeper.catalog $out/share/vmkeeper/catalog/vmkeeper.catalog
  '';

  passthru.catalog = if builtins.pathExists catalog then "lib/systemd/catalog/vmkeeper.catalog" else null;

  meta = {
    description = "Runs declared QEMU VMs with Ceph RBD disks, announced maintenance and staged deletion";
    mainProgram = "vmkeeper";
    platforms = lib.platforms.linux;
  };
}
