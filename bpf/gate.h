/* Constants shared by gate.c and agent/gate (which parses the #define lines
 * of this file, so keep them one per line: #define NAME number). */
#ifndef MIPMOBIKE_GATE_H
#define MIPMOBIKE_GATE_H

/* bumped whenever a map layout or a constant below changes; a running agent
 * refuses to adopt pinned objects of another ABI */
#define GATE_ABI 2

/* per-interface state (value of the ifstate map); 0 / missing = closed */
#define GATE_OPEN 1
#define GATE_CLOSED 2
#define GATE_OFF 3

#define GATE_DIR_EGRESS 0
#define GATE_DIR_INGRESS 1

/* counter slots: 0 counts packets seen on an interface the agent has no
 * state for (treated as closed) */
#define GATE_MAX_SLOTS 64

/* reasons: pass */
#define GATE_R_OPEN 0
#define GATE_R_ARP 1
#define GATE_R_DHCP 2
#define GATE_R_RDISC 3
#define GATE_R_MIP 4
#define GATE_R_IKE 5
#define GATE_R_ESP 6
#define GATE_R_ALLOW 7
#define GATE_R_ND 8
#define GATE_R_FRAG 9
/* a packet an IPsec SA decrypted (the BPF gate's TC ingress: tunnel mode
 * hands the inner packet to the same device again), or, in the netfilter
 * gate, also one an SA is about to encrypt (POSTROUTING sees it plain first) */
#define GATE_R_IPSEC 10
/* reasons: drop */
#define GATE_R_DROP_ICMP 11
#define GATE_R_DROP_TCP 12
#define GATE_R_DROP_UDP 13
#define GATE_R_DROP_MIP_NOMARK 14
#define GATE_R_DROP_IPV6 15
#define GATE_R_DROP_FRAG 16
#define GATE_R_DROP_OTHER_IP 17
#define GATE_R_DROP_OTHER 18
#define GATE_R_DROP_MALFORMED 19
#define GATE_NR_REASONS 20
#define GATE_FIRST_DROP 11

/* allow-map keys with this proto are "host" entries, one per allowed
 * address: they admit non-first IPv4 fragments of UDP and ESP */
#define GATE_PROTO_HOST 0

#define GATE_IKE_PORT 500
#define GATE_NATT_PORT 4500

#endif
