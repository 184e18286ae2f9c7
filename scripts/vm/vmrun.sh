#!/bin/bash
# Run one command as root inside a throw-away VM booting Debian's cloud kernel
# (which has ESP, ipip, netem...) with this host's root filesystem shared
# read-only over virtiofs under a tmpfs overlay. Output and exit status pass
# through: 124 = timed out, 125 = the VM itself failed.
#   usage: vmrun.sh CMD [ARGS...]
# Knobs: VM_KERNEL, VM_MEM (2G), VM_CPUS (2), VM_TIMEOUT (1500 s), VM_SHARE (a host
# directory mounted read-write at the same path), VM_KEEPENV (more variables to
# carry in), VM_CACHE (initramfs cache), VM_CONSOLE (keep the guest console log).
# The guest runs under TCG: this host's /dev/kvm is paravirtual and a stock
# kernel cannot use it.
set -uo pipefail
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "usage: $0 CMD [ARGS...]" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/../.." && pwd)
kernel=${VM_KERNEL:-$(ls -1 /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -1)}
[ -r "$kernel" ] || { echo "vmrun: no cloud kernel in /boot (apt-get install linux-image-cloud-amd64)" >&2; exit 125; }
kver=${kernel##*/vmlinuz-}
cache=${VM_CACHE:-$top/.cache/vm}
mkdir -p "$cache"
initrd=$cache/initramfs-$kver.cpio.gz
if [ ! -s "$initrd" ] || [ "$here/mkinitramfs.sh" -nt "$initrd" ]; then
  "$here/mkinitramfs.sh" "$kver" "$initrd" || exit 125
fi
virtiofsd=${VM_VIRTIOFSD:-/usr/lib/qemu/virtiofsd}
[ -x "$virtiofsd" ] || { echo "vmrun: $virtiofsd missing (qemu-system-x86 ships it)" >&2; exit 125; }
mem=${VM_MEM:-2G}

# the control directory must be visible to the guest: it lives in the shared root
ctl=$(mktemp -d /tmp/mm-vm.XXXXXX)
children=()
finish() {
  for p in "${children[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${children[@]}"; do wait "$p" 2>/dev/null; done
  rm -rf "$ctl"
}
trap finish EXIT
trap 'exit 130' INT TERM HUP

{
  echo "cd $(printf %q "$PWD") 2>/dev/null || cd /"
  echo "export PATH=$(printf %q "$PATH")"
  for v in HOME LANG LC_ALL TERM ${VM_KEEPENV:-}; do
    [ -n "${!v+x}" ] && echo "export $v=$(printf %q "${!v}")"
  done
  echo "export MIPMOBIKE_IN_VM=1"
  printf 'exec'; printf ' %q' "$@"; echo
} > "$ctl/cmd.sh"

fsd() { # socket source cache-mode
  "$virtiofsd" --socket-path="$1" -o source="$2" -o cache="$3" -o sandbox=chroot \
    -o no_posix_lock < /dev/null >> "$ctl/virtiofsd.log" 2>&1 &
  children+=($!)
}
fsd "$ctl/root.sock" / always
share_dev=() share_arg=
if [ -n "${VM_SHARE:-}" ]; then
  mkdir -p "$VM_SHARE"; VM_SHARE=$(cd "$VM_SHARE" && pwd)
  fsd "$ctl/share.sock" "$VM_SHARE" auto
  share_dev=(-chardev "socket,id=share,path=$ctl/share.sock" -device "vhost-user-fs-pci,chardev=share,tag=hostshare")
  share_arg=" mm_share=$VM_SHARE"
fi
for _ in $(seq 250); do
  [ -S "$ctl/root.sock" ] && { [ -z "${VM_SHARE:-}" ] || [ -S "$ctl/share.sock" ]; } && break
  sleep 0.02
done

mkfifo "$ctl/out" "$ctl/err"
cat "$ctl/out" & children+=($!); relay_out=$!
cat "$ctl/err" >&2 & children+=($!); relay_err=$!

timeout -k 5 "${VM_TIMEOUT:-1500}" qemu-system-x86_64 \
  -nodefaults -no-user-config -display none -no-reboot \
  -machine "q35,accel=tcg,memory-backend=mem" -cpu max,-svm,-vmx,-la57 \
  -smp "${VM_CPUS:-2}" -m "$mem" \
  -object "memory-backend-memfd,id=mem,size=$mem,share=on" \
  -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off rdinit=/init mm_cmd=$ctl/cmd.sh$share_arg" \
  -serial "file:$ctl/console.log" \
  -chardev "socket,id=root,path=$ctl/root.sock" -device "vhost-user-fs-pci,chardev=root,tag=hostroot" \
  "${share_dev[@]}" \
  -device virtio-serial-pci \
  -chardev "file,id=o,path=$ctl/out" -device "virtserialport,chardev=o,name=mm.out" \
  -chardev "file,id=e,path=$ctl/err" -device "virtserialport,chardev=e,name=mm.err" \
  -chardev "file,id=r,path=$ctl/rc" -device "virtserialport,chardev=r,name=mm.rc" \
  < /dev/null &
qemu=$!; children+=($qemu)
wait $qemu; qrc=$?
# release relays that may still block in open() if qemu never opened the fifos
exec 3<>"$ctl/out" 4<>"$ctl/err"; exec 3>&- 4>&-
wait $relay_out $relay_err 2>/dev/null
rc=$(tr -dc 0-9 < "$ctl/rc" 2>/dev/null)
[ -n "${VM_CONSOLE:-}" ] && cp "$ctl/console.log" "$VM_CONSOLE"
if [ -z "$rc" ]; then
  { echo "vmrun: the guest reported no exit status (qemu exit $qrc)"
    echo "--- guest console (last lines) ---"; tail -n 40 "$ctl/console.log" 2>/dev/null
    echo "--- virtiofsd ---"; tail -n 10 "$ctl/virtiofsd.log" 2>/dev/null; } >&2
  [ $qrc -eq 124 ] && exit 124
  exit 125
fi
exit "$rc"
