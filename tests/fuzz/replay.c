/*
 * tests/fuzz/replay.c: a main() for the fuzz targets without libFuzzer, so
 * every build (gcc too) replays the seed corpora as a ctest (fuzz/<target>):
 * each argument is a file or a directory of files, and each file is given
 * once to LLVMFuzzerTestOneInput.  A target reports a bug by aborting, so
 * the test fails exactly when libFuzzer would report a crash (sanitizers
 * included in the ASan build).
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Optional, as for libFuzzer. */
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static int run_file(const char *path)
{
	FILE *f = fopen(path, "rb");
	if (!f) {
		perror(path);
		return 1;
	}
	uint8_t *buf = NULL;
	size_t len = 0, cap = 0, n;
	do {
		if (len == cap) {
			cap = cap ? cap * 2 : 65536;
			buf = realloc(buf, cap);
			if (!buf)
				abort();
		}
		n = fread(buf + len, 1, cap - len, f);
		len += n;
	} while (n > 0);
	fclose(f);
	printf("%s (%zu bytes)\n", path, len);
	fflush(stdout);
	LLVMFuzzerTestOneInput(buf, len);
	free(buf);
	return 0;
}

static int cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv)
{
	int fail = 0, files = 0;
	if (LLVMFuzzerInitialize)
		LLVMFuzzerInitialize(&argc, &argv);
	for (int i = 1; i < argc; i++) {
		struct stat st;
		if (stat(argv[i], &st) < 0) {
			perror(argv[i]);
			return 1;
		}
		if (!S_ISDIR(st.st_mode)) {
			fail |= run_file(argv[i]);
			files++;
			continue;
		}
		DIR *d = opendir(argv[i]);
		struct dirent *e;
		char **names = NULL;
		size_t nn = 0;
		while (d && (e = readdir(d))) {
			if (e->d_name[0] == '.')
				continue;
			names = realloc(names, (nn + 1) * sizeof(*names));
			if (!names)
				abort();
			size_t l = strlen(argv[i]) + strlen(e->d_name) + 2;
			names[nn] = malloc(l);
			snprintf(names[nn++], l, "%s/%s", argv[i], e->d_name);
		}
		if (d)
			closedir(d);
		qsort(names, nn, sizeof(*names), cmp); /* the same order every run */
		for (size_t k = 0; k < nn; k++) {
			fail |= run_file(names[k]);
			files++;
			free(names[k]);
		}
		free(names);
	}
	printf("%d inputs replayed\n", files);
	return fail || files == 0;
}
