#!/usr/bin/env bash
# Provision the hostmesh control plane: a bootstrap token per worker (kept across runs),
# `hostmesh install --role controlplane`, and once the control plane has made its CA, the
# mesh root bundle, both left in the share for provision/node.sh.
#
# Vagrant runs it as root in the VM; tests can run it with:
#   HOSTMESH_ROOT=DIR        install under DIR as if it were / (default /)
#   HOSTMESH_NO_START=1      do not call systemctl (and so do not wait for the CA)
#   HOSTMESH_BIN=PATH        the hostmesh executable (default: build one from HOSTMESH_SRC)
# Settings:
#   HOSTMESH_NODES           space-separated worker names (a token each)
#   HOSTMESH_TLS_SAN         space-separated names/addresses agents dial (the TLS certificate)
#   HOSTMESH_SHARE           where tokens/ and root-bundle.pem go (default /hostmesh/vagrant/.hostmesh)
set -euo pipefail

src=${HOSTMESH_SRC:-/hostmesh}
share=${HOSTMESH_SHARE:-$src/vagrant/.hostmesh}
root=${HOSTMESH_ROOT:-/}
nodes=${HOSTMESH_NODES:?HOSTMESH_NODES is required (space-separated worker names)}

say() { echo "controlplane.sh: $*" >&2; }

# lib.sh: next to this script, or in the synced sources (Vagrant uploads the script alone)
lib=$(dirname "$0")/lib.sh
[ -f "$lib" ] || lib=$src/vagrant/provision/lib.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$lib"

tokens=$share/tokens
mkdir -p "$tokens"
chmod 0700 "$tokens"
for node in $nodes; do
  if [ ! -s "$tokens/$node.token" ]; then
    # 32 random bytes, URL-safe without padding: what controlplane/ca.py new_token() makes
    (umask 077 && head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' >"$tokens/$node.token")
    say "made a bootstrap token for $node"
  fi
done

bin=$(hostmesh_bin "$src")
args=(install --role controlplane --root "$root" --bin "$bin" --node-tokens "$tokens")
for san in ${HOSTMESH_TLS_SAN:-}; do
  args+=(--tls-san "$san")
done
if [ "${HOSTMESH_NO_START:-0}" = 1 ]; then
  args+=(--no-start)
fi
say "hostmesh ${args[*]}"
"$bin" "${args[@]}"

if [ "${HOSTMESH_NO_START:-0}" = 1 ] || [ "$root" != / ]; then
  say "not started: the root bundle is written once the control plane has run (hostmesh ca bundle)"
  exit 0
fi
# the control plane generates its root on the first start; hand the bundle to the workers
for _ in $(seq 1 60); do
  if "$bin" ca bundle --ca-dir /var/lib/hostmesh/ca >"$share/root-bundle.pem.tmp" 2>/dev/null; then
    mv "$share/root-bundle.pem.tmp" "$share/root-bundle.pem"
    say "wrote $share/root-bundle.pem"
    exit 0
  fi
  sleep 1
done
rm -f "$share/root-bundle.pem.tmp"
say "the control plane made no CA within 60s: see journalctl -u hostmesh-controlplane"
exit 1
