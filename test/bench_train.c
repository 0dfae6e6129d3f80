/* bench_train.c - time and memory of one training step against the inference forward.
 *
 *   bench_train MODEL.bin STAGE [REPEATS]     STAGE: cls_seg (backbone trained), seg
 *                                             (frozen backbone run every step) or seg-cached
 *                                             (frozen backbone, its kept outputs)
 *
 * One image (batch 1; a forged example with a synthetic mask) on the model's size. Runs
 * the inference forward and the training step (forward with the tapes, loss, backward,
 * clipping + AdamW) REPEATS times (default 3) and prints the medians, the step as a
 * multiple of the forward, and the peak resident memory against the weights' size. The
 * multiple is the median of each repeat's own ratio (its step over the forward timed just
 * before it), with their range: on a shared host whose speed drifts by 10-15 % from one
 * minute to the next, adjacent timings drift together, the medians of separate series
 * less so.
 * Each stage runs in its own process (make bench-train) so peak memory is the stage's. */
#define LOUPE_NO_MAIN
#include "../loupe.c"
#include "measure.h"

#define MAX_REPEATS 32

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char **argv)
{
    char err[512];
    loupe_model *m;
    loupe_trainer *t;
    loupe_train_options o;
    loupe_train_loss loss;
    loupe_example ex;
    const loupe_config *c;
    float *px, *mask, *patch, *feats = NULL;
    double fwd[MAX_REPEATS], step[MAX_REPEATS], tfwd[MAX_REPEATS], acc[MAX_REPEATS], upd[MAX_REPEATS], t0, t1, f, st;
    double ratio[MAX_REPEATS], rq, rlo, rhi;
    double weights_mib;
    size_t n, i, S, g;
    int r, repeats = argc > 3 ? atoi(argv[3]) : 3, cached;
    if (argc < 3 || (strcmp(argv[2], "cls_seg") && strcmp(argv[2], "seg-cached") && strcmp(argv[2], "seg"))) {
        fprintf(stderr, "usage: bench_train MODEL.bin {cls_seg|seg|seg-cached} [REPEATS]\n");
        return 2;
    }
    cached = !strcmp(argv[2], "seg-cached");
    if (repeats < 1 || repeats > MAX_REPEATS) repeats = 3;
    m = loupe_model_load(argv[1], err, sizeof err);
    if (!m) { fprintf(stderr, "bench_train: %s\n", err); return 1; }
    weights_mib = (double)m->size / 1048576.0;
    c = loupe_model_config(m);
    S = (size_t)c->image_size;
    g = (size_t)c->grid;
    n = 3 * S * S;
    px = malloc(n * sizeof *px);
    mask = malloc(S * S * sizeof *mask);
    patch = malloc(g * g * sizeof *patch);
    if (!px || !mask || !patch) return 1;
    for (i = 0; i < n; i++) px[i] = 0.5f * sinf(0.01f * (float)i);
    for (i = 0; i < S * S; i++) mask[i] = (i / S > S / 4 && i / S < S / 2 && i % S > S / 3 && i % S < 2 * S / 3) ? 1.0f : 0.0f;
    for (i = 0; i < g * g; i++) patch[i] = 0.1f;
    loupe_train_default_options(&o, strcmp(argv[2], "cls_seg") ? LOUPE_TRAIN_SEG : LOUPE_TRAIN_CLS_SEG);
    t = loupe_trainer_new(m, &o, err, sizeof err);
    if (!t) { fprintf(stderr, "bench_train: %s\n", err); return 1; }
    memset(&ex, 0, sizeof ex);
    ex.pixel_values = px;
    ex.mask_labels = mask;
    ex.n_targets = 1;
    ex.patch_labels = patch;
    ex.label = 1;
    if (cached) {
        feats = malloc(loupe_trainer_feature_floats(t) * sizeof *feats);
        if (!feats || loupe_trainer_features(t, px, feats, err, sizeof err)) { fprintf(stderr, "bench_train: %s\n", err); return 1; }
        ex.features = feats;
    }
    for (r = 0; r < repeats; r++) {
        /* the forward: the trainer's own session and weights, without its tapes */
        pe_tape *bt = t->s->bb_tape;
        cls_tape *ct = t->s->cls_tape;
        seg_tape *tt = t->s->tape;
        t->s->bb_tape = NULL; t->s->cls_tape = NULL; t->s->tape = NULL;
        t0 = now_seconds();
        if (loupe_forward(t->s, px, err, sizeof err)) { fprintf(stderr, "bench_train: %s\n", err); return 1; }
        fwd[r] = now_seconds() - t0;
        t->s->bb_tape = bt; t->s->cls_tape = ct; t->s->tape = tt;
        t0 = now_seconds();
        if (trainer_forward(t, px, ex.features, 1.0f, err, sizeof err)) { fprintf(stderr, "bench_train: %s\n", err); return 1; }
        tfwd[r] = now_seconds() - t0;
        t0 = now_seconds();
        if (loupe_trainer_accumulate(t, &ex, 1, 1.0, &loss, err, sizeof err)) { fprintf(stderr, "bench_train: %s\n", err); return 1; }
        t1 = now_seconds();
        if (loupe_trainer_update(t, 1.0, NULL, err, sizeof err)) { fprintf(stderr, "bench_train: %s\n", err); return 1; }
        acc[r] = t1 - t0;
        upd[r] = now_seconds() - t1;
        step[r] = acc[r] + upd[r];
    }
    for (r = 0; r < repeats; r++) ratio[r] = step[r] / fwd[r];
    rq = median(ratio, repeats); /* sorted: ratio[0] and ratio[repeats - 1] are the range */
    rlo = ratio[0];
    rhi = ratio[repeats - 1];
    f = median(fwd, repeats);
    st = median(step, repeats);
    {
        int tensors;
        size_t values;
        double rss = peak_rss_mib(), budget = 4.0 * weights_mib + 2048.0;
        loupe_trainer_size(t, &tensors, &values);
        printf("bench_train %s: %d threads, %d tensors (%.1f M values) train\n", argv[2], max_threads(), tensors,
               values / 1e6);
        printf("  forward      %8.1f ms\n", 1000.0 * f);
        printf("  train step   %8.1f ms  = %.2f x the forward (target %s; each repeat's own ratio %.2f-%.2f, "
               "ratio of the medians %.2f)\n", 1000.0 * st, rq,
               cached ? "<= 1.0" : strcmp(argv[2], "seg") ? "<= 3.5" : "none: the seg step without kept outputs",
               rlo, rhi, st / f);
        printf("    of which: forward keeping the tapes %.1f ms (timed alone), forward + loss + backward %.1f ms, "
               "clipping + AdamW %.1f ms\n", 1000.0 * median(tfwd, repeats), 1000.0 * median(acc, repeats),
               1000.0 * median(upd, repeats));
        printf("  peak RSS     %8.0f MiB (weights %.0f MiB; target <= 4 x weights + 2 GiB = %.0f MiB)\n", rss,
               weights_mib, budget);
        printf("  trainer: tape %.0f MiB, scratch %.0f MiB, parameters+gradients+AdamW %.0f MiB\n",
               t->tape_bytes / 1048576.0, t->work_bytes / 1048576.0, t->state_bytes / 1048576.0);
    }
    loupe_trainer_free(t);
    loupe_model_free(m);
    free(px); free(mask); free(patch); free(feats);
    return 0;
}
