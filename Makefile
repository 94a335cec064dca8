# Quick start:  make demo   (MNIST: VQ-VAE, class prior, cpd + condot, sample grids)
#               make test   (the test suite)
# Both create .venv and install requirements*.txt when needed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := runs/demo
STEPS ?= 1500

.PHONY: setup demo demo-text test clean-demo

$(STAMP): requirements.txt requirements-assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -r requirements-assets.txt
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

$(DEMO)/vqvae/config.json: | $(STAMP)
	$(PY) train_vqvae.py --output_dir $(DEMO)/vqvae

$(DEMO)/prior/prior.json: $(DEMO)/vqvae/config.json
	$(PY) train_mapper.py --condition class --vqvae_directory $(DEMO)/vqvae --output_dir $(DEMO)/prior

$(DEMO)/cpd/unet/config.json: $(DEMO)/prior/prior.json
	$(PY) train.py --method cpd --prior_dir $(DEMO)/prior --vqvae_directory $(DEMO)/vqvae \
		--output_dir $(DEMO)/cpd --max_steps $(STEPS) --resume_from_checkpoint latest

$(DEMO)/condot/unet/config.json: $(DEMO)/vqvae/config.json
	$(PY) train.py --method condot --vqvae_directory $(DEMO)/vqvae \
		--output_dir $(DEMO)/condot --max_steps $(STEPS) --resume_from_checkpoint latest

$(DEMO)/%/samples-nfe15-euler/grid.png: $(DEMO)/%/unet/config.json
	$(PY) sample.py --run_dir $(DEMO)/$* --nfe 15 --solver euler --num_samples 100

demo: $(DEMO)/cpd/samples-nfe15-euler/grid.png $(DEMO)/condot/samples-nfe15-euler/grid.png
	@echo "Sample grids at 15 NFE (one column per class):"
	@echo "  cpd (conditional prior): $(DEMO)/cpd/samples-nfe15-euler/grid.png"
	@echo "  condot (N(0, I)):        $(DEMO)/condot/samples-nfe15-euler/grid.png"

# Text-conditional: MNIST captions built from the labels; the last two prompts use wordings held out of training.
$(DEMO)/mapper/prior.json: $(DEMO)/vqvae/config.json
	$(PY) train_mapper.py --condition text --vqvae_directory $(DEMO)/vqvae --output_dir $(DEMO)/mapper

$(DEMO)/text-cpd/unet/config.json: $(DEMO)/mapper/prior.json
	$(PY) train.py --condition text --method cpd --prior_dir $(DEMO)/mapper --vqvae_directory $(DEMO)/vqvae \
		--output_dir $(DEMO)/text-cpd --max_steps $(STEPS) --resume_from_checkpoint latest

demo-text: $(DEMO)/text-cpd/unet/config.json
	$(PY) sample.py --run_dir $(DEMO)/text-cpd --nfe 15 --cfg_scale 2 --samples_per_prompt 8 --prompts \
		"a handwritten digit 3" "the number seven" "the digit 0 written by hand" \
		"an image showing the numeral five" "digit 8, drawn in ink"
	@echo "Text grid (one row per prompt, see prompts.txt beside it): $(DEMO)/text-cpd/samples-nfe15-euler/grid.png"

clean-demo:
	rm -rf $(DEMO)
