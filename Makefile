# `make test` and `make demo` build .venv from nothing when it is missing (or when pyproject.toml/constraints.txt change).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

.PHONY: test demo venv clean

venv: $(VENV)/.installed

# pyproject.toml declares version ranges; constraints.txt pins the exact set installed here (torch 2.14.1,
# torchvision 0.29.1, timm 1.0.31, ...), so every machine tests the same environment.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip setuptools wheel
	$(VPY) -m pip install -c constraints.txt -e '.[test]'
	touch $@

test: venv
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs

# Train CBT on the 1,797 digits bundled with scikit-learn (configs/classification/digits.yaml) into runs/demo,
# re-evaluate the final checkpoint with --evaluate --resume (writes runs/demo/eval.json), print its top-1.
# OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads make torch many times slower when other jobs share the CPU.
demo: venv
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VPY) -m image_classification.main \
		--config configs/classification/digits.yaml --output-dir runs/demo --overwrite
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(VPY) -m image_classification.main \
		--config configs/classification/digits.yaml --output-dir runs/demo --evaluate --resume runs/demo/checkpoint.pth.tar
	@$(VPY) -c "import json; r = json.load(open('runs/demo/eval.json')); \
		print(f\"demo: final validation top-1 {r['top1']:.2f} % on {r['num_images']} digits (runs/demo/eval.json)\")"
