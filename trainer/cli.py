"""`tribune`: the one console script. Each subcommand is a config dataclass + a function.

Each subcommand's config dataclass is its option list and its --help text.
User errors (bad flags, bad files, refused connections) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from dataclasses import dataclass
from typing import Callable

from trainer.config import add_config_arguments, config_from_args
from trainer.errors import UserError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: str      # "module:ConfigClass"
    run: str         # "module:function(config) -> dict | None"


COMMANDS: list[Command] = [
    Command("sft", "supervised fine-tuning of a causal LM", "trainer.sft:SFTConfig", "trainer.sft:run_sft"),
    Command("train-rm", "train a Bradley-Terry reward model from the SFT model",
            "trainer.reward:RewardConfig", "trainer.reward:run_train_rm"),
    Command("export", "export the reward model and reference policy to a Triton model repository",
            "services.export:ExportConfig", "services.export:run_export"),
    Command("serve", "serve a model repository with the embedded Triton server (PyTriton + ONNX Runtime)",
            "services.serve:ServeConfig", "services.serve:run_serve"),
    Command("score", "score a JSONL of prompt/response pairs through the reward service",
            "services.score:ScoreConfig", "services.score:run_score"),
    Command("ppo", "PPO against remote reward and reference services", "trainer.ppo:PPOConfig",
            "trainer.ppo:run_ppo"),
    Command("gateway", "the gRPC text API (tribune.v1.RewardService) in front of Triton",
            "services.gateway_core:GatewayConfig", "services.gateway:run_gateway"),
    Command("demo", "the whole pipeline on the bundled task", "trainer.demo:DemoConfig", "trainer.demo:run_demo"),
]
def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tribune", description="RLHF with reward models and reference "
                                     "policies served through Triton, and a PPO trainer that uses them.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    task = sub.add_parser("task", help="the bundled synthetic task")
    task_sub = task.add_subparsers(dest="task_command", required=True, metavar="ACTION")
    make = task_sub.add_parser("make", help="write the bundled task (tokenizer, tiny base model, data)")
    make.add_argument("out", help="output directory")
    add_config_arguments(make, _load("trainer.task.make:TaskConfig"))
    make.set_defaults(_config="trainer.task.make:TaskConfig", _run=_run_task_make)

    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        add_config_arguments(p, _load(cmd.config))
        p.set_defaults(_config=cmd.config, _run=cmd.run)
    return parser


def _run_task_make(cfg, args) -> dict:
    from pathlib import Path

    from trainer.task.make import make_task

    return make_task(cfg, Path(args.out))


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="[tribune] %(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    setup_logging(args.verbose)
    try:
        cfg = config_from_args(_load(args._config), args)
        run: Callable = args._run if callable(args._run) else _load(args._run)
        result = run(cfg, args) if run is _run_task_make else run(cfg)
    except UserError as e:
        print(f"tribune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tribune {args.command}: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
