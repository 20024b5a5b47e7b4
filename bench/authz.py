"""AuthorizationPolicy cost: one decision per connection, in process, no root.

    .venv/bin/python bench/authz.py [--seconds 2]

Policies are enforced once per connection (a tunnel stream, a plaintext connection or a
same-node upstream connection), never per request, so keep-alive request rates do not
change with them; the number to watch is the CPU a decision adds to each new connection.
Measured here: µs per decision for no policy, and for 10 policies x 20 rules each, every
rule with a source (principals, namespaces, ipBlocks), an operation (ports) and a `when`
condition, in two cases: the connection matches the last rule of the last ALLOW policy
(the worst case: every rule is tried) and it matches nothing (denied after every rule);
each first for attributes the Authorizer has not seen (full evaluation) and then for
attributes it has (its bounded decision cache).
Compare with the proxy's CPU per new connection (bench/l4.py: about 200 µs here).
"""

from __future__ import annotations

import argparse
import json
import time

from nodeagent.proxy.authz import Authorizer, ConnectionAttrs
from nodeagent.state import ConfigObject, NodeSnapshot, Workload

WORKLOAD = Workload("web-1", "shop", "n1", "198.18.1.10", "web", (("app", "web"),))


def policies(n: int = 10, rules: int = 20) -> tuple[ConfigObject, ...]:
    out = []
    for p in range(n):
        rs = [{"from": [{"source": {"principals": [f"cluster.local/ns/ns{p}-{r}/sa/client"],
                                    "namespaces": [f"ns{p}-{r}"], "ipBlocks": [f"198.18.{p}.0/24"]}}],
               "to": [{"operation": {"ports": [8080 + r]}}],
               "when": [{"key": "source.ip", "values": [f"198.18.{p}.{r}"]}]} for r in range(rules)]
        out.append(ConfigObject("AuthorizationPolicy", "shop", f"p{p:02d}", json.dumps({"rules": rs})))
    return tuple(out)


def per_decision_us(snapshot: NodeSnapshot, conn: ConnectionAttrs, seconds: float, cached: bool) -> float:
    authz = Authorizer()
    authz.decide(snapshot, WORKLOAD, conn)  # compile outside the timing
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(1000):
            if not cached:
                authz._decisions.clear()  # every connection new: the full evaluation
            authz.decide(snapshot, WORKLOAD, conn)
        n += 1000
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    last = ConnectionAttrs("cluster.local/ns/ns9-19/sa/client", "198.18.9.19", "198.18.1.10", 8099)
    none = ConnectionAttrs("cluster.local/ns/x/sa/y", "198.18.200.1", "198.18.1.10", 9999)
    with_policies = NodeSnapshot(node="n1", config=policies())
    rows = [("no policy", NodeSnapshot(node="n1"), last),
            ("10x20, match in the last rule", with_policies, last),
            ("10x20, no rule matches (deny)", with_policies, none)]
    print("| case | µs per connection, first of its attributes | µs, attributes seen before (cached) |")
    print("|---|---|---|")
    for name, snap, conn in rows:
        print(f"| {name} | {per_decision_us(snap, conn, args.seconds, False):.2f} | "
              f"{per_decision_us(snap, conn, args.seconds, True):.2f} |")


if __name__ == "__main__":
    main()
