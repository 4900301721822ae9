/*
 * tools/json.c: a small, strict JSON reader for QEMU's json: image names.
 *
 * Design: recursive descent over the text with an explicit depth bound
 * (JSON_MAX_DEPTH); each scalar is appended to the option list under its
 * dotted path as soon as it is read (objects: "a.b", arrays: "a.0", as
 * QEMU's qdict_flatten names them).  QEMU's JSON dialect is followed where
 * it differs from RFC 8259: strings may also be 'single-quoted' (with \'
 * as an escape).  A key seen twice in one object is an error, as QEMU says
 * ("duplicate key").  Error texts are QEMU 7.2's for the cases scripts meet
 * (empty text, truncated text, a missing value, a duplicate key, a top
 * level that is not an object); other syntax errors read "JSON parse
 * error, invalid syntax" (QEMU's lexer words those per token; not copied).
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/cli.h"
#include "tools/json.h"

#define JSON_MAX_DEPTH 64

struct jp {
	const char *p;
	struct cli_opts *o;
	char *err;
	size_t errlen;
	int depth;
};

static int jp_fail(struct jp *j, const char *what)
{
	if (j->err && !j->err[0])
		snprintf(j->err, j->errlen, "Could not parse the JSON options: %s", what);
	return -EINVAL;
}

/* End of text inside a value: QEMU's "premature EOI". */
static int jp_syntax(struct jp *j)
{
	return jp_fail(j, *j->p ? "JSON parse error, invalid syntax" : "JSON parse error, premature EOI");
}

static void jp_ws(struct jp *j)
{
	while (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r')
		j->p++;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int read_hex4(const char *p, unsigned *out)
{
	unsigned v = 0;

	for (int i = 0; i < 4; i++) {
		int h = hexval(p[i]); /* stops at NUL: hexval('\0') < 0 */
		if (h < 0)
			return -1;
		v = v << 4 | (unsigned)h;
	}
	*out = v;
	return 0;
}

static size_t put_utf8(char *d, unsigned cp)
{
	if (cp < 0x80) {
		d[0] = (char)cp;
		return 1;
	}
	if (cp < 0x800) {
		d[0] = (char)(0xc0 | cp >> 6);
		d[1] = (char)(0x80 | (cp & 0x3f));
		return 2;
	}
	if (cp < 0x10000) {
		d[0] = (char)(0xe0 | cp >> 12);
		d[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		d[2] = (char)(0x80 | (cp & 0x3f));
		return 3;
	}
	d[0] = (char)(0xf0 | cp >> 18);
	d[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
	d[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
	d[3] = (char)(0x80 | (cp & 0x3f));
	return 4;
}

/* A string at j->p (its opening quote); *out is malloc'd.  The decoded
 * text is never longer than the source text, so one allocation of the
 * remaining length bounds it. */
static int jp_string(struct jp *j, char **out)
{
	char q = *j->p++;
	size_t cap = strlen(j->p) + 1, n = 0;
	char *d = malloc(cap);

	if (!d)
		return -ENOMEM;
	for (;;) {
		char c = *j->p;
		if (!c) {
			free(d);
			return jp_syntax(j);
		}
		j->p++;
		if (c == q)
			break;
		if ((unsigned char)c < 0x20) {
			free(d);
			return jp_fail(j, "JSON parse error, invalid syntax");
		}
		if (c != '\\') {
			d[n++] = c;
			continue;
		}
		c = *j->p++;
		switch (c) {
		case '"': case '\'': case '\\': case '/':
			d[n++] = c;
			break;
		case 'b': d[n++] = '\b'; break;
		case 'f': d[n++] = '\f'; break;
		case 'n': d[n++] = '\n'; break;
		case 'r': d[n++] = '\r'; break;
		case 't': d[n++] = '\t'; break;
		case 'u': {
			unsigned cp, lo;
			if (read_hex4(j->p, &cp) < 0)
				goto bad;
			j->p += 4;
			if (cp >= 0xd800 && cp < 0xdc00) {
				if (j->p[0] != '\\' || j->p[1] != 'u' || read_hex4(j->p + 2, &lo) < 0 ||
				    lo < 0xdc00 || lo > 0xdfff)
					goto bad;
				j->p += 6;
				cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
			} else if (cp >= 0xdc00 && cp < 0xe000) {
				goto bad;
			}
			if (cp == 0) /* a NUL cannot live in a C string option */
				goto bad;
			/* "\uXXXX" is 6 source bytes, the UTF-8 at most 4 (a pair: 12 -> 4). */
			n += put_utf8(d + n, cp);
			break;
		}
		default:
			if (!c)
				j->p--;
			goto bad;
		}
	}
	d[n] = '\0';
	*out = d;
	return 0;
bad:
	free(d);
	return *j->p ? jp_fail(j, "JSON parse error, invalid syntax") : jp_syntax(j);
}

static int jp_add(struct jp *j, const char *key, const char *val, bool null)
{
	if (!key[0]) /* a scalar at the top level */
		return -EDOM;
	return cli_opts_add(j->o, key, val, null);
}

static char *join_key(const char *prefix, const char *k)
{
	size_t pl = strlen(prefix), kl = strlen(k);
	char *r = malloc(pl + kl + 2);

	if (!r)
		return NULL;
	memcpy(r, prefix, pl);
	if (pl)
		r[pl++] = '.';
	memcpy(r + pl, k, kl + 1);
	return r;
}

static int jp_value(struct jp *j, const char *key);

static int jp_object(struct jp *j, const char *key)
{
	char **seen = NULL;
	int nseen = 0, r = 0;

	j->p++; /* '{' */
	jp_ws(j);
	if (*j->p == '}') {
		j->p++;
		return 0;
	}
	for (;;) {
		char *k = NULL, *full;
		jp_ws(j);
		if (*j->p != '"' && *j->p != '\'') {
			r = jp_syntax(j);
			break;
		}
		if ((r = jp_string(j, &k)) < 0)
			break;
		for (int i = 0; i < nseen; i++)
			if (!strcmp(seen[i], k))
				r = jp_fail(j, "JSON parse error, duplicate key");
		char **ns = r ? NULL : realloc(seen, (size_t)(nseen + 1) * sizeof(*seen));
		if (!ns) {
			free(k);
			r = r ? r : -ENOMEM;
			break;
		}
		seen = ns;
		seen[nseen++] = k;
		jp_ws(j);
		if (*j->p != ':') {
			r = jp_syntax(j);
			break;
		}
		j->p++;
		full = join_key(key, k);
		if (!full) {
			r = -ENOMEM;
			break;
		}
		r = jp_value(j, full);
		free(full);
		if (r < 0)
			break;
		jp_ws(j);
		if (*j->p == ',') {
			j->p++;
			continue;
		}
		if (*j->p == '}') {
			j->p++;
			break;
		}
		r = jp_syntax(j);
		break;
	}
	for (int i = 0; i < nseen; i++)
		free(seen[i]);
	free(seen);
	return r;
}

static int jp_array(struct jp *j, const char *key)
{
	int r = 0;

	j->p++; /* '[' */
	jp_ws(j);
	if (*j->p == ']') {
		j->p++;
		return 0;
	}
	for (unsigned i = 0;; i++) {
		char idx[16], *full;
		snprintf(idx, sizeof(idx), "%u", i);
		full = join_key(key, idx);
		if (!full)
			return -ENOMEM;
		r = jp_value(j, full);
		free(full);
		if (r < 0)
			return r;
		jp_ws(j);
		if (*j->p == ',') {
			j->p++;
			continue;
		}
		if (*j->p == ']') {
			j->p++;
			return 0;
		}
		return jp_syntax(j);
	}
}

/* A JSON number's extent per RFC 8259; its text is kept as written. */
static size_t number_len(const char *p)
{
	const char *s = p;

	if (*p == '-')
		p++;
	if (*p == '0')
		p++;
	else if (*p >= '1' && *p <= '9')
		while (*p >= '0' && *p <= '9')
			p++;
	else
		return 0;
	if (*p == '.') {
		p++;
		if (!(*p >= '0' && *p <= '9'))
			return 0;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	if (*p == 'e' || *p == 'E') {
		p++;
		if (*p == '+' || *p == '-')
			p++;
		if (!(*p >= '0' && *p <= '9'))
			return 0;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	return (size_t)(p - s);
}

static int jp_value(struct jp *j, const char *key)
{
	int r;

	jp_ws(j);
	switch (*j->p) {
	case '\0':
		return jp_syntax(j);
	case '{':
	case '[':
		if (++j->depth > JSON_MAX_DEPTH)
			return jp_fail(j, "JSON parse error, too many nested levels");
		r = *j->p == '{' ? jp_object(j, key) : jp_array(j, key);
		j->depth--;
		return r;
	case '"':
	case '\'': {
		char *s;
		if ((r = jp_string(j, &s)) < 0)
			return r;
		r = jp_add(j, key, s, false);
		free(s);
		return r;
	}
	}
	if (!strncmp(j->p, "true", 4)) {
		j->p += 4;
		return jp_add(j, key, "on", false);
	}
	if (!strncmp(j->p, "false", 5)) {
		j->p += 5;
		return jp_add(j, key, "off", false);
	}
	if (!strncmp(j->p, "null", 4)) {
		j->p += 4;
		return jp_add(j, key, "", true);
	}
	size_t n = number_len(j->p);
	if (n) {
		char *s = strndup(j->p, n);
		if (!s)
			return -ENOMEM;
		j->p += n;
		r = jp_add(j, key, s, false);
		free(s);
		return r;
	}
	return jp_fail(j, "JSON parse error, expecting value");
}

int cli_json_parse(const char *s, struct cli_opts *o, char *err, size_t errlen)
{
	struct jp j = { .p = s, .o = o, .err = err, .errlen = errlen };
	int r;

	if (err && errlen)
		err[0] = '\0';
	jp_ws(&j);
	if (!*j.p)
		return jp_fail(&j, "Expecting a JSON value");
	char c0 = *j.p;
	r = jp_value(&j, "");
	if (r == -EDOM || (r == 0 && c0 != '{')) {
		if (err)
			snprintf(err, errlen, "Invalid JSON object given");
		return -EINVAL;
	}
	if (r < 0)
		return r;
	jp_ws(&j);
	if (*j.p)
		return jp_fail(&j, "JSON parse error, invalid syntax");
	return 0;
}
