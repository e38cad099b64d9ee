#!/usr/bin/env bash
# Dev-split experiments next to a real-speech track (run_realspeech.py --work WORK, finished or at
# least through its pre-training); results append to WORK/dev_exp/results.txt, one line per run:
# WER and CER (greedy CTC, joint CTC/attention; control: also beam and lexicon) and the number of
# distinct hypotheses.
# Stages (arguments, in order):
#   data      the ablation data sets, from WORK/corpus (or CORPUS=DIR) into WORK/dev_exp/data/:
#             fullband_lb_v200 (Mel bins to 8 kHz, SpecAugment LB, 200 pieces: the first recipe's),
#             bandlimited_lb_v200, bandlimited_sm_v200 (the track's own data is bandlimited_sm_v70)
#   ablation  fine-tune from scratch with the track's recipe on each of them and on WORK/data/asr,
#             then the first recipe's batches and updates (8000 frames x 400) on bandlimited_sm_v70
#   inits     the track's recipe from the end of stage 2, the end of stage 1 and scratch (seed 1)
#   jw        joint CTC/attention weights 0.3 0.5 0.7 0.9 on the stage-2 model of `inits`
#   control   the equal-compute control: scratch fine-tuning for CONTROL_UPDATES (default 5400: the
#             track's 1200 plus the updates its pre-training's wall clock buys), seeds 1 and 2 at once,
#             decoded with the track's four decoders (a finished run is only decoded again)
# Decoding is on the dev split; SUBSET=test scores a finished comparison on the test split instead.
# usage: WORK=realspeech_work [THREADS=1] [UPDATES=1200] bash examples/realspeech/dev_experiments.sh data ablation
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
W=$(cd "${WORK:?set WORK to the --work folder of the track}" && pwd); OUT=$W/dev_exp; mkdir -p $OUT
CORPUS=${CORPUS:-$W/corpus}; UPDATES=${UPDATES:-1200}; SUBSET=${SUBSET:-dev}; CONTROL_UPDATES=${CONTROL_UPDATES:-5400}
PRETRAINED=$W/checkpoints/pretrain/checkpoint_last.pt; STAGE1=$W/checkpoints/pretrain/checkpoint_stage1.pt

cer() {  # generate-output -> "CER x" (the D- lines against the T- lines; probe.py's error rates)
  python - "$1" <<'EOF'
import sys
sys.path.insert(0, "examples/realspeech")
from probe import error_rates
hyp, ref = {}, {}
for line in open(sys.argv[1], encoding="utf-8"):
    fields = line.rstrip("\n").split("\t")
    if line.startswith("D-"): hyp[fields[0][2:]] = fields[2]
    elif line.startswith("T-"): ref[fields[0][2:]] = fields[1]
print(f"CER {error_rates([hyp.get(key, '') for key in ref], list(ref.values()))['cer']:.2f}")
EOF
}
dec() {  # name data checkpoint decoder(beam|joint|greedy|lexicon) joint-weight: the track's decoding options
  local f=$OUT/dec_$1_$4_$5_$SUBSET.txt options
  options=$(python - "$4" "$2" "$5" <<'EOF'
import sys
sys.path.insert(0, "examples/realspeech")
from run_realspeech import BUDGETS
decoder, data, weight = sys.argv[1:]
print(" ".join(BUDGETS["full"].decoding_options(decoder, data, joint_weight=float(weight))))
EOF
)
  fairseq-generate $2 --user-dir slam_fairseq --task slam_speech_to_text --config-yaml config_asr.yaml --gen-subset ${SUBSET}_asr \
    --path $3 --max-tokens 50000 --cpu --required-batch-size-multiple 1 --num-workers 0 $options \
    --scoring wer --wer-tokenizer 13a --wer-lowercase --wer-remove-punct > $f 2>&1
  echo "  $SUBSET $4 (weight $5): $(grep -o 'WER: [0-9.]*' $f | tail -1) $(cer $f) distinct $(grep '^D-' $f | cut -f3 | sort -u | wc -l)"
}
ft() {  # name data init-checkpoint|scratch [fairseq-train args that replace the recipe's]
  local name=$1 data=$2 init=$3; shift 3
  train "$name" "$data" "$init" "$@"
  { echo "$name: data $(basename $data), init $(basename $init) $*"
    dec $name $data $OUT/ckpt_$name/checkpoint_last.pt greedy 0.5
    dec $name $data $OUT/ckpt_$name/checkpoint_last.pt joint 0.5; } | tee -a $OUT/results.txt
}
train() {  # name data init-checkpoint|scratch [fairseq-train args]: the track's fine-tuning recipe
  local name=$1 data=$2 init=$3; shift 3
  local load=(); [ $init != scratch ] && load=(--load-pretrained-slam-from $init)
  fairseq-train $data --user-dir slam_fairseq --task speech_to_text --config-yaml config_asr.yaml --train-subset train_asr \
    --valid-subset dev_asr --arch slam_s2t_tiny --encoder-embed-dim 128 --encoder-ffn-embed-dim 256 --encoder-attention-heads 4 \
    --speech-encoder-layers 3 --multimodal-encoder-layers 3 --subsampling-conv-channels 32 --decoder-embed-dim 128 \
    --decoder-ffn-embed-dim 256 --decoder-layers 2 --decoder-attention-heads 4 --criterion label_smoothed_cross_entropy_with_ctc \
    --label-smoothing 0.1 --optimizer adam --adam-betas '(0.9,0.98)' --lr 2e-3 --clip-norm 10 --lr-scheduler inverse_sqrt \
    --warmup-updates $(( UPDATES >= 10 ? UPDATES / 10 : 1 )) --max-update $UPDATES --max-tokens 2000 --ctc-weight 1.0 --freeze-encoder-updates 0 \
    --save-dir $OUT/ckpt_$name --no-epoch-checkpoints --disable-validation --cpu --seed 1 --num-workers 0 \
    --required-batch-size-multiple 1 --log-format json --log-interval 50 --no-progress-bar "${load[@]}" "$@" > $OUT/ft_$name.log 2>&1 \
    || { tail -n 20 $OUT/ft_$name.log >&2; return 1; }
}
prep() {  # name prep_librispeech flags...
  local name=$1; shift
  python manifests/prep_librispeech.py --root $CORPUS/LibriSpeech --splits train-clean-100:train dev-clean:dev \
    test-clean:test --outputs asr --allow-smaller-vocab --out $OUT/data/$name --workers 1 --no-progress "$@" > $OUT/prep_$name.log
}
for stage in "$@"; do
  case $stage in
    data) prep fullband_lb_v200 --vocab-size 200 --specaugment lb
          prep bandlimited_lb_v200 --vocab-size 200 --specaugment lb --mel-high-freq 4000
          prep bandlimited_sm_v200 --vocab-size 200 --specaugment sm --mel-high-freq 4000 ;;
    ablation) for name in fullband_lb_v200 bandlimited_lb_v200 bandlimited_sm_v200; do ft scratch_$name $OUT/data/$name scratch; done
              ft scratch_bandlimited_sm_v70 $W/data/asr scratch
              ft scratch_bandlimited_sm_v70_8000x400 $W/data/asr scratch --max-tokens 8000 --max-update 400 --warmup-updates 40 ;;
    inits) ft stage2 $W/data/asr $PRETRAINED; ft stage1 $W/data/asr $STAGE1; ft scratch $W/data/asr scratch ;;
    jw) for weight in 0.3 0.5 0.7 0.9; do dec stage2 $W/data/asr $OUT/ckpt_stage2/checkpoint_last.pt joint $weight | tee -a $OUT/results.txt; done ;;
    control) pids=()
             for seed in 1 2; do  # a finished control run is decoded again, not retrained
               if [ ! -f "$OUT/ckpt_scratch_control_seed$seed/checkpoint_last.pt" ]; then
                 train scratch_control_seed$seed "$W/data/asr" scratch --seed $seed --max-update $CONTROL_UPDATES \
                   --warmup-updates $((CONTROL_UPDATES / 10)) &
                 pids+=($!)
               fi
             done
             failed=0
             for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || failed=1; done  # every run's own status
             [ $failed = 0 ] || { echo "a control training run failed (logs: $OUT/ft_scratch_control_seed*.log)" >&2; exit 1; }
             for seed in 1 2; do
               { echo "scratch_control_seed$seed: scratch, $CONTROL_UPDATES updates"
                 for decoder in beam greedy joint lexicon; do
                   dec scratch_control_seed$seed $W/data/asr $OUT/ckpt_scratch_control_seed$seed/checkpoint_last.pt $decoder 0.5
                 done; } | tee -a $OUT/results.txt
             done ;;
    *) echo "unknown stage $stage (data, ablation, inits, jw, control)" >&2; exit 2 ;;
  esac
done
