/*
 * test_data: the byte-level BPE tokenizer, llm.c shards and the artifact
 * store (pure logic and the file system; no servers).
 */
#include <dirent.h>
#include <glob.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "artifact.h"
#include "bpe.h"
#include "../check.h"
#include "shard.h"

static uint64_t rng = 0x2545F4914F6CDD1DULL;
static uint32_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (uint32_t)(rng >> 16);
}

/* Text-like bytes from a small vocabulary of words, plus noise. */
static size_t make_text(uint8_t *buf, size_t len, int words)
{
	static const char *w[] = { "the", "cat", "sat", "on", "mat", "and", "then", "a", "dog",
				   "ran", "123", "4567", ",", ".", "!\n", "caf\xc3\xa9", "  ",
				   "\t", "theory", "there" };
	size_t n = 0;
	while (n + 16 < len) {
		const char *s = w[rnd() % (unsigned)words];
		size_t k = strlen(s);
		memcpy(buf + n, s, k);
		n += k;
		if (rnd() % 3)
			buf[n++] = ' ';
	}
	return n;
}

static void roundtrip(struct gp_bpe *b, const uint8_t *x, size_t len)
{
	struct gp_err e = { 0 };
	uint16_t *ids = NULL, *ref = NULL;
	size_t n = 0, cap = 0, rn = 0, rcap = 0;
	REQUIRE_OK(gp_bpe_encode(b, x, len, &ids, &n, &cap, &e), e);
	REQUIRE_OK(gp_bpe_encode_reference(b, x, len, &ref, &rn, &rcap, &e), e);
	CHECK(n == rn && (n == 0 || !memcmp(ids, ref, n * sizeof *ids)));
	for (size_t i = 0; i < n; i++)
		CHECK(ids[i] < gp_bpe_eot(b));
	uint8_t *out = NULL;
	size_t olen = 0;
	REQUIRE_OK(gp_bpe_decode(b, ids, n, &out, &olen, &e), e);
	CHECK(olen == len && (len == 0 || !memcmp(out, x, len)));
	free(out);
	free(ids);
	free(ref);
}

static void test_chunker(void)
{
	const char *s = "Hello, world!  It's 2026\n\n  ok";
	const char *want[] = { "Hello", ",", " world", "!", " ", " It", "'", "s", " 2026",
			       "\n\n ", " ok" };
	size_t off = 0, i = 0, len = strlen(s);
	while (off < len && i < sizeof want / sizeof want[0]) {
		size_t k = gp_bpe_chunk((const uint8_t *)s + off, len - off);
		char got[64];
		snprintf(got, sizeof got, "%.*s", (int)k, s + off);
		CHECK_STR(got, want[i]);
		off += k;
		i++;
	}
	CHECK(off == len && i == sizeof want / sizeof want[0]);
	/* a run longer than the limit is cut */
	uint8_t a[200];
	memset(a, 'a', sizeof a);
	CHECK(gp_bpe_chunk(a, sizeof a) == GP_BPE_MAX_CHUNK);
}

static void test_train(void)
{
	struct gp_err e = { 0 };
	static uint8_t text[200000];
	for (int round = 0; round < 4; round++) {
		size_t len = make_text(text, sizeof text / (round + 1), 5 + round * 5);
		struct gp_bpe_trainer *t;
		REQUIRE_OK(gp_bpe_trainer_new(&t, &e), e);
		REQUIRE_OK(gp_bpe_trainer_add(t, text, len, &e), e);
		struct gp_bpe *fast, *naive;
		int vocab = 300 + round * 40;
		REQUIRE_OK(gp_bpe_train(t, vocab, 0, &fast, &e), e);
		REQUIRE_OK(gp_bpe_train(t, vocab, 1, &naive, &e), e);
		gp_bpe_trainer_free(t);
		/* the incremental trainer learns exactly the reference's merges */
		uint8_t *s1, *s2;
		size_t l1, l2;
		REQUIRE_OK(gp_bpe_save(fast, &s1, &l1, &e), e);
		REQUIRE_OK(gp_bpe_save(naive, &s2, &l2, &e), e);
		CHECK(l1 == l2 && !memcmp(s1, s2, l1));
		CHECK(gp_bpe_vocab_size(fast) > 270);
		/* the most frequent word becomes one token */
		uint16_t *ids = NULL;
		size_t n = 0, cap = 0;
		REQUIRE_OK(gp_bpe_encode(fast, " the", 4, &ids, &n, &cap, &e), e);
		CHECK(n == 1);
		free(ids);
		roundtrip(fast, text, len);
		/* save -> load gives the same tokenizer */
		struct gp_bpe *back;
		REQUIRE_OK(gp_bpe_load(s1, l1, &back, &e), e);
		CHECK(gp_bpe_vocab_size(back) == gp_bpe_vocab_size(fast));
		roundtrip(back, text, len / 2);
		gp_bpe_free(back);
		free(s1);
		free(s2);
		gp_bpe_free(fast);
		gp_bpe_free(naive);
	}
}

static void test_roundtrip_random(struct gp_bpe *b)
{
	static uint8_t x[4096];
	for (int i = 0; i < 500; i++) {
		size_t len = rnd() % sizeof x;
		int mode = i % 3;
		for (size_t k = 0; k < len; k++)
			x[k] = mode == 0 ? (uint8_t)rnd() : mode == 1 ? (uint8_t)(" ae\n\xc3\xff"[rnd() % 6])
									: (uint8_t)(rnd() % 128);
		roundtrip(b, x, len);
	}
	roundtrip(b, x, 0);
}

/* Every file of the fortune corpus, when installed, round-trips. */
static void test_roundtrip_corpus(struct gp_bpe *b)
{
	glob_t g;
	if (glob("/usr/share/common-licenses/*", 0, NULL, &g) != 0)
		return;
	int files = 0;
	for (size_t i = 0; i < g.gl_pathc && files < 20; i++) {
		FILE *f = fopen(g.gl_pathv[i], "rb");
		if (!f)
			continue;
		static uint8_t buf[1 << 20];
		size_t n = fread(buf, 1, sizeof buf, f);
		fclose(f);
		roundtrip(b, buf, n);
		files++;
	}
	globfree(&g);
	CHECK(files > 0);
}

static void test_load_errors(void)
{
	struct gp_err e = { 0 };
	struct gp_bpe *b = NULL;
	uint8_t buf[64] = { 0 };
	CHECK(gp_bpe_load(buf, 8, &b, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "shorter than the header");
	uint32_t hdr[6] = { GP_BPE_MAGIC, 1, 258, 1, 104, 105 };
	CHECK(gp_bpe_load(hdr, 24, &b, &e) == GP_OK);
	gp_bpe_free(b);
	hdr[0] = 1;
	CHECK(gp_bpe_load(hdr, 24, &b, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "bad magic");
	hdr[0] = GP_BPE_MAGIC;
	hdr[1] = 2;
	CHECK(gp_bpe_load(hdr, 24, &b, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "version");
	hdr[1] = 1;
	hdr[2] = 300;
	CHECK(gp_bpe_load(hdr, 24, &b, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "does not match");
	hdr[2] = 258;
	CHECK(gp_bpe_load(hdr, 20, &b, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "expected 24");
	hdr[4] = 256; /* refers to itself */
	CHECK(gp_bpe_load(hdr, 24, &b, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "later token");
	/* a repeated pair */
	uint32_t rep[8] = { GP_BPE_MAGIC, 1, 259, 2, 97, 98, 97, 98 };
	CHECK(gp_bpe_load(rep, 32, &b, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "repeats");
	/* tokens that double each time grow past the length limit */
	uint32_t grow[4 + 2 * 8] = { GP_BPE_MAGIC, 1, 257 + 8, 8 };
	grow[4] = grow[5] = 'a';
	for (int i = 1; i < 8; i++)
		grow[4 + 2 * i] = grow[5 + 2 * i] = 256 + (uint32_t)i - 1;
	CHECK(gp_bpe_load(grow, sizeof grow, &b, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "exceeds the limit");
	/* decode refuses ids outside the vocabulary */
	uint32_t ok[6] = { GP_BPE_MAGIC, 1, 258, 1, 104, 105 };
	REQUIRE_OK(gp_bpe_load(ok, 24, &b, &e), e);
	uint16_t ids[] = { 104, 999 };
	uint8_t *out;
	size_t olen;
	CHECK(gp_bpe_decode(b, ids, 2, &out, &olen, &e) == GP_ERR_INVALID);
	uint16_t eot[] = { 256, (uint16_t)gp_bpe_eot(b), 105 };
	REQUIRE_OK(gp_bpe_decode(b, eot, 3, &out, &olen, &e), e);
	CHECK(olen == 3 && !memcmp(out, "hii", 3));
	free(out);
	gp_bpe_free(b);
}

static void test_shards(void)
{
	struct gp_err e = { 0 };
	uint16_t ids[] = { 0, 1, 255, 256, 4095, 65535 };
	uint8_t *buf;
	size_t len;
	REQUIRE_OK(gp_shard_encode(ids, 6, &buf, &len, &e), e);
	CHECK(len == 1024 + 12);
	int32_t h[3];
	memcpy(h, buf, sizeof h);
	CHECK(h[0] == 20240520 && h[1] == 1 && h[2] == 6);
	const uint8_t *t;
	size_t n;
	REQUIRE_OK(gp_shard_parse(buf, len, 0, &t, &n, &e), e);
	CHECK(n == 6);
	for (size_t i = 0; i < n; i++)
		CHECK(gp_shard_token(t, i) == ids[i]);
	CHECK(gp_shard_parse(buf, len, 4096, &t, &n, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "token 5 has id 65535");
	CHECK(gp_shard_parse(buf, len - 1, 0, &t, &n, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "header says 6 tokens");
	CHECK(gp_shard_parse(buf, 100, 0, &t, &n, &e) == GP_ERR_INVALID);
	buf[4] = 2;
	CHECK(gp_shard_parse(buf, len, 0, &t, &n, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "version 2");
	buf[0] = 0;
	CHECK(gp_shard_parse(buf, len, 0, &t, &n, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "bad magic");
	free(buf);
}

static void test_store(void)
{
	struct gp_err e = { 0 };
	char dir[] = "/tmp/gp-store-XXXXXX";
	REQUIRE(mkdtemp(dir));
	struct gp_store *s;
	CHECK(gp_store_open(&s, "s3://bucket/x", &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "only file://");
	CHECK(gp_store_open(&s, "relative/dir", &e) == GP_ERR_INVALID);
	char uri[300];
	snprintf(uri, sizeof uri, "file://%s", dir);
	REQUIRE_OK(gp_store_open(&s, uri, &e), e);
	char h[65], h2[65];
	REQUIRE_OK(gp_store_put(s, "hello", 5, h, &e), e);
	CHECK_STR(h, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
	REQUIRE_OK(gp_store_put(s, "hello", 5, h2, &e), e); /* idempotent */
	CHECK_STR(h, h2);
	CHECK(gp_store_has(s, h));
	uint8_t *d;
	size_t n;
	REQUIRE_OK(gp_store_get(s, h, 100, &d, &n, &e), e);
	CHECK(n == 5 && !memcmp(d, "hello", 5));
	free(d);
	CHECK(gp_store_get(s, h, 4, &d, &n, &e) == GP_ERR_TOO_BIG);
	/* no temporary file is left behind */
	char tmp[400];
	snprintf(tmp, sizeof tmp, "%s/tmp", dir);
	DIR *dd = opendir(tmp);
	int entries = 0;
	for (struct dirent *de; dd && (de = readdir(dd));)
		entries += de->d_name[0] != '.';
	if (dd)
		closedir(dd);
	CHECK(entries == 0);
	/* a corrupted object is detected on read */
	char path[400];
	snprintf(path, sizeof path, "%s/sha256/%.2s/%s", dir, h, h);
	FILE *f = fopen(path, "r+");
	REQUIRE(f);
	fputc('j', f);
	fclose(f);
	CHECK(gp_store_get(s, h, 100, &d, &n, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "corrupt");
	unlink(path);
	CHECK(gp_store_get(s, h, 100, &d, &n, &e) == GP_ERR_NOT_FOUND);
	CHECK(gp_store_get(s, "../../etc/passwd", 100, &d, &n, &e) == GP_ERR_INVALID);
	char ref[80];
	snprintf(ref, sizeof ref, "sha256:%s", h);
	char parsed[65];
	CHECK(gp_artifact_ref_parse(ref, parsed) == 0 && !strcmp(parsed, h));
	CHECK(gp_artifact_ref_parse("sha256:abc", parsed) == -1);
	CHECK(gp_artifact_ref_parse("md5:x", parsed) == -1);
	gp_store_close(s);
	char cmd[400];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	CHECK(system(cmd) == 0);
}

int main(void)
{
	test_chunker();
	test_train();
	struct gp_err e = { 0 };
	static uint8_t text[300000];
	size_t len = make_text(text, sizeof text, 20);
	struct gp_bpe_trainer *t;
	REQUIRE_OK(gp_bpe_trainer_new(&t, &e), e);
	REQUIRE_OK(gp_bpe_trainer_add(t, text, len, &e), e);
	struct gp_bpe *b;
	REQUIRE_OK(gp_bpe_train(t, 512, 0, &b, &e), e);
	gp_bpe_trainer_free(t);
	test_roundtrip_random(b);
	test_roundtrip_corpus(b);
	gp_bpe_free(b);
	test_load_errors();
	test_shards();
	test_store();
	return CHECK_RESULT();
}
