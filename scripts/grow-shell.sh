#!/usr/bin/env bash
# grow-shell.sh CONF CLIENT POOL IMAGE NODE QMP_SOCKET STEP_BYTES
#
# One live disk grow the way a shell script would do it, for comparison in
# examples/bench_grow.rs: read the image size with the rbd CLI, refuse anything but a
# grow, then QMP block_resize NODE to size+STEP and confirm with query-block, through a
# one-shot QMP client (python3, standard library only).
set -euo pipefail
CONF=$1 CLIENT=$2 POOL=$3 IMAGE=$4 NODE=$5 SOCK=$6 STEP=$7

size=$(rbd --conf "$CONF" --id "$CLIENT" info --format json "$POOL/$IMAGE" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["size"])')
target=$((size + STEP))
[ "$target" -gt "$size" ] || { echo "grow-shell: refusing to shrink $POOL/$IMAGE" >&2; exit 1; }

python3 - "$SOCK" "$NODE" "$target" <<'PY'
import json, socket, sys
path, node, target = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(path)
f = s.makefile("rb")
f.readline()  # greeting
def cmd(name, **args):
    s.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
    while True:
        m = json.loads(f.readline())
        if "event" in m:
            continue
        if "error" in m:
            sys.exit(f"{name}: {m['error']}")
        return m["return"]
cmd("qmp_capabilities")
cmd("block_resize", **{"node-name": node, "size": target})
while True:
    sizes = {b.get("inserted", {}).get("node-name"): b.get("inserted", {}).get("image", {}).get("virtual-size")
             for b in cmd("query-block")}
    if sizes.get(node) == target:
        break
PY
