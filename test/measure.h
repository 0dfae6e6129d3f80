/* measure.h - what the benchmarks and check_lowp share: sorting times for medians and
 * the peak resident memory. Include after ../loupe.c (it needs LOUPE_POSIX). */
#ifndef LOUPE_TEST_MEASURE_H
#define LOUPE_TEST_MEASURE_H

#if LOUPE_POSIX
#include <sys/resource.h>
#endif

/* qsort order for doubles, ascending. */
static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Peak resident set size in MiB (0 where the system cannot tell). */
static double peak_rss_mib(void)
{
#if LOUPE_POSIX
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0) return ru.ru_maxrss / 1024.0;
#endif
    return 0.0;
}

#endif
