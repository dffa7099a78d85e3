#!/usr/bin/env bash
# tests/gpu/run.sh: the GPU check in one call, under 8 minutes: build (or
# unpack a prepared bundle), run the gpu tests against the CPU reference,
# run the benchmarks beside the PyTorch peer, print one table.
#
#   tests/gpu/run.sh             on a machine with an NVIDIA GPU
#   tests/gpu/run.sh --prepare   on any machine with the project's build
#                                dependencies and nvcc: writes gpu-bundle.tar.xz
#                                (test_gpu and gpu_bench linked with the CUDA
#                                runtime and OpenBLAS statically, plus
#                                libcjson and libgomp), for a GPU machine that
#                                has CUDA 13 and PyTorch but not our build
#                                dependencies
#
# On the GPU machine the bundle is used when present; otherwise the two
# programs are built with CMake in build-gpu (which needs scripts/install-deps).
# Logs and the table go to $OUT (default /tmp/genpipe-gpu). GPU_BENCH_PEER=0
# skips the PyTorch peer.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUNDLE=$ROOT/gpu-bundle.tar.xz

if [ "${1:-}" = "--prepare" ]; then
	set -e
	B=$ROOT/build-gpu-portable
	cmake -S "$ROOT" -B "$B" -DCMAKE_BUILD_TYPE=Release -DGENPIPE_CUDA=ON \
		-DGENPIPE_GPU_PORTABLE=ON >"$B/../build-gpu-portable.log" 2>&1 || { cat "$B/../build-gpu-portable.log"; exit 1; }
	cmake --build "$B" -j"$(nproc)" --target test_gpu gpu_bench
	S=$(mktemp -d)
	mkdir -p "$S/gpu-bundle/bin" "$S/gpu-bundle/lib"
	cp "$B/bin/test_gpu" "$B/bin/gpu_bench" "$S/gpu-bundle/bin/"
	strip "$S"/gpu-bundle/bin/*
	for lib in libcjson.so.1 libgomp.so.1; do
		cp -L "$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ {print $NF; exit}')" \
			"$S/gpu-bundle/lib/"
	done
	tar -C "$S" -cJf "$BUNDLE" gpu-bundle
	rm -rf "$S"
	ls -la "$BUNDLE"
	exit 0
fi

OUT=${OUT:-/tmp/genpipe-gpu}
mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[$(($(date +%s) - T0))s] $*"; }

# where the CUDA 13 libraries are: the toolkit, or PyTorch's wheels
CUDA_LIBS=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
	[ -d "$d" ] && CUDA_LIBS="$CUDA_LIBS:$d"
done
PYLIBS=$(python3 - 2>/dev/null <<'EOF'
import glob, os, site
dirs = []
for s in site.getsitepackages():
    dirs += glob.glob(os.path.join(s, "nvidia", "*", "lib")) + glob.glob(os.path.join(s, "nvidia", "cu13", "lib"))
print(":".join(sorted(set(dirs))))
EOF
)
[ -n "$PYLIBS" ] && CUDA_LIBS="$CUDA_LIBS:$PYLIBS"

BIN=""
if [ -f "$BUNDLE" ]; then
	log "unpacking $BUNDLE"
	rm -rf /tmp/gpu-bundle && tar -C /tmp -xJf "$BUNDLE"
	export LD_LIBRARY_PATH="/tmp/gpu-bundle/lib$CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
	/tmp/gpu-bundle/bin/gpu_bench none >"$OUT/bundle_check.log" 2>&1
	rc=$?
	if [ $rc -eq 0 ] || [ $rc -eq 77 ]; then
		BIN=/tmp/gpu-bundle/bin
	else
		log "the bundle does not run here (exit $rc): $(head -c 300 "$OUT/bundle_check.log")"
	fi
fi
if [ -z "$BIN" ]; then
	log "building test_gpu and gpu_bench in build-gpu"
	cmake -S "$ROOT" -B "$ROOT/build-gpu" -DCMAKE_BUILD_TYPE=Release -DGENPIPE_CUDA=ON \
		>"$OUT/cmake.log" 2>&1 || { tail -20 "$OUT/cmake.log"; exit 1; }
	cmake --build "$ROOT/build-gpu" -j"$(nproc)" --target test_gpu gpu_bench \
		>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
	BIN=$ROOT/build-gpu/bin
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null | tee "$OUT/gpu.txt"

log "test_gpu (the CUDA path against the CPU reference)"
timeout 60 "$BIN/test_gpu" >"$OUT/test_gpu.log" 2>&1
TEST_RC=$?
tail -n 80 "$OUT/test_gpu.log"
log "test_gpu exit $TEST_RC (0 passed, 77 skipped, else failed)"
if [ $TEST_RC -ne 0 ] && [ $TEST_RC -ne 77 ]; then
	# diagnosis in the same call: the same seed without the cuBLASLt
	# epilogues, then under compute-sanitizer where the machine allows it
	seed=$(sed -n 's/.*GENPIPE_TEST_SEED=\([0-9]*\).*/\1/p' "$OUT/test_gpu.log" | head -1)
	log "test_gpu again, seed $seed, GENPIPE_GPU_NO_LT=1"
	GENPIPE_TEST_SEED=$seed GENPIPE_GPU_NO_LT=1 timeout 60 "$BIN/test_gpu" \
		>"$OUT/test_gpu_nolt.log" 2>&1
	log "without cuBLASLt: exit $? ($(grep -c 'check failed' "$OUT/test_gpu_nolt.log") failed checks)"
	if command -v compute-sanitizer >/dev/null; then
		log "compute-sanitizer memcheck"
		GENPIPE_TEST_SEED=$seed timeout 90 compute-sanitizer --tool memcheck \
			"$BIN/test_gpu" >"$OUT/test_gpu_memcheck.log" 2>&1
		grep -E "ERROR SUMMARY|Invalid|out of bounds" "$OUT/test_gpu_memcheck.log" | head -20
	fi
	# keep the call inside its limit: our figures only, no PyTorch peer
	export GPU_BENCH_PEER=0
fi

BENCH_RC=0
for shape in demo 124m; do
	log "gpu_bench $shape"
	limit=150
	[ "$shape" = 124m ] && limit=240 # torch.compile of the 124M model takes a minute or two
	timeout $limit "$BIN/gpu_bench" "$shape" "$ROOT/bench/torch_peer.py" >"$OUT/bench_$shape.log" 2>&1
	rc=$?
	[ $rc -ne 0 ] && BENCH_RC=$rc
	grep -v '^  | ' "$OUT/bench_$shape.log" | tail -n 30
done

log "summary"
{
	echo "test_gpu: exit $TEST_RC ($(grep -c 'check failed' "$OUT/test_gpu.log") failed checks)"
	for shape in demo 124m; do
		sed -n '/^measure/,/^goals/p' "$OUT/bench_$shape.log"
	done
} | tee "$OUT/table.txt"
[ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ]
