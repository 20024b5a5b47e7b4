"""Configs of the peer servers the benchmarks start inside lab pods (nginx, HAProxy)."""

import os


def nginx_config(run_dir: str, port: int) -> str:
    """One worker answering 200 "ok" on `port`; logs and pid in the lab's run dir."""
    return f"""worker_processes 1;
daemon off;
pid {run_dir}/nginx.pid;
error_log {run_dir}/logs/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen {port} reuseport backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def haproxy_http_config(run_dir: str, bind: str, server: str, threads: int = 1, pid_name: str = "haproxy") -> str:
    """HAProxy ``mode http`` with keep-alive on both sides, ``nbthread threads``."""
    return f"""global
    nbthread {threads}
    maxconn 4096
    pidfile {run_dir}/{pid_name}.pid
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend web
    bind {bind}
    default_backend web
backend web
    http-reuse always
    server s1 {server}
"""


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of processes (and their reaped children) from /proc, in seconds;
    processes already gone count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")
