// sbpg/core/cpp_only.hpp
//   Included last by headers of the pure C++ parts (AMQP, identity, messages, schemas, core): a
//   translation unit that also includes postgres.h before them fails to compile, which keeps
//   PostgreSQL's longjmp-based errors out of code that owns C++ objects with destructors.
#pragma once

#ifdef POSTGRES_H
#error "a pure C++ sbpg header was included after postgres.h; include C++ headers first (see docs/architecture.md)"
#endif
