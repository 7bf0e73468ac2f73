/* moekit's CPU GEMV kernels for decoding: y = alpha * x @ W^T (+ y), W (O, I) row-major in one of
 * fp32, fp16, bf16 or int8 (symmetric per output row, bf16 scales), x float32 (R, I), y float32 (R, O).
 *
 * Why they exist (benchmarks/RESULTS.md, "Native decode kernels"): at batch 1 PyTorch's CPU kernels
 * read these weights at 6-9 GB/s (int8, `_weight_int8pack_mm`) and 10-18 GB/s (16-bit), where the
 * memory gives ~22 GB/s to one core. Each weight row is streamed once, front to back, while every
 * row of x is dotted with it from L1; rows are split between the OpenMP threads of the process
 * (PyTorch's own runtime: this library is loaded after torch, so `libgomp.so.1` is torch's).
 *
 * int8 (llama.cpp's Q8_0 dot products use the same VNNI instruction): each row of x is written as
 * s1 * (u1 - 128) + s2 * (u2 - 128) with u1, u2 unsigned bytes, the second level holding the first's
 * rounding error, so x keeps ~15 bits (relative error ~1e-5 of max|x|, against bf16's 2^-9 that
 * PyTorch's int8 kernel rounds x to). The dot of one level is sum(u * w) - 128 * sum(w) in int32,
 * exact; sum(w) is taken in the same pass (one more VNNI product: measured free, the loop waits on
 * memory). With AVX2 (no VNNI) x is written as one int16 level instead (the same ~1.5e-5 of max|x|)
 * and multiplied by the weight widened to int16 (`vpmaddwd`). Without either, the two int8 levels run
 * in portable C (slower than PyTorch's kernels: the Python side does not use that build).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if !defined(MK_PORTABLE) && !defined(MK_NO_AVX512) && defined(__AVX512F__) && defined(__AVX512BW__) &&                \
    defined(__AVX512VNNI__) && defined(__AVX512DQ__)
#define MK_AVX512 1
#elif !defined(MK_PORTABLE) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MK_AVX2 1
#endif
#if defined(MK_AVX512) || defined(MK_AVX2)
#include <immintrin.h>
/* weight bytes read ahead by software prefetch, for the float formats and for int8
 * (-DMK_PREFETCH=N / -DMK_PREFETCH_I8=N override, for A/B: benchmarks/native_gemv.py). AVX2 on a
 * Zen 1 core: 4 KiB ahead reads 1.15-1.27x as fast (fp32 9.4 -> 11.9, fp16 7.2 -> 8.4, int8
 * 7.7 -> 9.1 GB/s at 1 thread). AVX-512 on a Zen 4 core: the float formats read 1.2-1.5x as fast
 * without it (fp32 17.9 -> 23.9, fp16 17.7 -> 24.3 GB/s at 1 thread); int8 the same either way
 * (22.2 / 21.4), kept (benchmarks/RESULTS.md) */
#ifndef MK_PREFETCH
#ifdef MK_AVX512
#define MK_PREFETCH 0
#else
#define MK_PREFETCH 4096
#endif
#endif
#ifndef MK_PREFETCH_I8
#define MK_PREFETCH_I8 4096
#endif
static inline void mk_prefetch_at(const void *p, int ahead) {
    if (ahead > 0)
        _mm_prefetch((const char *)p + ahead, _MM_HINT_T0);
}
#define mk_prefetch_i8(p) mk_prefetch_at((p), MK_PREFETCH_I8)
/* every 64-byte line of the n float-format weight bytes at p, MK_PREFETCH ahead */
static inline void mk_prefetch_lines(const void *p, int64_t n) {
    for (int64_t line = 0; line < n; line += 64)
        mk_prefetch_at((const char *)p + line, MK_PREFETCH);
}
#endif

enum { MK_F32 = 0, MK_F16 = 1, MK_BF16 = 2, MK_I8 = 3 };
#define MK_PAR_BYTES (1 << 18) /* a weight smaller than this is read by one thread */
#define MK_ROWS 16             /* output rows per scheduled block */

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalise */
        int e = -1;
        do {
            e++;
            man <<= 1;
        } while (!(man & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    } else {
        u = sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* element i of a float-format row */
static inline float w_at(int fmt, const void *w, int64_t i) {
    return fmt == MK_F32   ? ((const float *)w)[i]
           : fmt == MK_F16 ? f16_to_f32(((const uint16_t *)w)[i])
                           : bf16_to_f32(((const uint16_t *)w)[i]);
}

/* max |x|, or NaN when x holds a NaN or an infinity: quantize_row then gives NaN scales, so every
 * product with the row is NaN (never a finite wrong number) */
static float max_abs(const float *x, int64_t I) {
    float m = 0;
    int finite = 1;
    for (int64_t i = 0; i < I; i++) {
        finite &= isfinite(x[i]) != 0;
        m = fmaxf(m, fabsf(x[i]));
    }
    return finite ? m : NAN;
}

/* ---- one weight row against R rows of x --------------------------------------------------- */
/* dot_float: sum(w * x) over one row of a float format; dot_q: sum(w * x) over one int8 row, x in the
 * integer form quantize_row wrote (q, s) */

#ifdef MK_AVX512
static inline __m512 ld16(int fmt, const void *w, int64_t i, __mmask16 m) {
    switch (fmt) {
    case MK_F32:
        return _mm512_maskz_loadu_ps(m, (const float *)w + i);
    case MK_F16:
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i));
    default: /* MK_BF16 */
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)w + i)), 16));
    }
}

static float dot_float(int fmt, const void *w, const float *x, int64_t I) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    const int64_t size = fmt == MK_F32 ? 4 : 2;
    for (; i + 64 <= I; i += 64) {
        mk_prefetch_lines((const char *)w + i * size, 64 * size);
        a0 = _mm512_fmadd_ps(ld16(fmt, w, i, 0xffff), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(ld16(fmt, w, i + 16, 0xffff), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(ld16(fmt, w, i + 32, 0xffff), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(ld16(fmt, w, i + 48, 0xffff), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i < I; i += 16) {
        __mmask16 m = I - i >= 16 ? 0xffff : (__mmask16)((1u << (I - i)) - 1);
        a0 = _mm512_fmadd_ps(ld16(fmt, w, i, m), _mm512_maskz_loadu_ps(m, x + i), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

/* sum(u * w) - 128 * sum(w): sum(w) by one more VNNI product */
static void dot_i8(const int8_t *w, const uint8_t *u1, const uint8_t *u2, int64_t I, int32_t *d1, int32_t *d2) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a, e = a, f = a;
    int64_t i = 0;
    for (; i + 128 <= I; i += 128) {
        mk_prefetch_i8(w + i);
        mk_prefetch_i8(w + i + 64);
        __m512i v0 = _mm512_loadu_si512(w + i), v1 = _mm512_loadu_si512(w + i + 64);
        a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(u1 + i), v0);
        b = _mm512_dpbusd_epi32(b, _mm512_loadu_si512(u1 + i + 64), v1);
        c = _mm512_dpbusd_epi32(c, _mm512_loadu_si512(u2 + i), v0);
        d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(u2 + i + 64), v1);
        e = _mm512_dpbusd_epi32(e, ones, v0);
        f = _mm512_dpbusd_epi32(f, ones, v1);
    }
    for (; i < I; i += 64) {
        __mmask64 m = I - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (I - i)) - 1);
        __m512i v = _mm512_maskz_loadu_epi8(m, w + i);
        a = _mm512_dpbusd_epi32(a, _mm512_maskz_loadu_epi8(m, u1 + i), v);
        c = _mm512_dpbusd_epi32(c, _mm512_maskz_loadu_epi8(m, u2 + i), v);
        e = _mm512_dpbusd_epi32(e, ones, v);
    }
    int32_t ws = _mm512_reduce_add_epi32(_mm512_add_epi32(e, f));
    *d1 = _mm512_reduce_add_epi32(_mm512_add_epi32(a, b)) - 128 * ws;
    *d2 = _mm512_reduce_add_epi32(_mm512_add_epi32(c, d)) - 128 * ws;
}
#elif defined(MK_AVX2)
static inline __m256 ld8(int fmt, const void *w, int64_t i) {
    switch (fmt) {
    case MK_F32:
        return _mm256_loadu_ps((const float *)w + i);
    case MK_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    default: /* MK_BF16 */
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i))), 16));
    }
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static float dot_float(int fmt, const void *w, const float *x, int64_t I) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    const int64_t size = fmt == MK_F32 ? 4 : 2;
    for (; i + 32 <= I; i += 32) {
        mk_prefetch_lines((const char *)w + i * size, 32 * size);
        a0 = _mm256_fmadd_ps(ld8(fmt, w, i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(ld8(fmt, w, i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(ld8(fmt, w, i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(ld8(fmt, w, i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= I; i += 8)
        a0 = _mm256_fmadd_ps(ld8(fmt, w, i), _mm256_loadu_ps(x + i), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < I; i++)
        s += w_at(fmt, w, i) * x[i];
    return s;
}

/* x as one int16 level: q = round(x / s), s = max|x| / 32767 (relative error <= 1.5e-5 of max|x|,
 * what the two int8 levels keep); w widened to int16 and multiplied pairwise by vpmaddwd: fewer
 * instructions per byte than two levels of vpmaddubsw, which cost twice (the loop is compute-bound on
 * 128-bit AVX2 cores: Zen 1) */
static void quantize_row(const float *x, int64_t I, uint8_t *qx, float *s) {
    int16_t *q = (int16_t *)qx;
    float m = max_abs(x, I);
    s[1] = 0;
    if (isnan(m)) {
        memset(q, 0, (size_t)I * 2);
        s[0] = NAN;
        return;
    }
    s[0] = m / 32767.0f;
    float inv = m > 0 ? 32767.0f / m : 0.0f;
    for (int64_t i = 0; i < I; i++)
        q[i] = (int16_t)fminf(32767.0f, fmaxf(-32767.0f, nearbyintf(x[i] * inv)));
}

/* each int32 lane gains |w * q| <= 2 * 128 * 32767 < 2^23 per vpmaddwd: summed into float every
 * MK_I16_CHUNK elements, a lane never holds more than 2^29 */
#define MK_I16_CHUNK 1024
static float dot_q(const int8_t *w, const uint8_t *qx, const float *s, int64_t I) {
    const int16_t *q = (const int16_t *)qx;
    __m256 tot = _mm256_setzero_ps();
    int64_t i = 0;
    while (i + 32 <= I) {
        int64_t end = i + MK_I16_CHUNK < I ? i + MK_I16_CHUNK : I;
        __m256i a = _mm256_setzero_si256(), b = a;
        for (; i + 32 <= end; i += 32) {
            mk_prefetch_i8(w + i);
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + i)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + i + 16)));
            a = _mm256_add_epi32(a, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(q + i))));
            b = _mm256_add_epi32(b, _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(q + i + 16))));
        }
        tot = _mm256_add_ps(tot, _mm256_cvtepi32_ps(_mm256_add_epi32(a, b)));
    }
    int64_t rest = 0;
    for (; i < I; i++)
        rest += (int32_t)q[i] * w[i];
    return (hsum8(tot) + (float)rest) * s[0];
}
#else
static float dot_float(int fmt, const void *w, const float *x, int64_t I) {
    float acc[16] = {0};
    for (int64_t i0 = 0; i0 < I; i0 += 16) {
        int64_t n = I - i0 < 16 ? I - i0 : 16;
        for (int64_t j = 0; j < n; j++)
            acc[j] += w_at(fmt, w, i0 + j) * x[i0 + j];
    }
    float s = 0;
    for (int j = 0; j < 16; j++)
        s += acc[j];
    return s;
}

/* sum(u * w) - 128 * sum(w), not sum((u - 128) * w): GCC 12.2 at -O3 -march=native on an AVX-512 CPU
 * (Zen 4) vectorizes the latter wrongly once inlined into row_dot, for I mod 64 in [32, 64) */
static void dot_i8(const int8_t *w, const uint8_t *u1, const uint8_t *u2, int64_t I, int32_t *d1, int32_t *d2) {
    int64_t a = 0, c = 0, sw = 0; /* 255 * 127 per input: int32 would overflow past 66k inputs */
    for (int64_t i = 0; i < I; i++) {
        a += (int64_t)u1[i] * w[i];
        c += (int64_t)u2[i] * w[i];
        sw += w[i];
    }
    *d1 = (int32_t)(a - 128 * sw);
    *d2 = (int32_t)(c - 128 * sw);
}
#endif

#ifndef MK_AVX2
/* x = s1 * (u1 - 128) + s2 * (u2 - 128) with u1 = q, u2 = q + I, the second level holding the
 * first's rounding error */
static void quantize_row(const float *x, int64_t I, uint8_t *q, float *s) {
    uint8_t *u1 = q, *u2 = q + I;
    float m1 = max_abs(x, I), m2 = 0;
    if (isnan(m1)) {
        memset(q, 128, (size_t)I * 2);
        s[0] = s[1] = NAN;
        return;
    }
    s[0] = m1 / 127.0f;
    float inv1 = m1 > 0 ? 127.0f / m1 : 0.0f;
    for (int64_t i = 0; i < I; i++) {
        float v = nearbyintf(x[i] * inv1);
        u1[i] = (uint8_t)(v + 128.0f);
        m2 = fmaxf(m2, fabsf(x[i] - v * s[0]));
    }
    s[1] = m2 / 127.0f;
    float inv2 = m2 > 0 ? 127.0f / m2 : 0.0f;
    for (int64_t i = 0; i < I; i++) {
        float v = nearbyintf((x[i] - (u1[i] - 128.0f) * s[0]) * inv2);
        u2[i] = (uint8_t)(fminf(127.0f, fmaxf(-127.0f, v)) + 128.0f);
    }
}

static float dot_q(const int8_t *w, const uint8_t *q, const float *s, int64_t I) {
    int32_t d1, d2;
    dot_i8(w, q, q + I, I, &d1, &d2);
    return (float)d1 * s[0] + (float)d2 * s[1];
}
#endif

/* ---- the entry points ------------------------------------------------------------------------ */

/* the threads a weight of nbytes with O output rows is split over */
static int threads_for(int threads, int64_t nbytes, int64_t O) {
    if (threads < 1 || nbytes < MK_PAR_BYTES)
        return 1;
    int64_t blocks = (O + MK_ROWS - 1) / MK_ROWS;
    return blocks < threads ? (int)blocks : threads;
}

/* the elementwise f of moekit.kernels.activations (its kernel_code; gated kinds compute f(gate) * up) */
enum { MK_SILU = 0, MK_GELU_TANH = 1, MK_GELU_ERF = 2, MK_RELU = 3 };

static inline float act1(int act, float g) {
    switch (act) {
    case MK_SILU:
        return g / (1.0f + expf(-g));
    case MK_GELU_TANH:
        return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
    case MK_GELU_ERF:
        return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
    default:
        return g > 0 ? g : 0.0f;
    }
}

/* row o of weight (data, scale) in fmt against x, or against its integer form (u, s) for int8 */
static float row_dot(int fmt, const void *data, const uint16_t *scale, int64_t o, int64_t I, const float *x,
                     const uint8_t *u, const float *s) {
    if (fmt == MK_I8) {
        return dot_q((const int8_t *)data + (size_t)o * I, u, s, I) * bf16_to_f32(scale[o]);
    }
    size_t esize = fmt == MK_F32 ? 4 : 2;
    return dot_float(fmt, (const char *)data + (size_t)o * I * esize, x, I);
}

/* y_j = x @ w_j^T for n weights of one input (an attention's q, k and v) in one call: their output
 * rows form one space split over the threads, x written in its integer form once (quantize_row).
 * ws, scales, ys: addresses; Os: each weight's rows; fmts: each one's MK_ format (scales 0 for the
 * float ones). */
void mk_linear_many(int64_t n, const int32_t *fmts, const int64_t *ws, const int64_t *scales, const int64_t *Os,
                    const float *x, int64_t R, int64_t I, const int64_t *ys, int threads) {
    uint8_t *u = (uint8_t *)malloc((size_t)(2 * R * I + 128));
    float *s = (float *)malloc((size_t)(2 * R) * sizeof(float));
    int64_t rows = 0, bytes = 0;
    for (int64_t j = 0; j < n; j++) {
        rows += Os[j];
        bytes += Os[j] * I * (fmts[j] == MK_I8 ? 1 : fmts[j] == MK_F32 ? 4 : 2);
    }
    if (!u || !s) {
        for (int64_t j = 0; j < n; j++)
            for (int64_t k = 0; k < R * Os[j]; k++)
                ((float *)ys[j])[k] = NAN;
        free(u);
        free(s);
        return;
    }
    for (int64_t r = 0; r < R; r++)
        quantize_row(x + r * I, I, u + 2 * r * I, s + 2 * r);
    int nt = threads_for(threads, bytes, rows);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t b = 0; b < (rows + MK_ROWS - 1) / MK_ROWS; b++) {
        for (int64_t i = b * MK_ROWS; i < rows && i < (b + 1) * MK_ROWS; i++) {
            int64_t j = 0, o = i;
            while (o >= Os[j])
                o -= Os[j++];
            float *y = (float *)ys[j];
            for (int64_t r = 0; r < R; r++)
                y[r * Os[j] + o] = row_dot(fmts[j], (const void *)ws[j], (const uint16_t *)scales[j], o, I, x + r * I,
                                           u + 2 * r * I, s + 2 * r);
        }
    }
    free(u);
    free(s);
}

/* y = x @ w^T: x (R, I), w (O, I) in fmt (scale: int8's, one bf16 per row; else 0), y (R, O) */
void mk_linear(int32_t fmt, const float *x, int64_t R, int64_t I, const void *w, const uint16_t *scale, int64_t O,
               float *y, int threads) {
    int64_t ws = (int64_t)w, ss = (int64_t)scale, ys = (int64_t)y;
    mk_linear_many(1, &fmt, &ws, &ss, &O, x, R, I, &ys, threads);
}

/* ---- a layer's chosen experts in one call ------------------------------------------------------- */

/* out (D) += sum_k alpha[k] * down_k(act(up_k x)) for the experts ids[0..K): table (E, 4) holds each
 * expert's up data (H, D), up scales (H) or 0, down data (D, F), down scales (D) or 0, each in fmt[e]
 * (MK_F32 ... MK_I8); H = 2F (rows [gate | up]) when gated; ids outside [0, E) are empty slots (at
 * most 256 slots). Three phases over the threads: every
 * up row of every expert; the activations; then out's rows, each summing over the experts. */
void mk_experts(const int64_t *table, const int32_t *fmt, const int64_t *ids_in, const float *alpha_in, int64_t K_in,
                int64_t E, const float *x, int64_t D, int64_t F, int act, int gated, float *out, int threads) {
    int64_t ids[256], K = 0; /* the chosen slots that name an expert (id E: an empty slot) */
    float alpha[256];
    for (int64_t k = 0; k < K_in && K < 256; k++)
        if (ids_in[k] >= 0 && ids_in[k] < E) {
            ids[K] = ids_in[k];
            alpha[K++] = alpha_in[k];
        }
    int64_t H = gated ? 2 * F : F, wide = D > F ? D : F;
    float *h = (float *)malloc((size_t)(K * H + K * F + 1) * sizeof(float)), *a = h + K * H;
    uint8_t *u = (uint8_t *)malloc((size_t)(2 * D + 2 * K * F + 128));
    float *s = (float *)malloc((size_t)(2 + 2 * K) * sizeof(float));
    if (!h || !u || !s) {
        for (int64_t o = 0; o < D; o++)
            out[o] = NAN;
        free(h);
        free(u);
        free(s);
        return;
    }
    uint8_t *ua = u + 2 * D;
    quantize_row(x, D, u, s);
    int64_t bytes = 0;
    for (int64_t k = 0; k < K; k++)
        bytes += (H + D) * F * (fmt[ids[k]] == MK_I8 ? 1 : fmt[ids[k]] == MK_F32 ? 4 : 2);
    int nt = threads_for(threads, bytes, K * wide);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (K * H + MK_ROWS - 1) / MK_ROWS; b++) {
            for (int64_t i = b * MK_ROWS; i < K * H && i < (b + 1) * MK_ROWS; i++) {
                int64_t k = i / H, e = ids[k];
                const int64_t *t = table + 4 * e;
                h[i] = row_dot(fmt[e], (const void *)t[0], (const uint16_t *)t[1], i - k * H, D, x, u, s);
            }
        }
#pragma omp for schedule(static)
        for (int64_t k = 0; k < K; k++) {
            const float *hk = h + k * H;
            float *ak = a + k * F;
            for (int64_t j = 0; j < F; j++)
                ak[j] = gated ? act1(act, hk[j]) * hk[F + j] : act1(act, hk[j]);
            if (fmt[ids[k]] == MK_I8)
                quantize_row(ak, F, ua + 2 * k * F, s + 2 + 2 * k);
        }
        /* out's rows in one contiguous range per thread, expert after expert: each thread streams
         * its part of each down projection front to back (row by row across the experts reads 8
         * interleaved streams: ~13 against ~20 GB/s); each row sums the experts in order */
        int tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nth = omp_get_num_threads();
#endif
        int64_t lo = D * tid / nth, hi = D * (tid + 1) / nth;
        for (int64_t k = 0; k < K; k++) {
            const int64_t *t = table + 4 * ids[k];
            for (int64_t o = lo; o < hi; o++)
                out[o] += alpha[k] * row_dot(fmt[ids[k]], (const void *)t[2], (const uint16_t *)t[3], o, F, a + k * F,
                                             ua + 2 * k * F, s + 2 + 2 * k);
        }
    }
    free(h);
    free(u);
    free(s);
}

/* 2 when built with the AVX-512 VNNI kernels, 1 with the AVX2 ones, 0 for the portable C ones */
int mk_vectorized(void) {
#if defined(MK_AVX512)
    return 2;
#elif defined(MK_AVX2)
    return 1;
#else
    return 0;
#endif
}

int mk_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
