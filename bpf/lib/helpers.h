/* SPDX-License-Identifier: (GPL-2.0 OR BSD-2-Clause) */
/* Small helpers shared by the hostmesh programs. */
#ifndef HOSTMESH_HELPERS_H
#define HOSTMESH_HELPERS_H

#include "lib/maps.h"
#include <uapi/linux/in.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif
#ifndef SOL_IP
#define SOL_IP 0
#endif
/* linux/netfilter_ipv4.h */
#define HM_SO_ORIGINAL_DST 80

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define hm_htons(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define hm_htonl(x) ((__u32)__builtin_bswap32((__u32)(x)))
#else
#define hm_htons(x) ((__u16)(x))
#define hm_htonl(x) ((__u32)(x))
#endif
#define hm_ntohs(x) hm_htons(x)
#define hm_ntohl(x) hm_htonl(x)

#define HM_LOOPBACK_IP4 hm_htonl(0x7f000001) /* 127.0.0.1 */

/*
 * Map access stays in each program's own file: bcc rewrites map operations (map.lookup(),
 * map.update(), ...) only in the main source file, not in headers and not inside macros.
 */

/* the socket cookie is 64 bits; bcc 0.26 declares bpf_get_socket_cookie as returning u32 */
static u64 (*hm_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;

#endif /* HOSTMESH_HELPERS_H */
