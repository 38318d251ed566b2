"""A quiet console and supported library APIs: Tribune's own lines and the summary last on the
terminal, the libraries' output in the run's log file (or on the terminal with -v); the
trackers of the same runs (TensorBoard by default, none on request, a clear error for a
missing package); the sampling loop on transformers' current cache API, exactly as an
uncached forward."""
import importlib.util
import json
import logging
import warnings

import pytest
import torch

from tests.conftest import JUDGE, tribune

# "newly initialized": transformers' report of the missing scalar head (a LOAD REPORT table from 5.x)
NOISE = ("LOAD REPORT", "newly initialized", "Warning", "Traceback", "Loading weights", "Writing model shards",
         "Removed shared tensor", "deprecated")


@pytest.mark.slow
def test_training_commands_print_their_own_lines_the_summary_last_and_report_to_trackers(task_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sft, rm = tmp_path / "sft", tmp_path / "rm"
    runs = {
        # checkpoints of a tied-embedding model (the task's base) used to warn "Removed shared tensor"
        "sft": tribune("sft", "--model", task_dir / "base", "--train", task_dir / "sft.jsonl", "--output", sft,
                       "--max-steps", "20", "--checkpoint-every", "10", "--log-every", "5", "--gold-eval-prompts", "4",
                       *JUDGE),
        # a reward model from a causal LM: transformers' load report of the missing scalar head
        "train-rm": tribune("train-rm", "--model", sft, "--train", task_dir / "prefs_train.jsonl",
                            "--eval", task_dir / "prefs_eval.jsonl", "--output", rm, "--max-steps", "2",
                            "--stats-samples", "8", "--report-to", "none"),
    }
    for command, proc in runs.items():
        console = proc.stdout + proc.stderr
        assert not [n for n in NOISE if n in console], console[-3000:]
        assert proc.stderr.splitlines()[-1].startswith(f"tribune {command}: done in "), proc.stderr[-1000:]
        json.loads(proc.stdout)                          # stdout holds the result and nothing else
    assert "fresh scalar head initialised (score.weight)" in runs["train-rm"].stderr
    assert (sft / "checkpoints" / "step-10").is_dir()
    # the libraries' output is not lost: the run's log file has it, and -v shows it
    assert "newly initialized" in (rm / "tribune.log").read_text()
    verbose = tribune("-v", "train-rm", "--model", sft, "--train", task_dir / "prefs_train.jsonl",
                      "--eval", task_dir / "prefs_eval.jsonl", "--output", tmp_path / "rm-v", "--max-steps", "1",
                      "--stats-samples", "4")
    assert "newly initialized" in verbose.stderr

    # trackers: TensorBoard by default, under the Trainer's names; none on request; metrics.jsonl always
    events = EventAccumulator(str(sft / "tensorboard")).Reload()
    assert {"train/loss", "train/learning_rate", "train/epoch", "eval/loss", "gold_score"} <= \
        set(events.Tags()["scalars"])
    rows = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] > 0 and rows[0]["train/learning_rate"] > 0      # metrics.jsonl keeps its keys
    assert (rm / "metrics.jsonl").is_file() and not (rm / "tensorboard").exists()
    if importlib.util.find_spec("wandb") is None:
        proc = tribune("sft", "--model", task_dir / "base", "--train", task_dir / "sft.jsonl", "--output",
                       tmp_path / "wandb", "--report-to", "tensorboard,wandb", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "--report-to wandb needs the 'wandb' package (pip install wandb)" in proc.stderr.splitlines()[-1]


def _uncached_greedy(model, ids, mask, steps):
    """Greedy decoding by a full forward per token, no cache: the obviously-correct reference."""
    from tribune.trainer.modeling import causal_logits

    for _ in range(steps):
        nxt = causal_logits(model, ids, mask)[:, -1].argmax(-1)
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def test_cached_sampling_is_exact_and_raises_no_deprecation(task_dir):
    from transformers.utils import logging as hf_logging

    from tribune.services.common.text import load_tokenizer
    from tribune.trainer.data import pad_left
    from tribune.trainer.modeling import generate, load_causal_lm

    tok = load_tokenizer(task_dir / "base")
    model = load_causal_lm(task_dir / "base").eval()
    prompts = [tok("name three fruits")["input_ids"], tok("count to three please now")["input_ids"]]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger().addHandler(handler)
    hf_logging.get_logger().warning_once.cache_clear()   # a deprecation logged once before must show again
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            # the base model rarely emits EOS, so every row runs the full 6 steps
            qr, mask, P = generate(model, tok, prompts, 6, do_sample=False)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    assert not [r.getMessage() for r in records if "deprecat" in r.getMessage()]
    ids, prompt_mask = pad_left(prompts, tok.pad_token_id)
    want = _uncached_greedy(model, ids, prompt_mask, qr.shape[1] - P)
    live = mask.bool()
    assert torch.equal(qr[live], want[:, :qr.shape[1]][live])
