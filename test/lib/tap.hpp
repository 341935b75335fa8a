// test/lib/tap.hpp
//   A minimal test registry for the project's C++ test programs. Each TEST runs in order; CHECK
//   records a failure with its location and the test goes on, REQUIRE ends the test. Output is TAP
//   ("ok N - name", "not ok N - name") with "# pass N" / "# fail N" summary lines that test/run reads.
//   A program runs only the tests whose names contain argv[1], when given.
#pragma once

#include <csignal>

#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace tap {

struct Failure : std::exception {
	const char *what() const noexcept override { return "required check failed"; }
};

struct Test {
	const char *name;
	std::function<void()> fn;
};

inline std::vector<Test> &
Registry() {
	static std::vector<Test> tests;
	return tests;
}

inline std::vector<std::string> &
Failures() {
	static std::vector<std::string> f;
	return f;
}

struct Register {
	Register(const char *name, std::function<void()> fn) { Registry().push_back({name, std::move(fn)}); }
};

inline void
Fail(const char *file, int line, const std::string &msg) {
	std::ostringstream s;
	s << file << ":" << line << ": " << msg;
	Failures().push_back(s.str());
}

inline int
RunAll(int argc, char **argv) {
	const char *filter = argc > 1 ? argv[1] : nullptr;
	int n = 0, pass = 0, fail = 0;
	std::vector<Test *> selected;
	for (auto &t : Registry())
		if (!filter || std::strstr(t.name, filter))
			selected.push_back(&t);
	std::printf("1..%zu\n", selected.size());
	for (Test *t : selected) {
		++n;
		Failures().clear();
		try {
			t->fn();
		} catch (const Failure &) {
		} catch (const std::exception &e) {
			Failures().push_back(std::string("exception: ") + e.what());
		} catch (...) {
			Failures().push_back("unknown exception");
		}
		if (Failures().empty()) {
			++pass;
			std::printf("ok %d - %s\n", n, t->name);
		} else {
			++fail;
			std::printf("not ok %d - %s\n", n, t->name);
			for (auto &f : Failures())
				std::printf("  # %s\n", f.c_str());
		}
		std::fflush(stdout);
	}
	std::printf("# pass %d\n# fail %d\n", pass, fail);
	return fail == 0 ? 0 : 1;
}

} // namespace tap

#define TAP_CAT2(a, b) a##b
#define TAP_CAT(a, b) TAP_CAT2(a, b)
#define TEST(name)                                                                                                     \
	static void TAP_CAT(tap_test_, __LINE__)();                                                                        \
	static tap::Register TAP_CAT(tap_reg_, __LINE__)(name, TAP_CAT(tap_test_, __LINE__));                              \
	static void TAP_CAT(tap_test_, __LINE__)()

#define CHECK(cond)                                                                                                    \
	do {                                                                                                               \
		if (!(cond))                                                                                                   \
			tap::Fail(__FILE__, __LINE__, "CHECK(" #cond ")");                                                         \
	} while (0)
#define REQUIRE(cond)                                                                                                  \
	do {                                                                                                               \
		if (!(cond)) {                                                                                                 \
			tap::Fail(__FILE__, __LINE__, "REQUIRE(" #cond ")");                                                       \
			throw tap::Failure();                                                                                      \
		}                                                                                                              \
	} while (0)
#define CHECK_EQ(a, b)                                                                                                 \
	do {                                                                                                               \
		auto tap_a_ = (a);                                                                                             \
		auto tap_b_ = (b);                                                                                             \
		if (!(tap_a_ == tap_b_)) {                                                                                     \
			std::ostringstream tap_s_;                                                                                 \
			tap_s_ << "CHECK_EQ(" #a ", " #b "): " << tap_a_ << " != " << tap_b_;                                      \
			tap::Fail(__FILE__, __LINE__, tap_s_.str());                                                               \
		}                                                                                                              \
	} while (0)
// SIGPIPE is ignored as PostgreSQL does in its background workers, where this code runs: a peer
// that closes a socket mid-write is an error to report, not a reason to die.
#define TAP_MAIN                                                                                                       \
	int main(int argc, char **argv) {                                                                                  \
		signal(SIGPIPE, SIG_IGN);                                                                                      \
		return tap::RunAll(argc, argv);                                                                                \
	}
