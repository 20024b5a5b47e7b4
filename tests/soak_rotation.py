"""Certificate rotation under steady traffic, as a process of its own.

    python -m tests.soak_rotation --out FILE [--seconds 600] [--ttl 120]

Builds a 2-node lab whose MeshConfig sets a short certificate TTL, runs steady
cross-node traffic through the mTLS tunnel from node1/pod-1 to node2/pod-1 (a new
connection every 50 ms, plus one keep-alive connection asking every 200 ms) for the whole
run, samples both agents' /certs every few seconds, removes the lab, and writes a JSON
summary: requests, failures (with the first errors), and the distinct certificate
serials each node held. The test suite starts it at collection (tests/conftest.py) so its
ten minutes overlap the other tests, and tests/test_zz_rotation_soak.py checks the
summary at the end.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

# the traffic client, run inside node1/pod-1; prints one JSON line when done
CLIENT = textwrap.dedent("""
    import http.client, json, sys, time
    host, seconds = sys.argv[1], float(sys.argv[2])
    ok = failed = 0
    errors = []
    def note(kind, exc):
        global failed
        failed += 1
        if len(errors) < 20:
            errors.append(f"{time.strftime('%H:%M:%S')} {kind}: {exc!r}")
    keep = None
    end = time.monotonic() + seconds
    next_keep = time.monotonic()
    while time.monotonic() < end:
        try:
            c = http.client.HTTPConnection(host, 8080, timeout=10)
            c.request("GET", "/?soak=new")
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status == 200 and b'"node":"node2"' in body:
                ok += 1
            else:
                note("new", f"status {r.status}")
        except Exception as exc:
            note("new", exc)
        if time.monotonic() >= next_keep:
            next_keep += 0.2
            try:
                if keep is None:
                    keep = http.client.HTTPConnection(host, 8080, timeout=10)
                keep.request("GET", "/?soak=keepalive")
                r = keep.getresponse()
                r.read()
                if r.status == 200:
                    ok += 1
                else:
                    note("keepalive", f"status {r.status}")
            except Exception as exc:
                note("keepalive", exc)
                keep = None
        time.sleep(0.05)
    print(json.dumps({"ok": ok, "failed": failed, "errors": errors}))
""")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--ttl", type=int, default=120)
    args = ap.parse_args(argv)

    from meshlab import mesh, naming
    from meshlab.lab import Lab
    from tests.conftest import unique_lab_name

    # SIGTERM (the suite ending early) must still remove the lab: turn it into SystemExit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
    out = Path(args.out)
    summary: dict = {"seconds": args.seconds, "ttl": args.ttl}
    lab = Lab(unique_lab_name())
    try:
        meshconfig = {"apiVersion": "hostmesh.io/v1alpha1", "kind": "MeshConfig",
                      "metadata": {"name": "default", "namespace": "default"},
                      "spec": {"certificateTTL": f"{args.ttl}s"}}
        lab.up(2, 1, capture="iptables", config=[meshconfig])
        client = subprocess.Popen(
            lab.exec_argv(lab.target("node1/pod-1"), [sys.executable, "-c", CLIENT, naming.pod_ip(2, 1),
                                                      str(args.seconds)]),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        serials: dict[str, set[str]] = {"node1": set(), "node2": set()}
        while client.poll() is None:
            for node in serials:
                r = mesh.admin_get(lab, node, "/certs")
                if r.returncode == 0:
                    serials[node].update(c["serial"] for c in json.loads(r.stdout) if c.get("serial"))
            time.sleep(3)
        stdout, stderr = client.communicate(timeout=30)
        summary["client"] = json.loads(stdout) if stdout.strip() else {"error": stderr[-2000:]}
        summary["serials"] = {node: len(s) for node, s in serials.items()}
    except BaseException as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        try:
            lab.down()
        finally:
            out.write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
