/*
 * make_weights.c - C99 port of golden/make_weights.py: deterministic synthetic Loupe weights.
 *
 *   make_weights keys.json SEED out.safetensors [--bf16-prefix PREFIX]
 *
 * keys.json is a JSON list of [name, [dims...]] pairs.  Every tensor is written as F32 into a
 * safetensors file that is byte-for-byte identical to the one make_weights.py writes (same JSON
 * header text, same values).  Element i (C order) of tensor `name`:
 *
 *   h = FNV1a64(utf8(name)) ^ (SEED * GOLDEN)            all integer math mod 2^64
 *   z = splitmix64(h + i);  u = (z >> 40) / 2^24 * 2 - 1  uniform in [-1, 1)
 *   value = (float)(offset + scale * u)                   in double, rounded once to float
 *
 * with (offset, scale) chosen from the name and shape (see init_rule).  Tensors are generated
 * and written in chunks, so the full 355M-parameter model needs only a few MB of memory.
 * The file is written to OUT.tmp and renamed onto OUT when complete.
 *
 * Build: cc -std=c99 -O2 -o make_weights make_weights.c -lm
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GOLDEN 0x9E3779B97F4A7C15ull
#define FNV_OFFSET 0xCBF29CE484222325ull
#define FNV_PRIME 0x100000001B3ull
#define NO_OBJECT_WEIGHT 0.1f         /* criterion.empty_weight = [1, ..., 1, 0.1] */
#define MASK_EMBED_GAIN 10.0          /* extra gain of the last mask-embedder layer */
#define MAX_DIMS 16
#define CHUNK_ELEMS (1u << 20)        /* elements generated per fwrite */
#define HEADER_ALIGN 8                /* safetensors header is space-padded to a multiple of 8 */

/* ------------------------------------------------------------------------------------ */
/* Errors and small helpers                                                              */
/* ------------------------------------------------------------------------------------ */

static const char *g_tmp_path; /* removed by die() while the output is being written */

static void die(const char *fmt, ...)
{
    va_list ap;
    fputs("make_weights: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    if (g_tmp_path)
        remove(g_tmp_path);
    exit(1);
}

static void *xrealloc(void *p, size_t n)
{
    p = realloc(p, n ? n : 1);
    if (!p)
        die("out of memory");
    return p;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && memcmp(s + n - m, suffix, m) == 0;
}

/* Growable byte string. */
typedef struct {
    char *data;
    size_t len, cap;
} Buf;

static void buf_put(Buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        b->cap = 2 * (b->len + n + 1);
        b->data = xrealloc(b->data, b->cap);
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void buf_puts(Buf *b, const char *s)
{
    buf_put(b, s, strlen(s));
}

static void buf_printf(Buf *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = vsprintf(tmp, fmt, ap); /* only used for short pieces around numbers */
    va_end(ap);
    buf_put(b, tmp, (size_t)n);
}

/* ------------------------------------------------------------------------------------ */
/* keys.json reader: [[name, [d0, d1, ...]], ...]                                        */
/* ------------------------------------------------------------------------------------ */

typedef struct {
    char *name; /* UTF-8, NUL-terminated */
    int ndim;
    uint64_t dims[MAX_DIMS];
} Key;

typedef struct {
    const char *path, *text, *pos, *end;
} Parser;

static void parse_error(const Parser *p, const char *what)
{
    const char *c;
    int line = 1, col = 1;
    for (c = p->text; c < p->pos; c++) {
        if (*c == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    die("%s:%d:%d: malformed keys list: %s", p->path, line, col, what);
}

static void skip_space(Parser *p)
{
    while (p->pos < p->end && (*p->pos == ' ' || *p->pos == '\t' || *p->pos == '\n' || *p->pos == '\r'))
        p->pos++;
}

static void expect(Parser *p, char c)
{
    char what[32];
    skip_space(p);
    if (p->pos >= p->end || *p->pos != c) {
        sprintf(what, "expected '%c'", c);
        parse_error(p, what);
    }
    p->pos++;
}

/* Next non-space character is c? (consumed if so) */
static int accept(Parser *p, char c)
{
    skip_space(p);
    if (p->pos < p->end && *p->pos == c) {
        p->pos++;
        return 1;
    }
    return 0;
}

static unsigned hex4(Parser *p)
{
    unsigned v = 0;
    int i;
    for (i = 0; i < 4; i++, p->pos++) {
        char c = p->pos < p->end ? *p->pos : 0;
        if (c >= '0' && c <= '9')
            v = v * 16 + (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v = v * 16 + (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v = v * 16 + (unsigned)(c - 'A' + 10);
        else
            parse_error(p, "bad \\u escape");
    }
    return v;
}

static void put_utf8(Buf *b, unsigned cp)
{
    char s[4];
    size_t n;
    if (cp < 0x80) {
        s[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        s[0] = (char)(0xC0 | (cp >> 6));
        s[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        s[0] = (char)(0xE0 | (cp >> 12));
        s[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        s[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        s[0] = (char)(0xF0 | (cp >> 18));
        s[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        s[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        s[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    buf_put(b, s, n);
}

/* A JSON string, returned as malloc'ed UTF-8 (escapes decoded). */
static char *parse_string(Parser *p)
{
    Buf b = {0, 0, 0};
    expect(p, '"');
    buf_put(&b, "", 0);
    for (;;) {
        unsigned char c;
        if (p->pos >= p->end)
            parse_error(p, "unterminated string");
        c = (unsigned char)*p->pos++;
        if (c == '"')
            return b.data;
        if (c < 0x20)
            parse_error(p, "control character in string");
        if (c != '\\') {
            buf_put(&b, (const char *)&c, 1);
            continue;
        }
        c = p->pos < p->end ? (unsigned char)*p->pos++ : 0;
        switch (c) {
        case '"': case '\\': case '/': buf_put(&b, (const char *)&c, 1); break;
        case 'b': buf_put(&b, "\b", 1); break;
        case 'f': buf_put(&b, "\f", 1); break;
        case 'n': buf_put(&b, "\n", 1); break;
        case 'r': buf_put(&b, "\r", 1); break;
        case 't': buf_put(&b, "\t", 1); break;
        case 'u': {
            unsigned cp = hex4(p);
            if (cp >= 0xD800 && cp < 0xDC00) { /* high surrogate: needs a low one */
                unsigned lo;
                if (p->end - p->pos < 2 || p->pos[0] != '\\' || p->pos[1] != 'u')
                    parse_error(p, "unpaired surrogate in \\u escape");
                p->pos += 2;
                lo = hex4(p);
                if (lo < 0xDC00 || lo >= 0xE000)
                    parse_error(p, "unpaired surrogate in \\u escape");
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp < 0xE000) {
                parse_error(p, "unpaired surrogate in \\u escape");
            } else if (cp == 0) {
                parse_error(p, "NUL character in name");
            }
            put_utf8(&b, cp);
            break;
        }
        default:
            parse_error(p, "bad escape in string");
        }
    }
}

static uint64_t parse_dim(Parser *p)
{
    uint64_t v = 0;
    skip_space(p);
    if (p->pos >= p->end || *p->pos < '0' || *p->pos > '9')
        parse_error(p, "dimension must be a non-negative integer");
    if (*p->pos == '0' && p->pos + 1 < p->end && p->pos[1] >= '0' && p->pos[1] <= '9')
        parse_error(p, "leading zero in number");
    while (p->pos < p->end && *p->pos >= '0' && *p->pos <= '9') {
        if (v > (UINT64_MAX - 9) / 10)
            parse_error(p, "dimension too large");
        v = v * 10 + (uint64_t)(*p->pos++ - '0');
    }
    if (p->pos < p->end && (*p->pos == '.' || *p->pos == 'e' || *p->pos == 'E'))
        parse_error(p, "dimension must be an integer");
    return v;
}

/* Parse the whole keys list; returns the number of keys, *out is malloc'ed. */
static size_t parse_keys(Parser *p, Key **out)
{
    Key *keys = NULL;
    size_t n = 0, cap = 0;
    expect(p, '[');
    if (!accept(p, ']')) {
        do {
            Key k;
            memset(&k, 0, sizeof k);
            expect(p, '[');
            k.name = parse_string(p);
            expect(p, ',');
            expect(p, '[');
            if (!accept(p, ']')) {
                do {
                    if (k.ndim == MAX_DIMS)
                        parse_error(p, "too many dimensions");
                    k.dims[k.ndim++] = parse_dim(p);
                } while (accept(p, ','));
                expect(p, ']');
            }
            expect(p, ']');
            if (n == cap) {
                cap = cap ? 2 * cap : 256;
                keys = xrealloc(keys, cap * sizeof *keys);
            }
            keys[n++] = k;
        } while (accept(p, ','));
        expect(p, ']');
    }
    skip_space(p);
    if (p->pos != p->end)
        parse_error(p, "trailing characters after the list");
    *out = keys;
    return n;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *data = NULL;
    size_t n = 0, cap = 0, got;
    if (!f)
        die("%s: cannot open (%s)", path, strerror(errno));
    do {
        if (n == cap) {
            cap = cap ? 2 * cap : 65536;
            data = xrealloc(data, cap);
        }
        got = fread(data + n, 1, cap - n, f);
        n += got;
    } while (got > 0);
    if (ferror(f))
        die("%s: read error", path);
    fclose(f);
    *len = n;
    return data;
}

static size_t load_keys(const char *path, Key **keys)
{
    size_t len, n, i, j;
    char *text = read_file(path, &len);
    Parser p;
    p.path = path;
    p.text = p.pos = text;
    p.end = text + len;
    n = parse_keys(&p, keys);
    free(text);
    for (i = 0; i < n; i++) {
        if (strcmp((*keys)[i].name, "__metadata__") == 0)
            die("%s: tensor name \"__metadata__\" is reserved by safetensors", path);
        for (j = 0; j < i; j++)
            if (strcmp((*keys)[i].name, (*keys)[j].name) == 0)
                die("%s: duplicate tensor name \"%s\"", path, (*keys)[i].name);
    }
    return n;
}

/* ------------------------------------------------------------------------------------ */
/* safetensors header, formatted exactly like Python's json.dumps(separators=(",", ":")) */
/* ------------------------------------------------------------------------------------ */

/* JSON string with ensure_ascii escaping: everything outside ' '..'~' becomes an escape. */
static void put_json_string(Buf *b, const char *s)
{
    const unsigned char *u = (const unsigned char *)s;
    buf_put(b, "\"", 1);
    while (*u) {
        unsigned cp = *u;
        int extra = 0;
        if (cp == '"' || cp == '\\') {
            buf_put(b, "\\", 1);
            buf_put(b, (const char *)u, 1);
            u++;
            continue;
        }
        if (cp >= 0x20 && cp < 0x7F) {
            buf_put(b, (const char *)u, 1);
            u++;
            continue;
        }
        switch (cp) {
        case '\b': buf_put(b, "\\b", 2); u++; continue;
        case '\f': buf_put(b, "\\f", 2); u++; continue;
        case '\n': buf_put(b, "\\n", 2); u++; continue;
        case '\r': buf_put(b, "\\r", 2); u++; continue;
        case '\t': buf_put(b, "\\t", 2); u++; continue;
        default: break;
        }
        /* decode one UTF-8 sequence */
        if (cp >= 0x80 && (cp < 0xC0 || cp >= 0xF8))
            die("invalid UTF-8 in name \"%s\"", s);
        if (cp >= 0xF0) {
            cp &= 0x07;
            extra = 3;
        } else if (cp >= 0xE0) {
            cp &= 0x0F;
            extra = 2;
        } else if (cp >= 0xC0) {
            cp &= 0x1F;
            extra = 1;
        }
        for (u++; extra > 0; extra--, u++) {
            if ((*u & 0xC0) != 0x80)
                die("invalid UTF-8 in name \"%s\"", s);
            cp = (cp << 6) | (*u & 0x3Fu);
        }
        if (cp >= 0x10000) { /* outside the BMP: UTF-16 surrogate pair */
            cp -= 0x10000;
            buf_printf(b, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
        } else {
            buf_printf(b, "\\u%04x", cp);
        }
    }
    buf_put(b, "\"", 1);
}

/* Number of elements; dies unless the F32 byte size fits in 63 bits. */
static uint64_t numel(const Key *k)
{
    uint64_t n = 1;
    int d;
    for (d = 0; d < k->ndim; d++) {
        if (k->dims[d] && n > (UINT64_MAX / 8) / k->dims[d])
            die("tensor %s is too large", k->name);
        n *= k->dims[d];
    }
    return n;
}

static void build_header(Buf *h, const Key *keys, size_t n, const char *seed, const char *bf16_prefix)
{
    uint64_t offset = 0;
    size_t i;
    int d;
    buf_puts(h, "{");
    for (i = 0; i < n; i++) {
        uint64_t nbytes = 4 * numel(&keys[i]);
        if (offset + nbytes < offset)
            die("the tensors are too large for one file");
        put_json_string(h, keys[i].name);
        buf_puts(h, ":{\"dtype\":\"F32\",\"shape\":[");
        for (d = 0; d < keys[i].ndim; d++)
            buf_printf(h, d ? ",%llu" : "%llu", (unsigned long long)keys[i].dims[d]);
        buf_printf(h, "],\"data_offsets\":[%llu,%llu]},", (unsigned long long)offset,
                   (unsigned long long)(offset + nbytes));
        offset += nbytes;
    }
    buf_puts(h, "\"__metadata__\":{\"format\":\"pt\",\"generator\":\"make_weights.py\",\"seed\":");
    put_json_string(h, seed);
    if (bf16_prefix && *bf16_prefix) { /* Python adds it only for a non-empty prefix */
        buf_puts(h, ",\"bf16_prefix\":");
        put_json_string(h, bf16_prefix);
    }
    buf_puts(h, "}}");
    while (h->len % HEADER_ALIGN)
        buf_put(h, " ", 1);
}

/* ------------------------------------------------------------------------------------ */
/* The weight formula                                                                    */
/* ------------------------------------------------------------------------------------ */

static uint64_t fnv1a64(const char *s)
{
    uint64_t h = FNV_OFFSET;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * FNV_PRIME;
    return h;
}

/* u in [-1, 1) for element i of a tensor with hash base h. */
static double uniform(uint64_t h, uint64_t i)
{
    uint64_t z = h + i + GOLDEN; /* splitmix64 */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 40) / 16777216.0 * 2.0 - 1.0;
}

/* (offset, scale) of a tensor: rules a-f, first match wins, then the mask-embedder gain. */
static void init_rule(const Key *k, double *offset, double *scale)
{
    *offset = 0.0;
    if (ends_with(k->name, "sampling_offsets.bias")) {
        *scale = 3.0;
    } else if (ends_with(k->name, "attention_weights.bias")) {
        *scale = 0.5;
    } else if (k->ndim == 1 && ends_with(k->name, ".weight")) { /* LayerNorm / GroupNorm */
        *offset = 1.0;
        *scale = 0.1;
    } else if (ends_with(k->name, "bias")) {
        *scale = 0.02;
    } else if (k->ndim >= 2 && ends_with(k->name, "weight")) { /* 1/sqrt(fan_in) */
        double fan_in = 1.0;
        int d;
        for (d = 1; d < k->ndim; d++)
            fan_in *= (double)k->dims[d];
        *scale = 1.0 / sqrt(fan_in);
    } else { /* embeddings, probe, level_embed, label_embedding.N, ... */
        *scale = 0.1;
    }
    if (ends_with(k->name, "mask_predictor.mask_embedder.2.0.weight") ||
        ends_with(k->name, "mask_predictor.mask_embedder.2.0.bias"))
        *scale *= MASK_EMBED_GAIN;
}

/* float32 -> bfloat16 (round to nearest, ties to even) -> float32, on the bit pattern. */
static uint32_t round_bf16(uint32_t bits)
{
    uint32_t bias = 0x7FFFu + ((bits >> 16) & 1u);
    return (bits + bias) & 0xFFFF0000u;
}

static void put_f32_le(unsigned char *p, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, 4);
    p[0] = (unsigned char)bits;
    p[1] = (unsigned char)(bits >> 8);
    p[2] = (unsigned char)(bits >> 16);
    p[3] = (unsigned char)(bits >> 24);
}

static void write_tensor(FILE *f, const Key *k, uint64_t seed, const char *bf16_prefix, unsigned char *chunk)
{
    uint64_t n = numel(k), h = fnv1a64(k->name) ^ (seed * GOLDEN), start, i;
    int is_empty_weight = ends_with(k->name, "criterion.empty_weight");
    int bf16 = bf16_prefix && strncmp(k->name, bf16_prefix, strlen(bf16_prefix)) == 0;
    double offset, scale;
    init_rule(k, &offset, &scale);
    for (start = 0; start < n; start += CHUNK_ELEMS) {
        uint64_t count = n - start < CHUNK_ELEMS ? n - start : CHUNK_ELEMS;
        for (i = 0; i < count; i++) {
            float value;
            if (is_empty_weight) { /* constant buffer: [1, ..., 1, no_object_weight] */
                value = start + i == n - 1 ? NO_OBJECT_WEIGHT : 1.0f;
            } else {
                /* numpy rounds scale*u to double before adding: no fused multiply-add here */
                volatile double scaled = scale * uniform(h, start + i);
                double sum = offset + scaled;
                value = (float)sum;
                if (bf16) {
                    uint32_t bits;
                    memcpy(&bits, &value, 4);
                    bits = round_bf16(bits);
                    memcpy(&value, &bits, 4);
                }
            }
            put_f32_le(chunk + 4 * i, value);
        }
        if (fwrite(chunk, 4, (size_t)count, f) != count)
            die("%s: write error (%s)", g_tmp_path, strerror(errno));
    }
}

/* ------------------------------------------------------------------------------------ */
/* Command line                                                                          */
/* ------------------------------------------------------------------------------------ */

/* Parse SEED like Python's int(): optional sign, decimal digits.  Returns SEED mod 2^64 and
 * writes the canonical decimal form (what str(int(SEED)) prints) into canon. */
static uint64_t parse_seed(const char *s, char *canon)
{
    uint64_t v = 0;
    int neg = 0;
    const char *digits;
    if (*s == '+' || *s == '-')
        neg = *s++ == '-';
    if (!*s)
        die("SEED must be an integer");
    for (digits = s; *s; s++) {
        if (*s < '0' || *s > '9')
            die("SEED must be an integer");
        v = v * 10 + (uint64_t)(*s - '0');
    }
    while (*digits == '0' && digits[1])
        digits++;
    sprintf(canon, "%s%s", neg && strcmp(digits, "0") ? "-" : "", digits);
    return neg ? 0 - v : v;
}

int main(int argc, char **argv)
{
    const char *keys_path, *out_path, *bf16_prefix = NULL;
    char *seed_text, *tmp_path;
    Key *keys;
    Buf header = {0, 0, 0};
    unsigned char size_le[8], *chunk;
    uint64_t seed;
    size_t n, i;
    FILE *f;

    if (argc == 6 && strcmp(argv[4], "--bf16-prefix") == 0)
        bf16_prefix = argv[5];
    else if (argc != 4) {
        fprintf(stderr, "usage: %s keys.json SEED out.safetensors [--bf16-prefix PREFIX]\n", argv[0]);
        return 2;
    }
    keys_path = argv[1];
    out_path = argv[3];
    seed_text = xrealloc(NULL, strlen(argv[2]) + 2);
    seed = parse_seed(argv[2], seed_text);

    n = load_keys(keys_path, &keys);
    build_header(&header, keys, n, seed_text, bf16_prefix);

    tmp_path = xrealloc(NULL, strlen(out_path) + 5);
    sprintf(tmp_path, "%s.tmp", out_path);
    f = fopen(tmp_path, "wb");
    if (!f)
        die("%s: cannot create (%s)", tmp_path, strerror(errno));
    g_tmp_path = tmp_path;
    for (i = 0; i < 8; i++)
        size_le[i] = (unsigned char)((uint64_t)header.len >> (8 * i));
    if (fwrite(size_le, 1, 8, f) != 8 || fwrite(header.data, 1, header.len, f) != header.len)
        die("%s: write error (%s)", tmp_path, strerror(errno));

    chunk = xrealloc(NULL, 4 * (size_t)CHUNK_ELEMS);
    for (i = 0; i < n; i++)
        write_tensor(f, &keys[i], seed, bf16_prefix, chunk);
    if (fclose(f) != 0)
        die("%s: write error (%s)", tmp_path, strerror(errno));
    if (rename(tmp_path, out_path) != 0)
        die("cannot rename %s to %s (%s)", tmp_path, out_path, strerror(errno));
    g_tmp_path = NULL;

    for (i = 0; i < n; i++)
        free(keys[i].name);
    free(keys);
    free(header.data);
    free(chunk);
    free(tmp_path);
    free(seed_text);
    return 0;
}
