// SPDX-License-Identifier: GPL-2.0
/*
 * cgroup/connect4: outbound capture at connect() time.
 *
 * Attached to pod cgroups (and chosen host cgroups). A TCP connect() toward a mesh
 * destination (hm_mesh LPM trie: service VIPs, pod CIDRs) is rewritten to the node proxy's
 * outbound listener before the SYN exists; the address the application asked for is kept
 * under the socket's cookie (hm_cookie) until sockops learns the local port
 * (bpf/sockops.c) and files it under the connection's 4-tuple (hm_origdst).
 *
 * Where to: a pod lives in its own network namespace, so 127.0.0.1 is not the node; its
 * sockets go to hm_config.redirect_ip4 (the pods' gateway address on the node-side veth,
 * 169.254.1.1 in the lab). A socket in the proxy's own namespace (a host process) goes to
 * 127.0.0.1. Either way, when the proxy is dead nothing listens there and connect() is
 * refused: capture fails closed.
 *
 * Never redirected: the proxy's own sockets (the agent's cgroup id, or the proxy's socket
 * mark), non-TCP sockets, destinations outside the mesh.
 */
#include "lib/helpers.h"

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

static __always_inline int in_mesh(u32 addr)
{
	struct hm_cidr_key k = {.prefixlen = 32, .addr = addr};
	return hm_mesh.lookup(&k) != NULL;
}

int hm_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != 0)
		return 1;
	struct hm_config *cfg = config();
	if (!cfg || !(cfg->flags & HM_F_OUTBOUND))
		return 1;

	u32 dst = ctx->user_ip4;
	if (!in_mesh(dst))
		return 1;
	if (cfg->proxy_cgroup_id && bpf_get_current_cgroup_id() == cfg->proxy_cgroup_id) {
		count(HM_C_CONNECT_PROXY_SKIPPED);
		return 1;
	}
	struct bpf_sock *sk = ctx->sk;
	if (sk && cfg->socket_mark && sk->mark == cfg->socket_mark) {
		count(HM_C_CONNECT_PROXY_SKIPPED);
		return 1;
	}

	struct hm_origdst orig = {.addr = dst, .port = (u16)ctx->user_port};
	u64 cookie = hm_get_socket_cookie(ctx);
	if (hm_cookie.update(&cookie, &orig) != 0)
		count(HM_C_CONNECT_ERROR); /* still redirected: the proxy refuses it (closed) */

	if ((cfg->flags & HM_F_LOCAL_NETNS) && cfg->proxy_netns_cookie &&
	    bpf_get_netns_cookie(ctx) == cfg->proxy_netns_cookie)
		ctx->user_ip4 = HM_LOOPBACK_IP4;
	else
		ctx->user_ip4 = cfg->redirect_ip4;
	ctx->user_port = (u32)cfg->outbound_port;
	count(HM_C_CONNECT_REDIRECTED);
	return 1;
}
