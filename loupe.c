/* loupe.c - Loupe (arXiv 2506.16819) forgery detection and localization in C99.
 *
 * One file, read top to bottom:
 *   1. utilities            errors, the activation arena, threads
 *   2. image I/O            (PNG, JPEG, PPM decoders, PIL-exact resize, PNG writer)
 *   3. weights              the versioned flat weight file, mmap, validation, binding
 *   4. kernels              matmul, norms, activations, attention, convolutions, sampling
 *   5. backbone             Perception Encoder ViT (PE-Core-L14-336)
 *   6. classifier           global MLP, patch MLP, fuser
 *   7. segmentor            feature pyramid, Mask2Former pixel decoder, masked-attention decoder
 *   8. post-processing      mask logits to a probability map and a binary mask
 *   9. test-time adaptation pseudo-label loss, the segmentor's backward pass, AdamW
 *  10. CLI                  the `loupe` command
 *
 * Tensors are float32 and row-major. Token sequences are [tokens][channels]; feature
 * maps are stored channels-last, [H*W][C], so that every 1x1 convolution and every
 * linear layer is the same matrix multiplication. Each model function is named after
 * the upstream PyTorch module it implements (Kamichanw/Loupe, transformers' Mask2Former).
 */
#define _POSIX_C_SOURCE 200809L
#include "loupe.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define LOUPE_HAVE_MMAP 1
#else
#define LOUPE_HAVE_MMAP 0
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

/* Allocates size bytes aligned to ARENA_ALIGN; *raw receives the pointer to free. */
static void *aligned_block(size_t size, void **raw)
{
    unsigned char *p = malloc(size + ARENA_ALIGN);
    *raw = p;
    if (!p) return NULL;
    return p + (ARENA_ALIGN - (uintptr_t)p % ARENA_ALIGN) % ARENA_ALIGN;
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

/* Index of the calling thread inside a parallel region (0 without OpenMP). */
static int thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
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
/* 3. Weights: the flat weight file                                           */
/* ========================================================================== */
/* Layout (little-endian; tools/convert.py writes it, README "Weight file format"):
 *   64-byte header: magic "LOUPEWTS", u32 version, u32 n_hparams, u32 n_tensors,
 *                   u32 reserved, u64 data_offset, u64 file_size, 24 reserved bytes
 *   n_hparams x 48 bytes: char name[40] (NUL-padded), f64 value
 *   n_tensors index records: u16 name_len, u8 dtype, u8 ndim, name, u32 dims[ndim],
 *                            u64 offset, u64 nbytes
 *   tensor data, each tensor 64-byte aligned.                                  */

#define WEIGHTS_MAGIC "LOUPEWTS"
#define WEIGHTS_MAGIC_LEN 8
#define WEIGHTS_VERSION 1
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

typedef struct tensor_entry {
    const char *name; /* points into the mapped index, not NUL-terminated */
    int name_len, dtype, ndim;
    uint32_t dims[MAX_TENSOR_DIMS];
    uint64_t offset, nbytes;
} tensor_entry;

/* nn.Linear (weight [out][in], bias [out] or NULL) and norm (weight, bias) views. */
typedef struct linear_w { const float *w, *b; } linear_w;
typedef struct norm_w { const float *w, *b; } norm_w;

/* backbone.transformer.resblocks[i] */
typedef struct pe_block_w { norm_w ln_1, ln_2; linear_w qkv, out, fc, proj; } pe_block_w;
/* backbone.attn_pool */
typedef struct pe_pool_w { const float *probe; linear_w qkv, out; norm_w ln; linear_w fc, proj; } pe_pool_w;
/* classifier.{classifier,patch_classifier} */
typedef struct cls_head_w { linear_w layers[MAX_CLS_LAYERS]; } cls_head_w;
/* segmentor.fpn.scale_layers[i][j]: conv1 is NULL for the max-pool block;
 * convt holds conv1 repacked [2][2][Cout][Cin], dw holds conv2 repacked [9][C]. */
typedef struct scale_block_w { linear_w conv1; const float *convt, *dw; norm_w norm; } scale_block_w;
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
    const float *class_embedding, *positional_embedding, *conv1;
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
    unsigned char *data; /* the whole file: mapped or read */
    size_t size;
    int mapped;
    tensor_entry *entries;
    int n_entries;
    loupe_weights w;
    loupe_tables t;
    void *derived_raw; /* one block for repacked weights and tables */
    char path[512];
};

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

/* Maps (or reads) the whole file into memory. */
static int weights_map_file(loupe_model *m, const char *path, char *err, size_t errsize)
{
    FILE *f = fopen(path, "rb");
    if (!f) return fail(err, errsize, "%s: cannot open weight file: %s", path, strerror(errno));
#if LOUPE_HAVE_MMAP
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
            void *p = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE, fileno(f), 0);
            if (p != MAP_FAILED) {
                m->data = p;
                m->mapped = 1;
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
        m->mapped = 0;
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

    if (m->size < WEIGHTS_HEADER_BYTES || memcmp(d, WEIGHTS_MAGIC, WEIGHTS_MAGIC_LEN) != 0)
        return fail(err, errsize, "%s: not a loupe weight file (bad magic; convert checkpoints with tools/convert.py)", path);
    version = rd_u32(d + 8);
    if (version == 0 || version > WEIGHTS_VERSION)
        return fail(err, errsize, "%s: weight file format version %u is not supported (this build reads version %d)",
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
        if (e->dtype != DTYPE_Q8 && e->nbytes != numel * dtype_sizes[e->dtype])
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

/* Returns the F32 tensor called name (printf format) if its shape is exactly
 * d0..d3 (trailing zeros = fewer dimensions), or NULL after recording an error. */
static const float *bind(binder *b, int d0, int d1, int d2, int d3, const char *fmt, ...)
{
    char name[256], want[96], got[96];
    const int dims[MAX_TENSOR_DIMS] = {d0, d1, d2, d3};
    int ndim = d3 ? 4 : d2 ? 3 : d1 ? 2 : 1, i, k;
    va_list ap;
    if (b->failed) return NULL;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
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
        if (e->dtype != DTYPE_F32) {
            b->failed = 1;
            fail(b->err, b->errsize, "%s: tensor %s is %s; this build reads F32 tensors only", b->m->path, name,
                 dtype_names[e->dtype]);
            return NULL;
        }
        return (const float *)(const void *)(b->m->data + e->offset);
    }
    b->failed = 1;
    fail(b->err, b->errsize, "%s: tensor %s is missing", b->m->path, name);
    return NULL;
}

/* Shorthands: a linear layer (weight [out][in], optional bias [out]) and a norm. */
static linear_w bind_linear(binder *b, int out, int in, int has_bias, const char *prefix)
{
    linear_w l;
    l.w = bind(b, out, in, 0, 0, "%s.weight", prefix);
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
    qkv->w = bind(b, 3 * e, e, 0, 0, "%s.in_proj_weight", prefix);
    qkv->b = bind(b, 3 * e, 0, 0, 0, "%s.in_proj_bias", prefix);
    snprintf(name, sizeof name, "%s.out_proj", prefix);
    *out = bind_linear(b, e, e, 1, name);
}

/* A 1x1 convolution viewed as a linear layer: weight [out][in][1][1]. */
static linear_w bind_conv1x1(binder *b, int out, int in, int has_bias, const char *prefix)
{
    linear_w l;
    l.w = bind(b, out, in, 1, 1, "%s.weight", prefix);
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

/* Repacks a ConvTranspose2d kernel [Ci][Co][2][2] into [2][2][Co][Ci]. */
static void repack_convt(float *dst, const float *src, int ci, int co)
{
    int i, o, t;
    for (t = 0; t < 4; t++)
        for (o = 0; o < co; o++)
            for (i = 0; i < ci; i++) dst[((size_t)t * co + o) * ci + i] = src[((size_t)i * co + o) * 4 + t];
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
        s->conv1.w = bind(b, w, w, 2, 2, "%s.conv1.weight", prefix);
        s->conv1.b = bind(b, w, 0, 0, 0, "%s.conv1.bias", prefix);
    } else {
        s->conv1.w = s->conv1.b = NULL;
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
    const float *raw_dw[4], *raw_layer_1;
    size_t rope_n, tok_n, derived_floats, off = 0;
    float *dv;

    b.m = m; b.err = err; b.errsize = errsize; b.failed = 0;
    /* backbone (VisionTransformer) */
    w->class_embedding = bind(&b, W, 0, 0, 0, "backbone.class_embedding");
    w->positional_embedding = bind(&b, 1 + g * g, W, 0, 0, "backbone.positional_embedding");
    w->conv1 = bind(&b, W, 3, c->patch_size, c->patch_size, "backbone.conv1.weight");
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
    raw_layer_1 = bind(&b, F, F, 3, 3, "segmentor.pixel_decoder.layer_1.0.weight");
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

    /* Derived, read-only: repacked kernels and constant tables, one block. */
    level_sizes(c, &m->t);
    rope_n = (size_t)(1 + g * g) * (size_t)(W / c->heads);
    tok_n = (size_t)m->t.tokens * (size_t)F;
    derived_floats = 3 * 4 * (size_t)W * W + 4 * 9 * (size_t)W + 9 * (size_t)F * F + 2 * rope_n + 2 * tok_n + 2 * (size_t)m->t.tokens;
    dv = aligned_block(derived_floats * sizeof(float), &m->derived_raw);
    if (!dv) return fail(err, errsize, "%s: out of memory", m->path);
    {
        scale_block_w *blocks[4];
        blocks[0] = &w->fpn4[0]; blocks[1] = &w->fpn4[1]; blocks[2] = &w->fpn2; blocks[3] = &w->fpn_half;
        for (k = 0; k < 4; k++) {
            repack_depthwise(dv + off, raw_dw[k], W);
            blocks[k]->dw = dv + off;
            off += 9 * (size_t)W;
            if (blocks[k]->conv1.w) {
                repack_convt(dv + off, blocks[k]->conv1.w, W, W);
                blocks[k]->convt = dv + off;
                off += 4 * (size_t)W * W;
            }
        }
    }
    repack_conv3x3(dv + off, raw_layer_1, F, F);
    w->layer_1 = dv + off; off += 9 * (size_t)F * F;
    m->t.rope_cos = dv + off; off += rope_n;
    m->t.rope_sin = dv + off; off += rope_n;
    m->t.enc_pos = dv + off; off += tok_n;
    m->t.dec_pos = dv + off; off += tok_n;
    m->t.ref_points = dv + off;
    tables_fill(m, w->level_embed);
    return 0;
}

loupe_model *loupe_model_load(const char *path, char *err, size_t errsize)
{
    loupe_model *m;
    if (!path) { fail(err, errsize, "no weight file given"); return NULL; }
    if (!host_is_little_endian()) { fail(err, errsize, "%s: big-endian hosts are not supported", path); return NULL; }
    m = calloc(1, sizeof *m);
    if (!m) { fail(err, errsize, "%s: out of memory", path); return NULL; }
    snprintf(m->path, sizeof m->path, "%s", path);
    if (weights_map_file(m, path, err, errsize) || weights_parse(m, err, errsize) ||
        weights_config(m, err, errsize) || weights_bind(m, err, errsize)) {
        loupe_model_free(m);
        return NULL;
    }
    return m;
}

const loupe_config *loupe_model_config(const loupe_model *m) { return &m->cfg; }

void loupe_model_free(loupe_model *m)
{
    if (!m) return;
#if LOUPE_HAVE_MMAP
    if (m->mapped) munmap(m->data, m->size);
    else free(m->data);
#else
    free(m->data);
#endif
    free(m->entries);
    free(m->w.blocks);
    free(m->w.enc);
    free(m->w.dec);
    free(m->derived_raw);
    free(m);
}

/* ========================================================================== */
/* 4. Kernels                                                                 */
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

/* Register tile of the matmul: GEMM_MR rows of A times GEMM_NR rows of B, each dot
 * product kept in GEMM_LANES independent partial sums so that it vectorises. */
#define GEMM_MR 4
#define GEMM_NR 4
#define GEMM_LANES 8

/* One tile of gemm_nt: mr <= GEMM_MR rows, nr <= GEMM_NR columns. */
static void gemm_nt_tile(int mr, int nr, int K, const float *A, int lda, const float *B, int ldb,
                         const float *bias, float *C, int ldc, int accumulate)
{
    const float *a[GEMM_MR], *b[GEMM_NR];
    float acc[GEMM_MR][GEMM_NR][GEMM_LANES];
    int i, j, l, k;
    for (i = 0; i < GEMM_MR; i++) a[i] = A + (size_t)(i < mr ? i : mr - 1) * lda;
    for (j = 0; j < GEMM_NR; j++) b[j] = B + (size_t)(j < nr ? j : nr - 1) * ldb;
    memset(acc, 0, sizeof acc);
    for (k = 0; k + GEMM_LANES <= K; k += GEMM_LANES)
        for (i = 0; i < GEMM_MR; i++)
            for (j = 0; j < GEMM_NR; j++)
                for (l = 0; l < GEMM_LANES; l++) acc[i][j][l] += a[i][k + l] * b[j][k + l];
    for (i = 0; i < mr; i++)
        for (j = 0; j < nr; j++) {
            float s = 0.0f;
            int kk;
            for (l = 0; l < GEMM_LANES; l++) s += acc[i][j][l];
            for (kk = k; kk < K; kk++) s += a[i][kk] * b[j][kk];
            if (bias) s += bias[j];
            if (accumulate) C[(size_t)i * ldc + j] += s;
            else C[(size_t)i * ldc + j] = s;
        }
}

/* C[M][N] (+)= A[M][K] B[N][K]^T (+ bias[N]): B is a PyTorch weight [out][in]. */
static void gemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb, const float *bias,
                    float *C, int ldc, int accumulate)
{
    int mb = (M + GEMM_MR - 1) / GEMM_MR, nb = (N + GEMM_NR - 1) / GEMM_NR, jb, ib;
#ifdef _OPENMP
#pragma omp parallel for collapse(2) schedule(static) if (parallel_ok((double)M * N * K))
#endif
    for (jb = 0; jb < nb; jb++)
        for (ib = 0; ib < mb; ib++) {
            int i0 = ib * GEMM_MR, j0 = jb * GEMM_NR;
            int mr = M - i0 < GEMM_MR ? M - i0 : GEMM_MR, nr = N - j0 < GEMM_NR ? N - j0 : GEMM_NR;
            gemm_nt_tile(mr, nr, K, A + (size_t)i0 * lda, lda, B + (size_t)j0 * ldb, ldb, bias ? bias + j0 : NULL,
                         C + (size_t)i0 * ldc + j0, ldc, accumulate);
        }
}

/* C[M][N] (+)= A[M][K] B[K][N]: the second operand stored row by row (e.g. values). */
static void gemm_nn(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc,
                    int accumulate)
{
    int i;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)M * N * K))
#endif
    for (i = 0; i < M; i++) {
        float *c = C + (size_t)i * ldc;
        int k, n;
        if (!accumulate)
            for (n = 0; n < N; n++) c[n] = 0.0f;
        for (k = 0; k < K; k++) {
            const float a = A[(size_t)i * lda + k], *b = B + (size_t)k * ldb;
            for (n = 0; n < N; n++) c[n] += a * b[n];
        }
    }
}

/* y[rows][out] = x[rows][in] W^T + b: nn.Linear on a batch of rows. */
static void linear(float *y, const float *x, int rows, int in, int out, linear_w l)
{
    gemm_nt(rows, out, in, x, in, l.w, in, l.b, y, out, 0);
}

/* Register tile and K-block of gemm_tn. */
#define GEMM_TN_MR 4
#define GEMM_TN_NR 16
#define GEMM_TN_KC 256

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
                for (j = 0; j < GEMM_TN_NR; j++) acc[i][j] += a[i] * b[j];
        }
    } else {
        for (k = 0; k < K; k++) {
            const float *a = A + (size_t)k * lda, *b = B + (size_t)k * ldb;
            for (i = 0; i < mr; i++)
                for (j = 0; j < nr; j++) acc[i][j] += a[i] * b[j];
        }
    }
    for (i = 0; i < mr; i++)
        for (j = 0; j < nr; j++) C[(size_t)i * ldc + j] += acc[i][j];
}

/* C[M][N] += A[K][M]^T B[K][N]: weight gradients (dW = dY^T X). K is walked in blocks
 * in order and every element of C belongs to one tile, so the sums do not depend on
 * the number of threads. */
static void gemm_tn(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float *C, int ldc)
{
    int mb = (M + GEMM_TN_MR - 1) / GEMM_TN_MR, nb = (N + GEMM_TN_NR - 1) / GEMM_TN_NR, k0;
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
    int i, j;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)m * n))
#endif
    for (j = 0; j < n; j++)
        for (i = 0; i < m; i++) dst[(size_t)j * m + i] = src[(size_t)i * n + j];
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
        double mean = 0.0, var = 0.0;
        float fm, rstd;
        int i;
        for (i = 0; i < dim; i++) mean += xr[i];
        mean /= dim;
        for (i = 0; i < dim; i++) var += (xr[i] - mean) * (xr[i] - mean);
        var /= dim;
        fm = (float)mean;
        rstd = (float)(1.0 / sqrt(var + eps));
        for (i = 0; i < dim; i++) yr[i] = (xr[i] - fm) * rstd * n.w[i] + n.b[i];
    }
}

/* Columns handled together by the norm backwards' parameter gradients. */
#define NORM_BLOCK 64

/* nn.LayerNorm backward, from its input x [rows][dim]: dx += rstd (g - mean g - xhat mean(g xhat))
 * with g = dy * weight, dw += sum of dy xhat, db += sum of dy (over rows). dx must not
 * alias dy. stats: scratch of 2*rows floats (mean and 1/std of each row). */
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
        double mean = 0.0, var = 0.0, sg = 0.0, sgx = 0.0, rstd;
        int i;
        for (i = 0; i < dim; i++) mean += xr[i];
        mean /= dim;
        for (i = 0; i < dim; i++) var += (xr[i] - mean) * (xr[i] - mean);
        var /= dim;
        rstd = 1.0 / sqrt(var + eps);
        for (i = 0; i < dim; i++) {
            double g = (double)gr[i] * n.w[i];
            sg += g;
            sgx += g * (xr[i] - mean) * rstd;
        }
        sg /= dim;
        sgx /= dim;
        for (i = 0; i < dim; i++)
            dr[i] += (float)(rstd * ((double)gr[i] * n.w[i] - sg - (xr[i] - mean) * rstd * sgx));
        stats[2 * r] = (float)mean;
        stats[2 * r + 1] = (float)rstd;
    }
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
            dw[i0 + i] += (float)aw[i];
            db[i0 + i] += (float)ab[i];
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

/* Exact (erf) GELU, in place: x * (1 + erf(x / sqrt 2)) / 2. */
static void gelu(float *x, size_t n)
{
    size_t i;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)n * 16))
#endif
    for (i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * (float)LOUPE_SQRT1_2));
}

/* GELU backward from its input x: dx += dy (Phi(x) + x phi(x)), Phi, phi the normal
 * distribution and density. dx must not alias dy. */
static void gelu_backward(float *dx, const float *dy, const float *x, size_t n)
{
    size_t i;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)n * 16))
#endif
    for (i = 0; i < n; i++) {
        double v = x[i], cdf = 0.5 * (1.0 + erf(v * LOUPE_SQRT1_2));
        double pdf = exp(-0.5 * v * v) * LOUPE_INV_SQRT_2PI;
        dx[i] += (float)(dy[i] * (cdf + v * pdf));
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

/* Softmax of each row of x[rows][n], in place. */
static void softmax_rows(float *x, int rows, int n)
{
    int r, i;
    for (r = 0; r < rows; r++) {
        float *v = x + (size_t)r * n, mx = v[0], sum = 0.0f;
        for (i = 1; i < n; i++) mx = v[i] > mx ? v[i] : mx;
        for (i = 0; i < n; i++) { v[i] = expf(v[i] - mx); sum += v[i]; }
        for (i = 0; i < n; i++) v[i] /= sum;
    }
}

/* Softmax backward from its output y [rows][n]: dx += y (dy - sum(y dy)) per row.
 * dx must not alias dy. */
static void softmax_rows_backward(float *dx, const float *dy, const float *y, int rows, int n)
{
    int r, i;
    for (r = 0; r < rows; r++) {
        const float *yr = y + (size_t)r * n, *gr = dy + (size_t)r * n;
        double dot = 0.0;
        for (i = 0; i < n; i++) dot += (double)yr[i] * gr[i];
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
        size_t i, n = (size_t)Tq * Tk;
        gemm_nt(Tq, Tk, dh, Q + (size_t)h * dh, ldq, K + (size_t)h * dh, ldk, NULL, S, Tk, 0);
        for (i = 0; i < n; i++) S[i] = mask && mask[i] ? -INFINITY : S[i] * scale;
        softmax_rows(S, Tq, Tk);
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
        size_t i, n = (size_t)Tq * Tk, ho = (size_t)h * dh;
        int r, j;
        gemm_nt(Tq, Tk, dh, Q + ho, ldq, K + ho, ldk, NULL, P, Tk, 0);
        for (i = 0; i < n; i++) P[i] = mask && mask[i] ? -INFINITY : P[i] * scale;
        softmax_rows(P, Tq, Tk);
        gemm_nt(Tq, Tk, dh, dO + ho, lddo, V + ho, ldv, NULL, dP, Tk, 0);
        gemm_tn(Tk, dh, Tq, P, Tk, dO + ho, lddo, dV + ho, lddv);
        for (r = 0; r < Tq; r++) {
            const float *pr = P + (size_t)r * Tk;
            float *gr = dP + (size_t)r * Tk;
            double dot = 0.0;
            for (j = 0; j < Tk; j++) dot += (double)pr[j] * gr[j];
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

/* Scratch floats interp_plane needs for an out_h x out_w output. */
#define INTERP_SCRATCH(oh, ow) (4 * (size_t)((oh) + (ow)))

/* F.interpolate(mode="bilinear", align_corners=False) of one [ih][iw] plane. */
static void interp_plane(const float *in, int ih, int iw, float *out, int oh, int ow, float *scratch)
{
    int *y0 = (int *)(void *)scratch, *y1 = y0 + oh, *x0 = y1 + oh, *x1 = x0 + ow;
    float *wy0 = (float *)(void *)(x1 + ow), *wy1 = wy0 + oh, *wx0 = wy1 + oh, *wx1 = wx0 + ow;
    int y, x;
    interp_axis(ih, oh, y0, y1, wy0, wy1);
    interp_axis(iw, ow, x0, x1, wx0, wx1);
    for (y = 0; y < oh; y++) {
        const float *r0 = in + (size_t)y0[y] * iw, *r1 = in + (size_t)y1[y] * iw;
        float *o = out + (size_t)y * ow;
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

/* nn.ConvTranspose2d(kernel 2, stride 2) on channels-last maps:
 * in [h*w][ci] -> out [2h*2w][co]; wt is the kernel repacked [2][2][co][ci]. */
static void conv_transpose2x2_hwc(float *out, const float *in, int h, int w, int ci, int co, const float *wt,
                                  const float *bias)
{
    int i, t;
    for (i = 0; i < h; i++)
        for (t = 0; t < 4; t++) {
            int di = t / 2, dj = t % 2;
            gemm_nt(w, co, ci, in + (size_t)i * w * ci, ci, wt + (size_t)t * co * ci, ci, bias,
                    out + ((size_t)(2 * i + di) * 2 * w + dj) * co, 2 * co, 0);
        }
}

/* nn.ConvTranspose2d(2, stride 2) backward on channels-last maps: dout [2h*2w][co] ->
 * din [h*w][ci] += (when din), dwt [2][2][co][ci] += (the repacked kernel's layout),
 * db [co] +=. scratch: max(ci*co, h*w*co) floats. */
static void conv_transpose2x2_hwc_backward(float *din, float *dwt, float *db, const float *dout, const float *in,
                                           int h, int w, int ci, int co, const float *wt, float *scratch)
{
    int i, j, t;
    bias_backward(db, dout, co, 4 * h * w, co);
    for (t = 0; t < 4; t++) {
        int di = t / 2, dj = t % 2;
        if (din) {
            transpose(scratch, wt + (size_t)t * co * ci, co, ci);
            for (i = 0; i < h; i++)
                gemm_nt(w, ci, co, dout + ((size_t)(2 * i + di) * 2 * w + dj) * co, 2 * co, scratch, co, NULL,
                        din + (size_t)i * w * ci, ci, 1);
        }
        /* this tap's output pixels, gathered into [h*w][co], times the input */
        for (i = 0; i < h; i++)
            for (j = 0; j < w; j++)
                memcpy(scratch + ((size_t)i * w + j) * co, dout + ((size_t)(2 * i + di) * 2 * w + 2 * j + dj) * co,
                       (size_t)co * sizeof *scratch);
        gemm_tn(co, ci, h * w, scratch, co, in, ci, dwt + (size_t)t * co * ci, ci);
    }
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
    int x0 = (int)floorf(ix), y0 = (int)floorf(iy), x1 = x0 + 1, y1 = y0 + 1, d;
    float fx = ix - (float)x0, fy = iy - (float)y0;
    float wts[4], *wp = wts;
    int xs[4], ys[4], k;
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
        double dot = 0.0;
        float c;
        if (xs[k] < 0 || xs[k] >= w || ys[k] < 0 || ys[k] >= h) continue;
        at = ((size_t)ys[k] * w + xs[k]) * ld;
        for (d = 0; d < dh; d++) dot += (double)dacc[d] * value[at + d];
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
 * kin = features + position [n][F], kv [n][2F], att1 [Q][F], a1/h1 cross-attention sum
 * and norm; hq2, q2 [Q][F], kv2 [2][Q][F] (k, v), att2, a2/h2 the self-attention sum and norm;
 * ffn [Q][E] after ReLU, a3 the FFN sum. In inference they alias the session's scratch. */
typedef struct dec_layer_acts {
    unsigned char *mask;
    float *hq1, *q1, *kin, *kv, *att1, *a1, *h1, *hq2, *q2, *kv2, *att2, *a2, *h2, *ffn, *a3;
} dec_layer_acts;

/* What a test-time-adaptation forward keeps for the backward (a loupe_tta owns the
 * buffers; section 9). Layer outputs the session keeps anyway are read from the session. */
typedef struct tta_tape {
    scale_block_acts fpn[4];      /* fpn4[0], fpn4[1], fpn2, fpn_half */
    float *proj;                  /* [Te][F] input projections before their GroupNorm */
    enc_layer_acts *enc;          /* [enc_layers] */
    float *lat_pre, *conv_pre;    /* [(4g)^2][F] adapter_1 and layer_1 convolutions before GroupNorm */
    float *hidden;                /* [L][Q][F] decoder hidden states: query features, then layer outputs */
    dec_layer_acts *dec;          /* [L-1] */
    float *me_a, *me_b, *me;      /* [L][Q][F] mask-embedding MLP of each prediction */
} tta_tape;

struct loupe_session {
    const loupe_model *m;
    const loupe_weights *w;       /* segmentor weights in use: the model's or a loupe_tta's */
    const loupe_tables *t;        /* tables derived from them */
    tta_tape *tape;               /* TTA: where the forward keeps what the backward needs (else NULL) */
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
    /* segmentor: feature pyramid */
    float *cond_query;            /* [F] */
    float *fpn4, *fpn2, *fpn_half;/* [(4g)^2][W], [(2g)^2][W], [(g/2)^2][W] */
    float *fpn_tmp, *fpn_mid;     /* [(4g)^2][W], [(2g)^2][W] scale-block temporaries */
    /* pixel decoder, Te tokens over levels [g/2, g, 2g] */
    float *enc_h;                 /* [enc_layers+1][Te][F] encoder input, then each layer's output */
    float *qpos, *value, *msda, *tmp; /* [Te][F] */
    float *offs, *aw;             /* [Te][heads*3*points*2], [Te][heads*3*points] */
    float *kv;                    /* [Te][2F] */
    float *ffn;                   /* [Te][max(enc_ffn, dec_ffn)] */
    float *cq, *catt;             /* [F] conditional cross-attention */
    float *lateral, *fpn_out, *mask_features; /* [(4g)^2][F] */
    float *interp;                /* interpolation index scratch */
    /* transformer decoder, Q queries */
    float *dec_feat;              /* [Te][F] multi-scale features + level embedding */
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
    s->fpn_tmp = arena_floats(a, M4 * W);
    s->fpn_mid = arena_floats(a, M2 * W);
    s->enc_h = arena_floats(a, ((size_t)c->enc_layers + 1) * Te * F);
    s->qpos = arena_floats(a, Te * F);
    s->value = arena_floats(a, Te * F);
    s->msda = arena_floats(a, Te * F);
    s->tmp = arena_floats(a, Te * F);
    s->offs = arena_floats(a, Te * noff * 2);
    s->aw = arena_floats(a, Te * noff);
    s->kv = arena_floats(a, Te * 2 * F);
    s->ffn = arena_floats(a, Te * max3((size_t)c->enc_ffn, (size_t)c->dec_ffn, 1));
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
    s->dec_acts.hq1 = s->dec_acts.hq2 = s->hq; s->dec_acts.q1 = s->dec_acts.q2 = s->dq; s->dec_acts.kin = s->tmp;
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
/* 5. Backbone: Perception Encoder ViT (models/pe/pe.py)                       */
/* ========================================================================== */

/* VisionTransformer.conv1 + class_embedding + positional_embedding + ln_pre:
 * pixel_values [3][S][S] -> x [1+g*g][W]. */
static void pe_embed(loupe_session *s, const float *pixels)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = &s->m->w;
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
    gemm_nt(g * g, W, K, s->patches, K, w->conv1, K, NULL, s->x + W, W, 0);
    memcpy(s->x, w->class_embedding, (size_t)W * sizeof *s->x);
    add(s->x, s->x, w->positional_embedding, (size_t)T * W);
    layernorm(s->x, s->x, T, W, w->ln_pre, c->ln_eps);
    tap(s, "backbone_ln_pre", s->x, 0, 3, 1, T, W, 0);
}

/* Rope2D.__call__: rotates the q and k parts of qkv [T][3W] in place; channel pairs
 * (2i, 2i+1) turn by the token's angle: (a, b) -> (a cos - b sin, b cos + a sin). */
static void pe_rope2d(float *qkv, int T, int W, int heads, const float *cosv, const float *sinv)
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
                    float a = v[i], b = v[i + 1];
                    v[i] = a * cs[i] - b * sn[i];
                    v[i + 1] = b * cs[i + 1] + a * sn[i + 1];
                }
            }
    }
}

/* ResidualAttentionBlock.forward (SelfAttention with RoPE, then the GELU MLP):
 * x [T][W] -> x [T][W], updated in place. */
static void pe_residual_attention_block(loupe_session *s, const pe_block_w *b)
{
    const loupe_config *c = &s->m->cfg;
    int g = c->grid, T = 1 + g * g, W = c->width, M = c->mlp_width, dh = W / c->heads;
    layernorm(s->h, s->x, T, W, b->ln_1, c->ln_eps);
    linear(s->qkv, s->h, T, W, 3 * W, b->qkv);
    pe_rope2d(s->qkv, T, W, c->heads, s->m->t.rope_cos, s->m->t.rope_sin);
    attention(s->att, W, s->qkv, 3 * W, s->qkv + W, 3 * W, s->qkv + 2 * W, 3 * W, T, T, c->heads, dh,
              1.0f / sqrtf((float)dh), NULL, s->scores);
    gemm_nt(T, W, W, s->att, W, b->out.w, W, b->out.b, s->x, W, 1);
    layernorm(s->h, s->x, T, W, b->ln_2, c->ln_eps);
    linear(s->wide, s->h, T, W, M, b->fc);
    gelu(s->wide, (size_t)T * M);
    gemm_nt(T, W, M, s->wide, M, b->proj.w, M, b->proj.b, s->x, W, 1);
}

/* AttentionPooling.forward: a learned probe attends over all tokens, then a residual
 * GELU MLP: feats [T][W] -> pooled [W]. */
static void pe_attention_pooling(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    const pe_pool_w *p = &s->m->w.pool;
    int g = c->grid, T = 1 + g * g, W = c->width, M = c->pool_mlp_width, dh = W / c->pool_heads;
    gemm_nt(1, W, W, p->probe, W, p->qkv.w, W, p->qkv.b, s->pool_q, W, 0);
    gemm_nt(T, 2 * W, W, s->feats, W, p->qkv.w + (size_t)W * W, W, p->qkv.b + W, s->qkv, 2 * W, 0);
    attention(s->pool_att, W, s->pool_q, W, s->qkv, 2 * W, s->qkv + W, 2 * W, 1, T, c->pool_heads, dh,
              1.0f / sqrtf((float)dh), NULL, s->scores);
    linear(s->pooled, s->pool_att, 1, W, W, p->out);
    layernorm(s->pool_h, s->pooled, 1, W, p->ln, c->ln_eps);
    linear(s->wide, s->pool_h, 1, W, M, p->fc);
    gelu(s->wide, (size_t)M);
    gemm_nt(1, W, M, s->wide, M, p->proj.w, M, p->proj.b, s->pooled, W, 1);
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
        pe_residual_attention_block(s, &s->m->w.blocks[i]);
        snprintf(name, sizeof name, "backbone_block%d", i);
        tap(s, name, s->x, 0, 3, 1, T, W, 0);
    }
    layernorm(s->feats, s->x, T, W, s->m->w.ln_post, c->ln_eps);
    tap(s, "backbone_features", s->feats, 0, 3, 1, T, W, 0);
    pe_attention_pooling(s);
    tap(s, "pooled_features", s->pooled, 0, 2, 1, W, 0, 0);
}

/* ========================================================================== */
/* 6. Classifier (models/loupe/modules.py, modeling_loupe.py)                  */
/* ========================================================================== */

/* LoupeClsHead.forward: Linear, GELU between layers, last Linear to one logit:
 * x [rows][in] -> logits [rows]. */
static void loupe_cls_head(loupe_session *s, const cls_head_w *h, const float *x, int rows, float *logits)
{
    const loupe_config *c = &s->m->cfg;
    int i, in = c->width;
    const float *cur = x;
    for (i = 0; i < c->cls_layers; i++) {
        int last = i == c->cls_layers - 1, out = last ? 1 : c->cls_hidden;
        float *dst = last ? logits : (i % 2 ? s->cls_b : s->cls_a);
        linear(dst, cur, rows, in, out, h->layers[i]);
        if (!last) gelu(dst, (size_t)rows * out);
        cur = dst;
        in = out;
    }
}

/* LoupeClassifier.forward + the pseudo label of LoupeModel.forward: global head on
 * the pooled vector, patch head on every patch token, FuseHead over [global, patches]. */
static void loupe_classifier(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = &s->m->w;
    int N = c->grid * c->grid, W = c->width, i;
    double fused;
    loupe_cls_head(s, &w->global_head, s->pooled, 1, &s->global_logit);
    loupe_cls_head(s, &w->patch_head, s->feats + W, N, s->patch_logits);
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

/* ========================================================================== */
/* 7. Segmentor (LoupeSegmentor: FeaturePyramid, PixelDecoder, Mask2Former)    */
/* ========================================================================== */

/* LoupeSegmentor.forward, conditional queries: the label embeddings mixed by the
 * forgery probability p: label_embedding[1] * p + label_embedding[0] * (1 - p) -> [F]. */
static void conditional_query(loupe_session *s)
{
    const loupe_weights *w = s->w;
    int F = s->m->cfg.feature_size, i;
    float p = s->prob;
    for (i = 0; i < F; i++) s->cond_query[i] = w->label_embedding[1][i] * p + w->label_embedding[0][i] * (1.0f - p);
    tap(s, "conditional_query", s->cond_query, 0, 3, 1, 1, F, 0);
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
    if (b->convt) {
        conv_transpose2x2_hwc(A->pre, in, h, w, W, W, b->convt, b->conv1.b);
        *oh = 2 * h; *ow = 2 * w;
    } else {
        maxpool2x2_hwc(A->pre, in, h, w, W);
        *oh = h / 2; *ow = w / 2;
    }
    n = (size_t)*oh * *ow * W;
    copy_unless_same(A->act, A->pre, n);
    gelu(A->act, n);
    depthwise3x3_hwc(dw, A->act, *oh, *ow, W, b->dw);
    layernorm(out, dw, *oh * *ow, W, b->norm, c->fpn_ln_eps);
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
    softmax_rows(A->aw, T * H, 3 * c->deform_points);
    ms_deform_attn_core(A->msda, A->value, A->offs, A->aw, tb, F, H, c->deform_points);
    linear(A->a1, A->msda, T, F, F, e->output);
    add(A->a1, A->a1, hin, (size_t)T * F);
    layernorm(h1, A->a1, T, F, e->ln_self, c->ln_eps);
    /* cross_attn (nn.MultiheadAttention): query = conditional query, keys/values = tokens */
    gemm_nt(1, F, F, s->cond_query, F, e->cross_qkv.w, F, e->cross_qkv.b, A->cq, F, 0);
    gemm_nt(T, 2 * F, F, h1, F, e->cross_qkv.w + (size_t)F * F, F, e->cross_qkv.b + F, A->kv, 2 * F, 0);
    attention(A->catt, F, A->cq, F, A->kv, 2 * F, A->kv + F, 2 * F, 1, T, H, dh, scale, NULL, s->scores);
    linear(A->co, A->catt, 1, F, F, e->cross_out);
    for (t = 0; t < T; t++) add(a2 + (size_t)t * F, h1 + (size_t)t * F, A->co, (size_t)F);
    layernorm(h2, a2, T, F, e->ln_cross, c->ln_eps);
    /* feed-forward */
    linear(A->ffn, h2, T, F, E, e->fc1);
    relu(A->ffn, (size_t)T * E);
    copy_unless_same(a3, h2, (size_t)T * F);
    gemm_nt(T, F, E, A->ffn, E, e->fc2.w, E, e->fc2.b, a3, F, 1);
    layernorm(hout, a3, T, F, e->ln_final, c->ln_eps);
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
    tap(s, "mask_features", s->mask_features, 1, 4, 1, F, M, M);
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
    gemm_nt(Q, M * M, F, me, F, s->mask_features, F, NULL, masks, M * M, 0);
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
    const float *pos = tb->dec_pos + (size_t)tb->level_start[level] * F;
    float scale = 1.0f / sqrtf((float)dh);
    for (q = 0; q < Q; q++) {
        unsigned char *row = A->mask + (size_t)q * n;
        int blocked = 0;
        for (j = 0; j < n; j++) blocked += row[j] = sigmoidf(prev_att[(size_t)q * n + j]) < 0.5f;
        if (blocked == n) memset(row, 0, (size_t)n);
    }
    /* cross_attn (nn.MultiheadAttention): q = hidden + query pos, k = features + pos, v = features */
    add(A->hq1, hin, w->query_embed, (size_t)Q * F);
    gemm_nt(Q, F, F, A->hq1, F, d->cross_qkv.w, F, d->cross_qkv.b, A->q1, F, 0);
    add(A->kin, feat, pos, (size_t)n * F);
    gemm_nt(n, F, F, A->kin, F, d->cross_qkv.w + (size_t)F * F, F, d->cross_qkv.b + F, A->kv, 2 * F, 0);
    gemm_nt(n, F, F, feat, F, d->cross_qkv.w + (size_t)2 * F * F, F, d->cross_qkv.b + 2 * F, A->kv + F, 2 * F, 0);
    attention(A->att1, F, A->q1, F, A->kv, 2 * F, A->kv + F, 2 * F, Q, n, H, dh, scale, A->mask, s->scores);
    copy_unless_same(A->a1, hin, (size_t)Q * F);
    gemm_nt(Q, F, F, A->att1, F, d->cross_out.w, F, d->cross_out.b, A->a1, F, 1);
    layernorm(A->h1, A->a1, Q, F, d->ln_cross, c->ln_eps);
    /* self_attn (Mask2FormerAttention): q, k from hidden + query pos, v from hidden */
    add(A->hq2, A->h1, w->query_embed, (size_t)Q * F);
    linear(A->q2, A->hq2, Q, F, F, d->q);
    linear(A->kv2, A->hq2, Q, F, F, d->k);
    linear(A->kv2 + (size_t)Q * F, A->h1, Q, F, F, d->v);
    attention(A->att2, F, A->q2, F, A->kv2, F, A->kv2 + (size_t)Q * F, F, Q, Q, H, dh, scale, NULL, s->scores);
    copy_unless_same(A->a2, A->h1, (size_t)Q * F);
    gemm_nt(Q, F, F, A->att2, F, d->o.w, F, d->o.b, A->a2, F, 1);
    layernorm(A->h2, A->a2, Q, F, d->ln_self, c->ln_eps);
    /* feed-forward */
    linear(A->ffn, A->h2, Q, F, E, d->fc1);
    relu(A->ffn, (size_t)Q * E);
    copy_unless_same(A->a3, A->h2, (size_t)Q * F);
    gemm_nt(Q, F, E, A->ffn, E, d->fc2.w, E, d->fc2.b, A->a3, F, 1);
    layernorm(hout, A->a3, Q, F, d->ln_final, c->ln_eps);
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

/* ========================================================================== */
/* 8. Post-processing (LoupeImageProcessor.post_process_segmentation)         */
/* ========================================================================== */

/* Mask logits -> bilinear 384x384 -> sum over queries of softmax(class)[forgery] *
 * sigmoid(mask): the forgery probability map seg [384][384] (may exceed 1). */
static void post_process_segmentation(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    int Q = c->num_queries, L = c->dec_layers, M = 4 * c->grid, C = c->num_labels + 1, q, k;
    size_t n = (size_t)SEG_SIZE * SEG_SIZE, i;
    const float *masks = s->mask_logits + (size_t)(L - 1) * Q * M * M;
    const float *cls = s->class_logits + (size_t)(L - 1) * Q * C;
    for (i = 0; i < n; i++) s->seg[i] = 0.0f;
    for (q = 0; q < Q; q++) {
        float mx = cls[(size_t)q * C], sum = 0.0f, p0;
        for (k = 1; k < C; k++) mx = cls[(size_t)q * C + k] > mx ? cls[(size_t)q * C + k] : mx;
        for (k = 0; k < C; k++) sum += expf(cls[(size_t)q * C + k] - mx);
        p0 = expf(cls[(size_t)q * C] - mx) / sum;
        interp_plane(masks + (size_t)q * M * M, M, M, s->seg_tmp, SEG_SIZE, SEG_SIZE, s->interp);
        for (i = 0; i < n; i++) s->seg[i] += p0 * sigmoidf(s->seg_tmp[i]);
    }
    tap(s, "seg_prob_384", s->seg, 0, 4, 1, 1, SEG_SIZE, SEG_SIZE);
}

int loupe_postprocess(const loupe_session *s, int width, int height, float *seg_prob, unsigned char *mask,
                      char *err, size_t errsize)
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
        for (i = 0; i < n; i++) mask[i] = prob[i] > 0.5f ? 255 : 0;
    free(scratch);
    return 0;
}

int loupe_forward(loupe_session *s, const float *pixel_values, char *err, size_t errsize)
{
    const loupe_config *c;
    if (!s || !pixel_values) return fail(err, errsize, "loupe_forward needs a session and an input tensor");
    c = &s->m->cfg;
    if (max_threads() > s->threads)
        return fail(err, errsize, "the session was created for %d threads but %d are requested; create sessions "
                    "after loupe_set_threads", s->threads, max_threads());
    tap(s, "pixel_values", pixel_values, 0, 4, 1, 3, c->image_size, c->image_size);
    vision_transformer(s, pixel_values);
    loupe_classifier(s);
    conditional_query(s);
    feature_pyramid(s);
    pixel_decoder(s);
    masked_attention_decoder(s);
    post_process_segmentation(s);
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
/* 9. Test-time adaptation (LitModel.training_step in stage test, LoupeSegLoss) */
/* ========================================================================== */
/* Loupe adapts its segmentor on unlabeled images: the classifier's own verdict becomes
 * the target, LoupeSegLoss scores the segmentor's predictions against it, and one
 * AdamW step follows. This section holds the loss with its gradient, the segmentor's
 * backward (module by module, in the reverse order of section 7, on the kernels'
 * *_backward twins), the optimizer, and the loupe_tta API. The backbone and the
 * classifier stay frozen (only segmentor.* tensors are trained; see README). */

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
 * Differences from upstream, by design: with no target upstream's Tversky term is the
 * mean over zero masks (NaN) and so is the total; here loss_dice (and loss_mask) is
 * 0. Only one image (batch 1) and at most one target are handled, which is all that
 * Loupe's pseudo labels produce. */

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
        sum += target[i] * seg_softplus(-pred[i]) + (1.0 - target[i]) * seg_softplus(pred[i]);
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
 * mask_logits [Q][M][M], target [g][g], points [P][2] (the matcher's uniform draw);
 * scratch [2P] floats. Returns the matched query. The cost matrix is float32 [Q][1]
 * as upstream; scipy's linear_sum_assignment on one column returns the cheapest row,
 * the lowest index among equal costs (it scans columns of the transposed 1 x Q problem
 * from the last to the first and keeps the last minimum it sees). */
static int hungarian_matcher(const seg_loss_config *cfg, int Q, int M, const float *class_logits,
                             const float *mask_logits, const float *target, int g, const float *points,
                             int P, float *scratch)
{
    float *target_points = scratch, *pred_points = scratch + P, best = 0.0f;
    int q, best_q = 0;
    sample_point_forward(target, g, g, points, P, target_points);
    for (q = 0; q < Q; q++) {
        const float *z = class_logits + (size_t)q * SEG_NUM_CLASSES;
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
        if (q == 0 || cost < best) {
            best = cost;
            best_q = q;
        }
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

/* Mask2FormerLoss.sample_points_using_uncertainty for one mask [M][M]: draws int(P *
 * oversample_ratio) candidates, keeps the int(importance_sample_ratio * P) with the
 * largest calculate_uncertainty = -|logit| (torch.topk; ties, which topk leaves
 * unspecified, go to the earlier candidate), then draws the remaining points uniformly.
 * points_out [P][2]; candidates [int(P * oversample_ratio)][2] floats, order [same count]. */
static void sample_points_using_uncertainty(const seg_loss_config *cfg, const float *mask_logits, int M,
                                            const loss_rng *rng, float *points_out, float *candidates,
                                            float *candidate_logits, uncertain_point *order)
{
    int P = cfg->train_num_points;
    int num_sampled = (int)(P * cfg->oversample_ratio);
    int num_uncertain = (int)(cfg->importance_sample_ratio * P);
    int i;
    rng->fill(rng->state, candidates, (size_t)num_sampled * 2);
    sample_point_forward(mask_logits, M, M, candidates, num_sampled, candidate_logits);
    for (i = 0; i < num_sampled; i++) {
        order[i].uncertainty = -fabsf(candidate_logits[i]);
        order[i].index = i;
    }
    qsort(order, (size_t)num_sampled, sizeof *order, uncertain_point_cmp);
    for (i = 0; i < num_uncertain; i++) {
        points_out[2 * i] = candidates[2 * order[i].index];
        points_out[2 * i + 1] = candidates[2 * order[i].index + 1];
    }
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
        double bce = ti * seg_softplus(-x[i]) + (1.0 - ti) * seg_softplus(x[i]);
        double ce = (alpha * ti + (1.0 - alpha) * (1.0 - ti)) * bce;
        double u = ti * seg_sigmoid(-x[i]) + (1.0 - ti) * seg_sigmoid(x[i]);   /* 1 - pt */
        sum += ce * pow(u, gamma) + eps * pow(u, gamma + 1.0);
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
        double ti = t[i], s = seg_sigmoid(x[i]), sm = seg_sigmoid(-x[i]);
        double wgt = alpha * ti + (1.0 - alpha) * (1.0 - ti);
        double bce = ti * seg_softplus(-x[i]) + (1.0 - ti) * seg_softplus(x[i]);
        double u = ti * sm + (1.0 - ti) * s;
        double du = (1.0 - 2.0 * ti) * s * sm;
        double ug = pow(u, gamma);
        double d = wgt * (s - ti) * ug + (wgt * bce * gamma * pow(u, gamma - 1.0) + eps * (gamma + 1.0) * ug) * du;
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
 * mask_logits [M][M] of the matched query, target [g][g], points [P][2] ->
 * loss_mask = mean Poly-1 focal / num_masks, loss_dice = Tversky (mean over 1 mask). */
static void loss_masks_forward(const seg_loss_config *cfg, const float *mask_logits, int M, const float *target,
                               int g, const float *points, double num_masks, loss_masks_scratch *s,
                               double *loss_mask, double *loss_dice)
{
    int P = cfg->train_num_points;
    sample_point_forward(target, g, g, points, P, s->point_labels);
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

/* Mask2FormerLoss.loss_labels forward: class_logits [Q][2], matched_query (-1: none) ->
 * weighted-mean cross-entropy sum_q w_q (-log softmax(z_q)[c_q]) / sum_q w_q. */
static double loss_labels_forward(const seg_loss_config *cfg, const float *class_logits, int Q, int matched_query)
{
    double num = 0.0, den = 0.0;
    int q;
    for (q = 0; q < Q; q++) {
        const float *z = class_logits + (size_t)q * SEG_NUM_CLASSES;
        int c = loss_labels_target(q, matched_query);
        double w = loss_labels_class_weight(cfg, c);
        /* -log softmax(z)[c] = softplus(z[other] - z[c]) for two classes */
        num += w * seg_softplus((double)z[1 - c] - z[c]);
        den += w;
    }
    return num / den;
}

/* loss_labels backward: grad [Q][2] += scale * w_q / sum(w) * (softmax(z_q) - onehot(c_q)). */
static void loss_labels_backward(const seg_loss_config *cfg, const float *class_logits, int Q, int matched_query,
                                 double scale, float *grad_class_logits)
{
    double den = 0.0;
    int q, j;
    for (q = 0; q < Q; q++) den += loss_labels_class_weight(cfg, loss_labels_target(q, matched_query));
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

/* Mask2FormerLoss.get_num_masks: number of targets, clamped to >= 1 (one process). */
static double get_num_masks(int num_targets)
{
    return num_targets > 1 ? (double)num_targets : 1.0;
}

/* Scratch of loupe_seg_loss (planned in the loupe_tta arena): the matcher's points and
 * samples [2P] each, the selected points [P][2], the oversampled candidates [3P][2], their
 * logits [3P] and sort order [3P], and loss_masks' buffers. */
typedef struct seg_loss_scratch {
    float *matcher_points, *matcher_scratch, *points, *candidates, *candidate_logits;
    uncertain_point *order;
    loss_masks_scratch masks;
} seg_loss_scratch;

/* LoupeSegLoss.forward (with its auxiliary calls) followed by LoupeSegmentor.get_loss,
 * and the gradient of the total. preds [L] in decoder order (prediction i has class
 * logits [Q][2], mask logits [Q][M][M]); pseudo_label p and pseudo_mask [g][g] =
 * sigmoid(patch logits) (read only when p > 0.5). Fills calls [L] (in loss-call order)
 * and *total, and accumulates the gradients into the preds' grad buffers. Consumes the
 * random numbers listed at loss_rng. */
static void loupe_seg_loss(const seg_loss_config *cfg, int L, int Q, int M, int g, const seg_prediction *preds,
                           float pseudo_label, const float *pseudo_mask, const loss_rng *rng, seg_loss_scratch *s,
                           seg_loss_call *calls, double *total)
{
    int P = cfg->train_num_points;
    int has_target = pseudo_label > SEG_PSEUDO_LABEL_THRESHOLD;
    double num_masks = get_num_masks(has_target);
    float skip;
    int k;

    /* the decoder's layerdrop draws precede the loss in upstream's random stream */
    for (k = 0; k < L - 1; k++) rng->fill(rng->state, &skip, 1);

    *total = 0.0;
    for (k = 0; k < L; k++) {
        seg_loss_call *c = &calls[k];
        const seg_prediction *pr = &preds[k == 0 ? L - 1 : k - 1];
        c->prediction = k == 0 ? L - 1 : k - 1;
        c->num_masks = num_masks;
        /* the matcher draws its points even when there is no target to match */
        rng->fill(rng->state, s->matcher_points, (size_t)P * 2);
        c->matched_query = has_target ? hungarian_matcher(cfg, Q, M, pr->class_logits, pr->mask_logits,
                                                          pseudo_mask, g, s->matcher_points, P, s->matcher_scratch)
                                      : -1;
        c->loss_mask = c->loss_dice = 0.0;
        if (has_target) {
            const float *mask = pr->mask_logits + (size_t)c->matched_query * M * M;
            sample_points_using_uncertainty(cfg, mask, M, rng, s->points, s->candidates, s->candidate_logits,
                                            s->order);
            loss_masks_forward(cfg, mask, M, pseudo_mask, g, s->points, num_masks, &s->masks, &c->loss_mask,
                               &c->loss_dice);
            loss_masks_backward(cfg, M, s->points, num_masks, cfg->mask_weight, cfg->dice_weight, &s->masks,
                                pr->grad_mask_logits + (size_t)c->matched_query * M * M);
        }
        c->loss_cross_entropy = loss_labels_forward(cfg, pr->class_logits, Q, c->matched_query);
        loss_labels_backward(cfg, pr->class_logits, Q, c->matched_query, cfg->class_weight, pr->grad_class_logits);
        c->weighted_mask = cfg->mask_weight * c->loss_mask;
        c->weighted_dice = cfg->dice_weight * c->loss_dice;
        c->weighted_cross_entropy = cfg->class_weight * c->loss_cross_entropy;
        *total += c->weighted_mask + c->weighted_dice + c->weighted_cross_entropy;
    }
}

/* ---- Trainable parameters: every segmentor.* tensor, copied out of the read-only model ---- */

/* Layout of a trainable tensor inside loupe_tta: the one the forward reads. */
enum {
    PARAM_PLAIN,     /* as upstream */
    PARAM_CONVT,     /* ConvTranspose2d [ci][co][2][2] kept repacked [2][2][co][ci] */
    PARAM_DEPTHWISE, /* depthwise conv [c][1][3][3] kept tap-major [9][c] */
    PARAM_CONV3X3    /* 3x3 conv [co][ci][3][3] kept tap-major [9][co][ci] */
};

#define TTA_NAME_LEN 128
#define TTA_SEGMENTOR_PREFIX "segmentor."
#define TTA_CLIP_EPS 1e-6           /* clip_grad_norm_ divides by norm + 1e-6 */
#define TTA_MAX_WEIGHT 1e6f         /* largest gradient weight loupe_tta_accumulate accepts */

/* One trainable tensor. */
typedef struct tta_param {
    char name[TTA_NAME_LEN];     /* upstream state-dict key without "loupe." */
    int dims[MAX_TENSOR_DIMS];   /* upstream shape, trailing zeros */
    int layout;
    size_t offset, numel;        /* position in loupe_tta's param, grad, adam_m, adam_v */
    int decay;                   /* AdamW weight decay applies: the name has no "bias" */
} tta_param;

/* Converts a tensor from upstream layout to the layout the forward reads. */
static void param_from_upstream(const tta_param *p, const float *src, float *dst)
{
    switch (p->layout) {
    case PARAM_CONVT: repack_convt(dst, src, p->dims[0], p->dims[1]); break;
    case PARAM_DEPTHWISE: repack_depthwise(dst, src, p->dims[0]); break;
    case PARAM_CONV3X3: repack_conv3x3(dst, src, p->dims[0], p->dims[1]); break;
    default: memcpy(dst, src, p->numel * sizeof *dst);
    }
}

/* Converts a tensor (or its gradient) back to upstream layout. */
static void param_to_upstream(const tta_param *p, const float *src, float *dst)
{
    int a = p->dims[0], b = p->dims[1], i, j, t;
    switch (p->layout) {
    case PARAM_CONVT: /* [4][co=b][ci=a] -> [ci][co][2][2] */
        for (t = 0; t < 4; t++)
            for (j = 0; j < b; j++)
                for (i = 0; i < a; i++) dst[((size_t)i * b + j) * 4 + t] = src[((size_t)t * b + j) * a + i];
        break;
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
    tta_param *params;           /* NULL while counting */
    float *data;                 /* the adapted values, when recording */
    binder b;                    /* finds each tensor in the weight file by name and shape */
    int count;
    size_t floats;
} param_builder;

/* Registers one trainable tensor of upstream shape d0..d3 (trailing zeros) called fmt... and
 * points *view at its adapted copy. */
static void add_param(param_builder *pb, const float **view, int layout, int d0, int d1, int d2, int d3,
                      const char *fmt, ...)
{
    char name[TTA_NAME_LEN];
    size_t numel = (size_t)d0 * (d1 ? d1 : 1) * (d2 ? d2 : 1) * (d3 ? d3 : 1);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    if (pb->params) {
        tta_param *p = &pb->params[pb->count];
        const float *src = bind(&pb->b, d0, d1, d2, d3, "%s", name);
        memcpy(p->name, name, sizeof name);
        p->dims[0] = d0; p->dims[1] = d1; p->dims[2] = d2; p->dims[3] = d3;
        p->layout = layout;
        p->offset = pb->floats;
        p->numel = numel;
        p->decay = strstr(name, "bias") == NULL;
        if (src) param_from_upstream(p, src, pb->data + p->offset);
        *view = pb->data + p->offset;
    }
    pb->count++;
    pb->floats += numel;
}

/* A linear layer's weight [out][in] and optional bias, or a norm's weight and bias. */
static void add_linear(param_builder *pb, linear_w *l, int out, int in, int conv1x1, const char *prefix)
{
    add_param(pb, &l->w, PARAM_PLAIN, out, in, conv1x1, conv1x1, "%s.weight", prefix);
    if (l->b) add_param(pb, &l->b, PARAM_PLAIN, out, 0, 0, 0, "%s.bias", prefix);
}
static void add_norm(param_builder *pb, norm_w *n, int dim, const char *prefix)
{
    add_param(pb, &n->w, PARAM_PLAIN, dim, 0, 0, 0, "%s.weight", prefix);
    add_param(pb, &n->b, PARAM_PLAIN, dim, 0, 0, 0, "%s.bias", prefix);
}
static void add_mha(param_builder *pb, linear_w *qkv, linear_w *out, int e, const char *prefix)
{
    char name[TTA_NAME_LEN + 16];
    add_param(pb, &qkv->w, PARAM_PLAIN, 3 * e, e, 0, 0, "%s.in_proj_weight", prefix);
    add_param(pb, &qkv->b, PARAM_PLAIN, 3 * e, 0, 0, 0, "%s.in_proj_bias", prefix);
    snprintf(name, sizeof name, "%s.out_proj", prefix);
    add_linear(pb, out, e, e, 0, name);
}

/* Walks every segmentor tensor of w in upstream's state-dict order. */
static void segmentor_params(param_builder *pb, loupe_weights *w, const loupe_config *c)
{
    static const char *const fpn_names[4] = {"0.0", "0.1", "1.0", "3.0"};
    scale_block_w *blocks[4];
    int W = c->width, F = c->feature_size, n_off = c->m2f_heads * c->deform_levels * c->deform_points, i, k;
    char p[TTA_NAME_LEN];
    blocks[0] = &w->fpn4[0]; blocks[1] = &w->fpn4[1]; blocks[2] = &w->fpn2; blocks[3] = &w->fpn_half;
    for (k = 0; k < 4; k++) {
        scale_block_w *b = blocks[k];
        const char *s = fpn_names[k];
        if (b->convt) {
            add_param(pb, &b->convt, PARAM_CONVT, W, W, 2, 2, "segmentor.fpn.scale_layers.%s.conv1.weight", s);
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

/* Scratch of the backward pass (names: d_x is the gradient of activation x). */
typedef struct tta_work {
    float *d_class, *d_mask;          /* [L][Q][C], [L][Q][(4g)^2]: the loss's gradients */
    float *pseudo_mask;               /* [g*g] sigmoid(patch logits) */
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
    seg_loss_scratch loss;
} tta_work;

struct loupe_tta {
    const loupe_model *m;
    loupe_session *s;                 /* runs the forward with w, t and tape */
    loupe_weights w;                  /* the model's views, the segmentor's pointing into param */
    loupe_tables t;                   /* the model's tables; enc_pos from the adapted level embedding */
    enc_layer_w *enc;                 /* w.enc, w.dec: adapted copies of the layer views */
    dec_layer_w *dec;
    loupe_tta_options opt;
    tta_param *params;
    int n_params;
    size_t n_floats;
    float *param, *grad, *adam_m, *adam_v; /* [n_floats] each */
    long steps;                       /* optimizer steps taken */
    tta_tape tape;
    tta_work wk;
    seg_loss_config loss_cfg;
    seg_loss_call *calls;             /* [L] */
    seg_prediction *preds;            /* [L] */
    splitmix_uniform rng_state;
    loss_rng rng;                     /* the loss's random points (tests replay upstream's) */
    void *raw;
    size_t tape_bytes, work_bytes, state_bytes;
};

/* The gradient buffer of an adapted tensor (p points into t->param). */
static float *grad_of(loupe_tta *t, const float *p)
{
    return t->grad + (p - t->param);
}

/* Zeroes n floats. */
static void zero(float *x, size_t n)
{
    memset(x, 0, n * sizeof *x);
}

/* Assigns (or, while measuring, counts) the saved activations. */
static void tta_tape_layout(loupe_tta *t, arena *a)
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
        A->hq1 = arena_floats(a, Q * F); A->q1 = arena_floats(a, Q * F); A->kin = arena_floats(a, n * F);
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
static void tta_work_layout(loupe_tta *t, arena *a)
{
    const loupe_config *c = &t->m->cfg;
    tta_work *k = &t->wk;
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
    k->loss.matcher_points = arena_floats(a, 2 * P);
    k->loss.matcher_scratch = arena_floats(a, 2 * P);
    k->loss.points = arena_floats(a, 2 * P);
    k->loss.candidates = arena_floats(a, 2 * cand);
    k->loss.candidate_logits = arena_floats(a, cand);
    k->loss.order = (uncertain_point *)(void *)arena_bytes(a, cand * sizeof(uncertain_point));
    k->loss.masks.point_logits = arena_floats(a, P);
    k->loss.masks.point_labels = arena_floats(a, P);
    k->loss.masks.grad_points = (double *)(void *)arena_bytes(a, P * sizeof(double));
    k->loss.masks.grad_mask = (double *)(void *)arena_bytes(a, M2 * sizeof(double));
}

/* Assigns (or counts) the adapted parameters, their gradients and AdamW's moments. */
static void tta_state_layout(loupe_tta *t, arena *a)
{
    t->param = arena_floats(a, t->n_floats);
    t->grad = arena_floats(a, t->n_floats);
    t->adam_m = arena_floats(a, t->n_floats);
    t->adam_v = arena_floats(a, t->n_floats);
    t->t.enc_pos = arena_floats(a, (size_t)t->m->t.tokens * (size_t)t->m->cfg.feature_size);
}

/* Recomputes the tables derived from adapted weights: the pixel decoder's position
 * embedding plus level embedding (as tables_fill does for the model). */
static void tta_refresh_tables(loupe_tta *t)
{
    const loupe_tables *mt = &t->m->t;
    int F = t->m->cfg.feature_size, l, i, ch;
    for (l = 0; l < 3; l++)
        for (i = mt->level_start[l]; i < mt->level_start[l] + mt->level_h[l] * mt->level_w[l]; i++)
            for (ch = 0; ch < F; ch++)
                t->t.enc_pos[(size_t)i * F + ch] = mt->dec_pos[(size_t)i * F + ch] + t->w.level_embed[(size_t)l * F + ch];
}

/* ---- Backward pass of the segmentor, module by module (reverse order of section 7) ---- */

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
static void mask_predictor_backward(loupe_tta *t, int i, float *dqh)
{
    const loupe_config *c = &t->m->cfg;
    const loupe_weights *w = &t->w;
    tta_work *k = &t->wk;
    int F = c->feature_size, Q = c->num_queries, C = c->num_labels + 1, l;
    size_t QF = (size_t)Q * F;
    const float *qh = t->s->query_hidden + (size_t)i * QF;
    const float *acts[2];
    const float *dy = k->d_me + (size_t)i * QF;
    acts[0] = t->tape.me_a + (size_t)i * QF;
    acts[1] = t->tape.me_b + (size_t)i * QF;
    zero(dqh, QF);
    linear_backward(dqh, grad_of(t, w->class_predictor.w), grad_of(t, w->class_predictor.b),
                    k->d_class + (size_t)i * Q * C, C, qh, Q, F, C, w->class_predictor.w, k->wt);
    /* mask_embedder: Linear-ReLU-Linear-ReLU-Linear, walked back from the last layer */
    for (l = 2; l > 0; l--) {
        zero(k->d_x1, QF);
        linear_backward(k->d_x1, grad_of(t, w->mask_embed[l].w), grad_of(t, w->mask_embed[l].b), dy, F, acts[l - 1],
                        Q, F, F, w->mask_embed[l].w, k->wt);
        zero(k->d_x2, QF);
        relu_backward(k->d_x2, k->d_x1, acts[l - 1], QF);
        memcpy(k->d_x3, k->d_x2, QF * sizeof *k->d_x3);
        dy = k->d_x3;
    }
    linear_backward(dqh, grad_of(t, w->mask_embed[0].w), grad_of(t, w->mask_embed[0].b), dy, F, qh, Q, F, F,
                    w->mask_embed[0].w, k->wt);
}

/* Mask2FormerMaskedAttentionDecoderLayer backward for layer i: d hout [Q][F] ->
 * d hin [Q][F] (=); d of its level's features += into wk.d_dec_feat. */
static void masked_attention_decoder_layer_backward(loupe_tta *t, int i, const float *dout, float *din)
{
    const loupe_config *c = &t->m->cfg;
    const loupe_tables *tb = &t->t;
    const dec_layer_w *d = &t->w.dec[i];
    const dec_layer_acts *A = &t->tape.dec[i];
    tta_work *k = &t->wk;
    int F = c->feature_size, Q = c->num_queries, H = c->m2f_heads, dh = F / H, E = c->dec_ffn, level = i % 3;
    int n = tb->level_h[level] * tb->level_w[level];
    size_t QF = (size_t)Q * F, FF = (size_t)F * F;
    const float *feat = t->s->dec_feat + (size_t)tb->level_start[level] * F;
    float *dfeat = k->d_dec_feat + (size_t)tb->level_start[level] * F, *dqe = grad_of(t, t->w.query_embed);
    float *gqkv = grad_of(t, d->cross_qkv.w), *gqkv_b = grad_of(t, d->cross_qkv.b);
    float scale = 1.0f / sqrtf((float)dh);
    /* feed-forward and final_layer_norm: a3 = h2 + fc2(relu(fc1(h2))) */
    zero(k->d_x1, QF);
    layernorm_backward(k->d_x1, grad_of(t, d->ln_final.w), grad_of(t, d->ln_final.b), dout, A->a3, Q, F, d->ln_final,
                       c->ln_eps, k->stats);
    memcpy(k->d_x2, k->d_x1, QF * sizeof *k->d_x2);
    zero(k->d_qffn, (size_t)Q * E);
    linear_backward(k->d_qffn, grad_of(t, d->fc2.w), grad_of(t, d->fc2.b), k->d_x1, F, A->ffn, Q, E, F, d->fc2.w, k->wt);
    zero(k->d_qffn2, (size_t)Q * E);
    relu_backward(k->d_qffn2, k->d_qffn, A->ffn, (size_t)Q * E);
    linear_backward(k->d_x2, grad_of(t, d->fc1.w), grad_of(t, d->fc1.b), k->d_qffn2, E, A->h2, Q, F, E, d->fc1.w, k->wt);
    /* self-attention and its norm: a2 = h1 + o(attention(q(h1 + pos), k(h1 + pos), v(h1))) */
    zero(k->d_x1, QF);
    layernorm_backward(k->d_x1, grad_of(t, d->ln_self.w), grad_of(t, d->ln_self.b), k->d_x2, A->a2, Q, F, d->ln_self,
                       c->ln_eps, k->stats);
    memcpy(k->d_x2, k->d_x1, QF * sizeof *k->d_x2);
    zero(k->d_att, QF);
    linear_backward(k->d_att, grad_of(t, d->o.w), grad_of(t, d->o.b), k->d_x1, F, A->att2, Q, F, F, d->o.w, k->wt);
    zero(k->d_q, QF);
    zero(k->d_kv2, 2 * QF);
    attention_backward(k->d_q, F, k->d_kv2, F, k->d_kv2 + QF, F, k->d_att, F, A->q2, F, A->kv2, F, A->kv2 + QF, F, Q, Q,
                       H, dh, scale, NULL, k->att);
    zero(k->d_hq, QF);
    linear_backward(k->d_hq, grad_of(t, d->q.w), grad_of(t, d->q.b), k->d_q, F, A->hq2, Q, F, F, d->q.w, k->wt);
    linear_backward(k->d_hq, grad_of(t, d->k.w), grad_of(t, d->k.b), k->d_kv2, F, A->hq2, Q, F, F, d->k.w, k->wt);
    linear_backward(k->d_x2, grad_of(t, d->v.w), grad_of(t, d->v.b), k->d_kv2 + QF, F, A->h1, Q, F, F, d->v.w, k->wt);
    add(k->d_x2, k->d_x2, k->d_hq, QF);
    add(dqe, dqe, k->d_hq, QF);
    /* masked cross-attention and its norm: a1 = hin + out(attention(q(hin + pos), k(feat + pos), v(feat))) */
    zero(k->d_x1, QF);
    layernorm_backward(k->d_x1, grad_of(t, d->ln_cross.w), grad_of(t, d->ln_cross.b), k->d_x2, A->a1, Q, F,
                       d->ln_cross, c->ln_eps, k->stats);
    memcpy(din, k->d_x1, QF * sizeof *din);
    zero(k->d_att, QF);
    linear_backward(k->d_att, grad_of(t, d->cross_out.w), grad_of(t, d->cross_out.b), k->d_x1, F, A->att1, Q, F, F,
                    d->cross_out.w, k->wt);
    zero(k->d_q, QF);
    zero(k->d_kv, (size_t)n * 2 * F);
    attention_backward(k->d_q, F, k->d_kv, 2 * F, k->d_kv + F, 2 * F, k->d_att, F, A->q1, F, A->kv, 2 * F, A->kv + F,
                       2 * F, Q, n, H, dh, scale, A->mask, k->att);
    zero(k->d_hq, QF);
    linear_backward(k->d_hq, gqkv, gqkv_b, k->d_q, F, A->hq1, Q, F, F, d->cross_qkv.w, k->wt);
    linear_backward(dfeat, gqkv + FF, gqkv_b + F, k->d_kv, 2 * F, A->kin, n, F, F, d->cross_qkv.w + FF, k->wt);
    linear_backward(dfeat, gqkv + 2 * FF, gqkv_b + 2 * F, k->d_kv + F, 2 * F, feat, n, F, F, d->cross_qkv.w + 2 * FF,
                    k->wt);
    add(din, din, k->d_hq, QF);
    add(dqe, dqe, k->d_hq, QF);
}

/* Mask2FormerMaskedAttentionDecoder backward: the loss's gradients of every prediction
 * -> d mask features (wk.d_mf), d multi-scale features (wk.d_dec_feat), parameter gradients. */
static void masked_attention_decoder_backward(loupe_tta *t)
{
    const loupe_config *c = &t->m->cfg;
    const loupe_tables *tb = &t->t;
    const loupe_weights *w = &t->w;
    tta_work *k = &t->wk;
    int F = c->feature_size, Q = c->num_queries, L = c->dec_layers, M2 = 16 * c->grid * c->grid, i, l;
    size_t QF = (size_t)Q * F;
    float *dcur = k->d_h0, *dnext = k->d_h1, *swap, *gqf = grad_of(t, w->query_feat);
    /* the mask einsum of all L predictions: masks[q][p] = me[q] . mask_features[p] */
    zero(k->d_me, (size_t)L * QF);
    zero(k->d_mf, (size_t)M2 * F);
    mask_einsum_backward(k->d_me, k->d_mf, k->d_mask, t->tape.me, t->s->mask_features, L * Q, M2, F, k->mf_t);
    zero(k->d_dec_feat, (size_t)tb->tokens * F);
    /* hidden[i] feeds prediction i (through the decoder LayerNorm) and layer i */
    for (i = L - 1; i >= 0; i--) {
        if (i == L - 1) zero(dcur, QF);
        else masked_attention_decoder_layer_backward(t, i, dnext, dcur);
        mask_predictor_backward(t, i, k->d_qh);
        layernorm_backward(dcur, grad_of(t, w->dec_ln.w), grad_of(t, w->dec_ln.b), k->d_qh, t->tape.hidden + (size_t)i * QF,
                           Q, F, w->dec_ln, c->ln_eps, k->stats);
        swap = dcur; dcur = dnext; dnext = swap;
    }
    add(gqf, gqf, dnext, QF);
    /* decoder features = multi-scale features + level embedding */
    for (l = 0; l < 3; l++)
        bias_backward(grad_of(t, w->dec_level_embed) + (size_t)l * F, k->d_dec_feat + (size_t)tb->level_start[l] * F, F,
                      tb->level_h[l] * tb->level_w[l], F);
}

/* PixelDecoderEncoderLayer backward for layer i: d hout [Te][F] -> d hin [Te][F] (=);
 * the conditional query's gradient += into wk.d_cond. */
static void pixel_decoder_encoder_layer_backward(loupe_tta *t, int i, const float *dout, float *din)
{
    const loupe_config *c = &t->m->cfg;
    const loupe_tables *tb = &t->t;
    const enc_layer_w *e = &t->w.enc[i];
    const enc_layer_acts *A = &t->tape.enc[i];
    tta_work *k = &t->wk;
    int T = tb->tokens, F = c->feature_size, H = c->m2f_heads, dh = F / H, E = c->enc_ffn, P = c->deform_points;
    int noff = H * 3 * P, l;
    size_t TF = (size_t)T * F, FF = (size_t)F * F;
    const float *hin = t->s->enc_h + (size_t)i * TF;
    float *gqkv = grad_of(t, e->cross_qkv.w), *gqkv_b = grad_of(t, e->cross_qkv.b);
    float scale = 1.0f / sqrtf((float)dh);
    /* feed-forward and final_layer_norm */
    zero(k->d_t1, TF);
    layernorm_backward(k->d_t1, grad_of(t, e->ln_final.w), grad_of(t, e->ln_final.b), dout, A->a3, T, F, e->ln_final,
                       c->ln_eps, k->stats);
    memcpy(k->d_t2, k->d_t1, TF * sizeof *k->d_t2);
    zero(k->d_effn, (size_t)T * E);
    linear_backward(k->d_effn, grad_of(t, e->fc2.w), grad_of(t, e->fc2.b), k->d_t1, F, A->ffn, T, E, F, e->fc2.w, k->wt);
    zero(k->d_effn2, (size_t)T * E);
    relu_backward(k->d_effn2, k->d_effn, A->ffn, (size_t)T * E);
    linear_backward(k->d_t2, grad_of(t, e->fc1.w), grad_of(t, e->fc1.b), k->d_effn2, E, A->h2, T, F, E, e->fc1.w, k->wt);
    /* conditional cross-attention: a2 = h1 + co on every token */
    zero(k->d_t1, TF);
    layernorm_backward(k->d_t1, grad_of(t, e->ln_cross.w), grad_of(t, e->ln_cross.b), k->d_t2, A->a2, T, F, e->ln_cross,
                       c->ln_eps, k->stats);
    memcpy(k->d_t2, k->d_t1, TF * sizeof *k->d_t2);
    zero(k->d_co, (size_t)F);
    bias_backward(k->d_co, k->d_t1, F, T, F);
    zero(k->d_catt, (size_t)F);
    linear_backward(k->d_catt, grad_of(t, e->cross_out.w), grad_of(t, e->cross_out.b), k->d_co, F, A->catt, 1, F, F,
                    e->cross_out.w, k->wt);
    zero(k->d_cq, (size_t)F);
    zero(k->d_kv, TF * 2);
    attention_backward(k->d_cq, F, k->d_kv, 2 * F, k->d_kv + F, 2 * F, k->d_catt, F, A->cq, F, A->kv, 2 * F, A->kv + F,
                       2 * F, 1, T, H, dh, scale, NULL, k->att);
    linear_backward(k->d_cond, gqkv, gqkv_b, k->d_cq, F, t->s->cond_query, 1, F, F, e->cross_qkv.w, k->wt);
    linear_backward(k->d_t2, gqkv + FF, gqkv_b + F, k->d_kv, 2 * F, A->h1, T, F, 2 * F, e->cross_qkv.w + FF, k->wt);
    /* multi-scale deformable self-attention: a1 = hin + output(msda(value(hin), offsets(q), softmax(weights(q)))) */
    zero(k->d_t1, TF);
    layernorm_backward(k->d_t1, grad_of(t, e->ln_self.w), grad_of(t, e->ln_self.b), k->d_t2, A->a1, T, F, e->ln_self,
                       c->ln_eps, k->stats);
    memcpy(din, k->d_t1, TF * sizeof *din);
    zero(k->d_msda, TF);
    linear_backward(k->d_msda, grad_of(t, e->output.w), grad_of(t, e->output.b), k->d_t1, F, A->msda, T, F, F,
                    e->output.w, k->wt);
    zero(k->d_value, TF);
    zero(k->d_offs, (size_t)T * 2 * noff);
    zero(k->d_aw, (size_t)T * noff);
    ms_deform_attn_core_backward(k->d_value, k->d_offs, k->d_aw, k->d_msda, A->value, A->offs, A->aw, tb, F, H, P);
    zero(k->d_awl, (size_t)T * noff);
    softmax_rows_backward(k->d_awl, k->d_aw, A->aw, T * H, 3 * P);
    zero(k->d_qpos, TF);
    linear_backward(k->d_qpos, grad_of(t, e->attn_weights.w), grad_of(t, e->attn_weights.b), k->d_awl, noff, A->qpos, T,
                    F, noff, e->attn_weights.w, k->wt);
    linear_backward(k->d_qpos, grad_of(t, e->offsets.w), grad_of(t, e->offsets.b), k->d_offs, 2 * noff, A->qpos, T, F,
                    2 * noff, e->offsets.w, k->wt);
    linear_backward(din, grad_of(t, e->value.w), grad_of(t, e->value.b), k->d_value, F, hin, T, F, F, e->value.w, k->wt);
    /* q = hin + position, position = sine + level_embed[level] */
    add(din, din, k->d_qpos, TF);
    for (l = 0; l < 3; l++)
        bias_backward(grad_of(t, t->w.level_embed) + (size_t)l * F, k->d_qpos + (size_t)tb->level_start[l] * F, F,
                      tb->level_h[l] * tb->level_w[l], F);
}

/* PixelDecoder backward: d mask features and d multi-scale features -> d of the
 * pyramid levels it reads (wk.d_fpn4, d_fpn2, d_fpn_half; the 1x level into d_grid
 * when not NULL), parameter gradients. */
static void pixel_decoder_backward(loupe_tta *t, float *d_grid)
{
    const loupe_config *c = &t->m->cfg;
    const loupe_tables *tb = &t->t;
    const loupe_weights *w = &t->w;
    loupe_session *s = t->s;
    tta_work *k = &t->wk;
    int F = c->feature_size, W = c->width, T = tb->tokens, M = 4 * c->grid, i, l;
    size_t MF = (size_t)M * M * F;
    float *dcur = k->d_e0, *dnext = k->d_e1, *swap;
    const float *inputs[3];
    float *d_inputs[3];
    inputs[0] = s->fpn_half; inputs[1] = s->feats + W; inputs[2] = s->fpn2;
    d_inputs[0] = k->d_fpn_half; d_inputs[1] = d_grid; d_inputs[2] = k->d_fpn2;
    /* mask_projection, ReLU, layer_1 GroupNorm and 3x3 convolution */
    zero(k->d_m1, MF);
    linear_backward(k->d_m1, grad_of(t, w->mask_projection.w), grad_of(t, w->mask_projection.b), k->d_mf, F, s->fpn_out,
                    M * M, F, F, w->mask_projection.w, k->wt);
    zero(k->d_m2, MF);
    relu_backward(k->d_m2, k->d_m1, s->fpn_out, MF);
    zero(k->d_m1, MF);
    groupnorm_hwc_backward(k->d_m1, grad_of(t, w->layer_1_gn.w), grad_of(t, w->layer_1_gn.b), k->d_m2, t->tape.conv_pre,
                           M * M, F, c->gn_groups, w->layer_1_gn, c->gn_eps);
    zero(k->d_m2, MF);
    conv3x3_hwc_backward(k->d_m2, grad_of(t, w->layer_1), k->d_m1, s->lateral, M, M, F, F, w->layer_1, k->wt);
    /* the lateral sum: adapter_1 (1x1 conv + GroupNorm) + the upsampled 2x level */
    memcpy(dcur, k->d_dec_feat, (size_t)T * F * sizeof *dcur);
    interp_hwc_backward(dcur + (size_t)tb->level_start[2] * F, k->d_m2, tb->level_h[2], tb->level_w[2], F, M, M,
                        s->interp);
    zero(k->d_m1, MF);
    groupnorm_hwc_backward(k->d_m1, grad_of(t, w->adapter_gn.w), grad_of(t, w->adapter_gn.b), k->d_m2, t->tape.lat_pre,
                           M * M, F, c->gn_groups, w->adapter_gn, c->gn_eps);
    zero(k->d_fpn4, (size_t)M * M * W);
    linear_backward(k->d_fpn4, grad_of(t, w->adapter_1.w), NULL, k->d_m1, F, s->fpn4, M * M, W, F, w->adapter_1.w, k->wt);
    /* the deformable encoder, last layer first */
    for (i = c->enc_layers - 1; i >= 0; i--) {
        pixel_decoder_encoder_layer_backward(t, i, dcur, dnext);
        swap = dcur; dcur = dnext; dnext = swap;
    }
    /* input projections: 1x1 conv + GroupNorm per level (the 1x level is the frozen grid) */
    zero(k->d_fpn_half, (size_t)tb->level_h[0] * tb->level_w[0] * W);
    zero(k->d_fpn2, (size_t)tb->level_h[2] * tb->level_w[2] * W);
    for (l = 0; l < 3; l++) {
        int n = tb->level_h[l] * tb->level_w[l];
        size_t at = (size_t)tb->level_start[l] * F;
        zero(k->d_t1, (size_t)n * F);
        groupnorm_hwc_backward(k->d_t1, grad_of(t, w->input_gn[l].w), grad_of(t, w->input_gn[l].b), dcur + at,
                               t->tape.proj + at, n, F, c->gn_groups, w->input_gn[l], c->gn_eps);
        linear_backward(d_inputs[l], grad_of(t, w->input_proj[l].w), grad_of(t, w->input_proj[l].b), k->d_t1, F,
                        inputs[l], n, W, F, w->input_proj[l].w, k->wt);
    }
}

/* ScaleBlock backward for block blk of the tape: dout [h'*w'][W] -> din [h*w][W] +=
 * (when din), parameter gradients. */
static void scale_block_backward(loupe_tta *t, const scale_block_w *b, int blk, const float *in, int h, int w,
                                 const float *dout, float *din)
{
    const loupe_config *c = &t->m->cfg;
    const scale_block_acts *A = &t->tape.fpn[blk];
    tta_work *k = &t->wk;
    int W = c->width, oh = b->convt ? 2 * h : h / 2, ow = b->convt ? 2 * w : w / 2;
    size_t n = (size_t)oh * ow * W;
    zero(k->d_f1, n);
    layernorm_backward(k->d_f1, grad_of(t, b->norm.w), grad_of(t, b->norm.b), dout, A->dw, oh * ow, W, b->norm,
                       c->fpn_ln_eps, k->stats);
    zero(k->d_f2, n);
    depthwise3x3_hwc_backward(k->d_f2, grad_of(t, b->dw), k->d_f1, A->act, oh, ow, W, b->dw);
    zero(k->d_f1, n);
    gelu_backward(k->d_f1, k->d_f2, A->pre, n);
    if (b->convt)
        conv_transpose2x2_hwc_backward(din, grad_of(t, b->convt), grad_of(t, b->conv1.b), k->d_f1, in, h, w, W, W,
                                       b->convt, k->wt);
    else if (din)
        maxpool2x2_hwc_backward(din, k->d_f1, in, h, w, W);
}

/* FeaturePyramid backward: the pixel decoder's gradients of the 4x, 2x and 0.5x maps
 * -> parameter gradients (and d of the patch grid into d_grid when not NULL). */
static void feature_pyramid_backward(loupe_tta *t, float *d_grid)
{
    const loupe_config *c = &t->m->cfg;
    const loupe_weights *w = &t->w;
    tta_work *k = &t->wk;
    int g = c->grid, W = c->width;
    const float *grid = t->s->feats + W;
    scale_block_backward(t, &w->fpn_half, 3, grid, g, g, k->d_fpn_half, d_grid);
    scale_block_backward(t, &w->fpn2, 2, grid, g, g, k->d_fpn2, d_grid);
    zero(k->d_fpn_mid, (size_t)4 * g * g * W);
    scale_block_backward(t, &w->fpn4[1], 1, t->s->fpn_mid, 2 * g, 2 * g, k->d_fpn4, k->d_fpn_mid);
    scale_block_backward(t, &w->fpn4[0], 0, grid, g, g, k->d_fpn_mid, d_grid);
}

/* Backward of conditional_query: label_embedding[1] gets p * d, label_embedding[0] (1 - p) * d. */
static void conditional_query_backward(loupe_tta *t)
{
    int F = t->m->cfg.feature_size, i;
    float p = t->s->prob, *g0 = grad_of(t, t->w.label_embedding[0]), *g1 = grad_of(t, t->w.label_embedding[1]);
    for (i = 0; i < F; i++) {
        g1[i] += p * t->wk.d_cond[i];
        g0[i] += (1.0f - p) * t->wk.d_cond[i];
    }
}

/* LoupeSegmentor backward after a TTA forward and the loss (wk.d_class, wk.d_mask):
 * every segmentor parameter's gradient +=; the patch grid's (backbone features) into
 * d_grid [g*g][W] += when not NULL (loupe.c keeps the backbone frozen; tests use it). */
static void segmentor_backward(loupe_tta *t, float *d_grid)
{
    zero(t->wk.d_cond, (size_t)t->m->cfg.feature_size);
    masked_attention_decoder_backward(t);
    pixel_decoder_backward(t, d_grid);
    feature_pyramid_backward(t, d_grid);
    conditional_query_backward(t);
}

/* ---- One step: forward, pseudo-label loss, backward; clipping and AdamW ---- */

/* The loss half of LoupeModel.forward in stage test with labels = None, after a forward
 * of t->s: turns the classifier's verdict into pseudo targets and evaluates LoupeSegLoss;
 * its gradients w.r.t. every prediction's logits land in wk.d_class, wk.d_mask (=). */
static void tta_loss(loupe_tta *t, loupe_tta_loss *out)
{
    const loupe_config *c = &t->m->cfg;
    loupe_session *s = t->s;
    tta_work *k = &t->wk;
    int L = c->dec_layers, Q = c->num_queries, C = c->num_labels + 1, g = c->grid, M = 4 * g, i;
    double total;
    for (i = 0; i < g * g; i++) k->pseudo_mask[i] = sigmoidf(s->patch_logits[i]);
    zero(k->d_class, (size_t)L * Q * C);
    zero(k->d_mask, (size_t)L * Q * M * M);
    for (i = 0; i < L; i++) {
        t->preds[i].class_logits = s->class_logits + (size_t)i * Q * C;
        t->preds[i].mask_logits = s->mask_logits + (size_t)i * Q * M * M;
        t->preds[i].grad_class_logits = k->d_class + (size_t)i * Q * C;
        t->preds[i].grad_mask_logits = k->d_mask + (size_t)i * Q * M * M;
    }
    loupe_seg_loss(&t->loss_cfg, L, Q, M, g, t->preds, s->prob, k->pseudo_mask, &t->rng, &k->loss, t->calls, &total);
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

/* LoupeModel.forward in stage test with labels = None: the forward of pixel_values with
 * the adapted segmentor (keeping the tape), then tta_loss. */
static int tta_forward_loss(loupe_tta *t, const float *pixel_values, loupe_tta_loss *out, char *err, size_t errsize)
{
    if (loupe_forward(t->s, pixel_values, err, errsize)) return -1;
    tta_loss(t, out);
    return 0;
}

/* tta_forward_loss, then the backward: adds weight * the gradient to t->grad (and the
 * patch grid's into d_grid [g*g][W] when not NULL). */
static int tta_accumulate(loupe_tta *t, const float *pixel_values, float weight, loupe_tta_loss *out, float *d_grid,
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
    segmentor_backward(t, d_grid);
    if (out) *out = loss;
    return 0;
}

/* L2 norm of all gradients (clip_grad_norm_'s total norm), accumulated in double. */
static double tta_grad_norm(const loupe_tta *t)
{
    double sum = 0.0;
    size_t i;
    for (i = 0; i < t->n_floats; i++) sum += (double)t->grad[i] * t->grad[i];
    return sqrt(sum);
}

/* torch.optim.AdamW (one step, PyTorch's float32 operations in its order: lerp, addcmul,
 * addcdiv as self + value * t1 / t2; upstream's step1 is reproduced bit for bit) on gradients
 * scaled by clip_coef, as clip_grad_norm_ leaves them; weight decay only for tensors
 * whose name has no "bias". Zeroes the gradients and refreshes the derived tables. */
static void adamw_step(loupe_tta *t, float clip_coef)
{
    const loupe_tta_options *o = &t->opt;
    double bc1, bc2;
    float step_size, bc2_sqrt, one_b1 = (float)(1.0 - o->beta1), one_b2 = (float)(1.0 - o->beta2);
    float b2 = (float)o->beta2, eps = (float)o->eps;
    int p;
    t->steps++;
    bc1 = 1.0 - pow(o->beta1, (double)t->steps);
    bc2 = 1.0 - pow(o->beta2, (double)t->steps);
    step_size = (float)(o->lr / bc1);
    bc2_sqrt = (float)sqrt(bc2);
    for (p = 0; p < t->n_params; p++) {
        const tta_param *tp = &t->params[p];
        float decay = (float)(1.0 - o->lr * (tp->decay ? o->weight_decay : 0.0));
        float *w = t->param + tp->offset, *g = t->grad + tp->offset;
        float *m = t->adam_m + tp->offset, *v = t->adam_v + tp->offset;
        size_t i;
        for (i = 0; i < tp->numel; i++) {
            float gi = g[i] * clip_coef, denom;
            w[i] *= decay;
            m[i] += one_b1 * (gi - m[i]);
            v[i] = v[i] * b2 + one_b2 * gi * gi;
            denom = sqrtf(v[i]) / bc2_sqrt + eps;
            w[i] -= step_size * m[i] / denom;
        }
    }
    zero(t->grad, t->n_floats);
    tta_refresh_tables(t);
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

/* Counts the weight file's segmentor tensors; *unknown receives one that is not trainable here. */
static int count_segmentor_tensors(const loupe_tta *t, const tta_param *params, int n, const tensor_entry **unknown)
{
    int i, j, count = 0;
    size_t plen = strlen(TTA_SEGMENTOR_PREFIX);
    *unknown = NULL;
    for (i = 0; i < t->m->n_entries; i++) {
        const tensor_entry *e = &t->m->entries[i];
        int known = 0;
        if ((size_t)e->name_len < plen || memcmp(e->name, TTA_SEGMENTOR_PREFIX, plen) != 0) continue;
        count++;
        for (j = 0; j < n && !known; j++)
            known = strlen(params[j].name) == (size_t)e->name_len && !memcmp(params[j].name, e->name, (size_t)e->name_len);
        if (!known && !*unknown) *unknown = e;
    }
    return count;
}

loupe_tta *loupe_tta_new(const loupe_model *m, const loupe_tta_options *opt, char *err, size_t errsize)
{
    const loupe_config *c;
    loupe_tta *t;
    param_builder pb;
    arena a = {NULL, 0, 0};
    const tensor_entry *unknown;
    int L;
    if (!m) { fail(err, errsize, "no model given"); return NULL; }
    c = &m->cfg;
    L = c->dec_layers;
    if (c->num_labels != 1) {
        fail(err, errsize, "%s: test-time adaptation needs Loupe's single label (this model has %d)", m->path, c->num_labels);
        return NULL;
    }
    if (opt && !(opt->lr >= 0.0 && opt->lr < 1.0 && opt->beta1 >= 0.0 && opt->beta1 < 1.0 && opt->beta2 >= 0.0 &&
                 opt->beta2 < 1.0 && opt->eps > 0.0 && opt->weight_decay >= 0.0 && opt->weight_decay < 1.0 &&
                 opt->clip_norm > 0.0)) {
        fail(err, errsize, "invalid test-time adaptation options (learning rate, betas and weight decay in [0, 1), eps and clip norm > 0)");
        return NULL;
    }
    t = calloc(1, sizeof *t);
    if (!t) { fail(err, errsize, "out of memory"); return NULL; }
    t->m = m;
    if (opt) t->opt = *opt;
    else loupe_tta_default_options(&t->opt);
    t->w = m->w;
    t->t = m->t;
    t->loss_cfg = seg_loss_config_default();
    t->enc = calloc((size_t)c->enc_layers + 1, sizeof *t->enc);
    t->dec = calloc((size_t)L, sizeof *t->dec);
    t->tape.enc = calloc((size_t)c->enc_layers + 1, sizeof *t->tape.enc);
    t->tape.dec = calloc((size_t)L, sizeof *t->tape.dec);
    t->calls = calloc((size_t)L, sizeof *t->calls);
    t->preds = calloc((size_t)L, sizeof *t->preds);
    if (!t->enc || !t->dec || !t->tape.enc || !t->tape.dec || !t->calls || !t->preds) goto oom;
    memcpy(t->enc, m->w.enc, (size_t)c->enc_layers * sizeof *t->enc);
    memcpy(t->dec, m->w.dec, (size_t)(L - 1) * sizeof *t->dec);
    t->w.enc = t->enc;
    t->w.dec = t->dec;
    /* count the trainable tensors, then plan one block: tape, scratch, parameters + AdamW */
    memset(&pb, 0, sizeof pb);
    segmentor_params(&pb, &t->w, c);
    t->n_params = pb.count;
    t->n_floats = pb.floats;
    t->params = calloc((size_t)t->n_params, sizeof *t->params);
    if (!t->params) goto oom;
    tta_tape_layout(t, &a);
    t->tape_bytes = a.used;
    tta_work_layout(t, &a);
    t->work_bytes = a.used - t->tape_bytes;
    tta_state_layout(t, &a);
    t->state_bytes = a.used - t->tape_bytes - t->work_bytes;
    a.cap = a.used;
    a.used = 0;
    a.base = aligned_block(a.cap, &t->raw);
    if (!a.base) {
        fail(err, errsize, "out of memory: test-time adaptation needs %.1f MiB", (double)a.cap / (1 << 20));
        loupe_tta_free(t);
        return NULL;
    }
    tta_tape_layout(t, &a);
    tta_work_layout(t, &a);
    tta_state_layout(t, &a);
    zero(t->grad, t->n_floats);
    zero(t->adam_m, t->n_floats);
    zero(t->adam_v, t->n_floats);
    /* copy the segmentor out of the read-only model */
    pb.params = t->params;
    pb.data = t->param;
    pb.b.m = m; pb.b.err = err; pb.b.errsize = errsize; pb.b.failed = 0;
    pb.count = 0;
    pb.floats = 0;
    segmentor_params(&pb, &t->w, c);
    if (pb.b.failed) { loupe_tta_free(t); return NULL; }
    if (count_segmentor_tensors(t, t->params, t->n_params, &unknown) != t->n_params || unknown) {
        if (unknown) fail(err, errsize, "%s: tensor %.*s is not one test-time adaptation knows how to train", m->path,
                          unknown->name_len, unknown->name);
        else fail(err, errsize, "%s: the weight file's segmentor tensors do not match this build's", m->path);
        loupe_tta_free(t);
        return NULL;
    }
    tta_refresh_tables(t);
    t->s = loupe_session_new(m, err, errsize);
    if (!t->s) { loupe_tta_free(t); return NULL; }
    t->s->w = &t->w;
    t->s->t = &t->t;
    t->s->tape = &t->tape;
    t->rng_state.seed = t->opt.seed;
    t->rng_state.counter = 0;
    t->rng.fill = splitmix_uniform_fill;
    t->rng.state = &t->rng_state;
    return t;
oom:
    fail(err, errsize, "out of memory");
    loupe_tta_free(t);
    return NULL;
}

void loupe_tta_free(loupe_tta *t)
{
    if (!t) return;
    loupe_session_free(t->s);
    free(t->raw);
    free(t->params);
    free(t->enc);
    free(t->dec);
    free(t->tape.enc);
    free(t->tape.dec);
    free(t->calls);
    free(t->preds);
    free(t);
}

int loupe_tta_accumulate(loupe_tta *t, const float *pixel_values, float weight, loupe_tta_loss *loss, char *err,
                         size_t errsize)
{
    if (!t || !pixel_values) return fail(err, errsize, "loupe_tta_accumulate needs an adapter and an input tensor");
    if (!(weight >= 0.0f && weight <= TTA_MAX_WEIGHT))
        return fail(err, errsize, "gradient weight %g is outside 0..%g", (double)weight, (double)TTA_MAX_WEIGHT);
    return tta_accumulate(t, pixel_values, weight, loss, NULL, err, errsize);
}

int loupe_tta_update(loupe_tta *t, double *grad_norm, char *err, size_t errsize)
{
    double norm;
    float coef;
    if (!t) return fail(err, errsize, "loupe_tta_update needs an adapter");
    norm = tta_grad_norm(t);
    if (!isfinite(norm)) {
        zero(t->grad, t->n_floats);
        return fail(err, errsize, "the gradient is not finite; the update was skipped");
    }
    /* clip_grad_norm_ (in float32, like PyTorch): scale by max_norm / (norm + eps) when below 1 */
    coef = (float)t->opt.clip_norm / ((float)norm + (float)TTA_CLIP_EPS);
    adamw_step(t, coef < 1.0f ? coef : 1.0f);
    if (grad_norm) *grad_norm = norm;
    return 0;
}

int loupe_tta_step(loupe_tta *t, const float *pixel_values, loupe_tta_loss *loss, char *err, size_t errsize)
{
    double norm;
    if (loupe_tta_accumulate(t, pixel_values, 1.0f, loss, err, errsize) || loupe_tta_update(t, &norm, err, errsize))
        return -1;
    if (loss) loss->grad_norm = norm;
    return 0;
}

int loupe_tta_adapt(loupe_tta *t, int n_images, loupe_tta_source source, void *user, int steps, int batch,
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

int loupe_session_use_tta(loupe_session *s, const loupe_tta *t, char *err, size_t errsize)
{
    if (!s) return fail(err, errsize, "no session given");
    if (t && t->m != s->m) return fail(err, errsize, "the adapter was made for another model than the session's");
    s->w = t ? &t->w : &s->m->w;
    s->t = t ? &t->t : &s->m->t;
    return 0;
}

void loupe_tta_get_memory(const loupe_tta *t, loupe_tta_memory *mem)
{
    mem->saved_activations = t->tape_bytes;
    mem->backward_scratch = t->work_bytes;
    mem->parameters = t->state_bytes;
    mem->session = t->s->bytes;
    mem->trainable = t->n_floats;
}

/* Bytes copied per write while saving. */
#define SAVE_CHUNK (1 << 20)

int loupe_tta_save(const loupe_tta *t, const char *path, char *err, size_t errsize)
{
    char tmp[1024];
    FILE *f;
    size_t done = 0, most = 0;
    float *buf;
    int p, i, ok = 1;
    if (!t || !path) return fail(err, errsize, "loupe_tta_save needs an adapter and a path");
    if (strlen(path) + 5 > sizeof tmp) return fail(err, errsize, "%s: path too long", path);
    for (p = 0; p < t->n_params; p++) most = t->params[p].numel > most ? t->params[p].numel : most;
    buf = malloc(most * sizeof *buf);
    if (!buf) return fail(err, errsize, "out of memory");
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    f = fopen(tmp, "wb");
    if (!f) {
        free(buf);
        return fail(err, errsize, "%s: cannot create: %s", tmp, strerror(errno));
    }
    /* the model's file as it is, then each segmentor tensor overwritten in place */
    while (ok && done < t->m->size) {
        size_t n = t->m->size - done < SAVE_CHUNK ? t->m->size - done : SAVE_CHUNK;
        ok = fwrite(t->m->data + done, 1, n, f) == n;
        done += n;
    }
    for (p = 0; ok && p < t->n_params; p++) {
        const tta_param *tp = &t->params[p];
        for (i = 0; i < t->m->n_entries; i++) {
            const tensor_entry *e = &t->m->entries[i];
            if ((size_t)e->name_len != strlen(tp->name) || memcmp(e->name, tp->name, (size_t)e->name_len)) continue;
            param_to_upstream(tp, t->param + tp->offset, buf);
            ok = e->nbytes == tp->numel * sizeof *buf && fseek(f, (long)e->offset, SEEK_SET) == 0 &&
                 fwrite(buf, sizeof *buf, tp->numel, f) == tp->numel;
            break;
        }
    }
    free(buf);
    if (fclose(f) != 0) ok = 0;
    if (!ok || rename(tmp, path) != 0) {
        remove(tmp);
        return fail(err, errsize, "%s: cannot write the adapted weight file", path);
    }
    return 0;
}

/* ========================================================================== */
/* 10. CLI                                                                    */
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
                       void *user, int quiet, loupe_tta **out)
{
    loupe_tta_options opt;
    loupe_tta *t;
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

/* ---- The command (this branch: binary PPM input of the model's size; see README) ---- */

static const char usage_text[] =
    "usage: loupe -m MODEL.bin [options] IMAGE.ppm...\n"
    "\n"
    "Detects and localizes image forgeries with Loupe. Prints one line per image,\n"
    "`name,probability`. Images: binary PPM (P6, maxval 255) of exactly the model's\n"
    "input size (336x336 for the full model).\n"
    "\n"
    "  -m, --model FILE      weight file written by tools/convert.py (required)\n"
    "      --threads N       number of threads (default: all cores)\n"
    "  -q, --quiet           no progress on stderr (errors are still reported)\n"
    "  -h, --help            show this help\n"
    "\n";

/* Reads a binary PPM of exactly S x S pixels into pixel_values [3][S][S] with upstream's
 * normalization ((x / 255 - 0.5) / 0.5). */
static int cli_read_ppm(const char *path, int S, float *pixel_values, char *err, size_t errsize)
{
    FILE *f = fopen(path, "rb");
    int w = 0, h = 0, maxval = 0, c, p;
    unsigned char *rgb;
    if (!f) return fail(err, errsize, "%s: cannot open: %s", path, strerror(errno));
    if (fscanf(f, "P6 %d %d %d", &w, &h, &maxval) != 3 || fgetc(f) == EOF || maxval != 255) {
        fclose(f);
        return fail(err, errsize, "%s: not a binary PPM (P6, maxval 255)", path);
    }
    if (w != S || h != S) {
        fclose(f);
        return fail(err, errsize, "%s: is %dx%d; this build needs %dx%d PPM input", path, w, h, S, S);
    }
    rgb = malloc((size_t)S * S * 3);
    if (!rgb || fread(rgb, 3, (size_t)S * S, f) != (size_t)S * S) {
        free(rgb);
        fclose(f);
        return fail(err, errsize, "%s: truncated image data", path);
    }
    fclose(f);
    for (c = 0; c < 3; c++)
        for (p = 0; p < S * S; p++) {
            float v = (float)((double)rgb[(size_t)p * 3 + c] * (1.0 / 255.0));
            pixel_values[(size_t)c * S * S + p] = (v - 0.5f) / 0.5f;
        }
    free(rgb);
    return 0;
}

/* The command's image list, for cli_tta_run's loader. */
typedef struct cli_inputs {
    char **paths;
    int S;
} cli_inputs;

static int cli_load_input(void *user, int index, float *pixel_values, char *err, size_t errsize)
{
    const cli_inputs *in = user;
    return cli_read_ppm(in->paths[index], in->S, pixel_values, err, errsize);
}

int main(int argc, char **argv)
{
    char err[512];
    const char *model = NULL;
    cli_tta tta;
    cli_inputs in;
    loupe_model *m = NULL;
    loupe_session *s = NULL;
    loupe_tta *adapter = NULL;
    float *pixels = NULL;
    int i, n = 0, quiet = 0, status = 0, used;
    double v;
    cli_tta_init(&tta);
    in.paths = malloc((size_t)argc * sizeof *in.paths);
    if (!in.paths) { fprintf(stderr, "loupe: out of memory\n"); return 1; }
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-' || !a[1]) in.paths[n++] = argv[i];
        else if (!strcmp(a, "-h") || !strcmp(a, "--help")) { fputs(usage_text, stdout); fputs(cli_tta_usage, stdout); goto done; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { model = next; i++; }
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) quiet = 1;
        else if (!strcmp(a, "--threads")) {
            if (cli_tta_number(a, next, 1, 4096, 1, &v)) { status = 2; goto done; }
            loupe_set_threads((int)v);
            i++;
        } else if ((used = cli_tta_option(&tta, a, next)) != 0) {
            if (used < 0) { status = 2; goto done; }
            i += used - 1;
        } else { fprintf(stderr, "loupe: unknown option %s (see loupe -h)\n", a); status = 2; goto done; }
    }
    if (!model || n == 0) { fprintf(stderr, "loupe: give a model (-m MODEL.bin) and images (see loupe -h)\n"); status = 2; goto done; }
    if (!(m = loupe_model_load(model, err, sizeof err)) || !(s = loupe_session_new(m, err, sizeof err))) {
        fprintf(stderr, "loupe: %s\n", err);
        status = 1;
        goto done;
    }
    in.S = loupe_model_config(m)->image_size;
    pixels = malloc((size_t)3 * in.S * in.S * sizeof *pixels);
    if (!pixels) { fprintf(stderr, "loupe: out of memory\n"); status = 1; goto done; }
    if (cli_tta_run(&tta, m, s, n, cli_load_input, &in, quiet, &adapter)) { status = 1; goto done; }
    for (i = 0; i < n; i++) {
        if (cli_read_ppm(in.paths[i], in.S, pixels, err, sizeof err) || loupe_forward(s, pixels, err, sizeof err)) {
            fprintf(stderr, "loupe: %s\n", err);
            status = 1;
            continue;
        }
        printf("%s,%.4f\n", in.paths[i], loupe_get_outputs(s)->prob);
    }
done:
    loupe_session_free(s);
    loupe_tta_free(adapter);
    loupe_model_free(m);
    free(pixels);
    free(in.paths);
    return status;
}
#endif
