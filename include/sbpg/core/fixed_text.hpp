// sbpg/core/fixed_text.hpp
//   FixedText<N>: text in a fixed buffer of N bytes (terminator included), cut on a UTF-8 character
//   boundary when it does not fit. Trivially copyable and without a destructor, so it can live in
//   shared memory and in structs that PostgreSQL's error recovery may longjmp over.
//   ErrorText is the one size every error description uses, from the handler's error through the
//   dead-letter description and the log line to the shared-memory slot sbpg.stats reads.
#pragma once

#include <cstddef>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>

#include "sbpg/core/text.hpp"
#include "sbpg/core/cpp_only.hpp"

namespace sbpg {

template <size_t N> struct FixedText {
	static_assert(N >= 8, "a FixedText holds at least a few characters");
	static constexpr size_t kCapacity = N - 1; // bytes of text, without the terminator

	char buf[N];

	// Replaces the text with s, cut to kCapacity bytes on a character boundary (s is expected to
	// be valid UTF-8; other bytes are copied as they are).
	void Set(std::string_view s) {
		size_t n = Utf8Prefix(s, kCapacity);
		std::memcpy(buf, s.data(), n);
		buf[n] = '\0';
	}
	// Appends s, cut the same way; returns false when something did not fit.
	bool Append(std::string_view s) {
		size_t have = std::strlen(buf);
		size_t n = Utf8Prefix(s, kCapacity - have);
		std::memcpy(buf + have, s.data(), n);
		buf[have + n] = '\0';
		return n == s.size();
	}
	void Clear() { buf[0] = '\0'; }
	bool Empty() const { return buf[0] == '\0'; }
	const char *c_str() const { return buf; }
	std::string_view view() const { return std::string_view(buf); }
	std::string str() const { return std::string(buf); }
};

// Error descriptions: a handler's message, a dead-letter description, last_error in sbpg.stats.
// Service Bus keeps a dead-letter description of up to 4096 characters; 1024 bytes keeps a NOTIFY
// payload and a log line readable and holds any PostgreSQL error's primary message.
using ErrorText = FixedText<1024>;
// Reason codes (DeadLetterReason), short identifiers.
using ReasonText = FixedText<64>;

static_assert(std::is_trivially_copyable_v<ErrorText>, "ErrorText goes into shared memory");

} // namespace sbpg
