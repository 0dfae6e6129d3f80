/* fuzz.c - libFuzzer targets for everything loupe.c reads from outside.
 *
 * One source, four targets chosen at compile time (`make fuzz` builds them with
 * clang -fsanitize=fuzzer,address,undefined):
 *   -DFUZZ_PNG, -DFUZZ_JPEG, -DFUZZ_PPM   one image decoder, then a resize of the result
 *   -DFUZZ_WEIGHTS                        the weight-file loader on bytes in memory; some
 *                                         files that load are also run through a forward
 *                                         pass, so validation must make every accepted
 *                                         header safe to compute with
 * A weight input may stop short of the file size its header declares: the target pads
 * it with zero bytes up to that size (when small), so that the fuzzer works on the few
 * kilobytes of header and index (test/fuzz/weights/micro-index.bin) instead of mutating
 * the tensor data of a whole file; inputs that carry data keep it.
 * A decoder must either succeed with a complete image or fail with a message and an
 * empty image; anything else aborts the run.
 *
 * -DFUZZ_REPLAY builds instead a plain program (any compiler, no libFuzzer) that runs
 * files through the same checks: `fuzz_replay png|jpeg|ppm|weights FILE...`. `make test`
 * replays the inputs in test/fuzz/regress/ that once crashed this way. */
#define LOUPE_NO_MAIN
#include "../loupe.c"

#include <assert.h>

/* Built with AddressSanitizer (gcc defines the macro; clang answers __has_feature)? */
#if defined(__SANITIZE_ADDRESS__)
#define FUZZ_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FUZZ_ASAN 1
#endif
#endif
#ifdef FUZZ_ASAN
#include <sanitizer/asan_interface.h>
#endif

/* Small enough that a hostile header cannot make one run slow or huge: with libFuzzer's
 * comparison tracing in every pixel loop, a limit of 1 << 22 pixels held the JPEG target
 * to 30 runs a second, 1 << 18 to 50. Larger images take the same code paths. */
#define FUZZ_MAX_PIXELS (1u << 14)
/* Side of the square every decoded image is resized to (small: resizing dominated runs). */
#define FUZZ_RESIZE 24
/* Weight files are copied to memory with this alignment, as a loader's caller would. */
#define FUZZ_ALIGN 64
/* Largest model the weights target will run forward (keeps runs fast), and the share
 * of loadable inputs it runs forward: one in FUZZ_FORWARD_EVERY, picked by a hash of
 * the input so that every run of the same input does the same thing. */
#define FUZZ_MAX_FORWARD_BYTES (64u << 20)
#define FUZZ_FORWARD_EVERY 64u
/* Inputs shorter than their header's file size are zero-padded up to this size. */
#define FUZZ_MAX_PADDED (1u << 20)
#define FUZZ_FILE_SIZE_AT 32 /* where the header keeps the u64 file size */

typedef int (*fuzz_decoder)(const unsigned char *data, size_t size, size_t max_pixels, loupe_image *out,
                            char *err, size_t errsize);

#ifndef FUZZ_WEIGHTS
/* One decoder on the bytes, then a resize of the image it returns. */
static void fuzz_image(fuzz_decoder decode, const uint8_t *data, size_t size)
{
    char err[512] = "";
    loupe_image img;
    memset(&img, 0, sizeof img);
    if (decode(data, size, FUZZ_MAX_PIXELS, &img, err, sizeof err) == 0) {
        unsigned char *small = malloc(FUZZ_RESIZE * FUZZ_RESIZE * 3);
        assert(img.rgb && img.width > 0 && img.height > 0);
        assert((size_t)img.width * img.height <= FUZZ_MAX_PIXELS);
        if (small) assert(loupe_resize_rgb(img.rgb, img.width, img.height, small, FUZZ_RESIZE, FUZZ_RESIZE) == 0);
        free(small);
        loupe_image_free(&img);
    } else {
        assert(img.rgb == NULL && err[0]);
    }
}
#endif

#if defined(FUZZ_WEIGHTS) || defined(FUZZ_REPLAY)
/* FNV-1a over the input: a deterministic coin for the forward pass. */
static uint32_t fuzz_hash(const uint8_t *data, size_t size)
{
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < size; i++) h = (h ^ data[i]) * 16777619u;
    return h;
}

/* Returns an aligned buffer of n bytes, reused from run to run: a fresh allocation of a
 * few hundred kilobytes per run cost the weights target most of its time in page faults.
 * Under AddressSanitizer the bytes past n are poisoned, so reads beyond the file are still
 * caught. The buffer is never freed (it stays reachable). */
static unsigned char *fuzz_buffer(size_t n)
{
    static unsigned char *raw, *al;
    static size_t cap;
    if (!raw || n > cap) {
        free(raw);
        cap = 0;
        if (!(raw = malloc(n + FUZZ_ALIGN))) return NULL;
        cap = n;
        al = raw + (FUZZ_ALIGN - (uintptr_t)raw % FUZZ_ALIGN) % FUZZ_ALIGN;
    }
#ifdef FUZZ_ASAN
    ASAN_UNPOISON_MEMORY_REGION(al, n);
    ASAN_POISON_MEMORY_REGION(al + n, cap - n);
#endif
    return al;
}

/* The loader on the bytes (zero-padded to the size the header declares); a share of
 * the models it accepts run one forward pass and the post-processing. */
static void fuzz_weights(const uint8_t *data, size_t size)
{
    char err[512] = "";
    size_t padded = size;
    unsigned char *al;
    loupe_model *m;
    if (size >= WEIGHTS_HEADER_BYTES) {
        uint64_t declared = rd_u64(data + FUZZ_FILE_SIZE_AT);
        if (declared > size && declared <= FUZZ_MAX_PADDED) padded = (size_t)declared;
    }
    if (!(al = fuzz_buffer(padded))) return;
    memcpy(al, data, size);
    memset(al + size, 0, padded - size);
    m = loupe_model_load_memory(al, padded, err, sizeof err);
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
}
#endif

#ifdef FUZZ_REPLAY
/* Reads a whole file into memory; NULL if it cannot. */
static unsigned char *fuzz_read(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    long n;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
        (buf = malloc((size_t)n + 1)) != NULL && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    *size = buf ? (size_t)n : 0;
    fclose(f);
    return buf;
}

int main(int argc, char **argv)
{
    const char *target = argc > 1 ? argv[1] : "";
    int i, failed = 0;
    if (argc < 3 || (strcmp(target, "png") && strcmp(target, "jpeg") && strcmp(target, "ppm") &&
                     strcmp(target, "weights"))) {
        fprintf(stderr, "usage: fuzz_replay png|jpeg|ppm|weights FILE...\n");
        return 2;
    }
    for (i = 2; i < argc; i++) {
        size_t size;
        unsigned char *data = fuzz_read(argv[i], &size);
        if (!data) {
            fprintf(stderr, "fuzz_replay: %s: cannot read\n", argv[i]);
            failed++;
            continue;
        }
        if (!strcmp(target, "png")) fuzz_image(png_decode, data, size);
        else if (!strcmp(target, "jpeg")) fuzz_image(jpeg_decode, data, size);
        else if (!strcmp(target, "ppm")) fuzz_image(ppm_decode, data, size);
        else fuzz_weights(data, size);
        free(data);
    }
    /* a failed check aborts before this line */
    printf("fuzz_replay %s: %d passed, %d failed\n", target, argc - 2 - failed, failed);
    return failed != 0;
}
#else
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
#if defined(FUZZ_PNG)
    fuzz_image(png_decode, data, size);
#elif defined(FUZZ_JPEG)
    fuzz_image(jpeg_decode, data, size);
#elif defined(FUZZ_PPM)
    fuzz_image(ppm_decode, data, size);
#elif defined(FUZZ_WEIGHTS)
    fuzz_weights(data, size);
#else
#error "define one of FUZZ_PNG, FUZZ_JPEG, FUZZ_PPM, FUZZ_WEIGHTS (or FUZZ_REPLAY)"
#endif
    return 0;
}
#endif
