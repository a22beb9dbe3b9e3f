# What the vmkeeper module touches outside itself, declared for lib.evalModules without
# nixpkgs: the NixOS options it sets and the few pkgs attributes it reads. Enough to
# evaluate the module with nixpkgs' lib folder alone (this repository's offline CI); the
# derivations here are never built.
{ lib, system }:

let
  inherit (lib) mkOption types;

  stubDerivation =
    name:
    derivation {
      inherit name system;
      builder = "/bin/sh";
      args = [
        "-c"
        "echo 'eval-only stub, not buildable' >&2; exit 1"
      ];
    };

  # pkgs.formats.json as nixpkgs defines its type; generate returns an unbuildable stub.
  jsonValue =
    types.nullOr
      (
        types.oneOf [
          types.bool
          types.int
          types.float
          types.str
          types.path
          (types.attrsOf jsonValue)
          (types.listOf jsonValue)
        ]
      )
    // {
      description = "JSON value";
    };

  pkgs = {
    formats.json = _: {
      type = jsonValue;
      generate = name: _value: stubDerivation name;
    };
    runCommand =
      name: _env: _script:
      stubDerivation name;
    coreutils = stubDerivation "coreutils";
    qemu_kvm = stubDerivation "qemu" // {
      override = _: stubDerivation "qemu-with-rbd";
    };
    stdenv.hostPlatform = lib.systems.elaborate system;
  };

  freeform = types.submodule { freeformType = types.lazyAttrsOf types.raw; };
in
{
  package = stubDerivation "vmkeeper" // {
    meta.mainProgram = "vmkeeper";
    catalog = "lib/systemd/catalog/vmkeeper.catalog";
  };

  module = {
    config._module.args.pkgs = pkgs;

    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      warnings = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      environment.etc = mkOption {
        type = types.attrsOf (
          types.submodule {
            options.source = mkOption { type = types.path; };
          }
        );
        default = { };
      };
      environment.systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      users.groups = mkOption {
        type = types.attrsOf freeform;
        default = { };
      };
      users.users = mkOption {
        type = types.attrsOf freeform;
        default = { };
      };
      systemd.package = mkOption {
        type = types.package;
        default = stubDerivation "systemd";
      };
      systemd.tmpfiles.rules = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      systemd.services = mkOption {
        type = types.attrsOf (
          types.submodule {
            freeformType = types.lazyAttrsOf types.raw;
            options = {
              wantedBy = mkOption {
                type = types.listOf types.str;
                default = [ ];
              };
              after = mkOption {
                type = types.listOf types.str;
                default = [ ];
              };
              reloadTriggers = mkOption {
                type = types.listOf types.unspecified;
                default = [ ];
              };
              serviceConfig = mkOption {
                type = types.lazyAttrsOf types.raw;
                default = { };
              };
            };
          }
        );
        default = { };
      };
    };
  };
}
