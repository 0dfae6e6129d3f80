/* check_tta.c - compares loupe.c's test-time adaptation with upstream's golden step.
 *
 *   check_tta MODEL.bin CASE_DIR
 *
 * CASE_DIR holds tta.txt + tta.safetensors (and golden.txt + golden.safetensors for
 * pixel_values); see ../shared/golden/README.md sections 6-7. The recorded torch.rand
 * draws (tta_rand_<k>) are injected into the loss in call order, then one TTA step
 * runs and every recorded number is compared. Tolerances (README section 7, about 100x
 * upstream's own fp32-vs-fp64 differences):
 *   fused_prob / pseudo_label          abs 3e-6
 *   pseudo mask, conditional query,    max|d| <= 1e-4 * max|golden| per tensor
 *   every prediction's logits
 *   matches, num_masks                 exact
 *   loss terms (raw and weighted)      rel 1e-4; where the golden holds NaN (upstream's
 *                                      Tversky mean over zero masks, no target) loupe.c
 *                                      must report 0 (totals: the sum with NaN read as 0)
 *   grad.* of every segmentor tensor   max|d| <= 1e-3 * max|golden| per tensor;
 *                                      *self_attn.k_proj.bias abs 1e-6 (analytically 0)
 *   grad_norm_segmentor_only           rel 1e-4 (the norm loupe.c clips with)
 *   optimizer, in isolation            clipping (golden tta.clip_coef) + AdamW applied to
 *                                      the golden grad.* must give step1.* within 1 ulp
 *                                      of each element (measured: bit for bit)
 * The two backbone embeddings upstream also trains are reported, not compared (loupe.c
 * trains the segmentor only). The end-to-end step is reported (Adam's first update is
 * about lr * sign(g): tiny gradients make it noise, README section 7). */
#define LOUPE_NO_MAIN
#include "../loupe.c"
#include "golden_io.h"
#include "replay.h"

#define MAX_GOLDEN 2048
#define PROB_ABS_TOL 3e-6
#define TENSOR_REL_TOL 1e-4
#define LOSS_REL_TOL 1e-4
#define GRAD_REL_TOL 1e-3
#define KPROJ_BIAS_ABS_TOL 1e-6
#define NORM_REL_TOL 1e-4
/* Isolated optimizer: loupe.c performs PyTorch's float32 AdamW operations in PyTorch's
 * order, so step1.* is expected bit for bit; one float32 rounding (1 ulp of the
 * parameter) is allowed for compilers that contract a multiply-add. */
#define STEP_MAX_ULP 1.0
#define END_TO_END_MOVE 1e-6
#define MAX_RAND REPLAY_MAX

typedef golden_tensor golden;

typedef struct golden_set {
    golden t[MAX_GOLDEN];
    int n;
} golden_set;

static int passed, failed;

static void verdict(int ok) { if (ok) passed++; else failed++; }

/* Loads DIR/stem.txt and DIR/stem.safetensors into the set; a name listed twice is
 * read once. */
static int load_set(golden_set *gs, const char *dir, const char *stem)
{
    return golden_load("check_tta", dir, stem, gs->t, MAX_GOLDEN, &gs->n);
}

static golden *find(golden_set *gs, const char *name)
{
    int i;
    for (i = 0; i < gs->n; i++)
        if (!strcmp(gs->t[i].name, name)) return &gs->t[i];
    return NULL;
}


/* Compares a tensor within rel * max|golden|; prints one line. */
static void compare_tensor(golden_set *gs, const char *name, const float *ours, long numel, double rel)
{
    golden *g = find(gs, name);
    double maxd, maxg;
    int ok;
    if (!g) { printf("%-44s (not in the case)\n", name); return; }
    if (g->numel != numel) { printf("%-44s FAIL %ld elements, golden %ld\n", name, numel, g->numel); verdict(0); return; }
    golden_diff(ours, g->data, numel, &maxd, &maxg);
    ok = maxd <= rel * maxg;
    printf("%-44s %-4s max|d| %.3g  tol %.3g  max|g| %.3g\n", name, ok ? "ok" : "FAIL", maxd, rel * maxg, maxg);
    verdict(ok);
}

/* Compares one loss scalar: rel 1e-4, or 0 where the golden is NaN. Returns the golden
 * value with NaN read as 0 (NAN when the case lacks it). */
static double compare_loss(golden_set *gs, const char *name, double ours)
{
    golden *g = find(gs, name);
    double ref;
    int ok;
    if (!g) { printf("%-44s (not in the case)\n", name); return NAN; }
    ref = g->data[0];
    if (ref != ref) {
        ok = ours == 0.0;
        printf("%-44s %-4s ours %.9g, golden NaN (defined as 0 here)\n", name, ok ? "ok" : "FAIL", ours);
        verdict(ok);
        return 0.0;
    }
    ok = fabs(ours - ref) <= LOSS_REL_TOL * fabs(ref) || fabs(ours - ref) == 0.0;
    printf("%-44s %-4s ours %.9g  golden %.9g  rel %.2g\n", name, ok ? "ok" : "FAIL", ours, ref,
           ref != 0.0 ? fabs(ours - ref) / fabs(ref) : fabs(ours - ref));
    verdict(ok);
    return ref;
}

/* Compares a total against the sum of the golden terms with NaN read as 0 when the
 * golden total is NaN. */
static void compare_total(golden_set *gs, const char *name, double ours, double golden_sum)
{
    golden *g = find(gs, name);
    double ref;
    int ok;
    if (!g) return;
    ref = g->data[0] == g->data[0] ? g->data[0] : golden_sum;
    ok = fabs(ours - ref) <= LOSS_REL_TOL * fabs(ref);
    printf("%-44s %-4s ours %.9g  golden %.9g%s\n", name, ok ? "ok" : "FAIL", ours, ref,
           g->data[0] == g->data[0] ? "" : " (golden NaN: sum of its terms, NaN as 0)");
    verdict(ok);
}

/* The golden generator can negate the fuser (tta.json "flip_fuser_sign": true) to reach
 * the no-target branch. When the case's weights do not carry that flip (our p is 1 - the
 * golden p), the fuser is negated here too (the model is read-only: the view is swapped). */
static int flip_fuser_sign(const char *dir, loupe_model *m, loupe_tta *t, const float *pixels, const golden *gp)
{
    static float *negated;
    char path[1024], err[256];
    size_t size, i, n = (size_t)m->cfg.grid * m->cfg.grid + 1;
    unsigned char *json;
    loupe_tta_loss loss;
    int flip;
    snprintf(path, sizeof path, "%s/tta.json", dir);
    json = golden_read_file(path, &size);
    flip = json && strstr((char *)json, "\"flip_fuser_sign\": true") != NULL;
    free(json);
    if (!flip || !gp) return 0;
    if (tta_forward_loss(t, pixels, &loss, err, sizeof err)) { fprintf(stderr, "check_tta: %s\n", err); return -1; }
    t->rng_position = 0;
    if (fabs(loss.prob - gp->data[0]) <= PROB_ABS_TOL || fabs(1.0f - loss.prob - gp->data[0]) > PROB_ABS_TOL) return 0;
    negated = malloc(n * sizeof *negated);
    if (!negated) return -1;
    for (i = 0; i < n; i++) negated[i] = -m->w.fuser[i];
    m->w.fuser = t->w.fuser = negated;
    printf("tta.json: flip_fuser_sign: the fuser is negated here (the weights do not carry the flip)\n");
    return 0;
}

/* Short group name of a parameter for the summary. */
static const char *group_of(const char *name)
{
    static const char *const groups[] = {"segmentor.fpn.", "segmentor.label_embedding", "segmentor.pixel_decoder.encoder.",
                                         "segmentor.pixel_decoder.", "segmentor.mask2former_decoder.decoder.layers.",
                                         "segmentor.mask2former_decoder.", "segmentor.class_predictor"};
    size_t i;
    for (i = 0; i < sizeof groups / sizeof groups[0]; i++)
        if (!strncmp(name, groups[i], strlen(groups[i]))) return groups[i];
    return "other";
}

#define N_GROUPS 8

int main(int argc, char **argv)
{
    static golden_set gs;
    static replay rp;
    char err[512], name[GOLDEN_NAME_LEN];
    const char *group_names[N_GROUPS];
    double group_worst[N_GROUPS];
    int n_groups = 0;
    loupe_model *m;
    loupe_tta *t;
    loupe_tta_loss loss;
    golden *px, *gp, *clip;
    const loupe_config *c;
    float *buf;
    double golden_sum = 0.0, golden_wsum = 0.0, norm, worst = 0.0, step_err = 0.0, v;
    const char *worst_name = "";
    int k, i, L, Q, C, M, p, moved = 0;
    long total_elems = 0;
    if (argc != 3) { fprintf(stderr, "usage: check_tta MODEL.bin CASE_DIR\n"); return 2; }
    if (load_set(&gs, argv[2], "tta") || load_set(&gs, argv[2], "golden")) return 1;
    px = find(&gs, "pixel_values");
    if (!px) { fprintf(stderr, "check_tta: %s has no pixel_values\n", argv[2]); return 1; }
    m = loupe_model_load(argv[1], err, sizeof err);
    if (!m) { fprintf(stderr, "check_tta: %s\n", err); return 1; }
    c = loupe_model_config(m);
    L = c->dec_layers; Q = c->num_queries; C = c->num_labels + 1; M = 4 * c->grid;
    t = loupe_tta_new(m, NULL, err, sizeof err);
    if (!t) { fprintf(stderr, "check_tta: %s\n", err); return 1; }
    /* the recorded draws in call order; an empty one (torch.rand of zero elements, e.g.
     * point sampling without a target) draws nothing and is skipped */
    for (k = 0; k < MAX_RAND; k++) {
        golden *r;
        snprintf(name, sizeof name, "tta_rand_%d", k);
        if (!(r = find(&gs, name))) break;
        replay_add(&rp, r->data, r->numel);
    }
    if (flip_fuser_sign(argv[2], m, t, px->data, find(&gs, "tta.fused_prob"))) return 1;
    t->rng.fill = replay_fill;
    t->rng.seek = replay_seek;
    t->rng.state = &rp;
    if (tta_accumulate(t, px->data, 1.0f, &loss, NULL, err, sizeof err)) { fprintf(stderr, "check_tta: %s\n", err); return 1; }
    printf("branch: %s (p = %.7f)\n", loss.has_target ? "forged target" : "no target", loss.prob);
    {
        /* with a target every recorded array but the layerdrop scalars is read; without, none */
        int expected = 0, ok;
        for (k = 0; k < rp.count; k++) expected += loss.has_target && rp.len[k] > 1;
        ok = rp.mismatches == 0 && rp.reads == expected;
        printf("%-44s %-4s %d of %d recorded draws read (expected %d), %d reads of no recorded array\n",
               "random numbers", ok ? "ok" : "FAIL", rp.reads, rp.count, expected, rp.mismatches);
        verdict(ok);
    }

    /* pseudo labels and the forward */
    if ((gp = find(&gs, "tta.fused_prob"))) {
        int ok = fabs(loss.prob - gp->data[0]) <= PROB_ABS_TOL;
        printf("%-44s %-4s ours %.8f golden %.8f\n", "tta.fused_prob", ok ? "ok" : "FAIL", loss.prob, gp->data[0]);
        verdict(ok);
    }
    if ((gp = find(&gs, "tta.pseudo_mask_labels")) && gp->numel == 0) {
        printf("%-44s %-4s golden has no target mask; ours %s\n", "tta.pseudo_mask_labels", loss.has_target ? "FAIL" : "ok",
               loss.has_target ? "has one" : "neither");
        verdict(!loss.has_target);
    } else compare_tensor(&gs, "tta.pseudo_mask_labels", t->wk.pseudo_mask, (long)c->grid * c->grid, TENSOR_REL_TOL);
    compare_tensor(&gs, "tta.conditional_query", t->s->cond_query, c->feature_size, TENSOR_REL_TOL);
    for (i = 0; i < L; i++) {
        snprintf(name, sizeof name, "tta.dec_class_logits_%d", i);
        compare_tensor(&gs, name, t->s->class_logits + (size_t)i * Q * C, (long)Q * C, TENSOR_REL_TOL);
        snprintf(name, sizeof name, "tta.dec_mask_logits_%d", i);
        compare_tensor(&gs, name, t->s->mask_logits + (size_t)i * Q * M * M, (long)Q * M * M, TENSOR_REL_TOL);
    }

    /* matching and the loss terms of every call */
    for (k = 0; k < L; k++) {
        const seg_loss_call *call = &t->calls[k];
        golden *gm, *gn;
        char suffix[16] = "";
        static const char *const terms[3] = {"loss_mask", "loss_dice", "loss_cross_entropy"};
        double raw[3], weighted[3];
        int j;
        snprintf(name, sizeof name, "tta.match_%d", k);
        if ((gm = find(&gs, name))) {
            int ok = gm->numel == 0 ? call->matched_query == -1 : (int)gm->data[0] == call->matched_query && gm->data[1] == 0.0f;
            printf("%-44s %-4s ours query %d, golden %s%d\n", name, ok ? "ok" : "FAIL", call->matched_query,
                   gm->numel ? "query " : "no match ", gm->numel ? (int)gm->data[0] : 0);
            verdict(ok);
        }
        snprintf(name, sizeof name, "tta.num_masks_%d", k);
        if ((gn = find(&gs, name))) {
            int ok = gn->data[0] == call->num_masks;
            printf("%-44s %-4s ours %g golden %g\n", name, ok ? "ok" : "FAIL", call->num_masks, gn->data[0]);
            verdict(ok);
        }
        if (k > 0) snprintf(suffix, sizeof suffix, "_%d", k - 1);
        raw[0] = call->loss_mask; raw[1] = call->loss_dice; raw[2] = call->loss_cross_entropy;
        weighted[0] = call->weighted_mask; weighted[1] = call->weighted_dice; weighted[2] = call->weighted_cross_entropy;
        for (j = 0; j < 3; j++) {
            snprintf(name, sizeof name, "tta.loss.%s%s", terms[j], suffix);
            v = compare_loss(&gs, name, raw[j]);
            if (v == v) golden_sum += 0.0;
            snprintf(name, sizeof name, "tta.loss_weighted.%s%s", terms[j], suffix);
            v = compare_loss(&gs, name, weighted[j]);
            if (v == v) golden_wsum += v;
        }
    }
    golden_sum = golden_wsum;
    compare_total(&gs, "tta.loss.total", loss.total, golden_sum);
    compare_total(&gs, "tta.loss_weighted.total", loss.total, golden_sum);
    compare_total(&gs, "tta.loss.model_total", loss.total, golden_sum);

    /* gradients of every trainable tensor */
    for (i = 0; i < gs.n; i++) {
        const golden *g = &gs.t[i];
        const char *pname;
        const train_param *tp = NULL;
        double maxd, maxg, tol, rel;
        int ok, gi;
        if (strncmp(g->name, "grad.loupe.", 11)) continue;
        pname = g->name + 11;
        for (p = 0; p < t->n_params && !tp; p++)
            if (!strcmp(t->params[p].name, pname)) tp = &t->params[p];
        if (!tp) {
            if (!strncmp(pname, "backbone.", 9))
                printf("%-44s not trained by loupe.c (upstream trains it by accident; README)\n", g->name);
            else { printf("%-44s FAIL no such trainable tensor\n", g->name); verdict(0); }
            continue;
        }
        if ((long)tp->numel != g->numel) { printf("%s FAIL shape\n", g->name); verdict(0); continue; }
        buf = malloc(tp->numel * sizeof *buf);
        param_to_upstream(tp, t->grad + tp->offset, buf);
        golden_diff(buf, g->data, g->numel, &maxd, &maxg);
        free(buf);
        if (strstr(pname, "self_attn.k_proj.bias")) { tol = KPROJ_BIAS_ABS_TOL; rel = -1.0; }
        else { tol = GRAD_REL_TOL * maxg; rel = maxg > 0.0 ? maxd / maxg : maxd; }
        ok = maxd <= tol;
        printf("%-44s %-4s max|d| %.3g  tol %.3g  max|g| %.3g\n", pname, ok ? "ok" : "FAIL", maxd, tol, maxg);
        verdict(ok);
        for (gi = 0; gi < n_groups && strcmp(group_names[gi], group_of(pname)); gi++) continue;
        if (gi == n_groups && n_groups < N_GROUPS) { group_names[n_groups] = group_of(pname); group_worst[n_groups++] = 0.0; }
        if (gi < N_GROUPS && rel > group_worst[gi]) group_worst[gi] = rel;
        if (rel > worst) { worst = rel; worst_name = pname; }
    }
    printf("gradient error max|d|/max|g| per group (worst tensor):\n");
    for (i = 0; i < n_groups; i++) printf("  %-46s %.3g\n", group_names[i], group_worst[i]);
    printf("  worst tensor: %s %.3g\n", worst_name, worst);
    norm = tta_grad_norm(t);
    if ((gp = find(&gs, "tta.grad_norm_segmentor_only"))) {
        int ok = fabs(norm - gp->data[0]) <= NORM_REL_TOL * gp->data[0];
        printf("%-44s %-4s ours %.7g golden %.7g rel %.2g\n", "tta.grad_norm_segmentor_only", ok ? "ok" : "FAIL", norm,
               gp->data[0], fabs(norm - gp->data[0]) / gp->data[0]);
        verdict(ok);
    }

    /* end to end: our own step (clipped with our segmentor-only norm), reported only */
    if (loupe_tta_update(t, NULL, err, sizeof err) == 0) {
        for (p = 0; p < t->n_params; p++) {
            const train_param *tp = &t->params[p];
            golden *g;
            long j;
            snprintf(name, sizeof name, "step1.loupe.%s", tp->name);
            if (!(g = find(&gs, name)) || g->numel != (long)tp->numel) continue;
            buf = malloc(tp->numel * sizeof *buf);
            param_to_upstream(tp, t->param + tp->offset, buf);
            for (j = 0; j < g->numel; j++) moved += fabs((double)buf[j] - g->data[j]) > END_TO_END_MOVE;
            total_elems += g->numel;
            free(buf);
        }
        printf("end-to-end step: %d of %ld elements differ from step1.* by more than %g (noise, README section 7)\n",
               moved, total_elems, END_TO_END_MOVE);
    }
    loupe_tta_free(t);

    /* the optimizer in isolation: golden gradients, golden clip coefficient */
    clip = find(&gs, "tta.clip_coef");
    t = loupe_tta_new(m, NULL, err, sizeof err);
    if (clip && t) {
        int missing = 0, ok;
        long differing = 0, step_elems = 0, j;
        double worst_ulps = 0.0;
        for (p = 0; p < t->n_params; p++) {
            const train_param *tp = &t->params[p];
            golden *g;
            snprintf(name, sizeof name, "grad.loupe.%s", tp->name);
            if (!(g = find(&gs, name)) || g->numel != (long)tp->numel) { missing++; continue; }
            param_from_upstream(tp, g->data, t->grad + tp->offset);
        }
        adamw_step(t, clip->data[0], 1.0);
        for (p = 0; p < t->n_params; p++) {
            const train_param *tp = &t->params[p];
            golden *g;
            double maxd, maxg;
            snprintf(name, sizeof name, "step1.loupe.%s", tp->name);
            if (!(g = find(&gs, name)) || g->numel != (long)tp->numel) { missing++; continue; }
            buf = malloc(tp->numel * sizeof *buf);
            param_to_upstream(tp, t->param + tp->offset, buf);
            golden_diff(buf, g->data, g->numel, &maxd, &maxg);
            if (maxd > step_err) step_err = maxd;
            for (j = 0; j < g->numel; j++) {
                float a = fabsf(g->data[j]);
                double d = fabs((double)buf[j] - g->data[j]), ulps = d / ((double)nextafterf(a, INFINITY) - a);
                if (d > 0.0) differing++;
                if (!(ulps <= worst_ulps)) worst_ulps = ulps;
            }
            step_elems += g->numel;
            free(buf);
        }
        ok = worst_ulps <= STEP_MAX_ULP && !missing;
        printf("%-44s %-4s %ld of %ld elements differ (at most %.3g ulp, max|d| %.3g; tol %.0f ulp), %d missing\n",
               "optimizer step (golden grad.*, clip_coef)", ok ? "ok" : "FAIL", differing, step_elems, worst_ulps, step_err,
               STEP_MAX_ULP, missing);
        verdict(ok);
    }
    loupe_tta_free(t);
    loupe_model_free(m);
    for (i = 0; i < gs.n; i++) free(gs.t[i].data);
    printf("check_tta %s: %d passed, %d failed\n", argv[2], passed, failed);
    return failed ? 1 : 0;
}
