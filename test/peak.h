/* peak.h - the machine's measured fused multiply-add peak, the ceiling that the
 * benchmarks (bench.c, bench_gemm.c) report their shares of. Include after ../loupe.c
 * (it uses the gemm vector macros of the build's instruction set). */
#ifndef LOUPE_TEST_PEAK_H
#define LOUPE_TEST_PEAK_H

/* Multiply-adds each chain does in fma_peak_gflops. */
#define GEMM_PEAK_ITERS 10000000L

/* Measured fused multiply-add throughput in GFLOP/s with the given number of threads
 * (the ceiling for the matrix products): GEMM_PEAK_CHAINS independent chains per
 * thread, enough to hide the FMA latency on every unit. */
static double fma_peak_gflops(int threads)
{
    volatile float sink = 0.0f;
    double seconds;
    int used = 1;
#ifdef _OPENMP
    double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
#else
    clock_t t0 = clock();
    (void)threads;
#endif
    {
        /* chains move from 0.5 towards 1; read through volatile so that the compiler
         * cannot work them out in advance */
        volatile float start_v = 0.5f, scale_v = 0.999f, shift_v = 0.001f;
        const float start = start_v, scale = scale_v, shift = shift_v;
        gemm_vec acc[GEMM_PEAK_CHAINS], x = vec_bcast(&scale), y = vec_bcast(&shift);
        float lanes[GEMM_LANES], sum = 0.0f;
        long it;
        int c, l;
        for (c = 0; c < GEMM_PEAK_CHAINS; c++) acc[c] = vec_bcast(&start);
        for (it = 0; it < GEMM_PEAK_ITERS; it++)
            for (c = 0; c < GEMM_PEAK_CHAINS; c++) acc[c] = vec_fma(acc[c], x, y);
        for (c = 0; c < GEMM_PEAK_CHAINS; c++) {
            vec_store(lanes, acc[c]);
            for (l = 0; l < GEMM_LANES; l++) sum += lanes[l];
        }
#ifdef _OPENMP
#pragma omp critical
        {
            sink = sink + sum;
            used = omp_get_num_threads();
        }
#else
        sink = sink + sum;
#endif
    }
#ifdef _OPENMP
    seconds = omp_get_wtime() - t0;
#else
    seconds = (double)(clock() - t0) / CLOCKS_PER_SEC;
#endif
    return 2.0 * GEMM_LANES * GEMM_PEAK_CHAINS * GEMM_PEAK_ITERS * used / seconds * 1e-9;
}

#endif
