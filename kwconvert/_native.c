/*
 * kwconvert's compiled kernel: every sample's convolution as one matrix product that reads
 * the assembled kernels where the assembly left them (kwconvert/native.py explains the
 * layout and keeps the pure-PyTorch fallback).
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
 * Built at install time with the machine's compiler (setup.py, optional: without it the
 * pure-PyTorch path runs).  AVX-512 register tiles of up to 6 rows x 64 columns when the
 * compiler targets AVX-512; a plain C loop otherwise.
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

#define MAX_ROWS 6
#ifndef BLOCK_BYTES
#define BLOCK_BYTES (256 * 1024)
#endif /* W panel bytes above which K is walked in chunks */
#ifndef CHUNK_ROWS
#define CHUNK_ROWS 256
#endif
#define MAX_SEGMENTS 1024

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

#define TILE_CASE(R, NV) case (R) * 8 + (NV): \
    tile(R, NV, first, A, lda, panels, g0, g1, seg_len, q0, q1, NP, C, ldc, bias); break;
#define TILE_ROWS(NV) TILE_CASE(1, NV) TILE_CASE(2, NV) TILE_CASE(3, NV) TILE_CASE(4, NV) \
    TILE_CASE(5, NV) TILE_CASE(6, NV)

static void run_tile(int R, int first, const float *A, long lda, const float *const *panels, int g0, int g1,
                     int seg_len, int q0, int q1, int NP, float *C, long ldc, const float *bias)
{
    switch (R * 8 + NP / 16) {
        TILE_ROWS(1) TILE_ROWS(2) TILE_ROWS(4)
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
 * Work items of samples x panels (item = b * num_panels + P), on `threads` OpenMP threads
 * (the runtime torch loaded, when this library is loaded after torch: it asks for libgomp.so.1,
 * which the loader finds already mapped, so no second thread pool spins beside torch's):
 * C[b] (rows x O, row stride ldc) = A[b] (rows x K, row stride lda) @ W_b^T (+ bias),
 * panel P's columns.  offsets[P * segments + g] locate W_b^T's blocks as described above.
 * Returns 0, or -1 for an unsupported panel width (NP must be 16, 32 or 64) or too many segments.
 */
int kw_native_conv(const float *A, long a_sample, long lda, const float *W, long w_sample, const int64_t *offsets,
                   int num_panels, int segments, int seg_len, int NP, float *C, long c_sample, long ldc,
                   const float *bias, int rows, long items, int threads)
{
    if ((NP != 16 && NP != 32 && NP != 64) || segments > MAX_SEGMENTS)
        return -1;
    const int whole = (long)segments * seg_len * NP * (long)sizeof(float) <= BLOCK_BYTES;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; item++) {
        const float *panels[MAX_SEGMENTS];
        const long b = item / num_panels;
        const int P = (int)(item % num_panels);
        const float *a_b = A + b * a_sample;
        for (int g = 0; g < segments; g++)
            panels[g] = W + b * w_sample + offsets[(long)P * segments + g];
        const float *bias_p = bias ? bias + (long)P * NP : NULL;
        float *c_p = C + b * c_sample + (long)P * NP;
        if (whole) {  /* the panel stays in cache: keep each row tile in registers over all of K */
            for (int r0 = 0, R; r0 < rows; r0 += R) {
                R = tile_rows(rows, r0);
                run_tile(R, 1, a_b + (long)r0 * lda, lda, panels, 0, segments, seg_len, 0, seg_len, NP,
                         c_p + (long)r0 * ldc, ldc, bias_p);
            }
            continue;
        }
        for (int g = 0; g < segments; g++)  /* a big panel: chunks of K, every row tile per chunk */
            for (int q0 = 0; q0 < seg_len; q0 += CHUNK_ROWS) {
                int q1 = q0 + CHUNK_ROWS < seg_len ? q0 + CHUNK_ROWS : seg_len;
                for (int r0 = 0; r0 < rows; r0 += MAX_ROWS) {
                    int R = rows - r0 < MAX_ROWS ? rows - r0 : MAX_ROWS;
                    run_tile(R, g == 0 && q0 == 0, a_b + (long)r0 * lda, lda, panels, g, g + 1, seg_len, q0, q1,
                             NP, c_p + (long)r0 * ldc, ldc, bias_p);
                }
            }
    }
    return 0;
}

/* Importable as a module too (setuptools builds it as one); kwconvert/native.py loads it with ctypes. */
static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native",
                                           "kwconvert's compiled per-sample convolution (use kwconvert.native)",
                                           -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&native_module); }
