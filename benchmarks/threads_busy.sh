#!/bin/bash
# The thread-count default under load (docs/performance.md, "Threads"): two busy-loop processes keep both cores of a
# 2-core machine busy, then the same audit runs with the default thread count, --threads 1 and
# --threads 2, interleaved, twice, each into a fresh results folder; the whole process is timed.
#   bash benchmarks/threads_busy.sh [DATA_ROOT]      (default ../shared/datasets; python on PATH)
set -u
cd "$(dirname "$0")/.."
root=${1:-../shared/datasets}
work=$(mktemp -d)
python -c "while True: pass" & b1=$!
python -c "while True: pass" & b2=$!
trap 'kill $b1 $b2; rm -rf "$work"' EXIT
sleep "${WARMUP:-90}"  # let the 1-minute load average see them
for rep in 1 2; do
  for mode in default 1 2; do
    extra=(); [ "$mode" != default ] && extra=(--threads "$mode")
    out="$work/$mode"; rm -rf "$out"
    load=$(cut -d' ' -f1 /proc/loadavg)
    start=$(date +%s.%N)
    python -m fairrecon audit --dataset fashion-mnist --data-root "$root" --limit 2000 --test-limit 1000 --model mlp \
      --seeds 3 --epochs 2 --out "$out" --force --quiet "${extra[@]}" > /dev/null 2>&1
    end=$(date +%s.%N)
    python - "$out/summary.json" "$rep" "$mode" "$load" "$start" "$end" <<'EOF'
import json, sys
summary, rep, mode, load, start, end = sys.argv[1:]
info = json.load(open(summary))["info"]
print(f"rep {rep} {mode:>7}: load at start {load}, wall {float(end) - float(start):.1f} s, audit "
      f"{info['timings']['total_s']:.1f} s, {info['threads']} thread(s) ({info['threads_chosen']})")
EOF
  done
done
