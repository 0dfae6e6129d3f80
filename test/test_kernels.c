/* test_kernels.c - unit tests for the kernels and the weight-file loader of loupe.c.
 *
 *   test_kernels [WEIGHTS.bin]
 *
 * The golden tensors test whole layers; these tests pin down kernels on shapes the
 * golden cases never use (odd sizes, tails, masks, padding) against naive double
 * precision references, and, given a valid weight file, check that the loader refuses
 * every kind of damaged copy of it with a clear message. */
#define LOUPE_NO_MAIN
#include "../loupe.c"

#define KERNEL_TOL 2e-5

static int passed, failed;

/* Records one check. */
static void check(int ok, const char *what)
{
    if (ok) passed++;
    else { failed++; printf("FAIL %s\n", what); }
}

/* Deterministic uniform numbers in [-1, 1). */
static float rnd(uint64_t *state)
{
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((*state >> 40) / 8388608.0 - 1.0);
}

static void fill(float *x, size_t n, uint64_t *st)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = rnd(st);
}

/* max |a - b| over n values. */
static double max_diff_d(const float *a, const double *b, size_t n)
{
    double m = 0.0;
    size_t i;
    for (i = 0; i < n; i++)
        if (!(fabs(a[i] - b[i]) <= m)) m = fabs(a[i] - b[i]);
    return m;
}

static void test_gemm(void)
{
    static const int sizes[] = {1, 3, 4, 5, 8, 17, 33};
    uint64_t st = 1;
    size_t a, b, k;
    char what[96];
    for (a = 0; a < 7; a++)
        for (b = 0; b < 7; b++)
            for (k = 0; k < 7; k++) {
                int M = sizes[a], N = sizes[b], K = sizes[k], i, j, l, acc;
                float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * N * K);
                float *Bt = malloc(sizeof(float) * N * K), *bias = malloc(sizeof(float) * N);
                float *C = malloc(sizeof(float) * M * N), *C0 = malloc(sizeof(float) * M * N);
                double *R = malloc(sizeof(double) * M * N);
                fill(A, (size_t)M * K, &st); fill(B, (size_t)N * K, &st); fill(bias, (size_t)N, &st);
                fill(C0, (size_t)M * N, &st);
                for (j = 0; j < N; j++)
                    for (l = 0; l < K; l++) Bt[(size_t)l * N + j] = B[(size_t)j * K + l];
                for (acc = 0; acc < 2; acc++) {
                    memcpy(C, C0, sizeof(float) * M * N);
                    for (i = 0; i < M; i++)
                        for (j = 0; j < N; j++) {
                            double s = acc ? C0[i * N + j] : 0.0;
                            for (l = 0; l < K; l++) s += (double)A[i * K + l] * B[j * K + l];
                            R[i * N + j] = s + bias[j];
                        }
                    gemm_nt(M, N, K, A, K, B, K, bias, C, N, acc);
                    snprintf(what, sizeof what, "gemm_nt M=%d N=%d K=%d accumulate=%d", M, N, K, acc);
                    check(max_diff_d(C, R, (size_t)M * N) < KERNEL_TOL * K, what);
                    memcpy(C, C0, sizeof(float) * M * N);
                    gemm_nn(M, N, K, A, K, Bt, N, C, N, acc);
                    for (i = 0; i < M; i++)
                        for (j = 0; j < N; j++) R[i * N + j] -= bias[j];
                    snprintf(what, sizeof what, "gemm_nn M=%d N=%d K=%d accumulate=%d", M, N, K, acc);
                    check(max_diff_d(C, R, (size_t)M * N) < KERNEL_TOL * K, what);
                }
                free(A); free(B); free(Bt); free(bias); free(C); free(C0); free(R);
            }
}

/* Products with few rows and many columns that gemm_run computes transposed (C^T =
 * B A^T, GEMM_SWAP_MAX_M): the same bits as the same rows one at a time (never
 * swapped), with and without bias and accumulation, several KC steps, on all threads;
 * through gemm_nt (which swaps or not, by the tile of this build) and through
 * gemm_run_transposed itself, so that every build tests the swapped orientation. */
static void test_gemm_swap(void)
{
    static const int rows[] = {3, 12, 20, 32};
    enum { N = 700, K = 2 * GEMM_KC + 37 };
    uint64_t st = 7;
    float *A = malloc(sizeof(float) * 32 * K), *B = malloc(sizeof(float) * N * K), *bias = malloc(sizeof(float) * N);
    float *C0 = malloc(sizeof(float) * 32 * N), *C = malloc(sizeof(float) * 32 * N), *R = malloc(sizeof(float) * 32 * N);
    float *T = malloc(sizeof(float) * 32 * N);
    double *D = malloc(sizeof(double) * 32 * N);
    gemm_args g;
    size_t t;
    int acc, wb, i, j, l;
    char what[96];
    fill(A, (size_t)32 * K, &st); fill(B, (size_t)N * K, &st); fill(bias, N, &st); fill(C0, (size_t)32 * N, &st);
    for (t = 0; t < sizeof rows / sizeof *rows; t++)
        for (acc = 0; acc < 2; acc++)
            for (wb = 0; wb < 2; wb++) {
                int M = rows[t];
                const float *bb = wb ? bias : NULL;
                memcpy(C, C0, sizeof(float) * M * N);
                memcpy(R, C0, sizeof(float) * M * N);
                gemm_nt(M, N, K, A, K, B, K, bb, C, N, acc);
                memcpy(T, C0, sizeof(float) * M * N);
                memset(&g, 0, sizeof g);
                g.M = M; g.N = N; g.K = K;
                g.A = A; g.lda = K; g.B = wmat_f32(B, K); g.bias = bb; g.C = T; g.ldc = N; g.accumulate = acc;
                gemm_run_transposed(&g);
                for (i = 0; i < M; i++) gemm_nt(1, N, K, A + (size_t)i * K, K, B, K, bb, R + (size_t)i * N, N, acc);
                for (i = 0; i < M; i++)
                    for (j = 0; j < N; j++) {
                        double s = (acc ? C0[i * N + j] : 0.0) + (bb ? bb[j] : 0.0);
                        for (l = 0; l < K; l++) s += (double)A[i * K + l] * B[j * K + l];
                        D[i * N + j] = s;
                    }
                snprintf(what, sizeof what, "gemm_nt M=%d N=%d K=%d accumulate=%d bias=%d (few rows)", M, N, K, acc, wb);
                check(memcmp(C, R, sizeof(float) * M * N) == 0 && max_diff_d(C, D, (size_t)M * N) < KERNEL_TOL * K,
                      what);
                snprintf(what, sizeof what, "gemm_run_transposed M=%d N=%d K=%d accumulate=%d bias=%d", M, N, K, acc, wb);
                check(memcmp(T, R, sizeof(float) * M * N) == 0, what);
            }
    free(A); free(B); free(bias); free(C0); free(C); free(R); free(T); free(D);
}

/* Products of at most GEMM_NR_NARROW columns, which gemm_run computes with the narrow
 * tile (GEMM_NV_NARROW vectors a row; on builds where that is the usual tile, the same
 * path): the same bits as those columns of a wider product (the usual tile), for
 * gemm_nt and gemm_nn, whole and edge strips and panels, one and two KC steps, with and
 * without accumulation; and within KERNEL_TOL of a double-precision product. */
static void test_gemm_narrow(void)
{
    static const int ms[] = {2, 6, 20, 33}, ns[] = {5, 16, GEMM_NR_NARROW}, ks[] = {32, GEMM_KC + 44};
    enum { WIDE = GEMM_NR_NARROW + GEMM_NR }; /* columns of the wide product: past the narrow limit */
    uint64_t st = 5;
    size_t a, b, k;
    char what[112];
    for (a = 0; a < sizeof ms / sizeof *ms; a++)
        for (b = 0; b < sizeof ns / sizeof *ns; b++)
            for (k = 0; k < sizeof ks / sizeof *ks; k++) {
                int M = ms[a], N = ns[b], K = ks[k], acc, i, j, l, same_nt = 1, same_nn = 1;
                float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * WIDE * K);
                float *Bkn = malloc(sizeof(float) * K * WIDE), *C0 = malloc(sizeof(float) * M * WIDE);
                float *Cn = malloc(sizeof(float) * M * N), *Cw = malloc(sizeof(float) * M * WIDE);
                float *Dn = malloc(sizeof(float) * M * N), *Dw = malloc(sizeof(float) * M * WIDE);
                double *R = malloc(sizeof(double) * M * N);
                fill(A, (size_t)M * K, &st); fill(B, (size_t)WIDE * K, &st); fill(C0, (size_t)M * WIDE, &st);
                for (j = 0; j < WIDE; j++)
                    for (l = 0; l < K; l++) Bkn[(size_t)l * WIDE + j] = B[(size_t)j * K + l];
                for (acc = 0; acc < 2; acc++) {
                    for (i = 0; i < M; i++)
                        for (j = 0; j < N; j++) {
                            double s = acc ? C0[i * WIDE + j] : 0.0;
                            for (l = 0; l < K; l++) s += (double)A[i * K + l] * B[j * K + l];
                            R[i * N + j] = s;
                            Cn[i * N + j] = Dn[i * N + j] = C0[i * WIDE + j];
                        }
                    memcpy(Cw, C0, sizeof(float) * M * WIDE);
                    memcpy(Dw, C0, sizeof(float) * M * WIDE);
                    gemm_nt(M, N, K, A, K, B, K, NULL, Cn, N, acc);
                    gemm_nt(M, WIDE, K, A, K, B, K, NULL, Cw, WIDE, acc);
                    gemm_nn(M, N, K, A, K, Bkn, WIDE, Dn, N, acc);
                    gemm_nn(M, WIDE, K, A, K, Bkn, WIDE, Dw, WIDE, acc);
                    for (i = 0; i < M; i++)
                        for (j = 0; j < N; j++) {
                            same_nt &= memcmp(&Cn[i * N + j], &Cw[i * WIDE + j], sizeof(float)) == 0;
                            same_nn &= memcmp(&Dn[i * N + j], &Dw[i * WIDE + j], sizeof(float)) == 0;
                        }
                    snprintf(what, sizeof what, "gemm_nt M=%d N=%d K=%d accumulate=%d (narrow = wide bits)", M, N,
                             K, acc);
                    check(same_nt && max_diff_d(Cn, R, (size_t)M * N) < KERNEL_TOL * K, what);
                    snprintf(what, sizeof what, "gemm_nn M=%d N=%d K=%d accumulate=%d (narrow = wide bits)", M, N,
                             K, acc);
                    check(same_nn && max_diff_d(Dn, R, (size_t)M * N) < KERNEL_TOL * K, what);
                }
                free(A); free(B); free(Bkn); free(C0); free(Cn); free(Cw); free(Dn); free(Dw); free(R);
            }
}

/* row_max with the largest value at each place in turn (the vector part and the tail),
 * then softmax_rows against a double-precision softmax, with and without a mask, for
 * row lengths around the vector and ROW_LANES widths (scores in [-6, 6)); masked
 * entries exactly 0; a NaN score makes its whole row NaN. */
static void test_softmax(void)
{
    static const int ns[] = {1, 7, 8, 16, 17, 33, 67, 577};
    uint64_t st = 13;
    size_t t;
    char what[96];
    for (t = 0; t < sizeof ns / sizeof *ns; t++) {
        int n = ns[t], masked, p, i, rows = n, all_nan = 1, max_ok = 1, zeros_ok = 1;
        float *x = malloc(sizeof(float) * n * n), *x0 = malloc(sizeof(float) * n * n);
        unsigned char *mask = malloc((size_t)n * n);
        double worst = 0.0;
        fill(x0, (size_t)n * n, &st);
        for (i = 0; i < n * n; i++) x0[i] *= 6.0f;
        for (p = 0; p < n; p++) {
            memcpy(x, x0, sizeof(float) * n);
            x[p] = 7.0f + (float)p;
            max_ok &= row_max(x, n) == 7.0f + (float)p;
        }
        snprintf(what, sizeof what, "row_max n=%d (the largest value at every place)", n);
        check(max_ok, what);
        for (i = 0; i < n * n; i++) mask[i] = (unsigned char)(i % 3 == 1 && i % n != i / n); /* never a whole row */
        for (masked = 0; masked < 2; masked++) {
            memcpy(x, x0, sizeof(float) * n * n);
            softmax_rows(x, rows, n, 0.7f, masked ? mask : NULL);
            for (p = 0; p < rows; p++) {
                const float *s = x0 + (size_t)p * n;
                double sum = 0.0, mx = -HUGE_VAL;
                for (i = 0; i < n; i++)
                    if (!(masked && mask[(size_t)p * n + i]) && 0.7 * s[i] > mx) mx = 0.7 * s[i];
                for (i = 0; i < n; i++)
                    if (!(masked && mask[(size_t)p * n + i])) sum += exp(0.7 * s[i] - mx);
                for (i = 0; i < n; i++) {
                    float got = x[(size_t)p * n + i];
                    if (masked && mask[(size_t)p * n + i]) {
                        zeros_ok &= got == 0.0f;
                    } else {
                        double d = fabs(got - exp(0.7 * s[i] - mx) / sum);
                        if (!(d <= worst)) worst = d;
                    }
                }
            }
            snprintf(what, sizeof what, "softmax_rows n=%d masked=%d against a double softmax", n, masked);
            check(worst < 1e-6 && zeros_ok, what);
        }
        memcpy(x, x0, sizeof(float) * n);
        x[n / 2] = NAN;
        softmax_rows(x, 1, n, 1.0f, NULL);
        for (i = 0; i < n; i++) all_nan &= isnan(x[i]);
        snprintf(what, sizeof what, "softmax_rows n=%d: a NaN score makes the row NaN", n);
        check(all_nan, what);
        free(x); free(x0); free(mask);
    }
}

/* gemm_tn (weight gradients, C[M][N] += A[K][M]^T B[K][N]) on both of its paths: plain
 * tiles for small products and gemm_run with A packed transposed from GEMM_TN_BLOCKED_MIN
 * multiply-adds on (the last shape also with the narrow tile); odd sizes, row strides
 * wider than the rows, several K steps. */
static void test_gemm_tn(void)
{
    static const int shapes[][3] = {{5, 7, 3}, {33, 70, 17}, {203, 301, 2 * GEMM_KC + 37}, {97, 1000, 577},
                                    {600, 29, 1000}};
    uint64_t st = 11;
    size_t t;
    char what[96];
    for (t = 0; t < sizeof shapes / sizeof *shapes; t++) {
        int M = shapes[t][0], N = shapes[t][1], K = shapes[t][2], lda = M + 3, ldb = N + 5, ldc = N + 2, i, j, l;
        float *A = malloc(sizeof(float) * K * lda), *B = malloc(sizeof(float) * K * ldb), *C = malloc(sizeof(float) * M * ldc);
        double *R = malloc(sizeof(double) * M * N), worst = 0.0;
        fill(A, (size_t)K * lda, &st); fill(B, (size_t)K * ldb, &st); fill(C, (size_t)M * ldc, &st);
        for (i = 0; i < M; i++)
            for (j = 0; j < N; j++) {
                double s = C[(size_t)i * ldc + j];
                for (l = 0; l < K; l++) s += (double)A[(size_t)l * lda + i] * B[(size_t)l * ldb + j];
                R[(size_t)i * N + j] = s;
            }
        gemm_tn(M, N, K, A, lda, B, ldb, C, ldc);
        for (i = 0; i < M; i++)
            for (j = 0; j < N; j++) {
                double d = fabs(C[(size_t)i * ldc + j] - R[(size_t)i * N + j]);
                if (!(d <= worst)) worst = d;
            }
        snprintf(what, sizeof what, "gemm_tn M=%d N=%d K=%d (%s path)", M, N, K,
                 (double)M * N * K >= GEMM_TN_BLOCKED_MIN ? "blocked" : "tile");
        check(worst < KERNEL_TOL * K, what);
        free(A); free(B); free(C); free(R);
    }
}

/* gemm_nt_w with BF16 and Q8 weight matrices (whole and partial panels, K below and
 * above one k-step, not a multiple of 8 or of a Q8 block, a row offset) against a
 * double-precision product with the stored values converted by hand; then gemm_nn_w
 * with the same rows as its [K][N] operand (columns from the middle of a Q8 block). */
static void test_gemm_lowp(void)
{
    static const int ms[] = {1, 7}, ns[] = {5, 16, 37, 70}, ks[] = {3, 8, 45, 64, 300};
    enum { ROW_OFFSET = 3 };
    uint64_t st = 7;
    size_t a, b, k;
    int d;
    char what[128];
    for (a = 0; a < 2; a++)
        for (b = 0; b < 4; b++)
            for (k = 0; k < 5; k++)
                for (d = DTYPE_BF16; d <= DTYPE_Q8; d++) {
                    int M = ms[a], N = ns[b], K = ks[k], rows = N + ROW_OFFSET, i, j, l;
                    size_t ld = d == DTYPE_Q8 ? q8_padded((size_t)K) : (size_t)K, nblk = ld / Q8_BLOCK;
                    float *A = malloc(sizeof(float) * M * K), *bias = malloc(sizeof(float) * N);
                    float *A2 = malloc(sizeof(float) * M * N), *C2 = malloc(sizeof(float) * M * K);
                    double *R2 = malloc(sizeof(double) * M * K);
                    float *C = malloc(sizeof(float) * M * N), *Bf = malloc(sizeof(float) * rows * K);
                    float *scale = malloc(sizeof(float) * rows * (nblk ? nblk : 1));
                    uint16_t *bh = malloc(sizeof(uint16_t) * rows * ld);
                    int8_t *bq = malloc((size_t)rows * ld);
                    double *R = malloc(sizeof(double) * M * N);
                    wmat w;
                    fill(A, (size_t)M * K, &st); fill(bias, (size_t)N, &st);
                    for (i = 0; i < rows; i++) {
                        if (d == DTYPE_Q8)
                            for (l = 0; l < (int)nblk; l++) scale[i * nblk + l] = 0.01f * (1.0f + rnd(&st));
                        for (l = 0; l < (int)ld; l++) {
                            float v = rnd(&st);
                            uint32_t u;
                            memcpy(&u, &v, sizeof u);
                            bh[i * ld + l] = (uint16_t)(u >> 16);
                            bq[i * ld + l] = (int8_t)(l < K ? (int)(127.0f * v) : 0);
                            if (l < K) /* the value each storage means */
                                Bf[i * K + l] = d == DTYPE_BF16 ? bf16_to_float(bh[i * ld + l])
                                                                : (float)bq[i * ld + l] * scale[i * nblk + l / Q8_BLOCK];
                        }
                    }
                    w = wmat_f32(NULL, ld);
                    w.data = d == DTYPE_BF16 ? (const void *)bh : (const void *)bq;
                    w.scale = d == DTYPE_Q8 ? scale : NULL;
                    w.dtype = d;
                    for (i = 0; i < M; i++)
                        for (j = 0; j < N; j++) {
                            double sum = bias[j];
                            for (l = 0; l < K; l++) sum += (double)A[i * K + l] * Bf[(j + ROW_OFFSET) * K + l];
                            R[i * N + j] = sum;
                        }
                    gemm_nt_w(M, N, K, A, K, wmat_rows(w, ROW_OFFSET), bias, C, N, 0);
                    snprintf(what, sizeof what, "gemm_nt_w %s M=%d N=%d K=%d from row %d", dtype_names[d], M, N, K,
                             ROW_OFFSET);
                    check(max_diff_d(C, R, (size_t)M * N) < KERNEL_TOL * K, what);
                    fill(A2, (size_t)M * N, &st);
                    for (i = 0; i < M; i++)
                        for (j = 0; j < K; j++) {
                            double sum = 0.0;
                            for (l = 0; l < N; l++) sum += (double)A2[i * N + l] * Bf[(l + ROW_OFFSET) * K + j];
                            R2[i * K + j] = sum;
                        }
                    gemm_nn_w(M, K, N, A2, N, wmat_rows(w, ROW_OFFSET), C2, K, 0);
                    snprintf(what, sizeof what, "gemm_nn_w %s M=%d N=%d K=%d from row %d", dtype_names[d], M, K, N,
                             ROW_OFFSET);
                    check(max_diff_d(C2, R2, (size_t)M * K) < KERNEL_TOL * N, what);
                    free(A); free(bias); free(C); free(Bf); free(scale); free(bh); free(bq); free(R);
                    free(A2); free(C2); free(R2);
                }
}

/* Naive 3x3 convolution on a channels-last map, padding 1, raw [co][ci][3][3] kernel. */
static void naive_conv3x3(double *out, const float *in, int h, int w, int ci, int co, const float *k, int depthwise)
{
    int y, x, o, i, ty, tx;
    for (y = 0; y < h; y++)
        for (x = 0; x < w; x++)
            for (o = 0; o < co; o++) {
                double s = 0.0;
                for (ty = 0; ty < 3; ty++)
                    for (tx = 0; tx < 3; tx++) {
                        int yy = y + ty - 1, xx = x + tx - 1;
                        if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
                        if (depthwise) s += (double)in[((size_t)yy * w + xx) * ci + o] * k[o * 9 + ty * 3 + tx];
                        else
                            for (i = 0; i < ci; i++)
                                s += (double)in[((size_t)yy * w + xx) * ci + i] * k[((size_t)o * ci + i) * 9 + ty * 3 + tx];
                    }
                out[((size_t)y * w + x) * co + o] = s;
            }
}

static void test_convolutions(void)
{
    enum { H = 5, Wd = 7, CI = 6, CO = 9 };
    uint64_t st = 7;
    float in[H * Wd * CI], k3[CO * CI * 9], kr[9 * CO * CI], kd[CI * 9], kdr[9 * CI];
    float kt[CI * CO * 4], prod[4 * H * Wd * CO], bias[CO], out[4 * H * Wd * CO], pooled[(H / 2) * (Wd / 2) * CI];
    double ref[4 * H * Wd * CO];
    int y, x, o, i, di, dj, ok;
    fill(in, sizeof in / sizeof *in, &st); fill(k3, sizeof k3 / sizeof *k3, &st); fill(kd, sizeof kd / sizeof *kd, &st);
    fill(kt, sizeof kt / sizeof *kt, &st); fill(bias, CO, &st);
    repack_conv3x3(kr, k3, CO, CI);
    conv3x3_hwc(out, in, H, Wd, CI, CO, kr);
    naive_conv3x3(ref, in, H, Wd, CI, CO, k3, 0);
    check(max_diff_d(out, ref, (size_t)H * Wd * CO) < KERNEL_TOL * 54, "conv3x3_hwc against a direct convolution");
    repack_depthwise(kdr, kd, CI);
    depthwise3x3_hwc(out, in, H, Wd, CI, kdr);
    naive_conv3x3(ref, in, H, Wd, CI, CI, kd, 1);
    check(max_diff_d(out, ref, (size_t)H * Wd * CI) < KERNEL_TOL * 9, "depthwise3x3_hwc against a direct convolution");
    /* ConvTranspose2d(2, stride 2): out[2y+di][2x+dj][o] = b[o] + sum_i in[y][x][i] k[i][o][di][dj] */
    conv_transpose2x2_hwc(out, in, H, Wd, CI, CO, wmat_f32(kt, (size_t)CONVT_TAPS * CO), bias, prod);
    for (y = 0; y < H; y++)
        for (x = 0; x < Wd; x++)
            for (di = 0; di < 2; di++)
                for (dj = 0; dj < 2; dj++)
                    for (o = 0; o < CO; o++) {
                        double s = bias[o];
                        for (i = 0; i < CI; i++) s += (double)in[(y * Wd + x) * CI + i] * kt[((i * CO + o) * 2 + di) * 2 + dj];
                        ref[((size_t)(2 * y + di) * 2 * Wd + 2 * x + dj) * CO + o] = s;
                    }
    check(max_diff_d(out, ref, (size_t)4 * H * Wd * CO) < KERNEL_TOL * CI, "conv_transpose2x2_hwc against its definition");
    /* MaxPool2d(2, 2) floors odd sizes */
    maxpool2x2_hwc(pooled, in, H, Wd, CI);
    ok = 1;
    for (y = 0; y < H / 2; y++)
        for (x = 0; x < Wd / 2; x++)
            for (i = 0; i < CI; i++) {
                float m = in[((2 * y) * Wd + 2 * x) * CI + i];
                int a, b;
                for (a = 0; a < 2; a++)
                    for (b = 0; b < 2; b++)
                        if (in[((2 * y + a) * Wd + 2 * x + b) * CI + i] > m) m = in[((2 * y + a) * Wd + 2 * x + b) * CI + i];
                ok &= pooled[(y * (Wd / 2) + x) * CI + i] == m;
            }
    check(ok, "maxpool2x2_hwc picks the maximum of each 2x2 window");
}

static void test_norms(void)
{
    enum { ROWS = 3, DIM = 37, HW = 11, C = 64, G = 32 };
    uint64_t st = 3;
    float x[HW * C], y[HW * C], wv[C], bv[C];
    double ref[HW * C];
    norm_w n;
    int r, i, p, g;
    fill(x, HW * C, &st); fill(wv, C, &st); fill(bv, C, &st);
    n.w = wv; n.b = bv;
    layernorm(y, x, ROWS, DIM, n, 1e-5f);
    for (r = 0; r < ROWS; r++) {
        double m = 0, v = 0;
        for (i = 0; i < DIM; i++) m += x[r * DIM + i];
        m /= DIM;
        for (i = 0; i < DIM; i++) v += (x[r * DIM + i] - m) * (x[r * DIM + i] - m);
        v /= DIM;
        for (i = 0; i < DIM; i++) ref[r * DIM + i] = (x[r * DIM + i] - m) / sqrt(v + 1e-5) * wv[i] + bv[i];
    }
    check(max_diff_d(y, ref, ROWS * DIM) < KERNEL_TOL, "layernorm against a double reference");
    memcpy(y, x, sizeof y);
    groupnorm_hwc(y, HW, C, G, n, 1e-5f);
    for (g = 0; g < G; g++) {
        double m = 0, v = 0;
        int cpg = C / G;
        for (p = 0; p < HW; p++)
            for (i = 0; i < cpg; i++) m += x[p * C + g * cpg + i];
        m /= HW * cpg;
        for (p = 0; p < HW; p++)
            for (i = 0; i < cpg; i++) v += (x[p * C + g * cpg + i] - m) * (x[p * C + g * cpg + i] - m);
        v /= HW * cpg;
        for (p = 0; p < HW; p++)
            for (i = 0; i < cpg; i++) {
                int ch = g * cpg + i;
                ref[p * C + ch] = (x[p * C + ch] - m) / sqrt(v + 1e-5) * wv[ch] + bv[ch];
            }
    }
    check(max_diff_d(y, ref, HW * C) < KERNEL_TOL, "groupnorm_hwc against a double reference");
}

static void test_attention(void)
{
    enum { TQ = 3, TK = 6, HEADS = 2, DH = 5, D = HEADS * DH };
    uint64_t st = 11;
    float Q[TQ * D], K[TK * D], V[TK * D], out[TQ * D], scratch[64 * TQ * TK];
    unsigned char mask[TQ * TK];
    double ref[TQ * D];
    int q, h, j, d;
    fill(Q, TQ * D, &st); fill(K, TK * D, &st); fill(V, TK * D, &st);
    for (q = 0; q < TQ * TK; q++) mask[q] = (unsigned char)(q % 4 == 1);
    attention(out, D, Q, D, K, D, V, D, TQ, TK, HEADS, DH, 0.5f, mask, scratch);
    for (q = 0; q < TQ; q++)
        for (h = 0; h < HEADS; h++) {
            double s[TK], mx = -1e300, sum = 0;
            for (j = 0; j < TK; j++) {
                double dot = 0;
                for (d = 0; d < DH; d++) dot += (double)Q[q * D + h * DH + d] * K[j * D + h * DH + d];
                s[j] = mask[q * TK + j] ? -1e300 : 0.5 * dot;
                if (s[j] > mx) mx = s[j];
            }
            for (j = 0; j < TK; j++) { s[j] = mask[q * TK + j] ? 0.0 : exp(s[j] - mx); sum += s[j]; }
            for (d = 0; d < DH; d++) {
                double o = 0;
                for (j = 0; j < TK; j++) o += s[j] / sum * V[j * D + h * DH + d];
                ref[q * D + h * DH + d] = o;
            }
        }
    check(max_diff_d(out, ref, TQ * D) < KERNEL_TOL, "masked multi-head attention against a double reference");
}

static void test_interpolation(void)
{
    /* F.interpolate(bilinear, align_corners=False) of a ramp f(x) = x reproduces the
     * clamped source coordinate; a constant map stays constant. */
    enum { IH = 3, IW = 4, OH = 7, OW = 9 };
    /* allocated, not a float array: the scratch holds int indices as well as floats */
    float in[IH * IW], out[OH * OW], *scratch = malloc(INTERP_SCRATCH(OH, OW) * sizeof *scratch);
    int y, x, ok = 1;
    if (!scratch) { check(0, "scratch for bilinear interpolation"); return; }
    for (y = 0; y < IH; y++)
        for (x = 0; x < IW; x++) in[y * IW + x] = (float)x;
    interp_plane(in, IH, IW, out, OH, OW, scratch);
    for (y = 0; y < OH; y++)
        for (x = 0; x < OW; x++) {
            double src = (x + 0.5) * IW / OW - 0.5;
            src = src < 0 ? 0 : src > IW - 1 ? IW - 1 : src;
            ok &= fabs(out[y * OW + x] - src) < 1e-6;
        }
    check(ok, "bilinear upsampling of a ramp matches the source coordinate");
    for (y = 0; y < IH * IW; y++) in[y] = 2.5f;
    interp_plane(in, IH, IW, out, 2, 1, scratch);
    check(out[0] == 2.5f && out[1] == 2.5f, "bilinear downsampling keeps a constant");
    free(scratch);
}

static void test_sampling(void)
{
    /* grid_sample semantics: pixel centres return the value, half-way points average,
     * everything outside fades to zero. value map 2x2, one channel. */
    const float v[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    float acc;
    acc = 0; sample_bilinear_acc(&acc, v, 1, 2, 2, 1.0f, 0.0f, 1.0f, 1);
    check(acc == 2.0f, "sampling at a pixel centre returns its value");
    acc = 0; sample_bilinear_acc(&acc, v, 1, 2, 2, 0.5f, 0.5f, 1.0f, 1);
    check(fabsf(acc - 2.5f) < 1e-6f, "sampling between four pixels averages them");
    acc = 0; sample_bilinear_acc(&acc, v, 1, 2, 2, -0.5f, 0.0f, 1.0f, 1);
    check(fabsf(acc - 0.5f) < 1e-6f, "sampling half a pixel outside blends with zero padding");
    acc = 0; sample_bilinear_acc(&acc, v, 1, 2, 2, 5.0f, 5.0f, 1.0f, 1);
    check(acc == 0.0f, "sampling far outside returns zero");
}

static void test_png_roundtrip(void)
{
    /* loupe_png_encode -> loupe_image_decode gives the pixels back (gray as R=G=B). */
    static const int sizes[][2] = {{1, 1}, {7, 3}, {64, 33}, {301, 17}};
    uint64_t st = 5;
    size_t k;
    int channels;
    char what[96], err[256];
    for (k = 0; k < sizeof sizes / sizeof sizes[0]; k++)
        for (channels = 1; channels <= 3; channels += 2) {
            int w = sizes[k][0], h = sizes[k][1], ok = 1;
            size_t n = (size_t)w * h * channels, i, png_size = 0;
            unsigned char *pix = malloc(n), *png = NULL;
            loupe_image img;
            for (i = 0; i < n; i++) pix[i] = (unsigned char)(i % 5 == 0 ? 255 : (rnd(&st) + 1.0f) * 127.5f);
            ok = loupe_png_encode(pix, w, h, channels, &png, &png_size, err, sizeof err) == 0 &&
                 loupe_image_decode(png, png_size, LOUPE_DEFAULT_MAX_PIXELS, &img, err, sizeof err) == 0 &&
                 img.width == w && img.height == h;
            for (i = 0; ok && i < (size_t)w * h * 3; i++) ok = img.rgb[i] == pix[channels == 3 ? i : i / 3];
            snprintf(what, sizeof what, "PNG round trip %dx%d, %d channel%s", w, h, channels, channels > 1 ? "s" : "");
            check(ok, what);
            if (ok) loupe_image_free(&img);
            free(png);
            free(pix);
        }
}

/* Next to the reference weight file: where the damaged copies are written. */
static char damaged_path[1024];

/* Writes a modified copy of the weight file and expects the loader to refuse it
 * with a message containing `expect`. */
static void expect_refused(const unsigned char *orig, size_t size, size_t keep, size_t patch_at, const void *patch,
                           size_t patch_len, const char *expect, const char *what)
{
    const char *tmp = damaged_path;
    char err[512] = "";
    unsigned char *copy = malloc(size);
    FILE *f = fopen(tmp, "wb");
    loupe_model *m;
    memcpy(copy, orig, size);
    if (patch) memcpy(copy + patch_at, patch, patch_len);
    if (f) { fwrite(copy, 1, keep, f); fclose(f); }
    m = loupe_model_load(tmp, err, sizeof err);
    if (m || !strstr(err, expect)) printf("  loader said: %s\n", m ? "(accepted)" : err);
    check(!m && strstr(err, expect) != NULL, what);
    loupe_model_free(m);
    free(copy);
    remove(tmp);
}

/* Finds the index record of the tensor called name; returns its byte position. */
static size_t find_record(const unsigned char *d, const char *name)
{
    uint32_t n_hp = rd_u32(d + 12), n_t = rd_u32(d + 16), i;
    size_t pos = WEIGHTS_HEADER_BYTES + (size_t)n_hp * HPARAM_RECORD_BYTES;
    for (i = 0; i < n_t; i++) {
        size_t len = rd_u16(d + pos), nd = d[pos + 3];
        if (len == strlen(name) && memcmp(d + pos + 4, name, len) == 0) return pos;
        pos += 4 + len + 4 * nd + 16;
    }
    return 0;
}

static void test_loader(const char *path)
{
    char err[512], missing[1024];
    unsigned char *d, v3[4] = {WEIGHTS_VERSION + 1, 0, 0, 0}, big[8], bad_dim[4] = {7, 0, 0, 0};
    size_t size = 0, rec, nd, len;
    loupe_model *m = loupe_model_load(path, err, sizeof err);
    FILE *f;
    check(m != NULL, "the reference weight file loads");
    if (!m) { printf("  %s\n", err); return; }
    loupe_model_free(m);
    f = fopen(path, "rb");
    if (!f) return;
    fseek(f, 0, SEEK_END);
    size = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    d = malloc(size);
    if (fread(d, 1, size, f) != size) size = 0;
    fclose(f);
    {
        /* the same bytes from memory: borrowed, 4-byte alignment required */
        unsigned char *buf = malloc(size + ARENA_ALIGN + 1);
        unsigned char *al = buf ? buf + (ARENA_ALIGN - (uintptr_t)buf % ARENA_ALIGN) % ARENA_ALIGN : NULL;
        if (al) {
            memcpy(al, d, size);
            m = loupe_model_load_memory(al, size, err, sizeof err);
            check(m != NULL, "a weight file in memory loads");
            loupe_model_free(m);
            memmove(al + 1, al, size);
            m = loupe_model_load_memory(al + 1, size, err, sizeof err);
            check(!m && strstr(err, "aligned") != NULL, "misaligned weight data in memory is refused");
            loupe_model_free(m);
        }
        free(buf);
    }
    snprintf(damaged_path, sizeof damaged_path, "%s.damaged", path);
    snprintf(missing, sizeof missing, "%s.no-such-file", path);
    m = loupe_model_load(missing, err, sizeof err);
    check(!m && strstr(err, "cannot open") != NULL, "a missing file is reported");
    expect_refused(d, size, 0, 0, NULL, 0, "file is empty", "an empty file is refused");
    expect_refused(d, size, 40, 0, NULL, 0, "shorter than the 64-byte header", "a cut header is refused");
    expect_refused(d, size, size, 0, "NOTLOUPE", 8, "bad magic", "a wrong magic is refused");
    expect_refused(d, size, size, 8, v3, 4, "version 3", "a newer format version is refused");
    expect_refused(d, size, size - 1, 0, NULL, 0, "truncated", "a truncated file is refused");
    expect_refused(d, size, size / 2, 0, NULL, 0, "truncated", "a file cut in half is refused");
    rec = find_record(d, "backbone.ln_pre.weight");
    check(rec != 0, "the index holds backbone.ln_pre.weight");
    if (!rec) { free(d); return; }
    len = rd_u16(d + rec);
    nd = d[rec + 3];
    expect_refused(d, size, size, rec + 4, "x", 1, "tensor backbone.ln_pre.weight is missing",
                   "a missing tensor is named");
    expect_refused(d, size, size, rec + 4 + len, bad_dim, 4, "bytes do not match", "a shape that disagrees with the byte count is refused");
    memset(big, 0xff, sizeof big);
    expect_refused(d, size, size, rec + 4 + len + 4 * nd, big, 8, "outside the file", "an offset past the end is refused");
    {
        /* point ln_pre.weight at the bytes of the tensor stored before it */
        uint64_t off = rd_u64(d + rec + 4 + len + 4 * nd);
        unsigned char prev[8];
        off -= TENSOR_ALIGN;
        memcpy(prev, &off, 8);
        expect_refused(d, size, size, rec + 4 + len + 4 * nd, prev, 8, "overlap", "overlapping tensors are refused");
    }
    {
        unsigned char code = 9;
        expect_refused(d, size, size, rec + 2, &code, 1, "unknown dtype", "an unknown dtype is refused");
    }
    {
        /* BF16 in a version-1 file; then a version-2 file whose LayerNorm weight is BF16
         * (a consistent byte count): only weight matrices may be stored so */
        unsigned char code = DTYPE_BF16, *d2 = malloc(size);
        uint64_t half;
        expect_refused(d, size, size, rec + 2, &code, 1, "format version 1 does not define",
                       "a BF16 tensor in a version-1 file is refused");
        if (d2) {
            memcpy(d2, d, size);
            d2[8] = WEIGHTS_VERSION;
            half = rd_u64(d2 + rec + 4 + len + 4 * nd + 8) / 2;
            memcpy(d2 + rec + 4 + len + 4 * nd + 8, &half, 8);
            expect_refused(d2, size, size, rec + 2, &code, 1, "only weight matrices",
                           "a BF16 LayerNorm weight is refused by name");
            free(d2);
        }
    }
    free(d);
}

/* erf of one value through erf_block. */
static float erf1(float x)
{
    erf_block(&x, &x, 1);
    return x;
}

/* exp_f32 and erf_block against libm in double precision on a dense grid (every
 * EXP_GRID_STEP), and their special values. */
#define EXP_GRID_STEP 1e-3
#define EXP_MAX_REL 1.5e-7 /* 2.5 ulp; measured 1.0e-7 */
#define ERF_MAX_ABS 3e-7   /* measured 2.8e-7 */
static void test_exp_erf(void)
{
    double x, exp_err = 0.0, erf_err = 0.0;
    for (x = -87.0; x < 88.0; x += EXP_GRID_STEP) {
        double e = fabs(exp_f32((float)x) / exp((double)(float)x) - 1.0);
        if (!(e <= exp_err)) exp_err = e;
    }
    for (x = -6.0; x < 6.0; x += EXP_GRID_STEP) {
        double e = fabs(erf1((float)x) - erf((double)(float)x));
        if (!(e <= erf_err)) erf_err = e;
    }
    printf("exp_f32 max relative error %.2e, erf_block max absolute error %.2e\n", exp_err, erf_err);
    check(exp_err <= EXP_MAX_REL, "exp_f32 within 2.5 ulp of exp on [-87, 88]");
    check(erf_err <= ERF_MAX_ABS, "erf_block within 3e-7 of erf on [-6, 6]");
    check(exp_f32(-INFINITY) == 0.0f && exp_f32(-100.0f) == 0.0f && exp_f32(0.0f) == 1.0f, "exp_f32 at -inf, -100, 0");
    check(isnan(exp_f32(NAN)) && isnan(erf1(NAN)), "exp_f32 and erf_block keep NaN");
    check(erf1(0.0f) == 0.0f && erf1(10.0f) == 1.0f && erf1(-INFINITY) == -1.0f, "erf_block at 0, 10, -inf");
}

/* The decoder's mask test without expf agrees with sigmoidf(x) < 0.5f: on every float
 * from -3e-7 to -1e-8 (where sigmoidf(x) stops rounding to 0.5: a shortcut threshold
 * closer to 0 than that would be wrong there), around its threshold -1e-3, on random
 * values and on the special ones. */
static void test_sigmoid_below_half(void)
{
    const float special[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, -1e-3f, 1e-3f, -1e-38f, -1e-45f, 88.0f,
                             -88.0f, -1e30f};
    uint64_t state = 7;
    long differ = 0, n = 0;
    float x;
    size_t i;
    for (x = -3e-7f; x < -1e-8f; x = nextafterf(x, 0.0f), n++)
        differ += sigmoid_below_half(x) != (sigmoidf(x) < 0.5f);
    for (x = -1.001e-3f; x < -0.999e-3f; x = nextafterf(x, 0.0f), n++)
        differ += sigmoid_below_half(x) != (sigmoidf(x) < 0.5f);
    for (i = 0; i < 100000; i++, n++) {
        x = 100.0f * rnd(&state);
        differ += sigmoid_below_half(x) != (sigmoidf(x) < 0.5f);
    }
    for (i = 0; i < sizeof special / sizeof *special; i++, n++)
        differ += sigmoid_below_half(special[i]) != (sigmoidf(special[i]) < 0.5f);
    printf("sigmoid_below_half: %ld of %ld values differ from sigmoidf(x) < 0.5f\n", differ, n);
    check(differ == 0, "sigmoid_below_half(x) == (sigmoidf(x) < 0.5f)");
}

int main(int argc, char **argv)
{
    test_exp_erf();
    test_sigmoid_below_half();
    test_gemm();
    test_gemm_swap();
    test_gemm_narrow();
    test_softmax();
    test_gemm_tn();
    test_gemm_lowp();
    test_convolutions();
    test_norms();
    test_attention();
    test_interpolation();
    test_sampling();
    test_png_roundtrip();
    if (argc > 1) test_loader(argv[1]);
    printf("test_kernels: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
