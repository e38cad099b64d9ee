#!/usr/bin/env bash
# Dev-split experiments on a finished real-speech track (run_realspeech.py --work WORK), one process
# at a time; results append to WORK/dev_exp/results.txt. Stages (arguments, in order):
#   base      the track's seed-1 models on the dev split, greedy and joint decoding
#   nofreeze  fine-tune seed 1 without freezing the encoder, CTC weight 0.5 (both inits), then decode dev
# usage: WORK=realspeech_work [THREADS=2] [JW=0.3] bash examples/realspeech/dev_experiments.sh base nofreeze
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
W=$(cd "${WORK:?set WORK to the --work folder of the track}" && pwd); D=$W/data/asr; OUT=$W/dev_exp; mkdir -p $OUT
dec() {  # name checkpoint mode
  fairseq-generate $D --user-dir slam_fairseq --task slam_speech_to_text --config-yaml config_asr.yaml --gen-subset dev_asr \
    --path $2 --beam 5 --max-tokens 50000 --cpu --required-batch-size-multiple 1 --num-workers 0 --ctc-decoding $3 \
    --ctc-decoding-weight ${JW:-0.3} --max-len-a 0.1 --max-len-b 10 --scoring wer --wer-tokenizer 13a --wer-lowercase --wer-remove-punct \
    > $OUT/dec_$1_$3.txt 2>&1
  echo "$1 $3 $(grep -o 'WER: [0-9.]*' $OUT/dec_$1_$3.txt | tail -1) distinct $(grep '^D-' $OUT/dec_$1_$3.txt | cut -f3 | sort -u | wc -l)" | tee -a $OUT/results.txt
}
ft() {  # name init(pretrained|scratch) extra args...
  name=$1; init=$2; shift 2
  load=(); [ $init = pretrained ] && load=(--load-pretrained-slam-from $W/checkpoints/pretrain/checkpoint_last.pt)
  fairseq-train $D --user-dir slam_fairseq --task speech_to_text --config-yaml config_asr.yaml --train-subset train_asr \
    --valid-subset dev_asr --arch slam_s2t_tiny --encoder-embed-dim 128 --encoder-ffn-embed-dim 256 --encoder-attention-heads 4 \
    --speech-encoder-layers 3 --multimodal-encoder-layers 3 --subsampling-conv-channels 32 --decoder-embed-dim 128 \
    --decoder-ffn-embed-dim 256 --decoder-layers 2 --decoder-attention-heads 4 --criterion label_smoothed_cross_entropy_with_ctc \
    --label-smoothing 0.1 --optimizer adam --adam-betas '(0.9,0.98)' --lr 2e-3 --clip-norm 10 --lr-scheduler inverse_sqrt \
    --warmup-updates 40 --max-update 400 --max-tokens 8000 --save-dir $OUT/ckpt_$name --no-epoch-checkpoints \
    --disable-validation --cpu --seed 1 --num-workers 0 --required-batch-size-multiple 1 --log-format json --log-interval 50 \
    --no-progress-bar "${load[@]}" "$@" > $OUT/ft_$name.log 2>&1
  echo "$name: $* -> last $(grep train_inner $OUT/ft_$name.log | tail -1 | grep -o '"ctc_loss": "[0-9.]*"')" | tee -a $OUT/results.txt
}
for stage in "$@"; do
  case $stage in
    base)  for i in pretrained scratch; do for m in greedy joint; do dec shipped_${i}_seed1 $W/checkpoints/asr_${i}_seed1/checkpoint_last.pt $m; done; done ;;
    nofreeze) for i in pretrained scratch; do ft nofreeze_ctc05_$i $i --freeze-encoder-updates 0 --ctc-weight 0.5
                for m in greedy joint; do dec nofreeze_ctc05_$i $OUT/ckpt_nofreeze_ctc05_$i/checkpoint_last.pt $m; done; done ;;
  esac
done
