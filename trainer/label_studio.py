"""Label Studio round trip: candidates out as tasks, its JSON export back as preference rows.

Two task kinds, each with the labelling config Label Studio needs (written next to the tasks):

* ``ranking``: a ``List`` of the candidates and a ``Ranker`` (drag into order, best first);
  a result is ``{"type": "ranker", "value": {"ranker": {"<list name>": [ids best first]}}}``;
* ``pairwise``: two ``Text`` panes and a ``Pairwise`` control (the pair seeded per prompt, as
  on Tribune's own page); a result is ``{"type": "pairwise", "value": {"selected": "left"|"right"}}``.

Each annotation (not cancelled) becomes one row, with the annotator's id as ``labeller``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import SkipCounter

log = logging.getLogger("tribune")

LIST_NAME, RANKER_NAME = "candidates", "rank"

RANKING_CONFIG = f"""<View>
  <Header value="Rank the responses, best first"/>
  <Text name="prompt" value="$prompt"/>
  <List name="{LIST_NAME}" value="$items" title="Responses"/>
  <Ranker name="{RANKER_NAME}" toName="{LIST_NAME}"/>
</View>
"""
PAIRWISE_CONFIG = """<View>
  <Header value="Which response is better?"/>
  <Text name="prompt" value="$prompt"/>
  <Pairwise name="pw" toName="left,right"/>
  <Text name="left" value="$left"/>
  <Text name="right" value="$right"/>
</View>
"""


def export_tasks(rows, output: Path, mode: str, seed: int) -> dict:
    """Writes ``output`` (a JSON list of tasks) and ``output`` with ``.label_config.xml``."""
    from tribune.trainer.label import pair_of

    tasks = []
    for row in rows:
        data: dict[str, Any] = {"prompt": row.prompt, "tribune_row": row.index,
                                "tribune_candidates": row.candidates, **row.extra}
        if mode == "ranking":
            data["items"] = [{"id": f"c{i}", "title": f"response {i + 1}", "body": c}
                             for i, c in enumerate(row.candidates)]
        else:
            a, b = pair_of(row, seed)
            data.update(left=row.candidates[a], right=row.candidates[b], tribune_pair=[a, b])
        tasks.append({"data": data})
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(tasks, indent=1, ensure_ascii=False) + "\n")
    config = Path(str(output.with_suffix("")) + ".label_config.xml")
    config.write_text(RANKING_CONFIG if mode == "ranking" else PAIRWISE_CONFIG)
    log.info("label: %d Label Studio %s tasks → %s (labelling config: %s)", len(tasks), mode, output, config)
    return {"tasks": len(tasks), "mode": mode, "output": str(output), "label_config": str(config)}


def _ranking_from(result: dict, data: dict) -> list[int] | None:
    """Candidate indices best first from one result of a task, or None if it is not a preference."""
    value = result.get("value") or {}
    if result.get("type") == "ranker":
        ranked = value.get("ranker")
        lists = list(ranked.values()) if isinstance(ranked, dict) else []
        ids = lists[0] if len(lists) == 1 else (ranked or {}).get(LIST_NAME)
        known = {item["id"]: i for i, item in enumerate(data.get("items", []))}
        if not isinstance(ids, list) or len(ids) < 2 or any(i not in known for i in ids) or len(set(ids)) != len(ids):
            return None
        return [known[i] for i in ids]
    if result.get("type") == "pairwise":
        a, b = data.get("tribune_pair", (None, None))
        if a is None or value.get("selected") not in ("left", "right"):
            return None
        return [a, b] if value["selected"] == "left" else [b, a]
    return None


def import_results(path: Path, fmt: str) -> tuple[list[dict], SkipCounter]:
    """Preference rows from Label Studio's JSON export of tasks made by ``export_tasks``."""
    from tribune.trainer.label import CandidateRow, preference_row

    path = Path(path)
    try:
        tasks = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"Label Studio export not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not a Label Studio JSON export ({e})") from None
    if not isinstance(tasks, list):
        raise UserError(f"{path}: a Label Studio JSON export is a list of tasks")
    rows, skipped = [], SkipCounter()
    for n, task in enumerate(tasks):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("tribune_candidates"), list):
            raise UserError(f"{path}: task {n} was not exported by `tribune label --label-studio-export` "
                            "(no data.tribune_candidates)")
        row = CandidateRow(int(data.get("tribune_row", n)), data["prompt"], data["tribune_candidates"],
                           {k: data[k] for k in ("messages", "policy") if k in data})
        annotations = task.get("annotations") or []
        if not annotations:
            skipped.skip("task without annotations")
        for ann in annotations:
            if ann.get("was_cancelled"):
                skipped.skip("cancelled annotation")
                continue
            orders = [o for o in (_ranking_from(r, data) for r in ann.get("result") or []) if o]
            if len(orders) != 1:
                skipped.skip("annotation without one ranking or pairwise choice")
                continue
            rows.append(preference_row(row, orders[0], fmt, labeller=str(ann.get("completed_by", "unknown"))))
    if not rows:
        raise UserError(f"{path}: no usable annotation (skipped: {skipped.summary()})")
    return rows, skipped
