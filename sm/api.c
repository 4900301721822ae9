/*
 * sm/api.c: public entry points that are thin wrappers over internal ones:
 * the library's version and the consistency checker (metadata/check.c) as
 * qsm.h presents them.  Nothing here has state.
 */
#include <errno.h>
#include <event2/event.h>
#include <string.h>

#include "metadata/check.h"
#include "sm/sm.h"

_Static_assert(QSM_REPAIR_LEAKS == QSM_CHECK_FIX_LEAKS && QSM_REPAIR_ERRORS == QSM_CHECK_FIX_ERRORS,
	       "qsm.h's repair flags are check.h's fix flags");

unsigned qsm_version(const char **str)
{
	if (str)
		*str = QSM_VERSION_STRING;
	return QSM_VERSION_NUMBER;
}

/* The size of qsm_check_report in 0.1.0 (struct_size 0; see qsm.h "ABI"). */
#define QSM_CHECK_REPORT_SIZE_0 sizeof(struct qsm_check_report)

int qsm_check_io(struct qsm_io *io, unsigned repair, struct qsm_check_report *report,
		 FILE *log, char *err, size_t errlen)
{
	struct qsm_check_report rep;
	struct qsm_check_result res;
	size_t size;

	qsm_set_err(err, errlen, "%s", "");
	if (!io || (repair & ~(unsigned)(QSM_REPAIR_LEAKS | QSM_REPAIR_ERRORS))) {
		qsm_set_err(err, errlen, "qsm_check: bad arguments");
		return -EINVAL;
	}
	size = report ? (report->struct_size ? report->struct_size : QSM_CHECK_REPORT_SIZE_0) : 0;
	if (report && size < sizeof(size_t)) {
		qsm_set_err(err, errlen, "qsm_check_report: struct_size %zu is too small", size);
		return -EINVAL;
	}
	int ret = qsm_check_image(io, repair, &res, log, err, errlen);
	if (ret < 0)
		return ret;
	memset(&rep, 0, sizeof(rep));
	rep.struct_size = sizeof(rep);
	rep.corruptions = res.corruptions;
	rep.leaks = res.leaks;
	rep.check_errors = res.check_errors;
	rep.corruptions_fixed = res.corruptions_fixed;
	rep.leaks_fixed = res.leaks_fixed;
	rep.corruptions_left = res.corruptions_left;
	rep.leaks_left = res.leaks_left;
	rep.incomplete = res.incomplete;
	rep.error = res.error;
	rep.image_end_offset = res.image_end_offset;
	rep.allocated_clusters = res.allocated_clusters;
	rep.fragmented_clusters = res.fragmented_clusters;
	rep.compressed_clusters = res.compressed_clusters;
	if (report) {
		/* The caller gets what its structure has room for; a newer
		 * caller's extra fields read as zero. */
		memcpy((char *)report + sizeof(size_t), (char *)&rep + sizeof(size_t),
		       (size < sizeof(rep) ? size : sizeof(rep)) - sizeof(size_t));
		if (size > sizeof(rep))
			memset((char *)report + sizeof(rep), 0, size - sizeof(rep));
	}
	return qsm_check_exit_code(&res);
}

int qsm_check(const char *path, unsigned repair, struct qsm_check_report *report, FILE *log,
	      char *err, size_t errlen)
{
	struct event_base *base;
	struct qsm_io *io;
	int ret;

	if (!path) {
		qsm_set_err(err, errlen, "qsm_check: no path");
		return -EINVAL;
	}
	if (!(base = event_base_new()))
		return -ENOMEM;
	ret = qsm_io_open_path(base, path, repair ? 0 : QSM_IO_RDONLY, "threads", &io);
	if (ret < 0) {
		qsm_set_err(err, errlen, "Could not open '%s': %s", path, strerror(-ret));
	} else {
		ret = qsm_check_io(io, repair, report, log, err, errlen);
		qsm_io_close(io);
	}
	event_base_free(base);
	return ret;
}
