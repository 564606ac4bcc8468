"""A Cancel sent for a run that has not started yet takes effect when it starts.

ComfyUI drops such a Cancel (server.py, execution.py at a125cd84): `/interrupt` with the prompt id of a queued
prompt that is not running yet is skipped ("not currently running"), and a global `/interrupt` only sets a flag
that `PromptExecutor.execute_async` clears as the next prompt starts (`nodes.interrupt_processing(False)`), so a
Cancel pressed while the worker is between prompts, or while the new one is still queued, is lost and a 5000-step
run goes on. This pack does not patch ComfyUI: it watches `/interrupt` requests (an aiohttp middleware on the
server's app, which passes every request on unchanged) and records which prompt each was aimed at: the prompt
named, else the running one(s), else, with nothing running, the next queued one. The CAT nodes call `check()` as
they start: a prompt with a recorded Cancel stops there (ComfyUI reports it as interrupted), before any work.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict

log = logging.getLogger("ComfyUI-CAT")
PATHS = ("/interrupt", "/api/interrupt")  # ComfyUI serves every route with and without the /api prefix
KEEP = 256  # recorded prompt ids at most: a Cancel for a prompt that never reaches a CAT node ages out

_requested: OrderedDict[str, float] = OrderedDict()  # prompt id -> when its Cancel arrived
_lock = threading.Lock()  # the server's loop records, the prompt worker thread checks


def targets(body, running: list, pending: list) -> list[str]:
    """The prompt ids an /interrupt request is aimed at; queue items are (number, prompt_id, ...) tuples."""
    pid = body.get("prompt_id") if isinstance(body, dict) else None
    if pid:
        return [str(pid)]
    if running:
        return [str(item[1]) for item in running]
    return [str(min(pending, key=lambda item: item[0])[1])] if pending else []


def record(prompt_ids) -> None:
    with _lock:
        for pid in prompt_ids:
            _requested[pid] = time.monotonic()
            _requested.move_to_end(pid)
        while len(_requested) > KEEP:
            _requested.popitem(last=False)


def requested(prompt_id: str | None) -> bool:
    """Take (once) a recorded Cancel for this prompt."""
    if not prompt_id:
        return False
    with _lock:
        return _requested.pop(str(prompt_id), None) is not None


def current_prompt_id() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    return getattr(ctx, "prompt_id", None) if ctx is not None else None


def check() -> None:
    """Raise ComfyUI's interrupt if a Cancel was sent for the executing prompt before it started."""
    pid = current_prompt_id()
    if requested(pid):
        import comfy.model_management as mm

        log.info("ComfyUI-CAT: prompt %s was cancelled before it started; stopping it now", pid)
        raise mm.InterruptProcessingException()


def middleware(server):
    from aiohttp import web

    @web.middleware
    async def watch_interrupts(request, handler):
        if request.method == "POST" and request.path in PATHS:
            with contextlib.suppress(Exception):  # never in the way of ComfyUI's own handling
                body = await request.json() if request.body_exists else {}  # aiohttp keeps the body for the handler
                running, pending = server.prompt_queue.get_current_queue_volatile()
                record(targets(body, running, pending))
        return await handler(request)

    return watch_interrupts


def register(server) -> bool:
    """Add the middleware to the server's app once, before the app starts (ComfyUI loads node packs before that)."""
    app = getattr(server, "app", None)
    if app is None or getattr(app, "frozen", False):
        return False
    if any(getattr(m, "__name__", "") == "watch_interrupts" for m in app.middlewares):
        return True
    app.middlewares.append(middleware(server))
    return True
