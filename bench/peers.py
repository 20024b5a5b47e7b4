"""Configs of the peer servers the benchmarks start inside lab pods (nginx, HAProxy)."""


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
