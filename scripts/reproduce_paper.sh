#!/usr/bin/env bash
# The paper on one GPU (or several with NGPU=N): Tables 1-3, Figure 4 (06_eval.py) and Figure 6 (07_ssl_seg.py)
# for AbdomenCT-1K and TotalSegmentator. Every command is printed before it runs; rerunning skips nothing
# silently, it resumes: each stage continues from its checkpoint or skips finished outputs.
#
#   ACT1K_IMAGES=AbdomenCT-1K/images ACT1K_LABELS=AbdomenCT-1K/Mask \
#   TOTALSEG=Totalsegmentator_dataset_v201 UNIVERSEG=universeg_v1_nf64_ss64_STA.pt MED3D=pretrain/resnet_50.pth \
#   LPIPS=weights/lpips \
#   bash scripts/reproduce_paper.sh                # the paper's schedule (make reproduce does the same)
#   QUICK=1 bash scripts/reproduce_paper.sh        # shortened schedule, same commands (see the numbers below)
#   NGPU=2 bash scripts/reproduce_paper.sh         # torchrun for the training and sampling stages
#   DATASETS=act1k bash scripts/reproduce_paper.sh # one dataset only (act1k, totalseg or "act1k totalseg")
#   DRY=1 bash scripts/reproduce_paper.sh          # print the commands only (no GPU needed; the inputs must exist)
#
# Optional: DEEPLAB=deeplabv3_resnet101_coco-586e9e4e.pth (07's backbone; without it 07 starts from random weights
# and its table says so). Outputs: data/<dataset>/, runs/<dataset>/.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
QUICK=${QUICK:-0}
NGPU=${NGPU:-1}
DATASETS=${DATASETS:-"act1k totalseg"}
DRY=${DRY:-0}
if [ "$QUICK" = 1 ]; then  # about a tenth of the schedule, meant to show the orderings of Tables 1-3, not the values
                           # (not yet verified: no GPU has been lent to this work; check the tables before relying on it)
    VQ_STEPS=10000; DISC_START=5000; DM_STEPS=15000; EMA_START=2000; SSL_ITERS=10000; SSL_RUNS=2; PAIRS=100
else                       # paper §4.1.3 (VQ-GAN 100k, diffusion 150k), §4.3 (100k episodes, 5 runs)
    VQ_STEPS=100000; DISC_START=50000; DM_STEPS=150000; EMA_START=2000; SSL_ITERS=100100; SSL_RUNS=5; PAIRS=400
fi
DM_BATCH=$((20 / NGPU))  # the paper's batch of 20 latents, shared out over the GPUs

stop() { echo "reproduce_paper.sh: $*" >&2; exit 2; }
need() { [ -e "$1" ] || stop "$2"; }
run() { echo "+ $*"; [ "$DRY" = 1 ] || "$@"; }
train() { if [ "$NGPU" -gt 1 ]; then run "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" "$@"; else run "$PY" "$@"; fi; }

[ "$DRY" = 1 ] || [ -x "$PY" ] || stop "no $PY: run 'make test' (or 'make .venv/.installed') first, with the CUDA build of torch==2.13.0"
[ "$DRY" = 1 ] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || stop "no CUDA device visible to $PY: the paper run needs a GPU (make demo is the CPU version)"
need "${UNIVERSEG:-/nonexistent}" "set UNIVERSEG to universeg_v1_nf64_ss64_STA.pt (the URL is in 02_masks.py --help; the README says where to put it)"
need "${LPIPS:-/nonexistent}" "set LPIPS to a folder with vgg16-397923af.pth and vgg.pth (03_vqgan.py --help; the VQ-GAN's perceptual loss)"
need "${MED3D:-/nonexistent}" "set MED3D to MedicalNet's pretrain/resnet_50.pth (06_eval.py --help prints the download links)"

for ds in $DATASETS; do
    prep=data/$ds/prep; out=runs/$ds
    case $ds in
        act1k)
            need "${ACT1K_IMAGES:-/nonexistent}" "set ACT1K_IMAGES to AbdomenCT-1K's images (Case_00001_0000.nii.gz ...; https://github.com/JunMa11/AbdomenCT-1K)"
            need "${ACT1K_LABELS:-/nonexistent}" "set ACT1K_LABELS to AbdomenCT-1K's Mask folder (Case_00001.nii.gz ...)"
            run "$PY" 01_preprocess.py --images "$ACT1K_IMAGES" --labels "$ACT1K_LABELS" --dataset abdomenct1k --n-test 200 --out "$prep" ;;
        totalseg)
            need "${TOTALSEG:-/nonexistent}" "set TOTALSEG to the TotalSegmentator v2 folder (subject folders with ct.nii.gz, segmentations/; https://zenodo.org/records/10047292)"
            run "$PY" 01_preprocess.py --totalseg "$TOTALSEG" --require-organs liver,kidney,spleen,pancreas --out "$prep" ;;
        *) stop "unknown dataset '$ds' in DATASETS (act1k, totalseg)" ;;
    esac
    # §3.1: the priori from UniverSeg (not from the labels)
    run "$PY" 02_masks.py --prep "$prep" --method universeg --weights "$UNIVERSEG"

    # §3.2: the VQ-GAN with the locality loss (λ = 1, Lad) and without (λ = 0, Medical Diffusion)
    for lam in 1 0; do
        train 03_vqgan.py --prep "$prep" --out "$out/vqgan_l$lam" --lambda-loc $lam --steps $VQ_STEPS --disc-start $DISC_START \
            --perceptual-weights "$LPIPS"
    done

    # §3.3, Table 2: V0 = none, V1 = content, V2 = structure, V3 = both (all on the λ = 0 VQ-GAN); Full = both on λ = 1
    declare -A VQ=([v0]=0 [v1]=0 [v2]=0 [v3]=0 [full]=1) COND=([v0]=none [v1]=content [v2]=structure [v3]=both [full]=both)
    for m in v0 v1 v2 v3 full; do
        train 04_diffusion.py --prep "$prep" --vqgan "$out/vqgan_l${VQ[$m]}/ckpt.pt" --out "$out/diffusion_$m" \
            --cond "${COND[$m]}" --steps $DM_STEPS --batch-size $DM_BATCH --ema-start $EMA_START
    done

    # §3.4: samples, as many as the training set (05's default), DDPM-300, w = 1; with (✓) and without (×) the original masks
    for m in v0 v1 v2 v3 full; do
        vq="$out/vqgan_l${VQ[$m]}/ckpt.pt"
        train 05_sample.py --prep "$prep" --vqgan "$vq" --diffusion "$out/diffusion_$m/ckpt.pt" --out "$out/samples_$m"
        train 05_sample.py --prep "$prep" --vqgan "$vq" --diffusion "$out/diffusion_$m/ckpt.pt" --out "$out/samples_${m}_unseen" \
            --no-original --aug-per-mask 1
    done
    # Table 3: the guidance sweep on the full model (w = 1 is samples_full)
    for w in 0.5 1.5 2.0; do
        train 05_sample.py --prep "$prep" --vqgan "$out/vqgan_l1/ckpt.pt" --diffusion "$out/diffusion_full/ckpt.pt" \
            --out "$out/samples_full_w$w" --guidance $w
    done

    # §4.2: Table 1 (Lad vs Medical Diffusion) + Figure 4; Table 2 (ablation, ✓ and ×); Table 3 (w)
    ev() { run "$PY" 06_eval.py --real "$prep" --med3d-weights "$MED3D" --pairs $PAIRS "$@"; }
    ev --out "$out/eval_table1" --fake lad="$out/samples_full" --fake medical_diffusion="$out/samples_v0"
    ev --out "$out/eval_table2" $(for m in v0 v1 v2 v3 full; do echo --fake "$m=$out/samples_$m" --fake "${m}_x=$out/samples_${m}_unseen"; done)
    ev --out "$out/eval_table3" --fidelity-steps 0 --fake w0.5="$out/samples_full_w0.5" --fake w1.0="$out/samples_full" \
        --fake w1.5="$out/samples_full_w1.5" --fake w2.0="$out/samples_full_w2.0"

    # §4.3, Figure 6: SSL-ALPNet on real, synthetic and mixed data; Lad against Medical Diffusion
    run "$PY" 07_ssl_seg.py --prep "$prep" --out "$out/ssl" --synthetic lad="$out/samples_full" \
        --synthetic medical_diffusion="$out/samples_v0" --iters $SSL_ITERS --runs $SSL_RUNS \
        ${DEEPLAB:+--backbone-weights "$DEEPLAB"}
    echo "done: $ds -> $out/eval_table{1,2,3}/table.md, $out/eval_table1/mds.png, $out/ssl/table.md, $out/ssl/dice.png"
done
