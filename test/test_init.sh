#!/bin/sh
# test_init.sh LOUPE CONVERTED.bin: `loupe init` on the command line (tiny-a, tiny-b).
# The header and tensor index equal tools/convert.py's for the same config (byte for
# byte up to the data); the same seed gives the same bytes (and the pinned SHA-256 of
# two files, so every platform draws the same values); --backbone and --dtype files
# load and predict; bad options exit 2 and bad configs exit 1, each with one message
# and no output file. Prints "N passed, M failed". $RUN prefixes every run of LOUPE.
loupe=$1
converted=$2
python=${PYTHON:-python3}
tmp=${TMPDIR:-/tmp}/loupe-init-test.$$
passed=0
failed=0
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT

check() { # check DESCRIPTION COMMAND...
    what=$1; shift
    if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL $what"; fi
}

sha256() { "$python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }
data_offset() { "$python" -c 'import struct, sys; print(struct.unpack_from("<Q", open(sys.argv[1], "rb").read(32), 24)[0])' "$1"; }
same_prefix() { # same_prefix A B N: the first N bytes of A and B are equal
    "$python" -c 'import sys; n = int(sys.argv[3]); a = open(sys.argv[1], "rb").read(n); b = open(sys.argv[2], "rb").read(n); sys.exit(a != b or len(a) != n)' "$1" "$2" "$3"
}

# usage_error DESCRIPTION EXPECTED-MESSAGE ARGS...: exit 2, one line naming the problem, no file
usage_error() {
    what=$1; want=$2; shift 2
    rm -f "$tmp/out.bin"
    $RUN "$loupe" init "$@" > "$tmp/stdout" 2> "$tmp/stderr"; status=$?
    lines=$(wc -l < "$tmp/stderr")
    check "$what: exit $status (want 2), stderr: $(cat "$tmp/stderr")" \
        sh -c "[ $status -eq 2 ] && [ $lines -eq 1 ] && grep -q -- \"$want\" \"$tmp/stderr\" && [ ! -e \"$tmp/out.bin\" ] && [ ! -e \"$tmp/out.bin.tmp\" ]"
}
# input_error DESCRIPTION EXPECTED-MESSAGE ARGS...: exit 1, the message, no file
input_error() {
    what=$1; want=$2; shift 2
    rm -f "$tmp/out.bin"
    $RUN "$loupe" init "$@" > "$tmp/stdout" 2> "$tmp/stderr"; status=$?
    check "$what: exit $status (want 1), stderr: $(cat "$tmp/stderr")" \
        sh -c "[ $status -eq 1 ] && grep -q -- \"$want\" \"$tmp/stderr\" && [ ! -e \"$tmp/out.bin\" ] && [ ! -e \"$tmp/out.bin.tmp\" ]"
}

a=test/golden/tiny-a
b=test/golden/tiny-b

# Help.
$RUN "$loupe" init -h > "$tmp/help" 2>&1; status=$?
check "loupe init -h exits 0 with the usage" sh -c "[ $status -eq 0 ] && grep -q 'usage: loupe init --config' '$tmp/help'"

# The same header as convert.py, the same bytes for the same seed, pinned hashes.
$RUN "$loupe" init --config $a/config.json -o "$tmp/a1.bin" --seed 1 2> "$tmp/stderr"
check "init tiny-a: $(cat "$tmp/stderr")" grep -q "wrote $tmp/a1.bin (seed 1)" "$tmp/stderr"
check "tiny-a: header and index equal convert.py's" same_prefix "$tmp/a1.bin" "$converted" "$(data_offset "$converted")"
$RUN "$loupe" init --seed 1 -o "$tmp/a2.bin" --config $a/config.json 2> /dev/null
check "tiny-a: same seed, same bytes" cmp -s "$tmp/a1.bin" "$tmp/a2.bin"
$RUN "$loupe" init --config $a/config.json -o "$tmp/a3.bin" --seed 2 2> /dev/null
check "tiny-a: another seed, another file" sh -c "! cmp -s '$tmp/a1.bin' '$tmp/a3.bin'"
check "tiny-a seed 1: pinned SHA-256" [ "$(sha256 "$tmp/a1.bin")" = 20e81341c267723a4169a0e656feeefd2cf4e737ca4d882a2a3a818dbb828bcc ]
$RUN "$loupe" init --config $b/config.json -o "$tmp/b7.bin" --seed 7 --dtype q8 2> /dev/null
check "tiny-b seed 7 q8: pinned SHA-256" [ "$(sha256 "$tmp/b7.bin")" = 6dca28f00811ac9ea2a36d3bfff058c89a69554d3421336f7fa5e96a4e51738e ]
$RUN "$loupe" init --config $b/config.json -o "$tmp/b1.bin" --seed 1 2> /dev/null
"$python" tools/convert.py --config $b/config.json -o "$tmp/b-converted.bin" $b/model.safetensors 2> /dev/null
check "tiny-b: header and index equal convert.py's" same_prefix "$tmp/b1.bin" "$tmp/b-converted.bin" "$(data_offset "$tmp/b-converted.bin")"

# The files predict (the backbone from the converted golden weights, BF16).
for f in a1 b7 b1; do
    img=$a/image.png; case $f in b*) img=$b/image.jpg;; esac
    line=$($RUN "$loupe" -m "$tmp/$f.bin" "$img" | tr -d '\r')
    check "$f.bin predicts: '$line'" sh -c "echo '$line' | grep -Eq '^image\\.(png|jpg),0\\.[0-9]{4}\$'"
done
$RUN "$loupe" init --config $a/config.json -o "$tmp/ab.bin" --seed 1 --backbone "$converted" --dtype bf16 2> "$tmp/stderr"
check "--backbone: $(cat "$tmp/stderr")" grep -q "backbone from $converted" "$tmp/stderr"
line=$($RUN "$loupe" -m "$tmp/ab.bin" $a/image.png | tr -d '\r')
check "--backbone --dtype bf16 predicts: '$line'" sh -c "echo '$line' | grep -Eq '^image\\.png,0\\.[0-9]{4}\$'"

# The other way to a real backbone with fresh heads: convert.py reads loupe.c weight files,
# so `convert.py INIT.bin backbone.pt` (later files override) gives the same bytes.
$RUN "$loupe" init --config $a/config.json -o "$tmp/ab32.bin" --seed 1 --backbone "$converted" 2> /dev/null
"$python" tools/convert.py --config $a/config.json -o "$tmp/comb.bin" "$tmp/a1.bin" $a/backbone.pt 2> /dev/null
check "convert.py INIT.bin backbone.pt equals loupe init --backbone" cmp -s "$tmp/ab32.bin" "$tmp/comb.bin"
"$python" tools/convert.py --config $b/config.json -o "$tmp/comb.bin" "$tmp/b7.bin" 2> "$tmp/stderr"; status=$?
check "convert.py refuses a Q8 input: $(cat "$tmp/stderr")" sh -c "[ $status -eq 1 ] && grep -q 'stored as Q8' '$tmp/stderr'"

# Usage errors: exit 2, one line, no file.
usage_error "no arguments" "no config given"
usage_error "no output" "no output given" --config $a/config.json --seed 1
usage_error "no seed" "no seed given" --config $a/config.json -o "$tmp/out.bin"
usage_error "seed not a number" "--seed must be an integer" --config $a/config.json -o "$tmp/out.bin" --seed abc
usage_error "negative seed" "--seed must be an integer" --config $a/config.json -o "$tmp/out.bin" --seed -1
usage_error "seed above 2^64-1" "--seed must be an integer" --config $a/config.json -o "$tmp/out.bin" --seed 18446744073709551616
usage_error "unknown dtype" "--dtype must be f32, bf16 or q8 (got f16)" --config $a/config.json -o "$tmp/out.bin" --seed 1 --dtype f16
usage_error "unknown option" "unknown option --sed" --config $a/config.json -o "$tmp/out.bin" --sed 1
usage_error "stray argument" "unexpected argument extra" --config $a/config.json -o "$tmp/out.bin" --seed 1 extra
usage_error "option without its value" "--seed needs a value" --config $a/config.json -o "$tmp/out.bin" --seed

# Input errors: exit 1, the message, no file.
input_error "unreadable config" "cannot read config" --config "$tmp/none.json" -o "$tmp/out.bin" --seed 1
printf '{"pe": {"image_size": 112}}' > "$tmp/partial.json"
input_error "config with a missing key" "missing key pe.patch_size" --config "$tmp/partial.json" -o "$tmp/out.bin" --seed 1
printf '{"pe": ' > "$tmp/cut.json"
input_error "truncated config" "bad JSON at line 1, column 8" --config "$tmp/cut.json" -o "$tmp/out.bin" --seed 1
sed 's/"width": 64,/"width": true,/' $a/config.json > "$tmp/type.json"
input_error "wrong type" "pe.width must be a positive integer (got true)" --config "$tmp/type.json" -o "$tmp/out.bin" --seed 1
input_error "backbone of another config" "has another shape than the config implies" --config $b/config.json -o "$tmp/out.bin" --seed 1 --backbone "$converted"
input_error "unreadable backbone" "cannot open weight file" --config $a/config.json -o "$tmp/out.bin" --seed 1 --backbone "$tmp/none.bin"
input_error "output directory missing" "cannot create" --config $a/config.json -o "$tmp/no/dir/out.bin" --seed 1

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
