// sbpg/pg/pg_error.hpp
//   PgError: an error on its way between PostgreSQL and C++, in plain fixed-size text (ErrorText,
//   cut on character boundaries). TakeError (guard.hpp) fills it from PostgreSQL's error state;
//   SqlEntry (sql_entry.hpp) fills it from a C++ exception and reports it with ereport. SqlError
//   is the exception C++ code under SqlEntry throws to report an error with its SQLSTATE, detail
//   and hint. No PostgreSQL type appears here, so it is included, like every C++ header, before
//   postgres.h.
#pragma once

#include <exception>

#include "sbpg/core/fixed_text.hpp"

namespace sbpg::pg {

struct PgError {
	int sqlerrcode = 0; // PostgreSQL's packed SQLSTATE (0: none)
	int elevel = 0;
	char sqlstate[6] = ""; // the same, as its five characters
	ErrorText message{};
	ErrorText detail{};
	ErrorText hint{};
	ErrorText context{};

	const char *SqlState() const { return sqlstate; }
};

class SqlError : public std::exception {
  public:
	// sqlerrcode: an ERRCODE_* value.
	SqlError(int sqlerrcode, std::string_view message, std::string_view detail = {}, std::string_view hint = {}) {
		err_.sqlerrcode = sqlerrcode;
		err_.message.Set(message);
		err_.detail.Set(detail);
		err_.hint.Set(hint);
	}
	const char *what() const noexcept override { return err_.message.c_str(); }
	const PgError &error() const { return err_; }

  private:
	PgError err_;
};

} // namespace sbpg::pg

#include "sbpg/core/cpp_only.hpp"
