/*
 * tools/trace.h: request timelines for `qsm io` and `qsm bench` (and any
 * later tool), from the engine's trace hook (qsm_set_trace).
 *
 * Two outputs, either or both:
 *  - Chrome Trace Event Format JSON (--trace FILE), for Perfetto or
 *    chrome://tracing: one track (tid) per request, one "X" slice per state,
 *    an enclosing "X" slice for the whole request, flow arrows (ph "s"/"f")
 *    from the request waited on to the one that waited, counters (ph "C")
 *    for requests in flight, dirty metadata and fdatasync calls.  The
 *    format and its guarantees are described in tools/trace.c.
 *  - one readable line per request (--trace-text FILE, "-" for stderr):
 *      #17 write 1M+64k: L1 lookup > L2 lookup (miss) > L2 load @0x50000 >
 *        L2 lookup (hit @0x50000) > ... > next run (last) > done 143us
 * With neither, no hook is installed: tracing costs nothing.
 */
#ifndef QSM_TOOLS_TRACE_H
#define QSM_TOOLS_TRACE_H

struct qsm_image;
struct qsm_tracer;

/*
 * Open the outputs (json_path and/or text_path may be NULL; text_path "-"
 * is standard error).  *out is NULL when both are NULL.  On error prints
 * "qsm <cmd>: cannot open trace file ..." and returns a negative errno.
 * `title` names the process in the JSON (e.g. "qsm io disk.qcow2").
 */
int qsm_tracer_open(const char *cmd, const char *json_path, const char *text_path,
		    const char *title, struct qsm_tracer **out);
/* Install the hook on img (t may be NULL: nothing happens).  Request ids
 * restart with each image; every request still gets a track of its own. */
void qsm_tracer_attach(struct qsm_tracer *t, struct qsm_image *img);
/* Finish the JSON document, print the lines of requests that never
 * finished (marked "not finished"), close the files and free t (may be
 * NULL).  Returns 0 or a negative errno when a write failed. */
int qsm_tracer_close(struct qsm_tracer *t);

#endif
