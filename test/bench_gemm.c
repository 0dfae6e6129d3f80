/* bench_gemm.c - speed of the matrix products that dominate the forward, for one
 * blocking of the gemm kernels (`make bench-gemm` builds it once per candidate).
 *
 *   bench_gemm --isa          the instruction set of this build (AVX-512, AVX2+FMA, ...)
 *   bench_gemm --peak         the measured FMA peak in GFLOP/s on all threads
 *   bench_gemm [SECONDS]      one line: this build's blocking, then GFLOP/s of each shape
 *
 * The shapes are the products as loupe.c calls them on a full-size model (M x N x K,
 * C[M][N] = A[M][K] times B, float32): the backbone block's four linear layers (577
 * tokens; qkv 577 x 3072 x 1024, out 577 x 1024 x 1024 onto the residual, fc 577 x
 * 4096 x 1024, proj 577 x 1024 x 4096 onto the residual, all gemm_nt_w with a
 * [out][in] weight and a bias), the pixel decoder's input projection (9216 x 256 x
 * 1024) and encoder linear layers (3024 x 256 x 256), and the mask predictor's masks
 * (20 x 9216 x 256, gemm_nt of the mask embeddings by the mask features, no bias).
 * Each shape is timed for at least SECONDS (default 0.3) after a warm-up; the median
 * of the runs is reported. test/bench_gemm.sh turns the lines into one table. */
#define LOUPE_NO_MAIN
#include "../loupe.c"
#include "peak.h"

#define SHAPES 7
#define MAX_REPS 200

/* One timed product: the gemm_nt call and its operands. */
typedef struct shape {
    const char *name;
    int M, N, K, bias, accumulate;
} shape;

static const shape shapes[SHAPES] = {
    {"577x3072x1024", 577, 3072, 1024, 1, 0}, /* backbone qkv (linear) */
    {"577x1024x1024", 577, 1024, 1024, 1, 1}, /* backbone out, added to the residual */
    {"577x4096x1024", 577, 4096, 1024, 1, 0}, /* backbone fc (linear) */
    {"577x1024x4096", 577, 1024, 4096, 1, 1}, /* backbone proj, added to the residual */
    {"9216x256x1024", 9216, 256, 1024, 1, 0}, /* pixel decoder input projection */
    {"3024x256x256", 3024, 256, 256, 1, 0},   /* pixel decoder encoder linear layers */
    {"20x9216x256", 20, 9216, 256, 0, 0},     /* mask predictor: embeddings x mask features */
};

/* qsort order for doubles, ascending. */
static int cmp_seconds(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Deterministic values in [-1, 1). */
static void bench_fill(float *x, size_t n, uint32_t seed)
{
    size_t i;
    for (i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)(seed >> 8) / 8388608.0f - 1.0f;
    }
}

/* Median seconds of one product of shape s, timed for at least `seconds`. */
static double time_shape(const shape *s, double seconds)
{
    float *A = malloc(sizeof(float) * (size_t)s->M * s->K), *B = malloc(sizeof(float) * (size_t)s->N * s->K);
    float *bias = malloc(sizeof(float) * (size_t)s->N), *C = malloc(sizeof(float) * (size_t)s->M * s->N);
    double t[MAX_REPS], start, med;
    int n = 0;
    if (!A || !B || !bias || !C) { fprintf(stderr, "bench_gemm: out of memory\n"); exit(1); }
    bench_fill(A, (size_t)s->M * s->K, 1);
    bench_fill(B, (size_t)s->N * s->K, 2);
    bench_fill(bias, (size_t)s->N, 3);
    memset(C, 0, sizeof(float) * (size_t)s->M * s->N);
    gemm_nt(s->M, s->N, s->K, A, s->K, B, s->K, s->bias ? bias : NULL, C, s->N, s->accumulate); /* warm-up */
    start = now_seconds();
    while (n < MAX_REPS && (n < 3 || now_seconds() - start < seconds)) {
        double t0;
        if (s->accumulate) memset(C, 0, sizeof(float) * (size_t)s->M * s->N); /* keep the values bounded */
        t0 = now_seconds();
        gemm_nt(s->M, s->N, s->K, A, s->K, B, s->K, s->bias ? bias : NULL, C, s->N, s->accumulate);
        t[n++] = now_seconds() - t0;
    }
    qsort(t, (size_t)n, sizeof *t, cmp_seconds);
    med = t[n / 2];
    free(A); free(B); free(bias); free(C);
    return med;
}

int main(int argc, char **argv)
{
    double seconds = 0.3, block_fl = 0.0, block_s = 0.0;
    int i;
    if (argc > 1 && strcmp(argv[1], "--isa") == 0) {
        printf("%s\n", GEMM_ISA);
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "--peak") == 0) {
        printf("%.1f\n", fma_peak_gflops(max_threads()));
        return 0;
    }
    if (argc > 1) seconds = atof(argv[1]);
    if (!(seconds > 0.0 && seconds < 60.0)) {
        fprintf(stderr, "usage: bench_gemm --isa | --peak | [SECONDS]\n");
        return 2;
    }
    /* the blocking: MRxNR KC NC MC packA swap threads */
    printf("%dx%d %d %d %d %d %d %d", GEMM_MR, GEMM_NR, GEMM_KC, GEMM_NC, GEMM_MC, GEMM_PACK_A, GEMM_SWAP_MAX_M,
           max_threads());
    for (i = 0; i < SHAPES; i++) {
        double fl = 2.0 * shapes[i].M * shapes[i].N * shapes[i].K, sec = time_shape(&shapes[i], seconds);
        if (i < 4) { /* one backbone block: the four products together */
            block_fl += fl;
            block_s += sec;
        }
        printf(" %.1f", fl / sec * 1e-9);
        fflush(stdout);
    }
    printf(" %.1f\n", block_fl / block_s * 1e-9);
    return 0;
}
