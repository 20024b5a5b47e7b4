"""`hostmesh config apply -f DIR --etcd ...`: validate a directory exactly as the control plane
would, then write one key per object under the etcd prefix.

Nothing is written unless the whole set is valid (the same checks and messages as the file
source). Values are the documents as written (JSON), so defaults are applied by the control
plane that reads them, not frozen at apply time. Unchanged keys are not rewritten (no
revision churn, no rebuild on the replicas); `prune` deletes config keys the directory no
longer has. Writes go in transactions of at most `TXN_OPS` operations (etcd's default
--max-txn-ops is 128): an apply that fits is atomic, a larger one is applied in order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from controlplane.errors import ConfigInvalid
from controlplane.etcd import DEFAULT_PREFIX, EtcdClient, delete_op, put_op
from controlplane.model import assemble
from controlplane.sources.etcd import config_prefix, key_of
from controlplane.sources.files import config_files, read_config_file

TXN_OPS = 100


@dataclass
class ApplyPlan:
    puts: dict[str, bytes] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return ([f"write  {k}" for k in sorted(self.puts)] + [f"delete {k}" for k in self.deletes]
                + [f"same   {k}" for k in self.unchanged])

    def summary(self) -> str:
        return f"{len(self.puts)} written, {len(self.deletes)} deleted, {len(self.unchanged)} unchanged"


def documents_by_key(directory: str, prefix: str = DEFAULT_PREFIX) -> dict[str, bytes]:
    """{etcd key: value} for every object of a valid directory; raises ConfigInvalid otherwise."""
    try:
        entries = config_files(directory)
    except OSError as exc:
        raise ConfigInvalid([f"{directory}: cannot read the directory: {exc.strerror}"]) from None
    results = [read_config_file(os.path.join(directory, e.name), e.name) for e in entries]
    loaded = assemble(results)
    if loaded.errors:
        raise ConfigInvalid(loaded.errors)
    out = {}
    for r in results:
        for c in r.checked:
            out[key_of(c.obj, prefix)] = json.dumps(c.doc.data, sort_keys=True, indent=1).encode()
    return out


def plan_apply(wanted: dict[str, bytes], existing: dict[str, bytes], prune: bool) -> ApplyPlan:
    plan = ApplyPlan()
    for key, value in sorted(wanted.items()):
        if existing.get(key) == value:
            plan.unchanged.append(key)
        else:
            plan.puts[key] = value
    if prune:
        plan.deletes = sorted(set(existing) - set(wanted))
    return plan


async def apply_directory(client: EtcdClient, directory: str, *, prefix: str = DEFAULT_PREFIX,
                          prune: bool = False, dry_run: bool = False) -> ApplyPlan:
    wanted = documents_by_key(directory, prefix)
    _, kvs = await client.get_prefix(config_prefix(prefix))
    existing = {kv.key.decode("utf-8", "replace"): kv.value for kv in kvs}
    plan = plan_apply(wanted, existing, prune)
    if dry_run:
        return plan
    ops = [put_op(k, v) for k, v in plan.puts.items()] + [delete_op(k) for k in plan.deletes]
    for i in range(0, len(ops), TXN_OPS):
        await client.txn([], ops[i:i + TXN_OPS])
    return plan
