"""The task suite: every registered task is deterministic, judged, noisy and exploitable."""
import hashlib
import importlib
import json
import random
import sys
from pathlib import Path

import pytest

from tribune.trainer.task.make import TaskConfig, make_task
from tribune.trainer.task.registry import DEFAULT_TASK, TASKS, UnknownTaskError, get_task, list_tasks, task_for_prompts, \
    task_list_lines
from tribune.trainer.task.spec import load_judge

SMALL = dict(sft_size=150, prefs_train_size=400, prefs_eval_size=50, prompts_train_size=50, prompts_eval_size=60,
             pretrain_steps=20)
FILES = {"sft.jsonl", "prefs_train.jsonl", "prefs_eval.jsonl", "prompts_train.jsonl", "prompts_eval.jsonl",
         "task.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "base/config.json",
         "base/model.safetensors", "base/tokenizer.json"}
NAMES = sorted(TASKS)
# the README's tasks outside the suite: not registered, held to the same rules; their judges are
# "module:function" references on this path, as `PYTHONPATH=docs/task_plugins` gives them
PLUGIN_DIR = Path(__file__).resolve().parents[1] / "docs" / "task_plugins"
sys.path.insert(0, str(PLUGIN_DIR))
DOC_TASKS = {spec.name: spec
             for spec in (importlib.import_module(p.stem).SPEC for p in sorted(PLUGIN_DIR.glob("*_task.py")))}
SPECS = {**TASKS, **DOC_TASKS}
SPEC_NAMES = sorted(SPECS)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", params=NAMES)
def made(request, tmp_path_factory):
    """(spec, directory made with seed 0) for every task, plus a second copy and another seed."""
    name = request.param
    root = tmp_path_factory.mktemp(f"suite-{name}")
    for sub, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_task(TaskConfig(task=name, seed=seed, **SMALL), root / sub)
    return get_task(name), root


# ---------------------------------------------------------------- registry

def test_registry_lists_at_least_four_tasks_with_the_bundled_default():
    assert DEFAULT_TASK == "bundled" and TaskConfig().task == "bundled"
    assert len(TASKS) >= 4
    lines = task_list_lines()
    assert lines == list_tasks() and len(lines) == len(TASKS)
    assert [line.split()[0] for line in lines] == list(TASKS)
    assert all(len(line.split(None, 1)) == 2 for line in lines)            # name, then a description
    assert get_task("tribune-bundled-v1") is TASKS["bundled"]               # the task.json id names it too
    with pytest.raises(UnknownTaskError, match="arithmetic"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown task"):
        TaskConfig(task="nope")


def test_base_models_vary_across_tasks():
    archs = {spec.model.arch for spec in TASKS.values()}
    assert {"llama", "gpt2"} <= archs and len(archs) >= 3


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_prompts_are_disjoint_across_tasks(name):
    """A prompt names its task: every other task's judge rejects it."""
    spec, rng = SPECS[name], random.Random(3)
    prompts = [spec.sample_prompt(rng) for _ in range(300)]
    assert name not in TASKS or task_for_prompts(prompts) is spec
    for other in SPECS.values():
        if other is not spec:
            assert not any(other.accepts(p) for p in prompts), (name, other.name)
            with pytest.raises(ValueError):
                other.gold_score(prompts[0], "x")


# ---------------------------------------------------------------- the gold judge

@pytest.mark.parametrize("name", SPEC_NAMES)
def test_judge_is_importable_by_reference(name):
    spec = SPECS[name]
    assert spec.load_judge() is spec.gold_score is load_judge(spec.judge)


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_examples_and_perfect_demonstrations_score_one(name):
    spec, rng = SPECS[name], random.Random(0)
    assert spec.examples
    for prompt, answer in spec.examples:
        assert spec.gold_score(prompt, answer) == 1.0, (prompt, answer)
    for _ in range(300):
        p = spec.sample_prompt(rng)
        assert spec.gold_score(p, spec.demonstrate(p, rng, 1.0, spec.flaws)) == 1.0, p


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_flaw_scores_below_perfect_and_empty_scores_low(name):
    spec, rng = SPECS[name], random.Random(1)
    for flaw in spec.flaws:
        for _ in range(200):
            p = spec.sample_prompt(rng)
            r = spec.demonstrate(p, rng, 0.0, {flaw: 1.0})
            assert spec.gold_score(p, r) < 1.0, (flaw, p, r)
        assert spec.gold_score(p, "") <= 0.0


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_exploit_is_rare_in_preferences_absent_from_demonstrations(name):
    spec = SPECS[name]
    assert spec.exploit in spec.flaws and spec.exploit not in spec.sft_flaws
    assert spec.flaws[spec.exploit] == min(spec.flaws.values()) and spec.flaws[spec.exploit] <= 0.15
    assert spec.exploit_note


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_judge_never_raises_on_arbitrary_responses(name):
    spec, rng = SPECS[name], random.Random(2)
    words = sorted({w for s in SPECS.values() for w in s.vocabulary()}) + ["<eos>", "<pad>", "", "Moon!", "12"]
    for _ in range(500):
        p = spec.sample_prompt(rng)
        r = " ".join(rng.choice(words) for _ in range(rng.randint(0, 16)))
        score = spec.gold_score(p, r)
        assert isinstance(score, float) and score <= 1.0


def test_arithmetic_judge():
    g = TASKS["arithmetic"].gold_score
    assert g("add seven and eight", "fifteen") == 1.0
    assert g("add twelve and nine", "twenty one") == 1.0
    assert g("subtract three from eleven", "eight") == 1.0
    assert g("add seven and eight", "sixteen") == pytest.approx(0.75)      # close answers get partial credit
    assert g("add seven and eight", "twenty five") == 0.0
    assert g("add seven and eight", "") == -0.5
    hedges = [g("add seven and eight", " ".join(["fifteen", "sixteen", "fourteen", "seventeen"][:k]))
              for k in range(1, 5)]
    assert hedges == sorted(hedges, reverse=True) and hedges[0] == 1.0 and hedges[1] == 0.5   # hedging: exploit


def test_sequence_judge():
    g = TASKS["sequence"].gold_score
    assert g("reverse c a f", "f a c") == 1.0 and g("sort d b e a", "a b d e") == 1.0
    assert g("reverse c a f", "f c a") == pytest.approx(1 / 3)              # per-position credit
    assert g("reverse c a f", "f a") == pytest.approx(2 / 3)
    assert g("reverse c a f", "c a f") == pytest.approx(1 / 3)             # echo: the middle letter is right
    overruns = [g("reverse c a f", " ".join("f a c c a f".split()[:k])) for k in range(3, 7)]
    assert overruns == sorted(overruns, reverse=True) and overruns[1] == 0.5    # overrun: exploit


def test_keyword_judge():
    g = TASKS["keyword"].gold_score
    assert g("write four words using moon", "moon over quiet hill") == 1.0
    assert g("write four words using moon", "over quiet hill sky") == 0.5             # keyword missing
    assert g("write four words using moon", "moon over hill") == pytest.approx(0.6)   # one word short
    assert g("write four words using moon", "moon over hill hill") == 0.5             # a repeat
    spam = [g("write four words using moon", " ".join(["moon"] * k + ["over", "quiet", "hill"][k - 1:]))
            for k in range(1, 5)]
    assert spam == sorted(spam, reverse=True) and spam[0] == 1.0 and spam[1] == 0.5   # keyword spam: exploit
    assert g("write four words using moon", "moon moon moon moon moon moon") < 0


def test_style_judge():
    g = TASKS["style"].gold_score
    assert g("greet anna formally", "good morning anna") == 1.0
    assert g("greet anna formally", "hey there anna") == pytest.approx(0.475)   # wrong register
    assert g("apologise mia formally", "my bad mia") == pytest.approx(0.475)    # shared word, wrong phrase
    assert g("greet anna formally", "good morning") == pytest.approx(0.7)       # no name
    gush = [g("greet anna formally", " ".join("good morning anna good evening good day".split()[:k]))
            for k in (3, 5, 7)]
    assert gush == sorted(gush, reverse=True) and gush[0] == 1.0 and gush[1] == pytest.approx(0.4)   # exploit


# ---------------------------------------------------------------- the demonstrator and the raters

@pytest.mark.parametrize("name", SPEC_NAMES)
def test_demonstrator_leaves_headroom(name):
    spec = SPECS[name]
    rng = random.Random(0)
    prompts = [spec.sample_prompt(rng) for _ in range(2000)]
    scores = [spec.gold_score(p, spec.demonstrate(p, rng, spec.p_correct, spec.sft_flaws)) for p in prompts]
    mean = sum(scores) / len(scores)
    assert 0.35 < mean < 0.85, mean


# ---------------------------------------------------------------- task make

def test_task_make_is_byte_identical_per_seed(made):
    spec, root = made
    a, b, c = _digests(root / "a"), _digests(root / "b"), _digests(root / "c")
    assert FILES <= set(a), set(a)
    assert a == b
    for data in ("sft.jsonl", "prefs_train.jsonl", "prompts_eval.jsonl", "base/model.safetensors"):
        assert a[data] != c[data], data
    assert a["tokenizer/tokenizer.json"] == c["tokenizer/tokenizer.json"]


def test_task_json_names_the_task_and_its_judge(made):
    spec, root = made
    summary = json.loads((root / "a" / "task.json").read_text())
    assert summary["task"] == spec.task_id and get_task(summary["task"]) is spec
    assert summary["task_name"] == spec.name and summary["config"]["task"] == spec.name
    assert load_judge(summary["gold_judge"]) is spec.gold_score
    assert summary["base_architecture"] == spec.model.arch
    assert summary["base_parameters"] <= 1_000_000
    assert summary["files"]["sft.jsonl"] == SMALL["sft_size"]
    assert None not in summary["config"].values()                          # task defaults are resolved
    cfg = json.loads((root / "a" / "base" / "config.json").read_text())
    assert cfg["model_type"] == spec.model.arch and cfg.get("bos_token_id") is None


def test_prompts_and_data_belong_to_the_task_and_fit_the_model(made):
    spec, root = made
    d = root / "a"
    for row in _rows(d / "prompts_eval.jsonl") + _rows(d / "prompts_train.jsonl"):
        assert isinstance(spec.gold_score(row["prompt"], ""), float)        # accepted by the judge
    sft = _rows(d / "sft.jsonl")
    assert all(len(r["prompt"].split()) <= 10 and len(r["response"].split()) <= 12 for r in sft)
    prefs = _rows(d / "prefs_train.jsonl")
    assert {len(r["ranking"]) if "ranking" in r else 2 for r in prefs} == {2, 3, 4}
    assert all(len(c.split()) <= 12 for r in prefs for c in r.get("ranking", [r.get("chosen"), r.get("rejected")]))


def test_preference_labels_follow_gold_mostly_but_not_always(made):
    spec, root = made
    rows = _rows(root / "a" / "prefs_train.jsonl")
    pairs = [(spec.gold_score(r["prompt"], r["chosen"]), spec.gold_score(r["prompt"], r["rejected"]))
             for r in rows if "chosen" in r]
    decided = [c > r for c, r in pairs if c != r]
    agreement = sum(decided) / len(decided)
    assert 0.7 < agreement < 1.0, agreement                                  # noisy raters


def test_tokenizer_in_base_encodes_like_tokenizer_dir(made):
    from transformers import AutoTokenizer

    spec, root = made
    d = root / "a"
    tok, base = AutoTokenizer.from_pretrained(d / "tokenizer"), AutoTokenizer.from_pretrained(d / "base")
    assert type(tok) is type(base)
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token is None and base.bos_token is None
    texts = [r["prompt"] + " " + r["response"] for r in _rows(d / "sft.jsonl")] + ["zebra " + spec.examples[0][0]]
    assert [tok(t).input_ids for t in texts] == [base(t).input_ids for t in texts]
    assert all(tok.unk_token_id not in tok(t).input_ids for t in texts[:-1])   # the vocabulary covers the data
    assert tok.decode(tok(spec.examples[0][1]).input_ids) == spec.examples[0][1]


def test_base_model_scores_a_left_padded_row_like_the_unpadded_one(made):
    """Positions from the mask make padding invisible, for every architecture (GPT-2 included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, root = made
    d = root / "a"
    tok = AutoTokenizer.from_pretrained(d / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(d / "base").eval()
    ids = tok(spec.examples[0][0] + " " + spec.examples[0][1]).input_ids
    padded = torch.tensor([[tok.pad_token_id] * 3 + ids])
    mask = (torch.arange(padded.shape[1]) >= 3).long()[None]
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([ids])).logits[0]
        left = model(input_ids=padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[0, 3:]
    assert torch.allclose(plain, left, atol=1e-4)
