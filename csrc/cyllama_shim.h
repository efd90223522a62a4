/* The C shim of cyllama_cffi: the few things that must run without Python.
 *
 *  - a per-context cancel state read by a ggml abort callback (polled by the
 *    CPU backend once per graph node while llama_decode runs, on ggml's worker
 *    threads, so it must never call into Python);
 *  - an opt-in SIGINT hook that bumps a process-wide counter the abort
 *    callback watches, then chains to the previous handler, so Ctrl-C stops a
 *    running decode although Python only runs signal handlers between bytecodes;
 *  - an argmax over logits, the pure-greedy sampling fast path, and the generation
 *    loop's step (one token decoded, the next one picked) in a single call, and the same
 *    for a step of several sequences;
 *  - a log sink that filters llama.cpp's log lines in C and forwards only the
 *    wanted ones to Python;
 *  - madvise(MADV_HUGEPAGE) for a private copy of the weights (see cyllama_cffi/_huge_pages.py);
 *  - freeing the calling thread's OpenMP worker pool (see cyllama_cffi/_sequence.py).
 *
 * The part between the CDEF markers is also fed to cffi's cdef, so it must
 * stay within what cffi's parser accepts; the includes above it stay outside,
 * so the header compiles on its own (cffi gets llama.h's types from the cdef
 * generated out of the headers).
 */
#ifndef CYLLAMA_SHIM_H
#define CYLLAMA_SHIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ggml.h"  /* enum ggml_log_level */
#include "llama.h" /* struct llama_context, struct llama_batch, llama_token, llama_pos */

/* BEGIN CDEF */
typedef struct cyl_cancel cyl_cancel;

cyl_cancel *cyl_cancel_new(void);
void cyl_cancel_free(cyl_cancel *state);
void cyl_cancel_set(cyl_cancel *state, bool value);
bool cyl_cancel_get(cyl_cancel *state);
/* Start a generation: clear the flag and forget SIGINTs that came before. */
void cyl_cancel_begin(cyl_cancel *state);
/* Whether a SIGINT caught by the hook since cyl_cancel_begin aborts this context. */
void cyl_cancel_watch_sigint(cyl_cancel *state, bool watch);
/* The ggml_abort_callback; data is a cyl_cancel*. */
bool cyl_abort_callback(void *data);

/* SIGINT hook: 0 on success, -1 with errno set on failure. */
int cyl_sigint_install(void);
int cyl_sigint_uninstall(void);
bool cyl_sigint_hook_is_current(void);

/* Index of the first largest of n values: what llama.cpp's greedy sampler picks, without
 * building its n_vocab-entry candidate array every token (~60 us -> ~5 us at 49k tokens).
 * NaNs are never chosen unless every value is NaN (then 0), as with the greedy sampler. */
int32_t cyl_argmax(const float *values, int32_t count);

/* The generation loop's step: decode `token` at `pos` of sequence 0 (with logits) through
 * the one-token `batch`, and when `argmax_out` is not NULL store there the first largest
 * of the new logits (-1 if llama.cpp has none). Returns llama_decode's code. One C call a
 * token instead of ~8: right after a decode the CPU caches hold weights, not Python. */
int32_t cyl_decode_token(struct llama_context *ctx, struct llama_batch *batch, llama_token token,
                         llama_pos pos, int32_t n_vocab, int32_t *argmax_out);

/* One step of several sequences: fill `batch` with the n rows (tokens[i] at pos[i] of sequence
 * seq[i], logits[i] nonzero where that row's logits are wanted), decode, and on success choose
 * the next token of each of the n_pick rows in pick_rows: with samplers[i]
 * (llama_sampler_sample, which also accepts it), or where samplers[i] is NULL the first largest
 * logit. Returns llama_decode's code (picked is written only on 0; -1 where llama.cpp has no
 * logits). The whole step is one C call, so its Python cost does not grow with the rows. */
int32_t cyl_decode_rows(struct llama_context *ctx, struct llama_batch *batch, int32_t n,
                        const llama_token *tokens, const llama_pos *pos, const llama_seq_id *seq,
                        const int8_t *logits, int32_t n_pick, const int32_t *pick_rows,
                        struct llama_sampler **samplers, int32_t n_vocab, llama_token *picked);

/* Log sink for llama_log_set: lines at or above the threshold go to Python. */
void cyl_log_sink(enum ggml_log_level level, const char *text, void *user_data);
void cyl_log_set_threshold(int level);
void cyl_log_set_enabled(bool enabled);

/* madvise(MADV_HUGEPAGE) over [start, start + length): ask Linux to back that anonymous memory
 * with transparent huge pages. 0 on success, -1 with errno set (ENOSYS where there is no such
 * advice). Python has no madvise for memory it did not map itself. */
int cyl_advise_huge_pages(uintptr_t start, size_t length);

/* Free the OpenMP worker pool of the calling thread (omp_pause_resource_all(omp_pause_soft)),
 * so that a decode on another thread has the cores to itself: libgomp keeps one pool per thread
 * that ran a parallel region, and once its pools hold more threads than there are cores it
 * stops spinning at ggml's per-node barriers. 1 when the OpenMP runtime loaded in the process
 * freed it, 0 when none is loaded (a build without OpenMP), -1 when the runtime refused. */
int cyl_release_openmp_threads(void);
/* END CDEF */

#endif /* CYLLAMA_SHIM_H */
