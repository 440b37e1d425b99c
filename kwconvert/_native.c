/*
 * kwconvert's compiled kernels for inference: every sample's convolution reads its kernel
 * where the assembly left it (kwconvert/native.py explains the layout; without this library
 * kwconvert/fast.py's pure-PyTorch paths run).
 *
 * For sample b, C_b (HW x O) = A_b (HW x K) @ W_b^T.  A_b is the NHWC im2col of the input
 * (K ordered by kernel position, input block, channel in block).  W_b^T is never stored
 * as one matrix: K falls into segments of `seg_len` rows (one input block at one kernel
 * position, i.e. one cell's input channels), and for output panel P (NP channels) and
 * segment g the rows W_b^T[g*seg_len : (g+1)*seg_len, P*NP : (P+1)*NP] lie contiguously,
 * row-major with row stride NP, at W + b*w_sample + offsets[P*G + g].  The assembly
 * writes them that way because the warehouse is packed with its cells' elements in that
 * order.  So the product needs neither the per-sample weight reorder of a library GEMM
 * nor a copy into OHWI order.
 *
 * Depthwise layers (kw_native_depthwise, below) need no table: their blocks already are
 * each sample's (kernel position, channel) taps.
 *
 * Built at install time with the machine's compiler (setup.py, optional).  AVX-512 register
 * tiles of up to 6 rows x 64 columns when the compiler targets AVX-512 (6 rows x 8 columns for
 * panels of 8); plain C loops otherwise.
 */
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define KW_AVX512 1
#else
#define KW_AVX512 0
#endif

#define MAX_ROWS 6                 /* rows of a register tile */
#define BLOCK_BYTES (256 * 1024)   /* kernel bytes that stay in cache across row tiles */
#define ROWS_PER_ITEM 48           /* rows per work item when all of W_b stays in cache */
#define CHUNK_ROWS 256             /* K rows per chunk when a panel does not */
#define MAX_SEGMENTS 1024          /* as native.py's _MAX_SEGMENTS */

int kw_native_avx512(void) { return KW_AVX512; }

/* Row tiles of near-equal height (49 rows: 6,6,6,6,5,5,5,5,5, not eight of 6 and a slow one of 1). */
static inline int tile_rows(int rows, int r0)
{
    int tiles = (rows + MAX_ROWS - 1) / MAX_ROWS, base = rows / tiles, extra = rows % tiles;
    /* the first `extra` tiles get base + 1 rows */
    int index = r0 < extra * (base + 1) ? r0 / (base + 1) : extra + (r0 - extra * (base + 1)) / base;
    return index < extra ? base + 1 : base;
}

#if KW_AVX512
/* acc (R x NV vectors) over segments [g0, g1), rows [q0, q1) of each; first: start from bias or 0. */
static inline __attribute__((always_inline)) void tile(
    const int R, const int NV, int first, const float *A, long lda, const float *const *panels, int g0, int g1,
    int seg_len, int q0, int q1, int NP, float *C, long ldc, const float *bias)
{
    __m512 acc[MAX_ROWS][4];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++)
            acc[r][v] = first ? (bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps())
                              : _mm512_loadu_ps(C + r * ldc + 16 * v);
    for (int g = g0; g < g1; g++) {
        const float *w = panels[g] + (long)q0 * NP;
        const float *a = A + (long)g * seg_len;
        for (int q = q0; q < q1; q++, w += NP) {
            __m512 wv[4];
            for (int v = 0; v < NV; v++)
                wv[v] = _mm512_loadu_ps(w + 16 * v);
            for (int r = 0; r < R; r++) {
                __m512 x = _mm512_set1_ps(a[r * lda + q]);
                for (int v = 0; v < NV; v++)
                    acc[r][v] = _mm512_fmadd_ps(x, wv[v], acc[r][v]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++)
            _mm512_storeu_ps(C + r * ldc + 16 * v, acc[r][v]);
}

/* The same for panels of 8 channels (cells of f_e = 8, mobilenet_v2's early layers): 256-bit vectors. */
static inline __attribute__((always_inline)) void tile8(
    const int R, int first, const float *A, long lda, const float *const *panels, int g0, int g1, int seg_len,
    int q0, int q1, float *C, long ldc, const float *bias)
{
    __m256 acc[MAX_ROWS];
    for (int r = 0; r < R; r++)
        acc[r] = first ? (bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps()) : _mm256_loadu_ps(C + r * ldc);
    for (int g = g0; g < g1; g++) {
        const float *w = panels[g] + (long)q0 * 8;
        const float *a = A + (long)g * seg_len;
        for (int q = q0; q < q1; q++, w += 8) {
            __m256 wv = _mm256_loadu_ps(w);
            for (int r = 0; r < R; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(a[r * lda + q]), wv, acc[r]);
        }
    }
    for (int r = 0; r < R; r++)
        _mm256_storeu_ps(C + r * ldc, acc[r]);
}

#define TILE_CASE(R, NV) case (R) * 8 + (NV): \
    tile(R, NV, first, A, lda, panels, g0, g1, seg_len, q0, q1, NP, C, ldc, bias); break;
#define TILE_ROWS(NV) TILE_CASE(1, NV) TILE_CASE(2, NV) TILE_CASE(3, NV) TILE_CASE(4, NV) \
    TILE_CASE(5, NV) TILE_CASE(6, NV)

#define TILE8_CASE(R) case (R) * 8: tile8(R, first, A, lda, panels, g0, g1, seg_len, q0, q1, C, ldc, bias); break;

static void run_tile(int R, int first, const float *A, long lda, const float *const *panels, int g0, int g1,
                     int seg_len, int q0, int q1, int NP, float *C, long ldc, const float *bias)
{
    switch (R * 8 + NP / 16) {
        TILE_ROWS(1) TILE_ROWS(2) TILE_ROWS(4)
        TILE8_CASE(1) TILE8_CASE(2) TILE8_CASE(3) TILE8_CASE(4) TILE8_CASE(5) TILE8_CASE(6)
        default: break;
    }
}
#else
static void run_tile(int R, int first, const float *A, long lda, const float *const *panels, int g0, int g1,
                     int seg_len, int q0, int q1, int NP, float *C, long ldc, const float *bias)
{
    for (int r = 0; r < R; r++) {
        float *c = C + r * ldc;
        if (first)
            for (int j = 0; j < NP; j++)
                c[j] = bias ? bias[j] : 0.0f;
        for (int g = g0; g < g1; g++)
            for (int q = q0; q < q1; q++) {
                const float x = A[r * lda + (long)g * seg_len + q];
                const float *w = panels[g] + (long)q * NP;
                for (int j = 0; j < NP; j++)
                    c[j] += x * w[j];
            }
    }
}
#endif

/*
 * C[b] (rows x O, row stride ldc) = A[b] (rows x K, row stride lda) @ W_b^T (+ bias) for every
 * sample b < batch; offsets[P * segments + g] locate W_b^T's blocks as described above.
 * Three walks, by how much of W_b^T fits in cache (the per-core L2 here is 1 MB):
 *  - all of it (small K x O, e.g. 1x1 layers on large maps): row tiles outside, panels
 *    inside, so each output row is written whole (items: sample x chunk of rows);
 *  - one panel (K x NP): each row tile keeps its sums in registers over all of K;
 *  - less: K in chunks of CHUNK_ROWS, every row tile per chunk (items: sample x panel).
 * Items run on `threads` OpenMP threads (the runtime torch loaded, when this library is loaded
 * after torch: it asks for libgomp.so.1, which the loader finds already mapped, so no second
 * thread pool spins beside torch's).  Returns 0, or -1 for an unsupported panel width (NP
 * must be 8, 16, 32 or 64) or too many segments.
 */
int kw_native_conv(const float *A, long a_sample, long lda, const float *W, long w_sample, const int64_t *offsets,
                   int num_panels, int segments, int seg_len, int NP, float *C, long c_sample, long ldc,
                   const float *bias, int rows, int batch, int threads)
{
    if ((NP != 8 && NP != 16 && NP != 32 && NP != 64) || segments > MAX_SEGMENTS)
        return -1;
    const long panel_bytes = (long)segments * seg_len * NP * (long)sizeof(float);
    const int rows_outside = panel_bytes * num_panels <= BLOCK_BYTES;
    const int chunks = rows_outside ? (rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM : num_panels;
    const long items = (long)batch * chunks;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; item++) {
        const float *panels[MAX_SEGMENTS];
        const long b = item / chunks;
        const int chunk = (int)(item % chunks);
        const float *a_b = A + b * a_sample;
        float *c_b = C + b * c_sample;
        if (rows_outside) {
            const int first = chunk * ROWS_PER_ITEM;
            const int count = rows - first < ROWS_PER_ITEM ? rows - first : ROWS_PER_ITEM;
            for (int r0 = 0, R; r0 < count; r0 += R) {
                R = tile_rows(count, r0);
                for (int P = 0; P < num_panels; P++) {
                    for (int g = 0; g < segments; g++)
                        panels[g] = W + b * w_sample + offsets[(long)P * segments + g];
                    run_tile(R, 1, a_b + (long)(first + r0) * lda, lda, panels, 0, segments, seg_len, 0, seg_len,
                             NP, c_b + (long)(first + r0) * ldc + (long)P * NP, ldc, bias ? bias + (long)P * NP : NULL);
                }
            }
            continue;
        }
        const int P = chunk;
        for (int g = 0; g < segments; g++)
            panels[g] = W + b * w_sample + offsets[(long)P * segments + g];
        const float *bias_p = bias ? bias + (long)P * NP : NULL;
        float *c_p = c_b + (long)P * NP;
        if (panel_bytes <= BLOCK_BYTES) {
            for (int r0 = 0, R; r0 < rows; r0 += R) {
                R = tile_rows(rows, r0);
                run_tile(R, 1, a_b + (long)r0 * lda, lda, panels, 0, segments, seg_len, 0, seg_len, NP,
                         c_p + (long)r0 * ldc, ldc, bias_p);
            }
            continue;
        }
        for (int g = 0; g < segments; g++)
            for (int q0 = 0; q0 < seg_len; q0 += CHUNK_ROWS) {
                const int q1 = q0 + CHUNK_ROWS < seg_len ? q0 + CHUNK_ROWS : seg_len;
                for (int r0 = 0, R; r0 < rows; r0 += R) {
                    R = tile_rows(rows, r0);
                    run_tile(R, g == 0 && q0 == 0, a_b + (long)r0 * lda, lda, panels, g, g + 1, seg_len, q0, q1,
                             NP, c_p + (long)r0 * ldc, ldc, bias_p);
                }
            }
    }
    return 0;
}

/*
 * Depthwise convolution (groups = C_in = C_out), each sample with its own kernel, channels-last:
 * Y[b] (OH x OW x C) from X[b] (H x W x C) and the sample's kernel K_b (kh*kw x C) at
 * Kw + b * k_sample -- the order the assembly leaves a depthwise layer's blocks in (kernel
 * position, then channel), so again nothing is re-ordered.  Zero padding (top, left given;
 * the rest follows from OH, OW).  Items are (sample, output row) pairs on `threads` threads.
 */
#define DW_PIXELS 8
#define MAX_TAPS 64

typedef struct {
    const float *x;   /* the sample's input, (H, W, C) */
    const float *k;   /* the sample's kernel, (kh * kw, C) */
    const float *bias;
    float *y;         /* the output row, (OW, C) */
    int H, W, C, OW, oh, kh, kw, sh, sw, pt, pl, dh, dw;
} dw_row;

#if KW_AVX512
/* Masked loads and stores only for the last, partial vector of channels: masked stores are
 * slow on some AVX-512 machines (AMD's), which made the kernel 4x slower when every access was masked. */
#define DW_LOAD(p) (FULL ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask, p))
#define DW_STORE(p, v) (FULL ? _mm512_storeu_ps(p, v) : _mm512_mask_storeu_ps(p, mask, v))

/* Output pixels [ow0, ow1) of one row for channels [c0, c0 + 16), checking bounds per tap. */
static inline __attribute__((always_inline)) void dw_edge(const int FULL, const dw_row *r, int c0, __mmask16 mask,
                                                          const __m512 *taps, __m512 start, int ow0, int ow1)
{
    for (int ow = ow0; ow < ow1; ow++) {
        __m512 acc = start;
        for (int i = 0; i < r->kh; i++) {
            const int ih = r->oh * r->sh - r->pt + i * r->dh;
            if (ih < 0 || ih >= r->H)
                continue;
            for (int j = 0; j < r->kw; j++) {
                const int iw = ow * r->sw - r->pl + j * r->dw;
                if (iw >= 0 && iw < r->W)
                    acc = _mm512_fmadd_ps(DW_LOAD(r->x + ((long)ih * r->W + iw) * r->C + c0), taps[i * r->kw + j],
                                          acc);
            }
        }
        DW_STORE(r->y + (long)ow * r->C + c0, acc);
    }
}

/* Interior pixels [ow0, ow1): no bounds to check across the row, DW_PIXELS independent sums at a time. */
static inline __attribute__((always_inline)) void dw_interior(const int FULL, const dw_row *r, int c0,
                                                              __mmask16 mask, const __m512 *taps, __m512 start,
                                                              int ow0, int ow1)
{
    int ow = ow0;
    const long step = (long)r->sw * r->C;
    for (; ow + DW_PIXELS <= ow1; ow += DW_PIXELS) {
        __m512 acc[DW_PIXELS];
        for (int u = 0; u < DW_PIXELS; u++)
            acc[u] = start;
        for (int i = 0; i < r->kh; i++) {
            const int ih = r->oh * r->sh - r->pt + i * r->dh;
            if (ih < 0 || ih >= r->H)
                continue;
            for (int j = 0; j < r->kw; j++) {
                const float *x = r->x + ((long)ih * r->W + ow * r->sw - r->pl + j * r->dw) * r->C + c0;
                const __m512 tap = taps[i * r->kw + j];
                for (int u = 0; u < DW_PIXELS; u++)
                    acc[u] = _mm512_fmadd_ps(DW_LOAD(x + u * step), tap, acc[u]);
            }
        }
        for (int u = 0; u < DW_PIXELS; u++)
            DW_STORE(r->y + (long)(ow + u) * r->C + c0, acc[u]);
    }
    dw_edge(FULL, r, c0, mask, taps, start, ow, ow1);
}

static void dw_compute_row(const dw_row *r)
{
    /* the pixels whose every tap lies inside the row: ow * sw - pl >= 0, ow * sw - pl + (kw - 1) * dw < W */
    int lo = (r->pl + r->sw - 1) / r->sw;
    int hi = (r->W - 1 - (r->kw - 1) * r->dw + r->pl) / r->sw + 1;
    if (r->W - 1 - (r->kw - 1) * r->dw + r->pl < 0)
        hi = 0;
    lo = lo < r->OW ? lo : r->OW;
    hi = hi < lo ? lo : (hi > r->OW ? r->OW : hi);
    __m512 taps[MAX_TAPS];
    for (int c0 = 0; c0 < r->C; c0 += 16) {
        const __mmask16 mask = r->C - c0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (r->C - c0)) - 1);
        for (int s = 0; s < r->kh * r->kw; s++)
            taps[s] = _mm512_maskz_loadu_ps(mask, r->k + (long)s * r->C + c0);
        const __m512 start = r->bias ? _mm512_maskz_loadu_ps(mask, r->bias + c0) : _mm512_setzero_ps();
        if (mask == (__mmask16)0xFFFF) {
            dw_edge(1, r, c0, mask, taps, start, 0, lo);
            dw_interior(1, r, c0, mask, taps, start, lo, hi);
            dw_edge(1, r, c0, mask, taps, start, hi, r->OW);
        } else {
            dw_edge(0, r, c0, mask, taps, start, 0, lo);
            dw_interior(0, r, c0, mask, taps, start, lo, hi);
            dw_edge(0, r, c0, mask, taps, start, hi, r->OW);
        }
    }
}
#else
static void dw_compute_row(const dw_row *r)
{
    for (int ow = 0; ow < r->OW; ow++) {
        float *y = r->y + (long)ow * r->C;
        for (int c = 0; c < r->C; c++)
            y[c] = r->bias ? r->bias[c] : 0.0f;
        for (int i = 0; i < r->kh; i++) {
            const int ih = r->oh * r->sh - r->pt + i * r->dh;
            if (ih < 0 || ih >= r->H)
                continue;
            for (int j = 0; j < r->kw; j++) {
                const int iw = ow * r->sw - r->pl + j * r->dw;
                if (iw < 0 || iw >= r->W)
                    continue;
                const float *x = r->x + ((long)ih * r->W + iw) * r->C;
                const float *k = r->k + (long)(i * r->kw + j) * r->C;
                for (int c = 0; c < r->C; c++)
                    y[c] += x[c] * k[c];
            }
        }
    }
}
#endif

int kw_native_depthwise(const float *X, int H, int W, int C, const float *Kw, long k_sample, const float *bias,
                        float *Y, int OH, int OW, int kh, int kw, int sh, int sw, int pt, int pl, int dh, int dw,
                        int batch, int threads)
{
    if (kh * kw > MAX_TAPS)
        return -1;
    const long items = (long)batch * OH;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; item++) {
        const long b = item / OH;
        const int oh = (int)(item % OH);
        const dw_row row = {X + b * (long)H * W * C, Kw + b * k_sample, bias, Y + (b * (long)OH + oh) * OW * C,
                            H, W, C, OW, oh, kh, kw, sh, sw, pt, pl, dh, dw};
        dw_compute_row(&row);
    }
    return 0;
}

/* Importable as a module too (setuptools builds it as one); kwconvert/native.py loads it with ctypes. */
static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native",
                                           "kwconvert's compiled per-sample convolution (use kwconvert.native)",
                                           -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
