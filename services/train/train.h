/*
 * train.h: the `train` stage kind. A GPT-2 model (common/model.h) trained
 * on preprocess's shards with AdamW and a cosine schedule, checkpointed so
 * that any worker can resume it, and registered in the model registry.
 *
 * Parameters (`with`), each checked with a message naming it:
 *   model          registry name (DNS label), required
 *   train_shards, val_shards, tokenizer   artifact refs (sha256:...), required
 *   config         {layers 4, heads 4, width 256, context 256}
 *   steps 1000, batch 8, seq_len (context), lr 1e-3, min_lr_frac 0.1,
 *   warmup (steps/20), weight_decay 0.1, beta1 0.9, beta2 0.95, grad_clip 1.0,
 *   eval_interval (steps/10), eval_batches 8, checkpoint_interval (steps/10),
 *   checkpoint_seconds 60, seed 1337, samples 3, sample_tokens 64, device auto
 *
 * Resumption: the trainer's whole state (parameters, AdamW moments, step,
 * the data sampler's RNG, tokens seen) is in the checkpoint, and the fast
 * path is deterministic for a fixed thread count, so a run resumed from a
 * checkpoint reaches the same weights as one never interrupted. On the GPU
 * (with.device cuda, or auto where one is present) a resumed run continues
 * from the same state, but its sums use atomics, so "the same weights"
 * holds to rounding, not to the bit.
 */
#ifndef GP_TRAIN_H
#define GP_TRAIN_H

#include <cjson/cJSON.h>
#include <stdint.h>

#include "artifact.h"
#include "model.h"
#include "worker.h"

#define GP_TRAIN_NAME_MAX 63

struct gp_train_params {
	char model_name[GP_TRAIN_NAME_MAX + 1];
	char train_ref[80], val_ref[80], tokenizer_ref[80];
	struct gp_model_config config; /* vocab filled from the tokenizer */
	long long steps, warmup, eval_interval, eval_batches, checkpoint_interval;
	int batch, seq_len;
	double lr, min_lr_frac, weight_decay, beta1, beta2, grad_clip, checkpoint_seconds;
	uint64_t seed;
	int samples, sample_tokens;
	char device[8]; /* auto | cpu | cuda */
};

/* Parse and check `with`. vocab is the tokenizer's (0: not known yet; the
 * model configuration is then completed by gp_train_params_set_vocab). */
gp_status gp_train_params_parse(const cJSON *with, struct gp_train_params *p,
				struct gp_err *err);
void gp_train_params_set_vocab(struct gp_train_params *p, int vocab);
/* A hash of everything that decides the trajectory; a checkpoint made with
 * other hyperparameters is not resumed. */
uint64_t gp_train_fingerprint(const struct gp_train_params *p);

struct gp_trainer;

/*
 * Start training state over borrowed token arrays (they must outlive the
 * trainer). Fresh initialization from p->seed.
 */
gp_status gp_trainer_create(struct gp_trainer **out, const struct gp_train_params *p,
			    const uint16_t *train, size_t n_train, const uint16_t *val,
			    size_t n_val, struct gp_err *err);
void gp_trainer_destroy(struct gp_trainer *t);
/* Replace the state by a checkpoint's. GP_ERR_NOT_FOUND: no file;
 * GP_ERR_CONFLICT: made with other hyperparameters or another shape. */
gp_status gp_trainer_resume(struct gp_trainer *t, const char *path, struct gp_err *err);
/* One optimizer step; *loss and *lr of that step. */
gp_status gp_trainer_step(struct gp_trainer *t, float *loss, float *lr, struct gp_err *err);
/* Mean loss over the evaluation batches of the validation tokens (NAN
 * when there are too few of them). */
gp_status gp_trainer_eval(struct gp_trainer *t, double *val_loss, struct gp_err *err);
gp_status gp_trainer_save(struct gp_trainer *t, const char *path, struct gp_err *err);
gp_status gp_trainer_encode(struct gp_trainer *t, uint8_t **out, size_t *len, struct gp_err *err);
long long gp_trainer_steps_done(const struct gp_trainer *t);
unsigned long long gp_trainer_tokens_seen(const struct gp_trainer *t);
double gp_trainer_seconds(const struct gp_trainer *t); /* training time, across resumes */
/* The model on the host (brought back from the GPU first when it trains
 * there). */
struct gp_model *gp_trainer_model(struct gp_trainer *t);
/* "cuda" when the trainer runs on the GPU (with.device cuda, or auto with
 * a GPU present; bf16 with fp32 master weights), else "cpu". */
const char *gp_trainer_device(const struct gp_trainer *t);
/* SHA-256 of the parameters' bytes (what "the same weights" means). */
void gp_trainer_params_sha256(struct gp_trainer *t, char out[65]);

/* Entropy (nats) of the unigram distribution of tokens. */
double gp_unigram_entropy(const uint16_t *ids, size_t n, int vocab);

struct gp_train_config {
	struct gp_store *store;
	const char *checkpoint_dir; /* <data-dir>/checkpoints */
	const char *resource_class; /* recorded with the model version */
};

/* The worker handler (closure: struct gp_train_config *). */
void gp_train_handle(struct gp_job *job, void *closure);

#endif
