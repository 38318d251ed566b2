"""`tribune collect` and `tribune label`: sampling identical per seed and resumable, the
simulated rater against σ(Δ/τ), the labelling page for people (a real server process killed
mid-way), and the Label Studio round trip."""
from __future__ import annotations

import json
import math
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, tribune
from tribune.trainer.data import load_preference_groups
from tribune.trainer.raters import bradley_terry_probability, plackett_luce_order
from tribune.services.common.jsonl import SkipCounter


def score_by_number(prompt: str, response: str) -> float:
    """A judge for the tests: the number the response names (``"s=0.3"`` → 0.3)."""
    return float(response.split("=")[1])


JUDGE = ("--judge", "tests.test_collect_label:score_by_number")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- collect

@pytest.mark.slow
def test_collect_is_identical_per_seed_and_resumes_after_a_torn_line(tmp_path, task_dir, sft_dir):
    common = ("collect", "--policy", sft_dir, "--prompts", task_dir / "prompts_eval.jsonl", "--k", "3",
              "--max-prompts", "40", "--chunk", "16")
    tribune(*common, "--output", tmp_path / "a.jsonl")
    tribune(*common, "--output", tmp_path / "b.jsonl")
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes()
    rows = _rows(tmp_path / "a.jsonl")
    assert len(rows) == 40 and all(len(r["candidates"]) == 3 for r in rows)
    assert rows[0]["policy"].startswith("sft@") and len(rows[0]["policy"]) == len("sft@") + 12
    meta = json.loads((tmp_path / "a.jsonl.meta.json").read_text())
    assert meta["complete"] and meta["settings"]["seed"] == 0 and meta["settings"]["sampling"]["k"] == 3
    dup = sum(len(r["candidates"]) - len(set(r["candidates"])) for r in rows)
    assert meta["counts"]["duplicates"] == dup
    assert meta["counts"]["empty"] == sum(1 for r in rows for c in r["candidates"] if not c.strip())

    tribune(*common, "--output", tmp_path / "c.jsonl", "--seed", "1")
    assert (tmp_path / "c.jsonl").read_bytes() != a

    # an interrupted run: 20 whole rows (a chunk and a bit) and a torn line; --resume completes it identically
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b"".join(a.splitlines(keepends=True)[:20]) + b'{"prompt": "na')
    (tmp_path / "torn.jsonl.meta.json").write_text((tmp_path / "a.jsonl.meta.json").read_text())
    refused = tribune(*common, "--output", torn, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    other = tribune(*common, "--output", torn, "--resume", "--temperature", "0.5", check=False)
    assert other.returncode == 2 and "other settings (sampling differ)" in other.stderr
    fewer = tribune(*common[:-4], "--max-prompts", "30", *common[-2:], "--output", torn, "--resume", check=False)
    assert fewer.returncode == 2 and "max_prompts" in fewer.stderr
    # a meta file written before the prompts' digest and --max-prompts were recorded still resumes
    meta = json.loads((tmp_path / "torn.jsonl.meta.json").read_text())
    for key in ("prompts_sha256", "max_prompts"):
        del meta["settings"][key]
    (tmp_path / "torn.jsonl.meta.json").write_text(json.dumps(meta))
    tribune(*common, "--output", torn, "--resume")
    assert torn.read_bytes() == a


@pytest.mark.slow
def test_collect_renders_chat_prompts_with_the_policy_template(tmp_path, sft_dir):
    import shutil

    policy = tmp_path / "chat_policy"
    shutil.copytree(sft_dir, policy)
    cfg_path = policy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                            "{% if add_generation_prompt %}{% endif %}")
    cfg_path.write_text(json.dumps(cfg))
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "name two fruits"}]}) + "\n"
                       + json.dumps({"messages": [{"role": "assistant", "content": "fig"}]}) + "\n"
                       + json.dumps({"prompt": "name three fruits"}) + "\n")
    proc = tribune("collect", "--policy", policy, "--prompts", prompts, "--output", tmp_path / "c.jsonl", "--k", "2")
    rows = _rows(tmp_path / "c.jsonl")
    assert [r["prompt"] for r in rows] == ["name two fruits ", "name three fruits"]
    assert rows[0]["messages"] == [{"role": "user", "content": "name two fruits"}]
    assert "1 invalid messages" in proc.stderr


# ---------------------------------------------------------------- the simulated rater

def test_plackett_luce_matches_bradley_terry_and_softmax_first_place():
    rng = random.Random(0)
    n = 20_000
    for delta, tau in ((0.1, 0.1), (0.3, 0.2), (-0.05, 0.1)):
        wins = sum(plackett_luce_order([delta, 0.0], rng, tau)[0] == 0 for _ in range(n))
        p = bradley_terry_probability(delta, tau)
        assert abs(wins / n - p) < 4 * math.sqrt(p * (1 - p) / n), (delta, tau, wins / n, p)
    scores = [0.9, 0.5, 0.0]
    firsts = [0, 0, 0]
    for _ in range(n):
        firsts[plackett_luce_order(scores, rng, 0.25)[0]] += 1
    z = sum(math.exp(s / 0.25) for s in scores)
    for i, s in enumerate(scores):
        p = math.exp(s / 0.25) / z
        assert abs(firsts[i] / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert plackett_luce_order([0.2, 0.9, 0.5], rng, 0.0) == [1, 2, 0]          # τ = 0: noise-free
    assert bradley_terry_probability(0.0, 0.0) == 0.5 and bradley_terry_probability(1e-3, 0.0) == 1.0
    with pytest.raises(ValueError):
        plackett_luce_order([0.0], rng, -1.0)


def test_label_with_a_judge_wins_at_sigma_delta_over_tau(tmp_path):
    """Through `tribune label`: 3,000 pairs whose true scores differ by Δ; the better one wins at
    σ(Δ/τ) within 4 standard errors; the rows train-rm reads, duplicates merged."""
    cands = tmp_path / "cands.jsonl"
    deltas = [0.05, 0.1, 0.2]
    with cands.open("w") as f:
        for i in range(3000):
            d = deltas[i % 3]
            f.write(json.dumps({"prompt": f"p{i}", "candidates": [f"s={d}", "s=0.0", "s=0.0"], "policy": "x@1"}) + "\n")
        f.write(json.dumps({"prompt": "same", "candidates": ["s=1", "s=1"]}) + "\n")     # one distinct: skipped
    tau = 0.1
    tribune("label", "--input", cands, "--output", tmp_path / "prefs.jsonl", *JUDGE, "--rater-temperature", tau,
            "--seed", "3")
    rows = _rows(tmp_path / "prefs.jsonl")
    assert len(rows) == 3000 and all(set(r) == {"prompt", "chosen", "rejected", "policy"} for r in rows)
    for k, d in enumerate(deltas):
        mine = rows[k::3]
        wins = sum(r["chosen"] == f"s={d}" for r in mine) / len(mine)
        p = bradley_terry_probability(d, tau)
        assert abs(wins - p) < 4 * math.sqrt(p * (1 - p) / len(mine)), (d, wins, p)
    meta = json.loads((tmp_path / "prefs.jsonl.meta.json").read_text())
    assert meta["skipped_reasons"] == {"fewer than two distinct candidates": 1}
    assert len(load_preference_groups(tmp_path / "prefs.jsonl", SkipCounter())) == 3000

    # the same seed, the same labels; rankings of 3-4 candidates in ranking format
    tribune("label", "--input", cands, "--output", tmp_path / "again.jsonl", *JUDGE, "--rater-temperature", tau,
            "--seed", "3")
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "prefs.jsonl").read_bytes()
    many = tmp_path / "many.jsonl"
    many.write_text(json.dumps({"prompt": "p", "candidates": ["s=0.1", "s=0.9", "", "s=0.5"]}) + "\n")
    tribune("label", "--input", many, "--output", tmp_path / "ranked.jsonl", "--judge",
            "tests.test_collect_label:score_or_zero", "--rater-temperature", "0")
    assert _rows(tmp_path / "ranked.jsonl") == [{"prompt": "p", "ranking": ["s=0.9", "s=0.5", "s=0.1", ""]}]


def score_or_zero(prompt: str, response: str) -> float:
    return score_by_number(prompt, response) if response else -1.0


def test_label_refuses_unclear_requests(tmp_path):
    proc = tribune("label", "--input", tmp_path / "c.jsonl", "--output", tmp_path / "p.jsonl", check=False)
    assert proc.returncode == 2 and "choose one way to label" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "candidates": "not a list"}) + "\n")
    proc = tribune("label", "--input", bad, "--output", tmp_path / "p.jsonl", *JUDGE, check=False)
    assert proc.returncode == 2 and "bad.jsonl:1: 'candidates' must be a list of strings" in proc.stderr


# ---------------------------------------------------------------- people: the labelling page

def _call(url: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _start_page(tmp_path: Path, cands: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tribune.trainer", "label", "--serve", "--input", str(cands), "--output",
                             str(tmp_path / "human.jsonl"), "--port", "0", *extra], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"labelling page did not start: {proc.stderr.read()[-2000:]}")


def test_labelling_page_keeps_every_answer_through_a_crash(tmp_path):
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"prompt": f"prompt {i}", "candidates": ["a", "b", "c"]}) + "\n"
                             for i in range(3)))
    proc, url = _start_page(tmp_path, cands, "--labels-per-item", "2")
    try:
        status, page = 200, urllib.request.urlopen(url + "/", timeout=60).read().decode()
        assert status == 200 and "keydown" in page and "/api/undo" in page
        status, nxt = _call(url + "/api/next?labeller=ann")
        assert status == 200 and nxt["item"] == 0 and [c["text"] for c in nxt["candidates"]] == ["a", "b", "c"]
        assert _call(url + "/api/answer", {"labeller": "ann", "item": 0, "order": [2, 0, 1]})[0] == 200
        assert _call(url + "/api/answer", {"labeller": "ann", "item": 1, "skip": True})[0] == 200
        assert _call(url + "/api/answer", {"labeller": "ann", "item": 2, "order": [0, 1, 2]})[0] == 200
        assert _call(url + "/api/undo", {"labeller": "ann"})[1]["undone"] == 2          # the last answer retracted
        assert _call(url + "/api/next?labeller=ann")[1]["item"] == 2
        assert _call(url + "/api/answer", {"labeller": "bob", "item": 0, "order": [2, 1, 0]})[0] == 200
        # malformed requests: a clear 400, nothing recorded
        for body, why in (({"labeller": "ann", "item": 2, "order": [0, 1]}, "order: expected every shown"),
                          ({"labeller": "ann", "item": 9, "order": [0, 1, 2]}, "item: expected an item number"),
                          ({"labeller": "", "item": 0, "order": [0, 1, 2]}, "labeller: an id"),
                          ({"labeller": "ann", "item": 2, "order": [0, "1", 2]}, "order: expected every shown"),
                          ({"labeller": "bob", "item": 0, "order": [0, 1, 2]}, "already answered by bob")):
            status, err = _call(url + "/api/answer", body)
            assert status == 400 and why in err["error"], err
    finally:
        proc.send_signal(signal.SIGKILL)                 # a crash: no shutdown code runs
        proc.wait(timeout=120)
    log = _rows(tmp_path / "human.jsonl.answers.jsonl")
    assert [(r["action"], r["labeller"]) for r in log] == [("answer", "ann"), ("skip", "ann"), ("answer", "ann"),
                                                            ("undo", "ann"), ("answer", "bob")]
    prefs = _rows(tmp_path / "human.jsonl")
    assert [(r["labeller"], r["ranking"]) for r in prefs] == [("ann", ["c", "a", "b"]), ("bob", ["c", "b", "a"])]

    answers = tmp_path / "human.jsonl.answers.jsonl"
    with answers.open("a") as f:                      # a crash in the middle of a write: a torn last line
        f.write('{"action": "answer", "labeller": "ann", "item": 2, "ord')
    proc, url = _start_page(tmp_path, cands, "--labels-per-item", "2")       # a restart carries on
    try:
        assert _call(url + "/api/next?labeller=ann")[1]["item"] == 2
        assert _call(url + "/api/next?labeller=bob")[1]["item"] == 1
        stats = _call(url + "/api/stats")[1]
        # ann c>a>b, bob c>b>a: (a,b) disagree, (a,c) and (b,c) agree
        assert stats["agreement_pairs"] == 3 and abs(stats["agreement"] - 2 / 3) < 1e-9
        assert stats["answers"] == 2 and stats["labellers"] == ["ann", "bob"]
        assert _call(url + "/api/answer", {"labeller": "bob", "item": 1, "order": [1, 0, 2]})[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "agreement 0.667" in err
    # the torn line was cut, so the answer after it is a line of its own and survives the next restart
    assert [(r["action"], r["labeller"]) for r in _rows(answers)][-1] == ("answer", "bob")
    assert len(load_preference_groups(tmp_path / "human.jsonl", SkipCounter())) == 3
    # the same output with other candidates (collected again): refused, not applied to them
    other = tmp_path / "other.jsonl"
    other.write_text(cands.read_text().replace('"a"', '"z"'))
    proc = tribune("label", "--serve", "--input", other, "--output", tmp_path / "human.jsonl", "--port", "0",
                   check=False, timeout=120)
    assert proc.returncode == 2 and "answers were given to other prompts or candidates" in proc.stderr, proc.stderr


NODE_DIR = REPO / "clients" / "node"


def _node_with_chromium() -> str:
    """node, with the npm packages of clients/node (headless Chromium among them) installed by
    `make node-client` (run by `make test`; here too if missing). Skipped only where node is not installed."""
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "@sparticuz" / "chromium").is_dir():
        proc = subprocess.run(["make", "node-client"], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"`make node-client` (npm ci) failed:\n{proc.stderr[-2000:]}"
    return node


def test_a_person_labels_twenty_items_in_chromium_with_the_keyboard_alone_and_a_crash_loses_none(tmp_path):
    """Headless Chromium on the real page: the labeller's id typed into the page's prompt, then digits and
    Enter to rank, s to skip, u to undo; a kill -9 of the server right after keeps every answer given."""
    node = _node_with_chromium()
    fruits = ("apple", "pear", "plum")
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"prompt": f"prompt {i}", "candidates": [f"{f} {i}" for f in fruits]}) + "\n"
                             for i in range(22)))
    want = {i: [f"{fruits[(i + j) % 3]} {i}" for j in range(3)] for i in range(22)}      # best first
    plan = [{"rank": want[i]} for i in range(5)] + [{"keys": ["s"]}]                  # prompt 5 skipped
    plan += [{"rank": want[i]} for i in range(6, 10)] + [{"keys": ["u"]}]              # prompt 9 taken back …
    want[9] = want[9][::-1]
    plan += [{"rank": want[i]} for i in range(9, 21)]                                  # … and answered again
    proc, url = _start_page(tmp_path, cands)
    try:
        run = subprocess.run([node, str(NODE_DIR / "label_with_keyboard.mjs"), url, "kim"], input=json.dumps(plan),
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout)
    finally:
        proc.send_signal(signal.SIGKILL)                 # a crash right after the last key: no shutdown code runs
        proc.wait(timeout=120)
    shown = [int(s["prompt"].split()[-1]) for s in out["seen"]]
    assert shown == [*range(11), *range(9, 21)]              # u on prompt 10 brings prompt 9 back
    assert all(sorted(s["candidates"]) == sorted(want[i]) for s, i in zip(out["seen"], shown))
    assert out["progress"].startswith("20 answered by you") and out["prompt"] == "prompt 21"
    log = _rows(tmp_path / "human.jsonl.answers.jsonl")
    assert {r["labeller"] for r in log} == {"kim"}
    assert [r["action"] for r in log].count("answer") == 21 and [r["action"] for r in log].count("undo") == 1
    prefs = {int(r["prompt"].split()[-1]): r["ranking"] for r in _rows(tmp_path / "human.jsonl")}
    assert sorted(prefs) == [i for i in range(21) if i != 5] and all(prefs[i] == want[i] for i in prefs)


def test_labelling_page_pair_mode_shows_the_seeded_pair(tmp_path):
    from tribune.trainer.label import CandidateRow, pair_of

    cands = tmp_path / "cands.jsonl"
    cands.write_text(json.dumps({"prompt": "p", "candidates": ["a", "b", "c", "d"]}) + "\n")
    proc, url = _start_page(tmp_path, cands, "--mode", "pair", "--format", "pairs", "--seed", "5")
    try:
        nxt = _call(url + "/api/next?labeller=ann")[1]
        expected = pair_of(CandidateRow(0, "p", ["a", "b", "c", "d"], {}), 5)
        assert [c["index"] for c in nxt["candidates"]] == list(expected) and nxt["mode"] == "pair"
        winner, loser = expected[1], expected[0]
        assert _call(url + "/api/answer", {"labeller": "ann", "item": 0, "order": [winner, loser]})[0] == 200
        assert _call(url + "/api/next?labeller=ann")[1]["done"] is True
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    assert _rows(tmp_path / "human.jsonl") == [{"prompt": "p", "chosen": "abcd"[winner], "rejected": "abcd"[loser],
                                                 "labeller": "ann"}]


# ---------------------------------------------------------------- Label Studio

def test_label_studio_round_trip(tmp_path):
    cands = tmp_path / "cands.jsonl"
    cands.write_text(json.dumps({"prompt": "p0", "candidates": ["x", "y", "z"], "policy": "sft@1"}) + "\n"
                     + json.dumps({"prompt": "p1", "candidates": ["u", "v"]}) + "\n")
    tribune("label", "--input", cands, "--output", tmp_path / "rank_tasks.json", "--label-studio-export")
    tasks = json.loads((tmp_path / "rank_tasks.json").read_text())
    config = (tmp_path / "rank_tasks.label_config.xml").read_text()
    assert "<Ranker" in config and 'value="$items"' in config
    assert [i["body"] for i in tasks[0]["data"]["items"]] == ["x", "y", "z"]
    # what Label Studio's JSON export holds after people ranked them (one cancelled)
    tasks[0]["annotations"] = [
        {"completed_by": 7, "was_cancelled": False, "result": [
            {"type": "ranker", "from_name": "rank", "to_name": "candidates",
             "value": {"ranker": {"candidates": ["c2", "c0", "c1"]}}}]},
        {"completed_by": 8, "was_cancelled": True, "result": []}]
    tasks[1]["annotations"] = [{"completed_by": 9, "result": [
        {"type": "ranker", "value": {"ranker": {"candidates": ["c1", "c0"]}}}]}]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    proc = tribune("label", "--label-studio-import", export, "--output", tmp_path / "prefs.jsonl")
    assert _rows(tmp_path / "prefs.jsonl") == [
        {"prompt": "p0", "ranking": ["z", "x", "y"], "policy": "sft@1", "labeller": "7"},
        {"prompt": "p1", "chosen": "v", "rejected": "u", "labeller": "9"}]
    assert "1 cancelled annotation" in proc.stderr

    tribune("label", "--input", cands, "--output", tmp_path / "pw_tasks.json", "--label-studio-export",
            "--label-studio-mode", "pairwise")
    pw = json.loads((tmp_path / "pw_tasks.json").read_text())
    assert "<Pairwise" in (tmp_path / "pw_tasks.label_config.xml").read_text()
    a, b = pw[0]["data"]["tribune_pair"]
    assert (pw[0]["data"]["left"], pw[0]["data"]["right"]) == (["x", "y", "z"][a], ["x", "y", "z"][b])
    pw[0]["annotations"] = [{"completed_by": 1, "result": [{"type": "pairwise", "value": {"selected": "right"}}]}]
    export.write_text(json.dumps(pw[:1]))
    tribune("label", "--label-studio-import", export, "--output", tmp_path / "pw.jsonl")
    assert _rows(tmp_path / "pw.jsonl") == [{"prompt": "p0", "chosen": ["x", "y", "z"][b],
                                             "rejected": ["x", "y", "z"][a], "policy": "sft@1", "labeller": "1"}]
    export.write_text(json.dumps([{"data": {"text": "from another project"}}]))
    proc = tribune("label", "--label-studio-import", export, "--output", tmp_path / "x.jsonl", check=False)
    assert proc.returncode == 2 and "was not exported by `tribune label --label-studio-export`" in proc.stderr
