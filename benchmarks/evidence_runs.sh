#!/usr/bin/env bash
# The evidence runs of docs/results.md (MTD with the paper's schedule; 16 and 64 training images),
# one (class, seed) run after another (two at once each run half as fast). Rerun it to continue: a finished
# run is skipped, an interrupted one continues with --resume. Working folders and logs: $EVIDENCE_DIR (default
# results/evidence); each finished run's results.json, /usr/bin/time summary and machine (cpu, gpu, torch,
# date) are copied to docs/evidence/, which is kept in the repository (a new checkout has no results/);
# `python benchmarks/evidence_tables.py --markdown --write` then rewrites the tables of docs/results.md. Names in $ONLY (space-separated) run
# only those runs. $FEATURE_CACHE_DIR sets a new run's --feature_cache_dir (default data/feature_cache):
# with $EVIDENCE_DIR on storage that outlives the checkout, a run can continue from another clone.
{  # parsed whole before anything runs: bash reads a script as it goes, and an edit in place while a run goes on would shift what it reads next
cd "$(dirname "$0")/.."
E=${EVIDENCE_DIR:-results/evidence}
KEPT=docs/evidence
mkdir -p "$E" "$KEPT"
finished() {  # a results.json in which every job of the run finished and none failed
  [ -f "$1" ] && python -c "import json,sys; r=json.load(open('$1')); sys.exit(0 if r['classes'] and not r.get('in_progress') and not r['failed'] and len(r['classes'])==len(r['seeds']) else 1)"
}
machine() {  # where a run was kept: cpu (model, family, cores), gpu, torch version, date (UTC)
  python -c "
import datetime, os, torch
info = {}
for line in (open('/proc/cpuinfo') if os.path.exists('/proc/cpuinfo') else []):
    key, _, value = line.partition(':')
    info.setdefault(key.strip(), value.strip())
cpu = info.get('model name', 'unknown CPU') + (f' (family {info[\"cpu family\"]} model {info.get(\"model\")})' if 'cpu family' in info else '')
print(f'cpu: {cpu}, {os.cpu_count()} cores')
print('gpu: ' + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'))
print('torch: ' + torch.__version__)
print('date: ' + datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d'))"
}
keep() {  # the finished run's results, the time summary of each process (part) that ran it, the machine
  cp $E/$1/results.json $KEPT/$1.results.json
  machine > $KEPT/$1.machine.txt
  grep -E "^part starts|resumed after meta epoch|Elapsed|Maximum resident|Command being timed" $E/$1.log > $KEPT/$1.time.txt
  if [ ! -s $KEPT/$1.time.txt ]; then  # the timing process died before printing: say so, not an empty file
    echo "no /usr/bin/time summary in $E/$1.log; wall_time_s and peak_rss_gib in $1.results.json" > $KEPT/$1.time.txt
  fi
}
run() {  # name, then main.py options; skipped when its kept results say every job finished
  name=$1; shift
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  if finished $KEPT/$name.results.json; then echo "$(date -u +%H:%M:%S) $name already finished"; return; fi
  if finished $E/$name/results.json; then  # finished, but stopped before its results were kept
    keep $name; echo "$(date -u +%H:%M:%S) $name had finished; kept"; return; fi
  echo "$(date -u +%H:%M:%S) $name starts"
  previous=""
  if [ -f $E/$name/results.json ]; then
    # a part that a session's end killed prints no time summary: the time it is credited with ends at its
    # last resume state, which the part line dates
    state=$(ls -t $E/$name/resume/*.pt 2>/dev/null | head -1)
    saved=none; [ -n "$state" ] && saved="saved $(date -u -r "$state" '+%F %T') UTC"
    previous="; the previous part's last resume state: $saved"
    options=(--resume $E/$name)
  else
    options=("$@" --results_dir $E/$name ${FEATURE_CACHE_DIR:+--feature_cache_dir $FEATURE_CACHE_DIR})
  fi
  echo "part starts $(date -u '+%F %T') UTC$previous" >> $E/$name.log
  /usr/bin/time -v python main.py "${options[@]}" >> $E/$name.log 2>&1
  status=$?
  echo "$(date -u +%H:%M:%S) $name ended with $status"
  if [ $status -eq 0 ]; then keep $name; fi
}
M=../shared/data/mvtec; S=../shared/data/mvtec_partial; T=../shared/data/mtd
FEW="--save_checkpoint false"
# screw seed 0 keeps its checkpoint: benchmarks/scoring.py measures on it what fewer or fixed test views cost
run fewshot16_screw_seed0 --dataset_path $S --class_name screw --n_train_images 16 --seed 0
for seed in 1 2; do
  run fewshot16_screw_seed$seed --dataset_path $S --class_name screw --n_train_images 16 --seed $seed $FEW
done
for seed in 0 1 2; do
  run fewshot16_bottle_seed$seed --dataset_path $M --class_name bottle --n_train_images 16 --seed $seed $FEW
done
run fewshot64_screw_seed0 --dataset_path $S --class_name screw --n_train_images 64 --seed 0 $FEW
run fewshot64_bottle_seed0 --dataset_path $M --class_name bottle --n_train_images 64 --seed 0 $FEW
for seed in 0 1 2; do
  run fewshot16_mtd_seed$seed --dataset_path $T --class_name mtd --n_train_images 16 --seed $seed $FEW
done
run fewshot64_mtd_seed0 --dataset_path $T --class_name mtd --n_train_images 64 --seed 0 $FEW
run mtd_full --dataset_path $T --class_name mtd --seed 0
exit
}
