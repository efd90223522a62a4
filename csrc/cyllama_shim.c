/* Implementation of cyllama_shim.h: a source file of its own, compiled and linked
 * into the cffi module next to the C code cffi generates. */

/* sigaction and siginfo_t (POSIX), MADV_HUGEPAGE and RTLD_DEFAULT (not POSIX) under a strict
 * -std=c11 too: nothing here includes Python.h, which would ask for them. Before any include. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include "ggml.h"
#include "llama.h"

#include "cyllama_shim.h"

#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

struct cyl_cancel {
    int flag;                  /* set by cancel(), read by the abort callback */
    int watch_sigint;          /* does a SIGINT through the hook abort us? */
    unsigned long sigint_base; /* hook count when the generation began */
};

/* Bumped by the SIGINT hook; only ever read or incremented atomically. */
static unsigned long g_sigint_count = 0;

cyl_cancel *cyl_cancel_new(void) {
    cyl_cancel *state = calloc(1, sizeof *state);
    if (state) {
        state->watch_sigint = 1;
        state->sigint_base = __atomic_load_n(&g_sigint_count, __ATOMIC_SEQ_CST);
    }
    return state;
}

void cyl_cancel_free(cyl_cancel *state) { free(state); }

void cyl_cancel_set(cyl_cancel *state, bool value) {
    __atomic_store_n(&state->flag, value ? 1 : 0, __ATOMIC_SEQ_CST);
}

static bool cyl_cancel_sigint_seen(cyl_cancel *state) {
    return __atomic_load_n(&state->watch_sigint, __ATOMIC_RELAXED)
        && __atomic_load_n(&g_sigint_count, __ATOMIC_SEQ_CST)
               != __atomic_load_n(&state->sigint_base, __ATOMIC_SEQ_CST);
}

bool cyl_cancel_get(cyl_cancel *state) {
    return __atomic_load_n(&state->flag, __ATOMIC_SEQ_CST) != 0 || cyl_cancel_sigint_seen(state);
}

void cyl_cancel_begin(cyl_cancel *state) {
    __atomic_store_n(&state->sigint_base, __atomic_load_n(&g_sigint_count, __ATOMIC_SEQ_CST),
                     __ATOMIC_SEQ_CST);
    __atomic_store_n(&state->flag, 0, __ATOMIC_SEQ_CST);
}

void cyl_cancel_watch_sigint(cyl_cancel *state, bool watch) {
    __atomic_store_n(&state->watch_sigint, watch ? 1 : 0, __ATOMIC_SEQ_CST);
}

bool cyl_abort_callback(void *data) {
    return data != NULL && cyl_cancel_get((cyl_cancel *)data);
}

/* ---- SIGINT hook ------------------------------------------------------ */

/* The handler the hook chains to. Not atomic, and it needs no atomics: only
 * cyl_sigint_install writes it, and only while the hook is not the installed
 * handler, before the sigaction call that puts the hook in place (the hook,
 * which reads it, cannot start before that call); cyl_sigint_uninstall only
 * reads it. The Python side (sigint.py) calls both only from the main thread,
 * under one lock, with SIGINT blocked in that thread.
 * What this does not cover: a hook invocation that started on another thread
 * before an uninstall and is still running when the next install writes. */
static struct sigaction g_previous;

static void cyl_sigint_hook(int signum, siginfo_t *info, void *ucontext) {
    int saved_errno = errno;
    __atomic_add_fetch(&g_sigint_count, 1, __ATOMIC_SEQ_CST);
    if (g_previous.sa_flags & SA_SIGINFO) {
        if (g_previous.sa_sigaction) g_previous.sa_sigaction(signum, info, ucontext);
    } else if (g_previous.sa_handler == SIG_DFL) {
        /* Nobody handled SIGINT before us: behave as the default would. */
        signal(signum, SIG_DFL);
        raise(signum);
    } else if (g_previous.sa_handler != SIG_IGN && g_previous.sa_handler != NULL) {
        g_previous.sa_handler(signum);
    }
    errno = saved_errno;
}

bool cyl_sigint_hook_is_current(void) {
    struct sigaction current;
    if (sigaction(SIGINT, NULL, &current) != 0) return false;
    return (current.sa_flags & SA_SIGINFO) && current.sa_sigaction == cyl_sigint_hook;
}

int cyl_sigint_install(void) {
    struct sigaction current, hook;
    if (sigaction(SIGINT, NULL, &current) != 0) return -1;
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == cyl_sigint_hook)
        return 0; /* already on top: never save ourselves as "previous" */
    g_previous = current;
    hook = current; /* keep the previous sa_mask and flags (SA_RESTART or not) */
    hook.sa_sigaction = cyl_sigint_hook;
    hook.sa_flags = (current.sa_flags | SA_SIGINFO) & ~SA_RESETHAND;
    return sigaction(SIGINT, &hook, NULL);
}

int cyl_sigint_uninstall(void) {
    if (!cyl_sigint_hook_is_current()) return 0; /* someone replaced us: leave theirs */
    return sigaction(SIGINT, &g_previous, NULL);
}

/* ---- greedy fast path ------------------------------------------------ */

int32_t cyl_argmax(const float *values, int32_t count) {
    if (count <= 0) return -1;
    /* size_t indices: Python builds extensions with -fwrapv, under which int indices keep gcc
     * from vectorising these loops (measured: 30 us instead of 5 us for 49k values). */
    const size_t n = (size_t)count;
    /* Pass 1: the maximum, in 8 independent lanes so the compiler can vectorise. */
    float lane[8];
    for (int k = 0; k < 8; k++) lane[k] = -INFINITY;
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (size_t k = 0; k < 8; k++)
            lane[k] = values[i + k] > lane[k] ? values[i + k] : lane[k];
    float best = -INFINITY;
    for (int k = 0; k < 8; k++) best = lane[k] > best ? lane[k] : best;
    for (; i < n; i++) best = values[i] > best ? values[i] : best;
    /* Pass 2: its first index (ties go to the lowest id, like the greedy sampler): find the
     * block of 64 holding it with a branch-free test, then scan that block. */
    for (i = 0; i + 64 <= n; i += 64) {
        int hit = 0;
        for (size_t k = 0; k < 64; k++) hit |= values[i + k] == best;
        if (hit) break;
    }
    for (; i < n; i++)
        if (values[i] == best) return (int32_t)i;
    return 0; /* every value NaN (or all -inf: the first one) */
}

int32_t cyl_decode_token(struct llama_context *ctx, struct llama_batch *batch, llama_token token,
                         llama_pos pos, int32_t n_vocab, int32_t *argmax_out) {
    batch->token[0] = token;
    batch->pos[0] = pos;
    batch->n_seq_id[0] = 1;
    batch->seq_id[0][0] = 0;
    batch->logits[0] = 1;
    batch->n_tokens = 1;
    int32_t code = llama_decode(ctx, *batch);
    if (code == 0 && argmax_out != NULL) {
        const float *logits = llama_get_logits_ith(ctx, -1);
        *argmax_out = logits ? cyl_argmax(logits, n_vocab) : -1;
    }
    return code;
}

int32_t cyl_decode_rows(struct llama_context *ctx, struct llama_batch *batch, int32_t n,
                        const llama_token *tokens, const llama_pos *pos, const llama_seq_id *seq,
                        const int8_t *logits, int32_t n_pick, const int32_t *pick_rows,
                        struct llama_sampler **samplers, int32_t n_vocab, llama_token *picked) {
    for (int32_t i = 0; i < n; i++) {
        batch->token[i] = tokens[i];
        batch->pos[i] = pos[i];
        batch->n_seq_id[i] = 1;
        batch->seq_id[i][0] = seq[i];
        batch->logits[i] = logits[i] != 0;
    }
    batch->n_tokens = n;
    int32_t code = llama_decode(ctx, *batch);
    if (code != 0) {
        return code;
    }
    for (int32_t i = 0; i < n_pick; i++) {
        if (samplers[i] != NULL) {
            picked[i] = llama_sampler_sample(samplers[i], ctx, pick_rows[i]);
        } else {
            const float *row = llama_get_logits_ith(ctx, pick_rows[i]);
            picked[i] = row ? cyl_argmax(row, n_vocab) : -1;
        }
    }
    return 0;
}

/* ---- log sink --------------------------------------------------------- */

/* Defined by cffi in the generated module: extern "Python+C" in build_libllama.py's
 * PYTHON_CALLBACKS, so it has external linkage and this file can call it. */
void cyl_py_log(int level, const char *text);

/* All three are read and written only atomically: cyl_log_sink runs on whatever
 * thread llama.cpp or ggml logs from, several at once while a decode runs. */
static int g_log_threshold = GGML_LOG_LEVEL_ERROR;
static int g_log_enabled = 1;
/* The level of the last line, for GGML_LOG_LEVEL_CONT continuations. Lines of
 * different threads can interleave, so this is a best guess, but a race-free one. */
static int g_log_last_level = GGML_LOG_LEVEL_INFO;

/* An aborted decode is a requested outcome, not an error: llama.cpp still logs
 * it at ERROR level from the decoding thread. Treat those lines as DEBUG so the
 * quiet default never calls into Python (and never waits for the GIL) there. */
static int cyl_is_abort_report(const char *text) {
    return strstr(text, "failed with error 1") != NULL          /* GGML_STATUS_ABORTED */
        || strstr(text, "compute status: 1") != NULL
        || strstr(text, "failed to decode, ret = 2") != NULL;
}

void cyl_log_sink(enum ggml_log_level level, const char *text, void *user_data) {
    (void)user_data;
    int effective = (level == GGML_LOG_LEVEL_CONT) ? __atomic_load_n(&g_log_last_level, __ATOMIC_RELAXED)
                                                   : (int)level;
    if (effective == GGML_LOG_LEVEL_ERROR && text != NULL && cyl_is_abort_report(text))
        effective = GGML_LOG_LEVEL_DEBUG;
    __atomic_store_n(&g_log_last_level, effective, __ATOMIC_RELAXED);
    if (text != NULL && __atomic_load_n(&g_log_enabled, __ATOMIC_SEQ_CST)
        && effective >= __atomic_load_n(&g_log_threshold, __ATOMIC_SEQ_CST))
        cyl_py_log(effective, text);
}

void cyl_log_set_threshold(int level) { __atomic_store_n(&g_log_threshold, level, __ATOMIC_SEQ_CST); }

void cyl_log_set_enabled(bool enabled) { __atomic_store_n(&g_log_enabled, enabled ? 1 : 0, __ATOMIC_SEQ_CST); }

int cyl_advise_huge_pages(uintptr_t start, size_t length) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    return madvise((void *) start, length, MADV_HUGEPAGE);
#else
    (void) start;
    (void) length;
    errno = ENOSYS;
    return -1;
#endif
}

/* OpenMP's omp_pause_resource_all, looked up rather than linked: ggml-cpu brings the runtime
 * (libgomp from gcc, libomp from clang) only when it was built with OpenMP, and may have been
 * loaded with RTLD_LOCAL, hence the look-up by soname of a library already loaded. */
typedef int (*cyl_omp_pause_fn)(int kind);

static cyl_omp_pause_fn find_omp_pause(void) {
    static const char *const runtimes[] = {"libgomp.so.1", "libomp.so", "libomp.so.5", "libiomp5.so",
                                           "libomp.dylib", "libgomp.1.dylib"};
    void *symbol = dlsym(RTLD_DEFAULT, "omp_pause_resource_all");
    for (size_t i = 0; symbol == NULL && i < sizeof runtimes / sizeof runtimes[0]; i++) {
        void *handle = dlopen(runtimes[i], RTLD_LAZY | RTLD_NOLOAD);
        if (handle != NULL) {
            symbol = dlsym(handle, "omp_pause_resource_all");
            dlclose(handle); /* NOLOAD took a reference to a library that stays loaded */
        }
    }
    cyl_omp_pause_fn pause;
    memcpy(&pause, &symbol, sizeof pause); /* object pointer to function pointer, as POSIX allows */
    return pause;
}

int cyl_release_openmp_threads(void) {
    static cyl_omp_pause_fn pause = NULL; /* found once; looked for again while absent */
    cyl_omp_pause_fn found = __atomic_load_n(&pause, __ATOMIC_ACQUIRE);
    if (found == NULL) {
        found = find_omp_pause();
        if (found == NULL) {
            return 0;
        }
        __atomic_store_n(&pause, found, __ATOMIC_RELEASE);
    }
    enum { omp_pause_soft = 1 }; /* the OpenMP 5.0 value, without requiring omp.h */
    return found(omp_pause_soft) == 0 ? 1 : -1;
}
