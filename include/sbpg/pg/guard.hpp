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
//   reports it with ereport only after the C++ frames are gone. Every SQL-callable function runs
//   its body under SqlEntry (sql_entry.hpp), which does the same.
//
//   The error copy, PgError, is in sbpg/pg/pg_error.hpp (plain C++, included before postgres.h).
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/guard.hpp"
#endif

extern "C" {
#include "access/xact.h"
#include "utils/elog.h"
#include "utils/memutils.h"
}

namespace sbpg::pg {

struct PgError; // sbpg/pg/pg_error.hpp, which C++ code reading the error includes before postgres.h

// Copies the current error into *err and clears the error state. Call in a PG_CATCH block
// (guard.cpp).
void TakeError(MemoryContext safe, PgError *err);

template <typename Fn>
bool
PgGuard(Fn &&fn, PgError *err) {
	MemoryContext oldcxt = CurrentMemoryContext;
	volatile bool ok = true;
	// clang-format would join the one-statement block onto PG_TRY()'s line.
	// clang-format off
	PG_TRY();
	{
		fn();
	}
	// clang-format on
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
