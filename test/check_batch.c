/* check_batch.c - upstream's training batch, rebuilt by loupe.c, against the golden one.
 *
 *   check_batch MODEL.bin CASE_DIR
 *
 * CASE_DIR holds train.txt + train.safetensors (batch.* tensors), image.png,
 * train_mask.png and train_real.jpg; see ../shared/golden/README.md section 10.2. The
 * batch is DataModule.train_collate_fn([image.png + train_mask.png, train_real.jpg +
 * no mask]); upstream's one torch.rand draw (batch.mask_dither_rand_0) is replayed
 * through a loupe_uniform. Compared:
 *   mask_normalized_0, mask_binary_0, mask_labels_{0,1}, class_labels_{0,1},
 *   labels, pixel_values                                exact
 *   patch_mask_resized_0, patch_labels                  abs 1e-6, and exact (loupe.c
 *                                                       follows PyTorch's operation order)
 * plus properties the golden does not cover: Pillow's RGB -> L weights, a constant mask
 * (all zeros, one draw per pixel all the same), an authentic image draws nothing, the
 * NEAREST rule against floor((i + 0.5) in / out), a mask of another size is refused.
 * Prints "N passed, M failed". */
#define LOUPE_NO_MAIN
#include "../loupe.c"
#include "golden_io.h"

#define MAX_GOLDEN 2048
#define SOFT_ABS_TOL 1e-6

static golden_tensor gt[MAX_GOLDEN];
static int ngt, passed, failed;

static void check(int ok, const char *what)
{
    if (ok) passed++;
    else failed++;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

static golden_tensor *find(const char *name)
{
    int i;
    for (i = 0; i < ngt; i++)
        if (!strcmp(gt[i].name, name)) return &gt[i];
    printf("FAIL golden tensor %s is missing\n", name);
    failed++;
    return NULL;
}

/* Compares n floats; tol 0 means bit-exact values. */
static void compare(const char *name, const float *ours, long n, long offset, double tol)
{
    golden_tensor *g = find(name);
    double worst = 0.0;
    long i, bad = 0;
    char what[256];
    if (!g) return;
    if (g->numel < offset + n) {
        printf("FAIL %s holds %ld values, expected at least %ld\n", name, g->numel, offset + n);
        failed++;
        return;
    }
    for (i = 0; i < n; i++) {
        double d = fabs((double)ours[i] - (double)g->data[offset + i]);
        if (d > worst) worst = d;
        if (tol == 0.0 ? ours[i] != g->data[offset + i] : !(d <= tol)) bad++;
    }
    if (tol == 0.0)
        snprintf(what, sizeof what, "%s [%ld values from %ld]: %ld differ (exact)", name, n, offset, bad);
    else
        snprintf(what, sizeof what, "%s [%ld values from %ld]: max |d| %.3g, %ld beyond %.0e", name, n, offset, worst,
                 bad, tol);
    check(bad == 0, what);
}

/* A loupe_uniform replaying recorded draws; counts what was asked for. */
typedef struct replay { const float *v; size_t n, used; } replay;

static void replay_fill(void *state, float *out, size_t n)
{
    replay *r = state;
    size_t i;
    for (i = 0; i < n; i++) out[i] = r->used + i < r->n ? r->v[r->used + i] : 0.5f;
    r->used += n;
}

static int load(const char *dir, const char *name, loupe_image *img)
{
    char path[1024], err[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (loupe_image_load(path, LOUPE_DEFAULT_MAX_PIXELS, img, err, sizeof err)) {
        printf("FAIL %s\n", err);
        failed++;
        return -1;
    }
    return 0;
}

/* Properties that need no golden tensors. */
static void check_properties(const loupe_model *m)
{
    const loupe_config *c = loupe_model_config(m);
    int S = c->image_size, g = S / c->patch_size, i, nt = -1, ok, sizes[][2] = {{150, 112}, {200, 112}, {7, 112},
        {113, 112}, {1000, 336}, {3, 5}, {336, 336}, {227, 112}};
    unsigned char rgb[4 * 3] = {255, 0, 0, 0, 255, 0, 0, 0, 255, 200, 100, 50}, px[4 * 3];
    loupe_image mask, img;
    float norm[4], *pv = malloc(3 * (size_t)S * S * sizeof *pv), *ml = malloc((size_t)S * S * sizeof *ml),
          pl[64 * 64], draws[4] = {0.0f, 0.25f, 0.5f, 0.75f};
    unsigned char bin[4];
    replay r;
    loupe_uniform u;
    char err[256];
    u.fill = replay_fill;
    u.state = &r;
    /* Pillow's L of pure red, green, blue and of (200, 100, 50): 76, 150, 29, 124 */
    ok = pil_luma(rgb) == 76 && pil_luma(rgb + 3) == 150 && pil_luma(rgb + 6) == 29 && pil_luma(rgb + 9) == 124;
    for (i = 0; i < 256; i++) {
        unsigned char gray[3];
        gray[0] = gray[1] = gray[2] = (unsigned char)i;
        ok = ok && pil_luma(gray) == i;
    }
    check(ok, "convert(\"L\"): Pillow's weights on RGB, gray pixels unchanged");
    /* RGB mask: L = 76, 150, 29, 124 -> min 29, max 150 -> (L - 29) / 121 */
    mask.width = 2;
    mask.height = 2;
    mask.rgb = rgb;
    r.v = draws;
    r.n = 4;
    r.used = 0;
    ok = !loupe_mask_binarize(&mask, &u, bin, norm, err, sizeof err) && r.used == 4 && norm[0] == 47.0f / 121.0f &&
         norm[1] == 1.0f && norm[2] == 0.0f && norm[3] == 95.0f / 121.0f && bin[0] == 1 && bin[1] == 1 && bin[2] == 0 &&
         bin[3] == 1;
    check(ok, "an RGB mask: L, min-max normalisation, normalised >= u (4 draws)");
    /* a constant mask normalises to zeros; a draw of exactly 0 still gives 1 (0 >= 0) */
    memset(px, 255, sizeof px);
    mask.rgb = px;
    r.used = 0;
    ok = !loupe_mask_binarize(&mask, &u, bin, norm, err, sizeof err) && r.used == 4 && norm[0] == 0.0f &&
         norm[3] == 0.0f && bin[0] == 1 && bin[1] == 0 && bin[2] == 0 && bin[3] == 0;
    check(ok, "a constant mask: zeros, still one draw per pixel, >= keeps a zero draw");
    /* NEAREST: Pillow's accumulated double against floor((i + 0.5) in / out) */
    ok = 1;
    for (i = 0; i < (int)(sizeof sizes / sizeof sizes[0]); i++) {
        int in = sizes[i][0], out = sizes[i][1], idx[1024], k;
        nearest_axis(in, out, idx);
        for (k = 0; k < out; k++) {
            long num = (2L * k + 1) * in, den = 2L * out;
            if (num % den != 0 && idx[k] != (int)(num / den)) ok = 0;
            if (idx[k] < 0 || idx[k] >= in) ok = 0;
        }
    }
    check(ok, "NEAREST source indices = floor((i + 0.5) in / out) away from exact ties, always inside");
    /* an authentic image: zero maps, no target, nothing drawn */
    img.width = 2;
    img.height = 2;
    img.rgb = rgb;
    r.used = 0;
    for (i = 0; i < g * g; i++) pl[i] = 7.0f;
    ok = pv && ml && !loupe_prepare_example(m, &img, NULL, &u, pv, ml, &nt, pl, err, sizeof err) && r.used == 0 &&
         nt == 0 && ml[0] == 0.0f && ml[S * S - 1] == 0.0f && pl[0] == 0.0f && pl[g * g - 1] == 0.0f;
    check(ok, "an authentic image: zero mask_labels and patch_labels, no target, no draw");
    /* a mask of another size is refused with a sentence */
    mask.width = 1;
    mask.height = 4;
    ok = pv && loupe_prepare_example(m, &img, &mask, &u, pv, ml, &nt, pl, err, sizeof err) == -1 &&
         strstr(err, "1x4") && strstr(err, "2x2");
    check(ok, "a mask of another size is refused, naming both sizes");
    /* a mask with no uniform source is refused */
    mask.width = 2;
    mask.height = 2;
    ok = loupe_mask_binarize(&mask, NULL, bin, NULL, err, sizeof err) == -1;
    check(ok, "dithering without a uniform source is refused");
    free(pv);
    free(ml);
}

/* The splitmix stream: counter-based (drawing 3 + 5 equals drawing 8) and in [0, 1). */
static void check_splitmix(void)
{
    loupe_splitmix a = {42, 0}, b = {42, 0};
    float x[8], y[8];
    int i, ok = 1;
    loupe_splitmix_fill(&a, x, 3);
    loupe_splitmix_fill(&a, x + 3, 5);
    loupe_splitmix_fill(&b, y, 8);
    for (i = 0; i < 8; i++) ok = ok && x[i] == y[i] && x[i] >= 0.0f && x[i] < 1.0f;
    check(ok && a.counter == 8 && b.counter == 8, "loupe_splitmix_fill: counter-based stream in [0, 1)");
}

int main(int argc, char **argv)
{
    char err[512];
    loupe_model *m;
    loupe_image img0, img1, mask0;
    const loupe_config *c;
    golden_tensor *rand0, *labels, *cl0, *cl1, *ml0, *ml1;
    float *pv, *ml, *pl, *norm, *resized, *scratch;
    unsigned char *bin;
    int S, g, nt0 = -1, nt1 = -1, forged = 0, i;
    size_t n;
    replay r;
    loupe_uniform u;
    if (argc != 3) {
        fprintf(stderr, "usage: check_batch MODEL.bin CASE_DIR\n");
        return 2;
    }
    if (!(m = loupe_model_load(argv[1], err, sizeof err))) {
        fprintf(stderr, "check_batch: %s\n", err);
        return 1;
    }
    if (golden_load("check_batch", argv[2], "train", gt, MAX_GOLDEN, &ngt)) return 1;
    c = loupe_model_config(m);
    S = c->image_size;
    g = S / c->patch_size;
    check_splitmix();
    check_properties(m);
    if (load(argv[2], "image.png", &img0) || load(argv[2], "train_real.jpg", &img1) ||
        load(argv[2], "train_mask.png", &mask0) || !(rand0 = find("batch.mask_dither_rand_0")))
        goto report;
    n = (size_t)mask0.width * mask0.height;
    pv = malloc(3 * (size_t)S * S * sizeof *pv);
    ml = malloc((size_t)S * S * sizeof *ml);
    pl = malloc((size_t)g * g * sizeof *pl);
    norm = malloc(n * sizeof *norm);
    bin = malloc(n);
    resized = malloc((size_t)S * S * sizeof *resized);
    scratch = malloc(MASK_INTERP_SCRATCH(S, S) * sizeof *scratch);
    if (!pv || !ml || !pl || !norm || !bin || !resized || !scratch) {
        printf("FAIL out of memory\n");
        failed++;
        goto report;
    }
    u.fill = replay_fill;
    u.state = &r;
    check(rand0->numel == (long)n, "the recorded draw has one number per mask pixel");

    /* the mask at its own size: normalised and dithered */
    r.v = rand0->data;
    r.n = (size_t)rand0->numel;
    r.used = 0;
    if (loupe_mask_binarize(&mask0, &u, bin, norm, err, sizeof err)) { printf("FAIL %s\n", err); failed++; goto report; }
    compare("batch.mask_normalized_0", norm, (long)n, 0, 0.0);
    {
        float *b = malloc(n * sizeof *b);
        size_t k;
        if (b) {
            for (k = 0; k < n; k++) b[k] = bin[k];
            compare("batch.mask_binary_0", b, (long)n, 0, 0.0);
            free(b);
        }
    }
    /* the intermediate of patch_labels */
    mask_interp(norm, mask0.height, mask0.width, resized, S, S, scratch);
    compare("batch.patch_mask_resized_0", resized, (long)S * S, 0, SOFT_ABS_TOL);
    compare("batch.patch_mask_resized_0", resized, (long)S * S, 0, 0.0);

    /* image 0: forged */
    r.used = 0;
    if (loupe_prepare_example(m, &img0, &mask0, &u, pv, ml, &nt0, pl, err, sizeof err)) {
        printf("FAIL image 0: %s\n", err);
        failed++;
        goto report;
    }
    check(r.used == n, "image 0 draws exactly one number per mask pixel");
    compare("batch.pixel_values", pv, 3L * S * S, 0, 0.0);
    compare("batch.patch_labels", pl, (long)g * g, 0, SOFT_ABS_TOL);
    compare("batch.patch_labels", pl, (long)g * g, 0, 0.0);
    ml0 = find("batch.mask_labels_0");
    cl0 = find("batch.class_labels_0");
    if (ml0 && cl0) {
        check(ml0->ndim == 3 && ml0->dims[0] == nt0 && cl0->numel == nt0 && (nt0 == 0 || cl0->data[0] == 0.0f),
              "image 0: one target of class 0 (mask_labels_0 (1,S,S), class_labels_0 [0])");
        if (nt0 == 1) compare("batch.mask_labels_0", ml, (long)S * S, 0, 0.0);
    }
    for (i = 0; i < S * S; i++) forged += ml[i] == 1.0f;
    check(forged == 3287, "image 0: 3287 forged pixels in mask_labels (train.json)");

    /* image 1: authentic */
    r.used = 0;
    if (loupe_prepare_example(m, &img1, NULL, &u, pv, ml, &nt1, pl, err, sizeof err)) {
        printf("FAIL image 1: %s\n", err);
        failed++;
        goto report;
    }
    check(r.used == 0, "image 1 (authentic) draws nothing");
    compare("batch.pixel_values", pv, 3L * S * S, 3L * S * S, 0.0);
    compare("batch.patch_labels", pl, (long)g * g, (long)g * g, 0.0);
    ml1 = find("batch.mask_labels_1");
    cl1 = find("batch.class_labels_1");
    if (ml1 && cl1)
        check(ml1->ndim == 3 && ml1->dims[0] == 0 && cl1->numel == 0 && nt1 == 0,
              "image 1: no target (mask_labels_1 (0,S,S), class_labels_1 [])");
    labels = find("batch.labels");
    if (labels) { /* the label of an example is whether a mask was given */
        float ours[2];
        ours[0] = 1.0f; /* image 0 was given train_mask.png */
        ours[1] = 0.0f;
        check(labels->numel == 2, "labels: two images");
        compare("batch.labels", ours, 2, 0, 0.0);
    }
    free(pv);
    free(ml);
    free(pl);
    free(norm);
    free(bin);
    free(resized);
    free(scratch);
    loupe_image_free(&img0);
    loupe_image_free(&img1);
    loupe_image_free(&mask0);
report:
    for (i = 0; i < ngt; i++) free(gt[i].data);
    loupe_model_free(m);
    printf("check_batch: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
