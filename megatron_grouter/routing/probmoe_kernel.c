/* ProbMoE's product tree as one fused CPU kernel (see probmoe_tree.py for the mathematics).
 *
 * The torch implementation runs the tree as ~1000 small tensor operations per chunk of tokens;
 * on CPU their dispatch and memory traffic, not arithmetic, bound it. Here a block of LANES
 * tokens walks the whole tree with every table in L1/L2; every quantity is a vector of LANES
 * doubles, one per token (GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones, ...),
 * so each multiply-add serves all tokens of the block. Same numerics as the torch version: fp64,
 * tilt by the k_max-th largest logit, clamp to [-R, R], linear-space convolutions.
 *
 * Layout of one table (tree levels, leaves first): level l has P >> l nodes of
 * size[l] = min(2^l, k_max) + 1 coefficients; node n's children are 2n and 2n + 1 one level
 * down; coefficient c of node n of level l is vector offset[l] + n size[l] + c.
 *
 * Entry points split the tokens across threads (OpenMP, see the end of the file); no global
 * state. They return 0, or -1 for an unsupported shape or a failed scratch allocation.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define LANES 8
#define MAX_DEPTH 24

typedef double vec __attribute__((vector_size(LANES * sizeof(double))));
typedef int64_t ivec __attribute__((vector_size(LANES * sizeof(int64_t))));

static inline vec splat(double x) { return (vec){0} + x; }
static inline vec select_(ivec mask, vec yes, vec no) { return (vec)((mask & (ivec)yes) | (~mask & (ivec)no)); }
static inline vec vmax(vec a, vec b) { return select_(a > b, a, b); }
static inline vec vmin(vec a, vec b) { return select_(a < b, a, b); }

/* e^x: x = n ln2 + r with n = round(x / ln2) (the 1.5 2^52 shifter rounds and leaves n in the low
 * mantissa bits), e^r by its Taylor series to r^13 (|r| <= ln2 / 2: relative error < 2e-16), 2^n
 * from the exponent bits. Arguments are clamped to [-700, 700]; below, the result (< 1e-304)
 * stands in for 0 in sums of probabilities. */
static inline vec vexp(vec x) {
    const vec shifter = splat(6755399441055744.0);
    x = vmin(vmax(x, splat(-700.0)), splat(700.0));
    const vec t = x * 1.4426950408889634 + shifter;
    const vec n = t - shifter;
    const vec r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
    vec p = splat(1.0 / 6227020800.0);
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    const ivec bits = ((ivec)t - (ivec)shifter + 1023) << 52;
    return p * (vec)bits;
}

static inline vec vlog(vec x) {
    vec out;
    for (int j = 0; j < LANES; j++) out[j] = log(x[j]);
    return out;
}

typedef struct {
    int experts, leaves, depth, k_min, k_max;
    int size[MAX_DEPTH + 1], nodes[MAX_DEPTH + 1], offset[MAX_DEPTH + 1];
    int total; /* coefficient vectors of one table, all levels */
    double radius;
} Shape;

static int make_shape(Shape *s, int experts, int k_min, int k_max, double radius) {
    if (experts < 1 || k_max < 1 || k_max > experts || k_min < 0 || k_min > k_max) return -1;
    s->experts = experts;
    s->k_min = k_min;
    s->k_max = k_max;
    s->radius = radius;
    s->depth = 0;
    while ((1 << s->depth) < experts) {
        if (++s->depth > MAX_DEPTH) return -1;
    }
    s->leaves = 1 << s->depth;
    s->total = 0;
    for (int l = 0; l <= s->depth; l++) {
        int width = (1 << l) < k_max ? (1 << l) : k_max;
        s->size[l] = width + 1;
        s->nodes[l] = s->leaves >> l;
        s->offset[l] = s->total;
        s->total += s->nodes[l] * s->size[l];
    }
    return 0;
}

static inline vec *node(const Shape *s, vec *table, int level, int n) {
    return table + s->offset[level] + n * s->size[level];
}

/* out[c] += sum_{a + b = c} x[a] y[b] for c < out_size (each output summed in a register) */
static inline void convolve_add(vec *restrict out, int out_size, const vec *restrict x, int x_size,
                                const vec *restrict y, int y_size) {
    for (int c = 0; c < out_size; c++) {
        const int lo = c - (y_size - 1) > 0 ? c - (y_size - 1) : 0, hi = c < x_size - 1 ? c : x_size - 1;
        vec acc = out[c];
        for (int a = lo; a <= hi; a++) acc += x[a] * y[c - a];
        out[c] = acc;
    }
}

/* out[a] += sum_b parent[a + b] sibling[b] for a < out_size, a + b < parent_size */
static inline void correlate_add(vec *restrict out, int out_size, const vec *restrict parent, int parent_size,
                                 const vec *restrict sibling, int sibling_size) {
    for (int a = 0; a < out_size; a++) {
        const int hi = parent_size - a < sibling_size ? parent_size - a : sibling_size;
        vec acc = out[a];
        for (int b = 0; b < hi; b++) acc += parent[a + b] * sibling[b];
        out[a] = acc;
    }
}

static void clear(vec *v, int count) { memset(v, 0, sizeof(vec) * (size_t)count); }

typedef struct {
    vec *levels, *outside, *dots, *outside_dots; /* [total] each (tangents only for the backward) */
    vec *clamped, *free_, *top;                   /* [experts], [experts] (1.0 / 0.0), [k_max] */
    vec *score, *posterior, *log_root;            /* [k_max + 1] */
    vec tilt, excess, log_total;
    void *block;
} Scratch;

static int scratch_alloc(Scratch *w, const Shape *s, int tangents) {
    const size_t tables = (size_t)s->total * (tangents ? 4 : 2);
    const size_t count = tables + 2 * (size_t)s->experts + (size_t)s->k_max + 3 * ((size_t)s->k_max + 1);
    w->block = aligned_alloc(sizeof(vec), count * sizeof(vec));
    if (!w->block) return -1;
    memset(w->block, 0, count * sizeof(vec));
    vec *next = w->block;
    w->levels = next, next += s->total;
    w->outside = next, next += s->total;
    w->dots = tangents ? next : NULL, next += tangents ? s->total : 0;
    w->outside_dots = tangents ? next : NULL, next += tangents ? s->total : 0;
    w->clamped = next, next += s->experts;
    w->free_ = next, next += s->experts;
    w->top = next, next += s->k_max;
    w->score = next, next += s->k_max + 1;
    w->posterior = next, next += s->k_max + 1;
    w->log_root = next;
    return 0;
}

/* a [count, E] row-major block of tokens as [E] vectors of lanes; lanes past `count` repeat the
 * block's first token so every lane holds valid numbers */
static void transpose_in(vec *out, const double *rows, int experts, int count) {
    for (int j = 0; j < LANES; j++) {
        const double *row = rows + (size_t)(j < count ? j : 0) * experts;
        for (int i = 0; i < experts; i++) out[i][j] = row[i];
    }
}

/* the k_max-th largest logit of each lane: a branch-free running sorted list (max/min per slot) */
static vec kth_largest(const Shape *s, Scratch *w) {
    const int K = s->k_max;
    for (int p = 0; p < K; p++) w->top[p] = splat(-INFINITY);
    for (int i = 0; i < s->experts; i++) {
        vec carry = w->clamped[i];
        for (int p = 0; p < K; p++) {
            const vec held = w->top[p];
            w->top[p] = vmax(held, carry);
            carry = vmin(held, carry);
        }
    }
    return w->top[K - 1];
}

/* tilt by the k_max-th largest logit (`tilt`, when the forward already found it, else computed),
 * clamp, leaf polynomials 1 + w x */
static void load_leaves(const Shape *s, Scratch *w, const double *logits, const double *tilt, int count) {
    const int E = s->experts;
    const vec radius = splat(s->radius), zero = splat(0.0), one = splat(1.0);
    transpose_in(w->clamped, logits, E, count);
    if (tilt) {
        for (int j = 0; j < LANES; j++) w->tilt[j] = tilt[j < count ? j : 0];
    } else {
        w->tilt = kth_largest(s, w);
    }
    w->excess = zero;
    for (int i = 0; i < E; i++) {
        const vec shifted = w->clamped[i] - w->tilt;
        w->excess += vmax(shifted - radius, zero);
        w->free_[i] = select_((shifted > -radius) & (shifted < radius), one, zero);
        w->clamped[i] = vmax(vmin(shifted, radius), -radius);
        vec *leaf = node(s, w->levels, 0, i);
        leaf[0] = one;
        leaf[1] = vexp(w->clamped[i]);
    }
    for (int i = E; i < s->leaves; i++) {
        vec *leaf = node(s, w->levels, 0, i);
        leaf[0] = one;
        leaf[1] = zero;
    }
}

static void up_sweep(const Shape *s, vec *table) {
    for (int l = 1; l <= s->depth; l++) {
        const int child = s->size[l - 1];
        for (int n = 0; n < s->nodes[l]; n++) {
            vec *parent = node(s, table, l, n);
            clear(parent, s->size[l]);
            convolve_add(parent, s->size[l], node(s, table, l - 1, 2 * n), child, node(s, table, l - 1, 2 * n + 1), child);
        }
    }
}

/* count posterior at the root, log root, the root's outside table and log sum_c e^{c tau} root[c]
 * over the allowed counts; every root coefficient c <= k_max is >= 1 after the tilt, so the logs
 * are finite */
static void root_posterior(const Shape *s, Scratch *w) {
    const int S = s->size[s->depth], lo = s->k_min, hi = s->k_max; /* S = k_max + 1: k_max <= E <= 2^depth */
    const vec *root = node(s, w->levels, s->depth, 0);
    vec *root_out = node(s, w->outside, s->depth, 0);
    vec best = splat(-INFINITY), sum = splat(0.0);
    for (int c = 0; c < S; c++) {
        w->log_root[c] = vlog(root[c]);
        w->score[c] = w->log_root[c] + w->tilt * (double)c;
    }
    for (int c = lo; c <= hi; c++) best = vmax(best, w->score[c]);
    for (int c = lo; c <= hi; c++) sum += vexp(w->score[c] - best);
    w->log_total = best + vlog(sum);
    for (int c = 0; c < S; c++) {
        w->posterior[c] = c >= lo && c <= hi ? vexp(w->score[c] - w->log_total) : splat(0.0);
        root_out[c] = w->posterior[c] / root[c];
    }
}

static void down_sweep(const Shape *s, vec *levels, vec *outside) {
    for (int l = s->depth; l >= 1; l--) {
        const int child = s->size[l - 1];
        for (int n = 0; n < s->nodes[l]; n++) {
            const vec *parent = node(s, outside, l, n);
            vec *left = node(s, outside, l - 1, 2 * n), *right = node(s, outside, l - 1, 2 * n + 1);
            clear(left, child);
            clear(right, child);
            correlate_add(left, child, parent, s->size[l], node(s, levels, l - 1, 2 * n + 1), child);
            correlate_add(right, child, parent, s->size[l], node(s, levels, l - 1, 2 * n), child);
        }
    }
}

static void forward_block(const Shape *s, Scratch *w, const double *logits, const double *tilt, int count) {
    load_leaves(s, w, logits, tilt, count);
    up_sweep(s, w->levels);
    root_posterior(s, w);
    down_sweep(s, w->levels, w->outside);
}

typedef uint64_t uvec __attribute__((vector_size(LANES * sizeof(uint64_t))));

/* splitmix64 per lane: a counter-based stream per token, so samples do not depend on the thread
 * split; uniforms in [0, 1) */
static inline vec uniform(uvec *state) {
    uvec z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return __builtin_convertvector(z >> 11, vec) * (1.0 / 9007199254740992.0);
}

static inline ivec imax(ivec a, ivec b) { return ((a > b) & a) | (~(a > b) & b); }
static inline ivec imin(ivec a, ivec b) { return ((a < b) & a) | (~(a < b) & b); }

/* one exact sample per lane, branch-free across lanes: the root count from the posterior
 * (dynamic-k), then top-down each node holding c picks gives a of them to its left child with
 * probability left[a] right[c - a] / node[c] (inverse CDF; right[c - a] gathered per lane).
 * `counts` holds one level's node counts, rewritten in place (children at 2n, 2n + 1); on return
 * its first E entries are the leaves' 0/1 picks. */
static void sample_block(const Shape *s, Scratch *w, uvec *state, ivec *counts) {
    const int hi = s->k_max;
    ivec c = (ivec){0} + s->k_max;
    if (s->k_min < hi) {
        const vec u = uniform(state);
        vec acc = splat(0.0);
        c = (ivec){0} + s->k_min;
        for (int k = s->k_min; k < hi; k++) {
            acc += w->posterior[k];
            c -= u >= acc; /* a true comparison is -1 */
        }
    }
    counts[0] = c;
    vec *cdf = w->score; /* free after the forward: k_max + 1 vectors */
    for (int l = s->depth; l >= 1; l--) {
        const int most = s->size[l - 1] - 1; /* a child holds at most this many picks */
        for (int n = s->nodes[l] - 1; n >= 0; n--) {
            const ivec here = counts[n];
            const vec *left = node(s, w->levels, l - 1, 2 * n), *right = node(s, w->levels, l - 1, 2 * n + 1);
            vec total = splat(0.0);
            for (int a = 0; a <= most; a++) {
                const ivec index = here - a, valid = (index >= 0) & (index <= most);
                vec other;
                for (int j = 0; j < LANES; j++) other[j] = valid[j] ? right[index[j]][j] : 0.0;
                total += left[a] * other;
                cdf[a] = total;
            }
            const vec target = uniform(state) * total;
            ivec left_count = (ivec){0};
            for (int a = 0; a < most; a++) left_count -= cdf[a] <= target;
            left_count = imin(imax(left_count, here - most), imin(here, (ivec){0} + most));
            counts[2 * n + 1] = here - left_count;
            counts[2 * n] = left_count;
        }
    }
}

static int forward_range(const Shape *shape, const double *logits, double *mu, unsigned char *mask, double *log_z,
                         double *entropy, double *tilt, uint64_t seed, int begin, int end) {
    const Shape s = *shape;
    const int experts = s.experts;
    Scratch w;
    ivec *counts = aligned_alloc(sizeof(ivec), sizeof(ivec) * (size_t)s.leaves);
    if (!counts || scratch_alloc(&w, &s, 0)) {
        free(counts);
        return -1;
    }
    const int S = s.size[s.depth];
    for (int t0 = begin; t0 < end; t0 += LANES) {
        const int count = end - t0 < LANES ? end - t0 : LANES;
        forward_block(&s, &w, logits + (size_t)t0 * experts, NULL, count);
        /* H = sum_c P(c) (log root[c] - log P(c)) - mu . clamped (the tilt and the clamp's excess cancel) */
        vec h = splat(0.0);
        for (int c = 0; c < S; c++) h += w.posterior[c] * (w.log_root[c] - (w.score[c] - w.log_total));
        for (int i = 0; i < experts; i++) {
            const vec m = node(&s, w.levels, 0, i)[1] * node(&s, w.outside, 0, i)[1];
            h -= m * w.clamped[i];
            for (int j = 0; j < count; j++) mu[(size_t)(t0 + j) * experts + i] = m[j];
        }
        for (int j = 0; j < count; j++) {
            const size_t t = (size_t)t0 + j;
            log_z[t] = w.log_total[j] + w.excess[j];
            entropy[t] = h[j] > 0 ? h[j] : 0.0;
            tilt[t] = w.tilt[j];
        }
        if (mask) {
            uvec state;
            for (int j = 0; j < LANES; j++) state[j] = seed ^ (0xD1B54A32D192ED03ull * ((uint64_t)t0 + j + 1));
            sample_block(&s, &w, &state, counts);
            for (int i = 0; i < experts; i++)
                for (int j = 0; j < count; j++) mask[(size_t)(t0 + j) * experts + i] = (unsigned char)counts[i][j];
        }
    }
    free(w.block);
    free(counts);
    return 0;
}

static int covariance_range(const Shape *shape, const double *logits, const double *tilt, const double *v,
                            double *grad, int begin, int end) {
    const Shape s = *shape;
    const int experts = s.experts;
    Scratch w;
    vec *direction = aligned_alloc(sizeof(vec), sizeof(vec) * (size_t)experts);
    if (!direction || scratch_alloc(&w, &s, 1)) {
        free(direction);
        return -1;
    }
    const int D = s.depth, S = s.size[D];
    for (int t0 = begin; t0 < end; t0 += LANES) {
        const int count = end - t0 < LANES ? end - t0 : LANES;
        forward_block(&s, &w, logits + (size_t)t0 * experts, tilt + t0, count);
        transpose_in(direction, v + (size_t)t0 * experts, experts, count);
        for (int i = 0; i < s.leaves; i++) { /* d(1 + w x) = w v x */
            vec *dot = node(&s, w.dots, 0, i);
            dot[0] = splat(0.0);
            dot[1] = i < experts ? node(&s, w.levels, 0, i)[1] * direction[i] : splat(0.0);
        }
        for (int l = 1; l <= D; l++) {
            const int child = s.size[l - 1];
            for (int n = 0; n < s.nodes[l]; n++) {
                vec *parent = node(&s, w.dots, l, n);
                clear(parent, s.size[l]);
                convolve_add(parent, s.size[l], node(&s, w.dots, l - 1, 2 * n), child,
                             node(&s, w.levels, l - 1, 2 * n + 1), child);
                convolve_add(parent, s.size[l], node(&s, w.levels, l - 1, 2 * n), child,
                             node(&s, w.dots, l - 1, 2 * n + 1), child);
            }
        }
        /* root outside O_c = P(c) / root[c]: its tangent is -O_c sum_c' O_c' root_dot[c'] */
        const vec *root_out = node(&s, w.outside, D, 0), *root_dot = node(&s, w.dots, D, 0);
        vec *root_out_dot = node(&s, w.outside_dots, D, 0);
        vec shift = splat(0.0);
        for (int c = 0; c < S; c++) shift += root_out[c] * root_dot[c];
        for (int c = 0; c < S; c++) root_out_dot[c] = -root_out[c] * shift;
        for (int l = D; l >= 1; l--) {
            const int child = s.size[l - 1];
            for (int n = 0; n < s.nodes[l]; n++) {
                const vec *parent = node(&s, w.outside, l, n), *parent_dot = node(&s, w.outside_dots, l, n);
                vec *left = node(&s, w.outside_dots, l - 1, 2 * n), *right = node(&s, w.outside_dots, l - 1, 2 * n + 1);
                const vec *left_in = node(&s, w.levels, l - 1, 2 * n), *right_in = node(&s, w.levels, l - 1, 2 * n + 1);
                const vec *left_dot = node(&s, w.dots, l - 1, 2 * n), *right_dot = node(&s, w.dots, l - 1, 2 * n + 1);
                clear(left, child);
                clear(right, child);
                correlate_add(left, child, parent_dot, s.size[l], right_in, child);
                correlate_add(left, child, parent, s.size[l], right_dot, child);
                correlate_add(right, child, parent_dot, s.size[l], left_in, child);
                correlate_add(right, child, parent, s.size[l], left_dot, child);
            }
        }
        for (int i = 0; i < experts; i++) {
            const vec g = (node(&s, w.dots, 0, i)[1] * node(&s, w.outside, 0, i)[1]
                           + node(&s, w.levels, 0, i)[1] * node(&s, w.outside_dots, 0, i)[1]) * w.free_[i];
            for (int j = 0; j < count; j++) grad[(size_t)(t0 + j) * experts + i] = g[j];
        }
    }
    free(w.block);
    free(direction);
    return 0;
}

/* [begin, end) of `tokens` for part `part` of `parts`: contiguous, LANES-aligned */
static void split(int tokens, int parts, int part, int *begin, int *end) {
    const long blocks = (tokens + LANES - 1) / LANES, per = (blocks + parts - 1) / parts;
    const long lo = part * per * LANES, hi = (part + 1) * per * LANES;
    *begin = (int)(lo < tokens ? lo : tokens);
    *end = (int)(hi < tokens ? hi : tokens);
}

/* The token range is split across `threads` OpenMP threads when built with -fopenmp (inside a
 * torch process: torch's own libgomp pool, so nothing competes with its spinning workers), else
 * run on the calling thread. */
#ifdef _OPENMP
#define PART omp_get_thread_num()
#define PARTS omp_get_num_threads()
#else
#define PART 0
#define PARTS 1
#endif

int probmoe_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

typedef struct {
    Shape shape;
    const double *logits, *tilt, *v;
    double *mu, *log_z, *entropy, *tilt_out, *grad;
    unsigned char *mask;
    uint64_t seed;
} Job;

static int forward_job(const Job *job, int begin, int end) {
    return forward_range(&job->shape, job->logits, job->mu, job->mask, job->log_z, job->entropy, job->tilt_out,
                         job->seed, begin, end);
}

static int covariance_job(const Job *job, int begin, int end) {
    return covariance_range(&job->shape, job->logits, job->tilt, job->v, job->grad, begin, end);
}

/* `range` over [0, tokens), one contiguous part per thread; -1 if any part failed */
static int run_parallel(int (*range)(const Job *, int, int), const Job *job, int tokens, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
        int begin, end;
        split(tokens, PARTS, PART, &begin, &end);
        if (begin < end) failed |= range(job, begin, end);
    }
    return failed ? -1 : 0;
}

/* marginals mu [T, E], log Z [T], entropy [T], the tilt [T] (for the backward) and (mask not
 * NULL) one exact sample [T, E] for fp64 logits [T, E] */
int probmoe_forward(int tokens, int experts, int k_min, int k_max, double radius, const double *logits,
                    double *mu, unsigned char *mask, double *log_z, double *entropy, double *tilt,
                    uint64_t seed, int threads) {
    Job job = {.logits = logits, .mu = mu, .mask = mask, .log_z = log_z, .entropy = entropy, .tilt_out = tilt,
               .seed = seed};
    if (tokens < 0 || make_shape(&job.shape, experts, k_min, k_max, radius)) return -1;
    return run_parallel(forward_job, &job, tokens, threads);
}

/* grad = Cov(z) v per token, 0 on clamped logits: the forward tangent of mu along v, pushed through
 * both sweeps (see probmoe_tree); the caller adds grad_log_z mu. `tilt` is the forward's. */
int probmoe_covariance_vector(int tokens, int experts, int k_min, int k_max, double radius, const double *logits,
                              const double *tilt, const double *v, double *grad, int threads) {
    Job job = {.logits = logits, .tilt = tilt, .v = v, .grad = grad};
    if (tokens < 0 || make_shape(&job.shape, experts, k_min, k_max, radius)) return -1;
    return run_parallel(covariance_job, &job, tokens, threads);
}
