/*
 * tools/json.h: the `json:{...}` image names of QEMU, parsed into the same
 * flat option list as "a=b,c=d" strings (struct cli_opts).
 *
 * QEMU turns a json: name into a flat dictionary: nested objects become
 * dotted keys ({"file": {"filename": "x"}} is file.filename=x), and the
 * values are what a QemuOpts string would have said: strings as they are,
 * numbers as written, true/false as on/off.  JSON null is kept as a value
 * of its own (cli_opt.null): `"backing": null` means "no backing file",
 * which no option string can say.
 */
#ifndef QSM_TOOLS_JSON_H
#define QSM_TOOLS_JSON_H

#include <stddef.h>

struct cli_opts;

/*
 * Parse the JSON text s (without the "json:" prefix) and append its keys
 * to o.  0, or -EINVAL with QEMU's message in err ("Could not parse the
 * JSON options: ...", "Invalid JSON object given"), or -ENOMEM.  Never reads
 * past the terminating NUL; nesting deeper than 64 levels is refused, so
 * hostile input cannot exhaust the stack.  On error o may hold a part of the
 * keys: the caller frees it either way.
 */
int cli_json_parse(const char *s, struct cli_opts *o, char *err, size_t errlen);

#endif
