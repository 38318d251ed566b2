"""`tribune`: the one console script. Each subcommand is a config dataclass + a function.

Each subcommand's config dataclass is its option list and its --help text. The command
line is lazy: only the chosen subcommand's modules are imported, so `tribune gateway`
and `tribune score --help` load no torch. User errors (bad flags, bad files, refused
connections) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import dataclass

from tribune.services.common.config import add_config_arguments, config_from_args
from tribune.services.common.console import setup_console
from tribune.services.common.errors import UserError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: str      # "module:ConfigClass"
    run: str         # "module:function(config) -> dict | None"
    own_summary: bool = False   # prints its own summary last (its result is in the files it names)


COMMANDS: list[Command] = [
    Command("sft", "supervised fine-tuning of a causal LM", "tribune.trainer.sft:SFTConfig", "tribune.trainer.sft:run_sft"),
    Command("train-rm", "train a Bradley-Terry reward model from the SFT model",
            "tribune.trainer.reward:RewardConfig", "tribune.trainer.reward:run_train_rm"),
    Command("collect", "sample k responses per prompt from a policy, for raters to rank",
            "tribune.trainer.collect:CollectConfig", "tribune.trainer.collect:run_collect"),
    Command("label", "candidates into preference rows: a simulated rater, a labelling page, or Label Studio",
            "tribune.trainer.label:LabelConfig", "tribune.trainer.label:run_label"),
    Command("export", "export the reward model and reference policy to a Triton model repository",
            "tribune.trainer.export:ExportConfig", "tribune.trainer.export:run_export"),
    Command("serve", "serve a model repository with the embedded Triton server (PyTriton + ONNX Runtime)",
            "tribune.services.serve:ServeConfig", "tribune.services.serve:run_serve"),
    Command("score", "score a JSONL of prompt/response pairs through the reward service",
            "tribune.services.score:ScoreConfig", "tribune.services.score:run_score"),
    Command("ppo", "PPO against remote reward and reference services", "tribune.trainer.ppo_config:PPOConfig",
            "tribune.trainer.ppo:run_ppo"),
    Command("gateway", "the gRPC text API (tribune.v1.RewardService) in front of Triton",
            "tribune.services.gateway_core:GatewayConfig", "tribune.services.gateway:run_gateway"),
    Command("demo", "the whole pipeline on the bundled task", "tribune.trainer.demo:DemoConfig", "tribune.trainer.demo:run_demo",
            own_summary=True),
    Command("evaluate", "the whole pipeline with default settings on every suite task: a JSON table and a PNG",
            "tribune.trainer.evaluate:EvaluateConfig", "tribune.trainer.evaluate:run_evaluate", own_summary=True),
]
TASK_MAKE = Command("make", "write a task (tokenizer, tiny base model, data)", "tribune.trainer.task.make:TaskConfig",
                    "tribune.trainer.cli:task_make")
TASK_LIST = Command("list", "the tasks of the suite and plugged-in ones, one per line (name first)", "",
                    "tribune.trainer.cli:task_list")


def task_make(cfg, out: str) -> dict:
    from pathlib import Path

    from tribune.trainer.task.make import make_task

    return make_task(cfg, Path(out))


def task_list() -> None:
    from tribune.trainer.task.registry import task_list_lines

    print("\n".join(task_list_lines()))


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _chosen(argv: list[str]) -> list[str]:
    """The command words in argv (e.g. ["task", "make"]), found without parsing options."""
    words = [a for a in argv if not a.startswith("-")]
    names = {c.name for c in COMMANDS} | {"task"}
    if not words or words[0] not in names:
        return []
    return words[:2] if words[0] == "task" else words[:1]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Given ``argv``, only the subcommand it names gets its options (and imports
    its config); without, every subcommand does (for tools that inspect the whole CLI)."""
    chosen = _chosen(argv) if argv is not None else None
    parser = argparse.ArgumentParser(prog="tribune", description="RLHF with reward models and reference "
                                     "policies served through Triton, and a PPO trainer that uses them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the libraries' own output "
                        "(load reports, progress bars, warnings) on the console")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    task = sub.add_parser("task", help="the task suite: list the tasks, or make one")
    task_sub = task.add_subparsers(dest="task_command", required=True, metavar="ACTION")
    for cmd in (TASK_MAKE, TASK_LIST):
        p = task_sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if chosen in (None, ["task", cmd.name]) and cmd.config:
            p.add_argument("out", help="output directory")
            add_config_arguments(p, _load(cmd.config))
        p.set_defaults(_config=cmd.config, _run=cmd.run)

    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if chosen in (None, [cmd.name]):
            add_config_arguments(p, _load(cmd.config))
        p.set_defaults(_config=cmd.config, _run=cmd.run, _own_summary=cmd.own_summary)
    return parser


# the figures a command's last line shows, when its result has them
HEADLINE = ("eval_loss", "eval_accuracy", "eval_gold_accuracy", "gold_score", "objective/kl", "gold/score")


def summary_line(command: str, result: dict, seconds: float) -> str:
    """The one line a command ends with: how long it took and its headline figures."""
    shown = [f"{k} {result[k]:.4g}" for k in HEADLINE if isinstance(result.get(k), (int, float))]
    return f"tribune {command}: done in {seconds:.1f} s" + (f"; {', '.join(shown)}" if shown else "")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(argv)           # imports the chosen command's config (a broken task plug-in says so)
    except UserError as e:
        print(f"tribune: error: {e}", file=sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    setup_console(args.verbose)
    t0 = time.perf_counter()
    try:
        run = _load(args._run)
        if not args._config:
            result = run()
        else:
            cfg = config_from_args(_load(args._config), args)
            result = run(cfg, args.out) if hasattr(args, "out") else run(cfg)
    except UserError as e:
        print(f"tribune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tribune {args.command}: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, dict) and not getattr(args, "_own_summary", False):
        # the result on stdout (for scripts), then the summary as the console's last line
        print(json.dumps(result, indent=2, sort_keys=True, default=str), flush=True)
        print(summary_line(args.command, result, time.perf_counter() - t0), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
