#!/bin/sh
# summary.sh LOG CMD...: runs each test command, shows its output, and ends with the
# sum of every "N passed, M failed" line. Fails if a command fails, a suite reports a
# failure, or nothing was counted.
log=$1; shift
: > "$log"
status=0
for cmd in "$@"; do
    echo "== $cmd"
    if ! sh -c "$cmd" > "$log.part" 2>&1; then
        status=1
        echo "FAILED: $cmd" >> "$log.part"
    fi
    cat "$log.part"
    cat "$log.part" >> "$log"
done
rm -f "$log.part"
totals=$(awk 'match($0, /[0-9]+ passed, [0-9]+ failed/) {
                split(substr($0, RSTART, RLENGTH), a, " "); p += a[1]; f += a[3] }
              END { print p + 0, f + 0 }' "$log")
passed=${totals% *}
failed=${totals#* }
[ "$failed" -eq 0 ] || status=1
[ "$passed" -gt 0 ] || status=1
[ "$status" -eq 0 ] || [ "$failed" -gt 0 ] || failed=1
echo "tests: $passed passed, $failed failed"
exit $status
