/*
 * Writes valid encodings of every wire message into CORPUS/<message>/ so the
 * fuzzers start from real structure instead of discovering field tags.
 * Usage: fuzz_seeds CORPUS_DIR
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/evp.h>

#include "bpe.h"
#include "dataset.h"
#include "model.h"
#include "shard.h"
#include "wire.h"

static int put(const char *dir, const char *msg, const ProtobufCMessage *m)
{
	char path[1024];
	snprintf(path, sizeof path, "%s/%s", dir, msg);
	if (mkdir(path, 0755) != 0 && errno != EEXIST)
		return 1;
	snprintf(path, sizeof path, "%s/%s/seed-valid", dir, msg);
	uint8_t *b = NULL;
	size_t len = 0;
	struct gp_err e = { 0 };
	if (gp_wire_encode(m, &b, &len, &e))
		return 1;
	FILE *f = fopen(path, "wb");
	if (!f) {
		free(b);
		return 1;
	}
	size_t w = fwrite(b, 1, len, f);
	fclose(f);
	free(b);
	return w != len;
}

static int put_bytes(const char *dir, const char *target, const void *b, size_t len)
{
	char path[1024];
	snprintf(path, sizeof path, "%s/%s", dir, target);
	if (mkdir(path, 0755) != 0 && errno != EEXIST)
		return 1;
	snprintf(path, sizeof path, "%s/%s/seed-valid", dir, target);
	FILE *f = fopen(path, "wb");
	if (!f)
		return 1;
	size_t w = fwrite(b, 1, len, f);
	fclose(f);
	return w != len;
}

/* A tokenizer, a shard, a manifest and a document file, all valid. */
static int data_seeds(const char *d)
{
	struct gp_err e = { 0 };
	struct gp_bpe_trainer *t = NULL;
	struct gp_bpe *b = NULL;
	const char *text = "the cat sat on the mat; the cat ran. the the the cat cat 123 123\n";
	int bad = 0;
	uint8_t *buf = NULL;
	size_t len = 0;
	if (gp_bpe_trainer_new(&t, &e) || gp_bpe_trainer_add(t, text, strlen(text), &e) ||
	    gp_bpe_train(t, 280, 0, &b, &e) || gp_bpe_save(b, &buf, &len, &e)) {
		gp_bpe_trainer_free(t);
		return 1;
	}
	gp_bpe_trainer_free(t);
	bad |= put_bytes(d, "tokenizer", buf, len);
	free(buf);
	uint16_t *ids = NULL;
	size_t n = 0, cap = 0;
	if (gp_bpe_encode(b, text, strlen(text), &ids, &n, &cap, &e) ||
	    gp_shard_encode(ids, n, &buf, &len, &e)) {
		gp_bpe_free(b);
		free(ids);
		return 1;
	}
	bad |= put_bytes(d, "shard", buf, len);
	free(buf);
	free(ids);
	gp_bpe_free(b);
	const char *man = "{\"format\":\"genpipe-dataset/1\",\"data\":\"sha256:"
			  "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824\","
			  "\"documents\":2,\"bytes\":10,\"utf8_replaced\":0,"
			  "\"dropped\":{\"duplicate\":1},\"sources\":[]}";
	bad |= put_bytes(d, "manifest", man, strlen(man));
	struct gp_buf db = { 0 };
	uint8_t h[12], sha[32];
	gp_dataset_header(h);
	gp_buf_append(&db, h, 8, &e);
	const char *docs[] = { "hello", "world" };
	for (int i = 0; i < 2; i++) {
		unsigned int l = 0;
		EVP_Digest(docs[i], 5, sha, &l, EVP_sha256(), NULL);
		gp_dataset_record(&db, "src", sha, docs[i], 5, &e);
	}
	gp_dataset_trailer(2, h);
	gp_buf_append(&db, h, 12, &e);
	bad |= put_bytes(d, "dataset", db.p, db.len);
	free(db.p);
	/* a checkpoint of a tiny model, with optimizer state */
	struct gp_model_config c = { .vocab = 8, .padded_vocab = 8, .context = 4, .layers = 1,
				     .heads = 1, .width = 4 };
	struct gp_model *m = NULL;
	if (gp_model_create(&m, &c, &e))
		return 1;
	gp_model_init(m, 1);
	size_t np = gp_model_num_params(m);
	float *mo = calloc(np, sizeof(float)), *ve = calloc(np, sizeof(float));
	struct gp_ckpt_meta meta = { .step = 3, .tokens_seen = 96, .rng = { 7, 0 } };
	if (!mo || !ve || gp_ckpt_encode(m, mo, ve, &meta, &buf, &len, &e)) {
		bad = 1;
	} else {
		bad |= put_bytes(d, "checkpoint", buf, len);
		free(buf);
	}
	free(mo);
	free(ve);
	gp_model_destroy(m);
	return bad;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: fuzz_seeds CORPUS_DIR\n");
		return 2;
	}
	const char *d = argv[1];
	int bad = 0;
	gp_stage_job j = GENPIPE__V1__STAGE_JOB__INIT;
	j.attempt_id = 1, j.run_id = 2, j.stage = "train", j.kind = "train", j.attempt = 1;
	j.params_json = "{\"steps\":10,\"lr\":0.001}";
	bad |= put(d, "stage_job", &j.base);
	gp_stage_event ev = GENPIPE__V1__STAGE_EVENT__INIT;
	ev.attempt_id = 1, ev.run_id = 2, ev.stage = "train", ev.progress = 0.5;
	ev.type = GENPIPE__V1__EVENT_TYPE__EVENT_PROGRESS, ev.metrics_json = "{\"loss\":3.2}";
	bad |= put(d, "stage_event", &ev.base);
	gp_stage_result r = GENPIPE__V1__STAGE_RESULT__INIT;
	r.attempt_id = 1, r.run_id = 2, r.stage = "train", r.attempt = 1;
	r.status = GENPIPE__V1__RESULT_STATUS__RESULT_SUCCEEDED, r.outputs_json = "{\"m\":\"x\"}";
	bad |= put(d, "stage_result", &r.base);
	Genpipe__V1__SamplingParams sp = GENPIPE__V1__SAMPLING_PARAMS__INIT;
	char *stops[] = { "\n\n" };
	sp.temperature = 0.8f, sp.top_p = 0.9f, sp.top_k = 40, sp.n_stop = 1, sp.stop = stops;
	gp_infer_request q = GENPIPE__V1__INFER_REQUEST__INIT;
	q.request_id = "req-1", q.model = "tiny", q.prompt = "Once upon", q.sampling = &sp;
	bad |= put(d, "infer_request", &q.base);
	gp_infer_response rs = GENPIPE__V1__INFER_RESPONSE__INIT;
	rs.request_id = "req-1", rs.text = "a time", rs.final = 1, rs.latency_ms = 3.5;
	bad |= put(d, "infer_response", &rs.base);
	uint32_t toks[] = { 10, 20, 30 };
	gp_telemetry t = GENPIPE__V1__TELEMETRY__INIT;
	t.request_id = "req-1", t.model = "tiny", t.n_prompt_tokens = 3, t.prompt_tokens = toks;
	bad |= put(d, "telemetry", &t.base);
	gp_feedback f = GENPIPE__V1__FEEDBACK__INIT;
	f.request_id = "req-1", f.rating = GENPIPE__V1__RATING__RATING_DOWN, f.correction = "better";
	bad |= put(d, "feedback", &f.base);
	gp_retrain_trigger rt = GENPIPE__V1__RETRAIN_TRIGGER__INIT;
	rt.trigger_id = 1, rt.pipeline = "demo", rt.rule = "negative-rate";
	bad |= put(d, "retrain_trigger", &rt.base);
	gp_alert a = GENPIPE__V1__ALERT__INIT;
	a.model = "tiny", a.metric = "psi", a.value = 0.3, a.threshold = 0.2;
	bad |= put(d, "alert", &a.base);
	gp_registry_change rc = GENPIPE__V1__REGISTRY_CHANGE__INIT;
	rc.model = "tiny", rc.alias = "production", rc.version = 2, rc.from_version = 1;
	bad |= put(d, "registry_change", &rc.base);
	bad |= data_seeds(d);
	const char *hist = "{\"format\": \"genpipe-token-histogram/1\", \"vocab_size\": 4, "
			   "\"train\": {\"tokens\": 6, \"counts\": [1, 2, 3, 0]}, "
			   "\"val\": {\"tokens\": 1, \"counts\": [0, 1, 0, 0]}}";
	bad |= put_bytes(d, "histogram", hist, strlen(hist));
	const char *gate = "val_loss < production.val_loss";
	bad |= put_bytes(d, "gate", gate, strlen(gate));
	if (bad)
		fprintf(stderr, "fuzz_seeds: could not write seeds under %s\n", d);
	return bad;
}
