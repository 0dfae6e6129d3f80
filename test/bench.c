/* bench.c - speed and memory of the full forward pass (`make bench`).
 *
 *   bench MODEL.bin IMAGE [RUNS]
 *
 * Decodes IMAGE, runs one warm-up forward and RUNS timed ones (default 3), and prints
 * the median wall time per image, the time and GFLOP/s of every stage, this
 * machine's own FMA peak (measured by a small built-in microbenchmark), each stage's
 * share of that peak, the threads used and the peak resident memory. It asserts
 * nothing: targets are read off its table. */
#define LOUPE_NO_MAIN
#include "../loupe.c"
#include "measure.h"
#include "peak.h"

#define MAX_RUNS 64
/* Timed single-thread runs (after a warm-up) for the speed-up line. */
#define SCALING_RUNS 3

/* Floating-point operations of each stage (2 per multiply-add; matrix products,
 * convolutions, attention and sampling only: everything else is negligible). */
static void stage_flops(const loupe_config *c, const loupe_tables *t, double *fl)
{
    double g = c->grid, N = g * g, T = N + 1, W = c->width, M = c->mlp_width, P = c->patch_size;
    double F = c->feature_size, Q = c->num_queries, L = c->dec_layers, Te = t->tokens, E = c->enc_ffn;
    double noff = (double)c->m2f_heads * 3 * c->deform_points, m4 = 16 * N, H = c->cls_hidden;
    double lvl = 0;
    int i;
    fl[LOUPE_STAGE_BACKBONE] = 2 * N * W * 3 * P * P +
                               c->layers * 2 * (T * W * 3 * W + 2 * T * T * W + T * W * W + 2 * T * W * M) +
                               2 * (T * 2 * W * W + 2 * T * W + 2 * W * W + 2 * W * c->pool_mlp_width);
    fl[LOUPE_STAGE_CLASSIFIER] = 2 * (N + 1) * (W * H + (c->cls_layers - 2) * H * H + H);
    fl[LOUPE_STAGE_FEATURE_PYRAMID] = 2 * W * W * 4 * (2 * N + 4 * N) + 2 * 9 * W * (m4 + 8 * N + N / 4);
    fl[LOUPE_STAGE_PIXEL_DECODER] = 2 * Te * W * F +
                                    c->enc_layers * 2 * Te * (2 * F * F + 3 * noff * F + 2 * F * F + 2 * F * E +
                                                              noff * (F / c->m2f_heads) * 4) +
                                    2 * m4 * (W * F + 9 * F * F + F * F);
    for (i = 0; i < c->dec_layers - 1; i++) lvl += t->level_h[i % 3] * t->level_w[i % 3];
    fl[LOUPE_STAGE_TRANSFORMER_DECODER] = L * 2 * (Q * m4 * F + 3 * Q * F * F) +
                                          2 * (lvl * 2 * F * F + (L - 1) * Q * (6 * F * F + 2 * F * c->dec_ffn)) +
                                          2 * lvl * Q * 2 * F;
    fl[LOUPE_STAGE_POSTPROCESS] = Q * (double)SEG_SIZE * SEG_SIZE * 8;
}

int main(int argc, char **argv)
{
    static const char *const names[LOUPE_STAGE_COUNT] = {"backbone", "classifier", "feature pyramid",
                                                         "pixel decoder", "transformer decoder", "post-processing"};
    char err[512];
    loupe_model *m;
    loupe_session *s;
    loupe_image img;
    float *px;
    double wall[MAX_RUNS], stage[LOUPE_STAGE_COUNT][MAX_RUNS], fl[LOUPE_STAGE_COUNT], peak, total_fl = 0;
    int runs = argc > 3 ? atoi(argv[3]) : 3, r, k, threads = max_threads();
    if (argc < 3 || runs < 1 || runs > MAX_RUNS) {
        fprintf(stderr, "usage: bench MODEL.bin IMAGE [RUNS]\n");
        return 2;
    }
    if (!(m = loupe_model_load(argv[1], err, sizeof err)) || !(s = loupe_session_new(m, err, sizeof err)) ||
        loupe_image_load(argv[2], LOUPE_DEFAULT_MAX_PIXELS, &img, err, sizeof err)) {
        fprintf(stderr, "bench: %s\n", err);
        return 1;
    }
    px = malloc(sizeof *px * 3 * (size_t)m->cfg.image_size * m->cfg.image_size);
    if (!px || loupe_preprocess(m, &img, px, err, sizeof err)) { fprintf(stderr, "bench: cannot preprocess\n"); return 1; }
    stage_flops(&m->cfg, &m->t, fl);
    for (k = 0; k < LOUPE_STAGE_COUNT; k++) total_fl += fl[k];
    peak = 0.0;
    for (r = -1; r < runs; r++) {
        double t0, p = fma_peak_gflops(threads);
        if (p > peak) peak = p; /* the best reading next to every run: a shared host drifts */
        t0 = now_seconds();
        if (loupe_forward(s, px, err, sizeof err)) { fprintf(stderr, "bench: %s\n", err); return 1; }
        if (loupe_postprocess(s, img.width, img.height, 0.5f, NULL, NULL, err, sizeof err)) return 1;
        if (r < 0) continue; /* warm-up */
        wall[r] = now_seconds() - t0;
        for (k = 0; k < LOUPE_STAGE_COUNT; k++) stage[k][r] = s->out.stage_seconds[k];
    }
    qsort(wall, (size_t)runs, sizeof *wall, cmp_double);
    printf("loupe.c bench: %s, %dx%d image, S=%d, %d thread%s, %d runs after a warm-up\n", argv[2], img.width,
           img.height, m->cfg.image_size, threads, threads > 1 ? "s" : "", runs);
    printf("FMA peak (measured): %.1f GFLOP/s\n\n", peak);
    printf("| stage | median ms | GFLOP | GFLOP/s | %% of peak |\n|---|---:|---:|---:|---:|\n");
    for (k = 0; k < LOUPE_STAGE_COUNT; k++) {
        double med;
        qsort(stage[k], (size_t)runs, sizeof(double), cmp_double);
        med = stage[k][runs / 2];
        printf("| %s | %.1f | %.2f | %.1f | %.1f |\n", names[k], 1e3 * med, fl[k] / 1e9, fl[k] / med / 1e9,
               100.0 * fl[k] / med / 1e9 / peak);
    }
    printf("| **whole forward + post-processing** | **%.1f** | %.1f | %.1f | %.1f |\n\n", 1e3 * wall[runs / 2],
           total_fl / 1e9, total_fl / wall[runs / 2] / 1e9, 100.0 * total_fl / wall[runs / 2] / 1e9 / peak);
    printf("wall time per image: median %.3f s (min %.3f, max %.3f)\n", wall[runs / 2], wall[0], wall[runs - 1]);
    printf("peak RSS: %.0f MiB (weight file %.0f MiB, activation arena %.0f MiB)\n", peak_rss_mib(),
           m->size / 1048576.0, s->bytes / 1048576.0);
    printf("forgery probability: %.4f\n", s->out.prob);
    if (threads > 1) { /* the same forward on one thread: the parallel speed-up */
        double one[SCALING_RUNS];
        loupe_set_threads(1);
        for (r = -1; r < SCALING_RUNS; r++) {
            double t0 = now_seconds();
            if (loupe_forward(s, px, err, sizeof err)) { fprintf(stderr, "bench: %s\n", err); return 1; }
            if (loupe_postprocess(s, img.width, img.height, 0.5f, NULL, NULL, err, sizeof err)) return 1;
            if (r >= 0) one[r] = now_seconds() - t0;
        }
        qsort(one, SCALING_RUNS, sizeof *one, cmp_double);
        printf("1 thread: median %.3f s; 1 -> %d threads speed-up %.2fx\n", one[SCALING_RUNS / 2], threads,
               one[SCALING_RUNS / 2] / wall[runs / 2]);
    }
    printf("OpenMP wait policy: %s\n", getenv("OMP_WAIT_POLICY") ? getenv("OMP_WAIT_POLICY") : "(default)");
    free(px);
    loupe_image_free(&img);
    loupe_session_free(s);
    loupe_model_free(m);
    return 0;
}
