/* bench_formats.c - forward time of the same model stored in several weight formats.
 *
 *   bench_formats IMAGE ROUNDS MODEL.bin...
 *
 * Loads every model (F32, BF16, Q8 files of one network), then runs ROUNDS rounds of
 * one forward per model in turn, after one warm-up round. Interleaving the models
 * makes the comparison fair on a machine whose load changes during the run (each
 * model meets the same conditions in every round). Prints the median and the fastest
 * forward of each model and its ratio to the first model's median. Peak memory per
 * format needs one process per file: check_lowp measures it. */
#define LOUPE_NO_MAIN
#include "../loupe.c"

#define MAX_MODELS 8
#define MAX_ROUNDS 64

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    static double t[MAX_MODELS][MAX_ROUNDS];
    char err[512];
    loupe_model *m[MAX_MODELS];
    loupe_session *s[MAX_MODELS];
    loupe_image img;
    float *px = NULL;
    int rounds = argc > 2 ? atoi(argv[2]) : 0, n = argc - 3, r, i;
    double first = 0.0;
    if (argc < 4 || n > MAX_MODELS || rounds < 1 || rounds > MAX_ROUNDS) {
        fprintf(stderr, "usage: bench_formats IMAGE ROUNDS MODEL.bin... (at most %d models)\n", MAX_MODELS);
        return 2;
    }
    if (loupe_image_load(argv[1], LOUPE_DEFAULT_MAX_PIXELS, &img, err, sizeof err)) {
        fprintf(stderr, "bench_formats: %s\n", err);
        return 1;
    }
    for (i = 0; i < n; i++) {
        if (!(m[i] = loupe_model_load(argv[3 + i], err, sizeof err)) || !(s[i] = loupe_session_new(m[i], err, sizeof err))) {
            fprintf(stderr, "bench_formats: %s\n", err);
            return 1;
        }
        if (i == 0 && !(px = malloc(sizeof *px * 3 * (size_t)m[0]->cfg.image_size * m[0]->cfg.image_size))) return 1;
        if (m[i]->cfg.image_size != m[0]->cfg.image_size || loupe_preprocess(m[i], &img, px, err, sizeof err)) {
            fprintf(stderr, "bench_formats: %s does not fit the first model\n", argv[3 + i]);
            return 1;
        }
    }
    for (r = -1; r < rounds; r++)
        for (i = 0; i < n; i++) {
            double t0 = now_seconds();
            if (loupe_forward(s[i], px, err, sizeof err)) { fprintf(stderr, "bench_formats: %s\n", err); return 1; }
            if (r >= 0) t[i][r] = now_seconds() - t0;
        }
    printf("forward time, %d interleaved rounds after a warm-up, %d thread%s:\n", rounds, max_threads(),
           max_threads() > 1 ? "s" : "");
    printf("| weights | median ms | fastest ms | median / first's |\n|---|---:|---:|---:|\n");
    for (i = 0; i < n; i++) {
        qsort(t[i], (size_t)rounds, sizeof(double), cmp_double);
        if (i == 0) first = t[0][rounds / 2];
        printf("| %s | %.0f | %.0f | %.3f |\n", argv[3 + i], 1e3 * t[i][rounds / 2], 1e3 * t[i][0],
               t[i][rounds / 2] / first);
        loupe_session_free(s[i]);
        loupe_model_free(m[i]);
    }
    free(px);
    loupe_image_free(&img);
    return 0;
}
