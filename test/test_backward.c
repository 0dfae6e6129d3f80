/* test_backward.c - finite-difference checks of every *_backward function of loupe.c.
 *
 *   test_backward [WEIGHTS.bin]
 *
 * Each kernel's forward runs on small odd shapes; the objective is sum(r * y) for a fixed
 * random r, so the backward fed with dy = r must give its gradient. Every input and
 * parameter element is checked against a central difference of the float forward,
 * accumulated in double: |fd - analytic| <= FD_TOL * max|analytic| over the tensor. The
 * rounding noise of a float forward is about 6e-8 * |objective| / step, far below
 * FD_TOL. Backwards must also accumulate (+=): each is called twice and must double.
 * The backbone's and the classifier's modules run on a model of odd small sizes built
 * here (no weight file), every parameter trained; a frozen block must pass the same
 * input gradient, and frozen BF16/Q8 weights the input gradient of their values.
 * Given the tiny golden weight file, the whole TTA step is also checked in its
 * no-target branch (pseudo label forced below 0.5) and by central differences through
 * the whole segmentor. */
#define LOUPE_NO_MAIN
#include "../loupe.c"

#define FD_TOL 1e-3          /* kernels: central differences vs analytic, of the tensor's max */
#define FD_STEP 1e-2f        /* smooth kernels (linear in most inputs: exact but for rounding) */
#define FD_STEP_KINK 1e-3f   /* kernels with kinks (ReLU, max-pool, bilinear sampling) */
#define KINK_MARGIN 1e-2     /* inputs this close to a kink are skipped */
#define ADD_TOL 1e-6         /* a second backward call must add exactly the same again */
#define MAX_ELEMS 4096

static int passed, failed;

static void check(int ok, const char *what, double err)
{
    if (ok) passed++;
    else failed++;
    printf("%-64s %s  (%.3g)\n", what, ok ? "ok" : "FAIL", err);
}

static float rnd(uint64_t *s)
{
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((*s >> 40) / 8388608.0 - 1.0);
}

static void fill(float *x, size_t n, uint64_t *s, float scale)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = scale * rnd(s);
}

/* sum(r * y) in double. */
static double dot(const float *r, const float *y, size_t n)
{
    double s = 0.0;
    size_t i;
    for (i = 0; i < n; i++) s += (double)r[i] * y[i];
    return s;
}

/* A forward pass to differentiate: returns sum(r * forward(current inputs)). */
typedef double (*objective_fn)(void *ctx);

/* Compares analytic [n] with central differences of f in every element of x [n] that
 * skip (may be NULL) does not exclude; returns max error / max |analytic|. */
static double fd_error(objective_fn f, void *ctx, float *x, const float *analytic, size_t n, float step,
                       int (*skip)(void *ctx, size_t i))
{
    double maxd = 0.0, maxa = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        float keep = x[i], xp = keep + step, xm = keep - step;
        double fp, fm, fd;
        if (fabs(analytic[i]) > maxa) maxa = fabs(analytic[i]);
        if (skip && skip(ctx, i)) continue;
        x[i] = xp; fp = f(ctx);
        x[i] = xm; fm = f(ctx);
        x[i] = keep;
        fd = (fp - fm) / ((double)xp - (double)xm);
        if (!(fabs(fd - analytic[i]) <= maxd)) maxd = fabs(fd - analytic[i]);
    }
    return maxa > 0.0 ? maxd / maxa : maxd;
}

/* max |b - 2a| / max |a|: a second accumulation must double the result. */
static double doubling_error(const float *once, const float *twice, size_t n)
{
    double maxd = 0.0, maxa = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        if (fabs(twice[i] - 2.0 * once[i]) > maxd) maxd = fabs(twice[i] - 2.0 * once[i]);
        if (fabs(once[i]) > maxa) maxa = fabs(once[i]);
    }
    return maxa > 0.0 ? maxd / maxa : maxd;
}

static void report(const char *kernel, const char *grad, double err)
{
    char what[128];
    snprintf(what, sizeof what, "%s: d %s vs central differences", kernel, grad);
    check(err <= FD_TOL, what, err);
}

static void report_add(const char *kernel, double err)
{
    char what[128];
    snprintf(what, sizeof what, "%s: a second call accumulates (+=)", kernel);
    check(err <= ADD_TOL, what, err);
}

/* ---- linear ---- */
enum { LIN_ROWS = 5, LIN_IN = 7, LIN_OUT = 6, LIN_LDY = 9 };
typedef struct lin_ctx { float x[LIN_ROWS * LIN_IN], w[LIN_OUT * LIN_IN], b[LIN_OUT], r[LIN_ROWS * LIN_LDY]; } lin_ctx;
static double lin_f(void *p)
{
    lin_ctx *c = p;
    float y[LIN_ROWS * LIN_LDY];
    linear_w l;
    int i, j;
    double s = 0.0;
    l.w = wmat_f32(c->w, LIN_IN); l.b = c->b;
    gemm_nt_w(LIN_ROWS, LIN_OUT, LIN_IN, c->x, LIN_IN, l.w, l.b, y, LIN_LDY, 0);
    for (i = 0; i < LIN_ROWS; i++)
        for (j = 0; j < LIN_OUT; j++) s += (double)c->r[i * LIN_LDY + j] * y[i * LIN_LDY + j];
    return s;
}
static void test_linear(void)
{
    static lin_ctx c;
    float dx[LIN_ROWS * LIN_IN], dw[LIN_OUT * LIN_IN], db[LIN_OUT], dx2[LIN_ROWS * LIN_IN], wt[LIN_OUT * LIN_IN];
    uint64_t s = 1;
    fill(c.x, LIN_ROWS * LIN_IN, &s, 1); fill(c.w, LIN_OUT * LIN_IN, &s, 1); fill(c.b, LIN_OUT, &s, 1);
    fill(c.r, LIN_ROWS * LIN_LDY, &s, 1);
    memset(dx, 0, sizeof dx); memset(dw, 0, sizeof dw); memset(db, 0, sizeof db);
    linear_backward(dx, dw, db, c.r, LIN_LDY, c.x, LIN_ROWS, LIN_IN, LIN_OUT, c.w, wt);
    report("linear_backward", "x", fd_error(lin_f, &c, c.x, dx, LIN_ROWS * LIN_IN, FD_STEP, NULL));
    report("linear_backward", "weight", fd_error(lin_f, &c, c.w, dw, LIN_OUT * LIN_IN, FD_STEP, NULL));
    report("linear_backward", "bias", fd_error(lin_f, &c, c.b, db, LIN_OUT, FD_STEP, NULL));
    memcpy(dx2, dx, sizeof dx);
    linear_backward(dx2, dw, db, c.r, LIN_LDY, c.x, LIN_ROWS, LIN_IN, LIN_OUT, c.w, wt);
    report_add("linear_backward", doubling_error(dx, dx2, LIN_ROWS * LIN_IN));
}

/* ---- LayerNorm and GroupNorm ---- */
enum { LN_ROWS = 3, LN_DIM = 13, GN_HW = 7, GN_C = 12, GN_G = 3 };
typedef struct norm_ctx { float x[GN_HW * GN_C], w[GN_C + LN_DIM], b[GN_C + LN_DIM], r[GN_HW * GN_C]; int group; } norm_ctx;
static double norm_f(void *p)
{
    norm_ctx *c = p;
    float y[GN_HW * GN_C];
    norm_w n;
    n.w = c->w; n.b = c->b;
    if (c->group) {
        memcpy(y, c->x, sizeof y);
        groupnorm_hwc(y, GN_HW, GN_C, GN_G, n, 1e-5f);
        return dot(c->r, y, GN_HW * GN_C);
    }
    layernorm(y, c->x, LN_ROWS, LN_DIM, n, 1e-5f);
    return dot(c->r, y, LN_ROWS * LN_DIM);
}
static void test_norms(void)
{
    static norm_ctx c;
    float dx[GN_HW * GN_C], dw[GN_C + LN_DIM], db[GN_C + LN_DIM], stats[2 * GN_HW], dx2[GN_HW * GN_C];
    norm_w n;
    uint64_t s = 2;
    int grp;
    for (grp = 0; grp < 2; grp++) {
        const char *name = grp ? "groupnorm_hwc_backward" : "layernorm_backward";
        size_t nx = grp ? GN_HW * GN_C : LN_ROWS * LN_DIM, nc = grp ? GN_C : LN_DIM;
        c.group = grp;
        fill(c.x, nx, &s, 2); fill(c.w, nc, &s, 1); fill(c.b, nc, &s, 1); fill(c.r, nx, &s, 1);
        n.w = c.w; n.b = c.b;
        memset(dx, 0, sizeof dx); memset(dw, 0, sizeof dw); memset(db, 0, sizeof db);
        if (grp) groupnorm_hwc_backward(dx, dw, db, c.r, c.x, GN_HW, GN_C, GN_G, n, 1e-5f);
        else layernorm_backward(dx, dw, db, c.r, c.x, LN_ROWS, LN_DIM, n, 1e-5f, stats);
        report(name, "x", fd_error(norm_f, &c, c.x, dx, nx, FD_STEP, NULL));
        report(name, "weight", fd_error(norm_f, &c, c.w, dw, nc, FD_STEP, NULL));
        report(name, "bias", fd_error(norm_f, &c, c.b, db, nc, FD_STEP, NULL));
        memcpy(dx2, dx, sizeof dx);
        if (grp) groupnorm_hwc_backward(dx2, dw, db, c.r, c.x, GN_HW, GN_C, GN_G, n, 1e-5f);
        else layernorm_backward(dx2, dw, db, c.r, c.x, LN_ROWS, LN_DIM, n, 1e-5f, stats);
        report_add(name, doubling_error(dx, dx2, nx));
    }
}

/* ---- GELU, ReLU, softmax ---- */
enum { ACT_N = 40, SM_ROWS = 3, SM_N = 7 };
typedef struct act_ctx { float x[ACT_N], r[ACT_N]; int kind; } act_ctx;
static double act_f(void *p)
{
    act_ctx *c = p;
    float y[ACT_N];
    memcpy(y, c->x, sizeof y);
    if (c->kind == 0) gelu(y, y, ACT_N);
    else if (c->kind == 1) relu(y, ACT_N);
    else softmax_rows(y, SM_ROWS, SM_N, 1.0f, NULL);
    return dot(c->r, y, c->kind == 2 ? SM_ROWS * SM_N : ACT_N);
}
static int relu_kink(void *p, size_t i) { return fabs(((act_ctx *)p)->x[i]) < KINK_MARGIN; }
static void test_activations(void)
{
    static act_ctx c;
    float y[ACT_N], dx[ACT_N], dx2[ACT_N];
    static const char *const names[3] = {"gelu_backward", "relu_backward", "softmax_rows_backward"};
    uint64_t s = 3;
    int k;
    for (k = 0; k < 3; k++) {
        size_t n = k == 2 ? SM_ROWS * SM_N : ACT_N;
        c.kind = k;
        fill(c.x, ACT_N, &s, 3); fill(c.r, ACT_N, &s, 1);
        memcpy(y, c.x, sizeof y);
        memset(dx, 0, sizeof dx);
        if (k == 0) gelu_backward(dx, c.r, c.x, n);
        else if (k == 1) { relu(y, n); relu_backward(dx, c.r, y, n); }
        else { softmax_rows(y, SM_ROWS, SM_N, 1.0f, NULL); softmax_rows_backward(dx, c.r, y, SM_ROWS, SM_N); }
        report(names[k], "x", fd_error(act_f, &c, c.x, dx, n, k == 1 ? FD_STEP_KINK : FD_STEP, k == 1 ? relu_kink : NULL));
        memcpy(dx2, dx, sizeof dx);
        if (k == 0) gelu_backward(dx2, c.r, c.x, n);
        else if (k == 1) relu_backward(dx2, c.r, y, n);
        else softmax_rows_backward(dx2, c.r, y, SM_ROWS, SM_N);
        report_add(names[k], doubling_error(dx, dx2, n));
    }
}

/* ---- multi-head attention, with and without a mask ---- */
enum { AT_Q = 3, AT_K = 5, AT_H = 2, AT_DH = 4, AT_D = AT_H * AT_DH };
typedef struct att_ctx { float q[AT_Q * AT_D], k[AT_K * AT_D], v[AT_K * AT_D], r[AT_Q * AT_D]; unsigned char mask[AT_Q * AT_K]; int masked; } att_ctx;
static double att_f(void *p)
{
    att_ctx *c = p;
    float out[AT_Q * AT_D], scratch[64 * AT_Q * AT_K];
    attention(out, AT_D, c->q, AT_D, c->k, AT_D, c->v, AT_D, AT_Q, AT_K, AT_H, AT_DH, 0.7f, c->masked ? c->mask : NULL,
              scratch);
    return dot(c->r, out, AT_Q * AT_D);
}
static void test_attention(void)
{
    static att_ctx c;
    float dq[AT_Q * AT_D], dk[AT_K * AT_D], dv[AT_K * AT_D], dq2[AT_Q * AT_D], scratch[64 * 2 * AT_Q * AT_K];
    uint64_t s = 4;
    int masked, i;
    char name[64];
    for (i = 0; i < AT_Q * AT_K; i++) c.mask[i] = (unsigned char)(i % 3 == 1);
    for (masked = 0; masked < 2; masked++) {
        c.masked = masked;
        snprintf(name, sizeof name, "attention_backward%s", masked ? " (masked)" : "");
        fill(c.q, sizeof c.q / 4, &s, 1); fill(c.k, sizeof c.k / 4, &s, 1); fill(c.v, sizeof c.v / 4, &s, 1);
        fill(c.r, sizeof c.r / 4, &s, 1);
        memset(dq, 0, sizeof dq); memset(dk, 0, sizeof dk); memset(dv, 0, sizeof dv);
        attention_backward(dq, AT_D, dk, AT_D, dv, AT_D, c.r, AT_D, c.q, AT_D, c.k, AT_D, c.v, AT_D, AT_Q, AT_K, AT_H, AT_DH,
                           0.7f, masked ? c.mask : NULL, scratch);
        report(name, "query", fd_error(att_f, &c, c.q, dq, AT_Q * AT_D, FD_STEP, NULL));
        report(name, "key", fd_error(att_f, &c, c.k, dk, AT_K * AT_D, FD_STEP, NULL));
        report(name, "value", fd_error(att_f, &c, c.v, dv, AT_K * AT_D, FD_STEP, NULL));
        memcpy(dq2, dq, sizeof dq);
        attention_backward(dq2, AT_D, dk, AT_D, dv, AT_D, c.r, AT_D, c.q, AT_D, c.k, AT_D, c.v, AT_D, AT_Q, AT_K, AT_H,
                           AT_DH, 0.7f, masked ? c.mask : NULL, scratch);
        report_add(name, doubling_error(dq, dq2, AT_Q * AT_D));
    }
}

/* ---- multi-scale deformable attention (bilinear sampling at offsets, weights, values) ---- */
enum { MS_F = 8, MS_H = 2, MS_P = 2, MS_NOFF = MS_H * 3 * MS_P };
typedef struct msda_ctx {
    loupe_tables tb;
    float ref[2 * 64], value[64 * MS_F], offs[64 * 2 * MS_NOFF], aw[64 * MS_NOFF], r[64 * MS_F];
} msda_ctx;
static double msda_f(void *p)
{
    msda_ctx *c = p;
    float out[64 * MS_F];
    ms_deform_attn_core(out, c->value, c->offs, c->aw, &c->tb, MS_F, MS_H, MS_P);
    return dot(c->r, out, (size_t)c->tb.tokens * MS_F);
}
/* Skips offsets whose sampling position lies near a pixel boundary (a kink). */
static int msda_kink(void *p, size_t i)
{
    msda_ctx *c = p;
    size_t t = i / (2 * MS_NOFF), idx = (i % (2 * MS_NOFF)) / 2;
    int axis = (int)(i % 2), l = (int)(idx / MS_P) % 3;
    float size = axis ? (float)c->tb.level_h[l] : (float)c->tb.level_w[l];
    double pos = (c->ref[2 * t + axis] + c->offs[i] / size) * size - 0.5;
    return fabs(pos - floor(pos + 0.5)) < KINK_MARGIN;
}
static void test_msda(void)
{
    static msda_ctx c;
    static const int hs[3] = {2, 3, 4}, ws[3] = {3, 2, 4};
    float dvalue[64 * MS_F], doffs[64 * 2 * MS_NOFF], daw[64 * MS_NOFF], dv2[64 * MS_F];
    uint64_t s = 5;
    int l, y, x;
    c.tb.tokens = 0;
    for (l = 0; l < 3; l++) {
        c.tb.level_h[l] = hs[l]; c.tb.level_w[l] = ws[l]; c.tb.level_start[l] = c.tb.tokens;
        for (y = 0; y < hs[l]; y++)
            for (x = 0; x < ws[l]; x++) {
                c.ref[2 * (c.tb.tokens + y * ws[l] + x)] = ((float)x + 0.5f) / (float)ws[l];
                c.ref[2 * (c.tb.tokens + y * ws[l] + x) + 1] = ((float)y + 0.5f) / (float)hs[l];
            }
        c.tb.tokens += hs[l] * ws[l];
    }
    c.tb.ref_points = c.ref;
    fill(c.value, (size_t)c.tb.tokens * MS_F, &s, 1);
    fill(c.offs, (size_t)c.tb.tokens * 2 * MS_NOFF, &s, 2.5f); /* some samples fall outside: zero padding */
    fill(c.aw, (size_t)c.tb.tokens * MS_NOFF, &s, 1);
    fill(c.r, (size_t)c.tb.tokens * MS_F, &s, 1);
    memset(dvalue, 0, sizeof dvalue); memset(doffs, 0, sizeof doffs); memset(daw, 0, sizeof daw);
    ms_deform_attn_core_backward(dvalue, doffs, daw, c.r, c.value, c.offs, c.aw, &c.tb, MS_F, MS_H, MS_P);
    report("ms_deform_attn_core_backward", "value", fd_error(msda_f, &c, c.value, dvalue, (size_t)c.tb.tokens * MS_F, FD_STEP, NULL));
    report("ms_deform_attn_core_backward", "sampling offsets",
           fd_error(msda_f, &c, c.offs, doffs, (size_t)c.tb.tokens * 2 * MS_NOFF, FD_STEP_KINK, msda_kink));
    report("ms_deform_attn_core_backward", "attention weights",
           fd_error(msda_f, &c, c.aw, daw, (size_t)c.tb.tokens * MS_NOFF, FD_STEP, NULL));
    memcpy(dv2, dvalue, sizeof dvalue);
    ms_deform_attn_core_backward(dv2, doffs, daw, c.r, c.value, c.offs, c.aw, &c.tb, MS_F, MS_H, MS_P);
    report_add("ms_deform_attn_core_backward", doubling_error(dvalue, dv2, (size_t)c.tb.tokens * MS_F));
}

/* ---- convolutions, max-pool, interpolation ---- */
enum { CV_H = 4, CV_W = 5, CV_CI = 3, CV_CO = 4, IP_OH = 7, IP_OW = 11 };
typedef struct conv_ctx {
    float in[CV_H * CV_W * CV_CO], wt[9 * CV_CO * CV_CI], b[CV_CO], r[4 * CV_H * CV_W * CV_CO];
    float *interp; /* INTERP_SCRATCH floats, allocated: it holds int indices as well */
    int kind;      /* 0 transposed, 1 depthwise, 2 3x3, 3 max-pool, 4 interpolation */
} conv_ctx;
static double conv_f(void *p)
{
    conv_ctx *c = p;
    float out[IP_OH * IP_OW * CV_CO + 4 * CV_H * CV_W * CV_CO], prod[4 * CV_H * CV_W * CV_CO];
    float *scratch = c->interp;
    size_t n;
    switch (c->kind) {
    case 0:
        conv_transpose2x2_hwc(out, c->in, CV_H, CV_W, CV_CI, CV_CO, wmat_f32(c->wt, (size_t)CONVT_TAPS * CV_CO), c->b, prod);
        n = 4 * CV_H * CV_W * CV_CO;
        break;
    case 1: depthwise3x3_hwc(out, c->in, CV_H, CV_W, CV_CO, c->wt); n = CV_H * CV_W * CV_CO; break;
    case 2: conv3x3_hwc(out, c->in, CV_H, CV_W, CV_CI, CV_CO, c->wt); n = CV_H * CV_W * CV_CO; break;
    case 3: maxpool2x2_hwc(out, c->in, CV_H, CV_W, CV_CO); n = (CV_H / 2) * (CV_W / 2) * CV_CO; break;
    default: interp_hwc(c->in, CV_H, CV_W, CV_CO, out, IP_OH, IP_OW, scratch); n = IP_OH * IP_OW * CV_CO;
    }
    return dot(c->r, out, n);
}
/* Max-pool: skips inputs within KINK_MARGIN of another value of their window. */
static int pool_kink(void *p, size_t i)
{
    conv_ctx *c = p;
    size_t ch = i % CV_CO, pix = i / CV_CO;
    int y = (int)(pix / CV_W), x = (int)(pix % CV_W), a, b;
    if (y / 2 >= CV_H / 2 || x / 2 >= CV_W / 2) return 0;
    for (a = 0; a < 2; a++)
        for (b = 0; b < 2; b++) {
            size_t j = ((size_t)(2 * (y / 2) + a) * CV_W + 2 * (x / 2) + b) * CV_CO + ch;
            if (j != i && fabs(c->in[j] - c->in[i]) < KINK_MARGIN) return 1;
        }
    return 0;
}
static void test_convolutions(void)
{
    static conv_ctx c;
    static const char *const names[5] = {"conv_transpose2x2_hwc_backward", "depthwise3x3_hwc_backward",
                                         "conv3x3_hwc_backward", "maxpool2x2_hwc_backward", "interp_hwc_backward"};
    float din[CV_H * CV_W * CV_CO], dwt[9 * CV_CO * CV_CI], db[CV_CO], din2[CV_H * CV_W * CV_CO];
    float scratch[9 * CV_CO * CV_CI + 4 * CV_H * CV_W * CV_CO];
    uint64_t s = 6;
    int k, rep;
    c.interp = malloc(INTERP_SCRATCH(IP_OH, IP_OW) * sizeof *c.interp);
    if (!c.interp) { printf("FAIL out of memory\n"); failed++; return; }
    for (k = 0; k < 5; k++) {
        size_t nin = (size_t)CV_H * CV_W * (k == 0 || k == 2 ? CV_CI : CV_CO);
        size_t nw = k == 0 ? 4 * CV_CO * CV_CI : k == 1 ? 9 * CV_CO : k == 2 ? 9 * CV_CO * CV_CI : 0;
        c.kind = k;
        fill(c.in, sizeof c.in / 4, &s, 1); fill(c.wt, sizeof c.wt / 4, &s, 1); fill(c.b, CV_CO, &s, 1);
        fill(c.r, sizeof c.r / 4, &s, 1);
        memset(din, 0, sizeof din); memset(dwt, 0, sizeof dwt); memset(db, 0, sizeof db);
        for (rep = 0; rep < 2; rep++) {
            if (rep) memcpy(din2, din, sizeof din);
            switch (k) {
            case 0: conv_transpose2x2_hwc_backward(rep ? din2 : din, dwt, db, c.r, c.in, CV_H, CV_W, CV_CI, CV_CO, c.wt, scratch); break;
            case 1: depthwise3x3_hwc_backward(rep ? din2 : din, dwt, c.r, c.in, CV_H, CV_W, CV_CO, c.wt); break;
            case 2: conv3x3_hwc_backward(rep ? din2 : din, dwt, c.r, c.in, CV_H, CV_W, CV_CI, CV_CO, c.wt, scratch); break;
            case 3: maxpool2x2_hwc_backward(rep ? din2 : din, c.r, c.in, CV_H, CV_W, CV_CO); break;
            default: interp_hwc_backward(rep ? din2 : din, c.r, CV_H, CV_W, CV_CO, IP_OH, IP_OW, c.interp);
            }
            if (rep) break;
            report(names[k], "input", fd_error(conv_f, &c, c.in, din, nin, k == 3 ? FD_STEP_KINK : FD_STEP,
                                                k == 3 ? pool_kink : NULL));
            if (nw) report(names[k], "weight", fd_error(conv_f, &c, c.wt, dwt, nw, FD_STEP, NULL));
            if (k == 0) report(names[k], "bias", fd_error(conv_f, &c, c.b, db, CV_CO, FD_STEP, NULL));
        }
        report_add(names[k], doubling_error(din, din2, nin));
    }
    free(c.interp);
}

/* ---- the mask einsum: masks[q][p] = embeddings[q] . mask_features[p] ---- */
enum { ME_Q = 6, ME_P = 37, ME_F = 5 };
typedef struct einsum_ctx { float me[ME_Q * ME_F], mf[ME_P * ME_F], r[ME_Q * ME_P]; } einsum_ctx;
static double einsum_f(void *p)
{
    einsum_ctx *c = p;
    float masks[ME_Q * ME_P];
    gemm_nt(ME_Q, ME_P, ME_F, c->me, ME_F, c->mf, ME_F, NULL, masks, ME_P, 0);
    return dot(c->r, masks, ME_Q * ME_P);
}
static void test_einsum(void)
{
    static einsum_ctx c;
    float dme[ME_Q * ME_F], dmf[ME_P * ME_F], dmf2[ME_P * ME_F], mf_t[ME_F * ME_P];
    uint64_t s = 7;
    fill(c.me, sizeof c.me / 4, &s, 1); fill(c.mf, sizeof c.mf / 4, &s, 1); fill(c.r, sizeof c.r / 4, &s, 1);
    memset(dme, 0, sizeof dme); memset(dmf, 0, sizeof dmf);
    mask_einsum_backward(dme, dmf, c.r, c.me, c.mf, ME_Q, ME_P, ME_F, mf_t);
    report("mask_einsum_backward", "mask embeddings", fd_error(einsum_f, &c, c.me, dme, ME_Q * ME_F, FD_STEP, NULL));
    report("mask_einsum_backward", "mask features", fd_error(einsum_f, &c, c.mf, dmf, ME_P * ME_F, FD_STEP, NULL));
    memcpy(dmf2, dmf, sizeof dmf);
    mask_einsum_backward(dme, dmf2, c.r, c.me, c.mf, ME_Q, ME_P, ME_F, mf_t);
    report_add("mask_einsum_backward", doubling_error(dmf, dmf2, ME_P * ME_F));
}

/* ---- nn.Linear on a weight in any storage (the frozen backbone's BF16/Q8 matrices) ---- */
enum { LW_ROWS = 5, LW_IN = 9, LW_OUT = 7, LW_LDX = 11, LW_LDY = 8, LW_LDDX = 10 };
typedef struct linw_ctx { float x[LW_ROWS * LW_LDX], w[LW_OUT * LW_IN], b[LW_OUT], r[LW_ROWS * LW_LDY]; } linw_ctx;
static double linw_f(void *p)
{
    linw_ctx *c = p;
    float y[LW_ROWS * LW_LDY];
    int i, j;
    double s = 0.0;
    gemm_nt_w(LW_ROWS, LW_OUT, LW_IN, c->x, LW_LDX, wmat_f32(c->w, LW_IN), c->b, y, LW_LDY, 0);
    for (i = 0; i < LW_ROWS; i++)
        for (j = 0; j < LW_OUT; j++) s += (double)c->r[i * LW_LDY + j] * y[i * LW_LDY + j];
    return s;
}
static void test_linear_w(void)
{
    static linw_ctx c;
    float dx[LW_ROWS * LW_LDDX], dx2[LW_ROWS * LW_LDDX], dxb[LW_ROWS * LW_LDDX], dw[LW_OUT * LW_IN], db[LW_OUT];
    float dxf[LW_ROWS * LW_IN], rounded[LW_OUT * LW_IN];
    uint16_t bf[LW_OUT * LW_IN];
    linear_g g, none = {NULL, NULL};
    uint64_t s = 11;
    int i, r, same = 1;
    fill(c.x, sizeof c.x / 4, &s, 1); fill(c.w, sizeof c.w / 4, &s, 1); fill(c.b, LW_OUT, &s, 1);
    fill(c.r, sizeof c.r / 4, &s, 1);
    memset(dx, 0, sizeof dx); memset(dw, 0, sizeof dw); memset(db, 0, sizeof db);
    g.w = dw; g.b = db;
    linear_backward_w(dx, LW_LDDX, g, c.r, LW_LDY, c.x, LW_LDX, LW_ROWS, LW_IN, LW_OUT, wmat_f32(c.w, LW_IN));
    for (r = 0; r < LW_ROWS; r++) memcpy(dxf + r * LW_IN, dx + r * LW_LDDX, LW_IN * sizeof *dx);
    { /* the input gradient, gathered from its row stride, against differences of x */
        float xs[LW_ROWS * LW_IN], keep[LW_ROWS * LW_LDX];
        double maxd = 0.0, maxa = 0.0;
        memcpy(keep, c.x, sizeof keep);
        for (i = 0; i < LW_ROWS * LW_IN; i++) xs[i] = c.x[(i / LW_IN) * LW_LDX + i % LW_IN];
        for (i = 0; i < LW_ROWS * LW_IN; i++) {
            float *x = &c.x[(i / LW_IN) * LW_LDX + i % LW_IN], k0 = *x;
            double fp, fm, fd;
            *x = k0 + FD_STEP; fp = linw_f(&c);
            *x = k0 - FD_STEP; fm = linw_f(&c);
            *x = k0;
            fd = (fp - fm) / ((double)(k0 + FD_STEP) - (double)(k0 - FD_STEP));
            if (fabs(fd - dxf[i]) > maxd) maxd = fabs(fd - dxf[i]);
            if (fabs(dxf[i]) > maxa) maxa = fabs(dxf[i]);
        }
        (void)xs;
        report("linear_backward_w", "x (strided)", maxa > 0 ? maxd / maxa : maxd);
    }
    report("linear_backward_w", "weight", fd_error(linw_f, &c, c.w, dw, LW_OUT * LW_IN, FD_STEP, NULL));
    report("linear_backward_w", "bias", fd_error(linw_f, &c, c.b, db, LW_OUT, FD_STEP, NULL));
    memcpy(dx2, dx, sizeof dx);
    linear_backward_w(dx2, LW_LDDX, none, c.r, LW_LDY, c.x, LW_LDX, LW_ROWS, LW_IN, LW_OUT, wmat_f32(c.w, LW_IN));
    report_add("linear_backward_w", doubling_error(dx, dx2, sizeof dx / 4));
    /* a BF16 weight: the input gradient of its float32 values, bit for bit */
    for (i = 0; i < LW_OUT * LW_IN; i++) {
        bf[i] = (uint16_t)(float_bits(c.w[i]) >> 16);
        rounded[i] = bits_float((uint32_t)bf[i] << 16);
    }
    memset(dx, 0, sizeof dx); memset(dxb, 0, sizeof dxb);
    linear_backward_w(dx, LW_LDDX, none, c.r, LW_LDY, c.x, LW_LDX, LW_ROWS, LW_IN, LW_OUT, wmat_f32(rounded, LW_IN));
    {
        wmat m = wmat_f32(NULL, LW_IN);
        m.data = bf;
        m.dtype = DTYPE_BF16;
        linear_backward_w(dxb, LW_LDDX, none, c.r, LW_LDY, c.x, LW_LDX, LW_ROWS, LW_IN, LW_OUT, m);
    }
    for (i = 0; i < LW_ROWS * LW_LDDX; i++) same &= dx[i] == dxb[i];
    check(same, "linear_backward_w: a BF16 weight gives its float32 values' input gradient", 0.0);
    /* a Q8 weight (rows padded to whole blocks, one scale per block) likewise */
    {
        enum { LD = (LW_IN + Q8_BLOCK - 1) / Q8_BLOCK * Q8_BLOCK, NBLK = LD / Q8_BLOCK };
        int8_t q[LW_OUT * LD];
        float scale[LW_OUT * NBLK];
        wmat m = wmat_f32(NULL, LD);
        int o, l;
        for (o = 0; o < LW_OUT; o++) {
            for (l = 0; l < NBLK; l++) scale[o * NBLK + l] = 0.01f * (1.5f + rnd(&s));
            for (l = 0; l < LD; l++) {
                q[o * LD + l] = (int8_t)(l < LW_IN ? (int)(127.0f * rnd(&s)) : 0);
                if (l < LW_IN) rounded[o * LW_IN + l] = (float)q[o * LD + l] * scale[o * NBLK + l / Q8_BLOCK];
            }
        }
        m.data = q;
        m.scale = scale;
        m.dtype = DTYPE_Q8;
        memset(dx, 0, sizeof dx); memset(dxb, 0, sizeof dxb);
        linear_backward_w(dx, LW_LDDX, none, c.r, LW_LDY, c.x, LW_LDX, LW_ROWS, LW_IN, LW_OUT, wmat_f32(rounded, LW_IN));
        linear_backward_w(dxb, LW_LDDX, none, c.r, LW_LDY, c.x, LW_LDX, LW_ROWS, LW_IN, LW_OUT, m);
        for (same = 1, i = 0; i < LW_ROWS * LW_LDDX; i++) same &= dx[i] == dxb[i];
        check(same, "linear_backward_w: a Q8 weight gives its float32 values' input gradient", 0.0);
    }
}

/* ---- the backbone and the classifier on a model of odd small sizes (no weight file) ----
 * grid 3 (T = 10 tokens), width 12, 3 heads of 4, MLP 7, 2 blocks; pooling 2 heads of 6,
 * MLP 5; classifier heads of 3 layers, hidden 5. RoPE tables hold arbitrary values (the
 * backward is the transposed map whatever they are). */
enum { TN_G = 3, TN_N = 9, TN_T = 10, TN_W = 12, TN_HEADS = 3, TN_DH = 4, TN_M = 7, TN_LAYERS = 2, TN_PH = 2,
       TN_PM = 5, TN_HD = 5, TN_CL = 3, TN_P = 2, TN_S = 6, TN_STORE = 8192, TN_MAX_PARAMS = 64 };
enum { TN_BLOCK, TN_EMBED, TN_POOL, TN_HEAD, TN_CLASSIFIER, TN_VIT };

typedef struct tparam { char name[64]; float *p, *g; size_t n; int group; } tparam;

typedef struct tiny_net {
    loupe_model m;
    loupe_session *s;
    pe_tape bt;
    cls_tape ct;
    pe_work k;
    void *raw;
    pe_block_w blocks[TN_LAYERS];
    pe_grads pg;
    pe_block_g bg[TN_LAYERS];
    cls_grads cg;
    float store[TN_STORE], grad[TN_STORE];
    size_t used;
    tparam params[TN_MAX_PARAMS];
    int np, group, mode;
    float rope_cos[TN_T * TN_DH], rope_sin[TN_T * TN_DH];
    float px[3 * TN_S * TN_S], in[TN_T * TN_W], pooled_in[TN_W], r[TN_T * TN_W], r2[TN_W + TN_N + 1];
} tiny_net;

/* Takes one parameter tensor (random values) and its gradient buffer. */
static float *tn_take(tiny_net *n, const char *name, const char *suffix, size_t count, float **grad, float scale,
                      float offset, uint64_t *seed)
{
    tparam *p = &n->params[n->np++];
    size_t i;
    snprintf(p->name, sizeof p->name, "%s%s", name, suffix);
    p->p = n->store + n->used;
    p->g = n->grad + n->used;
    p->n = count;
    p->group = n->group;
    n->used += count;
    for (i = 0; i < count; i++) p->p[i] = offset + scale * rnd(seed);
    *grad = p->g;
    return p->p;
}
static linear_w tn_linear(tiny_net *n, const char *name, int out, int in, linear_g *g, uint64_t *seed)
{
    linear_w l;
    l.w = wmat_f32(tn_take(n, name, ".weight", (size_t)out * in, &g->w, 1.0f / sqrtf((float)in), 0.0f, seed), (size_t)in);
    l.b = tn_take(n, name, ".bias", (size_t)out, &g->b, 0.5f, 0.0f, seed);
    return l;
}
static norm_w tn_norm(tiny_net *n, const char *name, int dim, norm_g *g, uint64_t *seed)
{
    norm_w l;
    l.w = tn_take(n, name, ".weight", (size_t)dim, &g->w, 0.5f, 1.0f, seed);
    l.b = tn_take(n, name, ".bias", (size_t)dim, &g->b, 0.5f, 0.0f, seed);
    return l;
}

/* Groups of parameters, checked by the modes that reach them. */
enum { GR_EMBED, GR_BLOCK0, GR_BLOCK1, GR_LN_POST, GR_POOL, GR_GLOBAL, GR_PATCH, GR_FUSER };

static int tn_init(tiny_net *n)
{
    loupe_config *c = &n->m.cfg;
    loupe_weights *w = &n->m.w;
    char err[256], name[64];
    arena a = {NULL, 0, 0};
    uint64_t seed = 21;
    int i, h;
    memset(n, 0, sizeof *n);
    c->image_size = TN_S; c->patch_size = TN_P; c->grid = TN_G; c->width = TN_W; c->layers = TN_LAYERS;
    c->heads = TN_HEADS; c->mlp_width = TN_M; c->pool_heads = TN_PH; c->pool_mlp_width = TN_PM;
    c->cls_hidden = TN_HD; c->cls_layers = TN_CL; c->ln_eps = 1e-5f;
    n->group = GR_EMBED;
    w->class_embedding = tn_take(n, "class_embedding", "", TN_W, &n->pg.class_embedding, 1.0f, 0.0f, &seed);
    w->positional_embedding = tn_take(n, "positional_embedding", "", TN_T * TN_W, &n->pg.positional_embedding, 1.0f, 0.0f, &seed);
    w->conv1 = wmat_f32(tn_take(n, "conv1", ".weight", TN_W * 3 * TN_P * TN_P, &n->pg.conv1, 0.3f, 0.0f, &seed), 3 * TN_P * TN_P);
    w->ln_pre = tn_norm(n, "ln_pre", TN_W, &n->pg.ln_pre, &seed);
    w->blocks = n->blocks;
    n->pg.blocks = n->bg;
    for (i = 0; i < TN_LAYERS; i++) {
        pe_block_w *b = &n->blocks[i];
        pe_block_g *g = &n->bg[i];
        n->group = GR_BLOCK0 + i;
        snprintf(name, sizeof name, "blocks.%d.ln_1", i); b->ln_1 = tn_norm(n, name, TN_W, &g->ln_1, &seed);
        snprintf(name, sizeof name, "blocks.%d.qkv", i); b->qkv = tn_linear(n, name, 3 * TN_W, TN_W, &g->qkv, &seed);
        snprintf(name, sizeof name, "blocks.%d.out", i); b->out = tn_linear(n, name, TN_W, TN_W, &g->out, &seed);
        snprintf(name, sizeof name, "blocks.%d.ln_2", i); b->ln_2 = tn_norm(n, name, TN_W, &g->ln_2, &seed);
        snprintf(name, sizeof name, "blocks.%d.c_fc", i); b->fc = tn_linear(n, name, TN_M, TN_W, &g->fc, &seed);
        snprintf(name, sizeof name, "blocks.%d.c_proj", i); b->proj = tn_linear(n, name, TN_W, TN_M, &g->proj, &seed);
    }
    n->group = GR_LN_POST;
    w->ln_post = tn_norm(n, "ln_post", TN_W, &n->pg.ln_post, &seed);
    n->group = GR_POOL;
    w->pool.probe = tn_take(n, "attn_pool.probe", "", TN_W, &n->pg.pool.probe, 2.0f, 0.0f, &seed);
    w->pool.qkv = tn_linear(n, "attn_pool.in_proj", 3 * TN_W, TN_W, &n->pg.pool.qkv, &seed);
    w->pool.out = tn_linear(n, "attn_pool.out_proj", TN_W, TN_W, &n->pg.pool.out, &seed);
    w->pool.ln = tn_norm(n, "attn_pool.layernorm", TN_W, &n->pg.pool.ln, &seed);
    w->pool.fc = tn_linear(n, "attn_pool.c_fc", TN_PM, TN_W, &n->pg.pool.fc, &seed);
    w->pool.proj = tn_linear(n, "attn_pool.c_proj", TN_W, TN_PM, &n->pg.pool.proj, &seed);
    for (h = 0; h < 2; h++) {
        cls_head_w *hw = h ? &w->patch_head : &w->global_head;
        cls_head_g *hg = h ? &n->cg.patch_head : &n->cg.global_head;
        n->group = h ? GR_PATCH : GR_GLOBAL;
        for (i = 0; i < TN_CL; i++) {
            snprintf(name, sizeof name, "%s.layers.%d", h ? "patch_classifier" : "classifier", i);
            hw->layers[i] = tn_linear(n, name, i == TN_CL - 1 ? 1 : TN_HD, i ? TN_HD : TN_W, &hg->layers[i], &seed);
        }
    }
    n->group = GR_FUSER;
    w->fuser = tn_take(n, "fuser.fuse", ".weight", TN_N + 1, &n->cg.fuser, 0.5f, 0.0f, &seed);
    fill(n->rope_cos, TN_T * TN_DH, &seed, 1.0f);
    fill(n->rope_sin, TN_T * TN_DH, &seed, 1.0f);
    n->m.t.rope_cos = n->rope_cos;
    n->m.t.rope_sin = n->rope_sin;
    fill(n->px, sizeof n->px / 4, &seed, 1.0f);
    fill(n->in, sizeof n->in / 4, &seed, 2.0f); /* about unit variance, as LayerNorm outputs */
    fill(n->pooled_in, sizeof n->pooled_in / 4, &seed, 1.0f);
    fill(n->r, sizeof n->r / 4, &seed, 1.0f);
    fill(n->r2, sizeof n->r2 / 4, &seed, 1.0f);
    n->s = loupe_session_new(&n->m, err, sizeof err);
    if (!n->s) { printf("FAIL %s\n", err); return -1; }
    pe_train_layout(&n->m.cfg, &n->bt, &n->ct, &n->k, &a);
    a.cap = a.used;
    a.used = 0;
    a.base = aligned_block(a.cap, &n->raw);
    if (!a.base) { printf("FAIL out of memory\n"); return -1; }
    pe_train_layout(&n->m.cfg, &n->bt, &n->ct, &n->k, &a);
    n->s->bb_tape = &n->bt;
    n->s->cls_tape = &n->ct;
    return 0;
}

/* The forward of the mode under test, with the tapes: sum(r * outputs). */
static double tn_forward(void *p)
{
    tiny_net *n = p;
    loupe_session *s = n->s;
    float logits[TN_N];
    switch (n->mode) {
    case TN_BLOCK:
        memcpy(s->x, n->in, sizeof n->in);
        pe_residual_attention_block(s, &n->blocks[0], 0);
        return dot(n->r, s->x, TN_T * TN_W);
    case TN_EMBED:
        pe_embed(s, n->px);
        return dot(n->r, s->x, TN_T * TN_W);
    case TN_POOL:
        memcpy(s->feats, n->in, sizeof n->in);
        pe_attention_pooling(s);
        return dot(n->r2, s->pooled, TN_W);
    case TN_HEAD:
        loupe_cls_head(s, &n->m.w.patch_head, n->in + TN_W, TN_N, logits, n->ct.patch_pre);
        return dot(n->r2, logits, TN_N);
    case TN_CLASSIFIER:
        memcpy(s->feats, n->in, sizeof n->in);
        memcpy(s->pooled, n->pooled_in, sizeof n->pooled_in);
        loupe_classifier(s);
        return (double)n->r2[0] * s->fused_logit + dot(n->r2 + 1, s->patch_logits, TN_N);
    default:
        vision_transformer(s, n->px);
        return dot(n->r, s->feats, TN_T * TN_W) + dot(n->r2, s->pooled, TN_W);
    }
}

/* The backward of the mode under test after its forward: gradients and d input (=). */
static void tn_backward(tiny_net *n, float *d_in, float *d_pooled)
{
    loupe_session *s = n->s;
    switch (n->mode) {
    case TN_BLOCK: pe_residual_attention_block_backward(s, &n->blocks[0], &n->bg[0], 0, d_in, n->r, &n->k); break;
    case TN_EMBED: pe_embed_backward(s, &n->pg, n->r, &n->k); break;
    case TN_POOL: pe_attention_pooling_backward(s, &n->pg.pool, n->r2, d_in, &n->k); break;
    case TN_HEAD:
        loupe_cls_head_backward(s, &n->m.w.patch_head, &n->cg.patch_head, n->in + TN_W, TN_N, n->ct.patch_pre, n->r2,
                                d_in + TN_W, &n->k);
        break;
    case TN_CLASSIFIER: loupe_classifier_backward(s, &n->cg, n->r2[0], n->r2 + 1, d_pooled, d_in, &n->k); break;
    default: vision_transformer_backward(s, &n->pg, n->r, n->r2, &n->k);
    }
}

/* The parameter groups each mode reaches. */
static int tn_reaches(int mode, int group)
{
    switch (mode) {
    case TN_BLOCK: return group == GR_BLOCK0;
    case TN_EMBED: return group == GR_EMBED;
    case TN_POOL: return group == GR_POOL;
    case TN_HEAD: return group == GR_PATCH;
    case TN_CLASSIFIER: return group == GR_GLOBAL || group == GR_PATCH || group == GR_FUSER;
    default: return group <= GR_POOL;
    }
}

static void test_backbone_modules(void)
{
    static tiny_net n;
    static const char *const names[6] = {"pe_residual_attention_block_backward", "pe_embed_backward",
                                          "pe_attention_pooling_backward", "loupe_cls_head_backward",
                                          "loupe_classifier_backward", "vision_transformer_backward"};
    static float d_in[TN_T * TN_W], d_in2[TN_T * TN_W], d_pooled[TN_W], g1[TN_STORE];
    char what[96];
    int mode, i;
    if (tn_init(&n)) { failed++; return; }
    for (mode = TN_BLOCK; mode <= TN_VIT; mode++) {
        int has_input = mode != TN_EMBED && mode != TN_VIT;
        n.mode = mode;
        memset(n.grad, 0, sizeof n.grad);
        memset(d_in, 0, sizeof d_in);
        memset(d_pooled, 0, sizeof d_pooled);
        tn_forward(&n);
        tn_backward(&n, d_in, d_pooled);
        if (has_input) report(names[mode], mode == TN_HEAD ? "x" : mode == TN_POOL || mode == TN_CLASSIFIER ?
                              "features" : "input", fd_error(tn_forward, &n, n.in, d_in, TN_T * TN_W, FD_STEP, NULL));
        if (mode == TN_CLASSIFIER)
            report(names[mode], "pooled", fd_error(tn_forward, &n, n.pooled_in, d_pooled, TN_W, FD_STEP, NULL));
        for (i = 0; i < n.np; i++)
            if (tn_reaches(mode, n.params[i].group)) {
                snprintf(what, sizeof what, "%s", n.params[i].name);
                report(names[mode], what, fd_error(tn_forward, &n, n.params[i].p, n.params[i].g, n.params[i].n, FD_STEP, NULL));
            }
        /* a second call adds the same again, to the input and to every parameter gradient */
        memcpy(g1, n.grad, sizeof g1);
        memcpy(d_in2, d_in, sizeof d_in);
        tn_forward(&n);
        tn_backward(&n, d_in2, d_pooled);
        {
            double e = doubling_error(g1, n.grad, TN_STORE);
            if (has_input) {
                double ei = doubling_error(d_in, d_in2, TN_T * TN_W);
                e = ei > e ? ei : e;
            }
            report_add(names[mode], e);
        }
    }
    /* frozen: no parameter gradient at all, the same input gradient */
    {
        pe_block_g frozen;
        float d_frozen[TN_T * TN_W];
        int same = 1, untouched = 1;
        memset(&frozen, 0, sizeof frozen);
        n.mode = TN_BLOCK;
        memset(n.grad, 0, sizeof n.grad);
        memset(d_in, 0, sizeof d_in);
        memset(d_frozen, 0, sizeof d_frozen);
        tn_forward(&n);
        tn_backward(&n, d_in, d_pooled);
        memset(n.grad, 0, sizeof n.grad);
        pe_residual_attention_block_backward(n.s, &n.blocks[0], &frozen, 0, d_frozen, n.r, &n.k);
        for (i = 0; i < TN_T * TN_W; i++) same &= d_in[i] == d_frozen[i];
        for (i = 0; i < TN_STORE; i++) untouched &= n.grad[i] == 0.0f;
        check(same && untouched, "pe_residual_attention_block_backward: a frozen block passes the same input gradient", 0.0);
    }
    loupe_session_free(n.s);
    free(n.raw);
}

/* ---- RoPE-2D (in place, arbitrary angle tables) ---- */
enum { RP_T = 3, RP_W = 12, RP_H = 2, RP_DH = 6 };
typedef struct rope_ctx { float qkv[RP_T * 3 * RP_W], r[RP_T * 3 * RP_W], cs[RP_T * RP_DH], sn[RP_T * RP_DH]; } rope_ctx;
static double rope_f(void *p)
{
    rope_ctx *c = p;
    float y[RP_T * 3 * RP_W];
    memcpy(y, c->qkv, sizeof y);
    pe_rope2d(y, RP_T, RP_W, RP_H, c->cs, c->sn);
    return dot(c->r, y, RP_T * 3 * RP_W);
}
static void test_rope(void)
{
    static rope_ctx c;
    float d[RP_T * 3 * RP_W];
    uint64_t s = 12;
    int i, v_ok = 1;
    fill(c.qkv, sizeof c.qkv / 4, &s, 1); fill(c.r, sizeof c.r / 4, &s, 1);
    fill(c.cs, sizeof c.cs / 4, &s, 1); fill(c.sn, sizeof c.sn / 4, &s, 1);
    memcpy(d, c.r, sizeof d);
    pe_rope2d_backward(d, RP_T, RP_W, RP_H, c.cs, c.sn);
    report("pe_rope2d_backward", "qkv", fd_error(rope_f, &c, c.qkv, d, RP_T * 3 * RP_W, FD_STEP, NULL));
    for (i = 0; i < RP_T; i++) v_ok &= !memcmp(d + i * 3 * RP_W + 2 * RP_W, c.r + i * 3 * RP_W + 2 * RP_W, RP_W * 4);
    check(v_ok, "pe_rope2d_backward: the v part passes unchanged (the transform is in place, not +=)", 0.0);
}

/* ---- LoupeClsLoss of one image ---- */
enum { CL_N = 11 };
typedef struct clsloss_ctx { float fused, label, logits[CL_N], labels[CL_N]; } clsloss_ctx;
static double clsloss_f(void *p)
{
    clsloss_ctx *c = p;
    cls_loss_config cfg = cls_loss_config_default();
    cls_loss_terms t;
    return loupe_cls_loss(&cfg, c->fused, c->label, c->logits, c->labels, CL_N, 0.5, 1.0 / (2 * CL_N), &t, NULL, NULL,
                          NULL);
}
static void test_cls_loss(void)
{
    static clsloss_ctx c;
    cls_loss_config cfg = cls_loss_config_default();
    cls_loss_terms t;
    double terms[CL_N], maxd = 0.0, ref;
    float d_fused, d_patch[CL_N], d_patch2[CL_N], d_fused2;
    uint64_t s = 13;
    int lab, i;
    for (lab = 0; lab < 2; lab++) {
        char name[64];
        snprintf(name, sizeof name, "loupe_cls_loss (label %d)", lab);
        c.label = (float)lab;
        fill(c.logits, CL_N, &s, 4); c.fused = 3.0f * rnd(&s);
        for (i = 0; i < CL_N; i++) c.labels[i] = i % 4 == 0 ? 0.0f : i % 4 == 1 ? 1.0f : 0.5f + 0.5f * rnd(&s);
        d_fused = 0.0f;
        memset(d_patch, 0, sizeof d_patch);
        loupe_cls_loss(&cfg, c.fused, c.label, c.logits, c.labels, CL_N, 0.5, 1.0 / (2 * CL_N), &t, terms, &d_fused,
                       d_patch);
        report(name, "fused logit", fd_error(clsloss_f, &c, &c.fused, &d_fused, 1, FD_STEP, NULL));
        report(name, "patch logits", fd_error(clsloss_f, &c, c.logits, d_patch, CL_N, FD_STEP, NULL));
        /* the terms by README 10.6's formula, directly */
        for (i = 0; i <= CL_N; i++) {
            double x = i < CL_N ? c.logits[i] : c.fused, y = i < CL_N ? c.labels[i] : c.label;
            double alpha = i < CL_N ? 0.85 : 0.2, p = 1.0 / (1.0 + exp(-x)), pt = y * p + (1 - y) * (1 - p);
            double ce = (alpha * y + (1 - alpha) * (1 - y)) * ((x > 0 ? x : 0) - x * y + log(1 + exp(-fabs(x))));
            double term = ce * (1 - pt) * (1 - pt) + (1 - pt) * (1 - pt) * (1 - pt), got = i < CL_N ? terms[i] : t.cls_term;
            if (fabs(term - got) > maxd) maxd = fabs(term - got);
        }
        ref = 0.5 * t.cls_term + t.patch_sum / (2 * CL_N);
        check(maxd <= 1e-12 && fabs(ref - t.total) <= 1e-12, "loupe_cls_loss: terms and total as README 10.6 writes them",
              maxd);
        d_fused2 = d_fused;
        memcpy(d_patch2, d_patch, sizeof d_patch);
        loupe_cls_loss(&cfg, c.fused, c.label, c.logits, c.labels, CL_N, 0.5, 1.0 / (2 * CL_N), &t, NULL, &d_fused2,
                       d_patch2);
        {
            double e = doubling_error(d_patch, d_patch2, CL_N), e2 = doubling_error(&d_fused, &d_fused2, 1);
            report_add(name, e > e2 ? e : e2);
        }
    }
}

/* ---- the whole TTA step on the tiny golden model ---- */

/* Central differences through the whole float32 segmentor are a wiring check (sign,
 * scale, every module reached); the golden check measures the precision. With a step of
 * 1e-3 the float forward's rounding (about 1e-7 * loss / step, loss ~ 10) and the
 * loss's curvature limit the agreement to about 1 %; smaller steps are noisier. */
#define E2E_STEP 1e-3f      /* perturbation of one parameter element */
#define E2E_TOL 2e-2        /* |fd - analytic| <= E2E_TOL * |analytic| + E2E_ABS */
#define E2E_ABS 1e-3
#define GRID_PICKS 8        /* patch-grid elements checked: the largest gradient and 7 others */

/* Total loss of the current adapted weights (forward and loss only); the loss's random
 * stream restarts at the same point every time. */
static double e2e_loss(loupe_tta *t, const float *pixels)
{
    loupe_tta_loss loss;
    char err[256];
    tta_refresh_tables(t);
    t->rng_position = 0;
    if (tta_forward_loss(t, pixels, &loss, err, sizeof err)) { printf("%s\n", err); return NAN; }
    return loss.total;
}

/* Tensors whose gradients pass through every kind of module the backward walks
 * (suffixes of segmentor tensor names). */
static const char *const e2e_tensors[] = {
    "fpn.scale_layers.0.0.conv1.weight", "fpn.scale_layers.3.0.conv2.weight", "label_embedding.1",
    "pixel_decoder.level_embed", "encoder.layers.0.self_attn.sampling_offsets.weight",
    "encoder.layers.1.self_attn.attention_weights.weight", "adapter_1.0.weight", "layer_1.0.weight",
    "queries_embedder.weight", "decoder.layers.0.cross_attn.in_proj_weight", "decoder.layers.1.self_attn.q_proj.weight",
    "mask_embedder.0.0.weight", "class_predictor.weight"};
#define E2E_COUNT ((int)(sizeof e2e_tensors / sizeof e2e_tensors[0]))

/* True when name ends with suffix. */
static int ends_with(const char *name, const char *suffix)
{
    size_t n = strlen(name), k = strlen(suffix);
    return n >= k && !strcmp(name + n - k, suffix);
}

/* Central differences of the total loss in the largest-gradient element of the tensors
 * of e2e_tensors; returns how many disagree (*worst: the worst error / allowed error). */
static int e2e_fd(loupe_tta *t, const float *pixels, double *worst)
{
    int p, e, bad = 0, found = 0;
    *worst = 0.0;
    for (p = 0; p < t->n_params; p++) {
        const train_param *tp = &t->params[p];
        float *w = t->param + tp->offset, *g = t->grad + tp->offset, keep;
        size_t i, best = 0;
        double fp, fm, fd, err;
        for (e = 0; e < E2E_COUNT && !ends_with(tp->name, e2e_tensors[e]); e++) continue;
        if (e == E2E_COUNT) continue;
        found++;
        for (i = 1; i < tp->numel; i++)
            if (fabs(g[i]) > fabs(g[best])) best = i;
        keep = w[best];
        w[best] = keep + E2E_STEP; fp = e2e_loss(t, pixels);
        w[best] = keep - E2E_STEP; fm = e2e_loss(t, pixels);
        w[best] = keep;
        fd = (fp - fm) / ((double)(keep + E2E_STEP) - (double)(keep - E2E_STEP));
        err = fabs(fd - g[best]) / (E2E_TOL * fabs(g[best]) + E2E_ABS); /* <= 1 passes */
        if (err > *worst) *worst = err;
        if (!(err <= 1.0)) {
            bad++;
            printf("  %s[%lu]: analytic %.6g, central difference %.6g\n", tp->name, (unsigned long)best, g[best], fd);
        }
    }
    e2e_loss(t, pixels);
    return bad + (E2E_COUNT - found);
}

/* Pixel values of a smooth synthetic image (the golden image is not needed here). */
static void synthetic_pixels(float *px, int S)
{
    int c, y, x;
    for (c = 0; c < 3; c++)
        for (y = 0; y < S; y++)
            for (x = 0; x < S; x++)
                px[((size_t)c * S + y) * S + x] = 0.8f * sinf(0.05f * (float)(x * (c + 1)) + 0.07f * (float)y) - 0.1f * (float)c;
}

/* Loss after re-running the segmentor alone on the session's (perturbed) patch grid. */
static double grid_loss(loupe_tta *t)
{
    loupe_tta_loss loss;
    conditional_query(t->s);
    feature_pyramid(t->s);
    pixel_decoder(t->s);
    masked_attention_decoder(t->s);
    t->rng_position = 0;
    tta_loss(t, &loss);
    return loss.total;
}

/* The gradient w.r.t. the backbone's patch grid (frozen in TTA, computed on request:
 * it reaches the max-pool, the first transposed convolutions and the 1x input
 * projection's input gradients) against central differences of the loss. */
static void test_grid_gradient(loupe_tta *t, const float *px)
{
    const loupe_config *c = &t->m->cfg;
    size_t n = (size_t)c->grid * c->grid * c->width, i, best = 0, picks[GRID_PICKS];
    float *d_grid = calloc(n, sizeof *d_grid), *grid = t->s->feats + c->width;
    loupe_tta_loss loss;
    char err[256];
    double worst = 0.0;
    int k, bad = 0;
    t->rng_position = 0;
    if (!d_grid || tta_accumulate(t, px, 1.0f, &loss, d_grid, err, sizeof err)) { printf("FAIL %s\n", err); failed++; return; }
    zero_floats(t->grad, t->n_floats);
    for (i = 1; i < n; i++)
        if (fabs(d_grid[i]) > fabs(d_grid[best])) best = i;
    for (k = 0; k < GRID_PICKS; k++) picks[k] = k ? (best + (size_t)k * 7919u * 13u) % n : best;
    for (k = 0; k < GRID_PICKS; k++) {
        float keep = grid[picks[k]];
        double fp, fm, fd, e;
        grid[picks[k]] = keep + E2E_STEP; fp = grid_loss(t);
        grid[picks[k]] = keep - E2E_STEP; fm = grid_loss(t);
        grid[picks[k]] = keep;
        fd = (fp - fm) / ((double)(keep + E2E_STEP) - (double)(keep - E2E_STEP));
        e = fabs(fd - d_grid[picks[k]]) / (E2E_TOL * fabs(d_grid[picks[k]]) + E2E_ABS);
        if (e > worst) worst = e;
        if (!(e <= 1.0)) { bad++; printf("  grid[%lu]: analytic %.6g, central difference %.6g\n", (unsigned long)picks[k], d_grid[picks[k]], fd); }
    }
    grid_loss(t);
    check(bad == 0, "target case: gradient of the patch grid vs central differences", worst);
    free(d_grid);
}

/* Gradients with one thread and with all of them must agree bit for bit. */
static void test_thread_determinism(loupe_tta *t, const float *px)
{
    char err[256];
    loupe_tta_loss loss;
    float *one = malloc(t->n_floats * sizeof *one);
    size_t i, differ = 0;
    int all = max_threads();
    if (!one) return;
    zero_floats(t->grad, t->n_floats);
    loupe_set_threads(1);
    t->rng_position = 0;
    tta_accumulate(t, px, 1.0f, &loss, NULL, err, sizeof err);
    memcpy(one, t->grad, t->n_floats * sizeof *one);
    zero_floats(t->grad, t->n_floats);
    loupe_set_threads(all);
    t->rng_position = 0;
    tta_accumulate(t, px, 1.0f, &loss, NULL, err, sizeof err);
    for (i = 0; i < t->n_floats; i++) differ += one[i] != t->grad[i];
    zero_floats(t->grad, t->n_floats);
    check(differ == 0, "gradients are identical with 1 thread and with all threads", (double)differ);
    free(one);
}

/* After a step: a session using the adapter, the adapter saved as a weight file and
 * reloaded, and the model itself. The first two must agree bit for bit, the model must
 * differ, and switching the session back must restore the model's outputs. */
static void test_adapted_model(loupe_model *m, loupe_tta *t, const float *px, const char *model_path)
{
    char path[1024], err[512];
    const loupe_config *c = &m->cfg;
    size_t n = (size_t)c->num_queries * 16 * c->grid * c->grid, i;
    loupe_session *s = loupe_session_new(m, err, sizeof err), *s2;
    loupe_model *m2;
    loupe_tta_loss loss;
    float *base = malloc(n * sizeof *base), *adapted = malloc(n * sizeof *adapted);
    int same = 1, differs = 0, restored = 1;
    snprintf(path, sizeof path, "%s.adapted", model_path);
    if (!s || !base || !adapted || loupe_forward(s, px, err, sizeof err)) { printf("FAIL %s\n", err); failed++; return; }
    memcpy(base, loupe_get_outputs(s)->mask_logits, n * sizeof *base);
    memset(&loss, 0, sizeof loss);
    i = (size_t)loupe_tta_step(t, px, &loss, err, sizeof err);
    check(i == 0 && loss.grad_norm > 0.0, "loupe_tta_step runs one step (gradient norm)", loss.grad_norm);
    check(loupe_session_use_tta(s, t, err, sizeof err) == 0 && loupe_forward(s, px, err, sizeof err) == 0,
          "a session predicts with the adapted segmentor", 0.0);
    memcpy(adapted, loupe_get_outputs(s)->mask_logits, n * sizeof *adapted);
    check(loupe_tta_save(t, path, err, sizeof err) == 0, "loupe_tta_save writes a weight file", 0.0);
    m2 = loupe_model_load(path, err, sizeof err);
    s2 = m2 ? loupe_session_new(m2, err, sizeof err) : NULL;
    check(s2 && loupe_forward(s2, px, err, sizeof err) == 0, "the saved adapted model loads and runs", 0.0);
    for (i = 0; s2 && i < n; i++) {
        same &= loupe_get_outputs(s2)->mask_logits[i] == adapted[i];
        differs |= adapted[i] != base[i];
    }
    check(s2 && same && differs, "the saved model predicts exactly as the adapter (and unlike the model)", 0.0);
    loupe_session_use_tta(s, NULL, err, sizeof err);
    loupe_forward(s, px, err, sizeof err);
    for (i = 0; i < n; i++) restored &= loupe_get_outputs(s)->mask_logits[i] == base[i];
    check(restored, "loupe_session_use_tta(s, NULL) restores the model's segmentor", 0.0);
    loupe_session_free(s2);
    loupe_model_free(m2);
    loupe_session_free(s);
    remove(path);
    free(base);
    free(adapted);
}

static void test_tta(const char *path)
{
    char err[512], what[160];
    loupe_model *m = loupe_model_load(path, err, sizeof err);
    loupe_tta *t;
    loupe_tta_loss loss;
    float *px, *negated;
    const float *fuser;
    const loupe_config *c;
    int L, Q, M, i, k, finite = 1, unmatched = 1, bad;
    size_t j, N;
    double ce = 0.0, worst;
    if (!m) { printf("FAIL %s\n", err); failed++; return; }
    c = &m->cfg;
    L = c->dec_layers; Q = c->num_queries; M = 4 * c->grid;
    N = (size_t)c->grid * c->grid + 1;
    px = malloc((size_t)3 * c->image_size * c->image_size * sizeof *px);
    negated = malloc(N * sizeof *negated);
    synthetic_pixels(px, c->image_size);
    t = loupe_tta_new(m, NULL, err, sizeof err);
    if (!t || !px || !negated) { printf("FAIL %s\n", t ? "out of memory" : err); failed++; return; }

    /* no target: force p below 0.5 by negating the fuser (the model is read-only: swap the view) */
    {
        const float *orig = m->w.fuser;
        tta_forward_loss(t, px, &loss, err, sizeof err);
        for (j = 0; j < N; j++) negated[j] = loss.prob > 0.5f ? -orig[j] : orig[j];
        m->w.fuser = negated;
        t->w.fuser = negated;
        t->rng_position = 0;
        if (tta_accumulate(t, px, 1.0f, &loss, NULL, err, sizeof err)) { printf("FAIL %s\n", err); failed++; return; }
        check(loss.prob <= 0.5f && !loss.has_target, "no-target case: p <= 0.5 gives no target", loss.prob);
        for (k = 0; k < L; k++) unmatched &= t->calls[k].matched_query == -1 && t->calls[k].loss_mask == 0.0 &&
                                            t->calls[k].loss_dice == 0.0;
        check(unmatched, "no-target case: nothing matched, mask and Tversky terms 0", 0.0);
        for (j = 0; j < (size_t)L * Q * M * M; j++) finite &= t->wk.d_mask[j] == 0.0f;
        check(finite, "no-target case: the mask logits get no gradient", 0.0);
        for (j = 0; j < t->n_floats; j++) finite &= isfinite(t->grad[j]) != 0;
        check(finite, "no-target case: every gradient is finite", 0.0);
        /* cross-entropy with every query "no object" (equal weights): mean softplus(z0 - z1) */
        for (k = 0; k < L; k++) {
            const float *z = t->s->class_logits + (size_t)t->calls[k].prediction * Q * 2;
            for (i = 0; i < Q; i++) ce += 2.0 * log1p(exp((double)z[2 * i] - z[2 * i + 1])) / Q;
        }
        check(fabs(ce - loss.total) <= 1e-6 * ce, "no-target case: loss = class weight * mean no-object cross-entropy",
              fabs(ce - loss.total) / ce);
        check(t->rng_position == (uint64_t)(L - 1) + (uint64_t)L * 2 * t->loss_cfg.train_num_points,
              "no-target case: random numbers drawn as upstream (layerdrop + matcher points)", 0.0);
        bad = e2e_fd(t, px, &worst);
        snprintf(what, sizeof what, "no-target case: %d tensors' gradients vs central differences of the loss",
                 E2E_COUNT);
        check(bad == 0, what, worst);
        m->w.fuser = orig;
        t->w.fuser = orig;
    }
    fuser = m->w.fuser;
    /* forged target, every point drawn at random (no top-k selection: the loss is smooth) */
    zero_floats(t->grad, t->n_floats);
    t->loss_cfg.importance_sample_ratio = 0.0;
    t->rng_position = 0;
    for (j = 0; j < N; j++) negated[j] = -negated[j];
    m->w.fuser = negated;
    t->w.fuser = negated;
    if (tta_accumulate(t, px, 1.0f, &loss, NULL, err, sizeof err)) { printf("FAIL %s\n", err); failed++; return; }
    check(loss.has_target, "target case: p > 0.5 gives one target", loss.prob);
    bad = e2e_fd(t, px, &worst);
    snprintf(what, sizeof what, "target case: %d tensors' gradients vs central differences of the loss", E2E_COUNT);
    check(bad == 0, what, worst);
    test_grid_gradient(t, px);
    test_thread_determinism(t, px);
    m->w.fuser = t->w.fuser = fuser;
    test_adapted_model(m, t, px, path);
    loupe_tta_free(t);
    loupe_model_free(m);
    free(px);
    free(negated);
}

int main(int argc, char **argv)
{
    test_linear();
    test_norms();
    test_activations();
    test_attention();
    test_msda();
    test_convolutions();
    test_einsum();
    test_linear_w();
    test_rope();
    test_backbone_modules();
    test_cls_loss();
    if (argc > 1) test_tta(argv[1]);
    printf("test_backward: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
