"""`tribune score`: rewards for a JSONL of {prompt, response}, through the reward service.

Every input row comes out, in order, with ``reward`` (raw) and ``reward_normalized``
((r − mean) / std with the repository's statistics). A row that cannot be scored
(missing or empty fields) comes out with an ``error`` instead, so nothing is lost and
line n of the output is line n of the input. The output is written to a temporary file
and renamed at the end.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tribune.services.client import ClientConfig, ScorerRequestError, ScorerServerError, ScorerUnavailable, TritonScorer
from tribune.services.common.config import field
from tribune.services.common.errors import UserError
from tribune.services.common.jsonl import read_jsonl
from tribune.services.common.text import encode_pair, load_tokenizer, pad, split_messages
from tribune.services.contract import REWARD_MODEL, ContractError
from tribune.services.repository import tokenizer_fingerprint

log = logging.getLogger("tribune")


@dataclass(kw_only=True)
class ScoreConfig(ClientConfig):
    """Score a JSONL file through a served reward model."""
    input: Path = field(help="JSONL of {prompt, response} or {messages} (the last turn, the assistant's, is scored; "
                        "rendered with the tokenizer's chat template)")
    output: Path = field(help="JSONL to write: each input row plus reward and reward_normalized")
    tokenizer: Path | None = field(None, help="tokenizer directory (default: the one the server ships with its models)")
    batch_size: int = field(256, help="rows sent per scoring call (split further into server-sized chunks)")
    max_prompt_length: int | None = field(None, help="prompt tokens kept, cut from the left (default: the reward "
                                          "model's training setting, served with the model)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


def run_score(cfg: ScoreConfig) -> dict:
    from tqdm.auto import tqdm

    rows = list(read_jsonl(cfg.input))
    try:
        if cfg.tokenizer is not None:
            tok = load_tokenizer(cfg.tokenizer)
            scorer = TritonScorer(cfg, tokenizer_fingerprint(tok), models=(REWARD_MODEL,))
        else:   # the tokenizer the served models were trained with, from the server itself
            scorer = TritonScorer(cfg, None, models=(REWARD_MODEL,))
            with tempfile.TemporaryDirectory() as tmp:
                tok = load_tokenizer(scorer.fetch_tokenizer(Path(tmp)))
            if tokenizer_fingerprint(tok) != scorer.facts.tokenizer_fingerprint:
                raise ContractError("the tokenizer the server ships does not match its own fingerprint")
    except (ContractError, ScorerUnavailable) as e:
        raise UserError(str(e)) from None
    max_len = scorer.facts.max_length
    max_prompt = cfg.max_prompt_length or scorer.facts.max_prompt_length
    out_rows: list[dict] = []
    errors = 0
    tmp = Path(str(cfg.output) + ".tmp")
    with scorer, tqdm(total=len(rows), desc="score", unit="row") as bar:
        for start in range(0, len(rows), cfg.batch_size):
            batch = rows[start:start + cfg.batch_size]
            seqs, where = [], []
            for i, (lineno, row) in enumerate(batch):
                if "messages" in row:
                    p, r = split_messages(tok, row["messages"]) or (None, None)
                else:
                    p, r = row.get("prompt"), row.get("response")
                if not isinstance(p, str) or not isinstance(r, str) or not p.strip():
                    batch[i] = (lineno, {**row, "error": "needs a non-empty string 'prompt' and a string 'response', "
                                         "or 'messages' ending with the assistant's turn"})
                    errors += 1
                    continue
                seqs.append(encode_pair(tok, p, r, max_prompt, max_len)[0])
                where.append(i)
            if seqs:
                try:
                    rewards = scorer.score(*pad(seqs, tok.pad_token_id, left=True))
                except (ScorerUnavailable, ScorerServerError, ScorerRequestError) as e:
                    raise UserError(f"{e}; nothing was written to {cfg.output}") from None
                normalized = scorer.facts.normalise(rewards)
                for i, r, n in zip(where, rewards.tolist(), normalized.tolist()):
                    lineno, row = batch[i]
                    batch[i] = (lineno, {**row, "reward": r, "reward_normalized": n})
            out_rows.extend(row for _, row in batch)
            bar.update(len(batch))
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows))
    os.replace(tmp, cfg.output)
    if errors:
        log.warning("score: %d of %d rows could not be scored; they carry an 'error' field", errors, len(rows))
    return {"rows": len(rows), "scored": len(rows) - errors, "errors": errors, "output": str(cfg.output),
            "reward_model_id": scorer.facts.reward_model_id}
