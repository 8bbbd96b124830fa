#!/usr/bin/env bash
# The paper on one GPU (or several with NGPU=N): Tables 1-3, Figure 4 (06_eval.py) and Figure 6 (07_ssl_seg.py)
# for AbdomenCT-1K and TotalSegmentator, then scripts/paper_tables.py lays the tables out as the paper does and
# checks that every row was built from the set the paper defines. Every command is printed before it runs;
# rerunning skips nothing silently, it resumes: each stage continues from its checkpoint or skips finished outputs.
#
#   ACT1K_IMAGES=AbdomenCT-1K/images ACT1K_LABELS=AbdomenCT-1K/Mask \
#   TOTALSEG=Totalsegmentator_dataset_v201 UNIVERSEG=universeg_v1_nf64_ss64_STA.pt MED3D=pretrain/resnet_50.pth \
#   LPIPS=weights/lpips TUMOUR_SUPPORT=Task07_Pancreas \
#   bash scripts/reproduce_paper.sh                # the paper's schedule (make reproduce does the same)
#   TINY=1 bash scripts/reproduce_paper.sh         # the rehearsal: every command on phantoms, CPU, minutes
#   QUICK=1 bash scripts/reproduce_paper.sh        # shortened schedule, same commands (see the numbers below)
#   NGPU=2 bash scripts/reproduce_paper.sh         # torchrun for the training and sampling stages
#   DATASETS=act1k bash scripts/reproduce_paper.sh # one dataset only (act1k, totalseg or "act1k totalseg")
#   DRY=1 bash scripts/reproduce_paper.sh          # print the commands only (no GPU needed; the inputs must exist)
#
# TUMOUR_SUPPORT (optional, recommended): MSD Task07 Pancreas (imagesTr/, labelsTr/: 1 pancreas, 2 tumour). Neither
# dataset labels a tumour, so without it UniverSeg has no tumour example and the masks hold no label 2 (02 says so).
# Optional: DEEPLAB=deeplabv3_resnet101_coco-586e9e4e.pth (07's backbone; without it 07 starts from random weights
# and its table says so). Outputs: data/<dataset>/, runs/<dataset>/ (TINY=1: data/tiny/, runs/tiny/).
#
# The rehearsal (TINY=1, `make reproduce-tiny`) runs this same sequence of commands with toy sizes and step counts on
# phantoms (00_phantoms.py, in both datasets' layouts) on the CPU, with the offline paths where the paper needs
# weights: masks from the labels instead of UniverSeg, no LPIPS term, MedicalNet with random weights (06 announces
# "random features"), SSL-ALPNet from random weights. Its numbers mean nothing; what it proves is that every command
# runs, in order, and that every table is built from the right sets (tests/test_rehearsal.py checks its outputs).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
TINY=${TINY:-0}
QUICK=${QUICK:-0}
NGPU=${NGPU:-1}
DATASETS=${DATASETS:-"act1k totalseg"}
DRY=${DRY:-0}
# VQ-GAN: the paper's "100k steps" are Lightning 1.6 steps, two per batch with two optimisers: the release's
# checkpoint epoch=124-step=100000 (800 volumes, batch 2, one GPU) is 50k iterations, discriminators from 25k.
if [ "$QUICK" = 1 ]; then  # about a tenth of the schedule, meant to show the orderings of Tables 1-3, not the values
                           # (not yet verified on a GPU; check the tables before relying on it)
    VQ_STEPS=5000; DISC_START=2500; DM_STEPS=15000; EMA_START=2000; SSL_ITERS=10000; SSL_RUNS=2; PAIRS=100
else                       # §4.1.3 (VQ-GAN as above, diffusion 150k), §4.3 (100k episodes, 5 runs)
    VQ_STEPS=50000; DISC_START=25000; DM_STEPS=150000; EMA_START=2000; SSL_ITERS=100100; SSL_RUNS=5; PAIRS=400
fi
DM_BATCH=$((20 / NGPU))  # the paper's batch of 20 latents, shared out over the GPUs
VQ_BATCH=$((2 / NGPU > 0 ? 2 / NGPU : 1))  # the paper's 2 volumes (one GPU)
N_TABLE3=256             # §4.4.2: 256 augmented masks for each w
DATA=data; RUNS=runs
# What only the rehearsal changes: sizes, step counts, and the offline paths for the weights.
PREP_TINY=(); VQ_SIZE=(--precision fp32); DM_SIZE=(); SAMPLE_SIZE=(); EVAL_SIZE=(); SSL_SIZE=()
if [ "$TINY" = 1 ]; then
    DATA=data/tiny; RUNS=runs/tiny; N_TABLE3=4; PAIRS=10; VQ_STEPS=8; DISC_START=4; DM_STEPS=8; EMA_START=4
    SSL_ITERS=4; SSL_RUNS=1; VQ_BATCH=2; DM_BATCH=2; NGPU=1
    PREP_TINY=(--size 32 --depth 16 --spacing 9 9 8 --hu -200 300 --workers 2 --no-previews)
    VQ_SIZE=(--n-hiddens 4 --num-groups 4 --n-codes 64 --disc-channels 8 --log-every 4 --save-every 8)
    DM_SIZE=(--dim 8 --dim-mults 1 2 --attn-heads 2 --attn-dim-head 8 --timesteps 20 --ema-every 1 --log-every 4
             --save-every 8 --n-preview 0 --workers 2)
    SAMPLE_SIZE=(--batch-size 8 --no-previews)
    EVAL_SIZE=(--med3d-depth 10 --fidelity-steps 5 --fidelity-batch 4 --fidelity-width 4)
    SSL_SIZE=(--backbone resnet18 --sp-min-size 20 --pool-train 1 --pool-test 1 --shift 1 --elastic-alpha 1
              --elastic-sigma 1 --log-every 2 --save-every 4 --workers 2)
fi

stop() { echo "reproduce_paper.sh: $*" >&2; exit 2; }
need() { [ -e "$1" ] || stop "$2"; }
run() {  # print, run, say how long it took
    echo "+ $*"
    [ "$DRY" = 1 ] && return
    local start=$SECONDS
    "$@"
    echo "  ($((SECONDS - start)) s: ${*:1:2})"
}
train() { if [ "$NGPU" -gt 1 ]; then run "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" "$@"; else run "$PY" "$@"; fi; }

[ "$DRY" = 1 ] || [ -x "$PY" ] || stop "no $PY: run 'make test' (or 'make .venv/.installed') first, with the CUDA build of torch==2.13.0"
if [ "$TINY" = 1 ]; then
    echo "rehearsal (TINY=1): every command of the paper run at toy sizes on phantoms; weights: masks from the labels" \
         "(not UniverSeg), no LPIPS, random MedicalNet and SSL backbone. The numbers mean nothing."
    ACT1K_IMAGES=${ACT1K_IMAGES:-$DATA/raw/act1k/images}; ACT1K_LABELS=${ACT1K_LABELS:-$DATA/raw/act1k/labels}
    TOTALSEG=${TOTALSEG:-$DATA/raw/totalseg}
    [ -e "$ACT1K_IMAGES" ] || run "$PY" 00_phantoms.py --out "$DATA/raw/act1k" --n 10 --previews 0
    # whole organs in every scan: the paper drops TotalSegmentator scans that cut one (01 --require-organs)
    [ -e "$TOTALSEG" ] || run "$PY" 00_phantoms.py --out "$TOTALSEG" --n 10 --seed 1 --layout totalseg --z-extent 260 300 \
        --previews 0
else
    [ "$DRY" = 1 ] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || stop "no CUDA device visible to $PY: the paper run needs a GPU (TINY=1 rehearses it on the CPU; make demo is the CPU version)"
    need "${UNIVERSEG:-/nonexistent}" "set UNIVERSEG to universeg_v1_nf64_ss64_STA.pt (the URL is in 02_masks.py --help; the README says where to put it)"
    need "${LPIPS:-/nonexistent}" "set LPIPS to a folder with vgg16-397923af.pth and vgg.pth (03_vqgan.py --help; the VQ-GAN's perceptual loss)"
    need "${MED3D:-/nonexistent}" "set MED3D to MedicalNet's pretrain/resnet_50.pth (06_eval.py --help prints the download links)"
fi
# the offline path of each weight file when it is not given (the rehearsal only)
MASKS=(--method labels); [ -n "${UNIVERSEG:-}" ] && MASKS=(--method universeg --weights "$UNIVERSEG")
PERCEPTUAL=(--perceptual-weight 0); [ -n "${LPIPS:-}" ] && PERCEPTUAL=(--perceptual-weights "$LPIPS")
FEATURES=(); [ -n "${MED3D:-}" ] && FEATURES=(--med3d-weights "$MED3D")
[ -z "${TUMOUR_SUPPORT:-}" ] || need "$TUMOUR_SUPPORT/labelsTr" "TUMOUR_SUPPORT=$TUMOUR_SUPPORT: expected MSD Task07 Pancreas (imagesTr/, labelsTr/)"

for ds in $DATASETS; do
    prep=$DATA/$ds/prep; out=$RUNS/$ds
    case $ds in
        act1k)
            need "${ACT1K_IMAGES:-/nonexistent}" "set ACT1K_IMAGES to AbdomenCT-1K's images (Case_00001_0000.nii.gz ...; https://github.com/JunMa11/AbdomenCT-1K)"
            need "${ACT1K_LABELS:-/nonexistent}" "set ACT1K_LABELS to AbdomenCT-1K's Mask folder (Case_00001.nii.gz ...)"
            n_test=200; [ "$TINY" = 1 ] && n_test=3   # §4.1.1: 800 for generation, 200 annotated ones for the tests
            run "$PY" 01_preprocess.py --images "$ACT1K_IMAGES" --labels "$ACT1K_LABELS" --dataset abdomenct1k \
                --n-test $n_test --out "$prep" "${PREP_TINY[@]}" ;;
        totalseg)
            need "${TOTALSEG:-/nonexistent}" "set TOTALSEG to the TotalSegmentator v2 folder (subject folders with ct.nii.gz, segmentations/; https://zenodo.org/records/10047292)"
            run "$PY" 01_preprocess.py --totalseg "$TOTALSEG" --require-organs liver,kidney,spleen,pancreas \
                --out "$prep" "${PREP_TINY[@]}" ;;
        *) stop "unknown dataset '$ds' in DATASETS (act1k, totalseg)" ;;
    esac
    # §3.1: the priori from UniverSeg, tumour examples from MSD Task07 (on this dataset's grid) when given
    SUPPORT=()
    if [ -n "${TUMOUR_SUPPORT:-}" ] && [ "${MASKS[1]}" = universeg ]; then
        dataset=abdomenct1k; [ "$ds" = totalseg ] && dataset=totalseg
        run "$PY" 01_preprocess.py --images "$TUMOUR_SUPPORT/imagesTr" --labels "$TUMOUR_SUPPORT/labelsTr" \
            --dataset $dataset --label-map 1:4,2:5 --n-test 0 --out "$DATA/$ds/tumour_support" "${PREP_TINY[@]}"
        SUPPORT=(--tumour-support "$DATA/$ds/tumour_support")
    fi
    run "$PY" 02_masks.py --prep "$prep" "${MASKS[@]}" "${SUPPORT[@]}"

    # §3.2: the VQ-GAN with the locality loss (λ = 1, Lad) and without (λ = 0, Medical Diffusion); fp32 as the release
    for lam in 1 0; do
        train 03_vqgan.py --prep "$prep" --out "$out/vqgan_l$lam" --lambda-loc $lam --steps $VQ_STEPS \
            --disc-start $DISC_START --batch-size $VQ_BATCH "${PERCEPTUAL[@]}" "${VQ_SIZE[@]}"
    done

    # §3.3, Table 2: V0 = none, V1 = content, V2 = structure, V3 = both (all on the λ = 0 VQ-GAN); Full = both on λ = 1
    declare -A VQ=([v0]=0 [v1]=0 [v2]=0 [v3]=0 [full]=1) COND=([v0]=none [v1]=content [v2]=structure [v3]=both [full]=both)
    for m in v0 v1 v2 v3 full; do
        train 04_diffusion.py --prep "$prep" --vqgan "$out/vqgan_l${VQ[$m]}/ckpt.pt" --out "$out/diffusion_$m" \
            --cond "${COND[$m]}" --steps $DM_STEPS --batch-size $DM_BATCH --ema-start $EMA_START "${DM_SIZE[@]}"
    done

    # §3.4, §4.2, §4.4.1: as many samples as the training set, DDPM-300, w = 1. samples_<m>: the augmented mask set
    # (original + augmented masks, half each: 05's default), Table 1 and Table 2's ✓ rows; samples_<m>_unseen:
    # augmented masks only, as many, Table 2's × rows (V0 is unconditional: it has no × row).
    for m in v0 v1 v2 v3 full; do
        vq="$out/vqgan_l${VQ[$m]}/ckpt.pt"
        train 05_sample.py --prep "$prep" --vqgan "$vq" --diffusion "$out/diffusion_$m/ckpt.pt" --out "$out/samples_$m" \
            "${SAMPLE_SIZE[@]}"
        [ $m = v0 ] || train 05_sample.py --prep "$prep" --vqgan "$vq" --diffusion "$out/diffusion_$m/ckpt.pt" \
            --out "$out/samples_${m}_unseen" --n-original 0 "${SAMPLE_SIZE[@]}"
    done
    # §4.4.2, Table 3: the full model, the same 256 augmented masks for each w
    for w in 0.5 1.0 1.5 2.0; do
        train 05_sample.py --prep "$prep" --vqgan "$out/vqgan_l1/ckpt.pt" --diffusion "$out/diffusion_full/ckpt.pt" \
            --out "$out/samples_table3_w$w" --guidance $w --n-original 0 --n-augmented $N_TABLE3 "${SAMPLE_SIZE[@]}"
    done

    # §4.2: Table 1 (Lad vs Medical Diffusion) + Figure 4; Table 2 (ablation, ✓ and ×); Table 3 (w)
    ev() { run "$PY" 06_eval.py --real "$prep" "${FEATURES[@]}" --pairs $PAIRS "${EVAL_SIZE[@]}" "$@"; }
    ev --out "$out/eval_table1" --fake lad="$out/samples_full" --fake medical_diffusion="$out/samples_v0"
    ev --out "$out/eval_table2" --fake v0="$out/samples_v0" \
        $(for m in v1 v2 v3 full; do echo --fake "$m=$out/samples_$m" --fake "${m}_x=$out/samples_${m}_unseen"; done)
    ev --out "$out/eval_table3" --fidelity-steps 0 \
        $(for w in 0.5 1.0 1.5 2.0; do echo --fake "w$w=$out/samples_table3_w$w"; done)

    # §4.3, Figure 6: SSL-ALPNet on real, synthetic and mixed data; Lad against Medical Diffusion
    run "$PY" 07_ssl_seg.py --prep "$prep" --out "$out/ssl" --synthetic lad="$out/samples_full" \
        --synthetic medical_diffusion="$out/samples_v0" --iters $SSL_ITERS --runs $SSL_RUNS \
        ${DEEPLAB:+--backbone-weights "$DEEPLAB"} "${SSL_SIZE[@]}"

    # the paper's layout, every row, and a check that each row was built from the set the paper defines
    run "$PY" scripts/paper_tables.py --runs "$out" --dataset $ds --table3-size $N_TABLE3
    echo "done: $ds -> $out/tables.md (Tables 1-3), $out/eval_table1/mds.png (Fig. 4), $out/ssl/dice.png (Fig. 6)"
done
