# sbpg top-level Makefile.
# `make` builds everything the project needs on this machine: for now the Service Bus emulator
# test/sbemu/sbemu. `make check` runs every test suite (see test/run).

all: sbemu

sbemu:
	$(MAKE) -C test/sbemu

check: all
	test/run

clean:
	$(MAKE) -C test/sbemu clean

.PHONY: all sbemu check clean
