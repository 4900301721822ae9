/*
 * metadata/json_name.h: QEMU's json:{...} file names (json_name.c), as an
 * image may record them as its backing file name.
 */
#ifndef QSM_METADATA_JSON_NAME_H
#define QSM_METADATA_JSON_NAME_H

#include <stdbool.h>
#include <stddef.h>

/* Nesting deeper than this is refused (hostile names cannot exhaust the stack). */
#define QCOW2_JSON_MAX_DEPTH 32

/*
 * Parse the JSON object s (the text after "json:") and call cb once per
 * scalar with its dotted key ("file.filename"), its value as an option
 * string says it (true/false as on/off, numbers as written) and whether it
 * was null.  A negative return from cb stops the parse and is returned.
 * 0, or -EINVAL with a reason in err ("Invalid JSON object given", "JSON
 * parse error, ..."), or -ENOMEM.
 */
int qcow2_json_name_parse(const char *s,
			  int (*cb)(void *opaque, const char *key, const char *val, bool null),
			  void *opaque, char *err, size_t errlen);

#endif
