/* check_golden.c - compares loupe.c's forward pass with upstream's golden tensors.
 *
 *   check_golden MODEL.bin CASE_DIR
 *
 * CASE_DIR is a folder in the golden layout (golden.txt + golden.safetensors; see
 * ../shared/golden/README.md). The forward pass runs on the case's pixel_values;
 * every intermediate tensor loupe.c reports through its tap is compared with the
 * golden tensor of the same name when the case has it. When the case folder holds
 * its image (image.png / image.jpg), the run starts from the file instead, the way
 * users run it: decoded pixels (input_rgb), the PIL resize (resized_rgb) and the
 * normalized pixel_values must then match exactly. Tolerances (golden README,
 * section 7: about 100x upstream's own fp32-vs-fp64 error):
 *   float tensors               max|c - g| <= 1e-4 * max|g|
 *   global_logit, fused_logit   abs 1e-5;   fused_prob, pseudo_label   abs 3e-6
 *   dec_attn_mask_logits_*      also every mask bit (sigmoid(logit) < 0.5) exact; a
 *                               flipped bit whose golden logit is within 1e-3 of 0 is
 *                               reported as a numerical tie, any other flip fails
 *   mask                        exact except pixels whose golden seg_prob_full is closer
 *                               to 0.5 than our measured seg_prob_full error; >= 99.9 %
 * Prints one line per tensor and a summary; exits non-zero on any failure. */
#include "../loupe.h"
#include "golden_io.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TENSORS 1024
#define REL_TOL 1e-4
#define LOGIT_ABS_TOL 1e-5
#define PROB_ABS_TOL 3e-6
#define TIE_MARGIN 1e-3
#define MIN_MASK_AGREEMENT 0.999
#define UPSTREAM_THRESHOLD 0.5f

typedef struct checker {
    golden_tensor t[MAX_TENSORS];
    int n, failures, compared, ties;
} checker;

/* Loads golden.txt and golden.safetensors of the case folder dir. */
static int load_golden(checker *ck, const char *dir)
{
    if (golden_load("check_golden", dir, "golden", ck->t, MAX_TENSORS, &ck->n)) return -1;
    if (ck->n == 0) { fprintf(stderr, "check_golden: %s/golden.txt lists no tensors\n", dir); return -1; }
    return 0;
}

/* The golden tensor called name, or NULL. */
static golden_tensor *find(checker *ck, const char *name)
{
    int i;
    for (i = 0; i < ck->n; i++)
        if (strcmp(ck->t[i].name, name) == 0) return &ck->t[i];
    return NULL;
}

/* Copies a tapped tensor into golden order ([C][H][W] when it was channels-last). */
static float *to_golden_order(const float *data, int ndim, const int *dims, int channels_last, long numel)
{
    float *out = malloc((size_t)numel * sizeof *out);
    long c, p, C, HW;
    if (!out) return NULL;
    if (!channels_last) { memcpy(out, data, (size_t)numel * sizeof *out); return out; }
    C = dims[ndim - 3];
    HW = (long)dims[ndim - 2] * dims[ndim - 1];
    for (c = 0; c < C; c++)
        for (p = 0; p < HW; p++) out[c * HW + p] = data[p * C + c];
    return out;
}

/* Compares one tensor and prints the verdict; returns 0 when within tolerance. */
static int compare(checker *ck, golden_tensor *g, const float *ours)
{
    double maxg = 0.0, maxd = 0.0, tol;
    long i, flips = 0, ties = 0;
    const char *kind = "rel";
    int ok;
    for (i = 0; i < g->numel; i++) {
        double d = fabs((double)ours[i] - g->data[i]);
        if (!(d <= maxd)) maxd = d; /* NaN counts as the worst error */
        if (fabs(g->data[i]) > maxg) maxg = fabs(g->data[i]);
    }
    if (!strcmp(g->name, "pixel_values")) { tol = 0.0; kind = "exact"; }
    else if (!strcmp(g->name, "global_logit") || !strcmp(g->name, "fused_logit")) { tol = LOGIT_ABS_TOL; kind = "abs"; }
    else if (!strcmp(g->name, "fused_prob") || !strcmp(g->name, "pseudo_label")) { tol = PROB_ABS_TOL; kind = "abs"; }
    else tol = REL_TOL * maxg;
    ok = maxd <= tol;
    if (!strncmp(g->name, "dec_attn_mask_logits_", 21))
        for (i = 0; i < g->numel; i++) {
            int mine = 1.0f / (1.0f + expf(-ours[i])) < 0.5f, theirs = g->data[i] < 0.0f;
            if (mine != theirs) {
                if (fabs(g->data[i]) < TIE_MARGIN) ties++;
                else flips++;
            }
        }
    if (flips) ok = 0;
    printf("%-26s %-4s max|d| %.3g  tol %.3g (%s)  max|g| %.3g", g->name, ok ? "ok" : "FAIL", maxd, tol, kind, maxg);
    if (!strncmp(g->name, "dec_attn_mask_logits_", 21)) printf("  mask-bit flips %ld, ties %ld", flips, ties);
    printf("\n");
    ck->ties += (int)ties;
    ck->compared++;
    g->compared = 1;
    if (!ok) ck->failures++;
    return ok ? 0 : -1;
}

/* The tap: compares every reported tensor the case holds. */
static void on_tensor(void *user, const char *name, const float *data, int ndim, const int *dims, int channels_last)
{
    checker *ck = user;
    golden_tensor *g = find(ck, name);
    long numel = 1;
    int i;
    float *ours;
    if (!g) return;
    for (i = 0; i < ndim; i++) numel *= dims[i];
    if (numel != g->numel) {
        printf("%-26s FAIL shape: %ld elements, golden has %ld\n", name, numel, g->numel);
        ck->failures++;
        g->compared = 1;
        return;
    }
    ours = to_golden_order(data, ndim, dims, channels_last, numel);
    if (!ours) { ck->failures++; return; }
    compare(ck, g, ours);
    free(ours);
}

/* Post-processing at the original size: seg_prob_full and the final mask. */
static void check_postprocess(checker *ck, loupe_session *s)
{
    golden_tensor *gp = find(ck, "seg_prob_full"), *gm = find(ck, "mask");
    golden_tensor *ref = gm ? gm : gp;
    char err[256];
    long n, i, differ = 0, excused = 0;
    int height, width;
    float *prob;
    unsigned char *mask;
    double seg_err = 0.0;
    if (!ref) return;
    height = (int)ref->dims[ref->ndim - 2];
    width = (int)ref->dims[ref->ndim - 1];
    n = (long)width * height;
    prob = malloc((size_t)n * sizeof *prob);
    mask = malloc((size_t)n);
    if (!prob || !mask || loupe_postprocess(s, width, height, UPSTREAM_THRESHOLD, prob, mask, err, sizeof err)) {
        printf("post-processing FAIL: %s\n", err);
        ck->failures++;
        free(prob); free(mask);
        return;
    }
    if (gp) {
        compare(ck, gp, prob);
        for (i = 0; i < n; i++)
            if (fabs((double)prob[i] - gp->data[i]) > seg_err) seg_err = fabs((double)prob[i] - gp->data[i]);
    }
    if (gm) {
        for (i = 0; i < n; i++)
            if ((mask[i] == 255) != (gm->data[i] > 127.5f)) {
                if (gp && fabs(gp->data[i] - 0.5) <= seg_err) excused++;
                else differ++;
            }
        printf("%-26s %-4s %ld of %ld pixels differ (%ld more within the seg_prob error %.3g of 0.5); agreement %.5f %%\n",
               "mask", differ == 0 && 1.0 - (double)(differ + excused) / n >= MIN_MASK_AGREEMENT ? "ok" : "FAIL",
               differ, n, excused, seg_err, 100.0 * (1.0 - (double)(differ + excused) / n));
        if (differ || 1.0 - (double)(differ + excused) / n < MIN_MASK_AGREEMENT) ck->failures++;
        ck->compared++;
        gm->compared = 1;
    }
    free(prob);
    free(mask);
}

/* Compares bytes with a golden float tensor holding 0..255 values exactly. */
static void compare_bytes(checker *ck, const char *name, const unsigned char *bytes, long n)
{
    golden_tensor *g = find(ck, name);
    long i, differ = 0;
    if (!g) return;
    if (g->numel != n) {
        printf("%-26s FAIL shape: %ld values, golden has %ld\n", name, n, g->numel);
        ck->failures++;
    } else {
        for (i = 0; i < n; i++) differ += (float)bytes[i] != g->data[i];
        printf("%-26s %-4s %ld of %ld bytes differ (exact match required)\n", name, differ ? "FAIL" : "ok", differ, n);
        if (differ) ck->failures++;
    }
    ck->compared++;
    g->compared = 1;
}

/* The path users take: decode the case's image file, resize like PIL, normalize.
 * Returns malloc'd pixel_values, or NULL when the case has no image file. */
static float *pixels_from_image(checker *ck, const char *dir, const loupe_model *m)
{
    static const char *const names[] = {"image.png", "image.jpg", "image.jpeg", "image.ppm"};
    char path[1024], err[512];
    loupe_image img;
    size_t i;
    int S = loupe_model_config(m)->image_size;
    unsigned char *resized;
    float *px;
    FILE *f = NULL;
    for (i = 0; i < sizeof names / sizeof names[0] && !f; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        f = fopen(path, "rb");
    }
    if (!f) return NULL;
    fclose(f);
    if (loupe_image_load(path, LOUPE_DEFAULT_MAX_PIXELS, &img, err, sizeof err)) {
        printf("%-26s FAIL %s\n", "image", err);
        ck->failures++;
        return NULL;
    }
    printf("image: %s, %dx%d\n", path, img.width, img.height);
    compare_bytes(ck, "input_rgb", img.rgb, 3L * img.width * img.height);
    resized = malloc((size_t)S * S * 3);
    px = malloc((size_t)S * S * 3 * sizeof *px);
    if (!resized || !px || loupe_resize_rgb(img.rgb, img.width, img.height, resized, S, S) ||
        loupe_preprocess(m, &img, px, err, sizeof err)) {
        printf("%-26s FAIL cannot preprocess\n", "image");
        ck->failures++;
        free(resized); free(px);
        loupe_image_free(&img);
        return NULL;
    }
    compare_bytes(ck, "resized_rgb", resized, 3L * S * S);
    free(resized);
    loupe_image_free(&img);
    return px;
}

int main(int argc, char **argv)
{
    static checker ck;
    char err[512];
    loupe_model *m;
    loupe_session *s;
    golden_tensor *px;
    float *image_pixels;
    int i, rc;
    if (argc != 3) {
        fprintf(stderr, "usage: check_golden MODEL.bin CASE_DIR\n");
        return 2;
    }
    if (load_golden(&ck, argv[2])) return 1;
    px = find(&ck, "pixel_values");
    if (!px) { fprintf(stderr, "check_golden: %s has no pixel_values\n", argv[2]); return 1; }
    m = loupe_model_load(argv[1], err, sizeof err);
    if (!m) { fprintf(stderr, "check_golden: %s\n", err); return 1; }
    s = loupe_session_new(m, err, sizeof err);
    if (!s) { fprintf(stderr, "check_golden: %s\n", err); loupe_model_free(m); return 1; }
    if (px->numel != 3L * loupe_model_config(m)->image_size * loupe_model_config(m)->image_size) {
        fprintf(stderr, "check_golden: pixel_values of %s do not fit the model's image size\n", argv[2]);
        return 1;
    }
    /* Run from the image file when the case has one (pixel_values are then compared
     * exactly through the tap); otherwise from the golden pixel_values. */
    image_pixels = pixels_from_image(&ck, argv[2], m);
    loupe_set_tap(s, on_tensor, &ck);
    rc = loupe_forward(s, image_pixels ? image_pixels : px->data, err, sizeof err);
    free(image_pixels);
    if (rc) { fprintf(stderr, "check_golden: %s\n", err); return 1; }
    check_postprocess(&ck, s);
    printf("not compared (not computed by the forward pass):");
    for (i = 0; i < ck.n; i++)
        if (!ck.t[i].compared) printf(" %s", ck.t[i].name);
    printf("\n");
    if (ck.compared == 0) { printf("check_golden: nothing was compared\n"); ck.failures++; }
    printf("check_golden %s: %d passed, %d failed (mask-bit ties: %d)\n", argv[2], ck.compared - ck.failures,
           ck.failures, ck.ties);
    loupe_session_free(s);
    loupe_model_free(m);
    for (i = 0; i < ck.n; i++) free(ck.t[i].data);
    return ck.failures ? 1 : 0;
}
