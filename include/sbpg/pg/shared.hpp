// sbpg/pg/shared.hpp
//   Settings (GUCs) and the per-process state sbpg's code shares across files (include after
//   postgres.h, only from src/pg/). Shared memory (worker slots) is in sbpg/pg/slots.hpp.
#pragma once

#ifndef POSTGRES_H
#error "include postgres.h before sbpg/pg/shared.hpp"
#endif

extern "C" {
#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/spin.h"
}

namespace sbpg::pg {

// Settings (GUCs), defined in module.cpp.
extern char *guc_database;
extern int guc_max_workers;
extern int guc_log_messages; // LogMessages
extern int guc_inbox_retention_s;
extern int guc_outbox_retention_s;
extern int guc_stats_history_min; // sbpg.stats_history_retention, in minutes
extern int guc_max_json_depth;
extern char *guc_ca_file;

// Set in sbpg's workers: tenant_role is the run_as role while tenant code runs (InvalidOid
// otherwise); sbpg._caller() judges it (module.cpp).
extern bool in_sbpg_worker;
extern Oid tenant_role;

enum LogMessages { kLogNone = 0, kLogFailures = 1, kLogAll = 2 };

} // namespace sbpg::pg
