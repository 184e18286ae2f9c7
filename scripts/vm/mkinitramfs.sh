#!/bin/bash
# Build the initramfs the test VM boots: a static busybox, the modules needed to
# mount the host root over virtiofs with a tmpfs overlay on top, and a two-stage
# init (stage 1 in the initramfs, stage 2 as PID 1 in the overlay root).
#   usage: mkinitramfs.sh KERNEL_VERSION OUTPUT.cpio.gz
set -euo pipefail
kver=${1:?kernel version}; out=${2:?output}
mods=/lib/modules/$kver
bb=/bin/busybox
if ! file -L "$bb" | grep -q 'statically linked'; then
  echo "mkinitramfs: $bb is not static (apt-get install busybox-static)" >&2; exit 1
fi
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc,sys,lower,upper,root,mods}
cp "$bb" "$work/bin/busybox"; ln -s busybox "$work/bin/sh"

# modules and their dependencies, in load order
declare -A done_=()
: > "$work/mods/list"
need() {
  local rel=$1 d base
  [ -n "${done_[$rel]:-}" ] && return 0
  done_[$rel]=1
  for d in $(awk -F': *' -v r="$rel" '$1 == r {print $2; exit}' "$mods/modules.dep"); do need "$d"; done
  base=$(basename "$rel"); base=${base%%.ko*}
  case $rel in
    *.ko.xz) xz -dc "$mods/$rel" > "$work/mods/$base.ko" ;;
    *.ko.zst) zstd -qdc "$mods/$rel" > "$work/mods/$base.ko" ;;
    *.ko.gz) gzip -dc "$mods/$rel" > "$work/mods/$base.ko" ;;
    *) cp "$mods/$rel" "$work/mods/$base.ko" ;;
  esac
  echo "$base" >> "$work/mods/list"
}
for m in virtio_pci virtio_console virtiofs overlay; do
  rel=$(grep -E "(^|/)$m\.ko(\.(xz|zst|gz))?:" "$mods/modules.dep" | head -1 | cut -d: -f1 || true)
  if [ -z "$rel" ]; then
    grep -qE "/$m\.ko" "$mods/modules.builtin" && continue
    echo "mkinitramfs: no module $m for $kver" >&2; exit 1
  fi
  need "$rel"
done

cat > "$work/init" <<'STAGE1'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
fail() { echo "vm-init: $*" > /dev/console; echo b > /proc/sysrq-trigger; sleep 10; }
for m in $(cat /mods/list); do insmod "/mods/$m.ko" 2>/dev/null || echo "vm-init: insmod $m failed" > /dev/console; done
cmdfile=; share=
for arg in $(cat /proc/cmdline); do
  case $arg in mm_cmd=*) cmdfile=${arg#mm_cmd=} ;; mm_share=*) share=${arg#mm_share=} ;; esac
done
mount -t virtiofs -o ro hostroot /lower || fail "virtiofs root did not mount"
mount -t tmpfs -o mode=0755 tmpfs /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /root \
  || fail "overlay root did not mount"
r=/root
mount -t proc proc $r/proc; mount -t sysfs sys $r/sys; mount --move /dev $r/dev
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o ptmxmode=0666 devpts $r/dev/pts; mount -t tmpfs tmpfs $r/dev/shm
ln -sf /proc/self/fd $r/dev/fd
mount -t tmpfs -o mode=0755 tmpfs $r/run; mkdir -p $r/run/netns $r/run/lock $r/run/mm
mount -t bpf bpf $r/sys/fs/bpf 2>/dev/null
mount -t debugfs debugfs $r/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs $r/sys/kernel/tracing 2>/dev/null
mount -t cgroup2 cgroup2 $r/sys/fs/cgroup 2>/dev/null
if [ -n "$share" ]; then mkdir -p "$r$share"; mount -t virtiofs hostshare "$r$share" || fail "share did not mount"; fi
hostname mm-vm; ip link set lo up
out=/dev/console; err=/dev/console; rc=/dev/null
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] || continue
  case $(cat "$p/name") in
    mm.out) out=/dev/${p##*/} ;; mm.err) err=/dev/${p##*/} ;; mm.rc) rc=/dev/${p##*/} ;;
  esac
done
cp /bin/busybox $r/run/mm/busybox; cp /stage2 $r/run/mm/stage2
umount /proc /sys
exec switch_root $r /run/mm/busybox sh /run/mm/stage2 "$cmdfile" "$out" "$err" "$rc"
STAGE1
cat > "$work/stage2" <<'STAGE2'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
cmdfile=$1; out=$2; err=$3; rcdev=$4
# no udev here: load what the tests use up front (tun makes /dev/net/tun appear)
modprobe -a tun veth bridge esp4 ipip xfrm_user xfrm4_tunnel xfrm_ipcomp sch_netem cls_bpf sch_ingress \
  ip_set ip_set_hash_ip ip_set_hash_ipport xt_set xt_mark xt_TCPMSS iptable_mangle iptable_nat iptable_filter \
  nf_conntrack nf_nat 2>/dev/null
if [ -f "$cmdfile" ]; then /bin/bash "$cmdfile" < /dev/null > "$out" 2> "$err"; rc=$?
else echo "vm-init: no command file $cmdfile" > "$err"; rc=127; fi
echo "$rc" > "$rcdev"
/run/mm/busybox sync
echo b > /proc/sysrq-trigger
sleep 10
STAGE2
chmod 755 "$work/init"
(cd "$work" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$out.part"
mv "$out.part" "$out"
echo "mkinitramfs: $out ($(stat -c %s "$out") bytes)" >&2
