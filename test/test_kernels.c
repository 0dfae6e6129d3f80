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
    float kt[CI * CO * 4], ktr[4 * CO * CI], bias[CO], out[4 * H * Wd * CO], pooled[(H / 2) * (Wd / 2) * CI];
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
    repack_convt(ktr, kt, CI, CO);
    conv_transpose2x2_hwc(out, in, H, Wd, CI, CO, ktr, bias);
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
    float in[IH * IW], out[OH * OW], scratch[INTERP_SCRATCH(OH, OW)];
    int y, x, ok = 1;
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

/* Writes a modified copy of the weight file and expects the loader to refuse it
 * with a message containing `expect`. */
static void expect_refused(const unsigned char *orig, size_t size, size_t keep, size_t patch_at, const void *patch,
                           size_t patch_len, const char *expect, const char *what)
{
    const char *tmp = "build/test_kernels_damaged.bin";
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
    char err[512];
    unsigned char *d, v2[4] = {2, 0, 0, 0}, big[8], bad_dim[4] = {7, 0, 0, 0};
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
    m = loupe_model_load("build/no-such-file.bin", err, sizeof err);
    check(!m && strstr(err, "cannot open") != NULL, "a missing file is reported");
    expect_refused(d, size, 0, 0, NULL, 0, "file is empty", "an empty file is refused");
    expect_refused(d, size, 40, 0, NULL, 0, "shorter than the 64-byte header", "a cut header is refused");
    expect_refused(d, size, size, 0, "NOTLOUPE", 8, "bad magic", "a wrong magic is refused");
    expect_refused(d, size, size, 8, v2, 4, "version 2", "a newer format version is refused");
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
    free(d);
}

int main(int argc, char **argv)
{
    test_gemm();
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
