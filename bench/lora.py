"""LoRA, bf16 autocast and gradient checkpointing against full fp32 fine-tuning, on one model.

    python bench/lora.py --output bench/results [--hidden 512 --layers 8 --steps 5]

Each setting runs in its own process (peak resident memory, ``ru_maxrss``, is a process-wide
high-water mark) on the same seeded random-weight Llama: the SFT loss of ``tribune.trainer.sft``
(forward, backward, AdamW step) through the same ``prepare_model`` and accelerate set-up the
training commands use. Reports trainable parameters, the median step time after a warm-up,
and the peak memory above the process's baseline before the model was built.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402

SETTINGS = {
    "full_fp32": {},
    "lora_fp32": {"lora_r": 8},
    "full_bf16": {"mixed_precision": "bf16"},
    "lora_bf16": {"lora_r": 8, "mixed_precision": "bf16"},
    "full_fp32_checkpointing": {"gradient_checkpointing": True},
    "lora_fp32_checkpointing": {"lora_r": 8, "gradient_checkpointing": True},
}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB


def one(setting: str, args) -> dict:
    """One setting in this process: steps of the SFT loss; returns its figures."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tribune.trainer.adapters import MemoryConfig, prepare_model, trainable_parameters
    from tribune.trainer.run import make_accelerator
    from tribune.trainer.sft import response_nll

    torch.manual_seed(0)
    baseline = _maxrss_mb()
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.length)
    model = LlamaForCausalLM(cfg)
    memory = MemoryConfig(**SETTINGS[setting])
    prepare_model(model, memory, name=setting)
    trainable, total = trainable_parameters(model)
    acc = make_accelerator(memory.mixed_precision or "no")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, opt = acc.prepare(model, opt)
    model.train()
    ids = torch.randint(3, args.vocab, (args.batch, args.length))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :args.length // 4] = -100
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = response_nll(model, ids, mask, labels)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"trainable_parameters": trainable, "total_parameters": total,
            "trainable_share": round(trainable / total, 5), "median_step_s": round(statistics.median(times), 4),
            "step_s": [round(t, 4) for t in times], "peak_rss_above_baseline_mb": round(_maxrss_mb() - baseline, 1),
            "final_loss": round(float(loss.detach()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path, default=Path("bench/results"))
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--one", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    results = {}
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("hidden", "layers", "vocab", "length", "batch", "steps",
                                                          "warmup")]
    for setting in SETTINGS:
        proc = subprocess.run([sys.executable, __file__, "--one", setting, *passthrough], capture_output=True,
                              text=True, check=True)
        results[setting] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(setting, results[setting]["median_step_s"], "s/step", flush=True)
    full = results["full_fp32"]
    write_result(args.output, "lora", {
        "command": "python bench/lora.py " + " ".join(passthrough),
        "model": {"arch": "llama", "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "batch": args.batch, "length": args.length},
        "settings": results,
        "relative_to_full_fp32": {s: {"step_time": round(r["median_step_s"] / full["median_step_s"], 3),
                                      "peak_memory": round(r["peak_rss_above_baseline_mb"]
                                                           / max(full["peak_rss_above_baseline_mb"], 1e-9), 3)}
                                  for s, r in results.items()}})


if __name__ == "__main__":
    main()
