#!/usr/bin/env bash
# Offline checks of the Nix side (flake, NixOS module, tests), for CI without nixpkgs:
#   1. every .nix file parses (nix-instantiate --parse)
#   2. deadnix finds no dead code
#   3. formatting: nixpkgs-fmt --check (the flake's `formatter`)
#   4. with nixpkgs' lib/ folder alone:
#      - the module evaluation cases (nixos/tests/module-eval.nix, a list of named cases
#        with their expected outcome), for every system the flake has; prints how many ran
#        and passed, and each failed case with what went wrong;
#      - each case an option type must refuse fails with its expected message;
#      - every option has a row in docs/development/conventions.md, and docs/usage/nixos.md
#        shows the JSON the example generates;
#      - the flake with its nixpkgs input overridden by that lib: `nix build
#        .#checks.<system>.module-eval` (prints its summary), `nix flake check` (prints what
#        it checked, and which outputs it could not check and why), `nix flake show`.
#   Always: flake.lock pins nixpkgs, docs/usage/nixos.md shows nixos/examples/two-vms.nix.
#
# nixpkgs' lib/ is never copied into this repository. Default: ../shared/vendor/nixpkgs-lib
# relative to the repository root (the lib-only mirror nix-community/nixpkgs.lib at ef277d3d,
# which works with Debian 12's Nix 2.8); VMKEEPER_NIXPKGS_LIB=/path overrides it (a lib/
# folder, or a checkout holding one). Without one, step 4 is skipped, except under CI
# (CI=true), where a missing lib is a failure.
#
# Installs what it needs: nix-bin (apt), and deadnix and nixpkgs-fmt at pinned versions with
# `cargo install` once per machine, into VMKEEPER_CI_NIX_TOOLS (default
# /var/cache/vmkeeper-ci/nix-tools, next to CI's cached Rust build), niced and on one job.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SYSTEM="$(uname -m)-linux"
CI=${CI:-false}
export PATH="$HOME/.cargo/bin:$PATH"
# Root without nix-daemon, no build users, no sandbox, no binary cache (no network here).
export NIX_CONFIG=$'experimental-features = nix-command flakes\nbuild-users-group =\nsandbox = false\nsubstituters =\nwarn-dirty = false'

# The Nix tools, pinned: a new version may format or report differently.
DEADNIX_VERSION=1.3.1
NIXPKGS_FMT_VERSION=1.3.0
NIX_TOOLS=${VMKEEPER_CI_NIX_TOOLS:-/var/cache/vmkeeper-ci/nix-tools}
if ! mkdir -p "$NIX_TOOLS" 2>/dev/null || [ ! -w "$NIX_TOOLS" ]; then
  NIX_TOOLS=${XDG_CACHE_HOME:-$HOME/.cache}/vmkeeper/nix-tools
  mkdir -p "$NIX_TOOLS"
fi

pass=0
fail=0
skipped=()
now_ms() { date +%s%3N; }
step() {
  local name=$1 t0 rc
  shift
  t0=$(now_ms)
  "$@"
  rc=$?
  if [ "$rc" -eq 0 ]; then
    printf 'ok    %-62s %6d ms\n' "$name" $(($(now_ms) - t0))
    pass=$((pass + 1))
  else
    printf 'FAIL  %-62s %6d ms\n' "$name" $(($(now_ms) - t0))
    fail=$((fail + 1))
  fi
}

need_nix() {
  command -v nix-instantiate >/dev/null && return 0
  echo "installing nix-bin (apt)" >&2
  apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends nix-bin >/dev/null 2>&1 ||
    { apt-get -o DPkg::Lock::Timeout=600 update >/dev/null 2>&1 &&
      apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends nix-bin >/dev/null; }
}

# need_tool CRATE VERSION: $NIX_TOOLS/bin/CRATE at that version, installed when it is not.
tool_is() { [ "$("$NIX_TOOLS/bin/$1" --version 2>/dev/null)" = "$1 $2" ]; }
need_tool() {
  local crate=$1 version=$2 t0 rc
  tool_is "$crate" "$version" && return 0
  # One install at a time per machine (two CI runs, or CI and a developer).
  exec 9>"$NIX_TOOLS/.lock"
  flock 9
  if ! tool_is "$crate" "$version"; then
    echo "      installing $crate $version into $NIX_TOOLS (cargo install, once per machine)"
    t0=$(now_ms)
    # Its own build directory: not CI's target dir (CARGO_TARGET_DIR), removed afterwards.
    CARGO_TARGET_DIR="$NIX_TOOLS/build" nice -n 19 \
      cargo install --locked -j 1 --quiet --force --root "$NIX_TOOLS" --version "=$version" "$crate"
    rc=$?
    rm -rf "$NIX_TOOLS/build"
    echo "      installed $crate $version in $((($(now_ms) - t0) / 1000)) s (rc $rc)"
    tool_is "$crate" "$version" || rc=1
  fi
  flock -u 9
  exec 9>&-
  return "${rc:-0}"
}

# docs/usage/nixos.md shows the example the VM test runs, character for character.
docs_example_verbatim() {
  python3 - "$ROOT" <<'PY'
import sys
root = sys.argv[1]
doc = open(f"{root}/docs/usage/nixos.md").read()
block = doc.split("<!-- verbatim: nixos/examples/two-vms.nix -->\n```nix\n", 1)[1].split("```", 1)[0]
sys.exit(0 if block == open(f"{root}/nixos/examples/two-vms.nix").read() else 1)
PY
}

nix_files() {
  git -C "$ROOT" ls-files --cached --others --exclude-standard -z -- '*.nix'
}

parse_all() {
  local f rc=0
  while IFS= read -r -d '' f; do
    nix-instantiate --parse "$ROOT/$f" >/dev/null || { echo "  does not parse: $f" >&2; rc=1; }
  done < <(nix_files)
  return $rc
}

deadnix_all() {
  local files=()
  mapfile -d '' files < <(nix_files)
  (cd "$ROOT" && "$NIX_TOOLS/bin/deadnix" --fail --no-underscore "${files[@]}")
}

format_all() {
  local files=()
  mapfile -d '' files < <(nix_files)
  local out
  out=$(cd "$ROOT" && "$NIX_TOOLS/bin/nixpkgs-fmt" --check "${files[@]}" 2>&1) || { echo "$out" >&2; return 1; }
}

# --- the module evaluation --------------------------------------------------------------
LIB_DEFAULT=$ROOT/../shared/vendor/nixpkgs-lib
find_lib() {
  local c=${VMKEEPER_NIXPKGS_LIB:-$LIB_DEFAULT}
  [ -f "$c/lib/modules.nix" ] && c="$c/lib"
  [ -f "$c/modules.nix" ] && [ -f "$c/default.nix" ] || return 1
  c=$(cd "$c" && pwd)
  case "$c/" in "$ROOT"/*)
    echo "  $c is inside the repository; keep nixpkgs' lib outside it" >&2
    return 1
    ;;
  esac
  echo "$c"
}

module_eval_expr() { # SYSTEM: nixos/tests/module-eval.nix for SYSTEM, as a Nix expression
  echo "(import $ROOT/nixos/tests/module-eval.nix { lib = import $LIB; system = \"$1\"; })"
}

eval_cases() {
  local system out rc=0
  for system in "${SYSTEMS[@]}"; do
    out=$(nix-instantiate --eval --strict --json -E "$(module_eval_expr "$system").summary") || return 1
    python3 -c '
import json, sys
s = json.loads(sys.argv[1])
for f in s["failed"]:
    print("  case failed:", f["name"], file=sys.stderr)
    for p in f["problems"]:
        print("    " + p, file=sys.stderr)
print("  {}/{} module evaluation cases ran and passed ({})".format(s["passed"], s["total"], sys.argv[2]))
sys.exit(1 if s["failed"] or s["passed"] != s["total"] else 0)
' "$out" "$system" || rc=1
  done
  return $rc
}

# Each case that an option type must refuse fails evaluation with its expected message.
refusals_named() {
  local refusals name want err rc=0 n=0
  refusals=$(nix-instantiate --eval --strict --json -E "$(module_eval_expr "$SYSTEM").summary.refused" |
    python3 -c 'import json, sys; [print(r["name"] + "\t" + r["refused"]) for r in json.load(sys.stdin)]') || return 1
  while IFS=$'\t' read -r name want; do
    n=$((n + 1))
    if err=$(nix-instantiate --eval --strict --argstr name "$name" \
      -E "{ name }: $(module_eval_expr "$SYSTEM").refusedSettings name" 2>&1 >/dev/null); then
      echo "  $name: evaluated without error" >&2
      rc=1
    elif ! grep -qF "$want" <<<"$err"; then
      echo "  $name: unexpected error (want: $want):" >&2
      echo "$err" >&2
      rc=1
    else
      echo "  refused: $(grep -F "$want" <<<"$err" | head -1 | sed -e 's/^ *error: //' -e 's/ Definition values:$//')"
    fi
  done <<<"$refusals"
  [ "$n" -gt 0 ] || { echo "  no refused cases" >&2; return 1; }
  return $rc
}

eval_json() {
  nix-instantiate --eval --strict --json -E "$(module_eval_expr "$SYSTEM").$1"
}

# docs/development/conventions.md has a table row for every option.
options_documented() {
  local names
  names=$(eval_json optionNames) || return 1
  python3 - "$names" "$ROOT/docs/development/conventions.md" <<'PY'
import json, sys
names = [n.removeprefix("services.vmkeeper.") for n in json.loads(sys.argv[1])]
table = open(sys.argv[2]).read()
missing = [n for n in names if f"| `{n}`" not in table]
for n in missing:
    print("  option missing from docs/development/conventions.md:", n, file=sys.stderr)
print(f"  {len(names) - len(missing)}/{len(names)} options documented")
sys.exit(1 if missing else 0)
PY
}

# The JSON shown in docs/usage/nixos.md is what the module generates from the example.
docs_json_matches() {
  local generated
  generated=$(eval_json exampleSettings) || return 1
  python3 - "$generated" "$ROOT/docs/usage/nixos.md" <<'PY'
import json, sys
generated = json.loads(sys.argv[1])
doc = open(sys.argv[2]).read()
block = doc.split("<!-- generated from the example above -->", 1)[1].split("```json", 1)[1].split("```", 1)[0]
shown = json.loads(block)
for d in (generated, shown):
    d["qemu"].pop("binary")
if shown != generated:
    print("  docs/usage/nixos.md shows:\n" + json.dumps(shown, indent=2, sort_keys=True), file=sys.stderr)
    print("  the module generates:\n" + json.dumps(generated, indent=2, sort_keys=True), file=sys.stderr)
    sys.exit(1)
PY
}

# The flake's outputs, as paths (checks.x86_64-linux.module-eval), without building or
# forcing any: with nixpkgs = lib only (what this CI has) and with full nixpkgs (never
# evaluated beyond the names), to say what the lib-only flake check cannot see.
flake_outputs() {
  nix-instantiate --eval --strict --json -E "
    let
      lib = import $LIB;
      flake = import $ROOT/flake.nix;
      outputs = nixpkgs: let o = flake.outputs { self = o; inherit nixpkgs; }; in o;
      perSystem = [ \"checks\" \"packages\" \"devShells\" \"apps\" \"legacyPackages\" ];
      paths = o: lib.concatLists (lib.mapAttrsToList
        (out: v:
          if lib.elem out perSystem then
            lib.concatLists (lib.mapAttrsToList (sys: s: map (n: \"\${out}.\${sys}.\${n}\") (lib.attrNames s)) v)
          else map (n: \"\${out}.\${n}\") (lib.attrNames v))
        o);
    in {
      libOnly = paths (outputs { inherit lib; });
      full = paths (outputs { inherit lib; legacyPackages = throw \"no nixpkgs here\"; });
    }"
}

# The flake with its nixpkgs input replaced by a flake that holds only lib/.
make_lib_flake() {
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  STUB=$TMP/nixpkgs
  mkdir "$STUB"
  cp -r "$LIB" "$STUB/lib"
  chmod -R u+w "$STUB" # the vendored copy is read-only
  echo '{ outputs = _: { lib = import ./lib; }; }' >"$STUB/flake.nix"
}
flake_ref() {
  # A git checkout is read through git (tracked files only; target/ is not copied).
  if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then echo "git+file://$ROOT"; else echo "path:$ROOT"; fi
}
nix_noise() {
  grep -v -e 'not writing modified lock file' -e 'Updated input' -e "^ *'" -e '→' \
    -e '^evaluating flake' -e '^running flake checks' -e '^building .*\.drv'"'"'\.\.\.$'
}
flake_module_eval() {
  local json rc
  json=$(nix build "$(flake_ref)#checks.$SYSTEM.module-eval" --override-input nixpkgs "path:$STUB" \
    --no-write-lock-file --no-link --json 2>"$TMP/build.err")
  rc=$?
  nix_noise <"$TMP/build.err" >&2
  [ "$rc" -eq 0 ] || return "$rc"
  # The check's output is its summary: the case count and every case's name.
  sed 's/^/  /' "$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])[0]["outputs"]["out"])' "$json")"
}
flake_check() {
  local rc shape
  nix flake check "$(flake_ref)" --override-input nixpkgs "path:$STUB" --no-write-lock-file 2>&1 | nix_noise
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || return "$rc"
  shape=$(flake_outputs) || return 1
  python3 - "$shape" "$SYSTEM" <<'PY'
import json, sys
shape, system = json.loads(sys.argv[1]), sys.argv[2]
lib_only, full = shape["libOnly"], shape["full"]
def show(paths):
    return "\n".join("      " + p for p in paths)
built = [p for p in lib_only if p.startswith(f"checks.{system}.")]
evaluated = [p for p in lib_only if p.startswith("checks.") and p not in built]
shaped = [p for p in lib_only if not p.startswith("checks.")]
print("  nix flake check with nixpkgs = lib only:")
print("    built:\n" + show(built))
print("    evaluated, not built (another system; module-eval's cases run at evaluation, so"
      " they hold there too):\n" + show(evaluated))
print("    checked for their shape only (a NixOS module, an overlay `final: prev:`), not"
      " applied; the module evaluation cases evaluate ./nixos itself:\n" + show(shaped))
missing = [p for p in full if p not in lib_only]
print("    not checked: these outputs need nixpkgs' packages (stdenv, rustPlatform, deadnix and"
      " nixpkgs-fmt from nixpkgs, testers.runNixOSTest with a KVM builder), which this CI"
      " cannot fetch, so the lib-only flake does not have them; a machine with nixpkgs runs"
      " them with a plain `nix flake check`:\n" + show(missing))
extra = [p for p in lib_only if p not in full]
if extra:
    print("  outputs only without nixpkgs (?):\n" + show(extra), file=sys.stderr)
    sys.exit(1)
PY
}
flake_show() {
  local out
  out=$(nix flake show "$(flake_ref)" --override-input nixpkgs "path:$STUB" --no-write-lock-file 2>"$TMP/show.err") ||
    { grep -m1 '^error' "$TMP/show.err" >&2; return 1; }
  # Without nixpkgs' packages the package outputs cannot be listed; the rest must be there.
  local want
  for want in "module-eval" "nixosModules" "NixOS module" "overlays" "Nixpkgs overlay"; do
    grep -q "$want" <<<"$out" || { echo "  nix flake show lacks: $want" >&2; return 1; }
  done
  sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/  /' <<<"$out"
}
flake_lock_pinned() {
  nix flake metadata "$(flake_ref)" --json 2>/dev/null | python3 -c '
import json, sys
locked = json.load(sys.stdin)["locks"]["nodes"]["nixpkgs"]["locked"]
print("  nixpkgs pinned at", locked["owner"] + "/" + locked["repo"], locked["rev"])
sys.exit(0 if locked.get("narHash") and locked.get("rev") else 1)
'
}

T0=$(now_ms)
need_nix || { echo "FAIL  nix is not installed and could not be installed"; exit 1; }
echo "      $(nix --version), CI=$CI"
step "every .nix file parses" parse_all
for tool in "deadnix $DEADNIX_VERSION" "nixpkgs-fmt $NIXPKGS_FMT_VERSION"; do
  # shellcheck disable=SC2086 # "crate version"
  need_tool $tool || { echo "FAIL  $tool could not be installed"; fail=$((fail + 1)); }
done
tool_is deadnix "$DEADNIX_VERSION" && step "deadnix $DEADNIX_VERSION finds nothing" deadnix_all
tool_is nixpkgs-fmt "$NIXPKGS_FMT_VERSION" && step "nixpkgs-fmt $NIXPKGS_FMT_VERSION --check" format_all
step "flake.lock pins nixpkgs" flake_lock_pinned
step "docs/usage/nixos.md shows nixos/examples/two-vms.nix verbatim" docs_example_verbatim

if LIB=$(find_lib); then
  echo "      nixpkgs lib: $LIB"
  SYSTEMS=()
  mapfile -t SYSTEMS < <(flake_outputs | python3 -c '
import json, sys
print("\n".join(sorted({p.split(".")[1] for p in json.load(sys.stdin)["libOnly"] if p.endswith(".module-eval")})))')
  [ ${#SYSTEMS[@]} -gt 0 ] || SYSTEMS=("$SYSTEM")
  step "module evaluation cases (lib.evalModules), ${SYSTEMS[*]}" eval_cases
  step "option types refuse what they must, naming the option" refusals_named
  step "every option is in docs/development/conventions.md" options_documented
  step "docs/usage/nixos.md shows the JSON the example generates" docs_json_matches
  make_lib_flake
  step "nix build .#checks.$SYSTEM.module-eval (nixpkgs = lib only)" flake_module_eval
  step "nix flake check (nixpkgs = lib only)" flake_check
  step "nix flake show (nixpkgs = lib only)" flake_show
elif [ "$CI" = true ]; then
  echo "FAIL  module evaluation: no nixpkgs lib at ${VMKEEPER_NIXPKGS_LIB:-$LIB_DEFAULT} (CI needs it: ../shared/vendor/nixpkgs-lib next to the clone, or VMKEEPER_NIXPKGS_LIB)"
  fail=$((fail + 1))
else
  echo "skip  module evaluation: skipped: no nixpkgs lib at ${VMKEEPER_NIXPKGS_LIB:-$LIB_DEFAULT} (set VMKEEPER_NIXPKGS_LIB; under CI=true this fails)"
  skipped+=("module evaluation")
fi

echo "$pass passed, $fail failed, ${#skipped[@]} skipped in $(($(now_ms) - T0)) ms"
[ "$fail" -eq 0 ]
