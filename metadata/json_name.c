/*
 * metadata/json_name.c: QEMU's json:{...} file names, as an image header
 * may record them for its backing file (qemu-img create -b 'json:{...}').
 *
 * Design: recursive descent over the text, bounded in depth
 * (QCOW2_JSON_MAX_DEPTH) and never reading past the terminating NUL (the
 * header's backing name is untrusted input).  Each scalar is handed to the
 * caller's callback under its dotted path as soon as it is read (objects:
 * "a.b", arrays: "a.0", the way QEMU flattens the dictionary), with the
 * value as an option string would say it: strings as they are, numbers as
 * written, true/false as on/off, null flagged.  QEMU's dialect: strings may
 * also be 'single-quoted'.  A key twice in one object is an error, as in
 * QEMU.  The tools' parser (tools/json.c) follows the same rules for names
 * given on the command line; this one serves the library, which may not
 * depend on the tools.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metadata/json_name.h"

struct jn {
	const char *p;
	int (*cb)(void *opaque, const char *key, const char *val, bool null);
	void *opaque;
	char *err;
	size_t errlen;
	int depth;
};

static int jn_fail(struct jn *j, const char *what)
{
	if (j->err && j->errlen && !j->err[0])
		snprintf(j->err, j->errlen, "%s", what);
	return -EINVAL;
}

static void jn_ws(struct jn *j)
{
	while (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')
		j->p++;
}

static int hexval(char c)
{
	return c >= '0' && c <= '9' ? c - '0'
	     : c >= 'a' && c <= 'f' ? c - 'a' + 10
	     : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* A string at j->p (its quote included): *out malloc'd.  \u escapes encode
 * as UTF-8 (a NUL refused: it would cut the name). */
static int jn_string(struct jn *j, char **out)
{
	char q = *j->p++;
	size_t cap = 32, n = 0;
	char *s = malloc(cap);

	if (!s)
		return -ENOMEM;
	for (;;) {
		char c = *j->p;
		unsigned cp = 0;
		if (c == 0) {
			free(s);
			return jn_fail(j, "JSON parse error, premature EOI");
		}
		j->p++;
		if (c == q)
			break;
		if (n + 5 > cap) {
			char *ns = realloc(s, cap *= 2);
			if (!ns) {
				free(s);
				return -ENOMEM;
			}
			s = ns;
		}
		if (c != '\\') {
			s[n++] = c;
			continue;
		}
		c = *j->p++;
		switch (c) {
		case '"': case '\'': case '\\': case '/': s[n++] = c; continue;
		case 'b': s[n++] = '\b'; continue;
		case 'f': s[n++] = '\f'; continue;
		case 'n': s[n++] = '\n'; continue;
		case 'r': s[n++] = '\r'; continue;
		case 't': s[n++] = '\t'; continue;
		case 'u':
			for (int i = 0; i < 4; i++) {
				int h = hexval(*j->p);
				if (h < 0) {
					free(s);
					return jn_fail(j, "JSON parse error, invalid escape");
				}
				cp = cp << 4 | (unsigned)h;
				j->p++;
			}
			if (cp == 0 || (cp >= 0xd800 && cp <= 0xdfff)) {
				free(s);
				return jn_fail(j, "JSON parse error, invalid escape");
			}
			if (cp < 0x80) {
				s[n++] = (char)cp;
			} else if (cp < 0x800) {
				s[n++] = (char)(0xc0 | cp >> 6);
				s[n++] = (char)(0x80 | (cp & 0x3f));
			} else {
				s[n++] = (char)(0xe0 | cp >> 12);
				s[n++] = (char)(0x80 | ((cp >> 6) & 0x3f));
				s[n++] = (char)(0x80 | (cp & 0x3f));
			}
			continue;
		default:
			free(s);
			return jn_fail(j, c ? "JSON parse error, invalid escape"
					    : "JSON parse error, premature EOI");
		}
	}
	s[n] = 0;
	*out = s;
	return 0;
}

static char *join_key(const char *prefix, const char *k)
{
	size_t a = strlen(prefix), b = strlen(k);
	char *r = malloc(a + b + 2);
	if (!r)
		return NULL;
	memcpy(r, prefix, a);
	r[a] = a ? '.' : 0;
	memcpy(r + (a ? a + 1 : 0), k, b + 1);
	return r;
}

static int jn_value(struct jn *j, const char *key);

/* An object or array at j->p; keys of its members under `key`. */
static int jn_container(struct jn *j, const char *key)
{
	char close = *j->p == '{' ? '}' : ']';
	char **seen = NULL;
	int nseen = 0, idx = 0, r = 0;

	if (++j->depth > QCOW2_JSON_MAX_DEPTH)
		return jn_fail(j, "JSON nesting too deep");
	j->p++;
	jn_ws(j);
	if (*j->p == close) {
		j->p++;
		j->depth--;
		return 0;
	}
	for (;;) {
		char *member = NULL, *full;
		jn_ws(j);
		if (close == '}') {
			if (*j->p != '"' && *j->p != '\'') {
				r = jn_fail(j, *j->p ? "JSON parse error, invalid syntax"
						     : "JSON parse error, premature EOI");
				break;
			}
			if ((r = jn_string(j, &member)) < 0)
				break;
			for (int i = 0; i < nseen; i++)
				if (!strcmp(seen[i], member))
					r = jn_fail(j, "JSON parse error, duplicate key");
			char **ns = r ? NULL : realloc(seen, (size_t)(nseen + 1) * sizeof(*seen));
			if (!ns) {
				free(member);
				r = r ? r : -ENOMEM;
				break;
			}
			seen = ns;
			seen[nseen++] = member;
			jn_ws(j);
			if (*j->p != ':') {
				r = jn_fail(j, "JSON parse error, missing ':'");
				break;
			}
			j->p++;
			full = join_key(key, member);
		} else {
			char num[24];
			snprintf(num, sizeof(num), "%d", idx++);
			full = join_key(key, num);
		}
		if (!full) {
			r = -ENOMEM;
			break;
		}
		r = jn_value(j, full);
		free(full);
		if (r < 0)
			break;
		jn_ws(j);
		if (*j->p == ',') {
			j->p++;
			continue;
		}
		if (*j->p == close) {
			j->p++;
			break;
		}
		r = jn_fail(j, *j->p ? "JSON parse error, invalid syntax" : "JSON parse error, premature EOI");
		break;
	}
	for (int i = 0; i < nseen; i++)
		free(seen[i]);
	free(seen);
	j->depth--;
	return r;
}

static int jn_value(struct jn *j, const char *key)
{
	char *s = NULL;
	int r;

	jn_ws(j);
	switch (*j->p) {
	case '{':
	case '[':
		return jn_container(j, key);
	case '"':
	case '\'':
		if ((r = jn_string(j, &s)) < 0)
			return r;
		r = j->cb(j->opaque, key, s, false);
		free(s);
		return r;
	case 0:
		return jn_fail(j, "JSON parse error, premature EOI");
	}
	if (!strncmp(j->p, "true", 4) || !strncmp(j->p, "false", 5)) {
		bool t = *j->p == 't';
		j->p += t ? 4 : 5;
		return j->cb(j->opaque, key, t ? "on" : "off", false);
	}
	if (!strncmp(j->p, "null", 4)) {
		j->p += 4;
		return j->cb(j->opaque, key, "", true);
	}
	const char *start = j->p;
	if (*j->p == '-')
		j->p++;
	while ((*j->p >= '0' && *j->p <= '9') || *j->p == '.' || *j->p == 'e' || *j->p == 'E' ||
	       *j->p == '+' || *j->p == '-')
		j->p++;
	if (j->p == start || j->p - start > 40)
		return jn_fail(j, "JSON parse error, invalid syntax");
	char num[48];
	memcpy(num, start, (size_t)(j->p - start));
	num[j->p - start] = 0;
	return j->cb(j->opaque, key, num, false);
}

int qcow2_json_name_parse(const char *s, int (*cb)(void *opaque, const char *key, const char *val,
						   bool null),
			  void *opaque, char *err, size_t errlen)
{
	struct jn j = { s, cb, opaque, err, errlen, 0 };
	int r;

	if (err && errlen)
		err[0] = 0;
	jn_ws(&j);
	if (*j.p != '{')
		return jn_fail(&j, "Invalid JSON object given");
	if ((r = jn_container(&j, "")) < 0)
		return r;
	jn_ws(&j);
	if (*j.p)
		return jn_fail(&j, "JSON parse error, invalid syntax");
	return 0;
}
