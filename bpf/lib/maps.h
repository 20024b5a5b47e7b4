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
/* counters, enum hm_counter */
BPF_TABLE_PINNED("percpu_array", u32, u64, hm_counters, HM_C_MAX, HM_PIN(hm_counters));
/* cgroup id -> where programs are attached (agent bookkeeping, never read by programs) */
BPF_TABLE_PINNED("hash", u64, struct hm_attachment, hm_cgroups, 1024, HM_PIN(hm_cgroups));

#endif /* HOSTMESH_MAPS_H */
