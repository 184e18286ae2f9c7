/* mipmobike IP-in-IP tunnel data plane in BPF (no ipip module needed).
 *
 * Two TC (clsact, direct-action) programs share the binding maps:
 *
 *   tun_encap   egress of the agent's shared TUN device. Whatever the
 *               routing table sends into that device is looked up by inner
 *               destination in tun_dst (a home agent: home address -> care-of
 *               address), else by inner source in tun_src (a foreign agent or
 *               a mobile node reverse tunnelling: home address -> home
 *               agent). A hit gets a 20-byte outer IPv4 header (protocol 4,
 *               the entry's local and remote addresses) and is redirected to
 *               the interface the FIB chooses for the remote address, with
 *               the neighbour subsystem filling in the link layer. A miss is
 *               dropped (the device is a sink, nothing reads it).
 *
 *   tun_decap   ingress of the physical interfaces. An IPIP packet is
 *               decapsulated only when it belongs to a binding: its outer
 *               (source, destination) equals the (remote, local) of the entry
 *               for its inner source in tun_dst, or of the entry for its inner
 *               destination in tun_src. Anything else passes untouched
 *               (TC_ACT_UNSPEC, so later filters still run).
 *
 * Addresses in the maps are in network byte order. counters (per CPU) count
 * each outcome, see enum tun_counter.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>

#ifndef TUN_MAX_ENTRIES
#define TUN_MAX_ENTRIES 131072
#endif

#define AF_INET_ 2
#define IP_DF_ 0x4000

struct tun_ep {
    __be32 local;   /* outer source */
    __be32 remote;  /* outer destination */
    u32 flags;      /* reserved */
    u32 pad;
};

enum tun_counter {
    C_ENCAP_OK = 0,
    C_ENCAP_NO_BINDING,
    C_ENCAP_NO_ROUTE,
    C_ENCAP_TOO_BIG,
    C_ENCAP_ERROR,
    C_DECAP_OK,
    C_DECAP_NOT_BOUND,
    C_DECAP_ERROR,
    C_MAX,
};

/* bcc 0.26 declares bpf_redirect_neigh with its original three arguments */
static long (*redirect_neigh)(u32 ifindex, struct bpf_redir_neigh *params, int plen,
                              u64 flags) = (void *)BPF_FUNC_redirect_neigh;

BPF_F_TABLE("hash", __be32, struct tun_ep, tun_dst, TUN_MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", __be32, struct tun_ep, tun_src, TUN_MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(counters, u64, C_MAX);

static __always_inline void count(u32 which)
{
    u64 *v = counters.lookup(&which);
    if (v)
        *v += 1;
}

static __always_inline u16 ip_csum(struct iphdr *ip)
{
    u32 sum = 0;
    u16 *p = (u16 *)ip;
#pragma unroll
    for (int i = 0; i < 10; i++)
        sum += p[i];
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return ~sum;
}

/* The TUN device carries bare IPv4 packets: the header is at offset 0. */
int tun_encap(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct iphdr *in = data;

    if (skb->protocol != bpf_htons(ETH_P_IP) || (void *)(in + 1) > end) {
        count(C_ENCAP_ERROR);
        return TC_ACT_SHOT;
    }
    __be32 isrc = in->saddr, idst = in->daddr;
    u8 tos = in->tos;
    u16 frag = in->frag_off;
    u16 inner_len = bpf_ntohs(in->tot_len);

    struct tun_ep *ep = tun_dst.lookup(&idst);
    if (!ep)
        ep = tun_src.lookup(&isrc);
    if (!ep) {
        count(C_ENCAP_NO_BINDING);
        return TC_ACT_SHOT;
    }
    __be32 local = ep->local, remote = ep->remote;

    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET_;
    fib.l4_protocol = IPPROTO_IPIP;
    fib.tot_len = inner_len + sizeof(struct iphdr);
    fib.ipv4_src = local;
    fib.ipv4_dst = remote;
    fib.ifindex = skb->ifindex;
    int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        count(C_ENCAP_TOO_BIG);
        return TC_ACT_SHOT;
    }
    if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) {
        count(C_ENCAP_NO_ROUTE);
        return TC_ACT_SHOT;
    }

    /* bpf_redirect_neigh() wants a MAC header to strip, which an L3 device
     * lacks: give the packet a dummy one first (bpf_skb_change_head is meant
     * for L3 -> L2 redirection), then open room for the outer header after
     * it. */
    if (bpf_skb_change_head(skb, sizeof(struct ethhdr), 0)) {
        count(C_ENCAP_ERROR);
        return TC_ACT_SHOT;
    }
    if (bpf_skb_adjust_room(skb, (s32)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
                            BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_FIXED_GSO)) {
        count(C_ENCAP_ERROR);
        return TC_ACT_SHOT;
    }
    struct {
        struct ethhdr eth;
        struct iphdr ip;
    } __attribute__((packed)) hdr = {};
    hdr.eth.h_proto = bpf_htons(ETH_P_IP);
    hdr.ip.version = 4;
    hdr.ip.ihl = 5;
    hdr.ip.tos = tos;
    hdr.ip.tot_len = bpf_htons(inner_len + sizeof(struct iphdr));
    hdr.ip.frag_off = frag & bpf_htons(IP_DF_);
    hdr.ip.ttl = 64;
    hdr.ip.protocol = IPPROTO_IPIP;
    hdr.ip.saddr = local;
    hdr.ip.daddr = remote;
    hdr.ip.check = ip_csum(&hdr.ip);
    if (bpf_skb_store_bytes(skb, 0, &hdr, sizeof(hdr), 0)) {
        count(C_ENCAP_ERROR);
        return TC_ACT_SHOT;
    }
    struct bpf_redir_neigh nh = {};
    nh.nh_family = AF_INET_;
    nh.ipv4_nh = fib.ipv4_dst;  /* the gateway, or the remote address on link */
    count(C_ENCAP_OK);
    return redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

/* Ethernet interfaces: the IPv4 header follows the 14-byte MAC header. */
int tun_decap(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *out = data + sizeof(*eth);
    struct iphdr *in = (void *)(out + 1);

    if ((void *)(in + 1) > end)
        return TC_ACT_UNSPEC;
    if (eth->h_proto != bpf_htons(ETH_P_IP) || out->protocol != IPPROTO_IPIP)
        return TC_ACT_UNSPEC;
    if (out->ihl != 5 || (out->frag_off & bpf_htons(0x3fff)))
        return TC_ACT_UNSPEC;  /* options or a fragment: not ours to handle */

    struct tun_ep *ep = tun_dst.lookup(&in->saddr);
    if (!ep || ep->remote != out->saddr || ep->local != out->daddr) {
        ep = tun_src.lookup(&in->daddr);
        if (!ep || ep->remote != out->saddr || ep->local != out->daddr) {
            count(C_DECAP_NOT_BOUND);
            return TC_ACT_UNSPEC;
        }
    }
    if (bpf_skb_adjust_room(skb, -(s32)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC, 0)) {
        count(C_DECAP_ERROR);
        return TC_ACT_SHOT;
    }
    count(C_DECAP_OK);
    return TC_ACT_OK;
}
