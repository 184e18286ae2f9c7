#!/bin/bash
# The main job (the README's first command): set-up, then `mipmobike demo`: the RFC 5266
# roaming run in the Figure-1 testbed (natively where the kernel has ESP and ipip, else
# inside the VM runner). Arguments go to `mipmobike demo` (--help); exit status 0 only
# if every handover succeeded and the traffic survived with the same home address.
set -uo pipefail
TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$TOP"
"$TOP/scripts/setup.sh" || { echo "demo: set-up failed" >&2; exit 1; }
exec "$TOP/.venv/bin/mipmobike" demo "$@"
