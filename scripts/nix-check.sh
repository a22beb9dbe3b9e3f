#!/usr/bin/env bash
# Offline checks of the Nix side (flake, NixOS module, tests), for CI without nixpkgs:
#   1. every .nix file parses (nix-instantiate --parse)
#   2. deadnix finds no dead code
#   3. formatting: nixpkgs-fmt --check (the flake's `formatter`)
#   4. the module evaluation check (nixos/tests/module-eval.nix) against nixpkgs' lib folder,
#      directly and as the flake's checks.<system>.module-eval (also via `nix flake check`);
#      a VM with 13 cores must fail evaluation with a message naming that VM; every option
#      has a row in docs/development/conventions.md; `nix flake show` lists the outputs.
#   Always: docs/usage/nixos.md shows nixos/examples/two-vms.nix verbatim, and (with lib)
#      the JSON that example generates.
# Step 4 needs a copy of nixpkgs' lib/ OUTSIDE this repository (never commit it):
#   VMKEEPER_NIXPKGS_LIB=/path/to/lib (or a nixpkgs / nixpkgs.lib checkout holding lib/),
#   default: ../nixpkgs-lib next to the repository. Without one, step 4 says it was skipped.
#   A copy that works with Debian's Nix 2.8: github.com/nix-community/nixpkgs.lib at ef277d3d.
# Installs what it needs: nix-bin (apt), deadnix and nixpkgs-fmt (cargo install --locked).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SYSTEM="$(uname -m)-linux"
export PATH="$HOME/.cargo/bin:$PATH"
# Root without nix-daemon, no build users, no sandbox, no binary cache (no network here).
export NIX_CONFIG=$'experimental-features = nix-command flakes\nbuild-users-group =\nsandbox = false\nsubstituters =\nwarn-dirty = false'

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
need_crate() {
  command -v "$1" >/dev/null && return 0
  echo "installing $1 (cargo install --locked)" >&2
  cargo install --locked --quiet "$1"
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
  (cd "$ROOT" && deadnix --fail --no-underscore "${files[@]}")
}

format_all() {
  local files=()
  mapfile -d '' files < <(nix_files)
  local out
  out=$(cd "$ROOT" && nixpkgs-fmt --check "${files[@]}" 2>&1) || { echo "$out" >&2; return 1; }
}

# --- the module evaluation --------------------------------------------------------------
find_lib() {
  local c=${VMKEEPER_NIXPKGS_LIB:-$ROOT/../nixpkgs-lib}
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

eval_cases() {
  local out
  out=$(nix-instantiate --eval --strict --json -E "
    (import $ROOT/nixos/tests/module-eval.nix { lib = import $LIB; system = \"$SYSTEM\"; }).cases
  ") || return 1
  # Print the failing case names, if any, before failing.
  python3 -c '
import json, sys
cases = json.loads(sys.argv[1])
bad = [name for name, ok in sorted(cases.items()) if not ok]
for name in bad:
    print("  case failed:", name, file=sys.stderr)
print(f"  {len(cases) - len(bad)}/{len(cases)} module evaluation cases hold")
sys.exit(1 if bad else 0)
' "$out"
}

too_many_cores_fails() {
  local err
  if err=$(nix-instantiate --eval --strict -E "
    (import $ROOT/nixos/tests/module-eval.nix { lib = import $LIB; system = \"$SYSTEM\"; }).tooManyCores
  " 2>&1 >/dev/null); then
    echo "  a VM with 13 cores evaluated without error" >&2
    return 1
  fi
  local want="option \`services.vmkeeper.vms.web01.cores' is not of type \`integer between 1 and 12"
  if ! grep -qF "$want" <<<"$err"; then
    echo "  unexpected error for 13 cores:" >&2
    echo "$err" >&2
    return 1
  fi
  echo "  $(grep -F "$want" <<<"$err" | sed 's/^ *//')"
}

eval_json() {
  nix-instantiate --eval --strict --json -E "
    (import $ROOT/nixos/tests/module-eval.nix { lib = import $LIB; system = \"$SYSTEM\"; }).$1
  "
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

# The flake with its nixpkgs input replaced by a flake that holds only lib/.
make_lib_flake() {
  STUB=$(mktemp -d)
  trap 'rm -rf "$STUB"' EXIT
  cp -r "$LIB" "$STUB/lib"
  echo '{ outputs = _: { lib = import ./lib; }; }' >"$STUB/flake.nix"
}
flake_ref() {
  # A git checkout is read through git (tracked files only; target/ is not copied).
  if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then echo "git+file://$ROOT"; else echo "path:$ROOT"; fi
}
flake_module_eval() {
  nix build "$(flake_ref)#checks.$SYSTEM.module-eval" --override-input nixpkgs "path:$STUB" \
    --no-write-lock-file --no-link 2>&1 | grep -v -e 'not writing modified lock file' -e 'Updated input' -e "^ *'" -e '→'
  return "${PIPESTATUS[0]}"
}
flake_check() {
  nix flake check "$(flake_ref)" --override-input nixpkgs "path:$STUB" --no-write-lock-file 2>&1 |
    grep -v -e 'not writing modified lock file' -e 'Updated input' -e "^ *'" -e '→' -e '^evaluating flake' -e '^running flake checks'
  return "${PIPESTATUS[0]}"
}
flake_show() {
  local out
  out=$(nix flake show "$(flake_ref)" --override-input nixpkgs "path:$STUB" --no-write-lock-file 2>/dev/null) || return 1
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
step "every .nix file parses" parse_all
for tool in deadnix nixpkgs-fmt; do
  need_crate "$tool" || { echo "FAIL  $tool could not be installed"; fail=$((fail + 1)); }
done
command -v deadnix >/dev/null && step "deadnix finds nothing" deadnix_all
command -v nixpkgs-fmt >/dev/null && step "nixpkgs-fmt --check" format_all
step "flake.lock pins nixpkgs" flake_lock_pinned
step "docs/usage/nixos.md shows nixos/examples/two-vms.nix verbatim" docs_example_verbatim

if LIB=$(find_lib); then
  echo "      nixpkgs lib copy: $LIB"
  step "module evaluation cases (lib.evalModules)" eval_cases
  step "a VM with 13 cores fails evaluation, naming the VM" too_many_cores_fails
  step "every option is in docs/development/conventions.md" options_documented
  step "docs/usage/nixos.md shows the JSON the example generates" docs_json_matches
  make_lib_flake
  step "nix build .#checks.$SYSTEM.module-eval (nixpkgs = lib only)" flake_module_eval
  step "nix flake check (nixpkgs = lib only)" flake_check
  step "nix flake show (nixpkgs = lib only)" flake_show
else
  echo "skip  module evaluation: skipped: no nixpkgs lib copy (set VMKEEPER_NIXPKGS_LIB, or put one at $(cd "$ROOT/.." && pwd)/nixpkgs-lib)"
  skipped+=("module evaluation")
fi

echo "$pass passed, $fail failed, ${#skipped[@]} skipped in $(($(now_ms) - T0)) ms"
[ "$fail" -eq 0 ]
