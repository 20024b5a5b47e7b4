// SPDX-License-Identifier: GPL-2.0
/*
 * cgroup/getsockopt: answer getsockopt(SOL_IP, SO_ORIGINAL_DST) from the hm_origdst map.
 *
 * Attached to the agent's (the proxy's) cgroup. The proxy asks every accepted socket for
 * its original destination exactly as it does under iptables REDIRECT (conntrack answers
 * there); here the kernel has no conntrack entry and fails, and this program replaces the
 * answer with what connect4 recorded. So the proxy has one code path for both backends,
 * and any proxy that speaks SO_ORIGINAL_DST (Envoy's original_dst) works unchanged.
 *
 * A socket with no entry is answered with its own local address, as conntrack does for a
 * connection that was not NATed: the proxy recognises a direct connection to its listener
 * (a loop) that way, and a connection handed over by bpf/tc_inbound.c (bpf_sk_assign keeps
 * the destination: the accepted socket's local address IS the original destination) gets
 * the right answer. When the kernel itself answered (conntrack exists), its answer stands.
 */
#include "lib/helpers.h"

/* map access lives here: bcc rewrites map operations only in the main file */
static __always_inline void count(u32 which)
{
	u64 *c = hm_counters.lookup(&which);
	if (c)
		*c += 1; /* per-CPU slot: no atomic needed */
}

int hm_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level != SOL_IP || ctx->optname != HM_SO_ORIGINAL_DST)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->family != AF_INET || sk->protocol != IPPROTO_TCP)
		return 1;
	struct sockaddr_in *sa = ctx->optval;
	if ((void *)(sa + 1) > ctx->optval_end)
		return 1; /* caller's buffer is too small for a sockaddr_in */

	/* the accepted socket: local = the proxy, peer = the client */
	struct hm_tuple t = {
		.saddr = sk->dst_ip4,
		.daddr = sk->src_ip4,
		.sport = (u16)sk->dst_port,           /* network order */
		.dport = hm_htons((u16)sk->src_port), /* host order in bpf_sock */
	};
	struct hm_origdst *orig = hm_origdst.lookup(&t);
	if (orig) {
		sa->sin_family = AF_INET;
		sa->sin_port = orig->port;
		sa->sin_addr.s_addr = orig->addr;
		count(HM_C_ORIGDST_HIT);
	} else {
		if (ctx->retval == 0)
			return 1; /* conntrack answered */
		sa->sin_family = AF_INET;
		sa->sin_port = t.dport;
		sa->sin_addr.s_addr = t.daddr;
		count(HM_C_ORIGDST_MISS);
	}
	__builtin_memset(sa->__pad, 0, sizeof(sa->__pad));
	ctx->optlen = sizeof(*sa);
	/* keep two 4-byte context stores: clang would merge them into one 8-byte store,
	 * which the verifier rejects */
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	return 1;
}
