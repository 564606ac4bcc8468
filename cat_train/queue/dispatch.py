"""Runs spread over the servers and followed to the end: the shortest queue gets the next run, a server that
stops answering is marked down and its run posted again elsewhere, a server that answers again is checked and
used, and Ctrl-C cancels only this sweep's prompts."""
from __future__ import annotations

import json
import select
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .client import REQUEST_TIMEOUT, Client, state_in
from .errors import QueueError, ServerDown, ServerError
from .history import outputs_of, scores_of, status_of
from .journal import write_journal
from .plan import Run
from .websocket import WebSocket, connect_ws
from .workflow import check_node_types

MAX_ATTEMPTS = 3          # posts of one run before it counts as failed (its servers kept going away)
PROBE_EVERY = 3.0         # seconds between probes of a server marked down
END_EVENTS = ("execution_error", "execution_interrupted", "execution_success")
# events that may come without a prompt id (our trainer broadcasts its steps) and still mean progress
UNTAGGED_PROGRESS = ("cat.train.progress", "progress", "executing", "executed")
WARNING_EVENT = "cat.warning"  # nodes/lora_family_warning.py: sent as a prompt is queued, to the client that queued it


def _show(kind: str, data: dict, log, prefix: str = "") -> None:
    if kind == "cat.train.progress":
        log(f"  {prefix}train step {data['step']}/{data['total']} loss {data['loss']:.5f} "
            f"(fit {data['fit']:.5f}, keep {data['keep']:.6f})")
    elif kind == "progress":
        log(f"  {prefix}node {data.get('node')}: {data.get('value')}/{data.get('max')}")


@dataclass
class Server:
    client: Client
    up: bool = True
    usable: bool = True
    ws: WebSocket | None = None
    active: list = field(default_factory=list)
    t_check: float = 0.0
    t_probe: float = 0.0
    info: dict | None = None

    @property
    def name(self) -> str:
        return self.client.base


class Sweep:
    def __init__(self, servers: list[Server], runs: list[Run], out: Path | None, per_server: int, timeout: float,
                 poll: bool, interval: float = 1.0, log=print, plan=None, previous: list[dict] | None = None):
        self.servers, self.runs, self.out, self.per_server = servers, runs, out, per_server
        self.timeout, self.poll, self.interval, self.log, self.plan = timeout, poll, interval, log, plan
        self.previous = previous or []  # journal records of runs not in this sweep: kept as they were
        self.posted: set[str] = set()
        self.t_none_up: float | None = None
        self.save_error: OSError | None = None

    # -- journal
    def records(self) -> list[dict]:
        return self.previous + sorted((r.record for r in self.runs if r.record), key=lambda rec: rec["run"])

    def save(self) -> None:
        """The journal, rewritten; a write that fails (a disk filled up since the start) is said once and the sweep
        goes on: the runs keep their records, and the end writes (or prints) them."""
        if not self.out:
            return
        try:
            write_journal(self.out, self.records())
            self.save_error = None
        except OSError as e:
            if self.save_error is None:
                self.log(f"cannot write the journal {self.out} ({e.strerror or e}); the sweep goes on, and its "
                         "records are written at the end, or printed if that fails too")
            self.save_error = e

    # -- server health
    def mark_down(self, s: Server, why: str) -> None:
        if not s.up:
            return
        s.up, s.t_probe = False, time.monotonic() + PROBE_EVERY
        if s.ws is not None:
            s.ws.close()
            s.ws = None
        moved = [r for r in s.active]
        s.active.clear()
        for r in moved:
            r.state, r.server, r.where = "todo", None, None
        note = f"; run {', '.join(str(r.index) for r in moved)} will be posted again" if moved else ""
        self.log(f"server {s.name} marked down: {why}{note}")

    def probe(self, now: float) -> None:
        for s in self.servers:
            if s.up or not s.usable or now < s.t_probe:
                continue
            s.t_probe = now + PROBE_EVERY
            try:
                q = s.client.queue(retry=False, timeout=5.0)
                if s.info is None:
                    s.info = s.client.object_info()
                    check_node_types(next(iter(self.runs)).graph if self.runs else {}, s.info)
                    if self.plan is not None:
                        self.plan(s.info)  # the same checks as at the start, against this server's nodes
            except ServerDown:
                continue
            except QueueError as e:
                s.usable = False
                self.log(f"server {s.name} answers but cannot run this sweep: {e}")
                continue
            s.up = True
            self.log(f"server {s.name} is back")
            self.drop_strays(s, q)

    def drop_strays(self, s: Server, q: dict) -> None:
        """Our prompts on a server that came back but that we no longer follow (re-posted elsewhere): removed,
        so a run does not train twice."""
        mine = {r.prompt_id for r in s.active}
        stray = [(st, item[1]) for st in ("running", "pending") for item in q.get(f"queue_{st}", [])
                 if len(item) > 1 and item[1] in self.posted and item[1] not in mine]
        try:
            if any(st == "pending" for st, _ in stray):
                s.client.delete([pid for st, pid in stray if st == "pending"])
            for st, pid in stray:
                if st == "running":
                    s.client.interrupt(pid)
        except QueueError:
            return
        if stray:
            self.log(f"  removed {len(stray)} prompt(s) of ours from {s.name} that were posted again elsewhere")

    # -- dispatch
    def dispatch(self) -> None:
        while True:
            todo = [r for r in self.runs if r.state == "todo"]
            free = [s for s in self.servers if s.up and s.usable and len(s.active) < self.per_server]
            if not todo or not free:
                return
            lengths = {}
            for s in free:
                try:
                    q = s.client.queue()
                    lengths[s.name] = len(q.get("queue_running", [])) + len(q.get("queue_pending", []))
                except ServerDown as e:
                    self.mark_down(s, str(e))
            free = [s for s in free if s.up]
            if not free:
                return
            s = min(free, key=lambda s: (lengths[s.name], len(s.active), self.servers.index(s)))
            self.post(todo[0], s, lengths[s.name])

    def post(self, r: Run, s: Server, queued: int) -> None:
        if r.attempts >= MAX_ATTEMPTS:
            self.finish(r, None, f"posted {r.attempts} times and each time its server went away or forgot it")
            return
        r.attempts += 1
        total = len(self.runs)
        self.log(f"run {r.index}/{total}{' ' + json.dumps(r.label) if r.label else ''} -> {s.name}"
                 + (f" (behind {queued} queued)" if queued else "")
                 + (f", attempt {r.attempts}" if r.attempts > 1 else ""))
        if not self.poll and (s.ws is None or s.ws.closed):
            s.ws = connect_ws(s.client, self.log)
        pid = str(uuid.uuid4())  # canonical form: ComfyUI >= 0.33 refuses any other prompt id (400)
        self.posted.add(pid)
        try:
            pid = s.client.post(r.graph, pid)
        except ServerDown as e:
            self.mark_down(s, str(e))
            return
        except QueueError as e:
            self.finish(r, None, str(e), server=s)
            return
        self.posted.add(pid)
        now = time.monotonic()
        r.state, r.server, r.last_server, r.prompt_id, r.where, r.unknown = "active", s, s, pid, None, 0
        r.t_posted = r.t_progress = now
        s.active.append(r)
        s.t_check = min(s.t_check, now + 0.2)
        self.log(f"  queued as {pid}")

    # -- following
    def check(self, now: float) -> None:
        for s in self.servers:
            if not (s.up and s.active) or now < s.t_check:
                continue
            try:
                self.check_server(s, now)
            except ServerDown as e:
                self.mark_down(s, str(e))

    def check_server(self, s: Server, now: float) -> None:
        soon = False
        for r in list(s.active):
            try:
                entry = s.client.history(r.prompt_id)
                r.t_history_error = None
            except ServerError as e:  # the server answers, its /history does not: the prompt is still its own, so it
                entry = None          # is read again, not posted again (it may have trained already)
                if r.t_history_error is None:
                    r.t_history_error = now
                    self.log(f"  run {r.index}: {e} The prompt is left as it is and its /history read again.")
            if entry:  # ComfyUI writes a history entry once the prompt has finished (or failed)
                self.finish(r, entry)
                continue
            where = s.client.queue_state(r.prompt_id)
            r.where = where
            if where is None and r.t_history_error is not None:  # finished, but its result cannot be read yet
                if self.timeout and now - r.t_history_error > self.timeout:
                    self.finish(r, None, f"prompt {r.prompt_id} left the queue of {s.name}, but its /history answered "
                                f"with errors for {self.timeout:.0f}s, so whether it succeeded is unknown: look for "
                                "its outputs on the server before running it again (--resume would).", unknown=True)
                continue
            r.unknown = r.unknown + 1 if where is None else 0
            if r.unknown >= 2:  # twice: the move from the queue into /history is not atomic for us
                self.log(f"  run {r.index}: ComfyUI at {s.name} no longer knows prompt {r.prompt_id}: it is neither "
                         "queued nor in /history (was the server restarted or the queue/history cleared?); posting it "
                         "again")
                s.active.remove(r)
                r.state, r.server = "todo", None
                continue
            soon = soon or r.unknown > 0
            if where == "pending":
                r.t_progress = now
            elif self.timeout and now - r.t_progress > self.timeout:
                try:
                    s.client.interrupt(r.prompt_id)
                except QueueError:
                    pass
                self.finish(r, None, f"prompt {r.prompt_id} made no progress for {self.timeout:.0f}s; interrupted it. "
                            "Pass a larger --timeout (or 0 for none) for nodes that work long without progress events.")
        s.t_check = now + (0.2 if soon else self.interval)

    def finish(self, r: Run, entry: dict | None, error: str = "", server: Server | None = None,
               unknown: bool = False) -> None:
        """The run's record. unknown: it left its server's queue but its result could not be read (not a failure:
        it may have trained and saved)."""
        s = r.server or server or r.last_server
        if r in (s.active if s else []):
            s.active.remove(r)
        ok, msg = status_of(entry) if entry is not None else (False, error)
        outs = outputs_of(entry) if entry is not None else []
        r.state = "done"
        r.record = {"run": r.index, "overrides": r.label, "key": r.key, "prompt_id": r.prompt_id,
                    "server": s.name if s else "", "ok": ok, "error": msg, "outputs": outs,
                    "scores": scores_of(entry, r.graph) if entry is not None else {},
                    "seconds": round(time.monotonic() - r.t_posted, 2) if r.t_posted else 0.0, "attempts": r.attempts}
        if unknown:
            r.record["unknown"] = True
        if r.warnings:
            r.record["warnings"] = list(r.warnings)
        done = sum(1 for x in self.runs if x.state == "done")
        self.log(f"run {r.index}/{len(self.runs)} {'finished' if ok else 'RESULT UNKNOWN' if unknown else 'FAILED'} "
                 f"on {r.record['server'] or 'no server'} ({done}/{len(self.runs)} done)")
        for o in outs:
            self.log(f"  node {o['node']}: " + str(o.get('path') or o.get('value')).replace("\n", "\n    "))
        if not ok:
            self.log(f"  {'UNKNOWN' if unknown else 'FAILED'}: {msg}")
        self.save()

    def events(self, wait: float) -> None:
        """Progress from every server's websocket for up to `wait` s (a sleep when none is open)."""
        open_ = [s for s in self.servers if s.ws is not None and not s.ws.closed]
        for s in open_:
            self.drain(s)
        open_ = [s for s in open_ if s.ws is not None]
        if not open_:
            time.sleep(wait)
            return
        ready = [s for s in open_ if s.ws.readable()]
        if not ready:
            socks = {s.ws.sock: s for s in open_}
            r, _, _ = select.select(list(socks), [], [], wait)
            ready = [socks[x] for x in r]
        for s in ready:
            try:
                s.ws.fill()
            except (OSError, ValueError) as e:
                self._ws_lost(s, e)
                continue
            self.drain(s)

    def _ws_lost(self, s: Server, e) -> None:
        if s.ws is not None:
            self.log(f"  (websocket of {s.name} lost: {e or type(e).__name__}; polling /history)")
            s.ws.close()
            s.ws = None

    def drain(self, s: Server) -> None:
        while s.ws is not None:
            try:
                msg = s.ws.buffered()
            except (OSError, ValueError) as e:
                self._ws_lost(s, e)
                return
            if msg is None:
                return
            self.on_event(s, msg)

    def on_event(self, s: Server, msg) -> None:
        running = [r for r in s.active if r.where != "pending"]
        if isinstance(msg, bytes):  # a sampler preview: sent only to the client whose prompt runs
            for r in running:
                r.t_progress = time.monotonic()
            return
        try:
            m = json.loads(msg)
            kind, data = m.get("type"), m.get("data") or {}
        except (ValueError, AttributeError):
            return
        if not isinstance(data, dict):
            return
        if kind == WARNING_EVENT:
            self.on_warning(s, data)
            return
        pid = data.get("prompt_id")
        if pid is None:
            if kind not in UNTAGGED_PROGRESS or len(running) != 1:
                return  # status broadcasts, other extensions' monitors: no sign that our prompt moves
            r = running[0]
        else:
            r = next((x for x in s.active if x.prompt_id == pid), None)
            if r is None:
                return
            if kind == "execution_start":  # it runs now: the trainer's untagged broadcasts that follow are its own
                r.where = "running"
        r.t_progress = time.monotonic()
        _show(kind, data, self.log, f"[run {r.index}] " if len(self.runs) > 1 else "")
        if kind in END_EVENTS or (kind == "executing" and data.get("node") is None and pid == r.prompt_id):
            s.t_check = 0.0  # read /history now

    def on_warning(self, s: Server, data: dict) -> None:
        """What the server warned of as it queued one of our prompts (this pack's `cat.warning`: a LoRA of another
        family on a stock loader, ...): printed under its run and kept in its record. The event names the prompt
        from pack versions that know it; an older one's warning is printed under the server alone."""
        lines = [str(w) for w in data.get("warnings") or [] if w]
        if not lines:
            return
        pid = data.get("prompt_id")
        r = next((x for x in self.runs if pid and x.prompt_id == pid), None)
        title = data.get("title") or "warning"
        who = f"[run {r.index}] " if r is not None and len(self.runs) > 1 else ""
        self.log(f"  {who}warning from {s.name} ({title}):")
        for w in lines:
            self.log(f"    {w}")
        if r is not None:
            r.warnings += lines
            if r.record is not None:  # it ended before the event was read
                r.record["warnings"] = list(r.warnings)
                self.save()

    # -- the loop
    def run(self) -> None:
        while any(r.state != "done" for r in self.runs):
            now = time.monotonic()
            self.probe(now)
            self.dispatch()
            self.check(time.monotonic())
            if any(s.up and s.usable for s in self.servers):
                self.t_none_up = None
            elif self.t_none_up is None:
                self.t_none_up = now
                self.log(f"no server answers; probing every {PROBE_EVERY:g}s"
                         + (f" for up to {self.timeout:g}s" if self.timeout else ""))
            if not any(s.usable for s in self.servers):
                raise QueueError("no server can run this sweep (see above).")
            if self.t_none_up is not None and self.timeout and now - self.t_none_up > self.timeout:
                left = sum(1 for r in self.runs if r.state != "done")
                raise QueueError(f"no server answered for {self.timeout:.0f}s; {left} run(s) not finished "
                                 "(--resume continues them once a server is up).")
            if not any(r.state != "done" for r in self.runs):
                self.events(0.0)  # what came with the last runs' ends (a warning sent as it was queued) is still read
                return
            nxt = [s.t_check for s in self.servers if s.up and s.active] + \
                  [s.t_probe for s in self.servers if not s.up and s.usable]
            wait = max(0.0, min(nxt, default=now + 0.5) - time.monotonic())
            self.events(min(wait, 0.5))

    def cancel(self, settle: float = 10.0) -> None:
        """Ctrl-C: on every server, delete our queued prompts, then interrupt a running prompt only when it is
        ours (/interrupt with its id), and wait up to `settle` s for those to stop."""
        running = {}
        for s in self.servers:
            try:
                q = s.client.queue(retry=False, timeout=5.0)
                pend = [it[1] for it in q.get("queue_pending", []) if len(it) > 1 and it[1] in self.posted]
                run = [it[1] for it in q.get("queue_running", []) if len(it) > 1 and it[1] in self.posted]
                if pend:
                    s.client.delete(pend)
                for pid in run:
                    s.client.interrupt(pid)
            except QueueError as e:
                self.log(f"  {s.name}: could not cancel ({e})")
                continue
            if pend or run:
                self.log(f"  {s.name}: removed {len(pend)} queued prompt(s) of this sweep, interrupted {len(run)} "
                         "running")
            if run:
                running[s.name] = (s, set(run))
        deadline = time.monotonic() + settle
        while running and time.monotonic() < deadline:
            time.sleep(0.3)
            for name, (s, pids) in list(running.items()):
                try:
                    q = s.client.queue(retry=False, timeout=5.0)
                except QueueError:
                    del running[name]
                    continue
                if not any(state_in(q, pid) for pid in pids):
                    del running[name]
        for name in running:
            self.log(f"  {name}: our prompt is still stopping (it stops at its next step)")


def connect_servers(urls: list[str], graph: dict, plan, log, timeout: float = REQUEST_TIMEOUT) -> list[Server]:
    """One Server per URL, each asked for its nodes and checked against every run; those that cannot run the
    sweep are left out, those that do not answer yet are marked down (and probed later). QueueError when no
    server can run it: the first refusal as it is (a bad override is refused the same by every server).
    timeout: how long one request (with its retries) may wait for an answer."""
    servers, down, refused = [], [], []
    cid = uuid.uuid4().hex  # one client id for the whole sweep: every prompt of ours carries it
    for url in urls:
        s = Server(Client(url, timeout=timeout, client_id=cid))
        try:
            s.info = s.client.object_info()
            check_node_types(graph, s.info)
            plan(s.info)
        except ServerDown as e:
            s.up = False
            down.append(str(e))
        except QueueError as e:
            s.usable = False
            refused.append((s, e))
        servers.append(s)
    if not any(s.up and s.usable for s in servers):
        if refused:
            raise refused[0][1]
        raise QueueError(down[0] if len(down) == 1 else "no server answers:\n  " + "\n  ".join(down))
    for s, e in refused:
        log(f"server {s.name} is left out: {e}")
    for s in servers:
        if not s.up:
            log(f"server {s.name} does not answer yet; it is probed every {PROBE_EVERY:g}s")
    return servers
