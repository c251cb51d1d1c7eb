/* CPU row kernels of the attention variants: clipped softmax on rows of attention scores and the linear attention
 * gate on rows of attention output, each fused into one sweep per row in forward and one in backward. Plain C on
 * contiguous float32 buffers, called through ctypes: no torch headers, so it builds in about a second on first use
 * (see attention/cpu_kernel.py).
 *
 * Clipped softmax: the ATen path of attention/fused.py spends most of its time in elementwise passes over
 * (rows, T_k) blocks: scale, mask, softmax (itself three passes), multiply, add, clamp; backward another six. Here
 * each row is read once into L1 and every elementwise step happens there. A block of scores holds B * H * R rows of
 * length cols; a call handles rows [row_begin, row_end), so threads can split a block. Masks the kernel applies:
 *   key_bias   (B, cols) additive, broadcast over heads and query rows (BERT-style padding), or NULL;
 *   causal     query row i (row_start + its index in the block's R rows) sees columns j <= i + causal_offset.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

/* exp(-87) = 1.6e-38 is about the smallest float exp() that is not subnormal; probabilities below PROB_FLOOR
 * (which no float32 sum of a row can register) are written as exact zeros, as masked keys must be */
#define EXP_FLOOR (-87.0f)
#define PROB_FLOOR (1e-30f)

/* max(x, low) as a comparison, not fmaxf: without -ffinite-math-only GCC calls fmaxf per element (its NaN rule
 * has no vector instruction), which kept the max, exp and sigmoid loops scalar; this form is one vmaxps and lets a
 * NaN x through, as torch.softmax does */
static inline float at_least(float x, float low) { return x < low ? low : x; }
static inline float clampf(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

/* exp(x) for x in [EXP_FLOOR, 0], inline so that whole rows vectorise without a call per vector (libmvec's expf
 * took most of the forward time). exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 with ln 2 split in two
 * for an exact product; exp(r) on |r| <= ln 2 / 2 by Cephes' degree-6 polynomial (about 1 ulp); 2^n built in the
 * exponent bits (n >= -126: a normal float). */
static inline float exp_nonpositive(float x) {
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float y = 1.9875691500e-4f;
    y = fmaf(y, r, 1.3981999507e-3f);
    y = fmaf(y, r, 8.3334519073e-3f);
    y = fmaf(y, r, 4.1665795894e-2f);
    y = fmaf(y, r, 1.6666665459e-1f);
    y = fmaf(y, r, 5.0000001201e-1f);
    y = fmaf(y * r, r, r) + 1.0f;
    union { int32_t i; float f; } two_n = { .i = ((int32_t)n + 127) << 23 };
    return y * two_n.f;
}

/* s: raw scores q.k (in: scores; out: clipped probabilities), p: out: softmax probabilities (saved for backward). */
void clipped_softmax_forward(float *s, float *p, int64_t row_begin, int64_t row_end, int64_t cols, float scale,
                             float gamma, float zeta, const float *key_bias, int64_t rows_per_batch, int64_t causal,
                             int64_t rows_per_head, int64_t row_start, int64_t causal_offset) {
    const float stretch = zeta - gamma;
    for (int64_t r = row_begin; r < row_end; ++r) {
        float *restrict x = s + r * cols, *restrict pr = p + r * cols;
        const float *bias = key_bias ? key_bias + (r / rows_per_batch) * cols : 0;
        int64_t limit = cols;
        if (causal) {
            int64_t visible = row_start + r % rows_per_head + causal_offset + 1;
            limit = visible < cols ? visible : cols;
        }
        float m = -FLT_MAX;  /* a row of -inf (fully masked by an additive mask) becomes uniform, as a finfo.min mask */
        if (bias) {
#pragma omp simd reduction(max : m)
            for (int64_t j = 0; j < limit; ++j) { x[j] = x[j] * scale + bias[j]; m = x[j] > m ? x[j] : m; }
        } else {
#pragma omp simd reduction(max : m)
            for (int64_t j = 0; j < limit; ++j) { x[j] = x[j] * scale; m = x[j] > m ? x[j] : m; }
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < limit; ++j) {
            /* masked keys sit near -FLT_MAX: they are raised to EXP_FLOOR here and flushed to 0 below */
            pr[j] = exp_nonpositive(at_least(x[j] - m, EXP_FLOOR));
            sum += pr[j];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j < limit; ++j) {
            const float prob = pr[j] * inv;
            pr[j] = prob < PROB_FLOOR ? 0.0f : prob;  /* so written, a NaN stays NaN */
            x[j] = clampf(stretch * pr[j] + gamma);
        }
        for (int64_t j = limit; j < cols; ++j) { pr[j] = 0.0f; x[j] = clampf(gamma); }
    }
}

/* g: in: dO.V^T; out: d scores times grad_scale (the scalar factors: scaling, zeta - gamma, 1 / (1 - dropout)).
 * p: saved probabilities; c: out: the clipped probabilities (times dropout's keep / (1 - rate)) for dV. */
void clipped_softmax_backward(float *g, const float *p, float *c, int64_t row_begin, int64_t row_end, int64_t cols,
                              float gamma, float zeta, float grad_scale, const uint8_t *keep, float keep_scale) {
    const float stretch = zeta - gamma;
    for (int64_t r = row_begin; r < row_end; ++r) {
        float *restrict gr = g + r * cols, *restrict cr = c + r * cols;
        const float *restrict pr = p + r * cols;
        float dot = 0.0f;
        if (keep) {
            const uint8_t *restrict kr = keep + r * cols;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < cols; ++j) {
                const float y = stretch * pr[j] + gamma, kept = (float)kr[j];
                /* clamp: gradient strictly inside (0, 1) */
                const float grad = (y > 0.0f && y < 1.0f) ? gr[j] * grad_scale * kept : 0.0f;
                gr[j] = grad;
                cr[j] = clampf(y) * kept * keep_scale;
                dot += grad * pr[j];
            }
        } else {
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < cols; ++j) {
                const float y = stretch * pr[j] + gamma;
                const float grad = (y > 0.0f && y < 1.0f) ? gr[j] * grad_scale : 0.0f;
                gr[j] = grad;
                cr[j] = clampf(y);
                dot += grad * pr[j];
            }
        }
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) gr[j] = pr[j] * (gr[j] - dot);
    }
}

/* Linear attention gate, per token t and head h: pi = sigmoid(b[h] + x[t, h, :] . w[h, :]), y[t, h, :] =
 * o[t, h, :] * pi. On ATen that is ten-odd small dispatched ops per layer, which at ViT-small size cost a tenth of
 * the attention itself. x, o, y: (tokens, heads * dim) rows; pi: (tokens, heads); heads <= MAX_HEADS. */
#ifndef MAX_HEADS  /* given by attention/cpu_kernel.py (-DMAX_HEADS), which checks the head count against it */
#error "build with -DMAX_HEADS=<the most heads of a gate>"
#endif

static inline float sigmoidf(float z) {
    const float e = exp_nonpositive(at_least(-fabsf(z), EXP_FLOOR));  /* exp(-|z|): no overflow */
    return z >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

/* One token's row; always inlined, so that the dispatch below compiles it for constant head sizes. */
static inline __attribute__((always_inline)) void gate_forward_token(
        const float *restrict orow, const float *restrict xr, const float *restrict w, const float *restrict b,
        float *restrict yr, float *restrict pr, int64_t heads, int64_t dim) {
    float logit[MAX_HEADS];
    for (int64_t h = 0; h < heads; ++h) {
        float sum = b[h];
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < dim; ++i) sum += xr[h * dim + i] * w[h * dim + i];
        logit[h] = sum;
    }
#pragma omp simd
    for (int64_t h = 0; h < heads; ++h) pr[h] = sigmoidf(logit[h]);
    for (int64_t h = 0; h < heads; ++h) {
        const float p = pr[h];
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) yr[h * dim + i] = orow[h * dim + i] * p;
    }
}

void linear_gate_forward(const float *o, const float *x, const float *w, const float *b, float *y, float *pi,
                         int64_t token_begin, int64_t token_end, int64_t heads, int64_t dim) {
    for (int64_t t = token_begin; t < token_end; ++t) {
        const int64_t row = t * heads * dim;
        switch (dim) {  /* the common head sizes as compile-time constants: loops unrolled, no remainder code */
            case 16: gate_forward_token(o + row, x + row, w, b, y + row, pi + t * heads, heads, 16); break;
            case 32: gate_forward_token(o + row, x + row, w, b, y + row, pi + t * heads, heads, 32); break;
            case 64: gate_forward_token(o + row, x + row, w, b, y + row, pi + t * heads, heads, 64); break;
            case 128: gate_forward_token(o + row, x + row, w, b, y + row, pi + t * heads, heads, 128); break;
            default: gate_forward_token(o + row, x + row, w, b, y + row, pi + t * heads, heads, dim);
        }
    }
}

/* gy: the gated output's gradient. Writes go and gx for the tokens in range and adds this range's sums over
 * tokens to gw (heads * dim) and gb (heads), which belong to the calling thread alone. */
static inline __attribute__((always_inline)) void gate_backward_token(
        const float *restrict gyr, const float *restrict orow, const float *restrict xr, const float *restrict w,
        const float *restrict pr, float *restrict gor, float *restrict gxr, float *restrict gw,
        float *restrict gb, int64_t heads, int64_t dim) {
    float grad_logit[MAX_HEADS];
    for (int64_t h = 0; h < heads; ++h) {
        const float p = pr[h];
        float grad_pi = 0.0f;
#pragma omp simd reduction(+ : grad_pi)
        for (int64_t i = 0; i < dim; ++i) {
            grad_pi += gyr[h * dim + i] * orow[h * dim + i];
            gor[h * dim + i] = gyr[h * dim + i] * p;
        }
        grad_logit[h] = grad_pi * p * (1.0f - p);
    }
    for (int64_t h = 0; h < heads; ++h) {
        const float g = grad_logit[h];
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) {
            gxr[h * dim + i] = g * w[h * dim + i];
            gw[h * dim + i] += g * xr[h * dim + i];
        }
        gb[h] += g;
    }
}

void linear_gate_backward(const float *gy, const float *o, const float *x, const float *w, const float *pi,
                          float *go, float *gx, float *gw, float *gb, int64_t token_begin, int64_t token_end,
                          int64_t heads, int64_t dim) {
    for (int64_t t = token_begin; t < token_end; ++t) {
        const int64_t row = t * heads * dim;
#define GATE_BACKWARD_TOKEN(D) \
    gate_backward_token(gy + row, o + row, x + row, w, pi + t * heads, go + row, gx + row, gw, gb, heads, D)
        switch (dim) {
            case 16: GATE_BACKWARD_TOKEN(16); break;
            case 32: GATE_BACKWARD_TOKEN(32); break;
            case 64: GATE_BACKWARD_TOKEN(64); break;
            case 128: GATE_BACKWARD_TOKEN(128); break;
            default: GATE_BACKWARD_TOKEN(dim);
        }
#undef GATE_BACKWARD_TOKEN
    }
}
