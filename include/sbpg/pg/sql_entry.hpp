// sbpg/pg/sql_entry.hpp
//   SqlEntry: the one way from SQL into sbpg's code. Every PG_FUNCTION_INFO_V1 function is one line,
//   `return SqlEntry("sbpg.f()", fcinfo, Body);`. Body runs inside a C++ try block; a C++ exception
//   it lets out is caught there, copied into a PgError, and reported with ereport(ERROR) only once
//   the try block and Body's frames are gone, so no exception ever reaches PostgreSQL:
//     SqlError           -> its SQLSTATE, message, detail and hint;
//     std::bad_alloc     -> out_of_memory;
//     any other          -> internal_error naming the function (never taken for out of memory).
//   A PostgreSQL error raised by Body longjmps out through SqlEntry as it would out of C code: Body
//   must therefore own no C++ object with a destructor while it calls PostgreSQL (C++ work goes in
//   functions of its own that return before PostgreSQL is called again), and SqlEntry's own frame
//   holds only the trivially destructible PgError.
//   Include after postgres.h, with sbpg/pg/pg_error.hpp included before postgres.h.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/sql_entry.hpp"
#endif

extern "C" {
#include "fmgr.h"
#include "utils/elog.h"
}

#include <exception>
#include <new>

namespace sbpg::pg {

// Reports err with ereport(ERROR) (guard.cpp); function names the SQL function for internal errors.
[[noreturn]] void ReportSqlError(const char *function, const PgError &err);

template <typename Body>
Datum
SqlEntry(const char *function, FunctionCallInfo fcinfo, Body body) {
	PgError err;
	try {
		return body(fcinfo);
	} catch (const SqlError &e) {
		err = e.error();
	} catch (const std::bad_alloc &) {
		err.sqlerrcode = ERRCODE_OUT_OF_MEMORY;
		err.message.Set("out of memory");
	} catch (const std::exception &e) {
		err.sqlerrcode = ERRCODE_INTERNAL_ERROR;
		err.message.Set(e.what());
	} catch (...) {
		err.sqlerrcode = ERRCODE_INTERNAL_ERROR;
		err.message.Set("an exception of unknown type");
	}
	ReportSqlError(function, err);
}

} // namespace sbpg::pg
