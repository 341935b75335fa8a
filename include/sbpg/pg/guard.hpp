// sbpg/pg/guard.hpp
//   The two guarded boundaries between C++ and PostgreSQL (include after postgres.h, only from
//   src/pg/).
//
//   PostgreSQL -> C++: PgGuard(fn, &err) runs fn, which calls PostgreSQL, under its own sigsetjmp.
//   An ereport(ERROR) inside fn longjmps back to PgGuard only, never across the caller's C++
//   frames; PgGuard restores the memory context, copies the error into a plain struct, aborts the
//   transaction if one was open, and returns false. fn itself must own no C++ objects with
//   destructors (its frames are the ones the longjmp crosses) and must not throw.
//
//   C++ -> PostgreSQL: the worker's entry point (worker.cpp) catches every C++ exception and
//   reports it with ereport only after the C++ frames are gone. SQL-callable functions are plain C.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/guard.hpp"
#endif

extern "C" {
#include "access/xact.h"
#include "utils/elog.h"
#include "utils/memutils.h"
}

#include <cstring>

namespace sbpg::pg {

// A copy of a PostgreSQL error that outlives the error state.
struct PgError {
	int sqlerrcode = 0;
	int elevel = 0;
	char message[1024] = "";
	char detail[1024] = "";
	char hint[256] = "";
	char context[512] = "";

	void Set(const ErrorData *e) {
		sqlerrcode = e->sqlerrcode;
		elevel = e->elevel;
		std::strncpy(message, e->message ? e->message : "", sizeof message - 1);
		std::strncpy(detail, e->detail ? e->detail : "", sizeof detail - 1);
		std::strncpy(hint, e->hint ? e->hint : "", sizeof hint - 1);
		std::strncpy(context, e->context ? e->context : "", sizeof context - 1);
	}
	const char *SqlState() const { return unpack_sql_state(sqlerrcode); }
};

// Copies the current error into *err and clears the error state. Call in a PG_CATCH block.
inline void
TakeError(MemoryContext safe, PgError *err) {
	MemoryContextSwitchTo(safe);
	ErrorData *e = CopyErrorData();
	FlushErrorState();
	err->Set(e);
	FreeErrorData(e);
}

template <typename Fn>
bool
PgGuard(Fn &&fn, PgError *err) {
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile bool ok = true;
	PG_TRY();
	{
		fn();
	}
	PG_CATCH();
	{
		TakeError(oldcxt, err);
		ok = false;
	}
	PG_END_TRY();
	if (!ok && IsTransactionState()) {
		// The transaction is in an unknown state: end it. Aborting can itself fail only in ways
		// that make the process unusable, and then PostgreSQL exits it.
		AbortCurrentTransaction();
		MemoryContextSwitchTo(oldcxt);
	}
	return ok;
}

} // namespace sbpg::pg
