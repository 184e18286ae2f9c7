"""bcc works on this host: compile a TC program, attach it with cls_bpf, count packets."""

import os
import subprocess

from tests.lib.names import unique

PROG = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
BPF_ARRAY(seen, u64, 1);
int count(struct __sk_buff *skb) {
    int k = 0;
    u64 *v = seen.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    return TC_ACT_OK;
}
"""


def test_bcc_tc_program_counts_packets(topology, tmp_path):
    from bcc import BPF, lib

    a, b = topology.ns("a"), topology.ns("b")
    ia, ib = topology.link(a, b, "10.201.0.1/24", "10.201.0.2/24")
    bpf = BPF(text=PROG)
    fn = bpf.load_func("count", BPF.SCHED_CLS)
    # tc attaches by pinned path; `ip netns exec` hides /sys/fs/bpf, so pin on our own bpffs
    pin_dir = tmp_path / "bpffs"
    pin_dir.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(pin_dir)], check=True)
    try:
        pin = pin_dir / unique("p")
        assert lib.bpf_obj_pin(fn.fd, str(pin).encode()) == 0
        b.run("tc", "qdisc", "add", "dev", ib, "clsact")
        b.run("tc", "filter", "add", "dev", ib, "ingress", "bpf", "direct-action", "object-pinned", str(pin))
        before = bpf["seen"][0].value
        assert a.ping("10.201.0.2", 5, 2)
        after = bpf["seen"][0].value
        # 5 echo requests (plus possibly ARP) crossed ib's ingress
        assert after - before >= 5
        os.unlink(pin)
    finally:
        subprocess.run(["umount", str(pin_dir)])
