// src/amqp/outgoing.cpp
//   The encoding of an outgoing message and of a Service Bus batch, pure C++ over the codec: what
//   the publisher sends, and what the unit tests decode again. A message is header (durable, and
//   the time to live when there is one), message annotations (the scheduled enqueue time), properties,
//   application properties (the caller's, plus traceparent and Diagnostic-Id) and one data section
//   with the body.
#include "sbpg/amqp/publisher.hpp"

#include "sbpg/amqp/codec.hpp"
#include "sbpg/core/json.hpp"

namespace sbpg {

namespace {

using amqp::Value;

Value
Section(uint64_t code, Value v) {
	Value d;
	d.kind = Value::Kind::Described;
	d.items.push_back(Value::ULong(code));
	d.items.push_back(std::move(v));
	return d;
}

Value
TextOrNull(const std::string &s) {
	return s.empty() ? Value::Null() : Value::String(s);
}

// The caller's application properties: a JSON object of strings, numbers, booleans and nulls.
bool
Properties(const std::string &json, Value *map, std::string *why) {
	if (json.empty())
		return true;
	rapidjson::Document d;
	try {
		d.Parse(json.c_str(), json.size());
	} catch (const std::exception &e) {
		*why = std::string("properties: ") + e.what();
		return false;
	}
	if (d.HasParseError() || !d.IsObject()) {
		*why = "properties must be a JSON object";
		return false;
	}
	for (auto it = d.MemberBegin(); it != d.MemberEnd(); ++it) {
		Value key = Value::String(std::string(it->name.GetString(), it->name.GetStringLength()));
		const auto &v = it->value;
		Value val;
		if (v.IsString()) {
			val = Value::String(std::string(v.GetString(), v.GetStringLength()));
		} else if (v.IsBool()) {
			val = Value::Bool(v.GetBool());
		} else if (v.IsInt64()) {
			val = Value::Long(v.GetInt64());
		} else if (v.IsNumber()) {
			val.kind = Value::Kind::Double;
			val.d = v.GetDouble();
		} else if (v.IsNull()) {
			val = Value::Null();
		} else {
			*why = "application property \"" + std::string(it->name.GetString()) +
			       "\" is not a string, number, boolean or null";
			return false;
		}
		map->Put(std::move(key), std::move(val));
	}
	return true;
}

} // namespace

bool
EncodeOutgoing(const OutgoingMessage &m, std::string *out, std::string *why) {
	Value app = Value::Map();
	if (!Properties(m.properties_json, &app, why))
		return false;
	if (!m.traceparent.empty()) {
		if (!app.Get("traceparent"))
			app.Put(Value::String("traceparent"), Value::String(m.traceparent));
		if (!app.Get("Diagnostic-Id"))
			app.Put(Value::String("Diagnostic-Id"), Value::String(m.traceparent));
	}
	out->clear();
	// header: durable, priority, ttl
	std::vector<Value> header{Value::Bool(true)};
	if (m.ttl_ms > 0) {
		header.push_back(Value::Null());
		header.push_back(Value::UInt(static_cast<uint32_t>(std::min<int64_t>(m.ttl_ms, UINT32_MAX))));
	}
	amqp::Encode(Section(amqp::kHeader, Value::List(std::move(header))), out);
	if (m.scheduled_ms > 0) {
		Value ann = Value::Map();
		ann.Put(Value::Symbol("x-opt-scheduled-enqueue-time"), Value::Timestamp(m.scheduled_ms));
		amqp::Encode(Section(amqp::kMessageAnnotations, std::move(ann)), out);
	}
	std::vector<Value> props{Value::String(m.message_id),
	                         Value::Null(), // user-id
	                         Value::Null(), // to
	                         TextOrNull(m.subject),
	                         TextOrNull(m.reply_to),
	                         TextOrNull(m.correlation_id),
	                         m.content_type.empty() ? Value::Null() : Value::Symbol(m.content_type),
	                         Value::Null(), // content-encoding
	                         (m.ttl_ms > 0 && m.created_ms > 0) ? Value::Timestamp(m.created_ms + m.ttl_ms)
	                                                            : Value::Null(),
	                         m.created_ms > 0 ? Value::Timestamp(m.created_ms) : Value::Null(),
	                         TextOrNull(m.session_id)};
	amqp::Encode(Section(amqp::kProperties, Value::List(std::move(props))), out);
	if (app.MapSize())
		amqp::Encode(Section(amqp::kApplicationProperties, std::move(app)), out);
	amqp::Encode(Section(amqp::kData, Value::Binary(m.body)), out);
	return true;
}

} // namespace sbpg
