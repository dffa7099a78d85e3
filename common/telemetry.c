/*
 * telemetry.c: read the telemetry stream back (see telemetry.h).
 */
#include "telemetry.h"

#include <stdio.h>
#include <string.h>

#include "subjects.h"

gp_status gp_telemetry_scan(struct gp_bus *bus, const char *model, long long since_unix_ms,
			    long long max_examined, gp_telemetry_fn fn, void *closure,
			    struct gp_err *err)
{
	if (!gp_bus_token_ok(model))
		return gp_err_set(err, GP_ERR_INVALID, "model \"%s\" is not a DNS label", model);
	jsCtx *js = gp_bus_js(bus);
	jsStreamInfo *si = NULL;
	jsErrCode jerr = 0;
	natsStatus s = js_GetStreamInfo(&si, js, GP_STREAM_TELEMETRY, NULL, &jerr);
	if (s != NATS_OK)
		return gp_bus_status(s, jerr, "telemetry stream", err);
	uint64_t first = si->State.FirstSeq, last = si->State.LastSeq;
	jsStreamInfo_Destroy(si);
	char subject[128];
	snprintf(subject, sizeof subject, GP_SUBJ_TELEMETRY "%s", model);
	long long seen = 0;
	for (uint64_t seq = last; seq >= first && seq > 0 && seen < max_examined; seq--, seen++) {
		natsMsg *m = NULL;
		if (js_GetMsg(&m, js, GP_STREAM_TELEMETRY, seq, NULL, &jerr) != NATS_OK)
			continue; /* deleted or expired */
		if (strcmp(natsMsg_GetSubject(m), subject)) {
			natsMsg_Destroy(m);
			continue;
		}
		gp_telemetry *t = NULL;
		struct gp_err e2 = {0};
		int stop = 0;
		if (!gp_wire_decode_telemetry(&t, (const uint8_t *)natsMsg_GetData(m),
					      (size_t)natsMsg_GetDataLength(m), &e2)) {
			if (since_unix_ms && t->time_unix_ms < since_unix_ms - 10000)
				stop = 1;
			else if (!since_unix_ms || t->time_unix_ms >= since_unix_ms)
				stop = fn(t, seq, closure);
			gp_wire_free_telemetry(t);
		}
		natsMsg_Destroy(m);
		if (stop)
			break;
	}
	return GP_OK;
}
