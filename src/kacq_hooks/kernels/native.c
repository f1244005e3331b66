/* One pass over C (and over C and dL/dC) for the dense CPU reductions of kacq_hooks.
 *
 * The specification is kernels/reference.py: per column j of a [n, d] coefficient block, over the valid
 * rows, |C| is summed, squared and summed, maxed, counted where > 0, and NaN/Inf are counted and kept out
 * of every other statistic. Torch's eager ops need about six passes over C for that; this file reads C
 * once. Columns are split into tiles, one per thread (more for very wide layers), so every thread streams
 * its part of each row in order and keeps the tile's accumulators in L1/L2. Rows are summed in fp32 in chunks of CHUNK rows whose
 * partial sums are added in double: at least as exact as the reference's fp32 sums, and the same for any
 * thread count (each column is summed in row order by one thread).
 *
 * NaN and Inf are not tested per element: they make a column sum non-finite (|NaN| and |Inf| in the sum
 * of |C|; C * g for a non-finite C or g), and then the kernel writes nothing and returns 1, and the caller
 * hands the block to the reference, which counts them and keeps them out of the sums. A block is
 * committed only after every tile is known to be finite.
 *
 * Built at first use by kernels/native.py with the system C compiler; linked against libgomp.so.1, the
 * OpenMP runtime torch's CPU wheels already loaded, so both share one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TILE 4096 /* columns a tile's accumulators cover (~200 KiB of them, in L2) */
#define CHUNK 256     /* rows summed in fp32 before the partial sums are added into double */

/* Tiles as wide as possible (C is then read row by row, in order) but at least one per thread. */
static int64_t tile_width(int64_t d, int threads) {
    if (d <= 0) return 16; /* no columns: no tiles; never divide by zero */
    int64_t tiles = (d + MAX_TILE - 1) / MAX_TILE;
    if (threads > 1 && tiles < threads) tiles = threads;
    if (threads > 1) tiles = (tiles + threads - 1) / threads * threads;
    int64_t width = (d + tiles - 1) / tiles;
    width = (width + 15) / 16 * 16; /* whole cache lines of fp32 */
    return width > 0 ? width : 16;
}

/* dtype codes, as kernels/native.py passes them */
enum { KACQ_F32 = 0, KACQ_BF16 = 1 };

static inline float bf16(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

#define LOAD_F32(p, i) (((const float *)(p))[i])
#define LOAD_BF16(p, i) bf16(((const uint16_t *)(p))[i])

/* One row's tile into the fp32/int32 partials; branch-free, so the compiler vectorizes it. */
#define FORWARD_ROW(LOAD, WEIGHTED)                                                                           \
    for (int64_t k = 0; k < width; ++k) {                                                                    \
        const float a = fabsf(LOAD(row, k));                                                                 \
        p1[k] += a;                                                                                          \
        p2[k] += a * a; /* squared in fp32, as the reference */                                              \
        mx[k] = a > mx[k] ? a : mx[k];                                                                       \
        act[k] += a > 0.0f;                                                                                  \
        if (WEIGHTED) pw[k] += w * a;                                                                        \
    }

#define FORWARD_ROWS(LOAD, WEIGHTED)                                                                          \
    for (int64_t r = r0; r < r1; ++r) {                                                                      \
        if (valid && !valid[r]) continue;                                                                    \
        const void *row = (const char *)c + (r * row_stride + j0) * elem;                                    \
        const float w = WEIGHTED ? doc_weight[r] : 0.0f;                                                     \
        FORWARD_ROW(LOAD, WEIGHTED)                                                                          \
    }

/* Unweighted rows, four at a time: a quarter of the accumulator loads and stores of FORWARD_ROWS. */
#define FORWARD_ROWS4(LOAD)                                                                                   \
    {                                                                                                        \
        const void *picked[CHUNK];                                                                           \
        int64_t m = 0;                                                                                       \
        for (int64_t r = r0; r < r1; ++r)                                                                    \
            if (!valid || valid[r]) picked[m++] = (const char *)c + (r * row_stride + j0) * elem;            \
        int64_t i = 0;                                                                                       \
        for (; i + 4 <= m; i += 4) {                                                                         \
            const void *q0 = picked[i], *q1 = picked[i + 1], *q2 = picked[i + 2], *q3 = picked[i + 3];       \
            for (int64_t k = 0; k < width; ++k) {                                                            \
                const float a0 = fabsf(LOAD(q0, k)), a1 = fabsf(LOAD(q1, k));                                \
                const float a2 = fabsf(LOAD(q2, k)), a3 = fabsf(LOAD(q3, k));                                \
                p1[k] += (a0 + a1) + (a2 + a3);                                                              \
                p2[k] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3);                                          \
                const float m01 = a0 > a1 ? a0 : a1, m23 = a2 > a3 ? a2 : a3, m4 = m01 > m23 ? m01 : m23;    \
                mx[k] = m4 > mx[k] ? m4 : mx[k];                                                             \
                act[k] += (a0 > 0.0f) + (a1 > 0.0f) + (a2 > 0.0f) + (a3 > 0.0f);                             \
            }                                                                                                \
        }                                                                                                    \
        for (; i < m; ++i) {                                                                                 \
            const void *row = picked[i];                                                                     \
            const float w = 0.0f;                                                                            \
            FORWARD_ROW(LOAD, 0)                                                                             \
        }                                                                                                    \
    }

/* The output buffers each kernel takes, in the order of its arguments. kernels/native.py builds its argument
 * list from the statistics table (kacq_hooks/stats.py) and loads this library only if these names match it:
 * a statistic added there needs its lines here and its name in this list. */
const char *const kacq_forward_outputs = "sum_abs,sum_sq,active,max_abs,doc_sum_abs";
const char *const kacq_backward_outputs = "grad_sum_abs,grad_sum_cg";

typedef struct {
    double s1, s2, sw;
    float mx;
    int64_t act;
} column_t;

/* Adds one block's forward statistics into the output buffers (each of length d), or returns 1 and writes
 * nothing when a column sum is non-finite. valid (n bytes) and doc_weight (n floats) may be NULL;
 * doc_sum_abs is written only when doc_weight is given. */
int kacq_forward(const void *c, int dtype, int64_t n, int64_t d, int64_t row_stride, const uint8_t *valid,
                 const float *doc_weight, float *sum_abs, float *sum_sq, int64_t *active, float *max_abs,
                 float *doc_sum_abs, int threads) {
    const int64_t tile = tile_width(d, threads), tiles = (d + tile - 1) / tile;
    const int64_t elem = dtype == KACQ_BF16 ? 2 : 4;
    column_t *cols = malloc(sizeof(column_t) * (d > 0 ? d : 1));
    if (!cols) return 2;
    int nonfinite = 0, failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n * d > 65536) \
    reduction(| : nonfinite, failed)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t j0 = t * tile;
        const int64_t width = d - j0 < tile ? d - j0 : tile;
        double *scratch = malloc(tile * (3 * sizeof(double) + 4 * sizeof(float) + sizeof(int32_t) + sizeof(int64_t)));
        if (!scratch) {
            failed = 1;
            continue;
        }
        double *s1 = scratch, *s2 = s1 + tile, *sw = s2 + tile;
        float *p1 = (float *)(sw + tile), *p2 = p1 + tile, *pw = p2 + tile, *mx = pw + tile;
        int64_t *act_total = (int64_t *)(mx + tile);
        int32_t *act = (int32_t *)(act_total + tile);
        for (int64_t k = 0; k < width; ++k) {
            s1[k] = s2[k] = sw[k] = 0.0;
            mx[k] = 0.0f;
            act_total[k] = 0;
        }
        for (int64_t r0 = 0; r0 < n; r0 += CHUNK) {
            const int64_t r1 = r0 + CHUNK < n ? r0 + CHUNK : n;
            for (int64_t k = 0; k < width; ++k) {
                p1[k] = p2[k] = pw[k] = 0.0f;
                act[k] = 0;
            }
            if (dtype == KACQ_BF16) {
                if (doc_weight) { FORWARD_ROWS(LOAD_BF16, 1) } else { FORWARD_ROWS4(LOAD_BF16) }
            } else {
                if (doc_weight) { FORWARD_ROWS(LOAD_F32, 1) } else { FORWARD_ROWS4(LOAD_F32) }
            }
            for (int64_t k = 0; k < width; ++k) {
                s1[k] += p1[k];
                s2[k] += p2[k];
                sw[k] += pw[k];
                act_total[k] += act[k];
            }
        }
        for (int64_t k = 0; k < width; ++k) {
            nonfinite |= !isfinite(s1[k]);
            cols[j0 + k] = (column_t){s1[k], s2[k], sw[k], mx[k], act_total[k]};
        }
        free(scratch);
    }
    if (failed) {
        free(cols);
        return 2;
    }
    if (!nonfinite) {
        for (int64_t j = 0; j < d; ++j) {
            sum_abs[j] += (float)cols[j].s1;
            sum_sq[j] += (float)cols[j].s2;
            max_abs[j] = cols[j].mx > max_abs[j] ? cols[j].mx : max_abs[j];
            active[j] += cols[j].act;
            if (doc_weight) doc_sum_abs[j] += (float)cols[j].sw;
        }
    }
    free(cols);
    return nonfinite;
}

/* Valid rows four at a time (a quarter of the accumulator loads and stores), then the rest one by one. */
#define BACKWARD_ROWS(LOAD)                                                                                   \
    {                                                                                                        \
        const void *cs[CHUNK], *gs[CHUNK];                                                                   \
        int64_t m = 0;                                                                                       \
        for (int64_t r = r0; r < r1; ++r)                                                                    \
            if (!valid || valid[r]) {                                                                        \
                cs[m] = (const char *)c + (r * c_stride + j0) * elem;                                        \
                gs[m++] = (const char *)g + (r * g_stride + j0) * elem;                                      \
            }                                                                                                \
        int64_t i = 0;                                                                                       \
        for (; i + 4 <= m; i += 4) {                                                                         \
            for (int64_t k = 0; k < width; ++k) {                                                            \
                const float g0 = LOAD(gs[i], k), g1 = LOAD(gs[i + 1], k);                                    \
                const float g2 = LOAD(gs[i + 2], k), g3 = LOAD(gs[i + 3], k);                                \
                pa[k] += (fabsf(g0) + fabsf(g1)) + (fabsf(g2) + fabsf(g3));                                  \
                /* each product in fp32, as the reference */                                                 \
                pcg[k] += (LOAD(cs[i], k) * g0 + LOAD(cs[i + 1], k) * g1) +                                  \
                          (LOAD(cs[i + 2], k) * g2 + LOAD(cs[i + 3], k) * g3);                               \
            }                                                                                                \
        }                                                                                                    \
        for (; i < m; ++i)                                                                                   \
            for (int64_t k = 0; k < width; ++k) {                                                            \
                const float gv = LOAD(gs[i], k);                                                             \
                pa[k] += fabsf(gv);                                                                          \
                pcg[k] += LOAD(cs[i], k) * gv;                                                               \
            }                                                                                                \
    }

/* Adds one block's gradient statistics (sum |g| and sum C * g over valid rows), or returns 1 and writes
 * nothing when a column sum is non-finite (a NaN or Inf in C or g reaches the sum of C * g). */
int kacq_backward(const void *c, const void *g, int dtype, int64_t n, int64_t d, int64_t c_stride,
                  int64_t g_stride, const uint8_t *valid, float *grad_sum_abs, float *grad_sum_cg, int threads) {
    const int64_t tile = tile_width(d, threads), tiles = (d + tile - 1) / tile;
    const int64_t elem = dtype == KACQ_BF16 ? 2 : 4;
    double *cols = malloc(sizeof(double) * 2 * (d > 0 ? d : 1));
    if (!cols) return 2;
    int nonfinite = 0, failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n * d > 65536) \
    reduction(| : nonfinite, failed)
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t j0 = t * tile;
        const int64_t width = d - j0 < tile ? d - j0 : tile;
        double *scratch = malloc(tile * (2 * sizeof(double) + 2 * sizeof(float)));
        if (!scratch) {
            failed = 1;
            continue;
        }
        double *sa = scratch, *scg = sa + tile;
        float *pa = (float *)(scg + tile), *pcg = pa + tile;
        for (int64_t k = 0; k < width; ++k) sa[k] = scg[k] = 0.0;
        for (int64_t r0 = 0; r0 < n; r0 += CHUNK) {
            const int64_t r1 = r0 + CHUNK < n ? r0 + CHUNK : n;
            for (int64_t k = 0; k < width; ++k) pa[k] = pcg[k] = 0.0f;
            if (dtype == KACQ_BF16) { BACKWARD_ROWS(LOAD_BF16) } else { BACKWARD_ROWS(LOAD_F32) }
            for (int64_t k = 0; k < width; ++k) {
                sa[k] += pa[k];
                scg[k] += pcg[k];
            }
        }
        for (int64_t k = 0; k < width; ++k) {
            nonfinite |= !isfinite(sa[k]) | !isfinite(scg[k]);
            cols[2 * (j0 + k)] = sa[k];
            cols[2 * (j0 + k) + 1] = scg[k];
        }
        free(scratch);
    }
    if (failed) {
        free(cols);
        return 2;
    }
    if (!nonfinite) {
        for (int64_t j = 0; j < d; ++j) {
            grad_sum_abs[j] += (float)cols[2 * j];
            grad_sum_cg[j] += (float)cols[2 * j + 1];
        }
    }
    free(cols);
    return nonfinite;
}

/* Routed experts: the rows of C of a mixture-of-experts layer, each row belonging to one expert (its slots are
 * expert * m .. expert * m + m - 1) and scaled by its routing weight. The specification is
 * reference.accumulate_experts: per slot, over the valid rows of the slot's expert, a = |C| * |w| (formed in
 * fp32, as the reference forms it, here in a register) is summed, squared and summed, maxed, counted where
 * > 0, and weighted by the document weight; the rows the router picked (w != 0) add their unscaled |C| and
 * are counted. No [n, m] temporary is formed: each (expert, column tile) is one work item that streams its
 * expert's rows in order, so every slot is summed in row order by one thread, whatever the thread count.
 *
 * ids (n, int64) is the expert of each row. Rows already grouped by expert (eager: one expert per call;
 * grouped_mm: sorted) are read in place; rows in token order (batched_mm) are read through their grouped order
 * (a counting sort of the ids, stable), never copied. weight (n, fp32: the routing weight, whose absolute value
 * scales the row), keep and doc_weight are indexed by the row of c. As in kacq_forward, a non-finite slot sum
 * (a NaN or Inf in C on a valid row makes |C| * |w| NaN or Inf) writes nothing and returns 1, and the caller
 * hands the block to the reference; an id outside 0..experts-1 writes nothing and returns 3.
 *
 * Eager experts hand one expert's rows at a time as (token, top-k position) pairs: with gather_token non-NULL,
 * row r is token gather_token[r] at position gather_pos[r] of expert gather_expert, and weight ([tokens, k],
 * fp32), keep and doc_weight ([tokens], either may be NULL: every token valid, no document weights) are read per
 * token. The per-row arrays are gathered here, in one loop, rather than by four torch ops per expert; a token
 * or position out of range writes nothing and returns 3. */
const char *const kacq_routed_outputs =
    "sum_abs,sum_sq,active,max_abs,doc_sum_abs,routed_sum_abs,routed_tokens";

#define ROUTED_ROW(LOAD, DOC)                                                                                 \
    for (int64_t k = 0; k < width; ++k) {                                                                    \
        const float raw = fabsf(LOAD(row, k));                                                               \
        const float a = raw * w; /* |w C|, in fp32 as the reference */                                       \
        p1[k] += a;                                                                                          \
        p2[k] += a * a;                                                                                      \
        mx[k] = a > mx[k] ? a : mx[k];                                                                       \
        act[k] += a > 0.0f;                                                                                  \
        pr[k] += raw * picked;                                                                               \
    }                                                                                                        \
    if (DOC) /* a loop of its own: with it in the loop above, gcc does not vectorize that loop */            \
        for (int64_t k = 0; k < width; ++k) pw[k] += dw * (fabsf(LOAD(row, k)) * w);

/* The valid rows of a chunk, four at a time (a quarter of the accumulator loads and stores), then one by one. */
#define ROUTED_ROWS(LOAD, DOC)                                                                                \
    {                                                                                                        \
        const void *rows[CHUNK];                                                                             \
        float ws[CHUNK], fs[CHUNK], ds[CHUNK];                                                               \
        int64_t m4 = 0;                                                                                      \
        for (int64_t q = q0; q < q1; ++q) {                                                                  \
            const int64_t r = order ? order[q] : q;                                                          \
            if (!keep[r]) continue;                                                                          \
            rows[m4] = (const char *)c + (r * row_stride + j0) * elem;                                       \
            ws[m4] = fabsf(weight[r]);                                                                       \
            fs[m4] = ws[m4] != 0.0f ? 1.0f : 0.0f; /* routed: a NaN/Inf raw makes |w C| NaN/Inf too */      \
            ds[m4++] = DOC ? doc_weight[r] : 0.0f;                                                           \
        }                                                                                                    \
        int64_t i = 0;                                                                                       \
        for (; i + 4 <= m4; i += 4) {                                                                        \
            const void *q0r = rows[i], *q1r = rows[i + 1], *q2r = rows[i + 2], *q3r = rows[i + 3];           \
            const float w0 = ws[i], w1 = ws[i + 1], w2 = ws[i + 2], w3 = ws[i + 3];                          \
            const float f0 = fs[i], f1 = fs[i + 1], f2 = fs[i + 2], f3 = fs[i + 3];                          \
            for (int64_t k = 0; k < width; ++k) {                                                            \
                const float r0 = fabsf(LOAD(q0r, k)), r1 = fabsf(LOAD(q1r, k));                              \
                const float r2 = fabsf(LOAD(q2r, k)), r3 = fabsf(LOAD(q3r, k));                              \
                const float a0 = r0 * w0, a1 = r1 * w1, a2 = r2 * w2, a3 = r3 * w3; /* |w C| in fp32 */      \
                p1[k] += (a0 + a1) + (a2 + a3);                                                              \
                p2[k] += (a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3);                                          \
                const float m01 = a0 > a1 ? a0 : a1, m23 = a2 > a3 ? a2 : a3, mm = m01 > m23 ? m01 : m23;    \
                mx[k] = mm > mx[k] ? mm : mx[k];                                                             \
                act[k] += (a0 > 0.0f) + (a1 > 0.0f) + (a2 > 0.0f) + (a3 > 0.0f);                             \
                pr[k] += (r0 * f0 + r1 * f1) + (r2 * f2 + r3 * f3);                                          \
            }                                                                                                \
            if (DOC) /* a loop of its own: inside the loop above, gcc does not vectorize it */               \
                for (int64_t k = 0; k < width; ++k)                                                          \
                    pw[k] += (ds[i] * (fabsf(LOAD(q0r, k)) * w0) + ds[i + 1] * (fabsf(LOAD(q1r, k)) * w1)) + \
                             (ds[i + 2] * (fabsf(LOAD(q2r, k)) * w2) + ds[i + 3] * (fabsf(LOAD(q3r, k)) * w3)); \
        }                                                                                                    \
        for (; i < m4; ++i) {                                                                                \
            const void *row = rows[i];                                                                       \
            const float w = ws[i], picked = fs[i], dw = ds[i];                                               \
            ROUTED_ROW(LOAD, DOC)                                                                            \
        }                                                                                                    \
    }

typedef struct {
    double s1, s2, sw, sr;
    float mx;
    int64_t act;
} routed_column_t;

/* The per-row arrays of eager's (token, top-k position) pairs, in one block (see kacq_routed); NULL when out of
 * memory, *bad set when a token or position is out of range. */
static void *gather_rows(int64_t n, const int64_t *token, const int64_t *pos, int64_t expert, int64_t tokens,
                         int64_t k, const float *weight, const uint8_t *keep, const float *doc_weight, int *bad) {
    void *block = malloc(n > 0 ? n * (sizeof(int64_t) + 2 * sizeof(float) + 1) : 1);
    if (!block) return NULL;
    int64_t *ids = block;
    float *w = (float *)(ids + n), *doc = w + n;
    uint8_t *valid = (uint8_t *)(doc + n);
    for (int64_t r = 0; r < n; ++r) {
        const int64_t t = token[r], p = pos[r];
        if (t < 0 || t >= tokens || p < 0 || p >= k) {
            *bad = 1;
            break;
        }
        ids[r] = expert;
        w[r] = weight[t * k + p];
        valid[r] = keep ? keep[t] : 1;
        doc[r] = doc_weight ? doc_weight[t] : 0.0f;
    }
    return block;
}

int kacq_routed(const void *c, int dtype, int64_t n, int64_t m, int64_t row_stride, const int64_t *ids,
                int64_t experts, const float *weight, const uint8_t *keep, const float *doc_weight,
                const int64_t *gather_token, const int64_t *gather_pos, int64_t gather_expert, int64_t tokens,
                int64_t k, float *sum_abs, float *sum_sq, int64_t *active, float *max_abs, float *doc_sum_abs,
                float *routed_sum_abs, int64_t *routed_tokens, int threads) {
    void *gathered = NULL;
    if (gather_token) {
        int bad = 0;
        gathered = gather_rows(n, gather_token, gather_pos, gather_expert, tokens, k, weight, keep, doc_weight, &bad);
        if (!gathered) return 2;
        if (bad) {
            free(gathered);
            return 3;
        }
        ids = gathered;
        weight = (const float *)(ids + n);
        doc_weight = doc_weight ? weight + n : NULL;
        keep = (const uint8_t *)(weight + 2 * n);
    }
    const int64_t tile = tile_width(m, threads), tiles = (m + tile - 1) / tile;
    const int64_t elem = dtype == KACQ_BF16 ? 2 : 4;
    int64_t *starts = calloc(2 * experts + 1, sizeof(int64_t)), *hit = starts + experts + 1;
    if (!starts) {
        free(gathered);
        return 2;
    }
    int grouped = 1;
    for (int64_t r = 0; r < n; ++r) {
        if (ids[r] < 0 || ids[r] >= experts) {
            free(starts);
            free(gathered);
            return 3;
        }
        starts[ids[r] + 1] += 1;
        grouped &= r == 0 || ids[r] >= ids[r - 1];
    }
    int64_t hits = 0; /* only the experts that received rows are reduced and written (eager: one a call) */
    for (int64_t e = 0; e < experts; ++e) {
        if (starts[e + 1]) hit[hits++] = e;
        starts[e + 1] += starts[e];
    }
    const int64_t items = hits * tiles;
    int64_t *order = NULL;
    if (!grouped) { /* a stable counting sort: each expert's rows in token order */
        order = malloc(sizeof(int64_t) * (n > 0 ? n : 1));
        int64_t *next = malloc(sizeof(int64_t) * (experts > 0 ? experts : 1));
        if (!order || !next) {
            free(order);
            free(next);
            free(starts);
            free(gathered);
            return 2;
        }
        memcpy(next, starts, sizeof(int64_t) * experts);
        for (int64_t r = 0; r < n; ++r) order[next[ids[r]]++] = r;
        free(next);
    }
    routed_column_t *cols = malloc(sizeof(routed_column_t) * (hits * m > 0 ? hits * m : 1));
    int64_t *picked_rows = calloc(hits > 0 ? hits : 1, sizeof(int64_t));
    if (!cols || !picked_rows) {
        free(cols);
        free(picked_rows);
        free(order);
        free(starts);
        free(gathered);
        return 2;
    }
    int nonfinite = 0, failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) \
    if (threads > 1 && n * m > 65536) reduction(| : nonfinite, failed)
    for (int64_t item = 0; item < items; ++item) {
        const int64_t h = item / tiles, e = hit[h], j0 = (item % tiles) * tile;
        const int64_t width = m - j0 < tile ? m - j0 : tile;
        double *scratch = malloc(tile * (4 * sizeof(double) + 5 * sizeof(float) + sizeof(int32_t) + sizeof(int64_t)));
        if (!scratch) {
            failed = 1;
            continue;
        }
        /* restrict: the accumulators never overlap, so the row loop vectorizes without runtime alias checks */
        double *restrict s1 = scratch, *restrict s2 = s1 + tile, *restrict sw = s2 + tile, *restrict sr = sw + tile;
        float *restrict p1 = (float *)(sr + tile), *restrict p2 = p1 + tile, *restrict pw = p2 + tile;
        float *restrict pr = pw + tile, *restrict mx = pr + tile;
        int64_t *restrict act_total = (int64_t *)(mx + tile);
        int32_t *restrict act = (int32_t *)(act_total + tile);
        for (int64_t k = 0; k < width; ++k) {
            s1[k] = s2[k] = sw[k] = sr[k] = 0.0;
            mx[k] = 0.0f;
            act_total[k] = 0;
        }
        for (int64_t q0 = starts[e]; q0 < starts[e + 1]; q0 += CHUNK) {
            const int64_t q1 = q0 + CHUNK < starts[e + 1] ? q0 + CHUNK : starts[e + 1];
            for (int64_t k = 0; k < width; ++k) {
                p1[k] = p2[k] = pw[k] = pr[k] = 0.0f;
                act[k] = 0;
            }
            if (dtype == KACQ_BF16) {
                if (doc_weight) { ROUTED_ROWS(LOAD_BF16, 1) } else { ROUTED_ROWS(LOAD_BF16, 0) }
            } else {
                if (doc_weight) { ROUTED_ROWS(LOAD_F32, 1) } else { ROUTED_ROWS(LOAD_F32, 0) }
            }
            for (int64_t k = 0; k < width; ++k) {
                s1[k] += p1[k];
                s2[k] += p2[k];
                sw[k] += pw[k];
                sr[k] += pr[k];
                act_total[k] += act[k];
            }
        }
        for (int64_t k = 0; k < width; ++k) {
            nonfinite |= !isfinite(s1[k]) | !isfinite(s2[k]) | !isfinite(sr[k]);
            cols[h * m + j0 + k] = (routed_column_t){s1[k], s2[k], sw[k], sr[k], mx[k], act_total[k]};
        }
        if (j0 == 0) { /* the expert's load, counted once */
            int64_t count = 0;
            for (int64_t q = starts[e]; q < starts[e + 1]; ++q) {
                const int64_t r = order ? order[q] : q;
                count += keep[r] && fabsf(weight[r]) != 0.0f;
            }
            picked_rows[h] = count;
        }
        free(scratch);
    }
    if (!failed && !nonfinite)
        for (int64_t h = 0; h < hits; ++h)
            for (int64_t k = 0; k < m; ++k) {
                const routed_column_t *col = &cols[h * m + k];
                const int64_t j = hit[h] * m + k;
                sum_abs[j] += (float)col->s1;
                sum_sq[j] += (float)col->s2;
                max_abs[j] = col->mx > max_abs[j] ? col->mx : max_abs[j];
                active[j] += col->act;
                if (doc_weight) doc_sum_abs[j] += (float)col->sw;
                routed_sum_abs[j] += (float)col->sr;
                routed_tokens[j] += picked_rows[h];
            }
    free(order);
    free(starts);
    free(cols);
    free(picked_rows);
    free(gathered);
    return failed ? 2 : nonfinite;
}
