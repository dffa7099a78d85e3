/*
 * engine.h: moves a run through its DAG.
 *
 * gp_engine_advance() is the only place run and stage states change after a
 * run is created (besides cancel and retry in common/run.c, which take the
 * same run lock). It runs in one transaction holding the run's row lock, so
 * any number of orchestrators may call it for the same run at any time: each
 * call reads the current state and does what is due, nothing twice.
 *
 * What it does, stage by stage (spec order, repeated until nothing changes):
 *   pending   -> skipped when a need failed, was cancelled or skipped;
 *                dispatched when every need succeeded (or was cached):
 *                `with` is resolved, the cache is consulted (same kind,
 *                kind version, resolved parameters and upstream outputs as a
 *                succeeded stage: outputs reused, state cached), otherwise
 *                an attempt and its job message are written (outbox);
 *   queued    -> follows its latest attempt: succeeded copies the outputs;
 *                a running attempt past its timeout is failed; a failed,
 *                timed-out or expired attempt is retried after backoff
 *                (retrying) while the stage's retry budget lasts, else the
 *                stage fails;
 *   retrying  -> dispatched again when its backoff has passed.
 * The run becomes running at its first dispatch and succeeded or failed when
 * every stage is final.
 *
 * Not thread-safe: parsed specs are cached per pipeline version in static
 * storage (versions are immutable, so the cache is never stale), and so are
 * the stage rows of the last runs advanced, with the run's revision (every
 * write to a run's stages bumps it, by trigger): an advance whose run has
 * the revision it left reads only the latest attempts of its queued and
 * retrying stages. The orchestrator calls it from its one loop thread.
 */
#ifndef GP_ENGINE_H
#define GP_ENGINE_H

#include "db.h"

/*
 * Advance one run. *due_ms (may be NULL) gets how long until something in
 * the run comes due by time (a backoff or a timeout), or -1 when nothing
 * does. *dispatched (may be NULL) counts attempts written. direct (may be
 * NULL) gets the job messages of a committed advance, for the caller to
 * publish at once (gp_outbox_publish_direct); without it, or when that
 * fails, the relay publishes them.
 */
struct gp_outbox_direct;
gp_status gp_engine_advance(struct gp_db *db, long long run_id, long long *due_ms,
			    int *dispatched, struct gp_outbox_direct *direct, struct gp_err *err);

/* Advances so far that read every stage row, and those that read only the
 * active stages (the kept rows were current). */
void gp_engine_stage_reads(long long *all, long long *active);

#endif
