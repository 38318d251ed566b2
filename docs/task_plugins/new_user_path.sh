#!/bin/bash
# Usage: docs/task_plugins/new_user_path.sh TASK OUT [task make options], e.g. translate runs/heldout --prefs-train-size 3100
# (TRIBUNE=.venv/bin/tribune when the venv is not active). Prints the last line of sft, train-rm and ppo.
# The issue's new-user path, every setting at its default: task make → sft → train-rm → export → serve → PPO
# SFT_ARGS='--epochs 1 --learning-rate 1e-3 --no-keep-best --early-stopping-patience none --evals-per-epoch 0' trains πSFT the
# way `tribune sft` did before its defaults became the pipeline's. ITERATIONS (default 30) sets PPO's iterations;
# ITERATIONS=default leaves them to `tribune ppo`'s own default. PPO_ARGS adds options to `tribune ppo`.
set -e
if [ $# -lt 2 ]; then echo "usage: $0 TASK OUT [task make options]" >&2; exit 2; fi
TASK=$1; OUT=$2; shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" TRIBUNE_TASKS=${TRIBUNE_TASKS:-translate_task:SPEC,count_task:SPEC,repeat_task:SPEC}
TR=${TRIBUNE:-tribune}
ITERATIONS=${ITERATIONS:-30}
if [ "$ITERATIONS" = default ]; then PPO_ITERS=(); else PPO_ITERS=(--iterations "$ITERATIONS"); fi
mkdir -p $OUT
$TR task make $OUT/task --task $TASK "$@" > $OUT/task.log 2>&1
JUDGE=$(python3 -c "import json;print(json.load(open('$OUT/task/task.json'))['gold_judge'])")
echo "judge $JUDGE"
$TR sft --model $OUT/task/base --train $OUT/task/sft.jsonl --output $OUT/sft --judge $JUDGE $SFT_ARGS > $OUT/sft.json 2> $OUT/sft.err
$TR train-rm --model $OUT/sft --train $OUT/task/prefs_train.jsonl --eval $OUT/task/prefs_eval.jsonl --output $OUT/rm --judge $JUDGE > $OUT/rm.json 2> $OUT/rm.err
$TR export --reward $OUT/rm --reference $OUT/sft --output $OUT/repo > /dev/null 2> $OUT/export.err
read PORT HP MP < <(python3 -c "
import socket
ss=[socket.socket() for _ in range(3)]
[s.bind(('127.0.0.1',0)) for s in ss]
print(*[s.getsockname()[1] for s in ss])")
$TR serve --repository $OUT/repo --grpc-port $PORT --http-port $HP --metrics-port $MP > $OUT/serve.log 2>&1 &
SERVE=$!
trap "kill $SERVE" EXIT
$TR ppo --policy $OUT/sft --prompts $OUT/task/prompts_train.jsonl --eval-prompts $OUT/task/prompts_eval.jsonl --reward-url 127.0.0.1:$PORT --reference-url 127.0.0.1:$PORT --output $OUT/ppo "${PPO_ITERS[@]}" --judge $JUDGE $PPO_ARGS > $OUT/ppo.json 2> $OUT/ppo.err
tail -1 $OUT/sft.err; tail -1 $OUT/rm.err; tail -1 $OUT/ppo.err
