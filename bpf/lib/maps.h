/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/*
 * The maps every hostmesh program shares, pinned under HM_PIN_DIR
 * (/sys/fs/bpf/hostmesh/<instance>, given by the loader as a -D flag).
 *
 * bcc's BPF_TABLE_PINNED opens a map that is already pinned there and creates + pins it
 * otherwise, so the programs of one instance (compiled as separate modules, one per attach
 * point) and a restarted agent all share the same maps: configuration, counters and the
 * original destinations of connections in flight survive an agent restart.
 */
#ifndef HOSTMESH_MAPS_H
#define HOSTMESH_MAPS_H

#include "lib/hostmesh.h"

#ifndef HM_PIN_DIR
#error "HM_PIN_DIR must be defined by the loader (-DHM_PIN_DIR=\"/sys/fs/bpf/hostmesh/<instance>\")"
#endif

#define HM_PIN(name) HM_PIN_DIR "/" #name

/* configuration written by the agent (one entry) */
BPF_TABLE_PINNED("array", u32, struct hm_config, hm_config, 1, HM_PIN(hm_config));
/* what built the pinned programs (one entry, agent-only) */
BPF_TABLE_PINNED("array", u32, struct hm_meta, hm_meta, 1, HM_PIN(hm_meta));
/* mesh destinations captured outbound: service VIP CIDRs and every node's pod CIDR */
BPF_TABLE_PINNED("lpm_trie", struct hm_cidr_key, u32, hm_mesh, 256, HM_PIN(hm_mesh), BPF_F_NO_PREALLOC);
/* this node's pod CIDRs: destinations captured inbound */
BPF_TABLE_PINNED("lpm_trie", struct hm_cidr_key, u32, hm_pods, 64, HM_PIN(hm_pods), BPF_F_NO_PREALLOC);
/* destination ports (host order) never captured inbound */
BPF_TABLE_PINNED("hash", u32, u32, hm_inb_skip, 64, HM_PIN(hm_inb_skip));
/* socket cookie -> original destination, written at connect time */
BPF_TABLE_PINNED("lru_hash", u64, struct hm_origdst, hm_cookie, 65536, HM_PIN(hm_cookie));
/* client 4-tuple -> original destination, written by sockops once the port is known */
BPF_TABLE_PINNED("lru_hash", struct hm_tuple, struct hm_origdst, hm_origdst, 65536, HM_PIN(hm_origdst));
/* the proxy's inbound listening socket (index 0); a u64 value lets the agent read its cookie */
BPF_TABLE_PINNED("sockmap", u32, u64, hm_listen, 1, HM_PIN(hm_listen));
/* same-node acceleration (bpf/sockops_accel.c inserts, bpf/sk_msg.c redirects): established
 * sockets of same-node pairs by (local, remote). Not BPF_TABLE_PINNED: bcc's generic table
 * struct has no sock_hash_update/msg_redirect_hash members, so this is bcc's BPF_SOCKHASH
 * declaration with a pinned section. A u64 value lets the agent read socket cookies. The
 * kernel unlinks a socket when it is closed; 65536 entries = 16384 proxied connections with
 * both legs on this node (4 sockets each), above the proxy's default connection limit. */
#define HM_SOCKS_MAX 65536
struct hm_socks_table_t {
	struct hm_sock_key key;
	u64 leaf;
	u64 *(*lookup)(struct hm_sock_key *);
	int (*update)(struct hm_sock_key *, u64 *);
	int (*delete)(struct hm_sock_key *);
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash:" HM_PIN(hm_socks))))
struct hm_socks_table_t hm_socks = {.max_entries = HM_SOCKS_MAX};
BPF_ANNOTATE_KV_PAIR(hm_socks, struct hm_sock_key, u64);
/* keys of passive sockets whose active peer went into hm_socks (see bpf/sockops_accel.c) */
BPF_TABLE_PINNED("lru_hash", struct hm_sock_key, u32, hm_pending, 65536, HM_PIN(hm_pending));
/* per accelerated socket (same key as hm_socks): bytes redirected, and whether it has fallen
 * back to TCP/IP for good (bpf/sk_msg.c); created by bpf/sockops_accel.c on insertion */
BPF_TABLE_PINNED("lru_hash", struct hm_sock_key, struct hm_flow, hm_flows, 65536, HM_PIN(hm_flows));
/* counters, enum hm_counter */
BPF_TABLE_PINNED("percpu_array", u32, u64, hm_counters, HM_C_MAX, HM_PIN(hm_counters));
/* cgroup id -> where programs are attached (agent bookkeeping, never read by programs) */
BPF_TABLE_PINNED("hash", u64, struct hm_attachment, hm_cgroups, 1024, HM_PIN(hm_cgroups));

#endif /* HOSTMESH_MAPS_H */
