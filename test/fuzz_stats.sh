#!/bin/sh
# fuzz_stats.sh LOG...: one Markdown table row per libFuzzer log (run with
# -print_final_stats=1): executions, executions per second, final coverage (cov: edges,
# ft: features), corpus size, and whether the run ended on a crash.
echo "| log | executions | exec/s | cov | ft | corpus | ended on |"
echo "|---|---|---|---|---|---|---|"
for log in "$@"; do
    awk -v name="$log" '
        /^stat::number_of_executed_units:/ { execs = $2 }
        /^stat::average_exec_per_sec:/     { rate = $2 }
        /^#[0-9]+.* cov: [0-9]+ ft: [0-9]+/ {
            for (i = 1; i <= NF; i++) {
                if ($i == "cov:") cov = $(i + 1)
                if ($i == "ft:") ft = $(i + 1)
                if ($i == "corp:") corp = $(i + 1)
            }
        }
        /ERROR: (AddressSanitizer|UndefinedBehaviorSanitizer|libFuzzer)|runtime error:|deadly signal|Test unit written/ { crash = 1 }
        END {
            printf "| %s | %s | %s | %s | %s | %s | %s |\n", name, execs, rate, cov, ft, corp,
                   crash ? "a crash (see the log)" : "no crash"
        }' "$log"
done
