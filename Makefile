# make setup                  fresh machine: virtualenv + everything (CPU torch wheel first if no torch)
# make compare TASK=finance   the main job on the default model (smollm2-135m-instruct); JOBS=1: one job at a time
# make sweep GRID=tasks/sweeps/finance.yaml   a study: one arm per grid point (harness sweep --grid-file)
# make test                   the test suite (what .ci/run runs)
# make bench                  every scripts/bench_*.py (plain lm-eval vs the harness, TRL SFTTrainer vs the
#                             harness; needs the bench extra): results/bench/
# make bench BENCH_MODEL=random:llama-3.2-1b   the same at 1B (random weights: speed and memory only)
VENV    ?= .venv
TASK    ?= finance
MODEL   ?= smollm2-135m-instruct
METHODS ?= full,qlora
PROFILE ?=
RUN_ID  ?=
JOBS    ?=
GRID    ?= tasks/sweeps/$(TASK).yaml
BENCH_MODEL ?=
# Datasets come from the hub unless a mirror is named; ../shared/hf-mirror is used when it exists.
HARNESS_MIRROR ?= $(wildcard ../shared/hf-mirror)
export HARNESS_MIRROR
# IFEval (tasks/suites/instruct.yaml) splits sentences with NLTK's punkt_tab, which cannot be downloaded here.
NLTK_DATA ?= $(wildcard ../shared/nltk_data)
export NLTK_DATA

.PHONY: setup compare sweep report test test-fast bench clean
setup:
	bash scripts/setup.sh $(VENV)

compare:
	$(VENV)/bin/harness compare --task $(TASK) --model $(MODEL) --methods $(METHODS) \
		$(if $(PROFILE),--profile $(PROFILE)) $(if $(RUN_ID),--run-id $(RUN_ID)) $(if $(JOBS),--jobs $(JOBS))

sweep:
	$(VENV)/bin/harness sweep --task $(TASK) --model $(MODEL) --grid-file $(GRID) \
		$(if $(PROFILE),--profile $(PROFILE)) $(if $(RUN_ID),--run-id $(RUN_ID)) $(if $(JOBS),--jobs $(JOBS))

report:
	$(VENV)/bin/harness report $(RUN)

test:
	$(VENV)/bin/python -m pytest -q

test-fast:
	$(VENV)/bin/python -m pytest -q -m "not slow"

# Each script writes its own section of results/bench/<date>-<device>.md.
bench:
	@for s in $(wildcard scripts/bench_*.py); do echo "== $$s"; \
		$(VENV)/bin/python $$s $(if $(BENCH_MODEL),--model $(BENCH_MODEL)) || exit 1; done

clean:
	rm -rf work
