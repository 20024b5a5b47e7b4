"""The `hostmesh` command: one entry point for operators, the lab, the agent and the control plane."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hostmesh import __version__, configcmd
from hostmesh.output import table, to_json


class CliError(Exception):
    """A user-facing failure: printed as `hostmesh: error: ...`, exit code 1."""


def _output_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=["table", "json"], default="table",
                   help="human table (default) or JSON for machines")


def _lab_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=os.environ.get("HOSTMESH_LAB", "lab"),
                   help="lab name (default: $HOSTMESH_LAB or 'lab')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hostmesh", description="A service mesh for the per-host deployment pattern.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("version", help="print the version")
    _output_flag(p)

    p = sub.add_parser("check", help="preflight: which kernel features and tools this host has")
    _output_flag(p)

    p = sub.add_parser("demo", help="bring a lab up, show traffic between pods, tear it down")
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.add_argument("--name", default="demo", help="lab name for the demo (default: demo)")

    p = sub.add_parser("agent", help="run the node agent (capture + proxy + admin) on this host")
    p.add_argument("--config", help="bootstrap YAML file; flags override its values")
    p.add_argument("--node", help="this node's name")
    p.add_argument("--capture", help="capture mode: iptables, ebpf, auto (eBPF, else iptables with a logged reason) or none")
    p.add_argument("--pod-cidr", action="append", help="a CIDR of this node's pods (repeatable)")
    p.add_argument("--mesh-cidr", action="append", help="a destination CIDR captured outbound (repeatable)")
    p.add_argument("--control-plane", help="the control plane's gRPC address, HOST:PORT (port 15010); "
                                           "comma-separated for replicas (the agent fails over in order)")
    p.add_argument("--token-file", help="this node's bootstrap token file (mode 0600) for the control plane")
    p.add_argument("--root-bundle", help="PEM root certificate(s) the control plane's TLS certificate chains to")
    p.add_argument("--insecure-control-plane", action="store_true",
                   help="plaintext gRPC without a token and without workload certificates (tests only)")
    p.add_argument("--snapshot", help="static snapshot file (JSON) to serve from instead of a control plane")
    p.add_argument("--admin-address", help="admin endpoint address:port (default 127.0.0.1:15000)")
    p.add_argument("--unknown-destination", help="passthrough (default) or refuse")
    p.add_argument("--drain-grace", help="how long SIGTERM waits for connections, e.g. 10s")
    p.add_argument("--state-dir", help="where the agent keeps state (default /var/lib/hostmesh)")
    p.add_argument("--agent-log-level", help="debug, info, warning or error")
    p.add_argument("--accelerate", action=argparse.BooleanOptionalAction, default=None,
                   help="eBPF capture: sockops + sk_msg for same-node socket pairs (capture.accelerate)")
    p.add_argument("--dump-bpf", action="store_true",
                   help="print the final eBPF source the ebpf capture backend compiles, and exit")
    p.add_argument("--uninstall", action="store_true",
                   help="remove this node's capture (a stop leaves it installed, failing closed) and exit; "
                        "refused while the agent runs")

    p = sub.add_parser("controlplane", help="run the control plane (config dir or etcd -> snapshots -> gRPC)")
    p.add_argument("--config-dir", help="directory of YAML config objects (watched); or --etcd, --source kubernetes")
    p.add_argument("--source", choices=["files", "etcd", "kubernetes"],
                   help="where the objects come from (default: files with --config-dir, etcd with --etcd)")
    p.add_argument("--kubeconfig", help="with --source kubernetes: a kubeconfig (default: in-cluster config)")
    p.add_argument("--kube-context", help="with --source kubernetes: the kubeconfig context")
    p.add_argument("--token-review", action="store_true",
                   help="with --source kubernetes: also accept agents' projected service-account tokens, "
                        "checked by TokenReview and bound to the node they name")
    p.add_argument("--agent-service-account", action="append", metavar="NAMESPACE/NAME",
                   help="with --token-review: the agents' service account (default hostmesh-system/hostmesh-agent)")
    p.add_argument("--token-audience", default="hostmesh", help="with --token-review: the tokens' audience")
    configcmd.etcd_flags(p, required=False)
    p.add_argument("--replica", help="with --etcd: this replica's name in leader election (default host-pid)")
    p.add_argument("--leader-ttl", type=int, default=5,
                   help="with --etcd: the leader lease TTL in seconds (a killed leader is replaced within it)")
    p.add_argument("--grpc-address", default="0.0.0.0:15010", help="discovery + certificates (default 0.0.0.0:15010)")
    p.add_argument("--http-address", default="0.0.0.0:15014", help="/metrics, /ready, /debug (default 0.0.0.0:15014)")
    p.add_argument("--ca-dir", help="the CA directory (a root is generated into an empty one; see `hostmesh ca`)")
    p.add_argument("--node-tokens", help="directory of <node>.token files (mode 0600), one per node")
    p.add_argument("--tls-san", action="append",
                   help="a DNS name or IP for the TLS certificate of the gRPC port (repeatable; agents dial it)")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext gRPC, no node tokens, no certificates (tests only)")

    configcmd.register(sub)
    from hostmesh import hostinstall  # install / uninstall on a bare-metal or VM host (systemd)
    hostinstall.register(sub)

    p = sub.add_parser("ca", help="the mesh CA directory: trust bundle, root rotation")
    csub = p.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    q = csub.add_parser("bundle", help="print the trust bundle (every trusted root) for agents' --root-bundle")
    q.add_argument("--ca-dir", required=True)
    q = csub.add_parser("status", help="the signing CA and the trusted roots")
    q.add_argument("--ca-dir", required=True)
    _output_flag(q)
    q = csub.add_parser("rotate", help="rotate the root: prepare, wait one TTL, activate, wait one TTL, finish")
    q.add_argument("phase", choices=["prepare", "activate", "finish"])
    q.add_argument("--ca-dir", required=True)

    p = sub.add_parser("status", help="control plane reachable? config valid? each node's acked version")
    p.add_argument("--controlplane", default="http://127.0.0.1:15014", help="the control plane's HTTP URL")
    p.add_argument("--lab", help="ask the control plane of this lab (enters its namespace)")
    _output_flag(p)

    p = sub.add_parser("proxy-config", help="what a node agent has in force (from its admin endpoint)")
    p.add_argument("what", choices=["listeners", "clusters", "routes", "certs", "policies", "capture"])
    p.add_argument("--node", help="in a lab: the node whose agent to ask (enters its namespace)")
    p.add_argument("--lab", default=os.environ.get("HOSTMESH_LAB", "lab"), help="lab name (with --node)")
    p.add_argument("--admin", default="http://127.0.0.1:15000", help="admin endpoint URL (without --node)")
    _output_flag(p)

    p = sub.add_parser("graph", help="service graph from the agents' metrics: who calls whom, rps, success, p99")
    p.add_argument("-o", "--output", choices=["table", "json", "dot"], default="table",
                   help="human table (default), JSON for machines, or Graphviz DOT")
    p.add_argument("--svg", metavar="FILE", help="also render the graph to FILE with Graphviz's dot")
    p.add_argument("--interval", type=float, help="seconds between the two scrapes the rates come from (default 5)")
    p.add_argument("--since-start", action="store_true",
                   help="one scrape: totals since each agent started, no rates")
    p.add_argument("--by", choices=["workload", "service"], default="workload",
                   help="edges to each destination workload (default) or summed per Service")
    p.add_argument("--namespace", action="append", help="only edges touching this namespace (repeatable)")
    p.add_argument("--workload", action="append", metavar="[NAMESPACE/]NAME",
                   help="only edges from or to this workload (repeatable)")
    p.add_argument("--show-idle", action="store_true", help="also edges without traffic in the window")
    p.add_argument("--lab", help="scrape every agent of this lab (enters its node namespaces)")
    p.add_argument("--agent", action="append", metavar="URL|HOST:PORT",
                   help="scrape this agent's metrics endpoint (repeatable; instead of asking the control plane)")
    p.add_argument("--controlplane", default="http://127.0.0.1:15014",
                   help="the control plane's HTTP URL, to list the agents (default http://127.0.0.1:15014)")
    p.add_argument("--metrics-port", type=int, default=15020,
                   help="with the control plane's list: the agents' health port serving /stats/prometheus")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per scrape (default 5)")

    lab = sub.add_parser("lab", help="a local multi-node cluster made of network namespaces")
    lsub = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    p = lsub.add_parser("up", help="create a lab")
    _lab_flag(p)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--pods-per-node", type=int, default=2)
    p.add_argument("--no-apps", action="store_true", help="do not start the test app in the pods")
    p.add_argument("--mesh", action=argparse.BooleanOptionalAction, default=True,
                   help="start a node agent on every node (default: on)")
    p.add_argument("--capture", default="iptables", choices=["iptables", "ebpf", "auto"], help="capture backend for the agents")
    p.add_argument("--accelerate", action=argparse.BooleanOptionalAction, default=None,
                   help="eBPF capture: the agents accelerate same-node socket pairs (default: the agent's)")
    _output_flag(p)
    p = lsub.add_parser("down", help="remove a lab and everything it started")
    _lab_flag(p)
    p.add_argument("--all", action="store_true", help="remove every lab and every hm- leftover")
    _output_flag(p)
    p = lsub.add_parser("status", help="show a lab's nodes, pods and services")
    _lab_flag(p)
    _output_flag(p)
    p = lsub.add_parser("exec", help="run a command in a pod (node1/pod-1) or node (node1)")
    _lab_flag(p)
    p.add_argument("target", help="node1/pod-1 for a pod, node1 for the node itself")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"hostmesh: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _lab_errors():
    from meshlab.errors import LabError
    return LabError


def cmd_version(args) -> int:
    if args.output == "json":
        print(to_json({"version": __version__}))
    else:
        print(f"hostmesh {__version__}")
    return 0


def cmd_check(args) -> int:
    from nodeagent import preflight
    results = preflight.run_checks()
    print(preflight.to_json(results) if args.output == "json" else preflight.format_table(results))
    return preflight.exit_code(results)


def cmd_agent(args) -> int:
    from nodeagent import bootstrap
    from nodeagent.agent import run_agent
    from nodeagent.errors import AgentError
    try:
        file_values = bootstrap.load_file(args.config) if args.config else {}
        if args.dump_bpf:
            from nodeagent.capture.ebpf_loader import BpfLoader
            instance = file_values.get("capture.instance") or args.node or "default"
            print(BpfLoader(instance).dump_source(), end="")
            return 0
        boot = bootstrap.build(file_values, bootstrap.flag_overrides(args))
        if args.uninstall:
            from nodeagent.agent import uninstall
            print(uninstall(boot))
            return 0
        return run_agent(boot)
    except AgentError as exc:
        raise CliError(str(exc)) from None


def cmd_controlplane(args) -> int:
    from controlplane.errors import ControlPlaneError
    from controlplane.process import run_controlplane
    from nodeagent import bootstrap
    from nodeagent.errors import AgentError
    source = args.source or ("etcd" if args.etcd else "files")
    given = [f for f, v in (("--config-dir", args.config_dir), ("--etcd", args.etcd)) if v]
    wanted = {"files": ["--config-dir"], "etcd": ["--etcd"], "kubernetes": []}[source]
    if given != wanted:
        raise CliError("give one config source: --config-dir DIR, --etcd HOST:PORT[,...] or --source kubernetes "
                       f"(got {' '.join(given) or 'none'} for source {source})")
    if args.kubeconfig and source != "kubernetes":
        raise CliError("--kubeconfig goes with --source kubernetes")
    from controlplane.sources.kubernetes import KubeSettings
    kube = KubeSettings(args.kubeconfig or "", args.kube_context or "") if source == "kubernetes" else None
    if args.config_dir and not os.path.isdir(args.config_dir):
        raise CliError(f"--config-dir {args.config_dir}: not a directory")
    from controlplane.process import Etcd
    try:
        etcd = Etcd(endpoints=args.etcd.split(","), prefix=args.etcd_prefix, tls=configcmd.etcd_tls(args),
                    replica=args.replica or "", lease_ttl=args.leader_ttl) if args.etcd else None
    except configcmd.ConfigCommandError as exc:
        raise CliError(str(exc)) from None
    if etcd is not None and args.leader_ttl < 2:
        raise CliError("--leader-ttl must be at least 2 seconds")
    from controlplane.process import Security
    if args.insecure and (args.ca_dir or args.node_tokens):
        raise CliError("--insecure serves plaintext without tokens or certificates; drop --ca-dir/--node-tokens")
    if not args.insecure and not (args.ca_dir and args.node_tokens):
        raise CliError("--ca-dir and --node-tokens are required (TLS, node tokens and workload certificates); "
                       "--insecure serves plaintext for tests only")
    review = None
    if args.token_review:
        from controlplane.tokenreview import ReviewPolicy
        if args.source != "kubernetes" or args.insecure:
            raise CliError("--token-review needs --source kubernetes and TLS (not --insecure)")
        accounts = tuple(args.agent_service_account or ("hostmesh-system/hostmesh-agent",))
        for sa in accounts:
            if sa.count("/") != 1 or not all(sa.split("/")):
                raise CliError(f"--agent-service-account {sa!r}: use NAMESPACE/NAME")
        review = ReviewPolicy(audience=args.token_audience, service_accounts=accounts)
    security = None if args.insecure else Security(ca_dir=args.ca_dir, tokens_dir=args.node_tokens,
                                                   tls_names=tuple(args.tls_san or ("hostmesh-controlplane",)),
                                                   token_review=review)
    try:
        http = bootstrap.parse_host_port(args.http_address, "--http-address")
        bootstrap.parse_host_port(args.grpc_address, "--grpc-address")
        return run_controlplane(args.config_dir, args.grpc_address, http, args.log_level, security, etcd, kube)
    except (AgentError, ControlPlaneError, OSError) as exc:
        raise CliError(str(exc)) from None


def cmd_hostinstall(args) -> int:
    from hostmesh import hostinstall
    try:
        return hostinstall.run(args)
    except hostinstall.InstallError as exc:
        raise CliError(str(exc)) from None


def cmd_config(args) -> int:
    try:
        return configcmd.cmd_config(args)
    except configcmd.ConfigCommandError as exc:
        raise CliError(str(exc)) from None


def cmd_ca(args) -> int:
    from pathlib import Path

    from controlplane import ca
    try:
        if args.ca_command == "bundle":
            print(ca.pem(*ca.trust_bundle_roots(Path(args.ca_dir))), end="")
        elif args.ca_command == "status":
            st = ca.CertificateAuthority(args.ca_dir, create=False).status()
            if args.output == "json":
                print(to_json(st))
            else:
                print(f"signing: {st['signing']} (until {st['signing_not_after']})"
                      f"{', intermediate' if st['intermediate'] else ''}")
                print(table(["ROOT", "SERIAL", "NOT AFTER"],
                            [[r["subject"], r["serial"], r["not_after"]] for r in st["roots"]]))
        else:
            step = {"prepare": ca.rotate_prepare, "activate": ca.rotate_activate, "finish": ca.rotate_finish}
            print(step[args.phase](args.ca_dir))
    except ca.CAError as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_status(args) -> int:
    from hostmesh.remote import RemoteError, get_json
    base = "http://198.18.0.2:15014" if args.lab else args.controlplane.rstrip("/")
    where = {"lab": args.lab, "target": "controlplane"} if args.lab else {}
    try:
        config = get_json(f"{base}/debug/config", **where)
        agents = get_json(f"{base}/debug/agents", **where)
    except RemoteError as exc:
        raise CliError(f"control plane not reachable: {exc}") from None
    if args.output == "json":
        print(to_json({"reachable": True, "config": config, "agents": agents}))
    else:
        state = "valid" if config["valid"] else f"INVALID ({len(config['errors'])} errors; last good config in force)"
        print(f"control plane {base}: reachable, config {state}, model {config.get('model_version')}")
        for e in config["errors"]:
            print(f"  error: {e['message']}")
        print()
        print(table(["NODE", "CONNECTED", "LATEST", "ACKED", "IN SYNC", "LAST NACK"],
                    [[a["node"], "yes" if a.get("connected") else "no", a.get("latest_version", ""),
                      a.get("acked_version", ""), "yes" if a.get("in_sync") else "no",
                      a.get("last_nack_error") or ""] for a in agents]))
    return 0 if config["valid"] and all(a.get("in_sync") for a in agents) else 1


def cmd_proxy_config(args) -> int:
    from hostmesh.remote import RemoteError, get_json
    url = f"{'http://127.0.0.1:15000' if args.node else args.admin.rstrip('/')}/{args.what}"
    try:
        data = get_json(url, lab=args.lab if args.node else None, target=args.node)
    except RemoteError as exc:
        raise CliError(f"cannot read the agent's {args.what}: {exc}") from None
    if args.output == "json":
        print(to_json(data))
        return 0
    print(render_proxy_config(args.what, data))
    return 0


def render_proxy_config(what: str, data) -> str:
    if what == "listeners":
        return table(["NAME", "ADDRESS", "ACTIVE"], [[l["name"], l["address"], l.get("active_connections", "")]
                                                     for l in data])
    if what == "clusters":
        return table(["CLUSTER", "VIP", "ENDPOINTS"],
                     [[c["name"], c["vip"], " ".join(e["address"] for e in c["endpoints"]) or "-"] for c in data])
    if what == "certs":
        return table(["IDENTITY", "STATE", "SERIAL", "NOT BEFORE", "NOT AFTER", "NEXT RENEWAL"],
                     [[c.get("identity"), c.get("state", ""), c.get("serial") or "-", c.get("not_before") or "-",
                       c.get("not_after") or "-", c.get("next_renewal") or "-"] for c in data]) \
            if data else "no certificates"
    if what == "routes":
        return to_json(data) if data else "no routes (L4 only)"
    if what == "policies":
        rows = [[w["workload"], p["policy"], p["action"], p["scope"], p["rules"], p.get("checks", "connection")]
                for w in data for p in w["policies"]]
        rows += [[w["workload"], name, "JWT", "", "", "request"] for w in data
                 for name in w.get("requestAuthentication", ())]
        rows += [[w["workload"], "-", "(allow: no policy)", "", "", ""] for w in data
                 if not w["policies"] and not w.get("requestAuthentication")]
        return table(["WORKLOAD", "POLICY", "ACTION", "SCOPE", "RULES", "CHECKS"], rows) \
            if rows else "no local workloads"
    return to_json(data)


def cmd_graph(args) -> int:
    from hostmesh import graphcmd
    try:
        return graphcmd.run(args)
    except graphcmd.GraphCommandError as exc:
        raise CliError(str(exc)) from None


def cmd_lab(args) -> int:
    from meshlab import lab as labmod
    LabError = _lab_errors()
    try:
        labmod.require_root()
        return LAB_COMMANDS[args.lab_command](args, labmod)
    except LabError as exc:
        raise CliError(str(exc)) from None


def lab_up(args, labmod) -> int:
    if args.accelerate and args.capture == "iptables":
        raise CliError("--accelerate needs --capture ebpf (or auto): only the eBPF backend accelerates")
    lab = labmod.Lab(args.name)
    lab.accelerate = args.accelerate  # read by meshlab.mesh.agent_bootstrap
    status = lab.up(args.nodes, args.pods_per_node, apps=not args.no_apps, capture=args.capture if args.mesh else None)
    if args.output == "json":
        print(to_json(status))
    else:
        print(f"lab {status['name']!r} is up: {len(status['nodes'])} nodes, {len(status['pods'])} pods")
        print(render_lab_status(status))
    return 0


def lab_down(args, labmod) -> int:
    if args.all:
        report = labmod.teardown_all()
    else:
        report = labmod.Lab(args.name).down()
    if args.output == "json":
        print(to_json(report))
    else:
        print(f"removed {len(report['namespaces'])} namespaces, stopped {len(report['processes'])} processes")
    return 0


def lab_status(args, labmod) -> int:
    status = labmod.Lab(args.name).status()
    if args.output == "json":
        print(to_json(status))
        return 0 if status["up"] else 1
    if not status["up"]:
        print(f"lab {args.name!r} is not up")
        return 1
    print(render_lab_status(status))
    return 0


def lab_exec(args, labmod) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise CliError("lab exec needs a command: hostmesh lab exec node1/pod-1 -- COMMAND [ARGS...]")
    lab = labmod.Lab(args.name)
    target = lab.target(args.target)
    full = lab.exec_argv(target, argv)
    sys.stdout.flush()
    os.execvp(full[0], full)
    return 127  # not reached


def render_lab_status(status: dict) -> str:
    nodes = table(["NODE", "ADDRESS", "POD CIDR", "AGENT", "NAMESPACE"],
                  [[n["name"], n["address"], n["pod_cidr"], "running" if n["agent"] else "-", n["namespace"]]
                   for n in status["nodes"]])
    pods = table(["POD", "ADDRESS", "PROCESSES", "NAMESPACE"],
                 [[f"{p['node']}/{p['name']}", p["address"], p["processes"], p["namespace"]] for p in status["pods"]])
    out = f"{nodes}\n\n{pods}"
    if status["services"]:
        out += "\n\n" + table(["SERVICE", "VIP", "PORTS", "ENDPOINTS"],
                              [[f"{s['namespace']}/{s['name']}", s["vip"], " ".join(s["ports"]), len(s["endpoints"])]
                               for s in status["services"]])
    return out


def cmd_demo(args) -> int:
    from meshlab import demo
    LabError = _lab_errors()
    try:
        return demo.run(args.name, keep=args.keep, out=sys.stdout)
    except LabError as exc:
        raise CliError(str(exc)) from None


LAB_COMMANDS = {"up": lab_up, "down": lab_down, "status": lab_status, "exec": lab_exec}
COMMANDS = {"version": cmd_version, "check": cmd_check, "agent": cmd_agent, "controlplane": cmd_controlplane,
            "ca": cmd_ca, "status": cmd_status, "install": cmd_hostinstall, "uninstall": cmd_hostinstall,
            "proxy-config": cmd_proxy_config, "graph": cmd_graph, "lab": cmd_lab, "demo": cmd_demo,
            "config": cmd_config}


if __name__ == "__main__":
    sys.exit(main())
