#!/bin/bash
# One-time, idempotent set-up on Debian 12 as root: Debian packages (only the
# missing ones), bcc kernel headers, the project venv with its test extras.
#   scripts/setup.sh            everything
#   QUIET=1 scripts/setup.sh    only say what it changed
set -euo pipefail
TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MIPMOBIKE_VENV:-$TOP/.venv}
say() { echo "setup: $*" >&2; }
[ "$(id -u)" = 0 ] || { say "must run as root (namespaces, XFRM, BPF, apt)"; exit 1; }

PKGS="python3-bpfcc python3-venv python3-pip iproute2 iptables ipset nftables kmod
 qemu-system-x86 busybox-static cpio gzip file
 linux-image-cloud-amd64 linux-headers-cloud-amd64
 strongswan-swanctl charon-systemd libcharon-extra-plugins libstrongswan-standard-plugins
 libstrongswan-extra-plugins strongswan-pki
 dnsmasq-base tshark tcpdump iputils-ping iperf3 conntrack procps psmisc"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  # tshark asks whether non-root users may capture; answer before it asks
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -q >/dev/null
  # charon-systemd must not start a daemon in the root namespace of this host
  policy=/usr/sbin/policy-rc.d; made_policy=
  if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod 755 $policy; made_policy=1; fi
  apt-get install -y -q --no-install-recommends $missing >/tmp/mipmobike-apt.log 2>&1 \
    || { tail -30 /tmp/mipmobike-apt.log >&2; [ -n "$made_policy" ] && rm -f $policy; exit 1; }
  [ -n "$made_policy" ] && rm -f $policy
fi
# (policy-rc.d above keeps the packages from starting a charon in the root namespace; the
# tests run their own charons in namespaces, so an operator's strongSwan is left alone)

# bcc compiles against /lib/modules/$(uname -r)/build. Kernels without headers
# (like a custom host kernel) get Debian's cloud headers linked in.
KREL=$(uname -r)
if [ ! -e "/lib/modules/$KREL/build" ]; then
  hdr=$(ls -1d /usr/src/linux-headers-*-cloud-amd64 2>/dev/null | sort -V | tail -1)
  common=${hdr%-cloud-amd64}-common
  if [ -n "$hdr" ] && [ -d "$common" ]; then
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$hdr" "/lib/modules/$KREL/build"
    [ -e "/lib/modules/$KREL/source" ] || ln -sfn "$common" "/lib/modules/$KREL/source"
    say "linked /lib/modules/$KREL/build -> $hdr and source -> $common (bcc headers)"
  else
    say "no kernel headers for $KREL and no Debian cloud headers to link: bcc cannot compile"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV (with system site-packages for bcc)"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.mipmobike-installed"
if [ ! -e "$stamp" ] || [ "$TOP/pyproject.toml" -nt "$stamp" ]; then
  say "installing mipmobike[test] into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$TOP[test]"
  touch "$stamp"
fi
