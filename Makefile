# Two commands on a fresh machine with python3 (README): `make demo` and `make test`.
# Both create .venv and install requirements.txt the first time.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := data/demo

.PHONY: demo demo-ssl demo-spatial reproduce reproduce-tiny test test-all bench-peers gpu-check clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

# The CPU demo: phantoms -> preprocessing -> masks -> VQ-GAN -> latent diffusion (Lad and the V0 baseline)
# -> samples -> evaluation, in data/demo and runs/demo (never touches data/raw). The knobs are passed
# explicitly so you can see them. Everything is CPU-sized:
#   grid      64x64x16 at 4x4x4.6 mm (paper: 256x256x32 at 1.6x1.6x2.3 mm): the body, a little cropped at the
#             sides, with the pancreas 3-5 voxels thick, so that it survives the VQ-GAN's 4x downsampling (at
#             6 mm it is 2-3 voxels, under one latent cell); HU window -200..300 (paper: -1000..400) so that
#             the tiny models spend their few steps on soft tissue, not on air and bone;
#   VQ-GAN    n_hiddens 8 (paper 16), 512 codes (paper 16384), no LPIPS (its weights need a download), 300 steps;
#   diffusion Unet3D width 16 (paper 64), batch 8 (paper 20), $(DIFF_STEPS) steps; Lad (--cond both) and V0
#             (--cond none) with the same budget, trained side by side on one core each;
#   samples   12 per model, as the paper's sets are made: 6 on original masks, 6 on augmented ones (§3.4.1);
#   eval      MedicalNet ResNet-10 with random weights (the pretrained files need a download), a width-8
#             fidelity probe for 300 steps.
DEMO_RUNS  := runs/demo
DIFF_STEPS := 1900
DIFF_ARGS  := --prep $(DEMO)/prep --vqgan $(DEMO_RUNS)/vqgan/ckpt.pt --dim 16 --dim-mults 1 2 4 8 --attn-heads 4 \
	--attn-dim-head 16 --batch-size 8 --lr 1e-3 --steps $(DIFF_STEPS) --ema-start 800 --ema-every 1 --ema-decay 0.99 \
	--log-every 200 --save-every $(DIFF_STEPS) --n-preview 2 --workers 1 --fresh
EVAL_ARGS := --real $(DEMO)/prep --med3d-depth 10 --pairs 400 --fidelity-steps 300 --fidelity-batch 16 \
	--fidelity-width 8
SAMPLE_ARGS := --prep $(DEMO)/prep --vqgan $(DEMO_RUNS)/vqgan/ckpt.pt --n-original 6 --n-augmented 6 --guidance 1.0 \
	--sampler ddim --steps 50 --batch-size 5 --overwrite

demo: $(VENV)/.installed
	$(PY) 00_phantoms.py --out $(DEMO)/raw --n 16 --seed 0
	$(PY) 01_preprocess.py --images $(DEMO)/raw/images --labels $(DEMO)/raw/labels --out $(DEMO)/prep \
		--dataset abdomenct1k --size 64 --depth 16 --spacing 4 4 4.6 --hu -200 300 --organ 4 --n-test 4 --workers 2 --overwrite
	$(PY) 02_masks.py --prep $(DEMO)/prep --method labels --organ 4 --tumour 5 --overwrite
	$(PY) 03_vqgan.py --prep $(DEMO)/prep --out $(DEMO_RUNS)/vqgan --steps 300 --disc-start 200 --batch-size 2 \
		--n-hiddens 8 --num-groups 8 --n-codes 512 --disc-channels 16 --perceptual-weight 0 --lambda-loc 1 \
		--log-every 50 --save-every 100 --fresh
	@echo "training Lad (--cond both) and V0 (--cond none) side by side; V0's log: $(DEMO_RUNS)/diffusion_v0.log"
	OMP_NUM_THREADS=1 $(PY) 04_diffusion.py $(DIFF_ARGS) --cond none --out $(DEMO_RUNS)/diffusion_v0 \
		> $(DEMO_RUNS)/diffusion_v0.log 2>&1 & v0=$$!; \
	OMP_NUM_THREADS=1 $(PY) 04_diffusion.py $(DIFF_ARGS) --cond both --out $(DEMO_RUNS)/diffusion; lad=$$?; \
	wait $$v0; v0=$$?; tail -n 2 $(DEMO_RUNS)/diffusion_v0.log; [ $$lad -eq 0 ] && [ $$v0 -eq 0 ]
	$(PY) 05_sample.py $(SAMPLE_ARGS) --diffusion $(DEMO_RUNS)/diffusion/ckpt.pt --out $(DEMO_RUNS)/samples
	$(PY) 05_sample.py $(SAMPLE_ARGS) --diffusion $(DEMO_RUNS)/diffusion_v0/ckpt.pt --out $(DEMO_RUNS)/samples_v0
	$(PY) 06_eval.py $(EVAL_ARGS) --fake lad=$(DEMO_RUNS)/samples --fake v0=$(DEMO_RUNS)/samples_v0 \
		--out $(DEMO_RUNS)/eval
	$(PY) tests/learning_checks.py $(DEMO_RUNS)

# Beyond the paper (docs/spatial.md): the mask as input channels of the denoiser (04 --spatial), alone and beside
# the paper's vector, against Lad and V0 at the demo's budget, seeds 0 and 1; after `make demo` (its phantoms, masks
# and VQ-GAN). Eight denoisers, two at a time: about 75 min on 2 cores. Table: runs/demo/spatial/table.md.
demo-spatial: $(VENV)/.installed
	$(PY) scripts/spatial_compare.py --diff-args "$(DIFF_ARGS)" --sample-args "$(SAMPLE_ARGS)" \
		--eval-args "$(EVAL_ARGS)" --out $(DEMO_RUNS)/spatial --seeds 0 1

# The downstream test (paper §4.3, Fig. 6) on the demo's output: SSL-ALPNet trained on real vs synthetic (Lad)
# vs mixed phantoms, ResNet-18, 500 episodes each (about 2 min on 2 cores; too long for `make demo`'s 15 minutes,
# hence a separate target). 64² slices give 8² feature maps (stride 8): pooling windows of 1 feature pixel
# (paper 4 and 2), superpixels min_size 100 (paper 400 px of 256²), lr 1e-2 for a short run (paper 1e-3 over
# 100k). The second command is the untrained network on the same test, for reference.
demo-ssl: $(VENV)/.installed
	$(PY) 07_ssl_seg.py --prep $(DEMO)/prep --synthetic lad=$(DEMO_RUNS)/samples --out $(DEMO_RUNS)/ssl \
		--backbone resnet18 --iters 500 --lr 1e-2 --lr-step 100 --runs 1 --sp-min-size 100 \
		--pool-train 1 --pool-test 1 --shift 1.25 --elastic-alpha 2.5 --elastic-sigma 1.25 \
		--log-every 100 --save-every 500 --workers 2 --overwrite
	$(PY) 07_ssl_seg.py --prep $(DEMO)/prep --synthetic lad=$(DEMO_RUNS)/samples --out $(DEMO_RUNS)/ssl_untrained \
		--train real --iters 0 --runs 3 --backbone resnet18 --sp-min-size 100 --pool-train 1 --pool-test 1 \
		--workers 2 --overwrite

# The paper on a GPU: Tables 1-3, Figures 4 and 6 (scripts/reproduce_paper.sh says which data and weights to set;
# QUICK=1 shortens the schedule, NGPU=N uses torchrun, DRY=1 prints the commands).
reproduce: $(VENV)/.installed
	bash scripts/reproduce_paper.sh

# The rehearsal of the paper run: every command of scripts/reproduce_paper.sh (both datasets, both VQ-GANs, five
# diffusion models, every sample set, the three evaluations, SSL-ALPNet, the tables) on phantoms at toy sizes, on the
# CPU, from scratch; then the tests of what went into each table (tests/test_rehearsal.py). About 10 minutes.
reproduce-tiny: $(VENV)/.installed
	rm -rf data/tiny runs/tiny
	TINY=1 bash scripts/reproduce_paper.sh
	$(PY) -m pytest -q -m rehearsal tests/test_rehearsal.py

# Fast default suite (tests marked slow are left out; `make test-all` runs them too).
test: $(VENV)/.installed
	$(PY) -m pytest -q

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m ""

# Our training steps against MONAI's DiffusionModelUNet and AutoencoderKL, side by side (README, Performance).
# MONAI is a benchmark-only peer: installed here into .venv, never needed by a stage.
bench-peers: $(VENV)/.installed
	$(PY) -m pip install --disable-pip-version-check -q monai==1.6.1 einops==0.8.2
	$(PY) bench.py --peers

# The first command on a GPU machine: GPU tests, bench at the paper's shapes, 300 steps of 03 and 04, sampling
# speed; one JSON and one markdown table under runs/gpu_check (about 8 minutes on one H200).
gpu-check: $(VENV)/.installed
	bash scripts/gpu_check.sh

clean-demo:
	rm -rf $(DEMO) $(DEMO_RUNS)
