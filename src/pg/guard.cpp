// src/pg/guard.cpp
//   The out-of-line halves of the boundaries in guard.hpp and sql_entry.hpp: copying PostgreSQL's
//   error state into a PgError, and reporting a PgError built from a C++ exception. Both run with
//   no C++ object alive in their frames.
#include "sbpg/pg/pg_error.hpp"

extern "C" {
#include "postgres.h"

#include "utils/elog.h"
#include "utils/memutils.h"
}

#include "sbpg/pg/compat.hpp"
#include "sbpg/pg/guard.hpp"
#include "sbpg/pg/sql_entry.hpp"

namespace sbpg::pg {

void
TakeError(MemoryContext safe, PgError *err) {
	MemoryContextSwitchTo(safe);
	ErrorData *e = CopyErrorData();
	FlushErrorState();
	err->sqlerrcode = e->sqlerrcode;
	err->elevel = e->elevel;
	compat::CopyCString(err->sqlstate, unpack_sql_state(e->sqlerrcode), sizeof err->sqlstate);
	err->message.Set(e->message ? e->message : "");
	err->detail.Set(e->detail ? e->detail : "");
	err->hint.Set(e->hint ? e->hint : "");
	err->context.Set(e->context ? e->context : "");
	FreeErrorData(e);
}

void
ReportSqlError(const char *function, const PgError &err) {
	if (err.sqlerrcode == ERRCODE_INTERNAL_ERROR)
		ereport(ERROR,
		        (errcode(ERRCODE_INTERNAL_ERROR), errmsg("internal error in %s: %s", function, err.message.c_str()),
		         errdetail("sbpg's C++ code failed unexpectedly; nothing the function did was kept."),
		         errhint("This is a bug in sbpg: please report it with the statement that caused it.")));
	ereport(ERROR, (errcode(err.sqlerrcode ? err.sqlerrcode : ERRCODE_INTERNAL_ERROR),
	                errmsg("%s", err.message.c_str()), err.detail.Empty() ? 0 : errdetail("%s", err.detail.c_str()),
	                err.hint.Empty() ? 0 : errhint("%s", err.hint.c_str())));
	pg_unreachable();
}

} // namespace sbpg::pg
