"""The labelling page of `tribune label --serve`: people rank candidates (or pick the better of two).

A small HTTP server on loopback (standard library only). Every answer, skip and undo is one
line appended to ``OUTPUT.answers.jsonl`` and flushed to disk before the page hears back, so
a crash or a closed tab loses nothing; a restart replays that log and carries on. After each
answer the preference file ``OUTPUT`` is rewritten (atomically) from the log. Several
labellers, each with their own id; ``labels_per_item`` > 1 shows a prompt to that many of
them, and the agreement between labellers (the share of candidate pairs two labellers order
alike) is reported on the page, by ``/api/stats`` and at the end.

API: ``GET /api/next?labeller=ID``, ``POST /api/answer {labeller, item, order | skip}``,
``POST /api/undo {labeller}``, ``GET /api/stats``; errors are 400 with ``{"error": "..."}``.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import cut_torn_line

log = logging.getLogger("tribune")

LABELLER_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class BadRequest(ValueError):
    pass


def row_digest(row) -> str:
    """What an answer was given to (the prompt and its candidates), kept with it in the answers log."""
    import hashlib

    return hashlib.sha256(json.dumps([row.prompt, list(row.candidates)]).encode()).hexdigest()[:16]


class LabelStore:
    """The answers log and what follows from it: who labelled what, the preference rows, agreement."""

    def __init__(self, rows, output: Path, mode: str, labels_per_item: int, seed: int, fmt: str):
        self.rows, self.output, self.mode, self.need, self.seed, self.fmt = rows, Path(output), mode, labels_per_item, seed, fmt
        self.log_path = Path(str(output) + ".answers.jsonl")
        self.lock = threading.Lock()
        self.answers: dict[tuple[str, int], list[int]] = {}      # (labeller, item) → order, best first
        self.skips: set[tuple[str, int]] = set()
        self.history: dict[str, list[tuple[str, int]]] = {}      # labeller → [(kind, item)], for undo
        if self.log_path.is_file():
            self._replay()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a", encoding="utf-8")

    # ------------------------------------------------------------ state
    def _replay(self) -> None:
        """Applies the answers log of an earlier session. A line torn by a crash is cut off (its answer
        never reached the page), so the next answer starts a line of its own; answers given to other
        prompts or candidates than this --input's (a re-collected file) are refused, not misapplied."""
        size = self.log_path.stat().st_size
        cut_torn_line(self.log_path)
        if self.log_path.stat().st_size != size:
            log.warning("label: cut a torn last line from %s", self.log_path)
        other = 0
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                item = rec.get("item")
                if "row" in rec and not (isinstance(item, int) and 0 <= item < len(self.rows)
                                         and rec["row"] == row_digest(self.rows[item])):
                    other += 1
                    continue
                self._apply(rec)
            except (json.JSONDecodeError, KeyError, AttributeError):
                log.warning("label: ignored a malformed line in %s", self.log_path)
        if other:
            raise UserError(f"{self.log_path}: {other} answers were given to other prompts or candidates than "
                            "--input's (was it collected again?); label it into another --output, or serve the "
                            "input they were given on")

    def _apply(self, rec: dict) -> None:
        who, item = rec["labeller"], rec.get("item")
        if rec["action"] == "answer":
            self.answers[(who, item)] = rec["order"]
            self.history.setdefault(who, []).append(("answer", item))
        elif rec["action"] == "skip":
            self.skips.add((who, item))
            self.history.setdefault(who, []).append(("skip", item))
        elif rec["action"] == "undo" and self.history.get(who):
            kind, item = self.history[who].pop()
            (self.answers.pop((who, item), None) if kind == "answer" else self.skips.discard((who, item)))

    def _append(self, rec: dict) -> None:
        rec = {**rec, "time": round(time.time(), 3)}
        self._log.write(json.dumps(rec) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())
        self._apply(rec)

    def shown(self, item: int) -> list[int]:
        from tribune.trainer.label import pair_of

        row = self.rows[item]
        return list(pair_of(row, self.seed)) if self.mode == "pair" else list(range(len(row.candidates)))

    def labels_of(self, item: int) -> int:
        return sum(1 for (_, i) in self.answers if i == item)

    def next_item(self, who: str) -> int | None:
        for row in self.rows:
            i = row.index
            if (who, i) not in self.answers and (who, i) not in self.skips and self.labels_of(i) < self.need:
                return i
        return None

    # ------------------------------------------------------------ requests
    def next(self, who: str) -> dict:
        with self.lock:
            item = self.next_item(who)
            progress = self.progress(who)
            if item is None:
                return {"done": True, "progress": progress}
            row = self.rows[item]
            return {"done": False, "item": item, "prompt": row.prompt, "mode": self.mode, "progress": progress,
                    "candidates": [{"index": i, "text": row.candidates[i]} for i in self.shown(item)]}

    def answer(self, who: str, body: dict) -> dict:
        item = body.get("item")
        if not isinstance(item, int) or not 0 <= item < len(self.rows):
            raise BadRequest(f"item: expected an item number in [0, {len(self.rows)})")
        with self.lock:
            if (who, item) in self.answers:
                raise BadRequest(f"item {item}: already answered by {who} (undo first to change it)")
            row = row_digest(self.rows[item])
            if body.get("skip") is True:
                self._append({"action": "skip", "labeller": who, "item": item, "row": row})
            else:
                order, shown = body.get("order"), self.shown(item)
                if (not isinstance(order, list) or not all(type(x) is int for x in order)
                        or sorted(order) != sorted(shown)):
                    raise BadRequest(f"order: expected every shown candidate index {shown} once, best first")
                self._append({"action": "answer", "labeller": who, "item": item, "order": order, "row": row})
                self._write_preferences()
            return {"ok": True, "progress": self.progress(who)}

    def undo(self, who: str) -> dict:
        with self.lock:
            if not self.history.get(who):
                raise BadRequest(f"nothing to undo for {who}")
            kind, item = self.history[who][-1]
            self._append({"action": "undo", "labeller": who})
            if kind == "answer":
                self._write_preferences()
            return {"ok": True, "undone": item, "progress": self.progress(who)}

    # ------------------------------------------------------------ outputs
    def preference_rows(self) -> list[dict]:
        from tribune.trainer.label import preference_row

        return [preference_row(self.rows[item], order, self.fmt, labeller=who)
                for (who, item), order in sorted(self.answers.items(), key=lambda kv: (kv[0][1], kv[0][0]))]

    def _write_preferences(self) -> None:
        from tribune.services.common.jsonl import write_jsonl

        write_jsonl(self.output, self.preference_rows())

    def progress(self, who: str | None = None) -> dict:
        labelled = len({i for (_, i) in self.answers})
        complete = sum(1 for r in self.rows if self.labels_of(r.index) >= self.need)
        out = {"items": len(self.rows), "labelled_items": labelled, "complete_items": complete,
               "answers": len(self.answers), "labellers": sorted({w for (w, _) in self.answers})}
        if who is not None:
            out["yours"] = sum(1 for (w, _) in self.answers if w == who)
            out["your_skips"] = sum(1 for (w, _) in self.skips if w == who)
        return out

    def stats(self) -> dict:
        with self.lock:
            return {**self.progress(), **agreement(self.answers)}

    def close(self) -> None:
        self._log.close()


def agreement(answers: dict[tuple[str, int], list[int]]) -> dict[str, Any]:
    """Share of candidate pairs that two labellers of the same item order alike (over all such pairs)."""
    by_item: dict[int, list[list[int]]] = {}
    for (_, item), order in answers.items():
        by_item.setdefault(item, []).append(order)
    agree = total = items = 0
    for orders in by_item.values():
        if len(orders) < 2:
            continue
        items += 1
        for a, b in itertools.combinations(orders, 2):
            pos_a, pos_b = {c: i for i, c in enumerate(a)}, {c: i for i, c in enumerate(b)}
            for x, y in itertools.combinations(sorted(set(a) & set(b)), 2):
                total += 1
                agree += int((pos_a[x] < pos_a[y]) == (pos_b[x] < pos_b[y]))
    return {"agreement": agree / total if total else None, "agreement_pairs": total, "items_with_several_labels": items}


def _handler(store: LabelStore):
    page = (Path(__file__).with_name("label_page.html")).read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):                  # the console is for people: details to the log
            log.debug("label page: " + fmt, *args)

        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict) -> None:
            self._send(status, json.dumps(obj).encode())

        def _labeller(self, value: Any) -> str:
            if not isinstance(value, str) or not LABELLER_ID.match(value):
                raise BadRequest("labeller: an id of 1-64 letters, digits or _.@- is required")
            return value

        def do_GET(self):
            url = urlparse(self.path)
            try:
                if url.path in ("/", "/index.html"):
                    return self._send(200, page, "text/html; charset=utf-8")
                if url.path == "/api/next":
                    return self._json(200, store.next(self._labeller(parse_qs(url.query).get("labeller", [None])[0])))
                if url.path == "/api/stats":
                    return self._json(200, store.stats())
                if url.path == "/healthz":
                    return self._json(200, {"ok": True})
                self._json(404, {"error": f"no such page: {url.path}"})
            except BadRequest as e:
                self._json(400, {"error": str(e)})

        def do_POST(self):
            try:
                n = int(self.headers.get("Content-Length") or 0)
                if n > 1 << 20:
                    raise BadRequest("request body over 1 MiB")
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except json.JSONDecodeError:
                    raise BadRequest("the request body must be JSON") from None
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                who = self._labeller(body.get("labeller"))
                if self.path == "/api/answer":
                    return self._json(200, store.answer(who, body))
                if self.path == "/api/undo":
                    return self._json(200, store.undo(who))
                self._json(404, {"error": f"no such endpoint: {self.path}"})
            except BadRequest as e:
                self._json(400, {"error": str(e)})

    return Handler


def start_label_server(store: LabelStore, host: str, port: int) -> ThreadingHTTPServer:
    """Binds and serves in a daemon thread; ``server.server_address`` has the port."""
    try:
        server = ThreadingHTTPServer((host, port), _handler(store))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    threading.Thread(target=server.serve_forever, daemon=True, name="label-page").start()
    return server


def serve_labelling(rows, cfg) -> dict:
    """`tribune label --serve`: until Ctrl-C (or SIGTERM); returns the progress and agreement."""
    import signal

    s = cfg.server
    store = LabelStore(rows, cfg.output, s.mode, s.labels_per_item, cfg.seed, cfg.format)
    server = start_label_server(store, s.host, s.port)
    host, port = server.server_address[:2]
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):     # explicit: a SIGINT ignored by a parent shell still stops it
        signal.signal(sig, lambda *_: done.set())
    print(f"labelling page: http://{host}:{port}/  ({len(rows)} prompts, {s.mode} mode, "
          f"{s.labels_per_item} label(s) each; answers → {store.log_path}); Ctrl-C to stop", flush=True)
    try:
        last = -1
        while not done.wait(2.0):
            p = store.progress()
            if p["answers"] != last:
                log.debug("label: %d/%d prompts complete, %d answers", p["complete_items"], p["items"], p["answers"])
                last = p["answers"]
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        store.close()
    stats = store.stats()
    log.info("label: %d answers from %d labeller(s) on %d/%d prompts; agreement %s → %s", stats["answers"],
             len(stats["labellers"]), stats["labelled_items"], stats["items"],
             "n/a" if stats["agreement"] is None else f"{stats['agreement']:.3f}", cfg.output)
    return {**stats, "output": str(cfg.output), "answers_log": str(store.log_path)}
