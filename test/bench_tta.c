/* bench_tta.c - time and memory of one test-time-adaptation step against a forward.
 *
 *   bench_tta MODEL.bin [CASE_DIR] [REPEATS]
 *
 * Runs the inference forward and the TTA step (forward with the tape, pseudo-label loss,
 * backward, clipping + AdamW) REPEATS times (default 3) on the case's pixel_values (or a
 * synthetic image), reports the median of each phase, the ratio to the forward, and the
 * adapter's memory: saved activations, backward scratch, parameters + gradients + AdamW
 * moments, and its own session. Wall and process CPU time are both reported. */
#define LOUPE_NO_MAIN
#include "../loupe.c"
#include "measure.h"

#define MAX_REPEATS 32

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Finds pixel_values in CASE_DIR/golden.txt + golden.safetensors; 0 on success. */
static int load_pixels(const char *dir, float *px, size_t n)
{
    char path[1024], line[1024], name[128], dtype[16], dims[128];
    unsigned long long off, len;
    FILE *f;
    int found = 0;
    snprintf(path, sizeof path, "%s/golden.txt", dir);
    if (!(f = fopen(path, "r"))) return -1;
    while (!found && fgets(line, sizeof line, f))
        found = sscanf(line, "%127s %15s %127s %llu %llu", name, dtype, dims, &off, &len) == 5 &&
                !strcmp(name, "pixel_values") && len == n * sizeof *px;
    fclose(f);
    if (!found) return -1;
    snprintf(path, sizeof path, "%s/golden.safetensors", dir);
    if (!(f = fopen(path, "rb"))) return -1;
    found = fseek(f, (long)off, SEEK_SET) == 0 && fread(px, sizeof *px, n, f) == n;
    fclose(f);
    return found ? 0 : -1;
}

int main(int argc, char **argv)
{
    char err[512];
    loupe_model *m;
    loupe_session *s;
    loupe_tta *t;
    loupe_tta_loss loss;
    loupe_tta_memory mem;
    const loupe_config *c;
    float *px;
    double fwd[MAX_REPEATS], tfwd[MAX_REPEATS], bwd[MAX_REPEATS], upd[MAX_REPEATS], step[MAX_REPEATS], t0, t1, t2, t3;
    double cpu_fwd[MAX_REPEATS], cpu_step[MAX_REPEATS];
    clock_t c0;
    size_t n, i;
    int r, repeats = argc > 3 ? atoi(argv[3]) : 3;
    if (argc < 2) { fprintf(stderr, "usage: bench_tta MODEL.bin [CASE_DIR] [REPEATS]\n"); return 2; }
    if (repeats < 1 || repeats > MAX_REPEATS) repeats = 3;
    m = loupe_model_load(argv[1], err, sizeof err);
    if (!m) { fprintf(stderr, "bench_tta: %s\n", err); return 1; }
    c = loupe_model_config(m);
    n = (size_t)3 * c->image_size * c->image_size;
    px = malloc(n * sizeof *px);
    if (!px) return 1;
    if (argc < 3 || load_pixels(argv[2], px, n))
        for (i = 0; i < n; i++) px[i] = 0.5f * sinf(0.01f * (float)i);
    s = loupe_session_new(m, err, sizeof err);
    t = s ? loupe_tta_new(m, NULL, err, sizeof err) : NULL;
    if (!t) { fprintf(stderr, "bench_tta: %s\n", err); return 1; }
    for (r = 0; r < repeats; r++) {
        t0 = now_seconds();
        c0 = clock();
        if (loupe_forward(s, px, err, sizeof err)) { fprintf(stderr, "bench_tta: %s\n", err); return 1; }
        fwd[r] = now_seconds() - t0;
        cpu_fwd[r] = (double)(clock() - c0) / CLOCKS_PER_SEC;
        t0 = now_seconds();
        c0 = clock();
        if (tta_forward_loss(t, px, &loss, err, sizeof err)) { fprintf(stderr, "bench_tta: %s\n", err); return 1; }
        t1 = now_seconds();
        segmentor_backward(&t->sg, NULL);
        t2 = now_seconds();
        loupe_tta_update(t, &loss.grad_norm, err, sizeof err);
        t3 = now_seconds();
        cpu_step[r] = (double)(clock() - c0) / CLOCKS_PER_SEC;
        tfwd[r] = t1 - t0; bwd[r] = t2 - t1; upd[r] = t3 - t2; step[r] = t3 - t0;
    }
    loupe_tta_get_memory(t, &mem);
    printf("threads %d, %d repeats (medians)\n", max_threads(), repeats);
    printf("inference forward                  %8.3f s\n", median(fwd, repeats));
    printf("TTA step                           %8.3f s  (%.2fx the forward)\n", median(step, repeats),
           median(step, repeats) / median(fwd, repeats));
    printf("process CPU time: forward %.3f s, TTA step %.3f s (%.2fx; all threads, a loaded machine inflates wall time)\n",
           median(cpu_fwd, repeats), median(cpu_step, repeats), median(cpu_step, repeats) / median(cpu_fwd, repeats));
    printf("  forward with tape + loss         %8.3f s\n", median(tfwd, repeats));
    printf("  backward                         %8.3f s\n", median(bwd, repeats));
    printf("  clipping + AdamW                 %8.3f s\n", median(upd, repeats));
    printf("last loss %.5f, p %.4f, gradient norm %.4g\n", loss.total, loss.prob, loss.grad_norm);
    printf("memory: inference session          %8.1f MiB\n", (double)s->bytes / (1 << 20));
    printf("        TTA saved activations      %8.1f MiB\n", (double)mem.saved_activations / (1 << 20));
    printf("        TTA backward scratch       %8.1f MiB\n", (double)mem.backward_scratch / (1 << 20));
    printf("        TTA parameters (%zu floats: weights, gradients, AdamW m and v) %8.1f MiB\n", mem.trainable,
           (double)mem.parameters / (1 << 20));
    printf("        TTA session                %8.1f MiB\n", (double)mem.session / (1 << 20));
    printf("        peak RSS of the process    %8.1f MiB (weights mapped, both sessions, the adapter)\n", peak_rss_mib());
    loupe_tta_free(t);
    loupe_session_free(s);
    loupe_model_free(m);
    free(px);
    return 0;
}
