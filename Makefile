# loupe.c - build and test. `make` builds ./loupe; `make test` runs the test suite.
CC      ?= cc
PYTHON  ?= python3
CFLAGS  ?= -O3
WARN     = -std=c99 -Wall -Wextra -pedantic
LDLIBS   = -lm
# OpenMP is used when the compiler has it; `make OPENMP=0` builds without it.
OPENMP  ?= $(shell printf 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo 1 || echo 0)
ifeq ($(OPENMP),1)
OMPFLAGS = -fopenmp
endif
# Tuned for the building machine when the compiler can (AVX-512 / AVX2 matmul kernels);
# `make NATIVE=` builds for the generic target, `-DLOUPE_NO_SIMD` in CFLAGS forces the
# portable C kernels.
NATIVE  ?= $(shell printf 'int main(void){return 0;}' | $(CC) -march=native -x c - -o /dev/null 2>/dev/null && echo -march=native)
# Lets gcc turn float comparisons in loops into vector selects (the exp and erf loops;
# clang does by default), and gcc and clang vectorise loops with sqrtf (AdamW's update:
# with errno kept, every square root needs a branch for negative arguments). Results are
# the same bits with or without them: loupe.c never reads floating-point exception flags
# or a math function's errno. `make VECFLAGS=` leaves them out.
VECFLAGS ?= $(shell printf 'int main(void){return 0;}' | $(CC) -fno-trapping-math -fno-math-errno -x c - -o /dev/null 2>/dev/null && echo -fno-trapping-math -fno-math-errno)
ALLFLAGS = $(WARN) $(CFLAGS) $(NATIVE) $(VECFLAGS) $(OMPFLAGS)

# OpenMP threads sleep between parallel regions instead of spinning: on this 2-vCPU
# machine spinning made the many small regions of the test suite up to 15x slower.
export OMP_WAIT_POLICY ?= passive

BUILD   ?= build
GOLDEN  ?= ../shared/golden
# Test programs run through $(RUN): an emulator prefix for cross builds, e.g.
# `make test CC=aarch64-linux-gnu-gcc NATIVE= RUN="qemu-aarch64 -L /usr/aarch64-linux-gnu"`.
RUN     ?=
export RUN
# Suffix of executables: `make EXE=.exe` for Windows targets (mingw-w64 adds it anyway).
EXE     ?=
export EXE

.PHONY: fuzz fuzz-run test-asan test-valgrind
.PHONY: all test test-full test-case test-unit test-convert test-images test-cli test-regress test-hostile
.PHONY: test-example test-lowp test-batch test-metrics test-init test-train-cls portability bench bench-gemm bench-tta bench-train clean

all: loupe

# ./loupe finds the demo model of this checkout from any directory (without -m).
loupe: loupe.c loupe.h
	$(CC) $(ALLFLAGS) -DLOUPE_DEMO_MODEL='"$(CURDIR)/weights/loupe-demo.bin"' -o $@ loupe.c $(LDLIBS)

# The tests use their own copy of the command, built with the test flags.
$(BUILD)/loupe$(EXE): loupe.c loupe.h | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ loupe.c $(LDLIBS)

$(BUILD):
	mkdir -p $(BUILD)

$(BUILD)/check_golden$(EXE): loupe.c loupe.h test/check_golden.c | $(BUILD)
	$(CC) $(ALLFLAGS) -DLOUPE_NO_MAIN -o $@ loupe.c test/check_golden.c $(LDLIBS)

$(BUILD)/test_kernels$(EXE): loupe.c loupe.h test/test_kernels.c | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/test_kernels.c $(LDLIBS)

$(BUILD)/check_images$(EXE): loupe.c loupe.h test/check_images.c | $(BUILD)
	$(CC) $(ALLFLAGS) -DLOUPE_NO_MAIN -o $@ loupe.c test/check_images.c $(LDLIBS)

$(BUILD)/check_lowp$(EXE): loupe.c loupe.h test/check_lowp.c test/golden_io.h test/measure.h | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/check_lowp.c $(LDLIBS)

$(BUILD)/bench_formats$(EXE): loupe.c loupe.h test/bench_formats.c | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/bench_formats.c $(LDLIBS)

$(BUILD)/bench$(EXE): loupe.c loupe.h test/bench.c test/measure.h test/peak.h | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/bench.c $(LDLIBS)

$(BUILD)/check_tta$(EXE): loupe.c loupe.h test/check_tta.c test/golden_io.h test/replay.h | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/check_tta.c $(LDLIBS)

$(BUILD)/check_train$(EXE): loupe.c loupe.h test/check_train.c test/golden_io.h test/replay.h | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/check_train.c $(LDLIBS)

$(BUILD)/check_batch$(EXE): loupe.c loupe.h test/check_batch.c test/golden_io.h | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/check_batch.c $(LDLIBS)

$(BUILD)/check_metrics$(EXE): loupe.c loupe.h test/check_metrics.c | $(BUILD)
	$(CC) $(ALLFLAGS) -DLOUPE_NO_MAIN -o $@ loupe.c test/check_metrics.c $(LDLIBS)

$(BUILD)/test_backward$(EXE): loupe.c loupe.h test/test_backward.c | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/test_backward.c $(LDLIBS)

$(BUILD)/check_train_cls$(EXE): loupe.c loupe.h test/check_train_cls.c test/golden_io.h | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/check_train_cls.c $(LDLIBS)

$(BUILD)/test_init$(EXE): loupe.c loupe.h test/test_init.c | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/test_init.c $(LDLIBS)

$(BUILD)/bench_tta$(EXE): loupe.c loupe.h test/bench_tta.c test/measure.h | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/bench_tta.c $(LDLIBS)

# Replays files through the fuzz targets' checks without libFuzzer (test/fuzz.c).
$(BUILD)/fuzz_replay$(EXE): loupe.c loupe.h test/fuzz.c | $(BUILD)
	$(CC) $(ALLFLAGS) -DFUZZ_REPLAY -o $@ test/fuzz.c $(LDLIBS)

$(BUILD)/make_shapes$(EXE): loupe.c loupe.h test/make_shapes.c | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/make_shapes.c $(LDLIBS)

$(BUILD)/bench_train$(EXE): loupe.c loupe.h test/bench_train.c test/measure.h | $(BUILD)
	$(CC) $(ALLFLAGS) -o $@ test/bench_train.c $(LDLIBS)

$(BUILD)/make_weights$(EXE): test/make_weights.c | $(BUILD)
	$(CC) $(WARN) $(CFLAGS) -o $@ test/make_weights.c $(LDLIBS)

# loupe.c as a library (no command line) and the embedding example, which uses only loupe.h.
$(BUILD)/loupe-lib.o: loupe.c loupe.h | $(BUILD)
	$(CC) $(ALLFLAGS) -DLOUPE_NO_MAIN -c -o $@ loupe.c

$(BUILD)/check_demo$(EXE): test/check_demo.c loupe.h $(BUILD)/loupe-lib.o
	$(CC) $(ALLFLAGS) -o $@ test/check_demo.c $(BUILD)/loupe-lib.o $(LDLIBS)

$(BUILD)/example$(EXE): test/example.c loupe.h $(BUILD)/loupe-lib.o
	$(CC) $(ALLFLAGS) -o $@ test/example.c $(BUILD)/loupe-lib.o $(LDLIBS)

# Every suite prints a line "N passed, M failed"; test/summary.sh adds them up and
# fails when any suite failed or none ran.
# Everything is built in $(BUILD) (the ./loupe of `make` is not needed), so builds with
# other compilers can run side by side (see `make portability`).
TEST_SUITES = test-convert test-images test-cli test-regress test-hostile test-tiny-a test-tiny-b \
              test-lowp-tiny-a test-lowp-tiny-b test-unit test-example test-batch test-metrics test-init test-train test-train-cls
test: $(BUILD)/loupe$(EXE) $(BUILD)/make_shapes$(EXE) $(BUILD)/test_init$(EXE) $(BUILD)/test_kernels$(EXE) $(BUILD)/test_backward$(EXE) $(BUILD)/check_golden$(EXE) $(BUILD)/check_tta$(EXE) $(BUILD)/check_train$(EXE) $(BUILD)/check_images$(EXE) $(BUILD)/make_weights$(EXE) $(BUILD)/example$(EXE) $(BUILD)/check_lowp$(EXE) $(BUILD)/fuzz_replay$(EXE) $(BUILD)/check_batch$(EXE) $(BUILD)/check_metrics$(EXE) $(BUILD)/check_train_cls$(EXE)
	@sh test/summary.sh $(BUILD)/test-log.txt \
	  $(foreach t,$(TEST_SUITES),"$(MAKE) --no-print-directory $(t)")

test-tiny-%:
	@$(MAKE) --no-print-directory test-case CASE=test/golden/tiny-$*

test-unit: $(BUILD)/test_kernels$(EXE) $(BUILD)/test_backward$(EXE) $(BUILD)/tiny-a.bin
	$(RUN) $(BUILD)/test_kernels$(EXE) $(BUILD)/tiny-a.bin
	$(RUN) $(BUILD)/test_backward$(EXE) $(BUILD)/tiny-a.bin

# One training step of stage cls (backbone and classifier backward, LoupeClsLoss) against
# tiny-a's train.* golden, and the whole backbone's backward by central differences.
test-train-cls: $(BUILD)/check_train_cls$(EXE) $(BUILD)/tiny-a.bin
	$(RUN) $(BUILD)/check_train_cls$(EXE) $(BUILD)/tiny-a.bin test/golden/tiny-a

# Upstream's training batch (DataModule.train_collate_fn) rebuilt from the tiny-a files
# against the golden one, bit for bit (test/check_batch.c).
test-batch: $(BUILD)/check_batch$(EXE) $(BUILD)/tiny-a.bin
	$(RUN) $(BUILD)/check_batch$(EXE) $(BUILD)/tiny-a.bin test/golden/tiny-a

# A short real training run (a tiny model from loupe init on photo crops with pasted
# shapes): the loss falls, held-out metrics improve, --resume is bit for bit, bad inputs
# stop before any compute (test/test_train.sh).
test-train: $(BUILD)/loupe$(EXE) $(BUILD)/make_shapes$(EXE)
	sh test/test_train.sh $(BUILD)/loupe$(EXE) $(BUILD)/make_shapes$(EXE) $(BUILD)

# The demo model on its samples: library, command line without -m, -m, $$LOUPE_MODEL.
# Not in make test yet: no demo model is shipped (weights/README.md, "Demo model").
test-demo: $(BUILD)/loupe$(EXE) $(BUILD)/check_demo$(EXE)
	sh test/test_demo.sh $(BUILD)/loupe$(EXE) $(BUILD)/check_demo$(EXE)

# Upstream's validation metrics (auc, f1, iou, overall) on the metrics golden.
test-metrics: $(BUILD)/check_metrics$(EXE)
	$(RUN) $(BUILD)/check_metrics$(EXE) test/golden/metrics
# `loupe init` (random initialisation with upstream's scheme) on tiny-a and tiny-b: the
# library (rules, statistics, forward, determinism, --backbone, BF16/Q8, bad configs) and
# the command line (convert.py's header, pinned hashes, exit statuses and messages).
test-init: $(BUILD)/loupe$(EXE) $(BUILD)/test_init$(EXE) $(BUILD)/tiny-a.bin
	@mkdir -p $(BUILD)/init
	$(RUN) $(BUILD)/test_init$(EXE) $(BUILD)/init $(BUILD)/tiny-a.bin test/golden/tiny-a test/golden/tiny-b
	sh test/test_init.sh $(BUILD)/loupe$(EXE) $(BUILD)/tiny-a.bin

# The embedding example on the tiny-a case: probability and mask against the golden values.
test-example: $(BUILD)/example$(EXE) $(BUILD)/tiny-a.bin
	sh test/test_example.sh $(BUILD)/example$(EXE) $(BUILD)/tiny-a.bin test/golden/tiny-a

$(BUILD)/tiny-a.bin: test/golden/tiny-a/model.safetensors tools/convert.py | $(BUILD)
	$(PYTHON) tools/convert.py --config test/golden/tiny-a/config.json -o $@ test/golden/tiny-a/model.safetensors

test-convert:
	$(PYTHON) test/test_convert.py

# Decoders and resize against PIL's results for every file of a manifest
# (default: the corpus copied into test/corpus; any manifest in that format works).
MANIFEST ?= test/corpus/manifest.txt
test-images: $(BUILD)/check_images$(EXE)
	$(RUN) $(BUILD)/check_images$(EXE) $(MANIFEST)

test-cli: $(BUILD)/loupe$(EXE) $(BUILD)/tiny-a.bin
	sh test/test_cli.sh $(BUILD)/loupe$(EXE) $(BUILD)/tiny-a.bin

# Damaged images and weight files on the command line; writes the measured table of
# inputs, exit statuses and messages to $(BUILD)/hostile-table.md.
test-hostile: $(BUILD)/loupe$(EXE) $(BUILD)/tiny-a.bin
	$(PYTHON) test/test_hostile.py $(BUILD)/loupe$(EXE) $(BUILD)/tiny-a.bin --table $(BUILD)/hostile-table.md

# Every input that once crashed a fuzz target, named after the target (png-*, jpeg-*,
# ppm-*, weights-*), replayed through the same checks.
test-regress: $(BUILD)/fuzz_replay$(EXE)
	@for t in png jpeg ppm weights; do \
	  set -- test/fuzz/regress/$$t-*; [ -e "$$1" ] || continue; \
	  $(RUN) $(BUILD)/fuzz_replay$(EXE) $$t "$$@" || exit 1; \
	done

# Every compiler and target this machine has (gcc, clang, tcc, -m32, aarch64 under qemu,
# mingw-w64 under wine), one line per configuration, each built and tested in its own
# $(BUILD)/portability/NAME; CONFIGS="clang-O3 tcc" runs some (test/portability.sh).
CONFIGS ?=
portability:
	@MAKE="$(MAKE)" sh test/portability.sh $(BUILD)/portability $(CONFIGS)

# Speed and memory of the full-size model on the full-1 photo (never part of make test),
# then accuracy, size, memory and time of the F32, BF16 and Q8 weight files on every
# golden case (full-1 files converted once, kept in $(BUILD)), and the forward time of
# the three full-1 files measured in interleaved rounds. Threads spin between the
# forward's parallel regions (measured about 6 % faster than sleeping).
BENCH_ROUNDS ?= 7
BENCH_WAIT_POLICY ?= active
bench: $(BUILD)/bench$(EXE) $(BUILD)/make_weights$(EXE) $(BUILD)/check_lowp$(EXE) $(BUILD)/bench_formats$(EXE)
	@test -f $(BUILD)/full-1.bin || $(MAKE) --no-print-directory $(BUILD)/full-1.bin
	OMP_WAIT_POLICY=$(BENCH_WAIT_POLICY) $(RUN) $(BUILD)/bench$(EXE) $(BUILD)/full-1.bin $(GOLDEN)/full-1/image.png
	@sh test/lowp.sh bench "$(PYTHON)" $(BUILD) test/golden/tiny-a test/golden/tiny-b $(GOLDEN)/full-1
	OMP_WAIT_POLICY=$(BENCH_WAIT_POLICY) $(RUN) $(BUILD)/bench_formats$(EXE) $(GOLDEN)/full-1/image.png $(BENCH_ROUNDS) $(BUILD)/full-1.bin $(BUILD)/full-1-bf16.bin $(BUILD)/full-1-q8.bin

$(BUILD)/full-1.bin: $(BUILD)/make_weights$(EXE)
	$(RUN) $(BUILD)/make_weights$(EXE) test/golden/full-1/keys.json 1 $(BUILD)/full-1.safetensors
	$(PYTHON) tools/convert.py --config test/golden/full-1/config.json -o $@ $(BUILD)/full-1.safetensors
	rm -f $(BUILD)/full-1.safetensors

# Converts a golden case's weights the way users have them and checks every tensor:
# backbone.pt + heads.safetensors if present, else model.safetensors, else weights
# regenerated from keys.json and the config's seed by the make_weights formula.
# A case with tta.safetensors also gets the test-time-adaptation check.
test-case: $(BUILD)/check_golden$(EXE) $(BUILD)/check_tta$(EXE) $(BUILD)/check_train$(EXE) $(BUILD)/make_weights$(EXE)
	@test -n "$(CASE)" || { echo "usage: make test-case CASE=path/to/case"; exit 2; }
	@name=$$(basename $(CASE)); out=$(BUILD)/$$name.bin; \
	if [ -f $(CASE)/backbone.pt ] && [ -f $(CASE)/heads.safetensors ]; then \
	  src="$(CASE)/backbone.pt $(CASE)/heads.safetensors"; \
	elif [ -f $(CASE)/model.safetensors ]; then \
	  src="$(CASE)/model.safetensors"; \
	else \
	  seed=$$($(PYTHON) -c "import json,sys; print(json.load(open(sys.argv[1]))['seed'])" $(CASE)/config.json) || exit 1; \
	  $(RUN) $(BUILD)/make_weights$(EXE) $(CASE)/keys.json $$seed $(BUILD)/$$name.safetensors || exit 1; \
	  src="$(BUILD)/$$name.safetensors"; \
	fi; \
	$(PYTHON) tools/convert.py --config $(CASE)/config.json -o $$out $$src || exit 1; \
	status=0; $(RUN) $(BUILD)/check_golden$(EXE) $$out $(CASE) || status=1; \
	if [ -f $(CASE)/tta.safetensors ]; then $(RUN) $(BUILD)/check_tta$(EXE) $$out $(CASE) || status=1; fi; \
	if [ -f $(CASE)/train.safetensors ]; then echo "$(CASE): training golden (train.safetensors): one step of cls, seg, cls_seg"; \
	  $(RUN) $(BUILD)/check_train$(EXE) $$out $(CASE) || status=1; fi; \
	exit $$status

# The case converted with BF16 and with Q8 weight matrices, each checked against its
# accuracy targets (test/check_lowp.c).
test-lowp: $(BUILD)/check_lowp$(EXE) $(BUILD)/make_weights$(EXE)
	@test -n "$(CASE)" || { echo "usage: make test-lowp CASE=path/to/case"; exit 2; }
	@sh test/lowp.sh check "$(PYTHON)" $(BUILD) $(CASE)

test-lowp-tiny-%:
	@$(MAKE) --no-print-directory test-lowp CASE=test/golden/tiny-$*

test-full: $(BUILD)/check_golden$(EXE) $(BUILD)/check_tta$(EXE) $(BUILD)/check_train$(EXE) $(BUILD)/make_weights$(EXE)
	@sh test/summary.sh $(BUILD)/test-full-log.txt "$(MAKE) --no-print-directory test-case CASE=$(GOLDEN)/full-1"

# The whole suite under AddressSanitizer and UndefinedBehaviorSanitizer, in its own
# build directory.
test-asan:
	$(MAKE) --no-print-directory test BUILD=$(BUILD)/asan \
	  CFLAGS="-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"

# One end-to-end run of the command under valgrind's memcheck: a batch with a damaged
# image, masks and overlays written; any error or leak fails. Built without OpenMP (its
# thread pool is never torn down) and for the generic target (valgrind lacks AVX-512).
VALGRIND ?= valgrind
test-valgrind: $(BUILD)/tiny-a.bin
	$(MAKE) --no-print-directory $(BUILD)/valgrind/loupe BUILD=$(BUILD)/valgrind OPENMP=0 NATIVE= CFLAGS="-O2 -g"
	rm -rf $(BUILD)/valgrind/out && head -c 5000 test/golden/tiny-a/image.png > $(BUILD)/valgrind/cut.png
	$(VALGRIND) --tool=memcheck --leak-check=full --show-leak-kinds=all --errors-for-leak-kinds=all \
	  --error-exitcode=99 $(BUILD)/valgrind/loupe -m $(BUILD)/tiny-a.bin -o $(BUILD)/valgrind/out --overlay \
	  test/golden/tiny-a/image.png $(BUILD)/valgrind/cut.png test/corpus/jpeg/face_33x17_422.jpg; \
	  test $$? -eq 1 # the damaged image makes the batch exit 1; valgrind's errors exit 99

# libFuzzer targets with AddressSanitizer and UndefinedBehaviorSanitizer (clang).
# `make fuzz-run FUZZ_RUNS=N` runs each for N executions from the seed corpora, one after
# another, and prints a table of executions and coverage (test/fuzz_stats.sh).
FUZZ_CC    ?= clang
# -O2: a third more executions a second than -O1 on the JPEG target. The kernels listed
# in test/fuzz/no-coverage.txt are built without coverage tracing (still sanitized).
# The JPEG target keeps edge coverage but drops comparison tracing: its entropy decoders
# compare on every coefficient, and the tracing took 77 % of its time (690 runs a second
# per core; 4 to 5 times more without) once the corpus had every marker and table kind.
FUZZ_FLAGS  = -std=c99 -g -O2 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
              -fsanitize-coverage-ignorelist=test/fuzz/no-coverage.txt
FUZZ_FLAGS_jpeg = -fno-sanitize-coverage=trace-cmp
FUZZ_RUNS  ?= 10000000
FUZZ_TARGETS = png jpeg ppm weights
fuzz: $(foreach t,$(FUZZ_TARGETS),$(BUILD)/fuzz_$(t))

$(BUILD)/fuzz_%: test/fuzz.c loupe.c loupe.h test/fuzz/no-coverage.txt | $(BUILD)
	$(FUZZ_CC) $(FUZZ_FLAGS) $(FUZZ_FLAGS_$*) -DFUZZ_$$(echo $* | tr a-z A-Z) -o $@ test/fuzz.c -lm

fuzz-run: fuzz
	@status=0; for t in $(FUZZ_TARGETS); do \
	  case $$t in png) seeds="test/corpus/png test/corpus/fuzz";; jpeg) seeds="test/corpus/jpeg test/corpus/fuzz";; \
	    ppm) seeds="test/fuzz/ppm";; weights) seeds="test/fuzz/weights";; esac; \
	  mkdir -p $(BUILD)/fuzz-corpus/$$t; \
	  echo "fuzz_$$t: $(FUZZ_RUNS) runs, log in $(BUILD)/fuzz-$$t.log"; \
	  $(BUILD)/fuzz_$$t -runs=$(FUZZ_RUNS) -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
	    -artifact_prefix=$(BUILD)/fuzz-crash-$$t- -print_final_stats=1 $(BUILD)/fuzz-corpus/$$t $$seeds \
	    > $(BUILD)/fuzz-$$t.log 2>&1 || status=1; \
	done; \
	sh test/fuzz_stats.sh $(foreach t,$(FUZZ_TARGETS),$(BUILD)/fuzz-$(t).log); exit $$status

# The forward's main matrix products (backbone block, pixel decoder, masks) for a sweep
# of candidate gemm blockings of this machine's instruction set, each its own binary,
# 2 threads spinning: one table of GFLOP/s and % of the measured FMA peak
# (test/bench_gemm.sh; about 5 minutes). BENCH_GEMM_CANDIDATES="MR NV KC NC MC PACK_A SWAP; ..."
# times other blockings. Never part of make test.
BENCH_GEMM_SECONDS ?= 0.3
BENCH_GEMM_ROUNDS ?= 2
bench-gemm: | $(BUILD)
	OMP_NUM_THREADS=2 OMP_WAIT_POLICY=active BENCH_GEMM_CANDIDATES="$(BENCH_GEMM_CANDIDATES)" \
	  sh test/bench_gemm.sh $(BUILD) "$(CC)" "$(ALLFLAGS)" \
	  $(BENCH_GEMM_SECONDS) $(BENCH_GEMM_ROUNDS)

# One training step at full size against the forward (2 threads): cls_seg (backbone
# trained) and seg on kept backbone outputs, each in its own process for its peak memory;
# then the images/s of a short tiny-config run. Never part of make test.
bench-train: $(BUILD)/bench_train$(EXE) $(BUILD)/make_weights$(EXE) $(BUILD)/loupe$(EXE) $(BUILD)/make_shapes$(EXE)
	@test -f $(BUILD)/full-1.bin || $(MAKE) --no-print-directory $(BUILD)/full-1.bin
	OMP_NUM_THREADS=2 $(RUN) $(BUILD)/bench_train$(EXE) $(BUILD)/full-1.bin cls_seg 5
	OMP_NUM_THREADS=2 $(RUN) $(BUILD)/bench_train$(EXE) $(BUILD)/full-1.bin seg 5
	OMP_NUM_THREADS=2 $(RUN) $(BUILD)/bench_train$(EXE) $(BUILD)/full-1.bin seg-cached 5
	@sh test/bench_train_tiny.sh $(BUILD)/loupe$(EXE) $(BUILD)/make_shapes$(EXE) $(BUILD)

# Time and memory of one test-time-adaptation step against a forward on the full-size
# model (converted by `make test-full`); BENCH_MODEL and BENCH_CASE override.
BENCH_MODEL ?= $(BUILD)/full-1.bin
BENCH_CASE  ?= $(GOLDEN)/full-1
bench-tta: $(BUILD)/bench_tta$(EXE)
	@test -f $(BENCH_MODEL) || { echo "bench: $(BENCH_MODEL) is missing; run make test-full first"; exit 2; }
	$(RUN) $(BUILD)/bench_tta$(EXE) $(BENCH_MODEL) $(BENCH_CASE)

# The demo model's training data (tools/make_demo_data.py; see tools/README.md): downloads Debian packages of
# freely licensed photos into $(BUILD)/demo-debs (apt-get download), unpacks them into $(BUILD)/demo-root
# (dpkg-deb -x, nothing installed) and writes $(BUILD)/demo-data/{train,valid}/{images,masks}, sources.tsv and
# DATA-CREDITS.md. A build-time data tool only: it needs Debian's python3-pil and python3-numpy (installed by
# demo-deps when run as root), which loupe.c and `make test` never need.
DEMO_PYTHON ?= /usr/bin/python3
DEMO_SEED   ?= 1
DEMO_TRAIN  ?= 2000
DEMO_VALID  ?= 300
DEMO_SIZE   ?= 256
DEMO_PRONOUNCED ?= 0
DEMO_JOBS   ?= 2
.PHONY: demo-deps demo-data test-demo-data
demo-deps:
	@$(DEMO_PYTHON) -c 'import PIL, numpy' 2>/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "demo-deps: installing python3-pil python3-numpy"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-pil python3-numpy || exit 1; \
	else \
	  echo "demo-deps: $(DEMO_PYTHON) lacks PIL or numpy: run (as root) apt-get install python3-pil python3-numpy"; exit 1; \
	fi; $(DEMO_PYTHON) -c 'import PIL, numpy'

demo-data: demo-deps
	@command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || \
	  { echo "demo-data: needs apt-get and dpkg-deb (a Debian system) to fetch the photo packages"; exit 1; }
	$(DEMO_PYTHON) tools/make_demo_data.py --build $(BUILD) --seed $(DEMO_SEED) --train $(DEMO_TRAIN) \
	  --valid $(DEMO_VALID) --size $(DEMO_SIZE) --pronounced $(DEMO_PRONOUNCED) --jobs $(DEMO_JOBS)

# The data tool's unit test (synthetic photos, no network); not part of `make test`.
# A demo model (weights/loupe-demo.bin): weights/demo-config.json initialised by loupe init,
# trained by loupe train --stage cls_seg on make demo-data's set (DEMO_TRAIN=6000
# DEMO_VALID=400), the best epoch by validation overall kept; log in $(BUILD)/demo-model/.
# The first recipe (these flags) did not reach usable accuracy: weights/README.md.
DEMO_EPOCHS ?= 3
DEMO_MODEL_FLAGS ?= --epochs $(DEMO_EPOCHS) --batch 16 --accum 1 --lr 5e-4 --backbone-lr 5e-4 --weight-decay 0.05 \
                    --schedule cosine --warmup 0.05 --seed 1
.PHONY: demo-model
demo-model: $(BUILD)/loupe$(EXE)
	@test -d $(BUILD)/demo-data/train || { echo "demo-model: run make demo-data DEMO_TRAIN=6000 DEMO_VALID=400 first"; exit 1; }
	mkdir -p $(BUILD)/demo-model
	$(RUN) $(BUILD)/loupe$(EXE) init --config weights/demo-config.json -o $(BUILD)/demo-model/init.bin --seed 1
	$(RUN) $(BUILD)/loupe$(EXE) train --stage cls_seg -m $(BUILD)/demo-model/init.bin --train $(BUILD)/demo-data/train \
	  --valid $(BUILD)/demo-data/valid -o $(BUILD)/demo-model/demo.bin $(DEMO_MODEL_FLAGS) 2> $(BUILD)/demo-model/train.log
	$(PYTHON) tools/convert.py --dtype bf16 -o weights/loupe-demo.bin $(BUILD)/demo-model/demo.bin

test-demo-data: demo-deps
	$(DEMO_PYTHON) tools/test_make_demo_data.py

clean:
	rm -rf loupe $(BUILD)
