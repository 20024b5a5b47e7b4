// SPDX-License-Identifier: GPL-2.0
/*
 * sk_lookup (attached to the node's network namespace with a pinned BPF link): picks the
 * proxy's inbound listener for TCP connections to local pods.
 *
 * bpf/tc_inbound.c marks a SYN arriving from another host for a local pod; the agent's
 * fwmark policy route delivers it locally although its destination is the pod's address.
 * The kernel then looks for a socket as for any local packet: an existing socket of the
 * 4-tuple first (established, a pending request, or TIME_WAIT), and only then a listener —
 * where this program answers with the listener in hm_listen (0.0.0.0:15006, as TPROXY
 * would). The accepted socket's local address is the pod address the client dialed.
 *
 * Why here and not bpf_sk_assign() at tc: a SYN assigned to the listener at tc skips the
 * 4-tuple lookup. When this node still held that 4-tuple in TIME_WAIT (its side closed
 * first and the client's kernel reused the source port, which it may: the client holds no
 * state for it), the listener's new request collides with the TIME_WAIT entry and the
 * kernel drops the SYN silently, every retransmission too, for the 60 s of TIME_WAIT: the
 * client's connect times out. In the listener lookup the kernel's own TIME_WAIT handling
 * (accept a SYN with a newer sequence number or timestamp) has already run, and ends here
 * too (it looks up the listener again), so reuse works exactly as without capture.
 *
 * Fail closed: no listener registered (the agent is dead: the kernel removes a closed
 * socket from the sockmap) -> SK_DROP, the lookup fails and the kernel answers the SYN
 * with a reset; the packet is never forwarded to the pod in plaintext.
 */
#include "lib/helpers.h"
#include <uapi/linux/bpf.h>

/* map access lives here: bcc rewrites map operations only in the main file */
static __always_inline void count(u32 which)
{
	u64 *c = hm_counters.lookup(&which);
	if (c)
		*c += 1; /* per-CPU slot: no atomic needed */
}

static __always_inline int in_pods(u32 addr)
{
	struct hm_cidr_key k = {.prefixlen = 32, .addr = addr};
	return hm_pods.lookup(&k) != NULL;
}

int hm_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	u32 zero = 0;
	struct hm_config *cfg = hm_config.lookup(&zero);
	if (!cfg || !(cfg->flags & HM_F_INBOUND))
		return SK_PASS;
	if (!in_pods(ctx->local_ip4))
		return SK_PASS; /* the node's own addresses: its listeners as usual */
	u32 port = ctx->local_port; /* host order */
	if (hm_inb_skip.lookup(&port))
		return SK_PASS;

	struct bpf_sock *listener = (struct bpf_sock *)hm_listen.lookup(&zero);
	if (!listener) {
		count(HM_C_INBOUND_NO_LISTENER);
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, listener, 0);
	bpf_sk_release(listener);
	if (err) {
		count(HM_C_INBOUND_ERROR);
		return SK_DROP;
	}
	count(HM_C_INBOUND_ASSIGNED);
	return SK_PASS;
}
