#!/usr/bin/env bash
# Does an output_dir written by an earlier revision still resume under this working tree?
#
#   bash bench/resume_from_revision.sh REV        (e.g. a tag or commit before a restructuring)
#
# Builds a tiny random-weight pair, runs `lightreasoner run` (sampling, training, evaluation and
# the rejection-sampled SFT baseline) with REV's code, then again with this tree's, and prints
# what the second run reused and every report.json entry that differs (only this invocation's
# timings and resume counters should). Needs git history, this repository's .venv, and
# ../shared/data/benchmarks. A few minutes on 2 CPU cores.
set -euo pipefail
REV=${1:?usage: bench/resume_from_revision.sh REV}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
OLD="$WORK/old"
trap 'git -C "$HERE" worktree remove --force "$OLD" >/dev/null 2>&1 || true' EXIT
. "$HERE/.venv/bin/activate"
git -C "$HERE" worktree add -q --detach "$OLD" "$REV"
ln -s "$(cd "$HERE/.." && pwd)/shared" "$WORK/shared"
cd "$HERE"
python - "$WORK/pair" <<'PY'
import json, sys
from lightreasoner_ray.toy.tiny_models import TinyModelSpec, save_pair
rows = [json.loads(line) for line in open("../shared/data/benchmarks/gsm8k/train.jsonl")][:400]
texts = [text for row in rows for text in (row["question"], row["answer"])]
save_pair(sys.argv[1], texts,
          TinyModelSpec(hidden_size=64, num_layers=2, initializer_range=0.08, vocab_padding=2, seed=1),
          TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                        initializer_range=0.08, vocab_padding=6, seed=2), vocab_size=600)
PY
ARGS=(--config configs/tiny.yaml "expert.path=$WORK/pair/expert" "amateur.path=$WORK/pair/amateur"
      "output_dir=$WORK/out" data.limit=4 sampling.beta=0.01 train.max_steps=2 train.checkpoint_every=1 eval.limit=2
      rejection_sft.enabled=true rejection_sft.samples_per_problem=2 rejection_sft.max_new_tokens=16 rejection_sft.max_steps=2)
echo "== $REV"
# From its own directory: `python -m` puts the working directory first on sys.path.
(cd "$OLD" && PYTHONPATH="$OLD" python -m lightreasoner_ray.cli run "${ARGS[@]}" > "$WORK/old.log" 2>&1)
cp "$WORK/out/report.json" "$WORK/report.before.json"
echo "== this tree"
python -m lightreasoner_ray.cli run "${ARGS[@]}" > "$WORK/new.log" 2>&1
grep -hE "already|skipped|reus|refus" "$WORK"/out/logs/run-*.log | tail -n 8 | cut -c 25-
python - "$WORK/report.before.json" "$WORK/out/report.json" <<'PY'
import json, sys
before, after = (json.load(open(path)) for path in sys.argv[1:3])
def walk(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            walk(a.get(key), b.get(key), f"{path}.{key}")
    elif a != b:
        print(f"differs: {path}: {a!r} -> {b!r}"[:160])
walk(before, after)
PY
echo "outputs in $WORK"
