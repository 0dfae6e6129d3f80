/* check_demo.c - the shipped demo model on its samples, through the library.
 *
 *   check_demo MODEL.bin IMAGE...
 *
 * Each IMAGE is a sample; a forged one has its mask beside it, <stem>.mask.png (255 =
 * forged). Every forged sample must score above 0.5 with a predicted mask (threshold 0.5,
 * at the original size) whose IoU with its mask is at least 0.5; every authentic one must
 * score below 0.5. Prints one line per sample and "N passed, M failed". */
#include "../loupe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MIN_IOU 0.5

int main(int argc, char **argv)
{
    char err[512], path[2048];
    int n = argc - 2, i, passed = 0, failed = 0;
    loupe_model *m;
    loupe_session *s;
    float *px;
    if (argc < 2) { fprintf(stderr, "usage: check_demo MODEL.bin IMAGE...\n"); return 2; }
    if (!(m = loupe_model_load(argv[1], err, sizeof err)) || !(s = loupe_session_new(m, err, sizeof err))) {
        fprintf(stderr, "check_demo: %s\n", err);
        return 1;
    }
    px = malloc(3 * sizeof *px * (size_t)loupe_model_config(m)->image_size * loupe_model_config(m)->image_size);
    for (i = 0; i < n; i++) {
        loupe_image img, mask;
        unsigned char *pred;
        const char *name = argv[2 + i], *dot = strrchr(name, '.');
        int forged, ok;
        double iou = 0.0, prob;
        long long inter = 0, uni = 0;
        size_t k, np;
        if (!dot) dot = name + strlen(name);
        if (loupe_image_load(name, LOUPE_DEFAULT_MAX_PIXELS, &img, err, sizeof err) ||
            loupe_preprocess(m, &img, px, err, sizeof err) || loupe_forward(s, px, err, sizeof err)) {
            printf("FAIL %s: %s\n", name, err);
            failed++;
            continue;
        }
        np = (size_t)img.width * img.height;
        pred = malloc(np);
        loupe_postprocess(s, img.width, img.height, 0.5f, NULL, pred, err, sizeof err);
        prob = loupe_get_outputs(s)->prob;
        snprintf(path, sizeof path, "%.*s.mask.png", (int)(dot - name), name);
        forged = loupe_image_load(path, LOUPE_DEFAULT_MAX_PIXELS, &mask, err, sizeof err) == 0;
        if (forged) {
            for (k = 0; k < np; k++) {
                int t = mask.rgb[3 * k] > 127, p = pred[k] != 0;
                inter += t && p;
                uni += t || p;
            }
            iou = uni ? (double)inter / uni : 1.0;
            ok = prob > 0.5 && iou >= MIN_IOU && mask.width == img.width && mask.height == img.height;
            printf("%-4s %-28s forged     p = %.4f  mask IoU %.3f (>= %.1f)\n", ok ? "ok" : "FAIL", name, prob, iou, MIN_IOU);
            loupe_image_free(&mask);
        } else {
            ok = prob < 0.5;
            printf("%-4s %-28s authentic  p = %.4f\n", ok ? "ok" : "FAIL", name, prob);
        }
        if (ok) passed++;
        else failed++;
        free(pred);
        loupe_image_free(&img);
    }
    if (n < 1) { printf("FAIL no samples given\n"); failed++; }
    free(px);
    loupe_session_free(s);
    loupe_model_free(m);
    printf("check_demo: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
