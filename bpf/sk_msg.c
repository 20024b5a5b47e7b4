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
	struct hm_sock_key peer = {
		.local_ip4 = msg->remote_ip4,
		.remote_ip4 = msg->local_ip4,
		.local_port = hm_htons((u16)hm_ntohl(msg->remote_port)), /* network order, upper half */
		.remote_port = hm_htons((u16)msg->local_port),           /* host order */
	};
	u64 size = msg->size;
	/* SK_PASS with the redirect set = deliver to the peer; when the peer is missing the helper
	 * returns SK_DROP and sets nothing: returning SK_PASS then sends it the normal way */
	/* a statement of its own: bcc's rewrite of this call ends in ';' */
	long verdict = hm_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		count(HM_C_ACCEL_REDIRECTED, 1);
		count(HM_C_ACCEL_REDIRECTED_BYTES, size);
	} else {
		count(HM_C_ACCEL_PASSED, 1);
	}
	return SK_PASS;
}
