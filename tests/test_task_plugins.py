"""Tasks of one's own, plugged in without editing Tribune: a ``tribune.tasks`` entry point or
``$TRIBUNE_TASKS``, through the real console script (and `tribune evaluate`'s worker process)."""
import json
from pathlib import Path

import pytest

from tests import task_plugin_echo
from tests.conftest import tribune
from tribune.trainer.task.registry import SUITE, TaskPluginError, build_registry, load_plugged_task, plugin_refs

PLUGIN = {"TRIBUNE_TASKS": "tests.task_plugin_echo:SPEC"}


def test_plugged_tasks_are_named_by_entry_point_or_environment_and_checked():
    assert plugin_refs(" tests.task_plugin_echo:SPEC ,, other:SPEC") == [
        ("$TRIBUNE_TASKS", "tests.task_plugin_echo:SPEC"), ("$TRIBUNE_TASKS", "other:SPEC")]
    assert load_plugged_task("here", "tests.task_plugin_echo:SPEC") is task_plugin_echo.SPEC
    for ref, says in (("tests.task_plugin_echo", "expected module:ATTRIBUTE"),
                      ("tests.no_such_module:SPEC", "No module named 'tests.no_such_module'"),
                      ("tests.task_plugin_echo:NOPE", "has no attribute 'NOPE'"),
                      ("tests.task_plugin_echo:NOT_A_SPEC", "a str, not a tribune.trainer.task.spec.TaskSpec")):
        with pytest.raises(TaskPluginError, match=says):
            load_plugged_task("$TRIBUNE_TASKS", ref)
    # the suite first, then the plugged ones; the same spec twice counts once; a taken name or id is an error
    tasks = build_registry([*SUITE, task_plugin_echo.SPEC, task_plugin_echo.SPEC])
    assert list(tasks)[-1] == "echo" and len(tasks) == len(SUITE) + 1
    import dataclasses

    for clash in (dataclasses.replace(task_plugin_echo.SPEC, name="sequence"),
                  dataclasses.replace(task_plugin_echo.SPEC, name="echo2", task_id="tribune-bundled-v1")):
        with pytest.raises(TaskPluginError, match="another task has that name or id: '(sequence|bundled)'"):
            build_registry([*SUITE, clash])


def test_a_plugged_task_is_listed_and_made_like_the_suites(tmp_path):
    lines = tribune("task", "list", env=PLUGIN).stdout.splitlines()
    assert lines[-1].split()[0] == "echo" and len(lines) == len(SUITE) + 1
    out = tmp_path / "echo"
    tribune("task", "make", out, "--task", "echo", "--sft-size", "40", "--prefs-train-size", "30",
            "--prefs-eval-size", "10", "--prompts-train-size", "8", "--prompts-eval-size", "4", "--pretrain-steps", "5",
            env=PLUGIN)
    made = json.loads((out / "task.json").read_text())
    assert made["task"] == "tests-echo-v1" and made["gold_judge"] == "tests.task_plugin_echo:gold_score"
    assert made["base_pretrain_steps"] == 5 and made["base_pretrain_loss"] > 0       # a plugged task's base too
    rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and all(task_plugin_echo.gold_score(r["prompt"], r["response"]) <= 1.0 for r in rows)
    assert json.loads((out / "base" / "config.json").read_text())["model_type"] == "gpt2"
    # without the plug-in the name is unknown, and a broken plug-in is one line, no traceback
    proc = tribune("task", "make", tmp_path / "x", "--task", "echo", check=False)
    assert proc.returncode == 2 and "unknown task 'echo'" in proc.stderr
    for cmd in (("task", "list"), ("evaluate", "--help")):
        proc = tribune(*cmd, check=False, env={"TRIBUNE_TASKS": "tests.no_such_module:SPEC"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().endswith("task plug-in 'tests.no_such_module:SPEC' ($TRIBUNE_TASKS): "
                                            "No module named 'tests.no_such_module'")


def test_an_installed_package_plugs_a_task_in_through_its_entry_point(tmp_path):
    """What `pip install` of a package declaring ``[project.entry-points."tribune.tasks"]`` leaves on the
    path: a dist-info with entry_points.txt."""
    info = tmp_path / "site" / "echo_tasks-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-tasks\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tribune.tasks]\necho = tests.task_plugin_echo:SPEC\n")
    import os

    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    lines = tribune("task", "list", env={"PYTHONPATH": path}).stdout.splitlines()
    assert lines[-1].startswith("echo ") and "plugged in from outside" in lines[-1]


@pytest.mark.slow
def test_evaluate_runs_the_pipeline_on_a_plugged_task_in_a_worker_process(tmp_path):
    """Every stage for real on the plugged task (a smoke run: a few steps each), in a worker process that
    finds the task through the environment it inherits; its judge scores the table."""
    out = tmp_path / "eval"
    tribune("evaluate", "--output", out, "--tasks", "echo", "--max-steps", "3", "--ppo", "iterations=2",
            "--eval-prompts", "16", "--overoptimisation-task", "none", "--collect", "max_prompts=24",
            "--best-of-n", "4", "--export", "exporter=torchscript", "--jobs", "2", env=PLUGIN)
    table = json.loads((out / "evaluation.json").read_text())
    assert table["complete"] and [r["task"] for r in table["rows"]] == ["echo"]
    row = table["rows"][0]
    assert 0.0 <= row["rm_gold_accuracy"] <= 1.0 and row["T=1"]["ppo_gold_se"] > 0
    assert "1/7 task make (echo)" in (out / "echo" / "evaluate.log").read_text()      # the worker's console
    label = json.loads(Path(out / "echo" / "collected" / "prefs.jsonl").read_text().splitlines()[0])
    assert label["prompt"].startswith("echo ")
