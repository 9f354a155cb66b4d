#!/usr/bin/env bash
# The evidence runs of docs/few_shot_and_mtd.md (MTD with the paper's schedule; 16 and 64 training images),
# one after another (two at once each run half as fast). Rerun it to continue: a finished run is skipped,
# an interrupted one continues with --resume. Logs and results: $EVIDENCE_DIR (default results/evidence).
cd "$(dirname "$0")/.."
E=${EVIDENCE_DIR:-results/evidence}
mkdir -p "$E"
run() {  # name, then main.py options; skipped when its results.json says every job finished
  name=$1; shift
  if [ -f $E/$name/results.json ] && python -c "import json,sys; r=json.load(open('$E/$name/results.json')); sys.exit(0 if r['classes'] and not r.get('in_progress') and not r['failed'] and len(r['classes'])==len(r['seeds']) else 1)"; then
    echo "$(date -u +%H:%M:%S) $name already finished"; return; fi
  echo "$(date -u +%H:%M:%S) $name starts"
  if [ -f $E/$name/results.json ]; then
    /usr/bin/time -v python main.py --resume $E/$name >> $E/$name.log 2>&1
  else
    /usr/bin/time -v python main.py "$@" --results_dir $E/$name >> $E/$name.log 2>&1
  fi
  echo "$(date -u +%H:%M:%S) $name ended with $?"
}
M=../shared/data/mvtec; S=../shared/data/mvtec_partial; T=../shared/data/mtd
run fewshot16_bottle --dataset_path $M --class_name bottle --n_train_images 16 --seeds 0,1,2 --save_checkpoint false
run fewshot16_screw --dataset_path $S --class_name screw --n_train_images 16 --seeds 0,1,2 --save_checkpoint false
run fewshot64_bottle --dataset_path $M --class_name bottle --n_train_images 64 --seed 0 --save_checkpoint false
run fewshot64_screw --dataset_path $S --class_name screw --n_train_images 64 --seed 0 --save_checkpoint false
run mtd_full --dataset_path $T --class_name mtd --seed 0
run fewshot16_mtd --dataset_path $T --class_name mtd --n_train_images 16 --seeds 0,1,2 --save_checkpoint false
run fewshot64_mtd --dataset_path $T --class_name mtd --n_train_images 64 --seed 0 --save_checkpoint false
