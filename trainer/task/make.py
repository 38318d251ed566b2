"""`tribune task make OUT`: writes the bundled task, byte-identical for the same seed.

Outputs: ``tokenizer/`` (word-level fast tokenizer built offline, distinct pad and EOS),
``base/`` (a tiny Llama created from a config), ``sft.jsonl``, ``prefs_train.jsonl``,
``prefs_eval.jsonl``, ``prompts_train.jsonl``, ``prompts_eval.jsonl`` and ``task.json``
(what was made, with which settings).

Demonstrations come from a *noisy demonstrator* that answers perfectly only part of the
time, so πSFT leaves headroom on the gold score. Preference labels are drawn from a
Bradley–Terry model on the gold scores, P(a ≻ b) = σ((g_a − g_b) / τ), i.e. raters who
sometimes disagree; k-way rankings are drawn from the Plackett–Luce model, its
generalisation to k items.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from trainer.config import field
from trainer.task.judge import CATEGORIES, NUMBERS, gold_score, vocabulary

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


@dataclass
class TaskConfig:
    """Sizes and noise of the bundled task."""
    seed: int = field(0, help="seed of every random choice; same seed gives byte-identical files")
    sft_size: int = field(4000, help="demonstrations in sft.jsonl")
    prefs_train_size: int = field(8000, help="preference rows in prefs_train.jsonl")
    prefs_eval_size: int = field(600, help="preference rows in prefs_eval.jsonl")
    prompts_train_size: int = field(2000, help="prompts in prompts_train.jsonl")
    prompts_eval_size: int = field(200, help="prompts in prompts_eval.jsonl")
    p_correct: float = field(0.45, help="how often the noisy demonstrator answers perfectly")
    ranking_fraction: float = field(0.2, help="share of preference rows that are 3- or 4-way rankings")
    rater_temperature: float = field(0.1, help="τ of the Bradley–Terry raters; larger means noisier labels")
    hidden_size: int = field(128, help="width of the tiny base model")
    num_layers: int = field(3, help="transformer layers of the tiny base model")
    num_heads: int = field(4, help="attention heads of the tiny base model")
    max_positions: int = field(64, help="maximum sequence length of the tiny base model")

    def __post_init__(self) -> None:
        for name in ("sft_size", "prefs_train_size", "prefs_eval_size", "prompts_train_size", "prompts_eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0.0 <= self.p_correct <= 1.0:
            raise ValueError("p_correct must be in [0, 1]")
        if not 0.0 <= self.ranking_fraction <= 1.0:
            raise ValueError("ranking_fraction must be in [0, 1]")
        if self.rater_temperature <= 0:
            raise ValueError("rater_temperature must be positive")


# ---------------------------------------------------------------- prompts and answers

def sample_prompt(rng: random.Random) -> str:
    if rng.random() < 0.7:
        n = rng.randint(2, 5)
        return f"name {NUMBERS[n - 1]} {rng.choice(sorted(CATEGORIES))}"
    a = rng.randint(0, 6)
    b = rng.randint(a + 1, min(a + 4, len(NUMBERS) - 1))
    return f"count from {NUMBERS[a]} to {NUMBERS[b]}"


def _pool(prompt: str) -> tuple[list[str], list[str]]:
    """(the words a perfect answer draws from, in order for counting; foreign words)."""
    words = prompt.split()
    if words[0] == "name":
        members = list(CATEGORIES[words[2]])
        foreign = [w for c, ws in CATEGORIES.items() if c != words[2] for w in ws]
        return members, foreign
    a, b = NUMBERS.index(words[2]), NUMBERS.index(words[4])
    return list(NUMBERS[a:b + 1]), [w for w in NUMBERS if w not in NUMBERS[a:b + 1]]


FLAWS = {"short": 0.35, "foreign": 0.3, "repeat": 0.1, "long": 0.25}
# Demonstrations never repeat a word: πSFT starts with (almost) no repetition, so a policy
# only finds it by moving away from πSFT, which the KL penalty prices.
SFT_FLAWS = {k: v for k, v in FLAWS.items() if k != "repeat"}


def demonstrate(prompt: str, rng: random.Random, p_correct: float, flaws: dict[str, float] = FLAWS) -> str:
    """The noisy demonstrator: a perfect answer with probability p_correct, else one flaw.

    Flaws: too short (most common), a foreign word, one word too many, a repeat. Repeats
    are the rarest flaw in the preference data on purpose: the reward model sees few of
    them and learns little about them, which is the blind spot an over-optimised policy
    finds (repetition: the proxy rises while the gold score falls).
    """
    members, foreign = _pool(prompt)
    counting = prompt.startswith("count")
    n = len(members) if counting else ("two three four five".split().index(prompt.split()[1]) + 2)
    answer = list(members) if counting else rng.sample(members, n)
    if rng.random() < p_correct:
        return " ".join(answer)
    flaw = rng.choices(list(flaws), weights=list(flaws.values()))[0]
    if flaw == "short":
        answer = answer[: max(1, n - rng.randint(1, 2))]
    elif flaw == "foreign":
        answer[rng.randrange(n)] = rng.choice(foreign)
    elif flaw == "repeat":
        i = rng.randrange(n)
        answer[min(n - 1, i + 1) if i + 1 < n else i - 1] = answer[i]
    else:
        extra = [w for w in (members if not counting else foreign) if w not in answer]
        answer.append(rng.choice(extra) if extra else answer[-1])
    return " ".join(answer)


def _distinct_candidates(prompt: str, k: int, rng: random.Random, p_correct: float) -> list[str] | None:
    seen: list[str] = []
    for _ in range(50):
        c = demonstrate(prompt, rng, p_correct)
        if c not in seen:
            seen.append(c)
        if len(seen) == k:
            return seen
    return None


def rater_ranking(prompt: str, candidates: list[str], rng: random.Random, tau: float) -> list[str]:
    """Plackett–Luce draw on exp(gold / τ): for two candidates this is Bradley–Terry."""
    pool = list(candidates)
    ranking = []
    while pool:
        weights = [math.exp(gold_score(prompt, c) / tau) for c in pool]
        pick = rng.choices(range(len(pool)), weights=weights)[0]
        ranking.append(pool.pop(pick))
    return ranking


def preference_rows(cfg: TaskConfig, size: int, rng: random.Random) -> list[dict]:
    rows = []
    while len(rows) < size:
        prompt = sample_prompt(rng)
        k = rng.choice([3, 4]) if rng.random() < cfg.ranking_fraction else 2
        cands = _distinct_candidates(prompt, k, rng, cfg.p_correct)
        if cands is None:
            continue
        ranking = rater_ranking(prompt, cands, rng, cfg.rater_temperature)
        if k == 2:
            rows.append({"prompt": prompt, "chosen": ranking[0], "rejected": ranking[1]})
        else:
            rows.append({"prompt": prompt, "ranking": ranking})
    return rows


# ---------------------------------------------------------------- tokenizer and model

def build_tokenizer(out: Path):
    """A word-level fast tokenizer, built offline, saved in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK] + vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                  padding_side="left", model_max_length=64)
    tok.save_pretrained(out)
    return tok


def build_base_model(cfg: TaskConfig, tokenizer, out: Path) -> int:
    """A tiny Llama from a config (random weights, seeded); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    mcfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 3,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(mcfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def make_task(cfg: TaskConfig, out: Path) -> dict:
    """Writes every file of the bundled task into ``out``; returns a summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    tok = build_tokenizer(out / "tokenizer")
    n_params = build_base_model(cfg, tok, out / "base")

    sft = [{"prompt": p, "response": demonstrate(p, rng, cfg.p_correct, SFT_FLAWS)}
           for p in (sample_prompt(rng) for _ in range(cfg.sft_size))]
    files = {
        "sft.jsonl": sft,
        "prefs_train.jsonl": preference_rows(cfg, cfg.prefs_train_size, rng),
        "prefs_eval.jsonl": preference_rows(cfg, cfg.prefs_eval_size, rng),
        "prompts_train.jsonl": [{"prompt": sample_prompt(rng)} for _ in range(cfg.prompts_train_size)],
        "prompts_eval.jsonl": [{"prompt": sample_prompt(rng)} for _ in range(cfg.prompts_eval_size)],
    }
    for name, rows in files.items():
        _write_jsonl(out / name, rows)
    demo_gold = sum(gold_score(r["prompt"], r["response"]) for r in sft) / len(sft)
    summary = {
        "task": "tribune-bundled-v1",
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "files": {name: len(rows) for name, rows in files.items()},
        "base_parameters": n_params,
        "vocab_size": len(tok),
        "demonstrator_gold_score": round(demo_gold, 6),
        "gold_judge": "trainer.gold_score(prompt, response)",
    }
    (out / "task.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
