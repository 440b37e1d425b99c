/*
 * The register tiles of kw_native_conv and of the assembly, written once for every vector width: _native.c
 * defines TILE_NAME, TILE_VEC, TILE_WIDTH (floats per vector), TILE_MAX_VECTORS, the
 * TILE_* intrinsics and the panels' element type TILE_WTYPE with its TILE_WLOAD (float32, or
 * float16 converted on load: a half-size warehouse copy, which only the assembly reads, so its copies
 * define TILE_RUNS_ONLY), then includes this file (C's stand-in for a template).  It undefines the
 * four that vary per copy; _native.c the rest.
 *
 * C[r, col + j] (+)= sum over segments g in [g0, g1), rows q in [q0, q1) of
 * A[r, g * seg_len + q] * panels[g][q * ldw + col + j] (ldw: the panels' row stride, NP where
 * they are packed), for R rows and NV vectors of columns;
 * first: the sums start from the bias (or 0) instead of C.  TILE_NAME##_run, below, runs
 * short ones back to back.
 */
#ifndef TILE_RUNS_ONLY
static inline __attribute__((always_inline)) void TILE_NAME(
    const int R, const int NV, int first, const float *A, long lda, const TILE_WTYPE *const *panels, int g0, int g1,
    int seg_len, int q0, int q1, int NP, long ldw, int col, float *C, long ldc, const float *bias)
{
    TILE_VEC acc[MAX_ROWS][TILE_MAX_VECTORS];
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++)
            acc[r][v] = first ? (bias ? TILE_LOAD(bias + col + TILE_WIDTH * v) : TILE_ZERO())
                              : TILE_LOAD(C + r * ldc + col + TILE_WIDTH * v);
    for (int g = g0; g < g1; g++) {
        const TILE_WTYPE *w = panels[g] + (long)q0 * ldw + col;
        const float *a = A + (long)g * seg_len;
        for (int q = q0; q < q1; q++, w += ldw) {
            TILE_VEC wv[TILE_MAX_VECTORS];
            for (int v = 0; v < NV; v++)
                wv[v] = TILE_WLOAD(w + TILE_WIDTH * v);
            for (int r = 0; r < R; r++) {
                const TILE_VEC x = TILE_SET1(a[r * lda + q]);
                for (int v = 0; v < NV; v++)
                    acc[r][v] = TILE_FMA(x, wv[v], acc[r][v]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < NV; v++)
            TILE_STORE(C + r * ldc + col + TILE_WIDTH * v, acc[r][v]);
}
#endif

/*
 * A run of short tiles, TILE_NAME##_run: for each of `count` tiles t, out_t[r, col + j] (+)= sum over
 * k < n of alpha_t[r * lda + k * ak] * w_t[k * ldw + col + j], for R rows and NV vectors of columns, where
 * alpha_t = alpha + t * a_step, w_t = w + t * w_step and out_t = out + t * out_step (rows ldo apart);
 * add: the sums start from out_t instead of 0.  The assembly (alpha fixed, a block of the warehouse
 * per tile) and the inline weight gradient's short products (n = the samples or the output pixels)
 * have only 9-64 multiply-adds per sum: a call per tile (run_tile's) spent a fifth of the time setting
 * up and draining it (one Zen 4 core, 6 x 64 tiles at n = 27: 40 G multiply-adds/s that way, 48-51
 * with the loop over tiles inside; resnet18's layer4 "inline" at batch 16 0.95x the time, the 28 x 28
 * net's layers in training 0.96-0.97x, mobilenet_v2's last 1x1 layers 0.92-0.98x, bit-identical).
 */
static inline __attribute__((always_inline)) void KW_CAT(TILE_NAME, _run)(
    const int R, const int NV, int add, const float *alpha, long lda, long ak, long a_step, int n, const TILE_WTYPE *w,
    long w_step, long ldw, int count, int col, float *out, long out_step, long ldo)
{
    for (int t = 0; t < count; t++, alpha += a_step, w += w_step, out += out_step) {
        TILE_VEC acc[MAX_ROWS][TILE_MAX_VECTORS];
        for (int r = 0; r < R; r++)
            for (int v = 0; v < NV; v++)
                acc[r][v] = add ? TILE_LOAD(out + r * ldo + col + TILE_WIDTH * v) : TILE_ZERO();
        const TILE_WTYPE *row = w + col;
        for (int k = 0; k < n; k++, row += ldw) {
            TILE_VEC wv[TILE_MAX_VECTORS];
            for (int v = 0; v < NV; v++)
                wv[v] = TILE_WLOAD(row + TILE_WIDTH * v);
            for (int r = 0; r < R; r++) {
                const TILE_VEC x = TILE_SET1(alpha[r * lda + k * ak]);
                for (int v = 0; v < NV; v++)
                    acc[r][v] = TILE_FMA(x, wv[v], acc[r][v]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int v = 0; v < NV; v++)
                TILE_STORE(out + r * ldo + col + TILE_WIDTH * v, acc[r][v]);
    }
}

#undef TILE_NAME
#undef TILE_WTYPE
#undef TILE_WLOAD
#undef TILE_RUNS_ONLY
