// SPDX-License-Identifier: GPL-2.0
/*
 * sockops: file a redirected connection's original destination under its 4-tuple.
 *
 * cgroup/connect4 only knows the socket cookie (the local port is chosen later). At
 * BPF_SOCK_OPS_TCP_CONNECT_CB the port is bound and the SYN is about to leave, so the
 * entry moves from hm_cookie to hm_origdst under (client ip, client port, proxy ip, proxy
 * port): exactly what the proxy's accepted socket sees as (peer, local). This happens
 * before the SYN is sent, hence before the proxy can accept the connection.
 *
 * Attached to the same cgroups as connect4 and connect6.
 */
#include "lib/helpers.h"

/* map access lives here: bcc rewrites map operations only in the main file */
static __always_inline void count(u32 which)
{
	u64 *c = hm_counters.lookup(&which);
	if (c)
		*c += 1; /* per-CPU slot: no atomic needed */
}

int hm_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	if (skops->family != AF_INET) {
		/* a dual-stack socket redirected by connect6 talks IPv4 underneath (::ffff:a.b.c.d);
		 * local_ip4/remote_ip4 then hold its addresses. Native IPv6 is never redirected. */
		if (skops->family != AF_INET6 || skops->remote_ip6[0] != 0 || skops->remote_ip6[1] != 0 ||
		    skops->remote_ip6[2] != hm_htonl(0x0000ffff))
			return 1;
	}

	u64 cookie = hm_get_socket_cookie(skops);
	struct hm_origdst *orig = hm_cookie.lookup(&cookie);
	if (!orig)
		return 1; /* not redirected by connect4 */

	struct hm_tuple t = {
		.saddr = skops->local_ip4,
		.daddr = skops->remote_ip4,
		.sport = hm_htons((u16)skops->local_port),        /* host order in sock_ops */
		.dport = hm_htons((u16)hm_ntohl(skops->remote_port)), /* network order, in the upper half */
	};
	struct hm_origdst copy = *orig;
	if (hm_origdst.update(&t, &copy) == 0)
		count(HM_C_SOCKOPS_MOVED);
	else
		count(HM_C_SOCKOPS_MISS);
	hm_cookie.delete(&cookie);
	return 1;
}
