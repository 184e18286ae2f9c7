/* mipmobike trust-detection gate (RFC 5266 section 3.4, RFC 5265).
 *
 * Two programs share one set of maps:
 *   gate_egress     TC clsact egress (SCHED_CLS, direct action)
 *   gate_ingress    XDP on the same interface (gate_ingress_tc is the same
 *                   logic for a clsact ingress hook, used when the XDP hook
 *                   is taken by another program)
 *
 * Per interface (ifstate map, keyed by ifindex) the gate is open, closed or
 * off. Open and off pass everything (open counts it); closed passes only
 * what link-trust detection needs and drops the rest, counting every packet
 * by reason. An interface that carries a gate program but has no state entry
 * is treated as closed: the gate fails closed.
 *
 * Closed admits:
 *   ARP; DHCP (client 68 -> server 67 out, 67 -> 68 in); ICMP router
 *   advertisement/solicitation (9/10); IPv6 neighbour discovery (133-136);
 *   and whatever matches the allow map, which mirrors the agent's ipset
 *   (hash:ip,port: remote address, IP protocol, remote port):
 *     UDP to/from the IKE ports (500/4500, also ESP-in-UDP)   -> "ike"
 *     ESP (protocol 50, port 0)                               -> "esp"
 *     other UDP entries (the home agent's 434)                -> "mip": on
 *       egress these also need the detection mark (config map) that the
 *       agent's detection socket carries (SO_MARK), so only the agent's
 *       Registration Request leaves, not any process's datagram to the HA
 *     any other protocol                                      -> "allow"
 *   Non-first IPv4 fragments of UDP/ESP pass when the remote address has a
 *   host entry (protocol 0) in the allow map.
 *   On the TC ingress hook, packets that carry an IPsec security path ->
 *   "ipsec": in tunnel mode the kernel decrypts an admitted ESP packet and
 *   hands the inner packet to the same device again, so the ingress hook sees
 *   it a second time; it was authenticated by an SA, and a MOBIKE-only move
 *   relies on it while the gate is still closed. Native XDP runs before the
 *   stack and never sees these packets; XDP in generic mode would, without a
 *   way to tell (the agent's "auto" ingress picks TC there).
 *
 * Passing returns TC_ACT_UNSPEC (not TC_ACT_OK) so that a filter added after
 * the gate on the same hook still runs; the gate is attached with the
 * highest priority so nothing can accept a packet before the gate saw it.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>

#include "gate.h"

struct ifstate {
    u32 state;
    u32 slot;
};

struct allow_key {
    __be32 addr;
    __be16 port;
    u8 proto;
    u8 pad;
};

struct gate_config {
    u32 abi;
    u32 rrq_mark;
    u32 rrq_mask;
    u32 pad;
};

struct gate_count {
    u64 packets;
    u64 bytes;
};

BPF_HASH(ifstate, u32, struct ifstate, 256);
BPF_HASH(allow, struct allow_key, u32, 4096);
BPF_ARRAY(config, struct gate_config, 1);
BPF_PERCPU_ARRAY(counters, struct gate_count, GATE_MAX_SLOTS * 2 * GATE_NR_REASONS);

static __always_inline void count(u32 slot, u32 dir, u32 reason, u32 len)
{
    u32 idx = (slot * 2 + dir) * GATE_NR_REASONS + reason;
    struct gate_count *c = counters.lookup(&idx);
    if (c) {
        c->packets += 1;
        c->bytes += len;
    }
}

static __always_inline int allowed(__be32 addr, __be16 port, u8 proto)
{
    struct allow_key k = {};
    k.addr = addr;
    k.port = port;
    k.proto = proto;
    return allow.lookup(&k) != NULL;
}

static __always_inline u32 classify_ipv4(void *data, void *end, u32 dir, u32 mark)
{
    struct iphdr *ip = data + ETH_HLEN;
    if ((void *)(ip + 1) > end)
        return GATE_R_DROP_MALFORMED;
    u32 ihl = ip->ihl * 4;
    if (ihl < sizeof(*ip))
        return GATE_R_DROP_MALFORMED;
    __be32 remote = dir == GATE_DIR_EGRESS ? ip->daddr : ip->saddr;
    u8 proto = ip->protocol;

    if (ip->frag_off & bpf_htons(0x1fff)) {
        /* no transport header in a non-first fragment */
        if ((proto == IPPROTO_UDP || proto == IPPROTO_ESP) && allowed(remote, 0, GATE_PROTO_HOST))
            return GATE_R_FRAG;
        return GATE_R_DROP_FRAG;
    }

    void *l4 = (void *)ip + ihl;
    if (proto == IPPROTO_UDP) {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > end)
            return GATE_R_DROP_MALFORMED;
        u16 sport = bpf_ntohs(udp->source), dport = bpf_ntohs(udp->dest);
        if (dir == GATE_DIR_EGRESS ? (sport == 68 && dport == 67) : (sport == 67 && dport == 68))
            return GATE_R_DHCP;
        u16 rport = dir == GATE_DIR_EGRESS ? dport : sport;
        if (!allowed(remote, bpf_htons(rport), IPPROTO_UDP))
            return GATE_R_DROP_UDP;
        if (rport == GATE_IKE_PORT || rport == GATE_NATT_PORT)
            return GATE_R_IKE;
        if (dir == GATE_DIR_EGRESS) {
            u32 key = 0;
            struct gate_config *cfg = config.lookup(&key);
            if (cfg && cfg->rrq_mask && (mark & cfg->rrq_mask) != cfg->rrq_mark)
                return GATE_R_DROP_MIP_NOMARK;
        }
        return GATE_R_MIP;
    }
    if (proto == IPPROTO_ICMP) {
        struct icmphdr *icmp = l4;
        if ((void *)icmp + 1 > end)
            return GATE_R_DROP_MALFORMED;
        if (icmp->type == 9 || icmp->type == 10)
            return GATE_R_RDISC;
        return GATE_R_DROP_ICMP;
    }
    if (proto == IPPROTO_ESP)
        return allowed(remote, 0, IPPROTO_ESP) ? GATE_R_ESP : GATE_R_DROP_OTHER_IP;
    if (proto == IPPROTO_TCP) {
        struct tcphdr_ports { __be16 source, dest; } *tcp = l4;
        if ((void *)(tcp + 1) > end)
            return GATE_R_DROP_MALFORMED;
        __be16 rport = dir == GATE_DIR_EGRESS ? tcp->dest : tcp->source;
        return allowed(remote, rport, IPPROTO_TCP) ? GATE_R_ALLOW : GATE_R_DROP_TCP;
    }
    return allowed(remote, 0, proto) ? GATE_R_ALLOW : GATE_R_DROP_OTHER_IP;
}

static __always_inline u32 classify(void *data, void *end, u32 dir, u32 mark)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return GATE_R_DROP_MALFORMED;
    __be16 type = eth->h_proto;
    if (type == bpf_htons(ETH_P_ARP))
        return GATE_R_ARP;
    if (type == bpf_htons(ETH_P_IP))
        return classify_ipv4(data, end, dir, mark);
    if (type == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + ETH_HLEN;
        if ((void *)(ip6 + 1) > end)
            return GATE_R_DROP_MALFORMED;
        if (ip6->nexthdr == IPPROTO_ICMPV6) {
            u8 *icmp6_type = (void *)(ip6 + 1);
            if ((void *)(icmp6_type + 1) > end)
                return GATE_R_DROP_MALFORMED;
            if (*icmp6_type >= 133 && *icmp6_type <= 136)
                return GATE_R_ND;
        }
        return GATE_R_DROP_IPV6;
    }
    /* VLAN tags, PPPoE, LLDP, ...: not needed to detect trust */
    return GATE_R_DROP_OTHER;
}

/* state lookup shared by the three programs: returns 1 when the packet
 * passes without classification (off/open), else fills *slot */
static __always_inline int fast_path(u32 ifindex, u32 dir, u32 len, u32 *slot)
{
    struct ifstate *st = ifstate.lookup(&ifindex);
    *slot = 0;
    if (!st)
        return 0;
    if (st->state == GATE_OFF)
        return 1;
    *slot = st->slot;
    if (st->state == GATE_OPEN) {
        count(st->slot, dir, GATE_R_OPEN, len);
        return 1;
    }
    return 0;
}

static __always_inline int tc_gate(struct __sk_buff *skb, u32 dir)
{
    u32 slot;
    if (fast_path(skb->ifindex, dir, skb->len, &slot))
        return TC_ACT_UNSPEC;
    if (dir == GATE_DIR_INGRESS) {
        /* decrypted by an SA the kernel holds (skb->sp set): only such
         * packets make the helper succeed */
        struct bpf_xfrm_state xs = {};
        if (bpf_skb_get_xfrm_state(skb, 0, &xs, sizeof(xs), 0) == 0) {
            count(slot, dir, GATE_R_IPSEC, skb->len);
            return TC_ACT_UNSPEC;
        }
    }
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    /* make the headers we read linear (closed path only) */
    if (data + 128 > end && skb->len > end - data) {
        bpf_skb_pull_data(skb, skb->len < 128 ? skb->len : 128);
        data = (void *)(long)skb->data;
        end = (void *)(long)skb->data_end;
    }
    u32 reason = classify(data, end, dir, dir == GATE_DIR_EGRESS ? skb->mark : 0);
    count(slot, dir, reason, skb->len);
    return reason < GATE_FIRST_DROP ? TC_ACT_UNSPEC : TC_ACT_SHOT;
}

int gate_egress(struct __sk_buff *skb)
{
    return tc_gate(skb, GATE_DIR_EGRESS);
}

int gate_ingress_tc(struct __sk_buff *skb)
{
    return tc_gate(skb, GATE_DIR_INGRESS);
}

int gate_ingress(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    u32 len = end - data;
    u32 slot;
    if (fast_path(ctx->ingress_ifindex, GATE_DIR_INGRESS, len, &slot))
        return XDP_PASS;
    u32 reason = classify(data, end, GATE_DIR_INGRESS, 0);
    count(slot, GATE_DIR_INGRESS, reason, len);
    return reason < GATE_FIRST_DROP ? XDP_PASS : XDP_DROP;
}
