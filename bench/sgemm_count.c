/* Counts and times every cblas_sgemm call of a process: how much matrix work a training step
 * really does (2*M*N*K per call) and at what rate, next to the useful FLOPs bench_train.py prints.
 *
 *   gcc -O2 -shared -fPIC -o /tmp/sgemm_count.so bench/sgemm_count.c -ldl
 *   LD_PRELOAD=/tmp/sgemm_count.so:/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
 *     SGEMM_COUNT_OUT=/tmp/sgemm.txt mlx-lora train configs/demo.yaml training.iters=6 eval.enabled=false
 *
 * The CLI keeps an LD_PRELOAD that already names the BLAS. At exit the file holds one line of
 * totals (calls, GFLOP, seconds inside sgemm, GFLOP/s) and one line per distinct call shape
 * "M N K transA transB n=calls s=seconds gf=GFLOP" (CBLAS codes: 111 no transpose, 112 transpose).
 * Seconds are wall time per call on the calling thread; calls on two threads at once both count.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

#define MAX_SHAPES 4096
static struct {
    int m, n, k, trans_a, trans_b;
    long calls;
    double seconds;
} shapes[MAX_SHAPES];
static int n_shapes;
static long calls;
static double flops, seconds;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    static sgemm_fn real;
    if (!real) real = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
    double start = now();
    real(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    double took = now() - start;
    pthread_mutex_lock(&lock);
    calls++;
    flops += 2.0 * m * n * k;
    seconds += took;
    int i = 0;
    while (i < n_shapes && !(shapes[i].m == m && shapes[i].n == n && shapes[i].k == k &&
                             shapes[i].trans_a == trans_a && shapes[i].trans_b == trans_b))
        i++;
    if (i == n_shapes && n_shapes < MAX_SHAPES) {
        shapes[i].m = m, shapes[i].n = n, shapes[i].k = k, shapes[i].trans_a = trans_a, shapes[i].trans_b = trans_b;
        n_shapes++;
    }
    if (i < MAX_SHAPES) shapes[i].calls++, shapes[i].seconds += took;
    pthread_mutex_unlock(&lock);
}

__attribute__((destructor)) static void report(void) {
    if (!calls) return; /* child processes without products (compilers, probes) leave the file alone */
    const char *path = getenv("SGEMM_COUNT_OUT");
    FILE *out = fopen(path ? path : "/tmp/sgemm_count.txt", "w");
    if (!out) return;
    fprintf(out, "calls %ld gflop %.2f seconds %.3f gflop_per_s %.1f\n", calls, flops / 1e9, seconds,
            seconds > 0 ? flops / seconds / 1e9 : 0.0);
    for (int i = 0; i < n_shapes; i++)
        fprintf(out, "%d %d %d %d %d n=%ld s=%.4f gf=%.3f\n", shapes[i].m, shapes[i].n, shapes[i].k, shapes[i].trans_a,
                shapes[i].trans_b, shapes[i].calls, shapes[i].seconds,
                2.0 * shapes[i].m * shapes[i].n * shapes[i].k * shapes[i].calls / 1e9);
    fclose(out);
}
