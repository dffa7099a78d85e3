/*
 * subjects.h: every NATS subject and JetStream name genpipe uses, in one place.
 *
 * A subject token that comes from user input (stage kind, model name) must be
 * a DNS label (lower-case letters, digits, '-'), which is also a valid NATS
 * token; gp_bus_subject_token_ok() checks it before it is formatted in.
 */
#ifndef GP_SUBJECTS_H
#define GP_SUBJECTS_H

/* Streams (JetStream). */
#define GP_STREAM_JOBS      "GENPIPE_JOBS"      /* work queue, one consumer per kind */
#define GP_STREAM_EVENTS    "GENPIPE_EVENTS"    /* stage events and results */
#define GP_STREAM_TELEMETRY "GENPIPE_TELEMETRY" /* served requests */
#define GP_STREAM_FEEDBACK  "GENPIPE_FEEDBACK"
#define GP_STREAM_ALERTS    "GENPIPE_ALERTS"
#define GP_STREAM_CONTROL   "GENPIPE_CONTROL"   /* retrain triggers, registry changes */

/* Subjects; a trailing "." takes one more token (see the comment per line). */
#define GP_SUBJ_JOBS        "genpipe.jobs."      /* + kind */
#define GP_SUBJ_EVENTS      "genpipe.events."    /* + run id */
#define GP_SUBJ_RESULTS     "genpipe.results."   /* + run id */
#define GP_SUBJ_TELEMETRY   "genpipe.telemetry." /* + model */
#define GP_SUBJ_FEEDBACK    "genpipe.feedback."  /* + model */
#define GP_SUBJ_ALERTS      "genpipe.alerts."    /* + model */
#define GP_SUBJ_TRIGGERS    "genpipe.triggers."  /* + pipeline */
#define GP_SUBJ_REGISTRY    "genpipe.registry."  /* + model: alias moved */
#define GP_SUBJ_INFER       "genpipe.infer."     /* + model, request/reply */

/* Durable consumer of the jobs stream for one stage kind: "jobs-" + kind. */
#define GP_CONSUMER_JOBS_PREFIX "jobs-"

/* Queue group of online inference replicas. */
#define GP_QUEUE_INFER "genpipe-infer"

/* Header carrying the deduplication id (JetStream's own). */
#define GP_HDR_MSG_ID "Nats-Msg-Id"

#endif
