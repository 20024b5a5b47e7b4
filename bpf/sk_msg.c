// SPDX-License-Identifier: GPL-2.0
/*
 * sk_msg (attached to the hm_socks sockhash): same-node acceleration, the sending side.
 *
 * Every sendmsg() on a socket in hm_socks runs this. When the peer socket of the connection
 * (the reversed tuple) is in hm_socks too, the message is queued straight onto the peer's
 * receive side (BPF_F_INGRESS): the bytes skip TCP/IP, the veth and the softirq between a
 * pod's socket and the node proxy's. Otherwise the message takes the normal TCP path.
 *
 * What stays TCP: the handshake, FIN and RST (not messages: half-close and EOF keep their
 * order, a FIN is sent after every message redirected before it), and every socket outside
 * hm_socks (see bpf/sockops_accel.c for who gets in).
 *
 * Once a socket sends one message over TCP/IP it never redirects again (hm_flows.tcp_only).
 * The receiver reads redirected bytes before bytes that arrived over TCP/IP, so switching
 * from redirect to TCP keeps the byte order, and switching back could not: a message
 * redirected while an earlier one is still on its way through the stack would overtake it.
 * That happens when a client writes before its peer is established (no peer yet) and when
 * the socket has used its budget.
 *
 * The budget (hm_config.accel_budget bytes per socket): the ingress redirect charges the
 * receiving socket without looking at its receive buffer, so a reader that does not keep up
 * does not slow the writer down: bulk transfers into a busy proxy, or from the proxy into a
 * slow pod, would queue in kernel memory until the node's TCP memory limit (tcp_mem) makes
 * every socket on the host fail with ENOMEM. A socket that has redirected its budget
 * continues over TCP/IP, where the receive window bounds what is in flight again.
 */
#include "lib/helpers.h"

/* map access lives here: bcc rewrites map operations only in the main file */
static __always_inline void count(u32 which, u64 n)
{
	u64 *c = hm_counters.lookup(&which);
	if (c)
		*c += n; /* per-CPU slot: no atomic needed */
}

int hm_sk_msg(struct sk_msg_md *msg)
{
	if (msg->family != AF_INET)
		return SK_PASS;
	struct hm_sock_key self = {
		.local_ip4 = msg->local_ip4,
		.remote_ip4 = msg->remote_ip4,
		.local_port = hm_htons((u16)msg->local_port),             /* host order */
		.remote_port = hm_htons((u16)hm_ntohl(msg->remote_port)), /* network order, upper half */
	};
	struct hm_flow *flow = hm_flows.lookup(&self);
	if (!flow || flow->tcp_only) {
		count(HM_C_ACCEL_PASSED, 1); /* no entry (evicted): TCP is always safe */
		return SK_PASS;
	}
	u64 size = msg->size;
	u32 zero = 0;
	struct hm_config *cfg = hm_config.lookup(&zero);
	if (cfg && cfg->accel_budget && flow->redirected + size > cfg->accel_budget) {
		flow->tcp_only = 1;
		count(HM_C_ACCEL_BUDGET_SPENT, 1);
		count(HM_C_ACCEL_PASSED, 1);
		return SK_PASS;
	}
	struct hm_sock_key peer = {.local_ip4 = self.remote_ip4, .remote_ip4 = self.local_ip4,
				   .local_port = self.remote_port, .remote_port = self.local_port};
	/* SK_PASS with the redirect set = deliver to the peer; when the peer is missing the helper
	 * returns SK_DROP and sets nothing: returning SK_PASS then sends it the normal way.
	 * A statement of its own: bcc's rewrite of this call ends in ';' */
	long verdict = hm_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		flow->redirected += size;
		count(HM_C_ACCEL_REDIRECTED, 1);
		count(HM_C_ACCEL_REDIRECTED_BYTES, size);
	} else {
		flow->tcp_only = 1;
		count(HM_C_ACCEL_PASSED, 1);
	}
	return SK_PASS;
}
