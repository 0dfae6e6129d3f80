/* loupe.h - public API of loupe.c, a dependency-free C99 implementation of Loupe
 * (Jiang et al., arXiv 2506.16819), the IJCAI 2025 deepfake detection and
 * localization winner. MIT licensed; see LICENSE.
 *
 * Usage:
 *     loupe_model   *m = loupe_model_load("loupe.bin", err, sizeof err);
 *     loupe_session *s = loupe_session_new(m, err, sizeof err);
 *     loupe_image_load("photo.jpg", LOUPE_DEFAULT_MAX_PIXELS, &img, err, sizeof err);
 *     loupe_preprocess(m, &img, pixel_values, err, sizeof err);
 *     loupe_forward(s, pixel_values, err, sizeof err);    then loupe_get_outputs(s)
 *     loupe_postprocess(s, img.width, img.height, 0.5f, NULL, mask, err, sizeof err);
 *
 * Building: compile loupe.c with -DLOUPE_NO_MAIN (no command line, no main) and link
 * it with your program and -lm; test/example.c is a complete program using only this
 * header. C99, libc and libm; OpenMP (-fopenmp) is optional.
 *
 * Errors: every function that can fail returns NULL or -1 and writes one sentence,
 * truncated to errsize bytes and NUL-terminated, into err (err may be NULL). The
 * library never prints and never exits or aborts; out of memory is an ordinary error.
 * Ownership: the caller owns every buffer it passes in (sizes as documented below) and
 * frees every object it receives with the matching *_free function (all accept NULL).
 * Pointers into a model or session (config, outputs) live as long as that object.
 * Threads: a loupe_model is read-only after loading and may be shared by any number
 * of sessions on any threads; a loupe_session (and a loupe_tta) must be used by one
 * thread at a time. The decoders, the resize and the PNG encoder are reentrant.
 * With OpenMP, each forward uses up to loupe_set_threads() threads.
 */
#ifndef LOUPE_H
#define LOUPE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Images ---- */

/* An 8-bit RGB image: width*height pixels, 3 bytes each (R, G, B), rows top to
 * bottom, no padding. rgb is owned by the image; release it with loupe_image_free. */
typedef struct loupe_image { int width, height; unsigned char *rgb; } loupe_image;

/* Default pixel budget: larger images are refused before any allocation. */
#define LOUPE_DEFAULT_MAX_PIXELS 100000000u

/* Decodes a PNG, JPEG or binary PPM/PGM (P6/P5) held in memory with the semantics of
 * PIL's Image.open(...).convert("RGB") (EXIF orientation ignored, alpha dropped).
 * Returns 0, or -1 with *out empty and one sentence in err. */
int loupe_image_decode(const void *data, size_t size, size_t max_pixels,
                       loupe_image *out, char *err, size_t errsize);

/* Reads and decodes a file; error messages start with the file name. */
int loupe_image_load(const char *path, size_t max_pixels, loupe_image *out,
                     char *err, size_t errsize);

void loupe_image_free(loupe_image *img);

/* PIL's Image.resize((dw, dh), Image.BILINEAR) on 8-bit RGB, bit for bit; dst holds
 * dw*dh*3 bytes. Returns 0, or -1 for invalid sizes or when out of memory. */
int loupe_resize_rgb(const unsigned char *src, int sw, int sh,
                     unsigned char *dst, int dw, int dh);

/* Encodes 8-bit gray (channels 1) or RGB (channels 3) pixels as a PNG into a malloc'd
 * buffer (*png, *png_size; release with free). Returns 0 or -1 with a message. */
int loupe_png_encode(const unsigned char *pixels, int width, int height, int channels,
                     unsigned char **png, size_t *png_size, char *err, size_t errsize);

/* ---- Model: the weight file, memory-mapped (or read once) ---- */

typedef struct loupe_model loupe_model;

/* Hyperparameters of a loaded model (read-only view). */
typedef struct loupe_config {
    int image_size, patch_size, grid;            /* S, P, g = S / P */
    int width, layers, heads, mlp_width;         /* Perception Encoder ViT */
    int pool_heads, pool_mlp_width;              /* attention pooling */
    int cls_hidden, cls_layers;                  /* classifier MLPs */
    int feature_size, mask_feature_size, hidden_dim, m2f_heads;  /* Mask2Former */
    int enc_layers, enc_ffn, dec_layers, dec_ffn, num_queries, num_labels;
    int gn_groups, deform_levels, deform_points;
    float ln_eps, fpn_ln_eps, gn_eps, rope_theta;
} loupe_config;

/* Loads and validates a weight file written by tools/convert.py. Returns NULL on
 * error (missing file, bad magic, unsupported version, truncation, an index entry
 * outside the file or overlapping another, a missing or mis-shaped tensor). */
loupe_model *loupe_model_load(const char *path, char *err, size_t errsize);
/* The same from bytes already in memory (e.g. weights linked into firmware). The
 * model borrows data, which must stay valid and unchanged until loupe_model_free
 * and be aligned to 4 bytes (64 for best speed). */
loupe_model *loupe_model_load_memory(const void *data, size_t size, char *err, size_t errsize);
const loupe_config *loupe_model_config(const loupe_model *m);
void loupe_model_free(loupe_model *m);

/* ---- Session: activations and outputs of one forward pass ---- */

typedef struct loupe_session loupe_session;

/* The stages of a forward pass, as timed in loupe_outputs.stage_seconds. */
enum {
    LOUPE_STAGE_BACKBONE, LOUPE_STAGE_CLASSIFIER, LOUPE_STAGE_FEATURE_PYRAMID, LOUPE_STAGE_PIXEL_DECODER,
    LOUPE_STAGE_TRANSFORMER_DECODER, LOUPE_STAGE_POSTPROCESS, LOUPE_STAGE_COUNT
};

/* Everything a forward pass produces. Pointers stay valid until the next forward
 * or loupe_session_free. Shapes use g = grid, Q = num_queries, M = 4g. */
typedef struct loupe_outputs {
    float global_logit;          /* global classifier logit */
    float fused_logit;           /* fuser output: upstream cls_logits */
    float prob;                  /* sigmoid(fused_logit): probability of forgery */
    const float *patch_logits;   /* [g*g] row-major patch logits */
    const float *class_logits;   /* [Q][num_labels+1] final class logits */
    const float *mask_logits;    /* [Q][M][M] final mask logits */
    const float *seg_prob;       /* [384][384] forgery probability map */
    int grid, num_queries, mask_size, seg_size;
    double stage_seconds[LOUPE_STAGE_COUNT]; /* wall time of each stage of the last forward */
} loupe_outputs;

/* Allocates one planned activation arena for the model's sizes. */
loupe_session *loupe_session_new(const loupe_model *m, char *err, size_t errsize);
void loupe_session_free(loupe_session *s);

/* Upstream's LoupeImageProcessor: PIL bilinear resize to S x S, then x / 255 (in
 * double, rounded to float) and (x - 0.5) / 0.5 -> pixel_values [3][S][S] (caller's
 * buffer of 3*S*S floats, S = loupe_model_config(m)->image_size). */
int loupe_preprocess(const loupe_model *m, const loupe_image *img, float *pixel_values,
                     char *err, size_t errsize);

/* Runs stage "test" of upstream Loupe on a normalized image tensor
 * pixel_values[3][S][S] ((x/255 - 0.5) / 0.5, channels R, G, B). */
int loupe_forward(loupe_session *s, const float *pixel_values, char *err, size_t errsize);
const loupe_outputs *loupe_get_outputs(const loupe_session *s);

/* Post-processing at the original image size: seg_prob (may be NULL) receives
 * [height][width] probabilities, mask (may be NULL) bytes 255 where seg_prob >
 * threshold (upstream: 0.5), else 0. */
int loupe_postprocess(const loupe_session *s, int width, int height, float threshold,
                      float *seg_prob, unsigned char *mask, char *err, size_t errsize);

/* Observes named intermediate tensors during loupe_forward (for tests and
 * teaching). dims are in upstream's order (e.g. 1, C, H, W); channels_last is 1
 * when the data is stored as [H*W][C] instead of [C][H][W]. */
typedef void (*loupe_tap_fn)(void *user, const char *name, const float *data,
                             int ndim, const int *dims, int channels_last);
void loupe_set_tap(loupe_session *s, loupe_tap_fn fn, void *user);

/* Number of threads a forward may use (OpenMP builds; ignored otherwise). Like
 * omp_set_num_threads it applies to the calling thread: call it before creating the
 * sessions that thread will run (their scratch is sized for it). */
void loupe_set_threads(int n);

/* ---- Test-time adaptation (TTA): Loupe's pseudo-label fine-tuning of the segmentor ---- */
/* The classifier's verdict on an unlabeled image supervises the segmentor: p = the
 * forgery probability; if p > 0.5 the target is one forgery mask sigmoid(patch logits),
 * otherwise no target. A loupe_tta owns writable copies of every segmentor.* tensor and
 * AdamW's state; the model (backbone, classifier) stays read-only and shared. One step:
 * forward, pseudo labels, LoupeSegLoss (final + auxiliary predictions), backward,
 * gradient-norm clipping, AdamW. See README "Test-time adaptation". An adapter (and
 * the sessions using it) must be used by one thread at a time; create it after
 * loupe_set_threads, like a session. */

typedef struct loupe_tta loupe_tta;

typedef struct loupe_tta_options {
    double lr;                   /* AdamW learning rate (1e-4) */
    double beta1, beta2, eps;    /* AdamW (0.9, 0.999, 1e-8) */
    double weight_decay;         /* 1e-3; 0 for tensors whose name contains "bias" */
    double clip_norm;            /* total gradient L2 norm is clipped to this (1.0) */
    unsigned long long seed;     /* seed of the loss's random points (splitmix64 stream) */
} loupe_tta_options;

/* Loss of one image (or, from loupe_tta_adapt's progress, the mean over a step's images). */
typedef struct loupe_tta_loss {
    double total;                /* the minimized loss: sum of the weighted terms below */
    double mask, dice, cross_entropy; /* 5 * focal, 5 * Tversky, 2 * cross-entropy, summed
                                    over the final and auxiliary predictions */
    float prob;                  /* pseudo label p (one image) */
    int has_target;              /* p > 0.5 (adapt: number of such images in the step) */
    double grad_norm;            /* gradient norm before clipping (after an update) */
} loupe_tta_loss;

/* Memory of an adapter, in bytes (trainable: number of trainable floats). */
typedef struct loupe_tta_memory {
    size_t saved_activations, backward_scratch, parameters, session, trainable;
} loupe_tta_memory;

void loupe_tta_default_options(loupe_tta_options *o);

/* Copies the model's segmentor (the model must outlive the adapter). opt may be NULL
 * (defaults: upstream's test-stage hyperparameters). */
loupe_tta *loupe_tta_new(const loupe_model *m, const loupe_tta_options *opt, char *err, size_t errsize);
void loupe_tta_free(loupe_tta *t);

/* One optimizer step on one image: accumulate with weight 1, then update. */
int loupe_tta_step(loupe_tta *t, const float *pixel_values, loupe_tta_loss *loss, char *err, size_t errsize);

/* Forward + loss + backward of one image; adds weight * gradient to the pending sum
 * (use weight 1/B to average B images into one step). */
int loupe_tta_accumulate(loupe_tta *t, const float *pixel_values, float weight, loupe_tta_loss *loss,
                         char *err, size_t errsize);

/* Clips the pending gradient to opt.clip_norm, applies AdamW and clears it;
 * *grad_norm (may be NULL) receives the norm before clipping. */
int loupe_tta_update(loupe_tta *t, double *grad_norm, char *err, size_t errsize);

/* Supplies pixel_values [3][S][S] of image `index` (0..n-1); returns 0 or -1 with err. */
typedef int (*loupe_tta_source)(void *user, int index, float *pixel_values, char *err, size_t errsize);
/* Called after each step with the step's mean loss (may be NULL). */
typedef void (*loupe_tta_progress)(void *user, int step, const loupe_tta_loss *loss);

/* `steps` optimizer steps, each on the mean loss of the next `batch` images of the
 * set (cycling in order; batch >= n uses the whole set every step). */
int loupe_tta_adapt(loupe_tta *t, int n_images, loupe_tta_source source, void *user, int steps, int batch,
                    loupe_tta_progress progress, char *err, size_t errsize);

/* Makes the session's forward use the adapter's current segmentor (t NULL: the
 * model's again). The adapter must outlive that use. */
int loupe_session_use_tta(loupe_session *s, const loupe_tta *t, char *err, size_t errsize);

/* Writes a weight file: the model's, with the adapted segmentor (loads like any other). */
int loupe_tta_save(const loupe_tta *t, const char *path, char *err, size_t errsize);

void loupe_tta_get_memory(const loupe_tta *t, loupe_tta_memory *mem);

/* ---- Random initialisation ---- */

/* Writes a weight file for the configuration in config_path (tools/convert.py's JSON
 * config format) with every tensor drawn as upstream's from-scratch construction draws
 * it (LoupeModel(config) + post_init; the rules are listed in loupe.c, section 3b),
 * from a deterministic generator seeded by seed: the same seed gives the same bytes on
 * every platform. dtype: "f32" (NULL), "bf16" or "q8" for the weight matrices.
 * backbone_path, unless NULL, names a weight file whose backbone.* tensors are copied
 * instead (their shapes must match the config). The file is written under a temporary
 * name and renamed when complete. Returns 0, or -1 with one sentence in err. */
int loupe_init_weights(const char *config_path, const char *out_path, unsigned long long seed, const char *dtype,
                       const char *backbone_path, char *err, size_t errsize);

#ifdef __cplusplus
}
#endif
#endif
