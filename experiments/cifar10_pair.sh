#!/usr/bin/env bash
# The paired CIFAR-10 experiment: MOKD and independent training (lambda 0), identical in everything else
# (seed, data order, initial weights, augmentations), side by side on one device; then k-NN (k = 20, 200)
# and a cached-feature linear probe of all four teachers on the test set.
#
#   bash experiments/cifar10_pair.sh DATA OUT_DIR [EPOCHS] [extra mokd.py flags...]
#   DATA: cifar10 (torchvision's CIFAR-10 in DATA_ROOT, default data/, downloaded there once if missing), or a folder
#   holding train/ and test/ in ImageFolder layout (e.g. CIFAR-10 as JPEGs).
#   PYTHON=/path/to/python picks the interpreter (default: python).
#   TRAIN_DEADLINE_S=N stops both runs N seconds after both have logged their first step (SIGTERM: each finishes
#   its step, saves and exits), then evaluates what they reached: a guard for a fixed time budget. The runs may then
#   differ in steps; the table reports each run's step count.
set -euo pipefail
data=${1:?usage: bash experiments/cifar10_pair.sh DATA_DIR OUT_DIR [EPOCHS] [flags...]}
out=${2:?usage: bash experiments/cifar10_pair.sh DATA_DIR OUT_DIR [EPOCHS] [flags...]}
epochs=${3:-100}
shift $(( $# < 3 ? $# : 3 ))
here=$(cd "$(dirname "$0")/.." && pwd)  # the repository root
py=${PYTHON:-python}
if [ -n "${TRAIN_DEADLINE_S:-}" ] && ! [[ "$TRAIN_DEADLINE_S" =~ ^[0-9]+$ && "$TRAIN_DEADLINE_S" -gt 0 ]]; then
    echo "error: TRAIN_DEADLINE_S must be a whole number of seconds > 0, got '$TRAIN_DEADLINE_S'" >&2
    exit 2
fi
mkdir -p "$out"

if [ "$data" = cifar10 ]; then  # fetched (or checked) once here: the two runs must not download at the same time
    root=${DATA_ROOT:-data}
    PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$py" - "$root" <<'PY' || exit 2
import sys
import mokd
try:
    for split in ("ssl", "test"):
        mokd.open_images("cifar10", "DATA", split, sys.argv[1])
except mokd.MOKDError as e:
    sys.exit(f"error: {e}")
PY
    train=(--data-path cifar10 --data-root "$root")
    evaluate=(--train-path cifar10 --val-path cifar10 --data-root "$root")
else
    train=(--data-path "$data/train")
    evaluate=(--train-path "$data/train" --val-path "$data/test")
fi

# The CIFAR-10 recipe (README, "CIFAR-10 recipe"); its warm-ups keep the authors' share of EPOCHS.
recipe=(--recipe cifar10 "${train[@]}" --epochs "$epochs" --log-every 20 "$@")

start=$(date +%s)
"$py" "$here/mokd.py" "${recipe[@]}" --output-dir "$out/mokd" > "$out/mokd.log" 2>&1 &
p1=$!
"$py" "$here/mokd.py" "${recipe[@]}" --lambda-a 0 --lambda-b 0 --output-dir "$out/independent" > "$out/independent.log" 2>&1 &
p2=$!
watchdog=
if [ -n "${TRAIN_DEADLINE_S:-}" ]; then
    # Killed early, the watchdog takes its sleep with it; the sleep never holds the caller's output pipes open.
    # The clock starts once both runs have logged their first step: start-up time (imports, data) never counts.
    ( trap 'kill $s 2>/dev/null; exit 0' TERM
      until [ -s "$out/mokd/log.jsonl" ] && [ -s "$out/independent/log.jsonl" ]; do
          sleep 1 </dev/null >/dev/null 2>&1 & s=$!; wait $s
      done
      sleep "$TRAIN_DEADLINE_S" </dev/null >/dev/null 2>&1 & s=$!; wait $s
      echo "TRAIN_DEADLINE_S=$TRAIN_DEADLINE_S reached: stopping both runs" >&2
      kill -TERM "$p1" "$p2" 2>/dev/null ) &
    watchdog=$!
    disown "$watchdog"  # out of the job table: `wait -n` below must wait for the two runs, not for the watchdog
fi
status=0  # the first run to fail stops the other (SIGTERM: it saves its checkpoint and exits)
wait -n || { status=$?; kill "$p1" "$p2" 2>/dev/null || true; }
wait -n || status=$(( status ? status : $? ))
[ -z "$watchdog" ] || kill "$watchdog" 2>/dev/null || true
if [ "$status" -ne 0 ]; then
    echo "a training run failed; see $out/mokd.log and $out/independent.log" >&2
    tail -n 5 "$out/mokd.log" "$out/independent.log" >&2
    exit "$status"
fi
for run in mokd independent; do
    if [ ! -f "$out/$run/checkpoint.pth" ]; then
        echo "the $run run was stopped before its first step (no checkpoint); see $out/$run.log" >&2
        exit 1
    fi
done
echo "training took $(( $(date +%s) - start )) s" | tee "$out/times.txt"

# The four teachers one after another: four at once stalled for over 8 minutes on a 16-core H200 machine (their
# probes then ran on the CPU, oversubscribing its threads); one takes about 20 s there. Each extracts its features
# once for the k-NN and the probe.
rm -f "$out/eval.jsonl"
for run in mokd independent; do
    for m in a b; do
        "$py" "$here/eval_linear.py" --checkpoint "$out/$run/checkpoint.pth" --model "$m" --knn --nb-knn 20 200 \
            --temperature 0.07 --cached-features --epochs 100 "${evaluate[@]}" \
            --batch-size-per-gpu 512 > "$out/eval_${run}_$m.log" 2>&1 \
            || { echo "evaluation of $run model $m failed; see $out/eval_${run}_$m.log" >&2; tail -n 5 "$out/eval_${run}_$m.log" >&2; exit 1; }
        tail -n 1 "$out/eval_${run}_$m.log" | sed "s/^/{\"run\": \"$run\", \"eval\": /; s/\$/}/" >> "$out/eval.jsonl"
    done
done
echo "total $(( $(date +%s) - start )) s" | tee -a "$out/times.txt"
"$py" - "$out" <<'PY'
import json, math, os, sys, torch
out = sys.argv[1]
rows = [json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))]
print(f"{'run':<12}{'model':<10}{'steps':>7}{'k-NN k=20':>10}{'k=200':>8}{'linear':>8}")
for run in ("independent", "mokd"):
    steps = torch.load(os.path.join(out, run, "checkpoint.pth"), map_location="cpu", weights_only=True,
                       mmap=True)["global_step"]  # mmap: the weights are not read
    for r in sorted((r["eval"] for r in rows if r["run"] == run), key=lambda e: e["model"]):
        knn, lin = r["knn"], r["linear"]["best_top1"]
        print(f"{run:<12}{r['arch']:<10}{steps:>7}{knn['20']['top1']:>10.2f}{knn['200']['top1']:>8.2f}{lin:>8.2f}")
# The loss curves: each term's mean over the logged steps of each epoch (cross terms are null with lambda 0).
# H = teacher entropy, Hb = entropy of its batch mean. Collapse to uniform: H near log K; onto one prototype: Hb
# near 0; a healthy run has H well below log K and Hb near it.
K = json.load(open(os.path.join(out, "mokd", "config.json")))["config"]["out_dim"]
keys = [f"{m}.{k}" for m in "ab" for k in ("L_sm", "L_st", "L_cm", "L_ct", "entropy", "batch_entropy")]
print(f"\nper-epoch means from log.jsonl; H = teacher entropy, Hb = of its batch mean, log K = {math.log(K):.3f}")
names = [k.replace("batch_entropy", "Hb").replace("entropy", "H") for k in keys]
print(f"{'run':<12}{'epoch':>5} | " + " ".join(f"{k:>7}" for k in names))
for run in ("independent", "mokd"):
    recs = [json.loads(line) for line in open(os.path.join(out, run, "log.jsonl"))]
    for ep in sorted({r["epoch"] for r in recs}):
        rs = [r for r in recs if r["epoch"] == ep]
        cells = [sum(r[k] for r in rs) / len(rs) if rs[0][k] is not None else None for k in keys]
        print(f"{run:<12}{ep:>5} | " + " ".join(f"{c:>7.3f}" if c is not None else f"{'-':>7}" for c in cells))
PY
