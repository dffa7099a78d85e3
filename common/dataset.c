/*
 * dataset.c: document files and manifests (see dataset.h).
 */
#include "dataset.h"

#include <cjson/cJSON.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#include "artifact.h"
#include "bytes.h"

gp_status gp_buf_append(struct gp_buf *b, const void *data, size_t len, struct gp_err *err)
{
	if (b->len + len > b->cap) {
		size_t nc = b->cap ? b->cap : 65536;
		while (nc < b->len + len)
			nc *= 2;
		uint8_t *p = realloc(b->p, nc);
		if (!p)
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		b->p = p;
		b->cap = nc;
	}
	if (len)
		memcpy(b->p + b->len, data, len);
	b->len += len;
	return GP_OK;
}

void gp_dataset_header(uint8_t out[8])
{
	memcpy(out, "GPDS", 4);
	gp_put_le32(out + 4, 1);
}

gp_status gp_dataset_record(struct gp_buf *b, const char *source, const uint8_t sha[32],
			    const void *text, size_t len, struct gp_err *err)
{
	size_t sl = strlen(source);
	if (sl > GP_DATASET_MAX_SOURCE)
		sl = GP_DATASET_MAX_SOURCE;
	if (len > GP_DATASET_MAX_DOC)
		return gp_err_set(err, GP_ERR_TOO_BIG, "document of %zu bytes is too large", len);
	uint8_t h[8];
	gp_status st;
	gp_put_le32(h, (uint32_t)sl);
	if ((st = gp_buf_append(b, h, 4, err)) || (st = gp_buf_append(b, source, sl, err)) ||
	    (st = gp_buf_append(b, sha, 32, err)))
		return st;
	gp_put_le64(h, len);
	if ((st = gp_buf_append(b, h, 8, err)) || (st = gp_buf_append(b, text, len, err)))
		return st;
	return GP_OK;
}

void gp_dataset_trailer(uint64_t count, uint8_t out[12])
{
	memcpy(out, "GPDE", 4);
	gp_put_le64(out + 4, count);
}

gp_status gp_dataset_open(struct gp_dataset_reader *r, const uint8_t *data, size_t len,
			  struct gp_err *err)
{
	memset(r, 0, sizeof *r);
	if (len < 20 || memcmp(data, "GPDS", 4))
		return gp_err_set(err, GP_ERR_INVALID, "dataset: not a genpipe document file");
	if (gp_get_le32(data + 4) != 1)
		return gp_err_set(err, GP_ERR_INVALID, "dataset: unsupported version %u",
				  gp_get_le32(data + 4));
	if (memcmp(data + len - 12, "GPDE", 4))
		return gp_err_set(err, GP_ERR_INVALID, "dataset: truncated (no trailer)");
	r->p = data;
	r->len = len - 12;
	r->off = 8;
	r->count = gp_get_le64(data + len - 8);
	return GP_OK;
}

gp_status gp_dataset_next(struct gp_dataset_reader *r, struct gp_doc *doc, int *more,
			  struct gp_err *err)
{
	*more = 0;
	size_t left = r->len - r->off;
	if (left == 0) {
		if (r->seen != r->count)
			return gp_err_set(err, GP_ERR_INVALID,
					  "dataset: trailer counts %llu documents, file holds %llu",
					  (unsigned long long)r->count,
					  (unsigned long long)r->seen);
		return GP_OK;
	}
	const uint8_t *p = r->p + r->off;
	unsigned long long idx = (unsigned long long)r->seen;
	if (left < 4)
		return gp_err_set(err, GP_ERR_INVALID, "dataset: document %llu: truncated", idx);
	uint32_t sl = gp_get_le32(p);
	if (sl > GP_DATASET_MAX_SOURCE || left - 4 < (size_t)sl + 32 + 8)
		return gp_err_set(err, GP_ERR_INVALID,
				  "dataset: document %llu: source length %u is invalid", idx, sl);
	const uint8_t *sha = p + 4 + sl;
	uint64_t tl = gp_get_le64(sha + 32);
	size_t hdr = 4 + (size_t)sl + 32 + 8;
	if (tl > GP_DATASET_MAX_DOC || tl > left - hdr)
		return gp_err_set(err, GP_ERR_INVALID,
				  "dataset: document %llu: length %llu exceeds what is left", idx,
				  (unsigned long long)tl);
	const uint8_t *text = p + hdr;
	unsigned char md[32];
	unsigned int mdlen = 0;
	EVP_Digest(text, (size_t)tl, md, &mdlen, EVP_sha256(), NULL);
	if (memcmp(md, sha, 32))
		return gp_err_set(err, GP_ERR_INVALID,
				  "dataset: document %llu: text does not match its hash", idx);
	doc->source = (const char *)(p + 4);
	doc->source_len = sl;
	doc->sha256 = sha;
	doc->text = text;
	doc->len = (size_t)tl;
	r->off += hdr + (size_t)tl;
	r->seen++;
	*more = 1;
	return GP_OK;
}

static long long json_count(const cJSON *o, const char *key, int *ok)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 9e15 ||
	    v->valuedouble != (double)(long long)v->valuedouble) {
		*ok = 0;
		return 0;
	}
	return (long long)v->valuedouble;
}

gp_status gp_manifest_parse(const char *text, size_t len, struct gp_manifest *m,
			    struct gp_err *err)
{
	memset(m, 0, sizeof *m);
	if (len > GP_MANIFEST_MAX)
		return gp_err_set(err, GP_ERR_TOO_BIG, "manifest: %zu bytes, over the limit of %zu",
				  len, GP_MANIFEST_MAX);
	cJSON *j = cJSON_ParseWithLength(text, len);
	gp_status st = GP_OK;
	if (!cJSON_IsObject(j)) {
		st = gp_err_set(err, GP_ERR_INVALID, "manifest: not a JSON object");
		goto out;
	}
	const char *fmt = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "format"));
	if (!fmt || strcmp(fmt, "genpipe-dataset/1")) {
		st = gp_err_set(err, GP_ERR_INVALID,
				"manifest: format \"%.40s\" is not genpipe-dataset/1",
				fmt ? fmt : "(none)");
		goto out;
	}
	const char *data = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "data"));
	if (gp_artifact_ref_parse(data, m->data)) {
		st = gp_err_set(err, GP_ERR_INVALID, "manifest: \"data\" is not a sha256: reference");
		goto out;
	}
	int ok = 1;
	m->documents = json_count(j, "documents", &ok);
	m->bytes = json_count(j, "bytes", &ok);
	m->utf8_replaced = json_count(j, "utf8_replaced", &ok);
	if (!ok) {
		st = gp_err_set(err, GP_ERR_INVALID,
				"manifest: documents, bytes and utf8_replaced must be counts");
		goto out;
	}
	const cJSON *d = cJSON_GetObjectItemCaseSensitive(j, "dropped");
	if (!cJSON_IsObject(d)) {
		st = gp_err_set(err, GP_ERR_INVALID, "manifest: \"dropped\" must be an object");
		goto out;
	}
	for (const cJSON *c = d->child; c; c = c->next) {
		int ok2 = 1;
		json_count(d, c->string, &ok2);
		if (!ok2) {
			st = gp_err_set(err, GP_ERR_INVALID,
					"manifest: dropped.%.40s must be a count", c->string);
			goto out;
		}
	}
	m->dropped_json = cJSON_PrintUnformatted(d);
	if (!m->dropped_json)
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
out:
	cJSON_Delete(j);
	if (st)
		gp_manifest_free(m);
	return st;
}

void gp_manifest_free(struct gp_manifest *m)
{
	free(m->dropped_json);
	m->dropped_json = NULL;
}
