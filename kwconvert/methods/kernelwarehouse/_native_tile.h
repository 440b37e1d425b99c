/*
 * One register tile of kw_native_conv, written once for every vector width: _native.c
 * defines TILE_NAME, TILE_VEC, TILE_WIDTH (floats per vector), TILE_MAX_VECTORS, the
 * TILE_* intrinsics and the panels' element type TILE_WTYPE with its TILE_WLOAD (float32, or
 * float16 converted on load: a half-size warehouse copy), then includes this file (C's
 * stand-in for a template).  It undefines the three that vary per copy; _native.c the rest.
 *
 * C[r, col + j] (+)= sum over segments g in [g0, g1), rows q in [q0, q1) of
 * A[r, g * seg_len + q] * panels[g][q * ldw + col + j] (ldw: the panels' row stride, NP where
 * they are packed), for R rows and NV vectors of columns;
 * first: the sums start from the bias (or 0) instead of C.
 */
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

#undef TILE_NAME
#undef TILE_WTYPE
#undef TILE_WLOAD
