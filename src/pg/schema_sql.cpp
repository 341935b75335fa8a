// src/pg/schema_sql.cpp
//   SQL-callable wrappers of the schema registry's pure C++ core (src/schema/schema.cpp):
//   sbpg._schema_unsupported(jsonb) and sbpg._schema_violations(jsonb, jsonb, text). The C++ work
//   runs in Compute*, which owns every C++ object and calls no PostgreSQL function; it hands back
//   malloc'd C strings, which the PostgreSQL side copies and frees. So no PostgreSQL error ever
//   longjmps across a C++ frame, and no C++ exception reaches PostgreSQL.
#include "sbpg/schema/schema.hpp"

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

extern "C" {
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

PGDLLEXPORT Datum sbpg_schema_unsupported(PG_FUNCTION_ARGS);
PGDLLEXPORT Datum sbpg_schema_violations(PG_FUNCTION_ARGS);
PG_FUNCTION_INFO_V1(sbpg_schema_unsupported);
PG_FUNCTION_INFO_V1(sbpg_schema_violations);
}

namespace {

char *
Dup(const std::string &s) {
	char *p = static_cast<char *>(std::malloc(s.size() + 1));
	if (p)
		std::memcpy(p, s.c_str(), s.size() + 1);
	return p;
}

// Returns a malloc'd reason when the schema is refused, nullptr when it is supported; *failed is
// set when the check itself could not run (out of memory).
char *
ComputeUnsupported(const char *schema, bool *failed) {
	*failed = false;
	try {
		std::string why;
		if (sbpg::schema::CheckSchemaSupported(schema, &why))
			return nullptr;
		char *r = Dup(why);
		*failed = r == nullptr;
		return r;
	} catch (...) {
		*failed = true;
		return nullptr;
	}
}

// Fills rows[3 * i + k] (rule, pointer, detail) with malloc'd strings; returns the row count, or -1
// for an unknown mode, -2 when the check could not run.
int
ComputeViolations(const char *old_schema, const char *new_schema, const char *mode_text, char ***rows) {
	*rows = nullptr;
	try {
		sbpg::schema::Mode mode;
		if (!sbpg::schema::ParseMode(mode_text, &mode))
			return -1;
		std::vector<sbpg::schema::Violation> v = sbpg::schema::CheckCompatible(old_schema, new_schema, mode);
		if (v.empty())
			return 0;
		char **out = static_cast<char **>(std::calloc(v.size() * 3, sizeof(char *)));
		if (!out)
			return -2;
		for (size_t i = 0; i < v.size(); ++i) {
			out[3 * i] = Dup(v[i].rule);
			out[3 * i + 1] = Dup(v[i].pointer);
			out[3 * i + 2] = Dup(v[i].detail);
		}
		*rows = out;
		return static_cast<int>(v.size());
	} catch (...) {
		return -2;
	}
}

char *
JsonbText(Jsonb *j) {
	return JsonbToCString(nullptr, &j->root, VARSIZE(j));
}

} // namespace

Datum
sbpg_schema_unsupported(PG_FUNCTION_ARGS) {
	char *schema = JsonbText(PG_GETARG_JSONB_P(0));
	bool failed;
	char *why = ComputeUnsupported(schema, &failed);
	if (failed)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("sbpg: could not check the schema")));
	if (!why)
		PG_RETURN_NULL();
	text *t = cstring_to_text(why);
	std::free(why);
	PG_RETURN_TEXT_P(t);
}

Datum
sbpg_schema_violations(PG_FUNCTION_ARGS) {
	ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);
	char *old_schema = JsonbText(PG_GETARG_JSONB_P(0));
	char *new_schema = JsonbText(PG_GETARG_JSONB_P(1));
	char *mode = text_to_cstring(PG_GETARG_TEXT_PP(2));
	InitMaterializedSRF(fcinfo, 0);
	char **rows;
	int n = ComputeViolations(old_schema, new_schema, mode, &rows);
	if (n == -1)
		ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("unknown compatibility mode \"%s\"", mode),
		                errdetail("The modes are none, backward, forward and full."),
		                errhint("backward: consumers of the new version read old messages; forward: consumers of "
		                        "the old version read new ones; full: both.")));
	if (n == -2)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("sbpg: could not compare the schemas")));
	// Copy into PostgreSQL memory and free the malloc'd strings before building the rows (only an
	// out-of-memory error while copying could leave them behind).
	char **copy = static_cast<char **>(palloc0(sizeof(char *) * (3 * n + 1)));
	for (int i = 0; i < 3 * n; ++i)
		copy[i] = rows[i] ? pstrdup(rows[i]) : nullptr;
	for (int i = 0; i < 3 * n; ++i)
		std::free(rows[i]);
	std::free(rows);
	for (int i = 0; i < n; ++i) {
		Datum values[3];
		bool nulls[3] = {false, false, false};
		for (int k = 0; k < 3; ++k) {
			if (copy[3 * i + k])
				values[k] = CStringGetTextDatum(copy[3 * i + k]);
			else
				nulls[k] = true;
		}
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	PG_RETURN_VOID();
}
