/* example.c - embedding loupe.c: classify one image held in memory.
 *
 *   example MODEL.bin IMAGE
 *
 * Uses only the public API of loupe.h. The image file is read into memory here, the
 * way an application receives an upload or a camera frame, and decoded from that
 * buffer; the model runs once; the program prints the forgery probability and how
 * many pixels the mask marks as forged. Every error comes back from the library as
 * a sentence in err, and the program decides what to do with it (here: print it and
 * return 1). Build: cc -DLOUPE_NO_MAIN -c loupe.c && cc example.c loupe.o -lm */
#include "../loupe.h"

#include <stdio.h>
#include <stdlib.h>

/* Upstream's mask threshold on the forgery probability map. */
#define MASK_THRESHOLD 0.5f

/* Reads a whole file into a malloc'd buffer; NULL when it cannot. */
static unsigned char *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL, *bigger;
    size_t cap = 0, got;
    *size = 0;
    if (!f) return NULL;
    do {
        if (*size == cap) {
            cap = cap ? 2 * cap : 65536;
            bigger = realloc(buf, cap);
            if (!bigger) { free(buf); fclose(f); return NULL; }
            buf = bigger;
        }
        got = fread(buf + *size, 1, cap - *size, f);
        *size += got;
    } while (got > 0);
    if (ferror(f)) { free(buf); buf = NULL; }
    fclose(f);
    return buf;
}

int main(int argc, char **argv)
{
    char err[256];
    loupe_image img = {0, 0, NULL};
    loupe_model *model = NULL;
    loupe_session *session = NULL;
    unsigned char *bytes = NULL, *mask = NULL;
    float *pixel_values = NULL;
    size_t size, image_size, forged = 0, i, n;
    int status = 1;

    if (argc != 3) { fprintf(stderr, "usage: example MODEL.bin IMAGE\n"); return 2; }
    bytes = read_file(argv[2], &size);
    if (!bytes) { fprintf(stderr, "example: cannot read %s\n", argv[2]); return 1; }

    /* 1. Decode the image from memory (the library keeps no reference to bytes). */
    if (loupe_image_decode(bytes, size, LOUPE_DEFAULT_MAX_PIXELS, &img, err, sizeof err)) goto fail;

    /* 2. Load the weights (shareable between threads) and make a session (one thread). */
    if (!(model = loupe_model_load(argv[1], err, sizeof err))) goto fail;
    if (!(session = loupe_session_new(model, err, sizeof err))) goto fail;

    /* 3. Resize and normalize to the model's input, run the model. */
    image_size = (size_t)loupe_model_config(model)->image_size;
    pixel_values = malloc(3 * image_size * image_size * sizeof *pixel_values);
    if (!pixel_values) { snprintf(err, sizeof err, "out of memory"); goto fail; }
    if (loupe_preprocess(model, &img, pixel_values, err, sizeof err)) goto fail;
    if (loupe_forward(session, pixel_values, err, sizeof err)) goto fail;
    printf("forgery probability: %.7f\n", loupe_get_outputs(session)->prob);

    /* 4. The mask at the image's own size: 255 where forged, 0 elsewhere. */
    n = (size_t)img.width * (size_t)img.height;
    mask = malloc(n);
    if (!mask) { snprintf(err, sizeof err, "out of memory"); goto fail; }
    if (loupe_postprocess(session, img.width, img.height, MASK_THRESHOLD, NULL, mask, err, sizeof err)) goto fail;
    for (i = 0; i < n; i++) forged += mask[i] != 0;
    printf("forged pixels: %lu of %dx%d\n", (unsigned long)forged, img.width, img.height);
    status = 0;
    goto done;

fail:
    fprintf(stderr, "example: %s\n", err);
done:
    free(mask);
    free(pixel_values);
    loupe_session_free(session);
    loupe_model_free(model);
    loupe_image_free(&img);
    free(bytes);
    return status;
}
