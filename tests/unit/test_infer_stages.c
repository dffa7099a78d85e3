/*
 * test_infer_stages: the deploy stage's promote_if gates, parsed and
 * evaluated (the stage itself runs in test_infer_service).
 */
#include <math.h>
#include <string.h>

#include "../check.h"
#include "stages.h"

int main(void)
{
	struct gp_err err = {0};
	struct gp_gate g;
	REQUIRE_OK(gp_gate_parse("val_loss < production.val_loss", &g, &err), err);
	CHECK(g.against_alias && !strcmp(g.metric, "val_loss") && !strcmp(g.op, "<") &&
	      !strcmp(g.alias, "production") && !strcmp(g.other_metric, "val_loss"));
	CHECK(gp_gate_eval(&g, 4.0, 5.0) == 1);
	CHECK(gp_gate_eval(&g, 5.0, 5.0) == 0);
	CHECK(gp_gate_eval(&g, NAN, 5.0) == 0);  /* a missing metric never passes */
	CHECK(gp_gate_eval(&g, 4.0, NAN) == 0);
	REQUIRE_OK(gp_gate_parse("  accuracy>=0.75 ", &g, &err), err);
	CHECK(!g.against_alias && !strcmp(g.op, ">=") && g.number == 0.75);
	CHECK(gp_gate_eval(&g, 0.75, NAN) == 1 && gp_gate_eval(&g, 0.7, NAN) == 0);
	REQUIRE_OK(gp_gate_parse("val_loss <= 3", &g, &err), err);
	CHECK(gp_gate_eval(&g, 3, 0) == 1 && gp_gate_eval(&g, 3.1, 0) == 0);
	REQUIRE_OK(gp_gate_parse("x > staging.y", &g, &err), err);
	CHECK(gp_gate_eval(&g, 2, 1) == 1);
	REQUIRE_OK(gp_gate_parse("always", &g, &err), err);
	CHECK(g.always && gp_gate_eval(&g, NAN, NAN) == 1);
	struct {
		const char *text, *msg;
	} bad[] = {
		{"< 3", "expected a metric name"},
		{"val_loss = 3", "expected <, <=, > or >="},
		{"val_loss < ", "expected a number or ALIAS.METRIC"},
		{"val_loss < production", "expected a number or ALIAS.METRIC"},
		{"val_loss < production.", "a metric name must follow"},
		{"val_loss < 3 and more", "unexpected"},
		{"val_loss < inf", "expected a number or ALIAS.METRIC"},
		{"9lives > 1", "expected a metric name"},
	};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		CHECK(gp_gate_parse(bad[i].text, &g, &err) == GP_ERR_INVALID);
		CHECK_CONTAINS(err.msg, bad[i].msg);
		CHECK_CONTAINS(err.msg, "promote_if");
	}
	return CHECK_RESULT();
}
