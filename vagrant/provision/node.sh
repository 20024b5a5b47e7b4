#!/usr/bin/env bash
# Provision a hostmesh worker: `hostmesh install --role agent` with this node's name, its
# token and the mesh root bundle (left in the share by controlplane.sh), then (under
# systemd) the hostmesh-agent unit is enabled and started by install itself.
#
# Vagrant runs it as root in the VM. The lab test (tests/test_systemd_lab.py) runs the
# very same script with:
#   HOSTMESH_ROOT=DIR        install under DIR as if it were / (default /)
#   HOSTMESH_NO_START=1      do not call systemctl
#   HOSTMESH_BIN=PATH        the hostmesh executable (default: build one from HOSTMESH_SRC)
# The node's settings:
#   HOSTMESH_NODE            node name (default: the short hostname)
#   HOSTMESH_CONTROL_PLANE   HOST:PORT[,HOST:PORT...] of the control plane's 15010
#   HOSTMESH_TOKEN_FILE      default: $HOSTMESH_SHARE/tokens/<node>.token
#   HOSTMESH_ROOT_BUNDLE     default: $HOSTMESH_SHARE/root-bundle.pem
#   HOSTMESH_POD_CIDR        this node's workload CIDR
#   HOSTMESH_MESH_CIDRS      space-separated: service VIPs and every node's pod CIDR
#   HOSTMESH_CAPTURE         iptables (default) or ebpf
#   HOSTMESH_INSTALL_ARGS    more `hostmesh install` flags (split on spaces)
set -euo pipefail

src=${HOSTMESH_SRC:-/hostmesh}
share=${HOSTMESH_SHARE:-$src/vagrant/.hostmesh}
root=${HOSTMESH_ROOT:-/}
node=${HOSTMESH_NODE:-$(hostname -s)}
control_plane=${HOSTMESH_CONTROL_PLANE:?HOSTMESH_CONTROL_PLANE=HOST:PORT is required}
pod_cidr=${HOSTMESH_POD_CIDR:?HOSTMESH_POD_CIDR is required}
mesh_cidrs=${HOSTMESH_MESH_CIDRS:?HOSTMESH_MESH_CIDRS is required (space-separated)}
token=${HOSTMESH_TOKEN_FILE:-$share/tokens/$node.token}
bundle=${HOSTMESH_ROOT_BUNDLE:-$share/root-bundle.pem}

say() { echo "node.sh: $*" >&2; }

# lib.sh: next to this script, or in the synced sources (Vagrant uploads the script alone)
lib=$(dirname "$0")/lib.sh
[ -f "$lib" ] || lib=$src/vagrant/provision/lib.sh
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$lib"

# the control plane writes the bundle once its CA exists: wait for it (vagrant up may
# bring the workers up at the same time)
for _ in $(seq 1 180); do
  [ -s "$bundle" ] && [ -s "$token" ] && break
  sleep 1
done
if [ ! -s "$bundle" ] || [ ! -s "$token" ]; then
  say "no token ($token) or root bundle ($bundle): provision the control plane first (vagrant up --no-parallel)"
  exit 1
fi

bin=$(hostmesh_bin "$src")
args=(install --role agent --root "$root" --bin "$bin" --node "$node" --control-plane "$control_plane"
      --token-file "$token" --root-bundle "$bundle" --capture "${HOSTMESH_CAPTURE:-iptables}"
      --pod-cidr "$pod_cidr")
for cidr in $mesh_cidrs; do
  args+=(--mesh-cidr "$cidr")
done
if [ "${HOSTMESH_NO_START:-0}" = 1 ]; then
  args+=(--no-start)
fi
# word splitting is the point: a list of extra flags
# shellcheck disable=SC2206
extra=(${HOSTMESH_INSTALL_ARGS:-})
say "hostmesh ${args[*]} ${extra[*]}"
exec "$bin" "${args[@]}" "${extra[@]}"
