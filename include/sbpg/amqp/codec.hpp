// sbpg/amqp/codec.hpp
//   A small AMQP 1.0 type-system codec (pure C++, no Proton, no PostgreSQL): a value tree for
//   requests and replies, a writer for the hot paths (delivery headers and annotations), and the
//   split of an encoded message into its sections so that the bare message can be stored and
//   forwarded byte for byte. Built into the extension, the emulator (test/sbemu), the unit tests
//   and the fuzzers: src/amqp/codec_value.cpp (Value), codec_decode.cpp, codec_encode.cpp (Writer,
//   Encode), codec_sections.cpp (sections of a message).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sbpg::amqp {

// Section descriptors (AMQP 1.0 part 3).
enum SectionCode : uint64_t {
	kHeader = 0x70,
	kDeliveryAnnotations = 0x71,
	kMessageAnnotations = 0x72,
	kProperties = 0x73,
	kApplicationProperties = 0x74,
	kData = 0x75,
	kAmqpSequence = 0x76,
	kAmqpValue = 0x77,
	kFooter = 0x78,
};

// The message-format Service Bus uses for a batch: the body is a sequence of data sections, each
// one an encoded message.
constexpr uint32_t kBatchMessageFormat = 0x80013700;

struct Value {
	enum class Kind {
		Null,
		Bool,
		UByte,
		UShort,
		UInt,
		ULong,
		Byte,
		Short,
		Int,
		Long,
		Float,
		Double,
		Decimal,
		Char,
		Timestamp,
		Uuid,
		Binary,
		String,
		Symbol,
		List,
		Map,
		Array,
		Described,
	};
	Kind kind = Kind::Null;
	uint64_t u = 0;           // unsigned kinds, bool, char
	int64_t i = 0;            // signed kinds, timestamp
	double d = 0;             // float, double
	std::string s;            // binary, string, symbol, uuid (16 bytes), decimal (raw bytes); for an array of
	                          // described elements, the elements' one descriptor, encoded (empty otherwise)
	std::vector<Value> items; // list and array elements; map as key, value, key, value; described: descriptor, value

	static Value Null() { return Value(); }
	static Value Bool(bool b);
	static Value UByte(uint8_t v);
	static Value UInt(uint32_t v);
	static Value ULong(uint64_t v);
	static Value Int(int32_t v);
	static Value Long(int64_t v);
	static Value Timestamp(int64_t ms);
	static Value Uuid(const uint8_t bytes[16]);
	static Value Binary(std::string_view b);
	static Value String(std::string_view s);
	static Value Symbol(std::string_view s);
	static Value List(std::vector<Value> items = {});
	static Value Map(std::vector<Value> kv = {});
	static Value Array(std::vector<Value> items);

	bool IsNull() const { return kind == Kind::Null; }
	bool IsText() const { return kind == Kind::String || kind == Kind::Symbol; }
	bool IsInteger() const;
	bool IsUnsigned() const;
	// Integer value of any integer kind (and timestamp), saturating.
	int64_t AsInt() const;
	// Looks up a map entry whose key is a string or symbol equal to `key`.
	const Value *Get(std::string_view key) const;
	Value *GetMutable(std::string_view key);
	void Put(Value key, Value value); // replaces an entry with an equal text key
	size_t MapSize() const { return items.size() / 2; }
	// Text form for logs and JSON (message-id of any type, numbers, strings).
	std::string ToText() const;
	// JSON form (for the control interface).
	std::string ToJson() const;
};

bool operator==(const Value &a, const Value &b);

// Decodes one value. `depth` bounds nesting; returns false on malformed or too-deep input, and on
// input that would decode to a value tree out of proportion to its size (what one call may
// allocate is bounded by a fixed amount plus a multiple of end - p).
bool Decode(const uint8_t *&p, const uint8_t *end, Value *out, int depth = 0);
bool DecodeAll(std::string_view bytes, Value *out);
// Skips one encoded value without building it (nested descriptors are depth-limited as in Decode).
bool Skip(const uint8_t *&p, const uint8_t *end);
void Encode(const Value &v, std::string *out);

// Low-level writer for hand-built frames.
class Writer {
  public:
	explicit Writer(std::string *out) : out_(out) {}
	void Null() { out_->push_back(char(0x40)); }
	void Bool(bool b) { out_->push_back(char(b ? 0x41 : 0x42)); }
	void UByte(uint8_t v);
	void UInt(uint32_t v);
	void ULong(uint64_t v);
	void Int(int32_t v);
	void Long(int64_t v);
	void Timestamp(int64_t ms);
	void Uuid(const uint8_t b[16]);
	void Binary(std::string_view b);
	void String(std::string_view s);
	void Symbol(std::string_view s);
	void Descriptor(uint64_t code); // 0x00 then the code as ulong
	// Compound values are written with 32-bit size and count, back-filled at End.
	size_t BeginCompound(uint8_t code); // 0xd0 list32, 0xd1 map32
	void EndCompound(size_t mark, uint32_t count);
	void Raw(std::string_view bytes) { out_->append(bytes.data(), bytes.size()); }
	// An array of fixed-width elements: constructor then raw element bytes.
	void ArrayOfLong(const std::vector<int64_t> &v);
	void ArrayOfTimestamp(const std::vector<int64_t> &v);
	void ArrayOfUuid(const std::vector<std::string> &uuids); // 16-byte strings
	std::string *out() { return out_; }

  private:
	void Be32(uint32_t v);
	void Be64(uint64_t v);
	// Binary, string or symbol: `code8` is the constructor of the 8-bit-length form.
	void Variable(uint8_t code8, std::string_view bytes);
	void ArrayOf64(uint8_t code, const std::vector<int64_t> &v);
	std::string *out_;
};

// The sections of an encoded message, each including its descriptor.
struct Sections {
	std::string_view header;
	std::string_view delivery_annotations;
	std::string_view message_annotations;
	std::string_view properties;
	std::string_view application_properties;
	std::string_view body; // all body sections together
	std::string_view footer;
	uint64_t body_code = 0; // descriptor of the first body section (0 when there is no body)
	int body_sections = 0;
	// The bare message: properties through footer minus footer, i.e. what the sender made
	// immutable. Spans from the first of properties / application-properties / body.
	std::string_view bare;
};
bool SplitSections(std::string_view message, Sections *out, std::string *err);
// Decodes the value inside a section (after its descriptor).
bool DecodeSection(std::string_view section, Value *out);
// Encodes a described section.
void EncodeSection(uint64_t code, const Value &v, std::string *out);

// Field indexes of the properties list.
enum PropertyField {
	kMessageId = 0,
	kUserId,
	kTo,
	kSubject,
	kReplyTo,
	kCorrelationId,
	kContentType,
	kContentEncoding,
	kAbsoluteExpiryTime,
	kCreationTime,
	kGroupId,
	kGroupSequence,
	kReplyToGroupId,
};

} // namespace sbpg::amqp

#include "sbpg/core/cpp_only.hpp"
