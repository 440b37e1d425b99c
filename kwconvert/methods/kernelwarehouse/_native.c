/*
 * kwconvert's compiled kernels for inference: every sample's convolution reads its kernel
 * where the assembly left it (native.py explains the layout; without this library
 * paths.py, the pure-PyTorch paths, run).
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
 * Built at install time, once per instruction set (setup.py; each copy optional): AVX-512
 * register tiles of up to 6 rows x 64 columns, AVX2 + FMA tiles of 6 rows x 16 columns, and
 * plain C loops for any other CPU.  native.py picks at run time the best copy the
 * CPU can execute, so one build runs on every x86-64 CPU.
 */
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Which instructions this copy may use: setup.py builds the file once per ISA (flags per
 * object, none naming the build machine's CPU) and native.py loads the best one the CPU runs. */
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define KW_ISA "avx512"
#define KW_VECTOR 512
#elif defined(__AVX2__) && defined(__FMA__)
#define KW_ISA "avx2"
#define KW_VECTOR 256
#else
#define KW_ISA "baseline"
#define KW_VECTOR 0
#endif
#if KW_VECTOR
#include <immintrin.h>
#endif

#define MAX_ROWS 6                 /* rows of a register tile */
#define BLOCK_BYTES (256 * 1024)   /* kernel bytes that stay in cache across row tiles */
#define ROWS_PER_ITEM 48           /* rows per work item when all of W_b stays in cache */
#define MAX_SEGMENTS 1024          /* as native.py's _MAX_SEGMENTS */

const char *kw_native_isa(void) { return KW_ISA; }

/* The panel widths the tiles take: 8, 16, 32 or 64 columns. */
static inline int is_panel_width(int NP) { return NP == 8 || NP == 16 || NP == 32 || NP == 64; }

/* Row tiles of near-equal height (49 rows: 6,6,6,6,5,5,5,5,5, not eight of 6 and a slow one of 1). */
static inline int tile_rows(int rows, int r0)
{
    int tiles = (rows + MAX_ROWS - 1) / MAX_ROWS, base = rows / tiles, extra = rows % tiles;
    /* the first `extra` tiles get base + 1 rows */
    int index = r0 < extra * (base + 1) ? r0 / (base + 1) : extra + (r0 - extra * (base + 1)) / base;
    return index < extra ? base + 1 : base;
}

#define KW_CAT2(a, b) a##b
#define KW_CAT(a, b) KW_CAT2(a, b)

/* Register tiles, one per vector width: acc (R rows x NV vectors) over segments [g0, g1), rows
 * [q0, q1) of each, for the panel columns [col, col + NV * width); first: start from bias or 0. */
#if KW_VECTOR >= 256
#define TILE_VEC __m256
#define TILE_WIDTH 8
#define TILE_MAX_VECTORS 2         /* 6 x 2 sums + 2 weights + 1 broadcast: 15 of 16 registers */
#define TILE_LOAD _mm256_loadu_ps
#define TILE_STORE _mm256_storeu_ps
#define TILE_SET1 _mm256_set1_ps
#define TILE_ZERO _mm256_setzero_ps
#define TILE_FMA _mm256_fmadd_ps
#define TILE_NAME tile256
#define TILE_WTYPE float
#define TILE_WLOAD _mm256_loadu_ps
#include "_native_tile.h"
#define TILE_NAME tile256h
#define TILE_RUNS_ONLY
#define TILE_WTYPE uint16_t
#define TILE_WLOAD(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#include "_native_tile.h"
#undef TILE_VEC
#undef TILE_WIDTH
#undef TILE_MAX_VECTORS
#undef TILE_LOAD
#undef TILE_STORE
#undef TILE_SET1
#undef TILE_ZERO
#undef TILE_FMA
#endif
#if KW_VECTOR >= 512
#define TILE_VEC __m512
#define TILE_WIDTH 16
#define TILE_MAX_VECTORS 4         /* 6 x 4 sums + 4 weights of 32 registers */
#define TILE_LOAD _mm512_loadu_ps
#define TILE_STORE _mm512_storeu_ps
#define TILE_SET1 _mm512_set1_ps
#define TILE_ZERO _mm512_setzero_ps
#define TILE_FMA _mm512_fmadd_ps
#define TILE_NAME tile512
#define TILE_WTYPE float
#define TILE_WLOAD _mm512_loadu_ps
#include "_native_tile.h"
#define TILE_NAME tile512h
#define TILE_RUNS_ONLY
#define TILE_WTYPE uint16_t
#define TILE_WLOAD(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#include "_native_tile.h"
#endif

#define TILE_CASE(NAME, R, NV) case (R) * 8 + (NV): \
    NAME(R, NV, first, A, lda, panels, g0, g1, seg_len, q0, q1, NP, ldw, col, C, ldc, bias); break;
#define TILE_ROWS(NAME, NV) TILE_CASE(NAME, 1, NV) TILE_CASE(NAME, 2, NV) TILE_CASE(NAME, 3, NV) \
    TILE_CASE(NAME, 4, NV) TILE_CASE(NAME, 5, NV) TILE_CASE(NAME, 6, NV)

/* The vector tiles' dispatch for R rows of one panel, NP columns: ROWS(NAME, NV) expands one case per
 * row count of the tiles tile512##SUFFIX / tile256##SUFFIX (SUFFIX: empty for run_tile's, _run for the
 * runs on float32, h_run on float16): AVX-512 tiles of up to 64 columns, else AVX2 tiles of 8 or 16
 * across the panel. */
#if KW_VECTOR >= 512
#define WIDE_TILES(ROWS, SUFFIX)                                                                                \
    if (NP >= 16) {                                                                                             \
        const int col = 0;                                                                                      \
        switch (R * 8 + NP / 16) { ROWS(tile512##SUFFIX, 1) ROWS(tile512##SUFFIX, 2) ROWS(tile512##SUFFIX, 4)   \
                                   default: break; }                                                            \
        return;                                                                                                 \
    }
#else
#define WIDE_TILES(ROWS, SUFFIX)
#endif
#define NARROW_TILES(ROWS, SUFFIX)                                                                              \
    const int NV = NP == 8 ? 1 : 2;                                                                             \
    for (int col = 0; col < NP; col += 8 * NV)                                                                  \
        switch (R * 8 + NV) { ROWS(tile256##SUFFIX, 1) ROWS(tile256##SUFFIX, 2) default: break; }

/* R rows of one panel (NP = 8, 16, 32 or 64 columns) in the widest tiles that fit in registers. */
static void run_tile(int R, int first, const float *A, long lda, const float *const *panels, int g0, int g1,
                     int seg_len, int q0, int q1, int NP, long ldw, float *C, long ldc, const float *bias)
{
#if KW_VECTOR >= 256
    WIDE_TILES(TILE_ROWS, )
    NARROW_TILES(TILE_ROWS, )
#else
    for (int r = 0; r < R; r++) {
        float *c = C + r * ldc;
        if (first)
            for (int j = 0; j < NP; j++)
                c[j] = bias ? bias[j] : 0.0f;
        for (int g = g0; g < g1; g++)
            for (int q = q0; q < q1; q++) {
                const float x = A[r * lda + (long)g * seg_len + q];
                const float *w = panels[g] + (long)q * ldw;
                for (int j = 0; j < NP; j++)
                    c[j] += x * w[j];
            }
    }
#endif
}

/* run_tiles' cases (W_TYPE: the element type of the copy dispatched to, float or uint16_t) */
#define RUN_CASE(NAME, R, NV) case (R) * 8 + (NV): \
    NAME(R, NV, add, alpha, lda, RUN_AK, a_step, n, (const W_TYPE *)w, w_step, ldw, count, col, out, out_step, ldo); \
    break;
#define RUN_ROWS(NAME, NV) RUN_CASE(NAME, 1, NV) RUN_CASE(NAME, 2, NV) RUN_CASE(NAME, 3, NV) \
    RUN_CASE(NAME, 4, NV) RUN_CASE(NAME, 5, NV) RUN_CASE(NAME, 6, NV)

/*
 * `count` tiles of R <= MAX_ROWS rows and NP columns back to back (_native_tile.h's TILE_NAME##_run):
 * out_t (+)= alpha_t @ w_t with alpha_t = alpha + t * a_step (rows lda apart, elements along a row ak
 * apart: 1, or a matrix read transposed in place), w_t = w + t * w_step (n rows ldw apart; elements
 * float32, or float16 where `half`, which the baseline copy cannot convert and never gets, read with
 * ak 1), out_t = out + t * out_step (rows ldo apart); add: onto out_t instead of over it.  ak = 1
 * has its own instances of the tiles: the same code as without the step.
 */
static void run_tiles(int R, int add, const float *alpha, long lda, long ak, long a_step, int n, const void *w,
                      int half, long w_step, long ldw, int count, int NP, float *out, long out_step, long ldo)
{
#if KW_VECTOR >= 256
#define RUN_AK 1
    if (half) {
#define W_TYPE uint16_t
        WIDE_TILES(RUN_ROWS, h_run)
        NARROW_TILES(RUN_ROWS, h_run)
#undef W_TYPE
        return;
    }
#define W_TYPE float
    if (ak == 1) {
        WIDE_TILES(RUN_ROWS, _run)
        NARROW_TILES(RUN_ROWS, _run)
        return;
    }
#undef RUN_AK
#define RUN_AK ak
    WIDE_TILES(RUN_ROWS, _run)
    NARROW_TILES(RUN_ROWS, _run)
#undef RUN_AK
#undef W_TYPE
#else
    (void)half;
    for (int t = 0; t < count; t++)
        for (int r = 0; r < R; r++) {
            float *c = out + t * out_step + r * ldo;
            if (!add)
                for (int j = 0; j < NP; j++)
                    c[j] = 0.0f;
            for (int k = 0; k < n; k++) {
                const float x = alpha[t * a_step + r * lda + k * ak], *row = (const float *)w + t * w_step + k * ldw;
                for (int j = 0; j < NP; j++)
                    c[j] += x * row[j];
            }
        }
#endif
}

/* `rows` rows of alpha and of out in tile_rows' tiles, each run of equal height in one run_tiles. */
static void run_row_tiles(int rows, int add, const float *alpha, long lda, long ak, int n, const float *w, long ldw,
                          int NP, float *out, long ldo)
{
    const int tiles = (rows + MAX_ROWS - 1) / MAX_ROWS, base = rows / tiles, extra = rows % tiles;
    const long high = (long)extra * (base + 1);
    if (extra)
        run_tiles(base + 1, add, alpha, lda, ak, (base + 1) * lda, n, w, 0, 0, ldw, extra, NP, out, (base + 1) * ldo,
                  ldo);
    run_tiles(base, add, alpha + high * lda, lda, ak, base * lda, n, w, 0, 0, ldw, tiles - extra, NP,
              out + high * ldo, base * ldo, ldo);
}

/* out (+)= alpha (rows x n, rows lda apart) @ `count` panels of NP columns (w + t * w_step, rows ldw
 * apart), written side by side into out (rows ldo apart): a row tile of tile_rows' heights at a time,
 * each run over the panels. */
static void run_rows_by_panels(int rows, int add, const float *alpha, long lda, int n, const void *w, int half,
                               long w_step, long ldw, int count, int NP, float *out, long ldo)
{
    for (int r0 = 0, R; r0 < rows; r0 += R) {
        R = tile_rows(rows, r0);
        run_tiles(R, add, alpha + (long)r0 * lda, lda, 1, 0, n, w, half, w_step, ldw, count, NP, out + (long)r0 * ldo,
                  NP, ldo);
    }
}

#define MIX_BLOCK_BYTES (128 * 1024)  /* warehouse panels that stay in L2 across a block's row tiles */

/*
 * The assembly: out (rows x count * NP) = alpha (rows x n) @ the warehouse as `count` panels of
 * (n, NP), panel P at panels + P * panel_stride, its rows row_stride apart (float32: packed, or
 * the warehouse read in place), or packed float16s converted on load (half: F16C, which every AVX2
 * CPU has; at batch 1-2 the assembly is bound by memory: every layer of a stage streams the
 * stage's whole warehouse, 36 MB in float32 for each of resnet50's 19 stage-3 layers).
 * Items are blocks of panels (MIX_BLOCK_BYTES); every row tile runs over its block, which stays
 * in L2, so at most MAX_ROWS output rows are written at a time, each in a run of the block's
 * width.  Walking a panel at a time wrote every row at once, rows a cell apart (1 MB in
 * resnet18's stage 4: the same cache sets); with the warehouse in cache 18 rows of its 27 cells
 * then ran at 18-25 G multiply-adds/s on a Zen 5 core, 49-60 this way, 9 rows to 144 at 0.5-0.9x
 * the time on two.  Read from memory (a model at batch 1) both walks take the same time: the
 * reading bounds them.  Returns 0, or -1 for an unsupported panel width or a float16 copy on the
 * baseline copy (no conversion).
 */
int kw_native_mix(const float *alpha, int rows, int n, const void *panels, long panel_stride, long row_stride,
                  int count, int NP, int half, float *out, int threads)
{
    if (!is_panel_width(NP) || (half && !KW_VECTOR))
        return -1;
    const long ldc = (long)count * NP;
    const long element = half ? 2 : 4; /* bytes */
    const long panel_bytes = (long)n * NP * element;
    long block = MIX_BLOCK_BYTES / panel_bytes;
    const long share = (count + threads - 1) / threads;  /* every thread gets work */
    block = block < 1 ? 1 : block > share ? share : block;
    const long blocks = (count + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < blocks; item++) {
        const long P0 = item * block, P1 = P0 + block < count ? P0 + block : count;
        run_rows_by_panels(rows, 0, alpha, n, n, (const char *)panels + P0 * panel_stride * element, half, panel_stride,
                           half ? NP : row_stride, (int)(P1 - P0), NP, out + P0 * NP, ldc);
    }
    return 0;
}

/*
 * C[b] (rows x O, row stride ldc) = A[b] (rows x K, row stride lda) @ W_b^T (+ bias) for every
 * sample b < batch; offsets[P * segments + g] locate W_b^T's blocks as described above, rows
 * NP apart.  Two walks:
 *  - all of W_b^T fits in cache (small K x O, e.g. 1x1 layers on large maps) and there are
 *    enough rows to keep every thread busy: row tiles outside, panels inside, so each output
 *    row is written whole (items: sample x chunk of rows);
 *  - otherwise one panel (K x NP) at a time: each row tile keeps its sums in registers over all
 *    of K (items: sample x panel), however long K is.  Walking K in chunks of 256 rows to keep
 *    a panel in L2 read each im2col row in bursts of 1 kB, too short for the hardware's stream
 *    prefetcher: resnet18's layer3 product (196 rows, K 2304, 256 outputs, batch 4) ran at 51
 *    G multiply-adds/s on 2 Zen 4 cores that way, 107 in one pass (torch.bmm: 80-90).
 * Items run on `threads` OpenMP threads (the runtime torch loaded, when this library is loaded
 * after torch: it asks for libgomp.so.1, which the loader finds already mapped, so no second
 * thread pool spins beside torch's).  Returns 0, or -1 for an unsupported panel width (NP
 * must be 8, 16, 32 or 64) or too many segments.
 */
int kw_native_conv(const float *A, long a_sample, long lda, const float *W, long w_sample, const int64_t *offsets,
                   int num_panels, int segments, int seg_len, int NP, float *C, long c_sample, long ldc,
                   const float *bias, int rows, int batch, int threads)
{
    if (!is_panel_width(NP) || segments > MAX_SEGMENTS)
        return -1;
    const long panel_bytes = (long)segments * seg_len * NP * (long)sizeof(float);
    /* rows outside when all of W_b stays in cache, unless that leaves threads idle (batch 1, few rows) */
    const int rows_outside = panel_bytes * num_panels <= BLOCK_BYTES
                             && (long)batch * ((rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM) >= threads;
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
                             NP, NP, c_b + (long)(first + r0) * ldc + (long)P * NP, ldc,
                             bias ? bias + (long)P * NP : NULL);
                }
            }
            continue;
        }
        const int P = chunk;
        for (int g = 0; g < segments; g++)
            panels[g] = W + b * w_sample + offsets[(long)P * segments + g];
        const float *bias_p = bias ? bias + (long)P * NP : NULL;
        float *c_p = c_b + (long)P * NP;
        for (int r0 = 0, R; r0 < rows; r0 += R) {
            R = tile_rows(rows, r0);
            run_tile(R, 1, a_b + (long)r0 * lda, lda, panels, 0, segments, seg_len, 0, seg_len, NP, NP,
                     c_p + (long)r0 * ldc, ldc, bias_p);
        }
    }
    return 0;
}

/*
 * The assembly inside the product (path "inline"): C[b] = A[b] @ W_b^T (+ bias), where W_b is
 * never written out.  For each output panel P, chunks of INLINE_ROWS rows of W_b^T are mixed from
 * the warehouse into a buffer of the thread's (L1/L2-sized) and multiplied at once: a whole batch
 * of kernels (151 MB for resnet18's layer4 at batch 16) never goes through main memory, and each
 * chunk of the warehouse is read once for up to MAX_ROWS samples.  Chunks of 128 rows measured
 * faster than 64 (fewer passes over the output sums) and 16-32 slower still; so a chunk runs on
 * across segments where cells have fewer input channels (a 3 x 3 layer of 32-channel cells: three
 * passes over the sums, not nine; the 28 x 28 net's layers 0.94-0.98x the time, resnet18's
 * layer2 0.97x).
 *
 * E is the warehouse packed as (cell rows, n, NP): for every row q of a cell in panel order
 * (one input channel of NP output channels), the n cells' rows side by side, so that mixing
 * one row for a few samples is one register tile: buffer[s, q, :] = alpha[s, mixture, :] @ E[q].
 * mixtures[P * segments + g] is the mixture (index into alpha's m) of that block and
 * rows_at[P * segments + g] its first row in E.  alpha is (batch, m, n), row stride alpha_sample.
 * Items (panel x block of samples) run on `threads` threads.  Returns 0, -1 for an unsupported
 * panel width, -2 when a thread's buffer could not be allocated.
 */
#define INLINE_ROWS 128

/* A thread's scratch buffer inside `#pragma omp parallel`; when it cannot be allocated the thread
 * skips its items and the routine returns -2 (`failed`). */
#define THREAD_BUFFER(name, bytes)                \
    float *name = malloc(bytes);                  \
    if (name == NULL) {                           \
        _Pragma("omp atomic write") failed = 1;   \
    }

static inline int sample_groups(int batch) { return (batch + MAX_ROWS - 1) / MAX_ROWS; }

/* Blocks of whole groups of MAX_ROWS samples to split each of `units` units of work into, so
 * that there are about `wanted` work items (mixing a chunk of the warehouse still serves a
 * register tile of samples).  The input gradients have as few units as one (segment, input-channel
 * panel) pair: a 1x1 convolution of c_e <= 64, which without the split left one thread of two idle
 * (the 28 x 28 net's downsample layers: their input gradient takes 0.58-0.67x the time with it,
 * 3 x 3 layers of nine pairs the same).  Blocks differ by at most one group of samples.  Up to
 * twice as many blocks are taken where that gives every thread as many items: nine pairs of a
 * 3 x 3 layer on two threads are 18 items, not 9 of which one thread runs 5. */
static int sample_blocks(long units, int batch, long wanted, int threads)
{
    const int groups = sample_groups(batch);
    const long needed = (wanted + units - 1) / units;
    const long blocks = needed > groups ? groups : needed < 1 ? 1 : needed;
    for (long more = blocks; more <= groups && more <= 2 * blocks; more++)
        if (units * more % threads == 0)
            return (int)more;
    return (int)blocks;
}

/* Samples [*s_lo, *s_hi) of block `block` of `blocks` (whole groups of MAX_ROWS). */
static void sample_block(int block, int blocks, int batch, int *s_lo, int *s_hi)
{
    const int groups = sample_groups(batch);
    const int end = ((block + 1) * groups / blocks) * MAX_ROWS;
    *s_lo = (block * groups / blocks) * MAX_ROWS;
    *s_hi = end < batch ? end : batch;
}

/* Item `item` of an input gradient: segment *g, input-channel panel *cp, samples [*s_lo, *s_hi).
 * Items run block by block of samples, all `pairs` (segment, input panel) pairs of a block in a
 * row, so a thread's items keep to its own samples' rows of G and D where the blocks split the
 * batch between threads: pair by pair, both threads read and wrote every sample (kernel alone,
 * with sample_blocks' even count of items: resnet18's layer1 at batch 16 mostly 0.85x the time,
 * 0.76-1.0x; the 28 x 28 net's 3 x 3 layers at batch 64 mostly 0.92-0.98x, 0.85-1.07x over four
 * runs; others within noise). */
static void input_grad_item(long item, int blocks, long pairs, int input_panels, int batch, int *g, int *cp,
                            int *s_lo, int *s_hi)
{
    const long pair = item % pairs;
    *g = (int)(pair / input_panels), *cp = (int)(pair % input_panels);
    sample_block((int)(item / pairs), blocks, batch, s_lo, s_hi);
}

/* Asks for `rows` rows of `count` floats (lda apart) ahead of use: the inline walks read the
 * im2col rows a short chunk at a time, too short for the hardware's stream prefetcher (with the
 * next row tile asked for, resnet18's layer2 and layer3 "inline" at batch 16: 24-25 ms, 26-30
 * without). */
static inline void prefetch_rows(const float *a, long lda, int rows, int count)
{
#if defined(__GNUC__) || defined(__clang__)
    for (int r = 0; r < rows; r++)
        for (int q = 0; q < count; q += 16)
            __builtin_prefetch(a + r * lda + q, 0, 3);
#else
    (void)a, (void)lda, (void)rows, (void)count;
#endif
}

/* Asks for `floats` floats from `p` on, to be written: a row of sums read, added to and stored
 * back (the weight gradient's rows of dE, which come from memory). */
static inline void prefetch_for_write(float *p, long floats)
{
#if defined(__GNUC__) || defined(__clang__)
    for (long q = 0; q < floats; q += 16)
        __builtin_prefetch(p + q, 1, 3);
#else
    (void)p, (void)floats;
#endif
}

/*
 * `count` rows of a block of every sample's kernel mixed into `buffer` (sample s's rows at
 * s * per_sample, row stride `width`), row q from the n cells' rows at e + q * e_row.
 */
static void mix_rows(int samples, const float *alpha, long alpha_sample, int n, const float *e, long e_row, int count,
                     int width, float *buffer, long per_sample)
{
    run_tiles(samples, 0, alpha, alpha_sample, 1, 0, n, e, 0, e_row, width, count, width, buffer, width, per_sample);
}

/*
 * `mix_rows` for rows [k0, k0 + count) of a reduction made of blocks of `block_len` rows (inline's
 * segments, or its input gradient's output blocks), into buffer rows 0..count: block i mixes with
 * alpha's mixture mixtures[i] from the warehouse rows e + (first_rows[i] + q) * n * width (first_rows
 * NULL: from row q).  A chunk runs on across blocks so that one product covers it.
 */
static void mix_chunk(int samples, const float *alpha, long alpha_sample, int n, const int64_t *mixtures,
                      const int64_t *first_rows, const float *e, int width, long k0, int count, int block_len,
                      float *buffer, long per_sample)
{
    for (long k = k0; k < k0 + count;) {
        const int i = (int)(k / block_len), q = (int)(k % block_len);
        const int piece = block_len - q < k0 + count - k ? block_len - q : (int)(k0 + count - k);
        const long row = (first_rows ? first_rows[i] : 0) + q;
        mix_rows(samples, alpha + mixtures[i] * n, alpha_sample, n, e + row * n * width, (long)n * width, piece, width,
                 buffer + (k - k0) * width, per_sample);
        k += piece;
    }
}

/*
 * C_s (+)= A_s (rows x count) @ the block of sample s in `buffer` (count x width, at s * per_sample)
 * for each sample (first: start from bias or 0), the next row tile's rows of A asked for ahead.
 */
static void multiply_rows(int samples, const float *buffer, long per_sample, int count, int width, const float *A,
                          long a_sample, long lda, float *C, long c_sample, long ldc, int rows, int first,
                          const float *bias)
{
    for (int s = 0; s < samples; s++) {
        const float *panel = buffer + s * per_sample;
        for (int r0 = 0, R; r0 < rows; r0 += R) {
            R = tile_rows(rows, r0);
            prefetch_rows(A + s * a_sample + (long)(r0 + R) * lda, lda, r0 + R < rows ? tile_rows(rows, r0 + R) : 0,
                          count);
            run_tile(R, first, A + s * a_sample + (long)r0 * lda, lda, &panel, 0, 1, count, 0, count, width, width,
                     C + s * c_sample + (long)r0 * ldc, ldc, bias);
        }
    }
}

int kw_native_inline(const float *A, long a_sample, long lda, const float *E, int n, const float *alpha,
                    long alpha_sample, const int64_t *mixtures, const int64_t *rows_at, int num_panels, int segments,
                    int seg_len, int NP, float *C, long c_sample, long ldc, const float *bias, int rows, int batch,
                    int threads)
{
    if (!is_panel_width(NP))
        return -1;
    const int blocks = sample_blocks(num_panels, batch, 2L * threads, threads); /* enough items for every thread */
    const long items = (long)num_panels * blocks;
    const long depth = (long)segments * seg_len; /* A's columns: the segments in a row */
    const size_t buffer_bytes = (size_t)MAX_ROWS * INLINE_ROWS * NP * sizeof(float);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        THREAD_BUFFER(buffer, buffer_bytes);
#pragma omp for schedule(static)
        for (long item = 0; item < items; item++) {
            if (buffer == NULL)
                continue;
            const int P = (int)(item / blocks);
            int s_lo, s_hi;
            sample_block((int)(item % blocks), blocks, batch, &s_lo, &s_hi);
            const float *bias_p = bias ? bias + (long)P * NP : NULL;
            for (long k0 = 0; k0 < depth; k0 += INLINE_ROWS) {
                const int count = depth - k0 < INLINE_ROWS ? (int)(depth - k0) : INLINE_ROWS;
                for (int s0 = s_lo; s0 < s_hi; s0 += MAX_ROWS) {
                    const int samples = s_hi - s0 < MAX_ROWS ? s_hi - s0 : MAX_ROWS;
                    mix_chunk(samples, alpha + (long)s0 * alpha_sample, alpha_sample, n, mixtures + (long)P * segments,
                              rows_at + (long)P * segments, E, NP, k0, count, seg_len, buffer, (long)INLINE_ROWS * NP);
                    multiply_rows(samples, buffer, (long)INLINE_ROWS * NP, count, NP, A + (long)s0 * a_sample + k0,
                                  a_sample, lda, C + (long)s0 * c_sample + (long)P * NP, c_sample, ldc, rows, k0 == 0,
                                  bias_p);
                }
            }
        }
        free(buffer);
    }
    return failed ? -2 : 0;
}

#if KW_VECTOR >= 256
/* One 8 x 8 block in AVX registers: row i of `rows` (8 floats each) becomes column i of d. */
static inline void transpose8(const float *const *rows, float *d, long ld_dst)
{
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        const __m256 lo = _mm256_loadu_ps(rows[i]), hi = _mm256_loadu_ps(rows[i + 1]);
        t[i] = _mm256_unpacklo_ps(lo, hi);
        t[i + 1] = _mm256_unpackhi_ps(lo, hi);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(d + i * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(d + (i + 4) * ld_dst, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
}
#endif

/* dst (cols x rows, row stride ld_dst) = src (rows x cols, row stride ld_src) transposed; rows and
 * cols multiples of 8 (8 x 8 blocks in AVX registers). */
static void transpose(const float *src, int rows, int cols, long ld_src, float *dst, long ld_dst)
{
#if KW_VECTOR >= 256
    for (int r0 = 0; r0 < rows; r0 += 8)
        for (int c0 = 0; c0 < cols; c0 += 8) {
            const float *block[8];
            for (int i = 0; i < 8; i++)
                block[i] = src + (long)(r0 + i) * ld_src + c0;
            transpose8(block, dst + (long)c0 * ld_dst + r0, ld_dst);
        }
#else
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            dst[(long)c * ld_dst + r] = src[(long)r * ld_src + c];
#endif
}

/*
 * The backward of "inline" (training), again without writing out a batch of kernels.
 *
 * kw_native_inline_input_grad: D[b] (rows x K) = G[b] (rows x O) @ W_b, the gradient of the im2col
 * rows.  W_b's blocks are mixed transposed: ET holds the warehouse as (c_e / QW, f_e, n, QW), for
 * every input-channel panel cp and output channel f of a cell the n cells' QW input channels side
 * by side, so a chunk of W_b's rows (output channels f) over QW columns of segment g is one
 * register tile per row.  mixtures[g * blocks_out + ob] is the mixture of output block ob in
 * segment g.  Items (segment x input-channel panel x block of samples, sample_blocks) write
 * disjoint blocks of D.  Chunks of INLINE_ROWS output channels run on across output blocks, as
 * inline's forward chunks do across segments (kernel alone: the 28 x 28 net's layers of two output
 * blocks 0.92-0.97x the time, resnet18's layer2.0 0.78-0.89x).
 */
int kw_native_inline_input_grad(const float *G, long g_sample, long ldg, const float *ET, int n, const float *alpha,
                                long alpha_sample, const int64_t *mixtures, int segments, int blocks_out, int f_e,
                                int seg_len, int QW, float *D, long d_sample, long ldd, int rows, int batch,
                                int threads)
{
    if (!is_panel_width(QW))
        return -1;
    const int input_panels = seg_len / QW;
    const int blocks = sample_blocks((long)segments * input_panels, batch, 4L * threads, threads);
    const long items = (long)segments * input_panels * blocks;
    const long per_sample = (long)INLINE_ROWS * QW, outputs = (long)blocks_out * f_e; /* G's columns */
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        THREAD_BUFFER(buffer, (size_t)MAX_ROWS * per_sample * sizeof(float));
#pragma omp for schedule(static)
        for (long item = 0; item < items; item++) {
            if (buffer == NULL)
                continue;
            int g, cp, s_lo, s_hi;
            input_grad_item(item, blocks, (long)segments * input_panels, input_panels, batch, &g, &cp, &s_lo, &s_hi);
            for (int s0 = s_lo; s0 < s_hi; s0 += MAX_ROWS) {
                const int samples = s_hi - s0 < MAX_ROWS ? s_hi - s0 : MAX_ROWS;
                for (long k0 = 0; k0 < outputs; k0 += INLINE_ROWS) { /* chunks across output blocks, as inline's */
                    const int count = outputs - k0 < INLINE_ROWS ? (int)(outputs - k0) : INLINE_ROWS;
                    mix_chunk(samples, alpha + (long)s0 * alpha_sample, alpha_sample, n,
                              mixtures + (long)g * blocks_out, NULL, ET + (long)cp * f_e * n * QW, QW, k0, count, f_e,
                              buffer, per_sample);
                    multiply_rows(samples, buffer, per_sample, count, QW, G + (long)s0 * g_sample + k0, g_sample, ldg,
                                  D + (long)s0 * d_sample + (long)g * seg_len + (long)cp * QW, d_sample, ldd, rows,
                                  k0 == 0, NULL);
                }
            }
        }
        free(buffer);
    }
    return failed ? -2 : 0;
}

/*
 * kw_native_inline_input_grad_rows: the same from the warehouse as the forward reads it (E and NP
 * as for kw_native_inline), for warehouses too big for a second copy (resnet50's stage 4 at batch
 * 8: 85 MB more at the training step's peak).  For each output panel P (NP output channels) of a
 * cell, QW rows of E (QW input channels, each the n cells' NP output channels) are mixed for a few
 * samples and each sample's QW x NP block is transposed in registers (8 x 8 at a time), up to
 * INLINE_ROWS output channels of them; then D's QW columns of segment g gain G's columns times
 * those blocks.  The transposes cost 4-10 % of the gradient on resnet18 / resnet50's stages 3-4,
 * 13-22 % where cells are few (n = 9-29).
 */
int kw_native_inline_input_grad_rows(const float *G, long g_sample, long ldg, const float *E, int n,
                                     const float *alpha, long alpha_sample, const int64_t *mixtures, int segments,
                                     int blocks_out, int f_e, int seg_len, int NP, int QW, float *D, long d_sample,
                                     long ldd, int rows, int batch, int threads)
{
    if (!is_panel_width(QW) || !is_panel_width(NP))
        return -1;
    const int input_panels = seg_len / QW;
    const int split = sample_blocks((long)segments * input_panels, batch, 4L * threads, threads);
    const long items = (long)segments * input_panels * split;
    /* output panels per product: K of INLINE_ROWS output channels, as many as the forward's chunks */
    const int panels = f_e / NP, step = INLINE_ROWS / NP < panels ? INLINE_ROWS / NP : panels;
    const long mixed = (long)QW * NP, block = (long)step * NP * QW;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        THREAD_BUFFER(buffer, (size_t)MAX_ROWS * (mixed + block) * sizeof(float));
#pragma omp for schedule(static)
        for (long item = 0; item < items; item++) {
            if (buffer == NULL)
                continue;
            float *blocks = buffer + MAX_ROWS * mixed; /* each sample's (step * NP) x QW block of W_b */
            int g, cp, s_lo, s_hi;
            input_grad_item(item, split, (long)segments * input_panels, input_panels, batch, &g, &cp, &s_lo, &s_hi);
            for (int s0 = s_lo; s0 < s_hi; s0 += MAX_ROWS) {
                const int samples = s_hi - s0 < MAX_ROWS ? s_hi - s0 : MAX_ROWS;
                for (int ob = 0; ob < blocks_out; ob++) {
                    const float *a = alpha + (long)s0 * alpha_sample + mixtures[(long)g * blocks_out + ob] * n;
                    for (int P0 = 0; P0 < panels; P0 += step) {
                        const int count = panels - P0 < step ? panels - P0 : step;
                        for (int P = P0; P < P0 + count; P++) {
                            mix_rows(samples, a, alpha_sample, n, E + ((long)P * seg_len + (long)cp * QW) * n * NP,
                                     (long)n * NP, QW, NP, buffer, mixed);
                            for (int s = 0; s < samples; s++)
                                transpose(buffer + s * mixed, QW, NP, NP, blocks + s * block + (long)(P - P0) * NP * QW,
                                          QW);
                        }
                        for (int s = 0; s < samples; s++) {
                            const float *panel = blocks + s * block;
                            const float *Gs = G + (long)(s0 + s) * g_sample + (long)ob * f_e + (long)P0 * NP;
                            float *Ds = D + (long)(s0 + s) * d_sample + (long)g * seg_len + (long)cp * QW;
                            for (int r0 = 0, R; r0 < rows; r0 += R) {
                                R = tile_rows(rows, r0);
                                run_tile(R, ob == 0 && P0 == 0, Gs + (long)r0 * ldg, ldg, &panel, 0, 1, count * NP, 0,
                                         count * NP, QW, QW, Ds + (long)r0 * ldd, ldd, NULL);
                            }
                        }
                    }
                }
            }
        }
        free(buffer);
    }
    return failed ? -2 : 0;
}

/*
 * kw_native_inline_weight_grad: the gradients of alpha and of the warehouse, through each
 * sample's kernel gradient dW_b = A[b]^T @ G[b] taken a chunk at a time and never stored whole.
 * A^T is the im2col transposed: element (k, row) of sample b at A + b * a_sample + k * a_k + row *
 * a_row, either a transposed copy (a_k rows, a_row 1) or the forward's NHWC im2col read in place
 * (a_k 1, a_row K: the tiles step along its rows; gathering the copy took 1.3-2x as long as the
 * im2col itself on resnet18's maps and the 28 x 28 net's); GP the output gradient per panel,
 * (batch, panels, rows, NP); E, mixtures and rows_at as for kw_native_inline; alpha_t is alpha as
 * (m, n, batch).  For each (panel, segment) item and chunk of rows, the chunk of dW for a group of
 * samples (in `buffer` as [row][sample][NP]) gives dalpha[b, mixture, j] += <dW_b, E_j> and
 * dE[rows, j] += sum_b alpha[b, mixture, j] dW_b.  Items of different panels share mixtures, so
 * each thread sums into its own slice of dalpha (threads x batch x m x n), zeroed by the caller,
 * who adds the slices up.  Every mixture adds into the same rows of dE (zeroed by the caller):
 * each thread takes every item but only its own share of each block's rows, so no two threads
 * write one row and one dE serves them all (a copy per thread, zeroed and added up, cost
 * resnet18's layer3 10 ms of its 50 at batch 16, layer4 about 35 of 100).  Groups of up to
 * GRAD_SAMPLES samples: dE's register tiles then sum over up to 64 samples per load and store of
 * their sums, not 16; the chunks of rows are as long as a buffer of GRAD_BUFFER_FLOATS allows (128
 * rows of 16 samples, 32 of 64: groups of 64 rather than 32 at batch 64 took 0.94-0.99x the time
 * on the 28 x 28 net's layers, dE's rows read and written half as often).  Both streams that
 * come from memory are asked for ahead: the next sample's first row tile of A^T (a few hundred
 * bytes, too short for the hardware's prefetcher; a sample's tiles follow one another) and the
 * next row of dE: the weight gradients of resnet18's layer4 and layer3 convolutions at batch 16
 * took 0.76-0.81x and 0.76-0.87x the time (both builds in one process, interleaved).  Both short
 * products (dW's over the output pixels, dE's over the samples) run their row tiles back to back
 * in one call (run_row_tiles): resnet18's layers at batch 16 0.94-0.98x, the 28 x 28 net's 4 x 4
 * layers 0.95-0.99x, its others unchanged.
 */
#define GRAD_SAMPLES 64
#define GRAD_BUFFER_FLOATS (64 * 32 * 64) /* a thread's chunk of kernel gradients: 512 kB of its L2 */

/*
 * dalpha's dot products, S samples x J cells at a time: out[s * out_stride + j] += sum over rows
 * q < count and columns c < NP of w[q * w_stride + s * NP + c] * e[q * e_stride + j * NP + c].
 * The S x J sums are vectors kept in registers across the rows and columns (S, J constants in
 * each case): each vector of a row loads S + J vectors per S x J multiply-adds, and each sum is
 * added across its lanes once.  Written as float arrays under `omp simd` (3 x 2 blocks of whole
 * 64-column panels) they lived on the stack, one load and one store per multiply-add; this way
 * fashion_cnn's blocks.2.conv1 weight gradient took 5.7 ms instead of 7.8, and with the lanes
 * added once per block rather than once per vector of columns 0.87-0.90x of that (resnet18's
 * layers, 128-row chunks, within noise).  The baseline copy and panels narrower than a vector
 * take plain loops.
 */
#if KW_VECTOR >= 512
#define DOT_VEC __m512
#define DOT_LANES 16
#define DOT_LOAD _mm512_loadu_ps
#define DOT_FMA _mm512_fmadd_ps
#define DOT_ZERO _mm512_setzero_ps
static inline float dot_total(__m512 v) { return _mm512_reduce_add_ps(v); }
#define DOT_SAMPLES 6  /* 6 x 4 sums + 4 cell vectors + 1 sample vector: 29 of 32 registers */
#define DOT_CELLS 4
#elif KW_VECTOR >= 256
#define DOT_VEC __m256
#define DOT_LANES 8
#define DOT_LOAD _mm256_loadu_ps
#define DOT_FMA _mm256_fmadd_ps
#define DOT_ZERO _mm256_setzero_ps
static inline float dot_total(__m256 v)
{
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    return _mm_cvtss_f32(_mm_add_ss(sum, _mm_shuffle_ps(sum, sum, 1)));
}
#define DOT_SAMPLES 3  /* 3 x 3 sums + 3 + 1: 13 of 16 registers */
#define DOT_CELLS 3
#else
#define DOT_SAMPLES 3
#define DOT_CELLS 2
#endif
#ifdef DOT_VEC
#define DOT_BLOCK(S, J)                                                                          \
    {                                                                                            \
        DOT_VEC part[S][J];                                                                      \
        for (int s = 0; s < S; s++)                                                              \
            for (int j = 0; j < J; j++)                                                          \
                part[s][j] = DOT_ZERO();                                                         \
        for (int q = 0; q < count; q++)                                                          \
            for (int c0 = 0; c0 < NP; c0 += DOT_LANES) {                                         \
                const float *x = w + q * w_stride + c0, *y = e + q * e_stride + c0;              \
                DOT_VEC cells[J];                                                                \
                for (int j = 0; j < J; j++)                                                      \
                    cells[j] = DOT_LOAD(y + j * NP);                                             \
                for (int s = 0; s < S; s++) {                                                    \
                    const DOT_VEC sample = DOT_LOAD(x + s * NP);                                 \
                    for (int j = 0; j < J; j++)                                                  \
                        part[s][j] = DOT_FMA(sample, cells[j], part[s][j]);                      \
                }                                                                                \
            }                                                                                    \
        for (int s = 0; s < S; s++)                                                              \
            for (int j = 0; j < J; j++)                                                          \
                out[s * out_stride + j] += dot_total(part[s][j]);                                \
        return;                                                                                  \
    }
#define DOT_ROWS(J) case 1 * 8 + (J): DOT_BLOCK(1, J) case 2 * 8 + (J): DOT_BLOCK(2, J) \
                    case 3 * 8 + (J): DOT_BLOCK(3, J) DOT_MORE_ROWS(J)
#if DOT_SAMPLES > 3
#define DOT_MORE_ROWS(J) case 4 * 8 + (J): DOT_BLOCK(4, J) case 5 * 8 + (J): DOT_BLOCK(5, J) \
                         case 6 * 8 + (J): DOT_BLOCK(6, J)
#define DOT_SHAPES switch (S * 8 + J) { DOT_ROWS(1) DOT_ROWS(2) DOT_ROWS(3) DOT_ROWS(4) default: break; }
#else
#define DOT_MORE_ROWS(J)
#define DOT_SHAPES switch (S * 8 + J) { DOT_ROWS(1) DOT_ROWS(2) DOT_ROWS(3) default: break; }
#endif
#endif

static void dot_block(int S, int J, const float *w, long w_stride, const float *e, long e_stride, int count, int NP,
                      float *out, long out_stride)
{
#ifdef DOT_VEC
    if (NP >= DOT_LANES) {
        DOT_SHAPES
    }
#endif
    for (int s = 0; s < S; s++)
        for (int j = 0; j < J; j++) {
            float sum = 0.0f;
            for (int q = 0; q < count; q++)
                for (int c = 0; c < NP; c++)
                    sum += w[q * w_stride + s * NP + c] * e[q * e_stride + j * NP + c];
            out[s * out_stride + j] += sum;
        }
}

int kw_native_inline_weight_grad(const float *A, long a_sample, long a_k, long a_row, const float *GP, long gp_sample,
                                 const float *E, int n, const float *alpha_t, long m_n, const int64_t *mixtures,
                                 const int64_t *rows_at, int num_panels, int segments, int seg_len, int NP, int rows,
                                 int batch, float *dalpha, long dalpha_size, float *dE, int threads)
{
    if (!is_panel_width(NP))
        return -1;
    const long items = (long)num_panels * segments;
    const int group = batch < GRAD_SAMPLES ? batch : GRAD_SAMPLES;
    const int fitting_rows = GRAD_BUFFER_FLOATS / (group * NP);
    const int chunk_rows = fitting_rows < INLINE_ROWS ? fitting_rows : INLINE_ROWS;
    const long buffer_floats = (long)chunk_rows * group * NP;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int thread = omp_get_thread_num(), team = omp_get_num_threads();
#else
        const int thread = 0, team = 1;
#endif
        THREAD_BUFFER(buffer, (size_t)buffer_floats * sizeof(float));
        float *da = dalpha + thread * dalpha_size;
        /* this thread's rows of every block: threads write disjoint rows of dE */
        const int q_lo = (int)((long)seg_len * thread / team), q_hi = (int)((long)seg_len * (thread + 1) / team);
        for (long item = 0; item < items && buffer != NULL; item++) {
            const int P = (int)(item / segments), g = (int)(item % segments);
            const long mixture = mixtures[item], row0 = rows_at[item];
            for (int q0 = q_lo; q0 < q_hi; q0 += chunk_rows) {
                const int count = q_hi - q0 < chunk_rows ? q_hi - q0 : chunk_rows;
                for (int s0 = 0; s0 < batch; s0 += group) {
                    const int samples = batch - s0 < group ? batch - s0 : group;
                    for (int s = 0; s < samples; s++) { /* dW chunk: rows q of A^T times G's panel */
                        const float *panel = GP + (long)(s0 + s) * gp_sample + (long)P * rows * NP;
                        const float *a_t = A + (long)(s0 + s) * a_sample + ((long)g * seg_len + q0) * a_k;
                        if (s + 1 < samples) { /* the next sample's first tile of A^T (the rest follows in order) */
                            if (a_row == 1)
                                prefetch_rows(a_t + a_sample, a_k, tile_rows(count, 0), rows);
                            else
                                prefetch_rows(a_t + a_sample, a_row, rows, tile_rows(count, 0));
                        }
                        run_row_tiles(count, 0, a_t, a_k, a_row, rows, panel, NP, NP, buffer + (long)s * NP,
                                      (long)group * NP);
                    }
                    for (int s = 0; s < samples; s += DOT_SAMPLES) /* dalpha: the chunk against every cell */
                        for (int j = 0; j < n; j += DOT_CELLS)
                            dot_block(samples - s < DOT_SAMPLES ? samples - s : DOT_SAMPLES,
                                      n - j < DOT_CELLS ? n - j : DOT_CELLS, buffer + (long)s * NP,
                                      (long)group * NP, E + ((row0 + q0) * n + j) * NP, (long)n * NP, count, NP,
                                      da + (long)(s0 + s) * m_n + mixture * n + j, m_n);
                    for (int q = 0; q < count; q++) { /* dE rows: alpha^T (n x samples) @ chunk (samples x NP) */
                        const float *chunk = buffer + (long)q * group * NP;
                        float *de_q = dE + (row0 + q0 + q) * n * NP;
                        if (q + 1 < count)
                            prefetch_for_write(de_q + (long)n * NP, (long)n * NP);
                        run_row_tiles(n, 1, alpha_t + mixture * n * batch + s0, batch, 1, samples, chunk, NP, NP, de_q,
                                      NP);
                    }
                }
            }
        }
        free(buffer);
    }
    return failed ? -2 : 0;
}

/*
 * "premix" (paths.py's _KWConv2dPremixed): on small maps the inputs are mixed per cell instead of
 * assembling each sample's kernel.  cols is the NHWC im2col (batch, L, S * c_e): S = kernel
 * positions x input blocks, each c_e channels; weights (batch, OB * n, S) hold, per output block
 * and cell, the attention of each (position, input block).  The sums are only S = 9-18 long: the
 * runs of register tiles (run_tiles) take them, where torch.bmm ran these shapes at a seventh of
 * its speed on longer ones and the layouts its products need cost two transposing copies.
 * `NP` is the panel width (8, 16, 32 or 64, dividing c_e); each returns 0, or -1 if it cannot.
 */

/* mixed (batch, OB, L, n, c_e): for every (b, ob, l), weights[b, ob] (n x S) @ cols[b, l] (S x c_e),
 * the rows of the product with the stacked warehouse.  Items: (b, ob, l). */
int kw_native_premix(const float *cols, const float *weights, float *mixed, int batch, int L, int S, int c_e,
                     int OB, int n, int NP, int threads)
{
    if (!is_panel_width(NP) || c_e % NP)
        return -1;
    const long depth = (long)S * c_e, items = (long)batch * OB * L;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; item++) {
        const long block = item / L, b = block / OB;  /* block: (b, ob) */
        const int l = (int)(item % L);
        const float *w = weights + block * n * S, *x = cols + (b * L + l) * depth;
        float *out = mixed + item * n * c_e;
        run_rows_by_panels(n, 0, w, S, S, x, 0, NP, c_e, c_e / NP, NP, out, c_e);
    }
    return 0;
}

/* The gradient of kw_native_premix's cols: grad_cols[b, l] (S x c_e) = sum over ob of
 * weights_t[b, ob] (S x n, the weights transposed) @ grad_mixed[b, ob, l] (n x c_e).  Items: (b, l). */
int kw_native_premix_input_grad(const float *grad_mixed, const float *weights_t, float *grad_cols, int batch, int L,
                                int S, int c_e, int OB, int n, int NP, int threads)
{
    if (!is_panel_width(NP) || c_e % NP)
        return -1;
    const long depth = (long)S * c_e, items = (long)batch * L;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; item++) {
        const long b = item / L;
        const int l = (int)(item % L);
        float *out = grad_cols + item * depth;
        for (int ob = 0; ob < OB; ob++) {
            const long block = b * OB + ob;
            const float *w = weights_t + block * S * n, *g = grad_mixed + (block * L + l) * n * c_e;
            run_rows_by_panels(S, ob > 0, w, n, n, g, 0, NP, c_e, c_e / NP, NP, out, c_e);
        }
    }
    return 0;
}

/* The gradient of kw_native_premix's weights: grad_weights[b, ob] (n x S) = sum over l of
 * grad_mixed[b, ob, l] (n x c_e) @ cols[b, l]^T, in dot_block's blocks of rows.  c_e must be a
 * multiple of the vector width (16 covers every copy).  Items: (b, ob). */
int kw_native_premix_weight_grad(const float *grad_mixed, const float *cols, float *grad_weights, int batch, int L,
                                 int S, int c_e, int OB, int n, int threads)
{
    if (c_e % 16)
        return -1;
    const long depth = (long)S * c_e, items = (long)batch * OB;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; item++) {
        const long b = item / OB;
        const float *g = grad_mixed + item * L * n * c_e, *x = cols + b * L * depth;
        float *out = grad_weights + item * n * S;
        memset(out, 0, (size_t)n * S * sizeof(float));
        for (int j0 = 0; j0 < n; j0 += DOT_SAMPLES)
            for (int s0 = 0; s0 < S; s0 += DOT_CELLS) {
                const int J = n - j0 < DOT_SAMPLES ? n - j0 : DOT_SAMPLES, C = S - s0 < DOT_CELLS ? S - s0 : DOT_CELLS;
                dot_block(J, C, g + (long)j0 * c_e, (long)n * c_e, x + (long)s0 * c_e, depth, L, c_e,
                          out + (long)j0 * S + s0, S);
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

#if KW_VECTOR
/* The widest vectors of this build; masks only for the last, partial vector of channels:
 * masked stores are slow on some AVX-512 machines (AMD's), which made the kernel 4x slower
 * when every access was masked. */
#if KW_VECTOR >= 512
#define DW_WIDTH 16
typedef __m512 dw_vec;
typedef __mmask16 dw_mask;
#define DW_MASK(count) ((count) >= 16 ? (dw_mask)0xFFFF : (dw_mask)((1u << (count)) - 1))
#define DW_MASKED_LOAD(p, m) _mm512_maskz_loadu_ps(m, p)
#define DW_MASKED_STORE(p, m, v) _mm512_mask_storeu_ps(p, m, v)
#define DW_LOADU _mm512_loadu_ps
#define DW_STOREU _mm512_storeu_ps
#define DW_ZERO _mm512_setzero_ps
#define DW_FMA _mm512_fmadd_ps
#else
#define DW_WIDTH 8
typedef __m256 dw_vec;
typedef __m256i dw_mask;
#define DW_MASK(count) _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
#define DW_MASKED_LOAD(p, m) _mm256_maskload_ps(p, m)
#define DW_MASKED_STORE(p, m, v) _mm256_maskstore_ps(p, m, v)
#define DW_LOADU _mm256_loadu_ps
#define DW_STOREU _mm256_storeu_ps
#define DW_ZERO _mm256_setzero_ps
#define DW_FMA _mm256_fmadd_ps
#endif
#define DW_LOAD(p) (FULL ? DW_LOADU(p) : DW_MASKED_LOAD(p, mask))
#define DW_STORE(p, v) (FULL ? DW_STOREU(p, v) : DW_MASKED_STORE(p, mask, v))

/* Output pixels [ow0, ow1) of one row for channels [c0, c0 + DW_WIDTH), checking bounds per tap. */
static inline __attribute__((always_inline)) void dw_edge(const int FULL, const dw_row *r, int c0, dw_mask mask,
                                                          const dw_vec *taps, dw_vec start, int ow0, int ow1)
{
    for (int ow = ow0; ow < ow1; ow++) {
        dw_vec acc = start;
        for (int i = 0; i < r->kh; i++) {
            const int ih = r->oh * r->sh - r->pt + i * r->dh;
            if (ih < 0 || ih >= r->H)
                continue;
            for (int j = 0; j < r->kw; j++) {
                const int iw = ow * r->sw - r->pl + j * r->dw;
                if (iw >= 0 && iw < r->W)
                    acc = DW_FMA(DW_LOAD(r->x + ((long)ih * r->W + iw) * r->C + c0), taps[i * r->kw + j], acc);
            }
        }
        DW_STORE(r->y + (long)ow * r->C + c0, acc);
    }
}

/* Interior pixels [ow0, ow1): no bounds to check across the row, DW_PIXELS independent sums at a time. */
static inline __attribute__((always_inline)) void dw_interior(const int FULL, const dw_row *r, int c0,
                                                              dw_mask mask, const dw_vec *taps, dw_vec start,
                                                              int ow0, int ow1)
{
    int ow = ow0;
    const long step = (long)r->sw * r->C;
    for (; ow + DW_PIXELS <= ow1; ow += DW_PIXELS) {
        dw_vec acc[DW_PIXELS];
        for (int u = 0; u < DW_PIXELS; u++)
            acc[u] = start;
        for (int i = 0; i < r->kh; i++) {
            const int ih = r->oh * r->sh - r->pt + i * r->dh;
            if (ih < 0 || ih >= r->H)
                continue;
            for (int j = 0; j < r->kw; j++) {
                const float *x = r->x + ((long)ih * r->W + ow * r->sw - r->pl + j * r->dw) * r->C + c0;
                const dw_vec tap = taps[i * r->kw + j];
                for (int u = 0; u < DW_PIXELS; u++)
                    acc[u] = DW_FMA(DW_LOAD(x + u * step), tap, acc[u]);
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
    dw_vec taps[MAX_TAPS];
    for (int c0 = 0; c0 < r->C; c0 += DW_WIDTH) {
        const int full = r->C - c0 >= DW_WIDTH;
        const dw_mask mask = DW_MASK(r->C - c0);
        for (int s = 0; s < r->kh * r->kw; s++)
            taps[s] = DW_MASKED_LOAD(r->k + (long)s * r->C + c0, mask);
        const dw_vec start = r->bias ? DW_MASKED_LOAD(r->bias + c0, mask) : DW_ZERO();
        if (full) {
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

/*
 * The im2col of a channels-last image and its gradient, for the per-sample products above
 * (paths "inline", "native", "matmul" and "bmm"): X (batch, H, W, C), windows of kh x kw pixels
 * (stride sh, sw; dilation dh, dw; zeros where a window crosses the top / left padding pt, pl or
 * any edge), OH x OW of them.  PyTorch builds the same from a padded copy, a strided view and one
 * more copy (a transposed one for the weight gradient, which read the image 64 floats at a time:
 * 3.2 ms for the 7 MB of a 28 x 28 net's stage 3 at batch 64), and its gradient from a zeroed
 * padded image, one strided add per kernel position and a copy out of the padding.
 *
 * kw_native_im2col: cols (batch, OH * OW, kh * kw * C) in OHWI's K order, or with `transposed`
 * (batch, kh * kw * C, OH * OW).  Items (sample x output row, or x block of output pixels when
 * transposed) write disjoint parts of cols.
 */
#define IM2COL_PIXELS 64 /* output pixels gathered at a time */

/* Rows (k, pixels) of the transposed im2col for `count` output pixels of one sample, from each
 * pixel's C channels at src[p] (NULL: a zero row, the window off the image): 8 pixels x 8
 * channels at a time transposed in registers, the rest one by one. */
static void gather_transposed(const float *const *src, int count, int C, float *dst, long ld_dst)
{
    int whole_channels = 0, whole_pixels = 0;
#if KW_VECTOR >= 256
    static const float zeros[8];
    whole_channels = C / 8 * 8, whole_pixels = count / 8 * 8;
    for (int c0 = 0; c0 < whole_channels; c0 += 8)
        for (int p0 = 0; p0 < whole_pixels; p0 += 8) {
            const float *block[8];
            for (int i = 0; i < 8; i++)
                block[i] = src[p0 + i] ? src[p0 + i] + c0 : zeros;
            transpose8(block, dst + (long)c0 * ld_dst + p0, ld_dst);
        }
#endif
    for (int c = 0; c < C; c++)
        for (int p = c < whole_channels ? whole_pixels : 0; p < count; p++)
            dst[(long)c * ld_dst + p] = src[p] ? src[p][c] : 0.0f;
}

/* One row of the im2col (output pixel oh, ow: its kh * kw windows' C channels, in K order), a
 * kernel row at a time: with unit dilation the row's taps inside the image are adjacent pixels
 * of the input, one copy of up to kw * C floats (a copy per tap and pixel, 128 bytes each on the
 * 28 x 28 net's 32-channel layers, cost more in calls than in bytes). */
static void im2col_row(const float *x, int H, int W, int C, float *dst, int oh, int ow, int kh, int kw, int sh, int sw,
                       int pt, int pl, int dh, int dw)
{
    for (int i = 0; i < kh; i++, dst += (long)kw * C) {
        const int ih = oh * sh - pt + i * dh;
        if (ih < 0 || ih >= H) {
            memset(dst, 0, (size_t)kw * C * sizeof(float));
            continue;
        }
        const float *row = x + (long)ih * W * C;
        int j = 0;
        while (j < kw) {
            const int iw = ow * sw - pl + j * dw;
            if (iw < 0 || iw >= W) {
                memset(dst + (long)j * C, 0, (size_t)C * sizeof(float));
                j++;
                continue;
            }
            int run = 1; /* taps j, j + 1, ... on adjacent input pixels inside the image */
            while (dw == 1 && j + run < kw && iw + run < W)
                run++;
            memcpy(dst + (long)j * C, row + (long)iw * C, (size_t)run * C * sizeof(float));
            j += run;
        }
    }
}

int kw_native_im2col(const float *X, int H, int W, int C, float *cols, int OH, int OW, int kh, int kw, int sh,
                     int sw, int pt, int pl, int dh, int dw, int transposed, int batch, int threads)
{
    const long depth = (long)kh * kw * C, pixels = (long)OH * OW;
    /* transposed: blocks of IM2COL_PIXELS output pixels, across output rows (a row of a 7 x 7 map
     * alone is too short for 8-pixel blocks); else one output row per item */
    const long per_sample = transposed ? (pixels + IM2COL_PIXELS - 1) / IM2COL_PIXELS : OH;
    const long items = (long)batch * per_sample;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; item++) {
        const long b = item / per_sample, part = item % per_sample;
        const float *x = X + b * H * W * C;
        float *out = cols + b * depth * pixels;
        const long first = transposed ? part * IM2COL_PIXELS : part * OW;
        const long last = transposed ? (first + IM2COL_PIXELS < pixels ? first + IM2COL_PIXELS : pixels) : first + OW;
        if (!transposed) {
            for (long r = first; r < last; r++)
                im2col_row(x, H, W, C, out + r * depth, (int)(r / OW), (int)(r % OW), kh, kw, sh, sw, pt, pl, dh, dw);
            continue;
        }
        for (int i = 0; i < kh; i++)
            for (int j = 0; j < kw; j++) {
                const long k0 = ((long)i * kw + j) * C;
                for (long r0 = first; r0 < last; r0 += IM2COL_PIXELS) {
                    const int count = last - r0 < IM2COL_PIXELS ? (int)(last - r0) : IM2COL_PIXELS;
                    const float *src[IM2COL_PIXELS];
                    int oh = (int)(r0 / OW), ow = (int)(r0 % OW);
                    for (int p = 0; p < count; p++, ow = ow + 1 < OW ? ow + 1 : (oh++, 0)) {
                        const int ih = oh * sh - pt + i * dh, iw = ow * sw - pl + j * dw;
                        src[p] = ih >= 0 && ih < H && iw >= 0 && iw < W ? x + ((long)ih * W + iw) * C : NULL;
                    }
                    gather_transposed(src, count, C, out + k0 * pixels + r0, pixels);
                }
            }
    }
    return 0;
}

/*
 * kw_native_col2im: the gradient of the image from the gradient of its cols (batch, OH * OW,
 * kh * kw * C): each pixel sums the rows of the windows that read it, gathered rather than
 * scattered, so items (sample x image row) write disjoint pixels and nothing is zeroed first.
 */
int kw_native_col2im(const float *cols, int H, int W, int C, float *X, int OH, int OW, int kh, int kw, int sh, int sw,
                     int pt, int pl, int dh, int dw, int batch, int threads)
{
    const long depth = (long)kh * kw * C, pixels = (long)OH * OW;
    const long items = (long)batch * H;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long item = 0; item < items; item++) {
        const long b = item / H;
        const int ih = (int)(item % H);
        const float *rows = cols + b * depth * pixels;
        for (int iw = 0; iw < W; iw++) {
            float *dst = X + ((b * H + ih) * W + iw) * C;
            memset(dst, 0, C * sizeof(float));
            for (int i = 0; i < kh; i++) {
                const int t = ih + pt - i * dh;
                if (t < 0 || t % sh || t / sh >= OH)
                    continue;
                for (int j = 0; j < kw; j++) {
                    const int u = iw + pl - j * dw;
                    if (u < 0 || u % sw || u / sw >= OW)
                        continue;
                    const float *src = rows + ((long)(t / sh) * OW + u / sw) * depth + ((long)i * kw + j) * C;
                    for (int c = 0; c < C; c++)
                        dst[c] += src[c];
                }
            }
        }
    }
    return 0;
}

/* Importable as a module too (setuptools builds each ISA's copy as one, KW_MODULE naming it);
 * native.py loads it with ctypes. */
#ifndef KW_MODULE
#define KW_MODULE _native
#endif
#define KW_STRING2(x) #x
#define KW_STRING(x) KW_STRING2(x)
#define KW_INIT2(x) PyInit_##x
#define KW_INIT(x) KW_INIT2(x)

static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, KW_STRING(KW_MODULE),
                                           "kwconvert's compiled per-sample convolution (use kwconvert.methods.kernelwarehouse.native)",
                                           -1, NULL};

PyMODINIT_FUNC KW_INIT(KW_MODULE)(void) { return PyModule_Create(&native_module); }
