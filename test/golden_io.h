/* golden_io.h - reads the tensors of a golden case folder (check_golden, check_tta).
 *
 * A case lists its tensors in STEM.txt, one line each: `name dtype d0,d1,... offset
 * length`, with the offset counted from the start of STEM.safetensors (all F32). */
#ifndef GOLDEN_IO_H
#define GOLDEN_IO_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GOLDEN_NAME_LEN 160
#define GOLDEN_MAX_DIMS 6

typedef struct golden_tensor {
    char name[GOLDEN_NAME_LEN];
    int ndim;
    long dims[GOLDEN_MAX_DIMS], numel;
    float *data;
    int compared; /* set by the checker that used it */
} golden_tensor;

/* Reads a whole file into a malloc'd buffer; NULL when it cannot. */
static unsigned char *golden_read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long n;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) { fclose(f); return NULL; }
    buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) { free(buf); buf = NULL; }
    fclose(f);
    *size = (size_t)n;
    return buf;
}

/* Appends the tensors of DIR/STEM.txt to t[*n] (at most max in all); a name already
 * read is skipped. Returns 0, or -1 after printing the problem prefixed with prog. */
static int golden_load(const char *prog, const char *dir, const char *stem, golden_tensor *t, int max, int *n)
{
    char path[1024], line[1024];
    size_t size;
    unsigned char *blob;
    FILE *f;
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, stem);
    blob = golden_read_file(path, &size);
    if (!blob) { fprintf(stderr, "%s: cannot read %s\n", prog, path); return -1; }
    snprintf(path, sizeof path, "%s/%s.txt", dir, stem);
    f = fopen(path, "r");
    if (!f) { fprintf(stderr, "%s: cannot open %s\n", prog, path); free(blob); return -1; }
    while (fgets(line, sizeof line, f)) {
        golden_tensor *g = &t[*n];
        char dtype[16], dims[256], *tok;
        unsigned long long off, len;
        int i, dup = 0;
        if (*n == max) { fprintf(stderr, "%s: too many tensors in %s\n", prog, path); break; }
        memset(g, 0, sizeof *g);
        if (sscanf(line, "%159s %15s %255s %llu %llu", g->name, dtype, dims, &off, &len) != 5 || strcmp(dtype, "F32")) {
            fprintf(stderr, "%s: %s: cannot parse line: %s", prog, path, line);
            fclose(f); free(blob);
            return -1;
        }
        for (i = 0; i < *n; i++) dup |= !strcmp(t[i].name, g->name);
        if (dup) continue;
        g->numel = 1;
        for (tok = strtok(dims, ","); tok && g->ndim < GOLDEN_MAX_DIMS; tok = strtok(NULL, ",")) {
            g->dims[g->ndim++] = atol(tok);
            g->numel *= atol(tok);
        }
        if (off + len > size || len != (unsigned long long)g->numel * 4) {
            fprintf(stderr, "%s: %s: tensor %s lies outside %s.safetensors\n", prog, path, g->name, stem);
            fclose(f); free(blob);
            return -1;
        }
        g->data = malloc(len ? len : 1);
        if (!g->data) { fclose(f); free(blob); return -1; }
        memcpy(g->data, blob + off, len);
        (*n)++;
    }
    fclose(f);
    free(blob);
    return 0;
}
/* max |a - g| (NaN counts as the worst) and max |g| over n values. */
static inline void golden_diff(const float *a, const float *g, long n, double *maxd, double *maxg)
{
    long i;
    *maxd = *maxg = 0.0;
    for (i = 0; i < n; i++) {
        double d = fabs((double)a[i] - g[i]);
        if (!(d <= *maxd)) *maxd = d;
        if (fabs(g[i]) > *maxg) *maxg = fabs(g[i]);
    }
}

#endif
