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
 *   9. CLI                  the `loupe` command
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
    loupe_model *m;
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

/* Exact (erf) GELU, in place: x * (1 + erf(x / sqrt 2)) / 2. */
static void gelu(float *x, size_t n)
{
    size_t i;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel_ok((double)n * 16))
#endif
    for (i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * (float)LOUPE_SQRT1_2));
}

/* ReLU in place. */
static void relu(float *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
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

/* ========================================================================== */
/* Sessions: one planned arena holds every activation of a forward pass        */
/* ========================================================================== */

struct loupe_session {
    const loupe_model *m;
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
}

loupe_session *loupe_session_new(const loupe_model *m, char *err, size_t errsize)
{
    loupe_session *s;
    arena a = {NULL, 0, 0};
    if (!m) { fail(err, errsize, "no model given"); return NULL; }
    s = calloc(1, sizeof *s);
    if (!s) { fail(err, errsize, "out of memory"); return NULL; }
    s->m = m;
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
    const loupe_weights *w = &s->m->w;
    int F = s->m->cfg.feature_size, i;
    float p = s->prob;
    for (i = 0; i < F; i++) s->cond_query[i] = w->label_embedding[1][i] * p + w->label_embedding[0][i] * (1.0f - p);
    tap(s, "conditional_query", s->cond_query, 0, 3, 1, 1, F, 0);
}

/* ScaleBlock.forward: conv1 (ConvTranspose2d 2x2/2 up, or MaxPool2d 2x2/2 down) ->
 * GELU -> depthwise 3x3 conv2 -> LayerNorm2d (eps 1e-6):
 * in [h*w][W] -> out [h'*w'][W]; *oh, *ow receive h', w'. */
static void scale_block(loupe_session *s, const scale_block_w *b, const float *in, int h, int w, float *out,
                        int *oh, int *ow)
{
    const loupe_config *c = &s->m->cfg;
    int W = c->width;
    if (b->convt) {
        conv_transpose2x2_hwc(s->fpn_tmp, in, h, w, W, W, b->convt, b->conv1.b);
        *oh = 2 * h; *ow = 2 * w;
    } else {
        maxpool2x2_hwc(s->fpn_tmp, in, h, w, W);
        *oh = h / 2; *ow = w / 2;
    }
    gelu(s->fpn_tmp, (size_t)*oh * *ow * W);
    depthwise3x3_hwc(out, s->fpn_tmp, *oh, *ow, W, b->dw);
    layernorm(out, out, *oh * *ow, W, b->norm, c->fpn_ln_eps);
}

/* FeaturePyramid.forward: the patch grid [g*g][W] at scales 4x, 2x, 1x, 0.5x. */
static void feature_pyramid(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = &s->m->w;
    int g = c->grid, W = c->width, h, wd;
    const float *grid = s->feats + W; /* patch tokens, row-major = channels-last g x g map */
    scale_block(s, &w->fpn4[0], grid, g, g, s->fpn_mid, &h, &wd);
    scale_block(s, &w->fpn4[1], s->fpn_mid, h, wd, s->fpn4, &h, &wd);
    tap(s, "fpn_0", s->fpn4, 1, 4, 1, W, h, wd);
    scale_block(s, &w->fpn2, grid, g, g, s->fpn2, &h, &wd);
    tap(s, "fpn_1", s->fpn2, 1, 4, 1, W, h, wd);
    tap(s, "fpn_2", grid, 1, 4, 1, W, g, g);
    scale_block(s, &w->fpn_half, grid, g, g, s->fpn_half, &h, &wd);
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

/* PixelDecoderEncoderLayer.forward (Loupe): deformable self-attention, the conditional
 * cross-attention of the label query over all tokens (its single output row is added
 * to every token), then the ReLU FFN; post-norm: hin [Te][F] -> hout [Te][F]. */
static void pixel_decoder_encoder_layer(loupe_session *s, const enc_layer_w *e, const float *hin, float *hout)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_tables *tb = &s->m->t;
    int T = tb->tokens, F = c->feature_size, H = c->m2f_heads, dh = F / H, E = c->enc_ffn, t;
    int noff = H * 3 * c->deform_points;
    float scale = 1.0f / sqrtf((float)dh);
    /* Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention */
    add(s->qpos, hin, tb->enc_pos, (size_t)T * F);
    linear(s->value, hin, T, F, F, e->value);
    linear(s->offs, s->qpos, T, F, 2 * noff, e->offsets);
    linear(s->aw, s->qpos, T, F, noff, e->attn_weights);
    softmax_rows(s->aw, T * H, 3 * c->deform_points);
    ms_deform_attn_core(s->msda, s->value, s->offs, s->aw, tb, F, H, c->deform_points);
    linear(s->tmp, s->msda, T, F, F, e->output);
    add(s->tmp, s->tmp, hin, (size_t)T * F);
    layernorm(hout, s->tmp, T, F, e->ln_self, c->ln_eps);
    /* cross_attn (nn.MultiheadAttention): query = conditional query, keys/values = tokens */
    gemm_nt(1, F, F, s->cond_query, F, e->cross_qkv.w, F, e->cross_qkv.b, s->cq, F, 0);
    gemm_nt(T, 2 * F, F, hout, F, e->cross_qkv.w + (size_t)F * F, F, e->cross_qkv.b + F, s->kv, 2 * F, 0);
    attention(s->catt, F, s->cq, F, s->kv, 2 * F, s->kv + F, 2 * F, 1, T, H, dh, scale, NULL, s->scores);
    linear(s->cq, s->catt, 1, F, F, e->cross_out);
    for (t = 0; t < T; t++) add(hout + (size_t)t * F, hout + (size_t)t * F, s->cq, (size_t)F);
    layernorm(hout, hout, T, F, e->ln_cross, c->ln_eps);
    /* feed-forward */
    linear(s->ffn, hout, T, F, E, e->fc1);
    relu(s->ffn, (size_t)T * E);
    gemm_nt(T, F, E, s->ffn, E, e->fc2.w, E, e->fc2.b, hout, F, 1);
    layernorm(hout, hout, T, F, e->ln_final, c->ln_eps);
}

/* PixelDecoder.forward (Loupe's Mask2FormerPixelDecoder): input projections of the
 * 0.5x, 1x, 2x maps, the conditional deformable encoder, then the extra FPN level at
 * 4x (adapter_1 + upsampled 2x level, layer_1) and the mask projection. */
static void pixel_decoder(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = &s->m->w;
    const loupe_tables *tb = &s->m->t;
    int F = c->feature_size, W = c->width, T = tb->tokens, g = c->grid, M = 4 * g, l, i;
    const float *inputs[3];
    float *last;
    char name[48];
    inputs[0] = s->fpn_half; inputs[1] = s->feats + W; inputs[2] = s->fpn2;
    for (l = 0; l < 3; l++) {
        float *dst = s->enc_h + (size_t)tb->level_start[l] * F;
        int n = tb->level_h[l] * tb->level_w[l];
        linear(dst, inputs[l], n, W, F, w->input_proj[l]);
        groupnorm_hwc(dst, n, F, c->gn_groups, w->input_gn[l], c->gn_eps);
    }
    tap(s, "pixdec_enc_input", s->enc_h, 0, 3, 1, T, F, 0);
    tap(s, "pixdec_enc_pos", tb->enc_pos, 0, 3, 1, T, F, 0);
    for (i = 0; i < c->enc_layers; i++) {
        float *out = s->enc_h + (size_t)(i + 1) * T * F;
        pixel_decoder_encoder_layer(s, &w->enc[i], s->enc_h + (size_t)i * T * F, out);
        snprintf(name, sizeof name, "pixdec_enc_layer%d", i);
        tap(s, name, out, 0, 3, 1, T, F, 0);
    }
    last = s->enc_h + (size_t)c->enc_layers * T * F;
    for (l = 0; l < 3; l++) {
        snprintf(name, sizeof name, "multi_scale_features_%d", l);
        tap(s, name, last + (size_t)tb->level_start[l] * F, 1, 4, 1, F, tb->level_h[l], tb->level_w[l]);
    }
    /* extra FPN level: adapter_1 (1x1 conv + GroupNorm) + bilinear upsample of the 2x level */
    linear(s->lateral, s->fpn4, M * M, W, F, w->adapter_1);
    groupnorm_hwc(s->lateral, M * M, F, c->gn_groups, w->adapter_gn, c->gn_eps);
    interp_hwc(last + (size_t)tb->level_start[2] * F, tb->level_h[2], tb->level_w[2], F, s->fpn_out, M, M, s->interp);
    add(s->lateral, s->lateral, s->fpn_out, (size_t)M * M * F);
    /* layer_1: 3x3 conv + GroupNorm + ReLU, then mask_projection (1x1 conv) */
    conv3x3_hwc(s->fpn_out, s->lateral, M, M, F, F, w->layer_1);
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
    const loupe_weights *w = &s->m->w;
    const loupe_tables *tb = &s->m->t;
    int F = c->feature_size, Q = c->num_queries, M = 4 * c->grid, C = c->num_labels + 1, q;
    int lh = tb->level_h[level], lw = tb->level_w[level];
    const float *inter = s->query_hidden + (size_t)i * Q * F;
    float *masks = s->mask_logits + (size_t)i * Q * M * M, *att = s->attn_logits + (size_t)i * Q * 4 * c->grid * c->grid;
    char name[48];
    linear(s->me_a, inter, Q, F, F, w->mask_embed[0]);
    relu(s->me_a, (size_t)Q * F);
    linear(s->me_b, s->me_a, Q, F, F, w->mask_embed[1]);
    relu(s->me_b, (size_t)Q * F);
    linear(s->me, s->me_b, Q, F, F, w->mask_embed[2]);
    gemm_nt(Q, M * M, F, s->me, F, s->mask_features, F, NULL, masks, M * M, 0);
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
 * attends everywhere), self-attention among queries, ReLU FFN; post-norm. */
static void masked_attention_decoder_layer(loupe_session *s, const dec_layer_w *d, int level, const float *prev_att)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_tables *tb = &s->m->t;
    const loupe_weights *w = &s->m->w;
    int F = c->feature_size, Q = c->num_queries, H = c->m2f_heads, dh = F / H, E = c->dec_ffn, q, j;
    int n = tb->level_h[level] * tb->level_w[level];
    const float *feat = s->dec_feat + (size_t)tb->level_start[level] * F;
    const float *pos = tb->dec_pos + (size_t)tb->level_start[level] * F;
    float scale = 1.0f / sqrtf((float)dh);
    for (q = 0; q < Q; q++) {
        unsigned char *row = s->attn_mask + (size_t)q * n;
        int blocked = 0;
        for (j = 0; j < n; j++) blocked += row[j] = sigmoidf(prev_att[(size_t)q * n + j]) < 0.5f;
        if (blocked == n) memset(row, 0, (size_t)n);
    }
    /* cross_attn (nn.MultiheadAttention): q = hidden + query pos, k = features + pos, v = features */
    add(s->hq, s->hidden, w->query_embed, (size_t)Q * F);
    gemm_nt(Q, F, F, s->hq, F, d->cross_qkv.w, F, d->cross_qkv.b, s->dq, F, 0);
    add(s->tmp, feat, pos, (size_t)n * F);
    gemm_nt(n, F, F, s->tmp, F, d->cross_qkv.w + (size_t)F * F, F, d->cross_qkv.b + F, s->kv, 2 * F, 0);
    gemm_nt(n, F, F, feat, F, d->cross_qkv.w + (size_t)2 * F * F, F, d->cross_qkv.b + 2 * F, s->kv + F, 2 * F, 0);
    attention(s->datt, F, s->dq, F, s->kv, 2 * F, s->kv + F, 2 * F, Q, n, H, dh, scale, s->attn_mask, s->scores);
    gemm_nt(Q, F, F, s->datt, F, d->cross_out.w, F, d->cross_out.b, s->hidden, F, 1);
    layernorm(s->hidden, s->hidden, Q, F, d->ln_cross, c->ln_eps);
    /* self_attn (Mask2FormerAttention): q, k from hidden + query pos, v from hidden */
    add(s->hq, s->hidden, w->query_embed, (size_t)Q * F);
    linear(s->dq, s->hq, Q, F, F, d->q);
    linear(s->kv, s->hq, Q, F, F, d->k);
    linear(s->kv + (size_t)Q * F, s->hidden, Q, F, F, d->v);
    attention(s->datt, F, s->dq, F, s->kv, F, s->kv + (size_t)Q * F, F, Q, Q, H, dh, scale, NULL, s->scores);
    gemm_nt(Q, F, F, s->datt, F, d->o.w, F, d->o.b, s->hidden, F, 1);
    layernorm(s->hidden, s->hidden, Q, F, d->ln_self, c->ln_eps);
    /* feed-forward */
    linear(s->ffn, s->hidden, Q, F, E, d->fc1);
    relu(s->ffn, (size_t)Q * E);
    gemm_nt(Q, F, E, s->ffn, E, d->fc2.w, E, d->fc2.b, s->hidden, F, 1);
    layernorm(s->hidden, s->hidden, Q, F, d->ln_final, c->ln_eps);
}

/* Mask2FormerTransformerModule + Mask2FormerMaskedAttentionDecoder: learned queries,
 * one prediction before the first layer and one after each of the L-1 layers;
 * layer i attends to level i mod 3 using prediction i resized to that level. */
static void masked_attention_decoder(loupe_session *s)
{
    const loupe_config *c = &s->m->cfg;
    const loupe_weights *w = &s->m->w;
    const loupe_tables *tb = &s->m->t;
    int F = c->feature_size, Q = c->num_queries, L = c->dec_layers, T = tb->tokens, M = 4 * c->grid;
    int l, p, i, C = c->num_labels + 1;
    const float *ms = s->enc_h + (size_t)c->enc_layers * T * F;
    for (l = 0; l < 3; l++)
        for (p = tb->level_start[l]; p < tb->level_start[l] + tb->level_h[l] * tb->level_w[l]; p++)
            add(s->dec_feat + (size_t)p * F, ms + (size_t)p * F, w->dec_level_embed + (size_t)l * F, (size_t)F);
    memcpy(s->hidden, w->query_feat, (size_t)Q * F * sizeof *s->hidden);
    layernorm(s->query_hidden, s->hidden, Q, F, w->dec_ln, c->ln_eps);
    mask_predictor(s, 0, 0);
    for (i = 0; i < L - 1; i++) {
        masked_attention_decoder_layer(s, &w->dec[i], i % 3, s->attn_logits + (size_t)i * Q * 4 * c->grid * c->grid);
        layernorm(s->query_hidden + (size_t)(i + 1) * Q * F, s->hidden, Q, F, w->dec_ln, c->ln_eps);
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
/* 9. CLI                                                                     */
/* ========================================================================== */
#ifndef LOUPE_NO_MAIN
int main(int argc, char **argv)
{
    char err[512];
    loupe_model *m;
    if (argc < 3 || strcmp(argv[1], "-m") != 0) {
        fprintf(stderr, "usage: loupe -m MODEL.bin\n");
        return 2;
    }
    m = loupe_model_load(argv[2], err, sizeof err);
    if (!m) { fprintf(stderr, "loupe: %s\n", err); return 1; }
    printf("image_size %d\n", loupe_model_config(m)->image_size);
    loupe_model_free(m);
    return 0;
}
#endif
