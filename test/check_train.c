/* check_train.c - compares one loupe.c training step of each stage with upstream's.
 *
 *   check_train MODEL.bin CASE_DIR [cls|seg|cls_seg ...]
 *
 * CASE_DIR holds train.txt + train.safetensors + train.json (../shared/golden/README.md
 * section 10): one batch of two images (batch.*), and per stage every forward tensor,
 * the matches, every loss term, every trainable tensor's gradient and the parameters
 * after one optimizer step. The batch tensors are taken as they are (test/check_batch
 * checks their preparation), the recorded torch.rand draws are replayed at their
 * positions in upstream's batch order, and upstream's quirk is reproduced: the
 * backbone's class and position embeddings train in every stage (train_embeddings).
 * Tolerances (README 10.8, about 100x upstream's own fp32-vs-fp64 differences):
 *   forward tensors                    max|d| <= 1e-4 * max|golden| per tensor
 *   matches, num_masks, topk sets      exact
 *   loss terms, totals, grad_norm      rel 1e-4
 *   grad.*                             max|d| <= 1e-3 * max|golden| per tensor; 5e-3 for
 *                                      encoder.layers.1.self_attn.sampling_offsets.*
 *                                      (a sampling location on a pixel-centre line);
 *                                      *self_attn.k_proj.bias abs 1e-6 (analytically 0)
 *   optimizer alone                    golden grad.* and clip_coef -> step1.* within 1 ulp
 *   end to end                         |d| <= 2 lr for at most 0.1 % of the elements,
 *                                      1e-6 for the rest (Adam's first step is ~lr sign(g)) */
#define LOUPE_NO_MAIN
#include "../loupe.c"
#include "golden_io.h"
#include "replay.h"

#define MAX_GOLDEN 2048
#define TENSOR_REL_TOL 1e-4
#define LOSS_REL_TOL 1e-4
#define GRAD_REL_TOL 1e-3
#define GRAD_REL_TOL_OFFSETS 5e-3
#define KPROJ_BIAS_ABS_TOL 1e-6
#define STEP_MAX_ULP 1.0
#define E2E_ABS 1e-6
#define E2E_LR_MULT 2.0
#define E2E_MAX_FRACTION 1e-3

static golden_tensor gs[MAX_GOLDEN];
static int n_gs, passed, failed;

static void verdict(int ok) { if (ok) passed++; else failed++; }

static golden_tensor *find(const char *name)
{
    int i;
    for (i = 0; i < n_gs; i++)
        if (!strcmp(gs[i].name, name)) return &gs[i];
    return NULL;
}

static golden_tensor *findf(const char *fmt, const char *a, int b, int c)
{
    char name[GOLDEN_NAME_LEN];
    snprintf(name, sizeof name, fmt, a, b, c);
    return find(name);
}


/* Compares n values of ours with golden values g within rel * max|g|. */
static void compare_values(const char *name, const float *ours, const float *g, long n, double rel)
{
    double maxd, maxg;
    int ok;
    golden_diff(ours, g, n, &maxd, &maxg);
    ok = maxd <= rel * maxg;
    printf("%-58s %-4s max|d| %.3g  tol %.3g\n", name, ok ? "ok" : "FAIL", maxd, rel * maxg);
    verdict(ok);
}

static void compare_scalar(const char *name, double ours, double rel)
{
    golden_tensor *g = find(name);
    double ref;
    int ok;
    if (!g) { printf("%-58s (not in the case)\n", name); return; }
    ref = g->data[0];
    ok = fabs(ours - ref) <= rel * fabs(ref) || ours == ref;
    printf("%-58s %-4s ours %.9g  golden %.9g\n", name, ok ? "ok" : "FAIL", ours, ref);
    verdict(ok);
}

/* The stage's rand_calls of train.json: every draw's length and whether it was stored. */
static int read_rand_calls(const char *dir, const char *stage, long *len, int *stored, int max)
{
    char path[1024], key[64];
    size_t size;
    unsigned char *json;
    char *p, *end;
    int n = 0;
    snprintf(path, sizeof path, "%s/train.json", dir);
    json = golden_read_file(path, &size);
    if (!json) { fprintf(stderr, "check_train: cannot read %s\n", path); return -1; }
    json[size] = 0;
    snprintf(key, sizeof key, "\n  \"%s\": {", stage);
    p = strstr((char *)json, key);
    p = p ? strstr(p, "\"rand_calls\": [") : NULL;
    end = p ? strstr(p, "\n   ]") : NULL;
    if (!p) { fprintf(stderr, "check_train: %s has no rand_calls for stage %s\n", path, stage); free(json); return -1; }
    if (!end) end = p + strlen(p);   /* an empty list closes on its own line: "[]," */
    while ((p = strstr(p, "\"k\": ")) && p < end && n < max) {
        char *shape = strstr(p, "\"shape\": ["), *st = strstr(p, "\"stored\": ");
        long numel = 1;
        if (!shape || !st) break;
        shape += strlen("\"shape\": [");
        while (*shape != ']') {
            numel *= strtol(shape, &shape, 10);
            while (*shape == ',' || *shape == ' ' || *shape == '\n') shape++;
        }
        len[n] = numel;
        stored[n] = !strncmp(st + strlen("\"stored\": "), "true", 4);
        n++;
        p = st;
    }
    free(json);
    return n;
}

static const char *stage_names[3] = {"cls", "seg", "cls_seg"};

/* One stage: forward tensors per image, then the step's loss, gradients and update. */
static void check_stage(const char *model_path, const char *dir, int si)
{
    const char *st = stage_names[si];
    char err[512], name[GOLDEN_NAME_LEN];
    static replay rp;
    long lens[REPLAY_MAX];
    int stored[REPLAY_MAX], n_calls, k, b, i, p, L, Q, C, M, S, g, W, B = 2;
    loupe_model *m;
    loupe_trainer *t;
    loupe_train_options o;
    loupe_train_loss loss;
    loupe_example ex[2];
    golden_tensor *px, *pl, *ml[2], *gt;
    double norm, worst = 0.0, maxd, maxg;
    const char *worst_name = "";
    float *buf;
    int stage = si == 0 ? LOUPE_TRAIN_CLS : si == 1 ? LOUPE_TRAIN_SEG : LOUPE_TRAIN_CLS_SEG;

    printf("== stage %s ==\n", st);
    m = loupe_model_load(model_path, err, sizeof err);
    if (!m) { printf("%s\n", err); verdict(0); return; }
    L = m->cfg.dec_layers; Q = m->cfg.num_queries; C = m->cfg.num_labels + 1; g = m->cfg.grid;
    M = 4 * g; S = m->cfg.image_size; W = m->cfg.width;
    loupe_train_default_options(&o, stage);
    o.train_embeddings = 1;   /* upstream's quirk, reproduced for the comparison */
    t = loupe_trainer_new(m, &o, err, sizeof err);
    if (!t) { printf("%s\n", err); verdict(0); loupe_model_free(m); return; }
    /* the batch */
    px = find("batch.pixel_values");
    pl = find("batch.patch_labels");
    ml[0] = find("batch.mask_labels_0");
    ml[1] = find("batch.mask_labels_1");
    if (!px || !pl || !ml[0] || !ml[1] || !find("batch.labels")) { printf("the case lacks batch tensors\n"); verdict(0); return; }
    for (b = 0; b < B; b++) {
        ex[b].pixel_values = px->data + (size_t)b * 3 * S * S;
        ex[b].n_targets = (int)ml[b]->dims[0];
        ex[b].mask_labels = ex[b].n_targets ? ml[b]->data : NULL;
        ex[b].patch_labels = pl->data + (size_t)b * g * g;
        ex[b].label = (int)find("batch.labels")->data[b];
        ex[b].features = NULL;
    }
    /* the recorded draws, unstored ones as gaps of their length */
    memset(&rp, 0, sizeof rp);
    n_calls = read_rand_calls(dir, st, lens, stored, REPLAY_MAX);
    if (n_calls < 0) { verdict(0); return; }
    for (k = 0; k < n_calls; k++) {
        golden_tensor *r = findf("%s.rand_%d", st, k, 0);
        if (stored[k] && (!r || r->numel != lens[k])) { printf("%s.rand_%d missing\n", st, k); verdict(0); return; }
        if (stored[k]) replay_add(&rp, r->data, r->numel);
        else replay_skip(&rp, lens[k]);
    }
    t->rng.fill = replay_fill;
    t->rng.seek = replay_seek;
    t->rng.state = &rp;

    /* forward tensors, image by image */
    for (b = 0; b < B; b++) {
        char label[GOLDEN_NAME_LEN];
        if (trainer_forward(t, ex[b].pixel_values, NULL, ex[b].n_targets ? 1.0f : 0.0f, err, sizeof err)) {
            printf("%s\n", err); verdict(0); return;
        }
        if (t->has_cls) {
            if ((gt = findf("%s.global_logit", st, 0, 0))) {
                snprintf(label, sizeof label, "%s.global_logit[%d]", st, b);
                compare_values(label, &t->s->global_logit, gt->data + b, 1, TENSOR_REL_TOL);
            }
            if ((gt = findf("%s.patch_logits", st, 0, 0))) {
                snprintf(label, sizeof label, "%s.patch_logits[%d]", st, b);
                compare_values(label, t->s->patch_logits, gt->data + (size_t)b * g * g, (long)g * g, TENSOR_REL_TOL);
            }
            if ((gt = findf("%s.fused_logit", st, 0, 0))) {
                snprintf(label, sizeof label, "%s.fused_logit[%d]", st, b);
                compare_values(label, &t->s->fused_logit, gt->data + b, 1, TENSOR_REL_TOL);
            }
        }
        if (t->has_seg) {
            if ((gt = findf("%s.conditional_query", st, 0, 0))) {
                snprintf(label, sizeof label, "%s.conditional_query[%d]", st, b);
                compare_values(label, t->s->cond_query, gt->data + (size_t)b * m->cfg.feature_size,
                               m->cfg.feature_size, TENSOR_REL_TOL);
            }
            for (i = 0; i < L; i++) {
                if ((gt = findf("%s.dec_class_logits_%d", st, i, 0))) {
                    snprintf(label, sizeof label, "%s.dec_class_logits_%d[%d]", st, i, b);
                    compare_values(label, t->s->class_logits + (size_t)i * Q * C, gt->data + (size_t)b * Q * C,
                                   (long)Q * C, TENSOR_REL_TOL);
                }
                if ((gt = findf("%s.dec_mask_logits_%d", st, i, 0))) {
                    snprintf(label, sizeof label, "%s.dec_mask_logits_%d[%d]", st, i, b);
                    compare_values(label, t->s->mask_logits + (size_t)i * Q * M * M, gt->data + (size_t)b * Q * M * M,
                                   (long)Q * M * M, TENSOR_REL_TOL);
                }
            }
        }
    }

    /* the step: loss and gradients of the whole batch */
    t->rng_position = 0;
    if (t->has_seg) t->loss_scratch.topk = malloc((size_t)L * (size_t)(t->loss_cfg.importance_sample_ratio *
                                                                  t->loss_cfg.train_num_points) * sizeof(int));
    if (loupe_trainer_accumulate(t, ex, B, 1.0, &loss, err, sizeof err)) { printf("%s\n", err); verdict(0); return; }
    if (t->has_seg) {
        int expected = 0, ok;
        for (k = 0; k < rp.count; k++) expected += rp.arr[k] && rp.len[k] > 1;
        ok = rp.mismatches == 0 && rp.reads == expected;
        printf("%-58s %-4s %d of %d recorded draws read (expected %d), %d reads of no recorded array\n",
               "random numbers", ok ? "ok" : "FAIL", rp.reads, rp.count, expected, rp.mismatches);
        verdict(ok);
        for (k = 0; k < L; k++) {
            const seg_loss_call *call = &t->calls[k];
            static const char *const terms[3] = {"loss_mask", "loss_dice", "loss_cross_entropy"};
            double raw[3], weighted[3];
            char suffix[16] = "";
            int j, nu = (int)(t->loss_cfg.importance_sample_ratio * t->loss_cfg.train_num_points);
            golden_tensor *gm = findf("%s.match_%d", st, k, 0), *gi = findf("%s.topk_idx_%d", st, k, 0);
            if (gm) {
                /* one target in this batch (image 0): rows [image, query, target] */
                int ok = gm->numel == 3 && (int)gm->data[1] == call->matched_query;
                printf("%-58s %-4s ours query %d, golden %d\n", gm->name,
                       ok ? "ok" : "FAIL", call->matched_query, gm->numel == 3 ? (int)gm->data[1] : -1);
                verdict(ok);
            }
            if (gi && gi->numel == nu) {
                int same = 0;
                for (j = 0; j < nu; j++) same += t->loss_scratch.topk[(size_t)k * nu + j] == (int)gi->data[j];
                printf("%-58s %-4s %d of %d importance-sampled points as upstream\n", gi->name,
                       same == nu ? "ok" : "FAIL", same, nu);
                verdict(same == nu);
            }
            snprintf(name, sizeof name, "%s.num_masks_%d", st, k);
            compare_scalar(name, call->num_masks, 0.0);
            if (k > 0) snprintf(suffix, sizeof suffix, "_%d", k - 1);
            raw[0] = call->loss_mask; raw[1] = call->loss_dice; raw[2] = call->loss_cross_entropy;
            weighted[0] = call->weighted_mask; weighted[1] = call->weighted_dice; weighted[2] = call->weighted_cross_entropy;
            for (j = 0; j < 3; j++) {
                snprintf(name, sizeof name, "%s.loss.%s%s", st, terms[j], suffix);
                compare_scalar(name, raw[j], LOSS_REL_TOL);
                snprintf(name, sizeof name, "%s.loss_weighted.%s%s", st, terms[j], suffix);
                compare_scalar(name, weighted[j], LOSS_REL_TOL);
            }
        }
        snprintf(name, sizeof name, "%s.loss.seg_total", st);
        compare_scalar(name, loss.seg, LOSS_REL_TOL);
    }
    if (t->has_cls) {
        snprintf(name, sizeof name, "%s.cls_loss.cls_part", st);
        compare_scalar(name, loss.cls_part, LOSS_REL_TOL);
        snprintf(name, sizeof name, "%s.cls_loss.patch_part", st);
        compare_scalar(name, loss.patch_part, LOSS_REL_TOL);
        snprintf(name, sizeof name, "%s.cls_loss.total", st);
        compare_scalar(name, loss.cls, LOSS_REL_TOL);
    }
    snprintf(name, sizeof name, "%s.loss.total", st);
    compare_scalar(name, loss.total, LOSS_REL_TOL);

    /* every trainable tensor's gradient, and no tensor upstream trains left out */
    {
        int n_golden = 0, n_found = 0;
        size_t plen;
        snprintf(name, sizeof name, "%s.grad.loupe.", st);
        plen = strlen(name);
        for (i = 0; i < n_gs; i++) {
            const golden_tensor *gg = &gs[i];
            const train_param *tp = NULL;
            double tol, rel;
            int ok;
            if (strncmp(gg->name, name, plen)) continue;
            n_golden++;
            for (p = 0; p < t->n_params && !tp; p++)
                if (!strcmp(t->params[p].name, gg->name + plen)) tp = &t->params[p];
            if (!tp || (long)tp->numel != gg->numel) { printf("%-58s FAIL not trained here\n", gg->name); verdict(0); continue; }
            n_found++;
            buf = malloc(tp->numel * sizeof *buf);
            param_to_upstream(tp, t->grad + tp->offset, buf);
            golden_diff(buf, gg->data, gg->numel, &maxd, &maxg);
            free(buf);
            if (strstr(tp->name, "self_attn.k_proj.bias")) { tol = KPROJ_BIAS_ABS_TOL; rel = 0.0; }
            else {
                tol = (strstr(tp->name, "encoder.layers.1.self_attn.sampling_offsets") ? GRAD_REL_TOL_OFFSETS
                                                                                        : GRAD_REL_TOL) * maxg;
                rel = maxg > 0.0 ? maxd / maxg : maxd;
            }
            ok = maxd <= tol;
            if (!ok || getenv("CHECK_TRAIN_VERBOSE"))
                printf("%-58s %-4s max|d| %.3g  tol %.3g\n", tp->name, ok ? "ok" : "FAIL", maxd, tol);
            verdict(ok);
            if (rel > worst) { worst = rel; worst_name = tp->name; }
        }
        printf("%-58s %-4s %d of %d golden gradients compared; we train %d tensors; worst %s %.3g of its max\n",
               "gradients", n_found == n_golden && n_golden == t->n_params ? "ok" : "FAIL", n_found, n_golden,
               t->n_params, worst_name, worst);
        verdict(n_found == n_golden && n_golden == t->n_params);
    }
    norm = tta_grad_norm(t);
    snprintf(name, sizeof name, "%s.grad_norm", st);
    compare_scalar(name, norm, LOSS_REL_TOL);

    /* end to end: our own clipping and step */
    {
        long moved = 0, far = 0, total = 0, j;
        int ok;
        if (loupe_trainer_update(t, 1.0, NULL, err, sizeof err)) { printf("%s\n", err); verdict(0); return; }
        for (p = 0; p < t->n_params; p++) {
            const train_param *tp = &t->params[p];
            snprintf(name, sizeof name, "%s.step1.loupe.%s", st, tp->name);
            if (!(gt = find(name)) || gt->numel != (long)tp->numel) { verdict(0); continue; }
            buf = malloc(tp->numel * sizeof *buf);
            param_to_upstream(tp, t->param + tp->offset, buf);
            for (j = 0; j < gt->numel; j++) {
                double d = fabs((double)buf[j] - gt->data[j]);
                moved += d > E2E_ABS;
                far += d > E2E_LR_MULT * tp->lr;
            }
            total += gt->numel;
            free(buf);
        }
        ok = far == 0 && moved <= E2E_MAX_FRACTION * total;
        printf("%-58s %-4s %ld of %ld elements differ by more than %g (at most %g allowed), %ld by more than 2 lr\n",
               "end-to-end step", ok ? "ok" : "FAIL", moved, total, E2E_ABS, E2E_MAX_FRACTION * total, far);
        verdict(ok);
    }
    free(t->loss_scratch.topk);
    t->loss_scratch.topk = NULL;
    loupe_trainer_free(t);

    /* the optimizer alone: golden gradients and clip coefficient -> step1.* */
    t = loupe_trainer_new(m, &o, err, sizeof err);
    gt = findf("%s.clip_coef", st, 0, 0);
    if (t && gt) {
        long differing = 0, elems = 0, j;
        double worst_ulps = 0.0;
        int missing = 0, ok;
        for (p = 0; p < t->n_params; p++) {
            const train_param *tp = &t->params[p];
            golden_tensor *gg;
            snprintf(name, sizeof name, "%s.grad.loupe.%s", st, tp->name);
            gg = find(name);
            if (!gg || gg->numel != (long)tp->numel) { missing++; continue; }
            param_from_upstream(tp, gg->data, t->grad + tp->offset);
        }
        adamw_step(t, gt->data[0], 1.0);
        for (p = 0; p < t->n_params; p++) {
            const train_param *tp = &t->params[p];
            golden_tensor *gg;
            snprintf(name, sizeof name, "%s.step1.loupe.%s", st, tp->name);
            if (!(gg = find(name)) || gg->numel != (long)tp->numel) { missing++; continue; }
            buf = malloc(tp->numel * sizeof *buf);
            param_to_upstream(tp, t->param + tp->offset, buf);
            for (j = 0; j < gg->numel; j++) {
                float a = fabsf(gg->data[j]);
                double d = fabs((double)buf[j] - gg->data[j]), ulps = d / ((double)nextafterf(a, INFINITY) - a);
                differing += d > 0.0;
                if (!(ulps <= worst_ulps)) worst_ulps = ulps;
            }
            elems += gg->numel;
            free(buf);
        }
        ok = worst_ulps <= STEP_MAX_ULP && !missing;
        printf("%-58s %-4s %ld of %ld elements differ (at most %.3g ulp), %d missing\n",
               "optimizer step (golden grad.*, clip_coef)", ok ? "ok" : "FAIL", differing, elems, worst_ulps, missing);
        verdict(ok);
    } else verdict(0);
    loupe_trainer_free(t);
    loupe_model_free(m);
    (void)W;
}

int main(int argc, char **argv)
{
    int i, s;
    if (argc < 3) { fprintf(stderr, "usage: check_train MODEL.bin CASE_DIR [cls|seg|cls_seg ...]\n"); return 2; }
    if (golden_load("check_train", argv[2], "train", gs, MAX_GOLDEN, &n_gs)) return 1;
    for (s = 0; s < 3; s++) {
        int wanted = argc == 3;
        for (i = 3; i < argc; i++) wanted |= !strcmp(argv[i], stage_names[s]);
        if (wanted) check_stage(argv[1], argv[2], s);
    }
    for (i = 0; i < n_gs; i++) free(gs[i].data);
    printf("check_train %s: %d passed, %d failed\n", argv[2], passed, failed);
    return failed ? 1 : 0;
}
