#!/usr/bin/env bash
# The checks that need a GPU, in steps that fit a lent machine's calls (each call at most 10 minutes):
#
#   bash experiments/gpu_check.sh launch OUT                # the CUDA launch paths: torchrun with one process (nccl,
#                                                           # DDP and SyncBatchNorm wrappers, bf16) and fp16 with its
#                                                           # grad scalers: 20 steps, a resume to step 30, finite losses
#   bash experiments/gpu_check.sh bench OUT [eager|compile] # benchmark.py at the README's two settings, bf16
#   bash experiments/gpu_check.sh pair OUT EPOCHS TRAIN_S   # starts the CIFAR-10 pair (experiments/cifar10_pair.sh) in
#                                                           # the background: EPOCHS-epoch schedules, training stopped
#                                                           # after TRAIN_S seconds at the latest, then evaluations
#   bash experiments/gpu_check.sh wait OUT SECONDS          # follows the pair; returns when it ends or after SECONDS
#
# A short lease: `pair` first (about 38 s per epoch for the pair on an H200 with 16 cores; the four evaluations take
# about 2 minutes), `wait` in the calls that follow, `launch` and `bench` once the pair has finished (run beside it they
# would slow it and be slowed). Everything lands under OUT; each step ends with a summary on stdout.
# OUT must outlive a call (e.g. output/gpu, git-ignored; not the device's $OUT, which each call empties): end the last
# call with `cp -r output/gpu "$OUT"/` to bring the logs back.
# DATA: a folder holding train/ and test/ (default data/cifar10, unpacked from data/cifar10.tgz when that exists:
# `tar czf data/cifar10.tgz -C ../shared/data cifar10`). DEVICE=cpu rehearses every step on a CPU with tiny settings
# (fp16 and --compile are skipped there). PYTHON picks the interpreter (default: python).
set -euo pipefail
usage="usage: bash experiments/gpu_check.sh launch|bench|pair|wait OUT [...] (see the script's header)"
step=${1:?$usage}
out=${2:?$usage}
here=$(cd "$(dirname "$0")/.." && pwd)  # the repository root
py=${PYTHON:-python}
device=${DEVICE:-cuda}
data=${DATA:-$here/data/cifar10}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ ! -d "$data/train" ] && [ "$data" = "$here/data/cifar10" ] && [ -f "$here/data/cifar10.tgz" ]; then
    tar xzf "$here/data/cifar10.tgz" -C "$here/data"
fi
if [ "$device" = cpu ]; then  # the rehearsal: small shapes, few images per step
    small=(--device cpu --batch-size-per-gpu 8 --num-workers 2 --out-dim 256)
else
    small=()
fi

check_log() {  # LOG.JSONL LAST_STEP: each logged step once, in order, up to LAST_STEP; every logged value finite
    "$py" - "$1" "$2" <<'PY'
import json, math, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
steps = [r["step"] for r in recs]
assert steps == sorted(set(steps)) and steps[-1] == int(sys.argv[2]), f"logged steps {steps}"
bad = [(r["step"], k) for r in recs for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
assert not bad, f"non-finite values: {bad[:5]}"
first, last = recs[0], recs[-1]
terms = " ".join(f"{m}.{k} {first[f'{m}.{k}']:.3f}->{last[f'{m}.{k}']:.3f}" for m in "ab" for k in ("L_sm", "L_ct"))
print(f"  steps {steps}; {terms}; {last['images_per_s']} img/s; peak {last['peak_mem_mb']} MB")
PY
}

case "$step" in
launch)
    flags=(--recipe cifar10 --data-path "$data/train" --log-every 5 ${small[@]+"${small[@]}"})
    launchers=("torchrun")
    [ "$device" = cpu ] || launchers+=("fp16")
    for name in "${launchers[@]}"; do
        if [ "$name" = fp16 ]; then
            cmd=("$py" "$here/mokd.py" --precision fp16)
        else  # one process under torchrun: a process group (nccl on CUDA) and the DDP / SyncBatchNorm wrappers (their
              # cross-process all-reduces need two GPUs or more)
            cmd=("$py" -m torch.distributed.run --standalone --nproc_per_node=1 "$here/mokd.py")
        fi
        rm -rf "$out/$name" "$out/$name.log"
        for last in 20 30; do  # 20 steps, then the same command resumed to step 30
            "${cmd[@]}" "${flags[@]}" --max-steps "$last" --output-dir "$out/$name" >> "$out/$name.log" 2>&1 \
                || { echo "$name: the run to step $last failed; see $out/$name.log" >&2
                     tail -n 5 "$out/$name.log" >&2
                     exit 1; }
        done
        grep -q "resumed from .* continues with step 20" "$out/$name.log" \
            || { echo "$name: the second launch did not resume at step 20; see $out/$name.log" >&2; exit 1; }
        echo "$name: $(grep -m1 -o "[a-z0-9]* on 1 x [a-z]*\( (DDP)\)\?" "$out/$name.log"), resumed at step 20"
        check_log "$out/$name/log.jsonl" 29
    done
    ;;
bench)
    modes=(${3:-eager compile})
    cifar=(--arch-a resnet18 --arch-b vit_tiny --patch-size 4 --global-crop-size 32 --local-crop-size 16
           --local-crops-number 6 --batch-size-per-gpu 256 --out-dim 4096)
    imagenet=(--arch-a resnet18 --arch-b vit_small --patch-size 16 --global-crop-size 224 --local-crop-size 96
              --local-crops-number 8 --batch-size-per-gpu 64 --out-dim 65536)
    steps=10
    if [ "$device" = cpu ]; then
        modes=(eager)
        steps=1
        small=(--device cpu --batch-size-per-gpu 2 --out-dim 256)
    fi
    for setting in cifar imagenet; do
        for mode in "${modes[@]}"; do
            if [ "$setting" = cifar ]; then shape=("${cifar[@]}"); else shape=("${imagenet[@]}"); fi
            extra=()
            [ "$mode" = eager ] || extra=(--compile)
            log="$out/bench_${setting}_$mode.log"
            "$py" "$here/benchmark.py" "${shape[@]}" ${small[@]+"${small[@]}"} ${extra[@]+"${extra[@]}"} \
                --output-dir "$out/bench_output" --benchmark-steps "$steps" > "$log" 2>&1 \
                || { echo "benchmark $setting $mode failed; see $log" >&2; tail -n 5 "$log" >&2; exit 1; }
            "$py" - "$log" "$setting" "$mode" <<'PY'
import json, sys
s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
i, m = s["independent"], s["mokd"]
print(f"{sys.argv[2]:<9}{sys.argv[3]:<8}{s['device']}, {s['benchmark']['precision']}: independent {i['images_per_s']} "
      f"img/s ({i['ms_per_step']} ms, {i['peak_mem_mb']} MB), MOKD {m['images_per_s']} img/s ({m['ms_per_step']} ms, "
      f"{m['peak_mem_mb']} MB); time ratio {s['time_ratio']}, FLOP ratio {s['flop_ratio']}")
PY
        done
    done
    ;;
pair)
    epochs=${3:?$usage}
    train_s=${4:?$usage}
    [ -d "$data/train" ] && [ -d "$data/test" ] || { echo "error: $data must hold train/ and test/" >&2; exit 2; }
    rm -rf "$out/pair"
    TRAIN_DEADLINE_S=$train_s PYTHON=$py setsid nohup bash "$here/experiments/cifar10_pair.sh" "$data" "$out/pair" \
        "$epochs" ${small[@]+"${small[@]}"} > "$out/pair.log" 2>&1 < /dev/null &
    echo $! > "$out/pair.pid"
    echo "pair started: $epochs epochs, training stops after $train_s s at the latest; output in $out/pair.log"
    ;;
wait)
    seconds=${3:?$usage}
    [ -f "$out/pair.pid" ] || { echo "error: no pair started in $out" >&2; exit 2; }
    t0=$(date +%s)
    while kill -0 "$(cat "$out/pair.pid")" 2> /dev/null && [ $(( $(date +%s) - t0 )) -lt "$seconds" ]; do
        sleep 5
    done
    for run in mokd independent; do
        [ -f "$out/pair/$run.log" ] && echo "$run: $(grep "^step " "$out/pair/$run.log" | tail -n 1)"
    done
    if kill -0 "$(cat "$out/pair.pid")" 2> /dev/null; then
        echo "the pair is still running"
    else
        tail -n 40 "$out/pair.log"
    fi
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac
