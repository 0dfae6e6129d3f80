/* test_init.c - checks loupe_init_weights (`loupe init`, loupe.c section 9).
 *
 * Usage: test_init TMPDIR CONVERTED.bin CASE_DIR...
 *   CONVERTED.bin  the first case's golden weights converted by tools/convert.py (the
 *                  backbone source of the --backbone check)
 *   CASE_DIR       a golden case (config.json, image.png or image.jpg)
 *
 * For each case: the file loads and a forward on the golden image gives finite
 * outputs; the same seed gives the same bytes, another seed other values; every tensor
 * follows its rule, derived here independently from the tensor's name (constants
 * exactly, the deformable-attention offset grid against libm's cos/sin, random tensors
 * by mean, standard deviation, bounds and a Kolmogorov-Smirnov test, and all normal and
 * all uniform draws pooled); BF16 and Q8 files hold the F32 file's values rounded. For
 * the first case: --backbone copies the backbone bytes and draws the heads exactly as
 * without it; bad configs fail with a message naming the problem and leave no file.
 * Prints "N passed, M failed". */
#define LOUPE_NO_MAIN
#include "../loupe.c"

static int passed, failed;

static void check(int ok, const char *fmt, ...)
{
    if (ok) { passed++; return; }
    {
        va_list ap;
        va_start(ap, fmt);
        printf("FAIL ");
        vprintf(fmt, ap);
        printf("\n");
        va_end(ap);
    }
    failed++;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

static int file_exists(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

static unsigned char *read_all(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long len;
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    len = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)len + 1);
    if (buf && fread(buf, 1, (size_t)len, f) != (size_t)len) { free(buf); buf = NULL; }
    fclose(f);
    *n = (size_t)len;
    return buf;
}

static int write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    fputs(text, f);
    return fclose(f);
}

/* ---- The expected rule of a tensor, from its name (independent of loupe.c's list) ---- */

enum { EXP_CONST, EXP_NORMAL, EXP_UNIFORM, EXP_GRID };
typedef struct expect { int kind; double v; } expect; /* const value, normal std, uniform bound */

static double xavier(double gain, const tensor_entry *e)
{
    double r = 1;
    int k;
    for (k = 2; k < e->ndim; k++) r *= e->dims[k];
    return gain * sqrt(6.0 / (((double)e->dims[0] + e->dims[1]) * r));
}

/* The rule of tensor e of model m (name NUL-terminated in name); w: the matching
 * .weight entry for a bias (NULL if none). */
static expect rule_of(const loupe_model *m, const char *name, const tensor_entry *e, const tensor_entry *w,
                      double xgain)
{
    const loupe_config *c = &m->cfg;
    expect x = {EXP_CONST, 0.0};
    int is_bias = ends_with(name, "bias");
    if (e->ndim == 1 && ends_with(name, ".weight")) { x.v = 1.0; return x; } /* every norm */
    if (!strcmp(name, "backbone.class_embedding") || !strcmp(name, "backbone.positional_embedding")) {
        x.kind = EXP_NORMAL; x.v = 1.0 / sqrt((double)c->width); return x;
    }
    if (!strcmp(name, "backbone.attn_pool.probe")) { x.kind = EXP_NORMAL; x.v = 1.0; return x; }
    if (!strcmp(name, "classifier.fuser.fuse.weight")) { x.v = 1.0 / (1 + c->grid * c->grid); return x; }
    if (!strncmp(name, "classifier.", 11)) { /* nn.Linear.reset_parameters */
        x.kind = EXP_UNIFORM; x.v = 1.0 / sqrt((double)(is_bias ? w : e)->dims[1]); return x;
    }
    if (strstr(name, "fpn.") && strstr(name, ".conv1.")) { x.kind = EXP_UNIFORM; x.v = 1.0 / sqrt(4.0 * c->width); return x; }
    if (ends_with(name, "sampling_offsets.bias")) { x.kind = EXP_GRID; return x; }
    if (is_bias || ends_with(name, "pixel_decoder.level_embed")) return x; /* zero */
    if (strstr(name, "pixel_decoder.")) { x.kind = EXP_UNIFORM; x.v = xavier(1.0, e); return x; }
    if (strstr(name, "decoder.layers.")) { x.kind = EXP_UNIFORM; x.v = xavier(xgain, e); return x; }
    if (ends_with(name, "in_proj_weight")) { x.kind = EXP_UNIFORM; x.v = xavier(1.0, e); return x; }
    x.kind = EXP_NORMAL; /* conv1 of PE, Linear layers, embeddings, label embeddings, depthwise convs */
    x.v = 0.02;
    return x;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Kolmogorov-Smirnov statistic sqrt(n) D of standardized values against N(0,1)
 * (uniform: against U(-1, 1)). Sorts v. */
static double ks(double *v, size_t n, int uniform)
{
    size_t i;
    double d = 0;
    qsort(v, n, sizeof *v, cmp_double);
    for (i = 0; i < n; i++) {
        double F = uniform ? (v[i] + 1) / 2 : 0.5 * erfc(-v[i] / sqrt(2.0));
        double a = F - (double)i / n, b = (double)(i + 1) / n - F;
        d = a > d ? a : d;
        d = b > d ? b : d;
    }
    return d * sqrt((double)n);
}

typedef struct pool { double *v; size_t n, cap; } pool;

static void pool_add(pool *p, double x)
{
    if (p->n == p->cap) {
        p->cap = p->cap ? 2 * p->cap : 1 << 16;
        p->v = realloc(p->v, p->cap * sizeof *p->v);
        if (!p->v) { printf("out of memory\n"); exit(1); }
    }
    p->v[p->n++] = x;
}

static void entry_name(const tensor_entry *e, char *buf, size_t size)
{
    snprintf(buf, size, "%.*s", e->name_len, e->name);
}

static const tensor_entry *find(const loupe_model *m, const char *name)
{
    int i;
    for (i = 0; i < m->n_entries; i++)
        if ((size_t)m->entries[i].name_len == strlen(name) && !memcmp(m->entries[i].name, name, strlen(name)))
            return &m->entries[i];
    return NULL;
}

/* The rule of entry e (its bias's weight looked up). */
static expect rule_for(const loupe_model *m, const tensor_entry *e, double xgain)
{
    char name[256], wname[256];
    const tensor_entry *w = NULL;
    entry_name(e, name, sizeof name);
    if (ends_with(name, "bias")) {
        snprintf(wname, sizeof wname, "%.*sweight", (int)(strlen(name) - 4), name);
        w = find(m, wname);
    }
    return rule_of(m, name, e, w, xgain);
}

/* Every tensor of an F32 init file against its rule. */
static void check_rules(const loupe_model *m, double xgain, const char *label)
{
    pool normal = {0}, uniform = {0};
    int i, counts[4] = {0}, k;
    for (i = 0; i < m->n_entries; i++) {
        const tensor_entry *e = &m->entries[i];
        const float *x = (const float *)(const void *)(m->data + e->offset);
        size_t n = entry_numel(e), j;
        char name[256];
        expect r = rule_for(m, e, xgain);
        entry_name(e, name, sizeof name);
        counts[r.kind]++;
        if (r.kind == EXP_CONST) {
            size_t bad = 0;
            for (j = 0; j < n; j++) bad += x[j] != (float)r.v;
            check(bad == 0, "%s: %s: %lu of %lu values are not %g", label, name, (unsigned long)bad, (unsigned long)n, r.v);
        } else if (r.kind == EXP_GRID) { /* [heads][levels][points][2], cos/sin of float32 angles by libm */
            int H = m->cfg.m2f_heads, L = m->cfg.deform_levels, P = m->cfg.deform_points, h, l, p, bad = 0;
            for (h = 0; h < H; h++) {
                float th = (float)h * (float)(2.0 * LOUPE_PI / H);
                double cs = (float)cos((double)th), sn = (float)sin((double)th);
                double mx = fabs(cs) > fabs(sn) ? fabs(cs) : fabs(sn);
                for (l = 0; l < L; l++)
                    for (p = 0; p < P; p++) {
                        const float *o = x + (((size_t)h * L + l) * P + p) * 2;
                        bad += fabs(o[0] - cs / mx * (p + 1)) > 1e-6 * (p + 1) || fabs(o[1] - sn / mx * (p + 1)) > 1e-6 * (p + 1);
                    }
            }
            check(bad == 0 && n == (size_t)H * L * P * 2, "%s: %s: %d grid values differ", label, name, bad);
            /* the exact constants of the axis-aligned heads */
            check(x[0] == 1.0f && x[1] == 0.0f && x[2] == 2.0f && x[3] == 0.0f, "%s: %s: head 0 is not (1, 0), (2, 0)...", label, name);
        } else {
            double sum = 0, sq = 0, mean, sd, want_sd = r.kind == EXP_NORMAL ? r.v : r.v / sqrt(3.0), mx = 0;
            double *v = malloc(n * sizeof *v);
            for (j = 0; j < n; j++) {
                sum += x[j];
                sq += (double)x[j] * x[j];
                mx = fabs(x[j]) > mx ? fabs(x[j]) : mx;
                v[j] = x[j] / r.v;
                if (r.kind == EXP_NORMAL) pool_add(&normal, v[j]); else pool_add(&uniform, v[j]);
            }
            mean = sum / n;
            sd = sqrt(sq / n - mean * mean);
            check(fabs(mean) <= 5 * want_sd / sqrt((double)n) + 1e-7, "%s: %s: mean %g, want 0 +- %g", label, name, mean,
                  5 * want_sd / sqrt((double)n));
            check(n < 8 || fabs(sd / want_sd - 1) <= 6 * sqrt(0.5 / n), "%s: %s: std %g, want %g", label, name, sd, want_sd);
            if (r.kind == EXP_UNIFORM) check(mx <= r.v * (1 + 1e-6), "%s: %s: max |x| %g above the bound %g", label, name, mx, r.v);
            if (n >= 1000) {
                double d = ks(v, n, r.kind == EXP_UNIFORM);
                check(d < 2.5, "%s: %s: Kolmogorov-Smirnov sqrt(n) D = %.3f against %s", label, name, d,
                      r.kind == EXP_NORMAL ? "the normal" : "the uniform");
            }
            free(v);
        }
    }
    for (k = 0; k < 2; k++) {
        pool *p = k ? &uniform : &normal;
        double d = ks(p->v, p->n, k);
        check(d < 2.5, "%s: all %s draws pooled (%lu values): Kolmogorov-Smirnov sqrt(n) D = %.3f", label,
              k ? "uniform" : "normal", (unsigned long)p->n, d);
        printf("%s: %s draws pooled: %lu values, sqrt(n) D = %.3f\n", label, k ? "uniform" : "normal", (unsigned long)p->n, d);
        free(p->v);
    }
    printf("%s: %d constant, %d normal, %d uniform, %d grid tensors\n", label, counts[EXP_CONST], counts[EXP_NORMAL],
           counts[EXP_UNIFORM], counts[EXP_GRID]);
}

/* A forward on the case's image: every output finite. */
static void check_forward(const char *path, const char *image, const char *label)
{
    char err[512];
    loupe_model *m = loupe_model_load(path, err, sizeof err);
    loupe_session *s = NULL;
    loupe_image img = {0, 0, NULL};
    float *px = NULL;
    unsigned char *mask = NULL;
    const loupe_outputs *o;
    size_t i, bad = 0, n;
    check(m != NULL, "%s: %s does not load: %s", label, path, err);
    if (!m) return;
    s = loupe_session_new(m, err, sizeof err);
    px = malloc(3 * sizeof *px * (size_t)m->cfg.image_size * m->cfg.image_size);
    if (!s || !px || loupe_image_load(image, LOUPE_DEFAULT_MAX_PIXELS, &img, err, sizeof err) ||
        loupe_preprocess(m, &img, px, err, sizeof err) || loupe_forward(s, px, err, sizeof err)) {
        check(0, "%s: forward failed: %s", label, err);
        goto done;
    }
    o = loupe_get_outputs(s);
    bad += !isfinite(o->prob) || !isfinite(o->fused_logit) || !isfinite(o->global_logit);
    for (i = 0; i < (size_t)o->grid * o->grid; i++) bad += !isfinite(o->patch_logits[i]);
    for (i = 0; i < (size_t)o->num_queries * (m->cfg.num_labels + 1); i++) bad += !isfinite(o->class_logits[i]);
    n = (size_t)o->num_queries * o->mask_size * o->mask_size;
    for (i = 0; i < n; i++) bad += !isfinite(o->mask_logits[i]);
    for (i = 0; i < (size_t)o->seg_size * o->seg_size; i++) bad += !isfinite(o->seg_prob[i]);
    check(bad == 0, "%s: %lu non-finite outputs", label, (unsigned long)bad);
    mask = malloc((size_t)img.width * img.height);
    check(mask && loupe_postprocess(s, img.width, img.height, 0.5f, NULL, mask, err, sizeof err) == 0,
          "%s: postprocess failed: %s", label, err);
    printf("%s: forward on %s: prob %.4f, %lu mask logits, all finite\n", label, image, o->prob, (unsigned long)n);
done:
    free(mask);
    free(px);
    loupe_image_free(&img);
    loupe_session_free(s);
    loupe_model_free(m);
}

static int same_file(const char *a, const char *b)
{
    size_t na, nb;
    unsigned char *x = read_all(a, &na), *y = read_all(b, &nb);
    int same = x && y && na == nb && !memcmp(x, y, na);
    free(x);
    free(y);
    return same;
}

static float bf16_round(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
    memcpy(&f, &u, 4);
    return f;
}

/* A BF16 or Q8 file against the F32 one of the same seed. */
static void check_lowp(const char *f32_path, const char *path, int dtype, const char *label)
{
    char err[512], name[256];
    loupe_model *a = loupe_model_load(f32_path, err, sizeof err), *b = loupe_model_load(path, err, sizeof err);
    int i, n_low = 0;
    size_t bad = 0;
    check(a && b, "%s: does not load: %s", label, err);
    if (!a || !b) { loupe_model_free(a); loupe_model_free(b); return; }
    for (i = 0; i < a->n_entries; i++) {
        const tensor_entry *e = &a->entries[i], *f;
        const float *x = (const float *)(const void *)(a->data + e->offset);
        size_t rows = e->dims[0], cols = entry_numel(e) / rows, r, c;
        float *row = malloc(cols * sizeof *row);
        entry_name(e, name, sizeof name);
        f = find(b, name);
        if (!f || !row) { bad++; free(row); continue; }
        n_low += f->dtype != DTYPE_F32;
        for (r = 0; r < rows; r++) {
            wmat w = entry_matrix(b, f);
            float sc = 0;
            wmat_to_float(w, r, 1, 0, (int)cols, row, cols);
            for (c = 0; c < cols; c++) {
                float want = x[r * cols + c];
                if (f->dtype == DTYPE_F32) bad += row[c] != want;
                else if (f->dtype == DTYPE_BF16) bad += row[c] != bf16_round(want);
                else {
                    if (c % Q8_BLOCK == 0) sc = w.scale[r * (w.ld / Q8_BLOCK) + c / Q8_BLOCK];
                    bad += fabsf(row[c] - want) > 0.5f * sc * 1.0001f;
                }
            }
        }
        free(row);
    }
    check(bad == 0 && n_low > 0 && b->entries[0].dtype == DTYPE_F32, "%s: %lu values differ from the F32 file's", label, (unsigned long)bad);
    printf("%s: %d weight matrices as %s, every value the F32 value rounded\n", label, n_low, dtype_names[dtype]);
    loupe_model_free(a);
    loupe_model_free(b);
}

/* The backbone copied byte for byte, the heads exactly as drawn without --backbone. */
static void check_backbone(const char *source, const char *plain, const char *path, const char *label)
{
    char err[512], name[256];
    loupe_model *s = loupe_model_load(source, err, sizeof err), *p = loupe_model_load(plain, err, sizeof err),
                *m = loupe_model_load(path, err, sizeof err);
    int i, n_backbone = 0, n_heads = 0, bad = 0;
    check(s && p && m, "%s: does not load: %s", label, err);
    if (s && p && m)
        for (i = 0; i < m->n_entries; i++) {
            const tensor_entry *e = &m->entries[i], *f;
            entry_name(e, name, sizeof name);
            f = find(strncmp(name, "backbone.", 9) ? p : s, name);
            if (strncmp(name, "backbone.", 9)) n_heads++; else n_backbone++;
            bad += !f || f->nbytes != e->nbytes || memcmp(m->data + e->offset, (strncmp(name, "backbone.", 9) ? p : s)->data + f->offset, e->nbytes);
        }
    check(bad == 0 && n_backbone > 0 && n_heads > 0, "%s: %d tensors differ", label, bad);
    printf("%s: %d backbone tensors identical to %s, %d head tensors identical to the plain init\n", label, n_backbone,
           source, n_heads);
    loupe_model_free(s);
    loupe_model_free(p);
    loupe_model_free(m);
}

/* --highpass F: the first round(F W) filters of backbone.conv1.weight [W][3][P][P] are
 * high-pass (norm INIT_HIGHPASS_NORM, each channel a multiple of one kernel, answer ~0 to
 * any patch affine in x and y but not to a random one); the other filters and every
 * other tensor are the plain init's bytes. */
static void check_highpass(const char *plain, const char *path, double frac, const char *label)
{
    char err[512], name[256];
    loupe_model *p = loupe_model_load(plain, err, sizeof err), *m = loupe_model_load(path, err, sizeof err);
    int i, W, P, nh, f, ch, y, x, other_bad = 0, hp_bad = 0, plain_same = 0;
    double worst_affine = 0.0, least_random = 1e30, worst_norm = 0.0;
    const float *w, *w0;
    uint64_t key = 0x9E3779B97F4A7C15ull;
    check(p && m, "%s: highpass: does not load: %s", label, err);
    if (!p || !m) { loupe_model_free(p); loupe_model_free(m); return; }
    for (i = 0; i < m->n_entries; i++) {
        const tensor_entry *e = &m->entries[i], *q;
        entry_name(e, name, sizeof name);
        if (!strcmp(name, "backbone.conv1.weight")) continue;
        q = find(p, name);
        other_bad += !q || q->nbytes != e->nbytes || memcmp(m->data + e->offset, p->data + q->offset, e->nbytes);
    }
    W = m->cfg.width;
    P = m->cfg.patch_size;
    nh = (int)(frac * W + 0.5);
    w = (const float *)(const void *)(m->data + find(m, "backbone.conv1.weight")->offset);
    w0 = (const float *)(const void *)(p->data + find(p, "backbone.conv1.weight")->offset);
    for (f = 0; f < W; f++) {
        const float *h = w + (size_t)f * 3 * P * P;
        if (f >= nh) { plain_same += !memcmp(h, w0 + (size_t)f * 3 * P * P, (size_t)3 * P * P * sizeof *h); continue; }
        {
            double norm = 0.0, cross = 0.0, n0 = 0.0;
            for (i = 0; i < 3 * P * P; i++) norm += (double)h[i] * h[i];
            for (i = 0; i < P * P; i++) n0 += (double)h[i] * h[i];
            for (ch = 1; ch < 3; ch++) { /* channel ch = c * channel 0: |<a,b>| = |a| |b| */
                double nc = 0.0, d = 0.0;
                for (i = 0; i < P * P; i++) { nc += (double)h[ch * P * P + i] * h[ch * P * P + i]; d += (double)h[ch * P * P + i] * h[i]; }
                cross += fabs(fabs(d) - sqrt(nc * n0));
            }
            if (fabs(sqrt(norm) - INIT_HIGHPASS_NORM) > worst_norm) worst_norm = fabs(sqrt(norm) - INIT_HIGHPASS_NORM);
            hp_bad += cross > 1e-5 * norm;
            double rms = 0.0;
            for (i = 0; i < 8; i++) { /* affine patches and random ones */
                double c[9], ra = 0.0, rr = 0.0, na = 0.0, nr = 0.0;
                int j;
                for (j = 0; j < 9; j++) { key = init_mix64(key + 1); c[j] = 2.0 * ((double)(key >> 11) / 9007199254740992.0) - 1.0; }
                for (ch = 0; ch < 3; ch++)
                    for (y = 0; y < P; y++)
                        for (x = 0; x < P; x++) {
                            double a = c[3 * ch] + c[3 * ch + 1] * x / P + c[3 * ch + 2] * y / P, r;
                            key = init_mix64(key + 1);
                            r = 2.0 * ((double)(key >> 11) / 9007199254740992.0) - 1.0;
                            ra += a * h[(ch * P + y) * P + x];
                            rr += r * h[(ch * P + y) * P + x];
                            na += a * a;
                            nr += r * r;
                        }
                ra = fabs(ra) / sqrt(na * norm);
                rms += rr * rr / (nr * norm) / 8.0;
                if (ra > worst_affine) worst_affine = ra;
            }
            if (sqrt(rms) < least_random) least_random = sqrt(rms); /* about (3 P^2)^-1/2 */
        }
    }
    check(other_bad == 0, "%s: highpass %g: %d other tensors differ from the plain init", label, frac, other_bad);
    check(plain_same == W - nh, "%s: highpass %g: %d of the %d plain filters are the plain init's", label, frac, plain_same, W - nh);
    check(hp_bad == 0 && worst_norm < 1e-5, "%s: highpass %g: %d filters not one kernel per channel, norm off by %g", label,
          frac, hp_bad, worst_norm);
    /* an affine patch gets only rounding (float kernels); random patches a real answer */
    check(nh == 0 || (worst_affine < 1e-6 && least_random > 5e-3), "%s: highpass %g: affine response %g, random %g",
          label, frac, worst_affine, least_random);
    printf("%s: highpass %g: %d high-pass filters (affine patch response at most %.2g of the norms, random at least "
           "%.2g in RMS), %d plain filters and the other tensors as the plain init\n", label, frac, nh, worst_affine, least_random,
           W - nh);
    loupe_model_free(p);
    loupe_model_free(m);
}

/* Config text with `from` replaced by `to` (first occurrence). */
static char *edited(const char *text, const char *from, const char *to)
{
    const char *at = strstr(text, from);
    char *out;
    if (!at) { printf("FAIL test setup: %s not in the config\n", from); exit(1); }
    out = malloc(strlen(text) + strlen(to) + 1);
    memcpy(out, text, (size_t)(at - text));
    strcpy(out + (at - text), to);
    strcat(out, at + strlen(from));
    return out;
}

static void check_bad_config(const char *tmpdir, const char *config, const char *want, const char *label)
{
    char out[1024], tmp[1100], err[512] = "";
    int rc;
    snprintf(out, sizeof out, "%s/bad.bin", tmpdir);
    snprintf(tmp, sizeof tmp, "%s.tmp", out);
    remove(out);
    rc = loupe_init_weights(config, out, 1, "f32", NULL, err, sizeof err);
    check(rc == -1 && strstr(err, want) && !file_exists(out) && !file_exists(tmp),
          "%s: rc %d, message \"%s\" (want \"%s\"), output %s", label, rc, err, want, file_exists(out) ? "written" : "absent");
    if (rc == -1) printf("%s: %s\n", label, err);
}

int main(int argc, char **argv)
{
    const char *tmpdir, *converted;
    int ci;
    if (argc < 4) {
        fprintf(stderr, "usage: test_init TMPDIR CONVERTED.bin CASE_DIR...\n");
        return 2;
    }
    tmpdir = argv[1];
    converted = argv[2];
    for (ci = 3; ci < argc; ci++) {
        char config[1024], image[1024], a[1024], b[1024], c[1024], low[1024], err[512], label[256];
        const char *case_dir = argv[ci], *base = strrchr(case_dir, '/') ? strrchr(case_dir, '/') + 1 : case_dir;
        double xgain = 1.0;
        loupe_model *m;
        size_t len;
        unsigned char *text;
        int d;
        snprintf(label, sizeof label, "%s", base);
        snprintf(config, sizeof config, "%s/config.json", case_dir);
        snprintf(image, sizeof image, "%s/image.png", case_dir);
        if (!file_exists(image)) snprintf(image, sizeof image, "%s/image.jpg", case_dir);
        snprintf(a, sizeof a, "%s/%s-seed1.bin", tmpdir, base);
        snprintf(b, sizeof b, "%s/%s-seed1-again.bin", tmpdir, base);
        snprintf(c, sizeof c, "%s/%s-seed2.bin", tmpdir, base);
        check(loupe_init_weights(config, a, 1, NULL, NULL, err, sizeof err) == 0, "%s: init: %s", label, err);
        check(loupe_init_weights(config, b, 1, "f32", NULL, err, sizeof err) == 0, "%s: init: %s", label, err);
        check(loupe_init_weights(config, c, 2, "f32", NULL, err, sizeof err) == 0, "%s: init: %s", label, err);
        check_forward(a, image, label);
        check(same_file(a, b), "%s: seed 1 twice gave different files", label);
        if ((text = read_all(config, &len)) != NULL) { /* the config's init_xavier_std, if any */
            const char *at = strstr((const char *)text, "\"init_xavier_std\":");
            if (at) xgain = strtod(at + 18, NULL);
            free(text);
        }
        if ((m = loupe_model_load(a, err, sizeof err)) != NULL) {
            loupe_model *m2 = loupe_model_load(c, err, sizeof err);
            int i, same_random = 0, n_random = 0;
            check_rules(m, xgain, label);
            for (i = 0; m2 && i < m->n_entries; i++) { /* seed 2: every random tensor differs */
                const tensor_entry *e = &m->entries[i];
                expect r = rule_for(m, e, xgain);
                if (r.kind != EXP_NORMAL && r.kind != EXP_UNIFORM) {
                    same_random += memcmp(m->data + e->offset, m2->data + m2->entries[i].offset, e->nbytes) != 0;
                    continue;
                }
                n_random++;
                same_random += !memcmp(m->data + e->offset, m2->data + m2->entries[i].offset, e->nbytes);
            }
            check(m2 && same_random == 0 && n_random > 0,
                  "%s: seed 2: %d tensors equal (random) or differ (constant) from seed 1", label, same_random);
            printf("%s: seed 2 differs from seed 1 in all %d random tensors, same constants\n", label, n_random);
            loupe_model_free(m2);
            loupe_model_free(m);
        } else {
            check(0, "%s: %s", label, err);
        }
        for (d = DTYPE_BF16; d <= DTYPE_Q8; d++) {
            snprintf(low, sizeof low, "%s/%s-%s.bin", tmpdir, base, d == DTYPE_BF16 ? "bf16" : "q8");
            check(loupe_init_weights(config, low, 1, d == DTYPE_BF16 ? "bf16" : "q8", NULL, err, sizeof err) == 0,
                  "%s: init %s: %s", label, low, err);
            check_lowp(a, low, d, label);
            check_forward(low, image, label);
        }
        if (ci == 3) { /* the backbone from a converted file; bad configs */
            char bb[1024], bad[1024], *cfg_text, *t;
            snprintf(bb, sizeof bb, "%s/%s-backbone.bin", tmpdir, base);
            check(loupe_init_weights(config, bb, 1, "f32", converted, err, sizeof err) == 0, "%s: --backbone: %s", label, err);
            check_backbone(converted, a, bb, label);
            check_forward(bb, image, label);
            {
                loupe_init_options io;
                const double fracs[3] = {0.5, 1.0, 0.0};
                int k;
                memset(&io, 0, sizeof io);
                io.seed = 1;
                for (k = 0; k < 3; k++) {
                    snprintf(bb, sizeof bb, "%s/%s-highpass.bin", tmpdir, base);
                    io.highpass = fracs[k];
                    check(loupe_init_weights_with(config, bb, &io, err, sizeof err) == 0, "%s: --highpass: %s", label, err);
                    check_highpass(a, bb, fracs[k], label);
                    if (k == 0) check_forward(bb, image, label);
                    if (k == 2) check(same_file(a, bb), "%s: highpass 0 is not the plain init", label);
                }
                io.highpass = 1.5;
                check(loupe_init_weights_with(config, bb, &io, err, sizeof err) == -1 && strstr(err, "from 0 to 1"),
                      "highpass 1.5: %s", err);
            }
            text = read_all(config, &len);
            cfg_text = text ? (char *)text : NULL;
            if (!cfg_text) { check(0, "cannot read %s", config); continue; }
            cfg_text[len] = 0;
            snprintf(bad, sizeof bad, "%s/bad.json", tmpdir);
#define BAD(from, to, want, what) \
    (t = edited(cfg_text, from, to), write_text(bad, t), free(t), check_bad_config(tmpdir, bad, want, what))
            BAD("\"width\": 64,", "", "missing key pe.width", "missing key");
            BAD("\"layers\": 2,", "\"layers\": \"2\",", "pe.layers must be a positive integer (got \"2\")", "string for an integer");
            BAD("\"layers\": 2,", "\"layers\": 2.5,", "pe.layers must be a positive integer (got 2.5)", "fraction for an integer");
            BAD("\"num_queries\": 5,", "\"num_queries\": 0,", "mask2former.num_queries must be a positive integer (got 0)", "zero queries");
            BAD("\"pool_type\": \"attn\"", "\"pool_type\": \"avg\"", "pe.pool_type must be \"attn\" (got \"avg\")", "unsupported pooling");
            BAD("\"use_rope2d\": true", "\"use_rope2d\": 1", "pe.use_rope2d must be true (got 1)", "number for a boolean");
            BAD("\"tversky_alpha\": 0.3,", "\"tversky_alpha\": null,", "loupe.tversky_alpha must be a finite number (got null)", "null for a number");
            BAD("\"mask2former\": {", "\"mask2former_x\": {", "missing key mask2former.feature_size (no \"mask2former\" object)", "missing section");
            BAD("\"layers\": 2,", "\"layers\": 2000,", "hyperparameter layers = 2000 is outside the supported range", "loader's range");
            BAD("\"heads\": 4,", "\"heads\": 5,", "pe.width must be pe.heads x a multiple of 4", "width not divisible");
            BAD("\"mlp_width\": 256,", "\"mlp_width\": 255,", "pe_derived.mlp_width is 255 but the config implies 256", "derived value");
            BAD("\"patch_size\": 14,", "\"patch_size\": 14,,", "bad JSON at line", "malformed JSON");
            len /= 2;
            cfg_text[len] = 0;
            write_text(bad, cfg_text);
            check_bad_config(tmpdir, bad, "bad JSON at line", "truncated JSON");
            write_text(bad, "[1, 2]");
            check_bad_config(tmpdir, bad, "not a JSON object", "not an object");
            snprintf(bad, sizeof bad, "%s/no-such-config.json", tmpdir);
            check_bad_config(tmpdir, bad, "cannot read config", "unreadable config");
            free(cfg_text);
            {   /* a backbone of another shape */
                char out[1100], tmp[1200];
                snprintf(out, sizeof out, "%s/bad.bin", tmpdir);
                snprintf(tmp, sizeof tmp, "%s.tmp", out);
                snprintf(bad, sizeof bad, "%s/config.json", argc > 4 ? argv[4] : argv[3]);
                check(argc > 4 && loupe_init_weights(bad, out, 1, "f32", converted, err, sizeof err) == -1 &&
                          strstr(err, "has another shape than the config implies") && !file_exists(out) && !file_exists(tmp),
                      "backbone of another shape: %s", err);
                printf("backbone of another shape: %s\n", err);
                check(loupe_init_weights(config, out, 1, "f16", NULL, err, sizeof err) == -1 && strstr(err, "unknown dtype f16") &&
                          !file_exists(out), "bad dtype: %s", err);
            }
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
