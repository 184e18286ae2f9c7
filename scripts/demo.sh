#!/bin/bash
# The main job (the README's first command): set-up, then `mipmobike demo`.
# Until the roaming demo exists it runs the largest end-to-end slice there is.
set -uo pipefail
TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$TOP"
"$TOP/scripts/setup.sh" || { echo "demo: set-up failed" >&2; exit 1; }
exec "$TOP/.venv/bin/mipmobike" demo "$@"
