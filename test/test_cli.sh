#!/bin/sh
# test_cli.sh LOUPE MODEL: the command line end to end on the tiny-a golden case.
# Checks the printed line, the files written with -o and --overlay, batch behaviour
# with a damaged file, exit statuses, and that no partial output is left behind; then
# `loupe eval` on a two-image labelled set (output format, ranges, determinism).
# PNG outputs are verified with an independent reader (Python's zlib) against the
# golden mask. Prints "N passed, M failed". $RUN (e.g. an emulator or wine) prefixes
# every run of LOUPE.
loupe=$1
model=$2
case=test/golden/tiny-a
tmp=${TMPDIR:-/tmp}/loupe-cli-test.$$
python=${PYTHON:-python3}
passed=0
failed=0
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT

# Runs LOUPE through $RUN; its stdout without the CRs of Windows text mode.
run_loupe() {
    $RUN "$loupe" "$@" > "$tmp/stdout"; status=$?
    tr -d '\r' < "$tmp/stdout"
    return $status
}

check() { # check DESCRIPTION COMMAND...
    what=$1; shift
    if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL $what"; fi
}

# Decodes an 8-bit gray or RGB PNG written by loupe with zlib and compares its pixels
# (or, for RGB, only its size) with the reference PNG.
png_same() { # png_same OURS REFERENCE
    "$python" - "$1" "$2" <<'EOF'
import struct, sys, zlib
def read(path):
    b = open(path, 'rb').read()
    assert b[:8] == b'\x89PNG\r\n\x1a\n', 'signature'
    i, idat, w = 8, b'', None
    while i < len(b):
        n, = struct.unpack('>I', b[i:i + 4]); kind = b[i + 4:i + 8]; data = b[i + 8:i + 8 + n]
        assert zlib.crc32(kind + data) == struct.unpack('>I', b[i + 8 + n:i + 12 + n])[0], 'crc'
        if kind == b'IHDR': w, h, depth, ctype, _, _, lace = struct.unpack('>IIBBBBB', data)
        if kind == b'IDAT': idat += data
        i += 12 + n
    assert depth == 8 and lace == 0, 'layout'
    ch = {0: 1, 2: 3}[ctype]
    raw, rows, prev, stride = zlib.decompress(idat), [], bytearray(w * ch), w * ch
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - ch] if x >= ch else 0; up = prev[x]; c = prev[x - ch] if x >= ch else 0
            if f == 1: line[x] = (line[x] + a) & 255
            elif f == 2: line[x] = (line[x] + up) & 255
            elif f == 3: line[x] = (line[x] + (a + up) // 2) & 255
            elif f == 4:
                p = a + up - c; pa, pb, pc = abs(p - a), abs(p - up), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else up if pb <= pc else c)) & 255
        rows.append(bytes(line)); prev = line
    return w, h, ch, b''.join(rows)
ours, ref = read(sys.argv[1]), read(sys.argv[2])
sys.exit(0 if ours[:2] == ref[:2] and (ours[2] == 3 or ours == ref) else 1)
EOF
}

# 1. help and usage errors
run_loupe -h > "$tmp/help" 2>&1; rc=$?
check "loupe -h exits 0 and prints the usage" sh -c "[ $rc -eq 0 ] && grep -q 'usage: loupe \\[-m MODEL.bin\\]' '$tmp/help'"
run_loupe > /dev/null 2> "$tmp/err"; rc=$?
check "no arguments is a usage error (exit 2)" sh -c "[ $rc -eq 2 ] && grep -q 'no images given' '$tmp/err'"
LOUPE_MODEL="$tmp/missing.bin" run_loupe "$case/image.png" > /dev/null 2> "$tmp/err"; rc=$?
check "without -m, \$LOUPE_MODEL is the model (exit 1 when missing, named)" sh -c "[ $rc -eq 1 ] && grep -q 'missing.bin' '$tmp/err'"
LOUPE_MODEL="$model" run_loupe "$case/image.png" > "$tmp/env.out" 2> "$tmp/err"; rc=$?
run_loupe -m "$model" "$case/image.png" > "$tmp/m.out" 2> /dev/null
check "without -m, \$LOUPE_MODEL predicts as -m does" sh -c "[ $rc -eq 0 ] && cmp -s '$tmp/env.out' '$tmp/m.out'"
run_loupe -m "$tmp/missing.bin" "$case/image.png" > /dev/null 2> "$tmp/err"; rc=$?
check "a missing weight file is named (exit 1)" sh -c "[ $rc -eq 1 ] && grep -q 'missing.bin: cannot open' '$tmp/err'"
run_loupe -m "$model" --threshold abc "$case/image.png" > /dev/null 2> "$tmp/err"; rc=$?
check "a bad option value is a usage error" sh -c "[ $rc -eq 2 ] && grep -q 'threshold' '$tmp/err'"

# 2. one image: exactly upstream's predictions.txt line, nothing on stderr
run_loupe -m "$model" "$case/image.png" > "$tmp/out" 2> "$tmp/err"; rc=$?
check "one image prints name,prob and exits 0" sh -c "[ $rc -eq 0 ] && [ \"\$(cat '$tmp/out')\" = 'image.png,0.5035' ]"
check "one image writes nothing to stderr" sh -c "[ ! -s '$tmp/err' ]"

# 3. a batch with a damaged file: the good images still get results, exit 1
head -c 5000 "$case/image.png" > "$tmp/cut.png"
cp test/corpus/png/basn2c08.png "$tmp/second.png"
run_loupe -m "$model" -o "$tmp/o" --overlay "$case/image.png" "$tmp/cut.png" "$tmp/second.png" \
    > "$tmp/out" 2> "$tmp/err"; rc=$?
check "a batch with a damaged file exits 1" sh -c "[ $rc -eq 1 ]"
check "the damaged file is named with a reason" grep -q "cut.png: " "$tmp/err"
check "progress lines i/n on stderr" grep -q "^\[3/3\] .*second.png [0-9]* ms" "$tmp/err"
check "both good images are printed" sh -c "[ \$(wc -l < '$tmp/out') -eq 2 ] && grep -q '^second.png,0\.[0-9]\{4\}$' '$tmp/out'"
check "predictions.txt holds the same lines" cmp -s "$tmp/out" "$tmp/o/predictions.txt"
check "the mask equals upstream's mask.png pixel for pixel" png_same "$tmp/o/masks/image.png" "$case/mask.png"
check "the overlay is a valid RGB PNG at the original size" png_same "$tmp/o/overlays/image.png" "$case/mask.png"
check "the damaged file has no mask" sh -c "[ ! -e '$tmp/o/masks/cut.png' ]"
check "no partial files are left" sh -c "! ls -R '$tmp/o' | grep -q '\.part$'"

# 4. -q silences progress; a directory argument is scanned
mkdir -p "$tmp/dir"
cp "$case/image.png" "$tmp/dir/a.png"
cp test/corpus/png/basn2c08.png "$tmp/dir/b.PNG"
echo "not an image" > "$tmp/dir/notes.txt"
run_loupe -m "$model" -q "$tmp/dir" > "$tmp/out" 2> "$tmp/err"; rc=$?
check "a directory is scanned in name order, -q is quiet" \
    sh -c "[ $rc -eq 0 ] && [ ! -s '$tmp/err' ] && [ \"\$(cut -d, -f1 '$tmp/out' | tr '\n' ' ')\" = 'a.png b.PNG ' ]"
run_loupe -m "$model" -q -v -o "$tmp/ov" "$tmp/dir" > "$tmp/out" 2> "$tmp/err"; rc=$?
check "-v prints one line: the milliseconds of every step, the total and the page faults" \
    sh -c "[ $rc -eq 0 ] && [ \$(wc -l < '$tmp/err') -eq 1 ] && grep -q '^loupe: 2 images: load [0-9]* ms, decode [0-9]* ms, preprocess [0-9]* ms, forward [0-9]* ms, post-process [0-9]* ms, write [0-9]* ms; total [0-9]* ms, [0-9]* minor and [0-9]* major page faults' '$tmp/err'"

# 5. inputs sharing a stem keep separate masks
cp test/corpus/jpeg/face_33x17_422.jpg "$tmp/dir/a.jpg"
run_loupe -m "$model" -q -o "$tmp/o2" "$tmp/dir/a.png" "$tmp/dir/a.jpg" > /dev/null 2>&1; rc=$?
check "a.png and a.jpg get a.png.png and a.jpg.png" \
    sh -c "[ $rc -eq 0 ] && [ -f '$tmp/o2/masks/a.png.png' ] && [ -f '$tmp/o2/masks/a.jpg.png' ]"
run_loupe -m "$model" -q -o "$tmp/o2" "$tmp/dir/a.png" > /dev/null 2>&1; rc=$?
check "a second run into the same -o DIR replaces the outputs" \
    sh -c "[ $rc -eq 0 ] && [ \$(wc -l < '$tmp/o2/predictions.txt') -eq 1 ]"

# 6. loupe eval on a tiny labelled set: tiny-a's image with train_mask.png (forged) and
#    tiny-b's photo (authentic), as a folder and as a list file
ds="$tmp/ds"
mkdir -p "$ds/images" "$ds/masks"
cp "$case/image.png" "$ds/images/forged.png"
cp "$case/train_mask.png" "$ds/masks/forged.png"
cp "$case/train_real.jpg" "$ds/images/real.jpg"
printf '# a list of the same set\nimages/forged.png masks/forged.png\n\nimages/real.jpg\n' > "$ds/list.txt"
run_loupe eval -h > "$tmp/help" 2>&1; rc=$?
check "loupe eval -h exits 0 and documents the metrics" \
    sh -c "[ $rc -eq 0 ] && grep -q 'usage: loupe eval -m MODEL.bin' '$tmp/help' && grep -q 'roc_auc_score' '$tmp/help'"
run_loupe eval -m "$model" "$ds" -o "$tmp/eval1.csv" > "$tmp/eval1" 2> "$tmp/err"; rc=$?
check "loupe eval on a folder exits 0" sh -c "[ $rc -eq 0 ]"
check "loupe eval prints images, forged, pixel_images, auc, f1, iou, overall, accuracy" \
    sh -c "[ \"\$(cut -d' ' -f1 '$tmp/eval1' | tr '\n' ' ')\" = 'images forged pixel_images auc f1 iou overall accuracy ' ]"
check "loupe eval counts 2 images, 1 forged, 1 with forged target pixels" \
    sh -c "grep -qx 'images 2' '$tmp/eval1' && grep -qx 'forged 1' '$tmp/eval1' && grep -qx 'pixel_images 1' '$tmp/eval1'"
check "every metric is a finite number in [0, 1]" "$python" -c "
import math, sys
v = dict(l.split() for l in open(sys.argv[1]))
ok = all(0.0 <= float(v[k]) <= 1.0 and math.isfinite(float(v[k])) for k in ('auc', 'f1', 'iou', 'overall', 'accuracy'))
ok = ok and abs(float(v['overall']) - (float(v['auc']) + float(v['f1']) + float(v['iou'])) / 3) < 2e-6
ok = ok and float(v['auc']) in (0.0, 0.5, 1.0)
sys.exit(0 if ok else 1)" "$tmp/eval1"
check "progress lines on stderr" grep -q '^\[2/2\] .*real.jpg [0-9]* ms' "$tmp/err"
check "-o writes a header and one line per image" "$python" -c "
import sys
rows = [l.rstrip('\n').split(',') for l in open(sys.argv[1])]
ok = rows[0] == ['image', 'label', 'probability', 'predicted_pixels', 'target_pixels'] and len(rows) == 3
ok = ok and rows[1][0].endswith('forged.png') and rows[1][1] == '1' and 0 < int(rows[1][4]) <= 30000
ok = ok and rows[2][0].endswith('real.jpg') and rows[2][1] == '0' and rows[2][4] == '0'
ok = ok and all(0.0 <= float(r[2]) <= 1.0 and 0 <= int(r[3]) for r in rows[1:])
sys.exit(0 if ok else 1)" "$tmp/eval1.csv"
run_loupe eval -q -m "$model" "$ds" -o "$tmp/eval2.csv" > "$tmp/eval2" 2> "$tmp/err"; rc=$?
check "a second run gives the same numbers and lines; -q is quiet" \
    sh -c "[ $rc -eq 0 ] && [ ! -s '$tmp/err' ] && cmp -s '$tmp/eval1' '$tmp/eval2' && cmp -s '$tmp/eval1.csv' '$tmp/eval2.csv'"
run_loupe eval -q -m "$model" "$ds/list.txt" > "$tmp/eval3" 2>&1; rc=$?
check "the list file gives the same numbers as the folder" sh -c "[ $rc -eq 0 ] && cmp -s '$tmp/eval1' '$tmp/eval3'"
run_loupe eval -q -m "$model" --seed 7 "$ds" > "$tmp/eval4" 2>&1; rc=$?
check "--seed is accepted and the result is well-formed" sh -c "[ $rc -eq 0 ] && grep -q '^overall 0\.[0-9]*$' '$tmp/eval4'"
run_loupe eval -m "$model" > /dev/null 2> "$tmp/err"; rc=$?
check "loupe eval without DATA is a usage error (exit 2)" sh -c "[ $rc -eq 2 ] && grep -q 'no dataset given' '$tmp/err'"
check "no partial files are left by eval" sh -c "! ls '$tmp' | grep -q '\.part$'"

echo "test_cli: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
