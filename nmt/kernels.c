/* kernels.c — fused CPU kernels of the additive attention's energies (nmt/kernels.py builds and loads this file).
 *
 * Rows r < rows are queries q [rows, A]; query row r attends key row r / per of keys [., steps, A] (per: the
 * hypotheses of a sentence in a beam, 1 in training), over that key row's first lengths[r / per] positions.
 * u = tanh(q + k) is never stored: the forward makes one pass over the keys, the backward recomputes u in its
 * own single pass. */
#include <float.h>
#include <math.h>
#include <string.h>

/* tanh as a rational function (Eigen's float approximation, also XLA's): an odd numerator of degree 13 over an
 * even denominator of degree 6, the input clamped to +-7.9053, where tanh rounds to 1 in float32. It
 * vectorizes, unlike a libm call; its error is within a few float32 ulps of tanh. */
#pragma omp declare simd
static inline float rational_tanh(float x) {
    x = fminf(fmaxf(x, -7.90531110763549805f), 7.90531110763549805f);
    const float x2 = x * x;
    float p = -2.76076847742355e-16f;
    p = p * x2 + 2.00018790482477e-13f;
    p = p * x2 - 8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    float q = 1.19825839466702e-06f;
    q = q * x2 + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return x * p / q;
}

/* energy [rows, steps] = v . tanh(q + k) at the live positions, -FLT_MAX (a masked energy) beyond them. */
void attention_energies(const float *query, const float *keys, const float *v, const long *lengths, float *energy,
                        long rows, long per, long steps, long size, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *q = query + r * size;
        const long key_row = r / per, live = lengths[key_row];
        float *e = energy + r * steps;
        for (long s = 0; s < live; s++) {
            const float *k = keys + (key_row * steps + s) * size;
            float sum = 0.0f;
            #pragma omp simd reduction(+:sum)
            for (long a = 0; a < size; a++) sum += v[a] * rational_tanh(q[a] + k[a]);
            e[s] = sum;
        }
        for (long s = live; s < steps; s++) e[s] = -FLT_MAX;
    }
}

/* The energies' backward for d(energy) [rows, steps] (per = 1): grad_v [A] += sum of d * u over rows and
 * positions; keys_minus [rows, steps, A] += d * u^2; query_minus [rows, A] = sum over positions of d * u^2 (the
 * parts of the keys' and queries' gradients that depend on u; the caller adds d's sums and multiplies by v). */
void attention_energies_backward(const float *query, const float *keys, const long *lengths, const float *grad_energy,
                                 float *grad_v, float *keys_minus, float *query_minus, long rows, long steps, long size,
                                 int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float partial[size];  /* this thread's share of grad_v */
        memset(partial, 0, size * sizeof(float));
        #pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            const float *q = query + r * size;
            float *qm = query_minus + r * size;
            memset(qm, 0, size * sizeof(float));
            for (long s = 0; s < lengths[r]; s++) {
                const float d = grad_energy[r * steps + s];
                const float *k = keys + (r * steps + s) * size;
                float *km = keys_minus + (r * steps + s) * size;
                #pragma omp simd
                for (long a = 0; a < size; a++) {
                    const float u = rational_tanh(q[a] + k[a]), du = d * u;
                    partial[a] += du;
                    km[a] += du * u;
                    qm[a] += du * u;
                }
            }
        }
        #pragma omp critical
        for (long a = 0; a < size; a++) grad_v[a] += partial[a];
    }
}

/* Greedy search's choice from unnormalized scores x [rows, vocab] (logits, or log-probabilities themselves): per
 * row the allowed token of highest score (the first of equal ones) and its log-probability x[best] - log(sum of
 * exp x over the whole row), without writing the row's log-softmax. Never allowed: the ids never[0..n_never);
 * eos where no_eos[r]; anything but eos where only_eos[r]. Scores are finite. */
void greedy_choice(const float *scores, const unsigned char *no_eos, const unsigned char *only_eos, const long *never,
                   long n_never, long eos, long rows, long vocab, float *best_score, long *best_token, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *x = scores + r * vocab;
        float top = -FLT_MAX;
        #pragma omp simd reduction(max:top)
        for (long v = 0; v < vocab; v++) top = fmaxf(top, x[v]);
        float sum = 0.0f;
        #pragma omp simd reduction(+:sum)
        for (long v = 0; v < vocab; v++) sum += expf(x[v] - top);
        long best = -1;
        if (only_eos[r]) {
            best = eos;
        } else {
            /* the first position of the row's maximum: find its block of 64 with a vectorized test, then look in it */
            for (long start = 0; start < vocab && best < 0; start += 64) {
                const long end = start + 64 < vocab ? start + 64 : vocab;
                int hit = 0;
                #pragma omp simd reduction(|:hit)
                for (long v = start; v < end; v++) hit |= x[v] == top;
                for (long v = start; hit && v < end; v++)
                    if (x[v] == top) { best = v; break; }
            }
            int allowed = !(no_eos[r] && best == eos);
            for (long i = 0; i < n_never; i++) allowed &= best != never[i];
            if (!allowed) {  /* rare: the maximum is a token not allowed here; an exact scalar pass over the rest */
                best = -1;
                for (long v = 0; v < vocab; v++) {
                    int ok = !(no_eos[r] && v == eos);
                    for (long i = 0; i < n_never; i++) ok &= v != never[i];
                    if (ok && (best < 0 || x[v] > x[best])) best = v;
                }
                if (best < 0) best = eos;  /* a vocabulary of special ids only */
            }
        }
        best_token[r] = best;
        best_score[r] = x[best] - top - logf(sum);
    }
}
