# shellcheck shell=bash
# What both provisioning scripts share; sourced, not run.

# The hostmesh executable: $HOSTMESH_BIN, or a venv built from a copy of the sources in $1
# (a shared folder is no place for a venv three VMs would write).
hostmesh_bin() {
  local src=$1
  if [ -n "${HOSTMESH_BIN:-}" ]; then
    echo "$HOSTMESH_BIN"
    return
  fi
  local dest=/opt/hostmesh/src
  mkdir -p "$dest"
  tar -C "$src" --exclude=./.venv --exclude=./.git --exclude=./vagrant/.vagrant --exclude=./vagrant/.hostmesh \
    -cf - . | tar -C "$dest" -xf -
  "$dest/quickstart" install >&2
  echo "$dest/.venv/bin/hostmesh"
}
