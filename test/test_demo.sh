#!/bin/sh
# test_demo.sh LOUPE CHECK_DEMO: the shipped demo model (weights/loupe-demo.bin) on its
# samples (weights/samples/): through the library (check_demo: forged samples above 0.5
# with mask IoU >= 0.5, authentic ones below 0.5), and on the command line without -m (the
# default model, announced once on stderr), with -m and with $LOUPE_MODEL, which must all
# print the same. Run from the repository root. Prints "N passed, M failed".
loupe=$1
check_demo=$2
tmp=${TMPDIR:-/tmp}/loupe-demo-test.$$
passed=0
failed=0
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
check() { # check DESCRIPTION COMMAND...
    what=$1; shift
    if "$@"; then passed=$((passed + 1)); echo "ok   $what"; else failed=$((failed + 1)); echo "FAIL $what"; fi
}
samples=$(ls weights/samples/*.jpg weights/samples/*.png 2>/dev/null | grep -v '\.mask\.png$')
$RUN "$check_demo" weights/loupe-demo.bin $samples
check "the library: every sample as the README says" test $? -eq 0
(cd "$tmp" && $RUN "$OLDPWD/$loupe" -q -m "$OLDPWD/weights/loupe-demo.bin" $(for f in $samples; do echo "$OLDPWD/$f"; done)) > "$tmp/m.txt"
$RUN "$loupe" $samples > "$tmp/default.txt" 2> "$tmp/default.err"
status=$?
check "without -m the demo model runs (exit 0)" test $status -eq 0
check "it says once on stderr that it is the demo model" sh -c "test \$(grep -c 'demo model' '$tmp/default.err') -eq 1"
sed 's|.*/||' "$tmp/m.txt" > "$tmp/m.names"; sed 's|.*/||' "$tmp/default.txt" > "$tmp/default.names"
check "without -m = with -m weights/loupe-demo.bin" cmp -s "$tmp/m.names" "$tmp/default.names"
LOUPE_MODEL=weights/loupe-demo.bin $RUN "$loupe" -q $samples > "$tmp/env.txt" 2> /dev/null
check "\$LOUPE_MODEL=weights/loupe-demo.bin = the default" cmp -s "$tmp/env.txt" "$tmp/default.txt"
echo "test_demo: $passed passed, $failed failed"
test "$failed" -eq 0
