/*
 * telemetry.h: reading back the telemetry stream (GENPIPE_TELEMETRY), for
 * the CLI and for the deploy stage watching a canary.
 *
 * Messages are read by sequence from the stream's end (JetStream direct
 * reads, no consumer to create or clean up), newest first, decoded and
 * validated; undecodable ones are skipped.
 */
#ifndef GP_TELEMETRY_H
#define GP_TELEMETRY_H

#include "bus.h"
#include "wire.h"

/* Return non-zero to stop the scan. */
typedef int (*gp_telemetry_fn)(const gp_telemetry *t, unsigned long long seq, void *closure);

/*
 * Call fn for each request of model logged at or after since_unix_ms (0:
 * any time), newest first, examining at most max_examined messages. Events
 * are stored a little out of time order (replicas, batching), so the scan
 * goes on until it meets one 10 s older than since_unix_ms.
 */
gp_status gp_telemetry_scan(struct gp_bus *bus, const char *model, long long since_unix_ms,
			    long long max_examined, gp_telemetry_fn fn, void *closure,
			    struct gp_err *err);

#endif
