"""`hostmesh config validate|apply`: check a config directory offline, or write it to etcd
for control planes that run with `--etcd` (see controlplane/apply.py)."""

from __future__ import annotations

import argparse
import asyncio

from hostmesh.output import to_json


class ConfigCommandError(Exception):
    """Printed as `hostmesh: error: ...` by the CLI."""


def etcd_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--etcd", required=required, metavar="HOST:PORT[,...]",
                   help="etcd v3 endpoints (comma-separated; each call fails over to the next)")
    p.add_argument("--etcd-prefix", default="/hostmesh/", help="key prefix (default /hostmesh/)")
    p.add_argument("--etcd-cacert", help="CA bundle that signs etcd's server certificate (enables TLS)")
    p.add_argument("--etcd-cert", help="client certificate for etcd (with --etcd-key)")
    p.add_argument("--etcd-key", help="client key for etcd")


def etcd_tls(args):
    from controlplane.etcd import EtcdTLS
    if (args.etcd_cert or args.etcd_key) and not (args.etcd_cert and args.etcd_key and args.etcd_cacert):
        raise ConfigCommandError("--etcd-cert and --etcd-key go together, and need --etcd-cacert")
    return EtcdTLS(args.etcd_cacert, args.etcd_cert or "", args.etcd_key or "") if args.etcd_cacert else None


def register(sub) -> None:
    p = sub.add_parser("config", help="validate a config directory, or apply it to etcd")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = csub.add_parser("validate", help="check a directory as the control plane would (exit 1 if invalid)")
    q.add_argument("-f", "--filename", required=True, metavar="DIR", help="directory of YAML config objects")
    q = csub.add_parser("apply", help="validate a directory, then write one etcd key per object")
    q.add_argument("-f", "--filename", required=True, metavar="DIR", help="directory of YAML config objects")
    etcd_flags(q, required=True)
    q.add_argument("--prune", action="store_true", help="delete config keys the directory no longer has")
    q.add_argument("--dry-run", action="store_true", help="print what would change; write nothing")
    q.add_argument("-o", "--output", choices=["table", "json"], default="table")


def cmd_config(args) -> int:
    from controlplane.errors import ConfigInvalid
    from controlplane.etcd import EtcdError
    try:
        if args.config_command == "validate":
            return _validate(args.filename)
        return asyncio.run(_apply(args))
    except ConfigInvalid as exc:
        raise ConfigCommandError(f"{args.filename} is invalid; nothing was written:\n{exc}") from None
    except EtcdError as exc:
        raise ConfigCommandError(str(exc)) from None


def _validate(directory: str) -> int:
    from controlplane.apply import documents_by_key
    keys = documents_by_key(directory)
    print(f"{directory}: valid, {len(keys)} objects")
    return 0


async def _apply(args) -> int:
    from controlplane.apply import apply_directory
    from controlplane.etcd import EtcdClient
    client = EtcdClient(args.etcd.split(","), tls=etcd_tls(args))
    try:
        plan = await apply_directory(client, args.filename, prefix=args.etcd_prefix, prune=args.prune,
                                     dry_run=args.dry_run)
    finally:
        await client.close()
    if args.output == "json":
        print(to_json({"dry_run": args.dry_run, "written": sorted(plan.puts), "deleted": plan.deletes,
                       "unchanged": plan.unchanged}))
        return 0
    for line in plan.lines():
        print(line)
    print(("would be: " if args.dry_run else "") + plan.summary())
    return 0
