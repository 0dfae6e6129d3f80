/* check_images: checks the image decoders and the resizer against a reference
 * manifest (the format of /work/shared/corpus/README.md), using only the public
 * image API (loupe_image_load, loupe_resize_rgb, loupe_image_free).
 *
 *   check_images MANIFEST [--verbose]
 *
 * Every manifest line names a file (relative to the manifest's folder) and
 * PIL's outcome on it: status, size, and FNV-1a hashes of the decoded RGB bytes
 * and of the 112x112, 140x140 and 336x336 BILINEAR resizes. Strict lines must
 * match exactly. Lines whose note starts with the tag "damaged" only have to be
 * handled cleanly (a decoded image of sane size, or a refusal with a message);
 * agreement with PIL there is counted, not required. The process must also not
 * crash or hang: on POSIX systems each file gets a time limit through alarm()
 * (define CHECK_IMAGES_NO_POSIX to build with plain C99 only).
 *
 * Exit status: 0 when every line passed, 1 when any line failed, 2 on a usage
 * error or an unreadable, empty or malformed manifest. */

#if !defined(CHECK_IMAGES_NO_POSIX) && (defined(__unix__) || defined(__APPLE__))
#define CHECK_IMAGES_POSIX 1
#define _POSIX_C_SOURCE 200112L
#endif

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef CHECK_IMAGES_POSIX
#include <signal.h>
#include <unistd.h>
#endif

#include "../loupe.h"

#define CHECK_FIELDS 9              /* fields per manifest line */
#define CHECK_HASH_DIGITS 16        /* hex digits of a 64-bit hash */
#define CHECK_DIM_MAX 1000000000L   /* largest width or height a manifest may state */
#define CHECK_DAMAGED_TAG "damaged" /* first note tag of a non-strict line */
#define CHECK_N_SIZES 3             /* resize targets per file */
#define CHECK_MAX_SIZE 336          /* the largest resize target */
#define CHECK_CHANNELS 3            /* bytes per RGB pixel */
#define CHECK_ERR_MAX 512           /* error message buffer */
#define CHECK_READ_CHUNK 65536      /* initial manifest buffer; doubled as needed */
#ifndef CHECK_TIME_LIMIT_S
#define CHECK_TIME_LIMIT_S 60       /* per-file limit in seconds (POSIX builds) */
#endif
#define CHECK_EXIT_FAILED 1         /* some line did not pass */
#define CHECK_EXIT_USAGE 2          /* bad arguments or manifest */
#define FNV_OFFSET_BASIS 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

static const int check_sizes[CHECK_N_SIZES] = { 112, 140, 336 };
static const char *const check_size_names[CHECK_N_SIZES] = { "fnv_112", "fnv_140", "fnv_336" };

/* One manifest line: PIL's outcome on one file. path points into the manifest text. */
typedef struct check_entry {
    const char *path;                   /* relative to the manifest's folder */
    int ok;                             /* PIL decoded it */
    int damaged;                        /* note starts with the tag "damaged" */
    int width, height;                  /* when ok */
    uint64_t fnv_rgb;                   /* when ok */
    uint64_t fnv_sized[CHECK_N_SIZES];  /* when ok */
} check_entry;

/* What the library made of one file. */
typedef struct check_outcome {
    int ok;                             /* decoded */
    int pixels;                         /* decoded to a non-empty pixel buffer */
    char err[CHECK_ERR_MAX];            /* refusal message when not ok */
    int width, height;
    uint64_t fnv_rgb;
    uint64_t fnv_sized[CHECK_N_SIZES];
    int sized_ok[CHECK_N_SIZES];        /* loupe_resize_rgb returned 0 */
} check_outcome;

/* Running totals. */
typedef struct check_stats {
    int passed, failed;
    int strict, strict_passed;          /* strict lines, and those equal to PIL */
    int damaged;                        /* damaged lines */
    int damaged_clean;                  /* damaged files decoded or refused cleanly */
    int damaged_same_status;            /* ... whose outcome (ok/error) equals PIL's */
    int damaged_identical;              /* ... equal to PIL in status, size and every hash */
} check_stats;

/* 64-bit FNV-1a over n bytes. */
static uint64_t check_fnv1a(const unsigned char *p, size_t n)
{
    uint64_t h = FNV_OFFSET_BASIS;
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= p[i];
        h *= FNV_PRIME;
    }
    return h;
}

#ifdef CHECK_IMAGES_POSIX
/* SIGALRM handler: a file took too long, so report it and stop (async-signal-safe calls only). */
static void check_on_alarm(int sig)
{
    static const char msg[] = "check_images: per-file time limit exceeded (a hang?); "
                              "rerun with --verbose to see the file\n";
    (void)sig;
    if (write(STDERR_FILENO, msg, sizeof msg - 1) < 0) {
        /* stderr is gone: exit all the same */
    }
    _exit(CHECK_EXIT_FAILED);
}

/* Starts (seconds > 0) or cancels (0) the per-file time limit. */
static void check_time_limit(unsigned seconds)
{
    alarm(seconds);
}
#else
/* Without POSIX there is no portable time limit: the decoders must bound their own work. */
static void check_time_limit(unsigned seconds)
{
    (void)seconds;
}
#endif

/* Reads a whole file into a NUL-terminated malloc'd buffer; NULL on failure. */
static char *check_read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    size_t cap = CHECK_READ_CHUNK, used = 0;
    char *buf, *bigger;
    if (!f)
        return NULL;
    buf = malloc(cap);
    while (buf) {
        used += fread(buf + used, 1, cap - 1 - used, f); /* keeps one byte for the NUL */
        if (used < cap - 1) /* end of file or error */
            break;
        bigger = cap <= SIZE_MAX / 2 ? realloc(buf, cap * 2) : NULL;
        if (!bigger)
            free(buf);
        buf = bigger;
        cap *= 2;
    }
    if (buf && ferror(f)) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf)
        buf[used] = '\0';
    return buf;
}

/* Parses a positive decimal int made of digits only; 0 or -1. */
static int check_parse_dim(const char *s, int *v)
{
    long x = 0;
    if (!*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        x = x * 10 + (*s - '0');
        if (x > CHECK_DIM_MAX)
            return -1;
    }
    if (x <= 0)
        return -1;
    *v = (int)x;
    return 0;
}

/* Parses exactly 16 lower-case hex digits; 0 or -1. */
static int check_parse_hash(const char *s, uint64_t *v)
{
    uint64_t x = 0;
    int i;
    for (i = 0; i < CHECK_HASH_DIGITS; i++) {
        int d;
        if (s[i] >= '0' && s[i] <= '9')
            d = s[i] - '0';
        else if (s[i] >= 'a' && s[i] <= 'f')
            d = s[i] - 'a' + 10;
        else
            return -1;
        x = x << 4 | (uint64_t)d;
    }
    if (s[CHECK_HASH_DIGITS] != '\0')
        return -1;
    *v = x;
    return 0;
}

/* Splits a line in place into CHECK_FIELDS fields (the last runs to the end of
 * the line); returns NULL or a description of what is wrong. */
static const char *check_split(char *line, char *field[CHECK_FIELDS])
{
    int i;
    for (i = 0; i < CHECK_FIELDS - 1; i++) {
        char *space = strchr(line, ' ');
        if (!space)
            return "fewer than 9 space-separated fields";
        *space = '\0';
        field[i] = line;
        if (!*field[i])
            return "empty field (two spaces in a row?)";
        line = space + 1;
    }
    field[CHECK_FIELDS - 1] = line;
    if (!*line)
        return "empty note field";
    return NULL;
}

/* Fills e from one non-comment line (modified in place); NULL or what is wrong. */
static const char *check_parse_line(char *line, check_entry *e)
{
    char *f[CHECK_FIELDS];
    const char *why = *line ? check_split(line, f) : "empty line";
    size_t damaged_len = strlen(CHECK_DAMAGED_TAG);
    int i;
    if (why)
        return why;
    e->path = f[0];
    e->damaged = strncmp(f[8], CHECK_DAMAGED_TAG, damaged_len) == 0
                 && (f[8][damaged_len] == '\0' || f[8][damaged_len] == ',');
    if (strcmp(f[1], "ok") == 0) {
        e->ok = 1;
        if (check_parse_dim(f[2], &e->width) || check_parse_dim(f[3], &e->height))
            return "width/height must be positive integers for status ok";
        if (check_parse_hash(f[4], &e->fnv_rgb))
            return "fnv_rgb must be 16 lower-case hex digits for status ok";
        for (i = 0; i < CHECK_N_SIZES; i++)
            if (check_parse_hash(f[5 + i], &e->fnv_sized[i]))
                return "fnv_112/140/336 must be 16 lower-case hex digits for status ok";
    } else if (strcmp(f[1], "error") == 0) {
        e->ok = 0;
        for (i = 2; i < CHECK_FIELDS - 1; i++)
            if (strcmp(f[i], "-") != 0)
                return "width, height and hashes must be '-' for status error";
    } else {
        return "status must be 'ok' or 'error'";
    }
    return NULL;
}

/* Parses the whole manifest text (modified in place) into a malloc'd array;
 * prints what is wrong and returns NULL on a malformed or empty manifest. */
static check_entry *check_parse_manifest(char *text, const char *name, int *count)
{
    check_entry *entries = NULL;
    int n = 0, cap = 0, line_no = 0;
    char *line = text;
    *count = 0;
    while (*line) {
        char *end = strchr(line, '\n');
        char *next = end ? end + 1 : line + strlen(line);
        size_t len;
        const char *why;
        if (end)
            *end = '\0';
        len = strlen(line);
        if (len && line[len - 1] == '\r')
            line[len - 1] = '\0';
        line_no++;
        if (line[0] != '#') {
            if (n == cap) {
                check_entry *bigger = realloc(entries, (size_t)(cap ? 2 * cap : 256) * sizeof *entries);
                if (!bigger) {
                    fprintf(stderr, "check_images: out of memory\n");
                    free(entries);
                    return NULL;
                }
                entries = bigger;
                cap = cap ? 2 * cap : 256;
            }
            memset(&entries[n], 0, sizeof entries[n]);
            why = check_parse_line(line, &entries[n]);
            if (why) {
                fprintf(stderr, "check_images: %s:%d: malformed line: %s\n", name, line_no, why);
                free(entries);
                return NULL;
            }
            n++;
        }
        line = next;
    }
    if (n == 0) {
        fprintf(stderr, "check_images: %s: no image lines (a check of nothing is not a pass)\n", name);
        free(entries);
        return NULL;
    }
    *count = n;
    return entries;
}

/* Joins the manifest's folder and a relative path into a malloc'd string. */
static char *check_join(const char *manifest, const char *rel)
{
    const char *slash = strrchr(manifest, '/');
    size_t dir_len = slash ? (size_t)(slash - manifest) + 1 : 0;
    char *full = malloc(dir_len + strlen(rel) + 1);
    if (full) {
        memcpy(full, manifest, dir_len);
        strcpy(full + dir_len, rel);
    }
    return full;
}

/* Returns 1 when path can be opened for reading. */
static int check_file_exists(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    fclose(f);
    return 1;
}

/* Decodes one file and hashes the decode and its resizes into *o (scratch holds the largest resize). */
static void check_run(const char *path, unsigned char *scratch, check_outcome *o)
{
    loupe_image img;
    int i;
    memset(o, 0, sizeof *o);
    fflush(stdout); /* a time-limit exit must not lose the lines printed so far */
    check_time_limit(CHECK_TIME_LIMIT_S);
    if (loupe_image_load(path, LOUPE_DEFAULT_MAX_PIXELS, &img, o->err, sizeof o->err) == 0) {
        o->ok = 1;
        o->width = img.width;
        o->height = img.height;
        o->pixels = img.rgb && img.width > 0 && img.height > 0;
        if (o->pixels) {
            o->fnv_rgb = check_fnv1a(img.rgb, (size_t)img.width * (size_t)img.height * CHECK_CHANNELS);
            for (i = 0; i < CHECK_N_SIZES; i++) {
                int s = check_sizes[i];
                o->sized_ok[i] = loupe_resize_rgb(img.rgb, img.width, img.height, scratch, s, s) == 0;
                if (o->sized_ok[i])
                    o->fnv_sized[i] = check_fnv1a(scratch, (size_t)s * (size_t)s * CHECK_CHANNELS);
            }
        }
        loupe_image_free(&img);
    }
    check_time_limit(0);
}

/* Returns NULL when a decode is clean (sane image with working resizes, or a
 * refusal with a message), else what is wrong. */
static const char *check_unclean(const check_outcome *o)
{
    int i;
    if (!o->ok)
        return o->err[0] ? NULL : "refused without an error message";
    if (!o->pixels)
        return "decoded to an image without pixels";
    for (i = 0; i < CHECK_N_SIZES; i++)
        if (!o->sized_ok[i])
            return "loupe_resize_rgb failed";
    return NULL;
}

/* Prints one expected-vs-got hash mismatch. */
static void check_report_hash(const char *path, const char *what, uint64_t want, uint64_t got)
{
    printf("FAIL %s: %s expected %016llx, got %016llx\n", path, what,
           (unsigned long long)want, (unsigned long long)got);
}

/* Compares an outcome with PIL's; prints each difference when report is set. Returns the count. */
static int check_compare(const check_entry *e, const check_outcome *o, int report)
{
    int diffs = 0, i;
    if (e->ok != o->ok) {
        if (report && e->ok)
            printf("FAIL %s: status expected ok (%dx%d), got error: %s\n", e->path, e->width, e->height, o->err);
        else if (report)
            printf("FAIL %s: status expected error, got ok (%dx%d)\n", e->path, o->width, o->height);
        return 1;
    }
    if (!e->ok)
        return 0;
    if (e->width != o->width || e->height != o->height) {
        diffs++;
        if (report)
            printf("FAIL %s: size expected %dx%d, got %dx%d\n", e->path, e->width, e->height, o->width, o->height);
    }
    if (e->fnv_rgb != o->fnv_rgb) {
        diffs++;
        if (report)
            check_report_hash(e->path, "fnv_rgb", e->fnv_rgb, o->fnv_rgb);
    }
    for (i = 0; i < CHECK_N_SIZES; i++) {
        if (!o->sized_ok[i]) {
            diffs++;
            if (report)
                printf("FAIL %s: %s expected %016llx, got no image (loupe_resize_rgb failed)\n",
                       e->path, check_size_names[i], (unsigned long long)e->fnv_sized[i]);
        } else if (e->fnv_sized[i] != o->fnv_sized[i]) {
            diffs++;
            if (report)
                check_report_hash(e->path, check_size_names[i], e->fnv_sized[i], o->fnv_sized[i]);
        }
    }
    return diffs;
}

/* Prints a one-line account of an outcome (verbose mode). */
static void check_describe(const check_outcome *o, const char *verdict)
{
    if (o->ok)
        printf("%s, decoded %dx%d\n", verdict, o->width, o->height);
    else
        printf("%s, refused: %s\n", verdict, o->err);
}

/* Checks one manifest line and updates the totals. */
static void check_entry_run(const check_entry *e, const char *manifest, unsigned char *scratch,
                            int verbose, check_stats *st)
{
    check_outcome o;
    const char *why;
    int identical;
    char *full = check_join(manifest, e->path);
    if (e->damaged)
        st->damaged++;
    else
        st->strict++;
    if (verbose) {
        printf("%s%s: ", e->path, e->damaged ? " [damaged]" : "");
        fflush(stdout);
    }
    if (!full || !check_file_exists(full)) {
        if (verbose)
            printf("missing\n");
        printf("FAIL %s: %s\n", e->path, full ? "cannot open the file" : "out of memory");
        st->failed++;
        free(full);
        return;
    }
    check_run(full, scratch, &o);
    free(full);
    if (!e->damaged) {
        int diffs = check_compare(e, &o, 0);
        if (verbose)
            check_describe(&o, diffs ? "MISMATCH" : "pass");
        if (diffs) {
            check_compare(e, &o, 1);
            st->failed++;
        } else {
            st->passed++;
            st->strict_passed++;
        }
        return;
    }
    why = check_unclean(&o);
    if (why) {
        if (verbose)
            check_describe(&o, "NOT CLEAN");
        printf("FAIL %s: damaged file not handled cleanly: %s\n", e->path, why);
        st->failed++;
        return;
    }
    identical = check_compare(e, &o, 0) == 0;
    st->passed++;
    st->damaged_clean++;
    st->damaged_same_status += e->ok == o.ok;
    st->damaged_identical += identical;
    if (verbose)
        check_describe(&o, e->ok != o.ok ? (e->ok ? "handled (PIL decodes it)" : "handled (PIL refuses it)")
                           : identical ? "handled (identical to PIL)"
                                       : "handled (PIL's status, other pixels)");
}

int main(int argc, char **argv)
{
    const char *manifest = NULL;
    int verbose = 0, bad_args = 0, n = 0, i;
    char *text;
    check_entry *entries;
    unsigned char *scratch;
    check_stats st;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--verbose") == 0)
            verbose = 1;
        else if (!manifest && argv[i][0] != '-')
            manifest = argv[i];
        else
            bad_args = 1;
    }
    if (!manifest || bad_args) {
        fprintf(stderr, "usage: check_images MANIFEST [--verbose]\n");
        return CHECK_EXIT_USAGE;
    }
    text = check_read_text(manifest);
    if (!text) {
        fprintf(stderr, "check_images: %s: cannot read the manifest\n", manifest);
        return CHECK_EXIT_USAGE;
    }
    entries = check_parse_manifest(text, manifest, &n);
    scratch = malloc((size_t)CHECK_MAX_SIZE * CHECK_MAX_SIZE * CHECK_CHANNELS);
    if (!entries || !scratch) {
        if (entries && !scratch)
            fprintf(stderr, "check_images: out of memory\n");
        free(entries);
        free(scratch);
        free(text);
        return CHECK_EXIT_USAGE;
    }
#ifdef CHECK_IMAGES_POSIX
    signal(SIGALRM, check_on_alarm);
#endif
    memset(&st, 0, sizeof st);
    for (i = 0; i < n; i++)
        check_entry_run(&entries[i], manifest, scratch, verbose, &st);
    printf("check_images: %d passed, %d failed (strict: %d of %d exact; damaged: %d of %d handled cleanly, "
           "%d with PIL's status, %d identical to PIL)\n",
           st.passed, st.failed, st.strict_passed, st.strict, st.damaged_clean, st.damaged,
           st.damaged_same_status, st.damaged_identical);
    free(entries);
    free(scratch);
    free(text);
    return st.failed ? CHECK_EXIT_FAILED : 0;
}
