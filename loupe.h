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

typedef struct loupe_trainer loupe_tta;   /* a trainer in its test-time-adaptation configuration */

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

/* ---- Labelled datasets, training examples and validation metrics ---- */

/* A source of uniform float32 numbers in [0, 1): fill(state, out, n) writes the next n.
 * Used where upstream calls torch.rand (the dithering of forgery masks); a test can
 * replay PyTorch's recorded draws through it. */
typedef void (*loupe_uniform_fn)(void *state, float *out, size_t n);
typedef struct loupe_uniform { loupe_uniform_fn fill; void *state; } loupe_uniform;

/* The default seeded stream (the one test-time adaptation uses): number i of the stream
 * (i = counter, counting from 0 over all calls) is splitmix64(seed + (i + 1) *
 * 0x9E3779B97F4A7C15) >> 40, divided by 2^24. Start with counter 0:
 *     loupe_splitmix st = {seed, 0};  loupe_uniform u = {loupe_splitmix_fill, &st}; */
typedef struct loupe_splitmix { unsigned long long seed, counter; } loupe_splitmix;
void loupe_splitmix_fill(void *state, float *out, size_t n);

/* A labelled set of images, validated when opened. path is either
 *   - a folder with images/ and masks/: every .png/.jpg/.jpeg/.ppm/.pgm file of images/
 *     is an entry (name order; other files and names starting with '.' are ignored); its
 *     mask is the file of masks/ with the same stem (name without its last extension), in
 *     any supported format; an image without a mask is authentic. Two images or two masks
 *     with one stem, and a mask without an image, are errors;
 *   - a text file of lines `IMAGE [MASK]` (whitespace-separated, paths relative to the
 *     list file's folder unless absolute; blank lines and lines starting with '#' are
 *     skipped; an image listed twice is an error).
 * Every image and mask is decoded once (at most max_pixels pixels; threads with OpenMP)
 * and a mask must have its image's size. Any bad entry refuses the whole set: NULL and
 * one sentence naming the file (LIST:LINE: for lists), e.g. the first bad entry and how
 * many others are bad. An empty set is refused too. */
typedef struct loupe_dataset loupe_dataset;
loupe_dataset *loupe_dataset_open(const char *path, size_t max_pixels, char *err, size_t errsize);
int loupe_dataset_count(const loupe_dataset *d);
/* Entry i (0..count-1): its image path and its mask path (NULL: authentic); the strings
 * live as long as the dataset. Returns 0, or -1 when i is out of range. */
int loupe_dataset_entry(const loupe_dataset *d, int i, const char **image, const char **mask);
/* Decodes entry i: *img, and *mask (left empty, rgb NULL, when the entry has no mask;
 * mask may be NULL to skip it). Both are released with loupe_image_free. */
int loupe_dataset_load(const loupe_dataset *d, int i, loupe_image *img, loupe_image *mask,
                       char *err, size_t errsize);
void loupe_dataset_free(loupe_dataset *d);

/* Upstream's LoupeImageProcessor.convert_to_binary_masks on one mask at its own size:
 * L = Pillow's convert("L") of the RGB pixels ((19595 R + 38470 G + 7471 B + 0x8000) >> 16,
 * so gray masks keep their values), normalized = (L - min) / (max - min) as a correctly
 * rounded float32 (all zeros when max == min), binary = normalized >= u with one uniform u
 * per pixel in row-major order (width*height draws, also for a constant mask).
 * binary (may be NULL) receives width*height bytes 0/1, normalized (may be NULL) floats. */
int loupe_mask_binarize(const loupe_image *mask, const loupe_uniform *u, unsigned char *binary,
                        float *normalized, char *err, size_t errsize);

/* One training example exactly as upstream's DataModule.train_collate_fn builds it (the
 * processor call with masks and patch labels), with S = image_size, P = patch_size,
 * g = S / P of the model:
 *   pixel_values [3][S][S]  loupe_preprocess;
 *   mask_labels  [S][S]     the dithered mask (loupe_mask_binarize, draws from u) resized
 *                           to S x S with Pillow's NEAREST, 1.0 forged, 0.0 elsewhere;
 *   *n_targets              1 when mask_labels has a forged pixel, else 0 (upstream's
 *                           class_labels [0] or []);
 *   patch_labels [g][g]     the undithered normalized mask, bilinear to S x S
 *                           (F.interpolate, align_corners=False), mean of each P x P block.
 * mask NULL (an authentic image): mask_labels and patch_labels are zeros, *n_targets 0 and
 * nothing is drawn from u (u may then be NULL). The image label is mask != NULL. A mask
 * must have the image's size. Any output pointer but pixel_values may be NULL. */
int loupe_prepare_example(const loupe_model *m, const loupe_image *img, const loupe_image *mask,
                          const loupe_uniform *u, float *pixel_values, float *mask_labels,
                          int *n_targets, float *patch_labels, char *err, size_t errsize);

/* Upstream's validation metrics (LitModel.on_validation_epoch_end with Metric):
 *   auc       roc_auc_score(labels, probabilities): the probability that a forged image
 *             scores above an authentic one, ties counting 1/2; NaN unless both classes
 *             are present (scikit-learn raises an error there);
 *   f1, iou   over the pooled pixels of the images whose target has a forged pixel (the
 *             others are skipped, whatever their label or prediction): f1 binary with
 *             zero_division=1 (2PR / (P + R)), iou the mean over the classes real and
 *             forged of TP/(TP+FP+FN) (a class with an empty union left out); both NaN
 *             when no image has a forged target pixel (upstream fails there);
 *   overall   (auc + iou + f1) / 3 (NaN when one of them is);
 *   accuracy  fraction of images with (probability > 0.5) == label. */
typedef struct loupe_metrics {
    double auc, f1, iou, overall, accuracy;
    long long images, forged_images;   /* images added; those with label 1 */
    long long pixel_images;            /* images used by f1 and iou */
    long long tp, fp, fn, tn;          /* pixel counts of those images (forged = positive) */
} loupe_metrics;

typedef struct loupe_metrics_acc loupe_metrics_acc;
loupe_metrics_acc *loupe_metrics_new(char *err, size_t errsize);
/* Adds one image: its forgery probability (not NaN), label (1 forged, 0 authentic) and,
 * for the pixel metrics, the predicted mask and the (binary) target, width*height bytes
 * each, nonzero = forged (both NULL: image metrics only). */
int loupe_metrics_add(loupe_metrics_acc *a, float prob, int label, const unsigned char *pred,
                      const unsigned char *target, int width, int height, char *err, size_t errsize);
/* The metrics of everything added so far (the accumulator stays usable). */
int loupe_metrics_result(const loupe_metrics_acc *a, loupe_metrics *out, char *err, size_t errsize);
void loupe_metrics_free(loupe_metrics_acc *a);

/* One image of an evaluation, as reported to loupe_evaluate's callback. */
typedef struct loupe_eval_image {
    int index;                       /* dataset entry */
    const char *image;               /* its path */
    int label;                       /* 1: the entry has a mask */
    float prob;                      /* forgery probability */
    int width, height;
    long long pred_forged;           /* pixels of the predicted mask (threshold 0.5) */
    long long target_forged;         /* pixels of the dithered target */
} loupe_eval_image;
typedef void (*loupe_eval_fn)(void *user, const loupe_eval_image *r);

/* Upstream's validation loop over a dataset with the session's model (or adapted
 * segmentor): per entry, forward, the mask at the original size (loupe_postprocess,
 * threshold 0.5) and the target as test_collate_fn makes it (loupe_mask_binarize at the
 * original size, draws from one loupe_splitmix stream {seed, 0} consumed in entry order;
 * zeros for authentic images); then the metrics. per_image (may be NULL) is called after
 * each image. Returns 0, or -1 with err (an image that can no longer be read). */
int loupe_evaluate(loupe_session *s, const loupe_dataset *d, unsigned long long seed, loupe_metrics *out,
                   loupe_eval_fn per_image, void *user, char *err, size_t errsize);

/* ---- Training: upstream's stages cls, seg and cls_seg ---- */
/* A loupe_trainer owns float32 copies of the tensors a stage trains, their gradients,
 * AdamW's moments, the saved activations of one image and the backward's scratch; the
 * model stays read-only. Test-time adaptation (above) is the same trainer configured
 * with pseudo labels and the segmentor only. One optimizer step: loupe_trainer_accumulate
 * on one or more batches (each a loss over its images, as upstream collates them), then
 * loupe_trainer_update. See README "Training". Use from one thread at a time; create it
 * after loupe_set_threads. */

typedef struct loupe_trainer loupe_trainer;

enum { LOUPE_TRAIN_TTA, LOUPE_TRAIN_CLS, LOUPE_TRAIN_SEG, LOUPE_TRAIN_CLS_SEG };

typedef struct loupe_train_options {
    int stage;                   /* LOUPE_TRAIN_CLS, _SEG or _CLS_SEG */
    double lr;                   /* AdamW learning rate of the heads */
    double backbone_lr;          /* of tensors whose name contains "backbone" */
    double weight_decay;         /* 0 for tensors whose name contains "bias" */
    double beta1, beta2, eps;    /* AdamW (0.9, 0.999, 1e-8) */
    double clip_norm;            /* total gradient L2 norm clipped to this (1.0) */
    int train_backbone;          /* 1: every backbone tensor trains (cls_seg's default) */
    int train_embeddings;        /* 1: backbone.class_embedding and .positional_embedding train
                                    even with a frozen backbone (upstream does, by accident) */
    double cls_loss_weight;      /* total = cls_loss_weight * cls + seg_loss_weight * seg */
    double seg_loss_weight;
    unsigned long long seed;     /* seed of the loss's random points */
} loupe_train_options;

/* Upstream's values for a stage (configs/hparams, configs/model). */
void loupe_train_default_options(loupe_train_options *o, int stage);

/* One labelled image, prepared as upstream's training collate function does. */
typedef struct loupe_example {
    const float *pixel_values;   /* [3][S][S] */
    const float *mask_labels;    /* [S][S] 1 = forged (NULL or unread when n_targets is 0) */
    int n_targets;               /* 1 when mask_labels has a forged pixel, else 0 */
    const float *patch_labels;   /* [g][g] soft patch labels */
    int label;                   /* 1 forged, 0 authentic */
    const float *features;       /* the frozen backbone's outputs for this image, kept from
                                    loupe_trainer_features (skips the backbone), or NULL */
} loupe_example;

/* Loss of one batch (terms as upstream logs them). */
typedef struct loupe_train_loss {
    double total;                /* cls_loss_weight * cls + seg_loss_weight * seg */
    double cls, cls_part, patch_part; /* LoupeClsLoss and its two parts */
    double seg, mask, dice, cross_entropy; /* LoupeSegLoss and its weighted terms (summed
                                    over the final and auxiliary predictions) */
} loupe_train_loss;

loupe_trainer *loupe_trainer_new(const loupe_model *m, const loupe_train_options *opt, char *err, size_t errsize);
void loupe_trainer_free(loupe_trainer *t);

/* Forward, loss and backward of one batch of n images (their loss is upstream's batch
 * loss); adds scale * its gradient to the pending sum (scale 1 / accumulate_grad_batches
 * as Lightning does). */
int loupe_trainer_accumulate(loupe_trainer *t, const loupe_example *batch, int n, double scale,
                             loupe_train_loss *loss, char *err, size_t errsize);

/* Clips the pending gradient, applies AdamW with every learning rate times lr_factor
 * (the schedule's factor) and clears it; *grad_norm (may be NULL) gets the norm before clipping. */
int loupe_trainer_update(loupe_trainer *t, double lr_factor, double *grad_norm, char *err, size_t errsize);

/* Writes the model's weight file with the trained tensors (F32 files only). */
int loupe_trainer_save(const loupe_trainer *t, const char *path, char *err, size_t errsize);

/* A frozen backbone (no backbone tensor trains) gives the same outputs for an image in
 * every epoch: loupe_trainer_feature_floats is their size in floats (0 when the backbone
 * trains), loupe_trainer_features computes them into features for loupe_example.features. */
size_t loupe_trainer_feature_floats(const loupe_trainer *t);
int loupe_trainer_features(loupe_trainer *t, const float *pixel_values, float *features, char *err, size_t errsize);

/* Learning-rate schedules (LambdaLR factors of upstream's transformers schedules) at
 * optimizer step `step` of `total`, with warm-up and decay lengths in steps. */
enum { LOUPE_SCHEDULE_WSD, LOUPE_SCHEDULE_COSINE, LOUPE_SCHEDULE_CONSTANT };
double loupe_lr_factor(int schedule, long step, double total, double warmup, double decay);

/* The optimizer's state (AdamW moments, step count, the loss's random-stream position)
 * and `user_size` bytes of the caller's (e.g. its epoch and data order), for resuming a
 * run bit for bit: save writes a temporary file and renames it; load checks that the
 * state belongs to this trainer's tensors (names and sizes) and stage. The trained
 * values themselves live in the weight file loupe_trainer_save wrote. */
int loupe_trainer_save_state(const loupe_trainer *t, const char *path, const void *user, size_t user_size,
                             char *err, size_t errsize);
int loupe_trainer_load_state(loupe_trainer *t, const char *path, void *user, size_t user_size,
                             char *err, size_t errsize);

/* Number of trainable tensors and values. */
void loupe_trainer_size(const loupe_trainer *t, int *tensors, size_t *values);
/* ---- Random initialisation ---- */

/* Writes a weight file for the configuration in config_path (tools/convert.py's JSON
 * config format) with every tensor drawn as upstream's from-scratch construction draws
 * it (LoupeModel(config) + post_init; the rules are listed in loupe.c, section 9),
 * from a deterministic generator seeded by seed: the same seed gives the same bytes on
 * every platform. dtype: "f32" (NULL), "bf16" or "q8" for the weight matrices.
 * backbone_path, unless NULL, names a weight file whose backbone.* tensors are copied
 * instead (their shapes must match the config). The file is written under a temporary
 * name and renamed when complete. Returns 0, or -1 with one sentence in err. */
int loupe_init_weights(const char *config_path, const char *out_path, unsigned long long seed, const char *dtype,
                       const char *backbone_path, char *err, size_t errsize);

/* loupe_init_weights with every option; highpass (0: upstream's init) is the share of
 * the patch embedding's filters drawn as high-pass filters (the demo model's stem: zero
 * response to flat and linear patches, weights/README.md). Not an upstream option. */
typedef struct loupe_init_options {
    unsigned long long seed;
    const char *dtype;         /* "f32" (or NULL), "bf16", "q8" */
    const char *backbone_path; /* NULL, or a weight file whose backbone.* tensors are copied */
    double highpass;           /* 0 to 1 */
} loupe_init_options;
int loupe_init_weights_with(const char *config_path, const char *out_path, const loupe_init_options *opt, char *err,
                            size_t errsize);

#ifdef __cplusplus
}
#endif
#endif
