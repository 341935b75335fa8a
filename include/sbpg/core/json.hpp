// sbpg/core/json.hpp
//   The one place RapidJSON is included: its assertions throw instead of aborting, and strings
//   interoperate with std::string. Include this header, never <rapidjson/...> directly.
#pragma once

#include <stdexcept>

#ifndef RAPIDJSON_ASSERT
#define RAPIDJSON_ASSERT(x)                                                                                            \
	do {                                                                                                               \
		if (!(x))                                                                                                      \
			throw std::logic_error("RapidJSON assertion failed: " #x);                                                 \
	} while (0)
#endif
#define RAPIDJSON_HAS_STDSTRING 1

#include <rapidjson/document.h>
#include <rapidjson/error/en.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "sbpg/core/cpp_only.hpp"
