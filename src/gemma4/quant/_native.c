/* Optional decode kernels for gemma4's int8, int4 and bf16 weights, and the fused float32 ops of a decode
   step at the end of this file (see gemma4/quant/native.py).

Why this exists: PyTorch's weight-only CPU kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu)
convert every weight to float before multiplying, so at one token per step they are compute-bound at
~5 GB/s of weights, well under the memory bandwidth. Here the activations are quantized to int8 in
32-input blocks (one float scale per block, the scheme of llama.cpp's Q8_0 activations) and the dot
products are integer: AVX512-VNNI vpdpbusd does 64 multiply-adds per instruction, so streaming the
weights, not arithmetic, bounds a step. Each activation block is rounded in two int8 passes (value, then
residual: see quant_block), ~15 bits relative to the block's largest input.

Compiled on the user's machine by native.py (cc -O3 -march=native -fopenmp); the ISA path is picked at
compile time (AVX512-VNNI, AVX2 or portable C). Every path computes the same integer block sums, so
results differ from each other only in float summation order.

Layouts (all row-major):
  int8 weights  W  int8 [N, K], one bf16 scale per row: w = q * ws[n]; or (g = 32) one fp16 scale per 32
                inputs of a row, ws [N, K/32]: w = q * ws[n, k/32] (GGUF's Q8_0 block).
  int4 weights  W  uint8 [N, K/2], input 2i in the low nibble of byte i, input 2i+1 in the high one;
                SZ bf16 [N, K/g, 2] (scale, zero) per g inputs of a row: w = (q - 8) * scale + zero.
  activations   quantized per 32-input block: x ~= d_b * a, a int8 in [-127, 127].
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define G4_VNNI 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define G4_AVX2 1
#include <immintrin.h>
#endif

#include <omp.h>

int g4_isa(void) {
#if defined(G4_VNNI)
    return 2;
#elif defined(G4_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* -------------------------------------------------------------------------------- busy-core guard */
/* With two threads on a two-core machine whose other core is busy (another process), every parallel
   region ends waiting for the thread that shares that core until the scheduler runs it again,
   milliseconds later: decode at two threads fell to half its one-thread speed (benchmarks/RESULTS.md).
   So the matmul loops hand out their tiles in chunks (a thread that has not started leaves its share to
   the others), the calling thread notes when it ran out of work and when the team had finished, and if
   it then waited longer than it worked (and over 50 us), the next calls run on one thread; after them
   the team is tried again. The solo run is short (G4_SOLO_MIN calls, a fraction of a decode step) unless
   the wait came within G4_SOLO_MIN team calls of the last one's end, then twice the last, up to
   G4_SOLO_MAX: a one-off delay (a virtual machine's core descheduled for a few ms, measured several times
   a minute on this quiet machine) costs a few calls on one thread, and a core that stays busy is tried
   rarely. A call that follows a pause in team calls is not judged (the other thread was asleep). */
#ifndef G4_SOLO_MIN
#define G4_SOLO_MIN 32
#endif
#ifndef G4_SOLO_MAX
#define G4_SOLO_MAX 2048
#endif
#ifndef G4_IDLE_GAP
#define G4_IDLE_GAP 200e-6
#endif
/* Relaxed atomics: a heuristic shared by whichever threads call; a lost update costs speed, never results. */
static int g4_solo_left;              /* calls still to run on one thread */
static int g4_solo_len = G4_SOLO_MIN; /* length of the last solo run */
static int g4_team_calls;             /* team calls since the last solo run ended */

static inline int g4_team(int nthreads) {
    if (nthreads <= 1) return 1;
    int left = __atomic_load_n(&g4_solo_left, __ATOMIC_RELAXED);
    if (left > 0) {
        __atomic_store_n(&g4_solo_left, left - 1, __ATOMIC_RELAXED);
        if (left == 1) __atomic_store_n(&g4_team_calls, 0, __ATOMIC_RELAXED);
        return 1;
    }
    return nthreads;
}

static double g4_last_end;            /* when the last team call ended */

static inline void g4_team_done(int team, double start, double own_done, double all_done) {
    if (team <= 1) return;
    double waited = all_done - own_done, last;
    __atomic_load(&g4_last_end, &last, __ATOMIC_RELAXED);
    __atomic_store(&g4_last_end, &all_done, __ATOMIC_RELAXED);
    int calls = __atomic_add_fetch(&g4_team_calls, 1, __ATOMIC_RELAXED);
    /* After a pause in team calls (a solo run, the sampler between steps) the other thread has gone to
       sleep, and waking it costs 0.3-1.3 ms on this VM: not a busy core, so such a call is not judged. */
    if (start - last > G4_IDLE_GAP) return;
    if (waited > 50e-6 && waited > own_done - start) {
        /* soon after the last solo run (the core is still busy): twice as long; else a short run */
        int len = __atomic_load_n(&g4_solo_len, __ATOMIC_RELAXED);
        len = calls <= G4_SOLO_MIN ? (2 * len < G4_SOLO_MAX ? 2 * len : G4_SOLO_MAX) : G4_SOLO_MIN;
        __atomic_store_n(&g4_solo_len, len, __ATOMIC_RELAXED);
        __atomic_store_n(&g4_solo_left, len, __ATOMIC_RELAXED);
    }
}

int g4_solo_calls_left(void) { return __atomic_load_n(&g4_solo_left, __ATOMIC_RELAXED); }

static inline float bf16_to_f(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

/* IEEE half -> float (the fp16 block scales of grouped int8 weights, Q8_0's d): exact, subnormals included. */
static inline float f16_to_f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    union { uint32_t u; float f; } v;
    if (e == 0x1F)
        v.u = sign | 0x7F800000u | (m << 13);
    else if (e)
        v.u = sign | ((e + 112u) << 23) | (m << 13);
    else { /* zero or subnormal: m * 2^-24 */
        v.f = (float)m * 5.9604644775390625e-08f;
        v.u |= sign;
    }
    return v.f;
}

static inline uint16_t f_to_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    union { float f; uint32_t u; } v;
    v.f = f;
    if (f != f) return 0x7FC0;
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

static inline void store_out(void *y, int ybf16, int64_t i, float v) {
    if (ybf16)
        ((uint16_t *)y)[i] = f_to_bf16(v);
    else
        ((float *)y)[i] = v;
}

static inline int round_clamp(float v) {
    int i = (int)nearbyintf(v);
    return i > 127 ? 127 : (i < -127 ? -127 : i);
}

/* One 32-input block (n <= 32 valid inputs, the rest zero) of a float32 or bf16 row, in two int8 passes:
   x ~= d1 * q1 + d2 * q2, q2 the rounded residual of the first pass. Why two: one int8 pass keeps ~7 bits
   relative to the block's largest input, and Gemma's activations have outlier channels that make that
   largest input large; the residual pass brings it to ~15 bits (on Gemma 3 270M's 112-position top-1
   measure int8 weights went from 102 to 106; bf16 activations give 104). It costs a second vpdpbusd per
   weight load, and decode stays bound by reading the weights. Also the code sums and the float sum. */
static void quant_block(const void *xrow, int xbf16, int64_t k0, int n, int8_t *q1, int8_t *q2, float *d1,
                        float *d2, int32_t *s1, int32_t *s2, float *xsum) {
    float x[32], amax = 0.f, xs = 0.f, r[32], rmax = 0.f;
    for (int i = 0; i < n; i++) {
        x[i] = xbf16 ? bf16_to_f(((const uint16_t *)xrow)[k0 + i]) : ((const float *)xrow)[k0 + i];
        float v = fabsf(x[i]);
        amax = v > amax ? v : amax;
        xs += x[i];
    }
    float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    int32_t s = 0, t = 0;
    for (int i = 0; i < 32; i++) {
        int v = i < n ? round_clamp(x[i] * id) : 0;
        q1[i] = (int8_t)v;
        s += v;
        r[i] = i < n ? x[i] - d * (float)v : 0.f;
        float a = fabsf(r[i]);
        rmax = a > rmax ? a : rmax;
    }
    float e = rmax / 127.f, ie = rmax > 0.f ? 127.f / rmax : 0.f;
    for (int i = 0; i < 32; i++) {
        int v = round_clamp(r[i] * ie);
        q2[i] = (int8_t)v;
        t += v;
    }
    *d1 = d;
    *d2 = e;
    *s1 = s;
    *s2 = t;
    *xsum = xs;
}

/* ------------------------------------------------------------------------------------------- int8 */
/* x [M, K] (float32, or bf16 when xbf16) -> a int8 [M, 2, Kp] (Kp = K rounded up to 64, zero padded; the
   two passes of quant_block), dl float [M, 2, Kp/64, 16] (lanes 0-7 the scale of block 2c, lanes 8-15 of
   block 2c+1: one 8-lane run per block, which both the AVX2 and the VNNI loop read), corr float [M] =
   128 * sum over blocks and passes of d * A (VNNI multiplies w + 128), and, for weights with a scale per
   block, the same per block: cl float [M, Kp/64, 16], each lane 1/8 of its block's term (NULL: not wanted). */
static void g4_quant_act_i8(const void *x, int xbf16, int64_t M, int64_t K, int8_t *a, float *dl, float *corr,
                            float *cl) {
    int64_t Kp = (K + 63) / 64 * 64, nb = Kp / 32;
    for (int64_t m = 0; m < M; m++) {
        double c = 0.0;
        int8_t *a1 = a + 2 * m * Kp, *a2 = a1 + Kp;
        float *l1 = dl + 2 * m * nb * 8, *l2 = l1 + nb * 8;
        for (int64_t b = 0; b < nb; b++) {
            int64_t k0 = b * 32;
            int n = k0 < K ? (int)(K - k0 < 32 ? K - k0 : 32) : 0;
            float d1, d2, xs;
            int32_t s1, s2;
            quant_block((const char *)x + m * K * (xbf16 ? 2 : 4), xbf16, k0, n, a1 + k0, a2 + k0, &d1, &d2, &s1, &s2, &xs);
            for (int l = 0; l < 8; l++) {
                l1[b * 8 + l] = d1;
                l2[b * 8 + l] = d2;
            }
            if (cl) /* 128 / 8 = 16: the 8 lanes of a block sum back to its term */
                for (int l = 0; l < 8; l++) cl[m * nb * 8 + b * 8 + l] = 16.0f * (d1 * (float)s1 + d2 * (float)s2);
            c += (double)d1 * s1 + (double)d2 * s2;
        }
        corr[m] = (float)(128.0 * c);
    }
}

#if defined(G4_VNNI)
/* R rows of W (R <= 4) against one activation row: the activation and its scales are loaded once per
   64 bytes for all R rows, and the R accumulator chains run independently. vpdpbusd multiplies
   unsigned by signed bytes, so each weight goes in as w + 128 (its sign bit flipped) and 128 * sum(a)
   comes off: at the end (corr) for row scales; for weights with an fp16 scale per 32-input block
   (grouped, a literal at each call; ws: row r's scales at ws + r * ldws) per block (cl), before each
   block's sums are scaled by the weight's block scale, since that scale changes from block to block. */
static inline __attribute__((always_inline)) void i8_rows_vnni(int R, int grouped, const int8_t *w, int64_t ldw,
                                                               const uint16_t *ws, int64_t ldws, const int8_t *a,
                                                               const float *dl, const float *cl, int64_t Kp,
                                                               int64_t K, float corr, float *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const int8_t *a2 = a + Kp;
    const float *dl2 = dl + Kp / 32 * 8;
    int64_t c = 0;
    for (int64_t k = 0; k < K; k += 64, c++) {
        __mmask64 mk = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        __mmask8 ms = K - k > 32 ? 3 : 1; /* the second block's scale exists only when its block does */
        __m512i av = _mm512_loadu_si512(a + k), av2 = _mm512_loadu_si512(a2 + k); /* zero padded to 64 */
        __m512 dv = _mm512_loadu_ps(dl + c * 16), dv2 = _mm512_loadu_ps(dl2 + c * 16);
        __m512 cv = grouped ? _mm512_loadu_ps(cl + c * 16) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            /* masked-off weight bytes become 0x80 after the flip; their activations are zero padding */
            _mm_prefetch((const char *)(w + (r + 4) * ldw + k), _MM_HINT_T0); /* the next tile's row */
            __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + r * ldw + k), flip);
            __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, av);
            __m512i p2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, av2);
            if (grouped) {
                __m512 sv = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(
                                                              _mm_cvtph_ps(_mm_maskz_loadu_epi16(ms, ws + r * ldws + 2 * c))));
                __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), dv, _mm512_fmsub_ps(_mm512_cvtepi32_ps(p2), dv2, cv));
                acc[r] = _mm512_fmadd_ps(t, sv, acc[r]);
            } else {
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), dv, acc[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p2), dv2, acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]) - (grouped ? 0.0f : corr);
}
#endif

#if defined(G4_AVX2)
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline float i8_row_avx2(const int8_t *w, const uint16_t *wsg, const int8_t *a, const float *dl, int64_t Kp,
                                int64_t K) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *a2 = a + Kp;
    const float *dl2 = dl + Kp / 32 * 8;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) { /* K % 32 == 0 */
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
        __m256i aw = _mm256_sign_epi8(wv, wv);
        /* maddubs wants unsigned x signed: |w| times a with w's sign (no int16 overflow: 2 * 127 * 127) */
        __m256i p = _mm256_madd_epi16(
            _mm256_maddubs_epi16(aw, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(a + k)), wv)), ones);
        __m256i p2 = _mm256_madd_epi16(
            _mm256_maddubs_epi16(aw, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(a2 + k)), wv)), ones);
        if (wsg) { /* a scale per block: the block's two passes, then times its scale */
            __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(dl + k / 32 * 8),
                                       _mm256_mul_ps(_mm256_cvtepi32_ps(p2), _mm256_loadu_ps(dl2 + k / 32 * 8)));
            acc = _mm256_fmadd_ps(t, _mm256_set1_ps(f16_to_f(wsg[k / 32])), acc);
            continue;
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(dl + k / 32 * 8), acc);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p2), _mm256_loadu_ps(dl2 + k / 32 * 8), acc);
    }
    return hsum256(acc);
}
#endif

static inline float i8_row_ref(const int8_t *w, const uint16_t *wsg, const int8_t *a, const float *dl, int64_t Kp,
                               int64_t K) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; k += 32) {
        float t = 0.f;
        for (int j = 0; j < 2; j++) {
            int32_t s = 0;
            for (int i = 0; i < 32; i++) s += (int32_t)w[k + i] * a[j * Kp + k + i];
            t += dl[j * (Kp / 32 * 8) + k / 32 * 8] * (float)s;
        }
        acc += wsg ? f16_to_f(wsg[k / 32]) * t : t;
    }
    return acc;
}

/* y [M, N] (float32, or bf16 when ybf16) = (x quantized as a, dl, corr, cl) @ W^T; K % 32 == 0. W int8 [N, K]
   times ws: bf16 [N] (g == 0, a scale per row), or fp16 [N, K/32] (g == 32, a scale per 32-input block,
   the layout of GGUF's Q8_0). */
static void g4_gemv_i8(const int8_t *a, const float *dl, const float *corr, const float *cl, int64_t M, int64_t K,
                       const int8_t *W, const uint16_t *ws, int64_t g, int64_t N, void *y, int ybf16, int nthreads) {
    int64_t Kp = (K + 63) / 64 * 64, tiles = (N + 3) / 4;
    (void)corr;
    int team = g4_team(nthreads);
    int64_t chunk = tiles / (8 * team) + 1;
    double start = omp_get_wtime(), own_done = start;
#pragma omp parallel num_threads(team) if (team > 1)
    {
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * 4;
        int R = N - n0 < 4 ? (int)(N - n0) : 4;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *am = a + 2 * m * Kp;
            const float *dm = dl + 2 * m * (Kp / 32) * 8;
            float v[4];
#if defined(G4_VNNI)
            if (g) { /* literal R and grouped: each call compiles to its own unrolled loop */
                const float *cm = cl + m * (Kp / 32) * 8;
                const uint16_t *wsn = ws + n0 * (K / 32);
                if (R == 4)
                    i8_rows_vnni(4, 1, W + n0 * K, K, wsn, K / 32, am, dm, cm, Kp, K, 0.0f, v);
                else
                    for (int r = 0; r < R; r++)
                        i8_rows_vnni(1, 1, W + (n0 + r) * K, K, wsn + r * (K / 32), K / 32, am, dm, cm, Kp, K, 0.0f, v + r);
            } else if (R == 4)
                i8_rows_vnni(4, 0, W + n0 * K, K, NULL, 0, am, dm, NULL, Kp, K, corr[m], v);
            else
                for (int r = 0; r < R; r++)
                    i8_rows_vnni(1, 0, W + (n0 + r) * K, K, NULL, 0, am, dm, NULL, Kp, K, corr[m], v + r);
#else
            for (int r = 0; r < R; r++) {
                const uint16_t *wsg = g ? ws + (n0 + r) * (K / 32) : NULL;
#if defined(G4_AVX2)
                v[r] = i8_row_avx2(W + (n0 + r) * K, wsg, am, dm, Kp, K);
#else
                v[r] = i8_row_ref(W + (n0 + r) * K, wsg, am, dm, Kp, K);
#endif
            }
#endif
            for (int r = 0; r < R; r++) store_out(y, ybf16, m * N + n0 + r, g ? v[r] : bf16_to_f(ws[n0 + r]) * v[r]);
        }
    }
        if (omp_get_thread_num() == 0) own_done = omp_get_wtime();
    }
    g4_team_done(team, start, own_done, omp_get_wtime());
}

/* ------------------------------------------------------------------------------------------- int4 */
/* x [M, K] (float32 or bf16; K % 32 == 0) -> a int8 [M, 2, Kp] (the two passes of quant_block) with Kp = K
   rounded up to 128, in chunks of 128 inputs
   (four blocks): the chunk's first 64 bytes are the even inputs of its blocks (16 per block, in block
   order), the next 64 the odd ones, so one 64-byte load of codes lines up with the activations: its low
   nibbles with the evens, its high nibbles with the odds. Per chunk, 16-lane vectors (four lanes per
   block): dl [M, 2, nc, 16] = d_b per pass, el [M, nc, 16] = -8 * (d1 A1 + d2 A2)_b / 4 and xl = X_b / 4
   (X_b the block's float sum), so that the lane sums over a block give d1 dot1 + d2 dot2 - 8 (d1 A1 + d2 A2)
   and X_b. Padding blocks are all zero. */
static void g4_quant_act_i4(const void *x, int xbf16, int64_t M, int64_t K, int8_t *a, float *dl, float *el, float *xl) {
    int64_t Kp = (K + 127) / 128 * 128, nc = Kp / 128;
    int8_t q[32], q2[32];
    for (int64_t m = 0; m < M; m++) {
        for (int64_t c = 0; c < nc; c++) {
            int8_t *ac = a + 2 * m * Kp + c * 128, *ac2 = ac + Kp;
            float *dc = dl + (2 * m * nc + c) * 16, *dc2 = dc + nc * 16;
            float *ec = el + (m * nc + c) * 16, *xc = xl + (m * nc + c) * 16;
            for (int j = 0; j < 4; j++) {
                int64_t k0 = c * 128 + j * 32;
                int n = k0 < K ? 32 : 0;
                float d, d2, xs;
                int32_t s, s2;
                quant_block((const char *)x + m * K * (xbf16 ? 2 : 4), xbf16, k0, n, q, q2, &d, &d2, &s, &s2, &xs);
                for (int i = 0; i < 16; i++) {
                    ac[j * 16 + i] = q[2 * i];
                    ac[64 + j * 16 + i] = q[2 * i + 1];
                    ac2[j * 16 + i] = q2[2 * i];
                    ac2[64 + j * 16 + i] = q2[2 * i + 1];
                }
                for (int l = 0; l < 4; l++) {
                    dc[j * 4 + l] = d;
                    dc2[j * 4 + l] = d2;
                    ec[j * 4 + l] = -8.f * (d * (float)s + d2 * (float)s2) * 0.25f;
                    xc[j * 4 + l] = xs * 0.25f;
                }
            }
        }
    }
}

#if defined(G4_VNNI)
/* R rows (R <= 4) of int4 codes against one activation row, sharing the activation loads. */
static inline __attribute__((always_inline)) void i4_rows_vnni(int R, const uint8_t *w, const uint32_t *sz,
                                                               const int8_t *a, const int8_t *a2, const float *dl,
                                                               const float *dl2, const float *el, const float *xl,
                                                               int64_t K, int64_t g, __m512i idx, float *out) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
    const int64_t K2 = K / 2, G = K / g;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0, c = 0; k < K; k += 128, c++) {
        int64_t nbytes = (K - k) / 2 < 64 ? (K - k) / 2 : 64;
        __mmask64 mk = nbytes == 64 ? ~(__mmask64)0 : (((__mmask64)1 << nbytes) - 1);
        __m512i ae = _mm512_loadu_si512(a + k), ao = _mm512_loadu_si512(a + k + 64);
        __m512i ae2 = _mm512_loadu_si512(a2 + k), ao2 = _mm512_loadu_si512(a2 + k + 64);
        __m512 dv = _mm512_loadu_ps(dl + c * 16), dv2 = _mm512_loadu_ps(dl2 + c * 16);
        __m512 ev = _mm512_loadu_ps(el + c * 16), xv = _mm512_loadu_ps(xl + c * 16);
        /* (scale, zero) pairs of the groups this chunk spans: one pair per 32-bit word, spread to lanes */
        int64_t j0 = k / g, ng = G - j0 < 4 ? G - j0 : 4;
        __mmask8 mg = (__mmask8)((1u << ng) - 1);
        for (int r = 0; r < R; r++) {
            const uint8_t *wr = w + r * K2;
            _mm_prefetch((const char *)(wr + 4 * K2 + k / 2), _MM_HINT_T0); /* the next tile's row */
            __m512i codes = _mm512_maskz_loadu_epi8(mk, wr + k / 2);
            __m512i lo = _mm512_and_si512(codes, low4);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low4);
            __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, ae), hi, ao);
            __m512i p2 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, ae2), hi, ao2);
            __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), dv, _mm512_fmadd_ps(_mm512_cvtepi32_ps(p2), dv2, ev));
            __m128i pr = _mm_maskz_loadu_epi32(mg, sz + r * G + j0);
            __m512i v = _mm512_permutexvar_epi32(idx, _mm512_castsi128_si512(pr));
            acc[r] = _mm512_fmadd_ps(t, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi16)), xv, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

/* Prefill (many activation rows): a register-blocked GEMM in outer-product form. A panel of 32 weight rows
   is widened to float32 and transposed once into bp [K, 32] (L2-resident), then every block of MR activation
   rows runs over it: per input k, two 16-lane weight vectors and MR broadcast activations feed 2 * MR
   independent FMAs, with no horizontal sums (the dot-product form above needs one per output and streams
   both operands per FMA group; it reached ~70% of PyTorch's float32 GEMM here, this one ~100%). Each output
   is a float32 sum over k in order, so its rounding differs from the one-row path's by float32 noise. */
#define G4_NR 32
#define G4_MR 12
#define G4_GEMM_ROWS 8 /* rows from which the GEMM runs (below: the one-row path, no packing) */
#ifndef G4_GEMM_ROWS_Q
#define G4_GEMM_ROWS_Q 16 /* the same for int8/int4 weights, whose one-row path multiplies integers */
#endif

/* 16 x 16 float32 transpose in registers: r[i] holds row i; afterwards r[j] holds column j. */
static inline __attribute__((always_inline)) void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) { /* per 128-bit lane: [a0 b0 a1 b1], [a2 b2 a3 b3] */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* r[4i + j], lane L: column 4L + j of rows 4i .. 4i + 3 */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) { /* gather lane L of r[j], r[4 + j], r[8 + j], r[12 + j] into column 4L + j */
        t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD);
        r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xDD);
    }
}

/* Panel packing: bp [K, 32] = the float32 values of weight rows n0 .. n0 + nr (nr <= 32; missing rows are
   zeros), transposed, 16 x 16 blocks at a time. One packer per weight format, each giving exactly the
   values its PyTorch dequantization gives: bf16 widened; int8 q * scale; int4 (q - 8) * scale + zero, a
   multiply and an add, each rounded (no FMA). The GEMM then computes the float32 matmul of the
   activations with those weights (prefill); the one-row paths keep their own numerics (decode). */
typedef void (*g4_pack_fn)(const void *W, const uint16_t *aux, int64_t g, int64_t K, int64_t n0, int nr, float *bp);

static inline __attribute__((always_inline)) void pack_store(__m512 r[16], int64_t K, int64_t k, int h, float *bp) {
    transpose16(r);
    int64_t kn = K - k < 16 ? K - k : 16;
    for (int j = 0; j < kn; j++) _mm512_storeu_ps(bp + (k + j) * G4_NR + h * 16, r[j]);
}

static void pack_bf16(const void *W_, const uint16_t *aux, int64_t g, int64_t K, int64_t n0, int nr, float *bp) {
    const uint16_t *W = (const uint16_t *)W_;
    (void)aux, (void)g;
    for (int h = 0; h < 2; h++) /* two 16-row halves */
        for (int64_t k = 0; k < K; k += 16) {
            __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
            __m512 r[16];
            for (int i = 0; i < 16; i++) {
                int row = h * 16 + i;
                r[i] = row < nr ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                      _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, W + (n0 + row) * K + k)), 16))
                                : _mm512_setzero_ps();
            }
            pack_store(r, K, k, h, bp);
        }
}

/* int8 W [N, K] (K % 32 == 0), aux = the bf16 row scales [N] (g == 0) or fp16 block scales [N, K/32] (g == 32). */
static void pack_i8(const void *W_, const uint16_t *ws, int64_t g, int64_t K, int64_t n0, int nr, float *bp) {
    const int8_t *W = (const int8_t *)W_;
    for (int h = 0; h < 2; h++)
        for (int64_t k = 0; k < K; k += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) {
                int64_t row = n0 + h * 16 + i;
                r[i] = h * 16 + i < nr
                           ? _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                               _mm_loadu_si128((const __m128i *)(W + row * K + k)))),
                                           _mm512_set1_ps(g ? f16_to_f(ws[row * (K / 32) + k / 32]) : bf16_to_f(ws[row])))
                           : _mm512_setzero_ps();
            }
            pack_store(r, K, k, h, bp);
        }
}

/* int4 codes [N, K/2] (portable order: input 2j in the low nibble of byte j; K % g == 0, g % 32 == 0),
   aux = (scale, zero) bf16 pairs in row order [N, K/g, 2]. */
static void pack_i4(const void *W_, const uint16_t *sz, int64_t g, int64_t K, int64_t n0, int nr, float *bp) {
    const uint8_t *W = (const uint8_t *)W_;
    const __m128i low4 = _mm_set1_epi16(15);
    const __m512 eight = _mm512_set1_ps(8.f);
    int64_t G = K / g;
    for (int h = 0; h < 2; h++)
        for (int64_t k = 0; k < K; k += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++) {
                int64_t row = n0 + h * 16 + i;
                if (h * 16 + i >= nr) {
                    r[i] = _mm512_setzero_ps();
                    continue;
                }
                /* 8 code bytes -> 16 bytes lo0 hi0 lo1 hi1 ... (inputs in order) -> 16 floats */
                __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(W + row * (K / 2) + k / 2)));
                __m128i q = _mm_or_si128(_mm_and_si128(b, low4), _mm_slli_epi16(_mm_srli_epi16(b, 4), 8));
                const uint16_t *p = sz + (row * G + k / g) * 2;
                __m512 v = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), eight);
                r[i] = _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(bf16_to_f(p[0]))), _mm512_set1_ps(bf16_to_f(p[1])));
            }
            pack_store(r, K, k, h, bp);
        }
}

/* MR rows of x (stride K) against a packed panel: y rows (stride N) columns n0 .. n0 + nr. */
static inline __attribute__((always_inline)) void gemm_block(int MR, const float *x, int64_t K, const float *bp,
                                                            void *y, int ybf16, int64_t N, int64_t m0, int64_t n0,
                                                            int nr) {
    __m512 acc[G4_MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 b0 = _mm512_loadu_ps(bp + k * G4_NR), b1 = _mm512_loadu_ps(bp + k * G4_NR + 16);
        for (int i = 0; i < MR; i++) {
            __m512 xv = _mm512_set1_ps(x[i * K + k]);
            acc[i][0] = _mm512_fmadd_ps(xv, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(xv, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < MR; i++) {
        if (!ybf16 && nr == G4_NR) {
            float *yr = (float *)y + (m0 + i) * N + n0;
            _mm512_storeu_ps(yr, acc[i][0]);
            _mm512_storeu_ps(yr + 16, acc[i][1]);
        } else {
            float v[G4_NR];
            _mm512_storeu_ps(v, acc[i][0]);
            _mm512_storeu_ps(v + 16, acc[i][1]);
            for (int j = 0; j < nr; j++) store_out(y, ybf16, (m0 + i) * N + n0 + j, v[j]);
        }
    }
}

static void gemm_rows(const float *x, int64_t M, int64_t K, const float *bp, void *y, int ybf16, int64_t N,
                      int64_t n0, int nr) {
    int64_t m = 0;
    for (; m + G4_MR <= M; m += G4_MR) gemm_block(G4_MR, x + m * K, K, bp, y, ybf16, N, m, n0, nr);
    for (; m + 4 <= M; m += 4) gemm_block(4, x + m * K, K, bp, y, ybf16, N, m, n0, nr);
    for (; m < M; m++) gemm_block(1, x + m * K, K, bp, y, ybf16, N, m, n0, nr);
}
#endif

#if defined(G4_AVX2)
static inline float i4_row_avx2(const uint8_t *w, const uint16_t *sz, const int8_t *a, const int8_t *a2,
                                const float *dl, const float *dl2, const float *el, const float *xl, int64_t K,
                                int64_t g) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    float tail = 0.f;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        int64_t c = k / 128, j = (k % 128) / 32, grp = k / g;
        const int8_t *ac = a + c * 128 + j * 16, *ac2 = a2 + c * 128 + j * 16;
        __m128i cb = _mm_loadu_si128((const __m128i *)(w + k / 2));
        __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(cb, 4), low4), _mm_and_si128(cb, low4));
        __m256i av = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(ac + 64)), _mm_loadu_si128((const __m128i *)ac));
        __m256i av2 = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(ac2 + 64)), _mm_loadu_si128((const __m128i *)ac2));
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av), ones); /* codes <= 15: no overflow */
        __m256i p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av2), ones);
        float s = bf16_to_f(sz[2 * grp]), z = bf16_to_f(sz[2 * grp + 1]);
        float d = dl[c * 16 + j * 4], d2 = dl2[c * 16 + j * 4];
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * d), acc);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p2), _mm256_set1_ps(s * d2), acc);
        tail += s * 4.f * el[c * 16 + j * 4] + z * 4.f * xl[c * 16 + j * 4];
    }
    return hsum256(acc) + tail;
}
#endif

static inline float i4_row_ref(const uint8_t *w, const uint16_t *sz, const int8_t *a, const int8_t *a2,
                               const float *dl, const float *dl2, const float *el, const float *xl, int64_t K,
                               int64_t g) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; k += 32) {
        int64_t c = k / 128, j = (k % 128) / 32, grp = k / g;
        const int8_t *ac = a + c * 128 + j * 16, *ac2 = a2 + c * 128 + j * 16;
        int32_t s = 0, s2 = 0;
        for (int i = 0; i < 16; i++) {
            int32_t lo = w[k / 2 + i] & 15, hi = w[k / 2 + i] >> 4;
            s += lo * ac[i] + hi * ac[64 + i];
            s2 += lo * ac2[i] + hi * ac2[64 + i];
        }
        float sc = bf16_to_f(sz[2 * grp]), z = bf16_to_f(sz[2 * grp + 1]);
        acc += sc * (dl[c * 16 + j * 4] * (float)s + dl2[c * 16 + j * 4] * (float)s2 + 4.f * el[c * 16 + j * 4])
               + z * 4.f * xl[c * 16 + j * 4];
    }
    return acc;
}

/* y [M, N] (float32 or bf16) = x @ (int4 W)^T with W's (scale, zero) in row order SZ bf16 [N, K/g, 2];
   K % 32 == 0, g a multiple of 32 dividing K. */
static void g4_gemv_i4(const int8_t *a, const float *dl, const float *el, const float *xl, int64_t M, int64_t K,
                const uint8_t *W, const uint16_t *SZ, int64_t g, int64_t N, void *y, int ybf16, int nthreads) {
    int64_t Kp = (K + 127) / 128 * 128, nc = Kp / 128, G = K / g;
#if defined(G4_VNNI)
    /* lane l belongs to block l / 4 of a chunk, which is group (32 * (l / 4)) / g past the chunk's first
       (chunks start on group boundaries, or halfway into a 256-group, where that quotient is 0 too) */
    int32_t lanes[16];
    for (int l = 0; l < 16; l++) lanes[l] = (int32_t)((32 * (l / 4)) / g);
    __m512i idx = _mm512_loadu_si512(lanes);
#endif
    int64_t tiles = (N + 3) / 4;
    int team = g4_team(nthreads);
    int64_t chunk = tiles / (8 * team) + 1;
    double start = omp_get_wtime(), own_done = start;
#pragma omp parallel num_threads(team) if (team > 1)
    {
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * 4;
        int R = N - n0 < 4 ? (int)(N - n0) : 4;
        const uint8_t *w = W + n0 * (K / 2);
        const uint16_t *sz = SZ + n0 * G * 2;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *am = a + 2 * m * Kp, *am2 = am + Kp;
            const float *dm = dl + 2 * m * nc * 16, *dm2 = dm + nc * 16, *em = el + m * nc * 16, *xm = xl + m * nc * 16;
            float v[4];
#if defined(G4_VNNI)
            if (R == 4)
                i4_rows_vnni(4, w, (const uint32_t *)sz, am, am2, dm, dm2, em, xm, K, g, idx, v);
            else
                for (int r = 0; r < R; r++)
                    i4_rows_vnni(1, w + r * (K / 2), (const uint32_t *)(sz + r * G * 2), am, am2, dm, dm2, em, xm, K, g,
                                 idx, v + r);
#else
            for (int r = 0; r < R; r++) {
#if defined(G4_AVX2)
                v[r] = i4_row_avx2(w + r * (K / 2), sz + r * G * 2, am, am2, dm, dm2, em, xm, K, g);
#else
                v[r] = i4_row_ref(w + r * (K / 2), sz + r * G * 2, am, am2, dm, dm2, em, xm, K, g);
#endif
            }
#endif
            for (int r = 0; r < R; r++) store_out(y, ybf16, m * N + n0 + r, v[r]);
        }
    }
        if (omp_get_thread_num() == 0) own_done = omp_get_wtime();
    }
    g4_team_done(team, start, own_done, omp_get_wtime());
}

/* ------------------------------------------------------------------------------------------- bf16 */
/* bf16 weights against float32 activations: each weight widened to float32 (a shift) and multiplied in
   float32, so the only rounding of the weights is the file's own. Bandwidth-bound at one token per step. */
#if defined(G4_VNNI)
static inline __attribute__((always_inline)) void bf16_rows_avx512(int R, const uint16_t *w, int64_t ldw,
                                                                   const float *x, int64_t K, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 mk = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(mk, x + k);
        for (int r = 0; r < R; r++) {
            /* the same position of the next tile's row (4 rows on: the tiles are contiguous): 10-25% more
               bandwidth on 2048-wide rows than a fixed 4 KiB ahead, the same on 640-wide ones (measured) */
            _mm_prefetch((const char *)(w + (r + 4) * ldw + k), _MM_HINT_T0);
            __m256i h = _mm256_maskz_loadu_epi16(mk, w + r * ldw + k);
            __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            acc[r] = _mm512_fmadd_ps(wv, xv, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

static inline float bf16_row_ref(const uint16_t *w, const float *x, int64_t K) {
    float acc = 0.f;
#if defined(G4_AVX2)
    __m256 v = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + k)));
        v = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(h, 16)), _mm256_loadu_ps(x + k), v);
    }
    acc = hsum256(v);
    for (; k < K; k++) acc += bf16_to_f(w[k]) * x[k];
#else
    for (int64_t k = 0; k < K; k++) acc += bf16_to_f(w[k]) * x[k];
#endif
    return acc;
}

#if defined(G4_VNNI)
/* y [M, N] = xf [M, K] (float32) @ W^T by the packed GEMM, panels of 32 weight rows shared out among the
   team's threads (each packs its panel into its own scratch). Returns -1 when scratch cannot be allocated. */
static int g4_gemm(const float *xf, int64_t M, int64_t K, int64_t N, void *y, int ybf16, int team, g4_pack_fn pack,
                   const void *W, const uint16_t *aux, int64_t g) {
    int64_t panels = (N + G4_NR - 1) / G4_NR;
    int failed = 0;
    double start = omp_get_wtime(), own_done = start;
#pragma omp parallel num_threads(team) if (team > 1)
    {
        float *bp = malloc((size_t)(K * G4_NR) * sizeof(float));
        if (!bp) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t p = 0; p < panels; p++) {
            if (!bp) continue;
            int64_t n0 = p * G4_NR;
            int nr = N - n0 < G4_NR ? (int)(N - n0) : G4_NR;
            pack(W, aux, g, K, n0, nr, bp);
            gemm_rows(xf, M, K, bp, y, ybf16, N, n0, nr);
        }
        free(bp);
        if (omp_get_thread_num() == 0) own_done = omp_get_wtime();
    }
    g4_team_done(team, start, own_done, omp_get_wtime());
    return failed ? -1 : 0;
}
#endif

/* x (float32 or bf16) as float32 rows: x itself, or a converted copy in *buf (NULL when out of memory). */
static const float *f32_rows(const void *x, int xbf16, int64_t n, float **buf) {
    *buf = NULL;
    if (!xbf16) return (const float *)x;
    if (!(*buf = malloc((size_t)n * sizeof(float)))) return NULL;
    for (int64_t i = 0; i < n; i++) (*buf)[i] = bf16_to_f(((const uint16_t *)x)[i]);
    return *buf;
}

#if defined(G4_VNNI)
/* The prefill entry of the three linear kernels: x (float32 or bf16) as float32 rows, then g4_gemm. */
static int g4_gemm_rows_in(const void *x, int xbf16, int64_t M, int64_t K, int64_t N, void *y, int ybf16,
                           int nthreads, g4_pack_fn pack, const void *W, const uint16_t *aux, int64_t g) {
    float *buf;
    const float *xf = f32_rows(x, xbf16, M * K, &buf);
    int rc = xf ? g4_gemm(xf, M, K, N, y, ybf16, g4_team(nthreads), pack, W, aux, g) : -1;
    free(buf);
    return rc;
}
#endif

/* y [M, N] = x [M, K] @ W^T, W bf16 [N, K]; x and y float32 or bf16. From G4_GEMM_ROWS rows on (AVX-512):
   the packed GEMM above, panels of 32 weight rows shared out among the threads. Returns -1 when scratch
   memory cannot be allocated. */
int g4_linear_bf16(const void *x, int xbf16, int64_t M, int64_t K, const uint16_t *W, int64_t N, void *y, int ybf16,
                   int nthreads) {
#if defined(G4_VNNI)
    if (M >= G4_GEMM_ROWS) return g4_gemm_rows_in(x, xbf16, M, K, N, y, ybf16, nthreads, pack_bf16, W, NULL, 0);
#endif
    float *buf;
    const float *xf = f32_rows(x, xbf16, M * K, &buf);
    if (!xf) return -1;
    int team = g4_team(nthreads);
    double start = omp_get_wtime(), own_done = start;
    int64_t tiles = (N + 3) / 4;
    int64_t chunk = tiles / (8 * team) + 1;
#pragma omp parallel num_threads(team) if (team > 1)
    {
#pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * 4;
        int R = N - n0 < 4 ? (int)(N - n0) : 4;
        for (int64_t m = 0; m < M; m++) {
            float v[4];
#if defined(G4_VNNI)
            if (R == 4)
                bf16_rows_avx512(4, W + n0 * K, K, xf + m * K, K, v);
            else
                for (int r = 0; r < R; r++) bf16_rows_avx512(1, W + (n0 + r) * K, K, xf + m * K, K, v + r);
#else
            for (int r = 0; r < R; r++) v[r] = bf16_row_ref(W + (n0 + r) * K, xf + m * K, K);
#endif
            for (int r = 0; r < R; r++) store_out(y, ybf16, m * N + n0 + r, v[r]);
        }
    }
        if (omp_get_thread_num() == 0) own_done = omp_get_wtime();
    }
    g4_team_done(team, start, own_done, omp_get_wtime());
    free(buf);
    return 0;
}

/* ------------------------------------------------------------------------------------ entry points */
/* One call per linear layer (each ctypes call costs microseconds): quantize the activation rows into
   scratch memory of our own, multiply, free. Return 0, or -1 when the scratch cannot be allocated. */
int g4_linear_i8(const void *x, int xbf16, int64_t M, int64_t K, const int8_t *W, const uint16_t *ws, int64_t g,
                 int64_t N, void *y, int ybf16, int nthreads) {
#if defined(G4_VNNI)
    if (M >= G4_GEMM_ROWS_Q) /* prefill: float32 activations against the dequantized weights */
        return g4_gemm_rows_in(x, xbf16, M, K, N, y, ybf16, nthreads, pack_i8, W, ws, g);
#endif
    int64_t Kp = (K + 63) / 64 * 64, nl = M * (Kp / 32) * 8;
    size_t bytes_a = (size_t)(2 * M * Kp + 63) / 64 * 64;
    char *buf = malloc(bytes_a + (size_t)(3 * nl + M) * sizeof(float));
    if (!buf) return -1;
    int8_t *a = (int8_t *)buf;
    float *dl = (float *)(buf + bytes_a), *corr = dl + 2 * nl, *cl = corr + M;
    g4_quant_act_i8(x, xbf16, M, K, a, dl, corr, g ? cl : NULL);
    g4_gemv_i8(a, dl, corr, cl, M, K, W, ws, g, N, y, ybf16, nthreads);
    free(buf);
    return 0;
}

int g4_linear_i4(const void *x, int xbf16, int64_t M, int64_t K, const uint8_t *W, const uint16_t *SZ, int64_t g,
                 int64_t N, void *y, int ybf16, int nthreads) {
#if defined(G4_VNNI)
    if (M >= G4_GEMM_ROWS_Q) return g4_gemm_rows_in(x, xbf16, M, K, N, y, ybf16, nthreads, pack_i4, W, SZ, g);
#endif
    int64_t Kp = (K + 127) / 128 * 128, nl = M * (Kp / 128) * 16;
    size_t bytes_a = (size_t)(2 * M * Kp + 63) / 64 * 64;
    char *buf = malloc(bytes_a + 4 * (size_t)nl * sizeof(float));
    if (!buf) return -1;
    int8_t *a = (int8_t *)buf;
    float *dl = (float *)(buf + bytes_a), *el = dl + 2 * nl, *xl = el + nl;
    g4_quant_act_i4(x, xbf16, M, K, a, dl, el, xl);
    g4_gemv_i4(a, dl, el, xl, M, K, W, SZ, g, N, y, ybf16, nthreads);
    free(buf);
    return 0;
}

/* ------------------------------------------------------------------------ fused float32 decode ops */
/* What a decode step does between its matmuls, one C call each instead of 5-15 PyTorch calls (each
   ~4-5 us of dispatch on this machine, against a few hundred nanoseconds of arithmetic for one token):
   RMSNorm, the q/k norm + RoPE of a fused qkv row, attention of one query row over a KV cache, and
   the gated GELU. float32 only; the same operations in the same order as the PyTorch modules, except
   that sums run in another order. */

/* exp(y) for the softmax and the GELU's sigmoid: y = k ln2 + r with |r| <= ln2/2, e^r by its Taylor
   series to degree 7 (truncation < 6e-9 relative, under float32's half ulp), times 2^k built in the
   exponent bits. Plain arithmetic, so loops that call it vectorize under omp simd; libm's expf does not. */
static inline float g4_expf(float y) {
    y = y < -87.0f ? -87.0f : (y > 88.0f ? 88.0f : y);
    float k = rintf(y * 1.44269504088896341f);
    float r = y - k * 0.693145751953125f; /* ln2 split in two: k * hi is exact for |k| <= 127 */
    r = r - k * 1.4286068203094172e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720
              + r * (1.0f / 5040)))))));
    union { int32_t i; float f; } s;
    s.i = ((int32_t)k + 127) << 23;
    return p * s.f;
}

/* Sum of a[i] * b[i] in 16 independent float32 lanes (summed at the end): a plain loop GCC turns into
   vector multiplies and adds without reassociating anything (omp simd reductions compiled ~4x slower). */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    for (int j = 0; i < n; i++, j++) acc[j] += a[i] * b[i];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

static inline float sum_f32(const float *a, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j];
    for (int j = 0; i < n; i++, j++) acc[j] += a[i];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

/* 1 / sqrt(mean(x^2) + eps), as RMSNorm's pow(mean + eps, -0.5) (ATen computes that power as 1 / sqrt). */
static inline float rms_inv(const float *x, int64_t n, float eps) {
    float mean = dot_f32(x, x, n) / (float)n;
    return 1.0f / sqrtf(mean + eps);
}

/* y [rows, dim] = x * rms_inv(x) (* scale when scale is not NULL). */
void g4_rmsnorm(const float *x, int64_t rows, int64_t dim, const float *scale, float eps, float *y, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        float inv = rms_inv(xr, dim, eps);
        if (scale) {
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) yr[i] = (xr[i] * inv) * scale[i];
        } else {
#pragma omp simd
            for (int64_t i = 0; i < dim; i++) yr[i] = xr[i] * inv;
        }
    }
}

/* In place on rows of a fused projection buf [rows, ld], each row holding nqk q/k heads then nv value
   heads of D floats: every q/k head RMS-normed, multiplied by its scale (sc [nqk, D]) and rotated
   (half-split RoPE, cos/sin [rows, D]: x cos + rotate_half(x) sin); value heads RMS-normed without a
   scale when veps >= 0. */
void g4_qk_norm_rope(float *buf, int64_t rows, int64_t ld, int64_t nqk, int64_t nv, int64_t D, const float *sc,
                     float eps, const float *cs, const float *sn, float veps) {
    int64_t h2 = D / 2;
    float t[1024];
    for (int64_t r = 0; r < rows; r++) {
        float *row = buf + r * ld;
        const float *c = cs + r * D, *s = sn + r * D;
        for (int64_t h = 0; h < nqk; h++) {
            float *x = row + h * D;
            const float *w = sc + h * D;
            float inv = rms_inv(x, D, eps);
#pragma omp simd
            for (int64_t i = 0; i < D; i++) t[i] = (x[i] * inv) * w[i];
#pragma omp simd
            for (int64_t i = 0; i < h2; i++) x[i] = t[i] * c[i] + (-t[i + h2]) * s[i];
#pragma omp simd
            for (int64_t i = h2; i < D; i++) x[i] = t[i] * c[i] + t[i - h2] * s[i];
        }
        if (veps >= 0.0f)
            for (int64_t h = nqk; h < nqk + nv; h++) {
                float *x = row + h * D;
                float inv = rms_inv(x, D, veps);
#pragma omp simd
                for (int64_t i = 0; i < D; i++) x[i] = x[i] * inv;
            }
    }
}

/* out[j] = q_j . k for j < R <= 4 query rows against one key row (one pass over the key), and
   o_j += w_j * v for R output rows against one value row: the inner loops of decode attention. */
static inline __attribute__((always_inline)) void dots4(const float *const *qs, int R, const float *k, int64_t n,
                                                       float *out) {
    int64_t i = 0;
    float tail[4] = {0, 0, 0, 0};
#if defined(G4_VNNI)
    __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; i + 16 <= n; i += 16) {
        __m512 kv = _mm512_loadu_ps(k + i);
        for (int j = 0; j < R; j++) a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(qs[j] + i), kv, a[j]);
    }
    for (int j = 0; j < R; j++) tail[j] = _mm512_reduce_add_ps(a[j]);
#elif defined(G4_AVX2)
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i + 8 <= n; i += 8) {
        __m256 kv = _mm256_loadu_ps(k + i);
        for (int j = 0; j < R; j++) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qs[j] + i), kv, a[j]);
    }
    for (int j = 0; j < R; j++) tail[j] = hsum256(a[j]);
#endif
    for (int j = 0; j < R; j++) out[j] = i < n ? tail[j] + dot_f32(qs[j] + i, k + i, n - i) : tail[j];
}

static inline __attribute__((always_inline)) void axpy4(float *const *os, const float *w, int R, const float *v,
                                                       int64_t n) {
    int64_t i = 0;
#if defined(G4_VNNI)
    for (; i + 16 <= n; i += 16) {
        __m512 vv = _mm512_loadu_ps(v + i);
        for (int j = 0; j < R; j++)
            _mm512_storeu_ps(os[j] + i, _mm512_fmadd_ps(_mm512_set1_ps(w[j]), vv, _mm512_loadu_ps(os[j] + i)));
    }
#elif defined(G4_AVX2)
    for (; i + 8 <= n; i += 8) {
        __m256 vv = _mm256_loadu_ps(v + i);
        for (int j = 0; j < R; j++)
            _mm256_storeu_ps(os[j] + i, _mm256_fmadd_ps(_mm256_set1_ps(w[j]), vv, _mm256_loadu_ps(os[j] + i)));
    }
#endif
    for (int j = 0; j < R; j++)
        for (int64_t d = i; d < n; d++) os[j][d] += w[j] * v[d];
}

/* Attention of one query row per batch row over a KV cache. q: query head n of row b at q + b*qsb + n*D;
   k/v: key s of KV head h of row b at k + b*ksb + h*ksh + s*kss (D floats; v likewise, Dv floats);
   query head n reads KV head n / (N / KH). mask (may be NULL): byte s of row b at mask + b*msb, 0 =
   not visible. Scores q.k * scale, soft-capped (softcap > 0: tanh(s / c) * c), softmax, then p @ v into
   out [B, N, Dv]. Returns -1 when the scratch cannot be allocated. */
int g4_attn_decode(const float *q, int64_t qsb, int64_t B, int64_t N, int64_t D, const float *k, int64_t ksb,
                   int64_t ksh, int64_t kss, const float *v, int64_t vsb, int64_t vsh, int64_t vss, int64_t Dv,
                   int64_t KH, int64_t S, const uint8_t *mask, int64_t msb, float scale, float softcap, float *out,
                   int nthreads) {
    int64_t g = N / KH, items = B * KH;
    float *scratch = malloc((size_t)(items * g * S) * sizeof(float));
    if (!scratch) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && items > 1)
    for (int64_t it = 0; it < items; it++) {
        int64_t b = it / KH, h = it % KH;
        float *p = scratch + it * g * S;
        const float *kb = k + b * ksb + h * ksh, *vb = v + b * vsb + h * vsh;
        const uint8_t *mb = mask ? mask + b * msb : NULL;
        for (int64_t j0 = 0; j0 < g; j0 += 4) { /* query heads of this KV head, four per pass over the keys */
            int R = g - j0 < 4 ? (int)(g - j0) : 4;
            const float *qs[4];
            for (int j = 0; j < R; j++) qs[j] = q + b * qsb + (h * g + j0 + j) * D;
            for (int64_t s = 0; s < S; s++) {
                float sc[4];
                if (mb && !mb[s]) {
                    for (int j = 0; j < R; j++) p[(j0 + j) * S + s] = -INFINITY;
                    continue;
                }
                if (R == 4) /* a constant R: the head loop unrolls, no branch per vector */
                    dots4(qs, 4, kb + s * kss, D, sc);
                else
                    dots4(qs, R, kb + s * kss, D, sc);
                for (int j = 0; j < R; j++) {
                    float a = sc[j] * scale;
                    p[(j0 + j) * S + s] = softcap > 0.0f ? tanhf(a / softcap) * softcap : a;
                }
            }
        }
        for (int64_t j = 0; j < g; j++) { /* softmax in place, normalized as torch.softmax */
            float *pj = p + j * S, mx = -INFINITY;
            for (int64_t s = 0; s < S; s++) mx = pj[s] > mx ? pj[s] : mx;
#pragma omp simd
            for (int64_t s = 0; s < S; s++) pj[s] = pj[s] == -INFINITY ? 0.0f : g4_expf(pj[s] - mx);
            float inv = 1.0f / sum_f32(pj, S);
            for (int64_t s = 0; s < S; s++) pj[s] = pj[s] * inv;
            memset(out + (b * N + h * g + j) * Dv, 0, (size_t)Dv * sizeof(float));
        }
        for (int64_t j0 = 0; j0 < g; j0 += 4) {
            int R = g - j0 < 4 ? (int)(g - j0) : 4;
            float *os[4];
            for (int j = 0; j < R; j++) os[j] = out + (b * N + h * g + j0 + j) * Dv;
            for (int64_t s = 0; s < S; s++) {
                float w[4];
                int any = 0;
                for (int j = 0; j < R; j++) any |= (w[j] = p[(j0 + j) * S + s]) != 0.0f;
                if (!any)
                    continue;
                if (R == 4)
                    axpy4(os, w, 4, vb + s * vss, Dv);
                else
                    axpy4(os, w, R, vb + s * vss, Dv);
            }
        }
    }
    free(scratch);
    return 0;
}

/* out [rows, inter] = gelu_tanh(gate) * up for gu [rows, 2 * inter] (gate then up, the fused projection's
   output). gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3):
   the same function without tanh's cancellation near 0. */
static inline float g4_gelu(float x) {
    float u = 0.7978845608028654f * (x + 0.044715f * (x * x * x));
    return x / (1.0f + g4_expf(-2.0f * u));
}

void g4_gelu_mul(const float *gu, int64_t rows, int64_t inter, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *gr = gu + r * 2 * inter, *ur = gr + inter;
        float *o = out + r * inter;
#pragma omp simd
        for (int64_t i = 0; i < inter; i++) o[i] = g4_gelu(gr[i]) * ur[i];
    }
}

/* ------------------------------------------------------------------------------ one decode step */
/* Every decoder layer of one decoded token in one call. The fast path's modules make one C call per op
   (~18 layers x 10 ops); each call costs ~5-15 us of Python and ctypes around it, ~4-5 ms of a 25 ms
   bf16 step of Gemma 3 270M on this machine. Here the layers run the same kernels in the same order
   (bit-identical to the modules' path): RMSNorm, the fused q/k/v projection, q/k norm + RoPE, writing
   the new key/value into the cache slot, attention, o_proj, residual; then the gated MLP. The layout
   of these structs is mirrored by ctypes in native.py (G4Layer). */
typedef struct {
    const void *w;         /* bf16 [N, K], int8 [N, K] or int4 codes [N, K/2] */
    const uint16_t *aux;   /* int8: bf16 row scales [N]; int4: bf16 (scale, zero) [N, K/g, 2]; bf16: NULL */
    int64_t n, k, group;   /* output rows, inputs, group size (int4; int8: 32 = fp16 block scales, 0 = row scales) */
    int64_t kind;          /* 0 bf16, 1 int8, 2 int4 */
} g4_lin;

typedef struct {
    g4_lin qkv, o, gate_up, down;
    const float *norm[4];  /* scales of input, post-attention, pre-feedforward, post-feedforward norms (NULL: none) */
    const float *qk_scale; /* [N + KH, D] */
    const float *scalar;   /* layer_scalar [1] or NULL */
    int64_t heads, kv_heads, head_dim, inter;
    float eps, qk_eps, v_eps, scale, softcap, _pad;
    /* set for every step */
    float *k_cache, *v_cache; /* [B, KH, cap, D] */
    int64_t cap, slot, keys;  /* slot: where the new key/value go; keys: leading slots attended over */
    const uint8_t *mask;      /* [B|1, keys] or NULL */
    int64_t mask_stride;
    const float *cos, *sin;   /* [B, D] */
    /* Gemma 4's E2B/E4B layers (zero / NULL where absent) */
    int64_t consumer;         /* a KV-sharing consumer: qkv projects q only; k/v_cache are its producer's, not written */
    g4_lin ple_gate, ple_proj; /* per-layer input: gate [P, H] and projection [H, P] (ple_gate.w NULL: none) */
    const float *ple_norm;    /* scale of the norm after the projection (NULL: none) */
    float ple_eps, _pad2;
    const float *ple;         /* set for every step: this layer's per-layer input rows [B, P], row stride ple_stride */
    int64_t ple_stride;
} g4_layer;

static int g4_lin_run(const g4_lin *l, const float *x, int64_t M, float *y, int nthreads) {
    switch (l->kind) {
    case 0: return g4_linear_bf16(x, 0, M, l->k, (const uint16_t *)l->w, l->n, y, 0, nthreads);
    case 1: return g4_linear_i8(x, 0, M, l->k, (const int8_t *)l->w, l->aux, l->group, l->n, y, 0, nthreads);
    default: return g4_linear_i4(x, 0, M, l->k, (const uint8_t *)l->w, l->aux, l->group, l->n, y, 0, nthreads);
    }
}

/* h [B, H] float32, updated in place through layers L[0..nl). Returns 0, or -1 when out of memory. */
int g4_decode_layers(const g4_layer *L, int64_t nl, float *h, int64_t B, int64_t H, int nthreads) {
    int64_t wq = 0, wa = 0, wi = 0, wp = 0;
    for (int64_t i = 0; i < nl; i++) {
        int64_t q = L[i].qkv.n, a = L[i].heads * L[i].head_dim, f = L[i].inter, p = L[i].ple_gate.w ? L[i].ple_gate.n : 0;
        wq = q > wq ? q : wq, wa = a > wa ? a : wa, wi = f > wi ? f : wi, wp = p > wp ? p : wp;
    }
    float *buf = malloc((size_t)B * (2 * H + wq + wa + 3 * wi + wp) * sizeof(float));
    if (!buf) return -1;
    float *x = buf, *t = x + B * H, *qkv = t + B * H, *att = qkv + B * wq, *gu = att + B * wa, *g = gu + 2 * B * wi;
    float *pg = g + B * wi;
    int rc = 0;
    for (int64_t i = 0; i < nl && !rc; i++) {
        const g4_layer *l = L + i;
        int64_t N = l->heads, KH = l->kv_heads, D = l->head_dim, ld = l->qkv.n, I = l->inter;
        g4_rmsnorm(h, B, H, l->norm[0], l->eps, x, nthreads);
        if ((rc = g4_lin_run(&l->qkv, x, B, qkv, nthreads))) break;
        /* a consumer's projection is q alone: its N heads normed and rotated, the producer's cache read as is */
        g4_qk_norm_rope(qkv, B, ld, l->consumer ? N : N + KH, l->consumer ? 0 : KH, D, l->qk_scale, l->qk_eps, l->cos,
                        l->sin, l->consumer ? -1.0f : l->v_eps);
        for (int64_t b = 0; b < B && !l->consumer; b++)
            for (int64_t j = 0; j < KH; j++) {
                int64_t at = ((b * KH + j) * l->cap + l->slot) * D;
                memcpy(l->k_cache + at, qkv + b * ld + (N + j) * D, (size_t)D * sizeof(float));
                memcpy(l->v_cache + at, qkv + b * ld + (N + KH + j) * D, (size_t)D * sizeof(float));
            }
        if ((rc = g4_attn_decode(qkv, ld, B, N, D, l->k_cache, KH * l->cap * D, l->cap * D, D, l->v_cache,
                                 KH * l->cap * D, l->cap * D, D, D, KH, l->keys, l->mask, l->mask_stride, l->scale,
                                 l->softcap, att, nthreads)))
            break;
        if ((rc = g4_lin_run(&l->o, att, B, t, nthreads))) break;
        g4_rmsnorm(t, B, H, l->norm[1], l->eps, t, nthreads); /* in place: each row's scale is summed first */
        for (int64_t e = 0; e < B * H; e++) h[e] += t[e];
        g4_rmsnorm(h, B, H, l->norm[2], l->eps, x, nthreads);
        if ((rc = g4_lin_run(&l->gate_up, x, B, gu, nthreads))) break;
        g4_gelu_mul(gu, B, I, g);
        if ((rc = g4_lin_run(&l->down, g, B, t, nthreads))) break;
        g4_rmsnorm(t, B, H, l->norm[3], l->eps, t, nthreads);
        for (int64_t e = 0; e < B * H; e++) h[e] += t[e];
        if (l->ple_gate.w) { /* h += norm(proj(gelu(gate(h)) * ple)) */
            int64_t P = l->ple_gate.n;
            if ((rc = g4_lin_run(&l->ple_gate, h, B, pg, nthreads))) break;
            for (int64_t b = 0; b < B; b++)
                for (int64_t j = 0; j < P; j++) pg[b * P + j] = g4_gelu(pg[b * P + j]) * l->ple[b * l->ple_stride + j];
            if ((rc = g4_lin_run(&l->ple_proj, pg, B, t, nthreads))) break;
            g4_rmsnorm(t, B, H, l->ple_norm, l->ple_eps, t, nthreads);
            for (int64_t e = 0; e < B * H; e++) h[e] += t[e];
        }
        if (l->scalar)
            for (int64_t e = 0; e < B * H; e++) h[e] *= l->scalar[0];
    }
    free(buf);
    return rc;
}

/* ------------------------------------------------------------------------------ training kernels */
/* The training kernels below need no bit-identity with another path (the decode kernels above do), so
   they use fused multiply-adds and, on AVX-512, 512-bit vectors (GCC prefers 256 by default): exp runs
   ~2.5x faster here than g4_expf. Same range reduction, polynomial to r^7/5040: ~2e-7 relative. */
#if defined(__FMA__) || defined(__aarch64__)
#define G4_FMA(a, b, c) fmaf(a, b, c)
#else
#define G4_FMA(a, b, c) ((a) * (b) + (c))
#endif
#ifdef __AVX512F__
#define G4_TRAIN __attribute__((target("prefer-vector-width=512")))
#else
#define G4_TRAIN
#endif

static inline float g4_expf_fma(float y) {
    y = y < -87.0f ? -87.0f : (y > 88.0f ? 88.0f : y);
    float k = rintf(y * 1.44269504088896341f);
    float r = G4_FMA(-k, 0.693145751953125f, y);
    r = G4_FMA(-k, 1.4286068203094172e-06f, r);
    float p = G4_FMA(r, 1.0f / 5040, 1.0f / 720);
    p = G4_FMA(p, r, 1.0f / 120);
    p = G4_FMA(p, r, 1.0f / 24);
    p = G4_FMA(p, r, 1.0f / 6);
    p = G4_FMA(p, r, 0.5f);
    p = G4_FMA(p, r, 1.0f);
    p = G4_FMA(p, r, 1.0f);
    union { int32_t i; float f; } s;
    s.i = ((int32_t)k + 127) << 23;
    return p * s.f;
}

/* ------------------------------------------------------------------------------ training: gated GELU */
/* y = gelu_tanh(g) * u elementwise, and its backward, for float32 (bf = 0) or bf16 (bf = 1) tensors of n
   elements. PyTorch's tanh-GELU kernel runs ~4 ns per element on one core here, and autograd adds a
   multiply and two backward multiplies, each a pass over a [tokens, intermediate] tensor: ~7 ms per layer
   of a 256-token Gemma 3 270M step. One pass each way here, over chunks converted to float32 in a stack
   buffer (so the arithmetic loops are plain float loops GCC vectorizes). Products are formed in float32 and
   rounded once (autograd under bf16 autocast rounds gelu(g), and dy * u, to bf16 first: they differ by at
   most about one bf16 ulp). */
#define G4_CHUNK 2048
/* Rows of float32 or bf16 activations to float32 and back (bf16 rounded to nearest even, as f_to_bf16;
   the vector rounding has no NaN case: these kernels make no NaN from finite inputs). On AVX-512 with
   intrinsics: GCC leaves these loops scalar inside the kernels (it cannot rule out aliasing). */
static inline void ld_chunk(const void *p, int bf, int64_t off, int64_t m, float *t) {
    if (!bf) {
        memcpy(t, (const float *)p + off, (size_t)m * sizeof(float));
        return;
    }
    const uint16_t *q = (const uint16_t *)p + off;
    int64_t i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= m; i += 16) {
        __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(q + i))), 16);
        _mm512_storeu_ps(t + i, _mm512_castsi512_ps(u));
    }
#endif
    for (; i < m; i++) t[i] = bf16_to_f(q[i]);
}

static inline void st_chunk(void *p, int bf, int64_t off, int64_t m, const float *t) {
    if (!bf) {
        memcpy((float *)p + off, t, (size_t)m * sizeof(float));
        return;
    }
    uint16_t *q = (uint16_t *)p + off;
    int64_t i = 0;
#ifdef __AVX512F__
    const __m512i half = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    for (; i + 16 <= m; i += 16) {
        __m512i u = _mm512_castps_si512(_mm512_loadu_ps(t + i));
        __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, half), _mm512_and_si512(_mm512_srli_epi32(u, 16), one));
        _mm256_storeu_si256((__m256i *)(q + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
#endif
    for (; i < m; i++) q[i] = f_to_bf16(t[i]);
}

static inline float max_f32(const float *p, int64_t n) {
    float mx = -INFINITY;
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 acc = _mm512_set1_ps(-INFINITY);
    for (; i + 16 <= n; i += 16) acc = _mm512_max_ps(acc, _mm512_loadu_ps(p + i));
    mx = _mm512_reduce_max_ps(acc);
#endif
    for (; i < n; i++) mx = p[i] > mx ? p[i] : mx;
    return mx;
}

/* sigmoid(2 v), v = sqrt(2/pi) (x + 0.044715 x^3): gelu_tanh(x) = x times this. */
static inline float g4_gelu_sig(float x) {
    float v = 0.7978845608028654f * G4_FMA(0.044715f * x, x * x, x);
    return 1.0f / (1.0f + g4_expf_fma(-2.0f * v));
}

G4_TRAIN void g4_gelu_mul_fwd(const void *g, const void *u, int64_t n, int bf, void *y, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && n >= 65536)
    for (int64_t c = 0; c < n; c += G4_CHUNK) {
        float a[G4_CHUNK], b[G4_CHUNK];
        int64_t m = n - c < G4_CHUNK ? n - c : G4_CHUNK;
        ld_chunk(g, bf, c, m, a);
        ld_chunk(u, bf, c, m, b);
        for (int64_t i = 0; i < m; i++) a[i] = a[i] * g4_gelu_sig(a[i]) * b[i];
        st_chunk(y, bf, c, m, a);
    }
}

/* d gelu_tanh(x)/dx with gelu_tanh(x) = x s, s = sigmoid(2 v), v = c (x + a x^3):
   s + 2 x s (1 - s) c (1 + 3 a x^2). */
G4_TRAIN void g4_gelu_mul_bwd(const void *g, const void *u, const void *dy, int64_t n, int bf, void *dg, void *du, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && n >= 65536)
    for (int64_t c = 0; c < n; c += G4_CHUNK) {
        float x[G4_CHUNK], up[G4_CHUNK], d[G4_CHUNK];
        int64_t m = n - c < G4_CHUNK ? n - c : G4_CHUNK;
        ld_chunk(g, bf, c, m, x);
        ld_chunk(u, bf, c, m, up);
        ld_chunk(dy, bf, c, m, d);
        for (int64_t i = 0; i < m; i++) {
            float xi = x[i], x2 = xi * xi, s = g4_gelu_sig(xi);
            float dgelu = s + 2.0f * xi * s * (1.0f - s) * 0.7978845608028654f * (1.0f + 0.134145f * x2);
            float di = d[i];
            x[i] = di * up[i] * dgelu; /* dg */
            up[i] = di * (xi * s);     /* du */
        }
        st_chunk(dg, bf, c, m, x);
        st_chunk(du, bf, c, m, up);
    }
}

/* ------------------------------------------------------------------------------ training: RMSNorm */
/* y = x * r * (w + offset) per row of d, r = 1 / sqrt(mean(x^2) + eps), for float32 (bf = 0) or bf16 rows,
   arithmetic in float32 (the model's RMSNorm upcasts too); w NULL = no scale. Also writes r [rows] for the
   backward. PyTorch spends ~9 ops forward and ~12 backward on this (upcast, square, mean, power, two
   multiplies, downcast, ...), each a pass over the activations: ~6 norms per layer. */
G4_TRAIN void g4_rmsnorm_fwd(const void *x, int64_t rows, int64_t d, int bf, const float *w, float offset, float eps, void *y,
                    float *rstd, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && rows * d >= 65536)
    {
        float *t = (float *)malloc((size_t)d * sizeof(float));
        if (t) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                ld_chunk(x, bf, r * d, d, t);
                float inv = rms_inv(t, d, eps);
                rstd[r] = inv;
                if (w)
                    for (int64_t i = 0; i < d; i++) t[i] = (t[i] * inv) * (w[i] + offset);
                else
                    for (int64_t i = 0; i < d; i++) t[i] = t[i] * inv;
                st_chunk(y, bf, r * d, d, t);
            }
            free(t);
        }
    }
}

/* Backward of g4_rmsnorm_fwd: with s = w + offset, xh = x r, g = dy s:
   dx = r (g - xh mean(g xh)), and dw [d] += sum over rows of dy xh (when dw is not NULL; float32,
   accumulated per thread then added). Returns 1 when out of memory. */
G4_TRAIN int g4_rmsnorm_bwd(const void *x, const void *dy, int64_t rows, int64_t d, int bf, const float *w, float offset,
                   const float *rstd, void *dx, float *dw, int nthreads) {
    int team = (nthreads > 1 && rows * d >= 65536) ? nthreads : 1;
    float *part = dw ? (float *)calloc((size_t)team * d, sizeof(float)) : NULL;
    int failed = dw && !part;
    if (!failed) {
#pragma omp parallel num_threads(team) if (team > 1)
        {
            float *xh = (float *)malloc(2 * (size_t)d * sizeof(float));
            float *mine = part ? part + (size_t)omp_get_thread_num() * d : NULL;
            if (!xh) {
#pragma omp atomic write
                failed = 1;
            } else {
                float *g = xh + d;
#pragma omp for schedule(static)
                for (int64_t r = 0; r < rows; r++) {
                    float inv = rstd[r];
                    ld_chunk(x, bf, r * d, d, xh);
                    ld_chunk(dy, bf, r * d, d, g);
                    for (int64_t i = 0; i < d; i++) xh[i] *= inv;
                    if (mine)
                        for (int64_t i = 0; i < d; i++) mine[i] += g[i] * xh[i];
                    if (w)
                        for (int64_t i = 0; i < d; i++) g[i] *= w[i] + offset;
                    float m = dot_f32(g, xh, d) / (float)d;
                    for (int64_t i = 0; i < d; i++) g[i] = inv * (g[i] - xh[i] * m);
                    st_chunk(dx, bf, r * d, d, g);
                }
                free(xh);
            }
        }
    }
    if (part && !failed)
        for (int t = 0; t < team; t++)
            for (int64_t i = 0; i < d; i++) dw[i] += part[(size_t)t * d + i];
    free(part);
    return failed;
}

/* ------------------------------------------------------------------------------ training: cross-entropy */
/* One [c, nb] vocabulary block of the fused linear cross-entropy's online softmax (gemma4.train.loss):
   x is the block's matmul output in the compute dtype (xbf: bf16), or with a soft-cap (cap > 0) already
   tanh(x / cap), whose logits are cap * x rounded to the compute dtype (the model's rounding). Per row r:
   the running max m[r] and sum ssum[r] of exp(logit - m) are updated, scale[r] = exp(m_old - m_new)
   (0 for the first block, m = -inf) is written for the caller's accumulator, and when e is not NULL
   e = exp(logit - m_new), times the cap's derivative 1 - x^2 with a cap, is written (ebf: bf16): the
   block's unnormalized dL/dlogits. One pass over the tile instead of PyTorch's six to eight (widen,
   max, subtract, exp, sum, cap derivative, narrow). */
G4_TRAIN void g4_ce_block(const void *x, int xbf, int64_t c, int64_t nb, float cap, float *m, float *ssum, float *scale,
                 void *e, int ebf, int nthreads) {
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && c * nb >= 65536)
    {
        float *t = (float *)malloc(2 * (size_t)nb * sizeof(float));
        if (t) {
            float *p = t + nb;
#pragma omp for schedule(static)
            for (int64_t r = 0; r < c; r++) {
                ld_chunk(x, xbf, r * nb, nb, t);
                if (cap > 0.0f) {
                    if (xbf)
                        for (int64_t i = 0; i < nb; i++) p[i] = bf16_to_f(f_to_bf16(cap * t[i]));
                    else
                        for (int64_t i = 0; i < nb; i++) p[i] = cap * t[i];
                } else
                    memcpy(p, t, (size_t)nb * sizeof(float));
                float mx = max_f32(p, nb);
                float mo = m[r], mn = mo > mx ? mo : mx;
                float sc = mo == -INFINITY ? 0.0f : g4_expf_fma(mo - mn);
                for (int64_t i = 0; i < nb; i++) p[i] = g4_expf_fma(p[i] - mn);
                ssum[r] = ssum[r] * sc + sum_f32(p, nb);
                m[r] = mn;
                scale[r] = sc;
                if (e) {
                    if (cap > 0.0f)
                        for (int64_t i = 0; i < nb; i++) p[i] = p[i] * (1.0f - t[i] * t[i]);
                    st_chunk(e, ebf, r * nb, nb, p);
                }
            }
            free(t);
        }
    }
}
