#!/bin/bash
# The kernel-path performance suite: `mipmobike bench` with the project's venv.
# Parts that need ESP, ipip or netem run inside the VM runner by themselves when
# this kernel lacks them (scripts/vm/vmrun.sh); the rest runs here.
#   scripts/bench.sh --quick              # minutes
#   scripts/bench.sh                      # 20 rounds per added RTT: an hour or more under TCG
#   scripts/bench.sh --quick --publish    # also docs/bench/latest.md (commit it by hand)
set -uo pipefail
TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$TOP"
[ "$(id -u)" -eq 0 ] || { echo "bench: needs root (namespaces, BPF, the VM)" >&2; exit 2; }
[ -x "$TOP/.venv/bin/python" ] || { echo "bench: no venv; run scripts/setup.sh first" >&2; exit 2; }
exec "$TOP/.venv/bin/python" -m agent.cli bench "$@"
