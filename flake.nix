{
  description = "vmkeeper: declared QEMU VMs on Ceph RBD, with announced maintenance reboots and staged deletion";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = lib.genAttrs systems;
      pkgsFor = system: nixpkgs.legacyPackages.${system};
      # The offline CI overrides the nixpkgs input with nixpkgs' lib folder alone, which has
      # no packages; the outputs that need lib only are still there (scripts/nix-check.sh).
      withPackages = lib.optionalAttrs (nixpkgs ? legacyPackages);
    in
    {
      overlays.default = final: _prev: {
        vmkeeper = final.callPackage ./nix/package.nix { };
      };

      packages = withPackages (
        forAllSystems (system: {
          vmkeeper = (pkgsFor system).callPackage ./nix/package.nix { };
          default = self.packages.${system}.vmkeeper;
        })
      );

      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nixos ];
          services.vmkeeper.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };

      checks = forAllSystems (
        system:
        {
          module-eval = (import ./nixos/tests/module-eval.nix { inherit lib system; }).check;
        }
        // withPackages {
          package = self.packages.${system}.vmkeeper;
          # The same lint as scripts/nix-check.sh, for CI that has nixpkgs.
          nix-lint = (pkgsFor system).runCommand "vmkeeper-nix-lint"
            {
              nativeBuildInputs = [
                (pkgsFor system).deadnix
                (pkgsFor system).nixpkgs-fmt
              ];
            } ''
            deadnix --fail --no-underscore ${./.}
            nixpkgs-fmt --check ${./.}
            touch $out
          '';
          vm-test = (pkgsFor system).testers.runNixOSTest (import ./nixos/tests/vmkeeper.nix { inherit self; });
        }
      );

      formatter = withPackages (forAllSystems (system: (pkgsFor system).nixpkgs-fmt));
    };
}
