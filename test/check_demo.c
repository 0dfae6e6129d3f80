/* check_demo.c - the shipped demo model on its samples, through the library.
 *
 *   check_demo MODEL.bin SAMPLES_DIR
 *
 * SAMPLES_DIR holds images and, for the forged ones, masks named <stem>.mask.png (255 =
 * forged). Every forged sample must score above 0.5 with a predicted mask (threshold 0.5,
 * at the original size) whose IoU with its mask is at least 0.5; every authentic one must
 * score below 0.5. Prints one line per sample and "N passed, M failed". */
#include "../loupe.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIN_IOU 0.5

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int main(int argc, char **argv)
{
    char err[512], path[2048], *names[256];
    int n = 0, i, passed = 0, failed = 0;
    loupe_model *m;
    loupe_session *s;
    DIR *d;
    struct dirent *e;
    float *px;
    if (argc != 3) { fprintf(stderr, "usage: check_demo MODEL.bin SAMPLES_DIR\n"); return 2; }
    if (!(m = loupe_model_load(argv[1], err, sizeof err)) || !(s = loupe_session_new(m, err, sizeof err))) {
        fprintf(stderr, "check_demo: %s\n", err);
        return 1;
    }
    if (!(d = opendir(argv[2]))) { fprintf(stderr, "check_demo: cannot open %s\n", argv[2]); return 1; }
    while ((e = readdir(d)) && n < 256)
        if (e->d_name[0] != '.' && !strstr(e->d_name, ".mask.") && (strstr(e->d_name, ".jpg") || strstr(e->d_name, ".png")))
            names[n++] = strdup(e->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, cmp_str);
    px = malloc(3 * sizeof *px * (size_t)loupe_model_config(m)->image_size * loupe_model_config(m)->image_size);
    for (i = 0; i < n; i++) {
        loupe_image img, mask;
        unsigned char *pred;
        const char *dot = strrchr(names[i], '.');
        int forged, ok;
        double iou = 0.0, prob;
        long long inter = 0, uni = 0;
        size_t k, np;
        snprintf(path, sizeof path, "%s/%s", argv[2], names[i]);
        if (loupe_image_load(path, LOUPE_DEFAULT_MAX_PIXELS, &img, err, sizeof err) ||
            loupe_preprocess(m, &img, px, err, sizeof err) || loupe_forward(s, px, err, sizeof err)) {
            printf("FAIL %s: %s\n", names[i], err);
            failed++;
            continue;
        }
        np = (size_t)img.width * img.height;
        pred = malloc(np);
        loupe_postprocess(s, img.width, img.height, 0.5f, NULL, pred, err, sizeof err);
        prob = loupe_get_outputs(s)->prob;
        snprintf(path, sizeof path, "%s/%.*s.mask.png", argv[2], (int)(dot - names[i]), names[i]);
        forged = loupe_image_load(path, LOUPE_DEFAULT_MAX_PIXELS, &mask, err, sizeof err) == 0;
        if (forged) {
            for (k = 0; k < np; k++) {
                int t = mask.rgb[3 * k] > 127, p = pred[k] != 0;
                inter += t && p;
                uni += t || p;
            }
            iou = uni ? (double)inter / uni : 1.0;
            ok = prob > 0.5 && iou >= MIN_IOU && mask.width == img.width && mask.height == img.height;
            printf("%-4s %-28s forged     p = %.4f  mask IoU %.3f (>= %.1f)\n", ok ? "ok" : "FAIL", names[i], prob, iou, MIN_IOU);
            loupe_image_free(&mask);
        } else {
            ok = prob < 0.5;
            printf("%-4s %-28s authentic  p = %.4f\n", ok ? "ok" : "FAIL", names[i], prob);
        }
        if (ok) passed++;
        else failed++;
        free(pred);
        loupe_image_free(&img);
        free(names[i]);
    }
    if (n == 0) { printf("FAIL no samples in %s\n", argv[2]); failed++; }
    free(px);
    loupe_session_free(s);
    loupe_model_free(m);
    printf("check_demo: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
