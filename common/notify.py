"""Keeping stakeholders informed: a JSON notice POSTed to ROLLBACK_NOTIFY_URL at the start and end
of every destructive operation (restore, reset, restore --all) and for a failed drill.

The document says what ran, where, on which point, the result, the seconds and any error, with a
`text` field that Slack-compatible receivers show as it is. It holds no secret: database URLs are
masked, registered passwords are masked in every string, and the notice URL itself (a webhook's
token) is never printed. Delivery waits at most ROLLBACK_NOTIFY_TIMEOUT seconds (default 3); a
notice that cannot be delivered never fails the operation, and the output and the log say so."""
from __future__ import annotations

import json
import socket
import time
from contextlib import contextmanager
from typing import Iterator, Optional
from urllib.parse import urlsplit

from . import storage
from .log import get_logger, mask, register_secret

DEFAULT_TIMEOUT = 3.0


def _settings(ctx) -> tuple:
    url = (ctx.settings.get("ROLLBACK_NOTIFY_URL") or "").strip()
    if not url:
        return None, DEFAULT_TIMEOUT
    register_secret(url)
    try:
        timeout = float(ctx.settings.get("ROLLBACK_NOTIFY_TIMEOUT") or DEFAULT_TIMEOUT)
    except ValueError:
        timeout = DEFAULT_TIMEOUT
    return url, max(0.1, min(timeout, 30.0))


def document(ctx, operation: str, phase: str, **fields) -> dict:
    """The notice: {text, operation, phase, script, host, at, target, point, result, seconds, error}."""
    doc = {"operation": operation, "phase": phase, "script": ctx.script, "host": socket.gethostname(),
           "at": storage.utc_now().isoformat(timespec="seconds")}
    doc.update({k: v for k, v in fields.items() if v is not None})
    doc = {k: mask(v) if isinstance(v, str) else v for k, v in doc.items()}
    words = [f"[rollback-toolkit] {operation} {phase}"]
    if doc.get("target"):
        words.append(f"on {doc['target']}")
    if doc.get("point"):
        words.append(f"(point {doc['point']})")
    if doc.get("result"):
        words.append(f": {doc['result']}")
    if doc.get("seconds") is not None:
        words.append(f"after {doc['seconds']:.1f} s")
    if doc.get("error"):
        words.append(f"- error: {doc['error']}")
    doc["text"] = f"{' '.join(words)} (by {doc['script']} on {doc['host']})"
    return doc


def send(ctx, operation: str, phase: str, **fields) -> Optional[bool]:
    """POST one notice; None when no URL is set, else whether it was delivered (never raises)."""
    url, timeout = _settings(ctx)
    if url is None:
        return None
    import urllib.request  # only when a notice is sent: it brings in http and ssl, 30 ms of every start
    doc = document(ctx, operation, phase, **fields)
    where = urlsplit(url).hostname or "?"
    request = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(1024)
        get_logger().info("Notice sent (%s %s) to ROLLBACK_NOTIFY_URL (host %s).", operation, phase, where)
        return True
    except Exception as exc:  # any failure to deliver (refused, timeout, a bad HTTP reply) is only reported
        reason = getattr(exc, "reason", None) or exc
        get_logger().warning("warning: the %s %s notice was NOT delivered to ROLLBACK_NOTIFY_URL (host %s): %s. The "
                             "%s goes on.", operation, phase, where, mask(str(reason)), operation)
        return False


@contextmanager
def around(ctx, operation: str, target: str, point: Optional[str] = None) -> Iterator[dict]:
    """`with around(ctx, 'restore', 'staging', point_id) as end:` a start notice now, an end notice on
    the way out (result 'done', or 'failed' with the error); the caller may add fields to `end`."""
    send(ctx, operation, "start", target=target, point=point)
    started = time.monotonic()
    end: dict = {}
    try:
        yield end
    except BaseException as exc:
        error = str(exc) or type(exc).__name__
        send(ctx, operation, "end", target=target, point=point, result="failed",
             seconds=round(time.monotonic() - started, 3), error=error)
        raise
    send(ctx, operation, "end", target=target, point=point, result=end.pop("result", "done"),
         seconds=round(time.monotonic() - started, 3), **end)
