# Thin wrapper over CMake. The two commands the README promises:
#   make demo   install what is missing, build, run the main job
#   make test   install what is missing, build with warnings as errors, run
#               the whole suite, then again under ASan+UBSan with the fuzzers
BUILD      ?= build
SAN_BUILD  ?= build-asan
FUZZ_SECONDS ?= 10
JOBS       ?= $(shell nproc)
CTEST_JOBS ?= 2

.PHONY: all deps build demo test test-main test-sanitize bench down clean

all: build

deps:
	scripts/install-deps

build: deps
	cmake -S . -B $(BUILD) -DGENPIPE_WERROR=ON
	cmake --build $(BUILD) -j $(JOBS)

demo: build
	scripts/demo $(BUILD)

test: deps
	$(MAKE) test-main
	$(MAKE) test-sanitize

test-main:
	cmake -S . -B $(BUILD) -DGENPIPE_WERROR=ON
	cmake --build $(BUILD) -j $(JOBS)
	ctest --test-dir $(BUILD) --output-on-failure -j $(CTEST_JOBS)

# clang for libFuzzer; CUDA off so that every object is instrumented. The
# scenario test (three trainings) is left out: too slow instrumented, and
# every service it drives has its own test here.
test-sanitize:
	CC=clang cmake -S . -B $(SAN_BUILD) -DGENPIPE_WERROR=ON -DGENPIPE_SANITIZE=ON \
		-DGENPIPE_FUZZ=ON -DGENPIPE_CUDA=OFF -DGENPIPE_FUZZ_SECONDS=$(FUZZ_SECONDS)
	cmake --build $(SAN_BUILD) -j $(JOBS)
	ctest --test-dir $(SAN_BUILD) --output-on-failure -j $(CTEST_JOBS) -LE scenario

# Orchestrator overhead on a private stack: 1000-stage fan-out, 6 workers, 3 runs,
# parallelism 6 (and uncapped);
# then tokenizer training and encoding beside their plain references; then
# CPU training speed, fast path beside the plain C reference and sgemm; then
# serving under load, batched beside one at a time; then the drift monitor's
# throughput and memory.
bench: build
	$(BUILD)/bin/orchestrator_bench 1000 6 3 6
	$(BUILD)/bin/tokenizer_bench
	$(BUILD)/bin/model_bench all
	$(BUILD)/bin/infer_bench 32 10 32
	$(BUILD)/bin/monitor_bench 1000000 500

down:
	$(BUILD)/bin/genpipe dev down

clean:
	rm -rf $(BUILD) $(SAN_BUILD)
