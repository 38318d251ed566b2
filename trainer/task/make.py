"""`tribune task make OUT [--task NAME]`: writes one suite task, byte-identical for the same seed (the
pretrained base model's weights on the same machine and torch build).

Outputs: ``tokenizer/`` (word-level fast tokenizer built offline, distinct pad and EOS, no
BOS), ``base/`` (a tiny model of the task's architecture created from a config and pretrained
on a generic in-context-copying corpus, ``tribune.trainer.task.pretrain``),
``sft.jsonl``, ``prefs_train.jsonl``, ``prefs_eval.jsonl``, ``prompts_train.jsonl``,
``prompts_eval.jsonl`` and ``task.json`` (what was made, with which settings, and the
task's gold judge as ``module:function``).

Demonstrations come from the task's *noisy demonstrator* that answers perfectly only part
of the time, so πSFT leaves headroom on the gold score. Preference labels are drawn from a
Bradley–Terry model on the gold scores, P(a ≻ b) = σ((g_a − g_b) / τ), i.e. raters who
sometimes disagree; k-way rankings are drawn from the Plackett–Luce model, its
generalisation to k items. Nothing here is specific to one task: a task is a
``tribune.trainer.task.spec.TaskSpec`` in ``tribune.trainer.task.registry.TASKS`` (the suite's,
and tasks plugged in through an entry point or ``$TRIBUNE_TASKS``).
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tribune.services.common.config import field
from tribune.services.common.errors import UserError
from tribune.trainer.task.bundled import FLAWS, SFT_FLAWS, demonstrate, sample_prompt  # noqa: F401 (public names)
from tribune.trainer.raters import plackett_luce_order
from tribune.trainer.task.judge import gold_score
from tribune.trainer.task.registry import DEFAULT_TASK, get_task
from tribune.trainer.task.spec import BaseModelSpec, TaskSpec

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


@dataclass
class TaskConfig:
    """Which suite task to write, its sizes and noise; unset values take the task's defaults."""
    task: str = field(DEFAULT_TASK, help="task to write: a suite task or a plugged-in one (`tribune task list` "
                                         "shows them)")
    seed: int = field(0, help="seed of every random choice; same seed gives byte-identical files")
    sft_size: int = field(4000, help="demonstrations in sft.jsonl")
    prefs_train_size: int = field(8000, help="preference rows in prefs_train.jsonl")
    prefs_eval_size: int = field(600, help="preference rows in prefs_eval.jsonl")
    prompts_train_size: int = field(2000, help="prompts in prompts_train.jsonl")
    prompts_eval_size: int = field(200, help="prompts in prompts_eval.jsonl")
    p_correct: float | None = field(None, help="how often the noisy demonstrator answers perfectly "
                                               "(unset: the task's default, 0.45 for the bundled task)")
    ranking_fraction: float = field(0.2, help="share of preference rows that are 3- or 4-way rankings")
    rater_temperature: float | None = field(None, help="τ of the Bradley–Terry raters; larger means noisier "
                                                       "labels (unset: the task's default, 0.1 for the bundled task)")
    hidden_size: int | None = field(None, help="width of the tiny base model (unset: the task's default)")
    num_layers: int | None = field(None, help="transformer layers of the tiny base model (unset: the task's default)")
    num_heads: int | None = field(None, help="attention heads of the tiny base model (unset: the task's default)")
    max_positions: int = field(64, help="maximum sequence length of the tiny base model")
    pretrain_steps: int | None = field(None, help="steps of generic in-context-copy pretraining of the base model "
                                                  "before it is saved; 0 keeps random weights (unset: the task's "
                                                  "default)")

    def __post_init__(self) -> None:
        spec = get_task(self.task)          # ValueError listing the task names
        for name in ("sft_size", "prefs_train_size", "prefs_eval_size", "prompts_train_size", "prompts_eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.p_correct is not None and not 0.0 <= self.p_correct <= 1.0:
            raise ValueError("p_correct must be in [0, 1]")
        if not 0.0 <= self.ranking_fraction <= 1.0:
            raise ValueError("ranking_fraction must be in [0, 1]")
        if self.rater_temperature is not None and self.rater_temperature <= 0:
            raise ValueError("rater_temperature must be positive")
        if self.pretrain_steps is not None and self.pretrain_steps < 0:
            raise ValueError("pretrain_steps must be at least 0")
        for name in ("hidden_size", "num_layers", "num_heads", "max_positions"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        width = self.hidden_size or spec.model.hidden_size
        heads = self.num_heads or spec.model.num_heads
        if width % heads:
            raise ValueError(f"hidden_size ({width}) must be a multiple of num_heads ({heads})")

    @property
    def spec(self) -> TaskSpec:
        return get_task(self.task)

    def resolved(self) -> "TaskConfig":
        """A copy with every unset value replaced by the task's default."""
        spec, m = self.spec, self.spec.model
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return dataclasses.replace(
            self, p_correct=pick(self.p_correct, spec.p_correct),
            rater_temperature=pick(self.rater_temperature, spec.rater_temperature),
            hidden_size=pick(self.hidden_size, m.hidden_size), num_layers=pick(self.num_layers, m.num_layers),
            num_heads=pick(self.num_heads, m.num_heads), pretrain_steps=pick(self.pretrain_steps, m.pretrain_steps))


# ---------------------------------------------------------------- preference data

def _distinct_candidates(spec: TaskSpec, prompt: str, k: int, rng: random.Random,
                         p_correct: float) -> list[str] | None:
    seen: list[str] = []
    for _ in range(50):
        c = spec.demonstrate(prompt, rng, p_correct, spec.flaws)
        if c not in seen:
            seen.append(c)
        if len(seen) == k:
            return seen
    return None


def rater_ranking(prompt: str, candidates: list[str], rng: random.Random, tau: float,
                  judge: Callable[[str, str], float] = gold_score) -> list[str]:
    """Plackett–Luce draw on exp(gold / τ): for two candidates this is Bradley–Terry."""
    order = plackett_luce_order([judge(prompt, c) for c in candidates], rng, tau)
    return [candidates[i] for i in order]


def preference_rows(cfg: TaskConfig, size: int, rng: random.Random) -> list[dict]:
    cfg = cfg.resolved()
    spec = cfg.spec
    rows = []
    while len(rows) < size:
        prompt = spec.sample_prompt(rng)
        k = rng.choice([3, 4]) if rng.random() < cfg.ranking_fraction else 2
        cands = _distinct_candidates(spec, prompt, k, rng, cfg.p_correct)
        if cands is None:
            continue
        ranking = rater_ranking(prompt, cands, rng, cfg.rater_temperature, spec.gold_score)
        if k == 2:
            rows.append({"prompt": prompt, "chosen": ranking[0], "rejected": ranking[1]})
        else:
            rows.append({"prompt": prompt, "ranking": ranking})
    return rows


# ---------------------------------------------------------------- tokenizer and model

def build_tokenizer(out: Path, vocabulary: list[str] | None = None):
    """A word-level fast tokenizer, built offline, saved in Hugging Face format.

    Ids: 0 ``<pad>``, 1 ``<eos>``, 2 ``<unk>``, then the task's words; no BOS. It is saved
    as the generic ``TokenizersBackend`` class, which ``AutoTokenizer`` keeps for the
    architectures used here (llama, gpt2, qwen3). It would *not* for e.g. qwen2, whose
    model type transformers 5 maps to ``Qwen2Tokenizer`` regardless of the saved class.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocabulary is None:
        vocabulary = get_task(DEFAULT_TASK).vocabulary()
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK] + list(vocabulary))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                  padding_side="left", model_max_length=64)
    tok.save_pretrained(out)
    return tok


def _model_config(arch: str, m: BaseModelSpec, cfg: TaskConfig, tokenizer):
    """The transformers config of a tiny base model (pad and EOS from the tokenizer, no BOS)."""
    width, layers, heads = cfg.hidden_size, cfg.num_layers, cfg.num_heads
    kv = m.num_kv_heads if m.num_kv_heads and heads % m.num_kv_heads == 0 else heads
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=m.tie_embeddings)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM, LlamaConfig(
            hidden_size=width, intermediate_size=width * m.mlp_ratio, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=cfg.max_positions, **common)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel, GPT2Config(
            n_embd=width, n_layer=layers, n_head=heads, n_inner=width * m.mlp_ratio, n_positions=cfg.max_positions,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM, Qwen3Config(
            hidden_size=width, intermediate_size=width * m.mlp_ratio, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=width // heads,
            max_position_embeddings=cfg.max_positions, **common)
    raise ValueError(f"unknown base-model architecture {arch!r}")


def build_base_model(cfg: TaskConfig, tokenizer, out: Path) -> tuple[int, float | None]:
    """A tiny model of the task's architecture (random weights, seeded), pretrained for
    ``pretrain_steps`` steps on the generic copying corpus; returns (parameter count, the last
    pretraining loss or None)."""
    import torch

    from tribune.trainer.task.pretrain import pretrain_base_model

    cfg = cfg.resolved()
    m = cfg.spec.model
    torch.manual_seed(cfg.seed)
    model_cls, mcfg = _model_config(m.arch, m, cfg, tokenizer)
    model = model_cls(mcfg)
    last_loss = None
    if cfg.pretrain_steps:
        losses = pretrain_base_model(model, tokenizer, cfg.spec.vocabulary(), cfg.pretrain_steps, cfg.seed)
        last_loss = round(sum(losses[-10:]) / len(losses[-10:]), 4)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters()), last_loss


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def make_task(cfg: TaskConfig, out: Path) -> dict:
    """Writes every file of the task ``cfg.task`` into ``out``; returns a summary."""
    cfg = cfg.resolved()
    spec = cfg.spec
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory: `tribune task make` writes a directory of files")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    tok = build_tokenizer(out / "tokenizer", spec.vocabulary())
    n_params, pretrain_loss = build_base_model(cfg, tok, out / "base")

    sft = [{"prompt": p, "response": spec.demonstrate(p, rng, cfg.p_correct, spec.sft_flaws)}
           for p in (spec.sample_prompt(rng) for _ in range(cfg.sft_size))]
    files = {
        "sft.jsonl": sft,
        "prefs_train.jsonl": preference_rows(cfg, cfg.prefs_train_size, rng),
        "prefs_eval.jsonl": preference_rows(cfg, cfg.prefs_eval_size, rng),
        "prompts_train.jsonl": [{"prompt": spec.sample_prompt(rng)} for _ in range(cfg.prompts_train_size)],
        "prompts_eval.jsonl": [{"prompt": spec.sample_prompt(rng)} for _ in range(cfg.prompts_eval_size)],
    }
    for name, rows in files.items():
        _write_jsonl(out / name, rows)
    demo_gold = sum(spec.gold_score(r["prompt"], r["response"]) for r in sft) / len(sft)
    summary = {
        "task": spec.task_id,
        "task_name": spec.name,
        "description": spec.description,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "files": {name: len(rows) for name, rows in files.items()},
        "base_architecture": spec.model.arch,
        "base_parameters": n_params,
        "base_pretrain_steps": cfg.pretrain_steps,
        "base_pretrain_loss": pretrain_loss,
        "vocab_size": len(tok),
        "demonstrator_gold_score": round(demo_gold, 6),
        "gold_judge": spec.judge,
        "exploit": spec.exploit,
    }
    (out / "task.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
