// SPDX-License-Identifier: GPL-2.0
/*
 * sockops (second program): put the sockets of same-node pairs into hm_socks, where
 * bpf/sk_msg.c hands their messages straight to the peer socket (Merbridge's acceleration).
 *
 * Attached only when acceleration is on, to the pod cgroups and to the agent's cgroup (the
 * proxy's sockets), next to bpf/sockops.c: that one files original destinations and must
 * not run on the proxy's cgroup; keeping the two apart means "off" attaches nothing at all.
 *
 * Which sockets go in (nothing else ever does, so every key has the proxy or a local pod on
 * one side and tuples are unique on the node):
 *   active  a pod's (or selected host process's) connection that connect4 redirected to the
 *           proxy: its 4-tuple is in hm_origdst (filed by bpf/sockops.c at TCP_CONNECT_CB);
 *   active  a proxy upstream socket (hm_config.socket_mark) to a local pod (hm_pods);
 *   passive a socket whose peer went in as an active socket: the proxy's accepted socket of
 *           the first case, a pod's accepted socket of the second. The active end is always
 *           established first (it sends the ACK that establishes the passive end) and leaves
 *           a note in hm_pending; a passive socket without one is not a same-node pair.
 * A key already present (a stale tuple of a closed-but-not-released socket) is replaced:
 * the newest connection owns its tuple. Insert failures are counted and leave the socket on
 * TCP/IP. The kernel unlinks a socket from hm_socks when it is closed.
 */
#include "lib/helpers.h"

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

static __always_inline int eligible_active(struct bpf_sock_ops *skops, struct hm_sock_key *k)
{
	struct hm_tuple t = {.saddr = k->local_ip4, .daddr = k->remote_ip4,
			     .sport = k->local_port, .dport = k->remote_port};
	if (hm_origdst.lookup(&t))
		return 1; /* redirected to the proxy by connect4 */
	u32 zero = 0;
	struct hm_config *cfg = hm_config.lookup(&zero);
	if (!cfg || !cfg->socket_mark)
		return 0;
	struct bpf_sock *sk = skops->sk;
	if (!sk || sk->mark != cfg->socket_mark)
		return 0;
	return in_pods(k->remote_ip4); /* the proxy dialing a pod of this node */
}

/* sock_ops programs may not hold a socket from a map lookup (no bpf_sk_release), so the
 * active end leaves a note for its peer in hm_pending instead: the key the passive end will
 * have. The passive end consumes it. Notes of peers that never come (a pod whose cgroup is
 * not accelerated) age out of the LRU map. */
static __always_inline void expect_peer(struct hm_sock_key *k)
{
	struct hm_sock_key peer = {.local_ip4 = k->remote_ip4, .remote_ip4 = k->local_ip4,
				   .local_port = k->remote_port, .remote_port = k->local_port};
	u32 one = 1;
	hm_pending.update(&peer, &one);
}

static __always_inline int peer_expected(struct hm_sock_key *k)
{
	if (!hm_pending.lookup(k))
		return 0;
	hm_pending.delete(k);
	return 1;
}

int hm_sock_accel(struct bpf_sock_ops *skops)
{
	u32 op = skops->op;
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (skops->family != AF_INET)
		return 1; /* IPv4 only, like the rest of capture */

	struct hm_sock_key k = {
		.local_ip4 = skops->local_ip4,
		.remote_ip4 = skops->remote_ip4,
		.local_port = hm_htons((u16)skops->local_port),             /* host order in sock_ops */
		.remote_port = hm_htons((u16)hm_ntohl(skops->remote_port)), /* network order, upper half */
	};
	int active = op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
	if (active ? !eligible_active(skops, &k) : !peer_expected(&k))
		return 1;
	/* a statement of its own: bcc's rewrite of this call ends in ';' */
	long err = hm_socks.sock_hash_update(skops, &k, BPF_ANY);
	if (err != 0) {
		count(HM_C_ACCEL_INSERT_ERROR);
		return 1;
	}
	count(HM_C_ACCEL_INSERTED);
	struct hm_flow fresh = {};
	hm_flows.update(&k, &fresh); /* a reused tuple starts over */
	if (active)
		expect_peer(&k);
	return 1;
}
