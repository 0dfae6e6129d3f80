/* replay.h - a loss_rng that replays upstream's recorded torch.rand draws (check_tta,
 * check_train).
 *
 * The recorded arrays, in upstream's call order, form one stream; loupe.c seeks to the
 * position of each draw (images of a batch are processed one at a time) and must then
 * read exactly one recorded array, whole. Draws upstream made but that change nothing
 * (the decoder's layerdrop scalars, the matcher points of an image without a target)
 * are never read. */
#ifndef REPLAY_H
#define REPLAY_H

#define REPLAY_MAX 256

typedef struct replay {
    const float *arr[REPLAY_MAX];
    long len[REPLAY_MAX];
    unsigned long long start[REPLAY_MAX];
    int used[REPLAY_MAX];
    int count, reads, mismatches;
    unsigned long long pos, end;
} replay;

/* Appends an array of n draws (n may be 0: a torch.rand of no elements). */
static inline void replay_add(replay *r, const float *data, long n)
{
    if (r->count == REPLAY_MAX) { r->mismatches++; return; }
    r->arr[r->count] = data;
    r->len[r->count] = n;
    r->start[r->count] = r->end;
    r->used[r->count] = 0;
    r->end += (unsigned long long)n;
    r->count++;
}

/* Appends n draws that were not recorded (their values never matter). */
static inline void replay_skip(replay *r, long n)
{
    replay_add(r, NULL, n);
}

static inline void replay_seek(void *state, uint64_t position)
{
    ((replay *)state)->pos = position;
}

static inline void replay_fill(void *state, float *out, size_t n)
{
    replay *r = (replay *)state;
    int i;
    for (i = 0; i < r->count; i++)
        if (r->start[i] == r->pos && (size_t)r->len[i] == n && r->arr[i]) break;
    if (i == r->count) {
        r->mismatches++;
        memset(out, 0, n * sizeof *out);
    } else {
        memcpy(out, r->arr[i], n * sizeof *out);
        r->used[i]++;
        r->reads++;
    }
    r->pos += n;
}

#endif
