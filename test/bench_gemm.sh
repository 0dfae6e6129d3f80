#!/bin/sh
# bench_gemm.sh - `make bench-gemm`: times the forward's main matrix products
# (test/bench_gemm.c) for a sweep of candidate gemm blockings of this machine's
# instruction set and prints one table: GFLOP/s and % of the measured FMA peak.
#
#   sh test/bench_gemm.sh BUILD_DIR CC "FLAGS" [SECONDS] [ROUNDS]
#
# Every candidate is its own binary (loupe.c compiled with -DGEMM_MR=... etc.), all
# built first; then ROUNDS rounds (default 2) run every binary once in turn, so that a
# drift of the machine's speed touches all candidates alike, and the table keeps each
# candidate's best round per shape. The first candidate is loupe.c's default blocking.
# Candidate fields: MR NV KC NC MC PACK_A SWAP_MAX_M; BENCH_GEMM_CANDIDATES="12 2 256
# 256 384 1 32; 6 4 256 256 384 1 32" times others instead. A candidate whose values
# loupe.c refuses (#error) is skipped with a note.
set -u
build=$1 cc=$2 flags=$3 seconds=${4:-0.3} rounds=${5:-2}
dir=$build/bench-gemm
mkdir -p "$dir" || exit 1

# The default blocking decides the instruction set and measures the peak.
$cc $flags -o "$dir/bench_gemm-default" test/bench_gemm.c -lm || exit 1
isa=$(${RUN:-} "$dir/bench_gemm-default" --isa) || exit 1

# Candidates per instruction set, reasoned from the caches and registers (README,
# Performance): MR NV KC NC MC PACK_A SWAP_MAX_M.
case $isa in
AVX-512) # 32 zmm registers; Zen 5: L1d 48 KiB, L2 1 MiB per core
  cands="
6 4 256 128 512 0 32
6 4 256 128 512 0 0
6 4 256 128 512 1 32
6 4 256 256 384 0 32
6 4 384 128 256 0 32
12 2 128 128 1024 0 32
12 2 256 128 512 0 32
12 2 256 256 384 1 32
14 2 256 256 448 1 32
8 3 256 192 512 1 32"
  ;;
AVX2+FMA) # 16 ymm registers
  cands="
6 2 256 128 320 0 32
6 2 256 128 320 0 0
6 2 256 128 320 1 32
6 2 256 64 320 0 32
6 2 256 128 384 1 32
6 2 384 64 256 1 32
4 3 256 96 256 1 32"
  ;;
*) # NEON and portable C: the default, the A copy and no swap
  cands="default
default -DGEMM_PACK_A=1
default -DGEMM_SWAP_MAX_M=0"
  ;;
esac

# BENCH_GEMM_CANDIDATES (the same seven fields, candidates separated by ; or new
# lines) replaces the list.
note="first row: loupe.c's default; "
if [ -n "${BENCH_GEMM_CANDIDATES:-}" ]; then
  cands=$(echo "$BENCH_GEMM_CANDIDATES" | tr ';' '\n')
  note=
fi

i=0
list=
echo "$cands" | {
  while read -r mr nv kc nc mc pa sw; do
    [ -n "$mr" ] || continue
    i=$((i + 1))
    if [ "$mr" = default ]; then
      defs="$nv"
    else
      defs="-DGEMM_MR=$mr -DGEMM_NV=$nv -DGEMM_KC=$kc -DGEMM_NC=$nc -DGEMM_MC=$mc -DGEMM_PACK_A=$pa -DGEMM_SWAP_MAX_M=$sw"
    fi
    if $cc $flags $defs -o "$dir/bench_gemm-$i" test/bench_gemm.c -lm 2> "$dir/build-$i.log"; then
      list="$list $i"
    else
      echo "bench-gemm: candidate $defs does not build on $isa (see $dir/build-$i.log)" >&2
    fi
  done
  echo "$list" > "$dir/list"
}
list=$(cat "$dir/list")

# The peak is measured before every candidate and the best of all is kept: a shared
# machine's speed drifts between minutes, and the products also keep their best
# round, so a slow moment must not pass for the ceiling (shares above 100 %).
peak=0
: > "$dir/results"
r=1
while [ "$r" -le "$rounds" ]; do
  for i in $list; do
    q=$(${RUN:-} "$dir/bench_gemm-default" --peak) || exit 1
    peak=$(awk -v a="$peak" -v b="$q" 'BEGIN { print (b > a ? b : a) }')
    ${RUN:-} "$dir/bench_gemm-$i" "$seconds" | sed "s/^/$i /" >> "$dir/results" || exit 1
  done
  r=$((r + 1))
done

echo "bench-gemm: $isa, $(sed -n 1p "$dir/results" | awk '{print $8}') threads, FMA peak (measured) $peak GFLOP/s," \
     "best of $rounds rounds, GFLOP/s (% of peak); M x N x K as loupe.c calls gemm_nt"
awk -v peak="$peak" '
{
  id = $1
  if (!(id in label)) { order[++n] = id; label[id] = sprintf("| %s | %s | %s | %s | %s | %s |", $2, $3, $4, $5, $6, $7) }
  for (c = 9; c <= NF; c++) if (!((id, c) in best) || $c > best[id, c]) best[id, c] = $c
  last = NF
}
END {
  printf "| MRxNR | KC | NC | MC | pack A | swap M<= |"
  split("577x3072x1024 577x1024x1024 577x4096x1024 577x1024x4096 9216x256x1024 3024x256x256 20x9216x256 backbone-block", h, " ")
  for (c = 1; c <= 8; c++) printf " %s |", h[c]
  printf "\n|---|---:|---:|---:|---:|---:|"
  for (c = 1; c <= 8; c++) printf "---:|"
  printf "\n"
  for (k = 1; k <= n; k++) {
    id = order[k]
    printf "%s", label[id]
    for (c = 9; c <= last; c++) printf " %.0f (%.1f) |", best[id, c], 100 * best[id, c] / peak
    printf "\n"
  }
}' "$dir/results"
echo "(${note}backbone-block: the four backbone products together, time-weighted)"
