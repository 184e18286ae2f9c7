#!/bin/bash
# The whole test suite, every tier, with its own set-up (the README's test command).
#   scripts/test.sh                 all tiers: unit, netns, kernel (native or VM), final
#   TIERS="unit netns" scripts/test.sh    a subset while developing (the summary says so)
#   PYTEST_ARGS="-x -k foo" scripts/test.sh
# The kernel tier (ESP, ipip) runs natively where `mipmobike doctor` finds ESP and
# ipip, otherwise inside one VM boot (scripts/vm/vmrun.sh). A tier that cannot run,
# runs no test, or skips a test fails the run.
set -uo pipefail
TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$TOP"
"$TOP/scripts/setup.sh" || { echo "test: set-up failed" >&2; exit 1; }
PY=${MIPMOBIKE_VENV:-$TOP/.venv}/bin/python
export MIPMOBIKE_TEST_RUN=${MIPMOBIKE_TEST_RUN:-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')}
export MIPMOBIKE_STRICT=1 PYTHONDONTWRITEBYTECODE=1
REPORTS=$TOP/reports/test-$MIPMOBIKE_TEST_RUN
mkdir -p "$REPORTS"
TIERS=${TIERS:-unit netns kernel final}
echo "test run $MIPMOBIKE_TEST_RUN: tiers '$TIERS', reports in $REPORTS"

"$PY" -m agent.cli doctor --json > "$REPORTS/doctor.json" 2> "$REPORTS/doctor.err" || true
kernel_mode=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["tiers"]["kernel"])' \
  "$REPORTS/doctor.json" 2>/dev/null || echo unavailable)

declare -A how
for tier in $TIERS; do
  args=(-m "$tier" -p no:cacheprovider -ra --junitxml="$REPORTS/$tier.xml" ${PYTEST_ARGS:-})
  case $tier in
    kernel)
      how[$tier]=$kernel_mode
      echo; echo "=== tier kernel ($kernel_mode) ==="
      case $kernel_mode in
        native) "$PY" -m pytest "${args[@]}" tests/kernel ;;
        vm) VM_SHARE=$REPORTS VM_KEEPENV="MIPMOBIKE_TEST_RUN MIPMOBIKE_STRICT PYTHONDONTWRITEBYTECODE" \
              VM_TIMEOUT=${VM_TIMEOUT:-2400} "$TOP/scripts/vm/vmrun.sh" "$PY" -m pytest "${args[@]}" tests/kernel ;;
        *) echo "tier kernel cannot run: no ESP/ipip here and no VM (see $REPORTS/doctor.json)" >&2 ;;
      esac
      echo "exit $?" > "$REPORTS/$tier.rc" ;;
    *)
      how[$tier]=native
      echo; echo "=== tier $tier (native) ==="
      "$PY" -m pytest "${args[@]}" "tests/$tier"
      echo "exit $?" > "$REPORTS/$tier.rc" ;;
  esac
done

"$PY" - "$REPORTS" $TIERS <<'PYEOF'
import sys, pathlib, xml.etree.ElementTree as ET
reports, tiers = pathlib.Path(sys.argv[1]), sys.argv[2:]
tot = dict(passed=0, failed=0, skipped=0)
bad = []
print("\n=== summary ===")
for tier in tiers:
    xml = reports / f"{tier}.xml"
    rc = (reports / f"{tier}.rc").read_text().split()[-1] if (reports / f"{tier}.rc").exists() else "?"
    if not xml.exists():
        print(f"tier {tier:<7} DID NOT RUN (exit {rc})"); bad.append(tier); continue
    n = f = s = 0
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        n += int(suite.get("tests", 0)); f += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        s += int(suite.get("skipped", 0))
    p = n - f - s
    tot["passed"] += p; tot["failed"] += f; tot["skipped"] += s
    ok = f == 0 and s == 0 and n > 0 and rc == "0"
    print(f"tier {tier:<7} {p} passed, {f} failed, {s} skipped (pytest exit {rc}){'' if ok else '  <-- FAILED'}")
    if not ok:
        bad.append(tier)
print(f"{tot['passed']} passed, {tot['failed']} failed, {tot['skipped']} skipped")
sys.exit(1 if bad else 0)
PYEOF
