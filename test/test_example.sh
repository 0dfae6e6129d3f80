#!/bin/sh
# test_example.sh EXAMPLE MODEL CASE: the embedding example (test/example.c) on a golden
# case. Its printed probability must match the golden fused_prob within check_golden's
# tolerance, its forged-pixel count the golden mask within check_golden's mask
# agreement, and its errors must come back as messages. $RUN (e.g. an emulator)
# prefixes every run of EXAMPLE. Prints "N passed, M failed".
example=$1
model=$2
case=$3
tmp=${TMPDIR:-/tmp}/loupe-example-test.$$
python=${PYTHON:-python3}
passed=0
failed=0
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT

check() { # check DESCRIPTION COMMAND...
    what=$1; shift
    if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL $what"; fi
}

# Compares the example's output with the case's golden tensors (golden.txt lists
# `name dtype dims offset length` into golden.safetensors).
golden_agrees() { # golden_agrees OUTPUT CASE
    "$python" - "$1" "$2" <<'EOF'
import struct, sys
PROB_ABS_TOL, MIN_MASK_AGREEMENT = 3e-6, 0.999   # as in test/check_golden.c
out = dict(line.split(': ', 1) for line in open(sys.argv[1]).read().split('\n') if ': ' in line)
blob = open(sys.argv[2] + '/golden.safetensors', 'rb').read()
golden = {}
for line in open(sys.argv[2] + '/golden.txt'):
    name, dtype, dims, off, n = line.split()
    golden[name] = struct.unpack('<%df' % (int(n) // 4), blob[int(off):int(off) + int(n)])
prob = float(out['forgery probability'])
forged, size = out['forged pixels'].split(' of ')
w, h = map(int, size.split('x'))
gmask = golden['mask']
dprob = abs(prob - golden['fused_prob'][0])
dmask = abs(int(forged) - sum(v > 0 for v in gmask))
print('probability %.7f, golden %.7f, |d| %.2g (tol %g); forged pixels %s, golden %d'
      % (prob, golden['fused_prob'][0], dprob, PROB_ABS_TOL, forged, sum(v > 0 for v in gmask)))
ok = dprob <= PROB_ABS_TOL and w * h == len(gmask) and dmask <= (1 - MIN_MASK_AGREEMENT) * len(gmask)
sys.exit(0 if ok else 1)
EOF
}

# 1. the golden image: probability and mask
$RUN "$example" "$model" "$case/image.png" > "$tmp/raw" 2> "$tmp/err"; rc=$?
tr -d '\r' < "$tmp/raw" > "$tmp/out"
cat "$tmp/out"
check "the example classifies the image and exits 0" sh -c "[ $rc -eq 0 ] && [ ! -s '$tmp/err' ]"
check "probability and mask agree with the golden tensors" golden_agrees "$tmp/out" "$case"

# 2. errors come back from the library as sentences naming the problem
$RUN "$example" "$tmp/missing.bin" "$case/image.png" > /dev/null 2> "$tmp/err"; rc=$?
check "a missing weight file is reported by the library (exit 1)" \
    sh -c "[ $rc -eq 1 ] && grep -q 'missing.bin: cannot open' '$tmp/err'"
head -c 3000 "$case/image.png" > "$tmp/cut.png"
$RUN "$example" "$model" "$tmp/cut.png" > /dev/null 2> "$tmp/err"; rc=$?
check "a truncated image is reported by the decoder (exit 1)" sh -c "[ $rc -eq 1 ] && [ -s '$tmp/err' ]"

echo "test_example: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
