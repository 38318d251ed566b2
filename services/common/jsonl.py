"""JSONL input files: a malformed line stops the run with ``file:line``; unusable rows are counted."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tribune.services.common.errors import UserError

NOT_UTF8 = re.compile("[\udc80-\udcff]")      # what errors="surrogateescape" makes of a byte that is not UTF-8


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, object); a line that is not UTF-8 or not a JSON object is a UserError
    naming it. A UTF-8 byte-order mark at the start (some editors write one) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    # any line ending (\n, \r\n, \r); bytes that are not UTF-8 come through as lone surrogates, found per line
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            bad = NOT_UTF8.search(line)
            if bad:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {ord(bad.group()) - 0xDC00:#04x} at column "
                                f"{bad.start() + 1})")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def cut_torn_line(path: Path) -> int:
    """The whole lines of an append-only file a crash may have cut mid-line: a torn last line is
    removed (so the next append starts on a line of its own). Returns how many lines are whole."""
    data = Path(path).read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with Path(path).open("r+b") as f:
            f.truncate(end)
    return data[:end].count(b"\n")


@dataclass
class SkipCounter:
    """Why rows were skipped, for the log."""
    counts: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.counts[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in sorted(self.counts.items())) or "none"


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: a reader never sees half a file."""
    import os

    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Atomic JSONL write, flushed to disk: a reader never sees half a file."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
