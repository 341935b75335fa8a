// sbpg/pg/compat.hpp
//   Every difference between the PostgreSQL major versions sbpg builds for (15, 16, 17 and 18),
//   in one place. The rest of src/pg calls these names and never tests PG_VERSION_NUM itself.
//   Include after postgres.h, only from src/pg/.
//
//   What differs, and since when:
//   - 16: pg_proc_aclcheck() and its siblings became object_aclcheck(class, oid, role, mode).
//   - 17: CreateWaitEventSet() takes a ResourceOwner instead of a MemoryContext; a set made with
//         no owner lives in TopMemoryContext until it is freed, which is what a worker's
//         lifelong wait set wants (15 and 16: allocated in TopMemoryContext, the same).
//   - 18: index_beginscan() takes an IndexScanInstrumentation (NULL: none) before its key counts.
//   - strlcpy: PostgreSQL declares its own only where the C library lacks one (port.h, by
//         HAVE_DECL_STRLCPY). Headers configured against glibc 2.38 or later (Debian 13's
//         PostgreSQL 17 headers) rely on glibc's declaration, which glibc 2.36 does not have;
//         CopyCString does not depend on either.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/compat.hpp"
#endif

#if PG_VERSION_NUM < 150000
#error "sbpg needs PostgreSQL 15 or later"
#endif

extern "C" {
#include "access/genam.h"
#include "catalog/pg_proc.h"
#include "storage/latch.h"
#include "utils/acl.h"
#include "utils/memutils.h"
}

#include <cstring>

namespace sbpg::pg::compat {

// May role run function fn (mode ACL_EXECUTE)?
inline bool
ProcAclOk(Oid fn, Oid role, AclMode mode) {
#if PG_VERSION_NUM >= 160000
	return object_aclcheck(ProcedureRelationId, fn, role, mode) == ACLCHECK_OK;
#else
	return pg_proc_aclcheck(fn, role, mode) == ACLCHECK_OK;
#endif
}

// A wait event set for n events that lives as long as the process (nobody frees it).
inline WaitEventSet *
CreateLongLivedWaitSet(int n) {
#if PG_VERSION_NUM >= 170000
	return CreateWaitEventSet(nullptr, n);
#else
	return CreateWaitEventSet(TopMemoryContext, n);
#endif
}

// An index scan of heap through index, without instrumentation.
inline IndexScanDesc
IndexBeginScan(Relation heap, Relation index, Snapshot snapshot, int nkeys, int norderbys) {
#if PG_VERSION_NUM >= 180000
	return index_beginscan(heap, index, snapshot, nullptr, nkeys, norderbys);
#else
	return index_beginscan(heap, index, snapshot, nkeys, norderbys);
#endif
}

// Copies src into dst[size], cut at size - 1 bytes and always terminated (strlcpy's contract,
// without its return value).
inline void
CopyCString(char *dst, const char *src, size_t size) {
	if (size == 0)
		return;
	size_t n = strnlen(src, size - 1);
	memcpy(dst, src, n);
	dst[n] = '\0';
}

} // namespace sbpg::pg::compat
