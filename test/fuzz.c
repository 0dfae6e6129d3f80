/* fuzz.c - libFuzzer targets for everything loupe.c reads from outside.
 *
 * One source, four targets chosen at compile time (`make fuzz` builds them with
 * clang -fsanitize=fuzzer,address,undefined):
 *   -DFUZZ_PNG, -DFUZZ_JPEG, -DFUZZ_PPM   one image decoder, then a resize of the result
 *   -DFUZZ_WEIGHTS                        the weight-file loader on bytes in memory; some
 *                                         files that load are also run through a forward
 *                                         pass, so validation must make every accepted
 *                                         header safe to compute with
 * A decoder must either succeed with a complete image or fail with a message and an
 * empty image; anything else aborts the run. */
#define LOUPE_NO_MAIN
#include "../loupe.c"

#include <assert.h>

/* Small enough that a hostile header cannot make one run slow or huge. */
#define FUZZ_MAX_PIXELS (1u << 22)
#define FUZZ_RESIZE 112
/* Weight files are copied to memory with this alignment, as a loader's caller would. */
#define FUZZ_ALIGN 64
/* Largest model the weights target will run forward (keeps runs fast), and the share
 * of loadable inputs it runs forward: one in FUZZ_FORWARD_EVERY, picked by a hash of
 * the input so that every run of the same input does the same thing. */
#define FUZZ_MAX_FORWARD_BYTES (64u << 20)
#define FUZZ_FORWARD_EVERY 16u

#if defined(FUZZ_PNG)
#define FUZZ_DECODE png_decode
#elif defined(FUZZ_JPEG)
#define FUZZ_DECODE jpeg_decode
#elif defined(FUZZ_PPM)
#define FUZZ_DECODE ppm_decode
#elif !defined(FUZZ_WEIGHTS)
#error "define one of FUZZ_PNG, FUZZ_JPEG, FUZZ_PPM, FUZZ_WEIGHTS"
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#ifdef FUZZ_WEIGHTS
/* FNV-1a over the input: a deterministic coin for the forward pass. */
static uint32_t fuzz_hash(const uint8_t *data, size_t size)
{
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < size; i++) h = (h ^ data[i]) * 16777619u;
    return h;
}
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[512] = "";
#ifdef FUZZ_WEIGHTS
    unsigned char *raw = malloc(size + FUZZ_ALIGN), *al;
    loupe_model *m;
    if (!raw) return 0;
    al = raw + (FUZZ_ALIGN - (uintptr_t)raw % FUZZ_ALIGN) % FUZZ_ALIGN;
    memcpy(al, data, size);
    m = loupe_model_load_memory(al, size, err, sizeof err);
    assert(m || err[0]);
    if (m && fuzz_hash(data, size) % FUZZ_FORWARD_EVERY == 0) {
        loupe_session *s = loupe_session_new(m, err, sizeof err);
        size_t n = 3 * (size_t)m->cfg.image_size * m->cfg.image_size;
        float *px = calloc(n, sizeof *px);
        if (s && px && s->bytes < FUZZ_MAX_FORWARD_BYTES) {
            int rc = loupe_forward(s, px, err, sizeof err);
            assert(rc == 0);
            rc = loupe_postprocess(s, 7, 5, 0.5f, NULL, NULL, err, sizeof err);
            assert(rc == 0);
        }
        free(px);
        loupe_session_free(s);
    }
    loupe_model_free(m);
    free(raw);
#else
    loupe_image img;
    memset(&img, 0, sizeof img);
    if (FUZZ_DECODE(data, size, FUZZ_MAX_PIXELS, &img, err, sizeof err) == 0) {
        unsigned char *small = malloc(FUZZ_RESIZE * FUZZ_RESIZE * 3);
        assert(img.rgb && img.width > 0 && img.height > 0);
        assert((size_t)img.width * img.height <= FUZZ_MAX_PIXELS);
        if (small) assert(loupe_resize_rgb(img.rgb, img.width, img.height, small, FUZZ_RESIZE, FUZZ_RESIZE) == 0);
        free(small);
        loupe_image_free(&img);
    } else {
        assert(img.rgb == NULL && err[0]);
    }
#endif
    return 0;
}
