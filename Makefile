# Two commands on a fresh machine with python3 (README): `make demo` and `make test`.
# Both create .venv and install requirements.txt the first time.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO   := data/demo

.PHONY: demo test test-all clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

# The CPU demo: phantoms -> preprocessing -> masks -> VQ-GAN -> latent diffusion -> samples, in data/demo and runs/demo
# (never touches data/raw). The knobs are passed explicitly so you can see them. The grid is
# CPU-sized: 64x64x32 at 6x6x2.3 mm (the paper: 256x256x32 at 1.6x1.6x2.3 mm), a VQ-GAN of
# n_hiddens 8 (paper 16) with 512 codes (paper 16384), no LPIPS (its weights need a download);
# a Unet3D of width 16 (paper 64), batch 8 (paper 20), 1500 steps (about 8 min).
DEMO_RUNS := runs/demo

demo: $(VENV)/.installed
	$(PY) 00_phantoms.py --out $(DEMO)/raw --n 12 --seed 0
	$(PY) 01_preprocess.py --images $(DEMO)/raw/images --labels $(DEMO)/raw/labels --out $(DEMO)/prep \
		--dataset abdomenct1k --size 64 --depth 32 --spacing 6 6 2.3 --organ 4 --workers 2 --overwrite
	$(PY) 02_masks.py --prep $(DEMO)/prep --method labels --organ 4 --tumour 5 --overwrite
	$(PY) 03_vqgan.py --prep $(DEMO)/prep --out $(DEMO_RUNS)/vqgan --steps 300 --disc-start 200 --batch-size 2 \
		--n-hiddens 8 --num-groups 8 --n-codes 512 --disc-channels 16 --perceptual-weight 0 --lambda-loc 1 \
		--log-every 50 --save-every 100 --fresh
	$(PY) 04_diffusion.py --prep $(DEMO)/prep --vqgan $(DEMO_RUNS)/vqgan/ckpt.pt --out $(DEMO_RUNS)/diffusion \
		--cond both --dim 16 --dim-mults 1 2 4 8 --attn-heads 4 --attn-dim-head 16 --batch-size 8 --lr 5e-4 \
		--steps 1500 --ema-start 1000 --ema-every 1 --ema-decay 0.995 --log-every 250 --save-every 1500 \
		--n-preview 2 --workers 2 --fresh
	$(PY) 05_sample.py --prep $(DEMO)/prep --vqgan $(DEMO_RUNS)/vqgan/ckpt.pt --diffusion $(DEMO_RUNS)/diffusion/ckpt.pt \
		--out $(DEMO_RUNS)/samples --n 4 --aug-per-mask 1 --guidance 1.0 --sampler ddim --steps 50 --batch-size 4 --overwrite

# Fast default suite (tests marked slow are left out; `make test-all` runs them too).
test: $(VENV)/.installed
	$(PY) -m pytest -q

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m ""

clean-demo:
	rm -rf $(DEMO) $(DEMO_RUNS)
