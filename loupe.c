/* loupe.c - Loupe (arXiv 2506.16819) forgery detection and localization in C99.
 *
 * One file, read top to bottom: the model first (its weights, the kernels it is built
 * from, then its modules in the order an image passes through them), then training,
 * then the machinery around them.
 *   1. utilities            errors, the activation arena, threads
 *   2. weights              the versioned flat weight file, mmap, validation, binding
 *   3. kernels              matmul, norms, activations, attention, convolutions, sampling;
 *                           sessions (one planned arena for a forward pass's activations)
 *   4. backbone             Perception Encoder ViT (PE-Core-L14-336), each module with
 *                           its backward twin (training tapes, gradient views)
 *   5. classifier           global MLP, patch MLP, fuser, their backward; LoupeClsLoss
 *   6. segmentor            feature pyramid, Mask2Former pixel decoder, masked-attention decoder,
 *                           each module with its backward twin
 *   7. pre/post-processing  image to pixels; mask logits to a probability map and a binary mask
 *   8. training             LoupeSegLoss, the trainer of every stage (test-time
 *                           adaptation is one), AdamW, state files
 *   9. initialisation       upstream's from-scratch weights for any config (loupe init)
 *  10. image I/O            PNG, JPEG, PPM decoders, PIL-exact resize, PNG writer
 *  11. datasets, metrics    labelled datasets, upstream's training examples (masks
 *                           dithered, resized, patch labels), validation metrics
 *  12. CLI                  the `loupe` command (`loupe train`, `loupe eval`, `loupe init`)
 *
 * Tensors are float32 and row-major. Token sequences are [tokens][channels]; feature
 * maps are stored channels-last, [H*W][C], so that every 1x1 convolution and every
 * linear layer is the same matrix multiplication. Each model function is named after
 * the upstream PyTorch module it implements (Kamichanw/Loupe, transformers' Mask2Former).
 */
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE 1 /* glibc: madvise (trainers drop the model's pages they copied) */
#define _FILE_OFFSET_BITS 64 /* 64-bit off_t for fstat and mmap on 32-bit POSIX systems */
#include "loupe.h"

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <time.h>

/* POSIX systems get mmap for weights, directories as CLI inputs and a monotonic clock;
 * Windows maps the weight file with MapViewOfFile and lists directories with
 * FindFirstFile; elsewhere the weight file is read into memory and inputs are files. */
#if defined(__unix__) || defined(__APPLE__)
#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#define LOUPE_POSIX 1
#else
#define LOUPE_POSIX 0
#endif
#ifdef _WIN32
#define WIN32_LEAN_AND_MEAN /* no winsock: its bind() would clash with the weight binder */
#include <direct.h>
#include <io.h>
#include <windows.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

/* ========================================================================== */
/* 1. Utilities                                                               */
/* ========================================================================== */

/* Formats one error sentence into err (when given) and returns -1. */
static int fail(char *err, size_t errsize, const char *fmt, ...)
{
    if (err && errsize) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errsize, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* rename() that replaces an existing file everywhere (Windows' rename refuses to). */
static int replace_file(const char *from, const char *to)
{
#ifdef _WIN32
    return MoveFileExA(from, to, MOVEFILE_REPLACE_EXISTING) ? 0 : -1;
#else
    return rename(from, to);
#endif
}

/* Byte alignment of every arena block and of the arena itself (one cache line). */
#define ARENA_ALIGN 64

/* A bump allocator over one block. With base == NULL it only measures: the same
 * layout function first runs to count bytes, then again to hand out pointers. */
typedef struct arena {
    unsigned char *base;
    size_t used, cap;
} arena;

/* Takes n floats from the arena (NULL while measuring). */
static float *arena_floats(arena *a, size_t n)
{
    size_t bytes = (n * sizeof(float) + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
    float *p = a->base ? (float *)(void *)(a->base + a->used) : NULL;
    a->used += bytes;
    return p;
}

/* Takes n bytes from the arena (NULL while measuring). */
static unsigned char *arena_bytes(arena *a, size_t n)
{
    size_t bytes = (n + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;
    unsigned char *p = a->base ? a->base + a->used : NULL;
    a->used += bytes;
    return p;
}

/* Blocks of at least twice this size (the x86-64 and arm64 huge page, 2 MiB) start on
 * a multiple of it and ask Linux for transparent huge pages (madvise MADV_HUGEPAGE,
 * heeded when /sys/kernel/mm/transparent_hugepage/enabled is `madvise` or `always`):
 * the first touch of the full-size model's 234 MiB activation arena then costs about
 * 120 page faults instead of 60000 (`loupe -v` on one image: 80000 faults in all
 * before, 23000 after). The memory is the same; elsewhere the block is only aligned.
 * -DLOUPE_HUGE_PAGES=0 turns it off (to compare: `loupe -v` counts the faults). */
#define HUGE_PAGE_BYTES ((size_t)2 << 20)
#ifndef LOUPE_HUGE_PAGES
#define LOUPE_HUGE_PAGES 1
#endif

/* A fresh block's pages are touched once, one byte per 4 KiB, on the allocating thread
 * (LOUPE_PREFAULT, default 1): left to the forward, the first touches happen inside
 * parallel loops, where two threads' page faults contend for the kernel's locks. On a
 * 2-core Zen 4 VM, touching the full-size model's 222 MiB arena takes 24 ms and makes
 * the first forward 340 ms faster (2.60 s against 2.94 s; a warm forward 2.52 s).
 * -DLOUPE_PREFAULT=0 leaves the pages untouched until used, to compare. */
#ifndef LOUPE_PREFAULT
#define LOUPE_PREFAULT 1
#endif
static void prefault(unsigned char *p, size_t size)
{
#if LOUPE_PREFAULT
    size_t i;
    for (i = 0; i < size; i += 4096) p[i] = 0;
    if (size) p[size - 1] = 0;
#else
    (void)p;
    (void)size;
#endif
}

/* Allocates size bytes aligned to ARENA_ALIGN (big blocks: to HUGE_PAGE_BYTES, on huge
 * pages where the system offers them), its pages touched (prefault); *raw receives the
 * pointer to free. The contents are unspecified. */
static void *aligned_block(size_t size, void **raw)
{
    unsigned char *p, *q;
#if LOUPE_HUGE_PAGES && LOUPE_POSIX && defined(MADV_HUGEPAGE)
    if (size >= 2 * HUGE_PAGE_BYTES && size <= SIZE_MAX - HUGE_PAGE_BYTES) {
        p = malloc(size + HUGE_PAGE_BYTES);
        *raw = p;
        if (!p) return NULL;
        q = p + (HUGE_PAGE_BYTES - (uintptr_t)p % HUGE_PAGE_BYTES) % HUGE_PAGE_BYTES;
        madvise(q, size / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES, MADV_HUGEPAGE); /* a hint: failure is harmless */
        prefault(q, size);
        return q;
    }
#endif
    p = malloc(size + ARENA_ALIGN);
    *raw = p;
    if (!p) return NULL;
    q = p + (ARENA_ALIGN - (uintptr_t)p % ARENA_ALIGN) % ARENA_ALIGN;
    prefault(q, size);
    return q;
}

/* Number of threads OpenMP regions will use (1 without OpenMP). */
static int max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

#ifdef _OPENMP
static int parallel_ok(double work); /* section 3: whether a loop of that size forks threads */
#endif

/* Index of the calling thread inside a parallel region (0 without OpenMP). */
static int thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Wall-clock seconds from an arbitrary origin (for timings only). */
static double now_seconds(void)
{
#if LOUPE_POSIX
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#else
    return (double)clock() / CLOCKS_PER_SEC;
#endif
}

void loupe_set_threads(int n)
{
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
#else
    (void)n;
#endif
}

/* ========================================================================== */
/* 2. Weights: the flat weight file                                           */
/* ========================================================================== */
/* Layout (little-endian; tools/convert.py writes it, README "Weight file format"):
 *   64-byte header: magic "LOUPEWTS", u32 version, u32 n_hparams, u32 n_tensors,
 *                   u32 reserved, u64 data_offset, u64 file_size, 24 reserved bytes
 *   n_hparams x 48 bytes: char name[40] (NUL-padded), f64 value
 *   n_tensors index records: u16 name_len, u8 dtype, u8 ndim, name, u32 dims[ndim],
 *                            u64 offset, u64 nbytes
 *   tensor data, each tensor 64-byte aligned.
 * Version 1 files hold F32 tensors only. Version 2 adds two storages for weight
 * matrices (a tensor of shape [d0][d1]...[dn] is the matrix of rows = d0 and
 * cols = d1 x ... x dn values, row-major):
 *   BF16  rows x cols bfloat16 values (the upper 16 bits of the float32, rounded
 *         to nearest even), 2 bytes each;
 *   Q8    rows x cols8 int8 values, where cols8 is cols rounded up to a multiple of
 *         Q8_BLOCK (zero padding), followed by rows x cols8 / Q8_BLOCK float32
 *         scales: value (r, c) = q[r][c] * scale[r][c / Q8_BLOCK]. Each block of
 *         Q8_BLOCK consecutive values of a row is quantised symmetrically, scale =
 *         max|w| / 127, q = round-to-nearest-even(w / scale).
 * Everything else (norms, biases, embeddings, the depthwise kernels and the fuser)
 * stays F32: bind refuses it in any other dtype. The converter writes
 * version 1 when every tensor is F32, so older readers still load such files. */

#define WEIGHTS_MAGIC "LOUPEWTS"
#define WEIGHTS_MAGIC_LEN 8
#define WEIGHTS_VERSION 2
#define WEIGHTS_VERSION_F32_ONLY 1
/* Values per Q8 scale: small enough that one outlier spoils few values, large
 * enough that the scales add only 4 / 32 bytes per value (README "Smaller weight
 * files" has the measured choice); a multiple of the 8 values the packing converts
 * at once (gemm_load8_float). */
#define Q8_BLOCK 32
#define WEIGHTS_HEADER_BYTES 64
#define HPARAM_RECORD_BYTES 48
#define HPARAM_NAME_BYTES 40
#define TENSOR_ALIGN 64
#define MAX_TENSOR_DIMS 4
#define MAX_HPARAMS 4096
#define MAX_TENSORS 100000
#define MAX_NAME_LEN 1024

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1, DTYPE_Q8 = 2, DTYPE_COUNT };
static const char *const dtype_names[DTYPE_COUNT] = {"F32", "BF16", "Q8"};
static const unsigned dtype_sizes[DTYPE_COUNT] = {4, 2, 1};

#define LOUPE_PI 3.14159265358979323846
#define LOUPE_SQRT1_2 0.70710678118654752440
#define LOUPE_INV_SQRT_2PI 0.39894228040143267794

/* Limits that keep every size computation far from overflow. */
#define MAX_IMAGE_SIZE 4096
#define MAX_WIDTH 16384
#define MAX_LAYERS 1024
#define MAX_QUERIES 4096
#define MAX_CLS_LAYERS 8
#define SEG_SIZE 384 /* upstream post-processing resizes mask logits to 384x384 */

/* Where a model's bytes live, which decides how they are released. */
enum { WEIGHTS_MAPPED, WEIGHTS_READ, WEIGHTS_BORROWED };

typedef struct tensor_entry {
    const char *name; /* points into the mapped index, not NUL-terminated */
    int name_len, dtype, ndim;
    uint32_t dims[MAX_TENSOR_DIMS];
    uint64_t offset, nbytes;
} tensor_entry;

/* A weight matrix [rows][cols] as the file stores it (F32, BF16 or Q8, layout above).
 * gemm_nt_w reads it directly, converting one packed block at a time. */
typedef struct wmat {
    const void *data;    /* row 0: float, bfloat16 bits (uint16_t) or int8 values */
    const float *scale;  /* Q8: the scales of row 0 (ld / Q8_BLOCK per row); else NULL */
    size_t ld;           /* values from one row to the next (Q8: cols padded to blocks) */
    int dtype;
} wmat;

/* nn.Linear (weight [out][in], bias [out] or NULL) and norm (weight, bias) views. */
typedef struct linear_w { wmat w; const float *b; } linear_w;
typedef struct norm_w { const float *w, *b; } norm_w;

/* backbone.transformer.resblocks[i] */
typedef struct pe_block_w { norm_w ln_1, ln_2; linear_w qkv, out, fc, proj; } pe_block_w;
/* backbone.attn_pool */
typedef struct pe_pool_w { const float *probe; linear_w qkv, out; norm_w ln; linear_w fc, proj; } pe_pool_w;
/* classifier.{classifier,patch_classifier} */
typedef struct cls_head_w { linear_w layers[MAX_CLS_LAYERS]; } cls_head_w;
/* segmentor.fpn.scale_layers[i][j]: conv1 (ConvTranspose2d), its weight read in place
 * as a matrix [Cin][Cout*4], is absent (data NULL) for the max-pool block; dw holds
 * conv2 repacked [9][C]. */
typedef struct scale_block_w { linear_w conv1; const float *dw; norm_w norm; } scale_block_w;
/* segmentor.pixel_decoder.encoder.layers[i] */
typedef struct enc_layer_w {
    linear_w offsets, attn_weights, value, output;
    norm_w ln_self;
    linear_w cross_qkv, cross_out;
    norm_w ln_cross;
    linear_w fc1, fc2;
    norm_w ln_final;
} enc_layer_w;
/* segmentor.mask2former_decoder.decoder.layers[i] */
typedef struct dec_layer_w {
    linear_w q, k, v, o;
    norm_w ln_self;
    linear_w cross_qkv, cross_out;
    norm_w ln_cross;
    linear_w fc1, fc2;
    norm_w ln_final;
} dec_layer_w;

/* Everything the forward pass reads: views into the weight file plus a few
 * read-only tables derived once at load time. */
typedef struct loupe_weights {
    /* backbone */
    const float *class_embedding, *positional_embedding;
    wmat conv1;          /* patch embedding [W][3*P*P] */
    norm_w ln_pre, ln_post;
    pe_block_w *blocks;
    pe_pool_w pool;
    /* classifier */
    cls_head_w global_head, patch_head;
    const float *fuser;
    /* segmentor */
    scale_block_w fpn4[2], fpn2, fpn_half;
    const float *label_embedding[2];
    const float *level_embed;
    linear_w input_proj[3];
    norm_w input_gn[3];
    enc_layer_w *enc;
    linear_w mask_projection, adapter_1;
    norm_w adapter_gn, layer_1_gn;
    const float *layer_1; /* 3x3 conv repacked tap-major [9][F][F] */
    const float *query_embed, *query_feat, *dec_level_embed;
    dec_layer_w *dec;
    norm_w dec_ln;
    linear_w mask_embed[3], class_predictor;
} loupe_weights;

/* Tables that depend only on the configuration and the weights. */
typedef struct loupe_tables {
    float *rope_cos, *rope_sin;  /* [1+g*g][head_dim] PE RoPE-2D angles */
    float *enc_pos;              /* [T][F] pixel-decoder sine position + level embedding */
    float *dec_pos;              /* [T][D] decoder sine position embedding per level */
    float *ref_points;           /* [T][2] deformable-attention reference points (x, y) */
    int level_h[3], level_w[3], level_start[3], tokens;  /* levels g/2, g, 2g */
} loupe_tables;

struct loupe_model {
    loupe_config cfg;
    unsigned char *data; /* the whole file: mapped, read, or borrowed from the caller */
    size_t size;
    int storage;         /* WEIGHTS_MAPPED, WEIGHTS_READ or WEIGHTS_BORROWED */
    tensor_entry *entries;
    int n_entries;
    loupe_weights w;
    loupe_tables t;
    void *derived_raw; /* one block for repacked weights and tables */
    char path[512];
};

/* Lets the system drop the mapped file's pages from memory (they are read again from
 * the file if used): a trainer that copied the tensors it trains calls it, so the model
 * is not held twice. A no-op where the weights were read or borrowed. */
static void weights_release_pages(const loupe_model *m)
{
#if LOUPE_POSIX && defined(MADV_DONTNEED)
    if (m->storage == WEIGHTS_MAPPED) madvise(m->data, m->size, MADV_DONTNEED);
#else
    (void)m;
#endif
}

/* Little-endian readers for the header and index. */
static uint16_t rd_u16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t rd_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t rd_u64(const unsigned char *p) { return rd_u32(p) | (uint64_t)rd_u32(p + 4) << 32; }
static double rd_f64(const unsigned char *p)
{
    uint64_t u = rd_u64(p);
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* True when the host stores numbers little-endian, as the weight file does. */
static int host_is_little_endian(void)
{
    const uint32_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* -DLOUPE_MAP_POPULATE=1 fills the mapping at once: with MAP_POPULATE (Linux) mmap
 * reads the file (if not cached) and maps all its pages in one call instead of on
 * first touch during the forward (about 21000 faults for the full-size model with the
 * kernel's 64 KiB fault-around); elsewhere madvise MADV_WILLNEED starts reading ahead.
 * Off by default: the pages mapped by MAP_POPULATE are counted as faults too, so
 * `loupe -v` cannot tell the two apart, and the saving (the exception per fault) is
 * for a quiet machine's timing to show. */
#ifndef LOUPE_MAP_POPULATE
#define LOUPE_MAP_POPULATE 0
#endif
#if LOUPE_MAP_POPULATE && defined(MAP_POPULATE)
#define WEIGHTS_MAP_FLAGS MAP_POPULATE
#else
#define WEIGHTS_MAP_FLAGS 0
#endif

/* Maps (or reads) the whole file into memory. */
static int weights_map_file(loupe_model *m, const char *path, char *err, size_t errsize)
{
    FILE *f = fopen(path, "rb");
    if (!f) return fail(err, errsize, "%s: cannot open weight file: %s", path, strerror(errno));
#if LOUPE_POSIX
    {
        struct stat st;
        if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
            fclose(f);
            return fail(err, errsize, "%s: not a regular file", path);
        }
        if ((uint64_t)st.st_size > (uint64_t)SIZE_MAX) {
            fclose(f);
            return fail(err, errsize, "%s: file too large for this machine", path);
        }
        m->size = (size_t)st.st_size;
        if (m->size >= WEIGHTS_HEADER_BYTES) {
            void *p = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE | WEIGHTS_MAP_FLAGS, fileno(f), 0);
            if (p != MAP_FAILED) {
                m->data = p;
                m->storage = WEIGHTS_MAPPED;
#if LOUPE_MAP_POPULATE && !defined(MAP_POPULATE) && defined(MADV_WILLNEED)
                madvise(p, m->size, MADV_WILLNEED); /* a hint: failure is harmless */
#endif
                fclose(f);
                return 0;
            }
        }
    }
#elif defined(_WIN32)
    {
        /* Windows: a read-only view of the whole file (the view keeps the mapping alive) */
        HANDLE file = (HANDLE)_get_osfhandle(_fileno(f)), map;
        LARGE_INTEGER size;
        if (GetFileSizeEx(file, &size) && (uint64_t)size.QuadPart <= (uint64_t)SIZE_MAX &&
            (size_t)size.QuadPart >= WEIGHTS_HEADER_BYTES &&
            (map = CreateFileMappingA(file, NULL, PAGE_READONLY, 0, 0, NULL)) != NULL) {
            void *p = MapViewOfFile(map, FILE_MAP_READ, 0, 0, 0);
            CloseHandle(map);
            if (p) {
                m->data = p;
                m->size = (size_t)size.QuadPart;
                m->storage = WEIGHTS_MAPPED;
                fclose(f);
                return 0;
            }
        }
    }
#endif
    {
        /* Portable fallback: read the file once into memory, in chunks. */
        size_t cap = 1 << 20, n = 0, got;
        unsigned char *buf = malloc(cap);
        if (!buf) { fclose(f); return fail(err, errsize, "%s: out of memory", path); }
        while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
            n += got;
            if (n == cap) {
                unsigned char *nb = cap > SIZE_MAX / 2 ? NULL : realloc(buf, cap * 2);
                if (!nb) { free(buf); fclose(f); return fail(err, errsize, "%s: out of memory", path); }
                buf = nb;
                cap *= 2;
            }
        }
        if (ferror(f)) { free(buf); fclose(f); return fail(err, errsize, "%s: read error", path); }
        fclose(f);
        m->data = buf;
        m->size = n;
        m->storage = WEIGHTS_READ;
    }
    return 0;
}

/* Looks up a hyperparameter by name; *found tells whether it exists. */
static double header_hparam(const unsigned char *hp, uint32_t n, const char *name, int *found)
{
    uint32_t i;
    for (i = 0; i < n; i++) {
        const unsigned char *r = hp + (size_t)i * HPARAM_RECORD_BYTES;
        if (strncmp((const char *)r, name, HPARAM_NAME_BYTES) == 0) {
            *found = 1;
            return rd_f64(r + HPARAM_NAME_BYTES);
        }
    }
    *found = 0;
    return 0.0;
}

/* Cols of a Q8 row rounded up to whole blocks. */
static uint64_t q8_padded(uint64_t cols) { return (cols + Q8_BLOCK - 1) / Q8_BLOCK * Q8_BLOCK; }

/* Bytes of a tensor of rows x cols values stored as dtype (layout at the top). */
static uint64_t tensor_bytes(int dtype, uint64_t rows, uint64_t cols)
{
    uint64_t cols8 = q8_padded(cols);
    if (dtype == DTYPE_Q8) return rows * cols8 + rows * (cols8 / Q8_BLOCK) * sizeof(float);
    return rows * cols * dtype_sizes[dtype];
}

/* Orders tensor entries by offset (for the overlap check). */
static int entry_offset_cmp(const void *a, const void *b)
{
    const tensor_entry *x = a, *y = b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Validates the header and the tensor index against the file size. */
static int weights_parse(loupe_model *m, char *err, size_t errsize)
{
    const unsigned char *d = m->data;
    const char *path = m->path;
    uint32_t version, n_hp, n_t, i;
    uint64_t data_offset, file_size;
    size_t pos;
    tensor_entry *sorted;

    if (m->size == 0) return fail(err, errsize, "%s: file is empty", path);
    if (m->size >= WEIGHTS_MAGIC_LEN && memcmp(d, WEIGHTS_MAGIC, WEIGHTS_MAGIC_LEN) == 0 && m->size < WEIGHTS_HEADER_BYTES)
        return fail(err, errsize, "%s: file is %llu bytes, shorter than the %d-byte header (truncated)", path,
                    (unsigned long long)m->size, WEIGHTS_HEADER_BYTES);
    if (m->size < WEIGHTS_HEADER_BYTES || memcmp(d, WEIGHTS_MAGIC, WEIGHTS_MAGIC_LEN) != 0)
        return fail(err, errsize, "%s: not a loupe weight file (bad magic; convert checkpoints with tools/convert.py)", path);
    version = rd_u32(d + 8);
    if (version == 0 || version > WEIGHTS_VERSION)
        return fail(err, errsize, "%s: weight file format version %u is not supported (this build reads versions 1 to %d)",
                    path, (unsigned)version, WEIGHTS_VERSION);
    n_hp = rd_u32(d + 12);
    n_t = rd_u32(d + 16);
    data_offset = rd_u64(d + 24);
    file_size = rd_u64(d + 32);
    if (file_size != (uint64_t)m->size)
        return fail(err, errsize, "%s: file is %llu bytes but its header says %llu (truncated or padded)", path,
                    (unsigned long long)m->size, (unsigned long long)file_size);
    if (n_hp > MAX_HPARAMS || n_t == 0 || n_t > MAX_TENSORS)
        return fail(err, errsize, "%s: header counts are implausible (%u hyperparameters, %u tensors)", path,
                    (unsigned)n_hp, (unsigned)n_t);
    if (data_offset % TENSOR_ALIGN != 0 || data_offset > file_size)
        return fail(err, errsize, "%s: data offset %llu is not 64-byte aligned or lies past the end", path,
                    (unsigned long long)data_offset);
    pos = WEIGHTS_HEADER_BYTES + (size_t)n_hp * HPARAM_RECORD_BYTES;
    if (pos > data_offset)
        return fail(err, errsize, "%s: hyperparameter table overlaps the tensor data", path);

    m->entries = calloc(n_t, sizeof *m->entries);
    if (!m->entries) return fail(err, errsize, "%s: out of memory", path);
    m->n_entries = (int)n_t;
    for (i = 0; i < n_t; i++) {
        tensor_entry *e = &m->entries[i];
        uint64_t numel = 1;
        int k;
        if (pos + 4 > data_offset) return fail(err, errsize, "%s: tensor index runs into the data (entry %u)", path, (unsigned)i);
        e->name_len = rd_u16(d + pos);
        e->dtype = d[pos + 2];
        e->ndim = d[pos + 3];
        pos += 4;
        if (e->name_len == 0 || e->name_len > MAX_NAME_LEN || e->ndim < 1 || e->ndim > MAX_TENSOR_DIMS ||
            pos + (size_t)e->name_len + 4u * (size_t)e->ndim + 16 > data_offset)
            return fail(err, errsize, "%s: tensor index entry %u is malformed", path, (unsigned)i);
        e->name = (const char *)d + pos;
        pos += (size_t)e->name_len;
        for (k = 0; k < e->ndim; k++, pos += 4) {
            e->dims[k] = rd_u32(d + pos);
            if (e->dims[k] == 0 || e->dims[k] > (1u << 30))
                return fail(err, errsize, "%s: tensor %.*s has an invalid dimension", path, e->name_len, e->name);
            numel *= e->dims[k];
            if (numel > ((uint64_t)1 << 40))
                return fail(err, errsize, "%s: tensor %.*s is implausibly large", path, e->name_len, e->name);
        }
        e->offset = rd_u64(d + pos);
        e->nbytes = rd_u64(d + pos + 8);
        pos += 16;
        if (e->dtype >= DTYPE_COUNT)
            return fail(err, errsize, "%s: tensor %.*s has unknown dtype code %d (written by a newer converter?)", path,
                        e->name_len, e->name, e->dtype);
        if (e->dtype != DTYPE_F32 && version == WEIGHTS_VERSION_F32_ONLY)
            return fail(err, errsize, "%s: tensor %.*s is %s, which format version %d does not define", path,
                        e->name_len, e->name, dtype_names[e->dtype], WEIGHTS_VERSION_F32_ONLY);
        if (e->nbytes != tensor_bytes(e->dtype, e->dims[0], numel / e->dims[0]))
            return fail(err, errsize, "%s: tensor %.*s: %llu bytes do not match its %s shape", path, e->name_len, e->name,
                        (unsigned long long)e->nbytes, dtype_names[e->dtype]);
        if (e->offset % TENSOR_ALIGN != 0 || e->offset < data_offset || e->offset > file_size ||
            e->nbytes > file_size - e->offset)
            return fail(err, errsize, "%s: tensor %.*s points outside the file or is misaligned", path, e->name_len,
                        e->name);
    }
    /* No two tensors may share bytes. */
    sorted = malloc(n_t * sizeof *sorted);
    if (!sorted) return fail(err, errsize, "%s: out of memory", path);
    memcpy(sorted, m->entries, n_t * sizeof *sorted);
    qsort(sorted, n_t, sizeof *sorted, entry_offset_cmp);
    for (i = 1; i < n_t; i++)
        if (sorted[i - 1].offset + sorted[i - 1].nbytes > sorted[i].offset) {
            int rc = fail(err, errsize, "%s: tensors %.*s and %.*s overlap", path, sorted[i - 1].name_len,
                          sorted[i - 1].name, sorted[i].name_len, sorted[i].name);
            free(sorted);
            return rc;
        }
    free(sorted);
    return 0;
}

/* Reads the hyperparameters this version needs and checks they are supported. */
static int weights_config(loupe_model *m, char *err, size_t errsize)
{
    static const struct { const char *name; size_t offset; double lo, hi; } ints[] = {
#define HP(field, lo, hi) {#field, offsetof(loupe_config, field), lo, hi}
        HP(image_size, 14, MAX_IMAGE_SIZE), HP(patch_size, 1, 512), HP(width, 8, MAX_WIDTH),
        HP(layers, 1, MAX_LAYERS), HP(heads, 1, 1024), HP(mlp_width, 1, 8 * MAX_WIDTH),
        HP(pool_heads, 1, 1024), HP(pool_mlp_width, 1, 8 * MAX_WIDTH), HP(cls_hidden, 1, 8 * MAX_WIDTH),
        HP(cls_layers, 1, MAX_CLS_LAYERS), HP(feature_size, 32, MAX_WIDTH),
        HP(mask_feature_size, 1, MAX_WIDTH), HP(hidden_dim, 1, MAX_WIDTH), HP(m2f_heads, 1, 1024),
        HP(enc_layers, 0, MAX_LAYERS), HP(enc_ffn, 1, 8 * MAX_WIDTH), HP(dec_layers, 1, MAX_LAYERS),
        HP(dec_ffn, 1, 8 * MAX_WIDTH), HP(num_queries, 1, MAX_QUERIES), HP(num_labels, 1, 1024),
        HP(gn_groups, 1, MAX_WIDTH), HP(deform_levels, 3, 3), HP(deform_points, 1, 64),
#undef HP
    };
    static const struct { const char *name; size_t offset; } reals[] = {
        {"ln_eps", offsetof(loupe_config, ln_eps)}, {"fpn_ln_eps", offsetof(loupe_config, fpn_ln_eps)},
        {"gn_eps", offsetof(loupe_config, gn_eps)}, {"rope_theta", offsetof(loupe_config, rope_theta)},
    };
    const unsigned char *hp = m->data + WEIGHTS_HEADER_BYTES;
    uint32_t n_hp = rd_u32(m->data + 12);
    loupe_config *c = &m->cfg;
    size_t i;
    int found;
    for (i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        double v = header_hparam(hp, n_hp, ints[i].name, &found);
        if (!found) return fail(err, errsize, "%s: hyperparameter %s is missing", m->path, ints[i].name);
        if (!(v >= ints[i].lo && v <= ints[i].hi) || v != floor(v))
            return fail(err, errsize, "%s: hyperparameter %s = %g is outside the supported range %g..%g", m->path,
                        ints[i].name, v, ints[i].lo, ints[i].hi);
        *(int *)(void *)((char *)c + ints[i].offset) = (int)v;
    }
    for (i = 0; i < sizeof reals / sizeof reals[0]; i++) {
        double v = header_hparam(hp, n_hp, reals[i].name, &found);
        if (!found) return fail(err, errsize, "%s: hyperparameter %s is missing", m->path, reals[i].name);
        if (!(v > 0 && v < 1e9)) return fail(err, errsize, "%s: hyperparameter %s = %g is invalid", m->path, reals[i].name, v);
        *(float *)(void *)((char *)c + reals[i].offset) = (float)v;
    }
    if (c->image_size % c->patch_size) return fail(err, errsize, "%s: image_size must be a multiple of patch_size", m->path);
    c->grid = c->image_size / c->patch_size;
    if (c->grid < 2) return fail(err, errsize, "%s: the patch grid must be at least 2x2", m->path);
    if (c->width % c->heads || (c->width / c->heads) % 4)
        return fail(err, errsize, "%s: width / heads must be a multiple of 4 for RoPE-2D", m->path);
    if (c->width % c->pool_heads) return fail(err, errsize, "%s: width must be divisible by pool_heads", m->path);
    if (c->feature_size != c->hidden_dim || c->feature_size != c->mask_feature_size)
        return fail(err, errsize, "%s: feature_size, hidden_dim and mask_feature_size must be equal", m->path);
    if (c->feature_size % c->m2f_heads || c->feature_size % c->gn_groups || c->feature_size % 4)
        return fail(err, errsize, "%s: feature_size must be divisible by m2f_heads, gn_groups and 4", m->path);
    return 0;
}

/* Binds weight views by name with shape checks; remembers the first error. */
typedef struct binder {
    const loupe_model *m;
    char *err;
    size_t errsize;
    int failed;
} binder;

/* The float32 whose upper half is the bfloat16 h (lower half zero). */
static float bf16_to_float(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* A float32 matrix whose rows are ld values apart. */
static wmat wmat_f32(const float *data, size_t ld)
{
    wmat m;
    m.data = data;
    m.scale = NULL;
    m.ld = ld;
    m.dtype = DTYPE_F32;
    return m;
}

/* The matrix m from its row r on (e.g. the key rows of a packed q/k/v projection). */
static wmat wmat_rows(wmat m, size_t r)
{
    switch (m.dtype) {
    case DTYPE_BF16: m.data = (const uint16_t *)m.data + r * m.ld; break;
    case DTYPE_Q8:
        m.data = (const int8_t *)m.data + r * m.ld;
        m.scale += r * (m.ld / Q8_BLOCK);
        break;
    default: m.data = (const float *)m.data + r * m.ld;
    }
    return m;
}

/* Converts rows r0..r0+nr and columns c0..c0+nc of m to float32 in dst (rows ldd apart). */
static void wmat_to_float(wmat m, size_t r0, int nr, size_t c0, int nc, float *dst, size_t ldd)
{
    int i, j;
    for (i = 0; i < nr; i++) {
        size_t row = r0 + (size_t)i;
        float *d = dst + (size_t)i * ldd;
        if (m.dtype == DTYPE_BF16) {
            const uint16_t *h = (const uint16_t *)m.data + row * m.ld + c0;
            for (j = 0; j < nc; j++) d[j] = bf16_to_float(h[j]);
        } else if (m.dtype == DTYPE_Q8) {
            const int8_t *q = (const int8_t *)m.data + row * m.ld;
            const float *scale = m.scale + row * (m.ld / Q8_BLOCK);
            size_t c = c0, end = c0 + (size_t)nc;
            while (c < end) { /* one block (or the part of it in range) at a time */
                size_t stop = (c / Q8_BLOCK + 1) * Q8_BLOCK;
                float sc = scale[c / Q8_BLOCK];
                if (stop > end) stop = end;
                for (; c < stop; c++) d[c - c0] = (float)q[c] * sc;
            }
        } else {
            memcpy(d, (const float *)m.data + row * m.ld + c0, (size_t)nc * sizeof *d);
        }
    }
}

/* The number of values of a tensor. */
static size_t entry_numel(const tensor_entry *e)
{
    size_t n = 1;
    int k;
    for (k = 0; k < e->ndim; k++) n *= e->dims[k];
    return n;
}

/* A tensor of the file as a weight matrix [dims[0]][the other dimensions]. */
static wmat entry_matrix(const loupe_model *m, const tensor_entry *e)
{
    size_t rows = e->dims[0], cols = entry_numel(e) / rows;
    wmat w = wmat_f32((const float *)(const void *)(m->data + e->offset), cols);
    w.dtype = e->dtype;
    if (e->dtype == DTYPE_Q8) {
        w.ld = (size_t)q8_padded(cols);
        w.scale = (const float *)(const void *)(m->data + e->offset + rows * w.ld);
    }
    return w;
}

/* The tensor called name if its shape is exactly dims (trailing zeros = fewer
 * dimensions), or NULL after recording an error. */
static const tensor_entry *bind_entry(binder *b, const int dims[MAX_TENSOR_DIMS], const char *name)
{
    char want[96], got[96];
    int ndim = dims[3] ? 4 : dims[2] ? 3 : dims[1] ? 2 : 1, i, k;
    if (b->failed) return NULL;
    for (i = 0; i < b->m->n_entries; i++) {
        const tensor_entry *e = &b->m->entries[i];
        int same = e->ndim == ndim;
        if ((size_t)e->name_len != strlen(name) || memcmp(e->name, name, (size_t)e->name_len) != 0) continue;
        for (k = 0; same && k < ndim; k++) same = e->dims[k] == (uint32_t)dims[k];
        if (!same) {
            int n = 0, wn = 0;
            for (k = 0; k < e->ndim; k++) n += snprintf(got + n, sizeof got - (size_t)n, k ? ", %u" : "%u", (unsigned)e->dims[k]);
            for (k = 0; k < ndim; k++) wn += snprintf(want + wn, sizeof want - (size_t)wn, k ? ", %d" : "%d", dims[k]);
            b->failed = 1;
            fail(b->err, b->errsize, "%s: tensor %s has shape [%s], expected [%s]", b->m->path, name, got, want);
            return NULL;
        }
        return e;
    }
    b->failed = 1;
    fail(b->err, b->errsize, "%s: tensor %s is missing", b->m->path, name);
    return NULL;
}

/* Returns the F32 tensor called name (printf format) if its shape is exactly
 * d0..d3 (trailing zeros = fewer dimensions), or NULL after recording an error. */
static const float *bind(binder *b, int d0, int d1, int d2, int d3, const char *fmt, ...)
{
    char name[256];
    const int dims[MAX_TENSOR_DIMS] = {d0, d1, d2, d3};
    const tensor_entry *e;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    if (!(e = bind_entry(b, dims, name))) return NULL;
    if (e->dtype != DTYPE_F32) {
        b->failed = 1;
        fail(b->err, b->errsize, "%s: tensor %s is %s; only weight matrices may be stored as BF16 or Q8", b->m->path,
             name, dtype_names[e->dtype]);
        return NULL;
    }
    return (const float *)(const void *)(b->m->data + e->offset);
}

/* Returns the weight matrix called prefix + suffix (any storage) of shape d0..d3,
 * viewed as [d0][d1 x d2 x d3]; data NULL after recording an error. Not variadic: tcc
 * passes the arguments of a variadic function that returns a structure wrongly. */
static wmat bind_matrix(binder *b, int d0, int d1, int d2, int d3, const char *prefix, const char *suffix)
{
    char name[256];
    const int dims[MAX_TENSOR_DIMS] = {d0, d1, d2, d3};
    const tensor_entry *e;
    snprintf(name, sizeof name, "%s%s", prefix, suffix);
    e = bind_entry(b, dims, name);
    return e ? entry_matrix(b->m, e) : wmat_f32(NULL, 0);
}

/* The float32 values of a weight matrix [rows][cols]: the file's own when it is F32,
 * else converted into a malloc'd copy that *copy receives (free it after use). NULL
 * when out of memory. Used where weights are copied or repacked, never per image. */
static const float *wmat_values(wmat m, size_t rows, size_t cols, float **copy)
{
    size_t r;
    *copy = NULL;
    if (m.dtype == DTYPE_F32) return m.data;
    if (!(*copy = malloc(rows * cols * sizeof **copy))) return NULL;
    for (r = 0; r < rows; r++) wmat_to_float(m, r, 1, 0, (int)cols, *copy + r * cols, cols);
    return *copy;
}

/* Shorthands: a linear layer (weight [out][in], optional bias [out]) and a norm. */
static linear_w bind_linear(binder *b, int out, int in, int has_bias, const char *prefix)
{
    linear_w l;
    l.w = bind_matrix(b, out, in, 0, 0, prefix, ".weight");
    l.b = has_bias ? bind(b, out, 0, 0, 0, "%s.bias", prefix) : NULL;
    return l;
}
static norm_w bind_norm(binder *b, int n, const char *prefix)
{
    norm_w l;
    l.w = bind(b, n, 0, 0, 0, "%s.weight", prefix);
    l.b = bind(b, n, 0, 0, 0, "%s.bias", prefix);
    return l;
}
/* nn.MultiheadAttention: packed in_proj_weight [3E][E] and out_proj. */
static void bind_mha(binder *b, int e, const char *prefix, linear_w *qkv, linear_w *out)
{
    char name[256];
    qkv->w = bind_matrix(b, 3 * e, e, 0, 0, prefix, ".in_proj_weight");
    qkv->b = bind(b, 3 * e, 0, 0, 0, "%s.in_proj_bias", prefix);
    snprintf(name, sizeof name, "%s.out_proj", prefix);
    *out = bind_linear(b, e, e, 1, name);
}

/* A 1x1 convolution viewed as a linear layer: weight [out][in][1][1]. */
static linear_w bind_conv1x1(binder *b, int out, int in, int has_bias, const char *prefix)
{
    linear_w l;
    l.w = bind_matrix(b, out, in, 1, 1, prefix, ".weight");
    l.b = has_bias ? bind(b, out, 0, 0, 0, "%s.bias", prefix) : NULL;
    return l;
}

/* Repacks a depthwise 3x3 kernel [C][1][3][3] into tap-major [9][C]. */
static void repack_depthwise(float *dst, const float *src, int c)
{
    int ch, t;
    for (t = 0; t < 9; t++)
        for (ch = 0; ch < c; ch++) dst[(size_t)t * c + ch] = src[(size_t)ch * 9 + t];
}

/* Repacks a 3x3 convolution [Co][Ci][3][3] into tap-major [9][Co][Ci]. */
static void repack_conv3x3(float *dst, const float *src, int co, int ci)
{
    int o, i, t;
    for (t = 0; t < 9; t++)
        for (o = 0; o < co; o++)
            for (i = 0; i < ci; i++) dst[((size_t)t * co + o) * ci + i] = src[((size_t)o * ci + i) * 9 + t];
}

/* Binds one ScaleBlock (segmentor.fpn.scale_layers[i][j]); conv1 absent for max-pool. */
static void bind_scale_block(binder *b, scale_block_w *s, int w, int transposed, const char *prefix, const float **raw_dw)
{
    char name[256];
    if (transposed) {
        s->conv1.w = bind_matrix(b, w, w, 2, 2, prefix, ".conv1.weight");
        s->conv1.b = bind(b, w, 0, 0, 0, "%s.conv1.bias", prefix);
    } else {
        s->conv1.w = wmat_f32(NULL, 0);
        s->conv1.b = NULL;
    }
    *raw_dw = bind(b, w, 1, 3, 3, "%s.conv2.weight", prefix);
    snprintf(name, sizeof name, "%s.norm", prefix);
    s->norm = bind_norm(b, w, name);
}

/* Derived sizes of the Mask2Former levels [g/2, g, 2g] (low to high resolution). */
static void level_sizes(const loupe_config *c, loupe_tables *t)
{
    int g = c->grid, l;
    t->level_h[0] = t->level_w[0] = g / 2;
    t->level_h[1] = t->level_w[1] = g;
    t->level_h[2] = t->level_w[2] = 2 * g;
    t->tokens = 0;
    for (l = 0; l < 3; l++) {
        t->level_start[l] = t->tokens;
        t->tokens += t->level_h[l] * t->level_w[l];
    }
}

static void sine_position_embedding(float *out, int ld, int h, int w, int num_pos_feats);

/* Fills the read-only tables: RoPE angles, position embeddings, reference points. */
static void tables_fill(loupe_model *m, const float *level_embed)
{
    const loupe_config *c = &m->cfg;
    loupe_tables *t = &m->t;
    int g = c->grid, dh = c->width / c->heads, half = dh / 2, f = c->feature_size;
    int tok, i, l, y, x;
    /* RoPE-2D (Rope2D.update_grid): per head [x-axis angles (dh/2), y-axis angles (dh/2)],
     * each frequency used for a pair of channels; the cls token keeps angle 0. */
    for (tok = 0; tok <= g * g; tok++) {
        int py = tok ? (tok - 1) / g + 1 : 0, px = tok ? (tok - 1) % g + 1 : 0;
        for (i = 0; i < half; i++) {
            float freq = 1.0f / powf(c->rope_theta, (float)(2 * (i / 2)) / (float)half);
            float ax = (float)px * freq, ay = (float)py * freq;
            t->rope_cos[(size_t)tok * dh + i] = tok ? cosf(ax) : 1.0f;
            t->rope_sin[(size_t)tok * dh + i] = tok ? sinf(ax) : 0.0f;
            t->rope_cos[(size_t)tok * dh + half + i] = tok ? cosf(ay) : 1.0f;
            t->rope_sin[(size_t)tok * dh + half + i] = tok ? sinf(ay) : 0.0f;
        }
    }
    for (l = 0; l < 3; l++) {
        float *ep = t->enc_pos + (size_t)t->level_start[l] * f;
        float *dp = t->dec_pos + (size_t)t->level_start[l] * f;
        int n = t->level_h[l] * t->level_w[l];
        sine_position_embedding(ep, f, t->level_h[l], t->level_w[l], f / 2);
        memcpy(dp, ep, (size_t)n * f * sizeof *dp);
        for (i = 0; i < n; i++) {
            int ch;
            for (ch = 0; ch < f; ch++) ep[(size_t)i * f + ch] += level_embed[(size_t)l * f + ch];
        }
        /* get_reference_points: pixel centres normalised by the level size */
        for (y = 0; y < t->level_h[l]; y++)
            for (x = 0; x < t->level_w[l]; x++) {
                float *r = t->ref_points + 2 * ((size_t)t->level_start[l] + (size_t)y * t->level_w[l] + x);
                r[0] = ((float)x + 0.5f) / (float)t->level_w[l];
                r[1] = ((float)y + 0.5f) / (float)t->level_h[l];
            }
    }
}

/* Binds every tensor the forward pass reads and builds the derived tables. */
static int weights_bind(loupe_model *m, char *err, size_t errsize)
{
    const loupe_config *c = &m->cfg;
    loupe_weights *w = &m->w;
    binder b;
    char p[200];
    int W = c->width, g = c->grid, F = c->feature_size, i, k;
    int n_off = c->m2f_heads * c->deform_levels * c->deform_points;
    const float *raw_dw[4], *values;
    float *copy;
    wmat raw_layer_1;
    scale_block_w *blocks[4];
    size_t rope_n, tok_n, derived_floats, off = 0;
    float *dv;

    b.m = m; b.err = err; b.errsize = errsize; b.failed = 0;
    /* backbone (VisionTransformer) */
    w->class_embedding = bind(&b, W, 0, 0, 0, "backbone.class_embedding");
    w->positional_embedding = bind(&b, 1 + g * g, W, 0, 0, "backbone.positional_embedding");
    w->conv1 = bind_matrix(&b, W, 3, c->patch_size, c->patch_size, "backbone.conv1.weight", "");
    w->ln_pre = bind_norm(&b, W, "backbone.ln_pre");
    w->ln_post = bind_norm(&b, W, "backbone.ln_post");
    w->blocks = calloc((size_t)c->layers, sizeof *w->blocks);
    w->enc = calloc((size_t)c->enc_layers + 1, sizeof *w->enc);
    w->dec = calloc((size_t)c->dec_layers, sizeof *w->dec);
    if (!w->blocks || !w->enc || !w->dec) return fail(err, errsize, "%s: out of memory", m->path);
    for (i = 0; i < c->layers; i++) {
        pe_block_w *bl = &w->blocks[i];
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.ln_1", i); bl->ln_1 = bind_norm(&b, W, p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.ln_2", i); bl->ln_2 = bind_norm(&b, W, p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.attn", i); bind_mha(&b, W, p, &bl->qkv, &bl->out);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.mlp.c_fc", i); bl->fc = bind_linear(&b, c->mlp_width, W, 1, p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.mlp.c_proj", i); bl->proj = bind_linear(&b, W, c->mlp_width, 1, p);
    }
    w->pool.probe = bind(&b, 1, 1, W, 0, "backbone.attn_pool.probe");
    bind_mha(&b, W, "backbone.attn_pool.attn", &w->pool.qkv, &w->pool.out);
    w->pool.ln = bind_norm(&b, W, "backbone.attn_pool.layernorm");
    w->pool.fc = bind_linear(&b, c->pool_mlp_width, W, 1, "backbone.attn_pool.mlp.c_fc");
    w->pool.proj = bind_linear(&b, W, c->pool_mlp_width, 1, "backbone.attn_pool.mlp.c_proj");
    /* classifier (LoupeClassifier) */
    for (k = 0; k < 2; k++) {
        cls_head_w *h = k ? &w->patch_head : &w->global_head;
        const char *name = k ? "patch_classifier" : "classifier";
        for (i = 0; i < c->cls_layers; i++) {
            int in = i == 0 ? W : c->cls_hidden, out = i == c->cls_layers - 1 ? 1 : c->cls_hidden;
            snprintf(p, sizeof p, "classifier.%s.layers.%d", name, i);
            h->layers[i] = bind_linear(&b, out, in, 1, p);
        }
    }
    w->fuser = bind(&b, 1, 1 + g * g, 0, 0, "classifier.fuser.fuse.weight");
    /* segmentor: feature pyramid, scale_layers sorted [4, 2, 1, 0.5] */
    bind_scale_block(&b, &w->fpn4[0], W, 1, "segmentor.fpn.scale_layers.0.0", &raw_dw[0]);
    bind_scale_block(&b, &w->fpn4[1], W, 1, "segmentor.fpn.scale_layers.0.1", &raw_dw[1]);
    bind_scale_block(&b, &w->fpn2, W, 1, "segmentor.fpn.scale_layers.1.0", &raw_dw[2]);
    bind_scale_block(&b, &w->fpn_half, W, 0, "segmentor.fpn.scale_layers.3.0", &raw_dw[3]);
    w->label_embedding[0] = bind(&b, F, 0, 0, 0, "segmentor.label_embedding.0");
    w->label_embedding[1] = bind(&b, F, 0, 0, 0, "segmentor.label_embedding.1");
    /* pixel decoder */
    w->level_embed = bind(&b, 3, F, 0, 0, "segmentor.pixel_decoder.level_embed");
    for (i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "segmentor.pixel_decoder.input_projections.%d.0", i); w->input_proj[i] = bind_conv1x1(&b, F, W, 1, p);
        snprintf(p, sizeof p, "segmentor.pixel_decoder.input_projections.%d.1", i); w->input_gn[i] = bind_norm(&b, F, p);
    }
    for (i = 0; i < c->enc_layers; i++) {
        enc_layer_w *e = &w->enc[i];
#define ENC(s) (snprintf(p, sizeof p, "segmentor.pixel_decoder.encoder.layers.%d.%s", i, s), p)
        e->offsets = bind_linear(&b, n_off * 2, F, 1, ENC("self_attn.sampling_offsets"));
        e->attn_weights = bind_linear(&b, n_off, F, 1, ENC("self_attn.attention_weights"));
        e->value = bind_linear(&b, F, F, 1, ENC("self_attn.value_proj"));
        e->output = bind_linear(&b, F, F, 1, ENC("self_attn.output_proj"));
        e->ln_self = bind_norm(&b, F, ENC("self_attn_layer_norm"));
        bind_mha(&b, F, ENC("cross_attn"), &e->cross_qkv, &e->cross_out);
        e->ln_cross = bind_norm(&b, F, ENC("cross_attn_layer_norm"));
        e->fc1 = bind_linear(&b, c->enc_ffn, F, 1, ENC("fc1"));
        e->fc2 = bind_linear(&b, F, c->enc_ffn, 1, ENC("fc2"));
        e->ln_final = bind_norm(&b, F, ENC("final_layer_norm"));
#undef ENC
    }
    w->mask_projection = bind_conv1x1(&b, F, F, 1, "segmentor.pixel_decoder.mask_projection");
    w->adapter_1 = bind_conv1x1(&b, F, W, 0, "segmentor.pixel_decoder.adapter_1.0");
    w->adapter_gn = bind_norm(&b, F, "segmentor.pixel_decoder.adapter_1.1");
    raw_layer_1 = bind_matrix(&b, F, F, 3, 3, "segmentor.pixel_decoder.layer_1.0.weight", "");
    w->layer_1_gn = bind_norm(&b, F, "segmentor.pixel_decoder.layer_1.1");
    /* transformer decoder */
    w->query_embed = bind(&b, c->num_queries, F, 0, 0, "segmentor.mask2former_decoder.queries_embedder.weight");
    w->query_feat = bind(&b, c->num_queries, F, 0, 0, "segmentor.mask2former_decoder.queries_features.weight");
    w->dec_level_embed = bind(&b, 3, F, 0, 0, "segmentor.mask2former_decoder.level_embed.weight");
    for (i = 0; i < c->dec_layers - 1; i++) {
        dec_layer_w *d = &w->dec[i];
#define DEC(s) (snprintf(p, sizeof p, "segmentor.mask2former_decoder.decoder.layers.%d.%s", i, s), p)
        d->q = bind_linear(&b, F, F, 1, DEC("self_attn.q_proj"));
        d->k = bind_linear(&b, F, F, 1, DEC("self_attn.k_proj"));
        d->v = bind_linear(&b, F, F, 1, DEC("self_attn.v_proj"));
        d->o = bind_linear(&b, F, F, 1, DEC("self_attn.out_proj"));
        d->ln_self = bind_norm(&b, F, DEC("self_attn_layer_norm"));
        bind_mha(&b, F, DEC("cross_attn"), &d->cross_qkv, &d->cross_out);
        d->ln_cross = bind_norm(&b, F, DEC("cross_attn_layer_norm"));
        d->fc1 = bind_linear(&b, c->dec_ffn, F, 1, DEC("fc1"));
        d->fc2 = bind_linear(&b, F, c->dec_ffn, 1, DEC("fc2"));
        d->ln_final = bind_norm(&b, F, DEC("final_layer_norm"));
#undef DEC
    }
    w->dec_ln = bind_norm(&b, F, "segmentor.mask2former_decoder.decoder.layernorm");
    for (i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "segmentor.mask2former_decoder.decoder.mask_predictor.mask_embedder.%d.0", i);
        w->mask_embed[i] = bind_linear(&b, F, F, 1, p);
    }
    w->class_predictor = bind_linear(&b, c->num_labels + 1, F, 1, "segmentor.class_predictor");
    if (b.failed) return -1;

    /* Derived, read-only: repacked kernels and constant tables, one block. The 3x3
     * convolution's kernel is float32 whatever the file stores (a BF16 or Q8 one is
     * converted here, once); the products read every other weight matrix in place. */
    blocks[0] = &w->fpn4[0]; blocks[1] = &w->fpn4[1]; blocks[2] = &w->fpn2; blocks[3] = &w->fpn_half;
    level_sizes(c, &m->t);
    rope_n = (size_t)(1 + g * g) * (size_t)(W / c->heads);
    tok_n = (size_t)m->t.tokens * (size_t)F;
    derived_floats = 4 * 9 * (size_t)W + 9 * (size_t)F * F + 2 * rope_n + 2 * tok_n + 2 * (size_t)m->t.tokens;
    dv = aligned_block(derived_floats * sizeof(float), &m->derived_raw);
    if (!dv) return fail(err, errsize, "%s: out of memory", m->path);
    for (k = 0; k < 4; k++) {
        repack_depthwise(dv + off, raw_dw[k], W);
        blocks[k]->dw = dv + off;
        off += 9 * (size_t)W;
    }
    if (!(values = wmat_values(raw_layer_1, (size_t)F, 9 * (size_t)F, &copy)))
        return fail(err, errsize, "%s: out of memory", m->path);
    repack_conv3x3(dv + off, values, F, F);
    free(copy);
    w->layer_1 = dv + off; off += 9 * (size_t)F * F;
    m->t.rope_cos = dv + off; off += rope_n;
    m->t.rope_sin = dv + off; off += rope_n;
    m->t.enc_pos = dv + off; off += tok_n;
    m->t.dec_pos = dv + off; off += tok_n;
    m->t.ref_points = dv + off;
    tables_fill(m, w->level_embed);
    return 0;
}

/* Validates the bytes of a model (already in m->data) and binds its tensors. */
static loupe_model *model_finish(loupe_model *m, char *err, size_t errsize)
{
    if (weights_parse(m, err, errsize) || weights_config(m, err, errsize) || weights_bind(m, err, errsize)) {
        loupe_model_free(m);
        return NULL;
    }
    return m;
}

loupe_model *loupe_model_load(const char *path, char *err, size_t errsize)
{
    loupe_model *m;
    if (!path) { fail(err, errsize, "no weight file given"); return NULL; }
    if (!host_is_little_endian()) { fail(err, errsize, "%s: big-endian hosts are not supported", path); return NULL; }
    m = calloc(1, sizeof *m);
    if (!m) { fail(err, errsize, "%s: out of memory", path); return NULL; }
    snprintf(m->path, sizeof m->path, "%s", path);
    if (weights_map_file(m, path, err, errsize)) {
        loupe_model_free(m);
        return NULL;
    }
    return model_finish(m, err, errsize);
}

loupe_model *loupe_model_load_memory(const void *data, size_t size, char *err, size_t errsize)
{
    loupe_model *m;
    if (!data) { fail(err, errsize, "(memory): no weight data given"); return NULL; }
    if ((uintptr_t)data % sizeof(float) != 0) {
        fail(err, errsize, "(memory): weight data must be aligned to %u bytes", (unsigned)sizeof(float));
        return NULL;
    }
    if (!host_is_little_endian()) { fail(err, errsize, "(memory): big-endian hosts are not supported"); return NULL; }
    m = calloc(1, sizeof *m);
    if (!m) { fail(err, errsize, "(memory): out of memory"); return NULL; }
    snprintf(m->path, sizeof m->path, "(memory)");
    m->data = (unsigned char *)(uintptr_t)data; /* read only: never written through */
    m->size = size;
    m->storage = WEIGHTS_BORROWED;
    return model_finish(m, err, errsize);
}

const loupe_config *loupe_model_config(const loupe_model *m) { return &m->cfg; }

void loupe_model_free(loupe_model *m)
{
    if (!m) return;
#if LOUPE_POSIX
    if (m->storage == WEIGHTS_MAPPED) munmap(m->data, m->size);
#elif defined(_WIN32)
    if (m->storage == WEIGHTS_MAPPED) UnmapViewOfFile(m->data);
#endif
    if (m->storage == WEIGHTS_READ) free(m->data);
    free(m->entries);
    free(m->w.blocks);
    free(m->w.enc);
    free(m->w.dec);
    free(m->derived_raw);
    free(m);
}

/* ========================================================================== */
/* 3. Kernels                                                                 */
/* ========================================================================== */
/* Plain loops the compiler vectorises. Every kernel that spreads work over threads
 * checks parallel_ok() first, so kernels may also be called inside a parallel region
 * (one head or one row per thread), where they run serially. */

/* Minimum multiply-adds before a kernel starts threads. */
#define PARALLEL_MIN_WORK 32768.0

#ifdef _OPENMP
/* True when a kernel of the given size should fork threads. */
static int parallel_ok(double work) { return work >= PARALLEL_MIN_WORK && !omp_in_parallel(); }
#endif

/* Matrix products: gemm_nt (C (+)= A B^T + bias, B a PyTorch weight [out][in]) and
 * gemm_nn (C (+)= A B, B stored [K][N]), plus fma_peak_gflops for the benchmarks.
 *
 * Blocking scheme (Goto / BLIS, with A read in place and B packed on the fly):
 *   - C is cut into tasks: chunks of at most GEMM_MC rows times ranges of columns,
 *     enough tasks to keep every thread busy (threads take them one by one);
 *   - a task walks K in steps of GEMM_KC, and within a step its columns in blocks of
 *     GEMM_NC: the KC x NC block of B is packed into a stack buffer (it stays in L2)
 *     as panels of NR columns stored k-major, zero-padded to NR, so the micro-kernel
 *     reads NR consecutive floats per k;
 *   - for every strip of MR rows of A (MR x KC floats read in place, kept in L1 while
 *     it meets every panel of the block) the micro-kernel keeps an MR x NR tile of C
 *     in registers for the whole step: per k it loads NR floats of B, broadcasts MR
 *     floats of A and does MR x NR multiply-adds; then it adds the tile to C (first
 *     step: bias + tile, onto the old C when accumulating).
 * Each element of C is summed in the same order (k ascending within a step, steps in
 * order) whichever task, thread or tile computes it, so results do not depend on the
 * number of threads. Scratch is one packed block (GEMM_KC x GEMM_NC floats, at most 512 KiB)
 * and one tile on the stack of the calling thread: nothing is allocated. */

/* Vector type, micro-tile and cache blocking for each instruction set. gemm_vec holds
 * GEMM_LANES floats; a micro-tile is GEMM_MR rows x GEMM_NV vectors (GEMM_NR floats).
 * The five blocking values are defaults: any of them can be set on the command line
 * (`-DGEMM_KC=256`), which is how `make bench-gemm` times candidate blockings
 * (test/bench_gemm.sh). The micro-kernel is written for any MR and NV; the checks
 * after this block reject tiles whose accumulators cannot stay in the GEMM_VREGS
 * vector registers and blocks too big for a thread's stack. */
#if defined(__AVX512F__) && !defined(LOUPE_NO_SIMD)
#include <immintrin.h>
#define GEMM_ISA "AVX-512"
#define GEMM_VREGS 32 /* vector registers */
typedef __m512 gemm_vec;
#define GEMM_LANES 16
/* 6 x 64 tile (24 accumulators, 4 B vectors, 1 broadcast), KC 256, NC 128, MC 512:
 * the fastest of make bench-gemm's sweep on a Zen 5 (README, Performance) */
#ifndef GEMM_MR
#define GEMM_MR 6
#endif
#ifndef GEMM_NV
#define GEMM_NV 4
#endif
#ifndef GEMM_KC
#define GEMM_KC 256
#endif
#ifndef GEMM_NC
#define GEMM_NC 128
#endif
#ifndef GEMM_MC
#define GEMM_MC 512
#endif
#ifndef GEMM_NV_NARROW
#define GEMM_NV_NARROW (GEMM_NV < 2 ? GEMM_NV : 2)
#endif
#define GEMM_PEAK_CHAINS 12
#define vec_zero() _mm512_setzero_ps()
#define vec_load(p) _mm512_loadu_ps(p)
#define vec_store(p, v) _mm512_storeu_ps(p, v)
#define vec_bcast(p) _mm512_set1_ps(*(p))
#define vec_fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vec_add(a, b) _mm512_add_ps(a, b)
#define vec_max(a, b) _mm512_max_ps(a, b)
#define GEMM_TRANSPOSE8 1
#define gemm_prefetch(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#elif defined(__AVX2__) && defined(__FMA__) && !defined(LOUPE_NO_SIMD)
#include <immintrin.h>
#define GEMM_ISA "AVX2+FMA"
#define GEMM_VREGS 16 /* vector registers */
typedef __m256 gemm_vec;
#define GEMM_LANES 8
/* 6 x 16 tile (12 accumulators, 2 B vectors, 1 broadcast), KC 256, NC 128, MC 320: NC 128
 * beat NC 64 in make bench-gemm and in make bench on a Zen 4 built for AVX2 (README) */
#ifndef GEMM_MR
#define GEMM_MR 6
#endif
#ifndef GEMM_NV
#define GEMM_NV 2
#endif
#ifndef GEMM_KC
#define GEMM_KC 256
#endif
#ifndef GEMM_NC
#define GEMM_NC 128
#endif
#ifndef GEMM_MC
#define GEMM_MC 320
#endif
#define GEMM_PEAK_CHAINS 12
#define vec_zero() _mm256_setzero_ps()
#define vec_load(p) _mm256_loadu_ps(p)
#define vec_store(p, v) _mm256_storeu_ps(p, v)
#define vec_bcast(p) _mm256_broadcast_ss(p)
#define vec_fma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vec_add(a, b) _mm256_add_ps(a, b)
#define vec_max(a, b) _mm256_max_ps(a, b)
#define GEMM_TRANSPOSE8 1
#define gemm_prefetch(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#elif defined(__ARM_NEON) && defined(__aarch64__) && !defined(LOUPE_NO_SIMD)
#include <arm_neon.h>
#define GEMM_ISA "NEON"
#define GEMM_VREGS 32 /* vector registers */
typedef float32x4_t gemm_vec;
#define GEMM_LANES 4
#ifndef GEMM_MR
#define GEMM_MR 6
#endif
#ifndef GEMM_NV
#define GEMM_NV 4
#endif
#ifndef GEMM_KC
#define GEMM_KC 256
#endif
#ifndef GEMM_NC
#define GEMM_NC 64
#endif
#ifndef GEMM_MC
#define GEMM_MC 320
#endif
#define GEMM_PEAK_CHAINS 12
#define vec_zero() vdupq_n_f32(0.0f)
#define vec_load(p) vld1q_f32(p)
#define vec_store(p, v) vst1q_f32(p, v)
#define vec_bcast(p) vld1q_dup_f32(p)
#define vec_fma(a, b, c) vfmaq_f32(c, a, b)
#define vec_add(a, b) vaddq_f32(a, b)
#define vec_max(a, b) vmaxq_f32(a, b)
#define gemm_prefetch(p) ((void)(p)) /* no prefetch hint in C99 */
#else
/* Portable C: one "vector" is one float and the compiler vectorises the loops over a
 * tile row. Where the target has a fast fused multiply-add, use it (ISO C mode
 * forbids the compiler to fuse a * b + c on its own). */
#define GEMM_ISA "portable C"
typedef float gemm_vec;
#define GEMM_LANES 1
#ifndef GEMM_MR
#define GEMM_MR 2
#endif
#ifndef GEMM_NV
#define GEMM_NV 64
#endif
#ifndef GEMM_KC
#define GEMM_KC 256
#endif
#ifndef GEMM_NC
#define GEMM_NC 64
#endif
#ifndef GEMM_MC
#define GEMM_MC 320
#endif
#define GEMM_PEAK_CHAINS 64
#define vec_zero() 0.0f
#define vec_load(p) (*(p))
#define vec_store(p, v) (*(p) = (v))
#define vec_bcast(p) (*(p))
#ifdef FP_FAST_FMAF
#define vec_fma(a, b, c) fmaf(a, b, c)
#else
#define vec_fma(a, b, c) ((a) * (b) + (c))
#endif
#define vec_add(a, b) ((a) + (b))
#define vec_max(a, b) ((a) > (b) ? (a) : (b))
#define gemm_prefetch(p) ((void)(p)) /* no portable prefetch hint */
#endif

#define GEMM_NR (GEMM_LANES * GEMM_NV)
/* Vectors per tile row in products of at most GEMM_NR_NARROW columns: attention's per-head
 * products with values (32 columns, one head's width) would leave half of AVX-512's
 * 64-column tile empty; they use a 32-column one. Elsewhere the usual tile. The tile's
 * width changes no sum. */
#ifndef GEMM_NV_NARROW
#define GEMM_NV_NARROW GEMM_NV
#endif
#define GEMM_NR_NARROW (GEMM_LANES * GEMM_NV_NARROW)
/* Overridden blockings that the kernels cannot run well or at all. */
#if GEMM_MR < 1 || GEMM_NV < 1 || GEMM_KC < 8 || GEMM_MC < GEMM_MR
#error "gemm blocking: need GEMM_MR >= 1, GEMM_NV >= 1, GEMM_KC >= 8 and GEMM_MC >= GEMM_MR"
#endif
#if GEMM_NC < GEMM_NR || GEMM_NC % GEMM_NR != 0
#error "gemm blocking: GEMM_NC must be a multiple of GEMM_NR (GEMM_LANES * GEMM_NV)"
#endif
#if GEMM_NV_NARROW < 1 || GEMM_NV_NARROW > GEMM_NV || GEMM_NC % GEMM_NR_NARROW != 0
#error "gemm blocking: need 1 <= GEMM_NV_NARROW <= GEMM_NV, GEMM_NC a multiple of GEMM_LANES * GEMM_NV_NARROW"
#endif
#if defined(GEMM_VREGS) && GEMM_MR * GEMM_NV + GEMM_NV + 1 > GEMM_VREGS
/* MR x NV accumulators, NV vectors of B and one broadcast of A must fit in registers:
 * AVX-512 and NEON (32 registers) take e.g. MR x NV = 14 x 2, 12 x 2, 8 x 3, 6 x 4;
 * AVX2 (16 registers) 6 x 2, 4 x 2, 3 x 3. */
#error "gemm blocking: GEMM_MR * GEMM_NV + GEMM_NV + 1 must not exceed GEMM_VREGS (the tile would spill)"
#endif
#if GEMM_KC * GEMM_NC > 131072
/* The packed block lives on the stack of every thread that runs a task. */
#error "gemm blocking: GEMM_KC * GEMM_NC must be at most 131072 floats (512 KiB of stack per thread)"
#endif
/* Floats in a cache line: packed blocks start on one. */
#define GEMM_LINE_FLOATS 16
/* GEMM_PACK_A 1 copies each MR-row strip of A (KC floats a row) into a stack buffer
 * whose rows are GEMM_KC + one line apart before the micro-kernel reads it: A read in
 * place has its MR rows lda floats apart, and when lda is a multiple of 4 KiB (every
 * backbone product: K = 1024 or 4096) the MR rows' lines all fall into the same L1
 * set and evict each other. 0 reads A in place. The same values are summed in the
 * same order either way; the choice is for `make bench-gemm`. */
#ifndef GEMM_PACK_A
#define GEMM_PACK_A 0
#endif
#define GEMM_A_STRIDE (GEMM_KC + GEMM_LINE_FLOATS)
/* Products with at most this many rows and at least GEMM_SWAP_RATIO times as many
 * columns, B float32 [N][K], are computed as C^T = B A^T (written back transposed):
 * with few rows every packed block of B serves one or two strips of A, so packing B
 * costs about as much as the multiply-adds (the segmentor's masks, 20 queries x 9216
 * pixels x 256, and its attention scores). Not when the rows padded to NR columns
 * would be more than 1.5 times the rows padded to MR (a single row: a GEMV either
 * way). Each element of C is still the same sum in the same order, so the results are
 * the same bits. 0 never swaps; `make bench-gemm` times both. */
#ifndef GEMM_SWAP_MAX_M
#define GEMM_SWAP_MAX_M 32
#endif
#define GEMM_SWAP_RATIO 16
/* Threads get about this many tasks each, so that uneven tasks still balance. */
#define GEMM_TASKS_PER_THREAD 8

/* Where the micro-kernel puts its tile: C = tile (+ bias) (+ C when load_c). */
typedef struct gemm_out {
    float *c;
    size_t ldc;
    const float *bias; /* NR values or NULL */
    int load_c;
} gemm_out;

/* Rows of the short micro-kernel, for edge strips of at most this many rows (the 20
 * queries of the transformer decoder leave a 2-row strip after three of 6). */
#define GEMM_MR_SHORT ((GEMM_MR + 1) / 2)

#if defined(__GNUC__)
#define GEMM_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define GEMM_ALWAYS_INLINE inline
#endif

/* The micro-kernel: the rows x (nv vectors) tile a[0..rows)[0..kc) x bp[0..kc)[0..nr),
 * nr = nv * GEMM_LANES columns, accumulated in registers, then written to out. a[r]
 * points at row r of A at the step's first k; bp is a packed panel (k-major, nr floats
 * per k). rows (GEMM_MR or GEMM_MR_SHORT) and nv (GEMM_NV or GEMM_NV_NARROW) are constants
 * at each call below, so that the compiler unrolls the loops and keeps the accumulators
 * in registers. */
static GEMM_ALWAYS_INLINE void gemm_micro_rows(int rows, int nv, int kc, const float *const a[GEMM_MR],
                                               const float *bp, gemm_out out)
{
    gemm_vec acc[GEMM_MR][GEMM_NV];
    int r, v, k, nr = nv * GEMM_LANES;
    for (r = 0; r < rows; r++) {
        gemm_prefetch(out.c + (size_t)r * out.ldc);
        gemm_prefetch(out.c + (size_t)r * out.ldc + nr - 1);
        for (v = 0; v < nv; v++) acc[r][v] = vec_zero();
    }
#if GEMM_LANES > 1
    /* k outermost: the nv vectors of B loaded for one k serve all the rows. */
    for (k = 0; k < kc; k++, bp += nr) {
        gemm_vec b[GEMM_NV];
        for (v = 0; v < nv; v++) b[v] = vec_load(bp + v * GEMM_LANES);
        for (r = 0; r < rows; r++) {
            gemm_vec ar = vec_bcast(a[r] + k);
            for (v = 0; v < nv; v++) acc[r][v] = vec_fma(ar, b[v], acc[r][v]);
        }
    }
#else
    /* Portable: one row at a time, so that the innermost loop is a multiply-add over
     * the nr columns, the form compilers vectorise reliably (with k outermost they
     * tend to vectorise over k instead, needing shuffles). */
    for (r = 0; r < rows; r++)
        for (k = 0; k < kc; k++)
            for (v = 0; v < nv; v++) acc[r][v] = vec_fma(a[r][k], bp[(size_t)k * nr + v], acc[r][v]);
#endif
    for (r = 0; r < rows; r++)
        for (v = 0; v < nv; v++) {
            float *c = out.c + (size_t)r * out.ldc + v * GEMM_LANES;
            gemm_vec t = acc[r][v];
            if (out.bias) t = vec_add(t, vec_load(out.bias + v * GEMM_LANES));
            if (out.load_c) t = vec_add(vec_load(c), t);
            vec_store(c, t);
        }
}

/* The MR-row kernel. */
static void gemm_micro(int kc, const float *const a[GEMM_MR], const float *bp, gemm_out out)
{
    gemm_micro_rows(GEMM_MR, GEMM_NV, kc, a, bp, out);
}

/* A strip of mr <= MR rows (an edge strip) with a tile of nv vectors a row: the short
 * kernel when it covers the rows, with the same sums for them; rows past mr of the tile
 * are left unspecified. */
static void gemm_micro_strip(int mr, int nv, int kc, const float *const a[GEMM_MR], const float *bp, gemm_out out)
{
#if GEMM_NV_NARROW != GEMM_NV
    if (nv == GEMM_NV_NARROW) {
        if (mr <= GEMM_MR_SHORT)
            gemm_micro_rows(GEMM_MR_SHORT, GEMM_NV_NARROW, kc, a, bp, out);
        else
            gemm_micro_rows(GEMM_MR, GEMM_NV_NARROW, kc, a, bp, out);
        return;
    }
#endif
    (void)nv;
    if (mr <= GEMM_MR_SHORT)
        gemm_micro_rows(GEMM_MR_SHORT, GEMM_NV, kc, a, bp, out);
    else
        gemm_micro_rows(GEMM_MR, GEMM_NV, kc, a, bp, out);
}

#ifdef GEMM_TRANSPOSE8
/* Writes the transpose of the 8 x 8 block at s (rows ldb apart) to d (rows ldd apart). */
static void gemm_transpose8(const float *s, size_t ldb, float *d, size_t ldd)
{
    __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ldb), r2 = _mm256_loadu_ps(s + 2 * ldb);
    __m256 r3 = _mm256_loadu_ps(s + 3 * ldb), r4 = _mm256_loadu_ps(s + 4 * ldb), r5 = _mm256_loadu_ps(s + 5 * ldb);
    __m256 r6 = _mm256_loadu_ps(s + 6 * ldb), r7 = _mm256_loadu_ps(s + 7 * ldb);
    /* pairs of rows interleaved, then quads, then the two 128-bit halves */
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3);
    __m256 t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

/* Packs one panel: nr <= width columns of C over kc values of k into d (kc x width,
 * k-major, zero-padded to width columns; width is GEMM_NR, or GEMM_NR_NARROW in narrow
 * products). B points at the panel's first element; it is [N][K]
 * (ldb apart per column of C) when b_kn == 0 and [K][N] (ldb apart per k) otherwise. */
static void gemm_pack_panel(int nr, int width, int kc, const float *B, size_t ldb, int b_kn, float *d)
{
    int j = 0, k;
    if (b_kn) {
        for (k = 0; k < kc; k++) {
            for (j = 0; j < nr; j++) d[(size_t)k * width + j] = B[(size_t)k * ldb + j];
            for (; j < width; j++) d[(size_t)k * width + j] = 0.0f;
        }
        return;
    }
#ifdef GEMM_TRANSPOSE8
    for (; j + 8 <= nr; j += 8) {
        int i;
        for (k = 0; k + 8 <= kc; k += 8)
            gemm_transpose8(B + (size_t)j * ldb + k, ldb, d + (size_t)k * width + j, (size_t)width);
        for (; k < kc; k++)
            for (i = 0; i < 8; i++) d[(size_t)k * width + j + i] = B[(size_t)(j + i) * ldb + k];
    }
#endif
    /* the rest one column at a time: read a row of B in order, write a column of d */
    for (; j < nr; j++)
        for (k = 0; k < kc; k++) d[(size_t)k * width + j] = B[(size_t)j * ldb + k];
    for (; j < width; j++)
        for (k = 0; k < kc; k++) d[(size_t)k * width + j] = 0.0f;
}

/* Everything a task needs to know about the product. B is F32 unless it is a weight
 * matrix of gemm_nt_w or gemm_nn_w. */
typedef struct gemm_args {
    int M, N, K;
    const float *A, *bias;
    wmat B;
    size_t lda, ldc;
    int b_kn, accumulate;
    int c_t; /* C holds the transpose: element (i, j) at C[j * ldc + i], bias by row */
    int a_t; /* A holds the transpose: element (i, k) at A[k * lda + i] (weight gradients) */
    const float *b_pre; /* B already packed by gemm_prepack (else NULL: packed per task) */
    float *C;
} gemm_args;

/* Vectors per tile row for the product g: the narrow tile when C has at most
 * GEMM_NR_NARROW columns and B is packed here from float32, else the usual one. */
static int gemm_nv(const gemm_args *g)
{
#if GEMM_NV_NARROW < GEMM_NV
    if (g->N <= GEMM_NR_NARROW && g->B.dtype == DTYPE_F32 && !g->b_pre) return GEMM_NV_NARROW;
#endif
    (void)g;
    return GEMM_NV;
}

/* Floats of a B [N][K] packed by gemm_prepack: every KC step's panels, N rounded up to whole panels. */
#define GEMM_NPAD(n) (((size_t)(n) + GEMM_NR - 1) / GEMM_NR * GEMM_NR)
#define GEMM_PREPACKED_FLOATS(n, k) (GEMM_NPAD(n) * (size_t)(k))
/* Where gemm_prepack puts the panel of columns j.. for the KC step starting at k-index p0
 * (kc values deep): each step's panels one after the other, then the next step's. */
#define GEMM_PREPACKED_AT(n, p0, j, kc) ((size_t)(p0) * GEMM_NPAD(n) + (size_t)(j) * (size_t)(kc))

#ifdef GEMM_TRANSPOSE8
/* Values c0..c0+8 of row `row` of a BF16 or Q8 matrix as float32 (c0 a multiple of 8,
 * so the 8 values share one Q8 scale); the same values as wmat_to_float. */
static __m256 gemm_load8_float(const wmat *m, size_t row, size_t c0)
{
    if (m->dtype == DTYPE_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)(const void *)((const uint16_t *)m->data + row * m->ld + c0));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
        __m128i q = _mm_loadl_epi64((const __m128i *)(const void *)((const int8_t *)m->data + row * m->ld + c0));
        __m256 scale = _mm256_set1_ps(m->scale[row * (m->ld / Q8_BLOCK) + c0 / Q8_BLOCK]);
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), scale);
    }
}

/* gemm_pack_panel for a whole panel (NR columns, kc a multiple of 8) of a BF16 or Q8
 * B: every 8 x 8 block is converted in registers, then transposed like a float one. */
static void gemm_pack_panel_convert(const wmat *m, size_t n0, size_t p0, int kc, float *d)
{
    float rows[8 * 8];
    int j, k, i;
    for (j = 0; j < GEMM_NR; j += 8)
        for (k = 0; k < kc; k += 8) {
            for (i = 0; i < 8; i++)
                _mm256_storeu_ps(rows + 8 * i, gemm_load8_float(m, n0 + (size_t)(j + i), p0 + (size_t)k));
            gemm_transpose8(rows, 8, d + (size_t)k * GEMM_NR + j, GEMM_NR);
        }
}
#endif

/* Packs the panel of B for columns n0..n0+nr of C and k-range p0..p0+kc into d. A BF16
 * or Q8 weight is converted to float32 on the way (a [K][N] one straight into the
 * panel; an [N][K] one in registers for whole panels on AVX, else through float32
 * rows in strip, NR x KC floats): the conversion is paid
 * once per packed block, not per row of A, and no float32 copy of the weight exists
 * anywhere else. Only a float32 B is packed for the narrow tile (gemm_nv). */
static void gemm_pack_b(const gemm_args *g, int n0, int nr, int p0, int kc, float *strip, float *d)
{
    const float *b = g->B.data;
    size_t ldb = g->B.ld;
    int k;
    if (g->B.dtype == DTYPE_F32) {
        gemm_pack_panel(nr, gemm_nv(g) * GEMM_LANES, kc, g->b_kn ? b + (size_t)p0 * ldb + n0 : b + (size_t)n0 * ldb + p0,
                        ldb, g->b_kn, d);
        return;
    }
    if (g->b_kn) { /* rows of B are already rows of the panel: convert them in place */
        wmat_to_float(g->B, (size_t)p0, kc, (size_t)n0, nr, d, GEMM_NR);
        if (nr < GEMM_NR)
            for (k = 0; k < kc; k++) memset(d + (size_t)k * GEMM_NR + nr, 0, (size_t)(GEMM_NR - nr) * sizeof *d);
        return;
    }
#ifdef GEMM_TRANSPOSE8
    if (nr == GEMM_NR && kc % 8 == 0) {
        gemm_pack_panel_convert(&g->B, (size_t)n0, (size_t)p0, kc, d);
        return;
    }
#endif
    wmat_to_float(g->B, (size_t)n0, nr, (size_t)p0, kc, strip, (size_t)kc);
    gemm_pack_panel(nr, GEMM_NR, kc, strip, (size_t)kc, 0, d);
}

/* One packed block: rows m0..m1 (whole strips from m0) of C, columns n0..n0+nc,
 * k-range p0..p0+kc, with bp the block of B packed for that range; at is A's slice
 * packed by gemm_task_at when A is stored transposed (else NULL: A read in place). */
static void gemm_block(const gemm_args *g, int m0, int m1, int n0, int nc, int p0, int kc, const float *bp,
                       const float *at)
{
    float tile[GEMM_MR * GEMM_NR];
#if GEMM_PACK_A
    float apack[GEMM_MR * GEMM_A_STRIDE];
#endif
    int i0, j0, first = p0 == 0, load_c = !first || g->accumulate, nv = gemm_nv(g), nrw = nv * GEMM_LANES;
    for (i0 = m0; i0 < m1; i0 += GEMM_MR) {
        int mr = m1 - i0 < GEMM_MR ? m1 - i0 : GEMM_MR, r;
        const float *a[GEMM_MR];
        if (at) /* transposed A, packed by gemm_task_at: row i at at[(i - m0) * GEMM_A_STRIDE] */
            for (r = 0; r < GEMM_MR; r++) a[r] = at + (size_t)(i0 - m0 + (r < mr ? r : mr - 1)) * GEMM_A_STRIDE;
        else
            for (r = 0; r < GEMM_MR; r++) {
                a[r] = g->A + (size_t)(i0 + (r < mr ? r : mr - 1)) * g->lda + p0;
#if GEMM_PACK_A
                if (r < mr) memcpy(apack + (size_t)r * GEMM_A_STRIDE, a[r], (size_t)kc * sizeof(float));
                a[r] = apack + (size_t)(r < mr ? r : mr - 1) * GEMM_A_STRIDE;
#endif
            }
        for (j0 = 0; j0 < nc; j0 += nrw) {
            int nr = nc - j0 < nrw ? nc - j0 : nrw, j;
            const float *panel = bp + (size_t)j0 * kc, *bias = first && g->bias ? g->bias + n0 + j0 : NULL;
            float *c = g->C + (size_t)i0 * g->ldc + n0 + j0;
            gemm_out out;
            if (g->c_t) { /* transposed C: the tile aside, then added column by column */
                bias = first && g->bias ? g->bias + i0 : NULL;
                out.c = tile;
                out.ldc = (size_t)nrw;
                out.bias = NULL;
                out.load_c = 0;
                gemm_micro_strip(mr, nv, kc, a, panel, out);
                for (j = 0; j < nr; j++) {
                    float *cj = g->C + (size_t)(n0 + j0 + j) * g->ldc + i0;
                    for (r = 0; r < mr; r++) {
                        float t = tile[r * nrw + j];
                        if (bias) t += bias[r];
                        cj[r] = load_c ? cj[r] + t : t;
                    }
                }
                continue;
            }
            if (mr == GEMM_MR && nr == nrw) {
                out.c = c;
                out.ldc = g->ldc;
                out.bias = bias;
                out.load_c = load_c;
                if (nv == GEMM_NV)
                    gemm_micro(kc, a, panel, out);
                else
                    gemm_micro_strip(mr, nv, kc, a, panel, out);
                continue;
            }
            /* Edge tile: compute the tile aside (only its first GEMM_MR_SHORT rows
             * when that covers the strip), then add its valid part with the same
             * operations as above. */
            out.c = tile;
            out.ldc = (size_t)nrw;
            out.bias = NULL;
            out.load_c = 0;
            gemm_micro_strip(mr, nv, kc, a, panel, out);
            for (r = 0; r < mr; r++)
                for (j = 0; j < nr; j++) {
                    float t = tile[r * nrw + j], *cij = c + (size_t)r * g->ldc + j;
                    if (bias) t += bias[j];
                    *cij = load_c ? *cij + t : t;
                }
        }
    }
}

/* Rows of a task whose A is stored transposed (gemm_tn): see gemm_task. */
#define GEMM_AT_ROWS (16 * GEMM_MR)

/* One task: rows m0..m1 and columns n0..n1 of C. For each KC step, each NC-wide block
 * of B is packed and multiplied with the task's rows of A, whose KC-wide slice (at
 * most GEMM_MC x GEMM_KC floats, about half of L2) stays in L2 across the blocks.
 * When A is stored transposed (g->a_t, at most GEMM_AT_ROWS rows a task) the slice is
 * first packed row-major into `at` (GEMM_A_STRIDE floats a row), reading whole cache
 * lines of each k's row: gathering MR values per k, 4-16 KiB apart, missed the caches
 * at every k. at is NULL for A read in place. */
static void gemm_task(const gemm_args *g, int m0, int m1, int n0, int n1, float *at)
{
    float block[GEMM_KC * GEMM_NC + GEMM_LINE_FLOATS], strip[GEMM_NR * GEMM_KC];
    float *bp = block + (GEMM_LINE_FLOATS - (uintptr_t)block / sizeof(float) % GEMM_LINE_FLOATS) % GEMM_LINE_FLOATS;
    int p0, kc, jc, j0, i, k, nrw = gemm_nv(g) * GEMM_LANES;
    for (p0 = 0; p0 < g->K; p0 += kc) {
        kc = g->K - p0 < GEMM_KC ? g->K - p0 : GEMM_KC;
        if (at)
            for (k = 0; k < kc; k++) {
                const float *src = g->A + (size_t)(p0 + k) * g->lda + m0;
                for (i = 0; i < m1 - m0; i++) at[(size_t)i * GEMM_A_STRIDE + k] = src[i];
            }
        for (jc = n0; jc < n1; jc += GEMM_NC) {
            int nc = n1 - jc < GEMM_NC ? n1 - jc : GEMM_NC;
            if (g->b_pre) {
                gemm_block(g, m0, m1, jc, nc, p0, kc, g->b_pre + GEMM_PREPACKED_AT(g->N, p0, jc, kc), at);
                continue;
            }
            for (j0 = 0; j0 < nc; j0 += nrw)
                gemm_pack_b(g, jc + j0, nc - j0 < nrw ? nc - j0 : nrw, p0, kc, strip, bp + (size_t)j0 * kc);
            gemm_block(g, m0, m1, jc, nc, p0, kc, bp, at);
        }
    }
}

/* gemm_task for a transposed A, with its slice's buffer on this thread's stack (only
 * such tasks pay for it). */
static void gemm_task_at(const gemm_args *g, int m0, int m1, int n0, int n1)
{
    float at[GEMM_AT_ROWS * GEMM_A_STRIDE];
    gemm_task(g, m0, m1, n0, n1, at);
}

static void gemm_run(const gemm_args *g);

/* The product of g (float32 B [N][K], neither operand nor C already transposed) computed
 * transposed, C^T [N][M] = B [N][K] A [M][K]^T, and written back transposed: gemm_run's
 * way with products of few rows (GEMM_SWAP_MAX_M). The same sums in the same order. */
static void gemm_run_transposed(const gemm_args *g)
{
    gemm_args t = *g;
    t.M = g->N;
    t.N = g->M;
    t.A = (const float *)g->B.data;
    t.lda = g->B.ld;
    t.B = wmat_f32(g->A, g->lda);
    t.c_t = 1;
    gemm_run(&t);
}

/* Splits C into tasks, row chunks of at most GEMM_MC rows times column ranges of whole
 * NC blocks, enough of them to keep every thread busy, and runs them: on all threads
 * when that pays and the caller is not already in a parallel region. */
static void gemm_run(const gemm_args *g)
{
    int strips = (g->M + GEMM_MR - 1) / GEMM_MR, blocks = (g->N + GEMM_NC - 1) / GEMM_NC;
    int threads = 1, chunks, strips_per_chunk, ranges, blocks_per_range, tasks, t;
    if (g->M <= 0 || g->N <= 0) return;
    if (g->K <= 0) {
        int i, j;
        for (i = 0; i < g->M; i++)
            for (j = 0; j < g->N; j++) {
                float *c = g->C + (size_t)i * g->ldc + j, v = g->bias ? g->bias[j] : 0.0f;
                *c = g->accumulate ? *c + v : v;
            }
        return;
    }
    if (g->M <= GEMM_SWAP_MAX_M && g->N >= GEMM_SWAP_RATIO * g->M && !g->b_kn && !g->c_t && !g->a_t && !g->b_pre &&
        g->B.dtype == DTYPE_F32 && 2 * ((g->M + GEMM_NR - 1) / GEMM_NR * GEMM_NR) <= 3 * (strips * GEMM_MR)) {
        gemm_run_transposed(g);
        return;
    }
#ifdef _OPENMP
    if (parallel_ok((double)g->M * g->N * g->K)) threads = omp_get_max_threads();
#endif
    chunks = (strips * GEMM_MR + GEMM_MC - 1) / GEMM_MC;
    if (g->a_t) chunks = (strips * GEMM_MR + GEMM_AT_ROWS - 1) / GEMM_AT_ROWS; /* gemm_task_at's slice */
    strips_per_chunk = (strips + chunks - 1) / chunks;
    chunks = (strips + strips_per_chunk - 1) / strips_per_chunk;
    if (threads > 1 && blocks == 1 && chunks < GEMM_TASKS_PER_THREAD * threads) {
        /* one column block (a swapped product): split the rows finer instead */
        chunks = GEMM_TASKS_PER_THREAD * threads < strips ? GEMM_TASKS_PER_THREAD * threads : strips;
        strips_per_chunk = (strips + chunks - 1) / chunks;
        chunks = (strips + strips_per_chunk - 1) / strips_per_chunk;
    }
    ranges = (GEMM_TASKS_PER_THREAD * threads + chunks - 1) / chunks;
    if (ranges > blocks) ranges = blocks;
    blocks_per_range = (blocks + ranges - 1) / ranges;
    ranges = (blocks + blocks_per_range - 1) / blocks_per_range;
    tasks = chunks * ranges;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (threads > 1)
#endif
    for (t = 0; t < tasks; t++) { /* neighbouring tasks share columns: B is read once */
        int m0 = t % chunks * strips_per_chunk * GEMM_MR, n0 = t / chunks * blocks_per_range * GEMM_NC;
        int m1 = m0 + strips_per_chunk * GEMM_MR, n1 = n0 + blocks_per_range * GEMM_NC;
        if (g->a_t)
            gemm_task_at(g, m0, m1 < g->M ? m1 : g->M, n0, n1 < g->N ? n1 : g->N);
        else
            gemm_task(g, m0, m1 < g->M ? m1 : g->M, n0, n1 < g->N ? n1 : g->N, NULL);
    }
}

/* C[M][N] (+)= A[M][K] B[N][K]^T (+ bias[N]): B is a weight matrix [out][in] in any
 * storage (F32, BF16, Q8). */
static void gemm_nt_w(int M, int N, int K, const float *A, int lda, wmat B, const float *bias, float *C, int ldc,
                      int accumulate)
{
    gemm_args g;
    g.M = M; g.N = N; g.K = K;
    g.A = A; g.B = B; g.bias = bias; g.C = C;
    g.lda = (size_t)lda; g.ldc = (size_t)ldc;
    g.b_kn = 0;
    g.c_t = 0;
    g.a_t = 0;
    g.b_pre = NULL;
    g.accumulate = accumulate;
    gemm_run(&g);
}

/* C[M][N] (+)= A[M][K] B[N][K]^T (+ bias[N]) with float32 B, e.g. a PyTorch weight [out][in]. */
static void gemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb, const float *bias,
                    float *C, int ldc, int accumulate)
{
    gemm_nt_w(M, N, K, A, lda, wmat_f32(B, (size_t)ldb), bias, C, ldc, accumulate);
}

/* Packs a float32 B [N][K] (row stride ldb) once, in the panels gemm_task would pack for
 * gemm_nt, into dst [GEMM_PREPACKED_FLOATS(N, K)]: for a B that many products share (the
 * mask features, multiplied by each of the decoder's predictions), so that products with
 * few rows do not spend most of their time packing it again. */
static void gemm_prepack(int N, int K, const float *B, int ldb, float *dst)
{
    int panels = (N + GEMM_NR - 1) / GEMM_NR, p0, kc, jp;
    for (p0 = 0; p0 < K; p0 += kc) {
        kc = K - p0 < GEMM_KC ? K - p0 : GEMM_KC;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)N * kc))
#endif
        for (jp = 0; jp < panels; jp++) {
            int j = jp * GEMM_NR, nr = N - j < GEMM_NR ? N - j : GEMM_NR;
            gemm_pack_panel(nr, GEMM_NR, kc, B + (size_t)j * ldb + p0, (size_t)ldb, 0,
                            dst + GEMM_PREPACKED_AT(N, p0, j, kc));
        }
    }
}

/* C[M][N] = A[M][K] B[N][K]^T with B packed by gemm_prepack: the same values as gemm_nt. */
static void gemm_nt_prepacked(int M, int N, int K, const float *A, int lda, const float *b_pre, float *C, int ldc)
{
    gemm_args g;
    g.M = M; g.N = N; g.K = K;
    g.A = A; g.B = wmat_f32(NULL, (size_t)K); g.bias = NULL; g.C = C;
    g.lda = (size_t)lda; g.ldc = (size_t)ldc;
    g.b_kn = 0;
    g.c_t = 0;
    g.a_t = 0;
    g.b_pre = b_pre;
    g.accumulate = 0;
    gemm_run(&g);
}

/* C[M][N] (+)= A[M][K] B[K][N]: B stored row by row, a weight matrix in any storage. */
static void gemm_nn_w(int M, int N, int K, const float *A, int lda, wmat B, float *C, int ldc, int accumulate)
{
    gemm_args g;
    g.M = M; g.N = N; g.K = K;
    g.A = A; g.B = B; g.bias = NULL; g.C = C;
    g.lda = (size_t)lda; g.ldc = (size_t)ldc;
    g.b_kn = 1;
    g.c_t = 0;
    g.a_t = 0;
    g.b_pre = NULL;
    g.accumulate = accumulate;
    gemm_run(&g);
}

/* C[M][N] (+)= A[M][K] B[K][N] with float32 B stored row by row (e.g. attention values). */
static void gemm_nn(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc,
                    int accumulate)
{
    gemm_nn_w(M, N, K, A, lda, wmat_f32(B, (size_t)ldb), C, ldc, accumulate);
}

/* y[rows][out] = x[rows][in] W^T + b: nn.Linear on a batch of rows. */
static void linear(float *y, const float *x, int rows, int in, int out, linear_w l)
{
    gemm_nt_w(rows, out, in, x, in, l.w, l.b, y, out, 0);
}

/* Register tile and K-block of gemm_tn: the accumulators of one tile fill most of the
 * vector registers (AVX-512: 8 x 32 = 16 zmm; AVX2: 6 x 16 = 12 ymm). Each element of C
 * sums over K in the same order whatever the tile, so the result does not depend on it. */
#ifndef GEMM_TN_MR
#if defined(__AVX512F__) && !defined(LOUPE_NO_SIMD)
#define GEMM_TN_MR 8
#define GEMM_TN_NR 32
#elif defined(__AVX2__) && !defined(LOUPE_NO_SIMD)
#define GEMM_TN_MR 6
#define GEMM_TN_NR 16
#else
#define GEMM_TN_MR 4
#define GEMM_TN_NR 16
#endif
#endif
#ifndef GEMM_TN_KC
#define GEMM_TN_KC 256
#endif

/* a * b + c as one fused multiply-add where the target has a fast one (the loops
 * below then vectorise to FMA instructions: ISO C mode forbids the compiler to fuse
 * a * b + c on its own, and a multiply plus an add costs two instructions), else a
 * product and a sum. Full and edge tiles use the same form, so every element of C is
 * rounded the same way wherever its tile lies. */
#ifdef FP_FAST_FMAF
#define gemm_tn_madd(a, b, c) fmaf(a, b, c)
#else
#define gemm_tn_madd(a, b, c) ((a) * (b) + (c))
#endif

/* One tile of gemm_tn: C[mr][nr] += A[K][mr]^T B[K][nr]. */
static void gemm_tn_tile(int mr, int nr, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc)
{
    float acc[GEMM_TN_MR][GEMM_TN_NR];
    int i, j, k;
    memset(acc, 0, sizeof acc);
    if (mr == GEMM_TN_MR && nr == GEMM_TN_NR) {
        for (k = 0; k < K; k++) {
            const float *a = A + (size_t)k * lda, *b = B + (size_t)k * ldb;
            for (i = 0; i < GEMM_TN_MR; i++)
                for (j = 0; j < GEMM_TN_NR; j++) acc[i][j] = gemm_tn_madd(a[i], b[j], acc[i][j]);
        }
    } else {
        for (k = 0; k < K; k++) {
            const float *a = A + (size_t)k * lda, *b = B + (size_t)k * ldb;
            for (i = 0; i < mr; i++)
                for (j = 0; j < nr; j++) acc[i][j] = gemm_tn_madd(a[i], b[j], acc[i][j]);
        }
    }
    for (i = 0; i < mr; i++)
        for (j = 0; j < nr; j++) C[(size_t)i * ldc + j] += acc[i][j];
}

/* Products of gemm_tn at least this big (multiply-adds) go through gemm_run, which packs
 * A's transposed strips and B's panels; smaller ones (attention's per-head products)
 * use gemm_tn_tile's plain tiles, whose setup costs nothing. */
#define GEMM_TN_BLOCKED_MIN (1 << 24)

/* C[M][N] += A[K][M]^T B[K][N]: weight gradients (dW = dY^T X). K is walked in blocks
 * in order and every element of C belongs to one tile, so the sums do not depend on
 * the number of threads. */
static void gemm_tn(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc)
{
    int mb = (M + GEMM_TN_MR - 1) / GEMM_TN_MR, nb = (N + GEMM_TN_NR - 1) / GEMM_TN_NR, k0;
    if ((double)M * N * K >= GEMM_TN_BLOCKED_MIN) {
        gemm_args g;
        g.M = M; g.N = N; g.K = K;
        g.A = A; g.lda = (size_t)lda; g.a_t = 1;
        g.B = wmat_f32(B, (size_t)ldb); g.b_kn = 1;
        g.bias = NULL; g.C = C; g.ldc = (size_t)ldc; g.c_t = 0; g.b_pre = NULL;
        g.accumulate = 1;
        gemm_run(&g);
        return;
    }
    for (k0 = 0; k0 < K; k0 += GEMM_TN_KC) {
        int kc = K - k0 < GEMM_TN_KC ? K - k0 : GEMM_TN_KC, jb, ib;
#ifdef _OPENMP
#pragma omp parallel for collapse(2) schedule(static) if (parallel_ok((double)M * N * kc))
#endif
        for (jb = 0; jb < nb; jb++)
            for (ib = 0; ib < mb; ib++) {
                int i0 = ib * GEMM_TN_MR, j0 = jb * GEMM_TN_NR;
                int mr = M - i0 < GEMM_TN_MR ? M - i0 : GEMM_TN_MR, nr = N - j0 < GEMM_TN_NR ? N - j0 : GEMM_TN_NR;
                gemm_tn_tile(mr, nr, kc, A + (size_t)k0 * lda + i0, lda, B + (size_t)k0 * ldb + j0, ldb,
                             C + (size_t)i0 * ldc + j0, ldc);
            }
    }
}

/* dst[n][m] = src[m][n]^T. */
static void transpose(float *dst, const float *src, int m, int n)
{
    int j;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)m * n))
#endif
    for (j = 0; j < n; j++) {
        int i; /* declared here: private to each thread */
        for (i = 0; i < m; i++) dst[(size_t)j * m + i] = src[(size_t)i * n + j];
    }
}

/* Columns handled together by bias_backward (double accumulators on the stack). */
#define BIAS_BLOCK 64

/* Bias gradient: db[n] += column sums of dy[rows][n] (row stride ldy), in double. */
static void bias_backward(float *db, const float *dy, int ldy, int rows, int n)
{
    int nb = (n + BIAS_BLOCK - 1) / BIAS_BLOCK, blk;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)rows * n))
#endif
    for (blk = 0; blk < nb; blk++) {
        double acc[BIAS_BLOCK];
        int j0 = blk * BIAS_BLOCK, nj = n - j0 < BIAS_BLOCK ? n - j0 : BIAS_BLOCK, r, j;
        for (j = 0; j < nj; j++) acc[j] = 0.0;
        for (r = 0; r < rows; r++)
            for (j = 0; j < nj; j++) acc[j] += dy[(size_t)r * ldy + j0 + j];
        for (j = 0; j < nj; j++) db[j0 + j] += (float)acc[j];
    }
}

/* nn.Linear backward: dy [rows][out] (row stride ldy), x [rows][in] ->
 * dx [rows][in] += dy W (when dx), dw [out][in] += dy^T x, db [out] += sums of dy (when db).
 * wt: scratch of in*out floats (W transposed, so that dx is a gemm_nt). */
static void linear_backward(float *dx, float *dw, float *db, const float *dy, int ldy, const float *x, int rows,
                            int in, int out, const float *w, float *wt)
{
    if (dx) {
        transpose(wt, w, out, in);
        gemm_nt(rows, in, out, dy, ldy, wt, out, NULL, dx, in, 1);
    }
    gemm_tn(out, in, rows, dy, ldy, x, in, dw, in);
    if (db) bias_backward(db, dy, ldy, rows, out);
}

/* Gradient views of a linear layer and a norm (weight, bias): float32 buffers in
 * upstream layout ([out][in], [out]) that backwards add into; a NULL member is not
 * trained (its gradient is skipped, input gradients still flow). */
typedef struct linear_g { float *w, *b; } linear_g;
typedef struct norm_g { float *w, *b; } norm_g;

/* nn.Linear backward with the weight in any storage (a frozen BF16/Q8 matrix included):
 * dy [rows][out] (row stride ldy), x [rows][in] (row stride ldx) -> dx [rows][in] (row
 * stride lddx) += dy W when dx, g.w [out][in] += dy^T x, g.b [out] += column sums of dy
 * (each when not NULL; x is read for g.w only). */
static void linear_backward_w(float *dx, int lddx, linear_g g, const float *dy, int ldy, const float *x, int ldx,
                              int rows, int in, int out, wmat w)
{
    if (dx) gemm_nn_w(rows, in, out, dy, ldy, w, dx, lddx, 1);
    if (g.w) gemm_tn(out, in, rows, dy, ldy, x, ldx, g.w, in);
    if (g.b) bias_backward(g.b, dy, ldy, rows, out);
}

/* Row sums are kept in this many lanes, combined in a fixed order at the end: the loops
 * vectorise and the result is the same on every instruction set. */
#define ROW_LANES 8

/* Mean and (biased) variance of one row of n floats, in double, each sum kept in
 * ROW_LANES partial sums added in a fixed order: the loops vectorise, and the forward
 * and the backward of LayerNorm see the same statistics. */
static void row_mean_var(const float *x, int n, double *mean, double *var)
{
    double part[ROW_LANES], m = 0.0, v = 0.0;
    int i, l;
    for (l = 0; l < ROW_LANES; l++) part[l] = 0.0;
    for (i = 0; i + ROW_LANES <= n; i += ROW_LANES)
        for (l = 0; l < ROW_LANES; l++) part[l] += x[i + l];
    for (l = 0; i < n; i++, l++) part[l] += x[i];
    for (l = 0; l < ROW_LANES; l++) m += part[l];
    m /= n;
    for (l = 0; l < ROW_LANES; l++) part[l] = 0.0;
    for (i = 0; i + ROW_LANES <= n; i += ROW_LANES)
        for (l = 0; l < ROW_LANES; l++) part[l] += (x[i + l] - m) * (x[i + l] - m);
    for (l = 0; i < n; i++, l++) part[l] += (x[i] - m) * (x[i] - m);
    for (l = 0; l < ROW_LANES; l++) v += part[l];
    *mean = m;
    *var = v / n;
}

/* nn.LayerNorm over the last dimension of rows (in place allowed). */
static void layernorm(float *y, const float *x, int rows, int dim, norm_w n, float eps)
{
    int r;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)rows * dim * 4))
#endif
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim;
        float *yr = y + (size_t)r * dim;
        double mean, var;
        float fm, rstd;
        int i;
        row_mean_var(xr, dim, &mean, &var);
        fm = (float)mean;
        rstd = (float)(1.0 / sqrt(var + eps));
        for (i = 0; i < dim; i++) yr[i] = (xr[i] - fm) * rstd * n.w[i] + n.b[i];
    }
}

/* Columns handled together by the norm backwards' parameter gradients. */
#define NORM_BLOCK 64

/* nn.LayerNorm backward, from its input x [rows][dim]: dx += rstd (g - mean g - xhat mean(g xhat))
 * with g = dy * weight, dw += sum of dy xhat, db += sum of dy (over rows; each skipped
 * when NULL, a frozen norm). dx must not alias dy. stats: scratch of 2*rows floats (mean
 * and 1/std of each row). */
static void layernorm_backward(float *dx, float *dw, float *db, const float *dy, const float *x, int rows, int dim,
                               norm_w n, float eps, float *stats)
{
    int r, nb = (dim + NORM_BLOCK - 1) / NORM_BLOCK, blk;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)rows * dim * 6))
#endif
    for (r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim, *gr = dy + (size_t)r * dim;
        float *dr = dx + (size_t)r * dim;
        /* the row sums in ROW_LANES partial sums each, as layernorm: the loops vectorise */
        double mean, var, sg = 0.0, sgx = 0.0, rstd, p1[ROW_LANES], p2[ROW_LANES];
        int i, l;
        row_mean_var(xr, dim, &mean, &var);
        rstd = 1.0 / sqrt(var + eps);
        for (l = 0; l < ROW_LANES; l++) p1[l] = p2[l] = 0.0;
        for (i = 0; i + ROW_LANES <= dim; i += ROW_LANES)
            for (l = 0; l < ROW_LANES; l++) {
                double g = (double)gr[i + l] * n.w[i + l];
                p1[l] += g;
                p2[l] += g * (xr[i + l] - mean) * rstd;
            }
        for (l = 0; i < dim; i++, l++) {
            double g = (double)gr[i] * n.w[i];
            p1[l] += g;
            p2[l] += g * (xr[i] - mean) * rstd;
        }
        for (l = 0; l < ROW_LANES; l++) {
            sg += p1[l];
            sgx += p2[l];
        }
        sg /= dim;
        sgx /= dim;
        for (i = 0; i < dim; i++)
            dr[i] += (float)(rstd * ((double)gr[i] * n.w[i] - sg - (xr[i] - mean) * rstd * sgx));
        stats[2 * r] = (float)mean;
        stats[2 * r + 1] = (float)rstd;
    }
    if (!dw && !db) return;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)rows * dim * 2))
#endif
    for (blk = 0; blk < nb; blk++) {
        double aw[NORM_BLOCK], ab[NORM_BLOCK];
        int i0 = blk * NORM_BLOCK, ni = dim - i0 < NORM_BLOCK ? dim - i0 : NORM_BLOCK, i, rr;
        for (i = 0; i < ni; i++) aw[i] = ab[i] = 0.0;
        for (rr = 0; rr < rows; rr++) {
            const float *xr = x + (size_t)rr * dim + i0, *gr = dy + (size_t)rr * dim + i0;
            double mean = stats[2 * rr], rstd = stats[2 * rr + 1];
            for (i = 0; i < ni; i++) {
                aw[i] += (double)gr[i] * (xr[i] - mean) * rstd;
                ab[i] += gr[i];
            }
        }
        for (i = 0; i < ni; i++) {
            if (dw) dw[i0 + i] += (float)aw[i];
            if (db) db[i0 + i] += (float)ab[i];
        }
    }
}

/* nn.GroupNorm on a channels-last map [hw][c] (in place). */
static void groupnorm_hwc(float *x, int hw, int c, int groups, norm_w n, float eps)
{
    int g, cpg = c / groups;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)hw * c * 4))
#endif
    for (g = 0; g < groups; g++) {
        double mean = 0.0, var = 0.0;
        float fm, rstd;
        int p, i, c0 = g * cpg;
        for (p = 0; p < hw; p++)
            for (i = 0; i < cpg; i++) mean += x[(size_t)p * c + c0 + i];
        mean /= (double)hw * cpg;
        for (p = 0; p < hw; p++)
            for (i = 0; i < cpg; i++) {
                double d = x[(size_t)p * c + c0 + i] - mean;
                var += d * d;
            }
        var /= (double)hw * cpg;
        fm = (float)mean;
        rstd = (float)(1.0 / sqrt(var + eps));
        for (p = 0; p < hw; p++)
            for (i = 0; i < cpg; i++) {
                float *v = &x[(size_t)p * c + c0 + i];
                *v = (*v - fm) * rstd * n.w[c0 + i] + n.b[c0 + i];
            }
    }
}

/* nn.GroupNorm backward on channels-last maps, from its input x [hw][c]: per group,
 * dx += rstd (g - mean g - xhat mean(g xhat)) with g = dy * weight; dw, db [c] += per
 * channel sums of dy xhat and dy. Each group owns its channels (deterministic). */
static void groupnorm_hwc_backward(float *dx, float *dw, float *db, const float *dy, const float *x, int hw, int c,
                                   int groups, norm_w n, float eps)
{
    int g, cpg = c / groups;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)hw * c * 8))
#endif
    for (g = 0; g < groups; g++) {
        double mean = 0.0, var = 0.0, sg = 0.0, sgx = 0.0, rstd, cnt = (double)hw * cpg;
        int p, i, c0 = g * cpg;
        for (p = 0; p < hw; p++)
            for (i = 0; i < cpg; i++) mean += x[(size_t)p * c + c0 + i];
        mean /= cnt;
        for (p = 0; p < hw; p++)
            for (i = 0; i < cpg; i++) {
                double d = x[(size_t)p * c + c0 + i] - mean;
                var += d * d;
            }
        var /= cnt;
        rstd = 1.0 / sqrt(var + eps);
        for (i = 0; i < cpg; i++) {
            double sw = 0.0, sb = 0.0;
            for (p = 0; p < hw; p++) {
                size_t k = (size_t)p * c + c0 + i;
                double xh = (x[k] - mean) * rstd;
                sw += dy[k] * xh;
                sb += dy[k];
            }
            dw[c0 + i] += (float)sw;
            db[c0 + i] += (float)sb;
            sg += sb * n.w[c0 + i];
            sgx += sw * n.w[c0 + i];
        }
        sg /= cnt;
        sgx /= cnt;
        for (p = 0; p < hw; p++)
            for (i = 0; i < cpg; i++) {
                size_t k = (size_t)p * c + c0 + i;
                dx[k] += (float)(rstd * ((double)dy[k] * n.w[c0 + i] - sg - (x[k] - mean) * rstd * sgx));
            }
    }
}

/* ---- exp and erf as plain arithmetic ----
 * libm's expf and erff are one call per element, which no compiler vectorises; the
 * softmax and GELU loops spend most of their time in them. These versions use only
 * multiply, add and bit operations, inline, so the loops around them vectorise. */

/* The float's bits and back (memcpy: the C99 way to reinterpret, no aliasing). */
static inline uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}
static inline float bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define EXP_LOG2E 1.44269504088896341f
/* ln 2 in two parts: HI has few significant bits, so n * HI is exact for our n. */
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO (-2.12194440054690583e-4f)
/* 1.5 * 2^23: adding it to a float below 2^22 rounds it to an integer that then sits
 * in the low mantissa bits. */
#define EXP_ROUNDER 12582912.0f
#define EXP_MIN_ARG (-87.3365447505531f) /* e^x below FLT_MIN: flushed to 0 */
#define EXP_MAX_ARG 88.0f                /* larger x saturate (never reached here) */
#define FLOAT_EXP_BIAS 127u
#define FLOAT_MANT_BITS 23

/* e^x: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its Taylor series to r^7 (the rest
 * is below 1e-8 relative), times 2^n written into the exponent bits. Within 2 ulp of
 * expf; e^-inf = 0, NaN stays NaN. */
static inline float exp_f32(float x)
{
    float xc = x < EXP_MIN_ARG ? EXP_MIN_ARG : x > EXP_MAX_ARG ? EXP_MAX_ARG : x;
    float t = xc * EXP_LOG2E + EXP_ROUNDER, n = t - EXP_ROUNDER;
    float r = (xc - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 1.0f / 2;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    p *= bits_float((float_bits(t) - float_bits(EXP_ROUNDER) + FLOAT_EXP_BIAS) << FLOAT_MANT_BITS);
    return x < EXP_MIN_ARG ? 0.0f : p;
}

/* erf(x) / x as a Chebyshev series in u = x^2 / 8 - 1 over |x| <= 4 (k = 0 term
 * halved); tools/erf_coefficients.py derives it. Beyond |x| = 4, erf rounds to +-1. */
#define ERF_SATURATE 4.0f
#define ERF_TERMS 18
static const float erf_chebyshev[ERF_TERMS] = {
    9.718259138e-01f, -3.454078550e-01f, 1.618291012e-01f, -7.648275611e-02f, 3.466993680e-02f,
    -1.481186415e-02f, 5.922937956e-03f, -2.211840659e-03f, 7.714154278e-04f, -2.515965878e-04f,
    7.688658221e-05f, -2.206549594e-05f, 5.961274041e-06f, -1.519775071e-06f, 3.664930433e-07f,
    -8.378998354e-08f, 1.820144884e-08f, -3.764477919e-09f
};

/* Values erf_block takes at a time: its buffers stay in L1. */
#define ERF_BLOCK 64

/* y[i] = erf(x[i]) for m <= ERF_BLOCK values (y may alias x), by Clenshaw's recurrence
 * on that series run over all m values at once, so that the loops over values
 * vectorise: within 3e-7 of the exact value (libm's erff: 6e-8), far below the
 * forward pass's float noise. */
static void erf_block(float *y, const float *x, int m)
{
    float xc[ERF_BLOCK], u[ERF_BLOCK], b1[ERF_BLOCK], b2[ERF_BLOCK];
    int i, k;
    for (i = 0; i < m; i++) {
        float v = x[i] < -ERF_SATURATE ? -ERF_SATURATE : x[i];
        xc[i] = v > ERF_SATURATE ? ERF_SATURATE : v;
        u[i] = xc[i] * xc[i] * (2.0f / (ERF_SATURATE * ERF_SATURATE)) - 1.0f;
        b1[i] = b2[i] = 0.0f;
    }
    for (k = ERF_TERMS - 1; k > 0; k--)
        for (i = 0; i < m; i++) {
            float b = erf_chebyshev[k] + 2.0f * u[i] * b1[i] - b2[i];
            b2[i] = b1[i];
            b1[i] = b;
        }
    for (i = 0; i < m; i++) y[i] = xc[i] * (0.5f * erf_chebyshev[0] + u[i] * b1[i] - b2[i]);
}

/* Exact (erf) GELU: y = x * (1 + erf(x / sqrt 2)) / 2 over n floats (y may be x). */
static void gelu(float *y, const float *x, size_t n)
{
    size_t start;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)n * 16))
#endif
    for (start = 0; start < n; start += ERF_BLOCK) {
        float e[ERF_BLOCK], *o = y + start;
        const float *v = x + start;
        int m = n - start < ERF_BLOCK ? (int)(n - start) : ERF_BLOCK, i;
        for (i = 0; i < m; i++) e[i] = v[i] * (float)LOUPE_SQRT1_2;
        erf_block(e, e, m);
        for (i = 0; i < m; i++) o[i] = 0.5f * v[i] * (1.0f + e[i]);
    }
}

/* GELU backward from its input x: dx += dy (Phi(x) + x phi(x)), Phi, phi the normal
 * distribution and density, in float32 as PyTorch's CPU kernel computes it; erf and exp
 * by the inline versions above, so that the loops vectorise (the backbone's MLPs pass
 * 577 x 4096 values a block through here). dx must not alias dy. */
static void gelu_backward(float *dx, const float *dy, const float *x, size_t n)
{
    size_t start;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)n * 24))
#endif
    for (start = 0; start < n; start += ERF_BLOCK) {
        float e[ERF_BLOCK];
        const float *v = x + start;
        int m = n - start < ERF_BLOCK ? (int)(n - start) : ERF_BLOCK, i;
        for (i = 0; i < m; i++) e[i] = v[i] * (float)LOUPE_SQRT1_2;
        erf_block(e, e, m);
        for (i = 0; i < m; i++) {
            float cdf = 0.5f * (1.0f + e[i]), pdf = (float)LOUPE_INV_SQRT_2PI * exp_f32(-0.5f * v[i] * v[i]);
            dx[start + i] += dy[start + i] * (cdf + v[i] * pdf);
        }
    }
}

/* ReLU in place. */
static void relu(float *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

/* ReLU backward from its output y: dx += dy where y > 0. dx must not alias dy. */
static void relu_backward(float *dx, const float *dy, const float *y, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) dx[i] += y[i] > 0.0f ? dy[i] : 0.0f;
}

/* Logistic sigmoid as PyTorch computes it in float32. */
static float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* sigmoidf(x) < 0.5f (upstream's attention mask test) without an expf for all but a
 * sliver of x: for x >= 0, expf(-x) <= 1 and the sigmoid is at least 0.5; below -1e-3,
 * 1 + expf(-x) exceeds 2 in float32 and it is below 0.5; NaN gives 0 either way. */
static int sigmoid_below_half(float x)
{
    if (x >= 0.0f) return 0;
    if (x < -1e-3f) return 1;
    return sigmoidf(x) < 0.5f;
}

/* The largest of v[0..n), a vector of lanes at a time (compilers do not vectorise a
 * maximum of floats on their own: it depends on the order when there are NaNs). Where
 * a NaN is, softmax_rows' row is NaN whichever maximum this gives. */
static float row_max(const float *v, int n)
{
    float mx = -INFINITY;
    int i = 0;
#if GEMM_LANES > 1
    float lanes[GEMM_LANES];
    gemm_vec m = vec_bcast(&mx);
    int l;
    for (; i + GEMM_LANES <= n; i += GEMM_LANES) m = vec_max(vec_load(v + i), m);
    vec_store(lanes, m);
    for (l = 0; l < GEMM_LANES; l++) mx = lanes[l] > mx ? lanes[l] : mx;
#endif
    for (; i < n; i++) mx = v[i] > mx ? v[i] : mx;
    return mx;
}

/* Softmax of scale * x over each row of x [rows][n], in place; entries whose mask byte
 * is nonzero ([rows][n], NULL for none) count as -inf. */
static void softmax_rows(float *x, int rows, int n, float scale, const unsigned char *mask)
{
    int r, i, l;
    for (r = 0; r < rows; r++) {
        float *v = x + (size_t)r * n, part[ROW_LANES], mx, sum;
        const unsigned char *m = mask ? mask + (size_t)r * n : NULL;
        if (m)
            for (i = 0; i < n; i++) v[i] = m[i] ? -INFINITY : v[i] * scale;
        else
            for (i = 0; i < n; i++) v[i] *= scale;
        mx = row_max(v, n);
        for (i = 0; i < n; i++) v[i] = exp_f32(v[i] - mx);
        for (l = 0; l < ROW_LANES; l++) part[l] = 0.0f;
        for (i = 0; i + ROW_LANES <= n; i += ROW_LANES)
            for (l = 0; l < ROW_LANES; l++) part[l] += v[i + l];
        for (l = 0; i < n; i++, l++) part[l] += v[i];
        for (sum = part[0], l = 1; l < ROW_LANES; l++) sum += part[l];
        for (i = 0; i < n; i++) v[i] /= sum;
    }
}

/* sum of a[i] b[i] over n floats in double, kept in ROW_LANES partial sums combined in
 * a fixed order: the loop vectorises (one running sum is a chain of dependent adds) and
 * the result is the same on every instruction set. */
static double row_dot(const float *a, const float *b, int n)
{
    double part[ROW_LANES], sum = 0.0;
    int i, l;
    for (l = 0; l < ROW_LANES; l++) part[l] = 0.0;
    for (i = 0; i + ROW_LANES <= n; i += ROW_LANES)
        for (l = 0; l < ROW_LANES; l++) part[l] += (double)a[i + l] * b[i + l];
    for (l = 0; i < n; i++, l++) part[l] += (double)a[i] * b[i];
    for (l = 0; l < ROW_LANES; l++) sum += part[l];
    return sum;
}

/* Softmax backward from its output y [rows][n]: dx += y (dy - sum(y dy)) per row.
 * dx must not alias dy. */
static void softmax_rows_backward(float *dx, const float *dy, const float *y, int rows, int n)
{
    int r, i;
    for (r = 0; r < rows; r++) {
        const float *yr = y + (size_t)r * n, *gr = dy + (size_t)r * n;
        double dot = row_dot(yr, gr, n);
        for (i = 0; i < n; i++) dx[(size_t)r * n + i] += (float)(yr[i] * (gr[i] - dot));
    }
}

/* Elementwise y = a + b over n floats (y may alias a). */
static void add(float *y, const float *a, const float *b, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) y[i] = a[i] + b[i];
}

/* Multi-head scaled dot-product attention. For every head h (columns h*dh..):
 * out[Tq][h] = softmax(scale * Q_h K_h^T, masked) V_h. mask is [Tq][Tk] bytes,
 * nonzero = may not attend (NULL: none). scratch holds max_threads() * Tq * Tk floats:
 * one head's score matrix per thread, never more. */
static void attention(float *out, int ldo, const float *Q, int ldq, const float *K, int ldk, const float *V, int ldv,
                      int Tq, int Tk, int heads, int dh, float scale, const unsigned char *mask, float *scratch)
{
    int h;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)Tq * Tk * dh * heads))
#endif
    for (h = 0; h < heads; h++) {
        float *S = scratch + (size_t)thread_id() * Tq * Tk;
        gemm_nt(Tq, Tk, dh, Q + (size_t)h * dh, ldq, K + (size_t)h * dh, ldk, NULL, S, Tk, 0);
        softmax_rows(S, Tq, Tk, scale, mask);
        gemm_nn(Tq, dh, Tk, S, Tk, V + (size_t)h * dh, ldv, out + (size_t)h * dh, ldo, 0);
    }
}

/* Backward of attention (nn.MultiheadAttention's core, masked or not): dO [Tq][heads*dh]
 * -> dQ [Tq][heads*dh], dK, dV [Tk][heads*dh] += (row strides ld*). For every head h, with
 * P = softmax(scale Q_h K_h^T, masked): dP = dO_h V_h^T, dV_h += P^T dO_h,
 * dS = P (dP - rowsum(P dP)), dQ_h += scale dS K_h, dK_h += scale dS^T Q_h. Heads own
 * disjoint columns (deterministic). scratch holds max_threads() * 2 * Tq * Tk floats
 * (one head's P and dP per thread). */
static void attention_backward(float *dQ, int lddq, float *dK, int lddk, float *dV, int lddv, const float *dO,
                               int lddo, const float *Q, int ldq, const float *K, int ldk, const float *V, int ldv,
                               int Tq, int Tk, int heads, int dh, float scale, const unsigned char *mask,
                               float *scratch)
{
    int h;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)Tq * Tk * dh * heads * 4))
#endif
    for (h = 0; h < heads; h++) {
        float *P = scratch + (size_t)thread_id() * 2 * Tq * Tk, *dP = P + (size_t)Tq * Tk;
        size_t ho = (size_t)h * dh;
        int r, j;
        gemm_nt(Tq, Tk, dh, Q + ho, ldq, K + ho, ldk, NULL, P, Tk, 0);
        softmax_rows(P, Tq, Tk, scale, mask);
        gemm_nt(Tq, Tk, dh, dO + ho, lddo, V + ho, ldv, NULL, dP, Tk, 0);
        gemm_tn(Tk, dh, Tq, P, Tk, dO + ho, lddo, dV + ho, lddv);
        for (r = 0; r < Tq; r++) {
            const float *pr = P + (size_t)r * Tk;
            float *gr = dP + (size_t)r * Tk;
            double dot = row_dot(pr, gr, Tk);
            for (j = 0; j < Tk; j++) gr[j] = (float)(pr[j] * (gr[j] - dot) * scale);
        }
        gemm_nn(Tq, dh, Tk, dP, Tk, K + ho, ldk, dQ + ho, lddq, 1);
        gemm_tn(Tk, dh, Tq, dP, Tk, Q + ho, ldq, dK + ho, lddk);
    }
}

/* Source indices and weights of PyTorch's bilinear interpolation along one axis
 * (align_corners=False, no antialias): src = (dst + 0.5) * in/out - 0.5, clamped at 0. */
static void interp_axis(int in, int out, int *i0, int *i1, float *w0, float *w1)
{
    float scale = (float)in / (float)out;
    int d;
    for (d = 0; d < out; d++) {
        float src = scale * ((float)d + 0.5f) - 0.5f;
        int x0;
        if (src < 0.0f) src = 0.0f;
        x0 = (int)src;
        if (x0 > in - 1) x0 = in - 1;
        i0[d] = x0;
        i1[d] = x0 + (x0 < in - 1 ? 1 : 0);
        w1[d] = src - (float)x0;
        w0[d] = 1.0f - w1[d];
    }
}

/* Scratch floats interp_plane needs for an out_h x out_w output. Half of it holds int
 * indices, so it must be allocated memory (malloc, arena), never a declared float array. */
#define INTERP_SCRATCH(oh, ow) (4 * (size_t)((oh) + (ow)))

/* F.interpolate(mode="bilinear", align_corners=False) of one [ih][iw] plane. */
static void interp_plane(const float *in, int ih, int iw, float *out, int oh, int ow, float *scratch)
{
    int *y0 = (int *)(void *)scratch, *y1 = y0 + oh, *x0 = y1 + oh, *x1 = x0 + ow;
    float *wy0 = (float *)(void *)(x1 + ow), *wy1 = wy0 + oh, *wx0 = wy1 + oh, *wx1 = wx0 + ow;
    int y;
    interp_axis(ih, oh, y0, y1, wy0, wy1);
    interp_axis(iw, ow, x0, x1, wx0, wx1);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok(4.0 * oh * ow))
#endif
    for (y = 0; y < oh; y++) { /* rows are independent: the same values on any number of threads */
        const float *r0 = in + (size_t)y0[y] * iw, *r1 = in + (size_t)y1[y] * iw;
        float *o = out + (size_t)y * ow;
        int x;
        for (x = 0; x < ow; x++)
            o[x] = wy0[y] * (wx0[x] * r0[x0[x]] + wx1[x] * r0[x1[x]]) +
                   wy1[y] * (wx0[x] * r1[x0[x]] + wx1[x] * r1[x1[x]]);
    }
}

/* The same interpolation on a channels-last map [ih*iw][c]. */
static void interp_hwc(const float *in, int ih, int iw, int c, float *out, int oh, int ow, float *scratch)
{
    int *y0 = (int *)(void *)scratch, *y1 = y0 + oh, *x0 = y1 + oh, *x1 = x0 + ow;
    float *wy0 = (float *)(void *)(x1 + ow), *wy1 = wy0 + oh, *wx0 = wy1 + oh, *wx1 = wx0 + ow;
    int y, x, ch;
    interp_axis(ih, oh, y0, y1, wy0, wy1);
    interp_axis(iw, ow, x0, x1, wx0, wx1);
    for (y = 0; y < oh; y++)
        for (x = 0; x < ow; x++) {
            const float *a = in + ((size_t)y0[y] * iw + x0[x]) * c, *b = in + ((size_t)y0[y] * iw + x1[x]) * c;
            const float *d = in + ((size_t)y1[y] * iw + x0[x]) * c, *e = in + ((size_t)y1[y] * iw + x1[x]) * c;
            float *o = out + ((size_t)y * ow + x) * c;
            for (ch = 0; ch < c; ch++)
                o[ch] = wy0[y] * (wx0[x] * a[ch] + wx1[x] * b[ch]) + wy1[y] * (wx0[x] * d[ch] + wx1[x] * e[ch]);
        }
}

/* Channels handled together by interp_hwc_backward. */
#define INTERP_BLOCK 16

/* Backward of interp_hwc: dout [oh*ow][c] scattered with the bilinear weights into
 * din [ih*iw][c] +=; threads own channel blocks (deterministic). */
static void interp_hwc_backward(float *din, const float *dout, int ih, int iw, int c, int oh, int ow, float *scratch)
{
    int *y0 = (int *)(void *)scratch, *y1 = y0 + oh, *x0 = y1 + oh, *x1 = x0 + ow;
    float *wy0 = (float *)(void *)(x1 + ow), *wy1 = wy0 + oh, *wx0 = wy1 + oh, *wx1 = wx0 + ow;
    int nb = (c + INTERP_BLOCK - 1) / INTERP_BLOCK, blk;
    interp_axis(ih, oh, y0, y1, wy0, wy1);
    interp_axis(iw, ow, x0, x1, wx0, wx1);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)oh * ow * c * 4))
#endif
    for (blk = 0; blk < nb; blk++) {
        int c0 = blk * INTERP_BLOCK, nc = c - c0 < INTERP_BLOCK ? c - c0 : INTERP_BLOCK, y, x, ch;
        for (y = 0; y < oh; y++)
            for (x = 0; x < ow; x++) {
                const float *g = dout + ((size_t)y * ow + x) * c + c0;
                float *a = din + ((size_t)y0[y] * iw + x0[x]) * c + c0, *b = din + ((size_t)y0[y] * iw + x1[x]) * c + c0;
                float *d = din + ((size_t)y1[y] * iw + x0[x]) * c + c0, *e = din + ((size_t)y1[y] * iw + x1[x]) * c + c0;
                float w00 = wy0[y] * wx0[x], w01 = wy0[y] * wx1[x], w10 = wy1[y] * wx0[x], w11 = wy1[y] * wx1[x];
                for (ch = 0; ch < nc; ch++) {
                    a[ch] += w00 * g[ch];
                    b[ch] += w01 * g[ch];
                    d[ch] += w10 * g[ch];
                    e[ch] += w11 * g[ch];
                }
            }
    }
}

/* The 2 x 2 output pixels of a stride-2 transposed convolution: tap t = 2 * di + dj. */
#define CONVT_TAPS 4

/* nn.ConvTranspose2d(kernel 2, stride 2) on channels-last maps:
 * in [h*w][ci] -> out [2h*2w][co]. Every input pixel feeds its own 2 x 2 output pixels,
 * so the whole layer is one product with the PyTorch weight read in place as
 * [ci][co*4] (any storage): prod [h*w][co*4] = in x weight, whose column 4*o + t is channel o of
 * output pixel (2i + di, 2j + dj); then each column goes to its pixel, plus the bias.
 * prod: scratch of h*w*co*4 floats. */
static void conv_transpose2x2_hwc(float *out, const float *in, int h, int w, int ci, int co, wmat weight,
                                  const float *bias, float *prod)
{
    int i;
    gemm_nn_w(h * w, CONVT_TAPS * co, ci, in, ci, weight, prod, CONVT_TAPS * co, 0);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)h * w * co * CONVT_TAPS))
#endif
    for (i = 0; i < h; i++) {
        int j, t, o;
        for (j = 0; j < w; j++) {
            const float *p = prod + ((size_t)i * w + j) * CONVT_TAPS * co;
            for (t = 0; t < CONVT_TAPS; t++) {
                float *dst = out + ((size_t)(2 * i + t / 2) * 2 * w + 2 * j + t % 2) * co;
                for (o = 0; o < co; o++) dst[o] = p[(size_t)o * CONVT_TAPS + t] + bias[o];
            }
        }
    }
}

/* nn.ConvTranspose2d(2, stride 2) backward on channels-last maps: dout [2h*2w][co] ->
 * din [h*w][ci] += (when din), dweight [ci][co][2][2] +=, db [co] +=. The output
 * gradient is gathered into the product's layout dprod [h*w][co*4] (scratch of
 * h*w*co*4 floats); then din += dprod weight^T and dweight += in^T dprod. */
static void conv_transpose2x2_hwc_backward(float *din, float *dweight, float *db, const float *dout, const float *in,
                                           int h, int w, int ci, int co, const float *weight, float *dprod)
{
    int i, n = CONVT_TAPS * co;
    bias_backward(db, dout, co, 4 * h * w, co);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)h * w * n))
#endif
    for (i = 0; i < h; i++) { /* rows are independent */
        int j, t, o;
        for (j = 0; j < w; j++) {
            float *p = dprod + ((size_t)i * w + j) * n;
            for (t = 0; t < CONVT_TAPS; t++) {
                const float *src = dout + ((size_t)(2 * i + t / 2) * 2 * w + 2 * j + t % 2) * co;
                for (o = 0; o < co; o++) p[(size_t)o * CONVT_TAPS + t] = src[o];
            }
        }
    }
    if (din) gemm_nt(h * w, ci, n, dprod, n, weight, n, NULL, din, ci, 1);
    gemm_tn(ci, n, h * w, in, ci, dprod, n, dweight, n);
}

/* nn.MaxPool2d(2, 2) on a channels-last map: [h*w][c] -> [(h/2)*(w/2)][c]. */
static void maxpool2x2_hwc(float *out, const float *in, int h, int w, int c)
{
    int oh = h / 2, ow = w / 2, y, x, ch;
    for (y = 0; y < oh; y++)
        for (x = 0; x < ow; x++) {
            const float *a = in + ((size_t)(2 * y) * w + 2 * x) * c, *b = a + c;
            const float *d = a + (size_t)w * c, *e = d + c;
            float *o = out + ((size_t)y * ow + x) * c;
            for (ch = 0; ch < c; ch++) {
                float m0 = a[ch] > b[ch] ? a[ch] : b[ch], m1 = d[ch] > e[ch] ? d[ch] : e[ch];
                o[ch] = m0 > m1 ? m0 : m1;
            }
        }
}

/* nn.MaxPool2d(2, 2) backward: dout [(h/2)*(w/2)][c] goes to the first maximum of each
 * window (row-major order, as PyTorch): din [h*w][c] +=. */
static void maxpool2x2_hwc_backward(float *din, const float *dout, const float *in, int h, int w, int c)
{
    int oh = h / 2, ow = w / 2, y, x, ch, k;
    for (y = 0; y < oh; y++)
        for (x = 0; x < ow; x++) {
            size_t at[4];
            at[0] = ((size_t)(2 * y) * w + 2 * x) * c;
            at[1] = at[0] + c;
            at[2] = at[0] + (size_t)w * c;
            at[3] = at[2] + c;
            for (ch = 0; ch < c; ch++) {
                size_t best = at[0] + ch;
                for (k = 1; k < 4; k++)
                    if (in[at[k] + ch] > in[best]) best = at[k] + ch;
                din[best] += dout[((size_t)y * ow + x) * c + ch];
            }
        }
}

/* Depthwise 3x3 convolution, padding 1, no bias, channels-last; w9 is [9][c]. */
static void depthwise3x3_hwc(float *out, const float *in, int h, int w, int c, const float *w9)
{
    int y;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)h * w * c * 9))
#endif
    for (y = 0; y < h; y++) {
        int x, ty, tx, ch;
        for (x = 0; x < w; x++) {
            float *o = out + ((size_t)y * w + x) * c;
            for (ch = 0; ch < c; ch++) o[ch] = 0.0f;
            for (ty = 0; ty < 3; ty++)
                for (tx = 0; tx < 3; tx++) {
                    int yy = y + ty - 1, xx = x + tx - 1;
                    const float *iv, *wv;
                    if (yy < 0 || yy >= h || xx < 0 || xx >= w) continue;
                    iv = in + ((size_t)yy * w + xx) * c;
                    wv = w9 + (size_t)(ty * 3 + tx) * c;
                    for (ch = 0; ch < c; ch++) o[ch] += iv[ch] * wv[ch];
                }
        }
    }
}

/* Channels handled together by depthwise3x3_hwc_backward's kernel gradient. */
#define DEPTHWISE_BLOCK 64

/* Depthwise 3x3 convolution backward (padding 1): dout [h*w][c] -> din [h*w][c] +=
 * (when din; gathered per input row), dw9 [9][c] += (per channel block, in double). */
static void depthwise3x3_hwc_backward(float *din, float *dw9, const float *dout, const float *in, int h, int w, int c,
                                      const float *w9)
{
    int y, nb = (c + DEPTHWISE_BLOCK - 1) / DEPTHWISE_BLOCK, blk;
    if (din) {
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)h * w * c * 9))
#endif
        for (y = 0; y < h; y++) {
            int x, t, ch;
            for (x = 0; x < w; x++) {
                float *d = din + ((size_t)y * w + x) * c;
                for (t = 0; t < 9; t++) {
                    int oy = y - (t / 3 - 1), ox = x - (t % 3 - 1);
                    const float *g, *wv;
                    if (oy < 0 || oy >= h || ox < 0 || ox >= w) continue;
                    g = dout + ((size_t)oy * w + ox) * c;
                    wv = w9 + (size_t)t * c;
                    for (ch = 0; ch < c; ch++) d[ch] += g[ch] * wv[ch];
                }
            }
        }
    }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)h * w * c * 9))
#endif
    for (blk = 0; blk < nb; blk++) {
        double acc[9][DEPTHWISE_BLOCK];
        int c0 = blk * DEPTHWISE_BLOCK, nc = c - c0 < DEPTHWISE_BLOCK ? c - c0 : DEPTHWISE_BLOCK, t, yy, x, ch;
        for (t = 0; t < 9; t++)
            for (ch = 0; ch < nc; ch++) acc[t][ch] = 0.0;
        for (yy = 0; yy < h; yy++)
            for (x = 0; x < w; x++) {
                const float *g = dout + ((size_t)yy * w + x) * c + c0;
                for (t = 0; t < 9; t++) {
                    int iy = yy + t / 3 - 1, ix = x + t % 3 - 1;
                    const float *iv;
                    if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                    iv = in + ((size_t)iy * w + ix) * c + c0;
                    for (ch = 0; ch < nc; ch++) acc[t][ch] += (double)g[ch] * iv[ch];
                }
            }
        for (t = 0; t < 9; t++)
            for (ch = 0; ch < nc; ch++) dw9[(size_t)t * c + c0 + ch] += (float)acc[t][ch];
    }
}

/* Full 3x3 convolution, padding 1, no bias, channels-last: nine shifted matmuls;
 * wt is [9][co][ci]. */
static void conv3x3_hwc(float *out, const float *in, int h, int w, int ci, int co, const float *wt)
{
    int y;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)h * w * ci * co * 9))
#endif
    for (y = 0; y < h; y++) {
        int t, x;
        float *o = out + (size_t)y * w * co;
        for (x = 0; x < w * co; x++) o[x] = 0.0f;
        for (t = 0; t < 9; t++) {
            int yy = y + t / 3 - 1, dx = t % 3 - 1, x0 = dx < 0 ? 1 : 0, x1 = dx > 0 ? w - 1 : w;
            if (yy < 0 || yy >= h || x1 <= x0) continue;
            gemm_nt(x1 - x0, co, ci, in + ((size_t)yy * w + x0 + dx) * ci, ci, wt + (size_t)t * co * ci, ci, NULL,
                    o + (size_t)x0 * co, co, 1);
        }
    }
}

/* Full 3x3 convolution backward (padding 1, channels-last): dout [h*w][co] ->
 * din [h*w][ci] += (when din; each input row gathers its nine taps), dwt [9][co][ci] +=.
 * scratch: 9*co*ci + h*w*ci floats (transposed taps, one tap's shifted input). */
static void conv3x3_hwc_backward(float *din, float *dwt, const float *dout, const float *in, int h, int w, int ci,
                                 int co, const float *wt, float *scratch)
{
    float *wtt = scratch, *shifted = scratch + (size_t)9 * co * ci;
    int t, y;
    if (din) {
        for (t = 0; t < 9; t++) transpose(wtt + (size_t)t * ci * co, wt + (size_t)t * co * ci, co, ci);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)h * w * ci * co * 9))
#endif
        for (y = 0; y < h; y++) {
            int tt;
            for (tt = 0; tt < 9; tt++) {
                int dy = tt / 3 - 1, dx = tt % 3 - 1, oy = y - dy, x0 = dx > 0 ? 0 : -dx, x1 = dx > 0 ? w - dx : w;
                if (oy < 0 || oy >= h || x1 <= x0) continue;
                /* din[y][x + dx] += dout[oy][x] . wt[tt] for output columns x0..x1 */
                gemm_nt(x1 - x0, ci, co, dout + ((size_t)oy * w + x0) * co, co, wtt + (size_t)tt * ci * co, co, NULL,
                        din + ((size_t)y * w + x0 + dx) * ci, ci, 1);
            }
        }
    }
    for (t = 0; t < 9; t++) {
        int dy = t / 3 - 1, dx = t % 3 - 1, x;
        /* shifted[y][x] = in[y + dy][x + dx], zero outside */
        for (y = 0; y < h; y++)
            for (x = 0; x < w; x++) {
                float *d = shifted + ((size_t)y * w + x) * ci;
                int iy = y + dy, ix = x + dx;
                if (iy < 0 || iy >= h || ix < 0 || ix >= w) memset(d, 0, (size_t)ci * sizeof *d);
                else memcpy(d, in + ((size_t)iy * w + ix) * ci, (size_t)ci * sizeof *d);
            }
        gemm_tn(co, ci, h * w, dout, co, shifted, ci, dwt + (size_t)t * co * ci, ci);
    }
}

/* Mask2FormerSinePositionEmbedding(normalize=True) of an h x w map, channels-last:
 * out[p][0..npf) = pos_y, out[p][npf..2npf) = pos_x, each (sin, cos) interleaved. */
static void sine_position_embedding(float *out, int ld, int h, int w, int npf)
{
    const float temperature = 10000.0f, eps = 1e-6f, scale = (float)(2.0 * LOUPE_PI);
    int y, x, k;
    for (y = 0; y < h; y++)
        for (x = 0; x < w; x++) {
            float ye = (float)(y + 1) / ((float)h + eps) * scale, xe = (float)(x + 1) / ((float)w + eps) * scale;
            float *o = out + ((size_t)y * w + x) * ld;
            for (k = 0; k < npf; k++) {
                float dim_t = powf(temperature, (float)(2 * (k / 2)) / (float)npf);
                float py = ye / dim_t, px = xe / dim_t;
                o[k] = k % 2 ? cosf(py) : sinf(py);
                o[npf + k] = k % 2 ? cosf(px) : sinf(px);
            }
        }
}

/* Bilinear sample of one head's channels at (ix, iy) in pixel units, zero outside
 * (grid_sample, align_corners=False, padding zeros); accumulates weight * value. */
static void sample_bilinear_acc(float *acc, const float *value, int ld, int h, int w, float ix, float iy,
                                float weight, int dh)
{
    int x0, y0, x1, y1, d, xs[4], ys[4], k;
    float fx, fy, wts[4], *wp = wts;
    /* Points at or beyond one pixel outside the map (and NaN) only meet zero padding. */
    if (!(ix > -1.0f && ix < (float)w && iy > -1.0f && iy < (float)h)) return;
    x0 = (int)floorf(ix); y0 = (int)floorf(iy); x1 = x0 + 1; y1 = y0 + 1;
    fx = ix - (float)x0; fy = iy - (float)y0;
    wts[0] = (1.0f - fx) * (1.0f - fy); xs[0] = x0; ys[0] = y0;
    wts[1] = fx * (1.0f - fy);          xs[1] = x1; ys[1] = y0;
    wts[2] = (1.0f - fx) * fy;          xs[2] = x0; ys[2] = y1;
    wts[3] = fx * fy;                   xs[3] = x1; ys[3] = y1;
    for (k = 0; k < 4; k++, wp++) {
        const float *v;
        float c;
        if (xs[k] < 0 || xs[k] >= w || ys[k] < 0 || ys[k] >= h) continue;
        v = value + ((size_t)ys[k] * w + xs[k]) * ld;
        c = weight * *wp;
        for (d = 0; d < dh; d++) acc[d] += c * v[d];
    }
}

/* Backward of sample_bilinear_acc for the gradient dacc [dh] of the accumulator:
 * dvalue (the four in-bounds neighbours) += weight * tap weight * dacc, *dix and *diy +=
 * the gradient of the sampling position; returns the gradient of weight (dacc . sample). */
static float sample_bilinear_backward(float *dvalue, const float *value, int ld, int h, int w, float ix, float iy,
                                      float weight, const float *dacc, int dh, float *dix, float *diy)
{
    int x0 = (int)floorf(ix), y0 = (int)floorf(iy), k, d;
    float fx = ix - (float)x0, fy = iy - (float)y0;
    float wts[4], dwx[4], dwy[4];
    int xs[4], ys[4];
    double dweight = 0.0, gx = 0.0, gy = 0.0;
    wts[0] = (1.0f - fx) * (1.0f - fy); dwx[0] = -(1.0f - fy); dwy[0] = -(1.0f - fx); xs[0] = x0;     ys[0] = y0;
    wts[1] = fx * (1.0f - fy);          dwx[1] = 1.0f - fy;    dwy[1] = -fx;          xs[1] = x0 + 1; ys[1] = y0;
    wts[2] = (1.0f - fx) * fy;          dwx[2] = -fy;          dwy[2] = 1.0f - fx;    xs[2] = x0;     ys[2] = y0 + 1;
    wts[3] = fx * fy;                   dwx[3] = fy;           dwy[3] = fx;           xs[3] = x0 + 1; ys[3] = y0 + 1;
    for (k = 0; k < 4; k++) {
        size_t at;
        double dot;
        float c;
        if (xs[k] < 0 || xs[k] >= w || ys[k] < 0 || ys[k] >= h) continue;
        at = ((size_t)ys[k] * w + xs[k]) * ld;
        dot = row_dot(dacc, value + at, dh);
        dweight += wts[k] * dot;
        gx += dwx[k] * dot;
        gy += dwy[k] * dot;
        c = weight * wts[k];
        for (d = 0; d < dh; d++) dvalue[at + d] += c * dacc[d];
    }
    *dix += (float)(weight * gx);
    *diy += (float)(weight * gy);
    return (float)dweight;
}

/* ========================================================================== */
/* Sessions: one planned arena holds every activation of a forward pass        */
/* ========================================================================== */

/* Where one ScaleBlock puts its activations: conv1 (or max-pool) output, its GELU,
 * the depthwise output (LayerNorm2d input), each [h'*w'][W]. In inference they alias
 * (GELU in place, LayerNorm2d in place in the block's output). */
typedef struct scale_block_acts { float *pre, *act, *dw; } scale_block_acts;

/* Where one pixel-decoder encoder layer puts its activations (Te tokens, F channels):
 * query + position, value, offsets, softmaxed weights, deformable output [Te][F|2noff|noff|F];
 * a1/h1 the self-attention residual sum (LayerNorm input) and its norm; cq [F] the projected
 * conditional query, kv [Te][2F], catt [F] the attention output, co [F] its projection;
 * a2/h2 the cross-attention residual sum and norm; ffn [Te][E] after ReLU; a3 the FFN
 * residual sum. In inference the residual stream is updated in place in the output. */
typedef struct enc_layer_acts {
    float *qpos, *value, *offs, *aw, *msda, *a1, *h1, *cq, *kv, *catt, *co, *a2, *h2, *ffn, *a3;
} enc_layer_acts;

/* Where one masked-attention decoder layer puts its activations (Q queries, n tokens of
 * its level): mask [Q][n] (1 = may not attend); hq1 = hidden + query position, q1 [Q][F],
 * kv [n][2F] (keys from the session's dec_kin), att1 [Q][F], a1/h1 cross-attention sum
 * and norm; hq2, q2 [Q][F], kv2 [2][Q][F] (k, v), att2, a2/h2 the self-attention sum and norm;
 * ffn [Q][E] after ReLU, a3 the FFN sum. In inference they alias the session's scratch. */
typedef struct dec_layer_acts {
    unsigned char *mask;
    float *hq1, *q1, *kv, *att1, *a1, *h1, *hq2, *q2, *kv2, *att2, *a2, *h2, *ffn, *a3;
} dec_layer_acts;

/* What a training forward keeps for the segmentor's backward (a trainer owns the buffers;
 * section 8). Layer outputs the session keeps anyway are read from the session. */
typedef struct seg_tape {
    scale_block_acts fpn[4];      /* fpn4[0], fpn4[1], fpn2, fpn_half */
    float *proj;                  /* [Te][F] input projections before their GroupNorm */
    enc_layer_acts *enc;          /* [enc_layers] */
    float *lat_pre, *conv_pre;    /* [(4g)^2][F] adapter_1 and layer_1 convolutions before GroupNorm */
    float *hidden;                /* [L][Q][F] decoder hidden states: query features, then layer outputs */
    dec_layer_acts *dec;          /* [L-1] */
    float *me_a, *me_b, *me;      /* [L][Q][F] mask-embedding MLP of each prediction */
} seg_tape;

/* Scratch of a training backward: the segmentor's (section 6) and the gradients the
 * trainer hands on to the classifier and the backbone (d_x is the gradient of activation x). */
typedef struct seg_work {
    float *d_class, *d_mask;          /* [L][Q][C], [L][Q][(4g)^2]: the loss's gradients */
    float *pseudo_mask;               /* [g*g] sigmoid(patch logits) */
    float *d_feats;                   /* [1+g*g][W] gradient of backbone_features */
    float *d_pooled;                  /* [W] gradient of pooled_features */
    float *d_patch;                   /* [g*g] gradient of the patch logits */
    float *d_me, *mf_t, *d_mf;        /* [L][Q][F]; [F][(4g)^2] mask features transposed; [(4g)^2][F] */
    float *d_qh, *d_x1, *d_x2, *d_x3; /* [Q][F] mask predictor and decoder temporaries */
    float *d_h0, *d_h1;               /* [Q][F] gradient of the decoder hidden state (two, swapped) */
    float *d_att, *d_q, *d_hq;        /* [Q][F] */
    float *d_kv2;                     /* [2][Q][F] */
    float *d_qffn, *d_qffn2;          /* [Q][dec_ffn] */
    float *d_kv;                      /* [Te][2F]: decoder and encoder cross-attention keys/values */
    float *d_dec_feat;                /* [Te][F] decoder features = multi-scale features */
    float *d_e0, *d_e1;               /* [Te][F] gradient of the encoder stream (two, swapped) */
    float *d_t1, *d_t2, *d_msda, *d_value, *d_qpos; /* [Te][F] */
    float *d_offs, *d_aw, *d_awl;     /* [Te][2*noff], [Te][noff] x 2 */
    float *d_effn, *d_effn2;          /* [Te][enc_ffn] */
    float *d_cq, *d_catt, *d_co, *d_cond; /* [F] */
    float *d_m1, *d_m2;               /* [(4g)^2][F] mask-feature level temporaries */
    float *d_fpn4, *d_fpn_mid, *d_fpn2, *d_fpn_half; /* gradients of the pyramid outputs */
    float *d_f1, *d_f2;               /* [(4g)^2][W] scale-block temporaries */
    float *wt;                        /* transposed weights / convolution scratch */
    float *stats;                     /* [2 * (4g)^2] norm statistics */
    float *att;                       /* attention_backward scratch */
} seg_work;

/* What the segmentor's backward (section 6) reads and writes: the weights' views, the
 * forward's session and tape, scratch, and the trained tensors' gradients. A trainer owns
 * all of it; trained tensors are its float32 copies in param [n_floats], each tensor's
 * gradient at the same offset in grad. */
typedef struct seg_grads {
    const loupe_config *cfg;
    const loupe_weights *w;           /* views: trained tensors point into param */
    const loupe_tables *tb;           /* tables, enc_pos from the trained level embedding */
    loupe_session *s;                 /* the forward that the backward follows */
    const seg_tape *tape;
    seg_work *wk;
    float *param, *grad;
    size_t n_floats;
} seg_grads;

/* The gradient buffer of a tensor: NULL for a frozen one (the model's own, outside param). */
static float *grad_of(const seg_grads *sg, const float *p)
{
    uintptr_t a = (uintptr_t)p, lo = (uintptr_t)sg->param, hi = (uintptr_t)(sg->param + sg->n_floats);
    if (!p || a < lo || a >= hi) return NULL;
    return sg->grad + (p - sg->param);
}

/* The values of a trained weight matrix: the trainer's float32 copy. */
static const float *trained_matrix(wmat m) { return m.data; }

/* What a training forward keeps for the backward of the backbone (T = 1 + g*g tokens,
 * width W, MLP width M, pooling MLP width Mp); a trainer owns the buffers (sized by
 * pe_train_layout, section 4). Block i's activations start at i * (size of one block)
 * of each array. LayerNorm outputs and GELU outputs are recomputed by the backward, and
 * the attention probabilities by attention_backward. */
typedef struct pe_tape {
    float *embed;        /* [T][W] class and patch embeddings plus positions: ln_pre's input */
    float *x;            /* [layers+1][T][W] residual stream entering block i; [layers]: ln_post's input */
    float *qkv;          /* [layers][T][3W] q, k after RoPE, v */
    float *att;          /* [layers][T][W] attention output before out_proj */
    float *mid;          /* [layers][T][W] residual stream after attention: ln_2's input */
    float *fc;           /* [layers][T][M] c_fc output before GELU */
    float *pool_q;       /* [W] the probe's query */
    float *pool_kv;      /* [T][2W] keys and values of backbone_features */
    float *pool_att;     /* [W] attention output before out_proj */
    float *pool_mid;     /* [W] out_proj output: the layernorm's input and the residual */
    float *pool_fc;      /* [Mp] c_fc output before GELU */
} pe_tape;

/* What a training forward keeps for the classifier's backward: every hidden layer of
 * the two heads before its GELU (the heads' inputs stay in the session). */
typedef struct cls_tape {
    float *global_pre;   /* [cls_layers-1][cls_hidden] */
    float *patch_pre;    /* [cls_layers-1][g*g][cls_hidden] */
} cls_tape;

struct loupe_session {
    const loupe_model *m;
    const loupe_weights *w;       /* weights in use: the model's or a trainer's (trained copies) */
    const loupe_tables *t;        /* tables derived from them */
    seg_tape *tape;               /* TTA: where the forward keeps what the backward needs (else NULL) */
    pe_tape *bb_tape;             /* training: backbone activations for the backward (else NULL) */
    cls_tape *cls_tape;           /* training: classifier activations for the backward (else NULL) */
    scale_block_acts fpn_acts;    /* inference views of the activations (aliasing scratch) */
    enc_layer_acts enc_acts;
    dec_layer_acts dec_acts;
    loupe_tap_fn tap;
    void *tap_user;
    void *raw;
    size_t bytes;
    int threads;                  /* threads the scratch buffers were sized for */
    /* backbone: T = 1 + g*g tokens of width W */
    float *patches;               /* [g*g][3*P*P] image patches (im2col) */
    float *x, *h, *att;           /* [T][W] residual stream, normed input, attention output */
    float *qkv;                   /* [T][3W] */
    float *wide;                  /* [T][max(mlp_width, pool_mlp_width)] MLP hidden */
    float *scores;                /* [threads][largest score matrix] */
    float *feats;                 /* [T][W] backbone_features */
    float *pool_q, *pool_att, *pooled, *pool_h; /* [W] attention pooling */
    /* classifier */
    float *cls_a, *cls_b;         /* [g*g][cls_hidden] MLP hidden layers */
    float *patch_logits;          /* [g*g] */
    float global_logit, fused_logit, prob;
    float cond_label;             /* training: the conditional query's label (1 forged, 0 not);
                                     negative: the classifier's probability (inference, TTA) */
    /* segmentor: feature pyramid */
    float *cond_query;            /* [F] */
    float *fpn4, *fpn2, *fpn_half;/* [(4g)^2][W], [(2g)^2][W], [(g/2)^2][W] */
    float *fpn_tmp, *fpn_mid;     /* [(4g)^2][W], [(2g)^2][W] scale-block temporaries */
    /* pixel decoder, Te tokens over levels [g/2, g, 2g] */
    float *enc_h;                 /* [enc_layers+1][Te][F] encoder input, then each layer's output */
    float *qpos, *value, *msda, *tmp; /* [Te][F] */
    float *offs, *aw;             /* [Te][heads*3*points*2], [Te][heads*3*points] */
    float *kv;                    /* [Te][2F] */
    float *ffn;                   /* [Te][enc_ffn] or [Q][dec_ffn], whichever is larger */
    float *cq, *catt;             /* [F] conditional cross-attention */
    float *lateral, *fpn_out, *mask_features; /* [(4g)^2][F] */
    float *mask_features_packed; /* mask_features packed for the mask einsum (gemm_prepack; in fpn_tmp) */
    float *interp;                /* interpolation index scratch */
    /* transformer decoder, Q queries */
    float *dec_feat;              /* [Te][F] multi-scale features + level embedding */
    float *dec_kin;               /* [Te][F] dec_feat + position: the cross-attention's key input (in tmp) */
    float *hidden, *hq, *dq, *datt, *dtmp; /* [Q][F] */
    float *me_a, *me_b, *me;      /* [Q][F] mask-embedding MLP */
    float *query_hidden;          /* [L][Q][F] */
    float *class_logits;          /* [L][Q][labels+1] */
    float *mask_logits;           /* [L][Q][(4g)^2] */
    float *attn_logits;           /* [L][Q][(2g)^2] */
    unsigned char *attn_mask;     /* [Q][(2g)^2] 1 = may not attend */
    /* post-processing */
    float *seg, *seg_tmp;         /* [384][384] */
    loupe_outputs out;
};

/* Largest of three sizes. */
static size_t max3(size_t a, size_t b, size_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/* Assigns (or, while measuring, counts) every activation buffer. */
static void session_layout(loupe_session *s, arena *a)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_tables *t = &s->m->t;
    size_t g = (size_t)c->grid, N = g * g, T = N + 1, W = (size_t)c->width, F = (size_t)c->feature_size;
    size_t Q = (size_t)c->num_queries, L = (size_t)c->dec_layers, P = (size_t)c->patch_size;
    size_t Te = (size_t)t->tokens, M4 = 16 * N, M2 = 4 * N, Mh = (g / 2) * (g / 2);
    size_t noff = (size_t)c->m2f_heads * 3 * (size_t)c->deform_points;
    size_t score = max3(T * T, Q * M2 + Q * Q, Te);
    s->patches = arena_floats(a, N * 3 * P * P);
    s->x = arena_floats(a, T * W);
    s->h = arena_floats(a, T * W);
    s->att = arena_floats(a, T * W);
    s->qkv = arena_floats(a, T * 3 * W);
    s->wide = arena_floats(a, T * max3((size_t)c->mlp_width, (size_t)c->pool_mlp_width, 1));
    s->scores = arena_floats(a, (size_t)s->threads * score);
    s->feats = arena_floats(a, T * W);
    s->pool_q = arena_floats(a, W);
    s->pool_att = arena_floats(a, W);
    s->pooled = arena_floats(a, W);
    s->pool_h = arena_floats(a, W);
    s->cls_a = arena_floats(a, N * (size_t)c->cls_hidden);
    s->cls_b = arena_floats(a, N * (size_t)c->cls_hidden);
    s->patch_logits = arena_floats(a, N);
    s->cond_query = arena_floats(a, F);
    s->fpn4 = arena_floats(a, M4 * W);
    s->fpn2 = arena_floats(a, M2 * W);
    s->fpn_half = arena_floats(a, Mh * W);
    /* the pyramid's scratch, dead once it is built: then the packed mask features */
    s->fpn_tmp = arena_floats(a, max3(M4 * W, GEMM_PREPACKED_FLOATS(M4, F), 1));
    s->mask_features_packed = s->fpn_tmp;
    s->fpn_mid = arena_floats(a, M2 * W);
    s->enc_h = arena_floats(a, ((size_t)c->enc_layers + 1) * Te * F);
    s->qpos = arena_floats(a, Te * F);
    s->value = arena_floats(a, Te * F);
    s->msda = arena_floats(a, Te * F);
    s->tmp = arena_floats(a, Te * F);
    s->dec_kin = s->tmp; /* the pixel decoder's scratch, dead once its layers are done */
    s->offs = arena_floats(a, Te * noff * 2);
    s->aw = arena_floats(a, Te * noff);
    s->kv = arena_floats(a, Te * 2 * F);
    s->ffn = arena_floats(a, max3(Te * (size_t)c->enc_ffn, Q * (size_t)c->dec_ffn, 1)); /* encoder's, decoder's FFN */
    s->cq = arena_floats(a, F);
    s->catt = arena_floats(a, F);
    s->lateral = arena_floats(a, M4 * F);
    s->fpn_out = arena_floats(a, M4 * F);
    s->mask_features = arena_floats(a, M4 * F);
    s->interp = arena_floats(a, INTERP_SCRATCH(SEG_SIZE, SEG_SIZE) + INTERP_SCRATCH(4 * g, 4 * g));
    s->dec_feat = arena_floats(a, Te * F);
    s->hidden = arena_floats(a, Q * F);
    s->hq = arena_floats(a, Q * F);
    s->dq = arena_floats(a, Q * F);
    s->datt = arena_floats(a, Q * F);
    s->dtmp = arena_floats(a, Q * F);
    s->me_a = arena_floats(a, Q * F);
    s->me_b = arena_floats(a, Q * F);
    s->me = arena_floats(a, Q * F);
    s->query_hidden = arena_floats(a, L * Q * F);
    s->class_logits = arena_floats(a, L * Q * ((size_t)c->num_labels + 1));
    s->mask_logits = arena_floats(a, L * Q * M4);
    s->attn_logits = arena_floats(a, L * Q * M2);
    s->attn_mask = arena_bytes(a, Q * M2);
    s->seg = arena_floats(a, (size_t)SEG_SIZE * SEG_SIZE);
    s->seg_tmp = arena_floats(a, (size_t)SEG_SIZE * SEG_SIZE);
    /* inference activation views: the scratch above, residual streams in place */
    s->fpn_acts.pre = s->fpn_acts.act = s->fpn_tmp;
    s->fpn_acts.dw = NULL; /* the block's output */
    s->enc_acts.qpos = s->qpos; s->enc_acts.value = s->value; s->enc_acts.offs = s->offs;
    s->enc_acts.aw = s->aw; s->enc_acts.msda = s->msda; s->enc_acts.a1 = s->tmp;
    s->enc_acts.h1 = s->enc_acts.a2 = s->enc_acts.h2 = s->enc_acts.a3 = NULL; /* the layer's output */
    s->enc_acts.cq = s->cq; s->enc_acts.kv = s->kv; s->enc_acts.catt = s->catt; s->enc_acts.co = s->cq;
    s->enc_acts.ffn = s->ffn;
    s->dec_acts.mask = s->attn_mask;
    s->dec_acts.hq1 = s->dec_acts.hq2 = s->hq; s->dec_acts.q1 = s->dec_acts.q2 = s->dq;
    s->dec_acts.kv = s->dec_acts.kv2 = s->kv; s->dec_acts.att1 = s->dec_acts.att2 = s->datt;
    s->dec_acts.a1 = s->dec_acts.h1 = s->dec_acts.a2 = s->dec_acts.h2 = s->dec_acts.a3 = s->hidden;
    s->dec_acts.ffn = s->ffn;
}

loupe_session *loupe_session_new(const loupe_model *m, char *err, size_t errsize)
{
    loupe_session *s;
    arena a = {NULL, 0, 0};
    if (!m) { fail(err, errsize, "no model given"); return NULL; }
    s = calloc(1, sizeof *s);
    if (!s) { fail(err, errsize, "out of memory"); return NULL; }
    s->m = m;
    s->w = &m->w;
    s->t = &m->t;
    s->threads = max_threads();
    s->cond_label = -1.0f;
    session_layout(s, &a); /* measure */
    a.cap = a.used;
    a.used = 0;
    a.base = aligned_block(a.cap, &s->raw);
    if (!a.base) {
        fail(err, errsize, "out of memory: the activation arena needs %.1f MiB", (double)a.cap / (1 << 20));
        free(s);
        return NULL;
    }
    s->bytes = a.cap;
    session_layout(s, &a); /* assign */
    return s;
}

void loupe_session_free(loupe_session *s)
{
    if (!s) return;
    free(s->raw);
    free(s);
}

void loupe_set_tap(loupe_session *s, loupe_tap_fn fn, void *user)
{
    s->tap = fn;
    s->tap_user = user;
}

/* Reports a named tensor to the tap, if one is installed. dims in upstream order. */
static void tap(const loupe_session *s, const char *name, const float *data, int channels_last, int ndim, int d0,
                int d1, int d2, int d3)
{
    int dims[4];
    dims[0] = d0; dims[1] = d1; dims[2] = d2; dims[3] = d3;
    if (s->tap) s->tap(s->tap_user, name, data, ndim, dims, channels_last);
}

/* ========================================================================== */
/* 4. Backbone: Perception Encoder ViT (models/pe/pe.py)                       */
/* ========================================================================== */
/* Each module's forward is followed by its backward twin (training: sections 8 and up
 * drive them). A backward reads the activations its forward left on the session's
 * tapes (s->bb_tape, s->cls_tape; NULL in inference, which then costs nothing), takes
 * the gradient of the module's output, adds (+=) the gradient of its input and those
 * of its parameters into gradient views (float32, upstream layout). A NULL gradient
 * member means "not trained": that weight gradient is skipped, but input gradients
 * still flow, through frozen BF16/Q8 weights too (upstream trains the class and
 * position embeddings even when the rest of the backbone is frozen). */

/* Gradient views of backbone.transformer.resblocks[i], backbone.attn_pool and the whole
 * backbone (blocks: [layers] views, or NULL when every block is frozen). */
typedef struct pe_block_g { norm_g ln_1, ln_2; linear_g qkv, out, fc, proj; } pe_block_g;
typedef struct pe_pool_g { float *probe; linear_g qkv, out; norm_g ln; linear_g fc, proj; } pe_pool_g;
typedef struct pe_grads {
    float *class_embedding, *positional_embedding; /* [W], [T][W] */
    float *conv1;                                  /* [W][3][P][P] */
    norm_g ln_pre, ln_post;
    pe_block_g *blocks;
    pe_pool_g pool;
} pe_grads;

/* Scratch of the backbone's and the classifier's backward (sized by pe_train_layout). */
typedef struct pe_work {
    float *d_feats;         /* [T][W] gradient of backbone_features (the caller's plus the pooling's) */
    float *d_a, *d_b;       /* [T][W] gradient of the residual stream (two, swapped per block) */
    float *d_mid, *d_h, *h; /* [T][W] d of a block's middle stream, of a LayerNorm output; that output */
    float *d_qkv;           /* [T][3W] */
    float *d_att;           /* [T][W] */
    float *d_wide, *wide;   /* [T][max(M, Mp)] d of a GELU output; the output, then d of its input */
    float *d_logits;        /* [g*g] gradient of the patch logits (loss + fuser) */
    float *cls_act, *cls_d_act, *cls_d_pre; /* [g*g][cls_hidden] */
    float *stats;           /* [2T] LayerNorm statistics */
    float *att;             /* attention_backward scratch: [threads][2 T T] */
} pe_work;

/* Assigns (or, while measuring, counts) the backbone's and the classifier's tapes and
 * the backward scratch (each skipped when NULL), for a session of the model c. The
 * attention scratch is sized for max_threads() at this call. Full size (24 layers,
 * T = 577, W = 1024, M = 4096): backbone tape 577 MB, classifier tape 5 MB, scratch
 * 57 MB + 2.7 MB per thread. */
static void pe_train_layout(const loupe_config *c, pe_tape *bt, cls_tape *ct, pe_work *k, arena *a)
{
    size_t N = (size_t)c->grid * c->grid, T = N + 1, W = (size_t)c->width, M = (size_t)c->mlp_width;
    size_t Mp = (size_t)c->pool_mlp_width, L = (size_t)c->layers, Hd = (size_t)c->cls_hidden;
    size_t Lc = (size_t)c->cls_layers - 1, wide = max3(M, Mp, 1);
    if (bt) {
        bt->embed = arena_floats(a, T * W);
        bt->x = arena_floats(a, (L + 1) * T * W);
        bt->qkv = arena_floats(a, L * T * 3 * W);
        bt->att = arena_floats(a, L * T * W);
        bt->mid = arena_floats(a, L * T * W);
        bt->fc = arena_floats(a, L * T * M);
        bt->pool_q = arena_floats(a, W);
        bt->pool_kv = arena_floats(a, T * 2 * W);
        bt->pool_att = arena_floats(a, W);
        bt->pool_mid = arena_floats(a, W);
        bt->pool_fc = arena_floats(a, Mp);
    }
    if (ct) {
        ct->global_pre = arena_floats(a, Lc * Hd);
        ct->patch_pre = arena_floats(a, Lc * N * Hd);
    }
    if (k) {
        k->d_feats = arena_floats(a, T * W);
        k->d_a = arena_floats(a, T * W);
        k->d_b = arena_floats(a, T * W);
        k->d_mid = arena_floats(a, T * W);
        k->d_h = arena_floats(a, T * W);
        k->h = arena_floats(a, T * W);
        k->d_qkv = arena_floats(a, T * 3 * W);
        k->d_att = arena_floats(a, T * W);
        k->d_wide = arena_floats(a, T * wide);
        k->wide = arena_floats(a, T * wide);
        k->d_logits = arena_floats(a, N);
        k->cls_act = arena_floats(a, N * Hd);
        k->cls_d_act = arena_floats(a, N * Hd);
        k->cls_d_pre = arena_floats(a, N * Hd);
        k->stats = arena_floats(a, 2 * T);
        k->att = arena_floats(a, (size_t)max_threads() * 2 * T * T);
    }
}

/* Zeroes n floats: big buffers (the backward's scratch maps, tens of MB) in chunks on all
 * threads, as one thread's stores do not saturate the memory bus. */
#define ZERO_CHUNK ((size_t)1 << 18)
static void zero_floats(float *x, size_t n)
{
    long c, chunks = (long)((n + ZERO_CHUNK - 1) / ZERO_CHUNK);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (chunks > 1 && parallel_ok((double)n))
#endif
    for (c = 0; c < chunks; c++) {
        size_t lo = (size_t)c * ZERO_CHUNK, len = n - lo < ZERO_CHUNK ? n - lo : ZERO_CHUNK;
        memset(x + lo, 0, len * sizeof *x);
    }
}

/* VisionTransformer.conv1 + class_embedding + positional_embedding + ln_pre:
 * pixel_values [3][S][S] -> x [1+g*g][W]. */
static void pe_embed(loupe_session *s, const float *pixels)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = s->w;
    int g = c->grid, P = c->patch_size, S = c->image_size, W = c->width, K = 3 * P * P, T = 1 + g * g;
    int p, ch, ky, kx;
    for (p = 0; p < g * g; p++) {
        float *row = s->patches + (size_t)p * K;
        int py = p / g, px = p % g;
        for (ch = 0; ch < 3; ch++)
            for (ky = 0; ky < P; ky++)
                for (kx = 0; kx < P; kx++)
                    row[(ch * P + ky) * P + kx] = pixels[((size_t)ch * S + py * P + ky) * S + px * P + kx];
    }
    gemm_nt_w(g * g, W, K, s->patches, K, w->conv1, NULL, s->x + W, W, 0);
    memcpy(s->x, w->class_embedding, (size_t)W * sizeof *s->x);
    add(s->x, s->x, w->positional_embedding, (size_t)T * W);
    if (s->bb_tape) memcpy(s->bb_tape->embed, s->x, (size_t)T * W * sizeof *s->x);
    layernorm(s->x, s->x, T, W, w->ln_pre, c->ln_eps);
    tap(s, "backbone_ln_pre", s->x, 0, 3, 1, T, W, 0);
}

/* pe_embed backward (conv1 as the product of the patch matrix s->patches and its
 * weight): d ln_pre output dy [T][W] -> class_embedding [W], positional_embedding
 * [T][W], conv1 [W][3P^2], ln_pre gradients += (no pixel gradient). */
static void pe_embed_backward(const loupe_session *s, const pe_grads *g, const float *dy, pe_work *k)
{
    const loupe_config *c = &s->m->cfg;
    int N = c->grid * c->grid, T = N + 1, W = c->width, K = 3 * c->patch_size * c->patch_size, i;
    size_t TW = (size_t)T * W, j;
    float *d_x0 = k->d_h;
    zero_floats(d_x0, TW);
    layernorm_backward(d_x0, g->ln_pre.w, g->ln_pre.b, dy, s->bb_tape->embed, T, W, s->w->ln_pre, c->ln_eps,
                       k->stats);
    if (g->positional_embedding)
        for (j = 0; j < TW; j++) g->positional_embedding[j] += d_x0[j];
    if (g->class_embedding)
        for (i = 0; i < W; i++) g->class_embedding[i] += d_x0[i];
    if (g->conv1) gemm_tn(W, K, N, d_x0 + W, W, s->patches, K, g->conv1, K);
}

/* Turns the q and k parts of qkv [T][3W] in place, each channel pair (2i, 2i+1) of a
 * token: dir +1 rotates, (a, b) -> (a cos_2i - b sin_2i, b cos_2i+1 + a sin_2i+1); dir -1
 * applies the transposed matrix (the backward; the inverse rotation, as the tables
 * repeat every angle for both channels of a pair). */
static void pe_rope2d_turn(float *qkv, int T, int W, int heads, const float *cosv, const float *sinv, float dir)
{
    int dh = W / heads, t;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)T * W * 4))
#endif
    for (t = 0; t < T; t++) {
        const float *cs = cosv + (size_t)t * dh, *sn = sinv + (size_t)t * dh;
        int part, h, i;
        for (part = 0; part < 2; part++)
            for (h = 0; h < heads; h++) {
                float *v = qkv + (size_t)t * 3 * W + (size_t)part * W + (size_t)h * dh;
                for (i = 0; i < dh; i += 2) {
                    /* dir -1 is the transpose: each channel takes its partner's sine */
                    float a = v[i], b = v[i + 1], s0 = dir * sn[i + (dir < 0)], s1 = dir * sn[i + (dir > 0)];
                    v[i] = a * cs[i] - b * s0;
                    v[i + 1] = b * cs[i + 1] + a * s1;
                }
            }
    }
}

/* Rope2D.__call__: rotates the q and k parts of qkv [T][3W] in place by each token's
 * angles: (a, b) -> (a cos - b sin, b cos + a sin). */
static void pe_rope2d(float *qkv, int T, int W, int heads, const float *cosv, const float *sinv)
{
    pe_rope2d_turn(qkv, T, W, heads, cosv, sinv, 1.0f);
}

/* Rope2D backward, in place on d qkv [T][3W] (q and k parts): the transposed (inverse)
 * rotation, (da', db') -> (da' cos + db' sin, db' cos - da' sin). */
static void pe_rope2d_backward(float *dqkv, int T, int W, int heads, const float *cosv, const float *sinv)
{
    pe_rope2d_turn(dqkv, T, W, heads, cosv, sinv, -1.0f);
}

/* ResidualAttentionBlock.forward (SelfAttention with RoPE, then the GELU MLP) of block i:
 * x [T][W] -> x [T][W], updated in place. */
static void pe_residual_attention_block(loupe_session *s, const pe_block_w *b, int i)
{
    const loupe_config *c = &s->m->cfg;
    pe_tape *tp = s->bb_tape;
    int g = c->grid, T = 1 + g * g, W = c->width, M = c->mlp_width, dh = W / c->heads;
    size_t TW = (size_t)T * W, TM = (size_t)T * M;
    float *qkv = tp ? tp->qkv + (size_t)i * 3 * TW : s->qkv, *att = tp ? tp->att + (size_t)i * TW : s->att;
    if (tp) memcpy(tp->x + (size_t)i * TW, s->x, TW * sizeof *s->x);
    layernorm(s->h, s->x, T, W, b->ln_1, c->ln_eps);
    linear(qkv, s->h, T, W, 3 * W, b->qkv);
    pe_rope2d(qkv, T, W, c->heads, s->m->t.rope_cos, s->m->t.rope_sin);
    attention(att, W, qkv, 3 * W, qkv + W, 3 * W, qkv + 2 * W, 3 * W, T, T, c->heads, dh, 1.0f / sqrtf((float)dh), NULL,
              s->scores);
    gemm_nt_w(T, W, W, att, W, b->out.w, b->out.b, s->x, W, 1);
    if (tp) memcpy(tp->mid + (size_t)i * TW, s->x, TW * sizeof *s->x);
    layernorm(s->h, s->x, T, W, b->ln_2, c->ln_eps);
    linear(tp ? tp->fc + (size_t)i * TM : s->wide, s->h, T, W, M, b->fc);
    gelu(s->wide, tp ? tp->fc + (size_t)i * TM : s->wide, TM);
    gemm_nt_w(T, W, M, s->wide, M, b->proj.w, b->proj.b, s->x, W, 1);
}

/* ResidualAttentionBlock backward of block i (resblocks[i]: x [T][W] -> x [T][W]):
 * d out dy [T][W] -> d in dx [T][W] +=, parameter gradients g +=. dx must not alias dy. */
static void pe_residual_attention_block_backward(const loupe_session *s, const pe_block_w *b, const pe_block_g *g,
                                                 int i, float *dx, const float *dy, pe_work *k)
{
    const loupe_config *c = &s->m->cfg;
    const pe_tape *tp = s->bb_tape;
    int T = 1 + c->grid * c->grid, W = c->width, M = c->mlp_width, H = c->heads, dh = W / H;
    size_t TW = (size_t)T * W, TM = (size_t)T * M;
    const float *x = tp->x + (size_t)i * TW, *qkv = tp->qkv + (size_t)i * 3 * TW, *att = tp->att + (size_t)i * TW;
    const float *mid = tp->mid + (size_t)i * TW, *fc = tp->fc + (size_t)i * TM;
    /* MLP branch: out = mid + c_proj(gelu(c_fc(ln_2(mid)))) */
    memcpy(k->d_mid, dy, TW * sizeof *dy);
    if (g->proj.w) gelu(k->wide, fc, TM);
    zero_floats(k->d_wide, TM);
    linear_backward_w(k->d_wide, M, g->proj, dy, W, k->wide, M, T, M, W, b->proj.w);
    zero_floats(k->wide, TM);
    gelu_backward(k->wide, k->d_wide, fc, TM); /* k->wide: d c_fc output */
    if (g->fc.w) layernorm(k->h, mid, T, W, b->ln_2, c->ln_eps);
    zero_floats(k->d_h, TW);
    linear_backward_w(k->d_h, W, g->fc, k->wide, M, k->h, W, T, W, M, b->fc.w);
    layernorm_backward(k->d_mid, g->ln_2.w, g->ln_2.b, k->d_h, mid, T, W, b->ln_2, c->ln_eps, k->stats);
    /* attention branch: mid = x + out_proj(attention(rope(qkv(ln_1(x))))) */
    zero_floats(k->d_att, TW);
    linear_backward_w(k->d_att, W, g->out, k->d_mid, W, att, W, T, W, W, b->out.w);
    zero_floats(k->d_qkv, 3 * TW);
    attention_backward(k->d_qkv, 3 * W, k->d_qkv + W, 3 * W, k->d_qkv + 2 * W, 3 * W, k->d_att, W, qkv, 3 * W, qkv + W,
                       3 * W, qkv + 2 * W, 3 * W, T, T, H, dh, 1.0f / sqrtf((float)dh), NULL, k->att);
    pe_rope2d_backward(k->d_qkv, T, W, H, s->m->t.rope_cos, s->m->t.rope_sin);
    if (g->qkv.w) layernorm(k->h, x, T, W, b->ln_1, c->ln_eps);
    zero_floats(k->d_h, TW);
    linear_backward_w(k->d_h, W, g->qkv, k->d_qkv, 3 * W, k->h, W, T, W, 3 * W, b->qkv.w);
    add(dx, dx, k->d_mid, TW);
    layernorm_backward(dx, g->ln_1.w, g->ln_1.b, k->d_h, x, T, W, b->ln_1, c->ln_eps, k->stats);
}

/* AttentionPooling.forward: a learned probe attends over all tokens, then a residual
 * GELU MLP: feats [T][W] -> pooled [W]. */
static void pe_attention_pooling(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    const pe_pool_w *p = &s->w->pool;
    pe_tape *tp = s->bb_tape;
    int g = c->grid, T = 1 + g * g, W = c->width, M = c->pool_mlp_width, dh = W / c->pool_heads;
    float *q = tp ? tp->pool_q : s->pool_q, *kv = tp ? tp->pool_kv : s->qkv, *att = tp ? tp->pool_att : s->pool_att;
    gemm_nt_w(1, W, W, p->probe, W, p->qkv.w, p->qkv.b, q, W, 0);
    gemm_nt_w(T, 2 * W, W, s->feats, W, wmat_rows(p->qkv.w, (size_t)W), p->qkv.b + W, kv, 2 * W, 0);
    attention(att, W, q, W, kv, 2 * W, kv + W, 2 * W, 1, T, c->pool_heads, dh, 1.0f / sqrtf((float)dh), NULL,
              s->scores);
    linear(s->pooled, att, 1, W, W, p->out);
    if (tp) memcpy(tp->pool_mid, s->pooled, (size_t)W * sizeof *s->pooled);
    layernorm(s->pool_h, s->pooled, 1, W, p->ln, c->ln_eps);
    linear(s->wide, s->pool_h, 1, W, M, p->fc);
    if (tp) memcpy(tp->pool_fc, s->wide, (size_t)M * sizeof *s->wide);
    gelu(s->wide, s->wide, (size_t)M);
    gemm_nt_w(1, W, M, s->wide, M, p->proj.w, p->proj.b, s->pooled, W, 1);
}

/* AttentionPooling backward (backbone.attn_pool: feats [T][W] -> pooled [W]):
 * d pooled dy [W] -> d feats [T][W] +=, probe and parameter gradients g +=. */
static void pe_attention_pooling_backward(const loupe_session *s, const pe_pool_g *g, const float *dy, float *d_feats,
                                          pe_work *k)
{
    const loupe_config *c = &s->m->cfg;
    const pe_pool_w *p = &s->w->pool;
    const pe_tape *tp = s->bb_tape;
    int T = 1 + c->grid * c->grid, W = c->width, M = c->pool_mlp_width, H = c->pool_heads, dh = W / H;
    float *d_mid = k->d_mid, *d_q = k->d_att + W, *d_kv = k->d_qkv;
    linear_g q_g, kv_g;
    /* MLP branch: pooled = mid + c_proj(gelu(c_fc(layernorm(mid)))) */
    memcpy(d_mid, dy, (size_t)W * sizeof *dy);
    if (g->proj.w) gelu(k->wide, tp->pool_fc, (size_t)M);
    zero_floats(k->d_wide, (size_t)M);
    linear_backward_w(k->d_wide, M, g->proj, dy, W, k->wide, M, 1, M, W, p->proj.w);
    zero_floats(k->wide, (size_t)M);
    gelu_backward(k->wide, k->d_wide, tp->pool_fc, (size_t)M);
    if (g->fc.w) layernorm(k->h, tp->pool_mid, 1, W, p->ln, c->ln_eps);
    zero_floats(k->d_h, (size_t)W);
    linear_backward_w(k->d_h, W, g->fc, k->wide, M, k->h, W, 1, W, M, p->fc.w);
    layernorm_backward(d_mid, g->ln.w, g->ln.b, k->d_h, tp->pool_mid, 1, W, p->ln, c->ln_eps, k->stats);
    /* attention of the probe over the features */
    zero_floats(k->d_att, (size_t)2 * W);
    linear_backward_w(k->d_att, W, g->out, d_mid, W, tp->pool_att, W, 1, W, W, p->out.w);
    zero_floats(d_kv, (size_t)T * 2 * W);
    attention_backward(d_q, W, d_kv, 2 * W, d_kv + W, 2 * W, k->d_att, W, tp->pool_q, W, tp->pool_kv, 2 * W,
                       tp->pool_kv + W, 2 * W, 1, T, H, dh, 1.0f / sqrtf((float)dh), NULL, k->att);
    q_g.w = g->qkv.w;
    q_g.b = g->qkv.b;
    linear_backward_w(g->probe, W, q_g, d_q, W, p->probe, W, 1, W, W, p->qkv.w);
    kv_g.w = g->qkv.w ? g->qkv.w + (size_t)W * W : NULL;
    kv_g.b = g->qkv.b ? g->qkv.b + W : NULL;
    linear_backward_w(d_feats, W, kv_g, d_kv, 2 * W, s->feats, W, T, W, 2 * W, wmat_rows(p->qkv.w, (size_t)W));
}

/* VisionTransformer.forward_features(norm=True) + _pool:
 * pixel_values -> backbone_features [T][W] and pooled_features [W]. */
static void vision_transformer(loupe_session *s, const float *pixels)
{
    const loupe_config *c = &s->m->cfg;
    int T = 1 + c->grid * c->grid, W = c->width, i;
    char name[32];
    pe_embed(s, pixels);
    for (i = 0; i < c->layers; i++) {
        pe_residual_attention_block(s, &s->w->blocks[i], i);
        snprintf(name, sizeof name, "backbone_block%d", i);
        tap(s, name, s->x, 0, 3, 1, T, W, 0);
    }
    if (s->bb_tape) memcpy(s->bb_tape->x + (size_t)c->layers * T * W, s->x, (size_t)T * W * sizeof *s->x);
    layernorm(s->feats, s->x, T, W, s->w->ln_post, c->ln_eps);
    tap(s, "backbone_features", s->feats, 0, 3, 1, T, W, 0);
    pe_attention_pooling(s);
    tap(s, "pooled_features", s->pooled, 0, 2, 1, W, 0, 0);
}

/* VisionTransformer backward after a forward with s->bb_tape: d backbone_features
 * [T][W] and d pooled_features [W] (either NULL for none) -> every backbone gradient of
 * g +=. */
static void vision_transformer_backward(const loupe_session *s, const pe_grads *g, const float *d_feats,
                                        const float *d_pooled, pe_work *k)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = s->w;
    int T = 1 + c->grid * c->grid, W = c->width, i;
    size_t TW = (size_t)T * W;
    float *dcur = k->d_a, *dnext = k->d_b, *swap;
    pe_block_g frozen;
    memset(&frozen, 0, sizeof frozen);
    if (d_feats) memcpy(k->d_feats, d_feats, TW * sizeof *d_feats);
    else zero_floats(k->d_feats, TW);
    if (d_pooled) pe_attention_pooling_backward(s, &g->pool, d_pooled, k->d_feats, k);
    zero_floats(dcur, TW);
    layernorm_backward(dcur, g->ln_post.w, g->ln_post.b, k->d_feats, s->bb_tape->x + (size_t)c->layers * TW, T, W,
                       w->ln_post, c->ln_eps, k->stats);
    for (i = c->layers - 1; i >= 0; i--) {
        zero_floats(dnext, TW);
        pe_residual_attention_block_backward(s, &w->blocks[i], g->blocks ? &g->blocks[i] : &frozen, i, dnext, dcur, k);
        swap = dcur; dcur = dnext; dnext = swap;
    }
    pe_embed_backward(s, g, dcur, k);
}

/* ========================================================================== */
/* 5. Classifier (models/loupe/modules.py, modeling_loupe.py)                  */
/* ========================================================================== */

/* Gradient views of classifier.{classifier,patch_classifier} and of the classifier. */
typedef struct cls_head_g { linear_g layers[MAX_CLS_LAYERS]; } cls_head_g;
typedef struct cls_grads {
    cls_head_g global_head, patch_head;
    float *fuser;       /* [1][1+g*g] */
} cls_grads;

/* LoupeClsHead.forward: Linear, GELU between layers, last Linear to one logit:
 * x [rows][in] -> logits [rows]. pre (NULL, or a tape of [cls_layers-1][rows][hidden])
 * keeps every hidden layer before its GELU. */
static void loupe_cls_head(loupe_session *s, const cls_head_w *h, const float *x, int rows, float *logits, float *pre)
{
    const loupe_config *c = &s->m->cfg;
    int i, in = c->width;
    const float *cur = x;
    for (i = 0; i < c->cls_layers; i++) {
        int last = i == c->cls_layers - 1, out = last ? 1 : c->cls_hidden;
        float *dst = last ? logits : (i % 2 ? s->cls_b : s->cls_a);
        linear(dst, cur, rows, in, out, h->layers[i]);
        if (!last && pre) memcpy(pre + (size_t)i * rows * out, dst, (size_t)rows * out * sizeof *dst);
        if (!last) gelu(dst, dst, (size_t)rows * out);
        cur = dst;
        in = out;
    }
}

/* LoupeClsHead backward (x [rows][W] -> logits [rows]), pre its forward's tape: d logits
 * dy [rows] -> d x dx [rows][W] += (when dx), parameter gradients g +=. */
static void loupe_cls_head_backward(const loupe_session *s, const cls_head_w *h, const cls_head_g *g, const float *x,
                                    int rows, const float *pre, const float *dy, float *dx, pe_work *k)
{
    const loupe_config *c = &s->m->cfg;
    int Hd = c->cls_hidden, W = c->width, i;
    size_t n = (size_t)rows * Hd;
    const float *d_out = dy;
    for (i = c->cls_layers - 1; i >= 0; i--) {
        int in = i ? Hd : W, out = i == c->cls_layers - 1 ? 1 : Hd;
        const float *act = x;
        if (i && g->layers[i].w) { /* the layer's input: GELU of the previous layer */
            gelu(k->cls_act, pre + (size_t)(i - 1) * n, n);
            act = k->cls_act;
        }
        if (i) zero_floats(k->cls_d_act, n);
        linear_backward_w(i ? k->cls_d_act : dx, in, g->layers[i], d_out, out, act, in, rows, in, out, h->layers[i].w);
        if (i) {
            zero_floats(k->cls_d_pre, n);
            gelu_backward(k->cls_d_pre, k->cls_d_act, pre + (size_t)(i - 1) * n, n);
            d_out = k->cls_d_pre;
        }
    }
}

/* LoupeClassifier.forward + the pseudo label of LoupeModel.forward: global head on
 * the pooled vector, patch head on every patch token, FuseHead over [global, patches]. */
static void loupe_classifier(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = s->w;
    cls_tape *ct = s->cls_tape;
    int N = c->grid * c->grid, i;
    double fused;
    loupe_cls_head(s, &w->global_head, s->pooled, 1, &s->global_logit, ct ? ct->global_pre : NULL);
    loupe_cls_head(s, &w->patch_head, s->feats + c->width, N, s->patch_logits, ct ? ct->patch_pre : NULL);
    fused = (double)w->fuser[0] * s->global_logit;
    for (i = 0; i < N; i++) fused += (double)w->fuser[1 + i] * s->patch_logits[i];
    s->fused_logit = (float)fused;
    s->prob = sigmoidf(s->fused_logit);
    tap(s, "global_logit", &s->global_logit, 0, 2, 1, 1, 0, 0);
    tap(s, "patch_logits", s->patch_logits, 0, 3, 1, N, 1, 0);
    tap(s, "fused_logit", &s->fused_logit, 0, 2, 1, 1, 0, 0);
    tap(s, "fused_prob", &s->prob, 0, 2, 1, 1, 0, 0);
    tap(s, "pseudo_label", &s->prob, 0, 1, 1, 0, 0, 0);
}

/* LoupeClassifier backward after a forward with s->cls_tape (pooled [W], patch tokens
 * [g*g][W] -> global logit, patch logits [g*g], fused logit): d fused_logit and d
 * patch_logits [g*g] (NULL: none) -> fuser and both heads' gradients g +=, d pooled [W]
 * += and d backbone_features [T][W] += in its patch rows (each when not NULL). */
static void loupe_classifier_backward(const loupe_session *s, const cls_grads *g, float d_fused,
                                      const float *d_patch_logits, float *d_pooled, float *d_feats, pe_work *k)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = s->w;
    int N = c->grid * c->grid, W = c->width, i;
    float d_global = d_fused * w->fuser[0];
    if (g->fuser) {
        g->fuser[0] += d_fused * s->global_logit;
        for (i = 0; i < N; i++) g->fuser[1 + i] += d_fused * s->patch_logits[i];
    }
    for (i = 0; i < N; i++) k->d_logits[i] = (d_patch_logits ? d_patch_logits[i] : 0.0f) + d_fused * w->fuser[1 + i];
    loupe_cls_head_backward(s, &w->global_head, &g->global_head, s->pooled, 1, s->cls_tape->global_pre, &d_global,
                            d_pooled, k);
    loupe_cls_head_backward(s, &w->patch_head, &g->patch_head, s->feats + W, N, s->cls_tape->patch_pre, k->d_logits,
                            d_feats ? d_feats + W : NULL, k);
}

/* ---- LoupeClsLoss (models/loupe/loss.py) ----
 * Over a batch of B images: cls_part = mean over images of Poly1Focal(fused logit,
 * image label; alpha 0.2), patch_part = mean over all B*N patches of Poly1Focal(patch
 * logit, soft patch label; alpha 0.85), total = cls_part + patch_part. The global logit
 * is supervised only through the fuser. Evaluated per image in double, with the batch's
 * normalisers passed in (image weight 1/B, patch weight 1/(B*N)). */

/* LoupeClsLoss's settings (configs/model: cls_forge_weight, patch_forge_weight;
 * Poly1FocalLoss's epsilon 1 and gamma 2). */
typedef struct cls_loss_config {
    double cls_forge_weight;     /* alpha of the image term (weight of the forged class) */
    double patch_forge_weight;   /* alpha of the patch terms */
    double poly_epsilon, focal_gamma;
} cls_loss_config;

static cls_loss_config cls_loss_config_default(void)
{
    cls_loss_config c;
    c.cls_forge_weight = 0.2;
    c.patch_forge_weight = 0.85;
    c.poly_epsilon = 1.0;
    c.focal_gamma = 2.0;
    return c;
}

/* A loss setting from the weight file's header: *value becomes the recorded one when
 * the header has it within lo..hi, and is left as it is otherwise. */
static void model_loss_setting(const loupe_model *m, const char *name, double lo, double hi, double *value)
{
    int found;
    double v = header_hparam(m->data + WEIGHTS_HEADER_BYTES, rd_u32(m->data + 12), name, &found);
    if (found && v >= lo && v <= hi) *value = v;
}

/* LoupeClsLoss's settings as the weight file's header records them (the config's
 * loupe.cls_forge_weight and patch_forge_weight, written by tools/convert.py and loupe
 * init), upstream's values for a file that lacks them. */
static cls_loss_config cls_loss_config_from_model(const loupe_model *m)
{
    cls_loss_config c = cls_loss_config_default();
    model_loss_setting(m, "cls_forge_weight", 0.0, 1.0, &c.cls_forge_weight);
    model_loss_setting(m, "patch_forge_weight", 0.0, 1.0, &c.patch_forge_weight);
    return c;
}

/* One Poly1FocalLoss term of logit x against soft label y: p = sigmoid(x),
 * ce = (alpha y + (1-alpha)(1-y)) (softplus(x) - x y), u = 1 - pt = y (1-p) + (1-y) p,
 * term = ce u^gamma + eps u^(gamma+1); *dx = d term / dx. */
static double poly1_focal_term(double x, double y, double alpha, double gamma, double eps, double *dx)
{
    double e = exp(-fabs(x)), p = x >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
    double wgt = alpha * y + (1.0 - alpha) * (1.0 - y);
    double ce = wgt * ((x > 0.0 ? x : 0.0) - x * y + log1p(e));
    double u = y * (1.0 - p) + (1.0 - y) * p, du = (1.0 - 2.0 * y) * p * (1.0 - p);
    double ug = pow(u, gamma);
    *dx = wgt * (p - y) * ug + (ce * gamma * pow(u, gamma - 1.0) + eps * (gamma + 1.0) * ug) * du;
    return ce * ug + eps * ug * u;
}

/* One image's share of LoupeClsLoss. */
typedef struct cls_loss_terms {
    double cls_term;        /* Poly1Focal(fused logit, label) */
    double patch_sum;       /* sum of the image's patch terms */
    double cls_part;        /* image_weight * cls_term: this image's share of cls_part */
    double patch_part;      /* patch_weight * patch_sum: its share of patch_part */
    double total;           /* cls_part + patch_part */
} cls_loss_terms;

/* LoupeClsLoss of one image of a batch: fused logit with its label (0 or 1), N patch
 * logits with soft labels in [0, 1]; image_weight = 1/B, patch_weight = 1/(B*N). Fills
 * out, the N patch terms into patch_terms (when not NULL), and adds the loss's
 * gradient to *d_fused and d_patch_logits [N] (when not NULL). Returns out->total. */
static double loupe_cls_loss(const cls_loss_config *cfg, float fused_logit, float label, const float *patch_logits,
                             const float *patch_labels, int N, double image_weight, double patch_weight,
                             cls_loss_terms *out, double *patch_terms, float *d_fused, float *d_patch_logits)
{
    double d, sum = 0.0;
    int i;
    out->cls_term = poly1_focal_term(fused_logit, label, cfg->cls_forge_weight, cfg->focal_gamma, cfg->poly_epsilon,
                                     &d);
    if (d_fused) *d_fused += (float)(image_weight * d);
    for (i = 0; i < N; i++) {
        double t = poly1_focal_term(patch_logits[i], patch_labels[i], cfg->patch_forge_weight, cfg->focal_gamma,
                                    cfg->poly_epsilon, &d);
        if (patch_terms) patch_terms[i] = t;
        if (d_patch_logits) d_patch_logits[i] += (float)(patch_weight * d);
        sum += t;
    }
    out->patch_sum = sum;
    out->cls_part = image_weight * out->cls_term;
    out->patch_part = patch_weight * sum;
    out->total = out->cls_part + out->patch_part;
    return out->total;
}

/* ========================================================================== */
/* 6. Segmentor (LoupeSegmentor: FeaturePyramid, PixelDecoder, Mask2Former)    */
/* ========================================================================== */

/* The conditional query's label: the forgery probability p (inference, test-time
 * adaptation) or, in training, whether the image has a target (upstream's labels). */
static float conditional_label(const loupe_session *s)
{
    return s->cond_label >= 0.0f ? s->cond_label : s->prob;
}

/* LoupeSegmentor.forward, conditional queries: the label embeddings mixed by the
 * label p: label_embedding[1] * p + label_embedding[0] * (1 - p) -> [F]. */
static void conditional_query(loupe_session *s)
{
    const loupe_weights *w = s->w;
    int F = s->m->cfg.feature_size, i;
    float p = conditional_label(s);
    for (i = 0; i < F; i++) s->cond_query[i] = w->label_embedding[1][i] * p + w->label_embedding[0][i] * (1.0f - p);
    tap(s, "conditional_query", s->cond_query, 0, 3, 1, 1, F, 0);
}

/* Backward of conditional_query: label_embedding[1] gets p * d, label_embedding[0] (1 - p) * d. */
static void conditional_query_backward(const seg_grads *sg)
{
    int F = sg->cfg->feature_size, i;
    float p = conditional_label(sg->s), *g0 = grad_of(sg, sg->w->label_embedding[0]);
    float *g1 = grad_of(sg, sg->w->label_embedding[1]);
    for (i = 0; i < F; i++) {
        g1[i] += p * sg->wk->d_cond[i];
        g0[i] += (1.0f - p) * sg->wk->d_cond[i];
    }
}

/* Copies n floats unless dst and src are the same buffer (in-place inference views). */
static void copy_unless_same(float *dst, const float *src, size_t n)
{
    if (dst != src) memcpy(dst, src, n * sizeof *dst);
}

/* ScaleBlock.forward: conv1 (ConvTranspose2d 2x2/2 up, or MaxPool2d 2x2/2 down) ->
 * GELU -> depthwise 3x3 conv2 -> LayerNorm2d (eps 1e-6):
 * in [h*w][W] -> out [h'*w'][W]; *oh, *ow receive h', w'; A says where the
 * intermediates go (A->dw NULL: into out). */
static void scale_block(loupe_session *s, const scale_block_w *b, const float *in, int h, int w, float *out,
                        int *oh, int *ow, const scale_block_acts *A)
{
    const loupe_config *c = &s->m->cfg;
    int W = c->width;
    float *dw = A->dw ? A->dw : out;
    size_t n;
    if (b->conv1.w.data) { /* out is free until the end: the product's scratch */
        conv_transpose2x2_hwc(A->pre, in, h, w, W, W, b->conv1.w, b->conv1.b, out);
        *oh = 2 * h; *ow = 2 * w;
    } else {
        maxpool2x2_hwc(A->pre, in, h, w, W);
        *oh = h / 2; *ow = w / 2;
    }
    n = (size_t)*oh * *ow * W;
    gelu(A->act, A->pre, n);
    depthwise3x3_hwc(dw, A->act, *oh, *ow, W, b->dw);
    layernorm(out, dw, *oh * *ow, W, b->norm, c->fpn_ln_eps);
}

/* ScaleBlock backward for block blk of the tape: dout [h'*w'][W] -> din [h*w][W] +=
 * (when din), parameter gradients. */
static void scale_block_backward(const seg_grads *sg, const scale_block_w *b, int blk, const float *in, int h, int w,
                                 const float *dout, float *din)
{
    const loupe_config *c = sg->cfg;
    const scale_block_acts *A = &sg->tape->fpn[blk];
    seg_work *k = sg->wk;
    const float *convt = trained_matrix(b->conv1.w);
    int W = c->width, oh = convt ? 2 * h : h / 2, ow = convt ? 2 * w : w / 2;
    size_t n = (size_t)oh * ow * W;
    zero_floats(k->d_f1, n);
    layernorm_backward(k->d_f1, grad_of(sg, b->norm.w), grad_of(sg, b->norm.b), dout, A->dw, oh * ow, W, b->norm,
                       c->fpn_ln_eps, k->stats);
    zero_floats(k->d_f2, n);
    depthwise3x3_hwc_backward(k->d_f2, grad_of(sg, b->dw), k->d_f1, A->act, oh, ow, W, b->dw);
    zero_floats(k->d_f1, n);
    gelu_backward(k->d_f1, k->d_f2, A->pre, n);
    if (convt) /* d_f2 (n floats) is free again: the product's scratch */
        conv_transpose2x2_hwc_backward(din, grad_of(sg, convt), grad_of(sg, b->conv1.b), k->d_f1, in, h, w, W, W,
                                       convt, k->d_f2);
    else if (din)
        maxpool2x2_hwc_backward(din, k->d_f1, in, h, w, W);
}

/* FeaturePyramid.forward: the patch grid [g*g][W] at scales 4x, 2x, 1x, 0.5x. */
static void feature_pyramid(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = s->w;
    int g = c->grid, W = c->width, h, wd;
    const float *grid = s->feats + W; /* patch tokens, row-major = channels-last g x g map */
    const scale_block_acts *A = &s->fpn_acts;
    scale_block(s, &w->fpn4[0], grid, g, g, s->fpn_mid, &h, &wd, s->tape ? &s->tape->fpn[0] : A);
    scale_block(s, &w->fpn4[1], s->fpn_mid, h, wd, s->fpn4, &h, &wd, s->tape ? &s->tape->fpn[1] : A);
    tap(s, "fpn_0", s->fpn4, 1, 4, 1, W, h, wd);
    scale_block(s, &w->fpn2, grid, g, g, s->fpn2, &h, &wd, s->tape ? &s->tape->fpn[2] : A);
    tap(s, "fpn_1", s->fpn2, 1, 4, 1, W, h, wd);
    tap(s, "fpn_2", grid, 1, 4, 1, W, g, g);
    scale_block(s, &w->fpn_half, grid, g, g, s->fpn_half, &h, &wd, s->tape ? &s->tape->fpn[3] : A);
    tap(s, "fpn_3", s->fpn_half, 1, 4, 1, W, h, wd);
}

/* FeaturePyramid backward: the pixel decoder's gradients of the 4x, 2x and 0.5x maps
 * -> parameter gradients (and d of the patch grid into d_grid when not NULL). */
static void feature_pyramid_backward(const seg_grads *sg, float *d_grid)
{
    const loupe_config *c = sg->cfg;
    const loupe_weights *w = sg->w;
    seg_work *k = sg->wk;
    int g = c->grid, W = c->width;
    const float *grid = sg->s->feats + W;
    scale_block_backward(sg, &w->fpn_half, 3, grid, g, g, k->d_fpn_half, d_grid);
    scale_block_backward(sg, &w->fpn2, 2, grid, g, g, k->d_fpn2, d_grid);
    zero_floats(k->d_fpn_mid, (size_t)4 * g * g * W);
    scale_block_backward(sg, &w->fpn4[1], 1, sg->s->fpn_mid, 2 * g, 2 * g, k->d_fpn4, k->d_fpn_mid);
    scale_block_backward(sg, &w->fpn4[0], 0, grid, g, g, k->d_fpn_mid, d_grid);
}

/* multi_scale_deformable_attention: for each token and head, the softmaxed weights
 * times bilinear samples (grid_sample, zeros padding) of the value maps at
 * reference point + offset / level size, over 3 levels x n_points points. */
static void ms_deform_attn_core(float *out, const float *value, const float *offs, const float *aw,
                                const loupe_tables *tb, int F, int heads, int points)
{
    int dh = F / heads, noff = heads * 3 * points, t;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)tb->tokens * noff * dh * 4))
#endif
    for (t = 0; t < tb->tokens; t++) {
        const float *ref = tb->ref_points + 2 * (size_t)t;
        int h, l, p, d;
        for (h = 0; h < heads; h++) {
            float *acc = out + (size_t)t * F + (size_t)h * dh;
            for (d = 0; d < dh; d++) acc[d] = 0.0f;
            for (l = 0; l < 3; l++) {
                int lh = tb->level_h[l], lw = tb->level_w[l];
                const float *v = value + (size_t)tb->level_start[l] * F + (size_t)h * dh;
                for (p = 0; p < points; p++) {
                    int idx = (h * 3 + l) * points + p;
                    float lx = ref[0] + offs[(size_t)t * noff * 2 + 2 * idx] / (float)lw;
                    float ly = ref[1] + offs[(size_t)t * noff * 2 + 2 * idx + 1] / (float)lh;
                    float gx = 2.0f * lx - 1.0f, gy = 2.0f * ly - 1.0f;
                    float ix = ((gx + 1.0f) * (float)lw - 1.0f) / 2.0f, iy = ((gy + 1.0f) * (float)lh - 1.0f) / 2.0f;
                    sample_bilinear_acc(acc, v, F, lh, lw, ix, iy, aw[(size_t)t * noff + idx], dh);
                }
            }
        }
    }
}

/* Backward of ms_deform_attn_core: dout [Te][F] -> dvalue [Te][F] +=, doffs
 * [Te][heads*3*points*2] += (the sampling position moves one pixel per unit offset),
 * daw [Te][heads*3*points] += (the softmaxed weights). Each head owns its channels of
 * dvalue and its offsets and weights, so heads run in parallel deterministically. */
static void ms_deform_attn_core_backward(float *dvalue, float *doffs, float *daw, const float *dout,
                                         const float *value, const float *offs, const float *aw,
                                         const loupe_tables *tb, int F, int heads, int points)
{
    int dh = F / heads, noff = heads * 3 * points, h;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)tb->tokens * noff * dh * 8))
#endif
    for (h = 0; h < heads; h++) {
        int t, l, p;
        for (t = 0; t < tb->tokens; t++) {
            const float *ref = tb->ref_points + 2 * (size_t)t, *g = dout + (size_t)t * F + (size_t)h * dh;
            for (l = 0; l < 3; l++) {
                int lh = tb->level_h[l], lw = tb->level_w[l];
                size_t base = (size_t)tb->level_start[l] * F + (size_t)h * dh;
                for (p = 0; p < points; p++) {
                    int idx = (h * 3 + l) * points + p;
                    size_t o = (size_t)t * noff * 2 + 2 * (size_t)idx;
                    float lx = ref[0] + offs[o] / (float)lw, ly = ref[1] + offs[o + 1] / (float)lh;
                    float gx = 2.0f * lx - 1.0f, gy = 2.0f * ly - 1.0f;
                    float ix = ((gx + 1.0f) * (float)lw - 1.0f) / 2.0f, iy = ((gy + 1.0f) * (float)lh - 1.0f) / 2.0f;
                    daw[(size_t)t * noff + idx] += sample_bilinear_backward(dvalue + base, value + base, F, lh, lw, ix,
                                                                            iy, aw[(size_t)t * noff + idx], g, dh,
                                                                            &doffs[o], &doffs[o + 1]);
                }
            }
        }
    }
}

/* PixelDecoderEncoderLayer.forward (Loupe): deformable self-attention, the conditional
 * cross-attention of the label query over all tokens (its single output row is added
 * to every token), then the ReLU FFN; post-norm: hin [Te][F] -> hout [Te][F]. A says
 * where the intermediates go (NULL residual views: in place in hout). */
static void pixel_decoder_encoder_layer(loupe_session *s, const enc_layer_w *e, const float *hin, float *hout,
                                        const enc_layer_acts *A)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_tables *tb = s->t;
    int T = tb->tokens, F = c->feature_size, H = c->m2f_heads, dh = F / H, E = c->enc_ffn, t;
    int noff = H * 3 * c->deform_points;
    float scale = 1.0f / sqrtf((float)dh);
    float *h1 = A->h1 ? A->h1 : hout, *a2 = A->a2 ? A->a2 : hout, *h2 = A->h2 ? A->h2 : hout;
    float *a3 = A->a3 ? A->a3 : hout;
    /* Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention */
    add(A->qpos, hin, tb->enc_pos, (size_t)T * F);
    linear(A->value, hin, T, F, F, e->value);
    linear(A->offs, A->qpos, T, F, 2 * noff, e->offsets);
    linear(A->aw, A->qpos, T, F, noff, e->attn_weights);
    softmax_rows(A->aw, T * H, 3 * c->deform_points, 1.0f, NULL);
    ms_deform_attn_core(A->msda, A->value, A->offs, A->aw, tb, F, H, c->deform_points);
    linear(A->a1, A->msda, T, F, F, e->output);
    add(A->a1, A->a1, hin, (size_t)T * F);
    layernorm(h1, A->a1, T, F, e->ln_self, c->ln_eps);
    /* cross_attn (nn.MultiheadAttention): query = conditional query, keys/values = tokens */
    gemm_nt_w(1, F, F, s->cond_query, F, e->cross_qkv.w, e->cross_qkv.b, A->cq, F, 0);
    gemm_nt_w(T, 2 * F, F, h1, F, wmat_rows(e->cross_qkv.w, (size_t)F), e->cross_qkv.b + F, A->kv, 2 * F, 0);
    attention(A->catt, F, A->cq, F, A->kv, 2 * F, A->kv + F, 2 * F, 1, T, H, dh, scale, NULL, s->scores);
    linear(A->co, A->catt, 1, F, F, e->cross_out);
    for (t = 0; t < T; t++) add(a2 + (size_t)t * F, h1 + (size_t)t * F, A->co, (size_t)F);
    layernorm(h2, a2, T, F, e->ln_cross, c->ln_eps);
    /* feed-forward */
    linear(A->ffn, h2, T, F, E, e->fc1);
    relu(A->ffn, (size_t)T * E);
    copy_unless_same(a3, h2, (size_t)T * F);
    gemm_nt_w(T, F, E, A->ffn, E, e->fc2.w, e->fc2.b, a3, F, 1);
    layernorm(hout, a3, T, F, e->ln_final, c->ln_eps);
}

/* Backward of the post-norm ReLU feed-forward block of the encoder and decoder layers,
 * LayerNorm(a), a = x + fc2(relu(fc1(x))): d out [rows][F] -> dx [rows][F] (=), using d_ln
 * [rows][F] and d_h, d_h2 [rows][E] as scratch; a, x and h = relu(fc1(x)) were saved by
 * the forward. Parameter gradients are accumulated. */
static void ffn_block_backward(const seg_grads *sg, float *dx, float *d_ln, const float *dy, const float *a,
                               const float *x, const float *h, int rows, int E, linear_w fc1, linear_w fc2, norm_w ln,
                               float *d_h, float *d_h2)
{
    const loupe_config *c = sg->cfg;
    seg_work *k = sg->wk;
    int F = c->feature_size;
    size_t n = (size_t)rows * F, ne = (size_t)rows * E;
    zero_floats(d_ln, n);
    layernorm_backward(d_ln, grad_of(sg, ln.w), grad_of(sg, ln.b), dy, a, rows, F, ln, c->ln_eps, k->stats);
    memcpy(dx, d_ln, n * sizeof *dx);
    zero_floats(d_h, ne);
    linear_backward(d_h, grad_of(sg, trained_matrix(fc2.w)), grad_of(sg, fc2.b), d_ln, F, h, rows, E, F,
                    trained_matrix(fc2.w), k->wt);
    zero_floats(d_h2, ne);
    relu_backward(d_h2, d_h, h, ne);
    linear_backward(dx, grad_of(sg, trained_matrix(fc1.w)), grad_of(sg, fc1.b), d_h2, E, x, rows, F, E,
                    trained_matrix(fc1.w), k->wt);
}

/* PixelDecoderEncoderLayer backward for layer i: d hout [Te][F] -> d hin [Te][F] (=);
 * the conditional query's gradient += into wk.d_cond. */
static void pixel_decoder_encoder_layer_backward(const seg_grads *sg, int i, const float *dout, float *din)
{
    const loupe_config *c = sg->cfg;
    const loupe_tables *tb = sg->tb;
    const enc_layer_w *e = &sg->w->enc[i];
    const enc_layer_acts *A = &sg->tape->enc[i];
    seg_work *k = sg->wk;
    int T = tb->tokens, F = c->feature_size, H = c->m2f_heads, dh = F / H, E = c->enc_ffn, P = c->deform_points;
    int noff = H * 3 * P, l;
    size_t TF = (size_t)T * F, FF = (size_t)F * F;
    const float *hin = sg->s->enc_h + (size_t)i * TF;
    float *gqkv = grad_of(sg, trained_matrix(e->cross_qkv.w)), *gqkv_b = grad_of(sg, e->cross_qkv.b);
    float scale = 1.0f / sqrtf((float)dh);
    /* feed-forward and final_layer_norm */
    ffn_block_backward(sg, k->d_t2, k->d_t1, dout, A->a3, A->h2, A->ffn, T, E, e->fc1, e->fc2, e->ln_final, k->d_effn,
                       k->d_effn2);
    /* conditional cross-attention: a2 = h1 + co on every token */
    zero_floats(k->d_t1, TF);
    layernorm_backward(k->d_t1, grad_of(sg, e->ln_cross.w), grad_of(sg, e->ln_cross.b), k->d_t2, A->a2, T, F,
                       e->ln_cross, c->ln_eps, k->stats);
    memcpy(k->d_t2, k->d_t1, TF * sizeof *k->d_t2);
    zero_floats(k->d_co, (size_t)F);
    bias_backward(k->d_co, k->d_t1, F, T, F);
    zero_floats(k->d_catt, (size_t)F);
    linear_backward(k->d_catt, grad_of(sg, trained_matrix(e->cross_out.w)), grad_of(sg, e->cross_out.b), k->d_co, F,
                    A->catt, 1, F, F, trained_matrix(e->cross_out.w), k->wt);
    zero_floats(k->d_cq, (size_t)F);
    zero_floats(k->d_kv, TF * 2);
    attention_backward(k->d_cq, F, k->d_kv, 2 * F, k->d_kv + F, 2 * F, k->d_catt, F, A->cq, F, A->kv, 2 * F, A->kv + F,
                       2 * F, 1, T, H, dh, scale, NULL, k->att);
    linear_backward(k->d_cond, gqkv, gqkv_b, k->d_cq, F, sg->s->cond_query, 1, F, F, trained_matrix(e->cross_qkv.w),
                    k->wt);
    linear_backward(k->d_t2, gqkv + FF, gqkv_b + F, k->d_kv, 2 * F, A->h1, T, F, 2 * F,
                    trained_matrix(e->cross_qkv.w) + FF, k->wt);
    /* multi-scale deformable self-attention: a1 = hin + output(msda(value(hin), offsets(q), softmax(weights(q)))) */
    zero_floats(k->d_t1, TF);
    layernorm_backward(k->d_t1, grad_of(sg, e->ln_self.w), grad_of(sg, e->ln_self.b), k->d_t2, A->a1, T, F, e->ln_self,
                       c->ln_eps, k->stats);
    memcpy(din, k->d_t1, TF * sizeof *din);
    zero_floats(k->d_msda, TF);
    linear_backward(k->d_msda, grad_of(sg, trained_matrix(e->output.w)), grad_of(sg, e->output.b), k->d_t1, F, A->msda,
                    T, F, F, trained_matrix(e->output.w), k->wt);
    zero_floats(k->d_value, TF);
    zero_floats(k->d_offs, (size_t)T * 2 * noff);
    zero_floats(k->d_aw, (size_t)T * noff);
    ms_deform_attn_core_backward(k->d_value, k->d_offs, k->d_aw, k->d_msda, A->value, A->offs, A->aw, tb, F, H, P);
    zero_floats(k->d_awl, (size_t)T * noff);
    softmax_rows_backward(k->d_awl, k->d_aw, A->aw, T * H, 3 * P);
    zero_floats(k->d_qpos, TF);
    linear_backward(k->d_qpos, grad_of(sg, trained_matrix(e->attn_weights.w)), grad_of(sg, e->attn_weights.b), k->d_awl,
                    noff, A->qpos, T, F, noff, trained_matrix(e->attn_weights.w), k->wt);
    linear_backward(k->d_qpos, grad_of(sg, trained_matrix(e->offsets.w)), grad_of(sg, e->offsets.b), k->d_offs,
                    2 * noff, A->qpos, T, F, 2 * noff, trained_matrix(e->offsets.w), k->wt);
    linear_backward(din, grad_of(sg, trained_matrix(e->value.w)), grad_of(sg, e->value.b), k->d_value, F, hin, T, F, F,
                    trained_matrix(e->value.w), k->wt);
    /* q = hin + position, position = sine + level_embed[level] */
    add(din, din, k->d_qpos, TF);
    for (l = 0; l < 3; l++)
        bias_backward(grad_of(sg, sg->w->level_embed) + (size_t)l * F, k->d_qpos + (size_t)tb->level_start[l] * F, F,
                      tb->level_h[l] * tb->level_w[l], F);
}

/* PixelDecoder.forward (Loupe's Mask2FormerPixelDecoder): input projections of the
 * 0.5x, 1x, 2x maps, the conditional deformable encoder, then the extra FPN level at
 * 4x (adapter_1 + upsampled 2x level, layer_1) and the mask projection. */
static void pixel_decoder(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = s->w;
    const loupe_tables *tb = s->t;
    int F = c->feature_size, W = c->width, T = tb->tokens, g = c->grid, M = 4 * g, l, i;
    const float *inputs[3];
    float *last, *lat_pre = s->tape ? s->tape->lat_pre : s->lateral, *conv_pre = s->tape ? s->tape->conv_pre : s->fpn_out;
    char name[48];
    inputs[0] = s->fpn_half; inputs[1] = s->feats + W; inputs[2] = s->fpn2;
    for (l = 0; l < 3; l++) {
        float *dst = s->enc_h + (size_t)tb->level_start[l] * F;
        float *pre = s->tape ? s->tape->proj + (size_t)tb->level_start[l] * F : dst;
        int n = tb->level_h[l] * tb->level_w[l];
        linear(pre, inputs[l], n, W, F, w->input_proj[l]);
        copy_unless_same(dst, pre, (size_t)n * F);
        groupnorm_hwc(dst, n, F, c->gn_groups, w->input_gn[l], c->gn_eps);
    }
    tap(s, "pixdec_enc_input", s->enc_h, 0, 3, 1, T, F, 0);
    tap(s, "pixdec_enc_pos", tb->enc_pos, 0, 3, 1, T, F, 0);
    for (i = 0; i < c->enc_layers; i++) {
        float *out = s->enc_h + (size_t)(i + 1) * T * F;
        pixel_decoder_encoder_layer(s, &w->enc[i], s->enc_h + (size_t)i * T * F, out,
                                    s->tape ? &s->tape->enc[i] : &s->enc_acts);
        snprintf(name, sizeof name, "pixdec_enc_layer%d", i);
        tap(s, name, out, 0, 3, 1, T, F, 0);
    }
    last = s->enc_h + (size_t)c->enc_layers * T * F;
    for (l = 0; l < 3; l++) {
        snprintf(name, sizeof name, "multi_scale_features_%d", l);
        tap(s, name, last + (size_t)tb->level_start[l] * F, 1, 4, 1, F, tb->level_h[l], tb->level_w[l]);
    }
    /* extra FPN level: adapter_1 (1x1 conv + GroupNorm) + bilinear upsample of the 2x level */
    linear(lat_pre, s->fpn4, M * M, W, F, w->adapter_1);
    copy_unless_same(s->lateral, lat_pre, (size_t)M * M * F);
    groupnorm_hwc(s->lateral, M * M, F, c->gn_groups, w->adapter_gn, c->gn_eps);
    interp_hwc(last + (size_t)tb->level_start[2] * F, tb->level_h[2], tb->level_w[2], F, s->fpn_out, M, M, s->interp);
    add(s->lateral, s->lateral, s->fpn_out, (size_t)M * M * F);
    /* layer_1: 3x3 conv + GroupNorm + ReLU, then mask_projection (1x1 conv) */
    conv3x3_hwc(conv_pre, s->lateral, M, M, F, F, w->layer_1);
    copy_unless_same(s->fpn_out, conv_pre, (size_t)M * M * F);
    groupnorm_hwc(s->fpn_out, M * M, F, c->gn_groups, w->layer_1_gn, c->gn_eps);
    relu(s->fpn_out, (size_t)M * M * F);
    linear(s->mask_features, s->fpn_out, M * M, F, F, w->mask_projection);
    gemm_prepack(M * M, F, s->mask_features, F, s->mask_features_packed);
    tap(s, "mask_features", s->mask_features, 1, 4, 1, F, M, M);
}

/* PixelDecoder backward: d mask features and d multi-scale features -> d of the
 * pyramid levels it reads (wk.d_fpn4, d_fpn2, d_fpn_half; the 1x level into d_grid
 * when not NULL), parameter gradients. */
static void pixel_decoder_backward(const seg_grads *sg, float *d_grid)
{
    const loupe_config *c = sg->cfg;
    const loupe_tables *tb = sg->tb;
    const loupe_weights *w = sg->w;
    loupe_session *s = sg->s;
    seg_work *k = sg->wk;
    int F = c->feature_size, W = c->width, T = tb->tokens, M = 4 * c->grid, i, l;
    size_t MF = (size_t)M * M * F;
    float *dcur = k->d_e0, *dnext = k->d_e1, *swap;
    const float *inputs[3];
    float *d_inputs[3];
    inputs[0] = s->fpn_half; inputs[1] = s->feats + W; inputs[2] = s->fpn2;
    d_inputs[0] = k->d_fpn_half; d_inputs[1] = d_grid; d_inputs[2] = k->d_fpn2;
    /* mask_projection, ReLU, layer_1 GroupNorm and 3x3 convolution */
    zero_floats(k->d_m1, MF);
    linear_backward(k->d_m1, grad_of(sg, trained_matrix(w->mask_projection.w)), grad_of(sg, w->mask_projection.b),
                    k->d_mf, F, s->fpn_out, M * M, F, F, trained_matrix(w->mask_projection.w), k->wt);
    zero_floats(k->d_m2, MF);
    relu_backward(k->d_m2, k->d_m1, s->fpn_out, MF);
    zero_floats(k->d_m1, MF);
    groupnorm_hwc_backward(k->d_m1, grad_of(sg, w->layer_1_gn.w), grad_of(sg, w->layer_1_gn.b), k->d_m2,
                           sg->tape->conv_pre, M * M, F, c->gn_groups, w->layer_1_gn, c->gn_eps);
    zero_floats(k->d_m2, MF);
    conv3x3_hwc_backward(k->d_m2, grad_of(sg, w->layer_1), k->d_m1, s->lateral, M, M, F, F, w->layer_1, k->wt);
    /* the lateral sum: adapter_1 (1x1 conv + GroupNorm) + the upsampled 2x level */
    memcpy(dcur, k->d_dec_feat, (size_t)T * F * sizeof *dcur);
    interp_hwc_backward(dcur + (size_t)tb->level_start[2] * F, k->d_m2, tb->level_h[2], tb->level_w[2], F, M, M,
                        s->interp);
    zero_floats(k->d_m1, MF);
    groupnorm_hwc_backward(k->d_m1, grad_of(sg, w->adapter_gn.w), grad_of(sg, w->adapter_gn.b), k->d_m2,
                           sg->tape->lat_pre, M * M, F, c->gn_groups, w->adapter_gn, c->gn_eps);
    zero_floats(k->d_fpn4, (size_t)M * M * W);
    linear_backward(k->d_fpn4, grad_of(sg, trained_matrix(w->adapter_1.w)), NULL, k->d_m1, F, s->fpn4, M * M, W, F,
                    trained_matrix(w->adapter_1.w), k->wt);
    /* the deformable encoder, last layer first */
    for (i = c->enc_layers - 1; i >= 0; i--) {
        pixel_decoder_encoder_layer_backward(sg, i, dcur, dnext);
        swap = dcur; dcur = dnext; dnext = swap;
    }
    /* input projections: 1x1 conv + GroupNorm per level (the 1x level is the frozen grid) */
    zero_floats(k->d_fpn_half, (size_t)tb->level_h[0] * tb->level_w[0] * W);
    zero_floats(k->d_fpn2, (size_t)tb->level_h[2] * tb->level_w[2] * W);
    for (l = 0; l < 3; l++) {
        int n = tb->level_h[l] * tb->level_w[l];
        size_t at = (size_t)tb->level_start[l] * F;
        zero_floats(k->d_t1, (size_t)n * F);
        groupnorm_hwc_backward(k->d_t1, grad_of(sg, w->input_gn[l].w), grad_of(sg, w->input_gn[l].b), dcur + at,
                               sg->tape->proj + at, n, F, c->gn_groups, w->input_gn[l], c->gn_eps);
        linear_backward(d_inputs[l], grad_of(sg, trained_matrix(w->input_proj[l].w)), grad_of(sg, w->input_proj[l].b),
                        k->d_t1, F, inputs[l], n, W, F, trained_matrix(w->input_proj[l].w), k->wt);
    }
}

/* Mask2FormerMaskPredictor.forward + class_predictor for prediction i: mask-embedding
 * MLP, masks = embeddings . mask_features, the same masks resized to the attention level. */
static void mask_predictor(loupe_session *s, int i, int level)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = s->w;
    const loupe_tables *tb = s->t;
    int F = c->feature_size, Q = c->num_queries, M = 4 * c->grid, C = c->num_labels + 1, q;
    int lh = tb->level_h[level], lw = tb->level_w[level];
    const float *inter = s->query_hidden + (size_t)i * Q * F;
    float *masks = s->mask_logits + (size_t)i * Q * M * M, *att = s->attn_logits + (size_t)i * Q * 4 * c->grid * c->grid;
    float *me_a = s->tape ? s->tape->me_a + (size_t)i * Q * F : s->me_a;
    float *me_b = s->tape ? s->tape->me_b + (size_t)i * Q * F : s->me_b;
    float *me = s->tape ? s->tape->me + (size_t)i * Q * F : s->me;
    char name[48];
    linear(me_a, inter, Q, F, F, w->mask_embed[0]);
    relu(me_a, (size_t)Q * F);
    linear(me_b, me_a, Q, F, F, w->mask_embed[1]);
    relu(me_b, (size_t)Q * F);
    linear(me, me_b, Q, F, F, w->mask_embed[2]);
    gemm_nt_prepacked(Q, M * M, F, me, F, s->mask_features_packed, masks, M * M);
    for (q = 0; q < Q; q++) interp_plane(masks + (size_t)q * M * M, M, M, att + (size_t)q * lh * lw, lh, lw, s->interp);
    linear(s->class_logits + (size_t)i * Q * C, inter, Q, F, C, w->class_predictor);
    snprintf(name, sizeof name, "dec_query_hidden_%d", i);
    tap(s, name, inter, 0, 3, 1, Q, F, 0);
    snprintf(name, sizeof name, "dec_class_logits_%d", i);
    tap(s, name, s->class_logits + (size_t)i * Q * C, 0, 3, 1, Q, C, 0);
    snprintf(name, sizeof name, "dec_mask_logits_%d", i);
    tap(s, name, masks, 0, 4, 1, Q, M, M);
    snprintf(name, sizeof name, "dec_attn_mask_logits_%d", i);
    tap(s, name, att, 0, 4, 1, Q, lh, lw);
}

/* Backward of Mask2FormerMaskPredictor's einsum masks[r][p] = me[r] . mf[p] (all rows of
 * all predictions at once): d_mask [rows][P] -> d_me [rows][F] +=, d_mf [P][F] +=.
 * mf_t: scratch of F*P floats (mf transposed, so that d_me is a gemm_nt). */
static void mask_einsum_backward(float *d_me, float *d_mf, const float *d_mask, const float *me, const float *mf,
                                 int rows, int P, int F, float *mf_t)
{
    transpose(mf_t, mf, P, F);
    gemm_nt(rows, F, P, d_mask, P, mf_t, P, NULL, d_me, F, 1);
    gemm_tn(P, F, rows, d_mask, P, me, F, d_mf, F);
}

/* Mask2FormerMaskPredictor + class_predictor backward for prediction i: the loss's
 * d class logits [Q][C] and d mask embedding (wk.d_me) -> d query_hidden[i] dqh [Q][F] (=). */
static void mask_predictor_backward(const seg_grads *sg, int i, float *dqh)
{
    const loupe_config *c = sg->cfg;
    const loupe_weights *w = sg->w;
    seg_work *k = sg->wk;
    int F = c->feature_size, Q = c->num_queries, C = c->num_labels + 1, l;
    size_t QF = (size_t)Q * F;
    const float *qh = sg->s->query_hidden + (size_t)i * QF;
    const float *acts[2];
    const float *dy = k->d_me + (size_t)i * QF;
    acts[0] = sg->tape->me_a + (size_t)i * QF;
    acts[1] = sg->tape->me_b + (size_t)i * QF;
    zero_floats(dqh, QF);
    linear_backward(dqh, grad_of(sg, trained_matrix(w->class_predictor.w)), grad_of(sg, w->class_predictor.b),
                    k->d_class + (size_t)i * Q * C, C, qh, Q, F, C, trained_matrix(w->class_predictor.w), k->wt);
    /* mask_embedder: Linear-ReLU-Linear-ReLU-Linear, walked back from the last layer */
    for (l = 2; l > 0; l--) {
        zero_floats(k->d_x1, QF);
        linear_backward(k->d_x1, grad_of(sg, trained_matrix(w->mask_embed[l].w)), grad_of(sg, w->mask_embed[l].b), dy,
                        F, acts[l - 1], Q, F, F, trained_matrix(w->mask_embed[l].w), k->wt);
        zero_floats(k->d_x2, QF);
        relu_backward(k->d_x2, k->d_x1, acts[l - 1], QF);
        memcpy(k->d_x3, k->d_x2, QF * sizeof *k->d_x3);
        dy = k->d_x3;
    }
    linear_backward(dqh, grad_of(sg, trained_matrix(w->mask_embed[0].w)), grad_of(sg, w->mask_embed[0].b), dy, F, qh, Q,
                    F, F, trained_matrix(w->mask_embed[0].w), k->wt);
}

/* Mask2FormerMaskedAttentionDecoderLayer.forward_post: masked cross-attention to one
 * level (mask from the previous prediction; a query whose mask blocks everything
 * attends everywhere), self-attention among queries, ReLU FFN; post-norm:
 * hin [Q][F] -> hout [Q][F] (may alias). A says where the intermediates go. */
static void masked_attention_decoder_layer(loupe_session *s, const dec_layer_w *d, int level, const float *prev_att,
                                           const float *hin, float *hout, const dec_layer_acts *A)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_tables *tb = s->t;
    const loupe_weights *w = s->w;
    int F = c->feature_size, Q = c->num_queries, H = c->m2f_heads, dh = F / H, E = c->dec_ffn, q, j;
    int n = tb->level_h[level] * tb->level_w[level];
    const float *feat = s->dec_feat + (size_t)tb->level_start[level] * F;
    const float *kin = s->dec_kin + (size_t)tb->level_start[level] * F; /* feat + position */
    float scale = 1.0f / sqrtf((float)dh);
    for (q = 0; q < Q; q++) {
        unsigned char *row = A->mask + (size_t)q * n;
        int blocked = 0;
        for (j = 0; j < n; j++) blocked += row[j] = sigmoid_below_half(prev_att[(size_t)q * n + j]);
        if (blocked == n) memset(row, 0, (size_t)n);
    }
    /* cross_attn (nn.MultiheadAttention): q = hidden + query pos, k = features + pos, v = features */
    add(A->hq1, hin, w->query_embed, (size_t)Q * F);
    gemm_nt_w(Q, F, F, A->hq1, F, d->cross_qkv.w, d->cross_qkv.b, A->q1, F, 0);
    gemm_nt_w(n, F, F, kin, F, wmat_rows(d->cross_qkv.w, (size_t)F), d->cross_qkv.b + F, A->kv, 2 * F, 0);
    gemm_nt_w(n, F, F, feat, F, wmat_rows(d->cross_qkv.w, (size_t)2 * F), d->cross_qkv.b + 2 * F, A->kv + F, 2 * F, 0);
    attention(A->att1, F, A->q1, F, A->kv, 2 * F, A->kv + F, 2 * F, Q, n, H, dh, scale, A->mask, s->scores);
    copy_unless_same(A->a1, hin, (size_t)Q * F);
    gemm_nt_w(Q, F, F, A->att1, F, d->cross_out.w, d->cross_out.b, A->a1, F, 1);
    layernorm(A->h1, A->a1, Q, F, d->ln_cross, c->ln_eps);
    /* self_attn (Mask2FormerAttention): q, k from hidden + query pos, v from hidden */
    add(A->hq2, A->h1, w->query_embed, (size_t)Q * F);
    linear(A->q2, A->hq2, Q, F, F, d->q);
    linear(A->kv2, A->hq2, Q, F, F, d->k);
    linear(A->kv2 + (size_t)Q * F, A->h1, Q, F, F, d->v);
    attention(A->att2, F, A->q2, F, A->kv2, F, A->kv2 + (size_t)Q * F, F, Q, Q, H, dh, scale, NULL, s->scores);
    copy_unless_same(A->a2, A->h1, (size_t)Q * F);
    gemm_nt_w(Q, F, F, A->att2, F, d->o.w, d->o.b, A->a2, F, 1);
    layernorm(A->h2, A->a2, Q, F, d->ln_self, c->ln_eps);
    /* feed-forward */
    linear(A->ffn, A->h2, Q, F, E, d->fc1);
    relu(A->ffn, (size_t)Q * E);
    copy_unless_same(A->a3, A->h2, (size_t)Q * F);
    gemm_nt_w(Q, F, E, A->ffn, E, d->fc2.w, d->fc2.b, A->a3, F, 1);
    layernorm(hout, A->a3, Q, F, d->ln_final, c->ln_eps);
}

/* Mask2FormerMaskedAttentionDecoderLayer backward for layer i: d hout [Q][F] ->
 * d hin [Q][F] (=); d of its level's features += into wk.d_dec_feat. */
static void masked_attention_decoder_layer_backward(const seg_grads *sg, int i, const float *dout, float *din)
{
    const loupe_config *c = sg->cfg;
    const loupe_tables *tb = sg->tb;
    const dec_layer_w *d = &sg->w->dec[i];
    const dec_layer_acts *A = &sg->tape->dec[i];
    seg_work *k = sg->wk;
    int F = c->feature_size, Q = c->num_queries, H = c->m2f_heads, dh = F / H, E = c->dec_ffn, level = i % 3;
    int n = tb->level_h[level] * tb->level_w[level];
    size_t QF = (size_t)Q * F, FF = (size_t)F * F;
    const float *feat = sg->s->dec_feat + (size_t)tb->level_start[level] * F;
    const float *kin = sg->s->dec_kin + (size_t)tb->level_start[level] * F;
    float *dfeat = k->d_dec_feat + (size_t)tb->level_start[level] * F, *dqe = grad_of(sg, sg->w->query_embed);
    float *gqkv = grad_of(sg, trained_matrix(d->cross_qkv.w)), *gqkv_b = grad_of(sg, d->cross_qkv.b);
    float scale = 1.0f / sqrtf((float)dh);
    /* feed-forward and final_layer_norm: a3 = h2 + fc2(relu(fc1(h2))) */
    ffn_block_backward(sg, k->d_x2, k->d_x1, dout, A->a3, A->h2, A->ffn, Q, E, d->fc1, d->fc2, d->ln_final, k->d_qffn,
                       k->d_qffn2);
    /* self-attention and its norm: a2 = h1 + o(attention(q(h1 + pos), k(h1 + pos), v(h1))) */
    zero_floats(k->d_x1, QF);
    layernorm_backward(k->d_x1, grad_of(sg, d->ln_self.w), grad_of(sg, d->ln_self.b), k->d_x2, A->a2, Q, F, d->ln_self,
                       c->ln_eps, k->stats);
    memcpy(k->d_x2, k->d_x1, QF * sizeof *k->d_x2);
    zero_floats(k->d_att, QF);
    linear_backward(k->d_att, grad_of(sg, trained_matrix(d->o.w)), grad_of(sg, d->o.b), k->d_x1, F, A->att2, Q, F, F,
                    trained_matrix(d->o.w), k->wt);
    zero_floats(k->d_q, QF);
    zero_floats(k->d_kv2, 2 * QF);
    attention_backward(k->d_q, F, k->d_kv2, F, k->d_kv2 + QF, F, k->d_att, F, A->q2, F, A->kv2, F, A->kv2 + QF, F, Q, Q,
                       H, dh, scale, NULL, k->att);
    zero_floats(k->d_hq, QF);
    linear_backward(k->d_hq, grad_of(sg, trained_matrix(d->q.w)), grad_of(sg, d->q.b), k->d_q, F, A->hq2, Q, F, F,
                    trained_matrix(d->q.w), k->wt);
    linear_backward(k->d_hq, grad_of(sg, trained_matrix(d->k.w)), grad_of(sg, d->k.b), k->d_kv2, F, A->hq2, Q, F, F,
                    trained_matrix(d->k.w), k->wt);
    linear_backward(k->d_x2, grad_of(sg, trained_matrix(d->v.w)), grad_of(sg, d->v.b), k->d_kv2 + QF, F, A->h1, Q, F, F,
                    trained_matrix(d->v.w), k->wt);
    add(k->d_x2, k->d_x2, k->d_hq, QF);
    add(dqe, dqe, k->d_hq, QF);
    /* masked cross-attention and its norm: a1 = hin + out(attention(q(hin + pos), k(feat + pos), v(feat))) */
    zero_floats(k->d_x1, QF);
    layernorm_backward(k->d_x1, grad_of(sg, d->ln_cross.w), grad_of(sg, d->ln_cross.b), k->d_x2, A->a1, Q, F,
                       d->ln_cross, c->ln_eps, k->stats);
    memcpy(din, k->d_x1, QF * sizeof *din);
    zero_floats(k->d_att, QF);
    linear_backward(k->d_att, grad_of(sg, trained_matrix(d->cross_out.w)), grad_of(sg, d->cross_out.b), k->d_x1, F,
                    A->att1, Q, F, F, trained_matrix(d->cross_out.w), k->wt);
    zero_floats(k->d_q, QF);
    zero_floats(k->d_kv, (size_t)n * 2 * F);
    attention_backward(k->d_q, F, k->d_kv, 2 * F, k->d_kv + F, 2 * F, k->d_att, F, A->q1, F, A->kv, 2 * F, A->kv + F,
                       2 * F, Q, n, H, dh, scale, A->mask, k->att);
    zero_floats(k->d_hq, QF);
    linear_backward(k->d_hq, gqkv, gqkv_b, k->d_q, F, A->hq1, Q, F, F, trained_matrix(d->cross_qkv.w), k->wt);
    linear_backward(dfeat, gqkv + FF, gqkv_b + F, k->d_kv, 2 * F, kin, n, F, F, trained_matrix(d->cross_qkv.w) + FF,
                    k->wt);
    linear_backward(dfeat, gqkv + 2 * FF, gqkv_b + 2 * F, k->d_kv + F, 2 * F, feat, n, F, F,
                    trained_matrix(d->cross_qkv.w) + 2 * FF, k->wt);
    add(din, din, k->d_hq, QF);
    add(dqe, dqe, k->d_hq, QF);
}

/* Mask2FormerTransformerModule + Mask2FormerMaskedAttentionDecoder: learned queries,
 * one prediction before the first layer and one after each of the L-1 layers;
 * layer i attends to level i mod 3 using prediction i resized to that level. */
static void masked_attention_decoder(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = s->w;
    const loupe_tables *tb = s->t;
    int F = c->feature_size, Q = c->num_queries, L = c->dec_layers, T = tb->tokens, M = 4 * c->grid;
    int l, p, i, C = c->num_labels + 1;
    const float *ms = s->enc_h + (size_t)c->enc_layers * T * F;
    float *hidden = s->tape ? s->tape->hidden : s->hidden;
    size_t QF = (size_t)Q * F;
    for (l = 0; l < 3; l++)
        for (p = tb->level_start[l]; p < tb->level_start[l] + tb->level_h[l] * tb->level_w[l]; p++)
            add(s->dec_feat + (size_t)p * F, ms + (size_t)p * F, w->dec_level_embed + (size_t)l * F, (size_t)F);
    add(s->dec_kin, s->dec_feat, tb->dec_pos, (size_t)T * F); /* once, not per layer: three layers share a level */
    memcpy(hidden, w->query_feat, QF * sizeof *hidden);
    layernorm(s->query_hidden, hidden, Q, F, w->dec_ln, c->ln_eps);
    mask_predictor(s, 0, 0);
    for (i = 0; i < L - 1; i++) {
        const float *hin = s->tape ? hidden + (size_t)i * QF : hidden;
        float *hout = s->tape ? hidden + (size_t)(i + 1) * QF : hidden;
        masked_attention_decoder_layer(s, &w->dec[i], i % 3, s->attn_logits + (size_t)i * Q * 4 * c->grid * c->grid,
                                       hin, hout, s->tape ? &s->tape->dec[i] : &s->dec_acts);
        layernorm(s->query_hidden + (size_t)(i + 1) * QF, hout, Q, F, w->dec_ln, c->ln_eps);
        mask_predictor(s, i + 1, (i + 1) % 3);
    }
    tap(s, "class_queries_logits", s->class_logits + (size_t)(L - 1) * Q * C, 0, 3, 1, Q, C, 0);
    tap(s, "masks_queries_logits", s->mask_logits + (size_t)(L - 1) * Q * M * M, 0, 4, 1, Q, M, M);
}

/* Mask2FormerMaskedAttentionDecoder backward: the loss's gradients of every prediction
 * -> d mask features (wk.d_mf), d multi-scale features (wk.d_dec_feat), parameter gradients. */
static void masked_attention_decoder_backward(const seg_grads *sg)
{
    const loupe_config *c = sg->cfg;
    const loupe_tables *tb = sg->tb;
    const loupe_weights *w = sg->w;
    seg_work *k = sg->wk;
    int F = c->feature_size, Q = c->num_queries, L = c->dec_layers, M2 = 16 * c->grid * c->grid, i, l;
    size_t QF = (size_t)Q * F;
    float *dcur = k->d_h0, *dnext = k->d_h1, *swap, *gqf = grad_of(sg, w->query_feat);
    /* the mask einsum of all L predictions: masks[q][p] = me[q] . mask_features[p] */
    zero_floats(k->d_me, (size_t)L * QF);
    zero_floats(k->d_mf, (size_t)M2 * F);
    mask_einsum_backward(k->d_me, k->d_mf, k->d_mask, sg->tape->me, sg->s->mask_features, L * Q, M2, F, k->mf_t);
    zero_floats(k->d_dec_feat, (size_t)tb->tokens * F);
    /* hidden[i] feeds prediction i (through the decoder LayerNorm) and layer i */
    for (i = L - 1; i >= 0; i--) {
        if (i == L - 1) zero_floats(dcur, QF);
        else masked_attention_decoder_layer_backward(sg, i, dnext, dcur);
        mask_predictor_backward(sg, i, k->d_qh);
        layernorm_backward(dcur, grad_of(sg, w->dec_ln.w), grad_of(sg, w->dec_ln.b), k->d_qh,
                           sg->tape->hidden + (size_t)i * QF, Q, F, w->dec_ln, c->ln_eps, k->stats);
        swap = dcur; dcur = dnext; dnext = swap;
    }
    add(gqf, gqf, dnext, QF);
    /* decoder features = multi-scale features + level embedding */
    for (l = 0; l < 3; l++)
        bias_backward(grad_of(sg, w->dec_level_embed) + (size_t)l * F, k->d_dec_feat + (size_t)tb->level_start[l] * F,
                      F, tb->level_h[l] * tb->level_w[l], F);
}

/* LoupeSegmentor backward after a training forward (the session's seg_tape) and the
 * loss (wk->d_class, wk->d_mask): every trained segmentor tensor's gradient +=; the patch
 * grid's (backbone features) into d_grid [g*g][W] += when not NULL (the backbone trains). */
static void segmentor_backward(const seg_grads *sg, float *d_grid)
{
    zero_floats(sg->wk->d_cond, (size_t)sg->cfg->feature_size);
    masked_attention_decoder_backward(sg);
    pixel_decoder_backward(sg, d_grid);
    feature_pyramid_backward(sg, d_grid);
    conditional_query_backward(sg);
}

/* ========================================================================== */
/* 7. Pre- and post-processing (LoupeImageProcessor)                          */
/* ========================================================================== */

int loupe_preprocess(const loupe_model *m, const loupe_image *img, float *pixel_values, char *err, size_t errsize)
{
    int S, c, p;
    unsigned char *resized;
    if (!m || !img || !img->rgb || !pixel_values) return fail(err, errsize, "loupe_preprocess needs a model, an image and an output");
    S = m->cfg.image_size;
    resized = malloc((size_t)S * S * 3);
    if (!resized) return fail(err, errsize, "out of memory");
    if (loupe_resize_rgb(img->rgb, img->width, img->height, resized, S, S)) {
        free(resized);
        return fail(err, errsize, "cannot resize a %dx%d image", img->width, img->height);
    }
    /* x * (1/255) in double, rounded to float, then (x - 0.5) / 0.5 in float, HWC -> CHW */
    for (c = 0; c < 3; c++)
        for (p = 0; p < S * S; p++) {
            float v = (float)((double)resized[(size_t)p * 3 + c] * (1.0 / 255.0));
            pixel_values[(size_t)c * S * S + p] = (v - 0.5f) / 0.5f;
        }
    free(resized);
    return 0;
}

/* Mask logits -> bilinear 384x384 -> sum over queries of softmax(class)[forgery] *
 * sigmoid(mask): the forgery probability map seg [384][384] (may exceed 1). */
static void post_process_segmentation(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    int Q = c->num_queries, L = c->dec_layers, M = 4 * c->grid, C = c->num_labels + 1, q, k;
    size_t n = (size_t)SEG_SIZE * SEG_SIZE, i;
    long px;
    const float *masks = s->mask_logits + (size_t)(L - 1) * Q * M * M;
    const float *cls = s->class_logits + (size_t)(L - 1) * Q * C;
    for (i = 0; i < n; i++) s->seg[i] = 0.0f;
    for (q = 0; q < Q; q++) {
        float mx = cls[(size_t)q * C], sum = 0.0f, p0;
        for (k = 1; k < C; k++) mx = cls[(size_t)q * C + k] > mx ? cls[(size_t)q * C + k] : mx;
        for (k = 0; k < C; k++) sum += expf(cls[(size_t)q * C + k] - mx);
        p0 = expf(cls[(size_t)q * C] - mx) / sum;
        interp_plane(masks + (size_t)q * M * M, M, M, s->seg_tmp, SEG_SIZE, SEG_SIZE, s->interp);
        /* one expf per pixel (the stage's cost), each pixel on its own: threads share them */
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok(8.0 * (double)n))
#endif
        for (px = 0; px < (long)n; px++) s->seg[px] += p0 * sigmoidf(s->seg_tmp[px]);
    }
    tap(s, "seg_prob_384", s->seg, 0, 4, 1, 1, SEG_SIZE, SEG_SIZE);
}

int loupe_postprocess(const loupe_session *s, int width, int height, float threshold, float *seg_prob,
                      unsigned char *mask, char *err, size_t errsize)
{
    float *prob = seg_prob, *scratch;
    size_t n, i;
    if (!s) return fail(err, errsize, "no session given");
    if (width < 1 || height < 1 || width > (1 << 20) || height > (1 << 20) ||
        (double)width * height > (double)SIZE_MAX / sizeof(float) / 2)
        return fail(err, errsize, "output size %dx%d is invalid", width, height);
    n = (size_t)width * height;
    scratch = malloc(INTERP_SCRATCH(height, width) * sizeof *scratch + (seg_prob ? 0 : n * sizeof *prob));
    if (!scratch) return fail(err, errsize, "out of memory for a %dx%d mask", width, height);
    if (!prob) prob = scratch + INTERP_SCRATCH(height, width);
    interp_plane(s->seg, SEG_SIZE, SEG_SIZE, prob, height, width, scratch);
    if (mask)
        for (i = 0; i < n; i++) mask[i] = prob[i] > threshold ? 255 : 0;
    free(scratch);
    return 0;
}

int loupe_forward(loupe_session *s, const float *pixel_values, char *err, size_t errsize)
{
    const loupe_config *c;
    double t[LOUPE_STAGE_COUNT + 1];
    int i;
    if (!s || !pixel_values) return fail(err, errsize, "loupe_forward needs a session and an input tensor");
    c = &s->m->cfg;
    if (max_threads() > s->threads)
        return fail(err, errsize, "the session was created for %d threads but %d are requested; create sessions "
                    "after loupe_set_threads", s->threads, max_threads());
    tap(s, "pixel_values", pixel_values, 0, 4, 1, 3, c->image_size, c->image_size);
    t[0] = now_seconds();
    vision_transformer(s, pixel_values);
    t[1] = now_seconds();
    loupe_classifier(s);
    conditional_query(s);
    t[2] = now_seconds();
    feature_pyramid(s);
    t[3] = now_seconds();
    pixel_decoder(s);
    t[4] = now_seconds();
    masked_attention_decoder(s);
    t[5] = now_seconds();
    post_process_segmentation(s);
    t[6] = now_seconds();
    for (i = 0; i < LOUPE_STAGE_COUNT; i++) s->out.stage_seconds[i] = t[i + 1] - t[i];
    s->out.global_logit = s->global_logit;
    s->out.fused_logit = s->fused_logit;
    s->out.prob = s->prob;
    s->out.patch_logits = s->patch_logits;
    s->out.grid = c->grid;
    s->out.num_queries = c->num_queries;
    s->out.mask_size = 4 * c->grid;
    s->out.seg_size = SEG_SIZE;
    s->out.class_logits = s->class_logits + (size_t)(c->dec_layers - 1) * c->num_queries * (c->num_labels + 1);
    s->out.mask_logits = s->mask_logits + (size_t)(c->dec_layers - 1) * c->num_queries * 16 * c->grid * c->grid;
    s->out.seg_prob = s->seg;
    return 0;
}

const loupe_outputs *loupe_get_outputs(const loupe_session *s) { return &s->out; }


/* ========================================================================== */
/* 8. Training (LitModel.training_step, LoupeSegLoss; test-time adaptation)     */
/* ========================================================================== */
/* One trainer for upstream's stages cls, seg and cls_seg and for test-time adaptation
 * (TTA: the classifier's own verdict is the segmentor's target, and only the segmentor
 * trains). This section holds LoupeSegLoss with its gradient (LoupeClsLoss is in section
 * 5; every module's backward follows its forward in sections 4 to 6), the trainer
 * (trained tensors copied out of the read-only model, parameter groups, tapes, one image
 * of a batch at a time), clipping and AdamW, state files, and the loupe_trainer /
 * loupe_tta API. */

/* ---- Pseudo-label segmentation loss of test-time adaptation, and its gradient ----
 *
 * In test-time adaptation (TTA) Loupe trains its segmentor on the classifier's own
 * verdict: when the fused forgery probability p exceeds 0.5 there is one "forgery"
 * target whose soft mask is sigmoid(patch logits) on the g x g patch grid, otherwise
 * there is no target at all (LoupeModel.forward, stage "test"). The loss is upstream's
 * LoupeSegLoss (Kamichanw/Loupe src/models/loupe/loss.py), a Mask2FormerLoss from
 * transformers whose mask terms are replaced:
 *
 *   for each of the L mask predictions (loss call k = 0: the final one, k = 1..L-1:
 *   auxiliary prediction k-1, i.e. decoder prediction index L-1, 0, 1, ..., L-2):
 *     1. hungarian_matcher: 12544 uniform points; cost of query q = 5 * sigmoid-BCE
 *        + 5 * dice - softmax probability of "forgery"; the target goes to the
 *        cheapest query;
 *     2. sample_points_using_uncertainty: 37632 uniform candidates, keep the 9408
 *        whose mask logit is closest to 0, add 3136 uniform points;
 *     3. loss_masks: on those 12544 points, Poly-1 focal loss (soft labels) and
 *        Tversky loss between the matched query's mask and the target;
 *     4. loss_labels: class-weighted cross-entropy over all queries, the matched one
 *        labelled "forgery", the others "no-object".
 *   total = sum over calls of 5 * loss_mask + 5 * loss_dice + 2 * loss_cross_entropy.
 *
 * Points live in [0,1)^2 as (x, y) and are read with grid_sample (bilinear,
 * align_corners=False, zero padding): the mask logits on their M x M grid (M = 4g),
 * the target on its g x g grid. Matching and point selection are piecewise constant
 * (no gradient); everything else is differentiated analytically here, each
 * *_backward next to its *_forward, ending in grid_sample's backward, which
 * scatters a point's gradient into its four neighbouring pixels.
 *
 * Precision: the sampled values that feed discrete decisions (top-k of uncertainty,
 * the matching) are computed in float with the operations of PyTorch's CPU kernel in
 * its order (test/check_tta: upstream's matches, and every loss term within rel 6e-7);
 * the loss formulas are evaluated in double from those float samples and every sum is
 * accumulated in double. Log-sigmoid forms keep all terms finite for any finite logit.
 *
 * Random numbers come from a caller-supplied source (loss_rng) in upstream's
 * torch.rand call order, so a test can replay PyTorch's exact draws (without a target
 * upstream's point sampling draws zero numbers, so nothing is drawn here).
 *
 * Differences from upstream, by design: with no target in the batch upstream's Tversky
 * term is the mean over zero masks (NaN) and so is the total; here loss_dice (and
 * loss_mask) is 0. Every image has at most one target (one forgery class), which is
 * all Loupe's labels and pseudo labels produce; training labels are the same loss with
 * ground-truth targets (mask_labels at the input size) over a batch (seg_batch). */

#define SEG_NUM_CLASSES 2                 /* class logits per query: [forgery, no-object] */
#define SEG_FORGERY_CLASS 0               /* the pseudo target's class */
#define SEG_NO_OBJECT_CLASS 1             /* Mask2Former's "no object" class (num_labels) */
#define SEG_PSEUDO_LABEL_THRESHOLD 0.5f   /* LoupeModel.forward: a target exists when p > 0.5 */
#define SEG_TVERSKY_SMOOTH 1e-6           /* TverskyLoss: added to numerator and denominator */
#define SEG_MATCHER_COST_LIMIT 1e10f      /* matcher clamps costs to +-1e10 before the assignment */
#define SEG_SPLITMIX_GOLDEN 0x9E3779B97F4A7C15ull /* splitmix64 increment */
#define SEG_SPLITMIX_MUL1 0xBF58476D1CE4E5B9ull   /* splitmix64 finalizer multipliers */
#define SEG_SPLITMIX_MUL2 0x94D049BB133111EBull
#define SEG_UNIFORM_BITS 24               /* float32 uniforms carry 24 random bits */
#define SEG_UNIFORM_SCALE (1.0f / 16777216.0f) /* 2^-24 */

/* A source of uniform float32 numbers in [0, 1): fill writes the next n of them.
 * The loss draws, in this order (upstream's torch.rand calls of one TTA step):
 *   L-1 scalars (Mask2FormerMaskedAttentionDecoder's layerdrop draws, unused here),
 *   then per loss call k = 0..L-1: matcher points [P][2]; when there is a target,
 *   oversampled candidates [3P][2] and random points [P - round-down(0.75 P)][2]
 *   (P = train_num_points; pairs are (x, y)). */
typedef struct loss_rng {
    void (*fill)(void *state, float *out, size_t n);
    void *state;
    void (*seek)(void *state, uint64_t position); /* next fill starts at number `position` */
} loss_rng;

/* State of splitmix_uniform_fill: number i of the stream (counting from 0 over all
 * calls) is splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) >> 40, divided by 2^24. */
typedef struct splitmix_uniform {
    uint64_t seed;
    uint64_t counter;   /* numbers drawn so far */
} splitmix_uniform;

/* A small counter-based generator for loss_rng (the mixing function of the weight
 * generator, make_weights.py): every number depends only on (seed, position). */
static void splitmix_uniform_fill(void *state, float *out, size_t n)
{
    splitmix_uniform *s = (splitmix_uniform *)state;
    size_t i;
    for (i = 0; i < n; i++) {
        uint64_t z = s->seed + ++s->counter * SEG_SPLITMIX_GOLDEN;
        z = (z ^ (z >> 30)) * SEG_SPLITMIX_MUL1;
        z = (z ^ (z >> 27)) * SEG_SPLITMIX_MUL2;
        z ^= z >> 31;
        out[i] = (float)(z >> (64 - SEG_UNIFORM_BITS)) * SEG_UNIFORM_SCALE;
    }
}

/* Moves the splitmix stream to number `position` (counter-based: any order of reads). */
static void splitmix_uniform_seek(void *state, uint64_t position)
{
    ((splitmix_uniform *)state)->counter = position;
}

/* Hyperparameters of LoupeSegLoss (values of Loupe's configs in seg_loss_config_default). */
typedef struct seg_loss_config {
    double class_weight;             /* weight of loss_cross_entropy (Mask2FormerConfig.class_weight) */
    double mask_weight;              /* weight of loss_mask, and the matcher's cost_mask */
    double dice_weight;              /* weight of loss_dice, and the matcher's cost_dice */
    double matcher_cost_class;       /* LoupeHungarianMatcher's cost_class (its default, 1) */
    double no_object_weight;         /* cross-entropy weight of the no-object class */
    int train_num_points;            /* P: points per mask */
    double oversample_ratio;         /* candidates = int(P * ratio) */
    double importance_sample_ratio;  /* most uncertain candidates kept = int(ratio * P) */
    double pixel_forge_weight;       /* Poly1FocalLoss alpha (weight of the forged class) */
    double pixel_poly_epsilon;       /* Poly1FocalLoss epsilon */
    double focal_gamma;              /* Poly1FocalLoss gamma (hard-coded 2 upstream; >= 1) */
    double tversky_alpha;            /* TverskyLoss weight of false positives */
    double tversky_beta;             /* TverskyLoss weight of false negatives (upstream: 1 - alpha) */
} seg_loss_config;

/* Loupe's values (its configs/model yaml files and Mask2FormerConfig's defaults). */
static seg_loss_config seg_loss_config_default(void)
{
    seg_loss_config c;
    c.class_weight = 2.0;
    c.mask_weight = 5.0;
    c.dice_weight = 5.0;
    c.matcher_cost_class = 1.0;
    c.no_object_weight = 0.1;
    c.train_num_points = 12544;
    c.oversample_ratio = 3.0;
    c.importance_sample_ratio = 0.75;
    c.pixel_forge_weight = 0.8;
    c.pixel_poly_epsilon = 1.0;
    c.focal_gamma = 2.0;
    c.tversky_alpha = 0.3;
    c.tversky_beta = 1.0 - c.tversky_alpha;   /* LoupeSegLoss passes beta = 1 - alpha */
    return c;
}

/* LoupeSegLoss's settings as the weight file's header records them (tools/convert.py
 * writes the config's values), upstream's defaults for any it lacks. */
static seg_loss_config seg_loss_config_from_model(const loupe_model *m)
{
    seg_loss_config c = seg_loss_config_default();
    double points = c.train_num_points;
    model_loss_setting(m, "class_weight", 0.0, 1e6, &c.class_weight);
    model_loss_setting(m, "mask_weight", 0.0, 1e6, &c.mask_weight);
    model_loss_setting(m, "dice_weight", 0.0, 1e6, &c.dice_weight);
    model_loss_setting(m, "no_object_weight", 1e-6, 1e6, &c.no_object_weight);
    model_loss_setting(m, "oversample_ratio", 1.0, 64.0, &c.oversample_ratio);
    model_loss_setting(m, "importance_sample_ratio", 0.0, 1.0, &c.importance_sample_ratio);
    model_loss_setting(m, "pixel_forge_weight", 0.0, 1.0, &c.pixel_forge_weight);
    model_loss_setting(m, "pixel_poly_epsilon", -1e6, 1e6, &c.pixel_poly_epsilon);
    model_loss_setting(m, "tversky_alpha", 0.0, 1.0, &c.tversky_alpha);
    model_loss_setting(m, "train_num_points", 1.0, (double)(1 << 20), &points);
    if (points == floor(points)) c.train_num_points = (int)points;
    c.tversky_beta = 1.0 - c.tversky_alpha;
    return c;
}

/* One mask prediction of the decoder, and where its gradient goes. */
typedef struct seg_prediction {
    const float *class_logits;   /* [Q][2]: forgery, no-object */
    const float *mask_logits;    /* [Q][M][M] */
    float *grad_class_logits;    /* [Q][2]: += d total / d class_logits */
    float *grad_mask_logits;     /* [Q][M][M]: += d total / d mask_logits */
} seg_prediction;

/* What one loss call k computed (k = 0: final prediction, k >= 1: auxiliary k-1,
 * whose upstream names carry the suffix _{k-1}). */
typedef struct seg_loss_call {
    int prediction;              /* decoder prediction index used: L-1 for k = 0, else k-1 */
    int matched_query;           /* query matched to the target; -1 when there is no target */
    double num_masks;            /* get_num_masks: targets, clamped to >= 1 */
    double loss_mask, loss_dice, loss_cross_entropy;            /* raw terms */
    double weighted_mask, weighted_dice, weighted_cross_entropy; /* times their weights */
} seg_loss_call;

/* ---- Numerically stable scalar helpers (double) ---- */

/* log(1 + exp(x)) without overflow; softplus(-x) = -log(sigmoid(x)). */
static double seg_softplus(double x)
{
    return (x > 0.0 ? x : 0.0) + log1p(exp(-fabs(x)));
}

/* 1 / (1 + exp(-x)) without overflow. */
static double seg_sigmoid(double x)
{
    double e = exp(-fabs(x));
    return x >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}

/* ---- grid_sample at points (bilinear, align_corners=False, zero padding) ---- */

/* The four neighbours of one point of a h x w map and their bilinear weights,
 * computed in float with PyTorch's CPU kernel arithmetic (GridSamplerKernel.cpp);
 * idx[c] is -1 for a neighbour outside the map (zero padding). Corner order:
 * north-west, north-east, south-west, south-east. */
typedef struct grid_taps {
    int idx[4];
    float w[4];
} grid_taps;

/* Point (px, py) in [0,1)^2 -> taps on a h x w map (sample_point's 2p-1 then grid_sample). */
static void grid_sample_taps(float px, float py, int h, int w, grid_taps *t)
{
    /* One operation per statement, so no compiler fuses a multiply-add that PyTorch
     * does not: these are the float operations of PyTorch's kernel, in its order. */
    float gx = 2.0f * px, gy = 2.0f * py, x, y, fx, fy, ex, sy;
    int x0, y0, c;
    gx = gx - 1.0f;
    gy = gy - 1.0f;
    x = (gx + 1.0f) * ((float)w / 2.0f);
    x = x - 0.5f;
    y = (gy + 1.0f) * ((float)h / 2.0f);
    y = y - 0.5f;
    x0 = (int)floorf(x);
    y0 = (int)floorf(y);
    fx = x - (float)x0;           /* distance to the west column */
    fy = y - (float)y0;           /* distance to the north row */
    ex = 1.0f - fx;
    sy = 1.0f - fy;
    t->w[0] = sy * ex;
    t->w[1] = sy * fx;
    t->w[2] = fy * ex;
    t->w[3] = fy * fx;
    for (c = 0; c < 4; c++) {
        int xc = x0 + (c & 1), yc = y0 + (c >> 1);
        t->idx[c] = (xc >= 0 && xc < w && yc >= 0 && yc < h) ? yc * w + xc : -1;
    }
}

/* transformers' sample_point (grid_sample) forward: map [h][w], points [n][2] -> out [n],
 * float, summed in PyTorch's order. */
static void sample_point_forward(const float *map, int h, int w, const float *points, int n, float *out)
{
    int i, c;
    for (i = 0; i < n; i++) {
        grid_taps t;
        float v = 0.0f;
        grid_sample_taps(points[2 * i], points[2 * i + 1], h, w, &t);
        for (c = 0; c < 4; c++) {
            float term = t.idx[c] >= 0 ? map[t.idx[c]] * t.w[c] : 0.0f;
            v = v + term;
        }
        out[i] = v;
    }
}

/* sample_point backward: d out [n] -> += d map [h][w] (each point's gradient scattered
 * into its in-bounds neighbours with the bilinear weights). */
static void sample_point_backward(const double *grad_out, int h, int w, const float *points, int n,
                                  double *grad_map)
{
    int i, c;
    for (i = 0; i < n; i++) {
        grid_taps t;
        grid_sample_taps(points[2 * i], points[2 * i + 1], h, w, &t);
        for (c = 0; c < 4; c++)
            if (t.idx[c] >= 0) grad_map[t.idx[c]] += (double)t.w[c] * grad_out[i];
    }
}

/* ---- Matching ---- */

/* transformers' pair_wise_sigmoid_cross_entropy_loss for one (query, target) pair:
 * mean over n points of BCE-with-logits(pred, target). pred, target [n]. */
static double pair_wise_sigmoid_cross_entropy_loss(const float *pred, const float *target, int n)
{
    double sum = 0.0;
    int i;
    for (i = 0; i < n; i++)
        sum += seg_softplus(pred[i]) - target[i] * pred[i];   /* t sp(-x) + (1-t) sp(x), sp(-x) = sp(x) - x */
    return sum / n;
}

/* transformers' pair_wise_dice_loss for one pair: 1 - (2 sum(s t) + 1) / (sum s + sum t + 1),
 * s = sigmoid(pred). pred, target [n]. */
static double pair_wise_dice_loss(const float *pred, const float *target, int n)
{
    double st = 0.0, s = 0.0, t = 0.0;
    int i;
    for (i = 0; i < n; i++) {
        double p = seg_sigmoid(pred[i]);
        st += p * target[i];
        s += p;
        t += target[i];
    }
    return 1.0 - (2.0 * st + 1.0) / (s + t + 1.0);
}

/* LoupeHungarianMatcher.forward for one image with one target: class_logits [Q][2],
 * mask_logits [Q][M][M], target [th][tw], points [P][2] (the matcher's uniform draw);
 * scratch [(1 + max_threads()) P + Q] floats. Returns the matched query. Queries' costs
 * are computed in parallel (each is one sampled map, 3 libm calls a point), then
 * compared in order. The cost matrix is float32 [Q][1] as upstream; scipy's
 * linear_sum_assignment on one column returns the cheapest row, the lowest index among
 * equal costs (it scans columns of the transposed 1 x Q problem from the last to the
 * first and keeps the last minimum it sees). */
static int hungarian_matcher(const seg_loss_config *cfg, int Q, int M, const float *class_logits,
                             const float *mask_logits, const float *target, int th, int tw, const float *points,
                             int P, float *scratch)
{
    float *target_points = scratch, *costs = scratch + (size_t)(1 + max_threads()) * P, best = 0.0f;
    int q, best_q = 0;
    sample_point_forward(target, th, tw, points, P, target_points);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)Q * P * 16))
#endif
    for (q = 0; q < Q; q++) {
        const float *z = class_logits + (size_t)q * SEG_NUM_CLASSES;
        float *pred_points = scratch + (size_t)(1 + thread_id()) * P;
        float mx = z[0] > z[1] ? z[0] : z[1];
        float e0 = expf(z[0] - mx), e1 = expf(z[1] - mx);
        float cost_class = -(e0 / (e0 + e1));            /* -softmax(z)[forgery] */
        float cost_mask, cost_dice, cost;
        sample_point_forward(mask_logits + (size_t)q * M * M, M, M, points, P, pred_points);
        cost_mask = (float)pair_wise_sigmoid_cross_entropy_loss(pred_points, target_points, P);
        cost_dice = (float)pair_wise_dice_loss(pred_points, target_points, P);
        cost = (float)cfg->mask_weight * cost_mask;
        cost = cost + (float)cfg->matcher_cost_class * cost_class;
        cost = cost + (float)cfg->dice_weight * cost_dice;
        if (cost != cost) cost = 0.0f;                   /* nan_to_num(..., 0) */
        if (cost > SEG_MATCHER_COST_LIMIT) cost = SEG_MATCHER_COST_LIMIT;
        if (cost < -SEG_MATCHER_COST_LIMIT) cost = -SEG_MATCHER_COST_LIMIT;
        costs[q] = cost;
    }
    for (q = 0; q < Q; q++)
        if (q == 0 || costs[q] < best) {
            best = costs[q];
            best_q = q;
        }
    return best_q;
}

/* ---- Point selection ---- */

/* A candidate point and its uncertainty, for sorting. */
typedef struct uncertain_point {
    float uncertainty;
    int index;
} uncertain_point;

/* Most uncertain first; equal uncertainties in candidate order. */
static int uncertain_point_cmp(const void *a, const void *b)
{
    const uncertain_point *x = (const uncertain_point *)a, *y = (const uncertain_point *)b;
    if (x->uncertainty != y->uncertainty) return x->uncertainty > y->uncertainty ? -1 : 1;
    return (x->index > y->index) - (x->index < y->index);
}

/* Moves the k most uncertain of n candidates (uncertain_point_cmp's order: largest
 * uncertainty, then the earlier candidate) to order[0..k-1], in that order: a
 * deterministic quickselect (median-of-three pivots) partitions, then the k are sorted.
 * The same set as sorting all n, at a fraction of the cost. */
static void uncertain_select(uncertain_point *order, int n, int k)
{
    int lo = 0, hi = n - 1;
    if (k <= 0) return;
    if (k < n)
        while (hi > lo) {
            int mid = lo + (hi - lo) / 2, i = lo, j = hi;
            uncertain_point a = order[lo], b = order[mid], c = order[hi], pivot, tmp;
            /* the median of the three */
            if (uncertain_point_cmp(&a, &b) > 0) { tmp = a; a = b; b = tmp; }
            if (uncertain_point_cmp(&b, &c) > 0) { tmp = b; b = c; c = tmp; }
            if (uncertain_point_cmp(&a, &b) > 0) { tmp = a; a = b; b = tmp; }
            pivot = b;
            while (i <= j) {
                while (uncertain_point_cmp(&order[i], &pivot) < 0) i++;
                while (uncertain_point_cmp(&order[j], &pivot) > 0) j--;
                if (i <= j) { tmp = order[i]; order[i] = order[j]; order[j] = tmp; i++; j--; }
            }
            if (k - 1 <= j) hi = j;
            else if (k - 1 >= i) lo = i;
            else break;
        }
    qsort(order, (size_t)k, sizeof *order, uncertain_point_cmp);
}

/* Mask2FormerLoss.sample_points_using_uncertainty for one mask [M][M]: draws int(P *
 * oversample_ratio) candidates, keeps the int(importance_sample_ratio * P) with the
 * largest calculate_uncertainty = -|logit| (torch.topk; ties, which topk leaves
 * unspecified, go to the earlier candidate), then draws the remaining points uniformly.
 * The candidates are read from rng at position cand_pos, the uniform points at extra_pos.
 * points_out [P][2]; candidates [int(P * oversample_ratio)][2] floats, order [same count]. */
static void sample_points_using_uncertainty(const seg_loss_config *cfg, const float *mask_logits, int M,
                                            const loss_rng *rng, uint64_t cand_pos, uint64_t extra_pos,
                                            float *points_out, float *candidates, float *candidate_logits,
                                            uncertain_point *order)
{
    int P = cfg->train_num_points;
    int num_sampled = (int)(P * cfg->oversample_ratio);
    int num_uncertain = (int)(cfg->importance_sample_ratio * P);
    int i;
    rng->seek(rng->state, cand_pos);
    rng->fill(rng->state, candidates, (size_t)num_sampled * 2);
    sample_point_forward(mask_logits, M, M, candidates, num_sampled, candidate_logits);
    for (i = 0; i < num_sampled; i++) {
        order[i].uncertainty = -fabsf(candidate_logits[i]);
        order[i].index = i;
    }
    uncertain_select(order, num_sampled, num_uncertain);
    for (i = 0; i < num_uncertain; i++) {
        points_out[2 * i] = candidates[2 * order[i].index];
        points_out[2 * i + 1] = candidates[2 * order[i].index + 1];
    }
    rng->seek(rng->state, extra_pos);
    if (P > num_uncertain)
        rng->fill(rng->state, points_out + (size_t)num_uncertain * 2, (size_t)(P - num_uncertain) * 2);
}

/* ---- Mask losses ---- */

/* Poly1FocalLoss (soft labels) forward, reduction mean: logits x [n], labels t [n].
 *   ce = (alpha t + (1-alpha)(1-t)) * BCE-with-logits(x, t),  1 - pt = t (1-s) + (1-t) s,
 *   loss = ce (1-pt)^gamma + epsilon (1-pt)^(gamma+1), s = sigmoid(x). */
static double poly1_focal_loss_forward(const seg_loss_config *cfg, const float *x, const float *t, int n)
{
    double alpha = cfg->pixel_forge_weight, gamma = cfg->focal_gamma, eps = cfg->pixel_poly_epsilon;
    double sum = 0.0;
    int i;
    for (i = 0; i < n; i++) {
        double ti = t[i];
        double bce = seg_softplus(x[i]) - ti * x[i];
        double ce = (alpha * ti + (1.0 - alpha) * (1.0 - ti)) * bce;
        double s = seg_sigmoid(x[i]);
        double u = ti * (1.0 - s) + (1.0 - ti) * s;   /* 1 - pt */
        double ug = gamma == 2.0 ? u * u : pow(u, gamma);
        sum += ce * ug + eps * ug * u;
    }
    return sum / n;
}

/* Poly1FocalLoss backward: grad_x [n] += scale * d(mean loss)/dx. With
 * d bce/dx = s - t and d(1-pt)/dx = (1 - 2t) s (1-s). */
static void poly1_focal_loss_backward(const seg_loss_config *cfg, const float *x, const float *t, int n,
                                      double scale, double *grad_x)
{
    double alpha = cfg->pixel_forge_weight, gamma = cfg->focal_gamma, eps = cfg->pixel_poly_epsilon;
    int i;
    for (i = 0; i < n; i++) {
        double ti = t[i], s = seg_sigmoid(x[i]), sm = 1.0 - s;
        double wgt = alpha * ti + (1.0 - alpha) * (1.0 - ti);
        double bce = seg_softplus(x[i]) - ti * x[i];
        double u = ti * sm + (1.0 - ti) * s;
        double du = (1.0 - 2.0 * ti) * s * sm;
        double ug1 = gamma == 2.0 ? u : pow(u, gamma - 1.0), ug = ug1 * u;
        double d = wgt * (s - ti) * ug + (wgt * bce * gamma * ug1 + eps * (gamma + 1.0) * ug) * du;
        grad_x[i] += scale * d / n;
    }
}

/* Sums of TverskyLoss for one mask: TP, FP, FN of s = sigmoid(x) against t. */
static void tversky_sums(const float *x, const float *t, int n, double *tp, double *fp, double *fn)
{
    int i;
    *tp = *fp = *fn = 0.0;
    for (i = 0; i < n; i++) {
        double s = seg_sigmoid(x[i]);
        *tp += s * t[i];
        *fp += s * (1.0 - t[i]);
        *fn += seg_sigmoid(-x[i]) * t[i];
    }
}

/* TverskyLoss forward for one mask: 1 - (TP + 1e-6) / (TP + alpha FP + beta FN + 1e-6). */
static double tversky_loss_forward(const seg_loss_config *cfg, const float *x, const float *t, int n)
{
    double tp, fp, fn;
    tversky_sums(x, t, n, &tp, &fp, &fn);
    return 1.0 - (tp + SEG_TVERSKY_SMOOTH) /
                 (tp + cfg->tversky_alpha * fp + cfg->tversky_beta * fn + SEG_TVERSKY_SMOOTH);
}

/* TverskyLoss backward for one mask: grad_x [n] += scale * d loss / dx. With N, D the
 * numerator and denominator, dN/ds_i = t_i and dD/ds_i = t_i + alpha (1-t_i) - beta t_i. */
static void tversky_loss_backward(const seg_loss_config *cfg, const float *x, const float *t, int n,
                                  double scale, double *grad_x)
{
    double tp, fp, fn, num, den;
    int i;
    tversky_sums(x, t, n, &tp, &fp, &fn);
    num = tp + SEG_TVERSKY_SMOOTH;
    den = tp + cfg->tversky_alpha * fp + cfg->tversky_beta * fn + SEG_TVERSKY_SMOOTH;
    for (i = 0; i < n; i++) {
        double ti = t[i];
        double dden = ti + cfg->tversky_alpha * (1.0 - ti) - cfg->tversky_beta * ti;
        double dratio = (ti * den - num * dden) / (den * den);
        grad_x[i] += -scale * dratio * seg_sigmoid(x[i]) * seg_sigmoid(-x[i]);
    }
}

/* Scratch for loss_masks: point logits, labels and the logits' gradient [P] each, and
 * the gradient of the matched mask [M][M]. */
typedef struct loss_masks_scratch {
    float *point_logits, *point_labels;
    double *grad_points, *grad_mask;
} loss_masks_scratch;

/* LoupeSegLoss.loss_masks forward for one matched mask (num_masks as get_num_masks):
 * mask_logits [M][M] of the matched query, target [th][tw], points [P][2] ->
 * loss_mask = mean Poly-1 focal / num_masks, loss_dice = Tversky of this mask (the
 * caller averages over the batch's masks). */
static void loss_masks_forward(const seg_loss_config *cfg, const float *mask_logits, int M, const float *target,
                               int th, int tw, const float *points, double num_masks, loss_masks_scratch *s,
                               double *loss_mask, double *loss_dice)
{
    int P = cfg->train_num_points;
    sample_point_forward(target, th, tw, points, P, s->point_labels);
    sample_point_forward(mask_logits, M, M, points, P, s->point_logits);
    *loss_mask = poly1_focal_loss_forward(cfg, s->point_logits, s->point_labels, P) / num_masks;
    *loss_dice = tversky_loss_forward(cfg, s->point_logits, s->point_labels, P);
}

/* loss_masks backward (after loss_masks_forward on the same points): grad_mask_logits
 * [M][M] += w_mask * d loss_mask/dlogits + w_dice * d loss_dice/dlogits. */
static void loss_masks_backward(const seg_loss_config *cfg, int M, const float *points, double num_masks,
                                double w_mask, double w_dice, loss_masks_scratch *s, float *grad_mask_logits)
{
    int P = cfg->train_num_points, i;
    memset(s->grad_points, 0, (size_t)P * sizeof *s->grad_points);
    memset(s->grad_mask, 0, (size_t)M * M * sizeof *s->grad_mask);
    poly1_focal_loss_backward(cfg, s->point_logits, s->point_labels, P, w_mask / num_masks, s->grad_points);
    tversky_loss_backward(cfg, s->point_logits, s->point_labels, P, w_dice, s->grad_points);
    sample_point_backward(s->grad_points, M, M, points, P, s->grad_mask);
    for (i = 0; i < M * M; i++) grad_mask_logits[i] += (float)s->grad_mask[i];
}

/* ---- Class loss ---- */

/* Target class of query q: forgery for the matched query, no-object for the others. */
static int loss_labels_target(int q, int matched_query)
{
    return q == matched_query ? SEG_FORGERY_CLASS : SEG_NO_OBJECT_CLASS;
}

/* Class weight of a target class: 1 for forgery, no_object_weight for no-object. */
static double loss_labels_class_weight(const seg_loss_config *cfg, int cls)
{
    return cls == SEG_NO_OBJECT_CLASS ? cfg->no_object_weight : 1.0;
}

/* The denominator of loss_labels' weighted mean over a whole batch: the class weights
 * of all B*Q queries, `targets` of them matched (forgery, weight 1), the rest no-object. */
static double loss_labels_weight_sum(const seg_loss_config *cfg, int images, int Q, int targets)
{
    return (double)targets + ((double)images * Q - targets) * cfg->no_object_weight;
}

/* Mask2FormerLoss.loss_labels forward, one image's share: class_logits [Q][2],
 * matched_query (-1: none), den = loss_labels_weight_sum of the batch ->
 * sum_q w_q (-log softmax(z_q)[c_q]) / den (the batch's term is the sum of its images'). */
static double loss_labels_forward(const seg_loss_config *cfg, const float *class_logits, int Q, int matched_query,
                                  double den)
{
    double num = 0.0;
    int q;
    for (q = 0; q < Q; q++) {
        const float *z = class_logits + (size_t)q * SEG_NUM_CLASSES;
        int c = loss_labels_target(q, matched_query);
        /* -log softmax(z)[c] = softplus(z[other] - z[c]) for two classes */
        num += loss_labels_class_weight(cfg, c) * seg_softplus((double)z[1 - c] - z[c]);
    }
    return num / den;
}

/* loss_labels backward: grad [Q][2] += scale * w_q / den * (softmax(z_q) - onehot(c_q)). */
static void loss_labels_backward(const seg_loss_config *cfg, const float *class_logits, int Q, int matched_query,
                                 double den, double scale, float *grad_class_logits)
{
    int q, j;
    for (q = 0; q < Q; q++) {
        const float *z = class_logits + (size_t)q * SEG_NUM_CLASSES;
        int c = loss_labels_target(q, matched_query);
        double w = scale * loss_labels_class_weight(cfg, c) / den;
        for (j = 0; j < SEG_NUM_CLASSES; j++) {
            double prob = seg_sigmoid((double)z[j] - z[1 - j]);   /* softmax(z)[j] */
            grad_class_logits[(size_t)q * SEG_NUM_CLASSES + j] += (float)(w * (prob - (j == c)));
        }
    }
}

/* ---- The whole loss ---- */

/* Ascending ints, for qsort. */
static int int_cmp(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Mask2FormerLoss.get_num_masks: number of targets, clamped to >= 1 (one process). */
static double get_num_masks(int num_targets)
{
    return num_targets > 1 ? (double)num_targets : 1.0;
}

/* Scratch of loupe_seg_loss (planned in the trainer's arena): the matcher's points [2P]
 * and its scratch (hungarian_matcher), the selected points [P][2], the oversampled
 * candidates [3P][2], their logits [3P] and sort order [3P], and loss_masks' buffers.
 * topk, when a test sets it, receives each call's importance-sampled candidate indices,
 * ascending ([L][0.75 P]). */
typedef struct seg_loss_scratch {
    float *matcher_points, *matcher_scratch, *points, *candidates, *candidate_logits;
    uncertain_point *order;
    loss_masks_scratch masks;
    int *topk;
} seg_loss_scratch;

/* Where one image sits in its batch. The loss is a batch's (upstream collates B images):
 * num_masks, the Tversky mean and the cross-entropy's weighted mean run over all the
 * batch's targets and queries, and the random draws come in the batch's order. Images
 * have 0 or 1 target (one forgery class), so everything is known before any forward and
 * the images can be processed one at a time, each adding its share. */
typedef struct seg_batch {
    int images;                  /* B */
    int targets;                 /* targets in the whole batch */
    int image;                   /* this image's index b */
    int targets_before;          /* targets of images 0..b-1 (this image's mask index) */
    uint64_t base;               /* stream position of the batch's first random number */
} seg_batch;

/* Random numbers one loss call draws for a whole batch: per image the matcher's points
 * [P][2], then candidates [n][3P][2] and extra points [n][P - 0.75 P][2] for the n
 * targets of the batch (upstream's torch.rand calls, in order). */
static uint64_t seg_call_draws(const seg_loss_config *cfg, int images, int targets)
{
    uint64_t P = (uint64_t)cfg->train_num_points;
    uint64_t cand = (uint64_t)(int)(cfg->train_num_points * cfg->oversample_ratio);
    uint64_t extra = P - (uint64_t)(int)(cfg->importance_sample_ratio * cfg->train_num_points);
    return (uint64_t)images * 2 * P + (uint64_t)targets * 2 * (cand + extra);
}

/* Random numbers of one training step of a batch: the decoder's L-1 layerdrop draws
 * (unused: layerdrop 0), then L loss calls. */
static uint64_t seg_batch_draws(const seg_loss_config *cfg, int L, int images, int targets)
{
    return (uint64_t)(L - 1) + (uint64_t)L * seg_call_draws(cfg, images, targets);
}

/* LoupeSegLoss.forward (with its auxiliary calls) followed by LoupeSegmentor.get_loss,
 * one image's share, and the gradient of `scale` times it. preds [L] in decoder order
 * (prediction i has class logits [Q][2], mask logits [Q][M][M]); target [th][tw] (read
 * when has_target): the image's forgery mask (training: mask_labels, S x S; test-time
 * adaptation: sigmoid(patch logits), g x g). Adds this image's share of each term to
 * calls [L] (in loss-call order; the caller zeroes them per batch, matched_query -1),
 * sets their matched_query to this image's when it has a target, adds the weighted share to *total, and accumulates the
 * gradients into the preds' grad buffers. Reads the random numbers of rng at the batch's
 * positions (seg_batch). */
static void loupe_seg_loss(const seg_loss_config *cfg, int L, int Q, int M, const seg_prediction *preds,
                           int has_target, const float *target, int th, int tw, const seg_batch *bt, double scale,
                           const loss_rng *rng, seg_loss_scratch *s, seg_loss_call *calls, double *total)
{
    int P = cfg->train_num_points;
    int cand = (int)(P * cfg->oversample_ratio), uncertain = (int)(cfg->importance_sample_ratio * P);
    double num_masks = get_num_masks(bt->targets);
    double ce_den = loss_labels_weight_sum(cfg, bt->images, Q, bt->targets);
    uint64_t per_call = seg_call_draws(cfg, bt->images, bt->targets);
    int k, i;

    for (k = 0; k < L; k++) {
        seg_loss_call *c = &calls[k];
        const seg_prediction *pr = &preds[k == 0 ? L - 1 : k - 1];
        uint64_t start = bt->base + (uint64_t)(L - 1) + (uint64_t)k * per_call;
        double loss_mask = 0.0, loss_dice = 0.0, ce;
        int matched = -1;
        c->prediction = k == 0 ? L - 1 : k - 1;
        c->num_masks = num_masks;
        if (has_target) {
            const float *mask;
            uint64_t after = start + (uint64_t)bt->images * 2 * P;
            rng->seek(rng->state, start + (uint64_t)bt->image * 2 * P);
            rng->fill(rng->state, s->matcher_points, (size_t)P * 2);
            matched = c->matched_query = hungarian_matcher(cfg, Q, M, pr->class_logits, pr->mask_logits, target, th,
                                                           tw, s->matcher_points, P, s->matcher_scratch);
            mask = pr->mask_logits + (size_t)matched * M * M;
            /* this mask's rows of the batch's candidate and extra-point draws */
            sample_points_using_uncertainty(cfg, mask, M, rng, after + (uint64_t)bt->targets_before * 2 * cand,
                                            after + (uint64_t)bt->targets * 2 * cand +
                                                (uint64_t)bt->targets_before * 2 * (P - uncertain),
                                            s->points, s->candidates, s->candidate_logits, s->order);
            if (s->topk) {
                int *dst = s->topk + (size_t)k * uncertain;
                for (i = 0; i < uncertain; i++) dst[i] = s->order[i].index;
                qsort(dst, (size_t)uncertain, sizeof *dst, int_cmp);
            }
            loss_masks_forward(cfg, mask, M, target, th, tw, s->points, num_masks, &s->masks, &loss_mask, &loss_dice);
            loss_dice /= bt->targets;   /* Tversky: mean over the batch's masks */
            loss_masks_backward(cfg, M, s->points, num_masks, scale * cfg->mask_weight,
                                scale * cfg->dice_weight / bt->targets, &s->masks,
                                pr->grad_mask_logits + (size_t)matched * M * M);
        }
        ce = loss_labels_forward(cfg, pr->class_logits, Q, matched, ce_den);
        loss_labels_backward(cfg, pr->class_logits, Q, matched, ce_den, scale * cfg->class_weight,
                             pr->grad_class_logits);
        c->loss_mask += loss_mask;
        c->loss_dice += loss_dice;
        c->loss_cross_entropy += ce;
        c->weighted_mask += cfg->mask_weight * loss_mask;
        c->weighted_dice += cfg->dice_weight * loss_dice;
        c->weighted_cross_entropy += cfg->class_weight * ce;
        *total += cfg->mask_weight * loss_mask + cfg->dice_weight * loss_dice + cfg->class_weight * ce;
    }
}

/* ---- Trainable parameters: every segmentor.* tensor, copied out of the read-only model ---- */

/* Layout of a trainable tensor inside loupe_tta: the one the forward reads. */
enum {
    PARAM_PLAIN,     /* as upstream */
    PARAM_DEPTHWISE, /* depthwise conv [c][1][3][3] kept tap-major [9][c] */
    PARAM_CONV3X3    /* 3x3 conv [co][ci][3][3] kept tap-major [9][co][ci] */
};

#define TRAIN_NAME_LEN 128
#define TTA_SEGMENTOR_PREFIX "segmentor."
#define TTA_CLIP_EPS 1e-6           /* clip_grad_norm_ divides by norm + 1e-6 */
#define TTA_MAX_WEIGHT 1e6f         /* largest gradient weight loupe_tta_accumulate accepts */

/* One trainable tensor. */
typedef struct train_param {
    char name[TRAIN_NAME_LEN];   /* upstream state-dict key without "loupe." */
    int dims[MAX_TENSOR_DIMS];   /* upstream shape, trailing zeros */
    int layout;
    size_t offset, numel;        /* position in the trainer's param, grad, adam_m, adam_v */
    double lr, weight_decay;     /* its parameter group's (LitModel.configure_optimizers): the
                                    backbone's learning rate for names with "backbone", no
                                    weight decay for names with "bias" */
} train_param;

/* Converts a tensor from upstream layout to the layout the forward reads. */
static void param_from_upstream(const train_param *p, const float *src, float *dst)
{
    switch (p->layout) {
    case PARAM_DEPTHWISE: repack_depthwise(dst, src, p->dims[0]); break;
    case PARAM_CONV3X3: repack_conv3x3(dst, src, p->dims[0], p->dims[1]); break;
    default: memcpy(dst, src, p->numel * sizeof *dst);
    }
}

/* Converts a tensor (or its gradient) back to upstream layout. */
static void param_to_upstream(const train_param *p, const float *src, float *dst)
{
    int a = p->dims[0], b = p->dims[1], i, j, t;
    switch (p->layout) {
    case PARAM_DEPTHWISE: /* [9][c=a] -> [c][1][3][3] */
        for (t = 0; t < 9; t++)
            for (i = 0; i < a; i++) dst[(size_t)i * 9 + t] = src[(size_t)t * a + i];
        break;
    case PARAM_CONV3X3: /* [9][co=a][ci=b] -> [co][ci][3][3] */
        for (t = 0; t < 9; t++)
            for (i = 0; i < a; i++)
                for (j = 0; j < b; j++) dst[((size_t)i * b + j) * 9 + t] = src[((size_t)t * a + i) * b + j];
        break;
    default: memcpy(dst, src, p->numel * sizeof *dst);
    }
}

/* Collects the trainable tensors: counts them (params NULL) or records and copies them. */
typedef struct param_builder {
    train_param *params;         /* NULL while counting */
    float *data;                 /* the trained values, when recording */
    binder b;                    /* finds each tensor in the weight file by name and shape */
    const loupe_train_options *opt; /* learning rates and weight decay of the groups */
    int count;
    size_t floats;
} param_builder;

/* Registers one trainable tensor of upstream shape d0..d3 (trailing zeros) called fmt... and
 * points *view at its adapted copy. */
static void add_param(param_builder *pb, const float **view, int layout, int d0, int d1, int d2, int d3,
                      const char *fmt, ...)
{
    char name[TRAIN_NAME_LEN];
    size_t numel = (size_t)d0 * (d1 ? d1 : 1) * (d2 ? d2 : 1) * (d3 ? d3 : 1);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    if (pb->params) {
        train_param *p = &pb->params[pb->count];
        const int dims[MAX_TENSOR_DIMS] = {d0, d1, d2, d3};
        const tensor_entry *e = bind_entry(&pb->b, dims, name);
        const float *src = NULL;
        float *copy = NULL;
        /* a BF16 or Q8 weight matrix is converted: the adapter trains float32 copies */
        if (e && !(src = wmat_values(entry_matrix(pb->b.m, e), e->dims[0], numel / e->dims[0], &copy))) {
            pb->b.failed = 1;
            fail(pb->b.err, pb->b.errsize, "out of memory");
        }
        memcpy(p->name, name, sizeof name);
        p->dims[0] = d0; p->dims[1] = d1; p->dims[2] = d2; p->dims[3] = d3;
        p->layout = layout;
        p->offset = pb->floats;
        p->numel = numel;
        p->lr = strstr(name, "backbone") ? pb->opt->backbone_lr : pb->opt->lr;
        p->weight_decay = strstr(name, "bias") ? 0.0 : pb->opt->weight_decay;
        if (src) param_from_upstream(p, src, pb->data + p->offset);
        free(copy);
        *view = pb->data + p->offset;
    }
    pb->count++;
    pb->floats += numel;
}

/* A linear layer's weight [out][in] and optional bias, or a norm's weight and bias. */
static void add_linear(param_builder *pb, linear_w *l, int out, int in, int conv1x1, const char *prefix)
{
    const float *w = NULL;
    add_param(pb, &w, PARAM_PLAIN, out, in, conv1x1, conv1x1, "%s.weight", prefix);
    if (pb->params) l->w = wmat_f32(w, (size_t)in);
    if (l->b) add_param(pb, &l->b, PARAM_PLAIN, out, 0, 0, 0, "%s.bias", prefix);
}
static void add_norm(param_builder *pb, norm_w *n, int dim, const char *prefix)
{
    add_param(pb, &n->w, PARAM_PLAIN, dim, 0, 0, 0, "%s.weight", prefix);
    add_param(pb, &n->b, PARAM_PLAIN, dim, 0, 0, 0, "%s.bias", prefix);
}
static void add_mha(param_builder *pb, linear_w *qkv, linear_w *out, int e, const char *prefix)
{
    char name[TRAIN_NAME_LEN + 16];
    const float *w = NULL;
    add_param(pb, &w, PARAM_PLAIN, 3 * e, e, 0, 0, "%s.in_proj_weight", prefix);
    if (pb->params) qkv->w = wmat_f32(w, (size_t)e);
    add_param(pb, &qkv->b, PARAM_PLAIN, 3 * e, 0, 0, 0, "%s.in_proj_bias", prefix);
    snprintf(name, sizeof name, "%s.out_proj", prefix);
    add_linear(pb, out, e, e, 0, name);
}

/* Walks the backbone's tensors in upstream's state-dict order: only the class and
 * position embeddings when not full (upstream trains those two even in a frozen
 * backbone), else all; w->blocks must be the trainer's own copy of the views. */
static void backbone_params(param_builder *pb, loupe_weights *w, const loupe_config *c, int full)
{
    int W = c->width, g = c->grid, P = c->patch_size, i;
    char p[TRAIN_NAME_LEN];
    add_param(pb, &w->class_embedding, PARAM_PLAIN, W, 0, 0, 0, "backbone.class_embedding");
    add_param(pb, &w->positional_embedding, PARAM_PLAIN, 1 + g * g, W, 0, 0, "backbone.positional_embedding");
    if (!full) return;
    {
        const float *conv1 = NULL;
        add_param(pb, &conv1, PARAM_PLAIN, W, 3, P, P, "backbone.conv1.weight");
        if (pb->params) w->conv1 = wmat_f32(conv1, (size_t)3 * P * P);
    }
    add_norm(pb, &w->ln_pre, W, "backbone.ln_pre");
    add_norm(pb, &w->ln_post, W, "backbone.ln_post");
    for (i = 0; i < c->layers; i++) {
        pe_block_w *bl = &w->blocks[i];
#define BLK(s) (snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.%s", i, s), p)
        add_mha(pb, &bl->qkv, &bl->out, W, BLK("attn"));
        add_norm(pb, &bl->ln_1, W, BLK("ln_1"));
        add_norm(pb, &bl->ln_2, W, BLK("ln_2"));
        add_linear(pb, &bl->fc, c->mlp_width, W, 0, BLK("mlp.c_fc"));
        add_linear(pb, &bl->proj, W, c->mlp_width, 0, BLK("mlp.c_proj"));
#undef BLK
    }
    add_param(pb, &w->pool.probe, PARAM_PLAIN, 1, 1, W, 0, "backbone.attn_pool.probe");
    add_mha(pb, &w->pool.qkv, &w->pool.out, W, "backbone.attn_pool.attn");
    add_norm(pb, &w->pool.ln, W, "backbone.attn_pool.layernorm");
    add_linear(pb, &w->pool.fc, c->pool_mlp_width, W, 0, "backbone.attn_pool.mlp.c_fc");
    add_linear(pb, &w->pool.proj, W, c->pool_mlp_width, 0, "backbone.attn_pool.mlp.c_proj");
}

/* Walks the classifier's tensors (LoupeClassifier: two MLP heads and the fuser). */
static void classifier_params(param_builder *pb, loupe_weights *w, const loupe_config *c)
{
    int k, i;
    char p[TRAIN_NAME_LEN];
    for (k = 0; k < 2; k++) {
        cls_head_w *h = k ? &w->patch_head : &w->global_head;
        for (i = 0; i < c->cls_layers; i++) {
            int in = i == 0 ? c->width : c->cls_hidden, out = i == c->cls_layers - 1 ? 1 : c->cls_hidden;
            snprintf(p, sizeof p, "classifier.%s.layers.%d", k ? "patch_classifier" : "classifier", i);
            add_linear(pb, &h->layers[i], out, in, 0, p);
        }
    }
    add_param(pb, &w->fuser, PARAM_PLAIN, 1, 1 + c->grid * c->grid, 0, 0, "classifier.fuser.fuse.weight");
}

/* Walks every segmentor tensor of w in upstream's state-dict order. */
static void segmentor_params(param_builder *pb, loupe_weights *w, const loupe_config *c)
{
    static const char *const fpn_names[4] = {"0.0", "0.1", "1.0", "3.0"};
    scale_block_w *blocks[4];
    int W = c->width, F = c->feature_size, n_off = c->m2f_heads * c->deform_levels * c->deform_points, i, k;
    char p[TRAIN_NAME_LEN];
    blocks[0] = &w->fpn4[0]; blocks[1] = &w->fpn4[1]; blocks[2] = &w->fpn2; blocks[3] = &w->fpn_half;
    for (k = 0; k < 4; k++) {
        scale_block_w *b = blocks[k];
        const char *s = fpn_names[k];
        if (b->conv1.w.data) {
            const float *convt = NULL;
            add_param(pb, &convt, PARAM_PLAIN, W, W, 2, 2, "segmentor.fpn.scale_layers.%s.conv1.weight", s);
            if (pb->params) b->conv1.w = wmat_f32(convt, (size_t)CONVT_TAPS * W);
            add_param(pb, &b->conv1.b, PARAM_PLAIN, W, 0, 0, 0, "segmentor.fpn.scale_layers.%s.conv1.bias", s);
        }
        add_param(pb, &b->dw, PARAM_DEPTHWISE, W, 1, 3, 3, "segmentor.fpn.scale_layers.%s.conv2.weight", s);
        snprintf(p, sizeof p, "segmentor.fpn.scale_layers.%s.norm", s);
        add_norm(pb, &b->norm, W, p);
    }
    add_param(pb, &w->label_embedding[0], PARAM_PLAIN, F, 0, 0, 0, "segmentor.label_embedding.0");
    add_param(pb, &w->label_embedding[1], PARAM_PLAIN, F, 0, 0, 0, "segmentor.label_embedding.1");
    add_param(pb, &w->level_embed, PARAM_PLAIN, 3, F, 0, 0, "segmentor.pixel_decoder.level_embed");
    for (i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "segmentor.pixel_decoder.input_projections.%d.0", i); add_linear(pb, &w->input_proj[i], F, W, 1, p);
        snprintf(p, sizeof p, "segmentor.pixel_decoder.input_projections.%d.1", i); add_norm(pb, &w->input_gn[i], F, p);
    }
    for (i = 0; i < c->enc_layers; i++) {
        enc_layer_w *e = &w->enc[i];
#define ENC(s) (snprintf(p, sizeof p, "segmentor.pixel_decoder.encoder.layers.%d.%s", i, s), p)
        add_linear(pb, &e->offsets, n_off * 2, F, 0, ENC("self_attn.sampling_offsets"));
        add_linear(pb, &e->attn_weights, n_off, F, 0, ENC("self_attn.attention_weights"));
        add_linear(pb, &e->value, F, F, 0, ENC("self_attn.value_proj"));
        add_linear(pb, &e->output, F, F, 0, ENC("self_attn.output_proj"));
        add_norm(pb, &e->ln_self, F, ENC("self_attn_layer_norm"));
        add_linear(pb, &e->fc1, c->enc_ffn, F, 0, ENC("fc1"));
        add_linear(pb, &e->fc2, F, c->enc_ffn, 0, ENC("fc2"));
        add_norm(pb, &e->ln_final, F, ENC("final_layer_norm"));
        add_mha(pb, &e->cross_qkv, &e->cross_out, F, ENC("cross_attn"));
        add_norm(pb, &e->ln_cross, F, ENC("cross_attn_layer_norm"));
#undef ENC
    }
    add_linear(pb, &w->mask_projection, F, F, 1, "segmentor.pixel_decoder.mask_projection");
    add_linear(pb, &w->adapter_1, F, W, 1, "segmentor.pixel_decoder.adapter_1.0");
    add_norm(pb, &w->adapter_gn, F, "segmentor.pixel_decoder.adapter_1.1");
    add_param(pb, &w->layer_1, PARAM_CONV3X3, F, F, 3, 3, "segmentor.pixel_decoder.layer_1.0.weight");
    add_norm(pb, &w->layer_1_gn, F, "segmentor.pixel_decoder.layer_1.1");
    add_param(pb, &w->query_embed, PARAM_PLAIN, c->num_queries, F, 0, 0, "segmentor.mask2former_decoder.queries_embedder.weight");
    add_param(pb, &w->query_feat, PARAM_PLAIN, c->num_queries, F, 0, 0, "segmentor.mask2former_decoder.queries_features.weight");
    for (i = 0; i < c->dec_layers - 1; i++) {
        dec_layer_w *d = &w->dec[i];
#define DEC(s) (snprintf(p, sizeof p, "segmentor.mask2former_decoder.decoder.layers.%d.%s", i, s), p)
        add_linear(pb, &d->k, F, F, 0, DEC("self_attn.k_proj"));
        add_linear(pb, &d->v, F, F, 0, DEC("self_attn.v_proj"));
        add_linear(pb, &d->q, F, F, 0, DEC("self_attn.q_proj"));
        add_linear(pb, &d->o, F, F, 0, DEC("self_attn.out_proj"));
        add_norm(pb, &d->ln_self, F, DEC("self_attn_layer_norm"));
        add_mha(pb, &d->cross_qkv, &d->cross_out, F, DEC("cross_attn"));
        add_norm(pb, &d->ln_cross, F, DEC("cross_attn_layer_norm"));
        add_linear(pb, &d->fc1, c->dec_ffn, F, 0, DEC("fc1"));
        add_linear(pb, &d->fc2, F, c->dec_ffn, 0, DEC("fc2"));
        add_norm(pb, &d->ln_final, F, DEC("final_layer_norm"));
#undef DEC
    }
    add_norm(pb, &w->dec_ln, F, "segmentor.mask2former_decoder.decoder.layernorm");
    for (i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "segmentor.mask2former_decoder.decoder.mask_predictor.mask_embedder.%d.0", i);
        add_linear(pb, &w->mask_embed[i], F, F, 0, p);
    }
    add_param(pb, &w->dec_level_embed, PARAM_PLAIN, 3, F, 0, 0, "segmentor.mask2former_decoder.level_embed.weight");
    add_linear(pb, &w->class_predictor, c->num_labels + 1, F, 0, "segmentor.class_predictor");
}

/* ---- The adapter: adapted weights, AdamW state, saved activations, backward scratch ---- */

struct loupe_trainer {
    const loupe_model *m;
    loupe_session *s;                 /* runs the forward with w, t and tape */
    loupe_weights w;                  /* the model's views, the trained ones pointing into param */
    loupe_tables t;                   /* the model's tables; enc_pos from the trained level embedding */
    enc_layer_w *enc;                 /* w.enc, w.dec, w.blocks: the trainer's copies of the layer views */
    dec_layer_w *dec;
    pe_block_w *blocks;
    loupe_train_options opt;
    int has_cls, has_seg;             /* the stage's modules (and losses) */
    int pseudo;                       /* test-time adaptation: pseudo labels from the classifier */
    int backbone_backward;            /* some backbone tensor trains: gradients flow into the backbone */
    pe_tape bb_tape;                  /* the backbone's and the classifier's saved activations, */
    cls_tape cls_tape;                /* their backward scratch and gradient views (sections 4, 5) */
    pe_work pw;
    pe_grads pg;
    cls_grads cg;
    pe_block_g *block_grads;          /* [layers] when the whole backbone trains */
    cls_loss_config cls_cfg;
    train_param *params;
    int n_params;
    size_t n_floats;
    float *param, *grad, *adam_m, *adam_v; /* [n_floats] each */
    long steps;                       /* optimizer steps taken */
    seg_tape tape;
    seg_work wk;
    seg_loss_scratch loss_scratch;   /* the loss's point sampling and matching */
    seg_grads sg;                     /* what the segmentor's backward reads and writes (section 6) */
    seg_loss_config loss_cfg;
    seg_loss_call *calls;             /* [L] */
    seg_prediction *preds;            /* [L] */
    splitmix_uniform rng_state;
    loss_rng rng;                     /* the loss's random points (tests replay upstream's) */
    uint64_t rng_position;            /* where the next batch's draws start in rng's stream */
    void *raw;
    size_t tape_bytes, work_bytes, state_bytes;
};

/* Assigns (or, while measuring, counts) the saved activations. */
static void seg_tape_layout(loupe_trainer *t, arena *a)
{
    const loupe_config *c = &t->m->cfg;
    size_t g = (size_t)c->grid, W = (size_t)c->width, F = (size_t)c->feature_size, Q = (size_t)c->num_queries;
    size_t Te = (size_t)t->m->t.tokens, M2 = 16 * g * g, L = (size_t)c->dec_layers;
    size_t noff = (size_t)c->m2f_heads * 3 * (size_t)c->deform_points;
    size_t fpn_n[4];
    int i, k;
    fpn_n[0] = 4 * g * g; fpn_n[1] = M2; fpn_n[2] = 4 * g * g; fpn_n[3] = (g / 2) * (g / 2);
    for (k = 0; k < 4; k++) {
        t->tape.fpn[k].pre = arena_floats(a, fpn_n[k] * W);
        t->tape.fpn[k].act = arena_floats(a, fpn_n[k] * W);
        t->tape.fpn[k].dw = arena_floats(a, fpn_n[k] * W);
    }
    t->tape.proj = arena_floats(a, Te * F);
    for (i = 0; i < c->enc_layers; i++) {
        enc_layer_acts *A = &t->tape.enc[i];
        A->qpos = arena_floats(a, Te * F); A->value = arena_floats(a, Te * F);
        A->offs = arena_floats(a, Te * 2 * noff); A->aw = arena_floats(a, Te * noff);
        A->msda = arena_floats(a, Te * F); A->a1 = arena_floats(a, Te * F); A->h1 = arena_floats(a, Te * F);
        A->cq = arena_floats(a, F); A->kv = arena_floats(a, Te * 2 * F); A->catt = arena_floats(a, F);
        A->co = arena_floats(a, F); A->a2 = arena_floats(a, Te * F); A->h2 = arena_floats(a, Te * F);
        A->ffn = arena_floats(a, Te * (size_t)c->enc_ffn); A->a3 = arena_floats(a, Te * F);
    }
    t->tape.lat_pre = arena_floats(a, M2 * F);
    t->tape.conv_pre = arena_floats(a, M2 * F);
    t->tape.hidden = arena_floats(a, L * Q * F);
    for (i = 0; i < c->dec_layers - 1; i++) {
        dec_layer_acts *A = &t->tape.dec[i];
        size_t n = (size_t)t->m->t.level_h[i % 3] * t->m->t.level_w[i % 3];
        A->mask = arena_bytes(a, Q * n);
        A->hq1 = arena_floats(a, Q * F); A->q1 = arena_floats(a, Q * F);
        A->kv = arena_floats(a, n * 2 * F); A->att1 = arena_floats(a, Q * F); A->a1 = arena_floats(a, Q * F);
        A->h1 = arena_floats(a, Q * F); A->hq2 = arena_floats(a, Q * F); A->q2 = arena_floats(a, Q * F);
        A->kv2 = arena_floats(a, 2 * Q * F); A->att2 = arena_floats(a, Q * F); A->a2 = arena_floats(a, Q * F);
        A->h2 = arena_floats(a, Q * F); A->ffn = arena_floats(a, Q * (size_t)c->dec_ffn); A->a3 = arena_floats(a, Q * F);
    }
    t->tape.me_a = arena_floats(a, L * Q * F);
    t->tape.me_b = arena_floats(a, L * Q * F);
    t->tape.me = arena_floats(a, L * Q * F);
}

/* Assigns (or counts) the backward scratch. */
static void seg_work_layout(loupe_trainer *t, arena *a)
{
    const loupe_config *c = &t->m->cfg;
    seg_work *k = &t->wk;
    size_t g = (size_t)c->grid, W = (size_t)c->width, F = (size_t)c->feature_size, Q = (size_t)c->num_queries;
    size_t Te = (size_t)t->m->t.tokens, M2 = 16 * g * g, L = (size_t)c->dec_layers, C = (size_t)c->num_labels + 1;
    size_t noff = (size_t)c->m2f_heads * 3 * (size_t)c->deform_points, QF = Q * F;
    size_t P = (size_t)t->loss_cfg.train_num_points, cand = (size_t)(P * t->loss_cfg.oversample_ratio);
    /* transposed weights (linear_backward: in*out), convolution scratch (transposed taps,
     * gathered outputs, shifted inputs) */
    size_t wt = max3(max3(W * W, 4 * g * g * W, F * (size_t)c->enc_ffn), max3(F * (size_t)c->dec_ffn, 9 * F * F + M2 * F, C * F),
                     max3(W * F, noff * 2 * F, 2 * F * F));
    size_t att = (size_t)max_threads() * 2 * max3(Q * 4 * g * g, Te, Q * Q);
    k->d_class = arena_floats(a, L * Q * C);
    k->d_mask = arena_floats(a, L * Q * M2);
    k->pseudo_mask = arena_floats(a, g * g);
    k->d_feats = arena_floats(a, (1 + g * g) * W);
    k->d_pooled = arena_floats(a, W);
    k->d_patch = arena_floats(a, g * g);
    k->d_me = arena_floats(a, L * QF);
    k->mf_t = arena_floats(a, M2 * F);
    k->d_mf = arena_floats(a, M2 * F);
    k->d_qh = arena_floats(a, QF); k->d_x1 = arena_floats(a, QF); k->d_x2 = arena_floats(a, QF);
    k->d_x3 = arena_floats(a, QF); k->d_h0 = arena_floats(a, QF); k->d_h1 = arena_floats(a, QF);
    k->d_att = arena_floats(a, QF); k->d_q = arena_floats(a, QF); k->d_hq = arena_floats(a, QF);
    k->d_kv2 = arena_floats(a, 2 * QF);
    k->d_qffn = arena_floats(a, Q * (size_t)c->dec_ffn);
    k->d_qffn2 = arena_floats(a, Q * (size_t)c->dec_ffn);
    k->d_kv = arena_floats(a, Te * 2 * F);
    k->d_dec_feat = arena_floats(a, Te * F);
    k->d_e0 = arena_floats(a, Te * F); k->d_e1 = arena_floats(a, Te * F);
    k->d_t1 = arena_floats(a, Te * F); k->d_t2 = arena_floats(a, Te * F); k->d_msda = arena_floats(a, Te * F);
    k->d_value = arena_floats(a, Te * F); k->d_qpos = arena_floats(a, Te * F);
    k->d_offs = arena_floats(a, Te * 2 * noff); k->d_aw = arena_floats(a, Te * noff); k->d_awl = arena_floats(a, Te * noff);
    k->d_effn = arena_floats(a, Te * (size_t)c->enc_ffn); k->d_effn2 = arena_floats(a, Te * (size_t)c->enc_ffn);
    k->d_cq = arena_floats(a, F); k->d_catt = arena_floats(a, F); k->d_co = arena_floats(a, F); k->d_cond = arena_floats(a, F);
    k->d_m1 = arena_floats(a, M2 * F); k->d_m2 = arena_floats(a, M2 * F);
    k->d_fpn4 = arena_floats(a, M2 * W);
    k->d_fpn_mid = arena_floats(a, 4 * g * g * W);
    k->d_fpn2 = arena_floats(a, 4 * g * g * W);
    k->d_fpn_half = arena_floats(a, (g / 2) * (g / 2) * W);
    k->d_f1 = arena_floats(a, M2 * W); k->d_f2 = arena_floats(a, M2 * W);
    k->wt = arena_floats(a, wt);
    k->stats = arena_floats(a, 2 * M2);
    k->att = arena_floats(a, att);
    t->loss_scratch.matcher_points = arena_floats(a, 2 * P);
    t->loss_scratch.matcher_scratch = arena_floats(a, (1 + (size_t)max_threads()) * P + Q);
    t->loss_scratch.points = arena_floats(a, 2 * P);
    t->loss_scratch.candidates = arena_floats(a, 2 * cand);
    t->loss_scratch.candidate_logits = arena_floats(a, cand);
    t->loss_scratch.order = (uncertain_point *)(void *)arena_bytes(a, cand * sizeof(uncertain_point));
    t->loss_scratch.masks.point_logits = arena_floats(a, P);
    t->loss_scratch.masks.point_labels = arena_floats(a, P);
    t->loss_scratch.masks.grad_points = (double *)(void *)arena_bytes(a, P * sizeof(double));
    t->loss_scratch.masks.grad_mask = (double *)(void *)arena_bytes(a, M2 * sizeof(double));
}

/* Assigns (or counts) the adapted parameters, their gradients and AdamW's moments. */
static void tta_state_layout(loupe_trainer *t, arena *a)
{
    t->param = arena_floats(a, t->n_floats);
    t->grad = arena_floats(a, t->n_floats);
    t->adam_m = arena_floats(a, t->n_floats);
    t->adam_v = arena_floats(a, t->n_floats);
    t->t.enc_pos = arena_floats(a, (size_t)t->m->t.tokens * (size_t)t->m->cfg.feature_size);
}

/* Recomputes the tables derived from adapted weights: the pixel decoder's position
 * embedding plus level embedding (as tables_fill does for the model). */
static void tta_refresh_tables(loupe_trainer *t)
{
    const loupe_tables *mt = &t->m->t;
    int F = t->m->cfg.feature_size, l, i, ch;
    for (l = 0; l < 3; l++)
        for (i = mt->level_start[l]; i < mt->level_start[l] + mt->level_h[l] * mt->level_w[l]; i++)
            for (ch = 0; ch < F; ch++)
                t->t.enc_pos[(size_t)i * F + ch] = mt->dec_pos[(size_t)i * F + ch] + t->w.level_embed[(size_t)l * F + ch];
}

/* ---- One step: forward, pseudo-label loss, backward; clipping and AdamW ---- */

/* The loss half of LoupeModel.forward in stage test with labels = None, after a forward
 * of t->s: turns the classifier's verdict into pseudo targets and evaluates LoupeSegLoss;
 * its gradients w.r.t. every prediction's logits land in wk.d_class, wk.d_mask (=). */
static void tta_loss(loupe_trainer *t, loupe_tta_loss *out)
{
    const loupe_config *c = &t->m->cfg;
    loupe_session *s = t->s;
    seg_work *k = &t->wk;
    int L = c->dec_layers, Q = c->num_queries, C = c->num_labels + 1, g = c->grid, M = 4 * g, i;
    double total;
    seg_batch bt;
    for (i = 0; i < g * g; i++) k->pseudo_mask[i] = sigmoidf(s->patch_logits[i]);
    zero_floats(k->d_class, (size_t)L * Q * C);
    zero_floats(k->d_mask, (size_t)L * Q * M * M);
    for (i = 0; i < L; i++) {
        t->preds[i].class_logits = s->class_logits + (size_t)i * Q * C;
        t->preds[i].mask_logits = s->mask_logits + (size_t)i * Q * M * M;
        t->preds[i].grad_class_logits = k->d_class + (size_t)i * Q * C;
        t->preds[i].grad_mask_logits = k->d_mask + (size_t)i * Q * M * M;
    }
    /* one image, its own batch; the stream moves on by the batch's draws */
    bt.images = 1;
    bt.targets = s->prob > SEG_PSEUDO_LABEL_THRESHOLD;
    bt.image = bt.targets_before = 0;
    bt.base = t->rng_position;
    memset(t->calls, 0, (size_t)L * sizeof *t->calls);
    for (i = 0; i < L; i++) t->calls[i].matched_query = -1;
    total = 0.0;
    loupe_seg_loss(&t->loss_cfg, L, Q, M, t->preds, bt.targets, k->pseudo_mask, g, g, &bt, 1.0, &t->rng, &t->loss_scratch,
                   t->calls, &total);
    t->rng_position += seg_batch_draws(&t->loss_cfg, L, 1, bt.targets);
    memset(out, 0, sizeof *out);
    out->total = total;
    for (i = 0; i < L; i++) {
        out->mask += t->calls[i].weighted_mask;
        out->dice += t->calls[i].weighted_dice;
        out->cross_entropy += t->calls[i].weighted_cross_entropy;
    }
    out->prob = s->prob;
    out->has_target = s->prob > SEG_PSEUDO_LABEL_THRESHOLD;
}

/* LoupeModel.forward of a training stage without its loss: the modules the stage built,
 * with the trainer's weights, keeping what the backward needs. cond_label: the
 * conditional query's label (negative: the classifier's probability). */
static int trainer_forward(loupe_trainer *t, const float *pixel_values, const float *features, float cond_label,
                           char *err, size_t errsize)
{
    loupe_session *s = t->s;
    const loupe_config *c = &t->m->cfg;
    size_t TW = (size_t)(1 + c->grid * c->grid) * c->width;
    if (max_threads() > s->threads)
        return fail(err, errsize, "the trainer was created for %d threads but %d are requested; create it after "
                    "loupe_set_threads", s->threads, max_threads());
    if (features && !t->backbone_backward) { /* a frozen backbone's kept outputs */
        memcpy(s->feats, features, TW * sizeof *s->feats);
        memcpy(s->pooled, features + TW, (size_t)c->width * sizeof *s->pooled);
    } else vision_transformer(s, pixel_values);
    if (t->has_cls || t->pseudo) loupe_classifier(s);
    if (!t->has_seg) return 0;
    s->cond_label = cond_label;
    conditional_query(s);
    feature_pyramid(s);
    pixel_decoder(s);
    masked_attention_decoder(s);
    return 0;
}

/* LoupeModel.forward in stage test with labels = None: the forward of pixel_values with
 * the adapted segmentor (keeping the tape), then tta_loss. */
static int tta_forward_loss(loupe_trainer *t, const float *pixel_values, loupe_tta_loss *out, char *err, size_t errsize)
{
    if (trainer_forward(t, pixel_values, NULL, -1.0f, err, errsize)) return -1;
    tta_loss(t, out);
    return 0;
}

/* tta_forward_loss, then the backward: adds weight * the gradient to t->grad (and the
 * patch grid's into d_grid [g*g][W] when not NULL). */
static int tta_accumulate(loupe_trainer *t, const float *pixel_values, float weight, loupe_tta_loss *out, float *d_grid,
                          char *err, size_t errsize)
{
    const loupe_config *c = &t->m->cfg;
    size_t nc = (size_t)c->dec_layers * c->num_queries * (c->num_labels + 1);
    size_t nm = (size_t)c->dec_layers * c->num_queries * 16 * c->grid * c->grid, j;
    loupe_tta_loss loss;
    if (tta_forward_loss(t, pixel_values, &loss, err, errsize)) return -1;
    if (weight != 1.0f) {
        for (j = 0; j < nc; j++) t->wk.d_class[j] *= weight;
        for (j = 0; j < nm; j++) t->wk.d_mask[j] *= weight;
    }
    segmentor_backward(&t->sg, d_grid);
    if (out) *out = loss;
    return 0;
}

/* Points the loss's prediction views at the session's logits and zeroes their gradients. */
static void trainer_bind_predictions(loupe_trainer *t)
{
    const loupe_config *c = &t->m->cfg;
    int L = c->dec_layers, Q = c->num_queries, C = c->num_labels + 1, M = 4 * c->grid, i;
    zero_floats(t->wk.d_class, (size_t)L * Q * C);
    zero_floats(t->wk.d_mask, (size_t)L * Q * M * M);
    for (i = 0; i < L; i++) {
        t->preds[i].class_logits = t->s->class_logits + (size_t)i * Q * C;
        t->preds[i].mask_logits = t->s->mask_logits + (size_t)i * Q * M * M;
        t->preds[i].grad_class_logits = t->wk.d_class + (size_t)i * Q * C;
        t->preds[i].grad_mask_logits = t->wk.d_mask + (size_t)i * Q * M * M;
    }
}

/* LitModel.training_step for one image of a batch (bt): forward, this image's share of
 * the stage's loss (added to *loss), backward of scale times it into the gradients. */
static int trainer_image(loupe_trainer *t, const loupe_example *ex, const seg_batch *bt, double scale,
                         loupe_train_loss *loss, char *err, size_t errsize)
{
    const loupe_config *c = &t->m->cfg;
    int L = c->dec_layers, Q = c->num_queries, M = 4 * c->grid, S = c->image_size, W = c->width;
    int has_target = ex->n_targets > 0;
    double seg = 0.0;
    if (trainer_forward(t, ex->pixel_values, ex->features, has_target ? 1.0f : 0.0f, err, errsize)) return -1;
    if (t->backbone_backward) zero_floats(t->wk.d_feats, (size_t)(1 + c->grid * c->grid) * W);
    if (t->has_seg) {
        trainer_bind_predictions(t);
        loupe_seg_loss(&t->loss_cfg, L, Q, M, t->preds, has_target, ex->mask_labels, S, S, bt,
                       scale * t->opt.seg_loss_weight, &t->rng, &t->loss_scratch, t->calls, &seg);
        loss->seg += seg;
        segmentor_backward(&t->sg, t->backbone_backward ? t->wk.d_feats + W : NULL);
    }
    if (t->has_cls) {
        int N = c->grid * c->grid, i;
        float d_fused = 0.0f, cw = (float)(scale * t->opt.cls_loss_weight);
        cls_loss_terms ct;
        zero_floats(t->wk.d_patch, (size_t)N);
        loupe_cls_loss(&t->cls_cfg, t->s->fused_logit, (float)ex->label, t->s->patch_logits, ex->patch_labels, N,
                       1.0 / bt->images, 1.0 / ((double)bt->images * N), &ct, NULL, &d_fused, t->wk.d_patch);
        loss->cls_part += ct.cls_part;
        loss->patch_part += ct.patch_part;
        d_fused *= cw;
        for (i = 0; i < N; i++) t->wk.d_patch[i] *= cw;
        if (t->backbone_backward) zero_floats(t->wk.d_pooled, (size_t)W);
        loupe_classifier_backward(t->s, &t->cg, d_fused, t->wk.d_patch, t->backbone_backward ? t->wk.d_pooled : NULL,
                                  t->backbone_backward ? t->wk.d_feats : NULL, &t->pw);
    }
    if (t->backbone_backward)
        vision_transformer_backward(t->s, &t->pg, t->wk.d_feats, t->has_cls ? t->wk.d_pooled : NULL, &t->pw);
    return 0;
}

int loupe_trainer_accumulate(loupe_trainer *t, const loupe_example *batch, int n, double scale,
                             loupe_train_loss *loss, char *err, size_t errsize)
{
    const loupe_config *c;
    loupe_train_loss sum;
    seg_batch bt;
    int b, L, k;
    if (!t || !batch || n < 1) return fail(err, errsize, "loupe_trainer_accumulate needs a trainer and at least one example");
    if (t->pseudo) return fail(err, errsize, "a test-time-adaptation trainer takes loupe_tta_accumulate");
    if (!(scale >= 0.0 && scale <= TTA_MAX_WEIGHT))
        return fail(err, errsize, "gradient scale %g is outside 0..%g", scale, (double)TTA_MAX_WEIGHT);
    c = &t->m->cfg;
    L = c->dec_layers;
    memset(&bt, 0, sizeof bt);
    for (b = 0; b < n; b++) {
        const loupe_example *ex = &batch[b];
        if (!ex->pixel_values || (ex->n_targets > 0 && !ex->mask_labels) || (t->has_cls && !ex->patch_labels) ||
            ex->n_targets < 0 || ex->n_targets > 1 || ex->label < 0 || ex->label > 1)
            return fail(err, errsize, "example %d of the batch is incomplete (pixel values, a mask for its target, "
                        "patch labels, label 0 or 1, at most one target)", b);
        bt.targets += ex->n_targets;
    }
    bt.images = n;
    bt.base = t->rng_position;
    memset(&sum, 0, sizeof sum);
    memset(t->calls, 0, (size_t)L * sizeof *t->calls);
    for (k = 0; k < L; k++) t->calls[k].matched_query = -1;
    for (b = 0; b < n; b++) {
        bt.image = b;
        if (trainer_image(t, &batch[b], &bt, scale, &sum, err, errsize)) return -1;
        bt.targets_before += batch[b].n_targets;
    }
    if (t->has_seg) t->rng_position += seg_batch_draws(&t->loss_cfg, L, n, bt.targets);
    for (k = 0; k < L; k++) {
        sum.mask += t->calls[k].weighted_mask;
        sum.dice += t->calls[k].weighted_dice;
        sum.cross_entropy += t->calls[k].weighted_cross_entropy;
    }
    sum.cls = sum.cls_part + sum.patch_part;
    sum.total = t->opt.cls_loss_weight * sum.cls + t->opt.seg_loss_weight * sum.seg;
    if (loss) *loss = sum;
    return 0;
}

/* L2 norm of all gradients (clip_grad_norm_'s total norm), accumulated in double. */
#define NORM_CHUNK 65536   /* gradient-norm partial sums: fixed chunks, added in order */
static double tta_grad_norm(const loupe_trainer *t)
{
    double sum = 0.0, part[64];
    size_t n = t->n_floats, chunks = (n + NORM_CHUNK - 1) / NORM_CHUNK, c0, c;
    /* chunk sums in parallel, then added in chunk order: the same bits for any thread count */
    for (c0 = 0; c0 < chunks; c0 += 64) {
        long k, nk = (long)(chunks - c0 < 64 ? chunks - c0 : 64);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)nk * NORM_CHUNK))
#endif
        for (k = 0; k < nk; k++) {
            size_t lo = (c0 + (size_t)k) * NORM_CHUNK, hi = lo + NORM_CHUNK < n ? lo + NORM_CHUNK : n;
            part[k] = row_dot(t->grad + lo, t->grad + lo, (int)(hi - lo));
        }
        for (c = 0; c < (size_t)nk; c++) sum += part[c];
    }
    return sqrt(sum);
}

/* sqrtf(x) rounded to float32 on every target: on x87 (FLT_EVAL_METHOD 2) gcc keeps the
 * square root's 64-bit result and drops casts of it, but a volatile float must be stored. */
static float sqrt_f32(float x)
{
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
    return sqrtf(x);   /* float arithmetic is float: no store needed, and the loop vectorises */
#else
    volatile float r = sqrtf(x);
    return r;
#endif
}

/* torch.optim.AdamW (one step, PyTorch's float32 operations in its order: lerp, addcmul,
 * addcdiv as self + value * t1 / t2; upstream's step1 is reproduced bit for bit) on gradients
 * scaled by clip_coef, as clip_grad_norm_ leaves them. Each tensor uses its group's
 * learning rate times lr_factor (LambdaLR's factor) and weight decay. Zeroes the
 * gradients and refreshes the derived tables.
 * The casts round every operation to float32 as PyTorch does, also where C evaluates
 * float expressions in a wider format (x87: FLT_EVAL_METHOD 2). */
static void adamw_step(loupe_trainer *t, float clip_coef, double lr_factor)
{
    const loupe_train_options *o = &t->opt;
    double bc1, bc2;
    float bc2_sqrt, one_b1 = (float)(1.0 - o->beta1), one_b2 = (float)(1.0 - o->beta2);
    float b2 = (float)o->beta2, eps = (float)o->eps;
    int p;
    t->steps++;
    bc1 = 1.0 - pow(o->beta1, (double)t->steps);
    bc2 = 1.0 - pow(o->beta2, (double)t->steps);
    bc2_sqrt = (float)sqrt(bc2);
    for (p = 0; p < t->n_params; p++) {
        const train_param *tp = &t->params[p];
        double lr = tp->lr * lr_factor;
        float step_size = (float)(lr / bc1);
        float decay = (float)(1.0 - lr * tp->weight_decay);
        float *w = t->param + tp->offset, *g = t->grad + tp->offset;
        float *m = t->adam_m + tp->offset, *v = t->adam_v + tp->offset;
        long i;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)tp->numel * 8))
#endif
        for (i = 0; i < (long)tp->numel; i++) {
            float gi = g[i] * clip_coef, denom;
            w[i] *= decay;
            m[i] += (float)(one_b1 * (float)(gi - m[i]));
            v[i] = (float)(v[i] * b2) + (float)((float)(one_b2 * gi) * gi);
            denom = (float)(sqrt_f32(v[i]) / bc2_sqrt) + eps;
            w[i] -= (float)((float)(step_size * m[i]) / denom);
            g[i] = 0.0f;   /* the next step's gradient starts from zero */
        }
    }
    if (t->has_seg) tta_refresh_tables(t);
}

/* ---- Public API ---- */

void loupe_tta_default_options(loupe_tta_options *o)
{
    o->lr = 1e-4;
    o->beta1 = 0.9;
    o->beta2 = 0.999;
    o->eps = 1e-8;
    o->weight_decay = 1e-3;
    o->clip_norm = 1.0;
    o->seed = 0;
}

/* Upstream's hyperparameters per stage (configs/hparams/{cls,seg,cls_seg}.yaml and
 * configs/model/ *.yaml): learning rates, weight decay, clipping, loss weights. */
void loupe_train_default_options(loupe_train_options *o, int stage)
{
    memset(o, 0, sizeof *o);
    o->stage = stage;
    o->beta1 = 0.9;
    o->beta2 = 0.999;
    o->eps = 1e-8;
    o->clip_norm = 1.0;
    o->backbone_lr = 1e-5;
    o->train_backbone = stage == LOUPE_TRAIN_CLS_SEG;
    o->train_embeddings = 0;
    o->cls_loss_weight = stage == LOUPE_TRAIN_CLS_SEG ? 2.0 : 1.0;
    o->seg_loss_weight = 1.0;
    if (stage == LOUPE_TRAIN_CLS) {
        o->lr = 5e-4;
        o->weight_decay = 1e-3;
    } else if (stage == LOUPE_TRAIN_TTA) {
        o->lr = o->backbone_lr = 1e-4;
        o->weight_decay = 1e-3;
        o->cls_loss_weight = 0.0;
    } else {
        o->lr = 3e-4;
        o->weight_decay = 5e-2;
    }
}

/* Counts the weight file's tensors under prefix; *unknown receives one that is not trainable here. */
static int count_prefixed_tensors(const loupe_trainer *t, const char *prefix, const train_param *params, int n,
                                  const tensor_entry **unknown)
{
    int i, j, count = 0;
    size_t plen = strlen(prefix);
    *unknown = NULL;
    for (i = 0; i < t->m->n_entries; i++) {
        const tensor_entry *e = &t->m->entries[i];
        int known = 0;
        if ((size_t)e->name_len < plen || memcmp(e->name, prefix, plen) != 0) continue;
        count++;
        for (j = 0; j < n && !known; j++)
            known = strlen(params[j].name) == (size_t)e->name_len && !memcmp(params[j].name, e->name, (size_t)e->name_len);
        if (!known && !*unknown) *unknown = e;
    }
    return count;
}

/* Walks the stage's trainable tensors: backbone (all, or its two embeddings), classifier,
 * segmentor. */
static void trainer_params(loupe_trainer *t, param_builder *pb)
{
    const loupe_config *c = &t->m->cfg;
    if (t->opt.train_backbone || t->opt.train_embeddings) backbone_params(pb, &t->w, c, t->opt.train_backbone);
    if (t->has_cls) classifier_params(pb, &t->w, c);
    if (t->has_seg) segmentor_params(pb, &t->w, c);
}

/* Assigns (or counts) the whole arena: tape, backward scratch, parameters and AdamW state. */
static void trainer_layout(loupe_trainer *t, arena *a)
{
    size_t start = a->used;
    if (t->has_seg) seg_tape_layout(t, a);
    t->tape_bytes = a->used - start;
    pe_train_layout(&t->m->cfg, t->backbone_backward ? &t->bb_tape : NULL, t->has_cls ? &t->cls_tape : NULL,
                    t->has_cls || t->backbone_backward ? &t->pw : NULL, a);
    t->tape_bytes = a->used - start;
    start = a->used;
    seg_work_layout(t, a);
    t->work_bytes = a->used - start;
    start = a->used;
    tta_state_layout(t, a);
    t->state_bytes = a->used - start;
}

/* Gradient views of a linear layer and a norm (NULL members: frozen). */
static linear_g linear_grad_view(loupe_trainer *t, linear_w l)
{
    linear_g g;
    g.w = grad_of(&t->sg, (const float *)l.w.data);
    g.b = grad_of(&t->sg, l.b);
    return g;
}
static norm_g norm_grad_view(loupe_trainer *t, norm_w n)
{
    norm_g g;
    g.w = grad_of(&t->sg, n.w);
    g.b = grad_of(&t->sg, n.b);
    return g;
}

/* Points the backbone's and the classifier's gradient views at the trainer's gradients
 * (sections 4 and 5 write through them); -1 when out of memory. */
static int trainer_grad_views(loupe_trainer *t)
{
    const loupe_config *c = &t->m->cfg;
    const loupe_weights *w = &t->w;
    pe_grads *g = &t->pg;
    int i, k;
    memset(g, 0, sizeof *g);
    memset(&t->cg, 0, sizeof t->cg);
    g->class_embedding = grad_of(&t->sg, w->class_embedding);
    g->positional_embedding = grad_of(&t->sg, w->positional_embedding);
    g->conv1 = grad_of(&t->sg, (const float *)w->conv1.data);
    g->ln_pre = norm_grad_view(t, w->ln_pre);
    g->ln_post = norm_grad_view(t, w->ln_post);
    if (t->opt.train_backbone) {
        t->block_grads = calloc((size_t)c->layers, sizeof *t->block_grads);
        if (!t->block_grads) return -1;
        for (i = 0; i < c->layers; i++) {
            const pe_block_w *b = &w->blocks[i];
            pe_block_g *bg = &t->block_grads[i];
            bg->ln_1 = norm_grad_view(t, b->ln_1);
            bg->ln_2 = norm_grad_view(t, b->ln_2);
            bg->qkv = linear_grad_view(t, b->qkv);
            bg->out = linear_grad_view(t, b->out);
            bg->fc = linear_grad_view(t, b->fc);
            bg->proj = linear_grad_view(t, b->proj);
        }
        g->blocks = t->block_grads;
    }
    g->pool.probe = grad_of(&t->sg, w->pool.probe);
    g->pool.qkv = linear_grad_view(t, w->pool.qkv);
    g->pool.out = linear_grad_view(t, w->pool.out);
    g->pool.ln = norm_grad_view(t, w->pool.ln);
    g->pool.fc = linear_grad_view(t, w->pool.fc);
    g->pool.proj = linear_grad_view(t, w->pool.proj);
    for (k = 0; k < c->cls_layers; k++) {
        t->cg.global_head.layers[k] = linear_grad_view(t, w->global_head.layers[k]);
        t->cg.patch_head.layers[k] = linear_grad_view(t, w->patch_head.layers[k]);
    }
    t->cg.fuser = grad_of(&t->sg, w->fuser);
    return 0;
}

/* The trainer for any stage (test-time adaptation included). */
static loupe_trainer *trainer_new(const loupe_model *m, const loupe_train_options *opt, char *err, size_t errsize)
{
    const loupe_config *c;
    const loupe_train_options *o = opt;
    loupe_trainer *t;
    param_builder pb;
    arena a = {NULL, 0, 0};
    const tensor_entry *unknown;
    int L, stage;
    if (!m) { fail(err, errsize, "no model given"); return NULL; }
    if (!o) { fail(err, errsize, "no training options given"); return NULL; }
    c = &m->cfg;
    L = c->dec_layers;
    stage = o->stage;
    if (stage < LOUPE_TRAIN_TTA || stage > LOUPE_TRAIN_CLS_SEG) {
        fail(err, errsize, "unknown training stage %d", stage);
        return NULL;
    }
    if (c->num_labels != 1) {
        fail(err, errsize, "%s: training needs Loupe's single label (this model has %d)", m->path, c->num_labels);
        return NULL;
    }
    if (!(o->lr >= 0.0 && o->lr < 1.0 && o->backbone_lr >= 0.0 && o->backbone_lr < 1.0 && o->beta1 >= 0.0 &&
          o->beta1 < 1.0 && o->beta2 >= 0.0 && o->beta2 < 1.0 && o->eps > 0.0 && o->weight_decay >= 0.0 &&
          o->weight_decay < 1.0 && o->clip_norm > 0.0 && o->cls_loss_weight >= 0.0 && o->seg_loss_weight >= 0.0)) {
        fail(err, errsize, "invalid training options (learning rates, betas and weight decay in [0, 1), eps and clip "
                           "norm > 0, loss weights >= 0)");
        return NULL;
    }
    t = calloc(1, sizeof *t);
    if (!t) { fail(err, errsize, "out of memory"); return NULL; }
    t->m = m;
    t->opt = *o;
    t->pseudo = stage == LOUPE_TRAIN_TTA;
    t->has_cls = stage == LOUPE_TRAIN_CLS || stage == LOUPE_TRAIN_CLS_SEG;
    t->has_seg = stage != LOUPE_TRAIN_CLS;
    if (t->pseudo) t->opt.train_backbone = t->opt.train_embeddings = 0;
    t->backbone_backward = t->opt.train_backbone || t->opt.train_embeddings;
    t->w = m->w;
    t->t = m->t;
    t->loss_cfg = seg_loss_config_from_model(m);
    t->enc = calloc((size_t)c->enc_layers + 1, sizeof *t->enc);
    t->dec = calloc((size_t)L, sizeof *t->dec);
    t->blocks = calloc((size_t)c->layers, sizeof *t->blocks);
    t->tape.enc = calloc((size_t)c->enc_layers + 1, sizeof *t->tape.enc);
    t->tape.dec = calloc((size_t)L, sizeof *t->tape.dec);
    t->calls = calloc((size_t)L, sizeof *t->calls);
    t->preds = calloc((size_t)L, sizeof *t->preds);
    if (!t->enc || !t->dec || !t->blocks || !t->tape.enc || !t->tape.dec || !t->calls || !t->preds) goto oom;
    memcpy(t->enc, m->w.enc, (size_t)c->enc_layers * sizeof *t->enc);
    memcpy(t->dec, m->w.dec, (size_t)(L - 1) * sizeof *t->dec);
    memcpy(t->blocks, m->w.blocks, (size_t)c->layers * sizeof *t->blocks);
    t->w.enc = t->enc;
    t->w.dec = t->dec;
    t->w.blocks = t->blocks;
    /* count the trainable tensors, then plan one block: tape, scratch, parameters + AdamW */
    memset(&pb, 0, sizeof pb);
    pb.opt = &t->opt;
    trainer_params(t, &pb);
    t->n_params = pb.count;
    t->n_floats = pb.floats;
    t->params = calloc((size_t)t->n_params + 1, sizeof *t->params);
    if (!t->params) goto oom;
    trainer_layout(t, &a);
    a.cap = a.used;
    a.used = 0;
    a.base = aligned_block(a.cap, &t->raw);
    if (!a.base) {
        fail(err, errsize, "out of memory: training needs %.1f MiB", (double)a.cap / (1 << 20));
        loupe_trainer_free(t);
        return NULL;
    }
    trainer_layout(t, &a);
    t->sg.cfg = &m->cfg;
    t->sg.w = &t->w;
    t->sg.tb = &t->t;
    t->sg.tape = &t->tape;
    t->sg.wk = &t->wk;
    t->sg.param = t->param;
    t->sg.grad = t->grad;
    t->sg.n_floats = t->n_floats;
    zero_floats(t->grad, t->n_floats);
    zero_floats(t->adam_m, t->n_floats);
    zero_floats(t->adam_v, t->n_floats);
    /* copy the trained tensors out of the read-only model */
    pb.params = t->params;
    pb.data = t->param;
    pb.b.m = m; pb.b.err = err; pb.b.errsize = errsize; pb.b.failed = 0;
    pb.count = 0;
    pb.floats = 0;
    trainer_params(t, &pb);
    if (pb.b.failed) { loupe_trainer_free(t); return NULL; }
    /* every tensor of a trained module must be one this build trains, and each once */
    {
        static const char *const prefixes[3] = {"backbone.", "classifier.", TTA_SEGMENTOR_PREFIX};
        int k, j;
        for (k = 0; k < 3; k++) {
            int trained = k == 0 ? t->opt.train_backbone : k == 1 ? t->has_cls : t->has_seg, ours = 0;
            size_t plen = strlen(prefixes[k]);
            if (!trained) continue;
            for (j = 0; j < t->n_params; j++) ours += !strncmp(t->params[j].name, prefixes[k], plen);
            if (count_prefixed_tensors(t, prefixes[k], t->params, t->n_params, &unknown) != ours || unknown) {
                if (unknown) fail(err, errsize, "%s: tensor %.*s is not one this build knows how to train", m->path,
                                  unknown->name_len, unknown->name);
                else fail(err, errsize, "%s: the weight file's %s tensors do not match this build's", m->path,
                          prefixes[k]);
                loupe_trainer_free(t);
                return NULL;
            }
        }
    }
    if (t->has_seg) tta_refresh_tables(t);
    if (trainer_grad_views(t)) goto oom;
    weights_release_pages(m);
    t->cls_cfg = cls_loss_config_from_model(m);
    t->s = loupe_session_new(m, err, errsize);
    if (!t->s) { loupe_trainer_free(t); return NULL; }
    t->s->w = &t->w;
    t->s->t = &t->t;
    t->sg.s = t->s;
    t->s->tape = t->has_seg ? &t->tape : NULL;
    t->s->bb_tape = t->backbone_backward ? &t->bb_tape : NULL;
    t->s->cls_tape = t->has_cls ? &t->cls_tape : NULL;
    t->rng_state.seed = t->opt.seed;
    t->rng_state.counter = 0;
    t->rng.fill = splitmix_uniform_fill;
    t->rng.seek = splitmix_uniform_seek;
    t->rng.state = &t->rng_state;
    return t;
oom:
    fail(err, errsize, "out of memory");
    loupe_trainer_free(t);
    return NULL;
}

loupe_trainer *loupe_tta_new(const loupe_model *m, const loupe_tta_options *opt, char *err, size_t errsize)
{
    loupe_tta_options d;
    loupe_train_options o;
    if (!opt) {
        loupe_tta_default_options(&d);
        opt = &d;
    }
    if (!(opt->lr >= 0.0 && opt->lr < 1.0 && opt->beta1 >= 0.0 && opt->beta1 < 1.0 && opt->beta2 >= 0.0 &&
          opt->beta2 < 1.0 && opt->eps > 0.0 && opt->weight_decay >= 0.0 && opt->weight_decay < 1.0 &&
          opt->clip_norm > 0.0)) {
        fail(err, errsize, "invalid test-time adaptation options (learning rate, betas and weight decay in [0, 1), eps and clip norm > 0)");
        return NULL;
    }
    if (m && m->cfg.num_labels != 1) {
        fail(err, errsize, "%s: test-time adaptation needs Loupe's single label (this model has %d)", m->path,
             m->cfg.num_labels);
        return NULL;
    }
    loupe_train_default_options(&o, LOUPE_TRAIN_TTA);
    o.lr = o.backbone_lr = opt->lr;
    o.beta1 = opt->beta1;
    o.beta2 = opt->beta2;
    o.eps = opt->eps;
    o.weight_decay = opt->weight_decay;
    o.clip_norm = opt->clip_norm;
    o.seed = opt->seed;
    return trainer_new(m, &o, err, errsize);
}

loupe_trainer *loupe_trainer_new(const loupe_model *m, const loupe_train_options *opt, char *err, size_t errsize)
{
    if (opt && opt->stage == LOUPE_TRAIN_TTA) {
        fail(err, errsize, "test-time adaptation trainers are made by loupe_tta_new");
        return NULL;
    }
    return trainer_new(m, opt, err, errsize);
}

void loupe_trainer_free(loupe_trainer *t)
{
    if (!t) return;
    loupe_session_free(t->s);
    free(t->raw);
    free(t->params);
    free(t->enc);
    free(t->dec);
    free(t->blocks);
    free(t->block_grads);
    free(t->tape.enc);
    free(t->tape.dec);
    free(t->calls);
    free(t->preds);
    free(t);
}

size_t loupe_trainer_feature_floats(const loupe_trainer *t)
{
    const loupe_config *c = &t->m->cfg;
    return t->backbone_backward ? 0 : (size_t)(2 + c->grid * c->grid) * c->width;
}

int loupe_trainer_features(loupe_trainer *t, const float *pixel_values, float *features, char *err, size_t errsize)
{
    const loupe_config *c;
    size_t TW;
    if (!t || !pixel_values || !features) return fail(err, errsize, "loupe_trainer_features needs a trainer, an input and a buffer");
    if (t->backbone_backward) return fail(err, errsize, "the backbone trains: its outputs cannot be kept");
    c = &t->m->cfg;
    TW = (size_t)(1 + c->grid * c->grid) * c->width;
    if (max_threads() > t->s->threads)
        return fail(err, errsize, "the trainer was created for %d threads but %d are requested", t->s->threads, max_threads());
    vision_transformer(t->s, pixel_values);
    memcpy(features, t->s->feats, TW * sizeof *features);
    memcpy(features + TW, t->s->pooled, (size_t)c->width * sizeof *features);
    return 0;
}

/* transformers' get_wsd_schedule (linear warm-up, constant, cosine decay to 0) and
 * get_cosine_schedule_with_warmup, as LambdaLR factors (README 10.7 of the golden). */
double loupe_lr_factor(int schedule, long step, double total, double warmup, double decay)
{
    const double pi = 3.14159265358979323846;
    double s = (double)step;
    if (schedule == LOUPE_SCHEDULE_CONSTANT) return 1.0;
    if (s < warmup) return s / (warmup > 1.0 ? warmup : 1.0);
    if (schedule == LOUPE_SCHEDULE_COSINE) {
        double span = total - warmup > 1.0 ? total - warmup : 1.0, f = 0.5 * (1.0 + cos(pi * (s - warmup) / span));
        return f > 0.0 ? f : 0.0;
    }
    if (s < total - decay) return 1.0;
    if (s < total) return 0.5 * (1.0 + cos(pi * (s - total + decay) / (decay > 1.0 ? decay : 1.0)));
    return 0.0;
}

void loupe_trainer_size(const loupe_trainer *t, int *tensors, size_t *values)
{
    if (tensors) *tensors = t ? t->n_params : 0;
    if (values) *values = t ? t->n_floats : 0;
}

void loupe_tta_free(loupe_trainer *t) { loupe_trainer_free(t); }

int loupe_tta_accumulate(loupe_trainer *t, const float *pixel_values, float weight, loupe_tta_loss *loss, char *err,
                         size_t errsize)
{
    if (!t || !pixel_values) return fail(err, errsize, "loupe_tta_accumulate needs an adapter and an input tensor");
    if (!(weight >= 0.0f && weight <= TTA_MAX_WEIGHT))
        return fail(err, errsize, "gradient weight %g is outside 0..%g", (double)weight, (double)TTA_MAX_WEIGHT);
    return tta_accumulate(t, pixel_values, weight, loss, NULL, err, errsize);
}

int loupe_tta_update(loupe_trainer *t, double *grad_norm, char *err, size_t errsize)
{
    if (!t) return fail(err, errsize, "loupe_tta_update needs an adapter");
    return loupe_trainer_update(t, 1.0, grad_norm, err, errsize);
}

int loupe_trainer_update(loupe_trainer *t, double lr_factor, double *grad_norm, char *err, size_t errsize)
{
    double norm;
    float coef;
    if (!t) return fail(err, errsize, "loupe_trainer_update needs a trainer");
    if (!(lr_factor >= 0.0 && lr_factor <= 1e3)) return fail(err, errsize, "learning-rate factor %g is outside 0..1000", lr_factor);
    norm = tta_grad_norm(t);
    if (!isfinite(norm)) {
        zero_floats(t->grad, t->n_floats);
        return fail(err, errsize, "the gradient is not finite; the update was skipped");
    }
    /* clip_grad_norm_ (in float32, like PyTorch): scale by max_norm / (norm + eps) when below 1 */
    coef = (float)t->opt.clip_norm / ((float)norm + (float)TTA_CLIP_EPS);
    adamw_step(t, coef < 1.0f ? coef : 1.0f, lr_factor);
    if (grad_norm) *grad_norm = norm;
    return 0;
}

int loupe_tta_step(loupe_trainer *t, const float *pixel_values, loupe_tta_loss *loss, char *err, size_t errsize)
{
    double norm = 0.0;
    if (loupe_tta_accumulate(t, pixel_values, 1.0f, loss, err, errsize) || loupe_tta_update(t, &norm, err, errsize))
        return -1;
    if (loss) loss->grad_norm = norm;
    return 0;
}

int loupe_tta_adapt(loupe_trainer *t, int n_images, loupe_tta_source source, void *user, int steps, int batch,
                    loupe_tta_progress progress, char *err, size_t errsize)
{
    const loupe_config *c;
    float *pixels;
    int step, b, next = 0;
    if (!t || !source || n_images < 1 || steps < 0 || batch < 1)
        return fail(err, errsize, "loupe_tta_adapt needs an adapter, at least one image, steps >= 0 and batch >= 1");
    c = &t->m->cfg;
    pixels = malloc((size_t)3 * c->image_size * c->image_size * sizeof *pixels);
    if (!pixels) return fail(err, errsize, "out of memory");
    if (batch > n_images) batch = n_images;
    for (step = 0; step < steps; step++) {
        loupe_tta_loss sum, one;
        memset(&sum, 0, sizeof sum);
        /* one step = the mean loss of the next `batch` images, cycling through the set */
        for (b = 0; b < batch; b++, next = (next + 1) % n_images) {
            if (source(user, next, pixels, err, errsize) ||
                loupe_tta_accumulate(t, pixels, 1.0f / (float)batch, &one, err, errsize)) {
                free(pixels);
                return -1;
            }
            sum.total += one.total / batch;
            sum.mask += one.mask / batch;
            sum.dice += one.dice / batch;
            sum.cross_entropy += one.cross_entropy / batch;
            sum.has_target += one.has_target;
        }
        if (loupe_tta_update(t, &sum.grad_norm, err, errsize)) { free(pixels); return -1; }
        if (progress) progress(user, step, &sum);
    }
    free(pixels);
    return 0;
}

int loupe_session_use_tta(loupe_session *s, const loupe_trainer *t, char *err, size_t errsize)
{
    if (!s) return fail(err, errsize, "no session given");
    if (t && t->m != s->m) return fail(err, errsize, "the adapter was made for another model than the session's");
    s->w = t ? &t->w : &s->m->w;
    s->t = t ? &t->t : &s->m->t;
    return 0;
}

void loupe_tta_get_memory(const loupe_trainer *t, loupe_tta_memory *mem)
{
    mem->saved_activations = t->tape_bytes;
    mem->backward_scratch = t->work_bytes;
    mem->parameters = t->state_bytes;
    mem->session = t->s->bytes;
    mem->trainable = t->n_floats;
}

/* The weight file's entry called name, or NULL. */
static const tensor_entry *find_entry(const loupe_model *m, const char *name)
{
    size_t n = strlen(name);
    int i;
    for (i = 0; i < m->n_entries; i++)
        if ((size_t)m->entries[i].name_len == n && !memcmp(m->entries[i].name, name, n)) return &m->entries[i];
    return NULL;
}

/* Bytes copied per write while saving. */
#define SAVE_CHUNK (1 << 20)

/* An adapted tensor's place in the weight file: saving writes the file front to back
 * (no seeking, so no file offsets wider than long are needed). */
typedef struct save_patch { uint64_t offset, nbytes; int param; } save_patch;

static int save_patch_cmp(const void *a, const void *b)
{
    uint64_t x = ((const save_patch *)a)->offset, y = ((const save_patch *)b)->offset;
    return (x > y) - (x < y);
}

/* Writes n bytes in chunks; returns 1 on success. */
static int write_bytes(FILE *f, const unsigned char *p, uint64_t n)
{
    while (n > 0) {
        size_t k = n < SAVE_CHUNK ? (size_t)n : SAVE_CHUNK;
        if (fwrite(p, 1, k, f) != k) return 0;
        p += k;
        n -= k;
    }
    return 1;
}

int loupe_trainer_save(const loupe_trainer *t, const char *path, char *err, size_t errsize)
{
    char tmp[1024];
    FILE *f;
    size_t most = 0;
    uint64_t pos = 0;
    float *buf;
    save_patch *patches;
    int p, i, n = 0, ok = 1;
    if (!t || !path) return fail(err, errsize, "saving needs a trainer and a path");
    if (strlen(path) + 5 > sizeof tmp) return fail(err, errsize, "%s: path too long", path);
    for (p = 0; p < t->n_params; p++) { /* the trained tensors are written over the file's own */
        const tensor_entry *e = find_entry(t->m, t->params[p].name);
        if (e && e->dtype != DTYPE_F32)
            return fail(err, errsize, "%s: saving a trained model needs an F32 weight file (%s is %s; convert with --dtype f32)",
                        t->m->path, t->params[p].name, dtype_names[e->dtype]);
    }
    for (p = 0; p < t->n_params; p++) most = t->params[p].numel > most ? t->params[p].numel : most;
    buf = malloc(most * sizeof *buf);
    patches = malloc((size_t)t->n_params * sizeof *patches + 1); /* + 1: never malloc(0) */
    if (!buf || !patches) { free(buf); free(patches); return fail(err, errsize, "out of memory"); }
    /* the model's file as it is, with each segmentor tensor replaced by the adapted one */
    for (p = 0; p < t->n_params; p++) {
        const train_param *tp = &t->params[p];
        for (i = 0; i < t->m->n_entries; i++) {
            const tensor_entry *e = &t->m->entries[i];
            if ((size_t)e->name_len != strlen(tp->name) || memcmp(e->name, tp->name, (size_t)e->name_len)) continue;
            ok = ok && e->nbytes == tp->numel * sizeof *buf;
            patches[n].offset = e->offset;
            patches[n].nbytes = e->nbytes;
            patches[n++].param = p;
            break;
        }
    }
    qsort(patches, (size_t)n, sizeof *patches, save_patch_cmp);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    f = ok ? fopen(tmp, "wb") : NULL;
    if (!f) {
        free(buf);
        free(patches);
        return ok ? fail(err, errsize, "%s: cannot create: %s", tmp, strerror(errno))
                  : fail(err, errsize, "%s: an adapted tensor does not match the model's file", path);
    }
    for (i = 0; ok && i < n; i++) {
        const train_param *tp = &t->params[patches[i].param];
        param_to_upstream(tp, t->param + tp->offset, buf);
        ok = write_bytes(f, t->m->data + pos, patches[i].offset - pos) &&
             fwrite(buf, sizeof *buf, tp->numel, f) == tp->numel;
        pos = patches[i].offset + patches[i].nbytes;
    }
    ok = ok && write_bytes(f, t->m->data + pos, t->m->size - pos);
    free(buf);
    free(patches);
    if (fclose(f) != 0) ok = 0;
    if (!ok || replace_file(tmp, path) != 0) {
        remove(tmp);
        return fail(err, errsize, "%s: cannot write the adapted weight file", path);
    }
    return 0;
}

/* Training state file: "LOUPESTA", version, stage, tensor count, value count, a
 * FNV-1a hash of the tensor names and sizes, step count, random-stream position, the
 * caller's byte count; then the caller's bytes, AdamW's first and second moments
 * (float32, little-endian as the host writes them: the file is checked by its size and
 * hash, and is meant for the machine that wrote it). */
#define STATE_MAGIC "LOUPESTA"
#define STATE_VERSION 1u
#define STATE_HEADER_WORDS 8

static uint64_t state_signature(const loupe_trainer *t)
{
    uint64_t h = 0xCBF29CE484222325ull;
    int p, d;
    for (p = 0; p < t->n_params; p++) {
        const unsigned char *c = (const unsigned char *)t->params[p].name;
        for (; *c; c++) h = (h ^ *c) * 0x100000001B3ull;
        for (d = 0; d < MAX_TENSOR_DIMS; d++) h = (h ^ (uint64_t)(unsigned)t->params[p].dims[d]) * 0x100000001B3ull;
    }
    return h;
}

int loupe_trainer_save_state(const loupe_trainer *t, const char *path, const void *user, size_t user_size,
                             char *err, size_t errsize)
{
    char tmp[1024];
    uint64_t hdr[STATE_HEADER_WORDS];
    FILE *f;
    int ok;
    if (!t || !path || (user_size && !user)) return fail(err, errsize, "saving a training state needs a trainer and a path");
    if (strlen(path) + 5 > sizeof tmp) return fail(err, errsize, "%s: path too long", path);
    hdr[0] = STATE_VERSION;
    hdr[1] = (uint64_t)t->opt.stage;
    hdr[2] = (uint64_t)t->n_params;
    hdr[3] = (uint64_t)t->n_floats;
    hdr[4] = state_signature(t);
    hdr[5] = (uint64_t)t->steps;
    hdr[6] = t->rng_position;
    hdr[7] = (uint64_t)user_size;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if (!(f = fopen(tmp, "wb"))) return fail(err, errsize, "%s: cannot create: %s", tmp, strerror(errno));
    ok = fwrite(STATE_MAGIC, 1, 8, f) == 8 && fwrite(hdr, sizeof hdr[0], STATE_HEADER_WORDS, f) == STATE_HEADER_WORDS &&
         (!user_size || fwrite(user, 1, user_size, f) == user_size) &&
         fwrite(t->adam_m, sizeof *t->adam_m, t->n_floats, f) == t->n_floats &&
         fwrite(t->adam_v, sizeof *t->adam_v, t->n_floats, f) == t->n_floats;
    if (fclose(f) != 0) ok = 0;
    if (!ok || replace_file(tmp, path) != 0) {
        remove(tmp);
        return fail(err, errsize, "%s: cannot write the training state", path);
    }
    return 0;
}

int loupe_trainer_load_state(loupe_trainer *t, const char *path, void *user, size_t user_size,
                             char *err, size_t errsize)
{
    uint64_t hdr[STATE_HEADER_WORDS];
    char magic[8];
    FILE *f;
    int ok;
    if (!t || !path || (user_size && !user)) return fail(err, errsize, "loading a training state needs a trainer and a path");
    if (!(f = fopen(path, "rb"))) return fail(err, errsize, "%s: cannot open: %s", path, strerror(errno));
    ok = fread(magic, 1, 8, f) == 8 && !memcmp(magic, STATE_MAGIC, 8) &&
         fread(hdr, sizeof hdr[0], STATE_HEADER_WORDS, f) == STATE_HEADER_WORDS;
    if (!ok || hdr[0] != STATE_VERSION) {
        fclose(f);
        return fail(err, errsize, "%s: not a loupe training state (or of another version)", path);
    }
    if (hdr[1] != (uint64_t)t->opt.stage || hdr[2] != (uint64_t)t->n_params || hdr[3] != (uint64_t)t->n_floats ||
        hdr[4] != state_signature(t) || hdr[7] != (uint64_t)user_size) {
        fclose(f);
        return fail(err, errsize, "%s: the training state belongs to another stage, model or set of trained tensors", path);
    }
    ok = (!user_size || fread(user, 1, user_size, f) == user_size) &&
         fread(t->adam_m, sizeof *t->adam_m, t->n_floats, f) == t->n_floats &&
         fread(t->adam_v, sizeof *t->adam_v, t->n_floats, f) == t->n_floats && fgetc(f) == EOF;
    fclose(f);
    if (!ok) {
        zero_floats(t->adam_m, t->n_floats);
        zero_floats(t->adam_v, t->n_floats);
        return fail(err, errsize, "%s: the training state is truncated or too long", path);
    }
    t->steps = (long)hdr[5];
    t->rng_position = hdr[6];
    zero_floats(t->grad, t->n_floats);
    return 0;
}

int loupe_tta_save(const loupe_trainer *t, const char *path, char *err, size_t errsize)
{
    return loupe_trainer_save(t, path, err, errsize);
}

/* ========================================================================== */
/* 9. Random initialisation: upstream's from-scratch weights (loupe init)     */
/* ========================================================================== */
/* loupe_init_weights writes a complete weight file for any configuration (the config
 * format of tools/convert.py), every tensor drawn from the distribution upstream's
 * from-scratch construction gives it: `LoupeModel(config)` builds every module (PyTorch
 * default initialisation in the constructors), then `post_init()` applies
 * `LoupePreTrainedModel._init_weights` to every module, children before parents
 * (transformers' `smart_apply`), so a parent's rule overrides its children's.
 *
 * Rules, first match wins (W width, g grid, F feature size; std 0.02 =
 * config.initializer_range, xgain 1.0 = mask2former init_xavier_std; U(+-b) uniform;
 * xavier(gain) = U(+-gain sqrt(6 / (fan_in + fan_out))) with PyTorch's fans,
 * fan_in = dims[1] x receptive field, fan_out = dims[0] x receptive field):
 *
 *  tensor                                          value                     upstream function
 *  backbone.class_embedding [W]                    N(0, W^-1/2)              VisionTransformer.init_tensors
 *  backbone.positional_embedding [1+g^2][W]        N(0, W^-1/2)              VisionTransformer.init_tensors
 *  backbone.conv1.weight                           N(0, std)                 _init_weights nn.Conv2d branch
 *  backbone.*.attn.in_proj_weight (blocks)         xavier(1)                 SelfAttention.init_tensors
 *  backbone.*.attn.in_proj_bias, out_proj.bias     0                         SelfAttention.init_tensors
 *  backbone.attn_pool.attn.in_proj_weight          xavier(1)                 nn.MultiheadAttention._reset_parameters
 *  backbone.attn_pool.attn.in_proj_bias            0                         nn.MultiheadAttention._reset_parameters
 *  backbone.attn_pool.probe [1][1][W]              N(0, 1)                   AttentionPooling.__init__ (torch.randn)
 *  backbone *.out_proj, *.mlp.c_fc/c_proj .weight  N(0, std)                 _init_weights nn.Linear branch
 *  backbone *.out_proj, *.mlp.c_fc/c_proj .bias    0                         _init_weights nn.Linear branch
 *  every LayerNorm / LayerNorm2d / GroupNorm       weight 1, bias 0          nn.LayerNorm/GroupNorm.reset_parameters
 *  classifier.*.layers.i.weight [out][in]          U(+-1/sqrt(in))           LoupeClsHead.init_tensors -> nn.Linear.reset_parameters
 *  classifier.*.layers.i.bias                      U(+-1/sqrt(in))           LoupeClsHead.init_tensors -> nn.Linear.reset_parameters
 *  classifier.fuser.fuse.weight [1][1+g^2]         1 / (1+g^2)               FuseHead.init_tensors
 *  segmentor.fpn.*.conv1.weight [W][W][2][2]       U(+-1/sqrt(4W))           ConvTranspose2d: _ConvNd.reset_parameters (no branch matches)
 *  segmentor.fpn.*.conv1.bias                      U(+-1/sqrt(4W))           _ConvNd.reset_parameters
 *  segmentor.fpn.*.conv2.weight [W][1][3][3]       N(0, std)                 _init_weights nn.Conv2d branch
 *  segmentor.label_embedding.{0,1} [F]             N(0, std)                 LoupeSegmentor.__init__ (randn * initializer_range)
 *  segmentor.pixel_decoder.level_embed [3][F]      0                         _init_weights PixelDecoder branch (normal_, std=0)
 *  segmentor.pixel_decoder.* with >= 2 dims        xavier(1)                 _init_weights PixelDecoder branch (also
 *    (input projections, sampling_offsets,                                     PixelDecoderConditionalEncoder's); it runs
 *    attention_weights, value/output_proj, fc1,                                after the deformable-attention branch and
 *    fc2, cross_attn, mask_projection,                                         so replaces its zero sampling_offsets and
 *    adapter_1, layer_1 weights)                                               attention_weights weights, as in transformers
 *  ...encoder.layers.i.self_attn.sampling_offsets.bias  grid (below)         _init_weights deformable-attention branch
 *  ...self_attn.{attention_weights,value_proj,output_proj}.bias  0           _init_weights deformable-attention branch
 *  ...cross_attn.in_proj_bias                      0                         nn.MultiheadAttention._reset_parameters
 *  other pixel_decoder biases (fc1, fc2, cross_attn.out_proj, input
 *    projections, mask_projection)                 0                         _init_weights nn.Linear / nn.Conv2d branch
 *  ...mask2former_decoder.queries_embedder/queries_features/level_embed .weight
 *                                                  N(0, std)                 _init_weights nn.Embedding branch
 *  ...decoder.layers.i.* with >= 2 dims            xavier(xgain)             _init_weights Mask2FormerMaskedAttentionDecoderLayer branch
 *  ...decoder.layers.i.*.bias, cross_attn.in_proj_bias  0                    nn.Linear branch / MHA._reset_parameters
 *  ...mask_predictor.mask_embedder.i.0.weight      N(0, std)                 _init_weights nn.Linear branch
 *  ...mask_predictor.mask_embedder.i.0.bias        0                         _init_weights nn.Linear branch
 *  segmentor.class_predictor.weight / .bias        N(0, std) / 0             _init_weights nn.Linear branch
 *
 * The sampling-offset grid (deformable-attention branch): for head h of H, theta_h =
 * float32(h) * float32(2 pi / H) in float32, (c, s) = (cos, sin)(theta_h) rounded to
 * float32, divided by max(|c|, |s|) in float32; level l, point p, coordinate k of the
 * bias [H][levels][points][2] is that value times (p + 1). cos and sin are our own
 * series (init_cos_sin), correctly rounded to float32 but for ties: PyTorch's float32
 * cos/sin may differ from it by one ulp (e.g. -4.371139e-08 for cos(float32(pi/2))).
 *
 * Random numbers (a counter-based generator, so every tensor has its own stream and a
 * value does not depend on the order of tensors or on threads):
 *   key(name)   = FNV-1a-64(name) XOR (seed * 0x9E3779B97F4A7C15)
 *   x_i         = splitmix64 finaliser of (key + (i + 1) * 0x9E3779B97F4A7C15), i = 0, 1, ...
 *                 the element index in C order (all arithmetic mod 2^64)
 *   u_i         = ((x_i >> 12) + 0.5) / 2^52, exactly, in (0, 1)
 *   uniform     U(+-b): b * (2 u_i - 1)
 *   normal      N(m, s): m + s * z_i, z_i = inverse normal CDF of u_i by Wichura's
 *               AS241 (PPND16, relative accuracy about 1e-16)
 * each computed in double and rounded once to float32. The natural logarithm AS241 needs
 * in the tails is our own (init_log: frexp and an atanh series), so the whole generator
 * uses only +, -, *, /, sqrt and frexp: the same bits on every IEEE-754 platform that
 * evaluates double expressions in double (FLT_EVAL_METHOD 0: x86-64, SSE2, aarch64;
 * x87's 80-bit intermediates could move a value by one float32 ulp in rare ties). */

#define INIT_GOLDEN 0x9E3779B97F4A7C15ull
#define INIT_STD 0.02        /* LoupeConfig.initializer_range (configs/model/base.yaml) */
#define INIT_XAVIER_GAIN 1.0 /* Mask2FormerConfig.init_xavier_std */
#define INIT_N_HPARAMS 40

enum { INIT_NORMAL, INIT_UNIFORM, INIT_CONST, INIT_GRID, INIT_HIGHPASS };

/* loupe init --highpass: each high-pass filter of the patch embedding has this L2 norm
 * (a N(0, 0.02) filter of 3 x 14 x 14 values has about 0.49). */
#define INIT_HIGHPASS_NORM 2.0

/* One tensor of the file: name, shape, and its rule (a = mean / bound / value, b = std). */
typedef struct init_tensor {
    char name[160];
    int ndim, dims[MAX_TENSOR_DIMS];
    int rule;
    double a, b;
    int matrix; /* stored as --dtype (a weight matrix, README "Smaller weight files") */
    int from_backbone;
} init_tensor;

/* splitmix64's output function. */
static uint64_t init_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The stream key of a tensor: FNV-1a of its name mixed with the seed. */
static uint64_t init_key(const char *name, uint64_t seed)
{
    uint64_t h = 0xCBF29CE484222325ull;
    for (; *name; name++) h = (h ^ (unsigned char)*name) * 0x100000001B3ull;
    return h ^ (seed * INIT_GOLDEN);
}

/* Uniform number i of a stream, in (0, 1), a multiple of 2^-53. */
static double init_uniform(uint64_t key, uint64_t i)
{
    uint64_t z = init_mix64(key + (i + 1) * INIT_GOLDEN);
    return ((double)(z >> 12) + 0.5) * (1.0 / 4503599627370496.0);
}

/* Natural logarithm of a positive finite x with +, -, *, / only (after frexp, which is
 * exact): x = m 2^e, m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m-1)/(m+1)) as a series
 * (|s| <= 0.172, terms to s^39), ln 2 split in two parts (fdlibm's). */
static double init_log(double x)
{
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    int e, k;
    double m = frexp(x, &e), s, s2, p = 0.0;
    if (m < LOUPE_SQRT1_2) { m *= 2.0; e--; }
    s = (m - 1.0) / (m + 1.0);
    s2 = s * s;
    for (k = 19; k >= 0; k--) p = 1.0 / (double)(2 * k + 1) + s2 * p;
    return (double)e * ln2_hi + ((double)e * ln2_lo + 2.0 * s * p);
}

/* Inverse of the standard normal CDF: Wichura's algorithm AS241 (PPND16). */
static double init_normal_quantile(double u)
{
    static const double a[8] = {3.3871328727963666080e0, 1.3314166789178437745e+2, 1.9715909503065514427e+3,
                                1.3731693765509461125e+4, 4.5921953931549871457e+4, 6.7265770927008700853e+4,
                                3.3430575583588128105e+4, 2.5090809287301226727e+3};
    static const double b[8] = {1.0, 4.2313330701600911252e+1, 6.8718700749205790830e+2, 5.3941960214247511077e+3,
                                2.1213794301586595867e+4, 3.9307895800092710610e+4, 2.8729085735721942674e+4,
                                5.2264952788528545610e+3};
    static const double c[8] = {1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0,
                                3.64784832476320460504e0, 1.27045825245236838258e0, 2.41780725177450611770e-1,
                                2.27238449892691845833e-2, 7.74545014278341407640e-4};
    static const double d[8] = {1.0, 2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1,
                                1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4,
                                1.05075007164441684324e-9};
    static const double e[8] = {6.65790464350110377720e0, 5.46378491116411436990e0, 1.78482653991729133580e0,
                                2.96560571828504891230e-1, 2.65321895265761230930e-2, 1.24266094738807843860e-3,
                                2.71155556874348757815e-5, 2.01033439929228813265e-7};
    static const double f[8] = {1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1, 1.48753612908506148525e-2,
                                7.86869131145613259100e-4, 1.84631831751005468180e-5, 1.42151175831644588870e-7,
                                2.04426310338993978564e-15};
    const double *num, *den;
    double q = u - 0.5, r, x, pn = 0.0, pd = 0.0;
    int k;
    if (fabs(q) <= 0.425) {
        r = 0.180625 - q * q;
        for (k = 7; k >= 0; k--) { pn = pn * r + a[k]; pd = pd * r + b[k]; }
        return q * pn / pd;
    }
    r = sqrt(-init_log(q < 0 ? u : 1.0 - u));
    if (r <= 5.0) { r -= 1.6; num = c; den = d; }
    else { r -= 5.0; num = e; den = f; }
    for (k = 7; k >= 0; k--) { pn = pn * r + num[k]; pd = pd * r + den[k]; }
    x = pn / pd;
    return q < 0 ? -x : x;
}

/* cos and sin of a float32 angle in [0, 2 pi], rounded to float32: Cody-Waite reduction
 * by pi/2 (fdlibm's two-part constant) and Taylor series on |r| <= pi/4. */
static void init_cos_sin(float theta, float *cs, float *sn)
{
    const double pio2_1 = 1.57079632673412561417e+00, pio2_1t = 6.07710050650619224932e-11;
    double x = (double)theta, r, r2, ts, tc, s = 0.0, c = 0.0, cq, sq;
    int k = (int)(x / (LOUPE_PI / 2) + 0.5), j;
    r = (x - k * pio2_1) - k * pio2_1t;
    r2 = r * r;
    ts = r;
    tc = 1.0;
    for (j = 1; j <= 14; j++) {
        s += ts;
        c += tc;
        ts *= -r2 / (double)((2 * j) * (2 * j + 1));
        tc *= -r2 / (double)((2 * j - 1) * (2 * j));
    }
    switch (k & 3) {
    case 0: cq = c; sq = s; break;
    case 1: cq = -s; sq = c; break;
    case 2: cq = -c; sq = -s; break;
    default: cq = s; sq = -c; break;
    }
    *cs = (float)cq;
    *sn = (float)sq;
}

/* The sampling_offsets bias [heads][levels][points][2] of the deformable attention. */
static void init_offset_grid(float *out, int heads, int levels, int points)
{
    int h, l, p;
    for (h = 0; h < heads; h++) {
        float theta = (float)((double)(float)h * (double)(float)(2.0 * LOUPE_PI / heads)), c, s, mx;
        init_cos_sin(theta, &c, &s);
        mx = fabsf(c) > fabsf(s) ? fabsf(c) : fabsf(s);
        c = (float)((double)c / mx);
        s = (float)((double)s / mx);
        for (l = 0; l < levels; l++)
            for (p = 0; p < points; p++) {
                float *o = out + (((size_t)h * levels + l) * points + p) * 2;
                o[0] = (float)((double)c * (p + 1));
                o[1] = (float)((double)s * (p + 1));
            }
    }
}

/* loupe init --highpass F (not upstream; the demo model's stem, weights/README.md): the
 * patch embedding [W][3][P][P] drawn N(0, b) as usual, then its first round(F W) filters
 * replaced by high-pass ones: a random (P-2) x (P-2) field r fully convolved with the
 * 3 x 3 Laplacian [0 1 0; 1 -4 1; 0 1 0] gives a P x P kernel h, the same h in every
 * colour channel times a random colour weight, the filter scaled to INIT_HIGHPASS_NORM.
 * Because the Laplacian kills affine functions, such a filter answers exactly 0 to any
 * patch whose channels are affine in x and y (flat colour, smooth gradients): what is
 * left is texture, noise, blur and seams, the traces a from-scratch ViT otherwise never
 * finds (its LayerNorms divide them away next to a patch's colour). */
static void init_highpass(const init_tensor *t, uint64_t key, int P, float *x, size_t n)
{
    static const float lap[3][3] = {{0, 1, 0}, {1, -4, 1}, {0, 1, 0}};
    int W = t->dims[0], nh = P >= 3 ? (int)(t->a * W + 0.5) : 0, R = P - 2, f, i, j, ch;
    size_t K = (size_t)3 * P * P, PP = (size_t)P * P, k;
    for (k = 0; k < n; k++) x[k] = (float)(t->b * init_normal_quantile(init_uniform(key, (uint64_t)k)));
    for (f = 0; f < nh; f++) {
        uint64_t base = (uint64_t)n + (uint64_t)f * (K + 3); /* draws past the plain filters' */
        float *h = x + (size_t)f * K; /* h built in channel 0's place, copied out last */
        double mix[3], hh = 0.0, scale;
        for (k = 0; k < PP; k++) h[k] = 0.0f;
        for (i = 0; i < R; i++)
            for (j = 0; j < R; j++) {
                float r = (float)init_normal_quantile(init_uniform(key, base + 3 + (uint64_t)i * R + j));
                int dy, dx;
                for (dy = 0; dy < 3; dy++)
                    for (dx = 0; dx < 3; dx++) h[(i + dy) * P + j + dx] += lap[dy][dx] * r;
            }
        for (k = 0; k < PP; k++) hh += (double)h[k] * h[k];
        for (ch = 0; ch < 3; ch++) mix[ch] = init_normal_quantile(init_uniform(key, base + (uint64_t)ch));
        scale = INIT_HIGHPASS_NORM / sqrt(hh * (mix[0] * mix[0] + mix[1] * mix[1] + mix[2] * mix[2]));
        for (ch = 2; ch >= 0; ch--)
            for (k = 0; k < PP; k++) h[(size_t)ch * PP + k] = (float)(mix[ch] * scale * h[k]);
    }
}

/* Fills n values of a tensor by its rule. */
static void init_fill(const init_tensor *t, uint64_t seed, const loupe_config *c, float *x, size_t n)
{
    uint64_t key = init_key(t->name, seed);
    long i, nn = (long)n;
    if (t->rule == INIT_GRID) { init_offset_grid(x, c->m2f_heads, c->deform_levels, c->deform_points); return; }
    if (t->rule == INIT_HIGHPASS) { init_highpass(t, key, c->patch_size, x, n); return; }
    if (t->rule == INIT_CONST) {
        for (i = 0; i < nn; i++) x[i] = (float)t->a;
        return;
    }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (nn > 65536)
#endif
    for (i = 0; i < nn; i++) {
        double u = init_uniform(key, (uint64_t)i);
        x[i] = t->rule == INIT_UNIFORM ? (float)(t->a * (2.0 * u - 1.0)) : (float)(t->a + t->b * init_normal_quantile(u));
    }
}

/* ---- The config file: a small JSON reader ---- */

enum { JSON_NULL, JSON_FALSE, JSON_TRUE, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };

typedef struct json_value {
    int type, is_int; /* is_int: a number written without fraction or exponent */
    double num;
    char *str;        /* string value */
    int n;            /* items of an array or members of an object */
    struct json_value *items;
    char **keys;      /* member names of an object */
} json_value;

typedef struct json_parser {
    const char *p, *start;
    int depth;
    char *err;
    size_t errsize;
    const char *path;
} json_parser;

static void json_free(json_value *v)
{
    int i;
    if (!v) return;
    for (i = 0; i < v->n; i++) {
        json_free(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    free(v->str);
}

static int json_error(json_parser *j, const char *what)
{
    int line = 1, col = 1;
    const char *q;
    for (q = j->start; q < j->p; q++) {
        if (*q == '\n') { line++; col = 1; } else col++;
    }
    return fail(j->err, j->errsize, "%s: bad JSON at line %d, column %d: %s", j->path, line, col, what);
}

static void json_space(json_parser *j)
{
    while (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r') j->p++;
}

/* A string (after its opening quote); escapes decoded, \u above ASCII kept as '?'. */
static int json_string(json_parser *j, char **out)
{
    size_t len = 0, cap = 16;
    char *s = malloc(cap);
    if (!s) return fail(j->err, j->errsize, "%s: out of memory", j->path);
    for (;;) {
        int ch = (unsigned char)*j->p;
        if (ch == '"') { j->p++; break; }
        if (ch == 0 || ch < 0x20) { free(s); return json_error(j, "unterminated string"); }
        if (ch == '\\') {
            j->p++;
            switch (*j->p) {
            case '"': ch = '"'; break;
            case '\\': ch = '\\'; break;
            case '/': ch = '/'; break;
            case 'b': ch = '\b'; break;
            case 'f': ch = '\f'; break;
            case 'n': ch = '\n'; break;
            case 'r': ch = '\r'; break;
            case 't': ch = '\t'; break;
            case 'u': {
                int k, v = 0;
                for (k = 1; k <= 4; k++) {
                    int h = (unsigned char)j->p[k];
                    if (!isxdigit(h)) { free(s); return json_error(j, "bad \\u escape"); }
                    v = v * 16 + (isdigit(h) ? h - '0' : (h | 32) - 'a' + 10);
                }
                j->p += 4;
                ch = v < 0x80 ? v : '?';
                break;
            }
            default: free(s); return json_error(j, "bad escape in string");
            }
        }
        j->p++;
        if (len + 2 > cap) {
            char *ns = realloc(s, cap *= 2);
            if (!ns) { free(s); return fail(j->err, j->errsize, "%s: out of memory", j->path); }
            s = ns;
        }
        s[len++] = (char)ch;
    }
    s[len] = 0;
    *out = s;
    return 0;
}

static int json_parse_value(json_parser *j, json_value *v);

/* Appends one item (and key) to an array or object. */
static int json_push(json_parser *j, json_value *v, char *key)
{
    json_value *items = realloc(v->items, (size_t)(v->n + 1) * sizeof *items);
    if (!items) { free(key); return fail(j->err, j->errsize, "%s: out of memory", j->path); }
    v->items = items;
    memset(&v->items[v->n], 0, sizeof *items);
    if (v->type == JSON_OBJECT) {
        char **keys = realloc(v->keys, (size_t)(v->n + 1) * sizeof *keys);
        if (!keys) { free(key); return fail(j->err, j->errsize, "%s: out of memory", j->path); }
        v->keys = keys;
        v->keys[v->n] = key;
    }
    v->n++;
    return json_parse_value(j, &v->items[v->n - 1]);
}

static int json_parse_value(json_parser *j, json_value *v)
{
    const char *p;
    json_space(j);
    p = j->p;
    if (*p == '{' || *p == '[') {
        char close = *p == '{' ? '}' : ']';
        v->type = *p == '{' ? JSON_OBJECT : JSON_ARRAY;
        if (++j->depth > 64) return json_error(j, "nested too deeply");
        j->p++;
        json_space(j);
        if (*j->p == close) { j->p++; j->depth--; return 0; }
        for (;;) {
            char *key = NULL;
            json_space(j);
            if (v->type == JSON_OBJECT) {
                if (*j->p != '"') return json_error(j, "expected a member name in quotes");
                j->p++;
                if (json_string(j, &key)) return -1;
                json_space(j);
                if (*j->p != ':') { free(key); return json_error(j, "expected ':'"); }
                j->p++;
            }
            if (json_push(j, v, key)) return -1;
            json_space(j);
            if (*j->p == ',') { j->p++; continue; }
            if (*j->p == close) { j->p++; j->depth--; return 0; }
            return json_error(j, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
        }
    }
    if (*p == '"') {
        j->p++;
        v->type = JSON_STRING;
        return json_string(j, &v->str);
    }
    if (!strncmp(p, "true", 4)) { v->type = JSON_TRUE; j->p += 4; return 0; }
    if (!strncmp(p, "false", 5)) { v->type = JSON_FALSE; j->p += 5; return 0; }
    if (!strncmp(p, "null", 4)) { v->type = JSON_NULL; j->p += 4; return 0; }
    if (*p == '-' || isdigit((unsigned char)*p)) { /* -?(0|[1-9]d*)(.d+)?([eE][+-]?d+)? */
        char buf[64];
        const char *q = p + (*p == '-');
        v->is_int = 1;
        if (*q == '0') q++;
        else if (isdigit((unsigned char)*q)) while (isdigit((unsigned char)*q)) q++;
        else return json_error(j, "bad number");
        if (*q == '.') {
            v->is_int = 0;
            if (!isdigit((unsigned char)*++q)) return json_error(j, "bad number");
            while (isdigit((unsigned char)*q)) q++;
        }
        if (*q == 'e' || *q == 'E') {
            v->is_int = 0;
            q++;
            if (*q == '+' || *q == '-') q++;
            if (!isdigit((unsigned char)*q)) return json_error(j, "bad number");
            while (isdigit((unsigned char)*q)) q++;
        }
        if ((size_t)(q - p) >= sizeof buf) return json_error(j, "number too long");
        memcpy(buf, p, (size_t)(q - p));
        buf[q - p] = 0;
        v->type = JSON_NUMBER;
        v->num = strtod(buf, NULL);
        j->p = q;
        return 0;
    }
    return json_error(j, *p ? "unexpected character" : "unexpected end of file");
}

/* Reads and parses a whole JSON file (which must hold one object). */
static int json_load(const char *path, json_value *root, char *err, size_t errsize)
{
    FILE *f = fopen(path, "rb");
    char *text;
    size_t n = 0, cap = 1 << 16, got;
    json_parser j;
    memset(root, 0, sizeof *root);
    if (!f) return fail(err, errsize, "%s: cannot read config: %s", path, strerror(errno));
    if (!(text = malloc(cap))) { fclose(f); return fail(err, errsize, "%s: out of memory", path); }
    while ((got = fread(text + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (n + 1 == cap) {
            char *nt = cap > (1u << 26) ? NULL : realloc(text, cap * 2);
            if (!nt) { free(text); fclose(f); return fail(err, errsize, "%s: config file too large", path); }
            text = nt;
            cap *= 2;
        }
    }
    if (ferror(f)) { free(text); fclose(f); return fail(err, errsize, "%s: cannot read config: read error", path); }
    fclose(f);
    text[n] = 0;
    j.p = j.start = text;
    j.depth = 0;
    j.err = err;
    j.errsize = errsize;
    j.path = path;
    if (strlen(text) != n) { free(text); return fail(err, errsize, "%s: bad JSON: the file contains a NUL byte", path); }
    if (json_parse_value(&j, root)) { free(text); json_free(root); memset(root, 0, sizeof *root); return -1; }
    json_space(&j);
    if (*j.p) { json_error(&j, "text after the end of the JSON value"); free(text); json_free(root); return -1; }
    free(text);
    if (root->type != JSON_OBJECT) { json_free(root); memset(root, 0, sizeof *root); return fail(err, errsize, "%s: not a JSON object", path); }
    return 0;
}

/* Member key of an object (the last one when repeated, as Python's json), or NULL. */
static const json_value *json_get(const json_value *obj, const char *key)
{
    int i;
    if (!obj || obj->type != JSON_OBJECT) return NULL;
    for (i = obj->n - 1; i >= 0; i--)
        if (!strcmp(obj->keys[i], key)) return &obj->items[i];
    return NULL;
}

/* ---- The config: tools/convert.py's hparams_from_config in C ---- */

typedef struct init_cfg_reader {
    const json_value *root;
    const char *path;
    char *err;
    size_t errsize;
} init_cfg_reader;

static const char *json_type_name(const json_value *v)
{
    static const char *const names[] = {"null", "false", "true", "a number", "a string", "an array", "an object"};
    return names[v->type];
}

/* A short description of a value for messages: 64.5, "abc", true, an array, ... */
static const char *json_describe(const json_value *v, char *buf, size_t size)
{
    if (v->type == JSON_NUMBER) snprintf(buf, size, "%.17g", v->num);
    else if (v->type == JSON_STRING) snprintf(buf, size, "\"%.40s\"", v->str);
    else snprintf(buf, size, "%s", json_type_name(v));
    return buf;
}

/* section.key, which must exist (an error naming it otherwise). */
static const json_value *cfg_value(init_cfg_reader *r, const char *section, const char *key)
{
    const json_value *sec = json_get(r->root, section), *v = json_get(sec, key);
    if (!sec || sec->type != JSON_OBJECT) {
        fail(r->err, r->errsize, "%s: missing key %s.%s (no \"%s\" object)", r->path, section, key, section);
        return NULL;
    }
    if (!v) fail(r->err, r->errsize, "%s: missing key %s.%s", r->path, section, key);
    return v;
}

/* A positive integer (JSON integer literal), as convert.py requires. */
static int cfg_int(init_cfg_reader *r, const char *section, const char *key, int *out)
{
    const json_value *v = cfg_value(r, section, key);
    char buf[64];
    if (!v) return -1;
    if (v->type != JSON_NUMBER || !v->is_int || !(v->num >= 1 && v->num <= 2147483647.0))
        return fail(r->err, r->errsize, "%s: %s.%s must be a positive integer (got %s)", r->path, section, key,
                    json_describe(v, buf, sizeof buf));
    *out = (int)v->num;
    return 0;
}

/* A finite number (not a boolean). */
static int cfg_number(init_cfg_reader *r, const char *section, const char *key, double *out)
{
    const json_value *v = cfg_value(r, section, key);
    char buf[64];
    if (!v) return -1;
    if (v->type != JSON_NUMBER || !(v->num >= -DBL_MAX && v->num <= DBL_MAX))
        return fail(r->err, r->errsize, "%s: %s.%s must be a finite number (got %s)", r->path, section, key,
                    json_describe(v, buf, sizeof buf));
    *out = v->num;
    return 0;
}

/* A value that must be exactly `true`, `false` or `null` (type JSON_TRUE...). */
static int cfg_literal(init_cfg_reader *r, const char *section, const char *key, int type, const char *why)
{
    const json_value *v = cfg_value(r, section, key);
    char buf[64];
    if (!v) return -1;
    if (v->type != type) return fail(r->err, r->errsize, "%s: %s.%s must be %s (got %s)%s", r->path, section, key,
                                     type == JSON_TRUE ? "true" : type == JSON_FALSE ? "false" : "null",
                                     json_describe(v, buf, sizeof buf), why);
    return 0;
}

/* A string that must equal want. */
static int cfg_string(init_cfg_reader *r, const char *section, const char *key, const char *want)
{
    const json_value *v = cfg_value(r, section, key);
    char buf[64];
    if (!v) return -1;
    if (v->type != JSON_STRING || strcmp(v->str, want))
        return fail(r->err, r->errsize, "%s: %s.%s must be \"%s\" (got %s)", r->path, section, key, want,
                    json_describe(v, buf, sizeof buf));
    return 0;
}

/* An optional derived value (pe_derived.mlp_width, ...) must agree with the config. */
static int cfg_derived(init_cfg_reader *r, const char *section, const char *key, double want)
{
    const json_value *v = json_get(json_get(r->root, section), key);
    char buf[64];
    if (v && !(v->type == JSON_NUMBER && v->num == want))
        return fail(r->err, r->errsize, "%s: %s.%s is %s but the config implies %.17g", r->path, section, key,
                    json_describe(v, buf, sizeof buf), want);
    return 0;
}

/* An optional number with a default. */
static int cfg_optional(init_cfg_reader *r, const char *section, const char *key, double dflt, double *out)
{
    const json_value *v = json_get(json_get(r->root, section), key);
    *out = dflt;
    if (!v) return 0;
    if (v->type != JSON_NUMBER || !(v->num >= 0 && v->num < 1e6))
        return fail(r->err, r->errsize, "%s: %s.%s must be a non-negative number", r->path, section, key);
    *out = v->num;
    return 0;
}

typedef struct init_hparams {
    const char *names[INIT_N_HPARAMS];
    double values[INIT_N_HPARAMS];
    double std, xavier_gain;
} init_hparams;

/* Reads CONFIG into the header hyperparameters tools/convert.py writes (same names,
 * order and values) and checks it as convert.py does; one error sentence naming the key. */
static int init_read_config(const char *path, init_hparams *h, char *err, size_t errsize)
{
    json_value root;
    init_cfg_reader r;
    int S, P, W, layers, heads, pool_heads, cls_ratio, cls_layers, F, mask_f, hid, enc_ffn, enc_layers, dec_layers;
    int m2f_heads, dec_ffn, Q, labels, points, k, rc = -1;
    double mlp_ratio, fl[13];
    const json_value *v;
    static const char *const real_keys[13][2] = {
        {"mask2former", "no_object_weight"}, {"mask2former", "class_weight"}, {"mask2former", "mask_weight"},
        {"mask2former", "dice_weight"}, {"mask2former", "oversample_ratio"}, {"mask2former", "importance_sample_ratio"},
        {"loupe", "pixel_forge_weight"}, {"loupe", "pixel_poly_epsilon"}, {"loupe", "tversky_alpha"},
        {"loupe", "seg_loss_weight"}, {"mask2former", "common_stride"}, {"loupe", "cls_forge_weight"},
        {"loupe", "patch_forge_weight"}};
    if (json_load(path, &root, err, errsize)) return -1;
    r.root = &root;
    r.path = path;
    r.err = err;
    r.errsize = errsize;
    if (cfg_int(&r, "pe", "image_size", &S) || cfg_int(&r, "pe", "patch_size", &P) || cfg_int(&r, "pe", "width", &W) ||
        cfg_int(&r, "pe", "layers", &layers) || cfg_int(&r, "pe", "heads", &heads) ||
        cfg_int(&r, "pe", "attn_pooler_heads", &pool_heads) || cfg_number(&r, "pe", "mlp_ratio", &mlp_ratio) ||
        cfg_literal(&r, "pe", "output_dim", JSON_NULL, " (Loupe drops PE's projection)") ||
        cfg_literal(&r, "pe", "ls_init_value", JSON_NULL, " (layer scale is not supported)") ||
        cfg_literal(&r, "pe", "use_abs_posemb", JSON_TRUE, "") || cfg_literal(&r, "pe", "use_cls_token", JSON_TRUE, "") ||
        cfg_literal(&r, "pe", "use_rope2d", JSON_TRUE, "") || cfg_string(&r, "pe", "pool_type", "attn") ||
        cfg_literal(&r, "pe", "use_ln_pre", JSON_TRUE, "") || cfg_literal(&r, "pe", "use_ln_post", JSON_TRUE, "") ||
        cfg_string(&r, "loupe", "hidden_act", "gelu") || cfg_int(&r, "loupe", "cls_mlp_ratio", &cls_ratio) ||
        cfg_int(&r, "loupe", "cls_mlp_layers", &cls_layers) ||
        cfg_literal(&r, "loupe", "enable_patch_cls", JSON_TRUE, "") ||
        cfg_literal(&r, "loupe", "enable_cls_fusion", JSON_TRUE, "") ||
        cfg_literal(&r, "loupe", "enable_conditional_queries", JSON_TRUE, "") ||
        cfg_int(&r, "mask2former", "feature_size", &F) || cfg_int(&r, "mask2former", "mask_feature_size", &mask_f) ||
        cfg_int(&r, "mask2former", "hidden_dim", &hid) ||
        cfg_int(&r, "mask2former", "encoder_feedforward_dim", &enc_ffn) ||
        cfg_string(&r, "mask2former", "activation_function", "relu") ||
        cfg_int(&r, "mask2former", "encoder_layers", &enc_layers) ||
        cfg_int(&r, "mask2former", "decoder_layers", &dec_layers) ||
        cfg_int(&r, "mask2former", "num_attention_heads", &m2f_heads) ||
        cfg_int(&r, "mask2former", "dim_feedforward", &dec_ffn) ||
        cfg_literal(&r, "mask2former", "pre_norm", JSON_FALSE, "") ||
        cfg_literal(&r, "mask2former", "enforce_input_projection", JSON_FALSE, "") ||
        cfg_int(&r, "mask2former", "num_queries", &Q) || cfg_int(&r, "mask2former", "num_labels", &labels) ||
        cfg_int(&r, "mask2former", "train_num_points", &points))
        goto done;
    for (k = 0; k < 13; k++)
        if (cfg_number(&r, real_keys[k][0], real_keys[k][1], &fl[k])) goto done;
    if (!(fl[11] >= 0.0 && fl[11] <= 1.0 && fl[12] >= 0.0 && fl[12] <= 1.0)) {
        fail(err, errsize, "%s: loupe.cls_forge_weight and loupe.patch_forge_weight must be between 0 and 1", path);
        goto done;
    }
    if (!(v = cfg_value(&r, "mask2former", "feature_strides"))) goto done;
    if (fl[10] != 4 || v->type != JSON_ARRAY || v->n != 4 || v->items[0].type != JSON_NUMBER ||
        v->items[0].num != 4 || v->items[1].type != JSON_NUMBER || v->items[1].num != 8 ||
        v->items[2].type != JSON_NUMBER || v->items[2].num != 16 || v->items[3].type != JSON_NUMBER ||
        v->items[3].num != 32) {
        fail(err, errsize, "%s: mask2former.common_stride must be 4 and mask2former.feature_strides [4, 8, 16, 32]", path);
        goto done;
    }
    if (W % (4 * heads)) { fail(err, errsize, "%s: pe.width must be pe.heads x a multiple of 4 (2-D RoPE rotates pairs on two axes)", path); goto done; }
    if (W % pool_heads) { fail(err, errsize, "%s: pe.width is not divisible by pe.attn_pooler_heads", path); goto done; }
    if (S % (2 * P)) { fail(err, errsize, "%s: pe.image_size must be an even multiple of pe.patch_size (the FPN has a g/2 level)", path); goto done; }
    if (F != mask_f || F != hid) { fail(err, errsize, "%s: mask2former.feature_size, mask_feature_size and hidden_dim must be equal", path); goto done; }
    if (F % m2f_heads) { fail(err, errsize, "%s: mask2former.feature_size is not divisible by mask2former.num_attention_heads", path); goto done; }
    if (F % 32) { fail(err, errsize, "%s: mask2former.feature_size must be a multiple of 32 (GroupNorm groups)", path); goto done; }
    if (labels != 1) { fail(err, errsize, "%s: mask2former.num_labels must be 1 (Loupe's single 'forgery' label)", path); goto done; }
    if (!(mlp_ratio > 0 && (double)W * mlp_ratio < 2147483647.0) || (int)((double)W * mlp_ratio) < 1) {
        fail(err, errsize, "%s: pe.mlp_ratio must be a positive number", path);
        goto done;
    }
    if (cfg_derived(&r, "pe_derived", "mlp_width", (double)(int)((double)W * mlp_ratio)) ||
        cfg_derived(&r, "pe_derived", "attn_pool_mlp_width", 4.0 * W) || cfg_derived(&r, "pe_derived", "grid", S / P) ||
        cfg_derived(&r, "loupe", "cls_head_hidden", (double)W * cls_ratio) ||
        cfg_optional(&r, "loupe", "initializer_range", INIT_STD, &h->std) ||
        cfg_optional(&r, "mask2former", "init_xavier_std", INIT_XAVIER_GAIN, &h->xavier_gain))
        goto done;
    {
        /* convert.py's hparams list, in its order */
        const struct { const char *name; double value; } hp[INIT_N_HPARAMS] = {
            {"image_size", S}, {"patch_size", P}, {"width", W}, {"layers", layers}, {"heads", heads},
            {"mlp_width", (int)((double)W * mlp_ratio)}, {"pool_heads", pool_heads}, {"pool_mlp_width", 4.0 * W},
            {"rope_theta", 10000.0}, {"ln_eps", 1e-5}, {"cls_hidden", (double)W * cls_ratio},
            {"cls_layers", cls_layers}, {"fpn_ln_eps", 1e-6}, {"feature_size", F}, {"mask_feature_size", mask_f},
            {"hidden_dim", hid}, {"m2f_heads", m2f_heads}, {"enc_layers", enc_layers}, {"enc_ffn", enc_ffn},
            {"dec_layers", dec_layers}, {"dec_ffn", dec_ffn}, {"num_queries", Q}, {"num_labels", labels},
            {"gn_groups", 32}, {"gn_eps", 1e-5}, {"deform_levels", 3}, {"deform_points", 4},
            {"no_object_weight", fl[0]}, {"class_weight", fl[1]}, {"mask_weight", fl[2]}, {"dice_weight", fl[3]},
            {"train_num_points", points}, {"oversample_ratio", fl[4]}, {"importance_sample_ratio", fl[5]},
            {"pixel_forge_weight", fl[6]}, {"pixel_poly_epsilon", fl[7]}, {"tversky_alpha", fl[8]},
            {"seg_loss_weight", fl[9]}, {"cls_forge_weight", fl[11]}, {"patch_forge_weight", fl[12]},
        };
        for (k = 0; k < INIT_N_HPARAMS; k++) {
            h->names[k] = hp[k].name;
            h->values[k] = hp[k].value;
        }
    }
    rc = 0;
done:
    json_free(&root);
    return rc;
}

/* ---- The tensor list: tools/convert.py's required_tensors, each with its rule ---- */

typedef struct init_list {
    init_tensor *t;
    int n, cap, failed;
    double std, xgain;
} init_list;

static init_tensor *init_add(init_list *l, int rule, double a, double b, int d0, int d1, int d2, int d3,
                             const char *fmt, ...)
{
    init_tensor *t;
    va_list ap;
    if (l->failed) return NULL;
    if (l->n == l->cap) {
        init_tensor *nt = realloc(l->t, (size_t)(l->cap = l->cap ? 2 * l->cap : 256) * sizeof *nt);
        if (!nt) { l->failed = 1; return NULL; }
        l->t = nt;
    }
    t = &l->t[l->n++];
    memset(t, 0, sizeof *t);
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->dims[0] = d0; t->dims[1] = d1; t->dims[2] = d2; t->dims[3] = d3;
    t->ndim = d3 ? 4 : d2 ? 3 : d1 ? 2 : 1;
    t->rule = rule;
    t->a = a;
    t->b = b;
    {   /* convert.py's is_weight_matrix */
        size_t len = strlen(t->name);
        static const char *const keep[] = {".conv2.weight", "fuser.fuse.weight", "queries_embedder.weight",
                                           "queries_features.weight", "level_embed.weight"};
        int k, ends = len > 7 && !strcmp(t->name + len - 7, ".weight");
        ends = ends || (len >= 14 && !strcmp(t->name + len - 14, "in_proj_weight"));
        for (k = 0; k < 5; k++) {
            size_t kl = strlen(keep[k]);
            if (len >= kl && !strcmp(t->name + len - kl, keep[k])) ends = 0;
        }
        t->matrix = t->ndim >= 2 && ends;
    }
    t->from_backbone = !strncmp(t->name, "backbone.", 9);
    return t;
}

/* Shorthands. fan_in/fan_out as torch.nn.init._calculate_fan_in_and_fan_out. */
static double init_xavier_bound(double gain, int d0, int d1, int receptive)
{
    double fan_in = (double)d1 * receptive, fan_out = (double)d0 * receptive;
    return gain * sqrt(2.0 / (fan_in + fan_out)) * sqrt(3.0);
}

#define INIT_N(std) INIT_NORMAL, 0.0, (std)
#define INIT_ZERO INIT_CONST, 0.0, 0.0
#define INIT_ONE INIT_CONST, 1.0, 0.0
#define INIT_XAVIER(gain, d0, d1, r) INIT_UNIFORM, init_xavier_bound(gain, d0, d1, r), 0.0

static void init_norm(init_list *l, int n, const char *prefix)
{
    init_add(l, INIT_ONE, n, 0, 0, 0, "%s.weight", prefix);
    init_add(l, INIT_ZERO, n, 0, 0, 0, "%s.bias", prefix);
}

/* nn.Linear [out][in] + bias: weight by (rule, a, b), bias zero. */
static void init_linear(init_list *l, int rule, double a, double b, int out, int in, const char *prefix)
{
    init_add(l, rule, a, b, out, in, 0, 0, "%s.weight", prefix);
    init_add(l, INIT_ZERO, out, 0, 0, 0, "%s.bias", prefix);
}

/* nn.MultiheadAttention (or PE's SelfAttention): xavier in_proj, zero biases, out_proj
 * weight by (rule, a, b). */
static void init_mha(init_list *l, double in_gain, int rule, double a, double b, int e, const char *prefix)
{
    char p[200];
    init_add(l, INIT_XAVIER(in_gain, 3 * e, e, 1), 3 * e, e, 0, 0, "%s.in_proj_weight", prefix);
    init_add(l, INIT_ZERO, 3 * e, 0, 0, 0, "%s.in_proj_bias", prefix);
    snprintf(p, sizeof p, "%s.out_proj", prefix);
    init_linear(l, rule, a, b, e, e, p);
}

static void init_cls_head(init_list *l, const char *prefix, int in, int hidden, int layers)
{
    int i, width = in;
    for (i = 0; i < layers; i++) {
        int out = i == layers - 1 ? 1 : hidden;
        double bound = 1.0 / sqrt((double)width); /* nn.Linear.reset_parameters: kaiming_uniform(a=sqrt(5)) */
        init_add(l, INIT_UNIFORM, bound, 0.0, out, width, 0, 0, "%s.layers.%d.weight", prefix, i);
        init_add(l, INIT_UNIFORM, bound, 0.0, out, 0, 0, 0, "%s.layers.%d.bias", prefix, i);
        width = hidden;
    }
}

static void init_scale_block(init_list *l, const char *prefix, int W, int upsample)
{
    char p[200];
    if (upsample) { /* ConvTranspose2d [in][out][2][2]: fan_in = out x 4 */
        double bound = 1.0 / sqrt(4.0 * W);
        init_add(l, INIT_UNIFORM, bound, 0.0, W, W, 2, 2, "%s.conv1.weight", prefix);
        init_add(l, INIT_UNIFORM, bound, 0.0, W, 0, 0, 0, "%s.conv1.bias", prefix);
    }
    init_add(l, INIT_N(l->std), W, 1, 3, 3, "%s.conv2.weight", prefix);
    snprintf(p, sizeof p, "%s.norm", prefix);
    init_norm(l, W, p);
}

/* Every tensor of the weight file in convert.py's order, with its rule (table above). */
static int init_tensor_list(const loupe_config *c, const init_hparams *h, double highpass, init_list *l)
{
    int W = c->width, g = c->grid, F = c->feature_size, i, k;
    int n_off = c->m2f_heads * c->deform_levels * c->deform_points;
    double pe_scale = 1.0 / sqrt((double)W), x1 = 1.0, xd = h->xavier_gain;
    char p[200];
    static const char *const dec_proj[4] = {"k_proj", "v_proj", "q_proj", "out_proj"};
    memset(l, 0, sizeof *l);
    l->std = h->std;
    l->xgain = xd;
    /* backbone */
    init_add(l, INIT_N(pe_scale), W, 0, 0, 0, "backbone.class_embedding");
    init_add(l, INIT_N(pe_scale), 1 + g * g, W, 0, 0, "backbone.positional_embedding");
    if (highpass > 0.0) init_add(l, INIT_HIGHPASS, highpass, l->std, W, 3, c->patch_size, c->patch_size, "backbone.conv1.weight");
    else init_add(l, INIT_N(l->std), W, 3, c->patch_size, c->patch_size, "backbone.conv1.weight");
    init_norm(l, W, "backbone.ln_pre");
    init_norm(l, W, "backbone.ln_post");
    for (i = 0; i < c->layers; i++) {
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.attn", i);
        init_mha(l, x1, INIT_N(l->std), W, p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.ln_1", i); init_norm(l, W, p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.ln_2", i); init_norm(l, W, p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.mlp.c_fc", i);
        init_linear(l, INIT_N(l->std), c->mlp_width, W, p);
        snprintf(p, sizeof p, "backbone.transformer.resblocks.%d.mlp.c_proj", i);
        init_linear(l, INIT_N(l->std), W, c->mlp_width, p);
    }
    init_add(l, INIT_N(1.0), 1, 1, W, 0, "backbone.attn_pool.probe");
    init_mha(l, x1, INIT_N(l->std), W, "backbone.attn_pool.attn");
    init_norm(l, W, "backbone.attn_pool.layernorm");
    init_linear(l, INIT_N(l->std), c->pool_mlp_width, W, "backbone.attn_pool.mlp.c_fc");
    init_linear(l, INIT_N(l->std), W, c->pool_mlp_width, "backbone.attn_pool.mlp.c_proj");
    /* classifier */
    init_cls_head(l, "classifier.classifier", W, c->cls_hidden, c->cls_layers);
    init_cls_head(l, "classifier.patch_classifier", W, c->cls_hidden, c->cls_layers);
    init_add(l, INIT_CONST, 1.0 / (1 + g * g), 0.0, 1, 1 + g * g, 0, 0, "classifier.fuser.fuse.weight");
    /* segmentor: feature pyramid 4x (two steps), 2x, 0.5x */
    init_scale_block(l, "segmentor.fpn.scale_layers.0.0", W, 1);
    init_scale_block(l, "segmentor.fpn.scale_layers.0.1", W, 1);
    init_scale_block(l, "segmentor.fpn.scale_layers.1.0", W, 1);
    init_scale_block(l, "segmentor.fpn.scale_layers.3.0", W, 0);
    for (i = 0; i < 2; i++) init_add(l, INIT_N(l->std), F, 0, 0, 0, "segmentor.label_embedding.%d", i);
    /* pixel decoder: every tensor of >= 2 dimensions xavier(1) */
    init_add(l, INIT_ZERO, c->deform_levels, F, 0, 0, "segmentor.pixel_decoder.level_embed");
    for (i = 0; i < c->deform_levels; i++) {
        init_add(l, INIT_XAVIER(x1, F, W, 1), F, W, 1, 1, "segmentor.pixel_decoder.input_projections.%d.0.weight", i);
        init_add(l, INIT_ZERO, F, 0, 0, 0, "segmentor.pixel_decoder.input_projections.%d.0.bias", i);
        snprintf(p, sizeof p, "segmentor.pixel_decoder.input_projections.%d.1", i);
        init_norm(l, F, p);
    }
    for (i = 0; i < c->enc_layers; i++) {
#define ENC(s) (snprintf(p, sizeof p, "segmentor.pixel_decoder.encoder.layers.%d.%s", i, s), p)
        init_add(l, INIT_XAVIER(x1, 2 * n_off, F, 1), 2 * n_off, F, 0, 0, "%s.weight", ENC("self_attn.sampling_offsets"));
        init_add(l, INIT_GRID, 0.0, 0.0, 2 * n_off, 0, 0, 0, "%s.bias", p);
        init_linear(l, INIT_XAVIER(x1, n_off, F, 1), n_off, F, ENC("self_attn.attention_weights"));
        init_linear(l, INIT_XAVIER(x1, F, F, 1), F, F, ENC("self_attn.value_proj"));
        init_linear(l, INIT_XAVIER(x1, F, F, 1), F, F, ENC("self_attn.output_proj"));
        init_norm(l, F, ENC("self_attn_layer_norm"));
        init_linear(l, INIT_XAVIER(x1, c->enc_ffn, F, 1), c->enc_ffn, F, ENC("fc1"));
        init_linear(l, INIT_XAVIER(x1, F, c->enc_ffn, 1), F, c->enc_ffn, ENC("fc2"));
        init_norm(l, F, ENC("final_layer_norm"));
        init_mha(l, x1, INIT_XAVIER(x1, F, F, 1), F, ENC("cross_attn"));
        init_norm(l, F, ENC("cross_attn_layer_norm"));
#undef ENC
    }
    init_add(l, INIT_XAVIER(x1, F, F, 1), F, F, 1, 1, "segmentor.pixel_decoder.mask_projection.weight");
    init_add(l, INIT_ZERO, F, 0, 0, 0, "segmentor.pixel_decoder.mask_projection.bias");
    init_add(l, INIT_XAVIER(x1, F, W, 1), F, W, 1, 1, "segmentor.pixel_decoder.adapter_1.0.weight");
    init_norm(l, F, "segmentor.pixel_decoder.adapter_1.1");
    init_add(l, INIT_XAVIER(x1, F, F, 9), F, F, 3, 3, "segmentor.pixel_decoder.layer_1.0.weight");
    init_norm(l, F, "segmentor.pixel_decoder.layer_1.1");
    /* transformer decoder */
    init_add(l, INIT_N(l->std), c->num_queries, F, 0, 0, "segmentor.mask2former_decoder.queries_embedder.weight");
    init_add(l, INIT_N(l->std), c->num_queries, F, 0, 0, "segmentor.mask2former_decoder.queries_features.weight");
    for (i = 0; i < c->dec_layers - 1; i++) {
#define DEC(s) (snprintf(p, sizeof p, "segmentor.mask2former_decoder.decoder.layers.%d.%s", i, s), p)
        for (k = 0; k < 4; k++) {
            char s[40];
            snprintf(s, sizeof s, "self_attn.%s", dec_proj[k]);
            init_linear(l, INIT_XAVIER(xd, F, F, 1), F, F, DEC(s));
        }
        init_norm(l, F, DEC("self_attn_layer_norm"));
        init_mha(l, xd, INIT_XAVIER(xd, F, F, 1), F, DEC("cross_attn"));
        init_norm(l, F, DEC("cross_attn_layer_norm"));
        init_linear(l, INIT_XAVIER(xd, c->dec_ffn, F, 1), c->dec_ffn, F, DEC("fc1"));
        init_linear(l, INIT_XAVIER(xd, F, c->dec_ffn, 1), F, c->dec_ffn, DEC("fc2"));
        init_norm(l, F, DEC("final_layer_norm"));
#undef DEC
    }
    init_norm(l, F, "segmentor.mask2former_decoder.decoder.layernorm");
    for (i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "segmentor.mask2former_decoder.decoder.mask_predictor.mask_embedder.%d.0", i);
        init_linear(l, INIT_N(l->std), F, F, p);
    }
    init_add(l, INIT_N(l->std), c->deform_levels, F, 0, 0, "segmentor.mask2former_decoder.level_embed.weight");
    init_linear(l, INIT_N(l->std), c->num_labels + 1, F, "segmentor.class_predictor");
    return l->failed ? -1 : 0;
}

/* ---- Writing the file ---- */

static uint32_t init_float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static void put_u16(unsigned char *p, uint32_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void put_u32(unsigned char *p, uint32_t v) { put_u16(p, v & 0xFFFF); put_u16(p + 2, v >> 16); }
static void put_u64(unsigned char *p, uint64_t v) { put_u32(p, (uint32_t)v); put_u32(p + 4, (uint32_t)(v >> 32)); }
static uint64_t init_align(uint64_t n) { return (n + TENSOR_ALIGN - 1) / TENSOR_ALIGN * TENSOR_ALIGN; }

/* Encodes n float32 values of a [rows][cols] tensor as dtype into out (little-endian;
 * Q8 and BF16 exactly as tools/convert.py rounds them); returns the byte count. */
static size_t init_encode(const float *x, size_t rows, size_t cols, int dtype, unsigned char *out)
{
    size_t n = rows * cols, i, r, c;
    if (dtype == DTYPE_BF16) {
        for (i = 0; i < n; i++) {
            uint32_t u = init_float_bits(x[i]);
            put_u16(out + 2 * i, (u + 0x7FFF + ((u >> 16) & 1)) >> 16);
        }
        return 2 * n;
    }
    if (dtype == DTYPE_Q8) {
        size_t cols32 = (size_t)q8_padded(cols), nb = cols32 / Q8_BLOCK;
        unsigned char *sc = out + rows * cols32;
        for (r = 0; r < rows; r++)
            for (c = 0; c < nb; c++) {
                const float *w = x + r * cols + c * Q8_BLOCK;
                size_t k, m = cols - c * Q8_BLOCK < Q8_BLOCK ? cols - c * Q8_BLOCK : Q8_BLOCK;
                float amax = 0.0f, scale;
                double div;
                for (k = 0; k < m; k++) amax = fabsf(w[k]) > amax ? fabsf(w[k]) : amax;
                scale = (float)((double)amax / 127.0);
                div = scale != 0.0f ? (double)scale : 1.0;
                for (k = 0; k < Q8_BLOCK; k++)
                    out[r * cols32 + c * Q8_BLOCK + k] = (unsigned char)(int8_t)(k < m ? (int)nearbyint((double)w[k] / div) : 0);
                put_u32(sc + 4 * (r * nb + c), init_float_bits(scale));
            }
        return (size_t)tensor_bytes(DTYPE_Q8, rows, cols);
    }
    for (i = 0; i < n; i++) put_u32(out + 4 * i, init_float_bits(x[i]));
    return 4 * n;
}

/* The entry called name in a parsed weight file, or NULL. */
static const tensor_entry *init_find_entry(const loupe_model *m, const char *name)
{
    int i;
    size_t len = strlen(name);
    for (i = 0; i < m->n_entries; i++)
        if ((size_t)m->entries[i].name_len == len && !memcmp(m->entries[i].name, name, len)) return &m->entries[i];
    return NULL;
}

int loupe_init_weights(const char *config_path, const char *out_path, unsigned long long seed, const char *dtype,
                       const char *backbone_path, char *err, size_t errsize)
{
    loupe_init_options o;
    memset(&o, 0, sizeof o);
    o.seed = seed;
    o.dtype = dtype;
    o.backbone_path = backbone_path;
    return loupe_init_weights_with(config_path, out_path, &o, err, errsize);
}

int loupe_init_weights_with(const char *config_path, const char *out_path, const loupe_init_options *opt, char *err,
                            size_t errsize)
{
    unsigned long long seed;
    const char *dtype, *backbone_path;
    init_hparams h;
    init_list l;
    loupe_model cm, *bm = NULL;
    unsigned char *meta = NULL, *bytes = NULL;
    const tensor_entry **src = NULL;
    uint64_t *offsets = NULL, index_bytes = 0, data_offset, pos, file_size;
    size_t most = 1, most_bytes = TENSOR_ALIGN, meta_len;
    uint64_t nbytes;
    float *x = NULL;
    char tmp[1024];
    FILE *f = NULL;
    int matrix_dtype = DTYPE_F32, version = WEIGHTS_VERSION_F32_ONLY, i, k, rc = -1, ok = 1;

    memset(&l, 0, sizeof l);
    if (!config_path || !out_path || !opt)
        return fail(err, errsize, "loupe_init_weights needs a config, an output path and options");
    if (!(opt->highpass >= 0.0 && opt->highpass <= 1.0))
        return fail(err, errsize, "the high-pass share of the patch embedding must be from 0 to 1 (got %g)", opt->highpass);
    seed = opt->seed;
    dtype = opt->dtype;
    backbone_path = opt->backbone_path;
    if (dtype && !strcmp(dtype, "bf16")) matrix_dtype = DTYPE_BF16;
    else if (dtype && !strcmp(dtype, "q8")) matrix_dtype = DTYPE_Q8;
    else if (dtype && strcmp(dtype, "f32")) return fail(err, errsize, "unknown dtype %s (f32, bf16 or q8)", dtype);
    if (strlen(out_path) + 5 > sizeof tmp) return fail(err, errsize, "%s: path too long", out_path);
    if (init_read_config(config_path, &h, err, errsize)) return -1;

    /* The header's hyperparameters, checked by the loader's own rules (weights_config). */
    meta_len = WEIGHTS_HEADER_BYTES + (size_t)INIT_N_HPARAMS * HPARAM_RECORD_BYTES;
    if (!(meta = calloc(1, meta_len))) return fail(err, errsize, "out of memory");
    memcpy(meta, WEIGHTS_MAGIC, WEIGHTS_MAGIC_LEN);
    put_u32(meta + 12, INIT_N_HPARAMS);
    for (k = 0; k < INIT_N_HPARAMS; k++) {
        unsigned char *r = meta + WEIGHTS_HEADER_BYTES + (size_t)k * HPARAM_RECORD_BYTES;
        uint64_t u;
        memcpy(r, h.names[k], strlen(h.names[k]));
        memcpy(&u, &h.values[k], sizeof u);
        put_u64(r + HPARAM_NAME_BYTES, u);
    }
    memset(&cm, 0, sizeof cm);
    cm.data = meta;
    cm.size = meta_len;
    snprintf(cm.path, sizeof cm.path, "%s", config_path);
    if (weights_config(&cm, err, errsize)) goto done;
    if (init_tensor_list(&cm.cfg, &h, opt->highpass, &l)) { fail(err, errsize, "out of memory"); goto done; }

    /* The backbone's source tensors, shapes checked before anything is written. */
    if (!(src = calloc((size_t)l.n, sizeof *src)) || !(offsets = calloc((size_t)l.n, sizeof *offsets))) {
        fail(err, errsize, "out of memory");
        goto done;
    }
    if (backbone_path) {
        if (!host_is_little_endian()) { fail(err, errsize, "%s: big-endian hosts are not supported", backbone_path); goto done; }
        if (!(bm = calloc(1, sizeof *bm))) { fail(err, errsize, "out of memory"); goto done; }
        snprintf(bm->path, sizeof bm->path, "%s", backbone_path);
        if (weights_map_file(bm, backbone_path, err, errsize) || weights_parse(bm, err, errsize)) goto done;
        for (i = 0; i < l.n; i++) {
            const init_tensor *t = &l.t[i];
            const tensor_entry *e;
            int same;
            if (!t->from_backbone) continue;
            if (!(e = init_find_entry(bm, t->name))) {
                fail(err, errsize, "%s: tensor %s is missing (the backbone must match the config)", backbone_path, t->name);
                goto done;
            }
            same = e->ndim == t->ndim;
            for (k = 0; same && k < t->ndim; k++) same = e->dims[k] == (uint32_t)t->dims[k];
            if (!same) {
                fail(err, errsize, "%s: tensor %s has another shape than the config implies", backbone_path, t->name);
                goto done;
            }
            src[i] = e;
        }
    }

    /* Layout: header, hyperparameters, index, then each tensor 64-byte aligned (as convert.py). */
    for (i = 0; i < l.n; i++) index_bytes += 4 + strlen(l.t[i].name) + 4u * (unsigned)l.t[i].ndim + 16;
    data_offset = init_align(meta_len + index_bytes);
    pos = data_offset;
    for (i = 0; i < l.n; i++) {
        init_tensor *t = &l.t[i];
        size_t numel = 1;
        for (k = 0; k < t->ndim; k++) numel *= (size_t)t->dims[k];
        if (t->matrix && matrix_dtype != DTYPE_F32) version = WEIGHTS_VERSION;
        offsets[i] = init_align(pos);
        nbytes = tensor_bytes(t->matrix ? matrix_dtype : DTYPE_F32, (uint64_t)t->dims[0], numel / (size_t)t->dims[0]);
        pos = offsets[i] + nbytes;
        most = numel > most ? numel : most;
        most_bytes = nbytes > most_bytes ? (size_t)nbytes : most_bytes;
    }
    file_size = pos;
    {
        unsigned char *nm = realloc(meta, (size_t)data_offset);
        if (!nm) { fail(err, errsize, "out of memory"); goto done; }
        meta = nm;
        memset(meta + meta_len, 0, (size_t)(data_offset - meta_len));
    }
    put_u32(meta + 8, (uint32_t)version);
    put_u32(meta + 16, (uint32_t)l.n);
    put_u64(meta + 24, data_offset);
    put_u64(meta + 32, file_size);
    pos = meta_len;
    for (i = 0; i < l.n; i++) {
        const init_tensor *t = &l.t[i];
        size_t len = strlen(t->name), numel = 1;
        for (k = 0; k < t->ndim; k++) numel *= (size_t)t->dims[k];
        put_u16(meta + pos, (uint32_t)len);
        meta[pos + 2] = (unsigned char)(t->matrix ? matrix_dtype : DTYPE_F32);
        meta[pos + 3] = (unsigned char)t->ndim;
        memcpy(meta + pos + 4, t->name, len);
        pos += 4 + len;
        for (k = 0; k < t->ndim; k++, pos += 4) put_u32(meta + pos, (uint32_t)t->dims[k]);
        put_u64(meta + pos, offsets[i]);
        put_u64(meta + pos + 8, tensor_bytes(t->matrix ? matrix_dtype : DTYPE_F32, (uint64_t)t->dims[0], numel / (size_t)t->dims[0]));
        pos += 16;
    }

    /* Data, written front to back into a temporary file renamed when complete. */
    x = malloc(most * sizeof *x);
    bytes = malloc(most_bytes);
    if (!x || !bytes) { fail(err, errsize, "out of memory (the largest tensor has %llu values)", (unsigned long long)most); goto done; }
    snprintf(tmp, sizeof tmp, "%s.tmp", out_path);
    if (!(f = fopen(tmp, "wb"))) { fail(err, errsize, "%s: cannot create: %s", tmp, strerror(errno)); goto done; }
    ok = fwrite(meta, 1, (size_t)data_offset, f) == (size_t)data_offset;
    pos = data_offset;
    for (i = 0; ok && i < l.n; i++) {
        const init_tensor *t = &l.t[i];
        size_t numel = 1, rows = (size_t)t->dims[0], n;
        for (k = 0; k < t->ndim; k++) numel *= (size_t)t->dims[k];
        memset(bytes, 0, TENSOR_ALIGN);
        if (offsets[i] > pos) ok = fwrite(bytes, 1, (size_t)(offsets[i] - pos), f) == (size_t)(offsets[i] - pos);
        if (src[i]) {
            wmat w = entry_matrix(bm, src[i]);
            size_t r, cols = numel / rows;
            for (r = 0; r < rows; r++) wmat_to_float(w, r, 1, 0, (int)cols, x + r * cols, cols);
        } else {
            init_fill(t, (uint64_t)seed, &cm.cfg, x, numel);
        }
        n = init_encode(x, rows, numel / rows, t->matrix ? matrix_dtype : DTYPE_F32, bytes);
        ok = ok && fwrite(bytes, 1, n, f) == n;
        pos = offsets[i] + n;
    }
    if (fclose(f) != 0) ok = 0;
    f = NULL;
    if (!ok || pos != file_size) {
        remove(tmp);
        fail(err, errsize, "%s: cannot write the weight file (disk full?)", tmp);
        goto done;
    }
    if (replace_file(tmp, out_path) != 0) {
        fail(err, errsize, "%s: cannot rename %s to it: %s", out_path, tmp, strerror(errno));
        remove(tmp);
        goto done;
    }
    rc = 0;
done:
    if (f) { fclose(f); remove(tmp); }
    free(x);
    free(bytes);
    free(meta);
    free(src);
    free(offsets);
    free(l.t);
    loupe_model_free(bm);
    return rc;
}

/* ========================================================================== */
/* 10. Image I/O                                                              */
/* ========================================================================== */
/* Decoders with the semantics of PIL 9.4's Image.open(path).convert("RGB") (PNG with
 * its own inflate, JPEG bit-exact with libjpeg-turbo's default decode, binary
 * PPM/PGM), PIL's bilinear resize, and a small PNG encoder for the masks. */

/* ---- PNG: a decoder with Pillow 9.4's semantics, and a small encoder ----
 *
 * png_decode returns exactly the pixels of Pillow 9.4's Image.open(f).convert("RGB")
 * and fails exactly where Pillow raises. What Pillow does (the pixel rules and the CRC,
 * Adler-32 and truncation cases are confirmed by the reference corpus; the rest is read
 * from Pillow's PngImagePlugin.py, ImageFile.py and ZipDecode.c):
 *  - Pixels. Gray 1-bit -> 0/255; gray 2- and 4-bit scaled by 85 and 17; gray 16-bit
 *    becomes a 32-bit "I" image and I -> RGB clamps: min(v, 255), no scaling;
 *    16-bit RGB, RGBA and gray+alpha keep the high byte; alpha and tRNS are dropped,
 *    never composited; palette indices past the end of PLTE (or with no PLTE) map
 *    to gray (i, i, i), because Pillow's palettes start as a gray ramp.
 *  - Chunks before the first IDAT must have good CRCs; IDAT and later CRCs are never
 *    read. Chunk types may use [A-Za-z0-9_]. Some ancillary chunks are validated, also
 *    after IDAT: a short gAMA, a tRNS too short for its colour type, a zTXt/iTXt/iCCP
 *    inflating past 1 MiB, text values totalling over 64 MiB, ... raise.
 *  - Image data is fed to zlib in reads of at most 64 KiB, one IDAT at a time, one
 *    row of output per inflate call, and decoding stops as soon as the last row is
 *    out. So the Adler-32 is checked only when it lies in the read that completes
 *    the last row; garbage after the last row is ignored; a zlib stream that ends
 *    exactly at a row boundary within the read that completed that row ends the
 *    image early (the remaining rows stay 0); any other shortfall is an error.
 *  - Multiple IHDRs, PLTE before IHDR, APNG fcTL/fdAT chunks: handled the way
 *    Pillow's chunk handlers do (see png_handle_chunk and png_read_header).
 *
 * The inflater (inflate_*) is a complete RFC 1950/1951 decoder that stops and resumes
 * at output boundaries and rejects what zlib 1.2.13 rejects, with one simplification:
 * a window declared smaller than 32 KiB is not enforced (zlib can reject a distance
 * beyond it; only broken encoders write such streams). */


/* ---- zlib / deflate decoding ---- */

#define INFLATE_WINDOW_SIZE 32768u   /* deflate's maximum match distance */
#define INFLATE_MAX_CODE_BITS 15     /* longest Huffman code */
#define INFLATE_FAST_BITS 9          /* codes up to this long are decoded with one table lookup */
#define INFLATE_FAST_SIZE (1u << INFLATE_FAST_BITS)
#define INFLATE_NUM_LITLEN 288       /* literal/length symbols of the fixed code */
#define INFLATE_NUM_DIST 32          /* distance symbols of the fixed code */
#define INFLATE_FIXED_DIST_BITS 5    /* the fixed code's distance codes are 5 bits */
#define INFLATE_NUM_LENGTHS 29       /* length symbols 257..285 */
#define INFLATE_MAX_HLIT 286         /* literal/length codes a dynamic block may declare */
#define INFLATE_MAX_HDIST 30         /* distance codes a dynamic block may declare */
#define INFLATE_NUM_CLEN 19          /* code-length code symbols */
#define INFLATE_END_OF_BLOCK 256
#define INFLATE_FIRST_LENGTH_SYMBOL 257
#define INFLATE_MAX_LENGTH_SYMBOL 285
#define INFLATE_REPEAT_PREVIOUS 16    /* code-length symbols: repeat the previous length 3-6 times, */
#define INFLATE_REPEAT_ZERO 17        /* ... a zero length 3-10 times (18: 11-138 times) */
#define INFLATE_STORED_BLOCK 0
#define INFLATE_FIXED_BLOCK 1
#define INFLATE_DYNAMIC_BLOCK 2
#define ZLIB_METHOD_DEFLATE 8
#define ZLIB_MAX_CINFO 7             /* window size 2^(7+8) = 32 KiB */
#define ZLIB_FLAG_DICTIONARY 0x20    /* FDICT: a preset dictionary, which zlib cannot supply */
#define ZLIB_HEADER_MODULUS 31
#define ADLER_MODULUS 65521u
#define ADLER_BLOCK 5552             /* bytes summed before s2 could overflow 32 bits */
#define ZLIB_ADLER_SIZE 4            /* big-endian Adler-32 after the deflate data */

/* What inflate_run reports. */
enum { INFLATE_FULL, INFLATE_END, INFLATE_STARVED, INFLATE_BAD };
/* What one decoding step reports. */
enum { INFLATE_STEP_OK, INFLATE_STEP_STARVED, INFLATE_STEP_BAD };
/* Where the decoder is in the stream. */
enum { INFLATE_MODE_ZLIB_HEADER, INFLATE_MODE_BLOCK_HEADER, INFLATE_MODE_STORED, INFLATE_MODE_SYMBOL,
       INFLATE_MODE_LITERAL, INFLATE_MODE_MATCH, INFLATE_MODE_CHECK, INFLATE_MODE_DONE };

static const unsigned short inflate_length_base[INFLATE_NUM_LENGTHS] = {
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31,
    35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258 };
static const unsigned char inflate_length_extra[INFLATE_NUM_LENGTHS] = {
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0 };
static const unsigned short inflate_dist_base[INFLATE_MAX_HDIST] = {
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193,
    257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577 };
static const unsigned char inflate_dist_extra[INFLATE_MAX_HDIST] = {
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13 };
static const unsigned char inflate_clen_order[INFLATE_NUM_CLEN] = {
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15 };

/* Compressed input, handed over in blocks; refill (may be NULL) fetches the next block
 * and returns 0 when there is none. */
typedef struct inflate_input {
    const unsigned char *next;
    size_t avail;
    int (*refill)(struct inflate_input *in);
} inflate_input;

/* A canonical Huffman code: how many codes of each length and the symbols in code order;
 * for a complete code also a table indexed by the next INFLATE_FAST_BITS input bits giving
 * symbol + (length << INFLATE_FAST_BITS) of a code that short, or 0. */
typedef struct inflate_huffman {
    unsigned short count[INFLATE_MAX_CODE_BITS + 1];
    unsigned short symbol[INFLATE_NUM_LITLEN];
    unsigned short fast[INFLATE_FAST_SIZE];
    int ncodes, max_len, complete;
} inflate_huffman;

typedef struct inflate_state {
    inflate_input *in;
    uint32_t bits;                 /* bit buffer, least significant bit next; fewer than 8 between reads */
    int nbits;
    int input_end;                 /* the input ran out (sticky); bits read since then are zeros */
    int stop_reading;              /* the caller's last output is complete: read no further block */
    unsigned long refills;         /* input blocks fetched so far */
    unsigned long refills_at_full; /* ... when the current output buffer became full */
    int mode, last_block;
    size_t stored_left;            /* bytes left in a stored block */
    unsigned literal, match_len, match_dist;
    inflate_huffman lencode, distcode;
    uint32_t adler;
    size_t total;                  /* bytes output so far */
    unsigned char window[INFLATE_WINDOW_SIZE];
} inflate_state;

/* Folds n bytes into an Adler-32 checksum. */
static uint32_t adler32_update(uint32_t adler, const unsigned char *p, size_t n)
{
    uint32_t s1 = adler & 0xFFFF, s2 = adler >> 16;
    while (n > 0) {
        size_t k = n < ADLER_BLOCK ? n : ADLER_BLOCK;
        n -= k;
        while (k-- > 0) {
            s1 += *p++;
            s2 += s1;
        }
        s1 %= ADLER_MODULUS;
        s2 %= ADLER_MODULUS;
    }
    return (s2 << 16) | s1;
}

/* Starts decoding a new zlib stream read from in. */
static void inflate_reset(inflate_state *z, inflate_input *in)
{
    z->in = in;
    z->bits = 0;
    z->nbits = 0;
    z->input_end = 0;
    z->stop_reading = 0;
    z->refills = 0;
    z->refills_at_full = 0;
    z->mode = INFLATE_MODE_ZLIB_HEADER;
    z->last_block = 0;
    z->stored_left = 0;
    z->adler = 1;
    z->total = 0;
}

/* Returns the next input byte; at the end of the input, 0 with input_end set. */
static unsigned inflate_next_byte(inflate_state *z)
{
    inflate_input *in = z->in;
    while (in->avail == 0) {
        if (z->input_end || z->stop_reading || !in->refill || !in->refill(in)) {
            z->input_end = 1;
            return 0;
        }
        z->refills++;
    }
    in->avail--;
    return *in->next++;
}

/* Reads n <= 16 bits, least significant first, pulling input bytes only as needed (as zlib does). */
static unsigned inflate_bits(inflate_state *z, int n)
{
    unsigned v;
    while (z->nbits < n) {
        z->bits |= (uint32_t)inflate_next_byte(z) << z->nbits;
        z->nbits += 8;
    }
    v = (unsigned)(z->bits & ((1u << n) - 1));
    z->bits >>= n;
    z->nbits -= n;
    return v;
}

/* Drops the bits up to the next byte boundary. */
static void inflate_align(inflate_state *z)
{
    z->bits >>= z->nbits;
    z->nbits = 0;
}

/* Sets up a canonical code from n code lengths; returns the unused code space
 * (0 for a complete code) or -1 for an over-subscribed one. */
static int inflate_build(inflate_huffman *h, const unsigned char *lengths, int n)
{
    int offset[INFLATE_MAX_CODE_BITS + 1], len, sym, left = 1, i;
    unsigned next_code[INFLATE_MAX_CODE_BITS + 1], code, reversed, k;

    memset(h->count, 0, sizeof h->count);
    for (sym = 0; sym < n; sym++)
        h->count[lengths[sym]]++;
    h->ncodes = n - h->count[0];
    h->count[0] = 0;
    h->max_len = 0;
    for (len = 1; len <= INFLATE_MAX_CODE_BITS; len++) {
        left = 2 * left - h->count[len];
        if (left < 0)
            return -1;
        if (h->count[len])
            h->max_len = len;
    }
    offset[1] = 0;
    next_code[1] = 0;
    for (len = 1; len < INFLATE_MAX_CODE_BITS; len++) {
        offset[len + 1] = offset[len] + h->count[len];
        next_code[len + 1] = (next_code[len] + h->count[len]) << 1;
    }
    h->complete = left == 0;
    memset(h->fast, 0, sizeof h->fast);
    for (sym = 0; sym < n; sym++) {
        len = lengths[sym];
        if (!len)
            continue;
        h->symbol[offset[len]++] = (unsigned short)sym;
        code = next_code[len]++;
        if (len > INFLATE_FAST_BITS || !h->complete)
            continue;
        for (reversed = 0, i = 0; i < len; i++) /* the stream sends a code's first bit first */
            reversed |= ((code >> i) & 1u) << (len - 1 - i);
        for (k = reversed; k < INFLATE_FAST_SIZE; k += 1u << len)
            h->fast[k] = (unsigned short)(sym | len << INFLATE_FAST_BITS);
    }
    return left;
}

/* zlib accepts a complete literal/length or distance code, or one with at most one
 * code of length 1 (or none); returns 1 when the code built from n lengths is usable. */
static int inflate_build_usable(inflate_huffman *h, const unsigned char *lengths, int n)
{
    int left = inflate_build(h, lengths, n);
    return left == 0 || (left > 0 && h->max_len <= 1);
}

/* Decodes one symbol, pulling input bytes only while the code is not yet complete (as
 * zlib does): by table lookup for short codes of a complete code, otherwise bit by bit;
 * -1 for a bit string that no code can start with. */
static int inflate_decode(inflate_state *z, const inflate_huffman *h)
{
    int len, code = 0, first = 0, index = 0;
    unsigned entry;

    while (h->complete) {
        entry = h->fast[z->bits & (INFLATE_FAST_SIZE - 1)]; /* bits above nbits are zero */
        if (entry && (int)(entry >> INFLATE_FAST_BITS) <= z->nbits) {
            z->bits >>= entry >> INFLATE_FAST_BITS;
            z->nbits -= (int)(entry >> INFLATE_FAST_BITS);
            return (int)(entry & (INFLATE_FAST_SIZE - 1));
        }
        if (z->nbits >= INFLATE_FAST_BITS)
            break; /* a longer code */
        z->bits |= (uint32_t)inflate_next_byte(z) << z->nbits;
        z->nbits += 8;
    }
    for (len = 1; len <= INFLATE_MAX_CODE_BITS; len++) {
        code |= (int)inflate_bits(z, 1);
        if (code - first < h->count[len])
            return h->symbol[index + code - first];
        index += h->count[len];
        if (index >= h->ncodes)
            return -1;
        first = (first + h->count[len]) << 1;
        code <<= 1;
    }
    return -1;
}

/* Reads and checks the two-byte zlib header. */
static int inflate_zlib_header(inflate_state *z)
{
    unsigned cmf = inflate_bits(z, 8), flg = inflate_bits(z, 8);
    if (z->input_end)
        return INFLATE_STEP_STARVED;
    if ((cmf * 256 + flg) % ZLIB_HEADER_MODULUS != 0 || (cmf & 15) != ZLIB_METHOD_DEFLATE ||
        (cmf >> 4) > ZLIB_MAX_CINFO || (flg & ZLIB_FLAG_DICTIONARY))
        return INFLATE_STEP_BAD;
    z->mode = INFLATE_MODE_BLOCK_HEADER;
    return INFLATE_STEP_OK;
}

/* Installs the fixed Huffman codes of RFC 1951 section 3.2.6: literals 0-143 have 8-bit
 * codes, 144-255 9-bit, symbols 256-279 7-bit and 280-287 8-bit; distances 5-bit. */
static void inflate_fixed_codes(inflate_state *z)
{
    unsigned char lengths[INFLATE_NUM_LITLEN];
    int sym;
    for (sym = 0; sym < INFLATE_NUM_LITLEN; sym++)
        lengths[sym] = sym < 144 ? 8 : sym < 256 ? 9 : sym < 280 ? 7 : 8;
    inflate_build(&z->lencode, lengths, INFLATE_NUM_LITLEN);
    memset(lengths, INFLATE_FIXED_DIST_BITS, INFLATE_NUM_DIST);
    inflate_build(&z->distcode, lengths, INFLATE_NUM_DIST);
}

/* Reads the code definitions of a dynamic block, checking them in zlib's order. */
static int inflate_dynamic_codes(inflate_state *z)
{
    unsigned char lengths[INFLATE_MAX_HLIT + INFLATE_MAX_HDIST], clen[INFLATE_NUM_CLEN] = {0};
    inflate_huffman clcode;
    int hlit, hdist, hclen, i, n, sym, repeat, value;

    hlit = (int)inflate_bits(z, 5) + INFLATE_FIRST_LENGTH_SYMBOL;
    hdist = (int)inflate_bits(z, 5) + 1;
    hclen = (int)inflate_bits(z, 4) + 4;
    if (z->input_end)
        return INFLATE_STEP_STARVED;
    if (hlit > INFLATE_MAX_HLIT || hdist > INFLATE_MAX_HDIST)
        return INFLATE_STEP_BAD;
    for (i = 0; i < hclen; i++)
        clen[inflate_clen_order[i]] = (unsigned char)inflate_bits(z, 3);
    if (z->input_end)
        return INFLATE_STEP_STARVED;
    if (inflate_build(&clcode, clen, INFLATE_NUM_CLEN) != 0)
        return INFLATE_STEP_BAD;
    n = hlit + hdist;
    for (i = 0; i < n;) {
        sym = inflate_decode(z, &clcode);
        if (z->input_end)
            return INFLATE_STEP_STARVED;
        if (sym < INFLATE_REPEAT_PREVIOUS) {
            lengths[i++] = (unsigned char)sym;
            continue;
        }
        if (sym == INFLATE_REPEAT_PREVIOUS) {
            repeat = 3 + (int)inflate_bits(z, 2);
            value = i > 0 ? lengths[i - 1] : -1;
        } else if (sym == INFLATE_REPEAT_ZERO) {
            repeat = 3 + (int)inflate_bits(z, 3);
            value = 0;
        } else { /* 18 */
            repeat = 11 + (int)inflate_bits(z, 7);
            value = 0;
        }
        if (z->input_end)
            return INFLATE_STEP_STARVED;
        if (value < 0 || repeat > n - i)
            return INFLATE_STEP_BAD;
        while (repeat-- > 0)
            lengths[i++] = (unsigned char)value;
    }
    if (lengths[INFLATE_END_OF_BLOCK] == 0 || !inflate_build_usable(&z->lencode, lengths, hlit) ||
        !inflate_build_usable(&z->distcode, lengths + hlit, hdist))
        return INFLATE_STEP_BAD;
    return INFLATE_STEP_OK;
}

/* Reads a block header (and a stored block's lengths or a dynamic block's codes). */
static int inflate_block_header(inflate_state *z)
{
    unsigned type, len, nlen;
    int rc;

    z->last_block = (int)inflate_bits(z, 1);
    type = inflate_bits(z, 2);
    if (z->input_end)
        return INFLATE_STEP_STARVED;
    if (type == INFLATE_STORED_BLOCK) {
        inflate_align(z);
        len = inflate_bits(z, 16);
        nlen = inflate_bits(z, 16);
        if (z->input_end)
            return INFLATE_STEP_STARVED;
        if (len != (~nlen & 0xFFFFu))
            return INFLATE_STEP_BAD;
        z->stored_left = len;
        z->mode = INFLATE_MODE_STORED;
        return INFLATE_STEP_OK;
    }
    if (type == INFLATE_FIXED_BLOCK) {
        inflate_fixed_codes(z);
    } else if (type == INFLATE_DYNAMIC_BLOCK) {
        rc = inflate_dynamic_codes(z);
        if (rc != INFLATE_STEP_OK)
            return rc;
    } else {
        return INFLATE_STEP_BAD;
    }
    z->mode = INFLATE_MODE_SYMBOL;
    return INFLATE_STEP_OK;
}

/* Decodes one literal, end-of-block, or length/distance pair (zlib decodes a whole pair
 * before it looks for room to copy it). */
static int inflate_symbol(inflate_state *z)
{
    int sym = inflate_decode(z, &z->lencode), dsym;

    if (z->input_end)
        return INFLATE_STEP_STARVED;
    if (sym < 0 || sym > INFLATE_MAX_LENGTH_SYMBOL)
        return INFLATE_STEP_BAD;
    if (sym < INFLATE_END_OF_BLOCK) {
        z->literal = (unsigned)sym;
        z->mode = INFLATE_MODE_LITERAL;
        return INFLATE_STEP_OK;
    }
    if (sym == INFLATE_END_OF_BLOCK) {
        z->mode = z->last_block ? INFLATE_MODE_CHECK : INFLATE_MODE_BLOCK_HEADER;
        return INFLATE_STEP_OK;
    }
    sym -= INFLATE_FIRST_LENGTH_SYMBOL;
    z->match_len = inflate_length_base[sym] + inflate_bits(z, inflate_length_extra[sym]);
    if (z->input_end)
        return INFLATE_STEP_STARVED;
    dsym = inflate_decode(z, &z->distcode);
    if (z->input_end)
        return INFLATE_STEP_STARVED;
    if (dsym < 0 || dsym >= INFLATE_MAX_HDIST)
        return INFLATE_STEP_BAD;
    z->match_dist = inflate_dist_base[dsym] + inflate_bits(z, inflate_dist_extra[dsym]);
    if (z->input_end)
        return INFLATE_STEP_STARVED;
    z->mode = INFLATE_MODE_MATCH;
    return INFLATE_STEP_OK;
}

/* Reads the big-endian Adler-32 trailer and compares it with the output's. */
static int inflate_check(inflate_state *z)
{
    uint32_t expected = 0;
    int i;
    inflate_align(z);
    for (i = 0; i < ZLIB_ADLER_SIZE; i++)
        expected = (expected << 8) | inflate_bits(z, 8);
    if (z->input_end)
        return INFLATE_STEP_STARVED;
    if (expected != z->adler)
        return INFLATE_STEP_BAD;
    z->mode = INFLATE_MODE_DONE;
    return INFLATE_STEP_OK;
}

/* Appends one byte to out and to the history window. */
static void inflate_emit(inflate_state *z, unsigned char *out, size_t *n, unsigned char byte)
{
    out[(*n)++] = byte;
    z->window[z->total % INFLATE_WINDOW_SIZE] = byte;
    z->total++;
}

/* Decompresses into out[0..len) like one zlib inflate call: after out is full it goes on
 * with work that needs no output (block ends, headers, the checksum) until it needs
 * output or input. With last set the input ends where the current block ends once out
 * is full. *done gets the bytes written. Returns INFLATE_FULL (out is full), INFLATE_END
 * (stream complete and checked), INFLATE_STARVED (input ended first) or INFLATE_BAD. */
static int inflate_run(inflate_state *z, unsigned char *out, size_t len, int last, size_t *done)
{
    size_t n = 0, folded = 0;
    int full = 0, step = INFLATE_STEP_OK, result;

    z->stop_reading = 0;
    for (;;) {
        if (n == len && !full) {
            full = 1;
            z->stop_reading = last;
            z->refills_at_full = z->refills;
        }
        if (z->input_end && z->mode != INFLATE_MODE_DONE)
            step = INFLATE_STEP_STARVED;
        if (step != INFLATE_STEP_OK) {
            result = step == INFLATE_STEP_BAD ? INFLATE_BAD : n == len ? INFLATE_FULL : INFLATE_STARVED;
            break;
        }
        switch (z->mode) {
        case INFLATE_MODE_ZLIB_HEADER:
            step = inflate_zlib_header(z);
            continue;
        case INFLATE_MODE_BLOCK_HEADER:
            step = inflate_block_header(z);
            continue;
        case INFLATE_MODE_SYMBOL:
            step = inflate_symbol(z);
            continue;
        case INFLATE_MODE_CHECK:
            z->adler = adler32_update(z->adler, out + folded, n - folded);
            folded = n;
            step = inflate_check(z);
            continue;
        case INFLATE_MODE_DONE:
            result = INFLATE_END;
            break;
        case INFLATE_MODE_STORED:
            if (z->stored_left == 0) {
                z->mode = z->last_block ? INFLATE_MODE_CHECK : INFLATE_MODE_BLOCK_HEADER;
                continue;
            }
            if (n < len) {
                unsigned char byte = (unsigned char)inflate_next_byte(z);
                if (!z->input_end) {
                    inflate_emit(z, out, &n, byte);
                    z->stored_left--;
                }
                continue;
            }
            result = INFLATE_FULL;
            break;
        case INFLATE_MODE_LITERAL:
            if (n < len) {
                inflate_emit(z, out, &n, (unsigned char)z->literal);
                z->mode = INFLATE_MODE_SYMBOL;
                continue;
            }
            result = INFLATE_FULL;
            break;
        default: /* INFLATE_MODE_MATCH */
            if (n < len) {
                if (z->match_dist > z->total) { /* zlib: "invalid distance too far back" */
                    step = INFLATE_STEP_BAD;
                    continue;
                }
                while (z->match_len > 0 && n < len) {
                    inflate_emit(z, out, &n, z->window[(z->total - z->match_dist) % INFLATE_WINDOW_SIZE]);
                    z->match_len--;
                }
                if (z->match_len == 0)
                    z->mode = INFLATE_MODE_SYMBOL;
                continue;
            }
            result = INFLATE_FULL;
            break;
        }
        break; /* INFLATE_END, or INFLATE_FULL because the next step needs room for output */
    }
    z->adler = adler32_update(z->adler, out + folded, n - folded);
    *done = n;
    return result;
}

/* ---- PNG decoding ---- */

#define PNG_SIGNATURE_SIZE 8
#define PNG_CHUNK_HEAD 8               /* 4-byte length, 4-byte type */
#define PNG_CRC_SIZE 4
#define PNG_IHDR_SIZE 13
#define PNG_ACTL_SIZE 8
#define PNG_FCTL_SIZE 26
#define PNG_SEQUENCE_SIZE 4            /* fdAT starts with a sequence number */
#define PNG_GAMA_SIZE 4
#define PNG_CHRM_VALUE_SIZE 4          /* cHRM holds 32-bit values */
#define PNG_SRGB_SIZE 1
#define PNG_PHYS_SIZE 9
#define PNG_TRNS_GRAY_SIZE 2           /* one 16-bit gray value */
#define PNG_TRNS_RGB_SIZE 6            /* three 16-bit values */
#define PNG_READ_BLOCK 65536u          /* Pillow reads image data in blocks of this size (ImageFile.MAXBLOCK) */
#define PNG_TEXT_LIMIT 1048576u        /* Pillow refuses a zTXt/iTXt/iCCP payload inflating beyond this */
#define PNG_BOMB_PIXELS 178956970u     /* Pillow's DecompressionBombError threshold (2 * MAX_IMAGE_PIXELS) */
#define PNG_MAX_FRAMES 0x80000000u     /* Pillow ignores an acTL with more frames than this */
#define PNG_PALETTE_ENTRIES 256
#define PNG_SAMPLE_MAX 255             /* largest 8-bit sample */
#define PNG_LUT_SIZE (3 * PNG_PALETTE_ENTRIES)
#define PNG_FILTER_TYPES 5             /* None, Sub, Up, Average, Paeth */
#define PNG_ADAM7_PASSES 7
#define PNG_CRC_POLY 0xEDB88320u
#define PNG_TEXT_MEMORY_LIMIT (64u * PNG_TEXT_LIMIT) /* Pillow's budget for all text values */
#define PNG_TEXT_SCRATCH 4096          /* output buffer used while inflating text */

enum { PNG_GRAY = 0, PNG_RGB = 2, PNG_PALETTE = 3, PNG_GRAY_ALPHA = 4, PNG_RGBA = 6 };
enum { PNG_FILTER_NONE, PNG_FILTER_SUB, PNG_FILTER_UP, PNG_FILTER_AVERAGE, PNG_FILTER_PAETH };
enum { PNG_TEXT_OK, PNG_TEXT_CORRUPT, PNG_TEXT_TOO_LARGE };

static const unsigned char png_signature[PNG_SIGNATURE_SIZE] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n' };

/* Adam7 passes: first column, first row, column step, row step. */
static const unsigned char png_adam7[PNG_ADAM7_PASSES][4] = {
    {0, 0, 8, 8}, {4, 0, 8, 8}, {0, 4, 4, 8}, {2, 0, 4, 4}, {0, 2, 2, 4}, {1, 0, 2, 2}, {0, 1, 1, 2} };
static const unsigned char png_single_pass[4] = { 0, 0, 1, 1 };

/* What Pillow's PngStream learns from the chunks, plus the decoder's own workspace. */
typedef struct png_decoder {
    const unsigned char *file;
    size_t size;
    uint32_t crc_table[256];
    inflate_state *z;                  /* allocated when first needed */
    uint32_t width, height;            /* of the last IHDR */
    int depth, color, have_mode;       /* of the last IHDR with a supported depth/colour type */
    int interlaced;                    /* any IHDR had a nonzero interlace byte */
    const unsigned char *palette;      /* last PLTE seen while the mode was palette */
    size_t palette_len;
    int have_palette;
    int trns_value;                    /* the last tRNS gave Pillow a number or tuple, not alpha bytes */
    int have_seq;                      /* APNG sequence numbers */
    uint32_t seq;
    int have_frames, default_image, animated;
    uint32_t frames;
    int have_bbox;                     /* fcTL frame region, used by the IDAT that follows */
    uint32_t bbox_x, bbox_y, bbox_w, bbox_h;
    int frame_is_bbox;                 /* the image data fills the fcTL region */
    size_t data_pos, data_len;         /* first image data chunk: data offset and length */
    uint64_t text_memory;              /* characters of text values so far */
} png_decoder;

/* Reads a big-endian 32-bit value. */
static uint32_t png_be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Writes a big-endian 32-bit value. */
static void png_put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* Fills the CRC-32 lookup table (reflected polynomial 0xEDB88320). */
static void png_crc_init(uint32_t table[256])
{
    uint32_t c;
    int n, k;
    for (n = 0; n < 256; n++) {
        c = (uint32_t)n;
        for (k = 0; k < 8; k++)
            c = (c & 1) ? PNG_CRC_POLY ^ (c >> 1) : c >> 1;
        table[n] = c;
    }
}

/* Continues a CRC-32 (start with 0) over n bytes. */
static uint32_t png_crc_update(const uint32_t table[256], uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n-- > 0)
        crc = table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* Returns 1 when the 4 type bytes match Pillow's chunk-type pattern [A-Za-z0-9_]{4}. */
static int png_is_chunk_type(const unsigned char *type)
{
    int i;
    for (i = 0; i < 4; i++) {
        unsigned char c = type[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return 0;
    }
    return 1;
}

/* Returns 1 when the chunk type equals the 4-letter name. */
static int png_type_is(const unsigned char *type, const char *name)
{
    return memcmp(type, name, 4) == 0;
}

/* Channels of a bit depth / colour type combination Pillow supports, or 0. */
static int png_channels(int depth, int color)
{
    switch (color) {
    case PNG_GRAY:
        return (depth == 1 || depth == 2 || depth == 4 || depth == 8 || depth == 16) ? 1 : 0;
    case PNG_PALETTE:
        return (depth == 1 || depth == 2 || depth == 4 || depth == 8) ? 1 : 0;
    case PNG_RGB:
        return (depth == 8 || depth == 16) ? 3 : 0;
    case PNG_GRAY_ALPHA:
        return (depth == 8 || depth == 16) ? 2 : 0;
    case PNG_RGBA:
        return (depth == 8 || depth == 16) ? 4 : 0;
    default:
        return 0;
    }
}

/* Returns the inflater, allocating it on first use (NULL when out of memory). */
static inflate_state *png_inflater(png_decoder *d)
{
    if (!d->z)
        d->z = malloc(sizeof *d->z);
    return d->z;
}

/* Accepts an APNG sequence number: Pillow wants 0 first (fcTL only) and then +1 each time. */
static int png_next_sequence(png_decoder *d, uint32_t seq, int may_start)
{
    int ok = d->have_seq ? (uint64_t)d->seq + 1 == seq : (may_start && seq == 0);
    if (ok) {
        d->seq = seq;
        d->have_seq = 1;
    }
    return ok;
}

/* Reads the sequence number that starts an fdAT chunk at *cur, as Pillow's handler does;
 * then moves *cur past it and shortens *len. Returns 0, or -1 with a message. */
static int png_fdat_sequence(png_decoder *d, size_t *cur, size_t *len, char *err, size_t errsize)
{
    if (*len < PNG_SEQUENCE_SIZE)
        return fail(err, errsize, "APNG frame data chunk (fdAT) is too short");
    if (d->size - *cur < PNG_SEQUENCE_SIZE)
        return fail(err, errsize, "PNG file is truncated");
    if (!png_next_sequence(d, png_be32(d->file + *cur), 0))
        return fail(err, errsize, "APNG chunks are out of sequence");
    *cur += PNG_SEQUENCE_SIZE;
    *len -= PNG_SEQUENCE_SIZE;
    return 0;
}

/* IHDR: size and mode; an unsupported depth/colour type leaves the previous mode. */
static int png_on_ihdr(png_decoder *d, const unsigned char *s, size_t len, char *err, size_t errsize)
{
    if (len < PNG_IHDR_SIZE)
        return fail(err, errsize, "PNG header chunk (IHDR) is too short");
    d->width = png_be32(s);
    d->height = png_be32(s + 4);
    if (png_channels(s[8], s[9])) {
        d->depth = s[8];
        d->color = s[9];
        d->have_mode = 1;
    }
    if (s[12])
        d->interlaced = 1;
    if (s[11])
        return fail(err, errsize, "PNG uses an unknown filter method");
    return 0;
}

/* Returns 1 when a palette tRNS matches Pillow's pattern ^\xff*\x00\xff*$ ('$' also
 * matches before a final newline), which Pillow stores as a single transparent index. */
static int png_single_transparent_index(const unsigned char *s, size_t len)
{
    size_t i = 0;
    if (len > 0 && s[len - 1] == '\n')
        len--;
    while (i < len && s[i] == 0xFF)
        i++;
    if (i == len || s[i] != 0)
        return 0;
    for (i++; i < len && s[i] == 0xFF; i++)
        ;
    return i == len;
}

/* tRNS: Pillow keeps a palette index or alpha bytes, a 16-bit gray value, or three 16-bit
 * RGB values (failing when they are missing), and ignores it for gray+alpha and RGBA. */
static int png_on_trns(png_decoder *d, const unsigned char *s, size_t len, char *err, size_t errsize)
{
    if (!d->have_mode)
        return 0;
    if (d->color == PNG_PALETTE) {
        d->trns_value = png_single_transparent_index(s, len);
    } else if (d->color == PNG_GRAY || d->color == PNG_RGB) {
        if (len < (d->color == PNG_GRAY ? PNG_TRNS_GRAY_SIZE : PNG_TRNS_RGB_SIZE))
            return fail(err, errsize, "PNG transparency chunk (tRNS) is too short");
        d->trns_value = 1;
    }
    return 0;
}

/* A strict UTF-8 check (what Python's bytes.decode("utf-8") accepts) fed piece by piece,
 * counting characters. */
typedef struct png_utf8 {
    int need;                  /* continuation bytes still expected */
    unsigned char lo, hi;      /* allowed range of the next continuation byte */
    int bad;
    uint64_t chars;
} png_utf8;

/* Feeds n bytes to the UTF-8 check. */
static void png_utf8_feed(png_utf8 *u, const unsigned char *p, size_t n)
{
    size_t i;
    for (i = 0; i < n && !u->bad; i++) {
        unsigned c = p[i];
        if (u->need > 0) {
            u->bad = c < u->lo || c > u->hi;
            u->lo = 0x80;
            u->hi = 0xBF;
            u->need--;
            continue;
        }
        u->chars++;
        u->lo = 0x80;
        u->hi = 0xBF;
        if (c < 0x80)
            continue;
        if (c >= 0xC2 && c <= 0xDF)
            u->need = 1;
        else if (c >= 0xE0 && c <= 0xEF)
            u->need = 2;
        else if (c >= 0xF0 && c <= 0xF4)
            u->need = 3;
        else
            u->bad = 1;
        if (c == 0xE0) /* no overlong forms, surrogates or code points past U+10FFFF */
            u->lo = 0xA0;
        else if (c == 0xED)
            u->hi = 0x9F;
        else if (c == 0xF0)
            u->lo = 0x90;
        else if (c == 0xF4)
            u->hi = 0x8F;
    }
}

/* Returns 1 when n bytes are complete, strict UTF-8. */
static int png_utf8_valid(const unsigned char *p, size_t n)
{
    png_utf8 u = {0, 0x80, 0xBF, 0, 0};
    png_utf8_feed(&u, p, n);
    return !u.bad && u.need == 0;
}

/* Inflates a text payload the way Pillow's _safe_zlib_decompress (CPython's
 * decompressobj().decompress(data, 1 MiB)) does: sets *length to the bytes it yields,
 * feeds them to utf8 when given; returns PNG_TEXT_OK, PNG_TEXT_CORRUPT (zlib raises; the
 * output is discarded) or PNG_TEXT_TOO_LARGE (input left over at 1 MiB). */
static int png_inflate_text(inflate_state *z, const unsigned char *data, size_t len, png_utf8 *utf8,
                            uint64_t *length)
{
    unsigned char scratch[PNG_TEXT_SCRATCH];
    inflate_input in;
    size_t total = 0, done, want;
    int rc;

    in.next = data;
    in.avail = len;
    in.refill = NULL;
    inflate_reset(z, &in);
    do {
        want = PNG_TEXT_LIMIT - total < sizeof scratch ? PNG_TEXT_LIMIT - total : sizeof scratch;
        rc = inflate_run(z, scratch, want, 0, &done);
        if (utf8)
            png_utf8_feed(utf8, scratch, done);
        total += done;
    } while (rc == INFLATE_FULL && total < PNG_TEXT_LIMIT);
    *length = total;
    if (rc == INFLATE_BAD)
        return PNG_TEXT_CORRUPT;
    return rc == INFLATE_FULL && in.avail > 0 ? PNG_TEXT_TOO_LARGE : PNG_TEXT_OK;
}

/* Adds a text value's length to Pillow's running total, which may not exceed 64 MiB. */
static int png_count_text(png_decoder *d, uint64_t chars, char *err, size_t errsize)
{
    d->text_memory += chars;
    if (d->text_memory > PNG_TEXT_MEMORY_LIMIT)
        return fail(err, errsize, "PNG text chunks hold more than 64 MiB of text");
    return 0;
}

/* tEXt, zTXt, iTXt, iCCP as Pillow reads them: unknown compression methods and payloads
 * inflating past 1 MiB raise, corrupt payloads are ignored, text values are counted. */
static int png_on_text(png_decoder *d, const unsigned char *type, const unsigned char *s, size_t len,
                       char *err, size_t errsize)
{
    const unsigned char *nul = len ? memchr(s, 0, len) : NULL, *lang, *lang_end, *trans_end, *text;
    size_t key_len = nul ? (size_t)(nul - s) : len, off = key_len + 1;
    uint64_t length;
    int method, rc;
    png_utf8 utf8 = {0, 0x80, 0xBF, 0, 0};

    if (png_type_is(type, "tEXt"))
        return key_len > 0 && nul ? png_count_text(d, len - off, err, errsize) : 0;
    if (png_type_is(type, "iTXt")) { /* keyword, flag, method, language, translated keyword, text */
        if (!nul || len - off < 2)
            return 0;
        lang = s + off + 2;
        lang_end = memchr(lang, 0, (size_t)(s + len - lang));
        trans_end = lang_end ? memchr(lang_end + 1, 0, (size_t)(s + len - lang_end - 1)) : NULL;
        if (!trans_end || (s[off] != 0 && s[off + 1] != 0))
            return 0; /* malformed, or compressed with an unknown method: skipped */
        text = trans_end + 1;
        if (s[off] == 0) {
            png_utf8_feed(&utf8, text, (size_t)(s + len - text));
        } else {
            if (!png_inflater(d))
                return fail(err, errsize, "out of memory");
            rc = png_inflate_text(d->z, text, (size_t)(s + len - text), &utf8, &length);
            if (rc == PNG_TEXT_TOO_LARGE)
                return fail(err, errsize, "PNG text chunk (iTXt) inflates to more than 1 MiB");
            if (rc == PNG_TEXT_CORRUPT)
                return 0;
        }
        if (utf8.bad || utf8.need > 0 || !png_utf8_valid(lang, (size_t)(lang_end - lang)) ||
            !png_utf8_valid(lang_end + 1, (size_t)(trans_end - lang_end - 1)))
            return 0; /* not UTF-8: skipped */
        return png_count_text(d, utf8.chars, err, errsize);
    }
    if (png_type_is(type, "iCCP")) {
        if (len == 0)
            return fail(err, errsize, "PNG ICC profile chunk (iCCP) is empty");
        /* Pillow reads the method from the separator itself (always 0) when there is one */
        method = nul ? 0 : s[len - 1];
        off = nul ? key_len + 2 : 1;
    } else { /* zTXt: keyword, method, compressed text */
        method = nul && off < len ? s[off] : 0;
        off++;
    }
    if (method != 0)
        return fail(err, errsize, "PNG chunk '%.4s' uses an unknown compression method", (const char *)type);
    length = 0;
    if (off < len) {
        if (!png_inflater(d))
            return fail(err, errsize, "out of memory");
        rc = png_inflate_text(d->z, s + off, len - off, NULL, &length);
        if (rc == PNG_TEXT_TOO_LARGE)
            return fail(err, errsize, "PNG chunk '%.4s' inflates to more than 1 MiB", (const char *)type);
        if (rc == PNG_TEXT_CORRUPT)
            length = 0;
    }
    return png_count_text(d, png_type_is(type, "zTXt") && key_len > 0 ? length : 0, err, errsize);
}

/* acTL: a second one cancels the first, as in Pillow. */
static int png_on_actl(png_decoder *d, const unsigned char *s, size_t len, char *err, size_t errsize)
{
    uint32_t frames;
    if (len < PNG_ACTL_SIZE)
        return fail(err, errsize, "APNG animation control chunk (acTL) is too short");
    if (d->have_frames) {
        d->have_frames = 0;
        return 0;
    }
    frames = png_be32(s);
    if (frames != 0 && frames <= PNG_MAX_FRAMES) {
        d->frames = frames;
        d->have_frames = 1;
    }
    return 0;
}

/* fcTL: sequence number and a frame region inside the image. */
static int png_on_fctl(png_decoder *d, const unsigned char *s, size_t len, char *err, size_t errsize)
{
    uint32_t w, h, x, y;
    if (len < PNG_FCTL_SIZE)
        return fail(err, errsize, "APNG frame control chunk (fcTL) is too short");
    if (!png_next_sequence(d, png_be32(s), 1))
        return fail(err, errsize, "APNG chunks are out of sequence");
    w = png_be32(s + 4);
    h = png_be32(s + 8);
    x = png_be32(s + 12);
    y = png_be32(s + 16);
    if ((uint64_t)x + w > d->width || (uint64_t)y + h > d->height)
        return fail(err, errsize, "APNG frame lies outside the image");
    d->have_bbox = 1;
    d->bbox_x = x;
    d->bbox_y = y;
    d->bbox_w = w;
    d->bbox_h = h;
    return 0;
}

/* Runs Pillow's handler for one complete chunk (anything but IDAT, fdAT and IEND):
 * records what it learns and fails where Pillow's handler raises. */
static int png_handle_chunk(png_decoder *d, const unsigned char *type, const unsigned char *s,
                            size_t len, char *err, size_t errsize)
{
    if (png_type_is(type, "IHDR"))
        return png_on_ihdr(d, s, len, err, errsize);
    if (png_type_is(type, "PLTE")) {
        if (d->have_mode && d->color == PNG_PALETTE) {
            d->palette = s;
            d->palette_len = len;
            d->have_palette = 1;
        }
        return 0;
    }
    if (png_type_is(type, "tRNS"))
        return png_on_trns(d, s, len, err, errsize);
    if ((png_type_is(type, "gAMA") && len < PNG_GAMA_SIZE) ||
        (png_type_is(type, "cHRM") && len % PNG_CHRM_VALUE_SIZE != 0) ||
        (png_type_is(type, "sRGB") && len < PNG_SRGB_SIZE) || (png_type_is(type, "pHYs") && len < PNG_PHYS_SIZE))
        return fail(err, errsize, "PNG chunk '%.4s' has an invalid length", (const char *)type);
    if (png_type_is(type, "tEXt") || png_type_is(type, "zTXt") || png_type_is(type, "iTXt") ||
        png_type_is(type, "iCCP"))
        return png_on_text(d, type, s, len, err, errsize);
    if (png_type_is(type, "acTL"))
        return png_on_actl(d, s, len, err, errsize);
    if (png_type_is(type, "fcTL"))
        return png_on_fctl(d, s, len, err, errsize);
    return 0;
}

/* Pillow's IDAT handler: marks an APNG's default image (even when it then fails for
 * want of a usable IHDR); with a usable mode the image data starts here. Returns 1 then. */
static int png_on_image_data(png_decoder *d, size_t pos, size_t len)
{
    if (d->have_frames && !d->have_bbox)
        d->default_image = 1;
    if (!d->have_mode)
        return 0;
    d->data_pos = pos;
    d->data_len = len;
    d->frame_is_bbox = d->have_bbox;
    d->animated = d->have_frames && (uint64_t)d->frames + (unsigned)d->default_image > 1;
    return 1;
}

/* Walks the chunks up to the first image data like Pillow's PngImageFile._open:
 * handlers run, every chunk's CRC is checked. */
static int png_read_header(png_decoder *d, char *err, size_t errsize)
{
    size_t cur = PNG_SIGNATURE_SIZE, len, start;
    const unsigned char *type;

    for (;;) {
        if (d->size - cur < PNG_CHUNK_HEAD)
            return fail(err, errsize, "PNG file ends before its image data");
        len = png_be32(d->file + cur);
        type = d->file + cur + 4;
        cur += PNG_CHUNK_HEAD;
        if (!png_is_chunk_type(type))
            return fail(err, errsize, "PNG file contains an invalid chunk type");
        if (png_type_is(type, "IEND"))
            return fail(err, errsize, d->have_mode ? "PNG file has no image data"
                                                   : "PNG has no header with a supported bit depth and colour type");
        if (png_type_is(type, "fdAT")) {
            size_t data_len = len;
            if (png_fdat_sequence(d, &cur, &data_len, err, errsize) != 0)
                return -1;
            if (png_on_image_data(d, cur, data_len))
                return 0;
        } else if (png_type_is(type, "IDAT") && png_on_image_data(d, cur, len)) {
            return 0;
        }
        /* any other chunk, and image data before a usable IHDR, is read whole and CRC-checked */
        start = cur;
        if (len > d->size - cur)
            return fail(err, errsize, "PNG chunk '%.4s' runs past the end of the file", (const char *)type);
        if (png_handle_chunk(d, type, d->file + cur, len, err, errsize) != 0)
            return -1;
        cur += len;
        if (d->size - cur < PNG_CRC_SIZE)
            return fail(err, errsize, "PNG file is truncated");
        if (png_crc_update(d->crc_table, png_crc_update(d->crc_table, 0, type, 4), d->file + start, len) !=
            png_be32(d->file + cur))
            return fail(err, errsize, "PNG chunk '%.4s' has a bad CRC", (const char *)type);
        cur += PNG_CRC_SIZE;
    }
}

/* Walks the chunks after the image data like Pillow's PngImageFile.load_end: a chunk
 * header that is missing or malformed ends the walk quietly, chunk data must be
 * complete and pass its handler, CRCs are not read. */
static int png_read_trailer(png_decoder *d, size_t cur, char *err, size_t errsize)
{
    size_t len;
    const unsigned char *type;

    for (;;) {
        cur = d->size - cur < PNG_CRC_SIZE ? d->size : cur + PNG_CRC_SIZE;
        if (d->size - cur < PNG_CHUNK_HEAD)
            return 0;
        len = png_be32(d->file + cur);
        type = d->file + cur + 4;
        cur += PNG_CHUNK_HEAD;
        if (!png_is_chunk_type(type) || png_type_is(type, "IEND") ||
            (png_type_is(type, "fcTL") && d->animated))
            return 0;
        if (png_type_is(type, "fdAT") && png_fdat_sequence(d, &cur, &len, err, errsize) != 0)
            return -1;
        if (len > d->size - cur)
            return fail(err, errsize, "PNG chunk '%.4s' runs past the end of the file", (const char *)type);
        if (!png_type_is(type, "IDAT") && !png_type_is(type, "fdAT") &&
            png_handle_chunk(d, type, d->file + cur, len, err, errsize) != 0)
            return -1;
        cur += len;
    }
}

/* Reads the image data the way Pillow does: one IDAT (or DDAT, or fdAT after its sequence
 * number) after another, in blocks of at most 64 KiB; the chunk CRCs are skipped unread. */
typedef struct png_data_reader {
    inflate_input in;              /* first member: the inflater sees only this */
    png_decoder *d;
    size_t cur;                    /* file position */
    size_t chunk_left;             /* data of the current chunk not yet read */
} png_data_reader;

/* inflate_input refill: the next block of image data, or 0 at the end of the image data. */
static int png_data_refill(inflate_input *in)
{
    png_data_reader *r = (png_data_reader *)in;
    png_decoder *d = r->d;
    size_t len, n;
    const unsigned char *type;

    while (r->chunk_left == 0) {
        r->cur = d->size - r->cur < PNG_CRC_SIZE ? d->size : r->cur + PNG_CRC_SIZE;
        if (d->size - r->cur < PNG_CHUNK_HEAD)
            return 0;
        len = png_be32(d->file + r->cur);
        type = d->file + r->cur + 4;
        r->cur += PNG_CHUNK_HEAD;
        if (png_type_is(type, "fdAT")) {
            if (png_fdat_sequence(d, &r->cur, &len, NULL, 0) != 0)
                return 0;
        } else if (!png_type_is(type, "IDAT") && !png_type_is(type, "DDAT")) {
            return 0;
        }
        r->chunk_left = len;
    }
    n = r->chunk_left < PNG_READ_BLOCK ? r->chunk_left : PNG_READ_BLOCK;
    r->chunk_left -= n;
    if (n > d->size - r->cur)
        n = d->size - r->cur;
    if (n == 0)
        return 0;
    in->next = d->file + r->cur;
    in->avail = n;
    r->cur += n;
    return 1;
}

/* The PNG filter predictor of a byte from its left (a), upper (b) and upper-left (c) neighbours. */
static unsigned png_predict(int filter, unsigned a, unsigned b, unsigned c)
{
    int pa, pb, pc;
    switch (filter) {
    case PNG_FILTER_SUB:
        return a;
    case PNG_FILTER_UP:
        return b;
    case PNG_FILTER_AVERAGE:
        return (a + b) / 2;
    case PNG_FILTER_PAETH:
        pa = abs((int)b - (int)c);
        pb = abs((int)a - (int)c);
        pc = abs((int)a + (int)b - 2 * (int)c);
        return (pa <= pb && pa <= pc) ? a : (pb <= pc) ? b : c;
    default:
        return 0;
    }
}

/* Undoes the filter of row[1..len] (row[0] is the filter type) given the previous row. */
static void png_unfilter(unsigned char *row, const unsigned char *prev, size_t len, size_t bpp)
{
    size_t i;
    int filter = row[0];
    if (filter == PNG_FILTER_NONE)
        return;
    for (i = 1; i <= len; i++) {
        unsigned a = i > bpp ? row[i - bpp] : 0, c = i > bpp ? prev[i - bpp] : 0;
        row[i] = (unsigned char)(row[i] + png_predict(filter, a, prev[i], c));
    }
}

/* Builds the RGB of every 8-bit gray level or palette index: a gray ramp, overlaid with
 * the palette when Pillow applies one; returns how gray samples scale to 8 bits. */
static int png_build_lut(const png_decoder *d, unsigned char lut[PNG_LUT_SIZE])
{
    size_t i, entries = d->have_palette ? d->palette_len / 3 : 0;
    for (i = 0; i < PNG_PALETTE_ENTRIES; i++)
        lut[3 * i] = lut[3 * i + 1] = lut[3 * i + 2] = (unsigned char)i;
    if (entries > 0)
        memcpy(lut, d->palette, 3 * entries);
    if (d->color == PNG_PALETTE || d->depth >= 8)
        return 1;
    return PNG_SAMPLE_MAX / ((1 << d->depth) - 1); /* 1-bit 255, 2-bit 85, 4-bit 17 */
}

/* Converts n pixels of an unfiltered row to RGB, writing them step bytes apart. */
static void png_row_to_rgb(const png_decoder *d, const unsigned char *lut, int scale,
                           const unsigned char *row, size_t n, unsigned char *dst, size_t step)
{
    size_t k, s = d->depth == 16 ? 2 : 1;
    size_t pixel = s * (size_t)png_channels(d->depth, d->color);
    const unsigned char *p;
    unsigned v;

    for (k = 0; k < n; k++, dst += step) {
        if ((d->color == PNG_GRAY || d->color == PNG_PALETTE) && d->depth < 8) {
            size_t bit = k * (size_t)d->depth;
            unsigned shift = 8u - (unsigned)d->depth - (unsigned)(bit % 8);
            v = (row[bit / 8] >> shift) & ((1u << d->depth) - 1);
            memcpy(dst, lut + 3 * (v * (unsigned)scale), 3);
            continue;
        }
        p = row + k * pixel;
        if (d->color == PNG_RGB || d->color == PNG_RGBA) {
            dst[0] = p[0];
            dst[1] = p[s];
            dst[2] = p[2 * s];
        } else if (d->color == PNG_GRAY && d->depth == 16) {
            v = (unsigned)p[0] << 8 | p[1];
            dst[0] = dst[1] = dst[2] = (unsigned char)(v > PNG_SAMPLE_MAX ? PNG_SAMPLE_MAX : v);
        } else if (d->depth == 16) { /* gray+alpha 16: Pillow unpacks to RGBA, high bytes */
            dst[0] = dst[1] = dst[2] = p[0];
        } else { /* gray 8, palette 8, gray+alpha 8 */
            memcpy(dst, lut + 3 * p[0], 3);
        }
    }
}

/* Frame geometry: the region the image data fills, and the pixel offsets Pillow uses. */
typedef struct png_frame {
    uint32_t x, y, w, h;
} png_frame;

/* Number of pixels of a pass along one axis of n pixels, starting at first, every step. */
static uint32_t png_pass_size(uint32_t n, unsigned first, unsigned step)
{
    return n > first ? (n - first + step - 1) / step : 0;
}

/* Inflates, unfilters and converts the image data into rgb (already holding the zero
 * pixel everywhere); *end_pos gets the file position where Pillow stops reading. */
static int png_decode_pixels(png_decoder *d, const png_frame *f, const unsigned char *lut, int scale,
                             unsigned char *rgb, size_t *end_pos, char *err, size_t errsize)
{
    const unsigned char (*passes)[4] = d->interlaced ? png_adam7 : &png_single_pass;
    int npasses = d->interlaced ? PNG_ADAM7_PASSES : 1, pass, last_pass = -1, rc, last, status = 0;
    size_t bits = (size_t)d->depth * (size_t)png_channels(d->depth, d->color), bpp = (bits + 7) / 8;
    size_t max_row = ((size_t)f->w * bits + 7) / 8, row_len, done, stride = 3 * (size_t)d->width;
    uint32_t cols, rows, r, x0 = d->interlaced ? 0 : f->x, y0 = d->interlaced ? 0 : f->y;
    unsigned char *buf, *cur, *prev, *swap;
    png_data_reader reader;
    inflate_state *z = png_inflater(d);

    buf = malloc(2 * (max_row + 1));
    if (!z || !buf) {
        free(buf);
        return fail(err, errsize, "out of memory");
    }
    for (pass = 0; pass < npasses; pass++)
        if (png_pass_size(f->w, passes[pass][0], passes[pass][2]) &&
            png_pass_size(f->h, passes[pass][1], passes[pass][3]))
            last_pass = pass;
    reader.in.next = NULL;
    reader.in.avail = 0;
    reader.in.refill = png_data_refill;
    reader.d = d;
    reader.cur = d->data_pos;
    reader.chunk_left = d->data_len;
    inflate_reset(z, &reader.in);
    cur = buf;
    prev = buf + max_row + 1;
    for (pass = 0; pass <= last_pass; pass++) {
        const unsigned char *ps = passes[pass];
        cols = png_pass_size(f->w, ps[0], ps[2]);
        rows = png_pass_size(f->h, ps[1], ps[3]);
        if (cols == 0 || rows == 0)
            continue;
        row_len = ((size_t)cols * bits + 7) / 8;
        memset(prev, 0, row_len + 1);
        for (r = 0; r < rows; r++) {
            last = pass == last_pass && r == rows - 1;
            rc = inflate_run(z, cur, row_len + 1, last, &done);
            if (rc == INFLATE_BAD) {
                status = fail(err, errsize, "PNG image data is corrupt (zlib error)");
                goto finish;
            }
            if (rc == INFLATE_STARVED || done < row_len + 1 ||
                (rc == INFLATE_END && z->refills_at_full != z->refills)) {
                status = fail(err, errsize, "PNG image data is truncated");
                goto finish;
            }
            if (cur[0] >= PNG_FILTER_TYPES) {
                status = fail(err, errsize, "PNG image data uses an unknown filter type (%d)", cur[0]);
                goto finish;
            }
            png_unfilter(cur, prev, row_len, bpp);
            png_row_to_rgb(d, lut, scale, cur + 1, cols,
                           rgb + (y0 + ps[1] + (size_t)r * ps[3]) * stride + 3 * ((size_t)x0 + ps[0]),
                           3 * (size_t)ps[2]);
            if (rc == INFLATE_END) /* stream ended at a row boundary: the remaining rows stay 0 */
                goto finish;
            swap = cur;
            cur = prev;
            prev = swap;
        }
    }
finish:
    free(buf);
    *end_pos = reader.chunk_left > d->size - reader.cur ? d->size : reader.cur + reader.chunk_left;
    return status;
}

/* Checks everything Pillow checks between reading the header and decoding, and sets up
 * the frame, the lookup table and its gray scale. */
static int png_prepare(png_decoder *d, size_t max_pixels, png_frame *f, unsigned char *lut, int *scale,
                       char *err, size_t errsize)
{
    uint64_t pixels = (uint64_t)d->width * d->height;
    int bits = d->depth * png_channels(d->depth, d->color);
    int gray_mode = (d->color == PNG_GRAY && d->depth > 1 && d->depth < 16) ||
                    (d->color == PNG_GRAY_ALPHA && d->depth == 8);

    if (d->width == 0 || d->height == 0)
        return fail(err, errsize, "PNG image has zero width or height");
    if (d->width > INT_MAX || d->height > INT_MAX || pixels > PNG_BOMB_PIXELS)
        return fail(err, errsize, "PNG image is too large (%lux%lu)", (unsigned long)d->width,
                    (unsigned long)d->height);
    if (pixels > max_pixels)
        return fail(err, errsize, "PNG image has %llu pixels, more than the limit of %llu",
                    (unsigned long long)pixels, (unsigned long long)max_pixels);
    /* Pillow attaches a PLTE read while the mode was "P" even when a later IHDR changed the
     * mode: an "L" or "LA" image then becomes palette-mapped, other modes fail */
    if (d->have_palette && d->color != PNG_PALETTE && !gray_mode)
        return fail(err, errsize, "PNG has a palette that does not fit its colour type");
    if (d->have_palette && d->palette_len / 3 > PNG_PALETTE_ENTRIES)
        return fail(err, errsize, "PNG palette has more than 256 entries");
    /* convert() then passes the missing palette to putpalette, which raises */
    if (d->color == PNG_PALETTE && !d->have_palette && d->trns_value)
        return fail(err, errsize, "PNG has a transparent colour but no palette");
    f->x = 0;
    f->y = 0;
    f->w = d->width;
    f->h = d->height;
    if (d->frame_is_bbox && !(d->bbox_x == 0 && d->bbox_w == 0)) {
        f->x = d->bbox_x;
        f->y = d->bbox_y;
        f->w = d->bbox_w;
        f->h = d->bbox_h;
        if (f->w == 0 || f->h == 0 || (uint64_t)f->x + f->w > d->width || (uint64_t)f->y + f->h > d->height)
            return fail(err, errsize, "APNG frame lies outside the image");
    }
    if (f->w > (uint32_t)(INT_MAX / bits - 7)) /* Pillow's decoder setup refuses such rows */
        return fail(err, errsize, "PNG rows are too long");
    *scale = png_build_lut(d, lut);
    return 0;
}

/* Decodes a PNG held in memory into 8-bit RGB exactly as Pillow 9.4's
 * Image.open(...).convert("RGB") does. Returns 0, or -1 with *out empty and a message. */
static int png_decode(const unsigned char *data, size_t size, size_t max_pixels,
                      loupe_image *out, char *err, size_t errsize)
{
    static const unsigned char zero_sample[8] = {0}; /* one pixel of any format */
    png_decoder d;
    png_frame f = {0, 0, 0, 0};
    unsigned char lut[PNG_LUT_SIZE], zero[3], *rgb = NULL;
    size_t npix, i, end_pos = 0;
    uint32_t width, height;
    int scale = 1, rc = -1;

    out->width = out->height = 0;
    out->rgb = NULL;
    if (!data || size < PNG_SIGNATURE_SIZE || memcmp(data, png_signature, PNG_SIGNATURE_SIZE) != 0)
        return fail(err, errsize, "not a PNG file");
    memset(&d, 0, sizeof d);
    d.file = data;
    d.size = size;
    png_crc_init(d.crc_table);
    if (png_read_header(&d, err, errsize) != 0 || png_prepare(&d, max_pixels, &f, lut, &scale, err, errsize) != 0)
        goto done;
    /* the image keeps this size: an IHDR after the image data (read by the trailer) changes
     * d.width and d.height but, as in Pillow, not the image */
    width = d.width;
    height = d.height;
    npix = (size_t)width * height;
    if (npix > SIZE_MAX / 3 || !(rgb = malloc(3 * npix))) {
        fail(err, errsize, "out of memory");
        goto done;
    }
    /* Pillow's image starts as zeros; convert("RGB") maps 0 like any sample */
    png_row_to_rgb(&d, lut, scale, zero_sample, 1, zero, 3);
    for (i = 0; i < npix; i++)
        memcpy(rgb + 3 * i, zero, 3);
    if (png_decode_pixels(&d, &f, lut, scale, rgb, &end_pos, err, errsize) != 0 ||
        png_read_trailer(&d, end_pos, err, errsize) != 0)
        goto done;
    out->width = (int)width;
    out->height = (int)height;
    out->rgb = rgb;
    rgb = NULL;
    rc = 0;
done:
    free(rgb);
    free(d.z);
    return rc;
}

/* ---- PNG encoding: adaptive filters, fixed-Huffman deflate with greedy LZ77 ---- */

#define DEFLATE_HASH_BITS 15
#define DEFLATE_HASH_SIZE (1u << DEFLATE_HASH_BITS)
#define DEFLATE_HASH_MULTIPLIER 2654435761u /* 2^32 / golden ratio */
#define DEFLATE_MIN_MATCH 3
#define DEFLATE_MAX_MATCH 258
#define DEFLATE_NO_POSITION SIZE_MAX
#define ZLIB_HEADER_CMF 0x78           /* deflate, 32 KiB window */
#define ZLIB_HEADER_FLG 0x01           /* makes CMF*256 + FLG a multiple of 31 */
#define PNG_MAX_CHUNK_LEN 0x7FFFFFFFu  /* chunk lengths are limited to 2^31 - 1 */
#define PNG_ENCODE_DEPTH 8            /* bits per sample written */

/* A little-endian bit writer into a buffer sized in advance. */
typedef struct deflate_writer {
    unsigned char *buf;
    size_t pos;
    uint32_t bits;
    int nbits;
} deflate_writer;

/* Appends n <= 24 bits, least significant first. */
static void deflate_put_bits(deflate_writer *w, uint32_t value, int n)
{
    w->bits |= value << w->nbits;
    w->nbits += n;
    while (w->nbits >= 8) {
        w->buf[w->pos++] = (unsigned char)w->bits;
        w->bits >>= 8;
        w->nbits -= 8;
    }
}

/* Appends a Huffman code of len bits, most significant bit first. */
static void deflate_put_code(deflate_writer *w, uint32_t code, int len)
{
    uint32_t reversed = 0;
    int i;
    for (i = 0; i < len; i++)
        reversed |= ((code >> i) & 1u) << (len - 1 - i);
    deflate_put_bits(w, reversed, len);
}

/* Appends a literal/length symbol in the fixed code (its canonical codes for the four
 * symbol ranges start at 0x30, 0x190, 0 and 0xC0). */
static void deflate_put_litlen(deflate_writer *w, unsigned sym)
{
    if (sym < 144)
        deflate_put_code(w, 0x30 + sym, 8);
    else if (sym < 256)
        deflate_put_code(w, 0x190 + sym - 144, 9);
    else if (sym < 280)
        deflate_put_code(w, sym - 256, 7);
    else
        deflate_put_code(w, 0xC0 + sym - 280, 8);
}

/* Appends a match of len bytes at distance dist. */
static void deflate_put_match(deflate_writer *w, unsigned len, unsigned dist)
{
    int i = INFLATE_NUM_LENGTHS - 1, j = INFLATE_MAX_HDIST - 1;
    while (inflate_length_base[i] > len)
        i--;
    deflate_put_litlen(w, INFLATE_FIRST_LENGTH_SYMBOL + (unsigned)i);
    deflate_put_bits(w, len - inflate_length_base[i], inflate_length_extra[i]);
    while (inflate_dist_base[j] > dist)
        j--;
    deflate_put_code(w, (uint32_t)j, INFLATE_FIXED_DIST_BITS);
    deflate_put_bits(w, dist - inflate_dist_base[j], inflate_dist_extra[j]);
}

/* Hash of the 3 bytes at p, for finding earlier occurrences (Fibonacci hashing). */
static unsigned deflate_hash(const unsigned char *p)
{
    uint32_t v = (uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2];
    return (unsigned)((v * DEFLATE_HASH_MULTIPLIER) >> (32 - DEFLATE_HASH_BITS));
}

/* Compresses src[0..n) as a zlib stream of one fixed-Huffman block into dst, which
 * holds at least n + n/8 + 16 bytes; head is DEFLATE_HASH_SIZE positions of scratch.
 * Returns the compressed size. */
static size_t deflate_fixed(const unsigned char *src, size_t n, unsigned char *dst, size_t *head)
{
    deflate_writer w;
    size_t i = 0, j, cand = 0, len, max;
    unsigned h;

    w.buf = dst;
    w.pos = 0;
    w.bits = 0;
    w.nbits = 0;
    deflate_put_bits(&w, ZLIB_HEADER_CMF, 8);
    deflate_put_bits(&w, ZLIB_HEADER_FLG, 8);
    deflate_put_bits(&w, 1, 1); /* final block */
    deflate_put_bits(&w, INFLATE_FIXED_BLOCK, 2);
    for (j = 0; j < DEFLATE_HASH_SIZE; j++)
        head[j] = DEFLATE_NO_POSITION;
    while (i < n) {
        len = 0;
        if (n - i >= DEFLATE_MIN_MATCH) {
            h = deflate_hash(src + i);
            cand = head[h];
            head[h] = i;
            if (cand != DEFLATE_NO_POSITION && i - cand <= INFLATE_WINDOW_SIZE) {
                max = n - i < DEFLATE_MAX_MATCH ? n - i : DEFLATE_MAX_MATCH;
                while (len < max && src[cand + len] == src[i + len])
                    len++;
            }
        }
        if (len >= DEFLATE_MIN_MATCH) {
            deflate_put_match(&w, (unsigned)len, (unsigned)(i - cand));
            for (j = i + 1; j < i + len && n - j >= DEFLATE_MIN_MATCH; j++)
                head[deflate_hash(src + j)] = j;
            i += len;
        } else {
            deflate_put_litlen(&w, src[i++]);
        }
    }
    deflate_put_litlen(&w, INFLATE_END_OF_BLOCK);
    deflate_put_bits(&w, 0, 7); /* flush to a byte boundary */
    png_put_be32(w.buf + w.pos, adler32_update(1, src, n));
    return w.pos + ZLIB_ADLER_SIZE;
}

/* Filters one row (prev NULL: the row above is zeros) with the filter type whose output has
 * the smallest sum of absolute values as signed bytes; writes the type byte, then the bytes. */
static void png_filter_row(const unsigned char *row, const unsigned char *prev, size_t len, size_t bpp,
                           unsigned char *dst)
{
    unsigned long best_sum = ULONG_MAX, sum;
    int filter, best = PNG_FILTER_NONE;
    size_t i;

    for (filter = 0; filter <= PNG_FILTER_TYPES; filter++) {
        int f = filter < PNG_FILTER_TYPES ? filter : best; /* last round: write the best one */
        sum = 0;
        for (i = 0; i < len; i++) {
            unsigned a = i >= bpp ? row[i - bpp] : 0, b = prev ? prev[i] : 0;
            unsigned c = prev && i >= bpp ? prev[i - bpp] : 0;
            unsigned char v = (unsigned char)(row[i] - png_predict(f, a, b, c));
            if (filter == PNG_FILTER_TYPES)
                dst[1 + i] = v;
            else
                sum += v < 128 ? v : 256u - v;
        }
        if (filter < PNG_FILTER_TYPES && sum < best_sum) {
            best_sum = sum;
            best = filter;
        }
    }
    dst[0] = (unsigned char)best;
}

/* Writes one chunk (length, type, data, CRC) at p; returns the bytes written. */
static size_t png_put_chunk(unsigned char *p, const uint32_t crc_table[256], const char *type,
                            const unsigned char *data, size_t len)
{
    png_put_be32(p, (uint32_t)len);
    memcpy(p + 4, type, 4);
    if (len)
        memmove(p + PNG_CHUNK_HEAD, data, len);
    png_put_be32(p + PNG_CHUNK_HEAD + len, png_crc_update(crc_table, 0, p + 4, 4 + len));
    return PNG_CHUNK_HEAD + len + PNG_CRC_SIZE;
}

/* Encodes an 8-bit gray (channels 1) or RGB (channels 3) image as a PNG in a malloc'd
 * buffer (*png, *png_size). Returns 0, or -1 with a message. */
int loupe_png_encode(const unsigned char *pixels, int width, int height, int channels,
                      unsigned char **png, size_t *png_size, char *err, size_t errsize)
{
    uint32_t crc_table[256];
    unsigned char ihdr[PNG_IHDR_SIZE], *filtered = NULL, *file = NULL, *p;
    size_t *head = NULL, row_len, raw_size, bound, zsize, y;
    int rc = -1;

    if (png)
        *png = NULL;
    if (png_size)
        *png_size = 0;
    if (!pixels || !png || !png_size || width <= 0 || height <= 0 || (channels != 1 && channels != 3))
        return fail(err, errsize, "invalid arguments to the PNG encoder");
    if ((size_t)width > (PNG_MAX_CHUNK_LEN - 1) / (size_t)channels ||
        (size_t)width * (size_t)channels + 1 > PNG_MAX_CHUNK_LEN / (size_t)height)
        return fail(err, errsize, "image too large to encode as PNG");
    row_len = (size_t)width * (size_t)channels;
    raw_size = (row_len + 1) * (size_t)height;
    bound = raw_size + raw_size / 8 + 16; /* fixed Huffman: at most 9 bits a byte, plus framing */
    if (bound > PNG_MAX_CHUNK_LEN)
        return fail(err, errsize, "image too large to encode as PNG");
    filtered = malloc(raw_size);
    head = malloc(DEFLATE_HASH_SIZE * sizeof *head);
    file = malloc(PNG_SIGNATURE_SIZE + 3 * (PNG_CHUNK_HEAD + PNG_CRC_SIZE) + PNG_IHDR_SIZE + bound);
    if (!filtered || !head || !file) {
        fail(err, errsize, "out of memory");
        goto done;
    }
    for (y = 0; y < (size_t)height; y++)
        png_filter_row(pixels + y * row_len, y ? pixels + (y - 1) * row_len : NULL, row_len,
                       (size_t)channels, filtered + y * (row_len + 1));
    png_crc_init(crc_table);
    p = file;
    memcpy(p, png_signature, PNG_SIGNATURE_SIZE);
    p += PNG_SIGNATURE_SIZE;
    png_put_be32(ihdr, (uint32_t)width);
    png_put_be32(ihdr + 4, (uint32_t)height);
    ihdr[8] = PNG_ENCODE_DEPTH;
    ihdr[9] = channels == 1 ? PNG_GRAY : PNG_RGB;  /* colour type */
    ihdr[10] = ihdr[11] = ihdr[12] = 0;            /* deflate, adaptive filtering, no interlace */
    p += png_put_chunk(p, crc_table, "IHDR", ihdr, PNG_IHDR_SIZE);
    zsize = deflate_fixed(filtered, raw_size, p + PNG_CHUNK_HEAD, head);
    p += png_put_chunk(p, crc_table, "IDAT", p + PNG_CHUNK_HEAD, zsize); /* data already in place */
    p += png_put_chunk(p, crc_table, "IEND", NULL, 0);
    *png = file;
    *png_size = (size_t)(p - file);
    file = NULL;
    rc = 0;
done:
    free(filtered);
    free(head);
    free(file);
    return rc;
}

/* ---- PPM/PGM: binary P6 and P5 with Pillow 9.4's semantics ----
 *
 * ppm_decode gives the pixels of Pillow 9.4's Image.open(f).convert("RGB") and fails
 * where Pillow raises:
 *  - Header: the magic is read up to whitespace (at most 6 bytes); then width, height
 *    and maxval, each a token of at most 10 bytes after optional whitespace, parsed
 *    like Python's int() (sign, '_' between digits). A '#' starts a comment through
 *    CR or LF wherever it appears, even inside a token (whose parts then join up).
 *    The one whitespace byte ending maxval is the last header byte.
 *  - maxval 255 (and a P5 with 65535) is copied raw; other maxvals are rescaled per
 *    sample to round(v / maxval * M) (round half to even, M = 255; for a P5 with
 *    maxval > 255, M = 65535 into a 32-bit "I" image), capped at M. A P5 whose maxval
 *    exceeds 255 is an "I" image, and I -> RGB clamps to 255.
 *  - Truncated pixel data fails; bytes after the pixels are ignored. */


#define PPM_MAGIC_MAX 6             /* Pillow reads at most this many magic bytes */
#define PPM_TOKEN_MAX 10            /* longest header token Pillow accepts */
#define PPM_MAXVAL_LIMIT 65536      /* maxval must be below this */
#define PPM_BYTE_MAXVAL 255         /* the maxval stored as plain bytes */
#define PPM_WORD_MAXVAL 65535       /* the maxval a P5 stores as raw 16-bit */
#define PPM_BOMB_PIXELS 178956970u  /* Pillow's DecompressionBombError threshold */

/* A read position in the file. */
typedef struct ppm_reader {
    const unsigned char *data;
    size_t size, pos;
} ppm_reader;

/* Returns 1 for the whitespace bytes Pillow's PPM reader knows. */
static int ppm_is_space(int c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

/* Reads one header token as Pillow does; returns its length, 0 at the end of the file,
 * or PPM_TOKEN_MAX + 1 when it is too long. */
static size_t ppm_read_token(ppm_reader *r, char token[PPM_TOKEN_MAX + 1])
{
    size_t n = 0;
    while (n <= PPM_TOKEN_MAX && r->pos < r->size) {
        unsigned char c = r->data[r->pos++];
        if (ppm_is_space(c)) {
            if (n > 0)
                break;
        } else if (c == '#') {
            while (r->pos < r->size && r->data[r->pos] != '\r' && r->data[r->pos] != '\n')
                r->pos++;
            if (r->pos < r->size)
                r->pos++;
        } else {
            token[n++] = (char)c;
        }
    }
    return n;
}

/* Parses a token like Python's int(): optional sign, decimal digits with single
 * underscores between them. Returns 0 and *value, or -1. */
static int ppm_parse_int(const char *s, size_t n, long long *value)
{
    size_t i = 0;
    int negative = 0, digits = 0;
    long long v = 0;

    if (i < n && (s[i] == '+' || s[i] == '-'))
        negative = s[i++] == '-';
    for (; i < n; i++) {
        if (s[i] == '_' && digits > 0 && i + 1 < n && s[i + 1] >= '0' && s[i + 1] <= '9')
            continue;
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = 10 * v + (s[i] - '0'); /* at most 10 digits: no overflow */
        digits++;
    }
    if (digits == 0)
        return -1;
    *value = negative ? -v : v;
    return 0;
}

/* Reads the next header number. */
static int ppm_read_number(ppm_reader *r, long long *value, char *err, size_t errsize)
{
    char token[PPM_TOKEN_MAX + 1];
    size_t n = ppm_read_token(r, token);
    if (n == 0)
        return fail(err, errsize, "PPM header ends early");
    if (n > PPM_TOKEN_MAX)
        return fail(err, errsize, "PPM header has a token longer than %d bytes", PPM_TOKEN_MAX);
    if (ppm_parse_int(token, n, value) != 0)
        return fail(err, errsize, "PPM header has a malformed number");
    return 0;
}

/* Pillow's rescaling of a sample: min(out_max, round(v / maxval * out_max)), half to even. */
static unsigned ppm_rescale(unsigned v, unsigned maxval, unsigned out_max)
{
    double ratio = (double)v / (double)maxval; /* two roundings to double, as in Python */
    double scaled = ratio * (double)out_max;
    double rounded = nearbyint(scaled);
    return rounded > out_max ? out_max : (unsigned)rounded;
}

/* Decodes a binary PGM (P5) or PPM (P6) held in memory into 8-bit RGB exactly as Pillow
 * 9.4's Image.open(...).convert("RGB") does. Returns 0, or -1 with *out empty and a message. */
static int ppm_decode(const unsigned char *data, size_t size, size_t max_pixels,
                      loupe_image *out, char *err, size_t errsize)
{
    ppm_reader r;
    char magic[PPM_MAGIC_MAX];
    size_t n = 0, channels, sample_bytes, npix, nsamples, i;
    long long width, height, maxval;
    unsigned out_max, v, c;
    unsigned char *rgb;

    out->width = out->height = 0;
    out->rgb = NULL;
    r.data = data;
    r.size = data ? size : 0;
    r.pos = 0;
    while (n < PPM_MAGIC_MAX && r.pos < r.size && !ppm_is_space(r.data[r.pos]))
        magic[n++] = (char)r.data[r.pos++];
    if (n < PPM_MAGIC_MAX && r.pos < r.size)
        r.pos++; /* the whitespace after the magic */
    if (n != 2 || magic[0] != 'P' || (magic[1] != '5' && magic[1] != '6'))
        return fail(err, errsize, "not a binary PGM (P5) or PPM (P6) file");
    channels = magic[1] == '6' ? 3 : 1;
    if (ppm_read_number(&r, &width, err, errsize) != 0 || ppm_read_number(&r, &height, err, errsize) != 0 ||
        ppm_read_number(&r, &maxval, err, errsize) != 0)
        return -1;
    if (maxval <= 0 || maxval >= PPM_MAXVAL_LIMIT)
        return fail(err, errsize, "PPM maxval must be between 1 and 65535");
    if (width <= 0 || height <= 0)
        return fail(err, errsize, "PPM image has zero or negative size");
    if (width > INT_MAX || height > INT_MAX || (unsigned long long)width * (unsigned long long)height > PPM_BOMB_PIXELS)
        return fail(err, errsize, "PPM image is too large (%lldx%lld)", width, height);
    npix = (size_t)width * (size_t)height;
    if (npix > max_pixels)
        return fail(err, errsize, "PPM image has %llu pixels, more than the limit of %llu",
                    (unsigned long long)npix, (unsigned long long)max_pixels);
    sample_bytes = maxval > PPM_BYTE_MAXVAL ? 2 : 1;
    nsamples = npix * channels;
    if (nsamples * sample_bytes > r.size - r.pos)
        return fail(err, errsize, "PPM pixel data is truncated");
    /* a P5 with maxval > 255 becomes Pillow's 32-bit "I" image, scaled to 65535 */
    out_max = channels == 1 && maxval > PPM_BYTE_MAXVAL ? PPM_WORD_MAXVAL : PPM_BYTE_MAXVAL;
    rgb = malloc(3 * npix);
    if (!rgb)
        return fail(err, errsize, "out of memory");
    for (i = 0; i < nsamples; i++) {
        const unsigned char *p = r.data + r.pos + i * sample_bytes;
        v = sample_bytes == 2 ? (unsigned)p[0] << 8 | p[1] : p[0];
        if (maxval != PPM_BYTE_MAXVAL && !(channels == 1 && maxval == PPM_WORD_MAXVAL))
            v = ppm_rescale(v, (unsigned)maxval, out_max);
        v = v > PPM_BYTE_MAXVAL ? PPM_BYTE_MAXVAL : v; /* I -> RGB clamps */
        if (channels == 3) {
            rgb[i] = (unsigned char)v;
        } else {
            for (c = 0; c < 3; c++)
                rgb[3 * i + c] = (unsigned char)v;
        }
    }
    out->width = (int)width;
    out->height = (int)height;
    out->rgb = rgb;
    return 0;
}

/* ======================================================================
 * JPEG decoder
 *
 * Reproduces, bit for bit, what PIL 9.4 returns for
 * Image.open(path).convert("RGB") on a JPEG file.  PIL parses the markers
 * itself to pick the image mode, then hands the whole file to libjpeg-turbo
 * 2.1.5 with default settings, feeding it 64 KiB at a time through a
 * suspending data source.  So this decoder follows libjpeg-turbo's rules:
 * the accurate integer IDCT (as its x86-64 SIMD code computes it), "fancy"
 * chroma upsampling, the fixed-point YCbCr->RGB tables, Huffman and
 * arithmetic entropy coding (sequential and progressive), restart markers
 * and their resynchronisation, block smoothing of incomplete progressive
 * images, and its recovery from corrupt data, including the quirks of its
 * fast Huffman path.  On top of that it applies PIL's own header checks,
 * PIL's treatment of input that ends early (an error), the effect of PIL's
 * 64 KiB reads (libjpeg's arithmetic decoder cannot wait for the next one),
 * and PIL's CMYK -> RGB formula.
 *
 * Data flow: markers -> scans -> coefficient blocks -> IDCT -> sample
 * planes -> upsampling -> colour conversion -> RGB rows.  Files with a single
 * scan are inverse-transformed as each MCU is decoded; multi-scan files
 * (progressive or non-interleaved) first collect every coefficient.
 * ====================================================================== */

#define JPEG_BLOCK 8                   /* samples per block side */
#define JPEG_BLOCK_SIZE 64             /* coefficients per block */
#define JPEG_NATURAL_ORDER_SIZE 80     /* zig-zag table plus overrun guard */
#define JPEG_MAX_COMPONENTS 10         /* libjpeg's MAX_COMPONENTS */
#define JPEG_MAX_SCAN_COMPONENTS 4     /* components in one scan */
#define JPEG_MAX_MCU_BLOCKS 10         /* blocks in one MCU */
#define JPEG_MAX_SAMPLING 4            /* largest sampling factor */
#define JPEG_MAX_DIMENSION 65500       /* libjpeg's JPEG_MAX_DIMENSION */
#define JPEG_NUM_TABLES 4              /* quantisation and Huffman table slots */
#define JPEG_NUM_ARITH_TABLES 16       /* arithmetic conditioning table slots */
#define JPEG_MAX_SCANS 1000            /* refuse files with more scans (bounded work) */
#define JPEG_MAX_PASSES 64             /* decoded blocks may total 64 times the image's blocks */
#define JPEG_MAX_DATALESS_PASSES 2     /* ... but only 2 times when decoded after the data ran out */
#define JPEG_MIN_WORK 65536            /* block budget floor for tiny images */
#define JPEG_HUFF_LOOKAHEAD 8          /* bits resolved by one table lookup */
#define JPEG_HUFF_MAX_BITS 16          /* longest Huffman code */
#define JPEG_HUFF_SYMBOLS 256          /* symbols in a Huffman table */
#define JPEG_BIT_BUFFER_FILL 57        /* libjpeg-turbo refills its 64-bit buffer to >= 57 bits */
#define JPEG_PIL_READ_SIZE 65536       /* PIL passes the file to libjpeg in reads of this size */
#define JPEG_FAST_BYTES_PER_BLOCK 512  /* libjpeg-turbo's fast Huffman path needs this much input */
#define JPEG_FAST_REFILL_BITS 16       /* ... and refills its buffer when down to this many bits */
#define JPEG_FAST_REFILL_BYTES 6       /* ... by this many bytes */
#define JPEG_SMOOTH_COEFS 10           /* block smoothing predicts zig-zag coefficients 0..9 */
#define JPEG_ARITH_DC_BINS 64          /* arithmetic decoder statistics bins */
#define JPEG_ARITH_AC_BINS 256
#define JPEG_ARITH_FIXED_STATE 113     /* probability state for "fixed 0.5" bins */
#define JPEG_ARITH_STATES 114
#define JPEG_ARITH_HALF 0x8000         /* interval size below which the decoder renormalises */
#define JPEG_ARITH_MAX_MAGNITUDE 0x8000 /* a magnitude reaching this is corrupt data */
#define JPEG_ARITH_DC_X1 20            /* DC magnitude bins start here (T.81 Table F.4) */
#define JPEG_ARITH_AC_LOW_X2 189       /* AC magnitude bins for k <= Kx (T.81 Table F.5) */
#define JPEG_ARITH_AC_HIGH_X2 217      /* ... and for k > Kx */
#define JPEG_ARITH_BITS_OFFSET 14      /* magnitude bit bins follow their category bins */
#define JPEG_PIL_ICC_HEADER 14         /* "ICC_PROFILE\0", chunk number, chunk count */
#define JPEG_COLOR_SCALE_BITS 16       /* fixed point of libjpeg's YCbCr->RGB tables */

/* Marker codes (the byte after 0xFF). */
enum {
    JPEG_M_TEM = 0x01, JPEG_M_SOF0 = 0xC0, JPEG_M_SOF1 = 0xC1, JPEG_M_SOF2 = 0xC2,
    JPEG_M_DHT = 0xC4, JPEG_M_SOF9 = 0xC9, JPEG_M_SOF10 = 0xCA, JPEG_M_DAC = 0xCC,
    JPEG_M_RST0 = 0xD0, JPEG_M_RST7 = 0xD7, JPEG_M_SOI = 0xD8, JPEG_M_EOI = 0xD9,
    JPEG_M_SOS = 0xDA, JPEG_M_DQT = 0xDB, JPEG_M_DNL = 0xDC, JPEG_M_DRI = 0xDD,
    JPEG_M_APP0 = 0xE0, JPEG_M_APP2 = 0xE2, JPEG_M_APP13 = 0xED,
    JPEG_M_APP14 = 0xEE, JPEG_M_APP15 = 0xEF, JPEG_M_COM = 0xFE
};

/* Results of the marker-level readers.  JPEG_SUSPENDED means "the input
 * ended here": libjpeg would suspend and wait for more data, which PIL
 * cannot give, so whether that is fatal depends on where it happens. */
enum { JPEG_OK = 0, JPEG_FAILED = -1, JPEG_SUSPENDED = -2, JPEG_AT_SOS = 1, JPEG_AT_EOI = 2 };

/* What a scan carries. */
enum { JPEG_SCAN_SEQUENTIAL, JPEG_SCAN_DC_FIRST, JPEG_SCAN_AC_FIRST, JPEG_SCAN_DC_REFINE, JPEG_SCAN_AC_REFINE };

/* Colour spaces of the coded data (libjpeg's guess from the markers). */
enum { JPEG_CS_GRAY, JPEG_CS_YCBCR, JPEG_CS_RGB, JPEG_CS_CMYK, JPEG_CS_YCCK, JPEG_CS_UNKNOWN };

/* How a component is brought to full resolution (libjpeg-turbo jdsample.c). */
enum { JPEG_UP_FULL, JPEG_UP_H2V1_FANCY, JPEG_UP_H1V2_FANCY, JPEG_UP_H2V2_FANCY, JPEG_UP_REPLICATE };

/* Natural (row-major) position of each zig-zag index; the 16 trailing
 * entries absorb run lengths that overshoot index 63 in corrupt data. */
static const unsigned char jpeg_natural_order[JPEG_NATURAL_ORDER_SIZE] = {
     0,  1,  8, 16,  9,  2,  3, 10, 17, 24, 32, 25, 18, 11,  4,  5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13,  6,  7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
    63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63
};

/* Huffman tables of ITU-T T.81 Annex K.3, which libjpeg installs in slots 0
 * and 1 when a sequential Huffman file defines none (Motion-JPEG style). */
static const unsigned char jpeg_std_dc_luma_counts[17] = { 0, 0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0 };
static const unsigned char jpeg_std_dc_chroma_counts[17] = { 0, 0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0 };
static const unsigned char jpeg_std_dc_symbols[12] = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 };
static const unsigned char jpeg_std_ac_luma_counts[17] = { 0, 0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 125 };
static const unsigned char jpeg_std_ac_luma_symbols[162] = {
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07,
    0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52, 0xd1, 0xf0,
    0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25, 0x26, 0x27, 0x28,
    0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49,
    0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
    0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
    0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
    0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5,
    0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2,
    0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8,
    0xf9, 0xfa
};
static const unsigned char jpeg_std_ac_chroma_counts[17] = { 0, 0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 119 };
static const unsigned char jpeg_std_ac_chroma_symbols[162] = {
    0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71,
    0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33, 0x52, 0xf0,
    0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18, 0x19, 0x1a, 0x26,
    0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48,
    0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87,
    0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5,
    0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3,
    0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda,
    0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8,
    0xf9, 0xfa
};

/* Probability estimation state machine of the arithmetic decoder
 * (ITU-T T.81 Table D.2), plus libjpeg's extra state 113 for fixed 0.5. */
typedef struct {
    unsigned short qe;                 /* LPS probability estimate */
    unsigned char next_lps, next_mps;  /* next state after an LPS / an MPS */
    unsigned char switch_mps;          /* 1: an LPS in this state swaps the MPS sense */
} jpeg_arith_state;

static const jpeg_arith_state jpeg_arith_states[JPEG_ARITH_STATES] = {
    { 0x5a1d,   1,   1, 1 }, { 0x2586,  14,   2, 0 }, { 0x1114,  16,   3, 0 }, { 0x080b,  18,   4, 0 },
    { 0x03d8,  20,   5, 0 }, { 0x01da,  23,   6, 0 }, { 0x00e5,  25,   7, 0 }, { 0x006f,  28,   8, 0 },
    { 0x0036,  30,   9, 0 }, { 0x001a,  33,  10, 0 }, { 0x000d,  35,  11, 0 }, { 0x0006,   9,  12, 0 },
    { 0x0003,  10,  13, 0 }, { 0x0001,  12,  13, 0 }, { 0x5a7f,  15,  15, 1 }, { 0x3f25,  36,  16, 0 },
    { 0x2cf2,  38,  17, 0 }, { 0x207c,  39,  18, 0 }, { 0x17b9,  40,  19, 0 }, { 0x1182,  42,  20, 0 },
    { 0x0cef,  43,  21, 0 }, { 0x09a1,  45,  22, 0 }, { 0x072f,  46,  23, 0 }, { 0x055c,  48,  24, 0 },
    { 0x0406,  49,  25, 0 }, { 0x0303,  51,  26, 0 }, { 0x0240,  52,  27, 0 }, { 0x01b1,  54,  28, 0 },
    { 0x0144,  56,  29, 0 }, { 0x00f5,  57,  30, 0 }, { 0x00b7,  59,  31, 0 }, { 0x008a,  60,  32, 0 },
    { 0x0068,  62,  33, 0 }, { 0x004e,  63,  34, 0 }, { 0x003b,  32,  35, 0 }, { 0x002c,  33,   9, 0 },
    { 0x5ae1,  37,  37, 1 }, { 0x484c,  64,  38, 0 }, { 0x3a0d,  65,  39, 0 }, { 0x2ef1,  67,  40, 0 },
    { 0x261f,  68,  41, 0 }, { 0x1f33,  69,  42, 0 }, { 0x19a8,  70,  43, 0 }, { 0x1518,  72,  44, 0 },
    { 0x1177,  73,  45, 0 }, { 0x0e74,  74,  46, 0 }, { 0x0bfb,  75,  47, 0 }, { 0x09f8,  77,  48, 0 },
    { 0x0861,  78,  49, 0 }, { 0x0706,  79,  50, 0 }, { 0x05cd,  48,  51, 0 }, { 0x04de,  50,  52, 0 },
    { 0x040f,  50,  53, 0 }, { 0x0363,  51,  54, 0 }, { 0x02d4,  52,  55, 0 }, { 0x025c,  53,  56, 0 },
    { 0x01f8,  54,  57, 0 }, { 0x01a4,  55,  58, 0 }, { 0x0160,  56,  59, 0 }, { 0x0125,  57,  60, 0 },
    { 0x00f6,  58,  61, 0 }, { 0x00cb,  59,  62, 0 }, { 0x00ab,  61,  63, 0 }, { 0x008f,  61,  32, 0 },
    { 0x5b12,  65,  65, 1 }, { 0x4d04,  80,  66, 0 }, { 0x412c,  81,  67, 0 }, { 0x37d8,  82,  68, 0 },
    { 0x2fe8,  83,  69, 0 }, { 0x293c,  84,  70, 0 }, { 0x2379,  86,  71, 0 }, { 0x1edf,  87,  72, 0 },
    { 0x1aa9,  87,  73, 0 }, { 0x174e,  72,  74, 0 }, { 0x1424,  72,  75, 0 }, { 0x119c,  74,  76, 0 },
    { 0x0f6b,  74,  77, 0 }, { 0x0d51,  75,  78, 0 }, { 0x0bb6,  77,  79, 0 }, { 0x0a40,  77,  48, 0 },
    { 0x5832,  80,  81, 1 }, { 0x4d1c,  88,  82, 0 }, { 0x438e,  89,  83, 0 }, { 0x3bdd,  90,  84, 0 },
    { 0x34ee,  91,  85, 0 }, { 0x2eae,  92,  86, 0 }, { 0x299a,  93,  87, 0 }, { 0x2516,  86,  71, 0 },
    { 0x5570,  88,  89, 1 }, { 0x4ca9,  95,  90, 0 }, { 0x44d9,  96,  91, 0 }, { 0x3e22,  97,  92, 0 },
    { 0x3824,  99,  93, 0 }, { 0x32b4,  99,  94, 0 }, { 0x2e17,  93,  86, 0 }, { 0x56a8,  95,  96, 1 },
    { 0x4f46, 101,  97, 0 }, { 0x47e5, 102,  98, 0 }, { 0x41cf, 103,  99, 0 }, { 0x3c3d, 104, 100, 0 },
    { 0x375e,  99,  93, 0 }, { 0x5231, 105, 102, 0 }, { 0x4c0f, 106, 103, 0 }, { 0x4639, 107, 104, 0 },
    { 0x415e, 103,  99, 0 }, { 0x5627, 105, 106, 1 }, { 0x50e7, 108, 107, 0 }, { 0x4b85, 109, 103, 0 },
    { 0x5597, 110, 109, 0 }, { 0x504f, 111, 107, 0 }, { 0x5a10, 110, 111, 1 }, { 0x5522, 112, 109, 0 },
    { 0x59eb, 112, 111, 1 }, { 0x5a1d, 113, 113, 0 }
};

/* Block smoothing kernels of libjpeg-turbo 2.1.5 (jdcoefct.c), as 5x5 weights
 * over the DC values of the surrounding blocks (row-major, current block at
 * the centre), for zig-zag coefficients 0..9.  Set 0 applies when some AC
 * data is known, set 1 ("DC interpolation") when none of coefficients 1..9
 * was ever transmitted; set 0 predicts only coefficients 1..5. */
static const short jpeg_smooth_kernels[2][JPEG_SMOOTH_COEFS][25] = {
    {
        { 0 },
        { 0, 0, 0, 0, 0,   0, 0, 0, 0, 0,   -7, 50, 0, -50, 7,   0, 0, 0, 0, 0,   0, 0, 0, 0, 0 },
        { 0, 0, -7, 0, 0,   0, 0, 50, 0, 0,   0, 0, 0, 0, 0,   0, 0, -50, 0, 0,   0, 0, 7, 0, 0 },
        { 0, 0, -1, 0, 0,   0, 0, 13, 0, 0,   0, 0, -24, 0, 0,   0, 0, 13, 0, 0,   0, 0, -1, 0, 0 },
        { 0, -1, 0, 1, 0,   -1, 10, 0, -10, 1,   0, 0, 0, 0, 0,   1, -10, 0, 10, -1,   0, 1, 0, -1, 0 },
        { 0, 0, 0, 0, 0,   0, 0, 0, 0, 0,   -1, 13, -24, 13, -1,   0, 0, 0, 0, 0,   0, 0, 0, 0, 0 },
        { 0 }, { 0 }, { 0 }, { 0 }
    },
    {
        { -2, -6, -8, -6, -2,   -6, 6, 42, 6, -6,   -8, 42, 152, 42, -8,   -6, 6, 42, 6, -6,   -2, -6, -8, -6, -2 },
        { -1, -1, 0, 1, 1,   -3, 13, 0, -13, 3,   -3, 38, 0, -38, 3,   -3, 13, 0, -13, 3,   -1, -1, 0, 1, 1 },
        { -1, -3, -3, -3, -1,   -1, 13, 38, 13, -1,   0, 0, 0, 0, 0,   1, -13, -38, -13, 1,   1, 3, 3, 3, 1 },
        { 0, 0, 1, 0, 0,   0, 2, 7, 2, 0,   0, -5, -14, -5, 0,   0, 2, 7, 2, 0,   0, 0, 1, 0, 0 },
        { -1, 0, 0, 0, 1,   0, 9, 0, -9, 0,   0, 0, 0, 0, 0,   0, -9, 0, 9, 0,   1, 0, 0, 0, -1 },
        { 0, 0, 0, 0, 0,   0, 2, -5, 2, 0,   1, 7, -14, 7, 1,   0, 2, -5, 2, 0,   0, 0, 0, 0, 0 },
        { 0, 0, 0, 0, 0,   0, 1, 0, -1, 0,   0, 2, 0, -2, 0,   0, 1, 0, -1, 0,   0, 0, 0, 0, 0 },
        { 0, 0, 0, 0, 0,   0, 1, -3, 1, 0,   0, 0, 0, 0, 0,   0, -1, 3, -1, 0,   0, 0, 0, 0, 0 },
        { 0, 0, 0, 0, 0,   0, 1, 0, -1, 0,   0, -3, 0, 3, 0,   0, 1, 0, -1, 0,   0, 0, 0, 0, 0 },
        { 0, 0, 0, 0, 0,   0, 1, 2, 1, 0,   0, 0, 0, 0, 0,   0, -1, -2, -1, 0,   0, 0, 0, 0, 0 }
    }
};

/* A Huffman table as transmitted in a DHT segment. */
typedef struct {
    int defined;
    unsigned char counts[JPEG_HUFF_MAX_BITS + 1];  /* counts[l]: codes of length l */
    unsigned char symbols[JPEG_HUFF_SYMBOLS];      /* symbols in code order, zero padded */
} jpeg_huff_spec;

/* Decoding form of a Huffman table (libjpeg's d_derived_tbl). */
typedef struct {
    int32_t maxcode[JPEG_HUFF_MAX_BITS + 2];   /* largest code of each length, -1 if none */
    int32_t valoffset[JPEG_HUFF_MAX_BITS + 2]; /* symbol index minus code, per length */
    unsigned short lookup[1 << JPEG_HUFF_LOOKAHEAD]; /* (length << 8) | symbol for short codes */
    unsigned char symbols[JPEG_HUFF_SYMBOLS];
} jpeg_huff_table;

/* One image component: frame parameters, storage and output method. */
typedef struct {
    int id, h, v, quant_index;         /* from the frame header */
    int dc_table, ac_table;            /* from the latest scan header */
    int blocks_w, blocks_h;            /* blocks that hold image data */
    int coef_w, coef_h;                /* coefficient array size in blocks (whole MCUs) */
    int samples_w, samples_h;          /* libjpeg's downsampled_width / downsampled_height */
    int quant_latched;                 /* quantisation table copied at its first scan */
    uint16_t quant[JPEG_BLOCK_SIZE];   /* that table, natural order */
    int32_t idct_quant[JPEG_BLOCK_SIZE]; /* the same as libjpeg's signed 16-bit IDCT multipliers */
    int coef_bits[JPEG_BLOCK_SIZE];    /* progressive: Al of the latest scan per zig-zag index, -1 = none */
    int prev_coef_bits[JPEG_BLOCK_SIZE]; /* the same before the component's latest scan */
    int16_t *coefs;                    /* multi-scan files: coef_w * coef_h blocks */
    unsigned char *plane;              /* decoded samples, blocks_w*8 wide, blocks_h*8 high */
    size_t plane_stride;
    int upsample;                      /* JPEG_UP_* */
    int h_expand, v_expand;            /* replication factors for JPEG_UP_REPLICATE */
    unsigned char *row;                /* one row brought to full resolution */
} jpeg_component;

/* Everything the decoder knows about one file. */
typedef struct {
    const unsigned char *data;         /* the whole file */
    size_t size;
    size_t pos;                        /* next byte to read */
    size_t avail;                      /* end of the data PIL has handed to libjpeg so far */
    int can_suspend;                   /* 0 while the arithmetic decoder reads (it cannot wait) */
    int suspended;                     /* a reader needed more than PIL had handed over */
    char *err;
    size_t errsize;

    /* markers */
    int unread_marker;                 /* marker code already read but not processed, or 0 */
    int saw_soi, saw_sof, saw_jfif, saw_adobe, adobe_transform;
    int restart_interval;
    uint16_t quant_tables[JPEG_NUM_TABLES][JPEG_BLOCK_SIZE];
    int quant_defined[JPEG_NUM_TABLES];
    jpeg_huff_spec huff_dc[JPEG_NUM_TABLES], huff_ac[JPEG_NUM_TABLES];
    unsigned char arith_dc_low[JPEG_NUM_ARITH_TABLES], arith_dc_high[JPEG_NUM_ARITH_TABLES];
    unsigned char arith_ac_split[JPEG_NUM_ARITH_TABLES];

    /* frame */
    int progressive, arithmetic, precision, width, height, ncomp;
    jpeg_component comp[JPEG_MAX_COMPONENTS];
    int max_h, max_v, imcu_rows;
    int multiscan;                     /* coefficients are buffered until the end of the file */
    int color_space;                   /* JPEG_CS_* */

    /* current scan */
    int scan_count;
    int scan_ncomp;
    jpeg_component *scan_comp[JPEG_MAX_SCAN_COMPONENTS];
    int ss, se, ah, al;                /* spectral selection and successive approximation */
    int scan_kind;                     /* JPEG_SCAN_* */
    int mcus_per_row, mcu_rows, blocks_in_mcu;
    int mcu_member[JPEG_MAX_MCU_BLOCKS]; /* scan position of each block of an MCU */
    int next_restart;                  /* number of the next expected RSTn */
    unsigned restarts_left;            /* MCUs until the next restart marker */
    int last_good_imcu_row;            /* last iMCU row decoded with real data */
    uint64_t work_left;                /* blocks that may still be decoded */
    uint64_t dataless_left;            /* blocks that may still be decoded without data */

    /* Huffman decoding */
    jpeg_huff_table dc_tables[JPEG_NUM_TABLES], ac_tables[JPEG_NUM_TABLES];
    uint64_t bit_buffer;
    int bits_left;
    int out_of_data;                   /* hit a marker: rest of the segment decodes as zeros */
    int32_t last_dc[JPEG_MAX_SCAN_COMPONENTS];
    unsigned eob_run;
    int fast_hit_marker;               /* the fast path met a marker */

    /* arithmetic decoding */
    int64_t arith_c, arith_a;
    int arith_ct;                      /* -16 at start, 0..7 running, -1 after an error */
    int dc_context[JPEG_MAX_SCAN_COMPONENTS];
    unsigned char dc_stats[JPEG_NUM_ARITH_TABLES][JPEG_ARITH_DC_BINS];
    unsigned char ac_stats[JPEG_NUM_ARITH_TABLES][JPEG_ARITH_AC_BINS];
    unsigned char fixed_bin[4];

    /* failures detected inside the entropy decoders */
    int input_ended;                   /* needed a byte beyond the readable data */
    int bad_dc;                        /* progressive DC value overflowed */

    /* single-scan files: one MCU of coefficients */
    int16_t mcu_blocks[JPEG_MAX_MCU_BLOCKS][JPEG_BLOCK_SIZE];
    int16_t *mcu_ptr[JPEG_MAX_MCU_BLOCKS];

    /* output */
    int cr_to_r[256], cb_to_b[256];    /* libjpeg's YCbCr->RGB tables */
    int32_t cr_to_g[256], cb_to_g[256];
    int *colsums;                      /* h2v2 fancy upsampling work row */
} jpeg_decoder;

/* Wraps a 32-bit value to 16 bits the way a cast to libjpeg's JCOEF does. */
static int16_t jpeg_coef(uint32_t v)
{
    uint32_t low = v & 0xFFFFu;
    return (int16_t)(low >= 0x8000u ? (int32_t)low - 0x10000 : (int32_t)low);
}

/* Wraps a 64-bit value to 32 bits the way a cast to int does. */
static int32_t jpeg_wrap32(int64_t v)
{
    uint32_t low = (uint32_t)((uint64_t)v & 0xFFFFFFFFu);
    return (int32_t)((int64_t)(low ^ 0x80000000u) - (int64_t)0x80000000);
}

/* Floor division by 2^bits (an arithmetic right shift) without relying on
 * implementation-defined shifts of negative numbers. */
static int64_t jpeg_shift_down(int64_t v, int bits)
{
    int64_t d = (int64_t)1 << bits;
    return v >= 0 ? v / d : -((-v + d - 1) / d);
}

/* Turns a magnitude-category value into a signed coefficient (T.81 F.2.2.1). */
static int jpeg_extend(int r, int s)
{
    return r < (1 << (s - 1)) ? r - (1 << s) + 1 : r;
}

/* Ceiling of a / b for positive values. */
static int jpeg_div_up(long a, long b)
{
    return (int)((a + b - 1) / b);
}

/* Multiplies two sizes, reporting overflow. */
static int jpeg_mul_size(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > (size_t)-1 / a)
        return -1;
    *out = a * b;
    return 0;
}

/* Reads a big-endian 16-bit value. */
static unsigned jpeg_be16(const unsigned char *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

/* ---------------------------------------------------------------------
 * PIL's own header walk (JpegImagePlugin._open)
 * ------------------------------------------------------------------- */

/* What PIL learns from the header: the last frame header before the first scan. */
typedef struct {
    int layers, width, height;
} jpeg_pil_header;

/* Checks PIL's rule for ICC_PROFILE chunks at a frame header: after sorting,
 * the first chunk must be long enough to hold its chunk count. */
static int jpeg_pil_icc_ok(const unsigned char *first, size_t first_len)
{
    return first == NULL || first_len >= JPEG_PIL_ICC_HEADER;
}

/* Returns nonzero if byte string a sorts before b (Python bytes order). */
static int jpeg_bytes_less(const unsigned char *a, size_t alen, const unsigned char *b, size_t blen)
{
    size_t n = alen < blen ? alen : blen;
    int c = memcmp(a, b, n);
    return c < 0 || (c == 0 && alen < blen);
}

/* PIL's walk over the Photoshop "8BIM" resources of an APP13 segment: it
 * stops quietly on most malformations, but a resource that ends right after
 * its 2-byte id makes it fail. */
static int jpeg_pil_photoshop_ok(const unsigned char *s, size_t n)
{
    size_t off = 14;                   /* after "Photoshop 3.0\0" */
    while (off + 4 <= n && memcmp(s + off, "8BIM", 4) == 0) {
        size_t size;
        off += 4;
        if (off + 2 > n)
            return 1;
        off += 2;
        if (off >= n)
            return 0;
        off += 1 + (size_t)s[off];     /* resource name, padded to even length */
        off += off & 1;
        if (off + 4 > n)
            return 1;
        size = ((size_t)s[off] << 24) | ((size_t)s[off + 1] << 16) | ((size_t)s[off + 2] << 8) | s[off + 3];
        off += 4;
        if (size > n - off)
            return 1;
        off += size;
        off += off & 1;
    }
    return 1;
}

/* Walks the markers up to the first SOS as PIL's JPEG plugin does and
 * rejects what it rejects; reports the frame size and layer count. */
static int jpeg_pil_probe(const unsigned char *p, size_t n, jpeg_pil_header *hdr, char *err, size_t errsize)
{
    size_t pos = 3;
    int cur = 0xFF;
    const unsigned char *icc_first = NULL;
    size_t icc_first_len = 0;

    memset(hdr, 0, sizeof *hdr);
    if (n < 3 || p[0] != 0xFF || p[1] != 0xD8 || p[2] != 0xFF)
        return fail(err, errsize, "not a JPEG file");
    for (;;) {
        int code;
        size_t seg_len;
        const unsigned char *seg;

        if (cur != 0xFF) {             /* PIL skips junk between segments */
            if (pos >= n)
                return fail(err, errsize, "JPEG header ends before the first scan");
            cur = p[pos++];
            continue;
        }
        if (pos >= n)
            return fail(err, errsize, "JPEG header ends before the first scan");
        code = p[pos++];
        if (code == 0xFF)
            continue;                  /* fill byte: stay on 0xFF */
        if (code == 0x00) {
            if (pos >= n)
                return fail(err, errsize, "JPEG header ends before the first scan");
            cur = p[pos++];
            continue;
        }
        if (code < 0xC0)
            return fail(err, errsize, "invalid JPEG marker in the header");
        if (code == 0xC8 || (code >= JPEG_M_RST0 && code <= JPEG_M_EOI) || (code >= 0xF0 && code <= 0xFD)) {
            if (pos >= n)              /* parameterless as far as PIL is concerned */
                return fail(err, errsize, "JPEG header ends before the first scan");
            cur = p[pos++];
            continue;
        }
        if (pos + 2 > n)
            return fail(err, errsize, "JPEG header ends before the first scan");
        seg_len = jpeg_be16(p + pos) >= 2 ? jpeg_be16(p + pos) - 2 : 0;
        if (pos + 2 + seg_len > n)
            return fail(err, errsize, "JPEG marker segment is truncated");
        seg = p + pos + 2;
        pos += 2 + seg_len;

        if ((code >= 0xC0 && code <= 0xCF && code != JPEG_M_DHT && code != JPEG_M_DAC) || code == 0xDE) {
            if (seg_len < 6 || seg[0] != 8)
                return fail(err, errsize, "unsupported JPEG frame header (PIL needs 8-bit samples)");
            if (seg[5] != 1 && seg[5] != 3 && seg[5] != 4)
                return fail(err, errsize, "JPEG files with %d components are not supported", seg[5]);
            if ((seg_len - 6) % 3 != 0)
                return fail(err, errsize, "malformed JPEG frame header");
            if (!jpeg_pil_icc_ok(icc_first, icc_first_len))
                return fail(err, errsize, "malformed ICC profile chunk in the JPEG header");
            icc_first = NULL;
            hdr->height = (int)jpeg_be16(seg + 1);
            hdr->width = (int)jpeg_be16(seg + 3);
            hdr->layers = seg[5];
        } else if (code == JPEG_M_DQT) {
            size_t off = 0;
            while (off < seg_len) {
                size_t table_len = 1 + ((seg[off] >> 4) == 0 ? 1 : 2) * JPEG_BLOCK_SIZE;
                if (seg_len - off < table_len)
                    return fail(err, errsize, "bad JPEG quantization table segment");
                off += table_len;
            }
        } else if (code == JPEG_M_APP0 && seg_len >= 4 && memcmp(seg, "JFIF", 4) == 0 && seg_len < 7) {
            /* PIL reads a 16-bit version at offset 5 of JFIF and Adobe segments */
            return fail(err, errsize, "truncated JFIF segment");
        } else if (code == JPEG_M_APP14 && seg_len >= 5 && memcmp(seg, "Adobe", 5) == 0 && seg_len < 7) {
            return fail(err, errsize, "truncated Adobe segment");
        } else if (code == JPEG_M_APP13 && seg_len >= 14 && memcmp(seg, "Photoshop 3.0", 14) == 0 &&
                   !jpeg_pil_photoshop_ok(seg, seg_len)) {
            return fail(err, errsize, "malformed Photoshop segment in the JPEG header");
        } else if (code == JPEG_M_APP2 && seg_len >= 12 && memcmp(seg, "ICC_PROFILE", 12) == 0) {
            if (icc_first == NULL || jpeg_bytes_less(seg, seg_len, icc_first, icc_first_len)) {
                icc_first = seg;
                icc_first_len = seg_len;
            }
        } else if (code == JPEG_M_SOS) {
            break;
        }
        if (pos >= n)
            return fail(err, errsize, "JPEG header ends before the first scan");
        cur = p[pos++];
    }
    if (hdr->layers == 0 || hdr->width <= 0 || hdr->height <= 0)
        return fail(err, errsize, "JPEG scan without a valid frame header");
    return 0;
}

/* ---------------------------------------------------------------------
 * Input and marker segments, following libjpeg (jdmarker.c, jdinput.c)
 * ------------------------------------------------------------------- */

/* Appends PIL's next read to the data handed over (libjpeg suspended). */
static void jpeg_pil_next_read(jpeg_decoder *d)
{
    d->avail += d->size - d->avail < JPEG_PIL_READ_SIZE ? d->size - d->avail : JPEG_PIL_READ_SIZE;
    d->suspended = 1;
}

/* Makes the byte at d->pos readable, following how PIL feeds libjpeg: the
 * file arrives in 64 KiB reads, and a reader that runs past the data handed
 * over so far suspends until PIL appends the next read.  Nonzero at the end
 * of the file, or when the reader cannot suspend (arithmetic decoding). */
static int jpeg_byte_ready(jpeg_decoder *d)
{
    if (d->pos < d->avail)
        return 0;
    if (d->avail >= d->size || !d->can_suspend)
        return -1;
    jpeg_pil_next_read(d);
    return 0;
}

/* Reads one byte; JPEG_SUSPENDED when the input is exhausted. */
static int jpeg_read_u8(jpeg_decoder *d, unsigned *v)
{
    if (jpeg_byte_ready(d) != 0)
        return JPEG_SUSPENDED;
    *v = d->data[d->pos++];
    return JPEG_OK;
}

/* Reads a big-endian 16-bit value. */
static int jpeg_read_u16(jpeg_decoder *d, unsigned *v)
{
    unsigned hi, lo;
    int r;
    if ((r = jpeg_read_u8(d, &hi)) != JPEG_OK || (r = jpeg_read_u8(d, &lo)) != JPEG_OK)
        return r;
    *v = (hi << 8) | lo;
    return JPEG_OK;
}

/* Skips n bytes (nothing if n <= 0). */
static int jpeg_skip(jpeg_decoder *d, long n)
{
    if (n <= 0)
        return JPEG_OK;
    if ((size_t)n > d->size - d->pos) {
        d->pos = d->size;
        return JPEG_SUSPENDED;
    }
    d->pos += (size_t)n;
    while (d->avail < d->pos)          /* PIL discards the skipped data read by read */
        jpeg_pil_next_read(d);
    return JPEG_OK;
}

/* Finds the next marker, discarding garbage bytes, fill bytes and stuffed
 * 0xFF00 pairs on the way, and stores its code in unread_marker. */
static int jpeg_next_marker(jpeg_decoder *d)
{
    unsigned c;
    int r;
    for (;;) {
        if ((r = jpeg_read_u8(d, &c)) != JPEG_OK)
            return r;
        while (c != 0xFF)
            if ((r = jpeg_read_u8(d, &c)) != JPEG_OK)
                return r;
        do {
            if ((r = jpeg_read_u8(d, &c)) != JPEG_OK)
                return r;
        } while (c == 0xFF);
        if (c != 0)
            break;
    }
    d->unread_marker = (int)c;
    return JPEG_OK;
}

/* Reads the SOI that must start the datastream. */
static int jpeg_first_marker(jpeg_decoder *d)
{
    unsigned c1, c2;
    int r;
    if ((r = jpeg_read_u8(d, &c1)) != JPEG_OK || (r = jpeg_read_u8(d, &c2)) != JPEG_OK)
        return r;
    if (c1 != 0xFF || c2 != JPEG_M_SOI)
        return fail(d->err, d->errsize, "JPEG datastream does not start with SOI");
    d->unread_marker = (int)c2;
    return JPEG_OK;
}

/* SOI: resets the parameters a new datastream starts with. */
static int jpeg_get_soi(jpeg_decoder *d)
{
    int i;
    if (d->saw_soi)
        return fail(d->err, d->errsize, "JPEG file has two SOI markers");
    for (i = 0; i < JPEG_NUM_ARITH_TABLES; i++) {
        d->arith_dc_low[i] = 0;
        d->arith_dc_high[i] = 1;
        d->arith_ac_split[i] = 5;
    }
    d->restart_interval = 0;
    d->saw_jfif = d->saw_adobe = d->adobe_transform = 0;
    d->saw_soi = 1;
    return JPEG_OK;
}

/* SOFn: image size, precision and components. */
static int jpeg_get_sof(jpeg_decoder *d, int progressive, int arithmetic)
{
    unsigned length, precision, height, width, ncomp, i;
    int r;
    d->progressive = progressive;
    d->arithmetic = arithmetic;
    if ((r = jpeg_read_u16(d, &length)) != JPEG_OK || (r = jpeg_read_u8(d, &precision)) != JPEG_OK ||
        (r = jpeg_read_u16(d, &height)) != JPEG_OK || (r = jpeg_read_u16(d, &width)) != JPEG_OK ||
        (r = jpeg_read_u8(d, &ncomp)) != JPEG_OK)
        return r;
    if (d->saw_sof)
        return fail(d->err, d->errsize, "JPEG file has two frame headers");
    if (height == 0 || width == 0 || ncomp == 0)
        return fail(d->err, d->errsize, "JPEG image is empty");
    if ((long)length - 8 != (long)ncomp * 3)
        return fail(d->err, d->errsize, "JPEG frame header has a bad length");
    d->precision = (int)precision;
    d->height = (int)height;
    d->width = (int)width;
    d->ncomp = (int)ncomp;
    for (i = 0; i < ncomp; i++) {
        unsigned id, hv, tq;
        if ((r = jpeg_read_u8(d, &id)) != JPEG_OK || (r = jpeg_read_u8(d, &hv)) != JPEG_OK ||
            (r = jpeg_read_u8(d, &tq)) != JPEG_OK)
            return r;
        if (i < JPEG_MAX_COMPONENTS) {  /* more components are refused at the first scan */
            jpeg_component *c = &d->comp[i];
            c->id = (int)id;
            c->h = (int)(hv >> 4);
            c->v = (int)(hv & 15);
            c->quant_index = (int)tq;
        }
    }
    d->saw_sof = 1;
    return JPEG_OK;
}

/* SOS: the components and coding parameters of the next scan. */
static int jpeg_get_sos(jpeg_decoder *d)
{
    unsigned length, n, i, ss, se, a;
    int r;
    if (!d->saw_sof)
        return fail(d->err, d->errsize, "JPEG scan comes before the frame header");
    if ((r = jpeg_read_u16(d, &length)) != JPEG_OK || (r = jpeg_read_u8(d, &n)) != JPEG_OK)
        return r;
    if (length != n * 2 + 6 || n < 1 || n > JPEG_MAX_SCAN_COMPONENTS)
        return fail(d->err, d->errsize, "JPEG scan header has a bad length");
    d->scan_ncomp = (int)n;
    for (i = 0; i < n; i++) {
        unsigned id, tables;
        int ci, pi, found = -1;
        if ((r = jpeg_read_u8(d, &id)) != JPEG_OK || (r = jpeg_read_u8(d, &tables)) != JPEG_OK)
            return r;
        /* libjpeg-turbo looks only at the first four components, and only at
         * component indexes not below this scan position */
        for (ci = (int)i; ci < d->ncomp && ci < JPEG_MAX_SCAN_COMPONENTS; ci++)
            if (d->comp[ci].id == (int)id) {
                found = ci;
                break;
            }
        if (found < 0)
            return fail(d->err, d->errsize, "JPEG scan refers to an unknown component");
        for (pi = 0; pi < (int)i; pi++)
            if (d->scan_comp[pi] == &d->comp[found])
                return fail(d->err, d->errsize, "JPEG scan lists a component twice");
        d->scan_comp[i] = &d->comp[found];
        d->comp[found].dc_table = (int)(tables >> 4);
        d->comp[found].ac_table = (int)(tables & 15);
    }
    if ((r = jpeg_read_u8(d, &ss)) != JPEG_OK || (r = jpeg_read_u8(d, &se)) != JPEG_OK ||
        (r = jpeg_read_u8(d, &a)) != JPEG_OK)
        return r;
    d->ss = (int)ss;
    d->se = (int)se;
    d->ah = (int)(a >> 4);
    d->al = (int)(a & 15);
    d->next_restart = 0;
    d->scan_count++;
    return JPEG_OK;
}

/* DHT: one or more Huffman tables. */
static int jpeg_get_dht(jpeg_decoder *d)
{
    unsigned length_word;
    long length;
    int r;
    if ((r = jpeg_read_u16(d, &length_word)) != JPEG_OK)
        return r;
    length = (long)length_word - 2;
    while (length > JPEG_HUFF_MAX_BITS) {
        unsigned index, v;
        unsigned char counts[JPEG_HUFF_MAX_BITS + 1];
        unsigned char symbols[JPEG_HUFF_SYMBOLS];
        jpeg_huff_spec *spec;
        long count = 0;
        int i;
        if ((r = jpeg_read_u8(d, &index)) != JPEG_OK)
            return r;
        counts[0] = 0;
        for (i = 1; i <= JPEG_HUFF_MAX_BITS; i++) {
            if ((r = jpeg_read_u8(d, &v)) != JPEG_OK)
                return r;
            counts[i] = (unsigned char)v;
            count += (long)v;
        }
        length -= 1 + JPEG_HUFF_MAX_BITS;
        if (count > JPEG_HUFF_SYMBOLS || count > length)
            return fail(d->err, d->errsize, "bad JPEG Huffman table");
        memset(symbols, 0, sizeof symbols);
        for (i = 0; i < count; i++) {
            if ((r = jpeg_read_u8(d, &v)) != JPEG_OK)
                return r;
            symbols[i] = (unsigned char)v;
        }
        length -= count;
        if (index & 0x10) {
            index -= 0x10;
            if (index >= JPEG_NUM_TABLES)
                return fail(d->err, d->errsize, "bad JPEG Huffman table index");
            spec = &d->huff_ac[index];
        } else {
            if (index >= JPEG_NUM_TABLES)
                return fail(d->err, d->errsize, "bad JPEG Huffman table index");
            spec = &d->huff_dc[index];
        }
        spec->defined = 1;
        memcpy(spec->counts, counts, sizeof counts);
        memcpy(spec->symbols, symbols, sizeof symbols);
    }
    if (length != 0)
        return fail(d->err, d->errsize, "JPEG Huffman table segment has a bad length");
    return JPEG_OK;
}

/* DQT: one or more quantisation tables (8- or 16-bit entries). */
static int jpeg_get_dqt(jpeg_decoder *d)
{
    unsigned length_word;
    long length;
    int r;
    if ((r = jpeg_read_u16(d, &length_word)) != JPEG_OK)
        return r;
    length = (long)length_word - 2;
    while (length > 0) {
        unsigned n, v;
        int wide, i;
        if ((r = jpeg_read_u8(d, &n)) != JPEG_OK)
            return r;
        wide = (n >> 4) != 0;
        n &= 15;
        if (n >= JPEG_NUM_TABLES)
            return fail(d->err, d->errsize, "bad JPEG quantization table index");
        d->quant_defined[n] = 1;
        for (i = 0; i < JPEG_BLOCK_SIZE; i++) {
            r = wide ? jpeg_read_u16(d, &v) : jpeg_read_u8(d, &v);
            if (r != JPEG_OK)
                return r;
            d->quant_tables[n][jpeg_natural_order[i]] = (uint16_t)v;
        }
        length -= JPEG_BLOCK_SIZE + 1 + (wide ? JPEG_BLOCK_SIZE : 0);
    }
    if (length != 0)
        return fail(d->err, d->errsize, "JPEG quantization table segment has a bad length");
    return JPEG_OK;
}

/* DRI: the restart interval in MCUs. */
static int jpeg_get_dri(jpeg_decoder *d)
{
    unsigned length, interval;
    int r;
    if ((r = jpeg_read_u16(d, &length)) != JPEG_OK)
        return r;
    if (length != 4)
        return fail(d->err, d->errsize, "JPEG restart interval segment has a bad length");
    if ((r = jpeg_read_u16(d, &interval)) != JPEG_OK)
        return r;
    d->restart_interval = (int)interval;
    return JPEG_OK;
}

/* DAC: arithmetic coding conditioning values. */
static int jpeg_get_dac(jpeg_decoder *d)
{
    unsigned length_word;
    long length;
    int r;
    if ((r = jpeg_read_u16(d, &length_word)) != JPEG_OK)
        return r;
    length = (long)length_word - 2;
    while (length > 0) {
        unsigned index, v;
        if ((r = jpeg_read_u8(d, &index)) != JPEG_OK || (r = jpeg_read_u8(d, &v)) != JPEG_OK)
            return r;
        length -= 2;
        if (index >= 2 * JPEG_NUM_ARITH_TABLES)
            return fail(d->err, d->errsize, "bad JPEG arithmetic conditioning table index");
        if (index >= JPEG_NUM_ARITH_TABLES) {
            d->arith_ac_split[index - JPEG_NUM_ARITH_TABLES] = (unsigned char)v;
        } else {
            d->arith_dc_low[index] = (unsigned char)(v & 15);
            d->arith_dc_high[index] = (unsigned char)(v >> 4);
            if (d->arith_dc_low[index] > d->arith_dc_high[index])
                return fail(d->err, d->errsize, "bad JPEG arithmetic conditioning value");
        }
    }
    if (length != 0)
        return fail(d->err, d->errsize, "JPEG arithmetic conditioning segment has a bad length");
    return JPEG_OK;
}

/* APP0 / APP14: notes a JFIF or Adobe marker, which decide the colour space. */
static int jpeg_get_app_id(jpeg_decoder *d, int marker)
{
    enum { APP_HEAD = 14, JFIF_HEAD = 14, ADOBE_HEAD = 12 };  /* bytes libjpeg examines / requires */
    unsigned char head[APP_HEAD];
    unsigned length_word, v;
    long length, take, i;
    int r;
    if ((r = jpeg_read_u16(d, &length_word)) != JPEG_OK)
        return r;
    length = (long)length_word - 2;
    take = length >= APP_HEAD ? APP_HEAD : (length > 0 ? length : 0);
    for (i = 0; i < take; i++) {
        if ((r = jpeg_read_u8(d, &v)) != JPEG_OK)
            return r;
        head[i] = (unsigned char)v;
    }
    length -= take;
    if (marker == JPEG_M_APP0 && take >= JFIF_HEAD && memcmp(head, "JFIF", 5) == 0)
        d->saw_jfif = 1;
    if (marker == JPEG_M_APP14 && take >= ADOBE_HEAD && memcmp(head, "Adobe", 5) == 0) {
        d->saw_adobe = 1;
        d->adobe_transform = head[11];
    }
    return jpeg_skip(d, length);
}

/* Skips a segment whose contents do not matter. */
static int jpeg_skip_segment(jpeg_decoder *d)
{
    unsigned length;
    int r;
    if ((r = jpeg_read_u16(d, &length)) != JPEG_OK)
        return r;
    return jpeg_skip(d, (long)length - 2);
}

/* Processes markers until an SOS (JPEG_AT_SOS) or EOI (JPEG_AT_EOI). */
static int jpeg_read_markers(jpeg_decoder *d)
{
    for (;;) {
        int r = JPEG_OK, m;
        if (!d->unread_marker) {
            r = d->saw_soi ? jpeg_next_marker(d) : jpeg_first_marker(d);
            if (r != JPEG_OK)
                return r;
        }
        m = d->unread_marker;
        if (m == JPEG_M_SOS) {
            if ((r = jpeg_get_sos(d)) != JPEG_OK)
                return r;
            d->unread_marker = 0;
            return JPEG_AT_SOS;
        }
        if (m == JPEG_M_EOI) {
            d->unread_marker = 0;
            return JPEG_AT_EOI;
        }
        if (m == JPEG_M_SOI)
            r = jpeg_get_soi(d);
        else if (m == JPEG_M_SOF0 || m == JPEG_M_SOF1)
            r = jpeg_get_sof(d, 0, 0);
        else if (m == JPEG_M_SOF2)
            r = jpeg_get_sof(d, 1, 0);
        else if (m == JPEG_M_SOF9)
            r = jpeg_get_sof(d, 0, 1);
        else if (m == JPEG_M_SOF10)
            r = jpeg_get_sof(d, 1, 1);
        else if (m >= JPEG_M_SOF0 && m <= 0xCF && m != JPEG_M_DHT && m != JPEG_M_DAC)
            return fail(d->err, d->errsize, "unsupported JPEG process (lossless or hierarchical)");
        else if (m == JPEG_M_DHT)
            r = jpeg_get_dht(d);
        else if (m == JPEG_M_DAC)
            r = jpeg_get_dac(d);
        else if (m == JPEG_M_DQT)
            r = jpeg_get_dqt(d);
        else if (m == JPEG_M_DRI)
            r = jpeg_get_dri(d);
        else if (m == JPEG_M_APP0 || m == JPEG_M_APP14)
            r = jpeg_get_app_id(d, m);
        else if ((m >= JPEG_M_APP0 && m <= JPEG_M_APP15) || m == JPEG_M_COM || m == JPEG_M_DNL)
            r = jpeg_skip_segment(d);
        else if (!((m >= JPEG_M_RST0 && m <= JPEG_M_RST7) || m == JPEG_M_TEM))
            return fail(d->err, d->errsize, "unknown JPEG marker 0x%02X", (unsigned)m);
        if (r != JPEG_OK)
            return r;
        d->unread_marker = 0;
    }
}

/* Reads up to the first scan, accepting tables-only datastreams before it. */
static int jpeg_read_header(jpeg_decoder *d)
{
    for (;;) {
        int r = jpeg_read_markers(d);
        if (r == JPEG_AT_SOS)
            return 0;
        if (r == JPEG_SUSPENDED)
            return fail(d->err, d->errsize, "JPEG file is truncated");
        if (r != JPEG_AT_EOI)
            return -1;
        if (d->saw_sof)
            return fail(d->err, d->errsize, "JPEG frame has no scan");
        d->saw_soi = 0;                /* libjpeg starts over on the next datastream */
    }
}

/* ---------------------------------------------------------------------
 * Frame setup (libjpeg's initial_setup, default colour space, jdsample.c)
 * ------------------------------------------------------------------- */

/* libjpeg's guess of the coded colour space from markers and component ids. */
static int jpeg_guess_color_space(const jpeg_decoder *d)
{
    if (d->ncomp == 1)
        return JPEG_CS_GRAY;
    if (d->ncomp == 3) {
        if (d->saw_jfif)
            return JPEG_CS_YCBCR;
        if (d->saw_adobe)
            return d->adobe_transform == 0 ? JPEG_CS_RGB : JPEG_CS_YCBCR;
        if (d->comp[0].id == 'R' && d->comp[1].id == 'G' && d->comp[2].id == 'B')
            return JPEG_CS_RGB;
        return JPEG_CS_YCBCR;
    }
    if (d->ncomp == 4)
        return d->saw_adobe && d->adobe_transform != 0 ? JPEG_CS_YCCK : JPEG_CS_CMYK;
    return JPEG_CS_UNKNOWN;
}

/* Chooses libjpeg-turbo's upsampling method for one component. */
static int jpeg_choose_upsampling(jpeg_decoder *d, jpeg_component *c)
{
    if (d->max_h % c->h != 0 || d->max_v % c->v != 0)
        return fail(d->err, d->errsize, "JPEG sampling factors are not integral ratios");
    c->h_expand = d->max_h / c->h;
    c->v_expand = d->max_v / c->v;
    if (c->h_expand == 1 && c->v_expand == 1)
        c->upsample = JPEG_UP_FULL;
    else if (c->h_expand == 2 && c->v_expand == 1 && c->samples_w > 2)
        c->upsample = JPEG_UP_H2V1_FANCY;
    else if (c->h_expand == 1 && c->v_expand == 2)
        c->upsample = JPEG_UP_H1V2_FANCY;
    else if (c->h_expand == 2 && c->v_expand == 2 && c->samples_w > 2)
        c->upsample = JPEG_UP_H2V2_FANCY;
    else
        c->upsample = JPEG_UP_REPLICATE;
    return 0;
}

/* Fills libjpeg's fixed-point YCbCr->RGB tables (jdcolor.c). */
static void jpeg_build_color_tables(jpeg_decoder *d)
{
    enum { FIX_1_40200 = 91881, FIX_1_77200 = 116130, FIX_0_71414 = 46802, FIX_0_34414 = 22554 };
    const int64_t one_half = (int64_t)1 << (JPEG_COLOR_SCALE_BITS - 1);
    int i;
    for (i = 0; i < 256; i++) {
        int64_t x = i - 128;
        d->cr_to_r[i] = (int)jpeg_shift_down(FIX_1_40200 * x + one_half, JPEG_COLOR_SCALE_BITS);
        d->cb_to_b[i] = (int)jpeg_shift_down(FIX_1_77200 * x + one_half, JPEG_COLOR_SCALE_BITS);
        d->cr_to_g[i] = (int32_t)(-FIX_0_71414 * x);
        d->cb_to_g[i] = (int32_t)(-FIX_0_34414 * x + one_half);
    }
}

/* Installs the Annex K tables in empty slots 0 and 1 (sequential Huffman only). */
static void jpeg_install_std_tables(jpeg_decoder *d)
{
    const unsigned char *counts[4] = { jpeg_std_dc_luma_counts, jpeg_std_dc_chroma_counts,
                                       jpeg_std_ac_luma_counts, jpeg_std_ac_chroma_counts };
    const unsigned char *symbols[4] = { jpeg_std_dc_symbols, jpeg_std_dc_symbols,
                                        jpeg_std_ac_luma_symbols, jpeg_std_ac_chroma_symbols };
    jpeg_huff_spec *slots[4] = { &d->huff_dc[0], &d->huff_dc[1], &d->huff_ac[0], &d->huff_ac[1] };
    int t, l, n;
    for (t = 0; t < 4; t++) {
        jpeg_huff_spec *s = slots[t];
        if (s->defined)
            continue;
        memcpy(s->counts, counts[t], sizeof s->counts);
        for (n = 0, l = 1; l <= JPEG_HUFF_MAX_BITS; l++)
            n += counts[t][l];
        memset(s->symbols, 0, sizeof s->symbols);
        memcpy(s->symbols, symbols[t], (size_t)n);
        s->defined = 1;
    }
}

/* Allocates a zeroed array of n * size bytes, with overflow checking. */
static void *jpeg_alloc(jpeg_decoder *d, size_t n, size_t size)
{
    size_t bytes;
    void *p;
    if (jpeg_mul_size(n, size, &bytes) != 0 || bytes == 0) {
        fail(d->err, d->errsize, "JPEG image is too large");
        return NULL;
    }
    p = calloc(1, bytes);
    if (p == NULL)
        fail(d->err, d->errsize, "out of memory decoding JPEG");
    return p;
}

/* Bounds the decoding work: hostile files can repeat scans (or let the
 * arithmetic decoder run on without data) far beyond what any encoder
 * produces, so block decodes are limited to a multiple of the image size. */
static void jpeg_set_work_budget(jpeg_decoder *d)
{
    uint64_t blocks = 0;
    int ci;
    for (ci = 0; ci < d->ncomp; ci++)
        blocks += (uint64_t)d->comp[ci].coef_w * (uint64_t)d->comp[ci].coef_h;
    d->work_left = JPEG_MAX_PASSES * blocks + JPEG_MIN_WORK;
    d->dataless_left = JPEG_MAX_DATALESS_PASSES * blocks + JPEG_MIN_WORK;
}

/* Charges one MCU to the work budget; nonzero when the budget is exhausted. */
static int jpeg_charge_mcu(jpeg_decoder *d)
{
    uint64_t n = (uint64_t)d->blocks_in_mcu;
    if (d->work_left < n)
        return -1;
    d->work_left -= n;
    if (d->arithmetic && d->unread_marker) {   /* decoding zeros after a marker */
        if (d->dataless_left < n)
            return -1;
        d->dataless_left -= n;
    }
    return 0;
}

/* Validates the frame at its first scan and allocates sample and coefficient storage. */
static int jpeg_setup_frame(jpeg_decoder *d, const jpeg_pil_header *pil)
{
    int ci;
    if (d->width > JPEG_MAX_DIMENSION || d->height > JPEG_MAX_DIMENSION)
        return fail(d->err, d->errsize, "JPEG image is too large");
    if (d->precision != 8)
        return fail(d->err, d->errsize, "%d-bit JPEG samples are not supported", d->precision);
    if (d->ncomp > JPEG_MAX_COMPONENTS)
        return fail(d->err, d->errsize, "JPEG file has too many components");
    if (d->ncomp != pil->layers || d->width != pil->width || d->height != pil->height)
        return fail(d->err, d->errsize, "JPEG file has inconsistent frame headers");
    d->max_h = d->max_v = 1;
    for (ci = 0; ci < d->ncomp; ci++) {
        jpeg_component *c = &d->comp[ci];
        if (c->h < 1 || c->h > JPEG_MAX_SAMPLING || c->v < 1 || c->v > JPEG_MAX_SAMPLING)
            return fail(d->err, d->errsize, "bad JPEG sampling factors");
        if (c->h > d->max_h)
            d->max_h = c->h;
        if (c->v > d->max_v)
            d->max_v = c->v;
    }
    for (ci = 0; ci < d->ncomp; ci++) {
        jpeg_component *c = &d->comp[ci];
        c->blocks_w = jpeg_div_up((long)d->width * c->h, (long)d->max_h * JPEG_BLOCK);
        c->blocks_h = jpeg_div_up((long)d->height * c->v, (long)d->max_v * JPEG_BLOCK);
        c->samples_w = jpeg_div_up((long)d->width * c->h, d->max_h);
        c->samples_h = jpeg_div_up((long)d->height * c->v, d->max_v);
        c->coef_w = jpeg_div_up(c->blocks_w, c->h) * c->h;
        c->coef_h = jpeg_div_up(c->blocks_h, c->v) * c->v;
    }
    d->imcu_rows = jpeg_div_up(d->height, (long)d->max_v * JPEG_BLOCK);
    d->multiscan = d->scan_ncomp < d->ncomp || d->progressive;
    d->color_space = jpeg_guess_color_space(d);
    for (ci = 0; ci < d->ncomp; ci++)
        if (jpeg_choose_upsampling(d, &d->comp[ci]) != 0)
            return -1;
    if (!d->progressive && !d->arithmetic)
        jpeg_install_std_tables(d);
    for (ci = 0; ci < d->ncomp; ci++) {
        jpeg_component *c = &d->comp[ci];
        size_t rows = (size_t)c->blocks_h * JPEG_BLOCK, k;
        c->plane_stride = (size_t)c->blocks_w * JPEG_BLOCK;
        if ((c->plane = jpeg_alloc(d, c->plane_stride, rows)) == NULL)
            return -1;
        if ((c->row = jpeg_alloc(d, (size_t)d->width + JPEG_MAX_SAMPLING, 1)) == NULL)
            return -1;
        if (d->multiscan) {
            size_t blocks = (size_t)c->coef_w * (size_t)c->coef_h;
            if ((c->coefs = jpeg_alloc(d, blocks, JPEG_BLOCK_SIZE * sizeof(int16_t))) == NULL)
                return -1;
        }
        for (k = 0; k < JPEG_BLOCK_SIZE; k++)
            c->coef_bits[k] = -1;
    }
    if ((d->colsums = jpeg_alloc(d, (size_t)d->width + JPEG_MAX_SAMPLING, sizeof(int))) == NULL)
        return -1;
    jpeg_build_color_tables(d);
    jpeg_set_work_budget(d);
    return 0;
}

/* ---------------------------------------------------------------------
 * Scan setup (per_scan_setup, latch_quant_tables, entropy start_pass)
 * ------------------------------------------------------------------- */

/* Builds the decoding form of a Huffman table, rejecting what libjpeg rejects. */
static int jpeg_build_huff_table(jpeg_decoder *d, const jpeg_huff_spec *spec, int is_dc, jpeg_huff_table *t)
{
    unsigned char sizes[JPEG_HUFF_SYMBOLS + 1];
    unsigned codes[JPEG_HUFF_SYMBOLS];
    unsigned code;
    int p, l, i, nsymbols, si;

    if (!spec->defined)
        return fail(d->err, d->errsize, "JPEG scan uses an undefined Huffman table");
    for (p = 0, l = 1; l <= JPEG_HUFF_MAX_BITS; l++) {
        int n = spec->counts[l];
        if (p + n > JPEG_HUFF_SYMBOLS)
            return fail(d->err, d->errsize, "bad JPEG Huffman table");
        while (n--)
            sizes[p++] = (unsigned char)l;
    }
    sizes[p] = 0;
    nsymbols = p;
    code = 0;
    si = sizes[0];
    for (p = 0; sizes[p]; si++) {
        while (sizes[p] == si)
            codes[p++] = code++;
        if (code >= (1u << si))        /* the all-ones code is reserved */
            return fail(d->err, d->errsize, "bad JPEG Huffman table");
        code <<= 1;
    }
    for (p = 0, l = 1; l <= JPEG_HUFF_MAX_BITS; l++) {
        if (spec->counts[l]) {
            t->valoffset[l] = p - (int32_t)codes[p];
            p += spec->counts[l];
            t->maxcode[l] = (int32_t)codes[p - 1];
        } else {
            t->maxcode[l] = -1;
        }
    }
    t->valoffset[JPEG_HUFF_MAX_BITS + 1] = 0;
    t->maxcode[JPEG_HUFF_MAX_BITS + 1] = 0xFFFFF;   /* sentinel ends every search */
    for (i = 0; i < (1 << JPEG_HUFF_LOOKAHEAD); i++)
        t->lookup[i] = (JPEG_HUFF_LOOKAHEAD + 1) << 8;
    for (p = 0, l = 1; l <= JPEG_HUFF_LOOKAHEAD; l++) {
        for (i = 0; i < spec->counts[l]; i++, p++) {
            int first = (int)(codes[p] << (JPEG_HUFF_LOOKAHEAD - l)), k;
            for (k = 0; k < (1 << (JPEG_HUFF_LOOKAHEAD - l)); k++)
                t->lookup[first + k] = (unsigned short)((l << 8) | spec->symbols[p]);
        }
    }
    memcpy(t->symbols, spec->symbols, sizeof t->symbols);
    if (is_dc)
        for (i = 0; i < nsymbols; i++)
            if (spec->symbols[i] > 15)
                return fail(d->err, d->errsize, "bad JPEG Huffman table");
    return 0;
}

/* Works out the MCU layout of the current scan. */
static int jpeg_layout_scan(jpeg_decoder *d)
{
    int i;
    if (d->scan_ncomp == 1) {
        jpeg_component *c = d->scan_comp[0];
        d->mcus_per_row = c->blocks_w;
        d->mcu_rows = c->blocks_h;
        d->blocks_in_mcu = 1;
        d->mcu_member[0] = 0;
        return 0;
    }
    d->mcus_per_row = jpeg_div_up(d->width, (long)d->max_h * JPEG_BLOCK);
    d->mcu_rows = d->imcu_rows;
    d->blocks_in_mcu = 0;
    for (i = 0; i < d->scan_ncomp; i++) {
        jpeg_component *c = d->scan_comp[i];
        int n = c->h * c->v;
        if (d->blocks_in_mcu + n > JPEG_MAX_MCU_BLOCKS)
            return fail(d->err, d->errsize, "JPEG MCU has too many blocks");
        while (n-- > 0)
            d->mcu_member[d->blocks_in_mcu++] = i;
    }
    return 0;
}

/* Copies each component's quantisation table at the first scan that uses it. */
static int jpeg_latch_quant_tables(jpeg_decoder *d)
{
    int i, k;
    for (i = 0; i < d->scan_ncomp; i++) {
        jpeg_component *c = d->scan_comp[i];
        if (c->quant_latched)
            continue;
        if (c->quant_index >= JPEG_NUM_TABLES || !d->quant_defined[c->quant_index])
            return fail(d->err, d->errsize, "JPEG scan uses an undefined quantization table");
        memcpy(c->quant, d->quant_tables[c->quant_index], sizeof c->quant);
        for (k = 0; k < JPEG_BLOCK_SIZE; k++)
            c->idct_quant[k] = c->quant[k] >= 0x8000 ? (int32_t)c->quant[k] - 0x10000 : (int32_t)c->quant[k];
        c->quant_latched = 1;
    }
    return 0;
}

/* Checks progressive scan parameters and records which bits of which
 * coefficients have now been sent (used by block smoothing). */
static int jpeg_start_progressive(jpeg_decoder *d)
{
    int bad = 0, i, k;
    if (d->ss == 0) {
        if (d->se != 0)
            bad = 1;
    } else if (d->ss > d->se || d->se >= JPEG_BLOCK_SIZE || d->scan_ncomp != 1) {
        bad = 1;
    }
    if (d->ah != 0 && d->al != d->ah - 1)
        bad = 1;
    if (d->al > 13)
        bad = 1;
    if (bad)
        return fail(d->err, d->errsize, "invalid progressive JPEG scan parameters");
    for (i = 0; i < d->scan_ncomp; i++) {
        jpeg_component *c = d->scan_comp[i];
        int first = d->ss < 1 ? d->ss : 1, last = d->se > 9 ? d->se : 9;
        for (k = first; k <= last; k++)
            c->prev_coef_bits[k] = d->scan_count > 1 ? c->coef_bits[k] : 0;
        for (k = d->ss; k <= d->se; k++)
            c->coef_bits[k] = d->al;
    }
    return 0;
}

/* Builds the Huffman table in DC or AC slot `slot` for use in this scan. */
static int jpeg_prepare_huff_table(jpeg_decoder *d, int slot, int is_dc)
{
    if (slot >= JPEG_NUM_TABLES)
        return fail(d->err, d->errsize, "JPEG scan uses an undefined Huffman table");
    if (is_dc)
        return jpeg_build_huff_table(d, &d->huff_dc[slot], 1, &d->dc_tables[slot]);
    return jpeg_build_huff_table(d, &d->huff_ac[slot], 0, &d->ac_tables[slot]);
}

/* Prepares the Huffman decoder for the current scan. */
static int jpeg_start_huffman(jpeg_decoder *d)
{
    int want_dc = !d->progressive || (d->ss == 0 && d->ah == 0);
    int want_ac = !d->progressive || d->ss != 0;
    int i;
    for (i = 0; i < d->scan_ncomp; i++) {
        jpeg_component *c = d->scan_comp[i];
        if (want_dc && jpeg_prepare_huff_table(d, c->dc_table, 1) != 0)
            return -1;
        if (want_ac && jpeg_prepare_huff_table(d, c->ac_table, 0) != 0)
            return -1;
    }
    d->bit_buffer = 0;
    d->bits_left = 0;
    d->out_of_data = 0;
    return 0;
}

/* Prepares the arithmetic decoder for the current scan. */
static int jpeg_start_arithmetic(jpeg_decoder *d)
{
    int i;
    for (i = 0; i < d->scan_ncomp; i++) {
        jpeg_component *c = d->scan_comp[i];
        if (!d->progressive || (d->ss == 0 && d->ah == 0)) {
            if (c->dc_table >= JPEG_NUM_ARITH_TABLES)
                return fail(d->err, d->errsize, "JPEG scan uses an undefined arithmetic table");
            memset(d->dc_stats[c->dc_table], 0, JPEG_ARITH_DC_BINS);
        }
        if (!d->progressive || d->ss != 0) {
            if (c->ac_table >= JPEG_NUM_ARITH_TABLES)
                return fail(d->err, d->errsize, "JPEG scan uses an undefined arithmetic table");
            memset(d->ac_stats[c->ac_table], 0, JPEG_ARITH_AC_BINS);
        }
    }
    d->arith_c = 0;
    d->arith_a = 0;
    d->arith_ct = -16;                 /* forces reading two bytes into C */
    return 0;
}

/* Everything libjpeg does between reading an SOS and decoding its data. */
static int jpeg_start_scan(jpeg_decoder *d)
{
    int i;
    if (d->scan_count > JPEG_MAX_SCANS)
        return fail(d->err, d->errsize, "JPEG file has more than %d scans", JPEG_MAX_SCANS);
    if (jpeg_layout_scan(d) != 0 || jpeg_latch_quant_tables(d) != 0)
        return -1;
    if (d->progressive && jpeg_start_progressive(d) != 0)
        return -1;
    if ((d->arithmetic ? jpeg_start_arithmetic(d) : jpeg_start_huffman(d)) != 0)
        return -1;
    if (!d->progressive)
        d->scan_kind = JPEG_SCAN_SEQUENTIAL;
    else if (d->ss == 0)
        d->scan_kind = d->ah == 0 ? JPEG_SCAN_DC_FIRST : JPEG_SCAN_DC_REFINE;
    else
        d->scan_kind = d->ah == 0 ? JPEG_SCAN_AC_FIRST : JPEG_SCAN_AC_REFINE;
    for (i = 0; i < JPEG_MAX_SCAN_COMPONENTS; i++) {
        d->last_dc[i] = 0;
        d->dc_context[i] = 0;
    }
    d->eob_run = 0;
    d->restarts_left = (unsigned)d->restart_interval;
    return 0;
}

/* ---------------------------------------------------------------------
 * Restart markers (read_restart_marker, jpeg_resync_to_restart)
 * ------------------------------------------------------------------- */

/* libjpeg's recovery when the marker found is not the expected RSTn:
 * skip ahead, accept it, or leave it unread so the segment decodes empty. */
static int jpeg_resync(jpeg_decoder *d)
{
    int desired = d->next_restart;
    for (;;) {
        int m = d->unread_marker, r;
        if (m >= JPEG_M_SOF0) {
            if (m < JPEG_M_RST0 || m > JPEG_M_RST7)
                return JPEG_OK;        /* a real marker: leave it for later */
            if (m == JPEG_M_RST0 + ((desired + 1) & 7) || m == JPEG_M_RST0 + ((desired + 2) & 7))
                return JPEG_OK;        /* a later restart: the missed segments stay empty */
            if (m != JPEG_M_RST0 + ((desired + 7) & 7) && m != JPEG_M_RST0 + ((desired + 6) & 7)) {
                d->unread_marker = 0;  /* too far off to trust: ignore it */
                return JPEG_OK;
            }
        }
        if ((r = jpeg_next_marker(d)) != JPEG_OK)  /* bogus or earlier marker: scan on */
            return r;
    }
}

/* Consumes the restart marker that should follow a restart interval. */
static int jpeg_read_restart_marker(jpeg_decoder *d)
{
    int r;
    if (!d->unread_marker && (r = jpeg_next_marker(d)) != JPEG_OK)
        return r;
    if (d->unread_marker == JPEG_M_RST0 + d->next_restart)
        d->unread_marker = 0;
    else if ((r = jpeg_resync(d)) != JPEG_OK)
        return r;
    d->next_restart = (d->next_restart + 1) & 7;
    return JPEG_OK;
}

/* ---------------------------------------------------------------------
 * Huffman decoding (jdhuff.c, jdphuff.c)
 * ------------------------------------------------------------------- */

/* Refills the bit buffer as libjpeg-turbo does: to at least 57 bits, never
 * past a marker.  When that leaves fewer than nbits bits the data segment is
 * exhausted: zero bits are supplied and out_of_data is raised. */
static void jpeg_fill_bits(jpeg_decoder *d, int nbits)
{
    while (!d->unread_marker && !d->input_ended && d->bits_left < JPEG_BIT_BUFFER_FILL) {
        unsigned c;
        if (jpeg_byte_ready(d) != 0) {
            d->input_ended = 1;
            break;
        }
        c = d->data[d->pos++];
        if (c == 0xFF) {
            do {
                if (jpeg_byte_ready(d) != 0) {
                    d->input_ended = 1;
                    break;
                }
                c = d->data[d->pos++];
            } while (c == 0xFF);
            if (d->input_ended)
                break;
            if (c != 0) {
                d->unread_marker = (int)c;
                break;
            }
            c = 0xFF;                  /* 0xFF00 is a stuffed 0xFF data byte */
        }
        d->bit_buffer = (d->bit_buffer << 8) | c;
        d->bits_left += 8;
    }
    if (nbits > d->bits_left) {
        d->out_of_data = 1;
        d->bit_buffer <<= JPEG_BIT_BUFFER_FILL - d->bits_left;
        d->bits_left = JPEG_BIT_BUFFER_FILL;
    }
}

/* Takes the next n (1..16) bits. */
static int jpeg_get_bits(jpeg_decoder *d, int n)
{
    if (d->bits_left < n)
        jpeg_fill_bits(d, n);
    d->bits_left -= n;
    return (int)((d->bit_buffer >> d->bits_left) & ((1u << n) - 1));
}

/* Decodes a code of at least `length` bits one bit at a time (T.81 F.16). */
static int jpeg_huff_decode_long(jpeg_decoder *d, const jpeg_huff_table *t, int length)
{
    int32_t code = jpeg_get_bits(d, length);
    while (code > t->maxcode[length]) {
        code = (code << 1) | jpeg_get_bits(d, 1);
        length++;
    }
    if (length > JPEG_HUFF_MAX_BITS)
        return 0;                      /* invalid code: libjpeg substitutes symbol 0 */
    return t->symbols[(code + t->valoffset[length]) & 0xFF];
}

/* Decodes one Huffman-coded symbol. */
static int jpeg_huff_decode(jpeg_decoder *d, const jpeg_huff_table *t)
{
    int look, entry;
    if (d->bits_left < JPEG_HUFF_LOOKAHEAD) {
        jpeg_fill_bits(d, 0);
        if (d->bits_left < JPEG_HUFF_LOOKAHEAD)
            return jpeg_huff_decode_long(d, t, 1);
    }
    look = (int)((d->bit_buffer >> (d->bits_left - JPEG_HUFF_LOOKAHEAD)) & ((1u << JPEG_HUFF_LOOKAHEAD) - 1));
    entry = t->lookup[look];
    if ((entry >> 8) > JPEG_HUFF_LOOKAHEAD)
        return jpeg_huff_decode_long(d, t, JPEG_HUFF_LOOKAHEAD + 1);
    d->bits_left -= entry >> 8;
    return entry & 0xFF;
}

/* Decodes one block of a sequential scan. */
static void jpeg_huff_sequential_block(jpeg_decoder *d, int16_t *block, int ci)
{
    const jpeg_component *c = d->scan_comp[ci];
    const jpeg_huff_table *ac = &d->ac_tables[c->ac_table];
    int s = jpeg_huff_decode(d, &d->dc_tables[c->dc_table]), k;
    if (s)
        s = jpeg_extend(jpeg_get_bits(d, s), s);
    d->last_dc[ci] = jpeg_wrap32((int64_t)d->last_dc[ci] + s);
    block[0] = jpeg_coef((uint32_t)d->last_dc[ci]);
    for (k = 1; k < JPEG_BLOCK_SIZE; k++) {
        int rs = jpeg_huff_decode(d, ac), r = rs >> 4;
        s = rs & 15;
        if (s) {
            k += r;
            block[jpeg_natural_order[k]] = (int16_t)jpeg_extend(jpeg_get_bits(d, s), s);
        } else if (r == 15) {
            k += 15;                   /* run of 16 zeros */
        } else {
            break;                     /* end of block */
        }
    }
}

/* One byte into the bit buffer the way libjpeg-turbo's fast path reads:
 * 0xFF00 is a stuffed 0xFF, but 0xFF followed by anything else (even
 * another 0xFF fill byte) counts as a marker and yields zero bits. */
static void jpeg_fast_byte(jpeg_decoder *d)
{
    unsigned c0, c1;
    d->bit_buffer <<= 8;
    d->bits_left += 8;
    if (d->pos + 1 >= d->size) {       /* cannot happen within the fast path's margin */
        d->fast_hit_marker = 1;
        return;
    }
    c0 = d->data[d->pos];
    c1 = d->data[d->pos + 1];
    d->bit_buffer |= c0;
    d->pos++;
    if (c0 == 0xFF) {
        d->pos++;
        if (c1 != 0) {
            d->fast_hit_marker = 1;
            d->pos -= 2;
            d->bit_buffer &= ~(uint64_t)0xFF;
        }
    }
}

/* The fast path's refill: six bytes whenever 16 bits or fewer are left. */
static void jpeg_fast_fill(jpeg_decoder *d)
{
    int i;
    if (d->bits_left <= JPEG_FAST_REFILL_BITS)
        for (i = 0; i < JPEG_FAST_REFILL_BYTES; i++)
            jpeg_fast_byte(d);
}

/* Takes n bits after a fast-path refill (enough bits are always present). */
static int jpeg_fast_bits(jpeg_decoder *d, int n)
{
    d->bits_left -= n;
    return (int)((d->bit_buffer >> d->bits_left) & ((1u << n) - 1));
}

/* Decodes one Huffman symbol as the fast path does. */
static int jpeg_fast_decode(jpeg_decoder *d, const jpeg_huff_table *t)
{
    int entry, length;
    int32_t code;
    jpeg_fast_fill(d);
    entry = t->lookup[(d->bit_buffer >> (d->bits_left - JPEG_HUFF_LOOKAHEAD)) & ((1u << JPEG_HUFF_LOOKAHEAD) - 1)];
    length = entry >> 8;
    if (length <= JPEG_HUFF_LOOKAHEAD) {
        d->bits_left -= length;
        return entry & 0xFF;
    }
    code = jpeg_fast_bits(d, length);
    while (code > t->maxcode[length]) {
        code = (code << 1) | jpeg_fast_bits(d, 1);
        length++;
    }
    return length > JPEG_HUFF_MAX_BITS ? 0 : t->symbols[(code + t->valoffset[length]) & 0xFF];
}

/* libjpeg-turbo's decode_mcu_fast for a sequential MCU.  Returns 0 if it
 * met a marker: libjpeg-turbo then decodes the MCU again with the careful
 * reader, over whatever this attempt already wrote into the blocks. */
static int jpeg_huff_fast_mcu(jpeg_decoder *d)
{
    int32_t last_dc[JPEG_MAX_SCAN_COMPONENTS];
    int b;
    memcpy(last_dc, d->last_dc, sizeof last_dc);
    d->fast_hit_marker = 0;
    for (b = 0; b < d->blocks_in_mcu; b++) {
        int ci = d->mcu_member[b], k, s;
        const jpeg_component *c = d->scan_comp[ci];
        const jpeg_huff_table *ac = &d->ac_tables[c->ac_table];
        int16_t *block = d->mcu_ptr[b];
        s = jpeg_fast_decode(d, &d->dc_tables[c->dc_table]);
        if (s) {
            jpeg_fast_fill(d);
            s = jpeg_extend(jpeg_fast_bits(d, s), s);
        }
        last_dc[ci] = jpeg_wrap32((int64_t)last_dc[ci] + s);
        block[0] = jpeg_coef((uint32_t)last_dc[ci]);
        for (k = 1; k < JPEG_BLOCK_SIZE; k++) {
            int rs = jpeg_fast_decode(d, ac), r = rs >> 4;
            s = rs & 15;
            if (s) {
                k += r;
                jpeg_fast_fill(d);
                block[jpeg_natural_order[k]] = (int16_t)jpeg_extend(jpeg_fast_bits(d, s), s);
            } else if (r == 15) {
                k += 15;
            } else {
                break;
            }
        }
    }
    if (d->fast_hit_marker)
        return 0;
    memcpy(d->last_dc, last_dc, sizeof last_dc);
    return 1;
}

/* Bit reader and prediction state at the start of an MCU, for retries. */
typedef struct {
    size_t pos;
    uint64_t bit_buffer;
    int bits_left, unread_marker, out_of_data;
    int32_t last_dc[JPEG_MAX_SCAN_COMPONENTS];
} jpeg_mcu_start;

/* Records the state at the start of an MCU. */
static void jpeg_save_mcu_start(const jpeg_decoder *d, jpeg_mcu_start *m)
{
    m->pos = d->pos;
    m->bit_buffer = d->bit_buffer;
    m->bits_left = d->bits_left;
    m->unread_marker = d->unread_marker;
    m->out_of_data = d->out_of_data;
    memcpy(m->last_dc, d->last_dc, sizeof m->last_dc);
}

/* Returns to the state at the start of an MCU. */
static void jpeg_restore_mcu_start(jpeg_decoder *d, const jpeg_mcu_start *m)
{
    d->pos = m->pos;
    d->bit_buffer = m->bit_buffer;
    d->bits_left = m->bits_left;
    d->unread_marker = m->unread_marker;
    d->out_of_data = m->out_of_data;
    memcpy(d->last_dc, m->last_dc, sizeof d->last_dc);
}

/* Decodes one MCU of a sequential Huffman scan as libjpeg-turbo's
 * decode_mcu does under PIL: with the fast path when at least 512 bytes
 * per block are in the buffer (falling back to the careful reader at a
 * marker), and starting the MCU over whenever the careful reader had to
 * wait for PIL's next 64 KiB read. */
static void jpeg_huff_sequential_mcu(jpeg_decoder *d)
{
    jpeg_mcu_start start;
    for (;;) {
        int b, use_fast = !d->restart_interval && !d->unread_marker &&
                          d->avail - d->pos >= (size_t)JPEG_FAST_BYTES_PER_BLOCK * (size_t)d->blocks_in_mcu;
        jpeg_save_mcu_start(d, &start);
        if (use_fast) {
            if (jpeg_huff_fast_mcu(d))
                return;
            jpeg_restore_mcu_start(d, &start);
        }
        d->suspended = 0;
        for (b = 0; b < d->blocks_in_mcu; b++)
            jpeg_huff_sequential_block(d, d->mcu_ptr[b], d->mcu_member[b]);
        if (!d->suspended || d->input_ended)
            return;
        jpeg_restore_mcu_start(d, &start);
        if (!d->multiscan)             /* libjpeg clears its one-MCU buffer before each try */
            memset(d->mcu_blocks, 0, (size_t)d->blocks_in_mcu * sizeof d->mcu_blocks[0]);
    }
}

/* Progressive DC first pass: DC differences, scaled by 2^Al. */
static void jpeg_huff_dc_first(jpeg_decoder *d, int16_t *block, int ci)
{
    const jpeg_component *c = d->scan_comp[ci];
    int32_t last = d->last_dc[ci];
    int s = jpeg_huff_decode(d, &d->dc_tables[c->dc_table]);
    if (s)
        s = jpeg_extend(jpeg_get_bits(d, s), s);
    if ((last >= 0 && s > INT32_MAX - last) || (last < 0 && s < INT32_MIN - last)) {
        d->bad_dc = 1;
        return;
    }
    d->last_dc[ci] = last + s;
    block[0] = jpeg_coef((uint32_t)d->last_dc[ci] << d->al);
}

/* Progressive AC first pass over Ss..Se of one block, with end-of-band runs. */
static void jpeg_huff_ac_first(jpeg_decoder *d, int16_t *block)
{
    const jpeg_huff_table *t = &d->ac_tables[d->scan_comp[0]->ac_table];
    int k;
    if (d->eob_run > 0) {
        d->eob_run--;
        return;
    }
    for (k = d->ss; k <= d->se; k++) {
        int rs = jpeg_huff_decode(d, t), r = rs >> 4, s = rs & 15;
        if (s) {
            k += r;
            block[jpeg_natural_order[k]] = jpeg_coef((uint32_t)jpeg_extend(jpeg_get_bits(d, s), s) << d->al);
        } else if (r == 15) {
            k += 15;
        } else {
            d->eob_run = 1u << r;
            if (r)
                d->eob_run += (unsigned)jpeg_get_bits(d, r);
            d->eob_run--;
            break;
        }
    }
}

/* Adds one refinement bit to an already nonzero coefficient. */
static void jpeg_huff_refine_coef(jpeg_decoder *d, int16_t *coef, int p1)
{
    if (jpeg_get_bits(d, 1) && (*coef & p1) == 0)
        *coef = jpeg_coef((uint32_t)(*coef >= 0 ? *coef + p1 : *coef - p1));
}

/* Progressive AC refinement pass over Ss..Se of one block (jdphuff.c). */
static void jpeg_huff_ac_refine(jpeg_decoder *d, int16_t *block)
{
    const jpeg_huff_table *t = &d->ac_tables[d->scan_comp[0]->ac_table];
    int p1 = 1 << d->al, k = d->ss;
    if (d->eob_run == 0) {
        for (; k <= d->se; k++) {
            int rs = jpeg_huff_decode(d, t), r = rs >> 4, s = rs & 15;
            if (s) {
                s = jpeg_get_bits(d, 1) ? p1 : -p1;   /* a newly nonzero coefficient */
            } else if (r != 15) {
                d->eob_run = 1u << r;
                if (r)
                    d->eob_run += (unsigned)jpeg_get_bits(d, r);
                break;
            }
            /* skip r zero coefficients, refining the nonzero ones passed */
            do {
                int16_t *coef = &block[jpeg_natural_order[k]];
                if (*coef != 0)
                    jpeg_huff_refine_coef(d, coef, p1);
                else if (--r < 0)
                    break;
                k++;
            } while (k <= d->se);
            if (s)
                block[jpeg_natural_order[k]] = (int16_t)s;
        }
    }
    if (d->eob_run > 0) {
        for (; k <= d->se; k++)
            if (block[jpeg_natural_order[k]] != 0)
                jpeg_huff_refine_coef(d, &block[jpeg_natural_order[k]], p1);
        d->eob_run--;
    }
}

/* Restart for the Huffman decoders: drop buffered bits, read RSTn, reset predictions. */
static void jpeg_huff_restart(jpeg_decoder *d)
{
    int i;
    d->bits_left = 0;
    if (jpeg_read_restart_marker(d) != JPEG_OK) {
        d->input_ended = 1;
        return;
    }
    for (i = 0; i < JPEG_MAX_SCAN_COMPONENTS; i++)
        d->last_dc[i] = 0;
    d->eob_run = 0;
    d->restarts_left = (unsigned)d->restart_interval;
    if (!d->unread_marker)
        d->out_of_data = 0;
}

/* Decodes one MCU of a Huffman-coded scan. */
static void jpeg_huff_mcu(jpeg_decoder *d)
{
    int b;
    if (d->restart_interval && d->restarts_left == 0)
        jpeg_huff_restart(d);
    if (d->scan_kind == JPEG_SCAN_SEQUENTIAL && !d->out_of_data && !d->input_ended) {
        jpeg_huff_sequential_mcu(d);
    } else if (!d->out_of_data && !d->input_ended) {
        for (b = 0; b < d->blocks_in_mcu && !d->bad_dc; b++) {
            int16_t *block = d->mcu_ptr[b];
            switch (d->scan_kind) {
            case JPEG_SCAN_DC_FIRST:
                jpeg_huff_dc_first(d, block, d->mcu_member[b]);
                break;
            case JPEG_SCAN_DC_REFINE:
                if (jpeg_get_bits(d, 1))
                    block[0] = (int16_t)(block[0] | (1 << d->al));
                break;
            case JPEG_SCAN_AC_FIRST:
                jpeg_huff_ac_first(d, block);
                break;
            default:
                jpeg_huff_ac_refine(d, block);
                break;
            }
        }
    }
    if (d->restart_interval)
        d->restarts_left--;
}

/* ---------------------------------------------------------------------
 * Arithmetic decoding (jdarith.c)
 * ------------------------------------------------------------------- */

/* Next entropy byte; past the readable data it flags the failure and yields 0. */
static int jpeg_arith_byte(jpeg_decoder *d)
{
    if (jpeg_byte_ready(d) != 0) {
        d->input_ended = 1;
        return 0;
    }
    return d->data[d->pos++];
}

/* Decodes one binary decision using statistics bin *st (T.81 D.2.4-D.2.6). */
static int jpeg_arith_decode(jpeg_decoder *d, unsigned char *st)
{
    const jpeg_arith_state *q;
    unsigned char after_lps;
    int sv;
    int64_t temp;
    while (d->arith_a < JPEG_ARITH_HALF) {  /* renormalise, reading bytes into C */
        if (--d->arith_ct < 0) {
            int data = 0;
            if (!d->unread_marker) {
                data = jpeg_arith_byte(d);
                if (data == 0xFF) {
                    do
                        data = jpeg_arith_byte(d);
                    while (data == 0xFF);
                    if (data == 0) {
                        data = 0xFF;
                    } else {           /* a marker: zeros from here on */
                        d->unread_marker = data;
                        data = 0;
                    }
                }
            }
            d->arith_c = (d->arith_c << 8) | data;
            if ((d->arith_ct += 8) < 0 && ++d->arith_ct == 0)
                d->arith_a = JPEG_ARITH_HALF;  /* the two initial bytes are in */
        }
        d->arith_a <<= 1;
    }
    sv = *st;
    q = &jpeg_arith_states[sv & 0x7F];
    after_lps = (unsigned char)((q->switch_mps << 7) | q->next_lps);
    temp = d->arith_a - q->qe;
    d->arith_a = temp;
    temp <<= d->arith_ct;
    if (d->arith_c >= temp) {
        d->arith_c -= temp;
        if (d->arith_a < q->qe) {
            d->arith_a = q->qe;
            *st = (unsigned char)((sv & 0x80) ^ q->next_mps);
        } else {
            d->arith_a = q->qe;
            *st = (unsigned char)((sv & 0x80) ^ after_lps);
            sv ^= 0x80;
        }
    } else if (d->arith_a < JPEG_ARITH_HALF) {
        if (d->arith_a < q->qe) {
            *st = (unsigned char)((sv & 0x80) ^ after_lps);
            sv ^= 0x80;
        } else {
            *st = (unsigned char)((sv & 0x80) ^ q->next_mps);
        }
    }
    return sv >> 7;
}

/* Decodes a DC difference (T.81 F.1.4.4.1); -1 marks corrupt data. */
static int jpeg_arith_dc_diff(jpeg_decoder *d, int ci, int tbl, int *diff)
{
    unsigned char *st = d->dc_stats[tbl] + d->dc_context[ci];
    int sign, m, v;
    if (jpeg_arith_decode(d, st) == 0) {
        d->dc_context[ci] = 0;
        *diff = 0;
        return 0;
    }
    sign = jpeg_arith_decode(d, st + 1);
    st += 2 + sign;
    if ((m = jpeg_arith_decode(d, st)) != 0) {
        st = d->dc_stats[tbl] + JPEG_ARITH_DC_X1;
        while (jpeg_arith_decode(d, st)) {
            if ((m <<= 1) == JPEG_ARITH_MAX_MAGNITUDE)
                return -1;
            st++;
        }
    }
    if (m < (1 << d->arith_dc_low[tbl]) >> 1)
        d->dc_context[ci] = 0;
    else if (m > (1 << d->arith_dc_high[tbl]) >> 1)
        d->dc_context[ci] = 12 + sign * 4;
    else
        d->dc_context[ci] = 4 + sign * 4;
    v = m;
    st += JPEG_ARITH_BITS_OFFSET;
    while (m >>= 1)
        if (jpeg_arith_decode(d, st))
            v |= m;
    v += 1;
    *diff = sign ? -v : v;
    return 0;
}

/* Decodes AC coefficients ss..se of one block, scaled by 2^al (T.81 F.1.4.4.2). */
static void jpeg_arith_ac_block(jpeg_decoder *d, int16_t *block, int tbl, int ss, int se, int al)
{
    int k;
    for (k = ss; k <= se; k++) {
        unsigned char *st = d->ac_stats[tbl] + 3 * (k - 1);
        int sign, m, v;
        if (jpeg_arith_decode(d, st))
            break;                     /* end of block */
        while (jpeg_arith_decode(d, st + 1) == 0) {
            st += 3;
            if (++k > se) {
                d->arith_ct = -1;      /* spectral overflow */
                return;
            }
        }
        sign = jpeg_arith_decode(d, d->fixed_bin);
        st += 2;
        if ((m = jpeg_arith_decode(d, st)) != 0 && jpeg_arith_decode(d, st)) {
            m <<= 1;
            st = d->ac_stats[tbl] + (k <= d->arith_ac_split[tbl] ? JPEG_ARITH_AC_LOW_X2 : JPEG_ARITH_AC_HIGH_X2);
            while (jpeg_arith_decode(d, st)) {
                if ((m <<= 1) == JPEG_ARITH_MAX_MAGNITUDE) {
                    d->arith_ct = -1;  /* magnitude overflow */
                    return;
                }
                st++;
            }
        }
        v = m;
        st += JPEG_ARITH_BITS_OFFSET;
        while (m >>= 1)
            if (jpeg_arith_decode(d, st))
                v |= m;
        v += 1;
        block[jpeg_natural_order[k]] = jpeg_coef((uint32_t)(sign ? -v : v) << al);
    }
}

/* Decodes the DC of a sequential or progressive-first block, scaled by
 * 2^shift; 0 on success. */
static int jpeg_arith_dc_block(jpeg_decoder *d, int16_t *block, int ci, int shift)
{
    int diff;
    if (jpeg_arith_dc_diff(d, ci, d->scan_comp[ci]->dc_table, &diff) != 0) {
        d->arith_ct = -1;              /* magnitude overflow */
        return -1;
    }
    d->last_dc[ci] = (int32_t)(((uint32_t)d->last_dc[ci] + (uint32_t)diff) & 0xFFFFu);
    block[0] = jpeg_coef((uint32_t)d->last_dc[ci] << shift);
    return 0;
}

/* Progressive AC refinement of one block (jdarith.c decode_mcu_AC_refine). */
static void jpeg_arith_ac_refine(jpeg_decoder *d, int16_t *block)
{
    int tbl = d->scan_comp[0]->ac_table, p1 = 1 << d->al, k, kex;
    for (kex = d->se; kex > 0; kex--)  /* end of block in the previous stage */
        if (block[jpeg_natural_order[kex]])
            break;
    for (k = d->ss; k <= d->se; k++) {
        unsigned char *st = d->ac_stats[tbl] + 3 * (k - 1);
        if (k > kex && jpeg_arith_decode(d, st))
            break;
        for (;;) {
            int16_t *coef = &block[jpeg_natural_order[k]];
            if (*coef) {
                if (jpeg_arith_decode(d, st + 2))
                    *coef = jpeg_coef((uint32_t)(*coef < 0 ? *coef - p1 : *coef + p1));
                break;
            }
            if (jpeg_arith_decode(d, st + 1)) {
                *coef = (int16_t)(jpeg_arith_decode(d, d->fixed_bin) ? -p1 : p1);
                break;
            }
            st += 3;
            if (++k > d->se) {
                d->arith_ct = -1;      /* spectral overflow */
                return;
            }
        }
    }
}

/* Restart for the arithmetic decoder: read RSTn, reset statistics and registers. */
static void jpeg_arith_restart(jpeg_decoder *d)
{
    int i;
    if (jpeg_read_restart_marker(d) != JPEG_OK) {
        d->input_ended = 1;
        return;
    }
    for (i = 0; i < d->scan_ncomp; i++) {
        const jpeg_component *c = d->scan_comp[i];
        if (!d->progressive || (d->ss == 0 && d->ah == 0)) {
            memset(d->dc_stats[c->dc_table], 0, JPEG_ARITH_DC_BINS);
            d->last_dc[i] = 0;
            d->dc_context[i] = 0;
        }
        if (!d->progressive || d->ss != 0)
            memset(d->ac_stats[c->ac_table], 0, JPEG_ARITH_AC_BINS);
    }
    d->arith_c = 0;
    d->arith_a = 0;
    d->arith_ct = -16;
    d->restarts_left = (unsigned)d->restart_interval;
}

/* Decodes one MCU of an arithmetic-coded scan. */
static void jpeg_arith_mcu(jpeg_decoder *d)
{
    int b;
    if (d->restart_interval) {
        if (d->restarts_left == 0)
            jpeg_arith_restart(d);
        d->restarts_left--;
    }
    for (b = 0; b < d->blocks_in_mcu && d->arith_ct != -1 && !d->input_ended; b++) {
        int16_t *block = d->mcu_ptr[b];
        int ci = d->mcu_member[b];
        switch (d->scan_kind) {
        case JPEG_SCAN_SEQUENTIAL:
            if (jpeg_arith_dc_block(d, block, ci, 0) == 0)
                jpeg_arith_ac_block(d, block, d->scan_comp[ci]->ac_table, 1, JPEG_BLOCK_SIZE - 1, 0);
            break;
        case JPEG_SCAN_DC_FIRST:
            jpeg_arith_dc_block(d, block, ci, d->al);
            break;
        case JPEG_SCAN_DC_REFINE:
            if (jpeg_arith_decode(d, d->fixed_bin))
                block[0] = (int16_t)(block[0] | (1 << d->al));
            break;
        case JPEG_SCAN_AC_FIRST:
            jpeg_arith_ac_block(d, block, d->scan_comp[0]->ac_table, d->ss, d->se, d->al);
            break;
        default:
            jpeg_arith_ac_refine(d, block);
            break;
        }
    }
}

/* ---------------------------------------------------------------------
 * Inverse DCT: the accurate integer "islow" method (jidctint.c) exactly as
 * libjpeg-turbo runs it on x86-64, i.e. its SSE2/AVX2 version.  On valid
 * data that equals the C code; on corrupt data the SIMD arithmetic differs:
 * dequantised values and some sums wrap to 16 bits, the intermediate rows
 * saturate to 16 bits and the output saturates instead of wrapping.
 * ------------------------------------------------------------------- */

/* Wraps to a signed 16-bit value (16-bit SIMD lane arithmetic). */
static int32_t jpeg_wrap16(int64_t v)
{
    uint32_t low = (uint32_t)((uint64_t)v & 0xFFFFu);
    return (int32_t)low - (low >= 0x8000u ? 0x10000 : 0);
}

/* Saturates to a signed 16-bit value (packssdw). */
static int32_t jpeg_sat16(int32_t v)
{
    return v < -32768 ? -32768 : v > 32767 ? 32767 : v;
}

/* Rounding arithmetic right shift (paddd + psrad). */
static int32_t jpeg_descale32(int32_t v, int bits)
{
    return (int32_t)jpeg_shift_down((int64_t)v + ((int64_t)1 << (bits - 1)), bits);
}

/* One 8-point 1-D IDCT over in[0], in[step], ... in[7*step] (16-bit
 * values), written to out[0], out[step], ... saturated to 16 bits after
 * descaling by `bits`.  With 16-bit inputs every sum below stays under
 * 2^31 in magnitude, so 32-bit arithmetic is exact, as in the SIMD code. */
static void jpeg_idct_1d(const int32_t *in, int step, int32_t *out, int bits)
{
    enum {
        CONST_BITS = 13,
        F_0_298 = 2446, F_0_390 = 3196, F_0_541 = 4433, F_0_765 = 6270, F_0_899 = 7373,
        F_1_175 = 9633, F_1_501 = 12299, F_1_847 = 15137, F_1_961 = 16069, F_2_053 = 16819,
        F_2_562 = 20995, F_3_072 = 25172
    };
    int32_t x0 = in[0], x1 = in[step], x2 = in[2 * step], x3 = in[3 * step];
    int32_t x4 = in[4 * step], x5 = in[5 * step], x6 = in[6 * step], x7 = in[7 * step];
    int32_t t0, t1, t2, t3, t10, t11, t12, t13, z3, z4;

    /* even part */
    t3 = x2 * (F_0_541 + F_0_765) + x6 * F_0_541;
    t2 = x2 * F_0_541 + x6 * (F_0_541 - F_1_847);
    t0 = jpeg_wrap16((int64_t)x0 + x4) * (1 << CONST_BITS);
    t1 = jpeg_wrap16((int64_t)x0 - x4) * (1 << CONST_BITS);
    t10 = t0 + t3;
    t13 = t0 - t3;
    t11 = t1 + t2;
    t12 = t1 - t2;
    /* odd part */
    z3 = jpeg_wrap16((int64_t)x3 + x7);
    z4 = jpeg_wrap16((int64_t)x1 + x5);
    t0 = z3 * (F_1_175 - F_1_961) + z4 * F_1_175;          /* z3 after rotation */
    z4 = z3 * F_1_175 + z4 * (F_1_175 - F_0_390);          /* z4 after rotation */
    z3 = t0;
    t0 = x7 * (F_0_298 - F_0_899) - x1 * F_0_899 + z3;
    t3 = -x7 * F_0_899 + x1 * (F_1_501 - F_0_899) + z4;
    t1 = x5 * (F_2_053 - F_2_562) - x3 * F_2_562 + z4;
    t2 = -x5 * F_2_562 + x3 * (F_3_072 - F_2_562) + z3;
    /* outputs */
    out[0] = jpeg_sat16(jpeg_descale32(t10 + t3, bits));
    out[7 * step] = jpeg_sat16(jpeg_descale32(t10 - t3, bits));
    out[step] = jpeg_sat16(jpeg_descale32(t11 + t2, bits));
    out[6 * step] = jpeg_sat16(jpeg_descale32(t11 - t2, bits));
    out[2 * step] = jpeg_sat16(jpeg_descale32(t12 + t1, bits));
    out[5 * step] = jpeg_sat16(jpeg_descale32(t12 - t1, bits));
    out[3 * step] = jpeg_sat16(jpeg_descale32(t13 + t0, bits));
    out[4 * step] = jpeg_sat16(jpeg_descale32(t13 - t0, bits));
}

/* Inverse-transforms one block (coefficients in natural order, dequantised
 * with the 16-bit multipliers quant) into an 8x8 area of out.  The
 * shortcuts for zero columns and rows give exactly what the full
 * computation would. */
static void jpeg_idct_islow(const int16_t *in, const int32_t *quant, unsigned char *out, size_t stride)
{
    enum { CONST_BITS = 13, PASS1_BITS = 2 };
    int32_t deq[JPEG_BLOCK_SIZE], ws[JPEG_BLOCK_SIZE], row[JPEG_BLOCK];
    int i, x, rows_zero = 1;

    for (i = 0; i < JPEG_BLOCK_SIZE; i++) {
        deq[i] = jpeg_wrap16((int64_t)in[i] * quant[i]);
        if (i >= JPEG_BLOCK && in[i] != 0)
            rows_zero = 0;
    }
    for (i = 0; i < JPEG_BLOCK; i++) {             /* columns */
        const int32_t *c = deq + i;
        int32_t *w = ws + i;
        if (rows_zero) {                           /* SIMD special case: 16-bit wrap */
            w[0] = w[8] = w[16] = w[24] = w[32] = w[40] = w[48] = w[56] = jpeg_wrap16((int64_t)c[0] * (1 << PASS1_BITS));
        } else if (c[8] == 0 && c[16] == 0 && c[24] == 0 && c[32] == 0 && c[40] == 0 && c[48] == 0 && c[56] == 0) {
            w[0] = w[8] = w[16] = w[24] = w[32] = w[40] = w[48] = w[56] = jpeg_sat16(c[0] * (1 << PASS1_BITS));
        } else {
            jpeg_idct_1d(c, JPEG_BLOCK, w, CONST_BITS - PASS1_BITS);
        }
    }
    for (i = 0; i < JPEG_BLOCK; i++) {             /* rows */
        const int32_t *w = ws + i * JPEG_BLOCK;
        unsigned char *o = out + (size_t)i * stride;
        if (w[1] == 0 && w[2] == 0 && w[3] == 0 && w[4] == 0 && w[5] == 0 && w[6] == 0 && w[7] == 0) {
            int32_t v = (int32_t)jpeg_shift_down((int64_t)w[0] + 16, PASS1_BITS + 3);
            memset(o, (v < -128 ? -128 : v > 127 ? 127 : v) + 128, JPEG_BLOCK);
            continue;
        }
        jpeg_idct_1d(w, 1, row, CONST_BITS + PASS1_BITS + 3);
        for (x = 0; x < JPEG_BLOCK; x++)           /* saturate to -128..127, then centre */
            o[x] = (unsigned char)((row[x] < -128 ? -128 : row[x] > 127 ? 127 : row[x]) + 128);
    }
}

/* Inverse-transforms one block of component c into its sample plane. */
static void jpeg_idct_to_plane(const jpeg_component *c, const int16_t *block, int block_row, int block_col)
{
    unsigned char *dst = c->plane + (size_t)block_row * JPEG_BLOCK * c->plane_stride + (size_t)block_col * JPEG_BLOCK;
    jpeg_idct_islow(block, c->idct_quant, dst, c->plane_stride);
}

/* ---------------------------------------------------------------------
 * Scan decoding (jdcoefct.c consume_data / decompress_onepass)
 * ------------------------------------------------------------------- */

/* Points mcu_ptr at the blocks of MCU (row, col): zeroed scratch blocks for
 * single-scan files, else the blocks in the coefficient arrays. */
static void jpeg_locate_mcu(jpeg_decoder *d, int row, int col)
{
    int b = 0, i, x, y;
    if (!d->multiscan) {
        memset(d->mcu_blocks, 0, (size_t)d->blocks_in_mcu * sizeof d->mcu_blocks[0]);
        for (b = 0; b < d->blocks_in_mcu; b++)
            d->mcu_ptr[b] = d->mcu_blocks[b];
        return;
    }
    for (i = 0; i < d->scan_ncomp; i++) {
        const jpeg_component *c = d->scan_comp[i];
        int mw = d->scan_ncomp == 1 ? 1 : c->h, mh = d->scan_ncomp == 1 ? 1 : c->v;
        for (y = 0; y < mh; y++)
            for (x = 0; x < mw; x++)
                d->mcu_ptr[b++] = c->coefs + ((size_t)(row * mh + y) * (size_t)c->coef_w + (size_t)(col * mw + x)) * JPEG_BLOCK_SIZE;
    }
}

/* Inverse-transforms the blocks of a decoded MCU of a single-scan file,
 * skipping the dummy blocks that pad MCUs at the right and bottom edges. */
static void jpeg_idct_mcu(jpeg_decoder *d, int row, int col)
{
    int b = 0, i, x, y;
    for (i = 0; i < d->scan_ncomp; i++) {
        const jpeg_component *c = d->scan_comp[i];
        int mw = d->scan_ncomp == 1 ? 1 : c->h, mh = d->scan_ncomp == 1 ? 1 : c->v;
        for (y = 0; y < mh; y++)
            for (x = 0; x < mw; x++, b++) {
                int br = row * mh + y, bc = col * mw + x;
                if (br < c->blocks_h && bc < c->blocks_w)
                    jpeg_idct_to_plane(c, d->mcu_ptr[b], br, bc);
            }
    }
}

/* True when the rest of a buffered Huffman scan can change nothing: its data
 * ran out and no restart marker can bring it back. */
static int jpeg_scan_exhausted(const jpeg_decoder *d)
{
    int m = d->unread_marker;
    if (d->arithmetic || !d->out_of_data)
        return 0;
    return d->restart_interval == 0 || (m >= JPEG_M_SOF0 && (m < JPEG_M_RST0 || m > JPEG_M_RST7));
}

/* Reports why the entropy decoder had to stop. */
static int jpeg_scan_failure(const jpeg_decoder *d)
{
    if (d->bad_dc)
        return fail(d->err, d->errsize, "corrupt DC coefficient in progressive JPEG");
    if (d->avail < d->size)
        return fail(d->err, d->errsize,
                    "arithmetic-coded JPEG data crosses a 64 KiB boundary, which PIL cannot decode");
    return fail(d->err, d->errsize, "JPEG file is truncated");
}

/* Decodes every MCU of the current scan. */
static int jpeg_decode_mcus(jpeg_decoder *d)
{
    int row, col;
    for (row = 0; row < d->mcu_rows; row++) {
        int imcu_row = d->scan_ncomp == 1 ? row / d->scan_comp[0]->v : row;
        for (col = 0; col < d->mcus_per_row; col++) {
            if (jpeg_charge_mcu(d) != 0)
                return fail(d->err, d->errsize, "JPEG file needs too much decoding work (too many scans)");
            jpeg_locate_mcu(d, row, col);
            if (!d->out_of_data)
                d->last_good_imcu_row = imcu_row;
            if (d->arithmetic)
                jpeg_arith_mcu(d);
            else
                jpeg_huff_mcu(d);
            if (d->input_ended || d->bad_dc)
                return jpeg_scan_failure(d);
            if (!d->multiscan)
                jpeg_idct_mcu(d, row, col);
            else if (jpeg_scan_exhausted(d))
                return 0;
        }
    }
    return 0;
}

/* Decodes the current scan.  libjpeg's arithmetic decoder cannot suspend,
 * so an arithmetic-coded scan fails if it needs more than PIL has handed
 * over by the time the scan starts. */
static int jpeg_decode_scan(jpeg_decoder *d)
{
    int r;
    d->can_suspend = !d->arithmetic;
    r = jpeg_decode_mcus(d);
    d->can_suspend = 1;
    return r;
}

/* ---------------------------------------------------------------------
 * Multi-scan output: block smoothing (jdcoefct.c decompress_smooth_data)
 * ------------------------------------------------------------------- */

/* libjpeg-turbo's smoothing_ok: smoothing applies to a progressive file when
 * every component has DC data and usable quantisers, and some component
 * lacks full precision in one of the first nine AC coefficients. */
static int jpeg_smoothing_wanted(const jpeg_decoder *d)
{
    int ci, k, useful = 0;
    if (!d->progressive)
        return 0;
    for (ci = 0; ci < d->ncomp; ci++) {
        const jpeg_component *c = &d->comp[ci];
        if (!c->quant_latched || c->coef_bits[0] < 0)
            return 0;
        for (k = 0; k < JPEG_SMOOTH_COEFS; k++)
            if (c->quant[jpeg_natural_order[k]] == 0)
                return 0;
        for (k = 1; k < JPEG_SMOOTH_COEFS; k++)
            if (c->coef_bits[k] != 0)
                useful = 1;
    }
    return useful;
}

/* Estimates a coefficient from the weighted neighbourhood sum num, limited
 * to the bits not yet transmitted (al > 0). */
static int16_t jpeg_smooth_predict(int64_t num, int64_t q, int al)
{
    int64_t pred = ((q << 7) + (num >= 0 ? num : -num)) / (q << 8);
    if (al > 0 && pred >= ((int64_t)1 << al))
        pred = ((int64_t)1 << al) - 1;
    return jpeg_coef((uint32_t)(uint64_t)(num >= 0 ? pred : -pred));
}

/* Fills in missing low-frequency coefficients of one block from the 5x5
 * window of neighbouring DC values dc (row-major). */
static void jpeg_smooth_block(int16_t *ws, const jpeg_component *c, const int *bits, int dc_mode, const int *dc)
{
    int64_t q00 = c->quant[0];
    int k, i;
    for (k = 1; k < JPEG_SMOOTH_COEFS; k++) {
        int pos = jpeg_natural_order[k];
        int64_t sum = 0;
        if (!dc_mode && k > 5)
            break;
        if (bits[k] == 0 || ws[pos] != 0)
            continue;
        for (i = 0; i < 25; i++)
            sum += (int64_t)jpeg_smooth_kernels[dc_mode][k][i] * dc[i];
        ws[pos] = jpeg_smooth_predict(q00 * sum, c->quant[pos], bits[k]);
    }
    if (dc_mode) {
        int64_t sum = 0;
        for (i = 0; i < 25; i++)
            sum += (int64_t)jpeg_smooth_kernels[1][0][i] * dc[i];
        ws[0] = jpeg_smooth_predict(q00 * sum, q00, 0);
    }
}

/* Inverse-transforms one component of a progressive file with block
 * smoothing, reproducing libjpeg-turbo's choice of neighbour rows (per iMCU
 * row) and its sliding window of DC values. */
static void jpeg_smooth_component(const jpeg_decoder *d, const jpeg_component *c)
{
    int last_imcu = d->imcu_rows - 1, last_col = c->blocks_w - 1, br, bc, r, k;
    int cur_bits[JPEG_SMOOTH_COEFS], prev_bits[JPEG_SMOOTH_COEFS];
    int16_t ws[JPEG_BLOCK_SIZE];

    for (k = 0; k < JPEG_SMOOTH_COEFS; k++) {
        cur_bits[k] = c->coef_bits[k];
        prev_bits[k] = d->scan_count > 1 ? c->prev_coef_bits[k] : -1;
    }
    for (br = 0; br < c->blocks_h; br++) {
        int imcu = br / c->v, in_row = br % c->v;
        int block_rows = imcu < last_imcu ? c->v : c->blocks_h - imcu * c->v;
        const int16_t *rows[5];
        const int *bits = imcu > d->last_good_imcu_row ? prev_bits : cur_bits;
        int dc_mode = 1, dc[25];
        size_t row_blocks = (size_t)c->coef_w * JPEG_BLOCK_SIZE;

        rows[2] = c->coefs + (size_t)br * row_blocks;
        rows[1] = (in_row > 0 || imcu > 0) ? rows[2] - row_blocks : rows[2];
        rows[0] = (in_row > 1 || imcu > 1) ? rows[2] - 2 * row_blocks : rows[1];
        rows[3] = (in_row < block_rows - 1 || imcu < last_imcu) ? rows[2] + row_blocks : rows[2];
        rows[4] = (in_row < block_rows - 2 || imcu + 1 < last_imcu) ? rows[2] + 2 * row_blocks : rows[3];
        for (k = 1; k < JPEG_SMOOTH_COEFS; k++)
            if (bits[k] != -1)
                dc_mode = 0;           /* interpolate DC only when no AC data was sent */
        for (r = 0; r < 5; r++)
            for (k = 0; k < 5; k++)
                dc[r * 5 + k] = rows[r][0];
        for (bc = 0; bc <= last_col; bc++) {
            for (r = 0; r < 5; r++) {
                if (bc == 0 && bc < last_col)
                    dc[r * 5 + 3] = rows[r][JPEG_BLOCK_SIZE];
                if (bc + 1 < last_col)
                    dc[r * 5 + 4] = rows[r][(size_t)(bc + 2) * JPEG_BLOCK_SIZE];
            }
            memcpy(ws, rows[2] + (size_t)bc * JPEG_BLOCK_SIZE, sizeof ws);
            jpeg_smooth_block(ws, c, bits, dc_mode, dc);
            jpeg_idct_to_plane(c, ws, br, bc);
            for (r = 0; r < 5; r++)
                for (k = 0; k < 4; k++)
                    dc[r * 5 + k] = dc[r * 5 + k + 1];
        }
    }
}

/* Inverse-transforms all buffered coefficients of a multi-scan file, then
 * frees them. */
static void jpeg_transform_buffered(jpeg_decoder *d)
{
    int smooth = jpeg_smoothing_wanted(d), ci, br, bc;
    for (ci = 0; ci < d->ncomp; ci++) {
        jpeg_component *c = &d->comp[ci];
        if (smooth) {
            jpeg_smooth_component(d, c);
        } else {
            for (br = 0; br < c->blocks_h; br++)
                for (bc = 0; bc < c->blocks_w; bc++)
                    jpeg_idct_to_plane(c, c->coefs + ((size_t)br * c->coef_w + (size_t)bc) * JPEG_BLOCK_SIZE, br, bc);
        }
    }
    for (ci = 0; ci < d->ncomp; ci++) {  /* smoothing reads neighbours, so free only now */
        free(d->comp[ci].coefs);
        d->comp[ci].coefs = NULL;
    }
}

/* ---------------------------------------------------------------------
 * Upsampling (jdsample.c) and colour conversion (jdcolor.c, PIL Convert.c)
 * ------------------------------------------------------------------- */

/* Row y of component c brought to full width: a plain copy, a triangle
 * filter for 2:1 ratios (libjpeg's "fancy" upsampling), or replication. */
static const unsigned char *jpeg_upsample_row(const jpeg_decoder *d, const jpeg_component *c, int y)
{
    const unsigned char *near_row, *far_row;
    unsigned char *out = c->row;
    int x, w = c->samples_w, near_y, far_y;

    if (c->upsample == JPEG_UP_FULL)
        return c->plane + (size_t)y * c->plane_stride;
    if (c->upsample == JPEG_UP_REPLICATE) {
        near_row = c->plane + (size_t)(y / c->v_expand) * c->plane_stride;
        for (x = 0; x < d->width; x++)
            out[x] = near_row[x / c->h_expand];
        return out;
    }
    if (c->upsample == JPEG_UP_H2V1_FANCY) {
        near_row = c->plane + (size_t)y * c->plane_stride;
        out[0] = near_row[0];
        out[1] = (unsigned char)((near_row[0] * 3 + near_row[1] + 2) >> 2);
        for (x = 1; x < w - 1; x++) {
            int v = near_row[x] * 3;
            out[2 * x] = (unsigned char)((v + near_row[x - 1] + 1) >> 2);
            out[2 * x + 1] = (unsigned char)((v + near_row[x + 1] + 2) >> 2);
        }
        out[2 * w - 2] = (unsigned char)((near_row[w - 1] * 3 + near_row[w - 2] + 1) >> 2);
        out[2 * w - 1] = near_row[w - 1];
        return out;
    }
    /* vertical 2:1: blend the nearer source row (3/4) with the next nearer (1/4) */
    near_y = y >> 1;
    far_y = (y & 1) ? near_y + 1 : near_y - 1;
    if (far_y < 0)
        far_y = 0;
    if (far_y > c->samples_h - 1)
        far_y = c->samples_h - 1;
    near_row = c->plane + (size_t)near_y * c->plane_stride;
    far_row = c->plane + (size_t)far_y * c->plane_stride;
    if (c->upsample == JPEG_UP_H1V2_FANCY) {
        int bias = (y & 1) ? 2 : 1;
        for (x = 0; x < w; x++)
            out[x] = (unsigned char)((near_row[x] * 3 + far_row[x] + bias) >> 2);
        return out;
    }
    {
        int *sum = d->colsums;                     /* JPEG_UP_H2V2_FANCY */
        for (x = 0; x < w; x++)
            sum[x] = near_row[x] * 3 + far_row[x];
        out[0] = (unsigned char)((sum[0] * 4 + 8) >> 4);
        out[1] = (unsigned char)((sum[0] * 3 + sum[1] + 7) >> 4);
        for (x = 1; x < w - 1; x++) {
            out[2 * x] = (unsigned char)((sum[x] * 3 + sum[x - 1] + 8) >> 4);
            out[2 * x + 1] = (unsigned char)((sum[x] * 3 + sum[x + 1] + 7) >> 4);
        }
        out[2 * w - 2] = (unsigned char)((sum[w - 1] * 3 + sum[w - 2] + 8) >> 4);
        out[2 * w - 1] = (unsigned char)((sum[w - 1] * 4 + 7) >> 4);
    }
    return out;
}

/* Clamps to 0..255. */
static unsigned char jpeg_clamp(int v)
{
    return (unsigned char)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* PIL's MULDIV255: round(a * b / 255) in integers. */
static int jpeg_muldiv255(int a, int b)
{
    int t = a * b + 128;
    return ((t >> 8) + t) >> 8;
}

/* PIL's CMYK -> RGB for the samples libjpeg outputs: PIL reads them as
 * Adobe-style inverted CMYK ("CMYK;I") and then computes
 * R = K - round((255 - C) * K / 255), likewise G and B. */
static void jpeg_cmyk_to_rgb(int c, int m, int y, int k, unsigned char *rgb)
{
    rgb[0] = jpeg_clamp(k - jpeg_muldiv255(255 - c, k));
    rgb[1] = jpeg_clamp(k - jpeg_muldiv255(255 - m, k));
    rgb[2] = jpeg_clamp(k - jpeg_muldiv255(255 - y, k));
}

/* Converts one row of full-resolution component samples to RGB as PIL
 * would produce it from libjpeg's output. */
static void jpeg_convert_row(const jpeg_decoder *d, const unsigned char *const *in, unsigned char *rgb)
{
    int x;
    for (x = 0; x < d->width; x++, rgb += 3) {
        int y = in[0][x], cb, cr, g;
        switch (d->color_space) {
        case JPEG_CS_GRAY:
            rgb[0] = rgb[1] = rgb[2] = (unsigned char)y;
            break;
        case JPEG_CS_RGB:
            rgb[0] = (unsigned char)y;
            rgb[1] = in[1][x];
            rgb[2] = in[2][x];
            break;
        case JPEG_CS_YCBCR:
            cb = in[1][x];
            cr = in[2][x];
            g = (int)jpeg_shift_down((int64_t)d->cb_to_g[cb] + d->cr_to_g[cr], JPEG_COLOR_SCALE_BITS);
            rgb[0] = jpeg_clamp(y + d->cr_to_r[cr]);
            rgb[1] = jpeg_clamp(y + g);
            rgb[2] = jpeg_clamp(y + d->cb_to_b[cb]);
            break;
        case JPEG_CS_CMYK:
            jpeg_cmyk_to_rgb(y, in[1][x], in[2][x], in[3][x], rgb);
            break;
        default:                       /* JPEG_CS_YCCK: libjpeg makes CMYK first */
            cb = in[1][x];
            cr = in[2][x];
            g = (int)jpeg_shift_down((int64_t)d->cb_to_g[cb] + d->cr_to_g[cr], JPEG_COLOR_SCALE_BITS);
            jpeg_cmyk_to_rgb(jpeg_clamp(255 - (y + d->cr_to_r[cr])), jpeg_clamp(255 - (y + g)),
                             jpeg_clamp(255 - (y + d->cb_to_b[cb])), in[3][x], rgb);
            break;
        }
    }
}

/* Produces the RGB image from the decoded sample planes. */
static int jpeg_write_rgb(jpeg_decoder *d, loupe_image *out)
{
    const unsigned char *rows[JPEG_MAX_COMPONENTS];
    size_t row_bytes = (size_t)d->width * 3;
    unsigned char *rgb;
    int y, ci;
    if ((rgb = jpeg_alloc(d, row_bytes, (size_t)d->height)) == NULL)
        return -1;
    for (y = 0; y < d->height; y++) {
        for (ci = 0; ci < d->ncomp; ci++)
            rows[ci] = jpeg_upsample_row(d, &d->comp[ci], y);
        jpeg_convert_row(d, rows, rgb + (size_t)y * row_bytes);
    }
    out->width = d->width;
    out->height = d->height;
    out->rgb = rgb;
    return 0;
}

/* ---------------------------------------------------------------------
 * Driver
 * ------------------------------------------------------------------- */

/* Reads and decodes every scan; for a single-scan file, then reads on to EOI
 * the way jpeg_finish_decompress does, where running out of input is fine. */
static int jpeg_read_scans(jpeg_decoder *d)
{
    for (;;) {
        int r;
        if (jpeg_start_scan(d) != 0 || jpeg_decode_scan(d) != 0)
            return -1;
        r = jpeg_read_markers(d);
        if (r == JPEG_FAILED)
            return -1;
        if (!d->multiscan) {
            if (r == JPEG_AT_SOS)
                return fail(d->err, d->errsize, "JPEG file has an unexpected extra scan");
            return 0;
        }
        if (r == JPEG_AT_EOI)
            return 0;
        if (r == JPEG_SUSPENDED)
            return fail(d->err, d->errsize, "JPEG file is truncated");
    }
}

/* Frees everything the decoder allocated (not the output image). */
static void jpeg_release(jpeg_decoder *d)
{
    int ci;
    for (ci = 0; ci < JPEG_MAX_COMPONENTS; ci++) {
        free(d->comp[ci].coefs);
        free(d->comp[ci].plane);
        free(d->comp[ci].row);
    }
    free(d->colsums);
}

/* Decodes a JPEG file held in memory into 8-bit RGB exactly as PIL 9.4's
 * Image.open(...).convert("RGB") does.  Returns 0, or -1 with a message in
 * err and *out left empty. */
static int jpeg_decode(const unsigned char *data, size_t size, size_t max_pixels, loupe_image *out,
                       char *err, size_t errsize)
{
    jpeg_pil_header pil;
    jpeg_decoder *d;
    int r;

    out->width = out->height = 0;
    out->rgb = NULL;
    if (jpeg_pil_probe(data, size, &pil, err, errsize) != 0)
        return -1;
    if ((size_t)pil.width * (size_t)pil.height > max_pixels)
        return fail(err, errsize, "JPEG image has %llu pixels (%dx%d), more than the limit of %llu",
                    (unsigned long long)pil.width * (unsigned long long)pil.height, pil.width, pil.height,
                    (unsigned long long)max_pixels);
    d = calloc(1, sizeof *d);
    if (d == NULL)
        return fail(err, errsize, "out of memory decoding JPEG");
    d->data = data;
    d->size = size;
    d->avail = size < JPEG_PIL_READ_SIZE ? size : JPEG_PIL_READ_SIZE;
    d->can_suspend = 1;
    d->err = err;
    d->errsize = errsize;
    d->fixed_bin[0] = JPEG_ARITH_FIXED_STATE;
    r = jpeg_read_header(d);
    if (r == 0)
        r = jpeg_setup_frame(d, &pil);
    if (r == 0)
        r = jpeg_read_scans(d);
    if (r == 0 && d->multiscan)
        jpeg_transform_buffered(d);
    if (r == 0)
        r = jpeg_write_rgb(d, out);
    jpeg_release(d);
    free(d);
    return r;
}

/* ---- Resize: Pillow 9.4 Image.resize((dw, dh), Image.BILINEAR) on 8-bit RGB ----
 *
 * Pillow resamples separably: a horizontal pass (only when the width changes)
 * produces an 8-bit intermediate image, then a vertical pass (only when the
 * height changes) produces the output. Each output sample is a weighted sum of
 * a run of consecutive input samples. The weights come from a triangle filter
 * whose radius grows with the reduction factor (so shrinking averages over all
 * covered pixels instead of aliasing); they are normalised in double precision
 * and then rounded to fixed point with RESIZE_PRECISION_BITS fractional bits.
 *
 * Bit-exactness notes (all verified against Pillow's output):
 *  - the double-precision expressions below are written in Pillow's evaluation
 *    order; none of them is a multiply-add whose fusing could change a result
 *    (the one product that is added to, w * 2^22, is exact);
 *  - the horizontal pass is rounded and clamped to 8 bits before the vertical
 *    pass reads it (no wider intermediate);
 *  - triangle weights are never negative, so the sums below are in
 *    [0, 255 * 2^23 + 2^21] and fit in int32_t: every rounded weight k_j is at
 *    most w_j * 2^22 + 1/2 and only w_j >= 2^-23 gives k_j > 0, at most 2^23 of
 *    them, so the weights add up to at most 2^22 + 2^22. */


#define RESIZE_CHANNELS 3                    /* R, G, B */
#define RESIZE_PRECISION_BITS 22             /* fraction bits of the fixed-point weights (32 - 8 - 2) */
#define RESIZE_ROUND_HALF (1 << (RESIZE_PRECISION_BITS - 1)) /* 0.5 in fixed point */
#define RESIZE_WEIGHT_SCALE ((double)(1 << RESIZE_PRECISION_BITS)) /* 1.0 in fixed point */
#define RESIZE_FILTER_SUPPORT 1.0            /* triangle radius in input pixels at scale 1 */
#define RESIZE_SAMPLE_MAX 255                /* largest 8-bit sample */

/* Filter taps for one axis: output index i reads count[i] consecutive input
 * indices starting at first[i], weighted by weights[offset[i] ...]. */
typedef struct resize_axis {
    int *first;        /* first input index read by each output index */
    int *count;        /* number of input indices read by each output index */
    size_t *offset;    /* start of each output index's weights in weights[] */
    int32_t *weights;  /* fixed-point weights, RESIZE_PRECISION_BITS fraction bits */
} resize_axis;

/* The triangle ("bilinear") filter: 1 - |t| inside (-1, 1), else 0. */
static double resize_triangle(double t)
{
    if (t < 0.0)
        t = -t;
    return t < 1.0 ? 1.0 - t : 0.0;
}

/* Releases an axis's tables (safe on a zeroed or partly built axis). */
static void resize_axis_free(resize_axis *ax)
{
    free(ax->first);
    free(ax->count);
    free(ax->offset);
    free(ax->weights);
    memset(ax, 0, sizeof *ax);
}

/* Maps output index i to its input run [first, first+count) for this axis. */
static void resize_span(int in_size, double scale, double support, int i,
                        int *first, int *count)
{
    double center = (i + 0.5) * scale;
    double lo = center - support + 0.5;
    double hi = center + support + 0.5;
    /* Pillow truncates toward zero with an int cast, then clamps to [0, in_size];
     * clamping in double first gives the same result without overflowing the cast. */
    int xmin = lo <= 0.0 ? 0 : (int)lo;
    int xmax = hi >= (double)in_size ? in_size : (int)hi;
    *first = xmin;
    *count = xmax - xmin;
}

/* Builds the filter taps resampling in_size samples to out_size; 0 or -1 (no memory). */
static int resize_axis_init(resize_axis *ax, int in_size, int out_size)
{
    double scale = (double)in_size / out_size;
    double filterscale = scale > 1.0 ? scale : 1.0; /* widen the filter only when shrinking */
    double support = RESIZE_FILTER_SUPPORT * filterscale;
    double inv_filterscale = 1.0 / filterscale;     /* Pillow multiplies by the reciprocal */
    double *w = NULL;
    size_t total = 0;
    int max_count = 0, i, j;

    memset(ax, 0, sizeof *ax);
    ax->first = malloc((size_t)out_size * sizeof *ax->first);
    ax->count = malloc((size_t)out_size * sizeof *ax->count);
    ax->offset = malloc((size_t)out_size * sizeof *ax->offset);
    if (!ax->first || !ax->count || !ax->offset)
        goto oom;
    for (i = 0; i < out_size; i++) {
        resize_span(in_size, scale, support, i, &ax->first[i], &ax->count[i]);
        ax->offset[i] = total;
        total += (size_t)ax->count[i];
        if (ax->count[i] > max_count)
            max_count = ax->count[i];
    }
    if (total > SIZE_MAX / sizeof *ax->weights)
        goto oom;
    ax->weights = malloc((total ? total : 1) * sizeof *ax->weights);
    w = malloc((max_count ? (size_t)max_count : 1) * sizeof *w);
    if (!ax->weights || !w)
        goto oom;
    for (i = 0; i < out_size; i++) {
        double center = (i + 0.5) * scale;
        double sum = 0.0;
        int32_t *k = ax->weights + ax->offset[i];
        for (j = 0; j < ax->count[i]; j++) {
            w[j] = resize_triangle(((j + ax->first[i]) - center + 0.5) * inv_filterscale);
            sum += w[j];
        }
        for (j = 0; j < ax->count[i]; j++) {
            double wn = sum != 0.0 ? w[j] / sum : w[j];
            k[j] = (int32_t)(wn * RESIZE_WEIGHT_SCALE + 0.5); /* w >= 0: round half up */
        }
    }
    free(w);
    return 0;
oom:
    free(w);
    resize_axis_free(ax);
    return -1;
}

/* Rounds a fixed-point sum to an 8-bit sample, clamping to [0, 255]. */
static unsigned char resize_clip8(int32_t acc)
{
    int32_t v = acc >> RESIZE_PRECISION_BITS;
    if (v < 0)
        return 0;
    return (unsigned char)(v > RESIZE_SAMPLE_MAX ? RESIZE_SAMPLE_MAX : v);
}

/* Horizontal pass: resamples rows [row0, row0+rows) of src (sw wide) to dw wide in dst. */
static void resize_horizontal(const unsigned char *src, int sw, int row0, int rows,
                              const resize_axis *ax, unsigned char *dst, int dw)
{
    size_t src_stride = (size_t)sw * RESIZE_CHANNELS;
    size_t dst_stride = (size_t)dw * RESIZE_CHANNELS;
    int y;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)rows * dw * RESIZE_CHANNELS * ax->count[0]))
#endif
    for (y = 0; y < rows; y++) { /* rows are independent: the same bytes on any number of threads */
        const unsigned char *in = src + (size_t)(row0 + y) * src_stride;
        unsigned char *out = dst + (size_t)y * dst_stride;
        int x, j, c;
        for (x = 0; x < dw; x++) {
            const int32_t *k = ax->weights + ax->offset[x];
            const unsigned char *p = in + (size_t)ax->first[x] * RESIZE_CHANNELS;
            for (c = 0; c < RESIZE_CHANNELS; c++) {
                int32_t acc = RESIZE_ROUND_HALF;
                for (j = 0; j < ax->count[x]; j++)
                    acc += p[(size_t)j * RESIZE_CHANNELS + c] * k[j];
                out[(size_t)x * RESIZE_CHANNELS + c] = resize_clip8(acc);
            }
        }
    }
}

/* Vertical pass: resamples src (width w, its row 0 is input row row0) to dh rows in dst. */
static void resize_vertical(const unsigned char *src, int w, int row0,
                            const resize_axis *ax, unsigned char *dst, int dh)
{
    size_t stride = (size_t)w * RESIZE_CHANNELS;
    int y;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)dh * stride * ax->count[0]))
#endif
    for (y = 0; y < dh; y++) { /* rows are independent: the same bytes on any number of threads */
        const int32_t *k = ax->weights + ax->offset[y];
        const unsigned char *in = src + (size_t)(ax->first[y] - row0) * stride;
        unsigned char *out = dst + (size_t)y * stride;
        size_t i;
        int j;
        for (i = 0; i < stride; i++) {
            int32_t acc = RESIZE_ROUND_HALF;
            for (j = 0; j < ax->count[y]; j++)
                acc += in[(size_t)j * stride + i] * k[j];
            out[i] = resize_clip8(acc);
        }
    }
}

/* Checks that a w x h RGB image's byte count fits in size_t. */
static int resize_size_ok(int w, int h)
{
    return w > 0 && h > 0 && (size_t)w <= SIZE_MAX / RESIZE_CHANNELS / (size_t)h;
}

int loupe_resize_rgb(const unsigned char *src, int sw, int sh,
                     unsigned char *dst, int dw, int dh)
{
    resize_axis hor, ver;
    unsigned char *tmp = NULL;
    int need_h = dw != sw, need_v = dh != sh;
    int rc = -1;

    if (!src || !dst || sw <= 0 || sh <= 0 || dw <= 0 || dh <= 0
        || !resize_size_ok(sw, sh) || !resize_size_ok(dw, dh))
        return -1;
    memset(&hor, 0, sizeof hor);
    memset(&ver, 0, sizeof ver);
    if ((need_h && resize_axis_init(&hor, sw, dw) != 0)
        || (need_v && resize_axis_init(&ver, sh, dh) != 0))
        goto done;
    if (!need_h && !need_v) {
        memcpy(dst, src, (size_t)sw * (size_t)sh * RESIZE_CHANNELS);
    } else if (!need_v) {
        resize_horizontal(src, sw, 0, sh, &hor, dst, dw);
    } else if (!need_h) {
        resize_vertical(src, sw, 0, &ver, dst, dh);
    } else {
        /* The horizontal pass is needed only for the input rows the vertical pass reads. */
        int row0 = ver.first[0];
        int rows = ver.first[dh - 1] + ver.count[dh - 1] - row0;
        if (!resize_size_ok(dw, rows))
            goto done;
        tmp = malloc((size_t)rows * (size_t)dw * RESIZE_CHANNELS);
        if (!tmp)
            goto done;
        resize_horizontal(src, sw, row0, rows, &hor, tmp, dw);
        resize_vertical(tmp, dw, row0, &ver, dst, dh);
    }
    rc = 0;
done:
    free(tmp);
    resize_axis_free(&hor);
    resize_axis_free(&ver);
    return rc;
}

/* ---- Image loading: format sniffing, file reading, freeing ----
 *
 * loupe_image_decode looks at the first bytes to pick a decoder, the way PIL's
 * Image.open tries its plugins' signature checks; loupe_image_load reads a
 * whole file into memory and decodes it. */


#define LOAD_FIRST_CHUNK ((size_t)1 << 16) /* initial read buffer; doubled as needed */
#define LOAD_ERR_MAX 256                   /* decoder message buffer, before the path prefix */

/* The format decoders (parts png.c, jpeg.c, ppm.c): 0, or -1 with *out left empty. */
static int png_decode(const unsigned char *data, size_t size, size_t max_pixels,
                      loupe_image *out, char *err, size_t errsize);
static int jpeg_decode(const unsigned char *data, size_t size, size_t max_pixels,
                       loupe_image *out, char *err, size_t errsize);
static int ppm_decode(const unsigned char *data, size_t size, size_t max_pixels,
                      loupe_image *out, char *err, size_t errsize);

static const unsigned char dispatch_png_magic[8] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n' };
static const unsigned char dispatch_jpeg_magic[3] = { 0xFF, 0xD8, 0xFF };

/* Returns 1 when data (size bytes) starts with the n bytes of magic. */
static int dispatch_starts_with(const unsigned char *data, size_t size,
                                const unsigned char *magic, size_t n)
{
    return size >= n && memcmp(data, magic, n) == 0;
}

/* Returns 1 for a binary PGM (P5) or PPM (P6) header. */
static int dispatch_is_pnm(const unsigned char *data, size_t size)
{
    return size >= 2 && data[0] == 'P' && (data[1] == '5' || data[1] == '6');
}

void loupe_image_free(loupe_image *img)
{
    if (!img)
        return;
    free(img->rgb);
    img->rgb = NULL;
    img->width = 0;
    img->height = 0;
}

int loupe_image_decode(const void *data, size_t size, size_t max_pixels,
                       loupe_image *out, char *err, size_t errsize)
{
    const unsigned char *p = data;
    int rc;

    if (err && errsize)
        err[0] = '\0';
    if (!out)
        return fail(err, errsize, "no output image given");
    out->width = 0;
    out->height = 0;
    out->rgb = NULL;
    if (!p && size > 0)
        return fail(err, errsize, "no input data given");
    if (size == 0)
        return fail(err, errsize, "empty input");
    if (dispatch_starts_with(p, size, dispatch_png_magic, sizeof dispatch_png_magic))
        rc = png_decode(p, size, max_pixels, out, err, errsize);
    else if (dispatch_starts_with(p, size, dispatch_jpeg_magic, sizeof dispatch_jpeg_magic))
        rc = jpeg_decode(p, size, max_pixels, out, err, errsize);
    else if (dispatch_is_pnm(p, size))
        rc = ppm_decode(p, size, max_pixels, out, err, errsize);
    else
        return fail(err, errsize, "not a PNG, JPEG or PPM/PGM image");
    if (rc != 0) {
        loupe_image_free(out); /* whatever a decoder may have left, *out ends up empty */
        if (err && errsize && err[0] == '\0')
            return fail(err, errsize, "cannot decode image");
        return -1;
    }
    return 0;
}

/* Reads a whole stream into a malloc'd buffer (*buf, *len); 0, or -1 with a message. */
static int dispatch_read_all(FILE *f, const char *path, unsigned char **buf, size_t *len,
                             char *err, size_t errsize)
{
    size_t cap = LOAD_FIRST_CHUNK, used = 0, got;
    unsigned char *data = malloc(cap), *bigger;

    *buf = NULL;
    *len = 0;
    if (!data)
        return fail(err, errsize, "%s: out of memory", path);
    for (;;) {
        if (used == cap) {
            if (cap > SIZE_MAX / 2) {
                free(data);
                return fail(err, errsize, "%s: file too large", path);
            }
            bigger = realloc(data, cap * 2);
            if (!bigger) {
                free(data);
                return fail(err, errsize, "%s: out of memory", path);
            }
            data = bigger;
            cap *= 2;
        }
        got = fread(data + used, 1, cap - used, f);
        used += got;
        if (got == 0 || used < cap) {
            if (ferror(f)) {
                free(data);
                return fail(err, errsize, "%s: read error", path);
            }
            if (feof(f))
                break;
        }
    }
    *buf = data;
    *len = used;
    return 0;
}

int loupe_image_load(const char *path, size_t max_pixels, loupe_image *out,
                     char *err, size_t errsize)
{
    char msg[LOAD_ERR_MAX];
    unsigned char *data;
    size_t size;
    FILE *f;
    int rc;

    if (out) {
        out->width = 0;
        out->height = 0;
        out->rgb = NULL;
    }
    if (!path)
        return fail(err, errsize, "(null): no file name given");
    if (!out)
        return fail(err, errsize, "%s: no output image given", path);
    errno = 0;
    f = fopen(path, "rb");
    if (!f) /* C99 does not promise that fopen sets errno; POSIX does */
        return errno ? fail(err, errsize, "%s: cannot open (%s)", path, strerror(errno))
                     : fail(err, errsize, "%s: cannot open", path);
    rc = dispatch_read_all(f, path, &data, &size, err, errsize);
    fclose(f);
    if (rc != 0)
        return -1;
    if (size == 0) {
        free(data);
        return fail(err, errsize, "%s: empty file", path);
    }
    rc = loupe_image_decode(data, size, max_pixels, out, msg, sizeof msg);
    free(data);
    if (rc != 0)
        return fail(err, errsize, "%s: %s", path, msg);
    return 0;
}

/* ========================================================================== */
/* 11. Datasets and metrics (DataModule, LoupeImageProcessor, Metric)         */
/* ========================================================================== */
/* What upstream's training and validation read besides the model:
 *   - labelled datasets (a folder images/ + masks/, or a list file), every entry
 *     decoded once when opened so that a bad file stops nothing half-way;
 *   - one training example as DataModule.train_collate_fn builds it: the mask made
 *     binary by convert_to_binary_masks (Pillow's "L", min-max normalisation, dithering
 *     against uniform draws), then Mask2FormerImageProcessor's NEAREST resize and
 *     reduce_labels (mask_labels) and LoupeImageProcessor's patch labels (the soft mask,
 *     bilinear, block means), bit for bit (test/check_batch.c against the golden batch);
 *   - the validation metrics of LitModel.on_validation_epoch_end (src/metric/metric.py,
 *     mean_iou.py) as an accumulator, and the validation loop (test/check_metrics.c). */

#define DATASET_VALID_EXT_COUNT 5
#define DATASET_MAX_ENTRIES 100000000   /* more entries than this is surely a mistake */
#define DATASET_ERR_MAX 1024
#define MASK_DRAW_CHUNK 4096            /* uniforms drawn per call while dithering */
#define EVAL_THRESHOLD 0.5f             /* post_process_segmentation: forged where seg > 0.5 */
#define METRIC_PROB_THRESHOLD 0.5f      /* Metric.compute_accuracy: prob > 0.5 is forged */
#define PIL_L_R 19595u                  /* Pillow's convert("L"): ITU-R 601-2 luma in 16.16 */
#define PIL_L_G 38470u
#define PIL_L_B 7471u
#define PIL_L_ROUND 0x8000u

/* ---- Uniform numbers ---- */

void loupe_splitmix_fill(void *state, float *out, size_t n)
{
    loupe_splitmix *p = (loupe_splitmix *)state;
    splitmix_uniform s;
    s.seed = p->seed;
    s.counter = p->counter;
    splitmix_uniform_fill(&s, out, n);
    p->counter = s.counter;
}

/* ---- Datasets ---- */

typedef struct dataset_entry {
    char *image, *mask;          /* mask NULL: authentic */
    int line;                    /* line of the list file (0 for folders) */
} dataset_entry;

struct loupe_dataset {
    dataset_entry *e;
    int n, cap;
    size_t max_pixels;
    char *source;                /* the path given to loupe_dataset_open */
    int is_list;
};

static char *dataset_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* dir + "/" + name in a new allocation (name alone when dir is NULL or empty). */
static char *dataset_join(const char *dir, size_t dir_len, const char *name, size_t name_len)
{
    char *p = malloc(dir_len + name_len + 2);
    if (!p) return NULL;
    if (dir_len) {
        memcpy(p, dir, dir_len);
        p[dir_len] = '/';
        memcpy(p + dir_len + 1, name, name_len);
        p[dir_len + 1 + name_len] = '\0';
    } else {
        memcpy(p, name, name_len);
        p[name_len] = '\0';
    }
    return p;
}

/* The file name without its directories. */
static const char *dataset_basename(const char *path)
{
    const char *b = path, *p;
    for (p = path; *p; p++)
        if (*p == '/' || *p == '\\') b = p + 1;
    return b;
}

/* Length of a file name's stem: without its last extension ("a.b.png" -> 3). */
static size_t dataset_stem_len(const char *name)
{
    const char *dot = strrchr(name, '.');
    return dot && dot != name ? (size_t)(dot - name) : strlen(name);
}

/* True when name ends in an extension the decoders handle (any case). */
static int dataset_is_image_name(const char *name)
{
    static const char *const exts[DATASET_VALID_EXT_COUNT] = {".png", ".jpg", ".jpeg", ".ppm", ".pgm"};
    size_t n = strlen(name), i, k;
    for (i = 0; i < DATASET_VALID_EXT_COUNT; i++) {
        size_t e = strlen(exts[i]);
        int same = n > e;
        for (k = 0; same && k < e; k++) same = tolower((unsigned char)name[n - e + k]) == exts[i][k];
        if (same) return 1;
    }
    return 0;
}

static int dataset_add(loupe_dataset *d, char *image, char *mask, int line, char *err, size_t errsize)
{
    if (d->n == d->cap) {
        int cap = d->cap ? 2 * d->cap : 64;
        dataset_entry *g;
        if (d->n >= DATASET_MAX_ENTRIES) {
            free(image);
            free(mask);
            return fail(err, errsize, "%s: more than %d entries", d->source, DATASET_MAX_ENTRIES);
        }
        g = realloc(d->e, (size_t)cap * sizeof *g);
        if (!g) {
            free(image);
            free(mask);
            return fail(err, errsize, "%s: out of memory", d->source);
        }
        d->e = g;
        d->cap = cap;
    }
    d->e[d->n].image = image;
    d->e[d->n].mask = mask;
    d->e[d->n].line = line;
    d->n++;
    return 0;
}

/* 1 when path is a directory, 0 when it is something else that exists, -1 when it
 * cannot be examined (errno set where the system reports it). */
static int dataset_is_dir(const char *path)
{
#if LOUPE_POSIX
    struct stat st;
    if (stat(path, &st) != 0) return -1;
    return S_ISDIR(st.st_mode) ? 1 : 0;
#elif defined(_WIN32)
    DWORD attr = GetFileAttributesA(path);
    if (attr == INVALID_FILE_ATTRIBUTES) { errno = ENOENT; return -1; }
    return (attr & FILE_ATTRIBUTE_DIRECTORY) ? 1 : 0;
#else
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    fclose(f);
    return 0;
#endif
}

static int dataset_cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Orders file names by stem (then by the whole name). */
static int dataset_cmp_stem(const void *a, const void *b)
{
    const char *x = *(char *const *)a, *y = *(char *const *)b;
    size_t lx = dataset_stem_len(x), ly = dataset_stem_len(y);
    int c = memcmp(x, y, lx < ly ? lx : ly);
    if (c) return c;
    if (lx != ly) return lx < ly ? -1 : 1;
    return strcmp(x, y);
}

static int dataset_same_stem(const char *x, const char *y)
{
    size_t lx = dataset_stem_len(x);
    return lx == dataset_stem_len(y) && !memcmp(x, y, lx);
}

static void dataset_free_names(char **names, int n)
{
    int i;
    for (i = 0; i < n; i++) free(names[i]);
    free(names);
}

/* The image file names (not paths) of a directory in name order: *names, *n. */
static int dataset_list_dir(const char *dir, char ***names, int *n, char *err, size_t errsize)
{
    char **v = NULL;
    int cap = 0;
    *names = NULL;
    *n = 0;
#if LOUPE_POSIX
    {
        DIR *dp = opendir(dir);
        struct dirent *e;
        if (!dp) return fail(err, errsize, "%s: cannot open the folder (%s)", dir, strerror(errno));
        while ((e = readdir(dp)) != NULL) {
            char *full;
            struct stat st;
            int regular;
            if (e->d_name[0] == '.' || !dataset_is_image_name(e->d_name)) continue;
            full = dataset_join(dir, strlen(dir), e->d_name, strlen(e->d_name));
            regular = full && stat(full, &st) == 0 && S_ISREG(st.st_mode);
            free(full);
            if (!regular) continue;
            if (*n == cap) {
                char **g;
                cap = cap ? 2 * cap : 64;
                if (cap > DATASET_MAX_ENTRIES || !(g = realloc(v, (size_t)cap * sizeof *g))) {
                    closedir(dp);
                    dataset_free_names(v, *n);
                    *n = 0;
                    return fail(err, errsize, "%s: out of memory listing the folder", dir);
                }
                v = g;
            }
            if (!(v[*n] = dataset_strdup(e->d_name))) {
                closedir(dp);
                dataset_free_names(v, *n);
                *n = 0;
                return fail(err, errsize, "%s: out of memory listing the folder", dir);
            }
            (*n)++;
        }
        closedir(dp);
    }
#elif defined(_WIN32)
    {
        WIN32_FIND_DATAA e;
        HANDLE h;
        char *pattern = dataset_join(dir, strlen(dir), "*", 1);
        if (!pattern) return fail(err, errsize, "%s: out of memory", dir);
        h = FindFirstFileA(pattern, &e);
        free(pattern);
        if (h == INVALID_HANDLE_VALUE) return fail(err, errsize, "%s: cannot open the folder", dir);
        do {
            if (e.cFileName[0] == '.' || !dataset_is_image_name(e.cFileName) ||
                (e.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY))
                continue;
            if (*n == cap) {
                char **g;
                cap = cap ? 2 * cap : 64;
                if (cap > DATASET_MAX_ENTRIES || !(g = realloc(v, (size_t)cap * sizeof *g))) {
                    FindClose(h);
                    dataset_free_names(v, *n);
                    *n = 0;
                    return fail(err, errsize, "%s: out of memory listing the folder", dir);
                }
                v = g;
            }
            if (!(v[*n] = dataset_strdup(e.cFileName))) {
                FindClose(h);
                dataset_free_names(v, *n);
                *n = 0;
                return fail(err, errsize, "%s: out of memory listing the folder", dir);
            }
            (*n)++;
        } while (FindNextFileA(h, &e));
        FindClose(h);
    }
#else
    (void)cap;
    return fail(err, errsize, "%s: folders cannot be listed on this system; use a list file", dir);
#endif
    if (*n) qsort(v, (size_t)*n, sizeof *v, dataset_cmp_str);
    *names = v;
    return 0;
}

/* Reads DIR/images and DIR/masks into d. */
static int dataset_read_folder(loupe_dataset *d, const char *dir, char *err, size_t errsize)
{
    size_t dl = strlen(dir);
    char *idir = dataset_join(dir, dl, "images", 6), *mdir = dataset_join(dir, dl, "masks", 5);
    char **images = NULL, **masks = NULL, **by_stem = NULL;
    int ni = 0, nm = 0, i, rc = -1;
    if (!idir || !mdir) { fail(err, errsize, "%s: out of memory", dir); goto done; }
    if (dataset_is_dir(idir) != 1 || dataset_is_dir(mdir) != 1) {
        fail(err, errsize, "%s: a dataset folder needs the subfolders images/ and masks/ (%s is missing)", dir,
             dataset_is_dir(idir) != 1 ? "images/" : "masks/");
        goto done;
    }
    if (dataset_list_dir(idir, &images, &ni, err, errsize) || dataset_list_dir(mdir, &masks, &nm, err, errsize)) goto done;
    /* two images or two masks with one stem: a mask could not tell which image it is for */
    if (ni && !(by_stem = malloc((size_t)(ni > nm ? ni : nm) * sizeof *by_stem))) {
        fail(err, errsize, "%s: out of memory", dir);
        goto done;
    }
    if (ni) memcpy(by_stem, images, (size_t)ni * sizeof *by_stem);
    if (ni) qsort(by_stem, (size_t)ni, sizeof *by_stem, dataset_cmp_stem);
    for (i = 0; i + 1 < ni; i++)
        if (dataset_same_stem(by_stem[i], by_stem[i + 1])) {
            fail(err, errsize, "%s/%s and %s/%s: two images with the stem \"%.*s\" (a mask could not tell them apart)",
                 idir, by_stem[i], idir, by_stem[i + 1], (int)dataset_stem_len(by_stem[i]), by_stem[i]);
            goto done;
        }
    if (nm) qsort(masks, (size_t)nm, sizeof *masks, dataset_cmp_stem);
    for (i = 0; i + 1 < nm; i++)
        if (dataset_same_stem(masks[i], masks[i + 1])) {
            fail(err, errsize, "%s/%s and %s/%s: two masks with the stem \"%.*s\"", mdir, masks[i], mdir, masks[i + 1],
                 (int)dataset_stem_len(masks[i]), masks[i]);
            goto done;
        }
    /* every mask must belong to an image (a misspelled name would otherwise make a
     * forged image authentic without a word) */
    for (i = 0; i < nm; i++) {
        int lo = 0, hi = ni - 1, found = 0;
        while (lo <= hi && !found) {
            int mid = lo + (hi - lo) / 2;
            if (dataset_same_stem(by_stem[mid], masks[i])) found = 1;
            else if (dataset_cmp_stem(&by_stem[mid], &masks[i]) < 0) lo = mid + 1;
            else hi = mid - 1;
        }
        if (!found) {
            fail(err, errsize, "%s/%s: no image in %s has the stem \"%.*s\"", mdir, masks[i], idir,
                 (int)dataset_stem_len(masks[i]), masks[i]);
            goto done;
        }
    }
    for (i = 0; i < ni; i++) {
        int lo = 0, hi = nm - 1, m = -1;
        char *image, *mask = NULL;
        while (lo <= hi && m < 0) {
            int mid = lo + (hi - lo) / 2;
            if (dataset_same_stem(masks[mid], images[i])) m = mid;
            else if (dataset_cmp_stem(&masks[mid], &images[i]) < 0) lo = mid + 1;
            else hi = mid - 1;
        }
        image = dataset_join(idir, strlen(idir), images[i], strlen(images[i]));
        if (m >= 0) mask = dataset_join(mdir, strlen(mdir), masks[m], strlen(masks[m]));
        if (!image || (m >= 0 && !mask)) {
            free(image);
            free(mask);
            fail(err, errsize, "%s: out of memory", dir);
            goto done;
        }
        if (dataset_add(d, image, mask, 0, err, errsize)) goto done;
    }
    rc = 0;
done:
    free(by_stem);
    dataset_free_names(images, ni);
    dataset_free_names(masks, nm);
    free(idir);
    free(mdir);
    return rc;
}

/* True for an absolute path (kept as given in a list file). */
static int dataset_is_absolute(const char *p, size_t n)
{
    if (n && (p[0] == '/' || p[0] == '\\')) return 1;
    return n >= 3 && isalpha((unsigned char)p[0]) && p[1] == ':' && (p[2] == '/' || p[2] == '\\');
}

static int dataset_cmp_entry_image(const void *a, const void *b)
{
    const dataset_entry *x = *(const dataset_entry *const *)a, *y = *(const dataset_entry *const *)b;
    int c = strcmp(x->image, y->image);
    return c ? c : x->line - y->line;
}

/* Reads a list file of lines `IMAGE [MASK]` into d. */
static int dataset_read_list(loupe_dataset *d, const char *path, char *err, size_t errsize)
{
    FILE *f;
    unsigned char *text;
    size_t size, pos = 0, dir_len;
    const char *base = dataset_basename(path);
    int line = 0, rc;
    errno = 0;
    if (!(f = fopen(path, "rb")))
        return errno ? fail(err, errsize, "%s: cannot open (%s)", path, strerror(errno)) : fail(err, errsize, "%s: cannot open", path);
    rc = dispatch_read_all(f, path, &text, &size, err, errsize);
    fclose(f);
    if (rc) return -1;
    if (size >= 3 && text[0] == 0xEF && text[1] == 0xBB && text[2] == 0xBF) pos = 3; /* a UTF-8 byte-order mark */
    dir_len = (size_t)(base - path);
    if (dir_len) dir_len--; /* without the separator */
    if (base != path && dir_len == 0) dir_len = 1; /* a list in "/" */
    while (pos < size) {
        size_t end = pos, p, tok_start[3], tok_len[3];
        int ntok = 0;
        while (end < size && text[end] != '\n') end++;
        line++;
        p = pos;
        for (;;) {
            while (p < end && (text[p] == ' ' || text[p] == '\t' || text[p] == '\r')) p++;
            if (p >= end || (ntok == 0 && text[p] == '#')) break;
            if (ntok == 3) { ntok++; break; }
            tok_start[ntok] = p;
            while (p < end && text[p] != ' ' && text[p] != '\t' && text[p] != '\r') p++;
            tok_len[ntok] = p - tok_start[ntok];
            ntok++;
        }
        if (ntok > 2) {
            free(text);
            return fail(err, errsize, "%s:%d: expected IMAGE [MASK], found %s fields", path, line, ntok > 3 ? "more" : "3");
        }
        if (ntok) {
            char *paths[2] = {NULL, NULL};
            int k;
            for (k = 0; k < ntok; k++) {
                const char *tok = (const char *)text + tok_start[k];
                size_t n = tok_len[k];
                if (memchr(tok, '\0', n)) {
                    free(paths[0]);
                    free(text);
                    return fail(err, errsize, "%s:%d: a path holds a NUL byte", path, line);
                }
                paths[k] = dataset_is_absolute(tok, n) ? dataset_join(NULL, 0, tok, n)
                                                       : dataset_join(path, base == path ? 0 : dir_len, tok, n);
                if (!paths[k]) {
                    free(paths[0]);
                    free(text);
                    return fail(err, errsize, "%s: out of memory", path);
                }
            }
            if (dataset_add(d, paths[0], paths[1], line, err, errsize)) { free(text); return -1; }
        }
        pos = end + 1;
    }
    free(text);
    /* an image listed twice would count twice in training and in the metrics */
    if (d->n > 1) {
        dataset_entry **by_image = malloc((size_t)d->n * sizeof *by_image);
        int i;
        if (!by_image) return fail(err, errsize, "%s: out of memory", path);
        for (i = 0; i < d->n; i++) by_image[i] = &d->e[i];
        qsort(by_image, (size_t)d->n, sizeof *by_image, dataset_cmp_entry_image);
        for (i = 0; i + 1 < d->n; i++)
            if (!strcmp(by_image[i]->image, by_image[i + 1]->image)) {
                fail(err, errsize, "%s:%d: %s is already listed on line %d", path, by_image[i + 1]->line,
                     by_image[i + 1]->image, by_image[i]->line);
                free(by_image);
                return -1;
            }
        free(by_image);
    }
    return 0;
}

/* Decodes entry i's image and mask and compares their sizes. */
static int dataset_check_entry(const loupe_dataset *d, int i, char *err, size_t errsize)
{
    const dataset_entry *e = &d->e[i];
    loupe_image img, mask;
    char msg[DATASET_ERR_MAX];
    int rc = 0;
    mask.rgb = NULL;
    if (loupe_image_load(e->image, d->max_pixels, &img, msg, sizeof msg) ||
        (e->mask && loupe_image_load(e->mask, d->max_pixels, &mask, msg, sizeof msg)))
        rc = -1;
    else if (e->mask && (mask.width != img.width || mask.height != img.height)) {
        snprintf(msg, sizeof msg, "%s: the mask is %dx%d but its image %s is %dx%d", e->mask, mask.width, mask.height,
                 e->image, img.width, img.height);
        rc = -1;
    }
    loupe_image_free(&img);
    if (e->mask) loupe_image_free(&mask);
    if (rc) {
        if (e->line) return fail(err, errsize, "%s:%d: %s", d->source, e->line, msg);
        return fail(err, errsize, "%s", msg);
    }
    return 0;
}

void loupe_dataset_free(loupe_dataset *d)
{
    int i;
    if (!d) return;
    for (i = 0; i < d->n; i++) {
        free(d->e[i].image);
        free(d->e[i].mask);
    }
    free(d->e);
    free(d->source);
    free(d);
}

loupe_dataset *loupe_dataset_open(const char *path, size_t max_pixels, char *err, size_t errsize)
{
    loupe_dataset *d;
    int kind, first, bad = 0, i;
    char first_msg[DATASET_ERR_MAX];
    if (!path) { fail(err, errsize, "no dataset path given"); return NULL; }
    errno = 0;
    kind = dataset_is_dir(path);
    if (kind < 0) {
        if (errno) fail(err, errsize, "%s: cannot open (%s)", path, strerror(errno));
        else fail(err, errsize, "%s: cannot open", path);
        return NULL;
    }
    if (!(d = calloc(1, sizeof *d)) || !(d->source = dataset_strdup(path))) {
        free(d);
        fail(err, errsize, "%s: out of memory", path);
        return NULL;
    }
    d->max_pixels = max_pixels;
    d->is_list = !kind;
    if (kind ? dataset_read_folder(d, path, err, errsize) : dataset_read_list(d, path, err, errsize)) {
        loupe_dataset_free(d);
        return NULL;
    }
    if (d->n == 0) {
        fail(err, errsize, kind ? "%s: the dataset is empty (no image in images/)" : "%s: the dataset is empty (no IMAGE line)",
             path);
        loupe_dataset_free(d);
        return NULL;
    }
    /* every entry is decoded before anything is computed; the first bad one (in order)
     * is reported with the number of others */
    first = d->n;
    first_msg[0] = '\0';
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (i = 0; i < d->n; i++) {
        char msg[DATASET_ERR_MAX];
        if (dataset_check_entry(d, i, msg, sizeof msg)) {
#ifdef _OPENMP
#pragma omp critical(loupe_dataset_check)
#endif
            {
                bad++;
                if (i < first) {
                    first = i;
                    memcpy(first_msg, msg, sizeof msg);
                }
            }
        }
    }
    if (bad) {
        if (bad > 1) fail(err, errsize, "%s (and %d other bad entr%s in %s)", first_msg, bad - 1, bad > 2 ? "ies" : "y", path);
        else fail(err, errsize, "%s", first_msg);
        loupe_dataset_free(d);
        return NULL;
    }
    return d;
}

int loupe_dataset_count(const loupe_dataset *d) { return d ? d->n : 0; }

int loupe_dataset_entry(const loupe_dataset *d, int i, const char **image, const char **mask)
{
    if (!d || i < 0 || i >= d->n) return -1;
    if (image) *image = d->e[i].image;
    if (mask) *mask = d->e[i].mask;
    return 0;
}

int loupe_dataset_load(const loupe_dataset *d, int i, loupe_image *img, loupe_image *mask, char *err, size_t errsize)
{
    const dataset_entry *e;
    if (mask) {
        mask->width = mask->height = 0;
        mask->rgb = NULL;
    }
    if (!d || !img || i < 0 || i >= d->n) return fail(err, errsize, "loupe_dataset_load: no such entry");
    e = &d->e[i];
    if (loupe_image_load(e->image, d->max_pixels, img, err, errsize)) return -1;
    if (mask && e->mask) {
        if (loupe_image_load(e->mask, d->max_pixels, mask, err, errsize)) {
            loupe_image_free(img);
            return -1;
        }
        if (mask->width != img->width || mask->height != img->height) {
            fail(err, errsize, "%s: the mask is %dx%d but its image %s is %dx%d", e->mask, mask->width, mask->height,
                 e->image, img->width, img->height);
            loupe_image_free(mask);
            loupe_image_free(img);
            return -1;
        }
    }
    return 0;
}

/* ---- Training examples (LoupeImageProcessor.__call__ with masks) ---- */

/* Pillow's convert("L") of one RGB pixel (Convert.c rgb2l). */
static unsigned char pil_luma(const unsigned char *p)
{
    return (unsigned char)((p[0] * PIL_L_R + p[1] * PIL_L_G + p[2] * PIL_L_B + PIL_L_ROUND) >> 16);
}

/* convert("L"), then (m - min) / (max - min) as uint8 tensors divided in float32 (the
 * exact quotient rounded once: the double quotient of two integers below 256 rounds to
 * the same float), zeros when the mask is constant. */
static void mask_normalize(const loupe_image *mask, float *normalized)
{
    size_t n = (size_t)mask->width * mask->height, i;
    unsigned lo = 255, hi = 0;
    for (i = 0; i < n; i++) {
        unsigned v = pil_luma(mask->rgb + 3 * i);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    for (i = 0; i < n; i++)
        normalized[i] = hi > lo ? (float)((double)(pil_luma(mask->rgb + 3 * i) - lo) / (double)(hi - lo)) : 0.0f;
}

/* binary = normalized >= u, one draw per pixel in row-major order. */
static int mask_dither(const float *normalized, size_t n, const loupe_uniform *u, unsigned char *binary, char *err,
                       size_t errsize)
{
    float draws[MASK_DRAW_CHUNK];
    size_t i, k;
    if (!u || !u->fill) return fail(err, errsize, "a mask needs a source of uniform numbers to be dithered");
    for (i = 0; i < n; i += k) {
        k = n - i < MASK_DRAW_CHUNK ? n - i : MASK_DRAW_CHUNK;
        u->fill(u->state, draws, k);
        if (binary) {
            size_t j;
            for (j = 0; j < k; j++) binary[i + j] = normalized[i + j] >= draws[j];
        }
    }
    return 0;
}

static int mask_check(const loupe_image *mask, char *err, size_t errsize)
{
    if (!mask || !mask->rgb || mask->width < 1 || mask->height < 1) return fail(err, errsize, "no mask given");
    if ((double)mask->width * mask->height > (double)SIZE_MAX / sizeof(float) / 2)
        return fail(err, errsize, "a %dx%d mask is too large", mask->width, mask->height);
    return 0;
}

int loupe_mask_binarize(const loupe_image *mask, const loupe_uniform *u, unsigned char *binary, float *normalized,
                        char *err, size_t errsize)
{
    float *norm = normalized;
    size_t n;
    int rc;
    if (mask_check(mask, err, errsize)) return -1;
    n = (size_t)mask->width * mask->height;
    if (!norm && !(norm = malloc(n * sizeof *norm))) return fail(err, errsize, "out of memory for a %dx%d mask", mask->width, mask->height);
    mask_normalize(mask, norm);
    rc = mask_dither(norm, n, u, binary, err, errsize);
    if (norm != normalized) free(norm);
    return rc;
}

/* Pillow's resize(NEAREST) source indices along one axis (ImagingScaleAffine): x starts
 * at 0.5 * in / out and grows by in / out per output pixel in double precision; the
 * source is (int) x. */
static void nearest_axis(int in, int out, int *idx)
{
    double step = (double)in / (double)out, x = 0.5 * step;
    int i;
    for (i = 0; i < out; i++) {
        int s = (int)x;
        idx[i] = s < in ? s : in - 1;
        x += step;
    }
}

/* F.interpolate(size=(oh, ow), mode="bilinear", align_corners=False) of one (1, 1, ih, iw)
 * float32 plane as PyTorch's CPU kernel computes it for a single channel (a 1-channel
 * NCHW tensor is also channels-last, which selects that kernel): the scale in/out in
 * float, the source index scale * (dst + 0.5) - 0.5 in double, float lambdas (lambda0 =
 * 1 - lambda1), float corner weights (h * w) and the four-term sum in double, rounded
 * once. Bit for bit against upstream's patch_mask_resized (test/check_batch.c); the
 * model's own interp_plane differs from it by up to 2e-6 here. */
static void mask_interp_axis(int in, int out, int *i0, int *i1, float *l0, float *l1)
{
    float scale = (float)in / (float)out;
    int d;
    for (d = 0; d < out; d++) {
        double src = (double)scale * ((double)d + 0.5) - 0.5, frac;
        int x0;
        if (src < 0.0) src = 0.0;
        x0 = (int)src;
        if (x0 > in - 1) x0 = in - 1;
        frac = src - (double)x0;
        l1[d] = (float)(frac < 0.0 ? 0.0 : frac > 1.0 ? 1.0 : frac);
        l0[d] = 1.0f - l1[d];
        i0[d] = x0;
        i1[d] = x0 + (x0 < in - 1 ? 1 : 0);
    }
}

/* Scratch of mask_interp: ints and floats for both axes. */
#define MASK_INTERP_SCRATCH(oh, ow) (4 * (size_t)((oh) + (ow)))

static void mask_interp(const float *in, int ih, int iw, float *out, int oh, int ow, float *scratch)
{
    int *y0 = (int *)(void *)scratch, *y1 = y0 + oh, *x0 = y1 + oh, *x1 = x0 + ow;
    float *h0 = (float *)(void *)(x1 + ow), *h1 = h0 + oh, *w0 = h1 + oh, *w1 = w0 + ow;
    int y, x;
    mask_interp_axis(ih, oh, y0, y1, h0, h1);
    mask_interp_axis(iw, ow, x0, x1, w0, w1);
    for (y = 0; y < oh; y++) {
        const float *r0 = in + (size_t)y0[y] * iw, *r1 = in + (size_t)y1[y] * iw;
        for (x = 0; x < ow; x++) {
            float w00 = (float)(h0[y] * w0[x]), w01 = (float)(h0[y] * w1[x]);
            float w10 = (float)(h1[y] * w0[x]), w11 = (float)(h1[y] * w1[x]);
            double v = (double)r0[x0[x]] * w00 + (double)r0[x1[x]] * w01;
            v += (double)r1[x0[x]] * w10;
            v += (double)r1[x1[x]] * w11;
            out[(size_t)y * ow + x] = (float)v;
        }
    }
}

/* torch.mean of one P x P float32 block (row stride `stride`), in the order of
 * PyTorch's AVX2 sum kernel (cascade_sum, vectorized_inner_sum) when 8 <= P < 16 (Loupe's
 * P = 14): per row, the elements from 8 on, then the 8 lanes of the first vector, in
 * float; the rows added in float; then / P^2. Bit for bit against upstream's
 * patch_labels. Other P: a double sum rounded once (within an ulp or so of PyTorch). */
#define TORCH_SUM_LANES 8
static float block_mean(const float *b, int stride, int P)
{
    int y, x;
    if (P >= TORCH_SUM_LANES && P < 2 * TORCH_SUM_LANES) {
        float total = 0.0f;
        for (y = 0; y < P; y++) {
            const float *r = b + (size_t)y * stride;
            float acc = 0.0f;
            for (x = TORCH_SUM_LANES; x < P; x++) acc = (float)(acc + r[x]);
            for (x = 0; x < TORCH_SUM_LANES; x++) acc = (float)(acc + r[x]);
            total = (float)(total + acc);
        }
        return (float)(total / (float)(P * P));
    } else {
        double sum = 0.0;
        for (y = 0; y < P; y++)
            for (x = 0; x < P; x++) sum += b[(size_t)y * stride + x];
        return (float)(sum / ((double)P * P));
    }
}

int loupe_prepare_example(const loupe_model *m, const loupe_image *img, const loupe_image *mask,
                          const loupe_uniform *u, float *pixel_values, float *mask_labels, int *n_targets,
                          float *patch_labels, char *err, size_t errsize)
{
    int S, P, g, x, y, *ix = NULL, *iy;
    size_t n;
    float *norm = NULL, *resized = NULL, *scratch = NULL;
    unsigned char *binary = NULL;
    long long forged = 0;
    int rc = -1;
    if (!m || !img || !pixel_values) return fail(err, errsize, "loupe_prepare_example needs a model, an image and pixel_values");
    S = m->cfg.image_size;
    P = m->cfg.patch_size;
    g = S / P;
    if (loupe_preprocess(m, img, pixel_values, err, errsize)) return -1;
    if (n_targets) *n_targets = 0;
    if (!mask) { /* authentic: zero maps, no target, no draw */
        if (mask_labels) memset(mask_labels, 0, (size_t)S * S * sizeof *mask_labels);
        if (patch_labels) memset(patch_labels, 0, (size_t)g * g * sizeof *patch_labels);
        return 0;
    }
    if (mask_check(mask, err, errsize)) return -1;
    if (mask->width != img->width || mask->height != img->height)
        return fail(err, errsize, "the mask is %dx%d but its image is %dx%d", mask->width, mask->height, img->width,
                    img->height);
    n = (size_t)mask->width * mask->height;
    norm = malloc(n * sizeof *norm);
    binary = malloc(n);
    ix = malloc(2 * (size_t)S * sizeof *ix);
    resized = malloc((size_t)S * S * sizeof *resized);
    scratch = malloc(MASK_INTERP_SCRATCH(S, S) * sizeof *scratch);
    if (!norm || !binary || !ix || !resized || !scratch) {
        fail(err, errsize, "out of memory for a %dx%d mask", mask->width, mask->height);
        goto done;
    }
    iy = ix + S;
    mask_normalize(mask, norm);
    if (mask_dither(norm, n, u, binary, err, errsize)) goto done;
    /* mask_labels: NEAREST to S x S, then reduce_labels keeps the label 1 (forged) */
    nearest_axis(mask->width, S, ix);
    nearest_axis(mask->height, S, iy);
    for (y = 0; y < S; y++)
        for (x = 0; x < S; x++) {
            int v = binary[(size_t)iy[y] * mask->width + ix[x]] != 0;
            forged += v;
            if (mask_labels) mask_labels[(size_t)y * S + x] = (float)v;
        }
    if (n_targets) *n_targets = forged > 0;
    /* patch_labels: the soft mask bilinear to S x S, mean of each P x P block */
    if (patch_labels) {
        int by, bx;
        mask_interp(norm, mask->height, mask->width, resized, S, S, scratch);
        for (by = 0; by < g; by++)
            for (bx = 0; bx < g; bx++)
                patch_labels[(size_t)by * g + bx] = block_mean(resized + (size_t)by * P * S + (size_t)bx * P, S, P);
    }
    rc = 0;
done:
    free(norm);
    free(binary);
    free(ix);
    free(resized);
    free(scratch);
    return rc;
}

/* ---- Validation metrics (Metric, mean_iou) ---- */

/* A quiet NaN (the value of an undefined metric). */
static double metrics_nan(void)
{
#ifdef NAN
    return (double)NAN;
#else
    volatile double zero = 0.0;
    return zero / zero;
#endif
}

struct loupe_metrics_acc {
    float *prob;
    unsigned char *label;
    size_t n, cap;
    long long pixel_images;
    unsigned long long tp, fp, fn, tn;
};

loupe_metrics_acc *loupe_metrics_new(char *err, size_t errsize)
{
    loupe_metrics_acc *a = calloc(1, sizeof *a);
    if (!a) fail(err, errsize, "out of memory");
    return a;
}

void loupe_metrics_free(loupe_metrics_acc *a)
{
    if (!a) return;
    free(a->prob);
    free(a->label);
    free(a);
}

int loupe_metrics_add(loupe_metrics_acc *a, float prob, int label, const unsigned char *pred,
                      const unsigned char *target, int width, int height, char *err, size_t errsize)
{
    if (!a) return fail(err, errsize, "no metrics accumulator given");
    if (prob != prob) return fail(err, errsize, "the probability is NaN");
    if (label != 0 && label != 1) return fail(err, errsize, "the label is %d, not 0 or 1", label);
    if ((pred == NULL) != (target == NULL)) return fail(err, errsize, "a predicted mask needs a target and vice versa");
    if (pred && (width < 1 || height < 1)) return fail(err, errsize, "mask size %dx%d is invalid", width, height);
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 256;
        float *p = realloc(a->prob, cap * sizeof *p);
        unsigned char *l;
        if (!p) return fail(err, errsize, "out of memory");
        a->prob = p;
        if (!(l = realloc(a->label, cap))) return fail(err, errsize, "out of memory");
        a->label = l;
        a->cap = cap;
    }
    if (pred) {
        size_t n = (size_t)width * height, i;
        unsigned long long tp = 0, fp = 0, fn = 0, tn = 0;
        int any = 0;
        for (i = 0; i < n && !any; i++) any = target[i] != 0;
        if (any) { /* Metric._postprocess_masks_and_labels skips all-zero targets */
            for (i = 0; i < n; i++) {
                int p = pred[i] != 0, t = target[i] != 0;
                tp += p && t;
                fp += p && !t;
                fn += !p && t;
                tn += !p && !t;
            }
            a->tp += tp;
            a->fp += fp;
            a->fn += fn;
            a->tn += tn;
            a->pixel_images++;
        }
    }
    a->prob[a->n] = prob;
    a->label[a->n] = (unsigned char)label;
    a->n++;
    return 0;
}

static int metrics_cmp_prob(const void *x, const void *y)
{
    float a = *(const float *)x, b = *(const float *)y;
    return (a > b) - (a < b);
}

/* roc_auc_score as the Mann-Whitney statistic: (2 #{pos > neg} + #{pos == neg}) /
 * (2 #pos #neg), an exact integer ratio divided once. */
static int metrics_auc(const loupe_metrics_acc *a, double *auc, char *err, size_t errsize)
{
    float *pos, *neg;
    size_t np = 0, nn = 0, i, j = 0;
    unsigned long long twice = 0;
    for (i = 0; i < a->n; i++) np += a->label[i];
    nn = a->n - np;
    if (!np || !nn) { *auc = metrics_nan(); return 0; }
    pos = malloc(np * sizeof *pos);
    neg = malloc(nn * sizeof *neg);
    if (!pos || !neg) { free(pos); free(neg); return fail(err, errsize, "out of memory"); }
    np = nn = 0;
    for (i = 0; i < a->n; i++) {
        if (a->label[i]) pos[np++] = a->prob[i];
        else neg[nn++] = a->prob[i];
    }
    qsort(pos, np, sizeof *pos, metrics_cmp_prob);
    qsort(neg, nn, sizeof *neg, metrics_cmp_prob);
    /* for each positive: 2 x (negatives below) + (negatives equal) */
    for (i = 0; i < np; i++) {
        size_t below, k;
        while (j < nn && neg[j] < pos[i]) j++;
        below = j;
        for (k = j; k < nn && neg[k] == pos[i]; k++) {}
        twice += 2 * (unsigned long long)below + (k - j);
    }
    *auc = (double)twice / (2.0 * (double)np * (double)nn);
    free(pos);
    free(neg);
    return 0;
}

int loupe_metrics_result(const loupe_metrics_acc *a, loupe_metrics *out, char *err, size_t errsize)
{
    size_t i, correct = 0, forged = 0;
    if (!a || !out) return fail(err, errsize, "loupe_metrics_result needs an accumulator and an output");
    memset(out, 0, sizeof *out);
    if (metrics_auc(a, &out->auc, err, errsize)) return -1;
    for (i = 0; i < a->n; i++) {
        correct += (a->prob[i] > METRIC_PROB_THRESHOLD) == (a->label[i] != 0);
        forged += a->label[i];
    }
    out->images = (long long)a->n;
    out->forged_images = (long long)forged;
    out->accuracy = a->n ? (double)correct / (double)a->n : metrics_nan();
    out->pixel_images = a->pixel_images;
    out->tp = (long long)a->tp;
    out->fp = (long long)a->fp;
    out->fn = (long long)a->fn;
    out->tn = (long long)a->tn;
    if (!a->pixel_images) {
        out->f1 = out->iou = metrics_nan();
    } else {
        /* f1_score(average="binary", zero_division=1) as scikit-learn 1.2 computes it */
        double tp = (double)a->tp, fp = (double)a->fp, fn = (double)a->fn, tn = (double)a->tn;
        double precision = a->tp + a->fp ? tp / (tp + fp) : 1.0;
        double recall = a->tp + a->fn ? tp / (tp + fn) : 1.0;
        double denom = precision + recall, iou_sum = 0.0;
        int classes = 0;
        out->f1 = 2.0 * precision * recall / (denom == 0.0 ? 1.0 : denom);
        /* mean_iou(num_labels=2): per class intersect / union, nanmean */
        if (a->tn + a->fp + a->fn) { iou_sum += tn / (tn + fp + fn); classes++; }
        if (a->tp + a->fp + a->fn) { iou_sum += tp / (tp + fp + fn); classes++; }
        out->iou = classes ? iou_sum / classes : metrics_nan();
    }
    out->overall = (out->auc + out->iou + out->f1) / 3.0;
    return 0;
}

/* ---- The validation loop ---- */

int loupe_evaluate(loupe_session *s, const loupe_dataset *d, unsigned long long seed, loupe_metrics *out,
                   loupe_eval_fn per_image, void *user, char *err, size_t errsize)
{
    loupe_metrics_acc *acc;
    loupe_splitmix stream;
    loupe_uniform u;
    float *pixels;
    int i, S, rc = -1;
    if (!s || !d || !out) return fail(err, errsize, "loupe_evaluate needs a session, a dataset and an output");
    S = s->m->cfg.image_size;
    stream.seed = seed;
    stream.counter = 0;
    u.fill = loupe_splitmix_fill;
    u.state = &stream;
    pixels = malloc(3 * (size_t)S * S * sizeof *pixels);
    acc = loupe_metrics_new(err, errsize);
    if (!pixels || !acc) {
        free(pixels);
        loupe_metrics_free(acc);
        return fail(err, errsize, "out of memory");
    }
    for (i = 0; i < d->n; i++) {
        loupe_image img, mask;
        unsigned char *pred = NULL, *target = NULL;
        loupe_eval_image r;
        char msg[DATASET_ERR_MAX];
        size_t n, k;
        int ok;
        if (loupe_dataset_load(d, i, &img, &mask, err, errsize)) goto done;
        n = (size_t)img.width * img.height;
        pred = malloc(n);
        target = calloc(n, 1);
        ok = pred && target;
        if (!ok) snprintf(msg, sizeof msg, "out of memory");
        ok = ok && !loupe_preprocess(s->m, &img, pixels, msg, sizeof msg) && !loupe_forward(s, pixels, msg, sizeof msg) &&
             !loupe_postprocess(s, img.width, img.height, EVAL_THRESHOLD, NULL, pred, msg, sizeof msg) &&
             (!mask.rgb || !loupe_mask_binarize(&mask, &u, target, NULL, msg, sizeof msg));
        if (!ok) fail(err, errsize, "%s: %s", d->e[i].image, msg);
        if (ok) {
            r.index = i;
            r.image = d->e[i].image;
            r.label = d->e[i].mask != NULL;
            r.prob = s->out.prob;
            r.width = img.width;
            r.height = img.height;
            r.pred_forged = r.target_forged = 0;
            for (k = 0; k < n; k++) {
                r.pred_forged += pred[k] != 0;
                r.target_forged += target[k] != 0;
            }
            ok = !loupe_metrics_add(acc, r.prob, r.label, pred, target, img.width, img.height, msg, sizeof msg);
            if (!ok) fail(err, errsize, "%s: %s", d->e[i].image, msg);
        }
        free(pred);
        free(target);
        loupe_image_free(&img);
        loupe_image_free(&mask);
        if (!ok) goto done;
        if (per_image) per_image(user, &r);
    }
    rc = loupe_metrics_result(acc, out, err, errsize);
done:
    free(pixels);
    loupe_metrics_free(acc);
    return rc;
}

/* ========================================================================== */
/* 12. CLI: the `loupe` command                                               */
/* ========================================================================== */
#ifndef LOUPE_NO_MAIN

/* ---- Test-time adaptation options: parsed and run the same way by any front end ---- */

static const char cli_tta_usage[] =
    "Test-time adaptation (Loupe's pseudo-label fine-tuning of the segmentor on the given\n"
    "images; the predictions then use the adapted segmentor):\n"
    "      --tta-steps N     AdamW steps before predicting (default 0: no adaptation)\n"
    "      --tta-batch B     images averaged into each step, taken in order and cycling\n"
    "                        (default: all images, every step sees the whole set)\n"
    "      --tta-lr LR       learning rate (default 1e-4; clipping 1.0, weight decay 1e-3)\n"
    "      --tta-seed S      seed of the loss's random sample points (default 0)\n"
    "      --save-adapted F  also write the adapted model as a weight file F\n";

#define CLI_TTA_MAX_COUNT 1e9      /* largest --tta-steps / --tta-batch */
#define CLI_TTA_MAX_LR 0.999       /* loupe_tta_new accepts learning rates below 1 */
#define CLI_TTA_MAX_SEED 9007199254740992.0 /* 2^53: every seed up to it is exact in a double */

/* The command line's TTA settings. */
typedef struct cli_tta {
    int steps, batch;            /* batch 0: all images */
    double lr;
    unsigned long long seed;
    const char *save;
} cli_tta;

/* Parses a number argument within [lo, hi]; prints the problem and returns -1. */
static int cli_tta_number(const char *opt, const char *arg, double lo, double hi, int integer, double *v)
{
    char *end;
    if (!arg) { fprintf(stderr, "loupe: %s needs a value (see loupe -h)\n", opt); return -1; }
    *v = strtod(arg, &end);
    if (end == arg || *end || !(*v >= lo && *v <= hi) || (integer && *v != floor(*v))) {
        fprintf(stderr, "loupe: %s %s: expected %s between %g and %g\n", opt, arg, integer ? "an integer" : "a number",
                lo, hi);
        return -1;
    }
    return 0;
}

/* Handles one TTA option a (with its value next): returns the arguments used (2), 0 when
 * a is not a TTA option, -1 after printing why its value is bad. */
static int cli_tta_option(cli_tta *o, const char *a, const char *next)
{
    double v;
    if (!strcmp(a, "--tta-steps")) { if (cli_tta_number(a, next, 0, CLI_TTA_MAX_COUNT, 1, &v)) return -1; o->steps = (int)v; }
    else if (!strcmp(a, "--tta-batch")) { if (cli_tta_number(a, next, 1, CLI_TTA_MAX_COUNT, 1, &v)) return -1; o->batch = (int)v; }
    else if (!strcmp(a, "--tta-lr")) { if (cli_tta_number(a, next, 0, CLI_TTA_MAX_LR, 0, &v)) return -1; o->lr = v; }
    else if (!strcmp(a, "--tta-seed")) { if (cli_tta_number(a, next, 0, CLI_TTA_MAX_SEED, 1, &v)) return -1; o->seed = (unsigned long long)v; }
    else if (!strcmp(a, "--save-adapted")) {
        if (!next) { fprintf(stderr, "loupe: %s needs a value (see loupe -h)\n", a); return -1; }
        o->save = next;
    } else return 0;
    return 2;
}

/* What loupe_tta_adapt's callbacks share: the front end's loader and the options. */
typedef struct cli_tta_context {
    loupe_tta_source load;
    void *user;
    const cli_tta *o;
} cli_tta_context;

/* Loads image index for loupe_tta_adapt through the front end's loader. */
static int cli_tta_load(void *user, int index, float *pixel_values, char *err, size_t errsize)
{
    const cli_tta_context *ctx = user;
    return ctx->load(ctx->user, index, pixel_values, err, errsize);
}

/* Prints one line per step on stderr. */
static void cli_tta_progress(void *user, int step, const loupe_tta_loss *loss)
{
    const cli_tta_context *ctx = user;
    fprintf(stderr, "tta step %d/%d: loss %.5f (mask %.4f, dice %.4f, class %.4f), %d image(s) with a target, "
            "gradient norm %.4g\n", step + 1, ctx->o->steps, loss->total, loss->mask, loss->dice, loss->cross_entropy,
            loss->has_target, loss->grad_norm);
}

/* Upstream's test-stage values: no adaptation unless asked. */
static void cli_tta_init(cli_tta *o)
{
    loupe_tta_options opt;
    loupe_tta_default_options(&opt);
    o->steps = 0;
    o->batch = 0;
    o->lr = opt.lr;
    o->seed = opt.seed;
    o->save = NULL;
}

/* Adapts on n images (load fills image i's pixel_values), saves the adapted model when
 * asked and makes s predict with it; *out receives the adapter (NULL when nothing was
 * asked), which must outlive those predictions. Returns 0, or 1 after printing the error. */
static int cli_tta_run(const cli_tta *o, const loupe_model *m, loupe_session *s, int n, loupe_tta_source load,
                       void *user, int quiet, loupe_trainer **out)
{
    loupe_tta_options opt;
    loupe_trainer *t;
    cli_tta_context ctx;
    char err[512];
    *out = NULL;
    if (o->steps == 0 && !o->save) return 0;
    loupe_tta_default_options(&opt);
    opt.lr = o->lr;
    opt.seed = o->seed;
    if (!(t = loupe_tta_new(m, &opt, err, sizeof err))) { fprintf(stderr, "loupe: %s\n", err); return 1; }
    ctx.load = load;
    ctx.user = user;
    ctx.o = o;
    if (loupe_tta_adapt(t, n, cli_tta_load, &ctx, o->steps, o->batch ? o->batch : n, quiet ? NULL : cli_tta_progress,
                        err, sizeof err) ||
        (o->save && loupe_tta_save(t, o->save, err, sizeof err)) || loupe_session_use_tta(s, t, err, sizeof err)) {
        fprintf(stderr, "loupe: test-time adaptation: %s\n", err);
        loupe_tta_free(t);
        return 1;
    }
    *out = t;
    return 0;
}

/* ---- The command ---- */

static const char usage_text[] =
    "usage: loupe [-m MODEL.bin] [options] IMAGE_OR_DIR...\n"
    "\n"
    "Detects and localizes image forgeries with Loupe. Prints one line per image,\n"
    "`name,probability` (the line upstream writes to predictions.txt).\n"
    "\n"
    "  -m, --model FILE      weight file (tools/convert.py, loupe train or loupe init);\n"
    "                        default: $LOUPE_MODEL, else the demo model weights/loupe-demo.bin\n"
    "                        (a small model trained by loupe.c; see weights/README.md)\n"
    "  -o, --output DIR      also write DIR/predictions.txt and DIR/masks/<stem>.png\n"
    "                        (8-bit gray at the original size, 255 = forged, 0 = real)\n"
    "      --overlay         with -o, also write DIR/overlays/<stem>.png: the photo\n"
    "                        tinted red by the forgery probability map\n"
    "      --threshold T     mask threshold on the probability map (default 0.5)\n"
    "      --threads N       number of threads (default: all cores)\n"
    "      --max-pixels N    refuse images with more pixels (default 100000000)\n"
    "  -q, --quiet           no progress on stderr (errors are still reported)\n"
    "  -v, --verbose         at the end, one line on stderr: the milliseconds spent loading\n"
    "                        the model, decoding, preprocessing, in the forward pass,\n"
    "                        post-processing and writing outputs\n"
    "  -h, --help            show this help\n"
    "\n"
    "Directories are scanned for .png, .jpg, .jpeg, .ppm and .pgm files (sorted by name).\n"
    "Masks are named after the file's stem (photo.jpg -> photo.png); when two inputs share\n"
    "a stem, after the whole name (photo.jpg.png).\n"
    "A file that cannot be read or decoded is reported and skipped; the exit status is\n"
    "then 1. Outputs are written under a temporary name and renamed when complete.\n"
    "\n"
    "loupe eval -m MODEL.bin DATA scores a labelled dataset (see loupe eval -h); loupe train\n"
    "trains a model (loupe train -h); loupe init writes a randomly initialised one (loupe init -h).\n";

/* Overlay tint: pixel = (1 - a) * photo + a * red, a = OVERLAY_ALPHA * min(prob, 1). */
#define OVERLAY_ALPHA 0.6f
#define PATH_MAX_LEN 4096

typedef struct cli_options {
    const char *model, *outdir;
    float threshold;
    int threads, overlay, quiet, verbose;
    size_t max_pixels;
    char **inputs; /* image paths after expanding directories */
    int n_inputs, cap_inputs;
    cli_tta tta;
} cli_options;

/* Copies a string into a new allocation (strdup is not C99). */
static char *cli_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* Appends one input path. */
static int cli_add_input(cli_options *o, const char *path)
{
    if (o->n_inputs == o->cap_inputs) {
        int cap = o->cap_inputs ? 2 * o->cap_inputs : 16;
        char **grown = realloc(o->inputs, (size_t)cap * sizeof *grown);
        if (!grown) return -1;
        o->inputs = grown;
        o->cap_inputs = cap;
    }
    if (!(o->inputs[o->n_inputs] = cli_strdup(path))) return -1;
    o->n_inputs++;
    return 0;
}

#if LOUPE_POSIX || defined(_WIN32) /* directory inputs: helpers used only where directories can be listed */
/* True when the file name ends in an image extension we decode (any case). */
static int cli_is_image_name(const char *name)
{
    static const char *const exts[] = {".png", ".jpg", ".jpeg", ".ppm", ".pgm"};
    size_t n = strlen(name), i, k;
    for (i = 0; i < sizeof exts / sizeof exts[0]; i++) {
        size_t e = strlen(exts[i]);
        int same = n > e;
        for (k = 0; same && k < e; k++) same = tolower((unsigned char)name[n - e + k]) == exts[i][k];
        if (same) return 1;
    }
    return 0;
}

static int cli_cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }
#endif

/* Adds a file, or every image file of a directory in name order. */
static int cli_expand(cli_options *o, const char *path)
{
#if LOUPE_POSIX
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *e;
        int first = o->n_inputs;
        char full[PATH_MAX_LEN];
        if (!d) { fprintf(stderr, "loupe: %s: cannot open directory: %s\n", path, strerror(errno)); return 1; }
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.' || !cli_is_image_name(e->d_name)) continue;
            snprintf(full, sizeof full, "%s/%s", path, e->d_name);
            if (stat(full, &st) != 0 || !S_ISREG(st.st_mode)) continue;
            if (cli_add_input(o, full)) { closedir(d); return -1; }
        }
        closedir(d);
        qsort(o->inputs + first, (size_t)(o->n_inputs - first), sizeof *o->inputs, cli_cmp_str);
        return 0;
    }
#elif defined(_WIN32)
    DWORD attr = GetFileAttributesA(path);
    if (attr != INVALID_FILE_ATTRIBUTES && (attr & FILE_ATTRIBUTE_DIRECTORY)) {
        WIN32_FIND_DATAA e;
        HANDLE d;
        int first = o->n_inputs;
        char full[PATH_MAX_LEN];
        snprintf(full, sizeof full, "%s/*", path);
        d = FindFirstFileA(full, &e);
        if (d == INVALID_HANDLE_VALUE) { fprintf(stderr, "loupe: %s: cannot open directory\n", path); return 1; }
        do {
            if (e.cFileName[0] == '.' || !cli_is_image_name(e.cFileName) || (e.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY))
                continue;
            snprintf(full, sizeof full, "%s/%s", path, e.cFileName);
            if (cli_add_input(o, full)) { FindClose(d); return -1; }
        } while (FindNextFileA(d, &e));
        FindClose(d);
        qsort(o->inputs + first, (size_t)(o->n_inputs - first), sizeof *o->inputs, cli_cmp_str);
        return 0;
    }
#endif
    return cli_add_input(o, path);
}

/* Parses a number argument; returns 0 on success. */
static int cli_number(const char *opt, const char *arg, double lo, double hi, double *v)
{
    char *end;
    if (!arg) { fprintf(stderr, "loupe: %s needs a value\n", opt); return -1; }
    errno = 0;
    *v = strtod(arg, &end);
    if (errno || *end || end == arg || !(*v >= lo && *v <= hi)) {
        fprintf(stderr, "loupe: %s: '%s' is not a number in [%g, %g]\n", opt, arg, lo, hi);
        return -1;
    }
    return 0;
}

/* The model used without -m: $LOUPE_MODEL, else the demo model of the repository loupe
 * was built in (the Makefile compiles its path in), else weights/loupe-demo.bin next to
 * the executable or in the current directory. NULL when none exists; *demo is set when
 * it is the demo model. */
#ifndef LOUPE_DEMO_MODEL
#define LOUPE_DEMO_MODEL "weights/loupe-demo.bin"
#endif
#define DEMO_MODEL_NAME "weights/loupe-demo.bin"
static const char *cli_default_model(const char *argv0, char *buf, size_t n, int *demo)
{
    const char *env = getenv("LOUPE_MODEL");
    const char *slash = argv0 ? strrchr(argv0, '/') : NULL;
    FILE *f;
    *demo = 0;
    if (env && *env) return env;
    *demo = 1;
    if ((f = fopen(LOUPE_DEMO_MODEL, "rb"))) { fclose(f); return LOUPE_DEMO_MODEL; }
    if (slash && (size_t)(slash - argv0) + sizeof DEMO_MODEL_NAME + 1 < n) {
        snprintf(buf, n, "%.*s/%s", (int)(slash - argv0), argv0, DEMO_MODEL_NAME);
        if ((f = fopen(buf, "rb"))) { fclose(f); return buf; }
    }
    if ((f = fopen(DEMO_MODEL_NAME, "rb"))) { fclose(f); return DEMO_MODEL_NAME; }
    return NULL;
}

/* Parses the command line; 0 to run, 1 when help was shown, 2 on a usage error. */
static int cli_parse(int argc, char **argv, cli_options *o)
{
    int i, only_files = 0, used;
    double v;
    cli_tta_init(&o->tta);
    o->threshold = 0.5f;
    o->max_pixels = LOUPE_DEFAULT_MAX_PIXELS;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (only_files || a[0] != '-' || !a[1]) {
            int rc = cli_expand(o, a);
            if (rc < 0) { fprintf(stderr, "loupe: out of memory\n"); return 2; }
            if (rc > 0) return 2;
        } else if (!strcmp(a, "--")) only_files = 1;
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(usage_text, stdout); fputs(cli_tta_usage, stdout); return 1; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { if (!next) goto missing; o->model = next; i++; }
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) { if (!next) goto missing; o->outdir = next; i++; }
        else if (!strcmp(a, "--overlay")) o->overlay = 1;
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) o->quiet = 1;
        else if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) o->verbose = 1;
        else if (!strcmp(a, "--threshold")) { if (cli_number(a, next, 0, 1e9, &v)) return 2; o->threshold = (float)v; i++; }
        else if (!strcmp(a, "--threads")) { if (cli_number(a, next, 1, 4096, &v) || v != floor(v)) return 2; o->threads = (int)v; i++; }
        else if (!strcmp(a, "--max-pixels")) { if (cli_number(a, next, 1, 1e15, &v)) return 2; o->max_pixels = (size_t)v; i++; }
        else if ((used = cli_tta_option(&o->tta, a, next)) != 0) {
            if (used < 0) return 2;
            i += used - 1;
        } else { fprintf(stderr, "loupe: unknown option %s (see loupe -h)\n", a); return 2; }
        continue;
    missing:
        fprintf(stderr, "loupe: %s needs a value (see loupe -h)\n", a);
        return 2;
    }
    if (o->n_inputs == 0) { fprintf(stderr, "loupe: no images given (see loupe -h)\n"); return 2; }
    if (!o->model) {
        static char found[PATH_MAX_LEN];
        int demo;
        o->model = cli_default_model(argv[0], found, sizeof found, &demo);
        if (!o->model) {
            fprintf(stderr, "loupe: no model given and no demo model found (%s): use -m MODEL.bin or set "
                    "LOUPE_MODEL (see loupe -h)\n", LOUPE_DEMO_MODEL);
            return 2;
        }
        if (demo && !o->quiet)
            fprintf(stderr, "loupe: using the demo model %s (small, trained by loupe.c on synthetic forgeries; "
                    "weights/README.md says what it finds and where real weights come from)\n", o->model);
    }
    if (o->overlay && !o->outdir) { fprintf(stderr, "loupe: --overlay needs -o DIR\n"); return 2; }
    return 0;
}

/* Creates a directory unless it exists. */
static int cli_mkdir(const char *path)
{
#if LOUPE_POSIX
    struct stat st;
    if (mkdir(path, 0777) == 0 || (errno == EEXIST && stat(path, &st) == 0 && S_ISDIR(st.st_mode))) return 0;
    fprintf(stderr, "loupe: cannot create directory %s: %s\n", path, strerror(errno));
    return -1;
#elif defined(_WIN32)
    if (_mkdir(path) == 0 || errno == EEXIST) return 0;
    fprintf(stderr, "loupe: cannot create directory %s: %s\n", path, strerror(errno));
    return -1;
#else
    (void)path;
    return 0; /* the directory must exist; writing into it reports the problem */
#endif
}

/* Writes data to path via path.part and a rename, so no half-written file remains. */
static int cli_write_atomic(const char *path, const void *data, size_t n)
{
    char tmp[PATH_MAX_LEN + 8];
    FILE *f;
    int ok;
    snprintf(tmp, sizeof tmp, "%s.part", path);
    f = fopen(tmp, "wb");
    if (!f) { fprintf(stderr, "loupe: cannot write %s: %s\n", tmp, strerror(errno)); return -1; }
    ok = fwrite(data, 1, n, f) == n;
    ok = (fclose(f) == 0) && ok;
    if (!ok || replace_file(tmp, path) != 0) {
        fprintf(stderr, "loupe: cannot write %s: %s\n", path, strerror(errno));
        remove(tmp);
        return -1;
    }
    return 0;
}

/* Orders inputs by the stem of their file name. */
static int cli_cmp_stem(const void *a, const void *b)
{
    const char *x = dataset_basename(*(char *const *)a), *y = dataset_basename(*(char *const *)b);
    int lx = (int)dataset_stem_len(x), ly = (int)dataset_stem_len(y), c = strncmp(x, y, (size_t)(lx < ly ? lx : ly));
    return c ? c : lx - ly;
}

/* Marks inputs whose stem another input shares (a.jpg, a.png): their outputs are
 * named after the whole file name (a.jpg.png) so that none overwrites another. */
static unsigned char *cli_stem_clashes(char **inputs, int n)
{
    char **sorted = malloc((size_t)n * sizeof *sorted);
    unsigned char *clash = calloc((size_t)n, 1);
    int i, j;
    if (!sorted || !clash) { free(sorted); free(clash); return NULL; }
    memcpy(sorted, inputs, (size_t)n * sizeof *sorted);
    qsort(sorted, (size_t)n, sizeof *sorted, cli_cmp_stem);
    for (i = 0; i + 1 < n; i++)
        if (cli_cmp_stem(&sorted[i], &sorted[i + 1]) == 0)
            for (j = 0; j < n; j++)
                if (inputs[j] == sorted[i] || inputs[j] == sorted[i + 1]) clash[j] = 1;
    free(sorted);
    return clash;
}

/* Encodes and writes one PNG (channels 1 or 3) as DIR/SUB/<stem>.png, or as
 * DIR/SUB/<name>.png when the stem clashes with another input's. */
static int cli_write_png(const char *dir, const char *sub, const char *name, int clash, const unsigned char *pix,
                         int w, int h, int channels)
{
    char path[PATH_MAX_LEN], err[256];
    unsigned char *png;
    size_t n;
    int rc;
    snprintf(path, sizeof path, "%s/%s/%.*s.png", dir, sub, clash ? (int)strlen(name) : (int)dataset_stem_len(name), name);
    if (loupe_png_encode(pix, w, h, channels, &png, &n, err, sizeof err)) {
        fprintf(stderr, "loupe: %s: %s\n", path, err);
        return -1;
    }
    rc = cli_write_atomic(path, png, n);
    free(png);
    return rc;
}

/* Tints the photo red by the probability map, in place. */
static void cli_overlay(unsigned char *rgb, const float *prob, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        float a = OVERLAY_ALPHA * (!(prob[i] > 0.0f) ? 0.0f : prob[i] > 1.0f ? 1.0f : prob[i]); /* NaN -> 0 */
        rgb[3 * i] = (unsigned char)((1.0f - a) * rgb[3 * i] + a * 255.0f + 0.5f);
        rgb[3 * i + 1] = (unsigned char)((1.0f - a) * rgb[3 * i + 1] + 0.5f);
        rgb[3 * i + 2] = (unsigned char)((1.0f - a) * rgb[3 * i + 2] + 0.5f);
    }
}

/* What the adaptation's image loader needs. */
typedef struct cli_loader {
    const cli_options *o;
    const loupe_model *m;
} cli_loader;

/* Loads input index as pixel_values for test-time adaptation. */
static int cli_load_image(void *user, int index, float *pixel_values, char *err, size_t errsize)
{
    const cli_loader *l = user;
    loupe_image img;
    int rc = loupe_image_load(l->o->inputs[index], l->o->max_pixels, &img, err, errsize) ||
             loupe_preprocess(l->m, &img, pixel_values, err, errsize);
    loupe_image_free(&img);
    return rc ? -1 : 0;
}

/* Seconds spent in each step of a run, summed over its images (printed by -v). */
typedef struct cli_times {
    double load, decode, preprocess, forward, post, write;
} cli_times;

/* Minor and major page faults of this process so far (0 where the system cannot tell). */
static void cli_page_faults(long *minor, long *major)
{
#if LOUPE_POSIX
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) == 0) {
        *minor = ru.ru_minflt;
        *major = ru.ru_majflt;
        return;
    }
#endif
    *minor = *major = 0;
}

/* Adds the seconds since *t to *acc and moves *t to now. */
static void cli_lap(double *t, double *acc)
{
    double now = now_seconds();
    *acc += now - *t;
    *t = now;
}

/* Runs one image end to end; appends its line to *pred and its times to *tm. Returns 0
 * or -1 (reported). */
static int cli_image(const cli_options *o, const loupe_model *m, loupe_session *s, const char *path, int clash,
                     float *pixels, char **pred, size_t *pred_len, size_t *pred_cap, cli_times *tm)
{
    char err[512], line[PATH_MAX_LEN + 32];
    loupe_image img;
    float *prob = NULL;
    unsigned char *mask = NULL;
    const char *name = dataset_basename(path);
    int rc = -1, n;
    size_t npix;
    double t = now_seconds();
    if (loupe_image_load(path, o->max_pixels, &img, err, sizeof err)) goto failed;
    cli_lap(&t, &tm->decode);
    if (loupe_preprocess(m, &img, pixels, err, sizeof err)) goto failed;
    cli_lap(&t, &tm->preprocess);
    if (loupe_forward(s, pixels, err, sizeof err)) goto failed;
    cli_lap(&t, &tm->forward);
    n = snprintf(line, sizeof line, "%s,%.4f\n", name, loupe_get_outputs(s)->prob);
    fputs(line, stdout);
    fflush(stdout);
    if (!o->outdir) { loupe_image_free(&img); return 0; }
    if (*pred_len + (size_t)n + 1 > *pred_cap) {
        size_t cap = 2 * (*pred_cap + (size_t)n + 1);
        char *g = realloc(*pred, cap);
        if (!g) { fprintf(stderr, "loupe: out of memory\n"); loupe_image_free(&img); return -1; }
        *pred = g;
        *pred_cap = cap;
    }
    memcpy(*pred + *pred_len, line, (size_t)n);
    *pred_len += (size_t)n;
    npix = (size_t)img.width * img.height;
    prob = malloc(npix * sizeof *prob);
    mask = malloc(npix);
    if (!prob || !mask) { fprintf(stderr, "loupe: %s: out of memory for the mask\n", path); goto done; }
    if (loupe_postprocess(s, img.width, img.height, o->threshold, prob, mask, err, sizeof err)) {
        fprintf(stderr, "loupe: %s: %s\n", path, err);
        goto done;
    }
    if (o->overlay) cli_overlay(img.rgb, prob, npix);
    cli_lap(&t, &tm->post);
    if (cli_write_png(o->outdir, "masks", name, clash, mask, img.width, img.height, 1)) goto done;
    if (o->overlay && cli_write_png(o->outdir, "overlays", name, clash, img.rgb, img.width, img.height, 3)) goto done;
    rc = 0;
done:
    cli_lap(&t, &tm->write);
    free(prob);
    free(mask);
    loupe_image_free(&img);
    return rc;
failed:
    fprintf(stderr, "loupe: %s\n", err);
    loupe_image_free(&img);
    return -1;
}

/* ---- loupe eval: upstream's validation metrics on a labelled dataset ---- */

static const char eval_usage_text[] =
    "usage: loupe eval -m MODEL.bin [options] DATA\n"
    "\n"
    "Scores Loupe on a labelled dataset with upstream's validation metrics. Prints one\n"
    "`name value` line each: images, forged (images with a mask), pixel_images (images\n"
    "whose target has a forged pixel), auc, f1, iou, overall, accuracy; `nan` when a\n"
    "metric is undefined.\n"
    "\n"
    "DATA is a folder with images/ and masks/ (a mask has its image's stem, any supported\n"
    "format; an image without a mask is authentic), or a text file of lines `IMAGE [MASK]`\n"
    "(paths relative to the file; blank lines and lines starting with # are skipped).\n"
    "Every image and mask is decoded before the model runs: a missing or undecodable\n"
    "file, a mask of another size than its image, two images or masks with one stem or a\n"
    "mask without an image stops the run with a message naming the file (exit 1).\n"
    "\n"
    "  -m, --model FILE      weight file written by tools/convert.py (required)\n"
    "  -o, --output FILE     also write FILE: a header line, then one line per image,\n"
    "                        `image,label,probability,predicted_pixels,target_pixels`\n"
    "                        (forged pixels of the predicted mask and of the target)\n"
    "      --seed S          seed of the targets' dithering (default 0)\n"
    "      --threads N       number of threads (default: all cores)\n"
    "      --max-pixels N    refuse images with more pixels (default 100000000)\n"
    "  -q, --quiet           no progress on stderr (errors are still reported)\n"
    "  -h, --help            show this help\n"
    "\n"
    "Metrics (LitModel.on_validation_epoch_end): auc = roc_auc_score of the forgery\n"
    "probabilities (ties count 1/2; nan unless both forged and authentic images are\n"
    "present); f1 (binary, zero_division=1) and iou (mean over the classes real and\n"
    "forged of TP/(TP+FP+FN)) over the pooled pixels of the images whose target has a\n"
    "forged pixel (nan when none has); overall = (auc + iou + f1) / 3; accuracy = share\n"
    "of images with (probability > 0.5) == label. Predicted mask: probability map > 0.5\n"
    "at the original size. Target, as upstream's test_collate_fn makes it: the mask in\n"
    "gray (Pillow's L), (L - min) / (max - min) >= u with one uniform u per pixel from the\n"
    "splitmix64 stream of --seed, drawn in dataset order (a 0/255 mask keeps its pixels,\n"
    "but for a draw of exactly 0; a constant mask is an empty target); authentic images\n"
    "have an empty target.\n"
    "FILE is written under a temporary name and renamed when complete.\n";

#define EVAL_MAX_SEED 9007199254740992.0 /* 2^53: every seed up to it is exact in a double */

/* What the per-image callback of cli_eval keeps. */
typedef struct cli_eval_state {
    int quiet, n;
    double t0;
    char *lines;                 /* -o: the lines so far */
    size_t len, cap;
    int oom;
} cli_eval_state;

static void cli_eval_image(void *user, const loupe_eval_image *r)
{
    cli_eval_state *st = user;
    double t = now_seconds();
    if (!st->quiet && st->n > 1) fprintf(stderr, "[%d/%d] %s %.0f ms\n", r->index + 1, st->n, r->image, 1000.0 * (t - st->t0));
    st->t0 = t;
    if (st->lines) {
        char line[PATH_MAX_LEN + 96];
        int k = snprintf(line, sizeof line, "%s,%d,%.6f,%lld,%lld\n", r->image, r->label, r->prob, r->pred_forged,
                         r->target_forged);
        if (k < 0 || (size_t)k >= sizeof line) return;
        if (st->len + (size_t)k + 1 > st->cap) {
            size_t cap = 2 * (st->cap + (size_t)k + 1);
            char *g = realloc(st->lines, cap);
            if (!g) { st->oom = 1; return; }
            st->lines = g;
            st->cap = cap;
        }
        memcpy(st->lines + st->len, line, (size_t)k);
        st->len += (size_t)k;
    }
}

/* Prints one `name value` line (nan spelled the same on every libc). */
static void cli_eval_print(const char *name, double v)
{
    if (v != v) printf("%s nan\n", name);
    else printf("%s %.6f\n", name, v);
}

/* `loupe eval ...` (argv[0] is "eval"); returns the exit status. */
static int cli_eval(int argc, char **argv)
{
    static const char header[] = "image,label,probability,predicted_pixels,target_pixels\n";
    const char *model = NULL, *data = NULL, *output = NULL;
    size_t max_pixels = LOUPE_DEFAULT_MAX_PIXELS;
    unsigned long long seed = 0;
    int threads = 0, quiet = 0, i, status = 1;
    char err[1024];
    double v;
    loupe_model *m = NULL;
    loupe_session *s = NULL;
    loupe_dataset *d = NULL;
    loupe_metrics r;
    cli_eval_state st;
    memset(&st, 0, sizeof st);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-' || !a[1]) {
            if (data) { fprintf(stderr, "loupe eval: one DATA only (got %s and %s)\n", data, a); return 2; }
            data = a;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(eval_usage_text, stdout); return 0; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { if (!next) goto missing; model = next; i++; }
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) { if (!next) goto missing; output = next; i++; }
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) quiet = 1;
        else if (!strcmp(a, "--seed")) {
            if (cli_number(a, next, 0, EVAL_MAX_SEED, &v) || v != floor(v)) return 2;
            seed = (unsigned long long)v;
            i++;
        } else if (!strcmp(a, "--threads")) {
            if (cli_number(a, next, 1, 4096, &v) || v != floor(v)) return 2;
            threads = (int)v;
            i++;
        } else if (!strcmp(a, "--max-pixels")) {
            if (cli_number(a, next, 1, 1e15, &v)) return 2;
            max_pixels = (size_t)v;
            i++;
        } else { fprintf(stderr, "loupe eval: unknown option %s (see loupe eval -h)\n", a); return 2; }
        continue;
    missing:
        fprintf(stderr, "loupe eval: %s needs a value (see loupe eval -h)\n", a);
        return 2;
    }
    if (!model) { fprintf(stderr, "loupe eval: no model given: use -m MODEL.bin (see loupe eval -h)\n"); return 2; }
    if (!data) { fprintf(stderr, "loupe eval: no dataset given (see loupe eval -h)\n"); return 2; }
    if (threads) loupe_set_threads(threads);
    /* the dataset first: a bad entry is reported before the model is even read */
    if (!(d = loupe_dataset_open(data, max_pixels, err, sizeof err)) || !(m = loupe_model_load(model, err, sizeof err)) ||
        !(s = loupe_session_new(m, err, sizeof err))) {
        fprintf(stderr, "loupe: %s\n", err);
        goto done;
    }
    st.quiet = quiet;
    st.n = loupe_dataset_count(d);
    st.t0 = now_seconds();
    if (output) {
        st.cap = sizeof header;
        if (!(st.lines = malloc(st.cap))) { fprintf(stderr, "loupe: out of memory\n"); goto done; }
        memcpy(st.lines, header, sizeof header - 1);
        st.len = sizeof header - 1;
    }
    if (loupe_evaluate(s, d, seed, &r, cli_eval_image, &st, err, sizeof err)) {
        fprintf(stderr, "loupe: %s\n", err);
        goto done;
    }
    if (st.oom) { fprintf(stderr, "loupe: out of memory for the lines of %s\n", output); goto done; }
    printf("images %lld\nforged %lld\npixel_images %lld\n", r.images, r.forged_images, r.pixel_images);
    cli_eval_print("auc", r.auc);
    cli_eval_print("f1", r.f1);
    cli_eval_print("iou", r.iou);
    cli_eval_print("overall", r.overall);
    cli_eval_print("accuracy", r.accuracy);
    fflush(stdout);
    if (output && cli_write_atomic(output, st.lines, st.len)) goto done;
    status = 0;
done:
    free(st.lines);
    loupe_session_free(s);
    loupe_model_free(m);
    loupe_dataset_free(d);
    return status;
}

/* ---- loupe train: upstream's training stages on a labelled dataset ---- */

static const char train_usage[] =
    "usage: loupe train --stage {cls,seg,cls_seg} -m INIT.bin --train DATA [--valid DATA] -o OUT.bin [options]\n"
    "\n"
    "Trains Loupe as upstream's src/train.py does: stage cls trains the classifier, seg the\n"
    "segmentor (both on a frozen backbone), cls_seg everything (loss 2 x cls + 1 x seg).\n"
    "DATA is a folder with images/ and masks/ (a mask has its image's stem; an image without\n"
    "one is authentic) or a text file of lines `IMAGE [MASK]`. Every entry is checked before\n"
    "training starts. Defaults are upstream's per stage (configs/hparams, configs/model).\n"
    "\n"
    "Outputs: OUT.bin (the best model by the stage's validation metric - auc for cls, iou for\n"
    "seg, overall for cls_seg - or the last one without --valid), OUT.last.bin (the last\n"
    "model) and OUT.state (optimizer state for --resume). Every file is replaced atomically.\n"
    "\n"
    "  --epochs N          passes over the training set (1)\n"
    "  --batch N           images per batch; the loss is the batch's, as upstream (cls 48,\n"
    "                      seg 40, cls_seg 32)\n"
    "  --accum N           batches per optimizer step, each loss divided by N (cls 8, else 3)\n"
    "  --lr X              learning rate of the heads (cls 5e-4, else 3e-4)\n"
    "  --backbone-lr X     learning rate of backbone tensors (1e-5)\n"
    "  --weight-decay X    AdamW weight decay, none for biases (cls 1e-3, else 5e-2)\n"
    "  --schedule S        wsd, cosine or constant (wsd)\n"
    "  --warmup F          warm-up length as a fraction of all steps (0.1)\n"
    "  --decay F           wsd decay length as a fraction of all steps (0.1)\n"
    "  --clip X            gradient norm clipping (1.0)\n"
    "  --seed N            data order, mask dithering and the loss's random points (42)\n"
    "  --freeze-backbone   train no backbone tensor (default of cls and seg)\n"
    "  --train-backbone    train every backbone tensor (default of cls_seg)\n"
    "  --train-embeddings  also train the backbone's class and position embeddings when it\n"
    "                      is frozen, as upstream does by accident (off: a frozen backbone is\n"
    "                      frozen, and its outputs are kept across epochs)\n"
    "  --no-warmup-quirk   skip upstream's first step at learning rate 0 (its schedule starts\n"
    "                      at factor 0: that step only updates the optimizer's moments)\n"
    "  --max-steps N       stop after N optimizer steps (0: no limit)\n"
    "  --save-every N      also save OUT.last.bin and OUT.state every N steps (0: per epoch)\n"
    "  --cache-mib N       memory for kept backbone outputs of a frozen backbone (2048); the\n"
    "                      rest goes to OUT.features, checked against the model and image\n"
    "  --resume            continue from OUT.last.bin and OUT.state, bit for bit\n"
    "  --threads N         OpenMP threads\n"
    "  -q                  no progress on stderr\n";

/* What --resume restores besides the optimizer: where the run stands. */
typedef struct train_progress {
    int64_t epoch, batch, step;       /* next epoch and batch to run, optimizer steps done */
    double best;                      /* best monitored validation metric so far (-1: none) */
    int64_t has_best;
} train_progress;

typedef struct train_cli {
    const char *model, *train, *valid, *out;
    int stage, epochs, batch, accum, schedule, max_steps, save_every, quiet, resume, threads, warmup_quirk;
    int backbone;                     /* -1 stage default, 0 frozen, 1 trained */
    int embeddings;
    double lr, backbone_lr, weight_decay, warmup, decay, clip;
    long cache_mib;
    unsigned long long seed;
} train_cli;

/* One number option: "--name VALUE" within [lo, hi] (integer when asked). */
static int train_number(const char *opt, const char *arg, double lo, double hi, int integer, double *v)
{
    char *end;
    if (!arg) { fprintf(stderr, "loupe train: %s needs a value\n", opt); return -1; }
    errno = 0;
    *v = strtod(arg, &end);
    if (end == arg || *end || errno || !(*v >= lo && *v <= hi) || (integer && *v != floor(*v))) {
        fprintf(stderr, "loupe train: %s %s: expected %s from %g to %g\n", opt, arg, integer ? "an integer" : "a number",
                lo, hi);
        return -1;
    }
    return 0;
}

/* Parses `loupe train` options; 0 to run, 1 after help, 2 on a usage error. */
static int train_parse(int argc, char **argv, train_cli *o)
{
    int i;
    double v;
    memset(o, 0, sizeof *o);
    o->stage = -1;
    o->epochs = 1;
    o->batch = o->accum = -1;
    o->lr = o->backbone_lr = o->weight_decay = -1.0;
    o->warmup = o->decay = 0.1;
    o->clip = 1.0;
    o->seed = 42;
    o->backbone = -1;
    o->cache_mib = 2048;
    o->warmup_quirk = 1;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(train_usage, stdout); return 1; }
        else if (!strcmp(a, "--stage")) {
            if (!next) { fprintf(stderr, "loupe train: --stage needs cls, seg or cls_seg\n"); return 2; }
            if (!strcmp(next, "cls")) o->stage = LOUPE_TRAIN_CLS;
            else if (!strcmp(next, "seg")) o->stage = LOUPE_TRAIN_SEG;
            else if (!strcmp(next, "cls_seg")) o->stage = LOUPE_TRAIN_CLS_SEG;
            else { fprintf(stderr, "loupe train: --stage %s: expected cls, seg or cls_seg\n", next); return 2; }
            i++;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--train") || !strcmp(a, "--valid") || !strcmp(a, "-o")) {
            if (!next) { fprintf(stderr, "loupe train: %s needs a value\n", a); return 2; }
            if (!strcmp(a, "-m")) o->model = next;
            else if (!strcmp(a, "--train")) o->train = next;
            else if (!strcmp(a, "--valid")) o->valid = next;
            else o->out = next;
            i++;
        } else if (!strcmp(a, "--schedule")) {
            if (next && !strcmp(next, "wsd")) o->schedule = LOUPE_SCHEDULE_WSD;
            else if (next && !strcmp(next, "cosine")) o->schedule = LOUPE_SCHEDULE_COSINE;
            else if (next && !strcmp(next, "constant")) o->schedule = LOUPE_SCHEDULE_CONSTANT;
            else { fprintf(stderr, "loupe train: --schedule needs wsd, cosine or constant\n"); return 2; }
            i++;
        } else if (!strcmp(a, "--epochs")) { if (train_number(a, next, 1, 1e6, 1, &v)) return 2; o->epochs = (int)v; i++; }
        else if (!strcmp(a, "--batch")) { if (train_number(a, next, 1, 4096, 1, &v)) return 2; o->batch = (int)v; i++; }
        else if (!strcmp(a, "--accum")) { if (train_number(a, next, 1, 4096, 1, &v)) return 2; o->accum = (int)v; i++; }
        else if (!strcmp(a, "--lr")) { if (train_number(a, next, 0, 0.999, 0, &o->lr)) return 2; i++; }
        else if (!strcmp(a, "--backbone-lr")) { if (train_number(a, next, 0, 0.999, 0, &o->backbone_lr)) return 2; i++; }
        else if (!strcmp(a, "--weight-decay")) { if (train_number(a, next, 0, 0.999, 0, &o->weight_decay)) return 2; i++; }
        else if (!strcmp(a, "--warmup")) { if (train_number(a, next, 0, 1, 0, &o->warmup)) return 2; i++; }
        else if (!strcmp(a, "--decay")) { if (train_number(a, next, 0, 1, 0, &o->decay)) return 2; i++; }
        else if (!strcmp(a, "--clip")) { if (train_number(a, next, 1e-6, 1e9, 0, &o->clip)) return 2; i++; }
        else if (!strcmp(a, "--seed")) { if (train_number(a, next, 0, 9007199254740992.0, 1, &v)) return 2; o->seed = (unsigned long long)v; i++; }
        else if (!strcmp(a, "--max-steps")) { if (train_number(a, next, 0, 1e9, 1, &v)) return 2; o->max_steps = (int)v; i++; }
        else if (!strcmp(a, "--save-every")) { if (train_number(a, next, 0, 1e9, 1, &v)) return 2; o->save_every = (int)v; i++; }
        else if (!strcmp(a, "--cache-mib")) { if (train_number(a, next, 0, 1e7, 1, &v)) return 2; o->cache_mib = (long)v; i++; }
        else if (!strcmp(a, "--threads")) { if (train_number(a, next, 1, 1024, 1, &v)) return 2; o->threads = (int)v; i++; }
        else if (!strcmp(a, "--freeze-backbone")) o->backbone = 0;
        else if (!strcmp(a, "--train-backbone")) o->backbone = 1;
        else if (!strcmp(a, "--train-embeddings")) o->embeddings = 1;
        else if (!strcmp(a, "--no-warmup-quirk")) o->warmup_quirk = 0;
        else if (!strcmp(a, "--resume")) o->resume = 1;
        else if (!strcmp(a, "-q")) o->quiet = 1;
        else { fprintf(stderr, "loupe train: unknown option %s (see loupe train -h)\n", a); return 2; }
    }
    if (o->stage < 0 || !o->model || !o->train || !o->out) {
        fprintf(stderr, "loupe train: --stage, -m, --train and -o are required (see loupe train -h)\n");
        return 2;
    }
    if (strlen(o->out) + 16 > PATH_MAX_LEN) { fprintf(stderr, "loupe train: -o %s: path too long\n", o->out); return 2; }
    if (o->batch < 0) o->batch = o->stage == LOUPE_TRAIN_CLS ? 48 : o->stage == LOUPE_TRAIN_SEG ? 40 : 32;
    if (o->accum < 0) o->accum = o->stage == LOUPE_TRAIN_CLS ? 8 : 3;
    return 0;
}

/* A splitmix64 draw: the data order's and the dithering streams' seeds. */
static uint64_t train_mix(uint64_t z)
{
    z += SEG_SPLITMIX_GOLDEN;
    z = (z ^ (z >> 30)) * SEG_SPLITMIX_MUL1;
    z = (z ^ (z >> 27)) * SEG_SPLITMIX_MUL2;
    return z ^ (z >> 31);
}

/* The order of epoch e: a Fisher-Yates shuffle driven by splitmix64(seed, e). */
static void train_order(int *order, int n, unsigned long long seed, int64_t epoch)
{
    uint64_t state = train_mix(seed ^ train_mix((uint64_t)epoch + 0x5eedull));
    int i;
    for (i = 0; i < n; i++) order[i] = i;
    for (i = n - 1; i > 0; i--) {
        int j, tmp;
        state = train_mix(state);
        j = (int)(state % (uint64_t)(i + 1));
        tmp = order[i]; order[i] = order[j]; order[j] = tmp;
    }
}

/* FNV-1a over bytes. */
static uint64_t train_hash(uint64_t h, const void *p, size_t n)
{
    const unsigned char *c = (const unsigned char *)p;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ c[i]) * 0x100000001B3ull;
    return h;
}

/* Kept outputs of a frozen backbone, per dataset entry: in memory up to a limit, the
 * rest in a file of slots [pixel hash (8 bytes)][floats], whose header names the model
 * (a hash of its backbone tensors) so a stale file is never read. */
#define FEATURE_MAGIC "LOUPEFEA"
typedef struct feature_cache {
    size_t floats;                    /* per entry */
    int n, in_memory;                 /* entries; how many live in memory */
    float **mem;                      /* [in_memory] */
    uint64_t *hash;                   /* [n] pixel hash of each kept entry (0: none) */
    unsigned char *have;              /* [n] */
    FILE *file;
    char path[PATH_MAX_LEN];
    uint64_t model;
    long hits, misses;
} feature_cache;

static uint64_t model_backbone_hash(const loupe_model *m)
{
    uint64_t h = 0xCBF29CE484222325ull;
    int i;
    for (i = 0; i < m->n_entries; i++) {
        const tensor_entry *e = &m->entries[i];
        if (e->name_len < 9 || memcmp(e->name, "backbone.", 9)) continue;
        h = train_hash(h, e->name, (size_t)e->name_len);
        h = train_hash(h, m->data + e->offset, (size_t)e->nbytes);
    }
    return h;
}

static int feature_cache_open(feature_cache *fc, const loupe_model *m, size_t floats, int n, long mib, const char *out)
{
    size_t slot = floats * sizeof(float);
    memset(fc, 0, sizeof *fc);
    fc->floats = floats;
    fc->n = n;
    if (!floats) return 0;
    fc->in_memory = (int)((double)mib * 1048576.0 / (double)slot) < n ? (int)((double)mib * 1048576.0 / (double)slot) : n;
    fc->mem = calloc((size_t)fc->in_memory + 1, sizeof *fc->mem);
    fc->hash = calloc((size_t)n, sizeof *fc->hash);
    fc->have = calloc((size_t)n, 1);
    if (!fc->mem || !fc->hash || !fc->have) return -1;
    if (fc->in_memory < n) {
        unsigned char hdr[24];
        fc->model = model_backbone_hash(m);
        snprintf(fc->path, sizeof fc->path, "%s.features", out);
        fc->file = fopen(fc->path, "w+b");
        if (!fc->file) { fprintf(stderr, "loupe train: cannot create %s: %s\n", fc->path, strerror(errno)); return -1; }
        memcpy(hdr, FEATURE_MAGIC, 8);
        memcpy(hdr + 8, &fc->model, 8);
        memcpy(hdr + 16, &floats, sizeof floats < 8 ? sizeof floats : 8);
        if (fwrite(hdr, 1, 24, fc->file) != 24) { fprintf(stderr, "loupe train: cannot write %s\n", fc->path); return -1; }
    }
    return 0;
}

static void feature_cache_close(feature_cache *fc)
{
    int i;
    if (fc->mem)
        for (i = 0; i < fc->in_memory; i++) free(fc->mem[i]);
    free(fc->mem);
    free(fc->hash);
    free(fc->have);
    if (fc->file) { fclose(fc->file); remove(fc->path); }
    memset(fc, 0, sizeof *fc);
}

/* The kept outputs of entry i into buf when they exist and came from these pixels. */
static int feature_cache_get(feature_cache *fc, int i, uint64_t pixels, float *buf)
{
    if (!fc->floats || !fc->have[i] || fc->hash[i] != pixels) return 0;
    if (i < fc->in_memory) memcpy(buf, fc->mem[i], fc->floats * sizeof *buf);
    else {
        uint64_t stored;
        long long off = 24 + (long long)(i - fc->in_memory) * (long long)(8 + fc->floats * sizeof(float));
        if (fseek(fc->file, (long)off, SEEK_SET) != 0 || fread(&stored, 8, 1, fc->file) != 1 || stored != pixels ||
            fread(buf, sizeof *buf, fc->floats, fc->file) != fc->floats)
            return 0;
    }
    fc->hits++;
    return 1;
}

static void feature_cache_put(feature_cache *fc, int i, uint64_t pixels, const float *buf)
{
    fc->misses++;
    if (!fc->floats) return;
    if (i < fc->in_memory) {
        if (!fc->mem[i] && !(fc->mem[i] = malloc(fc->floats * sizeof *buf))) return;
        memcpy(fc->mem[i], buf, fc->floats * sizeof *buf);
    } else {
        long long off = 24 + (long long)(i - fc->in_memory) * (long long)(8 + fc->floats * sizeof(float));
        if (fseek(fc->file, (long)off, SEEK_SET) != 0 || fwrite(&pixels, 8, 1, fc->file) != 1 ||
            fwrite(buf, sizeof *buf, fc->floats, fc->file) != fc->floats)
            return;
    }
    fc->hash[i] = pixels;
    fc->have[i] = 1;
}

/* Buffers of one batch. */
typedef struct train_batch {
    loupe_example *ex;
    float *pixels, *masks, *patches, *features;
} train_batch;

/* Loads and prepares dataset entry idx into slot b (dithering from a stream that depends
 * only on the seed, the epoch and the entry, so a resumed run draws the same). */
static int train_load(const loupe_model *m, loupe_trainer *t, const loupe_dataset *d, int idx, int64_t epoch,
                      unsigned long long seed, feature_cache *fc, train_batch *tb, int b, char *err, size_t errsize)
{
    const loupe_config *c = loupe_model_config(m);
    size_t S2 = (size_t)c->image_size * c->image_size, g2 = (size_t)c->grid * c->grid;
    loupe_image img, mask;
    loupe_splitmix st;
    loupe_uniform u;
    loupe_example *ex = &tb->ex[b];
    int rc, n_targets = 0;
    memset(&img, 0, sizeof img);
    memset(&mask, 0, sizeof mask);
    st.seed = train_mix(seed ^ train_mix(((uint64_t)epoch << 32) ^ (uint64_t)idx ^ 0xd17eull));
    st.counter = 0;
    u.fill = loupe_splitmix_fill;
    u.state = &st;
    if (loupe_dataset_load(d, idx, &img, &mask, err, errsize)) return -1;
    ex->pixel_values = tb->pixels + (size_t)b * 3 * S2;
    ex->mask_labels = tb->masks + (size_t)b * S2;
    ex->patch_labels = tb->patches + (size_t)b * g2;
    rc = loupe_prepare_example(m, &img, mask.rgb ? &mask : NULL, &u, (float *)ex->pixel_values, (float *)ex->mask_labels,
                               &n_targets, (float *)ex->patch_labels, err, errsize);
    ex->n_targets = n_targets;
    ex->label = mask.rgb != NULL;
    loupe_image_free(&img);
    loupe_image_free(&mask);
    if (rc) return -1;
    ex->features = NULL;
    if (fc->floats) {
        float *f = tb->features + (size_t)b * fc->floats;
        uint64_t h = train_hash(0xCBF29CE484222325ull, ex->pixel_values, 3 * S2 * sizeof(float));
        if (!feature_cache_get(fc, idx, h, f)) {
            if (loupe_trainer_features(t, ex->pixel_values, f, err, errsize)) return -1;
            feature_cache_put(fc, idx, h, f);
        }
        ex->features = f;
    }
    return 0;
}

/* OUT.bin, OUT.last.bin, OUT.state, written atomically. */
static void train_paths(const char *out, char *last, char *state)
{
    size_t n = strlen(out);
    if (n > 4 && !strcmp(out + n - 4, ".bin")) n -= 4;
    snprintf(last, PATH_MAX_LEN, "%.*s.last.bin", (int)n, out);
    snprintf(state, PATH_MAX_LEN, "%.*s.state", (int)n, out);
}

/* The monitored metric of a stage (upstream's configs/ckpt: auc, iou, overall). */
static double train_monitored(int stage, const loupe_metrics *mt)
{
    return stage == LOUPE_TRAIN_CLS ? mt->auc : stage == LOUPE_TRAIN_SEG ? mt->iou : mt->overall;
}

static int cli_train(int argc, char **argv)
{
    train_cli o;
    loupe_train_options to;
    loupe_model *m = NULL;
    loupe_trainer *t = NULL;
    loupe_session *vs = NULL;
    loupe_dataset *train = NULL, *valid = NULL;
    feature_cache fc;
    train_batch tb;
    train_progress pr;
    char err[512], last[PATH_MAX_LEN], state[PATH_MAX_LEN];
    int rc, status = 1, n, n_batches, steps_per_epoch, total_steps, *order = NULL, b;
    double t0, images_done = 0.0;
    const char *monitored_name;
    memset(&fc, 0, sizeof fc);
    memset(&tb, 0, sizeof tb);
    rc = train_parse(argc, argv, &o);
    if (rc) return rc == 1 ? 0 : 2;
    if (o.threads) loupe_set_threads(o.threads);
    train_paths(o.out, last, state);
    monitored_name = o.stage == LOUPE_TRAIN_CLS ? "auc" : o.stage == LOUPE_TRAIN_SEG ? "iou" : "overall";
    /* every input is checked before any compute */
    if (!(train = loupe_dataset_open(o.train, LOUPE_DEFAULT_MAX_PIXELS, err, sizeof err)) ||
        (o.valid && !(valid = loupe_dataset_open(o.valid, LOUPE_DEFAULT_MAX_PIXELS, err, sizeof err)))) {
        fprintf(stderr, "loupe train: %s\n", err);
        goto done;
    }
    if (!(m = loupe_model_load(o.resume ? last : o.model, err, sizeof err))) {
        fprintf(stderr, "loupe train: %s\n", err);
        goto done;
    }
    loupe_train_default_options(&to, o.stage);
    if (o.lr >= 0.0) to.lr = o.lr;
    if (o.backbone_lr >= 0.0) to.backbone_lr = o.backbone_lr;
    if (o.weight_decay >= 0.0) to.weight_decay = o.weight_decay;
    if (o.backbone >= 0) to.train_backbone = o.backbone;
    to.train_embeddings = o.embeddings;
    to.clip_norm = o.clip;
    to.seed = o.seed;
    if (!(t = loupe_trainer_new(m, &to, err, sizeof err))) { fprintf(stderr, "loupe train: %s\n", err); goto done; }
    memset(&pr, 0, sizeof pr);
    pr.best = -1.0;
    if (o.resume && loupe_trainer_load_state(t, state, &pr, sizeof pr, err, sizeof err)) {
        fprintf(stderr, "loupe train: --resume: %s\n", err);
        goto done;
    }
    n = loupe_dataset_count(train);
    n_batches = (n + o.batch - 1) / o.batch;
    steps_per_epoch = (n_batches + o.accum - 1) / o.accum;
    total_steps = steps_per_epoch * o.epochs;
    {
        const loupe_config *c = loupe_model_config(m);
        size_t S2 = (size_t)c->image_size * c->image_size, g2 = (size_t)c->grid * c->grid;
        size_t ff = loupe_trainer_feature_floats(t);
        tb.ex = calloc((size_t)o.batch, sizeof *tb.ex);
        tb.pixels = malloc((size_t)o.batch * 3 * S2 * sizeof(float));
        tb.masks = malloc((size_t)o.batch * S2 * sizeof(float));
        tb.patches = malloc((size_t)o.batch * g2 * sizeof(float));
        tb.features = ff ? malloc((size_t)o.batch * ff * sizeof(float)) : NULL;
        order = malloc((size_t)n * sizeof *order);
        if (!tb.ex || !tb.pixels || !tb.masks || !tb.patches || (ff && !tb.features) || !order ||
            feature_cache_open(&fc, m, ff, n, o.cache_mib, o.out)) {
            fprintf(stderr, "loupe train: out of memory\n");
            goto done;
        }
    }
    if (valid && !(vs = loupe_session_new(m, err, sizeof err))) { fprintf(stderr, "loupe train: %s\n", err); goto done; }
    if (vs) loupe_session_use_tta(vs, t, NULL, 0);
    if (!o.quiet) {
        int tensors, forged = 0;
        size_t values;
        const char *img, *msk;
        for (b = 0; b < n; b++) forged += loupe_dataset_entry(train, b, &img, &msk) == 0 && msk != NULL;
        loupe_trainer_size(t, &tensors, &values);
        fprintf(stderr, "loupe train: stage %s, %d images (%d forged), %d epochs of %d steps (%d batches of %d "
                "images each); %d tensors (%.2f M values) train%s\n",
                o.stage == LOUPE_TRAIN_CLS ? "cls" : o.stage == LOUPE_TRAIN_SEG ? "seg" : "cls_seg", n, forged, o.epochs,
                steps_per_epoch, o.accum, o.batch, tensors, values / 1e6,
                loupe_trainer_feature_floats(t) ? "; the frozen backbone's outputs are kept" : "");
        if (o.resume)
            fprintf(stderr, "loupe train: resuming at epoch %lld, batch %lld, step %lld\n", (long long)pr.epoch + 1,
                    (long long)pr.batch, (long long)pr.step);
    }
    t0 = now_seconds();
    while (pr.epoch < o.epochs && !(o.max_steps && pr.step >= o.max_steps)) {
        int in_step = 0;
        loupe_train_loss sum;
        memset(&sum, 0, sizeof sum);
        train_order(order, n, o.seed, pr.epoch);
        for (; pr.batch < n_batches; pr.batch++) {
            int first = (int)pr.batch * o.batch, count = n - first < o.batch ? n - first : o.batch;
            loupe_train_loss l;
            for (b = 0; b < count; b++)
                if (train_load(m, t, train, order[first + b], pr.epoch, o.seed, &fc, &tb, b, err, sizeof err)) {
                    fprintf(stderr, "loupe train: %s\n", err);
                    goto done;
                }
            if (loupe_trainer_accumulate(t, tb.ex, count, 1.0 / o.accum, &l, err, sizeof err)) {
                fprintf(stderr, "loupe train: %s\n", err);
                goto done;
            }
            images_done += count;
            sum.total += l.total / o.accum; sum.cls += l.cls / o.accum; sum.seg += l.seg / o.accum;
            in_step++;
            if (in_step == o.accum || pr.batch == n_batches - 1) {
                /* upstream's LambdaLR: step s uses factor(s), s = 0 first (lr 0 there) */
                long s = (long)pr.step + (o.warmup_quirk ? 0 : 1);
                double factor = loupe_lr_factor(o.schedule, s, (double)total_steps, o.warmup * total_steps,
                                                o.decay * total_steps), norm = 0.0;
                if (loupe_trainer_update(t, factor, &norm, err, sizeof err)) {
                    fprintf(stderr, "loupe train: step %lld: %s\n", (long long)pr.step + 1, err);
                    goto done;
                }
                pr.step++;
                if (!o.quiet) {
                    double el = now_seconds() - t0, rate = images_done / (el > 0 ? el : 1e-9);
                    double left = ((double)total_steps - (double)pr.step) * o.accum * o.batch / (rate > 0 ? rate : 1e-9);
                    fprintf(stderr, "step %lld/%d epoch %lld/%d loss %.5f (cls %.5f seg %.5f) grad-norm %.3g lr %.3g "
                            "%.2f img/s ETA %.0fs\n", (long long)pr.step, total_steps, (long long)pr.epoch + 1, o.epochs,
                            sum.total, sum.cls, sum.seg, norm, to.lr * factor, rate, left);
                }
                memset(&sum, 0, sizeof sum);
                in_step = 0;
                if (o.save_every && pr.step % o.save_every == 0 && pr.batch + 1 < n_batches) {
                    train_progress at = pr;
                    at.batch++;
                    if (loupe_trainer_save(t, last, err, sizeof err) ||
                        loupe_trainer_save_state(t, state, &at, sizeof at, err, sizeof err)) {
                        fprintf(stderr, "loupe train: %s\n", err);
                        goto done;
                    }
                }
                if (o.max_steps && pr.step >= o.max_steps) break;
            }
        }
        /* end of epoch (or of --max-steps): validation, the best and the last model, the state */
        {
            train_progress at = pr;
            int finished = pr.batch >= n_batches;
            if (finished) {
                at.epoch++;
                at.batch = 0;
            } else at.batch++;   /* stopped by --max-steps right after this batch's update */
            if (valid && finished) {
                loupe_metrics mt;
                double v;
                if (loupe_evaluate(vs, valid, o.seed, &mt, NULL, NULL, err, sizeof err)) {
                    fprintf(stderr, "loupe train: validation: %s\n", err);
                    goto done;
                }
                v = train_monitored(o.stage, &mt);
                if (!o.quiet)
                    fprintf(stderr, "epoch %lld valid: auc %.4f f1 %.4f iou %.4f overall %.4f accuracy %.4f (%lld images)\n",
                            (long long)pr.epoch + 1, mt.auc, mt.f1, mt.iou, mt.overall, mt.accuracy, mt.images);
                if (v == v && (!at.has_best || v > at.best)) {
                    at.best = v;
                    at.has_best = 1;
                    if (loupe_trainer_save(t, o.out, err, sizeof err)) { fprintf(stderr, "loupe train: %s\n", err); goto done; }
                    if (!o.quiet) fprintf(stderr, "best %s %.4f: wrote %s\n", monitored_name, v, o.out);
                }
            } else if (!valid && loupe_trainer_save(t, o.out, err, sizeof err)) {
                fprintf(stderr, "loupe train: %s\n", err);
                goto done;
            }
            if (loupe_trainer_save(t, last, err, sizeof err) ||
                loupe_trainer_save_state(t, state, &at, sizeof at, err, sizeof err)) {
                fprintf(stderr, "loupe train: %s\n", err);
                goto done;
            }
            pr = at;
        }
    }
    if (valid && !pr.has_best && loupe_trainer_save(t, o.out, err, sizeof err)) {
        fprintf(stderr, "loupe train: %s\n", err);
        goto done;
    }
    if (!o.quiet)
        fprintf(stderr, "loupe train: %lld steps in %.1f s; kept backbone outputs: %ld reused, %ld computed\n",
                (long long)pr.step, now_seconds() - t0, fc.hits, fc.misses);
    status = 0;
done:
    feature_cache_close(&fc);
    free(tb.ex); free(tb.pixels); free(tb.masks); free(tb.patches); free(tb.features);
    free(order);
    loupe_session_free(vs);
    loupe_trainer_free(t);
    loupe_model_free(m);
    loupe_dataset_free(train);
    loupe_dataset_free(valid);
    return status;
}

/* ---- `loupe init`: a randomly initialised weight file ---- */

static const char init_usage[] =
    "usage: loupe init --config CONFIG.json -o OUT.bin --seed S [--dtype f32|bf16|q8] [--backbone FILE.bin]\n"
    "                  [--highpass F]\n"
    "\n"
    "Writes a complete weight file for CONFIG (the config format of tools/convert.py; the\n"
    "header's hyperparameters are the ones convert.py writes for it), every tensor drawn\n"
    "as upstream Loupe's from-scratch construction draws it (LoupeModel(config) + post_init;\n"
    "rules in loupe.c, section 9), from a generator seeded by S (0 to 2^64-1): the same\n"
    "seed gives the same bytes on every platform.\n"
    "\n"
    "  --config FILE     the configuration (JSON), required\n"
    "  -o, --output FILE the weight file to write (through a temporary file, renamed when complete)\n"
    "  --seed S          the generator's seed, required\n"
    "  --dtype D         f32 (default), bf16 or q8: the storage of the weight matrices\n"
    "  --backbone FILE   copy every backbone.* tensor from this weight file (e.g. a converted\n"
    "                    PE-Core-L14-336) instead of drawing it; only the heads are drawn\n"
    "  --highpass F      not upstream: draw the share F (0 to 1) of the patch embedding's\n"
    "                    filters as high-pass filters (Laplacian of a random field: zero\n"
    "                    response to flat or linear patches), a stem that lets a backbone\n"
    "                    trained from nothing see noise, blur and seams (the demo model)\n"
    "  -h, --help        this text\n"
    "\n"
    "Exit status: 0 written, 1 when the config, the backbone or the output cannot be used,\n"
    "2 for a usage error. No output file is left behind on any error.\n";

static int cli_init(int argc, char **argv)
{
    const char *config = NULL, *out = NULL, *dtype = "f32", *backbone = NULL, *seed_arg = NULL, *highpass = NULL;
    unsigned long long seed = 0;
    loupe_init_options io;
    char err[512];
    int i;
    for (i = 2; i < argc; i += 2) { /* every option but -h takes one value */
        const char *a = argv[i], *next = i + 1 < argc ? argv[i + 1] : NULL;
        const char **slot = NULL;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(init_usage, stdout); return 0; }
        if (!strcmp(a, "--config")) slot = &config;
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) slot = &out;
        else if (!strcmp(a, "--seed")) slot = &seed_arg;
        else if (!strcmp(a, "--dtype")) slot = &dtype;
        else if (!strcmp(a, "--backbone")) slot = &backbone;
        else if (!strcmp(a, "--highpass")) slot = &highpass;
        else {
            fprintf(stderr, "loupe init: %s %s (see loupe init -h)\n", a[0] == '-' ? "unknown option" : "unexpected argument", a);
            return 2;
        }
        if (!next) { fprintf(stderr, "loupe init: %s needs a value (see loupe init -h)\n", a); return 2; }
        *slot = next;
    }
    if (!config) { fprintf(stderr, "loupe init: no config given: use --config CONFIG.json (see loupe init -h)\n"); return 2; }
    if (!out) { fprintf(stderr, "loupe init: no output given: use -o OUT.bin (see loupe init -h)\n"); return 2; }
    if (!seed_arg) { fprintf(stderr, "loupe init: no seed given: use --seed S (see loupe init -h)\n"); return 2; }
    {
        const char *p = seed_arg;
        int digits = 0;
        for (; *p >= '0' && *p <= '9'; p++, digits++) {
            unsigned d = (unsigned)(*p - '0');
            if (seed > (ULLONG_MAX - d) / 10) break;
            seed = seed * 10 + d;
        }
        if (*p || !digits) {
            fprintf(stderr, "loupe init: --seed must be an integer from 0 to 18446744073709551615 (got %s)\n", seed_arg);
            return 2;
        }
    }
    if (strcmp(dtype, "f32") && strcmp(dtype, "bf16") && strcmp(dtype, "q8")) {
        fprintf(stderr, "loupe init: --dtype must be f32, bf16 or q8 (got %s)\n", dtype);
        return 2;
    }
    memset(&io, 0, sizeof io);
    if (highpass) {
        char *end;
        io.highpass = strtod(highpass, &end);
        if (end == highpass || *end || !(io.highpass >= 0.0 && io.highpass <= 1.0)) {
            fprintf(stderr, "loupe init: --highpass must be a number from 0 to 1 (got %s)\n", highpass);
            return 2;
        }
    }
    io.seed = seed;
    io.dtype = dtype;
    io.backbone_path = backbone;
    if (loupe_init_weights_with(config, out, &io, err, sizeof err)) {
        fprintf(stderr, "loupe init: %s\n", err);
        return 1;
    }
    fprintf(stderr, "loupe init: wrote %s (seed %llu%s%s)\n", out, seed, backbone ? ", backbone from " : "",
            backbone ? backbone : "");
    return 0;
}

int main(int argc, char **argv)
{
    cli_options o;
    char err[512], path[PATH_MAX_LEN];
    loupe_model *m = NULL;
    loupe_session *s = NULL;
    loupe_trainer *adapter = NULL;
    cli_loader loader;
    float *pixels = NULL;
    char *pred = NULL;
    unsigned char *clash = NULL;
    size_t pred_len = 0, pred_cap = 0;
    int status = 0, i, rc;
    cli_times tm;
    double t_run = now_seconds(), t;
    long minor, major;
    if (argc > 1 && !strcmp(argv[1], "eval")) return cli_eval(argc - 1, argv + 1);
    if (argc > 1 && !strcmp(argv[1], "train")) return cli_train(argc - 1, argv + 1);
    if (argc > 1 && !strcmp(argv[1], "init")) return cli_init(argc, argv);
    memset(&o, 0, sizeof o);
    memset(&tm, 0, sizeof tm);
    rc = cli_parse(argc, argv, &o);
    if (rc) { status = rc == 1 ? 0 : 2; goto done; }
    if (o.threads) loupe_set_threads(o.threads);
    t = now_seconds();
    if (!(m = loupe_model_load(o.model, err, sizeof err)) || !(s = loupe_session_new(m, err, sizeof err))) {
        fprintf(stderr, "loupe: %s\n", err);
        status = 1;
        goto done;
    }
    cli_lap(&t, &tm.load);
    pixels = malloc(3 * sizeof *pixels * (size_t)loupe_model_config(m)->image_size * loupe_model_config(m)->image_size);
    clash = cli_stem_clashes(o.inputs, o.n_inputs);
    if (!pixels || !clash) { fprintf(stderr, "loupe: out of memory\n"); status = 1; goto done; }
    if (o.outdir) {
        snprintf(path, sizeof path, "%s/masks", o.outdir);
        if (cli_mkdir(o.outdir) || cli_mkdir(path)) { status = 1; goto done; }
        snprintf(path, sizeof path, "%s/overlays", o.outdir);
        if (o.overlay && cli_mkdir(path)) { status = 1; goto done; }
    }
    loader.o = &o;
    loader.m = m;
    if (cli_tta_run(&o.tta, m, s, o.n_inputs, cli_load_image, &loader, o.quiet, &adapter)) { status = 1; goto done; }
    for (i = 0; i < o.n_inputs; i++) {
        double t0 = now_seconds();
        if (cli_image(&o, m, s, o.inputs[i], clash[i], pixels, &pred, &pred_len, &pred_cap, &tm)) status = 1;
        if (!o.quiet && o.n_inputs > 1)
            fprintf(stderr, "[%d/%d] %s %.0f ms\n", i + 1, o.n_inputs, o.inputs[i], 1000.0 * (now_seconds() - t0));
    }
    if (o.outdir) {
        t = now_seconds();
        snprintf(path, sizeof path, "%s/predictions.txt", o.outdir);
        if (cli_write_atomic(path, pred ? pred : "", pred_len)) status = 1;
        cli_lap(&t, &tm.write);
    }
    if (o.verbose) {
        cli_page_faults(&minor, &major);
        fprintf(stderr, "loupe: %d image%s: load %.0f ms, decode %.0f ms, preprocess %.0f ms, forward %.0f ms, "
                "post-process %.0f ms, write %.0f ms; total %.0f ms, %ld minor and %ld major page faults\n",
                o.n_inputs, o.n_inputs == 1 ? "" : "s", 1e3 * tm.load, 1e3 * tm.decode, 1e3 * tm.preprocess,
                1e3 * tm.forward, 1e3 * tm.post, 1e3 * tm.write, 1e3 * (now_seconds() - t_run), minor, major);
    }
done:
    for (i = 0; i < o.n_inputs; i++) free(o.inputs[i]);
    free(o.inputs);
    free(pred);
    free(clash);
    free(pixels);
    loupe_session_free(s);
    loupe_tta_free(adapter);
    loupe_model_free(m);
    return status;
}
#endif /* LOUPE_NO_MAIN */
