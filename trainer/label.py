"""`tribune label`: candidates (from `tribune collect`) into preference rows, three ways.

* a simulated rater: ``--judge module:function`` or ``--judge-url H:P`` scores every
  candidate, and a Plackett–Luce draw at ``--rater-temperature`` τ orders them (two
  candidates: Bradley–Terry, P(a ≻ b) = σ((s_a − s_b)/τ)); τ = 0 is a noise-free rater;
* a person: ``--serve`` starts a labelling page on loopback (``tribune.trainer.label_server``);
* Label Studio: ``--label-studio-export`` writes its tasks and labelling config,
  ``--label-studio-import EXPORT.json`` reads its JSON export back (``tribune.trainer.label_studio``).

Output rows are the formats `tribune train-rm` reads: ``{"prompt", "ranking": [best … worst]}``
or, with ``--format pairs``, ``{"prompt", "chosen", "rejected"}``; chat rows keep ``messages``.
Duplicate candidates are merged; a prompt with fewer than two distinct candidates is skipped
and counted.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tribune.services.common.config import field, group
from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import SkipCounter, read_jsonl, write_json, write_jsonl
from tribune.services.judge import JudgeConfig, load_judge
from tribune.trainer.raters import plackett_luce_order

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class LabelServerConfig:
    """The labelling page of `--serve`."""
    host: str = field("127.0.0.1", help="address of the labelling page (loopback unless you mean otherwise)")
    port: int = field(8765, help="port of the labelling page (0: any free port)")
    mode: Literal["rank", "pair"] = field("rank", help="rank all candidates, or pick the better of two")
    labels_per_item: int = field(1, help="labellers each prompt is shown to (>1 measures agreement)")

    def __post_init__(self) -> None:
        if self.labels_per_item < 1:
            raise ValueError("labels_per_item must be at least 1")


@dataclass(kw_only=True)
class LabelConfig:
    """Candidates into preference rows: a simulated rater, a person, or Label Studio."""
    input: Path | None = field(None, help="JSONL of {prompt, candidates} rows from `tribune collect`")
    output: Path = field(help="preference JSONL to write (Label Studio tasks JSON with --label-studio-export)")
    format: Literal["ranking", "pairs"] = field("ranking", help="ranking rows, or chosen/rejected of two candidates")
    rater: JudgeConfig = group(JudgeConfig(), help="the simulated rater's scores (a judge callable or service)")
    rater_temperature: float = field(0.1, help="τ of the simulated rater's Plackett–Luce / Bradley–Terry noise "
                                                "(0: noise-free)")
    seed: int = field(0, help="seed of the rater's noise and of which two candidates form a pair")
    serve: bool = field(False, help="start the labelling page for people instead of a simulated rater")
    server: LabelServerConfig = group(LabelServerConfig(), help="labelling page")
    label_studio_export: bool = field(False, help="write the candidates as Label Studio tasks to --output "
                                                  "(and its labelling config next to it)")
    label_studio_mode: Literal["ranking", "pairwise"] = field("ranking", help="Label Studio task kind")
    label_studio_import: Path | None = field(None, help="read a Label Studio JSON export into preference rows")

    def __post_init__(self) -> None:
        modes = [bool(self.serve), bool(self.label_studio_export), self.label_studio_import is not None,
                 bool(self.rater.judge or self.rater.judge_url)]
        if sum(modes) != 1:
            raise ValueError("choose one way to label: --judge/--judge-url (simulated rater), --serve (people), "
                             "--label-studio-export or --label-studio-import")
        if self.label_studio_import is None and self.input is None:
            raise ValueError("--input (candidates from `tribune collect`) is required")
        if self.rater_temperature < 0:
            raise ValueError("rater_temperature must be non-negative")


@dataclass
class CandidateRow:
    """One prompt and its distinct candidates (first occurrence order), as read from `collect` output."""
    index: int
    prompt: str
    candidates: list[str]
    extra: dict[str, Any]        # messages, policy: carried into the preference rows


def load_candidates(path: Path, skipped: SkipCounter) -> list[CandidateRow]:
    rows = []
    for lineno, obj in read_jsonl(path):
        prompt, cands = obj.get("prompt"), obj.get("candidates")
        if not isinstance(prompt, str) or not prompt.strip():
            skipped.skip("missing prompt")
            continue
        if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
            raise UserError(f"{path}:{lineno}: 'candidates' must be a list of strings")
        distinct = list(dict.fromkeys(cands))
        if len(distinct) < 2:
            skipped.skip("fewer than two distinct candidates")
            continue
        extra = {k: obj[k] for k in ("messages", "policy") if k in obj}
        rows.append(CandidateRow(len(rows), prompt, distinct, extra))
    if not rows:
        raise UserError(f"{path}: no row with two distinct candidates (skipped: {skipped.summary()})")
    return rows


def pair_of(row: CandidateRow, seed: int) -> tuple[int, int]:
    """The two candidates a pairwise rater compares: seeded per row, the same everywhere."""
    return tuple(random.Random(f"{seed}:{row.index}").sample(range(len(row.candidates)), 2))


def preference_row(row: CandidateRow, order: list[int], fmt: str, **meta: Any) -> dict[str, Any]:
    """A preference row from candidate indices ordered best first (two indices for ``pairs``)."""
    ranked = [row.candidates[i] for i in order]
    body = {"ranking": ranked} if fmt == "ranking" and len(ranked) > 2 else {"chosen": ranked[0], "rejected": ranked[-1]}
    return {"prompt": row.prompt, **body, **row.extra, **meta}


def simulated_labels(rows: list[CandidateRow], scores: list[list[float]], fmt: str, tau: float,
                     seed: int) -> list[dict[str, Any]]:
    """The simulated rater's preference rows, given every candidate's score."""
    rng = random.Random(seed)
    out = []
    for row, s in zip(rows, scores):
        shown = list(pair_of(row, seed)) if fmt == "pairs" else list(range(len(row.candidates)))
        order = plackett_luce_order([s[i] for i in shown], rng, tau)
        out.append(preference_row(row, [shown[i] for i in order], fmt))
    return out


def run_label(cfg: LabelConfig) -> dict:
    if cfg.label_studio_import is not None:
        from tribune.trainer.label_studio import import_results

        rows, skipped = import_results(cfg.label_studio_import, cfg.format)
        write_jsonl(cfg.output, rows)
        log.info("label: %d preference rows from Label Studio → %s; skipped: %s", len(rows), cfg.output,
                 skipped.summary())
        return {"rows": len(rows), "skipped": skipped.total, "output": str(cfg.output)}
    skipped = SkipCounter()
    rows = load_candidates(cfg.input, skipped)
    if cfg.label_studio_export:
        from tribune.trainer.label_studio import export_tasks

        return export_tasks(rows, cfg.output, cfg.label_studio_mode, cfg.seed)
    if cfg.serve:
        from tribune.trainer.label_server import serve_labelling

        return serve_labelling(rows, cfg)
    judge = load_judge(cfg.rater)
    flat = judge.score([r.prompt for r in rows for _ in r.candidates], [c for r in rows for c in r.candidates])
    scores, k = [], 0
    for r in rows:
        scores.append(flat[k:k + len(r.candidates)])
        k += len(r.candidates)
    prefs = simulated_labels(rows, scores, cfg.format, cfg.rater_temperature, cfg.seed)
    write_jsonl(cfg.output, prefs)
    summary = {"rows": len(prefs), "skipped": skipped.total, "skipped_reasons": dict(skipped.counts),
               "rater": judge.name, "rater_temperature": cfg.rater_temperature, "output": str(cfg.output)}
    write_json(Path(str(cfg.output) + ".meta.json"), summary)
    log.info("label: %d rows ranked by %s (τ=%g) → %s; skipped: %s", len(prefs), judge.name, cfg.rater_temperature,
             cfg.output, skipped.summary())
    return summary
