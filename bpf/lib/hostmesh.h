/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/*
 * hostmesh eBPF capture: every structure shared between the programs and the agent.
 *
 * This is the ONE header the Python side mirrors (nodeagent/capture/ebpf_maps.py, ctypes).
 * Change a struct here and there together: the loader compares each map's key/value layout
 * as bcc describes it with the ctypes mirror and refuses to run on a mismatch, and pinned
 * maps whose sizes no longer match are replaced instead of adopted.
 *
 * Conventions: IPv4 addresses and ports are stored in NETWORK byte order everywhere (as the
 * packet and struct sockaddr_in carry them); every struct is padded explicitly so that C
 * and ctypes agree without relying on compiler packing.
 */
#ifndef HOSTMESH_H
#define HOSTMESH_H

/* bumped whenever a struct below changes shape; stored in the pinned hm_meta map */
#define HM_LAYOUT_VERSION 2

/* hm_config.flags */
#define HM_F_OUTBOUND 0x1      /* cgroup/connect4 redirects mesh destinations to the proxy */
#define HM_F_INBOUND 0x2       /* tc ingress hands connections for local pods to the proxy */
#define HM_F_LOCAL_NETNS 0x4   /* sockets in the proxy's own netns are sent to 127.0.0.1 */

/* the single entry of the hm_config array map */
struct hm_config {
	__u32 redirect_ip4;       /* where pod sockets are sent (the pods' gateway on the node) */
	__u16 outbound_port;      /* the proxy's outbound listener (15001), network order */
	__u16 inbound_port;       /* the proxy's inbound listener (15006), network order */
	__u32 socket_mark;        /* the proxy's upstream sockets carry it: never redirected */
	__u32 inbound_mark;       /* tc sets it on inbound packets: an ip rule delivers them locally */
	__u64 proxy_cgroup_id;    /* the agent's cgroup v2 id: its sockets are never redirected */
	__u64 proxy_netns_cookie; /* the proxy's network namespace (SO_NETNS_COOKIE) */
	__u32 flags;              /* HM_F_* */
	__u32 accel_budget;       /* bytes a socket may hand to its peer before it stays on TCP (0: none) */
};

/* LPM trie key for the mesh (destination) and local pod CIDR tries */
struct hm_cidr_key {
	__u32 prefixlen;
	__u32 addr;
};

/* a TCP connection as its client sees it: client address -> the address it reached */
struct hm_tuple {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

/* where a redirected connection was headed */
struct hm_origdst {
	__u32 addr;
	__u16 port;
	__u16 _pad;
};

/* hm_socks key: one end of a TCP connection as that socket sees it (local, remote). The peer
 * socket of a same-node pair is found under the reversed key. No netns cookie in the key: the
 * two ends of a pair live in different namespaces (pod, node) and each must compute the
 * other's key from its own tuple; uniqueness comes from what is inserted (every key has the
 * proxy's address or a local pod's unique address on one side, see bpf/sockops_accel.c). */
struct hm_sock_key {
	__u32 local_ip4;
	__u32 remote_ip4;
	__u16 local_port;         /* network order */
	__u16 remote_port;        /* network order */
};

/* hm_flows value: what one accelerated socket has handed to its peer so far. Written by
 * the socket's own sk_msg runs only (they are serialised by the socket lock). */
struct hm_flow {
	__u64 redirected;         /* bytes redirected */
	__u32 tcp_only;           /* 1: every further message takes TCP/IP (never back: see sk_msg.c) */
	__u32 _pad;
};

/* the single entry of the hm_meta array map: what built the pinned programs */
struct hm_meta {
	__u32 layout;             /* HM_LAYOUT_VERSION */
	__u32 _pad;
	__u8 build_id[32];        /* sha256 of sources + cflags: equal means the pins are adoptable */
};

/* value of the hm_cgroups hash (key: cgroup v2 id): where the agent attached programs, so
 * that remove() finds every attachment again, also after a crash and a changed config */
#define HM_CGROUP_PATH_MAX 248
struct hm_attachment {
	__u32 attach_types;       /* bit (1 << BPF attach type) per program attached there */
	__u32 _pad;
	char path[HM_CGROUP_PATH_MAX];
};

/* index into the per-CPU hm_counters array */
enum hm_counter {
	HM_C_CONNECT_REDIRECTED = 0, /* connect4 sent a connection to the proxy */
	HM_C_CONNECT_PROXY_SKIPPED,  /* connect4 saw a proxy socket (cgroup or mark) and left it */
	HM_C_CONNECT_ERROR,          /* connect4 could not record an original destination */
	HM_C_SOCKOPS_MOVED,          /* sockops moved an original destination to its 4-tuple */
	HM_C_SOCKOPS_MISS,           /* a connection to the proxy with no recorded destination */
	HM_C_ORIGDST_HIT,            /* getsockopt(SO_ORIGINAL_DST) answered from the map */
	HM_C_ORIGDST_MISS,           /* ... not in the map: answered with the local address */
	HM_C_INBOUND_ASSIGNED,       /* sk_lookup handed a SYN for a local pod to the inbound listener */
	HM_C_INBOUND_NO_LISTENER,    /* ... no listener: refused (fail closed) */
	HM_C_INBOUND_ERROR,          /* ... bpf_sk_assign failed: refused */
	HM_C_INBOUND_ESTABLISHED,    /* tc routed a packet of an intercepted connection locally */
	HM_C_ACCEL_INSERTED,         /* sockops put a same-node socket into hm_socks */
	HM_C_ACCEL_INSERT_ERROR,     /* ... the kernel refused it (map full, ...): it stays on TCP/IP */
	HM_C_ACCEL_REDIRECTED,       /* sk_msg handed a message straight to the peer socket */
	HM_C_ACCEL_REDIRECTED_BYTES, /* ... bytes of those messages */
	HM_C_ACCEL_PASSED,           /* a message of a socket in hm_socks took TCP/IP (no peer, or tcp_only) */
	HM_C_ACCEL_BUDGET_SPENT,     /* a socket used its accel_budget: it continues over TCP/IP */
	HM_C_INBOUND_SYN,            /* tc marked a SYN for a local pod (local delivery, then sk_lookup) */
	HM_C_MAX,
};

#endif /* HOSTMESH_H */
