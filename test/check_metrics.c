/* check_metrics.c - loupe.c's validation metrics against upstream's on the metrics golden.
 *
 *   check_metrics METRICS_DIR
 *
 * METRICS_DIR holds metrics.json and imgK_pred.png / imgK_target.png (8-bit gray, 255 =
 * forged); see ../shared/golden/README.md section 11. The images' labels, probabilities
 * and file names and the expected auc, f1, iou and overall are read from metrics.json
 * (nothing is hard-coded); loupe_metrics must reproduce them within 1e-12, and the pixel
 * counts of its "breakdown" exactly. Then properties the golden does not cover: one
 * class only (auc NaN), no forged target pixel (f1, iou NaN), ties, accuracy, a class
 * with an empty union, bad arguments. Uses only loupe.h. Prints "N passed, M failed". */
#include "../loupe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define METRIC_TOL 1e-12
#define MAX_IMAGES 64
#define NAME_LEN 256

static int passed, failed;

static void check(int ok, const char *what)
{
    if (ok) passed++;
    else failed++;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long n;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) { fclose(f); return NULL; }
    buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
    if (buf) buf[n] = '\0';
    fclose(f);
    return buf;
}

/* The next `"key":` at or after p and before end; returns the position after the colon. */
static const char *json_key(const char *p, const char *end, const char *key)
{
    char pat[64];
    const char *q;
    snprintf(pat, sizeof pat, "\"%s\"", key);
    for (q = strstr(p, pat); q && q < end; q = strstr(q + 1, pat)) {
        const char *c = q + strlen(pat);
        while (*c == ' ' || *c == '\n' || *c == '\r' || *c == '\t') c++;
        if (*c == ':') return c + 1;
    }
    return NULL;
}

static int json_number(const char *p, const char *end, const char *key, double *v)
{
    const char *q = json_key(p, end, key);
    char *e;
    if (!q) return -1;
    *v = strtod(q, &e);
    return e == q ? -1 : 0;
}

static int json_string(const char *p, const char *end, const char *key, char *out, size_t n)
{
    const char *q = json_key(p, end, key), *close;
    if (!q) return -1;
    while (*q == ' ' || *q == '\n') q++;
    if (*q != '"' || !(close = strchr(q + 1, '"')) || (size_t)(close - q - 1) >= n) return -1;
    memcpy(out, q + 1, (size_t)(close - q - 1));
    out[close - q - 1] = '\0';
    return 0;
}

/* A gray PNG as bytes (the decoder returns RGB; 255 stays 255, 0 stays 0). */
static unsigned char *load_mask(const char *dir, const char *name, int *w, int *h)
{
    char path[1024], err[256];
    loupe_image img;
    unsigned char *m;
    size_t i, n;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (loupe_image_load(path, LOUPE_DEFAULT_MAX_PIXELS, &img, err, sizeof err)) {
        printf("FAIL %s\n", err);
        failed++;
        return NULL;
    }
    n = (size_t)img.width * img.height;
    if ((m = malloc(n)) != NULL)
        for (i = 0; i < n; i++) m[i] = img.rgb[3 * i];
    *w = img.width;
    *h = img.height;
    loupe_image_free(&img);
    return m;
}

static void close_to(double ours, double expected, const char *name)
{
    char what[160];
    snprintf(what, sizeof what, "%s = %.17g (expected %.17g, |d| %.3g)", name, ours, expected, fabs(ours - expected));
    check(fabs(ours - expected) <= METRIC_TOL, what);
}

/* Adds probabilities/labels (image metrics only) and returns the result. */
static loupe_metrics image_only(const float *p, const int *l, int n)
{
    loupe_metrics r;
    char err[256];
    int i;
    loupe_metrics_acc *a = loupe_metrics_new(err, sizeof err);
    memset(&r, 0, sizeof r);
    if (!a) return r;
    for (i = 0; i < n; i++) loupe_metrics_add(a, p[i], l[i], NULL, NULL, 0, 0, err, sizeof err);
    loupe_metrics_result(a, &r, err, sizeof err);
    loupe_metrics_free(a);
    return r;
}

static void check_properties(void)
{
    static const float p1[] = {0.9f, 0.8f, 0.3f}, p2[] = {0.5f, 0.5f, 0.5f, 0.7f}, p3[] = {0.2f, 0.6f, 0.9f, 0.1f};
    static const int l1[] = {1, 1, 1}, l2[] = {1, 0, 0, 1}, l3[] = {0, 0, 1, 1};
    unsigned char pred[4] = {255, 255, 255, 255}, target[4] = {1, 1, 1, 1}, zeros[4] = {0, 0, 0, 0};
    loupe_metrics r;
    loupe_metrics_acc *a;
    char err[256];
    int rc;
    r = image_only(p1, l1, 3);
    check(isnan(r.auc) && isnan(r.overall) && r.images == 3 && r.forged_images == 3,
          "one class only: auc NaN (scikit-learn raises), overall NaN");
    check(isnan(r.f1) && isnan(r.iou) && r.pixel_images == 0, "no forged target pixel anywhere: f1 and iou NaN");
    check(fabs(r.accuracy - 2.0 / 3.0) < 1e-15, "accuracy: prob > 0.5 against the label (0.3 is wrong)");
    /* ties: positives {0.5, 0.7}, negatives {0.5, 0.5}: (0.5 + 0.5 + 1 + 1) / 4 = 0.75;
     * accuracy: 0.5 is not > 0.5, so the positive at 0.5 is wrong, the negatives right */
    r = image_only(p2, l2, 4);
    check(r.auc == 0.75 && r.accuracy == 0.75, "ties count 1/2 in auc; prob 0.5 is predicted authentic");
    /* positives {0.9, 0.1}, negatives {0.2, 0.6}: pairs won 2 of 4 */
    r = image_only(p3, l3, 4);
    check(r.auc == 0.5, "auc: the fraction of (forged, authentic) pairs ranked right");
    /* a fully forged target and prediction: the real class has an empty union and is left
     * out of the mean (nanmean), so iou = 1; f1 = 1 */
    a = loupe_metrics_new(err, sizeof err);
    rc = a ? loupe_metrics_add(a, 0.9f, 1, pred, target, 2, 2, err, sizeof err) : -1;
    rc |= a ? loupe_metrics_add(a, 0.1f, 0, zeros, zeros, 2, 2, err, sizeof err) : -1;
    if (a && !rc) loupe_metrics_result(a, &r, err, sizeof err);
    check(!rc && r.iou == 1.0 && r.f1 == 1.0 && r.pixel_images == 1 && r.tp == 4 && r.auc == 1.0 &&
              fabs(r.overall - 1.0) < 1e-15,
          "a class with an empty union is left out of iou; an all-zero target is skipped");
    /* an empty prediction on a forged target, pooled with the first: TP 4, FN 4 */
    rc = a ? loupe_metrics_add(a, 0.9f, 1, zeros, target, 2, 2, err, sizeof err) : -1;
    if (a && !rc) loupe_metrics_result(a, &r, err, sizeof err);
    check(!rc && r.tp == 4 && r.fn == 4 && r.fp == 0 && fabs(r.f1 - 2.0 / 3.0) < 1e-15 && r.iou == 0.25,
          "pooled pixels: TP 4, FN 4 -> f1 2/3, iou mean(real 0/4, forged 4/8) = 0.25");
    /* bad arguments are refused with a sentence */
    rc = a ? loupe_metrics_add(a, NAN, 1, NULL, NULL, 0, 0, err, sizeof err) : 0;
    check(rc == -1 && strstr(err, "NaN") != NULL, "a NaN probability is refused");
    rc = a ? loupe_metrics_add(a, 0.5f, 2, NULL, NULL, 0, 0, err, sizeof err) : 0;
    check(rc == -1, "a label other than 0 or 1 is refused");
    rc = a ? loupe_metrics_add(a, 0.5f, 1, pred, NULL, 2, 2, err, sizeof err) : 0;
    check(rc == -1, "a prediction without a target is refused");
    loupe_metrics_free(a);
}

int main(int argc, char **argv)
{
    char path[1024], err[256], pred_name[NAME_LEN], target_name[NAME_LEN], what[2 * NAME_LEN + 64];
    char *json;
    const char *images, *expected, *breakdown, *end, *p;
    double e_auc, e_f1, e_iou, e_overall, v;
    double counts[4];
    static const char *const count_keys[4] = {"TP", "FP", "FN", "TN"};
    loupe_metrics_acc *acc;
    loupe_metrics r;
    int n = 0, k;
    if (argc != 2) {
        fprintf(stderr, "usage: check_metrics METRICS_DIR\n");
        return 2;
    }
    snprintf(path, sizeof path, "%s/metrics.json", argv[1]);
    if (!(json = read_text(path))) {
        fprintf(stderr, "check_metrics: cannot read %s\n", path);
        return 1;
    }
    end = json + strlen(json);
    images = json_key(json, end, "images");
    expected = json_key(json, end, "expected");
    breakdown = json_key(json, end, "breakdown");
    if (!images || !expected || !breakdown || expected < images || json_number(expected, end, "auc", &e_auc) ||
        json_number(expected, end, "f1", &e_f1) || json_number(expected, end, "iou", &e_iou) ||
        json_number(expected, end, "overall", &e_overall)) {
        fprintf(stderr, "check_metrics: %s lacks images or expected values\n", path);
        free(json);
        return 1;
    }
    for (k = 0; k < 4; k++)
        if (json_number(breakdown, end, count_keys[k], &counts[k])) counts[k] = -1;
    acc = loupe_metrics_new(err, sizeof err);
    if (!acc) { fprintf(stderr, "check_metrics: %s\n", err); free(json); return 1; }
    /* each image object runs from its "name" to the next one (or to "expected") */
    for (p = json_key(images, expected, "name"); p && n < MAX_IMAGES; n++) {
        const char *next = json_key(p, expected, "name"), *stop = next ? next : expected;
        double label, prob;
        unsigned char *pm, *tm;
        int pw, ph, tw, th, ok;
        if (json_number(p, stop, "label", &label) || json_number(p, stop, "probability", &prob) ||
            json_string(p, stop, "pred_png", pred_name, sizeof pred_name) ||
            json_string(p, stop, "target_png", target_name, sizeof target_name)) {
            printf("FAIL image %d of metrics.json lacks label, probability, pred_png or target_png\n", n);
            failed++;
            break;
        }
        pm = load_mask(argv[1], pred_name, &pw, &ph);
        tm = load_mask(argv[1], target_name, &tw, &th);
        ok = pm && tm && pw == tw && ph == th;
        if (ok) {
            size_t i;
            for (i = 0; i < (size_t)tw * th; i++) tm[i] = tm[i] == 255; /* binary target as upstream's */
            ok = !loupe_metrics_add(acc, (float)prob, (int)label, pm, tm, pw, ph, err, sizeof err);
        }
        snprintf(what, sizeof what, "image %d (%s, %s): read and added", n, pred_name, target_name);
        check(ok, what);
        free(pm);
        free(tm);
        p = next;
    }
    check(n == 6, "metrics.json lists 6 images");
    if (loupe_metrics_result(acc, &r, err, sizeof err)) {
        printf("FAIL %s\n", err);
        failed++;
    } else {
        close_to(r.auc, e_auc, "auc");
        close_to(r.f1, e_f1, "f1");
        close_to(r.iou, e_iou, "iou");
        close_to(r.overall, e_overall, "overall");
        v = (double)r.tp;
        check(v == counts[0] && (double)r.fp == counts[1] && (double)r.fn == counts[2] && (double)r.tn == counts[3],
              "pooled TP, FP, FN, TN equal the breakdown");
        check(r.pixel_images == 3 && r.images == 6 && r.forged_images == 4,
              "pixel metrics use the 3 images with a forged target pixel; 6 images, 4 labelled forged");
        printf("     auc %.17g f1 %.17g iou %.17g overall %.17g accuracy %.17g\n", r.auc, r.f1, r.iou, r.overall,
               r.accuracy);
    }
    loupe_metrics_free(acc);
    free(json);
    check_properties();
    printf("check_metrics: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
