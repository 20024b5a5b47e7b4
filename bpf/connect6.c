// SPDX-License-Identifier: GPL-2.0
/*
 * cgroup/connect6: outbound capture for dual-stack sockets dialing IPv4 mesh addresses.
 *
 * Many runtimes (gRPC C-core, Java, Go with some resolvers) open an AF_INET6 socket and
 * connect it to an IPv4-mapped address (::ffff:198.19.0.10). Those connects go through
 * this hook, not connect4. For a mapped destination inside the mesh the rewrite is the same
 * as bpf/connect4.c's, kept in mapped form (::ffff:<redirect address>, or ::ffff:127.0.0.1
 * in the proxy's own namespace). Native IPv6 destinations are left alone: the mesh is
 * IPv4-only for now.
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

int hm_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != 0)
		return 1;
	/* only IPv4-mapped destinations: ::ffff:a.b.c.d */
	if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 || ctx->user_ip6[2] != hm_htonl(0x0000ffff))
		return 1;
	struct hm_config *cfg = config();
	if (!cfg || !(cfg->flags & HM_F_OUTBOUND))
		return 1;

	u32 dst = ctx->user_ip6[3];
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
		count(HM_C_CONNECT_ERROR);

	if ((cfg->flags & HM_F_LOCAL_NETNS) && cfg->proxy_netns_cookie &&
	    bpf_get_netns_cookie(ctx) == cfg->proxy_netns_cookie)
		ctx->user_ip6[3] = HM_LOOPBACK_IP4;
	else
		ctx->user_ip6[3] = cfg->redirect_ip4;
	ctx->user_port = (u32)cfg->outbound_port;
	count(HM_C_CONNECT_REDIRECTED);
	return 1;
}
