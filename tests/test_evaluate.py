"""`tribune evaluate` end to end on the smallest setting: one suite task, every stage for real
(a smoke run: a few steps each), the JSON table and the PNG it writes."""
import json

import pytest

from tests.conftest import tribune

pytestmark = pytest.mark.slow


def test_evaluate_writes_the_table_and_the_plot(tmp_path):
    out = tmp_path / "eval"
    tribune("evaluate", "--output", out, "--tasks", "sequence", "--max-steps", "3", "--ppo", "iterations=2",
            "--eval-prompts", "16", "--overoptimisation-task", "none")
    table = json.loads((out / "evaluation.json").read_text())
    assert table["complete"] and [r["task"] for r in table["rows"]] == ["sequence"]
    row = table["rows"][0]
    for setting in ("T=1", "T=0.7", "greedy"):
        assert {"sft_gold", "ppo_gold", "headroom_share", "sft_length", "ppo_length"} <= set(row[setting])
    assert 0.0 <= row["rm_gold_accuracy"] <= 1.0 and row["ppo_final_kl"] is not None
    assert set(row["stage_seconds"]) == {"task", "sft", "rm", "export", "ppo"}
    assert (out / "evaluation.png").stat().st_size > 10_000
    assert (out / "sequence" / "ppo" / "model.safetensors").is_file()
