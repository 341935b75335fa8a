// src/pg/schema_sql.cpp
//   SQL-callable wrappers of the schema registry's pure C++ core (src/schema/schema.cpp):
//   sbpg._schema_unsupported(jsonb) and sbpg._schema_violations(jsonb, jsonb, text), each run under
//   SqlEntry. The C++ work runs in Compute*, which owns every C++ object and calls no PostgreSQL
//   function; it hands back malloc'd C strings, which the PostgreSQL side copies and frees. So no
//   PostgreSQL error ever longjmps across a C++ frame; an exception Compute* throws (an unknown
//   mode as SqlError, out of memory, a bug) is reported by SqlEntry.
#include "sbpg/pg/pg_error.hpp"
#include "sbpg/schema/schema.hpp"

#include <cstdlib>
#include <cstring>
#include <new>
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

#include "sbpg/pg/sql_entry.hpp"

using sbpg::pg::SqlEntry;
using sbpg::pg::SqlError;

namespace {

char *
Dup(const std::string &s) {
	char *p = static_cast<char *>(std::malloc(s.size() + 1));
	if (!p)
		throw std::bad_alloc();
	std::memcpy(p, s.c_str(), s.size() + 1);
	return p;
}

// Returns a malloc'd reason when the schema is refused, nullptr when it is supported.
char *
ComputeUnsupported(const char *schema) {
	std::string why;
	if (sbpg::schema::CheckSchemaSupported(schema, &why))
		return nullptr;
	return Dup(why);
}

void
FreeRows(char **rows, size_t n) {
	for (size_t i = 0; i < n; ++i)
		std::free(rows[i]);
	std::free(rows);
}

// Fills *rows with 3 malloc'd strings a violation (rule, pointer, detail); returns the count.
int
ComputeViolations(const char *old_schema, const char *new_schema, const char *mode_text, char ***rows) {
	*rows = nullptr;
	sbpg::schema::Mode mode;
	if (!sbpg::schema::ParseMode(mode_text, &mode))
		throw SqlError(ERRCODE_INVALID_PARAMETER_VALUE, std::string("unknown compatibility mode \"") + mode_text + "\"",
		               "The modes are none, backward, forward and full.",
		               "backward: consumers of the new version read old messages; forward: consumers of the old "
		               "version read new ones; full: both.");
	std::vector<sbpg::schema::Violation> v = sbpg::schema::CheckCompatible(old_schema, new_schema, mode);
	if (v.empty())
		return 0;
	char **out = static_cast<char **>(std::calloc(v.size() * 3, sizeof(char *)));
	if (!out)
		throw std::bad_alloc();
	try {
		for (size_t i = 0; i < v.size(); ++i) {
			out[3 * i] = Dup(v[i].rule);
			out[3 * i + 1] = Dup(v[i].pointer);
			out[3 * i + 2] = Dup(v[i].detail);
		}
	} catch (...) {
		FreeRows(out, v.size() * 3);
		throw;
	}
	*rows = out;
	return static_cast<int>(v.size());
}

char *
JsonbText(Jsonb *j) {
	return JsonbToCString(nullptr, &j->root, VARSIZE(j));
}

Datum
SchemaUnsupported(FunctionCallInfo fcinfo) {
	char *schema = JsonbText(PG_GETARG_JSONB_P(0));
	char *why = ComputeUnsupported(schema);
	if (!why)
		PG_RETURN_NULL();
	text *t = cstring_to_text(why);
	std::free(why);
	PG_RETURN_TEXT_P(t);
}

Datum
SchemaViolations(FunctionCallInfo fcinfo) {
	ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);
	char *old_schema = JsonbText(PG_GETARG_JSONB_P(0));
	char *new_schema = JsonbText(PG_GETARG_JSONB_P(1));
	char *mode = text_to_cstring(PG_GETARG_TEXT_PP(2));
	InitMaterializedSRF(fcinfo, 0);
	char **rows;
	int n = ComputeViolations(old_schema, new_schema, mode, &rows);
	// Copy into PostgreSQL memory and free the malloc'd strings before building the rows (only an
	// out-of-memory error while copying could leave them behind).
	char **copy = static_cast<char **>(palloc0(sizeof(char *) * (3 * n + 1)));
	for (int i = 0; i < 3 * n; ++i)
		copy[i] = rows[i] ? pstrdup(rows[i]) : nullptr;
	if (n > 0)
		FreeRows(rows, static_cast<size_t>(3 * n));
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

} // namespace

Datum
sbpg_schema_unsupported(PG_FUNCTION_ARGS) {
	return SqlEntry("sbpg._schema_unsupported()", fcinfo, SchemaUnsupported);
}

Datum
sbpg_schema_violations(PG_FUNCTION_ARGS) {
	return SqlEntry("sbpg._schema_violations()", fcinfo, SchemaViolations);
}
