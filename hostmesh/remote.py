"""How the CLI reaches an agent's admin endpoint or the control plane's HTTP port: directly
on this host, or inside a lab namespace (the lab's addresses are not reachable from the
machine's own namespace by design)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class RemoteError(Exception):
    """The endpoint could not be reached or answered with an error; the message says which."""


def get(url: str, *, lab: str | None = None, target: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    """GET `url`; with `lab`/`target`, from inside that lab namespace (via curl)."""
    if lab and target:
        from meshlab.errors import LabError
        from meshlab.lab import Lab
        try:
            r = Lab(lab).run(target, ["curl", "-sS", "--max-time", str(timeout), "-w", "\n%{http_code}", url],
                             timeout=timeout + 5)
        except LabError as exc:
            raise RemoteError(str(exc)) from None
        if r.returncode != 0:
            raise RemoteError(f"{url} (from {target} in lab {lab!r}): {r.stderr.strip() or 'unreachable'}")
        body, _, code = r.stdout.rpartition("\n")
        return int(code), body
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise RemoteError(f"{url}: {getattr(exc, 'reason', exc)}") from None


def get_json(url: str, **kw: Any) -> Any:
    code, body = get(url, **kw)
    if code != 200:
        raise RemoteError(f"{url}: HTTP {code}: {body.strip()[:300]}")
    try:
        return json.loads(body)
    except ValueError:
        raise RemoteError(f"{url}: the answer is not JSON: {body[:200]!r}") from None
