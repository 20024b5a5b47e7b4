// SPDX-License-Identifier: GPL-2.0
/*
 * tc ingress (clsact, direct action) on the node's fabric interface(s): inbound capture.
 *
 * A TCP SYN arriving from another host for a local pod (hm_pods LPM trie, port not in
 * hm_inb_skip) is marked with hm_config.inbound_mark; the agent's ip rule (fwmark -> a
 * table holding `local 0.0.0.0/0 dev lo`) makes the kernel deliver it locally instead of
 * forwarding it, and bpf/sk_lookup.c hands it to the proxy's inbound listener (TPROXY
 * done in eBPF). The SYN is deliberately not bpf_sk_assign()ed to the listener here: that
 * skips the kernel's 4-tuple lookup, and a SYN reusing a 4-tuple this node still holds in
 * TIME_WAIT is then dropped (see bpf/sk_lookup.c).
 *
 * Later packets of such a connection find the proxy's socket (a plain socket lookup);
 * they only need the mark. Packets of connections the proxy does not own (opened before
 * capture was installed) pass untouched.
 *
 * Fail closed: with no listener registered, bpf/sk_lookup.c refuses the marked SYN; it is
 * never forwarded to the pod in plaintext.
 */
#include "lib/helpers.h"
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

/* map access lives here: bcc rewrites map operations only in the main file */
static __always_inline void count(u32 which)
{
	u64 *c = hm_counters.lookup(&which);
	if (c)
		*c += 1; /* per-CPU slot: no atomic needed */
}

static __always_inline struct hm_config *config(void)
{
	u32 zero = 0;
	return hm_config.lookup(&zero);
}

static __always_inline int in_pods(u32 addr)
{
	struct hm_cidr_key k = {.prefixlen = 32, .addr = addr};
	return hm_pods.lookup(&k) != NULL;
}

int hm_tc_inbound(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (skb->protocol != hm_htons(ETH_P_IP))
		return TC_ACT_OK;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	if (ip->protocol != IPPROTO_TCP || ip->ihl < 5)
		return TC_ACT_OK;
	if (ip->frag_off & hm_htons(0x1fff)) /* non-first fragment: no TCP header */
		return TC_ACT_OK;
	struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
	if ((void *)(tcp + 1) > data_end)
		return TC_ACT_OK;

	struct hm_config *cfg = config();
	if (!cfg || !(cfg->flags & HM_F_INBOUND))
		return TC_ACT_OK;
	if (!in_pods(ip->daddr))
		return TC_ACT_OK;
	u32 port = hm_ntohs(tcp->dest);
	if (hm_inb_skip.lookup(&port))
		return TC_ACT_OK;

	if (tcp->syn && !tcp->ack) {
		skb->mark = cfg->inbound_mark;
		count(HM_C_INBOUND_SYN);
		return TC_ACT_OK;
	}

	struct bpf_sock_tuple tuple = {};
	tuple.ipv4.saddr = ip->saddr;
	tuple.ipv4.daddr = ip->daddr;
	tuple.ipv4.sport = tcp->source;
	tuple.ipv4.dport = tcp->dest;
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return TC_ACT_OK; /* not a proxy connection: forward as usual */
	u32 state = sk->state;
	bpf_sk_release(sk);
	if (state == BPF_TCP_LISTEN)
		return TC_ACT_OK; /* only a listener of the node on that port: not ours */
	skb->mark = cfg->inbound_mark;
	count(HM_C_INBOUND_ESTABLISHED);
	return TC_ACT_OK;
}
