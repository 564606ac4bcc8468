"""`python -m cat_train queue WORKFLOW.api.json`: batch runs and sweeps through one or more ComfyUI servers.

    python -m cat_train queue workflows/api/cat_sd15_train_kps.api.json \\
        --server http://127.0.0.1:8188 --server http://127.0.0.1:8189 --set CAT_Dataset.folder=my_dog \\
        --sweep CAT_LossConfig.cat_factor=0,0.5,1 --sweep CAT_LoraTrainer.rank=8,16 --out runs.json

NODE is a node id ("10") or a node type that occurs once ("CAT_Dataset"). Several --sweep make their
product (here 6 runs; more than --max-runs is refused). Every run's values are checked against the
server's /object_info before anything is posted, and every run gets file names made from its swept
values (CAT_SaveLora.name, the trainer's checkpoint_name, SaveImage.filename_prefix,
CAT_SaveCatVersion.name), so no run overwrites another's files.

Runs go to the server with the shortest queue, --per-server at a time (default 1). A server that stops
answering is marked down, its unfinished run re-posted elsewhere, and it is probed until it answers
again. Ctrl-C deletes this sweep's queued prompts, interrupts a running prompt only when it is ours, and
writes what finished. --out is rewritten (atomically) after every finished run; --resume skips the runs
it already holds. At the end the KPS Evaluator and Leak Scan outputs, read from /history, are gathered
into runs.md/runs.csv (beside --out) and an IS-vs-KPS chart (runs.png) with the best-balanced run
marked. docs/batch.md has the details. Only the standard library is needed (Pillow for the chart).
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path

from .client import REQUEST_TIMEOUT, server_url
from .dispatch import Sweep, connect_servers
from .errors import QueueError
from .journal import check_out, read_journal, resume, write_journal
from .plan import DEFAULT_MAX_RUNS, NAME_INPUTS, check_plan, check_run_count, iter_runs, parse_assign
from .report import markdown_table, sweep_table, write_report
from .workflow import load_workflow


def non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"{text} must be 0 (no limit) or a positive number of seconds")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be 1 or more")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cat_train queue", description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="API-format workflow JSON")
    ap.add_argument("--server", action="append", default=[], metavar="URL",
                    help="a ComfyUI server; give it once per server (default http://127.0.0.1:8188)")
    ap.add_argument("--server-file", metavar="FILE", help="a file of server URLs, one a line (# comments)")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.input=value")
    ap.add_argument("--sweep", action="append", default=[], metavar="NODE.input=a,b,c",
                    help="one run per value; several --sweep make every combination")
    ap.add_argument("--max-runs", type=positive_int, default=DEFAULT_MAX_RUNS,
                    help="refuse a sweep of more runs than this. Default %(default)s")
    ap.add_argument("--per-server", type=positive_int, default=1,
                    help="prompts of this sweep queued on one server at a time. Default %(default)s")
    ap.add_argument("--keep-names", action="store_true",
                    help="leave file names as the graph has them (runs then save as name, name_00001, ...)")
    ap.add_argument("--out", help="journal: the finished runs and where their outputs landed, rewritten after each "
                                  "run; runs.md/.csv/.png beside it")
    ap.add_argument("--resume", action="store_true", help="skip the runs that --out already holds as finished")
    ap.add_argument("--score-node", metavar="ID", help="the KPS Evaluator whose IS/KPS pick the best run "
                                                       "(default: the lowest node id)")
    ap.add_argument("--timeout", type=non_negative, default=600.0,
                    help="give up on a run after this many seconds without progress while it runs, and on the sweep "
                         "when no server answers for this long (0: never); waiting in the queue does not count. "
                         "Default %(default)gs")
    ap.add_argument("--poll", action="store_true",
                    help="only poll /history, no websocket (progress is then invisible, so --timeout bounds each "
                         "run's time)")
    ap.add_argument("--dry-run", action="store_true", help="check and print the runs, post nothing")
    return ap


def read_server_file(path: str) -> list[str]:
    """The URLs of a --server-file, each checked (server_url) and named by its line; a file that is not text, or
    holds no URL, is refused rather than read as "no servers" (which would mean the default one)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise QueueError(f"--server-file {path}: {e.strerror or e}.") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not part of the first URL
        if "\0" in text:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "a NUL byte")
    except UnicodeDecodeError as e:
        raise QueueError(f"--server-file {path} is not a text file (byte {e.start}: {e.reason}); give a text file "
                         "with one server URL a line, e.g. http://127.0.0.1:8188.") from None
    urls = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            urls.append(server_url(line, f"--server-file {path} line {n}:"))
    if not urls:
        raise QueueError(f"--server-file {path} holds no server URL (only blank lines and # comments); write one URL "
                         "a line, e.g. http://127.0.0.1:8188, or leave the option out for that default server.")
    return urls


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    sweep = None
    out = Path(a.out) if a.out else None
    try:
        urls = [server_url(u) for u in a.server] + (read_server_file(a.server_file) if a.server_file else [])
        urls = list(dict.fromkeys(urls)) or ["http://127.0.0.1:8188"]
        if out and out.suffix.lower() in (".md", ".csv", ".png"):
            raise QueueError(f"--out {out} names the journal (runs.json); the table and chart are written beside it "
                             "as runs.md, runs.csv and runs.png.")
        if a.resume and not out:
            raise QueueError("--resume needs --out, the journal of the sweep to continue.")
        graph = load_workflow(a.workflow)
        sets = [parse_assign(s, False) for s in a.set]
        sweeps = [parse_assign(s, True) for s in a.sweep]
        check_run_count(sweeps, a.max_runs)  # before any request: a typo must not cost a minute of checks

        if out:
            # before the first post: a run must not train into a journal it cannot write
            check_out(out, keep=not a.dry_run)

        def check(info):
            return check_plan(graph, sets, sweeps, info, max_runs=a.max_runs)

        # one request (its retries included) waits at most --timeout, and never more than 30 s: a server that is stuck
        # must not hold up the others' runs, nor keep a 20 s --timeout waiting two minutes
        servers = connect_servers(urls, graph, check, print, timeout=min(a.timeout or REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        first = next(s for s in servers if s.up and s.usable)
        for note in check(first.info):
            print(f"note: {note}")
        journal = read_journal(out) if a.resume else []
        planned = iter_runs(graph, sets, sweeps, first.info, unique_names=not a.keep_names)
        if a.dry_run:
            return _dry_run(planned, check_run_count(sweeps, a.max_runs),
                            {rec.get("key") for rec in journal if rec.get("ok")})
        runs = list(planned)
        previous = []
        if a.resume:
            previous = resume(runs, journal)
            skipped = sum(r.state == "done" for r in runs)
            print(f"resume: {skipped} of {len(runs)} run(s) already finished in {out}; posting {len(runs) - skipped}"
                  + (f" ({len(previous)} finished run(s) of other settings kept in the journal)" if previous else ""))
        sweep = Sweep(servers, runs, out, a.per_server, a.timeout, a.poll, plan=check, previous=previous)
        try:
            sweep.run()
        finally:
            for s in servers:
                if s.ws is not None:
                    s.ws.close()
        records = sweep.records()
        written = _report(out, records, a.score_node, len(runs) > 1)
        return 0 if written and all(r.get("ok") for r in records) else 1
    except KeyboardInterrupt:
        try:  # a second Ctrl-C must not cut the cancel short (signals can be set in the main thread only)
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:
            old = None
        try:
            print("interrupted: cancelling this sweep's prompts", file=sys.stderr)
            if sweep is not None:
                sweep.cancel()
                _stopped(sweep, out, a.score_node)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
        return 130
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        if sweep is not None:
            _stopped(sweep, out, a.score_node)
        return 2


def _dry_run(runs, total: int, finished: set) -> int:
    """Each run and its file names as it is built (a grid of 10^6 runs starts printing at once)."""
    print(f"dry run: {total} run(s); nothing is posted")
    skipped = 0
    for r in runs:
        done = r.key in finished
        skipped += done
        print(f"run {r.index}/{total} {json.dumps(r.label) if r.label else ''}".rstrip()
              + (" (finished in the journal: --resume skips it)" if done else ""))
        for nid, node in r.graph.items():
            name = NAME_INPUTS.get(node["class_type"])
            if name and name in node["inputs"]:
                print(f"  node {nid} ({node['class_type']}) {name} = {node['inputs'][name]}")
    if finished:
        print(f"resume: {skipped} of {total} run(s) already finished; {total - skipped} would be posted")
    return 0


def _stopped(sweep: Sweep, out: Path | None, score_node: str | None) -> None:
    """What finished before an early stop: the journal (and its table) hold exactly those runs."""
    sweep.save()
    records = sweep.records()
    if out:
        print(f"wrote {out}: {len(records)} finished run(s); --resume continues the rest", file=sys.stderr)
        if records:
            _report(out, records, score_node, True)


def _report(out: Path | None, records: list[dict], score_node: str | None, table: bool) -> bool:
    """The journal and the table (printed too); False when the journal could not be written (its records are
    printed instead)."""
    written = True
    if out:
        try:
            write_journal(out, records)
            print(f"wrote {out}")
        except OSError as e:  # the folder was writable at the start (check_out): a disk that filled up since
            print(f"error: cannot write the journal {out} ({e.strerror or e}); its records follow, save them as "
                  f"{out.name} to --resume from them:", file=sys.stderr)
            print(json.dumps(records, indent=2))
            out, written = None, False
    if not table or not records:
        return written
    if out:
        try:
            md = write_report(out, records, score_node)
            print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.csv')}"
                  + (f", {out.with_suffix('.png')}" if out.with_suffix(".png").exists() else ""))
            print(md)
            return written
        except OSError as e:
            print(f"error: cannot write the table beside {out} ({e.strerror or e}); it follows", file=sys.stderr)
    columns, rows, _, _, _ = sweep_table(records, score_node)
    print(markdown_table(columns, rows))
    return written
