/* check_train_cls.c - the backward of the backbone and the classifier, and LoupeClsLoss,
 * against upstream's training step of stage cls (../shared/golden/README.md section 10).
 *
 *   check_train_cls MODEL.bin CASE_DIR
 *
 * MODEL.bin: the case's float32 weight file; CASE_DIR holds train.txt + train.safetensors.
 * The batch's two images (batch.pixel_values) run forward with the tapes, one at a time;
 * LoupeClsLoss with B = 2 (image weight 1/2, patch weight 1/(2N)) and the backward of
 * each follow. Stage cls trains the classifier and, through the frozen backbone, its
 * class and position embeddings. Tolerances (README 10.8, about 100x upstream's own
 * fp32-vs-fp64 differences):
 *   global / patch / fused logits, fused_prob   max|d| <= 1e-4 * max|golden| per tensor
 *   every cls_loss.* term, loss.*               rel 1e-4 (per element)
 *   cls.grad.loupe.<param>                      max|d| <= 1e-3 * max|golden| per tensor
 *   grad_norm, clip_coef                        rel 1e-4
 * The golden backbone gradients of stage cls_seg include the segmentation loss, so the
 * backward of the whole backbone (every parameter trained) is checked here by central
 * differences of the batch's cls loss instead: in every backbone tensor the element
 * with the largest gradient and FD_PICKS - 1 random ones, |fd - analytic| <= FD_REL
 * |analytic| + FD_ABS max|gradient of the tensor|. Gradients must also be the same bits
 * with one thread and with all. */
#define LOUPE_NO_MAIN
#include "../loupe.c"
#include "golden_io.h"

#define MAX_GOLDEN 1024
#define MAX_PARAMS 1024
#define BATCH 2
#define TENSOR_REL_TOL 1e-4
#define LOSS_REL_TOL 1e-4
#define GRAD_REL_TOL 1e-3
#define NORM_REL_TOL 1e-4
#define CLIP_EPS 1e-6        /* clip_grad_norm_: 1 / (norm + 1e-6) */
/* Central differences through the whole float32 model. The loss (about 0.36) is summed
 * in double from float logits, whose rounding moves it by up to about FD_NOISE of its
 * value from one perturbation to the next: measured, the differences' errors grow as
 * 1 / step below 1e-2 (about 3e-8 / step, against backbone gradients of 1e-5..1e-2),
 * and as step^2 above it (curvature: 0.4 % at 3e-2 for attn_pool.attn.out_proj.bias).
 * Allowed: |fd - analytic| <= FD_REL |analytic| + FD_ABS max|gradient of the tensor|
 * + FD_NOISE |loss| / (2 step). */
#define FD_STEP 1e-2f
#define FD_REL 1e-2
#define FD_ABS 1e-3
#define FD_NOISE 1.2e-7     /* 2^-23: one float32 rounding of the logits, relative */
#define FD_PICKS 4

typedef golden_tensor golden;

static golden gt[MAX_GOLDEN];
static int n_golden, passed, failed;

static void verdict(int ok) { if (ok) passed++; else failed++; }

static golden *find(const char *name)
{
    int i;
    for (i = 0; i < n_golden; i++)
        if (!strcmp(gt[i].name, name)) return &gt[i];
    return NULL;
}

/* One trainable tensor: its upstream name, its values (writable: the model is loaded from
 * our own copy of the file) and its gradient buffer. */
typedef struct tparam {
    char name[128];
    float *p, *g;
    size_t n;
} tparam;

typedef struct trainer {
    loupe_model *m;
    loupe_session *s;
    pe_tape bt;
    cls_tape ct;
    pe_work k;
    void *raw, *file_raw;
    pe_grads pg;         /* every backbone tensor trained */
    pe_block_g *bg;
    cls_grads cg;
    tparam params[MAX_PARAMS];
    int np;
    float *d_feats, *d_pooled, *d_patch;
    cls_loss_config cfg;
    /* the last batch's outputs */
    float global_logit[BATCH], patch_logits[BATCH * 1024], fused_logit[BATCH], prob[BATCH];
    double cls_terms[BATCH], patch_terms[BATCH * 1024], cls_part, patch_part, total;
} trainer;

/* Registers a tensor of n values at p (NULL: absent in this model) and wires its gradient
 * buffer into *slot. */
static int reg(trainer *t, float **slot, const void *p, size_t n, const char *fmt, ...)
{
    tparam *q;
    va_list ap;
    if (!p || t->np == MAX_PARAMS) return -1;
    q = &t->params[t->np++];
    va_start(ap, fmt);
    vsnprintf(q->name, sizeof q->name, fmt, ap);
    va_end(ap);
    q->p = (float *)(uintptr_t)p; /* our own copy of the file: writable */
    q->n = n;
    q->g = calloc(n, sizeof *q->g);
    if (!q->g) return -1;
    *slot = q->g;
    return 0;
}

static int reg_linear(trainer *t, linear_g *g, linear_w l, size_t out, size_t in, const char *w, const char *b,
                      const char *prefix)
{
    return reg(t, &g->w, l.w.data, out * in, "%s%s", prefix, w) | reg(t, &g->b, l.b, out, "%s%s", prefix, b);
}

static int reg_norm(trainer *t, norm_g *g, norm_w n, size_t dim, const char *prefix)
{
    return reg(t, &g->w, n.w, dim, "%s.weight", prefix) | reg(t, &g->b, n.b, dim, "%s.bias", prefix);
}

/* Every backbone and classifier tensor of the model in upstream's names. */
static int register_params(trainer *t)
{
    const loupe_config *c = &t->m->cfg;
    const loupe_weights *w = &t->m->w;
    size_t W = (size_t)c->width, T = (size_t)c->grid * c->grid + 1, M = (size_t)c->mlp_width;
    size_t Mp = (size_t)c->pool_mlp_width, P = (size_t)c->patch_size;
    char p[128];
    int i, h, bad = 0;
    t->bg = calloc((size_t)c->layers, sizeof *t->bg);
    if (!t->bg) return -1;
    t->pg.blocks = t->bg;
    bad |= reg(t, &t->pg.class_embedding, w->class_embedding, W, "backbone.class_embedding");
    bad |= reg(t, &t->pg.positional_embedding, w->positional_embedding, T * W, "backbone.positional_embedding");
    bad |= reg(t, &t->pg.conv1, w->conv1.data, W * 3 * P * P, "backbone.conv1.weight");
    bad |= reg_norm(t, &t->pg.ln_pre, w->ln_pre, W, "backbone.ln_pre");
    for (i = 0; i < c->layers; i++) {
        const pe_block_w *b = &w->blocks[i];
        pe_block_g *g = &t->bg[i];
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.ln_1", i); bad |= reg_norm(t, &g->ln_1, b->ln_1, W, p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.attn.", i);
        bad |= reg_linear(t, &g->qkv, b->qkv, 3 * W, W, "in_proj_weight", "in_proj_bias", p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.attn.out_proj.", i);
        bad |= reg_linear(t, &g->out, b->out, W, W, "weight", "bias", p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.ln_2", i); bad |= reg_norm(t, &g->ln_2, b->ln_2, W, p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.mlp.c_fc.", i);
        bad |= reg_linear(t, &g->fc, b->fc, M, W, "weight", "bias", p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.mlp.c_proj.", i);
        bad |= reg_linear(t, &g->proj, b->proj, W, M, "weight", "bias", p);
    }
    bad |= reg_norm(t, &t->pg.ln_post, w->ln_post, W, "backbone.ln_post");
    bad |= reg(t, &t->pg.pool.probe, w->pool.probe, W, "backbone.attn_pool.probe");
    bad |= reg_linear(t, &t->pg.pool.qkv, w->pool.qkv, 3 * W, W, "in_proj_weight", "in_proj_bias", "backbone.attn_pool.attn.");
    bad |= reg_linear(t, &t->pg.pool.out, w->pool.out, W, W, "weight", "bias", "backbone.attn_pool.attn.out_proj.");
    bad |= reg_norm(t, &t->pg.pool.ln, w->pool.ln, W, "backbone.attn_pool.layernorm");
    bad |= reg_linear(t, &t->pg.pool.fc, w->pool.fc, Mp, W, "weight", "bias", "backbone.attn_pool.mlp.c_fc.");
    bad |= reg_linear(t, &t->pg.pool.proj, w->pool.proj, W, Mp, "weight", "bias", "backbone.attn_pool.mlp.c_proj.");
    for (h = 0; h < 2; h++) {
        const cls_head_w *hw = h ? &w->patch_head : &w->global_head;
        cls_head_g *hg = h ? &t->cg.patch_head : &t->cg.global_head;
        for (i = 0; i < c->cls_layers; i++) {
            size_t in = i ? (size_t)c->cls_hidden : W, out = i == c->cls_layers - 1 ? 1 : (size_t)c->cls_hidden;
            snprintf(p, sizeof p, "classifier.%s.layers.%d.", h ? "patch_classifier" : "classifier", i);
            bad |= reg_linear(t, &hg->layers[i], hw->layers[i], out, in, "weight", "bias", p);
        }
    }
    bad |= reg(t, &t->cg.fuser, w->fuser, T, "classifier.fuser.fuse.weight");
    return bad ? -1 : 0;
}

static void zero_grads(trainer *t)
{
    int i;
    for (i = 0; i < t->np; i++) memset(t->params[i].g, 0, t->params[i].n * sizeof *t->params[i].g);
}

/* One batch of stage cls: the forward of each image with the tapes, its share of
 * LoupeClsLoss and (when pg is given) the backward into the gradients of pg and cg.
 * Returns the loss. */
static double batch_step(trainer *t, const float *pixels, const float *labels, const float *patch_labels,
                         const pe_grads *pg, const cls_grads *cg)
{
    const loupe_config *c = &t->m->cfg;
    loupe_session *s = t->s;
    int N = c->grid * c->grid, T = N + 1, W = c->width, S = c->image_size, b;
    t->cls_part = t->patch_part = 0.0;
    for (b = 0; b < BATCH; b++) {
        cls_loss_terms terms;
        float d_fused = 0.0f;
        vision_transformer(s, pixels + (size_t)b * 3 * S * S);
        loupe_classifier(s);
        t->global_logit[b] = s->global_logit;
        t->fused_logit[b] = s->fused_logit;
        t->prob[b] = s->prob;
        memcpy(t->patch_logits + (size_t)b * N, s->patch_logits, (size_t)N * sizeof *s->patch_logits);
        memset(t->d_patch, 0, (size_t)N * sizeof *t->d_patch);
        loupe_cls_loss(&t->cfg, s->fused_logit, labels[b], s->patch_logits, patch_labels + (size_t)b * N, N,
                       1.0 / BATCH, 1.0 / ((double)BATCH * N), &terms, t->patch_terms + (size_t)b * N, &d_fused,
                       t->d_patch);
        t->cls_terms[b] = terms.cls_term;
        t->cls_part += terms.cls_part;
        t->patch_part += terms.patch_part;
        if (!pg) continue;
        memset(t->d_feats, 0, (size_t)T * W * sizeof *t->d_feats);
        memset(t->d_pooled, 0, (size_t)W * sizeof *t->d_pooled);
        loupe_classifier_backward(s, cg, d_fused, t->d_patch, t->d_pooled, t->d_feats, &t->k);
        vision_transformer_backward(s, pg, t->d_feats, t->d_pooled, &t->k);
    }
    t->total = t->cls_part + t->patch_part;
    return t->total;
}

/* max |ours - golden| <= rel * max |golden|. */
static void compare_tensor(const char *name, const float *ours, long n, double rel)
{
    golden *g = find(name);
    double maxd = 0.0, maxg = 0.0;
    long i;
    int ok;
    if (!g || g->numel != n) {
        printf("%-58s FAIL %s\n", name, g ? "size differs" : "missing in the case");
        verdict(0);
        return;
    }
    g->compared = 1;
    for (i = 0; i < n; i++) {
        double d = fabs((double)ours[i] - g->data[i]);
        if (!(d <= maxd)) maxd = d;
        if (fabs(g->data[i]) > maxg) maxg = fabs(g->data[i]);
    }
    ok = maxd <= rel * maxg;
    printf("%-58s %-4s max|d| %.3g  tol %.3g  max|g| %.3g\n", name, ok ? "ok" : "FAIL", maxd, rel * maxg, maxg);
    verdict(ok);
}

/* Every element within rel of the golden value; returns the worst relative error. */
static double compare_terms(const char *name, const double *ours, long n)
{
    golden *g = find(name);
    double worst = 0.0;
    long i;
    int ok;
    if (!g || g->numel != n) {
        printf("%-58s FAIL %s\n", name, g ? "size differs" : "missing in the case");
        verdict(0);
        return INFINITY;
    }
    g->compared = 1;
    for (i = 0; i < n; i++) {
        double d = fabs(ours[i] - g->data[i]), r = g->data[i] != 0.0f ? d / fabs(g->data[i]) : d;
        if (!(r <= worst)) worst = r;
    }
    ok = worst <= LOSS_REL_TOL;
    if (n == 1) printf("%-58s %-4s ours %.9g  golden %.9g  rel %.2g\n", name, ok ? "ok" : "FAIL", ours[0], g->data[0], worst);
    else printf("%-58s %-4s %ld values, worst rel %.2g\n", name, ok ? "ok" : "FAIL", n, worst);
    verdict(ok);
    return worst;
}

static double compare_scalar(const char *name, double ours)
{
    return compare_terms(name, &ours, 1);
}

/* The golden step of stage cls. */
static void check_golden_step(trainer *t)
{
    const loupe_config *c = &t->m->cfg;
    golden *px = find("batch.pixel_values"), *labels = find("batch.labels"), *plabels = find("batch.patch_labels"), *g;
    int N = c->grid * c->grid, b, i, compared = 0, expected = 0;
    double v[BATCH * 1024], norm = 0.0, worst = 0.0;
    char name[GOLDEN_NAME_LEN];
    pe_grads frozen; /* stage cls: the backbone is frozen but for its two embeddings */
    float lab[BATCH];
    if (!px || !labels || !plabels || labels->numel != BATCH || plabels->numel != (long)BATCH * N ||
        px->numel != (long)BATCH * 3 * c->image_size * c->image_size) {
        printf("FAIL the case lacks the batch (batch.pixel_values, batch.labels, batch.patch_labels)\n");
        verdict(0);
        return;
    }
    memset(&frozen, 0, sizeof frozen);
    frozen.class_embedding = t->pg.class_embedding;
    frozen.positional_embedding = t->pg.positional_embedding;
    zero_grads(t);
    batch_step(t, px->data, labels->data, plabels->data, &frozen, &t->cg);
    printf("-- forward (2 images)\n");
    compare_tensor("cls.global_logit", t->global_logit, BATCH, TENSOR_REL_TOL);
    compare_tensor("cls.patch_logits", t->patch_logits, (long)BATCH * N, TENSOR_REL_TOL);
    compare_tensor("cls.fused_logit", t->fused_logit, BATCH, TENSOR_REL_TOL);
    compare_tensor("cls.fused_prob", t->prob, BATCH, TENSOR_REL_TOL);
    printf("-- LoupeClsLoss (B = 2)\n");
    for (b = 0; b < BATCH; b++) lab[b] = labels->data[b];
    for (b = 0; b < BATCH; b++) v[b] = lab[b];
    compare_terms("cls.cls_loss.cls_labels", v, BATCH);
    compare_terms("cls.cls_loss.cls_terms", t->cls_terms, BATCH);
    compare_scalar("cls.cls_loss.cls_part", t->cls_part);
    for (i = 0; i < BATCH * N; i++) v[i] = plabels->data[i];
    compare_terms("cls.cls_loss.patch_labels", v, (long)BATCH * N);
    compare_terms("cls.cls_loss.patch_terms", t->patch_terms, (long)BATCH * N);
    compare_scalar("cls.cls_loss.patch_part", t->patch_part);
    compare_scalar("cls.cls_loss.total", t->total);
    compare_scalar("cls.loss.cls_weighted", 1.0 * t->total); /* cls_loss_weight of stage cls: 1 */
    compare_scalar("cls.loss.total", t->total);
    printf("-- gradients of every trainable tensor of stage cls\n");
    for (i = 0; i < t->np; i++) {
        const tparam *q = &t->params[i];
        int trained = strncmp(q->name, "backbone.", 9) != 0 || !strcmp(q->name, "backbone.class_embedding") ||
                      !strcmp(q->name, "backbone.positional_embedding");
        size_t j;
        if (!trained) continue;
        for (j = 0; j < q->n; j++) norm += (double)q->g[j] * q->g[j];
        snprintf(name, sizeof name, "cls.grad.loupe.%s", q->name);
        g = find(name);
        if (g && g->numel == (long)q->n) {
            double maxd = 0.0, maxg = 0.0;
            for (j = 0; j < q->n; j++) {
                if (fabs(q->g[j] - g->data[j]) > maxd) maxd = fabs(q->g[j] - g->data[j]);
                if (fabs(g->data[j]) > maxg) maxg = fabs(g->data[j]);
            }
            if (maxg > 0.0 && maxd / maxg > worst) worst = maxd / maxg;
        }
        compare_tensor(name, q->g, (long)q->n, GRAD_REL_TOL);
        compared++;
    }
    for (i = 0; i < n_golden; i++) expected += !strncmp(gt[i].name, "cls.grad.loupe.", 15);
    for (i = 0; i < n_golden; i++)
        if (!strncmp(gt[i].name, "cls.grad.loupe.", 15) && !gt[i].compared) printf("%-58s FAIL not computed\n", gt[i].name);
    printf("%-58s %-4s %d of %d, worst max|d| / max|g| %.3g\n", "trainable tensors compared", compared == expected ? "ok" : "FAIL",
           compared, expected, worst);
    verdict(compared == expected);
    norm = sqrt(norm);
    compare_scalar("cls.grad_norm", norm);
    compare_scalar("cls.clip_coef", norm + CLIP_EPS > 1.0 ? 1.0 / (norm + CLIP_EPS) : 1.0);
}

/* Central differences of the batch's loss in a few elements of every backbone tensor,
 * with every backbone parameter trained. */
static void check_backbone_fd(trainer *t, const golden *px, const float *labels, const float *plabels)
{
    uint64_t seed = 12345;
    int i, k, bad_tensors = 0, n_tensors = 0;
    double worst = 0.0, loss;
    const char *worst_name = "";
    zero_grads(t);
    loss = batch_step(t, px->data, labels, plabels, &t->pg, &t->cg);
    printf("-- whole backbone + classifier + LoupeClsLoss vs central differences (every parameter trained)\n");
    for (i = 0; i < t->np; i++) {
        tparam *q = &t->params[i];
        size_t pick[FD_PICKS], j;
        double maxg = 0.0, tensor_worst = 0.0;
        int bad = 0;
        if (strncmp(q->name, "backbone.", 9)) continue;
        n_tensors++;
        pick[0] = 0;
        for (j = 0; j < q->n; j++) {
            if (fabs(q->g[j]) > maxg) maxg = fabs(q->g[j]);
            if (fabs(q->g[j]) > fabs(q->g[pick[0]])) pick[0] = j;
        }
        for (k = 1; k < FD_PICKS; k++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            pick[k] = (size_t)(seed >> 33) % q->n;
        }
        for (k = 0; k < FD_PICKS; k++) {
            float keep = q->p[pick[k]], up = keep + FD_STEP, down = keep - FD_STEP;
            double lp, lm, fd, err;
            q->p[pick[k]] = up;
            lp = batch_step(t, px->data, labels, plabels, NULL, NULL);
            q->p[pick[k]] = down;
            lm = batch_step(t, px->data, labels, plabels, NULL, NULL);
            q->p[pick[k]] = keep;
            fd = (lp - lm) / ((double)up - (double)down);
            err = fabs(fd - q->g[pick[k]]) /
                  (FD_REL * fabs(q->g[pick[k]]) + FD_ABS * maxg + FD_NOISE * fabs(loss) / ((double)up - (double)down)); /* <= 1 passes */
            if (!(err <= tensor_worst)) tensor_worst = err;
            if (!(err <= 1.0)) {
                bad = 1;
                printf("  %s[%lu]: analytic %.6g, central difference %.6g\n", q->name, (unsigned long)pick[k],
                       q->g[pick[k]], fd);
            }
        }
        if (!(tensor_worst <= worst)) { worst = tensor_worst; worst_name = q->name; }
        bad_tensors += bad;
    }
    printf("%-58s %-4s %d tensors x %d elements, worst error / allowed %.3g (%s)\n", "backbone gradients vs central differences",
           bad_tensors == 0 && n_tensors > 0 ? "ok" : "FAIL", n_tensors, FD_PICKS, worst, worst_name);
    verdict(bad_tensors == 0 && n_tensors > 0);
}

/* The whole backward with one thread and with all: the same bits. */
static void check_threads(trainer *t, const golden *px, const float *labels, const float *plabels)
{
    int all = max_threads(), i;
    size_t differ = 0, j;
    float **one = calloc((size_t)t->np, sizeof *one);
    if (!one) return;
    loupe_set_threads(1);
    zero_grads(t);
    batch_step(t, px->data, labels, plabels, &t->pg, &t->cg);
    for (i = 0; i < t->np; i++) {
        one[i] = malloc(t->params[i].n * sizeof **one);
        if (one[i]) memcpy(one[i], t->params[i].g, t->params[i].n * sizeof **one);
    }
    loupe_set_threads(all);
    zero_grads(t);
    batch_step(t, px->data, labels, plabels, &t->pg, &t->cg);
    for (i = 0; i < t->np; i++) {
        for (j = 0; one[i] && j < t->params[i].n; j++) differ += one[i][j] != t->params[i].g[j];
        differ += !one[i];
        free(one[i]);
    }
    free(one);
    printf("%-58s %-4s %lu elements differ (%d threads)\n", "gradients with 1 thread and with all are identical",
           differ ? "FAIL" : "ok", (unsigned long)differ, all);
    verdict(differ == 0);
}

int main(int argc, char **argv)
{
    static trainer t;
    char err[512];
    size_t size;
    unsigned char *file;
    arena a = {NULL, 0, 0};
    const loupe_config *c;
    golden *px, *labels, *plabels;
    int i;
    if (argc != 3) {
        fprintf(stderr, "usage: check_train_cls MODEL.bin CASE_DIR\n");
        return 2;
    }
    if (golden_load("check_train_cls", argv[2], "train", gt, MAX_GOLDEN, &n_golden)) return 2;
    /* the weights from our own aligned copy of the file, so that the differences can move them */
    file = golden_read_file(argv[1], &size);
    if (!file) { fprintf(stderr, "check_train_cls: cannot read %s\n", argv[1]); return 2; }
    {
        unsigned char *copy = aligned_block(size, &t.file_raw);
        if (!copy) return 2;
        memcpy(copy, file, size);
        free(file);
        t.m = loupe_model_load_memory(copy, size, err, sizeof err);
    }
    if (!t.m) { fprintf(stderr, "check_train_cls: %s\n", err); return 2; }
    c = &t.m->cfg;
    if (t.m->w.blocks[0].qkv.w.dtype != DTYPE_F32 || t.m->w.conv1.dtype != DTYPE_F32) {
        fprintf(stderr, "check_train_cls: %s: needs float32 weights\n", argv[1]);
        return 2;
    }
    t.s = loupe_session_new(t.m, err, sizeof err);
    if (!t.s) { fprintf(stderr, "check_train_cls: %s\n", err); return 2; }
    pe_train_layout(c, &t.bt, &t.ct, &t.k, &a);
    a.cap = a.used;
    a.used = 0;
    a.base = aligned_block(a.cap, &t.raw);
    if (!a.base) { fprintf(stderr, "check_train_cls: out of memory\n"); return 2; }
    pe_train_layout(c, &t.bt, &t.ct, &t.k, &a);
    t.s->bb_tape = &t.bt;
    t.s->cls_tape = &t.ct;
    t.cfg = cls_loss_config_default();
    t.d_feats = malloc((size_t)(c->grid * c->grid + 1) * c->width * sizeof *t.d_feats);
    t.d_pooled = malloc((size_t)c->width * sizeof *t.d_pooled);
    t.d_patch = malloc((size_t)c->grid * c->grid * sizeof *t.d_patch);
    if (c->grid * c->grid > 1024 || !t.d_feats || !t.d_pooled || !t.d_patch || register_params(&t)) {
        fprintf(stderr, "check_train_cls: cannot set up the trainer\n");
        return 2;
    }
    printf("check_train_cls: tape and backward scratch %.1f MiB\n", (double)a.cap / (1 << 20));
    check_golden_step(&t);
    px = find("batch.pixel_values");
    labels = find("batch.labels");
    plabels = find("batch.patch_labels");
    if (px && labels && plabels) {
        check_backbone_fd(&t, px, labels->data, plabels->data);
        check_threads(&t, px, labels->data, plabels->data);
    }
    for (i = 0; i < t.np; i++) free(t.params[i].g);
    free(t.bg);
    free(t.d_feats);
    free(t.d_pooled);
    free(t.d_patch);
    loupe_session_free(t.s);
    loupe_model_free(t.m);
    free(t.raw);
    free(t.file_raw);
    for (i = 0; i < n_golden; i++) free(gt[i].data);
    printf("check_train_cls %s: %d passed, %d failed\n", argv[2], passed, failed);
    return failed ? 1 : 0;
}
