#!/bin/sh
# portability.sh DIR [CONFIG...]: builds and tests loupe.c with every compiler and
# target this machine has, each configuration in its own build directory DIR/CONFIG
# (its log: DIR/CONFIG/test-log.txt), one after the other, and prints one line per
# configuration. Without CONFIG arguments, all of them:
#   gcc-O0 gcc-O0-omp gcc-O3 gcc-O3-omp clang-O0 clang-O0-omp clang-O3 clang-O3-omp
#   tcc gcc-m32 gcc-m32-sse2 aarch64-qemu mingw-wine
# (gcc-m32 does its float arithmetic on the x87 unit, gcc-m32-sse2 with SSE2, as
# every x86 processor since 2003 can; see the README's Build anywhere section.)
# A configuration whose tools are missing prints "skipped" with the reason. Every
# build uses -Werror (warning-free is part of passing). Exits 1 when any
# configuration that ran failed.
dir=$1; shift
configs=${*:-gcc-O0 gcc-O0-omp gcc-O3 gcc-O3-omp clang-O0 clang-O0-omp clang-O3 clang-O3-omp tcc gcc-m32 gcc-m32-sse2 aarch64-qemu mingw-wine}
make=${MAKE:-make}
status=0
program='#include <errno.h>
#include <math.h>
int main(void) { return (int)sqrt(0.0) + (errno == EDOM); }'

# can_link CC FLAGS...: the compiler exists and links a C program with libm.
can_link() {
    probe_cc=$1; shift
    command -v "$probe_cc" > /dev/null 2>&1 || return 1
    printf '%s\n' "$program" | "$probe_cc" "$@" -x c - -o "$dir/probe.out" -lm > /dev/null 2>&1
}

mkdir -p "$dir"
for config in $configs; do
    # what to build and run: label, requirement check, make variables
    run='' exe='' native='NATIVE_DEFAULT' skip=''
    case $config in
    gcc-O0|gcc-O3|clang-O0|clang-O3)
        cc=${config%-*} opt=${config#*-}
        label="$cc -$opt"; omp=0
        can_link "$cc" || skip="$cc not installed" ;;
    gcc-O0-omp|gcc-O3-omp|clang-O0-omp|clang-O3-omp)
        base=${config%-omp}; cc=${base%-*} opt=${base#*-}
        label="$cc -$opt openmp"; omp=1
        if ! can_link "$cc"; then skip="$cc not installed"
        elif ! can_link "$cc" -fopenmp; then skip="$cc has no OpenMP (Debian: libomp-dev for clang)"; fi ;;
    tcc)
        cc=tcc opt=O3 label="tcc"; omp=0 native=''
        can_link tcc || skip="tcc not installed (Debian: tcc)" ;;
    gcc-m32|gcc-m32-sse2)
        cc="gcc -m32" opt=O3 label="gcc -m32 -O3 openmp (x87)"; omp=1
        if [ $config = gcc-m32-sse2 ]; then cc="gcc -m32 -msse2 -mfpmath=sse" label="gcc -m32 -O3 openmp (SSE2)"; fi
        # Debian's gcc-multilib conflicts with the aarch64 cross compiler; of what it
        # adds, -m32 lacks only the link /usr/include/asm to the (bi-arch) kernel headers
        asm=/usr/include/x86_64-linux-gnu/asm
        if ! can_link $cc -fopenmp && [ -d $asm ] && [ ! -e /usr/include/asm ]; then
            mkdir -p "$dir/m32-include" && ln -sf $asm "$dir/m32-include/asm"
            cc="$cc -I$dir/m32-include"
        fi
        can_link $cc -fopenmp || skip="gcc -m32 cannot link (Debian: gcc-multilib)" ;;
    aarch64-qemu)
        cc=aarch64-linux-gnu-gcc opt=O3 label="aarch64 gcc -O3 openmp (qemu)"; omp=1 native=''
        run="qemu-aarch64 -L /usr/aarch64-linux-gnu"
        if ! can_link "$cc" -fopenmp; then skip="$cc not installed (Debian: gcc-aarch64-linux-gnu)"
        elif ! command -v qemu-aarch64 > /dev/null 2>&1; then skip="qemu-aarch64 not installed (Debian: qemu-user)"; fi ;;
    mingw-wine)
        # statically linked so that wine needs no MinGW DLLs
        cc="x86_64-w64-mingw32-gcc -static" opt=O3 label="mingw-w64 -O3 openmp (wine)"; omp=1 native='' exe=.exe
        run=wine
        if ! can_link x86_64-w64-mingw32-gcc -static -fopenmp; then skip="x86_64-w64-mingw32-gcc not installed (Debian: gcc-mingw-w64)"
        elif ! command -v wine > /dev/null 2>&1; then skip="wine not installed (Debian: wine64)"; fi ;;
    *)
        echo "portability: unknown configuration $config" >&2; status=1; continue ;;
    esac
    if [ -n "$skip" ]; then
        printf '%-32s skipped: %s\n' "$label" "$skip"
        continue
    fi
    build=$dir/$config
    mkdir -p "$build"
    set -- CC="$cc" CFLAGS="-$opt -Werror" OPENMP=$omp BUILD="$build" RUN="$run" EXE="$exe"
    [ "$native" = NATIVE_DEFAULT ] || set -- "$@" NATIVE="$native"
    start=$(date +%s)
    if WINEDEBUG=-all $make --no-print-directory test "$@" > "$build/make-log.txt" 2>&1; then result=ok; else result=FAIL; status=1; fi
    seconds=$(( $(date +%s) - start ))
    counts=$(sed -n 's/^tests: \([0-9]*\) passed, \([0-9]*\) failed$/\1 passed, \2 failed/p' "$build/make-log.txt" | tail -1)
    [ -n "$counts" ] || counts="build failed (see $build/make-log.txt)"
    printf '%-32s %-4s  %-28s (%d s)\n' "$label" "$result" "$counts" "$seconds"
done
rm -f "$dir/probe.out"
exit $status
