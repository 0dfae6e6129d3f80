/* make_shapes.c - a small labelled set for the training test: crops of photos, half of
 * them with coloured shapes pasted in (the forgeries), written in loupe's dataset layout.
 *
 *   make_shapes OUT_DIR COUNT SEED PHOTO...
 *
 * Writes OUT_DIR/images/NNN.png and, for every second image, OUT_DIR/masks/NNN.png
 * (255 where a shape was pasted, 0 elsewhere). Each image is a random crop (64 to 128
 * pixels a side) of one of the photos, possibly mirrored; a forged one gets one to three
 * filled rectangles, ellipses or triangles of one random saturated colour each (with
 * a little noise), covering about 5 to 40 % of the crop. Deterministic for a seed. */
#define LOUPE_NO_MAIN
#include "../loupe.c"

#if LOUPE_POSIX
#define make_dir(p) mkdir(p, 0777)
#else
#define make_dir(p) _mkdir(p)
#endif

static uint64_t rng_state;

static uint32_t rnd32(void)
{
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(rng_state >> 33);
}

static int rnd_int(int lo, int hi) { return lo + (int)(rnd32() % (uint32_t)(hi - lo + 1)); }

/* Whether (x, y) is inside shape kind k with box (x0, y0, w, h). */
static int inside(int k, int x, int y, int x0, int y0, int w, int h)
{
    double u = (x + 0.5 - x0) / w, v = (y + 0.5 - y0) / h;
    if (u < 0 || u >= 1 || v < 0 || v >= 1) return 0;
    if (k == 0) return 1;                                       /* rectangle */
    if (k == 1) return (u - 0.5) * (u - 0.5) + (v - 0.5) * (v - 0.5) < 0.25; /* ellipse */
    return v >= fabs(2.0 * u - 1.0);                            /* triangle */
}

static int write_png(const char *path, const unsigned char *pix, int w, int h, int channels)
{
    unsigned char *png;
    size_t n;
    char err[256];
    FILE *f;
    if (loupe_png_encode(pix, w, h, channels, &png, &n, err, sizeof err)) { fprintf(stderr, "make_shapes: %s\n", err); return -1; }
    f = fopen(path, "wb");
    if (!f || fwrite(png, 1, n, f) != n) { fprintf(stderr, "make_shapes: cannot write %s\n", path); free(png); if (f) fclose(f); return -1; }
    free(png);
    return fclose(f) ? -1 : 0;
}

int main(int argc, char **argv)
{
    char path[1024], err[512];
    loupe_image photos[16];
    int n_photos, count, i;
    if (argc < 5) { fprintf(stderr, "usage: make_shapes OUT_DIR COUNT SEED PHOTO...\n"); return 2; }
    count = atoi(argv[2]);
    rng_state = strtoull(argv[3], NULL, 10) * 0x9E3779B97F4A7C15ULL + 1;
    n_photos = argc - 4 < 16 ? argc - 4 : 16;
    for (i = 0; i < n_photos; i++)
        if (loupe_image_load(argv[4 + i], LOUPE_DEFAULT_MAX_PIXELS, &photos[i], err, sizeof err)) {
            fprintf(stderr, "make_shapes: %s\n", err);
            return 1;
        }
    snprintf(path, sizeof path, "%s/images", argv[1]);
    make_dir(argv[1]);
    make_dir(path);
    snprintf(path, sizeof path, "%s/masks", argv[1]);
    make_dir(path);
    for (i = 0; i < count; i++) {
        const loupe_image *p = &photos[rnd_int(0, n_photos - 1)];
        int w = rnd_int(64, 128), h = rnd_int(64, 128), mirror = rnd_int(0, 1), forged = i % 2, x, y, s;
        int ox, oy;
        unsigned char *rgb, *mask;
        if (w > p->width) w = p->width;
        if (h > p->height) h = p->height;
        ox = rnd_int(0, p->width - w);
        oy = rnd_int(0, p->height - h);
        rgb = malloc((size_t)w * h * 3);
        mask = calloc((size_t)w * h, 1);
        if (!rgb || !mask) return 1;
        for (y = 0; y < h; y++)
            for (x = 0; x < w; x++) {
                int sx = ox + (mirror ? w - 1 - x : x);
                memcpy(rgb + ((size_t)y * w + x) * 3, p->rgb + ((size_t)(oy + y) * p->width + sx) * 3, 3);
            }
        if (forged) {
            int shapes = rnd_int(1, 3);
            for (s = 0; s < shapes; s++) {
                int k = rnd_int(0, 2), sw = rnd_int(w / 5, w / 2), sh = rnd_int(h / 5, h / 2);
                int x0 = rnd_int(0, w - sw), y0 = rnd_int(0, h - sh), c, hue = rnd_int(0, 5);
                unsigned char col[3];
                for (c = 0; c < 3; c++) col[c] = (unsigned char)rnd_int(0, 60);
                col[hue % 3] = (unsigned char)rnd_int(200, 255);
                if (hue >= 3) col[(hue + 1) % 3] = (unsigned char)rnd_int(150, 255);
                for (y = 0; y < h; y++)
                    for (x = 0; x < w; x++) {
                        if (!inside(k, x, y, x0, y0, sw, sh)) continue;
                        for (c = 0; c < 3; c++) {
                            int v = col[c] + rnd_int(-12, 12);
                            rgb[((size_t)y * w + x) * 3 + c] = (unsigned char)(v < 0 ? 0 : v > 255 ? 255 : v);
                        }
                        mask[(size_t)y * w + x] = 255;
                    }
            }
        }
        snprintf(path, sizeof path, "%s/images/%03d.png", argv[1], i);
        if (write_png(path, rgb, w, h, 3)) return 1;
        if (forged) {
            snprintf(path, sizeof path, "%s/masks/%03d.png", argv[1], i);
            if (write_png(path, mask, w, h, 1)) return 1;
        }
        free(rgb);
        free(mask);
    }
    for (i = 0; i < n_photos; i++) loupe_image_free(&photos[i]);
    return 0;
}
