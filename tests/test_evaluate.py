"""`tribune evaluate` end to end on the smallest setting: one suite task, every stage for real
(a smoke run: a few steps each), the JSON table and the PNG it writes."""
import json
from pathlib import Path

import pytest

from tests.conftest import tribune

pytestmark = pytest.mark.slow


def test_evaluate_writes_the_table_and_the_plot_with_one_round_of_the_iterated_loop(tmp_path):
    """The smallest task, every stage for real, and one round: collect on the PPO policy → label
    (the simulated rater) → reward model warm-started on all data → export → serve → PPO."""
    out = tmp_path / "eval"
    tribune("evaluate", "--output", out, "--tasks", "sequence", "--max-steps", "3", "--ppo", "iterations=2",
            "--eval-prompts", "16", "--overoptimisation-task", "none", "--rounds", "1", "--collect", "max_prompts=24",
            "--best-of-n", "4", "--export", "exporter=torchscript")     # the faster exporter: this test is about the table
    table = json.loads((out / "evaluation.json").read_text())
    assert table["complete"] and [(r["task"], r["round"]) for r in table["rows"]] == [("sequence", 0), ("sequence", 1)]
    for row in table["rows"]:
        for setting in ("T=1", "T=0.7", "greedy"):
            assert {"sft_gold", "ppo_gold", "sft_gold_se", "ppo_gold_se", "headroom_share", "sft_length",
                    "ppo_length"} <= set(row[setting])
        assert row["T=1"]["ppo_gold_se"] > 0 and row["greedy"]["ppo_gold_se"] >= 0
        assert 0.0 <= row["rm_gold_accuracy"] <= 1.0 and row["ppo_final_kl"] is not None
        assert 0.0 <= row["rm_onpolicy_accuracy"] <= 1.0 and 0.0 <= row["rm_equal_length_accuracy"] <= 1.0
        bon = row["best_of_n"]         # through the gateway's ScoreBestOfN
        assert bon["n"] >= 2 and bon["oracle_gold"] >= bon["picked_gold"] and bon["oracle_gold"] >= bon["random_gold"]
    row, r1 = table["rows"]
    assert set(row["stage_seconds"]) == {"task", "sft", "collect_label", "rm", "export", "ppo"}
    # the data step: four rankings of fresh πSFT samples per training prompt (24 here), given pairs + these
    col = out / "sequence" / "collected"
    given = (out / "sequence" / "task" / "prefs_train.jsonl").read_text().count("\n")
    ranked = [json.loads(line) for line in (col / "prefs.jsonl").read_text().splitlines()]
    # a ranking of three or more distinct samples, or chosen/rejected where only two were distinct
    assert 80 <= len(ranked) <= 96 and all(r["policy"].startswith("sft@") and (len(r.get("ranking", ())) >= 3 or
                                           {"chosen", "rejected"} <= set(r)) for r in ranked)
    assert len({r["prompt"] for r in ranked}) <= 24
    assert (col / "prefs_given_and_collected.jsonl").read_text().count("\n") == given + len(ranked)
    rm0 = json.loads((out / "sequence" / "rm" / "config.resolved.json").read_text())
    assert Path(rm0["train"]) == col / "prefs_given_and_collected.jsonl" and Path(rm0["eval"]) == col / "prefs_eval.jsonl"
    assert row["rm_data"] == "given_and_collected"
    # PPO's gold-free monitor measures the raters' favourites of the reward model's own eval file, and stops on a warning
    ppo0 = json.loads((out / "sequence" / "ppo" / "config.resolved.json").read_text())
    assert ppo0["preferred_eval"] == rm0["eval"] and ppo0["stop_on_drift"] is True
    assert "ppo_stopped_at" in row
    assert (out / "evaluation.png").stat().st_size > 10_000
    assert (out / "sequence" / "ppo" / "model.safetensors").is_file()

    rd = out / "sequence" / "round-1"
    cands = [json.loads(line) for line in (rd / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 96 and r1["collected"]["rows"] == 96 and cands[0]["policy"].startswith("ppo@")
    collected = (rd / "prefs.jsonl").read_text().count("\n")
    assert (rd / "prefs_all.jsonl").read_text().count("\n") == given + len(ranked) + collected and collected >= 80
    rm_cfg = json.loads((rd / "rm" / "config.resolved.json").read_text())
    ppo_cfg = json.loads((rd / "ppo" / "config.resolved.json").read_text())
    assert Path(rm_cfg["model"]) == out / "sequence" / "rm"             # warm-started from round 0's model
    assert Path(ppo_cfg["policy"]) == out / "sequence" / "ppo"          # PPO from the current policy
    assert (rd / "repository" / "tribune.json").is_file() and (rd / "ppo" / "model.safetensors").is_file()

    # the same run measured again without training it (--reuse), with a reward model on preferences
    # collected on πSFT's samples next to the given pairs' one, and the round run again on it; this
    # time in a worker process (--jobs 2), whose console output goes to the task's own log
    # the study runs PPO against the candidate the pipeline did not keep too: the kept weight goes last here
    kept = json.loads((out / "sequence" / "rm" / "metrics.json").read_text())["given_weight"]
    not_kept = {1: 0.5, 0.5: 1}[kept]
    proc = tribune("evaluate", "--output", out, "--tasks", "sequence", "--max-steps", "3", "--ppo", "iterations=2",
                   "--eval-prompts", "16", "--overoptimisation-task", "sequence", "--ensemble-size", "2",
                   "--study-members", "mixed", "--collect", "max_prompts=24", "--given-weights", str(not_kept), str(kept),
                   "--best-of-n", "4", "--reuse", "--compare-collected", "--collected-rows-per-prompt", "0",
                   "--rounds", "1", "--export", "exporter=torchscript", "--jobs", "2")
    assert "compare: reward model on" in (out / "sequence" / "evaluate.log").read_text()
    summary = json.loads((out / "evaluation.json").read_text())
    again = summary["rows"]
    # the over-optimisation study, its runs in workers of their own once their task was done: the mixed
    # ensemble's members each train and early-stop on one data source, and both PPO runs report their gold trajectory
    ensemble_log = (out / "sequence-study-ensemble_uncertainty.log").read_text()
    assert "over-optimisation study: ppo (ensemble_uncertainty" in ensemble_log
    assert "train-rm: ensemble member 2/2" in ensemble_log
    single_log = (out / "sequence-study-single_rm.log").read_text()
    assert "over-optimisation study: ppo (single_rm" in single_log and "ensemble member" not in single_log
    study = summary["overoptimisation"]
    not_kept_log = (out / "sequence-study-single_rm_not_kept.log").read_text()
    assert "over-optimisation study: ppo (single_rm_not_kept" in not_kept_log
    assert str(out / "sequence" / "rm_candidates" / f"given_weight_{not_kept:g}" / "rm") in not_kept_log
    assert "ensemble member" not in not_kept_log
    assert study["task"] == "sequence" and set(study["runs"]) == {"single_rm", "single_rm_not_kept",
                                                                  "ensemble_uncertainty"}
    for r in study["runs"].values():
        assert [s for s, *_ in r["gold_trajectory"]][-1] == 2 and r["final_gold_se"] > 0
        assert all(se > 0 for *_, se in r["gold_trajectory"])      # each evaluation's standard error
        assert isinstance(r["overoptimised"], bool) and isinstance(r["warned_before_fall"], bool)
    assert set(study["verdict"]) == {"single_overoptimised", "ensemble_defended", "shown"}
    assert "→ the defence is " in proc.stdout
    layout = json.loads((out / "sequence" / "rm_ensemble" / "ensemble.json").read_text())
    assert [Path(f).parent.name for f in layout["member_train"]] == ["collected", "task"]
    assert [Path(f).name for f in layout["member_eval"]] == ["prefs_eval.jsonl"] * 2
    assert [Path(f).parent.name for f in layout["member_eval"]] == ["collected", "task"]
    # member 1 starts from an SFT run of the next seed, trained for the study with πSFT's options
    assert study["member_starts"] == "sft_seeds" and "sft (seed 1)" in ensemble_log
    assert "2-member ensemble of mixed, starting from sft_seeds" in proc.stdout
    assert layout["member_model"] == [str(out / "sequence" / "sft"), str(out / "sequence" / "sft_seed-1")]
    assert json.loads((out / "sequence" / "sft_seed-1" / "config.resolved.json").read_text())["seed"] == 1
    assert [(r["task"], r["round"]) for r in again] == [("sequence", 0), ("sequence", 1)]
    assert again[0]["rm_gold_accuracy"] == row["rm_gold_accuracy"]           # the same model, not retrained
    assert Path(json.loads((rd / "rm" / "config.resolved.json").read_text())["model"]) == out / "sequence" / "rm"
    # the variants other than the pipeline's (and the "as many rows" one, left out: it is measured like these)
    assert set(again[0]["compared"]) == {"given", "collected", "seconds"}
    g, c = again[0]["compared"]["given"], again[0]["compared"]["collected"]
    assert 0 < c["train_pairs"] <= 4 * 24 * 6 and g["train_pairs"] > 8000
    assert g["pipeline_train_pairs"] == g["train_pairs"] + c["train_pairs"]
    for v, name in ((g, "given"), (c, "collected")):
        assert 0.0 <= v["rm_onpolicy_accuracy"] <= 1.0 and v["best_of_n"]["n"] >= 2
        assert {"ppo_gold", "sft_gold"} <= set(v["T=0.7"])
        assert (out / "sequence" / f"ppo_{name}" / "model.safetensors").is_file()
    check_collected_equal_rows(out)

    # PPO again on the same stages with other settings (--redo-ppo): leave-one-out advantages, no value model
    rm_weights = out / "sequence" / "rm" / "model.safetensors"
    stamp = rm_weights.stat().st_mtime_ns
    tribune("evaluate", "--output", out, "--tasks", "sequence", "--max-steps", "3", "--ppo", "iterations=2",
            "advantage_estimator=rloo", "samples_per_prompt=2", "--eval-prompts", "16",  # the study: not run
            "--collect", "max_prompts=24", "--best-of-n", "4", "--reuse", "--redo-ppo",
            "--export", "exporter=torchscript", "--jobs", "1")
    redone = json.loads((out / "evaluation.json").read_text())
    ppo_dir = out / "sequence" / "ppo"
    assert json.loads((ppo_dir / "config.resolved.json").read_text())["advantage_estimator"] == "rloo"
    assert not (ppo_dir / "value_model").exists()            # the earlier GAE run's files are gone
    assert [r["task"] for r in redone["rows"]] == ["sequence"] and set(redone["rows"][0]["stage_seconds"]) == {"ppo"}
    assert redone["overoptimisation"] is None
    assert redone["rows"][0]["rm_gold_accuracy"] == row["rm_gold_accuracy"] and rm_weights.stat().st_mtime_ns == stamp
    steps = [json.loads(line)["step"] for line in (ppo_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 2, steps      # one row per step

    # the reward model again on the same data step (--redo-rm), one candidate per weight of the given pairs, the one
    # of lowest held-out loss on the rater's rankings of πSFT samples kept; then PPO against it
    tribune("evaluate", "--output", out, "--tasks", "sequence", "--max-steps", "3", "--ppo", "iterations=2",
            "--eval-prompts", "16", "--collect", "max_prompts=24", "--best-of-n", "4", "--reuse", "--redo-rm",
            "--given-weights", "1", "0.25", "--rm", "learning_rate=2e-4", "--export", "exporter=torchscript",
            "--jobs", "1")
    redone = json.loads((out / "evaluation.json").read_text())["rows"][0]
    assert set(redone["stage_seconds"]) == {"rm", "ppo"} and rm_weights.stat().st_mtime_ns != stamp
    seq = out / "sequence"
    kept = json.loads((seq / "rm" / "metrics.json").read_text())
    assert redone["rm_given_weight"] == kept["given_weight"] in (1, 0.25)
    assert set(kept["given_weight_eval_losses"]) == {"1", "0.25"}
    assert kept["eval_loss"] == pytest.approx(min(kept["given_weight_eval_losses"].values()), abs=1e-6)
    other = {"1": "0.25", "0.25": "1"}[f"{kept['given_weight']:g}"]
    assert not (seq / "rm_candidates" / f"given_weight_{kept['given_weight']:g}" / "rm").exists()   # moved to rm/
    assert json.loads((seq / "rm_candidates" / f"given_weight_{other}" / "rm" / "metrics.json").read_text())[
        "eval_loss"] == pytest.approx(kept["given_weight_eval_losses"][other], abs=1e-6)
    resolved = json.loads((seq / "rm" / "config.resolved.json").read_text())
    assert resolved["optim"]["learning_rate"] == 2e-4 and Path(resolved["output"]) == seq / "rm"
    # the stage's training file is the kept candidate's: the given pairs at its weight, then the rankings
    merged = [json.loads(line) for line in Path(resolved["train"]).read_text().splitlines()]
    given = (seq / "task" / "prefs_train.jsonl").read_text().count("\n")
    w = None if kept["given_weight"] == 1 else kept["given_weight"]
    assert [r.get("weight") for r in merged] == [w] * given + [None] * (len(merged) - given) and len(merged) > given
    assert (ppo_dir / "value_model").is_dir()                # PPO again, with this call's (default) options
    assert (seq / "repository" / "tribune.json").stat().st_mtime_ns > stamp


def _equal_rows(out: Path, rows_per_prompt: int) -> tuple[Path, list[dict]]:
    from tribune.trainer.data_variants import collected_equal_rows
    from tribune.trainer.evaluate import EvaluateConfig
    from tribune.trainer.pipeline import StageOptions, stage_configs

    options = StageOptions(collect={"max_prompts": 24})
    cfg = EvaluateConfig(output=out, tasks=["sequence"], max_steps=3, stages=options,
                         collected_rows_per_prompt=rows_per_prompt)
    prefs = collected_equal_rows(cfg, stage_configs(out / "sequence", 0, 3, options, "sequence"))
    cands = prefs.with_name("candidates.jsonl").read_text().splitlines()
    return prefs, [json.loads(line) for line in cands]


def check_collected_equal_rows(out: Path) -> None:
    """The "as many rows as given" data of --compare-collected on a finished run: R rows of fresh
    πSFT samples per training prompt, pass-major; reused with the same R, collected again with another."""
    prefs, rows = _equal_rows(out, 2)
    assert len(rows) == 48 and [r["prompt"] for r in rows[:24]] == [r["prompt"] for r in rows[24:]]
    assert rows[0]["candidates"] != rows[24]["candidates"] and prefs.read_text().count("\n") > 0
    stamp = prefs.stat().st_mtime_ns
    assert _equal_rows(out, 2)[0].stat().st_mtime_ns == stamp                   # the same R: reused
    assert len(_equal_rows(out, 1)[1]) == 24                                     # another R: collected again


def test_prompt_mean_se_is_the_standard_error_over_prompts_of_their_means():
    """k samples per prompt count once per prompt: the spread of per-prompt means, float64 reference."""
    import math

    from tribune.trainer.measures import prompt_mean_se

    values = [1.0, 0.0, 0.5, 0.5, -0.5, 0.25]                  # 3 prompts × 2 samples
    means = [0.5, 0.5, -0.125]
    mu = sum(means) / 3
    ref = math.sqrt(sum((m - mu) ** 2 for m in means) / 2) / math.sqrt(3)
    assert prompt_mean_se(values, 2) == pytest.approx(ref, rel=1e-12)
    assert prompt_mean_se(values, 1) == pytest.approx(
        math.sqrt(sum((v - sum(values) / 6) ** 2 for v in values) / 5) / math.sqrt(6), rel=1e-12)
    assert prompt_mean_se([0.3, 0.7], 2) == 0.0                # one prompt: no spread to measure


def test_a_run_over_optimised_only_when_gold_fell_from_its_best_beyond_its_noise_while_the_proxy_rose():
    from tribune.trainer.overoptimisation import fell_below_sft, overoptimised

    # (step, gold, proxy, gold's standard error): gold peaks at iteration 10, then falls as the proxy climbs
    trajectory = [(0, 0.35, -0.3, 0.03), (10, 0.60, 0.8, 0.05), (20, 0.44, 1.1, 0.05), (30, 0.30, 1.3, 0.04)]
    run = {"sft_gold": 0.35, "final_gold": 0.30, "sft_gold_se": 0.03, "final_gold_se": 0.04,
           "sft_proxy": -0.3, "final_proxy": 1.3, "gold_trajectory": trajectory}
    assert overoptimised(run)                              # fell 0.30 from its best > 2.5 × 0.064
    assert not fell_below_sft(run)                         # but not below πSFT: 0.05 < 2 × 0.05
    lower = {**run, "final_gold": 0.45, "gold_trajectory": [*trajectory[:3], (30, 0.45, 1.3, 0.04)]}
    assert not overoptimised(lower)                        # fell 0.15 < 2.5 × 0.064: the best is partly luck
    assert not overoptimised({**run, "final_proxy": 0.7})  # the proxy fell from where gold was best
    assert not overoptimised({**run, "final_gold": None})  # no gold judge
    assert not overoptimised({**run, "gold_trajectory": []})
    rising = {**run, "final_gold": 0.60, "gold_trajectory": [*trajectory[:1], (30, 0.60, 1.3, 0.04)]}
    assert not overoptimised(rising)                       # its last evaluation is its best

    below = {"sft_gold": 0.35, "final_gold": 0.11, "sft_gold_se": 0.03, "final_gold_se": 0.04,
             "sft_proxy": -0.3, "final_proxy": 1.3}
    assert fell_below_sft(below)                                               # fell 0.24 > 2 × 0.05
    assert not fell_below_sft({**below, "final_gold": 0.29})                   # fell 0.06 < 2 × 0.05: noise
    assert not fell_below_sft({**below, "final_proxy": -0.4})                  # the proxy fell too
    assert not fell_below_sft({**below, "final_gold": None})                   # no gold judge
    assert fell_below_sft({**below, "final_gold": 0.34, "sft_gold_se": None, "final_gold_se": None})


def test_the_study_verdict_needs_a_single_model_over_optimised_and_the_ensemble_held_or_warned_first():
    from tribune.trainer.overoptimisation import study_verdict, warned_before_fall

    trajectory = [(0, 0.35, -0.3, 0.03), (10, 0.60, 0.8, 0.05), (20, 0.30, 1.3, 0.04)]
    assert warned_before_fall({"gold_trajectory": trajectory, "first_warning_at": 10})
    assert not warned_before_fall({"gold_trajectory": trajectory, "first_warning_at": 11})
    assert not warned_before_fall({"gold_trajectory": trajectory, "first_warning_at": None})
    fell = {"overoptimised": True, "warned_before_fall": False}
    held = {"overoptimised": False, "warned_before_fall": False}
    warned = {"overoptimised": True, "warned_before_fall": True}
    assert study_verdict({"single_rm": fell, "ensemble_uncertainty": held})["shown"]
    assert study_verdict({"single_rm": held, "single_rm_not_kept": fell, "ensemble_uncertainty": warned}) == {
        "single_overoptimised": ["single_rm_not_kept"], "ensemble_defended": True, "shown": True}
    assert not study_verdict({"single_rm": held, "ensemble_uncertainty": held})["shown"]   # nothing to defend
    assert not study_verdict({"single_rm": fell, "ensemble_uncertainty": fell})["shown"]   # no warning first
    assert not study_verdict({"single_rm": fell})["shown"]                                 # no ensemble run


def test_evaluate_refuses_bad_options_before_any_work(tmp_path):
    """A mistake in the options is a one-line error at once, not a traceback after the tasks have run."""
    proc = tribune("evaluate", "--output", tmp_path / "ev", "--study-members", "mixed", "--ensemble-size", "1",
                   check=False)
    assert proc.returncode == 2 and "ensemble_size must be at least 2 with study_members mixed" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "ev").exists()
    for weights in (["-1"], ["1", "1"]):
        proc = tribune("evaluate", "--output", tmp_path / "ev", "--given-weights", *weights, check=False)
        assert proc.returncode == 2 and "given_weights must be one or more distinct non-negative" in proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "ev").exists()
    proc = tribune("evaluate", "--output", tmp_path / "ev", "--redo-rm", check=False)
    assert proc.returncode == 2 and "redo_rm trains again on an earlier run's stages: it needs reuse" in proc.stderr
    proc = tribune("evaluate", "--output", tmp_path / "ev", "--tasks", "sequence", "nonesuch", check=False)
    assert proc.returncode == 2 and "tasks: unknown nonesuch" in proc.stderr
    # a stage option or a study option of the wrong type or name: before any worker starts
    for args, says in [(("--sft", "early_stopping_patience=abc"), "early_stopping_patience: expected a whole number"),
                       (("--ppo", "lerning_rate=1e-4"), "unknown PPOConfig field(s): lerning_rate"),
                       (("--aggressive", "learning_rate=fast"), "aggressive: learning_rate: expected a number")]:
        proc = tribune("evaluate", "--output", tmp_path / "ev", *args, check=False)
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and not (tmp_path / "ev").exists()


def test_a_gold_ranking_belongs_to_the_samples_it_ranked(tmp_path):
    """Samples drawn again (another πSFT, seed or --best-of-n) are ranked afresh, never measured
    against the gold ranking of the previous ones."""
    from tribune.trainer.measures import gold_ranking_path

    candidates = tmp_path / "eval_candidates_sft.jsonl"
    candidates.write_text('{"prompt": "p", "candidates": ["a", "b"]}\n')
    first = gold_ranking_path(candidates)
    first.write_text("ranked\n")
    meta = first.with_name(first.name + ".meta.json")                           # what `tribune label` writes beside it
    meta.write_text("{}")
    assert gold_ranking_path(candidates) == first and first.is_file() and meta.is_file()   # same samples: kept
    candidates.write_text('{"prompt": "p", "candidates": ["a", "b", "c"]}\n')
    second = gold_ranking_path(candidates)
    assert second != first and not first.exists() and not meta.exists()
