# sbpg: PGXS build of the extension, plus the Service Bus emulator used by the tests.
#   make            the extension (sbpg.so) and test/sbemu/sbemu
#   make install    the extension into the PostgreSQL found by pg_config
#   make dist       sbpg-<version>.zip for PGXN, from the committed tree (refuses a dirty tree, a
#                   META.json that does not validate or disagrees with sbpg.control, a changed
#                   released script: test/pg/meta-check.mjs, test/pg/released-check.mjs)
#   test/run        every test suite
#   make format     rewrites the C++ files in place per .clang-format; make format-check lists
#                   the ones that differ (and fails if any does)
EXTENSION = sbpg
# The version is written once, as default_version in sbpg.control; META.json must agree (make dist
# and test/pg/packaging.sh check it). DISTVERSION is the same version as SemVer (0.2 -> 0.2.0),
# as PGXN names distributions.
EXTVERSION := $(shell sed -n "s/^[[:space:]]*default_version[[:space:]]*=[[:space:]]*'\([^']*\)'.*/\1/p" sbpg.control)
DISTVERSION := $(shell echo '$(EXTVERSION)' | awk -F. '{ printf "%s.%s.%s", $$1, ($$2 == "" ? 0 : $$2), ($$3 == "" ? 0 : $$3) }')
MODULE_big = sbpg
# Only the first version has a full script: CREATE EXTENSION runs it and then every update script
# up to default_version, the same path an existing installation takes with ALTER EXTENSION sbpg
# UPDATE. Every script is installed, so a new update script needs no change here.
DATA = $(wildcard sql/sbpg--*.sql)
PGFILEDESC = "sbpg - Azure Service Bus consumer"

SRCS = $(wildcard src/*.cpp src/*/*.cpp)
OBJS = $(SRCS:.cpp=.o)

# The launcher compares the installed extension's version with the module's own (SBPG_VERSION).
PG_CPPFLAGS = -Iinclude -DSBPG_VERSION='"$(EXTVERSION)"'
PG_CXXFLAGS = -std=c++17 -Wextra -Wno-unused-parameter -Wno-register -Wno-missing-field-initializers -MMD -MP
# Debian 12's libqpid-proton-cpp.pc names pkg-config modules Debian does not ship: link directly.
SHLIB_LINK = -lqpid-proton-cpp -l:libqpid-proton-core.so.10 -l:libqpid-proton-proactor.so.1 -lcurl -lssl -lcrypto -lstdc++ -lpthread
# Debian's PGXS would also compile every source to LLVM bitcode with clang, without C++17.
override with_llvm = no

# pg_regress (make installcheck against a running server): sql/*.sql -> expected/*.out
REGRESS = sql_surface privileges upgrade
REGRESS_OPTS = --inputdir=.

EXTRA_CLEAN = $(SRCS:.cpp=.d) results

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# test/run builds the extension once more for each other PostgreSQL version, in a copy of the
# sources without test/: the emulator is built only where it is.
ifneq ($(wildcard test/sbemu/Makefile),)
all: sbemu
endif

sbemu:
	$(MAKE) -C test/sbemu

clean: clean-sbemu
clean-sbemu:
	$(MAKE) -C test/sbemu clean
	$(MAKE) -C test/unit clean
	rm -rf test/unit/build-asan

# One list for make format, make format-check and test/run format: the extension's C++ sources
# and headers, the emulator, the unit tests, the fuzzers and the test library.
FORMAT_FILES = $(sort $(wildcard src/*.cpp src/*/*.cpp include/sbpg/*.hpp include/sbpg/*/*.hpp \
                                 test/sbemu/*.cpp test/sbemu/*.hpp test/unit/*.cpp test/unit/*.hpp \
                                 test/fuzz/*.cpp test/fuzz/*.hpp test/lib/*.hpp))
CLANG_FORMAT ?= clang-format

format:
	$(CLANG_FORMAT) -i $(FORMAT_FILES)

# Prints each file that clang-format would change, then a count; fails when there is one.
format-check:
	@command -v $(CLANG_FORMAT) >/dev/null || { echo "format-check: $(CLANG_FORMAT) not found (test/setup installs it)"; exit 2; }
	@n=0; for f in $(FORMAT_FILES); do \
		$(CLANG_FORMAT) --dry-run -Werror "$$f" >/dev/null 2>&1 || { echo "$$f"; n=$$((n + 1)); }; \
	done; \
	if [ $$n -gt 0 ]; then echo "format-check: $$n files differ from .clang-format (make format rewrites them)"; exit 1; fi

# The PGXN distribution: git archive of HEAD under sbpg-<version>/ (.gitattributes export-ignore
# leaves out what a release does not carry). Checked first: the archive holds HEAD, so the tree
# must be clean; META.json must validate and name the control file's version; released scripts
# must be unchanged and the update chain complete.
DIST = $(EXTENSION)-$(DISTVERSION)
dist:
	@test -n '$(EXTVERSION)' || { echo "make dist: no default_version in $(EXTENSION).control"; exit 1; }
	@git diff --quiet HEAD -- || { echo "make dist: the tree has uncommitted changes; the archive is made from HEAD, so commit first"; exit 1; }
	@node test/pg/meta-check.mjs || { echo "make dist: META.json does not validate (see above); no archive built"; exit 1; }
	@node test/pg/released-check.mjs || { echo "make dist: released scripts or the update chain are wrong (see above); no archive built"; exit 1; }
	rm -f $(DIST).zip
	git archive --format zip --prefix=$(DIST)/ -o $(DIST).zip HEAD
	@echo "make dist: $(DIST).zip"

# For scripts and checks: the values the build derives.
print-version:
	@echo $(EXTVERSION)
print-distversion:
	@echo $(DISTVERSION)
print-data:
	@echo $(DATA)

-include $(SRCS:.cpp=.d)
# A new version must reach the file that reads SBPG_VERSION.
src/pg/launcher.o: sbpg.control Makefile
.PHONY: sbemu clean-sbemu format format-check dist print-version print-distversion print-data
